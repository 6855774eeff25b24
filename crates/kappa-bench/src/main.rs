//! kappa-bench: measures raw NATS/Redis baselines and the reference DAG's services in one run,
//! prints Markdown tables and writes them to `docs/BENCHMARKS.md` and `docs/benchmarks.json`
//! (`smoke`: tiny counts, written to `target/bench-smoke/`). No figure is asserted: targets are
//! reported as met or missed. `all` and `smoke` are a table of scenarios run by one runner
//! (`all.rs`); every other mode writes its own section of BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release --bins && cargo run --release -p kappa-bench -- all
//! ```

mod all;
mod baseline;
mod chart;
mod cost;
mod durability;
mod growth;
mod infra;
mod latency;
mod report;
mod rounds;
mod ryw;
mod services;
mod topology;
mod views;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

// mimalloc, not glibc malloc: see kappa-runtime's crate docs ("Allocator") for the measured reason.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kappa-bench",
    about = "Benchmarks of Kappa Services (tables, no assertions)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// Use the servers at NATS_URL / REDIS_URL (and AFFINITY_REDIS_URL if set) instead of
    /// starting nats-server and redis-server. Their streams and keys are wiped.
    #[arg(long, global = true)]
    reuse: bool,
    /// Directory for BENCHMARKS.md and benchmarks.json (default: docs/ for `all`,
    /// target/bench-smoke/ for `smoke`).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Readings per throughput run (default: 100000 for `all`, 2000 for `smoke`).
    #[arg(long, global = true)]
    readings: Option<u64>,
    /// Seconds of each open-loop load level of `latency` and `ryw` (default 10 and 20): short
    /// runs keep the harness working (CI), the defaults measure.
    #[arg(long, global = true)]
    secs: Option<f64>,
    /// `latency`: take this as the DAG's sustained maximum (readings/s) instead of measuring
    /// it, so that two runs (say, two settings through `--service-env`) load it at the same
    /// rates. The drain still runs, for the CPU and batch figures.
    #[arg(long, global = true)]
    dag_max: Option<f64>,
    /// Where the service binaries are (default: the directory of this executable).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// `NAME=VALUE` set in every service's environment (repeatable): to compare a setting of
    /// the services in two runs of the same mode.
    #[arg(long = "service-env", global = true, value_parser = parse_env_pair)]
    service_env: Vec<(String, String)>,
    /// `growth`: the largest sensor count of the sweep (10^3, 10^4, .. up to it; default 10^6).
    #[arg(long, global = true)]
    max_sensors: Option<u64>,
    /// `growth`: only these working options (comma-separated; default all three), e.g. to
    /// look at one option's largest size without the others' runs.
    #[arg(long, global = true, value_delimiter = ',')]
    working: Vec<String>,
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every measurement at full size.
    All,
    /// Tiny counts, to keep the harness working (CI).
    Smoke,
    /// Only the durability comparison: default vs strict (`sync_interval: always`,
    /// `appendfsync always`), written as its own section of BENCHMARKS.md.
    Durability,
    /// Only the topology comparison: one node, one node with per-service users, a 3-node
    /// cluster with R3 streams; written as its own section of BENCHMARKS.md.
    Topology,
    /// Only read-your-writes: `min_seq` reads right after each publish ack at 10% and 50% of
    /// the DAG's maximum, beside the one-hop baseline; its own section of BENCHMARKS.md.
    Ryw,
    /// Only the per-message cost: temperature-delta's options against the relay, in
    /// alternated rounds; its own section of BENCHMARKS.md.
    Cost,
    /// Only end-to-end latency: the whole DAG at 10%, 50% and 80% of its sustained maximum,
    /// beside the one-hop baseline at the same rate; its own section of BENCHMARKS.md.
    Latency,
    /// Only view-builder against a fair baseline (a relay writing the views' structures per
    /// delta in one Redis pipeline per batch), in alternated rounds; its own section of
    /// BENCHMARKS.md.
    Views,
    /// Only growth: temperature-delta per working option across 10^3 .. 10^6 sensors, window
    /// lengths and partition counts (throughput, memory per sensor, recovery); its own section
    /// of BENCHMARKS.md and the chart growth.svg beside it.
    Growth,
}

