//! `local` working state: the values live in process memory (fastest reads and writes). Every
//! commit is recorded for the next snapshot ([`super::snapshot`]); after a crash, `open` loads
//! the last snapshot and the driver replays the inputs after its position.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;

use super::snapshot::Snapshotter;
use super::{WorkingState, Write};
use crate::RuntimeError;

#[derive(Default)]
struct Partition {
    position: u64,
    values: HashMap<String, Bytes>,
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

impl WorkingState for LocalState {
    fn open(&self, partition: u32, _epoch: u64) -> BoxFuture<'_, Result<u64, RuntimeError>> {
        Box::pin(async move {
            if let Ok(parts) = self.parts.lock()
                && let Some(p) = parts.get(&partition)
            {
                return Ok(p.position);
            }
            let t = std::time::Instant::now();
            let (position, entries) = self.snapshots.recover(partition).await?;
            let n = entries.len();
            let values: HashMap<String, Bytes> = entries.into_iter().collect();
            if let Ok(mut parts) = self.parts.lock() {
                parts.insert(partition, Partition { position, values });
            }
            metrics::gauge!("kappa_recovered_keys", "partition" => partition.to_string())
                .set(n as f64);
            tracing::info!(
                partition,
                position,
                keys = n,
                secs = t.elapsed().as_secs_f64(),
                "local state restored from snapshot"
            );
            Ok(position)
        })
    }

    fn load<'a>(
        &'a self,
        partition: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<Bytes>>, RuntimeError>> {
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
        _epoch: u64,
        position: u64,
        writes: Vec<Write>,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.snapshots.record(partition, position, &writes);
            let mut parts = self
                .parts
                .lock()
                .map_err(|_| RuntimeError::Corrupt("state lock poisoned".into()))?;
            // Positions only grow between rebases (see `rebase`).
            let p = parts.entry(partition).or_default();
            p.position = p.position.max(position);
            p.values.extend(writes);
            Ok(())
        })
    }

    fn close(&self, partition: u32) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.snapshots.flush(Some(partition)).await?;
            if let Ok(mut parts) = self.parts.lock() {
                parts.remove(&partition);
            }
            Ok(())
        })
    }

    fn rebase(
        &self,
        partition: u32,
        _epoch: u64,
        position: u64,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.snapshots.rebase(partition, position);
            let mut parts = self
                .parts
                .lock()
                .map_err(|_| RuntimeError::Corrupt("state lock poisoned".into()))?;
            parts.entry(partition).or_default().position = position;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}
