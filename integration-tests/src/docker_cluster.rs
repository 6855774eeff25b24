//! A three-node NATS JetStream cluster in containers on a private Docker network created by the
//! test, plus a Redis container, for the cluster fault tests (tests/cluster.rs).
//!
//! The nodes run `docker/nats/nats-cluster.conf`, the file of docker-compose.cluster.yml (server
//! name from `KAPPA_NATS_SERVER_NAME`, routes to `nats-1..3:6222`, the node's network alias),
//! beside `docker/nats/permissions.conf`, with a password per user generated for the run (in
//! each container's environment, as compose passes them): the fault tests run every service as
//! its own user ([`crate::Dag::on_with_users`]) and their own client as `admin`. Client ports
//! are published on 127.0.0.1 only, on ports fixed at start so a node restarted keeps its port. Containers and the network are named `kappa-cl-<test>-...` and
//! removed when the [`DockerCluster`] is dropped (also when the test fails).

use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use kappa_testkit::clients;

use crate::{NATS_IMAGE, REDIS_IMAGE, Servers, procs, say, wait_until};

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its server name and network alias (`nats-1`).
    pub name: String,
    /// Its container's name.
    pub container: String,
    /// Its client port on 127.0.0.1.
    pub port: u16,
}

/// The containers and the network of one test; removed on drop.
#[derive(Debug)]
pub struct DockerCluster {
    /// The private network's name.
    pub network: String,
    /// The three nodes.
    pub nodes: Vec<Node>,
    /// Password of each user of [`crate::secured::USERS`], this run's.
    pub passwords: std::collections::BTreeMap<&'static str, String>,
    redis: String,
}

/// Runs `docker` with `args`, returning its trimmed stdout or an error with its stderr.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// [`docker`], panicking with the error.
fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e:#}"))
}

