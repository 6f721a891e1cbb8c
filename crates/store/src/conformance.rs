//! The store conformance suite: what every [`Store`] backend must do.
//!
//! Each check is a `pub async fn` taking a fresh, empty store and panicking with a
//! message that says what went wrong. The checks use only the [`Store`] trait, so the
//! SQLite backend and a future PostgreSQL backend run the very same suite.
//!
//! Time is simulated: every check passes explicit times (`AuditCtx::now`,
//! `expire_due(now)`, `live_grants(.., now)`) from a fixed clock starting at
//! [`t0`]; nothing reads the real clock or sleeps.
//!
//! A backend's test file runs the whole suite with [`store_conformance_tests!`]:
//!
//! ```text
//! async fn fresh() -> (Box<dyn Store>, tempfile::TempDir) {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = SqlStore::open(&dir.path().join("jitgate.db")).unwrap();
//!     (Box::new(store), dir)
//! }
//! jitgate_store::store_conformance_tests!(fresh);
//! ```
//!
//! [`store_conformance_tests!`]: crate::store_conformance_tests

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use jiff::{SignedDuration, Timestamp};
use uuid::Uuid;

use jitgate_core::audit::{AuditEntry, AuditRecord, Outcome, VerifyReport};
use jitgate_core::ids::{Location, PolicyName, ResourceGroup, Scope, SubscriptionId, VmId, VmName};
use jitgate_core::net::{Port, Protocol, SourcePrefix};
use jitgate_core::nsg::{Access, NsgRule, RuleOrigin, parse_port_range};
use jitgate_core::policy::{
    Policy, PolicyInput, PolicyKey, PolicySpec, PolicyVmInput, PortRuleInput, RawPrefix,
    validate_policy,
};
use jitgate_core::rbac::{Role, RoleAssignment};
use jitgate_core::recommend::{AgentFacts, Listening, RecommendConfig, Verdict, VmFacts, classify};
use jitgate_core::request::{
    AccessRequest, InitiateInput, InitiatePortInput, InitiateVmInput, PortStatus, RequestId,
    RevokeReason,
};

use crate::*;

#[cfg(feature = "model")]
pub mod model;

/// Expands to one `#[tokio::test]` per conformance check.
///
/// `$make` is an async function (or closure returning a future) that yields
/// `(store, guard)`: `store` derefs to something implementing [`Store`] (for example
/// `Box<dyn Store>`), and `guard` keeps whatever the store needs alive (a temporary
/// directory, a database schema) until the check is done. Each test calls `$make`
/// once, so each check gets its own fresh, empty store. The crate invoking the macro
/// needs `tokio` (with the `macros` and `rt` features) as a (dev-)dependency.
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::__store_conformance_tests!(
            $make;
            bootstrap_is_idempotent,
            register_vm_is_idempotent_and_case_insensitive,
            register_vm_refuses_unknown_subscription,
            list_vms_by_subscription_and_resource_group,
            find_vms_pages_and_filters_by_name_and_group,
            vm_summaries_read_a_page_at_once,
            delete_vm_refused_while_in_policy,
            put_policy_creates_then_updates,
            put_policy_refuses_unknown_subscription,
            put_policy_refuses_unknown_vm,
            put_policy_refuses_vm_in_other_policy,
            apply_policies_is_all_or_nothing,
            get_policy_is_case_insensitive,
            list_policies_filters,
            list_policies_pages_in_key_order,
            vm_policy_finds_the_protecting_policy,
            initiate_stores_the_request,
            policy_requests_are_newest_first,
            initiate_supersedes_same_vm_port_and_source,
            initiate_never_supersedes_another_requestors_grant,
            initiate_refusals_change_nothing,
            initiate_with_a_duplicate_id_fails_cleanly,
            initiate_retried_with_its_key_is_not_doubled,
            list_requests_filters,
            list_requests_pages_newest_first,
            lists_page_in_creation_order,
            revoke_request_all_ports,
            revoke_request_selected_port,
            revoke_request_refusals,
            expire_due_expires_exactly_once,
            next_expiry_is_earliest_initiated_end,
            live_grants_and_count,
            grant_changes_since_a_point,
            placements_and_mapped_ports,
            install_codes_are_used_as_often_as_their_token,
            put_policy_update_revokes_removed_ports,
            put_policy_update_ends_only_the_grants_it_no_longer_allows,
            delete_policy_revokes_live_grants,
            policy_changes_leave_ended_ports_to_expiry,
            tokens_create_find_list_revoke,
            tokens_are_found_by_secret_hash,
            signins_are_decided_once_and_taken_once,
            approvals_make_ports_wait_then_open_deny_cancel_or_expire,
            webhook_events_are_queued_with_their_event_claimed_once_and_finished,
            agents_are_marked_offline_once_and_online_again,
            role_assignments_add_list_remove,
            mutations_are_audited_and_chain_verifies,
            append_audit_assigns_consecutive_seqs,
            query_audit_filters,
            grouped_writes_keep_the_chain_contiguous,
            nsg_rules_create_replace_list_delete,
            nsg_rule_refusals_change_nothing,
            enroll_registers_the_vm_and_issues_an_agent_credential,
            enroll_uses_run_out,
            enroll_refuses_an_expired_token,
            enroll_refusals_change_nothing,
            re_enroll_revokes_the_previous_agent_credential,
            enroll_refuses_to_replace_an_online_agent,
            revoked_enroll_tokens_enroll_nothing,
            agent_status_put_get_upserts,
            prune_blocked_keeps_exactly_the_recent_points,
            verdicts_follow_agent_reports,
            verdicts_follow_policies,
            verdicts_follow_nsg_rules,
            verdicts_follow_exclusions,
            verdicts_follow_vm_register_and_delete,
            verdicts_settle_the_offline_threshold,
            verdict_reads_page_and_filter_by_scope,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_tests {
    ($make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[::tokio::test]
            async fn $check() {
                let (store, guard) = ($make)().await;
                $crate::conformance::$check(&*store).await;
                drop(store);
                drop(guard);
            }
        )+
    };
}

// ---- fixtures -----------------------------------------------------------------------

/// The installation's subscription.
pub const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";
/// A subscription the store does not know.
pub const OTHER_SUB: &str = "7d2f1c5e-0b1a-4c3d-9e8f-123456789abc";
/// The bootstrap Owner.
pub const OWNER: &str = "alice";
/// The bootstrap Owner's token id.
pub const OWNER_TOKEN: &str = "jg_boot";

/// The simulated clock's start: 2026-01-01T00:00:00Z.
pub fn t0() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

/// `secs` seconds after [`t0`].
pub fn at(secs: i64) -> Timestamp {
    t0().checked_add(SignedDuration::from_secs(secs)).unwrap()
}

fn ctx(now: Timestamp) -> AuditCtx {
    AuditCtx {
        actor: OWNER.into(),
        source: "192.0.2.10".into(),
        now,
    }
}

fn ctx_as(actor: &str, now: Timestamp) -> AuditCtx {
    AuditCtx {
        actor: actor.into(),
        source: "192.0.2.20".into(),
        now,
    }
}

fn sub() -> SubscriptionId {
    SubscriptionId::parse(SUB).unwrap()
}

fn other_sub() -> SubscriptionId {
    SubscriptionId::parse(OTHER_SUB).unwrap()
}

fn rg(name: &str) -> ResourceGroup {
    ResourceGroup::parse(name).unwrap()
}

fn loc(name: &str) -> Location {
    Location::parse(name).unwrap()
}

fn vm_in(subscription: SubscriptionId, group: &str, name: &str) -> VmId {
    VmId::new(subscription, rg(group), VmName::parse(name).unwrap())
}

fn vm(group: &str, name: &str) -> VmId {
    vm_in(sub(), group, name)
}

/// The same VM id, spelled upper-case throughout.
fn shout(id: &VmId) -> VmId {
    VmId::parse(&id.to_string().to_uppercase()).unwrap()
}

fn pkey(group: &str, location: &str, name: &str) -> PolicyKey {
    PolicyKey {
        subscription: sub(),
        resource_group: rg(group),
        location: loc(location),
        name: PolicyName::parse(name).unwrap(),
    }
}

/// The same key, spelled upper-case.
fn shout_key(k: &PolicyKey) -> PolicyKey {
    PolicyKey {
        subscription: k.subscription,
        resource_group: rg(&k.resource_group.as_str().to_uppercase()),
        location: loc(&k.location.as_str().to_uppercase()),
        name: PolicyName::parse(&k.name.as_str().to_uppercase()).unwrap(),
    }
}

