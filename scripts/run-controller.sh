#!/usr/bin/env bash
# README command #1: installs what is needed, builds and runs the controller.
#
#   ./scripts/run-controller.sh                       # 127.0.0.1:8080, data in ./jitgate-data
#   ./scripts/run-controller.sh --listen 0.0.0.0:8443 --tls-san jit.example.com
#                                                     # HTTPS with the controller's own CA
#
# Every argument is passed to `jitgate serve` (see `jitgate serve --help`). The data
# directory (default ./jitgate-data) is relative to where you run the script. With
# JITGATE_BIN=/path/to/jitgate the script runs that binary instead of building one.
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if [ -d "$cargo_bin" ]; then
  export PATH="$cargo_bin:$PATH"
fi

"$repo/scripts/setup-deps.sh"
if [ -n "${JITGATE_BIN:-}" ]; then
  bin="$JITGATE_BIN"
else
  (cd "$repo" && cargo build --release -p jitgate)
  bin="$repo/target/release/jitgate"
fi
# Two glibc heap arenas, as the systemd unit runs it (see deploy/jitgate-controller.service).
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
exec "$bin" serve "$@"
