//! The view side: a [`View`] is a persisted, read-optimised projection of a change log (the
//! *observable state* of the seed), and [`ViewService`] runs it, next to
//! [`DomainService`](crate::service::DomainService) and sharing its [`Settings`].
//!
//! The author writes what is the view's own: how a change log message is decoded
//! ([`View::decode`]), and how a batch of decoded changes is folded into the store *together
//! with the partition's position and fencing epoch* ([`View::apply`]), plus the store's handful
//! of generation operations (open, swap, abandon, drop). The runtime owns the rest:
//! partitioned input and ownership (static or leases, through
//! [`run_owned`] and the [driver](crate::partition)), opening each
//! partition at the position the store holds, dead letters for undecodable changes, observed
//! reference data (looked up once per key and batch, with a time-out), the view-change feed on
//! core NATS, readiness, metrics, draining, and [rebuilding](Rebuild) from sequence 1 into a
//! fresh generation that is swapped in once it has caught up.
//!
//! ```no_run
//! # async fn run<V: kappa_runtime::view::View>(view: V, settings: kappa_runtime::config::Settings)
//! #     -> Result<(), kappa_runtime::RuntimeError> {
//! kappa_runtime::view::ViewService::new("ledger-views", view, settings)
//!     .input("LEDGER_BALANCES", "ledger.balances")
//!     .http("127.0.0.1:9201".parse().unwrap())
//!     .run(kappa_runtime::shutdown::on_signal())
//!     .await
//! # }
//! ```
//!
//! # Trade-offs
//!
//! - **The position lives in the view's store, not in a consumer.** [`View::apply`] receives
//!   the batch's last input sequence and must store it in the same atomic write as the data
//!   (one Lua script, one transaction). A view therefore always says which sequence it
//!   reflects, a crash never applies a batch twice, and a wiped store is rebuilt from the
//!   stream rather than silently restarted. The price: every store needs an atomic multi-key
//!   write, and the runtime cannot check that an author really made it atomic.
//! - **Fencing is the store's.** The runtime hands every call the ownership epoch (the lease
//!   revision; 0 with static ownership) and expects the store to refuse an older epoch
//!   ([`Opened::Fenced`], [`Applied::Fenced`]). A paused, stale instance then cannot
//!   overwrite a newer owner's work even if its lease check raced. A store that was written
//!   under leases and is then run with static ownership (epoch 0) is fenced: start it afresh.
//! - **Batches, not changes, are the unit.** A view sees a whole batch at once so it can fold
//!   it (one write per entity instead of one per change); replays are recognised by position
//!   per batch. A view that also skips single changes at or below the position (as the
//!   reference view does) is idempotent even when a batch straddles it.
//! - **Undecodable changes are dead-lettered unfenced** (`DeadLetters::append(.., None)`):
//!   decoding is a pure function of the input, so a retry gives the same dead letter, which
//!   `Nats-Msg-Id` deduplicates; they still advance the position.
//! - **Reference data is best effort.** A failed or slow lookup is
//!   [`Lookup::Unavailable`]; the view decides what to fall back on (e.g. the data the change
//!   carries). A rebuild does no lookups ([`Lookup::NotObserved`]): a view that needs
//!   reference data in a rebuilt generation feeds it itself (see [`Rebuild::generation`]).
//! - **Generations instead of in-place rebuilds.** A rebuild writes a fresh generation while
//!   queries keep reading the active one, and the store swaps only when the new generation has
//!   reached the active one's position in every partition. It costs twice the memory while it
//!   runs; in exchange queries never see a half-built view.
//! - **The change feed is best effort.** [`Announcement`]s are published on core NATS after
//!   the commit; caches that follow them must also expire, because a crash between commit
//!   and publish loses the announcement (never the view).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::{BoxFuture, join_all};

use crate::RuntimeError;
use crate::app::Service;
use crate::compute::{Context, Lookup, Rejection};
use crate::config::{Ownership, Settings};
use crate::dlq::DeadLetters;
use crate::http::Health;
use crate::nats::Nats;
use crate::observed::{ObservedSource, ObservedState, Versioned};
use crate::partition::{
    DriverConfig, Input, PartitionedStream, ProcessError, Processor, entity_of, original_subject,
    partition_of,
};
use crate::service::{Owned, register_partitions, run_owned};
use crate::shutdown::CancellationToken;

