//! temperature-delta: the reference domain kappa service. It owns each sensor's window of
//! recent readings ([`thermo_domain::DeltaWindow`]); only its compute changes those windows, and
//! every change (one per accepted reading) is appended to the `DELTAS` stream.
//!
//! Per partition batch ([`DeltaProcessor::process`]): validate → look the sensor up in the
//! observed registry → fold the reading into its window → publish the delta (`Nats-Msg-Id`
//! derived from the input sequence) or dead-letter the reading with a reason → await the acks →
//! commit the changed windows with the partition position (working state) → the driver acks.
//! If anything fails the in-memory windows are dropped and the batch is redone from committed
//! state; a delta already in the stream (from before a crash) is recognised by its source
//! sequence and never published twice.

pub mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use futures::future::join_all;
use kappa_runtime::RuntimeError;
use kappa_runtime::dlq::DeadLetters;
use kappa_runtime::observed::{ObservedError, ObservedState};
use kappa_runtime::partition::{Input, PartitionedStream, ProcessError, Processor};
use kappa_runtime::working::WorkingState;
use thermo_domain::ObservedSensor;
use thermo_domain::{
    Delta, DeltaWindow, RejectReason, Sample, WindowOutcome, parse_reading, streams, subjects,
};

pub use config::{Config, Ownership};

/// Header naming the schema of a delta.
pub const SCHEMA_HEADER: &str = "Kappa-Schema";
/// Schema of deltas published by this version.
pub const DELTA_SCHEMA: &str = "thermo.delta/1";

/// The readings stream, partitioned by sensor.
pub fn readings_stream(partitions: u32) -> PartitionedStream {
    PartitionedStream {
        stream: streams::READINGS.into(),
        prefix: subjects::READINGS_PREFIX.into(),
        partitions,
    }
}

/// The deltas stream, partitioned by sensor the same way.
pub fn deltas_stream(partitions: u32) -> PartitionedStream {
    PartitionedStream {
        stream: streams::DELTAS.into(),
        prefix: subjects::DELTAS_PREFIX.into(),
        partitions,
    }
}

/// One sensor's working state as this partition holds it.
struct Slot {
    window: DeltaWindow,
    /// Source sequence of the last delta of this sensor already in `DELTAS`.
    published_upto: u64,
    /// Stream sequence of that delta (0 if none): the next delta must follow it exactly.
    last_out_seq: u64,
    dirty: bool,
}

/// What a processor shares with its siblings.
#[derive(Clone)]
pub struct Shared {
    /// JetStream context for publishing.
    pub js: jetstream::Context,
    /// Dead letters.
    pub dlq: DeadLetters,
    /// The registry, observed.
    pub observed: Arc<dyn ObservedState<ObservedSensor>>,
    /// Working state.
    pub working: Arc<dyn WorkingState>,
}

/// The compute of one partition.
pub struct DeltaProcessor {
    shared: Shared,
    partition: u32,
    epoch: u64,
    slots: HashMap<String, Slot>,
}

#[derive(serde::Deserialize)]
struct SourceSeq {
    source_seq: u64,
}

impl DeltaProcessor {
    /// A processor for `partition`.
    pub fn new(shared: Shared, partition: u32) -> Self {
        Self {
            shared,
            partition,
            epoch: 0,
            slots: HashMap::new(),
        }
    }

