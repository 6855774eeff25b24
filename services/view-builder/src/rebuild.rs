//! `view-builder rebuild`: rebuilds every view from deltas-stream sequence 1 into a fresh
//! generation and swaps it in atomically; queries keep answering from the active generation
//! meanwhile.
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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use futures::StreamExt;
use thermo_domain::ObservedSensor;
use thermo_domain::{Delta, streams, subjects};

use crate::Config;
use crate::store::{Applied, BUILDING_KEY, NEXT_GEN_KEY, Store, Target};
use crate::view::{SensorMeta, fold_batch, parse_delta};

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
    let nats = kappa_runtime::nats::connect(&cfg.nats, "view-builder-rebuild").await?;
    let store = crate::connect_views(&cfg).await?;
    let mut deltas = cfg.deltas();
    deltas.declare(&nats.js).await?;
    kappa_runtime::nats::declare_stream(
        &nats.js,
        thermo_domain::runtime::sensors_stream().stream_config(),
    )
    .await?;
    rebuild(&nats.js, &store, &cfg, &args).await
}

/// Rebuilds the views in `store` from the streams behind `js`.
pub async fn rebuild(
    js: &async_nats::jetstream::Context,
    store: &Store,
    cfg: &Config,
    args: &RebuildArgs,
) -> anyhow::Result<Report> {
    let mut conn = store.conn();
    let active = store.active_generation().await?;
    let generation = loop {
        let g: u64 = redis::cmd("INCR")
            .arg(NEXT_GEN_KEY)
            .query_async(&mut conn)
            .await?;
        if g.to_string() != active {
            break g.to_string();
        }
    };
    let mut claim = redis::cmd("SET");
    claim.arg(BUILDING_KEY).arg(&generation);
    if !args.force {
        claim.arg("NX");
    }
    let claimed: Option<String> = claim.query_async(&mut conn).await?;
    if claimed.is_none() {
        let holder: Option<String> = redis::cmd("GET")
            .arg(BUILDING_KEY)
            .query_async(&mut conn)
            .await?;
        anyhow::bail!(
            "another rebuild is running (views:building = {}); pass --force if it died",
            holder.unwrap_or_default()
        );
    }
    tracing::info!(generation, active, "rebuilding views");
    let stop = kappa_runtime::shutdown::CancellationToken::new();
    let meta_task = tokio::spawn(follow_registry_into(
        js.clone(),
        store.clone(),
        generation.clone(),
        stop.clone(),
    ));
    let result = fill_and_swap(js, store, cfg, args, &generation).await;
    stop.cancel();
    let _ = meta_task.await;
    match result {
        Ok((previous, deltas, skipped)) => {
            tracing::info!(
                generation,
                previous,
                deltas,
                "swapped in; dropping the old generation after the grace period"
            );
            tokio::time::sleep(Duration::from_secs(args.grace_secs)).await;
            let dropped_keys = if previous == generation {
                0
            } else {
                store.drop_generation(&previous).await?
            };
            Ok(Report {
                generation,
                previous,
                deltas,
                skipped,
                dropped_keys,
            })
        }
        Err(e) => {
            let holder: Option<String> = redis::cmd("GET")
                .arg(BUILDING_KEY)
                .query_async(&mut conn)
                .await
                .unwrap_or(None);
            if holder.as_deref() == Some(generation.as_str()) {
                let _: Result<i64, _> = redis::cmd("DEL")
                    .arg(BUILDING_KEY)
                    .query_async(&mut conn)
                    .await;
            }
            let _ = store.drop_generation(&generation).await;
            Err(e)
        }
    }
}

/// The partition of a stored delta subject `thermo.deltas.<p>.<id>`.
pub fn partition_of(subject: &str) -> Option<u32> {
    let rest = subject
        .strip_prefix(subjects::DELTAS_PREFIX)?
        .strip_prefix('.')?;
    let (p, id) = rest.split_once('.')?;
    if id.is_empty() || id.contains('.') {
        return None;
    }
    p.parse().ok()
}

type Pending = BTreeMap<u32, Vec<(u64, Delta)>>;

