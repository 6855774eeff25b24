//! The fault matrix's rows: what a fault test injected, under which working-state option, and
//! what the oracle found afterwards. Every fault test (tests/matrix.rs, and any other that
//! injects a fault) ends with one [`record`] per row:
//!
//! ```no_run
//! # async fn demo(js: &async_nats::jetstream::Context) {
//! use integration_tests::matrix::{self, Row};
//! let judged = integration_tests::judge(js).await;
//! let row = Row::new("nats_kill_remote", "nats-server kill -9 + restart x3", "remote")
//!     .judged(&judged)
//!     .recovered(Some(2.5));
//! matrix::record(&row);
//! assert!(judged.exact(), "{:?}", judged.problems);
//! # }
//! ```
//!
//! [`record`] appends the row as one JSON line to `<dir>/<test>.jsonl` (the file is started
//! afresh by the first row a test process writes for that test) and prints it on stderr as
//! `MATRIX|fault|option|inputs|lost|doubled|wrong|recover_secs`, past the harness's capture.
//! `<dir>` is `$KAPPA_FAULTS_OUT` if set, else `faults/` in the cargo target folder
//! (`$CARGO_TARGET_DIR` or `target/`). The `faults-table` binary reads every row there and
//! writes `docs/faults.md`.
//!
//! Columns: *inputs* = what was judged (readings stored in `READINGS`, plus upserts for a
//! registry race); *lost* = inputs without an outcome (or an acknowledged upsert that is not
//! stored); *doubled* = outcomes beyond the first of an input; *wrong* = outcomes that differ
//! from the oracle (or a view that differs from a rebuild, or a registry answer that differs
//! from the stored change); *recover_secs* = seconds from the heal (the restarted server
//! spawned) until the pipeline caught up (every reading stored by then has its outcome), the
//! longest over the row's faults.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One row of the fault matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The test that produced it (names its `.jsonl` file).
    pub test: String,
    /// The fault injected, in words (`nats-server kill -9 + restart x3`).
    pub fault: String,
    /// The working-state option (`remote`, `local`, `affinity`), or `-`.
    pub option: String,
    /// Inputs judged.
    pub inputs: u64,
    /// Inputs without an outcome.
    pub lost: u64,
    /// Outcomes beyond the first of an input.
    pub doubled: u64,
    /// Outcomes that differ from the oracle.
    pub wrong: u64,
    /// Seconds from the heal until the pipeline caught up (longest over the row's faults);
    /// `None` where it does not apply.
    pub recover_secs: Option<f64>,
    /// `short` (the CI version) or `long` (`KAPPA_FAULTS_LONG=1`).
    pub version: String,
    /// When it ran (RFC 3339, UTC).
    pub when: String,
    /// Where it ran (host name, CPUs).
    pub host: String,
    /// Anything else worth a line (sizes, what recovered how).
    pub detail: String,
}

/// True when the long, on-demand version of the matrix is asked for (`KAPPA_FAULTS_LONG=1`).
pub fn long() -> bool {
    std::env::var("KAPPA_FAULTS_LONG").is_ok_and(|v| v == "1")
}

fn host() -> String {
    let name = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{name} ({cpus} CPUs)")
}

impl Row {
    /// A row of `test` for `fault` under `option`, with no counts yet; version, time and host
    /// filled in.
    pub fn new(test: &str, fault: &str, option: &str) -> Row {
        Row {
            test: test.to_string(),
            fault: fault.to_string(),
            option: option.to_string(),
            inputs: 0,
            lost: 0,
            doubled: 0,
            wrong: 0,
            recover_secs: None,
            version: if long() { "long" } else { "short" }.to_string(),
            when: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            host: host(),
            detail: String::new(),
        }
    }

    /// Adds the counts of a [`judge`](crate::judge) run (readings stored are the inputs).
    pub fn judged(mut self, j: &crate::Judged) -> Row {
        self.inputs += j.verified.readings as u64;
        self.lost += j.lost as u64;
        self.doubled += j.doubled as u64;
        self.wrong += j.wrong as u64;
        self
    }

    /// Sets the time to recover.
    pub fn recovered(mut self, secs: Option<f64>) -> Row {
        self.recover_secs = secs;
        self
    }

    /// Sets the free-text detail.
    pub fn detail(mut self, d: impl Into<String>) -> Row {
        self.detail = d.into();
        self
    }

    /// No input lost, doubled or wrong.
    pub fn exact(&self) -> bool {
        self.lost + self.doubled + self.wrong == 0
    }

    /// The row as the `MATRIX|fault|option|inputs|lost|doubled|wrong|recover_secs` line.
    pub fn line(&self) -> String {
        format!(
            "MATRIX|{}|{}|{}|{}|{}|{}|{}",
            self.fault,
            self.option,
            self.inputs,
            self.lost,
            self.doubled,
            self.wrong,
            self.recover_secs
                .map_or("-".to_string(), |s| format!("{s:.2}"))
        )
    }
}

/// Where rows go: `$KAPPA_FAULTS_OUT`, else `faults/` in the cargo target folder (found from
/// the running executable: `target/<profile>/`, or `target/<profile>/deps/` for a test).
pub fn out_dir() -> PathBuf {
    if let Ok(d) = std::env::var("KAPPA_FAULTS_OUT")
        && !d.is_empty()
    {
        return PathBuf::from(d);
    }
    let profile = kappa_testkit::procs::bin_dir().unwrap_or_else(|_| PathBuf::from("target/x"));
    profile
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("faults")
}

static STARTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Records a row: one JSON line in `<out_dir>/<test>.jsonl` (the file starts afresh with the
/// first row this process records for the test) and the `MATRIX|...` line on stderr. A row
/// that cannot be written is said on stderr, not a panic: the test's assertions decide.
pub fn record(row: &Row) {
    let _ = writeln!(std::io::stderr().lock(), "{}", row.line());
    let dir = out_dir();
    let file = dir.join(format!("{}.jsonl", row.test));
    let fresh = {
        let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
        started
            .get_or_insert_with(HashSet::new)
            .insert(row.test.clone())
    };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(!fresh)
            .truncate(fresh)
            .open(&file)?;
        let json = serde_json::to_string(row).map_err(std::io::Error::other)?;
        writeln!(f, "{json}")
    };
    if let Err(e) = write() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "matrix: could not write {}: {e}",
            file.display()
        );
    }
}

/// Every row in the `.jsonl` files of `dir`, in file-name order, and the lines that are not
/// rows (file: line).
pub fn read_rows(dir: &Path) -> std::io::Result<(Vec<Row>, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Row>(line) {
                Ok(r) => rows.push(r),
                Err(e) => bad.push(format!("{}:{}: {e}", f.display(), i + 1)),
            }
        }
    }
    Ok((rows, bad))
}
