//! Registry updates racing: two sensor-registry instances, many concurrent upserts of one sensor
//! with the same `expected_version` and different content. Exactly one may win each version,
//! and every instance must then serve what the `SENSORS` stream holds, never a change it was
//! told it stored but that is not there (a lost update).
//!
//! Run twice: on the suite's server, and on a 3-node cluster with `SENSORS` replicated 3 times.
//! The second matters: a replicated stream checks `Nats-Msg-Id` duplicates before
//! `Nats-Expected-Last-Subject-Sequence` (nats-server 2.15.1; a single server checks the fence
//! first), so the loser of a race that reuses the winner's message id gets a *duplicate* ack,
//! not a conflict.
//!
//! Also: commands for many sensors sent at once (the registry runs them concurrently) are all
//! applied, and each sensor's commands apply in the order they were sent.

use std::time::Duration;

use integration_tests::race::{RaceOutcome, registry_race};
use integration_tests::{Dag, nats, nats_cluster};

const ROUNDS: u64 = 8;
const TASKS: u64 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_upserts_have_one_winner_and_every_instance_serves_the_stored_change() {
    race(Dag::start("registry_race", &[]).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_upserts_on_a_replicated_stream_have_one_winner() {
    let test = "registry_race_r3";
    let Some(servers) = nats_cluster(test, 3).await else {
        return;
    };
    // Declared before the registries start (they keep an existing stream, whose replica count
    // must be KAPPA_REPLICAS's): replicated.
    let (_, js) = nats(&servers.nats_url).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SENSORS".into(),
        subjects: vec!["registry.sensors.*".into()],
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("SENSORS on the cluster");
    race(Dag::on(servers, test, &[("KAPPA_REPLICAS", "3")]).await).await;
}

async fn race(dag: Dag) {
    let o: RaceOutcome = registry_race(&dag, ROUNDS, TASKS).await;
    eprintln!("[{}] {o:?}", dag.test);
    assert_eq!(o.doubled, 0, "a version was answered ok twice: {o:?}");
    assert_eq!(o.rounds_without_winner, 0, "one winner per round: {o:?}");
    assert_eq!(
        o.lost, 0,
        "an upsert answered ok is not the stored change of its version: {o:?}"
    );
    assert_eq!(
        o.wrong, 0,
        "an instance serves a sensor the stream does not hold: {o:?}"
    );
}

/// 300 sensors, 3 commands each, all sent before any answer is read: command `n` of a sensor
/// names `expected_version: n`, so it succeeds only if the ones before it were applied first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_many_sensors_at_once_apply_in_order_per_sensor() {
    use futures::StreamExt;
    const SENSORS: usize = 300;
    const VERSIONS: u64 = 3;
    let dag = Dag::start("registry_many", &[]).await;
    let inbox = "_INBOX.registry_many";
    let mut replies = dag
        .client
        .subscribe(format!("{inbox}.>"))
        .await
        .expect("reply inbox");
    // Published one after another on one connection: the registry receives them in this order.
    for v in 0..VERSIONS {
        for i in 0..SENSORS {
            let body = serde_json::json!({
                "sensor_id": format!("many-{i}"),
                "site": format!("site-{v}"),
                "calibration_offset": 0.0,
                "window_secs": 60,
                "expected_version": v,
            });
            dag.client
                .publish_with_reply(
                    "registry.cmd.upsert",
                    format!("{inbox}.{i}.{v}"),
                    body.to_string().into(),
                )
                .await
                .expect("publish command");
        }
    }
    dag.client.flush().await.expect("flush");
    let mut answered = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answered.len() < SENSORS * VERSIONS as usize {
        let m = tokio::time::timeout_at(deadline, replies.next())
            .await
            .unwrap_or_else(|_| panic!("{} of the commands answered", answered.len()))
            .expect("inbox open");
        let reply: serde_json::Value = serde_json::from_slice(&m.payload).expect("reply json");
        answered.insert(m.subject.to_string(), reply);
    }
    for v in 0..VERSIONS {
        for i in 0..SENSORS {
            let reply = &answered[&format!("{inbox}.{i}.{v}")];
            assert_eq!(reply["ok"], true, "sensor many-{i}, command {v}: {reply}");
            assert_eq!(
                reply["version"],
                v + 1,
                "sensor many-{i}, command {v}: {reply}"
            );
        }
    }
    // The stream holds each sensor's changes in the order of its commands.
    let mut seen: std::collections::HashMap<String, Vec<(u64, String)>> =
        std::collections::HashMap::new();
    for m in integration_tests::read_stream(&dag.js, "SENSORS").await {
        let s: serde_json::Value = serde_json::from_slice(&m.payload).expect("sensor json");
        seen.entry(s["sensor_id"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push((
                s["version"].as_u64().unwrap_or_default(),
                s["site"].as_str().unwrap_or_default().to_string(),
            ));
    }
    assert_eq!(seen.len(), SENSORS);
    for (id, changes) in &seen {
        let expected: Vec<(u64, String)> = (0..VERSIONS)
            .map(|v| (v + 1, format!("site-{v}")))
            .collect();
        assert_eq!(changes, &expected, "changes of {id}");
    }
}
