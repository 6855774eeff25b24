//! The service binaries as real child processes: started with their flags and environment,
//! logs kept under `target/test-logs/`, stopped with SIGTERM or killed with SIGKILL.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the workspace's binaries are (`target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .expect("target dir")
}

/// Path of a service binary, with a clear message when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before `cargo test` (README)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running service.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its name.
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
    /// Its HTTP address.
    pub http: String,
}

impl Proc {
    /// Starts `name` with `env` (plus `HTTP_ADDR` on a free port), logging to a file.
    pub fn start(test: &str, name: &str, env: &[(&str, String)], args: &[&str]) -> Proc {
        let dir = bin_dir().join("test-logs").join(test);
        std::fs::create_dir_all(&dir).expect("log dir");
        let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("{n:02}-{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin(name));
        cmd.args(args)
            .env("HTTP_ADDR", &http)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
            log,
            http,
        }
    }

    /// Waits until `/healthz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let url = format!("http://{}/healthz", self.http);
        let ok = crate::wait_until(timeout, || async {
            reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        if !ok {
            let exited = self.child.try_wait().ok().flatten();
            panic!(
                "{} not ready after {timeout:?} (exit: {exited:?}); log:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit (up to `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }

    /// Waits for the process to exit by itself (up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
