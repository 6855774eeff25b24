//! The fault matrix (issue 11): a fault injected while readings keep flowing, then, once it has
//! healed and the pipeline has drained, every delta and dead letter judged by the oracle
//! ([`judge`]: only readings actually stored in `READINGS` count), no input with two outcomes,
//! and the views equal to a rebuild from sequence 1 where view-builder runs. Each row, for
//! `remote`, `local` and `affinity`, is recorded ([`matrix::record`]: `target/faults/<test>.jsonl`
//! and a `MATRIX|...` line on stderr) before it is asserted, so a failing row is in the table
//! too; `cargo run -p integration-tests --bin faults-table` writes `docs/faults.md`.
//!
//! Rows here:
//! - `matrix_nats_kill_*`: the test's own nats-server ([`Hosts`], default durability) killed
//!   with SIGKILL and restarted on the same port and store three times under load; thermometer,
//!   sensor-registry, temperature-delta, view-builder and query-api keep running throughout (the
//!   thermometer publishes a reading again, same `Nats-Msg-Id`, until it is acknowledged).
//! - `matrix_registry_race_*`: two sensor-registry instances racing 200 pairs of conflicting
//!   upserts (same expected version, different content) while temperature-delta processes
//!   readings; inputs are readings plus upserts.
//!
//! Short version (CI, the default): 20 sensors, 4,000 readings at 250/s, the broker down 1 s
//! each time; about 30 s a row. Long version (`KAPPA_FAULTS_LONG=1`, on demand): 200 sensors,
//! 40,000 readings at 500/s, the broker down 8 s each time (past the 6 s lease TTL).

use std::time::{Duration, Instant};

use integration_tests::hosts::{Durability, Hosts};
use integration_tests::matrix::{self, Row};
use integration_tests::race::registry_race;
use integration_tests::{Dag, count, judge, views, wait_drained, wait_until};

/// (sensors, readings, readings/s, seconds the broker stays down).
fn size() -> (u32, u64, u32, u64) {
    if matrix::long() {
        (200, 40_000, 500, 8)
    } else {
        (20, 4_000, 250, 1)
    }
}