fn rid(n: u128) -> RequestId {
    RequestId::new(Uuid::from_u128(n))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn prefix(s: &str) -> SourcePrefix {
    SourcePrefix::parse(s).unwrap()
}

fn port(n: u16) -> Port {
    Port::new(n as i64).unwrap()
}

fn rule(n: i64, protocol: &str, max: &str) -> PortRuleInput {
    PortRuleInput {
        number: Some(n),
        protocol: Some(protocol.into()),
        allowed_source_address_prefix: Some(RawPrefix::One("*".into())),
        allowed_source_address_prefixes: None,
        max_request_access_duration: Some(max.into()),
    }
}

fn spec_with(key: &PolicyKey, vms: Vec<(&VmId, Vec<PortRuleInput>)>) -> PolicySpec {
    let input = PolicyInput {
        kind: None,
        virtual_machines: Some(
            vms.into_iter()
                .map(|(id, ports)| PolicyVmInput {
                    id: Some(id.to_string()),
                    ports: Some(ports),
                    public_ip_address: None,
                })
                .collect(),
        ),
    };
    validate_policy(key, &input).unwrap_or_else(|e| panic!("fixture policy is invalid: {e}"))
}

/// A policy spec giving each VM the listed TCP ports, from anywhere, for up to 3 hours.
fn spec(key: &PolicyKey, vms: &[(&VmId, &[i64])]) -> PolicySpec {
    spec_with(
        key,
        vms.iter()
            .map(|(id, ports)| (*id, ports.iter().map(|n| rule(*n, "TCP", "PT3H")).collect()))
            .collect(),
    )
}

fn bootstrap_input(subscription: SubscriptionId, token_id: &str) -> Bootstrap {
    Bootstrap {
        subscription,
        owner_principal: OWNER.into(),
        owner_token: token(token_id, OWNER, t0()),
    }
}

/// Every VM of `subscription` (of one resource group), in key order, through
/// `find_vms`.
async fn all_vms(
    store: &dyn Store,
    subscription: SubscriptionId,
    rg: Option<&ResourceGroup>,
) -> Vec<VmRecord> {
    store
        .find_vms(
            subscription,
            &VmFilter {
                resource_group: rg.cloned(),
                limit: 1_000_000,
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

fn token(id: &str, principal: &str, created: Timestamp) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        principal: principal.into(),
        secret_hash: format!("{:064x}", id.len() * 7919),
        description: format!("token {id}"),
        created,
        expires: None,
        revoked: None,
        identity: None,
        last_used: None,
    }
}

fn owner_assignments() -> Vec<RoleAssignment> {
    vec![RoleAssignment {
        principal: OWNER.into(),
        role: Role::Owner,
        scope: Scope::Subscription(sub()),
    }]
}

fn assignment(principal: &str, role: Role, scope: Scope) -> Vec<RoleAssignment> {
    vec![RoleAssignment {
        principal: principal.into(),
        role,
        scope,
    }]
}

/// A requested port: source `None` means "my IP" (the caller's address).
fn want(n: i64, source: Option<&str>, duration: &str) -> InitiatePortInput {
    InitiatePortInput {
        number: Some(n),
        allowed_source_address_prefix: source.map(str::to_owned),
        end_time_utc: None,
        duration: Some(duration.into()),
    }
}

fn input(vms: Vec<(&VmId, Vec<InitiatePortInput>)>) -> InitiateInput {
    InitiateInput {
        virtual_machines: Some(
            vms.into_iter()
                .map(|(id, ports)| InitiateVmInput {
                    id: Some(id.to_string()),
                    ports: Some(ports),
                })
                .collect(),
        ),
        justification: Some("maintenance".into()),
    }
}

/// An initiate by the Owner from 10.0.0.9.
fn args(key: &PolicyKey, id: RequestId, vms: Vec<(&VmId, Vec<InitiatePortInput>)>) -> InitiateArgs {
    InitiateArgs {
        policy: key.clone(),
        input: input(vms),
        id,
        requestor: OWNER.into(),
        caller_ip: ip("10.0.0.9"),
        assignments: owner_assignments(),
        idempotency_key: None,
        break_glass: None,
    }
}

async fn install(store: &dyn Store) -> SubscriptionId {
    let out = store
        .bootstrap(bootstrap_input(sub(), OWNER_TOKEN), ctx(t0()))
        .await
        .expect("bootstrap failed");
    assert!(
        out.created,
        "bootstrap of an empty store must report created"
    );
    out.subscription
}

async fn register(store: &dyn Store, id: &VmId, now: Timestamp) {
    let out = store
        .register_vm(
            VmRecord {
                id: id.clone(),
                location: Some(loc("westeurope")),
                created: now,
                created_by: OWNER.into(),
            },
            ctx(now),
        )
        .await
        .unwrap_or_else(|e| panic!("register_vm({id}) failed: {e:?}"));
    assert_eq!(out, RegisterOutcome::Created, "register_vm({id})");
}

async fn put(
    store: &dyn Store,
    key: &PolicyKey,
    spec: PolicySpec,
    now: Timestamp,
) -> PutPolicyOutcome {
    store
        .put_policy(key.clone(), spec, ctx(now))
        .await
        .unwrap_or_else(|e| panic!("put_policy({}) failed: {e:?}", key.id()))
}

async fn initiate_ok(store: &dyn Store, a: InitiateArgs, now: Timestamp) -> AccessRequest {
    let id = a.id;
    store
        .initiate(a, ctx(now))
        .await
        .unwrap_or_else(|e| panic!("initiate {id} failed: {e:?}"))
}

async fn request(store: &dyn Store, id: RequestId) -> AccessRequest {
    store
        .get_request(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("request {id} not found"))
}

/// The status of `vm`'s port `number` in request `id`.
async fn status_of(store: &dyn Store, id: RequestId, vm: &VmId, number: u16) -> PortStatus {
    let r = request(store, id).await;
    r.vms
        .iter()
        .find(|v| v.id == *vm)
        .and_then(|v| v.ports.iter().find(|p| p.number == port(number)))
        .unwrap_or_else(|| panic!("request {id} has no port {number} on {vm}"))
        .status
}

async fn verified(store: &dyn Store) -> VerifyReport {
    let r = store.verify_audit(None).await.expect("verify_audit failed");
    assert!(r.ok(), "the audit chain does not verify: {:?}", r.problems);
    r
}

async fn audit_count(store: &dyn Store) -> u64 {
    verified(store).await.count
}

async fn events_after(store: &dyn Store, after: u64) -> Vec<AuditRecord> {
    store
        .query_audit(&AuditQuery {
            after_seq: Some(after),
            limit: 100_000,
            ..Default::default()
        })
        .await
        .expect("query_audit failed")
}

fn seqs(records: &[AuditRecord]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

fn revoked(
    request: RequestId,
    vm: &VmId,
    number: u16,
    source: &str,
    end: Timestamp,
    reason: RevokeReason,
) -> RevokedPort {
    RevokedPort {
        request,
        vm: vm.clone(),
        number: port(number),
        source: prefix(source),
        end,
        reason,
    }
}

fn sorted(mut v: Vec<RevokedPort>) -> Vec<RevokedPort> {
    v.sort_by_key(|r| (r.request, r.vm.key(), r.number));
    v
}

fn sorted_grants(mut v: Vec<Grant>) -> Vec<Grant> {
    v.sort_by_key(|g| (g.request, g.number));
    v
}

fn names(policies: &[Policy]) -> Vec<String> {
    policies
        .iter()
        .map(|p| p.key.name.as_str().to_owned())
        .collect()
}

fn request_ids(requests: &[AccessRequest]) -> Vec<RequestId> {
    requests.iter().map(|r| r.id).collect()
}

fn refusal<T: std::fmt::Debug, E: std::fmt::Debug>(what: &str, r: Result<T, OpError<E>>) -> E {
    match r {
        Err(OpError::Refused(e)) => e,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// Everything observable about the store's state, to show that a refused call
/// changed nothing.
#[derive(Debug, PartialEq)]
struct Snapshot {
    audit_count: u64,
    audit_head: String,
    subscriptions: Vec<SubscriptionId>,
    vms: Vec<VmRecord>,
    policies: Vec<Policy>,
    requests: Vec<AccessRequest>,
    tokens: Vec<TokenRecord>,
    assignments: Vec<RoleAssignmentRecord>,
    next_expiry: Option<Timestamp>,
    /// Each registered VM's user NSG rules and agent status, in `vms` order.
    nsg_rules: Vec<Vec<NsgRule>>,
    agent_status: Vec<Option<AgentStatusRecord>>,
    enroll_tokens: Vec<EnrollTokenRecord>,
    /// Every VM's recommendation, read at a fixed time.
    verdicts: Vec<VmVerdict>,
}

async fn snapshot(store: &dyn Store) -> Snapshot {
    let report = verified(store).await;
    let mut vms = all_vms(store, sub(), None).await;
    vms.sort_by_key(|v| v.id.key());
    let mut tokens = store.list_tokens().await.unwrap();
    tokens.sort_by(|a, b| a.id.cmp(&b.id));
    let mut assignments = store.role_assignments(None).await.unwrap();
    assignments.sort_by(|a, b| a.id.cmp(&b.id));
    let mut requests = store
        .list_requests(&RequestFilter {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap();
    requests.sort_by_key(|r| r.id);
    let mut nsg_rules = Vec::new();
    let mut agent_status = Vec::new();
    for v in &vms {
        nsg_rules.push(store.nsg_rules(&v.id).await.unwrap());
        agent_status.push(store.agent_status(&v.id).await.unwrap());
    }
    let mut enroll_tokens = store.list_enroll_tokens().await.unwrap();
    enroll_tokens.sort_by(|a, b| a.id.cmp(&b.id));
    Snapshot {
        audit_count: report.count,
        audit_head: report.head_hash,
        subscriptions: store.subscriptions().await.unwrap(),
        vms,
        policies: store
            .list_policies(&PolicyFilter::default(), None, 100_000)
            .await
            .unwrap(),
        requests,
        tokens,
        assignments,
        next_expiry: store.next_expiry().await.unwrap(),
        nsg_rules,
        agent_status,
        enroll_tokens,
        verdicts: stored_verdicts(store, all_of(VerdictScope::default()), at(60)).await,
    }
}

/// The common setup: an installation, VMs `vm1`, `vm2` (in policy `default` of `rg1`,
/// westeurope: vm1 ports 22 and 3389, vm2 port 22) and `vm3` (in no policy).
struct Scene {
    key: PolicyKey,
    vm1: VmId,
    vm2: VmId,
    vm3: VmId,
}

async fn scene(store: &dyn Store) -> Scene {
    install(store).await;
    let s = Scene {
        key: pkey("rg1", "westeurope", "default"),
        vm1: vm("rg1", "vm1"),
        vm2: vm("rg1", "vm2"),
        vm3: vm("rg1", "vm3"),
    };
    for v in [&s.vm1, &s.vm2, &s.vm3] {
        register(store, v, t0()).await;
    }
    let sp = spec(&s.key, &[(&s.vm1, &[22, 3389]), (&s.vm2, &[22])]);
    put(store, &s.key, sp, t0()).await;
    s
}

// ---- installation -------------------------------------------------------------------

/// A second bootstrap returns the existing installation and creates nothing.
pub async fn bootstrap_is_idempotent(store: &dyn Store) {
    assert!(store.subscriptions().await.unwrap().is_empty());
    let first = store
        .bootstrap(bootstrap_input(sub(), OWNER_TOKEN), ctx(t0()))
        .await
        .unwrap();
    assert!(first.created, "first bootstrap must create");
    assert_eq!(first.subscription, sub());
    assert_eq!(store.subscriptions().await.unwrap(), vec![sub()]);
    assert_eq!(
        store.find_token(OWNER_TOKEN).await.unwrap(),
        Some(token(OWNER_TOKEN, OWNER, t0())),
        "the bootstrap token is stored as given"
    );
    let ras = store.role_assignments(Some(OWNER)).await.unwrap();
    assert_eq!(
        ras.len(),
        1,
        "bootstrap creates one role assignment: {ras:?}"
    );
    assert_eq!(
        ras[0].assignment,
        owner_assignments()[0],
        "the bootstrap principal is Owner at the subscription"
    );
    assert!(audit_count(store).await >= 1, "bootstrap is audited");

    let before = snapshot(store).await;
    let second = store
        .bootstrap(bootstrap_input(other_sub(), "jg_second"), ctx(at(60)))
        .await
        .unwrap();
    assert!(
        !second.created,
        "second bootstrap must report created=false"
    );
    assert_eq!(
        second.subscription,
        sub(),
        "second bootstrap returns the existing subscription"
    );
    assert_eq!(
        store.find_token("jg_second").await.unwrap(),
        None,
        "second bootstrap must not store its token"
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "second bootstrap changed the store"
    );
}

// ---- VMs ----------------------------------------------------------------------------

/// Registering twice (in any casing) gives Created then AlreadyRegistered.
pub async fn register_vm_is_idempotent_and_case_insensitive(store: &dyn Store) {
    install(store).await;
    let id = vm("myRg", "myVm");
    assert_eq!(store.get_vm(&id).await.unwrap(), None);
    let rec = VmRecord {
        id: id.clone(),
        location: Some(loc("westeurope")),
        created: at(10),
        created_by: "agent-1".into(),
    };
    let n0 = audit_count(store).await;
    let out = store.register_vm(rec.clone(), ctx(at(10))).await.unwrap();
    assert_eq!(out, RegisterOutcome::Created);
    assert_eq!(audit_count(store).await, n0 + 1, "registration is audited");
    assert_eq!(store.get_vm(&id).await.unwrap(), Some(rec.clone()));

    let before = snapshot(store).await;
    let again = VmRecord {
        id: shout(&id),
        location: None,
        created: at(20),
        created_by: "someone-else".into(),
    };
    let out = store.register_vm(again, ctx(at(20))).await.unwrap();
    assert_eq!(
        out,
        RegisterOutcome::AlreadyRegistered,
        "VM ids match case-insensitively"
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "re-registering changed the store"
    );
    let got = store.get_vm(&shout(&id)).await.unwrap().unwrap();
    assert_eq!(
        got, rec,
        "lookup is case-insensitive and keeps the first record"
    );
    assert_eq!(got.id.name.as_str(), "myVm", "the original casing is kept");
    assert_eq!(got.id.resource_group.as_str(), "myRg");
    assert_eq!(all_vms(store, sub(), None).await.len(), 1);
}

/// A VM of a subscription the store does not know is refused.
pub async fn register_vm_refuses_unknown_subscription(store: &dyn Store) {
    install(store).await;
    let before = snapshot(store).await;
    let id = vm_in(other_sub(), "rg1", "vm1");
    let r = store
        .register_vm(
            VmRecord {
                id: id.clone(),
                location: None,
                created: at(10),
                created_by: OWNER.into(),
            },
            ctx(at(10)),
        )
        .await;
    assert_eq!(
        refusal("register_vm in an unknown subscription", r),
        VmError::UnknownSubscription(other_sub())
    );
    assert_eq!(store.get_vm(&id).await.unwrap(), None);
    assert!(all_vms(store, other_sub(), None).await.is_empty());
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusal changed the store"
    );
}

/// VMs are listed by subscription and (case-insensitively) resource group.
pub async fn list_vms_by_subscription_and_resource_group(store: &dyn Store) {
    install(store).await;
    let a1 = vm("rgA", "vm1");
    let a2 = vm("rgA", "vm2");
    let b1 = vm("rgB", "vm1");
    for v in [&b1, &a2, &a1] {
        register(store, v, at(1)).await;
    }
    let keys = |v: Vec<VmRecord>| {
        let mut k: Vec<String> = v.into_iter().map(|r| r.id.key()).collect();
        k.sort();
        k
    };
    let mut all = vec![a1.key(), a2.key(), b1.key()];
    all.sort();
    assert_eq!(keys(all_vms(store, sub(), None).await), all);
    assert_eq!(
        keys(all_vms(store, sub(), Some(&rg("rgA"))).await),
        vec![a1.key(), a2.key()]
    );
    assert_eq!(
        keys(all_vms(store, sub(), Some(&rg("RGA"))).await),
        vec![a1.key(), a2.key()],
        "the resource group matches case-insensitively"
    );
    assert_eq!(
        keys(all_vms(store, sub(), Some(&rg("rgb"))).await),
        vec![b1.key()]
    );
    assert!(all_vms(store, sub(), Some(&rg("rgC"))).await.is_empty());
    assert!(all_vms(store, other_sub(), None).await.is_empty());
}

/// A VM in a policy cannot be deleted; once out of it, it can, once.
/// VMs come in pages in key order, filtered by name (across resource groups) and by
/// resource group in the store, each page starting after the previous one's last.
pub async fn find_vms_pages_and_filters_by_name_and_group(store: &dyn Store) {
    install(store).await;
    let all = [
        vm("rg-a", "web-1"),
        vm("rg-a", "web-2"),
        vm("rg-b", "Web-1"),
        vm("rg-b", "db"),
        vm("rg-c", "web-10"),
    ];
    for v in &all {
        register(store, v, t0()).await;
    }
    let keys = |vms: &[VmRecord]| vms.iter().map(|v| v.id.key()).collect::<Vec<_>>();
    let mut expected: Vec<String> = all.iter().map(VmId::key).collect();
    expected.sort();
    // Pages of two cover everything once, in key order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .find_vms(
                sub(),
                &VmFilter {
                    after: after.clone(),
                    limit: 2,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().id.key());
        seen.extend(keys(&page));
    }
    assert_eq!(seen, expected);
    // By name, whatever its case and group; not a prefix match.
    let named = store
        .find_vms(
            sub(),
            &VmFilter {
                name: Some(VmName::parse("WEB-1").unwrap()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        keys(&named),
        vec![vm("rg-a", "web-1").key(), vm("rg-b", "web-1").key()]
    );
    // By group and name.
    let both = store
        .find_vms(
            sub(),
            &VmFilter {
                resource_group: Some(ResourceGroup::parse("RG-B").unwrap()),
                name: Some(VmName::parse("web-1").unwrap()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(keys(&both), vec![vm("rg-b", "web-1").key()]);
    assert_eq!(
        both[0].id.name.to_string(),
        "Web-1",
        "the original casing is kept"
    );
    // By group, paged.
    let group = store
        .find_vms(
            sub(),
            &VmFilter {
                resource_group: Some(ResourceGroup::parse("rg-a").unwrap()),
                after: Some(vm("rg-a", "web-1").key()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(keys(&group), vec![vm("rg-a", "web-2").key()]);
    // Another subscription has none of them.
    let other = SubscriptionId::new(Uuid::from_u128(0xdead));
    let none = store
        .find_vms(
            other,
            &VmFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// A page's policy, live grants and agent presence are read together, in the page's
/// order; unknown VMs are left out.
pub async fn vm_summaries_read_a_page_at_once(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![(
                &s.vm1,
                vec![
                    want(22, Some("10.0.0.9"), "PT1H"),
                    want(3389, Some("10.0.0.9"), "PT5M"),
                ],
            )],
        ),
        at(0),
    )
    .await;
    store
        .put_agent_status(
            AgentStatusRecord {
                vm: s.vm2.clone(),
                report: "{}".into(),
                last_seen: at(30),
            },
            quiet_agent(),
        )
        .await
        .unwrap();
    let ssh = nsg_rule("corp-ssh", 300, Access::Allow, &["22"], &["10.0.0.0/8"]);
    let web = nsg_rule("web", 200, Access::Allow, &["80", "443"], &["*"]);
    for r in [&ssh, &web] {
        store
            .put_nsg_rule(&s.vm3, r.clone(), ctx(at(1)))
            .await
            .unwrap();
    }
    let ghost = vm("rg1", "ghost");
    let page = store
        .vm_summaries(
            &[s.vm3.clone(), ghost, s.vm1.clone(), s.vm2.clone()],
            at(60),
        )
        .await
        .unwrap();
    let ids: Vec<&VmId> = page.iter().map(|p| &p.vm).collect();
    assert_eq!(ids, vec![&s.vm3, &s.vm1, &s.vm2]);
    let (v3, v1, v2) = (&page[0], &page[1], &page[2]);
    assert_eq!(v3.policy, None);
    assert_eq!((v3.live_grants, v3.agent_last_seen), (0, None));
    let p1 = v1.policy.as_ref().expect("vm1 is protected");
    assert_eq!(p1.key, s.key);
    let ports: Vec<u16> = p1.vm.ports.iter().map(|r| r.number.get()).collect();
    assert_eq!(ports, vec![22, 3389]);
    assert_eq!(v1.live_grants, 2);
    assert_eq!(v2.agent_last_seen, Some(at(30)));
    assert_eq!(v2.live_grants, 0);
    // After the 5-minute port ended, one grant is left.
    let later = store
        .vm_summaries(std::slice::from_ref(&s.vm1), at(400))
        .await
        .unwrap();
    assert_eq!(later[0].live_grants, 1);
    assert!(store.vm_summaries(&[], at(0)).await.unwrap().is_empty());
}

pub async fn delete_vm_refused_while_in_policy(store: &dyn Store) {
    let s = scene(store).await;
    let before = snapshot(store).await;
    let r = store.delete_vm(&shout(&s.vm1), ctx(at(10))).await;
    match refusal("delete_vm of a VM in a policy", r) {
        VmError::InPolicy(k) => assert!(
            k.eq_ignore_ascii_case(&s.key.key()),
            "InPolicy names {k}, expected {}",
            s.key.key()
        ),
        other => panic!("expected InPolicy, got {other:?}"),
    }
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusal changed the store"
    );

    // vm3 is in no policy.
    let n0 = audit_count(store).await;
    assert!(store.delete_vm(&shout(&s.vm3), ctx(at(20))).await.unwrap());
    assert_eq!(store.get_vm(&s.vm3).await.unwrap(), None);
    assert_eq!(audit_count(store).await, n0 + 1, "vm deletion is audited");
    let before = snapshot(store).await;
    assert!(
        !store.delete_vm(&s.vm3, ctx(at(30))).await.unwrap(),
        "deleting an absent VM returns false"
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "deleting nothing changed the store"
    );

    // Out of the policy, vm1 can go.
    store.delete_policy(&s.key, ctx(at(40))).await.unwrap();
    assert!(store.delete_vm(&s.vm1, ctx(at(50))).await.unwrap());
    assert_eq!(store.get_vm(&s.vm1).await.unwrap(), None);
    verified(store).await;
}

// ---- policies -----------------------------------------------------------------------

/// `put_policy` reports created on the first write and not on later ones.
pub async fn put_policy_creates_then_updates(store: &dyn Store) {
    install(store).await;
    let v1 = vm("rg1", "vm1");
    let v2 = vm("rg1", "vm2");
    register(store, &v1, t0()).await;
    register(store, &v2, t0()).await;
    let key = pkey("rg1", "westeurope", "default");
    assert_eq!(store.get_policy(&key).await.unwrap(), None);

    let n0 = audit_count(store).await;
    let first = spec(&key, &[(&v1, &[22])]);
    let out = put(store, &key, first.clone(), at(10)).await;
    assert_eq!(
        out,
        PutPolicyOutcome {
            created: true,
            previous_vms: vec![],
            revoked: vec![]
        }
    );
    let got = store.get_policy(&key).await.unwrap().unwrap();
    assert_eq!(got.key, key);
    assert_eq!(got.spec, first, "the policy reads back as written");
    assert_eq!(audit_count(store).await, n0 + 1, "creation is audited");

    let second = spec_with(
        &key,
        vec![
            (&v1, vec![rule(22, "TCP", "PT1H"), rule(3389, "*", "PT2H")]),
            (&v2, vec![rule(5985, "UDP", "PT30M")]),
        ],
    );
    let out = put(store, &shout_key(&key), second.clone(), at(20)).await;
    assert!(
        !out.created,
        "writing an existing policy (in any casing) is an update"
    );
    assert!(out.revoked.is_empty());
    assert_eq!(
        store.get_policy(&key).await.unwrap().unwrap().spec,
        second,
        "the update is stored"
    );
    assert_eq!(
        store
            .list_policies(&PolicyFilter::default(), None, 100)
            .await
            .unwrap()
            .len(),
        1,
        "an update does not add a policy"
    );
    assert_eq!(audit_count(store).await, n0 + 2, "the update is audited");
    assert_eq!(
        store.vm_policy(&v2).await.unwrap().map(|p| p.key),
        Some(key)
    );
}

/// A policy in a subscription the store does not know is refused.
pub async fn put_policy_refuses_unknown_subscription(store: &dyn Store) {
    install(store).await;
    let before = snapshot(store).await;
    let key = PolicyKey {
        subscription: other_sub(),
        ..pkey("rg1", "westeurope", "default")
    };
    let v = vm_in(other_sub(), "rg1", "vm1");
    let sp = spec(&key, &[(&v, &[22])]);
    let r = store.put_policy(key.clone(), sp, ctx(at(10))).await;
    assert_eq!(
        refusal("put_policy in an unknown subscription", r),
        PolicyError::UnknownSubscription(other_sub())
    );
    assert_eq!(store.get_policy(&key).await.unwrap(), None);
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusal changed the store"
    );
}

/// An unregistered VM is refused, naming its field; nothing changes.
pub async fn put_policy_refuses_unknown_vm(store: &dyn Store) {
    let s = scene(store).await;
    let ghost = vm("rg1", "ghost");

    // On create.
    let key2 = pkey("rg1", "westeurope", "second");
    let before = snapshot(store).await;
    let r = store
        .put_policy(
            key2.clone(),
            spec(&key2, &[(&s.vm3, &[22]), (&ghost, &[22])]),
            ctx(at(10)),
        )
        .await;
    match refusal("put_policy with an unregistered VM", r) {
        PolicyError::UnknownVm(f) => assert_eq!(f.field, "properties.virtualMachines[1].id"),
        other => panic!("expected UnknownVm, got {other:?}"),
    }
    assert_eq!(store.get_policy(&key2).await.unwrap(), None);
    assert_eq!(store.vm_policy(&s.vm3).await.unwrap(), None);
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusal changed the store"
    );

    // On update: the existing policy stays as it was.
    let r = store
        .put_policy(
            s.key.clone(),
            spec(&s.key, &[(&ghost, &[22]), (&s.vm1, &[22])]),
            ctx(at(20)),
        )
        .await;
    match refusal("put_policy update with an unregistered VM", r) {
        PolicyError::UnknownVm(f) => assert_eq!(f.field, "properties.virtualMachines[0].id"),
        other => panic!("expected UnknownVm, got {other:?}"),
    }
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusal changed the store"
    );
}

/// A VM already protected by another policy is refused, naming its field.
pub async fn put_policy_refuses_vm_in_other_policy(store: &dyn Store) {
    let s = scene(store).await;
    let other = pkey("rg1", "westeurope", "other");
    let before = snapshot(store).await;
    let r = store
        .put_policy(
            other.clone(),
            spec(&other, &[(&s.vm3, &[22]), (&shout(&s.vm1), &[22])]),
            ctx(at(10)),
        )
        .await;
    match refusal("put_policy with a VM of another policy", r) {
        PolicyError::VmInOtherPolicy(f) => {
            assert_eq!(f.field, "properties.virtualMachines[1].id")
        }
        other => panic!("expected VmInOtherPolicy, got {other:?}"),
    }
    assert_eq!(store.get_policy(&other).await.unwrap(), None);
    assert_eq!(
        store.vm_policy(&s.vm1).await.unwrap().map(|p| p.key),
        Some(s.key.clone())
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusal changed the store"
    );

    // Once the first policy lets go of vm2, another policy may take it.
    put(
        store,
        &s.key,
        spec(&s.key, &[(&s.vm1, &[22, 3389])]),
        at(20),
    )
    .await;
    put(store, &other, spec(&other, &[(&s.vm2, &[22])]), at(30)).await;
    assert_eq!(
        store.vm_policy(&s.vm2).await.unwrap().map(|p| p.key),
        Some(other)
    );
}

fn apply_note() -> AuditNote {
    AuditNote {
        action: "recommendations.apply".into(),
        target: format!("/subscriptions/{SUB}"),
        details: r#"{"enabled":["vm3","vm4"]}"#.into(),
    }
}

/// `apply_policies` commits its policy writes and its summary event in one
/// transaction: when one write is refused (here a VM another policy protects), none of
/// them is written, not even those before it, and no summary says it succeeded. Without
/// the refused write, every policy is written with its own event, then the summary.
pub async fn apply_policies_is_all_or_nothing(store: &dyn Store) {
    let s = scene(store).await;
    let vm4 = vm("rg2", "vm4");
    register(store, &vm4, t0()).await;
    let fresh = pkey("rg2", "westeurope", "default");
    let other = pkey("rg1", "westeurope", "other");
    let grown = spec(
        &s.key,
        &[(&s.vm1, &[22, 3389]), (&s.vm2, &[22]), (&s.vm3, &[22])],
    );
    let before = snapshot(store).await;
    let r = store
        .apply_policies(
            vec![
                (fresh.clone(), spec(&fresh, &[(&vm4, &[22])])),
                (s.key.clone(), grown.clone()),
                // vm2 is protected by the default policy.
                (other.clone(), spec(&other, &[(&shout(&s.vm2), &[3389])])),
            ],
            apply_note(),
            ctx(at(10)),
        )
        .await;
    match refusal("apply_policies with a VM of another policy", r) {
        PolicyError::VmInOtherPolicy(f) => {
            assert_eq!(f.field, "properties.virtualMachines[0].id")
        }
        other => panic!("expected VmInOtherPolicy, got {other:?}"),
    }
    assert_eq!(store.get_policy(&fresh).await.unwrap(), None);
    assert_eq!(store.vm_policy(&s.vm3).await.unwrap(), None);
    assert_eq!(
        snapshot(store).await,
        before,
        "a refused apply changed the store or its audit log"
    );
    assert!(summaries(store).await.is_empty());

    let out = store
        .apply_policies(
            vec![
                (fresh.clone(), spec(&fresh, &[(&vm4, &[22])])),
                (s.key.clone(), grown.clone()),
            ],
            apply_note(),
            ctx(at(20)),
        )
        .await
        .unwrap_or_else(|e| panic!("apply_policies failed: {e:?}"));
    assert_eq!(
        out.iter().map(|o| o.created).collect::<Vec<_>>(),
        [true, false]
    );
    assert_eq!(out[1].previous_vms, vec![s.vm1.clone(), s.vm2.clone()]);
    assert_eq!(store.get_policy(&s.key).await.unwrap().unwrap().spec, grown);
    assert_eq!(
        store.vm_policy(&vm4).await.unwrap().map(|p| p.key),
        Some(fresh.clone())
    );
    assert_eq!(
        store.vm_policy(&s.vm3).await.unwrap().map(|p| p.key),
        Some(s.key.clone())
    );
    let events = store
        .query_audit(&AuditQuery {
            after_seq: Some(before.audit_count),
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e.entry.action.as_str()).collect();
    assert_eq!(
        actions,
        ["policy.create", "policy.update", "recommendations.apply"]
    );
    let summary = &events[2].entry;
    let note = apply_note();
    assert_eq!(
        (&summary.target, &summary.details, &summary.actor),
        (&note.target, &note.details, &OWNER.to_owned())
    );
    assert_eq!(summary.time, at(20).to_string());
    assert_eq!(summary.outcome, Outcome::Success);
    assert_eq!(summaries(store).await.len(), 1);
    verified(store).await;
}

async fn summaries(store: &dyn Store) -> Vec<AuditRecord> {
    let q = AuditQuery {
        action: Some("recommendations.apply".into()),
        ..Default::default()
    };
    store.query_audit(&q).await.unwrap()
}

/// Policies are found whatever the casing of their key, and keep their own casing.
pub async fn get_policy_is_case_insensitive(store: &dyn Store) {
    install(store).await;
    let v = vm("myRg", "vm1");
    register(store, &v, t0()).await;
    let key = pkey("myRg", "westEurope", "Default");
    let sp = spec(&key, &[(&v, &[22])]);
    put(store, &key, sp.clone(), at(10)).await;
    for k in [
        key.clone(),
        shout_key(&key),
        pkey("myrg", "westeurope", "default"),
    ] {
        let p = store
            .get_policy(&k)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("get_policy({}) found nothing", k.id()));
        assert_eq!(p.spec, sp);
        assert_eq!(p.key.resource_group.as_str(), "myRg", "casing is kept");
        assert_eq!(p.key.location.as_str(), "westEurope", "casing is kept");
        assert_eq!(p.key.name.as_str(), "Default", "casing is kept");
    }
    assert_eq!(
        store
            .get_policy(&pkey("myRg", "westEurope", "Other"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .get_policy(&pkey("myRg", "northeurope", "Default"))
            .await
            .unwrap(),
        None,
        "the location is part of the key"
    );
}

/// `list_policies` filters by subscription, resource group and location.
pub async fn list_policies_filters(store: &dyn Store) {
    install(store).await;
    let (va1, va2, vb1) = (vm("rgA", "a1"), vm("rgA", "a2"), vm("rgB", "b1"));
    for v in [&va1, &va2, &vb1] {
        register(store, v, t0()).await;
    }
    let p1 = pkey("rgA", "westeurope", "p1");
    let p2 = pkey("rgA", "northeurope", "p2");
    let p3 = pkey("rgB", "westeurope", "p3");
    put(store, &p1, spec(&p1, &[(&va1, &[22])]), at(1)).await;
    put(store, &p2, spec(&p2, &[(&va2, &[22])]), at(2)).await;
    put(store, &p3, spec(&p3, &[(&vb1, &[22])]), at(3)).await;

    let list = |f: PolicyFilter| async move {
        let out = store.list_policies(&f, None, 100).await.unwrap();
        let keys: Vec<String> = out.iter().map(|p| p.key.key()).collect();
        let mut in_order = keys.clone();
        in_order.sort();
        assert_eq!(keys, in_order, "list_policies must return key order");
        let mut n = names(&out);
        n.sort();
        n
    };
    let f = |s: Option<SubscriptionId>, g: Option<&str>, l: Option<&str>| PolicyFilter {
        subscription: s,
        resource_group: g.map(rg),
        location: l.map(loc),
    };
    assert_eq!(list(f(None, None, None)).await, ["p1", "p2", "p3"]);
    assert_eq!(list(f(Some(sub()), None, None)).await, ["p1", "p2", "p3"]);
    assert!(list(f(Some(other_sub()), None, None)).await.is_empty());
    assert_eq!(list(f(None, Some("RGA"), None)).await, ["p1", "p2"]);
    assert_eq!(list(f(None, None, Some("WestEurope"))).await, ["p1", "p3"]);
    assert_eq!(
        list(f(Some(sub()), Some("rga"), Some("westeurope"))).await,
        ["p1"]
    );
    assert!(
        list(f(None, Some("rgB"), Some("northeurope")))
            .await
            .is_empty()
    );
    assert!(list(f(None, Some("rgC"), None)).await.is_empty());
}

/// Paging with `after` (the last key of the previous page) and `limit` walks the
/// policies in key order, each exactly once.
pub async fn list_policies_pages_in_key_order(store: &dyn Store) {
    install(store).await;
    let names_in = ["p3", "P1", "p5", "p2", "P4"];
    for (i, n) in names_in.iter().enumerate() {
        let v = vm("rgP", &format!("vm{i}"));
        register(store, &v, t0()).await;
        let k = pkey("rgP", "westeurope", n);
        put(store, &k, spec(&k, &[(&v, &[22])]), at(i as i64)).await;
    }
    let all = store
        .list_policies(&PolicyFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(
        names(&all),
        ["P1", "p2", "p3", "P4", "p5"],
        "key order ignores case"
    );

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store
            .list_policies(&PolicyFilter::default(), after.as_deref(), 2)
            .await
            .unwrap();
        assert!(page.len() <= 2, "limit exceeded: {}", page.len());
        if page.is_empty() {
            break;
        }
        pages += 1;
        assert!(pages <= 3, "paging does not end: {seen:?}");
        after = Some(page.last().unwrap().key.key());
        seen.extend(names(&page));
    }
    assert_eq!(seen, ["P1", "p2", "p3", "P4", "p5"]);
    assert_eq!(pages, 3);

    let filtered = store
        .list_policies(
            &PolicyFilter {
                resource_group: Some(rg("RGP")),
                ..Default::default()
            },
            Some(&pkey("rgP", "westeurope", "p2").key()),
            2,
        )
        .await
        .unwrap();
    assert_eq!(
        names(&filtered),
        ["p3", "P4"],
        "`after` is exclusive and combines with filters"
    );
}

/// `vm_policy` finds the policy protecting a VM (its entry), case-insensitively.
pub async fn vm_policy_finds_the_protecting_policy(store: &dyn Store) {
    let s = scene(store).await;
    let p = store.vm_policy(&shout(&s.vm1)).await.unwrap().unwrap();
    assert_eq!(p.key, s.key);
    let whole = store.get_policy(&s.key).await.unwrap().unwrap();
    assert_eq!(
        &p.vm,
        whole.vm(&s.vm1).unwrap(),
        "the VM's own entry of that policy"
    );
    assert_eq!(
        store.vm_policy(&s.vm2).await.unwrap().map(|p| p.key),
        Some(s.key.clone())
    );
    assert_eq!(store.vm_policy(&s.vm3).await.unwrap(), None);
    assert_eq!(
        store.vm_policy(&vm("rg1", "unregistered")).await.unwrap(),
        None
    );
    put(store, &s.key, spec(&s.key, &[(&s.vm1, &[22])]), at(10)).await;
    assert_eq!(
        store.vm_policy(&s.vm2).await.unwrap(),
        None,
        "a VM dropped from its policy is in none"
    );
    assert!(store.vm_policy(&s.vm1).await.unwrap().is_some());
}

// ---- requests -----------------------------------------------------------------------

/// An accepted initiate is stored as planned and readable in every way.
pub async fn initiate_stores_the_request(store: &dyn Store) {
    let s = scene(store).await;
    let n0 = audit_count(store).await;
    let r = initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![
                (
                    &s.vm1,
                    vec![
                        want(22, None, "PT1H"),
                        want(3389, Some("10.1.0.0/16"), "PT2H"),
                    ],
                ),
                (&s.vm2, vec![want(22, None, "PT30M")]),
            ],
        ),
        at(100),
    )
    .await;
    assert_eq!(r.id, rid(1));
    assert_eq!(r.policy_key, s.key.key());
    assert_eq!(r.requestor, OWNER);
    assert_eq!(r.justification.as_deref(), Some("maintenance"));
    assert_eq!(r.start, at(100));
    assert_eq!(r.caller_ip, ip("10.0.0.9"));
    assert_eq!(r.vms.len(), 2);
    assert_eq!(r.vms[0].id, s.vm1);
    let p = &r.vms[0].ports;
    assert_eq!(
        (p[0].number, p[0].source, p[0].end, p[0].status),
        (
            port(22),
            prefix("10.0.0.9"),
            at(100 + 3600),
            PortStatus::Initiated
        )
    );
    assert_eq!(p[0].protocol, Protocol::Tcp);
    assert_eq!(
        (p[1].number, p[1].source, p[1].end),
        (port(3389), prefix("10.1.0.0/16"), at(100 + 7200))
    );
    assert_eq!(r.vms[1].ports[0].end, at(100 + 1800));

    assert_eq!(
        store.get_request(rid(1)).await.unwrap(),
        Some(r.clone()),
        "get_request reads back the request exactly"
    );
    assert_eq!(store.get_request(rid(2)).await.unwrap(), None);
    assert_eq!(
        store.policy_requests(&s.key, 10).await.unwrap(),
        vec![r.clone()]
    );
    assert_eq!(
        store.policy_requests(&shout_key(&s.key), 10).await.unwrap(),
        vec![r.clone()],
        "policy_requests matches the key case-insensitively"
    );
    let events = events_after(store, n0).await;
    assert!(
        !events.is_empty() && events.iter().all(|e| e.entry.action == "request.initiate"),
        "initiate appends request.initiate events: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.entry.target.eq_ignore_ascii_case(&s.vm1.to_string())),
        "an initiate event targets the VM"
    );
    verified(store).await;
}

/// `policy_requests` lists the newest first, at most `limit`.
pub async fn policy_requests_are_newest_first(store: &dyn Store) {
    let s = scene(store).await;
    let ids = [rid(1), rid(2), rid(3)];
    for (i, id) in ids.iter().enumerate() {
        let src = format!("10.{i}.0.0/16");
        initiate_ok(
            store,
            args(
                &s.key,
                *id,
                vec![(&s.vm1, vec![want(22, Some(&src), "PT1H")])],
            ),
            at(10 * i as i64),
        )
        .await;
    }
    assert_eq!(
        request_ids(&store.policy_requests(&s.key, 10).await.unwrap()),
        vec![rid(3), rid(2), rid(1)]
    );
    assert_eq!(
        request_ids(&store.policy_requests(&s.key, 2).await.unwrap()),
        vec![rid(3), rid(2)]
    );
    let other = pkey("rg1", "westeurope", "nothing");
    assert!(store.policy_requests(&other, 10).await.unwrap().is_empty());
}

/// A newer request for the same VM, port and source revokes the older port
/// (NewerRequestInitiated); other sources and other ports stay initiated.
pub async fn initiate_supersedes_same_vm_port_and_source(store: &dyn Store) {
    let s = scene(store).await;
    // r1: vm1 22 from my IP and vm1 3389 from my IP.
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![(
                &s.vm1,
                vec![want(22, None, "PT1H"), want(3389, None, "PT1H")],
            )],
        ),
        at(0),
    )
    .await;
    // r2: vm1 22 from another source.
    initiate_ok(
        store,
        args(
            &s.key,
            rid(2),
            vec![(&s.vm1, vec![want(22, Some("10.1.0.0/16"), "PT1H")])],
        ),
        at(10),
    )
    .await;
    let n0 = audit_count(store).await;
    // r3: vm1 22 from my IP again (written as an explicit address).
    let r3 = initiate_ok(
        store,
        args(
            &s.key,
            rid(3),
            vec![(&shout(&s.vm1), vec![want(22, Some("10.0.0.9"), "PT2H")])],
        ),
        at(20),
    )
    .await;
    assert_eq!(r3.vms[0].ports[0].status, PortStatus::Initiated);
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Revoked(RevokeReason::NewerRequestInitiated),
        "the older port with the same VM, port and source is superseded"
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 3389).await,
        PortStatus::Initiated,
        "another port of the older request stays"
    );
    assert_eq!(
        status_of(store, rid(2), &s.vm1, 22).await,
        PortStatus::Initiated,
        "a different source stays"
    );
    let live = sorted_grants(store.live_grants(&s.vm1, at(30)).await.unwrap());
    let live: Vec<(RequestId, Port)> = live.iter().map(|g| (g.request, g.number)).collect();
    assert_eq!(
        live,
        vec![(rid(1), port(3389)), (rid(2), port(22)), (rid(3), port(22))]
    );
    let mut actions: Vec<String> = events_after(store, n0)
        .await
        .into_iter()
        .map(|e| e.entry.action)
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        ["request.initiate", "request.revoke"],
        "superseding is audited"
    );
    verified(store).await;
}

/// Regression (issue 8.1): a requester could end someone else's grant by initiating a
/// short request with the same VM, port and source. Superseding replaces only the same
/// requestor's grants; both grants stay live and the later end counts for enforcement.
pub async fn initiate_never_supersedes_another_requestors_grant(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![(&s.vm1, vec![want(22, Some("10.0.0.9"), "PT2H")])],
        ),
        at(0),
    )
    .await;
    let mallory = InitiateArgs {
        requestor: "mallory".into(),
        assignments: assignment("mallory", Role::JitRequester, Scope::Subscription(sub())),
        ..args(
            &s.key,
            rid(2),
            vec![(&s.vm1, vec![want(22, Some("10.0.0.9"), "PT5M")])],
        )
    };
    let n0 = audit_count(store).await;
    initiate_ok(store, mallory, at(10)).await;
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Initiated,
        "another requestor's grant for the same source stays"
    );
    let live = sorted_grants(store.live_grants(&s.vm1, at(20)).await.unwrap());
    let live: Vec<RequestId> = live.iter().map(|g| g.request).collect();
    assert_eq!(live, vec![rid(1), rid(2)]);
    let actions: Vec<String> = events_after(store, n0)
        .await
        .into_iter()
        .map(|e| e.entry.action)
        .collect();
    assert_eq!(actions, ["request.initiate"], "nothing was revoked");
    // Mallory's own newer request does supersede her earlier one.
    let mallory2 = InitiateArgs {
        requestor: "mallory".into(),
        assignments: assignment("mallory", Role::JitRequester, Scope::Subscription(sub())),
        ..args(
            &s.key,
            rid(3),
            vec![(&s.vm1, vec![want(22, Some("10.0.0.9"), "PT5M")])],
        )
    };
    initiate_ok(store, mallory2, at(30)).await;
    assert_eq!(
        status_of(store, rid(2), &s.vm1, 22).await,
        PortStatus::Revoked(RevokeReason::NewerRequestInitiated)
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Initiated
    );
    verified(store).await;
}

/// Refused initiates (no policy, invalid input, forbidden VM) change nothing, and in
/// particular supersede nothing.
pub async fn initiate_refusals_change_nothing(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    let before = &snapshot(store).await;
    let now = at(60);
    let try_ = |a: InitiateArgs| async move {
        let id = a.id;
        let r = store.initiate(a, ctx(now)).await;
        let e = refusal("initiate", r);
        assert_eq!(
            store.get_request(id).await.unwrap(),
            None,
            "a refused request was stored"
        );
        assert_eq!(
            &snapshot(store).await,
            before,
            "refused initiate changed state: {e:?}"
        );
        e
    };

    let missing = pkey("rg1", "westeurope", "missing");
    assert_eq!(
        try_(args(
            &missing,
            rid(10),
            vec![(&s.vm1, vec![want(22, None, "PT1H")])]
        ))
        .await,
        InitiateRefusal::PolicyNotFound
    );

    let field = |e: InitiateRefusal| match e {
        InitiateRefusal::Invalid(f) => f.field,
        other => panic!("expected Invalid, got {other:?}"),
    };
    // Port 22 would supersede rid(1); port 8080 is not in the policy.
    let e = try_(args(
        &s.key,
        rid(11),
        vec![(
            &s.vm1,
            vec![want(22, None, "PT1H"), want(8080, None, "PT1H")],
        )],
    ))
    .await;
    assert_eq!(field(e), "virtualMachines[0].ports[1].number");
    let e = try_(args(
        &s.key,
        rid(12),
        vec![(&s.vm1, vec![want(22, None, "PT4H")])],
    ))
    .await;
    assert_eq!(field(e), "virtualMachines[0].ports[0].duration");
    let e = try_(args(
        &s.key,
        rid(13),
        vec![
            (&s.vm1, vec![want(22, None, "PT1H")]),
            (&s.vm3, vec![want(22, None, "PT1H")]),
        ],
    ))
    .await;
    assert_eq!(field(e), "virtualMachines[1].id");

    // bob holds the initiate action on vm2 only.
    let as_bob = |id: RequestId, assignments: Vec<RoleAssignment>, vms| InitiateArgs {
        requestor: "bob".into(),
        assignments,
        ..args(&s.key, id, vms)
    };
    let bob_on_vm2 = assignment("bob", Role::JitRequester, s.vm2.scope());
    let e = try_(as_bob(
        rid(14),
        bob_on_vm2.clone(),
        vec![
            (&s.vm2, vec![want(22, None, "PT1H")]),
            (&s.vm1, vec![want(22, None, "PT1H")]),
        ],
    ))
    .await;
    assert_eq!(
        e,
        InitiateRefusal::Forbidden {
            field: "virtualMachines[1].id".into(),
            vm: s.vm1.clone()
        }
    );
    let reader = assignment("bob", Role::Reader, Scope::Subscription(sub()));
    let e = try_(as_bob(
        rid(15),
        reader,
        vec![(&s.vm1, vec![want(22, None, "PT1H")])],
    ))
    .await;
    assert!(
        matches!(e, InitiateRefusal::Forbidden { ref field, .. } if field == "virtualMachines[0].id"),
        "a Reader may not initiate: {e:?}"
    );
    let e = try_(as_bob(
        rid(16),
        owner_assignments(),
        vec![(&s.vm1, vec![want(22, None, "PT1H")])],
    ))
    .await;
    assert!(
        matches!(e, InitiateRefusal::Forbidden { .. }),
        "someone else's assignments do not count: {e:?}"
    );

    // And with the action on the VM, bob may.
    let r = store
        .initiate(
            as_bob(
                rid(17),
                bob_on_vm2,
                vec![(&s.vm2, vec![want(22, None, "PT1H")])],
            ),
            ctx_as("bob", now),
        )
        .await
        .unwrap();
    assert_eq!(r.requestor, "bob");
    verified(store).await;
}

/// An initiate reusing an existing request id fails and changes nothing, even when it
/// would have superseded (and audited the revocation of) an older grant first.
pub async fn initiate_with_a_duplicate_id_fails_cleanly(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    initiate_ok(
        store,
        args(&s.key, rid(2), vec![(&s.vm2, vec![want(22, None, "PT1H")])]),
        at(10),
    )
    .await;
    let before = snapshot(store).await;
    // Same VM, port and source as rid(1), but the id of rid(2).
    let r = store
        .initiate(
            args(&s.key, rid(2), vec![(&s.vm1, vec![want(22, None, "PT2H")])]),
            ctx(at(20)),
        )
        .await;
    assert!(
        r.is_err(),
        "an initiate reusing a request id must fail: {r:?}"
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "the failed initiate changed the store"
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Initiated,
        "the failed initiate superseded a grant"
    );
    // The chain continues without a gap.
    initiate_ok(
        store,
        args(&s.key, rid(3), vec![(&s.vm1, vec![want(22, None, "PT2H")])]),
        at(30),
    )
    .await;
    let events = events_after(store, before.audit_count).await;
    assert_eq!(events.len(), 2, "revoke and initiate: {events:?}");
    assert_eq!(events[0].seq, before.audit_count + 1);
    assert_eq!(events[0].prev_hash, before.audit_head);
    verified(store).await;
}

/// `list_requests` filters by VM, requestor and liveness, newest first.
pub async fn list_requests_filters(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    let bob = InitiateArgs {
        requestor: "bob".into(),
        assignments: assignment("bob", Role::JitRequester, Scope::Subscription(sub())),
        ..args(&s.key, rid(2), vec![(&s.vm2, vec![want(22, None, "PT2H")])])
    };
    store.initiate(bob, ctx_as("bob", at(60))).await.unwrap();
    initiate_ok(
        store,
        args(
            &s.key,
            rid(3),
            vec![(&s.vm2, vec![want(22, Some("10.2.0.0/16"), "PT3H")])],
        ),
        at(120),
    )
    .await;

    let list =
        |f: RequestFilter| async move { request_ids(&store.list_requests(&f).await.unwrap()) };
    let f = |vm: Option<&VmId>, who: Option<&str>, live: Option<Timestamp>, limit| RequestFilter {
        vm: vm.cloned(),
        requestor: who.map(str::to_owned),
        live_at: live,
        pending: false,
        after: None,
        limit,
    };
    assert_eq!(
        list(f(None, None, None, 0)).await,
        [rid(3), rid(2), rid(1)],
        "limit 0 means the default, newest first"
    );
    assert_eq!(list(f(None, None, None, 1)).await, [rid(3)]);
    assert_eq!(list(f(Some(&s.vm1), None, None, 10)).await, [rid(1)]);
    assert_eq!(
        list(f(Some(&shout(&s.vm2)), None, None, 10)).await,
        [rid(3), rid(2)]
    );
    assert!(list(f(Some(&s.vm3), None, None, 10)).await.is_empty());
    assert_eq!(list(f(None, Some("bob"), None, 10)).await, [rid(2)]);
    assert!(list(f(None, Some("nobody"), None, 10)).await.is_empty());
    assert_eq!(list(f(Some(&s.vm2), Some(OWNER), None, 10)).await, [rid(3)]);
    assert_eq!(
        list(f(None, None, Some(at(3600)), 10)).await,
        [rid(3), rid(2)],
        "a request whose ports ended is not live"
    );
    assert_eq!(list(f(None, None, Some(at(60 + 7200)), 10)).await, [rid(3)]);
    store
        .revoke_request(rid(3), None, ctx(at(200)))
        .await
        .unwrap();
    assert_eq!(
        list(f(None, None, Some(at(300)), 10)).await,
        [rid(2), rid(1)],
        "a revoked request is not live"
    );
}

/// Revoking a whole request revokes all its live ports, once.
pub async fn revoke_request_all_ports(store: &dyn Store) {
    let s = scene(store).await;
    let r = initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![
                (
                    &s.vm1,
                    vec![want(22, None, "PT1H"), want(3389, None, "PT1H")],
                ),
                (&s.vm2, vec![want(22, None, "PT1H")]),
            ],
        ),
        at(0),
    )
    .await;
    let n0 = audit_count(store).await;
    let out = store
        .revoke_request(rid(1), None, ctx(at(60)))
        .await
        .unwrap();
    let end = at(3600);
    let ur = RevokeReason::UserRequested;
    assert_eq!(
        sorted(out),
        sorted(vec![
            revoked(rid(1), &s.vm1, 22, "10.0.0.9", end, ur),
            revoked(rid(1), &s.vm1, 3389, "10.0.0.9", end, ur),
            revoked(rid(1), &s.vm2, 22, "10.0.0.9", end, ur),
        ])
    );
    let got = request(store, rid(1)).await;
    assert!(
        got.vms
            .iter()
            .flat_map(|v| &v.ports)
            .all(|p| p.status == PortStatus::Revoked(ur)),
        "{got:?}"
    );
    assert_eq!(
        got.start, r.start,
        "revoking changes only the ports' status"
    );
    assert_eq!(store.count_live_grants(at(60)).await.unwrap(), 0);
    let events = events_after(store, n0).await;
    assert_eq!(events.len(), 3, "one event per revoked port");
    assert!(events.iter().all(|e| e.entry.action == "request.revoke"));

    let before = snapshot(store).await;
    let again = store.revoke_request(rid(1), None, ctx(at(70))).await;
    assert_eq!(
        refusal("revoking a revoked request", again),
        RevokeError::NothingLive
    );
    assert_eq!(snapshot(store).await, before);
}

