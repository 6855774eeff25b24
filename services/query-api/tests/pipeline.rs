//! `/v1/pipeline` over a real NATS (`NATS_URL`) and Redis (`REDIS_URL`, not read): status
//! responders of the runtime answer on `kappa.status`, the handler gathers them, names the
//! expected service that did not answer, and reports the `DLQ` stream's count as the server
//! holds it. Skipped with a note when `NATS_URL` or `REDIS_URL` is not set.

use std::time::Duration;

use kappa_runtime::http::Health;
use kappa_runtime::shutdown::CancellationToken;
use kappa_runtime::status::{self, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use utoipa::OpenApi;

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
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[tokio::test]
async fn pipeline_gathers_the_status_of_every_answering_service() {
    let (Ok(nats_url), Ok(redis_url)) = (std::env::var("NATS_URL"), std::env::var("REDIS_URL"))
    else {
        eprintln!("note: NATS_URL or REDIS_URL not set; skipping the pipeline test");
        return;
    };
    let client = async_nats::connect(nats_url.as_str()).await.expect("nats");
    let js = async_nats::jetstream::new(client.clone());
    kappa_runtime::dlq::declare(&js)
        .await
        .expect("DLQ declared");
    let stop = CancellationToken::new();

    // Two services of this process answer; one is ready, one is not.
    let ready = Status::new("pipeline-test-ready", Health::new());
    ready.option("working", "local");
    let not_ready_health = Health::new();
    not_ready_health.register(
        "store",
        std::sync::Arc::new(|| (false, serde_json::json!("down"))),
    );
    let not_ready = Status::new("pipeline-test-down", not_ready_health);
    status::spawn_responder(client.clone(), ready, stop.clone());
    status::spawn_responder(client.clone(), not_ready, stop.clone());
    // Each responder answers once it has subscribed: ask until both have.
    let mut answered = 0;
    for _ in 0..50 {
        answered = status::gather(
            &client,
            &status::subject("pipeline-test-ready"),
            Duration::from_millis(100),
        )
        .await
        .expect("gathered")
        .len()
            + status::gather(
                &client,
                &status::subject("pipeline-test-down"),
                Duration::from_millis(100),
            )
            .await
            .expect("gathered")
            .len();
        if answered == 2 {
            break;
        }
    }
    assert_eq!(answered, 2, "both responders answer on their own subject");

    // The views are not read here: any database will do.
    let conn = kappa_runtime::working::remote::connect(&redis_url, "REDIS_URL")
        .await
        .expect("redis");
    let args = query_api::pipeline::PipelineArgs {
        pipeline_gather_ms: 300,
        pipeline_cache_ms: 0,
        pipeline_services: vec![
            "pipeline-test-ready".into(),
            "pipeline-test-down".into(),
            "pipeline-test-ghost".into(),
        ],
    };
    let state = query_api::ApiState::new(
        query_api::ViewReader::new(conn),
        Duration::from_secs(5),
        query_api::Limits::default(),
        stop.clone(),
    )
    .with_pipeline(query_api::pipeline::Pipeline::new(client.clone(), &args));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, query_api::router(state)).await;
    });

    let (code, body) = get(addr, "/v1/pipeline").await;
    assert_eq!(code, 200, "{body}");
    let services = body["services"].as_array().expect("services");
    let of = |name: &str| {
        services
            .iter()
            .find(|s| s["service"] == name)
            .unwrap_or_else(|| panic!("{name} answered: {body}"))
    };
    assert_eq!(of("pipeline-test-ready")["ready"], true);
    assert_eq!(of("pipeline-test-ready")["options"]["working"], "local");
    assert_eq!(of("pipeline-test-down")["ready"], false);
    assert_eq!(
        of("pipeline-test-down")["health"]["checks"]["store"]["detail"],
        "down"
    );
    assert_eq!(body["missing"], serde_json::json!(["pipeline-test-ghost"]));
    let dlq = js
        .get_stream("DLQ")
        .await
        .expect("DLQ")
        .cached_info()
        .state
        .messages;
    assert_eq!(body["dlq_messages"], dlq, "{body}");
    assert!(
        body["streams"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "DLQ")),
        "{body}"
    );

    // A stopped service no longer answers: it is missing.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let state = query_api::ApiState::new(
        query_api::ViewReader::new(
            kappa_runtime::working::remote::connect(&redis_url, "REDIS_URL")
                .await
                .expect("redis"),
        ),
        Duration::from_secs(5),
        query_api::Limits::default(),
        CancellationToken::new(),
    )
    .with_pipeline(query_api::pipeline::Pipeline::new(client.clone(), &args));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, query_api::router(state)).await;
    });
    let (code, body) = get(addr, "/v1/pipeline").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["missing"],
        serde_json::json!([
            "pipeline-test-down",
            "pipeline-test-ghost",
            "pipeline-test-ready"
        ]),
        "{body}"
    );
}

#[test]
fn the_openapi_document_describes_pipeline() {
    let doc = query_api::ApiDoc::openapi();
    assert!(doc.paths.paths.contains_key("/v1/pipeline"));
    let schemas = doc.components.expect("components").schemas;
    for s in [
        "PipelineStatus",
        "ServiceStatus",
        "PartitionLag",
        "StreamStatus",
    ] {
        assert!(schemas.contains_key(s), "{s}");
    }
}
