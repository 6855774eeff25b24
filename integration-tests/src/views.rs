//! The views as the query API serves them, and the check that they equal a rebuild from
//! deltas-stream sequence 1 (`view-builder rebuild`).

use std::time::Duration;

use crate::{Dag, Proc, count, procs, wait_until};

/// Every sensor's view from `GET /v1/sensors` (empty if the API does not answer).
pub async fn sensors(api: &Proc) -> Vec<serde_json::Value> {
    let Ok(r) = reqwest::get(format!("http://{}/v1/sensors", api.http)).await else {
        return Vec::new();
    };
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["sensors"].as_array().cloned().unwrap_or_default()
}

/// Waits (`timeout` at most) until the views have applied every delta in `DELTAS` (the
/// `view_seq` of `/v1/sensors` is the stream's last sequence).
pub async fn wait_applied(dag: &Dag, api: &Proc, timeout: Duration) -> bool {
    wait_until(timeout, || async {
        let want = count(&dag.js, "DELTAS").await;
        let Ok(r) = reqwest::get(format!("http://{}/v1/sensors", api.http)).await else {
            return false;
        };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        want > 0 && v["view_seq"].as_u64() == Some(want)
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
        &dag.env,
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
