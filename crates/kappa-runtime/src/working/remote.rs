//! `remote` working state: Redis over the network. Per partition, a hash of values and a meta
//! hash `{position, epoch, incarnation}`; a batch commits in one Lua call that checks the epoch
//! (fencing), the incarnation and the position before writing. Keys share a hash tag per
//! partition, so the layout also works on Redis Cluster.
//!
//! # A store that loses writes
//!
//! Redis can lose what it acknowledged while the service runs: restarted without persistence
//! (the affinity sidecar), `FLUSHALL`, a failover to a lagging replica, the last second of an
//! AOF written with `appendfsync everysec`. The owner of a partition therefore remembers, per
//! partition it opened, the *incarnation* of the partition's meta hash (a random id written
//! once, when the hash is created, and learned at `open`) and the position it last committed.
//! A commit goes through only if the store still holds both (or already holds the very commit,
//! retried after its reply was lost); otherwise it fails with [`RuntimeError::StoreLost`] and
//! the driver reopens the partition, which recovers from the streams (the change log is the
//! truth, the store its cache; see the engine, `engine.rs`).
//!
//! A wipe also erases the fencing epoch, so a stale owner that reopens after it is accepted by
//! the store again. That does not make it able to do harm: every outcome it appends is fenced
//! by the entity's last change-log sequence it folded (`Nats-Expected-Last-Subject-Sequence`)
//! and deduplicated by input, so the change log stays one linear history per entity whoever
//! writes it, and an input decided by one owner is recognised as decided by the other. In the
//! store, the stale owner's open writes its (lower) epoch and, the hash being new, a new
//! incarnation: the rightful owner's next commit sees the incarnation changed, reopens with its
//! higher epoch, and from then on the stale owner is fenced again.

use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::ConnectionManager;

use super::{Stored, Value, WorkingState, Write, observe};
use crate::RuntimeError;
use crate::config::RedisTlsArgs;

/// ARGV: epoch, new position, incarnation, previous position, then (key, value) pairs.
/// Returns 1 committed, 0 already committed (a retry), -1 fenced, -2 incarnation gone or
/// changed, -3 the stored position is not the previous one.
const COMMIT: &str = r"
local meta = KEYS[1]
local data = KEYS[2]
local epoch = tonumber(ARGV[1])
local pos = tonumber(ARGV[2])
local cur_epoch = tonumber(redis.call('HGET', meta, 'epoch') or '0')
if cur_epoch > epoch then return -1 end
if redis.call('HGET', meta, 'incarnation') ~= ARGV[3] then return -2 end
local cur_pos = tonumber(redis.call('HGET', meta, 'position') or '0')
if cur_pos == pos then return 0 end
if cur_pos ~= tonumber(ARGV[4]) then return -3 end
for i = 5, #ARGV, 2 do
  redis.call('HSET', data, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', meta, 'position', ARGV[2], 'epoch', ARGV[1])
return 1
";

/// ARGV: epoch, a fresh incarnation (kept only if the hash has none). Returns
/// {position, incarnation}, or {-1} when fenced.
const OPEN: &str = r"
local meta = KEYS[1]
local epoch = tonumber(ARGV[1])
local cur_epoch = tonumber(redis.call('HGET', meta, 'epoch') or '0')
if cur_epoch > epoch then return {-1, false} end
redis.call('HSETNX', meta, 'incarnation', ARGV[2])
redis.call('HSET', meta, 'epoch', ARGV[1])
return {tonumber(redis.call('HGET', meta, 'position') or '0'), redis.call('HGET', meta, 'incarnation')}
";

/// ARGV: epoch, position, incarnation. Returns 1, -1 fenced, -2 incarnation gone or changed.
const REBASE: &str = r"
local meta = KEYS[1]
local epoch = tonumber(ARGV[1])
local cur_epoch = tonumber(redis.call('HGET', meta, 'epoch') or '0')
if cur_epoch > epoch then return -1 end
if redis.call('HGET', meta, 'incarnation') ~= ARGV[3] then return -2 end
redis.call('HSET', meta, 'position', ARGV[2], 'epoch', ARGV[1])
return 1
";

/// What an owner expects the store to hold for a partition it opened.
#[derive(Debug, Clone)]
struct Expected {
    incarnation: String,
    position: u64,
}

/// A new random incarnation id: the process's randomly keyed hasher over the time and a
/// counter (unique per call in a process, and unguessable across processes).
fn new_incarnation() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(now);
    h.write_u64(n);
    h.write_u32(std::process::id());
    format!("{:016x}{:08x}{n:x}", h.finish(), std::process::id())
}

