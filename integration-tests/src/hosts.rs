//! Servers a test starts itself, so that it can crash them: nats-server (JetStream) and
//! redis-server as child processes of the test, each on a free port of 127.0.0.1 with its own
//! data folder under the test's log folder, that [`Host::kill9`] kills like a crash (SIGKILL)
//! and [`Host::restart`] starts again on the same port with the same data. [`Hosts::start`]
//! also gives the [`Servers`] to hand to [`Dag::on`](crate::Dag::on); like every DAG fixture it
//! takes the global lock, so DAG tests run one at a time. Never the suite's shared servers: a
//! test that kills one kills its own.
//!
//! Durability is a choice ([`Durability`]): the defaults of nats-server (`sync_interval` 2
//! minutes) and Redis (AOF `everysec`, or no persistence at all), or the strict mode of
//! `docker/nats/nats-strict.conf` and `docker-compose.strict.yml` (`sync_interval: always`,
//! `appendfsync always`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kappa_testkit::clients;

use crate::{Proc, Servers, procs, say, wait_until};

/// What Redis keeps on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisPersistence {
    /// Nothing (`--save '' --appendonly no`): a restart comes back empty.
    None,
    /// AOF with `appendfsync everysec` (the docker-compose.yml setting).
    AofEverySec,
    /// AOF with `appendfsync always` (strict mode).
    AofAlways,
}

/// How the servers write to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// `jetstream { sync_interval: always }` (strict) instead of the default 2 minutes.
    pub nats_sync_always: bool,
    /// Redis persistence.
    pub redis: RedisPersistence,
}

impl Durability {
    /// The servers' defaults as docker-compose.yml runs them: nats-server's `sync_interval`,
    /// Redis AOF `everysec`.
    pub const DEFAULT: Durability = Durability {
        nats_sync_always: false,
        redis: RedisPersistence::AofEverySec,
    };
    /// Strict mode: fsync before every acknowledgement, in both servers.
    pub const STRICT: Durability = Durability {
        nats_sync_always: true,
        redis: RedisPersistence::AofAlways,
    };
}

/// One server process the test owns: its command, port and data folder stay the same across
/// restarts.
pub struct Host {
    /// `nats` or `redis` (names its log files: `<name>-<n>.log`, one per start).
    pub name: &'static str,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data folder.
    pub dir: PathBuf,
    program: &'static str,
    args: Vec<String>,
    logs: PathBuf,
    starts: usize,
    proc: Option<Proc>,
}

impl Host {
    /// The URL clients use (`nats://` or `redis://`).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.name, self.port)
    }

    /// The running process's id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.program);
        cmd.args(&self.args);
        let log = self.logs.join(format!("{}-{}.log", self.name, self.starts));
        self.starts += 1;
        self.proc = Some(Proc::spawn(self.name, cmd, log)?);
        Ok(())
    }

    /// Waits until the server answers: NATS with JetStream (account info), Redis `PING`
    /// (which fails while it still loads its AOF).
    async fn wait_up(&self, timeout: Duration) -> bool {
        let url = self.url();
        match self.name {
            "nats" => {
                wait_until(timeout, || async {
                    match clients::nats(&url, "integration-tests-hosts").await {
                        Ok((_, js)) => js.query_account().await.is_ok(),
                        Err(_) => false,
                    }
                })
                .await
            }
            _ => {
                wait_until(timeout, || async {
                    let Ok(mut c) = clients::redis(&url).await else {
                        return false;
                    };
                    redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                })
                .await
            }
        }
    }

    /// SIGKILL, like a crash or a power cut of the process (what the OS had not written yet
    /// stays in its page cache: a kill -9 is not a power failure).
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Starts the server again on the same port and data folder (killing it first if it still
    /// runs) and waits until it answers; returns how long that took. Panics if it does not
    /// answer within 60 s.
    pub async fn restart(&mut self) -> Duration {
        self.kill9();
        let t = Instant::now();
        self.spawn()
            .unwrap_or_else(|e| panic!("restart {}: {e:#}", self.name));
        assert!(
            self.wait_up(Duration::from_secs(60)).await,
            "{} did not come back on port {} (logs in {})",
            self.name,
            self.port,
            self.logs.display()
        );
        t.elapsed()
    }
}

