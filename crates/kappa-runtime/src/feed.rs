//! The change-feed follower: the one way a process reads a change stream (its own, to recover
//! and stay current, or another service's, to observe it) and keeps reading it.
//!
//! [`Feed::start`] spawns a task that
//! 1. *bootstraps* from the stream as [`Start`] says: the last message of every subject
//!    ([`Start::LastPerSubject`], a replica), only what comes next ([`Start::New`], a cache), or
//!    everything after a position the caller already holds ([`Start::AfterSeq`]);
//! 2. *reports when it has caught up* with what the stream held when it subscribed
//!    ([`Feed::caught_up`], [`Feed::is_caught_up`]) and how far it has applied
//!    ([`Feed::applied_seq`], [`Feed::wait_applied`]);
//! 3. *tails* the stream, handing every message to a [`FeedHandler`] in stream order, one at a
//!    time (the next message is not read before the handler's `apply` returns);
//! 4. *resumes after the last applied sequence* whenever it has to subscribe again, and tells
//!    the handler about every [`Gap`] so it can invalidate what it holds.
//!
//! # What a gap is
//!
//! Within one subscription the follower cannot skip a message the stream still holds: it reads
//! with an ordered consumer, whose consumer sequence must be contiguous (async-nats recreates
//! the consumer after the last delivered stream sequence when it is not), and the server
//! delivers every stored message that matches the filter, in order. Delivered *stream*
//! sequences still jump, legitimately, for two reasons: the filter (messages of other subjects
//! in between) and the last-per-subject bootstrap (older messages of a subject are skipped).
//! So a gap is not "the stream sequence jumped"; a gap is one of these ([`GapCause`]):
//!
//! - [`GapCause::Sequence`]: the filter matches every subject of the stream (the feed is
//!   *dense*, decided from the stream's configuration), the bootstrap is over, and a delivered
//!   sequence is not the previous one + 1: messages were deleted before this follower read them.
//!   A feed that is not dense never reports this cause.
//! - [`GapCause::Truncated`]: when (re)subscribing after position `p`, the stream's first
//!   sequence is beyond `p + 1`: messages after `p` were removed (limits, purge) before they were
//!   read. Conservative: with a filter, the removed messages may all have been of other subjects.
//! - [`GapCause::Reset`]: the stream is not the one the position belongs to (deleted and
//!   recreated: its creation time changed, or its last sequence is below the position). Checked
//!   at every subscription and every [`FeedConfig::check_every`] while tailing, since a
//!   recreated stream does not break an ordered consumer: it would silently wait for sequences
//!   the new stream reaches much later.
//! - [`GapCause::Subscription`]: the subscription broke (an error from the consumer, the
//!   stream or consumer gone, the message stream ended). Nothing is lost, since the follower
//!   resumes after the last applied sequence, but changes made meanwhile arrive late; a cache
//!   that answers reads must not trust itself for that time. Reported once per break, not once
//!   per failed attempt to subscribe again.
//! - [`GapCause::Reconnect`]: the NATS connection was lost and came back
//!   ([`Nats::reconnects`]). As for a broken subscription; the follower does not wait for the
//!   ordered consumer to notice missed heartbeats (seconds): it subscribes again at once.
//!
//! After `Truncated` or `Reset`, a [`Start::LastPerSubject`] feed bootstraps again from scratch
//! and says so with [`Gap::replay`]: the handler should drop everything it holds, since it will
//! receive the last message of every subject again. Other feeds go on from the first message
//! the stream holds ([`Start::New`] after a reset: from the new stream's end).
//!
//! # Trade-offs
//!
//! - One message at a time, in order: the handler needs no locking against itself and the
//!   applied sequence means what it says, but a slow handler slows the feed (there is no
//!   batching; a change stream of reference data is small).
//! - Positions are held in memory only: a restarted process bootstraps again (or passes the
//!   position it stored with its own state as [`Start::AfterSeq`]).
//! - Detection is conservative: a reconnect or a broken subscription is reported although the
//!   resume makes them lossless in the end, and a truncation is reported even if the removed
//!   messages did not match the filter. A handler that only needs eventual completeness (a
//!   replica) may ignore those; a cache should invalidate.
//! - [`Start::New`] starts after the stream's last sequence when the follower subscribes; a
//!   change published between a caller's own read and that moment is not delivered (a cache
//!   clears itself in [`FeedHandler::subscribed`]).
//! - The stream check every [`FeedConfig::check_every`] costs one stream-info request.
//! - `caught_up` happens once: after a resubscription the feed may lag again for a while; use
//!   [`Feed::wait_applied`] to wait for a given position.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use crate::RuntimeError;
use crate::nats::Nats;
use crate::shutdown::CancellationToken;

