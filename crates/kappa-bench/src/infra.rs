//! The servers the benchmark runs against (nats-server and redis-servers it starts on the host,
//! or the ones `--reuse` names), and the `/proc` readings it reports: RSS and CPU of processes
//! and of the machine. Child processes, ports, waits and probes are `kappa_testkit`'s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use kappa_testkit::wait::wait_until_every;
use kappa_testkit::{Proc, clients, ports::free_port, streams};

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) a process has used so far, in seconds (`/proc/<pid>/stat`).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Context switches (voluntary + involuntary) of all of a process's threads so far
/// (`/proc/<pid>/task/*/status`): each is a thread going to sleep or being preempted, so at a
/// low rate they count the wake-ups an input costs. Threads that ended are not counted.
pub fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(s) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for l in s.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some(total)
}

/// The whole machine's CPU counters (`/proc/stat`, first line): (busy, total) in ticks.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// Share of the machine's CPU (all cores) busy between two [`machine_ticks`] readings.
pub fn busy_share(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (a?, b?);
    (t1 > t0).then(|| (b1 - b0) as f64 / (t1 - t0) as f64)
}

/// CPU used by a set of named processes since the meter started.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    /// (name, pid, CPU seconds at start).
    procs: Vec<(&'static str, u32, f64)>,
    /// Context switches of each process at start, in the order of `procs`.
    switches: Vec<u64>,
}

impl CpuMeter {
    /// Starts counting for `procs` (name, pid).
    pub fn start(procs: &[(&'static str, u32)]) -> CpuMeter {
        CpuMeter {
            procs: procs
                .iter()
                .map(|&(name, pid)| (name, pid, cpu_secs(pid).unwrap_or(0.0)))
                .collect(),
            switches: procs
                .iter()
                .map(|&(_, pid)| context_switches(pid).unwrap_or(0))
                .collect(),
        }
    }
    /// Context switches per message of each process since `start`, over `n` messages.
    pub fn switches_per_msg(&self, n: u64) -> Vec<(&'static str, f64)> {
        self.procs
            .iter()
            .zip(&self.switches)
            .map(|(&(name, pid, _), &start)| {
                let now = context_switches(pid).unwrap_or(start);
                (name, now.saturating_sub(start) as f64 / n.max(1) as f64)
            })
            .collect()
    }
    /// CPU µs per message of each process since `start`, over `n` messages.
    pub fn per_msg(&self, n: u64) -> Vec<(&'static str, f64)> {
        self.procs
            .iter()
            .map(|&(name, pid, start)| {
                let used = cpu_secs(pid).map_or(0.0, |c| (c - start).max(0.0));
                (name, used * 1e6 / n.max(1) as f64)
            })
            .collect()
    }
}

/// Messages and Redis commands counted between two moments: what each NATS connection sent
/// to the server (by connection name, from nats-server's `/connz`) and what Redis ran (by
/// command, from `INFO commandstats`). Counts, unlike CPU or time, do not depend on what else
/// the machine is doing, so they say where round trips per input come from on any machine.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// Messages sent to nats-server, by connection name.
    pub nats: std::collections::BTreeMap<String, u64>,
    /// Calls, by Redis command.
    pub redis: std::collections::BTreeMap<String, u64>,
}

impl Traffic {
    /// The counts now (empty parts when a server does not answer).
    pub async fn read(monitor: Option<&str>, redis_url: &str) -> Traffic {
        let mut t = Traffic::default();
        if let Some(m) = monitor
            && let Ok(r) = reqwest::get(format!("http://{m}/connz?limit=4096")).await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            for c in v["connections"].as_array().into_iter().flatten() {
                let name = c["name"].as_str().unwrap_or("(unnamed)").to_string();
                *t.nats.entry(name).or_default() += c["in_msgs"].as_u64().unwrap_or(0);
            }
        }
        if let Ok(client) = redis::Client::open(redis_url)
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
            && let Ok(info) = redis::cmd("INFO")
                .arg("commandstats")
                .query_async::<String>(&mut conn)
                .await
        {
            // cmdstat_evalsha:calls=12,usec=...
            for line in info.lines() {
                if let Some((name, rest)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                    && let Some(calls) = rest
                        .split(',')
                        .find_map(|kv| kv.strip_prefix("calls="))
                        .and_then(|c| c.parse().ok())
                {
                    t.redis.insert(name.to_string(), calls);
                }
            }
        }
        t
    }

