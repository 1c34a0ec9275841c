#!/usr/bin/env bash
# Benchmark entry point: installs the tools, builds ferry, then runs bench/bench.py,
# which measures ferry, rathole, bore and a direct connection in one run on loopback
# and writes bench/RESULTS.md, then (as root) bench/conditions.sh's tables under delay and
# loss. Options via environment: DURATION (s per wrk run, 10),
# ROUNDS (3), IDLE (visitors for the memory figure, 1000), MANY (idle visitors of the
# large-scale figure, 9000), RESULTS (output file),
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
python3 bench/bench.py "$@"

# Under delay and loss (network namespaces: root only): bench/conditions.sh's tables replace
# the section of the same name in the results (SKIP_CONDITIONS=1 leaves it as it is).
if [ "$(id -u)" = 0 ] && [ -z "${SKIP_CONDITIONS:-}" ]; then
  tables=$(bash bench/conditions.sh)
  python3 - "${RESULTS:-bench/RESULTS.md}" "$tables" <<'PY'
import sys
path, tables = sys.argv[1], sys.argv[2]
heading = "## Under delay and loss"
text = open(path).read()
start = text.find(heading)
if start >= 0:
    end = text.find("\n## ", start + len(heading))
    text = text[:start] + (text[end + 1:] if end >= 0 else "")
section = (heading + "\n\n`bench/conditions.sh` (root): the server and the client in two network namespaces\n"
           "joined through a third that delays and drops packets (in order), visitors in the server's\n"
           "namespace. Each tunnel alone, the same services behind each.\n" + tables.rstrip("\n") + "\n")
open(path, "w").write(text.rstrip("\n") + "\n\n" + section)
PY
fi
