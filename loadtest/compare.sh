#!/usr/bin/env bash
# The gateway and Janus 1.1 (Debian's `janus`, VideoRoom plugin, HTTP transport) side by side:
# the same load tester, participants, clips and measurements against each, back to back, and one
# table of CPU-seconds per million delivered packets, loss, latency, join time and RSS, with the
# Janus/gateway ratio. Needs root (network namespace, apt-get).
#
#   loadtest/compare.sh                          1x10, 1x100, 4x4; 30 s each; one run
#   RUNS=3 SCENARIOS=1x100 loadtest/compare.sh   medians of 3 runs
#   PROFILE=debug SKIP_BUILD=1 DURATION=10s SCENARIOS=1x2 CHECK=1 loadtest/compare.sh   (CI's smoke:
#       debug builds made before; CHECK=1 fails unless every connection of both targets was READY,
#       media arrived intact and Janus's CPU was measured)
#
# Scenarios: 1xN = 1 publisher (VP8 720p 1.5 Mbit/s + Opus) x N subscribers; PxP (P = N, e.g. 4x4)
# = a meeting of P publishers who also subscribe to each other. Anything else: SCENARIO_ARGS_<name>.
#
# Keeping every packet on this machine (see /work/shared/JANUS-NOTES.md and docs/performance.md):
# libnice drops loopback interfaces before it reads its interface list and then gathers on every
# interface, so Janus runs in a private network namespace that has no route out: a veth pair with
# both ends inside ($NET.1 for the servers, $NET.2 for the load tester), `accept_local` on both
# (libnice binds each socket to its interface; replies between two local addresses are otherwise
# dropped as martians), and `janus -E <veth end>`. The gateway and the load tester run in the same
# namespace, so both servers get identical treatment. `ss -uanp` inside checks during every run
# that each UDP socket sits on a namespace address, and the load tester refuses any Janus SDP
# whose candidates name another address.
#
# Pinning as in loadtest/baseline.sh: the server on CPU 0 (gateway with media.workers = 1; Janus
# with its default threads), the load tester on CPU 1 with one thread. Output: $OUT/<scenario>-
# <target>-<run>.{json,txt,log}, and the table at the end (also $OUT/table.md).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30s} # seconds: 30s or 30
RUNS=${RUNS:-1}
SCENARIOS=${SCENARIOS:-"1x10 1x100 4x4"}
TARGETS=${TARGETS:-"gateway janus"}
JOIN_RATE=${JOIN_RATE:-20}
OUT=${OUT:-test-output/compare}
NS=${NS:-gwjanus-$$}
NET=${NET:-10.213.0}
SERVER_IP=$NET.1
CLIENT_IP=$NET.2
# Inside the namespace, so these collide with nothing outside it.
GW_HTTP_PORT=45080
JANUS_HTTP_PORT=45088
MEDIA_PORTS=45100-45899
KEY=compare-api-key
SERVER_CPU=${SERVER_CPU:-0}
LOADTEST_CPU=${LOADTEST_CPU:-1}

if [ "$(id -u)" != 0 ]; then
  echo "compare.sh: needs root (ip netns, apt-get)" >&2
  exit 2
fi

# --- Janus, installed once (idempotent) -----------------------------------------------------
if ! command -v janus > /dev/null || ! dpkg -L janus 2> /dev/null | grep -q 'plugins/libjanus_videoroom.so$'; then
  echo "==> installing Debian's janus"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq janus > /dev/null
  # Where systemd runs, the package starts a system-wide Janus on every interface: not wanted.
  if command -v systemctl > /dev/null; then systemctl disable --now janus > /dev/null 2>&1 || true; fi
fi
JANUS_LIB=$(dirname "$(dirname "$(dpkg -L janus | grep -m1 'plugins/libjanus_videoroom.so$')")")

