//! Working state: the state a service's compute reads and changes, per partition, as opaque
//! values by key plus the partition's *position* (the last input sequence applied), always
//! committed together so a replayed input is recognised and never doubles an effect.
//!
//! The seed's three options, one module each, chosen by `KAPPA_WORKING`:
//! - [`local`]: process memory; periodic snapshots of changed keys to a JetStream stream, and
//!   after a crash, snapshot + replay of the inputs after the snapshot's position;
//! - [`remote`]: Redis over the network, one atomic Lua call per batch with a fencing epoch;
//! - [`affinity`]: a Redis colocated with the instance (unix socket), snapshotting like `local`
//!   so losing both the compute and its store still recovers from the streams.

pub mod affinity;
pub mod local;
pub mod remote;
pub mod snapshot;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::RuntimeError;

/// A key's value as a working state is handed it and holds it.
///
/// A commit hands over [`Value::Held`] states: the engine's own committed values, shared, not
/// encoded. `local` keeps them as they are and encodes a key only when a snapshot writes it
/// (once per flush interval, not once per commit; and one copy of each state in memory
/// instead of a decoded one and an encoded one); `remote` and `affinity` encode at the commit,
/// since their store holds bytes.
#[derive(Clone)]
pub enum Value {
    /// The stored form (as read from a store or a snapshot).
    Encoded(Bytes),
    /// A committed state, encoded on demand ([`Value::encoded`]).
    Held(Arc<dyn HeldState>),
}

/// A committed state held in memory that can produce its stored form.
pub trait HeldState: std::any::Any + Send + Sync {
    /// The stored form of this state.
    fn encode(&self) -> Result<Bytes, RuntimeError>;
}

impl Value {
    /// The stored form: the bytes as they are, or the held state encoded now.
    pub fn encoded(&self) -> Result<Bytes, RuntimeError> {
        match self {
            Value::Encoded(b) => Ok(b.clone()),
            Value::Held(h) => h.encode(),
        }
    }
}

impl From<Bytes> for Value {
    fn from(b: Bytes) -> Self {
        Value::Encoded(b)
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Encoded(b) => f.debug_tuple("Encoded").field(&b.len()).finish(),
            Value::Held(_) => f.write_str("Held"),
        }
    }
}

/// One key's new value in a commit.
pub type Write = (String, Value);

/// One key's value in its stored form (as a snapshot holds it).
pub type Stored = (String, Bytes);

/// A partition's snapshot as read: its position and every key's value.
pub type Snapshot = (u64, Vec<Stored>);

/// A copy of a partition kept by a standby (`KAPPA_STANDBYS`) while another instance owned it,
/// offered to [`WorkingState::open_warm`] at a takeover. It was never written to the store and
/// fences nothing.
#[derive(Debug, Default)]
pub struct WarmCopy {
    /// The input position it covers: every input at or below it was decided by an owner, with
    /// its outcome in the logs (a committed position the owner reported).
    pub position: u64,
    /// Every key's value (each a committed state of its entity, or one brought further by
    /// folding changes from the change log).
    pub values: std::collections::HashMap<String, Value>,
    /// The keys whose values the standby changed since the snapshot it started from: the next
    /// snapshot writes them.
    pub changed: Vec<String>,
}

