//! A snapshot of more keys than a NATS connection lets publish acks be outstanding (async-nats's
//! default is 5,000): temperature-delta `local` with 10^5 sensors stalled after its first such
//! flush, using no CPU and ignoring SIGTERM, because the flush published every key before
//! awaiting any ack and then waited for a permit only its own awaits could give back.
//!
//! Here one partition holds 8,000 sensors and snapshots only when it stops (every key is in
//! that one flush): the SIGTERM must end the process with the snapshot written, a restart must
//! open from it without replaying the readings, and the outputs must match the oracle.

use std::time::Duration;

use integration_tests::{Dag, metric, ready, verify_exactly_once, wait_drained};

const SENSORS: &str = "8000";

/// Publishes `count` readings over the sensors and waits until `td` has processed them all.
async fn publish_and_drain(rig: &Dag, td: &integration_tests::Proc, count: &str, seed: &str) {
    let mut t = thermometer(rig, count, seed);
    assert!(
        t.wait_exit(Duration::from_secs(120))
            .await
            .expect("thermometer finished")
            .success()
    );
    assert!(
        wait_drained(&rig.js, Duration::from_secs(180)).await,
        "{count} readings over {SENSORS} sensors did not drain:\n{}",
        td.log_tail(20)
    );
}

fn thermometer(rig: &Dag, count: &str, seed: &str) -> integration_tests::Proc {
    rig.spawn(
        "thermometer",
        &[
            "--sensors",
            SENSORS,
            "--count",
            count,
            "--rate",
            "20000",
            "--event-step-ms",
            "1000",
            "--seed",
            seed,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_more_keys_than_acks_in_flight_is_written_and_read_back() {
    let test = "snapshot_size";
    let rig = Dag::start(
        test,
        &[
            ("KAPPA_WORKING", "local"),
            ("KAPPA_PARTITIONS", "1"),
            ("KAPPA_OWNERSHIP", "static"),
            ("KAPPA_SNAPSHOT_SECS", "600"),
        ],
    )
    .await;
    let mut td = rig.spawn("temperature-delta", &[]);
    ready(&mut td).await;
    publish_and_drain(&rig, &td, "16000", "11").await;
    // The only snapshot: every sensor's key in one flush, on the way out.
    let status = td.terminate(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "{test}: temperature-delta did not end within 60 s of SIGTERM (final snapshot of \
         {SENSORS} keys): {status:?}\n{}",
        td.log_tail(20)
    );
    // A restart opens from that snapshot: nothing before it is decided again.
    let mut td = rig.spawn("temperature-delta", &[]);
    ready(&mut td).await;
    publish_and_drain(&rig, &td, "8000", "12").await;
    let replayed = metric(&td.http, "kappa_replayed_inputs_total").await;
    let v = verify_exactly_once(&rig.js).await;
    assert_eq!(v.readings, 24_000);
    assert_eq!(
        replayed, 0.0,
        "{test}: the restart replayed readings the snapshot covers"
    );
    eprintln!(
        "[{test}] {} readings -> {} deltas over {SENSORS} sensors, one snapshot of every key, \
         restart replayed {replayed}: none missing, none doubled, in order",
        v.readings, v.deltas
    );
}
