//! Read-your-writes on the API: `min_seq=N` (a READINGS stream sequence, such as the publish
//! ack of a reading) makes a read wait until the views reflect every reading of the requested
//! sensors with a sequence at most `N` ([`kappa_runtime::consistency`] decides), up to
//! `max_wait_ms` (default [`DEFAULT_WAIT_MS`], at most the request timeout); past it the answer
//! is a JSON 503 naming the position reached (IQv2's `NOT_UP_TO_BOUND`), never a stale answer.
//! A bound beyond the readings stream's end is a 409 at once: no ack gave it.
//!
//! Aggregate answers state a true low watermark: `view_seq` is the least position over every
//! partition of the deltas stream (one the views have applied nothing in counts 0), and
//! `positions` every partition's own.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use kappa_runtime::consistency::{Consistency, Scope, Stage, Verdict, ViewPosition};
use thermo_domain::views::Positions;

use crate::{ApiError, ApiState};

/// `max_wait_ms` when a read gives `min_seq` and no wait.
pub const DEFAULT_WAIT_MS: u64 = 3000;
/// Largest `max_wait_ms` (the request timeout may cut it shorter).
pub const MAX_WAIT_MS: u64 = 60_000;
/// First pause between two checks; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
/// Longest pause between two checks.
const MAX_PAUSE: Duration = Duration::from_millis(25);

/// A read's bound: reflect every reading up to `min_seq`, waiting at most `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// READINGS stream sequence the answer must reflect.
    pub min_seq: u64,
    /// How long the read may wait for it.
    pub wait: Duration,
}

fn digits(raw: &str) -> bool {
    !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit())
}

/// Parses `min_seq` and `max_wait_ms` (`None` without `min_seq`; `min_seq=0` asks nothing).
pub fn parse_bound(q: &HashMap<String, String>) -> Result<Option<Bound>, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, m);
    let wait = match q.get("max_wait_ms") {
        None => DEFAULT_WAIT_MS,
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if digits(raw) && n <= MAX_WAIT_MS => n,
            _ => {
                return Err(bad(&format!(
                    "max_wait_ms must be an integer in 0..={MAX_WAIT_MS}"
                )));
            }
        },
    };
    let Some(raw) = q.get("min_seq") else {
        return Ok(None);
    };
    match raw.parse::<u64>() {
        Ok(0) if digits(raw) => Ok(None),
        Ok(min_seq) if digits(raw) => Ok(Some(Bound {
            min_seq,
            wait: Duration::from_millis(wait),
        })),
        _ => Err(bad(
            "min_seq must be a READINGS stream sequence (an integer ≥ 0)",
        )),
    }
}

fn view_positions(p: &Positions) -> BTreeMap<u32, ViewPosition> {
    p.iter()
        .map(|(&q, v)| {
            (
                q,
                ViewPosition {
                    position: v.position,
                    source: v.source,
                },
            )
        })
        .collect()
}

/// An aggregate answer's positions: the low watermark and each partition's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    /// The least position over every partition.
    pub low: u64,
    /// Each partition's position (of the current deltas stream; another stream's counts 0).
    pub positions: BTreeMap<String, u64>,
}

