//! The engine that runs an author's [`Compute`] on one partition: the one place where the
//! guarantees of a domain kappa service are kept.
//!
//! Per batch handed over by the [driver](crate::partition):
//! 1. every input is decoded (a failure is a rejection, like any other decision);
//! 2. the entities not yet held are loaded: their stored state (working state) *and* the last
//!    message of each of their outcome logs (change log, dead letters). If the change log holds
//!    changes the stored state has not folded in (a crash between publish and commit, a store
//!    that lost the entity), they are read back and folded with [`Compute::evolve`]: the change
//!    log is the truth, the store is its cache;
//! 3. reference data is looked up once per key in the batch (observed state);
//! 4. each input whose sequence is above the entity's decided sequence is decided, and the
//!    state evolves in memory; an input at or below it was decided before (a replay) and is
//!    skipped, so a decision is made once per input, whatever happens between;
//! 5. the outcomes are appended, fenced and deduplicated; an entity's outcomes go out in input
//!    order, each after the previous one's ack (different entities are pipelined), so an
//!    entity's logs always hold a prefix of its decisions;
//! 6. the changed entities are committed with the partition's position, after every ack.
//!
//! Any failure drops what is held in memory; the retry starts again from step 2.
//!
//! With `KAPPA_STANDBYS`, [`standby`] keeps copies of partitions other instances own by
//! folding their change log with the same rules as step 2; `open` takes the copy of the
//! partition it opens, if there is one, and offers it to the working state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Serialize, de::DeserializeOwned};

use crate::RuntimeError;
use crate::changelog::{ChangeLog, Written};
use crate::compute::{Compute, Decision, Lookup, Rejection};
use crate::dlq::DeadLetters;
use crate::observed::{ObservedError, ObservedState};
use crate::partition::{Input, ProcessError, Processor};
use crate::working::{HeldState, Value, WorkingState};

mod standby;
pub(crate) use standby::Standbys;

/// Version of the stored form of an entity.
const STORED_VERSION: u8 = 3;
/// Bytes before the state in the stored form: version, decided, change_seq, dlq_seq, source,
/// log.
const STORED_HEADER: usize = 1 + 5 * 8;
/// The previous stored form (no `log`), still read: its `change_seq` is taken to refer to the
/// change log as it is now.
const STORED_VERSION_2: u8 = 2;
const STORED_HEADER_2: usize = 1 + 4 * 8;
/// Key of the input stream's identity in a partition's working state (a space is never in a
/// subject token, so no entity has this key).
const SOURCE_KEY: &str = "kappa input";

/// One entity as the engine holds it.
#[derive(Debug, Clone)]
struct Entity<S> {
    state: S,
    /// Highest input sequence decided for this entity (in the store or in an outcome log).
    decided: u64,
    /// Stream sequence of the entity's last change (what its next change must follow).
    change_seq: u64,
    /// Stream sequence of the entity's last dead letter.
    dlq_seq: u64,
    /// Identity of the input stream `decided` refers to (its creation time).
    source: u64,
    /// Identity of the change log `change_seq` refers to (its creation time; 0: unknown, from
    /// the stored form before it was recorded).
    log: u64,
    dirty: bool,
}

impl<S: Default> Default for Entity<S> {
    fn default() -> Self {
        Self {
            state: S::default(),
            decided: 0,
            change_seq: 0,
            dlq_seq: 0,
            source: 0,
            log: 0,
            dirty: false,
        }
    }
}

thread_local! {
    /// The buffer states are encoded into before they are copied out at their exact size.
    /// Encoding straight into a fresh `Vec` sized for a large state kept that capacity in
    /// every stored value (a 2-sample window, 92 bytes, held 1 KiB). Speed is the same either
    /// way (measured: 0.8 µs for a 50-sample window, 6.7 µs for 400, about 16 ns a sample,
    /// which is serde's per-field cost, not the buffer's).
    static ENCODE_BUFFER: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(4096));
}

/// A buffer above this size is not kept for the next encoding.
const ENCODE_BUFFER_KEPT: usize = 1 << 20;

