#!/usr/bin/env bash
# Compose smoke test: brings up the reference DAG with the very docker-compose.yml a
# user runs, and checks that it answers the seed's question end to end:
#   1. GET http://127.0.0.1:8080/v1/sensors lists sensors with deltas;
#   2. a real NATS client subscribed on `thermo.>` sees readings and deltas.
# Always tears the stack down (docker compose down -v). Exits non-zero on failure.
#
# Environment:
#   SMOKE_BUILD_TIMEOUT  seconds allowed for `up -d --build` (default 1800: a cold
#                        release build of the workspace on 2 cores)
#   SMOKE_DATA_TIMEOUT   seconds allowed for deltas to reach the API (default 120)
#   SMOKE_NATS_TIMEOUT   seconds allowed for the NATS check (default 30)
#   SMOKE_SCALE_DELTA    temperature-delta instances (default 1; e.g. 3)
#   SMOKE_SKIP_IMAGES=1  do not run .ci/images.sh (the base images exist already)
#   COMPOSE_PROJECT_NAME project name (default kappa-smoke)
#   KAPPA_NATS_PORT, KAPPA_NATS_MONITOR_PORT, KAPPA_HTTP_PORT  host ports
#                        (default 24222, 28222, 28080)
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_TIMEOUT="${SMOKE_BUILD_TIMEOUT:-1800}"
DATA_TIMEOUT="${SMOKE_DATA_TIMEOUT:-120}"
NATS_TIMEOUT="${SMOKE_NATS_TIMEOUT:-30}"
SCALE_DELTA="${SMOKE_SCALE_DELTA:-1}"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-kappa-smoke}"
# No buildx on the CI engine: use the classic builder (docker-compose v1 and docker).
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" COMPOSE_DOCKER_CLI_BUILD="${COMPOSE_DOCKER_CLI_BUILD:-0}"
# Host ports of the stack (docker-compose.yml defaults 4222/8222/8080); the smoke uses its
# own so that it does not collide with a dev stack or a nats-server on the host.
export KAPPA_NATS_PORT="${KAPPA_NATS_PORT:-24222}" KAPPA_NATS_MONITOR_PORT="${KAPPA_NATS_MONITOR_PORT:-28222}" \
  KAPPA_HTTP_PORT="${KAPPA_HTTP_PORT:-28080}"
API="http://127.0.0.1:$KAPPA_HTTP_PORT"
# The admin user of docker/nats/permissions.conf (docker-compose.yml's default password).
NATS_URL_HOST="nats://admin:${KAPPA_NATS_ADMIN_PASSWORD:-admin-dev}@127.0.0.1:$KAPPA_NATS_PORT"

step() { printf '\n==> %s (%s)\n' "$*" "$(date +%T)"; }
fail() { printf '\nSMOKE FAILED: %s\n' "$*" >&2; FAILED=1; exit 1; }

if docker compose version >/dev/null 2>&1; then
  DC=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  DC=(docker-compose)
else
  echo "neither 'docker compose' nor 'docker-compose' is available" >&2
  exit 1
fi
command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }

FAILED=0
STARTED=0
BODY="$(mktemp)"
on_exit() {
  local rc=$?
  rm -f "$BODY"
  if [ "$STARTED" = 1 ]; then
    if [ "$rc" != 0 ] || [ "$FAILED" = 1 ]; then
      step "compose ps and logs (failure)"
      "${DC[@]}" ps || true
      "${DC[@]}" logs --no-color --tail=300 || true
    fi
    step "docker compose down -v"
    "${DC[@]}" down -v --remove-orphans || true
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

if [ "${SMOKE_SKIP_IMAGES:-0}" != 1 ]; then
  step "base images (.ci/images.sh)"
  .ci/images.sh
fi

step "${DC[*]} config"
"${DC[@]}" config -q

step "${DC[*]} up -d --build (timeout ${BUILD_TIMEOUT}s)"
STARTED=1
T0=$SECONDS
# Build first, so that the timeout and the timing cover the image build alone.
timeout "$BUILD_TIMEOUT" "${DC[@]}" build || fail "image build failed or timed out"
echo "images built in $((SECONDS - T0))s"
T1=$SECONDS
timeout "$BUILD_TIMEOUT" "${DC[@]}" up -d --build --scale "temperature-delta=$SCALE_DELTA" \
  || fail "compose up failed or timed out"
echo "stack up in $((SECONDS - T1))s"
"${DC[@]}" ps

step "waiting up to ${DATA_TIMEOUT}s for sensors with deltas on $API/v1/sensors"
check_sensors() {
  python3 - "$1" <<'EOF'
import json, sys
body = json.load(open(sys.argv[1]))
sensors = body.get("sensors") if isinstance(body, dict) else body
if not isinstance(sensors, list) or not sensors:
    sys.exit(1)
with_delta = [s for s in sensors if isinstance(s, dict) and isinstance(s.get("delta_celsius"), (int, float))]
if not with_delta:
    sys.exit(1)
seq = body.get("view_seq") if isinstance(body, dict) else None
print("query-api: %d sensors, %d with deltas, view_seq=%s; first: %s"
      % (len(sensors), len(with_delta), seq, json.dumps(with_delta[0])[:300]))
EOF
}
deadline=$((SECONDS + DATA_TIMEOUT))
ok=0
while [ "$SECONDS" -lt "$deadline" ]; do
  if curl -fsS --max-time 5 "$API/v1/sensors" -o "$BODY" 2>/dev/null && check_sensors "$BODY"; then
    ok=1
    break
  fi
  sleep 2
done
[ "$ok" = 1 ] || fail "no sensors with deltas from $API/v1/sensors after ${DATA_TIMEOUT}s (last body: $(head -c 500 "$BODY" 2>/dev/null))"
curl -fsS --max-time 5 "$API/healthz" >/dev/null || fail "$API/healthz is not healthy"

step "NATS: a subscription on 'thermo.>' sees readings and deltas within ${NATS_TIMEOUT}s"
python3 -c 'import nats' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check nats-py
python3 - "$NATS_URL_HOST" "$NATS_TIMEOUT" <<'EOF' || fail "NATS check failed"
import asyncio, sys
import nats

async def main(url, timeout):
    nc = await nats.connect(url, connect_timeout=5)
    seen = {}
    done = asyncio.Event()

    async def cb(msg):
        parts = msg.subject.split(".")
        if len(parts) >= 3 and parts[1] in ("readings", "deltas"):
            seen.setdefault(parts[1], msg.subject)
            if len(seen) == 2:
                done.set()

    await nc.subscribe("thermo.>", cb=cb)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    await nc.close()
    print("seen on thermo.>: %s" % seen)
    return 0 if len(seen) == 2 else 1

sys.exit(asyncio.run(main(sys.argv[1], float(sys.argv[2]))))
EOF

step "nats-box: docker compose run --rm nats-box nats sub --count 2 'thermo.>'"
timeout 90 "${DC[@]}" run --rm -T nats-box nats sub --count 2 'thermo.>' \
  || fail "nats-box could not watch thermo.>"

step "container health (up to 90s)"
health() {
  "${DC[@]}" ps -q | xargs -r docker inspect \
    -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}} {{.State.Status}}'
}
deadline=$((SECONDS + 90))
while :; do
  states="$(health)"
  unhealthy="$(printf '%s\n' "$states" | grep -v -E ' (healthy|no-healthcheck) running$' || true)"
  [ -n "$unhealthy" ] && [ "$SECONDS" -lt "$deadline" ] || break
  sleep 3
done
printf '%s\n' "$states"
[ -z "$unhealthy" ] || fail "containers not healthy: $unhealthy"

step "compose smoke passed"
