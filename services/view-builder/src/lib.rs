//! view-builder: turns the deltas stream into read-optimised views in Redis, and announces every
//! changed view on `thermo.views.sensor.<sensor_id>` (core NATS) so caches stay current.
//!
//! # Views
//!
//! The Redis key layout, the view JSON and the read protocol are the wire contract between
//! this service (their only writer) and query-api: [`thermo_domain::views`]. Every key of a
//! *generation* `g` starts with `views:{g}:`; `views:active` names the generation queries read
//! (absent means `0`); a [rebuild](rebuild) fills a fresh generation and swaps it in.
//!
//! # Consistency
//!
//! Each batch of a partition is applied by one Lua script that checks the partition's fencing
//! epoch (a newer owner wins), skips the batch if its last sequence is not beyond the stored
//! position (a replay), skips single points already applied, writes every view and stores the
//! new position, all atomically. A view thus always records the deltas-stream sequence it
//! reflects. Sensor metadata comes from the delta itself and from the registry (its change
//! stream, replayed last-per-subject at start, and the observed-state lookups); the highest
//! registry version wins, so the order in which they arrive does not matter.

pub mod rebuild;
pub mod store;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kappa_runtime::config::{NatsArgs, ObservedMode, parse_listen_addr};
use kappa_runtime::feed::{Change, Feed, FeedConfig, FeedHandler, Gap, Start};
use kappa_runtime::observed::ObservedState;
use kappa_runtime::partition::{
    DriverConfig, Input, PartitionBoard, PartitionedStream, ProcessError, Processor,
};
use kappa_runtime::shutdown::CancellationToken;
use thermo_domain::ObservedSensor;
use thermo_domain::{streams, subjects};

use crate::store::{Applied, Store, Target};
use crate::view::{SensorMeta, SensorView, fold_batch, parse_delta};

/// The service's name (consumer prefix, DLQ subject, NATS client name).
pub const SERVICE: &str = "view-builder";

/// Configuration (every flag is also an environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Redis of the views, unless `--views-redis-url` names another one.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Redis that holds the views (default: `REDIS_URL`).
    #[arg(long, env = "VIEWS_REDIS_URL")]
    pub views_redis_url: Option<String>,
    /// Health and metrics listener.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9104", value_parser = parse_listen_addr)]
    pub http_addr: SocketAddr,
    /// How the sensor registry is observed.
    #[arg(long, env = "KAPPA_OBSERVED", value_enum, default_value_t = ObservedMode::SemiStateless)]
    pub observed: ObservedMode,
    /// Partitions of the deltas stream (an existing stream keeps its own count).
    #[arg(long, env = "KAPPA_PARTITIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,
    /// Points kept in a sensor's history.
    #[arg(long, env = "HISTORY_LEN", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub history_len: u64,
    /// Largest batch applied at once.
    #[arg(long, env = "BATCH", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch: u64,
    /// Milliseconds a partial batch may wait for more deltas while they arrive densely (0 =
    /// never: lowest latency; 2 ms cut CPU by a fifth at 8k readings/s, see docs/operations.md).
    #[arg(long, env = "KAPPA_LINGER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub linger_ms: u64,
    /// Lease time-to-live in seconds: a crashed instance's partitions move after this.
    #[arg(long, env = "KAPPA_LEASE_TTL_SECS", default_value_t = 6)]
    pub lease_ttl_secs: u64,
}

impl Config {
    /// The Redis of the views and the variable it came from.
    pub fn views_url(&self) -> (&str, &'static str) {
        match &self.views_redis_url {
            Some(u) => (u, "VIEWS_REDIS_URL"),
            None => (&self.redis_url, "REDIS_URL"),
        }
    }

    fn history_len(&self) -> usize {
        usize::try_from(self.history_len).unwrap_or(usize::MAX)
    }

    /// The deltas stream, as the wire contract declares it.
    pub fn deltas(&self) -> PartitionedStream {
        thermo_domain::runtime::deltas_stream(self.partitions)
    }
}