PROFILE=${PROFILE:-release}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if [ "$PROFILE" = release ]; then cargo build --release -p gateway -p loadtest; else cargo build -p gateway -p loadtest; fi
fi
GW_BIN=$PWD/target/$PROFILE/gateway
LT_BIN=$PWD/target/$PROFILE/loadtest
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# --- cleanup: only what this script started -------------------------------------------------
SERVER_PID=
CONF=
cleanup() {
  stop_server
  ip netns del "$NS" 2> /dev/null || true
  [ -n "$CONF" ] && rm -rf "$CONF"
}
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2> /dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2> /dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2> /dev/null || true
    wait "$SERVER_PID" 2> /dev/null || true
  fi
  SERVER_PID=
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the namespace --------------------------------------------------------------------------
VETH_S=gwjs0
VETH_C=gwjc0
ip netns add "$NS"
nsx() { ip netns exec "$NS" "$@"; }
ip -n "$NS" link set lo up
ip -n "$NS" link add "$VETH_S" type veth peer name "$VETH_C"
ip -n "$NS" addr add "$SERVER_IP/24" dev "$VETH_S"
ip -n "$NS" addr add "$CLIENT_IP/24" dev "$VETH_C"
nsx sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip -n "$NS" link set "$VETH_S" up
ip -n "$NS" link set "$VETH_C" up
nsx sysctl -qw "net.ipv4.conf.$VETH_S.accept_local=1" "net.ipv4.conf.$VETH_C.accept_local=1" \
  net.ipv4.conf.all.accept_local=1
if ip -n "$NS" route | grep -q '^default'; then
  echo "compare.sh: namespace $NS has a default route" >&2
  exit 1
fi

# --- Janus's configuration: VideoRoom + HTTP only, no STUN, a port range, no mDNS, no JSON logger
CONF=$(mktemp -d /tmp/gwjanus-conf.XXXXXX)
DISABLED_PLUGINS=$(cd "$JANUS_LIB/plugins" && ls libjanus_*.so | grep -v '^libjanus_videoroom.so$' | paste -sd, -)
DISABLED_TRANSPORTS=$(cd "$JANUS_LIB/transports" && ls libjanus_*.so | grep -v '^libjanus_http.so$' | paste -sd, -)
cat > "$CONF/janus.jcfg" << EOF
general: {
	configs_folder = "$CONF"
	plugins_folder = "$JANUS_LIB/plugins"
	transports_folder = "$JANUS_LIB/transports"
	events_folder = "$JANUS_LIB/events"
	loggers_folder = "$JANUS_LIB/loggers"
	debug_level = 4
	admin_secret = "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
}
media: {
	rtp_port_range = "$MEDIA_PORTS"
}
nat: {
	nice_debug = false
	ignore_mdns = true
	ice_ignore_list = "vmnet"
}
plugins: {
	disable = "$DISABLED_PLUGINS"
}
transports: {
	disable = "$DISABLED_TRANSPORTS"
}
loggers: {
	disable = "libjanus_jsonlog.so"
}
events: {
	broadcast = false
}
EOF
cat > "$CONF/janus.transport.http.jcfg" << EOF
general: {
	json = "compact"
	base_path = "/janus"
	http = true
	port = $JANUS_HTTP_PORT
	ip = "$SERVER_IP"
	https = false
}
admin: {
	admin_http = false
	admin_https = false
}
EOF
printf 'general: {\n}\n' > "$CONF/janus.plugin.videoroom.jcfg"

wait_http() { # url
  for _ in $(seq 100); do
    nsx curl -s -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  return 1
}

start_server() { # target, log
  case $1 in
    gateway)
      # `ip netns exec`, `env` and `taskset` each exec the next: $! is the server's own pid (a
      # shell function here would put a subshell's pid in $!).
      ip netns exec "$NS" env GATEWAY__HTTP__BIND="$SERVER_IP:$GW_HTTP_PORT" \
        GATEWAY__MEDIA__BIND_IP="$SERVER_IP" \
        GATEWAY__MEDIA__PORT_MIN="${MEDIA_PORTS%-*}" GATEWAY__MEDIA__PORT_MAX="${MEDIA_PORTS#*-}" \
        GATEWAY__MEDIA__WORKERS=1 \
        GATEWAY__AUTH__API_KEY=$KEY \
        GATEWAY__LOG__LEVEL=warn \
        taskset -c "$SERVER_CPU" "$GW_BIN" > "$2" 2>&1 &
      SERVER_PID=$!
      wait_http "http://$SERVER_IP:$GW_HTTP_PORT/healthz" || { echo "gateway did not start (see $2)" >&2; return 1; }
      ;;
    janus)
      ip netns exec "$NS" taskset -c "$SERVER_CPU" janus -F "$CONF" -E "$VETH_S" -o > "$2" 2>&1 &
      SERVER_PID=$!
      wait_http "http://$SERVER_IP:$JANUS_HTTP_PORT/janus/info" || { echo "janus did not start (see $2)" >&2; return 1; }
      ;;
  esac
}

