//! The temperature example's domain and the wire contract between its services: what a
//! reading, a sensor and a delta are, how input is validated, the pure computation of a
//! sensor's window ([`DeltaWindow`]), and everything two services must agree on: stream names
//! ([`streams`]), subjects ([`subjects`]), payloads ([`Sensor`], [`ObservedSensor`], [`Delta`])
//! and the views' Redis layout and read protocol ([`views`]). No I/O here.
//!
//! Services depend on this crate, never on one another's. With the `runtime` feature,
//! `runtime` gives the same contract in kappa-runtime's plain-data types (the streams a
//! service declares, the registry as observed state).
//!
//! Everything in this crate is deterministic so the services, the tests' oracle and the
//! benchmarks can reason about it without a broker.

pub mod reading;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod sensor;
pub mod views;
pub mod window;

pub use reading::{Reading, RejectReason, ValidReading, parse_reading, valid_sensor_id};
pub use sensor::{ObservedSensor, Sensor, SensorUpsert, UpsertReply};
pub use window::{DeltaStats, DeltaWindow, Sample, WindowOutcome};

/// Subjects of the wire contract (DESIGN.md). Entity id last, lower case.
pub mod subjects {
    /// Prefix of readings: `thermo.readings.<sensor_id>`.
    pub const READINGS_PREFIX: &str = "thermo.readings";
    /// Prefix of deltas: `thermo.deltas.<sensor_id>`.
    pub const DELTAS_PREFIX: &str = "thermo.deltas";
    /// Prefix of view changes: `thermo.views.<view>.<key>`.
    pub const VIEWS_PREFIX: &str = "thermo.views";
    /// Prefix of sensor view changes (core NATS): `thermo.views.sensor.<sensor_id>`, payload
    /// [`crate::views::SensorView`].
    pub const SENSOR_VIEWS_PREFIX: &str = "thermo.views.sensor";
    /// Prefix of registry changes: `registry.sensors.<sensor_id>`.
    pub const SENSORS_PREFIX: &str = "registry.sensors";
    /// Request-reply subject for an upsert.
    pub const REGISTRY_UPSERT: &str = "registry.cmd.upsert";
    /// Prefix of request-reply lookups: `registry.get.<sensor_id>`.
    pub const REGISTRY_GET_PREFIX: &str = "registry.get";
    /// Request-reply subject for batched lookups: a JSON array of sensor ids, answered with a
    /// JSON array of one `registry.get.<id>` reply per id, in order.
    pub const REGISTRY_LOOKUP: &str = "registry.lookup";

    /// `thermo.readings.<id>`
    pub fn reading(sensor_id: &str) -> String {
        format!("{READINGS_PREFIX}.{sensor_id}")
    }
    /// `thermo.deltas.<id>`
    pub fn delta(sensor_id: &str) -> String {
        format!("{DELTAS_PREFIX}.{sensor_id}")
    }
    /// `registry.sensors.<id>`
    pub fn sensor(sensor_id: &str) -> String {
        format!("{SENSORS_PREFIX}.{sensor_id}")
    }
    /// `registry.get.<id>`
    pub fn registry_get(sensor_id: &str) -> String {
        format!("{REGISTRY_GET_PREFIX}.{sensor_id}")
    }
    /// `thermo.views.sensor.<id>`
    pub fn sensor_view(sensor_id: &str) -> String {
        format!("{SENSOR_VIEWS_PREFIX}.{sensor_id}")
    }
}

/// Stream names declared by the services (idempotently, at start). Their subjects are in
/// [`subjects`]; their configurations, with the `runtime` feature, in `runtime`.
pub mod streams {
    /// Readings from any producer.
    pub const READINGS: &str = "READINGS";
    /// temperature-delta's state changes.
    pub const DELTAS: &str = "DELTAS";
    /// sensor-registry's state changes.
    pub const SENSORS: &str = "SENSORS";
    /// view-builder's change feed.
    pub const VIEWS: &str = "VIEWS";
}

/// The delta event: temperature-delta's state change for one accepted reading.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Delta {
    /// The sensor.
    pub sensor_id: String,
    /// The sensor's site, from the registry.
    pub site: String,
    /// `latest_celsius - oldest_celsius`.
    pub delta_celsius: f64,
    /// Calibrated value at the smallest event time in the window.
    pub oldest_celsius: f64,
    /// Calibrated value at the largest event time in the window.
    pub latest_celsius: f64,
    /// Smallest calibrated value in the window.
    pub min_celsius: f64,
    /// Largest calibrated value in the window.
    pub max_celsius: f64,
    /// Number of readings in the window.
    pub samples: u32,
    /// The window length used.
    pub window_secs: u32,
    /// Event time of the reading that caused this delta.
    #[serde(with = "time::serde::rfc3339")]
    pub measured_at: time::OffsetDateTime,
    /// The window end `T`: the latest event time accepted for the sensor.
    #[serde(with = "time::serde::rfc3339")]
    pub window_end: time::OffsetDateTime,
    /// The reading's calibrated value.
    pub reading_celsius: f64,
    /// The calibration offset applied.
    pub calibration_offset: f64,
    /// The registry version of the sensor used.
    pub sensor_version: u64,
    /// Sequence of the reading in the readings stream.
    pub source_seq: u64,
}
