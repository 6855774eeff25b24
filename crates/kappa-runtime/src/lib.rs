//! Runtime for *domain kappa services* on NATS JetStream.
//!
//! A domain kappa service owns its state; only its compute changes that state, and every change
//! is appended to a JetStream stream. An author writes the compute and the state's types; this
//! crate does everything else (`docs/runtime.md` is the guide):
//!
//! - what an author touches: [`compute`] (the [`compute::Compute`] trait: decode, a pure
//!   `decide`, and `evolve`, the only way state changes), [`service`] (the
//!   [`service::DomainService`] builder) and [`config::Settings`] (one `KAPPA_` surface);
//!   the read side: [`view`] ([`view::ViewService`] runs an author's [`view::View`], a persisted
//!   projection of a change log kept with its position, fenced, rebuildable from sequence 1);
//! - what the runtime guarantees with it: [`changelog`] (the service's change log and the
//!   outcome logs, fenced and deduplicated, read back after a crash), [`dlq`] (dead letters
//!   with a reason, one outcome per input), [`partition`] (the partitioned, ordered input and
//!   the driver), [`feed`] (the one change-feed follower: bootstrap, caught-up, tail, gaps,
//!   resume), [`lease`] (ownership shared between instances, with fencing epochs);
//! - the seed's options, chosen by configuration: [`observed`] (`stateful`, `stateless`,
//!   `semi-stateless`) and [`working`] (`local`, `remote`, `affinity`);
//! - plumbing: [`app`] (start, health check subcommand, CLI errors), [`nats`], [`http`]
//!   (`/healthz`, `/metrics`), [`status`] (the same report and the options on
//!   `kappa.status`, over NATS), [`telemetry`], [`shutdown`] (an injectable token).
//!
//! # Allocator
//!
//! This library sets no global allocator; binaries should choose mimalloc
//! (`#[global_allocator] static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;`, with
//! `mimalloc.workspace = true`), as every binary of this workspace does. A service handles many
//! small, short-lived buffers per message, and glibc's malloc was about 30% of
//! temperature-delta's CPU in a profile (`docs/BENCHMARKS.md`, "CPU per message").

#![warn(missing_docs)]

pub mod app;
pub mod changelog;
pub mod compute;
pub mod config;
pub mod consistency;
pub mod dlq;
pub(crate) mod engine;
pub mod error;
pub mod feed;
pub mod http;
pub mod lease;
pub mod nats;
pub mod observed;
pub mod partition;
pub mod progress;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod view;
pub mod working;

pub use error::RuntimeError;
/// The `time` crate, whose `OffsetDateTime` is in [`compute::Context`].
pub use time;
