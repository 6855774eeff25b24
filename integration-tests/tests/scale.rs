//! Several temperature-delta instances sharing 12 partitions through leases: crash, zombie
//! (SIGSTOP past its lease), scaling 1 -> 3 -> 1, balance. Every test ends with the
//! exactly-once, in-order check against the oracle.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use integration_tests::{
    Dag, Proc, count, healthz, procs, ready, running_partitions, verify_exactly_once, wait_drained,
    wait_until,
};

const PARTITIONS: usize = 12;

async fn owned(p: &Proc) -> BTreeSet<u32> {
    healthz(&p.http)
        .await
        .map(|h| running_partitions(&h))
        .unwrap_or_default()
}

/// Waits until the instances together own every partition exactly once; returns the time.
async fn wait_full_coverage(instances: &[&Proc], timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let mut all = Vec::new();
        for p in instances {
            all.extend(owned(p).await);
        }
        let set: BTreeSet<u32> = all.iter().copied().collect();
        if all.len() == PARTITIONS && set.len() == PARTITIONS {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Waits until the instances own every partition and none more than ceil(P/N)+1.
async fn wait_balanced(instances: &[&Proc]) -> bool {
    let cap = PARTITIONS.div_ceil(instances.len()) + 1;
    wait_until(Duration::from_secs(30), || async {
        let mut counts = Vec::with_capacity(instances.len());
        for p in instances {
            counts.push(owned(p).await.len());
        }
        counts.iter().sum::<usize>() == PARTITIONS && counts.iter().all(|n| *n <= cap)
    })
    .await
}

async fn rig(test: &str) -> Dag {
    Dag::start(
        test,
        &[
            ("KAPPA_PARTITIONS", "12"),
            ("KAPPA_LEASE_TTL_SECS", "3"),
            ("KAPPA_WORKING", "remote"),
        ],
    )
    .await
}

fn load(rig: &Dag, count: &str, rate: &str) -> Proc {
    rig.spawn(
        "thermometer",
        &[
            "--sensors",
            "200",
            "--count",
            count,
            "--rate",
            rate,
            "--event-step-ms",
            "1000",
            "--out-of-order",
            "0.02",
            "--seed",
            "5",
        ],
    )
}

async fn finish(test: &str, rig: &Dag, mut thermo: Proc, expected: usize) {
    let st = thermo
        .wait_exit(Duration::from_secs(120))
        .await
        .expect("thermometer finished");
    assert!(st.success());
    assert!(
        wait_drained(&rig.js, Duration::from_secs(90)).await,
        "{test}: did not drain"
    );
    let v = verify_exactly_once(&rig.js).await;
    assert_eq!(v.readings, expected);
    eprintln!(
        "[{test}] {} readings -> {} deltas, {:?}: none missing, none doubled, in order",
        v.readings, v.deltas, v.rejected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_kill_one() {
    let test = "scale_kill";
    let rig = rig(test).await;
    let mut a = rig.spawn("temperature-delta", &[]);
    let b = rig.spawn("temperature-delta", &[]);
    let c = rig.spawn("temperature-delta", &[]);
    // Instances join one after the other; the assignment settles to a fair share.
    let balanced = wait_balanced(&[&a, &b, &c]).await;
    assert!(
        balanced,
        "3 instances never settled on a fair share of {PARTITIONS} partitions"
    );
    assert!(
        wait_full_coverage(&[&a, &b, &c], Duration::from_secs(30))
            .await
            .is_some()
    );
    let thermo = load(&rig, "6000", "500");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(&rig.js, "DELTAS").await > 1500
        })
        .await
    );
    a.kill9();
    let took = wait_full_coverage(&[&b, &c], Duration::from_secs(30)).await;
    let took = took.expect("partitions of the dead instance were not taken over");
    eprintln!(
        "[{test}] partitions owned again {:.2}s after kill -9 (lease TTL 3s)",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(10));
    finish(test, &rig, thermo, 6000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_instance_is_fenced() {
    let test = "scale_zombie";
    let rig = rig(test).await;
    let a = rig.spawn("temperature-delta", &[]);
    let b = rig.spawn("temperature-delta", &[]);
    assert!(
        wait_full_coverage(&[&a, &b], Duration::from_secs(30))
            .await
            .is_some()
    );
    let had = owned(&a).await;
    let thermo = load(&rig, "6000", "500");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(&rig.js, "DELTAS").await > 1500
        })
        .await
    );
    a.signal("-STOP");
    // b takes everything over once a's leases expire.
    let took = wait_until(Duration::from_secs(20), || async {
        owned(&b).await.len() == PARTITIONS
    })
    .await;
    assert!(took, "b did not take over from the paused instance");
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal("-CONT");
    // The zombie finds out and gives its old partitions up; the fair share is restored later.
    let gave_up = wait_until(Duration::from_secs(20), || async {
        // Its own lease deadline stops it first (self-fencing), or the lost lease does.
        let log = a.log_text();
        [
            "lease lost",
            "lost the partition",
            "lease expired (not renewed in time)",
        ]
        .iter()
        .any(|m| log.contains(m))
    })
    .await;
    assert!(
        gave_up,
        "zombie did not notice it lost its partitions; had {had:?}:\n{}",
        a.log_text()
    );
    assert!(
        wait_full_coverage(&[&a, &b], Duration::from_secs(30))
            .await
            .is_some()
    );
    finish(test, &rig, thermo, 6000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_one_three_one_under_load() {
    let test = "scale_131";
    let rig = rig(test).await;
    let a = rig.spawn("temperature-delta", &[]);
    assert!(
        wait_full_coverage(&[&a], Duration::from_secs(30))
            .await
            .is_some()
    );
    let thermo = load(&rig, "8000", "500");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(&rig.js, "DELTAS").await > 1000
        })
        .await
    );
    let mut b = rig.spawn("temperature-delta", &[]);
    let mut c = rig.spawn("temperature-delta", &[]);
    let t = wait_until(Duration::from_secs(30), || async {
        let (x, y, z) = (
            owned(&a).await.len(),
            owned(&b).await.len(),
            owned(&c).await.len(),
        );
        x + y + z == PARTITIONS && x > 0 && y > 0 && z > 0
    })
    .await;
    assert!(t, "3 instances did not share the partitions");
    let balanced = wait_balanced(&[&a, &b, &c]).await;
    assert!(balanced, "3 instances never settled on a fair share");
    let t0 = Instant::now();
    assert!(
        b.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    assert!(
        c.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    let back = wait_full_coverage(&[&a], Duration::from_secs(20)).await;
    assert!(back.is_some(), "a did not take everything back");
    eprintln!(
        "[{test}] scale 3 -> 1 by SIGTERM: a owns all partitions {:.2}s after the first SIGTERM",
        t0.elapsed().as_secs_f64()
    );
    finish(test, &rig, thermo, 8000).await;
}

async fn views_of(api: &Proc) -> Vec<serde_json::Value> {
    integration_tests::views::sensors(api).await
}

/// Two view-builder instances sharing the partitions build the same views as one did, and a
/// rebuild from deltas-stream sequence 1 gives the same views again, while queries keep
/// answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_view_builders_and_a_rebuild_agree_with_one() {
    let test = "views_scale";
    let rig = rig(test).await;
    let delta = rig.spawn("temperature-delta", &[]);
    assert!(
        wait_full_coverage(&[&delta], Duration::from_secs(30))
            .await
            .is_some()
    );
    let thermo = load(&rig, "4000", "0");
    let mut thermo = thermo;
    assert!(
        thermo
            .wait_exit(Duration::from_secs(60))
            .await
            .is_ok_and(|s| s.success())
    );
    assert!(wait_drained(&rig.js, Duration::from_secs(60)).await);
    let deltas = count(&rig.js, "DELTAS").await;

    // Two instances build the views in one Redis.
    let vb1 = rig.spawn("view-builder", &[]);
    let vb2 = rig.spawn("view-builder", &[]);
    let mut api = rig.spawn("query-api", &[]);
    ready(&mut api).await;
    assert!(
        wait_balanced(&[&vb1, &vb2]).await,
        "two view-builders never shared the partitions"
    );
    let (n1, n2) = (owned(&vb1).await.len(), owned(&vb2).await.len());
    assert!(n1 > 0 && n2 > 0, "both instances work: {n1} + {n2}");
    let done = |want: u64| {
        let api = &api;
        async move {
            let v: serde_json::Value =
                reqwest::get(format!("http://{}/v1/sensors?limit=1000", api.http))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
            let highest = v["positions"]
                .as_object()?
                .values()
                .filter_map(serde_json::Value::as_u64)
                .max();
            (highest == Some(want) && v["sensors"].as_array()?.len() == 200).then_some(())
        }
    };
    assert!(
        wait_until(Duration::from_secs(60), || async {
            done(deltas).await.is_some()
        })
        .await
    );
    // The highest partition's position says only that one partition is done: wait until every
    // sensor's view reflects its own last delta before taking the views as the two instances' result.
    assert!(
        integration_tests::views::wait_complete(&rig.js, &api, Duration::from_secs(60)).await,
        "two view-builders did not apply every delta"
    );
    let two = views_of(&api).await;
    drop((vb1, vb2));

    // A single instance on a fresh key space gives the same views.
    let redis_db = format!(
        "{}/2",
        rig.env
            .iter()
            .find(|(k, _)| *k == "REDIS_URL")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    );
    let mut env1 = rig.env.clone();
    env1.retain(|(k, _)| *k != "REDIS_URL" && *k != "KAPPA_PARTITIONS");
    env1.push(("REDIS_URL", redis_db));
    env1.push(("KAPPA_PARTITIONS", "12".into()));
    let _vb = procs::start(test, "view-builder", &env1, &[]);
    let mut api1 = procs::start(test, "query-api", &env1, &[]);
    ready(&mut api1).await;
    let done1 = wait_until(Duration::from_secs(60), || async {
        let v = views_of(&api1).await;
        v.len() == 200 && v == two
    })
    .await;
    assert!(done1, "one view-builder built other views than two did");

    // Rebuild from sequence 1 while queries keep answering.
    let mut rebuild = procs::start(
        test,
        "view-builder",
        &env1,
        &["rebuild", "--grace-secs", "1"],
    );
    let mut answered = 0;
    while rebuild.child.try_wait().expect("wait").is_none() {
        let r = reqwest::get(format!("http://{}/v1/top?limit=3", api1.http))
            .await
            .expect("api");
        assert!(r.status().is_success(), "query failed during rebuild");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = rebuild
        .wait_exit(Duration::from_secs(1))
        .await
        .expect("exited");
    assert!(st.success(), "rebuild failed:\n{}", rebuild.log_text());
    assert_eq!(
        views_of(&api1).await,
        two,
        "rebuilt views differ from the live ones"
    );
    eprintln!(
        "[{test}] 2 instances == 1 instance == rebuild ({deltas} deltas, {answered} queries answered during the rebuild)"
    );
}
