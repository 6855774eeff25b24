//! sensor-registry: the domain kappa service that owns sensor metadata (site, calibration
//! offset, window). Commands arrive by request-reply; every accepted change is appended to the
//! `SENSORS` stream, which is also where the registry's own state is recovered from at start.
//!
//! Concurrency: each change is published with `Nats-Expected-Last-Subject-Sequence`, so two
//! registry instances (or a stale one) can never both apply a change to one sensor; the loser
//! re-reads the sensor and answers with a version conflict.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{
    self, consumer, context::PublishErrorKind, message::PublishMessage, stream,
};
use bytes::Bytes;
use futures::StreamExt;
use kappa_runtime::RuntimeError;
use kappa_runtime::app::Service;
use kappa_runtime::config::NatsArgs;
use thermo_domain::{Sensor, SensorUpsert, UpsertReply, streams, subjects};

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

    fn apply(&self, sensor: Sensor, seq: u64) {
        if let Ok(mut m) = self.sensors.write() {
            let newer = m
                .get(&sensor.sensor_id)
                .is_none_or(|e| e.sensor.version < sensor.version || e.subject_seq < seq);
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

    /// Number of sensors known.
    pub fn len(&self) -> usize {
        self.sensors.read().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no sensor is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `SENSORS` stream's configuration (every change kept, last per subject readable); the
/// stream itself is part of the wire contract, [`thermo_domain::runtime::sensors_stream`].
pub fn stream_config() -> stream::Config {
    thermo_domain::runtime::sensors_stream().stream_config()
}

/// Reads the stream into `registry` (last change of every sensor) and then keeps following
/// it, so changes made by another instance are seen. Returns once caught up.
async fn recover_and_follow(
    js: jetstream::Context,
    registry: Registry,
    shutdown: kappa_runtime::shutdown::CancellationToken,
) -> Result<(), RuntimeError> {
    let stream = js
        .get_stream_no_info(streams::SENSORS)
        .await
        .map_err(RuntimeError::js)?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.>", subjects::SENSORS_PREFIX),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(RuntimeError::js)?;
    let pending = c.cached_info().num_pending;
    let mut msgs = c.messages().await.map_err(RuntimeError::js)?;
    let (caught_up_tx, caught_up_rx) = tokio::sync::oneshot::channel::<()>();
    let mut caught_up_tx = Some(caught_up_tx);
    if pending == 0
        && let Some(tx) = caught_up_tx.take()
    {
        let _ = tx.send(());
    }
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = msgs.next() => m,
            };
            let Some(Ok(m)) = m else {
                tracing::warn!("registry stream follow ended");
                return;
            };
            let (seq, left) = m
                .info()
                .map(|i| (i.stream_sequence, i.pending))
                .unwrap_or((0, 0));
            match serde_json::from_slice::<Sensor>(&m.payload) {
                Ok(s) => registry.apply(s, seq),
                Err(e) => tracing::warn!(error = %e, "undecodable sensor change"),
            }
            if left == 0
                && let Some(tx) = caught_up_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    let _ = caught_up_rx.await;
    Ok(())
}

/// Applies an upsert command: validates, checks the expected version, appends the change.
pub async fn upsert(js: &jetstream::Context, registry: &Registry, payload: &[u8]) -> UpsertReply {
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
        let msg = PublishMessage::build()
            .payload(Bytes::from(body))
            .message_id(format!("sensor:{}:v{}", sensor.sensor_id, sensor.version))
            .expected_last_subject_sequence(current.as_ref().map_or(0, |e| e.subject_seq));
        let ack = match js
            .send_publish(subjects::sensor(&sensor.sensor_id), msg)
            .await
        {
            Ok(f) => f.await,
            Err(e) => return fail(format!("registry unavailable: {e}")),
        };
        match ack {
            Ok(a) => {
                metrics::counter!("registry_changes_total").increment(1);
                let version = sensor.version;
                registry.apply(sensor, a.sequence);
                return UpsertReply {
                    ok: true,
                    version: Some(version),
                    error: None,
                };
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                // Another instance changed it first: re-read and decide again.
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

/// Runs the registry until shutdown.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let svc = Service::start("sensor-registry", &cfg.nats).await?;
    kappa_runtime::nats::declare_stream(&svc.nats.js, stream_config()).await?;
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
    recover_and_follow(svc.nats.js.clone(), registry.clone(), svc.shutdown.clone()).await?;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(sensors = registry.len(), "registry recovered");

    let client = svc.nats.client.clone();
    let mut cmds = client
        .queue_subscribe(subjects::REGISTRY_UPSERT, "sensor-registry".into())
        .await?;
    let mut gets = client
        .queue_subscribe(
            format!("{}.*", subjects::REGISTRY_GET_PREFIX),
            "sensor-registry".into(),
        )
        .await?;
    loop {
        tokio::select! {
            _ = svc.shutdown.cancelled() => break,
            Some(m) = cmds.next() => {
                // Commands are applied one at a time: the registry is their only writer here.
                let reply = upsert(&svc.nats.js, &registry, &m.payload).await;
                if let Some(to) = m.reply {
                    let body = serde_json::to_vec(&reply).unwrap_or_default();
                    let _ = client.publish(to, body.into()).await;
                }
            }
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
    svc.drain().await;
    let _ = http.await;
    Ok(())
}

// The registry's observable state, now part of the wire contract in thermo-domain; kept here
// under their old names for existing users.
pub use thermo_domain::ObservedSensor;
pub use thermo_domain::runtime::registry_source as observed_source;
