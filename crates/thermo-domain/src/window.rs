//! [`DeltaWindow`]: one sensor's working state, the accepted readings whose event time lies in
//! `(T - window, T]`, and the pure function that folds a reading in and yields its delta.
//!
//! Ordering: samples are kept sorted by event time; equal event times are ordered by arrival
//! (the input stream sequence, which only grows). Idempotency: a reading whose input sequence
//! is not above the last one applied is reported as [`WindowOutcome::AlreadyApplied`] and
//! changes nothing.

use std::collections::VecDeque;

/// One accepted reading inside a window.
#[derive(Debug, Clone, Copy, PartialEq)]
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

/// A sensor's window of recent readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeltaWindow {
    samples: VecDeque<Sample>,
    /// Latest event time accepted (`T`), if any.
    latest_ns: Option<i64>,
    /// Highest input sequence applied (accepted or rejected as late).
    last_seq: u64,
}

const NS_PER_SEC: i64 = 1_000_000_000;
const ENCODING_VERSION: u8 = 1;

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

    /// Folds in a calibrated reading. `window_secs` is the sensor's current window.
    pub fn apply(&mut self, sample: Sample, window_secs: u32) -> WindowOutcome {
        if sample.seq <= self.last_seq {
            return WindowOutcome::AlreadyApplied;
        }
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

    /// Compact binary encoding for the state stores (24 bytes a sample).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 8 + 1 + 4 + self.samples.len() * 24);
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.push(u8::from(self.latest_ns.is_some()));
        out.extend_from_slice(&self.latest_ns.unwrap_or(0).to_le_bytes());
        let n = u32::try_from(self.samples.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for s in &self.samples {
            out.extend_from_slice(&s.at_ns.to_le_bytes());
            out.extend_from_slice(&s.celsius.to_le_bytes());
            out.extend_from_slice(&s.seq.to_le_bytes());
        }
        out
    }

    /// Decodes [`DeltaWindow::encode`]'s output; `None` if it is not a valid encoding.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        if r.u8()? != ENCODING_VERSION {
            return None;
        }
        let last_seq = r.u64()?;
        let has_latest = r.u8()? == 1;
        let latest = r.i64()?;
        let n = r.u32()? as usize;
        if r.0.len() != n * 24 {
            return None;
        }
        let mut samples = VecDeque::with_capacity(n);
        for _ in 0..n {
            samples.push_back(Sample {
                at_ns: r.i64()?,
                celsius: f64::from_bits(r.u64()?),
                seq: r.u64()?,
            });
        }
        Some(Self {
            samples,
            latest_ns: has_latest.then_some(latest),
            last_seq,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
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
    fn encoding_round_trips() {
        let mut w = DeltaWindow::new();
        assert_eq!(DeltaWindow::decode(&w.encode()), Some(w.clone()));
        w.apply(s(10, 1.25, 1), 600);
        w.apply(s(5, -3.5, 2), 600);
        assert_eq!(DeltaWindow::decode(&w.encode()), Some(w.clone()));
        assert_eq!(DeltaWindow::decode(&[9, 9]), None);
        let mut bad = w.encode();
        bad.pop();
        assert_eq!(DeltaWindow::decode(&bad), None);
    }
}
