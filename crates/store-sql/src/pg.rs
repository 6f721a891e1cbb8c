//! The PostgreSQL engine: for installations that run several controllers on one
//! database (every replica's writer takes the `write_lock` row, so there is one audit
//! chain and each write sees every earlier commit). Synchronous `postgres` client
//! (tokio-postgres underneath) on the store's own threads, like SQLite's connections:
//! the store's logic runs unchanged on either engine. Statements are prepared once per
//! connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use percent_encoding::percent_decode_str;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Config, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use jitgate_store::{Result, StoreError};

use crate::db::{Db, Dialect, Param, Row, ToParam, Value, to_dollar_placeholders};

/// The schema, one migration per step (`schema_version` holds how many were applied).
/// Column types are those of the SQLite schema, with 64-bit integers and byte-order
/// ("C") text comparison, so keys sort and page exactly as they do on SQLite.
const MIGRATIONS: &[&str] = &[
    r#"
-- SQLite's instr(), which the audit query uses.
CREATE FUNCTION instr(haystack TEXT, needle TEXT) RETURNS INTEGER
    LANGUAGE sql IMMUTABLE STRICT AS 'SELECT strpos(haystack, needle)';
CREATE TABLE write_lock(id BIGINT PRIMARY KEY);
INSERT INTO write_lock(id) VALUES (1);
CREATE TABLE meta(key TEXT COLLATE "C" PRIMARY KEY, value TEXT COLLATE "C" NOT NULL);
CREATE TABLE subscriptions(id TEXT COLLATE "C" PRIMARY KEY, created_ns BIGINT NOT NULL);
CREATE TABLE vms(
    key TEXT COLLATE "C" PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL,
    subscription TEXT COLLATE "C" NOT NULL,
    rg_key TEXT COLLATE "C" NOT NULL,
    location TEXT COLLATE "C",
    created_ns BIGINT NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL
);
CREATE INDEX vms_scope ON vms(subscription, rg_key);
CREATE TABLE policies(
    key TEXT COLLATE "C" PRIMARY KEY,
    uid TEXT COLLATE "C" NOT NULL UNIQUE,
    subscription TEXT COLLATE "C" NOT NULL,
    rg TEXT COLLATE "C" NOT NULL,
    rg_key TEXT COLLATE "C" NOT NULL,
    location TEXT COLLATE "C" NOT NULL,
    location_key TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    vms_json TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL
);
CREATE INDEX policies_scope ON policies(subscription, rg_key, location_key);
CREATE TABLE policy_vms(
    vm_key TEXT COLLATE "C" PRIMARY KEY,
    policy_key TEXT COLLATE "C" NOT NULL REFERENCES policies(key) ON DELETE CASCADE
);
CREATE INDEX policy_vms_policy ON policy_vms(policy_key);
CREATE TABLE requests(
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    id TEXT COLLATE "C" PRIMARY KEY,
    policy_uid TEXT COLLATE "C" NOT NULL,
    policy_key TEXT COLLATE "C" NOT NULL,
    requestor TEXT COLLATE "C" NOT NULL,
    justification TEXT COLLATE "C",
    start_ns BIGINT NOT NULL,
    caller_ip TEXT COLLATE "C" NOT NULL
);
CREATE INDEX requests_policy ON requests(policy_uid, start_ns);
CREATE INDEX requests_requestor ON requests(requestor, start_ns);
CREATE TABLE request_ports(
    request_id TEXT COLLATE "C" NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    vm_idx BIGINT NOT NULL,
    port_idx BIGINT NOT NULL,
    vm_key TEXT COLLATE "C" NOT NULL,
    vm_id TEXT COLLATE "C" NOT NULL,
    number BIGINT NOT NULL,
    protocol TEXT COLLATE "C" NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    end_ns BIGINT NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    reason TEXT COLLATE "C",
    PRIMARY KEY(request_id, vm_idx, port_idx)
);
CREATE INDEX request_ports_live ON request_ports(end_ns) WHERE status = 'Initiated';
CREATE INDEX request_ports_vm ON request_ports(vm_key, number) WHERE status = 'Initiated';
CREATE INDEX request_ports_vm_all ON request_ports(vm_key);
CREATE TABLE tokens(
    id TEXT COLLATE "C" PRIMARY KEY,
    principal TEXT COLLATE "C" NOT NULL,
    secret_hash TEXT COLLATE "C" NOT NULL,
    description TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL,
    expires_ns BIGINT,
    revoked_ns BIGINT
);
CREATE TABLE role_assignments(
    id TEXT COLLATE "C" PRIMARY KEY,
    principal TEXT COLLATE "C" NOT NULL,
    role TEXT COLLATE "C" NOT NULL,
    scope TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL
);
CREATE INDEX role_assignments_principal ON role_assignments(principal);
CREATE TABLE audit(
    seq BIGINT PRIMARY KEY,
    time TEXT COLLATE "C" NOT NULL,
    time_ns BIGINT NOT NULL,
    actor TEXT COLLATE "C" NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    action TEXT COLLATE "C" NOT NULL,
    target TEXT COLLATE "C" NOT NULL,
    outcome TEXT COLLATE "C" NOT NULL,
    details TEXT COLLATE "C" NOT NULL,
    prev_hash TEXT COLLATE "C" NOT NULL,
    hash TEXT COLLATE "C" NOT NULL
);
CREATE INDEX audit_time ON audit(time_ns);


ALTER TABLE policies ADD COLUMN rev BIGINT NOT NULL DEFAULT 0;


CREATE TABLE nsg_rules(
    vm_key TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    priority BIGINT NOT NULL,
    access TEXT COLLATE "C" NOT NULL,
    protocol TEXT COLLATE "C" NOT NULL,
    sources TEXT COLLATE "C" NOT NULL,
    ports TEXT COLLATE "C" NOT NULL,
    description TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY(vm_key, name),
    UNIQUE(vm_key, priority)
);
CREATE TABLE enroll_tokens(
    id TEXT COLLATE "C" PRIMARY KEY,
    secret_hash TEXT COLLATE "C" NOT NULL,
    scope TEXT COLLATE "C" NOT NULL,
    expires_ns BIGINT NOT NULL,
    uses_left BIGINT NOT NULL,
    description TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL,
    revoked_ns BIGINT
);
CREATE TABLE agent_status(
    vm_key TEXT COLLATE "C" PRIMARY KEY,
    vm_id TEXT COLLATE "C" NOT NULL,
    report TEXT COLLATE "C" NOT NULL,
    last_seen_ns BIGINT NOT NULL
);


CREATE TABLE exclusions(
    id TEXT COLLATE "C" PRIMARY KEY,
    scope TEXT COLLATE "C" NOT NULL,
    reason TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL
);
CREATE TABLE blocked_attempts(
    rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_key TEXT COLLATE "C" NOT NULL,
    vm_id TEXT COLLATE "C" NOT NULL,
    port BIGINT NOT NULL,
    protocol TEXT COLLATE "C" NOT NULL,
    at_ns BIGINT NOT NULL,
    count BIGINT NOT NULL
);
CREATE INDEX blocked_attempts_vm ON blocked_attempts(vm_key, at_ns);
CREATE INDEX blocked_attempts_at ON blocked_attempts(at_ns);


ALTER TABLE enroll_tokens ADD COLUMN allow_replace BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tokens_secret_hash ON tokens(secret_hash);


ALTER TABLE vms ADD COLUMN name_key TEXT COLLATE "C" NOT NULL DEFAULT '';
CREATE INDEX vms_name ON vms(subscription, name_key, key);
CREATE INDEX vms_rg_page ON vms(subscription, rg_key, key);


CREATE INDEX vms_page ON vms(subscription, key);


CREATE INDEX requests_page ON requests(start_ns, id);
CREATE INDEX requests_order ON requests(policy_uid, start_ns, rowid);
CREATE INDEX tokens_page ON tokens(created_ns, id);
CREATE INDEX role_assignments_page ON role_assignments(created_ns, id);
CREATE INDEX enroll_tokens_page ON enroll_tokens(created_ns, id);
CREATE INDEX exclusions_page ON exclusions(created_ns, id);


CREATE TABLE vm_verdicts(
    vm_key TEXT COLLATE "C" PRIMARY KEY,
    subscription TEXT COLLATE "C" NOT NULL,
    rg_key TEXT COLLATE "C" NOT NULL,
    verdict TEXT COLLATE "C" NOT NULL,
    reason TEXT COLLATE "C" NOT NULL,
    exposed TEXT COLLATE "C" NOT NULL,
    listening TEXT COLLATE "C" NOT NULL,
    last_seen_ns BIGINT,
    excluded TEXT COLLATE "C"
);
CREATE INDEX vm_verdicts_counts ON vm_verdicts(subscription, rg_key, verdict, last_seen_ns, excluded);
CREATE INDEX vm_verdicts_page ON vm_verdicts(subscription, vm_key);
CREATE INDEX vm_verdicts_rg_page ON vm_verdicts(subscription, rg_key, vm_key);
ALTER TABLE agent_status ADD COLUMN facts TEXT COLLATE "C";
"#,
    // Initiates retried with the same key (a lost answer, a failover) are not doubled.
    r#"
CREATE TABLE idempotency(
    requestor TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    request_id TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL,
    PRIMARY KEY(requestor, key)
);
CREATE INDEX idempotency_age ON idempotency(created_ns);
"#,
    r#"
ALTER TABLE tokens ADD COLUMN identity TEXT COLLATE "C";
CREATE TABLE signins(
    id TEXT COLLATE "C" PRIMARY KEY,
    user_code TEXT COLLATE "C" UNIQUE,
    challenge TEXT COLLATE "C",
    source TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    principal TEXT COLLATE "C",
    identity TEXT COLLATE "C",
    created_ns BIGINT NOT NULL,
    expires_ns BIGINT NOT NULL,
    polled_ns BIGINT
);
CREATE INDEX signins_expiry ON signins(expires_ns);
"#,
    r#"
ALTER TABLE tokens ADD COLUMN last_used_ns BIGINT;
"#,
    // Approvals: the rules, a request's snapshot of the rule it waits under (its wait is
    // open while open_until_ns is set), and the decisions.
    r#"
CREATE TABLE approval_rules(
    name TEXT COLLATE "C" PRIMARY KEY,
    scope TEXT COLLATE "C" NOT NULL,
    ports TEXT COLLATE "C" NOT NULL,
    approvers TEXT COLLATE "C" NOT NULL,
    min_approvals BIGINT NOT NULL,
    deny_threshold BIGINT NOT NULL,
    require_justification BIGINT NOT NULL,
    justification_pattern TEXT COLLATE "C",
    pending_timeout_s BIGINT NOT NULL,
    created_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL
);
ALTER TABLE requests ADD COLUMN approval_rule TEXT COLLATE "C";
ALTER TABLE requests ADD COLUMN min_approvals BIGINT;
ALTER TABLE requests ADD COLUMN deny_threshold BIGINT;
ALTER TABLE requests ADD COLUMN approvers TEXT COLLATE "C";
ALTER TABLE requests ADD COLUMN pending_until_ns BIGINT;
ALTER TABLE requests ADD COLUMN open_until_ns BIGINT;
CREATE INDEX requests_open ON requests(open_until_ns) WHERE open_until_ns IS NOT NULL;
CREATE TABLE approval_votes(
    request_id TEXT COLLATE "C" NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    principal TEXT COLLATE "C" NOT NULL,
    approve BIGINT NOT NULL,
    reason TEXT COLLATE "C",
    at_ns BIGINT NOT NULL,
    PRIMARY KEY(request_id, principal)
);
"#,
    // Break-glass requests, and their review.
    r#"
ALTER TABLE requests ADD COLUMN break_glass BIGINT;
ALTER TABLE requests ADD COLUMN reviewed_by TEXT COLLATE "C";
ALTER TABLE requests ADD COLUMN reviewed_ns BIGINT;
"#,
    // Webhooks: the endpoints and the durable outbox of their messages.
    r#"
CREATE TABLE webhooks(
    name TEXT COLLATE "C" PRIMARY KEY,
    url TEXT COLLATE "C" NOT NULL,
    events TEXT COLLATE "C" NOT NULL,
    format TEXT COLLATE "C" NOT NULL,
    secret TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL,
    disabled_ns BIGINT,
    disabled_reason TEXT COLLATE "C"
);
CREATE TABLE webhook_outbox(
    msg_id TEXT COLLATE "C" PRIMARY KEY,
    webhook TEXT COLLATE "C" NOT NULL,
    event TEXT COLLATE "C" NOT NULL,
    payload TEXT COLLATE "C" NOT NULL,
    created_ns BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    next_ns BIGINT NOT NULL,
    claimed_until_ns BIGINT,
    done_ns BIGINT,
    outcome TEXT COLLATE "C",
    last_error TEXT COLLATE "C"
);
CREATE INDEX webhook_outbox_due ON webhook_outbox(next_ns) WHERE done_ns IS NULL;
CREATE INDEX webhook_outbox_of ON webhook_outbox(webhook);
"#,
    // When an agent was found offline (its report older than the threshold), once.
    r#"
ALTER TABLE agent_status ADD COLUMN offline_ns BIGINT;
"#,
    // Whether a policy protects the VM, kept with its verdict (the dashboard's tabs are
    // then one aggregate over this table); filled when the store opens.
    r#"
ALTER TABLE vm_verdicts ADD COLUMN protected BIGINT NOT NULL DEFAULT 0;
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
ALTER TABLE request_ports ADD COLUMN changed BIGINT NOT NULL DEFAULT 0;
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
    masquerade BIGINT NOT NULL,
    public_address TEXT,
    UNIQUE(gateway_key, address)
);
CREATE TABLE mapped_ports(
    vm_key TEXT NOT NULL,
    number BIGINT NOT NULL,
    public_address TEXT NOT NULL,
    mapped BIGINT NOT NULL,
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
    expires_ns BIGINT NOT NULL,
    uses_left BIGINT NOT NULL
);
"#,
];

