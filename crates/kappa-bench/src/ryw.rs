//! `kappa-bench ryw`: read-your-writes latency. With the whole DAG running (temperature-delta
//! `remote`, view-builder, query-api), readings are published open loop at 10% and 50% of the
//! DAG's sustained maximum (measured first, with every service running); a sample of them is
//! read back right after its publish ack with `GET /v1/sensors/{id}?min_seq=<ack>`. Latency
//! runs from the reading's *intended* send time to the answer that includes it, beside the
//! one-hop baseline (publish -> pull consumer) at the same rate in the same run. Every answer
//! is checked: it must hold the reading (`source_seq` ≥ its sequence) or the run says so.
//!
//! It writes its table as a section of `BENCHMARKS.md` (between `<!-- section:ryw -->`
//! markers) and the key `ryw` of `benchmarks.json`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use serde_json::json;

use crate::baseline::{self, Lat, histogram, lat};
use crate::durability::write_section;
use crate::infra::version_of;
use crate::report::fmt_lat;
use crate::services::{self, Ctx, Dag};

/// The section's name in `BENCHMARKS.md`.
pub const SECTION: &str = "ryw";

/// Bounded reads per second at most, whatever the load (they share the cores with the DAG).
const MAX_READS_PER_S: f64 = 100.0;

/// What one load level gave.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Level {
    load: f64,
    rate: f64,
    readings: u64,
    ryw: Option<Lat>,
    /// Answers that did not hold their reading (must be 0).
    wrong: u64,
    /// Answers that were not 200 (503: not up to the bound in time).
    refused: u64,
    one_hop: Option<Lat>,
    errors: Vec<String>,
}

#[derive(Default)]
struct Samples {
    hist: Option<hdrhistogram::Histogram<u64>>,
    /// (latency µs, seconds into the run) of the slowest reads, for the log.
    slowest: Vec<(u64, f64)>,
    wrong: u64,
    refused: u64,
}