impl Mode {
    /// The mode's own section of BENCHMARKS.md, for the modes that measure one comparison on
    /// servers of their own; `None` for `all` and `smoke`, which run the main tables.
    fn section(self) -> Option<&'static str> {
        match self {
            Mode::All | Mode::Smoke => None,
            Mode::Durability => Some("durability"),
            Mode::Topology => Some("topology"),
            Mode::Ryw => Some("ryw"),
            Mode::Cost => Some("cost"),
            Mode::Views => Some("views"),
            Mode::Latency => Some("latency"),
            Mode::Growth => Some("growth"),
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kappa-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    let line = s.lines().next().unwrap_or("error").to_string();
    line.chars().take(160).collect()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    services::set_service_env(cli.service_env.clone());
    if let Some(name) = cli.mode.section() {
        let bin_dir = cli.bin_dir.clone().unwrap_or_else(|| {
            kappa_testkit::procs::bin_dir().unwrap_or_else(|_| root.join("target/release"))
        });
        if cli.reuse {
            anyhow::bail!("{name} starts its own servers (one set per mode): no --reuse");
        }
        let command = format!(
            "cargo run --release -p kappa-bench -- {name}{}{}{}",
            cli.max_sensors
                .map(|n| format!(" --max-sensors {n}"))
                .unwrap_or_default()
                + &if cli.working.is_empty() {
                    String::new()
                } else {
                    format!(" --working {}", cli.working.join(","))
                },
            cli.readings
                .map(|n| format!(" --readings {n}"))
                .unwrap_or_default(),
            cli.service_env
                .iter()
                .map(|(k, v)| format!(" --service-env {k}={v}"))
                .collect::<String>()
        );
        let out = cli.out.clone().unwrap_or_else(|| root.join("docs"));
        return match cli.mode {
            Mode::Durability => durability::run(&root, bin_dir, out, cli.readings, command).await,
            Mode::Ryw => ryw::run(&root, bin_dir, out, cli.readings, cli.secs, command).await,
            Mode::Cost => cost::run(&root, bin_dir, out, cli.readings, command).await,
            Mode::Views => views::run(&root, bin_dir, out, cli.readings, command).await,
            Mode::Latency => {
                latency::run(
                    &root,
                    bin_dir,
                    out,
                    cli.readings,
                    (cli.secs, cli.dag_max),
                    command,
                )
                .await
            }
            Mode::Topology => topology::run(&root, bin_dir, out, cli.readings, command).await,
            Mode::Growth => {
                let sweep = growth::Sweep {
                    readings: cli.readings,
                    max_sensors: cli.max_sensors,
                    working: cli.working.clone(),
                };
                growth::run(&root, bin_dir, out, sweep, command).await
            }
            Mode::All | Mode::Smoke => anyhow::bail!("{name}: not a section mode"),
        };
    }
    all::run(&root, cli.mode == Mode::All, &cli).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_env_pairs_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_env_pair("KAPPA_LINGER_MS=0"),
            Ok(("KAPPA_LINGER_MS".into(), "0".into()))
        );
        assert_eq!(parse_env_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(
            parse_env_pair("EMPTY="),
            Ok(("EMPTY".into(), String::new()))
        );
        for bad in ["NOVALUE", "=x", ""] {
            let e = parse_env_pair(bad).expect_err(bad);
            assert!(e.contains("expected NAME=VALUE"), "{bad}: {e}");
        }
        // The flag goes through clap with the same message.
        let e = Cli::try_parse_from(["kappa-bench", "--service-env", "oops", "smoke"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("expected NAME=VALUE"), "{e}");
    }
}
