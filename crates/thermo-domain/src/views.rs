//! The views' contract between view-builder (the only writer) and query-api (a reader): the
//! Redis key layout, the view and history JSON, and the read protocol (one Lua script, so every
//! read is consistent, and the parsing of its answer). Data and pure functions only: running
//! the script is the reader's business.
//!
//! # Redis key layout
//!
//! Every key of a *generation* `g` starts with `views:{g}:` (one hash tag, so a generation also
//! lives in one Redis Cluster slot). `views:active` names the generation queries read (absent
//! means `0`); a rebuild fills a fresh generation and swaps it in.
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `views:{g}:sensor:<id>` | hash | `delta` (latest delta JSON), `seq` (its deltas-stream sequence), `meta` (newest [`SensorMeta`] JSON), `mv` (its version), `site` (the site the sensor is ranked in) |
//! | `views:{g}:history:<id>` | list | the last `--history-len` [`HistoryEntry`] points, oldest first |
//! | `views:{g}:site:<site>` | sorted set | the site's sensors, score [`rank_score`] |
//! | `views:{g}:rank` | sorted set | every sensor, score [`rank_score`] |
//! | `views:{g}:sensors` | sorted set | every sensor with a view (score 0: ordered by id) |
//! | `views:{g}:sites` | set | every site with at least one sensor |
//! | `views:{g}:positions` | hash | partition -> last applied deltas-stream sequence |
//! | `views:{g}:sources` | hash | partition -> identity (creation time) of the deltas stream its position refers to |
//! | `views:{g}:epochs` | hash | partition -> fencing epoch of its current writer |
//! | `views:active`, `views:building`, `views:next-gen` | string | generation pointers |
//!
//! Scores are `-|delta|` so that ascending order is "largest change first", and equal changes
//! come out by sensor id ascending (Redis orders equal scores by member).

use serde::{Deserialize, Serialize};

use crate::{Delta, Sensor};

/// The key naming the generation queries read (absent = generation `0`).
pub const ACTIVE_KEY: &str = "views:active";
/// The key naming the generation a rebuild is filling (absent when none runs).
pub const BUILDING_KEY: &str = "views:building";
/// Counter handing out generation numbers to rebuilds.
pub const NEXT_GEN_KEY: &str = "views:next-gen";

/// The keys of one generation, `views:{<gen>}:...` (one hash tag per generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys of generation `gen`.
    pub fn new(generation: &str) -> Self {
        Self {
            prefix: format!("views:{{{generation}}}:"),
        }
    }
    /// `views:{g}:sensor:<id>`: hash `delta`, `seq`, `meta`, `mv`, `site`.
    pub fn sensor(&self, id: &str) -> String {
        format!("{}sensor:{id}", self.prefix)
    }
    /// `views:{g}:history:<id>`: list of history points, oldest first.
    pub fn history(&self, id: &str) -> String {
        format!("{}history:{id}", self.prefix)
    }
    /// `views:{g}:site:<site>`: sorted set of the site's sensors by `-|delta|`.
    pub fn site(&self, site: &str) -> String {
        format!("{}site:{site}", self.prefix)
    }
    /// `views:{g}:rank`: every sensor by `-|delta|`.
    pub fn rank(&self) -> String {
        format!("{}rank", self.prefix)
    }
    /// `views:{g}:sensors`: every sensor with a view (score 0, so ordered by id).
    pub fn sensors(&self) -> String {
        format!("{}sensors", self.prefix)
    }
    /// `views:{g}:sites`: every site with at least one sensor.
    pub fn sites(&self) -> String {
        format!("{}sites", self.prefix)
    }
    /// `views:{g}:positions`: partition -> last applied deltas-stream sequence.
    pub fn positions(&self) -> String {
        format!("{}positions", self.prefix)
    }
    /// `views:{g}:epochs`: partition -> fencing epoch of its writer.
    pub fn epochs(&self) -> String {
        format!("{}epochs", self.prefix)
    }
    /// A `SCAN MATCH` pattern covering the whole generation.
    pub fn pattern(&self) -> String {
        format!("{}*", self.prefix)
    }
}

