//! The running service against real NATS and Redis: deltas in, views and view changes out,
//! registry changes move sensors, a rebuild reproduces the same views.
//!
//! It deletes and recreates the `DELTAS` and `SENSORS` streams and uses Redis database 13, so it
//! only runs when `VIEW_BUILDER_PIPELINE_TEST=1` is set next to `NATS_URL` and `REDIS_URL`, on
//! servers nothing else uses.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use thermo_domain::{Delta, Sensor};
use view_builder::store::Store;

fn db13(url: &str) -> String {
    let base = url.trim_end_matches('/');
    let host_part = base.split("://").nth(1).unwrap_or(base);
    let base = match host_part.rfind('/') {
        Some(i) => &base[..base.len() - (host_part.len() - i)],
        None => base,
    };
    format!("{base}/13")
}

fn delta(id: &str, site: &str, d: f64, source_seq: u64) -> Delta {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(source_seq as i64);
    Delta {
        sensor_id: id.into(),
        site: site.into(),
        delta_celsius: d,
        oldest_celsius: 20.0,
        latest_celsius: 20.0 + d,
        min_celsius: 20.0_f64.min(20.0 + d),
        max_celsius: 20.0_f64.max(20.0 + d),
        samples: 2,
        window_secs: 600,
        measured_at: t,
        window_end: t,
        reading_celsius: 20.0 + d,
        calibration_offset: 0.0,
        sensor_version: 1,
        source_seq,
    }
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_become_views() {
    let (Ok(nats_url), Ok(redis_url), Ok("1")) = (
        std::env::var("NATS_URL"),
        std::env::var("REDIS_URL"),
        std::env::var("VIEW_BUILDER_PIPELINE_TEST").as_deref(),
    ) else {
        eprintln!(
            "note: set VIEW_BUILDER_PIPELINE_TEST=1, NATS_URL and REDIS_URL (servers nothing else uses) to run the pipeline test"
        );
        return;
    };
    let views_url = db13(&redis_url);
    let conn = kappa_runtime::working::remote::connect(&views_url, "REDIS_URL")
        .await
        .expect("redis");
    let mut c = conn.clone();
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    let store = Store::new(conn);
    let client = async_nats::connect(&nats_url).await.expect("nats");
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream("DELTAS").await;
    let _ = js.delete_stream("SENSORS").await;
    js.get_or_create_stream(thermo_domain::runtime::sensors_stream().stream_config())
        .await
        .expect("sensors stream");
    let mut deltas_stream = view_builder::Config::deltas(&cfg(&nats_url, &views_url));
    deltas_stream.declare(&js).await.expect("deltas stream");

    let sensor = |site: &str, version| Sensor {
        sensor_id: "s-1".into(),
        site: site.into(),
        calibration_offset: 0.0,
        window_secs: 600,
        version,
    };
    js.publish(
        "registry.sensors.s-1",
        serde_json::to_vec(&sensor("lab", 1)).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");

    let mut changes = client
        .subscribe("thermo.views.sensor.>")
        .await
        .expect("sub");
    let shutdown = kappa_runtime::shutdown::CancellationToken::new();
    let service = tokio::spawn(view_builder::run(
        cfg(&nats_url, &views_url),
        shutdown.clone(),
    ));

    let mut last_seq = std::collections::HashMap::new();
    let inputs = [
        ("s-1", 1.0),
        ("s-2", -2.0),
        ("s-1", 3.0),
        ("s-3", 0.5),
        ("s-2", -1.0),
    ];
    for (i, (id, d)) in inputs.iter().enumerate() {
        let ack = js
            .publish(
                format!("thermo.deltas.{id}"),
                serde_json::to_vec(&delta(id, "lab", *d, i as u64 + 1))
                    .expect("json")
                    .into(),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
        last_seq.insert(*id, ack.sequence);
    }
    js.publish("thermo.deltas.s-9", "not json".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    eventually("three views", || async {
        store
            .sensors()
            .await
            .map(|l| l.views.len() == 3)
            .unwrap_or(false)
    })
    .await;
    eventually("views at their latest deltas", || async {
        let l = store.sensors().await.expect("read");
        l.views
            .iter()
            .all(|v| last_seq.get(v.sensor_id.as_str()) == Some(&v.view_seq))
    })
    .await;
    let s1 = store.sensor("s-1").await.expect("read").expect("s-1");
    assert_eq!(s1.delta_celsius, 3.0);
    let top = store.top(10).await.expect("top");
    let ids: Vec<&str> = top.views.iter().map(|v| v.sensor_id.as_str()).collect();
    assert_eq!(ids, vec!["s-1", "s-2", "s-3"]);
    let first = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("a view change")
        .expect("message");
    assert!(first.subject.starts_with("thermo.views.sensor."));

    // The registry moves s-1 to another site.
    js.publish(
        "registry.sensors.s-1",
        serde_json::to_vec(&sensor("roof", 2)).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    eventually("s-1 moved to roof", || async {
        store
            .site("roof")
            .await
            .map(|l| l.views.len() == 1)
            .unwrap_or(false)
    })
    .await;
    assert_eq!(store.site("lab").await.expect("site").views.len(), 2);

    // A rebuild gives the same views.
    let before = store.sensors().await.expect("read");
    let args = view_builder::rebuild::RebuildArgs {
        grace_secs: 0,
        force: false,
        stall_secs: 10,
    };
    let nats = kappa_runtime::nats::Nats::from_client(client.clone());
    let report = view_builder::rebuild::rebuild(&nats, &store, &cfg(&nats_url, &views_url), &args)
        .await
        .expect("rebuild");
    assert_eq!(report.previous, "0");
    assert_eq!(report.deltas, 5);
    assert_eq!(report.skipped, 1);
    let after = store.sensors().await.expect("read");
    assert_eq!(before.views, after.views);
    assert_eq!(
        store.active_generation().await.expect("gen"),
        report.generation
    );

    // The service keeps writing to the new generation.
    let ack = js
        .publish(
            "thermo.deltas.s-3",
            serde_json::to_vec(&delta("s-3", "lab", 7.0, 9))
                .expect("json")
                .into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    eventually("s-3 updated after the swap", || async {
        store.sensor("s-3").await.ok().flatten().map(|v| v.view_seq) == Some(ack.sequence)
    })
    .await;

    // The injected token stops the service, which drains and returns.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .expect("the service stops on its token")
        .expect("join")
        .expect("a clean stop");
}

fn cfg(nats_url: &str, views_url: &str) -> view_builder::Config {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: view_builder::Config,
    }
    Cli::parse_from([
        "view-builder",
        "--nats-url",
        nats_url,
        "--views-redis-url",
        views_url,
        "--http-addr",
        "127.0.0.1:0",
        "--partitions",
        "4",
    ])
    .cfg
}
