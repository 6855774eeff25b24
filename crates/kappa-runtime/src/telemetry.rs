//! Logs (`tracing` to stdout, filtered by `RUST_LOG`, JSON with `LOG_FORMAT=json`, colours only
//! on a terminal) and the Prometheus recorder behind `/metrics`. Stderr is kept for the one line
//! a binary prints when it gives up (bad configuration, unreachable dependency).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::RuntimeError;

/// Installs the tracing subscriber. Safe to call once per process.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

static RECORDER: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the global Prometheus recorder with latency buckets suited to a streaming service,
/// once per process (several services started in one test process share it).
pub fn init_metrics() -> Result<PrometheusHandle, RuntimeError> {
    if let Some(h) = RECORDER.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0,
        ])
        .map_err(|e| RuntimeError::Config(e.to_string()))?
        .install_recorder();
    match (handle, RECORDER.get()) {
        (Ok(h), _) => Ok(RECORDER.get_or_init(|| h).clone()),
        // Another service of this process installed it first.
        (Err(_), Some(h)) => Ok(h.clone()),
        (Err(e), None) => Err(RuntimeError::Config(format!("metrics recorder: {e}"))),
    }
}
