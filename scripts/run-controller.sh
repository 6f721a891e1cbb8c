#!/usr/bin/env bash
# README command #1: installs what is needed, builds and runs the controller.
#
#   ./scripts/run-controller.sh                       # 127.0.0.1:8080, data in ./jitgate-data
#   ./scripts/run-controller.sh --listen 127.0.0.1:9090 --data-dir /var/lib/jitgate
#
# Every argument is passed to `jitgate serve` (see `jitgate serve --help`).
set -euo pipefail

cd "$(dirname "$0")/.."
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if [ -d "$cargo_bin" ]; then
  export PATH="$cargo_bin:$PATH"
fi

./scripts/setup-deps.sh
exec cargo run --release -p jitgate -- serve "$@"
