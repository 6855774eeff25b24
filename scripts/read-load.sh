#!/usr/bin/env bash
# Load check of query-api's limits from other processes: wrk (Debian's package) reads single
# sensors, unloaded and then while a second wrk hammers full list pages and
# scripts/live-clients.py holds LIVE_CLIENTS `/v1/live` clients, for each list-page
# concurrency in LIST_CONCURRENCIES; writes the table as the `read-load` section of
# docs/BENCHMARKS.md (OUT=file to write elsewhere). Starts its own nats-server and
# redis-server on free 127.0.0.1 ports; uses target/release binaries (BIN= to change).
#   cargo build --release --bins && scripts/read-load.sh
# Nothing is asserted: it prints and writes the figures, ratios to the unloaded baseline of
# the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
SENSORS=${SENSORS:-1000}
LIVE_CLIENTS=${LIVE_CLIENTS:-1000}
SECS=${SECS:-10}
RATE=${RATE:-20}
LIST_CONCURRENCIES=${LIST_CONCURRENCIES:-"2 64"}
OUT=${OUT:-docs/BENCHMARKS.md}
WORK=$(mktemp -d /tmp/kappa-read-load.XXXXXX)
PIDS=()
cleanup() {
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() { echo "read-load: $*" >&2; exit 1; }
for b in nats-server redis-server wrk curl python3; do command -v "$b" >/dev/null || fail "$b is not on PATH"; done
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NATS_PORT=$(free_port); REDIS_PORT=$(free_port)
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/js" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 & PIDS+=($!)
export NATS_URL="nats://127.0.0.1:$NATS_PORT" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" RUST_LOG=warn
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.2
done
healthy() { for _ in $(seq 1 150); do curl -fs "http://$1/healthz" >/dev/null 2>&1 && return 0; sleep 0.2; done; fail "$1 did not become healthy"; }
start() { # name addr [env...]
  local name=$1 addr=$2; shift 2
  env HTTP_ADDR="$addr" "$@" "$BIN/$name" >>"$WORK/$name.log" 2>&1 & PIDS+=($!)
  healthy "$addr"
}
start sensor-registry "127.0.0.1:$(free_port)"
start temperature-delta "127.0.0.1:$(free_port)"
start view-builder "127.0.0.1:$(free_port)"
# Readings keep flowing all along (so live clients get events): RATE per second.
HTTP_ADDR="127.0.0.1:$(free_port)" "$BIN/thermometer" --sensors "$SENSORS" --sites 4 --rate "$RATE" \
  >"$WORK/thermometer.log" 2>&1 & PIDS+=($!)

cat >"$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"non2xx":%d,"errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout))
end
LUA
{ cat "$WORK/report.lua"; cat <<LUA
math.randomseed(7)
request = function()
  return wrk.format("GET", string.format("/v1/sensors/s-%04d", math.random(1, $SENSORS)))
end
LUA
} >"$WORK/single.lua"
{ cat "$WORK/report.lua"; cat <<'LUA'
local paths = {"/v1/sensors?limit=1000", "/v1/sites/site-1?limit=1000", "/v1/sites/site-2?limit=1000",
  "/v1/sites/site-3?limit=1000", "/v1/sites/site-4?limit=1000"}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
LUA
} >"$WORK/lists.lua"
wrk_json() { wrk "$@" | grep '^{' | tail -1; }