impl DockerCluster {
    /// Starts the network, the three nodes and Redis for `test`, and waits until a stream
    /// replicated three times can be created. `None` (said on stderr) when the test backend is
    /// not Docker ([`crate::docker_reachable`]).
    pub async fn start(test: &str) -> Option<(DockerCluster, Servers)> {
        if !crate::docker_reachable() {
            say(format!(
                "[{test}] skipped: the cluster fault tests need Docker (KAPPA_TEST_BACKEND=docker forces it, and a reachable engine)"
            ));
            return None;
        }
        let _ = std::fs::remove_dir_all(procs::log_dir(test));
        let guard = crate::ENV_LOCK.lock().await;
        let dir = procs::log_dir(test).join("nats-config");
        std::fs::create_dir_all(&dir).expect("config dir");
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::copy(
            repo.join("docker/nats/nats-cluster.conf"),
            dir.join("nats-cluster.conf"),
        )
        .expect("copy docker/nats/nats-cluster.conf");
        std::fs::copy(
            repo.join("docker/nats/permissions.conf"),
            dir.join("permissions.conf"),
        )
        .expect("copy docker/nats/permissions.conf");
        let prefix = format!("kappa-cl-{}", test.replace('_', "-"));
        // Leftovers of an earlier run that was killed before its drop.
        let mut cluster = DockerCluster {
            network: format!("{prefix}-net"),
            nodes: (1..=3)
                .map(|i| Node {
                    name: format!("nats-{i}"),
                    container: format!("{prefix}-n{i}"),
                    port: procs::free_port(),
                })
                .collect(),
            passwords: crate::secured::new_passwords(),
            redis: format!("{prefix}-redis"),
        };
        cluster.remove();
        must(&["network", "create", &cluster.network]);
        let nats_image = format!("{}:{}", NATS_IMAGE.0, NATS_IMAGE.1);
        let config = format!("{}:/etc/nats:ro", dir.display());
        for n in &cluster.nodes {
            let publish = format!("127.0.0.1:{}:4222", n.port);
            let mut env = vec![format!("KAPPA_NATS_SERVER_NAME={}", n.name)];
            for (user, password) in &cluster.passwords {
                env.push(format!("{}={password}", crate::secured::password_var(user)));
            }
            let mut args = vec![
                "run",
                "-d",
                "--name",
                &n.container,
                "--network",
                &cluster.network,
                "--network-alias",
                &n.name,
            ];
            for e in &env {
                args.extend(["-e", e.as_str()]);
            }
            args.extend([
                "-v",
                &config,
                "-p",
                &publish,
                &nats_image,
                "-c",
                "/etc/nats/nats-cluster.conf",
            ]);
            must(&args);
        }
        let redis_port = procs::free_port();
        let publish = format!("127.0.0.1:{redis_port}:6379");
        let redis_image = format!("{}:{}", REDIS_IMAGE.0, REDIS_IMAGE.1);
        must(&[
            "run",
            "-d",
            "--name",
            &cluster.redis,
            "--network",
            &cluster.network,
            "-p",
            &publish,
            &redis_image,
            "redis-server",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        let nats_url = cluster.nats_url();
        let probe_url = cluster.admin_url();
        let formed = wait_until(Duration::from_secs(60), || async {
            let Ok((_, js)) = clients::nats(&probe_url, "integration-tests").await else {
                return false;
            };
            let probe = jetstream::stream::Config {
                name: "PROBE".into(),
                subjects: vec!["probe.cluster".into()],
                num_replicas: 3,
                ..Default::default()
            };
            js.get_or_create_stream(probe).await.is_ok() && js.delete_stream("PROBE").await.is_ok()
        })
        .await;
        if !formed {
            let logs: Vec<String> = cluster.nodes.iter().map(|n| cluster.logs(n)).collect();
            panic!(
                "{test}: the 3-node cluster did not form:\n{}",
                logs.join("\n---\n")
            );
        }
        let redis_url = format!("redis://127.0.0.1:{redis_port}");
        let redis_up = wait_until(Duration::from_secs(30), || async {
            clients::flushall(&redis_url).await.is_ok()
        })
        .await;
        assert!(redis_up, "{test}: the Redis container did not answer");
        say(format!(
            "[{test}] backend: docker, 3 {nats_image} nodes on network {} at {nats_url}, {redis_image} at {redis_url}",
            cluster.network
        ));
        let servers = Servers::started_elsewhere(nats_url, redis_url, "docker-cluster", guard);
        Some((cluster, servers))
    }

    /// The seeds: every node's client URL, comma separated.
    pub fn nats_url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The seeds with the `admin` user's credentials (for the test's own clients).
    pub fn admin_url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "nats://admin:{}@127.0.0.1:{}",
                    self.passwords["admin"], n.port
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node whose server name is `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The server name of `stream`'s leader now.
    pub async fn leader(js: &jetstream::Context, stream: &str) -> Option<String> {
        let mut s = js.get_stream(stream).await.ok()?;
        s.info().await.ok()?.cluster.clone()?.leader
    }

    /// `docker kill` (SIGKILL) of the node.
    pub fn kill(&self, n: &Node) {
        must(&["kill", &n.container]);
    }

    /// `docker stop` (SIGTERM, then SIGKILL after 10 s) of the node.
    pub fn stop(&self, n: &Node) {
        must(&["stop", "-t", "10", &n.container]);
    }

    /// `docker start` of a killed or stopped node (same store, same port).
    pub fn start_again(&self, n: &Node) {
        must(&["start", &n.container]);
    }

    /// Cuts the node off the cluster's network.
    pub fn disconnect(&self, n: &Node) {
        must(&["network", "disconnect", &self.network, &n.container]);
    }

    /// Connects the node to the network again, under its alias.
    pub fn reconnect(&self, n: &Node) {
        must(&[
            "network",
            "connect",
            "--alias",
            &n.name,
            &self.network,
            &n.container,
        ]);
    }

    /// The node's log (nats-server writes to stderr).
    pub fn logs(&self, n: &Node) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", "40", &n.container])
            .output();
        match out {
            Ok(o) => format!(
                "{}:\n{}{}",
                n.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("{}: docker logs: {e}", n.name),
        }
    }

    /// Waits until every node's JetStream answers `/healthz` from inside the container
    /// (its streams caught up).
    pub async fn wait_healthy(&self, timeout: Duration) -> bool {
        wait_until(timeout, || async {
            self.nodes.iter().all(|n| {
                docker(&[
                    "exec",
                    &n.container,
                    "wget",
                    "-q",
                    "-O",
                    "/dev/null",
                    "http://127.0.0.1:8222/healthz",
                ])
                .is_ok()
            })
        })
        .await
    }

    fn remove(&mut self) {
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.container.as_str()).collect();
        names.push(&self.redis);
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(names);
        let _ = docker(&args);
        let _ = docker(&["network", "rm", &self.network]);
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        self.remove();
    }
}
