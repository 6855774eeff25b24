//! `kappa-bench cost`: what temperature-delta costs per reading against the bare relay
//! (JetStream in, JetStream out, nothing else: the floor any service on this broker pays), for
//! each working and observed option that issue 14 sets a goal for. One table of scenarios,
//! one runner: every round runs every scenario on the same servers, rounds alternate so that a
//! moment of load on the shared machine hits all of them, and each figure is the median of its
//! rounds with its ratio to the relay measured in the same run.
//!
//! It writes its table as a section of `BENCHMARKS.md` (between `<!-- section:cost -->`
//! markers) and the key `cost` of `benchmarks.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::baseline::{self, Sink};
use crate::durability::write_section;
use crate::infra::{Servers, version_of};
use crate::report::fmt_rate;
use crate::services::{self, Ctx, TdCase};

/// The section's name in `BENCHMARKS.md`.
pub const SECTION: &str = "cost";

/// One scenario of the table.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
enum Scenario {
    /// The relay: one pull consumer per partition, each batch published to a second stream.
    Relay,
    /// The relay publishing as temperature-delta does (its headers, dedupe id, and the
    /// expected last sequence per sensor, in waves): the broker's price of fenced appends.
    FencedRelay,
    /// temperature-delta with a working and an observed option.
    Td {
        working: &'static str,
        observed: &'static str,
        /// The goal, as a least throughput ratio to the relay.
        goal: Option<f64>,
    },
}

const SCENARIOS: [Scenario; 5] = [
    Scenario::Relay,
    Scenario::FencedRelay,
    Scenario::Td {
        working: "local",
        observed: "semi-stateless",
        goal: Some(0.85),
    },
    Scenario::Td {
        working: "local",
        observed: "stateless",
        goal: Some(0.5),
    },
    Scenario::Td {
        working: "remote",
        observed: "semi-stateless",
        goal: None,
    },
];

fn label(s: Scenario) -> String {
    match s {
        Scenario::Relay => "relay (baseline): JetStream in -> JetStream out, in kappa-bench".into(),
        Scenario::FencedRelay => {
            "fenced relay: the relay publishing as temperature-delta does (headers, dedupe id, expected last sequence per sensor)".into()
        }
        Scenario::Td {
            working, observed, ..
        } => format!("temperature-delta `{working}`, observed `{observed}`"),
    }
}

/// One run of a scenario: readings/s and CPU µs per reading of each process.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Run {
    rate: Option<f64>,
    cpu_us: Vec<(&'static str, f64)>,
    error: Option<String>,
}

impl Run {
    fn cpu_total(&self) -> Option<f64> {
        (!self.cpu_us.is_empty()).then(|| self.cpu_us.iter().map(|(_, v)| v).sum())
    }
}

