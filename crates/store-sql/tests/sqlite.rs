//! The SQLite backend: the conformance suite, plus what only a file-backed store has
//! (durability across reopen, and tamper detection on the file itself).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use jitgate_core::audit::{Outcome, Problem, VerifyReport};
use jitgate_core::ids::{Location, PolicyName, ResourceGroup, SubscriptionId, VmId, VmName};
use jitgate_core::net::Protocol;
use jitgate_core::policy::{
    PolicyInput, PolicyKey, PolicyVmInput, PortRuleInput, RawPrefix, validate_policy,
};
use jitgate_core::rbac::{Role, RoleAssignment};
use jitgate_core::recommend::{AgentFacts, Listening, RecommendConfig, Verdict};
use jitgate_core::request::{
    InitiateInput, InitiatePortInput, InitiateVmInput, PortStatus, RequestId,
};
use jitgate_store::conformance::model::{self, ModelBackend};
use jitgate_store::conformance::{OWNER, SUB, at, t0};
use jitgate_store::*;
use jitgate_store_sql::{SqlStore, StoreOptions, verify_file};
use tempfile::TempDir;

async fn fresh() -> (Box<dyn Store>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&dir.path().join("jitgate.db")).unwrap();
    (Box::new(store), dir)
}

jitgate_store::store_conformance_tests!(fresh);

/// The request lifecycle against the reference model; a restart reopens the same file.
struct Sqlite;

#[async_trait::async_trait]
impl ModelBackend for Sqlite {
    type Data = TempDir;

    /// In memory where the machine has `/dev/shm`: the model is about the lifecycle, the
    /// fsyncs would be half its time, and durability has tests of its own.
    async fn create() -> TempDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir()
            && let Ok(dir) = tempfile::tempdir_in(shm)
        {
            return dir;
        }
        tempfile::tempdir().unwrap()
    }

    async fn open(dir: &TempDir) -> Box<dyn Store> {
        Box::new(SqlStore::open(&dir.path().join("jitgate.db")).unwrap())
    }
}

#[test]
fn request_lifecycle_matches_the_model() {
    model::run::<Sqlite>();
}

// ---- SQLite-specific ----------------------------------------------------------------

fn ctx(secs: i64) -> AuditCtx {
    AuditCtx {
        actor: OWNER.into(),
        source: "192.0.2.10".into(),
        now: at(secs),
    }
}

fn sub() -> SubscriptionId {
    SubscriptionId::parse(SUB).unwrap()
}

fn vm(name: &str) -> VmId {
    VmId::new(
        sub(),
        ResourceGroup::parse("rg1").unwrap(),
        VmName::parse(name).unwrap(),
    )
}

fn key() -> PolicyKey {
    PolicyKey {
        subscription: sub(),
        resource_group: ResourceGroup::parse("rg1").unwrap(),
        location: Location::parse("westeurope").unwrap(),
        name: PolicyName::parse("default").unwrap(),
    }
}

/// The migrations after the idempotency keys' (sign-ins, a sign-in's last use,
/// approvals, break-glass, webhooks, offline agents, the
/// protected flag, the superseding index, grant change marks, gateway placements,
/// install codes), undone, for the tests that take a database back to an older schema.
const MIGRATIONS_SINCE_IDEMPOTENCY: i64 = 11;

/// Turns the database file back into an older one: runs `undo` (what the last
/// `migrations` migrations did, undone) and sets the schema version that many back.
fn rewind(path: &std::path::Path, undo: &str, migrations: i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    c.execute_batch(undo).unwrap();
    c.execute_batch(&format!("PRAGMA user_version = {};", version - migrations))
        .unwrap();
}
const UNDO_SINCE_IDEMPOTENCY: &str = "
    DROP TABLE install_codes;
    DROP TABLE mapped_ports; DROP TABLE placements;
    DROP INDEX request_ports_changed; ALTER TABLE request_ports DROP COLUMN changed;
    CREATE INDEX request_ports_vm_all ON request_ports(vm_key);
    DROP INDEX request_ports_vm;
    CREATE INDEX request_ports_vm ON request_ports(vm_key, number) WHERE status = 'Initiated';
    ALTER TABLE vm_verdicts DROP COLUMN protected;
    ALTER TABLE agent_status DROP COLUMN offline_ns;
    DROP TABLE webhook_outbox; DROP TABLE webhooks;
    ALTER TABLE requests DROP COLUMN break_glass; ALTER TABLE requests DROP COLUMN reviewed_by;
    ALTER TABLE requests DROP COLUMN reviewed_ns;
    DROP TABLE approval_votes; DROP INDEX requests_open; DROP TABLE approval_rules;
    ALTER TABLE requests DROP COLUMN approval_rule; ALTER TABLE requests DROP COLUMN min_approvals;
    ALTER TABLE requests DROP COLUMN deny_threshold; ALTER TABLE requests DROP COLUMN approvers;
    ALTER TABLE requests DROP COLUMN pending_until_ns; ALTER TABLE requests DROP COLUMN open_until_ns;
    ALTER TABLE tokens DROP COLUMN last_used_ns;
    DROP TABLE signins; ALTER TABLE tokens DROP COLUMN identity;";