/// The working-state store of one service instance.
pub trait WorkingState: Send + Sync + 'static {
    /// Takes partition `partition` over with fencing `epoch` (higher wins), restores it
    /// (recovering from streams when needed) and returns its position.
    fn open(&self, partition: u32, epoch: u64) -> BoxFuture<'_, Result<u64, RuntimeError>>;
    /// Values of `keys` in `partition` (`None` for a key never written).
    fn load<'a>(
        &'a self,
        partition: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<Value>>, RuntimeError>>;
    /// Atomically stores `writes` and moves the partition's position to `position`. Fails with
    /// [`RuntimeError::Fenced`] if a newer epoch took the partition over, and with
    /// [`RuntimeError::StoreLost`] if the store no longer holds what this owner opened and
    /// committed (wiped, restarted empty, rolled back): the caller must `open` it again.
    fn commit(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
        writes: Vec<Write>,
    ) -> BoxFuture<'_, Result<(), RuntimeError>>;
    /// Flushes what must outlive the partition's handover (snapshots) and forgets it.
    fn close(&self, partition: u32) -> BoxFuture<'_, Result<(), RuntimeError>>;
    /// Sets the partition's position to `position` even when it is behind the stored one:
    /// the input stream was replaced (deleted and created again), so its sequences start
    /// again. Values are kept. Fails with [`RuntimeError::Fenced`] under a newer epoch.
    fn rebase(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
    ) -> BoxFuture<'_, Result<(), RuntimeError>>;
    /// Which option this is (`local`, `remote`, `affinity`).
    fn kind(&self) -> &'static str;
    /// [`WorkingState::open`], offered `warm`: a copy of the partition that a standby of this
    /// instance kept while another instance owned it ([`WarmCopy`]). The partition is claimed
    /// under `epoch` first, exactly as by `open`; the copy is used only if it is at least as far
    /// as what the claim found, otherwise the partition recovers as without one. Only `local`
    /// uses copies (the Redis options share their state already); the default ignores it.
    fn open_warm(
        &self,
        partition: u32,
        epoch: u64,
        warm: Option<WarmCopy>,
    ) -> BoxFuture<'_, Result<u64, RuntimeError>> {
        drop(warm);
        self.open(partition, epoch)
    }

    /// The latest snapshot of `partition` (its position and every key's value), read without
    /// claiming or holding anything: the base a standby's copy starts from. `None` for an
    /// option that keeps no copies (the default).
    fn peek(&self, partition: u32) -> BoxFuture<'_, Result<Option<Snapshot>, RuntimeError>> {
        let _ = partition;
        Box::pin(async { Ok(None) })
    }

    /// Why the store is degraded (e.g. snapshots keep failing), `None` when it is not; the
    /// service reports it in `/healthz` as not ready.
    fn degraded(&self) -> Option<String> {
        None
    }
}

/// Times a store call into `kappa_state_seconds{op, kind}`.
pub(crate) fn observe(kind: &'static str, op: &'static str, started: std::time::Instant) {
    metrics::histogram!("kappa_state_seconds", "kind" => kind, "op" => op)
        .record(started.elapsed().as_secs_f64());
}

/// Builds the working-state option chosen in `settings` for service `namespace` (its keys and
/// snapshot subjects are named after it).
pub async fn build(
    settings: &crate::config::Settings,
    namespace: &str,
    js: &async_nats::jetstream::Context,
    shutdown: &crate::shutdown::CancellationToken,
) -> Result<Arc<dyn WorkingState>, RuntimeError> {
    use crate::config::WorkingMode;
    let snapshots = || async {
        let s = Arc::new(
            snapshot::Snapshotter::with_replicas(js.clone(), namespace, settings.nats.replicas()?)
                .await?,
        );
        s.spawn_flusher(
            std::time::Duration::from_secs(settings.snapshot_interval_secs.max(1)),
            shutdown.clone(),
        );
        Ok::<_, RuntimeError>(s)
    };
    Ok(match settings.working {
        WorkingMode::Local => Arc::new(local::LocalState::new(snapshots().await?)),
        WorkingMode::Remote => {
            let conn =
                remote::connect_with(&settings.redis_url, "REDIS_URL", &settings.redis_tls).await?;
            Arc::new(remote::RedisState::new(conn, namespace, "remote"))
        }
        WorkingMode::Affinity => {
            let url = settings.affinity_redis_url.as_deref().ok_or_else(|| {
                RuntimeError::Config("KAPPA_WORKING=affinity needs AFFINITY_REDIS_URL".into())
            })?;
            let conn = remote::connect_with(url, "AFFINITY_REDIS_URL", &settings.redis_tls).await?;
            Arc::new(affinity::AffinityState::new(
                remote::RedisState::new(conn, namespace, "affinity"),
                snapshots().await?,
            ))
        }
    })
}
