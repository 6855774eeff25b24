//! query-api binary: parse config, serve until SIGTERM, drain, exit.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc, not glibc malloc: see kappa-runtime's crate docs ("Allocator") for the measured reason.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "query-api",
    about = "HTTP JSON API, live updates and a dashboard over the views built by view-builder"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    cfg: query_api::Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exit 0 if this service's /healthz answers 200 (for container health checks).
    Healthcheck,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = kappa_runtime::app::parse_cli("query-api");
    if let Some(Cmd::Healthcheck) = cli.cmd {
        return kappa_runtime::app::healthcheck(cli.cfg.http_addr).await;
    }
    match query_api::run(cli.cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("query-api: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
