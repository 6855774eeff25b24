//! Warm standbys (`KAPPA_STANDBYS=1`) for `local` working state, judged by the oracle.
//!
//! Two temperature-delta instances (A, B) share 4 partitions under leases while the thermometer
//! keeps readings flowing; A is killed with -9 and B takes its partitions over. The scenario
//! runs twice, without and with a standby: both must end with none lost, none doubled, none
//! wrong; with a standby, B's opens of A's partitions must use its warm copies
//! (`kappa_standby_takeovers_total`), without one they must not. Inputs processed by B until
//! it caught up (`kappa_takeover_replayed_inputs`) and the seconds from the kill until B runs
//! every partition are printed for both runs (never asserted: timings vary). The same runs
//! after a SIGTERM of A (a graceful handover) are judged and printed too.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use integration_tests::{
    Dag, Proc, count, healthz, metric, procs, running_partitions, servers, verify_exactly_once,
    wait_drained, wait_until,
};

const PARTITIONS: usize = 4;
const READINGS: u64 = 4_000;
const RATE: u64 = 400;

/// Writes past the test harness's capture.
fn say(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

async fn owned(p: &Proc) -> BTreeSet<u32> {
    healthz(&p.http)
        .await
        .map(|h| running_partitions(&h))
        .unwrap_or_default()
}

/// What one run measured at the successor.
struct Takeover {
    standby_opens: f64,
    replayed: f64,
    covered_secs: f64,
}

async fn kill_owner(standbys: &str, signal: &str) -> Takeover {
    let test = format!("standby_{standbys}{signal}");
    let test = test.as_str();
    let s = servers(test).await;
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_WORKING", "local"),
            ("KAPPA_STANDBYS", standbys),
            ("KAPPA_LEASE_TTL_SECS", "3"),
            ("KAPPA_SNAPSHOT_SECS", "2"),
        ],
    )
    .await;
    let mut a = procs::start(test, "temperature-delta", &dag.env, &[]);
    let b = procs::start(test, "temperature-delta", &dag.env, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            owned(&a).await.len() + owned(&b).await.len() == PARTITIONS
                && !owned(&a).await.is_empty()
                && !owned(&b).await.is_empty()
        })
        .await,
        "{test}: A and B never shared the partitions"
    );
    let (rate_s, readings_s) = (RATE.to_string(), READINGS.to_string());
    let mut thermo = dag.spawn(
        "thermometer",
        &[
            "--sensors",
            "100",
            "--count",
            &readings_s,
            "--rate",
            &rate_s,
            "--event-step-ms",
            "1000",
            "--seed",
            "23",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(&dag.js, "DELTAS").await > 1500
        })
        .await,
        "{test}: no progress before the kill"
    );
    let before = metric(&b.http, "kappa_standby_takeovers_total").await;
    if signal == "-KILL" {
        a.kill9();
    } else {
        a.signal(signal);
    }
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            owned(&b).await.len() == PARTITIONS
        })
        .await,
        "{test}: B did not take A's partitions over; B:\n{}",
        b.log_tail(40)
    );
    let covered_secs = killed.elapsed().as_secs_f64();
    let status = thermo
        .wait_exit(Duration::from_secs(READINGS / RATE + 120))
        .await
        .expect("thermometer finished");
    assert!(status.success(), "{test}: thermometer failed");
    assert!(
        wait_drained(&dag.js, Duration::from_secs(120)).await,
        "{test}: did not drain; B:\n{}",
        b.log_tail(40)
    );
    let j = integration_tests::judge(&dag.js).await;
    assert!(
        j.exact(),
        "{test}: {j:?}; logs in {}",
        procs::log_dir(test).display()
    );
    let v = verify_exactly_once(&dag.js).await;
    assert_eq!(v.readings as u64, READINGS);
    let standby_opens = metric(&b.http, "kappa_standby_takeovers_total").await - before;
    let replayed = metric(&b.http, "kappa_takeover_replayed_inputs").await;
    say(format!(
        "[{test}] KAPPA_STANDBYS={standbys}, A sent {signal}: {} readings -> {} deltas, none lost, none doubled, none wrong; B opened {standby_opens} partitions from standby copies, processed {replayed} inputs until caught up, ran every partition {covered_secs:.2}s after the kill",
        v.readings, v.deltas
    ));
    drop(b);
    Takeover {
        standby_opens,
        replayed,
        covered_secs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_from_its_warm_copy() {
    let cold = kill_owner("0", "-KILL").await;
    let warm = kill_owner("1", "-KILL").await;
    assert_eq!(
        cold.standby_opens, 0.0,
        "no standby copies without standbys"
    );
    assert!(
        warm.standby_opens >= 1.0,
        "with a standby, B opened none of A's partitions from its warm copy"
    );
    say(format!(
        "[standby] takeover: without standby {} inputs, {:.2}s; with standby {} inputs, {:.2}s",
        cold.replayed, cold.covered_secs, warm.replayed, warm.covered_secs
    ));
}

/// SIGTERM of the owner with and without a standby: a graceful handover (A flushes its
/// snapshots and releases its leases) judged by the oracle; the numbers are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_after_sigterm() {
    let cold = kill_owner("0", "-TERM").await;
    let warm = kill_owner("1", "-TERM").await;
    assert_eq!(
        cold.standby_opens, 0.0,
        "no standby copies without standbys"
    );
    say(format!(
        "[standby] after SIGTERM: without standby {} inputs, {:.2}s; with standby {} inputs, {:.2}s, {} opens from copies",
        cold.replayed, cold.covered_secs, warm.replayed, warm.covered_secs, warm.standby_opens
    ));
}
