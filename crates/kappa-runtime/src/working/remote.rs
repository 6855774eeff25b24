//! `remote` working state: Redis over the network. Per partition, a hash of values and a meta
//! hash `{position, epoch}`; a batch commits in one Lua call that checks the epoch (fencing) and
//! the position (idempotency) before writing. Keys share a hash tag per partition, so the
//! layout also works on Redis Cluster.

use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::ConnectionManager;

use super::{WorkingState, Write, observe};
use crate::RuntimeError;

const COMMIT: &str = r"
local meta = KEYS[1]
local data = KEYS[2]
local epoch = tonumber(ARGV[1])
local pos = tonumber(ARGV[2])
local cur_epoch = tonumber(redis.call('HGET', meta, 'epoch') or '0')
if cur_epoch > epoch then return -1 end
local cur_pos = tonumber(redis.call('HGET', meta, 'position') or '0')
if pos <= cur_pos then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('HSET', data, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', meta, 'position', ARGV[2], 'epoch', ARGV[1])
return 1
";

const OPEN: &str = r"
local meta = KEYS[1]
local epoch = tonumber(ARGV[1])
local cur_epoch = tonumber(redis.call('HGET', meta, 'epoch') or '0')
if cur_epoch > epoch then return -1 end
redis.call('HSET', meta, 'epoch', ARGV[1])
return tonumber(redis.call('HGET', meta, 'position') or '0')
";

const REBASE: &str = r"
local meta = KEYS[1]
local epoch = tonumber(ARGV[1])
local cur_epoch = tonumber(redis.call('HGET', meta, 'epoch') or '0')
if cur_epoch > epoch then return -1 end
redis.call('HSET', meta, 'position', ARGV[2], 'epoch', ARGV[1])
return 1
";

/// Redis-backed working state (`remote`, and the store of `affinity`).
#[derive(Clone)]
pub struct RedisState {
    conn: ConnectionManager,
    namespace: String,
    kind: &'static str,
    commit: redis::Script,
    open: redis::Script,
    rebase: redis::Script,
}

/// Connects to `url` (checking it answers PING) with a clear error.
pub async fn connect(url: &str, what: &str) -> Result<ConnectionManager, RuntimeError> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|e| RuntimeError::Config(format!("{what} '{url}' is not a Redis URL: {e}")))?
        // Small scripts and replies go out at once: without TCP_NODELAY, the tail of a
        // multi-segment script call can wait for a delayed ACK (tens of ms).
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let client = redis::Client::open(info)
        .map_err(|e| RuntimeError::Config(format!("{what} '{url}' is not a Redis URL: {e}")))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
        .set_response_timeout(Some(std::time::Duration::from_secs(5)))
        .set_number_of_retries(2);
    let mut conn = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.get_connection_manager_with_config(config),
    )
    .await
    .map_err(|_| RuntimeError::Config(format!("{what} '{url}' did not answer")))?
    .map_err(|e| RuntimeError::Config(format!("{what} '{url}' is unreachable: {e}")))?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| RuntimeError::Config(format!("{what} '{url}' is unreachable: {e}")))?;
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
        }
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
            let r: i64 = self
                .open
                .key(self.meta_key(partition))
                .arg(epoch)
                .invoke_async(&mut conn)
                .await?;
            if r < 0 {
                return Err(RuntimeError::Fenced(format!(
                    "partition {partition} has a newer epoch than {epoch}"
                )));
            }
            Ok(u64::try_from(r).unwrap_or(0))
        })
    }

    fn load<'a>(
        &'a self,
        partition: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<Bytes>>, RuntimeError>> {
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
            Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
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
            let mut conn = self.conn.clone();
            let mut inv = self.commit.prepare_invoke();
            inv.key(self.meta_key(partition))
                .key(self.data_key(partition))
                .arg(epoch)
                .arg(position);
            for (k, v) in &writes {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            let r: i64 = inv.invoke_async(&mut conn).await?;
            observe(self.kind, "commit", t);
            if r < 0 {
                return Err(RuntimeError::Fenced(format!(
                    "partition {partition} was taken over (epoch {epoch} is stale)"
                )));
            }
            Ok(())
        })
    }

    fn close(&self, _partition: u32) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn rebase(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: i64 = self
                .rebase
                .key(self.meta_key(partition))
                .arg(epoch)
                .arg(position)
                .invoke_async(&mut conn)
                .await?;
            if r < 0 {
                return Err(RuntimeError::Fenced(format!(
                    "partition {partition} was taken over (epoch {epoch} is stale)"
                )));
            }
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}

impl RedisState {
    /// Writes a recovered partition unconditionally (used by `affinity` after losing its store).
    pub async fn restore(
        &self,
        partition: u32,
        epoch: u64,
        position: u64,
        entries: Vec<Write>,
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
        pipe.hset_multiple(
            self.meta_key(partition),
            &[("position", position), ("epoch", epoch)],
        );
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }
}
