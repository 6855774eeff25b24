#!/usr/bin/env bash
# Browser test of query-api's dashboard (`/`) in a real headless Chromium, driven by Selenium
# (scripts/dashboard-test.py does the checks). Starts its own nats-server and redis-server on
# free 127.0.0.1 ports in a temporary folder and the DAG's services from the built binaries
# (`cargo build --workspace --bins` first), temperature-delta and view-builder with non-default
# options so the pipeline panel has something to prove. The readings come from CSV files the
# test writes (replayed by the thermometer) and one malformed reading it publishes itself.
# Screenshots (laptop and phone width) go to target/dashboard/.
#   scripts/dashboard-test.sh
#   KEEP_LOGS=1 scripts/dashboard-test.sh          # keep the services' logs
# Needs nats-server, redis-server, chromium, chromedriver and python3 with selenium
# (`pip install selenium`) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${CARGO_TARGET_DIR:-target}/debug
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
OUT=${DASHBOARD_OUT:-$ROOT/target/dashboard}
WORK=$(mktemp -d /tmp/kappa-dashboard.XXXXXX)
PIDS=()
cleanup() {
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() { echo "dashboard-test: $*" >&2; for f in "$WORK"/*.log; do echo "--- $f"; tail -20 "$f"; done >&2; exit 1; }
for b in nats-server redis-server redis-cli curl python3 chromium chromedriver; do
  command -v "$b" >/dev/null || fail "$b is not on PATH"
done
python3 -c 'import selenium' 2>/dev/null || fail "python3 has no selenium: pip install selenium"
for s in sensor-registry temperature-delta view-builder query-api thermometer; do
  [ -x "$BIN/$s" ] || fail "$BIN/$s is missing: run cargo build --workspace --bins"
done
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NATS_PORT=$(free_port); REDIS_PORT=$(free_port)
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/js" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 & PIDS+=($!)
export NATS_URL="nats://127.0.0.1:$NATS_PORT" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" KAPPA_PARTITIONS=4 RUST_LOG=warn
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.2
done
API_PORT=$(free_port)
start() { # name http-port env... (then the binary runs with them)
  local name=$1 port=$2; shift 2
  env "$@" HTTP_ADDR="127.0.0.1:$port" "$BIN/$name" >"$WORK/$name.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 1 150); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "$name did not become healthy"
}
# The options the pipeline panel must show (the test checks them; not the defaults).
export DASH_DELTA_WORKING=local DASH_DELTA_OBSERVED=stateful DASH_VIEWS_OBSERVED=stateless
start sensor-registry "$(free_port)"
start temperature-delta "$(free_port)" KAPPA_WORKING=$DASH_DELTA_WORKING KAPPA_OBSERVED=$DASH_DELTA_OBSERVED
start view-builder "$(free_port)" KAPPA_OBSERVED=$DASH_VIEWS_OBSERVED
start query-api "$API_PORT"
mkdir -p "$OUT" && rm -f "$OUT"/dashboard*.png   # no screenshot of an earlier run
# SE_OFFLINE: Selenium uses the browser and driver named here, and never downloads one.
DASH_API="http://127.0.0.1:$API_PORT" DASH_NATS_PORT=$NATS_PORT DASH_BIN=$BIN DASH_WORK=$WORK DASH_OUT=$OUT \
  DASH_PARTITIONS=$KAPPA_PARTITIONS CHROMIUM=$(command -v chromium) CHROMEDRIVER=$(command -v chromedriver) SE_OFFLINE=true \
  python3 scripts/dashboard-test.py || fail "the dashboard test failed"
