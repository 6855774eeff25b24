//! The runtime's typed errors. Binaries report them with `anyhow`.

/// Errors of the runtime library.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A configuration value is unusable; the message says which and why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// NATS could not be reached or refused us.
    #[error("nats: {0}")]
    Nats(String),
    /// A JetStream API call failed. Its text names the server's last permissions violation when
    /// one was reported recently ([`crate::nats::explain`]): a refused request only times out.
    #[error("jetstream: {}", crate::nats::explain(.0))]
    JetStream(String),
    /// Redis failed (its text says what an ACL refusal or a wrong password means:
    /// [`crate::working::remote::explain`]).
    #[error("redis: {}", crate::working::remote::explain(.0))]
    Redis(#[from] redis::RedisError),
    /// The HTTP listener failed.
    #[error("http: {0}")]
    Http(String),
    /// Another instance owns what we tried to change.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The store no longer holds what this owner last committed there: it was wiped,
    /// restarted empty, rolled back (an AOF `everysec` tail lost, a failover to a lagging
    /// replica) or replaced. The partition must be opened again (recovering from the streams).
    #[error("store lost: {0}")]
    StoreLost(String),
    /// A view's store failed or refused (see [`crate::view::View`]).
    #[error("view store: {0}")]
    View(String),
    /// Stored state could not be decoded.
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

impl RuntimeError {
    /// Wraps any displayable JetStream error.
    pub fn js(e: impl std::fmt::Display) -> Self {
        Self::JetStream(e.to_string())
    }
}
