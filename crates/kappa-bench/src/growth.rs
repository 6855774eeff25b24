//! `kappa-bench growth`: how temperature-delta's cost grows with the number of sensors
//! (10^3 .. 10^6), the window length and the partition count, for each working option
//! (`local`, `remote`, `affinity`): throughput, memory per sensor (the service's RSS growth
//! while draining and, for the Redis options, Redis `used_memory` growth) and recovery time
//! after `kill -9` (restart -> caught up).
//!
//! temperature-delta runs alone, as in `cost`, on servers of its own. Each configuration's
//! READINGS is pre-filled once by this process (the thermometer's JSON, one sensor after the
//! other, event times a fixed step apart per sensor) and drained by each working option in
//! turn: between options the working state, DELTAS, snapshots and leases are wiped and READINGS
//! is kept, so the next instance starts from position 0. Sensors are registered once, by the
//! thermometer, before their first configuration. The observed state is `stateful` (the
//! registry replicated in memory, bootstrapped before `/healthz` is ready), so that a lookup
//! costs the same at every size and the RSS growth from ready to drained is the working
//! state's alone. Ownership is `static`, so a restart measures recovery, not lease expiry.
//!
//! It writes its tables as a section of `BENCHMARKS.md` (between `<!-- section:growth -->`
//! markers), the key `growth` of `benchmarks.json`, and the chart `growth.svg` beside them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use serde_json::json;

use crate::chart::{Panel, Series, line_chart_svg};
use crate::durability::write_section;
use crate::infra::{Servers, rss_kib, version_of};
use crate::report::fmt_rate;
use crate::services::{self, Ctx};
use kappa_testkit::Proc;
use kappa_testkit::streams::count;

/// The section's name in `BENCHMARKS.md`.
pub const SECTION: &str = "growth";

/// The working options, in table order.
const OPTIONS: [&str; 3] = ["local", "remote", "affinity"];

/// The runtime's snapshot interval of `local` working state (`KAPPA_SNAPSHOT_SECS` default).
const SNAPSHOT_SECS: u64 = 5;

/// What one run of the mode measures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// Sensor counts of the sweep (8 partitions, the domain's 600 s window).
    pub sizes: Vec<u64>,
    /// Readings per sensor in the sweep, and the least readings of a run.
    pub per_sensor: u64,
    pub min_readings: u64,
    /// Partition counts, at `partition_sensors` sensors and `min_readings` readings.
    pub partitions: Vec<u32>,
    pub partition_sensors: u64,
    /// Windows, each over its own `window_sensors` sensors that get `window_per_sensor`
    /// readings one second apart (event time).
    pub windows: Vec<u32>,
    pub window_sensors: u64,
    pub window_per_sensor: u64,
}

impl Plan {
    /// Sizes 10^3 .. `max_sensors` (powers of ten; `max_sensors` itself if below 10^3).
    pub fn new(max_sensors: u64, min_readings: u64) -> Plan {
        let mut sizes = Vec::new();
        let mut s = 1_000u64;
        while s <= max_sensors {
            sizes.push(s);
            s *= 10;
        }
        if sizes.is_empty() {
            sizes.push(max_sensors.max(1));
        }
        let largest = sizes.last().copied().unwrap_or(1_000);
        Plan {
            partition_sensors: largest.min(10_000),
            sizes,
            // 2 readings per sensor at 10^6 sensors keep the mode near 10 minutes on 2 cores
            // (2 M readings per option); smaller sizes get `min_readings`, so that no run is
            // too short to time.
            per_sensor: 2,
            min_readings,
            partitions: vec![1, 4, 16],
            windows: vec![60, 300, 600],
            // A 600-sample window per sensor is ~14 KiB of working state: 300 sensors give
            // the RSS a few MiB to grow by, far above its noise (the full run); the small run
            // keeps 20.
            window_sensors: if max_sensors >= 100_000 { 300 } else { 20 },
            window_per_sensor: 600,
        }
    }

    fn readings(&self, sensors: u64) -> u64 {
        (sensors * self.per_sensor).max(self.min_readings)
    }
}

/// Which part of the mode a point belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Part {
    Sensors,
    Partitions,
    Window,
}

/// Restart after `kill -9`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Recovery {
    /// Spawn -> `/healthz` 200.
    ready_secs: f64,
    /// Max over partitions of the runtime's `recovery_secs` (opening the working state).
    open_secs: f64,
    /// Spawn -> every partition's position at its last reading.
    caught_up_secs: f64,
    /// Inputs the restart processed again until caught up (the runtime's
    /// `kappa_takeover_replayed_inputs`, summed over partitions): what the last snapshot
    /// did not cover.
    #[serde(default)]
    replayed: Option<f64>,
}

