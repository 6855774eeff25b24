//! The author's side of a domain kappa service: a [`Compute`] turns one typed input, the
//! current state of the entity it is about, and the observed reference data into a
//! [`Decision`]: one state change, a rejection with a reason, or nothing.
//!
//! The model is the *decider* of event sourcing, in the shape of Kafka Streams' Processor API:
//! - [`Compute::decode`] turns the raw record into the author's input type (or rejects it);
//! - [`Compute::decide`] is pure: it reads the state and never mutates it;
//! - [`Compute::evolve`] is the only function that changes the state, and it changes it only
//!   by folding in a change that the runtime has written to the change log.
//!
//! So the state can never move without its change being in the stream, and the runtime can
//! rebuild any entity's state from its change log alone (after a crash between the publish and
//! the commit, or when a store lost it): the seed's rule "the data does not go to the stream or
//! the stream to the data without passing through the compute" is a property of the types.
//!
//! Everything here is I/O-free, so a compute is unit-tested without any server: build a state,
//! call `decide`, fold the change with `evolve`, compare.

use std::borrow::Cow;

use async_nats::HeaderMap;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::observed::Versioned;

/// What the runtime tells a compute about the input in hand (Kafka Streams'
/// `ProcessorContext`, minus everything the runtime does itself: no producer, no store handle,
/// no commit).
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The entity the input is about: the last token of its subject.
    pub key: &'a str,
    /// The input's sequence in its stream: unique, and growing within a partition.
    pub seq: u64,
    /// The partition the input belongs to.
    pub partition: u32,
    /// The subject the producer published to (`<prefix>.<key>`).
    pub subject: &'a str,
    /// When the input stream stored the input.
    pub published: time::OffsetDateTime,
    /// The input's headers, if any.
    pub headers: Option<&'a HeaderMap>,
}

/// Why an input is rejected: a stable machine-readable `reason` (the `Kappa-Reason` header and
/// the `reason` label of `kappa_rejected_total`) and an optional human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable code, e.g. `late`, `malformed`, `overdraft`.
    pub reason: Cow<'static, str>,
    /// Free text for a human (the `Kappa-Detail` header), bounded by the runtime.
    pub detail: Option<String>,
}

impl Rejection {
    /// A rejection with a reason code and no detail.
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason: reason.into(),
            detail: None,
        }
    }

    /// Adds a detail for humans.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// The outcome of one input. The runtime makes it exactly once per input sequence: a retry or a
/// replay of the same input never yields a second change, nor a change and a dead letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision<C> {
    /// The entity's state changes: the runtime appends the change to the change log, awaits
    /// its ack, folds it in with [`Compute::evolve`] and commits the state with the position.
    Emit(C),
    /// The input is refused: the runtime dead-letters it with the reason.
    Reject(Rejection),
    /// The input changes nothing and deserves no dead letter (e.g. a duplicate command).
    Nothing,
}

impl<C> Decision<C> {
    /// A state change.
    pub fn emit(change: C) -> Self {
        Self::Emit(change)
    }

    /// A rejection with a reason code.
    pub fn reject(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::Reject(Rejection::new(reason))
    }
}

impl<C> From<Rejection> for Decision<C> {
    fn from(r: Rejection) -> Self {
        Self::Reject(r)
    }
}

/// The observed reference data of an input's entity, as the runtime found it.
#[derive(Debug)]
pub enum Lookup<'a, R> {
    /// The owner knows the entity.
    Found(&'a R),
    /// The owner does not know the entity.
    Unknown,
    /// The owner could not be asked (time-outs after retries); the text says why.
    Unavailable(&'a str),
    /// The service observes no reference data.
    NotObserved,
}

/// Reference data for a compute that observes none (`type Reference = NoReference`).
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct NoReference;

impl Versioned for NoReference {
    fn version(&self) -> u64 {
        0
    }
}

/// A service's compute: typed input, typed per-entity state, typed change, and the two pure
/// functions that decide and fold. See the module docs and `docs/runtime.md`.
pub trait Compute: Send + Sync + 'static {
    /// The decoded input.
    type Input: Send;
    /// One entity's state. `Default` is the state of an entity never seen; it is stored by the
    /// chosen working-state option in a compact binary form of its serde representation.
    /// `Clone`: the committed state is shared with the working state (`local` keeps it as it
    /// is), and the engine copies it when a batch first changes it.
    type State: Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// One state change: its JSON is the change-log message (the service's wire contract).
    type Change: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Observed reference data, looked up by [`Compute::reference_key`] (or [`NoReference`]).
    type Reference: Versioned + std::fmt::Debug;

    /// Schema of the changes, sent in the `Kappa-Schema` header (e.g. `thermo.delta/1`).
    const CHANGE_SCHEMA: &'static str;

    /// Decodes and validates an input; a rejection is dead-lettered with its reason.
    fn decode(&self, ctx: &Context<'_>, payload: &[u8]) -> Result<Self::Input, Rejection>;

    /// The reference-data key of an input (default: the entity's key; `None`: no lookup).
    fn reference_key(&self, ctx: &Context<'_>, _input: &Self::Input) -> Option<String> {
        Some(ctx.key.to_string())
    }

    /// Decides what `input` does to `state`. Pure: no I/O, no clock, no mutation.
    fn decide(
        &self,
        ctx: &Context<'_>,
        state: &Self::State,
        input: Self::Input,
        reference: Lookup<'_, Self::Reference>,
    ) -> Decision<Self::Change>;

    /// Folds a change that is in the change log into the state. The only way state changes.
    fn evolve(&self, state: &mut Self::State, change: &Self::Change);
}
