//! `local` working state: the values live in process memory (fastest reads and writes). Every
//! commit is recorded for the next snapshot ([`super::snapshot`]); after a crash, `open` loads
//! the last snapshot and the driver replays the inputs after its position.
//!
//! Values are kept as the engine commits them ([`super::Value::Held`]): the engine's own
//! decoded states, shared with it (it copies a state when it next changes it), encoded only
//! when a snapshot writes them. Encoding every changed state at every commit cost 8-13% of
//! temperature-delta's CPU (perf, `kappa-bench cost`), and kept a second, encoded copy of
//! every state beside the engine's.
//!
//! Fencing: a partition is held under the epoch it was opened with. A commit or rebase of
//! another epoch is refused ([`RuntimeError::Fenced`]), and so is one the snapshotter knows to be
//! stale (a newer owner claimed the partition's snapshot marker), so a resumed zombie stops at
//! its next commit and its `close` flushes nothing (the flush finds the newer marker). An open
//! under a newer epoch than the one held in memory drops the memory: another instance may have
//! run the partition in between, so it is recovered from the snapshot and replayed.
//!
//! Standbys (`KAPPA_STANDBYS`): a standby of this instance (the engine's follower) keeps a
//! copy of a partition another instance owns, starting from the snapshot ([`WorkingState::peek`])
//! and folding the change log into it; at a takeover [`WorkingState::open_warm`] is offered the
//! copy. A copy is never written to and fences nothing: `open_warm` still claims the partition's
//! marker under its epoch first, and uses the copy only if its position is at least the marker
//! position the claim found (what the snapshot recovery would read); otherwise it recovers as
//! without a standby. Every value of a copy is a committed state of its entity or one brought
//! further by changes of the log, naming the last change it folded, so a value the copy missed
//! something for is refolded from the change log by the engine, as for any stale snapshot entry
//! ([`super::snapshot`]): a stale copy costs a refold, never a wrong result. The keys the copy
//! changed since its snapshot are recorded for the next flush, so the snapshot catches up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::snapshot::Snapshotter;
use super::{Value, WarmCopy, WorkingState, Write};
use crate::RuntimeError;

struct Partition {
    epoch: u64,
    position: u64,
    values: HashMap<String, Value>,
}

/// In-memory working state with stream snapshots.
pub struct LocalState {
    parts: Mutex<HashMap<u32, Partition>>,
    snapshots: Arc<Snapshotter>,
}

impl LocalState {
    /// Memory state snapshotted through `snapshots`.
    pub fn new(snapshots: Arc<Snapshotter>) -> Self {
        Self {
            parts: Mutex::new(HashMap::new()),
            snapshots,
        }
    }

    /// Number of keys held in memory (for metrics).
    pub fn len(&self) -> usize {
        self.parts
            .lock()
            .map(|p| p.values().map(|x| x.values.len()).sum())
            .unwrap_or(0)
    }

    /// True if no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The partition held under `epoch`, or [`RuntimeError::Fenced`] (not opened in this process,
/// or opened under another epoch).
fn held(
    parts: &mut HashMap<u32, Partition>,
    partition: u32,
    epoch: u64,
) -> Result<&mut Partition, RuntimeError> {
    match parts.get_mut(&partition) {
        Some(p) if p.epoch == epoch => Ok(p),
        Some(p) => Err(RuntimeError::Fenced(format!(
            "partition {partition} is held under epoch {}, not {epoch}",
            p.epoch
        ))),
        None => Err(RuntimeError::Fenced(format!(
            "partition {partition} is not open in this instance (epoch {epoch})"
        ))),
    }
}

impl WorkingState for LocalState {
    fn open(&self, partition: u32, epoch: u64) -> BoxFuture<'_, Result<u64, RuntimeError>> {
        self.open_warm(partition, epoch, None)
    }