async fn flush(
    store: &Store,
    generation: &str,
    cfg: &Config,
    pending: &mut Pending,
    last_seen: &mut BTreeMap<u32, u64>,
) -> anyhow::Result<u64> {
    let target = Target::Generation(generation.to_string());
    let mut applied = 0;
    let partitions: Vec<u32> = last_seen.keys().copied().collect();
    for p in partitions {
        let Some(last) = last_seen.remove(&p) else {
            continue;
        };
        let items = pending.remove(&p).unwrap_or_default();
        applied += items.len() as u64;
        let updates = fold_batch(items, cfg.history_len());
        let metas = vec![None; updates.len()];
        let outcome = store
            .apply(&target, p, 0, last, cfg.history_len(), &updates, &metas)
            .await?;
        if outcome == Applied::Fenced {
            anyhow::bail!("generation {generation} partition {p} has another writer");
        }
    }
    Ok(applied)
}

async fn fill_and_swap(
    js: &async_nats::jetstream::Context,
    store: &Store,
    cfg: &Config,
    args: &RebuildArgs,
    generation: &str,
) -> anyhow::Result<(String, u64, u64)> {
    let stream = js.get_stream_no_info(streams::DELTAS).await?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.>", subjects::DELTAS_PREFIX),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut drained = c.cached_info().num_pending == 0;
    let mut msgs = c.messages().await?;
    let batch = usize::try_from(cfg.batch).unwrap_or(256);
    let mut pending: Pending = BTreeMap::new();
    let mut last_seen: BTreeMap<u32, u64> = BTreeMap::new();
    let mut buffered = 0usize;
    let (mut deltas, mut skipped) = (0u64, 0u64);
    let mut stalled_since: Option<Instant> = None;
    loop {
        let next = if drained {
            tokio::time::timeout(Duration::from_millis(500), msgs.next())
                .await
                .ok()
        } else {
            Some(msgs.next().await)
        };
        match next {
            Some(Some(m)) => {
                let m = m?;
                let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                let (seq, left) = (info.stream_sequence, info.pending);
                drained = left == 0;
                if let Some(p) = partition_of(m.subject.as_str()) {
                    let entity = kappa_runtime::partition::entity_of(m.subject.as_str());
                    last_seen.insert(p, seq);
                    match parse_delta(&m.payload, entity) {
                        Ok(d) => {
                            pending.entry(p).or_default().push((seq, d));
                            buffered += 1;
                        }
                        Err(_) => skipped += 1,
                    }
                } else {
                    skipped += 1;
                }
                if buffered >= batch || drained {
                    deltas += flush(store, generation, cfg, &mut pending, &mut last_seen).await?;
                    buffered = 0;
                }
            }
            Some(None) => anyhow::bail!("the deltas stream's consumer ended"),
            None => {}
        }
        if drained {
            deltas += flush(store, generation, cfg, &mut pending, &mut last_seen).await?;
            buffered = 0;
            let (swapped, previous) = store.swap(generation).await?;
            if swapped {
                return Ok((previous, deltas, skipped));
            }
            let since = *stalled_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(args.stall_secs) {
                anyhow::bail!(
                    "generation {generation} did not catch up with generation {previous} within {}s",
                    args.stall_secs
                );
            }
        } else {
            stalled_since = None;
        }
    }
}

/// Applies the registry's sensors (last value each, then changes) to `generation` until stopped.
async fn follow_registry_into(
    js: async_nats::jetstream::Context,
    store: Store,
    generation: String,
    stop: kappa_runtime::shutdown::CancellationToken,
) {
    let store = Arc::new(store);
    let run = async {
        let stream = js.get_stream_no_info(streams::SENSORS).await.ok()?;
        let c = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", subjects::SENSORS_PREFIX),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .ok()?;
        let mut msgs = c.messages().await.ok()?;
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return Some(()),
                m = msgs.next() => m,
            };
            let m = m?.ok()?;
            let id = kappa_runtime::partition::entity_of(m.subject.as_str());
            if let Ok(s) = serde_json::from_slice::<ObservedSensor>(&m.payload)
                && s.0.sensor_id == id
            {
                let meta = SensorMeta::from_sensor(&s.0);
                if let Err(e) = store.apply_meta_to(&generation, id, &meta).await {
                    tracing::warn!(error = %e, "registry change not applied to the new generation");
                }
            }
        }
    };
    if run.await.is_none() {
        tracing::warn!("registry feed of the rebuild stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_from_stored_subject() {
        assert_eq!(partition_of("thermo.deltas.3.s-1"), Some(3));
        assert_eq!(partition_of("thermo.deltas.s-1"), None);
        assert_eq!(partition_of("thermo.deltas.x.s-1"), None);
        assert_eq!(partition_of("thermo.readings.3.s-1"), None);
    }
}
