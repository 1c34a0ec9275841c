#!/usr/bin/env bash
# Soak test (see bench/soak.py): SOAK_SECONDS of churn (default 60) against a real ferry
# server and clients, then the server must be back at its idle RSS, fds and tasks.
# FERRY_BIN picks the binary; without it the release build is made and used. Other
# settings: SOAK_RATE (visitors/s, 50), SOAK_WARMUP (s, a quarter of SOAK_SECONDS, at least 15), SOAK_CSV (samples file),
# SOAK_PORT_BASE (23000); flags are passed on to soak.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release --locked --quiet
  export FERRY_BIN=target/release/ferry
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/soak.py "$@"
