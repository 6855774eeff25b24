//! The one builder of a domain kappa service: a name, the shared [`Settings`], the streams, and
//! the author's [`Compute`]; [`DomainService::run`] does everything else until the injected
//! shutdown token is cancelled (SIGTERM in a binary, the test's hand in a test).
//!
//! ```no_run
//! # use kappa_runtime::compute::*;
//! # struct Ledger;
//! # impl Compute for Ledger {
//! #   type Input = i64; type State = i64; type Change = i64;
//! #   type Reference = NoReference; const CHANGE_SCHEMA: &'static str = "ledger/1";
//! #   fn decode(&self, _: &Context<'_>, p: &[u8]) -> Result<i64, Rejection> {
//! #     serde_json::from_slice(p).map_err(|_| Rejection::new("malformed")) }
//! #   fn decide(&self, _: &Context<'_>, s: &i64, i: i64, _: Lookup<'_, NoReference>) -> Decision<i64> {
//! #     Decision::emit(s + i) }
//! #   fn evolve(&self, s: &mut i64, c: &i64) { *s = *c; }
//! # }
//! # async fn run(settings: kappa_runtime::config::Settings) -> Result<(), kappa_runtime::RuntimeError> {
//! kappa_runtime::service::DomainService::new("ledger", Ledger, settings)
//!     .input("LEDGER_OPS", "ledger.ops")
//!     .changes("LEDGER_BALANCES", "ledger.balances")
//!     .http("127.0.0.1:9200".parse().unwrap())
//!     .run(kappa_runtime::shutdown::on_signal())
//!     .await
//! # }
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::future::join_all;

use crate::RuntimeError;
use crate::app::Service;
use crate::changelog::{ChangeLog, EntityLog, Layout};
use crate::compute::Compute;
use crate::config::{Ownership, Settings};
use crate::dlq::DeadLetters;
use crate::engine::{Engine, Parts, Standbys};
use crate::http::Health;
use crate::observed::ObservedSource;
use crate::partition::{
    DriverConfig, PartitionBoard, PartitionState, PartitionedStream, Processor,
};
use crate::shutdown::CancellationToken;

/// A domain kappa service being assembled: see the module docs.
pub struct DomainService<C: Compute> {
    name: String,
    compute: C,
    settings: Settings,
    input: Option<(String, String)>,
    changes: Option<(String, String)>,
    observe: Option<ObservedSource>,
    declare: Vec<stream::Config>,
    http: Option<SocketAddr>,
    routes: axum::Router,
}

impl<C: Compute> DomainService<C> {
    /// A service called `name` (NATS client name, consumer and lease names, DLQ subject,
    /// working-state namespace) running `compute` with `settings`.
    pub fn new(name: &str, compute: C, settings: Settings) -> Self {
        Self {
            name: name.to_string(),
            compute,
            settings,
            input: None,
            changes: None,
            observe: None,
            declare: Vec::new(),
            http: None,
            routes: axum::Router::new(),
        }
    }

    /// The input: stream `stream`, published to `<prefix>.<key>`, partitioned by key into
    /// `KAPPA_PARTITIONS` partitions (declared if missing).
    #[must_use]
    pub fn input(mut self, stream: &str, prefix: &str) -> Self {
        self.input = Some((stream.to_string(), prefix.to_string()));
        self
    }

    /// The change log: stream `stream`, one subject `<prefix>.<key>` per entity, partitioned
    /// like the input (declared if missing). Only this service writes it.
    #[must_use]
    pub fn changes(mut self, stream: &str, prefix: &str) -> Self {
        self.changes = Some((stream.to_string(), prefix.to_string()));
        self
    }

    /// Observes reference data from `source` with the option `KAPPA_OBSERVED` names.
    #[must_use]
    pub fn observe(mut self, source: ObservedSource) -> Self {
        self.observe = Some(source);
        self
    }

    /// Declares another stream at start (e.g. the observed owner's, so start order does not
    /// matter), with `KAPPA_REPLICAS` replicas whatever `config` says.
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

