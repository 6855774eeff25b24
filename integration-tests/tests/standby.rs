//! Warm standbys (`KAPPA_STANDBYS=1`) for `local` working state, judged by the oracle.
//!
//! Two temperature-delta instances (A, B) share 4 partitions under leases while the thermometer
//! keeps readings flowing; A is killed with -9 and B takes its partitions over. The scenario
//! runs twice, without and with a standby, with snapshots so rare that none is taken during
//! the run (`KAPPA_SNAPSHOT_SECS=600`): every input A decided is after the last snapshot. Both
//! runs must end with none lost, none doubled, none wrong; with a standby, B's opens of A's
//! partitions must use its warm copies (`kappa_standby_takeovers_total`), without one they
//! must not; and with a standby B must decide again (or skip as already decided) far fewer
//! inputs than A decided since the last snapshot: its copy follows the change log and the
//! owner's reported position, not only the snapshots. `kappa_replayed_inputs_total` at B counts
//! the inputs redelivered after the position B opened at whose outcome was already in the
//! logs. Those, the inputs B processed until it caught up (`kappa_takeover_replayed_inputs`:
//! replayed plus queued while nobody owned the partitions), the longest open-to-caught-up time
//! (`kappa_takeover_seconds`) and the seconds from the kill until B runs every partition are
//! printed for both runs (timings are never asserted). The same runs after a SIGTERM of A (a
//! graceful handover, snapshots every 2 s) are judged and printed too.

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
    owned_at(&p.http).await
}

async fn owned_at(http: &str) -> BTreeSet<u32> {
    healthz(http)
        .await
        .map(|h| running_partitions(&h))
        .unwrap_or_default()
}