fn encode_entity<S: Serialize>(e: &Entity<S>) -> Result<Bytes, RuntimeError> {
    ENCODE_BUFFER.with_borrow_mut(|out| {
        out.clear();
        out.push(STORED_VERSION);
        out.extend_from_slice(&e.decided.to_le_bytes());
        out.extend_from_slice(&e.change_seq.to_le_bytes());
        out.extend_from_slice(&e.dlq_seq.to_le_bytes());
        out.extend_from_slice(&e.source.to_le_bytes());
        out.extend_from_slice(&e.log.to_le_bytes());
        let encoded = postcard::to_io(&e.state, &mut *out)
            .map(|_| ())
            .map_err(|err| RuntimeError::Corrupt(format!("state not encodable: {err}")));
        let bytes = Bytes::copy_from_slice(out);
        if out.capacity() > ENCODE_BUFFER_KEPT {
            *out = Vec::with_capacity(4096);
        }
        encoded.map(|()| bytes)
    })
}

/// A committed entity handed to the working state as it is ([`Value::Held`]): `local` keeps it
/// and encodes it only when a snapshot writes it.
impl<S: Serialize + Send + Sync + 'static> HeldState for Entity<S> {
    fn encode(&self) -> Result<Bytes, RuntimeError> {
        encode_entity(self)
    }
}

/// The entity a working state's value holds: the engine's own committed one when it is held
/// as such (shared until the engine changes it), otherwise decoded from its stored form
/// (`None` if that is undecodable).
fn entity_of<S>(value: Value) -> Option<Arc<Entity<S>>>
where
    S: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    match value {
        Value::Held(held) => {
            // Held by another type than this engine's: not this service's state (`None`).
            let any: Arc<dyn std::any::Any + Send + Sync> = held;
            let entity = any.downcast::<Entity<S>>().ok();
            // What is held was committed (or handed over) clean: a dirty one would be written
            // again by the next batch that holds it for no change of its own.
            debug_assert!(
                entity.as_ref().is_none_or(|e| !e.dirty),
                "a held entity came back marked dirty"
            );
            entity
        }
        Value::Encoded(bytes) => decode_entity(&bytes).map(Arc::new),
    }
}

fn decode_entity<S: DeserializeOwned>(bytes: &[u8]) -> Option<Entity<S>> {
    let header = match bytes.first() {
        Some(&STORED_VERSION) => STORED_HEADER,
        Some(&STORED_VERSION_2) => STORED_HEADER_2,
        _ => return None,
    };
    if bytes.len() < header {
        return None;
    }
    let u = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[1 + 8 * i..9 + 8 * i]);
        u64::from_le_bytes(b)
    };
    let state = postcard::from_bytes(&bytes[header..]).ok()?;
    Some(Entity {
        state,
        decided: u(0),
        change_seq: u(1),
        dlq_seq: u(2),
        source: u(3),
        log: if header == STORED_HEADER { u(4) } else { 0 },
        dirty: false,
    })
}

/// What every partition of a service shares.
pub(crate) struct Parts<C: Compute> {
    pub compute: Arc<C>,
    pub service: String,
    pub changes: ChangeLog,
    pub dlq: DeadLetters,
    pub observed: Option<Arc<dyn ObservedState<C::Reference>>>,
    pub working: Arc<dyn WorkingState>,
    /// Subject prefix inputs are published under (for `Kappa-Source-Subject`).
    pub input_prefix: String,
    /// The input stream (a logged outcome can never name an input beyond its end).
    pub input_stream: String,
    /// JetStream, for the input stream's state.
    pub js: async_nats::jetstream::Context,
    /// Where each partition's committed position is published (read-your-writes).
    pub progress: crate::progress::Reporter,
    /// Warm copies of the partitions this instance stands by for (`KAPPA_STANDBYS`).
    pub standbys: Option<Arc<Standbys<C>>>,
}

/// Which logged outcomes the engine believes: written by this service, for an input that
/// exists. Anything else on the service's subjects (a forged or foreign message) is counted
/// and never folded in, so one message cannot silence an entity. An outcome decided for an
/// input of a stream that was since replaced is folded into the state (the state is the fold
/// of the change log) but decides nothing about the new stream's inputs.
struct Trust<'a> {
    service: &'a str,
    /// Identity of the current input stream.
    source: u64,
    /// Highest input sequence that exists.
    input_last: u64,
    /// Identity of the change log now.
    log: u64,
    /// A standby's copy judges too, but the owner is the one that counts and reports an
    /// ignored message (so one forged message is not counted once per instance).
    quiet: bool,
}