/// Which copy (generation) of a view a store call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The generation queries read, resolved by the store at the time of the call (so a write
    /// after a swap goes to the new generation).
    Active,
    /// A given generation: one a rebuild is filling.
    Generation(String),
}

/// What opening a partition of a view found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The partition is ours now.
    At {
        /// The last input sequence applied (0: none).
        position: u64,
        /// The identity of the input stream that position refers to, as stored with it by
        /// [`View::apply`] ([`Batch::source`]; 0: none stored).
        source: u64,
    },
    /// A newer epoch owns the partition.
    Fenced,
}

/// A message the runtime publishes on core NATS after a batch is committed (the view-change
/// feed that keeps caches current).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Subject, e.g. `thermo.views.sensor.<id>`.
    pub subject: String,
    /// Payload, e.g. the changed view as JSON.
    pub payload: Bytes,
}

/// The outcome of [`View::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The batch and the position are stored; the announcements are published.
    Committed(Vec<Announcement>),
    /// The store's position is at or beyond the batch's (a replay): nothing changed.
    Skipped,
    /// A newer epoch owns the partition: the runtime stops it.
    Fenced,
    /// The store's position is below [`Batch::previous`]: it lost writes it acknowledged
    /// (wiped, restarted empty, rolled back). Nothing was written; the runtime reopens the
    /// partition, which replays the change log from the position the store still holds.
    Lost {
        /// The position the store holds.
        stored: u64,
    },
}

/// The outcome of [`View::swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swap {
    /// The generation is active now; `previous` was.
    Swapped {
        /// The generation it replaced.
        previous: String,
    },
    /// The generation is behind the active one in some partition: read on and try again.
    Behind {
        /// The active generation.
        active: String,
    },
}

/// One decoded change of a batch.
#[derive(Debug)]
pub struct Item<'a, C, R> {
    /// The entity it is about (the subject's last token).
    pub key: &'a str,
    /// Its sequence in the input stream.
    pub seq: u64,
    /// The decoded change.
    pub change: C,
    /// The observed reference data of its [`View::reference_key`].
    pub reference: Lookup<'a, R>,
}

/// One batch of one partition, to fold into the view atomically with `position`.
#[derive(Debug)]
pub struct Batch<'a, C, R> {
    /// The partition.
    pub partition: u32,
    /// The writer's fencing epoch: refuse the batch if the store holds a newer one.
    pub epoch: u64,
    /// The last input sequence of the batch (undecodable inputs included): store it with the
    /// data, and skip the batch if the stored position is already at or beyond it.
    pub position: u64,
    /// The position this writer knows the store holds (the one it opened at or last stored).
    /// A store whose position is *below* it lost acknowledged writes: answer
    /// [`Applied::Lost`] without writing. (Above it is legitimate: a rebuilt generation that
    /// got further was swapped in.)
    pub previous: u64,
    /// The identity of the input stream the batch comes from (its creation time): store it
    /// with the position. If the store holds another one, the input stream was replaced
    /// (deleted and created again): the stored position and every per-entity sequence refer
    /// to a stream that is gone, so count them as 0 for this batch (keep the data) and store
    /// this identity instead.
    pub source: u64,
    /// The decoded changes, in stream order (possibly none, when every input was rejected).
    pub items: Vec<Item<'a, C, R>>,
}

