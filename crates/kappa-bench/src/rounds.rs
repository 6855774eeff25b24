//! The one runner of alternated rounds: every round runs every scenario once, in the same order,
//! so that a moment of load on the shared machine hits all of them; each figure is then the median
//! of its scenario's rounds. The modes (`cost`, `views`, `topology`, `durability`) list their
//! scenarios and say how to run one; this module owns the loop, the progress lines and the median.

/// Rounds of every scenario, unless a mode says otherwise.
pub const ROUNDS: usize = 3;

/// Every (scenario, result) of a set of alternated rounds, in the order they ran.
pub struct Rounds<S, R> {
    pub runs: Vec<(S, R)>,
}

/// Runs `rounds` rounds of `scenarios`, alternated; `run(round, scenario)` measures one.
/// Progress goes to stderr as `[tag] round i/n: label`.
pub async fn alternate<S, R>(
    tag: &str,
    scenarios: &[S],
    rounds: usize,
    label: impl Fn(S) -> String,
    mut run: impl AsyncFnMut(usize, S) -> R,
) -> Rounds<S, R>
where
    S: Copy,
{
    let mut runs = Vec::with_capacity(rounds * scenarios.len());
    for i in 0..rounds {
        for &s in scenarios {
            eprintln!("[{tag}] round {}/{rounds}: {}", i + 1, label(s));
            runs.push((s, run(i, s).await));
        }
    }
    Rounds { runs }
}

impl<S: PartialEq + Copy, R> Rounds<S, R> {
    /// The results of one scenario, in round order.
    pub fn of(&self, s: S) -> impl DoubleEndedIterator<Item = &R> {
        self.runs
            .iter()
            .filter(move |(x, _)| *x == s)
            .map(|(_, r)| r)
    }

    /// The median over one scenario's rounds of a figure (rounds without it are left out).
    pub fn median(&self, s: S, f: impl Fn(&R) -> Option<f64>) -> Option<f64> {
        crate::median(self.of(s).filter_map(f).collect())
    }
}

/// Runs `run` `n` times (the closure sets up its own fresh streams) and keeps the median figure,
/// so that one unlucky moment on a shared machine does not move every ratio; the last error if
/// no run finished.
pub async fn median_run(
    n: usize,
    mut run: impl AsyncFnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<f64> {
    let (mut ok, mut err) = (Vec::new(), None);
    for _ in 0..n {
        match run().await {
            Ok(v) => ok.push(v),
            Err(e) => err = Some(e),
        }
    }
    crate::median(ok).ok_or_else(|| err.unwrap_or_else(|| anyhow::anyhow!("no run finished")))
}

/// Runs `run` `n` (at least 1) times and keeps the whole result of the median run by `key`.
pub async fn median_by<T>(n: usize, key: impl Fn(&T) -> f64, mut run: impl AsyncFnMut() -> T) -> T {
    let mut runs = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        runs.push(run().await);
    }
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn alternates_and_takes_the_median_per_scenario() {
        let mut order = Vec::new();
        let r = alternate(
            "t",
            &['a', 'b'],
            3,
            |s| s.to_string(),
            async |i, s| {
                order.push((i, s));
                Some(if s == 'a' { i as f64 } else { 10.0 * i as f64 })
            },
        )
        .await;
        assert_eq!(
            order,
            vec![(0, 'a'), (0, 'b'), (1, 'a'), (1, 'b'), (2, 'a'), (2, 'b')]
        );
        assert_eq!(r.median('a', |x| *x), Some(1.0));
        assert_eq!(r.median('b', |x| *x), Some(10.0));
        assert_eq!(r.median('c', |x| *x), None);
    }

    #[tokio::test]
    async fn median_run_skips_failures_and_reports_the_last_error() {
        let mut i = 0.0;
        let m = median_run(3, async || {
            i += 1.0;
            if i == 2.0 {
                anyhow::bail!("two")
            } else {
                Ok(i)
            }
        })
        .await;
        assert_eq!(m.ok(), Some(3.0));
        let e = median_run(2, async || anyhow::bail!("no")).await;
        assert_eq!(e.err().map(|e| e.to_string()).as_deref(), Some("no"));
        let mut j = 0;
        let t = median_by(
            3,
            |x: &(i32, f64)| x.1,
            async || {
                j += 1;
                (j, [5.0, 1.0, 3.0][j as usize - 1])
            },
        )
        .await;
        assert_eq!(t, (3, 3.0));
    }
}