/// Where a feed starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The last message of every subject the filter matches, then every later message: a full
    /// replica of an entity stream.
    LastPerSubject,
    /// Only messages stored after the follower subscribed.
    New,
    /// Every message after this stream sequence (0: the whole stream).
    AfterSeq(u64),
}

/// What a feed reads.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// Stream name, e.g. `SENSORS`.
    pub stream: String,
    /// Subject filter, e.g. `registry.sensors.>`; empty: every subject of the stream.
    pub filter: String,
    /// Where to start.
    pub start: Start,
    /// How often the stream is checked for a [reset](GapCause::Reset) while tailing.
    pub check_every: Duration,
    /// Pause before subscribing again after a broken subscription.
    pub retry_after: Duration,
}

impl FeedConfig {
    /// A feed of `stream` filtered by `filter`, starting at `start`; checks every 5 s, retries
    /// after 1 s.
    pub fn new(stream: impl Into<String>, filter: impl Into<String>, start: Start) -> Self {
        Self {
            stream: stream.into(),
            filter: filter.into(),
            start,
            check_every: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// One message of the stream, handed to [`FeedHandler::apply`].
#[derive(Debug, Clone)]
pub struct Change {
    /// Its stream sequence.
    pub stream_seq: u64,
    /// Its subject.
    pub subject: String,
    /// Its headers.
    pub headers: Option<HeaderMap>,
    /// Its payload.
    pub payload: Bytes,
    /// True while the feed is still catching up with what the stream held when it subscribed.
    pub bootstrap: bool,
}

impl Change {
    /// The entity the change is about: the subject's last token.
    pub fn key(&self) -> &str {
        crate::partition::entity_of(&self.subject)
    }
}

/// Why a feed may have missed changes (see the [module docs](self) for the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    /// The NATS connection was lost and came back.
    Reconnect,
    /// The subscription broke.
    Subscription,
    /// A dense feed saw a stream sequence that is not the previous one + 1.
    Sequence,
    /// Messages after the position were removed from the stream before they were read.
    Truncated,
    /// The stream was recreated, or is behind the position.
    Reset,
}

impl GapCause {
    /// The cause as a metric label: `reconnect`, `subscription`, `sequence`, `truncated`,
    /// `reset`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reconnect => "reconnect",
            Self::Subscription => "subscription",
            Self::Sequence => "sequence",
            Self::Truncated => "truncated",
            Self::Reset => "reset",
        }
    }
}

impl std::fmt::Display for GapCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gap, handed to [`FeedHandler::gap`] before the feed goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// Why.
    pub cause: GapCause,
    /// The last stream sequence applied before the gap.
    pub after_seq: u64,
    /// True if the feed bootstraps again from scratch (a [`Start::LastPerSubject`] feed after a
    /// truncation or reset): drop everything held, the last message of every subject follows.
    pub replay: bool,
}

/// What a feed calls. Calls are sequential: the feed awaits each before it reads on.
pub trait FeedHandler: Send + 'static {
    /// Applies one message. The feed counts it applied when this returns; a handler that must
    /// not lose a change retries inside (and watches its own shutdown).
    fn apply(&mut self, change: Change) -> impl Future<Output = ()> + Send;

    /// Changes may have been missed (see [`Gap`]); invalidate what depends on them.
    fn gap(&mut self, gap: Gap) -> impl Future<Output = ()> + Send;

    /// The feed (re)subscribed and will deliver every message after `after_seq`. Default:
    /// nothing.
    fn subscribed(&mut self, after_seq: u64) -> impl Future<Output = ()> + Send {
        let _ = after_seq;
        std::future::ready(())
    }
}

