//! `affinity` working state: a Redis colocated with the instance (typically a sidecar reached
//! over a unix socket), so a compute crash recovers from it without replaying anything. It is
//! also snapshotted like `local`: if the colocated store was lost with the compute, `open`
//! restores the partition from the stream snapshot and the driver replays after it. A store
//! restarted empty (or rolled back) *while* the instance runs is found out by the next commit
//! ([`RedisState`]'s incarnation and previous-position check), and the partition is reopened
//! the same way.
//!
//! The colocated store is this instance's alone, so its epoch check cannot fence another
//! instance: the snapshot marker does ([`super::snapshot`]). `open` claims it under the new
//! epoch, and a commit the snapshotter knows to be stale is refused before it reaches the store.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::remote::RedisState;
use super::snapshot::Snapshotter;
use super::{Value, WorkingState, Write};
use crate::RuntimeError;

/// Colocated Redis with stream snapshots as fallback.
pub struct AffinityState {
    store: RedisState,
    snapshots: Arc<Snapshotter>,
}

impl AffinityState {
    /// `store` is the colocated Redis.
    pub fn new(store: RedisState, snapshots: Arc<Snapshotter>) -> Self {
        Self { store, snapshots }
    }
}

impl WorkingState for AffinityState {
    fn open(&self, partition: u32, epoch: u64) -> BoxFuture<'_, Result<u64, RuntimeError>> {
        Box::pin(async move {
            let snapshot = self.snapshots.open(partition, epoch).await?;
            if self.store.has_partition(partition).await? {
                let pos = self.store.open(partition, epoch).await?;
                if pos >= snapshot {
                    tracing::info!(
                        partition,
                        position = pos,
                        "affinity store kept the partition"
                    );
                    return Ok(pos);
                }
                // Another owner ran the partition since this store last did: the stream
                // snapshot is newer (restoring from it replays less).
                tracing::info!(
                    partition,
                    position = pos,
                    snapshot,
                    "affinity store is behind the stream snapshot; restoring from the snapshot"
                );
            }
            // The colocated store does not hold the partition: lost with the instance, or
            // restarted empty while it ran (a commit found it out, and the driver reopened).
            let (position, entries) = self.snapshots.recover(partition).await?;
            metrics::counter!("kappa_affinity_restores_total").increment(1);
            tracing::warn!(
                partition,
                position,
                keys = entries.len(),
                "affinity partition restored from the stream snapshot"
            );
            self.store
                .restore(partition, epoch, position, entries)
                .await?;
            Ok(position)
        })
    }

    fn load<'a>(
        &'a self,
        partition: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<Value>>, RuntimeError>> {
        self.store.load(partition, keys)
    }

    fn commit(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
        writes: Vec<Write>,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            // Encoded once, for the store and the snapshot both.
            let writes = writes
                .into_iter()
                .map(|(k, v)| Ok((k, Value::Encoded(v.encoded()?))))
                .collect::<Result<Vec<Write>, RuntimeError>>()?;
            self.snapshots.record(partition, epoch, position, &writes)?;
            self.store.commit(partition, epoch, position, writes).await
        })
    }

    fn close(&self, partition: u32) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move { self.snapshots.flush(Some(partition)).await })
    }

    fn rebase(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.snapshots.rebase(partition, epoch, position)?;
            self.store.rebase(partition, epoch, position).await
        })
    }

    fn kind(&self) -> &'static str {
        "affinity"
    }

    fn degraded(&self) -> Option<String> {
        self.snapshots.failing()
    }
}
