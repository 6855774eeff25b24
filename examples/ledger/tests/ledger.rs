//! The ledger under the runtime's invariants, against real NATS and Redis: every operation has
//! exactly one outcome (a balance change or a dead letter), equal to an independent oracle,
//! through a kill -9 while operations keep coming, for each working-state option; and the
//! service starts and stops in-process with an injected shutdown.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use integration_tests::procs::start;
use integration_tests::{
    count, metric, nats, read_stream, ready, servers, service_env, wait_until,
};

const OPS: &str = "LEDGER_OPS";
const BALANCES: &str = "LEDGER_BALANCES";

/// What the oracle expects for one operation.
#[derive(Debug, Clone, PartialEq)]
enum Expected {
    Balance(i64),
    Rejected(&'static str),
}

/// The operations of a run: `(account, payload)`, deterministic from `seed`. About a third of
/// the withdrawals overdraw; a few payloads are malformed or have invalid amounts.
fn operations(n: usize, accounts: usize, seed: u64) -> Vec<(String, String)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let r = next();
            let account = format!("acct-{}", r % accounts as u64);
            let cents = (r >> 20) % 1_000 + 1;
            let payload = match (r >> 8) % 20 {
                0 => "{not json".to_string(),
                1 => r#"{"op":"deposit","cents":0}"#.to_string(),
                2..=10 => format!(r#"{{"op":"deposit","cents":{cents}}}"#),
                _ => format!(r#"{{"op":"withdraw","cents":{cents}}}"#),
            };
            (account, payload)
        })
        .collect()
}

/// An independent recomputation: folds each account's operations in stream order.
fn oracle(ops: &[(u64, String, String)]) -> HashMap<u64, Expected> {
    let mut balances: HashMap<&str, i64> = HashMap::new();
    let mut out = HashMap::new();
    for (seq, account, payload) in ops {
        let v: Option<serde_json::Value> = serde_json::from_str(payload).ok();
        let op = v.as_ref().and_then(|v| v["op"].as_str());
        let cents = v.as_ref().and_then(|v| v["cents"].as_i64());
        let e = match (op, cents) {
            (Some("deposit" | "withdraw"), Some(c)) if c <= 0 => {
                Expected::Rejected("invalid_amount")
            }
            (Some("deposit"), Some(c)) => {
                let b = balances.entry(account).or_insert(0);
                *b += c;
                Expected::Balance(*b)
            }
            (Some("withdraw"), Some(c)) => {
                let b = balances.entry(account).or_insert(0);
                if c > *b {
                    Expected::Rejected("overdraft")
                } else {
                    *b -= c;
                    Expected::Balance(*b)
                }
            }
            _ => Expected::Rejected("malformed"),
        };
        out.insert(*seq, e);
    }
    out
}

async fn fresh_streams(js: &jetstream::Context) {
    for s in [
        OPS,
        BALANCES,
        "DLQ",
        "KAPPA_STATE",
        "KV_KAPPA_LEASES_LEDGER",
    ] {
        let _ = js.delete_stream(s).await;
    }
}