/// Redis-backed working state (`remote`, and the store of `affinity`).
#[derive(Clone)]
pub struct RedisState {
    conn: ConnectionManager,
    namespace: String,
    kind: &'static str,
    commit: redis::Script,
    open: redis::Script,
    rebase: redis::Script,
    /// Per partition opened: the incarnation and position the store must still hold.
    expected: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u32, Expected>>>,
}

pub use crate::config::redacted;

/// A Redis error with what it means for an operator: a refused password or a command or key
/// the ACL user may not touch (see docs/operations.md, "Redis users").
pub fn explain(e: &redis::RedisError) -> String {
    let hint = match e.code() {
        _ if e.kind() == redis::ErrorKind::AuthenticationFailed => {
            "; the user name or password in the Redis URL is wrong"
        }
        Some("WRONGPASS") => "; the user name or password in the Redis URL is wrong",
        Some("NOAUTH") => "; this Redis requires a user and password in the URL",
        Some("NOPERM") => {
            "; the Redis user of this URL may not run this command or touch this key (ACL, docs/operations.md \"Redis users\")"
        }
        _ => "",
    };
    format!("{e}{hint}")
}

/// Connects to `url` (checking it answers PING) with a clear error; messages never show the
/// password. A `rediss://` URL is verified against the system's roots; use [`connect_with`]
/// for a CA or a client certificate of your own.
pub async fn connect(url: &str, what: &str) -> Result<ConnectionManager, RuntimeError> {
    connect_with(url, what, &RedisTlsArgs::default()).await
}

/// Reads a PEM file named by a TLS setting; a missing or unreadable file is a configuration
/// error that names the setting.
fn pem(setting: &str, path: &std::path::Path) -> Result<Vec<u8>, RuntimeError> {
    std::fs::read(path)
        .map_err(|e| RuntimeError::Config(format!("{setting} '{}': {e}", path.display())))
}

/// The client of `info`, with the TLS settings of `tls` when the URL is `rediss://`.
fn client_for(
    info: redis::ConnectionInfo,
    what: &str,
    shown: &str,
    tls: &RedisTlsArgs,
) -> Result<redis::Client, RuntimeError> {
    let not_redis = |e: redis::RedisError| {
        RuntimeError::Config(format!("{what} '{shown}' is not a Redis URL: {e}"))
    };
    match info.addr() {
        redis::ConnectionAddr::TcpTls { .. } => {}
        redis::ConnectionAddr::Tcp(..) if tls.is_set() => {
            return Err(RuntimeError::Config(format!(
                "{what} '{shown}' is not a rediss:// URL, but REDIS_CA, REDIS_CERT or REDIS_KEY \
                 is set: use rediss:// for TLS, or unset them"
            )));
        }
        _ => return redis::Client::open(info).map_err(not_redis),
    }
    let client_tls = match (&tls.redis_cert, &tls.redis_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: pem("REDIS_CERT", cert)?,
            client_key: pem("REDIS_KEY", key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(RuntimeError::Config(
                "REDIS_CERT and REDIS_KEY go together (a client certificate and its key)".into(),
            ));
        }
    };
    let root_cert = tls
        .redis_ca
        .as_deref()
        .map(|ca| pem("REDIS_CA", ca))
        .transpose()?;
    if root_cert.is_none() && client_tls.is_none() {
        return redis::Client::open(info).map_err(not_redis);
    }
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| RuntimeError::Config(format!("{what} '{shown}': TLS settings: {e}")))
}

/// [`explain`], and for a TLS connection whose handshake failed, where to look.
fn explain_tls(e: &redis::RedisError, tls_url: bool) -> String {
    let text = explain(e);
    let lower = text.to_ascii_lowercase();
    if tls_url
        && ["certificate", "tls", "handshake", "unknownissuer", "alert"]
            .iter()
            .any(|w| lower.contains(w))
    {
        format!(
            "TLS failed: {text} (check REDIS_CA, and REDIS_CERT and REDIS_KEY if the server \
             verifies clients)"
        )
    } else {
        text
    }
}

