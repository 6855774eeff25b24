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
    /// CA certificate (PEM) that signed the server's certificate: TLS is then required
    /// (also with a `tls://` URL). Without it, a `tls://` URL is verified against the system's
    /// roots.
    #[arg(long, env = "NATS_CA")]
    pub nats_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for servers that verify clients (mutual TLS; with NATS_KEY).
    #[arg(long, env = "NATS_CERT")]
    pub nats_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of NATS_CERT.
    #[arg(long, env = "NATS_KEY")]
    pub nats_key: Option<std::path::PathBuf>,
    /// Prefix of this client's inboxes (replies to its requests, JetStream acks and consumer
    /// deliveries). Default `_INBOX_<user>` with a NATS user (NATS_USER or the URL's), else
    /// `_INBOX_<service>`: a server's permissions can then let each user subscribe to its own
    /// inboxes only (docker/nats/permissions.conf), so no service reads another's replies.
    #[arg(long, env = "NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
    /// Seconds to wait for the first connection before giving up.
    #[arg(long, env = "NATS_CONNECT_TIMEOUT_SECS", default_value_t = 5)]
    pub nats_connect_timeout_secs: u64,
    /// Duplicate window, in seconds, of the streams this process creates (input, change log,
    /// dead letters): a `Nats-Msg-Id` published again within it is stored once. An existing
    /// stream keeps its own. Correctness does not rest on it (appends are fenced by expected
    /// sequence); a short one is for tests that outlast it.
    #[arg(long, env = "KAPPA_DUPLICATE_WINDOW_SECS", default_value_t = DEFAULT_DUPLICATE_WINDOW_SECS)]
    pub duplicate_window_secs: u64,
    /// Replicas of every stream and KV bucket this process declares (input, change log, dead
    /// letters, snapshots, leases, reference data): 1 on one server, 3 on a three-node
    /// cluster. Checked at start against the server (a single server fits only 1); an existing
    /// stream or bucket with another count is refused, never changed (see docs/operations.md,
    /// "Running on a NATS cluster").
    #[arg(long, env = "KAPPA_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
}

/// TLS to Redis: a `rediss://` URL turns it on; these settings say whom to trust and, for a
/// server that verifies clients, who this process is. They apply to every Redis of the process
/// reached over TCP (working state, views); a `unix://` socket does not use them.
#[derive(Debug, Clone, Default, Args)]
pub struct RedisTlsArgs {
    /// CA certificate (PEM) that signed the Redis server's certificate (for `rediss://` URLs,
    /// which are otherwise verified against the system's roots). Set with a `redis://` URL it
    /// is a configuration error: the connection would not use TLS.
    #[arg(long, env = "REDIS_CA")]
    pub redis_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a Redis that verifies clients (`tls-auth-clients`; with
    /// REDIS_KEY).
    #[arg(long, env = "REDIS_CERT")]
    pub redis_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of REDIS_CERT.
    #[arg(long, env = "REDIS_KEY")]
    pub redis_key: Option<std::path::PathBuf>,
}

impl RedisTlsArgs {
    /// True when any of the settings is given.
    pub fn is_set(&self) -> bool {
        self.redis_ca.is_some() || self.redis_cert.is_some() || self.redis_key.is_some()
    }
}

/// The default inbox prefix of a client: `_INBOX_<user>` when it connects as a named user,
/// else `_INBOX_<name>` (its service name). Characters that cannot be in a subject token are
/// replaced by `_`.
pub fn default_inbox_prefix(user: Option<&str>, name: &str) -> String {
    let who: String = user
        .unwrap_or(name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("_INBOX_{who}")
}

/// Checks an inbox prefix given by `NATS_INBOX_PREFIX`: one or more subject tokens, without
/// wildcards or spaces.
pub fn check_inbox_prefix(prefix: &str) -> Result<(), crate::RuntimeError> {
    let bad = prefix.is_empty()
        || prefix
            .split('.')
            .any(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c == '*' || c == '>'));
    if bad {
        return Err(crate::RuntimeError::Config(format!(
            "NATS_INBOX_PREFIX '{prefix}' must be subject tokens without wildcards or spaces, \
             e.g. _INBOX_my-service"
        )));
    }
    Ok(())
}

/// `url` (or a comma-separated list) with every password replaced by `***`, for messages: a
/// NATS or Redis URL may carry credentials (`scheme://user:password@host:port`).
pub fn redacted(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_string();
            };
            let Some((userinfo, host)) = rest.rsplit_once('@') else {
                return u.to_string();
            };
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Default duplicate window of the runtime's streams, in seconds.
pub const DEFAULT_DUPLICATE_WINDOW_SECS: u64 = 120;

/// Most replicas JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// How the streams and buckets a process declares are created: what [`NatsArgs`] says, or
/// the defaults (120 s duplicate window, one replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Duplicate window of a stream this process creates (an existing stream keeps its own).
    pub duplicate_window: std::time::Duration,
    /// Replicas of every stream and bucket this process declares (an existing one with another
    /// count is refused).
    pub replicas: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            duplicate_window: std::time::Duration::from_secs(DEFAULT_DUPLICATE_WINDOW_SECS),
            replicas: 1,
        }
    }
}

