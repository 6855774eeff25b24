//! Snapshots of working state in JetStream, for recovery without a database: changed keys are
//! published to `kappa.state.<ns>.<p>.k.<key>` (stream `KAPPA_STATE`, one message kept per
//! subject, so the stream is its own compaction), then a marker `kappa.state.<ns>.<p>.position`
//! records the input position the snapshot covers. Recovery reads the last message of every
//! subject of the partition; the caller replays inputs after the marker's position, and values
//! newer than the marker are recognised by their own last applied sequence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;

use super::Write;
use crate::RuntimeError;

/// Name of the snapshot stream.
pub const STREAM: &str = "KAPPA_STATE";

#[derive(Default)]
struct Pending {
    position: u64,
    writes: HashMap<String, Bytes>,
}

/// Collects committed changes and flushes them as snapshots.
pub struct Snapshotter {
    js: jetstream::Context,
    namespace: String,
    pending: Mutex<HashMap<u32, Pending>>,
    flush_lock: tokio::sync::Mutex<()>,
}

fn key_token(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_string()
    } else {
        // Not a plain subject token: hex-encode it behind a marker character.
        let mut s = String::from("~");
        for b in key.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

fn token_key(token: &str) -> String {
    match token.strip_prefix('~') {
        Some(hex) => {
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        None => token.to_string(),
    }
}

impl Snapshotter {
    /// Declares the snapshot stream and returns a snapshotter for service `namespace`.
    pub async fn new(js: jetstream::Context, namespace: &str) -> Result<Self, RuntimeError> {
        crate::nats::declare_stream(
            &js,
            stream::Config {
                name: STREAM.into(),
                subjects: vec!["kappa.state.>".into()],
                max_messages_per_subject: 1,
                allow_direct: true,
                max_message_size: 8 * 1024 * 1024,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self {
            js,
            namespace: namespace.to_string(),
            pending: Mutex::new(HashMap::new()),
            flush_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn marker(&self, p: u32) -> String {
        format!("kappa.state.{}.{p}.position", self.namespace)
    }

    fn entry_prefix(&self, p: u32) -> String {
        format!("kappa.state.{}.{p}.k", self.namespace)
    }

    /// Remembers a committed batch for the next flush.
    pub fn record(&self, partition: u32, position: u64, writes: &[Write]) {
        if let Ok(mut pending) = self.pending.lock() {
            let entry = pending.entry(partition).or_default();
            entry.position = entry.position.max(position);
            for (k, v) in writes {
                entry.writes.insert(k.clone(), v.clone());
            }
        }
    }

    /// The input stream was replaced: the next snapshot of `partition` records `position` even
    /// if an earlier, larger one is pending.
    pub fn rebase(&self, partition: u32, position: u64) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.entry(partition).or_default().position = position;
        }
    }

    /// Flushes the changes of `partition` (or of all partitions when `None`).
    pub async fn flush(&self, partition: Option<u32>) -> Result<(), RuntimeError> {
        let _guard = self.flush_lock.lock().await;
        let mut taken: Vec<(u32, Pending)> = match self.pending.lock() {
            Ok(mut pending) => match partition {
                Some(p) => pending.remove(&p).map(|x| vec![(p, x)]).unwrap_or_default(),
                None => pending.drain().collect(),
            },
            Err(_) => Vec::new(),
        };
        // In partition order, so a failure leaves a predictable rest.
        taken.sort_by_key(|(p, _)| *p);
        let mut taken = taken.into_iter();
        while let Some((p, snap)) = taken.next() {
            let t = Instant::now();
            let n = snap.writes.len();
            let prefix = self.entry_prefix(p);
            let mut acks = Vec::with_capacity(n);
            let result = async {
                for (k, v) in &snap.writes {
                    let subject = format!("{prefix}.{}", key_token(k));
                    acks.push(
                        self.js
                            .publish(subject, v.clone())
                            .await
                            .map_err(RuntimeError::js)?,
                    );
                }
                for a in acks.drain(..) {
                    a.await.map_err(RuntimeError::js)?;
                }
                self.js
                    .publish(self.marker(p), Bytes::from(snap.position.to_string()))
                    .await
                    .map_err(RuntimeError::js)?
                    .await
                    .map_err(RuntimeError::js)?;
                Ok::<(), RuntimeError>(())
            }
            .await;
            if let Err(e) = result {
                // Put the changes back so the next flush retries them: this partition's, and
                // those of every partition not reached yet (one failure must lose nothing).
                metrics::counter!("kappa_snapshot_failures_total").increment(1);
                self.restore_pending(p, snap);
                for (rest, snap) in taken {
                    self.restore_pending(rest, snap);
                }
                return Err(e);
            }
            metrics::histogram!("kappa_snapshot_seconds").record(t.elapsed().as_secs_f64());
            metrics::counter!("kappa_snapshot_entries_total").increment(n as u64);
            tracing::debug!(
                partition = p,
                entries = n,
                position = snap.position,
                "snapshot flushed"
            );
        }
        Ok(())
    }

    /// Puts taken changes back under whatever was recorded since (newer values win).
    fn restore_pending(&self, partition: u32, snap: Pending) {
        if let Ok(mut pending) = self.pending.lock() {
            let entry = pending.entry(partition).or_default();
            entry.position = entry.position.max(snap.position);
            for (k, v) in snap.writes {
                entry.writes.entry(k).or_insert(v);
            }
        }
    }

    /// Reads the latest snapshot of `partition`: its position and every key's last value.
    pub async fn recover(&self, partition: u32) -> Result<(u64, Vec<Write>), RuntimeError> {
        let stream = self
            .js
            .get_stream_no_info(STREAM)
            .await
            .map_err(RuntimeError::js)?;
        let position = match stream
            .get_last_raw_message_by_subject(&self.marker(partition))
            .await
        {
            Ok(m) => std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(RuntimeError::js(e)),
        };
        let prefix = self.entry_prefix(partition);
        let c = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: format!("{prefix}.>"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(RuntimeError::js)?;
        let mut c = c;
        let total = c.info().await.map_err(RuntimeError::js)?.num_pending;
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        if total > 0 {
            let mut msgs = c
                .stream()
                .max_messages_per_batch(1000)
                .messages()
                .await
                .map_err(RuntimeError::js)?;
            while (out.len() as u64) < total {
                let next = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                    .await
                    .map_err(|_| RuntimeError::JetStream("snapshot read timed out".into()))?;
                let Some(m) = next else { break };
                let m = m.map_err(RuntimeError::js)?;
                let token = m.subject.as_str().rsplit('.').next().unwrap_or_default();
                out.push((token_key(token), m.payload.clone()));
            }
        }
        Ok((position, out))
    }

    /// Spawns the periodic flush; it stops with `shutdown`.
    pub fn spawn_flusher(
        self: &std::sync::Arc<Self>,
        every: Duration,
        shutdown: crate::shutdown::CancellationToken,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = me.flush(None).await {
                    tracing::warn!(error = %e, "snapshot flush failed; will retry");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_subject_tokens() {
        for k in ["s-0001", "a.b", "x y", "~weird*>"] {
            let t = key_token(k);
            assert!(!t.contains('.') && !t.contains(' ') && !t.contains('*'));
            assert_eq!(token_key(&t), k);
        }
    }
}