    /// Loads the windows of `ids` not yet held, and what the deltas stream already holds for
    /// them.
    async fn load_slots(&mut self, ids: Vec<String>) -> Result<(), ProcessError> {
        if ids.is_empty() {
            return Ok(());
        }
        let values = self.shared.working.load(self.partition, &ids).await?;
        let deltas = self
            .shared
            .js
            .get_stream_no_info(streams::DELTAS)
            .await
            .map_err(|e| ProcessError::Transient(e.to_string()))?;
        let lasts = join_all(ids.iter().map(|id| {
            let deltas = &deltas;
            async move {
                let subject = format!("{}.*.{id}", subjects::DELTAS_PREFIX);
                match deltas.direct_get_last_for_subject(subject).await {
                    Ok(m) => Ok((
                        serde_json::from_slice::<SourceSeq>(&m.payload)
                            .map(|s| s.source_seq)
                            .unwrap_or(0),
                        m.sequence,
                    )),
                    Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                        Ok((0, 0))
                    }
                    Err(e) => Err(ProcessError::Transient(format!("last delta of {id}: {e}"))),
                }
            }
        }))
        .await;
        for ((id, value), last) in ids.into_iter().zip(values).zip(lasts) {
            let (published_upto, last_out_seq) = last?;
            let window = match value {
                Some(bytes) => DeltaWindow::decode(&bytes).ok_or_else(|| {
                    ProcessError::Transient(format!("stored window of {id} is undecodable"))
                })?,
                None => DeltaWindow::new(),
            };
            self.slots.insert(
                id,
                Slot {
                    window,
                    published_upto,
                    last_out_seq,
                    dirty: false,
                },
            );
        }
        Ok(())
    }

    async fn process_inner(&mut self, batch: &[Input]) -> Result<(), ProcessError> {
        // 1. Decode and validate everything; find the sensors to load.
        let parsed: Vec<_> = batch
            .iter()
            .map(|i| parse_reading(&i.payload, Some(i.entity())))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<String> = parsed
            .iter()
            .flatten()
            .filter(|r| !self.slots.contains_key(&r.sensor_id) && seen.insert(&r.sensor_id))
            .map(|r| r.sensor_id.clone())
            .collect();
        self.load_slots(missing).await?;
        // Sensors whose window this batch changed, in first-touch order.
        let mut touched: Vec<String> = Vec::new();

        // 2. Compute, publishing as we go (acks awaited below).
        let mut sensors: HashMap<String, Result<Option<Arc<ObservedSensor>>, ObservedError>> =
            HashMap::new();
        let mut acks: Vec<PublishAckFuture> = Vec::new();
        let mut outputs: Vec<(String, Bytes, u64)> = Vec::with_capacity(batch.len());
        let mut replayed = 0u64;
        for (input, parsed) in batch.iter().zip(parsed) {
            let reading = match parsed {
                Ok(r) => r,
                Err(reason) => {
                    acks.push(self.reject(input, &reason).await?);
                    continue;
                }
            };
            if !sensors.contains_key(&reading.sensor_id) {
                let s = self.shared.observed.get(&reading.sensor_id).await;
                sensors.insert(reading.sensor_id.clone(), s);
            }
            let sensor = match sensors.get(&reading.sensor_id) {
                Some(Ok(Some(s))) => s.clone(),
                Some(Ok(None)) | None => {
                    acks.push(self.reject(input, &RejectReason::UnknownSensor).await?);
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(sensor = %reading.sensor_id, error = %e, "registry lookup failed");
                    acks.push(
                        self.reject(input, &RejectReason::RegistryUnavailable)
                            .await?,
                    );
                    continue;
                }
            };
            let sensor = &sensor.0;
            let Some(slot) = self.slots.get_mut(&reading.sensor_id) else {
                return Err(ProcessError::Transient("window not loaded".into()));
            };
            let at_ns =
                i64::try_from(reading.measured_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
            let calibrated = reading.celsius + sensor.calibration_offset;
            let sample = Sample {
                at_ns,
                celsius: calibrated,
                seq: input.seq,
            };
            match slot.window.apply(sample, sensor.window_secs) {
                WindowOutcome::AlreadyApplied => replayed += 1,
                WindowOutcome::Late => {
                    if !std::mem::replace(&mut slot.dirty, true) {
                        touched.push(reading.sensor_id.clone());
                    }
                    acks.push(self.reject(input, &RejectReason::Late).await?);
                }
                WindowOutcome::Accepted(stats) => {
                    if !std::mem::replace(&mut slot.dirty, true) {
                        touched.push(reading.sensor_id.clone());
                    }
                    if input.seq <= slot.published_upto {
                        // Published before a crash: the state catches up, the stream has it.
                        replayed += 1;
                        continue;
                    }
                    let delta = Delta {
                        sensor_id: reading.sensor_id.clone(),
                        site: sensor.site.clone(),
                        delta_celsius: stats.delta,
                        oldest_celsius: stats.oldest,
                        latest_celsius: stats.latest,
                        min_celsius: stats.min,
                        max_celsius: stats.max,
                        samples: stats.samples,
                        window_secs: sensor.window_secs,
                        measured_at: reading.measured_at,
                        window_end: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                            stats.window_end_ns,
                        ))
                        .unwrap_or(reading.measured_at),
                        reading_celsius: calibrated,
                        calibration_offset: sensor.calibration_offset,
                        sensor_version: sensor.version,
                        source_seq: input.seq,
                    };
                    let body = serde_json::to_vec(&delta)
                        .map_err(|e| ProcessError::Transient(e.to_string()))?;
                    outputs.push((reading.sensor_id.clone(), Bytes::from(body), input.seq));
                }
            }
        }
        if replayed > 0 {
            metrics::counter!("kappa_replayed_inputs_total").increment(replayed);
        }

        // 3. Every effect is in a stream before the state moves.
        self.publish_fenced(outputs).await?;
        // Acks come back in publish order; awaiting them in turn costs one wait in all.
        for ack in acks {
            ack.await
                .map_err(|e| ProcessError::Transient(format!("publish ack: {e}")))?;
        }

        // 4. Commit changed windows with the position.
        let writes: Vec<_> = touched
            .iter()
            .filter_map(|id| {
                let slot = self.slots.get(id)?;
                Some((id.clone(), Bytes::from(slot.window.encode())))
            })
            .collect();
        let position = batch.last().map_or(0, |i| i.seq);
        self.shared
            .working
            .commit(self.partition, self.epoch, position, writes)
            .await?;
        for id in &touched {
            if let Some(slot) = self.slots.get_mut(id) {
                slot.dirty = false;
                slot.published_upto = slot.published_upto.max(slot.window.last_seq());
            }
        }
        Ok(())
    }

    /// Publishes deltas so that each one must directly follow the sensor's previous delta in
    /// the stream (`Nats-Expected-Last-Subject-Sequence`): a stale owner can never append after
    /// a newer one. Deltas of different sensors are pipelined; a sensor's next delta waits for
    /// the previous one's ack (one wave per delta of the busiest sensor in the batch).
    async fn publish_fenced(
        &mut self,
        outputs: Vec<(String, Bytes, u64)>,
    ) -> Result<(), ProcessError> {
        let mut waves: Vec<Vec<(String, Bytes, u64)>> = Vec::new();
        let mut depth: HashMap<&str, usize> = HashMap::new();
        let mut placed: Vec<usize> = Vec::with_capacity(outputs.len());
        for (id, _, _) in &outputs {
            let d = depth.entry(id.as_str()).or_insert(0);
            placed.push(*d);
            *d += 1;
        }
        drop(depth);
        for (out, wave) in outputs.into_iter().zip(placed) {
            if waves.len() <= wave {
                waves.resize_with(wave + 1, Vec::new);
            }
            waves[wave].push(out);
        }
        for wave in waves {
            let mut pending = Vec::with_capacity(wave.len());
            for (id, body, seq) in wave {
                let expected = self.slots.get(&id).map_or(0, |s| s.last_out_seq);
                let msg = PublishMessage::build()
                    .payload(body)
                    .message_id(format!("delta:{seq}"))
                    .expected_last_subject_sequence(expected)
                    .header(SCHEMA_HEADER, DELTA_SCHEMA)
                    .header("Kappa-Source-Seq", seq.to_string().as_str());
                let ack = self
                    .shared
                    .js
                    .send_publish(subjects::delta(&id), msg)
                    .await
                    .map_err(|e| ProcessError::Transient(format!("publish delta: {e}")))?;
                pending.push((id, ack));
            }
            for (id, ack) in pending {
                match ack.await {
                    Ok(a) => {
                        if let Some(slot) = self.slots.get_mut(&id) {
                            slot.last_out_seq = a.sequence;
                        }
                        metrics::counter!("thermo_deltas_total").increment(1);
                    }
                    Err(e)
                        if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
                    {
                        metrics::counter!("kappa_fenced_publishes_total").increment(1);
                        return Err(ProcessError::Transient(format!(
                            "delta of {id} does not follow the stream's last one (another writer?)"
                        )));
                    }
                    Err(e) => return Err(ProcessError::Transient(format!("publish ack: {e}"))),
                }
            }
        }
        Ok(())
    }

    async fn reject(
        &self,
        input: &Input,
        reason: &RejectReason,
    ) -> Result<PublishAckFuture, ProcessError> {
        let subject =
            kappa_runtime::partition::original_subject(subjects::READINGS_PREFIX, &input.subject);
        self.shared
            .dlq
            .reject(
                &subject,
                input.seq,
                input.payload.clone(),
                reason.code(),
                reason.detail(),
            )
            .await
            .map_err(ProcessError::from)
    }
}

