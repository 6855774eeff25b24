//! Snapshots of working state in JetStream, for recovery without a database: changed keys are
//! published to `kappa.state.<ns>.<p>.k.<key>` (stream `KAPPA_STATE`, one message kept per
//! subject, so the stream is its own compaction), then a marker `kappa.state.<ns>.<p>.position`
//! records the input position the snapshot covers. Recovery reads the last message of every
//! subject of the partition; the caller replays inputs after the marker's position, and values
//! newer than the marker are recognised by their own last applied sequence.
//!
//! # Fencing by epoch
//! Every snapshot message carries the writer's partition epoch (`Kappa-Epoch`). The marker is
//! the fence:
//! - [`Snapshotter::open`] *claims* the partition: it re-publishes the last marker's position
//!   under the new epoch, with `Nats-Expected-Last-Subject-Sequence` of the marker it read, and
//!   refuses ([`RuntimeError::Fenced`]) if a higher epoch wrote the marker;
//! - a flush reads the last marker, refuses if a higher epoch wrote it (the pending changes are
//!   dropped: they belong to a partition this instance no longer owns, and every later
//!   `record` of that epoch is refused, so a resumed zombie stops at its next commit), then
//!   publishes its entries and its marker, again expecting the sequence it read. A conflict
//!   (10071 / 10164) means someone wrote the marker in between: the flush reads it again and
//!   either gives up (higher epoch) or republishes its entries over the other writer's.
//!
//! So a stale owner's *marker* never lands after a newer owner claimed the partition. Its
//! *entries* can still land in one window: between its marker read and its marker publish (a
//! newer owner claims in between; the stale marker is then refused, the entries are not). Such
//! entries, and old entries of keys a newer owner has not rewritten, are not filtered at
//! recovery: filtering by epoch would be wrong both ways (an entry of an older epoch is the
//! legitimate value of a key unchanged since; an entry of a newer epoch than the marker is a
//! newer owner's that died before its marker). None of them can make a result wrong, because
//! every entry is a *committed* state of its entity (written after the acks of its changes)
//! that records which change-log message it folded last and which input it decided last: a
//! stale entry is an older prefix of the entity's history, and the engine, seeing the change
//! log ahead of the stored envelope, folds the missed changes back in
//! (the engine, `engine.rs`). Every marker, stale or not, names a position whose inputs were all
//! decided by the owner that wrote it, with their outcomes in the logs. A stale write thus
//! costs replay (a refold of the entity from its change log, inputs replayed from an older
//! position), never correctness. That rests on the change log keeping every change (the
//! runtime's change-log streams have no age or size limit).
//!
//! # Large values
//! A value larger than the server's maximum payload (less headroom for headers) is chunked:
//! its parts go to `kappa.state.<ns>.<p>.c.<key>.<gen>.<i>` (a fresh `<gen>` per write), then a
//! manifest on the key's entry subject lists the parts' stream sequences and the total length
//! (`Kappa-Chunks`, `Kappa-Chunk-Len`), then the key's older parts are purged. Recovery fetches
//! the parts by sequence; a part that is gone or does not match (a torn set) makes the key
//! *missing*, counted in `kappa_snapshot_torn_total`, and the engine rebuilds it from the
//! change log. A value over [`MAX_VALUE_BYTES`] fails its partition's flush (counted in
//! `kappa_snapshot_failures_total`, retried, the partition's older snapshot stays valid).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{Stored, Value, Write};
use crate::RuntimeError;

