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

use std::collections::BTreeMap;
use std::time::Duration;

use integration_tests::{Dag, nats, nats_cluster, read_stream, ready, wait_until};

const SENSOR: &str = "race-1";
const ROUNDS: u64 = 8;
const TASKS: u64 = 8;

async fn upsert(client: &async_nats::Client, body: serde_json::Value) -> serde_json::Value {
    for _ in 0..20 {
        if let Ok(Ok(m)) = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("registry.cmd.upsert", body.to_string().into()),
        )
        .await
        {
            return serde_json::from_slice(&m.payload).expect("reply json");
        }
    }
    panic!("registry did not answer {body}");
}

/// The last message of the sensor's subject in `SENSORS`.
async fn stored(js: &async_nats::jetstream::Context) -> serde_json::Value {
    let subject = format!("registry.sensors.{SENSOR}");
    let last = read_stream(js, "SENSORS")
        .await
        .into_iter()
        .rfind(|m| m.subject == subject)
        .expect("the sensor has a message");
    serde_json::from_slice(&last.payload).expect("sensor json")
}

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
    // Declared before the registries start (they keep an existing stream): replicated.
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
    race(Dag::on(servers, test, &[]).await).await;
}

async fn race(dag: Dag) {
    let mut second = dag.spawn("sensor-registry", &[]);
    ready(&mut second).await;
    let (c, js) = (&dag.client, &dag.js);

    let first = upsert(
        c,
        serde_json::json!({"sensor_id": SENSOR, "site": "lab", "calibration_offset": 0.0,
            "window_secs": 600, "expected_version": 0}),
    )
    .await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["version"], 1, "{first}");

    let mut winners: BTreeMap<u64, Vec<serde_json::Value>> = BTreeMap::new();
    let mut refusals: BTreeMap<String, u32> = BTreeMap::new();
    for round in 1..=ROUNDS {
        // Both instances must know version `round` before the round starts (they follow each
        // other's changes through the stream), so both accept the expected version.
        let settled = wait_until(Duration::from_secs(10), || async {
            let mut ok = 0;
            for _ in 0..8 {
                if let Ok(Ok(m)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    c.request(format!("registry.get.{SENSOR}"), "".into()),
                )
                .await
                {
                    let v: serde_json::Value =
                        serde_json::from_slice(&m.payload).expect("get json");
                    if v["version"] == round {
                        ok += 1;
                    }
                }
            }
            ok == 8
        })
        .await;
        assert!(
            settled,
            "round {round}: instances never agreed on version {round}"
        );
        let replies = futures::future::join_all((0..TASKS).map(|task| {
            let c = c.clone();
            async move {
                let offset = (round * 10 + task) as f64 / 10.0;
                let body = serde_json::json!({"sensor_id": SENSOR, "site": format!("site-{task}"),
                    "calibration_offset": offset, "window_secs": 600 + task,
                    "expected_version": round});
                (body.clone(), upsert(&c, body).await)
            }
        }))
        .await;
        for (body, reply) in replies {
            if reply["ok"] == true {
                let v = reply["version"].as_u64().expect("version");
                winners.entry(v).or_default().push(body);
            } else {
                // A refusal is never wrong here (a conflict, or the registry unable to decide
                // in time); only a second winner, or serving what is not stored, is.
                let err = reply["error"].as_str().unwrap_or_default().to_string();
                *refusals.entry(err).or_insert(0u32) += 1;
            }
        }
    }
    eprintln!("[{}] refusals: {refusals:?}", dag.test);
    for (v, bodies) in &winners {
        assert_eq!(
            bodies.len(),
            1,
            "version {v} was answered ok {} times: {bodies:?}",
            bodies.len()
        );
    }
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (2..=ROUNDS + 1).collect::<Vec<_>>(),
        "one winner per round"
    );

    // Every answer of either instance (requests are spread over the queue group at random)
    // equals the last message stored; 40 equal answers in a row.
    let last = stored(js).await;
    assert_eq!(last["version"], ROUNDS + 1, "{last}");
    let won = &winners[&(ROUNDS + 1)][0];
    assert_eq!(
        last["site"], won["site"],
        "the stored change is the winner's"
    );
    let seen = std::sync::Mutex::new(Vec::new());
    let converged = wait_until(Duration::from_secs(10), || async {
        let mut wrong = Vec::new();
        for _ in 0..40 {
            let m = c
                .request(format!("registry.get.{SENSOR}"), "".into())
                .await
                .expect("get");
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("get json");
            if v != last {
                wrong.push(v);
            }
        }
        let none = wrong.is_empty();
        *seen.lock().expect("lock") = wrong;
        none
    })
    .await;
    assert!(
        converged,
        "an instance serves a sensor the stream does not hold: stored {last}, served {:?}",
        seen.lock().expect("lock")
    );
}
