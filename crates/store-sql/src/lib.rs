//! `jitgate-store-sql`: the embedded SQLite backend of `jitgate_store::Store`, the
//! default. It passes the conformance suite of `jitgate-store` (its tests run it) and
//! adds what only a file-backed store has (`verify_file`, opening options).
//!
//! One writer thread owns the only write connection and commits in groups: it takes
//! every write queued while the previous commit was in flight, runs each in its own
//! savepoint inside one `BEGIN IMMEDIATE` transaction, commits once (one fsync, WAL,
//! `synchronous=FULL`), and only then answers each caller. A caller's `Ok` therefore
//! means committed and durable, and throughput does not pay one fsync per request.
//! Reads use a small pool of separate connections (WAL lets them run beside the
//! writer).

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use jitgate_core::FieldError;
use jitgate_core::audit::{self, AuditEntry, AuditRecord, Outcome, VerifyReport};
use jitgate_core::duration::MaxDuration;
use jitgate_core::ids::{Location, PolicyName, ResourceGroup, Scope, SubscriptionId, VmId};
use jitgate_core::net::{Port, Protocol, SourcePrefix};
use jitgate_core::nsg::{Access, NsgRule, RuleOrigin, parse_port_range};
use jitgate_core::policy::{
    AllowedSources, Policy, PolicyKey, PolicySpec, PolicyVm, PortRule, removed_ports, still_allows,
};
use jitgate_core::rbac::{self, Action, Role, RoleAssignment};
use jitgate_core::recommend::{
    AgentFacts, Listening, RecommendConfig, Recommendation, Verdict, VmFacts, classify_reported,
    offline_cutoff, settle,
};
use jitgate_core::request::{
    AccessRequest, InitiateContext, InitiateError, LiveGrant, PortStatus, RequestId, RequestPort,
    RequestVm, RevokeReason, plan_initiate, superseded_by,
};

use jitgate_store::*;

use crate::db::{Db, Dialect, Row, ToParam};

mod approvals;
pub mod db;
mod gateways;
mod pg;
mod sqlite;
#[cfg(feature = "testpg")]
pub mod testpg;
pub mod webhooks;

pub use sqlite::verify_file;

/// Whether `url` is a PostgreSQL connection string (without connecting). The error
/// does not repeat the URL (it may hold a password).
pub fn check_postgres_url(url: &str) -> Result<()> {
    pg::settings(url).map(|_| ())
}

/// Read connections kept open (and concurrent reads allowed).
const READERS: usize = 8;

/// The most writes committed together.
const MAX_GROUP: usize = 512;

/// Rows deleted per write by a prune.
const PRUNE_CHUNK: usize = 10_000;

/// Writes that may wait for the writer by default, besides the group it is committing.
pub const DEFAULT_WRITE_QUEUE: usize = 4096;

/// One page of a table ordered by (created_ns, id), with the parameters of
/// [`page_bounds`] (the cast gives `?1` its type where PostgreSQL first meets it).
const PAGE_BY_CREATED: &str =
    "WHERE CAST(?1 AS BIGINT) IS NULL OR created_ns > ?1 OR (created_ns = ?1 AND id > ?2)
     ORDER BY created_ns, id LIMIT ?3";

/// The bounds of a page ordered by (created_ns, id) ascending: `(after ns, after id,
/// limit)`, the parameters of [`PAGE_BY_CREATED`] (and of pages filtered further).
fn page_bounds(paging: &Paging) -> (Option<i64>, Option<String>, i64) {
    let limit = if paging.limit == 0 { 100 } else { paging.limit };
    (
        paging.after.as_ref().map(|c| ns(c.at)),
        paging.after.as_ref().map(|c| c.id.clone()),
        limit.min(i64::MAX as usize) as i64,
    )
}

/// Nanoseconds since the epoch, saturating: i64 ends in 2262, and a later time (a
/// token valid for 300 years, `since=2999-01-01`) must stay "far future" rather than
/// wrap into the past.
fn ns(t: Timestamp) -> i64 {
    t.as_nanosecond()
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn from_ns(n: i64) -> Result<Timestamp> {
    Timestamp::from_nanosecond(n as i128)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {n}: {e}")))
}

fn corrupt<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Corrupt(format!("{what}: {e}"))
}

// ---- policy encoding (storage-private) --------------------------------------------

#[derive(Serialize, Deserialize)]
struct StoredVm {
    id: String,
    ports: Vec<StoredPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_ip: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredPort {
    number: u16,
    protocol: String,
    /// `one` or `many`: which Azure field the caller used.
    form: String,
    prefixes: Vec<String>,
    max: String,
}

fn encode_vms(spec: &PolicySpec) -> Result<String> {
    let vms: Vec<StoredVm> = spec
        .vms
        .iter()
        .map(|v| StoredVm {
            id: v.id.to_string(),
            public_ip: v.public_ip_address.clone(),
            ports: v
                .ports
                .iter()
                .map(|p| StoredPort {
                    number: p.number.get(),
                    protocol: p.protocol.as_str().to_owned(),
                    form: match p.allowed {
                        AllowedSources::Single(_) => "one".into(),
                        AllowedSources::Many(_) => "many".into(),
                    },
                    prefixes: p.allowed.prefixes().iter().map(|x| x.to_string()).collect(),
                    max: p.max_duration.as_str().to_owned(),
                })
                .collect(),
        })
        .collect();
    serde_json::to_string(&vms).map_err(|e| StoreError::Db(e.to_string()))
}

fn decode_vms(json: &str) -> Result<Vec<PolicyVm>> {
    let vms: Vec<StoredVm> = serde_json::from_str(json).map_err(corrupt("policy json"))?;
    vms.into_iter()
        .map(|v| {
            let ports = v
                .ports
                .into_iter()
                .map(|p| {
                    let prefixes = p
                        .prefixes
                        .iter()
                        .map(|s| SourcePrefix::parse(s))
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(corrupt("prefix"))?;
                    let allowed = if p.form == "one" && prefixes.len() == 1 {
                        AllowedSources::Single(prefixes[0])
                    } else {
                        AllowedSources::Many(prefixes)
                    };
                    Ok(PortRule {
                        number: Port::new(p.number as i64).map_err(corrupt("port"))?,
                        protocol: Protocol::parse(&p.protocol).map_err(corrupt("protocol"))?,
                        allowed,
                        max_duration: MaxDuration::parse(&p.max).map_err(corrupt("duration"))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(PolicyVm {
                id: VmId::parse(&v.id).map_err(corrupt("vm id"))?,
                ports,
                public_ip_address: v.public_ip,
            })
        })
        .collect()
}

const POLICY_COLS: &str = "subscription, rg, location, name, kind, vms_json";

fn policy_from_row(r: &mut Row) -> Result<(String, String, String, String, String, String)> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn build_policy(row: (String, String, String, String, String, String)) -> Result<Policy> {
    let (sub, rg, loc, name, kind, vms) = row;
    Ok(Policy {
        key: PolicyKey {
            subscription: SubscriptionId::parse(&sub).map_err(corrupt("subscription"))?,
            resource_group: ResourceGroup::parse(&rg).map_err(corrupt("resource group"))?,
            location: Location::parse(&loc).map_err(corrupt("location"))?,
            name: PolicyName::parse(&name).map_err(corrupt("policy name"))?,
        },
        spec: PolicySpec {
            kind,
            vms: decode_vms(&vms)?,
        },
    })
}

fn load_policy(conn: &dyn Db, key: &str) -> Result<Option<(String, Policy)>> {
    let row = conn.one(
        &format!("SELECT uid, {POLICY_COLS} FROM policies WHERE key = ?1"),
        &[&key],
        |r| {
            Ok((
                r.get::<String>(0)?,
                (
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ),
            ))
        },
    )?;
    match row {
        None => Ok(None),
        Some((uid, row)) => Ok(Some((uid, build_policy(row)?))),
    }
}

// ---- requests ----------------------------------------------------------------------

fn status_cols(s: PortStatus) -> (&'static str, Option<&'static str>) {
    match s {
        PortStatus::Pending => ("Pending", None),
        PortStatus::Initiated => ("Initiated", None),
        PortStatus::Revoked(r) => ("Revoked", Some(r.as_str())),
        PortStatus::Denied => ("Denied", None),
    }
}

fn parse_status(status: &str, reason: Option<String>) -> Result<PortStatus> {
    match status {
        "Initiated" => Ok(PortStatus::Initiated),
        "Pending" => Ok(PortStatus::Pending),
        "Denied" => Ok(PortStatus::Denied),
        "Revoked" => reason
            .as_deref()
            .and_then(RevokeReason::parse)
            .map(PortStatus::Revoked)
            .ok_or_else(|| StoreError::Corrupt(format!("revoke reason {reason:?}"))),
        other => Err(StoreError::Corrupt(format!("port status {other}"))),
    }
}

/// Loads whole requests by id, preserving the order of `ids`.
fn load_requests(conn: &dyn Db, ids: &[String]) -> Result<Vec<AccessRequest>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        // The request's row once, its approval's snapshot with it (the decisions are
        // read only for a request that has one).
        let Some((policy_key, requestor, justification, start_ns, caller_ip, break_glass, snapshot)) = conn.one(
            "SELECT policy_key, requestor, justification, start_ns, caller_ip, break_glass, reviewed_by, reviewed_ns,
                    approval_rule, min_approvals, deny_threshold, approvers, pending_until_ns
             FROM requests WHERE id = ?1",
            &[id],
            |r| {
                let break_glass = match r.get::<Option<i64>>(5)? {
                    Some(1) => Some(jitgate_core::approval::BreakGlass {
                        reviewed_by: r.get(6)?,
                        reviewed_at: r.get::<Option<i64>>(7)?.map(from_ns).transpose()?,
                    }),
                    _ => None,
                };
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<Option<String>>(2)?,
                    r.get::<i64>(3)?,
                    r.get::<String>(4)?,
                    break_glass,
                    approvals::snapshot_at(r, 8)?,
                ))
            },
        )?
        else {
            continue;
        };
        let mut vms: Vec<(i64, RequestVm)> = Vec::new();
        let rows = conn.all(
            "SELECT vm_idx, vm_id, number, protocol, source, end_ns, status, reason
             FROM request_ports WHERE request_id = ?1 ORDER BY vm_idx, port_idx",
            &[id],
            |r| {
                Ok((
                    r.get::<i64>(0)?,
                    r.get::<String>(1)?,
                    r.get::<i64>(2)?,
                    r.get::<String>(3)?,
                    r.get::<String>(4)?,
                    r.get::<i64>(5)?,
                    r.get::<String>(6)?,
                    r.get::<Option<String>>(7)?,
                ))
            },
        )?;
        for row in rows {
            let (vm_idx, vm_id, number, protocol, source, end_ns, status, reason) = row;
            let port = RequestPort {
                number: Port::new(number).map_err(corrupt("port"))?,
                protocol: Protocol::parse(&protocol).map_err(corrupt("protocol"))?,
                source: SourcePrefix::parse(&source).map_err(corrupt("source"))?,
                end: from_ns(end_ns)?,
                status: parse_status(&status, reason)?,
            };
            match vms.last_mut() {
                Some((idx, vm)) if *idx == vm_idx => vm.ports.push(port),
                _ => vms.push((
                    vm_idx,
                    RequestVm {
                        id: VmId::parse(&vm_id).map_err(corrupt("vm id"))?,
                        ports: vec![port],
                    },
                )),
            }
        }
        out.push(AccessRequest {
            id: RequestId::parse(id).map_err(corrupt("request id"))?,
            policy_key,
            requestor,
            justification,
            start: from_ns(start_ns)?,
            caller_ip: caller_ip.parse::<IpAddr>().map_err(corrupt("caller ip"))?,
            vms: vms.into_iter().map(|(_, v)| v).collect(),
            approval: match snapshot {
                Some(snapshot) => Some(jitgate_core::approval::Approval {
                    snapshot,
                    votes: approvals::votes(conn, id)?,
                }),
                None => None,
            },
            break_glass,
        });
    }
    Ok(out)
}

fn ids_of(conn: &dyn Db, sql: &str, params: &[&dyn ToParam]) -> Result<Vec<String>> {
    conn.all(sql, params, |r| r.get::<String>(0))
}

// ---- the writer --------------------------------------------------------------------

/// The audit chain's tail, owned by the writer.
#[derive(Clone)]
struct ChainTail {
    seq: u64,
    hash: String,
}

/// Decoded policies, by key, with the `uid` and `rev` they were decoded at. Decoding a
/// policy's JSON is the writer's largest cost on the initiate path; an entry is used
/// only while the row still has the same uid and rev. Readers only ever see committed
/// rows; the writer also sees its open transaction, whose rev may be rolled back and
/// then reused by a later write with other content, so the writer's cache forgets
/// what it read inside a rolled-back job or a failed commit (`WriterPolicies`).
///
/// Bounded by the VMs its policies hold (`POLICY_CACHE_VMS`), not by their number: a
/// decoded policy's size grows with its VMs, so a bound in policies let the cache (one
/// for the writer, one for the readers) grow with the installation, about 50 MiB each
/// at 100,000 VMs. Past the bound, entries are evicted in no particular order; a policy
/// evicted costs one decode when it is needed again.
#[derive(Default)]
struct PolicyCache {
    map: std::collections::HashMap<String, (String, i64, Arc<Policy>)>,
    /// The VMs of the cached policies (a policy without VMs counts one).
    vms: usize,
}

/// The most VM entries the decoded policies of one cache hold (about 10 MiB).
const POLICY_CACHE_VMS: usize = 20_000;

fn policy_weight(p: &Policy) -> usize {
    p.spec.vms.len().max(1)
}

impl PolicyCache {
    fn get(&self, key: &str) -> Option<&(String, i64, Arc<Policy>)> {
        self.map.get(key)
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, _, p)) = self.map.remove(key) {
            self.vms -= policy_weight(&p);
        }
    }

    fn insert(&mut self, key: String, uid: String, rev: i64, policy: Arc<Policy>) {
        self.remove(&key);
        let weight = policy_weight(&policy);
        while self.vms + weight > POLICY_CACHE_VMS {
            let Some(victim) = self.map.keys().next().cloned() else {
                break;
            };
            self.remove(&victim);
        }
        self.vms += weight;
        self.map.insert(key, (uid, rev, policy));
    }
}

/// The writer's policy cache and the keys it was asked for since the last commit.
/// Like the audit chain's tail, what was learnt from uncommitted rows is undone when
/// they are: a job rolled back to its savepoint forgets the keys it looked up, a failed
/// commit forgets every key looked up in the group.
#[derive(Default)]
struct WriterPolicies {
    cache: PolicyCache,
    /// Keys looked up in the open transaction, in order (a hit is listed too: evicting
    /// it costs one decode, and keeps the rule simple).
    looked_up: Vec<String>,
    /// The webhook endpoints (which audit events become outbox rows).
    hooks: webhooks::HookCache,
}

impl WriterPolicies {
    /// Forgets the entries looked up after the `mark`-th lookup of the open transaction.
    fn forget_since(&mut self, mark: usize) {
        for key in self.looked_up.drain(mark..) {
            self.cache.remove(&key);
        }
    }

    /// The transaction committed: what it read is now true.
    fn committed(&mut self) {
        self.looked_up.clear();
    }
}

/// What a write job sees: the open transaction and the audit chain.
pub struct WriteCtx<'a> {
    tx: &'a dyn Db,
    tail: &'a mut ChainTail,
    policies: &'a mut WriterPolicies,
    /// What verdicts are computed with (`refresh_verdicts`).
    recommend: &'a RecommendConfig,
}

impl WriteCtx<'_> {
    /// The mark of a grant row changed now (`request_ports.changed`): past every
    /// audit sequence number committed, because every write of a grant row is audited
    /// in its transaction (so two transactions never share a mark).
    fn change_point(&self) -> i64 {
        (self.tail.seq + 1) as i64
    }

    /// `load_policy` through the writer's cache.
    fn policy(&mut self, key: &str) -> Result<Option<(String, Arc<Policy>)>> {
        self.policies.looked_up.push(key.to_owned());
        cached_policy(self.tx, key, &mut self.policies.cache)
    }

    fn audit(
        &mut self,
        ctx: &AuditCtx,
        action: &str,
        target: &str,
        details: serde_json::Value,
    ) -> Result<u64> {
        self.append(AuditEntry {
            time: ctx.now.to_string(),
            actor: ctx.actor.clone(),
            source: ctx.source.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: Outcome::Success,
            details: details.to_string(),
        })
    }

    fn append(&mut self, entry: AuditEntry) -> Result<u64> {
        let time_ns = entry
            .time
            .parse::<Timestamp>()
            .map(ns)
            .map_err(|e| StoreError::Db(format!("audit time '{}': {e}", entry.time)))?;
        let rec = audit::link(self.tail.seq, &self.tail.hash, entry);
        self.tx
            .defer(
                "INSERT INTO audit(seq, time, time_ns, actor, source, action, target, outcome, details, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            &[&(rec.seq as i64), &rec.entry.time, &time_ns, &rec.entry.actor, &rec.entry.source, &rec.entry.action, &rec.entry.target, &rec.entry.outcome.as_str(), &rec.entry.details, &rec.prev_hash, &rec.hash])?;
        // The recorded head (`meta.audit_head`) is written once per group, with the
        // commit (`writer_loop`).
        self.tail.seq = rec.seq;
        self.tail.hash = rec.hash.clone();
        webhooks::enqueue(self, &rec)?;
        Ok(rec.seq)
    }
}