    /// What was counted from `before` to `self`, per input over `n` inputs, largest first
    /// (entries under 0.01 per input left out).
    pub fn per_input(&self, before: &Traffic, n: u64) -> TrafficPerInput {
        let per = |now: &std::collections::BTreeMap<String, u64>,
                   then: &std::collections::BTreeMap<String, u64>| {
            let mut v: Vec<(String, f64)> = now
                .iter()
                .map(|(k, &c)| {
                    let d = c.saturating_sub(then.get(k).copied().unwrap_or(0));
                    (k.clone(), d as f64 / n.max(1) as f64)
                })
                .filter(|(_, x)| *x >= 0.01)
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v
        };
        TrafficPerInput {
            nats: per(&self.nats, &before.nats),
            redis: per(&self.redis, &before.redis),
        }
    }
}

/// [`Traffic`] per input: (name, count per input), largest first.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TrafficPerInput {
    /// NATS messages sent per input, by connection.
    pub nats: Vec<(String, f64)>,
    /// Redis calls per input, by command.
    pub redis: Vec<(String, f64)>,
}

impl TrafficPerInput {
    /// One line: `total (a x, b y, ...)` for the NATS part and the Redis part.
    pub fn describe(&self) -> (String, String) {
        let line = |v: &[(String, f64)]| {
            let total: f64 = v.iter().map(|(_, x)| x).sum();
            let parts: Vec<String> = v.iter().map(|(k, x)| format!("{k} {x:.2}")).collect();
            format!("{total:.2} ({})", parts.join(", "))
        };
        (line(&self.nats), line(&self.redis))
    }
}

/// How the servers a run starts write to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Durability {
    /// nats-server's default `sync_interval` (2 minutes), Redis without persistence: what
    /// `all` and `smoke` measure.
    Volatile,
    /// The defaults a deployment runs (docker-compose.yml): nats-server's default
    /// `sync_interval`, Redis AOF with `appendfsync everysec`.
    Default,
    /// Strict mode (docker-compose.strict.yml): `jetstream { sync_interval: always }`, Redis
    /// AOF with `appendfsync always`.
    Strict,
}

/// How NATS is laid out for `kappa-bench topology`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Topology {
    /// One nats-server, no users, streams R1 (what the other benchmarks run).
    OneNode,
    /// One nats-server with the users and permissions of docker/nats/permissions.conf, each
    /// service connecting as its own user; streams R1.
    OneNodeUsers,
    /// Three nats-servers in one JetStream cluster, every stream and bucket R3
    /// (`KAPPA_REPLICAS=3`), the services given the three seeds.
    ThreeNodes,
}

/// The users of docker/nats/permissions.conf.
const NATS_USERS: [&str; 6] = [
    "admin",
    "thermometer",
    "sensor-registry",
    "temperature-delta",
    "view-builder",
    "query-api",
];

/// The servers the benchmark runs against.
pub struct Servers {
    pub nats_url: String,
    /// Environment every service gets besides the URLs (e.g. `KAPPA_REPLICAS`).
    pub env: Vec<(String, String)>,
    /// Environment of one service only (its NATS user), by service name.
    pub service_env: Vec<(String, Vec<(String, String)>)>,
    pub redis_url: String,
    /// `unix://` URL of the colocated Redis (affinity working state).
    pub affinity_url: String,
    pub dir: PathBuf,
    /// nats-server's pid when this run started it (CPU accounting).
    pub nats_pid: Option<u32>,
    /// redis-server's (TCP) pid when this run started it.
    pub redis_pid: Option<u32>,
    /// `host:port` of nats-server's monitoring endpoint when this run started it (message
    /// counts per connection, [`Traffic`]).
    pub nats_monitor: Option<String>,
    _procs: Vec<Proc>,
}

