//! JetStream streams seen from outside the services: how many messages a stream holds, every
//! message of it read back in order (for checking outputs), and deleting streams between runs.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use futures::StreamExt;

/// A message read back from a stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// Stored subject.
    pub subject: String,
    /// Headers.
    pub headers: Option<async_nats::HeaderMap>,
    /// Payload.
    pub payload: bytes::Bytes,
}

impl Stored {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    }
}

/// Number of messages in a stream (0 if it does not exist or does not answer).
pub async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of a stream, in order (empty if the stream does not exist). Reads as many
/// messages as the stream held when asked, with an ordered consumer; each may take 10 s.
pub async fn read(js: &jetstream::Context, stream: &str) -> anyhow::Result<Vec<Stored>> {
    let Ok(mut s) = js.get_stream(stream).await else {
        return Ok(Vec::new());
    };
    let total = s.info().await.map(|i| i.state.messages).unwrap_or(0);
    if total == 0 {
        return Ok(Vec::new());
    }
    let c = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .with_context(|| format!("ordered consumer on {stream}"))?;
    let mut msgs = c
        .messages()
        .await
        .with_context(|| format!("messages of {stream}"))?;
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while (out.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .with_context(|| format!("reading {stream} timed out after {} messages", out.len()))?
            .with_context(|| format!("{stream} ended after {} of {total} messages", out.len()))?
            .map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        out.push(Stored {
            seq,
            subject: m.subject.to_string(),
            headers: m.headers.clone(),
            payload: m.payload.clone(),
        });
    }
    Ok(out)
}

/// Deletes the named streams; one that does not exist is no error (scratch servers only).
pub async fn delete(js: &jetstream::Context, streams: &[&str]) {
    for s in streams {
        let _ = js.delete_stream(s).await;
    }
}

/// Polls [`count`] every 200 ms until `stream` holds exactly `n` messages or `timeout` passes;
/// returns whether it did.
pub async fn wait_count(js: &jetstream::Context, stream: &str, n: u64, timeout: Duration) -> bool {
    crate::wait::wait_until(timeout, || async { count(js, stream).await == n }).await
}
