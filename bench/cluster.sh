#!/usr/bin/env bash
# The cost of a visitor relayed between cluster nodes (bench/cluster.py): req/s and
# latency at the node holding the tunnel against another node relaying to it.
# DURATION (s per wrk run, 10) and ROUNDS (3) as in bench/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
for tool in nginx wrk etcd; do
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  packages=("${need_apt[@]/etcd/etcd-server}")
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
cargo build --release --locked --quiet
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/cluster.py "$@"
