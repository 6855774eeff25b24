//! The views in Redis: the atomic Lua scripts that change them, and reads. The key layout and
//! the read protocol are the wire contract ([`thermo_domain::views`]); this is their only
//! writer.

use redis::aio::ConnectionManager;
use thermo_domain::views::{self as contract, READ_SCRIPT, Read};
pub use thermo_domain::views::{ACTIVE_KEY, BUILDING_KEY, History, Keys, NEXT_GEN_KEY, ViewList};

use crate::view::{SensorMeta, SensorUpdate, SensorView, compose, rank_score};

/// Resolves the generation inside a script: ARGV[1] ('' = the active one).
const GEN_PRELUDE: &str = r"
local gen = ARGV[1]
if gen == '' then gen = redis.call('GET', 'views:active') or '0' end
local P = 'views:{' .. gen .. '}:'
";

const OPEN: &str = r"
local part = ARGV[2]
local epoch = tonumber(ARGV[3])
local cur = tonumber(redis.call('HGET', P .. 'epochs', part) or '0')
if cur > epoch then return {'-1', gen} end
redis.call('HSET', P .. 'epochs', part, ARGV[3])
return {redis.call('HGET', P .. 'positions', part) or '0', gen,
  redis.call('HGET', P .. 'sources', part) or '0'}
";

