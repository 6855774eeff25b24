//! Warm standbys (`KAPPA_STANDBYS`): copies of the partitions another instance owns, kept
//! current from the change log, so that a takeover after the owner's death replays almost
//! nothing.
//!
//! For each partition it stands by for, an instance runs one *follower*:
//! 1. it starts from the partition's latest snapshot ([`WorkingState::peek`]): its position and
//!    every entity's stored form;
//! 2. one long-lived [`Feed`] (an ordered consumer) reads the change log filtered to the
//!    partition's subjects (`<prefix>.<p>.*`), from just after the newest change the snapshot
//!    folded; every change is queued, then judged ([`Trust`], as the engine judges) and folded
//!    into its entity with [`Compute::evolve`], exactly as the engine's load refolds a change;
//! 3. every second it reads the owner's committed position `P` from the progress bucket and
//!    *then* the sequence `L` of the partition's last change; once the feed has delivered `L`,
//!    the copy's position becomes `P`. The owner appends an input's change before the commit
//!    that moves its position, and reports the position after that commit, so every change of
//!    an input at or below `P` is at or below `L`: the copy holds it (except for an entity
//!    whose snapshot entry was older than the feed's start and that the feed has not touched
//!    since: the engine refolds that one when it loads it, as for any stale snapshot entry).
//!
//! At a takeover the engine [`takes`](Standbys::take) the copy: the follower reads `P` and `L`
//! one last time, waits (briefly) until the feed delivered `L`, stops, and hands the copy over;
//! the engine checks that the input stream and the change log are still the ones the copy was
//! built from (their identities did not change since the follower started, so every change it
//! folded is of this log), and [`WorkingState::open_warm`] claims the partition under the new
//! epoch before it uses the copy, as without a standby.
//!
//! Why a copy can only cost replay, never a wrong result:
//! - its position is a position an owner committed after the acks of every outcome at or
//!   below it (a zombie's too: it commits only after its fenced appends were acked);
//! - every entity in it is the fold of a prefix of its change log, naming the last change
//!   folded (`change_seq`) and the inputs it decided; an entity folds a change directly only if
//!   the feed delivered every change of it after its `change_seq` (its `change_seq` is at or
//!   after the feed's start), otherwise it first reads the missed ones back (as the engine's
//!   load does). A change of an entity the copy does not have yet, or appended after the copy
//!   was taken, is seen by the engine at load (the log is ahead of `change_seq`) and refolded;
//! - dead letters are not followed: the engine reads each entity's last dead letter at load
//!   (whatever the stored form says), so a stale `dlq_seq` costs nothing;
//! - a gap the feed cannot close (the log truncated or replaced under it) drops the copy; it
//!   starts again from the snapshot.
//!
//! Trade-off: the fold needs the author's [`Compute`], so the follower lives here, beside the
//! engine, and the working state only receives a finished copy (`open_warm`) and lends its
//! snapshot (`peek`): `local` stays ignorant of change logs and computes. The price is that
//! the copy is held twice while it is built (the snapshot's stored forms, and the decoded
//! entities the log touched), and that a standby decodes and folds every change of the
//! partitions it stands by for (as the owner does once per change), plus per partition and
//! second one progress read, one last-message read and, when changes came, one input-stream
//! read (to judge them as the engine does).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{Entity, Trust, decode_entity, fold_logged, follow_identities};
use crate::RuntimeError;
use crate::changelog::{ChangeLog, Entry};
use crate::compute::Compute;
use crate::feed::{Change, Feed, FeedConfig, FeedHandler, Gap, GapCause, Start};
use crate::nats::Nats;
use crate::progress::ProgressReader;
use crate::shutdown::CancellationToken;
use crate::working::{HeldState, Value, WarmCopy, WorkingState};

/// How long a takeover waits for the follower to deliver the partition's last change.
const FINAL_SYNC: Duration = Duration::from_secs(2);

/// The standbys of one service instance: one follower per partition stood by for.
pub(crate) struct Standbys<C: Compute> {
    compute: Arc<C>,
    service: String,
    changes: ChangeLog,
    working: Arc<dyn WorkingState>,
    nats: Nats,
    input_stream: String,
    progress: ProgressReader,
    shutdown: CancellationToken,
    followers: Mutex<HashMap<u32, Arc<Follower<C::State>>>>,
    /// Partitions this instance opened (their copies were taken), until they close.
    owned: Mutex<HashSet<u32>>,
}

/// A copy handed to the engine at a takeover, with the identities it was built against.
pub(crate) struct Taken {
    /// The copy.
    pub copy: WarmCopy,
    /// Identity of the input stream when the follower started.
    pub source: u64,
    /// Identity of the change log when the follower started.
    pub log: u64,
}

