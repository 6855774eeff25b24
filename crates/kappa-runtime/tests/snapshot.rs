//! Snapshots on a real NATS (`NATS_URL`): one partition whose flush fails (here an entry larger
//! than the server's maximum payload) must not lose the pending changes of the others.
//! Skipped, with a line on stderr, when `NATS_URL` is not set (`.ci/run` sets it).

use bytes::Bytes;
use kappa_runtime::working::snapshot::Snapshotter;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_of_one_partition_loses_nothing_of_the_others() {
    let Ok(nats_url) = std::env::var("NATS_URL") else {
        eprintln!("note: NATS_URL not set; skipping the snapshot test");
        return;
    };
    let client = async_nats::connect(&nats_url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let ns = format!("snaptest-{nanos}");
    let snaps = Snapshotter::new(js, &ns).await.expect("snapshot stream");
    // Partition 0 flushes first and fails: its entry is larger than any message may be.
    let huge = Bytes::from(vec![b'x'; 2 * 1024 * 1024]);
    snaps.record(0, 10, &[("big".to_string(), huge)]);
    snaps.record(1, 20, &[("k-1".to_string(), Bytes::from_static(b"v1"))]);
    snaps.record(2, 30, &[("k-2".to_string(), Bytes::from_static(b"v2"))]);
    assert!(
        snaps.flush(None).await.is_err(),
        "the oversized entry cannot be stored"
    );
    // Partition 0's entry shrinks (its state changed); the next flush stores everything.
    snaps.record(0, 11, &[("big".to_string(), Bytes::from_static(b"small"))]);
    snaps.flush(None).await.expect("second flush");
    let (pos0, e0) = snaps.recover(0).await.expect("recover 0");
    let (pos1, e1) = snaps.recover(1).await.expect("recover 1");
    let (pos2, e2) = snaps.recover(2).await.expect("recover 2");
    assert_eq!(
        (pos0, e0),
        (11, vec![("big".to_string(), Bytes::from_static(b"small"))])
    );
    assert_eq!(
        (pos1, e1),
        (20, vec![("k-1".to_string(), Bytes::from_static(b"v1"))])
    );
    assert_eq!(
        (pos2, e2),
        (30, vec![("k-2".to_string(), Bytes::from_static(b"v2"))])
    );
}
