//! query-api: the read side (CQRS). Serves the views view-builder keeps in Redis as an HTTP JSON
//! API, relays view changes as Server-Sent Events and serves a small dashboard page.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /v1/sensors?limit=N&cursor=C` | `{"view_seq", "total", "next_cursor", "sensors": [view...]}`, one page by `sensor_id` |
//! | `GET /v1/sensors/{id}` | the sensor's view (404 if it has none) |
//! | `GET /v1/sensors/{id}/history` | `{"sensor_id", "view_seq", "history": [point...]}`, oldest first |
//! | `GET /v1/sites/{site}?limit=N&cursor=C` | `{"site", "view_seq", "total", "next_cursor", "sensors": [view...]}`, one page by `abs(delta_celsius)` descending |
//! | `GET /v1/top?limit=N` | `{"view_seq", "top": [view...]}`, `abs(delta_celsius)` descending, ties by id; `N` in 1..=100 (default 10) |
//! | `GET /v1/live` | Server-Sent Events `sensor`, one per view change (`thermo.views.sensor.>`) |
//! | `GET /v1/pipeline` | the pipeline's health, gathered on `kappa.status` ([`pipeline`]) |
//! | `GET /openapi.json` | the OpenAPI document of these routes, generated from the handlers |
//! | `GET /` | the dashboard |
//!
//! Lists are pages: `limit` in 1..=[`MAX_PAGE`] (default [`DEFAULT_PAGE`]), `cursor` the
//! `next_cursor` of the previous page (absent on the last one). A page costs O(log N + limit)
//! in Redis whatever the number of sensors N.
//!
//! `view_seq` is the deltas-stream sequence a view reflects: per sensor, the sequence of its
//! latest delta; for a list, a true low watermark, the least position over every partition of
//! the deltas stream when it was read (every page is read in one atomic Lua call), with each
//! partition's own in `positions`. Every read takes `min_seq=N` (a READINGS sequence, such as
//! a reading's publish ack) and `max_wait_ms`: the answer then reflects every reading of the
//! requested sensors up to `N`, or is a 503 with `bound` saying which hop is behind and where
//! it stands ([`bound`]). Errors are `{"error": "..."}`: 400 for a bad id,
//! site, limit or cursor, 404 for an unknown sensor or site, 503 when Redis fails, a request
//! outlives `QUERY_REQUEST_TIMEOUT_MS`, `QUERY_MAX_IN_FLIGHT` requests are in flight or
//! `QUERY_MAX_LIVE` live clients are connected.
//!
//! Single-sensor reads go through a small in-process cache (moka, a few seconds' time-to-live)
//! that the view-change feed keeps current; an entry is only ever replaced by a newer view.

pub mod bound;
pub mod pipeline;
pub mod reader;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use kappa_runtime::config::{NatsArgs, parse_listen_addr};
use kappa_runtime::consistency::Scope;
use kappa_runtime::shutdown::CancellationToken;
use moka::future::Cache;
use serde::Serialize;
use thermo_domain::views::{HistoryEntry, SensorMeta, SensorView, ViewPage};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::OpenApi;

pub use reader::ViewReader;

/// The service's name.
pub const SERVICE: &str = "query-api";
/// Largest `limit` of `/v1/top`.
pub const MAX_TOP: usize = 100;
/// `limit` of `/v1/top` when none is given.
pub const DEFAULT_TOP: usize = 10;
/// Largest `limit` of a list page (`/v1/sensors`, `/v1/sites/{site}`).
pub const MAX_PAGE: usize = 1000;
/// `limit` of a list page when none is given.
pub const DEFAULT_PAGE: usize = 100;