/// Connects to `url` (checking it answers PING) with a clear error, over TLS when the URL is
/// `rediss://`: verified against `REDIS_CA` (or the system's roots), with the client
/// certificate `REDIS_CERT`/`REDIS_KEY` when given. Messages never show the password.
pub async fn connect_with(
    url: &str,
    what: &str,
    tls: &RedisTlsArgs,
) -> Result<ConnectionManager, RuntimeError> {
    use redis::IntoConnectionInfo;
    let shown = redacted(url);
    let info = url
        .into_connection_info()
        .map_err(|e| RuntimeError::Config(format!("{what} '{shown}' is not a Redis URL: {e}")))?
        // Small scripts and replies go out at once: without TCP_NODELAY, the tail of a
        // multi-segment script call can wait for a delayed ACK (tens of ms).
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let tls_url = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    let client = client_for(info, what, &shown, tls)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
        .set_response_timeout(Some(std::time::Duration::from_secs(5)))
        .set_number_of_retries(2);
    let unreachable = |e: redis::RedisError| {
        RuntimeError::Config(format!("{what} '{shown}': {}", explain_tls(&e, tls_url)))
    };
    let mut conn = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.get_connection_manager_with_config(config),
    )
    .await
    .map_err(|_| RuntimeError::Config(format!("{what} '{shown}' did not answer")))?
    .map_err(unreachable)?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(unreachable)?;
    Ok(conn)
}

impl RedisState {
    /// State of service `namespace` in the Redis behind `conn`.
    pub fn new(conn: ConnectionManager, namespace: &str, kind: &'static str) -> Self {
        Self {
            conn,
            namespace: namespace.to_string(),
            kind,
            commit: redis::Script::new(COMMIT),
            open: redis::Script::new(OPEN),
            rebase: redis::Script::new(REBASE),
            expected: Default::default(),
        }
    }

    fn expect(&self, partition: u32, e: Option<Expected>) {
        if let Ok(mut m) = self.expected.lock() {
            match e {
                Some(e) => m.insert(partition, e),
                None => m.remove(&partition),
            };
        }
    }

    fn expected(&self, partition: u32) -> Option<Expected> {
        self.expected.lock().ok()?.get(&partition).cloned()
    }

    fn lost(&self, partition: u32, why: &str) -> RuntimeError {
        self.expect(partition, None);
        RuntimeError::StoreLost(format!(
            "{} store of {} partition {partition}: {why}",
            self.kind, self.namespace
        ))
    }

    fn meta_key(&self, p: u32) -> String {
        format!("kappa:{{{}:{p}}}:meta", self.namespace)
    }

    fn data_key(&self, p: u32) -> String {
        format!("kappa:{{{}:{p}}}:state", self.namespace)
    }

    /// True if the store holds a position for `partition` (it was not lost).
    pub async fn has_partition(&self, partition: u32) -> Result<bool, RuntimeError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("HEXISTS")
            .arg(self.meta_key(partition))
            .arg("position")
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }
}