/// Name of the snapshot stream.
pub const STREAM: &str = "KAPPA_STATE";
/// Header with the partition epoch of the instance that wrote a snapshot message.
pub const EPOCH_HEADER: &str = "Kappa-Epoch";
/// Header of a chunked value's manifest: the number of parts.
pub const CHUNKS_HEADER: &str = "Kappa-Chunks";
/// Header of a chunked value's manifest: the value's total length in bytes.
pub const CHUNK_LEN_HEADER: &str = "Kappa-Chunk-Len";
/// Largest value a snapshot holds (in parts); a larger one fails its partition's flush.
pub const MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
/// Room left in a message for its subject and headers when a value is cut into parts.
const HEADROOM: usize = 8 * 1024;
/// Attempts of a flush whose marker is moved by another writer meanwhile.
const MARKER_ATTEMPTS: usize = 3;
/// Values encoded between two yields of a flush (encoding 10^5 states holds a worker thread
/// for about 0.1 s otherwise).
const ENCODED_PER_YIELD: usize = 1024;

#[derive(Default)]
struct Pending {
    epoch: u64,
    position: u64,
    writes: HashMap<String, Value>,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<u32, Pending>,
    /// Highest epoch each partition was opened or recorded with in this process, or found in
    /// its marker by a refused flush.
    epochs: HashMap<u32, u64>,
    /// Partitions whose last flush failed, with the error (cleared by a flush that stores or
    /// is refused).
    failing: HashMap<u32, String>,
    /// Keys (partition, token) whose last stored value is chunked: their parts are purged when
    /// a plain value replaces them.
    chunked: HashSet<(u32, String)>,
}

/// The last marker of a partition.
#[derive(Debug, Default, Clone, Copy)]
struct Marker {
    seq: u64,
    epoch: u64,
    position: u64,
}

/// What a flush of one partition did.
enum Flushed {
    Stored,
    Fenced(u64),
}

/// Collects committed changes and flushes them as snapshots.
pub struct Snapshotter {
    js: jetstream::Context,
    namespace: String,
    chunk_size: usize,
    inner: Mutex<Inner>,
    flush_lock: tokio::sync::Mutex<()>,
}

