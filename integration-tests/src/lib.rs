//! Test harness for the reference DAG: real NATS JetStream and Redis (containers started with
//! testcontainers when a Docker engine is reachable, otherwise the servers named by `NATS_URL`
//! and `REDIS_URL`), the real service binaries as child processes, the [`Dag`] fixture every
//! test starts from (servers, service environment, client, a ready sensor-registry), the DAG's
//! checks (exactly once against an independent oracle of the expected deltas), and panicking
//! forms of `kappa_testkit`'s helpers for test code.
//!
//! Backend choice: `KAPPA_TEST_BACKEND=docker|env` forces one; by default Docker is used when
//! its socket answers. With Docker, a container that cannot start fails the test: there is no
//! silent fallback. With `env`, tests wipe the servers' streams and keys. Either way DAG tests
//! run one at a time.

pub mod docker_cluster;
pub mod hosts;
pub mod matrix;
pub mod oracle;
pub mod procs;
pub mod proxy;
pub mod race;
pub mod secured;
pub mod views;

use std::time::{Duration, Instant};

use async_nats::jetstream;
pub use kappa_testkit::streams::{Stored, count};
pub use kappa_testkit::wait::wait_until;
use kappa_testkit::{clients, metrics, streams};
pub use procs::Proc;
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
    /// `docker`, `env`, `cluster` ([`nats_cluster`]), `hosts` ([`hosts::Hosts`]), `secured`
    /// ([`secured::secured_nats`]) or `docker-cluster` ([`docker_cluster::DockerCluster`]).
    pub backend: &'static str,
    _nats: Option<ContainerAsync<GenericImage>>,
    _redis: Option<ContainerAsync<GenericImage>>,
    _procs: Vec<Proc>,
    _guard: Option<tokio::sync::MutexGuard<'static, ()>>,
}

impl Servers {
    /// Servers started by someone else (their owner stops them), for this crate's fixtures;
    /// holds the one-DAG-test-at-a-time `guard`.
    pub(crate) fn started_elsewhere(
        nats_url: String,
        redis_url: String,
        backend: &'static str,
        guard: tokio::sync::MutexGuard<'static, ()>,
    ) -> Self {
        Servers {
            nats_url,
            redis_url,
            backend,
            _nats: None,
            _redis: None,
            _procs: Vec::new(),
            _guard: Some(guard),
        }
    }
}

/// True when the tests use Docker: `KAPPA_TEST_BACKEND=docker` forces it, `env` refuses it,
/// otherwise when `DOCKER_HOST` is set or the Docker socket answers.
pub fn docker_reachable() -> bool {
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
    let _ = std::fs::remove_dir_all(procs::log_dir(test));
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
            _procs: Vec::new(),
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
            _procs: Vec::new(),
            _guard: Some(guard),
        }
    }
}

/// A JetStream cluster of `nodes` nats-server processes started by the test itself (on free
/// ports, storage under the test's log folder, killed with the returned [`Servers`]), for what
/// only a replicated stream shows; Redis is `REDIS_URL`'s (or the default), not wiped. `None`
/// (with a line on stderr saying so) when `nats-server` is not on PATH.
pub async fn nats_cluster(test: &str, nodes: usize) -> Option<Servers> {
    if std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        say(format!("[{test}] nats-server is not on PATH: no cluster"));
        return None;
    }
    let _ = std::fs::remove_dir_all(procs::log_dir(test));
    let guard = ENV_LOCK.lock().await;
    let dir = procs::log_dir(test);
    std::fs::create_dir_all(&dir).expect("log dir");
    let ports: Vec<(u16, u16)> = (0..nodes)
        .map(|_| (procs::free_port(), procs::free_port()))
        .collect();
    let routes = ports
        .iter()
        .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut started = Vec::new();
    for (i, (client, cluster)) in ports.iter().enumerate() {
        let mut cmd = std::process::Command::new("nats-server");
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &client.to_string()])
            .args(["-sd", &dir.join(format!("js-{i}")).display().to_string()])
            .args(["--server_name", &format!("n{i}"), "--cluster_name", test])
            .args(["--cluster", &format!("nats://127.0.0.1:{cluster}")])
            .args(["--routes", &routes]);
        let log = dir.join(format!("nats-{i}.log"));
        started.push(Proc::spawn(&format!("nats-{i}"), cmd, log).expect("start nats-server"));
    }
    let nats_url = format!("nats://127.0.0.1:{}", ports[0].0);
    // Ready once the cluster has a meta leader: a replicated stream can be created.
    let ok = wait_until(Duration::from_secs(30), || async {
        let Ok((_, js)) = clients::nats(&nats_url, "integration-tests").await else {
            return false;
        };
        let probe = jetstream::stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe.cluster".into()],
            num_replicas: nodes,
            ..Default::default()
        };
        let created = js.get_or_create_stream(probe).await.is_ok();
        created && js.delete_stream("PROBE").await.is_ok()
    })
    .await;
    assert!(
        ok,
        "{test}: the {nodes}-node NATS cluster did not form (logs in {})",
        dir.display()
    );
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    say(format!(
        "[{test}] backend: {nodes}-node nats-server cluster at {nats_url}"
    ));
    Some(Servers {
        nats_url,
        redis_url,
        backend: "cluster",
        _nats: None,
        _redis: None,
        _procs: started,
        _guard: Some(guard),
    })
}

