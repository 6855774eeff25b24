//! Crashes, bad input and bad configuration, with the real binaries and real servers.

use std::time::Duration;

use integration_tests::procs::run_expecting_failure;
use integration_tests::{
    Dag, count, metric, publish_raw, read_stream, register, servers, verify_exactly_once,
    wait_drained, wait_ready, wait_until,
};

/// kill -9 temperature-delta mid-stream and restart it: exactly one delta per accepted
/// reading, equal to the oracle. `lose_store` also wipes the affinity store.
async fn crash_and_restart(
    test: &str,
    working: &str,
    lose_store: bool,
    sensors: u32,
    readings: u64,
) {
    let (sensors_s, readings_s) = (sensors.to_string(), readings.to_string());
    let s = servers(test).await;
    let affinity = format!("{}/1", s.redis_url);
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_WORKING", working),
            ("AFFINITY_REDIS_URL", &affinity),
            ("KAPPA_SNAPSHOT_SECS", "1"),
        ],
    )
    .await;
    let js = &dag.js;
    let mut delta = dag.ready("temperature-delta").await;
    let mut thermo = dag.spawn(
        "thermometer",
        &[
            "--sensors",
            &sensors_s,
            "--count",
            &readings_s,
            "--rate",
            "3000",
            "--event-step-ms",
            "1000",
            "--seed",
            "11",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(120), || async {
            count(js, "DELTAS").await > readings / 2
        })
        .await,
        "no progress before the crash"
    );
    delta.kill9();
    let before = count(js, "DELTAS").await;
    if lose_store {
        let mut r = kappa_testkit::clients::redis(&affinity)
            .await
            .expect("affinity redis");
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut r)
            .await
            .expect("flushdb");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut delta = dag.spawn("temperature-delta", &[]);
    wait_ready(&mut delta, Duration::from_secs(60)).await;
    let health = integration_tests::wait_partitions(&delta.http, 4, Duration::from_secs(30))
        .await
        .expect("partitions taken over after the crash");
    let recovery: f64 = health["checks"]["partitions"]["detail"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|p| p["recovery_secs"].as_f64())
                .fold(0.0, f64::max)
        })
        .unwrap_or(0.0);
    let status = thermo
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("thermometer finished");
    assert!(status.success());
    assert!(
        wait_drained(js, Duration::from_secs(90)).await,
        "did not drain:\n{}",
        delta.log_text()
    );
    let replayed = metric(&delta.http, "kappa_replayed_inputs_total").await;
    let v = verify_exactly_once(js).await;
    assert_eq!(v.readings as u64, readings);
    assert_eq!(
        v.deltas as u64, readings,
        "every reading of this run is valid and in order"
    );
    eprintln!(
        "[{test}] {sensors} sensors: crashed at {before} deltas; recovery {recovery:.3}s; replayed {replayed} inputs; {} deltas, none missing, none doubled",
        v.deltas
    );
    if working == "affinity" && !lose_store {
        // The colocated store kept everything committed: only the batches in flight replay.
        assert!(replayed <= 4.0 * 256.0, "replayed {replayed} inputs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_remote() {
    crash_and_restart("crash_remote", "remote", false, 50, 12_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_local() {
    crash_and_restart("crash_local", "local", false, 10_000, 30_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_affinity_store_kept() {
    crash_and_restart("crash_affinity_store_kept", "affinity", false, 50, 12_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_affinity_store_lost() {
    crash_and_restart("crash_affinity_store_lost", "affinity", true, 50, 12_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_and_the_partition_keeps_going() {
    let test = "bad_input";
    let dag = Dag::start(test, &[("KAPPA_PARTITIONS", "1")]).await;
    let (c, js) = (&dag.client, &dag.js);
    let mut delta = dag.ready("temperature-delta").await;
    register(c, "s-1", "lab", 0.0, 600).await;
    let good =
        |c: f64, t: &str| format!(r#"{{"sensor_id":"s-1","celsius":{c},"measured_at":"{t}"}}"#);
    publish_raw(js, "s-1", good(20.0, "2026-11-24T17:00:00Z")).await;
    publish_raw(js, "s-1", "{not json").await;
    publish_raw(js, "s-1", r#"{"sensor_id":"s-1"}"#).await;
    publish_raw(
        js,
        "s-1",
        r#"{"sensor_id":"s-1","celsius":"hot","measured_at":"2026-11-24T17:00:01Z"}"#,
    )
    .await;
    publish_raw(
        js,
        "s-1",
        r#"{"sensor_id":"s-1","celsius":1e999,"measured_at":"2026-11-24T17:00:01Z"}"#,
    )
    .await;
    publish_raw(
        js,
        "s-1",
        r#"{"sensor_id":"s-1","celsius":5000,"measured_at":"2026-11-24T17:00:01Z"}"#,
    )
    .await;
    publish_raw(
        js,
        "bad!id",
        r#"{"sensor_id":"bad!id","celsius":1,"measured_at":"2026-11-24T17:00:01Z"}"#,
    )
    .await;
    publish_raw(
        js,
        "s-404",
        r#"{"sensor_id":"s-404","celsius":1,"measured_at":"2026-11-24T17:00:01Z"}"#,
    )
    .await;
    publish_raw(js, "s-1", good(19.0, "2026-11-24T16:40:00Z")).await;
    publish_raw(
        js,
        "s-1",
        format!(
            r#"{{"sensor_id":"s-1","celsius":1,"pad":"{}"}}"#,
            "x".repeat(5000)
        ),
    )
    .await;
    publish_raw(js, "s-1", good(23.5, "2026-11-24T17:05:00Z")).await;
    assert!(
        wait_drained(js, Duration::from_secs(30)).await,
        "did not drain:\n{}",
        delta.log_text()
    );
    let v = verify_exactly_once(js).await;
    assert_eq!(v.deltas, 2, "{v:?}");
    let want: Vec<(&str, usize)> = vec![
        ("invalid_sensor_id", 1),
        ("late", 1),
        ("malformed", 3),
        ("out_of_bounds", 2),
        ("oversized", 1),
        ("unknown_sensor", 1),
    ];
    let got: Vec<(&str, usize)> = v.rejected.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    assert_eq!(got, want);
    let latest = &v.latest["s-1"];
    assert_eq!(latest["delta_celsius"].as_f64(), Some(3.5));
    assert!(
        delta.child.try_wait().expect("wait").is_none(),
        "the service must keep running"
    );
    assert!(
        reqwest::get(format!("http://{}/healthz", delta.http))
            .await
            .expect("healthz")
            .status()
            .is_success()
    );
    assert_eq!(metric(&delta.http, "kappa_rejected_total").await, 9.0);
    let dlq = read_stream(js, "DLQ").await;
    assert!(
        dlq.iter()
            .all(|m| m.subject.starts_with("kappa.dlq.temperature-delta.")),
        "dead letters go to kappa.dlq.<service>.<key>"
    );
    assert!(
        dlq.iter().any(|m| m.payload.as_ref() == b"{not json"),
        "original payload kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_non_zero_with_one_line() {
    let s = servers("bad_config").await;
    /// (binary, environment, what the error line must mention)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "temperature-delta",
            vec![("NATS_URL", "http://nowhere:4222".into())],
            "NATS_URL",
        ),
        (
            "sensor-registry",
            vec![("NATS_URL", "not a url".into())],
            "NATS_URL",
        ),
        (
            "temperature-delta",
            vec![
                ("NATS_URL", s.nats_url.clone()),
                ("REDIS_URL", "redis://127.0.0.1:1".into()),
            ],
            "REDIS_URL",
        ),
        (
            "temperature-delta",
            vec![
                ("NATS_URL", s.nats_url.clone()),
                ("REDIS_URL", "mysql://x".into()),
            ],
            "REDIS_URL",
        ),
        (
            "temperature-delta",
            vec![("KAPPA_WORKING", "sometimes".into())],
            "sometimes",
        ),
        (
            "temperature-delta",
            vec![("HTTP_ADDR", "eight-thousand".into())],
            "eight-thousand",
        ),
        (
            "thermometer",
            vec![("NATS_URL", "nats://127.0.0.1:1".into())],
            "127.0.0.1:1",
        ),
    ];
    for (bin_name, env, mention) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, lines) = run_expecting_failure(bin_name, &env);
        assert_ne!(code, 0, "{bin_name} {env:?} must fail");
        assert_eq!(
            lines.len(),
            1,
            "{bin_name} {env:?}: one line, got {lines:?}"
        );
        assert!(
            lines[0].contains(mention),
            "{bin_name}: '{}' should mention {mention}",
            lines[0]
        );
        eprintln!("[bad_config] {bin_name}: {}", lines[0]);
    }
}

/// One message on `thermo.deltas.<id>` that temperature-delta did not write (here even with its
/// `Kappa-Service` header, and a source sequence far beyond the readings stream) must not
/// silence the sensor: the runtime refuses to believe it, counts it, and the next reading still
/// gets its delta, computed from the real window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delta_does_not_silence_a_sensor() {
    let test = "forged_delta";
    let dag = Dag::start(test, &[("KAPPA_PARTITIONS", "1")]).await;
    let js = &dag.js;
    let delta = dag.ready("temperature-delta").await;
    register(&dag.client, "s-1", "lab", 0.0, 600).await;
    let good =
        |c: f64, t: &str| format!(r#"{{"sensor_id":"s-1","celsius":{c},"measured_at":"{t}"}}"#);
    publish_raw(js, "s-1", good(20.0, "2026-11-24T17:00:00Z")).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(js, "DELTAS").await == 1
        })
        .await
    );
    let mut h = async_nats::HeaderMap::new();
    h.insert("Kappa-Service", "temperature-delta");
    h.insert("Kappa-Source-Seq", "1000000000000");
    js.publish_with_headers(
        "thermo.deltas.s-1",
        h,
        r#"{"sensor_id":"s-1","site":"lab","delta_celsius":99.0,"oldest_celsius":0.0,"latest_celsius":99.0,"min_celsius":0.0,"max_celsius":99.0,"samples":1,"window_secs":600,"measured_at":"2026-11-24T17:00:30Z","window_end":"2026-11-24T17:00:30Z","reading_celsius":99.0,"calibration_offset":0.0,"sensor_version":1,"source_seq":1000000000000}"#.into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored: nothing but permissions can stop it on the wire");
    publish_raw(js, "s-1", good(23.0, "2026-11-24T17:01:00Z")).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(js, "DELTAS").await == 3
        })
        .await,
        "the sensor went silent after a forged delta:\n{}",
        delta.log_text()
    );
    let deltas = read_stream(js, "DELTAS").await;
    let last: serde_json::Value = serde_json::from_slice(&deltas[2].payload).expect("json");
    assert_eq!(last["samples"].as_u64(), Some(2), "{last}");
    assert_eq!(last["delta_celsius"].as_f64(), Some(3.0), "{last}");
    assert!(metric(&delta.http, "kappa_untrusted_outcomes_total").await >= 1.0);
    assert_eq!(count(js, "DLQ").await, 0);
}

/// The working store wiped while the service runs (`FLUSHALL`: a Redis restarted without
/// persistence, or failed over to an empty replica), then wiped again right before a kill -9
/// and a restart. Windows must never restart empty: every delta equals the oracle. The running
/// instance keeps deciding from what it holds; the restarted one finds entities and positions
/// missing and rebuilds them from the streams (each sensor's window is refolded from its deltas).
async fn store_wiped(test: &str, working: &str) {
    let s = servers(test).await;
    let redis_url = s.redis_url.clone();
    let affinity = format!("{}/1", s.redis_url);
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_WORKING", working),
            ("AFFINITY_REDIS_URL", &affinity),
            ("KAPPA_SNAPSHOT_SECS", "1"),
        ],
    )
    .await;
    let js = &dag.js;
    let readings: u64 = 12_000;
    let mut delta = dag.ready("temperature-delta").await;
    let mut thermo = dag.spawn(
        "thermometer",
        &[
            "--sensors",
            "50",
            "--count",
            "12000",
            "--rate",
            "2000",
            "--event-step-ms",
            "1000",
            "--seed",
            "5",
        ],
    );
    let flushall = || async {
        let mut r = kappa_testkit::clients::redis(&redis_url)
            .await
            .expect("redis");
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut r)
            .await
            .expect("flushall");
    };
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(js, "DELTAS").await > 3_000
        })
        .await,
        "no progress"
    );
    flushall().await;
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(js, "DELTAS").await > 7_000
        })
        .await,
        "no progress after the wipe:\n{}",
        delta.log_text()
    );
    flushall().await;
    delta.kill9();
    let mut delta = dag.spawn("temperature-delta", &[]);
    wait_ready(&mut delta, Duration::from_secs(60)).await;
    let status = thermo
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("thermometer finished");
    assert!(status.success());
    assert!(
        wait_drained(js, Duration::from_secs(120)).await,
        "did not drain:\n{}",
        delta.log_text()
    );
    let refolded = metric(&delta.http, "kappa_changes_refolded_total").await;
    let replayed = metric(&delta.http, "kappa_replayed_inputs_total").await;
    let v = verify_exactly_once(js).await;
    assert_eq!(v.readings as u64, readings);
    assert_eq!(
        v.deltas as u64, readings,
        "every reading is valid and in order"
    );
    eprintln!(
        "[{test}] two wipes, one kill -9: {} deltas equal to the oracle; after the restart {refolded} changes refolded, {replayed} inputs recognised as decided",
        v.deltas
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_wiped_remote() {
    store_wiped("store_wiped_remote", "remote").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_wiped_affinity() {
    store_wiped("store_wiped_affinity", "affinity").await;
}

/// READINGS deleted and created again while temperature-delta runs (the only way to change its
/// partition count): the new stream's sequences start at 1 again, below the stored positions.
/// The runtime must notice (the stream's identity changed), say so, and process the new stream
/// from its first message, with the windows kept: nothing skipped in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_readings_stream_is_detected_and_processed_from_its_start() {
    let test = "readings_recreated";
    let dag = Dag::start(test, &[("KAPPA_PARTITIONS", "2")]).await;
    let js = &dag.js;
    let delta = dag.ready("temperature-delta").await;
    register(&dag.client, "s-1", "lab", 0.0, 600).await;
    let good =
        |c: f64, t: &str| format!(r#"{{"sensor_id":"s-1","celsius":{c},"measured_at":"{t}"}}"#);
    for (c, t) in [
        (20.0, "2026-11-24T17:00:00Z"),
        (21.0, "2026-11-24T17:00:10Z"),
        (22.0, "2026-11-24T17:00:20Z"),
    ] {
        publish_raw(js, "s-1", good(c, t)).await;
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(js, "DELTAS").await == 3
        })
        .await
    );
    js.delete_stream("READINGS").await.expect("delete READINGS");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "READINGS".into(),
        subjects: vec!["thermo.readings.*".into()],
        subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
            source: "thermo.readings.*".into(),
            destination: "thermo.readings.{{partition(2,1)}}.{{wildcard(1)}}".into(),
        }),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("create READINGS again");
    publish_raw(js, "s-1", good(23.0, "2026-11-24T17:00:30Z")).await;
    publish_raw(js, "s-1", good(25.0, "2026-11-24T17:00:40Z")).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(js, "DELTAS").await == 5
        })
        .await,
        "readings of the new stream were skipped:\n{}",
        delta.log_text()
    );
    let deltas = read_stream(js, "DELTAS").await;
    let last: serde_json::Value = serde_json::from_slice(&deltas[4].payload).expect("json");
    record_stream_row(
        test,
        "READINGS deleted and created again while running",
        5,
        deltas.len() as u64,
        u64::from(
            last["samples"].as_u64() != Some(5) || last["delta_celsius"].as_f64() != Some(5.0),
        ),
    );
    assert_eq!(last["source_seq"].as_u64(), Some(2), "{last}");
    assert_eq!(
        last["samples"].as_u64(),
        Some(5),
        "the window was kept: {last}"
    );
    assert_eq!(last["delta_celsius"].as_f64(), Some(5.0), "{last}");
    assert!(metric(&delta.http, "kappa_input_stream_replaced_total").await >= 1.0);
    assert_eq!(count(js, "DLQ").await, 0);
}