# Every UDP and TCP socket in the namespace on a namespace address (or the loopback).
check_sockets() { # file
  nsx ss -tuanp > "$1"
  awk -v net="$NET." 'NR > 1 {
      split($5, a, ":"); addr = a[1]
      if (index(addr, net) != 1 && addr != "127.0.0.1" && addr != "0.0.0.0" && addr != "*") { print "  socket outside the namespace net: " $0; bad = 1 }
    } END { exit bad }' "$1"
}

loadtest_args() { # scenario
  local var="SCENARIO_ARGS_${1//[^A-Za-z0-9]/_}"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  local p=${1%x*} n=${1#*x}
  if [ "$p" = 1 ]; then
    echo "--publishers 1 --subscribers $n"
  elif [ "$p" = "$n" ]; then
    echo "--publishers $p --publishers-subscribe --subscribers 0"
  else
    echo "--publishers $p --subscribers $n"
  fi
}

run_one() { # scenario, target, run
  local name="$1-$2-$3" url
  start_server "$2" "$OUT/$name.log"
  check_sockets "$OUT/$name.ss-start" || { echo "compare.sh: a socket outside $NET.0/24, see $OUT/$name.ss-start" >&2; return 1; }
  case $2 in
    gateway) url=(--url "http://$SERVER_IP:$GW_HTTP_PORT" --api-key "$KEY") ;;
    janus) url=(--target janus --janus-url "http://$SERVER_IP:$JANUS_HTTP_PORT/janus") ;;
  esac
  echo "==> $name: loadtest ${url[*]} $(loadtest_args "$1") --duration $DURATION"
  # Mid-run, with every connection up: where the sockets are.
  ( sleep "$(( ${DURATION%s} / 2 + 3 ))"; check_sockets "$OUT/$name.ss" > "$OUT/$name.ss-check" 2>&1 || true ) &
  local checker=$!
  # shellcheck disable=SC2046
  nsx taskset -c "$LOADTEST_CPU" "$LT_BIN" "${url[@]}" --pid "$SERVER_PID" --threads 1 --quiet \
    --local-ip "$CLIENT_IP" --join-rate "$JOIN_RATE" --duration "$DURATION" \
    $(loadtest_args "$1") --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 || echo "  (loadtest exited with $?; see $OUT/$name.txt)"
  wait "$checker" 2> /dev/null || true
  grep -E 'connections READY|loss \(after|steady window|^  (gateway|janus) ' "$OUT/$name.txt" || true
  if [ -s "$OUT/$name.ss-check" ]; then
    cat "$OUT/$name.ss-check" >&2
    echo "compare.sh: a socket outside $NET.0/24 during $name" >&2
    stop_server
    return 1
  fi
  stop_server
  sleep 1
}

for scenario in $SCENARIOS; do
  for run in $(seq "$RUNS"); do
    for target in $TARGETS; do
      run_one "$scenario" "$target" "$run"
    done
  done
done

python3 - "$OUT" "$RUNS" "${CHECK:-0}" $SCENARIOS << 'EOF' | tee "$OUT/table.md"
import json, os, statistics, sys
out, runs, check, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
targets = ["gateway", "janus"]

