#!/usr/bin/env bash
# Transports under a real network's conditions: 50 ms round trip and 1% loss each way
# between client and server (network namespaces and the userspace delay line of the test
# suite; needs root), with packets reordered by jitter and in order. Prints the tables of
# bench/RESULTS.md (transports): one visitor's bulk transfer over tcp://, tls://, ws://
# and quic:// (cubic, bbr) against a direct TCP connection, and the round trips of a
# datagram every 10 ms through a UDP tunnel over QUIC datagrams and over TCP.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
FERRY_BIN="$PWD/target/release/ferry" cargo test --locked --test suite -- --ignored --nocapture \
  --exact faults::transports::transports_under_delay_and_loss 2>&1 | grep -E '^(\||$)'
