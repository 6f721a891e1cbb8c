"""Microsoft's Python SDK (azure-mgmt-security) against a jitgate controller: a DNAT
machine's policy VM carries publicIpAddress, and request ports mappedPort."""
import datetime, os, sys, time
from azure.core.credentials import AccessToken
from azure.mgmt.security import SecurityCenter
from azure.mgmt.security.v2020_01_01 import models as m

base, token, sub, rg, loc, name, vm = sys.argv[1:8]

class Tok:
    def get_token(self, *scopes, **kw):
        return AccessToken(token, int(time.time()) + 3600)

c = SecurityCenter(Tok(), sub, base_url=base, api_version="2020-01-01",
                   connection_verify=os.environ["CA"])
ops = c.jit_network_access_policies
pol = ops.get(rg, loc, name)
pvm = pol.virtual_machines[0]
print("policy vm", pvm.id, "publicIpAddress", pvm.public_ip_address)
assert pvm.public_ip_address, "no publicIpAddress in the SDK's model"
end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=10)
req = m.JitNetworkAccessPolicyInitiateRequest(
    virtual_machines=[m.JitNetworkAccessPolicyInitiateVirtualMachine(
        id=vm, ports=[m.JitNetworkAccessPolicyInitiatePort(
            number=3389, allowed_source_address_prefix="192.0.2.77", end_time_utc=end)])],
    justification="sdk check")
r = ops.initiate(rg, loc, name, req)
port = r.virtual_machines[0].ports[0]
print("initiate", port.number, "status", port.status, "mappedPort", port.mapped_port)
assert port.mapped_port, "no mappedPort in the initiate answer"
pol = ops.get(rg, loc, name)
rp = pol.requests[0].virtual_machines[0].ports[0]
print("policy request port", rp.number, "mappedPort", rp.mapped_port)
assert rp.mapped_port == port.mapped_port
print("OK: the SDK reads publicIpAddress and mappedPort")
