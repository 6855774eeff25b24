//! The view side on a real NATS (`NATS_URL`) with a view whose store is process memory, so the
//! runtime's part is tested apart from any Redis: changes become the view with their position,
//! an undecodable change is dead-lettered and still advances the position, a restart opens at
//! the stored position (nothing applied twice), a rebuild from sequence 1 equals the live view
//! and is swapped in, and the live service then writes to the new generation.
//!
//! Uses the stream `VIEWTEST` (deleted first) and the shared `DLQ`. Skipped with a note when
//! `NATS_URL` is not set.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use kappa_runtime::compute::{Context, NoReference, Rejection};
use kappa_runtime::config::Settings;
use kappa_runtime::partition::PartitionedStream;
use kappa_runtime::shutdown::CancellationToken;
use kappa_runtime::view::{
    Announcement, Applied, Batch, Opened, Rebuild, RebuildOptions, Swap, Target, View, ViewService,
};

const STREAM: &str = "VIEWTEST";
const PREFIX: &str = "viewtest.changes";
const SERVICE: &str = "view-test";

#[derive(Debug, Default, Clone, PartialEq)]
struct Generation {
    sums: BTreeMap<String, i64>,
    positions: BTreeMap<u32, u64>,
    /// The input stream identity each position refers to.
    sources: BTreeMap<u32, u64>,
    epochs: BTreeMap<u32, u64>,
    /// How many changes were folded in (a replay would count twice).
    folded: u64,
}

#[derive(Debug, Default)]
struct Memory {
    active: String,
    building: Option<String>,
    next: u64,
    generations: HashMap<String, Generation>,
}

/// Sums of integers per key, in memory: every call is atomic under one lock.
#[derive(Debug, Clone, Default)]
struct Sums(Arc<Mutex<Memory>>);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct MemError(String);

impl Sums {
    fn with<T>(&self, f: impl FnOnce(&mut Memory) -> T) -> Result<T, MemError> {
        let mut m = self.0.lock().map_err(|_| MemError("poisoned".into()))?;
        if m.active.is_empty() {
            m.active = "0".into();
        }
        Ok(f(&mut m))
    }

