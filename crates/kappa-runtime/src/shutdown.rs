//! Graceful shutdown: one token cancelled on SIGTERM or SIGINT; workers finish the batch in
//! hand, commit, and stop.

pub use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled when the process gets SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Spawns a task that runs `tick` every `period` (the first time at once; a late tick delays
/// the next rather than bunching them) until `shutdown`. The periodic work of the
/// runtime (snapshot flushes, standby copies) is written this way once.
pub fn every<F, Fut>(period: std::time::Duration, shutdown: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = timer.tick() => {}
            }
            tick().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn every_ticks_each_period_and_stops_with_shutdown() {
        let (n, stop) = (Arc::new(AtomicU32::new(0)), CancellationToken::new());
        let m = n.clone();
        every(Duration::from_secs(1), stop.clone(), move || {
            let m = m.clone();
            async move {
                m.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(n.load(Ordering::SeqCst), 4, "ticks at 0, 1, 2 and 3 s");
        stop.cancel();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(n.load(Ordering::SeqCst), 4, "none after shutdown");
    }
}
