//! The HTTP API over views in a real Redis (`REDIS_URL`, databases 12 to 14 of it, one per
//! test, as they run at once), written here by
//! the wire contract's key layout ([`thermo_domain::views`]; view-builder, their real writer,
//! is checked against query-api end to end in `integration-tests`). Skipped with a note when
//! `REDIS_URL` is not set.

use std::time::Duration;

use thermo_domain::Delta;
use thermo_domain::views::{HistoryEntry, Keys, SensorMeta, rank_score};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn test_db_url(db: u32) -> Option<String> {
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
    Some(format!("{base}/{db}"))
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

/// A connection to database `db` of `REDIS_URL`'s Redis, emptied (`None` without `REDIS_URL`).
async fn fresh_db(db: u32) -> Option<redis::aio::ConnectionManager> {
    let url = test_db_url(db)?;
    let conn = kappa_runtime::working::remote::connect(&url, "REDIS_URL")
        .await
        .expect("redis");
    let mut c = conn.clone();
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    Some(conn)
}

/// Serves the API over `conn` with `limits` on a free port of 127.0.0.1.
async fn serve(
    conn: redis::aio::ConnectionManager,
    limits: query_api::Limits,
) -> std::net::SocketAddr {
    let state = query_api::ApiState::new(
        query_api::ViewReader::new(conn),
        Duration::from_secs(5),
        limits,
        kappa_runtime::shutdown::CancellationToken::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, query_api::router(state)).await;
    });
    addr
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
    let Some(conn) = fresh_db(14).await else {
        return;
    };
    let mut c = conn.clone();
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

    let addr = serve(conn, query_api::Limits::default()).await;

    let (code, all) = get(addr, "/v1/sensors").await;
    assert_eq!(code, 200);
    // The low watermark: partition 0 is at 3, partition 1 at 4.
    assert_eq!(all["view_seq"], 3);
    assert_eq!(all["positions"], serde_json::json!({"0": 3, "1": 4}));
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
        ("/v1/sensors/%FF", 400),
        ("/v1/sensors?limit=0", 400),
        ("/v1/sensors?limit=1001", 400),
        ("/v1/sensors?cursor=a.b", 400),
        ("/v1/sites/lab?cursor=a", 400),
        ("/v1/sites/lab?cursor=inf:a", 400),
        ("/v1/sites/lab?cursor=-1:a.b", 400),
        ("/v1/sites/lab?limit=1001", 400),
        ("/v1/nothing", 404),
    ] {
        let (code, body) = get(addr, path).await;
        assert_eq!(code, want, "{path}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let (code, page) = get(addr, "/").await;
    assert_eq!(code, 200);
    assert!(page.as_str().is_some_and(|p| p.contains("/v1/live")
        && p.contains("/v1/pipeline")
        && !p.contains("://")));
}

/// Pages of `/v1/sensors` and `/v1/sites/{site}` together hold every sensor exactly once, in
/// the list's order, with many ties in the ranking (and pages that end inside a run of ties).
#[tokio::test]
async fn pages_hold_every_sensor_once_in_order() {
    let Some(conn) = fresh_db(13).await else {
        return;
    };
    let mut c = conn.clone();
    // 257 sensors at two sites; |delta| takes 5 values, so each one is shared by ~25 sensors
    // per site.
    let mut items = Vec::new();
    for i in 0..257u64 {
        let site = if i % 3 == 0 { "roof" } else { "lab" };
        let d = (i % 5) as f64 * 0.5 * if i % 2 == 0 { 1.0 } else { -1.0 };
        items.push((i + 1, delta(&format!("s-{i:04}"), site, d, 100 + i)));
    }
    write_batch(&mut c, 0, &items).await;
    let addr = serve(conn, query_api::Limits::default()).await;

    let mut by_id: Vec<String> = items.iter().map(|(_, d)| d.sensor_id.clone()).collect();
    by_id.sort();
    for limit in [1usize, 7, 100, 1000] {
        let got = pages(addr, "/v1/sensors", limit, 257).await;
        assert_eq!(got, by_id, "/v1/sensors by {limit}");
    }
    for site in ["lab", "roof"] {
        let mut want: Vec<(f64, String)> = items
            .iter()
            .filter(|(_, d)| d.site == site)
            .map(|(_, d)| (-d.delta_celsius.abs(), d.sensor_id.clone()))
            .collect();
        want.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let want: Vec<String> = want.into_iter().map(|(_, id)| id).collect();
        for limit in [1usize, 7, 25, 1000] {
            let got = pages(addr, &format!("/v1/sites/{site}"), limit, want.len()).await;
            assert_eq!(got, want, "/v1/sites/{site} by {limit}");
        }
    }
}

/// Follows `next_cursor` from the first page of `path` with pages of `limit`, checking each
/// page's `total` and size; the ids in order.
async fn pages(addr: std::net::SocketAddr, path: &str, limit: usize, total: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor = String::new();
    for _ in 0..=total {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{sep}limit={limit}");
        if !cursor.is_empty() {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let (code, page) = get(addr, &url).await;
        assert_eq!(code, 200, "{url}: {page}");
        assert_eq!(page["total"].as_u64(), Some(total as u64), "{url}");
        let views = page["sensors"].as_array().expect("sensors");
        assert!(views.len() <= limit, "{url}: {} views", views.len());
        ids.extend(
            views
                .iter()
                .map(|v| v["sensor_id"].as_str().expect("id").to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(views.len(), limit, "{url}: a short page before the last");
                cursor = c.to_string();
            }
            None => return ids,
        }
    }
    panic!("{path}: more than {total} pages");
}

/// The live clients' cap: the connection beyond `max_live` gets a JSON 503, and a request
/// that outlives the timeout (Redis paused by `CLIENT PAUSE`) gets a JSON 503 too.
#[tokio::test]
async fn limits_answer_json_503() {
    let Some(conn) = fresh_db(12).await else {
        return;
    };
    let mut c = conn.clone();
    write_batch(&mut c, 0, &[(1, delta("a", "lab", 1.0, 11))]).await;
    let limits = query_api::Limits {
        max_live: 2,
        request_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let addr = serve(conn, limits).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET /v1/live HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).await.expect("read"), 1, "live closed");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/event-stream"), "{head}");
        open.push(s);
    }
    let (code, body) = get(addr, "/v1/live").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("live clients")),
        "{body}"
    );

    // Every client command waits while Redis is paused: the read cannot answer in time.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .expect("pause");
    let (code, body) = get(addr, "/v1/sensors").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{body}"
    );
    // (UNPAUSE would wait out the pause too.) Once it ends, the same read answers.
    let mut answered = false;
    for _ in 0..100 {
        if get(addr, "/v1/sensors").await.0 == 200 {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "no answer after the pause");
    drop(open);
}
