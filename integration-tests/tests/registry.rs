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
