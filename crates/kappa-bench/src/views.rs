//! `kappa-bench views`: view-builder against a fair baseline (issue 14, item 4). The baseline
//! is a relay in kappa-bench that reads the same DELTAS (one pull consumer per partition, batch
//! 256, ack policy `none`, as the runtime driver) and writes, per batch, in ONE Redis pipeline,
//! the same structures per delta that view-builder's APPLY script writes (the sensor hash with
//! `delta`, `seq`, `meta`, `mv`, `site`, `src`; the history list pushed and trimmed; the site,
//! rank and sensors sorted sets; the sites set; the partition's position, source and epoch),
//! then announces the batch's changed views on `thermo.views.sensor.<id>` as view-builder does
//! (one per sensor changed in the batch, its latest view as JSON). It has none of the service's
//! logic: no validation, no fencing, no replay or per-point sequence checks, no registry
//! lookups, no folding, nothing atomic. view-builder drains the same DELTAS from scratch (a
//! fresh Redis database) in the same rounds; rounds alternate so that a moment of load on the
//! shared machine hits both, and each figure is the median of its rounds.
//!
//! It writes its table as a section of `BENCHMARKS.md` (between `<!-- section:views -->`
//! markers) and the key `views` of `benchmarks.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use kappa_runtime::partition::{PartitionedStream, entity_of, stream_identity};
use kappa_testkit::metrics::{scrape, sum as metric_sum};
use kappa_testkit::streams::count;
use serde_json::json;
use thermo_domain::Delta;
use thermo_domain::views::{HistoryEntry, Keys, SensorMeta, compose, rank_score};

use crate::baseline::{BATCH, PARTITIONS};
use crate::durability::write_section;
use crate::infra::{Servers, version_of};
use crate::report::fmt_rate;
use crate::services::{self, Ctx, TdCase};

/// The section's name in `BENCHMARKS.md`.
pub const SECTION: &str = "views";

/// view-builder's default `HISTORY_LEN`.
const HISTORY_LEN: i64 = 120;

/// The goal: view-builder's throughput at least this share of the baseline's.
const GOAL: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
enum Scenario {
    /// The relay writing the views' structures in one pipeline per batch.
    Baseline,
    /// view-builder, as deployed (`KAPPA_OBSERVED=semi-stateless`).
    ViewBuilder,
}

const SCENARIOS: [Scenario; 2] = [Scenario::Baseline, Scenario::ViewBuilder];

fn label(s: Scenario) -> &'static str {
    match s {
        Scenario::Baseline => {
            "relay (baseline): DELTAS -> the views' structures per delta, one Redis pipeline per batch, + view announcements, in kappa-bench"
        }
        Scenario::ViewBuilder => "view-builder (`KAPPA_OBSERVED=semi-stateless`)",
    }
}

/// One run of a scenario.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Run {
    /// Deltas/s, from the first batch seen applied to the last.
    rate: Option<f64>,
    /// CPU µs per delta of each process over the same span.
    cpu_us: Vec<(&'static str, f64)>,
    batches: f64,
    mean_batch: f64,
    /// Mean time per batch (the baseline: build + pipeline + publish; view-builder:
    /// `kappa_batch_seconds`, the whole `process`).
    mean_batch_ms: f64,
    /// view-builder: mean time in the store's APPLY call per batch (`kappa_views_apply_seconds`).
    mean_apply_ms: Option<f64>,
    /// Commands Redis executed per batch (`INFO stats` total_commands_processed: each command
    /// of a pipeline, and each `redis.call` inside a script besides the script's own call).
    redis_cmds_per_batch: f64,
    /// View changes announced.
    announced: f64,
    error: Option<String>,
}

impl Run {
    fn cpu_total(&self) -> Option<f64> {
        (!self.cpu_us.is_empty()).then(|| self.cpu_us.iter().map(|(_, v)| v).sum())
    }
}

