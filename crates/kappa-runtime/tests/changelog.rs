//! The outcome logs on a real NATS (`NATS_URL`): the last message of many entities, asked with
//! multi-subject direct gets (several requests of [`MULTI_LAST_KEYS`] keys), equals what asking
//! key by key gives, for both layouts (and a partitioned log whose partition count is known,
//! read by literal subjects), with keys that have several messages, one, or none.
//! Skipped, with a line on stderr, when `NATS_URL` is not set (`.ci/run` sets it).

use async_nats::jetstream;
use bytes::Bytes;
use kappa_runtime::changelog::{EntityLog, Layout, MULTI_LAST_KEYS};
use kappa_runtime::partition::partition_for;

async fn js() -> Option<jetstream::Context> {
    Some(kappa_testkit::clients::nats_from_env("change log").await?.1)
}

fn unique(what: &str) -> String {
    kappa_testkit::clients::unique(what)
}

async fn last_many_equals_key_by_key(layout: Layout, partitions: Option<u32>) {
    let Some(js) = js().await else { return };
    let name = unique("CLTEST");
    let prefix = unique("cltest.");
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("stream");
    let mut log = EntityLog::new(js.clone(), &name, &prefix, layout, "cltest");
    if let Some(n) = partitions {
        log = log.with_partitions(n);
    }
    // More keys than two requests hold; every third has no message, every fifth has three.
    let keys: Vec<String> = (0..2 * MULTI_LAST_KEYS + 7)
        .map(|i| format!("k{i}"))
        .collect();
    // The independent oracle: the stream sequence of each key's last message, from the acks.
    let mut expected: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        if i % 3 == 0 {
            continue;
        }
        let subject = match layout {
            Layout::Flat => format!("{prefix}.{key}"),
            // Where the server's transform would store it when the count is known; anywhere
            // (the wildcard finds it) when not.
            Layout::Partitioned => match partitions {
                Some(n) => format!("{prefix}.{}.{key}", partition_for(key, n)),
                None => format!("{prefix}.{}.{key}", i % 4),
            },
        };
        for n in 0..if i % 5 == 0 { 3 } else { 1 } {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Kappa-Source-Seq", format!("{}", 10 * i + n).as_str());
            headers.insert("Kappa-Service", "cltest");
            let ack = js
                .publish_with_headers(subject.clone(), headers, Bytes::from(vec![b'x'; 300]))
                .await
                .expect("publish")
                .await
                .expect("ack");
            expected.insert(key.clone(), ack.sequence);
        }
        // With a known count, a later message of the same key in another partition is not
        // the entity's (only a read by its own subject leaves it out; the wildcard would not).
        if let (Layout::Partitioned, Some(n)) = (layout, partitions)
            && i % 7 == 0
        {
            let other = (partition_for(key, n) + 1) % n;
            js.publish(
                format!("{prefix}.{other}.{key}"),
                Bytes::from_static(b"decoy"),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
        }
    }
    let many = log.last_many(&keys).await.expect("last_many");
    assert_eq!(many.len(), keys.len());
    let mut found = 0;
    for (key, got) in keys.iter().zip(&many) {
        let one = log.last(key).await.expect("last");
        assert_eq!(got, &one, "{key}");
        assert_eq!(
            got.as_ref().map(|w| w.stream_seq),
            expected.get(key).copied(),
            "{key}: the sequence of its last message"
        );
        found += usize::from(one.is_some());
    }
    assert_eq!(
        found,
        keys.len() - keys.len().div_ceil(3),
        "keys with messages"
    );
    assert!(
        many.iter()
            .flatten()
            .all(|w| w.writer.as_deref() == Some("cltest") && w.source_seq > 0),
        "headers are read"
    );
    assert_eq!(
        log.last_many(&[]).await.expect("no keys"),
        Vec::new(),
        "no keys, no request"
    );
    let _ = js.delete_stream(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_message_of_many_flat_entities_is_what_asking_each_gives() {
    last_many_equals_key_by_key(Layout::Flat, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_message_of_many_partitioned_entities_is_what_asking_each_gives() {
    last_many_equals_key_by_key(Layout::Partitioned, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_of_a_log_with_a_known_partition_count_are_read_by_their_own_subject() {
    last_many_equals_key_by_key(Layout::Partitioned, Some(4)).await;
}
