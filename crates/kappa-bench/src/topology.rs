//! `kappa-bench topology`: what users and permissions, and a 3-node cluster with every stream
//! replicated three times, cost. The same measurements on one nats-server without users (the
//! baseline, what the other tables run), on one with the users and permissions of
//! docker/nats/permissions.conf (each service its own user), and on three nats-servers in one
//! JetStream cluster (`KAPPA_REPLICAS=3`), alternated round by round in one run so that a
//! moment of load on the shared machine hits all three; each figure is the median of its
//! rounds, quoted with its ratio to the baseline.
//!
//! It writes its table as a section of `BENCHMARKS.md` (between `<!-- section:topology -->`
//! markers; `all` keeps it) and the key `topology` of `benchmarks.json`. All three nodes run
//! on this one machine: the cluster figures show the cost of replication (three copies, a
//! quorum per write), not what three machines would give.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::baseline::{self, Lat};
use crate::durability::write_section;
use crate::infra::{Servers, Topology, version_of};
use crate::report::{fmt_lat, fmt_rate, ratio};
use crate::services::{self, Ctx, TdCase};

/// The section's name in `BENCHMARKS.md`.
pub const SECTION: &str = "topology";

const LAYOUTS: [Topology; 3] = [
    Topology::OneNode,
    Topology::OneNodeUsers,
    Topology::ThreeNodes,
];

/// A throughput figure of a round, by name.
type RateOf = (&'static str, fn(&Round) -> Option<f64>);

/// One round's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Round {
    thermometer_per_s: Option<f64>,
    td_remote_per_s: Option<f64>,
    one_hop: Option<Lat>,
    errors: Vec<String>,
}

async fn round(
    dir: &Path,
    bin_dir: &Path,
    t: Topology,
    (n, sensors): (u64, u64),
    (hop_rate, hop_secs): (f64, f64),
) -> anyhow::Result<Round> {
    let servers = Servers::start_topology(dir, t).await?;
    let replicas = servers.replicas();
    let mut ctx = Ctx::new(servers, bin_dir.to_path_buf()).await?;
    let mut r = Round::default();
    ctx.start_registry().await?;
    let case = TdCase::drain("remote", "semi-stateless", sensors, n);
    match services::temperature_delta(&ctx, &case).await {
        Ok((td, p)) => {
            r.thermometer_per_s = Some(td.prefill_rate);
            r.td_remote_per_s = Some(td.rate);
            if let Some(mut p) = p {
                p.terminate(Duration::from_secs(10));
            }
        }
        Err(e) => r
            .errors
            .push(format!("temperature-delta: {}", crate::short(&e))),
    }
    match baseline::one_hop_replicated(&ctx.js, hop_rate, hop_secs, replicas).await {
        Ok(l) => r.one_hop = Some(l),
        Err(e) => r.errors.push(format!("one hop: {}", crate::short(&e))),
    }
    drop(ctx);
    let _ = std::fs::remove_dir_all(dir);
    Ok(r)
}

fn label(t: Topology) -> &'static str {
    match t {
        Topology::OneNode => "one node, no users, R1 (baseline)",
        Topology::OneNodeUsers => "one node, per-service users, R1",
        Topology::ThreeNodes => "3-node cluster, R3",
    }
}