fn thermometer_args(sensors: u32, readings: u64, rate: u32) -> Vec<String> {
    [
        "--sensors",
        &sensors.to_string(),
        "--count",
        &readings.to_string(),
        "--rate",
        &rate.to_string(),
        "--event-step-ms",
        "1000",
        "--out-of-order",
        "0.05",
        "--late",
        "0.01",
        "--seed",
        "23",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Deltas plus dead letters.
async fn outcomes(js: &async_nats::jetstream::Context) -> u64 {
    count(js, "DELTAS").await + count(js, "DLQ").await
}

/// Views vs a rebuild, and vs the oracle-judged latest delta of each sensor: the number of
/// sensors that differ.
async fn views_wrong(
    dag: &Dag,
    api: &integration_tests::Proc,
    j: &integration_tests::Judged,
) -> u64 {
    if !views::wait_applied(dag, api, Duration::from_secs(60)).await {
        eprintln!("[{}] views did not apply every delta", dag.test);
    }
    let live = views::sensors(api).await;
    let mut wrong = 0u64;
    for (id, d) in &j.verified.latest {
        let v = live
            .iter()
            .find(|v| v["sensor_id"].as_str() == Some(id.as_str()));
        if v.is_none_or(|v| v["source_seq"] != d["source_seq"]) {
            wrong += 1;
        }
    }
    wrong + views::differences_after_rebuild(dag, api).await as u64
}

async fn nats_kill(test: &str, working: &str) {
    let Some((mut hosts, servers)) = Hosts::start(test, Durability::DEFAULT).await else {
        return;
    };
    let (sensors, readings, rate, down) = size();
    let affinity = format!("{}/1", servers.redis_url);
    let dag = Dag::on(
        servers,
        test,
        &[
            ("KAPPA_WORKING", working),
            ("AFFINITY_REDIS_URL", &affinity),
            ("KAPPA_SNAPSHOT_SECS", "1"),
        ],
    )
    .await;
    let js = &dag.js;
    let delta = dag.ready("temperature-delta").await;
    let _views = dag.ready("view-builder").await;
    let api = dag.ready("query-api").await;
    let args = thermometer_args(sensors, readings, rate);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut thermo = dag.spawn("thermometer", &args);
    let mut recover = 0.0f64;
    let mut notes = Vec::new();
    for i in 1..=3u64 {
        let progress = wait_until(Duration::from_secs(120), || async {
            count(js, "DELTAS").await >= readings * i / 5
        })
        .await;
        assert!(
            progress,
            "no progress before kill {i}:\n{}",
            delta.log_tail(30)
        );
        hosts.nats.kill9();
        tokio::time::sleep(Duration::from_secs(down)).await;
        let heal = Instant::now();
        hosts.nats.restart().await;
        // The test's own client reconnects too; until it has, counts read 0.
        let mut stored = 0;
        let reconnected = Instant::now() + Duration::from_secs(60);
        while stored == 0 && Instant::now() < reconnected {
            stored = count(js, "READINGS").await;
            if stored == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let caught = wait_until(Duration::from_secs(120), || async {
            outcomes(js).await >= stored
        })
        .await;
        let secs = heal.elapsed().as_secs_f64();
        notes.push(format!("kill {i}: {stored} stored, caught up {secs:.1}s"));
        if !caught {
            notes.push(format!("kill {i}: not caught up in 120 s"));
        }
        recover = recover.max(secs);
    }
    let status = thermo
        .wait_exit(Duration::from_secs(300))
        .await
        .expect("thermometer finished");
    assert!(
        status.success(),
        "thermometer failed:\n{}",
        thermo.log_tail(30)
    );
    let drained = wait_drained(js, Duration::from_secs(120)).await;
    let j = judge(js).await;
    let vw = views_wrong(&dag, &api, &j).await;
    let mut row = Row::new(test, "nats-server kill -9 + restart x3", working)
        .judged(&j)
        .recovered(Some(recover))
        .detail(format!(
            "{sensors} sensors, {readings} readings at {rate}/s, down {down}s each; {}; views differing: {vw}{}",
            notes.join("; "),
            if drained { "" } else { "; NOT drained" }
        ));
    row.wrong += vw;
    matrix::record(&row);
    assert!(
        row.exact() && drained,
        "{}: {} ; first problems: {:#?}\ndelta log:\n{}",
        row.line(),
        row.detail,
        &j.problems[..j.problems.len().min(10)],
        delta.log_tail(30)
    );
}

async fn race_row(test: &str, working: &str) {
    let s = integration_tests::servers(test).await;
    let affinity = format!("{}/1", s.redis_url);
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_WORKING", working),
            ("AFFINITY_REDIS_URL", &affinity),
        ],
    )
    .await;
    let js = &dag.js;
    let delta = dag.ready("temperature-delta").await;
    let readings = 2_000u64;
    let args = thermometer_args(10, readings, 100);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut thermo = dag.spawn("thermometer", &args);
    let o = registry_race(&dag, 200, 2).await;
    let status = thermo
        .wait_exit(Duration::from_secs(120))
        .await
        .expect("thermometer finished");
    assert!(
        status.success(),
        "thermometer failed:\n{}",
        thermo.log_tail(30)
    );
    let drained = wait_drained(js, Duration::from_secs(60)).await;
    let j = judge(js).await;
    let mut row = Row::new(
        test,
        "two registries racing 200 pairs of conflicting upserts",
        working,
    )
    .judged(&j)
    .detail(format!(
        "{} upserts + {} readings; rounds without a winner: {}; refusals: {}; lost updates: {:?}{}",
        o.upserts,
        j.verified.readings,
        o.rounds_without_winner,
        o.refusals.values().sum::<u32>(),
        o.lost_detail,
        if drained { "" } else { "; NOT drained" }
    ));
    row.inputs += o.upserts;
    row.lost += o.lost;
    row.doubled += o.doubled;
    row.wrong += o.wrong;
    matrix::record(&row);
    assert!(
        row.exact() && drained && o.rounds_without_winner == 0,
        "{}: {}; first problems: {:#?}\ndelta log:\n{}",
        row.line(),
        row.detail,
        &j.problems[..j.problems.len().min(10)],
        delta.log_tail(30)
    );
}

macro_rules! rows {
    ($($name:ident: $f:ident, $w:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $f(stringify!($name), $w).await;
        }
    )*};
}

rows! {
    matrix_nats_kill_remote: nats_kill, "remote";
    matrix_nats_kill_local: nats_kill, "local";
    matrix_nats_kill_affinity: nats_kill, "affinity";
    matrix_registry_race_remote: race_row, "remote";
    matrix_registry_race_local: race_row, "local";
    matrix_registry_race_affinity: race_row, "affinity";
}