fn token(id: &str) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        principal: OWNER.into(),
        secret_hash: "ab".repeat(32),
        description: "bootstrap".into(),
        created: t0(),
        expires: None,
        revoked: None,
        identity: None,
        last_used: None,
    }
}

/// A store with a little of everything: bootstrap, two VMs, a policy, a request.
/// Returns the number of audit events written.
async fn populate(store: &SqlStore) -> u64 {
    store
        .bootstrap(
            Bootstrap {
                subscription: sub(),
                owner_principal: OWNER.into(),
                owner_token: token("jg_boot"),
            },
            ctx(0),
        )
        .await
        .unwrap();
    for (i, name) in ["vm1", "vm2"].into_iter().enumerate() {
        store
            .register_vm(
                VmRecord {
                    id: vm(name),
                    location: None,
                    created: at(i as i64),
                    created_by: OWNER.into(),
                },
                ctx(10 + i as i64),
            )
            .await
            .unwrap();
    }
    let rule = PortRuleInput {
        number: Some(22),
        protocol: Some("TCP".into()),
        allowed_source_address_prefix: Some(RawPrefix::One("*".into())),
        allowed_source_address_prefixes: None,
        max_request_access_duration: Some("PT3H".into()),
    };
    let spec = validate_policy(
        &key(),
        &PolicyInput {
            kind: None,
            virtual_machines: Some(
                ["vm1", "vm2"]
                    .into_iter()
                    .map(|n| PolicyVmInput {
                        id: Some(vm(n).to_string()),
                        ports: Some(vec![rule.clone()]),
                        public_ip_address: None,
                    })
                    .collect(),
            ),
        },
    )
    .unwrap();
    store.put_policy(key(), spec, ctx(20)).await.unwrap();
    store
        .initiate(
            InitiateArgs {
                policy: key(),
                input: InitiateInput {
                    virtual_machines: Some(vec![InitiateVmInput {
                        id: Some(vm("vm1").to_string()),
                        ports: Some(vec![InitiatePortInput {
                            number: Some(22),
                            allowed_source_address_prefix: None,
                            end_time_utc: None,
                            duration: Some("PT1H".into()),
                        }]),
                    }]),
                    justification: None,
                },
                id: RequestId::new(uuid::Uuid::from_u128(1)),
                requestor: OWNER.into(),
                caller_ip: "10.0.0.9".parse().unwrap(),
                assignments: vec![RoleAssignment {
                    principal: OWNER.into(),
                    role: Role::Owner,
                    scope: jitgate_core::ids::Scope::Subscription(sub()),
                }],
                idempotency_key: None,
                break_glass: None,
            },
            ctx(30),
        )
        .await
        .unwrap();
    let report = store.verify_audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert!(report.count >= 6, "populate wrote {} events", report.count);
    report.count
}

/// A directory holding a populated, closed database.
async fn populated() -> (TempDir, PathBuf, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    let store = SqlStore::open(&path).unwrap();
    let n = populate(&store).await;
    drop(store);
    (dir, path, n)
}

/// A raw connection for tampering, as an attacker with file access would use.
fn raw(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    c
}

fn problems(path: &Path) -> Vec<Problem> {
    let report = verify_file(path, None).unwrap();
    assert!(!report.ok(), "tampering went unnoticed");
    report.problems
}

