//! Deliveries and ownership of a partition's input, with the real binaries and real servers:
//! a burst whose last deliveries are lost on a connection that breaks is finished within
//! seconds of the link healing, and an owner paused past its lease neither processes nor takes
//! the consumer back when it resumes. The oracle judges every delta.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use integration_tests::proxy::CuttableLink;
use integration_tests::{
    Dag, Proc, count, healthz, metric, procs, ready, register, running_partitions, servers,
    verify_exactly_once, wait_drained, wait_partitions, wait_until,
};

fn reading(id: &str, celsius: f64, i: u32) -> String {
    let secs = i * 10;
    format!(
        r#"{{"sensor_id":"{id}","celsius":{celsius},"measured_at":"2026-11-24T17:{:02}:{:02}Z"}}"#,
        secs / 60,
        secs % 60
    )
}

/// The temperature-delta consumers on READINGS: (name, partition, epoch).
async fn consumers(js: &jetstream::Context) -> Vec<(String, u32, u64)> {
    let Ok(stream) = js.get_stream("READINGS").await else {
        return Vec::new();
    };
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    names
        .into_iter()
        .filter_map(|n| {
            let rest = n.strip_prefix("temperature-delta-p")?;
            let (p, e) = rest.split_once("-e")?;
            let (p, e) = (p.parse().ok()?, e.parse().ok()?);
            Some((n, p, e))
        })
        .collect()
}

/// The last readings of a burst are delivered by the server into a connection that then
/// breaks (the proxy drops what the server sends, then severs the link): with ack policy
/// `none` the server counts them as delivered and pends nothing, so only comparing what was
/// delivered with the committed position shows they never arrived. Their deltas must come
/// within 10 s of the link healing, without any further input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_deliveries_of_a_burst_lost_on_a_broken_link_are_processed_after_it_heals() {
    let test = "delivery_cut";
    let s = servers(test).await;
    let upstream = s.nats_url.trim_start_matches("nats://").to_string();
    let link = CuttableLink::start(&upstream).await;
    let dag = Dag::on(s, test, &[("KAPPA_PARTITIONS", "1")]).await;
    let (c, js) = (&dag.client, &dag.js);
    let mut env = dag.env.clone();
    env.retain(|(k, _)| *k != "NATS_URL");
    env.push(("NATS_URL", format!("nats://{}", link.addr)));
    let mut delta = procs::start(test, "temperature-delta", &env, &[]);
    ready(&mut delta).await;
    assert!(
        wait_partitions(&delta.http, 1, Duration::from_secs(30))
            .await
            .is_some()
    );
    let sensors = ["s-1", "s-2", "s-3"];
    for id in sensors {
        register(c, id, "lab", 0.0, 600).await;
    }
    let (first, burst) = (40u32, 50u32);
    let mut last = 0;
    let publish = |i: u32| {
        let id = sensors[(i % 3) as usize];
        let body = reading(id, 20.0 + f64::from(i % 7), i / 3);
        async move {
            js.publish(format!("thermo.readings.{id}"), body.into())
                .await
                .expect("publish")
                .await
                .expect("ack")
                .sequence
        }
    };
    for i in 0..first {
        last = publish(i).await;
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(js, "DELTAS").await == u64::from(first)
        })
        .await,
        "the burst's first part was not processed:\n{}",
        delta.log_tail(30)
    );
    // The rest of the burst goes out into a connection that is about to break.
    link.mute();
    for i in first..burst {
        last = publish(i).await;
    }
    let delivered = wait_until(Duration::from_secs(10), || async {
        let Some((name, _, _)) = consumers(js).await.into_iter().next() else {
            return false;
        };
        let Ok(stream) = js.get_stream("READINGS").await else {
            return false;
        };
        let Ok(mut consumer) = stream
            .get_consumer::<jetstream::consumer::pull::Config>(&name)
            .await
        else {
            return false;
        };
        consumer
            .info()
            .await
            .is_ok_and(|i| i.delivered.stream_sequence >= last && i.num_pending == 0)
    })
    .await;
    assert!(delivered, "the server did not deliver the burst's end");
    link.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(js, "DELTAS").await,
        u64::from(first),
        "deliveries were not lost: the test proves nothing"
    );
    let healed = Instant::now();
    link.heal();
    let done = wait_until(Duration::from_secs(10), || async {
        count(js, "DELTAS").await == u64::from(burst)
    })
    .await;
    let took = healed.elapsed();
    assert!(
        done,
        "the burst's last deltas did not come within 10 s of healing:\n{}",
        delta.log_tail(40)
    );
    eprintln!(
        "[{test}] {} deliveries lost on the broken link; the last delta came {:.2}s after healing",
        burst - first,
        took.as_secs_f64()
    );
    let judged = integration_tests::judge(js).await;
    integration_tests::matrix::record(
        &integration_tests::matrix::Row::new(
            test,
            "deliveries lost on a broken client link (muted, cut 1 s, healed)",
            "remote",
        )
        .judged(&judged)
        .recovered(Some(took.as_secs_f64()))
        .detail(format!("{} deliveries lost", burst - first)),
    );
    assert!(judged.exact(), "{:?}", judged.problems);
    let v = verify_exactly_once(js).await;
    assert_eq!((v.readings, v.deltas), (burst as usize, burst as usize));
    assert!(metric(&delta.http, "kappa_consumer_recreated_total").await >= 1.0);
}