/// Sensor metadata shown in a view: the registry's, or (until the registry's is known) the one
/// the delta was computed with. The highest `version` wins.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorMeta {
    /// The sensor's site; decides the site view the sensor is ranked in.
    pub site: String,
    /// Calibration offset.
    pub calibration_offset: f64,
    /// Window length in seconds.
    pub window_secs: u32,
    /// Registry version.
    pub version: u64,
}

impl SensorMeta {
    /// The metadata a delta was computed with.
    pub fn from_delta(d: &Delta) -> Self {
        Self {
            site: d.site.clone(),
            calibration_offset: d.calibration_offset,
            window_secs: d.window_secs,
            version: d.sensor_version,
        }
    }

    /// The registry's metadata.
    pub fn from_sensor(s: &Sensor) -> Self {
        Self {
            site: s.site.clone(),
            calibration_offset: s.calibration_offset,
            window_secs: s.window_secs,
            version: s.version,
        }
    }

    /// The newer of two (the registry's on a tie, passed as `b`).
    pub fn newest(a: Self, b: Option<Self>) -> Self {
        match b {
            Some(b) if b.version >= a.version => b,
            _ => a,
        }
    }
}

/// A sensor's view as query-api serves it and as `thermo.views.sensor.<id>` carries it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorView {
    /// The sensor.
    pub sensor_id: String,
    /// Its site (from the newest metadata).
    pub site: String,
    /// `latest_celsius - oldest_celsius` of the latest delta.
    pub delta_celsius: f64,
    /// Newest value in the window.
    pub latest_celsius: f64,
    /// Oldest value in the window.
    pub oldest_celsius: f64,
    /// Smallest value in the window.
    pub min_celsius: f64,
    /// Largest value in the window.
    pub max_celsius: f64,
    /// Readings in the window.
    pub samples: u32,
    /// Window length the delta used.
    pub window_secs: u32,
    /// Window end `T`.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub window_end: time::OffsetDateTime,
    /// Event time of the reading behind the latest delta.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub measured_at: time::OffsetDateTime,
    /// Calibration offset the delta used.
    pub calibration_offset: f64,
    /// Registry version the delta used.
    pub sensor_version: u64,
    /// Readings-stream sequence of the reading behind the latest delta.
    pub source_seq: u64,
    /// Deltas-stream sequence of the latest delta (what this view reflects).
    pub view_seq: u64,
    /// The newest sensor metadata known.
    pub sensor: SensorMeta,
}

/// Composes a view from its stored parts.
pub fn compose(delta: &Delta, view_seq: u64, meta: SensorMeta) -> SensorView {
    SensorView {
        sensor_id: delta.sensor_id.clone(),
        site: meta.site.clone(),
        delta_celsius: delta.delta_celsius,
        latest_celsius: delta.latest_celsius,
        oldest_celsius: delta.oldest_celsius,
        min_celsius: delta.min_celsius,
        max_celsius: delta.max_celsius,
        samples: delta.samples,
        window_secs: delta.window_secs,
        window_end: delta.window_end,
        measured_at: delta.measured_at,
        calibration_offset: delta.calibration_offset,
        sensor_version: delta.sensor_version,
        source_seq: delta.source_seq,
        view_seq,
        sensor: meta,
    }
}

/// One point of a sensor's history (the sparkline).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The delta.
    pub delta_celsius: f64,
    /// Newest value in the window.
    pub latest_celsius: f64,
    /// Window end.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub window_end: time::OffsetDateTime,
    /// Readings-stream sequence.
    pub source_seq: u64,
    /// Deltas-stream sequence.
    pub view_seq: u64,
}

impl HistoryEntry {
    /// The history point of a delta stored at `view_seq`.
    pub fn of(d: &Delta, view_seq: u64) -> Self {
        Self {
            delta_celsius: d.delta_celsius,
            latest_celsius: d.latest_celsius,
            window_end: d.window_end,
            source_seq: d.source_seq,
            view_seq,
        }
    }
}

