//! The views' data, and the pure part of building them: validating a delta, folding a batch
//! into one update per sensor, choosing the newest sensor metadata and composing the JSON a
//! client sees. No I/O here.

use serde::{Deserialize, Serialize};
use thermo_domain::{Delta, Sensor};

/// Sensor metadata shown in a view: the registry's, or (until the registry's is known) the one
/// the delta was computed with. The highest `version` wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorMeta {
    /// The sensor's site; decides the site view the sensor is ranked in.
    pub site: String,
    /// Calibration offset.
    pub calibration_offset: f64,
    /// Window length in seconds.
    pub window_secs: u32,
    /// Registry version.
    pub version: u64,
}

impl SensorMeta {
    /// The metadata a delta was computed with.
    pub fn from_delta(d: &Delta) -> Self {
        Self {
            site: d.site.clone(),
            calibration_offset: d.calibration_offset,
            window_secs: d.window_secs,
            version: d.sensor_version,
        }
    }

    /// The registry's metadata.
    pub fn from_sensor(s: &Sensor) -> Self {
        Self {
            site: s.site.clone(),
            calibration_offset: s.calibration_offset,
            window_secs: s.window_secs,
            version: s.version,
        }
    }

    /// The newer of two (the registry's on a tie, passed as `b`).
    pub fn newest(a: Self, b: Option<Self>) -> Self {
        match b {
            Some(b) if b.version >= a.version => b,
            _ => a,
        }
    }
}

/// A sensor's view as query-api serves it and as `thermo.views.sensor.<id>` carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorView {
    /// The sensor.
    pub sensor_id: String,
    /// Its site (from the newest metadata).
    pub site: String,
    /// `latest_celsius - oldest_celsius` of the latest delta.
    pub delta_celsius: f64,
    /// Newest value in the window.
    pub latest_celsius: f64,
    /// Oldest value in the window.
    pub oldest_celsius: f64,
    /// Smallest value in the window.
    pub min_celsius: f64,
    /// Largest value in the window.
    pub max_celsius: f64,
    /// Readings in the window.
    pub samples: u32,
    /// Window length the delta used.
    pub window_secs: u32,
    /// Window end `T`.
    #[serde(with = "time::serde::rfc3339")]
    pub window_end: time::OffsetDateTime,
    /// Event time of the reading behind the latest delta.
    #[serde(with = "time::serde::rfc3339")]
    pub measured_at: time::OffsetDateTime,
    /// Calibration offset the delta used.
    pub calibration_offset: f64,
    /// Registry version the delta used.
    pub sensor_version: u64,
    /// Readings-stream sequence of the reading behind the latest delta.
    pub source_seq: u64,
    /// Deltas-stream sequence of the latest delta (what this view reflects).
    pub view_seq: u64,
    /// The newest sensor metadata known.
    pub sensor: SensorMeta,
}

/// Composes a view from its stored parts.
pub fn compose(delta: &Delta, view_seq: u64, meta: SensorMeta) -> SensorView {
    SensorView {
        sensor_id: delta.sensor_id.clone(),
        site: meta.site.clone(),
        delta_celsius: delta.delta_celsius,
        latest_celsius: delta.latest_celsius,
        oldest_celsius: delta.oldest_celsius,
        min_celsius: delta.min_celsius,
        max_celsius: delta.max_celsius,
        samples: delta.samples,
        window_secs: delta.window_secs,
        window_end: delta.window_end,
        measured_at: delta.measured_at,
        calibration_offset: delta.calibration_offset,
        sensor_version: delta.sensor_version,
        source_seq: delta.source_seq,
        view_seq,
        sensor: meta,
    }
}

/// One point of a sensor's history (the sparkline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The delta.
    pub delta_celsius: f64,
    /// Newest value in the window.
    pub latest_celsius: f64,
    /// Window end.
    #[serde(with = "time::serde::rfc3339")]
    pub window_end: time::OffsetDateTime,
    /// Readings-stream sequence.
    pub source_seq: u64,
    /// Deltas-stream sequence.
    pub view_seq: u64,
}

impl HistoryEntry {
    /// The history point of a delta stored at `view_seq`.
    pub fn of(d: &Delta, view_seq: u64) -> Self {
        Self {
            delta_celsius: d.delta_celsius,
            latest_celsius: d.latest_celsius,
            window_end: d.window_end,
            source_seq: d.source_seq,
            view_seq,
        }
    }
}

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

/// The ranking score of a delta: `-|delta|`, so ascending order is |delta| descending and ties
/// fall back to the member (sensor id) ascending.
pub fn rank_score(delta_celsius: f64) -> f64 {
    -delta_celsius.abs()
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
    fn newest_meta_wins_and_registry_wins_ties() {
        let d = delta("a", 1.0, 1);
        let from_delta = SensorMeta::from_delta(&d);
        let mut reg = from_delta.clone();
        reg.site = "roof".into();
        assert_eq!(
            SensorMeta::newest(from_delta.clone(), Some(reg.clone())).site,
            "roof"
        );
        reg.version = 0;
        assert_eq!(
            SensorMeta::newest(from_delta.clone(), Some(reg)).site,
            "lab"
        );
        assert_eq!(SensorMeta::newest(from_delta, None).site, "lab");
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

    #[test]
    fn view_has_the_contract_fields() {
        let d = delta("s-1", -2.5, 9);
        let v = compose(&d, 42, SensorMeta::from_delta(&d));
        let j = serde_json::to_value(&v).expect("json");
        for f in [
            "sensor_id",
            "site",
            "delta_celsius",
            "latest_celsius",
            "oldest_celsius",
            "min_celsius",
            "max_celsius",
            "samples",
            "window_end",
            "source_seq",
            "view_seq",
        ] {
            assert!(j.get(f).is_some(), "missing {f}");
        }
        assert_eq!(j["view_seq"], 42);
        assert_eq!(j["window_end"], "2026-11-24T17:00:00Z");
        assert_eq!(rank_score(-2.5), -2.5);
        assert_eq!(rank_score(2.5), -2.5);
    }
}
