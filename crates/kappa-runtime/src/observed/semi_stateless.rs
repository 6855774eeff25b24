//! `semi-stateless` observed state: a moka cache bounded in size and time. A miss asks the
//! owner by request-reply (concurrent misses for one key share one request); the owner's change
//! stream (a [`Feed`] of new changes) updates cached entries at once, so a change shows before
//! the time-out. Every gap the feed reports (a sequence jump, a truncated or recreated stream, a
//! broken subscription or a reconnection to NATS) clears the cache, since an update may have
//! been missed or may arrive late; `kappa_observed_gaps_total{cause}` counts them.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use moka::future::Cache;
use moka::ops::compute::Op;

use super::stateless::Requester;
use super::{ObservedError, ObservedSource, ObservedState, Versioned};
use crate::RuntimeError;
use crate::feed::{Change, Feed, FeedConfig, FeedHandler, Gap, Start};
use crate::nats::Nats;
use crate::shutdown::CancellationToken;

/// Cache bounds.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Most entries held.
    pub max_entries: u64,
    /// Time an entry lives after it was written.
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            ttl: Duration::from_secs(300),
        }
    }
}

/// The cache and its subscription.
pub struct Cached<V> {
    cache: Cache<String, Arc<V>>,
    /// Versions seen on the change stream recently, to catch a fetch that raced an update.
    seen: Cache<String, u64>,
    requester: Requester<V>,
    feed: Feed,
}

#[derive(Debug, thiserror::Error)]
enum Miss {
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Owner(#[from] ObservedError),
}

impl<V: Versioned + std::fmt::Debug> Cached<V> {
    /// Creates the cache and starts its subscription to the change stream.
    pub async fn start(
        nats: Nats,
        source: ObservedSource,
        cfg: CacheConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let cache = Cache::builder()
            .max_capacity(cfg.max_entries)
            .time_to_live(cfg.ttl)
            .eviction_listener(|_k, _v, cause| {
                metrics::counter!("kappa_observed_evictions_total",
                    "kind" => "semi-stateless", "cause" => format!("{cause:?}"))
                .increment(1);
            })
            .build();
        let seen = Cache::builder()
            .max_capacity(cfg.max_entries)
            .time_to_live(Duration::from_secs(60))
            .build();
        let cfg = FeedConfig::new(
            source.stream.clone(),
            format!("{}.>", source.change_prefix),
            Start::New,
        );
        let handler = Follow {
            cache: cache.clone(),
            seen: seen.clone(),
        };
        let feed = Feed::start(&nats, cfg, handler, shutdown);
        Ok(Self {
            cache,
            seen,
            requester: Requester::with_kind(nats.client.clone(), source, "semi-stateless"),
            feed,
        })
    }

    async fn fetch_fresh(&self, key: &str) -> Result<Arc<V>, Miss> {
        for _ in 0..3 {
            let v = self.requester.fetch(key).await?.ok_or(Miss::NotFound)?;
            // If the change stream already showed a newer version, the reply raced it: ask again.
            match self.seen.get(key).await {
                Some(seen) if seen > v.version() => continue,
                _ => return Ok(Arc::new(v)),
            }
        }
        Ok(Arc::new(
            self.requester.fetch(key).await?.ok_or(Miss::NotFound)?,
        ))
    }
}

/// Keeps cached entries current from the change stream and clears the cache on every gap.
struct Follow<V> {
    cache: Cache<String, Arc<V>>,
    seen: Cache<String, u64>,
}

impl<V: Versioned + std::fmt::Debug> FeedHandler for Follow<V> {
    async fn apply(&mut self, change: Change) {
        let Ok(v) = serde_json::from_slice::<V>(&change.payload) else {
            tracing::warn!(subject = %change.subject, "undecodable change");
            return;
        };
        let key = change.key().to_string();
        let version = v.version();
        self.seen.insert(key.clone(), version).await;
        let v = Arc::new(v);
        // Update only what is cached; a later miss fetches the rest.
        self.cache
            .entry(key)
            .and_compute_with(|old| {
                let op = match old {
                    Some(e) if e.value().version() < version => Op::Put(v),
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    async fn gap(&mut self, gap: Gap) {
        // Whatever is cached may have missed an update (or, after a broken subscription or a
        // reconnection, receive it late): clear it.
        tracing::warn!(cause = %gap.cause, "gap in the change stream; clearing the cache");
        metrics::counter!("kappa_observed_gaps_total", "cause" => gap.cause.as_str()).increment(1);
        self.cache.invalidate_all();
    }

    async fn subscribed(&mut self, _after_seq: u64) {
        // Anything cached before this subscription may have missed updates.
        self.cache.invalidate_all();
    }
}

impl<V: Versioned + std::fmt::Debug> ObservedState<V> for Cached<V> {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<V>>, ObservedError>> {
        Box::pin(async move {
            if let Some(v) = self.cache.get(key).await {
                metrics::counter!("kappa_observed_hits_total", "kind" => "semi-stateless")
                    .increment(1);
                return Ok(Some(v));
            }
            metrics::counter!("kappa_observed_misses_total", "kind" => "semi-stateless")
                .increment(1);
            let r = self
                .cache
                .try_get_with_by_ref(key, self.fetch_fresh(key))
                .await;
            metrics::gauge!("kappa_observed_held", "kind" => "semi-stateless")
                .set(self.cache.entry_count() as f64);
            match r {
                Ok(v) => Ok(Some(v)),
                Err(e) => match &*e {
                    Miss::NotFound => Ok(None),
                    Miss::Owner(o) => Err(o.clone()),
                },
            }
        })
    }
    fn ready(&self) -> bool {
        self.feed.is_subscribed()
    }
    fn held(&self) -> u64 {
        self.cache.entry_count()
    }
    fn kind(&self) -> &'static str {
        "semi-stateless"
    }
}