/// The ranking score of a delta: `-|delta|`, so ascending order is |delta| descending and ties
/// fall back to the member (sensor id) ascending.
pub fn rank_score(delta_celsius: f64) -> f64 {
    -delta_celsius.abs()
}

/// Where the views stand in one partition of the deltas stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionPosition {
    /// Last deltas-stream sequence applied in the partition.
    pub position: u64,
    /// Identity (creation time) of the deltas stream `position` refers to.
    pub source: u64,
}

/// The views' position in every partition they have applied something in, as one read saw it.
pub type Positions = std::collections::BTreeMap<u32, PartitionPosition>;

/// The highest position over the partitions (not a watermark: a partition may be behind it).
pub fn highest(positions: &Positions) -> u64 {
    positions.values().map(|p| p.position).max().unwrap_or(0)
}

/// A read of a list of views.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewList {
    /// Where the views stood, per partition, when the list was read.
    pub positions: Positions,
    /// The views, in the list's order.
    pub views: Vec<SensorView>,
}

/// A read of a sensor's history.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// Where the views stood, per partition, when the history was read.
    pub positions: Positions,
    /// The sensor's view sequence.
    pub view_seq: u64,
    /// Points, oldest first.
    pub points: Vec<HistoryEntry>,
}

/// A consistent read of the active generation (`EVAL` it with no keys; the arguments are
/// [`Read::args`], then [`Read::cursor`] for pages). Returns every partition's position
/// ([`parse_positions`]), then per view: id, delta JSON, seq, meta JSON (pages put the list's size and
/// the next cursor, `''` on the last page, before the views: [`parse_view_page`]); for
/// `history`: the position, the sensor's seq (`''` if it has no view) and the points. Parse the
/// answer with [`parse_view_list`], [`parse_view_page`] or [`parse_history`].
pub const READ_SCRIPT: &str = r"
local gen = redis.call('GET', 'views:active') or '0'
local P = 'views:{' .. gen .. '}:'
local kind = ARGV[1]
local arg = ARGV[2]
local limit = tonumber(ARGV[3])
-- Every partition's position and the identity of the stream it refers to:
-- '<partition>:<position>:<source>' joined by ','.
local srcs = {}
local sv = redis.call('HGETALL', P .. 'sources')
for i = 1, #sv, 2 do srcs[sv[i]] = sv[i + 1] end
local parts = {}
local pv = redis.call('HGETALL', P .. 'positions')
for i = 1, #pv, 2 do
  table.insert(parts, pv[i] .. ':' .. pv[i + 1] .. ':' .. (srcs[pv[i]] or '0'))
end
local out = {table.concat(parts, ',')}
if kind == 'history' then
  local seq = redis.call('HGET', P .. 'sensor:' .. arg, 'seq')
  if not seq then
    table.insert(out, '')
    return out
  end
  table.insert(out, seq)
  for _, e in ipairs(redis.call('LRANGE', P .. 'history:' .. arg, 0, -1)) do
    table.insert(out, e)
  end
  return out