/// One batch of one partition. ARGV: gen, partition, epoch, last seq, history length,
/// number of sensors, the position the writer knows is stored, the deltas stream's identity,
/// then per sensor: id, seq, delta JSON, score, meta JSON, meta version, meta site, number of
/// history points, then (seq, JSON) per point. Answers {'-1', gen} fenced, {'-2', gen, stored
/// position} lost (the stored position is below the writer's: wiped or rolled back), {'0',
/// gen} a replay, else {'1', gen, (id, meta)...}. A partition or sensor whose stored stream
/// identity is another (or none) counts its stored sequences as 0: they refer to a deltas
/// stream that was replaced; the data stays.
///
/// Cost, measured (`kappa-bench views`, 2026-12-01, 2 shared CPUs, 200,000 deltas over 1,000
/// sensors, batches of ~65): per batch this script executes 362 Redis commands (its
/// `redis.call`s) where the fair baseline's pipeline sends 458 for the same deltas, yet
/// redis-server spends 10.9 µs of CPU per delta on it against 6.6 µs for the pipeline, i.e.
/// ~2.0 µs per command called from Lua against ~0.9 µs per pipelined command. The call takes
/// 12.3 of view-builder's 12.7 ms per batch (waiting for Redis included); the rest of the
/// service (decode, lookups, fold, announce) costs 12.2 µs per delta against the baseline
/// relay's 10.6 µs. On a saturated machine the throughput ratio follows the CPU ratio (0.77
/// against 23.8 / 30.7 µs; three runs gave 0.82, 0.77 and 0.82 against the goal of 0.8, the
/// CPU ratio 1.23 to 1.29 in each): fewer `redis.call`s per sensor is where the next gain is.
const APPLY: &str = r"
local part = ARGV[2]
local epoch = tonumber(ARGV[3])
local last = tonumber(ARGV[4])
local hlen = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local cur_epoch = tonumber(redis.call('HGET', P .. 'epochs', part) or '0')
if cur_epoch > epoch then return {'-1', gen} end
local src = ARGV[8]
local pos = tonumber(redis.call('HGET', P .. 'positions', part) or '0')
if redis.call('HGET', P .. 'sources', part) ~= src then pos = 0 end
if pos < tonumber(ARGV[7]) then return {'-2', gen, tostring(pos)} end
if last <= pos then return {'0', gen} end
local out = {'1', gen}
local i = 9
for s = 1, n do
  local id = ARGV[i]
  local seq = tonumber(ARGV[i + 1])
  local score = ARGV[i + 3]
  local mv = tonumber(ARGV[i + 5])
  local msite = ARGV[i + 6]
  local nh = tonumber(ARGV[i + 7])
  local base = i
  i = i + 8
  local points = {}
  for h = 1, nh do
    if tonumber(ARGV[i]) > pos then points[#points + 1] = ARGV[i + 1] end
    i = i + 2
  end
  if #points > 0 then
    local hk = P .. 'history:' .. id
    if redis.call('RPUSH', hk, unpack(points)) > hlen then
      redis.call('LTRIM', hk, -hlen, -1)
    end
  end
  local sk = P .. 'sensor:' .. id
  local cur = redis.call('HMGET', sk, 'seq', 'mv', 'site', 'meta', 'src')
  local has_view = cur[1] ~= false
  local cur_seq = tonumber(cur[1] or '0')
  if cur[5] ~= src then cur_seq = 0 end
  if seq > cur_seq then
    local cur_mv = tonumber(cur[2] or '-1')
    -- The stored metadata is returned only when it is newer than the caller's ('' = yours).
    local site, meta = cur[3], cur[4]
    if mv > cur_mv then
      site, meta = msite, ''
      redis.call('HSET', sk, 'delta', ARGV[base + 2], 'seq', ARGV[base + 1],
        'meta', ARGV[base + 4], 'mv', ARGV[base + 5], 'site', site, 'src', src)
    else
      if mv == cur_mv then meta = '' end
      redis.call('HSET', sk, 'delta', ARGV[base + 2], 'seq', ARGV[base + 1], 'src', src)
    end
    -- Site sets hold sensors with a view; a registry change may have moved one already.
    local old_site = false
    if has_view then old_site = cur[3] end
    if old_site and old_site ~= site then
      redis.call('ZREM', P .. 'site:' .. old_site, id)
      if redis.call('ZCARD', P .. 'site:' .. old_site) == 0 then
        redis.call('SREM', P .. 'sites', old_site)
      end
    end
    redis.call('ZADD', P .. 'site:' .. site, score, id)
    if old_site ~= site then redis.call('SADD', P .. 'sites', site) end
    redis.call('ZADD', P .. 'rank', score, id)
    if not has_view then redis.call('ZADD', P .. 'sensors', 0, id) end
    table.insert(out, id)
    table.insert(out, meta or '')
  end
end
redis.call('HSET', P .. 'positions', part, ARGV[4])
redis.call('HSET', P .. 'sources', part, src)
redis.call('HSET', P .. 'epochs', part, ARGV[3])
return out
";

/// A registry change. ARGV: id, meta JSON, meta version, meta site, generation ('' = the
/// active one and the one being rebuilt). Returns 1 if the active view changed.
const META: &str = r"
local id = ARGV[1]
local mv = tonumber(ARGV[3])
local site = ARGV[4]
local active = redis.call('GET', 'views:active') or '0'
local gens
if ARGV[5] ~= '' then
  gens = {ARGV[5]}
else
  gens = {active}
  local b = redis.call('GET', 'views:building')
  if b and b ~= active then table.insert(gens, b) end
end
local changed = 0
for _, gen in ipairs(gens) do
  local P = 'views:{' .. gen .. '}:'
  local sk = P .. 'sensor:' .. id
  local cur_mv = tonumber(redis.call('HGET', sk, 'mv') or '-1')
  if mv > cur_mv then
    local has_view = redis.call('HEXISTS', sk, 'seq') == 1
    local old_site = redis.call('HGET', sk, 'site')
    redis.call('HSET', sk, 'meta', ARGV[2], 'mv', ARGV[3], 'site', site)
    if has_view then
      if old_site and old_site ~= site then
        local score = redis.call('ZSCORE', P .. 'rank', id)
        redis.call('ZREM', P .. 'site:' .. old_site, id)
        if redis.call('ZCARD', P .. 'site:' .. old_site) == 0 then
          redis.call('SREM', P .. 'sites', old_site)
        end
        if score then
          redis.call('ZADD', P .. 'site:' .. site, score, id)
          redis.call('SADD', P .. 'sites', site)
        end
      end
      if gen == active then changed = 1 end
    end
  end
end
return changed
";

/// Swaps generation ARGV[1] in if it has caught up with the active one in every partition
/// whose position refers to deltas stream ARGV[2] (the one the rebuild read; a position
/// stored under another identity refers to a stream that was replaced). Returns {'1', old}
/// when swapped, {'0', old} when not yet.
const SWAP: &str = r"
local new = ARGV[1]
local old = redis.call('GET', 'views:active') or '0'
if old == new then return {'1', old} end
local O = 'views:{' .. old .. '}:'
local N = 'views:{' .. new .. '}:'
local kv = redis.call('HGETALL', O .. 'positions')
for j = 1, #kv, 2 do
  local n = tonumber(redis.call('HGET', N .. 'positions', kv[j]) or '0')
  local same = redis.call('HGET', O .. 'sources', kv[j]) == ARGV[2]
  if same and n < tonumber(kv[j + 1]) then return {'0', old} end
end
redis.call('SET', 'views:active', new)
if redis.call('GET', 'views:building') == new then redis.call('DEL', 'views:building') end
return {'1', old}
";

/// Where a batch stands in the deltas stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// The position the writer knows is stored (opened at, or written last).
    pub previous: u64,
    /// The batch's last input sequence (the position to store).
    pub last: u64,
    /// The identity of the deltas stream (its creation time), stored with the position.
    pub source: u64,
}

