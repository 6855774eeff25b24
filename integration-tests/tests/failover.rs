//! Failover sequences judged by the oracle, for `local`, `affinity` and `remote` working state.
//!
//! Two temperature-delta instances (A, B) share 4 partitions under leases while the thermometer
//! keeps readings flowing (some out of order, some late: dead letters). A is stopped (SIGSTOP)
//! past its lease TTL and past the streams' duplicate window; B takes every partition over; A is
//! resumed, a zombie whose leftover writes (snapshots, deltas, dead letters, retried publishes no
//! longer deduplicated) must not count; then B is killed with -9, a second failover whose
//! partitions recover from snapshots (`local`, and `affinity` whose colocated store, one Redis
//! database per instance, died with B) and the change log; C starts. After draining, every delta
//! and dead letter equals the oracle and no reading has two outcomes (`verify_exactly_once`).
//!
//! - Short version (default, CI): lease TTL 3 s, duplicate window 3 s
//!   (`KAPPA_DUPLICATE_WINDOW_SECS`), A stopped 10 s.
//! - Long version (`KAPPA_FAULTS_LONG=1`, on demand): the default lease TTL (6 s) and duplicate
//!   window (120 s), A stopped 150 s.
//!
//! `failover_local_standby` runs the `local` sequence with `KAPPA_STANDBYS=1` and snapshots too
//! rare to be taken (`KAPPA_SNAPSHOT_SECS=600`), so every takeover that uses a standby copy uses
//! one built from the change log and the owner's reported position.
//!
//! Each run prints `MATRIX|zombie-stop+kill9|<option>|inputs|lost|doubled|wrong|recover_secs`
//! (recover_secs: from the kill -9 of B until A and C own every partition) for the matrix.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use integration_tests::{
    Dag, Proc, count, healthz, procs, running_partitions, servers, verify_exactly_once,
    wait_drained, wait_until,
};

const PARTITIONS: usize = 4;

/// Writes past the test harness's capture, so the matrix line shows in every run's log.
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

/// Waits until the instances together run every partition exactly once.
async fn wait_full_coverage(instances: &[&Proc], timeout: Duration) -> bool {
    wait_until(timeout, || async {
        let mut all = Vec::new();
        for p in instances {
            all.extend(owned(p).await);
        }
        let set: BTreeSet<u32> = all.iter().copied().collect();
        all.len() == PARTITIONS && set.len() == PARTITIONS
    })
    .await
}

async fn zombie_then_second_failover(working: &str, standbys: &str) {
    let test = if standbys == "0" {
        format!("failover_{working}")
    } else {
        format!("failover_{working}_standby")
    };
    let test = test.as_str();
    let long = integration_tests::matrix::long();
    let (ttl, window, stop_secs, rate, readings) = if long {
        (6u64, 120u64, 150u64, 100u64, 22_000u64)
    } else {
        (3, 3, 10, 300, 12_000)
    };
    let s = servers(test).await;
    let redis = s.redis_url.clone();
    let (ttl_s, window_s) = (ttl.to_string(), window.to_string());
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_WORKING", working),
            ("KAPPA_LEASE_TTL_SECS", &ttl_s),
            ("KAPPA_DUPLICATE_WINDOW_SECS", &window_s),
            // With a standby, snapshots too rare to be taken during the run: the standby
            // copies are built from the change log and the owners' positions alone.
            (
                "KAPPA_SNAPSHOT_SECS",
                if standbys == "0" { "1" } else { "600" },
            ),
            ("KAPPA_STANDBYS", standbys),
        ],
    )
    .await;
    // Each instance has its own colocated store (`affinity`): one Redis database each.
    let instance = |db: u32| {
        let mut env = dag.env.clone();
        env.push(("AFFINITY_REDIS_URL", format!("{redis}/{db}")));
        procs::start(test, "temperature-delta", &env, &[])
    };
    let a = instance(1);
    let mut b = instance(2);
    assert!(
        wait_full_coverage(&[&a, &b], Duration::from_secs(30)).await,
        "{test}: A and B never ran every partition"
    );
    let (rate_s, readings_s) = (rate.to_string(), readings.to_string());
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
            "--out-of-order",
            "0.02",
            "--late",
            "0.02",
            "--seed",
            "17",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(&dag.js, "DELTAS").await > 1000
        })
        .await,
        "{test}: no progress before the fault"
    );

    // 1. A stops past its lease and the duplicate window; B takes everything over.
    a.signal("-STOP");
    let stopped = Instant::now();
    let took = wait_until(Duration::from_secs(3 * ttl + 20), || async {
        owned(&b).await.len() == PARTITIONS
    })
    .await;
    assert!(took, "{test}: B did not take over from the stopped A");
    let rest = Duration::from_secs(stop_secs).saturating_sub(stopped.elapsed());
    tokio::time::sleep(rest).await;
    // 2. A resumes: a zombie until it finds out; the partitions are shared again.
    a.signal("-CONT");
    assert!(
        wait_full_coverage(&[&a, &b], Duration::from_secs(60)).await,
        "{test}: A and B did not share the partitions again after A resumed"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 3. The new owner dies; C starts; its partitions recover from snapshots + change log.
    b.kill9();
    let killed = Instant::now();
    let c = instance(3);
    assert!(
        wait_full_coverage(&[&a, &c], Duration::from_secs(60)).await,
        "{test}: A and C did not take B's partitions over"
    );
    let recover_secs = killed.elapsed().as_secs_f64();

    let status = thermo
        .wait_exit(Duration::from_secs(readings / rate + 120))
        .await
        .expect("thermometer finished");
    assert!(status.success(), "{test}: thermometer failed");
    assert!(
        wait_drained(&dag.js, Duration::from_secs(120)).await,
        "{test}: did not drain; A:\n{}\nC:\n{}",
        a.log_tail(40),
        c.log_tail(40)
    );
    let j = integration_tests::judge(&dag.js).await;
    integration_tests::matrix::record(
        &integration_tests::matrix::Row::new(
            test,
            "owner SIGSTOP past lease + dup window, resumed; new owner kill -9",
            working,
        )
        .judged(&j)
        .recovered(Some(recover_secs)),
    );
    assert!(
        j.exact(),
        "{test}: {j:?}; logs in {}",
        procs::log_dir(test).display()
    );
    let v = verify_exactly_once(&dag.js).await;
    assert_eq!(v.readings as u64, readings);
    say(format!(
        "[{test}] A stopped {stop_secs}s (lease TTL {ttl}s, duplicate window {window}s), B killed: {} readings -> {} deltas, {:?}; none lost, none doubled, none wrong; second failover covered in {recover_secs:.2}s",
        v.readings, v.deltas, v.rejected
    ));
    drop((a, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_local() {
    zombie_then_second_failover("local", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_affinity() {
    zombie_then_second_failover("affinity", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_remote() {
    zombie_then_second_failover("remote", "0").await;
}

/// `local` with a warm standby (`KAPPA_STANDBYS=1`): the zombie and the second failover must
/// judge the same with takeovers opened from standby copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_local_standby() {
    zombie_then_second_failover("local", "1").await;
}