impl Processor for DeltaProcessor {
    fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    async fn open(&mut self, partition: u32) -> Result<u64, ProcessError> {
        self.partition = partition;
        self.slots.clear();
        Ok(self.shared.working.open(partition, self.epoch).await?)
    }

    async fn process(&mut self, batch: &[Input]) -> Result<(), ProcessError> {
        let r = self.process_inner(batch).await;
        if r.is_err() {
            // Uncommitted changes are gone; the retry recomputes from committed state.
            self.slots.clear();
        }
        r
    }

    async fn close(&mut self) {
        if let Err(e) = self.shared.working.close(self.partition).await {
            tracing::warn!(partition = self.partition, error = %e, "closing working state failed");
        }
        self.slots.clear();
    }
}

/// Builds the working-state option chosen in `cfg`.
pub async fn working_state(
    cfg: &Config,
    js: &jetstream::Context,
    shutdown: &kappa_runtime::shutdown::CancellationToken,
) -> Result<Arc<dyn WorkingState>, RuntimeError> {
    use kappa_runtime::config::WorkingMode;
    use kappa_runtime::working::{affinity, local, remote, snapshot::Snapshotter};
    const NS: &str = "temperature-delta";
    let snapshots = || async {
        let s = Arc::new(Snapshotter::new(js.clone(), NS).await?);
        s.spawn_flusher(
            Duration::from_secs(cfg.snapshot_interval_secs.max(1)),
            shutdown.clone(),
        );
        Ok::<_, RuntimeError>(s)
    };
    Ok(match cfg.working {
        WorkingMode::Local => Arc::new(local::LocalState::new(snapshots().await?)),
        WorkingMode::Remote => {
            let conn = remote::connect(&cfg.redis_url, "REDIS_URL").await?;
            Arc::new(remote::RedisState::new(conn, NS, "remote"))
        }
        WorkingMode::Affinity => {
            let url = cfg.affinity_redis_url.as_deref().ok_or_else(|| {
                RuntimeError::Config("KAPPA_WORKING=affinity needs AFFINITY_REDIS_URL".into())
            })?;
            let conn = remote::connect(url, "AFFINITY_REDIS_URL").await?;
            Arc::new(affinity::AffinityState::new(
                remote::RedisState::new(conn, NS, "affinity"),
                snapshots().await?,
            ))
        }
    })
}

