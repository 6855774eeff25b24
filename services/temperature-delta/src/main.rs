//! temperature-delta binary: parse config, run until SIGTERM, drain, exit.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc, not glibc malloc: see kappa-runtime's crate docs ("Allocator") for the measured reason.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "temperature-delta",
    about = "Per-sensor 10-minute temperature change: the reference domain kappa service"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    cfg: temperature_delta::Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exit 0 if this service's /healthz answers 200 (for container health checks).
    Healthcheck,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = kappa_runtime::app::parse_cli("temperature-delta");
    if let Some(Cmd::Healthcheck) = cli.cmd {
        return kappa_runtime::app::healthcheck(cli.cfg.http_addr).await;
    }
    let shutdown = kappa_runtime::shutdown::on_signal();
    match temperature_delta::run(cli.cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("temperature-delta: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