/// Revoking with a selector revokes only the selected ports.
pub async fn revoke_request_selected_port(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![
                (
                    &s.vm1,
                    vec![want(22, None, "PT1H"), want(3389, None, "PT1H")],
                ),
                (&s.vm2, vec![want(22, None, "PT1H")]),
            ],
        ),
        at(0),
    )
    .await;
    let end = at(3600);
    let ur = RevokeReason::UserRequested;
    let sel = |vm: Option<&VmId>, n: Option<u16>| {
        Some(PortSelector {
            vm: vm.cloned(),
            number: n.map(port),
        })
    };
    let out = store
        .revoke_request(rid(1), sel(None, Some(3389)), ctx(at(10)))
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![revoked(rid(1), &s.vm1, 3389, "10.0.0.9", end, ur)]
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Initiated
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm2, 22).await,
        PortStatus::Initiated
    );

    let out = store
        .revoke_request(rid(1), sel(Some(&shout(&s.vm2)), None), ctx(at(20)))
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![revoked(rid(1), &s.vm2, 22, "10.0.0.9", end, ur)],
        "the VM selector matches case-insensitively"
    );

    let before = snapshot(store).await;
    for (what, selector) in [
        ("an already revoked port", sel(Some(&s.vm2), Some(22))),
        ("a VM not in the request", sel(Some(&s.vm3), None)),
        ("a port not in the request", sel(None, Some(8080))),
    ] {
        let r = store.revoke_request(rid(1), selector, ctx(at(30))).await;
        assert_eq!(
            refusal(what, r),
            RevokeError::NothingLive,
            "selecting {what}"
        );
        assert_eq!(snapshot(store).await, before, "selecting {what}");
    }

    let out = store
        .revoke_request(rid(1), sel(Some(&s.vm1), Some(22)), ctx(at(40)))
        .await
        .unwrap();
    assert_eq!(out, vec![revoked(rid(1), &s.vm1, 22, "10.0.0.9", end, ur)]);
    assert_eq!(store.count_live_grants(at(40)).await.unwrap(), 0);
    verified(store).await;
}

/// Unknown requests are NotFound; requests whose ports have ended have nothing live.
pub async fn revoke_request_refusals(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    let before = snapshot(store).await;
    let r = store.revoke_request(rid(99), None, ctx(at(10))).await;
    assert_eq!(
        refusal("revoking an unknown request", r),
        RevokeError::NotFound
    );
    assert_eq!(snapshot(store).await, before);

    // At its end time the port is no longer live, though not yet swept.
    let r = store.revoke_request(rid(1), None, ctx(at(3600))).await;
    assert_eq!(
        refusal("revoking an ended request", r),
        RevokeError::NothingLive
    );
    assert_eq!(snapshot(store).await, before);
    let expired = store.expire_due(at(3600)).await.unwrap();
    assert_eq!(
        expired,
        vec![revoked(
            rid(1),
            &s.vm1,
            22,
            "10.0.0.9",
            at(3600),
            RevokeReason::Expired
        )],
        "an ended port is left for expiry"
    );
}

/// `expire_due(now)` revokes (Expired) exactly the initiated ports whose end is at or
/// before `now`, each once, auditing each at `now`.
pub async fn expire_due_expires_exactly_once(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![(
                &s.vm1,
                vec![want(22, None, "PT1H"), want(3389, None, "PT2H")],
            )],
        ),
        at(0),
    )
    .await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(2),
            vec![(&s.vm2, vec![want(22, None, "PT30M")])],
        ),
        at(600),
    )
    .await;
    let ex = RevokeReason::Expired;
    let n0 = audit_count(store).await;
    assert_eq!(store.next_expiry().await.unwrap(), Some(at(2400)));
    assert!(
        store.expire_due(at(2399)).await.unwrap().is_empty(),
        "nothing is due a second before the first end"
    );
    assert_eq!(
        store.expire_due(at(2400)).await.unwrap(),
        vec![revoked(rid(2), &s.vm2, 22, "10.0.0.9", at(2400), ex)],
        "a port is due exactly at its end"
    );
    assert!(
        store.expire_due(at(2400)).await.unwrap().is_empty(),
        "a port expires once"
    );
    assert_eq!(store.next_expiry().await.unwrap(), Some(at(3600)));
    assert_eq!(
        store.expire_due(at(5000)).await.unwrap(),
        vec![revoked(rid(1), &s.vm1, 22, "10.0.0.9", at(3600), ex)]
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 3389).await,
        PortStatus::Initiated
    );
    assert_eq!(
        store.expire_due(at(99_999)).await.unwrap(),
        vec![revoked(rid(1), &s.vm1, 3389, "10.0.0.9", at(7200), ex)]
    );
    assert!(store.expire_due(at(200_000)).await.unwrap().is_empty());
    assert_eq!(store.next_expiry().await.unwrap(), None);
    for (id, vm, n) in [
        (rid(1), &s.vm1, 22),
        (rid(1), &s.vm1, 3389),
        (rid(2), &s.vm2, 22),
    ] {
        assert_eq!(
            status_of(store, id, vm, n).await,
            PortStatus::Revoked(ex),
            "{id} {vm} {n}"
        );
    }
    let events = events_after(store, n0).await;
    let times: Vec<Timestamp> = events
        .iter()
        .map(|e| {
            assert_eq!(e.entry.action, "request.expire");
            e.entry.time.parse().unwrap()
        })
        .collect();
    assert_eq!(
        times,
        vec![at(2400), at(5000), at(99_999)],
        "each expiry is audited once, at the sweep's time"
    );
    verified(store).await;
}

/// `next_expiry` is the earliest end among initiated ports only.
pub async fn next_expiry_is_earliest_initiated_end(store: &dyn Store) {
    assert_eq!(store.next_expiry().await.unwrap(), None, "empty store");
    let s = scene(store).await;
    assert_eq!(store.next_expiry().await.unwrap(), None, "no requests");
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm2, vec![want(22, None, "PT2H")])]),
        at(0),
    )
    .await;
    assert_eq!(store.next_expiry().await.unwrap(), Some(at(7200)));
    initiate_ok(
        store,
        args(&s.key, rid(2), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(60),
    )
    .await;
    assert_eq!(store.next_expiry().await.unwrap(), Some(at(3660)));
    store
        .revoke_request(rid(2), None, ctx(at(120)))
        .await
        .unwrap();
    assert_eq!(
        store.next_expiry().await.unwrap(),
        Some(at(7200)),
        "a revoked port no longer counts"
    );
    assert_eq!(
        store.next_expiry().await.unwrap(),
        Some(at(7200)),
        "next_expiry does not change the store"
    );
}

/// `live_grants` and `count_live_grants` see initiated ports before their end.
/// Issue 15: a reader that keeps a VM's grants reads what changed since its last read:
/// new grants, revoked or superseded ones, none of another VM's, nothing twice.
/// Gateway mode: a VM placed behind a gateway, in DNAT mode, gets one mapped port per
/// port of its policy on the public address, unique there, kept while it stays on that
/// address, and one for a port a policy adds; chains and taken addresses are refused;
/// a gateway in use cannot be deleted; taking a VM from behind it forgets its ports.
pub async fn placements_and_mapped_ports(store: &dyn Store) {
    use jitgate_core::gateway::{Mode, Placement};
    let s = scene(store).await;
    let gw = vm("rg1", "gw");
    register(store, &gw, t0()).await;
    let public: std::net::IpAddr = "198.51.100.1".parse().unwrap();
    let dnat = |addr: &str| Placement {
        address: addr.parse().unwrap(),
        mode: Mode::Dnat,
        masquerade: false,
        public: Some(public),
        mapped: Vec::new(),
    };
    let p1 = store
        .place_vm(&s.vm1, &gw, dnat("10.0.0.1"), ctx(at(1)))
        .await
        .unwrap();
    assert_eq!(p1.gateway, gw);
    let ports = |p: &VmPlacement| -> Vec<(u16, u16)> {
        p.place
            .mapped
            .iter()
            .map(|m| (m.port.get(), m.mapped.get()))
            .collect()
    };
    let (first, _) = MAPPED_PORTS;
    assert_eq!(ports(&p1), vec![(22, first), (3389, first + 1)]);
    let p2 = store
        .place_vm(&s.vm2, &gw, dnat("10.0.0.2"), ctx(at(2)))
        .await
        .unwrap();
    assert_eq!(
        ports(&p2),
        vec![(22, first + 2)],
        "unique on the public address"
    );
    // A port the policy adds gets the next free one; the others stay.
    let sp = spec(&s.key, &[(&s.vm1, &[22, 3389, 5985]), (&s.vm2, &[22])]);
    put(store, &s.key, sp, at(3)).await;
    let p1 = store.placement(&s.vm1).await.unwrap().unwrap();
    assert_eq!(
        ports(&p1),
        vec![(22, first), (3389, first + 1), (5985, first + 3)]
    );
    // Refusals change nothing.
    let taken = store
        .place_vm(&s.vm3, &gw, dnat("10.0.0.1"), ctx(at(4)))
        .await;
    assert!(
        matches!(taken, Err(OpError::Refused(PlaceError::AddressTaken(ref f))) if f.field == "address"),
        "{taken:?}"
    );
    let chain = store
        .place_vm(&gw, &s.vm3, dnat("10.0.0.9"), ctx(at(4)))
        .await;
    assert!(
        matches!(chain, Err(OpError::Refused(PlaceError::Chain(_)))),
        "{chain:?}"
    );
    let behind_vm = store
        .place_vm(&s.vm3, &s.vm1, dnat("10.0.0.9"), ctx(at(4)))
        .await;
    assert!(
        matches!(behind_vm, Err(OpError::Refused(PlaceError::Chain(_)))),
        "{behind_vm:?}"
    );
    let unknown = store
        .place_vm(&s.vm3, &vm("rg1", "nowhere"), dnat("10.0.0.9"), ctx(at(4)))
        .await;
    assert!(
        matches!(unknown, Err(OpError::Refused(PlaceError::Unknown(ref f))) if f.field == "gateway"),
        "{unknown:?}"
    );
    assert!(store.placement(&s.vm3).await.unwrap().is_none());
    let listed: Vec<VmId> = store
        .behind(&gw)
        .await
        .unwrap()
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    assert_eq!(listed, vec![s.vm1.clone(), s.vm2.clone()]);
    let both = store
        .placements(&[s.vm2.clone(), s.vm3.clone()])
        .await
        .unwrap();
    assert_eq!(both.len(), 1);
    assert_eq!(both[0].0, s.vm2);
    let deleted = store.delete_vm(&gw, ctx(at(5))).await;
    assert!(
        matches!(deleted, Err(OpError::Refused(VmError::GatewayInUse(_)))),
        "{deleted:?}"
    );

    // Placed again on the same address: the same ports. Routed: none.
    let again = store
        .place_vm(&s.vm1, &gw, dnat("10.0.0.1"), ctx(at(6)))
        .await
        .unwrap();
    assert_eq!(ports(&again), ports(&p1));
    let routed = Placement {
        mode: Mode::Routed,
        public: None,
        ..dnat("10.0.0.1")
    };
    let r = store
        .place_vm(&s.vm1, &gw, routed, ctx(at(7)))
        .await
        .unwrap();
    assert!(r.place.mapped.is_empty());
    // Its old ports are free again: vm3 takes the lowest.
    let p3 = store
        .place_vm(&s.vm3, &gw, dnat("10.0.0.3"), ctx(at(8)))
        .await
        .unwrap();
    assert!(p3.place.mapped.is_empty(), "vm3 is in no policy");
    assert!(store.unplace_vm(&s.vm2, ctx(at(9))).await.unwrap());
    assert!(!store.unplace_vm(&s.vm2, ctx(at(9))).await.unwrap());
    assert!(store.placement(&s.vm2).await.unwrap().is_none());
}