/// Configuration (every flag is also an environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Redis holding the views unless `VIEWS_REDIS_URL` names another (as for view-builder).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Redis holding the views (default: `REDIS_URL`), the same as view-builder's.
    #[arg(long, env = "VIEWS_REDIS_URL")]
    pub views_redis_url: Option<String>,
    /// TLS to Redis (`REDIS_CA`, `REDIS_CERT`, `REDIS_KEY`; with a `rediss://` URL).
    #[command(flatten)]
    pub redis_tls: kappa_runtime::config::RedisTlsArgs,
    /// HTTP listener: the API, the dashboard, `/healthz` and `/metrics`.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080", value_parser = parse_listen_addr)]
    pub http_addr: SocketAddr,
    /// Seconds a cached sensor view may be served (0 disables the cache).
    #[arg(long, env = "CACHE_TTL_SECS", default_value_t = 5)]
    pub cache_ttl_secs: u64,
    /// Milliseconds a request may take until its answer starts; later it is a JSON 503.
    #[arg(long, env = "QUERY_REQUEST_TIMEOUT_MS", default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// Requests handled at once; one more is refused at once with a JSON 503.
    #[arg(long, env = "QUERY_MAX_IN_FLIGHT", default_value_t = 512,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// List pages (`/v1/sensors`, `/v1/sites/{site}`) read at once; more wait (within the
    /// request timeout), so lists cannot take every core from single-sensor reads. Measured
    /// (`scripts/read-load.sh`, 32 clients hammering pages of 1000 beside 1000 live clients):
    /// single-sensor reads kept 12% of their unloaded rate at 2 (p50 2.2 ms) and 0.2% at 64
    /// (p50 156 ms), while lists gained only 1.5x.
    #[arg(long, env = "QUERY_LIST_CONCURRENCY", default_value_t = 2,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub list_concurrency: u32,
    /// Live (`/v1/live`) clients connected at once; one more gets a JSON 503.
    #[arg(long, env = "QUERY_MAX_LIVE", default_value_t = 2000,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_live: u32,
    /// How `/v1/pipeline` gathers the services' status.
    #[command(flatten)]
    pub pipeline: pipeline::PipelineArgs,
}

impl Config {
    /// The request limits this configuration sets.
    pub fn limits(&self) -> Limits {
        Limits {
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_in_flight: self.max_in_flight as usize,
            list_concurrency: self.list_concurrency as usize,
            max_live: self.max_live as usize,
        }
    }
}

/// What one client may take of the API (see [`Config`] for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time a request may take until its answer starts.
    pub request_timeout: Duration,
    /// Requests handled at once.
    pub max_in_flight: usize,
    /// List pages read at once.
    pub list_concurrency: usize,
    /// Live clients connected at once.
    pub max_live: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            max_in_flight: 512,
            list_concurrency: 2,
            max_live: 2000,
        }
    }
}

/// An API error: a status and a message, sent as `{"error": message}` (with `bound` when a
/// `min_seq` was not reached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
    /// Where the views stood, when a `min_seq` bound was not reached in time.
    pub bound: Option<BoundDetail>,
}

/// Why a `min_seq` bound was not reached: the least advanced hop and where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BoundDetail {
    /// The bound asked for (a READINGS stream sequence).
    pub min_seq: u64,
    /// `input` (the readings stream does not hold `min_seq` yet), `decided` (temperature-delta
    /// has not decided every reading up to it) or `applied` (the views have not applied every
    /// delta of those readings).
    #[schema(value_type = String)]
    pub stage: kappa_runtime::consistency::Stage,
    /// The partition that is behind (of the readings for `decided`, of the deltas for
    /// `applied`).
    pub partition: u32,
    /// Its position (the readings stream's last sequence for `input`).
    pub position: u64,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            bound: None,
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
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut r = (
            self.status,
            Json(ErrorBody {
                error: self.message,
                bound: self.bound,
            }),
        )
            .into_response();
        if retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            format!("bad path: {}", e.body_text()),
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            format!("bad query string: {}", e.body_text()),
        )
    }
}

/// An error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// Set when a `min_seq` bound was not reached in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub bound: Option<BoundDetail>,
}

/// A page of `/v1/sensors`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SensorPage {
    /// Low watermark: every delta with a deltas-stream sequence at most this is reflected (the
    /// least position over the partitions when the page was read).
    pub view_seq: u64,
    /// Each deltas partition's position when the page was read.
    pub positions: BTreeMap<String, u64>,
    /// The `min_seq` asked for, reached: every reading of these sensors up to it is reflected.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub min_seq: Option<u64>,
    /// Sensors with a view now (all pages).
    pub total: u64,
    /// `cursor` of the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    /// The page's views, by `sensor_id`.
    pub sensors: Vec<SensorView>,
}