/// `load_policy` through a cache of decoded policies (`get` and `put` access it), used
/// only while the row still has the uid and rev the entry was decoded at.
fn cached_policy(
    conn: &dyn Db,
    key: &str,
    cache: &mut PolicyCache,
) -> Result<Option<(String, Arc<Policy>)>> {
    let row: Option<(String, i64)> = conn.one(
        "SELECT uid, rev FROM policies WHERE key = ?1",
        &[&key],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Some((uid, rev)) = row else {
        return Ok(None);
    };
    if let Some((c_uid, c_rev, p)) = cache.get(key)
        && *c_uid == uid
        && *c_rev == rev
    {
        return Ok(Some((uid, p.clone())));
    }
    let Some((uid, policy)) = load_policy(conn, key)? else {
        return Ok(None);
    };
    let policy = Arc::new(policy);
    cache.insert(key.to_owned(), uid.clone(), rev, policy.clone());
    Ok(Some((uid, policy)))
}

type Finish = Box<dyn FnOnce(Result<()>) + Send>;
type Job = Box<dyn FnOnce(&mut WriteCtx<'_>) -> (bool, Finish) + Send>;

fn load_tail(conn: &dyn Db) -> Result<ChainTail> {
    let row = conn.one(
        "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
        &[],
        |r| Ok((r.get::<i64>(0)?, r.get::<String>(1)?)),
    )?;
    Ok(match row {
        Some((seq, hash)) => ChainTail {
            seq: seq as u64,
            hash,
        },
        None => ChainTail {
            seq: 0,
            hash: audit::GENESIS_HASH.to_owned(),
        },
    })
}

/// Begins a write transaction holding the store's write lock: every writer of the
/// database (one per controller) waits here for the others, so each group sees every
/// earlier commit and extends one audit chain. SQLite takes its database lock;
/// PostgreSQL locks the one row of `write_lock` (a row lock, not an advisory lock, so
/// it also works behind a transaction-pooling proxy).
fn begin_write(db: &dyn Db) -> Result<()> {
    // Deferred: it goes out with the first read of the transaction (the chain's tail).
    db.defer_batch(match db.dialect() {
        Dialect::Sqlite => "BEGIN IMMEDIATE",
        Dialect::Postgres => "BEGIN; SELECT id FROM write_lock WHERE id = 1 FOR UPDATE",
    })
}

/// Opens a new connection of the store's engine.
type Connect = Arc<dyn Fn() -> Result<Box<dyn Db + Send>> + Send + Sync>;

/// Runs `f` on a connection from the read pool (a new one when it is empty), then
/// pools the connection again; a lost one is dropped, not pooled.
fn on_reader<T>(
    readers: &Mutex<Vec<Box<dyn Db + Send>>>,
    connect: &Connect,
    f: impl FnOnce(&dyn Db) -> Result<T>,
) -> Result<T> {
    let conn = readers.lock().ok().and_then(|mut v| v.pop());
    let conn = match conn {
        Some(c) => c,
        None => connect()?,
    };
    let r = f(&*conn);
    if conn.healthy()
        && let Ok(mut v) = readers.lock()
        && v.len() < 16
    {
        v.push(conn);
    }
    r
}

fn writer_loop(
    mut db: Box<dyn Db + Send>,
    connect: Connect,
    mut rx: mpsc::Receiver<Job>,
    recommend: Arc<RecommendConfig>,
    // PostgreSQL: the notification each commit sends the other controllers.
    notify: Option<String>,
) {
    let mut policies = WriterPolicies::default();
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if !db.healthy() {
            match connect() {
                Ok(c) => db = c,
                Err(e) => tracing::error!(error = %e, "the writer cannot reconnect"),
            }
        }
        let mut finishes: Vec<Finish> = Vec::with_capacity(jobs.len());
        let result: Result<()> = (|| {
            begin_write(&*db)?;
            // The chain's tail is read under the lock at every group: another
            // controller on the same database may have extended it.
            let mut tail = load_tail(&*db)?;
            let start = tail.seq;
            // One savepoint per job, the previous one released in the same round trip
            // (COMMIT releases the last).
            let mut savepoint = "SAVEPOINT job";
            for job in jobs.drain(..) {
                db.defer_batch(savepoint)?;
                savepoint = "RELEASE SAVEPOINT job; SAVEPOINT job";
                let before = tail.clone();
                let looked_up = policies.looked_up.len();
                let (ok, finish) = {
                    let mut ctx = WriteCtx {
                        tx: &*db,
                        tail: &mut tail,
                        policies: &mut policies,
                        recommend: &recommend,
                    };
                    job(&mut ctx)
                };
                if !ok {
                    // What the refused job left waiting is undone with it.
                    let _ = db.flush();
                    db.batch("ROLLBACK TO SAVEPOINT job")?;
                    tail = before;
                    policies.forget_since(looked_up);
                }
                finishes.push(finish);
            }
            // The recorded head, the other controllers' doorbell (PostgreSQL delivers it
            // when this commits) and the commit, in one round trip. The head is a
            // number written by this code, never text from a caller.
            let mut end = String::new();
            if tail.seq != start {
                end.push_str(&format!(
                    "INSERT INTO meta(key, value) VALUES ('audit_head', '{}') ON CONFLICT(key) DO UPDATE SET value = excluded.value; ",
                    tail.seq
                ));
            }
            if let Some(sql) = &notify {
                end.push_str(sql);
                end.push_str("; ");
            }
            end.push_str("COMMIT");
            db.batch(&end)?;
            Ok(())
        })();
        match &result {
            Ok(()) => policies.committed(),
            Err(e) => {
                tracing::error!(error = %e, "write transaction failed");
                // Ends the transaction if it is still open (no harm if it is not).
                let _ = db.batch("ROLLBACK");
                policies.forget_since(0);
            }
        }
        for f in finishes {
            f(match &result {
                Ok(()) => Ok(()),
                // A lost database stays "unavailable" for every caller of the group:
                // their writes may or may not have committed, and a retry may succeed.
                Err(StoreError::Unavailable(m)) => Err(StoreError::Unavailable(m.clone())),
                Err(e) => Err(StoreError::Db(e.to_string())),
            });
        }
        // Jobs never started because the transaction failed early are answered too.
        for job in jobs {
            drop(job);
        }
    }
}

// ---- recommendations (storage-private) --------------------------------------------

/// An agent's facts as stored beside its report (`agent_status.facts`): what
/// recommendations classify, without the time it was seen.
#[derive(Serialize, Deserialize, PartialEq)]
struct StoredFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nft: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    drift: Option<String>,
    #[serde(default)]
    listening: Vec<StoredListener>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inventory_errors: Vec<String>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct StoredListener {
    protocol: String,
    addr: IpAddr,
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process: Option<String>,
}

fn encode_facts(f: &AgentFacts) -> Result<String> {
    serde_json::to_string(&StoredFacts {
        nft: f.nft_version.clone(),
        error: f.error.clone(),
        drift: f.drift.clone(),
        listening: f
            .listening
            .iter()
            .map(|l| StoredListener {
                protocol: l.protocol.as_str().to_owned(),
                addr: l.addr,
                port: l.port,
                process: l.process.clone(),
            })
            .collect(),
        inventory_errors: f.inventory_errors.clone(),
    })
    .map_err(|e| StoreError::Db(format!("cannot encode agent facts: {e}")))
}

fn decode_facts(json: &str, last_seen: Timestamp) -> Result<AgentFacts> {
    let f: StoredFacts = serde_json::from_str(json).map_err(corrupt("agent facts"))?;
    Ok(AgentFacts {
        last_seen,
        nft_version: f.nft,
        error: f.error,
        drift: f.drift,
        listening: f
            .listening
            .into_iter()
            .map(|l| {
                Ok(Listening {
                    protocol: Protocol::parse(&l.protocol).map_err(corrupt("listener protocol"))?,
                    addr: l.addr,
                    port: l.port,
                    process: l.process,
                })
            })
            .collect::<Result<_>>()?,
        inventory_errors: f.inventory_errors,
    })
}

/// The reported verdict of a VM whose agent's last report was stored before the store
/// kept agents' facts (an installation upgraded while the agent was away): nothing is
/// known about its sockets until it reports again, which an online agent does within
/// its heartbeat (10 s).
fn facts_unknown() -> Recommendation {
    Recommendation {
        verdict: Verdict::NotApplicable,
        reason: "the agent's last report predates this controller's recommendations; its next report (every 10 s while online) gives the verdict".to_owned(),
        exposed: Vec::new(),
        listening_management: Vec::new(),
    }
}

fn ports_text(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn ports_from_text(text: &str) -> Result<Vec<u16>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|p| p.parse::<u16>().map_err(corrupt("verdict port")))
        .collect()
}

fn excluded_reason(exclusions: &[ExclusionRecord], vm: &VmId) -> Option<String> {
    exclusions
        .iter()
        .find(|e| e.scope.contains(&vm.scope()))
        .map(|e| e.reason.clone())
}