ROWS="$WORK/rows.jsonl"
: >"$ROWS"
for L in $LIST_CONCURRENCIES; do
  API="127.0.0.1:$(free_port)"
  env HTTP_ADDR="$API" QUERY_LIST_CONCURRENCY="$L" QUERY_MAX_LIVE=$((LIVE_CLIENTS + 100)) "$BIN/query-api" \
    >>"$WORK/query-api.log" 2>&1 &
  QA=$!; PIDS+=($QA)
  healthy "$API"
  for _ in $(seq 1 300); do
    t=$(curl -fs "http://$API/v1/sensors?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])' 2>/dev/null || echo 0)
    [ "$t" = "$SENSORS" ] && break
    sleep 0.2
  done
  [ "$t" = "$SENSORS" ] || fail "views hold $t sensors, not $SENSORS"
  echo "list concurrency $L: unloaded single-sensor reads (${SECS}s)"
  base=$(wrk_json -t1 -c8 -d"${SECS}s" -s "$WORK/single.lua" "http://$API")
  echo "list concurrency $L: $LIVE_CLIENTS live clients, lists hammered, single-sensor reads (${SECS}s)"
  python3 scripts/live-clients.py "$API" "$LIVE_CLIENTS" $((SECS + 6)) >"$WORK/live.json" &
  LIVE=$!
  sleep 3
  live_now=$(curl -fs "http://$API/metrics" | awk '/^kappa_query_live_clients/ {print $2}' | head -1)
  wrk_json -t1 -c32 -d"$((SECS + 2))s" -s "$WORK/lists.lua" "http://$API" >"$WORK/lists.json" &
  LISTS=$!
  sleep 1
  loaded=$(wrk_json -t1 -c8 -d"${SECS}s" -s "$WORK/single.lua" "http://$API")
  wait "$LISTS"; wait "$LIVE"
  python3 - "$L" "$base" "$loaded" "$(cat "$WORK/lists.json")" "$(cat "$WORK/live.json")" "${live_now:-0}" >>"$ROWS" <<'PY'
import json, sys
L, base, loaded, lists, live, live_now = sys.argv[1:]
print(json.dumps({"list_concurrency": int(L), "base": json.loads(base), "loaded": json.loads(loaded),
                  "lists": json.loads(lists), "live": json.loads(live), "live_gauge": float(live_now)}))
PY
  kill -TERM "$QA" 2>/dev/null || true; wait "$QA" 2>/dev/null || true
done

python3 - "$ROWS" "$OUT" "$SENSORS" "$LIVE_CLIENTS" "$SECS" "$RATE" <<'PY'
import datetime, json, os, subprocess, sys
rows_path, out, sensors, live_clients, secs, rate = sys.argv[1:]
rows = [json.loads(l) for l in open(rows_path) if l.strip()]
def rps(r): return r["requests"] / (r["duration_us"] / 1e6)
def ms(us): return f"{us / 1000:.2f}"
lines = []
lines.append("## Query API under load: single-sensor reads while lists are hammered and live clients connected\n")
lines.append(f"`scripts/read-load.sh` on {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}: "
             f"release binaries, {sensors} sensors on 4 sites, the thermometer publishing {rate} readings/s throughout "
             f"(so every live client gets every view change). Other processes load the API: `wrk -t1 -c8` reads random "
             f"single sensors for {secs} s, first alone (*unloaded*), then (*loaded*) while `wrk -t1 -c32` requests full "
             f"list pages (`/v1/sensors?limit=1000` and each site's, `limit=1000`, in turn) and `scripts/live-clients.py` "
             f"holds {live_clients} `/v1/live` clients. Everything shares the 2 cores, so figures compare within the run; "
             "nothing is asserted. `QUERY_LIST_CONCURRENCY` is the number of list pages query-api reads at once "
             "(the default is 2); each row is its own query-api process on the same views.\n")
lines.append("| `QUERY_LIST_CONCURRENCY` | single reads unloaded: req/s, p50 / p99 ms | loaded: req/s, p50 / p99 ms | loaded / unloaded: req/s, p99 | list pages: req/s, p99 ms, non-2xx | live clients connected (the gauge 3 s after they began connecting), refused, events received |")
lines.append("| --- | --- | --- | --- | --- | --- |")
for r in rows:
    b, l, li, lv = r["base"], r["loaded"], r["lists"], r["live"]
    lines.append(f"| {r['list_concurrency']} | {rps(b):.0f}, {ms(b['p50_us'])} / {ms(b['p99_us'])} | "
                 f"{rps(l):.0f}, {ms(l['p50_us'])} / {ms(l['p99_us'])} | "
                 f"{rps(l) / rps(b):.2f}, {l['p99_us'] / max(b['p99_us'], 1):.2f} | "
                 f"{rps(li):.0f}, {ms(li['p99_us'])}, {li['non2xx']} | "
                 f"{lv['connected']} ({r['live_gauge']:.0f}), {lv['refused']}, {lv['events']} |")
lines.append("")
body = "\n".join(lines) + "\n"
begin, end = "<!-- section:read-load -->", "<!-- /section:read-load -->"
block = f"{begin}\n{body}{end}\n"
old = open(out).read() if os.path.exists(out) else ""
a, b = old.find(begin), old.find(end)
if a >= 0 and b > a:
    new = old[:a] + block + "\n" + old[b + len(end):].lstrip("\n")
elif "## How to reproduce" in old:
    i = old.index("## How to reproduce")
    new = old[:i] + block + "\n" + old[i:]
else:
    new = old + ("\n" if old else "") + block
open(out, "w").write(new)
print(body)
print(f"(written to {out})")
PY