#[tokio::test]
async fn data_survives_reopen_and_the_chain_verifies() {
    let (_dir, path, n) = populated().await;
    let before = verify_file(&path, None).unwrap();
    assert!(before.ok(), "{:?}", before.problems);
    assert_eq!(before.count, n);

    let store = SqlStore::open(&path).unwrap();
    assert_eq!(store.subscriptions().await.unwrap(), vec![sub()]);
    assert!(store.get_vm(&vm("vm2")).await.unwrap().is_some());
    let policy = store.get_policy(&key()).await.unwrap().unwrap();
    assert_eq!(policy.spec.vms.len(), 2);
    let req = store
        .get_request(RequestId::new(uuid::Uuid::from_u128(1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.vms[0].ports[0].status, PortStatus::Initiated);
    assert_eq!(req.vms[0].ports[0].end, at(30 + 3600));
    assert_eq!(store.next_expiry().await.unwrap(), Some(at(3630)));
    assert_eq!(
        store.find_token("jg_boot").await.unwrap(),
        Some(token("jg_boot"))
    );
    let report: VerifyReport = store.verify_audit(None).await.unwrap();
    assert_eq!(report, before, "the reopened store sees the same chain");

    // A reopened store continues the chain where it was.
    let bootstrap_again = store
        .bootstrap(
            Bootstrap {
                subscription: sub(),
                owner_principal: OWNER.into(),
                owner_token: token("jg_other"),
            },
            ctx(40),
        )
        .await
        .unwrap();
    assert!(!bootstrap_again.created);
    let expired = store.expire_due(at(3630)).await.unwrap();
    assert_eq!(expired.len(), 1);
    let report = store.verify_audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.count, n + 1);
    let last = store
        .query_audit(&AuditQuery {
            after_seq: Some(n),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].seq, n + 1);
    assert_eq!(last[0].prev_hash, before.head_hash);
    drop(store);

    let store = SqlStore::open(&path).unwrap();
    assert_eq!(
        store.next_expiry().await.unwrap(),
        None,
        "the expiry was durable"
    );
    assert_eq!(store.verify_audit(None).await.unwrap().count, n + 1);
}

#[tokio::test]
async fn verify_file_reads_a_bare_database_file() {
    // `jitgate audit verify --data-dir` runs with no controller: there may be no WAL
    // or shared-memory file beside the database.
    let (dir, path, n) = populated().await;
    raw(&path)
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    let copy = dir.path().join("copy.db");
    std::fs::copy(&path, &copy).unwrap();
    let report = verify_file(&copy, None).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.count, n);
}

#[tokio::test]
async fn verify_file_detects_a_modified_event() {
    let (_dir, path, _) = populated().await;
    let changed = raw(&path)
        .execute("UPDATE audit SET actor = 'mallory' WHERE seq = 3", [])
        .unwrap();
    assert_eq!(changed, 1);
    assert_eq!(problems(&path), vec![Problem::Modified { seq: 3 }]);

    // The store itself reports it too.
    let store = SqlStore::open(&path).unwrap();
    let report = store.verify_audit(None).await.unwrap();
    assert_eq!(report.problems, vec![Problem::Modified { seq: 3 }]);
}

#[tokio::test]
async fn verify_file_detects_a_modified_outcome() {
    let (_dir, path, _) = populated().await;
    raw(&path)
        .execute("UPDATE audit SET outcome = 'bogus' WHERE seq = 2", [])
        .unwrap();
    assert_eq!(problems(&path), vec![Problem::Modified { seq: 2 }]);
    raw(&path)
        .execute(
            &format!(
                "UPDATE audit SET outcome = '{}' WHERE seq = 2",
                Outcome::Denied.as_str()
            ),
            [],
        )
        .unwrap();
    assert_eq!(problems(&path), vec![Problem::Modified { seq: 2 }]);
}

#[tokio::test]
async fn verify_file_detects_a_deleted_middle_event() {
    let (_dir, path, _) = populated().await;
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = 4", [])
        .unwrap();
    assert_eq!(problems(&path), vec![Problem::Gap { after: 3, next: 5 }]);
}