/// A page of `/v1/sites/{site}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SitePage {
    /// The site.
    pub site: String,
    /// Low watermark: every delta with a deltas-stream sequence at most this is reflected (the
    /// least position over the partitions when the page was read).
    pub view_seq: u64,
    /// Each deltas partition's position when the page was read.
    pub positions: BTreeMap<String, u64>,
    /// The `min_seq` asked for, reached: every reading of these sensors up to it is reflected.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub min_seq: Option<u64>,
    /// The site's sensors now (all pages).
    pub total: u64,
    /// `cursor` of the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    /// The page's views, `abs(delta_celsius)` descending, ties by `sensor_id`.
    pub sensors: Vec<SensorView>,
}

/// `/v1/top`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TopList {
    /// Low watermark: every delta with a deltas-stream sequence at most this is reflected (the
    /// least position over the partitions when the list was read).
    pub view_seq: u64,
    /// Each deltas partition's position when the list was read.
    pub positions: BTreeMap<String, u64>,
    /// The `min_seq` asked for, reached: every reading up to it is reflected.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub min_seq: Option<u64>,
    /// The views, `abs(delta_celsius)` descending, ties by `sensor_id`.
    pub top: Vec<SensorView>,
}

/// `/v1/sensors/{id}/history`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SensorHistory {
    /// The sensor.
    pub sensor_id: String,
    /// The sensor's view sequence.
    pub view_seq: u64,
    /// The `min_seq` asked for, reached: every reading of the sensor up to it is reflected.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub min_seq: Option<u64>,
    /// Points, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// The query parameters of a `/v1/sensors` page.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SensorsPageParams {
    /// Views per page, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page (absent or empty: the first page).
    #[param(pattern = r"^[A-Za-z0-9_-]{0,64}$")]
    pub cursor: Option<String>,
}

/// The query parameters of a `/v1/sites/{site}` page.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SitePageParams {
    /// Views per page, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page (absent or empty: the first page).
    #[param(pattern = r"^(-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?:[A-Za-z0-9_-]{1,64})?$")]
    pub cursor: Option<String>,
}

/// Read-your-writes, accepted by every read.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BoundParams {
    /// A READINGS stream sequence (e.g. a reading's publish ack): the answer reflects every
    /// reading of the requested sensors up to it, or is a 503 with `bound` (0: no bound).
    #[param(minimum = 0)]
    pub min_seq: Option<u64>,
    /// How long to wait for `min_seq`, in ms (default 3000, at most the request timeout).
    #[param(minimum = 0, maximum = 60000)]
    pub max_wait_ms: Option<u32>,
}

/// The query parameters of `/v1/top`.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TopParams {
    /// Views, 1..=100 (default 10).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
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
    parse_bounded_limit(raw, DEFAULT_TOP, MAX_TOP)
}

/// Parses a list page's `limit`.
pub fn parse_page_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    parse_bounded_limit(raw, DEFAULT_PAGE, MAX_PAGE)
}

fn parse_bounded_limit(raw: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    // Digits only: `usize::from_str` would take "+5" too, which the schema's integer is not.
    let digits = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
    match raw.parse::<usize>() {
        Ok(n) if digits && (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be an integer in 1..={max}"),
        )),
    }
}

fn bad_cursor() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "cursor must be a next_cursor this API answered",
    )
}

/// Checks `/v1/sensors`' cursor: a sensor id (`""` when absent or empty: the first page).
pub fn parse_sensors_cursor(raw: Option<&str>) -> Result<&str, ApiError> {
    match raw {
        None | Some("") => Ok(""),
        Some(c) if thermo_domain::valid_sensor_id(c) => Ok(c),
        Some(_) => Err(bad_cursor()),
    }
}

