//! `GET /v1/pipeline`: the pipeline's health as the dashboard shows it, gathered over NATS.
//!
//! One request on `kappa.status` ([`kappa_runtime::status`]) is answered by every instance of
//! every service; the replies that arrive within `PIPELINE_GATHER_MS` are the answer's
//! `services` (readiness, options such as `working` and `observed`, each partition's position
//! and lag). The DAG's streams are read with one JetStream stream-info request each; the
//! dead-letter count is the `DLQ` stream's message count. One gathered answer is reused for
//! `PIPELINE_CACHE_MS` (one gathering at a time), so many dashboards cost one request to the
//! services per period, not one each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Json;
use kappa_runtime::status::{self, StatusReport};
use moka::future::Cache;
use serde::Serialize;

use crate::{ApiError, ApiState, ErrorBody, count};

/// The streams `/v1/pipeline` reports, in the DAG's order.
pub const STREAMS: [&str; 4] = [
    thermo_domain::streams::READINGS,
    thermo_domain::streams::DELTAS,
    thermo_domain::streams::SENSORS,
    kappa_runtime::dlq::STREAM,
];

/// How `/v1/pipeline` gathers (every flag is also an environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// Milliseconds the services are given to answer a status request.
    #[arg(long, env = "PIPELINE_GATHER_MS", default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(10..=3000))]
    pub pipeline_gather_ms: u64,
    /// Milliseconds a gathered answer is reused (0: gather for every request).
    #[arg(long, env = "PIPELINE_CACHE_MS", default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub pipeline_cache_ms: u64,
    /// Services expected to answer, comma-separated; those of which no instance answered are
    /// listed under `missing`.
    #[arg(
        long,
        env = "PIPELINE_SERVICES",
        value_delimiter = ',',
        default_value = "sensor-registry,temperature-delta,view-builder,query-api"
    )]
    pub pipeline_services: Vec<String>,
}

/// One partition of a service instance.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PartitionLag {
    /// The partition.
    pub partition: u32,
    /// `recovering`, `running`, `stopped` or `fenced`.
    pub state: String,
    /// Last input sequence whose effects are committed.
    pub position: u64,
    /// Inputs in the partition not yet delivered to the instance.
    pub lag: u64,
    /// Times the store was found lost or rolled back under this partition.
    pub store_lost: u64,
}

/// One service instance, as it answered on `kappa.status`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ServiceStatus {
    /// The service.
    pub service: String,
    /// The instance, `<host>:<pid>`.
    pub instance: String,
    /// True when every readiness check of the instance passes.
    pub ready: bool,
    /// Seconds since the instance started.
    pub uptime_secs: f64,
    /// The options it runs: `working`, `observed`, `partitions`, `ownership` (those that apply).
    pub options: BTreeMap<String, String>,
    /// Sum of its partitions' lag.
    pub lag: u64,
    /// The partitions it holds.
    pub partitions: Vec<PartitionLag>,
    /// Its `/healthz` report: `status` and one entry per readiness check.
    #[schema(value_type = Object)]
    pub health: serde_json::Value,
}

impl From<StatusReport> for ServiceStatus {
    fn from(r: StatusReport) -> Self {
        let partitions: Vec<PartitionLag> = r
            .partitions
            .into_iter()
            .map(|p| PartitionLag {
                partition: p.partition,
                state: p.state,
                position: p.position,
                lag: p.lag,
                store_lost: p.store_lost,
            })
            .collect();
        Self {
            service: r.service,
            instance: r.instance,
            ready: r.ready,
            uptime_secs: r.uptime_secs,
            options: r.options,
            lag: partitions.iter().map(|p| p.lag).sum(),
            partitions,
            health: r.health,
        }
    }
}

/// One stream of the DAG.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StreamStatus {
    /// The stream.
    pub name: String,
    /// Messages it holds.
    pub messages: u64,
    /// Sequence of its last message (0 when empty).
    pub last_seq: u64,
}