/// Recomputes the stored verdicts of the VMs with these keys from their stored facts,
/// inside the write that changed them: `core::recommend::classify_reported` on the
/// agent's facts, the VM's policy ports and user rules, plus the exclusion covering
/// it and the agent's last report, which reads settle. A key that is not a registered
/// VM loses its row.
fn refresh_verdicts(ctx: &mut WriteCtx<'_>, keys: &[String]) -> Result<()> {
    let exclusions = read_exclusions(ctx.tx, "ORDER BY created_ns, id", &[])?;
    // Each policy's ports by VM key, built once per policy: a policy may hold
    // thousands of VMs, and `Policy::vm` is a scan.
    type PortsByVm = std::collections::HashMap<String, Vec<(Port, Protocol)>>;
    let mut policies: std::collections::HashMap<String, PortsByVm> =
        std::collections::HashMap::new();
    for key in keys {
        let row: Option<(String, String, String)> = ctx.tx.one(
            "SELECT id, subscription, rg_key FROM vms WHERE key = ?1",
            &[&key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let Some((id, sub, rg_key)) = row else {
            ctx.tx
                .defer("DELETE FROM vm_verdicts WHERE vm_key = ?1", &[&key])?;
            continue;
        };
        let vm = VmId::parse(&id).map_err(corrupt("vm id"))?;
        let policy_key: Option<String> = ctx.tx.one(
            "SELECT policy_key FROM policy_vms WHERE vm_key = ?1",
            &[&key],
            |r| r.get(0),
        )?;
        let in_policy = policy_key.is_some();
        let protected = match policy_key {
            Some(pk) => {
                if !policies.contains_key(&pk) {
                    let by_vm = ctx
                        .policy(&pk)?
                        .map(|(_, p)| {
                            p.spec
                                .vms
                                .iter()
                                .map(|v| {
                                    (
                                        v.id.key(),
                                        v.ports.iter().map(|r| (r.number, r.protocol)).collect(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    policies.insert(pk.clone(), by_vm);
                }
                policies
                    .get(&pk)
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        let user_rules = {
            let rows = ctx.tx.all(
                "SELECT name, priority, access, protocol, sources, ports, description, vm_key FROM nsg_rules
                 WHERE vm_key = ?1 ORDER BY priority",
            &[&key], nsg_row)?;
            rows.into_iter()
                .map(|row| decode_nsg_row(row).map(|(_, rule)| rule))
                .collect::<Result<Vec<_>>>()?
        };
        let agent: Option<(Option<String>, i64)> = ctx.tx.one(
            "SELECT facts, last_seen_ns FROM agent_status WHERE vm_key = ?1",
            &[&key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let facts = |agent| VmFacts {
            agent,
            excluded: None,
            protected: protected.clone(),
            user_rules: user_rules.clone(),
        };
        let (reported, last_seen) = match agent {
            None => (classify_reported(&facts(None), ctx.recommend), None),
            Some((None, seen)) => (facts_unknown(), Some(seen)),
            Some((Some(json), seen)) => {
                let agent = decode_facts(&json, from_ns(seen)?)?;
                (
                    classify_reported(&facts(Some(agent)), ctx.recommend),
                    Some(seen),
                )
            }
        };
        ctx.tx
            .defer(
                "INSERT INTO vm_verdicts(vm_key, subscription, rg_key, verdict, reason, exposed, listening, last_seen_ns, excluded, protected)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(vm_key) DO UPDATE SET subscription = excluded.subscription, rg_key = excluded.rg_key,
                   verdict = excluded.verdict, reason = excluded.reason, exposed = excluded.exposed,
                   listening = excluded.listening, last_seen_ns = excluded.last_seen_ns, excluded = excluded.excluded,
                   protected = excluded.protected",
            &[&key, &sub, &rg_key, &reported.verdict.as_str(), &reported.reason, &ports_text(&reported.exposed), &ports_text(&reported.listening_management), &last_seen, &(excluded_reason(&exclusions, &vm)), &i64::from(in_policy)])?;
    }
    Ok(())
}

/// After an exclusion of `scope` was added or removed: which exclusion covers each VM
/// of the scope (a batch at a time; a subscription may hold many VMs). Nothing else of
/// a verdict depends on exclusions.
fn refresh_exclusions(ctx: &mut WriteCtx<'_>, scope: &Scope) -> Result<()> {
    const BATCH: i64 = 1000;
    let exclusions = read_exclusions(ctx.tx, "ORDER BY created_ns, id", &[])?;
    // Parameters: ?1 the subscription, ?2 the previous batch's last key, ?3 the batch
    // size, ?4 the resource group's or the VM's key.
    let (filter, sub, key) = match scope {
        Scope::Subscription(s) => ("v.subscription = ?1", s.to_string(), String::new()),
        Scope::ResourceGroup(s, rg) => (
            "v.subscription = ?1 AND v.rg_key = ?4",
            s.to_string(),
            rg.key(),
        ),
        Scope::Vm(vm) => (
            "v.subscription = ?1 AND v.vm_key = ?4",
            vm.subscription.to_string(),
            vm.key(),
        ),
    };
    let mut after = String::new();
    loop {
        let mut params: Vec<&dyn ToParam> = vec![&sub, &after, &BATCH];
        if !key.is_empty() {
            params.push(&key);
        }
        let rows: Vec<(String, String, Option<String>)> = ctx.tx.all(
            &format!(
                "SELECT v.vm_key, vms.id, v.excluded FROM vm_verdicts v JOIN vms ON vms.key = v.vm_key
                 WHERE {filter} AND v.vm_key > ?2 ORDER BY v.vm_key LIMIT ?3"
            ),
            params.as_slice(),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        for (key, id, was) in &rows {
            let vm = VmId::parse(id).map_err(corrupt("vm id"))?;
            let now = excluded_reason(&exclusions, &vm);
            if now != *was {
                ctx.tx.defer(
                    "UPDATE vm_verdicts SET excluded = ?2 WHERE vm_key = ?1",
                    &[&key, &now],
                )?;
            }
        }
        match rows.last() {
            Some((key, _, _)) if rows.len() as i64 == BATCH => after = key.clone(),
            _ => return Ok(()),
        }
    }
}

/// Computes every VM's verdict when the store opens, in one transaction: an
/// installation that predates `vm_verdicts` gets it filled, and a changed
/// configuration (management ports) or a new version's classification takes effect,
/// since the stored verdicts are only ever a function of stored facts, configuration
/// and code. A batch of VMs at a time, so memory stays flat in their number.
fn fill_verdicts(tx: &dyn Db, recommend: &RecommendConfig) -> Result<()> {
    begin_write(tx)?;
    tx.end(fill_verdicts_in(tx, recommend))
}

fn fill_verdicts_in(tx: &dyn Db, recommend: &RecommendConfig) -> Result<()> {
    const BATCH: i64 = 500;
    let mut tail = load_tail(tx)?;
    let mut policies = WriterPolicies::default();
    tx.execute(
        "DELETE FROM vm_verdicts WHERE vm_key NOT IN (SELECT key FROM vms)",
        &[],
    )?;
    let mut after = String::new();
    loop {
        let keys = ids_of(
            tx,
            "SELECT key FROM vms WHERE key > ?1 ORDER BY key LIMIT ?2",
            &[&after, &BATCH],
        )?;
        {
            let mut ctx = WriteCtx {
                tx,
                tail: &mut tail,
                policies: &mut policies,
                recommend,
            };
            refresh_verdicts(&mut ctx, &keys)?;
        }
        match keys.last() {
            Some(k) if keys.len() as i64 == BATCH => after = k.clone(),
            _ => break,
        }
    }
    Ok(())
}

/// The `WHERE` clause (over `vm_verdicts v`) of a recommendations read and its
/// parameters: the subscription, the resource group, the caller's readable scopes.
/// `None` when the readable scopes contain none of the subscription's VMs.
fn verdict_scope_sql(
    dialect: Dialect,
    subscription: SubscriptionId,
    scope: &VerdictScope,
) -> Option<(String, Vec<Box<dyn ToParam + Send>>)> {
    let mut sql = "v.subscription = ?".to_owned();
    let mut params: Vec<Box<dyn ToParam + Send>> = vec![Box::new(subscription.to_string())];
    if let Some(rg) = &scope.resource_group {
        sql.push_str(" AND v.rg_key = ?");
        params.push(Box::new(rg.key()));
    }
    if let Some(readable) = &scope.readable {
        // The same containment as `Scope::contains`, over the row's keys.
        let mut rgs = Vec::new();
        let mut vms = Vec::new();
        let mut all = false;
        for s in readable {
            match s {
                Scope::Subscription(s) => all |= *s == subscription,
                Scope::ResourceGroup(s, rg) if *s == subscription => rgs.push(rg.key()),
                Scope::Vm(vm) if vm.subscription == subscription => vms.push(vm.key()),
                _ => {}
            }
        }
        if !all {
            if rgs.is_empty() && vms.is_empty() {
                return None;
            }
            // One JSON array parameter each, however many scopes the caller has.
            sql.push_str(match dialect {
                Dialect::Sqlite => {
                    " AND (v.rg_key IN (SELECT value FROM json_each(?)) OR v.vm_key IN (SELECT value FROM json_each(?)))"
                }
                Dialect::Postgres => {
                    " AND (v.rg_key IN (SELECT json_array_elements_text(CAST(CAST(? AS TEXT) AS json))) OR v.vm_key IN (SELECT json_array_elements_text(CAST(CAST(? AS TEXT) AS json))))"
                }
            });
            params.push(Box::new(serde_json::Value::from(rgs).to_string()));
            params.push(Box::new(serde_json::Value::from(vms).to_string()));
        }
    }
    Some((sql, params))
}

/// The verdict of a `vm_verdicts v` row at the read: `settle` in SQL (an exclusion or
/// an agent last seen before the cutoff parameter make it NotApplicable).
const SETTLED_VERDICT: &str = "CASE WHEN v.excluded IS NOT NULL OR v.last_seen_ns < ? THEN 'NotApplicable' ELSE v.verdict END";

/// A policy protects the VM of the verdict row `v` (kept with the verdict by
/// `refresh_verdicts`).
const PROTECTED: &str = "v.protected <> 0";

/// A `LIKE ... ESCAPE '!'` pattern matching keys that contain `text` (lower-cased;
/// its `%`, `_` and `!` taken literally) after `prefix` (a pattern itself).
fn like_contains(prefix: &str, text: &str) -> String {
    let mut out = format!("{prefix}%");
    for c in text.to_ascii_lowercase().chars() {
        if matches!(c, '%' | '_' | '!') {
            out.push('!');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// `last_seen_ns < cutoff` says "offline"; with no time early enough, nobody is.
fn cutoff_ns(recommend: &RecommendConfig, now: Timestamp) -> i64 {
    offline_cutoff(recommend, now).map_or(i64::MIN, ns)
}

// ---- the store ---------------------------------------------------------------------

/// How a [`SqlStore`] is opened (either engine).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The most writes waiting for the writer (besides the group it is committing).
    /// A write asked for when it is full fails at once with [`StoreError::Busy`]
    /// instead of growing the queue (and every caller's wait) without bound; the few
    /// writes that record what already happened (`append_audit`, `expire_due`,
    /// `prune_blocked`, `bootstrap`) wait for room instead. At least 1.
    pub write_queue: usize,
    /// What recommendations are classified with (management ports, offline time).
    pub recommend: RecommendConfig,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            write_queue: DEFAULT_WRITE_QUEUE,
            recommend: RecommendConfig::default(),
        }
    }
}

/// What a write does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhenFull {
    /// Fail with `StoreError::Busy` (the caller is told to retry).
    Refuse,
    /// Wait for room: the write records something that has already happened.
    Wait,
}

/// A [`Store`] on a SQL database: SQLite ([`SqlStore::open`]) or PostgreSQL
/// ([`SqlStore::connect_postgres`]).
pub struct SqlStore {
    dialect: Dialect,
    connect: Connect,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    write_queue: usize,
    /// Writes refused because the queue was full, since opening.
    refused_writes: AtomicU64,
    readers: Arc<Mutex<Vec<Box<dyn Db + Send>>>>,
    /// Bounds concurrent reads to the pool's size: a burst of callers waits here
    /// instead of each occupying a blocking thread (and its memory).
    read_slots: Arc<tokio::sync::Semaphore>,
    /// Decoded policies shared by readers (see `cached_policy`).
    read_policies: Arc<Mutex<PolicyCache>>,
    recommend: Arc<RecommendConfig>,
    /// PostgreSQL: the other controllers' doorbell (see `Store::shared_changes`).
    changes: Option<pg::Changes>,
}

impl SqlStore {
    /// Opens (creating and migrating if needed) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, StoreOptions::default())
    }

    /// [`SqlStore::open`] with options.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self> {
        let mut conn = sqlite::open_connection(path)?;
        sqlite::migrate(&mut conn)?;
        sqlite::checkpoint_aside(&mut conn, path)?;
        let path = path.to_owned();
        let connect: Connect =
            Arc::new(move || Ok(Box::new(sqlite::open_connection(&path)?) as Box<dyn Db + Send>));
        Self::start(Box::new(conn), connect, options, None)
    }

    /// Connects to PostgreSQL (`postgres://...` or `host=... dbname=...`; several hosts
    /// with `target_session_attrs=read-write` follow a promoted standby), applies the
    /// schema migrations it lacks under a lock, and starts the store.
    pub async fn connect_postgres(url: &str, options: StoreOptions) -> Result<Self> {
        let target = pg::target(url)?;
        tokio::task::spawn_blocking(move || {
            let db = pg::connect(&target)?;
            pg::migrate(&db)?;
            // This store's id, in its notifications (its own listener skips them).
            let id = uuid::Uuid::new_v4().simple().to_string();
            let changes = pg::listen(target.clone(), id.clone())?;
            let connect: Connect =
                Arc::new(move || Ok(Box::new(pg::connect(&target)?) as Box<dyn Db + Send>));
            let mut store = Self::start(Box::new(db), connect, options, Some(pg::notify_sql(&id)))?;
            store.changes = Some(changes);
            Ok(store)
        })
        .await
        .map_err(|e| StoreError::Db(format!("connecting task failed: {e}")))?
    }

    fn start(
        db: Box<dyn Db + Send>,
        connect: Connect,
        options: StoreOptions,
        notify: Option<String>,
    ) -> Result<Self> {
        let dialect = db.dialect();
        let recommend = Arc::new(options.recommend);
        fill_verdicts(&*db, &recommend)?;
        let write_queue = options.write_queue.max(1);
        let (tx, rx) = mpsc::channel::<Job>(write_queue);
        let writer_recommend = recommend.clone();
        let writer_connect = connect.clone();
        std::thread::Builder::new()
            .name("jitgate-store-writer".into())
            .spawn(move || writer_loop(db, writer_connect, rx, writer_recommend, notify))
            .map_err(|e| StoreError::Db(format!("cannot start the writer thread: {e}")))?;
        Ok(SqlStore {
            dialect,
            connect,
            writer: Mutex::new(Some(tx)),
            write_queue,
            refused_writes: AtomicU64::new(0),
            readers: Arc::new(Mutex::new(Vec::new())),
            read_slots: Arc::new(tokio::sync::Semaphore::new(READERS)),
            read_policies: Arc::new(Mutex::new(PolicyCache::default())),
            recommend,
            changes: None,
        })
    }

    /// Runs `f` in the next group commit; resolves once it has committed. Refused with
    /// `Busy` when the queue is full.
    async fn write<T, E, F>(&self, f: F) -> Result<T, OpError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, OpError<E>> + Send + 'static,
    {
        self.write_when(WhenFull::Refuse, f).await
    }

    async fn write_when<T, E, F>(&self, when_full: WhenFull, f: F) -> Result<T, OpError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, OpError<E>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, OpError<E>>>();
        let job: Job = Box::new(move |ctx| {
            // A deferred statement's failure is this job's.
            let r = f(ctx).and_then(|v| ctx.tx.flush().map(|()| v).map_err(OpError::Store));
            let ok = r.is_ok();
            let finish: Finish = Box::new(move |committed: Result<()>| {
                let out = match committed {
                    Ok(()) => r,
                    Err(e) => Err(OpError::Store(e)),
                };
                let _ = tx.send(out);
            });
            (ok, finish)
        });
        let sender = {
            let guard = self.writer.lock().map_err(|_| StoreError::Closed)?;
            let sender = guard.as_ref().ok_or(StoreError::Closed)?;
            match when_full {
                WhenFull::Refuse => {
                    sender.try_send(job).map_err(|e| match e {
                        mpsc::error::TrySendError::Full(_) => {
                            self.refused_writes.fetch_add(1, Ordering::Relaxed);
                            StoreError::Busy {
                                queued: self.write_queue,
                            }
                        }
                        mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
                    })?;
                    None
                }
                WhenFull::Wait => Some((sender.clone(), job)),
            }
        };
        if let Some((sender, job)) = sender {
            sender.send(job).await.map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| OpError::Store(StoreError::Closed))?
    }

    async fn write_plain<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T> + Send + 'static,
    {
        self.write_plain_when(WhenFull::Refuse, f).await
    }

    async fn write_plain_when<T, F>(&self, when_full: WhenFull, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T> + Send + 'static,
    {
        self.write_when::<T, std::convert::Infallible, _>(when_full, move |ctx| {
            f(ctx).map_err(OpError::Store)
        })
        .await
        .map_err(|e| match e {
            OpError::Store(s) => s,
            OpError::Refused(never) => match never {},
        })
    }

    /// Runs `f` on a pooled read connection, off the async threads.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    {
        let _slot = self
            .read_slots
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let readers = self.readers.clone();
        let connect = self.connect.clone();
        tokio::task::spawn_blocking(move || on_reader(&readers, &connect, f))
            .await
            .map_err(|e| StoreError::Db(format!("read task failed: {e}")))?
    }

    /// Runs a read of a few rows by index: on SQLite on the calling thread, which
    /// costs less than the blocking pool's two thread wake-ups (it blocks the caller
    /// meanwhile); on PostgreSQL (a network round trip) off the async threads, as
    /// `read`.
    async fn read_small<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    {
        match self.dialect {
            Dialect::Sqlite => on_reader(&self.readers, &self.connect, f),
            Dialect::Postgres => self.read(f).await,
        }
    }

    /// Stops the writer after the queued writes; later writes fail with `Closed`.
    pub fn close(&self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
    }
}

fn subscription_exists(conn: &dyn Db, sub: SubscriptionId) -> Result<bool> {
    conn.exists(
        "SELECT 1 FROM subscriptions WHERE id = ?1",
        &[&sub.to_string()],
    )
}

/// The creation time (Unix ns) before which an idempotency key is forgotten.
fn idempotency_cutoff(now: Timestamp) -> i64 {
    let window = i64::try_from(IDEMPOTENCY_WINDOW.as_nanos()).unwrap_or(i64::MAX);
    ns(now).saturating_sub(window)
}

fn insert_token(conn: &dyn Db, t: &TokenRecord) -> Result<()> {
    conn.defer("INSERT INTO tokens(id, principal, secret_hash, description, created_ns, expires_ns, revoked_ns, identity, last_used_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)", &[&t.id, &t.principal, &t.secret_hash, &t.description, &ns(t.created), &t.expires.map(ns), &t.revoked.map(ns), &t.identity, &t.last_used.map(ns)])?;
    Ok(())
}

fn insert_role_assignment(conn: &dyn Db, ra: &RoleAssignmentRecord) -> Result<()> {
    conn.defer("INSERT INTO role_assignments(id, principal, role, scope, created_ns) VALUES (?1, ?2, ?3, ?4, ?5)", &[&ra.id, &ra.assignment.principal, &ra.assignment.role.as_str(), &ra.assignment.scope.to_string(), &ns(ra.created)])?;
    Ok(())
}

/// `put_policy` inside a write job: checks the VMs, writes the policy, ends the live
/// grants the new rules no longer allow, audits.
fn put_policy_in(
    ctx: &mut WriteCtx<'_>,
    key: &PolicyKey,
    spec: &PolicySpec,
    audit: &AuditCtx,
) -> Result<PutPolicyOutcome, OpError<PolicyError>> {
    if !subscription_exists(ctx.tx, key.subscription)? {
        return Err(OpError::Refused(PolicyError::UnknownSubscription(
            key.subscription,
        )));
    }
    let pkey = key.key();
    for (i, vm) in spec.vms.iter().enumerate() {
        let field = format!("properties.virtualMachines[{i}].id");
        let known = ctx
            .tx
            .exists("SELECT 1 FROM vms WHERE key = ?1", &[&vm.id.key()])?;
        if !known {
            return Err(OpError::Refused(PolicyError::UnknownVm(FieldError::new(
                field,
                format!(
                    "virtual machine '{}' is not registered (enroll its agent or register it first)",
                    vm.id
                ),
            ))));
        }
        let other: Option<String> = ctx.tx.one(
            "SELECT policy_key FROM policy_vms WHERE vm_key = ?1",
            &[&vm.id.key()],
            |r| r.get(0),
        )?;
        if let Some(other) = other
            && other != pkey
        {
            return Err(OpError::Refused(PolicyError::VmInOtherPolicy(
                FieldError::new(
                    field,
                    format!(
                        "virtual machine '{}' is already protected by policy {other}",
                        vm.id
                    ),
                ),
            )));
        }
    }
    let old = load_policy(ctx.tx, &pkey)?;
    let json = encode_vms(spec)?;
    let created = old.is_none();
    match &old {
        None => {
            ctx.tx.defer("INSERT INTO policies(key, uid, subscription, rg, rg_key, location, location_key, name, kind, vms_json, created_ns, updated_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)", &[&pkey, &uuid::Uuid::new_v4().to_string(), &key.subscription.to_string(), &key.resource_group.as_str(), &key.resource_group.key(), &key.location.as_str(), &key.location.key(), &key.name.as_str(), &spec.kind, &json, &ns(audit.now)])?;
        }
        Some(_) => {
            ctx.tx.defer("UPDATE policies SET kind = ?2, vms_json = ?3, updated_ns = ?4, rev = rev + 1 WHERE key = ?1", &[&pkey, &spec.kind, &json, &ns(audit.now)])?;
            ctx.tx
                .defer("DELETE FROM policy_vms WHERE policy_key = ?1", &[&pkey])?;
        }
    }
    for vm in &spec.vms {
        ctx.tx.defer(
            "INSERT INTO policy_vms(vm_key, policy_key) VALUES (?1, ?2)",
            &[&vm.id.key(), &pkey],
        )?;
    }
    // A VM behind a DNAT gateway gets a mapped port for each new port.
    for (i, vm) in spec.vms.iter().enumerate() {
        if let Err(e) = gateways::allocate_mapped(ctx.tx, &vm.id.key())? {
            return Err(OpError::Refused(PolicyError::NoMappedPort(
                FieldError::new(format!("properties.virtualMachines[{i}].ports"), e.message),
            )));
        }
    }
    let mut revoked = Vec::new();
    if let Some((_, old)) = &old {
        // End exactly the live grants the new rules no longer allow (a removed
        // port, a protocol or source no longer covered); the others keep
        // running. Ended ports are left for expire_due.
        let mut ended = Vec::new();
        for vm in &old.spec.vms {
            for g in read_live_grants(ctx.tx, &vm.id.key(), audit.now)? {
                if !still_allows(Some(spec), &vm.id, g.number, g.protocol, &g.source) {
                    ended.push((g.request.to_string(), vm.id.key(), g.number.get() as i64));
                }
            }
        }
        for (req, vm_key, number) in ended {
            revoked.extend(revoke_where(
                ctx,
                audit,
                RevokeReason::PolicyChanged,
                "request_id = ?1 AND vm_key = ?2 AND number = ?3 AND end_ns > ?4",
                &[&req, &vm_key, &number, &ns(audit.now)],
            )?);
        }
    }
    let ports: Vec<serde_json::Value> = spec
        .vms
        .iter()
        .map(|v| {
            serde_json::json!({
                "vm": v.id.to_string(),
                "ports": v.ports.iter().map(|p| p.number.get()).collect::<Vec<_>>(),
            })
        })
        .collect();
    ctx.audit(
        audit,
        if created {
            "policy.create"
        } else {
            "policy.update"
        },
        &key.id(),
        serde_json::json!({"virtualMachines": ports, "revokedGrants": revoked.len()}),
    )?;
    let previous_vms: Vec<VmId> = old
        .map(|(_, p)| p.spec.vms.into_iter().map(|v| v.id).collect())
        .unwrap_or_default();
    // The VMs it protected and protects: their protected ports changed.
    let mut touched: Vec<String> = previous_vms
        .iter()
        .chain(spec.vms.iter().map(|v| &v.id))
        .map(VmId::key)
        .collect();
    touched.sort_unstable();
    touched.dedup();
    refresh_verdicts(ctx, &touched)?;
    Ok(PutPolicyOutcome {
        created,
        previous_vms,
        revoked,
    })
}

/// Revokes the initiated ports selected by `where_sql` (over `request_ports`),
/// auditing each, and returns them.
fn revoke_where(
    ctx: &mut WriteCtx<'_>,
    audit: &AuditCtx,
    reason: RevokeReason,
    where_sql: &str,
    params: &[&dyn ToParam],
) -> Result<Vec<RevokedPort>> {
    let rows: Vec<(String, i64, i64, String, i64, String, i64)> = {
        ctx.tx.all(
            &format!(
            "SELECT request_id, vm_idx, port_idx, vm_id, number, source, end_ns FROM request_ports
             WHERE status = 'Initiated' AND {where_sql}"
        ),
            params,
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )?
    };
    let mut out = Vec::with_capacity(rows.len());
    for (req, vm_idx, port_idx, vm_id, number, source, end_ns) in rows {
        ctx.tx.defer(
            "UPDATE request_ports SET status = 'Revoked', reason = ?4, changed = ?5
                 WHERE request_id = ?1 AND vm_idx = ?2 AND port_idx = ?3",
            &[
                &req,
                &vm_idx,
                &port_idx,
                &reason.as_str(),
                &ctx.change_point(),
            ],
        )?;
        let rp = RevokedPort {
            request: RequestId::parse(&req).map_err(corrupt("request id"))?,
            vm: VmId::parse(&vm_id).map_err(corrupt("vm id"))?,
            number: Port::new(number).map_err(corrupt("port"))?,
            source: SourcePrefix::parse(&source).map_err(corrupt("source"))?,
            end: from_ns(end_ns)?,
            reason,
        };
        // A person's revoke, a grant reaching its end and a policy change ending it are
        // told apart in the log (the actor of the last is the admin who changed the
        // policy, not someone who revoked access).
        let action = match reason {
            RevokeReason::Expired => "request.expire",
            RevokeReason::PolicyChanged => "request.endedByPolicy",
            _ => "request.revoke",
        };
        ctx.audit(
            audit,
            action,
            &rp.vm.to_string(),
            serde_json::json!({
                "request": rp.request.to_string(),
                "port": rp.number.get(),
                "source": rp.source.to_string(),
                "endTimeUtc": rp.end.to_string(),
                "status": "Revoked",
                "statusReason": reason.as_str(),
            }),
        )?;
        out.push(rp);
    }
    Ok(out)
}

#[async_trait]
impl Store for SqlStore {
    async fn bootstrap(&self, init: Bootstrap, audit: AuditCtx) -> Result<BootstrapOutcome> {
        self.write_plain_when(WhenFull::Wait, move |ctx| {
            let existing: Option<String> = ctx
                .tx
                .one("SELECT id FROM subscriptions ORDER BY created_ns LIMIT 1", &[], |r| r.get(0))?;
            if let Some(s) = existing {
                return Ok(BootstrapOutcome {
                    subscription: SubscriptionId::parse(&s).map_err(corrupt("subscription"))?,
                    created: false,
                });
            }
            ctx.tx.defer("INSERT INTO subscriptions(id, created_ns) VALUES (?1, ?2)", &[&init.subscription.to_string(), &ns(audit.now)])?;
            insert_token(ctx.tx, &init.owner_token)?;
            let ra = RoleAssignmentRecord {
                id: format!("bootstrap-{}", init.owner_token.id),
                assignment: RoleAssignment {
                    principal: init.owner_principal.clone(),
                    role: Role::Owner,
                    scope: Scope::Subscription(init.subscription),
                },
                created: audit.now,
            };
            insert_role_assignment(ctx.tx, &ra)?;
            let sub = format!("/subscriptions/{}", init.subscription);
            ctx.audit(&audit, "subscription.create", &sub, serde_json::json!({}))?;
            ctx.audit(
                &audit,
                "token.create",
                &init.owner_principal,
                serde_json::json!({"token": init.owner_token.id, "bootstrap": true}),
            )?;
            ctx.audit(
                &audit,
                "roleAssignment.create",
                &sub,
                serde_json::json!({"principal": init.owner_principal, "role": "Owner", "scope": sub}),
            )?;
            Ok(BootstrapOutcome {
                subscription: init.subscription,
                created: true,
            })
        })
        .await
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionId>> {
        self.read(|c| {
            let ids = ids_of(c, "SELECT id FROM subscriptions ORDER BY created_ns", &[])?;
            ids.iter()
                .map(|s| SubscriptionId::parse(s).map_err(corrupt("subscription")))
                .collect()
        })
        .await
    }

    async fn register_vm(
        &self,
        vm: VmRecord,
        audit: AuditCtx,
    ) -> Result<RegisterOutcome, OpError<VmError>> {
        self.write(move |ctx| {
            if !subscription_exists(ctx.tx, vm.id.subscription)? {
                return Err(OpError::Refused(VmError::UnknownSubscription(
                    vm.id.subscription,
                )));
            }
            let n = ctx.tx.execute("INSERT INTO vms(key, id, subscription, rg_key, location, created_ns, created_by, name_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(key) DO NOTHING", &[&vm.id.key(), &vm.id.to_string(), &vm.id.subscription.to_string(), &vm.id.resource_group.key(), &(vm.location.as_ref().map(|l| l.to_string())), &ns(vm.created), &vm.created_by, &vm.id.name.key()])?;
            if n == 0 {
                return Ok(RegisterOutcome::AlreadyRegistered);
            }
            ctx.audit(
                &audit,
                "vm.register",
                &vm.id.to_string(),
                serde_json::json!({"location": vm.location.as_ref().map(|l| l.to_string())}),
            )?;
            refresh_verdicts(ctx, &[vm.id.key()])?;
            Ok(RegisterOutcome::Created)
        })
        .await
    }

    async fn get_vm(&self, id: &VmId) -> Result<Option<VmRecord>> {
        let key = id.key();
        // On the path of every agent long-poll (and so of an initiate's answer).
        self.read_small(move |c| {
            let rows = read_vms(c, "WHERE key = ?1", &[&key])?;
            Ok(rows.into_iter().next())
        })
        .await
    }

    async fn find_vms(
        &self,
        subscription: SubscriptionId,
        filter: &VmFilter,
    ) -> Result<Vec<VmRecord>> {
        let sub = subscription.to_string();
        let rg = filter.resource_group.as_ref().map(|r| r.key());
        let name = filter.name.as_ref().map(|n| n.key());
        let after = filter.after.clone().unwrap_or_default();
        let limit = filter.limit.min(i64::MAX as usize) as i64;
        self.read(move |c| {
            // One statement per shape, so each uses its index (vms_name, vms_rg_page,
            // the key) rather than a plan that fits all.
            match (&rg, &name) {
                (Some(rg), Some(name)) => read_vms(
                    c,
                    "WHERE subscription = ?1 AND rg_key = ?2 AND name_key = ?3 AND key > ?4 ORDER BY key LIMIT ?5",
                    &[&sub, rg, name, &after, &limit],
                ),
                (None, Some(name)) => read_vms(
                    c,
                    "WHERE subscription = ?1 AND name_key = ?2 AND key > ?3 ORDER BY key LIMIT ?4",
                    &[&sub, name, &after, &limit],
                ),
                (Some(rg), None) => read_vms(
                    c,
                    "WHERE subscription = ?1 AND rg_key = ?2 AND key > ?3 ORDER BY key LIMIT ?4",
                    &[&sub, rg, &after, &limit],
                ),
                (None, None) => read_vms(
                    c,
                    "WHERE subscription = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
                    &[&sub, &after, &limit],
                ),
            }
        })
        .await
    }

    async fn vm_summaries(&self, vms: &[VmId], now: Timestamp) -> Result<Vec<VmSummary>> {
        let vms = vms.to_vec();
        let cache = self.read_policies.clone();
        let now = ns(now);
        self.read(move |c| {
            let mut out = Vec::with_capacity(vms.len());
            // SQLite binds at most 32,766 parameters; pages are far smaller, but a
            // caller's slice is split anyway.
            for chunk in vms.chunks(500) {
                let keys: Vec<String> = chunk.iter().map(VmId::key).collect();
                let marks = vec!["?"; keys.len()].join(",");
                let params: Vec<&dyn ToParam> = keys.iter().map(|k| k as &dyn ToParam).collect();
                let known: std::collections::HashSet<String> = c
                    .all(
                        &format!("SELECT key FROM vms WHERE key IN ({marks})"),
                        params.as_slice(),
                        |r| r.get(0),
                    )?
                    .into_iter()
                    .collect();
                let policy_of: std::collections::HashMap<String, String> = c
                    .all(
                        &format!(
                            "SELECT vm_key, policy_key FROM policy_vms WHERE vm_key IN ({marks})"
                        ),
                        params.as_slice(),
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?
                    .into_iter()
                    .collect();
                let mut with_now = params.clone();
                with_now.push(&now);
                let grants: std::collections::HashMap<String, i64> = c
                    .all(
                        &format!(
                            "SELECT vm_key, count(*) FROM request_ports
                         WHERE status = 'Initiated' AND vm_key IN ({marks}) AND end_ns > ?{}
                         GROUP BY vm_key",
                            keys.len() + 1
                        ),
                        with_now.as_slice(),
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?
                    .into_iter()
                    .collect();
                let seen: std::collections::HashMap<String, i64> = c
                    .all(&format!(
                        "SELECT vm_key, last_seen_ns FROM agent_status WHERE vm_key IN ({marks})"
                    ), params.as_slice(), |r| Ok((r.get(0)?, r.get(1)?)))?
                    .into_iter()
                    .collect();
                // Each policy is read (or its cache entry checked) once per chunk.
                let mut policies: std::collections::HashMap<&str, Option<Arc<Policy>>> =
                    std::collections::HashMap::new();
                for pk in policy_of.values() {
                    if !policies.contains_key(pk.as_str()) {
                        policies.insert(pk, read_cached_policy(c, &cache, pk)?);
                    }
                }
                for (vm, key) in chunk.iter().zip(&keys) {
                    if !known.contains(key) {
                        continue;
                    }
                    let policy = match policy_of.get(key) {
                        Some(pk) => policies.get(pk.as_str()).cloned().flatten().and_then(|p| {
                            p.vm(vm).map(|v| VmPolicy {
                                key: p.key.clone(),
                                vm: v.clone(),
                            })
                        }),
                        None => None,
                    };
                    out.push(VmSummary {
                        vm: vm.clone(),
                        policy,
                        live_grants: grants.get(key).copied().unwrap_or(0).max(0) as u64,
                        agent_last_seen: seen.get(key).map(|t| from_ns(*t)).transpose()?,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn delete_vm(&self, id: &VmId, audit: AuditCtx) -> Result<bool, OpError<VmError>> {
        let id = id.clone();
        self.write(move |ctx| {
            let in_policy: Option<String> = ctx.tx.one(
                "SELECT policy_key FROM policy_vms WHERE vm_key = ?1",
                &[&id.key()],
                |r| r.get(0),
            )?;
            if let Some(p) = in_policy {
                return Err(OpError::Refused(VmError::InPolicy(p)));
            }
            if let Some(behind) = gateways::first_behind(ctx.tx, &id.key())? {
                return Err(OpError::Refused(VmError::GatewayInUse(behind)));
            }
            gateways::unplace(ctx, &id, &audit)?;
            let n = ctx
                .tx
                .execute("DELETE FROM vms WHERE key = ?1", &[&id.key()])?;
            if n > 0 {
                ctx.audit(&audit, "vm.delete", &id.to_string(), serde_json::json!({}))?;
                refresh_verdicts(ctx, &[id.key()])?;
            }
            Ok(n > 0)
        })
        .await
    }

    async fn place_vm(
        &self,
        vm: &VmId,
        gateway: &VmId,
        place: jitgate_core::gateway::Placement,
        audit: AuditCtx,
    ) -> Result<VmPlacement, OpError<PlaceError>> {
        let (vm, gateway) = (vm.clone(), gateway.clone());
        self.write(move |ctx| gateways::place(ctx, &vm, &gateway, &place, &audit))
            .await
    }

    async fn unplace_vm(&self, vm: &VmId, audit: AuditCtx) -> Result<bool> {
        let vm = vm.clone();
        self.write_plain(move |ctx| gateways::unplace(ctx, &vm, &audit))
            .await
    }

    async fn placement(&self, vm: &VmId) -> Result<Option<VmPlacement>> {
        let vm = vm.clone();
        self.read_small(move |c| gateways::one(c, &vm)).await
    }

    async fn placements(&self, vms: &[VmId]) -> Result<Vec<(VmId, VmPlacement)>> {
        let vms = vms.to_vec();
        self.read(move |c| {
            let mut out = Vec::new();
            for vm in vms {
                if let Some(p) = gateways::one(c, &vm)? {
                    out.push((vm, p));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn behind(&self, gateway: &VmId) -> Result<Vec<(VmId, VmPlacement)>> {
        let gateway = gateway.clone();
        self.read(move |c| gateways::behind(c, &gateway)).await
    }

    async fn put_policy(
        &self,
        key: PolicyKey,
        spec: PolicySpec,
        audit: AuditCtx,
    ) -> Result<PutPolicyOutcome, OpError<PolicyError>> {
        self.write(move |ctx| put_policy_in(ctx, &key, &spec, &audit))
            .await
    }

    async fn apply_policies(
        &self,
        writes: Vec<(PolicyKey, PolicySpec)>,
        summary: AuditNote,
        audit: AuditCtx,
    ) -> Result<Vec<PutPolicyOutcome>, OpError<PolicyError>> {
        self.write(move |ctx| {
            let mut out = Vec::with_capacity(writes.len());
            for (key, spec) in &writes {
                // A refusal returns before the summary: the job rolls back to its
                // savepoint, taking the writes before it along.
                out.push(put_policy_in(ctx, key, spec, &audit)?);
            }
            ctx.append(AuditEntry {
                time: audit.now.to_string(),
                actor: audit.actor.clone(),
                source: audit.source.clone(),
                action: summary.action,
                target: summary.target,
                outcome: Outcome::Success,
                details: summary.details,
            })?;
            Ok(out)
        })
        .await
    }

    async fn get_policy(&self, key: &PolicyKey) -> Result<Option<Policy>> {
        let key = key.key();
        let cache = self.read_policies.clone();
        self.read(move |c| Ok(read_cached_policy(c, &cache, &key)?.map(|p| (*p).clone())))
            .await
    }

    async fn list_policies(
        &self,
        filter: &PolicyFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Policy>> {
        let sub = filter.subscription.map(|s| s.to_string());
        let rg = filter.resource_group.as_ref().map(|r| r.key());
        let loc = filter.location.as_ref().map(|l| l.key());
        let after = after.unwrap_or("").to_owned();
        self.read(move |c| {
            let rows = c.all(
                &format!(
                    "SELECT {POLICY_COLS} FROM policies
                 WHERE (CAST(?1 AS TEXT) IS NULL OR subscription = ?1) AND (CAST(?2 AS TEXT) IS NULL OR rg_key = ?2)
                   AND (CAST(?3 AS TEXT) IS NULL OR location_key = ?3) AND key > ?4
                 ORDER BY key LIMIT ?5"
                ),
                &[&sub, &rg, &loc, &after, &(limit as i64)],
                policy_from_row,
            )?;
            let mut out = Vec::new();
            for r in rows {
                out.push(build_policy(r)?);
            }
            Ok(out)
        })
        .await
    }

    async fn vm_policy(&self, vm: &VmId) -> Result<Option<VmPolicy>> {
        let id = vm.clone();
        let vm = vm.key();
        let cache = self.read_policies.clone();
        self.read(move |c| {
            let key: Option<String> = c.one(
                "SELECT policy_key FROM policy_vms WHERE vm_key = ?1",
                &[&vm],
                |r| r.get(0),
            )?;
            let Some(k) = key else { return Ok(None) };
            Ok(read_cached_policy(c, &cache, &k)?.and_then(|p| {
                p.vm(&id).map(|v| VmPolicy {
                    key: p.key.clone(),
                    vm: v.clone(),
                })
            }))
        })
        .await
    }

    async fn delete_policy(
        &self,
        key: &PolicyKey,
        audit: AuditCtx,
    ) -> Result<Option<DeletedPolicy>> {
        let key = key.clone();
        self.write_plain(move |ctx| {
            let pkey = key.key();
            let Some((_, old)) = load_policy(ctx.tx, &pkey)? else {
                return Ok(None);
            };
            let mut revoked = Vec::new();
            for (vm, port) in removed_ports(&old.spec, None) {
                // Live grants only: an ended port is left for expire_due.
                revoked.extend(revoke_where(
                    ctx,
                    &audit,
                    RevokeReason::PolicyChanged,
                    "vm_key = ?1 AND number = ?2 AND end_ns > ?3",
                    &[&vm.key(), &(port.get() as i64), &ns(audit.now)],
                )?);
            }
            ctx.tx
                .defer("DELETE FROM policy_vms WHERE policy_key = ?1", &[&pkey])?;
            ctx.tx
                .defer("DELETE FROM policies WHERE key = ?1", &[&pkey])?;
            ctx.audit(
                &audit,
                "policy.delete",
                &key.id(),
                serde_json::json!({"revokedGrants": revoked.len()}),
            )?;
            let unprotected: Vec<String> = old.spec.vms.iter().map(|v| v.id.key()).collect();
            refresh_verdicts(ctx, &unprotected)?;
            Ok(Some(DeletedPolicy {
                vms: old.spec.vms.iter().map(|v| v.id.clone()).collect(),
                revoked,
            }))
        })
        .await
    }

    async fn initiate(
        &self,
        args: InitiateArgs,
        audit: AuditCtx,
    ) -> Result<AccessRequest, OpError<InitiateRefusal>> {
        self.write(move |ctx| {
            // A retry of a request already made: the request made then, nothing new.
            if let Some(k) = &args.idempotency_key
                && let Some(id) = ctx.tx.one(
                    "SELECT request_id FROM idempotency WHERE requestor = ?1 AND key = ?2 AND created_ns > ?3",
                    &[&args.requestor, k, &idempotency_cutoff(audit.now)],
                    |r| r.get::<String>(0),
                )?
                && let Some(made) = load_requests(ctx.tx, &[id])?.pop()
            {
                return Ok(made);
            }
            let Some((uid, policy)) = ctx.policy(&args.policy.key())? else {
                return Err(OpError::Refused(InitiateRefusal::PolicyNotFound));
            };
            let ictx = InitiateContext {
                id: args.id,
                policy: &policy,
                requestor: &args.requestor,
                caller_ip: args.caller_ip,
                now: audit.now,
            };
            let may = |vm: &VmId| rbac::is_allowed(&args.assignments, &args.requestor, Action::Initiate, &vm.scope());
            let mut plan = plan_initiate(&ictx, &args.input, &may).map_err(|e| {
                OpError::Refused(match e {
                    InitiateError::Invalid(f) => InitiateRefusal::Invalid(f),
                    InitiateError::Forbidden { field, vm } => InitiateRefusal::Forbidden { field, vm },
                })
            })?;
            // The grants this request supersedes, found by (VM, port, source) in an
            // index: a VM with many live grants costs no more than one with none.
            let live = read_same_grants(ctx.tx, &plan.request.vms, &args.requestor, audit.now)?;
            plan.superseded = superseded_by(&plan.request.vms, &args.requestor, &live);
            match args.break_glass {
                // Break-glass: the right on every VM, then open now, capped.
                Some(max) => {
                    for (i, vm) in plan.request.vms.iter().enumerate() {
                        if !rbac::is_allowed(&args.assignments, &args.requestor, Action::BreakGlass, &vm.id.scope()) {
                            return Err(OpError::Refused(InitiateRefusal::Forbidden {
                                field: format!("virtualMachines[{i}].id"),
                                vm: vm.id.clone(),
                            }));
                        }
                    }
                    jitgate_core::approval::apply_break_glass(&mut plan, max)
                        .map_err(|f| OpError::Refused(InitiateRefusal::Invalid(f)))?;
                }
                None => {
                    let rules = approvals::all_rules(ctx.tx)?;
                    jitgate_core::approval::apply_rules(&mut plan, &rules, audit.now)
                        .map_err(|f| OpError::Refused(InitiateRefusal::Invalid(f)))?;
                }
            }
            for g in &plan.superseded {
                revoke_where(
                    ctx,
                    &audit,
                    RevokeReason::NewerRequestInitiated,
                    "request_id = ?1 AND vm_key = ?2 AND number = ?3",
                    &[&g.request.to_string(), &g.vm.key(), &(g.number.get() as i64)],
                )?;
            }
            let req = &plan.request;
            ctx.tx
                .defer(
                    "INSERT INTO requests(id, policy_uid, policy_key, requestor, justification, start_ns, caller_ip)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                &[&req.id.to_string(), &uid, &req.policy_key, &req.requestor, &req.justification, &ns(req.start), &req.caller_ip.to_string()])?;
            if let Some(a) = &req.approval {
                approvals::write_snapshot(ctx.tx, &req.id.to_string(), &a.snapshot)?;
            }
            if req.break_glass.is_some() {
                ctx.tx.defer("UPDATE requests SET break_glass = 1 WHERE id = ?1", &[&req.id.to_string()])?;
                for vm in &req.vms {
                    ctx.audit(
                        &audit,
                        "request.breakGlass",
                        &vm.id.to_string(),
                        serde_json::json!({
                            "request": req.id.to_string(),
                            "ports": vm.ports.iter().map(|p| p.number.get()).collect::<Vec<_>>(),
                            "justification": req.justification,
                        }),
                    )?;
                }
            }
            if let Some(k) = &args.idempotency_key {
                ctx.tx.defer(
                    "INSERT INTO idempotency(requestor, key, request_id, created_ns) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(requestor, key) DO UPDATE SET request_id = excluded.request_id, created_ns = excluded.created_ns",
                    &[&req.requestor, k, &req.id.to_string(), &ns(req.start)],
                )?;
            }
            for (i, vm) in req.vms.iter().enumerate() {
                for (j, p) in vm.ports.iter().enumerate() {
                    let (status, reason) = status_cols(p.status);
                    ctx.tx.defer(
                        "INSERT INTO request_ports(request_id, vm_idx, port_idx, vm_key, vm_id, number, protocol, source, end_ns, status, reason, changed)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                        &[
                            &req.id.to_string(),
                            &(i as i64),
                            &(j as i64),
                            &vm.id.key(),
                            &vm.id.to_string(),
                            &i64::from(p.number.get()),
                            &p.protocol.as_str(),
                            &p.source.to_string(),
                            &ns(p.end),
                            &status,
                            &reason,
                            &ctx.change_point(),
                        ],
                    )?;
                }
            }
            for vm in &req.vms {
                let ports: Vec<serde_json::Value> = vm
                    .ports
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "number": p.number.get(),
                            "protocol": p.protocol.as_str(),
                            "source": p.source.to_string(),
                            "endTimeUtc": p.end.to_string(),
                            "status": p.status.status_str(),
                        })
                    })
                    .collect();
                ctx.audit(
                    &audit,
                    "request.initiate",
                    &vm.id.to_string(),
                    serde_json::json!({
                        "request": req.id.to_string(),
                        "policy": policy.key.id(),
                        "ports": ports,
                        "justification": req.justification,
                        "approvalRule": req.approval.as_ref().map(|a| a.snapshot.rule.clone()),
                    }),
                )?;
            }
            Ok(plan.request)
        })
        .await
    }

    async fn policy_requests(&self, key: &PolicyKey, limit: usize) -> Result<Vec<AccessRequest>> {
        let key = key.key();
        self.read(move |c| {
            let ids = ids_of(
                c,
                "SELECT r.id FROM requests r JOIN policies p ON p.uid = r.policy_uid
                 WHERE p.key = ?1 ORDER BY r.start_ns DESC, r.rowid DESC LIMIT ?2",
                &[&key, &(limit as i64)],
            )?;
            load_requests(c, &ids)
        })
        .await
    }

    async fn get_request(&self, id: RequestId) -> Result<Option<AccessRequest>> {
        self.read(move |c| Ok(load_requests(c, &[id.to_string()])?.into_iter().next()))
            .await
    }

    async fn list_requests(&self, filter: &RequestFilter) -> Result<Vec<AccessRequest>> {
        let vm = filter.vm.as_ref().map(|v| v.key());
        let requestor = filter.requestor.clone();
        let live = filter.live_at.map(ns);
        let limit = if filter.limit == 0 { 100 } else { filter.limit } as i64;
        let before_ns = filter.after.as_ref().map(|c| ns(c.at));
        let before_id = filter.after.as_ref().map(|c| c.id.clone());
        let pending = filter.pending;
        // Pending: only requests whose wait is open (`open_until_ns` set), then those
        // with a port still pending (an expired wait not yet ended by the expiry task
        // is still listed, as still pending).
        let open = if pending { Some(0i64) } else { None };
        self.read(move |c| {
            let ids = ids_of(
                c,
                "SELECT r.id FROM requests r
                 WHERE (CAST(?7 AS BIGINT) IS NULL OR r.open_until_ns IS NOT NULL)
                   AND (CAST(?1 AS TEXT) IS NULL OR r.requestor = ?1)
                   AND (CAST(?2 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM request_ports p WHERE p.request_id = r.id AND p.vm_key = ?2))
                   AND (CAST(?3 AS BIGINT) IS NULL OR EXISTS (SELECT 1 FROM request_ports p WHERE p.request_id = r.id
                                              AND p.status = 'Initiated' AND p.end_ns > ?3))
                   AND (CAST(?5 AS BIGINT) IS NULL OR r.start_ns < ?5 OR (r.start_ns = ?5 AND r.id < ?6))
                 ORDER BY r.start_ns DESC, r.id DESC LIMIT ?4",
                &[&requestor, &vm, &live, &limit, &before_ns, &before_id, &open],
            )?;
            let ids = if pending {
                let mut kept = Vec::with_capacity(ids.len());
                for id in ids {
                    if c.exists(
                        "SELECT 1 FROM request_ports WHERE request_id = ?1 AND status = 'Pending'",
                        &[&id],
                    )? {
                        kept.push(id);
                    }
                }
                kept
            } else {
                ids
            };
            load_requests(c, &ids)
        })
        .await
    }

    async fn revoke_request(
        &self,
        id: RequestId,
        only: Option<PortSelector>,
        audit: AuditCtx,
    ) -> Result<Vec<RevokedPort>, OpError<RevokeError>> {
        self.write(move |ctx| {
            let exists = ctx
                .tx
                .exists("SELECT 1 FROM requests WHERE id = ?1", &[&id.to_string()])?;
            if !exists {
                return Err(OpError::Refused(RevokeError::NotFound));
            }
            let vm = only.as_ref().and_then(|o| o.vm.as_ref()).map(|v| v.key());
            let number = only.as_ref().and_then(|o| o.number).map(|p| p.get() as i64);
            let revoked = revoke_where(
                ctx,
                &audit,
                RevokeReason::UserRequested,
                "request_id = ?1 AND end_ns > ?2 AND (CAST(?3 AS TEXT) IS NULL OR vm_key = ?3) AND (CAST(?4 AS BIGINT) IS NULL OR number = ?4)",
                &[&id.to_string(), &ns(audit.now), &vm, &number],
            )?;
            if revoked.is_empty() {
                return Err(OpError::Refused(RevokeError::NothingLive));
            }
            Ok(revoked)
        })
        .await
    }

    async fn expire_due(&self, now: Timestamp) -> Result<Vec<RevokedPort>> {
        // The kernel has already closed these ports: the record follows, whatever the
        // load.
        self.write_plain_when(WhenFull::Wait, move |ctx| {
            let audit = AuditCtx {
                actor: "system".into(),
                source: "controller".into(),
                now,
            };
            // Idempotency keys are remembered for their window, no longer.
            ctx.tx.defer(
                "DELETE FROM idempotency WHERE created_ns <= ?1",
                &[&idempotency_cutoff(now)],
            )?;
            approvals::expire_pending(ctx, &audit)?;
            revoke_where(
                ctx,
                &audit,
                RevokeReason::Expired,
                "end_ns <= ?1",
                &[&ns(now)],
            )
        })
        .await
    }

    async fn next_expiry(&self) -> Result<Option<Timestamp>> {
        self.read(|c| {
            let n: Option<i64> = c.row(
                "SELECT MIN(end_ns) FROM request_ports WHERE status = 'Initiated'",
                &[],
                |r| r.get(0),
            )?;
            let grants = n.map(from_ns).transpose()?;
            // A wait for approval ends on time too.
            Ok(match (grants, approvals::next_pending_end(c)?) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
        })
        .await
    }

    async fn live_grants(&self, vm: &VmId, now: Timestamp) -> Result<Vec<Grant>> {
        let vm = vm.key();
        self.read(move |c| read_live_grants(c, &vm, now)).await
    }

    async fn grant_changes(&self, vm: &VmId, after: u64, now: Timestamp) -> Result<GrantChanges> {
        let vm = vm.key();
        // The changes since a state kept in memory are a few rows by index, on the
        // path from commit to agent.
        if after > 0 {
            return self
                .read_small(move |c| in_snapshot(c, |c| read_grant_changes(c, &vm, after, now)))
                .await;
        }
        // One snapshot: the rows and the point they run up to.
        self.read(move |c| in_snapshot(c, |c| read_grant_changes(c, &vm, after, now)))
            .await
    }

    async fn count_live_grants(&self, now: Timestamp) -> Result<u64> {
        self.read(move |c| {
            let n: i64 = c.row(
                "SELECT COUNT(*) FROM request_ports WHERE status = 'Initiated' AND end_ns > ?1",
                &[&ns(now)],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn create_token(&self, token: TokenRecord, audit: AuditCtx) -> Result<()> {
        self.write_plain(move |ctx| {
            insert_token(ctx.tx, &token)?;
            ctx.audit(
                &audit,
                "token.create",
                &token.principal,
                serde_json::json!({"token": token.id, "description": token.description, "expires": token.expires.map(|t| t.to_string())}),
            )?;
            Ok(())
        })
        .await
    }

    async fn find_token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let id = id.to_owned();
        self.read(move |c| Ok(read_tokens(c, "WHERE id = ?1", &[&id])?.into_iter().next()))
            .await
    }

    async fn find_token_by_secret_hash(&self, secret_hash: &str) -> Result<Option<TokenRecord>> {
        let h = secret_hash.to_owned();
        self.read(move |c| {
            Ok(read_tokens(c, "WHERE secret_hash = ?1", &[&h])?
                .into_iter()
                .next())
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(|c| read_tokens(c, "ORDER BY created_ns, id", &[]))
            .await
    }

    async fn tokens_page(&self, paging: &Paging) -> Result<Vec<TokenRecord>> {
        let (at, id, limit) = page_bounds(paging);
        self.read(move |c| read_tokens(c, PAGE_BY_CREATED, &[&at, &id, &limit]))
            .await
    }

    async fn revoke_token(&self, id: &str, audit: AuditCtx) -> Result<bool> {
        let id = id.to_owned();
        self.write_plain(move |ctx| revoke_row(ctx, &audit, Revocable::Token, &id))
            .await
    }

    async fn touch_token(&self, id: &str, now: Timestamp) -> Result<()> {
        let id = id.to_owned();
        self.write_plain(move |ctx| {
            ctx.tx.defer(
                "UPDATE tokens SET last_used_ns = ?2 WHERE id = ?1",
                &[&id, &ns(now)],
            )?;
            Ok(())
        })
        .await
    }

    async fn put_approval_rule(
        &self,
        rule: jitgate_core::approval::ApprovalRule,
        audit: AuditCtx,
    ) -> Result<bool> {
        self.write_plain(move |ctx| approvals::put_rule(ctx, &rule, &audit))
            .await
    }

    async fn approval_rule(
        &self,
        name: &str,
    ) -> Result<Option<jitgate_core::approval::ApprovalRule>> {
        let name = name.to_owned();
        self.read(move |c| approvals::rule(c, &name)).await
    }

    async fn approval_rules(&self) -> Result<Vec<jitgate_core::approval::ApprovalRule>> {
        self.read(|c| approvals::all_rules(c)).await
    }

    async fn delete_approval_rule(&self, name: &str, audit: AuditCtx) -> Result<bool> {
        let name = name.to_owned();
        self.write_plain(move |ctx| approvals::delete_rule(ctx, &name, &audit))
            .await
    }

    async fn decide_request(
        &self,
        args: DecideArgs,
        audit: AuditCtx,
    ) -> Result<Decided, OpError<DecideRefusal>> {
        self.write(move |ctx| approvals::decide(ctx, &args, &audit))
            .await
    }

    async fn review_break_glass(
        &self,
        request: RequestId,
        who: &str,
        assignments: Vec<RoleAssignment>,
        audit: AuditCtx,
    ) -> Result<AccessRequest, OpError<ReviewRefusal>> {
        let who = who.to_owned();
        self.write(move |ctx| approvals::review(ctx, request, &who, &assignments, &audit))
            .await
    }

    async fn cancel_request(
        &self,
        request: RequestId,
        who: &str,
        audit: AuditCtx,
    ) -> Result<AccessRequest, OpError<CancelRefusal>> {
        let who = who.to_owned();
        self.write(move |ctx| approvals::cancel(ctx, request, &who, &audit))
            .await
    }

    async fn put_webhook(&self, hook: WebhookRecord, audit: AuditCtx) -> Result<bool> {
        self.write_plain(move |ctx| webhooks::put(ctx, &hook, &audit))
            .await
    }

    async fn webhook(&self, name: &str) -> Result<Option<WebhookRecord>> {
        let name = name.to_owned();
        self.read(move |c| webhooks::one(c, &name)).await
    }

    async fn webhooks(&self) -> Result<Vec<WebhookRecord>> {
        self.read(|c| webhooks::all(c)).await
    }

    async fn delete_webhook(&self, name: &str, audit: AuditCtx) -> Result<bool> {
        let name = name.to_owned();
        self.write_plain(move |ctx| webhooks::delete(ctx, &name, &audit))
            .await
    }

    async fn webhook_counts(&self, name: &str) -> Result<(u64, u64, u64)> {
        let name = name.to_owned();
        self.read(move |c| webhooks::counts(c, &name)).await
    }

    async fn claim_deliveries(
        &self,
        now: Timestamp,
        lease: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        self.write_plain_when(WhenFull::Wait, move |ctx| {
            webhooks::claim(ctx, now, lease, limit)
        })
        .await
    }

    async fn finish_delivery(
        &self,
        msg_id: &str,
        claimed_until: Timestamp,
        result: DeliveryResult,
        now: Timestamp,
    ) -> Result<()> {
        let msg_id = msg_id.to_owned();
        self.write_plain_when(WhenFull::Wait, move |ctx| {
            webhooks::finish(ctx, &msg_id, claimed_until, &result, now)
        })
        .await
    }

    async fn start_signin(
        &self,
        s: SigninRecord,
        max_open: usize,
        max_per_source: usize,
    ) -> Result<bool> {
        self.write_plain(move |ctx| {
            ctx.tx.execute("DELETE FROM signins WHERE expires_ns <= ?1", &[&ns(s.created)])?;
            let device = i64::from(s.user_code.is_some());
            let open: i64 = ctx.tx.row(
                "SELECT COUNT(*) FROM signins WHERE (user_code IS NOT NULL) = (?1 = 1)",
                &[&device],
                |r| r.get(0),
            )?;
            if open >= i64::try_from(max_open).unwrap_or(i64::MAX) {
                return Ok(false);
            }
            if device == 1 {
                let mine: i64 = ctx.tx.row(
                    "SELECT COUNT(*) FROM signins WHERE user_code IS NOT NULL AND source = ?1",
                    &[&s.source],
                    |r| r.get(0),
                )?;
                if mine >= i64::try_from(max_per_source).unwrap_or(i64::MAX) {
                    return Ok(false);
                }
            }
            let (status, principal, identity) = signin_columns(&s.status);
            ctx.tx.execute(
                "INSERT INTO signins(id, user_code, challenge, source, status, principal, identity, created_ns, expires_ns, polled_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                &[&s.id, &s.user_code, &s.challenge, &s.source, &status, &principal, &identity, &ns(s.created), &ns(s.expires), &s.polled.map(ns)],
            )?;
            Ok(true)
        })
        .await
    }

    async fn signin_by_user_code(
        &self,
        user_code: &str,
        now: Timestamp,
    ) -> Result<Option<SigninRecord>> {
        let code = user_code.to_owned();
        self.read(move |c| {
            Ok(read_signins(
                c,
                "WHERE user_code = ?1 AND expires_ns > ?2",
                &[&code, &ns(now)],
            )?
            .into_iter()
            .next())
        })
        .await
    }

    async fn decide_signin(
        &self,
        user_code: &str,
        decision: SigninStatus,
        audit: AuditCtx,
    ) -> Result<bool> {
        let code = user_code.to_owned();
        self.write_plain(move |ctx| {
            let (status, principal, identity) = signin_columns(&decision);
            if status == "pending" {
                return Ok(false);
            }
            let n = ctx.tx.execute(
                "UPDATE signins SET status = ?2, principal = ?3, identity = ?4
                 WHERE user_code = ?1 AND status = 'pending' AND expires_ns > ?5",
                &[&code, &status, &principal, &identity, &ns(audit.now)],
            )?;
            if n > 0 {
                let action = if status == "approved" {
                    "auth.device.approve"
                } else {
                    "auth.device.deny"
                };
                ctx.audit(&audit, action, &code, serde_json::json!({}))?;
            }
            Ok(n > 0)
        })
        .await
    }

    async fn take_signin(&self, id: &str, now: Timestamp) -> Result<Option<SigninRecord>> {
        let id = id.to_owned();
        // An unknown code (a guess) costs a read, not a write under the lock.
        let known = id.clone();
        if !self
            .read(move |c| c.exists("SELECT 1 FROM signins WHERE id = ?1", &[&known]))
            .await?
        {
            return Ok(None);
        }
        self.write_plain(move |ctx| {
            let Some(s) = read_signins(ctx.tx, "WHERE id = ?1", &[&id])?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            if s.status == SigninStatus::Pending && s.expires > now {
                ctx.tx.execute(
                    "UPDATE signins SET polled_ns = ?2 WHERE id = ?1",
                    &[&id, &ns(now)],
                )?;
            } else {
                ctx.tx
                    .execute("DELETE FROM signins WHERE id = ?1", &[&id])?;
            }
            Ok(Some(s))
        })
        .await
    }

    async fn add_role_assignment(&self, ra: RoleAssignmentRecord, audit: AuditCtx) -> Result<()> {
        self.write_plain(move |ctx| {
            insert_role_assignment(ctx.tx, &ra)?;
            ctx.audit(
                &audit,
                "roleAssignment.create",
                &ra.assignment.scope.to_string(),
                serde_json::json!({
                    "id": ra.id,
                    "principal": ra.assignment.principal,
                    "role": ra.assignment.role.as_str(),
                }),
            )?;
            Ok(())
        })
        .await
    }

    async fn role_assignments(&self, principal: Option<&str>) -> Result<Vec<RoleAssignmentRecord>> {
        let principal = principal.map(str::to_owned);
        self.read(move |c| {
            read_role_assignments(
                c,
                "WHERE CAST(?1 AS TEXT) IS NULL OR principal = ?1 ORDER BY created_ns, id",
                &[&principal],
            )
        })
        .await
    }

    async fn role_assignments_page(
        &self,
        principal: Option<&str>,
        paging: &Paging,
    ) -> Result<Vec<RoleAssignmentRecord>> {
        let principal = principal.map(str::to_owned);
        let (at, id, limit) = page_bounds(paging);
        self.read(move |c| {
            read_role_assignments(
                c,
                "WHERE (CAST(?1 AS TEXT) IS NULL OR principal = ?1)
                   AND (CAST(?2 AS BIGINT) IS NULL OR created_ns > ?2 OR (created_ns = ?2 AND id > ?3))
                 ORDER BY created_ns, id LIMIT ?4",
                &[&principal, &at, &id, &limit],
            )
        })
        .await
    }

    async fn remove_role_assignment(&self, id: &str, audit: AuditCtx) -> Result<bool> {
        let id = id.to_owned();
        self.write_plain(move |ctx| {
            let row: Option<(String, String, String)> = ctx.tx.one(
                "SELECT principal, role, scope FROM role_assignments WHERE id = ?1",
                &[&id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let Some((principal, role, scope)) = row else {
                return Ok(false);
            };
            ctx.tx
                .defer("DELETE FROM role_assignments WHERE id = ?1", &[&id])?;
            ctx.audit(
                &audit,
                "roleAssignment.delete",
                &scope,
                serde_json::json!({"id": id, "principal": principal, "role": role}),
            )?;
            Ok(true)
        })
        .await
    }

    async fn put_nsg_rule(
        &self,
        vm: &VmId,
        rule: NsgRule,
        audit: AuditCtx,
    ) -> Result<bool, OpError<NsgRuleError>> {
        let vm = vm.clone();
        self.write(move |ctx| {
            let known = ctx
                .tx
                .exists("SELECT 1 FROM vms WHERE key = ?1", &[&vm.key()])?;
            if !known {
                return Err(OpError::Refused(NsgRuleError::UnknownVm));
            }
            let taken: Option<String> = ctx
                .tx
                .one("SELECT name FROM nsg_rules WHERE vm_key = ?1 AND priority = ?2 AND name != ?3", &[&vm.key(), &(rule.priority as i64), &rule.name], |r| r.get(0))?;
            if let Some(other) = taken {
                return Err(OpError::Refused(NsgRuleError::PriorityTaken(other)));
            }
            let sources: Vec<String> = rule.sources.iter().map(|p| p.to_string()).collect();
            let ports: Vec<String> = rule.ports.iter().map(|p| p.to_string()).collect();
            let existed = ctx
                .tx
                .execute("DELETE FROM nsg_rules WHERE vm_key = ?1 AND name = ?2", &[&vm.key(), &rule.name])?
                > 0;
            ctx.tx.defer("INSERT INTO nsg_rules(vm_key, name, priority, access, protocol, sources, ports, description)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)", &[&vm.key(), &rule.name, &(rule.priority as i64), &rule.access.as_str(), &rule.protocol.as_str(), &sources.join(","), &ports.join(","), &rule.description])?;
            ctx.audit(
                &audit,
                if existed { "nsgRule.update" } else { "nsgRule.create" },
                &vm.to_string(),
                serde_json::json!({
                    "name": rule.name,
                    "priority": rule.priority,
                    "access": rule.access.as_str(),
                    "protocol": rule.protocol.as_str(),
                    "sourceAddressPrefixes": sources,
                    "destinationPortRanges": ports,
                }),
            )?;
            refresh_verdicts(ctx, &[vm.key()])?;
            Ok(!existed)
        })
        .await
    }

    async fn delete_nsg_rule(&self, vm: &VmId, name: &str, audit: AuditCtx) -> Result<bool> {
        let (vm, name) = (vm.clone(), name.to_owned());
        self.write_plain(move |ctx| {
            let n = ctx.tx.execute(
                "DELETE FROM nsg_rules WHERE vm_key = ?1 AND name = ?2",
                &[&vm.key(), &name],
            )?;
            if n > 0 {
                ctx.audit(
                    &audit,
                    "nsgRule.delete",
                    &vm.to_string(),
                    serde_json::json!({"name": name}),
                )?;
                refresh_verdicts(ctx, &[vm.key()])?;
            }
            Ok(n > 0)
        })
        .await
    }

    async fn nsg_rules(&self, vm: &VmId) -> Result<Vec<NsgRule>> {
        let vm = vm.key();
        self.read(move |c| {
            let rows = c.all(
                "SELECT name, priority, access, protocol, sources, ports, description, vm_key FROM nsg_rules
                 WHERE vm_key = ?1 ORDER BY priority",
            &[&vm], nsg_row)?;
            rows.into_iter()
                .map(|row| decode_nsg_row(row).map(|(_, rule)| rule))
                .collect()
        })
        .await
    }

    async fn create_enroll_token(
        &self,
        token: EnrollTokenRecord,
        install: Option<InstallCodeRecord>,
        audit: AuditCtx,
    ) -> Result<()> {
        self.write_plain(move |ctx| {
            ctx.tx.defer("INSERT INTO enroll_tokens(id, secret_hash, scope, expires_ns, uses_left, description, created_ns, created_by, revoked_ns, allow_replace)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)", &[&token.id, &token.secret_hash, &token.scope.to_string(), &ns(token.expires), &(token.uses_left as i64), &token.description, &ns(token.created), &token.created_by, &token.revoked.map(ns), &token.allow_replace])?;
            if let Some(i) = &install {
                ctx.tx.defer(
                    "INSERT INTO install_codes(code_hash, token_id, sealed, expires_ns, uses_left) VALUES (?1, ?2, ?3, ?4, ?5)",
                    &[&i.code_hash, &i.token_id, &i.sealed, &ns(i.expires), &(i.uses_left as i64)],
                )?;
            }
            ctx.audit(
                &audit,
                "enrollToken.create",
                &token.scope.to_string(),
                serde_json::json!({"id": token.id, "uses": token.uses_left, "expires": token.expires.to_string(), "allowReplace": token.allow_replace, "installCode": install.is_some()}),
            )?;
            Ok(())
        })
        .await
    }

    async fn take_install_code(
        &self,
        code_hash: &str,
        audit: AuditCtx,
    ) -> Result<Option<InstallCodeRecord>> {
        let code_hash = code_hash.to_owned();
        // A read first: an unknown code (a guess, a flood) costs no write.
        let found = self
            .read({
                let h = code_hash.clone();
                move |c| read_install_codes(c, "WHERE code_hash = ?1", &[&h])
            })
            .await?;
        if found.is_empty() {
            return Ok(None);
        }
        self.write_plain(move |ctx| {
            let now = ns(audit.now);
            let taken = ctx.tx.execute(
                "UPDATE install_codes SET uses_left = uses_left - 1 WHERE code_hash = ?1 AND uses_left > 0 AND expires_ns > ?2",
                &[&code_hash, &now],
            )?;
            if taken == 0 {
                return Ok(None);
            }
            let Some(rec) = read_install_codes(ctx.tx, "WHERE code_hash = ?1", &[&code_hash])?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            ctx.audit(
                &audit,
                "enrollToken.installCodeUsed",
                &rec.token_id,
                serde_json::json!({"id": rec.token_id}),
            )?;
            Ok(Some(rec))
        })
        .await
    }

    async fn revoke_enroll_token(&self, id: &str, audit: AuditCtx) -> Result<bool> {
        let id = id.to_owned();
        self.write_plain(move |ctx| revoke_row(ctx, &audit, Revocable::EnrollToken, &id))
            .await
    }

    async fn enroll_tokens_page(&self, paging: &Paging) -> Result<Vec<EnrollTokenRecord>> {
        let (at, id, limit) = page_bounds(paging);
        self.read(move |c| read_enroll_tokens(c, PAGE_BY_CREATED, &[&at, &id, &limit]))
            .await
    }

    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        self.read(|c| read_enroll_tokens(c, "ORDER BY created_ns, id", &[]))
            .await
    }

    async fn enroll(
        &self,
        args: EnrollArgs,
        audit: AuditCtx,
    ) -> Result<VmId, OpError<EnrollError>> {
        self.write(move |ctx| {
            let refuse = |e| Err(OpError::Refused(e));
            let Some(t) = read_enroll_tokens(ctx.tx, "WHERE id = ?1", &[&args.token_id])?.into_iter().next() else {
                return refuse(EnrollError::InvalidToken);
            };
            if !constant_time_eq(t.secret_hash.as_bytes(), args.presented_hash.as_bytes()) {
                return refuse(EnrollError::InvalidToken);
            }
            if t.revoked.is_some() {
                return refuse(EnrollError::Revoked);
            }
            if t.expires <= audit.now {
                return refuse(EnrollError::Expired);
            }
            if t.uses_left == 0 {
                return refuse(EnrollError::UsedUp);
            }
            if !t.scope.contains(&args.vm.scope()) {
                return refuse(EnrollError::OutOfScope(t.scope.to_string()));
            }
            if !subscription_exists(ctx.tx, args.vm.subscription)? {
                return refuse(EnrollError::UnknownSubscription);
            }
            let principal = args.agent_token.principal.clone();
            // Taking over a machine whose agent is alive needs a token made for it:
            // otherwise a leaked token would silently replace the real agent and
            // receive every grant's source address.
            let live_agent: Option<i64> = ctx
                .tx
                .one("SELECT s.last_seen_ns FROM agent_status s
                     WHERE s.vm_key = ?1 AND s.last_seen_ns >= ?2
                       AND EXISTS (SELECT 1 FROM tokens t WHERE lower(t.principal) = lower(?3) AND t.revoked_ns IS NULL)", &[&args.vm.key(), &ns(args.online_since), &principal], |r| r.get(0))?;
            if live_agent.is_some() && !t.allow_replace {
                return refuse(EnrollError::AgentOnline);
            }
            let replaced = ctx.tx.exists("SELECT 1 FROM tokens WHERE lower(principal) = lower(?1) AND revoked_ns IS NULL", &[&principal])?;
            ctx.tx.defer("UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE id = ?1", &[&t.id])?;
            let created = ctx.tx.execute("INSERT INTO vms(key, id, subscription, rg_key, location, created_ns, created_by, name_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(key) DO NOTHING", &[&args.vm.key(), &args.vm.to_string(), &args.vm.subscription.to_string(), &args.vm.resource_group.key(), &(args.location.as_ref().map(|l| l.to_string())), &ns(audit.now), &(format!("enroll-token:{}", t.id)), &args.vm.name.key()])? > 0;
            ctx.tx.defer(
                // Case-insensitive: a VM's id may be written in any casing, and a
                // re-enrollment must always replace the previous credential.
                "UPDATE tokens SET revoked_ns = ?2 WHERE lower(principal) = lower(?1) AND revoked_ns IS NULL",
                &[&principal, &ns(audit.now)],
            )?;
            insert_token(ctx.tx, &args.agent_token)?;
            ctx.tx.defer("DELETE FROM role_assignments WHERE lower(principal) = lower(?1)", &[&principal])?;
            insert_role_assignment(
                ctx.tx,
                &RoleAssignmentRecord {
                    id: format!("agent-{}", args.agent_token.id),
                    assignment: RoleAssignment {
                        principal: principal.clone(),
                        role: Role::Agent,
                        scope: args.vm.scope(),
                    },
                    created: audit.now,
                },
            )?;
            ctx.audit(
                &audit,
                "agent.enroll",
                &args.vm.to_string(),
                serde_json::json!({"enrollToken": t.id, "registered": created, "agentToken": args.agent_token.id, "replacedAgent": replaced}),
            )?;
            if created {
                refresh_verdicts(ctx, &[args.vm.key()])?;
            }
            Ok(args.vm)
        })
        .await
    }

    async fn put_agent_status(&self, status: AgentStatusRecord, facts: AgentFacts) -> Result<()> {
        let facts = encode_facts(&facts)?;
        self.write_plain(move |ctx| {
            let key = status.vm.key();
            let row: Option<(Option<String>, Option<i64>)> = ctx.tx.one(
                "SELECT facts, offline_ns FROM agent_status WHERE vm_key = ?1",
                &[&key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let (before, offline) = row.map_or((None, None), |(f, o)| (f, o));
            ctx.tx
                .defer(
                    "INSERT INTO agent_status(vm_key, vm_id, report, last_seen_ns, facts) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(vm_key) DO UPDATE SET vm_id = excluded.vm_id, report = excluded.report,
                       last_seen_ns = excluded.last_seen_ns, facts = excluded.facts, offline_ns = NULL",
                &[&key, &status.vm.to_string(), &status.report, &ns(status.last_seen), &facts])?;
            if let Some(since) = offline {
                ctx.audit(
                    &AuditCtx { actor: "system".into(), source: "controller".into(), now: status.last_seen },
                    "agent.online",
                    &status.vm.to_string(),
                    serde_json::json!({"offlineSince": from_ns(since)?.to_string()}),
                )?;
            }
            if before.as_deref() == Some(facts.as_str()) {
                // A heartbeat with nothing new (the usual report): the verdict stands,
                // only the time it was last confirmed moves.
                ctx.tx
                    .defer("UPDATE vm_verdicts SET last_seen_ns = ?2 WHERE vm_key = ?1", &[&key, &ns(status.last_seen)])?;
            } else {
                refresh_verdicts(ctx, &[key])?;
            }
            Ok(())
        })
        .await
    }

    async fn mark_agents_offline(
        &self,
        seen_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<VmId>> {
        self.write_plain_when(WhenFull::Wait, move |ctx| {
            let gone: Vec<(String, String, i64)> = ctx.tx.all(
                "SELECT vm_key, vm_id, last_seen_ns FROM agent_status
                 WHERE offline_ns IS NULL AND last_seen_ns < ?1 ORDER BY vm_key",
                &[&ns(seen_before)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let audit = AuditCtx {
                actor: "system".into(),
                source: "controller".into(),
                now,
            };
            let mut out = Vec::with_capacity(gone.len());
            for (key, id, last) in gone {
                ctx.tx.defer(
                    "UPDATE agent_status SET offline_ns = ?2 WHERE vm_key = ?1",
                    &[&key, &ns(now)],
                )?;
                ctx.audit(
                    &audit,
                    "agent.offline",
                    &id,
                    serde_json::json!({"lastSeen": from_ns(last)?.to_string()}),
                )?;
                out.push(VmId::parse(&id).map_err(corrupt("vm id"))?);
            }
            Ok(out)
        })
        .await
    }

    async fn agent_status(&self, vm: &VmId) -> Result<Option<AgentStatusRecord>> {
        let vm = vm.key();
        self.read(move |c| {
            c.one(
                "SELECT vm_id, report, last_seen_ns FROM agent_status WHERE vm_key = ?1",
                &[&vm],
                agent_status_row,
            )?
            .map(decode_agent_status)
            .transpose()
        })
        .await
    }

    async fn record_blocked(&self, points: Vec<BlockedPoint>) -> Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        self.write_plain(move |ctx| {
            for p in &points {
                ctx.tx.defer(
                    "INSERT INTO blocked_attempts(vm_key, vm_id, port, protocol, at_ns, count) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    &[&p.vm.key(), &p.vm.to_string(), &i64::from(p.port), &p.protocol, &ns(p.at), &(p.count as i64)],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn prune_blocked(&self, before: Timestamp) -> Result<u64> {
        // In chunks, each its own write: a large backlog never holds the writer (and
        // every caller behind it) for long.
        let mut total = 0u64;
        loop {
            let deleted = self
                .write_plain_when(WhenFull::Wait, move |ctx| {
                    ctx.tx.execute(
                        "DELETE FROM blocked_attempts WHERE rowid IN
                             (SELECT rowid FROM blocked_attempts WHERE at_ns < ?1 LIMIT ?2)",
                        &[&ns(before), &(PRUNE_CHUNK as i64)],
                    )
                })
                .await?;
            total += deleted;
            if deleted < PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    async fn blocked_series(
        &self,
        vm: Option<&VmId>,
        since: Timestamp,
    ) -> Result<Vec<BlockedPoint>> {
        let vm = vm.map(|v| v.key());
        self.read(move |c| {
            let rows = c.all(
                "SELECT vm_id, port, protocol, at_ns, count FROM blocked_attempts
                 WHERE (CAST(?1 AS TEXT) IS NULL OR vm_key = ?1) AND at_ns >= ?2 ORDER BY at_ns, rowid",
                &[&vm, &ns(since)],
                |r| {
                    Ok((
                        r.get::<String>(0)?,
                        r.get::<i64>(1)?,
                        r.get::<String>(2)?,
                        r.get::<i64>(3)?,
                        r.get::<i64>(4)?,
                    ))
                },
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (id, port, protocol, at, count) = row;
                out.push(BlockedPoint {
                    vm: VmId::parse(&id).map_err(corrupt("vm id"))?,
                    port: u16::try_from(port).map_err(corrupt("port"))?,
                    protocol,
                    at: from_ns(at)?,
                    count: count.max(0) as u64,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn add_exclusion(&self, e: ExclusionRecord, audit: AuditCtx) -> Result<()> {
        self.write_plain(move |ctx| {
            ctx.tx.defer("INSERT INTO exclusions(id, scope, reason, created_ns, created_by) VALUES (?1, ?2, ?3, ?4, ?5)", &[&e.id, &e.scope.to_string(), &e.reason, &ns(e.created), &e.created_by])?;
            ctx.audit(
                &audit,
                "exclusion.create",
                &e.scope.to_string(),
                serde_json::json!({"id": e.id, "reason": e.reason}),
            )?;
            refresh_exclusions(ctx, &e.scope)?;
            Ok(())
        })
        .await
    }

    async fn list_exclusions(&self) -> Result<Vec<ExclusionRecord>> {
        self.read(|c| read_exclusions(c, "ORDER BY created_ns, id", &[]))
            .await
    }

    async fn exclusions_page(&self, paging: &Paging) -> Result<Vec<ExclusionRecord>> {
        let (at, id, limit) = page_bounds(paging);
        self.read(move |c| read_exclusions(c, PAGE_BY_CREATED, &[&at, &id, &limit]))
            .await
    }

    async fn recommendations(
        &self,
        subscription: SubscriptionId,
        page: &VerdictPage,
        now: Timestamp,
    ) -> Result<Vec<VmVerdict>> {
        let Some((filter, mut params)) = verdict_scope_sql(self.dialect, subscription, &page.scope)
        else {
            return Ok(Vec::new());
        };
        let recommend = self.recommend.clone();
        let mut sql = format!(
            "SELECT vms.id, v.verdict, v.reason, v.exposed, v.listening, v.last_seen_ns, v.excluded,
                    v.protected
             FROM vm_verdicts v JOIN vms ON vms.key = v.vm_key
             WHERE {filter} AND v.vm_key > ?"
        );
        params.push(Box::new(page.after.clone().unwrap_or_default()));
        if let Some(v) = page.verdict {
            sql.push_str(&format!(" AND {SETTLED_VERDICT} = ?"));
            params.push(Box::new(cutoff_ns(&recommend, now)));
            params.push(Box::new(v.as_str()));
        }
        match page.tab {
            None => {}
            Some(JitTab::Configured) => sql.push_str(&format!(" AND {PROTECTED}")),
            Some(tab) => {
                let op = if tab == JitTab::Unsupported {
                    "="
                } else {
                    "<>"
                };
                sql.push_str(&format!(
                    " AND NOT {PROTECTED} AND {SETTLED_VERDICT} {op} 'NotApplicable'"
                ));
                params.push(Box::new(cutoff_ns(&recommend, now)));
            }
        }
        if let Some(text) = &page.search {
            // The resource group's name or the VM's (the last segment of its key).
            sql.push_str(" AND (v.rg_key LIKE ? ESCAPE '!' OR v.vm_key LIKE ? ESCAPE '!')");
            params.push(Box::new(like_contains("", text)));
            params.push(Box::new(like_contains("%/virtualmachines/", text)));
        }
        sql.push_str(" ORDER BY v.vm_key LIMIT ?");
        params.push(Box::new(page.limit.min(i64::MAX as usize) as i64));
        self.read(move |c| {
            let refs: Vec<&dyn ToParam> =
                params.iter().map(|p| p.as_ref() as &dyn ToParam).collect();
            let rows = c.all(&sql, refs.as_slice(), |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<String>(2)?,
                    r.get::<String>(3)?,
                    r.get::<String>(4)?,
                    r.get::<Option<i64>>(5)?,
                    r.get::<Option<String>>(6)?,
                    r.get::<bool>(7)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, verdict, reason, exposed, listening, seen, excluded, protected) = row;
                let reported = Recommendation {
                    verdict: Verdict::parse(&verdict)
                        .ok_or_else(|| StoreError::Corrupt(format!("verdict {verdict}")))?,
                    reason,
                    exposed: ports_from_text(&exposed)?,
                    listening_management: ports_from_text(&listening)?,
                };
                let seen = seen.map(from_ns).transpose()?;
                out.push(VmVerdict {
                    vm: VmId::parse(&id).map_err(corrupt("vm id"))?,
                    recommendation: settle(reported, excluded.as_deref(), seen, &recommend, now),
                    protected,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn verdict_counts(
        &self,
        subscription: SubscriptionId,
        scope: &VerdictScope,
        now: Timestamp,
    ) -> Result<VerdictCounts> {
        let Some((filter, mut params)) = verdict_scope_sql(self.dialect, subscription, scope)
        else {
            return Ok(VerdictCounts::default());
        };
        // The settled verdict's parameter comes first in the statement.
        params.insert(0, Box::new(cutoff_ns(&self.recommend, now)));
        let sql = format!(
            "SELECT {SETTLED_VERDICT} AS settled, count(*) FROM vm_verdicts v WHERE {filter} GROUP BY settled"
        );
        self.read(move |c| {
            let refs: Vec<&dyn ToParam> =
                params.iter().map(|p| p.as_ref() as &dyn ToParam).collect();
            let mut counts = VerdictCounts::default();
            for (verdict, n) in c.all(&sql, refs.as_slice(), |r| {
                Ok((r.get::<String>(0)?, r.get::<i64>(1)?))
            })? {
                let v = Verdict::parse(&verdict)
                    .ok_or_else(|| StoreError::Corrupt(format!("verdict {verdict}")))?;
                counts.add(v, n.max(0) as u64);
            }
            Ok(counts)
        })
        .await
    }

    async fn tab_counts(
        &self,
        subscription: SubscriptionId,
        scope: &VerdictScope,
        now: Timestamp,
    ) -> Result<TabCounts> {
        let Some((filter, mut params)) = verdict_scope_sql(self.dialect, subscription, scope)
        else {
            return Ok(TabCounts::default());
        };
        // The settled verdict's and the offline test's parameters come first.
        let cutoff = cutoff_ns(&self.recommend, now);
        params.insert(0, Box::new(cutoff));
        params.insert(1, Box::new(cutoff));
        let sql = format!(
            "SELECT CASE WHEN {PROTECTED} THEN 'c' WHEN {SETTLED_VERDICT} = 'NotApplicable' THEN 'u' ELSE 'n' END AS tab,
                    count(*),
                    SUM(CASE WHEN v.excluded IS NULL AND v.last_seen_ns < ? THEN 1 ELSE 0 END),
                    SUM(CASE WHEN v.reason LIKE 'enforcement drift%' THEN 1 ELSE 0 END)
             FROM vm_verdicts v WHERE {filter} GROUP BY tab"
        );
        self.read(move |c| {
            let refs: Vec<&dyn ToParam> =
                params.iter().map(|p| p.as_ref() as &dyn ToParam).collect();
            let mut counts = TabCounts::default();
            for (tab, n, offline, drift) in c.all(&sql, refs.as_slice(), |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<i64>(1)?,
                    r.get::<i64>(2)?,
                    r.get::<i64>(3)?,
                ))
            })? {
                let n = n.max(0) as u64;
                match tab.as_str() {
                    "c" => counts.configured += n,
                    "u" => counts.unsupported += n,
                    _ => counts.not_configured += n,
                }
                counts.agents_offline += offline.max(0) as u64;
                counts.drift += drift.max(0) as u64;
            }
            Ok(counts)
        })
        .await
    }

    async fn remove_exclusion(&self, id: &str, audit: AuditCtx) -> Result<bool> {
        let id = id.to_owned();
        self.write_plain(move |ctx| {
            let scope: Option<String> =
                ctx.tx
                    .one("SELECT scope FROM exclusions WHERE id = ?1", &[&id], |r| {
                        r.get(0)
                    })?;
            let Some(scope) = scope else { return Ok(false) };
            ctx.tx
                .defer("DELETE FROM exclusions WHERE id = ?1", &[&id])?;
            ctx.audit(
                &audit,
                "exclusion.delete",
                &scope,
                serde_json::json!({"id": id}),
            )?;
            refresh_exclusions(ctx, &Scope::parse(&scope).map_err(corrupt("scope"))?)?;
            Ok(true)
        })
        .await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64> {
        // What it records (a refused call, a drift) has happened: it waits for room
        // rather than being lost to a full queue.
        self.write_plain_when(WhenFull::Wait, move |ctx| ctx.append(entry))
            .await
    }

    async fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        // Matched literally (not with LIKE, where `_` and `%` in the text would be
        // wildcards): a substring of the lower-cased target, a prefix of the action.
        let target = q.target.as_ref().map(|t| t.to_ascii_lowercase());
        let actor = q.actor.clone();
        let action = q.action.clone();
        let since = q.since.map(ns);
        let until = q.until.map(ns);
        let after = q.after_seq.map(|s| s as i64);
        let limit = if q.limit == 0 { 1000 } else { q.limit } as i64;
        self.read(move |c| {
            read_audit(
                c,
                "WHERE (CAST(?1 AS TEXT) IS NULL OR instr(lower(target), ?1) > 0) AND (CAST(?2 AS TEXT) IS NULL OR actor = ?2)
                   AND (CAST(?3 AS TEXT) IS NULL OR substr(action, 1, length(?3)) = ?3) AND (CAST(?4 AS BIGINT) IS NULL OR time_ns >= ?4)
                   AND (CAST(?5 AS BIGINT) IS NULL OR time_ns <= ?5) AND (CAST(?6 AS BIGINT) IS NULL OR seq > ?6)
                 ORDER BY seq LIMIT ?7",
                &[&target, &actor, &action, &since, &until, &after, &limit],
            )
        })
        .await
    }

    async fn verify_audit(&self, anchors: Option<AnchorSet>) -> Result<VerifyReport> {
        self.read(move |c| verify_connection(c, anchors.as_ref()))
            .await
    }

    async fn verify_audit_from(&self, anchor: AnchorSet) -> Result<VerifyReport> {
        self.read(move |c| {
            let newest = anchor
                .anchors()
                .checkpoints
                .iter()
                .map(|c| c.seq)
                .max()
                .unwrap_or(0);
            // From the newest accepted break that the checkpoint covers: what came
            // before it was already found broken and the break accepted (and audited).
            let from: Option<i64> = c.row(
                "SELECT max(seq) FROM audit WHERE action = 'audit.break_accepted' AND seq <= ?1",
                &[&(newest as i64)],
                |r| r.get(0),
            )?;
            let (mut report, edited) =
                stream_audit(c, from.unwrap_or(0).max(0) as u64, |records, head| {
                    audit::verify_range(records, head, Some(anchor.anchors()))
                })?;
            report.problems.extend(edited);
            Ok(report)
        })
        .await
    }

    fn shared_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.changes.as_ref().map(pg::Changes::subscribe)
    }

    fn write_queue(&self) -> Option<WriteQueueStats> {
        let depth = self
            .writer
            .lock()
            .ok()?
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity());
        Some(WriteQueueStats {
            depth,
            capacity: self.write_queue,
            refused: self.refused_writes.load(Ordering::Relaxed),
        })
    }

    async fn audit_tail(&self) -> Result<(u64, String)> {
        self.read(|c| {
            let t = load_tail(c)?;
            Ok((t.seq, t.hash))
        })
        .await
    }
}

/// Hands the events from `from` on, in sequence order, to `walk` as an iterator that
/// reads them a chunk at a time (memory does not grow with the chain), together with
/// the recorded head; returns what `walk` returned and the events whose time index
/// disagrees with their hashed time. Rows and head are read in one snapshot, so an
/// event appended during a long walk cannot look like a truncation.
fn stream_audit<T>(
    c: &dyn Db,
    from: u64,
    walk: impl FnOnce(&mut dyn Iterator<Item = AuditRecord>, Option<u64>) -> T,
) -> Result<(T, Vec<audit::Problem>)> {
    in_snapshot(c, |c| stream_audit_in(c, from, walk))
}

/// Runs the reads of `f` in one read-only snapshot of the database.
fn in_snapshot<T>(c: &dyn Db, f: impl FnOnce(&dyn Db) -> Result<T>) -> Result<T> {
    c.batch(match c.dialect() {
        Dialect::Sqlite => "BEGIN",
        Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    })?;
    // Read only: a rollback after an error leaves the same as a commit.
    c.end(f(c))
}

fn stream_audit_in<T>(
    c: &dyn Db,
    from: u64,
    walk: impl FnOnce(&mut dyn Iterator<Item = AuditRecord>, Option<u64>) -> T,
) -> Result<(T, Vec<audit::Problem>)> {
    const CHUNK: i64 = 2000;
    let head = recorded_head(c)?;
    let mut next = from.min(i64::MAX as u64) as i64;
    let mut chunk = std::collections::VecDeque::new();
    let mut done = false;
    let mut failed: Option<StoreError> = None;
    let mut edited = Vec::new();
    let mut records = std::iter::from_fn(|| {
        if chunk.is_empty() && !done {
            match read_audit_rows(c, "WHERE seq >= ?1 ORDER BY seq LIMIT ?2", &[&next, &CHUNK]) {
                Ok(rows) => {
                    done = (rows.len() as i64) < CHUNK;
                    if let Some((last, _)) = rows.last() {
                        next = last.seq as i64 + 1;
                    }
                    chunk.extend(rows);
                }
                Err(e) => {
                    failed = Some(e);
                    return None;
                }
            }
        }
        let (record, time_ns) = chunk.pop_front()?;
        if record.entry.time.parse::<Timestamp>().map(ns).ok() != Some(time_ns) {
            edited.push(audit::Problem::TimeEdited { seq: record.seq });
        }
        Some(record)
    });
    let out = walk(&mut records, head);
    // A read error ends the walk early: it must not pass for the chain's end.
    if let Some(e) = failed {
        return Err(e);
    }
    Ok((out, edited))
}

fn recorded_head(c: &dyn Db) -> Result<Option<u64>> {
    let head: Option<String> = c.one(
        "SELECT value FROM meta WHERE key = 'audit_head'",
        &[],
        |r| r.get(0),
    )?;
    Ok(head.and_then(|h| h.parse::<u64>().ok()))
}

/// Verifies the audit chain of an open database (used by the store and by
/// `jitgate audit verify --data-dir`, which needs no running controller): the links
/// and hashes, the recorded head, the signed checkpoints when given, and that every
/// event's time index (`time_ns`, which queries use) is its hashed time.
pub fn verify_connection(c: &dyn Db, anchors: Option<&AnchorSet>) -> Result<VerifyReport> {
    let (mut report, edited) = stream_audit(c, 0, |records, head| {
        audit::verify(records, head, anchors.map(AnchorSet::anchors))
    })?;
    report.problems.extend(edited);
    Ok(report)
}

fn read_audit(c: &dyn Db, tail: &str, params: &[&dyn ToParam]) -> Result<Vec<AuditRecord>> {
    Ok(read_audit_rows(c, tail, params)?
        .into_iter()
        .map(|(r, _)| r)
        .collect())
}

/// The columns `audit_row` reads.
const AUDIT_COLS: &str =
    "seq, time, actor, source, action, target, outcome, details, prev_hash, hash, time_ns";

/// Audit records with their stored time index (`time_ns`, which verification checks
/// against the hashed time), in one pass.
fn read_audit_rows(
    c: &dyn Db,
    tail: &str,
    params: &[&dyn ToParam],
) -> Result<Vec<(AuditRecord, i64)>> {
    let rows = c.all(
        &format!("SELECT {AUDIT_COLS} FROM audit {tail}"),
        params,
        audit_row,
    )?;
    Ok(rows)
}

/// One row of `SELECT {AUDIT_COLS}`: the record and its stored time index.
fn audit_row(r: &mut Row) -> Result<(AuditRecord, i64)> {
    let outcome: String = r.get(6)?;
    Ok((
        AuditRecord {
            seq: r.get::<i64>(0)? as u64,
            entry: AuditEntry {
                time: r.get(1)?,
                actor: r.get(2)?,
                source: r.get(3)?,
                action: r.get(4)?,
                target: r.get(5)?,
                // An unknown outcome string is tampering; keep the record so the
                // hash check reports it as modified.
                outcome: Outcome::parse(&outcome).unwrap_or(Outcome::Failed),
                details: r.get(7)?,
            },
            prev_hash: r.get(8)?,
            hash: r.get(9)?,
        },
        r.get(10)?,
    ))
}

/// An `agent_status` row: vm_id, report, last_seen_ns.
fn agent_status_row(r: &mut Row) -> Result<(String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn decode_agent_status((id, report, seen): (String, String, i64)) -> Result<AgentStatusRecord> {
    Ok(AgentStatusRecord {
        vm: VmId::parse(&id).map_err(corrupt("vm id"))?,
        report,
        last_seen: from_ns(seen)?,
    })
}

/// A `nsg_rules` row: name, priority, access, protocol, sources, ports, description,
/// vm_key.
type NsgRow = (String, i64, String, String, String, String, String, String);

fn nsg_row(r: &mut Row) -> Result<NsgRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

/// (vm key, rule) of a `nsg_rules` row.
fn decode_nsg_row(row: NsgRow) -> Result<(String, NsgRule)> {
    let (name, priority, access, protocol, sources, ports, description, vm_key) = row;
    Ok((
        vm_key,
        NsgRule {
            name,
            priority: u16::try_from(priority).map_err(corrupt("priority"))?,
            access: match access.as_str() {
                "Allow" => Access::Allow,
                "Deny" => Access::Deny,
                other => return Err(StoreError::Corrupt(format!("access {other}"))),
            },
            protocol: Protocol::parse(&protocol).map_err(corrupt("protocol"))?,
            sources: sources
                .split(',')
                .map(SourcePrefix::parse)
                .collect::<std::result::Result<_, _>>()
                .map_err(corrupt("sources"))?,
            ports: ports
                .split(',')
                .map(parse_port_range)
                .collect::<std::result::Result<_, _>>()
                .map_err(corrupt("ports"))?,
            description,
            origin: RuleOrigin::User,
        },
    ))
}

fn read_vms(c: &dyn Db, tail: &str, params: &[&dyn ToParam]) -> Result<Vec<VmRecord>> {
    c.all(
        &format!("SELECT id, location, created_ns, created_by FROM vms {tail}"),
        params,
        |r| {
            Ok(VmRecord {
                id: VmId::parse(&r.get::<String>(0)?).map_err(corrupt("vm id"))?,
                location: r
                    .get::<Option<String>>(1)?
                    .map(|l| Location::parse(&l))
                    .transpose()
                    .map_err(corrupt("location"))?,
                created: from_ns(r.get(2)?)?,
                created_by: r.get(3)?,
            })
        },
    )
}

fn read_role_assignments(
    c: &dyn Db,
    tail: &str,
    params: &[&dyn ToParam],
) -> Result<Vec<RoleAssignmentRecord>> {
    c.all(
        &format!("SELECT id, principal, role, scope, created_ns FROM role_assignments {tail}"),
        params,
        |r| {
            Ok(RoleAssignmentRecord {
                id: r.get(0)?,
                assignment: RoleAssignment {
                    principal: r.get(1)?,
                    role: Role::parse(&r.get::<String>(2)?).map_err(corrupt("role"))?,
                    scope: Scope::parse(&r.get::<String>(3)?).map_err(corrupt("scope"))?,
                },
                created: from_ns(r.get(4)?)?,
            })
        },
    )
}

fn read_exclusions(
    c: &dyn Db,
    tail: &str,
    params: &[&dyn ToParam],
) -> Result<Vec<ExclusionRecord>> {
    c.all(
        &format!("SELECT id, scope, reason, created_ns, created_by FROM exclusions {tail}"),
        params,
        |r| {
            Ok(ExclusionRecord {
                id: r.get(0)?,
                scope: Scope::parse(&r.get::<String>(1)?).map_err(corrupt("scope"))?,
                reason: r.get(2)?,
                created: from_ns(r.get(3)?)?,
                created_by: r.get(4)?,
            })
        },
    )
}

fn read_tokens(c: &dyn Db, tail: &str, params: &[&dyn ToParam]) -> Result<Vec<TokenRecord>> {
    c.all(&format!(
        "SELECT id, principal, secret_hash, description, created_ns, expires_ns, revoked_ns, identity, last_used_ns FROM tokens {tail}"
    ), params, |r| {
        Ok(TokenRecord {
            id: r.get(0)?,
            principal: r.get(1)?,
            secret_hash: r.get(2)?,
            description: r.get(3)?,
            created: from_ns(r.get(4)?)?,
            expires: r.get::<Option<i64>>(5)?.map(from_ns).transpose()?,
            revoked: r.get::<Option<i64>>(6)?.map(from_ns).transpose()?,
            identity: r.get(7)?,
            last_used: r.get::<Option<i64>>(8)?.map(from_ns).transpose()?,
        })
    })
}

fn read_signins(c: &dyn Db, tail: &str, params: &[&dyn ToParam]) -> Result<Vec<SigninRecord>> {
    c.all(&format!(
        "SELECT id, user_code, challenge, source, status, principal, identity, created_ns, expires_ns, polled_ns FROM signins {tail}"
    ), params, |r| {
        let principal = r.get::<Option<String>>(5)?;
        let identity = r.get::<Option<String>>(6)?;
        let status = match (r.get::<String>(4)?.as_str(), principal, identity) {
            ("pending", _, _) => SigninStatus::Pending,
            ("approved", Some(principal), Some(identity)) => SigninStatus::Approved { principal, identity },
            ("denied", Some(principal), _) => SigninStatus::Denied { principal },
            (other, ..) => return Err(StoreError::Corrupt(format!("a sign-in has status {other:?} without who decided"))),
        };
        Ok(SigninRecord {
            id: r.get(0)?,
            user_code: r.get(1)?,
            challenge: r.get(2)?,
            source: r.get(3)?,
            status,
            created: from_ns(r.get(7)?)?,
            expires: from_ns(r.get(8)?)?,
            polled: r.get::<Option<i64>>(9)?.map(from_ns).transpose()?,
        })
    })
}

/// A sign-in's status as stored: (status, principal, identity).
fn signin_columns(s: &SigninStatus) -> (&'static str, Option<&str>, Option<&str>) {
    match s {
        SigninStatus::Pending => ("pending", None, None),
        SigninStatus::Approved {
            principal,
            identity,
        } => ("approved", Some(principal), Some(identity)),
        SigninStatus::Denied { principal } => ("denied", Some(principal), None),
    }
}

/// Compares two byte strings in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The live grants (status `Initiated`, ending after `now`) on the VM with key
/// `vm_key`, oldest request first (`live_grants`, initiate's superseding and a
/// policy update's judgement all read them here).
/// A grant from a row whose first columns are request id, requestor, number,
/// protocol, source, start and end.
fn grant_row(r: &mut Row) -> Result<Grant> {
    Ok(Grant {
        request: RequestId::parse(&r.get::<String>(0)?).map_err(corrupt("request id"))?,
        requestor: r.get(1)?,
        number: Port::new(r.get(2)?).map_err(corrupt("port"))?,
        protocol: Protocol::parse(&r.get::<String>(3)?).map_err(corrupt("protocol"))?,
        source: SourcePrefix::parse(&r.get::<String>(4)?).map_err(corrupt("source"))?,
        start: from_ns(r.get(5)?)?,
        end: from_ns(r.get(6)?)?,
    })
}

/// See [`Store::grant_changes`].
fn read_grant_changes(
    c: &dyn Db,
    vm_key: &str,
    after: u64,
    now: Timestamp,
) -> Result<GrantChanges> {
    let after = after.min(i64::MAX as u64) as i64;
    let upto: i64 = c.row(
        "SELECT COALESCE(MAX(changed), 0) FROM request_ports WHERE vm_key = ?1",
        &[&vm_key],
        |r| r.get(0),
    )?;
    let rows = if after == 0 {
        read_live_grants(c, vm_key, now)?
            .into_iter()
            .map(|g| (g, true))
            .collect()
    } else {
        c.all(
            "SELECT p.request_id, r.requestor, p.number, p.protocol, p.source, r.start_ns, p.end_ns, p.status
             FROM request_ports p JOIN requests r ON r.id = p.request_id
             WHERE p.vm_key = ?1 AND p.changed > ?2",
            &[&vm_key, &after],
            |r| {
                Ok((grant_row(r)?, r.get::<String>(7)? == "Initiated"))
            },
        )?
    };
    Ok(GrantChanges {
        upto: upto.max(after) as u64,
        rows,
    })
}

/// The requestor's live grants for the VMs, ports and sources a request asks for.
fn read_same_grants(
    conn: &dyn Db,
    vms: &[RequestVm],
    requestor: &str,
    now: Timestamp,
) -> Result<Vec<LiveGrant>> {
    let mut live = Vec::new();
    for vm in vms {
        let vm_key = vm.id.key();
        for p in &vm.ports {
            let source = p.source.to_string();
            live.extend(conn.all(
                "SELECT p.request_id FROM request_ports p JOIN requests r ON r.id = p.request_id
                 WHERE p.vm_key = ?1 AND p.number = ?2 AND p.source = ?3 AND p.status = 'Initiated'
                   AND p.end_ns > ?4 AND r.requestor = ?5",
                &[
                    &vm_key,
                    &(p.number.get() as i64),
                    &source,
                    &ns(now),
                    &requestor,
                ],
                |r| {
                    Ok(LiveGrant {
                        request: RequestId::parse(&r.get::<String>(0)?)
                            .map_err(corrupt("request id"))?,
                        requestor: requestor.to_owned(),
                        vm: vm.id.clone(),
                        number: p.number,
                        source: p.source,
                    })
                },
            )?);
        }
    }
    Ok(live)
}

fn read_live_grants(conn: &dyn Db, vm_key: &str, now: Timestamp) -> Result<Vec<Grant>> {
    conn.all(
        "SELECT p.request_id, r.requestor, p.number, p.protocol, p.source, r.start_ns, p.end_ns
         FROM request_ports p JOIN requests r ON r.id = p.request_id
         WHERE p.vm_key = ?1 AND p.status = 'Initiated' AND p.end_ns > ?2
         ORDER BY r.start_ns, p.request_id, p.number",
        &[&vm_key, &ns(now)],
        grant_row,
    )
}

/// What `revoke_row` can revoke.
#[derive(Clone, Copy)]
enum Revocable {
    Token,
    EnrollToken,
}

/// Marks a token or an enrollment token revoked (once; audited). False if it is
/// unknown or already revoked.
fn revoke_row(ctx: &mut WriteCtx<'_>, audit: &AuditCtx, what: Revocable, id: &str) -> Result<bool> {
    let (sql, action) = match what {
        Revocable::Token => (
            "UPDATE tokens SET revoked_ns = ?2 WHERE id = ?1 AND revoked_ns IS NULL",
            "token.revoke",
        ),
        Revocable::EnrollToken => (
            "UPDATE enroll_tokens SET revoked_ns = ?2 WHERE id = ?1 AND revoked_ns IS NULL",
            "enrollToken.revoke",
        ),
    };
    let n = ctx.tx.execute(sql, &[&id, &ns(audit.now)])?;
    if n > 0 {
        ctx.audit(audit, action, id, serde_json::json!({}))?;
    }
    Ok(n > 0)
}

fn read_install_codes(
    c: &dyn Db,
    tail: &str,
    params: &[&dyn ToParam],
) -> Result<Vec<InstallCodeRecord>> {
    c.all(
        &format!(
            "SELECT code_hash, token_id, sealed, expires_ns, uses_left FROM install_codes {tail}"
        ),
        params,
        |r| {
            Ok(InstallCodeRecord {
                code_hash: r.get(0)?,
                token_id: r.get(1)?,
                sealed: r.get(2)?,
                expires: from_ns(r.get(3)?)?,
                uses_left: u32::try_from(r.get::<i64>(4)?.max(0)).unwrap_or(0),
            })
        },
    )
}

fn read_enroll_tokens(
    c: &dyn Db,
    tail: &str,
    params: &[&dyn ToParam],
) -> Result<Vec<EnrollTokenRecord>> {
    c.all(&format!(
        "SELECT id, secret_hash, scope, expires_ns, uses_left, description, created_ns, created_by, revoked_ns, allow_replace
         FROM enroll_tokens {tail}"
    ), params, |r| {
        Ok(EnrollTokenRecord {
            id: r.get(0)?,
            secret_hash: r.get(1)?,
            scope: Scope::parse(&r.get::<String>(2)?).map_err(corrupt("scope"))?,
            expires: from_ns(r.get(3)?)?,
            uses_left: u32::try_from(r.get::<i64>(4)?.max(0)).unwrap_or(0),
            description: r.get(5)?,
            created: from_ns(r.get(6)?)?,
            created_by: r.get(7)?,
            revoked: r.get::<Option<i64>>(8)?.map(from_ns).transpose()?,
            allow_replace: r.get(9)?,
        })
    })
}

fn read_cached_policy(
    c: &dyn Db,
    cache: &Mutex<PolicyCache>,
    key: &str,
) -> Result<Option<Arc<Policy>>> {
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    let got = cached_policy(c, key, &mut map)?;
    Ok(got.map(|(_, p)| p))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A policy of resource group `rg` with `n` VMs.
    fn policy(rg: &str, n: usize) -> Arc<Policy> {
        let key = PolicyKey {
            subscription: SubscriptionId::parse("20ff7fc3-e762-44dd-bd96-b71116dcdc23").unwrap(),
            resource_group: ResourceGroup::parse(rg).unwrap(),
            location: Location::parse("westeurope").unwrap(),
            name: PolicyName::parse("default").unwrap(),
        };
        let vms = (0..n)
            .map(|i| PolicyVm {
                id: VmId::new(
                    key.subscription,
                    key.resource_group.clone(),
                    jitgate_core::ids::VmName::parse(&format!("vm-{i}")).unwrap(),
                ),
                ports: Vec::new(),
                public_ip_address: None,
            })
            .collect();
        Arc::new(Policy {
            key,
            spec: PolicySpec {
                kind: "Basic".into(),
                vms,
            },
        })
    }

    /// Issue 10: memory flat in the number of VMs. The decoded-policy cache holds at
    /// most `POLICY_CACHE_VMS` VM entries however many policies there are, keeps a
    /// policy larger than that on its own, and counts a replaced entry once.
    #[test]
    fn the_policy_cache_is_bounded_by_vm_entries() {
        let mut cache = PolicyCache::default();
        let per = 100;
        for i in 0..(3 * POLICY_CACHE_VMS / per) {
            cache.insert(
                format!("p{i}"),
                "u".into(),
                0,
                policy(&format!("rg{i}"), per),
            );
            assert!(cache.vms <= POLICY_CACHE_VMS, "{} VM entries", cache.vms);
            let counted: usize = cache.map.values().map(|(_, _, p)| policy_weight(p)).sum();
            assert_eq!(counted, cache.vms);
        }
        assert_eq!(cache.map.len(), POLICY_CACHE_VMS / per);
        let newest = format!("p{}", 3 * POLICY_CACHE_VMS / per - 1);
        assert!(
            cache.get(&newest).is_some(),
            "the entry just inserted is kept"
        );
        cache.insert(newest.clone(), "u".into(), 1, policy("x", per));
        assert_eq!(cache.vms, POLICY_CACHE_VMS, "a replaced entry counts once");
        cache.insert(
            "huge".into(),
            "u".into(),
            0,
            policy("big", POLICY_CACHE_VMS + 1),
        );
        assert_eq!(cache.map.len(), 1);
        assert_eq!(cache.vms, POLICY_CACHE_VMS + 1);
        cache.insert("small".into(), "u".into(), 0, policy("s", 0));
        assert_eq!(
            (cache.map.len(), cache.vms),
            (1, 1),
            "an empty policy counts one"
        );
    }
}

// ---- moving between engines ---------------------------------------------------------

/// Verifies the audit chain of a PostgreSQL database directly (no controller needed).
/// Blocking: call it off async threads.
pub fn verify_postgres(url: &str, anchors: Option<&AnchorSet>) -> Result<VerifyReport> {
    let db = pg::connect(&pg::target(url)?)?;
    verify_connection(&db, anchors)
}

/// What [`copy_sqlite_to_postgres`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Rows copied, by table, in copy order.
    pub tables: Vec<(&'static str, u64)>,
    /// The audit chain as verified on the copy.
    pub audit: VerifyReport,
}

/// The tables of an installation, parents before children (foreign keys), and the
/// order their rows are copied in (what lists order by, so the copy pages alike).
const TABLES: &[(&str, &str)] = &[
    ("meta", "key"),
    ("subscriptions", "id"),
    ("vms", "key"),
    ("policies", "key"),
    ("policy_vms", "vm_key"),
    ("requests", "rowid"),
    ("request_ports", "request_id, vm_idx, port_idx"),
    ("approval_votes", "request_id, principal"),
    ("approval_rules", "name"),
    ("tokens", "id"),
    ("role_assignments", "id"),
    ("audit", "seq"),
    ("nsg_rules", "vm_key, name"),
    ("enroll_tokens", "id"),
    ("agent_status", "vm_key"),
    ("exclusions", "id"),
    ("blocked_attempts", "rowid"),
    ("vm_verdicts", "vm_key"),
];

/// Copies an SQLite installation (the file at `path`, read-only) into an empty
/// PostgreSQL database (its schema created if needed), all in one PostgreSQL
/// transaction, then verifies the copy's audit chain and compares its head with the
/// source's. Refuses a database that already holds an installation. Blocking.
pub fn copy_sqlite_to_postgres(path: &Path, url: &str) -> Result<CopyReport> {
    let from = sqlite::open_read_only(path)?;
    // The target first: a wrong URL or a used database is told at once, not after a
    // walk of the whole source chain.
    let to = pg::connect(&pg::target(url)?)?;
    pg::migrate(&to)?;
    let to: &dyn Db = &to;
    if to.exists("SELECT 1 FROM subscriptions", &[])? {
        return Err(StoreError::Db(
            "the PostgreSQL database already holds an installation; copy into an empty one".into(),
        ));
    }
    let source = verify_connection(&from, None)?;
    if !source.ok() {
        return Err(StoreError::Corrupt(format!(
            "the source's audit chain does not verify ({} problems); verify and repair it first",
            source.problems.len()
        )));
    }
    to.batch("BEGIN")?;
    let tables = to.end(
        TABLES
            .iter()
            .map(|(table, order)| Ok((*table, copy_table(&from, to, table, order)?)))
            .collect(),
    )?;
    let audit = verify_connection(to, None)?;
    if !audit.ok() || audit.count != source.count || audit.head_hash != source.head_hash {
        return Err(StoreError::Corrupt(format!(
            "the copy's audit chain differs from the source's: {} events, head {} (source: {} events, head {}); problems: {:?}",
            audit.count, audit.head_hash, source.count, source.head_hash, audit.problems
        )));
    }
    Ok(CopyReport { tables, audit })
}

/// Copies one table's rows, a batch at a time, in `order`. Columns are the source's
/// (SQLite's `pragma_table_info`), which the PostgreSQL schema has by the same names.
fn copy_table(from: &dyn Db, to: &dyn Db, table: &str, order: &str) -> Result<u64> {
    const BATCH: usize = 200;
    let cols = from.all(
        "SELECT name FROM pragma_table_info(?1) ORDER BY cid",
        &[&table],
        |r| r.get::<String>(0),
    )?;
    if cols.is_empty() {
        return Err(StoreError::Db(format!("the source has no table {table}")));
    }
    // The names go into SQL: a file someone tampered with must not bring its own.
    if let Some(bad) = cols.iter().find(|c| {
        c.is_empty()
            || !c
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }) {
        return Err(StoreError::Corrupt(format!(
            "the source's table {table} has a column named {bad:?}, which no jitgate schema has"
        )));
    }
    let list = cols.join(", ");
    let mut rows: Vec<Vec<db::Value>> = Vec::new();
    let mut copied = 0u64;
    let mut flush = |rows: &mut Vec<Vec<db::Value>>| -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let one = format!("({})", vec!["?"; cols.len()].join(", "));
        let sql = format!(
            "INSERT INTO {table}({list}) VALUES {}",
            vec![one; rows.len()].join(", ")
        );
        let params: Vec<&dyn ToParam> = rows
            .iter()
            .flat_map(|r| r.iter().map(|v| v as &dyn ToParam))
            .collect();
        to.execute(&sql, &params)?;
        copied += rows.len() as u64;
        rows.clear();
        Ok(())
    };
    from.each(
        &format!("SELECT {list} FROM {table} ORDER BY {order}"),
        &[],
        &mut |r| {
            let row = (0..cols.len())
                .map(|i| r.get::<db::Value>(i))
                .collect::<Result<Vec<_>>>()?;
            rows.push(row);
            if rows.len() == BATCH {
                flush(&mut rows)?;
            }
            Ok(())
        },
    )?;
    flush(&mut rows)?;
    Ok(copied)
}