/// Checks a site page's cursor: `<score>:<sensor id>`, the score a number in decimal or
/// exponent notation (`""` when absent or empty: the first page).
pub fn parse_site_cursor(raw: Option<&str>) -> Result<&str, ApiError> {
    let c = match raw {
        None | Some("") => return Ok(""),
        Some(c) => c,
    };
    let (score, id) = c.split_once(':').ok_or_else(bad_cursor)?;
    if is_score(score) && thermo_domain::valid_sensor_id(id) {
        Ok(c)
    } else {
        Err(bad_cursor())
    }
}

/// `-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?`, the way Redis writes a score (so no "inf" or
/// "nan" reaches the script), and exactly the cursor pattern `/openapi.json` states.
fn is_score(s: &str) -> bool {
    fn digits(s: &str) -> (&str, bool) {
        let rest = s.trim_start_matches(|c: char| c.is_ascii_digit());
        (rest, rest.len() < s.len())
    }
    let s = s.strip_prefix('-').unwrap_or(s);
    let (mut rest, whole) = digits(s);
    if !whole {
        return false;
    }
    if let Some(frac) = rest.strip_prefix('.') {
        let (r, ok) = digits(frac);
        if !ok {
            return false;
        }
        rest = r;
    }
    if let Some(exp) = rest.strip_prefix(['e', 'E']) {
        let exp = exp.strip_prefix(['-', '+']).unwrap_or(exp);
        let (r, ok) = digits(exp);
        if !ok {
            return false;
        }
        rest = r;
    }
    rest.is_empty()
}

/// True if `new` is at least as recent as `old` (by view sequence, then metadata version).
pub fn is_newer(new: &SensorView, old: &SensorView) -> bool {
    (new.view_seq, new.sensor.version) >= (old.view_seq, old.sensor.version)
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    store: ViewReader,
    consistency: Option<kappa_runtime::consistency::Consistency>,
    cache: Option<Cache<String, Arc<SensorView>>>,
    live: tokio::sync::broadcast::Sender<String>,
    shutdown: CancellationToken,
    limits: Limits,
    in_flight: Arc<Semaphore>,
    list_pages: Arc<Semaphore>,
    live_clients: Arc<Semaphore>,
    pipeline: Option<pipeline::Pipeline>,
}

impl ApiState {
    /// State over `store`, with a sensor cache of `cache_ttl` (zero: no cache) and `limits`.
    pub fn new(
        store: ViewReader,
        cache_ttl: Duration,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> Self {
        let cache = (!cache_ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cache_ttl)
                .build()
        });
        Self {
            store,
            consistency: None,
            cache,
            live: tokio::sync::broadcast::channel(4096).0,
            shutdown,
            limits,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            list_pages: Arc::new(Semaphore::new(limits.list_concurrency)),
            live_clients: Arc::new(Semaphore::new(limits.max_live)),
            pipeline: None,
        }
    }

    /// Checks `min_seq` bounds with `c` (without it, a bounded read is a 503) and states
    /// watermarks over all of the deltas stream's partitions.
    #[must_use]
    pub fn with_consistency(mut self, c: kappa_runtime::consistency::Consistency) -> Self {
        self.consistency = Some(c);
        self
    }

    /// Serves `/v1/pipeline` with `pipeline` (without it, `/v1/pipeline` answers 503).
    #[must_use]
    pub fn with_pipeline(mut self, pipeline: pipeline::Pipeline) -> Self {
        self.pipeline = Some(pipeline);
        self
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

async fn openapi_json() -> Response {
    count("openapi");
    match ApiDoc::openapi().to_json() {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("openapi document: {e}"),
        )
        .into_response(),
    }
}

type QueryMap = Result<Query<HashMap<String, String>>, QueryRejection>;

fn query_value<'a>(q: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    q.get(key).map(String::as_str)
}

/// Waits (within the request timeout) for one of the list-page slots.
async fn list_slot(s: &ApiState) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    s.list_pages
        .acquire()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))
}

