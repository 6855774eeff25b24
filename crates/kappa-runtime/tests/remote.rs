//! The `remote` working state on a real Redis (`REDIS_URL`, database 11, flushed): a store
//! that loses what an owner committed is found out by the next commit *and* by the next
//! rebase (`RuntimeError::StoreLost`, so the driver reopens the partition), a stale epoch is
//! fenced, and a reopen after the loss starts afresh. Skipped, with a line on stderr, when
//! `REDIS_URL` is not set (`.ci/run` sets it).

use bytes::Bytes;
use kappa_runtime::RuntimeError;
use kappa_runtime::working::WorkingState;
use kappa_runtime::working::remote::{RedisState, connect};

async fn store() -> Option<(RedisState, redis::aio::ConnectionManager)> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("note: REDIS_URL not set; skipping the remote working state test");
        return None;
    };
    let url = format!("{}/11", url.trim_end_matches('/'));
    let conn = connect(&url, "REDIS_URL").await.expect("redis");
    let mut c = conn.clone();
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    Some((RedisState::new(conn.clone(), "remotetest", "remote"), conn))
}

fn writes(k: &str, v: &'static [u8]) -> Vec<kappa_runtime::working::Write> {
    vec![(k.to_string(), Bytes::from_static(v).into())]
}

#[tokio::test]
async fn a_lost_store_is_found_out_by_commit_and_by_rebase_and_a_stale_epoch_is_fenced() {
    let Some((state, conn)) = store().await else {
        return;
    };
    let mut c = conn.clone();
    assert_eq!(state.open(0, 5).await.expect("open"), 0);
    state
        .commit(0, 5, 10, writes("a", b"1"))
        .await
        .expect("commit");
    state.rebase(0, 5, 0).await.expect("rebase");
    state
        .commit(0, 5, 3, writes("a", b"2"))
        .await
        .expect("commit after rebase");

    // Wiped under the owner: both writes that follow refuse, and write nothing.
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    let rebased = state.rebase(0, 5, 0).await;
    assert!(
        matches!(rebased, Err(RuntimeError::StoreLost(_))),
        "{rebased:?}"
    );
    let committed = state.commit(0, 5, 4, writes("a", b"3")).await;
    assert!(
        matches!(committed, Err(RuntimeError::StoreLost(_))),
        "{committed:?}"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .expect("keys");
    assert!(keys.is_empty(), "a refused write wrote {keys:?}");

    // The reopen starts afresh, and the epoch it takes fences the older owner.
    assert_eq!(state.open(0, 6).await.expect("reopen"), 0);
    let stale = RedisState::new(conn.clone(), "remotetest", "remote");
    let fenced = stale.open(0, 5).await;
    assert!(matches!(fenced, Err(RuntimeError::Fenced(_))), "{fenced:?}");
    state
        .commit(0, 6, 7, writes("a", b"4"))
        .await
        .expect("commit of the new owner");
    let loaded = state.load(0, &["a".to_string()]).await.expect("load");
    let loaded: Vec<Option<Bytes>> = loaded
        .into_iter()
        .map(|v| v.map(|v| v.encoded().expect("stored form")))
        .collect();
    assert_eq!(loaded, vec![Some(Bytes::from_static(b"4"))]);
}
