//! The observed-state options against a real registry: semi-stateless freshness, refresh after
//! a gap in the change stream, and registry outage; stateful bootstrap of 10,000 sensors
//! without any request-reply.

use std::time::Duration;

use futures::StreamExt;
use integration_tests::proxy::CuttableLink;
use integration_tests::{
    Dag, count, healthz, metric, procs, publish_raw, read_stream, ready, register, servers,
    wait_until,
};
use kappa_testkit::streams::wait_count;

fn reading(id: &str, c: f64, at: &str) -> String {
    format!(r#"{{"sensor_id":"{id}","celsius":{c},"measured_at":"{at}"}}"#)
}

async fn deltas(js: &async_nats::jetstream::Context) -> Vec<serde_json::Value> {
    read_stream(js, "DELTAS")
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("json"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_stateless_sees_a_registry_change_before_the_timeout() {
    let test = "semi_fresh";
    let dag = Dag::start(
        test,
        &[
            ("KAPPA_OBSERVED", "semi-stateless"),
            ("KAPPA_CACHE_TTL_SECS", "300"),
        ],
    )
    .await;
    let (c, js) = (&dag.client, &dag.js);
    let delta = dag.ready("temperature-delta").await;
    register(c, "s-1", "lab", 0.0, 600).await;
    publish_raw(js, "s-1", reading("s-1", 20.0, "2026-11-24T17:00:00Z")).await;
    assert!(wait_count(js, "DELTAS", 1, Duration::from_secs(10)).await);
    let v2 = register(c, "s-1", "lab", 5.0, 600).await;
    assert_eq!(v2, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_raw(js, "s-1", reading("s-1", 20.0, "2026-11-24T17:00:01Z")).await;
    assert!(wait_count(js, "DELTAS", 2, Duration::from_secs(10)).await);
    let d = deltas(js).await;
    assert_eq!(d[0]["reading_celsius"].as_f64(), Some(20.0));
    assert_eq!(
        d[1]["reading_celsius"].as_f64(),
        Some(25.0),
        "new offset applied: {}",
        d[1]
    );
    assert_eq!(d[1]["sensor_version"].as_u64(), Some(2));
    // One miss filled the cache; the change arrived by the stream, not by asking again.
    assert_eq!(
        metric(&delta.http, "kappa_observed_requests_total").await,
        1.0
    );
}

/// A forced gap: temperature-delta's link to NATS is cut while the registry changes a cached
/// sensor, so the change can never reach its cache by the change stream in time. Once the link
/// heals, the reconnection must be taken as a gap (the cache is cleared) and the next reading
/// is computed with the new offset, although the cache's time-out is 300 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_stateless_refreshes_a_stale_entry_after_a_gap() {
    let test = "semi_gap";
    let s = servers(test).await;
    let upstream = s.nats_url.trim_start_matches("nats://").to_string();
    let link = CuttableLink::start(&upstream).await;
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_OBSERVED", "semi-stateless"),
            ("KAPPA_CACHE_TTL_SECS", "300"),
        ],
    )
    .await;
    let (c, js) = (&dag.client, &dag.js);
    let mut delta_env = dag.env.clone();
    delta_env.retain(|(k, _)| *k != "NATS_URL");
    delta_env.push(("NATS_URL", format!("nats://{}", link.addr)));
    let mut delta = procs::start(test, "temperature-delta", &delta_env, &[]);
    ready(&mut delta).await;
    register(c, "s-1", "lab", 0.0, 600).await;
    publish_raw(js, "s-1", reading("s-1", 20.0, "2026-11-24T17:00:00Z")).await;
    assert!(wait_count(js, "DELTAS", 1, Duration::from_secs(10)).await);
    assert_eq!(
        metric(&delta.http, "kappa_observed_requests_total").await,
        1.0,
        "s-1 cached by one request"
    );

    link.cut();
    let v2 = register(c, "s-1", "lab", 5.0, 600).await;
    assert_eq!(v2, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    link.heal();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            metric(&delta.http, "kappa_observed_gaps_total").await >= 1.0
        })
        .await,
        "the reconnection was not taken as a gap:\n{}",
        delta.log_text()
    );
    ready(&mut delta).await;

    publish_raw(js, "s-1", reading("s-1", 20.0, "2026-11-24T17:00:01Z")).await;
    assert!(
        wait_count(js, "DELTAS", 2, Duration::from_secs(20)).await,
        "no delta after the gap:\n{}",
        delta.log_text()
    );
    let d = deltas(js).await;
    assert_eq!(
        d[1]["reading_celsius"].as_f64(),
        Some(25.0),
        "stale offset used after the gap: {}",
        d[1]
    );
    assert_eq!(d[1]["sensor_version"].as_u64(), Some(2));
    // The gap cleared the cache; the entry came back either by asking the registry again or by
    // the change stream's catch-up after the reconnection, never left to the 300 s time-out.
    eprintln!(
        "[{test}] registry requests after the gap: {} (1 before it)",
        metric(&delta.http, "kappa_observed_requests_total").await
    );
    assert_eq!(count(js, "DLQ").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_stateless_keeps_working_from_cache_when_the_registry_stops() {
    let test = "semi_outage";
    let mut dag = Dag::start(
        test,
        &[
            ("KAPPA_OBSERVED", "semi-stateless"),
            ("KAPPA_OBSERVED_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let (c, js) = (&dag.client, &dag.js);
    let mut delta = dag.ready("temperature-delta").await;
    register(c, "s-1", "lab", 0.0, 600).await;
    register(c, "s-2", "lab", 0.0, 600).await;
    publish_raw(js, "s-1", reading("s-1", 20.0, "2026-11-24T17:00:00Z")).await;
    assert!(wait_count(js, "DELTAS", 1, Duration::from_secs(10)).await);
    dag.registry.kill9();
    publish_raw(js, "s-1", reading("s-1", 21.0, "2026-11-24T17:00:01Z")).await;
    publish_raw(js, "s-2", reading("s-2", 21.0, "2026-11-24T17:00:01Z")).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(js, "DELTAS").await == 2 && count(js, "DLQ").await == 1
        })
        .await,
        "cached sensor must go on, the miss must be dead-lettered:\n{}",
        delta.log_text()
    );
    let dlq = read_stream(js, "DLQ").await;
    assert_eq!(
        dlq[0].header("Kappa-Reason").as_deref(),
        Some("registry_unavailable")
    );
    assert_eq!(dlq[0].subject, "kappa.dlq.temperature-delta.s-2");
    assert!(delta.child.try_wait().expect("wait").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_replica_of_10k_sensors_is_ready_only_when_complete() {
    let test = "stateful_10k";
    let dag = Dag::start(test, &[("KAPPA_OBSERVED", "stateful")]).await;
    let (c, js) = (&dag.client, &dag.js);
    let n = 10_000usize;
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let c = c.clone();
            async move {
                register(
                    &c,
                    &format!("b-{i:05}"),
                    &format!("site-{}", i % 7),
                    0.0,
                    600,
                )
                .await;
            }
        })
        .await;
    assert_eq!(count(js, "SENSORS").await, n as u64);
    let t0 = std::time::Instant::now();
    let mut delta = dag.spawn("temperature-delta", &[]);
    let seen_not_ready = std::sync::atomic::AtomicU32::new(0);
    let replica_ready = wait_until(Duration::from_secs(60), || async {
        let Some(h) = healthz(&delta.http).await else {
            return false;
        };
        let obs = &h["checks"]["observed"];
        let held = obs["detail"]["held"].as_u64().unwrap_or(0);
        if obs["ready"] == true {
            assert_eq!(
                held, n as u64,
                "ready before the replica was complete: {obs}"
            );
            true
        } else {
            seen_not_ready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            false
        }
    })
    .await;
    assert!(
        replica_ready,
        "replica never became ready:\n{}",
        delta.log_text()
    );
    eprintln!(
        "[{test}] ready with {n} sensors after {:.2}s ({} not-ready polls)",
        t0.elapsed().as_secs_f64(),
        seen_not_ready.into_inner()
    );
    ready(&mut delta).await;
    for i in 0..200 {
        let id = format!("b-{:05}", i * 37);
        publish_raw(js, &id, reading(&id, 20.0, "2026-11-24T17:00:00Z")).await;
    }
    assert!(wait_count(js, "DELTAS", 200, Duration::from_secs(20)).await);
    assert_eq!(
        metric(&delta.http, "kappa_observed_requests_total").await,
        0.0,
        "no request-reply"
    );
    assert_eq!(count(js, "DLQ").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_asks_the_registry_once_per_batch_not_once_per_reading() {
    let test = "stateless_batch";
    let dag = Dag::start(
        test,
        &[
            ("KAPPA_OBSERVED", "stateless"),
            ("KAPPA_PARTITIONS", "1"),
            ("KAPPA_OWNERSHIP", "static"),
        ],
    )
    .await;
    let (c, js) = (&dag.client, &dag.js);
    // 40 known sensors (calibration offset = their number / 10) and 5 unknown ones, all
    // published before temperature-delta starts, so that they come in few batches.
    for i in 0..40 {
        register(c, &format!("s-{i}"), "lab", f64::from(i) / 10.0, 600).await;
    }
    // A first start declares the streams.
    let mut first = dag.ready("temperature-delta").await;
    first.terminate(Duration::from_secs(10));
    for i in 0..45 {
        let id = format!("s-{i}");
        publish_raw(js, &id, reading(&id, 20.0, "2026-11-24T17:00:00Z")).await;
    }
    let delta = dag.ready("temperature-delta").await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(js, "DELTAS").await == 40 && count(js, "DLQ").await == 5
        })
        .await,
        "40 deltas and 5 unknown sensors expected:\n{}",
        delta.log_text()
    );
    for d in deltas(js).await {
        let i: f64 = d["sensor_id"].as_str().expect("id")[2..]
            .parse()
            .expect("n");
        assert_eq!(d["latest_celsius"].as_f64(), Some(20.0 + i / 10.0), "{d}");
    }
    let singles = metric(&dag.registry.http, "registry_lookups_total").await;
    let batches = metric(&dag.registry.http, "registry_batch_lookups_total").await;
    let asked = metric(&delta.http, "kappa_observed_requests_total").await;
    eprintln!(
        "[{test}] 45 readings: {batches} batched lookups, {singles} single ones, {asked} requests"
    );
    assert_eq!(singles, 0.0, "a lookup went out key by key");
    assert!(
        (1.0..=5.0).contains(&batches) && asked == batches,
        "{batches} batches for 45 readings"
    );
}