/// Any number below 2^63 that no other program takes as its advisory lock key: the
/// migration lock (transaction-scoped, so it also works behind a pooling proxy).
const MIGRATION_LOCK: i64 = 0x006a_6974_6761_7465;

/// Where and how to connect: the settings parsed from the URL and the TLS connector
/// (rustls with jitgate's own crypto provider).
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: Config,
    tls: MakeRustlsConnect,
}

/// The connection settings of `url` (`postgres://user@host:port/db?...` or
/// `host=... port=... dbname=...`), with a connect timeout and keepalives unless the
/// URL sets its own.
///
/// TLS: jitgate always verifies the server's certificate chain and host name (what
/// libpq calls `verify-full`), against the system's roots or the CA file named by
/// `sslrootcert`. `sslmode` takes libpq's values: `disable`, `prefer`, `require`,
/// `verify-ca` and `verify-full` (the last three all mean a verified TLS connection or
/// none). Without `sslmode`, a database on another machine is reached over TLS only
/// (`require`); one on the loopback interface or a Unix socket without TLS.
pub(crate) fn target(url: &str) -> Result<Target> {
    let (config, tls) = settings(url)?;
    let roots = roots(tls.root_cert.as_deref())?;
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Db(format!("TLS to PostgreSQL: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Target {
        config,
        tls: MakeRustlsConnect::new(client),
    })
}

