#!/usr/bin/env bash
# Peer-to-peer, direct against relayed: two clients behind NATs in network namespaces
# (tests/suite/common/nat.rs; needs root), one forwarded stream of 256 MiB and 101 new
# connections to an echo service, once over the punched QUIC path and once with UDP
# between the NATs blocked, so every connection goes through the server. Prints the
# table of bench/RESULTS.md (P2P).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
FERRY_BIN="$PWD/target/release/ferry" cargo test --locked --test suite -- --ignored --nocapture \
  --exact faults::p2p::p2p_direct_against_relayed 2>&1 | grep -E '^(\||$)'
