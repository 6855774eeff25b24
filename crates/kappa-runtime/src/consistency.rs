//! Read-your-writes for the views of a domain service (Kafka Streams' IQv2 position bounds,
//! ksqlDB's consistency tokens): *does this view reflect every input with a sequence at most
//! `N`?* — `N` being an input stream sequence, such as the publish ack a producer got.
//!
//! Two hops stand between an input and a view, and each is checked with what its owner writes
//! (nothing is guessed from timing):
//! 1. **decided** — the producer's [progress mark](crate::progress) of the input's partition
//!    is at `N` or beyond, or no input of the partition (of the key, for one entity) lies
//!    between the mark and `N`. The mark covers inputs that changed nothing or were rejected,
//!    which the change log alone cannot tell from inputs not yet processed. For one entity, its
//!    own last change is asked first: an entity's outcomes are written in input order, so a
//!    change of the producer's for an input at `N` or beyond (of the current input stream)
//!    means every input of the entity up to `N` is decided, without waiting for the mark;
//! 2. **applied** — once every input up to `N` is decided, every change they caused is in the
//!    change log at or below its last sequence `D` (read *after* step 1). The view reflects
//!    them when, in each of the change log's partitions it reads, its position is at `D` or
//!    beyond, or no change of the partition (of the key) lies between its position and `D`.
//!
//! Both stream identities are checked: a mark or a view position that refers to a stream that
//! was since replaced counts as 0. An `N` beyond the input stream's end is never reached (the
//! input may be published yet, with a lower sequence than `N`). Each check costs two stream
//! infos, one KV get per input partition and at most one direct get per partition and hop; a
//! reader that must wait calls [`Consistency::check`] again with the same [`Pending`]: once the
//! inputs are decided, the target in the change log is fixed and each further check costs at
//! most one direct get per partition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use futures::future::join_all;
use tokio::sync::OnceCell;

use crate::RuntimeError;
use crate::partition::{partition_count, partition_for};
use crate::progress::ProgressReader;

/// Where a view stands in one partition of the change log it follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViewPosition {
    /// Last change-log sequence applied in the partition.
    pub position: u64,
    /// Identity of the change log `position` refers to (its creation time).
    pub source: u64,
}

/// What a read is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// One entity: only its own inputs and changes count.
    Key(&'a str),
    /// Every entity (lists, rankings, aggregates).
    All,
}

/// Which hop an unreached bound waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The input stream does not hold `N` yet.
    Input,
    /// The producer has not decided every input up to `N`.
    Decided,
    /// The view has not applied every change those inputs caused.
    Applied,
}

/// The answer of [`Consistency::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The view reflects every input of the scope with a sequence at most `N`.
    Reached,
    /// Not yet: where the least advanced partition stands.
    Behind {
        /// The hop it waits on.
        stage: Stage,
        /// The partition (of the input stream for [`Stage::Decided`], of the change log for
        /// [`Stage::Applied`]; 0 for [`Stage::Input`]).
        partition: u32,
        /// Its position: the producer's mark, the view's position, or the input stream's
        /// last sequence for [`Stage::Input`].
        position: u64,
    },
}

/// A partitioned stream as a reader sees it: its subject prefix (stored subjects are
/// `<prefix>.<p>.<key>`).
#[derive(Debug, Clone)]
struct Side {
    stream: String,
    prefix: String,
}

/// The state of a side's stream now.
struct Now {
    stream: jetstream::stream::Stream,
    identity: u64,
    last: u64,
    partitions: u32,
}

impl Side {
    async fn now(&self, js: &jetstream::Context) -> Result<Now, RuntimeError> {
        let stream = js
            .get_stream(&self.stream)
            .await
            .map_err(RuntimeError::js)?;
        let info = stream.cached_info();
        let identity = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
        let last = info.state.last_sequence;
        let partitions = partition_count(&info.config).unwrap_or(1);
        Ok(Now {
            stream,
            identity,
            last,
            partitions,
        })
    }

