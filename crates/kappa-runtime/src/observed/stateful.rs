//! `stateful` observed state: a full in-memory replica of the owner's observable state, kept by
//! a [`Feed`] of the owner's change stream that bootstraps last-message-per-subject and then
//! tails it. Lookups never leave the process; `ready` stays false until the feed has caught up.
//! On a miss the replica first waits (briefly) until it has applied everything the stream holds,
//! so an entity registered just before its first use is not reported unknown. A gap that makes
//! the feed replay from scratch (the stream truncated or recreated) clears the replica first;
//! other gaps need nothing, since the feed resumes after the last change applied.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::{ObservedError, ObservedSource, ObservedState, Versioned};
use crate::RuntimeError;
use crate::feed::{Change, Feed, FeedConfig, FeedHandler, Gap, Start};
use crate::nats::Nats;
use crate::shutdown::CancellationToken;

type Map<V> = Arc<RwLock<HashMap<String, Arc<V>>>>;

/// The full replica.
pub struct Replica<V> {
    map: Map<V>,
    feed: Feed,
    nats: Nats,
    source: ObservedSource,
}

/// Applies the owner's changes to the map (newer version wins).
struct Apply<V> {
    map: Map<V>,
}

impl<V: Versioned + std::fmt::Debug> FeedHandler for Apply<V> {
    async fn apply(&mut self, change: Change) {
        match serde_json::from_slice::<V>(&change.payload) {
            Ok(v) => {
                if let Ok(mut map) = self.map.write() {
                    let key = change.key();
                    if map.get(key).is_none_or(|old| old.version() < v.version()) {
                        map.insert(key.to_string(), Arc::new(v));
                    }
                    metrics::gauge!("kappa_observed_held", "kind" => "stateful")
                        .set(map.len() as f64);
                }
            }
            Err(e) => tracing::warn!(subject = %change.subject, error = %e, "undecodable change"),
        }
    }

    async fn gap(&mut self, gap: Gap) {
        metrics::counter!("kappa_observed_gaps_total", "kind" => "stateful",
            "cause" => gap.cause.as_str())
        .increment(1);
        if gap.replay
            && let Ok(mut map) = self.map.write()
        {
            tracing::warn!(cause = %gap.cause, "observed replica cleared; replaying");
            map.clear();
        }
    }
}

impl<V: Versioned + std::fmt::Debug> Replica<V> {
    /// Starts bootstrapping; returns at once (check [`ObservedState::ready`]).
    pub async fn start(
        nats: Nats,
        source: ObservedSource,
        shutdown: CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let map: Map<V> = Arc::default();
        let cfg = FeedConfig::new(
            source.stream.clone(),
            format!("{}.>", source.change_prefix),
            Start::LastPerSubject,
        );
        let feed = Feed::start(&nats, cfg, Apply { map: map.clone() }, shutdown);
        let started = Instant::now();
        let (caught_up, m) = (feed.when_caught_up(), map.clone());
        tokio::spawn(async move {
            if caught_up.await.is_ok() {
                let n = m.read().map(|m| m.len()).unwrap_or(0);
                let secs = started.elapsed().as_secs_f64();
                metrics::gauge!("kappa_observed_bootstrap_seconds").set(secs);
                tracing::info!(entries = n, secs, "observed replica ready");
            }
        });
        Ok(Self {
            map,
            feed,
            nats,
            source,
        })
    }

    async fn stream_last_seq(&self) -> Option<u64> {
        let mut s = self.nats.js.get_stream(&self.source.stream).await.ok()?;
        Some(s.info().await.ok()?.state.last_sequence)
    }
}

impl<V: Versioned + std::fmt::Debug> ObservedState<V> for Replica<V> {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<V>>, ObservedError>> {
        Box::pin(async move {
            let lookup = || self.map.read().ok().and_then(|m| m.get(key).cloned());
            if let Some(v) = lookup() {
                metrics::counter!("kappa_observed_hits_total", "kind" => "stateful").increment(1);
                return Ok(Some(v));
            }
            // A miss: make sure we have applied everything the stream holds right now.
            if let Some(target) = self.stream_last_seq().await {
                self.feed.wait_applied(target, Duration::from_secs(2)).await;
            }
            metrics::counter!("kappa_observed_misses_total", "kind" => "stateful").increment(1);
            Ok(lookup())
        })
    }
    fn ready(&self) -> bool {
        self.feed.is_caught_up()
    }
    fn held(&self) -> u64 {
        self.map.read().map(|m| m.len() as u64).unwrap_or(0)
    }
    fn kind(&self) -> &'static str {
        "stateful"
    }
}