/// What a logged outcome is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Belief {
    /// Ours, for an input of the current stream: fold it, and its input is decided.
    Decided,
    /// Ours, for an input of a replaced stream: fold it, decide nothing.
    FoldOnly,
    /// Not ours: ignore it.
    Ignored,
}

impl Trust<'_> {
    fn weigh(
        &self,
        key: &str,
        stream_seq: u64,
        writer: Option<&str>,
        source: (u64, u64),
    ) -> Belief {
        let (source_stream, source_seq) = source;
        let ours = writer == Some(self.service) && source_seq > 0 && source_stream > 0;
        if ours && source_stream < self.source {
            // An older stream of the same name: created before the current one.
            return Belief::FoldOnly;
        }
        let ours = ours && source_stream == self.source;
        if ours && source_seq <= self.input_last {
            return Belief::Decided;
        }
        if self.quiet {
            tracing::debug!(
                key,
                stream_seq,
                "standby copy: an untrusted message ignored"
            );
            return Belief::Ignored;
        }
        metrics::counter!("kappa_untrusted_outcomes_total").increment(1);
        tracing::error!(
            key,
            stream_seq,
            writer,
            source_seq,
            input_last = self.input_last,
            "a message on this service's subjects was not written by it for an existing input; ignored"
        );
        Belief::Ignored
    }
}

/// Runs a [`Compute`] on one partition (see the module docs).
pub(crate) struct Engine<C: Compute> {
    parts: Arc<Parts<C>>,
    partition: u32,
    epoch: u64,
    /// Until when this ownership may commit (self-fencing; unbounded with static ownership).
    lease: crate::partition::LeaseDeadline,
    /// Identity of the input stream as this partition was opened (its creation time).
    source: u64,
    /// Identity of the change log as last seen (at open, or after a conflict showed it was
    /// replaced).
    log: u64,
    /// The identity is not yet in the working state (written with the next commit).
    source_unrecorded: bool,
    /// The entities held, each shared with the working state once committed (`local`) and
    /// copied when a batch first changes it (copy on write): what the store holds stays the
    /// committed state whatever the batch in hand does.
    entities: HashMap<String, Arc<Entity<C::State>>>,
}

enum Outcome {
    Change(Bytes),
    Dead(Rejection, Bytes),
}

type Lookups<R> = HashMap<String, Result<Option<Arc<R>>, ObservedError>>;

impl<C: Compute> Engine<C> {
    pub(crate) fn new(parts: Arc<Parts<C>>, partition: u32) -> Self {
        Self {
            parts,
            partition,
            epoch: 0,
            lease: crate::partition::LeaseDeadline::unbounded(),
            source: 0,
            log: 0,
            source_unrecorded: false,
            entities: HashMap::new(),
        }
    }

    /// Loads `keys`: stored state, then whatever the outcome logs hold beyond it. `batch_last`
    /// is the last input sequence of the batch in hand.
    async fn load(&mut self, keys: Vec<String>, batch_last: u64) -> Result<(), ProcessError> {
        if keys.is_empty() {
            return Ok(());
        }
        let p = self.parts.clone();
        let stored = p.working.load(self.partition, &keys).await?;
        let (changes, dead) =
            tokio::try_join!(p.changes.log().last_many(&keys), p.dlq.last_many(&keys))?;
        let lasts: Vec<_> = changes.into_iter().zip(dead).collect();
        // A logged outcome beyond the batch's inputs is legitimate only if a previous owner got
        // further; beyond the input stream's end it cannot be ours. Ask the stream only then.
        let source = self.source;
        let beyond = lasts.iter().any(|(c, d)| {
            [c, d].iter().any(|w| {
                w.as_ref()
                    .is_some_and(|w| w.source_stream == source && w.source_seq > batch_last)
            })
        });
        let input_last = if beyond {
            let mut s =
                p.js.get_stream(&p.input_stream)
                    .await
                    .map_err(RuntimeError::js)?;
            s.info()
                .await
                .map_err(RuntimeError::js)?
                .state
                .last_sequence
        } else {
            batch_last
        };
        let trust = Trust {
            service: &p.service,
            source,
            input_last,
            log: self.log,
            quiet: false,
        };
        // Most entities need no request here (their stored state is current); the others read
        // their log's tail, a bounded number at a time.
        let loaded: Vec<Result<_, RuntimeError>> =
            futures::stream::iter(keys.into_iter().zip(stored).zip(lasts).map(
                |((key, value), last)| {
                    let (p, trust) = (&p, &trust);
                    async move {
                        let (last_change, last_dlq) = last;
                        let entity =
                            recover_entity::<C>(p, trust, &key, value, last_change, last_dlq)
                                .await?;
                        Ok::<_, RuntimeError>((key, entity))
                    }
                },
            ))
            .buffer_unordered(crate::nats::PUBLISH_WINDOW)
            .collect()
            .await;
        for r in loaded {
            let (key, entity) = r?;
            self.entities.insert(key, entity);
        }
        Ok(())
    }

