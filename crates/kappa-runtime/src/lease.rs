//! Partition ownership among cooperating instances, with NATS as the only coordinator.
//!
//! A JetStream KV bucket per service (`KAPPA_LEASES_<SERVICE>`, `max_age` = lease TTL) holds:
//! - `m.<instance>`: membership heartbeats, re-put every tick; a dead instance's key expires;
//! - `p.<partition>`: the partition's lease, created with `create` (only if absent) and renewed
//!   with `update` against the last revision (compare-and-set), so exactly one instance holds
//!   it at a time. The partition's *epoch* is the bucket's creation time (high 32 bits) plus
//!   the KV revision at acquisition: it only grows, even across a re-created bucket, and the
//!   working-state store refuses commits of an older epoch (fencing).
//!
//! Every instance computes the same fair assignment from the sorted live members (partition
//! `p` goes to member `p mod n`), takes the partitions assigned to it once they are free, and
//! gives up the ones assigned to someone else (drain, then delete its lease). On SIGTERM it
//! releases everything at once; after a crash, its leases expire after the TTL.
//!
//! On a replicated bucket (`KAPPA_REPLICAS` > 1) every read that decides ownership (who holds a
//! lease, which members are alive) goes to the bucket's stream leader (`STREAM.MSG.GET`), never
//! a direct get, which any replica answers and a lagging one answers with the past. Writes are
//! compare-and-set at the leader; a conflict (JetStream error 10071, or 10164 which async-nats
//! 0.51 does not map to a wrong-last-sequence error) means someone else wrote first.
//!
//! A crashed owner is found at once, not after its leases expire: every instance answers
//! liveness probes on `kappa.alive.<service>.<instance>` (core NATS), and each listing probes
//! the other members. A member for which the server has *no subscriber at all* (no responders,
//! twice, `GONE_CONFIRM` apart) has lost its connection: its process died (kill -9 closes its
//! socket) or its server lost it. It is dropped from the plan at once, its membership key is
//! deleted, and its leases are taken over against their last revision. A member that is stopped,
//! slow or cut off but still connected keeps its subscription, so its probe times out instead and
//! it keeps its leases until they expire: only a disconnected member is taken from. Taking over
//! early is safe for the same reason a successor after an expiry is: the new epoch fences the
//! working state, and the change log's compare-and-set fences every append.
//!
//! What is still owned is never released because a read failed: a failed membership listing
//! keeps the previous plan (`kappa_lease_listing_failures_total`). Renewals never wait for a
//! partition to drain. And every partition carries a [`LeaseDeadline`] that each successful
//! renewal moves forward: the partition stops by itself when it passes (self-fencing), before
//! its lease can have expired, so a paused or cut-off owner stops before a successor starts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use crate::RuntimeError;
use crate::shutdown::CancellationToken;

/// Settings of the lease keeper.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Service name (bucket name suffix).
    pub service: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Lease time-to-live: a crashed owner's partitions move after at most this (+ one tick).
    pub ttl: Duration,
    /// Replicas of the bucket (`KAPPA_REPLICAS`); an existing bucket with another count is
    /// refused.
    pub replicas: usize,
    /// Standbys per partition (`KAPPA_STANDBYS`): this instance stands by for the partitions
    /// whose owner is one of the `standbys` members before it in the sorted live list.
    pub standbys: u32,
    /// Where the keeper writes the partitions this instance stands by for (none it owns),
    /// after every complete membership listing.
    pub standby_for: std::sync::Arc<std::sync::RwLock<BTreeSet<u32>>>,
}

/// A partition this instance now owns.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The partition.
    pub partition: u32,
    /// Fencing epoch (KV revision at acquisition).
    pub epoch: u64,
    /// Cancelled when the partition must stop (handover, lost lease, shutdown).
    pub stop: CancellationToken,
    /// Until when this instance may still process the partition; moved forward by every
    /// successful renewal (see [`LeaseDeadline`]).
    pub lease: LeaseDeadline,
}