/// The samples of metric `name` at `http`'s `/metrics` for each of `partitions` (label
/// `partition`).
async fn per_partition(http: &str, name: &str, partitions: &BTreeSet<u32>) -> Vec<f64> {
    let page = kappa_testkit::metrics::scrape(&reqwest::Client::new(), http)
        .await
        .unwrap_or_default();
    partitions
        .iter()
        .filter_map(|p| {
            let series = format!("{name}{{partition=\"{p}\"}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
        })
        .collect()
}

/// What one run measured at the successor.
struct Takeover {
    standby_opens: f64,
    /// Inputs B processed in A's partitions until it caught up (replayed + queued while
    /// unowned).
    processed: f64,
    /// Inputs redelivered to B whose outcome was already in the logs.
    replayed: f64,
    /// Readings published before the kill.
    published: u64,
    /// Entities B's copies read missed changes back for before following the log.
    catchups: f64,
    takeover_secs: f64,
    covered_secs: f64,
}

/// Runs the scenario: `standbys` and `snapshot_secs` for both instances, A sent `signal`;
/// with `late`, B joins while A runs alone with readings flowing.
async fn kill_owner(standbys: &str, signal: &str, snapshot_secs: &str, late: bool) -> Takeover {
    let test = format!(
        "standby_{standbys}{signal}{}",
        if late { "-late" } else { "" }
    );
    let test = test.as_str();
    let s = servers(test).await;
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_WORKING", "local"),
            ("KAPPA_STANDBYS", standbys),
            ("KAPPA_LEASE_TTL_SECS", "3"),
            ("KAPPA_SNAPSHOT_SECS", snapshot_secs),
        ],
    )
    .await;
    let mut a = procs::start(test, "temperature-delta", &dag.env, &[]);
    let shared = |a: &Proc, b: &Proc| {
        let (a, b) = (a.http.clone(), b.http.clone());
        async move {
            wait_until(Duration::from_secs(30), || async {
                let (oa, ob) = (owned_at(&a).await, owned_at(&b).await);
                oa.len() + ob.len() == PARTITIONS && !oa.is_empty() && !ob.is_empty()
            })
            .await
        }
    };
    let mut b = None;
    if !late {
        let started = procs::start(test, "temperature-delta", &dag.env, &[]);
        assert!(
            shared(&a, &started).await,
            "{test}: A and B never shared the partitions"
        );
        b = Some(started);
    }
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
    let kill_after = if late {
        // A runs alone long enough to snapshot; B joins, and its copies of A's partitions
        // start from those snapshots (entities older than the feed's start read their missed
        // changes back before following the log).
        assert!(
            wait_until(Duration::from_secs(60), || async {
                count(&dag.js, "DELTAS").await > 1000
            })
            .await,
            "{test}: no progress before B joined"
        );
        let started = procs::start(test, "temperature-delta", &dag.env, &[]);
        assert!(
            shared(&a, &started).await,
            "{test}: A and B never shared the partitions"
        );
        assert!(
            wait_until(Duration::from_secs(30), || async {
                metric(&started.http, "kappa_standby_changes_total").await > 0.0
            })
            .await,
            "{test}: B's copies never folded a change"
        );
        b = Some(started);
        2500
    } else {
        1500
    };
    let b = b.expect("B started");
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(&dag.js, "DELTAS").await > kill_after
        })
        .await,
        "{test}: no progress before the kill"
    );
    let before = metric(&b.http, "kappa_standby_takeovers_total").await;
    let replayed_before = metric(&b.http, "kappa_replayed_inputs_total").await;
    // How far B's copies were behind A's reported positions at their last refresh (inputs).
    let lag = metric(&b.http, "kappa_standby_lag").await;
    let published = count(&dag.js, "READINGS").await;
    let b_had = owned(&b).await;
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
    assert_eq!(
        metric(&b.http, "kappa_standby_position").await,
        0.0,
        "{test}: B owns every partition and keeps no copy, yet a standby position is left"
    );
    let standby_opens = metric(&b.http, "kappa_standby_takeovers_total").await - before;
    let catchups = metric(&b.http, "kappa_standby_catchups_total").await;
    // The partitions B took from A: their takeover gauges are of this takeover.
    let taken: BTreeSet<u32> = owned(&b).await.difference(&b_had).copied().collect();
    let processed: f64 = per_partition(&b.http, "kappa_takeover_replayed_inputs", &taken)
        .await
        .iter()
        .sum();
    let replayed = metric(&b.http, "kappa_replayed_inputs_total").await - replayed_before;
    let takeover_secs = per_partition(&b.http, "kappa_takeover_seconds", &taken)
        .await
        .into_iter()
        .fold(0.0, f64::max);
    say(format!(
        "[{test}] KAPPA_STANDBYS={standbys}, KAPPA_SNAPSHOT_SECS={snapshot_secs}, A sent {signal} after {published} readings: {} readings -> {} deltas, none lost, none doubled, none wrong; B's copies {lag} inputs behind A before the kill, B opened {standby_opens} partitions from standby copies ({catchups} entities caught up before following the log), replayed {replayed} inputs already decided, processed {processed} inputs in A's partitions {taken:?} until caught up (longest {takeover_secs:.3}s from open), ran every partition {covered_secs:.2}s after the kill",
        v.readings, v.deltas
    ));
    drop(b);
    Takeover {
        standby_opens,
        processed,
        replayed,
        published: published as u64,
        catchups,
        takeover_secs,
        covered_secs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_from_its_warm_copy() {
    let cold = kill_owner("0", "-KILL", "600", false).await;
    let warm = kill_owner("1", "-KILL", "600", false).await;
    assert_eq!(
        cold.standby_opens, 0.0,
        "no standby copies without standbys"
    );
    assert!(
        warm.standby_opens >= 1.0,
        "with a standby, B opened none of A's partitions from its warm copy"
    );
    say(format!(
        "[standby] takeover after kill -9: without standby {} replayed, {} processed until caught up, {:.3}s open to caught up, {:.2}s kill to covered; with standby {} replayed, {} processed, {:.3}s, {:.2}s",
        cold.replayed,
        cold.processed,
        cold.takeover_secs,
        cold.covered_secs,
        warm.replayed,
        warm.processed,
        warm.takeover_secs,
        warm.covered_secs
    ));
    // No snapshot was taken during the run, so A's partitions' whole input (about half of
    // what was published before the kill) is after the last snapshot; the copy follows the
    // change log and A's reported position, so B redelivers only what A decided after its last
    // reported position.
    assert!(
        warm.replayed * 10.0 < warm.published as f64,
        "with a standby, B replayed {} inputs already decided, not far fewer than the {} published before the kill",
        warm.replayed,
        warm.published
    );
}

/// SIGTERM of the owner with and without a standby: a graceful handover (A flushes its
/// snapshots and releases its leases) judged by the oracle; the numbers are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_after_sigterm() {
    let cold = kill_owner("0", "-TERM", "2", false).await;
    let warm = kill_owner("1", "-TERM", "2", false).await;
    assert_eq!(
        cold.standby_opens, 0.0,
        "no standby copies without standbys"
    );
    say(format!(
        "[standby] after SIGTERM: without standby {} replayed, {} processed, {:.2}s; with standby {} replayed, {} processed, {:.2}s, {} opens from copies",
        cold.replayed,
        cold.processed,
        cold.covered_secs,
        warm.replayed,
        warm.processed,
        warm.covered_secs,
        warm.standby_opens
    ));
}

/// A standby that joins a running owner starts its copies from the owner's snapshots, whose
/// entities were folded to different points of the change log: each reads what it missed back
/// before it follows the log. After kill -9 of the owner the judge must still find none lost,
/// doubled or wrong, the takeover must use the copies, and it must replay far fewer inputs
/// than were published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_joining_a_running_owner_takes_over_from_its_copy() {
    let warm = kill_owner("1", "-KILL", "2", true).await;
    assert!(
        warm.standby_opens >= 1.0,
        "B opened none of A's partitions from its warm copy"
    );
    assert!(
        warm.catchups >= 1.0,
        "B's copies started from snapshots but no entity read missed changes back"
    );
    assert!(
        warm.replayed * 10.0 < warm.published as f64,
        "with a standby, B replayed {} inputs already decided, not far fewer than the {} published before the kill",
        warm.replayed,
        warm.published
    );
    say(format!(
        "[standby] joining standby, kill -9: {} replayed, {} processed, {:.3}s open to caught up, {:.2}s kill to covered, {} catch-ups",
        warm.replayed, warm.processed, warm.takeover_secs, warm.covered_secs, warm.catchups
    ));
}