    async fn lookups(&self, keys: Vec<String>) -> Lookups<C::Reference> {
        let Some(observed) = &self.parts.observed else {
            return HashMap::new();
        };
        let found = observed.get_many(&keys).await;
        for (k, f) in keys.iter().zip(&found) {
            if let Err(e) = f {
                tracing::warn!(key = %k, error = %e, "reference lookup failed");
            }
        }
        keys.into_iter().zip(found).collect()
    }

    /// Awaits the ack of one appended outcome of `key` and records where it was stored; a
    /// conflict (another writer) or a duplicate (already stored under this input's id) fails
    /// the batch, which is then retried from what the logs hold.
    async fn settle(
        &mut self,
        key: &str,
        is_change: bool,
        ack: async_nats::jetstream::context::PublishAckFuture,
    ) -> Result<(), ProcessError> {
        let ack = match ack.await {
            Ok(a) => a,
            Err(e) if crate::changelog::is_conflict(&e) => {
                metrics::counter!("kappa_fenced_publishes_total").increment(1);
                self.learn_log_identity().await;
                return Err(ProcessError::Transient(format!(
                    "the log of {key} moved on since it was read (another writer?)"
                )));
            }
            Err(e) => return Err(ProcessError::Transient(format!("publish ack: {e}"))),
        };
        if ack.duplicate {
            // Stored before, under this input's id: what is in the log may not be what was
            // decided now, so read the entity back.
            return Err(ProcessError::Transient(format!(
                "an outcome of {key} was already in the log; reloading"
            )));
        }
        if let Some(e) = self.entities.get_mut(key) {
            let e = Arc::make_mut(e);
            if is_change {
                e.change_seq = ack.sequence;
                metrics::counter!("kappa_changes_total").increment(1);
            } else {
                e.dlq_seq = ack.sequence;
            }
        }
        Ok(())
    }

