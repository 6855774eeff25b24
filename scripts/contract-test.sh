#!/usr/bin/env bash
# Contract test of query-api against its own /openapi.json, with schemathesis (property-based:
# it generates valid and invalid requests from the document). Starts its own nats-server and
# redis-server on free 127.0.0.1 ports in a temporary folder, the DAG's services from the
# built binaries (`cargo build --workspace --bins` first), fills the views with a short
# thermometer run, then checks every documented operation but the endless `/v1/live`: no 5xx,
# every status, content type and body as documented, schema-valid requests accepted and
# invalid ones (bad ids, limits, cursors) refused with a documented 4xx JSON error.
#   scripts/contract-test.sh                       # 25 examples per operation
#   CONTRACT_MAX_EXAMPLES=200 scripts/contract-test.sh
# Needs nats-server, redis-server and `st` (pip install schemathesis) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/debug
EXAMPLES=${CONTRACT_MAX_EXAMPLES:-25}
SENSORS=30
WORK=$(mktemp -d /tmp/kappa-contract.XXXXXX)
PIDS=()
cleanup() {
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() { echo "contract-test: $*" >&2; for f in "$WORK"/*.log; do echo "--- $f"; tail -20 "$f"; done >&2; exit 1; }
for b in nats-server redis-server st curl; do command -v "$b" >/dev/null || fail "$b is not on PATH"; done
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
start() { # name http-port args...
  local name=$1 port=$2; shift 2
  HTTP_ADDR="127.0.0.1:$port" "$BIN/$name" "$@" >"$WORK/$name.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 1 150); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "$name did not become healthy"
}
start sensor-registry "$(free_port)"
start temperature-delta "$(free_port)"
start view-builder "$(free_port)"
start query-api "$API_PORT"
API="http://127.0.0.1:$API_PORT"
HTTP_ADDR="127.0.0.1:$(free_port)" "$BIN/thermometer" --sensors "$SENSORS" --sites 3 --count 900 --rate 0 \
  --event-step-ms 1000 --seed 7 >"$WORK/thermometer.log" 2>&1 || fail "thermometer failed"
total=0
for _ in $(seq 1 150); do
  total=$(curl -fs "$API/v1/sensors?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])' 2>/dev/null || echo 0)
  [ "$total" = "$SENSORS" ] && break
  sleep 0.2
done
[ "$total" = "$SENSORS" ] || fail "the views hold $total sensors, not $SENSORS"
echo "views of $SENSORS sensors ready at $API; schemathesis, $EXAMPLES examples per operation"
# Checks: every one that applies to a read-only API without authentication. Run from the
# temporary folder: schemathesis keeps a cache folder in its working directory.
cd "$WORK"
st run "$API/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,positive_data_acceptance,unsupported_method \
  --exclude-path /v1/live \
  --max-examples "$EXAMPLES" \
  --generation-database none \
  --request-timeout 10 \
  --no-color \
  ${CONTRACT_SEED:+--seed "$CONTRACT_SEED"}
