#!/usr/bin/env bash
# Aggregate temperature-delta throughput with 1, 2 and 3 cooperating instances (release binaries,
# remote state, 12 partitions, 1000 sensors). Needs nats-server, redis-server and python3 with
# nats-py; run `cargo build --release --bins` first. Prints one line per instance count.
set -u
B=$(cd "$(dirname "$0")/.." && pwd)/target/release
W=$(mktemp -d)
NP=34222; RP=36379
nats-server -js -a 127.0.0.1 -p $NP -sd $W/js >$W/nats.log 2>&1 & NPID=$!
redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no >$W/redis.log 2>&1 & RPID=$!
sleep 1
export NATS_URL=nats://127.0.0.1:$NP REDIS_URL=redis://127.0.0.1:$RP KAPPA_PARTITIONS=12
HTTP_ADDR=127.0.0.1:39102 $B/sensor-registry >$W/reg.log 2>&1 & REG=$!
sleep 1
N=60000
cnt() { python3 - "$1" <<'PY'
import asyncio, sys, nats
async def m():
    nc = await nats.connect("nats://127.0.0.1:34222"); js = nc.jetstream()
    try: print((await js.stream_info(sys.argv[1])).state.messages)
    except Exception: print(0)
    await nc.close()
asyncio.run(m())
PY
}
for inst in 1 2 3; do
  python3 - <<'PY'
import asyncio, nats
async def m():
    nc = await nats.connect("nats://127.0.0.1:34222"); js = nc.jetstream()
    for s in ["READINGS","DELTAS","DLQ","KV_KAPPA_LEASES_TEMPERATURE_DELTA"]:
        try: await js.delete_stream(s)
        except Exception: pass
    await nc.close()
asyncio.run(m())
PY
  redis-cli -p $RP FLUSHALL >/dev/null
  HTTP_ADDR=127.0.0.1:39101 $B/thermometer --sensors 1000 --count $N --rate 0 --event-step-ms 1000 --out-of-order 0 >/dev/null 2>&1
  PIDS=()
  for i in $(seq 1 $inst); do HTTP_ADDR=127.0.0.1:3920$i $B/temperature-delta >$W/td$i.log 2>&1 & PIDS+=($!); done
  t0=$(date +%s.%N)
  while [ "$(cnt DELTAS)" -lt $N ]; do sleep 0.2; done
  t1=$(date +%s.%N)
  kill ${PIDS[@]}; wait ${PIDS[@]} 2>/dev/null
  python3 -c "print('instances=$inst readings=$N secs=%.2f rate=%.0f/s (includes lease acquisition at start)' % ($t1-$t0, $N/($t1-$t0)))"
done
kill $REG $NPID $RPID; rm -rf $W