    async fn process_batch(&mut self, batch: &[Input]) -> Result<(), ProcessError> {
        let parts = self.parts.clone();
        let compute = &*parts.compute;
        let subjects = crate::partition::original_subjects(&parts.input_prefix, batch);
        let partition = self.partition;
        let ctx = |i: usize| batch[i].context(partition, &subjects[i]);
        // 1. Decode.
        let decoded: Vec<Result<C::Input, Rejection>> = (0..batch.len())
            .map(|i| compute.decode(&ctx(i), &batch[i].payload))
            .collect();
        // 2. Load the entities not held.
        let mut seen: HashSet<&str> = HashSet::with_capacity(batch.len());
        let mut missing: Vec<String> = Vec::new();
        for input in batch {
            let k = input.entity();
            if !self.entities.contains_key(k) && seen.insert(k) {
                missing.push(k.to_string());
            }
        }
        self.load(missing, batch.last().map_or(0, |i| i.seq))
            .await?;
        // 3. Reference data, once per key.
        let ref_keys: Vec<Option<String>> = (0..batch.len())
            .map(|i| match &decoded[i] {
                Ok(input) if parts.observed.is_some() => compute.reference_key(&ctx(i), input),
                _ => None,
            })
            .collect();
        let mut seen: HashSet<&str> = HashSet::with_capacity(batch.len());
        let mut wanted: Vec<String> = Vec::new();
        for k in ref_keys.iter().flatten() {
            if seen.insert(k.as_str()) {
                wanted.push(k.clone());
            }
        }
        let lookups = self.lookups(wanted).await;

        // 4. Decide, in input order; the state evolves as decisions are made.
        let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
        let mut replayed = 0u64;
        for (i, input) in decoded.into_iter().enumerate() {
            let c = ctx(i);
            let Some(entity) = self.entities.get_mut(c.key) else {
                return Err(ProcessError::Transient(format!("{} not loaded", c.key)));
            };
            if c.seq <= entity.decided {
                replayed += 1;
                continue;
            }
            // The first change of the batch copies a state the working state still holds.
            let entity = Arc::make_mut(entity);
            let decision = match input {
                Err(rejection) => Decision::Reject(rejection),
                Ok(input) => {
                    let reference = match &ref_keys[i] {
                        None if parts.observed.is_none() => Lookup::NotObserved,
                        None => Lookup::Unknown,
                        Some(k) => match lookups.get(k) {
                            Some(Ok(Some(r))) => Lookup::Found(&**r),
                            Some(Ok(None)) | None => Lookup::Unknown,
                            Some(Err(ObservedError::Unavailable(why))) => {
                                Lookup::Unavailable(why.as_str())
                            }
                        },
                    };
                    compute.decide(&c, &entity.state, input, reference)
                }
            };
            entity.decided = c.seq;
            entity.dirty = true;
            match decision {
                Decision::Emit(change) => {
                    let body = serde_json::to_vec(&change).map_err(|e| {
                        ProcessError::Transient(format!("change not encodable: {e}"))
                    })?;
                    compute.evolve(&mut entity.state, &change);
                    outcomes.push((i, Outcome::Change(Bytes::from(body))));
                }
                Decision::Reject(r) => {
                    outcomes.push((i, Outcome::Dead(r, batch[i].payload.clone())));
                }
                Decision::Nothing => {}
            }
        }
        if replayed > 0 {
            metrics::counter!("kappa_replayed_inputs_total").increment(replayed);
        }

        // 5. Append the outcomes: per entity in input order, entities pipelined. Not past the
        // lease deadline (the process may have been paused since the batch began).
        self.check_lease()?;
        let mut depth: HashMap<&str, usize> = HashMap::new();
        let mut waves: Vec<Vec<(usize, Outcome)>> = Vec::new();
        for (i, o) in outcomes {
            let d = depth.entry(batch[i].entity()).or_insert(0);
            if waves.len() <= *d {
                waves.resize_with(*d + 1, Vec::new);
            }
            waves[*d].push((i, o));
            *d += 1;
        }
        drop(depth);
        for wave in waves {
            // An entity appears once per wave, so its acks may be awaited in any order; at most
            // PUBLISH_WINDOW stay outstanding (see `crate::nats::MAX_ACKS_IN_FLIGHT`).
            let mut pending = crate::nats::AckWindow::new(crate::nats::PUBLISH_WINDOW);
            for (i, o) in wave {
                if let Some(((key, is_change), ack)) = pending.make_room() {
                    self.settle(key, is_change, ack).await?;
                }
                let key = batch[i].entity();
                let entity = self.entities.get(key);
                let (change_seq, dlq_seq) = entity.map_or((0, 0), |e| (e.change_seq, e.dlq_seq));
                let (is_change, ack) = match o {
                    Outcome::Change(body) => (
                        true,
                        parts
                            .changes
                            .append(key, body, (self.source, batch[i].seq), change_seq)
                            .await?,
                    ),
                    Outcome::Dead(r, payload) => (
                        false,
                        parts
                            .dlq
                            .append(
                                key,
                                (&subjects[i], self.source, batch[i].seq),
                                payload,
                                &r,
                                Some(dlq_seq),
                            )
                            .await?,
                    ),
                };
                pending.push((key, is_change), ack);
            }
            for ((key, is_change), ack) in pending.rest() {
                self.settle(key, is_change, ack).await?;
            }
        }

        // 6. Commit the changed entities with the position.
        // Every dirty entity is one of the batch's (decided now, or refolded when loaded).
        let mut writes = Vec::new();
        if self.source_unrecorded {
            writes.push((
                SOURCE_KEY.to_string(),
                Value::Encoded(Bytes::copy_from_slice(&self.source.to_le_bytes())),
            ));
        }
        for input in batch {
            let key = input.entity();
            if let Some(e) = self.entities.get_mut(key)
                && e.dirty
            {
                Arc::make_mut(e).dirty = false;
                let held: Arc<dyn HeldState> = e.clone();
                writes.push((key.to_string(), Value::Held(held)));
            }
        }
        let position = batch.last().map_or(0, |i| i.seq);
        self.check_lease()?;
        // A failed commit clears every entity (see `process`), so `dirty` needs no undo.
        parts
            .working
            .commit(self.partition, self.epoch, position, writes)
            .await?;
        self.source_unrecorded = false;
        self.report(position);
        Ok(())
    }
}

