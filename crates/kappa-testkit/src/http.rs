//! One GET against a service's HTTP listener (`/healthz`, `/metrics`, the query API), as a
//! probe: `None` when the service does not answer, never an error to handle.

use std::time::Duration;

/// GET `http://<addr><path>` with a 5 s timeout: status and body, or `None` if the request
/// or the body failed.
pub async fn get(http: &reqwest::Client, addr: &str, path: &str) -> Option<(u16, String)> {
    let r = http
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.ok()?))
}
