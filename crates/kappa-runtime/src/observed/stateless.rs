//! `stateless` observed state: every lookup is a request to the owner
//! (`<request_prefix>.<key>`), with a timeout and a bounded number of attempts. Nothing is
//! duplicated; every lookup pays a round trip.
//!
//! A batch's lookups go out as one request per [`MAX_BATCH_KEYS`] keys when the owner answers
//! batches ([`ObservedSource::batch_subject`]): one round trip per batch instead of one per
//! key, which is what made this option slow (it ran at 0.20 of the relay with a request per
//! reading). An owner without batch lookups (no responder on the subject) is asked key by key.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{
    Lookup, ObservedError, ObservedSource, ObservedState, Versioned, decode_batch_reply,
    decode_reply,
};

/// Keys per batched request (a sensor's reply is ~150 bytes: 256 of them stay far below the
/// default 1 MiB payload limit).
pub const MAX_BATCH_KEYS: usize = 256;

/// Request-reply lookups.
pub struct Requester<V> {
    client: async_nats::Client,
    source: ObservedSource,
    kind: &'static str,
    _v: PhantomData<fn() -> V>,
}

impl<V: Versioned> Requester<V> {
    /// Lookups against `source`'s owner.
    pub fn new(client: async_nats::Client, source: ObservedSource) -> Self {
        Self::with_kind(client, source, "stateless")
    }

    pub(crate) fn with_kind(
        client: async_nats::Client,
        source: ObservedSource,
        kind: &'static str,
    ) -> Self {
        Self {
            client,
            source,
            kind,
            _v: PhantomData,
        }
    }

    /// Asks the owner for `keys` in one request to `subject`, retrying on timeouts; `None` if
    /// nobody answers batches there (the caller asks key by key).
    async fn fetch_batch(
        &self,
        subject: &str,
        keys: &[String],
    ) -> Option<Result<Vec<Result<Option<V>, ObservedError>>, ObservedError>> {
        let body = match serde_json::to_vec(keys) {
            Ok(b) => Bytes::from(b),
            Err(e) => return Some(Err(ObservedError::Unavailable(e.to_string()))),
        };
        let mut last_err = String::new();
        let mut backoff = Duration::from_millis(50);
        for attempt in 0..self.source.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            let t = Instant::now();
            metrics::counter!("kappa_observed_requests_total", "kind" => self.kind).increment(1);
            let r = tokio::time::timeout(
                self.source.request_timeout,
                self.client.request(subject.to_string(), body.clone()),
            )
            .await;
            metrics::histogram!("kappa_observed_request_seconds", "kind" => self.kind)
                .record(t.elapsed().as_secs_f64());
            match r {
                Ok(Ok(msg)) => return Some(decode_batch_reply(&msg.payload, keys.len())),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    return None;
                }
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "timed out".into(),
            }
        }
        metrics::counter!("kappa_observed_failures_total", "kind" => self.kind).increment(1);
        Some(Err(ObservedError::Unavailable(format!(
            "{subject}: {last_err} after {} attempts",
            self.source.attempts.max(1)
        ))))
    }

    /// Asks the owner for every key of `keys`: batched when the owner answers batches, key by
    /// key otherwise. Answers are in the order of `keys`.
    pub async fn fetch_many(&self, keys: &[String]) -> Vec<Result<Option<V>, ObservedError>> {
        let Some(subject) = self.source.batch_subject.as_deref() else {
            return futures::future::join_all(keys.iter().map(|k| self.fetch(k))).await;
        };
        let chunks = futures::future::join_all(
            keys.chunks(MAX_BATCH_KEYS)
                .map(|c| async move { (c, self.fetch_batch(subject, c).await) }),
        )
        .await;
        let mut out = Vec::with_capacity(keys.len());
        for (chunk, answer) in chunks {
            match answer {
                Some(Ok(values)) => out.extend(values),
                Some(Err(e)) => out.extend(chunk.iter().map(|_| Err(e.clone()))),
                None => {
                    tracing::debug!(subject, "no batch lookups at the owner; asking key by key");
                    out.extend(
                        futures::future::join_all(chunk.iter().map(|k| self.fetch(k))).await,
                    );
                }
            }
        }
        out
    }

    /// Asks the owner, retrying on timeouts and missing responders.
    pub async fn fetch(&self, key: &str) -> Result<Option<V>, ObservedError> {
        let subject = format!("{}.{key}", self.source.request_prefix);
        let mut last_err = String::new();
        let mut backoff = Duration::from_millis(50);
        for attempt in 0..self.source.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            let t = Instant::now();
            metrics::counter!("kappa_observed_requests_total", "kind" => self.kind).increment(1);
            let r = tokio::time::timeout(
                self.source.request_timeout,
                self.client.request(subject.clone(), Bytes::new()),
            )
            .await;
            metrics::histogram!("kappa_observed_request_seconds", "kind" => self.kind)
                .record(t.elapsed().as_secs_f64());
            match r {
                Ok(Ok(msg)) => return decode_reply(&msg.payload),
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "timed out".into(),
            }
        }
        metrics::counter!("kappa_observed_failures_total", "kind" => self.kind).increment(1);
        Err(ObservedError::Unavailable(format!(
            "{subject}: {last_err} after {} attempts",
            self.source.attempts.max(1)
        )))
    }
}

impl<V: Versioned> ObservedState<V> for Requester<V> {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<V>>, ObservedError>> {
        Box::pin(async move { Ok(self.fetch(key).await?.map(Arc::new)) })
    }
    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Vec<Lookup<V>>> {
        Box::pin(async move {
            self.fetch_many(keys)
                .await
                .into_iter()
                .map(|r| r.map(|v| v.map(Arc::new)))
                .collect()
        })
    }
    fn ready(&self) -> bool {
        true
    }
    fn held(&self) -> u64 {
        0
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
}
