//! Test tooling shared by `integration-tests` and `kappa-bench`: one copy of the helpers both
//! drive the real service binaries and servers with.
//!
//! - [`procs`]: the service binaries (and servers) as child processes: where the binaries are,
//!   start with arguments, environment and a log file, readiness, SIGTERM, kill -9, exit.
//! - [`ports`]: a free TCP port.
//! - [`wait`]: polling a condition until it holds or a timeout passes.
//! - [`http`]: one GET against a service's HTTP listener.
//! - [`metrics`]: reading Prometheus metrics from a service's `/metrics`.
//! - [`clients`]: NATS (with JetStream) and Redis connections.
//! - [`streams`]: counting, reading back and deleting JetStream streams.
//! - [`tls`]: a CA and certificates made with `openssl`, for TLS tests.
//!
//! What differs between the two users stays with them: the integration tests' servers
//! (testcontainers or `NATS_URL`/`REDIS_URL`) and DAG oracle, the benchmark's host servers and
//! `/proc` CPU accounting. Fallible helpers return `anyhow::Result` (or `Option` for probes
//! polled in loops); tests decide to panic with `expect`.

#![warn(missing_docs)]

pub mod clients;
pub mod http;
pub mod metrics;
pub mod ports;
pub mod procs;
pub mod streams;
pub mod tls;
pub mod wait;

pub use procs::Proc;