end
if kind == 'sensors_page' or kind == 'site_page' then
  -- One page after a cursor: O(log N + limit) whatever the number of sensors, and ZCARD is
  -- O(1). ARGV[4] is the cursor ('' = the first page): for 'sensors_page' the last id of the
  -- previous page; for 'site_page' '<score>:<id>' of it.
  local after = ARGV[4] or ''
  local key
  local ids = {}
  local next_cursor = ''
  if kind == 'sensors_page' then
    key = P .. 'sensors'
    local min = '-'
    if after ~= '' then min = '(' .. after end
    local got = redis.call('ZRANGEBYLEX', key, min, '+', 'LIMIT', 0, limit + 1)
    for i = 1, math.min(#got, limit) do ids[i] = got[i] end
    if #got > limit then next_cursor = got[limit] end
  else
    key = P .. 'site:' .. arg
    local start = 0
    if after ~= '' then
      local sep = string.find(after, ':', 1, true)
      local score = string.sub(after, 1, sep - 1)
      local id = string.sub(after, sep + 1)
      local cur = redis.call('ZSCORE', key, id)
      if cur and tonumber(cur) == tonumber(score) then
        start = redis.call('ZRANK', key, id) + 1
      else
        -- The cursor's sensor moved since: resume at the first member not ranked before its
        -- old score.
        start = redis.call('ZCOUNT', key, '-inf', '(' .. score)
      end
    end
    local got = redis.call('ZRANGE', key, start, start + limit, 'WITHSCORES')
    local n = math.min(#got / 2, limit)
    for i = 1, n do ids[i] = got[2 * i - 1] end
    if #got / 2 > limit then next_cursor = got[2 * n] .. ':' .. got[2 * n - 1] end
  end
  table.insert(out, tostring(redis.call('ZCARD', key)))
  table.insert(out, next_cursor)
  for _, id in ipairs(ids) do
    local h = redis.call('HMGET', P .. 'sensor:' .. id, 'delta', 'seq', 'meta')
    if h[1] and h[2] and h[3] then
      table.insert(out, id)
      table.insert(out, h[1])
      table.insert(out, h[2])
      table.insert(out, h[3])
    end
  end
  return out
end
local ids
if kind == 'sensors' then
  ids = redis.call('ZRANGE', P .. 'sensors', 0, -1)
elseif kind == 'site' then
  ids = redis.call('ZRANGE', P .. 'site:' .. arg, 0, -1)
elseif kind == 'top' then
  -- Read from the full ranking: O(log N + limit), nothing to maintain per batch.
  ids = redis.call('ZRANGE', P .. 'rank', 0, limit - 1)
else
  ids = {arg}
end
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', P .. 'sensor:' .. id, 'delta', 'seq', 'meta')
  if h[1] and h[2] and h[3] then
    table.insert(out, id)
    table.insert(out, h[1])
    table.insert(out, h[2])
    table.insert(out, h[3])
  end
end
return out
";

/// What [`READ_SCRIPT`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'a> {
    /// Every sensor's view, by id (O(all sensors): for tools and tests, not for the API).
    Sensors,
    /// A page of at most `limit` views by id, after the id `after` (`""`: the first page).
    SensorsPage {
        /// The cursor: the last id of the previous page.
        after: &'a str,
        /// Page size.
        limit: usize,
    },
    /// A page of at most `limit` views of a site by |delta| descending (ties by id), after
    /// the cursor `after` (`"<score>:<id>"` of the previous page's last view; `""`: the first).
    SitePage {
        /// The site.
        site: &'a str,
        /// The cursor.
        after: &'a str,
        /// Page size.
        limit: usize,
    },
    /// One sensor's view.
    Sensor(&'a str),
    /// A site's sensors by |delta| descending (ties by id).
    Site(&'a str),
    /// The first `n` sensors of the ranking.
    Top(usize),
    /// A sensor's history.
    History(&'a str),
}

impl Read<'_> {
    /// The script's arguments: kind, argument, limit.
    pub fn args(&self) -> (&'static str, &str, usize) {
        match *self {
            Self::Sensors => ("sensors", "", 0),
            Self::SensorsPage { limit, .. } => ("sensors_page", "", limit),
            Self::SitePage { site, limit, .. } => ("site_page", site, limit),
            Self::Sensor(id) => ("sensor", id, 1),
            Self::Site(site) => ("site", site, 0),
            Self::Top(n) => ("top", "", n),
            Self::History(id) => ("history", id, 0),
        }
    }

    /// The page cursor, the script's fourth argument (`""` for reads that are not pages).
    pub fn cursor(&self) -> &str {
        match *self {
            Self::SensorsPage { after, .. } | Self::SitePage { after, .. } => after,
            _ => "",
        }
    }
}

/// A page of a list read ([`Read::SensorsPage`], [`Read::SitePage`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewPage {
    /// The views of the page, and the highest applied position over the partitions.
    pub list: ViewList,
    /// How many sensors the whole list holds now.
    pub total: u64,
    /// The cursor of the next page, `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Parses the answer to a page read. Views that do not decode are left out; their ids come
/// second, for the caller to log.
pub fn parse_view_page(answer: &[String]) -> Result<(ViewPage, Vec<String>), BadAnswer> {
    let [head, total, next, rest @ ..] = answer else {
        return Err(BadAnswer("short page answer".into()));
    };
    let mut list_answer = Vec::with_capacity(rest.len() + 1);
    list_answer.push(head.clone());
    list_answer.extend_from_slice(rest);
    let (list, undecodable) = parse_view_list(&list_answer)?;
    Ok((
        ViewPage {
            list,
            total: parse_u64(total)?,
            next_cursor: (!next.is_empty()).then(|| next.clone()),
        },
        undecodable,
    ))
}

/// An answer of [`READ_SCRIPT`] that does not follow its protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected answer from redis: {0}")]
pub struct BadAnswer(pub String);

fn parse_u64(s: &str) -> Result<u64, BadAnswer> {
    s.parse()
        .map_err(|_| BadAnswer(format!("not a number: {s}")))
}

/// Parses the head of a [`READ_SCRIPT`] answer: `<partition>:<position>:<source>` joined by
/// `,` (empty when no partition has a position yet).
pub fn parse_positions(head: &str) -> Result<Positions, BadAnswer> {
    let mut out = Positions::new();
    for part in head.split(',').filter(|p| !p.is_empty()) {
        let mut it = part.split(':');
        let (Some(p), Some(pos), Some(src), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(BadAnswer(format!("not a partition position: {part}")));
        };
        let p = p
            .parse()
            .map_err(|_| BadAnswer(format!("not a partition: {p}")))?;
        out.insert(
            p,
            PartitionPosition {
                position: parse_u64(pos)?,
                source: parse_u64(src)?,
            },
        );
    }
    Ok(out)
}

/// Parses the answer to a list read (every [`Read`] but `History`). Views that do not decode
/// are left out; their ids come second, for the caller to log.
pub fn parse_view_list(answer: &[String]) -> Result<(ViewList, Vec<String>), BadAnswer> {
    let (head, rest) = answer
        .split_first()
        .ok_or_else(|| BadAnswer("empty read answer".into()))?;
    let positions = parse_positions(head)?;
    let mut views = Vec::with_capacity(rest.len() / 4);
    let mut undecodable = Vec::new();
    for item in rest.chunks(4) {
        let [id, delta, seq, meta] = item else {
            continue;
        };
        let parsed = (
            serde_json::from_str::<Delta>(delta),
            parse_u64(seq),
            serde_json::from_str::<SensorMeta>(meta),
        );
        match parsed {
            (Ok(d), Ok(s), Ok(m)) => views.push(compose(&d, s, m)),
            _ => undecodable.push(id.clone()),
        }
    }
    Ok((ViewList { positions, views }, undecodable))
}

/// Parses the answer to [`Read::History`]: `None` if the sensor has no view. Points that do
/// not decode are left out.
pub fn parse_history(answer: &[String]) -> Result<Option<History>, BadAnswer> {
    let (Some(head), Some(seq)) = (answer.first(), answer.get(1)) else {
        return Err(BadAnswer("short history answer".into()));
    };
    if seq.is_empty() {
        return Ok(None);
    }
    let points = answer[2..]
        .iter()
        .filter_map(|e| serde_json::from_str::<HistoryEntry>(e).ok())
        .collect();
    Ok(Some(History {
        positions: parse_positions(head)?,
        view_seq: parse_u64(seq)?,
        points,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(id: &str, d: f64, source_seq: u64) -> Delta {
        let t = time::macros::datetime!(2026-11-24 17:00 UTC);
        Delta {
            sensor_id: id.into(),
            site: "lab".into(),
            delta_celsius: d,
            oldest_celsius: 20.0,
            latest_celsius: 20.0 + d,
            min_celsius: 20.0,
            max_celsius: 20.0 + d,
            samples: 2,
            window_secs: 600,
            measured_at: t,
            window_end: t,
            reading_celsius: 20.0 + d,
            calibration_offset: 0.0,
            sensor_version: 1,
            source_seq,
        }
    }

    #[test]
    fn keys_share_a_hash_tag_per_generation() {
        let k = Keys::new("3");
        assert_eq!(k.sensor("s-1"), "views:{3}:sensor:s-1");
        assert_eq!(k.history("s-1"), "views:{3}:history:s-1");
        assert_eq!(k.site("lab"), "views:{3}:site:lab");
        assert_eq!(k.rank(), "views:{3}:rank");
        assert_eq!(k.positions(), "views:{3}:positions");
        assert_eq!(k.pattern(), "views:{3}:*");
    }

    #[test]
    fn newest_meta_wins_and_registry_wins_ties() {
        let d = delta("a", 1.0, 1);
        let from_delta = SensorMeta::from_delta(&d);
        let mut reg = from_delta.clone();
        reg.site = "roof".into();
        assert_eq!(
            SensorMeta::newest(from_delta.clone(), Some(reg.clone())).site,
            "roof"
        );
        reg.version = 0;
        assert_eq!(
            SensorMeta::newest(from_delta.clone(), Some(reg)).site,
            "lab"
        );
        assert_eq!(SensorMeta::newest(from_delta, None).site, "lab");
    }

    #[test]
    fn view_has_the_contract_fields() {
        let d = delta("s-1", -2.5, 9);
        let v = compose(&d, 42, SensorMeta::from_delta(&d));
        let j = serde_json::to_value(&v).expect("json");
        for f in [
            "sensor_id",
            "site",
            "delta_celsius",
            "latest_celsius",
            "oldest_celsius",
            "min_celsius",
            "max_celsius",
            "samples",
            "window_end",
            "source_seq",
            "view_seq",
        ] {
            assert!(j.get(f).is_some(), "missing {f}");
        }
        assert_eq!(j["view_seq"], 42);
        assert_eq!(j["window_end"], "2026-11-24T17:00:00Z");
        assert_eq!(rank_score(-2.5), -2.5);
        assert_eq!(rank_score(2.5), -2.5);
    }

    #[test]
    fn read_answers_parse() {
        let d = delta("a", 1.0, 5);
        let meta = SensorMeta::from_delta(&d);
        let answer = vec![
            "0:7:100,3:2:100".to_string(),
            "a".into(),
            serde_json::to_string(&d).expect("json"),
            "6".into(),
            serde_json::to_string(&meta).expect("json"),
            "b".into(),
            "{nope".into(),
            "3".into(),
            "{}".into(),
        ];
        let (list, bad) = parse_view_list(&answer).expect("list");
        assert_eq!(highest(&list.positions), 7);
        assert_eq!(
            list.positions.get(&3),
            Some(&PartitionPosition {
                position: 2,
                source: 100
            })
        );
        assert_eq!(list.views, vec![compose(&d, 6, meta)]);
        assert_eq!(bad, vec!["b".to_string()]);
        assert!(parse_view_list(&[]).is_err());
        assert!(parse_view_list(&["x".into()]).is_err());
        assert!(parse_view_list(&["0:1".into()]).is_err());
        assert_eq!(
            parse_view_list(&[String::new()]).map(|l| l.0.positions.len()),
            Ok(0)
        );

        let point = serde_json::to_string(&HistoryEntry::of(&d, 6)).expect("json");
        let h = parse_history(&["0:7:1".into(), "6".into(), point])
            .expect("history")
            .expect("some");
        assert_eq!((h.view_seq, h.points.len()), (6, 1));
        assert_eq!(parse_history(&["0:7:1".into(), String::new()]), Ok(None));
        assert!(parse_history(&["0:7:1".into()]).is_err());
        assert_eq!(Read::Top(3).args(), ("top", "", 3));
    }
}
