//! Status over NATS: every service started with [`crate::app::Service`] answers a request on
//! [`STATUS_SUBJECT`] (`kappa.status`, every instance of every service) and on
//! `kappa.status.<service>` ([`subject`], every instance of one service) with a
//! [`StatusReport`]: the same readiness report as `/healthz` ([`Health::report`]), the
//! options the instance runs (working and observed state, partitions, ownership) and, for a
//! partitioned service, each partition's position and lag.
//!
//! A reader asks once and collects the replies for a short time ([`gather`]): no registry of
//! instances is needed, and a stopped instance simply does not answer. query-api's
//! `/v1/pipeline` is built this way.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::RuntimeError;
use crate::config::{Ownership, Settings};
use crate::http::Health;
use crate::partition::PartitionBoard;
use crate::shutdown::CancellationToken;

/// The subject every instance of every service answers on.
pub const STATUS_SUBJECT: &str = "kappa.status";

/// The subject every instance of `service` answers on: `kappa.status.<service>`.
pub fn subject(service: &str) -> String {
    format!("{STATUS_SUBJECT}.{service}")
}

/// One partition as an instance reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionReport {
    /// The partition.
    pub partition: u32,
    /// `recovering`, `running`, `stopped` or `fenced`.
    pub state: String,
    /// Last input sequence whose effects are committed.
    pub position: u64,
    /// Inputs in the partition not yet delivered to the instance.
    pub lag: u64,
    /// Times the store was found lost or rolled back under this partition.
    pub store_lost: u64,
}

/// What one instance answers on [`STATUS_SUBJECT`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The service's name.
    pub service: String,
    /// This instance: `<host>:<pid>` (the host from `HOSTNAME` or `/etc/hostname`).
    pub instance: String,
    /// True when every readiness check passes (`/healthz` answers 200).
    pub ready: bool,
    /// Seconds since the instance started.
    pub uptime_secs: f64,
    /// The options it runs, e.g. `working` = `remote`, `observed` = `semi-stateless`.
    pub options: BTreeMap<String, String>,
    /// The partitions it holds, by number (empty for a service without partitioned input).
    pub partitions: Vec<PartitionReport>,
    /// The `/healthz` report: `status` and one entry per check.
    pub health: serde_json::Value,
}

struct Inner {
    service: String,
    instance: String,
    started: Instant,
    health: Health,
    options: RwLock<BTreeMap<String, String>>,
    board: RwLock<Option<PartitionBoard>>,
}

/// An instance's status, shared by its parts: options and partitions are added while the
/// service starts; the report is made on each request.
#[derive(Clone)]
pub struct Status {
    inner: Arc<Inner>,
}

impl Status {
    /// The status of `service`, whose readiness is `health`.
    pub fn new(service: &str, health: Health) -> Self {
        Self {
            inner: Arc::new(Inner {
                service: service.to_string(),
                instance: instance_id(),
                started: Instant::now(),
                health,
                options: RwLock::default(),
                board: RwLock::default(),
            }),
        }
    }

    /// Sets one option shown in the report (replacing an earlier value).
    pub fn option(&self, name: &str, value: impl std::fmt::Display) {
        if let Ok(mut o) = self.inner.options.write() {
            o.insert(name.to_string(), value.to_string());
        }
    }

    /// Sets the options a partitioned service runs with `settings`: `partitions` (the input's
    /// actual count), `ownership`, and `working` / `observed` when the service uses them.
    pub fn settings(&self, settings: &Settings, partitions: u32, working: bool, observed: bool) {
        self.option("partitions", partitions);
        self.option(
            "ownership",
            match settings.ownership {
                Ownership::Leases => "leases",
                Ownership::Static => "static",
            },
        );
        if working {
            self.option("working", settings.working);
        }
        if observed {
            self.option("observed", settings.observed);
        }
    }

    /// Reports the partitions `board` holds.
    pub fn partitions(&self, board: PartitionBoard) {
        if let Ok(mut b) = self.inner.board.write() {
            *b = Some(board);
        }
    }