/// Which generation a write goes to (`Active`: whatever `views:active` names at the time).
pub use kappa_runtime::view::Target;

fn target_arg(t: &Target) -> &str {
    match t {
        Target::Active => "",
        Target::Generation(g) => g,
    }
}

/// The result of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// A newer writer owns the partition.
    Fenced,
    /// The batch was applied already (a replay).
    Skipped,
    /// The store holds an older position than the writer stored (wiped or rolled back):
    /// nothing was written.
    Lost {
        /// The position the store holds.
        stored: u64,
    },
    /// Applied; the changed sensors' views.
    Changed(Vec<SensorView>),
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Another rebuild holds `views:building` (the generation it names).
    #[error("another rebuild is running (views:building = {0}); pass --force if it died")]
    Busy(String),
    /// A script answered something unexpected.
    #[error("unexpected answer from redis: {0}")]
    Protocol(String),
}

impl From<contract::BadAnswer> for StoreError {
    fn from(e: contract::BadAnswer) -> Self {
        Self::Protocol(e.0)
    }
}

/// The views' store.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    open: redis::Script,
    apply: redis::Script,
    meta: redis::Script,
    swap: redis::Script,
    read: redis::Script,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn parse_u64(s: &str) -> Result<u64, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Protocol(format!("not a number: {s}")))
}

