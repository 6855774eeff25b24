//! temperature-delta: the reference domain kappa service. It owns each sensor's window of
//! recent readings ([`thermo_domain::DeltaWindow`]); its compute, [`TemperatureDelta`], decides
//! one delta (or a rejection) per reading, and folds each delta back into the window. Everything
//! else (partitions, ownership, the working-state option, the change log `DELTAS`, dead
//! letters, recovery, health, metrics, draining) is `kappa-runtime`'s.

use std::net::SocketAddr;
use std::time::Duration;

use kappa_runtime::compute::{Compute, Context, Decision, Lookup, Rejection};
use kappa_runtime::config::Settings;
use kappa_runtime::service::DomainService;
use kappa_runtime::shutdown::CancellationToken;
use thermo_domain::{
    Delta, DeltaWindow, ObservedSensor, RejectReason, Sample, ValidReading, parse_reading,
};
use thermo_domain::{streams, subjects};

/// The service's name (consumers, leases, dead letters, working-state namespace).
pub const SERVICE: &str = "temperature-delta";
/// Schema of deltas published by this version (`Kappa-Schema` header).
pub const DELTA_SCHEMA: &str = "thermo.delta/1";

/// Flags and environment: the runtime's shared settings plus the health listener.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Settings every domain kappa service shares.
    #[command(flatten)]
    pub kappa: Settings,
    /// Health and metrics listener.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9103",
          value_parser = kappa_runtime::config::parse_listen_addr)]
    pub http_addr: SocketAddr,
}

fn rejection(r: &RejectReason) -> Rejection {
    let out = Rejection::new(r.code());
    match r.detail() {
        Some(d) => out.with_detail(d),
        None => out,
    }
}

/// The compute: a reading and its sensor's window and registry entry in, a delta out.
#[derive(Debug, Clone, Copy, Default)]
pub struct TemperatureDelta;

impl Compute for TemperatureDelta {
    type Input = ValidReading;
    type State = DeltaWindow;
    type Change = Delta;
    type Reference = ObservedSensor;
    const CHANGE_SCHEMA: &'static str = DELTA_SCHEMA;

    fn decode(&self, ctx: &Context<'_>, payload: &[u8]) -> Result<ValidReading, Rejection> {
        parse_reading(payload, Some(ctx.key)).map_err(|r| rejection(&r))
    }

    fn decide(
        &self,
        ctx: &Context<'_>,
        window: &DeltaWindow,
        reading: ValidReading,
        sensor: Lookup<'_, ObservedSensor>,
    ) -> Decision<Delta> {
        let sensor = match sensor {
            Lookup::Found(s) => &s.0,
            Lookup::Unknown | Lookup::NotObserved => {
                return rejection(&RejectReason::UnknownSensor).into();
            }
            Lookup::Unavailable(_) => return rejection(&RejectReason::RegistryUnavailable).into(),
        };
        let at_ns = i64::try_from(reading.measured_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        let calibrated = reading.celsius + sensor.calibration_offset;
        let sample = Sample {
            at_ns,
            celsius: calibrated,
            seq: ctx.seq,
        };
        let Some(stats) = window.preview(sample, sensor.window_secs) else {
            return rejection(&RejectReason::Late).into();
        };
        Decision::emit(Delta {
            sensor_id: reading.sensor_id,
            site: sensor.site.clone(),
            delta_celsius: stats.delta,
            oldest_celsius: stats.oldest,
            latest_celsius: stats.latest,
            min_celsius: stats.min,
            max_celsius: stats.max,
            samples: stats.samples,
            window_secs: sensor.window_secs,
            measured_at: reading.measured_at,
            window_end: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                stats.window_end_ns,
            ))
            .unwrap_or(reading.measured_at),
            reading_celsius: calibrated,
            calibration_offset: sensor.calibration_offset,
            sensor_version: sensor.version,
            source_seq: ctx.seq,
        })
    }

    fn evolve(&self, window: &mut DeltaWindow, delta: &Delta) {
        let at_ns = i64::try_from(delta.measured_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        let sample = Sample {
            at_ns,
            celsius: delta.reading_celsius,
            seq: delta.source_seq,
        };
        window.fold(sample, delta.window_secs);
    }
}

