//! The dead-letter stream `DLQ`: every rejected input is kept on `kappa.dlq.<service>.<key>`
//! with its original payload and the headers `Kappa-Reason`, `Kappa-Source-Subject`,
//! `Kappa-Source-Seq` (and `Kappa-Detail` when there is one), and counted in
//! `kappa_rejected_total{reason}`.
//!
//! The entity's key is the last token, as everywhere: `nats sub 'kappa.dlq.>'` shows every
//! dead letter, `kappa.dlq.<service>.>` one service's, and the runtime reads an entity's last
//! dead letter back after a crash, so an input rejected once is never decided again (a dead
//! letter is an outcome of the [change-log kind](crate::changelog), fenced the same way).

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use bytes::Bytes;

use crate::RuntimeError;
use crate::changelog::{EntityLog, Layout, Written};
use crate::compute::Rejection;
use crate::config::StreamOptions;

/// Name of the dead-letter stream.
pub const STREAM: &str = "DLQ";
/// Subject prefix of dead letters.
pub const SUBJECT_PREFIX: &str = "kappa.dlq";
/// Header with the reason code of a dead letter.
pub const REASON_HEADER: &str = "Kappa-Reason";
/// Longest `Kappa-Detail` kept, in characters.
const MAX_DETAIL: usize = 200;

/// Declares the `DLQ` stream (idempotent) with the default [`StreamOptions`]; an existing one
/// gets direct gets turned on, which the recovery of decisions needs.
pub async fn declare(js: &jetstream::Context) -> Result<(), RuntimeError> {
    declare_with(js, StreamOptions::default()).await
}

/// [`declare`] with `options`: its duplicate window if the stream is created (an existing one
/// keeps its own), its replicas (an existing stream with another count is refused).
pub async fn declare_with(
    js: &jetstream::Context,
    options: StreamOptions,
) -> Result<(), RuntimeError> {
    let config = stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
        max_age: std::time::Duration::from_secs(7 * 24 * 3600),
        duplicate_window: options.duplicate_window,
        allow_direct: true,
        num_replicas: options.replicas,
        ..Default::default()
    };
    let mut s = crate::nats::declare_stream(js, config).await?;
    let info = s.info().await.map_err(RuntimeError::js)?;
    if !info.config.allow_direct {
        let mut c = info.config.clone();
        c.allow_direct = true;
        js.update_stream(c).await.map_err(RuntimeError::js)?;
        tracing::info!(
            stream = STREAM,
            "direct gets enabled on the existing stream"
        );
    }
    Ok(())
}

/// Dead-letters a service's rejected inputs.
#[derive(Clone, Debug)]
pub struct DeadLetters {
    log: EntityLog,
    /// `dlq:<service>`, the start of every dead letter's `Nats-Msg-Id`.
    dedupe_prefix: String,
}

impl DeadLetters {
    /// Dead letters of `service` go to `kappa.dlq.<service>.<key>`.
    pub fn new(js: jetstream::Context, service: &str) -> Self {
        Self {
            log: EntityLog::new(
                js,
                STREAM,
                &format!("{SUBJECT_PREFIX}.{service}"),
                Layout::Flat,
                service,
            ),
            dedupe_prefix: format!("dlq:{service}"),
        }
    }

    /// The entity's last dead letter.
    pub async fn last(&self, key: &str) -> Result<Option<Written>, RuntimeError> {
        self.log.last(key).await
    }

    /// The last dead letter of each of `keys` (see [`EntityLog::last_many`]).
    pub async fn last_many(&self, keys: &[String]) -> Result<Vec<Option<Written>>, RuntimeError> {
        self.log.last_many(keys).await
    }

    /// Publishes the dead letter of input `source` (its subject, its stream's identity, its
    /// sequence) about `key`, that
    /// must follow the entity's dead letter at stream sequence `expected` (`Some(0)`: none yet;
    /// `None`: not fenced, for outcomes that are a pure function of the input). Returns the ack
    /// future: await it before the input's position is committed. `Nats-Msg-Id` is derived
    /// from the input, so a retry never doubles a dead letter.
    pub async fn append(
        &self,
        key: &str,
        source: (&str, u64, u64),
        payload: Bytes,
        rejection: &Rejection,
        expected: Option<u64>,
    ) -> Result<PublishAckFuture, RuntimeError> {
        let (source_subject, source_stream, source_seq) = source;
        let reason: &str = &rejection.reason;
        let mut headers = HeaderMap::new();
        headers.insert(REASON_HEADER, reason);
        headers.insert("Kappa-Source-Subject", source_subject);
        if let Some(d) = &rejection.detail {
            let clean: String = d
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_DETAIL)
                .collect();
            headers.insert("Kappa-Detail", clean.as_str());
        }
        metrics::counter!("kappa_rejected_total", "reason" => reason.to_string()).increment(1);
        tracing::debug!(reason, source_subject, source_seq, "dead-lettered");
        self.log
            .append(
                key,
                payload,
                headers,
                crate::changelog::dedupe_id(&self.dedupe_prefix, source_stream, source_seq),
                (source_stream, source_seq),
                expected,
            )
            .await
    }
}
