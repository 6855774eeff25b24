//! How far each partition of a domain service has *decided* its input: the committed position
//! (the last input sequence whose outcome, a change, a dead letter or nothing, is in the logs
//! and in the working state), kept per partition in the KV bucket `KAPPA_PROGRESS_<SERVICE>`
//! (key: the partition number; value: [`Mark`] as JSON).
//!
//! The change log alone cannot say it: an input that was rejected, or that changed nothing,
//! leaves no change behind, so a reader cannot tell "not yet processed" from "processed, no
//! change". The mark can: it is what read-your-writes ([`crate::consistency`]) stands on.
//!
//! Trade-off: one KV put per partition per *round* of the [`Reporter`]'s task, never on the
//! critical path. The engine only records the position in memory after a commit; a background
//! task writes the newest mark of every partition that moved, one round in flight, and rounds
//! at least [`MIN_ROUND`] apart: at most 50 puts per second per partition whatever the load
//! (400/s for 8 partitions at full load, against ~25,000 deltas/s), one per batch at low rates,
//! and a commit never waits for one. The price is that a mark can be up to [`MIN_ROUND`]
//! behind the commit; a read of one entity does not wait for it when the entity's own change
//! shows its input decided ([`crate::consistency`]). A mark is written only after
//! its commit, so a mark never claims more than what is decided; a stale owner can at worst
//! write an older mark (a reader then waits a little longer, it is never misled).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::RuntimeError;
use crate::shutdown::CancellationToken;

/// Least time between the starts of two rounds of puts.
pub const MIN_ROUND: Duration = Duration::from_millis(20);

/// One partition's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Last input sequence decided and committed.
    pub position: u64,
    /// Identity of the input stream `position` refers to (its creation time, see
    /// [`crate::partition::stream_identity`]).
    pub source: u64,
}

/// The bucket of `service`'s marks.
pub fn bucket(service: &str) -> String {
    format!(
        "KAPPA_PROGRESS_{}",
        service.to_uppercase().replace(['-', '.'], "_")
    )
}

/// Writes a service's marks in the background (see the module docs). Cheap to clone.
/// `Default` is a reporter whose marks nobody writes (tests, a service without the bucket).
#[derive(Clone, Debug, Default)]
pub struct Reporter {
    pending: Arc<Mutex<BTreeMap<u32, Mark>>>,
    wake: Arc<Notify>,
}

impl Reporter {
    /// Declares `service`'s bucket with `replicas` and starts the task writing the marks, until
    /// `shutdown` (the last marks are written before it ends).
    pub async fn start(
        js: &jetstream::Context,
        service: &str,
        replicas: usize,
        shutdown: CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let bucket = bucket(service);
        let config = kv::Config {
            bucket: bucket.clone(),
            history: 1,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let store = crate::nats::retry_timeouts(|| js.create_or_update_key_value(config.clone()))
            .await
            .map_err(|e| RuntimeError::JetStream(format!("progress bucket {bucket}: {e}")))?;
        let me = Self::default();
        tokio::spawn(write_marks(store, me.clone(), shutdown));
        Ok(me)
    }

    /// Records that `partition` has decided its input up to `mark` (written soon after).
    pub fn report(&self, partition: u32, mark: Mark) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(partition, mark);
        }
        self.wake.notify_one();
    }

    fn take(&self) -> BTreeMap<u32, Mark> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }
}

async fn write_marks(store: kv::Store, r: Reporter, shutdown: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            _ = r.wake.notified() => false,
            _ = shutdown.cancelled() => true,
        };
        let round = tokio::time::Instant::now();
        let marks = r.take();
        let puts = marks.into_iter().map(|(p, m)| {
            let store = store.clone();
            async move {
                let value = serde_json::to_vec(&m).unwrap_or_default();
                match store.put(p.to_string(), value.into()).await {
                    Ok(_) => metrics::counter!("kappa_progress_marks_total").increment(1),
                    Err(e) => {
                        metrics::counter!("kappa_progress_errors_total").increment(1);
                        tracing::warn!(partition = p, error = %e,
                            "progress mark not written (read-your-writes waits for the next)");
                    }
                }
            }
        });
        futures::future::join_all(puts).await;
        if stopping {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(round + MIN_ROUND) => {}
            // The last marks are written before the task ends.
            _ = shutdown.cancelled() => {}
        }
    }
}

/// Reads a service's marks (the read side of read-your-writes).
#[derive(Clone)]
pub struct ProgressReader {
    store: kv::Store,
}

impl std::fmt::Debug for ProgressReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressReader")
    }
}

impl ProgressReader {
    /// The reader of `service`'s marks; waits up to `wait` for the bucket to exist (the
    /// service creates it when it starts).
    pub async fn open(
        js: &jetstream::Context,
        service: &str,
        wait: Duration,
    ) -> Result<Self, RuntimeError> {
        let bucket = bucket(service);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match js.get_key_value(&bucket).await {
                Ok(store) => return Ok(Self { store }),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(RuntimeError::JetStream(format!(
                        "progress bucket {bucket} (is {service} running?): {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// `partition`'s mark, `None` if it has none yet.
    pub async fn mark(&self, partition: u32) -> Result<Option<Mark>, RuntimeError> {
        let bytes = self
            .store
            .get(partition.to_string())
            .await
            .map_err(RuntimeError::js)?;
        Ok(bytes.and_then(|b| match serde_json::from_slice(&b) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(partition, error = %e, "undecodable progress mark; ignored");
                None
            }
        }))
    }
}