/// Runs the service until `shutdown` is cancelled, then drains.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    DomainService::new(SERVICE, TemperatureDelta, cfg.kappa)
        .input(streams::READINGS, subjects::READINGS_PREFIX)
        .changes(streams::DELTAS, subjects::DELTAS_PREFIX)
        .observe(thermo_domain::runtime::registry_source(
            Duration::from_secs(1),
        ))
        .declare(thermo_domain::runtime::sensors_stream().stream_config())
        .http(cfg.http_addr)
        .run(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use thermo_domain::Sensor;

    fn sensor(offset: f64, window_secs: u32) -> ObservedSensor {
        ObservedSensor(Sensor {
            sensor_id: "s-1".into(),
            site: "lab".into(),
            calibration_offset: offset,
            window_secs,
            version: 3,
        })
    }

    fn ctx(seq: u64) -> Context<'static> {
        Context {
            key: "s-1",
            seq,
            partition: 0,
            subject: "thermo.readings.s-1",
            published: time::OffsetDateTime::UNIX_EPOCH,
            headers: None,
        }
    }

    fn reading(secs: i64, celsius: f64) -> Vec<u8> {
        let at = time::OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs)
            .expect("valid time")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formattable");
        format!(r#"{{"sensor_id":"s-1","celsius":{celsius},"measured_at":"{at}"}}"#).into_bytes()
    }

    /// Decides `(secs, celsius)` readings in order and folds every delta, as the runtime does.
    fn run_compute(
        readings: &[(i64, f64)],
        s: &ObservedSensor,
    ) -> (DeltaWindow, Vec<Decision<Delta>>) {
        let c = TemperatureDelta;
        let mut window = DeltaWindow::new();
        let mut out = Vec::new();
        for (i, (secs, celsius)) in readings.iter().enumerate() {
            let cx = ctx(i as u64 + 1);
            let decision = match c.decode(&cx, &reading(*secs, *celsius)) {
                Err(r) => Decision::Reject(r),
                Ok(input) => c.decide(&cx, &window, input, Lookup::Found(s)),
            };
            if let Decision::Emit(d) = &decision {
                c.evolve(&mut window, d);
            }
            out.push(decision);
        }
        (window, out)
    }

    #[test]
    fn deltas_are_calibrated_changes_over_the_window_and_late_readings_are_rejected() {
        let s = sensor(0.5, 600);
        let (window, out) = run_compute(&[(0, 20.0), (300, 21.0), (850, 25.0), (100, 1.0)], &s);
        let deltas: Vec<&Delta> = out
            .iter()
            .filter_map(|d| match d {
                Decision::Emit(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(deltas.len(), 3);
        assert_eq!(deltas[0].delta_celsius, 0.0);
        assert_eq!(deltas[1].delta_celsius, 1.0);
        assert_eq!(deltas[1].latest_celsius, 21.5);
        // At 850 s the reading at 0 s left the 600 s window; 300 s is the oldest.
        assert_eq!(deltas[2].delta_celsius, 4.0);
        assert_eq!(deltas[2].samples, 2);
        assert_eq!(deltas[2].sensor_version, 3);
        assert_eq!(deltas[2].source_seq, 3);
        assert_eq!(out[3], Decision::Reject(Rejection::new("late")));
        assert_eq!(window.len(), 2);
    }

    #[test]
    fn evolving_the_deltas_rebuilds_the_window() {
        // What the runtime does after a crash or a lost store: fold the change log.
        let s = sensor(-1.0, 60);
        let readings: Vec<(i64, f64)> = (0..200)
            .map(|i| ((i * 7) % 97, f64::from(i as i32)))
            .collect();
        let (window, out) = run_compute(&readings, &s);
        let mut rebuilt = DeltaWindow::new();
        for d in &out {
            if let Decision::Emit(d) = d {
                TemperatureDelta.evolve(&mut rebuilt, d);
            }
        }
        assert_eq!(rebuilt, window);
    }

    #[test]
    fn unknown_and_unreachable_sensors_and_bad_input_are_rejected() {
        let c = TemperatureDelta;
        let w = DeltaWindow::new();
        let input = || c.decode(&ctx(1), &reading(0, 1.0)).expect("valid");
        let reason = |d: Decision<Delta>| match d {
            Decision::Reject(r) => r.reason.to_string(),
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(
            reason(c.decide(&ctx(1), &w, input(), Lookup::Unknown)),
            "unknown_sensor"
        );
        assert_eq!(
            reason(c.decide(&ctx(1), &w, input(), Lookup::Unavailable("timed out"))),
            "registry_unavailable"
        );
        assert_eq!(
            c.decode(&ctx(1), b"{nope")
                .map_err(|r| r.reason.to_string())
                .err()
                .as_deref(),
            Some("malformed")
        );
    }
}
