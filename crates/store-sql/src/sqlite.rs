//! The SQLite engine: the embedded default. One file in WAL mode, `synchronous=FULL`;
//! its schema migrations, numbered by `PRAGMA user_version`; and what only a file has
//! (`verify_file`).

use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};

use jitgate_core::audit::VerifyReport;
use jitgate_store::{AnchorSet, Result, StoreError};

use crate::db::{Db, Dialect, Param, Row, ToParam, Value};

/// The schema, one migration per step; a file at step N gets N+1.. applied.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE subscriptions(id TEXT PRIMARY KEY, created_ns INTEGER NOT NULL);
CREATE TABLE vms(
    key TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    subscription TEXT NOT NULL,
    rg_key TEXT NOT NULL,
    location TEXT,
    created_ns INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
CREATE INDEX vms_scope ON vms(subscription, rg_key);
CREATE TABLE policies(
    key TEXT PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    subscription TEXT NOT NULL,
    rg TEXT NOT NULL,
    rg_key TEXT NOT NULL,
    location TEXT NOT NULL,
    location_key TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    vms_json TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
);
CREATE INDEX policies_scope ON policies(subscription, rg_key, location_key);
CREATE TABLE policy_vms(
    vm_key TEXT PRIMARY KEY,
    policy_key TEXT NOT NULL REFERENCES policies(key) ON DELETE CASCADE
);
CREATE INDEX policy_vms_policy ON policy_vms(policy_key);
CREATE TABLE requests(
    id TEXT PRIMARY KEY,
    policy_uid TEXT NOT NULL,
    policy_key TEXT NOT NULL,
    requestor TEXT NOT NULL,
    justification TEXT,
    start_ns INTEGER NOT NULL,
    caller_ip TEXT NOT NULL
);
CREATE INDEX requests_policy ON requests(policy_uid, start_ns);
CREATE INDEX requests_requestor ON requests(requestor, start_ns);
CREATE TABLE request_ports(
    request_id TEXT NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    vm_idx INTEGER NOT NULL,
    port_idx INTEGER NOT NULL,
    vm_key TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    source TEXT NOT NULL,
    end_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    PRIMARY KEY(request_id, vm_idx, port_idx)
);
CREATE INDEX request_ports_live ON request_ports(end_ns) WHERE status = 'Initiated';
CREATE INDEX request_ports_vm ON request_ports(vm_key, number) WHERE status = 'Initiated';
CREATE INDEX request_ports_vm_all ON request_ports(vm_key);
CREATE TABLE tokens(
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    description TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER,
    revoked_ns INTEGER
);
CREATE TABLE role_assignments(
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    role TEXT NOT NULL,
    scope TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE INDEX role_assignments_principal ON role_assignments(principal);
CREATE TABLE audit(
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_time ON audit(time_ns);
"#,
    r#"
ALTER TABLE policies ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
CREATE TABLE nsg_rules(
    vm_key TEXT NOT NULL,
    name TEXT NOT NULL,
    priority INTEGER NOT NULL,
    access TEXT NOT NULL,
    protocol TEXT NOT NULL,
    sources TEXT NOT NULL,
    ports TEXT NOT NULL,
    description TEXT NOT NULL,
    PRIMARY KEY(vm_key, name),
    UNIQUE(vm_key, priority)
);
CREATE TABLE enroll_tokens(
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    scope TEXT NOT NULL,
    expires_ns INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    description TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    revoked_ns INTEGER
);
CREATE TABLE agent_status(
    vm_key TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    report TEXT NOT NULL,
    last_seen_ns INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE exclusions(
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE blocked_attempts(
    vm_key TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX blocked_attempts_vm ON blocked_attempts(vm_key, at_ns);
CREATE INDEX blocked_attempts_at ON blocked_attempts(at_ns);
"#,
    r#"
ALTER TABLE enroll_tokens ADD COLUMN allow_replace INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tokens_secret_hash ON tokens(secret_hash);
"#,
    // A VM found by name in one indexed read; pages of a resource group in key order.
    // The name is what follows the id's last '/'.
    r#"
ALTER TABLE vms ADD COLUMN name_key TEXT NOT NULL DEFAULT '';
UPDATE vms SET name_key = lower(replace(id, rtrim(id, replace(id, '/', '')), ''));
CREATE INDEX vms_name ON vms(subscription, name_key, key);
CREATE INDEX vms_rg_page ON vms(subscription, rg_key, key);
"#,
    // Pages of all VMs in key order without sorting the subscription's VMs first.
    r#"
CREATE INDEX vms_page ON vms(subscription, key);
"#,
    // Pages of requests (newest first) and of the lists ordered by creation.
    r#"
CREATE INDEX requests_page ON requests(start_ns, id);
CREATE INDEX tokens_page ON tokens(created_ns, id);
CREATE INDEX role_assignments_page ON role_assignments(created_ns, id);
CREATE INDEX enroll_tokens_page ON enroll_tokens(created_ns, id);
CREATE INDEX exclusions_page ON exclusions(created_ns, id);
"#,
    // Recommendations without classifying every VM at each read: each VM's verdict
    // as its own facts give it (`refresh_verdicts`), updated by every write that
    // changes them; `excluded` is the reason of the exclusion covering it, and
    // `last_seen_ns` its agent's last report, both settled when read. The agent's
    // facts are kept beside its report. The table is filled when the store opens
    // (`fill_verdicts`), which is how an existing installation gets it. The counts read
    // only their (covering) index; pages read in key order without sorting.
    r#"
CREATE TABLE vm_verdicts(
    vm_key TEXT PRIMARY KEY,
    subscription TEXT NOT NULL,
    rg_key TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    exposed TEXT NOT NULL,
    listening TEXT NOT NULL,
    last_seen_ns INTEGER,
    excluded TEXT
);
CREATE INDEX vm_verdicts_counts ON vm_verdicts(subscription, rg_key, verdict, last_seen_ns, excluded);
CREATE INDEX vm_verdicts_page ON vm_verdicts(subscription, vm_key);
CREATE INDEX vm_verdicts_rg_page ON vm_verdicts(subscription, rg_key, vm_key);
ALTER TABLE agent_status ADD COLUMN facts TEXT;
"#,
    // Initiates retried with the same key (a lost answer, a failover) are not doubled.
    r#"
CREATE TABLE idempotency(
    requestor TEXT NOT NULL,
    key TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY(requestor, key)
);
CREATE INDEX idempotency_age ON idempotency(created_ns);
"#,
    // Sign-in with the identity provider: who a sign-in credential was issued to, and
    // the command line's sign-ins under way (loopback and device flows).
    r#"
ALTER TABLE tokens ADD COLUMN identity TEXT;
CREATE TABLE signins(
    id TEXT PRIMARY KEY,
    user_code TEXT UNIQUE,
    challenge TEXT,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    principal TEXT,
    identity TEXT,
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL,
    polled_ns INTEGER
);
CREATE INDEX signins_expiry ON signins(expires_ns);
"#,
    // A sign-in credential's idle timeout.
    r#"
ALTER TABLE tokens ADD COLUMN last_used_ns INTEGER;
"#,
    // Approvals: the rules, a request's snapshot of the rule it waits under (its wait is
    // open while open_until_ns is set), and the decisions.
    r#"
CREATE TABLE approval_rules(
    name TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    ports TEXT NOT NULL,
    approvers TEXT NOT NULL,
    min_approvals INTEGER NOT NULL,
    deny_threshold INTEGER NOT NULL,
    require_justification INTEGER NOT NULL,
    justification_pattern TEXT,
    pending_timeout_s INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
);
ALTER TABLE requests ADD COLUMN approval_rule TEXT;
ALTER TABLE requests ADD COLUMN min_approvals INTEGER;
ALTER TABLE requests ADD COLUMN deny_threshold INTEGER;
ALTER TABLE requests ADD COLUMN approvers TEXT;
ALTER TABLE requests ADD COLUMN pending_until_ns INTEGER;
ALTER TABLE requests ADD COLUMN open_until_ns INTEGER;
CREATE INDEX requests_open ON requests(open_until_ns) WHERE open_until_ns IS NOT NULL;
CREATE TABLE approval_votes(
    request_id TEXT NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    principal TEXT NOT NULL,
    approve INTEGER NOT NULL,
    reason TEXT,
    at_ns INTEGER NOT NULL,
    PRIMARY KEY(request_id, principal)
);
"#,
    // Break-glass requests, and their review.
    r#"
ALTER TABLE requests ADD COLUMN break_glass INTEGER;
ALTER TABLE requests ADD COLUMN reviewed_by TEXT;
ALTER TABLE requests ADD COLUMN reviewed_ns INTEGER;
"#,
    // Webhooks: the endpoints and the durable outbox of their messages.
    r#"
CREATE TABLE webhooks(
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    format TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    disabled_ns INTEGER,
    disabled_reason TEXT
);
CREATE TABLE webhook_outbox(
    msg_id TEXT PRIMARY KEY,
    webhook TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    next_ns INTEGER NOT NULL,
    claimed_until_ns INTEGER,
    done_ns INTEGER,
    outcome TEXT,
    last_error TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox(next_ns) WHERE done_ns IS NULL;
CREATE INDEX webhook_outbox_of ON webhook_outbox(webhook);
"#,
    // When an agent was found offline (its report older than the threshold), once.
    r#"
ALTER TABLE agent_status ADD COLUMN offline_ns INTEGER;
"#,
    // Whether a policy protects the VM, kept with its verdict (the dashboard's tabs are
    // then one aggregate over this table); filled when the store opens.
    r#"
ALTER TABLE vm_verdicts ADD COLUMN protected INTEGER NOT NULL DEFAULT 0;
"#,
    // An initiate finds the grants it supersedes (same VM, port and source) through
    // this index instead of reading every live grant of the VM.
    r#"
DROP INDEX request_ports_vm;
CREATE INDEX request_ports_vm ON request_ports(vm_key, number, source) WHERE status = 'Initiated';
"#,
    // Where each grant row last changed (an audit sequence point), so that the
    // controller reads only a VM's grants changed since it last looked. Its index
    // starts with the VM, so it replaces the index on the VM alone (one index more
    // per grant row would cost every initiate a page).
    r#"
ALTER TABLE request_ports ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX request_ports_changed ON request_ports(vm_key, changed);
DROP INDEX request_ports_vm_all;
"#,
    // Machines behind a gateway (gateway mode), and the mapped ports of those in DNAT
    // mode: unique per public address, stable while the machine stays on it.
    r#"
CREATE TABLE placements(
    vm_key TEXT PRIMARY KEY,
    gateway_key TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    address TEXT NOT NULL,
    mode TEXT NOT NULL,
    masquerade INTEGER NOT NULL,
    public_address TEXT,
    UNIQUE(gateway_key, address)
);
CREATE TABLE mapped_ports(
    vm_key TEXT NOT NULL,
    number INTEGER NOT NULL,
    public_address TEXT NOT NULL,
    mapped INTEGER NOT NULL,
    PRIMARY KEY(vm_key, number),
    UNIQUE(public_address, mapped)
);
"#,
    // Install codes (`enroll-token create --print-install`): the enrollment token
    // sealed with a key only the code gives, and how many more times it is given.
    r#"
CREATE TABLE install_codes(
    code_hash TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    sealed TEXT NOT NULL,
    expires_ns INTEGER NOT NULL,
    uses_left INTEGER NOT NULL
);
"#,
];

/// Opens (creating if needed) the database file with the store's settings.
pub(crate) fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Every statement the store runs stays prepared (rusqlite keeps 16 by default,
    // fewer than one round of initiate, agent report and revoke uses).
    conn.set_prepared_statement_cache_capacity(256);
    // Plans never depend on bound values (the query planner stability guarantee).
    // Without it, a statement whose plan looked at a bound value is marked so, and
    // clearing its bindings (rusqlite does, each time it goes back to the cache)
    // makes SQLite parse and plan it again at its next use: most of the store's
    // lookups by key, the agent long-poll's and the initiate's included, were
    // prepared anew at every call (about 0.1 ms each).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

/// WAL frames after which the checkpointer is asked to copy the log into the database
/// (SQLite's automatic checkpoint starts at the same count, in the committing writer).
const CHECKPOINT_FRAMES: i32 = 1000;

/// WAL frames past which the writer checkpoints the log itself, as SQLite would: the
/// bound on the log when the checkpointer does not keep up (under a stream of commits
/// a checkpoint may never reach the log's end, and the log only restarts once all of
/// it has been copied).
const CHECKPOINT_FRAMES_MAX: i32 = 20_000;

/// Moves the writer's WAL checkpoints to a thread of their own, on its own connection.
///
/// SQLite's automatic checkpoint runs inside the commit that crosses its threshold,
/// so about one write in thirty waited for a few milliseconds of copying and an fsync
/// of the database file (the tail of initiate latencies). A passive checkpoint on
/// another connection takes no lock the writer needs. The thread ends when the writer's
/// connection is dropped (with the hook, its only wake-up).
pub(crate) fn checkpoint_aside(writer: &mut Connection, path: &Path) -> Result<()> {
    use rusqlite::wal::CheckpointMode;
    let conn = open_connection(path)?;
    let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("jitgate-store-checkpoint".into())
        .spawn(move || {
            while asked.recv().is_ok() {
                if let Err(e) = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; the next commit asks again");
                }
            }
        })
        .map_err(|e| StoreError::Db(format!("cannot start the checkpoint thread: {e}")))?;
    // Registering a hook replaces SQLite's automatic checkpoint on this connection.
    writer.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, frames: i32| {
        // An error returned here would fail a commit that has happened: none is.
        if frames >= CHECKPOINT_FRAMES_MAX {
            let _ = wal.checkpoint_v2(CheckpointMode::PASSIVE);
        } else if frames >= CHECKPOINT_FRAMES {
            // One request waiting is enough.
            let _ = ask.try_send(());
        }
        Ok(())
    }))?;
    Ok(())
}

/// Applies the migrations the file has not had, each in its own transaction.
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

/// Opens a database file read-only.
pub(crate) fn open_read_only(path: &Path) -> Result<Connection> {
    if !path.exists() {
        return Err(StoreError::Db(format!("no database at {}", path.display())));
    }
    Ok(Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?)
}

/// Opens a database read-only and verifies its audit chain (`jitgate audit verify
/// --data-dir`, which needs no running controller).
pub fn verify_file(path: &Path, anchors: Option<&AnchorSet>) -> Result<VerifyReport> {
    crate::verify_connection(&open_read_only(path)?, anchors)
}

fn bind<'a>(params: &'a [&'a dyn ToParam]) -> impl Iterator<Item = ToSqlOutput<'a>> + 'a {
    params.iter().map(|p| {
        ToSqlOutput::Borrowed(match p.param() {
            Param::Null => ValueRef::Null,
            Param::Int(i) => ValueRef::Integer(i),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
            Param::Blob(b) => ValueRef::Blob(b),
        })
    })
}

fn value(v: ValueRef<'_>) -> Result<Value> {
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Text(t) => Value::Text(
            std::str::from_utf8(t)
                .map_err(|e| StoreError::Corrupt(format!("text column: {e}")))?
                .to_owned(),
        ),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        ValueRef::Real(r) => {
            return Err(StoreError::Corrupt(format!(
                "unexpected floating-point column {r}"
            )));
        }
    })
}

impl Db for Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&self, sql: &str, params: &[&dyn ToParam]) -> Result<u64> {
        let n = self
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(bind(params)))?;
        Ok(n as u64)
    }

    fn each(
        &self,
        sql: &str,
        params: &[&dyn ToParam],
        each: &mut dyn FnMut(&mut Row) -> Result<()>,
    ) -> Result<()> {
        let mut st = self.prepare_cached(sql)?;
        let n = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(bind(params)))?;
        while let Some(r) = rows.next()? {
            let cols = (0..n)
                .map(|i| value(r.get_ref(i)?))
                .collect::<Result<Vec<_>>>()?;
            each(&mut Row::new(cols))?;
        }
        Ok(())
    }

    fn batch(&self, sql: &str) -> Result<()> {
        Ok(self.execute_batch(sql)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup by key is planned once: taking it from the statement cache again with
    /// another key does not make SQLite parse and plan it again (it did for most of
    /// the store's lookups, at every call, before the query planner stability
    /// guarantee was set).
    #[test]
    fn cached_lookups_are_not_prepared_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("t.db")).unwrap();
        migrate(&mut conn).unwrap();
        for sql in [
            "SELECT v.id, p.gateway_id FROM placements p JOIN vms v ON v.key = p.vm_key WHERE p.vm_key = ?1",
            "SELECT COALESCE(MAX(changed), 0) FROM request_ports WHERE vm_key = ?1",
            "SELECT p.request_id FROM request_ports p JOIN requests r ON r.id = p.request_id
             WHERE p.vm_key = ?1 AND p.changed > ?2",
        ] {
            for key in ["a", "b", "a", "c"] {
                // As `Db::each` does: from the cache, used, and back (which clears
                // the bindings).
                let mut st = conn.prepare_cached(sql).unwrap();
                let params: Vec<&dyn rusqlite::ToSql> = match st.parameter_count() {
                    1 => vec![&key],
                    _ => vec![&key, &0i64],
                };
                let mut rows = st.query(params.as_slice()).unwrap();
                while rows.next().unwrap().is_some() {}
                drop(rows);
                assert_eq!(
                    st.get_status(rusqlite::StatementStatus::RePrepare),
                    0,
                    "re-prepared: {sql}"
                );
            }
        }
    }

    /// The writer's log is copied into the database by the checkpoint thread: after
    /// bursts of commits that, unchecked, would make the log a few thousand frames
    /// long, it stays near the threshold, and the writer never checkpoints itself
    /// below `CHECKPOINT_FRAMES_MAX`.
    #[test]
    fn the_log_is_checkpointed_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut writer = open_connection(&path).unwrap();
        migrate(&mut writer).unwrap();
        checkpoint_aside(&mut writer, &path).unwrap();
        // Durability is not what is tested: commits without fsync keep this quick.
        writer.execute_batch("PRAGMA synchronous = OFF").unwrap();
        let wal = dir.path().join("t.db-wal");
        let bursts = 8;
        let per_burst = 600;
        for b in 0..bursts {
            for i in 0..per_burst {
                writer
                    .execute(
                        "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                        [format!("k{b}-{i}"), "x".repeat(200)],
                    )
                    .unwrap();
            }
            // A pause between bursts, in which the checkpoint reaches the log's end.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let frame = 4096 + 24;
        let frames = std::fs::metadata(&wal).unwrap().len() / frame;
        // Each commit adds at least one frame: unchecked, the log would hold them all.
        assert!(
            frames < (bursts * per_burst) as u64 / 2,
            "the log grew to {frames} frames"
        );
        // Every row is in the database (read through a fresh connection).
        let reader = open_connection(&path).unwrap();
        let n: i64 = reader
            .query_row("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, (bursts * per_burst) as i64);
    }
}
