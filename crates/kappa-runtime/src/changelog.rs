//! The outcome logs of a service: streams that only this service writes, one subject per entity,
//! every message naming the input it was decided for (`Kappa-Source-Seq`).
//!
//! Two logs are built on [`EntityLog`]: the service's [change log](ChangeLog) (its state
//! changes, e.g. `thermo.deltas.<id>`) and its [dead letters](crate::dlq::DeadLetters)
//! (`kappa.dlq.<service>.<id>`). Every append is
//! - *fenced*: `Nats-Expected-Last-Subject-Sequence` is the stream sequence of the entity's
//!   previous message in that log, so a stale owner can never append after a newer one;
//! - *deduplicated*: `Nats-Msg-Id` is derived from the input sequence, so a retry within the
//!   stream's duplicate window is stored once;
//! - *recognised after a crash*: the last message of an entity's subject says up to which input
//!   the log already holds outcomes, so a replay never writes one twice, and the runtime folds
//!   the changes it missed back into the state (see [`crate::compute`]).

use async_nats::HeaderMap;
use async_nats::header::{
    HeaderName, HeaderValue, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;

use crate::RuntimeError;

/// Header naming the input stream sequence a message was decided for.
pub const SOURCE_SEQ_HEADER: &str = "Kappa-Source-Seq";
/// Header naming the input stream (its identity: creation time in ns) a message was decided
/// for; with `Kappa-Source-Seq` it names the input exactly, even across a replaced stream.
pub const SOURCE_STREAM_HEADER: &str = "Kappa-Source-Stream";
/// Header naming the schema of a change.
pub const SCHEMA_HEADER: &str = "Kappa-Schema";
/// Header naming the service that wrote a message.
pub const SERVICE_HEADER: &str = "Kappa-Service";

// The names of the headers every append carries, built once: a name given as `&str` is
// validated and copied into a new allocation on every insert. With the values formatted by
// `itoa` instead of `fmt`, a change's header map takes 586 ns to build instead of 682.
const SOURCE_SEQ_NAME: HeaderName = HeaderName::from_static(SOURCE_SEQ_HEADER);
const SOURCE_STREAM_NAME: HeaderName = HeaderName::from_static(SOURCE_STREAM_HEADER);
const SCHEMA_NAME: HeaderName = HeaderName::from_static(SCHEMA_HEADER);
const SERVICE_NAME: HeaderName = HeaderName::from_static(SERVICE_HEADER);

/// `n` in decimal as a header value (without `fmt`).
fn decimal(n: u64) -> HeaderValue {
    HeaderValue::from(itoa::Buffer::new().format(n).to_owned())
}

/// The dedupe id `<prefix>:<stream>:<seq>` of the outcome of input `(stream, seq)`.
pub(crate) fn dedupe_id(prefix: &str, stream: u64, seq: u64) -> String {
    let (mut a, mut b) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (a, b) = (a.format(stream), b.format(seq));
    let mut id = String::with_capacity(prefix.len() + a.len() + b.len() + 2);
    id.push_str(prefix);
    id.push(':');
    id.push_str(a);
    id.push(':');
    id.push_str(b);
    id
}

/// Keys per multi-subject direct get in [`EntityLog::last_many`] (the server refuses more
/// than 1024 subjects; a change is ~300 bytes, so an answer stays near 80 KB).
pub const MULTI_LAST_KEYS: usize = 256;
/// Multi-subject direct gets in flight per [`EntityLog::last_many`] call.
const MULTI_LAST_IN_FLIGHT: usize = 4;
/// Most bytes one answer of a multi-subject direct get may carry (`max_bytes`): the server
/// stops an answer past it and says how many messages it left (`Nats-Num-Pending`), which are
/// then asked for again. Without it an answer holds every message in full (the server sent
/// 60 of 512 KiB, 30 MiB, in one answer), and `MULTI_LAST_IN_FLIGHT` (4) of them at once. Changes
/// of ordinary size never reach it (256 × ~300 bytes).
pub const MULTI_LAST_MAX_BYTES: usize = 4 << 20;
/// How long one answer of a multi-subject direct get may take to arrive.
const MULTI_LAST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How an entity's messages are stored in a log's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Stored as published: `<prefix>.<key>`.
    Flat,
    /// Stored through the stream's partition transform: `<prefix>.<partition>.<key>`.
    Partitioned,
}

