//! The ledger binary: a domain kappa service in one builder call.

use std::process::ExitCode;

use clap::Parser;

// mimalloc, not glibc malloc: see kappa-runtime's crate docs ("Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Account balances that refuse overdrafts, on kappa-runtime.
#[derive(Parser)]
#[command(name = "ledger")]
struct Cli {
    #[command(flatten)]
    kappa: kappa_runtime::config::Settings,
    /// Health and metrics listener.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9200",
          value_parser = kappa_runtime::config::parse_listen_addr)]
    http_addr: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = kappa_runtime::app::parse_cli("ledger");
    let service = kappa_runtime::service::DomainService::new("ledger", ledger::Ledger, cli.kappa)
        .input(ledger::OPS.0, ledger::OPS.1)
        .changes(ledger::BALANCES.0, ledger::BALANCES.1)
        .http(cli.http_addr);
    match service.run(kappa_runtime::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ledger: error: {e}");
            ExitCode::from(2)
        }
    }
}