/// Publishes `ops` (numbered from `from` for their `Nats-Msg-Id`); with `paced`, in chunks of
/// 50 every 25 ms (2,000 a second), so a crash lands while operations flow.
/// Creates the output streams as the runtime would, but with a duplicate window of 1 s, so a
/// restart after it cannot lean on `Nats-Msg-Id` de-duplication: an input decided twice would
/// be stored twice. (The runtime keeps existing streams as they are.)
async fn short_dedupe_outputs(js: &jetstream::Context, partitions: u32) {
    let mut balances = kappa_runtime::partition::PartitionedStream {
        stream: BALANCES.into(),
        prefix: "ledger.balances".into(),
        partitions,
    }
    .stream_config();
    balances.duplicate_window = Duration::from_secs(1);
    js.create_stream(balances).await.expect("balances stream");
    js.create_stream(jetstream::stream::Config {
        name: "DLQ".into(),
        subjects: vec!["kappa.dlq.>".into()],
        duplicate_window: Duration::from_secs(1),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("DLQ stream");
}

async fn publish(js: &jetstream::Context, ops: &[(String, String)], from: usize, paced: bool) {
    let mut acks = Vec::new();
    for (i, (account, payload)) in ops.iter().enumerate() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("op-{}", from + i).as_str());
        acks.push(
            js.publish_with_headers(
                format!("ledger.ops.{account}"),
                h,
                bytes::Bytes::from(payload.clone()),
            )
            .await
            .expect("publish"),
        );
        if acks.len() >= 50 {
            for a in acks.drain(..) {
                a.await.expect("ack");
            }
            if paced {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
    for a in acks {
        a.await.expect("ack");
    }
}

async fn outcomes(js: &jetstream::Context) -> u64 {
    count(js, BALANCES).await + count(js, "DLQ").await
}

/// Checks every outcome against the oracle: one per operation, none twice, none different.
async fn verify(js: &jetstream::Context) -> (usize, usize) {
    let ops: Vec<(u64, String, String)> = read_stream(js, OPS)
        .await
        .into_iter()
        .map(|m| {
            let account = m.subject.rsplit('.').next().unwrap_or("").to_string();
            (
                m.seq,
                account,
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect();
    let want = oracle(&ops);
    let mut got: BTreeMap<u64, Expected> = BTreeMap::new();
    let mut last_per_account: HashMap<String, u64> = HashMap::new();
    for m in read_stream(js, BALANCES).await {
        let src: u64 = m
            .header("Kappa-Source-Seq")
            .and_then(|s| s.parse().ok())
            .expect("Kappa-Source-Seq on every change");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("change is JSON");
        let account = v["account"].as_str().expect("account").to_string();
        let prev = last_per_account.insert(account.clone(), src).unwrap_or(0);
        assert!(prev < src, "{account}: change of op {src} after op {prev}");
        let balance = v["balance_cents"].as_i64().expect("balance");
        assert!(
            got.insert(src, Expected::Balance(balance)).is_none(),
            "op {src} changed twice"
        );
    }
    for m in read_stream(js, "DLQ").await {
        let src: u64 = m
            .header("Kappa-Source-Seq")
            .and_then(|s| s.parse().ok())
            .expect("Kappa-Source-Seq on every dead letter");
        assert!(m.subject.starts_with("kappa.dlq.ledger."), "{}", m.subject);
        let reason = m.header("Kappa-Reason").expect("Kappa-Reason");
        let reason: &'static str = match reason.as_str() {
            "overdraft" => "overdraft",
            "invalid_amount" => "invalid_amount",
            "malformed" => "malformed",
            other => panic!("unexpected reason {other}"),
        };
        let before = got.insert(src, Expected::Rejected(reason));
        assert!(
            before.is_none(),
            "op {src} has two outcomes: {before:?} and {reason}"
        );
    }
    for (seq, e) in &want {
        assert_eq!(got.get(seq), Some(e), "op {seq}");
    }
    assert_eq!(
        got.len(),
        want.len(),
        "outcomes for operations that do not exist"
    );
    let rejected = want
        .values()
        .filter(|e| matches!(e, Expected::Rejected(_)))
        .count();
    (want.len(), rejected)
}

async fn crash_while_operations_flow(working: &str) {
    let test = format!("ledger_crash_{working}");
    let s = servers(&test).await;
    let (_c, js) = nats(&s.nats_url).await;
    fresh_streams(&js).await;
    let affinity = format!("{}/1", s.redis_url);
    let env = service_env(
        &s,
        &[
            ("KAPPA_WORKING", working),
            ("AFFINITY_REDIS_URL", &affinity),
            ("KAPPA_SNAPSHOT_SECS", "1"),
            ("KAPPA_OWNERSHIP", "static"),
        ],
    );
    short_dedupe_outputs(&js, 4).await;
    let ops = operations(6_000, 60, 7);
    let mut ledger = start(&test, "ledger", &env, &[]);
    ready(&mut ledger).await;
    let publisher = {
        let (js, ops) = (js.clone(), ops.clone());
        tokio::spawn(async move { publish(&js, &ops, 0, true).await })
    };
    assert!(
        wait_until(Duration::from_secs(60), || async {
            outcomes(&js).await > 2_000
        })
        .await,
        "no progress:\n{}",
        ledger.log_text()
    );
    // Crash with work in flight, while operations keep arriving.
    ledger.kill9();
    let crashed_at = outcomes(&js).await;
    // Past the outputs' duplicate window: only the runtime's own bookkeeping prevents doubles.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut ledger = start(&test, "ledger", &env, &[]);
    ready(&mut ledger).await;
    publisher.await.expect("publisher");
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(120), || async {
            outcomes(&js).await >= ops.len() as u64
        })
        .await,
        "did not drain:\n{}",
        ledger.log_text()
    );
    let drained = started.elapsed().as_secs_f64();
    // Let anything that would be doubled arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replayed = metric(&ledger.http, "kappa_replayed_inputs_total").await;
    let refolded = metric(&ledger.http, "kappa_changes_refolded_total").await;
    let (n, rejected) = verify(&js).await;
    eprintln!(
        "[{test}] {n} operations ({rejected} rejected), crashed at {crashed_at} outcomes; after restart: {replayed} inputs recognised as decided, {refolded} changes refolded from the log, drained in {drained:.2}s; every outcome equals the oracle, none missing, none doubled"
    );
    ledger.terminate(Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_crash_local() {
    crash_while_operations_flow("local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_crash_remote() {
    crash_while_operations_flow("remote").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_crash_affinity() {
    crash_while_operations_flow("affinity").await;
}

/// The service as a library: started in this process, stopped by cancelling its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_runs_in_process_and_stops_on_its_token() {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        kappa: kappa_runtime::config::Settings,
    }
    let s = servers("ledger_in_process").await;
    let (_c, js) = nats(&s.nats_url).await;
    fresh_streams(&js).await;
    let args = Args::try_parse_from([
        "ledger",
        "--nats-url",
        &s.nats_url,
        "--redis-url",
        &s.redis_url,
        "--partitions",
        "2",
        "--ownership",
        "static",
    ])
    .expect("settings");
    let shutdown = kappa_runtime::shutdown::CancellationToken::new();
    let service = kappa_runtime::service::DomainService::new("ledger", ledger::Ledger, args.kappa)
        .input(ledger::OPS.0, ledger::OPS.1)
        .changes(ledger::BALANCES.0, ledger::BALANCES.1);
    let task = tokio::spawn(service.run(shutdown.clone()));
    let ops = operations(200, 5, 3);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&js, OPS).await == 0 && js.get_stream(OPS).await.is_ok()
        })
        .await,
        "input stream declared"
    );
    publish(&js, &ops, 0, false).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            outcomes(&js).await >= 200
        })
        .await,
        "outcomes"
    );
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stopped within 10 s of the token")
        .expect("task");
    assert!(stopped.is_ok(), "{stopped:?}");
    verify(&js).await;
}
