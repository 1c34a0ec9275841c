#!/usr/bin/env bash
# Tunnels under the conditions users have (root: network namespaces and the userspace delay
# line of the test suite): ferry, rathole, bore and a direct connection with 20 ms and 100 ms
# round trip, 0% and 1% loss between server and client. Prints the tables of
# bench/RESULTS.md (conditions): a new visitor's time to first byte, round trips on a kept-alive
# connection, and a 4 MiB bulk transfer (tests/suite/faults/conditions.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v rathole >/dev/null 2>&1 || cargo install rathole
command -v bore >/dev/null 2>&1 || cargo install --locked bore-cli
cargo build --release --locked
FERRY_BIN="$PWD/target/release/ferry" cargo test --locked --test suite -- --ignored --nocapture \
  --exact faults::conditions::tunnels_under_delay_and_loss 2>&1 | grep -E '^(\||$)'
