#!/usr/bin/env bash
# API robustness: schemathesis (PyPI) generates requests from the server's own
# /openapi.json and checks every answer against it: no 5xx, statuses, content types,
# headers and bodies as documented, bad input refused, missing auth refused.
#
# Four runs against a real `ferry server` on loopback with one client connected:
#   1. with an api-token, sending it;       2. the same server, without the token;
#   3. without an api-token (loopback API);  4. that one, asked for a foreign Host (403).
# Bounded: API_FUZZ_EXAMPLES cases per operation (default 40) and API_FUZZ_SECONDS per
# run (default 90). FERRY_BIN picks the binary (default target/debug/ferry, as `cargo
# test` leaves it). Exits non-zero on any failure, with schemathesis's report.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
FERRY_BIN=${FERRY_BIN:-target/debug/ferry}
EXAMPLES=${API_FUZZ_EXAMPLES:-40}
SECONDS_PER_RUN=${API_FUZZ_SECONDS:-90}
PORT_BASE=${API_FUZZ_PORT_BASE:-23200}
TOKEN=api-fuzz-token-0123456789
SECRET=api-fuzz-secret-0123456789

# The pinned schemathesis: the one on PATH if it is that version, else a venv of its own
# under target/ (Debian's python3 refuses pip installs outside one).
ST=st
if [ "$(st --version 2>/dev/null || true)" != "st, version $SCHEMATHESIS_VERSION" ]; then
  venv=$PWD/target/schemathesis-$SCHEMATHESIS_VERSION
  if [ ! -x "$venv/bin/st" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  ST=$venv/bin/st
fi
[ -x "$FERRY_BIN" ] || cargo build --locked --quiet

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Polls until the API at $1 lists $2 client(s), for at most 20 s.
wait_for_clients() {
  python3 - "$1" "$2" "$TOKEN" <<'PY'
import json, sys, time, urllib.request
api, want, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    request = urllib.request.Request(f"http://{api}/health", headers={"Authorization": f"Bearer {token}"})
    try:
        if json.load(urllib.request.urlopen(request, timeout=2))["clients"] >= want:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"api_schema: the API at {api} never listed {want} client(s)")
PY
}

# start_server PORT_OFFSET [ARGS...]: a server with its API on PORT_BASE+offset+1 and one
# client with one TCP service, so client and service routes have something to find.
start_server() {
  local offset=$1
  shift
  local addr=127.0.0.1:$((PORT_BASE + offset)) api=127.0.0.1:$((PORT_BASE + offset + 1))
  local range=$((PORT_BASE + offset + 2))-$((PORT_BASE + offset + 9))
  # Bans are the API's own business (tests/suite/api); here they would stop the run.
  "$FERRY_BIN" server --addr "$addr" --api-addr "$api" --tcp-range "$range" --id fuzz --secret "$SECRET" \
    --reconnect-times 1000000000 --log-level warn "$@" >>"$work/server.log" 2>&1 &
  pids+=($!)
  "$FERRY_BIN" client --remote "tcp://$addr" --id fuzz --secret "$SECRET" --log-level warn \
    --local tcp://127.0.0.1:9 >>"$work/client.log" 2>&1 &
  pids+=($!)
  wait_for_clients "$api" 1
}

# fuzz NAME API_ADDR [ST_ARGS...]: the document is fetched first (as a loopback Host), so
# a run sending another Host still has it.
fuzz() {
  local name=$1 api=$2
  shift 2
  echo "== api_schema: $name"
  python3 -c 'import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())' \
    "http://$api/openapi.json" >"$work/openapi.json"
  (cd "$work" && timeout "$SECONDS_PER_RUN" "$ST" run openapi.json --url "http://$api" --checks all \
    --max-examples "$EXAMPLES" --workers 1 --request-timeout 10 "$@")
}

start_server 0 --api-token "$TOKEN"
with_token=127.0.0.1:$((PORT_BASE + 1))
fuzz "with the token" "$with_token" -H "Authorization: Bearer $TOKEN"
fuzz "without the token" "$with_token"

start_server 10
open=127.0.0.1:$((PORT_BASE + 11))
fuzz "no token configured" "$open"
# A foreign Host is refused before routing, so an undeclared method gets 403, not 405.
fuzz "no token configured, foreign Host" "$open" -H "Host: attacker.example" \
  --exclude-checks unsupported_method

for log in server client; do
  if grep -E "panicked|ERROR" "$work/$log.log"; then
    echo "api_schema: the $log logged the errors above" >&2
    exit 1
  fi
done
echo "api_schema: all runs passed"