impl Store {
    /// The store on `conn`.
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            open: redis::Script::new(&format!("{GEN_PRELUDE}{OPEN}")),
            apply: redis::Script::new(&format!("{GEN_PRELUDE}{APPLY}")),
            meta: redis::Script::new(META),
            swap: redis::Script::new(SWAP),
            read: redis::Script::new(READ_SCRIPT),
        }
    }

    /// The connection (for health pings and rebuild housekeeping).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Takes `partition` over with `epoch`; returns its applied position and the identity of
    /// the deltas stream it refers to (0: none stored), or `None` if a newer epoch owns it.
    pub async fn open(
        &self,
        target: &Target,
        partition: u32,
        epoch: u64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let mut conn = self.conn.clone();
        let r: Vec<String> = self
            .open
            .arg(target_arg(target))
            .arg(partition)
            .arg(epoch)
            .invoke_async(&mut conn)
            .await?;
        let first = r
            .first()
            .ok_or_else(|| StoreError::Protocol("empty open answer".into()))?;
        if first == "-1" {
            return Ok(None);
        }
        let source = r.get(2).map_or(Ok(0), |s| parse_u64(s))?;
        Ok(Some((parse_u64(first)?, source)))
    }

    /// Applies one batch of `partition` whose last input has sequence `at.last`, atomically
    /// with the partition's position; `metas[i]` is the registry's metadata of `updates[i]`.
    /// `at.previous` is the position the caller knows is stored (opened at or written last):
    /// a store below it lost writes ([`Applied::Lost`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn apply(
        &self,
        target: &Target,
        partition: u32,
        epoch: u64,
        at: At,
        history_len: usize,
        updates: &[SensorUpdate],
        metas: &[Option<SensorMeta>],
    ) -> Result<Applied, StoreError> {
        let mut inv = self.apply.prepare_invoke();
        inv.arg(target_arg(target))
            .arg(partition)
            .arg(epoch)
            .arg(at.last)
            .arg(history_len.max(1))
            .arg(updates.len())
            .arg(at.previous)
            .arg(at.source);
        let mut deltas = std::collections::HashMap::new();
        for (i, u) in updates.iter().enumerate() {
            let meta = SensorMeta::newest(
                SensorMeta::from_delta(&u.delta),
                metas.get(i).cloned().flatten(),
            );
            let delta_json =
                serde_json::to_string(&u.delta).map_err(|e| StoreError::Protocol(e.to_string()))?;
            let meta_json =
                serde_json::to_string(&meta).map_err(|e| StoreError::Protocol(e.to_string()))?;
            inv.arg(&u.delta.sensor_id)
                .arg(u.seq)
                .arg(delta_json)
                .arg(rank_score(u.delta.delta_celsius).to_string())
                .arg(meta_json)
                .arg(meta.version)
                .arg(&meta.site)
                .arg(u.history.len());
            for (seq, point) in &u.history {
                let json = serde_json::to_string(point)
                    .map_err(|e| StoreError::Protocol(e.to_string()))?;
                inv.arg(*seq).arg(json);
            }
            deltas.insert(u.delta.sensor_id.clone(), (&u.delta, u.seq, meta));
        }
        let mut conn = self.conn.clone();
        let r: Vec<String> = inv.invoke_async(&mut conn).await?;
        match r.first().map(String::as_str) {
            Some("-1") => return Ok(Applied::Fenced),
            Some("-2") => {
                let stored = r.get(2).map_or(Ok(0), |s| parse_u64(s))?;
                return Ok(Applied::Lost { stored });
            }
            Some("0") => return Ok(Applied::Skipped),
            Some("1") => {}
            other => return Err(StoreError::Protocol(format!("apply answered {other:?}"))),
        }
        let mut views = Vec::new();
        for pair in r[2..].chunks(2) {
            let [id, meta] = pair else { continue };
            let Some((delta, seq, mine)) = deltas.remove(id) else {
                continue;
            };
            let meta = if meta.is_empty() {
                mine
            } else {
                serde_json::from_str(meta)
                    .map_err(|e| StoreError::Protocol(format!("stored meta of {id}: {e}")))?
            };
            views.push(compose(delta, seq, meta));
        }
        Ok(Applied::Changed(views))
    }

    /// Applies a registry change to the active generation (and to one being rebuilt); returns
    /// the sensor's new view if the active generation's view changed.
    pub async fn apply_meta(
        &self,
        sensor_id: &str,
        meta: &SensorMeta,
    ) -> Result<Option<SensorView>, StoreError> {
        if self.meta_script(sensor_id, meta, "").await? {
            return self.sensor(sensor_id).await;
        }
        Ok(None)
    }

    /// Applies a registry change to generation `generation` only (a rebuild's bootstrap).
    pub async fn apply_meta_to(
        &self,
        generation: &str,
        sensor_id: &str,
        meta: &SensorMeta,
    ) -> Result<(), StoreError> {
        self.meta_script(sensor_id, meta, generation)
            .await
            .map(|_| ())
    }

    async fn meta_script(
        &self,
        sensor_id: &str,
        meta: &SensorMeta,
        generation: &str,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(meta).map_err(|e| StoreError::Protocol(e.to_string()))?;
        let mut conn = self.conn.clone();
        let changed: i64 = self
            .meta
            .arg(sensor_id)
            .arg(json)
            .arg(meta.version)
            .arg(&meta.site)
            .arg(generation)
            .invoke_async(&mut conn)
            .await?;
        Ok(changed == 1)
    }

    /// Makes `generation` the active one if it has caught up with the active one in every
    /// partition of deltas stream `source`; returns `(swapped, previous)`.
    pub async fn swap(&self, generation: &str, source: u64) -> Result<(bool, String), StoreError> {
        let mut conn = self.conn.clone();
        let r: Vec<String> = self
            .swap
            .arg(generation)
            .arg(source)
            .invoke_async(&mut conn)
            .await?;
        match r.as_slice() {
            [ok, old] => Ok((ok == "1", old.clone())),
            other => Err(StoreError::Protocol(format!("swap answered {other:?}"))),
        }
    }

    /// Takes a fresh generation number (never the active one) and claims `views:building`
    /// for it; refused while another rebuild holds it, unless `force`.
    pub async fn begin_rebuild(&self, force: bool) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let active = self.active_generation().await?;
        let generation = loop {
            let g: u64 = redis::cmd("INCR")
                .arg(NEXT_GEN_KEY)
                .query_async(&mut conn)
                .await?;
            if g.to_string() != active {
                break g.to_string();
            }
        };
        let mut claim = redis::cmd("SET");
        claim.arg(BUILDING_KEY).arg(&generation);
        if !force {
            claim.arg("NX");
        }
        let claimed: Option<String> = claim.query_async(&mut conn).await?;
        if claimed.is_none() {
            let holder: Option<String> = redis::cmd("GET")
                .arg(BUILDING_KEY)
                .query_async(&mut conn)
                .await?;
            return Err(StoreError::Busy(holder.unwrap_or_default()));
        }
        Ok(generation)
    }

    /// Gives up the rebuild of `generation`: releases `views:building` if it still names it,
    /// and deletes the generation.
    pub async fn abandon(&self, generation: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let holder: Option<String> = redis::cmd("GET")
            .arg(BUILDING_KEY)
            .query_async(&mut conn)
            .await?;
        if holder.as_deref() == Some(generation) {
            let _: i64 = redis::cmd("DEL")
                .arg(BUILDING_KEY)
                .query_async(&mut conn)
                .await?;
        }
        self.drop_generation(generation).await.map(|_| ())
    }

    /// Whether Redis answers a `PING`.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// The active generation.
    pub async fn active_generation(&self) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let g: Option<String> = redis::cmd("GET")
            .arg(ACTIVE_KEY)
            .query_async(&mut conn)
            .await?;
        Ok(g.unwrap_or_else(|| "0".into()))
    }

    async fn read(&self, what: Read<'_>) -> Result<Vec<String>, StoreError> {
        let (kind, arg, limit) = what.args();
        let mut conn = self.conn.clone();
        Ok(self
            .read
            .arg(kind)
            .arg(arg)
            .arg(limit)
            .invoke_async(&mut conn)
            .await?)
    }

    async fn read_list(&self, what: Read<'_>) -> Result<ViewList, StoreError> {
        let (list, undecodable) = contract::parse_view_list(&self.read(what).await?)?;
        for id in undecodable {
            tracing::warn!(sensor_id = %id, "undecodable view; skipped");
        }
        Ok(list)
    }

    /// Every sensor's view, by id.
    pub async fn sensors(&self) -> Result<ViewList, StoreError> {
        self.read_list(Read::Sensors).await
    }

    /// One sensor's view.
    pub async fn sensor(&self, id: &str) -> Result<Option<SensorView>, StoreError> {
        Ok(self.read_list(Read::Sensor(id)).await?.views.pop())
    }

    /// A site's sensors by |delta| descending (ties by id).
    pub async fn site(&self, site: &str) -> Result<ViewList, StoreError> {
        self.read_list(Read::Site(site)).await
    }

    /// The first `limit` sensors of the ranking (`abs(delta)` descending, ties by id).
    pub async fn top(&self, limit: usize) -> Result<ViewList, StoreError> {
        self.read_list(Read::Top(limit)).await
    }

    /// A sensor's history, `None` if it has no view.
    pub async fn history(&self, id: &str) -> Result<Option<History>, StoreError> {
        Ok(contract::parse_history(
            &self.read(Read::History(id)).await?,
        )?)
    }

    /// Deletes every key of `generation` (an old generation after a swap).
    pub async fn drop_generation(&self, generation: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let pattern = Keys::new(generation).pattern();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                removed += keys.len() as u64;
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}
