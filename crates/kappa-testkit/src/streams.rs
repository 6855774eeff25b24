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

/// Every message of a stream, in order (empty if the stream does not exist).
///
/// Reads with an ordered consumer up to the stream's last sequence as its leader reported it
/// when asked (each message may take 10 s), keeping one copy per sequence; a sequence the
/// consumer did not deliver (an ordered consumer resetting across a leader change) is fetched
/// from the leader with a message get, and one the leader does not have either (deleted) is
/// left out. The result is therefore what the leader stored when asked: a stream still being
/// written is read up to that point only.
pub async fn read(js: &jetstream::Context, stream: &str) -> anyhow::Result<Vec<Stored>> {
    let Ok(mut s) = js.get_stream(stream).await else {
        return Ok(Vec::new());
    };
    let state = s
        .info()
        .await
        .with_context(|| format!("info of {stream}"))?
        .state
        .clone();
    let (total, first, last) = (state.messages, state.first_sequence, state.last_sequence);
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
    let mut by_seq: std::collections::BTreeMap<u64, Stored> = std::collections::BTreeMap::new();
    let mut highest = 0u64;
    while highest < last && (by_seq.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .with_context(|| format!("reading {stream} timed out after {} messages", by_seq.len()))?
            .with_context(|| format!("{stream} ended after {} of {total} messages", by_seq.len()))?
            .map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        highest = highest.max(seq);
        if seq <= last {
            by_seq.entry(seq).or_insert_with(|| Stored {
                seq,
                subject: m.subject.to_string(),
                headers: m.headers.clone(),
                payload: m.payload.clone(),
            });
        }
    }
    drop(msgs);
    if (by_seq.len() as u64) < total {
        for seq in first..=last {
            if by_seq.contains_key(&seq) {
                continue;
            }
            match s.get_raw_message(seq).await {
                Ok(m) => {
                    by_seq.insert(
                        seq,
                        Stored {
                            seq,
                            subject: m.subject.to_string(),
                            headers: Some(m.headers),
                            payload: m.payload,
                        },
                    );
                }
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(anyhow::anyhow!("getting {stream} #{seq}: {e}")),
            }
        }
    }
    Ok(by_seq.into_values().collect())
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
