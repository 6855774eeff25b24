//! Partitioned, ordered input and the processing driver.
//!
//! An input stream is split into `P` partitions by the server itself: the stream's subject
//! transform maps `<prefix>.<id>` to `<prefix>.<partition>.<id>` with `partition(P, 1)`, so
//! producers keep publishing to `<prefix>.<id>` and every entity always lands in one partition.
//!
//! For each partition it owns, a service runs one [`Processor`] under [`run_partition`]:
//! 1. `open` restores the partition's working state and returns its *position*: the last input
//!    stream sequence whose effects are committed (kept atomically with the state);
//! 2. the partition's durable consumer is (re)created to start right after that position, so
//!    redeliveries after a crash can never arrive after newer inputs;
//! 3. batches of whatever is ready are handed to `process`, which computes, publishes its state
//!    changes (awaiting the publish acks), then commits state and position. The consumer takes
//!    no acks (ack policy `none`): the committed position is the only cursor that counts, and a
//!    hole in the delivery numbering (a lost delivery) recreates the consumer at it;
//! 4. a transient failure retries the same batch with backoff (the processor is idempotent by
//!    input sequence); a fence stops the partition; SIGTERM finishes the batch in hand.
//!
//! Under leases the consumer is named by the ownership epoch (`<prefix>-p<partition>-e<epoch>`)
//! and the owner deletes the older epochs' consumers of its partition, so a stale owner that
//! comes back can never take deliveries meant for the new one; and the driver starts no batch
//! and re-creates no consumer once the grant's [`LeaseDeadline`] has passed (self-fencing).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::RuntimeError;
use crate::config::StreamOptions;
pub use crate::lease::LeaseDeadline;
use crate::shutdown::CancellationToken;

/// How long a partition may see no delivery before it checks its consumer for a stall (inputs
/// pending, or delivered past the committed position but never received: a delivery lost on a
/// reconnect, which ack policy `none` never resends). 2 s bounds how late the last input of a
/// burst whose delivery was lost is processed (plus one consumer re-creation), at the cost of
/// one consumer-info request per *idle* partition every 2 s (a busy partition never checks):
/// 4 requests/s for 8 idle partitions, nothing next to a reading's publish, store and delta.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// How long a partition whose consumer seems to have delivered what never arrived waits for
/// it once more before recreating the consumer.
const IDLE_SECOND_LOOK: Duration = Duration::from_millis(500);

/// A partition's durable consumers are removed by the server after this long without a pull
/// (an owner that died or was fenced; the new owner also deletes older epochs' consumers at
/// once). A live owner whose consumer went away meanwhile (a very long retry) re-creates it.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(300);

/// A stream partitioned by its last subject token.
#[derive(Debug, Clone)]
pub struct PartitionedStream {
    /// Stream name, e.g. `READINGS`.
    pub stream: String,
    /// Subject prefix producers publish under, e.g. `thermo.readings`.
    pub prefix: String,
    /// Number of partitions, fixed when the stream is created.
    pub partitions: u32,
}

impl PartitionedStream {
    /// The stream's configuration: subjects `<prefix>.*`, stored as `<prefix>.<p>.<id>`, with
    /// the default [`StreamOptions`] (120 s duplicate window, one replica).
    pub fn stream_config(&self) -> stream::Config {
        self.stream_config_with(StreamOptions::default())
    }

