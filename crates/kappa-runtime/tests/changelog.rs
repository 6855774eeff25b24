//! The outcome logs on a real NATS (`NATS_URL`): the last message of many entities, asked with
//! multi-subject direct gets (several requests of [`MULTI_LAST_KEYS`] keys), equals what asking
//! key by key gives, for both layouts (and a partitioned log whose partition count is known,
//! read by literal subjects), with keys that have several messages, one, or none; and when
//! the messages are large enough that the server cuts its answers short
//! ([`MULTI_LAST_MAX_BYTES`]) and the rest is asked for again.
//! Skipped, with a line on stderr, when `NATS_URL` is not set (`.ci/run` sets it).

use async_nats::jetstream;
use bytes::Bytes;
use kappa_runtime::changelog::{EntityLog, Layout, MULTI_LAST_KEYS, MULTI_LAST_MAX_BYTES};
use kappa_runtime::partition::partition_for;

async fn js() -> Option<jetstream::Context> {
    Some(kappa_testkit::clients::nats_from_env("change log").await?.1)
}

fn unique(what: &str) -> String {
    kappa_testkit::clients::unique(what)
}

async fn last_many_equals_key_by_key(
    layout: Layout,
    partitions: Option<u32>,
    keys: usize,
    bytes: usize,
) {
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
    // Every third key has no message, every fifth has three.
    let keys: Vec<String> = (0..keys).map(|i| format!("k{i}")).collect();
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
                .publish_with_headers(subject.clone(), headers, Bytes::from(vec![b'x'; bytes]))
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
    // More keys than two requests hold.
    last_many_equals_key_by_key(Layout::Flat, None, 2 * MULTI_LAST_KEYS + 7, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_message_of_many_partitioned_entities_is_what_asking_each_gives() {
    // More keys than two requests hold.
    last_many_equals_key_by_key(Layout::Partitioned, None, 2 * MULTI_LAST_KEYS + 7, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_of_a_log_with_a_known_partition_count_are_read_by_their_own_subject() {
    // More keys than two requests hold.
    last_many_equals_key_by_key(Layout::Partitioned, Some(4), 2 * MULTI_LAST_KEYS + 7, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cut_short_by_their_size_are_completed_by_asking_again() {
    // 40 keys with messages of 600 KB (the server's payload limit is 1 MiB): one request, whose
    // answers hold about 4 MiB each, so it is asked for again several times.
    const BYTES: usize = 600_000;
    // 26 of the 40 keys have messages (every third has none).
    const {
        assert!(
            26 * BYTES > 3 * MULTI_LAST_MAX_BYTES,
            "the keys with messages fill 3 answers"
        )
    };
    last_many_equals_key_by_key(Layout::Flat, None, 40, BYTES).await;
}