/// A running feed. Dropping it does not stop the follower: the shutdown token does.
#[derive(Debug)]
pub struct Feed {
    applied: watch::Receiver<u64>,
    caught_up: watch::Receiver<bool>,
    subscribed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Feed {
    /// Starts following `cfg.stream` with `handler` until `shutdown`; returns at once.
    pub fn start<H: FeedHandler>(
        nats: &Nats,
        cfg: FeedConfig,
        handler: H,
        shutdown: CancellationToken,
    ) -> Feed {
        let (applied_tx, applied) = watch::channel(match cfg.start {
            Start::AfterSeq(n) => n,
            _ => 0,
        });
        let (caught_up_tx, caught_up) = watch::channel(false);
        let subscribed = Arc::new(AtomicBool::new(false));
        let follower = Follower {
            js: nats.js.clone(),
            reconnects: nats.reconnects(),
            cfg,
            handler,
            shutdown,
            applied: applied_tx,
            caught_up: caught_up_tx,
            subscribed: subscribed.clone(),
            created: None,
            positioned: false,
        };
        let task = tokio::spawn(follower.run());
        Feed {
            applied,
            caught_up,
            subscribed,
            task,
        }
    }

    /// The stream sequence of the last message applied: the position the feed resumes after
    /// (for [`Start::New`], initially the stream's last sequence when it subscribed).
    pub fn applied_seq(&self) -> u64 {
        *self.applied.borrow()
    }

    /// A receiver of [`Feed::applied_seq`].
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Waits (up to `timeout`) until the feed has applied stream sequence `seq` or later;
    /// returns whether it has.
    pub async fn wait_applied(&self, seq: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.clone();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s >= seq)).await,
            Ok(Ok(_))
        )
    }

    /// True once the feed has applied everything the stream held (for its filter) when it
    /// first subscribed. Stays true.
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Waits until [`Feed::is_caught_up`]; an error if the feed stopped first (shutdown).
    pub async fn caught_up(&self) -> Result<(), RuntimeError> {
        let mut rx = self.caught_up.clone();
        rx.wait_for(|c| *c)
            .await
            .map(|_| ())
            .map_err(|_| RuntimeError::Nats("the feed stopped before it caught up".into()))
    }

    /// A future that resolves once the feed has caught up, for a caller that cannot hold the
    /// feed (it resolves with an error if the feed stops first).
    pub fn when_caught_up(
        &self,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send + 'static {
        let mut rx = self.caught_up.clone();
        async move {
            rx.wait_for(|c| *c)
                .await
                .map(|_| ())
                .map_err(|_| RuntimeError::Nats("the feed stopped before it caught up".into()))
        }
    }

    /// True while the feed holds a working subscription.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// Waits until the follower has stopped (after shutdown).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// True if every subject matched by `subject` is matched by `filter` (NATS wildcards).