    /// [`PartitionedStream::stream_config`] with `options` (duplicate window, replicas).
    pub fn stream_config_with(&self, options: StreamOptions) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{}.*", self.prefix)],
            subject_transform: Some(stream::SubjectTransform {
                source: format!("{}.*", self.prefix),
                destination: format!(
                    "{}.{{{{partition({},1)}}}}.{{{{wildcard(1)}}}}",
                    self.prefix, self.partitions
                ),
            }),
            duplicate_window: options.duplicate_window,
            allow_direct: true,
            num_replicas: options.replicas,
            ..Default::default()
        }
    }

    /// Declares the stream with the default [`StreamOptions`] and learns the number of
    /// partitions it really has (an existing stream keeps the partition count it was created
    /// with).
    pub async fn declare(&mut self, js: &jetstream::Context) -> Result<(), RuntimeError> {
        self.declare_with(js, StreamOptions::default()).await
    }

    /// [`PartitionedStream::declare`] with `options`: its duplicate window if the stream is
    /// created (an existing stream keeps its own), its replicas (an existing stream with
    /// another count is refused, see [`crate::nats::declare_stream`]).
    pub async fn declare_with(
        &mut self,
        js: &jetstream::Context,
        options: StreamOptions,
    ) -> Result<(), RuntimeError> {
        let mut s = crate::nats::declare_stream(js, self.stream_config_with(options)).await?;
        let info = s.info().await.map_err(RuntimeError::js)?;
        if let Some(p) = info
            .config
            .subject_transform
            .as_ref()
            .and_then(|t| parse_partition_count(&t.destination))
            && p != self.partitions
        {
            tracing::warn!(stream = %self.stream, configured = self.partitions, existing = p,
                "stream exists with another partition count; using the stream's");
            self.partitions = p;
        }
        Ok(())
    }

    /// Filter subject of partition `p`.
    pub fn filter(&self, p: u32) -> String {
        format!("{}.{p}.*", self.prefix)
    }
}

/// The partition the server's subject transform `partition(P, 1)` puts entity `key` in: the
/// FNV-1a (32 bits) hash of the token modulo `partitions`, as nats-server computes it, so a
/// reader can find an entity's partition without a message of it in hand.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// The number of partitions of an existing partitioned stream, from its subject transform.
pub(crate) fn partition_count(config: &stream::Config) -> Option<u32> {
    config
        .subject_transform
        .as_ref()
        .and_then(|t| parse_partition_count(&t.destination))
}

fn parse_partition_count(dest: &str) -> Option<u32> {
    let start = dest.find("partition(")? + "partition(".len();
    let rest = &dest[start..];
    rest[..rest.find(',')?].trim().parse().ok()
}

/// The entity id of a stored subject (its last token).
pub fn entity_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

/// The partition of a stored, partitioned subject `<prefix>.<p>.<id>` (`None` for any other
/// subject).
pub fn partition_of(prefix: &str, stored: &str) -> Option<u32> {
    let rest = stored.strip_prefix(prefix)?.strip_prefix('.')?;
    let (p, id) = rest.split_once('.')?;
    if id.is_empty() || id.contains('.') {
        return None;
    }
    p.parse().ok()
}

/// The original subject of a stored, partitioned subject `<prefix>.<p>.<id>`.
pub fn original_subject(prefix: &str, stored: &str) -> String {
    format!("{prefix}.{}", entity_of(stored))
}

/// One input message as a processor sees it.
#[derive(Debug, Clone)]
pub struct Input {
    /// Stored subject (`<prefix>.<partition>.<id>`).
    pub subject: String,
    /// Payload.
    pub payload: Bytes,
    /// Headers, if any.
    pub headers: Option<HeaderMap>,
    /// Stream sequence.
    pub seq: u64,
    /// When the stream stored it.
    pub published: time::OffsetDateTime,
}

impl Input {
    /// The entity id (last subject token).
    pub fn entity(&self) -> &str {
        entity_of(&self.subject)
    }

    /// What an author's code is told about this input, in `partition`; `subject` is the one
    /// the producer published to (see [`original_subjects`]).
    pub fn context<'a>(&'a self, partition: u32, subject: &'a str) -> crate::compute::Context<'a> {
        crate::compute::Context {
            key: self.entity(),
            seq: self.seq,
            partition,
            subject,
            published: self.published,
            headers: self.headers.as_ref(),
        }
    }
}

/// The subjects a batch's inputs were published to (`<prefix>.<id>`), in order.
pub fn original_subjects(prefix: &str, batch: &[Input]) -> Vec<String> {
    batch
        .iter()
        .map(|i| original_subject(prefix, &i.subject))
        .collect()
}

/// Why a batch could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Infrastructure trouble (NATS, Redis): retry the same batch.
    #[error("transient: {0}")]
    Transient(String),
    /// Another instance owns the partition now: stop processing it.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The working or view store no longer holds what this owner committed there (wiped,
    /// restarted empty, rolled back): reopen the partition, which recovers from the streams.
    #[error("store lost: {0}")]
    StoreLost(String),
}

