//! `semi-stateless` observed state: a moka cache bounded in size and time. A miss asks the
//! owner by request-reply (concurrent misses for one key share one request); the owner's change
//! stream updates cached entries at once, so a change shows before the time-out. A gap in the
//! change stream (a sequence jump, a broken subscription or a reconnection to NATS) clears the
//! cache, since an update may have been missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;
use futures::future::BoxFuture;
use moka::future::Cache;
use moka::ops::compute::Op;

use super::stateless::Requester;
use super::{ObservedError, ObservedSource, ObservedState, Versioned};
use crate::RuntimeError;
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
    subscribed: Arc<AtomicBool>,
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
        let subscribed = Arc::new(AtomicBool::new(false));
        tokio::spawn(follow(
            cache.clone(),
            seen.clone(),
            nats.clone(),
            source.clone(),
            subscribed.clone(),
            shutdown,
        ));
        Ok(Self {
            cache,
            seen,
            requester: Requester::with_kind(nats.client.clone(), source, "semi-stateless"),
            subscribed,
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

async fn follow<V: Versioned + std::fmt::Debug>(
    cache: Cache<String, Arc<V>>,
    seen: Cache<String, u64>,
    nats: Nats,
    source: ObservedSource,
    subscribed: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        let result = async {
            let stream = nats
                .js
                .get_stream_no_info(&source.stream)
                .await
                .map_err(RuntimeError::js)?;
            let c = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: format!("{}.>", source.change_prefix),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(RuntimeError::js)?;
            let mut msgs = c.messages().await.map_err(RuntimeError::js)?;
            let mut reconnects = nats.reconnects();
            reconnects.borrow_and_update();
            // Anything cached before this subscription may have missed updates.
            cache.invalidate_all();
            subscribed.store(true, Ordering::Relaxed);
            let mut last_seq = 0u64;
            let mut watching = true;
            loop {
                let m = tokio::select! {
                    _ = shutdown.cancelled() => return Ok::<(), RuntimeError>(()),
                    changed = reconnects.changed(), if watching => {
                        watching = changed.is_ok();
                        if watching {
                            // Changes published while the connection was down may never
                            // arrive here: what is cached may be stale.
                            tracing::warn!("reconnected to NATS; clearing the cache");
                            metrics::counter!("kappa_observed_gaps_total", "cause" => "reconnect")
                                .increment(1);
                            cache.invalidate_all();
                        }
                        continue;
                    }
                    m = msgs.next() => m,
                };
                let Some(m) = m else {
                    return Err(RuntimeError::JetStream("change stream ended".into()));
                };
                let m = m.map_err(RuntimeError::js)?;
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                if last_seq != 0 && seq != last_seq + 1 {
                    tracing::warn!(
                        last_seq,
                        seq,
                        "gap in the change stream; clearing the cache"
                    );
                    metrics::counter!("kappa_observed_gaps_total", "cause" => "sequence")
                        .increment(1);
                    cache.invalidate_all();
                }
                last_seq = seq;
                let key = crate::partition::entity_of(m.subject.as_str()).to_string();
                let Ok(v) = serde_json::from_slice::<V>(&m.payload) else {
                    tracing::warn!(subject = %m.subject, "undecodable change");
                    continue;
                };
                let version = v.version();
                seen.insert(key.clone(), version).await;
                let v = Arc::new(v);
                // Update only what is cached; a later miss fetches the rest.
                cache
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
        }
        .await;
        subscribed.store(false, Ordering::Relaxed);
        cache.invalidate_all();
        match result {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!("kappa_observed_gaps_total", "cause" => "subscription")
                    .increment(1);
                tracing::warn!(error = %e, "change-stream subscription lost; cache cleared");
                if crate::partition::sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                    return;
                }
            }
        }
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
        self.subscribed.load(Ordering::Relaxed)
    }
    fn held(&self) -> u64 {
        self.cache.entry_count()
    }
    fn kind(&self) -> &'static str {
        "semi-stateless"
    }
}