/// Subject of a sensor's view change (the wire contract's).
pub use thermo_domain::subjects::sensor_view as view_subject;

/// Publishes view changes on core NATS (best effort: caches also expire).
pub async fn announce(client: &async_nats::Client, views: &[SensorView]) {
    for v in views {
        match serde_json::to_vec(v) {
            Ok(body) => {
                if let Err(e) = client
                    .publish(view_subject(&v.sensor_id), body.into())
                    .await
                {
                    tracing::debug!(error = %e, "view change not announced");
                } else {
                    metrics::counter!("kappa_views_announced_total").increment(1);
                }
            }
            Err(e) => tracing::warn!(error = %e, "view not encodable"),
        }
    }
}

/// What the partitions share.
struct Shared {
    store: Store,
    client: async_nats::Client,
    dlq: kappa_runtime::dlq::DeadLetters,
    observed: Arc<dyn ObservedState<ObservedSensor>>,
    history_len: usize,
}

/// The view-building processor of one partition.
pub struct ViewProcessor {
    shared: Arc<Shared>,
    partition: u32,
    epoch: u64,
}

fn transient(e: impl std::fmt::Display) -> ProcessError {
    ProcessError::Transient(e.to_string())
}

impl ViewProcessor {
    async fn lookup_metas(&self, ids: &[&str]) -> Vec<Option<SensorMeta>> {
        let lookups = futures::future::join_all(ids.iter().map(|id| self.shared.observed.get(id)));
        match tokio::time::timeout(Duration::from_secs(2), lookups).await {
            Ok(results) => results
                .into_iter()
                .map(|r| match r {
                    Ok(v) => v.map(|s| SensorMeta::from_sensor(&s.0)),
                    Err(e) => {
                        metrics::counter!("kappa_views_lookup_failures_total").increment(1);
                        tracing::debug!(error = %e, "registry lookup failed; using the delta's");
                        None
                    }
                })
                .collect(),
            Err(_) => {
                metrics::counter!("kappa_views_lookup_failures_total").increment(1);
                vec![None; ids.len()]
            }
        }
    }
}

impl Processor for ViewProcessor {
    fn set_epoch(&mut self, epoch: u64) {
        // The lease revision: a later owner fences an earlier one.
        self.epoch = epoch;
    }

    async fn open(&mut self, partition: u32) -> Result<u64, ProcessError> {
        self.partition = partition;
        match self
            .shared
            .store
            .open(&Target::Active, partition, self.epoch)
            .await
            .map_err(transient)?
        {
            Some(pos) => Ok(pos),
            None => Err(ProcessError::Fenced(format!(
                "partition {partition} has a newer writer than epoch {}",
                self.epoch
            ))),
        }
    }

    async fn process(&mut self, batch: &[Input]) -> Result<(), ProcessError> {
        let Some(last) = batch.last().map(|i| i.seq) else {
            return Ok(());
        };
        let mut items = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for input in batch {
            match parse_delta(&input.payload, input.entity()) {
                Ok(d) => items.push((input.seq, d)),
                Err(r) => {
                    let subject = kappa_runtime::partition::original_subject(
                        subjects::DELTAS_PREFIX,
                        &input.subject,
                    );
                    let ack = self
                        .shared
                        .dlq
                        .append(
                            input.entity(),
                            (&subject, input.seq),
                            input.payload.clone(),
                            &kappa_runtime::compute::Rejection::new(r.code())
                                .with_detail(r.detail()),
                            // Undecodable is a pure function of the input: not fenced.
                            None,
                        )
                        .await
                        .map_err(ProcessError::from)?;
                    rejected.push(ack);
                }
            }
        }
        for ack in rejected {
            ack.await.map_err(transient)?;
        }
        let applied_points = items.len();
        let updates = fold_batch(items, self.shared.history_len);
        let ids: Vec<&str> = updates.iter().map(|u| u.delta.sensor_id.as_str()).collect();
        let metas = self.lookup_metas(&ids).await;
        let t0 = std::time::Instant::now();
        let outcome = self
            .shared
            .store
            .apply(
                &Target::Active,
                self.partition,
                self.epoch,
                last,
                self.shared.history_len,
                &updates,
                &metas,
            )
            .await
            .map_err(transient)?;
        metrics::histogram!("kappa_views_apply_seconds").record(t0.elapsed().as_secs_f64());
        match outcome {
            Applied::Fenced => Err(ProcessError::Fenced(format!(
                "partition {} was taken over (epoch {} is stale)",
                self.partition, self.epoch
            ))),
            Applied::Skipped => {
                metrics::counter!("kappa_views_replayed_batches_total").increment(1);
                Ok(())
            }
            Applied::Changed(views) => {
                metrics::counter!("kappa_views_applied_total").increment(applied_points as u64);
                metrics::counter!("kappa_views_batches_total").increment(1);
                announce(&self.shared.client, &views).await;
                Ok(())
            }
        }
    }
}

