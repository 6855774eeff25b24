//! thermometer: the DAG's source. It simulates sensors (drift, noise, occasional spikes, some
//! readings out of order or late) or replays a CSV file, registers its sensors with the
//! registry, and publishes readings on `thermo.readings.<sensor_id>` at a controlled rate with
//! `Nats-Msg-Id`, printing a summary at exit. A reading the stream does not acknowledge (the
//! broker restarting) is published again with the same id until it is (`THERMO_RETRY_SECS`), so
//! a nats-server restart neither stops the source nor stores a reading twice.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thermo_domain::{Reading, SensorUpsert, UpsertReply, subjects};
use time::OffsetDateTime;

/// Flags and environment.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: kappa_runtime::config::NatsArgs,
    /// Health and metrics listener.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9101",
          value_parser = kappa_runtime::config::parse_listen_addr)]
    pub http_addr: SocketAddr,
    /// Number of simulated sensors.
    #[arg(long, env = "THERMO_SENSORS", default_value_t = 20)]
    pub sensors: u32,
    /// Number of sites the sensors are spread over.
    #[arg(long, env = "THERMO_SITES", default_value_t = 3)]
    pub sites: u32,
    /// Readings per second, all sensors together (0 = as fast as possible).
    #[arg(long, env = "THERMO_RATE", default_value_t = 20.0)]
    pub rate: f64,
    /// Random seed (same seed, same readings).
    #[arg(long, env = "THERMO_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Stop after this many readings (0 = no limit).
    #[arg(long, env = "THERMO_COUNT", default_value_t = 0)]
    pub count: u64,
    /// Stop after this many seconds (0 = no limit).
    #[arg(long, env = "THERMO_DURATION_SECS", default_value_t = 0)]
    pub duration_secs: u64,
    /// Event-time step between a sensor's readings in ms (0 = use the wall clock).
    #[arg(long, env = "THERMO_EVENT_STEP_MS", default_value_t = 0)]
    pub event_step_ms: u64,
    /// Share of readings sent out of order (event time moved back inside the window).
    #[arg(long, env = "THERMO_OUT_OF_ORDER", default_value_t = 0.02)]
    pub out_of_order: f64,
    /// Share of readings sent too late (event time before the window).
    #[arg(long, env = "THERMO_LATE", default_value_t = 0.0)]
    pub late: f64,
    /// Replay readings from a CSV file (`sensor_id,celsius,measured_at[,site]`) instead.
    #[arg(long, env = "THERMO_REPLAY")]
    pub replay: Option<PathBuf>,
    /// Window registered for each sensor, seconds.
    #[arg(long, env = "THERMO_WINDOW_SECS", default_value_t = 600)]
    pub window_secs: u32,
    /// Id prefix of simulated sensors.
    #[arg(long, env = "THERMO_PREFIX", default_value = "s")]
    pub prefix: String,
    /// How long to keep publishing one reading again (same `Nats-Msg-Id`) while the broker
    /// does not acknowledge it, e.g. across a nats-server restart, before giving up with an
    /// error (0 = give up at the first failure).
    #[arg(long, env = "THERMO_RETRY_SECS", default_value_t = 120)]
    pub retry_secs: u64,
}

/// One reading sent and not yet acknowledged: what it takes to send it again.
struct Pending {
    subject: String,
    msg: PublishMessage,
    /// The ack of the last send; `None` when the send itself failed.
    ack: Option<PublishAckFuture>,
}

/// Waits for a reading's ack; while the broker does not acknowledge it (a timeout, no
/// responders, a broken connection: nats-server restarting), publishes it again with the same
/// `Nats-Msg-Id`, so the stream stores it once (the duplicate window is 120 s; a copy that was
/// stored but whose ack was lost comes back as a duplicate ack), for up to `retry`.
async fn confirm(
    js: &async_nats::jetstream::Context,
    p: Pending,
    retry: Duration,
) -> anyhow::Result<PublishAck> {
    let deadline = Instant::now() + retry;
    let mut ack = p.ack;
    let mut wait = Duration::from_millis(100);
    loop {
        let err = match ack.take() {
            Some(a) => match a.await {
                Ok(a) => return Ok(a),
                Err(e) => e.to_string(),
            },
            None => "not sent".to_string(),
        };
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{}: no ack from the stream within {retry:?}: {err}",
                p.subject
            );
        }
        tracing::warn!(subject = %p.subject, error = %err, "publish not acknowledged; sending it again");
        metrics::counter!("thermo_publish_retries_total").increment(1);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
        ack = js.send_publish(p.subject.clone(), p.msg.clone()).await.ok();
    }
}

