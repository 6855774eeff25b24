//! The wire contract in kappa-runtime's types (feature `runtime`): what a service declares and
//! observes. Pure constructors of plain data; declaring and reading is the services' business.
//!
//! kappa-runtime does not depend on this crate, so the dependency only goes one way.

use std::time::Duration;

use kappa_runtime::nats::ChangeStream;
use kappa_runtime::observed::{ObservedSource, Versioned};
use kappa_runtime::partition::PartitionedStream;

use crate::{ObservedSensor, streams, subjects};

impl Versioned for ObservedSensor {
    fn version(&self) -> u64 {
        self.0.version
    }
}

/// `READINGS`, partitioned by sensor: producers publish `thermo.readings.<id>`, the stream
/// stores `thermo.readings.<p>.<id>`. `partitions` applies only when the stream is created.
pub fn readings_stream(partitions: u32) -> PartitionedStream {
    PartitionedStream {
        stream: streams::READINGS.into(),
        prefix: subjects::READINGS_PREFIX.into(),
        partitions,
    }
}

/// `DELTAS`, temperature-delta's state changes, partitioned by sensor like `READINGS`.
pub fn deltas_stream(partitions: u32) -> PartitionedStream {
    PartitionedStream {
        stream: streams::DELTAS.into(),
        prefix: subjects::DELTAS_PREFIX.into(),
        partitions,
    }
}

/// `SENSORS`, sensor-registry's change stream (every change kept, last per sensor readable).
pub fn sensors_stream() -> ChangeStream {
    ChangeStream {
        stream: streams::SENSORS.into(),
        prefix: subjects::SENSORS_PREFIX.into(),
    }
}

/// Where observers find the registry: its change stream and its lookup subjects.
pub fn registry_source(request_timeout: Duration) -> ObservedSource {
    ObservedSource {
        stream: streams::SENSORS.into(),
        change_prefix: subjects::SENSORS_PREFIX.into(),
        request_prefix: subjects::REGISTRY_GET_PREFIX.into(),
        batch_subject: Some(subjects::REGISTRY_LOOKUP.into()),
        request_timeout,
        attempts: 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_follow_the_subjects() {
        let r = readings_stream(4).stream_config();
        assert_eq!(
            (r.name.as_str(), r.subjects),
            ("READINGS", vec!["thermo.readings.*".to_string()])
        );
        let d = deltas_stream(4).stream_config();
        assert_eq!(d.subjects, vec!["thermo.deltas.*".to_string()]);
        let s = sensors_stream().stream_config();
        assert_eq!(
            (s.name.as_str(), s.subjects, s.allow_direct),
            ("SENSORS", vec!["registry.sensors.*".to_string()], true)
        );
        assert_eq!(registry_source(Duration::from_secs(1)).stream, "SENSORS");
    }
}