/// Redis's `total_commands_processed`.
async fn redis_commands(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no total_commands_processed in INFO stats")
}

/// CPU of `name` (this process when `pid` is `None`), nats-server, redis-server and
/// sensor-registry (which answers view-builder's lookups).
fn meter(ctx: &Ctx, name: &'static str, pid: Option<u32>) -> crate::infra::CpuMeter {
    let mut procs = vec![(name, pid.unwrap_or_else(std::process::id))];
    procs.extend(ctx.servers.nats_pid.map(|p| ("nats-server", p)));
    procs.extend(ctx.servers.redis_pid.map(|p| ("redis-server", p)));
    procs.extend(ctx.registry.as_ref().map(|p| ("sensor-registry", p.pid())));
    crate::infra::CpuMeter::start(&procs)
}

/// Batch counters of the baseline.
#[derive(Default)]
struct Counters {
    done: AtomicU64,
    batches: AtomicU64,
    batch_ns: AtomicU64,
    announced: AtomicU64,
}

/// What every partition of the baseline shares.
#[derive(Clone)]
struct Relay {
    js: jetstream::Context,
    client: async_nats::Client,
    redis: redis::aio::MultiplexedConnection,
    input: PartitionedStream,
    /// The deltas stream's identity, stored as the views' `src`.
    source: u64,
    counters: Arc<Counters>,
}

/// Writes one batch as view-builder's views hold it, in one pipeline, then announces it.
async fn relay_batch(
    r: &Relay,
    keys: &Keys,
    p: u32,
    msgs: &[jetstream::Message],
) -> anyhow::Result<()> {
    let mut conn = r.redis.clone();
    let mut pipe = redis::pipe();
    let mut last = 0;
    // Each sensor's latest delta of the batch (what view-builder announces).
    let mut latest: HashMap<String, (Delta, u64, SensorMeta)> = HashMap::new();
    for m in msgs {
        let Ok(info) = m.info() else { continue };
        let seq = info.stream_sequence;
        last = seq;
        let id = entity_of(m.subject.as_str());
        // The fields the structures need: the score, the site, the history point, the meta.
        let Ok(d) = serde_json::from_slice::<Delta>(&m.payload) else {
            continue;
        };
        let meta = SensorMeta::from_delta(&d);
        let meta_json = serde_json::to_string(&meta)?;
        let point = serde_json::to_string(&HistoryEntry::of(&d, seq))?;
        let score = rank_score(d.delta_celsius);
        let (sk, hk) = (keys.sensor(id), keys.history(id));
        pipe.cmd("HSET")
            .arg(&sk)
            .arg("delta")
            .arg(m.payload.as_ref())
            .arg("seq")
            .arg(seq)
            .arg("meta")
            .arg(meta_json)
            .arg("mv")
            .arg(meta.version)
            .arg("site")
            .arg(&meta.site)
            .arg("src")
            .arg(r.source)
            .ignore();
        pipe.cmd("RPUSH").arg(&hk).arg(point).ignore();
        pipe.cmd("LTRIM")
            .arg(&hk)
            .arg(-HISTORY_LEN)
            .arg(-1)
            .ignore();
        pipe.cmd("ZADD")
            .arg(keys.site(&meta.site))
            .arg(score)
            .arg(id)
            .ignore();
        pipe.cmd("ZADD")
            .arg(keys.rank())
            .arg(score)
            .arg(id)
            .ignore();
        pipe.cmd("ZADD").arg(keys.sensors()).arg(0).arg(id).ignore();
        pipe.cmd("SADD").arg(keys.sites()).arg(&meta.site).ignore();
        latest.insert(d.sensor_id.clone(), (d, seq, meta));
    }
    pipe.cmd("HSET")
        .arg(keys.positions())
        .arg(p)
        .arg(last)
        .ignore();
    pipe.cmd("HSET")
        .arg("views:{0}:sources")
        .arg(p)
        .arg(r.source)
        .ignore();
    pipe.cmd("HSET").arg(keys.epochs()).arg(p).arg(0).ignore();
    let _: () = pipe.query_async(&mut conn).await?;
    let mut announced = 0;
    for (id, (d, seq, meta)) in latest {
        let body = serde_json::to_vec(&compose(&d, seq, meta))?;
        r.client
            .publish(thermo_domain::subjects::sensor_view(&id), body.into())
            .await?;
        announced += 1;
    }
    r.counters.announced.fetch_add(announced, Ordering::Relaxed);
    Ok(())
}