/// Until when an owner may process a partition: the time of the last successful renewal
/// *request* (or acquisition) plus the lease TTL minus a safety margin of a fifth of the TTL.
///
/// The lease key expires on the server one TTL after it *stored* the renewal, which is after
/// the request left, so an owner that stops at this deadline stops before any successor can
/// take the lease, whatever delayed it (a SIGSTOP, a long pause, a partition from NATS): the
/// monotonic clock keeps running while a process is stopped. The margin is the time a batch
/// started just before the deadline has to finish its commit in. Static assignment has no deadline.
#[derive(Debug, Clone)]
pub struct LeaseDeadline(Option<watch::Receiver<Instant>>);

impl LeaseDeadline {
    /// No deadline (static assignment, epoch 0).
    pub fn unbounded() -> Self {
        Self(None)
    }

    /// A deadline at `at`, and its sender for the keeper to move it.
    pub fn starting_at(at: Instant) -> (watch::Sender<Instant>, Self) {
        let (tx, rx) = watch::channel(at);
        (tx, Self(Some(rx)))
    }

    /// True once the deadline has passed: the partition must not start a batch or commit.
    pub fn expired(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|rx| Instant::now() >= *rx.borrow())
    }

    /// Time left before the deadline (`None`: no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.0
            .as_ref()
            .map(|rx| rx.borrow().saturating_duration_since(Instant::now()))
    }
}

/// How often an instance probes the other members between ticks (a crashed owner's partitions
/// move within about this, plus [`GONE_CONFIRM`] and the successor's recovery).
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// The second look before a member without responders is taken as gone (a reconnecting client
/// has its subscriptions back within milliseconds).
const GONE_CONFIRM: Duration = Duration::from_millis(100);
/// Time a liveness probe may take; a slow answer (or none) means alive.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The subject `member` of `service` answers liveness probes on.
fn alive_subject(service: &str, member: &str) -> String {
    format!("kappa.alive.{service}.{member}")
}

/// Whether the server has no subscriber for `member`'s liveness subject: `Some(true)` if it
/// said so (no responders), `Some(false)` if someone answered or the probe timed out (a member
/// that is stopped or slow is alive), `None` if the probe could not be sent.
async fn disconnected(client: &async_nats::Client, service: &str, member: &str) -> Option<bool> {
    let probe = client.request(alive_subject(service, member), Bytes::new());
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(_)) | Err(_) => Some(false),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Some(true),
        Ok(Err(_)) => None,
    }
}

/// The members among `others` that are gone: disconnected at two probes [`GONE_CONFIRM`] apart.
async fn gone_members<'a>(
    client: &async_nats::Client,
    service: &str,
    others: impl Iterator<Item = &'a String>,
) -> BTreeSet<String> {
    let first = futures::future::join_all(
        others.map(|m| async move { (m, disconnected(client, service, m).await == Some(true)) }),
    )
    .await;
    let suspects: Vec<&String> = first
        .into_iter()
        .filter(|(_, d)| *d)
        .map(|(m, _)| m)
        .collect();
    if suspects.is_empty() {
        return BTreeSet::new();
    }
    tokio::time::sleep(GONE_CONFIRM).await;
    let second = futures::future::join_all(
        suspects
            .into_iter()
            .map(|m| async move { (m, disconnected(client, service, m).await == Some(true)) }),
    )
    .await;
    second
        .into_iter()
        .filter(|(_, d)| *d)
        .map(|(m, _)| m.clone())
        .collect()
}

/// How far before the lease's expiry an owner stops on its own: a fifth of the TTL (1.2 s
/// with the default 6 s). The engine checks the deadline right before it commits, so the
/// margin has to cover one commit and the server's expiry timing, not a whole batch; a wider
/// one (a third) made owners on a loaded machine (load 14 on 2 cores) stop partitions they
/// still held whenever a renewal came 2 s late with a 3 s TTL.
fn safety_margin(ttl: Duration) -> Duration {
    ttl / 5
}

/// Where a held partition is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Processing; its lease is renewed.
    Running,
    /// Stopped (handed over, or shutdown) and draining; its lease is still renewed so its
    /// other partitions' renewals never wait for it, and deleted once the task ends.
    Releasing,
    /// Its lease was lost: not renewed, not deleted; forgotten once the task ends.
    Lost,
}

struct Held {
    revision: u64,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    phase: Phase,
    deadline: watch::Sender<Instant>,
}

/// Unique id of this instance.
pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{clean}-{}-{nanos:x}", std::process::id())
}