/// `/v1/pipeline`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PipelineStatus {
    /// When the services were asked.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub gathered_at: time::OffsetDateTime,
    /// Milliseconds the services were given to answer.
    pub gather_ms: u64,
    /// Every instance that answered, by service then instance.
    pub services: Vec<ServiceStatus>,
    /// Expected services (`PIPELINE_SERVICES`) of which no instance answered.
    pub missing: Vec<String>,
    /// Messages in the dead-letter stream `DLQ`; `null` when it could not be read.
    pub dlq_messages: Option<u64>,
    /// The streams that could be read: `READINGS`, `DELTAS`, `SENSORS`, `DLQ`.
    pub streams: Vec<StreamStatus>,
    /// What could not be read (empty when everything answered).
    pub errors: Vec<String>,
}

/// Gathers the pipeline's status (see the module docs).
#[derive(Clone)]
pub struct Pipeline {
    client: async_nats::Client,
    js: jetstream::Context,
    expected: Arc<Vec<String>>,
    window: Duration,
    cache: Option<Cache<(), Arc<PipelineStatus>>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("expected", &self.expected)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Gathers over `client` as `args` says.
    pub fn new(client: async_nats::Client, args: &PipelineArgs) -> Self {
        let cache = (args.pipeline_cache_ms > 0).then(|| {
            Cache::builder()
                .max_capacity(1)
                .time_to_live(Duration::from_millis(args.pipeline_cache_ms))
                .build()
        });
        let mut expected: Vec<String> = args
            .pipeline_services
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        expected.sort();
        expected.dedup();
        Self {
            js: jetstream::new(client.clone()),
            client,
            expected: Arc::new(expected),
            window: Duration::from_millis(args.pipeline_gather_ms),
            cache,
        }
    }

    /// The status: the cached one while it is fresh, else a new gathering.
    pub async fn status(&self) -> Arc<PipelineStatus> {
        match &self.cache {
            Some(c) => c.get_with((), self.gather()).await,
            None => self.gather().await,
        }
    }

    async fn gather(&self) -> Arc<PipelineStatus> {
        let gathered_at = time::OffsetDateTime::now_utc();
        let mut errors = Vec::new();
        let (reports, streams) = tokio::join!(
            status::gather(&self.client, status::STATUS_SUBJECT, self.window),
            futures::future::join_all(STREAMS.iter().map(|s| self.stream(s)))
        );
        let services: Vec<ServiceStatus> = match reports {
            Ok(r) => r.into_iter().map(ServiceStatus::from).collect(),
            Err(e) => {
                errors.push(e.to_string());
                Vec::new()
            }
        };
        let streams: Vec<StreamStatus> = streams
            .into_iter()
            .filter_map(|s| s.map_err(|e| errors.push(e)).ok())
            .collect();
        let missing = self
            .expected
            .iter()
            .filter(|e| !services.iter().any(|s| &s.service == *e))
            .cloned()
            .collect();
        let dlq_messages = streams
            .iter()
            .find(|s| s.name == kappa_runtime::dlq::STREAM)
            .map(|s| s.messages);
        Arc::new(PipelineStatus {
            gathered_at,
            gather_ms: u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX),
            services,
            missing,
            dlq_messages,
            streams,
            errors,
        })
    }

    async fn stream(&self, name: &str) -> Result<StreamStatus, String> {
        let info = tokio::time::timeout(Duration::from_secs(1), self.js.get_stream(name))
            .await
            .map_err(|_| format!("stream {name}: no answer within 1 s"))?
            .map_err(|e| format!("stream {name}: {e}"))?;
        let state = &info.cached_info().state;
        Ok(StreamStatus {
            name: name.to_string(),
            messages: state.messages,
            last_seq: state.last_sequence,
        })
    }
}

/// The pipeline's health: every service instance that answered on `kappa.status` (readiness,
/// options, per-partition lag), the streams' message counts and the dead-letter count.
#[utoipa::path(get, path = "/v1/pipeline",
    responses(
        (status = 200, description = "the pipeline's health", body = PipelineStatus),
        (status = 503, description = "not gathered here, timed out or overloaded", body = ErrorBody),
    ))]
pub(crate) async fn pipeline(State(s): State<ApiState>) -> Result<Json<PipelineStatus>, ApiError> {
    count("pipeline");
    let p = s.pipeline.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this instance does not gather the pipeline's status",
        )
    })?;
    Ok(Json((*p.status().await).clone()))
}