impl From<RuntimeError> for ProcessError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::Fenced(m) => Self::Fenced(m),
            RuntimeError::StoreLost(m) => Self::StoreLost(m),
            other => Self::Transient(other.to_string()),
        }
    }
}

/// A service's compute for one partition.
pub trait Processor: Send + 'static {
    /// Restores the partition's working state; returns its position (last applied input seq).
    fn open(&mut self, partition: u32) -> impl Future<Output = Result<u64, ProcessError>> + Send;
    /// Processes a batch in order. Must be idempotent by input sequence: a batch may be
    /// handed in again after a transient failure.
    fn process(&mut self, batch: &[Input])
    -> impl Future<Output = Result<(), ProcessError>> + Send;
    /// Receives the fencing epoch of this ownership before `open` (lease revision; 0 when
    /// partitions are assigned statically).
    fn set_epoch(&mut self, _epoch: u64) {}
    /// Receives the ownership's lease deadline before `open`, for a processor that wants to
    /// check it right before it commits (the driver checks it before every batch).
    fn set_lease(&mut self, _lease: LeaseDeadline) {}
    /// Called once when the partition stops (drain or handover): flush what must be flushed.
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Where a partition an instance runs is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionState {
    /// Opening: restoring its working state.
    #[default]
    Recovering,
    /// Processing inputs.
    Running,
    /// Stopped by a handover or shutdown.
    Stopped,
    /// Stopped because a newer owner took it over.
    Fenced,
}

/// What an instance reports about a partition it runs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PartitionStatus {
    /// Where the partition is in its life.
    pub state: PartitionState,
    /// Last input sequence whose effects are committed.
    pub position: u64,
    /// Inputs in the partition not yet delivered to us.
    pub lag: u64,
    /// Seconds the last recovery (`open`) took.
    pub recovery_secs: f64,
    /// Times the store was found lost or rolled back under this partition (each one reopened
    /// it); the partition shows `recovering` while it reopens.
    pub store_lost: u64,
}

/// Shared view of this instance's partitions (for `/healthz`).
pub type PartitionBoard = Arc<RwLock<BTreeMap<u32, PartitionStatus>>>;

/// Settings of the driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The partitioned input.
    pub input: PartitionedStream,
    /// Durable consumer names are `<consumer_prefix>-p<partition>-e<epoch>`.
    pub consumer_prefix: String,
    /// Largest batch handed to a processor.
    pub batch: usize,
    /// How long a partial batch may wait for more inputs before it is processed, when inputs
    /// arrive densely. At high rates batches grow, which costs fewer round trips and wake-ups
    /// per input; at low rates an input that follows a quiet spell never waits.
    pub linger: Linger,
}

/// Longest wait of [`Linger::Auto`].
pub const MAX_AUTO_LINGER: Duration = Duration::from_millis(5);

/// How long a partial batch waits for more inputs, and only while inputs arrive densely: the
/// first input of the batch came within that time of the previous batch's end.
///
/// Why it adapts: a batch of one or two inputs costs nearly what a full one costs in round
/// trips and wake-ups (mostly nats-server's: at 10% of the DAG's maximum every process together
/// spent 8x the CPU per reading of a full-batch drain), so at moderate rates a machine runs out
/// of CPU long before it runs out of throughput, and the latency a user sees is queueing.
/// [`Linger::Auto`] waits as long as the previous batch took to process (at most
/// [`MAX_AUTO_LINGER`]): the wait is a fraction of what one more batch would cost, it grows on
/// its own when the machine is loaded (batches take longer, so more inputs join each one, so
/// each input costs less), and it is never paid after a quiet spell. An earlier fixed 2 ms
/// linger took the machine from 85% to 66% busy at 8,000 readings/s (docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linger {
    /// As long as the previous batch took to process, up to [`MAX_AUTO_LINGER`] (default).
    Auto,
    /// Never: a batch is whatever is ready (lowest latency, most CPU at moderate rates).
    Never,
    /// This long.
    Fixed(Duration),
}

