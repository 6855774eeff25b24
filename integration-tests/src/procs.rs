//! The service binaries of the DAG as child processes of a test ([`kappa_testkit::procs`]),
//! found in the workspace's `target/<profile>/` and logging under `target/test-logs/<test>/`.

use std::path::PathBuf;
use std::process::Command;

pub use kappa_testkit::procs::Proc;

/// Where the workspace's binaries are (`target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    kappa_testkit::procs::bin_dir().expect("target dir")
}

/// Path of a service binary, with a clear message when it was not built.
pub fn bin(name: &str) -> PathBuf {
    kappa_testkit::procs::bin(
        &bin_dir(),
        name,
        "run `cargo build --workspace` before `cargo test` (README)",
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The folder a test's logs go to.
pub fn log_dir(test: &str) -> PathBuf {
    bin_dir().join("test-logs").join(test)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    kappa_testkit::ports::free_port().expect("free port")
}

/// Starts service `name` with `env` and `args` (plus `HTTP_ADDR` on a free port and
/// `RUST_LOG=info`), logging to `target/test-logs/<test>/<n>-<name>.log`.
pub fn start(test: &str, name: &str, env: &[(&str, String)], args: &[&str]) -> Proc {
    let dir = log_dir(test);
    std::fs::create_dir_all(&dir).expect("log dir");
    let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    let log = dir.join(format!("{n:02}-{name}.log"));
    let mut cmd = Command::new(bin(name));
    cmd.args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)));
    Proc::service(name, cmd, log).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs service `name` to its exit with `env` (plus `HTTP_ADDR` on a free port), for a binary
/// that must refuse to start: its exit code (-1 if killed) and its non-empty stderr lines.
pub fn run_expecting_failure(name: &str, env: &[(&str, &str)]) -> (i32, Vec<String>) {
    let mut cmd = Command::new(bin(name));
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd.env("HTTP_ADDR", format!("127.0.0.1:{}", free_port()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}