/// The live members: subjects `m.*` of the bucket (one stream-info request, no consumer),
/// minus those whose last operation was a delete. Any failed read is an error, never an
/// empty or partial set: a partial set would re-plan and hand over partitions still owned.
async fn list_members(
    js: &jetstream::Context,
    bucket: &str,
    store: &kv::Store,
) -> Result<BTreeSet<String>, RuntimeError> {
    let stream = js
        .get_stream_no_info(format!("KV_{bucket}"))
        .await
        .map_err(RuntimeError::js)?;
    let prefix = format!("$KV.{bucket}.m.");
    let subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(RuntimeError::js)?;
    let names: Vec<Result<String, String>> = subjects
        .map(|r| r.map(|(subject, _)| subject).map_err(|e| e.to_string()))
        .collect()
        .await;
    let mut out = BTreeSet::new();
    for subject in names {
        let subject = subject.map_err(RuntimeError::JetStream)?;
        let Some(member) = subject.strip_prefix(&prefix) else {
            continue;
        };
        if leader_entry(store, &format!("m.{member}"))
            .await?
            .is_some_and(|e| e.alive)
        {
            out.insert(member.to_string());
        }
    }
    Ok(out)
}

/// Which partitions `me` should own, given the live members.
pub fn fair_share(members: &BTreeSet<String>, me: &str, partitions: u32) -> BTreeSet<u32> {
    let Some(idx) = members.iter().position(|m| m == me) else {
        return BTreeSet::new();
    };
    let n = members.len() as u32;
    (0..partitions).filter(|p| p % n == idx as u32).collect()
}

/// Which partitions `me` stands by for, given the live members: those owned (by
/// [`fair_share`]) by one of the `standbys` members before `me` in the sorted list, wrapping
/// around. Never one `me` owns; empty with fewer than two members or no standbys.
pub fn standby_share(
    members: &BTreeSet<String>,
    me: &str,
    partitions: u32,
    standbys: u32,
) -> BTreeSet<u32> {
    let Some(idx) = members.iter().position(|m| m == me) else {
        return BTreeSet::new();
    };
    let n = members.len() as u32;
    let idx = idx as u32;
    let k = standbys.min(n.saturating_sub(1));
    (0..partitions)
        .filter(|p| {
            let owner = p % n;
            (1..=k).any(|d| (owner + d) % n == idx)
        })
        .collect()
}

/// What to own after one membership listing: the fair share when the listing is complete and
/// names `me`; otherwise (the listing failed, or misses `me`, whose heartbeat is alive) the
/// `previous` plan, or what is `held` before any plan. A failed read never releases anything.
fn plan(
    listing: Result<&BTreeSet<String>, &RuntimeError>,
    me: &str,
    partitions: u32,
    previous: Option<&BTreeSet<u32>>,
    held: &BTreeSet<u32>,
) -> BTreeSet<u32> {
    match listing {
        Ok(members) if members.contains(me) => fair_share(members, me, partitions),
        _ => previous.unwrap_or(held).clone(),
    }
}

