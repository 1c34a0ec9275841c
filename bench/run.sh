#!/usr/bin/env bash
# Benchmark entry point: installs the tools, builds ferry, then runs bench/bench.py,
# which measures ferry, rathole, bore and a direct connection in one run on loopback
# and writes bench/RESULTS.md. Options via environment: DURATION (s per wrk run, 10),
# ROUNDS (3), IDLE (visitors for the memory figure, 1000), RESULTS (output file),
# FERRY_BIN (ferry binary, default target/release/ferry), FERRY_BASE (an earlier ferry
# build measured beside it in the same rounds, for a before/after table).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in nginx wrk iperf3 curl; do
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# rathole 0.5.0 does not build with --locked on current Rust; bore-cli 0.6.0 does.
command -v rathole >/dev/null 2>&1 || cargo install rathole
command -v bore >/dev/null 2>&1 || cargo install --locked bore-cli
cargo build --release --quiet

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/bench.py "$@"
