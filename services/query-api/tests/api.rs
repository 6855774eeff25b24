//! The HTTP API over views in a real Redis (`REDIS_URL`, database 14 of it), written here by
//! the wire contract's key layout ([`thermo_domain::views`]; view-builder, their real writer,
//! is checked against query-api end to end in `integration-tests`). Skipped with a note when
//! `REDIS_URL` is not set.

use std::time::Duration;

use thermo_domain::Delta;
use thermo_domain::views::{HistoryEntry, Keys, SensorMeta, rank_score};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn test_db_url() -> Option<String> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("note: REDIS_URL not set; skipping the query-api test");
        return None;
    };
    let base = url.trim_end_matches('/');
    let host_part = base.split("://").nth(1).unwrap_or(base);
    let base = match host_part.rfind('/') {
        Some(i) => &base[..base.len() - (host_part.len() - i)],
        None => base,
    };
    Some(format!("{base}/14"))
}

fn delta(id: &str, site: &str, d: f64, source_seq: u64) -> Delta {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(source_seq as i64);
    Delta {
        sensor_id: id.into(),
        site: site.into(),
        delta_celsius: d,
        oldest_celsius: 20.0,
        latest_celsius: 20.0 + d,
        min_celsius: 20.0_f64.min(20.0 + d),
        max_celsius: 20.0_f64.max(20.0 + d),
        samples: 2,
        window_secs: 600,
        measured_at: t,
        window_end: t,
        reading_celsius: 20.0 + d,
        calibration_offset: 0.0,
        sensor_version: 1,
        source_seq,
    }
}

/// Writes one partition's batch into generation `0` (the active one when `views:active` is
/// absent), as the layout says: each delta replaces its sensor's view and adds a history point.
async fn write_batch(
    c: &mut redis::aio::ConnectionManager,
    partition: u32,
    items: &[(u64, Delta)],
) {
    let k = Keys::new("0");
    let mut pipe = redis::pipe();
    for (seq, d) in items {
        let meta = SensorMeta::from_delta(d);
        let id = &d.sensor_id;
        let score = rank_score(d.delta_celsius);
        pipe.hset_multiple(
            k.sensor(id),
            &[
                ("delta", serde_json::to_string(d).expect("json")),
                ("seq", seq.to_string()),
                ("meta", serde_json::to_string(&meta).expect("json")),
                ("mv", meta.version.to_string()),
                ("site", meta.site.clone()),
            ],
        )
        .rpush(
            k.history(id),
            serde_json::to_string(&HistoryEntry::of(d, *seq)).expect("json"),
        )
        .zadd(k.sensors(), id, 0)
        .zadd(k.site(&d.site), id, score)
        .zadd(k.rank(), id, score)
        .sadd(k.sites(), &d.site)
        .hset(k.positions(), partition, seq);
    }
    let _: () = pipe.query_async(c).await.expect("write views");
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into()));
    (status, json)
}

#[tokio::test]
async fn api_answers_from_the_views() {
    let Some(url) = test_db_url() else { return };
    let conn = kappa_runtime::working::remote::connect(&url, "REDIS_URL")
        .await
        .expect("redis");
    let mut c = conn.clone();
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    for (p, items) in [
        (
            0,
            vec![
                (1, delta("a", "lab", 1.0, 11)),
                (3, delta("a", "lab", 2.0, 13)),
            ],
        ),
        (
            1,
            vec![
                (2, delta("b", "lab", -3.0, 12)),
                (4, delta("c", "roof", 2.0, 14)),
            ],
        ),
    ] {
        write_batch(&mut c, p, &items).await;
    }

    let state = query_api::ApiState::new(
        query_api::ViewReader::new(conn),
        Duration::from_secs(5),
        kappa_runtime::shutdown::CancellationToken::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, query_api::router(state)).await;
    });

    let (code, all) = get(addr, "/v1/sensors").await;
    assert_eq!(code, 200);
    assert_eq!(all["view_seq"], 4);
    let ids: Vec<&str> = all["sensors"]
        .as_array()
        .expect("sensors")
        .iter()
        .map(|v| v["sensor_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec!["a", "b", "c"]);

    let (code, a) = get(addr, "/v1/sensors/a").await;
    assert_eq!(code, 200);
    for f in [
        "sensor_id",
        "site",
        "delta_celsius",
        "latest_celsius",
        "oldest_celsius",
        "min_celsius",
        "max_celsius",
        "samples",
        "window_end",
        "source_seq",
        "view_seq",
    ] {
        assert!(a.get(f).is_some(), "missing {f}");
    }
    assert_eq!(
        (a["view_seq"].as_u64(), a["source_seq"].as_u64()),
        (Some(3), Some(13))
    );

    let (code, h) = get(addr, "/v1/sensors/a/history").await;
    assert_eq!(code, 200);
    assert_eq!(h["view_seq"], 3);
    let pts: Vec<f64> = h["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|p| p["delta_celsius"].as_f64().expect("delta"))
        .collect();
    assert_eq!(pts, vec![1.0, 2.0]);

    let (code, lab) = get(addr, "/v1/sites/lab").await;
    assert_eq!(code, 200);
    assert_eq!(lab["site"], "lab");
    let ids: Vec<&str> = lab["sensors"]
        .as_array()
        .expect("sensors")
        .iter()
        .map(|v| v["sensor_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec!["b", "a"]);

    let (code, top) = get(addr, "/v1/top?limit=2").await;
    assert_eq!(code, 200);
    let ids: Vec<&str> = top["top"]
        .as_array()
        .expect("top")
        .iter()
        .map(|v| v["sensor_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec!["b", "a"]);

    for (path, want) in [
        ("/v1/top?limit=0", 400),
        ("/v1/top?limit=101", 400),
        ("/v1/top?limit=x", 400),
        ("/v1/sensors/nope", 404),
        ("/v1/sensors/nope/history", 404),
        ("/v1/sites/nowhere", 404),
        ("/v1/sensors/a.b", 400),
        ("/v1/sites/a%20b", 400),
    ] {
        let (code, body) = get(addr, path).await;
        assert_eq!(code, want, "{path}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let (code, page) = get(addr, "/").await;
    assert_eq!(code, 200);
    assert!(page.as_str().is_some_and(|p| p.contains("/v1/top")));
}
