//! The reference DAG end to end, for every observed x working state option: thermometer ->
//! temperature-delta (with sensor-registry), checked reading by reading against the oracle.
//! One combination runs every service with a fixed batch linger (`KAPPA_LINGER_MS=5`), the
//! others with the default adaptive one.

use std::time::Duration;

use integration_tests::oracle::SensorInfo;
use integration_tests::{
    Dag, Proc, Verified, registry_sensors, servers, verify_exactly_once, wait_drained, wait_until,
};

async fn get(api: &Proc, path: &str) -> serde_json::Value {
    reqwest::get(format!("http://{}{path}", api.http))
        .await
        .expect("query api")
        .json()
        .await
        .expect("json")
}

fn abs_delta(v: &serde_json::Value) -> f64 {
    v["delta_celsius"].as_f64().unwrap_or(f64::NAN).abs()
}

/// The query API returns the oracle's latest delta per sensor, per site and top-N.
async fn check_query_api(
    api: &Proc,
    v: &Verified,
    sensors: &std::collections::HashMap<String, SensorInfo>,
) {
    // Wait for the views to catch up with the last delta of every sensor.
    let caught_up = wait_until(Duration::from_secs(60), || async {
        let all = get(api, "/v1/sensors").await;
        let list = all["sensors"].as_array().cloned().unwrap_or_default();
        list.len() == v.latest.len()
            && list.iter().all(|s| {
                let id = s["sensor_id"].as_str().unwrap_or_default();
                v.latest
                    .get(id)
                    .is_some_and(|d| d["source_seq"] == s["source_seq"])
            })
    })
    .await;
    assert!(
        caught_up,
        "views did not catch up: {}",
        get(api, "/v1/sensors").await
    );
    let fields = [
        "delta_celsius",
        "latest_celsius",
        "oldest_celsius",
        "min_celsius",
        "max_celsius",
        "samples",
        "window_end",
        "source_seq",
    ];
    for (id, d) in &v.latest {
        let view = get(api, &format!("/v1/sensors/{id}")).await;
        for f in fields {
            assert_eq!(
                view[f], d[f],
                "{id}.{f}: view {view} vs oracle-checked delta {d}"
            );
        }
        assert!(
            view["view_seq"].as_u64().is_some_and(|s| s > 0),
            "view_seq in {view}"
        );
        let h = get(api, &format!("/v1/sensors/{id}/history")).await;
        let hist = h["history"].as_array().expect("history");
        assert_eq!(
            hist.last().map(|x| &x["source_seq"]),
            Some(&d["source_seq"])
        );
    }
    let mut sites: std::collections::BTreeMap<&str, Vec<&serde_json::Value>> = Default::default();
    for (id, d) in &v.latest {
        sites.entry(sensors[id].site.as_str()).or_default().push(d);
    }
    for (site, mut list) in sites {
        list.sort_by(|a, b| {
            abs_delta(b)
                .total_cmp(&abs_delta(a))
                .then(a["sensor_id"].as_str().cmp(&b["sensor_id"].as_str()))
        });
        let got = get(api, &format!("/v1/sites/{site}")).await;
        let ids: Vec<&str> = got["sensors"]
            .as_array()
            .expect("site sensors")
            .iter()
            .filter_map(|x| x["sensor_id"].as_str())
            .collect();
        let want: Vec<&str> = list
            .iter()
            .filter_map(|x| x["sensor_id"].as_str())
            .collect();
        assert_eq!(ids, want, "site {site} ranking");
    }
    let mut all: Vec<&serde_json::Value> = v.latest.values().collect();
    all.sort_by(|a, b| {
        abs_delta(b)
            .total_cmp(&abs_delta(a))
            .then(a["sensor_id"].as_str().cmp(&b["sensor_id"].as_str()))
    });
    let top = get(api, "/v1/top?limit=5").await;
    let ids: Vec<&str> = top["top"]
        .as_array()
        .expect("top")
        .iter()
        .filter_map(|x| x["sensor_id"].as_str())
        .collect();
    let want: Vec<&str> = all
        .iter()
        .take(5)
        .filter_map(|x| x["sensor_id"].as_str())
        .collect();
    assert_eq!(ids, want, "top 5");
    let missing = reqwest::get(format!("http://{}/v1/sensors/nope", api.http))
        .await
        .expect("get");
    assert_eq!(missing.status().as_u16(), 404);
    let bad = reqwest::get(format!("http://{}/v1/top?limit=0", api.http))
        .await
        .expect("get");
    assert_eq!(bad.status().as_u16(), 400);
}

async fn end_to_end(test: &str, observed: &str, working: &str, linger: &str) {
    let s = servers(test).await;
    let affinity = format!("{}/1", s.redis_url);
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_OBSERVED", observed),
            ("KAPPA_WORKING", working),
            ("AFFINITY_REDIS_URL", &affinity),
            ("KAPPA_LINGER_MS", linger),
        ],
    )
    .await;
    let js = &dag.js;
    let mut delta = dag.ready("temperature-delta").await;
    let settled = match linger {
        "auto" => "linger=Auto".to_string(),
        ms => format!("linger=Fixed({ms}ms)"),
    };
    assert!(
        delta.log_text().contains(&settled),
        "temperature-delta runs with {settled}:\n{}",
        delta.log_text()
    );
    let _views = dag.ready("view-builder").await;
    let api = dag.ready("query-api").await;
    let mut thermo = dag.spawn(
        "thermometer",
        &[
            "--sensors",
            "20",
            "--sites",
            "3",
            "--count",
            "3000",
            "--rate",
            "0",
            "--event-step-ms",
            "1000",
            "--out-of-order",
            "0.05",
            "--late",
            "0.01",
            "--seed",
            "7",
        ],
    );
    let status = thermo
        .wait_exit(Duration::from_secs(120))
        .await
        .expect("thermometer finished");
    assert!(
        status.success(),
        "thermometer failed:\n{}",
        thermo.log_text()
    );
    assert!(
        wait_drained(js, Duration::from_secs(90)).await,
        "pipeline did not drain; delta log:\n{}",
        delta.log_text()
    );
    let v = verify_exactly_once(js).await;
    assert_eq!(v.readings, 3000);
    assert!(v.deltas > 2800, "too few deltas: {v:?}");
    assert!(
        v.rejected.get("late").copied().unwrap_or(0) > 0,
        "no late reading was exercised"
    );
    assert_eq!(v.latest.len(), 20);
    eprintln!(
        "[{test}] {} readings -> {} deltas, rejected {:?}",
        v.readings, v.deltas, v.rejected
    );
    check_query_api(&api, &v, &registry_sensors(js).await).await;
    eprintln!("[{test}] query API agrees with the oracle (sensors, sites, top)");
    assert!(
        delta
            .terminate(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "delta did not drain on SIGTERM"
    );
}

macro_rules! combos {
    ($($name:ident: $o:literal, $w:literal, $l:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            end_to_end(stringify!($name), $o, $w, $l).await;
        }
    )*};
}

combos! {
    e2e_semi_stateless_remote: "semi-stateless", "remote", "auto";
    e2e_semi_stateless_local: "semi-stateless", "local", "auto";
    e2e_semi_stateless_affinity: "semi-stateless", "affinity", "auto";
    e2e_stateful_remote: "stateful", "remote", "auto";
    e2e_stateful_local: "stateful", "local", "auto";
    e2e_stateful_affinity: "stateful", "affinity", "auto";
    e2e_stateless_remote: "stateless", "remote", "auto";
    e2e_stateless_local: "stateless", "local", "auto";
    e2e_stateless_affinity: "stateless", "affinity", "5";
}
