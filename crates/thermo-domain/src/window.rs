//! [`DeltaWindow`]: one sensor's working state, the accepted readings whose event time lies in
//! `(T - window, T]`, and the pure function that folds a reading in and yields its delta.
//!
//! Ordering: samples are kept sorted by event time; equal event times are ordered by arrival
//! (the input stream sequence, which only grows). Idempotency: a reading whose input sequence
//! is not above the last one applied is reported as [`WindowOutcome::AlreadyApplied`] and
//! changes nothing.

use std::collections::VecDeque;

/// One accepted reading inside a window.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Event time, nanoseconds since the Unix epoch.
    pub at_ns: i64,
    /// Calibrated value.
    pub celsius: f64,
    /// Input stream sequence (arrival order).
    pub seq: u64,
}

/// The statistics of a window after a reading was folded in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeltaStats {
    /// `latest - oldest`.
    pub delta: f64,
    /// Value at the smallest event time.
    pub oldest: f64,
    /// Value at the largest event time.
    pub latest: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of samples.
    pub samples: u32,
    /// Window end `T`, ns since the epoch.
    pub window_end_ns: i64,
}

/// What folding a reading into a window did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WindowOutcome {
    /// Accepted: the window changed and this is its delta.
    Accepted(DeltaStats),
    /// At or before `T - window`: rejected, the window is unchanged.
    Late,
    /// The input sequence was applied before (a replay): nothing changed.
    AlreadyApplied,
}

/// A sensor's window of recent readings (serde: the runtime stores it in a compact binary form).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeltaWindow {
    samples: VecDeque<Sample>,
    /// Latest event time accepted (`T`), if any.
    latest_ns: Option<i64>,
    /// Highest input sequence applied (accepted or rejected as late).
    last_seq: u64,
}

const NS_PER_SEC: i64 = 1_000_000_000;