    /// Runs until `shutdown` is cancelled, then drains: the batch in hand is finished and
    /// committed, leases are released, pending publishes are flushed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let s = &self.settings;
        s.validate()?;
        let (in_stream, in_prefix) = self
            .input
            .clone()
            .ok_or_else(|| RuntimeError::Config(format!("{}: no input stream", self.name)))?;
        let (out_stream, out_prefix) = self
            .changes
            .clone()
            .ok_or_else(|| RuntimeError::Config(format!("{}: no change log", self.name)))?;
        let svc = Service::start_with(&self.name, &s.nats, shutdown.clone()).await?;
        let js = svc.nats.js.clone();
        let working = crate::working::build(s, &self.name, &js, &shutdown).await?;
        let mut input = PartitionedStream {
            stream: in_stream,
            prefix: in_prefix.clone(),
            partitions: s.partitions,
        };
        let options = s.nats.stream_options()?;
        input.declare_with(&js, options).await?;
        let mut out = PartitionedStream {
            stream: out_stream.clone(),
            prefix: out_prefix.clone(),
            partitions: input.partitions,
        };
        out.declare_with(&js, options).await?;
        for c in &self.declare {
            let c = stream::Config {
                num_replicas: options.replicas,
                ..c.clone()
            };
            crate::nats::declare_stream(&js, c).await?;
        }
        let observed = match &self.observe {
            None => None,
            Some(source) => Some(
                crate::observed::build::<C::Reference>(
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
        let board = PartitionBoard::default();
        let expected = match s.ownership {
            Ownership::Static => Some(s.owned_partitions(input.partitions)?.len()),
            Ownership::Leases => None,
        };
        register_partitions(&svc.health, &board, expected);
        svc.status.partitions(board.clone());
        svc.status
            .settings(s, input.partitions, true, observed.is_some());
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
        let kind = working.kind();
        let w = working.clone();
        svc.health.register(
            "working",
            Arc::new(move || match w.degraded() {
                None => (true, serde_json::json!({ "kind": kind })),
                Some(why) => (false, serde_json::json!({ "kind": kind, "degraded": why })),
            }),
        );
        let http = match self.http {
            Some(addr) => Some(svc.serve_http(addr, self.routes.clone()).await?),
            None => None,
        };
        tracing::info!(service = %self.name, observed = %s.observed, working = %s.working,
            partitions = input.partitions, ownership = ?s.ownership, batch = s.batch,
            linger = ?s.linger, "starting");
        let progress =
            crate::progress::Reporter::start(&js, &self.name, options.replicas, shutdown.clone())
                .await?;
        let compute = Arc::new(self.compute);
        let changes = ChangeLog::new(
            EntityLog::new(
                js.clone(),
                &out_stream,
                &out_prefix,
                Layout::Partitioned,
                &self.name,
            )
            .with_partitions(out.partitions),
            &self.name,
            C::CHANGE_SCHEMA,
        );
        let standbys = if s.standbys > 0 && s.ownership == Ownership::Leases {
            let reader =
                crate::progress::ProgressReader::open(&js, &self.name, Duration::ZERO).await?;
            Some(Arc::new(Standbys::new(
                compute.clone(),
                &self.name,
                changes.clone(),
                working.clone(),
                svc.nats.clone(),
                &input.stream,
                reader,
                shutdown.clone(),
            )))
        } else {
            None
        };
        let parts = Arc::new(Parts {
            compute,
            service: self.name.clone(),
            changes,
            dlq: DeadLetters::new(js.clone(), &self.name),
            observed,
            working,
            input_prefix: in_prefix,
            input_stream: input.stream.clone(),
            js: js.clone(),
            progress,
            standbys: standbys.clone(),
        });
        let driver = DriverConfig {
            input,
            consumer_prefix: self.name.clone(),
            batch: s.batch,
            linger: s.linger,
        };
        let owned = Owned {
            js,
            service: &self.name,
            settings: s,
            driver,
            board,
            shutdown: shutdown.clone(),
            standby: standbys.map(|s| s as Arc<dyn StandBy>),
        };
        let result = run_owned(owned, move |p| Engine::new(parts.clone(), p)).await;
        shutdown.cancel();
        svc.drain().await;
        if let Some(h) = http {
            let _ = h.await;
        }
        result
    }
}

/// Registers the `partitions` readiness check: ready when every partition held is running
/// (and, with static ownership, when all `expected` are).
pub fn register_partitions(health: &Health, board: &PartitionBoard, expected: Option<usize>) {
    let b = board.clone();
    health.register(
        "partitions",
        Arc::new(move || {
            let b = b.read().map(|b| b.clone()).unwrap_or_default();
            let running = b
                .values()
                .filter(|s| s.state == PartitionState::Running)
                .count();
            let ready = match expected {
                Some(n) => running == n,
                None => running == b.len(),
            };
            (ready, serde_json::to_value(&b).unwrap_or_default())
        }),
    );
}

/// How often a standby moves its copies on (reads each owner's committed position and the
/// partition's last change; the copies follow the change log continuously in between).
const STANDBY_EVERY: Duration = Duration::from_secs(1);

/// What keeps warm copies of the partitions an instance stands by for (`KAPPA_STANDBYS`); a
/// domain service's standbys follow its change log (see `engine::standby`).
pub trait StandBy: Send + Sync + 'static {
    /// Keeps copies of `partitions` (and of no other) and moves them on; called every
    /// second with the partitions this instance stands by for.
    fn stand_by<'a>(
        &'a self,
        partitions: &'a BTreeSet<u32>,
    ) -> futures::future::BoxFuture<'a, Result<(), RuntimeError>>;
}