struct Follower<S> {
    partition: u32,
    feed: Mutex<Option<Feed>>,
    stop: CancellationToken,
    /// Changes delivered by the feed, not yet folded (stream order).
    queue: Arc<Mutex<Vec<Change>>>,
    /// A gap the feed cannot close: the copy is unusable.
    broken: Arc<AtomicBool>,
    copy: tokio::sync::Mutex<Copy<S>>,
}

struct Copy<S> {
    position: u64,
    /// The position is an owner's reported one (of input stream `source`), not the snapshot's.
    marked: bool,
    source: u64,
    log: u64,
    /// The feed delivers every change after `first - 1`.
    first: u64,
    /// Highest input sequence known to exist (to judge changes as the engine does).
    input_last: u64,
    /// The owner's committed position read last, and the partition's last change after it:
    /// the position the copy reaches once the feed delivered that change.
    pending: Option<(u64, u64)>,
    /// Stored forms from the snapshot, not decoded (yet).
    raw: HashMap<String, Bytes>,
    /// Entities the change log touched, decoded and brought further.
    entities: HashMap<String, Entity<S>>,
}

/// Queues what the feed delivers; folding happens in [`Standbys`] (it may read the log).
struct Queue {
    queue: Arc<Mutex<Vec<Change>>>,
    broken: Arc<AtomicBool>,
    partition: u32,
}

impl FeedHandler for Queue {
    async fn apply(&mut self, change: Change) {
        if let Ok(mut q) = self.queue.lock() {
            q.push(change);
        }
    }