/// Publishes at `rate`/s for `secs`, reading every `every`-th reading back with `min_seq`.
async fn bounded_reads(
    ctx: &Ctx,
    qa: &str,
    (rate, secs): (f64, f64),
    sensors: u64,
) -> anyhow::Result<(Lat, u64, u64, u64)> {
    let base = Instant::now();
    let every = (rate / MAX_READS_PER_S).ceil().max(1.0) as u64;
    let samples = Arc::new(Mutex::new(Samples {
        hist: Some(histogram()),
        ..Default::default()
    }));
    let total = (rate * secs).max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let run = format!(
        "ryw:{:x}",
        u128::from(std::process::id()) ^ base.elapsed().as_nanos()
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("s-{:04}", i % sensors + 1);
        let body = format!(
            r#"{{"sensor_id":"{id}","celsius":{:.3},"measured_at":"{stamp}"}}"#,
            20.0 + (i % 100) as f64 / 10.0
        );
        let msg = PublishMessage::build()
            .payload(Bytes::from(body))
            .message_id(format!("{run}:{i}"));
        let ack = ctx
            .js
            .send_publish(thermo_domain::subjects::reading(&id), msg)
            .await?;
        if i % every != 0 {
            tasks.spawn(async move {
                let _ = ack.await;
            });
            continue;
        }
        let (http, qa, samples) = (ctx.http.clone(), qa.to_string(), samples.clone());
        tasks.spawn(async move {
            let Ok(ack) = ack.await else { return };
            let path = format!(
                "/v1/sensors/{id}?min_seq={}&max_wait_ms=10000",
                ack.sequence
            );
            let answer = kappa_testkit::http::get(&http, &qa, &path).await;
            let took = due.elapsed().as_micros() as u64;
            let Ok(mut s) = samples.lock() else { return };
            match answer {
                Some((200, body)) => {
                    let seq = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["source_seq"].as_u64());
                    if seq.is_some_and(|q| q >= ack.sequence) {
                        if let Some(h) = s.hist.as_mut() {
                            let _ = h.record(took.max(1));
                        }
                        s.slowest.push((took, (due - start).as_secs_f64()));
                        s.slowest.sort_by_key(|x| std::cmp::Reverse(x.0));
                        s.slowest.truncate(5);
                    } else {
                        s.wrong += 1;
                    }
                }
                _ => s.refused += 1,
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let s = samples.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let h = s.hist.as_ref().context("histogram")?;
    eprintln!(
        "[ryw]   slowest reads (ms, at s into the run): {:?}",
        s.slowest
            .iter()
            .map(|(us, at)| (us / 1000, (at * 10.0).round() / 10.0))
            .collect::<Vec<_>>()
    );
    Ok((lat(h), total, s.wrong, s.refused))
}

/// Runs the measurement and writes the section.
pub async fn run(
    root: &Path,
    bin_dir: PathBuf,
    out: PathBuf,
    readings: Option<u64>,
    secs: Option<f64>,
    command: String,
) -> anyhow::Result<()> {
    let n = readings.unwrap_or(20_000);
    let sensors = 1_000;
    let secs: f64 = secs.unwrap_or(20.0).max(0.5);
    let dir = root.join(format!("target/bench-tmp/ryw-{}", std::process::id()));
    let started = Instant::now();
    let dag = Dag::start("ryw", &dir, bin_dir, n, sensors).await?;
    let (ctx, vb, qa) = (&dag.ctx, &dag.vb, &dag.qa);
    let max = services::pipeline_max(ctx, &vb.http, (n / 2).max(100), sensors).await?;
    eprintln!("[ryw] the DAG's sustained maximum: {max:.0} readings/s");
    let mut levels = Vec::new();
    for load in [0.1, 0.5] {
        let rate = (max * load).max(1.0);
        let mut l = Level {
            load,
            rate,
            ..Default::default()
        };
        match baseline::one_hop(&ctx.js, rate, secs.min(10.0)).await {
            Ok(h) => l.one_hop = Some(h),
            Err(e) => l.errors.push(format!("one hop: {}", crate::short(&e))),
        }
        match bounded_reads(ctx, &qa.http, (rate, secs), sensors).await {
            Ok((h, total, wrong, refused)) => {
                l.ryw = Some(h);
                l.readings = total;
                l.wrong = wrong;
                l.refused = refused;
            }
            Err(e) => l
                .errors
                .push(format!("bounded reads: {}", crate::short(&e))),
        }
        eprintln!(
            "[ryw] {:.0}% ({rate:.0}/s): min_seq read p99 {:?} ms ({} wrong, {} refused); one hop p99 {:?} ms",
            load * 100.0,
            l.ryw.map(|x| x.p99_ms),
            l.wrong,
            l.refused,
            l.one_hop.map(|x| x.p99_ms)
        );
        levels.push(l);
    }
    dag.stop();
    let _ = std::fs::remove_dir_all(&dir);

    let (date, nproc) = crate::report::stamp();
    let mut body = String::new();
    body.push_str("## Read-your-writes: a reading, then the answer that includes it\n\n");
    body.push_str(&format!(
        "Generated by `{command}` on {date} ({nproc} CPUs, shared; {}), separately from the \
         tables above. The whole DAG runs (temperature-delta `remote`, view-builder, query-api, \
         {sensors} sensors, 8 partitions); its sustained maximum with every service running \
         was {max:.0} readings/s. Readings are published open loop for {secs:.0} s at each load; \
         up to {MAX_READS_PER_S:.0} of them per second are read back right after their publish \
         ack with `GET /v1/sensors/{{id}}?min_seq=<ack>`. Latency runs from the reading's \
         intended send time to the end of the answer that includes it; every answer is checked \
         to hold its reading. The one-hop baseline (publish -> pull consumer, the floor of any \
         answer) runs at the same rate in the same run. This run took {:.0} s.\n\n",
        version_of("nats-server", "--version"),
        started.elapsed().as_secs_f64()
    ));
    body.push_str(
        "| load | readings/s | min_seq read (p50 / p99 / p99.9 / max) | one hop | p99 / one-hop p99 | answers without their reading | not up to the bound (503) |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for l in &levels {
        let show = |x: &Option<Lat>| {
            x.as_ref()
                .map(fmt_lat)
                .unwrap_or_else(|| "not measured".into())
        };
        let ratio = match (l.ryw, l.one_hop) {
            (Some(a), Some(b)) if b.p99_ms > 0.0 => format!("{:.1}x", a.p99_ms / b.p99_ms),
            _ => "-".into(),
        };
        body.push_str(&format!(
            "| {:.0}% | {:.0} | {} | {} | {ratio} | {} | {} |\n",
            l.load * 100.0,
            l.rate,
            show(&l.ryw),
            show(&l.one_hop),
            l.wrong,
            l.refused
        ));
    }
    body.push('\n');
    let errors: Vec<String> = levels.iter().flat_map(|l| l.errors.clone()).collect();
    if !errors.is_empty() {
        body.push_str(&format!("> Not measured: {}\n\n", errors.join("; ")));
    }
    body.push_str(
        "Reproduce: `cargo build --release --bins && cargo run --release -p kappa-bench -- ryw` \
         (`--readings N` for the prefill; writes only this section of BENCHMARKS.md and the key \
         `ryw` of benchmarks.json).\n\n",
    );
    write_section(
        &out,
        SECTION,
        &body,
        json!({"date": date, "command": command, "max_rate": max, "sensors": sensors,
            "secs": secs, "levels": levels}),
    )
}