/// Every sensor's view, one page by `sensor_id`.
#[utoipa::path(get, path = "/v1/sensors", params(SensorsPageParams, BoundParams),
    responses(
        (status = 200, description = "a page of views by sensor id", body = SensorPage),
        (status = 400, description = "bad limit or cursor", body = ErrorBody),
        (status = 409, description = "min_seq is beyond the readings stream's end", body = ErrorBody),
        (status = 503, description = "views unavailable, timed out, overloaded, or not up to min_seq within max_wait_ms", body = ErrorBody),
    ))]
async fn sensors(State(s): State<ApiState>, q: QueryMap) -> Result<Json<SensorPage>, ApiError> {
    count("sensors");
    let Query(q) = q?;
    let limit = parse_page_limit(query_value(&q, "limit"))?;
    let after = parse_sensors_cursor(query_value(&q, "cursor"))?;
    let bound = bound::parse_bound(&q)?;
    let _slot = list_slot(&s).await?;
    let (page, w) = s
        .read_list(
            bound,
            || s.store.sensors_page(after, limit),
            |p| &p.list.positions,
        )
        .await?;
    let ViewPage {
        list,
        total,
        next_cursor,
    } = page;
    Ok(Json(SensorPage {
        view_seq: w.low,
        positions: w.positions,
        min_seq: bound.map(|b| b.min_seq),
        total,
        next_cursor,
        sensors: list.views,
    }))
}

/// One sensor's view.
#[utoipa::path(get, path = "/v1/sensors/{id}",
    params(("id" = String, Path, description = "sensor id", pattern = r"^[A-Za-z0-9_-]{1,64}$", example = "s-0001"), BoundParams),
    responses(
        (status = 200, description = "the sensor's view", body = SensorView),
        (status = 400, description = "bad sensor id", body = ErrorBody),
        (status = 404, description = "the sensor has no view", body = ErrorBody),
        (status = 409, description = "min_seq is beyond the readings stream's end", body = ErrorBody),
        (status = 503, description = "views unavailable, timed out, overloaded, or not up to min_seq within max_wait_ms", body = ErrorBody),
    ))]
async fn sensor(
    State(s): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    q: QueryMap,
) -> Result<Json<SensorView>, ApiError> {
    count("sensor");
    let Path(id) = id?;
    let Query(q) = q?;
    check_name("sensor id", &id)?;
    let view = match bound::parse_bound(&q)? {
        // The cache holds no positions: a bounded read goes to the store.
        Some(b) => {
            s.read_bounded(Some(b), Scope::Key(&id), || async {
                s.store.sensor_at(&id).await.map_err(ApiError::unavailable)
            })
            .await?
            .0
        }
        None => s.sensor(&id).await?,
    };
    view.map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown sensor '{id}'")))
}

/// A sensor's history, oldest first.
#[utoipa::path(get, path = "/v1/sensors/{id}/history",
    params(("id" = String, Path, description = "sensor id", pattern = r"^[A-Za-z0-9_-]{1,64}$", example = "s-0001"), BoundParams),
    responses(
        (status = 200, description = "the sensor's history", body = SensorHistory),
        (status = 400, description = "bad sensor id", body = ErrorBody),
        (status = 404, description = "the sensor has no view", body = ErrorBody),
        (status = 409, description = "min_seq is beyond the readings stream's end", body = ErrorBody),
        (status = 503, description = "views unavailable, timed out, overloaded, or not up to min_seq within max_wait_ms", body = ErrorBody),
    ))]
async fn history(
    State(s): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    q: QueryMap,
) -> Result<Json<SensorHistory>, ApiError> {
    count("history");
    let Path(id) = id?;
    let Query(q) = q?;
    check_name("sensor id", &id)?;
    let bound = bound::parse_bound(&q)?;
    let (h, _) = s
        .read_bounded(bound, Scope::Key(&id), || async {
            let h = s.store.history(&id).await.map_err(ApiError::unavailable)?;
            let positions = h.as_ref().map(|h| h.positions.clone()).unwrap_or_default();
            Ok((h, positions))
        })
        .await?;
    let h =
        h.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown sensor '{id}'")))?;
    Ok(Json(SensorHistory {
        sensor_id: id,
        view_seq: h.view_seq,
        min_seq: bound.map(|b| b.min_seq),
        history: h.points,
    }))
}

