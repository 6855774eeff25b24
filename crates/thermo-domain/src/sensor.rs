//! Sensor metadata owned by sensor-registry: the entity, the upsert command and its reply.

use serde::{Deserialize, Serialize};

/// Window length used when a sensor does not set one.
pub const DEFAULT_WINDOW_SECS: u32 = 600;
/// Longest window a sensor may ask for (one day).
pub const MAX_WINDOW_SECS: u32 = 86_400;
/// Largest calibration offset accepted, in degrees.
pub const MAX_CALIBRATION_OFFSET: f64 = 50.0;

fn default_window() -> u32 {
    DEFAULT_WINDOW_SECS
}

/// A sensor as the registry publishes it on `registry.sensors.<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensor {
    /// Id, `[A-Za-z0-9_-]{1,64}`.
    pub sensor_id: String,
    /// Site the sensor belongs to.
    pub site: String,
    /// Added to every raw reading.
    #[serde(default)]
    pub calibration_offset: f64,
    /// Window length in seconds.
    #[serde(default = "default_window")]
    pub window_secs: u32,
    /// Version, 1 for the first registration, +1 per change.
    pub version: u64,
}

/// The `registry.cmd.upsert` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorUpsert {
    /// Id of the sensor to create or change.
    pub sensor_id: String,
    /// Its site.
    pub site: String,
    /// Calibration offset (default 0).
    #[serde(default)]
    pub calibration_offset: f64,
    /// Window (default 600 s).
    #[serde(default = "default_window")]
    pub window_secs: u32,
    /// Optimistic concurrency: the version the caller last saw (0 = must not exist yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
}

impl SensorUpsert {
    /// Checks the command's fields; the error is the reply's `error`.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::valid_sensor_id(&self.sensor_id) {
            return Err("sensor_id must match [A-Za-z0-9_-]{1,64}".into());
        }
        if self.site.is_empty() || self.site.len() > 64 || !crate::valid_sensor_id(&self.site) {
            return Err("site must match [A-Za-z0-9_-]{1,64}".into());
        }
        if !self.calibration_offset.is_finite()
            || self.calibration_offset.abs() > MAX_CALIBRATION_OFFSET
        {
            return Err(format!(
                "calibration_offset must be finite and within ±{MAX_CALIBRATION_OFFSET}"
            ));
        }
        if self.window_secs == 0 || self.window_secs > MAX_WINDOW_SECS {
            return Err(format!("window_secs must be in 1..={MAX_WINDOW_SECS}"));
        }
        Ok(())
    }
}

/// Reply to an upsert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpsertReply {
    /// Whether the change was applied.
    pub ok: bool,
    /// The sensor's version after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A sensor as other services observe it (the registry's observable state). With the `runtime`
/// feature it is [`kappa_runtime::observed::Versioned`], usable with any observed-state option.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct ObservedSensor(pub Sensor);