pub async fn grant_changes_since_a_point(store: &dyn Store) {
    let s = scene(store).await;
    let changes = |vm: VmId, after: u64, now: Timestamp| async move {
        store.grant_changes(&vm, after, now).await.unwrap()
    };
    let first = changes(s.vm1.clone(), 0, at(0)).await;
    assert!(first.rows.is_empty());
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    initiate_ok(
        store,
        args(&s.key, rid(2), vec![(&s.vm2, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    let c1 = changes(s.vm1.clone(), first.upto, at(10)).await;
    assert!(c1.upto > first.upto);
    let got: Vec<_> = c1
        .rows
        .iter()
        .map(|(g, live)| (g.request, g.number.get(), *live))
        .collect();
    assert_eq!(
        got,
        vec![(rid(1), 22, true)],
        "the new grant, and none of vm2's"
    );
    // The whole state from scratch says the same.
    let whole = changes(s.vm1.clone(), 0, at(10)).await;
    assert_eq!((whole.upto, whole.rows.len()), (c1.upto, 1));
    // Nothing since: nothing.
    let none = changes(s.vm1.clone(), c1.upto, at(20)).await;
    assert!(none.rows.is_empty());
    assert_eq!(none.upto, c1.upto);

    // The same requestor asks again for the same port: the older grant is superseded.
    initiate_ok(
        store,
        args(&s.key, rid(3), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(30),
    )
    .await;
    let c2 = changes(s.vm1.clone(), c1.upto, at(40)).await;
    let mut got: Vec<_> = c2.rows.iter().map(|(g, live)| (g.request, *live)).collect();
    got.sort();
    assert_eq!(got, vec![(rid(1), false), (rid(3), true)]);

    store
        .revoke_request(rid(3), None, ctx(at(50)))
        .await
        .unwrap();
    let c3 = changes(s.vm1.clone(), c2.upto, at(60)).await;
    let got: Vec<_> = c3.rows.iter().map(|(g, live)| (g.request, *live)).collect();
    assert_eq!(got, vec![(rid(3), false)]);
    assert!(c3.upto > c2.upto);
    assert!(changes(s.vm1.clone(), 0, at(60)).await.rows.is_empty());
}

pub async fn live_grants_and_count(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    let bob = InitiateArgs {
        requestor: "bob".into(),
        caller_ip: ip("10.1.2.3"),
        assignments: assignment("bob", Role::JitRequester, s.vm1.scope()),
        ..args(
            &s.key,
            rid(2),
            vec![(&s.vm1, vec![want(3389, Some("10.1.0.0/16"), "PT2H")])],
        )
    };
    store.initiate(bob, ctx_as("bob", at(60))).await.unwrap();
    initiate_ok(
        store,
        args(&s.key, rid(3), vec![(&s.vm2, vec![want(22, None, "PT3H")])]),
        at(0),
    )
    .await;

    let g1 = Grant {
        request: rid(1),
        requestor: OWNER.into(),
        number: port(22),
        protocol: Protocol::Tcp,
        source: prefix("10.0.0.9"),
        start: at(0),
        end: at(3600),
    };
    let g2 = Grant {
        request: rid(2),
        requestor: "bob".into(),
        number: port(3389),
        protocol: Protocol::Tcp,
        source: prefix("10.1.0.0/16"),
        start: at(60),
        end: at(7260),
    };
    let grants = |vm: VmId, now: Timestamp| async move {
        sorted_grants(store.live_grants(&vm, now).await.unwrap())
    };
    assert_eq!(
        grants(s.vm1.clone(), at(120)).await,
        vec![g1.clone(), g2.clone()]
    );
    assert_eq!(
        grants(shout(&s.vm1), at(120)).await,
        vec![g1, g2.clone()],
        "the VM matches case-insensitively"
    );
    assert_eq!(
        grants(s.vm1.clone(), at(3600)).await,
        vec![g2],
        "a grant is not live at its end time"
    );
    assert!(grants(s.vm3.clone(), at(120)).await.is_empty());
    assert_eq!(grants(s.vm2.clone(), at(120)).await.len(), 1);

    let count = |now| async move { store.count_live_grants(now).await.unwrap() };
    assert_eq!(count(at(120)).await, 3);
    assert_eq!(count(at(3600)).await, 2);
    assert_eq!(count(at(7260)).await, 1);
    assert_eq!(count(at(10_800)).await, 0);
    store
        .revoke_request(rid(3), None, ctx(at(130)))
        .await
        .unwrap();
    assert_eq!(count(at(130)).await, 2, "a revoked grant is not live");
    assert!(grants(s.vm2.clone(), at(130)).await.is_empty());
}

/// Updating a policy revokes (PolicyChanged) the live grants of the ports it no longer
/// protects (removed port, changed protocol, removed VM) and leaves the others.
pub async fn put_policy_update_revokes_removed_ports(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![
                (
                    &s.vm1,
                    vec![want(22, None, "PT1H"), want(3389, None, "PT1H")],
                ),
                (&s.vm2, vec![want(22, None, "PT1H")]),
            ],
        ),
        at(0),
    )
    .await;
    let end = at(3600);
    let pc = RevokeReason::PolicyChanged;

    // Same ports, other maximum: nothing is revoked.
    let out = put(
        store,
        &s.key,
        spec_with(
            &s.key,
            vec![
                (
                    &s.vm1,
                    vec![rule(22, "TCP", "PT2H"), rule(3389, "TCP", "PT2H")],
                ),
                (&s.vm2, vec![rule(22, "TCP", "PT2H")]),
            ],
        ),
        at(10),
    )
    .await;
    assert_eq!(
        out,
        PutPolicyOutcome {
            created: false,
            previous_vms: vec![s.vm1.clone(), s.vm2.clone()],
            revoked: vec![]
        }
    );
    assert_eq!(store.count_live_grants(at(10)).await.unwrap(), 3);

    // Port 22 leaves vm1.
    let n0 = audit_count(store).await;
    let out = put(
        store,
        &s.key,
        spec(&s.key, &[(&s.vm1, &[3389]), (&s.vm2, &[22])]),
        at(20),
    )
    .await;
    assert!(!out.created);
    assert_eq!(
        out.revoked,
        vec![revoked(rid(1), &s.vm1, 22, "10.0.0.9", end, pc)]
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Revoked(pc)
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 3389).await,
        PortStatus::Initiated
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm2, 22).await,
        PortStatus::Initiated
    );
    let mut actions: Vec<String> = events_after(store, n0)
        .await
        .into_iter()
        .map(|e| e.entry.action)
        .collect();
    actions.sort();
    assert_eq!(actions, ["policy.update", "request.endedByPolicy"]);

    // vm1's 3389 changes protocol: a different rule, its grant goes.
    let out = put(
        store,
        &s.key,
        spec_with(
            &s.key,
            vec![
                (&s.vm1, vec![rule(3389, "UDP", "PT3H")]),
                (&s.vm2, vec![rule(22, "TCP", "PT3H")]),
            ],
        ),
        at(30),
    )
    .await;
    assert_eq!(
        out.revoked,
        vec![revoked(rid(1), &s.vm1, 3389, "10.0.0.9", end, pc)]
    );

    // vm2 leaves the policy.
    let out = put(
        store,
        &s.key,
        spec_with(&s.key, vec![(&s.vm1, vec![rule(3389, "UDP", "PT3H")])]),
        at(40),
    )
    .await;
    assert_eq!(
        out.revoked,
        vec![revoked(rid(1), &s.vm2, 22, "10.0.0.9", end, pc)]
    );
    assert_eq!(store.count_live_grants(at(40)).await.unwrap(), 0);
    verified(store).await;
}

/// Deleting a policy revokes its live grants (PolicyChanged); deleting an absent
/// policy returns None and changes nothing.
pub async fn delete_policy_revokes_live_grants(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![(
                &s.vm1,
                vec![want(22, None, "PT1H"), want(3389, None, "PT1H")],
            )],
        ),
        at(0),
    )
    .await;
    initiate_ok(
        store,
        args(&s.key, rid(2), vec![(&s.vm2, vec![want(22, None, "PT1H")])]),
        at(0),
    )
    .await;
    store
        .revoke_request(rid(2), None, ctx(at(30)))
        .await
        .unwrap();

    let n0 = audit_count(store).await;
    let out = store
        .delete_policy(&shout_key(&s.key), ctx(at(60)))
        .await
        .unwrap()
        .expect("delete_policy of an existing policy returned None")
        .revoked;
    let pc = RevokeReason::PolicyChanged;
    assert_eq!(
        sorted(out),
        sorted(vec![
            revoked(rid(1), &s.vm1, 22, "10.0.0.9", at(3600), pc),
            revoked(rid(1), &s.vm1, 3389, "10.0.0.9", at(3600), pc),
        ]),
        "only live grants are revoked"
    );
    assert_eq!(store.get_policy(&s.key).await.unwrap(), None);
    assert_eq!(store.vm_policy(&s.vm1).await.unwrap(), None);
    assert!(
        store
            .list_policies(&PolicyFilter::default(), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.count_live_grants(at(60)).await.unwrap(), 0);
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Revoked(pc)
    );
    assert_eq!(
        status_of(store, rid(2), &s.vm2, 22).await,
        PortStatus::Revoked(RevokeReason::UserRequested),
        "an already revoked port keeps its reason"
    );
    let mut actions: Vec<String> = events_after(store, n0)
        .await
        .into_iter()
        .map(|e| e.entry.action)
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        [
            "policy.delete",
            "request.endedByPolicy",
            "request.endedByPolicy"
        ]
    );

    let before = snapshot(store).await;
    assert_eq!(
        store.delete_policy(&s.key, ctx(at(70))).await.unwrap(),
        None
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "deleting an absent policy changed the store"
    );

    // A policy without grants deletes with nothing revoked; its VMs are then free.
    let k2 = pkey("rg1", "westeurope", "second");
    put(store, &k2, spec(&k2, &[(&s.vm3, &[22])]), at(80)).await;
    assert_eq!(
        store.delete_policy(&k2, ctx(at(90))).await.unwrap(),
        Some(DeletedPolicy {
            vms: vec![s.vm3.clone()],
            revoked: vec![]
        })
    );
    assert!(store.delete_vm(&s.vm1, ctx(at(100))).await.unwrap());
    verified(store).await;
}

/// Policy changes revoke live grants only: a port at or past its end time (not yet
/// swept) is left for `expire_due`, which marks it Expired.
pub async fn policy_changes_leave_ended_ports_to_expiry(store: &dyn Store) {
    let s = scene(store).await;
    initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![
                (
                    &s.vm1,
                    vec![want(22, None, "PT1H"), want(3389, None, "PT2H")],
                ),
                (&s.vm2, vec![want(22, None, "PT1H")]),
            ],
        ),
        at(0),
    )
    .await;
    // At the end time of vm1:22, port 22 leaves vm1: the grant has ended, nothing live
    // is revoked.
    let out = put(
        store,
        &s.key,
        spec(&s.key, &[(&s.vm1, &[3389]), (&s.vm2, &[22])]),
        at(3600),
    )
    .await;
    assert_eq!(out.revoked, vec![], "an ended grant is not revoked as live");
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Initiated,
        "an ended port waits for expiry"
    );
    // The policy goes after vm2:22 ended but while vm1:3389 is live.
    let out = store
        .delete_policy(&s.key, ctx(at(3700)))
        .await
        .unwrap()
        .unwrap()
        .revoked;
    assert_eq!(
        out,
        vec![revoked(
            rid(1),
            &s.vm1,
            3389,
            "10.0.0.9",
            at(7200),
            RevokeReason::PolicyChanged
        )],
        "only the live grant is revoked"
    );
    let ex = RevokeReason::Expired;
    assert_eq!(
        sorted(store.expire_due(at(3700)).await.unwrap()),
        sorted(vec![
            revoked(rid(1), &s.vm1, 22, "10.0.0.9", at(3600), ex),
            revoked(rid(1), &s.vm2, 22, "10.0.0.9", at(3600), ex),
        ])
    );
    assert_eq!(store.next_expiry().await.unwrap(), None);
    verified(store).await;
}

// ---- identity -----------------------------------------------------------------------

/// Tokens are created, found, listed and revoked (once).
pub async fn tokens_create_find_list_revoke(store: &dyn Store) {
    install(store).await;
    let mut t1 = token("jg_one", "bob", at(10));
    t1.expires = Some(at(86_400));
    let t2 = token("jg_two", "carol", at(20));
    let n0 = audit_count(store).await;
    store.create_token(t1.clone(), ctx(at(10))).await.unwrap();
    store.create_token(t2.clone(), ctx(at(20))).await.unwrap();
    assert_eq!(
        audit_count(store).await,
        n0 + 2,
        "token creation is audited"
    );
    assert_eq!(store.find_token("jg_one").await.unwrap(), Some(t1.clone()));
    assert_eq!(store.find_token("jg_two").await.unwrap(), Some(t2.clone()));
    assert_eq!(store.find_token("jg_nope").await.unwrap(), None);
    let mut ids: Vec<String> = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    ids.sort();
    assert_eq!(ids, [OWNER_TOKEN, "jg_one", "jg_two"]);

    let before = snapshot(store).await;
    let dup = TokenRecord {
        principal: "mallory".into(),
        ..t1.clone()
    };
    assert!(
        store.create_token(dup, ctx(at(30))).await.is_err(),
        "a duplicate token id must fail"
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "a failed create_token changed the store"
    );

    assert!(store.revoke_token("jg_one", ctx(at(100))).await.unwrap());
    let got = store.find_token("jg_one").await.unwrap().unwrap();
    assert_eq!(got.revoked, Some(at(100)));
    assert_eq!(
        TokenRecord {
            revoked: None,
            ..got
        },
        t1,
        "revoking changes only `revoked`"
    );
    assert_eq!(audit_count(store).await, n0 + 3, "revocation is audited");

    let before = snapshot(store).await;
    assert!(
        !store.revoke_token("jg_one", ctx(at(200))).await.unwrap(),
        "revoking twice returns false"
    );
    assert!(!store.revoke_token("jg_nope", ctx(at(200))).await.unwrap());
    assert_eq!(
        snapshot(store).await,
        before,
        "a no-op revoke changed the store"
    );
    assert_eq!(
        store.find_token("jg_one").await.unwrap().unwrap().revoked,
        Some(at(100)),
        "the first revocation time stays"
    );
    assert_eq!(
        store.find_token("jg_two").await.unwrap().unwrap().revoked,
        None
    );
}

/// Role assignments are added, listed (all or by principal) and removed (once).
pub async fn role_assignments_add_list_remove(store: &dyn Store) {
    install(store).await;
    let boot = store.role_assignments(None).await.unwrap();
    assert_eq!(boot.len(), 1, "bootstrap's Owner assignment: {boot:?}");
    let ra = |id: &str, principal: &str, role: Role, scope: Scope, t: i64| RoleAssignmentRecord {
        id: id.into(),
        assignment: RoleAssignment {
            principal: principal.into(),
            role,
            scope,
        },
        created: at(t),
    };
    let v = vm("rg1", "vm1");
    let r1 = ra("ra1", "bob", Role::JitRequester, v.scope(), 10);
    let r2 = ra(
        "ra2",
        "carol",
        Role::Reader,
        Scope::ResourceGroup(sub(), rg("rg1")),
        20,
    );
    let r3 = ra("ra3", "bob", Role::Agent, Scope::Subscription(sub()), 30);
    let n0 = audit_count(store).await;
    for r in [&r1, &r2, &r3] {
        store
            .add_role_assignment(r.clone(), ctx(r.created))
            .await
            .unwrap();
    }
    assert_eq!(audit_count(store).await, n0 + 3, "additions are audited");
    let by = |p: Option<&'static str>| async move {
        let mut v = store.role_assignments(p).await.unwrap();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    assert_eq!(by(Some("bob")).await, vec![r1.clone(), r3.clone()]);
    assert_eq!(by(Some("carol")).await, vec![r2.clone()]);
    assert!(by(Some("nobody")).await.is_empty());
    assert_eq!(by(None).await.len(), 4);

    assert!(
        store
            .remove_role_assignment("ra1", ctx(at(40)))
            .await
            .unwrap()
    );
    assert_eq!(audit_count(store).await, n0 + 4, "removal is audited");
    let before = snapshot(store).await;
    assert!(
        !store
            .remove_role_assignment("ra1", ctx(at(50)))
            .await
            .unwrap(),
        "removing twice returns false"
    );
    assert!(
        !store
            .remove_role_assignment("nope", ctx(at(50)))
            .await
            .unwrap()
    );
    assert_eq!(snapshot(store).await, before);
    assert_eq!(by(Some("bob")).await, vec![r3]);
    assert_eq!(by(None).await.len(), 3);
}

// ---- audit --------------------------------------------------------------------------

/// Checks the events appended since `after`: their actions (as a multiset), and that
/// they carry the context's actor, source and time. Returns the new last seq.
async fn expect_events(store: &dyn Store, after: u64, actions: &[&str], c: &AuditCtx) -> u64 {
    let events = events_after(store, after).await;
    let mut got: Vec<&str> = events.iter().map(|e| e.entry.action.as_str()).collect();
    got.sort();
    let mut want: Vec<&str> = actions.to_vec();
    want.sort();
    assert_eq!(got, want, "events after seq {after}");
    for e in &events {
        assert_eq!(e.entry.actor, c.actor, "actor of {e:?}");
        assert_eq!(e.entry.source, c.source, "source of {e:?}");
        assert_eq!(
            e.entry.time.parse::<Timestamp>().unwrap(),
            c.now,
            "time of {e:?}"
        );
        assert_eq!(e.entry.outcome, Outcome::Success);
    }
    let expected: Vec<u64> = (after + 1..=after + events.len() as u64).collect();
    assert_eq!(seqs(&events), expected, "sequence numbers are consecutive");
    let report = verified(store).await;
    assert_eq!(report.last_seq, after + events.len() as u64);
    report.last_seq
}

/// Every successful mutation appends its audit event(s), with the caller's context,
/// and the chain verifies after each.
pub async fn mutations_are_audited_and_chain_verifies(store: &dyn Store) {
    let c = |t: i64| ctx(at(t));
    let empty = verified(store).await;
    assert_eq!(
        (empty.count, empty.last_seq),
        (0, 0),
        "a fresh store has no events"
    );

    store
        .bootstrap(bootstrap_input(sub(), OWNER_TOKEN), c(0))
        .await
        .unwrap();
    let mut seq = expect_events(
        store,
        0,
        &[
            "subscription.create",
            "token.create",
            "roleAssignment.create",
        ],
        &c(0),
    )
    .await;

    let key = pkey("rg1", "westeurope", "default");
    let (v1, v2) = (vm("rg1", "vm1"), vm("rg1", "vm2"));
    for (i, v) in [&v1, &v2].into_iter().enumerate() {
        let t = 10 + i as i64;
        let rec = VmRecord {
            id: v.clone(),
            location: None,
            created: at(t),
            created_by: OWNER.into(),
        };
        store.register_vm(rec, c(t)).await.unwrap();
        seq = expect_events(store, seq, &["vm.register"], &c(t)).await;
    }
    let last = events_after(store, seq - 1).await;
    assert!(
        last[0].entry.target.eq_ignore_ascii_case(&v2.to_string()),
        "vm.register targets the VM: {:?}",
        last[0]
    );
    let rec = VmRecord {
        id: v1.clone(),
        location: None,
        created: at(12),
        created_by: OWNER.into(),
    };
    store.register_vm(rec, c(12)).await.unwrap();
    seq = expect_events(store, seq, &[], &c(12)).await;

    put(
        store,
        &key,
        spec(&key, &[(&v1, &[22]), (&v2, &[22])]),
        at(20),
    )
    .await;
    seq = expect_events(store, seq, &["policy.create"], &c(20)).await;
    let last = events_after(store, seq - 1).await;
    assert!(
        last[0].entry.target.eq_ignore_ascii_case(&key.id()),
        "policy events target the policy id: {:?}",
        last[0]
    );

    initiate_ok(
        store,
        args(
            &key,
            rid(1),
            vec![
                (&v1, vec![want(22, None, "PT1H")]),
                (&v2, vec![want(22, None, "PT1H")]),
            ],
        ),
        at(30),
    )
    .await;
    seq = expect_events(
        store,
        seq,
        &["request.initiate", "request.initiate"],
        &c(30),
    )
    .await;

    initiate_ok(
        store,
        args(&key, rid(2), vec![(&v1, vec![want(22, None, "PT1H")])]),
        at(40),
    )
    .await;
    seq = expect_events(store, seq, &["request.initiate", "request.revoke"], &c(40)).await;

    put(store, &key, spec(&key, &[(&v1, &[22])]), at(50)).await;
    seq = expect_events(
        store,
        seq,
        &["policy.update", "request.endedByPolicy"],
        &c(50),
    )
    .await;

    store.revoke_request(rid(2), None, c(60)).await.unwrap();
    seq = expect_events(store, seq, &["request.revoke"], &c(60)).await;

    initiate_ok(
        store,
        args(&key, rid(3), vec![(&v1, vec![want(22, None, "PT1H")])]),
        at(70),
    )
    .await;
    seq = expect_events(store, seq, &["request.initiate"], &c(70)).await;
    let expired = store.expire_due(at(70 + 3600)).await.unwrap();
    assert_eq!(expired.len(), 1);
    let events = events_after(store, seq).await;
    assert_eq!(events.len(), 1, "one event per expired port: {events:?}");
    assert_eq!(events[0].entry.action, "request.expire");
    assert_eq!(
        events[0].entry.time.parse::<Timestamp>().unwrap(),
        at(70 + 3600)
    );
    seq = events[0].seq;

    let denied = AuditEntry {
        time: at(4000).to_string(),
        actor: "mallory".into(),
        source: "203.0.113.5".into(),
        action: "policy.write".into(),
        target: key.id(),
        outcome: Outcome::Denied,
        details: r#"{"code":"AuthorizationFailed"}"#.into(),
    };
    let n = store.append_audit(denied.clone()).await.unwrap();
    assert_eq!(n, seq + 1, "append_audit continues the chain");
    assert_eq!(events_after(store, seq).await[0].entry, denied);
    seq = n;

    store
        .create_token(token("jg_x", "bob", at(4010)), c(4010))
        .await
        .unwrap();
    seq = expect_events(store, seq, &["token.create"], &c(4010)).await;
    store.revoke_token("jg_x", c(4020)).await.unwrap();
    seq = expect_events(store, seq, &["token.revoke"], &c(4020)).await;

    let ra = RoleAssignmentRecord {
        id: "ra-x".into(),
        assignment: RoleAssignment {
            principal: "bob".into(),
            role: Role::Reader,
            scope: Scope::Subscription(sub()),
        },
        created: at(4030),
    };
    store.add_role_assignment(ra, c(4030)).await.unwrap();
    seq = expect_events(store, seq, &["roleAssignment.create"], &c(4030)).await;
    store.remove_role_assignment("ra-x", c(4040)).await.unwrap();
    seq = expect_events(store, seq, &["roleAssignment.delete"], &c(4040)).await;

    store.delete_policy(&key, c(4050)).await.unwrap().unwrap();
    seq = expect_events(store, seq, &["policy.delete"], &c(4050)).await;
    assert!(store.delete_vm(&v1, c(4060)).await.unwrap());
    seq = expect_events(store, seq, &["vm.delete"], &c(4060)).await;

    let report = verified(store).await;
    assert_eq!((report.count, report.last_seq), (seq, seq));
    let all = events_after(store, 0).await;
    assert_eq!(seqs(&all), (1..=seq).collect::<Vec<_>>());
    let tail = all.last().unwrap();
    assert_eq!(
        report.head_hash, tail.hash,
        "the report's head is the last hash"
    );
    for w in all.windows(2) {
        assert_eq!(
            w[1].prev_hash, w[0].hash,
            "event {} links to {}",
            w[1].seq, w[0].seq
        );
    }
}

fn entry(t: Timestamp, actor: &str, action: &str, target: &str, outcome: Outcome) -> AuditEntry {
    AuditEntry {
        time: t.to_string(),
        actor: actor.into(),
        source: "198.51.100.7".into(),
        action: action.into(),
        target: target.into(),
        outcome,
        details: format!(r#"{{"n":"{action}"}}"#),
    }
}

/// `append_audit` numbers events 1, 2, 3... keeps them exactly, and a failed append
/// (unparseable time) uses no number.
pub async fn append_audit_assigns_consecutive_seqs(store: &dyn Store) {
    let entries: Vec<AuditEntry> = (0..3)
        .map(|i| {
            entry(
                at(i),
                "alice",
                "auth.failed",
                &format!("t{i}"),
                Outcome::Failed,
            )
        })
        .collect();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(store.append_audit(e.clone()).await.unwrap(), i as u64 + 1);
    }
    let bad = AuditEntry {
        time: "yesterday".into(),
        ..entries[0].clone()
    };
    assert!(
        store.append_audit(bad).await.is_err(),
        "an unparseable time must be refused"
    );
    let next = entry(at(9), "bob", "auth.denied", "t9", Outcome::Denied);
    assert_eq!(
        store.append_audit(next.clone()).await.unwrap(),
        4,
        "a failed append leaves no gap"
    );
    let all = events_after(store, 0).await;
    let got: Vec<AuditEntry> = all.iter().map(|r| r.entry.clone()).collect();
    let mut want = entries;
    want.push(next);
    assert_eq!(got, want, "events read back exactly as appended");
    let report = verified(store).await;
    assert_eq!((report.count, report.last_seq), (4, 4));
}

