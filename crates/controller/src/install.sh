#!/bin/sh
# jitgate agent installer, served by the controller @CONTROLLER@.
#
# It checks this system (root, Debian family, architecture), downloads the agent from
# the controller over the same pinned TLS connection and checks its SHA-256 before
# installing anything; then installs the binary, the systemd units (the boot-time
# restore included), /etc/jitgate/agent.env and the enrollment token (mode 0600),
# starts the agent, waits for it to enroll, and removes the used token. Running it
# again changes nothing on a machine where all of that is in place.
#
# JITGATE_VM_NAME names the machine (default: its hostname); JITGATE_INSTALL_ROOT
# installs under another root directory (then without systemd: the agent is started
# in the background).
set -eu

CONTROLLER=@CONTROLLER@
PIN=@PIN@
SHA256=@SHA256@
ARCH=@ARCH@
BINARY_URL="$CONTROLLER/download/jitgate-linux-$ARCH"
RESOURCE_GROUP=@RESOURCE_GROUP@
TOKEN=@TOKEN@
ROOT="${JITGATE_INSTALL_ROOT:-}"

say() { printf 'jitgate install: %s\n' "$*"; }
fail() {
	printf 'jitgate install: %s\n' "$*" >&2
	exit 1
}

[ "$(id -u)" = 0 ] || fail "run me as root (... | sudo sh)"

# Debian and its derivatives only: the units, paths and package names are theirs.
os_id=""
if [ -f "$ROOT/etc/os-release" ]; then
	os_id="$(sed -n 's/^ID=//p; s/^ID_LIKE=//p' "$ROOT/etc/os-release" | tr -d '"' | tr '\n' ' ')"
fi
case " $os_id " in
*" debian "* | *" ubuntu "*) ;;
*) fail "this installer supports Debian and its derivatives; this system is '${os_id:-unknown}'. Install the jitgate binary and deploy/*.service by hand (see the README)" ;;
esac

case "$(uname -m)" in
x86_64) here=amd64 ;;
aarch64) here=arm64 ;;
*) here="$(uname -m)" ;;
esac
[ "$here" = "$ARCH" ] || fail "this controller serves the $ARCH agent; this machine is $here"

fetch() {
	if [ -n "$PIN" ]; then
		# The pin replaces the CA check: curl refuses any other key before sending.
		curl -fsS --insecure --pinnedpubkey "$PIN" "$@"
	else
		curl -fsS "$@"
	fi
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Retried: the controller limits the downloads under way (429) and may be restarting.
fetch --retry 10 --retry-delay 3 -o "$work/jitgate" "$BINARY_URL" || fail "cannot download the agent from $BINARY_URL"
got="$(sha256sum "$work/jitgate" | cut -d' ' -f1)"
[ "$got" = "$SHA256" ] || fail "the downloaded agent's SHA-256 is $got, not $SHA256 as the controller announced: nothing was installed"
chmod 0755 "$work/jitgate"

if ! command -v nft > /dev/null 2>&1; then
	command -v apt-get > /dev/null 2>&1 || fail "nft is missing and apt-get is not here to install nftables"
	say "installing nftables"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables > /dev/null
fi

changed=0
# put PATH MODE: writes standard input to PATH when it differs; true when written.
put() {
	cat > "$work/put"
	if [ -f "$1" ] && cmp -s "$work/put" "$1"; then
		say "$1: unchanged"
		return 1
	fi
	mkdir -p "$(dirname "$1")"
	chmod "$2" "$work/put"
	mv -f "$work/put" "$1.new"
	mv -f "$1.new" "$1"
	say "$1: written"
	return 0
}

bin="$ROOT/usr/local/bin/jitgate"
if put "$bin" 0755 < "$work/jitgate"; then changed=1; fi

if put "$ROOT/etc/systemd/system/jitgate-agent.service" 0644 << 'JITGATE_UNIT_END'; then changed=1; fi
@AGENT_UNIT@
JITGATE_UNIT_END
if put "$ROOT/etc/systemd/system/jitgate-agent-restore.service" 0644 << 'JITGATE_UNIT_END'; then changed=1; fi
@RESTORE_UNIT@
JITGATE_UNIT_END

state="$ROOT/var/lib/jitgate-agent"
env="$ROOT/etc/jitgate/agent.env"
token_file="$ROOT/etc/jitgate/enroll-token"
umask 077
if [ -f "$state/credentials.json" ]; then
	say "already enrolled: the agent's credential is in $state"
	rm -f "$token_file"
elif [ -n "$TOKEN" ]; then
	printf '%s\n' "$TOKEN" > "$work/token"
	put "$token_file" 0600 < "$work/token" || true
else
	fail "this install line was used already or has expired, and this machine is not enrolled: make a new one with 'jitgate enroll-token create --resource-group RG --print-install'"
fi
if [ -n "$RESOURCE_GROUP" ] || [ ! -f "$env" ]; then
	{
		printf '# Written by the jitgate installer from %s.\n' "$CONTROLLER"
		printf 'JITGATE_CONTROLLER=%s\n' "$CONTROLLER"
		printf 'JITGATE_RESOURCE_GROUP=%s\n' "$RESOURCE_GROUP"
		printf 'JITGATE_ENROLL_TOKEN_FILE=%s\n' "$token_file"
		if [ -n "${JITGATE_VM_NAME:-}" ]; then printf 'JITGATE_VM_NAME=%s\n' "$JITGATE_VM_NAME"; fi
	} > "$work/env"
	if put "$env" 0600 < "$work/env"; then changed=1; fi
fi

if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl > /dev/null 2>&1; then
	systemctl daemon-reload
	systemctl enable --quiet jitgate-agent-restore.service jitgate-agent.service
	if [ "$changed" = 1 ] || ! systemctl is-active --quiet jitgate-agent.service; then
		systemctl restart jitgate-agent.service
		say "jitgate-agent.service: started"
	else
		say "jitgate-agent.service: running, unchanged"
	fi
	log="journalctl -u jitgate-agent"
else
	# No systemd here (a container, another root): the agent runs in the background.
	pid_file="$ROOT/run/jitgate-agent.pid"
	log="$ROOT/var/log/jitgate-agent.log"
	pid="$(cat "$pid_file" 2> /dev/null || true)"
	if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null && [ "$changed" = 0 ]; then
		say "agent: running (pid $pid), unchanged"
	else
		if [ -n "$pid" ]; then kill "$pid" 2> /dev/null || true; fi
		mkdir -p "$ROOT/run" "$ROOT/var/log" "$state"
		(
			set -a
			. "$env"
			set +a
			JITGATE_STATE_DIR="$state" exec setsid "$bin" agent >> "$log" 2>&1 < /dev/null
		) &
		echo $! > "$pid_file"
		say "systemd is not running here: started the agent in the background (pid $!, log $log); it will not start again at boot"
	fi
fi

i=0
while [ ! -f "$state/credentials.json" ]; do
	i=$((i + 1))
	[ "$i" -le 600 ] || fail "the agent has not enrolled within 60 s: see $log"
	sleep 0.1
done
rm -f "$token_file"
say "enrolled with $CONTROLLER; the agent is running"
