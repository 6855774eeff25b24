//! query-api: the read side (CQRS). Serves the views view-builder keeps in Redis as an HTTP JSON
//! API, relays view changes as Server-Sent Events and serves a small dashboard page.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /v1/sensors` | `{"view_seq", "sensors": [view...]}` by `sensor_id` |
//! | `GET /v1/sensors/{id}` | the sensor's view (404 if it has none) |
//! | `GET /v1/sensors/{id}/history` | `{"sensor_id", "view_seq", "history": [point...]}`, oldest first |
//! | `GET /v1/sites/{site}` | `{"site", "view_seq", "sensors": [view...]}` by `abs(delta_celsius)` descending |
//! | `GET /v1/top?limit=N` | `{"view_seq", "top": [view...]}`, `abs(delta_celsius)` descending, ties by id; `N` in 1..=100 (default 10) |
//! | `GET /v1/live` | Server-Sent Events `sensor`, one per view change (`thermo.views.sensor.>`) |
//! | `GET /` | the dashboard |
//!
//! `view_seq` is the deltas-stream sequence a view reflects: per sensor, the sequence of its
//! latest delta; for a list, the highest sequence applied over the partitions when it was read
//! (every list is read in one atomic Lua call). Errors are `{"error": "..."}`: 400 for a bad id,
//! site or limit, 404 for an unknown sensor or site, 503 when Redis fails.
//!
//! Single-sensor reads go through a small in-process cache (moka, a few seconds' time-to-live)
//! that the view-change feed keeps current; an entry is only ever replaced by a newer view.

pub mod reader;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use kappa_runtime::config::{NatsArgs, parse_listen_addr};
use kappa_runtime::shutdown::CancellationToken;
use moka::future::Cache;
use serde_json::json;
use thermo_domain::views::SensorView;

pub use reader::ViewReader;

/// The service's name.
pub const SERVICE: &str = "query-api";
/// Largest `limit` of `/v1/top`.
pub const MAX_TOP: usize = 100;
/// `limit` of `/v1/top` when none is given.
pub const DEFAULT_TOP: usize = 10;

/// Configuration (every flag is also an environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Redis holding the views (view-builder's `VIEWS_REDIS_URL`).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// HTTP listener: the API, the dashboard, `/healthz` and `/metrics`.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080", value_parser = parse_listen_addr)]
    pub http_addr: SocketAddr,
    /// Seconds a cached sensor view may be served (0 disables the cache).
    #[arg(long, env = "CACHE_TTL_SECS", default_value_t = 5)]
    pub cache_ttl_secs: u64,
}

/// An API error: a status and a message, sent as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "views unavailable");
        metrics::counter!("kappa_query_errors_total").increment(1);
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "views are unavailable")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Checks a sensor id or site: `[A-Za-z0-9_-]{1,64}`.
pub fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
    if thermo_domain::valid_sensor_id(value) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{what} must match [A-Za-z0-9_-]{{1,64}}"),
        ))
    }
}

/// Parses `/v1/top`'s `limit`.
pub fn parse_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_TOP);
    };
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_TOP).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be an integer in 1..={MAX_TOP}"),
        )),
    }
}

/// True if `new` is at least as recent as `old` (by view sequence, then metadata version).
pub fn is_newer(new: &SensorView, old: &SensorView) -> bool {
    (new.view_seq, new.sensor.version) >= (old.view_seq, old.sensor.version)
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    store: ViewReader,
    cache: Option<Cache<String, Arc<SensorView>>>,
    live: tokio::sync::broadcast::Sender<String>,
    shutdown: CancellationToken,
}

impl ApiState {
    /// State over `store`, with a sensor cache of `cache_ttl` (zero: no cache).
    pub fn new(store: ViewReader, cache_ttl: Duration, shutdown: CancellationToken) -> Self {
        let cache = (!cache_ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cache_ttl)
                .build()
        });
        Self {
            store,
            cache,
            live: tokio::sync::broadcast::channel(4096).0,
            shutdown,
        }
    }

    /// Takes in a view change from the feed: refreshes the cache and relays it to live clients.
    pub async fn view_changed(&self, raw: &[u8]) {
        let Ok(view) = serde_json::from_slice::<SensorView>(raw) else {
            tracing::debug!("undecodable view change ignored");
            return;
        };
        if let Some(cache) = &self.cache {
            let view = Arc::new(view.clone());
            cache
                .entry(view.sensor_id.clone())
                .and_compute_with(|old| async move {
                    match old {
                        Some(o) if !is_newer(&view, o.value()) => moka::ops::compute::Op::Nop,
                        _ => moka::ops::compute::Op::Put(view),
                    }
                })
                .await;
        }
        let _ = self.live.send(String::from_utf8_lossy(raw).into_owned());
    }

    async fn sensor(&self, id: &str) -> Result<Option<SensorView>, ApiError> {
        if let Some(cache) = &self.cache
            && let Some(v) = cache.get(id).await
        {
            metrics::counter!("kappa_query_cache_hits_total").increment(1);
            return Ok(Some((*v).clone()));
        }
        metrics::counter!("kappa_query_cache_misses_total").increment(1);
        let v = self.store.sensor(id).await.map_err(ApiError::unavailable)?;
        if let (Some(cache), Some(view)) = (&self.cache, &v) {
            let view = Arc::new(view.clone());
            cache
                .entry(id.to_string())
                .and_compute_with(|old| async move {
                    match old {
                        Some(o) if !is_newer(&view, o.value()) => moka::ops::compute::Op::Nop,
                        _ => moka::ops::compute::Op::Put(view),
                    }
                })
                .await;
        }
        Ok(v)
    }
}

