//! Test harness for the reference DAG: real NATS JetStream and Redis (containers started with
//! testcontainers when a Docker engine is reachable, otherwise the servers named by `NATS_URL`
//! and `REDIS_URL`), the real service binaries as child processes, stream readers, and an
//! independent oracle of the expected deltas.
//!
//! Backend choice: `KAPPA_TEST_BACKEND=docker|env` forces one; by default Docker is used when
//! its socket answers. With Docker, a container that cannot start fails the test: there is no
//! silent fallback. With `env`, tests wipe the servers' streams and keys. Either way DAG tests
//! run one at a time.

pub mod oracle;
pub mod procs;
pub mod proxy;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use testcontainers::core::{ContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// Public image of NATS the tests (and docker-compose.yml) use.
pub const NATS_IMAGE: (&str, &str) = ("nats", "2.15.1-alpine");
/// Public image of Redis the tests (and docker-compose.yml) use.
pub const REDIS_IMAGE: (&str, &str) = ("redis", "7.0.15-bookworm");

static ENV_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Servers for one test.
pub struct Servers {
    /// NATS URL to give the services.
    pub nats_url: String,
    /// Redis URL to give the services.
    pub redis_url: String,
    /// `docker` or `env`.
    pub backend: &'static str,
    _nats: Option<ContainerAsync<GenericImage>>,
    _redis: Option<ContainerAsync<GenericImage>>,
    _guard: Option<tokio::sync::MutexGuard<'static, ()>>,
}

fn docker_reachable() -> bool {
    match std::env::var("KAPPA_TEST_BACKEND").as_deref() {
        Ok("docker") => return true,
        Ok("env") => return false,
        _ => {}
    }
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        return !host.is_empty();
    }
    std::os::unix::net::UnixStream::connect("/var/run/docker.sock").is_ok()
}

/// Writes a line straight to stderr, past the test harness's output capture, so the backend
/// each test used shows in CI logs even when the test passes.
fn say(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Starts (or finds) NATS and Redis for a test, and says which backend it used.
pub async fn servers(test: &str) -> Servers {
    let _ = std::fs::remove_dir_all(procs::bin_dir().join("test-logs").join(test));
    // One DAG test at a time: each runs several services, and 2 cores are plenty for one.
    let guard = ENV_LOCK.lock().await;
    if docker_reachable() {
        let nats = GenericImage::new(NATS_IMAGE.0, NATS_IMAGE.1)
            .with_exposed_port(ContainerPort::Tcp(4222))
            .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
            .with_cmd(["-js", "-sd", "/tmp/js"])
            .with_startup_timeout(Duration::from_secs(60))
            .start()
            .await
            .unwrap_or_else(|e| {
                panic!("{test}: docker is reachable but the NATS container did not start: {e}")
            });
        let redis = GenericImage::new(REDIS_IMAGE.0, REDIS_IMAGE.1)
            .with_exposed_port(ContainerPort::Tcp(6379))
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_startup_timeout(Duration::from_secs(60))
            .start()
            .await
            .unwrap_or_else(|e| {
                panic!("{test}: docker is reachable but the Redis container did not start: {e}")
            });
        let np = nats.get_host_port_ipv4(4222).await.expect("nats port");
        let rp = redis.get_host_port_ipv4(6379).await.expect("redis port");
        let s = Servers {
            nats_url: format!("nats://127.0.0.1:{np}"),
            redis_url: format!("redis://127.0.0.1:{rp}"),
            backend: "docker",
            _nats: Some(nats),
            _redis: Some(redis),
            _guard: Some(guard),
        };
        say(format!(
            "[{test}] backend: testcontainers ({}:{} at {}, {}:{} at {})",
            NATS_IMAGE.0, NATS_IMAGE.1, s.nats_url, REDIS_IMAGE.0, REDIS_IMAGE.1, s.redis_url
        ));
        s
    } else {
        let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let redis_url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        wipe(&nats_url, &redis_url).await;
        say(format!(
            "[{test}] backend: env (NATS_URL={nats_url}, REDIS_URL={redis_url})"
        ));
        Servers {
            nats_url,
            redis_url,
            backend: "env",
            _nats: None,
            _redis: None,
            _guard: Some(guard),
        }
    }
}

/// Deletes the project's streams and Redis keys (env backend only: scratch servers).
async fn wipe(nats_url: &str, redis_url: &str) {
    let client = async_nats::connect(nats_url)
        .await
        .unwrap_or_else(|e| panic!("NATS_URL {nats_url} is not reachable: {e}"));
    let js = jetstream::new(client);
    for s in [
        "READINGS",
        "DELTAS",
        "SENSORS",
        "DLQ",
        "KAPPA_STATE",
        "VIEWS",
    ] {
        let _ = js.delete_stream(s).await;
    }
    let mut r = redis_client(redis_url).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut r)
        .await
        .expect("FLUSHALL");
}

