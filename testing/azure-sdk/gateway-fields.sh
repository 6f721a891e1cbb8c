#!/bin/bash
# Microsoft's Python SDK (azure-mgmt-security 7.0.0, api-version 2020-01-01) against a
# fresh jitgate controller: a machine behind a DNAT gateway shows the gateway's
# publicIpAddress on the policy's VM and a mappedPort on each request port, read by the
# SDK's own models. A manual check (it installs the SDK from PyPI into a temporary
# virtualenv); run from the repository after `cargo build --release -p jitgate`:
#
#   ./testing/azure-sdk/gateway-fields.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${JITGATE_BIN:-$here/../../target/release/jitgate}"
work="$(mktemp -d)"
port="${PORT:-18443}"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q azure-mgmt-security==7.0.0 azure-core
"$bin" serve --listen "127.0.0.1:$port" --auto-tls --data-dir "$work/data" > "$work/controller.log" 2>&1 &
pid=$!
trap 'kill $pid; rm -rf "$work"' EXIT
api="https://localhost:$port"
for _ in $(seq 100); do
  if [ -f "$work/data/tls/ca.pem" ] && curl -sf --cacert "$work/data/tls/ca.pem" "$api/healthz" > /dev/null 2>&1; then break; fi
  sleep 0.1
done
export CURL_CA_BUNDLE="$work/data/tls/ca.pem"
token="$(cat "$work/data/bootstrap-token")"
auth="Authorization: Bearer $token"
json='Content-Type: application/json'
sub=$(curl -sf -H "$auth" "$api/api/v1/whoami" | sed -n 's/.*"subscription":"\([^"]*\)".*/\1/p')
curl -sf -H "$auth" -H "$json" -X POST "$api/api/v1/vms" -d '{"resourceGroup":"rg","name":"gw"}' > /dev/null
curl -sf -H "$auth" -H "$json" -X POST "$api/api/v1/vms" -d '{"resourceGroup":"rg","name":"win-1"}' > /dev/null
curl -sf -H "$auth" -H "$json" -X PUT "$api/api/v1/vms/rg/win-1/placement" \
  -d '{"gateway":"rg/gw","address":"10.1.2.3","mode":"dnat","publicIpAddress":"198.51.100.1"}' > /dev/null
vm="/subscriptions/$sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/win-1"
curl -sf -H "$auth" -H "$json" -X PUT \
  "$api/subscriptions/$sub/resourceGroups/rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/behind?api-version=2020-01-01" \
  -d '{"kind":"Basic","properties":{"virtualMachines":[{"id":"'"$vm"'","ports":[{"number":3389,"protocol":"TCP","allowedSourceAddressPrefix":"*","maxRequestAccessDuration":"PT3H"}]}]}}' > /dev/null
CA="$work/data/tls/ca.pem" "$work/venv/bin/python" "$here/gateway_fields.py" "$api" "$token" "$sub" rg westeurope behind "$vm"