impl ApiState {
    /// The watermark of `p`. With NATS the deltas stream says how many partitions there are
    /// and which stream is current; without (a test's state) only the partitions `p` holds
    /// count.
    pub(crate) async fn watermark(&self, p: &Positions) -> Watermark {
        let log = match &self.consistency {
            Some(c) => match c.change_log().await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "deltas stream not read; watermark from the views alone");
                    None
                }
            },
            None => None,
        };
        let (low, positions) = match log {
            Some((source, partitions)) => {
                let v = view_positions(p);
                let low = kappa_runtime::consistency::low_watermark(&v, partitions, source);
                let positions = (0..partitions)
                    .map(|q| {
                        let at = v
                            .get(&q)
                            .filter(|x| x.source == source)
                            .map_or(0, |x| x.position);
                        (q.to_string(), at)
                    })
                    .collect();
                (low, positions)
            }
            None => (
                p.values().map(|x| x.position).min().unwrap_or(0),
                p.iter().map(|(q, x)| (q.to_string(), x.position)).collect(),
            ),
        };
        Watermark { low, positions }
    }

    /// Reads with `read` until the answer reflects `bound` for `scope` (at once without a
    /// bound). `read` returns the answer and where the views stood when it was read.
    pub(crate) async fn read_bounded<T, F, Fut>(
        &self,
        bound: Option<Bound>,
        scope: Scope<'_>,
        read: F,
    ) -> Result<(T, Positions), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(T, Positions), ApiError>>,
    {
        let Some(bound) = bound else {
            return read().await;
        };
        let Some(consistency) = &self.consistency else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "min_seq needs NATS, which this instance does not use",
            ));
        };
        let started = Instant::now();
        // The request timeout answers first otherwise, and says less.
        let wait = bound.wait.min(
            self.limits
                .request_timeout
                .saturating_sub(Duration::from_millis(100)),
        );
        let mut pause = FIRST_PAUSE;
        let mut pending = kappa_runtime::consistency::Pending::default();
        loop {
            let (answer, positions) = read().await?;
            let verdict = consistency
                .check(
                    bound.min_seq,
                    scope,
                    &view_positions(&positions),
                    &mut pending,
                )
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "read-your-writes check failed");
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the bound min_seq={} cannot be checked: {e}", bound.min_seq),
                    )
                })?;
            match verdict {
                Verdict::Reached => {
                    metrics::histogram!("kappa_query_min_seq_wait_seconds")
                        .record(started.elapsed().as_secs_f64());
                    return Ok((answer, positions));
                }
                Verdict::Behind {
                    stage: Stage::Input,
                    position,
                    ..
                } => {
                    // No reading has this sequence yet: the client's bound is not one an ack
                    // gave (the leader that acked it answers the stream's state), or it refers
                    // to a stream since replaced. Waiting would not help.
                    metrics::counter!("kappa_query_refused_total", "reason" => "min_seq_beyond")
                        .increment(1);
                    return Err(not_reached(bound, Stage::Input, 0, position));
                }
                Verdict::Behind {
                    stage,
                    partition,
                    position,
                } => {
                    if started.elapsed() + pause > wait {
                        metrics::counter!("kappa_query_refused_total", "reason" => "min_seq")
                            .increment(1);
                        return Err(not_reached(bound, stage, partition, position));
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

impl ApiState {
    /// A list read (every entity) under `bound`, with the watermark of the positions the
    /// answer `positions` names.
    pub(crate) async fn read_list<T, F, Fut>(
        &self,
        bound: Option<Bound>,
        read: F,
        positions: fn(&T) -> &Positions,
    ) -> Result<(T, Watermark), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, crate::reader::ReadError>>,
    {
        let (answer, at) = self
            .read_bounded(bound, Scope::All, || async {
                let t = read().await.map_err(ApiError::unavailable)?;
                let p = positions(&t).clone();
                Ok((t, p))
            })
            .await?;
        let w = self.watermark(&at).await;
        Ok((answer, w))
    }
}

fn not_reached(bound: Bound, stage: Stage, partition: u32, position: u64) -> ApiError {
    let (status, message) = match stage {
        Stage::Input => (
            StatusCode::CONFLICT,
            format!(
                "min_seq={} is beyond the readings stream, which ends at {position}",
                bound.min_seq
            ),
        ),
        Stage::Decided | Stage::Applied => {
            let what = if stage == Stage::Decided {
                format!(
                    "temperature-delta has decided partition {partition} of the readings up to {position}"
                )
            } else {
                format!(
                    "the views have applied partition {partition} of the deltas up to {position}"
                )
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not up to min_seq={} within {} ms: {what}",
                    bound.min_seq,
                    bound.wait.as_millis()
                ),
            )
        }
    };
    let mut e = ApiError::new(status, message);
    e.bound = Some(crate::BoundDetail {
        min_seq: bound.min_seq,
        stage,
        partition,
        position,
    });
    e
}

/// The read-your-writes checker of the reference DAG's views: readings decided by
/// temperature-delta into deltas.
pub fn checker(js: async_nats::jetstream::Context) -> Consistency {
    use thermo_domain::{streams, subjects};
    Consistency::new(
        js,
        "temperature-delta",
        (streams::READINGS, subjects::READINGS_PREFIX),
        (streams::DELTAS, subjects::DELTAS_PREFIX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bounds_parse() {
        assert_eq!(parse_bound(&q(&[])), Ok(None));
        assert_eq!(parse_bound(&q(&[("min_seq", "0")])), Ok(None));
        assert_eq!(
            parse_bound(&q(&[("min_seq", "42")])),
            Ok(Some(Bound {
                min_seq: 42,
                wait: Duration::from_millis(DEFAULT_WAIT_MS)
            }))
        );
        assert_eq!(
            parse_bound(&q(&[("min_seq", "42"), ("max_wait_ms", "0")])).map(|b| b.map(|b| b.wait)),
            Ok(Some(Duration::ZERO))
        );
        for bad in ["-1", "+1", "x", "", "1.0", "18446744073709551616"] {
            assert!(parse_bound(&q(&[("min_seq", bad)])).is_err(), "{bad}");
        }
        for bad in ["-1", "60001", "x", ""] {
            assert!(
                parse_bound(&q(&[("min_seq", "1"), ("max_wait_ms", bad)])).is_err(),
                "{bad}"
            );
        }
    }
}
