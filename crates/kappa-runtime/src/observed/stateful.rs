//! `stateful` observed state: a full in-memory replica of the owner's observable state. It is
//! bootstrapped from the owner's change stream (last message per subject) and then tails it.
//! Lookups never leave the process; `ready` stays false until the bootstrap is complete. On a
//! miss the replica first waits (briefly) until it has applied everything the stream holds, so
//! an entity registered just before its first use is not reported unknown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use futures::StreamExt;
use futures::future::BoxFuture;

use super::{ObservedError, ObservedSource, ObservedState, Versioned};
use crate::RuntimeError;
use crate::nats::Nats;
use crate::shutdown::CancellationToken;

struct Inner<V> {
    map: RwLock<HashMap<String, Arc<V>>>,
    ready: AtomicBool,
    applied_seq: AtomicU64,
    notify: tokio::sync::Notify,
}

/// The full replica.
pub struct Replica<V> {
    inner: Arc<Inner<V>>,
    nats: Nats,
    source: ObservedSource,
}

impl<V: Versioned + std::fmt::Debug> Replica<V> {
    /// Starts bootstrapping; returns at once (check [`ObservedState::ready`]).
    pub async fn start(
        nats: Nats,
        source: ObservedSource,
        shutdown: CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let inner = Arc::new(Inner {
            map: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            applied_seq: AtomicU64::new(0),
            notify: tokio::sync::Notify::new(),
        });
        let me = Self {
            inner: inner.clone(),
            nats: nats.clone(),
            source: source.clone(),
        };
        tokio::spawn(tail(inner, nats, source, shutdown));
        Ok(me)
    }

    async fn stream_last_seq(&self) -> Option<u64> {
        let mut s = self.nats.js.get_stream(&self.source.stream).await.ok()?;
        Some(s.info().await.ok()?.state.last_sequence)
    }
}

async fn tail<V: Versioned + std::fmt::Debug>(
    inner: Arc<Inner<V>>,
    nats: Nats,
    source: ObservedSource,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let result = async {
            let stream = nats
                .js
                .get_stream_no_info(&source.stream)
                .await
                .map_err(RuntimeError::js)?;
            let deliver = match inner.applied_seq.load(Ordering::Relaxed) {
                0 => consumer::DeliverPolicy::LastPerSubject,
                n => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: n + 1,
                },
            };
            let c = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: format!("{}.>", source.change_prefix),
                    deliver_policy: deliver,
                    ..Default::default()
                })
                .await
                .map_err(RuntimeError::js)?;
            if c.cached_info().num_pending == 0 && !inner.ready.swap(true, Ordering::Relaxed) {
                tracing::info!(entries = 0, "observed replica ready (empty)");
            }
            let mut msgs = c.messages().await.map_err(RuntimeError::js)?;
            loop {
                let m = tokio::select! {
                    _ = shutdown.cancelled() => return Ok::<(), RuntimeError>(()),
                    m = msgs.next() => m,
                };
                let Some(m) = m else { return Ok(()) };
                let m = m.map_err(RuntimeError::js)?;
                let (seq, pending) = m
                    .info()
                    .map(|i| (i.stream_sequence, i.pending))
                    .unwrap_or((0, 1));
                let key = crate::partition::entity_of(m.subject.as_str()).to_string();
                match serde_json::from_slice::<V>(&m.payload) {
                    Ok(v) => {
                        if let Ok(mut map) = inner.map.write() {
                            let newer = map.get(&key).is_none_or(|old| old.version() < v.version());
                            if newer {
                                map.insert(key, Arc::new(v));
                            }
                            metrics::gauge!("kappa_observed_held", "kind" => "stateful")
                                .set(map.len() as f64);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(subject = %m.subject, error = %e, "undecodable change")
                    }
                }
                inner.applied_seq.store(seq, Ordering::Relaxed);
                if pending == 0 && !inner.ready.swap(true, Ordering::Relaxed) {
                    let n = inner.map.read().map(|m| m.len()).unwrap_or(0);
                    let secs = started.elapsed().as_secs_f64();
                    metrics::gauge!("kappa_observed_bootstrap_seconds").set(secs);
                    tracing::info!(entries = n, secs, "observed replica ready");
                }
                inner.notify.notify_waiters();
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "observed replica tail failed; resuming");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl<V: Versioned + std::fmt::Debug> ObservedState<V> for Replica<V> {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<V>>, ObservedError>> {
        Box::pin(async move {
            let lookup = || self.inner.map.read().ok().and_then(|m| m.get(key).cloned());
            if let Some(v) = lookup() {
                metrics::counter!("kappa_observed_hits_total", "kind" => "stateful").increment(1);
                return Ok(Some(v));
            }
            // A miss: make sure we have applied everything the stream holds right now.
            let deadline = Instant::now() + Duration::from_secs(2);
            if let Some(target) = self.stream_last_seq().await {
                while self.inner.applied_seq.load(Ordering::Relaxed) < target
                    && Instant::now() < deadline
                {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(50),
                        self.inner.notify.notified(),
                    )
                    .await;
                }
            }
            metrics::counter!("kappa_observed_misses_total", "kind" => "stateful").increment(1);
            Ok(lookup())
        })
    }
    fn ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }
    fn held(&self) -> u64 {
        self.inner.map.read().map(|m| m.len() as u64).unwrap_or(0)
    }
    fn kind(&self) -> &'static str {
        "stateful"
    }
}