/// The connection settings of `url` with the TLS mode decided, and the TLS options
/// (the CA file is read only by [`target`]).
pub(crate) fn settings(url: &str) -> Result<(Config, TlsOptions)> {
    let (rest, tls) = split_tls_options(url)?;
    let mut config = Config::from_str(&rest)
        .map_err(|e| StoreError::Db(format!("the database URL is not valid: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name("jitgate");
    }
    config.keepalives(true);
    config.ssl_mode(match tls.mode {
        Some(mode) => mode,
        None if config.get_hosts().iter().all(is_local) => SslMode::Disable,
        None => SslMode::Require,
    });
    Ok((config, tls))
}

/// Whether a host is this machine: a Unix socket directory, `localhost` or a loopback
/// address.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// What the URL says about TLS beyond what tokio-postgres reads itself.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct TlsOptions {
    /// `sslmode`, if given.
    mode: Option<SslMode>,
    /// `sslrootcert`: the CA certificates (PEM) to trust instead of the system's.
    root_cert: Option<PathBuf>,
}

/// Takes `sslmode` and `sslrootcert` out of `url` (either form), returning the rest.
fn split_tls_options(url: &str) -> Result<(String, TlsOptions)> {
    let mut tls = TlsOptions::default();
    let mut take = |key: &str, value: &str| -> Result<bool> {
        match key {
            "sslmode" => {
                tls.mode = Some(match value {
                    "disable" => SslMode::Disable,
                    "prefer" | "allow" => SslMode::Prefer,
                    "require" | "verify-ca" | "verify-full" => SslMode::Require,
                    other => {
                        return Err(StoreError::Db(format!(
                            "the database URL is not valid: sslmode '{other}' is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        )));
                    }
                });
                Ok(true)
            }
            "sslrootcert" => {
                tls.root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    if let Some(after) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        let scheme = &url[..url.len() - after.len()];
        let Some((base, query)) = after.split_once('?') else {
            return Ok((url.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode_str(v).decode_utf8().map_err(|_| {
                StoreError::Db(format!(
                    "the database URL is not valid: the value of '{k}' is not UTF-8"
                ))
            })?;
            if !take(k, &value)? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            format!("{scheme}{base}")
        } else {
            format!("{scheme}{base}?{}", kept.join("&"))
        };
        return Ok((rest, tls));
    }
    // key=value form: the TLS keys are taken when written `key=value` without quotes.
    let mut kept = Vec::new();
    for word in url.split_whitespace() {
        match word.split_once('=') {
            Some((k, v)) if !v.starts_with('\'') && take(k, v)? => {}
            _ => kept.push(word),
        }
    }
    Ok((kept.join(" "), tls))
}

/// The certificates a server's chain must lead to.
fn roots(file: Option<&Path>) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| {
                StoreError::Db(format!(
                    "sslrootcert '{}' cannot be read: {e}",
                    path.display()
                ))
            };
            let pem = std::fs::read(path).map_err(|e| bad(&e))?;
            let mut any = false;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                any = true;
            }
            if !any {
                return Err(bad(&"it holds no PEM certificate"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system certificate rustls cannot use is skipped, as browsers do.
                let _ = roots.add(cert);
            }
        }
    }
    Ok(roots)
}

pub(crate) fn connect(target: &Target) -> Result<PgDb> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Db(format!("cannot start a runtime for PostgreSQL: {e}")))?;
    let (client, connection) = rt
        .block_on(target.config.connect(target.tls.clone()))
        .map_err(pg_err)?;
    // Driven whenever this connection's runtime runs (each call blocks on it).
    rt.spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a PostgreSQL connection ended");
        }
    });
    Ok(PgDb {
        inner: Some((rt, client)),
        statements: RefCell::new(HashMap::new()),
        pending: RefCell::new(Vec::new()),
    })
}

/// Applies the migrations the database lacks, in one transaction under a lock, so
/// that controllers starting together migrate once.
pub(crate) fn migrate(db: &dyn Db) -> Result<()> {
    db.batch("BEGIN")?;
    let r = (|| {
        db.execute("SELECT pg_advisory_xact_lock(?1)", &[&MIGRATION_LOCK])?;
        db.batch("CREATE TABLE IF NOT EXISTS schema_version(version BIGINT NOT NULL)")?;
        let version = db
            .one("SELECT version FROM schema_version", &[], |r| {
                r.get::<i64>(0)
            })?
            .unwrap_or(0);
        if version == 0 {
            db.execute("INSERT INTO schema_version(version) VALUES (0)", &[])?;
        }
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Db(format!(
                "the database's schema (version {version}) is newer than this controller's ({}); upgrade the controller",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            db.batch(sql)?;
            db.execute("UPDATE schema_version SET version = ?1", &[&(i as i64 + 1)])?;
        }
        Ok(())
    })();
    db.end(r)
}

/// A PostgreSQL error as the store reports it: the server's code and message. Lost
/// connections, a server shutting down or read-only (a standby), and serialization
/// failures are `Unavailable`: retried, they may succeed.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let transient = match e.code() {
        Some(c) => {
            let c = c.code();
            c.starts_with("08")
                || c.starts_with("57P")
                || matches!(c, "25006" | "40001" | "40P01" | "53300")
        }
        None => e.is_closed() || e.as_db_error().is_none(),
    };
    if transient {
        return StoreError::Unavailable(match e.as_db_error() {
            Some(d) => format!("PostgreSQL {}: {}", d.code().code(), d.message()),
            None => format!(
                "PostgreSQL: {e}{}",
                e.source().map(|s| format!(": {s}")).unwrap_or_default()
            ),
        });
    }
    match e.as_db_error() {
        Some(d) => StoreError::Db(format!(
            "PostgreSQL {}: {}{}",
            d.code().code(),
            d.message(),
            d.detail().map(|x| format!(" ({x})")).unwrap_or_default()
        )),
        None => StoreError::Db(format!(
            "PostgreSQL: {e}{}",
            e.source().map(|s| format!(": {s}")).unwrap_or_default()
        )),
    }
}