/// The last message of an entity in a log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Written {
    /// Its stream sequence (what the entity's next append must expect).
    pub stream_seq: u64,
    /// The input sequence it was decided for (0 when the header is missing).
    pub source_seq: u64,
    /// The identity of the input stream it was decided for (0 when missing).
    pub source_stream: u64,
    /// The service that says it wrote it (`Kappa-Service`), if any.
    pub writer: Option<String>,
}

/// One message of an entity's log.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its stream sequence.
    pub stream_seq: u64,
    /// The input sequence it was decided for.
    pub source_seq: u64,
    /// The identity of the input stream it was decided for (0 when missing).
    pub source_stream: u64,
    /// The service that says it wrote it (`Kappa-Service`), if any.
    pub writer: Option<String>,
    /// The payload.
    pub payload: Bytes,
}

/// A stream with one subject per entity, written only by its owning service.
#[derive(Clone)]
pub struct EntityLog {
    js: jetstream::Context,
    stream: String,
    prefix: String,
    layout: Layout,
    service: String,
    /// The stream's partition count, if known ([`EntityLog::with_partitions`]).
    partitions: Option<u32>,
}

impl std::fmt::Debug for EntityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntityLog")
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .field("layout", &self.layout)
            .finish()
    }
}

/// True if a publish failed because the entity's log moved on since we last read it
/// (another writer, or our own view of it is stale). JetStream error 10071; 10164 is the same
/// conflict as some server versions report it, which async-nats 0.51 does not map.
pub fn is_conflict(e: &jetstream::context::PublishError) -> bool {
    if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
        return true;
    }
    is_conflict_text(&e.to_string())
}

/// True if an error's text is JetStream's compare-and-set conflict: 10071 ("wrong last
/// sequence: N") or 10164 (the same conflict as some server versions report it).
pub fn is_conflict_text(text: &str) -> bool {
    text.contains("10164") || text.contains("10071") || text.contains("wrong last sequence")
}

impl EntityLog {
    /// The log of `service` in `stream`, whose entities publish to `<prefix>.<key>`.
    pub fn new(
        js: jetstream::Context,
        stream: &str,
        prefix: &str,
        layout: Layout,
        service: &str,
    ) -> Self {
        Self {
            js,
            stream: stream.to_string(),
            prefix: prefix.to_string(),
            layout,
            service: service.to_string(),
            partitions: None,
        }
    }

    /// A [`Layout::Partitioned`] log whose stream has `partitions` partitions: an entity's
    /// reads then name its one stored subject (`<prefix>.<partition>.<key>`, the partition as
    /// the server's transform computes it) instead of the wildcard `<prefix>.*.<key>`, which
    /// the server can only answer by scanning. Measured: at 10^6 sensors and 2 million
    /// changes, a restart's reads of the entities' log tails with the wildcard kept
    /// nats-server at 100% CPU and timed out without end.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions.max(1));
        self
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The subject an entity's messages are published to.
    pub fn subject(&self, key: &str) -> String {
        let mut subject = String::with_capacity(self.prefix.len() + 1 + key.len());
        subject.push_str(&self.prefix);
        subject.push('.');
        subject.push_str(key);
        subject
    }

    /// A subject filter matching the entity's stored messages.
    fn stored_filter(&self, key: &str) -> String {
        match self.layout {
            Layout::Flat => format!("{}.{key}", self.prefix),
            Layout::Partitioned => match self.partitions {
                Some(n) => format!(
                    "{}.{}.{key}",
                    self.prefix,
                    crate::partition::partition_for(key, n)
                ),
                None => format!("{}.*.{key}", self.prefix),
            },
        }
    }