/// Keeps this instance's share of partitions; `start` runs a partition for a grant and
/// returns when its `stop` token is cancelled and the partition is drained.
///
/// Renewals never wait for a drain: a partition handed over (or stopped by shutdown) keeps its
/// lease renewed while its task finishes, and its lease is deleted once it has.
pub async fn keep<F>(
    js: jetstream::Context,
    cfg: LeaseConfig,
    shutdown: CancellationToken,
    owned_gauge: std::sync::Arc<std::sync::RwLock<BTreeSet<u32>>>,
    start: F,
) -> Result<(), RuntimeError>
where
    F: Fn(Grant) -> tokio::task::JoinHandle<()>,
{
    let bucket = format!(
        "KAPPA_LEASES_{}",
        cfg.service.to_uppercase().replace(['-', '.'], "_")
    );
    if let Ok(mut existing) = js.get_stream(format!("KV_{bucket}")).await {
        let info = existing.info().await.map_err(RuntimeError::js)?;
        let replicas = info.config.num_replicas.max(1);
        if replicas != cfg.replicas.max(1) {
            return Err(crate::nats::replicas_differ(
                &format!("KV_{bucket}"),
                replicas,
                cfg.replicas,
            ));
        }
    }
    let config = kv::Config {
        bucket: bucket.clone(),
        history: 1,
        max_age: cfg.ttl,
        num_replicas: cfg.replicas.max(1),
        ..Default::default()
    };
    // Instances starting together create the bucket together: see `retry_timeouts`.
    let store = crate::nats::retry_timeouts(|| js.create_or_update_key_value(config.clone()))
        .await
        .map_err(|e| RuntimeError::JetStream(format!("lease bucket {bucket}: {e}")))?;
    // Epochs must keep growing even if the bucket is deleted and created again (its revisions
    // restart at 1): the bucket's creation time is the high half, the revision the low half.
    let created = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(RuntimeError::js)?
        .info()
        .await
        .map_err(RuntimeError::js)?
        .created
        .unix_timestamp();
    let epoch_base = u64::try_from(created).unwrap_or(0) << 32;
    let me = instance_id();
    let member_key = format!("m.{me}");
    let mut watch = store.watch_all().await.map_err(RuntimeError::js)?;
    // Answer liveness probes while this keeper runs (see the module docs).
    let client = js.client();
    let service_token = cfg.service.replace('.', "_");
    let mut alive = client
        .subscribe(alive_subject(&service_token, &me))
        .await
        .map_err(|e| RuntimeError::Nats(format!("liveness subscription: {e}")))?;
    let answering = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(m) = alive.next().await {
                if let Some(to) = m.reply {
                    let _ = client.publish(to, Bytes::from_static(b"alive")).await;
                }
            }
        })
    };
    let mut gone: BTreeSet<String> = BTreeSet::new();
    let tick = (cfg.ttl / 4).max(Duration::from_millis(200));
    let valid_for = cfg.ttl.saturating_sub(safety_margin(cfg.ttl));
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut last_plan: Option<BTreeSet<u32>> = None;
    let mut draining = false;
    let mut next_tick = tokio::time::Instant::now();
    tracing::info!(instance = %me, bucket = %bucket, ttl_secs = cfg.ttl.as_secs_f64(), "joining");
    loop {
        if shutdown.is_cancelled() && !draining {
            // Drain and hand everything over at once, renewing until each task has ended.
            draining = true;
            for h in held.values_mut() {
                h.stop.cancel();
                if h.phase == Phase::Running {
                    h.phase = Phase::Releasing;
                }
            }
        }
        // Partitions whose task ended: free their lease for the others (unless it was lost).
        let finished: Vec<u32> = held
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in finished {
            let Some(h) = held.remove(&p) else { continue };
            if h.phase == Phase::Lost {
                continue;
            }
            // Only if it is still ours: never delete a successor's lease.
            let freed = store
                .delete_expect_revision(format!("p.{p}"), Some(h.revision))
                .await;
            match (h.phase, freed) {
                (Phase::Releasing, Ok(())) => {
                    tracing::info!(partition = p, "partition handed over")
                }
                (_, Ok(())) => {
                    tracing::info!(partition = p, "partition stopped by itself; lease freed")
                }
                (_, Err(e)) => tracing::info!(partition = p, error = %e,
                    "partition stopped; its lease was no longer ours (or could not be deleted: it expires)"),
            }
        }
        if draining && held.is_empty() {
            break;
        }

        // Heartbeat and renewals run on the tick only; a wake-up by the watch just re-plans.
        let due = tokio::time::Instant::now() >= next_tick;
        if due {
            next_tick = tokio::time::Instant::now() + tick;
            // All at once: one slow answer must not delay the other leases' renewals.
            let renewals = held
                .iter_mut()
                .filter(|(_, h)| h.phase != Phase::Lost)
                .map(|(&p, h)| renew(&store, &me, p, h, valid_for));
            futures::future::join_all(renewals).await;
            if let Err(e) = store.put(&member_key, Bytes::from_static(b"alive")).await {
                tracing::warn!(error = %e, "membership heartbeat failed");
            }
        }
        let members = if draining {
            None
        } else {
            let mut listed = list_members(&js, &bucket, &store).await;
            if let Ok(m) = &mut listed {
                gone = gone_members(&client, &service_token, m.iter().filter(|x| **x != me)).await;
                for g in &gone {
                    tracing::warn!(member = %g,
                        "member disconnected (no subscriber for its liveness probe); taking its share now");
                    metrics::counter!("kappa_members_gone_total").increment(1);
                    m.remove(g);
                    // Others see it at once (their watch wakes); a member that was only
                    // reconnecting puts its key back with its next heartbeat.
                    let _ = store.delete(format!("m.{g}")).await;
                }
            }
            match &listed {
                Ok(m) if !m.contains(&me) && !held.is_empty() => {
                    tracing::warn!(
                        members = m.len(),
                        "membership listing misses this instance; keeping the previous plan"
                    );
                    metrics::counter!("kappa_lease_listing_failures_total").increment(1);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "listing members failed; keeping the previous plan");
                    metrics::counter!("kappa_lease_listing_failures_total").increment(1);
                }
            }
            let owned: BTreeSet<u32> = held.keys().copied().collect();
            let desired = plan(
                listed.as_ref(),
                &me,
                cfg.partitions,
                last_plan.as_ref(),
                &owned,
            );
            last_plan = Some(desired.clone());
            if let Ok(m) = &listed {
                known.clone_from(m);
                if cfg.standbys > 0
                    && m.contains(&me)
                    && let Ok(mut s) = cfg.standby_for.write()
                {
                    // A partition taken over now keeps its copy until its open took it.
                    let taking: BTreeSet<u32> = s.intersection(&desired).copied().collect();
                    *s = standby_share(m, &me, cfg.partitions, cfg.standbys)
                        .difference(&desired)
                        .copied()
                        .chain(taking)
                        .collect();
                }
            }
            Some((desired, listed.map(|m| m.len()).unwrap_or(known.len())))
        };

        if let Some((desired, n_members)) = members {
            // Hand over what is someone else's now: stop it, keep renewing until it drained.
            for (&p, h) in held.iter_mut() {
                if h.phase == Phase::Running && !desired.contains(&p) {
                    tracing::info!(partition = p, "handing the partition over");
                    h.stop.cancel();
                    h.phase = Phase::Releasing;
                }
            }
            // Take what is ours and free.
            for p in desired {
                if held.contains_key(&p) {
                    continue;
                }
                let asked = Instant::now();
                if let Some(rev) = acquire(&store, p, &me, &gone).await {
                    let stop = shutdown.child_token();
                    let (deadline, lease) = LeaseDeadline::starting_at(asked + valid_for);
                    let task = start(Grant {
                        partition: p,
                        epoch: epoch_base + rev,
                        stop: stop.clone(),
                        lease,
                    });
                    tracing::info!(
                        partition = p,
                        epoch = epoch_base + rev,
                        "partition acquired"
                    );
                    metrics::counter!("kappa_leases_acquired_total").increment(1);
                    held.insert(
                        p,
                        Held {
                            revision: rev,
                            stop,
                            task,
                            phase: Phase::Running,
                            deadline,
                        },
                    );
                }
            }
            metrics::gauge!("kappa_members").set(n_members as f64);
        }
        if let Ok(mut g) = owned_gauge.write() {
            *g = held.keys().copied().collect();
        }
        metrics::gauge!("kappa_partitions_owned").set(held.len() as f64);

        // Wait for the next tick, a change that matters (a member joined or left, a lease was
        // released), or shutdown. Heartbeats and renewals of known keys do not wake us. While
        // a partition drains, look every 50 ms whether it has ended.
        let draining_any = held.values().any(|h| h.phase != Phase::Running);
        let wake = if draining_any {
            next_tick.min(tokio::time::Instant::now() + Duration::from_millis(50))
        } else {
            next_tick
        };
        let mut probe_at = tokio::time::Instant::now() + PROBE_EVERY;
        loop {
            tokio::select! {
                _ = shutdown.cancelled(), if !draining => break,
                _ = tokio::time::sleep_until(wake) => break,
                _ = tokio::time::sleep_until(probe_at), if !draining => {
                    probe_at = tokio::time::Instant::now() + PROBE_EVERY;
                    let others = known.iter().filter(|m| **m != me);
                    if !gone_members(&client, &service_token, others).await.is_empty() {
                        break;
                    }
                }
                e = watch.next(), if !draining => {
                    let Some(Ok(e)) = e else {
                        // The watch broke: re-plan on ticks until it is recreated below.
                        tokio::time::sleep_until(wake).await;
                        if let Ok(w) = store.watch_all().await {
                            watch = w;
                        }
                        break;
                    };
                    let gone = !matches!(e.operation, kv::Operation::Put);
                    let relevant = match e.key.strip_prefix("m.") {
                        Some(m) => gone || !known.contains(m),
                        None => gone && e.key.starts_with("p."),
                    };
                    if relevant {
                        // Let a burst of changes settle.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        break;
                    }
                }
            }
        }
    }
    let _ = store.delete(&member_key).await;
    answering.abort();
    if let Ok(mut g) = owned_gauge.write() {
        g.clear();
    }
    Ok(())
}