impl NatsArgs {
    /// The validated duplicate window (1 s to 1 day).
    pub fn duplicate_window(&self) -> Result<std::time::Duration, crate::RuntimeError> {
        if !(1..=86_400).contains(&self.duplicate_window_secs) {
            return Err(crate::RuntimeError::Config(format!(
                "KAPPA_DUPLICATE_WINDOW_SECS={} must be in 1..=86400",
                self.duplicate_window_secs
            )));
        }
        Ok(std::time::Duration::from_secs(self.duplicate_window_secs))
    }

    /// The validated replica count (1 to [`MAX_REPLICAS`]).
    pub fn replicas(&self) -> Result<usize, crate::RuntimeError> {
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(crate::RuntimeError::Config(format!(
                "KAPPA_REPLICAS={} must be in 1..={MAX_REPLICAS}",
                self.replicas
            )));
        }
        Ok(self.replicas)
    }

    /// The validated [`StreamOptions`] of this process.
    pub fn stream_options(&self) -> Result<StreamOptions, crate::RuntimeError> {
        Ok(StreamOptions {
            duplicate_window: self.duplicate_window()?,
            replicas: self.replicas()?,
        })
    }
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

/// How an instance gets its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ownership {
    /// Leases in a NATS KV bucket: instances share partitions fairly and take over on failure.
    Leases,
    /// Exactly the partitions in `--own-partitions` (one instance per partition, by hand).
    Static,
}

/// The settings every domain kappa service shares, one `KAPPA_` scheme, each a flag too.
/// A service flattens this into its own `clap` parser next to what is its own (its HTTP
/// listener, domain options).
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Redis for `remote` working state (`rediss://` for TLS).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// TLS to Redis (`REDIS_CA`, `REDIS_CERT`, `REDIS_KEY`).
    #[command(flatten)]
    pub redis_tls: RedisTlsArgs,
    /// Colocated Redis for `affinity` working state, e.g. `unix:///run/redis/redis.sock`.
    #[arg(long, env = "AFFINITY_REDIS_URL")]
    pub affinity_redis_url: Option<String>,
    /// How reference data (another service's state) is observed.
    #[arg(long, env = "KAPPA_OBSERVED", value_enum, default_value_t = ObservedMode::SemiStateless)]
    pub observed: ObservedMode,
    /// Where the working state lives.
    #[arg(long, env = "KAPPA_WORKING", value_enum, default_value_t = WorkingMode::Remote)]
    pub working: WorkingMode,
    /// Partitions of the input stream (used when the stream is created; an existing stream
    /// keeps its own count).
    #[arg(long, env = "KAPPA_PARTITIONS", default_value_t = 8)]
    pub partitions: u32,
    /// How partitions are shared between instances.
    #[arg(long, env = "KAPPA_OWNERSHIP", value_enum, default_value_t = Ownership::Leases)]
    pub ownership: Ownership,
    /// Lease time-to-live in seconds: a crashed instance's partitions move after this.
    #[arg(long, env = "KAPPA_LEASE_TTL_SECS", default_value_t = 6)]
    pub lease_ttl_secs: u64,
    /// Standbys per partition (`local` working state with leases; 0 = none): an instance keeps
    /// a warm copy of each partition it stands by for, from its snapshot and then its change
    /// log and the owner's committed position, so a takeover neither reads the snapshot again
    /// nor replays the inputs decided after it.
    #[arg(long, env = "KAPPA_STANDBYS", default_value_t = 0)]
    pub standbys: u32,
    /// With `--ownership static`: the partitions this instance runs, `all` or a list like `0,1,5`.
    #[arg(long, env = "KAPPA_OWN_PARTITIONS", default_value = "all")]
    pub own_partitions: String,
    /// Largest batch processed at once.
    #[arg(long, env = "KAPPA_BATCH", default_value_t = 256)]
    pub batch: usize,
    /// How long a partial batch may wait for more inputs while they arrive densely: `auto`
    /// (default: as long as the previous batch took, up to 5 ms, see
    /// [`crate::partition::Linger`]), `0` (never: lowest latency at any load, most CPU at
    /// moderate rates) or a number of milliseconds up to 1000 (see docs/operations.md).
    #[arg(long = "linger-ms", env = "KAPPA_LINGER_MS", default_value = "auto", value_parser = crate::partition::Linger::parse)]
    pub linger: crate::partition::Linger,
    /// Seconds between snapshots (`local` and `affinity`).
    #[arg(long, env = "KAPPA_SNAPSHOT_SECS", default_value_t = 5)]
    pub snapshot_interval_secs: u64,
    /// Time-out of a cached reference entry (`semi-stateless`).
    #[arg(long, env = "KAPPA_CACHE_TTL_SECS", default_value_t = 300)]
    pub cache_ttl_secs: u64,
    /// Most reference entries cached (`semi-stateless`).
    #[arg(long, env = "KAPPA_CACHE_MAX", default_value_t = 100_000)]
    pub cache_max_entries: u64,
    /// Time allowed for one request to the owner of the reference data, in milliseconds.
    #[arg(long, env = "KAPPA_OBSERVED_TIMEOUT_MS", default_value_t = 1000)]
    pub observed_timeout_ms: u64,
}

