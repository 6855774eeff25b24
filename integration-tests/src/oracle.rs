//! An independent oracle: recomputes, from the readings stream alone, what every reading must
//! yield (a delta with given values, or a dead letter with a reason). Deliberately simple and
//! separate from the service's code path: it keeps every accepted reading and refilters the
//! whole window each time.

use std::collections::HashMap;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Stored;

/// Registry facts the oracle needs about a sensor.
#[derive(Debug, Clone)]
pub struct SensorInfo {
    /// Site.
    pub site: String,
    /// Calibration offset.
    pub offset: f64,
    /// Window in seconds.
    pub window_secs: u32,
}

/// What a reading must yield.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// A delta with these values.
    Delta {
        /// Sensor.
        sensor_id: String,
        /// latest - oldest.
        delta: f64,
        /// Oldest value.
        oldest: f64,
        /// Latest value.
        latest: f64,
        /// Min.
        min: f64,
        /// Max.
        max: f64,
        /// Samples.
        samples: u32,
        /// Window end (ns).
        window_end_ns: i128,
    },
    /// A dead letter with this reason.
    Rejected(String),
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Computes the expected outcome of every reading, by readings-stream sequence.
pub fn expected(
    readings: &[Stored],
    sensors: &HashMap<String, SensorInfo>,
) -> HashMap<u64, Expected> {
    // Per sensor: accepted (event ns, seq, calibrated value), and T.
    type Accepted = (Vec<(i128, u64, f64)>, Option<i128>);
    let mut accepted: HashMap<String, Accepted> = HashMap::new();
    let mut out = HashMap::new();
    for r in readings {
        let subject_id = r.subject.rsplit('.').next().unwrap_or_default();
        let reject = |why: &str| Expected::Rejected(why.to_string());
        if r.payload.len() > 4096 {
            out.insert(r.seq, reject("oversized"));
            continue;
        }
        let v = match serde_json::from_slice::<serde_json::Value>(&r.payload) {
            Ok(v) => v,
            Err(e) if e.to_string().starts_with("number out of range") => {
                out.insert(r.seq, reject("out_of_bounds"));
                continue;
            }
            Err(_) => {
                out.insert(r.seq, reject("malformed"));
                continue;
            }
        };
        let (Some(id), Some(c), Some(at)) = (
            v.get("sensor_id").and_then(|x| x.as_str()),
            v.get("celsius").and_then(|x| x.as_f64()),
            v.get("measured_at").and_then(|x| x.as_str()),
        ) else {
            out.insert(r.seq, reject("malformed"));
            continue;
        };
        let Ok(at) = OffsetDateTime::parse(at, &Rfc3339) else {
            out.insert(r.seq, reject("malformed"));
            continue;
        };
        if !valid_id(id) || id != subject_id {
            out.insert(r.seq, reject("invalid_sensor_id"));
            continue;
        }
        if !c.is_finite() || !(-273.15..=1000.0).contains(&c) {
            out.insert(r.seq, reject("out_of_bounds"));
            continue;
        }
        let Some(info) = sensors.get(id) else {
            out.insert(r.seq, reject("unknown_sensor"));
            continue;
        };
        let w = i128::from(info.window_secs) * 1_000_000_000;
        let at = at.unix_timestamp_nanos();
        let (list, t) = accepted.entry(id.to_string()).or_default();
        if let Some(t) = *t
            && at <= t - w
        {
            out.insert(r.seq, reject("late"));
            continue;
        }
        list.push((at, r.seq, c + info.offset));
        let new_t = t.map_or(at, |t| t.max(at));
        *t = Some(new_t);
        list.retain(|(a, _, _)| *a > new_t - w);
        let mut window = list.clone();
        window.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let oldest = window.first().map_or(0.0, |x| x.2);
        let latest = window.last().map_or(0.0, |x| x.2);
        out.insert(
            r.seq,
            Expected::Delta {
                sensor_id: id.to_string(),
                delta: latest - oldest,
                oldest,
                latest,
                min: window.iter().map(|x| x.2).fold(f64::INFINITY, f64::min),
                max: window.iter().map(|x| x.2).fold(f64::NEG_INFINITY, f64::max),
                samples: u32::try_from(window.len()).unwrap_or(u32::MAX),
                window_end_ns: new_t,
            },
        );
    }
    out
}

/// Checks a stored delta against the oracle; returns a description of any difference.
pub fn check_delta(d: &serde_json::Value, exp: &Expected) -> Result<(), String> {
    let Expected::Delta {
        sensor_id,
        delta,
        oldest,
        latest,
        min,
        max,
        samples,
        window_end_ns,
    } = exp
    else {
        return Err(format!("expected {exp:?}, got a delta {d}"));
    };
    let close = |k: &str, want: f64| {
        let got = d[k].as_f64().unwrap_or(f64::NAN);
        if (got - want).abs() > 1e-9 {
            Err(format!("{k}: got {got}, want {want} in {d}"))
        } else {
            Ok(())
        }
    };
    if d["sensor_id"] != sensor_id.as_str() {
        return Err(format!("sensor_id differs: {d}"));
    }
    close("delta_celsius", *delta)?;
    close("oldest_celsius", *oldest)?;
    close("latest_celsius", *latest)?;
    close("min_celsius", *min)?;
    close("max_celsius", *max)?;
    if d["samples"].as_u64() != Some(u64::from(*samples)) {
        return Err(format!("samples: want {samples} in {d}"));
    }
    let end = d["window_end"]
        .as_str()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
        .map(|t| t.unix_timestamp_nanos());
    if end != Some(*window_end_ns) {
        return Err(format!("window_end: want {window_end_ns} ns in {d}"));
    }
    Ok(())
}