/// A Redis connection.
pub async fn redis_client(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("REDIS_URL {url} is not reachable: {e}"))
}

/// Connects a test client.
pub async fn nats(url: &str) -> (async_nats::Client, jetstream::Context) {
    let c = async_nats::connect(url).await.expect("nats connect");
    let js = jetstream::new(c.clone());
    (c, js)
}

/// A message read back from a stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// Stored subject.
    pub subject: String,
    /// Headers.
    pub headers: Option<async_nats::HeaderMap>,
    /// Payload.
    pub payload: bytes::Bytes,
}

impl Stored {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    }
}

/// Number of messages in a stream (0 if it does not exist).
pub async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of a stream, in order.
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Stored> {
    let Ok(mut s) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let total = s.info().await.map(|i| i.state.messages).unwrap_or(0);
    if total == 0 {
        return Vec::new();
    }
    let c = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut msgs = c.messages().await.expect("messages");
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while (out.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .expect("stream read timed out")
            .expect("stream ended")
            .expect("message");
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        out.push(Stored {
            seq,
            subject: m.subject.to_string(),
            headers: m.headers.clone(),
            payload: m.payload.clone(),
        });
    }
    out
}

/// Polls `f` until it returns true or `timeout` passes; returns whether it did.
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every reading in `READINGS` has its delta or dead letter.
pub async fn wait_drained(js: &jetstream::Context, timeout: Duration) -> bool {
    wait_until(timeout, || async {
        let r = count(js, "READINGS").await;
        let d = count(js, "DELTAS").await;
        let q = count(js, "DLQ").await;
        r > 0 && d + q >= r
    })
    .await
}