async fn run_one(ctx: &Ctx, s: Scenario, n: u64, sensors: u64) -> Run {
    let r: anyhow::Result<Run> = async {
        match s {
            Scenario::Relay | Scenario::FencedRelay => {
                ctx.servers.wipe(&ctx.js).await?;
                let _ = ctx.js.delete_stream("BENCH_READINGS").await;
                let _ = ctx.js.delete_stream("BENCH_DELTAS").await;
                baseline::raw_publish(&ctx.js, n, sensors).await?;
                let meter = ctx.cpu_meter("relay (kappa-bench)", None);
                let sink = match s {
                    Scenario::FencedRelay => Sink::Fenced(baseline::bench_deltas()),
                    _ => Sink::Stream(baseline::bench_deltas()),
                };
                let rate = baseline::relay(&ctx.js, &baseline::bench_readings(), sink, n).await?;
                Ok(Run {
                    rate: Some(rate),
                    cpu_us: meter.per_msg(n),
                    error: None,
                })
            }
            Scenario::Td {
                working, observed, ..
            } => {
                let case = TdCase::drain(working, observed, sensors, n);
                let (td, p) = services::temperature_delta(ctx, &case).await?;
                if let Some(mut p) = p {
                    p.terminate(std::time::Duration::from_secs(10));
                }
                Ok(Run {
                    rate: Some(td.rate),
                    cpu_us: td.cpu_us,
                    error: None,
                })
            }
        }
    }
    .await;
    r.unwrap_or_else(|e| Run {
        error: Some(crate::short(&e)),
        ..Default::default()
    })
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
    let n = readings.unwrap_or(50_000);
    let sensors = 1_000;
    let dir = root.join(format!("target/bench-tmp/cost-{}", std::process::id()));
    let started = Instant::now();
    let servers = Servers::start(&dir, false).await?;
    let mut ctx = Ctx::new(servers, bin_dir).await?;
    ctx.start_registry().await?;
    let rounds = crate::rounds::alternate("cost", &SCENARIOS, ROUNDS, label, async |_, s| {
        let r = run_one(&ctx, s, n, sensors).await;
        eprintln!(
            "  {:?} readings/s, {:?} µs CPU per reading {}",
            r.rate.map(f64::round),
            r.cpu_total().map(|c| (c * 10.0).round() / 10.0),
            r.error.as_deref().unwrap_or("")
        );
        r
    })
    .await;
    drop(ctx);
    let _ = std::fs::remove_dir_all(&dir);

    let of = |s: Scenario| rounds.of(s);
    let rate = |s: Scenario| rounds.median(s, |r| r.rate);
    let cpu = |s: Scenario| rounds.median(s, Run::cpu_total);
    let runs = &rounds.runs;
    let (base_rate, base_cpu) = (rate(Scenario::Relay), cpu(Scenario::Relay));
    let (fenced_rate, fenced_cpu) = (rate(Scenario::FencedRelay), cpu(Scenario::FencedRelay));
    let of_ratio = |v: Option<f64>, b: Option<f64>| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    };
    let (date, nproc) = crate::report::stamp();
    let mut body = String::new();
    body.push_str("## Per-message cost: temperature-delta against the relay\n\n");
    body.push_str(&format!(
        "Generated by `{command}` on {date} ({nproc} CPUs, shared; {}), separately from the \
         tables above. N = {n} readings over {sensors} sensors, 8 partitions, pre-filled \
         before each run; {ROUNDS} rounds of every scenario, alternated, on the same servers; \
         each figure is the median of its rounds. CPU is what every process used (the \
         service or kappa-bench for the relay, nats-server, redis-server) over the run, per \
         reading. Goals (issue 14): `local` ≥ 0.85 of the relay's throughput, `stateless` ≥ \
         0.5, CPU per reading ≤ 1.25x the relay's. The *fenced relay* columns split the gap: \
         the fenced relay over the relay is what the broker charges for appends that are \
         deduplicated and fenced per entity (and carry the runtime's headers); a service over \
         the fenced relay is what the runtime itself adds. This run took {:.0} s.\n\n",
        version_of("nats-server", "--version"),
        started.elapsed().as_secs_f64()
    ));
    body.push_str(
        "| scenario | readings/s | / relay | / fenced relay | goal | CPU µs per reading (all processes) | / relay | / fenced relay | CPU goal (≤ 1.25x) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut rows = Vec::new();
    for s in SCENARIOS {
        let (r, c) = (rate(s), cpu(s));
        let (rr, cr) = (of_ratio(r, base_rate), of_ratio(c, base_cpu));
        let (rf, cf) = match s {
            Scenario::Relay => (None, None),
            _ => (of_ratio(r, fenced_rate), of_ratio(c, fenced_cpu)),
        };
        let goal = match s {
            Scenario::Relay | Scenario::FencedRelay => "-".to_string(),
            Scenario::Td { goal: None, .. } => "none".to_string(),
            Scenario::Td { goal: Some(g), .. } => match rr {
                Some(x) if x >= g => format!("≥ {g}: met"),
                Some(_) => format!("≥ {g}: missed"),
                None => format!("≥ {g}: not measured"),
            },
        };
        let cpu_goal = match (s, cr) {
            (Scenario::Relay | Scenario::FencedRelay, _) => "-".to_string(),
            (_, Some(x)) if x <= 1.25 => "met".to_string(),
            (_, Some(_)) => "missed".to_string(),
            (_, None) => "not measured".to_string(),
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
        let two = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
        body.push_str(&format!(
            "| {} | {} | {} | {} | {goal} | {} ({split}) | {} | {} | {cpu_goal} |\n",
            label(s),
            r.map(fmt_rate).unwrap_or_else(|| "not measured".into()),
            two(rr),
            two(rf),
            c.map_or("not measured".into(), |x| format!("{x:.1}")),
            two(cr),
            two(cf),
        ));
        rows.push(
            json!({"scenario": s, "label": label(s), "per_s": r, "ratio": rr,
            "ratio_fenced": rf, "cpu_us": c, "cpu_ratio": cr, "cpu_ratio_fenced": cf}),
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
        "Reproduce: `cargo build --release --bins && cargo run --release -p kappa-bench -- cost` \
         (`--readings N`; writes only this section of BENCHMARKS.md and the key `cost` of \
         benchmarks.json). The split in parentheses is the last round's.\n\n",
    );
    write_section(
        &out,
        SECTION,
        &body,
        json!({"date": date, "command": command, "readings": n, "sensors": sensors,
            "rows": rows,
            "runs": runs.iter().map(|(s, r)| json!({"scenario": s, "run": r})).collect::<Vec<_>>()}),
    )
}
