#!/usr/bin/env bash
# Runs every test of the project. On a fresh Debian machine it first installs what the tests
# need (Debian's chromium, prometheus and systemd-analyze; the npm packages of web-client/).
#   scripts/test.sh            install if missing, lint, then all Rust and browser tests
#   SKIP_LINT=1 scripts/test.sh   skip cargo fmt --check and clippy
#   FUZZ_SECONDS=60 (default)     libFuzzer time per fuzz target; 0 skips fuzzing
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages the tests use: chromium (browser tests), prometheus + promtool (deploy
# tests against a real Prometheus), systemd-analyze (unit verification).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-liberation)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
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
# The Debian package starts a Prometheus service where systemd runs; the tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  as_root systemctl stop prometheus || true
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

log "building the gateway and loadtest binaries for the browser tests"
cargo build -p gateway -p loadtest
export GATEWAY_BIN="$PWD/target/debug/gateway"
export LOADTEST_BIN="$PWD/target/debug/loadtest"

log "browser end-to-end tests in headless Chromium (web-client/tests)"
(cd web-client && node --test --test-concurrency=1 tests/)

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
