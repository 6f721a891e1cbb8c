#!/usr/bin/env bash
# Builds the Debian package, target/debian/jitgate_<version>-1_<arch>.deb, with
# cargo-deb (installed with cargo when missing): the jitgate binary in /usr/bin, the
# systemd units from deploy/ (which find it there), example configuration,
# and the maintainer scripts of deploy/debian/ (which never touch nftables).
#
#   ./scripts/build-deb.sh                    # release build, then the package
#   ./scripts/build-deb.sh --profile dev --no-build --fast   # from an existing debug build
#
# Arguments are passed to `cargo deb`.
set -euo pipefail

cd "$(dirname "$0")/.."
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if [ -d "$cargo_bin" ]; then
  export PATH="$cargo_bin:$PATH"
fi
if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: installing cargo-deb (cargo install --locked cargo-deb)" >&2
  cargo install --locked cargo-deb --version '^3' </dev/null >&2
fi

exec cargo deb -p jitgate "$@"