/// Builds an entity from its stored form and its logs: folds in the changes the store missed.
async fn recover_entity<C: Compute>(
    p: &Parts<C>,
    trust: &Trust<'_>,
    key: &str,
    stored: Option<Value>,
    last_change: Option<Written>,
    last_dlq: Option<Written>,
) -> Result<Arc<Entity<C::State>>, RuntimeError> {
    let mut held = match stored {
        None => Arc::new(Entity::default()),
        Some(value) => entity_of(value).unwrap_or_else(|| {
            metrics::counter!("kappa_state_undecodable_total").increment(1);
            tracing::warn!(
                key,
                "stored state is undecodable; rebuilding it from the change log"
            );
            Arc::new(Entity::default())
        }),
    };
    // Most entities are current: they stay shared with the working state, uncopied.
    if held.source != trust.source || held.log != trust.log {
        follow_identities(Arc::make_mut(&mut held), trust, key);
    }
    let behind = last_change
        .as_ref()
        .is_some_and(|l| l.stream_seq > held.change_seq);
    if let Some(last) = last_change
        && behind
    {
        let entity = Arc::make_mut(&mut held);
        let missed = p
            .changes
            .log()
            .range(key, entity.change_seq, last.stream_seq)
            .await?;
        let n = missed.len();
        for m in missed {
            fold_logged(&*p.compute, trust, key, entity, &m);
        }
        entity.dirty = true;
        metrics::counter!("kappa_changes_refolded_total").increment(n as u64);
    }
    if let Some(last) = last_dlq {
        // Judged on the shared entity: it is copied only if the dead letter changes it (an
        // entity whose last dead letter it already knows stays shared).
        let belief = trust.weigh(
            key,
            last.stream_seq,
            last.writer.as_deref(),
            (last.source_stream, last.source_seq),
        );
        let decided = if belief == Belief::Decided {
            held.decided.max(last.source_seq)
        } else {
            held.decided
        };
        if decided != held.decided || last.stream_seq != held.dlq_seq {
            let entity = Arc::make_mut(&mut held);
            entity.decided = decided;
            if last.stream_seq != entity.dlq_seq {
                entity.dlq_seq = last.stream_seq;
                entity.dirty = true;
            }
        }
    }
    Ok(held)
}

/// Brings a stored entity's identities in line with the streams as they are now (`trust`):
/// decisions about a replaced input stream decide nothing any more, and a `change_seq` into a
/// replaced change log counts as 0 (the state, the fold of the old log, is kept, and what the
/// new log holds for the entity is folded from its first message).
fn follow_identities<S>(entity: &mut Entity<S>, trust: &Trust<'_>, key: &str) {
    if entity.source != trust.source {
        // Decided against a stream that was replaced (or never): its sequences say nothing
        // about the current stream's inputs. The state itself stays.
        entity.decided = 0;
        entity.source = trust.source;
        entity.dirty = true;
    }
    if entity.log != trust.log {
        if entity.log != 0 {
            // The change log was replaced (deleted and created again): `change_seq` points
            // into a stream that is gone. The state is kept (it is the fold of the old log);
            // whatever the new log holds for the entity was written after the replacement and
            // is folded in by the caller, from its first message.
            metrics::counter!("kappa_changelog_replaced_entities_total").increment(1);
            tracing::debug!(
                key,
                "change log replaced since this state was stored; following the new one"
            );
            entity.change_seq = 0;
        }
        entity.log = trust.log;
        entity.dirty = true;
    }
}