fn key_token(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_string()
    } else {
        // Not a plain subject token: hex-encode it behind a marker character.
        let mut s = String::from("~");
        for b in key.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

fn token_key(token: &str) -> String {
    match token.strip_prefix('~') {
        Some(hex) => {
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        None => token.to_string(),
    }
}

fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

fn fenced(partition: u32, epoch: u64, newer: u64) -> RuntimeError {
    RuntimeError::Fenced(format!(
        "snapshot of partition {partition}: epoch {epoch} is stale, epoch {newer} wrote the marker"
    ))
}

/// A unique token for one write of a chunked value (parts of different writes never share a
/// subject, so a write cut short leaves the previous set intact).
fn generation(epoch: u64) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{epoch:x}-{nanos:x}-{n:x}")
}

impl Snapshotter {
    /// Declares the snapshot stream (one replica) and returns a snapshotter for service
    /// `namespace`. Values larger than the server's maximum payload (less room for headers)
    /// are chunked.
    pub async fn new(js: jetstream::Context, namespace: &str) -> Result<Self, RuntimeError> {
        Self::with_replicas(js, namespace, 1).await
    }

    /// [`Snapshotter::new`] with a snapshot stream of `replicas` replicas (an existing stream
    /// with another count is refused).
    pub async fn with_replicas(
        js: jetstream::Context,
        namespace: &str,
        replicas: usize,
    ) -> Result<Self, RuntimeError> {
        crate::nats::declare_stream(
            &js,
            stream::Config {
                name: STREAM.into(),
                subjects: vec!["kappa.state.>".into()],
                max_messages_per_subject: 1,
                allow_direct: true,
                max_message_size: 8 * 1024 * 1024,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let max_payload = js.client().server_info().max_payload;
        // 0 until the client got the server's INFO: assume the server default (1 MiB).
        let max_payload = if max_payload == 0 {
            1024 * 1024
        } else {
            max_payload
        };
        Ok(Self {
            js,
            namespace: namespace.to_string(),
            chunk_size: max_payload.saturating_sub(HEADROOM).max(1024),
            inner: Mutex::new(Inner::default()),
            flush_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The largest value stored as one message; larger ones are chunked.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    fn marker(&self, p: u32) -> String {
        format!("kappa.state.{}.{p}.position", self.namespace)
    }

    fn entry_prefix(&self, p: u32) -> String {
        format!("kappa.state.{}.{p}.k", self.namespace)
    }

    fn chunk_prefix(&self, p: u32) -> String {
        format!("kappa.state.{}.{p}.c", self.namespace)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, RuntimeError> {
        self.inner
            .lock()
            .map_err(|_| RuntimeError::Corrupt("snapshot lock poisoned".into()))
    }

    async fn stream(&self) -> Result<stream::Stream<()>, RuntimeError> {
        self.js
            .get_stream_no_info(STREAM)
            .await
            .map_err(RuntimeError::js)
    }

    async fn read_marker(
        &self,
        stream: &stream::Stream<()>,
        p: u32,
    ) -> Result<Marker, RuntimeError> {
        match stream.direct_get_last_for_subject(self.marker(p)).await {
            Ok(m) => Ok(Marker {
                seq: m.sequence,
                epoch: header_u64(Some(&m.headers), EPOCH_HEADER).unwrap_or(0),
                position: std::str::from_utf8(&m.payload)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            }),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(Marker::default()),
            Err(e) => Err(RuntimeError::JetStream(format!(
                "snapshot marker of partition {p}: {e}"
            ))),
        }
    }

    /// Publishes the marker of `p` expecting `expected` (the sequence of the marker read);
    /// `Ok(false)` if another writer moved it meanwhile.
    async fn publish_marker(
        &self,
        p: u32,
        epoch: u64,
        position: u64,
        expected: u64,
    ) -> Result<bool, RuntimeError> {
        let msg = PublishMessage::build()
            .payload(Bytes::from(position.to_string()))
            .header(EPOCH_HEADER, epoch.to_string().as_str())
            .expected_last_subject_sequence(expected);
        let ack = self
            .js
            .send_publish(self.marker(p), msg)
            .await
            .map_err(RuntimeError::js)?;
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if crate::changelog::is_conflict(&e) => Ok(false),
            Err(e) => Err(RuntimeError::js(e)),
        }
    }

    /// Takes partition `partition` over under `epoch`: from now on snapshots of older epochs
    /// are refused, here and (through the marker) in every other instance. Pending changes of
    /// an older epoch of this process are dropped (the partition is recovered from the
    /// snapshot and replayed). Fails with [`RuntimeError::Fenced`] if a newer epoch holds the
    /// partition. Returns the position of the partition's snapshot.
    pub async fn open(&self, partition: u32, epoch: u64) -> Result<u64, RuntimeError> {
        {
            let mut inner = self.lock()?;
            let known = inner.epochs.get(&partition).copied().unwrap_or(0);
            if known > epoch {
                return Err(fenced(partition, epoch, known));
            }
            inner.epochs.insert(partition, epoch);
            if inner
                .pending
                .get(&partition)
                .is_some_and(|p| p.epoch < epoch)
            {
                inner.pending.remove(&partition);
            }
        }
        let stream = self.stream().await?;
        for _ in 0..MARKER_ATTEMPTS {
            let m = self.read_marker(&stream, partition).await?;
            if m.epoch > epoch {
                if let Ok(mut inner) = self.lock() {
                    let e = inner.epochs.entry(partition).or_default();
                    *e = (*e).max(m.epoch);
                }
                return Err(fenced(partition, epoch, m.epoch));
            }
            if m.epoch == epoch {
                return Ok(m.position);
            }
            if self
                .publish_marker(partition, epoch, m.position, m.seq)
                .await?
            {
                tracing::debug!(
                    partition,
                    epoch,
                    previous = m.epoch,
                    position = m.position,
                    "snapshot marker claimed"
                );
                return Ok(m.position);
            }
        }
        Err(RuntimeError::JetStream(format!(
            "snapshot marker of partition {partition} kept moving while it was claimed"
        )))
    }

    /// Remembers a committed batch of epoch `epoch` for the next flush. Fails with
    /// [`RuntimeError::Fenced`] if the partition is known to run under a newer epoch.
    pub fn record(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
        writes: &[Write],
    ) -> Result<(), RuntimeError> {
        let mut inner = self.lock()?;
        let known = inner.epochs.get(&partition).copied().unwrap_or(0);
        if known > epoch {
            return Err(fenced(partition, epoch, known));
        }
        inner.epochs.insert(partition, epoch);
        let entry = inner.pending.entry(partition).or_default();
        entry.epoch = epoch;
        entry.position = entry.position.max(position);
        for (k, v) in writes {
            entry.writes.insert(k.clone(), v.clone());
        }
        Ok(())
    }

    /// The input stream was replaced: the next snapshot of `partition` records `position` even
    /// if an earlier, larger one is pending. Fenced like [`Snapshotter::record`].
    pub fn rebase(&self, partition: u32, epoch: u64, position: u64) -> Result<(), RuntimeError> {
        let mut inner = self.lock()?;
        let known = inner.epochs.get(&partition).copied().unwrap_or(0);
        if known > epoch {
            return Err(fenced(partition, epoch, known));
        }
        inner.epochs.insert(partition, epoch);
        let entry = inner.pending.entry(partition).or_default();
        entry.epoch = epoch;
        entry.position = position;
        Ok(())
    }

    /// Flushes the changes of `partition` (or of all partitions when `None`). A partition
    /// whose marker a newer epoch wrote is not flushed: its changes are dropped (counted in
    /// `kappa_snapshot_fenced_total`), which is not an error.
    pub async fn flush(&self, partition: Option<u32>) -> Result<(), RuntimeError> {
        let _guard = self.flush_lock.lock().await;
        let mut taken: Vec<(u32, Pending)> = match self.inner.lock() {
            Ok(mut inner) => match partition {
                Some(p) => inner
                    .pending
                    .remove(&p)
                    .map(|x| vec![(p, x)])
                    .unwrap_or_default(),
                None => inner.pending.drain().collect(),
            },
            Err(_) => Vec::new(),
        };
        // In partition order, so a failure leaves a predictable rest.
        taken.sort_by_key(|(p, _)| *p);
        let mut taken = taken.into_iter();
        while let Some((p, snap)) = taken.next() {
            let t = Instant::now();
            let n = snap.writes.len();
            match self.flush_one(p, &snap).await {
                Ok(Flushed::Stored) => {
                    if let Ok(mut inner) = self.inner.lock() {
                        inner.failing.remove(&p);
                    }
                    metrics::histogram!("kappa_snapshot_seconds").record(t.elapsed().as_secs_f64());
                    metrics::counter!("kappa_snapshot_entries_total").increment(n as u64);
                    tracing::debug!(
                        partition = p,
                        entries = n,
                        position = snap.position,
                        epoch = snap.epoch,
                        "snapshot flushed"
                    );
                }
                Ok(Flushed::Fenced(newer)) => {
                    metrics::counter!("kappa_snapshot_fenced_total").increment(1);
                    tracing::warn!(
                        partition = p,
                        epoch = snap.epoch,
                        newer,
                        entries = n,
                        "snapshot refused: a newer owner holds the partition; its pending changes are dropped"
                    );
                    if let Ok(mut inner) = self.inner.lock() {
                        let e = inner.epochs.entry(p).or_default();
                        *e = (*e).max(newer);
                        inner.failing.remove(&p);
                    }
                }
                Err(e) => {
                    // Put the changes back so the next flush retries them: this partition's,
                    // and those of every partition not reached yet (one failure must lose
                    // nothing).
                    metrics::counter!("kappa_snapshot_failures_total").increment(1);
                    if let Ok(mut inner) = self.inner.lock() {
                        inner.failing.insert(p, e.to_string());
                    }
                    self.restore_pending(p, snap);
                    for (rest, snap) in taken {
                        self.restore_pending(rest, snap);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn flush_one(&self, p: u32, snap: &Pending) -> Result<Flushed, RuntimeError> {
        // Held states are encoded here, once per flush (not per commit).
        let mut encoded = Vec::with_capacity(snap.writes.len());
        for (i, (k, v)) in snap.writes.iter().enumerate() {
            if i % ENCODED_PER_YIELD == ENCODED_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
            encoded.push((k.as_str(), v.encoded()?));
        }
        if let Some((k, v)) = encoded.iter().find(|(_, v)| v.len() > MAX_VALUE_BYTES) {
            return Err(RuntimeError::JetStream(format!(
                "snapshot of partition {p}: the value of {k} is {} bytes, more than the {MAX_VALUE_BYTES} a snapshot holds",
                v.len()
            )));
        }
        let stream = self.stream().await?;
        for _ in 0..MARKER_ATTEMPTS {
            let m = self.read_marker(&stream, p).await?;
            if m.epoch > snap.epoch {
                return Ok(Flushed::Fenced(m.epoch));
            }
            self.publish_entries(&stream, p, snap.epoch, &encoded)
                .await?;
            if self
                .publish_marker(p, snap.epoch, snap.position, m.seq)
                .await?
            {
                return Ok(Flushed::Stored);
            }
            // Someone wrote the marker since it was read: read it again.
        }
        Err(RuntimeError::JetStream(format!(
            "snapshot marker of partition {p} kept moving while it was flushed"
        )))
    }

    async fn publish_entries(
        &self,
        stream: &stream::Stream<()>,
        p: u32,
        epoch: u64,
        entries: &[(&str, Bytes)],
    ) -> Result<(), RuntimeError> {
        let prefix = self.entry_prefix(p);
        let epoch_s = epoch.to_string();
        // At most PUBLISH_WINDOW acks outstanding: a flush of more keys than the context's
        // permits used to wait for a permit only its own awaits could give back (see
        // `crate::nats::MAX_ACKS_IN_FLIGHT`).
        let mut acks = crate::nats::AckWindow::new(crate::nats::PUBLISH_WINDOW);
        let mut stored = Vec::with_capacity(entries.len());
        let mut large = Vec::new();
        for (k, v) in entries {
            let token = key_token(k);
            if v.len() > self.chunk_size {
                large.push((token, v));
                continue;
            }
            if let Some((t, a)) = acks.make_room() {
                stored.push((t, a.await.map_err(RuntimeError::js)?.sequence));
            }
            let msg = PublishMessage::build()
                .payload(v.clone())
                .header(EPOCH_HEADER, epoch_s.as_str());
            let ack = self
                .js
                .send_publish(format!("{prefix}.{token}"), msg)
                .await
                .map_err(RuntimeError::js)?;
            acks.push(token, ack);
        }
        for (token, a) in acks.rest() {
            stored.push((token, a.await.map_err(RuntimeError::js)?.sequence));
        }
        // A plain value replaced a chunked one: its parts are garbage now.
        for (token, seq) in stored {
            let was_chunked = self
                .lock()
                .map(|i| i.chunked.contains(&(p, token.clone())))
                .unwrap_or(false);
            if was_chunked {
                self.purge_parts(stream, p, &token, seq).await?;
                if let Ok(mut inner) = self.lock() {
                    inner.chunked.remove(&(p, token));
                }
            }
        }
        for (token, v) in large {
            self.publish_chunked(stream, p, epoch, &token, v).await?;
        }
        Ok(())
    }

    /// Parts first (on subjects of their own, so the previous set stays whole until the
    /// manifest points elsewhere), then the manifest, then the purge of older parts.
    async fn publish_chunked(
        &self,
        stream: &stream::Stream<()>,
        p: u32,
        epoch: u64,
        token: &str,
        value: &Bytes,
    ) -> Result<(), RuntimeError> {
        let gen_ = generation(epoch);
        let base = format!("{}.{token}.{gen_}", self.chunk_prefix(p));
        let epoch_s = epoch.to_string();
        let mut acks = crate::nats::AckWindow::new(crate::nats::PUBLISH_WINDOW);
        let mut seqs = Vec::new();
        for (i, start) in (0..value.len()).step_by(self.chunk_size).enumerate() {
            if let Some(((), a)) = acks.make_room() {
                seqs.push(a.await.map_err(RuntimeError::js)?.sequence);
            }
            let part = value.slice(start..(start + self.chunk_size).min(value.len()));
            let msg = PublishMessage::build()
                .payload(part)
                .header(EPOCH_HEADER, epoch_s.as_str());
            acks.push(
                (),
                self.js
                    .send_publish(format!("{base}.{i}"), msg)
                    .await
                    .map_err(RuntimeError::js)?,
            );
        }
        for ((), a) in acks.rest() {
            seqs.push(a.await.map_err(RuntimeError::js)?.sequence);
        }
        let first = seqs.first().copied().unwrap_or(0);
        let list = seqs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let msg = PublishMessage::build()
            .payload(Bytes::from(list))
            .header(EPOCH_HEADER, epoch_s.as_str())
            .header(CHUNKS_HEADER, seqs.len().to_string().as_str())
            .header(CHUNK_LEN_HEADER, value.len().to_string().as_str());
        self.js
            .send_publish(format!("{}.{token}", self.entry_prefix(p)), msg)
            .await
            .map_err(RuntimeError::js)?
            .await
            .map_err(RuntimeError::js)?;
        metrics::counter!("kappa_snapshot_chunked_total").increment(1);
        self.purge_parts(stream, p, token, first).await?;
        if let Ok(mut inner) = self.lock() {
            inner.chunked.insert((p, token.to_string()));
        }
        Ok(())
    }

    /// Purges the parts of `token` stored before stream sequence `before`.
    async fn purge_parts(
        &self,
        stream: &stream::Stream<()>,
        p: u32,
        token: &str,
        before: u64,
    ) -> Result<(), RuntimeError> {
        stream
            .purge()
            .filter(format!("{}.{token}.>", self.chunk_prefix(p)))
            .sequence(before)
            .await
            .map_err(|e| RuntimeError::JetStream(format!("purge of old snapshot parts: {e}")))?;
        Ok(())
    }

    /// Why snapshots are failing (the partitions whose last flush failed and the first
    /// error), `None` when every partition's last flush stored or was refused.
    pub fn failing(&self) -> Option<String> {
        let inner = self.inner.lock().ok()?;
        let mut parts: Vec<u32> = inner.failing.keys().copied().collect();
        parts.sort_unstable();
        let first = parts.first().and_then(|p| inner.failing.get(p))?;
        Some(format!(
            "snapshots of partitions {parts:?} failing: {first}"
        ))
    }

    /// Puts taken changes back under whatever was recorded since (newer values win).
    fn restore_pending(&self, partition: u32, snap: Pending) {
        if let Ok(mut inner) = self.inner.lock() {
            let entry = inner.pending.entry(partition).or_default();
            entry.epoch = entry.epoch.max(snap.epoch);
            entry.position = entry.position.max(snap.position);
            for (k, v) in snap.writes {
                entry.writes.entry(k).or_insert(v);
            }
        }
    }

    /// Reassembles a chunked value from its manifest; `None` if the set is torn.
    async fn assemble(
        &self,
        stream: &stream::Stream<()>,
        p: u32,
        token: &str,
        headers: Option<&HeaderMap>,
        manifest: &[u8],
    ) -> Result<Option<Bytes>, RuntimeError> {
        let (Some(parts), Some(len)) = (
            header_u64(headers, CHUNKS_HEADER),
            header_u64(headers, CHUNK_LEN_HEADER),
        ) else {
            return Ok(None);
        };
        let seqs: Vec<u64> = std::str::from_utf8(manifest)
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect();
        if seqs.len() as u64 != parts || len as usize > MAX_VALUE_BYTES {
            return Ok(None);
        }
        let prefix = format!("{}.{token}.", self.chunk_prefix(p));
        let mut out = BytesMut::with_capacity(len as usize);
        for (i, seq) in seqs.iter().enumerate() {
            match stream.direct_get(*seq).await {
                Ok(m) => {
                    let subject = m.subject.as_str();
                    let ok = subject.starts_with(&prefix)
                        && subject.rsplit('.').next() == Some(i.to_string().as_str());
                    if !ok {
                        return Ok(None);
                    }
                    out.extend_from_slice(&m.payload);
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(RuntimeError::JetStream(format!(
                        "snapshot part {seq} of partition {p}: {e}"
                    )));
                }
            }
        }
        if out.len() as u64 != len {
            return Ok(None);
        }
        Ok(Some(out.freeze()))
    }

    /// The position of the latest snapshot marker of `partition` (0 if none), read without
    /// claiming anything.
    pub async fn position(&self, partition: u32) -> Result<u64, RuntimeError> {
        let stream = self.stream().await?;
        Ok(self.read_marker(&stream, partition).await?.position)
    }

    /// Reads the latest snapshot of `partition`: its position and every key's last value. A
    /// chunked value whose parts do not match its manifest is left out (the key is missing).
    pub async fn recover(&self, partition: u32) -> Result<(u64, Vec<Stored>), RuntimeError> {
        let stream = self.stream().await?;
        let position = self.read_marker(&stream, partition).await?.position;
        let prefix = self.entry_prefix(partition);
        let c = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: format!("{prefix}.>"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(RuntimeError::js)?;
        let mut c = c;
        let total = c.info().await.map_err(RuntimeError::js)?.num_pending;
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        let mut chunked = Vec::new();
        let mut seen = 0u64;
        if total > 0 {
            let mut msgs = c
                .stream()
                .max_messages_per_batch(1000)
                .messages()
                .await
                .map_err(RuntimeError::js)?;
            while seen < total {
                let next = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                    .await
                    .map_err(|_| RuntimeError::JetStream("snapshot read timed out".into()))?;
                let Some(m) = next else { break };
                let m = m.map_err(RuntimeError::js)?;
                seen += 1;
                let token = m
                    .subject
                    .as_str()
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if header_u64(m.headers.as_ref(), CHUNKS_HEADER).is_some() {
                    chunked.push((token, m.headers.clone(), m.payload.clone()));
                } else {
                    out.push((token_key(&token), m.payload.clone()));
                }
            }
        }
        for (token, headers, manifest) in chunked {
            // Torn or not, the key has parts to purge when a plain value replaces it.
            if let Ok(mut inner) = self.lock() {
                inner.chunked.insert((partition, token.clone()));
            }
            match self
                .assemble(&stream, partition, &token, headers.as_ref(), &manifest)
                .await?
            {
                Some(v) => out.push((token_key(&token), v)),
                None => {
                    metrics::counter!("kappa_snapshot_torn_total").increment(1);
                    tracing::warn!(
                        partition,
                        key = %token_key(&token),
                        "a chunked snapshot value is torn (a part is gone or does not match); the key is rebuilt from the change log"
                    );
                }
            }
        }
        Ok((position, out))
    }

    /// Spawns the periodic flush; it stops with `shutdown`.
    pub fn spawn_flusher(
        self: &std::sync::Arc<Self>,
        every: Duration,
        shutdown: crate::shutdown::CancellationToken,
    ) {
        let me = self.clone();
        crate::shutdown::every(every, shutdown, move || {
            let me = me.clone();
            async move {
                if let Err(e) = me.flush(None).await {
                    tracing::warn!(error = %e, "snapshot flush failed; will retry");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_subject_tokens() {
        for k in ["s-0001", "a.b", "x y", "~weird*>"] {
            let t = key_token(k);
            assert!(!t.contains('.') && !t.contains(' ') && !t.contains('*'));
            assert_eq!(token_key(&t), k);
        }
    }

    #[test]
    fn generations_are_subject_tokens_and_unique() {
        let (a, b) = (generation(7), generation(7));
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
    }
}
