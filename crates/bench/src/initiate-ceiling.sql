-- pgbench script for `jitgate-bench replicas --ceiling`: the rows one initiate writes
-- (request, its port, its audit event) after the one read it needs, in one
-- transaction per initiate, as fast as PostgreSQL takes them. No hashing, no HTTP, no
-- write lock: an upper bound for what a controller can get through this server.
BEGIN;
SELECT uid, rev FROM policies ORDER BY key LIMIT 1;
INSERT INTO requests(id, policy_uid, policy_key, requestor, justification, start_ns, caller_ip)
    VALUES ('ceiling-' || nextval('ceiling_seq'), 'uid', 'policy-key', 'bench', 'bench', 1796033255597780096, '127.0.0.1');
INSERT INTO request_ports(request_id, vm_idx, port_idx, vm_key, vm_id, number, protocol, source, end_ns, status, reason)
    VALUES ('ceiling-' || currval('ceiling_seq'), 0, 0, 'vm-key-' || currval('ceiling_seq') % 2000, 'vm-id', 22, 'TCP', '10.1.2.3', 1796033255597780096, 'Initiated', NULL);
INSERT INTO audit(seq, time, time_ns, actor, source, action, target, outcome, details, prev_hash, hash)
    VALUES (nextval('ceiling_seq'), '2026-11-30T10:07:43.59450875Z', 1796033263594508750, 'bench', '127.0.0.1', 'request.initiate',
            '/subscriptions/28e1f082-c8e4-4a23-8fbd-2bf97625c715/resourceGroups/rg-8/providers/Microsoft.Compute/virtualMachines/vm-866', 'success',
            '{"justification":"bench","policy":"/subscriptions/28e1f082-c8e4-4a23-8fbd-2bf97625c715/resourceGroups/rg-8/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default","ports":[{"endTimeUtc":"2026-11-30T11:07:43.59450875Z","number":22,"protocol":"TCP","source":"10.39.166.63"}],"request":"83440255-b83b-412a-b0dc-8f489c0ae7dc"}',
            '168e7950631688bf07f8a0a0974c9a50d5958e4625e56e8c6b5a4400ed9859c9', '58d8a59d136404c9e6ef3d28b86e37152c6517bce1169dd26481bcd43bacaa0b');
COMMIT;
