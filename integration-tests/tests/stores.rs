//! A working store or a view store that loses what it acknowledged while the services run,
//! with real servers: a Redis of the test's own (a `redis-server` process on a free port) is
//! killed with SIGKILL and restarted on the same port, from its AOF (`appendfsync everysec`:
//! the last second may be lost) or empty (no persistence, like the affinity sidecar), or wiped
//! with `FLUSHALL`. Judged by the oracle: every delta and dead letter equals it, none is
//! doubled or missing, and the views equal a rebuild from sequence 1.
//!
//! Each test prints one line `MATRIX|fault|option|inputs|lost|doubled|wrong|recover_secs`
//! (lost, doubled and wrong are counted by [`tally`]; the asserts then require them to be 0).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::procs::{free_port, log_dir};
use integration_tests::{
    Dag, Proc, count, healthz, metric, registry_sensors, running_partitions, servers,
    verify_exactly_once, wait_drained, wait_ready, wait_until,
};

/// A redis-server of the test's own, restartable on the same port and directory.
struct OwnRedis {
    name: String,
    port: u16,
    dir: PathBuf,
    aof: bool,
    proc: Option<Proc>,
    starts: u32,
}

impl OwnRedis {
    /// Starts it (with an AOF, `appendfsync everysec`, if `aof`; else without persistence).
    async fn start(test: &str, name: &str, aof: bool) -> OwnRedis {
        let dir = log_dir(test).join(name);
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r = OwnRedis {
            name: name.to_string(),
            port: free_port(),
            dir,
            aof,
            proc: None,
            starts: 0,
        };
        r.spawn().await;
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", &self.dir.display().to_string()])
            .args(["--save", ""]);
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.starts += 1;
        let log = self.dir.join(format!("redis-{}.log", self.starts));
        self.proc = Some(Proc::spawn(&self.name, cmd, log).expect("start redis-server"));
        let url = self.url();
        let up = wait_until(Duration::from_secs(30), || async {
            let Ok(mut c) = kappa_testkit::clients::redis(&url).await else {
                return false;
            };
            // Answers PING only once the AOF is loaded.
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
        })
        .await;
        assert!(up, "{} did not start on {url}", self.name);
    }

    /// SIGKILL, then the same server again on the same port and directory. With `cut`, the
    /// AOF loses that fraction of its last file's tail first (cut at an arbitrary byte), as a
    /// power loss under `appendfsync everysec` loses the writes of the last second: a kill -9
    /// alone loses nothing of an AOF, whose writes are in the kernel's page cache already.
    /// Redis loads a truncated AOF (`aof-load-truncated yes`, the default) up to the last
    /// complete command, and drops an unfinished MULTI block, so the store comes back rolled
    /// back to an earlier, consistent point.
    async fn kill9_and_restart(&mut self, down: Duration, cut: f64) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        if cut > 0.0 {
            let dir = self.dir.join("appendonlydir");
            let mut incr: Vec<PathBuf> = std::fs::read_dir(&dir)
                .expect("appendonlydir")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(".incr.aof"))
                .collect();
            incr.sort();
            let last = incr.last().expect("an incremental AOF file");
            let len = std::fs::metadata(last).expect("aof").len();
            let keep = len - (len as f64 * cut) as u64;
            std::fs::OpenOptions::new()
                .write(true)
                .open(last)
                .and_then(|f| f.set_len(keep))
                .expect("truncate aof");
            eprintln!(
                "[{}] AOF {} cut from {len} to {keep} bytes",
                self.name,
                last.display()
            );
        }
        tokio::time::sleep(down).await;
        self.spawn().await;
    }

    async fn flushall(&self) {
        kappa_testkit::clients::flushall(&self.url())
            .await
            .expect("flushall");
    }
}

