//! view-builder: turns the deltas stream into read-optimised views in Redis, and announces every
//! changed view on `thermo.views.sensor.<sensor_id>` (core NATS) so caches stay current.
//!
//! It is a [`kappa_runtime::view::View`], [`SensorViews`], run by
//! [`kappa_runtime::view::ViewService`]: the runtime owns partitions and ownership, positions
//! and fencing epochs (passed to the store), dead letters, registry lookups (`KAPPA_OBSERVED`),
//! health, metrics, draining and the [rebuild] from sequence 1. What is this
//! service's: validating a delta and folding a batch ([`view`], pure), the Redis layout and its
//! Lua scripts ([`store`]), the view-change subjects, and the registry feed that moves sensors
//! between site views without waiting for their next delta.
//!
//! # Views
//!
//! The Redis key layout, the view JSON and the read protocol are the wire contract between
//! this service (their only writer) and query-api: [`thermo_domain::views`]. Every key of a
//! *generation* `g` starts with `views:{g}:`; `views:active` names the generation queries read
//! (absent means `0`); a [rebuild] fills a fresh generation and swaps it in.
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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kappa_runtime::compute::{Context, Lookup, Rejection};
use kappa_runtime::config::{Settings, parse_listen_addr};
use kappa_runtime::feed::{Change, Feed, FeedConfig, FeedHandler, Gap, Start};
use kappa_runtime::partition::PartitionedStream;
use kappa_runtime::shutdown::CancellationToken;
use kappa_runtime::view::{Announcement, Applied, Batch, Opened, Swap, Target, View, ViewService};
use thermo_domain::{Delta, ObservedSensor};
use thermo_domain::{streams, subjects};

use crate::store::{Store, StoreError};
use crate::view::{SensorMeta, SensorView, fold_batch, parse_delta};

/// The service's name (consumer and lease names, DLQ subject, NATS client name).
pub const SERVICE: &str = "view-builder";

/// Configuration: the runtime's shared settings (`KAPPA_*`, `NATS_URL`, `REDIS_URL`) plus this
/// service's own (every flag is also an environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Settings every kappa service shares; `REDIS_URL` holds the views unless
    /// `VIEWS_REDIS_URL` names another Redis. The working-state settings do not apply.
    #[command(flatten)]
    pub kappa: Settings,
    /// Redis that holds the views (default: `REDIS_URL`).
    #[arg(long, env = "VIEWS_REDIS_URL")]
    pub views_redis_url: Option<String>,
    /// Health and metrics listener.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9104", value_parser = parse_listen_addr)]
    pub http_addr: SocketAddr,
    /// Points kept in a sensor's history.
    #[arg(long, env = "HISTORY_LEN", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub history_len: u64,
}

impl Config {
    /// The Redis of the views and the variable it came from.
    pub fn views_url(&self) -> (&str, &'static str) {
        match &self.views_redis_url {
            Some(u) => (u, "VIEWS_REDIS_URL"),
            None => (&self.kappa.redis_url, "REDIS_URL"),
        }
    }

    fn history_len(&self) -> usize {
        usize::try_from(self.history_len).unwrap_or(usize::MAX)
    }

    /// The deltas stream, as the wire contract declares it.
    pub fn deltas(&self) -> PartitionedStream {
        thermo_domain::runtime::deltas_stream(self.kappa.partitions)
    }
}

/// Subject of a sensor's view change (the wire contract's).
pub use thermo_domain::subjects::sensor_view as view_subject;