/// A site's sensors, one page by `abs(delta_celsius)` descending, ties by id.
#[utoipa::path(get, path = "/v1/sites/{site}",
    params(("site" = String, Path, description = "site", pattern = r"^[A-Za-z0-9_-]{1,64}$", example = "site-1"), SitePageParams, BoundParams),
    responses(
        (status = 200, description = "a page of the site's views", body = SitePage),
        (status = 400, description = "bad site, limit or cursor", body = ErrorBody),
        (status = 404, description = "no sensor with a view at this site", body = ErrorBody),
        (status = 409, description = "min_seq is beyond the readings stream's end", body = ErrorBody),
        (status = 503, description = "views unavailable, timed out, overloaded, or not up to min_seq within max_wait_ms", body = ErrorBody),
    ))]
async fn site(
    State(s): State<ApiState>,
    site: Result<Path<String>, PathRejection>,
    q: QueryMap,
) -> Result<Json<SitePage>, ApiError> {
    count("site");
    let Path(site) = site?;
    let Query(q) = q?;
    check_name("site", &site)?;
    let limit = parse_page_limit(query_value(&q, "limit"))?;
    let after = parse_site_cursor(query_value(&q, "cursor"))?;
    let bound = bound::parse_bound(&q)?;
    let _slot = list_slot(&s).await?;
    let (page, w) = s
        .read_list(
            bound,
            || s.store.site_page(&site, after, limit),
            |p| &p.list.positions,
        )
        .await?;
    let ViewPage {
        list,
        total,
        next_cursor,
    } = page;
    if total == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown site '{site}'"),
        ));
    }
    Ok(Json(SitePage {
        site,
        view_seq: w.low,
        positions: w.positions,
        min_seq: bound.map(|b| b.min_seq),
        total,
        next_cursor,
        sensors: list.views,
    }))
}

/// The sensors with the largest change, `abs(delta_celsius)` descending, ties by id.
#[utoipa::path(get, path = "/v1/top", params(TopParams, BoundParams),
    responses(
        (status = 200, description = "the ranking's head", body = TopList),
        (status = 400, description = "bad limit", body = ErrorBody),
        (status = 409, description = "min_seq is beyond the readings stream's end", body = ErrorBody),
        (status = 503, description = "views unavailable, timed out, overloaded, or not up to min_seq within max_wait_ms", body = ErrorBody),
    ))]
async fn top(State(s): State<ApiState>, q: QueryMap) -> Result<Json<TopList>, ApiError> {
    count("top");
    let Query(q) = q?;
    let limit = parse_limit(query_value(&q, "limit"))?;
    let bound = bound::parse_bound(&q)?;
    let (list, w) = s
        .read_list(bound, || s.store.top(limit), |l| &l.positions)
        .await?;
    Ok(Json(TopList {
        view_seq: w.low,
        positions: w.positions,
        min_seq: bound.map(|b| b.min_seq),
        top: list.views,
    }))
}

/// A connected live client: holds its slot and counts it in the gauge until dropped.
struct LiveClient {
    _slot: OwnedSemaphorePermit,
}

impl LiveClient {
    fn new(slot: OwnedSemaphorePermit) -> Self {
        metrics::gauge!("kappa_query_live_clients").increment(1.0);
        Self { _slot: slot }
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        metrics::gauge!("kappa_query_live_clients").decrement(1.0);
    }
}

/// Server-Sent Events named `sensor`, one per view change (the view JSON as data).
#[utoipa::path(get, path = "/v1/live",
    responses(
        (status = 200, description = "an endless event stream", content_type = "text/event-stream", body = String),
        (status = 503, description = "the live clients' cap is reached", body = ErrorBody),
    ))]
