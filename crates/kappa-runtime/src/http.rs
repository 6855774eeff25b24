//! Each service's HTTP listener (`HTTP_ADDR`): `/healthz` reports readiness of every component
//! (NATS, Redis, recovery, replicas...) as JSON and answers 503 until all are ready; `/metrics`
//! is the Prometheus text format. A service may merge its own routes (query-api does).
//!
//! [`probe`] is the client side, used by each binary's `healthcheck` subcommand so container
//! health checks need no shell or curl.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::RuntimeError;
use crate::shutdown::CancellationToken;

/// A readiness check: returns whether the component is ready and a JSON detail.
pub type Check = Arc<dyn Fn() -> (bool, serde_json::Value) + Send + Sync>;

/// The service's readiness, made of named checks.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<RwLock<BTreeMap<String, Check>>>,
}

impl Health {
    /// An empty health (ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a named check.
    pub fn register(&self, name: &str, check: Check) {
        if let Ok(mut c) = self.checks.write() {
            c.insert(name.to_string(), check);
        }
    }

    /// Evaluates every check.
    pub fn report(&self) -> (bool, serde_json::Value) {
        let mut ready = true;
        let mut out = serde_json::Map::new();
        if let Ok(c) = self.checks.read() {
            for (name, check) in c.iter() {
                let (ok, detail) = check();
                ready &= ok;
                out.insert(
                    name.clone(),
                    serde_json::json!({ "ready": ok, "detail": detail }),
                );
            }
        }
        (
            ready,
            serde_json::json!({ "status": if ready { "ready" } else { "not_ready" }, "checks": out }),
        )
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: PrometheusHandle,
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let (ready, body) = s.health.report();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// The `/healthz` and `/metrics` routes, to merge with a service's own.
pub fn router(health: Health, metrics_handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            health,
            metrics: metrics_handle,
        })
}

/// Binds `addr` (failing with a clear error if it cannot) and serves `app` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, RuntimeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RuntimeError::Http(format!("cannot listen on {addr}: {e}")))?;
    tracing::info!(%addr, "http listening");
    Ok(tokio::spawn(async move {
        use axum::serve::ListenerExt;
        // Server-Sent Events are small writes: send each at once (no Nagle delay).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "http server failed");
        }
    }))
}

/// Asks `http://<addr>/healthz` (0.0.0.0 is asked on 127.0.0.1) and returns whether it answered
/// 200 within two seconds.
pub async fn probe(addr: SocketAddr) -> bool {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target).await.ok()?;
        let req = format!("GET /healthz HTTP/1.0\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf[..buf.len().min(32)]).to_string();
        Some(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"))
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
