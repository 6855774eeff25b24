//! Read-your-writes on the real DAG: a read with `min_seq=<the publish ack of a reading>`
//! reflects that reading (judged by the reading itself: the view's `source_seq` and value),
//! including a reading that was rejected (decided without a delta) and a sensor whose
//! readings all wait behind a stopped temperature-delta or view-builder (a JSON 503 naming
//! the hop and the position, then the answer once the service is back); a bound beyond the
//! readings stream is a 409; lists state a true low watermark over every partition.

use std::time::{Duration, Instant};

use integration_tests::{Dag, Proc, register, wait_partitions};
use kappa_runtime::partition::partition_for;
use kappa_testkit::http::get;

const SENSORS: usize = 6;

fn reading(id: &str, celsius: f64, i: u32) -> String {
    format!(
        r#"{{"sensor_id":"{id}","celsius":{celsius},"measured_at":"2026-11-24T17:{:02}:{:02}Z"}}"#,
        i / 60,
        i % 60
    )
}

/// Publishes and returns the reading's READINGS sequence (its publish ack) and stored subject.
async fn publish(dag: &Dag, id: &str, payload: String) -> u64 {
    dag.js
        .publish(format!("thermo.readings.{id}"), payload.into())
        .await
        .expect("publish")
        .await
        .expect("ack")
        .sequence
}

/// Waits until `p` runs all 4 partitions (a lease holder takes a few seconds to settle).
async fn running(p: &Proc) {
    assert!(
        wait_partitions(&p.http, 4, Duration::from_secs(30))
            .await
            .is_some(),
        "{} did not take its partitions",
        p.name
    );
}

