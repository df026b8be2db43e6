#!/usr/bin/env bash
# The baseline figures of loadtest/README.md, reproducibly: release builds, the gateway pinned to
# CPU 0 and the load tester to CPU 1 (taskset), one media worker, each scenario RUNS times, the
# median of every headline figure printed at the end. JSON and plots of every run go to $OUT.
#   loadtest/baseline.sh                 all three scenarios, 3 runs each (~20 min on 2 cores)
#   RUNS=1 SCENARIOS="storm" loadtest/baseline.sh
# Scenarios:
#   fanout  1 room, 1 publisher (1.5 Mbit/s VP8 720p + Opus) x 200 subscribers, 60 s
#   ramp    4 rooms x 1 publisher (same media), subscribers +RAMP_STEP (40) per step until loss > 1% or
#           p99 > 50 ms; capacity at the knee with media.workers = 1
#   storm   1 room, 200 participants (1 publisher + 199 subscribers) joining at 50/s
#   fanout150  1 room, 1 publisher x 150 subscribers, 40 s (the per-packet cost figure of
#           docs/performance.md)
#   load70  2 rooms x 1 publisher x 170 subscribers, 40 s (~70% of a core: the latency-under-load figure)
# GATEWAY_ENV="GATEWAY__MEDIA__DIRECT_SEND=false" adds environment to the gateway (A/B runs);
# LOADTEST_ARGS="--pacing 2.5" adds flags to every loadtest run; GW_BIN / LT_BIN run other builds;
# NAME_SUFFIX keeps such runs' files apart (fanout150-polled-1.json, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SCENARIOS=${SCENARIOS:-"fanout ramp storm"}
OUT=${OUT:-test-output/baseline}
HTTP_PORT=${HTTP_PORT:-46080}
KEY=baseline-api-key
mkdir -p "$OUT"

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -p gateway -p loadtest
GW_BIN=${GW_BIN:-target/release/gateway}
LT_BIN=${LT_BIN:-target/release/loadtest}

GW_PID=
start_gateway() {
  GATEWAY__HTTP__BIND=127.0.0.1:$HTTP_PORT \
  GATEWAY__MEDIA__PORT_MIN=46000 GATEWAY__MEDIA__PORT_MAX=46999 \
  GATEWAY__MEDIA__WORKERS=1 \
  GATEWAY__AUTH__API_KEY=$KEY \
  GATEWAY__LOG__LEVEL=warn \
    env ${GATEWAY_ENV:-} taskset -c 0 "$GW_BIN" > "$OUT/gateway-$1.log" 2>&1 &
  GW_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" > /dev/null && return 0
    sleep 0.1
  done
  echo "gateway did not start" >&2
  return 1
}
stop_gateway() {
  [ -n "$GW_PID" ] && kill -TERM "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null || true
  GW_PID=
}
trap stop_gateway EXIT

loadtest() { # name, args...
  local name=$1
  shift
  echo "==> $name: loadtest $*"
  taskset -c 1 "$LT_BIN" --url "http://127.0.0.1:$HTTP_PORT" --api-key "$KEY" --pid "$GW_PID" --threads 1 --quiet \
    --json "$OUT/$name.json" --plot "$OUT/$name.png" "$@" ${LOADTEST_ARGS:-} | tee "$OUT/$name.txt"
  # The gateway's own added latency (read to sendto, per forwarded packet) over the whole run.
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" > "$OUT/$name.metrics" || true
}

for scenario in $SCENARIOS; do
  for run in $(seq "$RUNS"); do
    start_gateway "$scenario-$run"
    case $scenario in
      fanout) loadtest "fanout-$run" --rooms 1 --publishers 1 --subscribers 200 --video-bitrate 1.5M --join-rate 50 --duration 60s ;;
      ramp) loadtest "ramp-$run" --rooms 4 --publishers 1 --subscribers 0 --video-bitrate 1.5M --join-rate 50 \
              --ramp --ramp-step "${RAMP_STEP:-40}" --ramp-step-duration 5s --max-loss 1 --max-p99-ms "${MAX_P99_MS:-50}" --ramp-max 960 ;;
      storm) loadtest "storm-$run" --rooms 1 --publishers 1 --subscribers 199 --video-bitrate 1.5M --join-rate 50 --duration 10s ;;
      fanout150) loadtest "fanout150${NAME_SUFFIX:-}-$run" --rooms 1 --publishers 1 --subscribers 150 --video-bitrate 1.5M --join-rate 50 --duration 40s ;;
      load70) loadtest "load70${NAME_SUFFIX:-}-$run" --rooms 2 --publishers 1 --subscribers 340 --video-bitrate 1.5M --join-rate 50 --duration 40s ;;
    esac
    stop_gateway
    sleep 2
  done
