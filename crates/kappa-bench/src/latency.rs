//! `kappa-bench latency`: what a user feels. With the whole DAG running (temperature-delta
//! `remote`, view-builder, query-api), its sustained maximum is measured first (every service
//! running); then readings are published open loop at 10%, 50% and 80% of it, and each one's
//! latency runs from its *intended* send time to the moment the query API's live feed shows its
//! sensor's view covering it. The one-hop baseline (publish -> pull consumer) runs at the same
//! rate in the same run; the goals are end-to-end p99 ≤ 4x the one-hop p99 at 50% and
//! ≤ 8x at 80%. A second open loop at 50% splits the time by hop.
//!
//! It writes its table as a section of `BENCHMARKS.md` (between `<!-- section:latency -->`
//! markers) and the key `latency` of `benchmarks.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::baseline::{self, Lat};
use crate::durability::write_section;
use crate::infra::{CpuMeter, Traffic, TrafficPerInput, version_of};
use crate::report::fmt_lat;
use crate::services::{self, Dag, Hops};

/// The section's name in `BENCHMARKS.md`.
pub const SECTION: &str = "latency";

/// One load level.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Level {
    load: f64,
    rate: f64,
    e2e: Option<Lat>,
    seen: u64,
    sent: u64,
    one_hop: Option<Lat>,
    machine_busy: Option<f64>,
    /// CPU µs per reading of each process during the open loop.
    cpu: Vec<(&'static str, f64)>,
    /// Context switches per reading of each process during the open loop.
    switches: Vec<(&'static str, f64)>,
    /// NATS messages and Redis calls per reading during the open loop.
    traffic: TrafficPerInput,
    /// Mean batch size of temperature-delta and view-builder during the open loop.
    batch: Vec<(&'static str, f64)>,
    /// The goal on p99 e2e / p99 one hop at this load, if the issue sets one.
    goal: Option<f64>,
    errors: Vec<String>,
}

impl Level {
    fn ratio(&self) -> Option<f64> {
        match (self.e2e, self.one_hop) {
            (Some(a), Some(b)) if b.p99_ms > 0.0 => Some(a.p99_ms / b.p99_ms),
            _ => None,
        }
    }
}

/// `kappa_batch_size`'s (sum, count) of each of `services` (name, `/metrics` address).
async fn batches(
    http: &reqwest::Client,
    services: &[(&'static str, String)],
) -> Vec<(&'static str, f64, f64)> {
    let mut out = Vec::new();
    for (name, addr) in services {
        let page = kappa_testkit::metrics::scrape(http, addr)
            .await
            .unwrap_or_default();
        out.push((
            *name,
            kappa_testkit::metrics::sum(&page, "kappa_batch_size_sum"),
            kappa_testkit::metrics::sum(&page, "kappa_batch_size_count"),
        ));
    }
    out
}

/// Mean batch size of each service between two [`batches`] readings.
fn mean_batches(
    before: &[(&'static str, f64, f64)],
    after: &[(&'static str, f64, f64)],
) -> Vec<(&'static str, f64)> {
    before
        .iter()
        .zip(after)
        .map(|(&(n, s0, c0), &(_, s1, c1))| (n, if c1 > c0 { (s1 - s0) / (c1 - c0) } else { 0.0 }))
        .collect()
}

/// Runs the measurement and writes the section.
pub async fn run(
    root: &Path,
    bin_dir: PathBuf,
    out: PathBuf,
    readings: Option<u64>,
    (secs, dag_max): (Option<f64>, Option<f64>),
    command: String,
) -> anyhow::Result<()> {
    let n = readings.unwrap_or(20_000);
    let sensors = 1_000;
    let secs: f64 = secs.unwrap_or(10.0).max(0.5);
    let dir = root.join(format!("target/bench-tmp/latency-{}", std::process::id()));
    let started = Instant::now();
    let dag = Dag::start("latency", &dir, bin_dir, n, sensors).await?;
    let (ctx, td, vb, qa) = (&dag.ctx, &dag.td, &dag.vb, &dag.qa);
    let mut procs: Vec<(&'static str, u32)> = vec![
        ("temperature-delta", td.pid()),
        ("view-builder", vb.pid()),
        ("query-api", qa.pid()),
        ("kappa-bench", std::process::id()),
    ];
    procs.extend(ctx.servers.nats_pid.map(|p| ("nats-server", p)));
    procs.extend(ctx.servers.redis_pid.map(|p| ("redis-server", p)));
    let max_n = (n / 2).max(100);
    let batching: Vec<(&'static str, String)> = vec![
        ("temperature-delta", td.http.clone()),
        ("view-builder", vb.http.clone()),
    ];
    let monitor = ctx.servers.nats_monitor.clone();
    let redis_url = ctx.servers.redis_url.clone();
    let traffic = || Traffic::read(monitor.as_deref(), &redis_url);
    // What the DAG costs doing nothing (timers, heartbeats, leases, probes): CPU ms per second.
    let idle_secs = 5.0;
    let meter = CpuMeter::start(&procs);
    let before = traffic().await;
    tokio::time::sleep(std::time::Duration::from_secs_f64(idle_secs)).await;
    // per_msg over 1000 "messages" = CPU µs per 1000 = ms; divided by the seconds: ms/s.
    let idle_cpu: Vec<(&'static str, f64)> = meter
        .per_msg(1000)
        .into_iter()
        .map(|(n, ms)| (n, ms / idle_secs))
        .collect();
    let idle_switches: Vec<(&'static str, f64)> = meter
        .switches_per_msg(1)
        .into_iter()
        .map(|(n, c)| (n, c / idle_secs))
        .collect();
    let idle_traffic = traffic().await.per_input(&before, idle_secs as u64);
    let meter = CpuMeter::start(&procs);
    let before = traffic().await;
    let b0 = batches(&ctx.http, &batching).await;
    let drained = services::pipeline_max(ctx, &vb.http, max_n, sensors).await?;
    let max = dag_max.unwrap_or(drained);
    let drain_cpu = meter.per_msg(max_n);
    let drain_switches = meter.switches_per_msg(max_n);
    let drain_traffic = traffic().await.per_input(&before, max_n);
    let drain_batch = mean_batches(&b0, &batches(&ctx.http, &batching).await);
    eprintln!(
        "[latency] the DAG's sustained maximum: {drained:.0} readings/s (loads taken of {max:.0})"
    );
    let mut levels = Vec::new();
    for (load, goal) in [(0.1, None), (0.5, Some(4.0)), (0.8, Some(8.0))] {
        let rate = (max * load).max(1.0);
        let mut l = Level {
            load,
            rate,
            goal,
            ..Default::default()
        };
        match baseline::one_hop(&ctx.js, rate, secs.min(5.0)).await {
            Ok(h) => l.one_hop = Some(h),
            Err(e) => l.errors.push(format!("one hop: {}", crate::short(&e))),
        }
        let meter = CpuMeter::start(&procs);
        let before = traffic().await;
        let b0 = batches(&ctx.http, &batching).await;
        match services::e2e(ctx, &qa.http, rate, secs, sensors, false).await {
            Ok((h, seen, sent, _, busy)) => {
                l.cpu = meter.per_msg(sent);
                l.switches = meter.switches_per_msg(sent);
                l.traffic = traffic().await.per_input(&before, sent);
                l.batch = mean_batches(&b0, &batches(&ctx.http, &batching).await);
                l.e2e = Some(h);
                l.seen = seen;
                l.sent = sent;
                l.machine_busy = busy;
            }
            Err(e) => l.errors.push(format!("e2e: {}", crate::short(&e))),
        }
        eprintln!(
            "[latency] {:.0}% ({rate:.0}/s): e2e p99 {:?} ms, one hop p99 {:?} ms, ratio {:?}",
            load * 100.0,
            l.e2e.map(|x| x.p99_ms),
            l.one_hop.map(|x| x.p99_ms),
            l.ratio()
        );
        levels.push(l);
    }
    let split: Option<(Lat, Hops, Option<f64>)> =
        match services::e2e(ctx, &qa.http, max * 0.5, secs, sensors, true).await {
            Ok((l, _, _, Some(h), busy)) => Some((l, h, busy)),
            Ok(_) => None,
            Err(e) => {
                eprintln!("[latency] split not measured: {}", crate::short(&e));
                None
            }
        };
    dag.stop();
    let _ = std::fs::remove_dir_all(&dir);

    let (date, nproc) = crate::report::stamp();
    let mut body = String::new();
    body.push_str("## Latency: a reading published -> visible at the query API\n\n");
    body.push_str(&format!(
        "Generated by `{command}` on {date} ({nproc} CPUs, shared; {}), separately from the \
         tables above. The whole DAG runs (temperature-delta `remote`, view-builder, query-api, \
         {sensors} sensors, 8 partitions, default settings); its sustained maximum with every \
         service running was {drained:.0} readings/s{}. Readings are published open loop for \
         {secs:.0} s at each load; a reading is visible when `GET /v1/live` shows its sensor's \
         view with `source_seq` >= its READINGS sequence. Latency runs from the reading's \
         intended send time (which corrects for coordinated omission). The one-hop baseline \
         (publish -> pull consumer) runs at the same rate just before. Goals (issue 14): p99 \
         ≤ 4x one hop at 50%, ≤ 8x at 80%. This run took {:.0} s.\n\n",
        version_of("nats-server", "--version"),
        if dag_max.is_some() {
            format!(" (the loads below are of {max:.0} readings/s, given with `--dag-max`)")
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64()
    ));
    body.push_str(
        "| load | e2e latency | seen/sent | one hop at the same rate | p99 e2e / one hop | goal | machine CPU busy |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for l in &levels {
        let show = |x: &Option<Lat>| {
            x.as_ref()
                .map(fmt_lat)
                .unwrap_or_else(|| "not measured".into())
        };
        let ratio = l.ratio();
        let goal = match (l.goal, ratio) {
            (Some(g), Some(r)) if r <= g => format!("≤ {g:.0}x: met"),
            (Some(g), Some(_)) => format!("≤ {g:.0}x: missed"),
            _ => "-".into(),
        };
        body.push_str(&format!(
            "| {:.0}% ({:.0} readings/s) | {} | {}/{} | {} | {} | {goal} | {} |\n",
            l.load * 100.0,
            l.rate,
            show(&l.e2e),
            l.seen,
            l.sent,
            show(&l.one_hop),
            ratio.map_or("-".into(), |r| format!("{r:.1}x")),
            l.machine_busy
                .map_or("-".into(), |b| format!("{:.0}%", b * 100.0)),
        ));
    }
    body.push('\n');
    if let Some((l, h, busy)) = &split {
        let pp = |x: &Lat| format!("{:.2} / {:.2}", x.p50_ms, x.p99_ms);
        body.push_str(&format!(
            "Where the time goes at 50% (a separate open loop with two more subscribers in the \
             bench, p50 / p99 ms): to delta {} (READINGS, temperature-delta), to view {} \
             (DELTAS, view-builder), to live {} (query-api, SSE); e2e {}; machine busy {}.\n\n",
            pp(&h.to_delta),
            pp(&h.to_view),
            pp(&h.to_live),
            pp(l),
            busy.map_or("-".into(), |b| format!("{:.0}%", b * 100.0)),
        ));
    }
    // CPU per reading by process: the drain (batches full) against each open loop.
    let names: Vec<&'static str> = procs.iter().map(|p| p.0).collect();
    let total = |v: &[(&'static str, f64)]| v.iter().map(|x| x.1).sum::<f64>();
    let of = |v: &[(&'static str, f64)], name: &str| {
        v.iter()
            .find(|x| x.0 == name)
            .map_or("-".into(), |x| format!("{:.1}", x.1))
    };
    body.push_str(
        "CPU per reading (µs, user + system of each process over the run, divided by the \
         readings): the drain that measured the maximum (batches full) against each open loop \
         (batches as small as the rate makes them). The ratio is each run's total to the \
         drain's.\n\n",
    );
    body.push_str(&format!(
        "| run | {} | total | vs drain |\n|{}\n",
        names.join(" | "),
        " --- |".repeat(names.len() + 3)
    ));
    let drain_total = total(&drain_cpu);
    body.push_str(&format!(
        "| drain ({max:.0}/s) | {} | {drain_total:.1} | 1.00 |\n",
        names
            .iter()
            .map(|n| of(&drain_cpu, n))
            .collect::<Vec<_>>()
            .join(" | ")
    ));
    body.push_str(&format!(
        "| idle, CPU ms per second | {} | {:.1} | - |\n",
        names
            .iter()
            .map(|n| of(&idle_cpu, n))
            .collect::<Vec<_>>()
            .join(" | "),
        total(&idle_cpu)
    ));
    for l in levels.iter().filter(|l| !l.cpu.is_empty()) {
        let t = total(&l.cpu);
        body.push_str(&format!(
            "| open loop {:.0}% ({:.0}/s) | {} | {t:.1} | {:.2} |\n",
            l.load * 100.0,
            l.rate,
            names
                .iter()
                .map(|n| of(&l.cpu, n))
                .collect::<Vec<_>>()
                .join(" | "),
            t / drain_total.max(1e-9)
        ));
    }
    body.push('\n');
    body.push_str(
        "Context switches per reading (voluntary + involuntary, every thread of each process, \
         from `/proc/<pid>/task/*/status`): the wake-ups a reading costs.\n\n",
    );
    body.push_str(&format!(
        "| run | {} | total |\n|{}\n",
        names.join(" | "),
        " --- |".repeat(names.len() + 2)
    ));
    let row = |label: String, v: &[(&'static str, f64)]| {
        format!(
            "| {label} | {} | {:.1} |\n",
            names
                .iter()
                .map(|n| of(v, n))
                .collect::<Vec<_>>()
                .join(" | "),
            total(v)
        )
    };
    body.push_str(&row(format!("drain ({max:.0}/s)"), &drain_switches));
    body.push_str(&row("idle, per second".into(), &idle_switches));
    for l in levels.iter().filter(|l| !l.switches.is_empty()) {
        body.push_str(&row(
            format!("open loop {:.0}% ({:.0}/s)", l.load * 100.0, l.rate),
            &l.switches,
        ));
    }
    body.push('\n');
    // Round trips per reading: counts, so they hold on any machine, loaded or not.
    if !drain_traffic.nats.is_empty() || levels.iter().any(|l| !l.traffic.nats.is_empty()) {
        body.push_str(
            "Messages per reading (counted, not timed: the same on any machine): what each NATS \
             connection sent to the server (nats-server `/connz` `in_msgs`, by connection \
             name), and Redis calls (by command, `INFO commandstats`), divided by the \
             readings; and the mean batch of temperature-delta and view-builder (`kappa_batch_size`).\n\n| run | mean batch (td / vb) | NATS messages per reading | Redis calls per reading |\n| --- | --- | --- | --- |\n",
        );
        let mean = |v: &[(&'static str, f64)]| {
            v.iter()
                .map(|x| format!("{:.1}", x.1))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let (n, r) = drain_traffic.describe();
        body.push_str(&format!(
            "| drain ({max:.0}/s) | {} | {n} | {r} |\n",
            mean(&drain_batch)
        ));
        let (n, r) = idle_traffic.describe();
        body.push_str(&format!("| idle, per second | - | {n} | {r} |\n"));
        for l in &levels {
            let (n, r) = l.traffic.describe();
            body.push_str(&format!(
                "| open loop {:.0}% ({:.0}/s) | {} | {n} | {r} |\n",
                l.load * 100.0,
                l.rate,
                mean(&l.batch)
            ));
        }
        body.push('\n');
    }
    let errors: Vec<String> = levels.iter().flat_map(|l| l.errors.clone()).collect();
    if !errors.is_empty() {
        body.push_str(&format!("> Not measured: {}\n\n", errors.join("; ")));
    }
    body.push_str(
        "Reproduce: `cargo build --release --bins && cargo run --release -p kappa-bench -- latency` \
         (writes only this section of BENCHMARKS.md and the key `latency` of benchmarks.json).\n\n",
    );
    write_section(
        &out,
        SECTION,
        &body,
        json!({"date": date, "command": command, "max_rate": max, "drained_rate": drained, "sensors": sensors,
            "drain_cpu_us": drain_cpu, "drain_traffic": drain_traffic,
            "idle_cpu_ms_per_s": idle_cpu, "idle_switches_per_s": idle_switches,
            "idle_traffic_per_s": idle_traffic,
            "secs": secs, "levels": levels,
            "split": split.map(|(l, h, busy)| json!({"e2e": l, "hops": h, "machine_busy": busy}))}),
    )
}