impl Linger {
    /// Parses `auto`, `0` or a number of milliseconds up to 1000 (`KAPPA_LINGER_MS`).
    pub fn parse(s: &str) -> Result<Linger, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Linger::Auto);
        }
        match s.parse::<u64>() {
            Ok(0) => Ok(Linger::Never),
            Ok(ms) if ms <= 1_000 => Ok(Linger::Fixed(Duration::from_millis(ms))),
            _ => Err(format!(
                "'{s}' is not a linger: use auto, 0 or milliseconds up to 1000"
            )),
        }
    }

    /// The wait for a batch after one that took `previous` to process (`None`: no batch yet).
    pub fn window(self, previous: Option<Duration>) -> Duration {
        match self {
            Linger::Never => Duration::ZERO,
            Linger::Fixed(d) => d,
            Linger::Auto => previous.map_or(Duration::ZERO, |d| d.min(MAX_AUTO_LINGER)),
        }
    }
}

fn set_status(board: &PartitionBoard, p: u32, f: impl FnOnce(&mut PartitionStatus)) {
    if let Ok(mut b) = board.write() {
        f(b.entry(p).or_default());
    }
}

/// Runs `processor` on partition `partition` until `shutdown` (or a fence), with a static
/// assignment (epoch 0).
pub async fn run_partition<P: Processor>(
    js: jetstream::Context,
    cfg: DriverConfig,
    partition: u32,
    processor: P,
    shutdown: CancellationToken,
    board: PartitionBoard,
) -> Result<(), RuntimeError> {
    run_partition_at(
        js,
        cfg,
        partition,
        0,
        LeaseDeadline::unbounded(),
        processor,
        shutdown,
        board,
    )
    .await
}

/// Stops the partition if its lease deadline has passed: another instance may own it soon.
fn self_fence(
    lease: &LeaseDeadline,
    partition: u32,
    epoch: u64,
    board: &PartitionBoard,
) -> Result<(), RuntimeError> {
    if !lease.expired() {
        return Ok(());
    }
    tracing::warn!(
        partition,
        epoch,
        "lease expired (not renewed in time); stopping the partition before a new owner starts"
    );
    metrics::counter!("kappa_lease_self_fenced_total").increment(1);
    set_status(board, partition, |s| s.state = PartitionState::Fenced);
    Err(RuntimeError::Fenced(format!(
        "partition {partition}: lease of epoch {epoch} expired"
    )))
}

