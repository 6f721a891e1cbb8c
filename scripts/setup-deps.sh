#!/usr/bin/env bash
# Installs the system packages jitgate needs to build, test and enforce, on
# Debian 12. Idempotent: when everything is already installed it does not touch apt,
# so repeated runs take well under a second. Never reads stdin (safe under CI=true).
#
# Packages and why:
#   build-essential, pkg-config  C toolchain for crates with build scripts (bundled SQLite, ring);
#                                its binutils (objcopy) also strips the binaries tests serve
#   ca-certificates, curl        TLS roots and downloads (rustup, scripts)
#   nftables, iproute2           the agent's enforcement and the network-namespace test lab
#   openssh-server/-client       end-to-end tests of `jitgate ssh` against a real sshd
#   sqlite3                      inspecting the controller's database by hand
#   openssl                      tests make certificates the usual way (openssl req -x509)
#   util-linux                   setpriv: tests run the agent without CAP_NET_ADMIN
# and with --tests (scripts/test.sh), what only the tests need:
#   postgresql-15                the PostgreSQL store's tests start throwaway servers
#                                (initdb, pg_ctl); no system-wide server is used
#   nodejs, npm (if no node)     the sign-in tests run a real OpenID Provider
#                                (testing/oidc-op, from npm with its lockfile)
#   cargo-deb (with cargo)       the package tests build the Debian package
#   chromium, chromium-driver    the dashboard's tests click through it in a real,
#                                headless browser over WebDriver (same source package,
#                                so their versions always match; nothing downloads one)
set -euo pipefail

PACKAGES=(
  build-essential
  pkg-config
  ca-certificates
  curl
  nftables
  iproute2
  openssh-server
  openssh-client
  sqlite3
  openssl
  util-linux
)
if [ "${1:-}" = "--tests" ]; then
  PACKAGES+=(postgresql-15 chromium chromium-driver)
  # Node.js 20 may come from elsewhere (nodesource); Debian's is installed only when
  # there is none.
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    PACKAGES+=(nodejs npm)
  fi
fi

say() { printf 'setup-deps: %s\n' "$*" >&2; }

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
      missing+=("$p")
    fi
  done
else
  say "dpkg-query not found: this script supports Debian 12 (and derivatives) only."
  say "Install these packages with your system's package manager: ${PACKAGES[*]}"
  exit 1
fi

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    say "missing system packages: ${missing[*]}"
    say "they are installed with apt-get, which needs root. Run as root, for example:"
    say "  sudo $0 ${1:-}"
    say "or install them yourself: sudo apt-get install ${missing[*]}"
    exit 1
  fi
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update </dev/null
  apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
else
  say "system packages already installed"
fi

# The Rust toolchain is not an apt package here: it comes from rustup.
if ! command -v cargo >/dev/null 2>&1; then
  cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  say "cargo was not found on PATH."
  if [ -x "$cargo_home/bin/cargo" ]; then
    say "it is installed in $cargo_home/bin; add that to PATH:"
    say "  export PATH=\"$cargo_home/bin:\$PATH\""
  else
    say "install Rust (1.90 or newer) with rustup, then open a new shell:"
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y"
    say "  . \"\$HOME/.cargo/env\""
  fi
  exit 1
fi

# cargo-deb, which builds the Debian package (scripts/build-deb.sh; the tests build one).
if [ "${1:-}" = "--tests" ]; then
  cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
  if [ -x "$cargo_bin/cargo-deb" ] || command -v cargo-deb >/dev/null 2>&1; then
    say "cargo-deb already installed"
  else
    say "installing cargo-deb (cargo install --locked cargo-deb --version '^3')"
    PATH="$cargo_bin:$PATH" cargo install --locked cargo-deb --version '^3' </dev/null >&2
  fi
fi

# The test OpenID Provider's packages, exactly as locked.
if [ "${1:-}" = "--tests" ]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  op="$here/testing/oidc-op"
  # Installed already exactly as locked (a copy of the lockfile marks it): nothing to do.
  if cmp -s "$op/package-lock.json" "$op/node_modules/.jitgate-installed-lock" 2>/dev/null; then
    say "test OpenID Provider already installed"
  else
    say "installing the test OpenID Provider (npm ci in testing/oidc-op)"
    npm ci --prefix "$op" --no-audit --no-fund </dev/null >&2
    cp "$op/package-lock.json" "$op/node_modules/.jitgate-installed-lock"
  fi
fi
