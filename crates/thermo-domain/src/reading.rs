//! A reading as any producer sends it, and its validation into a [`ValidReading`] or a
//! [`RejectReason`] that names why it was dead-lettered.

use serde::Deserialize;
use time::OffsetDateTime;

/// Lowest raw temperature accepted (absolute zero).
pub const MIN_CELSIUS: f64 = -273.15;
/// Highest raw temperature accepted. Documented bound: no sensor of this system reads above it.
pub const MAX_CELSIUS: f64 = 1_000.0;
/// Largest payload accepted, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 4 * 1024;

/// A reading on the wire: `{"sensor_id", "celsius", "measured_at", "seq"?}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct Reading {
    /// The sensor's id, `[A-Za-z0-9_-]{1,64}`.
    pub sensor_id: String,
    /// The raw (uncalibrated) value.
    pub celsius: f64,
    /// Event time, RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub measured_at: OffsetDateTime,
    /// The device's own counter, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// A reading that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidReading {
    /// The sensor id.
    pub sensor_id: String,
    /// Raw value, finite and within bounds.
    pub celsius: f64,
    /// Event time.
    pub measured_at: OffsetDateTime,
}

/// Why an input was rejected; the value of the `Kappa-Reason` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Larger than [`MAX_PAYLOAD_BYTES`].
    #[error("oversized")]
    Oversized,
    /// Not JSON, or not the reading schema (missing fields, wrong types, bad timestamp).
    #[error("malformed")]
    Malformed(String),
    /// `sensor_id` does not match `[A-Za-z0-9_-]{1,64}`, or differs from the subject's.
    #[error("invalid_sensor_id")]
    InvalidSensorId,
    /// `celsius` is not finite or outside the physical bounds.
    #[error("out_of_bounds")]
    OutOfBounds,
    /// The registry does not know the sensor.
    #[error("unknown_sensor")]
    UnknownSensor,
    /// The reading's event time is at or before `T - window`.
    #[error("late")]
    Late,
    /// The registry could not be asked (after retries).
    #[error("registry_unavailable")]
    RegistryUnavailable,
}

impl RejectReason {
    /// The short machine-readable reason (header value and metric label).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::Malformed(_) => "malformed",
            Self::InvalidSensorId => "invalid_sensor_id",
            Self::OutOfBounds => "out_of_bounds",
            Self::UnknownSensor => "unknown_sensor",
            Self::Late => "late",
            Self::RegistryUnavailable => "registry_unavailable",
        }
    }

    /// A human-readable detail, if any.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Malformed(d) => Some(d),
            _ => None,
        }
    }
}

/// True if `id` matches `[A-Za-z0-9_-]{1,64}`.
pub fn valid_sensor_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Decodes and validates a reading payload. `subject_sensor` is the last token of the subject
/// it arrived on, when known; it must equal the payload's `sensor_id`.
pub fn parse_reading(
    payload: &[u8],
    subject_sensor: Option<&str>,
) -> Result<ValidReading, RejectReason> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(RejectReason::Oversized);
    }
    let reading: Reading = serde_json::from_slice(payload).map_err(|e| {
        // JSON has no NaN or infinity: a number too large for f64 is the non-finite case.
        if e.to_string().starts_with("number out of range") {
            RejectReason::OutOfBounds
        } else {
            RejectReason::Malformed(e.to_string())
        }
    })?;
    if !valid_sensor_id(&reading.sensor_id) {
        return Err(RejectReason::InvalidSensorId);
    }
    if let Some(s) = subject_sensor
        && s != reading.sensor_id
    {
        return Err(RejectReason::InvalidSensorId);
    }
    if !reading.celsius.is_finite()
        || reading.celsius < MIN_CELSIUS
        || reading.celsius > MAX_CELSIUS
    {
        return Err(RejectReason::OutOfBounds);
    }
    Ok(ValidReading {
        sensor_id: reading.sensor_id,
        celsius: reading.celsius,
        measured_at: reading.measured_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ValidReading, RejectReason> {
        parse_reading(s.as_bytes(), Some("s-1"))
    }

    #[test]
    fn accepts_a_good_reading() {
        let r = p(r#"{"sensor_id":"s-1","celsius":21.5,"measured_at":"2026-11-24T17:00:00.123Z"}"#);
        assert_eq!(r.map(|r| r.celsius), Ok(21.5));
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        assert!(matches!(p("{not json"), Err(RejectReason::Malformed(_))));
        assert!(matches!(
            p(r#"{"sensor_id":"s-1"}"#),
            Err(RejectReason::Malformed(_))
        ));
        assert!(matches!(
            p(r#"{"sensor_id":"s-1","celsius":"hot","measured_at":"2026-11-24T17:00:00Z"}"#),
            Err(RejectReason::Malformed(_))
        ));
        assert!(matches!(
            p(r#"{"sensor_id":"s-1","celsius":1,"measured_at":"yesterday"}"#),
            Err(RejectReason::Malformed(_))
        ));
        assert_eq!(
            p(r#"{"sensor_id":"s-1","celsius":1e6,"measured_at":"2026-11-24T17:00:00Z"}"#),
            Err(RejectReason::OutOfBounds)
        );
        assert_eq!(
            p(r#"{"sensor_id":"s-1","celsius":1e999,"measured_at":"2026-11-24T17:00:00Z"}"#),
            Err(RejectReason::OutOfBounds)
        );
        assert_eq!(
            p(r#"{"sensor_id":"s-1","celsius":-300,"measured_at":"2026-11-24T17:00:00Z"}"#),
            Err(RejectReason::OutOfBounds)
        );
        assert_eq!(
            parse_reading(
                br#"{"sensor_id":"bad id!","celsius":1,"measured_at":"2026-11-24T17:00:00Z"}"#,
                None
            ),
            Err(RejectReason::InvalidSensorId)
        );
        assert_eq!(
            p(r#"{"sensor_id":"s-2","celsius":1,"measured_at":"2026-11-24T17:00:00Z"}"#),
            Err(RejectReason::InvalidSensorId)
        );
        let big = format!(
            r#"{{"sensor_id":"s-1","pad":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD_BYTES)
        );
        assert_eq!(p(&big), Err(RejectReason::Oversized));
    }

    #[test]
    fn sensor_id_pattern() {
        assert!(valid_sensor_id("s-0001_A"));
        assert!(!valid_sensor_id(""));
        assert!(!valid_sensor_id(&"a".repeat(65)));
        assert!(!valid_sensor_id("a.b"));
        assert!(!valid_sensor_id("a*"));
    }
}
