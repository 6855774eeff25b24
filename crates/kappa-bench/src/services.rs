//! The reference DAG's real release binaries as child processes, driven and timed from outside
//! (stream counts, `/healthz`, `/metrics`, `/proc`).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;

use crate::baseline::{Lat, histogram, lat};
use crate::infra::{CpuMeter, Servers, busy_share, machine_ticks, rss_kib};
use kappa_testkit::http::get;
use kappa_testkit::metrics::{scrape, sum as metric_sum};
use kappa_testkit::streams::count;
use kappa_testkit::{Proc, procs};

/// `--service-env` pairs, set once at start-up, given to every service spawned.
static SERVICE_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

/// Sets the pairs every spawned service gets in its environment (first call wins).
pub fn set_service_env(pairs: Vec<(String, String)>) {
    let _ = SERVICE_ENV.set(pairs);
}

pub struct Ctx {
    pub servers: Servers,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub http: reqwest::Client,
    pub bin_dir: PathBuf,
    pub logs: PathBuf,
    log_n: AtomicUsize,
    pub registry: Option<Proc>,
}

impl Ctx {
    /// Starts counting CPU of `service` (`name`, or this process when `pid` is `None`),
    /// nats-server and redis-server.
    pub fn cpu_meter(&self, name: &'static str, pid: Option<u32>) -> CpuMeter {
        let mut procs = vec![(name, pid.unwrap_or_else(std::process::id))];
        procs.extend(self.servers.nats_pid.map(|p| ("nats-server", p)));
        procs.extend(self.servers.redis_pid.map(|p| ("redis-server", p)));
        CpuMeter::start(&procs)
    }

    pub async fn new(servers: Servers, bin_dir: PathBuf) -> anyhow::Result<Ctx> {
        let (client, js) = servers.nats().await?;
        let logs = servers.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        Ok(Ctx {
            servers,
            client,
            js,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()?,
            bin_dir,
            logs,
            log_n: AtomicUsize::new(0),
            registry: None,
        })
    }

    pub fn has_bin(&self, name: &str) -> bool {
        self.bin_dir.join(name).exists()
    }

    /// Starts service `name` with the common environment plus `env`.
    pub fn spawn(
        &self,
        name: &str,
        env: &[(&str, String)],
        args: &[String],
    ) -> anyhow::Result<Proc> {
        let exe = procs::bin(
            &self.bin_dir,
            name,
            "run `cargo build --release --bins` first",
        )?;
        let n = self.log_n.fetch_add(1, Ordering::Relaxed);
        let mut cmd = std::process::Command::new(exe);
        cmd.args(args)
            .env("NATS_URL", &self.servers.nats_url)
            .env("REDIS_URL", &self.servers.redis_url)
            .env("KAPPA_PARTITIONS", "8")
            .env("RUST_LOG", "info,async_nats=warn")
            .envs(self.servers.env_of(name))
            .envs(SERVICE_ENV.get().into_iter().flatten().map(|(k, v)| (k, v)))
            .envs(env.iter().map(|(k, v)| (k, v)));
        Proc::service(name, cmd, self.logs.join(format!("{n:03}-{name}.log")))
    }

    /// Starts the sensor registry once (it keeps the SENSORS stream across scenarios).
    pub async fn start_registry(&mut self) -> anyhow::Result<()> {
        let mut p = self.spawn("sensor-registry", &[], &[])?;
        p.wait_ready(Duration::from_secs(60)).await?;
        self.registry = Some(p);
        Ok(())
    }