/// The test's own nats-server and redis-server.
pub struct Hosts {
    /// nats-server with JetStream.
    pub nats: Host,
    /// redis-server (the services' `REDIS_URL`; `AFFINITY_REDIS_URL` may use another of its
    /// databases).
    pub redis: Host,
}

fn on_path(program: &str, arg: &str) -> bool {
    Command::new(program).arg(arg).output().is_ok()
}

impl Hosts {
    /// Starts both servers for `test` with `durability`, waits until they answer, and returns
    /// them with the [`Servers`] (backend `hosts`) for [`Dag::on`](crate::Dag::on). `None`,
    /// with a line on stderr saying so, when `nats-server` or `redis-server` is not on PATH.
    pub async fn start(test: &str, durability: Durability) -> Option<(Hosts, Servers)> {
        if !on_path("nats-server", "--version") || !on_path("redis-server", "--version") {
            say(format!(
                "[{test}] nats-server or redis-server is not on PATH: no restartable servers"
            ));
            return None;
        }
        let _ = std::fs::remove_dir_all(procs::log_dir(test));
        let guard = crate::ENV_LOCK.lock().await;
        let logs = procs::log_dir(test);
        let data = logs.join("data");
        std::fs::create_dir_all(data.join("redis")).expect("redis data dir");
        let np = procs::free_port();
        let js_dir = data.join("js");
        let mut nats_args = vec![
            "-js".to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            np.to_string(),
        ];
        if !durability.nats_sync_always {
            nats_args.extend(["-sd".to_string(), js_dir.display().to_string()]);
        } else {
            // Only a configuration file sets it, with the store folder (nats-server refuses
            // `-sd` beside a `store_dir`).
            let conf = data.join("nats-strict.conf");
            std::fs::write(
                &conf,
                format!(
                    "jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                    js_dir.display()
                ),
            )
            .expect("nats config");
            nats_args.extend(["-c".to_string(), conf.display().to_string()]);
        }
        let rp = procs::free_port();
        let mut redis_args = vec![
            "--bind".to_string(),
            "127.0.0.1".into(),
            "--port".into(),
            rp.to_string(),
            "--dir".into(),
            data.join("redis").display().to_string(),
            "--save".into(),
            String::new(),
        ];
        let aof: &[&str] = match durability.redis {
            RedisPersistence::None => &["--appendonly", "no"],
            RedisPersistence::AofEverySec => &["--appendonly", "yes", "--appendfsync", "everysec"],
            RedisPersistence::AofAlways => &["--appendonly", "yes", "--appendfsync", "always"],
        };
        redis_args.extend(aof.iter().map(|s| s.to_string()));
        let mut hosts = Hosts {
            nats: Host {
                name: "nats",
                port: np,
                dir: js_dir,
                program: "nats-server",
                args: nats_args,
                logs: logs.clone(),
                starts: 0,
                proc: None,
            },
            redis: Host {
                name: "redis",
                port: rp,
                dir: data.join("redis"),
                program: "redis-server",
                args: redis_args,
                logs: logs.clone(),
                starts: 0,
                proc: None,
            },
        };
        for h in [&mut hosts.nats, &mut hosts.redis] {
            h.spawn()
                .unwrap_or_else(|e| panic!("{test}: start {}: {e:#}", h.name));
            assert!(
                h.wait_up(Duration::from_secs(30)).await,
                "{test}: {} did not start on port {} (logs in {})",
                h.name,
                h.port,
                logs.display()
            );
        }
        say(format!(
            "[{test}] backend: hosts (nats-server at {}, redis-server at {}, {durability:?})",
            hosts.nats.url(),
            hosts.redis.url()
        ));
        let servers = Servers {
            nats_url: hosts.nats.url(),
            redis_url: hosts.redis.url(),
            backend: "hosts",
            _nats: None,
            _redis: None,
            _procs: Vec::new(),
            _guard: Some(guard),
        };
        Some((hosts, servers))
    }
}
