#!/usr/bin/env bash
# Runs every test of the project. On a fresh Debian machine it first installs what the tests
# need (Debian's chromium, prometheus, systemd-analyze, iproute2, iptables and coturn; the npm
# packages of web-client/, among them the WHIP/WHEP libraries and esbuild of whip.test.mjs).
#   scripts/test.sh            install if missing, lint, then all Rust and browser tests
#   SKIP_LINT=1 scripts/test.sh   skip cargo fmt --check and clippy
#   FUZZ_SECONDS=60 (default)     libFuzzer time per fuzz target; 0 skips fuzzing
#   SOAK_ROOMS=60 SOAK_CYCLES=40 SOAK_PARALLEL=6 (default)  release-build churn soak: rooms x cycles
#                                 full cycles (+ as many vanishing clients), rooms at a time; SOAK_ROOMS=0 skips it
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step prints the time since the start and the disk still free (a CI run once ran out).
log() {
  printf "\n==> [%dm%02ds, %s free] %s\n" $((SECONDS / 60)) $((SECONDS % 60)) \
    "$(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ')" "$*"
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages the tests use: chromium (browser tests), prometheus + promtool (deploy
# tests against a real Prometheus), systemd-analyze (unit verification), ip + iptables + coturn
# (NAT and TURN tests in network namespaces, web-client/tests/nat.test.mjs; the browser loss
# test's router namespace and its random UDP loss), GStreamer with webrtcbin and its Python
# bindings (a stock GStreamer client publishing and subscribing), Janus (loadtest --target janus).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-liberation)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need+=(iptables)
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
# Redis for the cluster test (gateway/tests/cluster.rs starts its own on port 21000; ~5 s).
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# Janus 1.1 (VideoRoom + HTTP transport), the side-by-side target of loadtest/compare.sh.
command -v janus >/dev/null 2>&1 || need+=(janus)
# Stock GStreamer webrtcbin clients (web-client/tests/gstreamer.test.mjs, and the WHIP publisher
# gst_whip.py of whip-gstreamer.test.mjs, which needs the same packages) run on Debian's python3.
/usr/bin/python3 web-client/tests/gst_client.py --check >/dev/null 2>&1 ||
  need+=(python3 python3-gi python3-gst-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice
    python3-websocket)
# The webhook receiver of gateway/tests/webhooks.rs runs PyPI's standardwebhooks in a venv, and
# gateway/tests/openapi.rs PyPI's schemathesis in another.
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3 python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  as_root apt-get update -qq
  # A temporary .deb has been seen to vanish mid-install here; a second try works.
  for attempt in 1 2 3; do
    if DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need[@]}"; then
      break
    fi
    [ "$attempt" = 3 ] && { echo "apt-get install ${need[*]} failed" >&2; exit 1; }
    sleep 3
  done
fi
# The Debian packages start Prometheus, coturn and Janus services where systemd runs; the tests
# start their own (coturn and Janus inside network namespaces of their own).
for service in prometheus coturn janus redis-server; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    as_root systemctl stop "$service" || true
  fi
done

# The tests bind fixed ports, most of them in 40000-50299, inside the kernel's ephemeral range
# (32768-60999): any client socket on the machine (a test peer, Chromium, pip) may be handed one of
# them and make a gateway's bind fail (CI once saw a gateway never listen on 50000). Reserving the
# range keeps the kernel from handing them out; explicit binds still work. Best effort: where
# /proc/sys is read-only or there is no root, the tests run as before.
RESERVED_PORTS=40000-50299
reserved=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports 2>/dev/null || true)
if [ "$reserved" != "$RESERVED_PORTS" ] && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
  if [ -z "$reserved" ] && echo "$RESERVED_PORTS" | as_root tee /proc/sys/net/ipv4/ip_local_reserved_ports >/dev/null 2>&1; then
    log "reserved the tests' ports $RESERVED_PORTS from ephemeral allocation"
  fi
fi

# PyPI's standardwebhooks (an implementation independent of the gateway's) verifies every
# webhook the gateway sends in gateway/tests/webhooks.rs.
export WEBHOOK_PYTHON="$PWD/target/webhook-venv/bin/python"
if ! "$WEBHOOK_PYTHON" gateway/tests/webhook_receiver.py --check >/dev/null 2>&1; then
  log "installing standardwebhooks (PyPI) into target/webhook-venv"
  /usr/bin/python3 -m venv "$PWD/target/webhook-venv"
  "$PWD/target/webhook-venv/bin/pip" install --quiet --disable-pip-version-check standardwebhooks
fi

# PyPI's schemathesis runs generated requests against a live gateway with its OpenAPI document
# (gateway/tests/openapi.rs, within cargo test --workspace below). Pinned: its checks and its
# configuration file (gateway/tests/schemathesis.toml) change between releases.
SCHEMATHESIS_VERSION=4.32.5
export SCHEMATHESIS="$PWD/target/schemathesis-venv/bin/schemathesis"
if ! "$SCHEMATHESIS" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  log "installing schemathesis $SCHEMATHESIS_VERSION (PyPI) into target/schemathesis-venv"
  /usr/bin/python3 -m venv "$PWD/target/schemathesis-venv"
  "$PWD/target/schemathesis-venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

log "installing web-client test packages (npm ci)"
(cd web-client && npm ci --no-audit --no-fund --loglevel=error)

