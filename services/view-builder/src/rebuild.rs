//! `view-builder rebuild`: rebuilds every view from deltas-stream sequence 1 into a fresh
//! generation and swaps it in atomically; queries keep answering from the active generation
//! meanwhile. The runtime's [`Rebuild`] does the generic part; this adds the registry feed.
//!
//! 1. take a new generation number `N` (`INCR views:next-gen`) and claim `views:building = N`
//!    (refused while another rebuild holds it, unless `--force`); from now on the running
//!    view-builders apply registry changes to `N` as well;
//! 2. follow the registry's change stream (last value per sensor, then changes) into `N`;
//! 3. read the deltas stream from sequence 1 with an ordered consumer and apply it per partition
//!    (the partition is the stored subject's third token) with the same Lua script as the
//!    service, into `N`;
//! 4. once the stream is drained, a Lua script swaps `views:active` to `N` only if `N` has
//!    applied at least the active generation's position in every partition (otherwise keep
//!    reading: the running service is ahead); after the swap the service writes to `N`, and
//!    the per-point sequence checks make any overlap harmless;
//! 5. after a grace period (queries that read the old pointer finish), delete the old
//!    generation's keys.

use std::time::Duration;

use kappa_runtime::feed::{Change, Feed, FeedConfig, FeedHandler, Gap, Start};
use kappa_runtime::nats::Nats;
use kappa_runtime::view::{Rebuild, RebuildOptions};
use thermo_domain::ObservedSensor;
use thermo_domain::{streams, subjects};

use crate::store::Store;
use crate::view::SensorMeta;
use crate::{Config, SensorViews};

/// Options of the `rebuild` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct RebuildArgs {
    /// Seconds to keep the old generation after the swap before deleting it.
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// Take over `views:building` even if another rebuild seems to hold it.
    #[arg(long)]
    pub force: bool,
    /// Give up if the new generation cannot catch up for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub stall_secs: u64,
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The new active generation.
    pub generation: String,
    /// The generation it replaced.
    pub previous: String,
    /// Deltas applied.
    pub deltas: u64,
    /// Messages skipped as undecodable.
    pub skipped: u64,
    /// Keys of the old generation deleted.
    pub dropped_keys: u64,
}

/// Runs a rebuild with its own connections.
pub async fn run(cfg: Config, args: RebuildArgs) -> anyhow::Result<Report> {
    kappa_runtime::telemetry::init_tracing();
    let nats = kappa_runtime::nats::connect(&cfg.kappa.nats, "view-builder-rebuild").await?;
    let store = crate::connect_views(&cfg).await?;
    let options = cfg.kappa.nats.stream_options()?;
    kappa_runtime::nats::check_replicas(&nats.client, options.replicas)?;
    let mut deltas = cfg.deltas();
    deltas.declare_with(&nats.js, options).await?;
    kappa_runtime::nats::declare_stream(
        &nats.js,
        thermo_domain::runtime::sensors_stream().stream_config_with(options.replicas),
    )
    .await?;
    rebuild(&nats, &store, &cfg, &args).await
}

/// Rebuilds the views in `store` from the streams behind `nats`.
pub async fn rebuild(
    nats: &Nats,
    store: &Store,
    cfg: &Config,
    args: &RebuildArgs,
) -> anyhow::Result<Report> {
    let views = SensorViews {
        store: store.clone(),
        history_len: cfg.history_len(),
    };
    let options = RebuildOptions {
        grace: Duration::from_secs(args.grace_secs),
        force: args.force,
        stall: Duration::from_secs(args.stall_secs),
        batch: cfg.kappa.batch,
    };
    let rebuild = Rebuild::begin(&nats.js, views, cfg.deltas(), options).await?;
    let stop = kappa_runtime::shutdown::CancellationToken::new();
    let meta_task = tokio::spawn(follow_registry_into(
        nats.clone(),
        store.clone(),
        rebuild.generation().to_string(),
        stop.clone(),
    ));
    let result = rebuild.finish().await;
    stop.cancel();
    let _ = meta_task.await;
    let r = result?;
    Ok(Report {
        generation: r.generation,
        previous: r.previous,
        deltas: r.applied,
        skipped: r.skipped,
        dropped_keys: r.dropped,
    })
}

/// Applies the registry's sensors (last value each, then changes) to `generation` until
/// stopped: the runtime's change feed, like the service's own registry feed.
async fn follow_registry_into(
    nats: Nats,
    store: Store,
    generation: String,
    stop: kappa_runtime::shutdown::CancellationToken,
) {
    let cfg = FeedConfig::new(
        streams::SENSORS,
        format!("{}.>", subjects::SENSORS_PREFIX),
        Start::LastPerSubject,
    );
    let feed = Feed::start(&nats, cfg, IntoGeneration { store, generation }, stop);
    feed.stopped().await;
}

/// Writes registry changes into the generation being built.
struct IntoGeneration {
    store: Store,
    generation: String,
}

impl FeedHandler for IntoGeneration {
    async fn apply(&mut self, change: Change) {
        let id = change.key();
        if let Ok(s) = serde_json::from_slice::<ObservedSensor>(&change.payload)
            && s.0.sensor_id == id
        {
            let meta = SensorMeta::from_sensor(&s.0);
            if let Err(e) = self.store.apply_meta_to(&self.generation, id, &meta).await {
                tracing::warn!(error = %e, "registry change not applied to the new generation");
            }
        }
    }

    async fn gap(&mut self, gap: Gap) {
        // Metadata writes are version-checked, and a replay of the last value per sensor
        // follows a reset, so a gap needs no undoing here.
        tracing::warn!(?gap, "registry feed of the rebuild saw a gap");
    }
}