/// A view: the author's decoding of the change log and the store that folds batches of
/// changes into read-optimised structures. See the module docs for what the runtime does
/// around it.
pub trait View: Send + Sync + 'static {
    /// A decoded change.
    type Change: Send + Sync;
    /// Observed reference data per entity ([`NoReference`](crate::compute::NoReference) if
    /// none is observed).
    type Reference: Versioned + std::fmt::Debug;
    /// The store's error; every error is treated as transient (the batch is retried).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decodes and validates one change-log message; a rejection is dead-lettered.
    fn decode(&self, ctx: &Context<'_>, payload: &[u8]) -> Result<Self::Change, Rejection>;

    /// The reference-data key of a change (default: its entity; `None`: no lookup).
    fn reference_key(&self, ctx: &Context<'_>, _change: &Self::Change) -> Option<String> {
        Some(ctx.key.to_string())
    }

    /// Takes `partition` of `target` over with `epoch` (stores it, refusing an older writer's
    /// later calls) and returns the position stored with the view.
    fn open(
        &self,
        target: &Target,
        partition: u32,
        epoch: u64,
    ) -> impl Future<Output = Result<Opened, Self::Error>> + Send;

    /// Folds `batch` into `target` and stores `batch.position` with it, in one atomic write,
    /// unless the stored epoch is newer ([`Applied::Fenced`]), the stored position is below
    /// `batch.previous` ([`Applied::Lost`]) or at or beyond `batch.position`
    /// ([`Applied::Skipped`]).
    fn apply(
        &self,
        target: &Target,
        batch: Batch<'_, Self::Change, Self::Reference>,
    ) -> impl Future<Output = Result<Applied, Self::Error>> + Send;

    /// Starts a rebuild: creates a fresh, empty generation and marks it as being built
    /// (refusing if another rebuild holds the mark, unless `force`). Returns its name.
    fn begin_rebuild(
        &self,
        force: bool,
    ) -> impl Future<Output = Result<String, Self::Error>> + Send;

    /// Makes `generation` the active one if it has applied at least the active generation's
    /// position in every partition whose position refers to input stream `source` (the one
    /// the rebuild read: a position stored under another identity refers to a stream that was
    /// replaced, and says nothing about this one).
    fn swap(
        &self,
        generation: &str,
        source: u64,
    ) -> impl Future<Output = Result<Swap, Self::Error>> + Send;

    /// Gives up a rebuild of `generation`: clears the mark if it is ours and deletes it.
    fn abandon(&self, generation: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes every trace of `generation` (the old one after a swap); returns how many
    /// records (keys, rows) went.
    fn drop_generation(
        &self,
        generation: &str,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Whether the store answers (the `store` readiness check, asked every 2 s).
    fn ping(&self) -> impl Future<Output = bool> + Send {
        async { true }
    }
}

/// Publishes announcements on core NATS, best effort (counted in `kappa_views_announced_total`).
pub async fn announce(client: &async_nats::Client, announcements: Vec<Announcement>) {
    for a in announcements {
        match client.publish(a.subject, a.payload).await {
            Ok(()) => metrics::counter!("kappa_views_announced_total").increment(1),
            Err(e) => tracing::debug!(error = %e, "view change not announced"),
        }
    }
}

fn store_error(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::View(e.to_string())
}

fn transient(e: impl std::fmt::Display) -> ProcessError {
    ProcessError::Transient(e.to_string())
}

/// What a running view service hands a task started beside its partitions
/// ([`ViewService::beside`]).
#[derive(Clone)]
pub struct Running {
    /// The service's NATS connection.
    pub nats: Nats,
    /// Its readiness checks (a task may register its own).
    pub health: Health,
    /// Cancelled when the service stops; the task should end then.
    pub shutdown: CancellationToken,
}

type Task = Box<dyn FnOnce(Running) -> BoxFuture<'static, ()> + Send>;

/// A view service being assembled: see the module docs.
pub struct ViewService<V: View> {
    name: String,
    view: V,
    settings: Settings,
    input: Option<(String, String)>,
    observe: Option<ObservedSource>,
    declare: Vec<stream::Config>,
    http: Option<SocketAddr>,
    routes: axum::Router,
    tasks: Vec<Task>,
}

impl<V: View> ViewService<V> {
    /// A view service called `name` (NATS client name, consumer and lease names, DLQ subject)
    /// running `view` with `settings` (`KAPPA_PARTITIONS`, `KAPPA_BATCH`, `KAPPA_LINGER_MS`,
    /// `KAPPA_OWNERSHIP`, `KAPPA_LEASE_TTL_SECS`, `KAPPA_OBSERVED`, ...; the working-state
    /// settings do not apply to a view).
    pub fn new(name: &str, view: V, settings: Settings) -> Self {
        Self {
            name: name.to_string(),
            view,
            settings,
            input: None,
            observe: None,
            declare: Vec::new(),
            http: None,
            routes: axum::Router::new(),
            tasks: Vec::new(),
        }
    }

    /// The change log the view projects: stream `stream`, published to `<prefix>.<key>`,
    /// partitioned by key (declared if missing, with `KAPPA_PARTITIONS`).
    #[must_use]
    pub fn input(mut self, stream: &str, prefix: &str) -> Self {
        self.input = Some((stream.to_string(), prefix.to_string()));
        self
    }

    /// Observes reference data from `source` with the option `KAPPA_OBSERVED` names.
    #[must_use]
    pub fn observe(mut self, source: ObservedSource) -> Self {
        self.observe = Some(source);
        self
    }

    /// Declares another stream at start (so start order does not matter), with
    /// `KAPPA_REPLICAS` replicas whatever `config` says.
    #[must_use]
    pub fn declare(mut self, config: stream::Config) -> Self {
        self.declare.push(config);
        self
    }

    /// Serves `/healthz` and `/metrics` on `addr`.
    #[must_use]
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.http = Some(addr);
        self
    }

    /// Adds the service's own HTTP routes next to `/healthz` and `/metrics`.
    #[must_use]
    pub fn routes(mut self, routes: axum::Router) -> Self {
        self.routes = self.routes.merge(routes);
        self
    }

    /// Runs a task of the view's own beside the partitions (e.g. a feed of reference data
    /// into the store), started once connected and awaited when the service drains.
    #[must_use]
    pub fn beside<F, Fut>(mut self, task: F) -> Self
    where
        F: FnOnce(Running) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks.push(Box::new(move |r| Box::pin(task(r))));
        self
    }

    /// Runs until `shutdown` is cancelled, then drains: the batch in hand is finished and
    /// committed, leases are released, the tasks beside end, pending publishes are flushed.
    /// Fails at start on bad settings or unreachable servers, and later if every partition
    /// was lost (leases could not be kept) without a shutdown request.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let Self {
            name,
            view,
            settings,
            input,
            observe,
            declare,
            http,
            routes,
            tasks,
        } = self;
        let s = &settings;
        s.validate_input()?;
        let (in_stream, in_prefix) =
            input.ok_or_else(|| RuntimeError::Config(format!("{name}: no input stream")))?;
        let svc = Service::start_with(&name, &s.nats, shutdown.clone()).await?;
        let js = svc.nats.js.clone();
        let mut input = PartitionedStream {
            stream: in_stream,
            prefix: in_prefix.clone(),
            partitions: s.partitions,
        };
        let options = s.nats.stream_options()?;
        input.declare_with(&js, options).await?;
        for c in &declare {
            let c = stream::Config {
                num_replicas: options.replicas,
                ..c.clone()
            };
            crate::nats::declare_stream(&js, c).await?;
        }
        let observed = match &observe {
            None => None,
            Some(source) => Some(
                crate::observed::build::<V::Reference>(
                    s.observed,
                    &svc.nats,
                    ObservedSource {
                        request_timeout: Duration::from_millis(s.observed_timeout_ms),
                        ..source.clone()
                    },
                    s.cache(),
                    shutdown.clone(),
                )
                .await?,
            ),
        };
        let board = crate::partition::PartitionBoard::default();
        let expected = match s.ownership {
            Ownership::Static => Some(s.owned_partitions(input.partitions)?.len()),
            Ownership::Leases => None,
        };
        register_partitions(&svc.health, &board, expected);
        svc.status.partitions(board.clone());
        svc.status
            .settings(s, input.partitions, false, observed.is_some());
        if let Some(o) = observed.clone() {
            svc.health.register(
                "observed",
                Arc::new(move || {
                    (
                        o.ready(),
                        serde_json::json!({"kind": o.kind(), "held": o.held()}),
                    )
                }),
            );
        }
        let view = Arc::new(view);
        let store_up = Arc::new(AtomicBool::new(view.ping().await));
        let pinger = {
            let (view, up, stop) = (view.clone(), store_up.clone(), shutdown.clone());
            tokio::spawn(async move {
                while !crate::partition::sleep_or_cancel(Duration::from_secs(2), &stop).await {
                    up.store(view.ping().await, Ordering::Relaxed);
                }
            })
        };
        svc.health.register(
            "store",
            Arc::new(move || (store_up.load(Ordering::Relaxed), serde_json::json!(null))),
        );
        let http = match http {
            Some(addr) => Some(svc.serve_http(addr, routes).await?),
            None => None,
        };
        let running = Running {
            nats: svc.nats.clone(),
            health: svc.health.clone(),
            shutdown: shutdown.clone(),
        };
        let tasks: Vec<_> = tasks
            .into_iter()
            .map(|t| tokio::spawn(t(running.clone())))
            .collect();
        tracing::info!(service = %name, observed = %s.observed, partitions = input.partitions,
            ownership = ?s.ownership, "starting view");
        let shared = Arc::new(Shared {
            view,
            js: js.clone(),
            input_stream: input.stream.clone(),
            dlq: DeadLetters::new(js.clone(), &name),
            observed,
            client: svc.nats.client.clone(),
            input_prefix: in_prefix,
            // The observed option retries its requests; this bounds a batch's wait for all.
            lookup_timeout: Duration::from_millis(s.observed_timeout_ms.saturating_mul(2)),
        });
        let driver = DriverConfig {
            input,
            consumer_prefix: name.clone(),
            batch: s.batch,
            linger: s.linger,
        };
        let owned = Owned {
            js,
            service: &name,
            settings: s,
            driver,
            board,
            shutdown: shutdown.clone(),
            standby: None,
        };
        let result = run_owned(owned, move |p| ViewProcessor {
            shared: shared.clone(),
            partition: p,
            epoch: 0,
            position: 0,
            source: 0,
        })
        .await;
        let requested = shutdown.is_cancelled();
        shutdown.cancel();
        for t in tasks {
            let _ = t.await;
        }
        let _ = pinger.await;
        if let Some(h) = http {
            let _ = h.await;
        }
        svc.drain().await;
        match result {
            Err(e) if !requested => Err(e),
            _ => Ok(()),
        }
    }
}

