//! Runtime for *domain kappa services* on NATS JetStream.
//!
//! A domain kappa service owns its state; only its compute changes that state, and every change
//! is appended to a JetStream stream. This crate gives such a service its plumbing:
//!
//! - [`config`]: flags and environment shared by every service, and the seed's option choices;
//! - [`nats`]: connecting, and declaring streams idempotently;
//! - [`partition`]: the partitioned, ordered input reader and the processing driver
//!   ([`partition::Processor`]): pull a batch, compute, publish, commit, ack;
//! - [`feed`]: the one change-feed follower (bootstrap, caught-up, tail, gaps, resume);
//! - [`observed`]: the seed's three options for *observed* state behind one trait;
//! - [`working`]: the seed's three options for *working* state behind one trait;
//! - [`dlq`]: the dead-letter stream, with a reason on every rejected input;
//! - [`http`]: `/healthz` (readiness) and Prometheus `/metrics`, plus a service's own routes;
//! - [`shutdown`]: SIGTERM/SIGINT handling and draining.
//!
//! # Allocator
//!
//! This library sets no global allocator; binaries should choose mimalloc
//! (`#[global_allocator] static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;`, with
//! `mimalloc.workspace = true`), as every binary of this workspace does. A service handles many
//! small, short-lived buffers per message, and glibc's malloc was about 30% of
//! temperature-delta's CPU in a profile (`docs/BENCHMARKS.md`, "CPU per message").

pub mod app;
pub mod changelog;
pub mod compute;
pub mod config;
pub mod dlq;
pub(crate) mod engine;
pub mod error;
pub mod feed;
pub mod http;
pub mod lease;
pub mod nats;
pub mod observed;
pub mod partition;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod working;

pub use error::RuntimeError;
/// The `time` crate, whose `OffsetDateTime` is in [`compute::Context`].
pub use time;
