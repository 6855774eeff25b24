//! Registry updates racing: two sensor-registry instances, rounds of concurrent upserts of one
//! sensor with the same `expected_version` and different content. Exactly one may win each
//! version, what it was told it stored must be what the `SENSORS` stream holds (no lost
//! update), and every instance must then serve what the stream holds. [`registry_race`] runs
//! it and counts each kind of failure (tests/registry.rs asserts them; the fault matrix
//! records them).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Dag, read_stream, ready, wait_until};

/// The sensor the race upserts.
pub const SENSOR: &str = "race-1";

/// What a race found.
#[derive(Debug, Default, Clone)]
pub struct RaceOutcome {
    /// Upserts sent (including the first, uncontested one).
    pub upserts: u64,
    /// Versions answered `ok` more than once: the answers beyond the first.
    pub doubled: u64,
    /// Upserts answered `ok` whose content is not the stored change of their version (a lost
    /// update).
    pub lost: u64,
    /// Answers of `registry.get` that differ from the last stored change, once settled.
    pub wrong: u64,
    /// What each lost update was told and what is stored (the first few).
    pub lost_detail: Vec<String>,
    /// Rounds no upsert won.
    pub rounds_without_winner: u64,
    /// Refusals by error text (a refusal is never wrong here).
    pub refusals: BTreeMap<String, u32>,
}

async fn upsert(client: &async_nats::Client, body: serde_json::Value) -> serde_json::Value {
    for _ in 0..20 {
        if let Ok(Ok(m)) = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("registry.cmd.upsert", body.to_string().into()),
        )
        .await
        {
            return serde_json::from_slice(&m.payload).expect("reply json");
        }
    }
    panic!("registry did not answer {body}");
}

/// Every stored change of [`SENSOR`] in `SENSORS`, by version (the last one last).
async fn stored(js: &async_nats::jetstream::Context) -> Vec<serde_json::Value> {
    let subject = format!("registry.sensors.{SENSOR}");
    read_stream(js, "SENSORS")
        .await
        .into_iter()
        .filter(|m| m.subject == subject)
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect()
}

/// True when `change` (as stored) carries the content of `body` (as sent). Offsets are compared
/// to within 1e-6: serde_json's default float parsing may be one ulp off (3.9099999999999997
/// sent, 3.91 stored), which is not a lost update.
fn same_content(change: &serde_json::Value, body: &serde_json::Value) -> bool {
    let offset = |v: &serde_json::Value| v["calibration_offset"].as_f64().unwrap_or(f64::NAN);
    ["site", "window_secs"]
        .iter()
        .all(|k| change[*k] == body[*k])
        && (offset(change) - offset(body)).abs() < 1e-6
}

/// Starts a second sensor-registry beside `dag`'s, registers [`SENSOR`], then runs `rounds`
/// rounds of `tasks` concurrent upserts with the same expected version and different content,
/// each round once both instances serve the previous round's version. Panics only when the
/// harness cannot go on (no answer, instances never agreeing on a version).
pub async fn registry_race(dag: &Dag, rounds: u64, tasks: u64) -> RaceOutcome {
    let mut second = dag.spawn("sensor-registry", &[]);
    ready(&mut second).await;
    let (c, js) = (&dag.client, &dag.js);
    let mut out = RaceOutcome::default();

    let first_body = serde_json::json!({"sensor_id": SENSOR, "site": "lab", "calibration_offset": 0.0,
        "window_secs": 600, "expected_version": 0});
    let first = upsert(c, first_body.clone()).await;
    out.upserts += 1;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["version"], 1, "{first}");

    let mut winners: BTreeMap<u64, Vec<serde_json::Value>> = BTreeMap::new();
    winners.insert(1, vec![first_body]);
    let mut version = 1u64;
    for round in 1..=rounds {
        // Both instances must know the current version before the round starts (they follow
        // each other's changes through the stream), so both accept the expected version.
        let settled = wait_until(Duration::from_secs(10), || async {
            let mut ok = 0;
            for _ in 0..8 {
                if let Ok(Ok(m)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    c.request(format!("registry.get.{SENSOR}"), "".into()),
                )
                .await
                {
                    let v: serde_json::Value =
                        serde_json::from_slice(&m.payload).expect("get json");
                    if v["version"] == version {
                        ok += 1;
                    }
                }
            }
            ok == 8
        })
        .await;
        assert!(
            settled,
            "round {round}: instances never agreed on version {version}"
        );
        let replies = futures::future::join_all((0..tasks).map(|task| {
            let c = c.clone();
            async move {
                // Different in every round and task, within the registry's ±50.
                let offset = (round % 400) as f64 / 10.0 + task as f64 / 100.0;
                let body = serde_json::json!({"sensor_id": SENSOR, "site": format!("site-{task}"),
                    "calibration_offset": offset, "window_secs": 600 + task,
                    "expected_version": version});
                (body.clone(), upsert(&c, body).await)
            }
        }))
        .await;
        out.upserts += tasks;
        let mut won = false;
        for (body, reply) in replies {
            if reply["ok"] == true {
                let v = reply["version"].as_u64().expect("version");
                winners.entry(v).or_default().push(body);
                version = version.max(v);
                won = true;
            } else {
                // A refusal is never wrong here (a conflict, or the registry unable to decide
                // in time); only a second winner, or serving what is not stored, is.
                let err = reply["error"].as_str().unwrap_or_default().to_string();
                *out.refusals.entry(err).or_insert(0u32) += 1;
            }
        }
        if !won {
            out.rounds_without_winner += 1;
        }
    }

    let changes = stored(js).await;
    let by_version: BTreeMap<u64, &serde_json::Value> = changes
        .iter()
        .filter_map(|c| Some((c["version"].as_u64()?, c)))
        .collect();
    for (v, bodies) in &winners {
        out.doubled += bodies.len().saturating_sub(1) as u64;
        for b in bodies {
            let stored = by_version.get(v);
            if !stored.is_some_and(|c| same_content(c, b)) {
                out.lost += 1;
                if out.lost_detail.len() < 5 {
                    out.lost_detail.push(format!(
                        "version {v}: answered ok for {b}, stored {stored:?}"
                    ));
                }
            }
        }
    }

    // Every answer of either instance (requests are spread over the queue group at random)
    // equals the last change stored; 40 equal answers in a row.
    let last = changes.last().cloned().unwrap_or_default();
    let wrong = std::sync::Mutex::new(0u64);
    wait_until(Duration::from_secs(10), || async {
        let mut n = 0;
        for _ in 0..40 {
            let m = c
                .request(format!("registry.get.{SENSOR}"), "".into())
                .await
                .expect("get");
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("get json");
            if v != last {
                n += 1;
            }
        }
        *wrong.lock().expect("lock") = n;
        n == 0
    })
    .await;
    out.wrong = *wrong.lock().expect("lock");
    drop(second);
    out
}