/// The announcements of changed views: each view's JSON on its subject.
pub fn announcements(views: &[SensorView]) -> Vec<Announcement> {
    views
        .iter()
        .filter_map(|v| match serde_json::to_vec(v) {
            Ok(body) => Some(Announcement {
                subject: view_subject(&v.sensor_id),
                payload: body.into(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "view not encodable");
                None
            }
        })
        .collect()
}

/// Publishes view changes on core NATS (best effort: caches also expire).
pub async fn announce(client: &async_nats::Client, views: &[SensorView]) {
    kappa_runtime::view::announce(client, announcements(views)).await;
}

/// The views of the sensors: deltas in, Redis views (per sensor, per site, ranking, history)
/// out, in [`Store`].
#[derive(Debug, Clone)]
pub struct SensorViews {
    /// The views' store.
    pub store: Store,
    /// Points kept in a sensor's history.
    pub history_len: usize,
}

impl View for SensorViews {
    type Change = Delta;
    type Reference = ObservedSensor;
    type Error = StoreError;

    fn decode(&self, ctx: &Context<'_>, payload: &[u8]) -> Result<Delta, Rejection> {
        parse_delta(payload, ctx.key).map_err(|r| Rejection::new(r.code()).with_detail(r.detail()))
    }

    async fn open(
        &self,
        target: &Target,
        partition: u32,
        epoch: u64,
    ) -> Result<Opened, StoreError> {
        Ok(match self.store.open(target, partition, epoch).await? {
            Some((position, source)) => Opened::At { position, source },
            None => Opened::Fenced,
        })
    }

    async fn apply(
        &self,
        target: &Target,
        batch: Batch<'_, Delta, ObservedSensor>,
    ) -> Result<Applied, StoreError> {
        // The registry's metadata of each sensor; a failed lookup falls back to the delta's.
        let mut metas: HashMap<String, Option<SensorMeta>> = HashMap::new();
        for item in &batch.items {
            let meta = match &item.reference {
                Lookup::Found(s) => Some(SensorMeta::from_sensor(&s.0)),
                _ => None,
            };
            metas.insert(item.key.to_string(), meta);
        }
        let items = batch.items.into_iter().map(|i| (i.seq, i.change)).collect();
        let updates = fold_batch(items, self.history_len);
        let metas: Vec<Option<SensorMeta>> = updates
            .iter()
            .map(|u| metas.get(&u.delta.sensor_id).cloned().flatten())
            .collect();
        let applied = self
            .store
            .apply(
                target,
                batch.partition,
                batch.epoch,
                store::At {
                    previous: batch.previous,
                    last: batch.position,
                    source: batch.source,
                },
                self.history_len,
                &updates,
                &metas,
            )
            .await?;
        Ok(match applied {
            store::Applied::Fenced => Applied::Fenced,
            store::Applied::Skipped => Applied::Skipped,
            store::Applied::Lost { stored } => Applied::Lost { stored },
            store::Applied::Changed(views) => Applied::Committed(announcements(&views)),
        })
    }

    async fn begin_rebuild(&self, force: bool) -> Result<String, StoreError> {
        self.store.begin_rebuild(force).await
    }

    async fn swap(&self, generation: &str, source: u64) -> Result<Swap, StoreError> {
        let (swapped, previous) = self.store.swap(generation, source).await?;
        Ok(if swapped {
            Swap::Swapped { previous }
        } else {
            Swap::Behind { active: previous }
        })
    }

    async fn abandon(&self, generation: &str) -> Result<(), StoreError> {
        self.store.abandon(generation).await
    }

    async fn drop_generation(&self, generation: &str) -> Result<u64, StoreError> {
        self.store.drop_generation(generation).await
    }

    async fn ping(&self) -> bool {
        self.store.ping().await
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
    let conn =
        kappa_runtime::working::remote::connect_with(url, what, &cfg.kappa.redis_tls).await?;
    Ok(Store::new(conn))
}

/// Runs the service until `shutdown` is cancelled, then drains.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = connect_views(&cfg).await?;
    let views = SensorViews {
        store: store.clone(),
        history_len: cfg.history_len(),
    };
    ViewService::new(SERVICE, views, cfg.kappa)
        .input(streams::DELTAS, subjects::DELTAS_PREFIX)
        .observe(thermo_domain::runtime::registry_source(
            Duration::from_secs(1),
        ))
        .declare(thermo_domain::runtime::sensors_stream().stream_config())
        .http(cfg.http_addr)
        .beside(move |rt| {
            let feed_ready = Arc::new(AtomicBool::new(false));
            let r = feed_ready.clone();
            rt.health.register(
                "registry_feed",
                Arc::new(move || (r.load(Ordering::Relaxed), serde_json::json!(null))),
            );
            follow_registry(
                rt.nats.clone(),
                store,
                rt.nats.client.clone(),
                feed_ready,
                rt.shutdown.clone(),
            )
        })
        .run(shutdown)
        .await?;
    Ok(())
}