/// Folds one logged change of `key` into `entity` if it is believed (see [`Trust`]); the
/// entity's `change_seq` moves past it either way.
fn fold_logged<C: Compute>(
    compute: &C,
    trust: &Trust<'_>,
    key: &str,
    entity: &mut Entity<C::State>,
    m: &crate::changelog::Entry,
) {
    let belief = trust.weigh(
        key,
        m.stream_seq,
        m.writer.as_deref(),
        (m.source_stream, m.source_seq),
    );
    if belief == Belief::Ignored {
        entity.change_seq = m.stream_seq;
        return;
    }
    match serde_json::from_slice::<C::Change>(&m.payload) {
        Ok(change) => {
            compute.evolve(&mut entity.state, &change);
            if belief == Belief::Decided {
                entity.decided = entity.decided.max(m.source_seq);
            }
        }
        Err(e) => {
            metrics::counter!("kappa_changelog_undecodable_total").increment(1);
            tracing::error!(key, seq = m.stream_seq, error = %e,
                "a change in the log is undecodable; skipped");
        }
    }
    entity.change_seq = m.stream_seq;
}

impl<C: Compute> Engine<C> {
    /// After a conflict on the change log: if the log is not the stream this partition knew
    /// (deleted and created again), every `change_seq` refers to a stream that is gone, and
    /// the retry must load entities against the new one (`recover_entity`). Otherwise the
    /// conflict was another writer, and the retry's reload refolds what it wrote.
    async fn learn_log_identity(&mut self) {
        let stream = self.parts.changes.log().stream().to_string();
        match crate::partition::stream_identity(&self.parts.js, &stream).await {
            Ok((now, _)) if now != self.log => {
                metrics::counter!("kappa_changelog_replaced_total").increment(1);
                tracing::error!(partition = self.partition, stream = %stream,
                    "the change log was replaced (deleted and created again) while running; states are kept and the new log continues from them");
                self.log = now;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(partition = self.partition, error = %e,
                "change log identity not read after a conflict"),
        }
    }

    /// Publishes (in the background) that the partition has decided its input up to `position`.
    fn report(&self, position: u64) {
        self.parts.progress.report(
            self.partition,
            crate::progress::Mark {
                position,
                source: self.source,
            },
        );
    }

    /// Fenced once the lease deadline has passed: a successor may own the partition.
    fn check_lease(&self) -> Result<(), ProcessError> {
        if self.lease.expired() {
            metrics::counter!("kappa_lease_self_fenced_total").increment(1);
            return Err(ProcessError::Fenced(format!(
                "partition {}: lease of epoch {} expired during the batch",
                self.partition, self.epoch
            )));
        }
        Ok(())
    }
}

impl<C: Compute> Processor for Engine<C> {
    fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    fn set_lease(&mut self, lease: crate::partition::LeaseDeadline) {
        self.lease = lease;
    }

    async fn open(&mut self, partition: u32) -> Result<u64, ProcessError> {
        self.partition = partition;
        self.entities.clear();
        let p = self.parts.clone();
        // A standby's copy first (its follower stops), then the streams' identities: if they
        // are still those the copy was built against, every change it folded is of this log
        // and its position of this input stream. The claim happens in `open_warm`, before the
        // copy is used.
        let taken = match &p.standbys {
            Some(s) => s.take(partition).await,
            None => None,
        };
        let (source, last) = crate::partition::stream_identity(&p.js, &p.input_stream).await?;
        self.log = crate::partition::stream_identity(&p.js, p.changes.log().stream())
            .await?
            .0;
        let warm = taken.and_then(|t| {
            let same = t.source == source && t.log == self.log;
            if !same {
                tracing::warn!(partition, "standby copy not used: the input stream or the change log was replaced since it was started");
            }
            same.then_some(t.copy)
        });
        let mut position = p.working.open_warm(partition, self.epoch, warm).await?;
        let recorded = p
            .working
            .load(partition, &[SOURCE_KEY.to_string()])
            .await?
            .pop()
            .flatten()
            .and_then(|v| v.encoded().ok())
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_le_bytes);
        let replaced = recorded.is_some_and(|r| r != source);
        if replaced || position > last {
            // The position refers to another stream of the same name (deleted and created
            // again, the only way to change its partitions) or to messages it no longer has.
            metrics::counter!("kappa_input_stream_replaced_total").increment(1);
            tracing::error!(partition, stream = %p.input_stream, position, stream_last = last,
                recorded = ?recorded, current = source,
                "the input stream is not the one the stored position refers to; processing it from its first message (states are kept, decisions about the old stream's inputs no longer count)");
            p.working.rebase(partition, self.epoch, 0).await?;
            position = 0;
        }
        self.source = source;
        self.source_unrecorded = recorded != Some(source);
        self.report(position);
        Ok(position)
    }

