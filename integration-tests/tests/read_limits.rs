//! The read side's limits on the real DAG, its views in their own Redis database
//! (`VIEWS_REDIS_URL`): list pages (small pages, many of them) hold every
//! sensor exactly once with the oracle's latest delta and in the list's order, the live
//! clients' cap answers a JSON 503, a request that outlives the timeout answers a JSON 503,
//! and bad limit settings stop query-api with one line.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use integration_tests::procs::run_expecting_failure;
use integration_tests::views::{all_pages, wait_applied};
use integration_tests::{
    Dag, registry_sensors, servers, verify_exactly_once, wait_drained, wait_until,
};

const SENSORS: usize = 250;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_live_cap_and_timeout() {
    let test = "read_limits";
    let s = servers(test).await;
    // The views in a database of their own (VIEWS_REDIS_URL, as compose's redis-views): the
    // working state stays in REDIS_URL's database 0, and a query-api that read REDIS_URL would
    // find no views.
    let views_url = format!("{}/2", s.redis_url);
    let dag = Dag::on(
        s,
        test,
        &[
            ("QUERY_MAX_LIVE", "3"),
            ("QUERY_REQUEST_TIMEOUT_MS", "300"),
            ("VIEWS_REDIS_URL", &views_url),
        ],
    )
    .await;
    let js = &dag.js;
    let _delta = dag.ready("temperature-delta").await;
    let _views = dag.ready("view-builder").await;
    let api = dag.ready("query-api").await;
    let sensors = SENSORS.to_string();
    let mut thermo = dag.spawn(
        "thermometer",
        &[
            "--sensors",
            &sensors,
            "--sites",
            "4",
            "--count",
            "2500",
            "--rate",
            "0",
            "--event-step-ms",
            "1000",
            "--seed",
            "11",
        ],
    );
    let status = thermo
        .wait_exit(Duration::from_secs(120))
        .await
        .expect("thermometer finished");
    assert!(status.success(), "thermometer:\n{}", thermo.log_text());
    assert!(
        wait_drained(js, Duration::from_secs(120)).await,
        "did not drain"
    );
    let v = verify_exactly_once(js).await;
    assert_eq!(v.latest.len(), SENSORS);
    assert!(
        wait_applied(&dag, &api, Duration::from_secs(60)).await,
        "views did not apply every delta"
    );

    // /v1/sensors in pages of 17: every sensor once, by id, with its oracle's latest delta.
    let listed = all_pages(&api.http, "/v1/sensors", 17)
        .await
        .expect("/v1/sensors pages");
    let ids: Vec<&str> = listed
        .iter()
        .map(|s| s["sensor_id"].as_str().unwrap_or_default())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        ids, sorted,
        "pages of /v1/sensors: not by id, or a sensor twice"
    );
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<_>>(),
        v.latest.keys().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for s in &listed {
        let id = s["sensor_id"].as_str().unwrap_or_default();
        assert_eq!(
            s["source_seq"], v.latest[id]["source_seq"],
            "{id}: the page's view is not the oracle's latest"
        );
    }

    // Each site in pages of 9: the oracle's sensors of the site, once each, |delta| descending
    // and ties by id.
    let mut by_site: BTreeMap<String, Vec<(f64, String)>> = BTreeMap::new();
    for (id, info) in registry_sensors(js).await {
        let Some(d) = v.latest.get(&id) else { continue };
        let delta = d["delta_celsius"].as_f64().expect("delta_celsius");
        by_site
            .entry(info.site)
            .or_default()
            .push((-delta.abs(), id));
    }
    assert_eq!(by_site.len(), 4);
    for (site, mut want) in by_site {
        want.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let want: Vec<String> = want.into_iter().map(|(_, id)| id).collect();
        let got: Vec<String> = all_pages(&api.http, &format!("/v1/sites/{site}"), 9)
            .await
            .expect("site pages")
            .iter()
            .map(|s| s["sensor_id"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(got, want, "pages of /v1/sites/{site}");
    }
    eprintln!("[{test}] pages of /v1/sensors and of 4 sites agree with the oracle");

    // The live cap: 3 clients stream, the 4th gets a JSON 503.
    let http = reqwest::Client::new();
    let live = format!("http://{}/v1/live", api.http);
    let mut streams = Vec::new();
    for _ in 0..3 {
        let r = http.get(&live).send().await.expect("live");
        assert_eq!(r.status().as_u16(), 200);
        streams.push(r);
    }
    let r = http.get(&live).send().await.expect("live");
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.expect("json error");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("live clients")),
        "{body}"
    );
    drop(streams);

    // A read that outlives QUERY_REQUEST_TIMEOUT_MS: every Redis client waits during the pause.
    let mut redis = kappa_testkit::clients::redis(&dag.servers.redis_url)
        .await
        .expect("redis");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut redis)
        .await
        .expect("pause");
    let r = http
        .get(format!("http://{}/v1/sensors?limit=5", api.http))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.expect("json error");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{body}"
    );
    let url = format!("http://{}/v1/sensors?limit=5", api.http);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            http.get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await,
        "no answer after the pause"
    );
}

/// A limit setting that is not a positive number stops query-api with one line naming it.
#[test]
fn bad_limits_stop_query_api() {
    for (var, value, mention) in [
        ("QUERY_MAX_LIVE", "0", "max-live"),
        ("QUERY_REQUEST_TIMEOUT_MS", "soon", "request-timeout-ms"),
        ("QUERY_MAX_IN_FLIGHT", "-1", "max-in-flight"),
        ("QUERY_LIST_CONCURRENCY", "0", "list-concurrency"),
    ] {
        let (code, lines) = run_expecting_failure("query-api", &[(var, value)]);
        assert_ne!(code, 0, "{var}={value} must fail");
        assert_eq!(lines.len(), 1, "{var}={value}: one line, got {lines:?}");
        assert!(
            lines[0].contains(mention),
            "{var}={value}: '{}' should name {mention}",
            lines[0]
        );
    }
}