/// Runs the rounds and writes the section.
pub async fn run(
    root: &Path,
    bin_dir: PathBuf,
    out: PathBuf,
    readings: Option<u64>,
    command: String,
) -> anyhow::Result<()> {
    use crate::rounds::ROUNDS;
    let n = readings.unwrap_or(20_000);
    let sensors = 1_000;
    let hop = (500.0, 5.0);
    let tmp = root.join(format!("target/bench-tmp/{}", std::process::id()));
    let started = Instant::now();
    let rr = crate::rounds::alternate(
        "topology",
        &LAYOUTS,
        ROUNDS,
        |t| label(t).to_string(),
        async |i, t| {
            let dir = tmp.join(format!("{t:?}-{i}").to_lowercase());
            let r = round(&dir, &bin_dir, t, (n, sensors), hop)
                .await
                .unwrap_or_else(|e| Round {
                    errors: vec![crate::short(&e)],
                    ..Default::default()
                });
            eprintln!(
                "  thermometer {:?}/s, temperature-delta {:?}/s, one hop p99 {:?} ms {:?}",
                r.thermometer_per_s.map(f64::round),
                r.td_remote_per_s.map(f64::round),
                r.one_hop.map(|l| l.p99_ms),
                r.errors
            );
            r
        },
    )
    .await;
    let rounds = &rr.runs;
    let of = |t: Topology| rr.of(t);
    let rate = |t: Topology, f: fn(&Round) -> Option<f64>| rr.median(t, f);
    let hop_of = |t: Topology| {
        let mut v: Vec<Lat> = of(t).filter_map(|r| r.one_hop).collect();
        v.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
        v.get(v.len() / 2).copied()
    };
    let [base, users, three] = LAYOUTS;
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut json_rows = Vec::new();
    let rates: [RateOf; 2] = [
        (
            "thermometer publishing readings into READINGS (readings/s)",
            |r| r.thermometer_per_s,
        ),
        (
            "temperature-delta `remote` draining them (readings/s)",
            |r| r.td_remote_per_s,
        ),
    ];
    for (name, f) in rates {
        let v: Vec<Option<f64>> = LAYOUTS.iter().map(|t| rate(*t, f)).collect();
        let mut row = vec![name.to_string()];
        row.extend(
            v.iter()
                .map(|x| x.map(fmt_rate).unwrap_or_else(|| "not measured".into())),
        );
        row.push(ratio(rate(users, f), rate(base, f)));
        row.push(ratio(rate(three, f), rate(base, f)));
        rows.push(row);
        json_rows.push(
            json!({"measure": name, "one_node": v[0], "users": v[1], "three_nodes_r3": v[2]}),
        );
    }
    let hops: Vec<Option<Lat>> = LAYOUTS.iter().map(|t| hop_of(*t)).collect();
    let mut row = vec![format!(
        "one hop publish -> pull consumer at {} msgs/s",
        hop.0
    )];
    row.extend(hops.iter().map(|l| {
        l.as_ref()
            .map(fmt_lat)
            .unwrap_or_else(|| "not measured".into())
    }));
    let p99 = |l: &Option<Lat>| l.map(|l| l.p99_ms);
    row.push(format!("p99 {}", ratio(p99(&hops[1]), p99(&hops[0]))));
    row.push(format!("p99 {}", ratio(p99(&hops[2]), p99(&hops[0]))));
    rows.push(row);
    json_rows.push(json!({"measure": "one hop", "one_node": hops[0], "users": hops[1], "three_nodes_r3": hops[2]}));
    let errors: Vec<String> = rounds
        .iter()
        .flat_map(|(t, r)| r.errors.iter().map(move |e| format!("{}: {e}", label(*t))))
        .collect();
    let (date, nproc) = crate::report::stamp();
    let mut body = String::new();
    body.push_str("## Users and a 3-node cluster: what they cost\n\n");
    body.push_str(&format!(
        "Generated by `{command}` on {date} ({nproc} CPUs, shared; {}), separately from the \
         tables above. Fresh servers for every round; {ROUNDS} rounds of each layout, \
         alternated; each figure is the median of its rounds. N = {n} readings over {sensors} \
         sensors; temperature-delta runs `remote`. *Users*: docker/nats/permissions.conf, every \
         service connecting as its own user (every publish checked against its permissions). \
         *3-node cluster*: three nats-servers **on this same machine**, every stream and bucket \
         R3 (`KAPPA_REPLICAS=3`): the cost of three copies and a quorum per write, not what \
         three machines would give. Ratios are to the one-node baseline (below 1 for \
         throughput, above 1 for latency: the cost). This run took {:.0} s.\n\n",
        version_of("nats-server", "--version"),
        started.elapsed().as_secs_f64()
    ));
    body.push_str(&format!(
        "| measure | {} | {} | {} | users / baseline | R3 / baseline |\n| --- | --- | --- | --- | --- | --- |\n",
        label(base),
        label(users),
        label(three)
    ));
    for r in &rows {
        body.push_str(&format!(
            "| {} |\n",
            r.iter()
                .map(|c| c.replace('|', "\\|"))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    body.push('\n');
    if !errors.is_empty() {
        body.push_str(&format!(
            "> Not measured in some rounds: {}\n\n",
            errors.join("; ")
        ));
    }
    body.push_str(
        "Reproduce: `cargo build --release --bins && cargo run --release -p kappa-bench -- topology` \
         (`--readings N` to change N; writes only this section of BENCHMARKS.md and the key \
         `topology` of benchmarks.json).\n\n",
    );
    write_section(
        &out,
        SECTION,
        &body,
        json!({"date": date, "command": command, "readings": n, "sensors": sensors,
            "rows": json_rows,
            "rounds": rounds.iter().map(|(t, r)| json!({"layout": t, "round": r})).collect::<Vec<_>>()}),
    )?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