impl Settings {
    /// Checks what clap cannot; the error names the setting.
    pub fn validate(&self) -> Result<(), crate::RuntimeError> {
        self.validate_input()?;
        self.nats.stream_options()?;
        if self.working == WorkingMode::Affinity && self.affinity_redis_url.is_none() {
            return Err(crate::RuntimeError::Config(
                "KAPPA_WORKING=affinity needs AFFINITY_REDIS_URL".into(),
            ));
        }
        // A standby copies in-process state; `remote` and `affinity` keep it in Redis, which
        // the successor reads anyway, and static ownership has no successor.
        if self.standbys > 0
            && (self.working != WorkingMode::Local || self.ownership != Ownership::Leases)
        {
            let name = |v: Option<clap::builder::PossibleValue>| {
                v.map(|v| v.get_name().to_string()).unwrap_or_default()
            };
            return Err(crate::RuntimeError::Config(format!(
                "KAPPA_STANDBYS={} needs KAPPA_WORKING=local and KAPPA_OWNERSHIP=leases, not \
                 KAPPA_WORKING={} KAPPA_OWNERSHIP={}",
                self.standbys,
                name(self.working.to_possible_value()),
                name(self.ownership.to_possible_value())
            )));
        }
        Ok(())
    }

    /// Checks the settings of the partitioned input, its batches and its ownership: all that a
    /// [view](crate::view) uses (it has no working state).
    pub fn validate_input(&self) -> Result<(), crate::RuntimeError> {
        let bad = |m: String| Err(crate::RuntimeError::Config(m));
        if self.partitions == 0 || self.partitions > 1024 {
            return bad(format!(
                "KAPPA_PARTITIONS={} must be in 1..=1024",
                self.partitions
            ));
        }
        if self.batch == 0 || self.batch > 10_000 {
            return bad(format!("KAPPA_BATCH={} must be in 1..=10000", self.batch));
        }
        self.owned_partitions(self.partitions).map(|_| ())
    }

    /// The partitions this instance runs under static ownership, given the stream's count.
    pub fn owned_partitions(&self, partitions: u32) -> Result<Vec<u32>, crate::RuntimeError> {
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
                        crate::RuntimeError::Config(format!(
                            "KAPPA_OWN_PARTITIONS: '{s}' is not a partition in 0..{partitions}"
                        ))
                    })
            })
            .collect()
    }

    /// The cache settings of `semi-stateless`.
    pub fn cache(&self) -> crate::observed::semi_stateless::CacheConfig {
        crate::observed::semi_stateless::CacheConfig {
            max_entries: self.cache_max_entries,
            ttl: std::time::Duration::from_secs(self.cache_ttl_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn settings(args: &[&str]) -> Settings {
        let mut all = vec!["service"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parses").settings
    }

    #[test]
    fn standbys_are_refused_where_there_is_no_in_process_state_to_copy() {
        let ok = settings(&["--standbys", "1", "--working", "local"]);
        assert!(ok.validate().is_ok());
        assert!(settings(&["--standbys", "0"]).validate().is_ok());
        for args in [
            &["--standbys", "1"][..],
            &[
                "--standbys",
                "1",
                "--working",
                "affinity",
                "--affinity-redis-url",
                "redis://a",
            ],
            &[
                "--standbys",
                "2",
                "--working",
                "local",
                "--ownership",
                "static",
            ],
        ] {
            let e = settings(args).validate().expect_err("refused").to_string();
            assert!(
                e.contains("KAPPA_STANDBYS=") && e.contains("needs KAPPA_WORKING=local"),
                "{args:?}: {e}"
            );
        }
    }

    #[test]
    fn inbox_prefixes_follow_the_user_then_the_service() {
        assert_eq!(
            default_inbox_prefix(Some("view-builder"), "view-builder-rebuild"),
            "_INBOX_view-builder"
        );
        assert_eq!(
            default_inbox_prefix(None, "temperature-delta"),
            "_INBOX_temperature-delta"
        );
        assert_eq!(default_inbox_prefix(Some("a.b *>"), "x"), "_INBOX_a_b___");
        assert!(check_inbox_prefix("_INBOX_my-service").is_ok());
        assert!(check_inbox_prefix("team.inbox").is_ok());
        for bad in ["", "_INBOX.", "a.*", "a.>", "a b", ".a"] {
            assert!(check_inbox_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