/// `query_audit` filters: target substring (case-insensitive, literal), exact actor,
/// literal action prefix, since/until (inclusive), after_seq (exclusive), limit;
/// results in sequence order.
pub async fn query_audit_filters(store: &dyn Store) {
    let vm1 = format!(
        "/subscriptions/{SUB}/resourceGroups/My_Rg/providers/Microsoft.Compute/virtualMachines/vm1"
    );
    let vm1x = format!(
        "/subscriptions/{SUB}/resourceGroups/MyXRg/providers/Microsoft.Compute/virtualMachines/VM1"
    );
    let pol = format!(
        "/subscriptions/{SUB}/resourceGroups/my_rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default"
    );
    let s = Outcome::Success;
    let all = [
        entry(at(0), "alice", "policy.create", &pol, s),
        entry(at(60), "bob", "request.initiate", &vm1x, s),
        entry(at(120), "alice", "request.revoke", &vm1, s),
        entry(
            at(180),
            "alice2",
            "policy.delete",
            "quota-100%",
            Outcome::Denied,
        ),
        entry(at(240), "mallory", "auth.token", "", Outcome::Failed),
        entry(at(300), "bob", "policy.update", &pol, s),
    ];
    for e in &all {
        store.append_audit(e.clone()).await.unwrap();
    }
    let all = &all;
    let q = |q: AuditQuery| async move {
        let out = store.query_audit(&q).await.unwrap();
        for r in &out {
            assert_eq!(
                r.entry,
                all[r.seq as usize - 1],
                "record {} read back",
                r.seq
            );
        }
        seqs(&out)
    };
    let target = |t: &str| AuditQuery {
        target: Some(t.into()),
        ..Default::default()
    };
    let actor = |a: &str| AuditQuery {
        actor: Some(a.into()),
        ..Default::default()
    };
    let action = |a: &str| AuditQuery {
        action: Some(a.into()),
        ..Default::default()
    };

    assert_eq!(
        q(AuditQuery::default()).await,
        [1, 2, 3, 4, 5, 6],
        "limit 0 means the default"
    );
    assert_eq!(q(target("vm1")).await, [2, 3]);
    assert_eq!(
        q(target("VIRTUALMACHINES/VM1")).await,
        [2, 3],
        "target matches case-insensitively"
    );
    assert_eq!(
        q(target("my_rg")).await,
        [1, 3, 6],
        "`_` in a target is a literal character"
    );
    assert_eq!(q(target("100%")).await, [4]);
    assert_eq!(
        q(target("%")).await,
        [4],
        "`%` in a target is a literal character"
    );
    assert!(q(target("nowhere")).await.is_empty());

    assert_eq!(q(actor("alice")).await, [1, 3], "actor matches exactly");
    assert_eq!(q(actor("bob")).await, [2, 6]);
    assert!(q(actor("ali")).await.is_empty());

    assert_eq!(q(action("policy.")).await, [1, 4, 6]);
    assert_eq!(q(action("request")).await, [2, 3]);
    assert_eq!(q(action("policy.create")).await, [1]);
    assert!(q(action("create")).await.is_empty(), "action is a prefix");
    assert!(
        q(action("policy_")).await.is_empty(),
        "`_` in an action prefix is a literal character"
    );
    assert!(q(action("%")).await.is_empty());

    let range = |since: Option<i64>, until: Option<i64>| AuditQuery {
        since: since.map(at),
        until: until.map(at),
        ..Default::default()
    };
    assert_eq!(
        q(range(Some(120), None)).await,
        [3, 4, 5, 6],
        "since is inclusive"
    );
    assert_eq!(
        q(range(None, Some(120))).await,
        [1, 2, 3],
        "until is inclusive"
    );
    assert_eq!(q(range(Some(60), Some(180))).await, [2, 3, 4]);
    assert_eq!(q(range(Some(61), Some(179))).await, [3]);
    assert!(q(range(Some(301), None)).await.is_empty());

    let page = |after: Option<u64>, limit: usize| AuditQuery {
        after_seq: after,
        limit,
        ..Default::default()
    };
    assert_eq!(q(page(Some(4), 0)).await, [5, 6], "after_seq is exclusive");
    assert!(q(page(Some(6), 0)).await.is_empty());
    assert_eq!(q(page(None, 2)).await, [1, 2]);
    assert_eq!(q(page(Some(2), 2)).await, [3, 4]);
    assert_eq!(q(page(Some(4), 2)).await, [5, 6]);

    assert_eq!(
        q(AuditQuery {
            actor: Some("bob".into()),
            action: Some("policy.".into()),
            ..Default::default()
        })
        .await,
        [6]
    );
    assert_eq!(
        q(AuditQuery {
            target: Some("VM1".into()),
            since: Some(at(100)),
            ..Default::default()
        })
        .await,
        [3]
    );
    assert_eq!(
        q(AuditQuery {
            target: Some("my_rg".into()),
            after_seq: Some(1),
            limit: 1,
            ..Default::default()
        })
        .await,
        [3]
    );
    verified(store).await;
}

/// Writes issued together (which a backend may commit as one group) each succeed or
/// fail on their own, and the chain stays contiguous: failed and refused writes leave
/// no trace.
pub async fn grouped_writes_keep_the_chain_contiguous(store: &dyn Store) {
    let s = scene(store).await;
    let n0 = audit_count(store).await;
    let e = |i: i64| {
        entry(
            at(1000 + i),
            "system",
            "probe",
            &format!("p{i}"),
            Outcome::Success,
        )
    };
    let ghost = vm("rg1", "ghost");
    let k2 = pkey("rg1", "westeurope", "second");
    let (a1, dup, a2, refused, reg, tok, missing, a3) = tokio::join!(
        store.append_audit(e(1)),
        store.create_token(token(OWNER_TOKEN, "mallory", at(1000)), ctx(at(1000))),
        store.append_audit(e(2)),
        store.put_policy(k2.clone(), spec(&k2, &[(&ghost, &[22])]), ctx(at(1000))),
        store.register_vm(
            VmRecord {
                id: vm("rg1", "vm4"),
                location: None,
                created: at(1000),
                created_by: OWNER.into(),
            },
            ctx(at(1000)),
        ),
        store.create_token(token("jg_new", "bob", at(1000)), ctx(at(1000))),
        store.revoke_request(rid(42), None, ctx(at(1000))),
        store.append_audit(e(3)),
    );
    assert!(dup.is_err(), "a duplicate token id must fail");
    assert!(
        matches!(refused, Err(OpError::Refused(PolicyError::UnknownVm(_)))),
        "{refused:?}"
    );
    assert!(
        matches!(missing, Err(OpError::Refused(RevokeError::NotFound))),
        "{missing:?}"
    );
    assert_eq!(reg.unwrap(), RegisterOutcome::Created);
    tok.unwrap();
    let mut appended = vec![a1.unwrap(), a2.unwrap(), a3.unwrap()];
    appended.sort();
    appended.dedup();
    assert_eq!(appended.len(), 3, "each append gets its own seq");
    assert!(appended[0] > n0);

    let report = verified(store).await;
    assert_eq!(report.count, n0 + 5, "3 appends, 1 registration, 1 token");
    let events = events_after(store, 0).await;
    assert_eq!(seqs(&events), (1..=n0 + 5).collect::<Vec<_>>());
    assert_eq!(
        store
            .find_token(OWNER_TOKEN)
            .await
            .unwrap()
            .unwrap()
            .principal,
        OWNER,
        "the failed duplicate changed the existing token"
    );
    assert_eq!(store.get_policy(&k2).await.unwrap(), None);
    assert!(store.get_vm(&vm("rg1", "vm4")).await.unwrap().is_some());
    assert_eq!(
        store.vm_policy(&s.vm1).await.unwrap().map(|p| p.key),
        Some(s.key)
    );

    // And the store keeps working after the group.
    let n = store.append_audit(e(4)).await.unwrap();
    assert_eq!(n, n0 + 6);
    verified(store).await;
}

// ---- user NSG rules -----------------------------------------------------------------

/// A user rule from anywhere listed in `sources` to `ports`, TCP.
fn nsg_rule(
    name: &str,
    priority: u16,
    access: Access,
    ports: &[&str],
    sources: &[&str],
) -> NsgRule {
    NsgRule {
        name: name.into(),
        priority,
        access,
        protocol: Protocol::Tcp,
        sources: sources.iter().map(|s| prefix(s)).collect(),
        ports: ports.iter().map(|p| parse_port_range(p).unwrap()).collect(),
        description: format!("rule {name}"),
        origin: RuleOrigin::User,
    }
}

/// `put_nsg_rule` reports created, then replaced; `nsg_rules` lists by priority, per
/// VM, case-insensitively; `delete_nsg_rule` deletes once. Every change is audited.
pub async fn nsg_rules_create_replace_list_delete(store: &dyn Store) {
    let s = scene(store).await;
    let c = |t: i64| ctx_as("netadmin", at(t));
    let mut seq = verified(store).await.last_seq;
    assert!(store.nsg_rules(&s.vm1).await.unwrap().is_empty());

    let ssh = nsg_rule("corp-ssh", 300, Access::Allow, &["22"], &["10.0.0.0/8"]);
    let web = nsg_rule("web", 200, Access::Allow, &["80", "443"], &["*"]);
    let created = store
        .put_nsg_rule(&s.vm1, ssh.clone(), c(10))
        .await
        .unwrap();
    assert!(created, "a new rule reports created");
    seq = expect_events(store, seq, &["nsgRule.create"], &c(10)).await;
    let last = events_after(store, seq - 1).await;
    assert!(
        last[0]
            .entry
            .target
            .eq_ignore_ascii_case(&s.vm1.to_string()),
        "nsg rule events target the VM: {:?}",
        last[0]
    );
    assert!(
        store
            .put_nsg_rule(&s.vm1, web.clone(), c(20))
            .await
            .unwrap()
    );
    seq = expect_events(store, seq, &["nsgRule.create"], &c(20)).await;
    assert_eq!(
        store.nsg_rules(&s.vm1).await.unwrap(),
        vec![web.clone(), ssh.clone()],
        "rules are listed by priority, as stored"
    );
    assert_eq!(
        store.nsg_rules(&shout(&s.vm1)).await.unwrap(),
        vec![web.clone(), ssh.clone()],
        "the VM matches case-insensitively"
    );

    // Replacing: new priority, ports, sources, access and protocol.
    let ssh2 = NsgRule {
        priority: 150,
        access: Access::Deny,
        protocol: Protocol::Any,
        sources: vec![prefix("192.0.2.0/24"), prefix("2001:db8::/32")],
        ports: vec![
            parse_port_range("22").unwrap(),
            parse_port_range("5985-5986").unwrap(),
        ],
        description: "replaced".into(),
        ..ssh.clone()
    };
    let created = store
        .put_nsg_rule(&shout(&s.vm1), ssh2.clone(), c(30))
        .await
        .unwrap();
    assert!(
        !created,
        "replacing a rule of the same name reports not created"
    );
    seq = expect_events(store, seq, &["nsgRule.update"], &c(30)).await;
    assert_eq!(
        store.nsg_rules(&s.vm1).await.unwrap(),
        vec![ssh2.clone(), web.clone()],
        "the replacement took the old rule's place, by its new priority"
    );
    // A rule may keep its own priority when it is replaced.
    assert!(
        !store
            .put_nsg_rule(&s.vm1, ssh2.clone(), c(40))
            .await
            .unwrap()
    );
    seq = expect_events(store, seq, &["nsgRule.update"], &c(40)).await;

    // Priorities and names are per VM.
    let other = nsg_rule("web", 200, Access::Deny, &["8080"], &["*"]);
    assert!(
        store
            .put_nsg_rule(&s.vm2, other.clone(), c(50))
            .await
            .unwrap()
    );
    seq = expect_events(store, seq, &["nsgRule.create"], &c(50)).await;
    assert_eq!(store.nsg_rules(&s.vm2).await.unwrap(), vec![other]);
    assert_eq!(
        store.nsg_rules(&s.vm1).await.unwrap(),
        vec![ssh2.clone(), web]
    );
    assert!(store.nsg_rules(&s.vm3).await.unwrap().is_empty());

    assert!(
        store
            .delete_nsg_rule(&shout(&s.vm1), "web", c(60))
            .await
            .unwrap()
    );
    seq = expect_events(store, seq, &["nsgRule.delete"], &c(60)).await;
    assert_eq!(store.nsg_rules(&s.vm1).await.unwrap(), vec![ssh2]);
    assert_eq!(
        store.nsg_rules(&s.vm2).await.unwrap().len(),
        1,
        "deleting vm1's rule left vm2's rule of the same name"
    );

    let before = snapshot(store).await;
    assert!(
        !store.delete_nsg_rule(&s.vm1, "web", c(70)).await.unwrap(),
        "deleting twice returns false"
    );
    assert!(!store.delete_nsg_rule(&s.vm3, "nope", c(70)).await.unwrap());
    assert!(
        !store
            .delete_nsg_rule(&vm("rg1", "ghost"), "web", c(70))
            .await
            .unwrap(),
        "deleting on an unknown VM returns false"
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "deleting nothing changed the store"
    );
    assert_eq!(verified(store).await.last_seq, seq);
}

/// A priority held by another rule of the VM is refused naming that rule; a rule for
/// an unregistered VM is refused. Neither changes anything.
pub async fn nsg_rule_refusals_change_nothing(store: &dyn Store) {
    let s = scene(store).await;
    let web = nsg_rule("web", 200, Access::Allow, &["443"], &["*"]);
    let ssh = nsg_rule("corp-ssh", 300, Access::Allow, &["22"], &["10.0.0.0/8"]);
    store
        .put_nsg_rule(&s.vm1, web.clone(), ctx(at(10)))
        .await
        .unwrap();
    store
        .put_nsg_rule(&s.vm1, ssh.clone(), ctx(at(10)))
        .await
        .unwrap();

    let before = snapshot(store).await;
    let taken = nsg_rule("other", 200, Access::Deny, &["22"], &["*"]);
    let r = store.put_nsg_rule(&s.vm1, taken, ctx(at(20))).await;
    assert_eq!(
        refusal("a new rule at a taken priority", r),
        NsgRuleError::PriorityTaken("web".into())
    );
    let moved = NsgRule {
        priority: 200,
        ..ssh.clone()
    };
    let r = store.put_nsg_rule(&shout(&s.vm1), moved, ctx(at(20))).await;
    assert_eq!(
        refusal("replacing a rule onto a taken priority", r),
        NsgRuleError::PriorityTaken("web".into())
    );
    let ghost = vm("rg1", "ghost");
    let r = store.put_nsg_rule(&ghost, ssh.clone(), ctx(at(20))).await;
    assert_eq!(
        refusal("a rule for an unknown VM", r),
        NsgRuleError::UnknownVm
    );
    let r = store
        .put_nsg_rule(&vm_in(other_sub(), "rg1", "vm1"), ssh.clone(), ctx(at(20)))
        .await;
    assert_eq!(
        refusal("a rule for a VM of an unknown subscription", r),
        NsgRuleError::UnknownVm
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusals changed the store"
    );
    assert_eq!(store.nsg_rules(&s.vm1).await.unwrap(), vec![web, ssh]);
    assert!(store.nsg_rules(&ghost).await.unwrap().is_empty());
}

// ---- agents -------------------------------------------------------------------------

/// The stored hash of enrollment token `id`'s secret (opaque to the store).
fn enroll_secret(id: &str) -> String {
    format!("{:0>64}", format!("e{id}"))
}

fn enroll_token(id: &str, scope: Scope, uses: u32, expires: Timestamp) -> EnrollTokenRecord {
    EnrollTokenRecord {
        id: id.into(),
        secret_hash: enroll_secret(id),
        scope,
        expires,
        uses_left: uses,
        description: format!("enroll token {id}"),
        created: t0(),
        created_by: OWNER.into(),
        revoked: None,
        allow_replace: false,
    }
}

fn rg_scope(group: &str) -> Scope {
    Scope::ResourceGroup(sub(), rg(group))
}

/// The principal of `vm`'s agent, as the controller names it.
fn agent_principal(vm: &VmId) -> String {
    format!("agent:{vm}")
}

/// Enrollment of `vm` presenting `token_id`'s right secret; the agent credential gets
/// id `agent_token`.
fn enroll_args(token_id: &str, vm: &VmId, agent_token: &str, now: Timestamp) -> EnrollArgs {
    EnrollArgs {
        token_id: token_id.into(),
        presented_hash: enroll_secret(token_id),
        vm: vm.clone(),
        location: Some(loc("westeurope")),
        agent_token: TokenRecord {
            description: format!("agent credential for {vm}"),
            ..token(agent_token, &agent_principal(vm), now)
        },
        online_since: now,
    }
}

/// The audit context of an enrollment with `token_id`.
fn enroll_ctx(token_id: &str, now: Timestamp) -> AuditCtx {
    ctx_as(&format!("enroll-token:{token_id}"), now)
}

async fn uses_left(store: &dyn Store, id: &str) -> u32 {
    store
        .list_enroll_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.id == id)
        .unwrap_or_else(|| panic!("enrollment token {id} not listed"))
        .uses_left
}

/// Issue 17: an install code is created with its enrollment token, in one transaction;
/// it is taken as many times as it has uses (each audited), never after it expired,
/// and an unknown code is nothing.
pub async fn install_codes_are_used_as_often_as_their_token(store: &dyn Store) {
    install(store).await;
    let code = |h: &str, expires: Timestamp| InstallCodeRecord {
        code_hash: h.into(),
        token_id: format!("tok-{h}"),
        sealed: format!("sealed-{h}"),
        expires,
        uses_left: 2,
    };
    for (id, h) in [("et-a", "aa"), ("et-b", "bb")] {
        store
            .create_enroll_token(
                enroll_token(id, rg_scope("rg1"), 2, at(3600)),
                Some(code(h, at(600))),
                ctx(at(1)),
            )
            .await
            .unwrap();
    }
    let seq = verified(store).await.last_seq;
    assert_eq!(
        store.take_install_code("cc", ctx(at(10))).await.unwrap(),
        None
    );
    let got = store.take_install_code("aa", ctx(at(10))).await.unwrap();
    assert_eq!(
        got,
        Some(InstallCodeRecord {
            uses_left: 1,
            ..code("aa", at(600))
        })
    );
    let seq = expect_events(store, seq, &["enrollToken.installCodeUsed"], &ctx(at(10))).await;
    let got = store.take_install_code("aa", ctx(at(11))).await.unwrap();
    assert_eq!(got.map(|c| c.uses_left), Some(0));
    expect_events(store, seq, &["enrollToken.installCodeUsed"], &ctx(at(11))).await;
    // Used up: never again.
    assert_eq!(
        store.take_install_code("aa", ctx(at(12))).await.unwrap(),
        None
    );
    // Expired: not taken.
    assert_eq!(
        store.take_install_code("bb", ctx(at(600))).await.unwrap(),
        None
    );
    verified(store).await;
}

/// A valid enrollment registers the VM, stores the agent's credential as given and
/// gives its principal the Agent role on that VM only; it uses one use, and is audited.
pub async fn enroll_registers_the_vm_and_issues_an_agent_credential(store: &dyn Store) {
    install(store).await;
    let tok = enroll_token("et1", rg_scope("rg1"), 5, at(3600));
    let mut seq = verified(store).await.last_seq;
    store
        .create_enroll_token(tok.clone(), None, ctx(at(1)))
        .await
        .unwrap();
    seq = expect_events(store, seq, &["enrollToken.create"], &ctx(at(1))).await;
    assert_eq!(store.list_enroll_tokens().await.unwrap(), vec![tok.clone()]);

    let v = vm("rg1", "web-1");
    assert_eq!(store.get_vm(&v).await.unwrap(), None);
    let args = enroll_args("et1", &v, "jg_agent1", at(10));
    let agent_token = args.agent_token.clone();
    let got = store
        .enroll(args, enroll_ctx("et1", at(10)))
        .await
        .unwrap_or_else(|e| panic!("enroll failed: {e:?}"));
    assert_eq!(got, v, "enroll returns the VM");
    seq = expect_events(store, seq, &["agent.enroll"], &enroll_ctx("et1", at(10))).await;
    let last = events_after(store, seq - 1).await;
    assert!(
        last[0].entry.target.eq_ignore_ascii_case(&v.to_string()),
        "agent.enroll targets the VM: {:?}",
        last[0]
    );

    let rec = store
        .get_vm(&v)
        .await
        .unwrap()
        .expect("enrollment registers the VM");
    assert_eq!(rec.location, Some(loc("westeurope")));
    assert_eq!(rec.created, at(10));
    assert_eq!(
        store.find_token("jg_agent1").await.unwrap(),
        Some(agent_token),
        "the agent credential is stored as given"
    );
    let ras = store
        .role_assignments(Some(&agent_principal(&v)))
        .await
        .unwrap();
    assert_eq!(ras.len(), 1, "one role assignment for the agent: {ras:?}");
    assert_eq!(
        ras[0].assignment,
        RoleAssignment {
            principal: agent_principal(&v),
            role: Role::Agent,
            scope: v.scope(),
        },
        "the agent holds the Agent role on its VM only"
    );
    assert_eq!(uses_left(store, "et1").await, 4, "one use was used");

    // Enrolling a VM an admin registered keeps the admin's record.
    let admin = vm("rg1", "db-1");
    register(store, &admin, at(20)).await;
    let first = store.get_vm(&admin).await.unwrap();
    seq = verified(store).await.last_seq;
    let got = store
        .enroll(
            enroll_args("et1", &shout(&admin), "jg_agent2", at(30)),
            enroll_ctx("et1", at(30)),
        )
        .await
        .unwrap();
    assert_eq!(got, admin, "the same VM, matched case-insensitively");
    expect_events(store, seq, &["agent.enroll"], &enroll_ctx("et1", at(30))).await;
    assert_eq!(
        store.get_vm(&admin).await.unwrap(),
        first,
        "enrolling a registered VM keeps its record"
    );
    assert_eq!(all_vms(store, sub(), None).await.len(), 2);
    assert_eq!(uses_left(store, "et1").await, 3);
    assert_eq!(
        store
            .find_token("jg_agent1")
            .await
            .unwrap()
            .unwrap()
            .revoked,
        None,
        "another VM's enrollment leaves web-1's agent credential alone"
    );
}

/// Each enrollment uses one use; with none left, enrollment is refused (`UsedUp`).
pub async fn enroll_uses_run_out(store: &dyn Store) {
    install(store).await;
    store
        .create_enroll_token(
            enroll_token("et2", Scope::Subscription(sub()), 2, at(3600)),
            None,
            ctx(at(1)),
        )
        .await
        .unwrap();
    let (v1, v2, v3) = (vm("rgA", "a"), vm("rgB", "b"), vm("rgA", "c"));
    store
        .enroll(
            enroll_args("et2", &v1, "jg_a", at(10)),
            enroll_ctx("et2", at(10)),
        )
        .await
        .unwrap();
    assert_eq!(uses_left(store, "et2").await, 1);
    store
        .enroll(
            enroll_args("et2", &v2, "jg_b", at(20)),
            enroll_ctx("et2", at(20)),
        )
        .await
        .unwrap();
    assert_eq!(uses_left(store, "et2").await, 0);

    let before = snapshot(store).await;
    let r = store
        .enroll(
            enroll_args("et2", &v3, "jg_c", at(30)),
            enroll_ctx("et2", at(30)),
        )
        .await;
    assert_eq!(refusal("enroll with no use left", r), EnrollError::UsedUp);
    let r = store
        .enroll(
            enroll_args("et2", &v1, "jg_c", at(30)),
            enroll_ctx("et2", at(30)),
        )
        .await;
    assert_eq!(
        refusal("re-enroll with no use left", r),
        EnrollError::UsedUp
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusals changed the store"
    );
    assert_eq!(store.get_vm(&v3).await.unwrap(), None);
    assert_eq!(store.find_token("jg_c").await.unwrap(), None);
    assert_eq!(
        store.find_token("jg_a").await.unwrap().unwrap().revoked,
        None,
        "a refused re-enrollment keeps the current agent credential"
    );
}

/// An enrollment token works until its expiry time, exclusive (simulated clock).
pub async fn enroll_refuses_an_expired_token(store: &dyn Store) {
    install(store).await;
    store
        .create_enroll_token(
            enroll_token("et3", rg_scope("rg1"), 5, at(100)),
            None,
            ctx(at(1)),
        )
        .await
        .unwrap();
    store
        .enroll(
            enroll_args("et3", &vm("rg1", "early"), "jg_early", at(99)),
            enroll_ctx("et3", at(99)),
        )
        .await
        .unwrap_or_else(|e| panic!("enroll a second before expiry failed: {e:?}"));

    let before = snapshot(store).await;
    for t in [100, 101, 86_400] {
        let r = store
            .enroll(
                enroll_args("et3", &vm("rg1", "late"), "jg_late", at(t)),
                enroll_ctx("et3", at(t)),
            )
            .await;
        assert_eq!(
            refusal(&format!("enroll {t} s after t0, expiry at 100 s"), r),
            EnrollError::Expired
        );
    }
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusals changed the store"
    );
    assert_eq!(uses_left(store, "et3").await, 4);
    assert_eq!(store.get_vm(&vm("rg1", "late")).await.unwrap(), None);
}