/// Runs `processor` on partition `partition` under fencing `epoch` until `stop` (handover,
/// lost lease, shutdown), a fence, or `lease`'s deadline.
#[allow(clippy::too_many_arguments)]
pub async fn run_partition_at<P: Processor>(
    js: jetstream::Context,
    cfg: DriverConfig,
    partition: u32,
    epoch: u64,
    lease: LeaseDeadline,
    mut processor: P,
    shutdown: CancellationToken,
    board: PartitionBoard,
) -> Result<(), RuntimeError> {
    processor.set_epoch(epoch);
    processor.set_lease(lease.clone());
    let p_label = partition.to_string();
    let mut position;
    // Reopened when the input stream turns out to have been replaced while running, or when
    // the store turns out to have lost what was committed (`ProcessError::StoreLost`).
    'open: loop {
        set_status(&board, partition, |s| s.state = PartitionState::Recovering);
        let started = Instant::now();
        position = loop {
            self_fence(&lease, partition, epoch, &board)?;
            match processor.open(partition).await {
                Ok(pos) => break pos,
                Err(ProcessError::Fenced(m)) => {
                    set_status(&board, partition, |s| s.state = PartitionState::Fenced);
                    return Err(RuntimeError::Fenced(m));
                }
                Err(ProcessError::Transient(m) | ProcessError::StoreLost(m)) => {
                    tracing::warn!(partition, error = %m, "opening partition failed; retrying");
                    if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                        return Ok(());
                    }
                }
            }
        };
        let recovery = started.elapsed().as_secs_f64();
        metrics::gauge!("kappa_recovery_seconds", "partition" => p_label.clone()).set(recovery);
        tracing::info!(
            partition,
            epoch,
            position,
            recovery_secs = recovery,
            "partition open"
        );
        set_status(&board, partition, |s| {
            s.state = PartitionState::Running;
            s.position = position;
            s.recovery_secs = recovery;
        });
        let identity = stream_identity(&js, &cfg.input.stream)
            .await
            .ok()
            .map(|i| i.0);
        // Inputs processed since the open until the partition first caught up (lag 0): at a
        // takeover, the inputs replayed after the recovered position plus those that queued
        // while the partition had no owner.
        let mut catching_up = Some(0u64);

        'consumer: loop {
            if shutdown.is_cancelled() {
                break;
            }
            // A stale owner (resumed after a pause) must not re-create anything.
            if let Err(e) = self_fence(&lease, partition, epoch, &board) {
                processor.close().await;
                return Err(e);
            }
            let mut consumer = match reset_consumer(&js, &cfg, partition, epoch, position).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "creating consumer failed; retrying");
                    if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            // A consumer is (re)created after every break in delivery, so this is where a stream
            // deleted and created again under the same name shows: its sequences start again, and
            // the position means nothing in it. The processor decides what to do when it reopens.
            if let (Some(id), Ok((now, _))) =
                (identity, stream_identity(&js, &cfg.input.stream).await)
                && now != id
            {
                tracing::error!(partition, stream = %cfg.input.stream,
                "the input stream was replaced while running; reopening the partition");
                metrics::counter!("kappa_input_stream_replaced_total").increment(1);
                continue 'open;
            }
            let messages = match consumer
                .stream()
                .max_messages_per_batch(cfg.batch)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "pull failed; retrying");
                    if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let mut chunks = messages.ready_chunks(cfg.batch);
            // Consumer sequence of the last delivery taken.
            let mut delivered = 0u64;
            let mut last_batch_end: Option<Instant> = None;
            let mut last_batch_took: Option<Duration> = None;
            loop {
                let chunk = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'consumer,
                    c = tokio::time::timeout(IDLE_CHECK, chunks.next()) => match c {
                        Ok(c) => c,
                        Err(_) => {
                            // Nothing delivered for a while: make sure that is because there is
                            // nothing to deliver, not a pull that went astray or a delivery
                            // lost on the way (counted as delivered by the server, never
                            // received here, and never resent with ack policy `none`).
                            match consumer.info().await {
                                Ok(info) => {
                                    let (pending, sent) =
                                        (info.num_pending, info.delivered.stream_sequence);
                                    let Some(why) = idle_stall(pending, sent, position) else {
                                        continue;
                                    };
                                    // Deliveries that reached this client while the info was
                                    // asked for are not lost: look once more before recreating
                                    // (the warning was seen with nothing lost, on a cluster).
                                    match tokio::time::timeout(
                                        IDLE_SECOND_LOOK,
                                        chunks.next(),
                                    )
                                    .await
                                    {
                                        Ok(c) => c,
                                        Err(_) => {
                                            tracing::warn!(partition, pending,
                                                delivered_upto = sent, position,
                                                "{why}; recreating consumer at the position");
                                            metrics::counter!("kappa_consumer_recreated_total")
                                                .increment(1);
                                            continue 'consumer;
                                        }
                                    }
                                }
                                Err(e) if matches!(e.kind(),
                                    ConsumerInfoErrorKind::NotFound
                                    | ConsumerInfoErrorKind::StreamNotFound) => {
                                    tracing::warn!(partition, error = %e,
                                        "the consumer is gone; recreating it");
                                    metrics::counter!("kappa_consumer_recreated_total").increment(1);
                                    continue 'consumer;
                                }
                                Err(e) => {
                                    tracing::debug!(partition, error = %e, "consumer info failed");
                                    continue;
                                }
                            }
                        }
                    },
                };
                let Some(mut chunk) = chunk else {
                    tracing::warn!(partition, "pull stream ended; recreating consumer");
                    continue 'consumer;
                };
                // Linger only while inputs arrive densely (this one came within `linger` of the
                // previous batch's end): at low rates a lone input goes through at once, at high
                // rates batches fill up and cost fewer round trips per input.
                let linger = cfg.linger.window(last_batch_took);
                let dense = last_batch_end.is_some_and(|t: Instant| t.elapsed() < linger);
                if dense && chunk.len() < cfg.batch {
                    let until = tokio::time::Instant::now() + linger;
                    while chunk.len() < cfg.batch {
                        match tokio::time::timeout_at(until, chunks.next()).await {
                            Ok(Some(more)) => chunk.extend(more),
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
                let mut inputs = Vec::with_capacity(chunk.len());
                let mut delivered_any = false;
                let mut lag = 0;
                let mut gap = false;
                for m in chunk {
                    match m {
                        Ok(msg) => {
                            let Ok(info) = msg.info() else { continue };
                            // Deliveries are numbered without holes; a hole means a message was
                            // lost on the way (the consumer does not wait for acks to resend it).
                            if info.consumer_sequence != delivered + 1 {
                                gap = true;
                                break;
                            }
                            delivered = info.consumer_sequence;
                            delivered_any = true;
                            let seq = info.stream_sequence;
                            lag = info.pending;
                            let published = info.published;
                            if seq > position {
                                let (msg, _acker) = msg.split();
                                inputs.push(Input {
                                    subject: msg.subject.to_string(),
                                    payload: msg.payload,
                                    headers: msg.headers,
                                    seq,
                                    published,
                                });
                            }
                        }
                        Err(e) => {
                            tracing::warn!(partition, error = %e, "pull error");
                        }
                    }
                }
                if !delivered_any && !gap {
                    continue;
                }
                if !inputs.is_empty() {
                    let t0 = Instant::now();
                    let mut backoff = Duration::from_millis(50);
                    loop {
                        // Never start a batch (or its retry) past the lease deadline.
                        if let Err(e) = self_fence(&lease, partition, epoch, &board) {
                            processor.close().await;
                            return Err(e);
                        }
                        match processor.process(&inputs).await {
                            Ok(()) => break,
                            Err(ProcessError::Fenced(m)) => {
                                tracing::warn!(partition, reason = %m, "lost the partition; stopping it");
                                set_status(&board, partition, |s| s.state = PartitionState::Fenced);
                                processor.close().await;
                                return Err(RuntimeError::Fenced(m));
                            }
                            Err(ProcessError::StoreLost(m)) => {
                                // Whatever the store lost, the streams still hold: reopening
                                // restores the partition from what the store kept (or from
                                // snapshots) and refolds the rest from the outcome logs, then
                                // delivery restarts after the position the store holds.
                                metrics::counter!("kappa_store_lost_total",
                                    "partition" => p_label.clone())
                                .increment(1);
                                tracing::error!(partition, position, error = %m,
                                    "the store lost what this partition committed; reopening it to recover from the streams");
                                set_status(&board, partition, |s| s.store_lost += 1);
                                continue 'open;
                            }
                            Err(ProcessError::Transient(m)) => {
                                metrics::counter!("kappa_batch_retries_total").increment(1);
                                tracing::warn!(partition, error = %m, "batch failed; retrying");
                                if sleep_or_cancel(backoff, &shutdown).await {
                                    break 'consumer;
                                }
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                    let now = time::OffsetDateTime::now_utc();
                    last_batch_took = Some(t0.elapsed());
                    let elapsed = t0.elapsed().as_secs_f64();
                    metrics::histogram!("kappa_batch_seconds").record(elapsed);
                    metrics::histogram!("kappa_batch_size").record(inputs.len() as f64);
                    metrics::counter!("kappa_processed_total").increment(inputs.len() as u64);
                    if let Some(first) = inputs.first() {
                        let age = (now - first.published).as_seconds_f64().max(0.0);
                        metrics::histogram!("kappa_input_age_seconds").record(age);
                    }
                    position = inputs.last().map_or(position, |i| i.seq);
                    if let Some(n) = catching_up.as_mut() {
                        *n += inputs.len() as u64;
                    }
                }
                if lag == 0
                    && !gap
                    && let Some(n) = catching_up.take()
                {
                    let secs = started.elapsed().as_secs_f64();
                    metrics::gauge!("kappa_takeover_replayed_inputs", "partition" => p_label.clone())
                        .set(n as f64);
                    metrics::gauge!("kappa_takeover_seconds", "partition" => p_label.clone())
                        .set(secs);
                    tracing::info!(
                        partition,
                        epoch,
                        replayed = n,
                        takeover_secs = secs,
                        "partition caught up"
                    );
                }
                metrics::gauge!("kappa_partition_lag", "partition" => p_label.clone())
                    .set(lag as f64);
                metrics::gauge!("kappa_partition_position", "partition" => p_label.clone())
                    .set(position as f64);
                set_status(&board, partition, |s| {
                    s.position = position;
                    s.lag = lag;
                });
                last_batch_end = Some(Instant::now());
                if gap {
                    tracing::warn!(
                        partition,
                        position,
                        "a delivery was lost; recreating consumer"
                    );
                    metrics::counter!("kappa_consumer_recreated_total").increment(1);
                    continue 'consumer;
                }
            }
        }
        break 'open;
    }
    processor.close().await;
    set_status(&board, partition, |s| s.state = PartitionState::Stopped);
    tracing::info!(partition, position, "partition stopped");
    Ok(())
}

/// A stream's identity (its creation time, ns since the epoch: a stream deleted and created
/// again under the same name has another) and its last sequence.
pub async fn stream_identity(
    js: &jetstream::Context,
    stream: &str,
) -> Result<(u64, u64), RuntimeError> {
    let s = js.get_stream(stream).await.map_err(RuntimeError::js)?;
    let info = s.cached_info();
    let created = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
    Ok((created, info.state.last_sequence))
}

/// Why an idle partition's consumer must be re-created, if it must: inputs pending that never
/// came, or the consumer says it delivered past the committed `position` what never arrived.
fn idle_stall(pending: u64, delivered_upto: u64, position: u64) -> Option<&'static str> {
    if pending > 0 {
        Some("no delivery although inputs are pending")
    } else if delivered_upto > position {
        Some("inputs were delivered past the committed position but never received")
    } else {
        None
    }
}

/// The durable consumer of `partition` under ownership `epoch`.
fn consumer_name(prefix: &str, partition: u32, epoch: u64) -> String {
    format!("{prefix}-p{partition}-e{epoch}")
}

/// True if `name` is a consumer of `partition` of an ownership older than `epoch` (or of the
/// unversioned name `<prefix>-p<partition>` that came before epochs were in names).
fn is_older_consumer(name: &str, prefix: &str, partition: u32, epoch: u64) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix("-p")) else {
        return false;
    };
    let (p, e) = match rest.split_once("-e") {
        Some((p, e)) => match e.parse::<u64>() {
            Ok(e) => (p, Some(e)),
            Err(_) => return false,
        },
        None => (rest, None),
    };
    p.parse::<u32>() == Ok(partition) && e.is_none_or(|e| e < epoch)
}