    fn open_warm(
        &self,
        partition: u32,
        epoch: u64,
        warm: Option<WarmCopy>,
    ) -> BoxFuture<'_, Result<u64, RuntimeError>> {
        Box::pin(async move {
            if let Ok(mut parts) = self.parts.lock()
                && let Some(p) = parts.get(&partition)
            {
                if p.epoch > epoch {
                    return Err(RuntimeError::Fenced(format!(
                        "partition {partition} is held under epoch {}, {epoch} is stale",
                        p.epoch
                    )));
                }
                if p.epoch == epoch {
                    return Ok(p.position);
                }
                // Held under an older epoch: someone else may have run it since.
                parts.remove(&partition);
            }
            let t = std::time::Instant::now();
            let claimed = self.snapshots.open(partition, epoch).await?;
            let warm = warm.filter(|w| w.position >= claimed);
            let (position, values, source) = match warm {
                Some(w) => {
                    // The snapshot lags what the copy folded: the next flush writes those keys
                    // (and moves the marker to the copy's position).
                    let changed: Vec<Write> = w
                        .changed
                        .iter()
                        .filter_map(|k| w.values.get(k).map(|v| (k.clone(), v.clone())))
                        .collect();
                    self.snapshots
                        .record(partition, epoch, w.position, &changed)?;
                    (w.position, w.values, "standby")
                }
                None => {
                    let (position, entries) = self.snapshots.recover(partition).await?;
                    let values: HashMap<String, Value> = entries
                        .into_iter()
                        .map(|(k, v)| (k, Value::Encoded(v)))
                        .collect();
                    (position, values, "snapshot")
                }
            };
            let n = values.len();
            if source == "standby" {
                metrics::counter!("kappa_standby_takeovers_total").increment(1);
            }
            if let Ok(mut parts) = self.parts.lock() {
                parts.insert(
                    partition,
                    Partition {
                        epoch,
                        position,
                        values,
                    },
                );
            }
            metrics::gauge!("kappa_recovered_keys", "partition" => partition.to_string())
                .set(n as f64);
            tracing::info!(
                partition,
                position,
                keys = n,
                secs = t.elapsed().as_secs_f64(),
                source,
                "local state restored"
            );
            Ok(position)
        })
    }

    fn load<'a>(
        &'a self,
        partition: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<Value>>, RuntimeError>> {
        Box::pin(async move {
            let parts = self
                .parts
                .lock()
                .map_err(|_| RuntimeError::Corrupt("state lock poisoned".into()))?;
            let p = parts.get(&partition);
            Ok(keys
                .iter()
                .map(|k| p.and_then(|p| p.values.get(k).cloned()))
                .collect())
        })
    }

    fn commit(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
        writes: Vec<Write>,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut parts = self
                .parts
                .lock()
                .map_err(|_| RuntimeError::Corrupt("state lock poisoned".into()))?;
            let p = held(&mut parts, partition, epoch)?;
            self.snapshots.record(partition, epoch, position, &writes)?;
            // Positions only grow between rebases (see `rebase`).
            p.position = p.position.max(position);
            p.values.extend(writes);
            Ok(())
        })
    }

    fn close(&self, partition: u32) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            // Whatever the flush does, the memory goes: the partition is handed over, and the
            // next open (under a newer epoch) recovers it from the snapshot. Changes a failed
            // flush put back are retried by the periodic flush, under this epoch's fence.
            let flushed = self.snapshots.flush(Some(partition)).await;
            if let Ok(mut parts) = self.parts.lock() {
                parts.remove(&partition);
            }
            flushed
        })
    }

    fn rebase(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut parts = self
                .parts
                .lock()
                .map_err(|_| RuntimeError::Corrupt("state lock poisoned".into()))?;
            let p = held(&mut parts, partition, epoch)?;
            self.snapshots.rebase(partition, epoch, position)?;
            p.position = position;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn peek(&self, partition: u32) -> BoxFuture<'_, Result<Option<super::Snapshot>, RuntimeError>> {
        Box::pin(async move { Ok(Some(self.snapshots.recover(partition).await?)) })
    }

    fn degraded(&self) -> Option<String> {
        self.snapshots.failing()
    }
}
