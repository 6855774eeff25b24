//! Configuration shared by every service: NATS connection flags and the seed's option choices.
//! Each service flattens these into its own `clap` parser, so every value is a flag and an
//! environment variable.

use clap::{Args, ValueEnum};

/// How to reach NATS.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Path to a NATS credentials file.
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// NATS user (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// Seconds to wait for the first connection before giving up.
    #[arg(long, env = "NATS_CONNECT_TIMEOUT_SECS", default_value_t = 5)]
    pub nats_connect_timeout_secs: u64,
}

/// The seed's three options for observed state (another service's state this one reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObservedMode {
    /// Full in-memory replica, bootstrapped from and kept current by the other service's stream.
    Stateful,
    /// Request-reply to the owning service on every lookup.
    Stateless,
    /// A bounded, expiring cache kept current by the stream; request-reply on a miss.
    SemiStateless,
}

/// The seed's three options for working state (the state the compute reads and changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkingMode {
    /// Process memory, recovered from the streams (snapshot + replay).
    Local,
    /// Redis over the network.
    Remote,
    /// A Redis colocated with the instance (unix socket), with stream recovery as fallback.
    Affinity,
}

impl std::fmt::Display for ObservedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stateful => "stateful",
            Self::Stateless => "stateless",
            Self::SemiStateless => "semi-stateless",
        })
    }
}

impl std::fmt::Display for WorkingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Remote => "remote",
            Self::Affinity => "affinity",
        })
    }
}

/// Parses a `host:port` listen address with a clear error.
pub fn parse_listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a listen address like 127.0.0.1:8080"))
}