/// A wrong secret or unknown id (`InvalidToken`, whatever the token's state), a
/// revoked token, a VM outside the token's scope, an unknown subscription: refused,
/// and nothing changes (no VM, no credential, no role, no use, no audit event).
pub async fn enroll_refusals_change_nothing(store: &dyn Store) {
    install(store).await;
    let good = enroll_token("et4", rg_scope("rg1"), 1, at(3600));
    let spent = enroll_token("et5", rg_scope("rg1"), 0, at(3600));
    let old = enroll_token("et6", rg_scope("rg1"), 1, at(10));
    let revoked = EnrollTokenRecord {
        revoked: Some(at(5)),
        ..enroll_token("et7", rg_scope("rg1"), 1, at(3600))
    };
    let foreign = enroll_token("et8", Scope::Subscription(other_sub()), 1, at(3600));
    for t in [&good, &spent, &old, &revoked, &foreign] {
        store
            .create_enroll_token(t.clone(), None, ctx(at(1)))
            .await
            .unwrap();
    }
    let v = vm("rg1", "web-1");
    let now = at(20);

    let before = snapshot(store).await;
    let wrong = |token_id: &str| EnrollArgs {
        presented_hash: enroll_secret("wrong"),
        ..enroll_args(token_id, &v, "jg_x", now)
    };
    for id in ["et4", "et5", "et6", "et7"] {
        let r = store.enroll(wrong(id), enroll_ctx(id, now)).await;
        assert_eq!(
            refusal(&format!("enroll with {id} and a wrong secret"), r),
            EnrollError::InvalidToken,
            "a wrong secret must not reveal the token's state"
        );
    }
    let r = store
        .enroll(
            enroll_args("nope", &v, "jg_x", now),
            enroll_ctx("nope", now),
        )
        .await;
    assert_eq!(
        refusal("enroll with an unknown token id", r),
        EnrollError::InvalidToken
    );
    let r = store
        .enroll(enroll_args("et7", &v, "jg_x", now), enroll_ctx("et7", now))
        .await;
    assert_eq!(
        refusal("enroll with a revoked token", r),
        EnrollError::Revoked
    );
    let r = store
        .enroll(enroll_args("et6", &v, "jg_x", now), enroll_ctx("et6", now))
        .await;
    assert_eq!(
        refusal("enroll with an expired token", r),
        EnrollError::Expired
    );
    let r = store
        .enroll(enroll_args("et5", &v, "jg_x", now), enroll_ctx("et5", now))
        .await;
    assert_eq!(
        refusal("enroll with a used-up token", r),
        EnrollError::UsedUp
    );
    for outside in [vm("rg2", "web-1"), vm_in(other_sub(), "rg1", "web-1")] {
        let r = store
            .enroll(
                enroll_args("et4", &outside, "jg_x", now),
                enroll_ctx("et4", now),
            )
            .await;
        match refusal(&format!("enroll {outside} with a token for rg1"), r) {
            EnrollError::OutOfScope(scope) => assert!(
                scope.eq_ignore_ascii_case(&good.scope.to_string()),
                "OutOfScope names {scope}, expected {}",
                good.scope
            ),
            other => panic!("expected OutOfScope, got {other:?}"),
        }
    }
    let r = store
        .enroll(
            enroll_args("et8", &vm_in(other_sub(), "rg1", "web-1"), "jg_x", now),
            enroll_ctx("et8", now),
        )
        .await;
    assert_eq!(
        refusal("enroll into a subscription the store does not know", r),
        EnrollError::UnknownSubscription
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusals changed the store"
    );
    assert_eq!(store.get_vm(&v).await.unwrap(), None);
    assert_eq!(store.find_token("jg_x").await.unwrap(), None);
    assert!(
        store
            .role_assignments(Some(&agent_principal(&v)))
            .await
            .unwrap()
            .is_empty()
    );

    // The good token still works afterwards, once.
    store
        .enroll(enroll_args("et4", &v, "jg_ok", now), enroll_ctx("et4", now))
        .await
        .unwrap_or_else(|e| panic!("enroll after the refusals failed: {e:?}"));
    assert_eq!(uses_left(store, "et4").await, 0);
}

/// Enrolling a VM again revokes its previous agent credential (at the enrollment's
/// time) and leaves exactly one Agent role assignment; other agents are untouched.
pub async fn re_enroll_revokes_the_previous_agent_credential(store: &dyn Store) {
    install(store).await;
    store
        .create_enroll_token(
            enroll_token("et9", rg_scope("rg1"), 5, at(3600)),
            None,
            ctx(at(1)),
        )
        .await
        .unwrap();
    let (v1, v2) = (vm("rg1", "vm1"), vm("rg1", "vm2"));
    for (v, id, t) in [(&v1, "jg_v1a", 10), (&v2, "jg_v2a", 11)] {
        store
            .enroll(enroll_args("et9", v, id, at(t)), enroll_ctx("et9", at(t)))
            .await
            .unwrap();
    }
    let seq = verified(store).await.last_seq;
    store
        .enroll(
            enroll_args("et9", &v1, "jg_v1b", at(20)),
            enroll_ctx("et9", at(20)),
        )
        .await
        .unwrap_or_else(|e| panic!("re-enroll failed: {e:?}"));
    expect_events(store, seq, &["agent.enroll"], &enroll_ctx("et9", at(20))).await;

    assert_eq!(
        store.find_token("jg_v1a").await.unwrap().unwrap().revoked,
        Some(at(20)),
        "the previous credential is revoked at the re-enrollment"
    );
    let new = store.find_token("jg_v1b").await.unwrap().unwrap();
    assert_eq!(
        (new.principal.as_str(), new.revoked),
        (agent_principal(&v1).as_str(), None)
    );
    let ras = store
        .role_assignments(Some(&agent_principal(&v1)))
        .await
        .unwrap();
    assert_eq!(
        ras.len(),
        1,
        "exactly one Agent assignment after re-enrolling: {ras:?}"
    );
    assert_eq!(
        (ras[0].assignment.role, &ras[0].assignment.scope),
        (Role::Agent, &v1.scope())
    );
    assert_eq!(
        store.find_token("jg_v2a").await.unwrap().unwrap().revoked,
        None,
        "another VM's agent credential is untouched"
    );
    assert_eq!(
        store
            .role_assignments(Some(&agent_principal(&v2)))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store
            .find_token(OWNER_TOKEN)
            .await
            .unwrap()
            .unwrap()
            .revoked,
        None
    );
    assert_eq!(uses_left(store, "et9").await, 2);
    assert_eq!(all_vms(store, sub(), None).await.len(), 2);
}

/// `put_agent_status` keeps one record per VM (the latest); `agent_status` reads it
/// case-insensitively. Status reports are heartbeats and are not audited.
pub async fn agent_status_put_get_upserts(store: &dyn Store) {
    let s = scene(store).await;
    assert_eq!(store.agent_status(&s.vm1).await.unwrap(), None);
    let n0 = audit_count(store).await;
    let first = AgentStatusRecord {
        vm: s.vm1.clone(),
        report: r#"{"appliedRevision":"r1"}"#.into(),
        last_seen: at(10),
    };
    store
        .put_agent_status(first.clone(), quiet_agent())
        .await
        .unwrap();
    assert_eq!(store.agent_status(&s.vm1).await.unwrap(), Some(first));
    let second = AgentStatusRecord {
        vm: s.vm1.clone(),
        report: r#"{"appliedRevision":"r2","error":null}"#.into(),
        last_seen: at(20),
    };
    store
        .put_agent_status(second.clone(), quiet_agent())
        .await
        .unwrap();
    assert_eq!(
        store.agent_status(&shout(&s.vm1)).await.unwrap(),
        Some(second.clone()),
        "the latest report replaces the previous one"
    );
    assert_eq!(
        store.agent_status(&s.vm2).await.unwrap(),
        None,
        "reports are per VM"
    );
    let third = AgentStatusRecord {
        vm: shout(&s.vm1),
        report: "{}".into(),
        last_seen: at(30),
    };
    store.put_agent_status(third, quiet_agent()).await.unwrap();
    let got = store.agent_status(&s.vm1).await.unwrap().unwrap();
    assert_eq!(
        (got.vm.key(), got.report.as_str(), got.last_seen),
        (s.vm1.key(), "{}", at(30)),
        "a report in another casing replaces the VM's record"
    );
    assert_eq!(
        audit_count(store).await,
        n0,
        "status reports are not audited"
    );
}

/// Issue 10: blocked-attempt points have a retention. `prune_blocked(before)` deletes
/// exactly the points older than `before`, of every VM and however many there are,
/// and keeps the others; like recording them, it is not audited (telemetry).
pub async fn prune_blocked_keeps_exactly_the_recent_points(store: &dyn Store) {
    let s = scene(store).await;
    const DAY: i64 = 86_400;
    let point = |vm: &VmId, secs: i64, count: u64| BlockedPoint {
        vm: vm.clone(),
        port: 22,
        protocol: "TCP".into(),
        at: at(secs),
        count,
    };
    // Many old points (more than a backend may delete at once), then a few around
    // the cut.
    let old: Vec<BlockedPoint> = (0..25_000)
        .map(|i| point(if i % 2 == 0 { &s.vm1 } else { &s.vm2 }, i, 1))
        .collect();
    store.record_blocked(old).await.unwrap();
    store
        .record_blocked(vec![
            point(&s.vm2, 10 * DAY, 2),
            point(&s.vm1, 30 * DAY - 1, 3),
            point(&s.vm1, 30 * DAY, 4),
            point(&s.vm2, 40 * DAY, 5),
        ])
        .await
        .unwrap();
    let n0 = audit_count(store).await;

    // Kept for 10 days, at day 40: everything before day 30 goes.
    let deleted = store.prune_blocked(at(30 * DAY)).await.unwrap();
    assert_eq!(deleted, 25_002, "the old points of both VMs");
    let left: Vec<(String, i64, u64)> = store
        .blocked_series(None, t0())
        .await
        .unwrap()
        .into_iter()
        .map(|p| {
            (
                p.vm.name.as_str().to_owned(),
                p.at.duration_since(t0()).as_secs(),
                p.count,
            )
        })
        .collect();
    assert_eq!(
        left,
        vec![("vm1".into(), 30 * DAY, 4), ("vm2".into(), 40 * DAY, 5)],
        "a point at the cut itself is kept"
    );
    assert_eq!(store.prune_blocked(at(30 * DAY)).await.unwrap(), 0);
    assert_eq!(audit_count(store).await, n0, "pruning is not audited");
}

/// Regression (issue 8.4): a leaked enrollment token took over a machine whose agent
/// was alive. Replacing an online agent needs a token made for replacing.
pub async fn enroll_refuses_to_replace_an_online_agent(store: &dyn Store) {
    install(store).await;
    store
        .create_enroll_token(
            enroll_token("et1", rg_scope("rg1"), 5, at(3600)),
            None,
            ctx(at(1)),
        )
        .await
        .unwrap();
    let v = vm("rg1", "web-1");
    store
        .enroll(
            enroll_args("et1", &v, "jg_real", at(10)),
            enroll_ctx("et1", at(10)),
        )
        .await
        .unwrap();
    store
        .put_agent_status(
            AgentStatusRecord {
                vm: v.clone(),
                report: "{}".into(),
                last_seen: at(100),
            },
            quiet_agent(),
        )
        .await
        .unwrap();
    let before = snapshot(store).await;
    let online = EnrollArgs {
        online_since: at(60),
        ..enroll_args("et1", &v, "jg_evil", at(110))
    };
    let r = store.enroll(online, enroll_ctx("et1", at(110))).await;
    assert_eq!(
        refusal("take over an online agent", r),
        EnrollError::AgentOnline
    );
    assert_eq!(
        snapshot(store).await,
        before,
        "the refusal changed something"
    );
    assert_eq!(
        store.find_token("jg_real").await.unwrap().unwrap().revoked,
        None
    );
    assert_eq!(
        uses_left(store, "et1").await,
        4,
        "a refused enrollment uses nothing"
    );

    // Offline long enough: a plain token may re-enroll (the machine was rebuilt).
    let offline = EnrollArgs {
        online_since: at(101),
        ..enroll_args("et1", &v, "jg_rebuilt", at(200))
    };
    store
        .enroll(offline, enroll_ctx("et1", at(200)))
        .await
        .unwrap();
    assert_eq!(
        store.find_token("jg_real").await.unwrap().unwrap().revoked,
        Some(at(200))
    );

    // Online again, and a token made for replacing: allowed, and audited as such.
    store
        .put_agent_status(
            AgentStatusRecord {
                vm: v.clone(),
                report: "{}".into(),
                last_seen: at(300),
            },
            quiet_agent(),
        )
        .await
        .unwrap();
    store
        .create_enroll_token(
            EnrollTokenRecord {
                allow_replace: true,
                ..enroll_token("et2", rg_scope("rg1"), 1, at(3600))
            },
            None,
            ctx(at(301)),
        )
        .await
        .unwrap();
    let seq = verified(store).await.last_seq;
    let replace = EnrollArgs {
        online_since: at(250),
        ..enroll_args("et2", &v, "jg_new", at(310))
    };
    store
        .enroll(replace, enroll_ctx("et2", at(310)))
        .await
        .unwrap();
    assert_eq!(
        store
            .find_token("jg_rebuilt")
            .await
            .unwrap()
            .unwrap()
            .revoked,
        Some(at(310))
    );
    let events = events_after(store, seq).await;
    assert_eq!(events.len(), 1);
    assert!(
        events[0].entry.details.contains("\"replacedAgent\":true"),
        "{:?}",
        events[0]
    );
    let listed = store.list_enroll_tokens().await.unwrap();
    assert!(listed.iter().any(|t| t.id == "et2" && t.allow_replace));
}

/// Enrollment tokens can be revoked (audited); a revoked one enrolls nothing.
pub async fn revoked_enroll_tokens_enroll_nothing(store: &dyn Store) {
    install(store).await;
    store
        .create_enroll_token(
            enroll_token("et1", rg_scope("rg1"), 5, at(3600)),
            None,
            ctx(at(1)),
        )
        .await
        .unwrap();
    let seq = verified(store).await.last_seq;
    assert!(store.revoke_enroll_token("et1", ctx(at(5))).await.unwrap());
    expect_events(store, seq, &["enrollToken.revoke"], &ctx(at(5))).await;
    assert!(!store.revoke_enroll_token("et1", ctx(at(6))).await.unwrap());
    assert!(!store.revoke_enroll_token("nope", ctx(at(6))).await.unwrap());
    let v = vm("rg1", "web-1");
    let r = store
        .enroll(
            enroll_args("et1", &v, "jg_x", at(10)),
            enroll_ctx("et1", at(10)),
        )
        .await;
    assert_eq!(
        refusal("enroll with a revoked token", r),
        EnrollError::Revoked
    );
    assert_eq!(
        store.list_enroll_tokens().await.unwrap()[0].revoked,
        Some(at(5))
    );
}

/// Bootstrap tokens that are not `jg_<id>.<secret>` are found by their secret's hash.
pub async fn tokens_are_found_by_secret_hash(store: &dyn Store) {
    install(store).await;
    let t = TokenRecord {
        secret_hash: "ab".repeat(32),
        ..token("rnd123", "dave", at(25))
    };
    store.create_token(t.clone(), ctx(at(25))).await.unwrap();
    assert_eq!(
        store
            .find_token_by_secret_hash(&"ab".repeat(32))
            .await
            .unwrap(),
        Some(t)
    );
    assert_eq!(
        store
            .find_token_by_secret_hash(&"cd".repeat(32))
            .await
            .unwrap(),
        None
    );
}

