//! TLS to NATS, on a real nats-server that requires it and verifies clients (mutual TLS),
//! with a CA, a server and a client certificate the test makes with `openssl`: the runtime
//! connects and uses JetStream with `NATS_CA` + `NATS_CERT`/`NATS_KEY`, and each way of getting
//! it wrong is one clear error. Skipped, with a line on stderr, without `nats-server` or
//! `openssl` on PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kappa_runtime::config::{DEFAULT_DUPLICATE_WINDOW_SECS, NatsArgs};

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
        || Command::new(cmd)
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok()
}

fn certificates(dir: &Path) {
    kappa_testkit::tls::certificates(dir).expect("certificates");
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn args(url: String, ca: Option<PathBuf>, client: Option<(PathBuf, PathBuf)>) -> NatsArgs {
    NatsArgs {
        nats_url: url,
        nats_creds: None,
        nats_user: None,
        nats_password: None,
        nats_token: None,
        nats_ca: ca,
        nats_cert: client.as_ref().map(|c| c.0.clone()),
        nats_key: client.map(|c| c.1),
        nats_inbox_prefix: None,
        nats_connect_timeout_secs: 3,
        duplicate_window_secs: DEFAULT_DUPLICATE_WINDOW_SECS,
        replicas: 1,
    }
}

#[tokio::test]
async fn nats_over_mutual_tls_connects_with_its_certificates_and_says_what_is_wrong_without() {
    if !have("nats-server") || !have("openssl") {
        eprintln!("note: nats-server or openssl not on PATH; skipping the TLS test");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kappa-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    certificates(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let log = std::fs::File::create(dir.join("nats.log")).expect("log");
    let _server = Server(
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-sd", &dir.join("js").display().to_string()])
            .args([
                "--tlsverify",
                "--tlscert",
                "server.pem",
                "--tlskey",
                "server.key",
            ])
            .args(["--tlscacert", "ca.pem"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server"),
    );
    let url = format!("tls://127.0.0.1:{port}");
    let ca = dir.join("ca.pem");
    let client = (dir.join("client.pem"), dir.join("client.key"));

    // With the CA and the client certificate: connected, and JetStream answers.
    let mut nats = None;
    for _ in 0..50 {
        match kappa_runtime::nats::connect(
            &args(url.clone(), Some(ca.clone()), Some(client.clone())),
            "tls-test",
        )
        .await
        {
            Ok(n) => {
                nats = Some(n);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let nats = nats.expect("connected over mutual TLS");
    let info = nats.js.query_account().await.expect("JetStream over TLS");
    assert_eq!(info.streams, 0);

    // Without a client certificate the server refuses; without the CA the server is unknown.
    for (what, a) in [
        (
            "no client certificate",
            args(url.clone(), Some(ca.clone()), None),
        ),
        ("no CA", args(url.clone(), None, Some(client.clone()))),
    ] {
        let e = kappa_runtime::nats::connect(&a, "tls-test")
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: connected"));
        let text = e.to_string();
        assert!(
            text.contains("127.0.0.1") && text.contains("TLS failed") && text.contains("NATS_CA"),
            "{what}: {text}"
        );
        eprintln!("{what}: {text}");
    }
    // A certificate without its key, and a CA file that is not there: configuration errors.
    let mut half = args(url.clone(), Some(ca.clone()), Some(client.clone()));
    half.nats_key = None;
    let e = kappa_runtime::nats::connect(&half, "tls-test").await.err();
    assert!(
        matches!(e, Some(kappa_runtime::RuntimeError::Config(ref m)) if m.contains("NATS_KEY")),
        "{e:?}"
    );
    let missing = args(url, Some(dir.join("nope.pem")), None);
    let e = kappa_runtime::nats::connect(&missing, "tls-test")
        .await
        .err();
    assert!(
        matches!(e, Some(kappa_runtime::RuntimeError::Config(ref m)) if m.contains("NATS_CA")),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn redis_tls(
    ca: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
) -> kappa_runtime::config::RedisTlsArgs {
    kappa_runtime::config::RedisTlsArgs {
        redis_ca: ca,
        redis_cert: client.as_ref().map(|c| c.0.clone()),
        redis_key: client.map(|c| c.1),
    }
}

#[tokio::test]
async fn redis_over_mutual_tls_reads_and_writes_and_says_what_is_wrong_without() {
    if !have("redis-server") || !have("openssl") {
        eprintln!("note: redis-server or openssl not on PATH; skipping the Redis TLS test");
        return;
    }
    use kappa_runtime::working::remote::connect_with;
    let dir = std::env::temp_dir().join(format!("kappa-redis-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    certificates(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let log = std::fs::File::create(dir.join("redis.log")).expect("log");
    // TLS only (`--port 0`), and clients must show a certificate the CA signed.
    let _server = Server(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--tls-port", &port.to_string()])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "yes"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&dir)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server"),
    );
    let url = format!("rediss://127.0.0.1:{port}");
    let ca = dir.join("ca.pem");
    let client = (dir.join("client.pem"), dir.join("client.key"));

    // With the CA and the client certificate: a real write and read back.
    let good = redis_tls(Some(ca.clone()), Some(client.clone()));
    let mut conn = None;
    for _ in 0..50 {
        match connect_with(&url, "REDIS_URL", &good).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut conn = conn.expect("connected over mutual TLS");
    let _: () = redis::cmd("SET")
        .arg("kappa:tls-test")
        .arg("over TLS")
        .query_async(&mut conn)
        .await
        .expect("SET over TLS");
    let back: String = redis::cmd("GET")
        .arg("kappa:tls-test")
        .query_async(&mut conn)
        .await
        .expect("GET over TLS");
    assert_eq!(back, "over TLS");

    // A CA that did not sign the server's certificate, and no client certificate: one clear
    // error each, naming the settings to check.
    for (what, tls) in [
        (
            "another CA",
            redis_tls(Some(dir.join("other-ca.pem")), Some(client.clone())),
        ),
        ("no client certificate", redis_tls(Some(ca.clone()), None)),
    ] {
        let e = connect_with(&url, "REDIS_URL", &tls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: connected"));
        let text = e.to_string();
        eprintln!("{what}: {text}");
        assert!(!text.contains('\n'), "{what}: one line: {text}");
        assert!(
            text.contains("127.0.0.1") && text.contains("REDIS_CA"),
            "{what}: {text}"
        );
    }
    let e = connect_with(
        &url,
        "REDIS_URL",
        &redis_tls(Some(dir.join("other-ca.pem")), Some(client.clone())),
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.contains("TLS failed") && e.contains("UnknownIssuer"),
        "another CA: {e}"
    );

    // Configuration errors: a CA file that is not there, a certificate without its key, and
    // TLS settings with a plain redis:// URL.
    for (what, url, tls, names) in [
        (
            "missing CA file",
            url.clone(),
            redis_tls(Some(dir.join("nope.pem")), None),
            "REDIS_CA",
        ),
        (
            "certificate without key",
            url.clone(),
            kappa_runtime::config::RedisTlsArgs {
                redis_key: None,
                ..good.clone()
            },
            "REDIS_KEY",
        ),
        (
            "redis:// with REDIS_CA",
            format!("redis://127.0.0.1:{port}"),
            redis_tls(Some(ca.clone()), None),
            "rediss://",
        ),
    ] {
        let e = connect_with(&url, "REDIS_URL", &tls).await.err();
        assert!(
            matches!(e, Some(kappa_runtime::RuntimeError::Config(ref m)) if m.contains(names) && !m.contains('\n')),
            "{what}: {e:?}"
        );
        eprintln!("{what}: {}", e.map(|e| e.to_string()).unwrap_or_default());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
