//! `stateless` observed state: every lookup is a request to the owner
//! (`<request_prefix>.<key>`), with a timeout and a bounded number of attempts. Nothing is
//! duplicated; every lookup pays a round trip.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{ObservedError, ObservedSource, ObservedState, Versioned, decode_reply};

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