/// Deletes and recreates the partition's durable consumer so delivery starts right after
/// `position`, whatever an earlier owner left pending; deletes the consumers of older epochs.
async fn reset_consumer(
    js: &jetstream::Context,
    cfg: &DriverConfig,
    partition: u32,
    epoch: u64,
    position: u64,
) -> Result<consumer::PullConsumer, RuntimeError> {
    let stream = js
        .get_stream_no_info(&cfg.input.stream)
        .await
        .map_err(RuntimeError::js)?;
    let name = consumer_name(&cfg.consumer_prefix, partition, epoch);
    // Older owners' consumers: a stale owner's pull must end now, not when it times out.
    let names: Vec<Result<String, String>> = stream
        .consumer_names()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
        .await;
    for old in names.into_iter().flatten() {
        if is_older_consumer(&old, &cfg.consumer_prefix, partition, epoch) {
            match stream.delete_consumer(&old).await {
                Ok(_) => {
                    tracing::info!(partition, consumer = %old, "deleted an older owner's consumer")
                }
                Err(e) => tracing::warn!(partition, consumer = %old, error = %e,
                    "deleting an older owner's consumer failed (it expires when inactive)"),
            }
        }
    }
    // Missing is fine: the point is that no stale cursor survives.
    let _ = stream.delete_consumer(&name).await;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("partition {partition} of {}", cfg.input.stream)),
            filter_subject: cfg.input.filter(partition),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: position + 1,
            },
            // No acks: the position that matters is the one committed with the state, and the
            // consumer is recreated there whenever the partition opens or a delivery is lost.
            // (An ack per batch was one more message per reading for nats-server when batches
            // are small, that is at every rate below saturation.)
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: CONSUMER_INACTIVE,
            ..Default::default()
        })
        .await
        .map_err(|e| RuntimeError::JetStream(format!("create consumer {name}: {e}")))
}