/// Renews the lease of `p`, moving its deadline on success.
async fn renew(store: &kv::Store, me: &str, p: u32, h: &mut Held, valid_for: Duration) {
    let asked = Instant::now();
    match store
        .update(format!("p.{p}"), Bytes::from(me.to_string()), h.revision)
        .await
    {
        Ok(rev) => {
            h.revision = rev;
            h.deadline.send_replace(asked + valid_for);
        }
        Err(e) => match lease_holder(store, p).await {
            // The renewal was stored but its answer lost: still ours. The deadline stays
            // where the last known renewal put it.
            Ok(Some((holder, rev))) if holder == me => {
                tracing::warn!(partition = p, error = %e,
                    "lease renewal unanswered but stored; keeping the partition");
                h.revision = rev;
            }
            Ok(_) => {
                tracing::warn!(partition = p, error = %e, "lease lost; stopping the partition");
                metrics::counter!("kappa_leases_lost_total").increment(1);
                h.stop.cancel();
                h.phase = Phase::Lost;
            }
            // Nothing known: keep it. Its deadline (not moved) stops the partition before the
            // lease can have expired.
            Err(read) => {
                let left = h
                    .deadline
                    .borrow()
                    .saturating_duration_since(Instant::now());
                tracing::warn!(partition = p, error = %e, read = %read,
                    remaining_secs = left.as_secs_f64(),
                    "lease renewal failed; the partition stops at its lease deadline unless a renewal succeeds first");
                metrics::counter!("kappa_lease_renewal_failures_total").increment(1);
            }
        },
    }
}

