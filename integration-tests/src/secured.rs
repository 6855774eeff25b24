//! A nats-server that enforces the project's users and permissions
//! (`docker/nats/permissions.conf`, the file compose uses), started by the test itself on a free
//! port with a password per service generated for the run.

use std::collections::BTreeMap;
use std::time::Duration;

use kappa_testkit::clients;

use crate::{Proc, Servers, procs, say, wait_until};

/// The users of `docker/nats/permissions.conf`: the admin, then one per service.
pub const USERS: [&str; 6] = [
    "admin",
    "thermometer",
    "sensor-registry",
    "temperature-delta",
    "view-builder",
    "query-api",
];

/// A secured server and the passwords of its users.
pub struct Secured {
    /// The servers (NATS is the secured one; Redis is `REDIS_URL`'s, as for [`crate::nats_cluster`]).
    pub servers: Servers,
    /// Password of each user of [`USERS`].
    pub passwords: BTreeMap<&'static str, String>,
}

impl Secured {
    /// The NATS URL with `user`'s credentials in it (for test clients).
    pub fn url_of(&self, user: &str) -> String {
        let port = self.servers.nats_url.rsplit(':').next().unwrap_or_default();
        format!("nats://{user}:{}@127.0.0.1:{port}", self.passwords[user])
    }

    /// The environment of service `user`: `base` plus its `NATS_USER` and `NATS_PASSWORD`.
    pub fn env_of(
        &self,
        user: &str,
        base: &[(&'static str, String)],
    ) -> Vec<(&'static str, String)> {
        let mut env: Vec<(&'static str, String)> = base
            .iter()
            .filter(|(k, _)| *k != "NATS_USER" && *k != "NATS_PASSWORD")
            .cloned()
            .collect();
        env.push(("NATS_USER", user.to_string()));
        env.push(("NATS_PASSWORD", self.passwords[user].clone()));
        env
    }
}

/// Fresh passwords for every user of [`USERS`], one run's.
pub fn new_passwords() -> BTreeMap<&'static str, String> {
    USERS
        .iter()
        .map(|u| (*u, format!("{u}-{:x}", rand_suffix())))
        .collect()
}

/// The environment variable nats-server reads `user`'s password from.
pub fn password_var(user: &str) -> String {
    format!(
        "KAPPA_NATS_{}_PASSWORD",
        user.to_ascii_uppercase().replace('-', "_")
    )
}

/// Starts nats-server with JetStream and `docker/nats/permissions.conf`; `None` (said on
/// stderr) when `nats-server` is not on PATH.
pub async fn secured_nats(test: &str) -> Option<Secured> {
    if std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        say(format!(
            "[{test}] nats-server is not on PATH: no secured server"
        ));
        return None;
    }
    let _ = std::fs::remove_dir_all(procs::log_dir(test));
    let guard = crate::ENV_LOCK.lock().await;
    let dir = procs::log_dir(test);
    std::fs::create_dir_all(&dir).expect("log dir");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(
        repo.join("docker/nats/permissions.conf"),
        dir.join("permissions.conf"),
    )
    .expect("copy docker/nats/permissions.conf");
    let port = procs::free_port();
    std::fs::write(
        dir.join("nats.conf"),
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\ninclude permissions.conf\n",
            dir.join("js").display()
        ),
    )
    .expect("write nats.conf");
    let passwords = new_passwords();
    let mut cmd = std::process::Command::new("nats-server");
    cmd.arg("-c").arg(dir.join("nats.conf"));
    for (u, p) in &passwords {
        cmd.env(password_var(u), p);
    }
    let proc = Proc::spawn("nats-secured", cmd, dir.join("nats.log")).expect("start nats-server");
    let admin = format!("nats://admin:{}@127.0.0.1:{port}", passwords["admin"]);
    let up = wait_until(Duration::from_secs(20), || async {
        clients::nats(&admin, "integration-tests").await.is_ok()
    })
    .await;
    assert!(
        up,
        "{test}: the secured nats-server did not start (log in {})",
        dir.display()
    );
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    clients::flushall(&redis_url)
        .await
        .unwrap_or_else(|e| panic!("REDIS_URL: {e:#}"));
    say(format!(
        "[{test}] backend: nats-server with docker/nats/permissions.conf at 127.0.0.1:{port}"
    ));
    Some(Secured {
        servers: Servers {
            nats_url: format!("nats://127.0.0.1:{port}"),
            redis_url,
            backend: "secured",
            _nats: None,
            _redis: None,
            _procs: vec![proc],
            _guard: Some(guard),
        },
        passwords,
    })
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
