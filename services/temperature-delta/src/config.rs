//! temperature-delta's configuration: every value a flag and an environment variable.

use std::net::SocketAddr;

use kappa_runtime::config::{NatsArgs, ObservedMode, WorkingMode};

/// How an instance gets its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ownership {
    /// Leases in a NATS KV bucket: instances share partitions fairly and take over on failure.
    Leases,
    /// Exactly the partitions in `--own-partitions` (one instance per partition, by hand).
    Static,
}

/// Flags and environment.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Redis for `remote` working state.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Colocated Redis for `affinity` working state, e.g. `unix:///run/redis/redis.sock`.
    #[arg(long, env = "AFFINITY_REDIS_URL")]
    pub affinity_redis_url: Option<String>,
    /// Health and metrics listener.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9103",
          value_parser = kappa_runtime::config::parse_listen_addr)]
    pub http_addr: SocketAddr,
    /// How the registry is observed.
    #[arg(long, env = "KAPPA_OBSERVED", value_enum, default_value_t = ObservedMode::SemiStateless)]
    pub observed: ObservedMode,
    /// Where the windows live.
    #[arg(long, env = "KAPPA_WORKING", value_enum, default_value_t = WorkingMode::Remote)]
    pub working: WorkingMode,
    /// Partitions of the readings stream (used when the stream is created).
    #[arg(long, env = "KAPPA_PARTITIONS", default_value_t = 8)]
    pub partitions: u32,
    /// How partitions are shared between instances.
    #[arg(long, env = "KAPPA_OWNERSHIP", value_enum, default_value_t = Ownership::Leases)]
    pub ownership: Ownership,
    /// Lease time-to-live in seconds: a crashed instance's partitions move after this.
    #[arg(long, env = "KAPPA_LEASE_TTL_SECS", default_value_t = 6)]
    pub lease_ttl_secs: u64,
    /// With `--ownership static`: the partitions this instance runs, `all` or a list like `0,1,5`.
    #[arg(long, env = "KAPPA_OWN_PARTITIONS", default_value = "all")]
    pub own_partitions: String,
    /// Largest batch processed at once.
    #[arg(long, env = "KAPPA_BATCH", default_value_t = 256)]
    pub batch: usize,
    /// Milliseconds a partial batch may wait for more readings while they arrive densely (0 =
    /// never: lowest latency; 2 ms cut CPU by a fifth at 8k readings/s, see docs/operations.md).
    #[arg(long, env = "KAPPA_LINGER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub linger_ms: u64,
    /// Seconds between snapshots (`local` and `affinity`).
    #[arg(long, env = "KAPPA_SNAPSHOT_SECS", default_value_t = 5)]
    pub snapshot_interval_secs: u64,
    /// Time-out of a cached registry entry (`semi-stateless`).
    #[arg(long, env = "KAPPA_CACHE_TTL_SECS", default_value_t = 300)]
    pub cache_ttl_secs: u64,
    /// Most registry entries cached (`semi-stateless`).
    #[arg(long, env = "KAPPA_CACHE_MAX", default_value_t = 100_000)]
    pub cache_max_entries: u64,
    /// Time allowed for one registry request, in milliseconds.
    #[arg(long, env = "KAPPA_REGISTRY_TIMEOUT_MS", default_value_t = 1000)]
    pub registry_timeout_ms: u64,
}

impl Config {
    /// Checks values clap cannot.
    pub fn validate(&self) -> Result<(), kappa_runtime::RuntimeError> {
        let bad = |m: String| Err(kappa_runtime::RuntimeError::Config(m));
        if self.partitions == 0 || self.partitions > 1024 {
            return bad(format!(
                "KAPPA_PARTITIONS={} must be in 1..=1024",
                self.partitions
            ));
        }
        if self.batch == 0 || self.batch > 10_000 {
            return bad(format!("KAPPA_BATCH={} must be in 1..=10000", self.batch));
        }
        self.parse_own(self.partitions).map(|_| ())
    }

    fn parse_own(&self, partitions: u32) -> Result<Vec<u32>, kappa_runtime::RuntimeError> {
        if self.own_partitions.trim() == "all" {
            return Ok((0..partitions).collect());
        }
        self.own_partitions
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|p| *p < partitions)
                    .ok_or_else(|| {
                        kappa_runtime::RuntimeError::Config(format!(
                            "KAPPA_OWN_PARTITIONS: '{s}' is not a partition in 0..{partitions}"
                        ))
                    })
            })
            .collect()
    }

    /// The partitions this instance runs, given the stream's real partition count.
    pub fn owned_partitions(&self, partitions: u32) -> Vec<u32> {
        self.parse_own(partitions)
            .unwrap_or_else(|_| (0..partitions).collect())
    }
}
