//! Partition ownership among cooperating instances, with NATS as the only coordinator.
//!
//! A JetStream KV bucket per service (`KAPPA_LEASES_<SERVICE>`, `max_age` = lease TTL) holds:
//! - `m.<instance>`: membership heartbeats, re-put every tick; a dead instance's key expires;
//! - `p.<partition>`: the partition's lease, created with `create` (only if absent) and renewed
//!   with `update` against the last revision (compare-and-set), so exactly one instance holds
//!   it at a time. The partition's *epoch* is the bucket's creation time (high 32 bits) plus
//!   the KV revision at acquisition: it only grows, even across a re-created bucket, and the
//!   working-state store refuses commits of an older epoch (fencing).
//!
//! Every instance computes the same fair assignment from the sorted live members (partition
//! `p` goes to member `p mod n`), takes the partitions assigned to it once they are free, and
//! gives up the ones assigned to someone else (drain, then delete its lease). On SIGTERM it
//! releases everything at once; after a crash, its leases expire after the TTL. An instance
//! that fails to renew (paused, partitioned) stops processing the partition at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;

use crate::RuntimeError;
use crate::shutdown::CancellationToken;

/// Settings of the lease keeper.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Service name (bucket name suffix).
    pub service: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Lease time-to-live: a crashed owner's partitions move after at most this (+ one tick).
    pub ttl: Duration,
}

/// A partition this instance now owns.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The partition.
    pub partition: u32,
    /// Fencing epoch (KV revision at acquisition).
    pub epoch: u64,
    /// Cancelled when the partition must stop (handover, lost lease, shutdown).
    pub stop: CancellationToken,
}

struct Held {
    revision: u64,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Unique id of this instance.
pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{clean}-{}-{nanos:x}", std::process::id())
}

/// The live members: subjects `m.*` of the bucket (one stream-info request, no consumer),
/// minus those whose last operation was a delete.
async fn list_members(
    js: &jetstream::Context,
    bucket: &str,
    store: &kv::Store,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(stream) = js.get_stream_no_info(format!("KV_{bucket}")).await else {
        return out;
    };
    let prefix = format!("$KV.{bucket}.m.");
    let Ok(subjects) = stream.info_with_subjects(format!("{prefix}>")).await else {
        tracing::warn!("listing members failed");
        return out;
    };
    let names: Vec<String> = subjects
        .filter_map(|r| async move { r.ok().map(|(subject, _)| subject) })
        .collect()
        .await;
    for subject in names {
        let Some(member) = subject.strip_prefix(&prefix) else {
            continue;
        };
        if let Ok(Some(_)) = store.get(format!("m.{member}")).await {
            out.insert(member.to_string());
        }
    }
    out
}

/// Which partitions `me` should own, given the live members.
pub fn fair_share(members: &BTreeSet<String>, me: &str, partitions: u32) -> BTreeSet<u32> {
    let Some(idx) = members.iter().position(|m| m == me) else {
        return BTreeSet::new();
    };
    let n = members.len() as u32;
    (0..partitions).filter(|p| p % n == idx as u32).collect()
}