async fn relay_partition(r: Relay, p: u32) -> anyhow::Result<()> {
    let stream = r.js.get_stream_no_info(&r.input.stream).await?;
    let name = format!("bench-views-p{p}");
    let _ = stream.delete_consumer(&name).await;
    let c = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: r.input.filter(p),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let msgs = c
        .stream()
        .max_messages_per_batch(BATCH)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let keys = Keys::new("0");
    let mut chunks = msgs.ready_chunks(BATCH);
    while let Some(chunk) = chunks.next().await {
        let msgs: Vec<_> = chunk.into_iter().filter_map(Result::ok).collect();
        if msgs.is_empty() {
            continue;
        }
        let t0 = Instant::now();
        relay_batch(&r, &keys, p, &msgs).await?;
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let k = &r.counters;
        k.batch_ns.fetch_add(ns, Ordering::Relaxed);
        k.batches.fetch_add(1, Ordering::Relaxed);
        k.done.fetch_add(msgs.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// The baseline over the `n` deltas of DELTAS, into a fresh Redis database.
async fn run_baseline(ctx: &Ctx, n: u64) -> anyhow::Result<Run> {
    // The deltas stream as the wire contract declares it.
    let input = PartitionedStream {
        stream: thermo_domain::streams::DELTAS.into(),
        prefix: thermo_domain::subjects::DELTAS_PREFIX.into(),
        partitions: PARTITIONS,
    };
    let (source, _) = stream_identity(&ctx.js, &input.stream).await?;
    kappa_testkit::clients::flushall(&ctx.servers.redis_url).await?;
    let mut info = ctx.servers.redis(&ctx.servers.redis_url).await?;
    let relay = Relay {
        js: ctx.js.clone(),
        client: ctx.client.clone(),
        redis: ctx.servers.redis(&ctx.servers.redis_url).await?,
        input: input.clone(),
        source,
        counters: Arc::new(Counters::default()),
    };
    let k = relay.counters.clone();
    let tasks: Vec<_> = (0..input.partitions)
        .map(|p| tokio::spawn(relay_partition(relay.clone(), p)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    // The clock and the meters start at the first progress seen (as for view-builder).
    let mut first: Option<(Instant, u64, crate::infra::CpuMeter, f64, u64, u64)> = None;
    let result = loop {
        let d = k.done.load(Ordering::Relaxed);
        if d > 0 && first.is_none() {
            let cmds = redis_commands(&mut info).await?;
            first = Some((
                Instant::now(),
                d,
                meter(ctx, "kappa-bench (relay)", None),
                cmds,
                k.batches.load(Ordering::Relaxed),
                k.batch_ns.load(Ordering::Relaxed),
            ));
        }
        if d >= n {
            break Ok(Instant::now());
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("the baseline did only {d} of {n}"));
        }
        if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
            let _ = t;
            break Err(anyhow::anyhow!("a baseline partition stopped early"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    for t in &tasks {
        t.abort();
    }
    let done_at = result?;
    let (t, m, meter, cmds0, b0, ns0) = first.context("no progress")?;
    let cpu_us = meter.per_msg(n - m);
    let cmds = redis_commands(&mut info).await? - cmds0;
    let batches = (k.batches.load(Ordering::Relaxed) - b0) as f64;
    let ns = (k.batch_ns.load(Ordering::Relaxed) - ns0) as f64;
    let stream = ctx.js.get_stream_no_info(&input.stream).await?;
    for p in 0..input.partitions {
        let _ = stream.delete_consumer(&format!("bench-views-p{p}")).await;
    }
    Ok(Run {
        rate: Some((n - m) as f64 / (done_at - t).as_secs_f64().max(1e-9)),
        cpu_us,
        batches,
        mean_batch: (n - m) as f64 / batches.max(1.0),
        mean_batch_ms: ns / 1e6 / batches.max(1.0),
        mean_apply_ms: None,
        redis_cmds_per_batch: cmds / batches.max(1.0),
        announced: k.announced.load(Ordering::Relaxed) as f64,
        error: None,
    })
}

/// view-builder draining the `n` deltas of DELTAS into a fresh Redis database.
async fn run_view_builder(ctx: &Ctx, n: u64) -> anyhow::Result<Run> {
    kappa_testkit::clients::flushall(&ctx.servers.redis_url).await?;
    let mut info = ctx.servers.redis(&ctx.servers.redis_url).await?;
    let spawned = Instant::now();
    let mut p = ctx.spawn(
        "view-builder",
        &[("KAPPA_OBSERVED", "semi-stateless".into())],
        &[],
    )?;
    let m = |page: &str, name: &str| metric_sum(page, name);
    let deadline = spawned + Duration::from_secs(600);
    let mut first: Option<(Instant, u64, crate::infra::CpuMeter, f64, String)> = None;
    let r: anyhow::Result<Run> = async {
        let (done_at, last_page) = loop {
            let page = scrape(&ctx.http, &p.http).await.unwrap_or_default();
            let d = m(&page, "kappa_processed_total") as u64;
            if d > 0 && first.is_none() {
                first = Some((
                    Instant::now(),
                    d,
                    meter(ctx, "view-builder", Some(p.pid())),
                    redis_commands(&mut info).await?,
                    page.clone(),
                ));
            }
            if d >= n {
                break (Instant::now(), page);
            }
            if Instant::now() > deadline || !p.alive() {
                anyhow::bail!("view-builder applied {d} of {n}; log:\n{}", p.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let (t, d0, meter, cmds0, page0) = first.take().context("no progress")?;
        let cpu_us = meter.per_msg(n - d0);
        let cmds = redis_commands(&mut info).await? - cmds0;
        let diff = |name: &str| m(&last_page, name) - m(&page0, name);
        let batches = diff("kappa_batch_seconds_count");
        Ok(Run {
            rate: Some((n - d0) as f64 / (done_at - t).as_secs_f64().max(1e-9)),
            cpu_us,
            batches,
            mean_batch: diff("kappa_batch_size_sum") / batches.max(1.0),
            mean_batch_ms: diff("kappa_batch_seconds_sum") * 1000.0 / batches.max(1.0),
            mean_apply_ms: Some(
                diff("kappa_views_apply_seconds_sum") * 1000.0
                    / diff("kappa_views_apply_seconds_count").max(1.0),
            ),
            redis_cmds_per_batch: cmds / batches.max(1.0),
            announced: m(&last_page, "kappa_views_announced_total"),
            error: None,
        })
    }
    .await;
    p.terminate(Duration::from_secs(10));
    r
}

async fn run_one(ctx: &Ctx, s: Scenario, n: u64) -> Run {
    let r = match s {
        Scenario::Baseline => run_baseline(ctx, n).await,
        Scenario::ViewBuilder => run_view_builder(ctx, n).await,
    };
    r.unwrap_or_else(|e| Run {
        error: Some(crate::short(&e)),
        ..Default::default()
    })
}

/// Pre-fills DELTAS: the thermometer publishes `readings` readings, temperature-delta turns
/// them into as many deltas. Returns the number of deltas.
async fn prefill(ctx: &Ctx, readings: u64, sensors: u64) -> anyhow::Result<u64> {
    let case = TdCase::drain("local", "semi-stateless", sensors, readings);
    let (_, p) = services::temperature_delta(ctx, &case).await?;
    if let Some(mut p) = p {
        p.terminate(Duration::from_secs(10));
    }
    let n = count(&ctx.js, thermo_domain::streams::DELTAS).await;
    anyhow::ensure!(n > 0, "temperature-delta wrote no delta");
    Ok(n)
}

/// Runs the rounds and writes the section.
pub async fn run(
    root: &Path,
    bin_dir: PathBuf,
    out: PathBuf,
    readings: Option<u64>,
    command: String,
) -> anyhow::Result<()> {
    use crate::rounds::ROUNDS;
    let readings = readings.unwrap_or(200_000);
    let sensors = 1_000;
    let dir = root.join(format!("target/bench-tmp/views-{}", std::process::id()));
    let started = Instant::now();
    let servers = Servers::start(&dir, false).await?;
    let mut ctx = Ctx::new(servers, bin_dir).await?;
    ctx.start_registry().await?;
    eprintln!("[views] pre-filling DELTAS from {readings} readings");
    let n = prefill(&ctx, readings, sensors).await?;
    eprintln!("[views] DELTAS holds {n} deltas");
    let rounds = crate::rounds::alternate("views", &SCENARIOS, ROUNDS, |s| label(s).to_string(), async |_, s| {
        let r = run_one(&ctx, s, n).await;
        eprintln!(
            "  {:?} deltas/s, {:?} µs CPU per delta, {:.0} batches x {:.0}, {:.2} ms per batch, apply {:?} ms, {:.1} Redis commands per batch {}",
            r.rate.map(f64::round),
            r.cpu_total().map(|c| (c * 10.0).round() / 10.0),
            r.batches,
            r.mean_batch,
            r.mean_batch_ms,
            r.mean_apply_ms.map(|x| (x * 1000.0).round() / 1000.0),
            r.redis_cmds_per_batch,
            r.error.as_deref().unwrap_or("")
        );
        r
    })
    .await;
    drop(ctx);
    let _ = std::fs::remove_dir_all(&dir);

    let of = |s: Scenario| rounds.of(s);
    let med = |s: Scenario, f: fn(&Run) -> Option<f64>| rounds.median(s, f);
    let runs = &rounds.runs;
    let rate = |s: Scenario| med(s, |r| r.rate);
    let cpu = |s: Scenario| med(s, Run::cpu_total);
    let (base_rate, base_cpu) = (rate(Scenario::Baseline), cpu(Scenario::Baseline));
    let (date, nproc) = crate::report::stamp();
    let mut body = String::new();
    body.push_str("## View-builder against a fair baseline\n\n");
    body.push_str(&format!(
        "Generated by `{command}` on {date} ({nproc} CPUs, shared; {}; {}), separately from the \
         tables above. DELTAS is pre-filled once (the thermometer publishes {readings} readings \
         over {sensors} sensors, temperature-delta `local` turns them into {n} deltas, 8 \
         partitions); then {ROUNDS} rounds of both scenarios, alternated, each from a fresh \
         Redis database; each figure is the median of its rounds, timed from the first batch \
         seen applied to the last delta. *Baseline*: one pull consumer per partition (batch \
         256, ack policy `none`, as the runtime driver) writing, per batch in ONE pipeline, \
         the structures view-builder's APPLY script writes, per delta (sensor hash `delta` \
         `seq` `meta` `mv` `site` `src`; history RPUSH + LTRIM to 120; site, rank and sensors \
         sorted sets; sites set; then the partition's position, source and epoch), and \
         announcing each sensor changed in the batch on `thermo.views.sensor.<id>` with its \
         view as JSON, as view-builder does. It decodes each delta (the score, site and history \
         point need it) but has no validation, fencing, replay checks, registry lookups or \
         folding, and is not atomic. CPU is what every process used over the timed span (the \
         service or kappa-bench for the baseline, nats-server, redis-server, sensor-registry \
         answering view-builder's lookups), per delta; view-builder's span also holds part of \
         its start (the registry feed writing 1000 sensors' metadata, the first lookups). Redis \
         commands per batch are `INFO stats` total_commands_processed over the span: each \
         command of the baseline's pipeline, and for view-builder its one EVALSHA per batch \
         plus every `redis.call` inside it (one round trip per batch either way). Goal (issue 14): view-builder ≥ \
         {GOAL} of the baseline's throughput. This run took {:.0} s.\n\n",
        version_of("nats-server", "--version"),
        version_of("redis-server", "--version"),
        started.elapsed().as_secs_f64()
    ));
    body.push_str(
        "| scenario | deltas/s | / baseline | goal | CPU µs per delta (all processes) | / baseline | batches x mean size | ms per batch | of which APPLY ms | Redis commands executed per batch | views announced |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut rows = Vec::new();
    for s in SCENARIOS {
        let (r, c) = (rate(s), cpu(s));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let (rr, cr) = (ratio(r, base_rate), ratio(c, base_cpu));
        let goal = match (s, rr) {
            (Scenario::Baseline, _) => "-".to_string(),
            (_, Some(x)) if x >= GOAL => format!("≥ {GOAL}: met"),
            (_, Some(_)) => format!("≥ {GOAL}: missed"),
            (_, None) => format!("≥ {GOAL}: not measured"),
        };
        let split = of(s)
            .next_back()
            .map(|r| {
                r.cpu_us
                    .iter()
                    .map(|(p, v)| format!("{p} {v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let batches = med(s, |r| r.rate.map(|_| r.batches));
        let size = med(s, |r| r.rate.map(|_| r.mean_batch));
        let ms = med(s, |r| r.rate.map(|_| r.mean_batch_ms));
        let apply = med(s, |r| r.mean_apply_ms);
        let cmds = med(s, |r| r.rate.map(|_| r.redis_cmds_per_batch));
        let announced = med(s, |r| r.rate.map(|_| r.announced));
        let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
        body.push_str(&format!(
            "| {} | {} | {} | {goal} | {} ({split}) | {} | {} x {} | {} | {} | {} | {} |\n",
            label(s),
            r.map(fmt_rate).unwrap_or_else(|| "not measured".into()),
            rr.map_or("-".into(), |x| format!("{x:.2}")),
            c.map_or("not measured".into(), |x| format!("{x:.1}")),
            cr.map_or("-".into(), |x| format!("{x:.2}")),
            f(batches, 0),
            f(size, 0),
            f(ms, 2),
            f(apply, 2),
            f(cmds, 1),
            f(announced, 0),
        ));
        rows.push(
            json!({"scenario": s, "label": label(s), "per_s": r, "ratio": rr,
            "cpu_us": c, "cpu_ratio": cr, "batches": batches, "mean_batch": size,
            "mean_batch_ms": ms, "mean_apply_ms": apply, "redis_cmds_per_batch": cmds,
            "announced": announced}),
        );
    }
    body.push('\n');
    let errors: Vec<String> = runs
        .iter()
        .filter_map(|(s, r)| r.error.as_ref().map(|e| format!("{}: {e}", label(*s))))
        .collect();
    if !errors.is_empty() {
        body.push_str(&format!(
            "> Not measured in some rounds: {}\n\n",
            errors.join("; ")
        ));
    }
    body.push_str(
        "Reproduce: `cargo build --release --bins && cargo run --release -p kappa-bench -- views` \
         (`--readings N`; writes only this section of BENCHMARKS.md and the key `views` of \
         benchmarks.json). The CPU split in parentheses is the last round's.\n\n",
    );
    write_section(
        &out,
        SECTION,
        &body,
        json!({"date": date, "command": command, "readings": readings, "deltas": n,
            "sensors": sensors, "goal": GOAL, "rows": rows,
            "runs": runs.iter().map(|(s, r)| json!({"scenario": s, "run": r})).collect::<Vec<_>>()}),
    )
}