/// Runs the service until SIGTERM, then drains.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    let svc = kappa_runtime::app::Service::start("temperature-delta", &cfg.nats).await?;
    let js = svc.nats.js.clone();
    let working = working_state(&cfg, &js, &svc.shutdown).await?;
    let mut readings = readings_stream(cfg.partitions);
    readings.declare(&js).await?;
    deltas_stream(cfg.partitions).declare(&js).await?;
    kappa_runtime::nats::declare_stream(&js, sensor_registry::stream_config()).await?;
    let observed = kappa_runtime::observed::build::<ObservedSensor>(
        cfg.observed,
        &svc.nats,
        sensor_registry::observed_source(Duration::from_millis(cfg.registry_timeout_ms)),
        kappa_runtime::observed::semi_stateless::CacheConfig {
            max_entries: cfg.cache_max_entries,
            ttl: Duration::from_secs(cfg.cache_ttl_secs),
        },
        svc.shutdown.clone(),
    )
    .await?;

    let board = kappa_runtime::partition::PartitionBoard::default();
    let owned: Vec<u32> = cfg.owned_partitions(readings.partitions);
    let owned_set = std::sync::Arc::new(std::sync::RwLock::new(std::collections::BTreeSet::new()));
    {
        let o = observed.clone();
        svc.health.register(
            "observed",
            Arc::new(move || {
                (
                    o.ready(),
                    serde_json::json!({"kind": o.kind(), "held": o.held()}),
                )
            }),
        );
        let b = board.clone();
        let expected = match cfg.ownership {
            Ownership::Static => Some(owned.len()),
            Ownership::Leases => None,
        };
        svc.health.register(
            "partitions",
            Arc::new(move || {
                let b = b.read().map(|b| b.clone()).unwrap_or_default();
                let running = b.values().filter(|s| s.state == "running").count();
                let ready = match expected {
                    Some(n) => running == n,
                    None => running == b.len(),
                };
                (ready, serde_json::to_value(&b).unwrap_or_default())
            }),
        );
        let kind = working.kind();
        svc.health.register(
            "working",
            Arc::new(move || (true, serde_json::json!({"kind": kind}))),
        );
    }
    let http = svc.serve_http(cfg.http_addr, axum::Router::new()).await?;
    tracing::info!(observed = %cfg.observed, working = %cfg.working, partitions = ?owned, "temperature-delta starting");

    let shared = Shared {
        js: js.clone(),
        dlq: DeadLetters::new(js.clone(), "temperature-delta"),
        observed,
        working,
    };
    let driver = kappa_runtime::partition::DriverConfig {
        input: readings,
        consumer_prefix: "temperature-delta".into(),
        batch: cfg.batch,
        linger: Duration::from_millis(cfg.linger_ms),
    };
    match cfg.ownership {
        Ownership::Static => {
            let tasks: Vec<_> = owned
                .into_iter()
                .map(|p| {
                    tokio::spawn(kappa_runtime::partition::run_partition(
                        js.clone(),
                        driver.clone(),
                        p,
                        DeltaProcessor::new(shared.clone(), p),
                        svc.shutdown.clone(),
                        board.clone(),
                    ))
                })
                .collect();
            for t in join_all(tasks).await {
                match t {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "partition ended"),
                    Err(e) => tracing::error!(error = %e, "partition task failed"),
                }
            }
        }
        Ownership::Leases => {
            let lease = kappa_runtime::lease::LeaseConfig {
                service: "temperature-delta".into(),
                partitions: driver.input.partitions,
                ttl: Duration::from_secs(cfg.lease_ttl_secs.max(1)),
            };
            let start = |g: kappa_runtime::lease::Grant| {
                let (js, driver, shared, board) =
                    (js.clone(), driver.clone(), shared.clone(), board.clone());
                tokio::spawn(async move {
                    let p = g.partition;
                    let r = kappa_runtime::partition::run_partition_at(
                        js,
                        driver,
                        p,
                        g.epoch,
                        DeltaProcessor::new(shared, p),
                        g.stop,
                        board.clone(),
                    )
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(partition = p, error = %e, "partition ended");
                    }
                    if let Ok(mut b) = board.write() {
                        b.remove(&p);
                    }
                })
            };
            kappa_runtime::lease::keep(js.clone(), lease, svc.shutdown.clone(), owned_set, start)
                .await?;
        }
    }
    svc.shutdown.cancel();
    svc.drain().await;
    let _ = http.await;
    Ok(())
}
