//! thermometer binary: parse config, publish readings, print a summary, exit.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc, not glibc malloc: see kappa-runtime's crate docs ("Allocator") for the measured reason.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "thermometer",
    about = "Simulated (or CSV-replayed) temperature sensors publishing readings"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    cfg: thermometer::Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exit 0 if this service's /healthz answers 200 (for container health checks).
    Healthcheck,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = kappa_runtime::app::parse_cli("thermometer");
    if let Some(Cmd::Healthcheck) = cli.cmd {
        return kappa_runtime::app::healthcheck(cli.cfg.http_addr).await;
    }
    match thermometer::run(cli.cfg).await {
        Ok(s) => {
            println!(
                "thermometer: published {} readings ({} duplicates) in {:.2}s ({:.0}/s)",
                s.published,
                s.duplicates,
                s.secs,
                s.published as f64 / s.secs.max(1e-9)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("thermometer: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
