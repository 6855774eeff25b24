//! sensor-registry binary: parse config, run until SIGTERM, exit.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc, not glibc malloc: see kappa-runtime's crate docs ("Allocator") for the measured reason.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sensor-registry",
    about = "Owns sensor metadata; request-reply commands, every change appended to SENSORS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    cfg: sensor_registry::Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exit 0 if this service's /healthz answers 200 (for container health checks).
    Healthcheck,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = kappa_runtime::app::parse_cli("sensor-registry");
    if let Some(Cmd::Healthcheck) = cli.cmd {
        return kappa_runtime::app::healthcheck(cli.cfg.http_addr).await;
    }
    match sensor_registry::run(cli.cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sensor-registry: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
