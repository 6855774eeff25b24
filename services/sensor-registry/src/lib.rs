//! sensor-registry: the domain kappa service that owns sensor metadata (site, calibration
//! offset, window). Commands arrive by request-reply; every accepted change is appended to the
//! `SENSORS` stream, which is also where the registry's own state is recovered from at start.
//!
//! # Writing: the runtime's change log
//!
//! Every change goes through [`kappa_runtime::changelog::EntityLog::append`] on
//! `registry.sensors.<id>`, with the runtime's headers (`Kappa-Service`, `Kappa-Source-Seq`) and
//! `Kappa-Schema: thermo.sensor/1`:
//! - *fenced*: `Nats-Expected-Last-Subject-Sequence` is the stream sequence of the sensor's
//!   last change this instance knows, so two registry instances (or a stale one) can never both
//!   apply a change to one sensor; the loser re-reads the sensor and decides again (a version
//!   conflict when the command names `expected_version`);
//! - *no input sequence*: commands come by request-reply, not from a stream, so what `append`
//!   records as the input position (`Kappa-Source-Seq`) is the sensor's **new version**: per
//!   sensor it grows by one with every change, which is what the header is read for (up to which
//!   decision a log holds the outcomes);
//! - *deduplicated by content*: `Nats-Msg-Id` is `sensor:<id>:v<N>:<hash of the change>`. A
//!   retry of the same change is stored once; two *different* changes racing for version `N`
//!   have different ids and meet the fence. With an id of `sensor:<id>:v<N>` alone they did not
//!   on a replicated stream, which checks duplicates before the fence: the loser got a duplicate
//!   ack, answered `ok` and served a change that was never stored (a lost update). A duplicate
//!   ack is still verified against the stored message before it counts as success.
//!
//! # Commands in flight
//!
//! Up to [`UPSERTS_IN_FLIGHT`] commands run at once: commands for different sensors
//! concurrently, those for one sensor one after the other in the order they arrived (so a
//! client's `expected_version` 1, 2, 3 applies as sent).
//!
//! # Reading: the runtime's change feed
//!
//! The registry's own state is recovered at start from `SENSORS` by a
//! [`Feed`] (last change per sensor; ready once caught up) that then
//! keeps following it, so changes made by other instances are seen. If the feed has to replay
//! (the stream was truncated or recreated), the state is rebuilt from what the stream holds.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kappa_runtime::app::Service;
use kappa_runtime::changelog::{EntityLog, Layout, SCHEMA_HEADER, is_conflict};
use kappa_runtime::config::NatsArgs;
use kappa_runtime::feed::{Change, Feed, FeedConfig, FeedHandler, Gap, Start};
use thermo_domain::{Sensor, SensorUpsert, UpsertReply, streams, subjects};

/// The service's name (`Kappa-Service` header, NATS client name, queue group).
pub const SERVICE: &str = "sensor-registry";
/// Schema of the changes published by this version (`Kappa-Schema` header).
pub const SCHEMA: &str = "thermo.sensor/1";

/// Configuration (flags and environment).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Health and metrics listener.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9102",
          value_parser = kappa_runtime::config::parse_listen_addr)]
    pub http_addr: SocketAddr,
}

#[derive(Clone)]
struct Entry {
    sensor: Sensor,
    subject_seq: u64,
}

/// The registry's state: sensors by id, with the stream sequence of their last change.
#[derive(Clone, Default)]
pub struct Registry {
    sensors: Arc<RwLock<HashMap<String, Entry>>>,
}

impl Registry {
    fn get(&self, id: &str) -> Option<Entry> {
        self.sensors.read().ok()?.get(id).cloned()
    }

    /// Applies a sensor's change stored at stream sequence `seq`, unless a later one is
    /// already applied (changes arrive both from this instance's acks and from the feed).
    fn apply(&self, sensor: Sensor, seq: u64) {
        if let Ok(mut m) = self.sensors.write() {
            let newer = m.get(&sensor.sensor_id).is_none_or(|e| e.subject_seq < seq);
            if newer {
                m.insert(
                    sensor.sensor_id.clone(),
                    Entry {
                        sensor,
                        subject_seq: seq,
                    },
                );
            }
        }
    }

    fn clear(&self) {
        if let Ok(mut m) = self.sensors.write() {
            m.clear();
        }
    }