/// Sleeps, returning true early if shutdown was requested.
pub async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_config_maps_to_partitions() {
        let s = PartitionedStream {
            stream: "READINGS".into(),
            prefix: "thermo.readings".into(),
            partitions: 8,
        };
        let c = s.stream_config();
        let t = c.subject_transform.expect("transform");
        assert_eq!(
            t.destination,
            "thermo.readings.{{partition(8,1)}}.{{wildcard(1)}}"
        );
        assert_eq!(parse_partition_count(&t.destination), Some(8));
        assert_eq!(s.filter(3), "thermo.readings.3.*");
        assert_eq!(entity_of("thermo.readings.3.s-1"), "s-1");
        assert_eq!(
            original_subject("thermo.readings", "thermo.readings.3.s-1"),
            "thermo.readings.s-1"
        );
    }

    #[test]
    fn linger_parses_and_adapts_to_the_previous_batch() {
        assert_eq!(Linger::parse("auto"), Ok(Linger::Auto));
        assert_eq!(Linger::parse(" AUTO "), Ok(Linger::Auto));
        assert_eq!(Linger::parse("0"), Ok(Linger::Never));
        assert_eq!(
            Linger::parse("2"),
            Ok(Linger::Fixed(Duration::from_millis(2)))
        );
        for bad in ["", "-1", "1001", "2ms", "soon"] {
            let e = Linger::parse(bad).expect_err(bad);
            assert!(e.contains("auto, 0 or milliseconds"), "{bad}: {e}");
        }
        let ms = Duration::from_millis;
        // Auto: never before a first batch, the previous batch's time, capped.
        assert_eq!(Linger::Auto.window(None), Duration::ZERO);
        assert_eq!(Linger::Auto.window(Some(ms(1))), ms(1));
        assert_eq!(Linger::Auto.window(Some(ms(40))), MAX_AUTO_LINGER);
        assert_eq!(Linger::Never.window(Some(ms(3))), Duration::ZERO);
        assert_eq!(Linger::Fixed(ms(7)).window(Some(ms(1))), ms(7));
    }

    #[test]
    fn idle_stall_compares_deliveries_with_the_position() {
        assert_eq!(idle_stall(0, 10, 10), None);
        assert!(idle_stall(3, 10, 10).is_some());
        // Delivered up to 12 but committed 10, nothing in flight: 11 and 12 were lost.
        assert!(idle_stall(0, 12, 10).is_some());
        // A fresh consumer at the position has delivered nothing yet.
        assert_eq!(idle_stall(0, 0, 10), None);
    }

    #[test]
    fn consumers_are_named_by_epoch_and_older_ones_recognised() {
        assert_eq!(consumer_name("td", 3, 7), "td-p3-e7");
        assert!(is_older_consumer("td-p3-e6", "td", 3, 7));
        assert!(
            is_older_consumer("td-p3", "td", 3, 7),
            "the unversioned name"
        );
        assert!(!is_older_consumer("td-p3-e7", "td", 3, 7), "its own");
        assert!(
            !is_older_consumer("td-p3-e8", "td", 3, 7),
            "a newer owner's"
        );
        assert!(
            !is_older_consumer("td-p30-e1", "td", 3, 7),
            "another partition"
        );
        assert!(
            !is_older_consumer("td-x-p3-e1", "td", 3, 7),
            "another service"
        );
        assert!(!is_older_consumer("td-p3-eX", "td", 3, 7));
        assert!(!is_older_consumer("view-builder-p3-e1", "td", 3, 7));
    }

    #[test]
    fn partition_from_stored_subject() {
        assert_eq!(
            partition_of("thermo.deltas", "thermo.deltas.3.s-1"),
            Some(3)
        );
        assert_eq!(partition_of("thermo.deltas", "thermo.deltas.s-1"), None);
        assert_eq!(partition_of("thermo.deltas", "thermo.deltas.x.s-1"), None);
        assert_eq!(partition_of("thermo.deltas", "thermo.readings.3.s-1"), None);
    }
}