/// One simulated sensor.
#[derive(Debug, Clone)]
pub struct SimSensor {
    /// Its id.
    pub id: String,
    /// Its site.
    pub site: String,
    value: f64,
    drift: f64,
    next_event: OffsetDateTime,
}

/// A deterministic simulation of many sensors.
pub struct Simulation {
    rng: StdRng,
    sensors: Vec<SimSensor>,
    step: Duration,
    out_of_order: f64,
    late: f64,
    window: Duration,
    next: usize,
}

impl Simulation {
    /// Sensors `prefix-0001..` over `sites` sites, all starting at `start`.
    pub fn new(cfg: &Config, start: OffsetDateTime) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let sensors = (0..cfg.sensors)
            .map(|i| {
                let site = i % cfg.sites.max(1);
                SimSensor {
                    id: format!("{}-{:04}", cfg.prefix, i + 1),
                    site: format!("site-{}", site + 1),
                    value: 15.0 + 3.0 * f64::from(site) + rng.random_range(-2.0..2.0),
                    drift: rng.random_range(-0.02..0.02),
                    next_event: start,
                }
            })
            .collect();
        Self {
            rng,
            sensors,
            step: Duration::from_millis(cfg.event_step_ms),
            out_of_order: cfg.out_of_order,
            late: cfg.late,
            window: Duration::from_secs(u64::from(cfg.window_secs)),
            next: 0,
        }
    }

    /// The simulated sensors.
    pub fn sensors(&self) -> &[SimSensor] {
        &self.sensors
    }

    fn gaussian(&mut self) -> f64 {
        // Box-Muller.
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// The next reading, round robin over sensors.
    pub fn next_reading(&mut self) -> Reading {
        let i = self.next;
        self.next = (self.next + 1) % self.sensors.len().max(1);
        let noise = 0.05 * self.gaussian();
        let spike = if self.rng.random_bool(0.01) {
            self.rng.random_range(-8.0..8.0)
        } else {
            0.0
        };
        let wobble: f64 = self.rng.random_range(-0.005..0.005);
        let roll: f64 = self.rng.random_range(0.0..1.0);
        let (late, ooo) = (self.late, self.out_of_order);
        let step = self.step;
        let window = self.window;
        let ooo_back = Duration::from_millis(self.rng.random_range(1..30_000));
        let s = &mut self.sensors[i];
        s.drift = (s.drift + wobble).clamp(-0.1, 0.1);
        s.value = (s.value + s.drift).clamp(-40.0, 60.0);
        let now = if step.is_zero() {
            OffsetDateTime::now_utc()
        } else {
            let t = s.next_event;
            s.next_event = t + step;
            t
        };
        let measured_at = if roll < late {
            now - window - Duration::from_secs(60)
        } else if roll < late + ooo {
            now - ooo_back.min(window / 2)
        } else {
            now
        };
        // Millisecond precision, as devices send.
        let measured_at = measured_at
            .replace_nanosecond(measured_at.nanosecond() / 1_000_000 * 1_000_000)
            .unwrap_or(measured_at);
        Reading {
            sensor_id: s.id.clone(),
            celsius: ((s.value + noise + spike) * 1000.0).round() / 1000.0,
            measured_at,
            seq: None,
        }
    }
}

/// Parses one CSV line `sensor_id,celsius,measured_at[,site]`.
pub fn parse_csv_line(line: &str) -> Result<(Reading, Option<String>), String> {
    let cols: Vec<&str> = line.split(',').map(str::trim).collect();
    if cols.len() < 3 {
        return Err(format!(
            "expected sensor_id,celsius,measured_at[,site]: '{line}'"
        ));
    }
    let celsius: f64 = cols[1]
        .parse()
        .map_err(|_| format!("celsius '{}' is not a number", cols[1]))?;
    let measured_at =
        OffsetDateTime::parse(cols[2], &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("measured_at '{}': {e}", cols[2]))?;
    Ok((
        Reading {
            sensor_id: cols[0].to_string(),
            celsius,
            measured_at,
            seq: None,
        },
        cols.get(3).map(|s| (*s).to_string()),
    ))
}