    /// Number of sensors known.
    pub fn len(&self) -> usize {
        self.sensors.read().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no sensor is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `SENSORS` stream's configuration with one replica (every change kept, last per subject
/// readable); the stream itself is part of the wire contract,
/// [`thermo_domain::runtime::sensors_stream`].
pub fn stream_config() -> stream::Config {
    thermo_domain::runtime::sensors_stream().stream_config()
}

/// The registry's change log: `registry.sensors.<id>` in `SENSORS`.
pub fn change_log(js: jetstream::Context) -> EntityLog {
    EntityLog::new(
        js,
        streams::SENSORS,
        subjects::SENSORS_PREFIX,
        Layout::Flat,
        SERVICE,
    )
}

/// Applies the stream's changes to the registry (its own and other instances').
struct Follow {
    registry: Registry,
}

impl FeedHandler for Follow {
    async fn apply(&mut self, change: Change) {
        match serde_json::from_slice::<Sensor>(&change.payload) {
            Ok(s) if s.sensor_id == change.key() => self.registry.apply(s, change.stream_seq),
            Ok(_) => {
                tracing::warn!(subject = %change.subject, "sensor change for another id ignored")
            }
            Err(e) => {
                tracing::warn!(subject = %change.subject, error = %e, "undecodable sensor change")
            }
        }
    }

    async fn gap(&mut self, gap: Gap) {
        if gap.replay {
            tracing::warn!(cause = %gap.cause, "registry stream replays; rebuilding the state from it");
            self.registry.clear();
        }
    }
}

/// Starts following `SENSORS` into `registry` and returns once caught up, so changes made by
/// another instance keep being seen.
async fn recover_and_follow(
    nats: &kappa_runtime::nats::Nats,
    registry: Registry,
    shutdown: kappa_runtime::shutdown::CancellationToken,
) -> Result<Feed, kappa_runtime::RuntimeError> {
    let cfg = FeedConfig::new(
        streams::SENSORS,
        format!("{}.>", subjects::SENSORS_PREFIX),
        Start::LastPerSubject,
    );
    let feed = Feed::start(nats, cfg, Follow { registry }, shutdown);
    feed.caught_up().await?;
    Ok(feed)
}

/// `Nats-Msg-Id` of a change: the sensor, its new version and a hash of the stored bytes, so
/// only a retry of the same change is a duplicate (FNV-1a, stable across builds).
fn change_id(sensor: &Sensor, body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!(
        "sensor:{}:v{}:{hash:016x}",
        sensor.sensor_id, sensor.version
    )
}

/// True if the stream holds exactly `body` for the sensor at `seq`.
async fn stored_at(js: &jetstream::Context, id: &str, seq: u64, body: &[u8]) -> bool {
    let Ok(stream) = js.get_stream_no_info(streams::SENSORS).await else {
        return false;
    };
    match stream.direct_get(seq).await {
        Ok(m) => m.subject.as_str() == subjects::sensor(id) && m.payload.as_ref() == body,
        Err(_) => false,
    }
}

/// Applies an upsert command: validates, checks the expected version, appends the change to
/// `log` (fenced on the sensor's last change; see the crate docs) and applies it.
pub async fn upsert(
    js: &jetstream::Context,
    log: &EntityLog,
    registry: &Registry,
    payload: &[u8],
) -> UpsertReply {
    let fail = |e: String| UpsertReply {
        ok: false,
        version: None,
        error: Some(e),
    };
    let cmd: SensorUpsert = match serde_json::from_slice(payload) {
        Ok(c) => c,
        Err(e) => return fail(format!("malformed command: {e}")),
    };
    if let Err(e) = cmd.validate() {
        return fail(e);
    }
    for _attempt in 0..3 {
        let current = registry.get(&cmd.sensor_id);
        let cur_version = current.as_ref().map_or(0, |e| e.sensor.version);
        if let Some(expected) = cmd.expected_version
            && expected != cur_version
        {
            return UpsertReply {
                ok: false,
                version: Some(cur_version),
                error: Some(format!(
                    "version conflict: expected {expected}, current {cur_version}"
                )),
            };
        }
        if let Some(cur) = &current
            && cur.sensor.site == cmd.site
            && cur.sensor.calibration_offset == cmd.calibration_offset
            && cur.sensor.window_secs == cmd.window_secs
        {
            // Nothing changes: no new event.
            return UpsertReply {
                ok: true,
                version: Some(cur_version),
                error: None,
            };
        }
        let sensor = Sensor {
            sensor_id: cmd.sensor_id.clone(),
            site: cmd.site.clone(),
            calibration_offset: cmd.calibration_offset,
            window_secs: cmd.window_secs,
            version: cur_version + 1,
        };
        let body = match serde_json::to_vec(&sensor) {
            Ok(b) => b,
            Err(e) => return fail(e.to_string()),
        };
        let msg_id = change_id(&sensor, &body);
        let mut headers = HeaderMap::new();
        headers.insert(SCHEMA_HEADER, SCHEMA);
        let expected = current.as_ref().map_or(0, |e| e.subject_seq);
        let body = Bytes::from(body);
        // The sensor's new version stands for the input sequence (crate docs); commands come
        // by request-reply, from no input stream, so the stream identity is 0.
        let ack = match log
            .append(
                &sensor.sensor_id,
                body.clone(),
                headers,
                msg_id,
                (0, sensor.version),
                Some(expected),
            )
            .await
        {
            Ok(f) => f.await,
            Err(e) => return fail(format!("registry unavailable: {e}")),
        };
        match ack {
            Ok(a) if a.duplicate && !stored_at(js, &sensor.sensor_id, a.sequence, &body).await => {
                // The id names another change than the one stored: decide again.
                refresh(js, registry, &cmd.sensor_id).await;
            }
            Ok(a) => {
                if !a.duplicate {
                    metrics::counter!("registry_changes_total").increment(1);
                }
                let version = sensor.version;
                registry.apply(sensor, a.sequence);
                return UpsertReply {
                    ok: true,
                    version: Some(version),
                    error: None,
                };
            }
            Err(e) if is_conflict(&e) || e.to_string().contains("10158") => {
                // Another instance changed it first (or the same change is being stored right
                // now): re-read and decide again.
                refresh(js, registry, &cmd.sensor_id).await;
            }
            Err(e) => return fail(format!("registry unavailable: {e}")),
        }
    }
    fail("version conflict: concurrent changes".into())
}

async fn refresh(js: &jetstream::Context, registry: &Registry, id: &str) {
    let Ok(stream) = js.get_stream_no_info(streams::SENSORS).await else {
        return;
    };
    if let Ok(m) = stream
        .direct_get_last_for_subject(subjects::sensor(id))
        .await
        && let Ok(s) = serde_json::from_slice::<Sensor>(&m.payload)
    {
        registry.apply(s, m.sequence);
    }
}

/// The reply to `registry.get.<id>`.
pub fn lookup(registry: &Registry, id: &str) -> serde_json::Value {
    match registry.get(id) {
        Some(e) => serde_json::to_value(&e.sensor).unwrap_or_default(),
        None => serde_json::json!({"ok": false, "error": "not found"}),
    }
}

/// Most ids one batched lookup may ask for.
pub const MAX_LOOKUP_KEYS: usize = 1024;

/// The reply to `registry.lookup`: a JSON array of ids answered with one [`lookup`] per id, in
/// order; anything else (not an array of strings, too many ids) with `{"ok": false, "error"}`.
pub fn lookup_many(registry: &Registry, payload: &[u8]) -> serde_json::Value {
    match serde_json::from_slice::<Vec<String>>(payload) {
        Ok(ids) if ids.len() <= MAX_LOOKUP_KEYS => {
            serde_json::Value::Array(ids.iter().map(|id| lookup(registry, id)).collect())
        }
        Ok(ids) => serde_json::json!({"ok": false,
            "error": format!("{} ids asked, at most {MAX_LOOKUP_KEYS} per lookup", ids.len())}),
        Err(e) => serde_json::json!({"ok": false,
            "error": format!("a lookup is a JSON array of sensor ids: {e}")}),
    }
}

/// Most upsert commands accepted and not yet answered; past it, the registry reads no more
/// commands until one is answered (they wait in the NATS subscription).
pub const UPSERTS_IN_FLIGHT: usize = 256;

/// What answering one upsert needs.
#[derive(Clone)]
struct Answer {
    js: jetstream::Context,
    log: EntityLog,
    registry: Registry,
    client: async_nats::Client,
}

impl Answer {
    /// Applies the command and replies; returns the sensor it was for (if it named one).
    async fn run(self, sensor: Option<String>, m: async_nats::Message) -> Option<String> {
        let reply = upsert(&self.js, &self.log, &self.registry, &m.payload).await;
        if let Some(to) = m.reply {
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            let _ = self.client.publish(to, body.into()).await;
        }
        sensor
    }
}

/// Upsert commands in flight. Commands for different sensors run concurrently (each waits for
/// its own append to be acknowledged, so one at a time made registration one round trip per
/// sensor); commands for one sensor run one after the other, in the order they arrived, so a
/// client's sequence of `expected_version`s applies as sent. Two instances still race only
/// through the change log's fence (see the crate docs).
struct Upserts {
    answer: Answer,
    running: FuturesUnordered<BoxFuture<'static, Option<String>>>,
    /// Sensors with a command running, and the commands waiting behind it.
    waiting: HashMap<String, VecDeque<async_nats::Message>>,
    /// Commands accepted and not answered (running or waiting).
    pending: usize,
}

impl Upserts {
    fn has_room(&self) -> bool {
        self.pending < UPSERTS_IN_FLIGHT
    }

    fn accept(&mut self, m: async_nats::Message) {
        self.pending += 1;
        // Only the sensor id is read here: a malformed command runs at once and is refused.
        let sensor = serde_json::from_slice::<SensorId>(&m.payload)
            .ok()
            .map(|c| c.sensor_id);
        match sensor {
            Some(id) => match self.waiting.get_mut(&id) {
                Some(behind) => behind.push_back(m),
                None => {
                    self.waiting.insert(id.clone(), VecDeque::new());
                    self.start(Some(id), m);
                }
            },
            None => self.start(None, m),
        }
    }

    fn start(&mut self, sensor: Option<String>, m: async_nats::Message) {
        self.running
            .push(Box::pin(self.answer.clone().run(sensor, m)));
    }

    /// A command was answered: the next one for its sensor, if any, runs.
    fn finished(&mut self, sensor: Option<String>) {
        self.pending = self.pending.saturating_sub(1);
        let Some(id) = sensor else { return };
        let next = self.waiting.get_mut(&id).and_then(VecDeque::pop_front);
        match next {
            Some(m) => self.start(Some(id), m),
            None => {
                self.waiting.remove(&id);
            }
        }
    }
}

/// The one field of a command read before it runs.
#[derive(serde::Deserialize)]
struct SensorId {
    sensor_id: String,
}

/// Runs the registry until shutdown.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let svc = Service::start(SERVICE, &cfg.nats).await?;
    kappa_runtime::nats::declare_stream(
        &svc.nats.js,
        thermo_domain::runtime::sensors_stream().stream_config_with(cfg.nats.replicas()?),
    )
    .await?;
    let registry = Registry::default();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (r, reg) = (ready.clone(), registry.clone());
        svc.health.register(
            "state",
            Arc::new(move || {
                (
                    r.load(std::sync::atomic::Ordering::Relaxed),
                    serde_json::json!({ "sensors": reg.len() }),
                )
            }),
        );
    }
    let http = svc.serve_http(cfg.http_addr, axum::Router::new()).await?;
    let feed = match recover_and_follow(&svc.nats, registry.clone(), svc.shutdown.clone()).await {
        Ok(feed) => feed,
        // SIGTERM before the state was recovered: nothing to drain.
        Err(_) if svc.shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let log = change_log(svc.nats.js.clone());
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(sensors = registry.len(), "registry recovered");

    let client = svc.nats.client.clone();
    let mut upserts = Upserts {
        answer: Answer {
            js: svc.nats.js.clone(),
            log,
            registry: registry.clone(),
            client: client.clone(),
        },
        running: FuturesUnordered::new(),
        waiting: HashMap::new(),
        pending: 0,
    };
    let mut cmds = client
        .queue_subscribe(subjects::REGISTRY_UPSERT, SERVICE.into())
        .await?;
    let mut gets = client
        .queue_subscribe(
            format!("{}.*", subjects::REGISTRY_GET_PREFIX),
            SERVICE.into(),
        )
        .await?;
    let mut batches = client
        .queue_subscribe(subjects::REGISTRY_LOOKUP, SERVICE.into())
        .await?;
    loop {
        tokio::select! {
            _ = svc.shutdown.cancelled() => break,
            Some(m) = batches.next() => {
                metrics::counter!("registry_batch_lookups_total").increment(1);
                if let Some(to) = m.reply {
                    let body = serde_json::to_vec(&lookup_many(&registry, &m.payload))
                        .unwrap_or_default();
                    let _ = client.publish(to, body.into()).await;
                }
            }
            Some(m) = cmds.next(), if upserts.has_room() => {
                upserts.accept(m);
            }
            Some(done) = upserts.running.next() => upserts.finished(done),
            Some(m) = gets.next() => {
                metrics::counter!("registry_lookups_total").increment(1);
                let id = kappa_runtime::partition::entity_of(m.subject.as_str());
                if let Some(to) = m.reply {
                    let body = serde_json::to_vec(&lookup(&registry, id)).unwrap_or_default();
                    let _ = client.publish(to, body.into()).await;
                }
            }
        }
    }
    let _ = cmds.unsubscribe().await;
    let _ = gets.unsubscribe().await;
    let _ = batches.unsubscribe().await;
    // Every accepted command is answered before the registry stops.
    while let Some(done) = upserts.running.next().await {
        upserts.finished(done);
    }
    svc.drain().await;
    feed.stopped().await;
    let _ = http.await;
    Ok(())
}

// The registry's observable state, now part of the wire contract in thermo-domain; kept here
// under their old names for existing users.
pub use thermo_domain::ObservedSensor;
pub use thermo_domain::runtime::registry_source as observed_source;