    async fn process(&mut self, batch: &[Input]) -> Result<(), ProcessError> {
        let r = self.process_batch(batch).await;
        if r.is_err() {
            // What was decided but not committed is gone; the retry reloads and re-decides.
            self.entities.clear();
        }
        r
    }

    async fn close(&mut self) {
        if let Err(e) = self.parts.working.close(self.partition).await {
            tracing::warn!(partition = self.partition, service = %self.parts.service,
                error = %e, "closing working state failed");
        }
        self.entities.clear();
    }
}

impl<C: Compute> Drop for Engine<C> {
    /// However the partition's ownership ended (handover, fence, shutdown), this instance may
    /// stand by for it again.
    fn drop(&mut self) {
        if let Some(s) = &self.parts.standbys {
            s.released(self.partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips() {
        let e = Entity {
            state: vec![1i64, -2, 3],
            decided: 42,
            change_seq: 7,
            dlq_seq: 9,
            source: 5,
            log: 11,
            dirty: true,
        };
        let bytes = encode_entity(&e).expect("encodable");
        let back: Entity<Vec<i64>> = decode_entity(&bytes).expect("decodable");
        assert_eq!(back.state, e.state);
        assert_eq!(
            (
                back.decided,
                back.change_seq,
                back.dlq_seq,
                back.source,
                back.log
            ),
            (42, 7, 9, 5, 11)
        );
        assert!(!back.dirty);
        assert!(decode_entity::<Vec<i64>>(&bytes[..10]).is_none());
        let mut wrong = bytes.to_vec();
        wrong[0] = 99;
        assert!(decode_entity::<Vec<i64>>(&wrong).is_none());
    }

    #[test]
    fn a_held_value_is_the_committed_entity_itself_and_encodes_to_its_stored_form() {
        let e = Arc::new(Entity {
            state: vec![1i64, 2],
            decided: 4,
            change_seq: 3,
            ..Entity::default()
        });
        let held: Arc<dyn HeldState> = e.clone();
        let value = Value::Held(held);
        let stored = value.encoded().expect("encodable");
        assert_eq!(stored, encode_entity(&*e).expect("encodable"));
        let back: Arc<Entity<Vec<i64>>> = entity_of(value.clone()).expect("this state's type");
        assert!(
            Arc::ptr_eq(&back, &e),
            "taken back without a copy or a decode"
        );
        // The engine's copy on write leaves what the working state holds as committed.
        let mut working = back;
        Arc::make_mut(&mut working).state.push(3);
        let again: Arc<Entity<Vec<i64>>> = entity_of(value).expect("this state's type");
        assert_eq!(again.state, vec![1, 2]);
        assert_eq!(working.state, vec![1, 2, 3]);
        // Its stored form is read as any other.
        let decoded: Arc<Entity<Vec<i64>>> = entity_of(Value::Encoded(stored)).expect("decodable");
        assert_eq!((decoded.state.clone(), decoded.decided), (vec![1, 2], 4));
    }

    #[test]
    fn a_state_held_by_another_type_is_not_taken_for_this_one() {
        let other: Arc<dyn HeldState> = Arc::new(Entity {
            state: String::from("not a window"),
            ..Entity::default()
        });
        assert!(entity_of::<Vec<i64>>(Value::Held(other)).is_none());
    }

    #[test]
    fn the_stored_form_before_the_log_identity_is_still_read() {
        let e = Entity {
            state: vec![4i64],
            decided: 3,
            change_seq: 2,
            dlq_seq: 1,
            source: 8,
            log: 0,
            dirty: false,
        };
        let v3 = encode_entity(&e).expect("encodable");
        // Version 2: the same header without the log identity.
        let mut v2 = vec![STORED_VERSION_2];
        v2.extend_from_slice(&v3[1..STORED_HEADER_2]);
        v2.extend_from_slice(&v3[STORED_HEADER..]);
        let back: Entity<Vec<i64>> = decode_entity(&v2).expect("decodable");
        assert_eq!(back.state, vec![4]);
        assert_eq!(
            (
                back.decided,
                back.change_seq,
                back.dlq_seq,
                back.source,
                back.log
            ),
            (3, 2, 1, 8, 0)
        );
    }
}
