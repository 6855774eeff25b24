//! `kappa-bench all` and `smoke`: the main tables. A table of scenarios ([`SCENARIOS`]) that one
//! runner ([`run`]) executes in order on one set of servers: the runner owns the shared
//! start-up (temporary folder, servers, [`Ctx`], the sensor registry before the first scenario
//! that needs it, the report and its stamp) and the progress lines; each scenario measures one
//! part into [`All`], and the last one writes every table from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::baseline::{self, Lat, Sink};
use crate::report::{Report, Target, fmt_lat, fmt_rate, ratio};
use crate::services::{self, Ctx, TdCase, TdResult};
use crate::{Cli, infra, median, rounds, short};

/// Each throughput baseline and headline run runs RUNS times; the median counts.
const RUNS: usize = rounds::ROUNDS;

/// The sizes of one mode.
pub struct Plan {
    name: &'static str,
    n: u64,
    sensors: u64,
    big: u64,
    window_sensors: u64,
    growth: bool,
    hop_rate: f64,
    hop_secs: f64,
    pings: u64,
    http_secs: f64,
    e2e_secs: f64,
}

impl Plan {
    /// `all` (full sizes) or `smoke` (tiny counts); `readings` overrides N.
    fn new(full: bool, readings: Option<u64>) -> Plan {
        if full {
            Plan {
                name: "all",
                n: readings.unwrap_or(100_000),
                sensors: 1_000,
                big: 10_000,
                window_sensors: 100,
                growth: true,
                hop_rate: 1_000.0,
                hop_secs: 5.0,
                pings: 10_000,
                http_secs: 5.0,
                e2e_secs: 10.0,
            }
        } else {
            Plan {
                name: "smoke",
                n: readings.unwrap_or(2_000),
                sensors: 100,
                big: 100,
                window_sensors: 20,
                growth: false,
                hop_rate: 500.0,
                hop_secs: 1.0,
                pings: 500,
                http_secs: 0.5,
                e2e_secs: 1.0,
            }
        }
    }
}

/// One part of `all`, in the order the runner executes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Baselines,
    WorkingState,
    Recovery,
    Window,
    Observed,
    Dag,
    Report,
}

/// The scenarios of `all` and `smoke`, in order.
const SCENARIOS: [Scenario; 7] = [
    Scenario::Baselines,
    Scenario::WorkingState,
    Scenario::Recovery,
    Scenario::Window,
    Scenario::Observed,
    Scenario::Dag,
    Scenario::Report,
];

impl Scenario {
    /// Its progress line, or `None` when the plan skips it.
    fn label(self, plan: &Plan) -> Option<String> {
        Some(match self {
            Scenario::Baselines => "baselines".into(),
            Scenario::WorkingState => format!(
                "temperature-delta per working-state option ({} sensors)",
                plan.sensors
            ),
            Scenario::Recovery => format!("{} sensors, kill -9 recovery", plan.big),
            Scenario::Window if !plan.growth => return None,
            Scenario::Window => "window length (event step 1000 ms)".into(),
            Scenario::Observed => format!(
                "observed-state options ({} sensors, working=local)",
                plan.big
            ),
            Scenario::Dag => "view-builder, query-api, end to end".into(),
            Scenario::Report => "report".into(),
        })
    }

    /// Whether it runs services (which need the sensor registry up).
    fn needs_registry(self) -> bool {
        !matches!(self, Scenario::Baselines | Scenario::Report)
    }
}

