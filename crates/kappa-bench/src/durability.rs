//! `kappa-bench durability`: what strict durability costs. The same measurements against
//! servers started with the defaults a deployment runs (nats-server's `sync_interval` of 2
//! minutes, Redis AOF `appendfsync everysec`) and in strict mode (`jetstream { sync_interval:
//! always }`, `appendfsync always`), alternated round by round in one run (default, strict,
//! default, strict, ...) so that a moment of load on the shared machine hits both; each figure
//! is the median of its rounds, quoted with its ratio to the default.
//!
//! It writes its table as a section of `BENCHMARKS.md` (between `<!-- section:durability -->`
//! markers, replacing an earlier one; `all` keeps it) and the key `durability` of
//! `benchmarks.json`, leaving the rest of both files as they are.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::baseline::{self, Lat, histogram, lat};
use crate::infra::{Durability, Servers, version_of};
use crate::report::{fmt_lat, fmt_rate, ratio};
use crate::services::{self, Ctx, TdCase};

/// The section's name in `BENCHMARKS.md`.
pub const SECTION: &str = "durability";

/// A throughput figure of a round, by name.
type RateOf = (&'static str, fn(&Round) -> Option<f64>);
/// A latency figure of a round, by name.
type LatOf = (&'static str, fn(&Round) -> Option<Lat>);

/// One round's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Round {
    raw_publish_per_s: Option<f64>,
    thermometer_per_s: Option<f64>,
    td_remote_per_s: Option<f64>,
    one_hop: Option<Lat>,
    redis_write: Option<Lat>,
    errors: Vec<String>,
}

/// Sequential `HSET` round trips (each one a write Redis appends to its AOF; with
/// `appendfsync always` it is fsynced before the reply).
async fn redis_write(conn: &mut redis::aio::MultiplexedConnection, n: u64) -> anyhow::Result<Lat> {
    let mut h = histogram();
    for i in 0..n {
        let t = Instant::now();
        let _: () = redis::cmd("HSET")
            .arg("bench:durability")
            .arg(i % 1000)
            .arg(i)
            .query_async(conn)
            .await?;
        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
    }
    Ok(lat(&h))
}

async fn round(
    dir: &Path,
    bin_dir: &Path,
    durability: Durability,
    n: u64,
    sensors: u64,
    hop_rate: f64,
    hop_secs: f64,
) -> anyhow::Result<Round> {
    let servers = Servers::start_with(dir, false, durability).await?;
    let mut ctx = Ctx::new(servers, bin_dir.to_path_buf()).await?;
    let mut r = Round::default();
    let _ = baseline::raw_publish(&ctx.js, n.min(2_000), sensors).await;
    let _ = ctx.js.delete_stream("BENCH_READINGS").await;
    let mut r_errors = Vec::new();
    match baseline::raw_publish(&ctx.js, n, sensors).await {
        Ok(v) => r.raw_publish_per_s = Some(v),
        Err(e) => r_errors.push(r_err("raw publish", e)),
    }
    ctx.start_registry().await?;
    let case = TdCase::drain("remote", "semi-stateless", sensors, n);
    match services::temperature_delta(&ctx, &case).await {
        Ok((td, p)) => {
            r.thermometer_per_s = Some(td.prefill_rate);
            r.td_remote_per_s = Some(td.rate);
            if let Some(mut p) = p {
                p.terminate(Duration::from_secs(10));
            }
        }
        Err(e) => r_errors.push(r_err("temperature-delta", e)),
    }
    match baseline::one_hop(&ctx.js, hop_rate, hop_secs).await {
        Ok(l) => r.one_hop = Some(l),
        Err(e) => r_errors.push(r_err("one hop", e)),
    }
    match ctx.servers.redis(&ctx.servers.redis_url).await {
        Ok(mut c) => match redis_write(&mut c, 2_000).await {
            Ok(l) => r.redis_write = Some(l),
            Err(e) => r_errors.push(r_err("redis write", e)),
        },
        Err(e) => r_errors.push(r_err("redis", e)),
    }
    r.errors = r_errors;
    drop(ctx);
    let _ = std::fs::remove_dir_all(dir.join("js"));
    let _ = std::fs::remove_dir_all(dir.join("redis"));
    Ok(r)
}

fn r_err(what: &str, e: anyhow::Error) -> String {
    format!("{what}: {}", crate::short(&e))
}

/// The median round by a latency's p99 (its whole distribution is shown).
fn median_lat(v: Vec<Lat>) -> Option<Lat> {
    let mut v = v;
    v.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
    v.get(v.len() / 2).copied()
}

/// Prints `body`, writes it as section `name` of `out`/BENCHMARKS.md ([`splice_section`]) and
/// `value` as key `name` of `out`/benchmarks.json, leaving the rest of both files as they are.
pub fn write_section(
    out: &Path,
    name: &str,
    body: &str,
    value: serde_json::Value,
) -> anyhow::Result<()> {
    print!("{body}");
    std::fs::create_dir_all(out)?;
    splice_section(&out.join("BENCHMARKS.md"), name, body)?;
    let jpath = out.join("benchmarks.json");
    let mut j: serde_json::Value = std::fs::read_to_string(&jpath)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({}));
    if let Some(m) = j.as_object_mut() {
        m.insert(name.into(), value);
    }
    std::fs::write(&jpath, serde_json::to_string_pretty(&j)? + "\n")?;
    eprintln!(
        "wrote the {name} section of {}",
        out.join("BENCHMARKS.md").display()
    );
    Ok(())
}

