//! Redis with the project's ACL users (`docker/redis/users.sh`, the file compose uses): the DAG
//! runs with one Redis user per service and gives the oracle's deltas and complete views;
//! each user is refused what is not its own (another service's keys, writes for the reader,
//! anything for a client without a password); a wrong password stops a service with one clear
//! line that does not show the password. Over TLS (`rediss://`, mutual TLS, a CA made with
//! `openssl`) the same users keep the DAG's state and views, and a CA file that is not there or
//! a CA that did not sign the server stop a service with one clear line.

use std::time::Duration;

use integration_tests::procs::{self, Proc, run_expecting_failure};
use integration_tests::*;

/// A redis-server on a free port whose users are `docker/redis/users.sh`'s, with a password
/// per user generated for the run; TLS only when started with certificates.
struct AclRedis {
    _proc: Proc,
    port: u16,
    passwords: Vec<(&'static str, String)>,
    tls: bool,
}

impl AclRedis {
    fn url_of(&self, user: &str) -> String {
        let pw = &self
            .passwords
            .iter()
            .find(|(u, _)| *u == user)
            .expect("a user of users.sh")
            .1;
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{user}:{pw}@127.0.0.1:{}", self.port)
    }
}

/// In `dir`: a CA (`ca.pem`), a server certificate for 127.0.0.1 and a client certificate it
/// signed, and another CA that signed nothing (`other-ca.pem`).
fn certificates(dir: &std::path::Path) {
    kappa_testkit::tls::certificates(dir).expect("certificates");
}

async fn acl_redis(test: &str) -> AclRedis {
    acl_redis_on(test, None).await
}

/// [`acl_redis`]; with `tls`, a folder of [`certificates`], TLS only (`--port 0`) and clients
/// must show a certificate the CA signed.
async fn acl_redis_on(test: &str, tls: Option<&std::path::Path>) -> AclRedis {
    let dir = procs::log_dir(test);
    std::fs::create_dir_all(&dir).expect("log dir");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let passwords: Vec<(&'static str, String)> =
        ["admin", "temperature-delta", "view-builder", "query-api"]
            .into_iter()
            .map(|u| (u, format!("{u}-{nonce:x}")))
            .collect();
    let mut script = std::process::Command::new("sh");
    script.arg(root.join("docker/redis/users.sh"));
    for (u, pw) in &passwords {
        script.env(
            format!(
                "KAPPA_REDIS_{}_PASSWORD",
                u.to_ascii_uppercase().replace('-', "_")
            ),
            pw,
        );
    }
    let out = script.output().expect("run users.sh");
    assert!(
        out.status.success(),
        "users.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acl = dir.join("users.acl");
    std::fs::write(&acl, &out.stdout).expect("write the ACL file");
    let port = procs::free_port();
    let mut cmd = std::process::Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--dir", &dir.display().to_string()])
        .args(["--aclfile", &acl.display().to_string()]);
    match tls {
        None => {
            cmd.args(["--port", &port.to_string()]);
        }
        Some(certs) => {
            let file = |f: &str| certs.join(f).display().to_string();
            cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cert-file", &file("server.pem")])
                .args(["--tls-key-file", &file("server.key")])
                .args(["--tls-ca-cert-file", &file("ca.pem")])
                .args(["--tls-auth-clients", "yes"]);
        }
    }
    let proc = Proc::spawn("redis-acl", cmd, dir.join("redis-acl.log")).expect("redis-server");
    let up = wait_until(Duration::from_secs(10), || async {
        if tls.is_some() {
            return std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        }
        kappa_testkit::clients::redis(&format!("redis://127.0.0.1:{port}"))
            .await
            .is_ok()
    })
    .await;
    assert!(up, "redis-server with the ACL file did not start");
    AclRedis {
        _proc: proc,
        port,
        passwords,
        tls: tls.is_some(),
    }
}

/// `env` with `REDIS_URL` set to `url`.
fn with_redis(env: &[(&'static str, String)], url: String) -> Vec<(&'static str, String)> {
    let mut env: Vec<_> = env
        .iter()
        .filter(|(k, _)| *k != "REDIS_URL")
        .cloned()
        .collect();
    env.push(("REDIS_URL", url));
    env
}

/// What Redis answers `cmd` with as `url`'s user: `Ok` or the error code.
async fn as_user(url: &str, cmd: &mut redis::Cmd) -> Result<(), String> {
    let mut c = kappa_testkit::clients::redis(url)
        .await
        .map_err(|e| e.to_string())?;
    cmd.query_async::<redis::Value>(&mut c)
        .await
        .map(|_| ())
        .map_err(|e| e.code().unwrap_or("other").to_string())
}

#[tokio::test]
async fn every_service_has_its_own_redis_user_and_only_its_own_keys() {
    let test = "redis_acl";
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("[{test}] redis-server is not on PATH: skipped");
        return;
    }
    let redis = acl_redis(test).await;
    let mut s = servers(test).await;
    s.redis_url = redis.url_of("temperature-delta");
    let dag = Dag::on(s, test, &[("KAPPA_PARTITIONS", "2")]).await;
    let js = &dag.js;
    let _delta = dag.ready("temperature-delta").await;
    let mut views = procs::start(
        test,
        "view-builder",
        &with_redis(&dag.env, redis.url_of("view-builder")),
        &[],
    );
    ready(&mut views).await;
    let mut api = procs::start(
        test,
        "query-api",
        &with_redis(&dag.env, redis.url_of("query-api")),
        &[],
    );
    ready(&mut api).await;
    let mut thermo = dag.spawn(
        "thermometer",
        &["--sensors", "20", "--count", "400", "--rate", "400"],
    );
    let st = thermo
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("thermometer finished");
    assert!(st.success(), "{}", thermo.log_tail(20));
    assert!(wait_drained(js, Duration::from_secs(60)).await);
    let judged = judge(js).await;
    assert!(judged.exact(), "{:?}", judged.problems);
    assert!(
        views::wait_applied(&dag, &api, Duration::from_secs(30)).await,
        "the views did not complete:\n{}",
        views.log_tail(30)
    );

    // Each user is refused what is not its own.
    let td_key = "kappa:{temperature-delta:0}:meta";
    let refused = [
        (
            "view-builder writes temperature-delta's state",
            as_user(
                &redis.url_of("view-builder"),
                redis::cmd("HSET").arg(td_key).arg("position").arg(0),
            )
            .await,
        ),
        (
            "temperature-delta writes a view",
            as_user(
                &redis.url_of("temperature-delta"),
                redis::cmd("SET").arg("views:active").arg("9"),
            )
            .await,
        ),
        (
            "query-api writes a view in a script",
            as_user(
                &redis.url_of("query-api"),
                redis::cmd("EVAL")
                    .arg("return redis.call('SET', 'views:active', '9')")
                    .arg(0),
            )
            .await,
        ),
        (
            "a client without a password reads",
            as_user(
                &format!("redis://127.0.0.1:{}", redis.port),
                redis::cmd("GET").arg("views:active"),
            )
            .await,
        ),
        (
            "temperature-delta flushes the store",
            as_user(
                &redis.url_of("temperature-delta"),
                &mut redis::cmd("FLUSHALL"),
            )
            .await,
        ),
    ];
    for (what, r) in &refused {
        match r {
            Ok(()) => panic!("{what}: allowed"),
            Err(code) => eprintln!("[{test}] {what}: refused ({code})"),
        }
    }
    // What each may do, it may.
    assert_eq!(
        as_user(
            &redis.url_of("query-api"),
            redis::cmd("GET").arg("views:active")
        )
        .await,
        Ok(())
    );

    // A wrong password: one clear line, without the password.
    let wrong = format!(
        "redis://temperature-delta:not-the-password@127.0.0.1:{}",
        redis.port
    );
    let env = with_redis(&dag.env, wrong);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, lines) = run_expecting_failure("temperature-delta", &pairs);
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "one line, got {lines:?}");
    assert!(
        lines[0].contains("password") && lines[0].contains("REDIS_URL"),
        "{}",
        lines[0]
    );
    assert!(
        !lines[0].contains("not-the-password"),
        "the password shows: {}",
        lines[0]
    );
    eprintln!("[{test}] wrong password: {}", lines[0]);
}

/// `env` with `REDIS_URL` = `url` and the TLS settings `tls` (`REDIS_CA`, `REDIS_CERT`,
/// `REDIS_KEY`).
fn with_tls_redis(
    env: &[(&'static str, String)],
    url: String,
    tls: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut env = with_redis(env, url);
    env.retain(|(k, _)| !tls.iter().any(|(t, _)| t == k));
    env.extend(tls.iter().cloned());
    env
}

#[tokio::test]
async fn over_tls_the_same_users_keep_the_state_and_the_views() {
    let test = "redis_tls";
    for tool in ["redis-server", "openssl"] {
        if std::process::Command::new(tool)
            .arg("version")
            .output()
            .is_err()
        {
            eprintln!("[{test}] {tool} is not on PATH: skipped");
            return;
        }
    }
    // Not in the log folder, which `servers` empties.
    let certs = std::env::temp_dir().join(format!("kappa-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&certs);
    std::fs::create_dir_all(&certs).expect("certs dir");
    certificates(&certs);
    let redis = acl_redis_on(test, Some(&certs)).await;
    let file = |f: &str| certs.join(f).display().to_string();
    let tls = vec![
        ("REDIS_CA", file("ca.pem")),
        ("REDIS_CERT", file("client.pem")),
        ("REDIS_KEY", file("client.key")),
    ];
    let mut s = servers(test).await;
    s.redis_url = redis.url_of("temperature-delta");
    let dag = Dag::on(s, test, &[("KAPPA_PARTITIONS", "2")]).await;
    let js = &dag.js;
    let start = |name: &str, user: &str| {
        procs::start(
            test,
            name,
            &with_tls_redis(&dag.env, redis.url_of(user), &tls),
            &[],
        )
    };
    let mut delta = start("temperature-delta", "temperature-delta");
    ready(&mut delta).await;
    let mut views = start("view-builder", "view-builder");
    ready(&mut views).await;
    let mut api = start("query-api", "query-api");
    ready(&mut api).await;
    let mut thermo = dag.spawn(
        "thermometer",
        &["--sensors", "10", "--count", "200", "--rate", "400"],
    );
    let st = thermo
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("thermometer finished");
    assert!(st.success(), "{}", thermo.log_tail(20));
    assert!(
        wait_drained(js, Duration::from_secs(60)).await,
        "did not drain with its state over TLS:\n{}",
        delta.log_tail(30)
    );
    let judged = judge(js).await;
    assert!(judged.exact(), "{:?}", judged.problems);
    assert!(
        views::wait_applied(&dag, &api, Duration::from_secs(30)).await,
        "the views did not complete over TLS:\n{}",
        views.log_tail(30)
    );
    eprintln!("[{test}] 200 readings: state, views and reads over mutual TLS, as the ACL users");

    // Each way of getting it wrong: non-zero, one line that names the setting.
    let other = vec![
        ("REDIS_CA", file("other-ca.pem")),
        ("REDIS_CERT", file("client.pem")),
        ("REDIS_KEY", file("client.key")),
    ];
    let missing = vec![("REDIS_CA", file("nope.pem"))];
    let plain = format!("redis://127.0.0.1:{}", redis.port);
    for (what, url, settings, says) in [
        (
            "another CA",
            redis.url_of("temperature-delta"),
            &other,
            "UnknownIssuer",
        ),
        (
            "a CA file that is not there",
            redis.url_of("temperature-delta"),
            &missing,
            "No such file",
        ),
        ("TLS settings with a redis:// URL", plain, &tls, "rediss://"),
    ] {
        let env = with_tls_redis(&dag.env, url, settings);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, lines) = run_expecting_failure("temperature-delta", &pairs);
        assert_ne!(code, 0, "{what}");
        assert_eq!(lines.len(), 1, "{what}: one line, got {lines:?}");
        assert!(
            lines[0].contains("REDIS_") && lines[0].contains(says),
            "{what}: {}",
            lines[0]
        );
        assert!(
            !lines[0].contains("temperature-delta-"),
            "{what}: the password shows: {}",
            lines[0]
        );
        eprintln!("[{test}] {what}: {}", lines[0]);
    }
    let _ = std::fs::remove_dir_all(&certs);
}
