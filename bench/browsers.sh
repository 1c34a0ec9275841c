#!/usr/bin/env bash
# Browser peers, direct against relayed: a headless Chromium page connects to a client's
# HTTP service over WebRTC (tests/suite/browsers.rs) and measures connection set-up, time
# to first byte of a small response and a 100 MiB download, over the data channel and
# through the server's HTTP tunnel, in alternating rounds; server, client and site run in
# one release-built process. Prints the table of bench/RESULTS.md (Browser peers).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked --test suite -- --ignored --nocapture \
  --exact browsers::browser_peers_direct_against_relayed 2>&1 | grep -E '^(\||$|rounds)'
