//! What every service does at start and stop, in one place: logs and metrics, the NATS
//! connection, the dead-letter stream, the HTTP listener, SIGTERM, and the `healthcheck`
//! subcommand that container health checks run.

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::RuntimeError;
use crate::config::NatsArgs;
use crate::http::Health;
use crate::nats::Nats;
use crate::shutdown::CancellationToken;
use crate::status::Status;

/// A started service: its connection, readiness, metrics and shutdown token.
pub struct Service {
    /// The service's name (NATS client name, DLQ subject, consumer prefix).
    pub name: String,
    /// NATS connection.
    pub nats: Nats,
    /// Readiness checks.
    pub health: Health,
    /// What the instance answers on `kappa.status` (its readiness, options and partitions).
    pub status: Status,
    /// Prometheus handle behind `/metrics`.
    pub metrics: PrometheusHandle,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
}

impl Service {
    /// Initialises logs and metrics, connects to NATS, checks that `KAPPA_REPLICAS` fits the
    /// server ([`crate::nats::check_replicas`]), declares the dead-letter stream and answers
    /// status requests ([`crate::status`]) until shutdown; SIGTERM or SIGINT cancels
    /// [`Service::shutdown`].
    pub async fn start(name: &str, nats: &NatsArgs) -> Result<Self, RuntimeError> {
        Self::start_with(name, nats, crate::shutdown::on_signal()).await
    }

    /// Like [`Service::start`], with the shutdown token given by the caller (a test, or a
    /// binary that handles signals itself). Logs and metrics are installed once per process.
    pub async fn start_with(
        name: &str,
        nats_args: &NatsArgs,
        shutdown: CancellationToken,
    ) -> Result<Self, RuntimeError> {
        crate::telemetry::init_tracing();
        let metrics = crate::telemetry::init_metrics()?;
        let options = nats_args.stream_options()?;
        let nats = crate::nats::connect(nats_args, name).await?;
        crate::nats::check_replicas(&nats.client, options.replicas)?;
        crate::dlq::declare_with(&nats.js, options).await?;
        let health = Health::new();
        let n = nats.clone();
        health.register(
            "nats",
            std::sync::Arc::new(move || (n.is_connected(), serde_json::json!(null))),
        );
        metrics::gauge!("kappa_up", "service" => name.to_string()).set(1.0);
        let status = Status::new(name, health.clone());
        crate::status::spawn_responder(nats.client.clone(), status.clone(), shutdown.clone());
        Ok(Self {
            name: name.to_string(),
            nats,
            health,
            status,
            metrics,
            shutdown,
        })
    }

    /// Serves `/healthz`, `/metrics` and `extra` on `addr` until shutdown.
    pub async fn serve_http(
        &self,
        addr: SocketAddr,
        extra: Router,
    ) -> Result<tokio::task::JoinHandle<()>, RuntimeError> {
        let app = crate::http::router(self.health.clone(), self.metrics.clone()).merge(extra);
        crate::http::serve(addr, app, self.shutdown.clone()).await
    }

    /// Flushes the NATS connection (pending publishes) before exit.
    pub async fn drain(&self) {
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), self.nats.client.flush()).await;
        tracing::info!(service = %self.name, "stopped");
    }
}

/// Runs the `healthcheck` subcommand: exit 0 if `addr`'s `/healthz` answers 200.
pub async fn healthcheck(addr: SocketAddr) -> ExitCode {
    if crate::http::probe(addr).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Parses the command line; a usage error is printed as one line on stderr with exit code 2
/// (help and version print normally).
pub fn parse_cli<C: clap::Parser>(service: &str) -> C {
    match C::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(0);
            }
            let text = e.to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("{service}: error: invalid configuration: {first}");
            std::process::exit(2);
        }
    }
}