/// Command-line sign-ins under way: decided once (audited), taken once, bounded in
/// number, gone when expired; a credential keeps the identity it was issued to.
pub async fn signins_are_decided_once_and_taken_once(store: &dyn Store) {
    install(store).await;
    let device = |id: &str, code: &str, now: Timestamp| SigninRecord {
        id: id.into(),
        user_code: Some(code.into()),
        challenge: None,
        source: "192.0.2.7".into(),
        status: SigninStatus::Pending,
        created: now,
        expires: now + SignedDuration::from_secs(600),
        polled: None,
    };
    assert!(
        store
            .start_signin(device("d1", "BCDF-GHJK", at(0)), 2, 5)
            .await
            .unwrap()
    );
    assert!(
        store
            .start_signin(device("d2", "LMNP-QRST", at(1)), 2, 5)
            .await
            .unwrap()
    );
    // Two open: a third is refused and not stored.
    assert!(
        !store
            .start_signin(device("d3", "VWXZ-BCDF", at(2)), 2, 5)
            .await
            .unwrap()
    );
    assert_eq!(store.take_signin("d3", at(2)).await.unwrap(), None);
    // Pending: taking it leaves it, with the time it was asked.
    let first = store.take_signin("d1", at(5)).await.unwrap().unwrap();
    assert_eq!(
        (first.status.clone(), first.polled),
        (SigninStatus::Pending, None)
    );
    assert_eq!(
        store
            .take_signin("d1", at(10))
            .await
            .unwrap()
            .unwrap()
            .polled,
        Some(at(5))
    );
    // Found by user code while unexpired.
    assert_eq!(
        store
            .signin_by_user_code("BCDF-GHJK", at(10))
            .await
            .unwrap()
            .unwrap()
            .id,
        "d1"
    );
    assert_eq!(
        store
            .signin_by_user_code("BCDF-GHJK", at(600))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .signin_by_user_code("NOPE-NOPE", at(10))
            .await
            .unwrap(),
        None
    );
    // Decided once.
    let approved = SigninStatus::Approved {
        principal: "idp#alice".into(),
        identity: "{}".into(),
    };
    assert!(
        store
            .decide_signin("BCDF-GHJK", approved.clone(), ctx(at(20)))
            .await
            .unwrap()
    );
    let deny = SigninStatus::Denied {
        principal: "idp#bob".into(),
    };
    assert!(
        !store
            .decide_signin("BCDF-GHJK", deny.clone(), ctx(at(21)))
            .await
            .unwrap()
    );
    assert!(
        !store
            .decide_signin("BCDF-GHJK", SigninStatus::Pending, ctx(at(21)))
            .await
            .unwrap()
    );
    // An expired one cannot be decided.
    assert!(
        !store
            .decide_signin("LMNP-QRST", deny, ctx(at(601)))
            .await
            .unwrap()
    );
    // Taken once: the decision, then nothing.
    assert_eq!(
        store
            .take_signin("d1", at(30))
            .await
            .unwrap()
            .unwrap()
            .status,
        approved
    );
    assert_eq!(store.take_signin("d1", at(31)).await.unwrap(), None);
    // An expired one is returned as it was (the caller says it expired), then gone.
    let late = store.take_signin("d2", at(700)).await.unwrap().unwrap();
    assert_eq!(late.status, SigninStatus::Pending);
    assert_eq!(store.take_signin("d2", at(701)).await.unwrap(), None);
    // Expired ones no longer count against the bound.
    assert!(
        store
            .start_signin(device("d4", "VWXZ-BCDF", at(800)), 1, 5)
            .await
            .unwrap()
    );
    // One address cannot take every place: 2 from 192.0.2.7 at most here, while
    // another address still gets one, and loopback sign-ins have their own places.
    let from = |id: &str, code: &str, src: &str| SigninRecord {
        source: src.into(),
        ..device(id, code, at(810))
    };
    assert!(
        store
            .start_signin(from("p1", "BBBB-BBBB", "192.0.2.7"), 10, 2)
            .await
            .unwrap()
    );
    assert!(
        !store
            .start_signin(from("p2", "CCCC-CCCC", "192.0.2.7"), 10, 2)
            .await
            .unwrap()
    );
    assert!(
        store
            .start_signin(from("p3", "DDDD-DDDD", "198.51.100.1"), 10, 2)
            .await
            .unwrap()
    );
    // A loopback sign-in is stored decided, with its challenge.
    let loopback = SigninRecord {
        id: "l1".into(),
        user_code: None,
        challenge: Some("chal".into()),
        status: approved.clone(),
        ..device("l1", "", at(800))
    };
    assert!(store.start_signin(loopback.clone(), 1, 5).await.unwrap());
    assert_eq!(
        store.take_signin("l1", at(801)).await.unwrap(),
        Some(loopback)
    );
    let actions: Vec<String> = store
        .query_audit(&AuditQuery {
            action: Some("auth.device".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| format!("{} {} {}", r.entry.action, r.entry.target, r.entry.actor))
        .collect();
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(
        actions[0].starts_with("auth.device.approve BCDF-GHJK"),
        "{actions:?}"
    );
    // A credential keeps who it was issued to.
    let t = TokenRecord {
        identity: Some(r#"{"name":"Alice"}"#.into()),
        ..token("sess01", "idp#alice", at(900))
    };
    store.create_token(t.clone(), ctx(at(900))).await.unwrap();
    assert_eq!(store.find_token("sess01").await.unwrap(), Some(t.clone()));
    // Its use is recorded (its idle timeout), not audited.
    let events = store.audit_tail().await.unwrap().0;
    store.touch_token("sess01", at(950)).await.unwrap();
    assert_eq!(
        store.find_token("sess01").await.unwrap().unwrap().last_used,
        Some(at(950))
    );
    assert_eq!(store.audit_tail().await.unwrap().0, events);
}

/// Approvals: a port a rule covers waits (not live, no grant), the requestor never
/// decides, approvals count per principal, the last one opens the port for its duration
/// from then (narrowed, never widened); denials, cancellation and the pending timeout
/// end waits; rules are stored, replaced and deleted, each step audited.
pub async fn approvals_make_ports_wait_then_open_deny_cancel_or_expire(store: &dyn Store) {
    use jitgate_core::approval::{ApprovalRuleInput, DecideError, Outcome, validate_rule};
    let s = scene(store).await;
    let rule = validate_rule(
        "ssh",
        &ApprovalRuleInput {
            scope: Some(
                Scope::ResourceGroup(sub(), ResourceGroup::parse("rg1").unwrap()).to_string(),
            ),
            ports: Some(vec![22]),
            min_approvals: Some(2),
            pending_timeout: Some("PT10M".into()),
            ..Default::default()
        },
        &|_| Ok(()),
    )
    .unwrap();
    assert!(
        store
            .put_approval_rule(rule.clone(), ctx(at(0)))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_approval_rule(rule.clone(), ctx(at(0)))
            .await
            .unwrap()
    );
    assert_eq!(store.approval_rules().await.unwrap(), vec![rule.clone()]);
    assert_eq!(
        store.approval_rule("ssh").await.unwrap(),
        Some(rule.clone())
    );

    // 22 waits, 3389 (no rule) opens at once.
    let r = initiate_ok(
        store,
        args(
            &s.key,
            rid(1),
            vec![(
                &s.vm1,
                vec![want(22, None, "PT1H"), want(3389, None, "PT1H")],
            )],
        ),
        at(0),
    )
    .await;
    let status = |r: &AccessRequest, n: u16| {
        r.vms[0]
            .ports
            .iter()
            .find(|p| p.number.get() == n)
            .unwrap()
            .status
    };
    assert_eq!(status(&r, 22), PortStatus::Pending);
    assert_eq!(status(&r, 3389), PortStatus::Initiated);
    assert_eq!(r.approval.as_ref().unwrap().snapshot.rule, "ssh");
    let live: Vec<u16> = store
        .live_grants(&s.vm1, at(1))
        .await
        .unwrap()
        .iter()
        .map(|g| g.number.get())
        .collect();
    assert_eq!(live, [3389], "a pending port is no grant");
    let pending = store
        .list_requests(&RequestFilter {
            pending: true,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);

    let approver = |who: &str| assignment(who, Role::JitApprover, Scope::Subscription(sub()));
    let vote = |who: &str, approve: bool, duration: Option<i64>| DecideArgs {
        request: rid(1),
        who: who.into(),
        approve,
        reason: Some(format!("{who} says so")),
        duration,
        source: None,
        assignments: if who == OWNER {
            owner_assignments()
        } else {
            approver(who)
        },
    };
    let refused = |r: Result<Decided, OpError<DecideRefusal>>| match r {
        Err(OpError::Refused(x)) => x,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // The Owner made it: it cannot decide on it, whatever it holds.
    assert_eq!(
        refused(
            store
                .decide_request(vote(OWNER, true, None), ctx(at(60)))
                .await
        ),
        DecideRefusal::Decide(DecideError::OwnRequest)
    );
    // Someone without the approve action is not an approver.
    let mut nobody = vote("nobody", true, None);
    nobody.assignments = Vec::new();
    assert_eq!(
        refused(store.decide_request(nobody, ctx_as("nobody", at(60))).await),
        DecideRefusal::Decide(DecideError::NotAnApprover)
    );
    let d = store
        .decide_request(vote("amy", true, None), ctx_as("amy", at(60)))
        .await
        .unwrap();
    assert_eq!(
        d.outcome,
        Outcome::Counted {
            approvals: 1,
            needed: 2
        }
    );
    assert_eq!(
        refused(
            store
                .decide_request(vote("amy", true, None), ctx_as("amy", at(61)))
                .await
        ),
        DecideRefusal::Decide(DecideError::AlreadyDecided)
    );
    // Widening is refused and writes nothing.
    assert!(matches!(
        refused(store.decide_request(vote("ben", true, Some(7200)), ctx_as("ben", at(120))).await),
        DecideRefusal::Invalid(f) if f.field == "duration"
    ));
    // The second approval opens 22 now, for the 30 minutes ben allows.
    let d = store
        .decide_request(vote("ben", true, Some(1800)), ctx_as("ben", at(120)))
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Approved);
    let p22 = d.request.vms[0]
        .ports
        .iter()
        .find(|p| p.number.get() == 22)
        .unwrap()
        .clone();
    assert_eq!(
        (p22.status, p22.end),
        (PortStatus::Initiated, at(120 + 1800))
    );
    assert_eq!(d.request.approval.as_ref().unwrap().votes.len(), 2);
    let mut live: Vec<u16> = store
        .live_grants(&s.vm1, at(121))
        .await
        .unwrap()
        .iter()
        .map(|g| g.number.get())
        .collect();
    live.sort();
    assert_eq!(live, [22, 3389]);
    assert_eq!(
        refused(
            store
                .decide_request(vote("cat", true, None), ctx_as("cat", at(130)))
                .await
        ),
        DecideRefusal::Decide(DecideError::NotPending)
    );

    // Denied, cancelled, expired.
    let deny_args = |n: u128| args(&s.key, rid(n), vec![(&s.vm2, vec![want(22, None, "PT1H")])]);
    initiate_ok(store, deny_args(2), at(200)).await;
    let mut d2 = vote("amy", false, None);
    d2.request = rid(2);
    // One denial ends it (the default threshold).
    let dd = store
        .decide_request(d2, ctx_as("amy", at(201)))
        .await
        .unwrap();
    assert_eq!(dd.outcome, Outcome::Denied);
    assert_eq!(dd.request.vms[0].ports[0].status, PortStatus::Denied);
    initiate_ok(store, deny_args(3), at(300)).await;
    match store
        .cancel_request(rid(3), "someone-else", ctx_as("someone-else", at(301)))
        .await
    {
        Err(OpError::Refused(CancelRefusal::NotYours)) => {}
        other => panic!("{other:?}"),
    }
    let c = store
        .cancel_request(rid(3), OWNER, ctx(at(302)))
        .await
        .unwrap();
    assert_eq!(
        c.vms[0].ports[0].status,
        PortStatus::Revoked(RevokeReason::Cancelled)
    );
    initiate_ok(store, deny_args(4), at(400)).await;
    assert_eq!(store.next_expiry().await.unwrap(), Some(at(400 + 600)));
    store.expire_due(at(1001)).await.unwrap();
    for n in [4] {
        let r = request(store, rid(n)).await;
        assert_eq!(
            r.vms[0].ports[0].status,
            PortStatus::Revoked(RevokeReason::ApprovalExpired),
            "request {n}"
        );
    }
    let actions = audit_actions(store, "request.", 100).await;
    for a in [
        "request.approve",
        "request.approved",
        "request.deny",
        "request.cancel",
        "request.approvalExpired",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} in {actions:?}");
    }
    assert!(
        store
            .delete_approval_rule("ssh", ctx(at(1100)))
            .await
            .unwrap()
    );
    assert!(
        !store
            .delete_approval_rule("ssh", ctx(at(1100)))
            .await
            .unwrap()
    );
    // A request made without rules does not wait.
    let r = initiate_ok(store, deny_args(5), at(1200)).await;
    assert_eq!(r.vms[0].ports[0].status, PortStatus::Initiated);
    assert!(r.approval.is_none());
}

/// Webhooks: an audit event people are told about is queued in its own transaction for
/// each subscribed endpoint; a delivery is claimed once per lease; its outcome is
/// recorded; 410 disables the endpoint.
pub async fn webhook_events_are_queued_with_their_event_claimed_once_and_finished(
    store: &dyn Store,
) {
    use std::time::Duration;
    let s = scene(store).await;
    let hook = |name: &str, events: &[&str]| WebhookRecord {
        name: name.into(),
        url: format!("https://hooks.example.net/{name}"),
        events: events.iter().map(|e| e.to_string()).collect(),
        format: "standard".into(),
        secret: "whsec_c2VjcmV0".into(),
        created: at(0),
        updated: at(0),
        disabled: None,
    };
    assert!(
        store
            .put_webhook(hook("all", &["*"]), ctx(at(0)))
            .await
            .unwrap()
    );
    assert!(
        store
            .put_webhook(hook("ends", &["grant.ended"]), ctx(at(0)))
            .await
            .unwrap()
    );
    assert_eq!(store.webhooks().await.unwrap().len(), 2);
    // A refused initiate queues nothing; an accepted one queues grant.started for "all".
    let bad = args(
        &s.key,
        rid(9),
        vec![(&s.vm1, vec![want(9999, None, "PT1H")])],
    );
    assert!(store.initiate(bad, ctx(at(1))).await.is_err());
    initiate_ok(
        store,
        args(&s.key, rid(1), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
        at(2),
    )
    .await;
    let d = store
        .claim_deliveries(at(3), Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        (d[0].webhook.as_str(), d[0].event.as_str()),
        ("all", "grant.started")
    );
    let payload: serde_json::Value = serde_json::from_str(&d[0].payload).unwrap();
    assert_eq!(payload["type"], "grant.started");
    assert_eq!(payload["data"]["details"]["request"], rid(1).to_string());
    // Claimed: nobody else gets it during the lease; after it, it is due again.
    assert!(
        store
            .claim_deliveries(at(4), Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store
        .claim_deliveries(at(64), Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(
        again[0].msg_id, d[0].msg_id,
        "the same message, the same id"
    );
    // The first claimer's late outcome is ignored: the message is the second's now.
    store
        .finish_delivery(
            &d[0].msg_id,
            d[0].claimed_until,
            DeliveryResult::Delivered,
            at(65),
        )
        .await
        .unwrap();
    assert_eq!(store.webhook_counts("all").await.unwrap(), (0, 0, 1));
    store
        .finish_delivery(
            &d[0].msg_id,
            again[0].claimed_until,
            DeliveryResult::Retry {
                at: at(100),
                error: "500".into(),
            },
            at(65),
        )
        .await
        .unwrap();
    assert!(
        store
            .claim_deliveries(at(99), Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let third = store
        .claim_deliveries(at(100), Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(third[0].attempts, 1);
    store
        .finish_delivery(
            &d[0].msg_id,
            third[0].claimed_until,
            DeliveryResult::Delivered,
            at(101),
        )
        .await
        .unwrap();
    assert_eq!(store.webhook_counts("all").await.unwrap(), (1, 0, 0));
    // The grant's end goes to both; 410 from one disables it.
    store.expire_due(at(2 + 3600)).await.unwrap();
    let ends = store
        .claim_deliveries(at(3700), Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(ends.len(), 2, "{ends:?}");
    let gone = ends.iter().find(|e| e.webhook == "ends").unwrap();
    store
        .finish_delivery(
            &gone.msg_id,
            gone.claimed_until,
            DeliveryResult::Gone {
                error: "410".into(),
            },
            at(3701),
        )
        .await
        .unwrap();
    assert!(
        store
            .webhook("ends")
            .await
            .unwrap()
            .unwrap()
            .disabled
            .is_some()
    );
    // Deleting an endpoint drops what it had not received.
    assert!(store.delete_webhook("all", ctx(at(3800))).await.unwrap());
    assert!(store.webhook("all").await.unwrap().is_none());
    let actions = audit_actions(store, "webhook.", 10).await;
    assert_eq!(
        actions,
        [
            "webhook.create",
            "webhook.create",
            "webhook.disable",
            "webhook.delete"
        ]
    );
}

/// An agent whose last report is older than the threshold is marked offline once
/// (`agent.offline`); its next report marks it online (`agent.online`).
pub async fn agents_are_marked_offline_once_and_online_again(store: &dyn Store) {
    let s = scene(store).await;
    let report = |t: i64| AgentStatusRecord {
        vm: s.vm1.clone(),
        report: "{}".into(),
        last_seen: at(t),
    };
    store
        .put_agent_status(report(10), quiet_agent())
        .await
        .unwrap();
    assert!(
        store
            .mark_agents_offline(at(10), at(20))
            .await
            .unwrap()
            .is_empty(),
        "seen at the cutoff"
    );
    assert_eq!(
        store.mark_agents_offline(at(11), at(100)).await.unwrap(),
        vec![s.vm1.clone()]
    );
    assert!(
        store
            .mark_agents_offline(at(50), at(200))
            .await
            .unwrap()
            .is_empty(),
        "once"
    );
    store
        .put_agent_status(report(300), quiet_agent())
        .await
        .unwrap();
    assert!(
        store
            .mark_agents_offline(at(250), at(310))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .mark_agents_offline(at(400), at(410))
            .await
            .unwrap()
            .len(),
        1
    );
    let actions = audit_actions(store, "agent.o", 10).await;
    assert_eq!(actions, ["agent.offline", "agent.online", "agent.offline"]);
}

/// Issue 9.6: a policy update ends exactly the live grants its new rules no longer
/// allow. Narrowing a port's sources ends the grants outside them and keeps the others;
/// widening the protocol (TCP to *) keeps a TCP grant; changing it (TCP to UDP) ends it.
pub async fn put_policy_update_ends_only_the_grants_it_no_longer_allows(store: &dyn Store) {
    let s = scene(store).await;
    for (n, src) in [(1, "10.0.0.9"), (2, "192.168.7.7")] {
        initiate_ok(
            store,
            args(
                &s.key,
                rid(n),
                vec![(&s.vm1, vec![want(22, Some(src), "PT1H")])],
            ),
            at(0),
        )
        .await;
    }
    initiate_ok(
        store,
        args(
            &s.key,
            rid(3),
            vec![(&s.vm1, vec![want(3389, None, "PT1H")])],
        ),
        at(0),
    )
    .await;
    let pc = RevokeReason::PolicyChanged;
    let narrowed = |port22: PortRuleInput, port3389: PortRuleInput| {
        spec_with(
            &s.key,
            vec![
                (&s.vm1, vec![port22, port3389]),
                (&s.vm2, vec![rule(22, "TCP", "PT3H")]),
            ],
        )
    };
    // Port 22 now only from 10.0.0.0/8; 3389 widened from TCP to any protocol.
    let only_ten = PortRuleInput {
        allowed_source_address_prefix: Some(RawPrefix::One("10.0.0.0/8".into())),
        ..rule(22, "TCP", "PT3H")
    };
    let out = put(
        store,
        &s.key,
        narrowed(only_ten.clone(), rule(3389, "*", "PT3H")),
        at(10),
    )
    .await;
    assert_eq!(
        out.revoked.iter().map(|r| r.request).collect::<Vec<_>>(),
        vec![rid(2)],
        "only the grant from outside the new sources ends"
    );
    assert_eq!(
        status_of(store, rid(2), &s.vm1, 22).await,
        PortStatus::Revoked(pc)
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Initiated
    );
    assert_eq!(
        status_of(store, rid(3), &s.vm1, 3389).await,
        PortStatus::Initiated
    );
    // 3389 becomes UDP only: the TCP grant is no longer allowed.
    let out = put(
        store,
        &s.key,
        narrowed(only_ten, rule(3389, "UDP", "PT3H")),
        at(20),
    )
    .await;
    assert_eq!(
        out.revoked.iter().map(|r| r.request).collect::<Vec<_>>(),
        vec![rid(3)]
    );
    assert_eq!(
        status_of(store, rid(1), &s.vm1, 22).await,
        PortStatus::Initiated
    );
    verified(store).await;
}

/// Following each page's last request as the next page's cursor walks every request
/// exactly once, newest first, ties in start time included.
pub async fn list_requests_pages_newest_first(store: &dyn Store) {
    let s = scene(store).await;
    for (i, t) in [(1, 0), (2, 60), (3, 60), (4, 60), (5, 120)] {
        initiate_ok(
            store,
            args(&s.key, rid(i), vec![(&s.vm1, vec![want(22, None, "PT1H")])]),
            at(t),
        )
        .await;
    }
    let all = store
        .list_requests(&RequestFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 5);
    for limit in [1, 2, 3] {
        let mut walked = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .list_requests(&RequestFilter {
                    after: after.clone(),
                    limit,
                    ..Default::default()
                })
                .await
                .unwrap();
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            after = Some(Cursor {
                at: last.start,
                id: last.id.to_string(),
            });
            walked.extend(page.iter().map(|r| r.id));
        }
        assert_eq!(
            walked,
            all.iter().map(|r| r.id).collect::<Vec<_>>(),
            "pages of {limit}"
        );
    }
    // A filter and a cursor together.
    let page = store
        .list_requests(&RequestFilter {
            vm: Some(s.vm1.clone()),
            after: Some(Cursor {
                at: all[1].start,
                id: all[1].id.to_string(),
            }),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|r| r.id).collect::<Vec<_>>(),
        all[2..].iter().map(|r| r.id).collect::<Vec<_>>()
    );
}

/// Walks a list ordered by creation a page at a time.
async fn walk<T, F, Fut>(limit: usize, key: impl Fn(&T) -> Cursor, mut fetch: F) -> Vec<T>
where
    F: FnMut(Paging) -> Fut,
    Fut: std::future::Future<Output = Vec<T>>,
{
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = fetch(Paging { after, limit }).await;
        assert!(page.len() <= limit, "a page holds at most its limit");
        let Some(last) = page.last() else { break };
        after = Some(key(last));
        out.extend(page);
    }
    out
}

/// Tokens, role assignments, enrollment tokens and exclusions page oldest first
/// (ties in creation time broken by id), each item exactly once.
pub async fn lists_page_in_creation_order(store: &dyn Store) {
    install(store).await;
    let times = [100, 200, 200, 200, 300];
    for (i, t) in times.iter().enumerate() {
        let id = format!("jg_page{i}");
        store
            .create_token(token(&id, "pager", at(*t)), ctx(at(*t)))
            .await
            .unwrap();
        store
            .add_role_assignment(
                RoleAssignmentRecord {
                    id: format!("ra-page-{i}"),
                    assignment: RoleAssignment {
                        principal: "pager".into(),
                        role: Role::Reader,
                        scope: Scope::Subscription(sub()),
                    },
                    created: at(*t),
                },
                ctx(at(*t)),
            )
            .await
            .unwrap();
        let mut e = enroll_token(
            &format!("page{i}"),
            Scope::Subscription(sub()),
            1,
            at(99_999),
        );
        e.created = at(*t);
        store
            .create_enroll_token(e, None, ctx(at(*t)))
            .await
            .unwrap();
        store
            .add_exclusion(
                ExclusionRecord {
                    id: format!("ex-page-{i}"),
                    scope: rg_scope(&format!("rg{i}")),
                    reason: "lab".into(),
                    created: at(*t),
                    created_by: OWNER.into(),
                },
                ctx(at(*t)),
            )
            .await
            .unwrap();
    }
    let tokens = store.list_tokens().await.unwrap();
    let ras = store.role_assignments(Some("pager")).await.unwrap();
    let ets = store.list_enroll_tokens().await.unwrap();
    let exs = store.list_exclusions().await.unwrap();
    assert_eq!(ras.len(), 5);
    assert_eq!(ets.len(), 5);
    assert_eq!(exs.len(), 5);
    for limit in [1, 2, 4, 10] {
        let t = walk(
            limit,
            |t: &TokenRecord| Cursor {
                at: t.created,
                id: t.id.clone(),
            },
            |p| async move { store.tokens_page(&p).await.unwrap() },
        )
        .await;
        assert_eq!(t, tokens, "tokens in pages of {limit}");
        let r = walk(
            limit,
            |r: &RoleAssignmentRecord| Cursor {
                at: r.created,
                id: r.id.clone(),
            },
            |p| async move {
                store
                    .role_assignments_page(Some("pager"), &p)
                    .await
                    .unwrap()
            },
        )
        .await;
        assert_eq!(r, ras, "role assignments in pages of {limit}");
        let e = walk(
            limit,
            |e: &EnrollTokenRecord| Cursor {
                at: e.created,
                id: e.id.clone(),
            },
            |p| async move { store.enroll_tokens_page(&p).await.unwrap() },
        )
        .await;
        assert_eq!(
            e.iter().map(|e| &e.id).collect::<Vec<_>>(),
            ets.iter().map(|e| &e.id).collect::<Vec<_>>(),
            "enrollment tokens in pages of {limit}"
        );
        let x = walk(
            limit,
            |x: &ExclusionRecord| Cursor {
                at: x.created,
                id: x.id.clone(),
            },
            |p| async move { store.exclusions_page(&p).await.unwrap() },
        )
        .await;
        assert_eq!(
            x.iter().map(|x| &x.id).collect::<Vec<_>>(),
            exs.iter().map(|x| &x.id).collect::<Vec<_>>(),
            "exclusions in pages of {limit}"
        );
    }
    // Oldest first, ties by id.
    let created: Vec<(Timestamp, String)> =
        tokens.iter().map(|t| (t.created, t.id.clone())).collect();
    let mut sorted = created.clone();
    sorted.sort();
    assert_eq!(created, sorted);
}

// ---- recommendations ------------------------------------------------------------------

/// An agent reporting nftables and these TCP ports listening on every address.
fn agent_facts(listening: &[u16]) -> AgentFacts {
    AgentFacts {
        last_seen: t0(),
        nft_version: Some("nftables v1.0.6".into()),
        error: None,
        listening: listening
            .iter()
            .map(|p| Listening {
                protocol: Protocol::Tcp,
                addr: ip("0.0.0.0"),
                port: *p,
                process: Some(format!("daemon-{p}")),
            })
            .collect(),
        inventory_errors: Vec::new(),
        drift: None,
    }
}

/// An agent with nothing listening.
fn quiet_agent() -> AgentFacts {
    agent_facts(&[])
}

/// The facts every agent last reported, by VM key, as the tests sent them: the
/// from-scratch side of the comparison.
type Reported = std::collections::HashMap<String, AgentFacts>;

/// `vm`'s agent reports `facts` at `now`.
async fn report(
    store: &dyn Store,
    reported: &mut Reported,
    vm: &VmId,
    facts: AgentFacts,
    now: Timestamp,
) {
    store
        .put_agent_status(
            AgentStatusRecord {
                vm: vm.clone(),
                report: "{}".into(),
                last_seen: now,
            },
            facts.clone(),
        )
        .await
        .unwrap();
    reported.insert(
        vm.key(),
        AgentFacts {
            last_seen: now,
            ..facts
        },
    );
}

/// Every registered VM's recommendation at `now`, classified from scratch: the facts
/// its agent last reported, and what the store gives back about its policy ports, user
/// rules and exclusions, through `classify` with the default configuration.
async fn classified(store: &dyn Store, reported: &Reported, now: Timestamp) -> Vec<VmVerdict> {
    let exclusions = store.list_exclusions().await.unwrap();
    let mut vms = all_vms(store, sub(), None).await;
    vms.sort_by_key(|v| v.id.key());
    let mut out = Vec::new();
    for v in vms {
        let facts = VmFacts {
            agent: reported.get(&v.id.key()).cloned(),
            excluded: exclusions
                .iter()
                .find(|e| e.scope.contains(&v.id.scope()))
                .map(|e| e.reason.clone()),
            protected: store
                .vm_policy(&v.id)
                .await
                .unwrap()
                .map(|p| p.vm.ports.iter().map(|r| (r.number, r.protocol)).collect())
                .unwrap_or_default(),
            user_rules: store.nsg_rules(&v.id).await.unwrap(),
        };
        let protected = store.vm_policy(&v.id).await.unwrap().is_some();
        out.push(VmVerdict {
            recommendation: classify(&facts, &RecommendConfig::default(), now),
            vm: v.id,
            protected,
        });
    }
    out
}

async fn stored_verdicts(store: &dyn Store, page: VerdictPage, now: Timestamp) -> Vec<VmVerdict> {
    store.recommendations(sub(), &page, now).await.unwrap()
}

fn all_of(scope: VerdictScope) -> VerdictPage {
    VerdictPage {
        scope,
        limit: 100_000,
        ..Default::default()
    }
}

fn count(verdicts: &[VmVerdict]) -> VerdictCounts {
    let mut c = VerdictCounts::default();
    for v in verdicts {
        c.add(v.recommendation.verdict, 1);
    }
    c
}

/// The actions of the audit events whose action starts with `prefix`, oldest first
/// (at most `limit`).
async fn audit_actions(store: &dyn Store, prefix: &str, limit: usize) -> Vec<String> {
    store
        .query_audit(&AuditQuery {
            action: Some(prefix.into()),
            limit,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry.action)
        .collect()
}

/// The stored verdicts at `now` are what `classify` computes from scratch: every VM's
/// (verdict, reason, ports), the counts, and each verdict's own list. Returns them.
async fn check_verdicts(
    store: &dyn Store,
    reported: &Reported,
    now: Timestamp,
    after: &str,
) -> Vec<VmVerdict> {
    let want = classified(store, reported, now).await;
    let got = stored_verdicts(store, all_of(VerdictScope::default()), now).await;
    assert_eq!(
        got, want,
        "after {after}: stored verdicts differ from classify"
    );
    assert_eq!(
        store
            .verdict_counts(sub(), &VerdictScope::default(), now)
            .await
            .unwrap(),
        count(&want),
        "after {after}: counts"
    );
    for v in [Verdict::Healthy, Verdict::Unhealthy, Verdict::NotApplicable] {
        let only = stored_verdicts(
            store,
            VerdictPage {
                verdict: Some(v),
                ..all_of(VerdictScope::default())
            },
            now,
        )
        .await;
        let expected: Vec<VmVerdict> = want
            .iter()
            .filter(|w| w.recommendation.verdict == v)
            .cloned()
            .collect();
        assert_eq!(only, expected, "after {after}: the {v:?} list");
    }
    // The dashboard's tabs: each one's list and count, and the search within one.
    let mut counts = TabCounts::default();
    for w in &want {
        match JitTab::of(w.protected, w.recommendation.verdict) {
            JitTab::Configured => counts.configured += 1,
            JitTab::NotConfigured => counts.not_configured += 1,
            JitTab::Unsupported => counts.unsupported += 1,
        }
        if w.recommendation.reason.starts_with("the agent is offline") {
            counts.agents_offline += 1;
        }
        if w.recommendation.reason.starts_with("enforcement drift") {
            counts.drift += 1;
        }
    }
    assert_eq!(
        store
            .tab_counts(sub(), &VerdictScope::default(), now)
            .await
            .unwrap(),
        counts,
        "after {after}: the tabs' counts"
    );
    for tab in [
        JitTab::Configured,
        JitTab::NotConfigured,
        JitTab::Unsupported,
    ] {
        let only = stored_verdicts(
            store,
            VerdictPage {
                tab: Some(tab),
                ..all_of(VerdictScope::default())
            },
            now,
        )
        .await;
        let expected: Vec<VmVerdict> = want
            .iter()
            .filter(|w| JitTab::of(w.protected, w.recommendation.verdict) == tab)
            .cloned()
            .collect();
        assert_eq!(only, expected, "after {after}: the {tab:?} tab");
    }
    if let Some(first) = want.first() {
        let name = first.vm.name.to_string().to_ascii_uppercase();
        let found = stored_verdicts(
            store,
            VerdictPage {
                search: Some(name.clone()),
                ..all_of(VerdictScope::default())
            },
            now,
        )
        .await;
        assert!(
            found.iter().any(|f| f.vm == first.vm),
            "after {after}: searching {name} finds {}",
            first.vm
        );
        let needle = name.to_ascii_lowercase();
        assert!(
            found.iter().all(|f| f.vm.name.key().contains(&needle)
                || f.vm.resource_group.key().contains(&needle)),
            "after {after}: the search is a filter"
        );
        let none = stored_verdicts(
            store,
            VerdictPage {
                search: Some("%_no such vm_%".into()),
                ..all_of(VerdictScope::default())
            },
            now,
        )
        .await;
        assert!(none.is_empty(), "after {after}: % and _ are literal");
    }
    want
}

fn verdict_of(verdicts: &[VmVerdict], vm: &VmId) -> (Verdict, String) {
    let v = verdicts
        .iter()
        .find(|v| v.vm == *vm)
        .unwrap_or_else(|| panic!("{vm} has no verdict"));
    (v.recommendation.verdict, v.recommendation.reason.clone())
}

/// Issue 10: a VM's stored verdict follows its agent's reports (listening ports,
/// nftables missing, an enforcement error, drift, unreadable sockets), including a
/// heartbeat that repeats the previous report (it keeps the agent online). Status
/// reports stay unaudited.
pub async fn verdicts_follow_agent_reports(store: &dyn Store) {
    install(store).await;
    let (a, b) = (vm("rg1", "a"), vm("rg1", "b"));
    register(store, &a, t0()).await;
    register(store, &b, t0()).await;
    let mut reported = Reported::new();
    let v = check_verdicts(store, &reported, at(1), "registering").await;
    assert!(verdict_of(&v, &a).1.contains("no agent"), "{v:?}");
    let n0 = audit_count(store).await;

    report(store, &mut reported, &a, agent_facts(&[22, 8080]), at(10)).await;
    let v = check_verdicts(store, &reported, at(20), "a report with SSH listening").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Unhealthy);
    // The same report again, a heartbeat: 50 s after it the agent is online, 70 s after
    // the first one.
    report(store, &mut reported, &a, agent_facts(&[22, 8080]), at(30)).await;
    let v = check_verdicts(store, &reported, at(80), "a heartbeat").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Unhealthy);

    let mut loopback = agent_facts(&[22, 3389]);
    loopback.listening[0].addr = ip("127.0.0.1");
    loopback.listening[1].addr = ip("::");
    let facts = vec![
        ("nothing listening", quiet_agent()),
        (
            "nftables missing",
            AgentFacts {
                nft_version: None,
                ..agent_facts(&[22])
            },
        ),
        (
            "an enforcement error",
            AgentFacts {
                error: Some("nft -f failed: Operation not permitted".into()),
                ..quiet_agent()
            },
        ),
        (
            "drift",
            AgentFacts {
                drift: Some("rule removed: JIT-Deny-default-22".into()),
                ..quiet_agent()
            },
        ),
        (
            "unreadable sockets",
            AgentFacts {
                inventory_errors: vec!["/proc/net/tcp6 line 2: not a socket line: 'x'".into()],
                ..quiet_agent()
            },
        ),
        (
            "unreadable sockets and SSH",
            AgentFacts {
                inventory_errors: vec!["/proc/net/tcp6 line 2: not a socket line: 'x'".into()],
                ..agent_facts(&[22])
            },
        ),
        ("SSH on loopback, RDP on every IPv6 address", loopback),
        (
            "a management port on a UDP socket",
            AgentFacts {
                listening: vec![Listening {
                    protocol: Protocol::Udp,
                    addr: ip("0.0.0.0"),
                    port: 22,
                    process: None,
                }],
                ..quiet_agent()
            },
        ),
    ];
    let mut now = 100;
    let mut seen = std::collections::HashSet::new();
    for (what, f) in facts {
        report(store, &mut reported, &a, f, at(now)).await;
        let v = check_verdicts(store, &reported, at(now + 1), what).await;
        seen.insert(verdict_of(&v, &a).0);
        now += 10;
    }
    assert_eq!(seen.len(), 3, "the reports cover every verdict");
    // Another casing of the VM's id is the same VM.
    report(
        store,
        &mut reported,
        &shout(&a),
        agent_facts(&[5985]),
        at(now),
    )
    .await;
    reported.remove(&a.key());
    reported.insert(
        a.key(),
        AgentFacts {
            last_seen: at(now),
            ..agent_facts(&[5985])
        },
    );
    let v = check_verdicts(store, &reported, at(now + 1), "a report in another casing").await;
    assert!(verdict_of(&v, &a).1.contains("5985"), "{v:?}");
    assert_eq!(verdict_of(&v, &b).0, Verdict::NotApplicable);
    assert_eq!(
        audit_count(store).await,
        n0,
        "status reports are not audited"
    );
}

/// Issue 10: writing, changing and deleting a policy changes its VMs' protected ports,
/// and so their verdicts, in the same transaction; a refused policy write changes no
/// verdict.
pub async fn verdicts_follow_policies(store: &dyn Store) {
    install(store).await;
    let (a, b, c) = (vm("rg1", "a"), vm("rg1", "b"), vm("rg2", "c"));
    let mut reported = Reported::new();
    for v in [&a, &b, &c] {
        register(store, v, t0()).await;
        report(store, &mut reported, v, agent_facts(&[22, 3389]), at(1)).await;
    }
    let v = check_verdicts(store, &reported, at(2), "reports").await;
    assert_eq!(count(&v).unhealthy, 3);

    let k = pkey("rg1", "westeurope", "default");
    put(store, &k, spec(&k, &[(&a, &[22])]), at(3)).await;
    let v = check_verdicts(store, &reported, at(4), "a policy protecting SSH on a").await;
    assert!(verdict_of(&v, &a).1.contains("3389") && !verdict_of(&v, &a).1.contains("22 "));
    put(
        store,
        &k,
        spec(&k, &[(&a, &[22, 3389]), (&b, &[22])]),
        at(5),
    )
    .await;
    let v = check_verdicts(
        store,
        &reported,
        at(6),
        "the policy covering a and part of b",
    )
    .await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Healthy);
    assert_eq!(verdict_of(&v, &b).0, Verdict::Unhealthy);
    // A protocol that does not cover TCP protects nothing.
    put(
        store,
        &k,
        spec_with(
            &k,
            vec![(&b, vec![rule(22, "UDP", "PT1H"), rule(3389, "*", "PT1H")])],
        ),
        at(7),
    )
    .await;
    let v = check_verdicts(
        store,
        &reported,
        at(8),
        "a left the policy, b's SSH rule is UDP",
    )
    .await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Unhealthy);
    assert!(verdict_of(&v, &b).1.contains("22"));

    let k2 = pkey("rg2", "westeurope", "default");
    put(store, &k2, spec(&k2, &[(&c, &[22, 3389])]), at(9)).await;
    let before = check_verdicts(store, &reported, at(10), "c's own policy").await;
    assert_eq!(verdict_of(&before, &c).0, Verdict::Healthy);
    // Refused: b is in another policy.
    let k3 = pkey("rg1", "westeurope", "other");
    let r = store
        .put_policy(
            k3.clone(),
            spec(&k3, &[(&a, &[22, 3389]), (&b, &[22, 3389])]),
            ctx(at(11)),
        )
        .await;
    assert!(
        matches!(r, Err(OpError::Refused(PolicyError::VmInOtherPolicy(_)))),
        "{r:?}"
    );
    assert_eq!(
        stored_verdicts(store, all_of(VerdictScope::default()), at(10)).await,
        before,
        "a refused policy write changed a verdict"
    );

    store.delete_policy(&k2, ctx(at(12))).await.unwrap();
    let v = check_verdicts(store, &reported, at(13), "deleting c's policy").await;
    assert_eq!(verdict_of(&v, &c).0, Verdict::Unhealthy);
    store.delete_policy(&k, ctx(at(14))).await.unwrap();
    let v = check_verdicts(store, &reported, at(15), "deleting the last policy").await;
    assert_eq!(count(&v).unhealthy, 3);
}

/// Issue 10: a user NSG rule denying everyone a port makes it unexposed; allowing only
/// some sources does not; deleting the rule exposes it again.
pub async fn verdicts_follow_nsg_rules(store: &dyn Store) {
    install(store).await;
    let (a, b) = (vm("rg1", "a"), vm("rg1", "b"));
    let mut reported = Reported::new();
    for v in [&a, &b] {
        register(store, v, t0()).await;
        report(store, &mut reported, v, agent_facts(&[22]), at(1)).await;
    }
    store
        .put_nsg_rule(
            &a,
            nsg_rule("corp-ssh", 200, Access::Allow, &["22"], &["10.0.0.0/8"]),
            ctx(at(2)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(3), "an allow rule").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Unhealthy);
    store
        .put_nsg_rule(
            &shout(&a),
            nsg_rule("no-ssh", 300, Access::Deny, &["20-23"], &["*"]),
            ctx(at(4)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(5), "a deny rule for everyone").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Healthy);
    assert_eq!(verdict_of(&v, &b).0, Verdict::Unhealthy, "rules are per VM");
    // Replaced by a rule on another port.
    store
        .put_nsg_rule(
            &a,
            nsg_rule("no-ssh", 300, Access::Deny, &["3389"], &["*"]),
            ctx(at(6)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(7), "replacing the deny rule").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Unhealthy);
    store
        .put_nsg_rule(
            &a,
            nsg_rule("no-ssh", 300, Access::Deny, &["22"], &["*"]),
            ctx(at(8)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(9), "denying SSH again").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Healthy);
    // Refused (priority taken): nothing changes.
    let r = store
        .put_nsg_rule(
            &a,
            nsg_rule("other", 300, Access::Allow, &["22"], &["*"]),
            ctx(at(10)),
        )
        .await;
    assert!(r.is_err());
    check_verdicts(store, &reported, at(11), "a refused rule").await;
    assert!(
        store
            .delete_nsg_rule(&a, "no-ssh", ctx(at(12)))
            .await
            .unwrap()
    );
    let v = check_verdicts(store, &reported, at(13), "deleting the deny rule").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Unhealthy);
}

/// Issue 10: an exclusion makes every VM of its scope NotApplicable with its reason (the
/// first exclusion, in the order they are listed, when several cover a VM), including
/// VMs registered later; removing it gives them back their own verdicts.
pub async fn verdicts_follow_exclusions(store: &dyn Store) {
    install(store).await;
    let (a, b, c) = (vm("rg1", "a"), vm("rg1", "b"), vm("rg2", "c"));
    let mut reported = Reported::new();
    for v in [&a, &b, &c] {
        register(store, v, t0()).await;
        report(store, &mut reported, v, agent_facts(&[22]), at(1)).await;
    }
    let exclusion = |id: &str, scope: Scope, reason: &str, created: i64| ExclusionRecord {
        id: id.into(),
        scope,
        reason: reason.into(),
        created: at(created),
        created_by: OWNER.into(),
    };
    store
        .add_exclusion(
            exclusion("e-rg", rg_scope("RG1"), "lab machines", 10),
            ctx(at(10)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(11), "excluding rg1").await;
    assert!(verdict_of(&v, &a).1.ends_with("lab machines"));
    assert_eq!(verdict_of(&v, &c).0, Verdict::Unhealthy);
    // Listed first (created earlier), so its reason wins where both apply.
    store
        .add_exclusion(
            exclusion("e-sub", Scope::Subscription(sub()), "whole tenant", 5),
            ctx(at(12)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(13), "excluding the subscription").await;
    assert!(verdict_of(&v, &a).1.ends_with("whole tenant"));
    assert_eq!(count(&v).not_applicable, 3);
    store
        .add_exclusion(
            exclusion("e-vm", Scope::Vm(shout(&c)), "being rebuilt", 14),
            ctx(at(14)),
        )
        .await
        .unwrap();
    check_verdicts(store, &reported, at(15), "excluding c").await;
    assert!(store.remove_exclusion("e-sub", ctx(at(16))).await.unwrap());
    let v = check_verdicts(
        store,
        &reported,
        at(17),
        "removing the subscription's exclusion",
    )
    .await;
    assert!(verdict_of(&v, &b).1.ends_with("lab machines"));
    assert!(verdict_of(&v, &c).1.ends_with("being rebuilt"));
    // A VM registered into an excluded scope is excluded from the start.
    let d = vm("rg1", "d");
    register(store, &d, at(18)).await;
    let v = check_verdicts(store, &reported, at(19), "registering into rg1").await;
    assert!(verdict_of(&v, &d).1.ends_with("lab machines"));
    assert!(store.remove_exclusion("e-rg", ctx(at(20))).await.unwrap());
    assert!(store.remove_exclusion("e-vm", ctx(at(21))).await.unwrap());
    assert!(!store.remove_exclusion("e-vm", ctx(at(22))).await.unwrap());
    let v = check_verdicts(store, &reported, at(23), "removing every exclusion").await;
    assert_eq!(count(&v).unhealthy, 3);
    assert!(verdict_of(&v, &d).1.contains("no agent"));
}

/// Issue 10: a VM has a verdict from its registration (by an admin or by its agent's
/// enrollment) until it is deleted; a deleted VM is in no list and no count, even when
/// its agent still reports; registered again, its agent's last report counts.
pub async fn verdicts_follow_vm_register_and_delete(store: &dyn Store) {
    install(store).await;
    let (a, b) = (vm("rg1", "a"), vm("rg1", "b"));
    let mut reported = Reported::new();
    register(store, &a, t0()).await;
    store
        .create_enroll_token(
            enroll_token("et1", rg_scope("rg1"), 5, at(3600)),
            None,
            ctx(at(1)),
        )
        .await
        .unwrap();
    store
        .enroll(
            enroll_args("et1", &b, "jg_b", at(2)),
            enroll_ctx("et1", at(2)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(3), "registering and enrolling").await;
    assert_eq!(v.len(), 2);
    report(store, &mut reported, &a, agent_facts(&[22]), at(4)).await;
    report(store, &mut reported, &b, quiet_agent(), at(4)).await;
    check_verdicts(store, &reported, at(5), "reports").await;

    assert!(store.delete_vm(&shout(&a), ctx(at(6))).await.unwrap());
    let v = check_verdicts(store, &reported, at(7), "deleting a").await;
    assert_eq!(v.len(), 1);
    assert_eq!(
        store
            .verdict_counts(sub(), &VerdictScope::default(), at(7))
            .await
            .unwrap(),
        VerdictCounts {
            healthy: 1,
            ..Default::default()
        }
    );
    // Its agent still reports: the VM stays deleted.
    report(store, &mut reported, &a, agent_facts(&[22, 3389]), at(8)).await;
    let v = check_verdicts(store, &reported, at(9), "a deleted VM's agent reporting").await;
    assert_eq!(v.len(), 1);
    register(store, &a, at(10)).await;
    let v = check_verdicts(store, &reported, at(11), "registering a again").await;
    assert!(verdict_of(&v, &a).1.contains("3389"), "{v:?}");
}

/// Issue 10: whether an agent is offline depends on the time of the read, not on a
/// write: at exactly `offline_after` (60 s) since its last report it is online, a
/// nanosecond later it is offline, in the lists, the counts and each verdict's list.
pub async fn verdicts_settle_the_offline_threshold(store: &dyn Store) {
    install(store).await;
    let (a, b) = (vm("rg1", "a"), vm("rg1", "b"));
    let mut reported = Reported::new();
    register(store, &a, t0()).await;
    register(store, &b, t0()).await;
    report(store, &mut reported, &a, agent_facts(&[22]), at(100)).await;
    report(store, &mut reported, &b, quiet_agent(), at(130)).await;
    let edge = at(160);
    let v = check_verdicts(store, &reported, edge, "60 s of silence").await;
    assert_eq!(verdict_of(&v, &a).0, Verdict::Unhealthy);
    let past = edge.checked_add(SignedDuration::from_nanos(1)).unwrap();
    let v = check_verdicts(store, &reported, past, "60 s and 1 ns of silence").await;
    let (verdict, why) = verdict_of(&v, &a);
    assert_eq!(verdict, Verdict::NotApplicable);
    assert!(why.contains("offline"), "{why}");
    assert_eq!(verdict_of(&v, &b).0, Verdict::Healthy);
    let v = check_verdicts(store, &reported, at(200), "both silent").await;
    assert_eq!(count(&v).not_applicable, 2);
    // A new report brings it back; an exclusion's reason comes before silence.
    report(store, &mut reported, &a, agent_facts(&[22]), at(200)).await;
    check_verdicts(store, &reported, at(201), "a new report").await;
    store
        .add_exclusion(
            ExclusionRecord {
                id: "e1".into(),
                scope: Scope::Vm(b.clone()),
                reason: "retired".into(),
                created: at(202),
                created_by: OWNER.into(),
            },
            ctx(at(202)),
        )
        .await
        .unwrap();
    let v = check_verdicts(store, &reported, at(1000), "an excluded silent agent").await;
    assert!(verdict_of(&v, &b).1.ends_with("retired"));
    // The clock's far ends.
    check_verdicts(store, &reported, Timestamp::MIN, "the earliest time").await;
    check_verdicts(store, &reported, Timestamp::MAX, "the latest time").await;
}

/// Issue 10: recommendations are read a page at a time in key order, filtered by
/// resource group and by the caller's readable scopes (subscription, resource group,
/// VM; another subscription's scopes read nothing) in the store; the counts cover
/// exactly what the pages list.
pub async fn verdict_reads_page_and_filter_by_scope(store: &dyn Store) {
    install(store).await;
    let mut reported = Reported::new();
    let mut ids = Vec::new();
    for (i, (group, name)) in [
        ("rg1", "a"),
        ("rg1", "b"),
        ("RG2", "c"),
        ("rg2", "d"),
        ("rg3", "e"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = vm(group, name);
        register(store, &id, t0()).await;
        if i % 2 == 0 {
            report(store, &mut reported, &id, agent_facts(&[22]), at(1)).await;
        }
        ids.push(id);
    }
    let now = at(2);
    let all = check_verdicts(store, &reported, now, "setup").await;
    let within = |keep: &dyn Fn(&VmId) -> bool| -> Vec<VmVerdict> {
        all.iter().filter(|v| keep(&v.vm)).cloned().collect()
    };
    let cases: Vec<(&str, VerdictScope, Vec<VmVerdict>)> = vec![
        (
            "the subscription",
            VerdictScope {
                resource_group: None,
                readable: Some(vec![Scope::Subscription(sub())]),
            },
            all.clone(),
        ),
        (
            "a resource group (any casing)",
            VerdictScope {
                resource_group: None,
                readable: Some(vec![rg_scope("rg2")]),
            },
            within(&|v| v.resource_group == rg("rg2")),
        ),
        (
            "a VM and a resource group",
            VerdictScope {
                resource_group: None,
                readable: Some(vec![Scope::Vm(shout(&ids[0])), rg_scope("rg3")]),
            },
            within(&|v| *v == ids[0] || v.resource_group == rg("rg3")),
        ),
        (
            "another subscription's scopes",
            VerdictScope {
                resource_group: None,
                readable: Some(vec![
                    Scope::Subscription(other_sub()),
                    Scope::ResourceGroup(other_sub(), rg("rg1")),
                    Scope::Vm(vm_in(other_sub(), "rg1", "a")),
                ]),
            },
            Vec::new(),
        ),
        (
            "no scope",
            VerdictScope {
                resource_group: None,
                readable: Some(Vec::new()),
            },
            Vec::new(),
        ),
        (
            "one resource group of the readable ones",
            VerdictScope {
                resource_group: Some(rg("RG1")),
                readable: Some(vec![Scope::Vm(ids[1].clone()), rg_scope("rg2")]),
            },
            vec![all[1].clone()],
        ),
        (
            "one resource group, everything readable",
            VerdictScope {
                resource_group: Some(rg("rg2")),
                readable: None,
            },
            within(&|v| v.resource_group == rg("rg2")),
        ),
    ];
    for (what, scope, want) in cases {
        assert_eq!(
            stored_verdicts(store, all_of(scope.clone()), now).await,
            want,
            "{what}"
        );
        assert_eq!(
            store.verdict_counts(sub(), &scope, now).await.unwrap(),
            count(&want),
            "{what}: counts"
        );
        // The same in pages of two, each after the previous page's last key.
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = stored_verdicts(
                store,
                VerdictPage {
                    scope: scope.clone(),
                    verdict: None,
                    after: after.clone(),
                    limit: 2,
                    ..Default::default()
                },
                now,
            )
            .await;
            assert!(page.len() <= 2, "{what}: a page of {}", page.len());
            let Some(last) = page.last() else { break };
            after = Some(last.vm.key());
            paged.extend(page);
        }
        assert_eq!(paged, want, "{what}: pages");
    }
    // Pages of one verdict.
    let page = stored_verdicts(
        store,
        VerdictPage {
            scope: VerdictScope::default(),
            verdict: Some(Verdict::NotApplicable),
            after: Some(ids[0].key()),
            limit: 1,
            ..Default::default()
        },
        now,
    )
    .await;
    assert_eq!(page, vec![all[1].clone()]);
    assert_eq!(
        store
            .recommendations(other_sub(), &all_of(VerdictScope::default()), now)
            .await
            .unwrap(),
        Vec::new(),
        "a subscription without VMs"
    );
}

// ---- a database shared by several stores -------------------------------------------
//
// For a backend several controllers share (PostgreSQL): `a` and `b` are two stores on
// the same, empty database, as two controllers would open it.

/// Initiates from two stores at once land in one audit chain, contiguous and
/// verifying, and each store reads every request either made.
pub async fn shared_writers_keep_one_chain(a: &dyn Store, b: &dyn Store) {
    let s = scene(a).await;
    let before = audit_count(a).await;
    const EACH: u32 = 40;
    tokio::join!(
        burst(a, &s.key, &s.vm1, 1_000, EACH),
        burst(b, &s.key, &s.vm1, 2_000, EACH)
    );
    let events = events_after(a, before).await;
    assert_eq!(events.len(), 2 * EACH as usize, "one event per initiate");
    let want_seqs: Vec<u64> = (before + 1..=before + 2 * u64::from(EACH)).collect();
    assert_eq!(seqs(&events), want_seqs, "the chain has no gap");
    assert_eq!(verified(a).await.count, verified(b).await.count);
    for store in [a, b] {
        let all = store
            .list_requests(&RequestFilter {
                limit: 1_000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            all.len(),
            2 * EACH as usize,
            "every request, read by either store"
        );
        assert_eq!(
            store.count_live_grants(at(61)).await.unwrap(),
            u64::from(2 * EACH)
        );
    }
}

/// `n` initiates through `writer`, request ids from `first`, each from a source of its
/// own (none supersedes another).
async fn burst(writer: &dyn Store, key: &PolicyKey, vm: &VmId, first: u128, n: u32) {
    for i in 0..n {
        let source = format!("10.{}.{}.{}", first / 1000, i / 200, i % 200 + 1);
        initiate_ok(
            writer,
            args(
                key,
                rid(first + u128::from(i)),
                vec![(vm, vec![want(22, Some(&source), "PT1H")])],
            ),
            at(60),
        )
        .await;
    }
}

/// Two stores expiring at the same moment expire each port once, audited once.
pub async fn shared_expiry_happens_once(a: &dyn Store, b: &dyn Store) {
    let s = scene(a).await;
    for i in 0..30u32 {
        let source = format!("10.9.0.{}", i + 1);
        initiate_ok(
            if i % 2 == 0 { a } else { b },
            args(
                &s.key,
                rid(5_000 + u128::from(i)),
                vec![(&s.vm1, vec![want(22, Some(&source), "PT1H")])],
            ),
            at(0),
        )
        .await;
    }
    let before = audit_count(a).await;
    let (x, y) = tokio::join!(a.expire_due(at(3_600)), b.expire_due(at(3_600)));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(
        x.len() + y.len(),
        30,
        "each port expired by exactly one store"
    );
    let events = events_after(b, before).await;
    assert_eq!(events.len(), 30, "each expiry audited once");
    assert!(events.iter().all(|e| e.entry.action == "request.expire"));
    assert_eq!(a.count_live_grants(at(3_600)).await.unwrap(), 0);
}

/// An initiate retried with the key it was made with (a lost answer) returns the
/// request made then and changes nothing; another requestor's key of the same text,
/// or the same requestor's other key, makes a new request.
pub async fn initiate_retried_with_its_key_is_not_doubled(store: &dyn Store) {
    let s = scene(store).await;
    let keyed = |id: u128, requestor: &str, key: &str| InitiateArgs {
        requestor: requestor.into(),
        assignments: assignment(requestor, Role::JitRequester, Scope::Subscription(sub())),
        idempotency_key: Some(key.into()),
        ..args(
            &s.key,
            rid(id),
            vec![(&s.vm1, vec![want(22, Some("10.7.0.1"), "PT1H")])],
        )
    };
    let first = store
        .initiate(keyed(1, "bob", "k-1"), ctx_as("bob", at(60)))
        .await
        .unwrap();
    let before = snapshot(store).await;
    // The retry has a new id (a new call) but the same key.
    let again = store
        .initiate(keyed(2, "bob", "k-1"), ctx_as("bob", at(61)))
        .await
        .unwrap();
    assert_eq!(
        again, first,
        "the retry answers with the request made first"
    );
    assert_eq!(snapshot(store).await, before, "and changes nothing");
    // Another requestor with the same key text, and another key: new requests.
    let carol = store
        .initiate(keyed(3, "carol", "k-1"), ctx_as("carol", at(62)))
        .await
        .unwrap();
    assert_eq!(carol.id, rid(3));
    let other = store
        .initiate(keyed(4, "bob", "k-2"), ctx_as("bob", at(63)))
        .await
        .unwrap();
    assert_eq!(other.id, rid(4));
    // Past the window the key is forgotten (an expiry pass prunes it).
    let later = at(60 + IDEMPOTENCY_WINDOW.as_secs() as i64 + 1);
    store.expire_due(later).await.unwrap();
    let fresh = store
        .initiate(keyed(5, "bob", "k-1"), ctx_as("bob", later))
        .await
        .unwrap();
    assert_eq!(fresh.id, rid(5));
}