/// Replaces (or adds, before "## How to reproduce" or at the end) the marked section `name` of
/// the Markdown file `path` with `body`.
pub fn splice_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- section:{name} -->");
    let end = format!("<!-- /section:{name} -->");
    let block = format!("{begin}\n{body}{end}\n");
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            let tail = &old[b + end.len()..];
            format!(
                "{}{block}{}",
                &old[..a],
                tail.strip_prefix('\n').unwrap_or(tail)
            )
        }
        _ => match old.find("## How to reproduce") {
            Some(i) => format!("{}{block}\n{}", &old[..i], &old[i..]),
            None => format!("{old}{}{block}", if old.is_empty() { "" } else { "\n" }),
        },
    };
    std::fs::write(path, new)?;
    Ok(())
}

/// The marked section `name` of a Markdown text, markers included, if any.
pub fn section(text: &str, name: &str) -> Option<String> {
    let begin = format!("<!-- section:{name} -->");
    let end = format!("<!-- /section:{name} -->");
    let a = text.find(&begin)?;
    let b = text[a..].find(&end)? + a;
    Some(format!("{}\n", &text[a..b + end.len()]))
}

/// Runs the comparison and writes its section.
pub async fn run(
    root: &Path,
    bin_dir: PathBuf,
    out: PathBuf,
    readings: Option<u64>,
    command: String,
) -> anyhow::Result<()> {
    use crate::rounds::ROUNDS;
    let n = readings.unwrap_or(20_000);
    let sensors = 1_000;
    let (hop_rate, hop_secs) = (500.0, 5.0);
    let tmp = root.join(format!("target/bench-tmp/{}", std::process::id()));
    let started = Instant::now();
    let rr = crate::rounds::alternate("durability", &[Durability::Default, Durability::Strict], ROUNDS, |d| format!("{d:?}"), async |i, d| {
        let dir = tmp.join(format!("{d:?}-{i}").to_lowercase());
        match round(&dir, &bin_dir, d, n, sensors, hop_rate, hop_secs).await {
            Ok(r) => {
                eprintln!(
                    "  publish {:?}/s, thermometer {:?}/s, temperature-delta {:?}/s, one hop p99 {:?} ms, redis write p99 {:?} ms {:?}",
                    r.raw_publish_per_s.map(|v| v.round()),
                    r.thermometer_per_s.map(|v| v.round()),
                    r.td_remote_per_s.map(|v| v.round()),
                    r.one_hop.map(|l| l.p99_ms),
                    r.redis_write.map(|l| l.p99_ms),
                    r.errors
                );
                r
            }
            Err(e) => {
                eprintln!("  round failed: {e:#}");
                Round {
                    errors: vec![crate::short(&e)],
                    ..Default::default()
                }
            }
        }
    })
    .await;
    let rounds = &rr.runs;
    let of = |d: Durability| rr.of(d);
    let rate = |d: Durability, f: fn(&Round) -> Option<f64>| rr.median(d, f);
    let latency =
        |d: Durability, f: fn(&Round) -> Option<Lat>| median_lat(of(d).filter_map(f).collect());
    let (def, strict) = (Durability::Default, Durability::Strict);
    let mut rows: Vec<Vec<String>> = Vec::new();
    let rates: [RateOf; 3] = [
        (
            "JetStream async publish, 1024 acks in flight (msgs/s; baseline 1)",
            |r| r.raw_publish_per_s,
        ),
        (
            "thermometer publishing readings into READINGS (readings/s)",
            |r| r.thermometer_per_s,
        ),
        (
            "temperature-delta `remote` draining them: DELTAS publishes + Redis commits (readings/s)",
            |r| r.td_remote_per_s,
        ),
    ];
    let mut json_rows = Vec::new();
    for (name, f) in rates {
        let (a, b) = (rate(def, f), rate(strict, f));
        rows.push(vec![
            name.to_string(),
            a.map(fmt_rate).unwrap_or_else(|| "not measured".into()),
            b.map(fmt_rate).unwrap_or_else(|| "not measured".into()),
            ratio(b, a),
        ]);
        json_rows.push(json!({"measure": name, "default": a, "strict": b}));
    }
    let lats: [LatOf; 2] = [
        (
            "one hop publish -> pull consumer at 500 msgs/s (baseline 4)",
            |r| r.one_hop,
        ),
        ("Redis HSET round trip, sequential", |r| r.redis_write),
    ];
    for (name, f) in lats {
        let (a, b) = (latency(def, f), latency(strict, f));
        rows.push(vec![
            name.to_string(),
            a.as_ref()
                .map(fmt_lat)
                .unwrap_or_else(|| "not measured".into()),
            b.as_ref()
                .map(fmt_lat)
                .unwrap_or_else(|| "not measured".into()),
            match (a, b) {
                (Some(a), Some(b)) => format!(
                    "p50 {} / p99 {}",
                    ratio(Some(b.p50_ms), Some(a.p50_ms)),
                    ratio(Some(b.p99_ms), Some(a.p99_ms))
                ),
                _ => "-".into(),
            },
        ]);
        json_rows.push(json!({"measure": name, "default": a, "strict": b}));
    }
    let errors: Vec<String> = rounds
        .iter()
        .flat_map(|(d, r)| r.errors.iter().map(move |e| format!("{d:?}: {e}")))
        .collect();
    let (date, nproc) = crate::report::stamp();
    let mut body = String::new();
    body.push_str("## Durability: default vs strict\n\n");
    body.push_str(&format!(
        "Generated by `{command}` on {date} ({nproc} CPUs, shared; {}; {}), separately from the \
         tables above. *Default* = what docker-compose.yml runs: nats-server's default \
         `sync_interval` (2 minutes), Redis AOF `appendfsync everysec`. *Strict* = \
         docker-compose.strict.yml: `jetstream {{ sync_interval: always }}` (docker/nats/nats-strict.conf), \
         `appendfsync always`: both fsync before they acknowledge. Fresh servers for every round, \
         on the same local disk (`target/bench-tmp/`); {ROUNDS} rounds of each, alternated; each \
         figure is the median of its rounds. N = {n} readings over {sensors} sensors; \
         temperature-delta runs `remote` (working state in the strict/default Redis). The ratio \
         column is strict / default (below 1 for throughput, above 1 for latency: the cost). \
         What each mode can lose on power failure: docs/operations.md, \"Durability: default or \
         strict\". This run took {:.0} s.\n\n",
        version_of("nats-server", "--version"),
        version_of("redis-server", "--version"),
        started.elapsed().as_secs_f64()
    ));
    body.push_str("| measure | default | strict | strict / default |\n| --- | --- | --- | --- |\n");
    for r in &rows {
        body.push_str(&format!(
            "| {} |\n",
            r.iter()
                .map(|c| c.replace('|', "\\|"))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    body.push('\n');
    if !errors.is_empty() {
        body.push_str(&format!(
            "> Not measured in some rounds: {}\n\n",
            errors.join("; ")
        ));
    }
    body.push_str(
        "Reproduce: `cargo build --release --bins && cargo run --release -p kappa-bench -- durability` \
         (`--readings N` to change N; writes only this section of BENCHMARKS.md and the key \
         `durability` of benchmarks.json).\n\n",
    );
    write_section(
        &out,
        SECTION,
        &body,
        json!({"date": date, "command": command, "readings": n, "sensors": sensors,
            "rows": json_rows, "rounds": rounds.iter().map(|(d, r)| json!({"mode": d, "round": r})).collect::<Vec<_>>()}),
    )?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