/// Registrations awaiting their answer at once at start. The registry runs up to 256 commands
/// at once; 50,000 sensors registered in a median 2.5 s with 128 in flight, 4.2 s with 32.
pub const REGISTRATIONS_IN_FLIGHT: usize = 128;

/// Registers a sensor, retrying until the registry answers (or `deadline`).
pub async fn register(
    client: &async_nats::Client,
    upsert: &SensorUpsert,
    deadline: Instant,
) -> anyhow::Result<u64> {
    let body = Bytes::from(serde_json::to_vec(upsert)?);
    loop {
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.request(subjects::REGISTRY_UPSERT, body.clone()),
        )
        .await
        {
            Ok(Ok(msg)) => {
                let reply: UpsertReply = serde_json::from_slice(&msg.payload)?;
                return match reply {
                    UpsertReply {
                        ok: true,
                        version: Some(v),
                        ..
                    } => Ok(v),
                    other => Err(anyhow::anyhow!(
                        "registry refused {}: {}",
                        upsert.sensor_id,
                        other.error.unwrap_or_default()
                    )),
                };
            }
            Ok(Err(_)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Err(e)) => anyhow::bail!("registry did not answer: {e}"),
            Err(_) => anyhow::bail!("registry did not answer in time"),
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// Readings published and acknowledged.
    pub published: u64,
    /// Readings the stream reported as duplicates.
    pub duplicates: u64,
    /// Seconds spent publishing.
    pub secs: f64,
}

/// Runs the thermometer until its count/duration is reached or SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<Summary> {
    if cfg.sensors == 0 && cfg.replay.is_none() {
        anyhow::bail!("THERMO_SENSORS must be at least 1");
    }
    if !(0.0..=1.0).contains(&(cfg.out_of_order + cfg.late)) {
        anyhow::bail!("THERMO_OUT_OF_ORDER + THERMO_LATE must be within 0..1");
    }
    let replay: Option<Vec<(Reading, Option<String>)>> = match &cfg.replay {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("THERMO_REPLAY '{}': {e}", path.display()))?;
            let rows = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with("sensor_id"))
                .map(parse_csv_line)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("THERMO_REPLAY: {e}"))?;
            Some(rows)
        }
        None => None,
    };
    let svc = kappa_runtime::app::Service::start("thermometer", &cfg.nats).await?;
    // Declared as temperature-delta declares it; the partition count only matters if the
    // thermometer is the first to create the stream (same variable as the services').
    let partitions = std::env::var("KAPPA_PARTITIONS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8);
    let mut readings = thermo_domain::runtime::readings_stream(partitions);
    readings
        .declare_with(&svc.nats.js, cfg.nats.stream_options()?)
        .await?;
    let http = svc.serve_http(cfg.http_addr, axum::Router::new()).await?;

    let start = OffsetDateTime::now_utc();
    let mut sim = Simulation::new(&cfg, start);
    // Register every sensor first, so none of our readings is unknown.
    let mut to_register: Vec<(String, String)> = match &replay {
        Some(rows) => rows
            .iter()
            .map(|(r, site)| {
                (
                    r.sensor_id.clone(),
                    site.clone().unwrap_or_else(|| "site-1".into()),
                )
            })
            .collect(),
        None => sim
            .sensors()
            .iter()
            .map(|s| (s.id.clone(), s.site.clone()))
            .collect(),
    };
    to_register.sort();
    to_register.dedup_by(|a, b| a.0 == b.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Registered REGISTRATIONS_IN_FLIGHT at a time: the registry runs commands for different
    // sensors concurrently.
    let client = svc.nats.client.clone();
    let window_secs = cfg.window_secs;
    futures::stream::iter(to_register.iter().cloned())
        .map(|(id, site)| {
            let client = client.clone();
            async move {
                register(
                    &client,
                    &SensorUpsert {
                        sensor_id: id,
                        site,
                        calibration_offset: 0.0,
                        window_secs,
                        expected_version: None,
                    },
                    deadline,
                )
                .await
            }
        })
        .buffer_unordered(REGISTRATIONS_IN_FLIGHT)
        .try_collect::<Vec<u64>>()
        .await?;
    tracing::info!(sensors = to_register.len(), "sensors registered");

    let run_id = format!("{:x}", start.unix_timestamp_nanos());
    let limit = match (&replay, cfg.count) {
        (Some(rows), 0) => rows.len() as u64,
        (Some(rows), n) => n.min(rows.len() as u64),
        (None, n) => n,
    };
    let t0 = Instant::now();
    let end = (cfg.duration_secs > 0).then(|| t0 + Duration::from_secs(cfg.duration_secs));
    let mut summary = Summary::default();
    // Confirmations run concurrently (polled together whenever the window is full): after a
    // broker restart, every in-flight ack is lost and each waits out the publish timeout (5 s)
    // before its resend; awaited one by one, 1024 of them stalled the run for over an hour.
    let mut acks = futures::stream::FuturesOrdered::new();
    let retry = Duration::from_secs(cfg.retry_secs);
    let mut n: u64 = 0;
    loop {
        if (limit > 0 && n >= limit)
            || end.is_some_and(|e| Instant::now() >= e)
            || svc.shutdown.is_cancelled()
        {
            break;
        }
        if cfg.rate > 0.0 {
            let due = t0 + Duration::from_secs_f64(n as f64 / cfg.rate);
            let now = Instant::now();
            if due > now {
                tokio::select! {
                    _ = svc.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(due - now) => {}
                }
            }
        }
        let reading = match &replay {
            Some(rows) => rows[usize::try_from(n).unwrap_or(usize::MAX) % rows.len()]
                .0
                .clone(),
            None => sim.next_reading(),
        };
        let body = Bytes::from(serde_json::to_vec(&reading)?);
        let msg = PublishMessage::build()
            .payload(body)
            .message_id(format!("thermometer:{run_id}:{n}"));
        let subject = subjects::reading(&reading.sensor_id);
        // A send that fails (the connection is down) is retried by `confirm`, like a lost ack.
        let ack = svc
            .nats
            .js
            .send_publish(subject.clone(), msg.clone())
            .await
            .ok();
        acks.push_back(confirm(&svc.nats.js, Pending { subject, msg, ack }, retry));
        n += 1;
        // Bounded in-flight publishes.
        while acks.len() >= 1024 {
            if let Some(ack) = acks.next().await {
                let ack = ack?;
                summary.published += 1;
                summary.duplicates += u64::from(ack.duplicate);
            }
        }
        metrics::counter!("thermo_readings_published_total").increment(1);
    }
    while let Some(ack) = acks.next().await {
        let ack = ack?;
        summary.published += 1;
        summary.duplicates += u64::from(ack.duplicate);
    }
    summary.secs = t0.elapsed().as_secs_f64();
    svc.shutdown.cancel();
    svc.drain().await;
    let _ = http.await;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: Config,
    }

    #[test]
    fn same_seed_same_readings() {
        let cfg = Cli::parse_from(["t", "--event-step-ms", "1000"]).cfg;
        let start = OffsetDateTime::UNIX_EPOCH;
        let mut a = Simulation::new(&cfg, start);
        let mut b = Simulation::new(&cfg, start);
        for _ in 0..100 {
            assert_eq!(a.next_reading(), b.next_reading());
        }
        assert_eq!(a.sensors().len(), 20);
        assert_eq!(a.sensors()[0].id, "s-0001");
    }

    #[test]
    fn csv_lines_parse_or_explain() {
        let (r, site) = parse_csv_line("s-1, 21.5, 2026-11-24T17:00:00Z, lab").expect("ok");
        assert_eq!(
            (r.sensor_id.as_str(), r.celsius, site.as_deref()),
            ("s-1", 21.5, Some("lab"))
        );
        assert!(parse_csv_line("s-1,hot,2026-11-24T17:00:00Z").is_err());
        assert!(parse_csv_line("s-1,1").is_err());
    }
}
