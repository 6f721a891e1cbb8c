"""Appends N audit events, correctly hash-chained, to a stopped controller's database,
to measure `jitgate audit verify` on a large chain:

    jitgate serve --data-dir d &  (stop it once it listens)
    python3 scripts/extend-audit-chain.py d/jitgate.db 1000000
    /usr/bin/time -f '%e s, max RSS %M KiB' jitgate audit verify --data-dir d
"""
import hashlib, sqlite3, struct, sys, datetime

db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db)
seq, prev = c.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
base = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

def h(seq, prev, fields):
    m = hashlib.sha256()
    m.update(struct.pack(">Q", seq))
    for f in [prev] + fields:
        b = f.encode()
        m.update(struct.pack(">Q", len(b)))
        m.update(b)
    return m.hexdigest()

rows = []
for i in range(n):
    seq += 1
    t = base + datetime.timedelta(seconds=i)
    time = t.strftime("%Y-%m-%dT%H:%M:%SZ")
    time_ns = int(t.timestamp()) * 1_000_000_000
    actor, source, action = "alice", "10.0.0.9", "request.initiate"
    target = f"/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/rg1/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default"
    details = '{"id":"%032x","virtualMachines":[{"id":"/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm%d","ports":[{"number":22,"source":"10.0.0.9/32","end":"%s"}]}],"superseded":0}' % (i, i % 1000, time)
    outcome = "success"
    hh = h(seq, prev, [time, actor, source, action, target, outcome, details])
    rows.append((seq, time, time_ns, actor, source, action, target, outcome, details, prev, hh))
    prev = hh
    if len(rows) == 50_000:
        c.executemany("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        rows = []
if rows:
    c.executemany("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
c.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (str(seq),))
c.commit()
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
print("chain now ends at", seq)
