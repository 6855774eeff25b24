//! view-builder binary: parse config, run until SIGTERM (or rebuild the views), exit.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc, not glibc malloc: see kappa-runtime's crate docs ("Allocator") for the measured reason.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "view-builder",
    about = "Builds read-optimised views (per sensor, per site, top-N, history) in Redis from the deltas stream"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    cfg: view_builder::Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exit 0 if this service's /healthz answers 200 (for container health checks).
    Healthcheck,
    /// Rebuild every view from deltas-stream sequence 1 into a fresh generation and swap it in.
    Rebuild(view_builder::rebuild::RebuildArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = kappa_runtime::app::parse_cli("view-builder");
    let result = match cli.cmd {
        Some(Cmd::Healthcheck) => return kappa_runtime::app::healthcheck(cli.cfg.http_addr).await,
        Some(Cmd::Rebuild(args)) => view_builder::rebuild::run(cli.cfg, args).await.map(|r| {
            println!(
                "rebuilt views: generation {} is active (was {}); {} deltas applied, {} skipped, {} old keys dropped",
                r.generation, r.previous, r.deltas, r.skipped, r.dropped_keys
            );
        }),
        None => view_builder::run(cli.cfg, kappa_runtime::shutdown::on_signal()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("view-builder: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