#[tokio::test]
async fn verify_file_detects_truncation_against_the_head() {
    let (_dir, path, n) = populated().await;
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = ?1", [n as i64])
        .unwrap();
    assert_eq!(
        problems(&path),
        vec![Problem::Truncated {
            last: n - 1,
            head: n
        }]
    );
    raw(&path)
        .execute("DELETE FROM audit WHERE seq > ?1", [n as i64 - 3])
        .unwrap();
    assert_eq!(
        problems(&path),
        vec![Problem::Truncated {
            last: n - 3,
            head: n
        }]
    );
}

#[tokio::test]
async fn verify_file_detects_reordered_events() {
    let (_dir, path, _) = populated().await;
    // Swap everything but the sequence numbers of events 2 and 3.
    let c = raw(&path);
    let cols = "time, time_ns, actor, source, action, target, outcome, details, prev_hash, hash";
    c.execute_batch(&format!(
        "BEGIN;
         CREATE TEMP TABLE swap AS SELECT seq, {cols} FROM audit WHERE seq IN (2, 3);
         UPDATE audit SET ({cols}) = (SELECT {cols} FROM swap WHERE swap.seq = 5 - audit.seq)
           WHERE seq IN (2, 3);
         COMMIT;"
    ))
    .unwrap();
    let actions: Vec<String> = c
        .prepare("SELECT action FROM audit WHERE seq IN (2, 3) ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        actions,
        ["roleAssignment.create", "token.create"],
        "swapped"
    );
    drop(c);
    let p = problems(&path);
    assert!(
        p.iter().any(|x| matches!(
            x,
            Problem::Modified { seq: 2 | 3 } | Problem::Broken { seq: 2..=4, .. }
        )),
        "{p:?}"
    );
}

#[tokio::test]
async fn verify_file_detects_a_rehashed_forgery() {
    // An attacker who recomputes the modified event's own hash still breaks the link
    // to the next event.
    let (_dir, path, _) = populated().await;
    let c = raw(&path);
    let (time, source, action, target, outcome, details, prev): (
        String,
        String,
        String,
        String,
        String,
        String,
        String,
    ) = c
        .query_row(
            "SELECT time, source, action, target, outcome, details, prev_hash FROM audit WHERE seq = 3",
            [],
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
        )
        .unwrap();
    let forged = jitgate_core::audit::AuditEntry {
        time,
        actor: "mallory".into(),
        source,
        action,
        target,
        outcome: Outcome::parse(&outcome).unwrap(),
        details,
    };
    let hash = jitgate_core::audit::compute_hash(3, &prev, &forged);
    c.execute(
        "UPDATE audit SET actor = 'mallory', hash = ?1 WHERE seq = 3",
        [&hash],
    )
    .unwrap();
    drop(c);
    let p = problems(&path);
    assert!(
        matches!(p.as_slice(), [Problem::Broken { seq: 4, .. }]),
        "{p:?}"
    );
}