/// Waits until a TCP server listens at `addr`.
async fn wait_tcp(addr: &str, timeout: Duration) -> bool {
    wait_until_every(timeout, Duration::from_millis(50), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await
}

/// Waits until a server listens on the unix socket `p`.
async fn wait_path(p: &Path, timeout: Duration) -> bool {
    wait_until_every(timeout, Duration::from_millis(50), || async {
        tokio::net::UnixStream::connect(p).await.is_ok()
    })
    .await
}

impl Servers {
    /// Starts nats-server and two redis-servers (TCP, and unix socket for affinity) in `dir`, or
    /// with `reuse`, takes `NATS_URL`/`REDIS_URL` (and `AFFINITY_REDIS_URL` if set) from the
    /// environment; a colocated Redis is still started when no `AFFINITY_REDIS_URL` is given.
    pub async fn start(dir: &Path, reuse: bool) -> anyhow::Result<Servers> {
        Servers::start_with(dir, reuse, Durability::Volatile).await
    }

    /// [`Servers::start`] with the given durability for the nats-server and the TCP
    /// redis-server it starts (not for `--reuse`d servers; the colocated Redis never persists).
    pub async fn start_with(
        dir: &Path,
        reuse: bool,
        durability: Durability,
    ) -> anyhow::Result<Servers> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let mut procs = Vec::new();
        let mut nats_monitor = None;
        let (nats_url, redis_url) = if reuse {
            (
                std::env::var("NATS_URL").context("--reuse needs NATS_URL")?,
                std::env::var("REDIS_URL").context("--reuse needs REDIS_URL")?,
            )
        } else {
            let np = free_port()?;
            let mp = free_port()?;
            nats_monitor = Some(format!("127.0.0.1:{mp}"));
            let js_dir = dir.join("js");
            let _ = std::fs::remove_dir_all(&js_dir);
            let mut nats = Command::new("nats-server");
            nats.args(["-js", "-a", "127.0.0.1", "-p", &np.to_string()]);
            nats.args(["-m", &mp.to_string()]);
            if durability != Durability::Strict {
                nats.arg("-sd").arg(&js_dir);
            } else {
                // Only a configuration file sets it, with the store folder (nats-server refuses
                // `-sd` beside a `store_dir`).
                let conf = dir.join("nats-strict.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                        js_dir.display()
                    ),
                )?;
                nats.arg("-c").arg(&conf);
            }
            procs.push(Proc::spawn(
                "nats-server",
                nats,
                dir.join("logs/nats-server.log"),
            )?);
            let rp = free_port()?;
            let mut redis = Command::new("redis-server");
            redis.args(["--port", &rp.to_string(), "--bind", "127.0.0.1"]);
            let redis_dir = dir.join("redis");
            let _ = std::fs::remove_dir_all(&redis_dir);
            std::fs::create_dir_all(&redis_dir)?;
            redis.arg("--dir").arg(&redis_dir).args(["--save", ""]);
            match durability {
                Durability::Volatile => redis.args(["--appendonly", "no"]),
                Durability::Default => {
                    redis.args(["--appendonly", "yes", "--appendfsync", "everysec"])
                }
                Durability::Strict => {
                    redis.args(["--appendonly", "yes", "--appendfsync", "always"])
                }
            };
            procs.push(Proc::spawn(
                "redis-server",
                redis,
                dir.join("logs/redis-server.log"),
            )?);
            let na = format!("127.0.0.1:{np}");
            let ra = format!("127.0.0.1:{rp}");
            if !wait_tcp(&na, Duration::from_secs(20)).await {
                bail!("nats-server did not start on {na} (is nats-server on PATH?)");
            }
            if !wait_tcp(&ra, Duration::from_secs(20)).await {
                bail!("redis-server did not start on {ra} (is redis-server on PATH?)");
            }
            (format!("nats://{na}"), format!("redis://{ra}"))
        };
        let affinity_url = match std::env::var("AFFINITY_REDIS_URL") {
            Ok(u) if reuse => u,
            _ => {
                let sock = dir.join("r.sock");
                let _ = std::fs::remove_file(&sock);
                let mut redis = Command::new("redis-server");
                redis.arg("--unixsocket").arg(&sock).args(["--port", "0"]);
                redis.args(["--save", "", "--appendonly", "no"]);
                procs.push(Proc::spawn(
                    "redis-affinity",
                    redis,
                    dir.join("logs/redis-affinity.log"),
                )?);
                if !wait_path(&sock, Duration::from_secs(20)).await {
                    bail!("colocated redis-server did not open {}", sock.display());
                }
                format!("unix://{}", sock.display())
            }
        };
        let pid_of = |name: &str| procs.iter().find(|p| p.name == name).map(Proc::pid);
        Ok(Servers {
            nats_pid: pid_of("nats-server"),
            redis_pid: pid_of("redis-server"),
            nats_monitor,
            env: Vec::new(),
            service_env: Vec::new(),
            nats_url,
            redis_url,
            affinity_url,
            dir: dir.to_path_buf(),
            _procs: procs,
        })
    }

    /// Servers for `topology`: Redis as [`Servers::start`] starts it, NATS laid out as `t`
    /// (the single server it starts is replaced by the users' one or by a 3-node cluster).
    pub async fn start_topology(dir: &Path, t: Topology) -> anyhow::Result<Servers> {
        let mut s = Servers::start_with(dir, false, Durability::Volatile).await?;
        if t == Topology::OneNode {
            return Ok(s);
        }
        s._procs.retain(|p| p.name != "nats-server");
        s.nats_monitor = None;
        let _ = std::fs::remove_dir_all(dir.join("js"));
        let nodes = if t == Topology::ThreeNodes { 3 } else { 1 };
        let ports: Vec<(u16, u16)> = (0..nodes)
            .map(|_| Ok::<_, anyhow::Error>((free_port()?, free_port()?)))
            .collect::<Result<_, _>>()?;
        let routes = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let password = |u: &str| format!("bench-{u}");
        let mut pids = Vec::new();
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let mut nats = Command::new("nats-server");
            if t == Topology::OneNodeUsers {
                // The compose file's permissions, next to a configuration that includes them.
                let perms = workspace_root().join("docker/nats/permissions.conf");
                std::fs::copy(&perms, dir.join("permissions.conf"))
                    .with_context(|| format!("{}", perms.display()))?;
                let conf = dir.join("nats-users.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "host: 127.0.0.1\nport: {client}\njetstream {{ store_dir: \"{}\" }}\ninclude permissions.conf\n",
                        dir.join("js").display()
                    ),
                )?;
                nats.arg("-c").arg(&conf);
                for u in NATS_USERS {
                    nats.env(
                        format!(
                            "KAPPA_NATS_{}_PASSWORD",
                            u.to_ascii_uppercase().replace('-', "_")
                        ),
                        password(u),
                    );
                }
            } else {
                nats.args(["-js", "-a", "127.0.0.1", "-p", &client.to_string()])
                    .arg("-sd")
                    .arg(dir.join(format!("js-{i}")))
                    .args(["--server_name", &format!("n{i}"), "--cluster_name", "bench"])
                    .args(["--cluster", &format!("nats://127.0.0.1:{cluster}")])
                    .args(["--routes", &routes]);
            }
            let p = Proc::spawn(
                "nats-server",
                nats,
                dir.join(format!("logs/nats-server-{i}.log")),
            )?;
            pids.push(p.pid());
            s._procs.push(p);
            if !wait_tcp(&format!("127.0.0.1:{client}"), Duration::from_secs(20)).await {
                bail!("nats-server {i} did not start on port {client}");
            }
        }
        s.nats_pid = pids.first().copied();
        let seeds: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("nats://127.0.0.1:{c}"))
            .collect();
        if t == Topology::OneNodeUsers {
            s.nats_url = format!(
                "nats://admin:{}@127.0.0.1:{}",
                password("admin"),
                ports[0].0
            );
            s.service_env = NATS_USERS[1..]
                .iter()
                .map(|u| {
                    (
                        u.to_string(),
                        vec![
                            ("NATS_USER".to_string(), u.to_string()),
                            ("NATS_PASSWORD".to_string(), password(u)),
                        ],
                    )
                })
                .collect();
        } else {
            s.nats_url = seeds.join(",");
            s.env.push(("KAPPA_REPLICAS".into(), "3".into()));
            // Ready once the cluster has a meta leader: a replicated stream can be created.
            let url = s.nats_url.clone();
            let formed =
                wait_until_every(Duration::from_secs(30), Duration::from_millis(200), || {
                    let url = url.clone();
                    async move {
                        let Ok((_, js)) = clients::nats(&url, "kappa-bench").await else {
                            return false;
                        };
                        let probe = jetstream::stream::Config {
                            name: "BENCH_PROBE".into(),
                            subjects: vec!["bench.probe".into()],
                            num_replicas: 3,
                            ..Default::default()
                        };
                        js.get_or_create_stream(probe).await.is_ok()
                            && js.delete_stream("BENCH_PROBE").await.is_ok()
                    }
                })
                .await;
            if !formed {
                bail!(
                    "the 3-node cluster did not form (logs in {})",
                    dir.display()
                );
            }
        }
        Ok(s)
    }

    /// The replica count of the streams this layout's services and baselines create.
    pub fn replicas(&self) -> usize {
        self.env
            .iter()
            .find(|(k, _)| k == "KAPPA_REPLICAS")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1)
    }

    /// The environment of service `name` besides the URLs.
    pub fn env_of(&self, name: &str) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if let Some((_, e)) = self.service_env.iter().find(|(n, _)| n == name) {
            env.extend(e.iter().cloned());
        }
        env
    }

    /// A client of the NATS server, named `kappa-bench`.
    pub async fn nats(&self) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
        clients::nats(&self.nats_url, "kappa-bench").await
    }

    /// A connection to the Redis server at `url` (one of this run's).
    pub async fn redis(&self, url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        clients::redis(url).await
    }

    /// Deletes the DAG's streams (except the registry's `SENSORS`) and the benchmark's own, and
    /// empties both Redis servers: every scenario starts from nothing but registered sensors.
    pub async fn wipe(&self, js: &jetstream::Context) -> anyhow::Result<()> {
        self.wipe_except(js, &[]).await
    }

    /// [`Servers::wipe`], keeping the streams named in `keep` (e.g. a pre-filled `READINGS`
    /// that several scenarios drain in turn: the services start from their working state's
    /// position, which the wipe resets).
    pub async fn wipe_except(&self, js: &jetstream::Context, keep: &[&str]) -> anyhow::Result<()> {
        let all = [
            thermo_domain::streams::READINGS,
            thermo_domain::streams::DELTAS,
            kappa_runtime::dlq::STREAM,
            kappa_runtime::working::snapshot::STREAM,
            thermo_domain::streams::VIEWS,
            "BENCH_READINGS",
            "BENCH_DELTAS",
            "BENCH_HOP",
        ];
        let gone: Vec<&str> = all.into_iter().filter(|s| !keep.contains(s)).collect();
        streams::delete(js, &gone).await;
        // Partition leases (KV buckets) of earlier scenarios: a killed instance's membership and
        // leases would otherwise linger for their TTL and halve the next instance's share.
        let mut names = js.stream_names();
        let mut lease_streams = Vec::new();
        while let Some(Ok(n)) = futures::StreamExt::next(&mut names).await {
            if n.starts_with("KV_KAPPA_LEASES") {
                lease_streams.push(n);
            }
        }
        let lease_streams: Vec<&str> = lease_streams.iter().map(String::as_str).collect();
        streams::delete(js, &lease_streams).await;
        for url in [&self.redis_url, &self.affinity_url] {
            clients::flushall(url).await?;
        }
        Ok(())
    }
}

/// The workspace's root folder.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `(version line)` of a command, or "unknown".
pub fn version_of(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8(o.stdout)
                .ok()
                .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