    /// Runs the thermometer to completion; returns its reported readings/s.
    pub async fn thermometer(&self, n: u64, sensors: u64, extra: &[&str]) -> anyhow::Result<f64> {
        let mut args: Vec<String> = vec![
            "--count".into(),
            n.to_string(),
            "--rate".into(),
            "0".into(),
            "--sensors".into(),
            sensors.to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_string()));
        let mut p = self.spawn("thermometer", &[], &args)?;
        let ok = p.wait_exit(Duration::from_secs(900)).await?.success();
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        if !ok {
            bail!("thermometer failed:\n{}", p.log_tail(20));
        }
        let line = log
            .lines()
            .find(|l| l.starts_with("thermometer: published"))
            .context("thermometer printed no summary")?;
        // "... in X.XXs (R/s)"
        let rate = line
            .rsplit('(')
            .next()
            .and_then(|s| {
                s.trim_end_matches(')')
                    .trim_end_matches("/s")
                    .parse::<f64>()
                    .ok()
            })
            .context("unparsable thermometer summary")?;
        Ok(rate)
    }

    /// Partition -> last sequence of `prefix.<p>.*` in `stream` (8 partitions, the default).
    pub async fn partition_lasts(&self, stream: &str, prefix: &str) -> anyhow::Result<Vec<u64>> {
        self.partition_lasts_of(stream, prefix, crate::baseline::PARTITIONS)
            .await
    }

    /// Partition -> last sequence of `prefix.<p>.*` in `stream`, for `partitions` partitions.
    pub async fn partition_lasts_of(
        &self,
        stream: &str,
        prefix: &str,
        partitions: u32,
    ) -> anyhow::Result<Vec<u64>> {
        let s = self.js.get_stream_no_info(stream).await?;
        let mut out = Vec::new();
        for p in 0..partitions {
            let last = match s
                .direct_get_last_for_subject(format!("{prefix}.{p}.*"))
                .await
            {
                Ok(m) => m.sequence,
                Err(_) => 0,
            };
            out.push(last);
        }
        Ok(out)
    }

    pub async fn healthz(&self, p: &Proc) -> Option<(u16, serde_json::Value)> {
        let (code, body) = get(&self.http, &p.http, "/healthz").await?;
        Some((code, serde_json::from_str(&body).ok()?))
    }

    /// Average size of a sensor as the registry answers `registry.get.<id>` (sampled).
    pub async fn sensor_json_bytes(&self, sensors: u64) -> f64 {
        let sample = sensors.min(200);
        let mut total = 0usize;
        let mut n = 0usize;
        for i in 0..sample {
            let id = format!("s-{:04}", i * sensors / sample + 1);
            if let Ok(Ok(m)) = tokio::time::timeout(
                Duration::from_secs(2),
                self.client
                    .request(thermo_domain::subjects::registry_get(&id), Bytes::new()),
            )
            .await
            {
                total += m.payload.len();
                n += 1;
            }
        }
        if n == 0 { 0.0 } else { total as f64 / n as f64 }
    }
}

/// One temperature-delta measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TdCase {
    pub working: &'static str,
    pub observed: &'static str,
    pub sensors: u64,
    pub readings: u64,
    pub window_secs: u32,
    pub event_step_ms: u64,
    pub recovery: bool,
    /// `KAPPA_OWNERSHIP`: `leases` (the default) or `static`.
    pub ownership: &'static str,
}