/// What the writer of the store `id` sends, in each transaction, to wake the other
/// controllers: the notification carries the writer's id, so that its own listener
/// ignores it (this controller already knows its own changes). `id` is hex, never text
/// from outside.
pub(crate) fn notify_sql(id: &str) -> String {
    format!("NOTIFY {CHANNEL}, '{id}'")
}

/// The notification channel of the controllers' commits.
const CHANNEL: &str = "jitgate_changes";

/// The doorbell of the other controllers' commits: a thread holds a connection that
/// listens, bumps the channel on each notification and after every reconnection (a
/// notification sent while it was away is lost, so the listener's owner must catch
/// up), and ends when the store is dropped.
pub(crate) struct Changes {
    tx: tokio::sync::watch::Sender<u64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Changes {
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Starts listening (the first connection is made before returning, so a bad
/// database fails the start, not a thread later).
pub(crate) fn listen(target: Target, own: String) -> Result<Changes> {
    let tls = target.tls;
    let config = postgres::Config::from(target.config);
    use std::sync::atomic::Ordering;
    let (tx, _) = tokio::sync::watch::channel(0u64);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connect = move || {
        let mut c = config.connect(tls.clone())?;
        c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        Ok::<_, postgres::Error>(c)
    };
    let client = connect().map_err(pg_err)?;
    let bell = tx.clone();
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("jitgate-pg-listen".into())
        .spawn(move || {
            use postgres::fallible_iterator::FallibleIterator;
            let mut client = Some(client);
            while !stopped.load(Ordering::Acquire) {
                let Some(c) = client.as_mut() else {
                    std::thread::sleep(Duration::from_secs(1));
                    match connect() {
                        Ok(c) => {
                            client = Some(c);
                            // Whatever was sent meanwhile was lost: catch up.
                            bell.send_modify(|n| *n += 1);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot listen for other controllers' changes; retrying"),
                    }
                    continue;
                };
                let mut got = false;
                let mut lost = false;
                {
                    let mut n = c.notifications();
                    let first = n.timeout_iter(Duration::from_millis(500)).next();
                    match first {
                        Ok(Some(note)) => {
                            got |= note.payload() != own;
                            // Those that arrived with it ring the bell once.
                            let mut pending = n.iter();
                            while let Ok(Some(note)) = pending.next() {
                                got |= note.payload() != own;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "lost the connection that listens for other controllers' changes");
                            lost = true;
                        }
                    }
                }
                if got {
                    bell.send_modify(|n| *n += 1);
                }
                if lost || c.is_closed() {
                    client = None;
                }
            }
        })
        .map_err(|e| StoreError::Db(format!("cannot start the listening thread: {e}")))?;
    Ok(Changes { tx, stop })
}

/// A statement sent with the next round trip, whose result nobody reads.
enum Pending {
    /// Statements without parameters (`SAVEPOINT`).
    Batch(String),
    Statement(Statement, Vec<PgValue>),
}

/// One connection: tokio-postgres on a runtime of its own, driven from the store's
/// threads (each call blocks on it). Statements whose results nobody reads
/// ([`Db::defer`]) wait and go out pipelined with the next round trip, so a write
/// costs about one round trip per statement whose answer it needs.
pub(crate) struct PgDb {
    /// `None` only while being dropped.
    inner: Option<(tokio::runtime::Runtime, Client)>,
    statements: RefCell<HashMap<String, Statement>>,
    pending: RefCell<Vec<Pending>>,
}

impl PgDb {
    fn parts(&self) -> (&tokio::runtime::Runtime, &Client) {
        #[allow(clippy::expect_used)]
        let (rt, client) = self.inner.as_ref().expect("a live connection");
        (rt, client)
    }

    fn statement(&self, sql: &str) -> Result<Statement> {
        if let Some(st) = self.statements.borrow().get(sql) {
            return Ok(st.clone());
        }
        // Preparing is a round trip of its own: send what waits first, in order.
        self.flush()?;
        let (rt, client) = self.parts();
        let st = rt
            .block_on(client.prepare(&to_dollar_placeholders(sql)))
            .map_err(|e| match pg_err(e) {
                StoreError::Db(m) => StoreError::Db(format!("{m}, in: {}", sql.trim())),
                other => other,
            })?;
        let mut cache = self.statements.borrow_mut();
        // Statements built with variable parts (lists of placeholders) are bounded.
        if cache.len() >= 512 {
            cache.clear();
        }
        cache.insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    /// Sends what waits, in order, all at once; resolves when every answer is in.
    async fn send_pending(client: &Client, pending: Vec<Pending>) -> Result<()> {
        let all = pending.iter().map(|p| async move {
            match p {
                Pending::Statement(st, vals) => client
                    .execute_raw(st, vals.iter().map(|v| v as &dyn ToSql))
                    .await
                    .map(|_| ()),
                Pending::Batch(sql) => client.batch_execute(sql).await,
            }
        });
        futures_util::future::try_join_all(all)
            .await
            .map(|_| ())
            .map_err(pg_err)
    }

    /// Runs what `call` sends in the same round trip as what waits (sent first); an
    /// error of what waited comes first.
    fn after_pending<'a, T, F>(&'a self, call: impl FnOnce(&'a Client) -> F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let pending = self.pending.take();
        let (rt, client) = self.parts();
        rt.block_on(async {
            let (before, this) = tokio::join!(Self::send_pending(client, pending), call(client));
            before?;
            this
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // A runtime must not be dropped on an async thread: a store dropped there
        // closes its connections elsewhere.
        self.statements.get_mut().clear();
        self.pending.get_mut().clear();
        if let Some(inner) = self.inner.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            std::thread::spawn(move || drop(inner));
        }
    }
}

/// An owned parameter (of a deferred statement), bound like [`PgParam`].
#[derive(Debug)]
struct PgValue(Value);

impl ToSql for PgValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn Error + Sync + Send>> {
        PgParam(self.0.param()).to_sql(ty, out)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A parameter bound to whatever type PostgreSQL inferred for its placeholder.
#[derive(Debug)]
struct PgParam<'a>(Param<'a>);

impl ToSql for PgParam<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self.0 {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().as_str().to_sql(ty, out),
                _ => Err(format!("an integer cannot be bound to a {ty} parameter").into()),
            },
            Param::Text(s) => match *ty {
                Type::INT8 => s.parse::<i64>()?.to_sql(ty, out),
                _ => s.to_sql(ty, out),
            },
            Param::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn value(row: &tokio_postgres::Row, i: usize) -> Result<Value> {
    let ty = row.columns()[i].type_();
    let get_err = |e: tokio_postgres::Error| StoreError::Corrupt(format!("column {i}: {e}"));
    Ok(match *ty {
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(get_err)?
            .map_or(Value::Null, Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(get_err)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(get_err)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)
            .map_err(get_err)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)
            .map_err(get_err)?
            .map_or(Value::Null, Value::Blob),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => row
            .try_get::<_, Option<String>>(i)
            .map_err(get_err)?
            .map_or(Value::Null, Value::Text),
        _ => {
            return Err(StoreError::Db(format!(
                "column {i} has the type {ty}, which the store does not read"
            )));
        }
    })
}

impl Db for PgDb {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&self, sql: &str, params: &[&dyn ToParam]) -> Result<u64> {
        let st = self.statement(sql)?;
        let bound: Vec<PgParam<'_>> = params.iter().map(|p| PgParam(p.param())).collect();
        self.after_pending(|client| async move {
            client
                .execute_raw(&st, bound.iter().map(|p| p as &dyn ToSql))
                .await
                .map_err(pg_err)
        })
    }

    fn each(
        &self,
        sql: &str,
        params: &[&dyn ToParam],
        each: &mut dyn FnMut(&mut Row) -> Result<()>,
    ) -> Result<()> {
        let st = self.statement(sql)?;
        let bound: Vec<PgParam<'_>> = params.iter().map(|p| PgParam(p.param())).collect();
        self.after_pending(|client| async move {
            let rows = client
                .query_raw(&st, bound.iter().map(|p| p as &dyn ToSql))
                .await
                .map_err(pg_err)?;
            futures_util::pin_mut!(rows);
            while let Some(r) = rows.try_next().await.map_err(pg_err)? {
                let cols = (0..r.len())
                    .map(|i| value(&r, i))
                    .collect::<Result<Vec<_>>>()?;
                each(&mut Row::new(cols))?;
            }
            Ok(())
        })
    }

    fn batch(&self, sql: &str) -> Result<()> {
        self.after_pending(|client| async move { client.batch_execute(sql).await.map_err(pg_err) })
    }

    fn defer(&self, sql: &str, params: &[&dyn ToParam]) -> Result<()> {
        let st = self.statement(sql)?;
        let vals = params
            .iter()
            .map(|p| PgValue(Value::from(p.param())))
            .collect();
        self.pending.borrow_mut().push(Pending::Statement(st, vals));
        Ok(())
    }

    fn defer_batch(&self, sql: &str) -> Result<()> {
        self.pending
            .borrow_mut()
            .push(Pending::Batch(sql.to_owned()));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let pending = self.pending.take();
        if pending.is_empty() {
            return Ok(());
        }
        let (rt, client) = self.parts();
        rt.block_on(Self::send_pending(client, pending))
    }

    fn healthy(&self) -> bool {
        self.inner.as_ref().is_some_and(|(_, c)| !c.is_closed())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn split(url: &str) -> (String, TlsOptions) {
        split_tls_options(url).unwrap()
    }

    #[test]
    fn tls_options_are_taken_from_either_form() {
        let (rest, tls) = split(
            "postgres://u@db1:5432,db2:5432/jg?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=%2Fetc%2Fjitgate%2Fpg%20ca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u@db1:5432,db2:5432/jg?target_session_attrs=read-write"
        );
        assert_eq!(tls.mode, Some(SslMode::Require));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/jitgate/pg ca.pem")));
        let (rest, tls) = split("postgresql://u@db/jg?sslmode=disable");
        assert_eq!(rest, "postgresql://u@db/jg");
        assert_eq!(tls.mode, Some(SslMode::Disable));
        let (rest, tls) = split("host=db user=u sslrootcert=/ca.pem sslmode=verify-ca dbname=jg");
        assert_eq!(rest, "host=db user=u dbname=jg");
        assert_eq!(tls.mode, Some(SslMode::Require));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(split("postgres://u@db/jg").1, TlsOptions::default());
        let e = split_tls_options("postgres://db/jg?sslmode=sometimes").unwrap_err();
        assert!(e.to_string().contains("sslmode 'sometimes'"), "{e}");
    }

    #[test]
    fn a_remote_database_needs_tls_unless_the_url_says_otherwise() {
        let mode = |url: &str| settings(url).unwrap().0.get_ssl_mode();
        assert_eq!(mode("postgres://u@db.example.net/jg"), SslMode::Require);
        assert_eq!(
            mode("postgres://u@localhost,db.example.net/jg"),
            SslMode::Require
        );
        assert_eq!(mode("host=10.0.0.5 user=u"), SslMode::Require);
        assert_eq!(mode("postgres://u@localhost/jg"), SslMode::Disable);
        assert_eq!(mode("host=127.0.0.1 user=u"), SslMode::Disable);
        assert_eq!(mode("postgres://u@[::1]:5432/jg"), SslMode::Disable);
        assert_eq!(mode("host=/var/run/postgresql user=u"), SslMode::Disable);
        assert_eq!(
            mode("postgres://u@db.example.net/jg?sslmode=disable"),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://u@localhost/jg?sslmode=require"),
            SslMode::Require
        );
    }
}