/// What the partitions of a view service share.
struct Shared<V: View> {
    view: Arc<V>,
    js: jetstream::Context,
    input_stream: String,
    dlq: DeadLetters,
    observed: Option<Arc<dyn ObservedState<V::Reference>>>,
    client: async_nats::Client,
    input_prefix: String,
    lookup_timeout: Duration,
}

type Found<R> = HashMap<String, Result<Option<Arc<R>>, String>>;

/// Runs a [`View`] on one partition of the live service.
struct ViewProcessor<V: View> {
    shared: Arc<Shared<V>>,
    partition: u32,
    epoch: u64,
    /// The position the store holds as far as this writer knows (opened at, or last stored).
    position: u64,
    /// The identity of the input stream as the partition was opened.
    source: u64,
}

impl<V: View> ViewProcessor<V> {
    /// Looks each wanted key up once, within the time-out (a failure is per key).
    async fn lookups(&self, keys: &[Option<String>]) -> Found<V::Reference> {
        let Some(observed) = &self.shared.observed else {
            return HashMap::new();
        };
        let mut wanted: Vec<&str> = Vec::new();
        for k in keys.iter().flatten() {
            if !wanted.contains(&k.as_str()) {
                wanted.push(k);
            }
        }
        let all = join_all(wanted.iter().map(|k| observed.get(k)));
        let found: Vec<Result<Option<Arc<V::Reference>>, String>> =
            match tokio::time::timeout(self.shared.lookup_timeout, all).await {
                Ok(results) => results
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect(),
                Err(_) => vec![Err("lookups timed out".to_string()); wanted.len()],
            };
        let failed = found.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            metrics::counter!("kappa_views_lookup_failures_total").increment(failed as u64);
            tracing::debug!(failed, "reference lookups failed");
        }
        wanted.into_iter().map(str::to_string).zip(found).collect()
    }
}