async fn owned(p: &Proc) -> BTreeSet<u32> {
    healthz(&p.http)
        .await
        .map(|h| running_partitions(&h))
        .unwrap_or_default()
}

fn load(dag: &Dag, prefix: &str, n: &str, rate: &str) -> Proc {
    dag.spawn(
        "thermometer",
        &[
            "--sensors",
            "40",
            "--prefix",
            prefix,
            "--count",
            n,
            "--rate",
            rate,
            "--event-step-ms",
            "1000",
            "--seed",
            "9",
        ],
    )
}

/// An owner paused (SIGSTOP) past its lease TTL while the other instance takes its partitions
/// over and readings keep coming (some already on their way into the paused process's socket),
/// then resumed: it must stop those partitions without processing anything under its old
/// leases (self-fenced by its lease deadline, or told by a failed renewal), must never
/// re-create its old consumers (which would take deliveries meant for the new owner), and the
/// deltas equal the oracle with nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_zombie_processes_nothing_and_takes_no_consumer() {
    let test = "lease_zombie_self_fenced";
    let dag = Dag::start(
        test,
        &[
            ("KAPPA_PARTITIONS", "4"),
            ("KAPPA_LEASE_TTL_SECS", "3"),
            ("KAPPA_WORKING", "remote"),
        ],
    )
    .await;
    let js = &dag.js;
    let mut a = dag.spawn("temperature-delta", &[]);
    ready(&mut a).await;
    assert!(
        wait_partitions(&a.http, 4, Duration::from_secs(30))
            .await
            .is_some()
    );
    let mut b = dag.spawn("temperature-delta", &[]);
    ready(&mut b).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let (x, y) = (owned(&a).await, owned(&b).await);
            x.len() + y.len() == 4 && x.is_disjoint(&y) && !x.is_empty() && !y.is_empty()
        })
        .await,
        "two instances did not share the partitions"
    );
    let mut first = load(&dag, "s", "2000", "0");
    assert!(
        first
            .wait_exit(Duration::from_secs(60))
            .await
            .is_ok_and(|s| s.success())
    );
    assert!(wait_drained(js, Duration::from_secs(60)).await);
    let had = owned(&a).await;
    let old: BTreeSet<(u32, u64)> = consumers(js)
        .await
        .into_iter()
        .filter(|(_, p, _)| had.contains(p))
        .map(|(_, p, e)| (p, e))
        .collect();
    assert_eq!(
        old.len(),
        had.len(),
        "one consumer per partition of a: {old:?}"
    );
    let processed = metric(&a.http, "kappa_processed_total").await;
    let opened = a.log_text().matches("partition open").count();

    a.signal("-STOP");
    let mut second = load(&dag, "z", "4000", "400");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            owned(&b).await.len() == 4
        })
        .await,
        "b did not take over from the paused instance"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal("-CONT");
    let resumed = Instant::now();
    let mut checked = 0;
    while resumed.elapsed() < Duration::from_secs(6) {
        for (name, p, e) in consumers(js).await {
            assert!(
                !old.contains(&(p, e)),
                "the resumed instance re-created its old consumer {name}"
            );
        }
        // Until a opens a partition under a new lease, it must have processed nothing more.
        let now = metric(&a.http, "kappa_processed_total").await;
        if a.log_text().matches("partition open").count() == opened {
            assert_eq!(
                now,
                processed,
                "the resumed instance processed inputs under its old leases:\n{}",
                a.log_tail(40)
            );
            checked += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = a.log_text();
    assert!(
        log.contains("lease expired") || log.contains("lease lost"),
        "the resumed instance did not notice it lost its partitions {had:?}:\n{}",
        a.log_tail(40)
    );
    let fenced = metric(&a.http, "kappa_lease_self_fenced_total").await;
    let lost = metric(&a.http, "kappa_leases_lost_total").await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let (x, y) = (owned(&a).await, owned(&b).await);
            x.len() + y.len() == 4 && x.is_disjoint(&y)
        })
        .await,
        "the partitions were not shared again"
    );
    assert!(
        second
            .wait_exit(Duration::from_secs(60))
            .await
            .is_ok_and(|s| s.success())
    );
    assert!(
        wait_drained(js, Duration::from_secs(60)).await,
        "did not drain"
    );
    let v = verify_exactly_once(js).await;
    assert_eq!(v.readings, 6000);
    let per_partition = consumers(js).await;
    let parts: BTreeSet<u32> = per_partition.iter().map(|(_, p, _)| *p).collect();
    assert_eq!(
        (per_partition.len(), parts.len()),
        (4, 4),
        "one consumer per partition, the current owner's: {per_partition:?}"
    );
    eprintln!(
        "[{test}] zombie held {had:?}; after resuming: {fenced} partitions self-fenced, {lost} leases found lost, nothing processed under an old lease ({checked} checks), no old consumer re-created; {} readings -> {} deltas, {:?}: none missing, none doubled",
        v.readings, v.deltas, v.rejected
    );
}