/// Who holds partition `p`'s lease now, and at which revision (`None`: nobody), as the
/// bucket's leader says.
async fn lease_holder(store: &kv::Store, p: u32) -> Result<Option<(String, u64)>, RuntimeError> {
    Ok(leader_entry(store, &format!("p.{p}"))
        .await?
        .filter(|e| e.alive)
        .map(|e| (String::from_utf8_lossy(&e.value).into_owned(), e.revision)))
}

/// The last entry of a key, read from the bucket's stream leader.
struct LeaderEntry {
    /// A put (false: a delete or purge marker).
    alive: bool,
    value: Bytes,
    revision: u64,
}

/// The last entry of `key` (`None`: none), read with `STREAM.MSG.GET`, which only the stream's
/// leader answers: the KV's own reads are direct gets (async-nats turns them on for every
/// bucket), and any replica of an R3 bucket answers those, a lagging one with an entry the
/// leader has already replaced.
async fn leader_entry(store: &kv::Store, key: &str) -> Result<Option<LeaderEntry>, RuntimeError> {
    let subject = format!("{}{key}", store.prefix);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => {
            let op = m
                .headers
                .get("KV-Operation")
                .map(|v| v.as_str().to_string());
            Ok(Some(LeaderEntry {
                alive: !matches!(op.as_deref(), Some("DEL" | "PURGE")),
                value: m.payload,
                revision: m.sequence,
            }))
        }
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(e) => Err(RuntimeError::JetStream(format!("read {key}: {e}"))),
    }
}

/// True if a compare-and-set write failed because the key moved on (someone else wrote
/// first): async-nats's wrong-last-revision kind, or the server's 10071 / 10164 in the text
/// (10164 is not mapped by async-nats 0.51).
fn is_cas_conflict(e: &kv::UpdateError) -> bool {
    e.kind() == kv::UpdateErrorKind::WrongLastRevision
        || crate::changelog::is_conflict_text(&e.to_string())
}

