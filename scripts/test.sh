#!/usr/bin/env bash
# README command #2 (and what CI runs, through .ci/run): installs what is needed, then
# checks formatting, lints and runs every test of the workspace.
set -euo pipefail

cd "$(dirname "$0")/.."
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if [ -d "$cargo_bin" ]; then
  export PATH="$cargo_bin:$PATH"
fi

./scripts/setup-deps.sh --tests

# rustfmt and clippy are rustup components; add them when they are missing.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    echo "test.sh: adding the rustfmt and clippy components" >&2
    rustup component add rustfmt clippy
  else
    echo "test.sh: cargo fmt and cargo clippy are required (rustup component add rustfmt clippy)" >&2
    exit 1
  fi
fi

# Every step runs even when an earlier one fails, and every test binary runs even when
# another fails (--no-fail-fast), so one failure never hides others; the script exits
# non-zero if any step failed.
failed=()
echo "==> cargo fmt --all -- --check" >&2
cargo fmt --all -- --check || failed+=("cargo fmt")
echo "==> cargo clippy --workspace --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings || failed+=("cargo clippy")
echo "==> cargo test --workspace --no-fail-fast" >&2
cargo test --workspace --no-fail-fast || failed+=("cargo test")
if [ "${#failed[@]}" -gt 0 ]; then
  echo "test.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test.sh: all passed" >&2