impl WorkingState for RedisState {
    fn open(&self, partition: u32, epoch: u64) -> BoxFuture<'_, Result<u64, RuntimeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (r, incarnation): (i64, Option<String>) = self
                .open
                .key(self.meta_key(partition))
                .arg(epoch)
                .arg(new_incarnation())
                .invoke_async(&mut conn)
                .await?;
            let (Ok(position), Some(incarnation)) = (u64::try_from(r), incarnation) else {
                self.expect(partition, None);
                return Err(RuntimeError::Fenced(format!(
                    "partition {partition} has a newer epoch than {epoch}"
                )));
            };
            self.expect(
                partition,
                Some(Expected {
                    incarnation,
                    position,
                }),
            );
            Ok(position)
        })
    }

    fn load<'a>(
        &'a self,
        partition: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<Value>>, RuntimeError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let t = Instant::now();
            let mut conn = self.conn.clone();
            let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(self.data_key(partition))
                .arg(keys)
                .query_async(&mut conn)
                .await?;
            observe(self.kind, "load", t);
            Ok(values
                .into_iter()
                .map(|v| v.map(|v| Value::Encoded(Bytes::from(v))))
                .collect())
        })
    }

    fn commit(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
        writes: Vec<Write>,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let t = Instant::now();
            let Some(expected) = self.expected(partition) else {
                return Err(self.lost(partition, "not opened (or lost before)"));
            };
            let mut conn = self.conn.clone();
            let mut inv = self.commit.prepare_invoke();
            inv.key(self.meta_key(partition))
                .key(self.data_key(partition))
                .arg(epoch)
                .arg(position)
                .arg(&expected.incarnation)
                .arg(expected.position);
            for (k, v) in &writes {
                inv.arg(k.as_str()).arg(v.encoded()?.as_ref());
            }
            let r: i64 = inv.invoke_async(&mut conn).await?;
            observe(self.kind, "commit", t);
            self.answered(partition, epoch, r, position, expected)
        })
    }

    fn close(&self, _partition: u32) -> BoxFuture<'_, Result<(), RuntimeError>> {
        // What is expected stays: the next `open` replaces it, and forgetting it here could
        // race a reopen of the same partition in this process.
        Box::pin(async { Ok(()) })
    }

    fn rebase(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let Some(expected) = self.expected(partition) else {
                return Err(self.lost(partition, "not opened (or lost before)"));
            };
            let mut conn = self.conn.clone();
            let r: i64 = self
                .rebase
                .key(self.meta_key(partition))
                .arg(epoch)
                .arg(position)
                .arg(&expected.incarnation)
                .invoke_async(&mut conn)
                .await?;
            self.answered(partition, epoch, r, position, expected)
        })
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}

impl RedisState {
    /// What the COMMIT and REBASE scripts answered (-1 fenced, -2 the meta hash is not this
    /// owner's incarnation, -3 the previous position is gone; anything else: stored at
    /// `position`, which is expected from now on).
    fn answered(
        &self,
        partition: u32,
        epoch: u64,
        answer: i64,
        position: u64,
        expected: Expected,
    ) -> Result<(), RuntimeError> {
        match answer {
            -1 => Err(RuntimeError::Fenced(format!(
                "partition {partition} was taken over (epoch {epoch} is stale)"
            ))),
            -2 => Err(self.lost(
                partition,
                "its meta hash is gone or was created again (wiped, restarted empty, failed over)",
            )),
            -3 => Err(self.lost(
                partition,
                &format!(
                    "it no longer holds position {} committed last (rolled back)",
                    expected.position
                ),
            )),
            _ => {
                self.expect(
                    partition,
                    Some(Expected {
                        position,
                        ..expected
                    }),
                );
                Ok(())
            }
        }
    }

    /// Writes a recovered partition unconditionally (used by `affinity` after losing its store),
    /// under a new incarnation, and expects it from now on.
    pub async fn restore(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
        entries: Vec<Stored>,
    ) -> Result<(), RuntimeError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.del(self.data_key(partition));
        for chunk in entries.chunks(500) {
            let items: Vec<(&str, &[u8])> = chunk
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_ref()))
                .collect();
            pipe.hset_multiple(self.data_key(partition), &items);
        }
        let incarnation = new_incarnation();
        pipe.del(self.meta_key(partition));
        pipe.hset_multiple(
            self.meta_key(partition),
            &[
                ("position", position.to_string()),
                ("epoch", epoch.to_string()),
                ("incarnation", incarnation.clone()),
            ],
        );
        let _: () = pipe.query_async(&mut conn).await?;
        self.expect(
            partition,
            Some(Expected {
                incarnation,
                position,
            }),
        );
        Ok(())
    }
}

#[cfg(test)]
mod url_tests {
    use super::redacted;

    #[test]
    fn passwords_never_show_in_messages() {
        assert_eq!(
            redacted("redis://temperature-delta:s3cr:et@redis:6379/0"),
            "redis://temperature-delta:***@redis:6379/0"
        );
        assert_eq!(redacted("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(redacted("rediss://pw@h:1"), "rediss://***@h:1");
        assert_eq!(redacted("redis://h:6379"), "redis://h:6379");
        assert_eq!(redacted("not a url"), "not a url");
        assert_eq!(
            redacted("nats://a:x@h:1,nats://b:y@g:2"),
            "nats://a:***@h:1,nats://b:***@g:2"
        );
    }
}