fn covers(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// How one subscription ended.
enum Ended {
    Shutdown,
    /// Subscribe again at once (a gap was already reported).
    Again,
    /// The subscription broke: report it (once), pause, subscribe again.
    Broken(String),
}

struct Follower<H> {
    js: jetstream::Context,
    reconnects: watch::Receiver<u64>,
    cfg: FeedConfig,
    handler: H,
    shutdown: CancellationToken,
    applied: watch::Sender<u64>,
    caught_up: watch::Sender<bool>,
    subscribed: Arc<AtomicBool>,
    /// Creation time of the stream the position belongs to.
    created: Option<time::OffsetDateTime>,
    /// False until the start policy was applied once (and again after a replay or a reset of
    /// a [`Start::New`] feed); then the feed resumes after its position.
    positioned: bool,
}

impl<H: FeedHandler> Follower<H> {
    fn pos(&self) -> u64 {
        *self.applied.borrow()
    }

    async fn report(&mut self, cause: GapCause, replay: bool) {
        let after_seq = self.pos();
        tracing::warn!(stream = %self.cfg.stream, %cause, after_seq, replay, "gap in the change feed");
        metrics::counter!("kappa_feed_gaps_total",
            "stream" => self.cfg.stream.clone(), "cause" => cause.as_str())
        .increment(1);
        self.handler
            .gap(Gap {
                cause,
                after_seq,
                replay,
            })
            .await;
    }

    /// Reports a truncation or reset and moves the position as the module docs say.
    async fn lost(&mut self, cause: GapCause, info: &jetstream::stream::Info) {
        let replay = self.cfg.start == Start::LastPerSubject;
        self.report(cause, replay).await;
        let pos = if replay || cause == GapCause::Reset {
            0
        } else {
            info.state.first_sequence.saturating_sub(1)
        };
        self.applied.send_replace(pos);
        if replay || (cause == GapCause::Reset && self.cfg.start == Start::New) {
            self.positioned = false;
        }
        self.created = Some(info.created);
    }

    async fn run(mut self) {
        let mut broken = false;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let ended = self.subscribe_and_follow().await;
            self.subscribed.store(false, Ordering::Relaxed);
            match ended {
                Ended::Shutdown => return,
                Ended::Again => broken = false,
                Ended::Broken(why) => {
                    if !broken {
                        broken = true;
                        tracing::warn!(stream = %self.cfg.stream, error = %why, "change feed broken; resuming");
                        self.report(GapCause::Subscription, false).await;
                    } else {
                        tracing::debug!(stream = %self.cfg.stream, error = %why, "change feed still broken");
                    }
                    if crate::partition::sleep_or_cancel(self.cfg.retry_after, &self.shutdown).await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// One subscription: checks the stream against the position, subscribes after it and
    /// follows until something ends it.
    async fn subscribe_and_follow(&mut self) -> Ended {
        let mut stream = match self.js.get_stream(&self.cfg.stream).await {
            Ok(s) => s,
            Err(e) => return Ended::Broken(format!("stream {}: {e}", self.cfg.stream)),
        };
        let info = stream.cached_info().clone();
        let pos = self.pos();
        if pos > 0 || self.created.is_some() {
            if self.created.is_some_and(|c| c != info.created) || info.state.last_sequence < pos {
                self.lost(GapCause::Reset, &info).await;
            } else if info.state.first_sequence > pos + 1 && pos > 0 {
                self.lost(GapCause::Truncated, &info).await;
            }
        }
        self.created = Some(info.created);
        let dense = self.cfg.filter.is_empty()
            || info
                .config
                .subjects
                .iter()
                .all(|s| covers(&self.cfg.filter, s));
        let pos = self.pos();
        let after = |n: u64| consumer::DeliverPolicy::ByStartSequence {
            start_sequence: n + 1,
        };
        let (deliver_policy, bootstrapping) = match (self.positioned, self.cfg.start) {
            (false, Start::LastPerSubject) => (consumer::DeliverPolicy::LastPerSubject, true),
            (false, Start::New) => {
                let last = info.state.last_sequence;
                self.applied.send_replace(last);
                (after(last), false)
            }
            _ => (after(pos), false),
        };
        self.positioned = true;
        let c = match stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.cfg.filter.clone(),
                deliver_policy,
                ..Default::default()
            })
            .await
        {
            Ok(c) => c,
            Err(e) => return Ended::Broken(format!("consumer on {}: {e}", self.cfg.stream)),
        };
        let mut catching_up = c.cached_info().num_pending > 0;
        if !catching_up {
            self.caught_up
                .send_if_modified(|c| !std::mem::replace(c, true));
        }
        let mut msgs = match c.messages().await {
            Ok(m) => m,
            Err(e) => return Ended::Broken(format!("messages of {}: {e}", self.cfg.stream)),
        };
        self.reconnects.borrow_and_update();
        let mut watching = true;
        self.subscribed.store(true, Ordering::Relaxed);
        let after = self.pos();
        self.handler.subscribed(after).await;
        // The last-per-subject bootstrap skips sequences; contiguity is checked after it.
        let mut in_bootstrap = bootstrapping && catching_up;
        let mut next_check = Instant::now() + self.cfg.check_every;
        loop {
            let check = tokio::time::sleep_until(next_check.into());
            let m = tokio::select! {
                _ = self.shutdown.cancelled() => return Ended::Shutdown,
                changed = self.reconnects.changed(), if watching => {
                    watching = changed.is_ok();
                    if watching {
                        self.report(GapCause::Reconnect, false).await;
                        return Ended::Again;
                    }
                    continue;
                }
                _ = check => {
                    next_check = Instant::now() + self.cfg.check_every;
                    match stream.info().await {
                        Ok(i) if Some(i.created) != self.created
                            || i.state.last_sequence < self.pos() => {
                            let i = i.clone();
                            self.lost(GapCause::Reset, &i).await;
                            return Ended::Again;
                        }
                        Ok(_) => {}
                        Err(e) => return Ended::Broken(format!("stream {}: {e}", self.cfg.stream)),
                    }
                    continue;
                }
                m = msgs.next() => m,
            };
            let m = match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Ended::Broken(format!("{}: {e}", self.cfg.stream)),
                None => return Ended::Broken(format!("{}: message stream ended", self.cfg.stream)),
            };
            let (seq, pending) = match m.info() {
                Ok(i) => (i.stream_sequence, i.pending),
                Err(e) => {
                    return Ended::Broken(format!("{}: no message info: {e}", self.cfg.stream));
                }
            };
            let pos = self.pos();
            // At or before the position: replayed by the client's own consumer recreation
            // (which restarts from the stream's start before the first message): applied.
            if seq > pos {
                if dense && !in_bootstrap && pos != 0 && seq != pos + 1 {
                    self.report(GapCause::Sequence, false).await;
                }
                let change = Change {
                    stream_seq: seq,
                    subject: m.subject.to_string(),
                    headers: m.headers.clone(),
                    payload: m.payload.clone(),
                    bootstrap: catching_up,
                };
                self.handler.apply(change).await;
                self.applied.send_replace(seq);
            }
            if pending == 0 {
                in_bootstrap = false;
                if catching_up {
                    catching_up = false;
                    self.caught_up
                        .send_if_modified(|c| !std::mem::replace(c, true));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn filter_covers_subjects() {
        assert!(covers("registry.sensors.>", "registry.sensors.*"));
        assert!(covers("registry.sensors.>", "registry.sensors.a.b"));
        assert!(covers("registry.sensors.*", "registry.sensors.*"));
        assert!(covers("registry.sensors.*", "registry.sensors.x"));
        assert!(covers(">", "a.>"));
        assert!(!covers("registry.sensors.*", "registry.sensors.>"));
        assert!(!covers("registry.sensors.x", "registry.sensors.*"));
        assert!(!covers("registry.sensors.>", "registry.sensors"));
        assert!(!covers("a.b", "a.b.c"));
    }
}
