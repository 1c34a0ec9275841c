#!/usr/bin/env bash
# Fuzzes every target for a bounded time, starting from its committed seeds; fails on any
# crash, hang or broken invariant. FUZZ_SECONDS sets the time per target (default 20);
# FUZZ_SANITIZER=address builds with ASan (default none: see README.md); FUZZ_DEV=1 builds
# without optimisation (half the build time, fewer executions: CI's smoke run);
# FUZZ_BUILD_ONLY=1 only builds (CI builds while lighter stages run).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-none}"
profile=()
if [ -n "${FUZZ_DEV:-}" ]; then profile=(--dev); fi
# cargo fuzz passes -Z flags; the stable toolchain accepts them with this set.
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

start=$(date +%s)
cargo fuzz build "${profile[@]}" --sanitizer "$sanitizer"
echo "fuzz: built every target in $(($(date +%s) - start)) s"
if [ -n "${FUZZ_BUILD_ONLY:-}" ]; then exit 0; fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in $(cargo fuzz list); do
  # New inputs go to a scratch corpus; the committed seeds are only read.
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  if cargo fuzz run "${profile[@]}" --sanitizer "$sanitizer" "$target" "$scratch/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $target: $(grep -E '^#[0-9]+' "$log" | tail -n 1)"
  else
    echo "fuzz: $target FAILED; the end of its log:"
    tail -n 60 "$log"
    failed+=("$target")
  fi
done
echo "fuzz: done in $(($(date +%s) - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