if [ "${SKIP_LINT:-0}" != 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy --all-targets -- -D warnings"
  cargo clippy --all-targets -- -D warnings
fi

log "cargo test --workspace (unit, API, loopback UDP integration)"
cargo test --workspace

log "the gateway's socket suites again in single-port mode (media.mux: one UDP port per worker)"
TEST_MEDIA_MUX=1 cargo test -p gateway --tests

log "the media suites again with every room spread over both media workers (media.spread)"
TEST_MEDIA_SPREAD=1 cargo test -p gateway --test media --test moderation --test whip

log "building the gateway and loadtest binaries for the browser tests"
cargo build -p gateway -p loadtest
export GATEWAY_BIN="$PWD/target/debug/gateway"
export LOADTEST_BIN="$PWD/target/debug/loadtest"

log "browser end-to-end tests in headless Chromium (web-client/tests; NAT + TURN, loss, ICE-TCP and ICE restart after an address change in network namespaces)"
# As root the loss and ICE restart tests (Chromium in a network namespace) must run, not skip.
# So must the GStreamer interop test (its clients run in a namespace of their own), and the
# ICE-TCP test (Chromium behind a firewall that drops all UDP).
if [ "$(id -u)" -eq 0 ]; then export REQUIRE_LOSS_TEST=1 REQUIRE_GSTREAMER_TEST=1 REQUIRE_ICE_TCP_TEST=1; fi
(cd web-client && node --test --test-concurrency=1 tests/)
log "Chromium behind NATs, TURN and loss, and the room page, again in single-port mode (media.mux)"
(cd web-client && GATEWAY__MEDIA__MUX=true node --test --test-concurrency=1 \
  tests/nat.test.mjs tests/loss.test.mjs tests/room.test.mjs tests/data.test.mjs)
log "Chromium simulcast, layer switches, data and the room page again with rooms spread over two media workers (media.spread)"
(cd web-client && GATEWAY__MEDIA__SPREAD=true GATEWAY__MEDIA__WORKERS=2 node --test --test-concurrency=1 \
  tests/simulcast.test.mjs tests/layer-switch.test.mjs tests/data.test.mjs tests/room.test.mjs)
log "the Chromium simulcast test again with H.264 simulcast"
(cd web-client && SIMULCAST_CODEC=H264 node --test tests/simulcast.test.mjs)

# The same load tester against the gateway and against Janus, 1 publisher x 2 subscribers, 10 s
# each, in a private network namespace (Janus's libnice must not reach any real interface).
log "gateway and Janus side by side: loadtest/compare.sh smoke, 1 x 2, 10 s each (debug builds)"
if [ "$(id -u)" -eq 0 ]; then
  PROFILE=debug SKIP_BUILD=1 DURATION=10s SCENARIOS=1x2 CHECK=1 OUT=test-output/compare-smoke loadtest/compare.sh
else
  echo "skipped: loadtest/compare.sh needs root (ip netns for Janus, apt-get)"
fi

# ~2 minutes of churn on 2 cores (2400 cycles), after the release build of the test.
SOAK_ROOMS="${SOAK_ROOMS:-60}"
SOAK_CYCLES="${SOAK_CYCLES:-40}"
SOAK_PARALLEL="${SOAK_PARALLEL:-6}"
if [ "$SOAK_ROOMS" != 0 ]; then
  log "churn soak in a release build: $SOAK_ROOMS rooms x $SOAK_CYCLES cycles, $SOAK_PARALLEL rooms at a time"
  # Optimised like the shipped binary (opt-level 3, no debug assertions) but without its thin LTO
  # and with more codegen units: the same code paths, built in about half the time.
  CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=false \
  CHURN_ROOMS="$SOAK_ROOMS" CHURN_CYCLES="$SOAK_CYCLES" CHURN_PARALLEL="$SOAK_PARALLEL" \
    cargo test --release -p gateway --test churn -- --nocapture
fi

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
if [ "$FUZZ_SECONDS" != 0 ]; then
  command -v cargo-fuzz >/dev/null 2>&1 || { log "installing cargo-fuzz"; cargo install cargo-fuzz --locked; }
  log "fuzzing each target for ${FUZZ_SECONDS}s from fuzz/corpus (cargo fuzz, libFuzzer)"
  mkdir -p test-output
  for t in ws_message rest sdp datagram; do
    # New inputs go to a scratch corpus; the committed seeds stay as they are.
    scratch=$(mktemp -d)
    if ! cargo fuzz run --sanitizer none "$t" "$scratch" "fuzz/corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=4096 -print_final_stats=1 > "test-output/fuzz-$t.log" 2>&1; then
      tail -60 "test-output/fuzz-$t.log"
      echo "fuzz target $t failed; the crashing input is in fuzz/artifacts/$t/" >&2
      exit 1
    fi
    runs=$(grep -E '^stat::number_of_executed_units' "test-output/fuzz-$t.log" | awk '{print $2}')
    cov=$(grep -E '#[0-9]+.*DONE' "test-output/fuzz-$t.log" | tail -1 | sed -E 's/.*cov: ([0-9]+).*/\1/')
    echo "fuzz $t: ${runs:-?} executions, coverage ${cov:-?} edges, no crash"
    rm -rf "$scratch"
  done
fi
log "all tests passed"