    async fn gap(&mut self, gap: Gap) {
        // A broken subscription or a reconnect resumes after the last applied change: nothing
        // is lost. A truncated or replaced log is.
        if matches!(
            gap.cause,
            GapCause::Truncated | GapCause::Reset | GapCause::Sequence
        ) {
            tracing::warn!(partition = self.partition, cause = %gap.cause,
                "standby copy dropped: its change log lost messages under it");
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

impl<C: Compute> Standbys<C> {
    /// Standbys folding with `compute` the change log `changes` of `service`, from snapshots
    /// of `working`, positions from `progress`; followers stop with `shutdown`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        compute: Arc<C>,
        service: &str,
        changes: ChangeLog,
        working: Arc<dyn WorkingState>,
        nats: Nats,
        input_stream: &str,
        progress: ProgressReader,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            compute,
            service: service.to_string(),
            changes,
            working,
            nats,
            input_stream: input_stream.to_string(),
            progress,
            shutdown,
            followers: Mutex::new(HashMap::new()),
            owned: Mutex::new(HashSet::new()),
        }
    }

    fn follower(&self, p: u32) -> Option<Arc<Follower<C::State>>> {
        self.followers.lock().ok()?.get(&p).cloned()
    }

    fn is_owned(&self, p: u32) -> bool {
        self.owned.lock().map(|o| o.contains(&p)).unwrap_or(true)
    }

    /// Keeps one follower per partition of `partitions` not opened here, and stops the others;
    /// moves every copy's position on (see the module docs).
    async fn refresh(&self, partitions: &BTreeSet<u32>) -> Result<(), RuntimeError> {
        let stale: Vec<Arc<Follower<C::State>>> = match self.followers.lock() {
            Ok(mut f) => {
                let gone: Vec<u32> = f
                    .iter()
                    .filter(|(p, x)| {
                        !partitions.contains(p)
                            || self.is_owned(**p)
                            || x.broken.load(Ordering::Relaxed)
                    })
                    .map(|(p, _)| *p)
                    .collect();
                gone.iter().filter_map(|p| f.remove(p)).collect()
            }
            Err(_) => Vec::new(),
        };
        for f in stale {
            f.stop.cancel();
            no_copy_gauges(f.partition);
        }
        let mut first_error = None;
        for &p in partitions {
            if self.is_owned(p) {
                continue;
            }
            let r = match self.follower(p) {
                Some(f) => self.advance(&f, false).await.map(|_| ()),
                None => self.start(p).await,
            };
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Starts following partition `p` from its latest snapshot.
    async fn start(&self, p: u32) -> Result<(), RuntimeError> {
        let Some(filter) = self.changes.log().partition_filter(p) else {
            return Ok(());
        };
        let Some((position, entries)) = self.working.peek(p).await? else {
            return Ok(());
        };
        let js = &self.nats.js;
        let (source, input_last) =
            crate::partition::stream_identity(js, &self.input_stream).await?;
        let (log, _) = crate::partition::stream_identity(js, self.changes.log().stream()).await?;
        // The feed starts after the newest change the snapshot folded; an entity folded less
        // far reads its missed changes back before it follows the feed (`fold_queued`).
        let mut newest = 0;
        for (_, v) in &entries {
            if let Some(e) = decode_entity::<C::State>(v)
                && (e.log == log || e.log == 0)
            {
                newest = newest.max(e.change_seq);
            }
        }
        let keys = entries.len();
        let copy = Copy {
            position,
            marked: false,
            source,
            log,
            first: newest + 1,
            input_last,
            pending: None,
            raw: entries.into_iter().collect(),
            entities: HashMap::new(),
        };
        let queue = Arc::new(Mutex::new(Vec::new()));
        let broken = Arc::new(AtomicBool::new(false));
        let stop = self.shutdown.child_token();
        let feed = Feed::start(
            &self.nats,
            FeedConfig::new(self.changes.log().stream(), filter, Start::AfterSeq(newest)),
            Queue {
                queue: queue.clone(),
                broken: broken.clone(),
                partition: p,
            },
            stop.clone(),
        );
        let f = Arc::new(Follower {
            partition: p,
            feed: Mutex::new(Some(feed)),
            stop,
            queue,
            broken,
            copy: tokio::sync::Mutex::new(copy),
        });
        if let Ok(mut all) = self.followers.lock()
            && let Some(old) = all.insert(p, f)
        {
            old.stop.cancel();
        }
        metrics::gauge!("kappa_standby_position", "partition" => p.to_string())
            .set(position as f64);
        tracing::debug!(
            partition = p,
            position,
            keys,
            after = newest,
            "standby copy started from the snapshot"
        );
        Ok(())
    }

    /// Reads the owner's position and the partition's last change, folds what the feed
    /// delivered, and moves the copy's position as far as is proven (module docs). With
    /// `wait`, first waits (up to [`FINAL_SYNC`]) until the feed delivered that last change.
    /// Returns whether the copy reached the owner's position.
    async fn advance(&self, f: &Follower<C::State>, wait: bool) -> Result<bool, RuntimeError> {
        let p = f.partition;
        // The mark first, then the log's end: every change of an input the mark covers is at or
        // below that end.
        let mark = self.progress.mark(p).await?;
        let last = self.changes.log().last_in_partition(p).await?;
        let delivered = |f: &Follower<C::State>| {
            f.feed
                .lock()
                .ok()
                .and_then(|x| x.as_ref().map(Feed::applied_seq))
                .unwrap_or(0)
        };
        if wait && delivered(f) < last {
            let rx = f
                .feed
                .lock()
                .ok()
                .and_then(|x| x.as_ref().map(Feed::watch_applied));
            if let Some(mut rx) = rx {
                let _ = tokio::time::timeout(FINAL_SYNC, rx.wait_for(|s| *s >= last)).await;
            }
        }
        let applied = delivered(f);
        let mut copy = f.copy.lock().await;
        self.fold_queued(f, &mut copy).await?;
        let mut reached = false;
        let mut owner = copy.position;
        // The previous reading is proven once the feed delivered its last change.
        if let Some((position, upto)) = copy.pending
            && applied >= upto
        {
            copy.marked |= position >= copy.position;
            copy.position = copy.position.max(position);
            copy.pending = None;
        }
        if let Some(m) = mark
            && m.source == copy.source
        {
            owner = m.position;
            if applied >= last {
                copy.marked |= m.position >= copy.position;
                copy.position = copy.position.max(m.position);
                copy.pending = None;
                reached = true;
            } else {
                copy.pending = Some((m.position, last));
            }
        }
        let label = p.to_string();
        metrics::gauge!("kappa_standby_position", "partition" => label.clone())
            .set(copy.position as f64);
        metrics::gauge!("kappa_standby_lag", "partition" => label)
            .set(owner.saturating_sub(copy.position) as f64);
        Ok(reached)
    }

    /// Judges and folds the changes the feed delivered, in order (module docs).
    async fn fold_queued(
        &self,
        f: &Follower<C::State>,
        copy: &mut Copy<C::State>,
    ) -> Result<(), RuntimeError> {
        let queued = f
            .queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        if queued.is_empty() {
            return Ok(());
        }
        // Every change was appended after its input was stored: read the input stream's end
        // now, and a change naming an input beyond it is not ours (as in the engine's load).
        let beyond = queued.iter().any(|c| {
            let e = Entry::from_message(c.stream_seq, c.headers.as_ref(), Bytes::new());
            e.source_stream == copy.source && e.source_seq > copy.input_last
        });
        if beyond {
            let js = &self.nats.js;
            copy.input_last = crate::partition::stream_identity(js, &self.input_stream)
                .await?
                .1;
        }
        let trust = Trust {
            service: &self.service,
            source: copy.source,
            input_last: copy.input_last,
            log: copy.log,
            quiet: true,
        };
        let mut folded = 0u64;
        let mut caught_up = 0u64;
        let mut queued = queued.into_iter();
        while let Some(c) = queued.next() {
            let key = c.key().to_string();
            if !copy.entities.contains_key(&key) {
                let mut e = copy
                    .raw
                    .remove(&key)
                    .and_then(|b| decode_entity::<C::State>(&b))
                    .unwrap_or_default();
                follow_identities(&mut e, &trust, &key);
                copy.entities.insert(key.clone(), e);
            }
            let first = copy.first;
            let Some(e) = copy.entities.get_mut(&key) else {
                continue;
            };
            if c.stream_seq <= e.change_seq {
                continue;
            }
            if e.change_seq + 1 < first {
                // The feed did not deliver this entity's changes between its stored form and
                // the feed's start: read them back (this one included) before following.
                match self
                    .changes
                    .log()
                    .range(&key, e.change_seq, c.stream_seq)
                    .await
                {
                    Ok(missed) => {
                        for x in &missed {
                            fold_logged(&*self.compute, &trust, &key, e, x);
                        }
                        caught_up += 1;
                        folded += missed.len() as u64;
                    }
                    Err(err) => {
                        // Nothing of this change is folded: it and the rest wait, in order,
                        // for the next round.
                        if let Ok(mut q) = f.queue.lock() {
                            let mut rest: Vec<Change> = std::iter::once(c).chain(queued).collect();
                            rest.append(&mut q);
                            *q = rest;
                        }
                        return Err(err);
                    }
                }
            } else {
                let m = Entry::from_message(c.stream_seq, c.headers.as_ref(), c.payload);
                fold_logged(&*self.compute, &trust, &key, e, &m);
                folded += 1;
            }
            e.dirty = true;
        }
        metrics::counter!("kappa_standby_changes_total").increment(folded);
        if caught_up > 0 {
            metrics::counter!("kappa_standby_catchups_total").increment(caught_up);
        }
        Ok(())
    }

    /// At a takeover of partition `p`: the copy of `p`, brought as far as the owner's last
    /// reported position, and its follower stopped; `None` without a usable copy. From now on
    /// `p` is not stood by for until [`Standbys::released`].
    pub(crate) async fn take(&self, p: u32) -> Option<Taken> {
        if let Ok(mut o) = self.owned.lock() {
            o.insert(p);
        }
        let f = self.followers.lock().ok()?.remove(&p)?;
        let synced = self.advance(&f, true).await;
        f.stop.cancel();
        let feed = f.feed.lock().ok().and_then(|mut x| x.take());
        if let Some(feed) = feed {
            feed.stopped().await;
        }
        match synced {
            Ok(reached) => {
                if !reached {
                    tracing::info!(
                        partition = p,
                        "standby copy did not reach the owner's last position; using it as far as it got"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "standby copy not brought up to date; not used");
                return None;
            }
        }
        if f.broken.load(Ordering::Relaxed) {
            return None;
        }
        let mut copy = f.copy.lock().await;
        // Changes delivered while the feed stopped.
        if self.fold_queued(&f, &mut copy).await.is_err() {
            return None;
        }
        // Handed over as they are: the engine takes the decoded entities without a round
        // through their stored form.
        let mut values: HashMap<String, Value> = std::mem::take(&mut copy.raw)
            .into_iter()
            .map(|(k, v)| (k, Value::Encoded(v)))
            .collect();
        let mut changed = Vec::new();
        for (k, mut e) in std::mem::take(&mut copy.entities) {
            // The standby's own bookkeeping: `changed` carries the key to the store, and the
            // engine must not take the entity for one its batch changed (a redundant write).
            if std::mem::take(&mut e.dirty) {
                changed.push(k.clone());
            }
            let held: Arc<dyn HeldState> = Arc::new(e);
            values.insert(k, Value::Held(held));
        }
        if copy.marked {
            // The position is the owner's, of the input stream the copy was built against.
            values.insert(
                super::SOURCE_KEY.to_string(),
                Value::Encoded(Bytes::copy_from_slice(&copy.source.to_le_bytes())),
            );
            changed.push(super::SOURCE_KEY.to_string());
        }
        no_copy_gauges(p);
        Some(Taken {
            copy: WarmCopy {
                position: copy.position,
                values,
                changed,
            },
            source: copy.source,
            log: copy.log,
        })
    }

    /// Partition `p`, opened here, closed: it may be stood by for again.
    pub(crate) fn released(&self, p: u32) {
        if let Ok(mut o) = self.owned.lock() {
            o.remove(&p);
        }
    }
}

/// Partition `p`'s standby gauges once no copy of it is kept here: position and lag 0, so a
/// dashboard does not show the last position of a copy that is gone.
fn no_copy_gauges(p: u32) {
    let label = p.to_string();
    metrics::gauge!("kappa_standby_position", "partition" => label.clone()).set(0.0);
    metrics::gauge!("kappa_standby_lag", "partition" => label).set(0.0);
}

impl<C: Compute> crate::service::StandBy for Standbys<C> {
    fn stand_by<'a>(
        &'a self,
        partitions: &'a BTreeSet<u32>,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.refresh(partitions))
    }
}