impl TdCase {
    /// A drain of `readings` pre-filled readings over `sensors` sensors, 10-minute windows, no
    /// recovery run, leases: what every mode but `all` measures.
    pub fn drain(
        working: &'static str,
        observed: &'static str,
        sensors: u64,
        readings: u64,
    ) -> TdCase {
        TdCase {
            working,
            observed,
            sensors,
            readings,
            window_secs: 600,
            event_step_ms: 0,
            recovery: false,
            ownership: "leases",
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Recovery {
    /// Restart (spawn) -> `/healthz` 200.
    pub ready_secs: f64,
    /// Max over partitions of the runtime's own `recovery_secs` (opening the working state).
    pub recovery_secs_max: f64,
    /// Restart -> every partition's position at the last reading (replay done).
    pub caught_up_secs: f64,
    /// With the default lease ownership: a fresh instance killed -9 and restarted at once;
    /// restart -> caught up (the dead instance's leases must expire first).
    pub lease_failover_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TdResult {
    pub prefill_rate: f64,
    /// Spawn -> `/healthz` 200 (elasticity: a fresh instance becoming ready).
    pub ready_secs: f64,
    /// Readings processed after ready / time to drain.
    pub secs: f64,
    pub rate: f64,
    pub dead_letters: u64,
    pub rss_kib: u64,
    pub observed_requests: f64,
    pub observed_req_per_s: f64,
    pub observed_req_mean_ms: f64,
    pub observed_held: f64,
    /// Batches processed (`kappa_batch_seconds_count`).
    pub batches: f64,
    /// Mean readings per batch.
    pub mean_batch: f64,
    /// Mean time in `process` per batch, ms.
    pub mean_batch_ms: f64,
    /// Working-state store calls (`kappa_state_seconds_count`: Redis round trips) per batch.
    pub store_calls_per_batch: f64,
    /// CPU µs per reading while draining: (process, µs).
    pub cpu_us: Vec<(&'static str, f64)>,
    pub recovery: Option<Recovery>,
}

fn td_env(ctx: &Ctx, c: &TdCase) -> Vec<(&'static str, String)> {
    vec![
        ("KAPPA_WORKING", c.working.to_string()),
        ("KAPPA_OBSERVED", c.observed.to_string()),
        ("AFFINITY_REDIS_URL", ctx.servers.affinity_url.clone()),
        ("KAPPA_OWNERSHIP", c.ownership.to_string()),
    ]
}

/// Polls `/healthz` until every partition's position reaches `lasts` (one per partition);
/// returns the max `recovery_secs` over partitions.
pub async fn wait_caught_up(ctx: &Ctx, q: &Proc, lasts: &[u64]) -> anyhow::Result<f64> {
    wait_caught_up_within(ctx, q, lasts, Duration::from_secs(300)).await
}

/// [`wait_caught_up`], giving up after `timeout`.
pub async fn wait_caught_up_within(
    ctx: &Ctx,
    q: &Proc,
    lasts: &[u64],
    timeout: Duration,
) -> anyhow::Result<f64> {
    let partitions = lasts.len() as u32;
    let deadline = Instant::now() + timeout;
    loop {
        let Some((_, h)) = ctx.healthz(q).await else {
            bail!("temperature-delta stopped answering after restart")
        };
        let parts = h
            .pointer("/checks/partitions/detail")
            .cloned()
            .unwrap_or_default();
        let caught = (0..partitions).all(|p| {
            parts
                .get(p.to_string())
                .and_then(|s| s.get("position"))
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|pos| pos >= lasts[p as usize])
        });
        if caught {
            return Ok((0..partitions)
                .filter_map(|p| parts.get(p.to_string())?.get("recovery_secs")?.as_f64())
                .fold(0.0, f64::max));
        }
        if Instant::now() > deadline {
            bail!(
                "temperature-delta did not catch up after restart; log:\n{}",
                q.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pre-fills READINGS with the thermometer, then times temperature-delta draining it.
pub async fn temperature_delta(ctx: &Ctx, c: &TdCase) -> anyhow::Result<(TdResult, Option<Proc>)> {
    ctx.servers.wipe(&ctx.js).await?;
    let mut extra: Vec<String> = vec!["--window-secs".into(), c.window_secs.to_string()];
    if c.event_step_ms > 0 {
        extra.push("--event-step-ms".into());
        extra.push(c.event_step_ms.to_string());
    }
    let extra_ref: Vec<&str> = extra.iter().map(String::as_str).collect();
    let prefill_rate = ctx.thermometer(c.readings, c.sensors, &extra_ref).await?;
    let n = count(&ctx.js, thermo_domain::streams::READINGS).await;
    if n < c.readings {
        bail!("READINGS holds {n} of {}", c.readings);
    }
    let mut p = ctx.spawn("temperature-delta", &td_env(ctx, c), &[])?;
    let ready = p.wait_ready(Duration::from_secs(300)).await?;
    let t_ready = Instant::now();
    let done_at = |js: jetstream::Context| async move {
        count(&js, thermo_domain::streams::DELTAS).await
            + count(&js, kappa_runtime::dlq::STREAM).await
    };
    let m0 = done_at(ctx.js.clone()).await.min(n);
    let meter = ctx.cpu_meter("temperature-delta", Some(p.pid()));
    let deadline = t_ready + Duration::from_secs(900);
    loop {
        let d = done_at(ctx.js.clone()).await;
        if d >= n {
            break;
        }
        if Instant::now() > deadline || !p.alive() {
            bail!(
                "temperature-delta drained {d} of {n}; log:\n{}",
                p.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t_ready.elapsed().as_secs_f64();
    let cpu_us = meter.per_msg(n - m0);
    let m = scrape(&ctx.http, &p.http).await.unwrap_or_default();
    let requests = metric_sum(&m, "kappa_observed_requests_total");
    let req_sum = metric_sum(&m, "kappa_observed_request_seconds_sum");
    let req_n = metric_sum(&m, "kappa_observed_request_seconds_count");
    let held = ctx
        .healthz(&p)
        .await
        .and_then(|(_, v)| v.pointer("/checks/observed/detail/held")?.as_f64())
        .unwrap_or_else(|| metric_sum(&m, "kappa_observed_held"));
    let mut r = TdResult {
        prefill_rate,
        ready_secs: ready.as_secs_f64(),
        secs,
        rate: (n - m0) as f64 / secs.max(1e-9),
        dead_letters: count(&ctx.js, kappa_runtime::dlq::STREAM).await,
        rss_kib: rss_kib(p.pid()).unwrap_or(0),
        observed_requests: requests,
        // Lookups happen while processing: requests over the processing time.
        observed_req_per_s: requests / secs.max(1e-9),
        observed_req_mean_ms: if req_n > 0.0 {
            req_sum / req_n * 1000.0
        } else {
            0.0
        },
        observed_held: held,
        batches: metric_sum(&m, "kappa_batch_seconds_count"),
        mean_batch: metric_sum(&m, "kappa_batch_size_sum")
            / metric_sum(&m, "kappa_batch_size_count").max(1.0),
        mean_batch_ms: metric_sum(&m, "kappa_batch_seconds_sum") * 1000.0
            / metric_sum(&m, "kappa_batch_seconds_count").max(1.0),
        store_calls_per_batch: metric_sum(&m, "kappa_state_seconds_count")
            / metric_sum(&m, "kappa_batch_seconds_count").max(1.0),
        cpu_us,
        recovery: None,
    };
    if c.recovery {
        p.kill9();
        let lasts = ctx
            .partition_lasts(
                thermo_domain::streams::READINGS,
                thermo_domain::subjects::READINGS_PREFIX,
            )
            .await?;
        let spawned = Instant::now();
        let mut q = ctx.spawn("temperature-delta", &td_env(ctx, c), &[])?;
        let ready = q.wait_ready(Duration::from_secs(300)).await?;
        let mut rec = Recovery {
            ready_secs: ready.as_secs_f64(),
            ..Default::default()
        };
        rec.recovery_secs_max = wait_caught_up(ctx, &q, &lasts).await?;
        rec.caught_up_secs = spawned.elapsed().as_secs_f64();
        if c.ownership == "static" {
            // Failover with the default leases: start a lease-owning instance, let it take
            // every partition, kill -9 it, restart, and time until caught up again.
            q.terminate(Duration::from_secs(10));
            let mut lc = c.clone();
            lc.ownership = "leases";
            let mut a = ctx.spawn("temperature-delta", &td_env(ctx, &lc), &[])?;
            a.wait_ready(Duration::from_secs(120)).await?;
            wait_caught_up(ctx, &a, &lasts).await?;
            a.kill9();
            let spawned = Instant::now();
            let mut b = ctx.spawn("temperature-delta", &td_env(ctx, &lc), &[])?;
            b.wait_ready(Duration::from_secs(120)).await?;
            wait_caught_up(ctx, &b, &lasts).await?;
            rec.lease_failover_secs = Some(spawned.elapsed().as_secs_f64());
            q = b;
        }
        let after = count(&ctx.js, thermo_domain::streams::DELTAS).await
            + count(&ctx.js, kappa_runtime::dlq::STREAM).await;
        if after != n {
            eprintln!("  note: after the restart DELTAS+DLQ hold {after}, expected {n}");
        }
        r.recovery = Some(rec);
        p = q;
    }
    Ok((r, Some(p)))
}

/// Times view-builder applying every delta already in DELTAS (`kappa_processed_total`).
pub async fn view_builder(
    ctx: &Ctx,
    n: u64,
) -> anyhow::Result<(f64, f64, Proc, Vec<(&'static str, f64)>)> {
    let spawned = Instant::now();
    let mut p = ctx.spawn(
        "view-builder",
        &[("KAPPA_OBSERVED", "semi-stateless".into())],
        &[],
    )?;
    let meter = ctx.cpu_meter("view-builder", Some(p.pid()));
    // Poll from spawn: the first poll that sees progress starts the clock (the service may
    // work through a small backlog before its /healthz is polled as ready).
    let processed = |m: &str| metric_sum(m, "kappa_processed_total") as u64;
    let mut ready: Option<f64> = None;
    let mut first: Option<(Instant, u64)> = None;
    let deadline = spawned + Duration::from_secs(900);
    let done = loop {
        if ready.is_none() && matches!(get(&ctx.http, &p.http, "/healthz").await, Some((200, _))) {
            ready = Some(spawned.elapsed().as_secs_f64());
        }
        let d = processed(&scrape(&ctx.http, &p.http).await.unwrap_or_default());
        if d > 0 && first.is_none() {
            first = Some((Instant::now(), d));
        }
        if d >= n {
            break Instant::now();
        }
        if Instant::now() > deadline || !p.alive() {
            bail!("view-builder applied {d} of {n}; log:\n{}", p.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let rate = match first {
        Some((t, m)) if m < n && done > t => (n - m) as f64 / (done - t).as_secs_f64(),
        _ => n as f64 / (done - spawned).as_secs_f64().max(1e-9),
    };
    let cpu = meter.per_msg(n);
    let ready = match ready {
        Some(r) => r,
        None => p.wait_ready(Duration::from_secs(120)).await?.as_secs_f64(),
    };
    Ok((rate, ready, p, cpu))
}

/// Closed-loop HTTP load: `concurrency` workers GET `paths` round robin until `max` requests or
/// `secs` elapsed. Returns (requests/s, non-2xx count, latency).
pub async fn http_load(
    http: &reqwest::Client,
    addr: &str,
    paths: Arc<Vec<String>>,
    concurrency: usize,
    max: u64,
    secs: f64,
) -> anyhow::Result<(f64, u64, Lat)> {
    let next = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, paths, next, bad) = (http.clone(), paths.clone(), next.clone(), bad.clone());
            let addr = addr.to_string();
            tokio::spawn(async move {
                let mut h = histogram();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= max || Instant::now() >= end {
                        break;
                    }
                    let path = &paths[(i % paths.len() as u64) as usize];
                    let t = Instant::now();
                    let ok = match http.get(format!("http://{addr}{path}")).send().await {
                        Ok(r) => {
                            let s = r.status().is_success();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => false,
                    };
                    let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                    if !ok {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
                h
            })
        })
        .collect();
    let mut all = histogram();
    for w in workers {
        all.add(w.await?).ok();
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((
        all.len() as f64 / secs,
        bad.load(Ordering::Relaxed),
        lat(&all),
    ))
}

/// An in-process axum server answering every GET with `body` (the HTTP baseline).
pub async fn constant_server(
    body: String,
) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    let body = Arc::new(body);
    let app = axum::Router::new().fallback(move || {
        let b = body.clone();
        async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                b.as_str().to_string(),
            )
        }
    });
    let h = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Ok((addr, h))
}

#[derive(Default)]
struct E2eState {
    /// sensor -> readings published and not yet seen: (readings seq, intended send µs).
    pending: HashMap<String, VecDeque<(u64, u64)>>,
    /// sensor -> (largest source_seq seen at the query API, when in µs).
    seen: HashMap<String, (u64, u64)>,
    hist: Option<hdrhistogram::Histogram<u64>>,
    recorded: u64,
    /// readings seq -> (intended send µs, seen at the live feed µs), for the per-hop split.
    visible: HashMap<u64, (u64, u64)>,
}

impl E2eState {
    fn record(&mut self, seq: u64, intended: u64, now: u64) {
        if let Some(h) = self.hist.as_mut() {
            let _ = h.record(now.saturating_sub(intended).max(1));
        }
        self.visible.insert(seq, (intended, now));
        self.recorded += 1;
    }
}

/// Where end-to-end time goes, per reading: intended send -> its delta published by
/// temperature-delta -> the sensor's view announced by view-builder -> seen at the live feed.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Hops {
    /// Intended send -> delta published (temperature-delta's hop, READINGS stream included).
    pub to_delta: Lat,
    /// Delta published -> view announced (view-builder's hop, DELTAS stream included).
    pub to_view: Lat,
    /// View announced -> seen at `/v1/live` (query-api and the SSE client).
    pub to_live: Lat,
}

#[derive(serde::Deserialize)]
struct SourceSeq {
    source_seq: u64,
}

/// Records, from a core subscription, when each `source_seq` was first seen (µs since `base`).
fn watch_source_seqs(
    mut sub: async_nats::Subscriber,
    base: Instant,
    into: Arc<Mutex<Vec<(u64, u64)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(m) = sub.next().await {
            let now = base.elapsed().as_micros() as u64;
            if let Ok(v) = serde_json::from_slice::<SourceSeq>(&m.payload)
                && let Ok(mut into) = into.lock()
            {
                into.push((v.source_seq, now));
            }
        }
    })
}

/// Reading number `i` of a load run, over `sensors` sensors round robin, as the thermometer
/// would publish it (same JSON shape), with message id `<run>:<i>`: (sensor id, message).
fn reading_message(i: u64, sensors: u64, measured_at: &str, run: &str) -> (String, PublishMessage) {
    let id = format!("s-{:04}", i % sensors + 1);
    let body = format!(
        r#"{{"sensor_id":"{id}","celsius":{:.3},"measured_at":"{measured_at}"}}"#,
        20.0 + (i % 100) as f64 / 10.0
    );
    let msg = PublishMessage::build()
        .payload(Bytes::from(body))
        .message_id(format!("{run}:{i}"));
    (id, msg)
}

/// Pipeline throughput with the whole DAG running (temperature-delta, view-builder and
/// query-api on the same cores as this load generator): `n` readings published as fast as the
/// stream acks them (1024 in flight), timed until view-builder has applied all their deltas.
pub async fn pipeline_max(ctx: &Ctx, vb_http: &str, n: u64, sensors: u64) -> anyhow::Result<f64> {
    let processed = |m: &str| metric_sum(m, "kappa_processed_total") as u64;
    let before = processed(&scrape(&ctx.http, vb_http).await.unwrap_or_default());
    let t0 = Instant::now();
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let run = format!(
        "max:{:x}",
        t0.elapsed().as_nanos() ^ u128::from(std::process::id())
    );
    let mut inflight = kappa_runtime::nats::AckWindow::new(1024);
    for i in 0..n {
        let (id, msg) = reading_message(i, sensors, &stamp, &run);
        if let Some(((), a)) = inflight.make_room() {
            a.await?;
        }
        inflight.push(
            (),
            ctx.js
                .send_publish(thermo_domain::subjects::reading(&id), msg)
                .await?,
        );
    }
    for ((), a) in inflight.rest() {
        a.await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if processed(&scrape(&ctx.http, vb_http).await.unwrap_or_default()) >= before + n {
            break;
        }
        if Instant::now() > deadline {
            bail!("view-builder did not apply {n} deltas in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64().max(1e-9))
}

/// Open-loop end-to-end latency: readings published at `rate`/s for `secs` (sensors round
/// robin) until the query API's live feed (`/v1/live`, SSE) shows a view whose `source_seq`
/// covers the reading. Latency counts from each reading's *intended* send time.
pub async fn e2e(
    ctx: &Ctx,
    qa_addr: &str,
    rate: f64,
    secs: f64,
    sensors: u64,
    split: bool,
) -> anyhow::Result<(Lat, u64, u64, Option<Hops>, Option<f64>)> {
    let base = Instant::now();
    let state = Arc::new(Mutex::new(E2eState {
        hist: Some(histogram()),
        ..Default::default()
    }));
    // Live feed listener.
    let resp = ctx
        .http
        .get(format!("http://{qa_addr}/v1/live"))
        .send()
        .await
        .context("GET /v1/live")?;
    if !resp.status().is_success() {
        bail!("GET /v1/live answered {}", resp.status());
    }
    let st = state.clone();
    let listener = tokio::spawn(async move {
        let mut resp = resp;
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            let now = base.elapsed().as_micros() as u64;
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find('\n') {
                let line: String = buf.drain(..=i).collect();
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data.trim()) else {
                    continue;
                };
                let (Some(id), Some(seq)) = (
                    v.get("sensor_id").and_then(|s| s.as_str()),
                    v.get("source_seq").and_then(serde_json::Value::as_u64),
                ) else {
                    continue;
                };
                let Ok(mut s) = st.lock() else { return };
                let e = s.seen.entry(id.to_string()).or_insert((0, now));
                if seq > e.0 {
                    *e = (seq, now);
                }
                let mut done = Vec::new();
                if let Some(q) = s.pending.get_mut(id) {
                    while q.front().is_some_and(|(rs, _)| *rs <= seq) {
                        if let Some(r) = q.pop_front() {
                            done.push(r);
                        }
                    }
                }
                for (rs, intended) in done {
                    s.record(rs, intended, now);
                }
            }
        }
    });
    let delta_seen: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let view_seen: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    // The split needs two more subscribers (more work for nats-server and this process), so
    // it is a run of its own.
    let mut watches = Vec::new();
    if split {
        for (subject, into) in [
            (
                format!("{}.>", thermo_domain::subjects::DELTAS_PREFIX),
                &delta_seen,
            ),
            (
                format!("{}.>", thermo_domain::subjects::SENSOR_VIEWS_PREFIX),
                &view_seen,
            ),
        ] {
            watches.push(watch_source_seqs(
                ctx.client.subscribe(subject).await?,
                base,
                into.clone(),
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let total = (rate * secs).max(1.0) as u64;
    let ticks0 = machine_ticks();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, u64, PublishAckFuture)>(1 << 17);
    let st = state.clone();
    let acker = tokio::spawn(async move {
        let mut failed = 0u64;
        while let Some((id, intended, a)) = rx.recv().await {
            let Ok(ack) = a.await else {
                failed += 1;
                continue;
            };
            let Ok(mut s) = st.lock() else { break };
            match s.seen.get(&id).copied() {
                Some((seen_seq, at)) if seen_seq >= ack.sequence => {
                    s.record(ack.sequence, intended, at);
                }
                _ => s
                    .pending
                    .entry(id)
                    .or_default()
                    .push_back((ack.sequence, intended)),
            }
        }
        failed
    });
    let run = format!(
        "e2e:{:x}",
        base.elapsed().as_nanos() ^ u128::from(std::process::id())
    );
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let intended = (due - base).as_micros() as u64;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let (id, msg) = reading_message(i, sensors, &now, &run);
        let a = ctx
            .js
            .send_publish(thermo_domain::subjects::reading(&id), msg)
            .await?;
        let _ = tx.send((id, intended, a)).await;
    }
    drop(tx);
    let busy = busy_share(ticks0, machine_ticks());
    let failed = acker.await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if state.lock().map(|s| s.recorded).unwrap_or(0) + failed >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listener.abort();
    for w in watches {
        w.abort();
    }
    let s = state.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let h = s.hist.as_ref().context("histogram")?;
    let hops = split_hops(
        &s.visible,
        &delta_seen.lock().map_err(|_| anyhow::anyhow!("lock"))?,
        &view_seen.lock().map_err(|_| anyhow::anyhow!("lock"))?,
    );
    Ok((lat(h), s.recorded, total, hops, busy))
}

/// Splits each visible reading's latency at the times its delta and its view were seen. A
/// view carries the `source_seq` of the latest delta it holds, which is the reading's own
/// sequence (views are announced for every applied delta of a sensor).
fn split_hops(
    visible: &HashMap<u64, (u64, u64)>,
    deltas: &[(u64, u64)],
    views: &[(u64, u64)],
) -> Option<Hops> {
    let first = |seen: &[(u64, u64)]| {
        let mut m: HashMap<u64, u64> = HashMap::with_capacity(seen.len());
        for &(seq, at) in seen {
            m.entry(seq).or_insert(at);
        }
        m
    };
    let (deltas, views) = (first(deltas), first(views));
    let (mut a, mut b, mut c) = (histogram(), histogram(), histogram());
    for (seq, &(intended, live)) in visible {
        let (Some(&d), Some(&v)) = (deltas.get(seq), views.get(seq)) else {
            continue;
        };
        let _ = a.record(d.saturating_sub(intended).max(1));
        let _ = b.record(v.saturating_sub(d).max(1));
        let _ = c.record(live.saturating_sub(v).max(1));
    }
    (!a.is_empty()).then(|| Hops {
        to_delta: lat(&a),
        to_view: lat(&b),
        to_live: lat(&c),
    })
}

/// The whole DAG on fresh servers in `dir`: sensor-registry, temperature-delta (`remote`) after
/// draining `n` pre-filled readings over `sensors` sensors, view-builder after applying their
/// deltas, and query-api, every one ready. What `ryw` and `latency` measure on.
pub struct Dag {
    pub ctx: Ctx,
    pub td: Proc,
    pub vb: Proc,
    pub qa: Proc,
}

impl Dag {
    /// Starts it; `tag` prefixes the progress lines.
    pub async fn start(
        tag: &str,
        dir: &std::path::Path,
        bin_dir: PathBuf,
        n: u64,
        sensors: u64,
    ) -> anyhow::Result<Dag> {
        let servers = Servers::start(dir, false).await?;
        let mut ctx = Ctx::new(servers, bin_dir).await?;
        ctx.start_registry().await?;
        let case = TdCase::drain("remote", "semi-stateless", sensors, n);
        eprintln!("[{tag}] temperature-delta on {n} readings");
        let (_, td) = temperature_delta(&ctx, &case).await?;
        let td = td.context("temperature-delta did not stay up")?;
        let deltas = count(&ctx.js, thermo_domain::streams::DELTAS).await;
        eprintln!("[{tag}] view-builder on {deltas} deltas");
        let (_, _, vb, _) = view_builder(&ctx, deltas).await?;
        let mut qa = ctx.spawn("query-api", &[], &[])?;
        qa.wait_ready(Duration::from_secs(60)).await?;
        Ok(Dag { ctx, td, vb, qa })
    }

    /// Stops the three services (SIGTERM, then kill after 10 s each).
    pub fn stop(mut self) {
        self.qa.terminate(Duration::from_secs(10));
        self.vb.terminate(Duration::from_secs(10));
        self.td.terminate(Duration::from_secs(10));
    }
}
