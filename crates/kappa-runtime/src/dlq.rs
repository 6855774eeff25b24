//! The dead-letter stream `DLQ` (`kappa.dlq.<service>`): every rejected input is kept with its
//! original payload and the headers `Kappa-Reason`, `Kappa-Source-Subject`, `Kappa-Source-Seq`
//! (and `Kappa-Detail` when there is one), and counted in `kappa_rejected_total{reason}`.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;

use crate::RuntimeError;

/// Name of the dead-letter stream.
pub const STREAM: &str = "DLQ";
/// Subject prefix of dead letters.
pub const SUBJECT_PREFIX: &str = "kappa.dlq";

/// Declares the `DLQ` stream (idempotent).
pub async fn declare(js: &jetstream::Context) -> Result<(), RuntimeError> {
    crate::nats::declare_stream(
        js,
        stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            max_age: std::time::Duration::from_secs(7 * 24 * 3600),
            duplicate_window: std::time::Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await
    .map(|_| ())
}

/// Dead-letters a service's rejected inputs.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    subject: String,
    service: String,
}

impl DeadLetters {
    /// Dead letters of `service` go to `kappa.dlq.<service>`.
    pub fn new(js: jetstream::Context, service: &str) -> Self {
        Self {
            js,
            subject: format!("{SUBJECT_PREFIX}.{service}"),
            service: service.to_string(),
        }
    }

    /// Publishes one dead letter and returns its ack future (await it before acking the input).
    /// `Nats-Msg-Id` is derived from the source, so a replay never doubles a dead letter.
    pub async fn reject(
        &self,
        source_subject: &str,
        source_seq: u64,
        payload: Bytes,
        reason: &str,
        detail: Option<&str>,
    ) -> Result<PublishAckFuture, RuntimeError> {
        let mut headers = HeaderMap::new();
        headers.insert("Kappa-Reason", reason);
        headers.insert("Kappa-Source-Subject", source_subject);
        headers.insert("Kappa-Source-Seq", source_seq.to_string().as_str());
        headers.insert("Kappa-Service", self.service.as_str());
        if let Some(d) = detail {
            let clean: String = d.chars().filter(|c| !c.is_control()).take(200).collect();
            headers.insert("Kappa-Detail", clean.as_str());
        }
        metrics::counter!("kappa_rejected_total", "reason" => reason.to_string()).increment(1);
        tracing::debug!(reason, source_subject, source_seq, "dead-lettered");
        let msg = PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(format!(
                "dlq:{}:{source_subject}:{source_seq}",
                self.service
            ));
        self.js
            .send_publish(self.subject.clone(), msg)
            .await
            .map_err(RuntimeError::js)
    }
}