/// One drain of one configuration by one working option.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Point {
    part: Part,
    working: std::borrow::Cow<'static, str>,
    sensors: u64,
    readings: u64,
    partitions: u32,
    window_secs: u32,
    rate: Option<f64>,
    ready_secs: Option<f64>,
    /// VmRSS at ready and after the drain, KiB.
    rss_ready_kib: Option<u64>,
    rss_drained_kib: Option<u64>,
    /// Redis `used_memory` growth over the drain (`remote`, `affinity`), bytes.
    redis_bytes: Option<i64>,
    dead_letters: u64,
    recovery: Option<Recovery>,
    error: Option<String>,
    /// Set on a point this run did not measure (`--working` left its option out): the date
    /// of the run that did, whose figure is carried over into the tables.
    #[serde(default)]
    carried_from: Option<String>,
}

/// The points of the options this run left out, from the growth run recorded in
/// `out/benchmarks.json` (each marked with the date of the run that measured it).
fn carried_points(out: &Path, measured: &[&str]) -> Vec<Point> {
    let Some(growth) = std::fs::read_to_string(out.join("benchmarks.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|mut j| j.get_mut("growth").map(serde_json::Value::take))
    else {
        return Vec::new();
    };
    let date = growth["date"]
        .as_str()
        .unwrap_or("an earlier run")
        .to_string();
    let points: Vec<Point> = serde_json::from_value(growth["points"].clone()).unwrap_or_default();
    points
        .into_iter()
        .filter(|p| !measured.contains(&p.working.as_ref()))
        .map(|mut p| {
            p.carried_from.get_or_insert_with(|| date.clone());
            p
        })
        .collect()
}

/// A table's first cell: the option, marked † when the figure is carried over.
fn who(p: &Point) -> String {
    let mark = if p.carried_from.is_some() { " †" } else { "" };
    format!("`{}`{mark}", p.working)
}

impl Point {
    fn new(part: Part, working: &'static str, c: &Config) -> Point {
        Point {
            part,
            working: working.into(),
            sensors: c.sensors,
            readings: c.readings,
            partitions: c.partitions,
            window_secs: c.window_secs,
            rate: None,
            ready_secs: None,
            rss_ready_kib: None,
            rss_drained_kib: None,
            redis_bytes: None,
            dead_letters: 0,
            recovery: None,
            error: None,
            carried_from: None,
        }
    }

    /// RSS growth from ready to drained, bytes per sensor.
    fn rss_per_sensor(&self) -> Option<f64> {
        let (a, b) = (self.rss_ready_kib?, self.rss_drained_kib?);
        Some((b as f64 - a as f64) * 1024.0 / self.sensors.max(1) as f64)
    }

    fn redis_per_sensor(&self) -> Option<f64> {
        Some(self.redis_bytes? as f64 / self.sensors.max(1) as f64)
    }
}

/// One pre-filled READINGS.
#[derive(Debug, Clone)]
struct Config {
    prefix: String,
    sensors: u64,
    readings: u64,
    partitions: u32,
    window_secs: u32,
    /// Event-time step between one sensor's readings.
    step_ms: u64,
    recovery: bool,
}

/// Redis `INFO memory` `used_memory`, bytes.
async fn used_memory(ctx: &Ctx, url: &str) -> anyhow::Result<i64> {
    let mut c = ctx.servers.redis(url).await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no used_memory in INFO memory")
}

/// Registers `prefix-0001 ..` (`sensors` of them) with `window_secs`, through the registry.
async fn register(ctx: &Ctx, prefix: &str, sensors: u64, window_secs: u32) -> anyhow::Result<f64> {
    let t = Instant::now();
    ctx.thermometer(
        1,
        sensors,
        &[
            "--window-secs",
            &window_secs.to_string(),
            "--prefix",
            prefix,
        ],
    )
    .await?;
    Ok(t.elapsed().as_secs_f64())
}

/// Recreates READINGS with `c.partitions` partitions and publishes `c.readings` readings,
/// sensors round robin, each sensor's event times `c.step_ms` apart (ending now). Returns the
/// publish rate.
async fn prefill(ctx: &Ctx, c: &Config) -> anyhow::Result<f64> {
    let _ = ctx.js.delete_stream(thermo_domain::streams::READINGS).await;
    // READINGS as the wire contract declares it (thermo-domain's `readings_stream`).
    kappa_runtime::partition::PartitionedStream {
        stream: thermo_domain::streams::READINGS.into(),
        prefix: thermo_domain::subjects::READINGS_PREFIX.into(),
        partitions: c.partitions,
    }
    .declare_with(&ctx.js, kappa_runtime::config::StreamOptions::default())
    .await?;
    let per = c.readings.div_ceil(c.sensors.max(1));
    let now = time::OffsetDateTime::now_utc();
    let base = now - time::Duration::milliseconds((per * c.step_ms.max(1)) as i64);
    let run = format!("g:{:x}", now.unix_timestamp_nanos());
    let t0 = Instant::now();
    let mut inflight = kappa_runtime::nats::AckWindow::new(1024);
    for i in 0..c.readings {
        let (k, j) = (i % c.sensors.max(1), i / c.sensors.max(1));
        let at = (base + time::Duration::milliseconds((j * c.step_ms) as i64))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let id = format!("{}-{:04}", c.prefix, k + 1);
        let body = format!(
            r#"{{"sensor_id":"{id}","celsius":{:.3},"measured_at":"{at}"}}"#,
            20.0 + ((i * 7) % 100) as f64 / 10.0
        );
        let msg = PublishMessage::build()
            .payload(Bytes::from(body))
            .message_id(format!("{run}:{i}"));
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
    let rate = c.readings as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    let n = count(&ctx.js, thermo_domain::streams::READINGS).await;
    if n != c.readings {
        bail!("READINGS holds {n} of {}", c.readings);
    }
    Ok(rate)
}

fn spawn_td(ctx: &Ctx, working: &str, partitions: u32) -> anyhow::Result<Proc> {
    ctx.spawn(
        "temperature-delta",
        &[
            ("KAPPA_WORKING", working.to_string()),
            ("KAPPA_OBSERVED", "stateful".into()),
            ("AFFINITY_REDIS_URL", ctx.servers.affinity_url.clone()),
            ("KAPPA_OWNERSHIP", "static".into()),
            ("KAPPA_PARTITIONS", partitions.to_string()),
        ],
        &[],
    )
}

/// The Redis a working option keeps its state in.
fn redis_of<'a>(ctx: &'a Ctx, working: &str) -> Option<&'a str> {
    match working {
        "remote" => Some(&ctx.servers.redis_url),
        "affinity" => Some(&ctx.servers.affinity_url),
        _ => None,
    }
}

/// Drains the pre-filled READINGS of `c` with `working`, then (if `c.recovery`) kills it -9
/// and times the restart.
async fn drain(ctx: &Ctx, part: Part, working: &'static str, c: &Config) -> Point {
    let mut pt = Point::new(part, working, c);
    if let Err(e) = drain_into(ctx, &mut pt, c).await {
        eprintln!("    failed: {e:#}");
        pt.error = Some(crate::short(&e));
    }
    pt
}

async fn drain_into(ctx: &Ctx, pt: &mut Point, c: &Config) -> anyhow::Result<()> {
    let working: &str = &pt.working.clone();
    ctx.servers
        .wipe_except(&ctx.js, &[thermo_domain::streams::READINGS])
        .await?;
    let redis = redis_of(ctx, working);
    let redis0 = match redis {
        Some(u) => Some(used_memory(ctx, u).await?),
        None => None,
    };
    let n = c.readings;
    let mut p = spawn_td(ctx, working, c.partitions)?;
    let ready = p.wait_ready(Duration::from_secs(600)).await?;
    pt.ready_secs = Some(ready.as_secs_f64());
    pt.rss_ready_kib = rss_kib(p.pid());
    let t_ready = Instant::now();
    let done = async || {
        count(&ctx.js, thermo_domain::streams::DELTAS).await
            + count(&ctx.js, kappa_runtime::dlq::STREAM).await
    };
    let m0 = done().await.min(n);
    let deadline = t_ready + Duration::from_secs(1800);
    // A drain that makes no progress for STALL is given up: `local` at 10^5 sensors stopped
    // after 46858 of 200000 readings once (lag on every partition, no CPU, no log line, and
    // SIGTERM did not end it), and the mode must go on to the other options.
    const STALL: Duration = Duration::from_secs(60);
    let (mut last, mut moved) = (m0, Instant::now());
    loop {
        let d = done().await;
        if d >= n {
            break;
        }
        if d > last {
            (last, moved) = (d, Instant::now());
        }
        if moved.elapsed() > STALL {
            p.kill9();
            bail!(
                "stalled: drained {d} of {n}, no progress for {} s",
                STALL.as_secs()
            );
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
    pt.rate = Some((n - m0) as f64 / secs.max(1e-9));
    pt.rss_drained_kib = rss_kib(p.pid());
    pt.dead_letters = count(&ctx.js, kappa_runtime::dlq::STREAM).await;
    if let (Some(u), Some(r0)) = (redis, redis0) {
        pt.redis_bytes = Some(used_memory(ctx, u).await? - r0);
    }
    eprintln!(
        "    {:.0} readings/s, ready {:.2}s, RSS {:?} -> {:?} KiB, redis +{:?} B",
        pt.rate.unwrap_or(0.0),
        ready.as_secs_f64(),
        pt.rss_ready_kib,
        pt.rss_drained_kib,
        pt.redis_bytes
    );
    if !c.recovery {
        p.terminate(Duration::from_secs(10));
        return Ok(());
    }
    // The last snapshot of `local` then covers the whole drain, so the restart loads a
    // snapshot of every sensor's window and replays (almost) nothing: what grows with state.
    tokio::time::sleep(Duration::from_secs(SNAPSHOT_SECS + 1)).await;
    p.kill9();
    let lasts = ctx
        .partition_lasts_of(
            thermo_domain::streams::READINGS,
            thermo_domain::subjects::READINGS_PREFIX,
            c.partitions,
        )
        .await?;
    let spawned = Instant::now();
    let mut q = spawn_td(ctx, working, c.partitions)?;
    let ready = q.wait_ready(Duration::from_secs(600)).await?;
    let open = services::wait_caught_up_within(ctx, &q, &lasts, Duration::from_secs(120)).await;
    let caught_up = spawned.elapsed().as_secs_f64();
    let replayed = match open {
        Ok(_) => replayed_inputs(ctx, &q).await,
        Err(_) => None,
    };
    if open.is_err() {
        q.kill9();
    }
    q.terminate(Duration::from_secs(10));
    let open = open?;
    eprintln!(
        "    restart: ready {:.2}s, open {open:.3}s, caught up {caught_up:.2}s, replayed {replayed:?}",
        ready.as_secs_f64()
    );
    pt.recovery = Some(Recovery {
        ready_secs: ready.as_secs_f64(),
        open_secs: open,
        caught_up_secs: caught_up,
        replayed,
    });
    Ok(())
}

/// The inputs `q` replayed until caught up, summed over its partitions (`None` if its metrics
/// do not answer). A partition that had nothing to replay reports no figure (it counts 0); one
/// that did sets it as it catches up, which the wait of half a second leaves time for.
async fn replayed_inputs(ctx: &Ctx, q: &Proc) -> Option<f64> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let page = kappa_testkit::metrics::scrape(&ctx.http, &q.http).await?;
    Some(kappa_testkit::metrics::sum(
        &page,
        "kappa_takeover_replayed_inputs",
    ))
}

/// Pre-fills `c` and drains it with every option.
async fn configuration(
    ctx: &Ctx,
    options: &[&'static str],
    part: Part,
    c: &Config,
    points: &mut Vec<Point>,
) {
    eprintln!(
        "[growth] {part:?}: {} sensors, {} readings, {} partitions, window {} s",
        c.sensors, c.readings, c.partitions, c.window_secs
    );
    if let Err(e) = prefill(ctx, c).await {
        eprintln!("  pre-fill failed: {e:#}");
        for &w in options {
            let mut pt = Point::new(part, w, c);
            pt.error = Some(format!("pre-fill: {}", crate::short(&e)));
            points.push(pt);
        }
        return;
    }
    for &w in options {
        eprintln!("  temperature-delta `{w}`");
        points.push(drain(ctx, part, w, c).await);
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

fn bytes(v: Option<f64>) -> String {
    opt(v, |b| format!("{b:.0}"))
}

/// The colours of the options in the chart.
fn color(working: &str) -> &'static str {
    match working {
        "local" => "#1f77b4",
        "remote" => "#d62728",
        _ => "#2ca02c",
    }
}

/// The chart of the sensor sweep: throughput, and memory per sensor (service RSS solid, Redis
/// dashed), against sensors on a log axis.
fn chart(points: &[Point]) -> String {
    fn sweep<'a>(points: &'a [Point], w: &'a str) -> impl Iterator<Item = &'a Point> + 'a {
        points
            .iter()
            .filter(move |p| p.part == Part::Sensors && p.working == w)
    }
    let throughput = OPTIONS
        .iter()
        .map(|&w| Series {
            name: w.to_string(),
            points: sweep(points, w)
                .map(|p| (p.sensors as f64, p.rate.unwrap_or(f64::NAN)))
                .collect(),
            color: color(w),
            dashed: false,
        })
        .collect();
    let mut memory: Vec<Series> = OPTIONS
        .iter()
        .map(|&w| Series {
            name: format!("{w}: service RSS"),
            points: sweep(points, w)
                .map(|p| (p.sensors as f64, p.rss_per_sensor().unwrap_or(f64::NAN)))
                .collect(),
            color: color(w),
            dashed: false,
        })
        .collect();
    for w in ["remote", "affinity"] {
        memory.push(Series {
            name: format!("{w}: Redis used_memory"),
            points: sweep(points, w)
                .map(|p| (p.sensors as f64, p.redis_per_sensor().unwrap_or(f64::NAN)))
                .collect(),
            color: color(w),
            dashed: true,
        });
    }
    line_chart_svg(
        "temperature-delta: growth with sensors (8 partitions, 600 s window)",
        "sensors (log scale)",
        &[
            Panel {
                title: "throughput".into(),
                y_label: "readings/s".into(),
                series: throughput,
                log_y: false,
            },
            Panel {
                // Log: at 10^3 sensors the fixed growth (buffers, first batches) divided by
                // few sensors is 100x the per-sensor figure at 10^6 (measured, the small run).
                title: "memory per sensor (growth over the drain, log)".into(),
                y_label: "bytes per sensor".into(),
                series: memory,
                log_y: true,
            },
        ],
    )
}

/// Runs the mode and writes its section and chart.
/// What the command line asks of the mode.
pub struct Sweep {
    /// The least readings of a run (default 50000).
    pub readings: Option<u64>,
    /// The largest sensor count (default 10^6).
    pub max_sensors: Option<u64>,
    /// Only these working options (empty: all).
    pub working: Vec<String>,
}

pub async fn run(
    root: &Path,
    bin_dir: PathBuf,
    out: PathBuf,
    sweep: Sweep,
    command: String,
) -> anyhow::Result<()> {
    let plan = Plan::new(
        sweep.max_sensors.unwrap_or(1_000_000),
        sweep.readings.unwrap_or(50_000),
    );
    if let Some(w) = sweep
        .working
        .iter()
        .find(|w| !OPTIONS.contains(&w.as_str()))
    {
        anyhow::bail!("--working {w}: not one of {}", OPTIONS.join(", "));
    }
    let options: Vec<&'static str> = OPTIONS
        .into_iter()
        .filter(|o| sweep.working.is_empty() || sweep.working.iter().any(|w| w == o))
        .collect();
    let dir = root.join(format!("target/bench-tmp/growth-{}", std::process::id()));
    let started = Instant::now();
    let load_at_start = crate::report::load_average();
    let servers = Servers::start(&dir, false).await?;
    let mut ctx = Ctx::new(servers, bin_dir).await?;
    ctx.start_registry().await?;
    let mut points: Vec<Point> = Vec::new();
    let mut registration: Vec<(String, u64, f64)> = Vec::new();

    // Windows first, while few sensors are registered (every start bootstraps them all).
    for &w in &plan.windows {
        let prefix = format!("w{w}");
        let secs = register(&ctx, &prefix, plan.window_sensors, w).await?;
        registration.push((prefix.clone(), plan.window_sensors, secs));
        let c = Config {
            prefix,
            sensors: plan.window_sensors,
            readings: plan.window_sensors * plan.window_per_sensor,
            partitions: 8,
            window_secs: w,
            step_ms: 1000,
            recovery: true,
        };
        configuration(&ctx, &options, Part::Window, &c, &mut points).await;
    }
    for &s in &plan.sizes {
        let secs = register(&ctx, "s", s, thermo_domain::sensor::DEFAULT_WINDOW_SECS).await?;
        eprintln!("[growth] registered {s} sensors in {secs:.1} s");
        registration.push(("s".into(), s, secs));
        let c = Config {
            prefix: "s".into(),
            sensors: s,
            readings: plan.readings(s),
            partitions: 8,
            window_secs: thermo_domain::sensor::DEFAULT_WINDOW_SECS,
            step_ms: 1000,
            recovery: true,
        };
        configuration(&ctx, &options, Part::Sensors, &c, &mut points).await;
        if s == plan.partition_sensors {
            for &p in &plan.partitions {
                let c = Config {
                    partitions: p,
                    readings: plan.min_readings,
                    recovery: false,
                    ..c.clone()
                };
                configuration(&ctx, &options, Part::Partitions, &c, &mut points).await;
            }
        }
    }
    drop(ctx);
    let _ = std::fs::remove_dir_all(&dir);
    if !sweep.working.is_empty() {
        points.extend(carried_points(&out, &options));
    }

    let (date, nproc) = crate::report::stamp();
    let loads = (load_at_start, crate::report::load_average());
    let body = section(
        &plan,
        &points,
        &command,
        &date,
        nproc,
        started.elapsed(),
        loads,
    );
    std::fs::create_dir_all(&out)?;
    let svg_path = out.join("growth.svg");
    std::fs::write(&svg_path, chart(&points))?;
    eprintln!("wrote {}", svg_path.display());
    write_section(
        &out,
        SECTION,
        &body,
        json!({"date": date, "command": command, "plan": plan, "points": points,
            "registration": registration.iter().map(|(p, n, s)| json!({"prefix": p, "sensors": n, "secs": s})).collect::<Vec<_>>()}),
    )
}

fn find(points: &[Point], f: impl Fn(&Point) -> bool) -> Option<&Point> {
    points.iter().find(|p| f(p))
}

/// The section's Markdown.
fn section(
    plan: &Plan,
    points: &[Point],
    command: &str,
    date: &str,
    nproc: usize,
    took: Duration,
    loads: (Option<f64>, Option<f64>),
) -> String {
    let load = |l: Option<f64>| opt(l, |l| format!("{l:.2}"));
    let mut b = String::new();
    b.push_str("## Growth: sensors, window length, partitions\n\n");
    b.push_str(&format!(
        "Generated by `{command}` on {date} ({nproc} CPUs; 1-minute load average {} at the \
         start and {} at the end, the benchmark's own processes included; one run per figure, \
         so the ratios within this run, memory per sensor and the growth of recovery are what \
         to read; {}), \
         separately from the tables above. temperature-delta alone, `KAPPA_OBSERVED=stateful` \
         (the registry replicated in memory before ready: every lookup costs the same at every \
         size), `KAPPA_OWNERSHIP=static`. Each configuration's READINGS is pre-filled once \
         (each sensor's readings 1 s apart in event time) and drained by each working option \
         in turn from position 0; one run per figure (no rounds: the 10^6 drains alone take \
         minutes). *readings/s* = readings drained / (ready -> DELTAS+DLQ hold them all). \
         *RSS B/sensor* = (VmRSS after the drain − VmRSS at ready) / sensors: the working \
         state's growth, the registry replica already loaded at ready. *Redis B/sensor* = \
         `INFO memory` `used_memory` growth over the drain / sensors (the TCP Redis for \
         `remote`, the colocated one for `affinity`). *Recovery*: {}s after the drain (one \
         snapshot interval: `local`'s last snapshot covers the drain if its flush of every \
         changed entity took less; *replayed inputs* says what it did not cover), `kill -9`, \
         restart: *ready* \
         = spawn -> `/healthz` 200 (includes bootstrapping the registry replica), *open* = the \
         runtime's `recovery_secs` (max over partitions), *caught up* = spawn -> every \
         partition's position at its last reading. This run took {:.0} s.\n\n",
        load(loads.0),
        load(loads.1),
        version_of("nats-server", "--version"),
        SNAPSHOT_SECS + 1,
        took.as_secs_f64()
    ));
    let mut carried: Vec<&str> = points
        .iter()
        .filter_map(|p| p.carried_from.as_deref())
        .collect();
    carried.sort_unstable();
    carried.dedup();
    if !carried.is_empty() {
        b.push_str(&format!(
            "† not rerun by this command (its `--working` left the option out): carried over \
             from the run of {}, on the machine as it was then.\n\n",
            carried.join(", ")
        ));
    }
    b.push_str("![temperature-delta: throughput and memory per sensor against sensors, per working option](growth.svg)\n\n");

    // Sensors.
    let smallest = plan.sizes.first().copied().unwrap_or(0);
    b.push_str(&format!(
        "### Sensors\n\n8 partitions, window 600 s (the domain's default), {} readings per \
         sensor and at least {} per run. Ratio: to the same option at {smallest} sensors. \
         *marginal* = (growth here − growth at the size above it in the table) / (sensors here \
         − sensors there): the per-sensor cost without the fixed growth (buffers, first \
         batches) that dominates the plain quotient at small sizes.\n\n",
        plan.per_sensor, plan.min_readings
    ));
    b.push_str("| working | sensors | readings | readings/s | / smallest | RSS at ready MiB | RSS B/sensor | marginal RSS B/sensor | Redis B/sensor | marginal Redis B/sensor | restart ready s | open s | caught up s | replayed inputs | DLQ |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for w in OPTIONS {
        let base = find(points, |p| {
            p.part == Part::Sensors && p.working == w && p.sensors == smallest
        })
        .and_then(|p| p.rate);
        let mut prev: Option<&Point> = None;
        for p in points
            .iter()
            .filter(|p| p.part == Part::Sensors && p.working == w)
        {
            b.push_str(&row_sensors(p, prev, base));
            prev = Some(p).filter(|p| p.error.is_none());
        }
    }
    b.push('\n');

    // Window.
    b.push_str(&format!(
        "### Window length\n\n{} sensors per window (registered with it), {} readings each, \
         1 s apart: a window of W s holds min(W, {}) samples per sensor. 8 partitions. Ratio: \
         to the same option at the shortest window.\n\n",
        plan.window_sensors, plan.window_per_sensor, plan.window_per_sensor
    ));
    b.push_str("| working | window s | samples per sensor | readings/s | / shortest | RSS B/sensor | Redis B/sensor | caught up s | DLQ |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let shortest = plan.windows.first().copied().unwrap_or(0);
    for w in OPTIONS {
        let base = find(points, |p| {
            p.part == Part::Window && p.working == w && p.window_secs == shortest
        })
        .and_then(|p| p.rate);
        for p in points
            .iter()
            .filter(|p| p.part == Part::Window && p.working == w)
        {
            b.push_str(&match &p.error {
                Some(e) => format!(
                    "| {} | {} | - | not measured: {} | | | | | |\n",
                    who(p),
                    p.window_secs,
                    e.replace('|', "\\|")
                ),
                None => format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    who(p),
                    p.window_secs,
                    u64::from(p.window_secs).min(plan.window_per_sensor),
                    opt(p.rate, fmt_rate),
                    ratio(p.rate, base),
                    bytes(p.rss_per_sensor()),
                    bytes(p.redis_per_sensor()),
                    opt(p.recovery.as_ref(), |r| format!("{:.2}", r.caught_up_secs)),
                    p.dead_letters
                ),
            });
        }
    }
    b.push('\n');

    // Partitions.
    let first_p = plan.partitions.first().copied().unwrap_or(1);
    b.push_str(&format!(
        "### Partitions\n\n{} sensors, {} readings, window 600 s; `KAPPA_PARTITIONS` and \
         READINGS' partitions set to the count (the 8-partition figure is the sensor table's, \
         with its own reading count). Ratio: to the same option at {first_p} partition(s).\n\n",
        plan.partition_sensors, plan.min_readings
    ));
    b.push_str("| working | partitions | readings/s | / fewest | RSS B/sensor | Redis B/sensor | DLQ |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for w in OPTIONS {
        let base = find(points, |p| {
            p.part == Part::Partitions && p.working == w && p.partitions == first_p
        })
        .and_then(|p| p.rate);
        for p in points
            .iter()
            .filter(|p| p.part == Part::Partitions && p.working == w)
        {
            b.push_str(&match &p.error {
                Some(e) => format!(
                    "| {} | {} | not measured: {} | | | | |\n",
                    who(p),
                    p.partitions,
                    e.replace('|', "\\|")
                ),
                None => format!(
                    "| {} | {} | {} | {} | {} | {} | {} |\n",
                    who(p),
                    p.partitions,
                    opt(p.rate, fmt_rate),
                    ratio(p.rate, base),
                    bytes(p.rss_per_sensor()),
                    bytes(p.redis_per_sensor()),
                    p.dead_letters
                ),
            });
        }
    }
    b.push('\n');
    b.push_str(
        "Reproduce: `cargo build --release --bins && cargo run --release -p kappa-bench -- growth` \
         (`--max-sensors N` for a smaller sweep, e.g. `--max-sensors 10000 --readings 5000` runs \
         in about two minutes on 2 loaded cores; `--readings` is the least readings of a run; writes only this \
         section of BENCHMARKS.md, the key `growth` of benchmarks.json and growth.svg).\n\n",
    );
    b
}

/// Growth per sensor between two sizes of the sweep, bytes (`growth` in bytes).
fn marginal(
    p: &Point,
    prev: Option<&Point>,
    growth: impl Fn(&Point) -> Option<f64>,
) -> Option<f64> {
    let q = prev?;
    let ds = p.sensors as f64 - q.sensors as f64;
    (ds > 0.0).then_some((growth(p)? - growth(q)?) / ds)
}

fn row_sensors(p: &Point, prev: Option<&Point>, base: Option<f64>) -> String {
    if let Some(e) = &p.error {
        return format!(
            "| {} | {} | {} | not measured: {} | | | | | | | | | | | |\n",
            who(p),
            p.sensors,
            p.readings,
            e.replace('|', "\\|")
        );
    }
    let rec = p.recovery.as_ref();
    let rss = |p: &Point| Some(p.rss_per_sensor()? * p.sensors as f64);
    let redis = |p: &Point| p.redis_bytes.map(|b| b as f64);
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        who(p),
        p.sensors,
        p.readings,
        opt(p.rate, fmt_rate),
        ratio(p.rate, base),
        opt(p.rss_ready_kib, |k| format!("{:.1}", k as f64 / 1024.0)),
        bytes(p.rss_per_sensor()),
        bytes(marginal(p, prev, rss)),
        bytes(p.redis_per_sensor()),
        bytes(marginal(p, prev, redis)),
        opt(rec, |r| format!("{:.2}", r.ready_secs)),
        opt(rec, |r| format!("{:.3}", r.open_secs)),
        opt(rec, |r| format!("{:.2}", r.caught_up_secs)),
        opt(rec.and_then(|r| r.replayed), |n| format!("{n:.0}")),
        p.dead_letters
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filtered_run_carries_the_other_options_rows_over_with_their_date() {
        let dir = std::env::temp_dir().join(format!("growth-carry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let c = Config {
            prefix: "s".into(),
            sensors: 1000,
            readings: 2000,
            partitions: 8,
            window_secs: 600,
            step_ms: 1000,
            recovery: true,
        };
        let mut remote = Point::new(Part::Sensors, "remote", &c);
        remote.rate = Some(1234.0);
        let mut old_affinity = Point::new(Part::Window, "affinity", &c);
        old_affinity.carried_from = Some("the first run".into());
        let local = Point::new(Part::Sensors, "local", &c);
        let stored = json!({"growth": {"date": "the second run",
            "points": [remote, old_affinity, local]}});
        std::fs::write(dir.join("benchmarks.json"), stored.to_string()).expect("write");

        let carried = carried_points(&dir, &["local"]);
        let _ = std::fs::remove_dir_all(&dir);
        let seen: Vec<(&str, Option<&str>, Option<f64>)> = carried
            .iter()
            .map(|p| (p.working.as_ref(), p.carried_from.as_deref(), p.rate))
            .collect();
        assert_eq!(
            seen,
            [
                ("remote", Some("the second run"), Some(1234.0)),
                ("affinity", Some("the first run"), None)
            ]
        );
        assert_eq!(who(&carried[0]), "`remote` †");
        assert!(
            carried_points(&dir, &["local"]).is_empty(),
            "no file, nothing carried"
        );
    }

    #[test]
    fn plan_sizes_are_powers_of_ten_up_to_the_max() {
        assert_eq!(
            Plan::new(1_000_000, 50_000).sizes,
            vec![1_000, 10_000, 100_000, 1_000_000]
        );
        assert_eq!(Plan::new(10_000, 5_000).sizes, vec![1_000, 10_000]);
        assert_eq!(Plan::new(200, 5_000).sizes, vec![200]);
        let p = Plan::new(1_000_000, 50_000);
        assert_eq!(p.readings(1_000), 50_000);
        assert_eq!(p.readings(1_000_000), 2_000_000);
        assert_eq!(p.partition_sensors, 10_000);
    }

    #[test]
    fn memory_per_sensor_is_growth_over_sensors() {
        let c = Config {
            prefix: "s".into(),
            sensors: 1_000,
            readings: 2_000,
            partitions: 8,
            window_secs: 600,
            step_ms: 1000,
            recovery: false,
        };
        let mut p = Point::new(Part::Sensors, "remote", &c);
        assert_eq!(p.rss_per_sensor(), None);
        p.rss_ready_kib = Some(10_000);
        p.rss_drained_kib = Some(11_000);
        p.redis_bytes = Some(300_000);
        assert_eq!(p.rss_per_sensor(), Some(1024.0));
        assert_eq!(p.redis_per_sensor(), Some(300.0));
        let mut q = p.clone();
        q.sensors = 11_000;
        q.rss_drained_kib = Some(12_000);
        // 1000 KiB more growth over 10 000 more sensors.
        let rss = |p: &Point| Some(p.rss_per_sensor()? * p.sensors as f64);
        assert_eq!(
            marginal(&q, Some(&p), rss),
            Some(1000.0 * 1024.0 / 10_000.0)
        );
        assert_eq!(marginal(&q, None, rss), None);
        let svg = chart(&[p, q]);
        assert!(svg.contains("remote: Redis used_memory"));
    }
}