/// Follows the registry's change stream with the runtime's [`Feed`] (last value per sensor
/// first, then every change) and applies sensor metadata to the views; a site change moves the
/// sensor between site views. `ready` is set once the feed has caught up. Runs until shutdown.
async fn follow_registry(
    nats: kappa_runtime::nats::Nats,
    store: Store,
    client: async_nats::Client,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let cfg = FeedConfig::new(
        streams::SENSORS,
        format!("{}.>", subjects::SENSORS_PREFIX),
        Start::LastPerSubject,
    );
    let handler = RegistryFeed {
        store,
        client,
        shutdown: shutdown.clone(),
    };
    let feed = Feed::start(&nats, cfg, handler, shutdown);
    let caught_up = feed.when_caught_up();
    tokio::spawn(async move {
        if caught_up.await.is_ok() {
            ready.store(true, Ordering::Relaxed);
        }
    });
    feed.stopped().await;
}

/// Applies registry changes to the views (the handler of [`follow_registry`]'s feed).
struct RegistryFeed {
    store: Store,
    client: async_nats::Client,
    shutdown: CancellationToken,
}

impl FeedHandler for RegistryFeed {
    async fn apply(&mut self, change: Change) {
        let id = change.key();
        match serde_json::from_slice::<ObservedSensor>(&change.payload) {
            Ok(s) if s.0.sensor_id == id => {
                let meta = SensorMeta::from_sensor(&s.0);
                // Keep trying this change: skipping it could leave a stale site.
                loop {
                    match self.store.apply_meta(id, &meta).await {
                        Ok(Some(view)) => {
                            metrics::counter!("kappa_views_meta_updates_total").increment(1);
                            announce(&self.client, &[view]).await;
                            return;
                        }
                        Ok(None) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "applying a registry change failed; retrying");
                            if kappa_runtime::partition::sleep_or_cancel(
                                Duration::from_secs(1),
                                &self.shutdown,
                            )
                            .await
                            {
                                return;
                            }
                        }
                    }
                }
            }
            _ => tracing::warn!(subject = %change.subject, "undecodable registry change ignored"),
        }
    }

    async fn gap(&mut self, gap: Gap) {
        // The highest registry version wins in the views, so a replay or a late change is
        // harmless; the feed resumes after the last change applied.
        tracing::warn!(cause = %gap.cause, replay = gap.replay, "gap in the registry feed");
    }
}

/// Connects to the views' Redis with a clear error.
pub async fn connect_views(cfg: &Config) -> anyhow::Result<Store> {
    let (url, what) = cfg.views_url();
    let conn = kappa_runtime::working::remote::connect(url, what).await?;
    Ok(Store::new(conn))
}