fn count(route: &'static str) {
    metrics::counter!("kappa_query_requests_total", "route" => route).increment(1);
}

async fn dashboard() -> Html<&'static str> {
    count("dashboard");
    Html(include_str!("dashboard.html"))
}

async fn sensors(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    count("sensors");
    let list = s.store.sensors().await.map_err(ApiError::unavailable)?;
    Ok(Json(
        json!({ "view_seq": list.view_seq, "sensors": list.views }),
    ))
}

async fn sensor(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<SensorView>, ApiError> {
    count("sensor");
    check_name("sensor id", &id)?;
    s.sensor(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown sensor '{id}'")))
}

async fn history(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    count("history");
    check_name("sensor id", &id)?;
    let h = s
        .store
        .history(&id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown sensor '{id}'")))?;
    Ok(Json(
        json!({ "sensor_id": id, "view_seq": h.view_seq, "history": h.points }),
    ))
}

async fn site(
    State(s): State<ApiState>,
    Path(site): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    count("site");
    check_name("site", &site)?;
    let list = s.store.site(&site).await.map_err(ApiError::unavailable)?;
    if list.views.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown site '{site}'"),
        ));
    }
    Ok(Json(
        json!({ "site": site, "view_seq": list.view_seq, "sensors": list.views }),
    ))
}

async fn top(
    State(s): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    count("top");
    let limit = parse_limit(q.get("limit").map(String::as_str))?;
    let list = s.store.top(limit).await.map_err(ApiError::unavailable)?;
    Ok(Json(
        json!({ "view_seq": list.view_seq, "top": list.views }),
    ))
}

async fn live(State(s): State<ApiState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    count("live");
    let rx = s.live.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(data) => return Some((Ok(Event::default().event("sensor").data(data)), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    metrics::counter!("kappa_query_live_lagged_total").increment(n);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .take_until(s.shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

/// The API's routes (the runtime adds `/healthz` and `/metrics`).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/v1/sensors", get(sensors))
        .route("/v1/sensors/{id}", get(sensor))
        .route("/v1/sensors/{id}/history", get(history))
        .route("/v1/sites/{site}", get(site))
        .route("/v1/top", get(top))
        .route("/v1/live", get(live))
        .fallback(not_found)
        .with_state(state)
}

/// Relays `thermo.views.sensor.>` into the cache and the live clients until shutdown.
async fn follow_views(
    client: async_nats::Client,
    state: ApiState,
    subscribed: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let subject = format!("{}.>", thermo_domain::subjects::SENSOR_VIEWS_PREFIX);
    loop {
        match client.subscribe(subject.clone()).await {
            Ok(mut sub) => {
                subscribed.store(true, Ordering::Relaxed);
                loop {
                    let m = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = sub.next() => m,
                    };
                    let Some(m) = m else { break };
                    state.view_changed(&m.payload).await;
                }
                subscribed.store(false, Ordering::Relaxed);
                // The cache may have missed changes: start over from Redis.
                if let Some(c) = &state.cache {
                    c.invalidate_all();
                }
            }
            Err(e) => tracing::warn!(error = %e, "subscribing to view changes failed"),
        }
        if kappa_runtime::partition::sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
            return;
        }
    }
}

/// Runs the service until SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let service = kappa_runtime::app::Service::start(SERVICE, &cfg.nats).await?;
    let conn = kappa_runtime::working::remote::connect(&cfg.redis_url, "REDIS_URL").await?;
    let store = ViewReader::new(conn.clone());
    let state = ApiState::new(
        store,
        Duration::from_secs(cfg.cache_ttl_secs),
        service.shutdown.clone(),
    );

    let redis_up = Arc::new(AtomicBool::new(true));
    {
        let up = redis_up.clone();
        let mut conn = conn.clone();
        let stop = service.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let ok = redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok();
                up.store(ok, Ordering::Relaxed);
                if kappa_runtime::partition::sleep_or_cancel(Duration::from_secs(2), &stop).await {
                    return;
                }
            }
        });
        service.health.register(
            "redis",
            Arc::new(move || (redis_up.load(Ordering::Relaxed), serde_json::json!(null))),
        );
    }
    let subscribed = Arc::new(AtomicBool::new(false));
    {
        let s = subscribed.clone();
        service.health.register(
            "view_feed",
            Arc::new(move || (s.load(Ordering::Relaxed), serde_json::json!(null))),
        );
    }
    let feed = tokio::spawn(follow_views(
        service.nats.client.clone(),
        state.clone(),
        subscribed,
        service.shutdown.clone(),
    ));
    let http = service.serve_http(cfg.http_addr, router(state)).await?;
    tracing::info!(addr = %cfg.http_addr, "query-api running");
    let _ = http.await;
    service.shutdown.cancel();
    let _ = feed.await;
    service.drain().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None), Ok(DEFAULT_TOP));
        assert_eq!(parse_limit(Some("1")), Ok(1));
        assert_eq!(parse_limit(Some("100")), Ok(100));
        for bad in ["0", "101", "-1", "x", "", "1.5"] {
            assert_eq!(
                parse_limit(Some(bad)).map_err(|e| e.status),
                Err(StatusCode::BAD_REQUEST),
                "{bad}"
            );
        }
    }

    #[test]
    fn names() {
        assert!(check_name("sensor id", "s-0001").is_ok());
        assert!(check_name("sensor id", &"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a.b", "é", &"a".repeat(65)] {
            assert_eq!(
                check_name("sensor id", bad).map_err(|e| e.status),
                Err(StatusCode::BAD_REQUEST)
            );
        }
    }
}