fn lookup_of<'a, R>(observed: bool, key: Option<&String>, found: &'a Found<R>) -> Lookup<'a, R> {
    match key {
        None if !observed => Lookup::NotObserved,
        None => Lookup::Unknown,
        Some(k) => match found.get(k) {
            Some(Ok(Some(r))) => Lookup::Found(&**r),
            Some(Ok(None)) | None => Lookup::Unknown,
            Some(Err(why)) => Lookup::Unavailable(why),
        },
    }
}

impl<V: View> Processor for ViewProcessor<V> {
    fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    async fn open(&mut self, partition: u32) -> Result<u64, ProcessError> {
        self.partition = partition;
        match self
            .shared
            .view
            .open(&Target::Active, partition, self.epoch)
            .await
            .map_err(transient)?
        {
            Opened::At { position, source } => {
                let sh = &self.shared;
                let (now, last) =
                    crate::partition::stream_identity(&sh.js, &sh.input_stream).await?;
                self.source = now;
                if (source != 0 && source != now) || position > last {
                    // The position refers to another stream of the same name (deleted and
                    // created again) or to messages it does not have. The same rule as for a
                    // domain service's input: the view keeps what it folded and follows the
                    // new stream from its first message (the next batch tells the store).
                    metrics::counter!("kappa_views_input_replaced_total").increment(1);
                    tracing::error!(partition, stream = %sh.input_stream, position,
                        stream_last = last, recorded = source, current = now,
                        "the view's input stream is not the one its position refers to; following it from its first message (the view keeps what it holds)");
                    self.position = 0;
                    return Ok(0);
                }
                self.position = position;
                Ok(position)
            }
            Opened::Fenced => Err(ProcessError::Fenced(format!(
                "partition {partition} has a newer writer than epoch {}",
                self.epoch
            ))),
        }
    }