done

python3 - "$OUT" $(for s in $SCENARIOS; do echo "$s${NAME_SUFFIX:-}"; done) <<'EOF'
import glob, json, statistics, sys
out, scenarios = sys.argv[1], sys.argv[2:]
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
for s in scenarios:
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{s}-*.json"))]
    if not runs:
        continue
    print(f"\n{s}: medians of {len(runs)} runs")
    rows = {
        "connections READY": [r["participants"]["publish_ready"] + r["participants"]["subscribe_ready"] for r in runs],
        "connections asked": [r["participants"]["connections"] for r in runs],
        "join subscribe p50 ms": [r["join_ms"]["subscribe"]["p50"] for r in runs],
        "join subscribe p99 ms": [r["join_ms"]["subscribe"]["p99"] for r in runs],
        "join phase s": [r["join_phase_s"] for r in runs],
        "loss % (all)": [r["media"]["loss_pct"] for r in runs],
        "loss % (steady)": [r["steady"]["loss_pct"] for r in runs],
        "latency p50 ms": [r["steady"]["latency_ms"]["p50"] for r in runs],
        "latency p99 ms": [r["steady"]["latency_ms"]["p99"] for r in runs],
        "received pkt/s": [r["steady"]["received_pps"] for r in runs],
        "gateway forwarded pkt/s": [r["steady"]["gateway_forwarded_pps"] for r in runs],
        "gateway CPU %": [r["steady"]["gateway_cpu_pct"] for r in runs],
        "gateway CPU us/forwarded packet": [r["steady"]["gateway_cpu_us_per_forwarded_packet"] for r in runs],
        "gateway RSS max MB": [r["gateway"]["rss_mb_max"] for r in runs],
        "loadtest CPU %": [r["steady"]["loadtest_cpu_pct"] for r in runs],
        "gateway waited for CPU %": [r["steady"]["gateway_cpu_wait_pct"] for r in runs],
        "loadtest waited for CPU %": [r["steady"]["loadtest_cpu_wait_pct"] for r in runs],
        "machine CPU stolen by hypervisor %": [r["steady"].get("machine_steal_pct") for r in runs],
        "unmatched payloads": [r["media"]["unmatched_payloads"] for r in runs],
    }
    if runs[0].get("ramp"):
        knees = [r["ramp"]["knee"] for r in runs]
        rows.update({
            "knee subscribers": [k and k["subscribers"] for k in knees],
            "knee forwarded streams": [k and k["forwarded_streams"] for k in knees],
            "knee received pkt/s": [k and k["window"]["received_pps"] for k in knees],
            "knee gateway forwarded pkt/s": [k and k["window"]["gateway_forwarded_pps"] for k in knees],
            "knee gateway CPU %": [k and k["window"]["gateway_cpu_pct"] for k in knees],
            "knee loadtest CPU %": [k and k["window"]["loadtest_cpu_pct"] for k in knees],
            "knee gateway waited for CPU %": [k and k["window"]["gateway_cpu_wait_pct"] for k in knees],
            "knee machine steal %": [k and k["window"].get("machine_steal_pct") for k in knees],
        })
        for r in runs:
            print(f"  stop reason: {r['ramp']['stop_reason']}")
    def forward_latency_ms(path, q):
        try:
            text = open(path).read()
        except OSError:
            return None
        buckets = {}
        for line in text.splitlines():
            if line.startswith("gateway_forward_latency_seconds_bucket{"):
                le = line.split('le="')[1].split('"')[0]
                le = float("inf") if le == "+Inf" else float(le)
                buckets[le] = buckets.get(le, 0) + float(line.rsplit(" ", 1)[1])
        total = buckets.get(float("inf"), 0)
        if not total:
            return None
        for le in sorted(buckets):
            if buckets[le] >= q * total:
                return le * 1000
        return None
    names = sorted(glob.glob(f"{out}/{s}-*.json"))
    rows["gateway added latency p50 ms (bucket)"] = [forward_latency_ms(n[:-5] + ".metrics", 0.5) for n in names]
    rows["gateway added latency p99 ms (bucket)"] = [forward_latency_ms(n[:-5] + ".metrics", 0.99) for n in names]
    for k, v in rows.items():
        m = med(v)
        shown = "-" if m is None else f"{m:.3f}" if isinstance(m, float) else str(m)
        print(f"  {k:34} {shown:>12}   runs: {v}")
    loads = [open("/proc/loadavg").read().split()[0]]
    fails = [r["participants"]["failures"] for r in runs]
    print(f"  not READY by reason, per run: {fails}")
    print(f"  load average (1 min) at the end: {loads[0]}")
EOF