    /// Whether no message of partition `p` (of `key`) lies in `(after, upto]`.
    async fn none_between(
        &self,
        now: &Now,
        p: u32,
        key: Option<&str>,
        after: u64,
        upto: u64,
    ) -> Result<bool, RuntimeError> {
        if after >= upto {
            return Ok(true);
        }
        let subject = format!("{}.{p}.{}", self.prefix, key.unwrap_or("*"));
        match now
            .stream
            .direct_get_next_for_subject(subject, Some(after + 1))
            .await
        {
            Ok(m) => Ok(m.sequence > upto),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(true),
            Err(e) => Err(RuntimeError::js(e)),
        }
    }
}

/// Checks read-your-writes bounds for the views of one producer's change log (see the module
/// docs).
#[derive(Debug, Clone)]
pub struct Consistency {
    js: jetstream::Context,
    input: Side,
    changes: Side,
    producer: String,
    /// Opened on first use: the producer creates its bucket when it starts.
    progress: Arc<OnceCell<ProgressReader>>,
}

impl Consistency {
    /// A checker for views of `producer`'s change log `changes_stream` (`changes_prefix`),
    /// computed from its input `input_stream` (`input_prefix`). Nothing is asked of the server
    /// until the first check.
    pub fn new(
        js: jetstream::Context,
        producer: &str,
        (input_stream, input_prefix): (&str, &str),
        (changes_stream, changes_prefix): (&str, &str),
    ) -> Self {
        Self {
            js,
            input: Side {
                stream: input_stream.into(),
                prefix: input_prefix.into(),
            },
            changes: Side {
                stream: changes_stream.into(),
                prefix: changes_prefix.into(),
            },
            producer: producer.into(),
            progress: Arc::new(OnceCell::new()),
        }
    }

    async fn progress(&self) -> Result<&ProgressReader, RuntimeError> {
        self.progress
            .get_or_try_init(|| ProgressReader::open(&self.js, &self.producer, Duration::ZERO))
            .await
    }

    /// The change log's identity and partition count now (what [`ViewPosition::source`] is
    /// compared with, and how many partitions a low watermark spans).
    pub async fn change_log(&self) -> Result<(u64, u32), RuntimeError> {
        let now = self.changes.now(&self.js).await?;
        Ok((now.identity, now.partitions))
    }

