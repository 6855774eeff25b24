//! The views as the query API serves them, and the check that they equal a rebuild from
//! deltas-stream sequence 1 (`view-builder rebuild`).

use std::collections::HashMap;
use std::time::Duration;

use crate::{Dag, Proc, count, procs, wait_until};

/// Every sensor's view from `GET /v1/sensors`, page after page (empty if the API does not
/// answer).
pub async fn sensors(api: &Proc) -> Vec<serde_json::Value> {
    all_pages(&api.http, "/v1/sensors", 1000)
        .await
        .unwrap_or_default()
}

/// Every view of a paged list (`/v1/sensors`, `/v1/sites/{site}`) at `http`, following
/// `next_cursor` with pages of `limit`; `None` if a page does not answer 200 with a list.
pub async fn all_pages(http: &str, path: &str, limit: usize) -> Option<Vec<serde_json::Value>> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    // A page holds at least one view, so a list of n views ends within n + 1 pages; the bound
    // only stops a cursor that never ends.
    for _ in 0..100_000 {
        let mut req = client
            .get(format!("http://{http}{path}"))
            .query(&[("limit", limit.to_string())]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let r = req.send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        let page: serde_json::Value = r.json().await.ok()?;
        out.extend(page["sensors"].as_array()?.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Some(out),
        }
    }
    None
}

/// Waits (`timeout` at most) until the views have applied every delta in `DELTAS`: each
/// sensor's view reflects that sensor's last delta (its `view_seq` is the stream sequence of
/// it). This judges the views by the stream itself, not by what the API says of its own
/// positions (`view_seq`, `positions`, `min_seq`), which are under test elsewhere.
pub async fn wait_applied(dag: &Dag, api: &Proc, timeout: Duration) -> bool {
    wait_complete(&dag.js, api, timeout).await
}

/// [`wait_applied`] for any client of the test's NATS.
pub async fn wait_complete(
    js: &async_nats::jetstream::Context,
    api: &Proc,
    timeout: Duration,
) -> bool {
    // The last delta of each sensor, and how many deltas that was read from (DELTAS is read
    // again only when it grew).
    let state = tokio::sync::Mutex::new((HashMap::<String, u64>::new(), 0u64));
    wait_until(timeout, || async {
        let mut st = state.lock().await;
        let (want, counted) = &mut *st;
        {
            let n = count(js, "DELTAS").await;
            if n == 0 {
                return false;
            }
            if n != *counted {
                want.clear();
                for m in crate::read_stream(js, "DELTAS").await {
                    let sensor = m.subject.rsplit('.').next().unwrap_or_default().to_string();
                    let seq = want.entry(sensor).or_default();
                    *seq = (*seq).max(m.seq);
                }
                *counted = n;
            }
            let views = sensors(api).await;
            views.len() == want.len()
                && views.iter().all(|v| {
                    v["sensor_id"]
                        .as_str()
                        .and_then(|id| want.get(id))
                        .is_some_and(|seq| v["view_seq"].as_u64() == Some(*seq))
                })
        }
    })
    .await
}

/// The views now, then `view-builder rebuild` (from deltas-stream sequence 1 into a new
/// generation, swapped in), then the views again: the number of sensors whose view differs
/// (or exists on one side only). Panics if the rebuild fails.
pub async fn differences_after_rebuild(dag: &Dag, api: &Proc) -> usize {
    let before = sensors(api).await;
    let mut rebuild = procs::start(
        &dag.test,
        "view-builder",
        &dag.env_of("view-builder"),
        &["rebuild", "--grace-secs", "1"],
    );
    let st = rebuild
        .wait_exit(Duration::from_secs(120))
        .await
        .expect("rebuild exited");
    assert!(st.success(), "rebuild failed:\n{}", rebuild.log_text());
    let after = sensors(api).await;
    let key = |v: &serde_json::Value| v["sensor_id"].as_str().unwrap_or_default().to_string();
    let a: std::collections::BTreeMap<String, &serde_json::Value> =
        before.iter().map(|v| (key(v), v)).collect();
    let b: std::collections::BTreeMap<String, &serde_json::Value> =
        after.iter().map(|v| (key(v), v)).collect();
    let mut ids: std::collections::BTreeSet<&String> = a.keys().collect();
    ids.extend(b.keys());
    ids.into_iter()
        .filter(|id| a.get(*id) != b.get(*id))
        .count()
}
