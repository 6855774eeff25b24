//! Polling a condition until it holds or a timeout passes: the one way tests and benchmarks
//! wait for asynchronous effects (stream counts, partitions taken over, servers listening).

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `f` every 200 ms until it returns true or `timeout` passes; returns whether it did.
/// `f` is always called at least once, and once more at the deadline.
pub async fn wait_until<F, Fut>(timeout: Duration, f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until_every(timeout, Duration::from_millis(200), f).await
}

/// [`wait_until`] with a chosen polling interval.
pub async fn wait_until_every<F, Fut>(timeout: Duration, every: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}