    /// The report as of now.
    pub fn report(&self) -> StatusReport {
        let (ready, health) = self.inner.health.report();
        let options = self
            .inner
            .options
            .read()
            .map(|o| o.clone())
            .unwrap_or_default();
        let board = self.inner.board.read().ok().and_then(|b| b.clone());
        let partitions = board
            .and_then(|b| b.read().ok().map(|b| b.clone()))
            .unwrap_or_default()
            .into_iter()
            .map(|(partition, s)| PartitionReport {
                partition,
                state: serde_json::to_value(s.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                position: s.position,
                lag: s.lag,
                store_lost: s.store_lost,
            })
            .collect();
        StatusReport {
            service: self.inner.service.clone(),
            instance: self.inner.instance.clone(),
            ready,
            uptime_secs: self.inner.started.elapsed().as_secs_f64(),
            options,
            partitions,
            health,
        }
    }
}

fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}:{}", std::process::id())
}

/// Answers status requests on [`STATUS_SUBJECT`] and [`subject`]`(service)` until `shutdown`,
/// subscribing again (after a second) if a subscription ends.
pub fn spawn_responder(
    client: async_nats::Client,
    status: Status,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let own = subject(&status.inner.service);
        loop {
            let subs = futures::future::try_join(
                client.subscribe(STATUS_SUBJECT),
                client.subscribe(own.clone()),
            )
            .await;
            match subs {
                Ok((all, one)) => {
                    let mut requests = futures::stream::select(all, one);
                    loop {
                        let m = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = requests.next() => m,
                        };
                        let Some(m) = m else { break };
                        let Some(reply) = m.reply else { continue };
                        match serde_json::to_vec(&status.report()) {
                            Ok(body) => {
                                if let Err(e) = client.publish(reply, body.into()).await {
                                    tracing::debug!(error = %e, "status reply not sent");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "status report not encoded"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "subscribing to status requests failed"),
            }
            if crate::partition::sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                return;
            }
        }
    })
}

/// Asks `subject` ([`STATUS_SUBJECT`] for every service) once and collects the reports that
/// arrive within `window`, sorted by service and instance. A reply that is not a report is
/// skipped (and logged).
pub async fn gather(
    client: &async_nats::Client,
    subject: &str,
    window: Duration,
) -> Result<Vec<StatusReport>, RuntimeError> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| RuntimeError::Nats(format!("status: subscribing to replies: {e}")))?;
    client
        .publish_with_reply(subject.to_string(), inbox, bytes::Bytes::new())
        .await
        .map_err(|e| RuntimeError::Nats(format!("status: asking {subject}: {e}")))?;
    let deadline = tokio::time::Instant::now() + window;
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, replies.next()).await {
        match serde_json::from_slice::<StatusReport>(&m.payload) {
            Ok(r) => out.push(r),
            Err(e) => tracing::debug!(error = %e, "a status reply is not a report"),
        }
    }
    let _ = replies.unsubscribe().await;
    out.sort_by(|a, b| (&a.service, &a.instance).cmp(&(&b.service, &b.instance)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::{PartitionState, PartitionStatus};

    #[test]
    fn report_has_options_partitions_and_health() {
        let health = Health::new();
        health.register("nats", Arc::new(|| (true, serde_json::json!(null))));
        let status = Status::new("svc", health.clone());
        status.option("working", "local");
        let board = PartitionBoard::default();
        if let Ok(mut b) = board.write() {
            b.insert(
                3,
                PartitionStatus {
                    state: PartitionState::Running,
                    position: 7,
                    lag: 2,
                    ..Default::default()
                },
            );
        }
        status.partitions(board);
        let r = status.report();
        assert_eq!(r.service, "svc");
        assert!(r.ready);
        assert_eq!(r.options["working"], "local");
        assert_eq!(
            r.partitions,
            vec![PartitionReport {
                partition: 3,
                state: "running".into(),
                position: 7,
                lag: 2,
                store_lost: 0
            }]
        );
        assert_eq!(r.health["checks"]["nats"]["ready"], true);
        health.register("store", Arc::new(|| (false, serde_json::json!("down"))));
        assert!(!status.report().ready);
        let json = serde_json::to_vec(&r).expect("encodes");
        let back: StatusReport = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(back, r);
    }
}
