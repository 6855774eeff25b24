//! The service binaries (and the servers a benchmark starts) as real child processes: where the
//! workspace's binaries are, a child with its output in a log file, readiness by `/healthz`,
//! signals (SIGTERM with a timeout, kill -9 like a crash, any other such as SIGSTOP), waiting
//! for exit. A [`Proc`] is killed when dropped, so a failing test or run leaves no orphan.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the workspace's binaries are (`target/<profile>/`), from the running executable: its
/// own folder, or the one above for a test binary in `target/<profile>/deps/`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current exe")?;
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no folder", exe.display()))?;
    let dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .with_context(|| format!("{} has no folder", dir.display()))?
    } else {
        dir
    };
    Ok(dir.to_path_buf())
}

/// Path of binary `name` in `dir`, or an error saying it is missing followed by `hint` (how
/// to build it).
pub fn bin(dir: &Path, name: &str, hint: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} is missing: {hint}", p.display());
    }
    Ok(p)
}

/// A running child process, killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its name in messages (and to find it among others).
    pub name: String,
    /// The file its stdout and stderr go to.
    pub log: PathBuf,
    /// `host:port` of its HTTP listener (services started with [`Proc::service`]; empty
    /// otherwise).
    pub http: String,
    started: Instant,
}

impl Proc {
    /// Spawns `cmd` (its program, arguments and environment set by the caller) with stdin
    /// closed and stdout and stderr to a new file `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let err = file.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            child,
            name: name.to_string(),
            log,
            http: String::new(),
            started,
        })
    }

    /// [`Proc::spawn`] for a service: `HTTP_ADDR` is set to a free port on 127.0.0.1 (replacing
    /// any the caller set), kept in [`Proc::http`].
    pub fn service(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let http = format!("127.0.0.1:{}", crate::ports::free_port()?);
        cmd.env("HTTP_ADDR", &http);
        let mut p = Proc::spawn(name, cmd, log)?;
        p.http = http;
        Ok(p)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log so far.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Polls `/healthz` every 10 ms until it answers 2xx, and returns the time since the
    /// process was spawned; an error with the log's tail if the process exits first or
    /// `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let http = reqwest::Client::new();
        let end = Instant::now() + timeout;
        loop {
            if let Some((code, _)) = crate::http::get(&http, &self.http, "/healthz").await
                && (200..300).contains(&code)
            {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before it was ready; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if Instant::now() >= end {
                bail!(
                    "{} not ready after {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a signal by the `kill` command (`sig` as `kill` takes it: `-TERM`, `-STOP`, ...).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status();
    }

    /// SIGKILL, like a crash, and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and waits for exit up to `timeout`; then SIGKILL. The exit status if it exited
    /// by itself in time, `None` if it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("-TERM");
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Waits for the process to exit by itself, up to `timeout`: its exit status, or an error
    /// if it still runs (it is left running).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= end {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