/// A database from before machines had an indexed name gets it at the next open:
/// VMs registered then are found by name.
#[tokio::test]
async fn the_vm_name_index_is_filled_in_for_an_older_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    {
        let store = SqlStore::open(&path).unwrap();
        populate(&store).await;
    }
    {
        // Back to the schema before the migration that added the name (and the four
        // after it: VM pages, the list page indexes, stored verdicts, idempotency keys).
        rewind(
            &path,
            &format!(
                "{UNDO_SINCE_IDEMPOTENCY}
             DROP TABLE idempotency; DROP TABLE vm_verdicts; ALTER TABLE agent_status DROP COLUMN facts;
             DROP INDEX requests_page; DROP INDEX tokens_page; DROP INDEX role_assignments_page;
             DROP INDEX enroll_tokens_page; DROP INDEX exclusions_page;
             DROP INDEX vms_page; DROP INDEX vms_name; DROP INDEX vms_rg_page;
             ALTER TABLE vms DROP COLUMN name_key;"
            ),
            5 + MIGRATIONS_SINCE_IDEMPOTENCY,
        );
    }
    let store = SqlStore::open(&path).unwrap();
    let found = store
        .find_vms(
            sub(),
            &VmFilter {
                name: Some(VmName::parse("VM2").unwrap()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, vm("vm2"));
}

/// An agent reporting nftables and these TCP ports listening on every address.
fn listening(ports: &[u16]) -> AgentFacts {
    AgentFacts {
        last_seen: t0(),
        nft_version: Some("nftables v1.0.6".into()),
        error: None,
        listening: ports
            .iter()
            .map(|p| Listening {
                protocol: Protocol::Tcp,
                addr: "0.0.0.0".parse().unwrap(),
                port: *p,
                process: None,
            })
            .collect(),
        inventory_errors: Vec::new(),
        drift: None,
    }
}

async fn verdicts(store: &SqlStore, now: i64) -> Vec<(String, Verdict, String)> {
    store
        .recommendations(
            sub(),
            &VerdictPage {
                limit: 100,
                ..Default::default()
            },
            at(now),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|v| {
            (
                v.vm.name.as_str().to_owned(),
                v.recommendation.verdict,
                v.recommendation.reason,
            )
        })
        .collect()
}

/// Issue 10: a database from before verdicts were stored gets them when it opens: a
/// VM without an agent is NotApplicable as before, one whose agent reported before
/// the upgrade (its facts were not kept) waits for the agent's next report, or is
/// offline; that report gives the verdict. Verdicts are computed again at every open,
/// so a changed configuration (another management port) takes effect.
#[tokio::test]
async fn verdicts_are_filled_in_for_an_older_database_and_follow_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    let status = |secs| AgentStatusRecord {
        vm: vm("vm1"),
        report: "{}".into(),
        last_seen: at(secs),
    };
    {
        let store = SqlStore::open(&path).unwrap();
        populate(&store).await;
        store
            .put_agent_status(status(100), listening(&[22, 8443]))
            .await
            .unwrap();
    }
    {
        rewind(
            &path,
            &format!(
                "{UNDO_SINCE_IDEMPOTENCY}
             DROP TABLE idempotency; DROP TABLE vm_verdicts; ALTER TABLE agent_status DROP COLUMN facts;"
            ),
            2 + MIGRATIONS_SINCE_IDEMPOTENCY,
        );
    }
    let store = SqlStore::open(&path).unwrap();
    let v = verdicts(&store, 110).await;
    assert_eq!(v.len(), 2);
    assert_eq!((v[0].0.as_str(), v[0].1), ("vm1", Verdict::NotApplicable));
    assert!(v[0].2.contains("next report"), "{v:?}");
    assert_eq!((v[1].0.as_str(), v[1].1), ("vm2", Verdict::NotApplicable));
    assert!(v[1].2.contains("no agent"), "{v:?}");
    assert!(verdicts(&store, 1000).await[0].2.contains("offline"));
    // The next report: SSH is protected by the policy, 8443 is no management port.
    store
        .put_agent_status(status(200), listening(&[22, 8443]))
        .await
        .unwrap();
    assert_eq!(verdicts(&store, 210).await[0].1, Verdict::Healthy);
    drop(store);

    let store = SqlStore::open_with(
        &path,
        StoreOptions {
            recommend: RecommendConfig {
                management_ports: vec![22, 8443],
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let v = verdicts(&store, 210).await;
    assert_eq!(v[0].1, Verdict::Unhealthy, "{v:?}");
    assert!(v[0].2.contains("8443"), "{v:?}");
    assert_eq!(
        store
            .verdict_counts(sub(), &VerdictScope::default(), at(210))
            .await
            .unwrap(),
        VerdictCounts {
            unhealthy: 1,
            not_applicable: 1,
            ..Default::default()
        }
    );
}

/// A policy on vm1 and vm2 with `ports` open to any source for up to 3 h.
fn spec_with(ports: &[i64]) -> jitgate_core::policy::PolicySpec {
    let rules: Vec<PortRuleInput> = ports
        .iter()
        .map(|&n| PortRuleInput {
            number: Some(n),
            protocol: Some("TCP".into()),
            allowed_source_address_prefix: Some(RawPrefix::One("*".into())),
            allowed_source_address_prefixes: None,
            max_request_access_duration: Some("PT3H".into()),
        })
        .collect();
    validate_policy(
        &key(),
        &PolicyInput {
            kind: None,
            virtual_machines: Some(
                ["vm1", "vm2"]
                    .into_iter()
                    .map(|n| PolicyVmInput {
                        id: Some(vm(n).to_string()),
                        ports: Some(rules.clone()),
                        public_ip_address: None,
                    })
                    .collect(),
            ),
        },
    )
    .unwrap()
}

/// An initiate for vm1's `port`, for an hour, by the Owner.
fn initiate_port(id: u128, port: i64) -> InitiateArgs {
    InitiateArgs {
        policy: key(),
        input: InitiateInput {
            virtual_machines: Some(vec![InitiateVmInput {
                id: Some(vm("vm1").to_string()),
                ports: Some(vec![InitiatePortInput {
                    number: Some(port),
                    allowed_source_address_prefix: None,
                    end_time_utc: None,
                    duration: Some("PT1H".into()),
                }]),
            }]),
            justification: None,
        },
        id: RequestId::new(uuid::Uuid::from_u128(id)),
        requestor: OWNER.into(),
        caller_ip: "10.0.0.9".parse().unwrap(),
        assignments: vec![RoleAssignment {
            principal: OWNER.into(),
            role: Role::Owner,
            scope: jitgate_core::ids::Scope::Subscription(sub()),
        }],
        idempotency_key: None,
        break_glass: None,
    }
}

/// Regression (issue 10): after a failed group commit the writer restored the audit
/// tail but kept the policies it had decoded inside the failed transaction. A policy
/// update that never committed left its content cached under the row's next `rev`;
/// the next update, which reuses that `rev`, was then judged by the uncommitted
/// content. Here an update opening 3389 fails to commit (a deferred foreign key,
/// planted by a trigger, fails the COMMIT) after an initiate in the same group read
/// it; the update that does commit keeps only 22, and an initiate for 3389 must be
/// refused.
#[tokio::test]
async fn a_failed_commit_forgets_the_policies_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    let store = std::sync::Arc::new(SqlStore::open(&path).unwrap());
    populate(&store).await;

    // Another connection holds the write lock, so that the next writes queue up and
    // are committed as one group; it also plants the fault: every `policy.update`
    // event inserts a row whose deferred foreign key fails at COMMIT.
    let lock = raw(&path);
    lock.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE poison_parent(id INTEGER PRIMARY KEY);
         CREATE TABLE poison(parent INTEGER REFERENCES poison_parent(id) DEFERRABLE INITIALLY DEFERRED);
         CREATE TRIGGER poison_policy_update AFTER INSERT ON audit
             WHEN NEW.action = 'policy.update'
         BEGIN INSERT INTO poison(parent) VALUES (1); END;",
    )
    .unwrap();
    // The writer takes this one and waits for the lock with it...
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.revoke_token("jg_unknown", ctx(40)).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // ...while these two queue behind it, in this order: the next group.
    let group = tokio::spawn({
        let store = store.clone();
        async move {
            tokio::join!(
                store.put_policy(key(), spec_with(&[22, 3389]), ctx(41)),
                store.initiate(initiate_port(2, 3389), ctx(42)),
            )
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    lock.execute_batch("COMMIT").unwrap();

    assert!(!first.await.unwrap().unwrap(), "no such token");
    let (put, init) = group.await.unwrap();
    assert!(
        matches!(put, Err(OpError::Store(StoreError::Db(ref m))) if m.contains("FOREIGN KEY")),
        "the update's commit fails: {put:?}"
    );
    assert!(
        matches!(init, Err(OpError::Store(_))),
        "the initiate shared the failed commit: {init:?}"
    );
    lock.execute_batch("DROP TRIGGER poison_policy_update")
        .unwrap();
    assert_eq!(
        store.get_policy(&key()).await.unwrap().unwrap().spec,
        spec_with(&[22]),
        "nothing of the failed group is stored"
    );

    // The update that commits takes the same `rev` the failed one had.
    store
        .put_policy(key(), spec_with(&[22]), ctx(43))
        .await
        .unwrap();
    let r = store.initiate(initiate_port(3, 3389), ctx(44)).await;
    assert!(
        matches!(r, Err(OpError::Refused(InitiateRefusal::Invalid(_)))),
        "3389 was only in the update that never committed: {r:?}"
    );
    store.initiate(initiate_port(4, 22), ctx(45)).await.unwrap();
    let report = store.verify_audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

/// Issue 10: the write queue is bounded. Past it a write is refused at once with
/// `Busy` and changes nothing; a write recording what already happened (an audit
/// event) waits for room instead.
#[tokio::test]
async fn a_full_write_queue_refuses_writes_but_not_audit_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    let store = std::sync::Arc::new(
        SqlStore::open_with(
            &path,
            StoreOptions {
                write_queue: 1,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    populate(&store).await;
    let stats = store.write_queue().unwrap();
    assert_eq!((stats.depth, stats.capacity, stats.refused), (0, 1, 0));

    let lock = raw(&path);
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let spawn_token = |id: &'static str| {
        let store = store.clone();
        tokio::spawn(async move { store.create_token(token(id), ctx(50)).await })
    };
    // The writer takes the first and waits for the lock; the second fills the queue.
    let held = spawn_token("jg_held");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let queued = spawn_token("jg_queued");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(store.write_queue().unwrap().depth, 1);

    let r = store.create_token(token("jg_refused"), ctx(51)).await;
    assert!(
        matches!(r, Err(StoreError::Busy { queued: 1 })),
        "refused at once: {r:?}"
    );
    assert_eq!(store.write_queue().unwrap().refused, 1);
    let audited = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .append_audit(jitgate_core::audit::AuditEntry {
                    time: at(52).to_string(),
                    actor: "anonymous".into(),
                    source: "192.0.2.99".into(),
                    action: "request.failed".into(),
                    target: "/api/v1/tokens".into(),
                    outcome: Outcome::Failed,
                    details: "{}".into(),
                })
                .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!audited.is_finished(), "the audit event waits for room");

    lock.execute_batch("COMMIT").unwrap();
    held.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    audited.await.unwrap().unwrap();
    assert!(store.find_token("jg_held").await.unwrap().is_some());
    assert!(store.find_token("jg_queued").await.unwrap().is_some());
    assert_eq!(store.find_token("jg_refused").await.unwrap(), None);
    let report = store.verify_audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(store.write_queue().unwrap().depth, 0);
}

/// `audit verify` streams the chain; a row it cannot read is an error, never taken for
/// the chain's end (which would report an intact, shorter chain).
#[tokio::test]
async fn verify_file_fails_on_an_unreadable_row() {
    let (_dir, path, _) = populated().await;
    raw(&path)
        .execute("UPDATE audit SET hash = x'00ff' WHERE seq = 3", [])
        .unwrap();
    let r = verify_file(&path, None);
    assert!(r.is_err(), "{r:?}");
}

/// The dashboard's tabs read whether a policy protects each VM from its verdict row:
/// an older database gets the column, filled in when the store opens.
#[tokio::test]
async fn the_protected_flag_is_filled_in_for_an_older_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    {
        let store = SqlStore::open(&path).unwrap();
        populate(&store).await;
        store
            .register_vm(
                VmRecord {
                    id: vm("vm3"),
                    location: None,
                    created: at(30),
                    created_by: OWNER.into(),
                },
                ctx(30),
            )
            .await
            .unwrap();
    }
    {
        rewind(
            &path,
            "DROP TABLE install_codes; DROP TABLE mapped_ports; DROP TABLE placements;
             DROP INDEX request_ports_changed; ALTER TABLE request_ports DROP COLUMN changed;
    CREATE INDEX request_ports_vm_all ON request_ports(vm_key);
             DROP INDEX request_ports_vm;
             CREATE INDEX request_ports_vm ON request_ports(vm_key, number) WHERE status = 'Initiated';
             ALTER TABLE vm_verdicts DROP COLUMN protected;",
            5,
        );
    }
    let store = SqlStore::open(&path).unwrap();
    let page = store
        .recommendations(
            sub(),
            &VerdictPage {
                limit: 10,
                ..Default::default()
            },
            at(40),
        )
        .await
        .unwrap();
    let protected: Vec<(String, bool)> = page
        .iter()
        .map(|v| (v.vm.name.to_string(), v.protected))
        .collect();
    assert_eq!(
        protected,
        [
            ("vm1".to_owned(), true),
            ("vm2".to_owned(), true),
            ("vm3".to_owned(), false)
        ]
    );
    let tabs = store
        .tab_counts(sub(), &VerdictScope::default(), at(40))
        .await
        .unwrap();
    assert_eq!((tabs.configured, tabs.unsupported), (2, 1));
}