/// Records the run's row of the fault matrix ([`integration_tests::matrix::record`]: the
/// `MATRIX|` line and `target/faults/<test>.jsonl`), judged by the oracle
/// ([`integration_tests::judge`]) with `wrong_views` more wrong outcomes (views that differ
/// from a rebuild).
async fn record_row(
    js: &async_nats::jetstream::Context,
    (test, fault, option): (&str, &str, &str),
    wrong_views: u64,
    recover_secs: f64,
) -> integration_tests::Judged {
    let judged = integration_tests::judge(js).await;
    let mut row = integration_tests::matrix::Row::new(test, fault, option)
        .judged(&judged)
        .recovered(Some(recover_secs));
    row.wrong += wrong_views;
    integration_tests::matrix::record(&row);
    judged
}

/// Waits until `http` reports every partition running and every reading published before
/// `since` (the heal) has its outcome: the backlog of the outage is worked off. Returns the
/// seconds since `since`.
async fn wait_recovered(js: &async_nats::jetstream::Context, http: &str, since: Instant) -> f64 {
    let published = count(js, "READINGS").await;
    let ok = wait_until(Duration::from_secs(120), || async {
        let running = healthz(http)
            .await
            .is_some_and(|h| running_partitions(&h).len() == 4);
        running && count(js, "DELTAS").await + count(js, "DLQ").await >= published
    })
    .await;
    assert!(ok, "did not recover within 120 s");
    since.elapsed().as_secs_f64()
}

fn thermometer_args(seed: &str) -> Vec<&str> {
    vec![
        "--sensors",
        "50",
        "--count",
        "12000",
        "--rate",
        "2000",
        "--event-step-ms",
        "1000",
        "--out-of-order",
        "0",
        "--seed",
        seed,
    ]
}