/// What the scenarios measure, shared by the runner.
struct All {
    plan: Plan,
    ctx: Ctx,
    rep: Report,
    out: PathBuf,
    started: Instant,
    /// CPU per message of each process (table "CPU per message").
    cpu_rows: Vec<(String, Vec<(&'static str, f64)>)>,
    /// Baselines 1-3 (raw publish, publish relay, Redis relay), msgs/s.
    base: (Option<f64>, Option<f64>, Option<f64>),
    results: Vec<(TdCase, anyhow::Result<TdResult>)>,
    window_rows: Vec<(TdCase, anyhow::Result<TdResult>)>,
    observed_rows: Vec<(TdCase, anyhow::Result<TdResult>)>,
    sensor_bytes: f64,
    dag: serde_json::Value,
    vb_rate: Option<f64>,
    qa_rows: Vec<Vec<String>>,
    e2e_rows: Vec<Vec<String>>,
    e2e_50: Option<(Lat, Lat)>,
    hop_rows: Vec<Vec<String>>,
    e2e_max: Option<(f64, f64)>,
    dag_note: String,
}

/// Runs `all` (`full`) or `smoke`: the shared start-up, then every scenario in order.
pub async fn run(root: &Path, full: bool, cli: &Cli) -> anyhow::Result<()> {
    let plan = Plan::new(full, cli.readings);
    let out = cli.out.clone().unwrap_or_else(|| {
        if full {
            root.join("docs")
        } else {
            root.join("target/bench-smoke")
        }
    });
    let bin_dir = cli.bin_dir.clone().unwrap_or_else(|| {
        kappa_testkit::procs::bin_dir().unwrap_or_else(|_| root.join("target/release"))
    });
    let tmp = root.join(format!("target/bench-tmp/{}", std::process::id()));
    let started = Instant::now();
    let command = format!(
        "cargo run --release -p kappa-bench -- {}{}{}",
        plan.name,
        if cli.reuse { " --reuse" } else { "" },
        cli.readings
            .map(|n| format!(" --readings {n}"))
            .unwrap_or_default()
    );
    eprintln!(
        "kappa-bench {}: N={} readings per run, servers in {}",
        plan.name,
        plan.n,
        tmp.display()
    );

    let servers = infra::Servers::start(&tmp, cli.reuse).await?;
    let ctx = Ctx::new(servers, bin_dir).await?;
    let rep = Report::new(plan.name, &command, plan.n);
    let mut all = All {
        plan,
        ctx,
        rep,
        out,
        started,
        cpu_rows: Vec::new(),
        base: (None, None, None),
        results: Vec::new(),
        window_rows: Vec::new(),
        observed_rows: Vec::new(),
        sensor_bytes: 0.0,
        dag: json!({}),
        vb_rate: None,
        qa_rows: Vec::new(),
        e2e_rows: Vec::new(),
        e2e_50: None,
        hop_rows: Vec::new(),
        e2e_max: None,
        dag_note: String::new(),
    };
    for (i, s) in SCENARIOS.into_iter().enumerate() {
        if s.needs_registry()
            && all.ctx.registry.is_none()
            && let Err(e) = all.ctx.start_registry().await
        {
            all.rep.note(&format!(
                "sensor-registry could not start, so no service was measured: {}",
                short(&e)
            ));
            all.rep.write(&all.out)?;
            return Err(e);
        }
        if let Some(label) = s.label(&all.plan) {
            eprintln!("[{}/{}] {label}", i + 1, SCENARIOS.len());
        }
        match s {
            Scenario::Baselines => all.baselines().await?,
            Scenario::WorkingState => all.working_state().await?,
            Scenario::Recovery => all.recovery().await?,
            Scenario::Window => all.window().await?,
            Scenario::Observed => all.observed().await?,
            Scenario::Dag => all.dag().await?,
            Scenario::Report => all.report()?,
        }
    }
    drop(all);
    let _ = std::fs::remove_dir_all(tmp.join("js"));
    Ok(())
}

/// One temperature-delta run of `all` / `smoke`, with its progress lines: (case, result).
async fn run_td(ctx: &Ctx, c: TdCase) -> (TdCase, anyhow::Result<TdResult>) {
    eprintln!(
        "  temperature-delta working={} observed={} sensors={} window={}s step={}ms{}",
        c.working,
        c.observed,
        c.sensors,
        c.window_secs,
        c.event_step_ms,
        if c.recovery { " +kill -9" } else { "" }
    );
    let r = services::temperature_delta(ctx, &c).await.map(|(r, p)| {
        if let Some(mut p) = p {
            p.terminate(Duration::from_secs(10));
        }
        r
    });
    match &r {
        Ok(r) => eprintln!(
            "    {:.0} readings/s, ready {:.2}s, rss {} KiB{}",
            r.rate,
            r.ready_secs,
            r.rss_kib,
            r.recovery
                .as_ref()
                .map(|x| format!(
                    ", recovery ready {:.2}s caught up {:.2}s",
                    x.ready_secs, x.caught_up_secs
                ))
                .unwrap_or_default()
        ),
        Err(e) => eprintln!("    failed: {e:#}"),
    }
    (c, r)
}

/// The temperature-delta run of `plan` with these options (N readings, 10-minute windows).
fn case(
    plan: &Plan,
    working: &'static str,
    observed: &'static str,
    sensors: u64,
    recovery: bool,
) -> TdCase {
    TdCase {
        working,
        observed,
        sensors,
        readings: plan.n,
        window_secs: 600,
        event_step_ms: 0,
        recovery,
        // Recovery runs pin partitions (`static`) so that a restart measures the working
        // state's recovery, not the lease expiry; lease failover is measured separately.
        ownership: if recovery { "static" } else { "leases" },
    }
}

impl All {
    /// Baselines (1-5b): raw clients in this process; their table.
    async fn baselines(&mut self) -> anyhow::Result<()> {
        let All {
            ref plan,
            ref ctx,
            ref mut rep,
            ref mut cpu_rows,
            ..
        } = *self;
        ctx.servers.wipe(&ctx.js).await?;
        // Warm-up (stream creation, first disk writes), then the measured run.
        let _ = baseline::raw_publish(&ctx.js, plan.n.min(5_000), plan.sensors).await;
        // Each throughput baseline runs RUNS times on fresh streams (message ids repeat between
        // runs and would be deduplicated otherwise); the median counts, so that one unlucky moment
        // on a shared machine does not move every ratio.
        let b_pub = rounds::median_run(RUNS, async || {
            let _ = ctx.js.delete_stream("BENCH_READINGS").await;
            baseline::raw_publish(&ctx.js, plan.n, plan.sensors).await
        })
        .await;
        let meter = ctx.cpu_meter("service", None);
        let b_relay = rounds::median_run(RUNS, async || {
            let _ = ctx.js.delete_stream("BENCH_DELTAS").await;
            let sink = Sink::Stream(baseline::bench_deltas());
            baseline::relay(&ctx.js, &baseline::bench_readings(), sink, plan.n).await
        })
        .await;
        cpu_rows.push((
            "relay (2), in kappa-bench".into(),
            meter.per_msg(plan.n * RUNS as u64),
        ));
        let redis_conn = ctx.servers.redis(&ctx.servers.redis_url).await?;
        let meter = ctx.cpu_meter("service", None);
        let b_redis = rounds::median_run(RUNS, async || {
            let sink = Sink::Redis(redis_conn.clone());
            baseline::relay(&ctx.js, &baseline::bench_deltas(), sink, plan.n).await
        })
        .await;
        cpu_rows.push((
            "Redis relay (3), in kappa-bench".into(),
            meter.per_msg(plan.n * RUNS as u64),
        ));
        let b_hop = baseline::one_hop(&ctx.js, plan.hop_rate, plan.hop_secs).await;
        let mut rc = redis_conn.clone();
        let b_ping = baseline::redis_ping(&mut rc, plan.pings).await;
        let mut uc = ctx.servers.redis(&ctx.servers.affinity_url).await?;
        let b_ping_unix = baseline::redis_ping(&mut uc, plan.pings).await;
        let ok = |r: &anyhow::Result<f64>| r.as_ref().ok().copied();
        let (b_pub_v, b_relay_v, b_redis_v) = (ok(&b_pub), ok(&b_relay), ok(&b_redis));
        {
            let rate_row = |name: &str, what: &str, r: &anyhow::Result<f64>| {
                vec![
                    name.to_string(),
                    what.to_string(),
                    match r {
                        Ok(v) => fmt_rate(*v),
                        Err(e) => format!("not measured: {}", short(e)),
                    },
                ]
            };
            let lat_row = |name: &str, what: &str, r: &anyhow::Result<Lat>| {
                vec![
                    name.to_string(),
                    what.to_string(),
                    match r {
                        Ok(l) => fmt_lat(l),
                        Err(e) => format!("not measured: {}", short(e)),
                    },
                ]
            };
            rep.table(
                "Baselines (raw clients, in process)",
                "Same streams settings as the services (`PartitionedStream` configs: 8 partitions, subject transform, 120 s duplicate window), messages of the same shape and size. Relays run one pull consumer per partition, batch 256, ack policy `none`, exactly like the runtime driver, with none of the service logic. Throughput baselines (1-3) are each the median of 3 runs on fresh streams.",
                &["#", "baseline", "figure"],
                vec![
                    rate_row("1", "JetStream async publish, 1024 acks in flight, `Nats-Msg-Id` set (msgs/s)", &b_pub),
                    rate_row("2", "relay: pull batch -> publish each to a 2nd stream -> await the batch's publish acks (msgs/s)", &b_relay),
                    rate_row("3", "relay: pull batch -> one Redis pipeline (HSET per msg + position) (msgs/s)", &b_redis),
                    lat_row("4", &format!("one hop publish -> pull consumer at {} msgs/s (open loop)", plan.hop_rate), &b_hop),
                    lat_row("5", "Redis PING round trip, TCP 127.0.0.1", &b_ping),
                    lat_row("5b", "Redis PING round trip, unix socket (colocated)", &b_ping_unix),
                ],
            );
            rep.json("baselines", json!({
                "raw_publish_per_s": b_pub_v, "relay_publish_per_s": b_relay_v, "relay_redis_per_s": b_redis_v,
                "one_hop": b_hop.as_ref().ok(), "one_hop_rate": plan.hop_rate,
                "redis_ping_tcp": b_ping.as_ref().ok(), "redis_ping_unix": b_ping_unix.as_ref().ok(),
            }));
        }
        self.base = (b_pub_v, b_relay_v, b_redis_v);
        Ok(())
    }

    /// temperature-delta per working-state option at `plan.sensors` (median of RUNS runs).
    async fn working_state(&mut self) -> anyhow::Result<()> {
        let All {
            ref plan,
            ref ctx,
            ref mut results,
            ..
        } = *self;
        // The headline runs, like the baselines, are the median of RUNS runs (by throughput).
        for w in ["local", "remote", "affinity"] {
            let rate = |r: &(TdCase, anyhow::Result<TdResult>)| {
                r.1.as_ref().map_or(f64::NEG_INFINITY, |x| x.rate)
            };
            let run =
                async || run_td(ctx, case(plan, w, "semi-stateless", plan.sensors, false)).await;
            results.push(rounds::median_by(RUNS, rate, run).await);
        }
        Ok(())
    }

    /// kill -9 recovery of each option at `plan.big`.
    async fn recovery(&mut self) -> anyhow::Result<()> {
        let All {
            ref plan,
            ref ctx,
            ref mut results,
            ..
        } = *self;
        for w in ["local", "remote", "affinity"] {
            results.push(run_td(ctx, case(plan, w, "semi-stateless", plan.big, true)).await);
        }
        Ok(())
    }

    /// Window length, `local` and `remote` (only with `plan.growth`).
    async fn window(&mut self) -> anyhow::Result<()> {
        let All {
            ref plan,
            ref ctx,
            ref mut window_rows,
            ..
        } = *self;
        if plan.growth {
            for w in ["local", "remote"] {
                for win in [60u32, 600] {
                    let mut c = case(plan, w, "semi-stateless", plan.window_sensors, false);
                    c.window_secs = win;
                    c.event_step_ms = 1000;
                    window_rows.push(run_td(ctx, c).await);
                }
            }
        }
        Ok(())
    }

    /// Observed-state options at `plan.big`, `local` working state.
    async fn observed(&mut self) -> anyhow::Result<()> {
        let All {
            ref plan,
            ref ctx,
            ref mut observed_rows,
            ..
        } = *self;
        for o in ["stateful", "stateless"] {
            observed_rows.push(run_td(ctx, case(plan, "local", o, plan.big, false)).await);
        }
        let sensor_bytes = ctx.sensor_json_bytes(plan.big).await;
        self.sensor_bytes = sensor_bytes;
        Ok(())
    }

    /// view-builder, query-api and end to end, on the whole DAG.
    async fn dag(&mut self) -> anyhow::Result<()> {
        let All {
            ref plan,
            ref ctx,
            ref mut cpu_rows,
            ref mut dag,
            ref mut vb_rate,
            ref mut qa_rows,
            ref mut e2e_rows,
            ref mut e2e_50,
            ref mut hop_rows,
            ref mut e2e_max,
            ref mut dag_note,
            ..
        } = *self;
        let vb_ok = ctx.has_bin("view-builder");
        let qa_ok = ctx.has_bin("query-api");
        if !vb_ok {
            *dag_note = "view-builder binary missing: not measured".into();
        } else {
            let r: anyhow::Result<()> = async {
                let c = case(plan, "remote", "semi-stateless", plan.sensors, false);
                let (tdr, td_proc) = services::temperature_delta(ctx, &c).await?;
                let td_proc = td_proc.ok_or_else(|| anyhow::anyhow!("no td"))?;
                let n_deltas = kappa_testkit::streams::count(&ctx.js, thermo_domain::streams::DELTAS).await;
                let (rate, vb_ready, vb_proc, vb_cpu) = services::view_builder(ctx, n_deltas).await?;
                cpu_rows.push(("view-builder".into(), vb_cpu));
                eprintln!("    view-builder {rate:.0} deltas/s (ready {vb_ready:.2}s)");
                *vb_rate = Some(rate);
                dag["view_builder"] = json!({"deltas": n_deltas, "per_s": rate, "ready_secs": vb_ready, "rss_kib": infra::rss_kib(vb_proc.pid())});
                if !qa_ok {
                    *dag_note = "query-api binary missing: query-api and end-to-end not measured".into();
                    return Ok(());
                }
                let mut qa = ctx.spawn("query-api", &[], &[])?;
                qa.wait_ready(Duration::from_secs(60)).await?;
                // Query API load: hot key, cold keys, top-10; and the constant-body baseline.
                let conc = 16;
                let hot_path = "/v1/sensors/s-0001".to_string();
                let body = kappa_testkit::http::get(&ctx.http, &qa.http, &hot_path).await.map(|(_, b)| b).unwrap_or_default();
                let (base_addr, base_task) = services::constant_server(body.clone()).await?;
                let base = services::http_load(&ctx.http, &base_addr, Arc::new(vec![hot_path.clone()]), conc, u64::MAX, plan.http_secs).await?;
                base_task.abort();
                let hot = services::http_load(&ctx.http, &qa.http, Arc::new(vec![hot_path.clone()]), conc, u64::MAX, plan.http_secs).await?;
                let cold_paths: Vec<String> = (2..=plan.sensors).map(|i| format!("/v1/sensors/s-{i:04}")).collect();
                let cold = services::http_load(&ctx.http, &qa.http, Arc::new(cold_paths.clone()), conc, cold_paths.len() as u64, plan.http_secs * 4.0).await?;
                let top = services::http_load(&ctx.http, &qa.http, Arc::new(vec!["/v1/top?limit=10".to_string()]), conc, u64::MAX, plan.http_secs).await?;
                let row = |name: &str, r: &(f64, u64, Lat)| vec![
                    name.to_string(), fmt_rate(r.0), ratio(Some(r.0), Some(base.0)), fmt_lat(&r.2), r.1.to_string(),
                ];
                qa_rows.push(vec!["raw axum, constant body (baseline)".into(), fmt_rate(base.0), "1.00".into(), fmt_lat(&base.2), base.1.to_string()]);
                qa_rows.push(row("query-api `/v1/sensors/{id}`, hot key (one sensor)", &hot));
                qa_rows.push(row(&format!("query-api `/v1/sensors/{{id}}`, cold keys ({} sensors, each once)", cold_paths.len()), &cold));
                qa_rows.push(row("query-api `/v1/top?limit=10`", &top));
                dag["query_api"] = json!({"concurrency": conc, "baseline": {"per_s": base.0, "lat": base.2},
                    "hot": {"per_s": hot.0, "errors": hot.1, "lat": hot.2}, "cold": {"per_s": cold.0, "errors": cold.1, "lat": cold.2},
                    "top": {"per_s": top.0, "errors": top.1, "lat": top.2}, "body_bytes": body.len()});
                // End to end at 10%, 50% and 80% of the pipeline's max throughput, measured with
                // the whole DAG (and this load generator) sharing the machine.
                let alone = tdr.rate.min(rate);
                let max = match services::pipeline_max(ctx, &vb_proc.http, (plan.n / 2).max(100), plan.sensors).await {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("    pipeline max not measured ({}); using each service alone", short(&e));
                        alone
                    }
                };
                eprintln!("    pipeline max {max:.0} readings/s (each service alone: {alone:.0})");
                *e2e_max = Some((max, alone));
                let mut e2e_json = Vec::new();
                for load in [0.1, 0.5, 0.8] {
                    let r = (max * load).max(1.0);
                    let hop = baseline::one_hop(&ctx.js, r, plan.e2e_secs.min(5.0)).await;
                    let e = services::e2e(ctx, &qa.http, r, plan.e2e_secs, plan.sensors, false).await;
                    match (&e, &hop) {
                        (Ok((l, seen, total, _, busy)), Ok(h)) => {
                            eprintln!("    e2e at {r:.0}/s: p99 {:.2} ms ({seen}/{total} seen); one hop p99 {:.2} ms", l.p99_ms, h.p99_ms);
                            let load_name = format!("{:.0}% ({r:.0} readings/s)", load * 100.0);
                            let busy_s = busy.map_or("-".into(), |b| format!("{:.0}%", b * 100.0));
                            e2e_rows.push(vec![load_name, fmt_lat(l), format!("{seen}/{total}"), fmt_lat(h), format!("{:.1}x", l.p99_ms / h.p99_ms.max(1e-9)), busy_s]);
                            if load == 0.5 { *e2e_50 = Some((*l, *h)); }
                        }
                        _ => {
                            let err = e.as_ref().err().or(hop.as_ref().err()).map(short).unwrap_or_default();
                            e2e_rows.push(vec![format!("{:.0}% ({r:.0} readings/s)", load * 100.0), format!("not measured: {err}"), String::new(), String::new(), String::new(), String::new()]);
                        }
                    }
                    e2e_json.push(json!({"load": load, "rate": r, "e2e": e.as_ref().ok().map(|x| x.0), "seen": e.as_ref().ok().map(|x| x.1),
                        "sent": e.as_ref().ok().map(|x| x.2), "hops": e.as_ref().ok().and_then(|x| x.3), "machine_busy": e.as_ref().ok().and_then(|x| x.4), "one_hop": hop.as_ref().ok()}));
                }
                // Where the time goes: the same open loop at 10% and 50%, with two more subscribers
                // that note when each reading's delta and view go by.
                for load in [0.1, 0.5] {
                    let r = (max * load).max(1.0);
                    let load_name = format!("{:.0}% ({r:.0} readings/s)", load * 100.0);
                    match services::e2e(ctx, &qa.http, r, plan.e2e_secs, plan.sensors, true).await {
                        Ok((l, _, _, Some(hops), busy)) => {
                            let pp = |x: &Lat| format!("{:.2} / {:.2}", x.p50_ms, x.p99_ms);
                            let busy = busy.map_or("-".into(), |b| format!("{:.0}%", b * 100.0));
                            hop_rows.push(vec![load_name, pp(&hops.to_delta), pp(&hops.to_view), pp(&hops.to_live), pp(&l), hops.to_delta.count.to_string(), busy]);
                            e2e_json.push(json!({"load": load, "rate": r, "split": true, "e2e": l, "hops": hops}));
                        }
                        Ok(_) => hop_rows.push(vec![load_name, "no reading seen at every hop".into(), String::new(), String::new(), String::new(), String::new(), String::new()]),
                        Err(e) => hop_rows.push(vec![load_name, format!("not measured: {}", short(&e)), String::new(), String::new(), String::new(), String::new(), String::new()]),
                    }
                }
                dag["e2e"] = json!({"max_rate": max, "each_alone_rate": alone, "runs": e2e_json});
                let mut td_proc = td_proc;
                let mut vb_proc = vb_proc;
                qa.terminate(Duration::from_secs(10));
                vb_proc.terminate(Duration::from_secs(10));
                td_proc.terminate(Duration::from_secs(10));
                Ok(())
            }
            .await;
            if let Err(e) = r {
                eprintln!("    DAG section failed: {e:#}");
                *dag_note = format!("not measured: {}", short(&e));
            }
        }
        Ok(())
    }

    /// Every table, from what the scenarios before measured; writes BENCHMARKS.md and
    /// benchmarks.json.
    fn report(&mut self) -> anyhow::Result<()> {
        let (b_pub_v, b_relay_v, b_redis_v) = self.base;
        let All {
            ref plan,
            ref mut rep,
            ref cpu_rows,
            ref results,
            ref window_rows,
            ref observed_rows,
            sensor_bytes,
            ref dag,
            vb_rate,
            ref qa_rows,
            ref e2e_rows,
            e2e_50,
            ref hop_rows,
            e2e_max,
            ref dag_note,
            ref out,
            started,
            ..
        } = *self;
        // `find(w, false)`: the run at `plan.sensors`; `find(w, true)`: the kill -9 run at `plan.big`.
        let find = |w: &str, recovery: bool| {
            results
                .iter()
                .find(|(c, _)| {
                    c.working == w && c.recovery == recovery && c.observed == "semi-stateless"
                })
                .and_then(|(_, r)| r.as_ref().ok())
        };
        let thermo_rates: Vec<f64> = results
            .iter()
            .filter(|(c, _)| c.sensors == plan.sensors)
            .filter_map(|(_, r)| r.as_ref().ok().map(|r| r.prefill_rate))
            .collect();
        let thermo = median(thermo_rates.clone());
        let mut targets: Vec<Target> = Vec::new();
        let tr = |name: &str, v: Option<f64>, base: Option<f64>, min: f64| Target {
            name: name.to_string(),
            value: match (v, base) {
                (Some(v), Some(b)) if b > 0.0 => Some(v / b),
                _ => None,
            },
            shown: ratio(v, base),
            goal: format!(">= {min:.2}"),
            met: match (v, base) {
                (Some(v), Some(b)) if b > 0.0 => Some(v / b >= min),
                _ => None,
            },
        };
        let td = |w: &str| find(w, false).map(|r| r.rate);
        targets.push(tr("thermometer / raw publish", thermo, b_pub_v, 0.85));
        targets.push(tr(
            "temperature-delta local / publish relay",
            td("local"),
            b_relay_v,
            0.80,
        ));
        targets.push(tr(
            "temperature-delta remote / publish relay",
            td("remote"),
            b_relay_v,
            0.60,
        ));
        targets.push(tr("view-builder / Redis relay", vb_rate, b_redis_v, 0.75));
        match e2e_50 {
            Some((l, h)) => {
                targets.push(Target {
                    name: "e2e p99 at 50% load <= 4x one-hop p99".into(),
                    value: Some(l.p99_ms / h.p99_ms.max(1e-9)),
                    shown: format!(
                        "{:.2} ms vs {:.2} ms ({:.1}x)",
                        l.p99_ms,
                        h.p99_ms,
                        l.p99_ms / h.p99_ms.max(1e-9)
                    ),
                    goal: "<= 4x".into(),
                    met: Some(l.p99_ms <= 4.0 * h.p99_ms),
                });
                targets.push(Target {
                    name: "e2e p99 at 50% load < 20 ms".into(),
                    value: Some(l.p99_ms),
                    shown: format!("{:.2} ms", l.p99_ms),
                    goal: "< 20 ms".into(),
                    met: Some(l.p99_ms < 20.0),
                });
            }
            None => targets.push(Target {
                name: "e2e p99 at 50% load".into(),
                value: None,
                shown: "not measured".into(),
                goal: "<= 4x one hop, < 20 ms".into(),
                met: None,
            }),
        }
        let local_rec = find("local", true).and_then(|r| r.recovery.clone());
        targets.push(Target {
            name: format!(
                "local recovery of {} sensors (kill -9, restart -> caught up, static ownership)",
                plan.big
            ),
            value: local_rec.as_ref().map(|r| r.caught_up_secs),
            shown: local_rec
                .as_ref()
                .map(|r| format!("{:.2} s", r.caught_up_secs))
                .unwrap_or_else(|| "not measured".into()),
            goal: "< 5 s".into(),
            met: local_rec.as_ref().map(|r| r.caught_up_secs < 5.0),
        });
        let lf = local_rec.as_ref().and_then(|r| r.lease_failover_secs);
        targets.push(Target {
            name: format!(
                "local failover of {} sensors with default leases (TTL 6 s), restart -> caught up",
                plan.big
            ),
            value: lf,
            shown: lf
                .map(|x| format!("{x:.2} s"))
                .unwrap_or_else(|| "not measured".into()),
            goal: "< 5 s".into(),
            met: lf.map(|x| x < 5.0),
        });

        // Headline: every service figure against its baseline.
        let mut head = vec![vec![
            "thermometer (`--rate 0`)".to_string(),
            thermo
                .map(fmt_rate)
                .unwrap_or_else(|| "not measured".into()),
            "raw publish (1)".into(),
            b_pub_v.map(fmt_rate).unwrap_or_default(),
            ratio(thermo, b_pub_v),
        ]];
        for w in ["local", "remote", "affinity"] {
            head.push(vec![
                format!("temperature-delta `{w}` ({} sensors)", plan.sensors),
                td(w).map(fmt_rate).unwrap_or_else(|| "not measured".into()),
                "publish relay (2)".into(),
                b_relay_v.map(fmt_rate).unwrap_or_default(),
                ratio(td(w), b_relay_v),
            ]);
        }
        head.push(vec![
            "view-builder".into(),
            vb_rate.map(fmt_rate).unwrap_or_else(|| {
                if dag_note.is_empty() {
                    "not measured".into()
                } else {
                    dag_note.clone()
                }
            }),
            "Redis relay (3)".into(),
            b_redis_v.map(fmt_rate).unwrap_or_default(),
            ratio(vb_rate, b_redis_v),
        ]);
        rep.table(
            "Headline: services against their baselines",
            &format!("Throughput in messages/s over N = {} messages each; the ratio is service / baseline, both measured in this run (temperature-delta at 1000 sensors: the median of 3 runs, as the baselines). temperature-delta runs with `KAPPA_OBSERVED=semi-stateless`, 8 partitions, batch 256, after `thermometer --rate 0` pre-filled READINGS; timing starts when its `/healthz` answers 200 and stops when DELTAS+DLQ hold N messages. The thermometer figure is the median of its {} pre-fill runs with {} sensors.", plan.n, thermo_rates.len(), plan.sensors),
            &["service", "figure", "baseline", "baseline figure", "ratio"],
            head,
        );
        rep.targets(&targets);

        // Working state per option.
        let mut wrows = Vec::new();
        for (c, r) in results.iter() {
            let row = match r {
                Ok(r) => vec![
                    format!("`{}`", c.working),
                    c.sensors.to_string(),
                    fmt_rate(r.rate),
                    ratio(Some(r.rate), b_relay_v),
                    format!("{:.1}", r.rss_kib as f64 / 1024.0),
                    r.recovery
                        .as_ref()
                        .map(|x| format!("{:.2}", x.ready_secs))
                        .unwrap_or_else(|| "-".into()),
                    r.recovery
                        .as_ref()
                        .map(|x| format!("{:.3}", x.recovery_secs_max))
                        .unwrap_or_else(|| "-".into()),
                    r.recovery
                        .as_ref()
                        .map(|x| format!("{:.2}", x.caught_up_secs))
                        .unwrap_or_else(|| "-".into()),
                    r.recovery
                        .as_ref()
                        .and_then(|x| x.lease_failover_secs)
                        .map(|x| format!("{x:.2}"))
                        .unwrap_or_else(|| "-".into()),
                    format!("{:.0} x {:.0}", r.batches, r.mean_batch),
                    format!("{:.2}", r.mean_batch_ms),
                    format!("{:.1}", r.store_calls_per_batch),
                    r.dead_letters.to_string(),
                ],
                Err(e) => vec![
                    format!("`{}`", c.working),
                    c.sensors.to_string(),
                    format!("not measured: {}", short(e)),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
            };
            wrows.push(row);
        }
        rep.table(
            "Working state: temperature-delta per option",
            &format!("N = {} readings per run. RSS is temperature-delta's VmRSS after draining. Recovery: after draining, `kill -9`, restart; *ready* = spawn -> `/healthz` 200, *open* = the runtime's `recovery_secs` (max over partitions: restoring the working state), *caught up* = spawn -> every partition's position at its last reading (snapshot + replay for `local`; the snapshot interval is 5 s, so up to 5 s of input is replayed). The kill -9 runs pin all partitions to the instance (`KAPPA_OWNERSHIP=static`), so the restart measures the working state's recovery alone; *failover with leases* is the same restart under the default lease ownership (`KAPPA_LEASE_TTL_SECS=6`): the new instance waits for the dead one's membership and leases to expire, then recovers. Batches, time per batch (`kappa_batch_seconds`) and store round trips per batch (`kappa_state_seconds` count: HMGET loads + Lua commits; 0 for `local`, whose store is memory) come from the service's `/metrics`; the batch time is spent on 8 partitions concurrently.", plan.n),
            &["working", "sensors", "readings/s", "vs relay (2)", "RSS MiB", "restart ready s", "open s (max)", "caught up s", "failover with leases s", "batches x mean size", "ms per batch", "store round trips per batch", "DLQ"],
            wrows,
        );
        if plan.growth {
            let mut g = Vec::new();
            for w in ["local", "remote", "affinity"] {
                let a = find(w, false).map(|r| r.rate);
                let b = find(w, true).map(|r| r.rate);
                g.push(vec![
                    format!("`{w}`"),
                    a.map(fmt_rate).unwrap_or_default(),
                    b.map(fmt_rate).unwrap_or_default(),
                    ratio(b, a),
                ]);
            }
            rep.table("Growth: sensors", "Same N readings spread over more sensors (fewer readings per sensor per batch, more keys loaded per batch).", &["working", &format!("{} sensors", plan.sensors), &format!("{} sensors", plan.big), "ratio"], g);
            let mut wr = Vec::new();
            for (c, r) in window_rows.iter() {
                wr.push(match r {
                    Ok(r) => vec![
                        format!("`{}`", c.working),
                        c.window_secs.to_string(),
                        fmt_rate(r.rate),
                        ratio(Some(r.rate), b_relay_v),
                        format!("{:.1}", r.rss_kib as f64 / 1024.0),
                    ],
                    Err(e) => vec![
                        format!("`{}`", c.working),
                        c.window_secs.to_string(),
                        format!("not measured: {}", short(e)),
                        String::new(),
                        String::new(),
                    ],
                });
            }
            rep.table("Growth: window length", &format!("{} sensors, `--event-step-ms 1000`, N = {} readings, so each sensor gets {} readings 1 s apart: a 60 s window holds at most 60 samples, a 600 s window up to {}. Every changed window is written back whole on each commit.", plan.window_sensors, plan.n, plan.n / plan.window_sensors, (plan.n / plan.window_sensors).min(600)), &["working", "window s", "readings/s", "vs relay (2)", "RSS MiB"], wr);
        }

        // Observed state per option.
        let mut orows = Vec::new();
        let semi = find("local", true).cloned();
        let mut obs_all: Vec<(&str, Option<TdResult>, Option<String>)> = Vec::new();
        for (c, r) in observed_rows.iter() {
            obs_all.push((
                c.observed,
                r.as_ref().ok().cloned(),
                r.as_ref().err().map(short),
            ));
        }
        obs_all.push(("semi-stateless", semi, None));
        for (o, r, err) in &obs_all {
            orows.push(match r {
                Some(r) => vec![
                    format!("`{o}`"),
                    fmt_rate(r.rate),
                    ratio(Some(r.rate), b_relay_v),
                    format!("{:.0}", r.observed_req_per_s),
                    format!("{:.0}", r.observed_requests),
                    if r.observed_requests > 0.0 {
                        format!("{:.3}", r.observed_req_mean_ms)
                    } else {
                        "0 (in memory)".into()
                    },
                    format!("{:.1}", r.rss_kib as f64 / 1024.0),
                    format!("{:.2}", r.ready_secs),
                    format!("{:.0}", r.observed_held),
                    format!("{:.0}", r.observed_held * sensor_bytes / 1024.0),
                ],
                None => vec![
                    format!("`{o}`"),
                    format!("not measured: {}", err.clone().unwrap_or_default()),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
            });
        }
        rep.table(
            "Observed state: the registry as temperature-delta sees it",
            &format!("{} sensors registered, N = {} readings, `KAPPA_WORKING=local` (so the lookup cost is not hidden behind Redis). Registry req/s = `kappa_observed_requests_total` / processing time; lookup latency = mean of `kappa_observed_request_seconds`; ready = spawn -> `/healthz` 200 of a fresh instance with every sensor registered (elasticity: a stateful replica must bootstrap all of them first); held = `checks.observed.detail.held`; duplicated KiB = held x {:.0} B (mean size of a sensor as `registry.get` returns it).", plan.big, plan.n, sensor_bytes),
            &["observed", "readings/s", "vs relay (2)", "registry req/s", "requests", "lookup ms (mean)", "RSS MiB", "ready s", "held", "duplicated KiB"],
            orows,
        );

        if !qa_rows.is_empty() {
            rep.table("Query API", "Closed loop, 16 concurrent keep-alive clients (reqwest) in this process. The baseline is an in-process axum server answering the hot key's real body as a constant. Latency columns are per request.", &["target", "requests/s", "vs baseline", "latency", "non-2xx"], qa_rows.clone());
        }
        if !e2e_rows.is_empty() {
            rep.table(
                "End to end: reading published -> visible at the query API",
                &format!("Open loop at a fixed rate for {} s over {} sensors round robin, at 10%, 50% and 80% of the pipeline's max throughput: {}. A reading counts as visible when the query API's live feed (`GET /v1/live`, SSE) shows its sensor's view with `source_seq` >= the reading's READINGS sequence. Latency is measured from each reading's *intended* send time (not the actual one), which corrects for coordinated omission. The one-hop baseline (4) is measured at the same rate just before.", plan.e2e_secs, plan.sensors,
                    match e2e_max {
                        Some((max, alone)) => format!("{max:.0} readings/s, measured by publishing N/2 readings as fast as READINGS acks them with temperature-delta (`remote`), view-builder and query-api all running, until view-builder has applied every delta (each service alone, as measured above, would allow {alone:.0}/s: on 2 shared cores the services and the load generator take CPU from one another)"),
                        None => "not measured".into(),
                    }),
                &["load", "e2e latency", "seen/sent", "one hop (4) at same rate", "p99 e2e / one hop", "machine CPU busy"],
                e2e_rows.clone(),
            );
        }
        if !hop_rows.is_empty() {
            rep.table(
                "End to end: where the time goes",
                "A separate open-loop run at 10% and 50% load, with two more core subscriptions in this process (so slightly more load than the runs above). Per reading, p50 / p99 in ms of each hop: *to delta* = intended send -> its delta published by temperature-delta (`thermo.deltas.>`, READINGS stream and the service's batch included); *to view* = delta published -> the sensor's view announced by view-builder (`thermo.views.sensor.>`, DELTAS stream, registry lookup and the Redis script included); *to live* = view announced -> seen on `/v1/live`. Only readings whose own delta and view were both seen count (a batch announces a sensor's latest view only). *Machine CPU busy* is the share of both cores in use while sending (`/proc/stat`), everything included.",
                &["load", "to delta p50 / p99", "to view p50 / p99", "to live p50 / p99", "e2e p50 / p99 (this run)", "readings", "machine CPU busy"],
                hop_rows.clone(),
            );
        }
        {
            let mut rows = Vec::new();
            // Baselines first, then the services in pipeline order.
            let (mut all, rest): (Vec<_>, Vec<_>) = cpu_rows
                .iter()
                .cloned()
                .partition(|(n, _)| n.contains("relay"));
            for w in ["local", "remote", "affinity"] {
                if let Some(r) = find(w, false) {
                    all.push((format!("temperature-delta `{w}`"), r.cpu_us.clone()));
                }
            }
            all.extend(rest);
            for (name, cpu) in &all {
                let get = |k: &str| cpu.iter().find(|(n, _)| *n == k).map(|x| x.1);
                let own = cpu.first().map(|x| x.1);
                let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                let total: f64 = cpu.iter().map(|x| x.1).sum();
                rows.push(vec![
                    name.clone(),
                    f(own),
                    f(get("nats-server")),
                    f(get("redis-server")),
                    format!("{total:.1}"),
                ]);
            }
            if !rows.is_empty() {
                rep.table(
                    "CPU per message: where the time goes",
                    "CPU time (user + system, from `/proc/<pid>/stat`) each process used during the run, divided by the messages it moved. The relays run inside kappa-bench (so their first column is kappa-bench itself); the services are their own processes. On 2 cores, throughput is bounded by the total: a service that adds CPU per message to nats-server's share loses throughput to it.",
                    &["run", "service µs/msg", "nats-server µs/msg", "redis-server µs/msg", "total µs/msg"],
                    rows,
                );
            }
            rep.json("cpu_us_per_msg", json!(all.iter().map(|(n, c)| json!({"run": n, "cpu": c.iter().map(|(k, v)| json!({"process": k, "us": v})).collect::<Vec<_>>()})).collect::<Vec<_>>()));
        }
        if !dag_note.is_empty() {
            rep.note(&format!(
                "view-builder / query-api / end to end: {dag_note}"
            ));
        }

        // Seed trade-off table, measured.
        let obs = |o: &str| obs_all.iter().find(|x| x.0 == o).and_then(|x| x.1.clone());
        let mut seed_obs = Vec::new();
        for o in ["stateful", "stateless", "semi-stateless"] {
            seed_obs.push(match obs(o) {
                Some(r) => vec![
                    format!("`{o}`"),
                    format!("{:.2} s ready", r.ready_secs),
                    format!(
                        "{:.0} KiB ({:.0} entries)",
                        r.observed_held * sensor_bytes / 1024.0,
                        r.observed_held
                    ),
                    format!(
                        "{} readings/s; {} ms/lookup",
                        fmt_rate(r.rate),
                        if r.observed_requests > 0.0 {
                            format!("{:.3}", r.observed_req_mean_ms)
                        } else {
                            "0".into()
                        }
                    ),
                    format!(
                        "{:.0} MiB RSS, {:.0} registry req/s",
                        r.rss_kib as f64 / 1024.0,
                        r.observed_req_per_s
                    ),
                ],
                None => vec![
                    format!("`{o}`"),
                    "not measured".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
            });
        }
        rep.table(
            "Seed trade-off table, measured: observed state",
            &format!("The seed marks these with X / XX / XXX; here are the figures from this run ({} sensors).", plan.big),
            &["option", "elasticity", "duplication", "latency", "resources"],
            seed_obs,
        );
        let mut seed_work = Vec::new();
        for w in ["local", "remote", "affinity"] {
            let a = find(w, false);
            let b = find(w, true);
            seed_work.push(vec![
                format!("`{w}`"),
                a.map(|r| {
                    format!(
                        "{} readings/s ({})",
                        fmt_rate(r.rate),
                        ratio(Some(r.rate), b_relay_v)
                    )
                })
                .unwrap_or_else(|| "not measured".into()),
                a.map(|r| format!("{:.2} ms/reading", 1000.0 / r.rate.max(1e-9)))
                    .unwrap_or_default(),
                b.map(|r| format!("{:.0} MiB RSS", r.rss_kib as f64 / 1024.0))
                    .unwrap_or_default(),
                b.and_then(|r| r.recovery.as_ref())
                    .map(|x| {
                        format!(
                            "{:.2} s (open {:.3} s)",
                            x.caught_up_secs, x.recovery_secs_max
                        )
                    })
                    .unwrap_or_else(|| "not measured".into()),
            ]);
        }
        rep.table(
            "Seed trade-off table, measured: working state",
            &format!("Throughput at {} sensors (ratio to relay 2); latency = processing time per reading at that throughput (1 / rate, 8 partitions in parallel); memory and recovery (kill -9 -> caught up) at {} sensors.", plan.sensors, plan.big),
            &["option", "per-reading throughput", "latency", "memory", "recovery"],
            seed_work,
        );

        rep.json("plan", json!({"mode": plan.name, "readings": plan.n, "sensors": plan.sensors, "big": plan.big, "window_sensors": plan.window_sensors}));
        rep.json(
            "thermometer",
            json!({"median_per_s": thermo, "runs": thermo_rates}),
        );
        rep.json("temperature_delta", json!(results.iter().map(|(c, r)| json!({"case": c, "result": r.as_ref().ok(), "error": r.as_ref().err().map(short)})).collect::<Vec<_>>()));
        rep.json("window", json!(window_rows.iter().map(|(c, r)| json!({"case": c, "result": r.as_ref().ok(), "error": r.as_ref().err().map(short)})).collect::<Vec<_>>()));
        rep.json("observed", json!(observed_rows.iter().map(|(c, r)| json!({"case": c, "result": r.as_ref().ok(), "error": r.as_ref().err().map(short)})).collect::<Vec<_>>()));
        rep.json("sensor_json_bytes", json!(sensor_bytes));
        rep.json("dag", dag.clone());
        rep.json("targets", json!(targets));
        rep.json("total_secs", json!(started.elapsed().as_secs_f64()));
        rep.finish(started.elapsed());
        print!("{}", rep.markdown());
        rep.write(out)?;
        eprintln!(
            "wrote {} and {}",
            out.join("BENCHMARKS.md").display(),
            out.join("benchmarks.json").display()
        );
        Ok(())
    }
}
