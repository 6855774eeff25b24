//! The pure part of building the views: validating a delta and folding a batch into one update
//! per sensor. The views' data (what a client sees) is the wire contract,
//! [`thermo_domain::views`], re-exported here. No I/O here.

use thermo_domain::Delta;
pub use thermo_domain::views::{HistoryEntry, SensorMeta, SensorView, compose, rank_score};

/// Why a message on the deltas stream cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Not a delta (bad JSON or missing fields).
    Malformed(String),
    /// A delta whose content is unusable (bad id, non-finite numbers, wrong subject).
    Invalid(String),
}

impl Rejected {
    /// The dead-letter reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Invalid(_) => "invalid",
        }
    }
    /// The detail.
    pub fn detail(&self) -> &str {
        match self {
            Self::Malformed(d) | Self::Invalid(d) => d,
        }
    }
}

/// Decodes and checks a delta stored under `subject_entity` (the subject's last token).
pub fn parse_delta(payload: &[u8], subject_entity: &str) -> Result<Delta, Rejected> {
    let d: Delta =
        serde_json::from_slice(payload).map_err(|e| Rejected::Malformed(e.to_string()))?;
    if !thermo_domain::valid_sensor_id(&d.sensor_id) {
        return Err(Rejected::Invalid(
            "sensor_id must match [A-Za-z0-9_-]{1,64}".into(),
        ));
    }
    if d.sensor_id != subject_entity {
        return Err(Rejected::Invalid(format!(
            "sensor_id '{}' does not match the subject's '{subject_entity}'",
            d.sensor_id
        )));
    }
    if !thermo_domain::valid_sensor_id(&d.site) {
        return Err(Rejected::Invalid(
            "site must match [A-Za-z0-9_-]{1,64}".into(),
        ));
    }
    let numbers = [
        d.delta_celsius,
        d.latest_celsius,
        d.oldest_celsius,
        d.min_celsius,
        d.max_celsius,
        d.reading_celsius,
        d.calibration_offset,
    ];
    if numbers.iter().any(|v| !v.is_finite()) {
        return Err(Rejected::Invalid("non-finite value".into()));
    }
    Ok(d)
}

/// What a batch changes for one sensor: its latest delta and its new history points.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorUpdate {
    /// The sensor's latest delta in the batch.
    pub delta: Delta,
    /// Its deltas-stream sequence.
    pub seq: u64,
    /// History points of the batch, oldest first, with their sequence (at most `history_len`).
    pub history: Vec<(u64, HistoryEntry)>,
}

/// Folds a batch of `(deltas-stream seq, delta)` (in stream order) into one update per sensor,
/// in order of first appearance. Only the last `history_len` points of a sensor are kept.
pub fn fold_batch(items: Vec<(u64, Delta)>, history_len: usize) -> Vec<SensorUpdate> {
    let mut order: Vec<SensorUpdate> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (seq, d) in items {
        let entry = HistoryEntry::of(&d, seq);
        match index.get(&d.sensor_id) {
            Some(&i) => {
                let u = &mut order[i];
                u.history.push((seq, entry));
                u.delta = d;
                u.seq = seq;
            }
            None => {
                index.insert(d.sensor_id.clone(), order.len());
                order.push(SensorUpdate {
                    delta: d,
                    seq,
                    history: vec![(seq, entry)],
                });
            }
        }
    }
    for u in &mut order {
        if u.history.len() > history_len {
            let cut = u.history.len() - history_len;
            u.history.drain(..cut);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn delta(id: &str, d: f64, source_seq: u64) -> Delta {
        let t = time::macros::datetime!(2026-11-24 17:00 UTC);
        Delta {
            sensor_id: id.into(),
            site: "lab".into(),
            delta_celsius: d,
            oldest_celsius: 20.0,
            latest_celsius: 20.0 + d,
            min_celsius: 20.0,
            max_celsius: 20.0 + d,
            samples: 2,
            window_secs: 600,
            measured_at: t,
            window_end: t,
            reading_celsius: 20.0 + d,
            calibration_offset: 0.0,
            sensor_version: 1,
            source_seq,
        }
    }

    #[test]
    fn fold_keeps_last_delta_and_bounded_history() {
        let items = vec![
            (10, delta("a", 1.0, 1)),
            (11, delta("b", 2.0, 2)),
            (12, delta("a", 3.0, 3)),
            (13, delta("a", 4.0, 4)),
        ];
        let ups = fold_batch(items, 2);
        assert_eq!(ups.len(), 2);
        assert_eq!(ups[0].delta.sensor_id, "a");
        assert_eq!(ups[0].seq, 13);
        assert_eq!(ups[0].delta.delta_celsius, 4.0);
        let seqs: Vec<u64> = ups[0].history.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![12, 13]);
        assert_eq!(ups[1].seq, 11);
        assert_eq!(ups[1].history.len(), 1);
    }

    #[test]
    fn parse_rejects_bad_deltas() {
        let good = serde_json::to_vec(&delta("s-1", 1.5, 7)).expect("json");
        assert!(parse_delta(&good, "s-1").is_ok());
        assert_eq!(
            parse_delta(&good, "s-2").map_err(|e| e.code()),
            Err("invalid")
        );
        assert_eq!(
            parse_delta(b"{nope", "s-1").map_err(|e| e.code()),
            Err("malformed")
        );
        let mut bad = delta("s 1", 1.0, 1);
        assert_eq!(
            parse_delta(&serde_json::to_vec(&bad).expect("json"), "s 1").map_err(|e| e.code()),
            Err("invalid")
        );
        bad.sensor_id = "s-1".into();
        let mut v = serde_json::to_value(&bad).expect("json");
        // serde_json writes non-finite numbers as null, which is malformed for an f64 field.
        v["delta_celsius"] = serde_json::Value::Null;
        assert!(parse_delta(&serde_json::to_vec(&v).expect("json"), "s-1").is_err());
    }
}