/// The fault-matrix row of a replaced-stream test: `expected` deltas in the new stream,
/// `got` there, `wrong` if the last one differs from what the kept window gives (the test's
/// own assertions right after say how).
fn record_stream_row(test: &str, fault: &str, expected: u64, got: u64, wrong: u64) {
    let mut row = integration_tests::matrix::Row::new(test, fault, "remote")
        .detail("the last delta checked against the kept 10-minute window");
    row.inputs = expected;
    row.lost = expected.saturating_sub(got);
    row.doubled = got.saturating_sub(expected);
    row.wrong = wrong;
    integration_tests::matrix::record(&row);
}

/// The change log (DELTAS) deleted and created again while everything runs, the only way to
/// change its partitions: temperature-delta keeps its windows and continues the new log from
/// them, and the views keep what they hold and follow the new log from its first message
/// (its sequences start again at 1, below every stored position).
#[tokio::test]
async fn a_recreated_deltas_stream_is_followed_by_the_service_and_the_views() {
    let test = "deltas_recreated";
    let dag = Dag::start(test, &[("KAPPA_PARTITIONS", "2")]).await;
    let js = &dag.js;
    let delta = dag.ready("temperature-delta").await;
    let views = dag.ready("view-builder").await;
    let api = dag.ready("query-api").await;
    register(&dag.client, "s-1", "lab", 0.0, 600).await;
    register(&dag.client, "s-2", "roof", 0.0, 600).await;
    let good = |s: &str, c: f64, t: &str| {
        format!(r#"{{"sensor_id":"{s}","celsius":{c},"measured_at":"{t}"}}"#)
    };
    for (c, t) in [
        (20.0, "2026-11-24T17:00:00Z"),
        (21.0, "2026-11-24T17:00:10Z"),
        (22.0, "2026-11-24T17:00:20Z"),
    ] {
        publish_raw(js, "s-1", good("s-1", c, t)).await;
        publish_raw(js, "s-2", good("s-2", c + 10.0, t)).await;
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(js, "DELTAS").await == 6
        })
        .await
    );
    assert!(
        integration_tests::views::wait_applied(&dag, &api, Duration::from_secs(30)).await,
        "the views did not apply the first deltas:\n{}",
        views.log_tail(40)
    );
    let before = integration_tests::views::sensors(&api).await;
    let s2_before = before
        .iter()
        .find(|v| v["sensor_id"] == "s-2")
        .cloned()
        .expect("s-2 has a view");

    js.delete_stream("DELTAS").await.expect("delete DELTAS");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "DELTAS".into(),
        subjects: vec!["thermo.deltas.*".into()],
        subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
            source: "thermo.deltas.*".into(),
            destination: "thermo.deltas.{{partition(2,1)}}.{{wildcard(1)}}".into(),
        }),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("create DELTAS again");
    publish_raw(js, "s-1", good("s-1", 23.0, "2026-11-24T17:00:30Z")).await;
    publish_raw(js, "s-1", good("s-1", 25.0, "2026-11-24T17:00:40Z")).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(js, "DELTAS").await == 2
        })
        .await,
        "temperature-delta did not continue the new change log:\n{}",
        delta.log_tail(40)
    );
    let deltas = read_stream(js, "DELTAS").await;
    let last: serde_json::Value = serde_json::from_slice(&deltas[1].payload).expect("json");
    record_stream_row(
        test,
        "DELTAS (the change log) deleted and created again while running",
        2,
        deltas.len() as u64,
        u64::from(
            last["samples"].as_u64() != Some(5) || last["delta_celsius"].as_f64() != Some(5.0),
        ),
    );
    assert_eq!(
        last["samples"].as_u64(),
        Some(5),
        "the window was kept: {last}"
    );
    assert_eq!(last["delta_celsius"].as_f64(), Some(5.0), "{last}");
    assert!(metric(&delta.http, "kappa_changelog_replaced_total").await >= 1.0);

    // The views follow the new log: s-1 shows its newest delta (sequence 2 of the new
    // stream), s-2 keeps the view it had.
    let followed = wait_until(Duration::from_secs(30), || async {
        integration_tests::views::sensors(&api)
            .await
            .iter()
            .any(|v| {
                v["sensor_id"] == "s-1"
                    && v["view_seq"].as_u64() == Some(deltas[1].seq)
                    && v["delta_celsius"].as_f64() == Some(5.0)
            })
    })
    .await;
    assert!(
        followed,
        "the views skipped the new log: {:?}\n{}",
        integration_tests::views::sensors(&api).await,
        views.log_tail(40)
    );
    let after = integration_tests::views::sensors(&api).await;
    assert_eq!(
        after.iter().find(|v| v["sensor_id"] == "s-2"),
        Some(&s2_before),
        "the views kept what they held"
    );
    assert!(metric(&views.http, "kappa_views_input_replaced_total").await >= 1.0);
    assert_eq!(count(js, "DLQ").await, 0);

    // A rebuild now reads the new log only (the documented rule): it swaps in although the
    // active generation's positions in s-2's partition refer to the old log, gives s-1 the
    // same view, and has no s-2.
    let s1 = |all: &[serde_json::Value]| all.iter().find(|v| v["sensor_id"] == "s-1").cloned();
    let s1_live = s1(&after);
    let differing = integration_tests::views::differences_after_rebuild(&dag, &api).await;
    let rebuilt = integration_tests::views::sensors(&api).await;
    assert_eq!(s1(&rebuilt), s1_live, "{rebuilt:?}");
    assert_eq!(differing, 1, "only s-2 differs: {rebuilt:?}");
}
