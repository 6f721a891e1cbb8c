#!/usr/bin/env bash
# README command #2 (and what CI runs, through .ci/run): installs what is needed, then
# checks formatting, lints and runs every test of the workspace. Stops at the first
# failure.
set -euo pipefail

cd "$(dirname "$0")/.."
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if [ -d "$cargo_bin" ]; then
  export PATH="$cargo_bin:$PATH"
fi

./scripts/setup-deps.sh

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

echo "==> cargo fmt --all -- --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy --workspace --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test --workspace" >&2
cargo test --workspace