    /// The input sequence the producer's last change of `key` was decided for (0 if the key
    /// has no change, or its last one is not the producer's for an input of the stream
    /// `input`), and that change's sequence in the log.
    async fn decided_by_change(
        &self,
        changes: &Now,
        key: &str,
        input: u64,
    ) -> Result<(u64, u64), RuntimeError> {
        let q = partition_for(key, changes.partitions);
        let subject = format!("{}.{q}.{key}", self.changes.prefix);
        let m = match changes.stream.direct_get_last_for_subject(subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(RuntimeError::js(e)),
        };
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string());
        let ours = header(crate::changelog::SERVICE_HEADER).as_deref() == Some(&self.producer);
        let stream: Option<u64> =
            header(crate::changelog::SOURCE_STREAM_HEADER).and_then(|v| v.parse().ok());
        let seq: Option<u64> =
            header(crate::changelog::SOURCE_SEQ_HEADER).and_then(|v| v.parse().ok());
        Ok(match (ours, stream, seq) {
            (true, Some(s), Some(seq)) if s == input => (seq, m.sequence),
            _ => (0, m.sequence),
        })
    }

    /// Whether a view standing at `view` (per change-log partition) reflects every input of
    /// `scope` with a sequence at most `min_seq`. A reader that waits for one bound passes the
    /// same `pending` to every check: once the inputs are decided, the change-log sequence
    /// their changes are at or below is fixed, so the view has a fixed target to reach (a target
    /// re-read at every check would move on under a steady load and never be reached).
    pub async fn check(
        &self,
        min_seq: u64,
        scope: Scope<'_>,
        view: &BTreeMap<u32, ViewPosition>,
        pending: &mut Pending,
    ) -> Result<Verdict, RuntimeError> {
        let key = match scope {
            Scope::Key(k) => Some(k),
            Scope::All => None,
        };
        if pending.applied.is_none() {
            match self.decided(min_seq, key).await? {
                Ok(target) => pending.applied = Some(target),
                Err(behind) => return Ok(behind),
            }
        }
        let Some((changes, upto)) = pending.applied.as_ref() else {
            return Ok(Verdict::Behind {
                stage: Stage::Decided,
                partition: 0,
                position: 0,
            });
        };
        let upto = *upto;
        // 2. Applied.
        let parts: Vec<u32> = match key {
            Some(k) => vec![partition_for(k, changes.partitions)],
            None => (0..changes.partitions).collect(),
        };
        let applied = join_all(parts.iter().map(|&q| async move {
            let at = view
                .get(&q)
                .filter(|v| v.source == changes.identity)
                .map_or(0, |v| v.position);
            let done = at >= upto || self.changes.none_between(changes, q, key, at, upto).await?;
            Ok::<_, RuntimeError>((q, at, done))
        }))
        .await;
        for a in applied {
            let (q, at, done) = a?;
            if !done {
                return Ok(Verdict::Behind {
                    stage: Stage::Applied,
                    partition: q,
                    position: at,
                });
            }
        }
        Ok(Verdict::Reached)
    }

    /// Step 1: whether every input of `key` (or of all keys) up to `min_seq` is decided; if so,
    /// the change log as read after that, and the sequence every change of those inputs is at
    /// or below.
    async fn decided(
        &self,
        min_seq: u64,
        key: Option<&str>,
    ) -> Result<Result<(Now, u64), Verdict>, RuntimeError> {
        let input = self.input.now(&self.js).await?;
        if min_seq > input.last {
            return Ok(Err(Verdict::Behind {
                stage: Stage::Input,
                partition: 0,
                position: input.last,
            }));
        }
        let parts: Vec<u32> = match key {
            Some(k) => vec![partition_for(k, input.partitions)],
            None => (0..input.partitions).collect(),
        };
        let changes = self.changes.now(&self.js).await?;
        // The entity's last change: (the input it was decided for, its sequence in the log).
        let last_change = match key {
            Some(k) => self.decided_by_change(&changes, k, input.identity).await?,
            None => (0, 0),
        };
        let by_change = last_change.0 >= min_seq;
        let progress = self.progress().await?;
        let input = &input;
        let decided = join_all(parts.iter().filter(|_| !by_change).map(|&p| async move {
            let mark = progress.mark(p).await?;
            let at = mark
                .filter(|m| m.source == input.identity)
                .map_or(0, |m| m.position);
            let done = at >= min_seq || self.input.none_between(input, p, key, at, min_seq).await?;
            Ok::<_, RuntimeError>((p, at, done))
        }))
        .await;
        for d in decided {
            let (p, at, done) = d?;
            if !done {
                return Ok(Err(Verdict::Behind {
                    stage: Stage::Decided,
                    partition: p,
                    position: at,
                }));
            }
        }
        // Every change of those inputs is at or below the log's last sequence as read after
        // they were decided; the change read by `decided_by_change` may be newer than the
        // stream info read before it.
        let changes = if by_change {
            changes
        } else {
            self.changes.now(&self.js).await?
        };
        let upto = changes.last.max(last_change.1);
        Ok(Ok((changes, upto)))
    }
}

/// What a reader keeps between the checks of one bound (pass the same one to every
/// [`Consistency::check`] of a bound, a new one for another bound).
#[derive(Default)]
pub struct Pending {
    /// Once decided: the change log as read then, and the sequence to reach.
    applied: Option<(Now, u64)>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("applied_upto", &self.applied.as_ref().map(|a| a.1))
            .finish()
    }
}

/// The low watermark of a view over `partitions` change-log partitions: the least position,
/// a partition the view has no position in (or one of another log than `source`) counting 0.
/// Every change at or below it is applied, whatever partition it is in.
pub fn low_watermark(view: &BTreeMap<u32, ViewPosition>, partitions: u32, source: u64) -> u64 {
    (0..partitions.max(1))
        .map(|q| {
            view.get(&q)
                .filter(|v| v.source == source)
                .map_or(0, |v| v.position)
        })
        .min()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_low_watermark_is_the_least_partition_and_a_missing_one_is_zero() {
        let mut v = BTreeMap::new();
        v.insert(
            0,
            ViewPosition {
                position: 10,
                source: 7,
            },
        );
        v.insert(
            1,
            ViewPosition {
                position: 4,
                source: 7,
            },
        );
        assert_eq!(low_watermark(&v, 2, 7), 4);
        assert_eq!(
            low_watermark(&v, 3, 7),
            0,
            "partition 2 has applied nothing"
        );
        assert_eq!(low_watermark(&v, 2, 8), 0, "positions of a replaced log");
    }
}