async fn json(http: &reqwest::Client, api: &str, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = get(http, api, path).await.expect("query-api answers");
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (code, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_seq_reads_your_writes_and_lists_state_a_low_watermark() {
    let test = "read_your_writes";
    let dag = Dag::start(test, &[]).await;
    let mut delta = dag.ready("temperature-delta").await;
    let mut views = dag.ready("view-builder").await;
    let api = dag.ready("query-api").await;
    running(&delta).await;
    running(&views).await;
    let http = reqwest::Client::new();
    for i in 0..SENSORS {
        register(&dag.client, &format!("s-{i}"), "lab", 0.0, 600).await;
    }

    // 1. Each reading, read back right after its ack with min_seq = the ack: the answer is its
    // own delta (the newest reading of that sensor), never an older one.
    let mut immediate_stale = 0;
    let started = Instant::now();
    for k in 0..60u32 {
        let id = format!("s-{}", k as usize % SENSORS);
        let celsius = 20.0 + f64::from(k);
        let seq = publish(&dag, &id, reading(&id, celsius, k)).await;
        // The same read without a bound first, for comparison only (not asserted).
        let (_, plain) = json(&http, &api.http, &format!("/v1/sensors/{id}")).await;
        if plain["source_seq"].as_u64() != Some(seq) {
            immediate_stale += 1;
        }
        let (code, v) = json(&http, &api.http, &format!("/v1/sensors/{id}?min_seq={seq}")).await;
        assert_eq!(code, 200, "min_seq={seq}: {v}");
        assert_eq!(v["source_seq"].as_u64(), Some(seq), "reading {k}: {v}");
        assert_eq!(
            v["latest_celsius"].as_f64(),
            Some(celsius),
            "reading {k}: {v}"
        );
    }
    println!(
        "[{test}] 60 bounded reads right after their acks: all fresh, {:.1} ms each with the publish; an unbounded read right after the ack was stale {immediate_stale} times",
        started.elapsed().as_secs_f64() * 1000.0 / 60.0
    );

    // The server's partition of a sensor is the runtime's `partition_for`.
    let stream = dag.js.get_stream("READINGS").await.expect("READINGS");
    for i in 0..SENSORS {
        let id = format!("s-{i}");
        let m = stream
            .direct_get_last_for_subject(format!("thermo.readings.*.{id}"))
            .await
            .expect("last reading");
        let want = format!("thermo.readings.{}.{id}", partition_for(&id, 4));
        assert_eq!(m.subject.as_str(), want);
    }

    // 2. A reading that is rejected leaves no delta, yet it is decided: the bound is reached.
    let late = publish(&dag, "s-0", "{not json".to_string()).await;
    let unknown = publish(&dag, "s-none", reading("s-none", 1.0, 1)).await;
    let (code, v) = json(&http, &api.http, &format!("/v1/sensors/s-0?min_seq={late}")).await;
    assert_eq!(code, 200, "a rejected reading is decided: {v}");
    assert!(v["source_seq"].as_u64() < Some(late), "{v}");
    let (code, v) = json(
        &http,
        &api.http,
        &format!("/v1/sensors/s-none?min_seq={unknown}"),
    )
    .await;
    assert_eq!(code, 404, "decided, and the sensor has no view: {v}");

    // 3. Lists: every sensor reflects its newest reading; the watermark is the least partition.
    let (code, page) = json(&http, &api.http, &format!("/v1/sensors?min_seq={unknown}")).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["min_seq"].as_u64(), Some(unknown));
    let positions = page["positions"].as_object().expect("positions");
    assert_eq!(
        positions.len(),
        4,
        "one position per deltas partition: {page}"
    );
    let least = positions.values().filter_map(|p| p.as_u64()).min();
    assert_eq!(page["view_seq"].as_u64(), least, "{page}");
    let sensors = page["sensors"].as_array().expect("sensors");
    assert_eq!(sensors.len(), SENSORS);
    for s in sensors {
        let id = s["sensor_id"].as_str().unwrap_or_default();
        let k = (0..60u32)
            .rev()
            .find(|k| format!("s-{}", *k as usize % SENSORS) == id)
            .expect("a reading of it");
        assert_eq!(
            s["latest_celsius"].as_f64(),
            Some(20.0 + f64::from(k)),
            "{s}"
        );
    }

    // 4. Beyond the end of the readings stream: a 409 at once, naming the input stage.
    let beyond = unknown + 1000;
    let (code, v) = json(&http, &api.http, &format!("/v1/top?min_seq={beyond}")).await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["bound"]["stage"], "input", "{v}");
    assert_eq!(v["bound"]["position"].as_u64(), Some(unknown), "{v}");

    // 5. temperature-delta down: the reading is not decided; a 503 says so, then the answer.
    delta.kill9();
    let seq = publish(&dag, "s-1", reading("s-1", 55.0, 200)).await;
    let path = format!("/v1/sensors/s-1?min_seq={seq}&max_wait_ms=300");
    let (code, v) = json(&http, &api.http, &path).await;
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["bound"]["stage"], "decided", "{v}");
    assert_eq!(
        v["bound"]["partition"].as_u64(),
        Some(u64::from(partition_for("s-1", 4)))
    );
    let delta = dag.ready("temperature-delta").await;
    running(&delta).await;
    let (code, v) = json(
        &http,
        &api.http,
        &format!("/v1/sensors/s-1?min_seq={seq}&max_wait_ms=20000"),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["latest_celsius"].as_f64(), Some(55.0), "{v}");

    // 6. view-builder down: decided, not applied; a 503 says so, then the answer.
    views.kill9();
    let seq = publish(&dag, "s-2", reading("s-2", 66.0, 201)).await;
    let path = format!("/v1/sensors/s-2/history?min_seq={seq}&max_wait_ms=1500");
    let (code, v) = json(&http, &api.http, &path).await;
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["bound"]["stage"], "applied", "{v}");
    let views = dag.ready("view-builder").await;
    running(&views).await;
    let (code, v) = json(
        &http,
        &api.http,
        &format!("/v1/sensors/s-2/history?min_seq={seq}&max_wait_ms=20000"),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let last = v["history"].as_array().and_then(|h| h.last()).cloned();
    assert_eq!(
        last.and_then(|p| p["source_seq"].as_u64()),
        Some(seq),
        "{v}"
    );

    // Bad bounds are 400s.
    for bad in ["min_seq=-1", "min_seq=x", "min_seq=1&max_wait_ms=60001"] {
        let (code, v) = json(&http, &api.http, &format!("/v1/sensors/s-1?{bad}")).await;
        assert_eq!(code, 400, "{bad}: {v}");
    }
}