    async fn process(&mut self, batch: &[Input]) -> Result<(), ProcessError> {
        let Some(position) = batch.last().map(|i| i.seq) else {
            return Ok(());
        };
        let sh = self.shared.clone();
        let subjects = crate::partition::original_subjects(&sh.input_prefix, batch);
        let partition = self.partition;
        let ctx = |i: usize| batch[i].context(partition, &subjects[i]);
        // 1. Decode; dead-letter what does not decode (a pure function of the input: unfenced).
        let mut decoded = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for (i, input) in batch.iter().enumerate() {
            match sh.view.decode(&ctx(i), &input.payload) {
                Ok(change) => decoded.push((i, change)),
                Err(r) => dead.push(
                    sh.dlq
                        .append(
                            input.entity(),
                            (&subjects[i], 0, input.seq),
                            input.payload.clone(),
                            &r,
                            None,
                        )
                        .await?,
                ),
            }
        }
        for ack in dead {
            ack.await
                .map_err(|e| transient(format!("dead letter ack: {e}")))?;
        }
        // 2. Reference data, once per key.
        let observed = sh.observed.is_some();
        let keys: Vec<Option<String>> = decoded
            .iter()
            .map(|(i, c)| {
                observed
                    .then(|| sh.view.reference_key(&ctx(*i), c))
                    .flatten()
            })
            .collect();
        let found = self.lookups(&keys).await;
        let items: Vec<_> = decoded
            .into_iter()
            .zip(&keys)
            .map(|((i, change), k)| Item {
                key: batch[i].entity(),
                seq: batch[i].seq,
                change,
                reference: lookup_of(observed, k.as_ref(), &found),
            })
            .collect();
        let n = items.len() as u64;
        // 3. Fold and store with the position, atomically (the view's job).
        let t0 = Instant::now();
        let outcome = sh
            .view
            .apply(
                &Target::Active,
                Batch {
                    partition,
                    epoch: self.epoch,
                    position,
                    previous: self.position,
                    source: self.source,
                    items,
                },
            )
            .await
            .map_err(transient)?;
        metrics::histogram!("kappa_views_apply_seconds").record(t0.elapsed().as_secs_f64());
        match outcome {
            Applied::Fenced => Err(ProcessError::Fenced(format!(
                "partition {partition} was taken over (epoch {} is stale)",
                self.epoch
            ))),
            Applied::Lost { stored } => {
                // The view lost what this writer stored: replay the change log from what it
                // still holds (from sequence 1 after a wipe), as the driver reopens it.
                metrics::counter!("kappa_views_store_lost_total").increment(1);
                tracing::error!(
                    partition,
                    stored,
                    written = self.position,
                    "the view store lost writes (wiped, restarted empty or rolled back); rebuilding the partition from the change log"
                );
                Err(ProcessError::StoreLost(format!(
                    "view partition {partition} holds position {stored}, below {} stored before",
                    self.position
                )))
            }
            Applied::Skipped => {
                metrics::counter!("kappa_views_replayed_batches_total").increment(1);
                self.position = self.position.max(position);
                Ok(())
            }
            Applied::Committed(announcements) => {
                self.position = position;
                metrics::counter!("kappa_views_applied_total").increment(n);
                metrics::counter!("kappa_views_batches_total").increment(1);
                // 4. Announce, after the commit.
                announce(&sh.client, announcements).await;
                Ok(())
            }
        }
    }
}