    fn active(&self) -> Generation {
        self.with(|m| m.generations.get(&m.active).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn resolve(m: &Memory, target: &Target) -> String {
        match target {
            Target::Active => m.active.clone(),
            Target::Generation(g) => g.clone(),
        }
    }
}

impl View for Sums {
    type Change = i64;
    type Reference = NoReference;
    type Error = MemError;

    fn decode(&self, _ctx: &Context<'_>, payload: &[u8]) -> Result<i64, Rejection> {
        serde_json::from_slice(payload)
            .map_err(|e| Rejection::new("malformed").with_detail(e.to_string()))
    }

    async fn open(&self, target: &Target, partition: u32, epoch: u64) -> Result<Opened, MemError> {
        self.with(|m| {
            let g = Self::resolve(m, target);
            let gen_ = m.generations.entry(g).or_default();
            if gen_.epochs.get(&partition).copied().unwrap_or(0) > epoch {
                return Opened::Fenced;
            }
            gen_.epochs.insert(partition, epoch);
            Opened::At {
                position: gen_.positions.get(&partition).copied().unwrap_or(0),
                source: gen_.sources.get(&partition).copied().unwrap_or(0),
            }
        })
    }

    async fn apply(
        &self,
        target: &Target,
        batch: Batch<'_, i64, NoReference>,
    ) -> Result<Applied, MemError> {
        self.with(|m| {
            let g = Self::resolve(m, target);
            let gen_ = m.generations.entry(g).or_default();
            let p = batch.partition;
            if gen_.epochs.get(&p).copied().unwrap_or(0) > batch.epoch {
                return Applied::Fenced;
            }
            let mut stored = gen_.positions.get(&p).copied().unwrap_or(0);
            if gen_.sources.get(&p).is_some_and(|s| *s != batch.source) {
                // Positions of a replaced input stream mean nothing in this one.
                stored = 0;
            }
            if stored < batch.previous {
                return Applied::Lost { stored };
            }
            if stored >= batch.position {
                return Applied::Skipped;
            }
            let mut out = Vec::new();
            for item in batch.items {
                *gen_.sums.entry(item.key.to_string()).or_default() += item.change;
                gen_.folded += 1;
                out.push(Announcement {
                    subject: format!("viewtest.views.{}", item.key),
                    payload: gen_.sums[item.key].to_string().into(),
                });
            }
            gen_.positions.insert(p, batch.position);
            gen_.sources.insert(p, batch.source);
            gen_.epochs.insert(p, batch.epoch);
            Applied::Committed(out)
        })
    }

    async fn begin_rebuild(&self, force: bool) -> Result<String, MemError> {
        self.with(|m| {
            if m.building.is_some() && !force {
                return Err(MemError("another rebuild is running".into()));
            }
            m.next += 1;
            let g = format!("r{}", m.next);
            m.building = Some(g.clone());
            m.generations.insert(g.clone(), Generation::default());
            Ok(g)
        })?
    }

    async fn swap(&self, generation: &str, source: u64) -> Result<Swap, MemError> {
        self.with(|m| {
            let active = m.generations.get(&m.active).cloned().unwrap_or_default();
            let new = m.generations.get(generation).cloned().unwrap_or_default();
            let behind = active.positions.iter().any(|(p, pos)| {
                active.sources.get(p) == Some(&source)
                    && new.positions.get(p).copied().unwrap_or(0) < *pos
            });
            if behind {
                return Swap::Behind {
                    active: m.active.clone(),
                };
            }
            let previous = std::mem::replace(&mut m.active, generation.to_string());
            m.building = None;
            Swap::Swapped { previous }
        })
    }

    async fn abandon(&self, generation: &str) -> Result<(), MemError> {
        self.with(|m| {
            if m.building.as_deref() == Some(generation) {
                m.building = None;
            }
            m.generations.remove(generation);
        })
    }

    async fn drop_generation(&self, generation: &str) -> Result<u64, MemError> {
        self.with(|m| {
            m.generations
                .remove(generation)
                .map_or(0, |g| g.sums.len() as u64)
        })
    }
}

fn settings(nats_url: &str) -> Settings {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s: Settings,
    }
    Cli::parse_from([
        "view-test",
        "--nats-url",
        nats_url,
        "--partitions",
        "2",
        "--ownership",
        "static",
    ])
    .s
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn publish(js: &jetstream::Context, key: &str, body: &str) -> u64 {
    js.publish(format!("{PREFIX}.{key}"), body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("ack")
        .sequence
}

fn start(view: &Sums, nats_url: &str) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let service = ViewService::new(SERVICE, view.clone(), settings(nats_url))
        .input(STREAM, PREFIX)
        .run(token.clone());
    let handle = tokio::spawn(async move { service.await.expect("view service") });
    (token, handle)
}

async fn stop(token: CancellationToken, handle: tokio::task::JoinHandle<()>) {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("stops on its token")
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_keeps_its_position_dead_letters_and_rebuilds() {
    let Some((client, js)) = kappa_testkit::clients::nats_from_env("view").await else {
        return;
    };
    let nats_url = std::env::var("NATS_URL").expect("set, or the test was skipped");
    let _ = js.delete_stream(STREAM).await;
    let mut input = PartitionedStream {
        stream: STREAM.into(),
        prefix: PREFIX.into(),
        partitions: 2,
    };
    input.declare(&js).await.expect("stream");
    let mut announced = client.subscribe("viewtest.views.>").await.expect("sub");

    let view = Sums::default();
    let (token, handle) = start(&view, &nats_url);
    for (k, v) in [("a", "1"), ("b", "2"), ("a", "3")] {
        publish(&js, k, v).await;
    }
    let bad = publish(&js, "c", "not a number").await;
    let last = publish(&js, "b", "4").await;
    eventually("the live view", || {
        let g = view.active();
        g.sums.get("a") == Some(&4) && g.sums.get("b") == Some(&6)
    })
    .await;
    let g = view.active();
    assert!(!g.sums.contains_key("c"));
    assert_eq!(g.folded, 4);
    // Each partition's position is its last input, the undecodable one included.
    assert_eq!(g.positions.values().max().copied(), Some(last));
    assert!(g.positions.values().all(|p| *p >= 1));
    let first = tokio::time::timeout(Duration::from_secs(5), announced.next())
        .await
        .expect("an announcement")
        .expect("message");
    assert!(first.subject.starts_with("viewtest.views."));

    // The undecodable change is a dead letter with its reason and source.
    let dlq = js
        .get_stream(kappa_runtime::dlq::STREAM)
        .await
        .expect("dlq");
    let dead = dlq
        .direct_get_last_for_subject(format!("kappa.dlq.{SERVICE}.c"))
        .await
        .expect("dead letter");
    assert_eq!(
        dead.headers
            .get(kappa_runtime::dlq::REASON_HEADER)
            .map(|v| v.as_str()),
        Some("malformed")
    );
    assert_eq!(
        dead.headers
            .get(kappa_runtime::changelog::SOURCE_SEQ_HEADER)
            .map(|v| v.as_str().to_string()),
        Some(bad.to_string())
    );

    // A restart opens each partition at its stored position: nothing is folded twice.
    stop(token, handle).await;
    let (token, handle) = start(&view, &nats_url);
    publish(&js, "a", "10").await;
    eventually("the change after the restart", || {
        view.active().sums.get("a") == Some(&14)
    })
    .await;
    assert_eq!(view.active().folded, 5);

    // A rebuild from sequence 1 into a fresh generation equals the live view and is swapped in.
    let before = view.active();
    let rebuild = Rebuild::begin(
        &js,
        view.clone(),
        input.clone(),
        RebuildOptions {
            grace: Duration::ZERO,
            force: false,
            stall: Duration::from_secs(10),
            batch: 2,
        },
    )
    .await
    .expect("begin");
    let generation = rebuild.generation().to_string();
    assert!(
        Rebuild::begin(
            &js,
            view.clone(),
            input.clone(),
            RebuildOptions {
                grace: Duration::ZERO,
                force: false,
                stall: Duration::from_secs(1),
                batch: 2,
            },
        )
        .await
        .is_err(),
        "a second rebuild is refused while one runs"
    );
    let report = rebuild.finish().await.expect("rebuild");
    assert_eq!(report.generation, generation);
    assert_eq!(report.previous, "0");
    assert_eq!((report.applied, report.skipped), (5, 1));
    let after = view.active();
    assert_eq!(after.sums, before.sums);
    assert_eq!(after.positions, before.positions);
    assert!(
        view.with(|m| !m.generations.contains_key("0"))
            .expect("mem")
    );

    // The live service writes to the new active generation.
    publish(&js, "b", "1").await;
    eventually("the change after the swap", || {
        view.active().sums.get("b") == Some(&7)
    })
    .await;
    stop(token, handle).await;
    let _ = js.delete_stream(STREAM).await;
}
