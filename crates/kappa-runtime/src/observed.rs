//! Observed state: another service's observable state that this service reads (reference
//! data such as the sensor registry). The seed's three options, one module each, behind
//! [`ObservedState`], chosen by `KAPPA_OBSERVED`:
//! - [`stateful`]: a full in-memory replica, bootstrapped from the owner's change stream (last
//!   message per subject) and tailed; not ready until the bootstrap is complete;
//! - [`stateless`]: request-reply to the owner on every lookup;
//! - [`semi_stateless`]: a bounded, expiring moka cache, filled by request-reply on a miss and
//!   kept current by the change stream.

pub mod semi_stateless;
pub mod stateful;
pub mod stateless;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;

/// Where the observed state comes from.
#[derive(Debug, Clone)]
pub struct ObservedSource {
    /// The owner's change stream, e.g. `SENSORS`.
    pub stream: String,
    /// Change subjects are `<change_prefix>.<key>`.
    pub change_prefix: String,
    /// Lookups are requests to `<request_prefix>.<key>`.
    pub request_prefix: String,
    /// Batched lookups, if the owner answers them: a request to this subject with a JSON array
    /// of keys, answered with a JSON array of one reply per key, in order (each the value or
    /// `{"ok": false, "error": "not found"}`). `stateless` asks for a batch's keys at once.
    pub batch_subject: Option<String>,
    /// Time allowed for one request.
    pub request_timeout: Duration,
    /// Attempts per lookup before it fails.
    pub attempts: u32,
}

/// A value that carries the owner's version of it (newer wins).
pub trait Versioned: DeserializeOwned + Send + Sync + 'static {
    /// The owner's version.
    fn version(&self) -> u64;
}

/// One lookup's answer: the value, `None` if the owner does not know the key, or why it failed.
pub type Lookup<V> = Result<Option<Arc<V>>, ObservedError>;

/// Why a lookup failed (not-found is `Ok(None)`, not an error).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ObservedError {
    /// The owner could not be asked (timeouts, no responders) after the retries.
    #[error("owner unavailable: {0}")]
    Unavailable(String),
}

/// Another service's state, as this service sees it.
pub trait ObservedState<V: Versioned>: Send + Sync + 'static {
    /// The current value of `key`, `None` if the owner does not know it.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<V>>, ObservedError>>;
    /// The values of `keys`, in order (what the engine asks once per batch). The default asks
    /// [`ObservedState::get`] for each key concurrently; an option that can do better (one
    /// request for many keys) overrides it.
    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Vec<Lookup<V>>> {
        Box::pin(futures::future::join_all(keys.iter().map(|k| self.get(k))))
    }
    /// True once lookups can be answered (the stateful replica is bootstrapped).
    fn ready(&self) -> bool;
    /// Entries held in memory (replica or cache size).
    fn held(&self) -> u64;
    /// Which option this is.
    fn kind(&self) -> &'static str;
}

/// Decodes an owner's reply: the value, or `{"ok": false, "error": "not found"}` as `None`.
pub fn decode_reply<V: Versioned>(payload: &[u8]) -> Result<Option<V>, ObservedError> {
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| ObservedError::Unavailable(format!("undecodable reply: {e}")))?;
    decode_value(value)
}

/// Decodes an owner's batched reply to `n` keys: one [`decode_reply`] per element, in order.
pub fn decode_batch_reply<V: Versioned>(
    payload: &[u8],
    n: usize,
) -> Result<Vec<Result<Option<V>, ObservedError>>, ObservedError> {
    let values: Vec<serde_json::Value> = serde_json::from_slice(payload)
        .map_err(|e| ObservedError::Unavailable(format!("undecodable batch reply: {e}")))?;
    if values.len() != n {
        return Err(ObservedError::Unavailable(format!(
            "batch reply has {} answers for {n} keys",
            values.len()
        )));
    }
    Ok(values.into_iter().map(decode_value).collect())
}

fn decode_value<V: Versioned>(value: serde_json::Value) -> Result<Option<V>, ObservedError> {
    if value.get("ok").and_then(serde_json::Value::as_bool) == Some(false) {
        let err = value
            .get("error")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if err == "not found" {
            return Ok(None);
        }
        return Err(ObservedError::Unavailable(format!("owner answered: {err}")));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| ObservedError::Unavailable(format!("undecodable reply: {e}")))
}

/// Builds the option chosen by `mode`.
pub async fn build<V: Versioned + std::fmt::Debug>(
    mode: crate::config::ObservedMode,
    nats: &crate::nats::Nats,
    source: ObservedSource,
    cache: semi_stateless::CacheConfig,
    shutdown: crate::shutdown::CancellationToken,
) -> Result<Arc<dyn ObservedState<V>>, crate::RuntimeError> {
    use crate::config::ObservedMode;
    Ok(match mode {
        ObservedMode::Stateful => {
            Arc::new(stateful::Replica::<V>::start(nats.clone(), source, shutdown).await?)
        }
        ObservedMode::Stateless => Arc::new(stateless::Requester::new(nats.client.clone(), source)),
        ObservedMode::SemiStateless => Arc::new(
            semi_stateless::Cached::<V>::start(nats.clone(), source, cache, shutdown).await?,
        ),
    })
}