/// How a rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// How long the old generation is kept after the swap (queries that read the old pointer
    /// finish) before it is dropped.
    pub grace: Duration,
    /// Take the rebuild mark over even if another rebuild seems to hold it.
    pub force: bool,
    /// Give up if the new generation cannot catch up with the active one for this long.
    pub stall: Duration,
    /// Largest number of changes buffered before they are applied.
    pub batch: usize,
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    /// The new active generation.
    pub generation: String,
    /// The generation it replaced.
    pub previous: String,
    /// Changes applied.
    pub applied: u64,
    /// Messages skipped: undecodable, or not on a partitioned subject (the live service
    /// dead-lettered them already).
    pub skipped: u64,
    /// Records of the old generation dropped.
    pub dropped: u64,
}

/// A rebuild of a view from sequence 1 of its input into a fresh generation:
/// [`Rebuild::begin`] claims the generation, [`Rebuild::finish`] fills it, swaps it in once it
/// has caught up with the active one, waits the grace period and drops the old one. Queries
/// keep reading the active generation meanwhile; the live service goes on writing to whatever
/// is active, so after the swap it writes to the new one.
pub struct Rebuild<V: View> {
    view: V,
    js: jetstream::Context,
    input: PartitionedStream,
    options: RebuildOptions,
    generation: String,
}

type Pending<C> = BTreeMap<u32, Vec<(String, u64, C)>>;

impl<V: View> Rebuild<V> {
    /// Claims a fresh generation of `view` for a rebuild from `input` (whose stream must
    /// exist). Fails if another rebuild holds the mark (unless `options.force`).
    pub async fn begin(
        js: &jetstream::Context,
        view: V,
        input: PartitionedStream,
        options: RebuildOptions,
    ) -> Result<Self, RuntimeError> {
        let generation = view
            .begin_rebuild(options.force)
            .await
            .map_err(store_error)?;
        tracing::info!(generation, stream = %input.stream, "rebuilding the view");
        Ok(Self {
            view,
            js: js.clone(),
            input,
            options,
            generation,
        })
    }

    /// The generation being built (to feed it what the view needs besides the input, such
    /// as reference data, until [`Rebuild::finish`] returns).
    pub fn generation(&self) -> &str {
        &self.generation
    }

    /// Fills the generation from sequence 1, swaps it in, waits the grace period and drops
    /// the old generation. On failure the new generation is abandoned (dropped) and the
    /// active one stays.
    pub async fn finish(self) -> Result<RebuildReport, RuntimeError> {
        let filled = self.fill_and_swap().await;
        let generation = self.generation.clone();
        match filled {
            Ok((previous, applied, skipped)) => {
                tracing::info!(
                    generation,
                    previous,
                    applied,
                    "swapped in; dropping the old generation after the grace period"
                );
                tokio::time::sleep(self.options.grace).await;
                let dropped = if previous == generation {
                    0
                } else {
                    self.view
                        .drop_generation(&previous)
                        .await
                        .map_err(store_error)?
                };
                Ok(RebuildReport {
                    generation,
                    previous,
                    applied,
                    skipped,
                    dropped,
                })
            }
            Err(e) => {
                if let Err(a) = self.view.abandon(&generation).await {
                    tracing::warn!(generation, error = %a, "abandoning the generation failed");
                }
                Err(e)
            }
        }
    }