/// The partitions of one service instance and how they are owned: what [`run_owned`] runs.
pub struct Owned<'a> {
    /// JetStream of the instance's connection.
    pub js: jetstream::Context,
    /// The service's name (its lease bucket and consumers are named after it).
    pub service: &'a str,
    /// Ownership (static or leases), lease TTL, standbys.
    pub settings: &'a Settings,
    /// The partitioned input and batching.
    pub driver: DriverConfig,
    /// Where each partition's status is shown (`/healthz`, `/status`).
    pub board: PartitionBoard,
    /// Stops every partition (each finishes its batch and closes).
    pub shutdown: CancellationToken,
    /// With leases and `KAPPA_STANDBYS` > 0: what keeps warm copies of the partitions this
    /// instance stands by for ([`StandBy::stand_by`]); `None` keeps none.
    pub standby: Option<Arc<dyn StandBy>>,
}

/// Runs one processor per partition this instance owns (made by `make`), with static ownership
/// or leases as its settings say, until its shutdown; with a standby, keeps the partitions it
/// stands by for warm.
pub async fn run_owned<P, F>(owned: Owned<'_>, make: F) -> Result<(), RuntimeError>
where
    P: Processor,
    F: Fn(u32) -> P + Send + Sync + 'static,
{
    let Owned {
        js,
        service,
        settings,
        driver,
        board,
        shutdown,
        standby,
    } = owned;
    let make = Arc::new(make);
    match settings.ownership {
        Ownership::Static => {
            let owned = settings.owned_partitions(driver.input.partitions)?;
            let tasks: Vec<_> = owned
                .into_iter()
                .map(|p| {
                    tokio::spawn(crate::partition::run_partition(
                        js.clone(),
                        driver.clone(),
                        p,
                        make(p),
                        shutdown.clone(),
                        board.clone(),
                    ))
                })
                .collect();
            for t in join_all(tasks).await {
                match t {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "partition ended"),
                    Err(e) => tracing::error!(error = %e, "partition task failed"),
                }
            }
            Ok(())
        }
        Ownership::Leases => {
            let lease = crate::lease::LeaseConfig {
                service: service.to_string(),
                partitions: driver.input.partitions,
                ttl: Duration::from_secs(settings.lease_ttl_secs.max(1)),
                replicas: settings.nats.replicas()?,
                standbys: settings.standbys,
                standby_for: Arc::new(RwLock::new(BTreeSet::new())),
            };
            if let Some(w) = standby.filter(|_| settings.standbys > 0) {
                let set = lease.standby_for.clone();
                crate::shutdown::every(STANDBY_EVERY, shutdown.clone(), move || {
                    let (w, set) = (w.clone(), set.clone());
                    async move {
                        let partitions = set.read().map(|s| s.clone()).unwrap_or_default();
                        metrics::gauge!("kappa_standby_partitions").set(partitions.len() as f64);
                        if let Err(e) = w.stand_by(&partitions).await {
                            tracing::warn!(error = %e, "refreshing standby copies failed");
                        }
                    }
                });
            }
            let start = |g: crate::lease::Grant| {
                let (js, driver, board, make) =
                    (js.clone(), driver.clone(), board.clone(), make.clone());
                tokio::spawn(async move {
                    let p = g.partition;
                    let r = crate::partition::run_partition_at(
                        js,
                        driver,
                        p,
                        g.epoch,
                        g.lease,
                        make(p),
                        g.stop,
                        board.clone(),
                    )
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(partition = p, error = %e, "partition ended");
                    }
                    if let Ok(mut b) = board.write() {
                        b.remove(&p);
                    }
                })
            };
            let owned = Arc::new(RwLock::new(BTreeSet::new()));
            crate::lease::keep(js.clone(), lease, shutdown, owned, start).await
        }
    }
}