    /// A subject filter matching every stored message of partition `partition`'s entities
    /// (`<prefix>.<partition>.*`); `None` for a [`Layout::Flat`] log, whose subjects do not name
    /// the partition.
    pub fn partition_filter(&self, partition: u32) -> Option<String> {
        match self.layout {
            Layout::Flat => None,
            Layout::Partitioned => Some(format!("{}.{partition}.*", self.prefix)),
        }
    }

    /// The stream sequence of the last message of partition `partition`'s entities (0 if
    /// none; always 0 for a [`Layout::Flat`] log).
    pub async fn last_in_partition(&self, partition: u32) -> Result<u64, RuntimeError> {
        let Some(filter) = self.partition_filter(partition) else {
            return Ok(0);
        };
        let s = self.handle().await?;
        match s.direct_get_last_for_subject(filter).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(RuntimeError::JetStream(format!(
                "last message of partition {partition} in {}: {e}",
                self.stream
            ))),
        }
    }

    async fn handle(&self) -> Result<jetstream::stream::Stream<()>, RuntimeError> {
        self.js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(RuntimeError::js)
    }

    /// The entity's last message, `None` if the log holds none.
    pub async fn last(&self, key: &str) -> Result<Option<Written>, RuntimeError> {
        let s = self.handle().await?;
        match s.direct_get_last_for_subject(self.stored_filter(key)).await {
            Ok(m) => Ok(Some(Written::from_headers(m.sequence, Some(&m.headers)))),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(RuntimeError::JetStream(format!(
                "last message of {key} in {}: {e}",
                self.stream
            ))),
        }
    }

    /// The last message of each of `keys`, in the order of `keys` (`None` for a key the log
    /// holds nothing of).
    ///
    /// Asked [`MULTI_LAST_KEYS`] keys at a time with one multi-subject direct get
    /// (`multi_last`, nats-server 2.11 and later), a few requests at a time: loading the
    /// entities of a batch then costs a round trip per few hundred keys instead of one per
    /// key (a cold start at 10^6 sensors otherwise asks 2 million times). A server that does
    /// not answer multi-subject gets is asked key by key.
    pub async fn last_many(&self, keys: &[String]) -> Result<Vec<Option<Written>>, RuntimeError> {
        use futures::StreamExt;
        let asks: Vec<_> = keys
            .chunks(MULTI_LAST_KEYS)
            .map(|chunk| self.last_or_each(chunk))
            .collect();
        let answered: Vec<Result<Vec<Option<Written>>, RuntimeError>> = futures::stream::iter(asks)
            .buffered(MULTI_LAST_IN_FLIGHT)
            .collect()
            .await;
        let mut out = Vec::with_capacity(keys.len());
        for chunk in answered {
            out.extend(chunk?);
        }
        Ok(out)
    }

    /// [`Self::last_chunk`], or key by key where the server does not answer multi-subject gets.
    async fn last_or_each(&self, keys: &[String]) -> Result<Vec<Option<Written>>, RuntimeError> {
        if let Some(found) = self.last_chunk(keys).await? {
            return Ok(found);
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.last(key).await?);
        }
        Ok(out)
    }

    /// One multi-subject direct get for `keys` (at most [`MULTI_LAST_KEYS`]); `None` if the
    /// server does not answer such requests (then ask key by key).
    async fn last_chunk(
        &self,
        keys: &[String],
    ) -> Result<Option<Vec<Option<Written>>>, RuntimeError> {
        use futures::StreamExt;
        let err = |what: &str, e: &dyn std::fmt::Display| {
            RuntimeError::JetStream(format!("last messages in {} ({what}): {e}", self.stream))
        };
        let mut found: std::collections::HashMap<String, Written> =
            std::collections::HashMap::with_capacity(keys.len());
        // Keys still to ask for: all at first; after an answer cut short by the server's byte
        // limit (`Nats-Num-Pending` > 0 at the end), those it did not reach yet.
        let mut asking: Vec<&String> = keys.iter().collect();
        let client = self.js.client();
        while !asking.is_empty() {
            let filters: Vec<String> = asking.iter().map(|k| self.stored_filter(k)).collect();
            let body = serde_json::to_vec(&serde_json::json!({
                "multi_last": filters,
                "batch": filters.len(),
                "max_bytes": MULTI_LAST_MAX_BYTES,
            }))
            .map_err(|e| err("request", &e))?;
            let inbox = client.new_inbox();
            let mut replies = client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| err("subscribe", &e))?;
            client
                .publish_with_reply(
                    format!("$JS.API.DIRECT.GET.{}", self.stream),
                    inbox,
                    body.into(),
                )
                .await
                .map_err(|e| err("publish", &e))?;
            let mut pending = 0u64;
            loop {
                let reply = match tokio::time::timeout(MULTI_LAST_TIMEOUT, replies.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(err("reply", &"subscription closed")),
                    Err(_) => return Err(err("reply", &"timed out")),
                };
                let header = |name: &str| {
                    reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_string())
                };
                match reply.status.map(|s| s.as_u16()) {
                    // End of batch: how many matching messages it did not send.
                    Some(204) => {
                        pending = header("Nats-Num-Pending")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        break;
                    }
                    // None of the subjects has a message.
                    Some(404) => break,
                    // No multi-subject gets here (an older server), or no responder.
                    Some(408) | Some(503) => return Ok(None),
                    Some(s) if s != 200 => {
                        let why = reply.description.clone().unwrap_or_default();
                        return Err(err("reply", &format!("status {s} {why}")));
                    }
                    _ => {}
                }
                // A server without batches answers one message, without `Nats-Num-Pending`.
                if header("Nats-Num-Pending").is_none() {
                    return Ok(None);
                }
                let (Some(subject), Some(seq)) = (
                    header("Nats-Subject"),
                    header("Nats-Sequence").and_then(|v| v.parse::<u64>().ok()),
                ) else {
                    return Err(err("reply", &"a message without subject or sequence"));
                };
                let Some(key) = self.key_of(&subject) else {
                    continue;
                };
                found.insert(
                    key.to_string(),
                    Written::from_headers(seq, reply.headers.as_ref()),
                );
            }
            asking = if pending > 0 {
                asking
                    .into_iter()
                    .filter(|k| !found.contains_key(k.as_str()))
                    .collect()
            } else {
                Vec::new()
            };
        }
        Ok(Some(keys.iter().map(|k| found.remove(k)).collect()))
    }

    /// The key a stored subject belongs to (the inverse of [`Self::stored_filter`]).
    fn key_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?;
        match self.layout {
            Layout::Flat => Some(rest),
            Layout::Partitioned => rest.split_once('.').map(|(_, key)| key),
        }
    }

    /// The entity's messages with a stream sequence in `(after, upto]`, in order.
    pub async fn range(
        &self,
        key: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<Entry>, RuntimeError> {
        let s = self.handle().await?;
        let filter = self.stored_filter(key);
        let mut out = Vec::new();
        let mut next = after + 1;
        while next <= upto {
            match s
                .direct_get_next_for_subject(filter.clone(), Some(next))
                .await
            {
                Ok(m) if m.sequence <= upto => {
                    next = m.sequence + 1;
                    out.push(Entry {
                        stream_seq: m.sequence,
                        source_seq: source_seq(&m.headers),
                        source_stream: number(&m.headers, SOURCE_STREAM_HEADER),
                        writer: writer(&m.headers),
                        payload: m.payload,
                    });
                }
                Ok(_) => break,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => {
                    return Err(RuntimeError::JetStream(format!(
                        "messages of {key} in {}: {e}",
                        self.stream
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Sends one message for `key`, decided for input `source` (input stream identity,
    /// sequence), that must directly follow
    /// the entity's message at stream sequence `expected` (`Some(0)`: the entity has none;
    /// `None`: not fenced). Returns the ack future; the append is durable once it resolves.
    pub async fn append(
        &self,
        key: &str,
        payload: Bytes,
        mut headers: HeaderMap,
        msg_id: String,
        source: (u64, u64),
        expected: Option<u64>,
    ) -> Result<PublishAckFuture, RuntimeError> {
        headers.insert(SOURCE_SEQ_NAME, decimal(source.1));
        headers.insert(SOURCE_STREAM_NAME, decimal(source.0));
        headers.insert(SERVICE_NAME, self.service.as_str());
        headers.insert(NATS_MESSAGE_ID, msg_id);
        if let Some(expected) = expected {
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, decimal(expected));
        }
        let msg = PublishMessage::build().payload(payload).headers(headers);
        self.js
            .send_publish(self.subject(key), msg)
            .await
            .map_err(|e| RuntimeError::JetStream(format!("append to {}: {e}", self.stream)))
    }
}

impl Written {
    /// What a stored message at `stream_seq` with `headers` says of its entity's log.
    fn from_headers(stream_seq: u64, headers: Option<&HeaderMap>) -> Self {
        Self {
            stream_seq,
            source_seq: headers.map_or(0, source_seq),
            source_stream: headers.map_or(0, |h| number(h, SOURCE_STREAM_HEADER)),
            writer: headers.and_then(writer),
        }
    }
}

impl Entry {
    /// The entry a stored message is: its stream sequence, headers and payload.
    pub fn from_message(stream_seq: u64, headers: Option<&HeaderMap>, payload: Bytes) -> Self {
        Self {
            stream_seq,
            source_seq: headers.map_or(0, source_seq),
            source_stream: headers.map_or(0, |h| number(h, SOURCE_STREAM_HEADER)),
            writer: headers.and_then(writer),
            payload,
        }
    }
}

fn writer(headers: &HeaderMap) -> Option<String> {
    headers.get(SERVICE_HEADER).map(|v| v.as_str().to_string())
}

fn number(headers: &HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

fn source_seq(headers: &HeaderMap) -> u64 {
    number(headers, SOURCE_SEQ_HEADER)
}

/// A service's change log: its state changes, one subject per entity.
#[derive(Debug, Clone)]
pub struct ChangeLog {
    log: EntityLog,
    service: String,
    schema: &'static str,
}

impl ChangeLog {
    /// The change log of `service` in `log`, whose messages carry schema `schema`.
    pub fn new(log: EntityLog, service: &str, schema: &'static str) -> Self {
        Self {
            log,
            service: service.to_string(),
            schema,
        }
    }

    /// The underlying entity log.
    pub fn log(&self) -> &EntityLog {
        &self.log
    }

    /// Appends the change decided for input `source` (input stream identity, sequence) of
    /// `key` (see [`EntityLog::append`]).
    pub async fn append(
        &self,
        key: &str,
        payload: Bytes,
        source: (u64, u64),
        expected: u64,
    ) -> Result<PublishAckFuture, RuntimeError> {
        let mut headers = HeaderMap::new();
        headers.insert(SCHEMA_NAME, self.schema);
        self.log
            .append(
                key,
                payload,
                headers,
                dedupe_id(&self.service, source.0, source.1),
                source,
                Some(expected),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_wrong_sequence_codes_are_conflicts() {
        use super::is_conflict_text;
        assert!(is_conflict_text(
            "wrong last sequence: 4 (code 400, error code 10071)"
        ));
        assert!(is_conflict_text(
            "jetstream error: (code 400, error code 10164)"
        ));
        assert!(!is_conflict_text(
            "no suitable peers for placement (code 400, error code 10005)"
        ));
        assert!(!is_conflict_text("timed out: didn't receive ack in time"));
    }
}