async fn live(
    State(s): State<ApiState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    count("live");
    let slot = s.live_clients.clone().try_acquire_owned().map_err(|_| {
        metrics::counter!("kappa_query_refused_total", "reason" => "live").increment(1);
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} live clients are connected, the most this instance serves; retry later",
                s.limits.max_live
            ),
        )
    })?;
    let client = LiveClient::new(slot);
    let rx = s.live.subscribe();
    let stream = futures::stream::unfold((rx, client), |(mut rx, client)| async move {
        loop {
            match rx.recv().await {
                Ok(data) => {
                    return Some((
                        Ok(Event::default().event("sensor").data(data)),
                        (rx, client),
                    ));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    metrics::counter!("kappa_query_live_lagged_total").increment(n);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .take_until(s.shutdown.cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

/// Refuses a request beyond `max_in_flight` and answers one that outlives `request_timeout`,
/// both with a JSON 503.
async fn limit_requests(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let Ok(_slot) = s.in_flight.clone().try_acquire_owned() else {
        metrics::counter!("kappa_query_refused_total", "reason" => "in_flight").increment(1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} requests are in flight, the most this instance takes; retry later",
                s.limits.max_in_flight
            ),
        )
        .into_response();
    };
    match tokio::time::timeout(s.limits.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            metrics::counter!("kappa_query_refused_total", "reason" => "timeout").increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the request timed out after {} ms",
                    s.limits.request_timeout.as_millis()
                ),
            )
            .into_response()
        }
    }
}

/// The OpenAPI document of the API (served at `/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kappa query-api",
        description = "The views of the reference DAG: per-sensor 10-minute temperature changes."
    ),
    paths(sensors, sensor, history, site, top, live, pipeline::pipeline),
    components(schemas(
        SensorView,
        SensorMeta,
        HistoryEntry,
        SensorPage,
        SitePage,
        TopList,
        SensorHistory,
        ErrorBody,
        BoundDetail,
        pipeline::PipelineStatus,
        pipeline::ServiceStatus,
        pipeline::PartitionLag,
        pipeline::StreamStatus
    ))
)]
pub struct ApiDoc;

/// The API's routes (the runtime adds `/healthz` and `/metrics`).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/sensors", get(sensors))
        .route("/v1/sensors/{id}", get(sensor))
        .route("/v1/sensors/{id}/history", get(history))
        .route("/v1/sites/{site}", get(site))
        .route("/v1/top", get(top))
        .route("/v1/live", get(live))
        .route("/v1/pipeline", get(pipeline::pipeline))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
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
    let (url, var) = match &cfg.views_redis_url {
        Some(u) => (u.as_str(), "VIEWS_REDIS_URL"),
        None => (cfg.redis_url.as_str(), "REDIS_URL"),
    };
    let conn = kappa_runtime::working::remote::connect_with(url, var, &cfg.redis_tls).await?;
    let store = ViewReader::new(conn.clone());
    let state = ApiState::new(
        store,
        Duration::from_secs(cfg.cache_ttl_secs),
        cfg.limits(),
        service.shutdown.clone(),
    )
    .with_consistency(bound::checker(service.nats.js.clone()))
    .with_pipeline(pipeline::Pipeline::new(
        service.nats.client.clone(),
        &cfg.pipeline,
    ));

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
    fn cursors() {
        assert_eq!(parse_sensors_cursor(None).ok(), Some(""));
        assert_eq!(parse_sensors_cursor(Some("")).ok(), Some(""));
        assert_eq!(parse_sensors_cursor(Some("s-1")).ok(), Some("s-1"));
        assert!(parse_sensors_cursor(Some("a:b")).is_err());
        for good in [
            "-1.5:s-1",
            "0:a",
            "-0:a",
            "-1.0000000000000001e-05:a",
            "2E+3:a",
        ] {
            assert_eq!(parse_site_cursor(Some(good)).ok(), Some(good), "{good}");
        }
        for bad in [
            "a", ":a", "1:", "inf:a", "nan:a", "+1:a", ".5:a", "5.:a", "1e:a", "1:a.b", "--1:a",
        ] {
            assert!(parse_site_cursor(Some(bad)).is_err(), "{bad}");
        }
        assert!(parse_page_limit(Some("+5")).is_err());
        assert!(parse_page_limit(Some(" 5")).is_err());
        assert_eq!(parse_page_limit(Some("1000")).ok(), Some(1000));
        assert!(parse_page_limit(Some("1001")).is_err());
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