    async fn flush(
        &self,
        pending: &mut Pending<V::Change>,
        last_seen: &mut BTreeMap<u32, u64>,
        stored: &mut BTreeMap<u32, u64>,
        source: u64,
    ) -> Result<u64, RuntimeError> {
        let target = Target::Generation(self.generation.clone());
        let mut applied = 0;
        while let Some((p, position)) = last_seen.pop_first() {
            let (keys, rest): (Vec<String>, Vec<(u64, V::Change)>) = pending
                .remove(&p)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, seq, c)| (k, (seq, c)))
                .unzip();
            applied += keys.len() as u64;
            let items = keys
                .iter()
                .zip(rest)
                .map(|(key, (seq, change))| Item {
                    key,
                    seq,
                    change,
                    reference: Lookup::NotObserved,
                })
                .collect();
            let previous = stored.get(&p).copied().unwrap_or(0);
            let batch = Batch {
                partition: p,
                epoch: 0,
                position,
                previous,
                source,
                items,
            };
            match self.view.apply(&target, batch).await.map_err(store_error)? {
                Applied::Fenced => {
                    return Err(RuntimeError::Fenced(format!(
                        "generation {} partition {p} has another writer",
                        self.generation
                    )));
                }
                Applied::Lost { stored: at } => {
                    metrics::counter!("kappa_views_store_lost_total").increment(1);
                    return Err(RuntimeError::StoreLost(format!(
                        "generation {} partition {p} holds position {at}, below {previous} written by this rebuild",
                        self.generation
                    )));
                }
                Applied::Committed(_) | Applied::Skipped => {
                    stored.insert(p, previous.max(position));
                }
            }
        }
        Ok(applied)
    }

    async fn fill_and_swap(&self) -> Result<(String, u64, u64), RuntimeError> {
        let (source, _) = crate::partition::stream_identity(&self.js, &self.input.stream).await?;
        let stream = self
            .js
            .get_stream_no_info(&self.input.stream)
            .await
            .map_err(RuntimeError::js)?;
        let c = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.input.prefix),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(RuntimeError::js)?;
        let mut drained = c.cached_info().num_pending == 0;
        let mut msgs = c.messages().await.map_err(RuntimeError::js)?;
        let batch = self.options.batch.max(1);
        let mut pending: Pending<V::Change> = BTreeMap::new();
        let mut last_seen: BTreeMap<u32, u64> = BTreeMap::new();
        let mut written: BTreeMap<u32, u64> = BTreeMap::new();
        let mut buffered = 0usize;
        let (mut applied, mut skipped) = (0u64, 0u64);
        let mut stalled_since: Option<Instant> = None;
        loop {
            let next = if drained {
                tokio::time::timeout(Duration::from_millis(500), msgs.next())
                    .await
                    .ok()
            } else {
                Some(msgs.next().await)
            };
            match next {
                Some(Some(m)) => {
                    let m = m.map_err(RuntimeError::js)?;
                    let info = m.info().map_err(RuntimeError::js)?;
                    let (seq, left, published) =
                        (info.stream_sequence, info.pending, info.published);
                    drained = left == 0;
                    let stored = m.subject.as_str();
                    if let Some(p) = partition_of(&self.input.prefix, stored) {
                        last_seen.insert(p, seq);
                        let key = entity_of(stored);
                        let subject = original_subject(&self.input.prefix, stored);
                        let ctx = Context {
                            key,
                            seq,
                            partition: p,
                            subject: &subject,
                            published,
                            headers: m.headers.as_ref(),
                        };
                        match self.view.decode(&ctx, &m.payload) {
                            Ok(change) => {
                                pending
                                    .entry(p)
                                    .or_default()
                                    .push((key.to_string(), seq, change));
                                buffered += 1;
                            }
                            Err(_) => skipped += 1,
                        }
                    } else {
                        skipped += 1;
                    }
                    if buffered >= batch || drained {
                        applied += self
                            .flush(&mut pending, &mut last_seen, &mut written, source)
                            .await?;
                        buffered = 0;
                    }
                }
                Some(None) => {
                    return Err(RuntimeError::JetStream(format!(
                        "the consumer of {} ended",
                        self.input.stream
                    )));
                }
                None => {}
            }
            if drained {
                applied += self
                    .flush(&mut pending, &mut last_seen, &mut written, source)
                    .await?;
                buffered = 0;
                match self
                    .view
                    .swap(&self.generation, source)
                    .await
                    .map_err(store_error)?
                {
                    Swap::Swapped { previous } => return Ok((previous, applied, skipped)),
                    Swap::Behind { active } => {
                        let since = *stalled_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > self.options.stall {
                            return Err(RuntimeError::View(format!(
                                "generation {} did not catch up with generation {active} within {}s",
                                self.generation,
                                self.options.stall.as_secs()
                            )));
                        }
                    }
                }
            } else {
                stalled_since = None;
            }
        }
    }
}
