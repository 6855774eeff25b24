//! The servers (nats-server, redis-server) and the service binaries as child processes, plus the
//! probes the benchmarks poll: stream counts, `/healthz`, `/metrics`, RSS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
    /// `host:port` of its HTTP listener (services only).
    pub http: String,
}

impl Proc {
    /// Spawns `program` with `args` and `env`, output to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
        http: String,
    ) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let err = file.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        Ok(Proc {
            child,
            name: name.to_string(),
            log,
            http,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far (last `n` lines).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after `timeout`.
    pub fn terminate(&mut self, timeout: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    /// Waits for exit up to `timeout`; true if it exited successfully.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s.success());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("{} did not exit within {timeout:?}", self.name)
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory in KiB (VmRSS), if readable.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
}

impl CpuMeter {
    /// Starts counting for `procs` (name, pid).
    pub fn start(procs: &[(&'static str, u32)]) -> CpuMeter {
        CpuMeter {
            procs: procs
                .iter()
                .map(|&(name, pid)| (name, pid, cpu_secs(pid).unwrap_or(0.0)))
                .collect(),
        }
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

/// The servers the benchmark runs against.
pub struct Servers {
    pub nats_url: String,
    pub redis_url: String,
    /// `unix://` URL of the colocated Redis (affinity working state).
    pub affinity_url: String,
    pub dir: PathBuf,
    /// nats-server's pid when this run started it (CPU accounting).
    pub nats_pid: Option<u32>,
    /// redis-server's (TCP) pid when this run started it.
    pub redis_pid: Option<u32>,
    _procs: Vec<Proc>,
}

async fn wait_tcp(addr: &str, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn wait_path(p: &Path, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if tokio::net::UnixStream::connect(p).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

impl Servers {
    /// Starts nats-server and two redis-servers (TCP, and unix socket for affinity) in `dir`, or
    /// with `reuse`, takes `NATS_URL`/`REDIS_URL` (and `AFFINITY_REDIS_URL` if set) from the
    /// environment; a colocated Redis is still started when no `AFFINITY_REDIS_URL` is given.
    pub async fn start(dir: &Path, reuse: bool) -> anyhow::Result<Servers> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let mut procs = Vec::new();
        let (nats_url, redis_url) = if reuse {
            (
                std::env::var("NATS_URL").context("--reuse needs NATS_URL")?,
                std::env::var("REDIS_URL").context("--reuse needs REDIS_URL")?,
            )
        } else {
            let np = free_port()?;
            let js_dir = dir.join("js");
            let _ = std::fs::remove_dir_all(&js_dir);
            let args: Vec<String> = [
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &np.to_string(),
                "-sd",
                &js_dir.to_string_lossy(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs.push(Proc::spawn(
                "nats-server",
                Path::new("nats-server"),
                &args,
                &[],
                dir.join("logs/nats-server.log"),
                String::new(),
            )?);
            let rp = free_port()?;
            let args: Vec<String> = [
                "--port",
                &rp.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs.push(Proc::spawn(
                "redis-server",
                Path::new("redis-server"),
                &args,
                &[],
                dir.join("logs/redis-server.log"),
                String::new(),
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
                let args: Vec<String> = vec![
                    "--unixsocket".into(),
                    sock.to_string_lossy().into_owned(),
                    "--port".into(),
                    "0".into(),
                    "--save".into(),
                    String::new(),
                    "--appendonly".into(),
                    "no".into(),
                ];
                procs.push(Proc::spawn(
                    "redis-affinity",
                    Path::new("redis-server"),
                    &args,
                    &[],
                    dir.join("logs/redis-affinity.log"),
                    String::new(),
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
            nats_url,
            redis_url,
            affinity_url,
            dir: dir.to_path_buf(),
            _procs: procs,
        })
    }

    pub async fn nats(&self) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
        let c = async_nats::ConnectOptions::new()
            .name("kappa-bench")
            .connect(&self.nats_url)
            .await
            .with_context(|| format!("connect {}", self.nats_url))?;
        let js = jetstream::new(c.clone());
        Ok((c, js))
    }

    pub async fn redis(&self, url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connect {url}"))
    }

    /// Deletes the DAG's streams (except the registry's `SENSORS`) and the benchmark's own, and
    /// empties both Redis servers: every scenario starts from nothing but registered sensors.
    pub async fn wipe(&self, js: &jetstream::Context) -> anyhow::Result<()> {
        for s in [
            thermo_domain::streams::READINGS,
            thermo_domain::streams::DELTAS,
            kappa_runtime::dlq::STREAM,
            kappa_runtime::working::snapshot::STREAM,
            thermo_domain::streams::VIEWS,
            "BENCH_READINGS",
            "BENCH_DELTAS",
            "BENCH_HOP",
        ] {
            let _ = js.delete_stream(s).await;
        }
        // Partition leases (KV buckets) of earlier scenarios: a killed instance's membership and
        // leases would otherwise linger for their TTL and halve the next instance's share.
        let mut names = js.stream_names();
        let mut lease_streams = Vec::new();
        while let Some(Ok(n)) = futures::StreamExt::next(&mut names).await {
            if n.starts_with("KV_KAPPA_LEASES") {
                lease_streams.push(n);
            }
        }
        for n in lease_streams {
            let _ = js.delete_stream(&n).await;
        }
        for url in [&self.redis_url, &self.affinity_url] {
            let mut r = self.redis(url).await?;
            let _: () = redis::cmd("FLUSHALL").query_async(&mut r).await?;
        }
        Ok(())
    }
}

/// Messages in a stream (0 if it does not exist).
pub async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// GET `http://<addr><path>`: status and body.
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

/// Polls `/healthz` until 200; returns the time it took, or an error with the log tail.
pub async fn wait_ready(
    http: &reqwest::Client,
    p: &mut Proc,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let end = since + timeout;
    while Instant::now() < end {
        if let Some((200, _)) = get(http, &p.http, "/healthz").await {
            return Ok(since.elapsed());
        }
        if !p.alive() {
            bail!("{} exited before ready; log:\n{}", p.name, p.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!(
        "{} not ready after {timeout:?}; log:\n{}",
        p.name,
        p.log_tail(20)
    )
}

/// Sum of every series of Prometheus metric `name` (counters and gauges; for histograms pass
/// `name_sum` or `name_count`).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Fetches `/metrics` (empty on failure).
pub async fn metrics(http: &reqwest::Client, addr: &str) -> String {
    get(http, addr, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default()
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