/// Runs the service until SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let service = kappa_runtime::app::Service::start(SERVICE, &cfg.nats).await?;
    let store = connect_views(&cfg).await?;
    let js = service.nats.js.clone();
    let mut deltas = cfg.deltas();
    deltas.declare(&js).await?;
    kappa_runtime::nats::declare_stream(
        &js,
        thermo_domain::runtime::sensors_stream().stream_config(),
    )
    .await?;

    // Readiness: Redis answers, the registry is observed, every partition runs.
    let redis_up = Arc::new(AtomicBool::new(true));
    {
        let up = redis_up.clone();
        let mut conn = store.conn();
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
        let up = redis_up.clone();
        service.health.register(
            "redis",
            Arc::new(move || (up.load(Ordering::Relaxed), serde_json::json!(null))),
        );
    }
    let observed = kappa_runtime::observed::build::<ObservedSensor>(
        cfg.observed,
        &service.nats,
        thermo_domain::runtime::registry_source(Duration::from_secs(1)),
        kappa_runtime::observed::semi_stateless::CacheConfig::default(),
        service.shutdown.clone(),
    )
    .await?;
    {
        let o = observed.clone();
        service.health.register(
            "observed",
            Arc::new(move || {
                (
                    o.ready(),
                    serde_json::json!({ "kind": o.kind(), "held": o.held() }),
                )
            }),
        );
    }
    let feed_ready = Arc::new(AtomicBool::new(false));
    {
        let r = feed_ready.clone();
        service.health.register(
            "registry_feed",
            Arc::new(move || (r.load(Ordering::Relaxed), serde_json::json!(null))),
        );
    }
    let board: PartitionBoard = PartitionBoard::default();
    {
        let b = board.clone();
        service.health.register(
            "partitions",
            Arc::new(move || match b.read() {
                Ok(b) => {
                    let running = b
                        .values()
                        .filter(|s| s.state == kappa_runtime::partition::PartitionState::Running)
                        .count();
                    (
                        running == b.len(),
                        serde_json::to_value(&*b).unwrap_or_default(),
                    )
                }
                Err(_) => (false, serde_json::json!(null)),
            }),
        );
    }
    let http = service
        .serve_http(cfg.http_addr, axum::Router::new())
        .await?;

    let feed = tokio::spawn(follow_registry(
        service.nats.clone(),
        store.clone(),
        service.nats.client.clone(),
        feed_ready,
        service.shutdown.clone(),
    ));
    let shared = Arc::new(Shared {
        store,
        client: service.nats.client.clone(),
        dlq: kappa_runtime::dlq::DeadLetters::new(js.clone(), SERVICE),
        observed,
        history_len: cfg.history_len(),
    });
    let driver = DriverConfig {
        input: deltas.clone(),
        consumer_prefix: SERVICE.into(),
        batch: usize::try_from(cfg.batch).unwrap_or(256),
        linger: Duration::from_millis(cfg.linger_ms),
    };
    tracing::info!(partitions = deltas.partitions, observed = %cfg.observed, "view-builder running");
    // Partitions are shared with other view-builder instances through leases.
    let lease = kappa_runtime::lease::LeaseConfig {
        service: SERVICE.into(),
        partitions: deltas.partitions,
        ttl: std::time::Duration::from_secs(cfg.lease_ttl_secs.max(1)),
    };
    let start = |g: kappa_runtime::lease::Grant| {
        let (js, driver, shared, board) =
            (js.clone(), driver.clone(), shared.clone(), board.clone());
        tokio::spawn(async move {
            let p = g.partition;
            let processor = ViewProcessor {
                shared,
                partition: p,
                epoch: g.epoch,
            };
            let r = kappa_runtime::partition::run_partition_at(
                js,
                driver,
                p,
                g.epoch,
                processor,
                g.stop,
                board.clone(),
            )
            .await;
            if let Err(e) = r {
                tracing::warn!(partition = p, error = %e, "partition stopped");
            }
            if let Ok(mut b) = board.write() {
                b.remove(&p);
            }
        })
    };
    let owned = Arc::new(std::sync::RwLock::new(std::collections::BTreeSet::new()));
    let failure =
        kappa_runtime::lease::keep(js.clone(), lease, service.shutdown.clone(), owned, start)
            .await
            .err()
            .map(|e| e.to_string());
    let requested = service.shutdown.is_cancelled();
    service.shutdown.cancel();
    let _ = feed.await;
    let _ = http.await;
    service.drain().await;
    match failure {
        Some(f) if !requested => anyhow::bail!("every partition stopped ({f})"),
        _ => Ok(()),
    }
}
