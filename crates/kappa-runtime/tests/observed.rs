//! `stateless` lookups on a real NATS (`NATS_URL`) against small owners written here: a batch
//! is asked in one request per `MAX_BATCH_KEYS` keys, answers come back in the keys' order
//! (not found as `None`), and an owner that answers only single lookups is asked key by key.
//!
//! Skipped, with a line on stderr, when `NATS_URL` is not set (`.ci/run` sets it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kappa_runtime::observed::stateless::{MAX_BATCH_KEYS, Requester};
use kappa_runtime::observed::{ObservedSource, Versioned};

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Item {
    id: String,
    version: u64,
}

impl Versioned for Item {
    fn version(&self) -> u64 {
        self.version
    }
}

fn answer(id: &str) -> serde_json::Value {
    // Odd ids are unknown to the owner.
    match id.trim_start_matches('k').parse::<u64>() {
        Ok(n) if n % 2 == 0 => serde_json::json!({"id": id, "version": n}),
        _ => serde_json::json!({"ok": false, "error": "not found"}),
    }
}

/// An owner on `<prefix>.get.*`, and on `<prefix>.lookup` if `batches`; counts the requests.
async fn owner(
    client: async_nats::Client,
    prefix: &str,
    batches: bool,
) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let singles = Arc::new(AtomicUsize::new(0));
    let batched = Arc::new(AtomicUsize::new(0));
    let mut gets = client
        .subscribe(format!("{prefix}.get.*"))
        .await
        .expect("subscribe");
    let (c, n) = (client.clone(), singles.clone());
    tokio::spawn(async move {
        while let Some(m) = gets.next().await {
            n.fetch_add(1, Ordering::Relaxed);
            let id = m.subject.as_str().rsplit('.').next().unwrap_or_default();
            if let Some(to) = m.reply {
                let _ = c.publish(to, answer(id).to_string().into()).await;
            }
        }
    });
    if batches {
        let mut many = client
            .subscribe(format!("{prefix}.lookup"))
            .await
            .expect("subscribe");
        let (c, n) = (client.clone(), batched.clone());
        tokio::spawn(async move {
            while let Some(m) = many.next().await {
                n.fetch_add(1, Ordering::Relaxed);
                let ids: Vec<String> = serde_json::from_slice(&m.payload).unwrap_or_default();
                let out: Vec<serde_json::Value> = ids.iter().map(|i| answer(i)).collect();
                if let Some(to) = m.reply {
                    let _ = c
                        .publish(to, serde_json::to_vec(&out).unwrap_or_default().into())
                        .await;
                }
            }
        });
    }
    client.flush().await.expect("flush");
    (singles, batched)
}

fn source(prefix: &str) -> ObservedSource {
    ObservedSource {
        stream: "UNUSED".into(),
        change_prefix: format!("{prefix}.changes"),
        request_prefix: format!("{prefix}.get"),
        batch_subject: Some(format!("{prefix}.lookup")),
        request_timeout: Duration::from_secs(2),
        attempts: 2,
    }
}

#[tokio::test]
async fn a_batch_is_one_request_per_chunk_and_an_old_owner_is_asked_key_by_key() {
    let Some((client, _)) = kappa_testkit::clients::nats_from_env("observed").await else {
        return;
    };
    let tag = format!("obs{}", std::process::id());
    let keys: Vec<String> = (0..(MAX_BATCH_KEYS as u64 + 44))
        .map(|i| format!("k{i}"))
        .collect();
    let check = |got: Vec<Result<Option<Item>, _>>| {
        assert_eq!(got.len(), keys.len());
        for (k, g) in keys.iter().zip(got) {
            let n: u64 = k[1..].parse().expect("n");
            match g.expect("answered") {
                Some(item) => assert_eq!((item.id.as_str(), n % 2), (k.as_str(), 0)),
                None => assert_eq!(n % 2, 1, "{k} is known"),
            }
        }
    };

    // An owner with batched lookups: two requests for 300 keys (256 + 44), no single one.
    let prefix = format!("{tag}.new");
    let (singles, batched) = owner(client.clone(), &prefix, true).await;
    let r = Requester::<Item>::new(client.clone(), source(&prefix));
    check(r.fetch_many(&keys).await);
    assert_eq!(batched.load(Ordering::Relaxed), 2);
    assert_eq!(singles.load(Ordering::Relaxed), 0);

    // An owner without them: every key on its own, same answers.
    let prefix = format!("{tag}.old");
    let (singles, batched) = owner(client.clone(), &prefix, false).await;
    let r = Requester::<Item>::new(client.clone(), source(&prefix));
    check(r.fetch_many(&keys).await);
    assert_eq!(batched.load(Ordering::Relaxed), 0);
    assert_eq!(singles.load(Ordering::Relaxed), keys.len());
}