/// Deletes the project's streams and Redis keys (env backend only: scratch servers).
async fn wipe(nats_url: &str, redis_url: &str) {
    let (_, js) = clients::nats(nats_url, "integration-tests")
        .await
        .unwrap_or_else(|e| panic!("NATS_URL: {e:#}"));
    streams::delete(
        &js,
        &[
            "READINGS",
            "DELTAS",
            "SENSORS",
            "DLQ",
            "KAPPA_STATE",
            "VIEWS",
        ],
    )
    .await;
    clients::flushall(redis_url)
        .await
        .unwrap_or_else(|e| panic!("REDIS_URL: {e:#}"));
}

/// One test's servers, the environment its services get, a NATS client and a running
/// sensor-registry: the setup every DAG test starts from. Services it starts log under the
/// test's name; every process is killed when the test's locals are dropped.
pub struct Dag {
    /// The test's name (its log folder).
    pub test: String,
    /// The environment every service of the test gets ([`service_env`]).
    pub env: Vec<(&'static str, String)>,
    /// A NATS client of the test.
    pub client: async_nats::Client,
    /// Its JetStream context.
    pub js: jetstream::Context,
    /// The sensor registry, ready.
    pub registry: Proc,
    /// With [`Dag::on_with_users`]: each service's NATS password (it runs as its own user).
    pub users: Option<std::collections::BTreeMap<&'static str, String>>,
    /// Declared last, dropped last: the registry stops before the servers go.
    pub servers: Servers,
}

impl Dag {
    /// [`servers`] for `test`, then [`Dag::on`] them.
    pub async fn start(test: &str, extra: &[(&str, &str)]) -> Dag {
        Dag::on(servers(test).await, test, extra).await
    }

    /// On servers already started: [`service_env`] with `extra`, a client, and the
    /// sensor-registry started and ready.
    pub async fn on(servers: Servers, test: &str, extra: &[(&str, &str)]) -> Dag {
        let url = servers.nats_url.clone();
        Dag::start_on(servers, test, extra, &url, None).await
    }

    /// [`Dag::on`] servers that enforce `docker/nats/permissions.conf`: every service runs as
    /// its own user (`NATS_USER` = its name, with its password from `passwords`), the test's
    /// client as `admin` (`admin_url`, the seeds with its credentials).
    pub async fn on_with_users(
        servers: Servers,
        test: &str,
        extra: &[(&str, &str)],
        admin_url: &str,
        passwords: std::collections::BTreeMap<&'static str, String>,
    ) -> Dag {
        Dag::start_on(servers, test, extra, admin_url, Some(passwords)).await
    }

    async fn start_on(
        servers: Servers,
        test: &str,
        extra: &[(&str, &str)],
        client_url: &str,
        users: Option<std::collections::BTreeMap<&'static str, String>>,
    ) -> Dag {
        let env = service_env(&servers, extra);
        let (client, js) = nats(client_url).await;
        let mut registry = procs::start(
            test,
            "sensor-registry",
            &with_user(&env, users.as_ref(), "sensor-registry"),
            &[],
        );
        ready(&mut registry).await;
        Dag {
            test: test.to_string(),
            env,
            client,
            js,
            registry,
            users,
            servers,
        }
    }

    /// The environment of service `name`: the test's, plus its own NATS user with
    /// [`Dag::on_with_users`].
    pub fn env_of(&self, name: &str) -> Vec<(&'static str, String)> {
        with_user(&self.env, self.users.as_ref(), name)
    }

