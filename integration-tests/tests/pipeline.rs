//! The reference DAG end to end, for every observed x working state option: thermometer ->
//! temperature-delta (with sensor-registry), checked reading by reading against the oracle.

use std::time::Duration;

use integration_tests::procs::Proc;
use integration_tests::{nats, servers, service_env, verify_exactly_once, wait_drained};

async fn end_to_end(test: &str, observed: &str, working: &str) {
    let s = servers(test).await;
    let affinity = format!("{}/1", s.redis_url);
    let env = service_env(
        &s,
        &[
            ("KAPPA_OBSERVED", observed),
            ("KAPPA_WORKING", working),
            ("AFFINITY_REDIS_URL", &affinity),
        ],
    );
    let (_c, js) = nats(&s.nats_url).await;
    let mut registry = Proc::start(test, "sensor-registry", &env, &[]);
    registry.wait_ready(Duration::from_secs(30)).await;
    let mut delta = Proc::start(test, "temperature-delta", &env, &[]);
    delta.wait_ready(Duration::from_secs(30)).await;
    let mut thermo = Proc::start(
        test,
        "thermometer",
        &env,
        &[
            "--sensors",
            "20",
            "--sites",
            "3",
            "--count",
            "3000",
            "--rate",
            "0",
            "--event-step-ms",
            "1000",
            "--out-of-order",
            "0.05",
            "--late",
            "0.01",
            "--seed",
            "7",
        ],
    );
    let status = thermo
        .wait_exit(Duration::from_secs(120))
        .expect("thermometer finished");
    assert!(
        status.success(),
        "thermometer failed:\n{}",
        thermo.log_text()
    );
    assert!(
        wait_drained(&js, Duration::from_secs(90)).await,
        "pipeline did not drain; delta log:\n{}",
        delta.log_text()
    );
    let v = verify_exactly_once(&js).await;
    assert_eq!(v.readings, 3000);
    assert!(v.deltas > 2800, "too few deltas: {v:?}");
    assert!(
        v.rejected.get("late").copied().unwrap_or(0) > 0,
        "no late reading was exercised"
    );
    assert_eq!(v.latest.len(), 20);
    eprintln!(
        "[{test}] {} readings -> {} deltas, rejected {:?}",
        v.readings, v.deltas, v.rejected
    );
    assert!(
        delta
            .terminate(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "delta did not drain on SIGTERM"
    );
}

macro_rules! combos {
    ($($name:ident: $o:literal, $w:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            end_to_end(stringify!($name), $o, $w).await;
        }
    )*};
}

combos! {
    e2e_semi_stateless_remote: "semi-stateless", "remote";
    e2e_semi_stateless_local: "semi-stateless", "local";
    e2e_semi_stateless_affinity: "semi-stateless", "affinity";
    e2e_stateful_remote: "stateful", "remote";
    e2e_stateful_local: "stateful", "local";
    e2e_stateful_affinity: "stateful", "affinity";
    e2e_stateless_remote: "stateless", "remote";
    e2e_stateless_local: "stateless", "local";
    e2e_stateless_affinity: "stateless", "affinity";
}