def load(s, t):
    rs = []
    for i in range(1, runs + 1):
        p = f"{out}/{s}-{t}-{i}.json"
        if os.path.exists(p):
            rs.append(json.load(open(p)))
    return rs

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def figures(rs):
    return {
        "cpu": med([r["steady"].get("gateway_cpu_us_per_delivered_packet") for r in rs]),
        "pps": med([r["steady"]["received_pps"] for r in rs]),
        "cpu_pct": med([r["steady"]["gateway_cpu_pct"] for r in rs]),
        "loss": med([r["steady"]["loss_pct"] for r in rs]),
        "loss_all": med([r["media"]["loss_pct"] for r in rs]),
        "p50": med([r["steady"]["latency_ms"]["p50"] for r in rs]),
        "p99": med([r["steady"]["latency_ms"]["p99"] for r in rs]),
        "join50": med([r["join_ms"]["client"]["p50"] for r in rs]),
        "join99": med([r["join_ms"]["client"]["p99"] for r in rs]),
        "rss": med([r["gateway"]["rss_mb_max"] for r in rs]),
        "ready": med([r["participants"]["publish_ready"] + r["participants"]["subscribe_ready"] for r in rs]),
        "asked": med([r["participants"]["connections"] for r in rs]),
        "lt": med([r["steady"]["loadtest_cpu_pct"] for r in rs]),
        "runs": [r["steady"].get("gateway_cpu_us_per_delivered_packet") for r in rs],
    }

def f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)

def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

print(f"\nmedians of {runs} run(s) per row; CPU-s per million delivered packets = server CPU in the steady window / packets the subscribers received")
print("| scenario | target | READY | delivered pkt/s | server CPU | CPU-s / M pkts [runs] | loss % steady (run) | latency p50 / p99 ms | join p50 / p99 ms | RSS MB | load tester CPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for s in scenarios:
    fig = {t: figures(load(s, t)) for t in targets if load(s, t)}
    for t, x in fig.items():
        runs_s = ", ".join(f(v) for v in x["runs"])
        print(f"| {s} | {t} | {f(x['ready'], '{:.0f}')}/{f(x['asked'], '{:.0f}')} | {f(x['pps'], '{:.0f}')} | {f(x['cpu_pct'], '{:.0f}%')} | "
              f"**{f(x['cpu'])}** [{runs_s}] | {f(x['loss'], '{:.3f}')} ({f(x['loss_all'], '{:.3f}')}) | "
              f"{f(x['p50'])} / {f(x['p99'])} | {f(x['join50'], '{:.0f}')} / {f(x['join99'], '{:.0f}')} | {f(x['rss'], '{:.0f}')} | {f(x['lt'], '{:.0f}%')} |")
    if len(fig) == 2:
        g, j = fig["gateway"], fig["janus"]
        print(f"| {s} | **janus / gateway** | | | | **{ratio(j['cpu'], g['cpu'])}** | | {ratio(j['p50'], g['p50'])} / {ratio(j['p99'], g['p99'])} | "
              f"{ratio(j['join50'], g['join50'])} / {ratio(j['join99'], g['join99'])} | {ratio(j['rss'], g['rss'])} | |")

if check:
    problems = []
    for s in scenarios:
        for t in targets:
            rs = load(s, t)
            if not rs:
                problems.append(f"{s} {t}: no result")
            for r in rs:
                p, m = r["participants"], r["media"]
                if p["publish_ready"] + p["subscribe_ready"] != p["connections"] or p["errors"]:
                    problems.append(f"{s} {t}: READY {p['publish_ready'] + p['subscribe_ready']} of {p['connections']}, {p['failures']} {p['errors']}")
                if m["received_packets"] < 100 or m["unmatched_payloads"] or m["loss_pct"] > 5:
                    problems.append(f"{s} {t}: received {m['received_packets']}, unmatched {m['unmatched_payloads']}, loss {m['loss_pct']:.2f}%")
                if not r["steady"].get("gateway_cpu_us_per_delivered_packet") or r["gateway"]["rss_mb_max"] < 5:
                    problems.append(f"{s} {t}: no server CPU or RSS figures")
    if problems:
        print("\nCHECK failed:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print("\nCHECK passed: every connection READY on both targets, media intact, server CPU and RSS measured")
EOF