    /// Starts service `name` with the test's environment and `args` (not waiting for it).
    pub fn spawn(&self, name: &str, args: &[&str]) -> Proc {
        procs::start(&self.test, name, &self.env_of(name), args)
    }

    /// Starts service `name` with the test's environment and waits until it is ready.
    pub async fn ready(&self, name: &str) -> Proc {
        let mut p = self.spawn(name, &[]);
        ready(&mut p).await;
        p
    }
}

/// `env` plus service `name`'s NATS user and password when `users` has one for it.
fn with_user(
    env: &[(&'static str, String)],
    users: Option<&std::collections::BTreeMap<&'static str, String>>,
    name: &str,
) -> Vec<(&'static str, String)> {
    let mut env = env.to_vec();
    if let Some(password) = users.and_then(|u| u.get(name)) {
        env.retain(|(k, _)| *k != "NATS_USER" && *k != "NATS_PASSWORD");
        env.push(("NATS_USER", name.to_string()));
        env.push(("NATS_PASSWORD", password.clone()));
    }
    env
}

/// Waits (30 s at most) until `p` answers `/healthz`, panicking with its log otherwise.
pub async fn ready(p: &mut Proc) {
    wait_ready(p, Duration::from_secs(30)).await;
}

/// Waits (`timeout` at most) until `p` answers `/healthz`, panicking with its log otherwise.
pub async fn wait_ready(p: &mut Proc, timeout: Duration) {
    if let Err(e) = p.wait_ready(timeout).await {
        panic!("{e:#}");
    }
}

/// Connects a test client (panics if NATS is not reachable).
pub async fn nats(url: &str) -> (async_nats::Client, jetstream::Context) {
    clients::nats(url, "integration-tests")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Every message of a stream, in order ([`streams::read`]; panics if it cannot be read).
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Stored> {
    streams::read(js, stream)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
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

/// What [`judge`] found: the counts of a fault-matrix row and what each failure was.
#[derive(Debug, Default)]
pub struct Judged {
    /// The outcomes, as [`verify_exactly_once`] reports them (those that could be judged).
    pub verified: Verified,
    /// Readings stored in `READINGS` with no delta and no dead letter.
    pub lost: usize,
    /// Outcomes beyond the first of a reading (a second delta or dead letter).
    pub doubled: usize,
    /// Outcomes that differ from the oracle, belong to no stored reading, or break a sensor's
    /// order.
    pub wrong: usize,
    /// One line per failure (the first few are enough to debug).
    pub problems: Vec<String>,
}

impl Judged {
    /// No input lost, doubled or wrong.
    pub fn exact(&self) -> bool {
        self.lost + self.doubled + self.wrong == 0
    }
}

/// Judges every delta and dead letter against the oracle, counting instead of stopping at the
/// first failure (the fault matrix reports the counts): only readings actually stored in
/// `READINGS` are judged, each must yield exactly one delta or one dead letter equal to the
/// oracle's, and each sensor's deltas follow its readings' order.
pub async fn judge(js: &jetstream::Context) -> Judged {
    let readings = read_stream(js, "READINGS").await;
    let deltas = read_stream(js, "DELTAS").await;
    let dlq = read_stream(js, "DLQ").await;
    let sensors = registry_sensors(js).await;
    let expected = oracle::expected(&readings, &sensors);
    let mut seen: std::collections::HashMap<u64, &'static str> = std::collections::HashMap::new();
    let mut j = Judged {
        verified: Verified {
            readings: readings.len(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut last_source_per_sensor: std::collections::HashMap<String, u64> =
        std::collections::HashMap::new();
    for d in &deltas {
        let Ok(delta) = serde_json::from_slice::<serde_json::Value>(&d.payload) else {
            j.wrong += 1;
            j.problems.push(format!("DELTAS seq {}: not JSON", d.seq));
            continue;
        };
        let Some(src) = delta["source_seq"].as_u64() else {
            j.wrong += 1;
            j.problems
                .push(format!("delta without source_seq: {delta}"));
            continue;
        };
        if seen.insert(src, "delta").is_some() {
            j.doubled += 1;
            j.problems.push(format!(
                "reading {src} has two outcomes (delta doubled): {delta}"
            ));
            continue;
        }
        let Some(exp) = expected.get(&src) else {
            j.wrong += 1;
            j.problems.push(format!("delta for unknown reading {src}"));
            continue;
        };
        if let Err(e) = oracle::check_delta(&delta, exp) {
            j.wrong += 1;
            j.problems.push(format!(
                "delta for reading {src} differs from the oracle: {e}"
            ));
            continue;
        }
        let id = delta["sensor_id"].as_str().unwrap_or_default().to_string();
        let prev = last_source_per_sensor.insert(id.clone(), src).unwrap_or(0);
        if prev >= src {
            j.wrong += 1;
            j.problems
                .push(format!("deltas of {id} out of order: {prev} then {src}"));
        }
        j.verified.latest.insert(id, delta);
        j.verified.deltas += 1;
    }
    for m in &dlq {
        let (Some(src), Some(reason)) = (
            m.header("Kappa-Source-Seq")
                .and_then(|s| s.parse::<u64>().ok()),
            m.header("Kappa-Reason"),
        ) else {
            j.wrong += 1;
            j.problems.push(format!(
                "dead letter {} without Kappa-Source-Seq / Kappa-Reason",
                m.seq
            ));
            continue;
        };
        if !m
            .header("Kappa-Source-Subject")
            .is_some_and(|s| s.starts_with("thermo.readings."))
        {
            j.wrong += 1;
            j.problems.push(format!(
                "dead letter of reading {src} without its Kappa-Source-Subject"
            ));
            continue;
        }
        if seen.insert(src, "dlq").is_some() {
            j.doubled += 1;
            j.problems.push(format!(
                "reading {src} has two outcomes (dead letter doubled)"
            ));
            continue;
        }
        match expected.get(&src) {
            None => {
                j.wrong += 1;
                j.problems
                    .push(format!("dead letter for unknown reading {src}"));
            }
            Some(exp) if exp != &oracle::Expected::Rejected(reason.clone()) => {
                j.wrong += 1;
                j.problems.push(format!(
                    "reading {src}: dead letter {reason}, the oracle says {exp:?}"
                ));
            }
            Some(_) => *j.verified.rejected.entry(reason).or_default() += 1,
        }
    }
    // Judging a moving system is the caller's mistake, not the service's: outcomes read after
    // READINGS can belong to readings stored since (CI judged "a delta for an unknown reading"
    // twice that way, on a cluster where the thermometer was still publishing).
    let stored_after = count(js, "READINGS").await;
    if stored_after != readings.len() as u64 {
        j.wrong += 1;
        j.problems.push(format!(
            "READINGS went from {} to {stored_after} messages while it was judged: judge \
             only after the inputs are all published",
            readings.len()
        ));
    }
    for r in &readings {
        if !seen.contains_key(&r.seq) {
            j.lost += 1;
            j.problems
                .push(format!("reading {} has no delta and no dead letter", r.seq));
        }
    }
    j
}

/// Invariants 1-3: every reading yields exactly one delta or one dead letter, no delta is
/// doubled, deltas equal the oracle, and each sensor's deltas follow its readings' order
/// ([`judge`], panicking with the first failures).
pub async fn verify_exactly_once(js: &jetstream::Context) -> Verified {
    let j = judge(js).await;
    assert!(
        j.exact(),
        "{} lost, {} doubled, {} wrong; first: {:#?}",
        j.lost,
        j.doubled,
        j.wrong,
        &j.problems[..j.problems.len().min(10)]
    );
    j.verified
}

/// A service's `/healthz` JSON, or `None` if it does not answer with JSON.
pub async fn healthz(http: &str) -> Option<serde_json::Value> {
    reqwest::get(format!("http://{http}/healthz"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The partitions a `/healthz` JSON reports running.
pub fn running_partitions(health: &serde_json::Value) -> std::collections::BTreeSet<u32> {
    health["checks"]["partitions"]["detail"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v["state"] == "running")
                .filter_map(|(k, _)| k.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the service at `http` reports `n` partitions running in `/healthz`, and returns
/// its health JSON.
pub async fn wait_partitions(http: &str, n: usize, timeout: Duration) -> Option<serde_json::Value> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(h) = healthz(http).await
            && running_partitions(&h).len() >= n
        {
            return Some(h);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Sum of a Prometheus metric's samples (all label sets) at a service's `/metrics` (panics if
/// the service does not answer).
pub async fn metric(http: &str, name: &str) -> f64 {
    let page = metrics::scrape(&reqwest::Client::new(), http)
        .await
        .unwrap_or_else(|| panic!("{http}/metrics did not answer"));
    metrics::sum(&page, name)
}