/// Registers a sensor through the registry (request-reply), panicking on refusal.
pub async fn register(
    client: &async_nats::Client,
    id: &str,
    site: &str,
    offset: f64,
    window: u32,
) -> u64 {
    let body = serde_json::json!({"sensor_id": id, "site": site, "calibration_offset": offset, "window_secs": window});
    for _ in 0..50 {
        if let Ok(Ok(m)) = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("registry.cmd.upsert", body.to_string().into()),
        )
        .await
        {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("reply json");
            assert_eq!(v["ok"], true, "upsert refused: {v}");
            return v["version"].as_u64().expect("version");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("registry did not answer");
}

/// Publishes a raw reading payload to `thermo.readings.<id>` and waits for the stream's ack.
pub async fn publish_raw(js: &jetstream::Context, sensor: &str, payload: impl Into<bytes::Bytes>) {
    js.publish(format!("thermo.readings.{sensor}"), payload.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
}

/// The environment every service of a test gets.
pub fn service_env(s: &Servers, extra: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("NATS_URL", s.nats_url.clone()),
        ("REDIS_URL", s.redis_url.clone()),
        ("KAPPA_PARTITIONS", "4".to_string()),
    ];
    for (k, v) in extra {
        let k: &'static str = Box::leak(k.to_string().into_boxed_str());
        env.retain(|(e, _)| *e != k);
        env.push((k, v.to_string()));
    }
    env
}

/// The registry's sensors, read back from its stream (last change of each).
pub async fn registry_sensors(
    js: &jetstream::Context,
) -> std::collections::HashMap<String, oracle::SensorInfo> {
    let mut out = std::collections::HashMap::new();
    for m in read_stream(js, "SENSORS").await {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("sensor json");
        out.insert(
            v["sensor_id"].as_str().unwrap_or_default().to_string(),
            oracle::SensorInfo {
                site: v["site"].as_str().unwrap_or_default().to_string(),
                offset: v["calibration_offset"].as_f64().unwrap_or(0.0),
                window_secs: u32::try_from(v["window_secs"].as_u64().unwrap_or(600)).unwrap_or(600),
            },
        );
    }
    out
}

/// What [`verify_exactly_once`] found.
#[derive(Debug, Default)]
pub struct Verified {
    /// Readings in the stream.
    pub readings: usize,
    /// Deltas (one per accepted reading).
    pub deltas: usize,
    /// Dead letters by reason.
    pub rejected: std::collections::BTreeMap<String, usize>,
    /// The last delta of each sensor (highest source sequence), as JSON.
    pub latest: std::collections::HashMap<String, serde_json::Value>,
}

/// Invariants 1-3: every reading yields exactly one delta or one dead letter, no delta is
/// doubled, deltas equal the oracle, and each sensor's deltas follow its readings' order.
pub async fn verify_exactly_once(js: &jetstream::Context) -> Verified {
    let readings = read_stream(js, "READINGS").await;
    let deltas = read_stream(js, "DELTAS").await;
    let dlq = read_stream(js, "DLQ").await;
    let sensors = registry_sensors(js).await;
    let expected = oracle::expected(&readings, &sensors);
    let mut seen: std::collections::HashMap<u64, &'static str> = std::collections::HashMap::new();
    let mut v = Verified {
        readings: readings.len(),
        ..Default::default()
    };
    let mut last_source_per_sensor: std::collections::HashMap<String, u64> =
        std::collections::HashMap::new();
    for d in &deltas {
        let j: serde_json::Value = serde_json::from_slice(&d.payload).expect("delta json");
        let src = j["source_seq"].as_u64().expect("source_seq");
        assert!(
            seen.insert(src, "delta").is_none(),
            "reading {src} has two outcomes (delta doubled): {j}"
        );
        let exp = expected
            .get(&src)
            .unwrap_or_else(|| panic!("delta for unknown reading {src}"));
        if let Err(e) = oracle::check_delta(&j, exp) {
            panic!("delta for reading {src} differs from the oracle: {e}");
        }
        let id = j["sensor_id"].as_str().unwrap_or_default().to_string();
        let prev = last_source_per_sensor.insert(id.clone(), src).unwrap_or(0);
        assert!(prev < src, "deltas of {id} out of order: {prev} then {src}");
        v.latest.insert(id, j);
        v.deltas += 1;
    }
    for m in &dlq {
        let src: u64 = m
            .header("Kappa-Source-Seq")
            .and_then(|s| s.parse().ok())
            .expect("Kappa-Source-Seq");
        let reason = m.header("Kappa-Reason").expect("Kappa-Reason");
        assert!(
            m.header("Kappa-Source-Subject")
                .is_some_and(|s| s.starts_with("thermo.readings."))
        );
        assert!(
            seen.insert(src, "dlq").is_none(),
            "reading {src} has two outcomes (dead letter doubled)"
        );
        let exp = expected
            .get(&src)
            .unwrap_or_else(|| panic!("dead letter for unknown reading {src}"));
        assert_eq!(
            exp,
            &oracle::Expected::Rejected(reason.clone()),
            "reading {src}"
        );
        *v.rejected.entry(reason).or_default() += 1;
    }
    for r in &readings {
        assert!(
            seen.contains_key(&r.seq),
            "reading {} has no delta and no dead letter",
            r.seq
        );
    }
    v
}

/// Waits until the service at `http` reports `n` partitions running in `/healthz`, and returns
/// its health JSON.
pub async fn wait_partitions(http: &str, n: usize, timeout: Duration) -> Option<serde_json::Value> {
    let url = format!("http://{http}/healthz");
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(r) = reqwest::get(&url).await
            && let Ok(h) = r.json::<serde_json::Value>().await
        {
            let running = h["checks"]["partitions"]["detail"]
                .as_object()
                .map(|m| m.values().filter(|p| p["state"] == "running").count())
                .unwrap_or(0);
            if running >= n {
                return Some(h);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Sum of a Prometheus metric's samples (all label sets) at a service's `/metrics`.
pub async fn metric(http: &str, name: &str) -> f64 {
    let body = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}