impl DeltaWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest input sequence applied.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when no sample is held.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The samples, oldest event time first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// What [`DeltaWindow::apply`] would yield for `sample`, without changing the window:
    /// `None` if the reading is late (at or before `T - window`), else the window's statistics
    /// with the sample folded in. (The sequence is not checked: the runtime decides each input
    /// once.) One pass over the window, no copy.
    pub fn preview(&self, sample: Sample, window_secs: u32) -> Option<DeltaStats> {
        let window_ns = i64::from(window_secs).saturating_mul(NS_PER_SEC);
        if let Some(t) = self.latest_ns
            && sample.at_ns <= t.saturating_sub(window_ns)
        {
            return None;
        }
        let t = self.latest_ns.map_or(sample.at_ns, |t| t.max(sample.at_ns));
        let floor = t.saturating_sub(window_ns);
        let (mut min, mut max) = (sample.celsius, sample.celsius);
        let mut kept = 1u32;
        // The oldest and latest existing samples that survive the eviction.
        let mut first: Option<&Sample> = None;
        let mut last: Option<&Sample> = None;
        for s in self.samples.iter().filter(|s| s.at_ns > floor) {
            min = min.min(s.celsius);
            max = max.max(s.celsius);
            kept = kept.saturating_add(1);
            first.get_or_insert(s);
            last = Some(s);
        }
        // The new sample goes after every sample with an event time <= its own.
        let oldest = match first {
            Some(f) if f.at_ns <= sample.at_ns => f.celsius,
            _ => sample.celsius,
        };
        let latest = match last {
            Some(l) if l.at_ns > sample.at_ns => l.celsius,
            _ => sample.celsius,
        };
        Some(DeltaStats {
            delta: latest - oldest,
            oldest,
            latest,
            min,
            max,
            samples: kept,
            window_end_ns: t,
        })
    }

    /// Folds in a calibrated reading. `window_secs` is the sensor's current window.
    pub fn apply(&mut self, sample: Sample, window_secs: u32) -> WindowOutcome {
        if sample.seq <= self.last_seq {
            return WindowOutcome::AlreadyApplied;
        }
        self.fold(sample, window_secs)
    }

    /// Folds in a calibrated reading whatever its sequence: the runtime folds each change
    /// exactly once, and input sequences start again when the input stream is replaced, so
    /// `apply`'s sequence check would drop a reading there. Ties keep arrival order.
    pub fn fold(&mut self, sample: Sample, window_secs: u32) -> WindowOutcome {
        let window_ns = i64::from(window_secs).saturating_mul(NS_PER_SEC);
        if let Some(t) = self.latest_ns
            && sample.at_ns <= t.saturating_sub(window_ns)
        {
            self.last_seq = sample.seq;
            return WindowOutcome::Late;
        }
        self.last_seq = sample.seq;
        // Insert after every sample with an event time <= this one (arrival order on ties).
        let idx = self.samples.partition_point(|s| s.at_ns <= sample.at_ns);
        self.samples.insert(idx, sample);
        let t = self.latest_ns.map_or(sample.at_ns, |t| t.max(sample.at_ns));
        self.latest_ns = Some(t);
        let floor = t.saturating_sub(window_ns);
        while self.samples.front().is_some_and(|s| s.at_ns <= floor) {
            self.samples.pop_front();
        }
        WindowOutcome::Accepted(self.stats(t))
    }

    fn stats(&self, t: i64) -> DeltaStats {
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for s in &self.samples {
            min = min.min(s.celsius);
            max = max.max(s.celsius);
        }
        let oldest = self.samples.front().map_or(0.0, |s| s.celsius);
        let latest = self.samples.back().map_or(0.0, |s| s.celsius);
        DeltaStats {
            delta: latest - oldest,
            oldest,
            latest,
            min,
            max,
            samples: u32::try_from(self.samples.len()).unwrap_or(u32::MAX),
            window_end_ns: t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_secs: i64, celsius: f64, seq: u64) -> Sample {
        Sample {
            at_ns: at_secs * NS_PER_SEC,
            celsius,
            seq,
        }
    }

    fn accepted(o: WindowOutcome) -> DeltaStats {
        match o {
            WindowOutcome::Accepted(d) => d,
            other => panic!("expected Accepted, got {other:?}"),
        }
    }

    #[test]
    fn a_single_sample_has_zero_delta() {
        let mut w = DeltaWindow::new();
        let d = accepted(w.apply(s(100, 20.0, 1), 600));
        assert_eq!(d.delta, 0.0);
        assert_eq!((d.min, d.max, d.samples), (20.0, 20.0, 1));
        assert_eq!(d.window_end_ns, 100 * NS_PER_SEC);
    }

    #[test]
    fn delta_is_latest_minus_oldest() {
        let mut w = DeltaWindow::new();
        w.apply(s(0, 20.0, 1), 600);
        w.apply(s(10, 25.0, 2), 600);
        let d = accepted(w.apply(s(20, 22.0, 3), 600));
        assert_eq!((d.delta, d.oldest, d.latest), (2.0, 20.0, 22.0));
        assert_eq!((d.min, d.max, d.samples), (20.0, 25.0, 3));
    }

    #[test]
    fn window_edges_evict_at_exactly_t_minus_window() {
        let mut w = DeltaWindow::new();
        w.apply(s(0, 10.0, 1), 600);
        w.apply(s(1, 11.0, 2), 600);
        // T = 600: the sample at 0 is at T - window, so it leaves; the one at 1 stays.
        let d = accepted(w.apply(s(600, 15.0, 3), 600));
        assert_eq!((d.samples, d.oldest), (2, 11.0));
        // A reading exactly at T - window is late; one just inside is folded in.
        assert_eq!(w.apply(s(0, 9.0, 4), 600), WindowOutcome::Late);
        let d = accepted(w.apply(s(1, 9.0, 5), 600));
        assert_eq!((d.samples, d.oldest, d.latest), (3, 11.0, 15.0));
    }

    #[test]
    fn out_of_order_inside_the_window_is_folded_in() {
        let mut w = DeltaWindow::new();
        w.apply(s(100, 20.0, 1), 600);
        w.apply(s(200, 30.0, 2), 600);
        // Older than everything so far but inside the window: becomes the oldest.
        let d = accepted(w.apply(s(50, 10.0, 3), 600));
        assert_eq!((d.oldest, d.latest, d.delta), (10.0, 30.0, 20.0));
        assert_eq!(d.window_end_ns, 200 * NS_PER_SEC);
        // In the middle: changes min/max only.
        let d = accepted(w.apply(s(150, 40.0, 4), 600));
        assert_eq!(
            (d.oldest, d.latest, d.max, d.samples),
            (10.0, 30.0, 40.0, 4)
        );
    }

    #[test]
    fn late_readings_change_nothing() {
        let mut w = DeltaWindow::new();
        w.apply(s(1000, 20.0, 1), 600);
        let before = w.clone();
        assert_eq!(w.apply(s(100, 99.0, 2), 600), WindowOutcome::Late);
        assert_eq!(w.samples().count(), before.samples().count());
        assert_eq!(w.last_seq(), 2);
    }

    #[test]
    fn equal_event_times_are_ordered_by_arrival() {
        let mut w = DeltaWindow::new();
        w.apply(s(10, 1.0, 1), 600);
        let d = accepted(w.apply(s(10, 2.0, 2), 600));
        assert_eq!((d.oldest, d.latest), (1.0, 2.0));
        let d = accepted(w.apply(s(10, 3.0, 3), 600));
        assert_eq!((d.oldest, d.latest, d.samples), (1.0, 3.0, 3));
    }

    #[test]
    fn duplicate_input_sequences_are_idempotent() {
        let mut w = DeltaWindow::new();
        w.apply(s(10, 1.0, 5), 600);
        let snapshot = w.clone();
        assert_eq!(w.apply(s(10, 1.0, 5), 600), WindowOutcome::AlreadyApplied);
        assert_eq!(w.apply(s(11, 7.0, 4), 600), WindowOutcome::AlreadyApplied);
        assert_eq!(w, snapshot);
    }

    #[test]
    fn a_shorter_window_applies_from_the_next_reading() {
        let mut w = DeltaWindow::new();
        w.apply(s(0, 1.0, 1), 600);
        w.apply(s(100, 2.0, 2), 600);
        let d = accepted(w.apply(s(110, 3.0, 3), 60));
        assert_eq!((d.samples, d.oldest), (2, 2.0));
    }

    #[test]
    fn serde_round_trips() {
        let mut w = DeltaWindow::new();
        w.apply(s(10, 1.25, 1), 600);
        w.apply(s(5, -3.5, 2), 600);
        let json = serde_json::to_vec(&w).expect("encodable");
        let back: DeltaWindow = serde_json::from_slice(&json).expect("decodable");
        assert_eq!(back, w);
    }

    /// `preview` is `apply` without the mutation: checked on a deterministic pseudo-random
    /// walk of in-order, out-of-order, tied and late readings and changing windows.
    #[test]
    fn preview_equals_apply() {
        let mut w = DeltaWindow::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut at = 1_000i64;
        for seq in 1..5_000u64 {
            let r = next();
            let jump = (r % 40) as i64 - 8; // mostly forward, sometimes back, sometimes equal
            at += jump;
            let window = [5u32, 30, 60, 600][(r >> 8) as usize % 4];
            let celsius = ((r >> 16) % 2_000) as f64 / 10.0 - 50.0;
            let sample = s(at, celsius, seq);
            let preview = w.preview(sample, window);
            match w.apply(sample, window) {
                WindowOutcome::Accepted(stats) => assert_eq!(preview, Some(stats), "seq {seq}"),
                WindowOutcome::Late => assert_eq!(preview, None, "seq {seq}"),
                WindowOutcome::AlreadyApplied => unreachable!("sequences grow"),
            }
        }
    }
}
