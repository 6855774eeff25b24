//! `KAPPA_REPLICAS`: every stream and KV bucket a service declares takes its replica count from
//! it, a count the servers cannot hold stops the service at start with one line, and so does an
//! existing stream with another count (the runtime never changes one).
//!
//! - a bad value (0, 9, not a number): one line, non-zero exit, before any connection;
//! - 3 on one nats-server (the suite's): every service refuses, one line naming the single
//!   server;
//! - on a 3-node cluster of host nats-server processes ([`nats_cluster`]): 5 does not fit (the
//!   server's "no suitable peers for placement"); 3 gives READINGS, DELTAS, SENSORS, DLQ,
//!   KAPPA_STATE and the lease bucket three replicas each; then 1 is refused by the existing
//!   R3 streams.

use std::time::Duration;

use integration_tests::procs::run_expecting_failure;
use integration_tests::{Dag, nats_cluster, servers};

const SERVICES: [&str; 5] = [
    "thermometer",
    "sensor-registry",
    "temperature-delta",
    "view-builder",
    "query-api",
];

/// Runs `service` with `env`, expecting a refusal: its one stderr line.
fn refusal(service: &str, env: &[(&str, &str)]) -> String {
    let (code, lines) = run_expecting_failure(service, env);
    assert_ne!(code, 0, "{service} {env:?} must fail");
    assert_eq!(lines.len(), 1, "{service} {env:?}: one line, got {lines:?}");
    eprintln!("[replicas] {service}: {}", lines[0]);
    lines[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_replica_count_is_refused_in_one_line() {
    for value in ["0", "9", "three"] {
        let line = refusal("temperature-delta", &[("KAPPA_REPLICAS", value)]);
        assert!(
            line.to_ascii_lowercase().contains("replicas") && line.contains(value),
            "'{line}' should name the setting and {value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_do_not_fit_one_server() {
    let s = servers("replicas_one_server").await;
    for service in SERVICES {
        let line = refusal(
            service,
            &[
                ("NATS_URL", &s.nats_url),
                ("REDIS_URL", &s.redis_url),
                ("KAPPA_REPLICAS", "3"),
            ],
        );
        assert!(
            line.contains("KAPPA_REPLICAS=3") && line.contains("single server"),
            "{service}: '{line}' should say that one server holds one replica"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_and_bucket_takes_the_replica_count_on_a_cluster() {
    let test = "replicas_cluster";
    let Some(servers) = nats_cluster(test, 3).await else {
        return;
    };
    let url = servers.nats_url.clone();
    let redis = servers.redis_url.clone();
    let five = refusal("query-api", &[("NATS_URL", &url), ("KAPPA_REPLICAS", "5")]);
    assert!(
        five.contains("KAPPA_REPLICAS=5 does not fit the cluster"),
        "'{five}'"
    );
    let dag = Dag::on(
        servers,
        test,
        &[("KAPPA_REPLICAS", "3"), ("KAPPA_WORKING", "local")],
    )
    .await;
    let delta = dag.ready("temperature-delta").await;
    let _views = dag.ready("view-builder").await;
    let mut thermo = dag.spawn(
        "thermometer",
        &["--sensors", "3", "--count", "30", "--rate", "30"],
    );
    let streams = [
        "READINGS",
        "DELTAS",
        "SENSORS",
        "DLQ",
        "KAPPA_STATE",
        "KV_KAPPA_LEASES_TEMPERATURE_DELTA",
        "KV_KAPPA_LEASES_VIEW_BUILDER",
        "KV_KAPPA_PROGRESS_TEMPERATURE_DELTA",
    ];
    for name in streams {
        // A service answers /healthz before it has declared its buckets (the lease bucket is
        // declared when ownership starts, after the progress bucket): wait for each.
        let declared = integration_tests::wait_until(Duration::from_secs(20), || async {
            dag.js.get_stream(name).await.is_ok()
        })
        .await;
        assert!(declared, "{name} was not declared:\n{}", delta.log_tail(20));
        let mut s = dag
            .js
            .get_stream(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", delta.log_tail(20)));
        let info = s.info().await.expect("stream info");
        assert_eq!(
            info.config.num_replicas, 3,
            "{name} is not replicated 3 times"
        );
        // The servers holding it: the leader and the other replicas, by name (while a leader
        // is being elected, the list of replicas names every peer: CI saw 3 replicas and no
        // leader, counted as 4 by "replicas + 1").
        let placed = info.cluster.as_ref().map_or(0, |c| {
            let mut names: std::collections::BTreeSet<&str> =
                c.replicas.iter().map(|r| r.name.as_str()).collect();
            names.extend(c.leader.as_deref());
            names.len()
        });
        assert_eq!(placed, 3, "{name} is not placed on 3 servers");
    }
    // Judged once every reading is published: judging while the thermometer still publishes
    // read a delta whose reading came after READINGS was read (the "unknown reading" of
    // stops 19 and 20).
    let status = thermo
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("thermometer finished");
    assert!(status.success(), "thermometer:\n{}", thermo.log_tail(20));
    assert!(
        integration_tests::wait_drained(&dag.js, Duration::from_secs(60)).await,
        "the readings were not processed on R3 streams:\n{}",
        delta.log_tail(30)
    );
    integration_tests::verify_exactly_once(&dag.js).await;
    let one = refusal(
        "temperature-delta",
        &[
            ("NATS_URL", &url),
            ("REDIS_URL", &redis),
            ("KAPPA_REPLICAS", "1"),
        ],
    );
    assert!(
        one.contains("has 3 replica(s) but KAPPA_REPLICAS=1"),
        "'{one}' should refuse the existing R3 stream"
    );
}