/// Keeps this instance's share of partitions; `start` runs a partition for a grant and
/// returns when its `stop` token is cancelled and the partition is drained.
pub async fn keep<F>(
    js: jetstream::Context,
    cfg: LeaseConfig,
    shutdown: CancellationToken,
    owned_gauge: std::sync::Arc<std::sync::RwLock<BTreeSet<u32>>>,
    start: F,
) -> Result<(), RuntimeError>
where
    F: Fn(Grant) -> tokio::task::JoinHandle<()>,
{
    let bucket = format!(
        "KAPPA_LEASES_{}",
        cfg.service.to_uppercase().replace(['-', '.'], "_")
    );
    let store = js
        .create_or_update_key_value(kv::Config {
            bucket: bucket.clone(),
            history: 1,
            max_age: cfg.ttl,
            ..Default::default()
        })
        .await
        .map_err(|e| RuntimeError::JetStream(format!("lease bucket {bucket}: {e}")))?;
    // Epochs must keep growing even if the bucket is deleted and created again (its revisions
    // restart at 1): the bucket's creation time is the high half, the revision the low half.
    let created = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(RuntimeError::js)?
        .info()
        .await
        .map_err(RuntimeError::js)?
        .created
        .unix_timestamp();
    let epoch_base = u64::try_from(created).unwrap_or(0) << 32;
    let me = instance_id();
    let member_key = format!("m.{me}");
    let mut watch = store.watch_all().await.map_err(RuntimeError::js)?;
    let tick = (cfg.ttl / 4).max(Duration::from_millis(200));
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut next_tick = tokio::time::Instant::now();
    tracing::info!(instance = %me, bucket = %bucket, ttl_secs = cfg.ttl.as_secs_f64(), "joining");
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Heartbeat and renewals run on the tick only; a wake-up by the watch just re-plans.
        let due = tokio::time::Instant::now() >= next_tick;
        if due {
            next_tick = tokio::time::Instant::now() + tick;
            if let Err(e) = store.put(&member_key, Bytes::from_static(b"alive")).await {
                tracing::warn!(error = %e, "membership heartbeat failed");
            }
        }
        let members = list_members(&js, &bucket, &store).await;
        let desired = fair_share(&members, &me, cfg.partitions);
        known.clone_from(&members);

        // Renew what we hold; stop what we lost or must hand over.
        let mut to_release = Vec::new();
        for (&p, h) in held.iter_mut() {
            if h.task.is_finished() {
                // Stopped by itself (shutdown, fence): free the lease for the others.
                to_release.push((p, true));
                continue;
            }
            if !due {
                if !desired.contains(&p) {
                    to_release.push((p, true));
                }
                continue;
            }
            match store
                .update(format!("p.{p}"), Bytes::from(me.clone()), h.revision)
                .await
            {
                Ok(rev) => h.revision = rev,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "lease lost; stopping the partition");
                    metrics::counter!("kappa_leases_lost_total").increment(1);
                    h.stop.cancel();
                    to_release.push((p, false));
                    continue;
                }
            }
            if !desired.contains(&p) {
                to_release.push((p, true));
            }
        }
        for (p, delete) in to_release {
            if let Some(h) = held.remove(&p) {
                h.stop.cancel();
                let _ = h.task.await;
                if delete {
                    // Only if it is still ours: never delete a successor's lease.
                    let _ = store
                        .delete_expect_revision(format!("p.{p}"), Some(h.revision))
                        .await;
                    tracing::info!(partition = p, "partition handed over");
                }
            }
        }

        // Take what is ours and free.
        for p in desired {
            if held.contains_key(&p) {
                continue;
            }
            if let Ok(rev) = store
                .create(format!("p.{p}"), Bytes::from(me.clone()))
                .await
            {
                let stop = shutdown.child_token();
                let task = start(Grant {
                    partition: p,
                    epoch: epoch_base + rev,
                    stop: stop.clone(),
                });
                tracing::info!(
                    partition = p,
                    epoch = epoch_base + rev,
                    "partition acquired"
                );
                metrics::counter!("kappa_leases_acquired_total").increment(1);
                held.insert(
                    p,
                    Held {
                        revision: rev,
                        stop,
                        task,
                    },
                );
            }
        }
        if let Ok(mut g) = owned_gauge.write() {
            *g = held.keys().copied().collect();
        }
        metrics::gauge!("kappa_partitions_owned").set(held.len() as f64);
        metrics::gauge!("kappa_members").set(members.len() as f64);

        // Wait for the next tick, a change that matters (a member joined or left, a lease was
        // released), or shutdown. Heartbeats and renewals of known keys do not wake us.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_tick) => break,
                e = watch.next() => {
                    let Some(Ok(e)) = e else {
                        // The watch broke: re-plan on ticks until it is recreated below.
                        tokio::time::sleep_until(next_tick).await;
                        if let Ok(w) = store.watch_all().await {
                            watch = w;
                        }
                        break;
                    };
                    let gone = !matches!(e.operation, kv::Operation::Put);
                    let relevant = match e.key.strip_prefix("m.") {
                        Some(m) => gone || !known.contains(m),
                        None => gone && e.key.starts_with("p."),
                    };
                    if relevant {
                        // Let a burst of changes settle.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        break;
                    }
                }
            }
        }
    }
    // Drain and hand everything over at once.
    for (p, h) in std::mem::take(&mut held) {
        h.stop.cancel();
        let _ = h.task.await;
        let _ = store
            .delete_expect_revision(format!("p.{p}"), Some(h.revision))
            .await;
        tracing::info!(partition = p, "partition released");
    }
    let _ = store.delete(&member_key).await;
    if let Ok(mut g) = owned_gauge.write() {
        g.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_is_balanced_and_disjoint() {
        let members: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let shares: Vec<BTreeSet<u32>> = ["a", "b", "c"]
            .iter()
            .map(|m| fair_share(&members, m, 12))
            .collect();
        assert!(shares.iter().all(|s| s.len() == 4));
        let all: BTreeSet<u32> = shares.iter().flatten().copied().collect();
        assert_eq!(all.len(), 12);
        assert!(fair_share(&members, "zz", 12).is_empty());
    }
}