/// Takes partition `p`'s lease if nobody holds it, or if a member of `gone` does, and returns
/// its revision: created if the key never existed, or written over a released (deleted) lease
/// or a gone member's lease against its revision, read from the leader. `None`: someone alive
/// holds it, or the write failed (retried on the next plan).
async fn acquire(store: &kv::Store, p: u32, me: &str, gone: &BTreeSet<String>) -> Option<u64> {
    let key = format!("p.{p}");
    let value = Bytes::from(me.to_string());
    let conflict = match store.update(&key, value.clone(), 0).await {
        Ok(rev) => return Some(rev),
        Err(e) => is_cas_conflict(&e),
    };
    if !conflict {
        return None;
    }
    match leader_entry(store, &key).await {
        Ok(Some(e)) if !e.alive => store.update(&key, value, e.revision).await.ok(),
        Ok(Some(e)) if gone.contains(String::from_utf8_lossy(&e.value).as_ref()) => {
            let r = store.update(&key, value, e.revision).await.ok();
            if r.is_some() {
                tracing::warn!(partition = p, from = %String::from_utf8_lossy(&e.value),
                    "lease taken over from a disconnected member");
                metrics::counter!("kappa_leases_taken_over_total").increment(1);
            }
            r
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_is_balanced_and_disjoint() {
        let members: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let shares: Vec<BTreeSet<u32>> = ["a", "b", "c"]
            .iter()
            .map(|m| fair_share(&members, m, 12))
            .collect();
        assert!(shares.iter().all(|s| s.len() == 4));
        let all: BTreeSet<u32> = shares.iter().flatten().copied().collect();
        assert_eq!(all.len(), 12);
        assert!(fair_share(&members, "zz", 12).is_empty());
        // Standbys: each partition has its owner's successor as standby, never its owner.
        for p in 0..12u32 {
            let owner: Vec<_> = ["a", "b", "c"]
                .iter()
                .filter(|m| fair_share(&members, m, 12).contains(&p))
                .collect();
            let standby: Vec<_> = ["a", "b", "c"]
                .iter()
                .filter(|m| standby_share(&members, m, 12, 1).contains(&p))
                .collect();
            assert_eq!((owner.len(), standby.len()), (1, 1), "partition {p}");
            assert_ne!(owner, standby, "partition {p}");
        }
        assert!(standby_share(&members, "a", 12, 0).is_empty());
        let one: BTreeSet<String> = ["a"].iter().map(|s| s.to_string()).collect();
        assert!(standby_share(&one, "a", 12, 1).is_empty());
    }

    #[test]
    fn a_failed_listing_keeps_the_previous_plan() {
        let members: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let held: BTreeSet<u32> = [0, 2, 4].into();
        let ok = plan(Ok(&members), "a", 6, None, &held);
        assert_eq!(ok, [0, 2, 4].into());
        let err = RuntimeError::JetStream("timed out".into());
        // A failed listing (which used to read as "no members") releases nothing.
        assert_eq!(plan(Err(&err), "a", 6, Some(&ok), &held), ok);
        // Before any plan: keep what is held, take nothing.
        assert_eq!(plan(Err(&err), "a", 6, None, &held), held);
        // A listing that misses this (heartbeating) instance is not believed either.
        let others: BTreeSet<String> = ["b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(plan(Ok(&others), "a", 6, Some(&ok), &held), ok);
        // A good listing re-plans: a third member takes its share.
        let three: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(plan(Ok(&three), "a", 6, Some(&ok), &held), [0, 3].into());
    }

    #[test]
    fn a_deadline_expires_and_moves() {
        assert!(!LeaseDeadline::unbounded().expired());
        assert_eq!(LeaseDeadline::unbounded().remaining(), None);
        let (tx, lease) = LeaseDeadline::starting_at(Instant::now() - Duration::from_millis(1));
        assert!(lease.expired());
        tx.send_replace(Instant::now() + Duration::from_secs(60));
        assert!(!lease.expired());
        assert!(
            lease
                .remaining()
                .is_some_and(|r| r > Duration::from_secs(50))
        );
        // The keeper gone (lease lost), the last deadline still holds.
        drop(tx);
        assert!(!lease.expired());
        assert_eq!(
            safety_margin(Duration::from_secs(6)),
            Duration::from_millis(1200)
        );
    }
}