/// The working store (`remote`'s Redis, or `affinity`'s colocated one) killed with SIGKILL
/// under load and restarted on the same port: from its AOF (`aof`, up to a second of
/// acknowledged commits lost) or empty. The running temperature-delta must notice at its next
/// commit that the store no longer holds what it committed (counted in
/// `kappa_store_lost_total` when it did lose something), reopen the partitions and recover
/// from the streams; every delta equals the oracle.
async fn working_store_restarted(test: &str, fault: &str, working: &str, aof: bool, cut: f64) {
    let s = servers(test).await;
    let mut own = OwnRedis::start(test, "redis-own", aof).await;
    let shared_redis = s.redis_url.clone();
    let (redis_url, affinity) = match working {
        "remote" => (own.url(), format!("{shared_redis}/1")),
        _ => (shared_redis, own.url()),
    };
    let dag = Dag::on(
        s,
        test,
        &[
            ("KAPPA_WORKING", working),
            ("REDIS_URL", &redis_url),
            ("AFFINITY_REDIS_URL", &affinity),
            ("KAPPA_SNAPSHOT_SECS", "1"),
        ],
    )
    .await;
    let js = &dag.js;
    let mut delta = dag.ready("temperature-delta").await;
    let mut thermo = dag.spawn("thermometer", &thermometer_args("23"));
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(js, "DELTAS").await > 4_000
        })
        .await,
        "no progress before the fault:\n{}",
        delta.log_text()
    );
    own.kill9_and_restart(Duration::from_millis(500), cut).await;
    let healed = Instant::now();
    let recover = wait_recovered(js, &delta.http, healed).await;
    let status = thermo
        .wait_exit(Duration::from_secs(90))
        .await
        .expect("thermometer finished");
    assert!(status.success());
    assert!(
        wait_drained(js, Duration::from_secs(120)).await,
        "did not drain:\n{}",
        delta.log_text()
    );
    let lost_stores = metric(&delta.http, "kappa_store_lost_total").await;
    let refolded = metric(&delta.http, "kappa_changes_refolded_total").await;
    let judged = record_row(js, (test, fault, working), 0, recover).await;
    eprintln!(
        "[{test}] store lost detected {lost_stores} times; {refolded} changes refolded; recovered in {recover:.1}s"
    );
    if !aof || cut > 0.0 {
        // Restarted empty or rolled back: every partition's next commit must have found it out.
        assert!(
            lost_stores >= 4.0,
            "an emptied store went unnoticed ({lost_stores}):\n{}",
            delta.log_text()
        );
    }
    assert!(
        judged.exact(),
        "{:?}:\n{}",
        judged.problems,
        delta.log_tail(60)
    );
    let v = verify_exactly_once(js).await;
    assert_eq!(v.readings, 12_000);
    assert_eq!(v.deltas, 12_000, "every reading is valid and in order");
    assert!(
        delta
            .terminate(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "temperature-delta did not drain on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_aof_remote() {
    working_store_restarted(
        "redis_kill9_aof_remote",
        "redis kill -9 + AOF",
        "remote",
        true,
        0.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_aof_tail_lost_remote() {
    working_store_restarted(
        "redis_kill9_aof_tail_lost_remote",
        "redis kill -9 + AOF tail lost",
        "remote",
        true,
        0.25,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_aof_affinity() {
    working_store_restarted(
        "redis_kill9_aof_affinity",
        "redis kill -9 + AOF",
        "affinity",
        true,
        0.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_aof_tail_lost_affinity() {
    working_store_restarted(
        "redis_kill9_aof_tail_lost_affinity",
        "redis kill -9 + AOF tail lost",
        "affinity",
        true,
        0.25,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_store_restarted_empty() {
    working_store_restarted(
        "affinity_store_restarted_empty",
        "affinity store restarted empty",
        "affinity",
        false,
        0.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_restarted_empty() {
    working_store_restarted(
        "remote_store_restarted_empty",
        "redis restarted empty",
        "remote",
        false,
        0.0,
    )
    .await;
}

async fn get(api: &Proc, path: &str) -> serde_json::Value {
    reqwest::get(format!("http://{}{path}", api.http))
        .await
        .expect("query api")
        .json()
        .await
        .expect("json")
}

/// Everything query-api answers about the views: every sensor's view and history, every
/// site's ranking, the top 10.
async fn all_views(api: &Proc, ids: &[String], sites: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert(
        "/v1/sensors".into(),
        get(api, "/v1/sensors").await.to_string(),
    );
    out.insert(
        "/v1/top?limit=10".into(),
        get(api, "/v1/top?limit=10").await.to_string(),
    );
    for id in ids {
        for path in [
            format!("/v1/sensors/{id}"),
            format!("/v1/sensors/{id}/history"),
        ] {
            let v = get(api, &path).await.to_string();
            out.insert(path, v);
        }
    }
    for site in sites {
        let path = format!("/v1/sites/{site}");
        let v = get(api, &path).await.to_string();
        out.insert(path, v);
    }
    out
}

/// The views' Redis wiped (`FLUSHALL`) while view-builder runs under load, late enough that
/// the deltas after it do not refill the histories (about 40 per sensor, the history keeps
/// 120), so a view that silently restarted empty differs from the rebuild: every partition's
/// next batch finds the store below what it wrote (`kappa_views_store_lost_total`), and the
/// partition is rebuilt from the change log's sequence 1. Once drained, the views agree with
/// the oracle's last delta per sensor and equal what `view-builder rebuild` (a fresh generation
/// from sequence 1) gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_wiped_are_rebuilt() {
    let test = "views_wiped_are_rebuilt";
    let s = servers(test).await;
    let views = OwnRedis::start(test, "redis-views", false).await;
    let working_redis = s.redis_url.clone();
    let dag = Dag::on(
        s,
        test,
        &[("KAPPA_WORKING", "remote"), ("REDIS_URL", &views.url())],
    )
    .await;
    let js = &dag.js;
    // temperature-delta keeps its working state in the shared Redis; only the views' is wiped.
    let mut delta_env = dag.env.clone();
    delta_env.retain(|(k, _)| *k != "REDIS_URL");
    delta_env.push(("REDIS_URL", working_redis));
    let mut delta = integration_tests::procs::start(test, "temperature-delta", &delta_env, &[]);
    wait_ready(&mut delta, Duration::from_secs(30)).await;
    let mut builder = dag.ready("view-builder").await;
    // No cache in query-api: every answer compared is read from the views' Redis.
    let mut api = dag.spawn("query-api", &["--cache-ttl-secs", "0"]);
    wait_ready(&mut api, Duration::from_secs(30)).await;
    let mut thermo = dag.spawn("thermometer", &thermometer_args("29"));
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(js, "DELTAS").await > 10_000
        })
        .await,
        "no progress before the wipe"
    );
    let applied = metric(&builder.http, "kappa_views_applied_total").await;
    let before = count(js, "DELTAS").await;
    views.flushall().await;
    let wiped = Instant::now();
    // Recovered: the view-builder noticed, and applied again at least every delta there was
    // at the wipe (the replay from sequence 1).
    let ok = wait_until(Duration::from_secs(120), || async {
        metric(&builder.http, "kappa_views_applied_total").await >= applied + before as f64
    })
    .await;
    assert!(
        ok,
        "views not rebuilt after the wipe:\n{}",
        builder.log_tail(40)
    );
    let recover = wiped.elapsed().as_secs_f64();
    let status = thermo
        .wait_exit(Duration::from_secs(90))
        .await
        .expect("thermometer finished");
    assert!(status.success());
    assert!(
        wait_drained(js, Duration::from_secs(120)).await,
        "did not drain"
    );
    let v = verify_exactly_once(js).await;
    let lost_views = metric(&builder.http, "kappa_views_store_lost_total").await;
    // The views caught up with the oracle's last delta of every sensor.
    let caught_up = wait_until(Duration::from_secs(60), || async {
        let all = get(&api, "/v1/sensors").await;
        let list = all["sensors"].as_array().cloned().unwrap_or_default();
        list.len() == v.latest.len()
            && list.iter().all(|s| {
                let id = s["sensor_id"].as_str().unwrap_or_default();
                v.latest
                    .get(id)
                    .is_some_and(|d| d["source_seq"] == s["source_seq"])
            })
    })
    .await;
    // Compare the whole views with a rebuild from sequence 1.
    let sensors = registry_sensors(js).await;
    let mut ids: Vec<String> = sensors.keys().cloned().collect();
    ids.sort();
    let mut sites: Vec<String> = sensors.values().map(|s| s.site.clone()).collect();
    sites.sort();
    sites.dedup();
    let live = all_views(&api, &ids, &sites).await;
    let mut rebuild = dag.spawn("view-builder", &["rebuild", "--grace-secs", "0"]);
    let st = rebuild
        .wait_exit(Duration::from_secs(120))
        .await
        .expect("rebuild finished");
    assert!(st.success(), "rebuild failed:\n{}", rebuild.log_text());
    let rebuilt = all_views(&api, &ids, &sites).await;
    let differing: Vec<&String> = live
        .iter()
        .filter(|(k, x)| rebuilt.get(*k) != Some(*x))
        .map(|(k, _)| k)
        .collect();
    let wrong_views = differing.len() as u64 + u64::from(!caught_up);
    let judged = record_row(
        js,
        (test, "views redis wiped", "view-builder"),
        wrong_views,
        recover,
    )
    .await;
    assert!(judged.exact(), "{:?}", judged.problems);
    eprintln!(
        "[{test}] {before} deltas at the wipe; store lost detected {lost_views} times; views rebuilt in {recover:.1}s; {} answers compared with a rebuild, {} differ",
        live.len(),
        differing.len()
    );
    assert!(caught_up, "views did not catch up with the oracle");
    assert!(
        lost_views >= 1.0,
        "the wipe went unnoticed:\n{}",
        builder.log_tail(40)
    );
    if let Some(k) = differing.first() {
        panic!(
            "{k}: live view {} differs from the rebuild {}",
            live[*k],
            rebuilt.get(*k).map_or("(missing)", String::as_str)
        );
    }
    assert!(
        builder
            .terminate(Duration::from_secs(15))
            .is_some_and(|s| s.success())
    );
}
