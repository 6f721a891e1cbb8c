//! Storage for jitgate.
//!
//! [`Store`] is the one interface the controller uses. Every mutating operation is a
//! single transaction that also appends its audit event(s), so state and audit chain
//! never disagree; a method that returns `Ok` has committed durably. Backends live in
//! crates of their own: `jitgate-store-sql` (embedded, the default). Every backend
//! passes the same conformance suite (`conformance`, behind the `conformance` feature:
//! test support, not compiled into the product; `model` adds the lifecycle's
//! reference model).
//!
//! The `rusqlite` feature converts `rusqlite` errors into [`StoreError`] (Rust's orphan
//! rule puts that conversion here); only the SQLite backend turns it on.
//!
//! Decisions are not made here: operations call the pure functions of `jitgate-core`
//! inside their transaction (for example `plan_initiate`), so a decision and the state
//! it was made on cannot drift apart.

pub mod checkpoint;
#[cfg(feature = "conformance")]
pub mod conformance;
mod records;

pub use records::*;

use async_trait::async_trait;
use jitgate_core::Timestamp;
use jitgate_core::audit::{AuditEntry, AuditRecord, VerifyReport};
use jitgate_core::ids::{SubscriptionId, VmId};
use jitgate_core::nsg::NsgRule;
use jitgate_core::policy::{Policy, PolicyKey, PolicySpec};
use jitgate_core::recommend::AgentFacts;
use jitgate_core::request::{AccessRequest, RequestId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is shut down")]
    Closed,
    /// The database cannot be reached now (connection lost, a standby not yet
    /// promoted): retry shortly. A write that failed so may or may not have been
    /// committed; retry it with the same idempotency key.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The write queue is full: the write was not queued and changed nothing; retry
    /// shortly.
    #[error("the write queue is full ({queued} writes waiting); retry shortly")]
    Busy { queued: usize },
}

/// How full a backend's write queue is (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteQueueStats {
    /// Writes waiting now (not counting the group being committed).
    pub depth: usize,
    /// The most that may wait.
    pub capacity: usize,
    /// Writes refused with [`StoreError::Busy`] since the store was opened.
    pub refused: u64,
}

#[cfg(feature = "rusqlite")]
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Either a domain refusal (`E`) or a storage failure.
#[derive(Debug, thiserror::Error)]
pub enum OpError<E> {
    #[error("{0:?}")]
    Refused(E),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- installation ----
    /// Creates the default subscription and the bootstrap Owner (token and role
    /// assignment at the subscription) if the store is empty; otherwise returns what
    /// exists and creates nothing. Idempotent.
    async fn bootstrap(&self, init: Bootstrap, audit: AuditCtx) -> Result<BootstrapOutcome>;
    async fn subscriptions(&self) -> Result<Vec<SubscriptionId>>;

    // ---- VMs ----
    async fn register_vm(
        &self,
        vm: VmRecord,
        audit: AuditCtx,
    ) -> Result<RegisterOutcome, OpError<VmError>>;
    async fn get_vm(&self, id: &VmId) -> Result<Option<VmRecord>>;
    /// One page of VMs in key order, filtered by resource group and/or name in the
    /// store (indexed), after `filter.after`.
    async fn find_vms(
        &self,
        subscription: SubscriptionId,
        filter: &VmFilter,
    ) -> Result<Vec<VmRecord>>;
    /// What a list shows about each of `vms` (policy, live grants at `now`, agent
    /// last seen), in a few batched reads whatever their number; in `vms`' order,
    /// unknown VMs left out.
    async fn vm_summaries(&self, vms: &[VmId], now: Timestamp) -> Result<Vec<VmSummary>>;
    async fn delete_vm(&self, id: &VmId, audit: AuditCtx) -> Result<bool, OpError<VmError>>;

    // ---- gateways ----
    /// Places `vm` behind `gateway` (or moves it), audited as `vm.place`. `place`'s
    /// mapped ports are ignored: in DNAT mode the store allocates one per port of the
    /// VM's policy on the public address (the lowest free of [`MAPPED_PORTS`]), here
    /// and whenever a policy gives the VM a new port, and keeps them while the VM
    /// stays on that address; moving the VM to another public address or mode
    /// allocates afresh. Returns the placement as stored.
    async fn place_vm(
        &self,
        vm: &VmId,
        gateway: &VmId,
        place: jitgate_core::gateway::Placement,
        audit: AuditCtx,
    ) -> Result<VmPlacement, OpError<PlaceError>>;
    /// Takes `vm` from behind its gateway (audited as `vm.unplace`); false when it
    /// was not behind one.
    async fn unplace_vm(&self, vm: &VmId, audit: AuditCtx) -> Result<bool>;
    /// Where `vm` sits behind a gateway, if it does.
    async fn placement(&self, vm: &VmId) -> Result<Option<VmPlacement>>;
    /// The placements of those of `vms` behind a gateway, in one read.
    async fn placements(&self, vms: &[VmId]) -> Result<Vec<(VmId, VmPlacement)>>;
    /// The VMs behind `gateway`, in key order.
    async fn behind(&self, gateway: &VmId) -> Result<Vec<(VmId, VmPlacement)>>;

    // ---- policies ----
    async fn put_policy(
        &self,
        key: PolicyKey,
        spec: PolicySpec,
        audit: AuditCtx,
    ) -> Result<PutPolicyOutcome, OpError<PolicyError>>;
    /// Writes several policies, each as [`Store::put_policy`] would (with its own
    /// `policy.*` event), then appends `summary`, all in one transaction: every write
    /// and the summary commit, or nothing does. The first refused write refuses the
    /// whole call (its field is relative to that policy). Outcomes in `writes`' order.
    async fn apply_policies(
        &self,
        writes: Vec<(PolicyKey, PolicySpec)>,
        summary: AuditNote,
        audit: AuditCtx,
    ) -> Result<Vec<PutPolicyOutcome>, OpError<PolicyError>>;
    async fn get_policy(&self, key: &PolicyKey) -> Result<Option<Policy>>;
    /// Policies in key order, after `after` (exclusive), at most `limit`.
    async fn list_policies(
        &self,
        filter: &PolicyFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Policy>>;
    /// The VM's own entry of the policy protecting it (cheaper than the whole policy).
    async fn vm_policy(&self, vm: &VmId) -> Result<Option<VmPolicy>>;
    /// Deletes the policy and revokes its live grants. `None` when it did not exist.
    async fn delete_policy(
        &self,
        key: &PolicyKey,
        audit: AuditCtx,
    ) -> Result<Option<DeletedPolicy>>;

    // ---- requests ----
    async fn initiate(
        &self,
        args: InitiateArgs,
        audit: AuditCtx,
    ) -> Result<AccessRequest, OpError<InitiateRefusal>>;
    /// The newest `limit` requests of the policy, newest first.
    async fn policy_requests(&self, key: &PolicyKey, limit: usize) -> Result<Vec<AccessRequest>>;
    async fn get_request(&self, id: RequestId) -> Result<Option<AccessRequest>>;
    async fn list_requests(&self, filter: &RequestFilter) -> Result<Vec<AccessRequest>>;
    /// Revokes the request's initiated ports (all, or those on one VM/port).
    async fn revoke_request(
        &self,
        id: RequestId,
        only: Option<PortSelector>,
        audit: AuditCtx,
    ) -> Result<Vec<RevokedPort>, OpError<RevokeError>>;
    /// Marks every initiated port whose end time is at or before `now` as
    /// Revoked/Expired, auditing each. Returns them.
    async fn expire_due(&self, now: Timestamp) -> Result<Vec<RevokedPort>>;
    /// The earliest end time among initiated ports.
    async fn next_expiry(&self) -> Result<Option<Timestamp>>;
    async fn live_grants(&self, vm: &VmId, now: Timestamp) -> Result<Vec<Grant>>;
    /// The VM's grants changed after `after`, a point an earlier call returned, so that
    /// a reader who keeps a VM's grants reads only what changed; with `after` 0, its
    /// grants live at `now`. Every write that changes a grant's row marks it with a
    /// point past every point already committed.
    async fn grant_changes(&self, vm: &VmId, after: u64, now: Timestamp) -> Result<GrantChanges>;
    async fn count_live_grants(&self, now: Timestamp) -> Result<u64>;

    // ---- identity ----
    async fn create_token(&self, token: TokenRecord, audit: AuditCtx) -> Result<()>;
    async fn find_token(&self, id: &str) -> Result<Option<TokenRecord>>;
    /// The token whose secret hashes to `secret_hash` (for bootstrap tokens that are
    /// not of the `jg_<id>.<secret>` form).
    async fn find_token_by_secret_hash(&self, secret_hash: &str) -> Result<Option<TokenRecord>>;
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Tokens oldest first, a page at a time.
    async fn tokens_page(&self, paging: &Paging) -> Result<Vec<TokenRecord>>;
    async fn revoke_token(&self, id: &str, audit: AuditCtx) -> Result<bool>;
    /// Records that the token was used at `now` (a sign-in's idle timeout); not audited.
    async fn touch_token(&self, id: &str, now: Timestamp) -> Result<()>;
    async fn add_role_assignment(&self, ra: RoleAssignmentRecord, audit: AuditCtx) -> Result<()>;
    async fn role_assignments(&self, principal: Option<&str>) -> Result<Vec<RoleAssignmentRecord>>;
    /// Role assignments (of one principal, or all) oldest first, a page at a time.
    async fn role_assignments_page(
        &self,
        principal: Option<&str>,
        paging: &Paging,
    ) -> Result<Vec<RoleAssignmentRecord>>;
    async fn remove_role_assignment(&self, id: &str, audit: AuditCtx) -> Result<bool>;

    // ---- approvals ----
    /// Creates or replaces an approval rule (audited); `Ok(true)` when created.
    async fn put_approval_rule(
        &self,
        rule: jitgate_core::approval::ApprovalRule,
        audit: AuditCtx,
    ) -> Result<bool>;
    async fn approval_rule(
        &self,
        name: &str,
    ) -> Result<Option<jitgate_core::approval::ApprovalRule>>;
    /// Every approval rule, by name.
    async fn approval_rules(&self) -> Result<Vec<jitgate_core::approval::ApprovalRule>>;
    async fn delete_approval_rule(&self, name: &str, audit: AuditCtx) -> Result<bool>;
    /// Records a decision on a pending request and applies what it decides (the last
    /// approval needed activates its pending ports from now; the deny threshold ends
    /// them as denied), each transition audited in the same transaction.
    async fn decide_request(
        &self,
        args: DecideArgs,
        audit: AuditCtx,
    ) -> Result<Decided, OpError<DecideRefusal>>;
    /// An approver (the approve action at every VM, not the requestor) marks a
    /// break-glass request reviewed (audited).
    async fn review_break_glass(
        &self,
        request: RequestId,
        who: &str,
        assignments: Vec<jitgate_core::rbac::RoleAssignment>,
        audit: AuditCtx,
    ) -> Result<AccessRequest, OpError<ReviewRefusal>>;
    /// The requestor withdraws its pending request (its pending ports end as
    /// `Revoked/Cancelled`).
    async fn cancel_request(
        &self,
        request: RequestId,
        who: &str,
        audit: AuditCtx,
    ) -> Result<AccessRequest, OpError<CancelRefusal>>;

    // ---- webhooks ----
    /// Creates or replaces an endpoint (audited, its secret never); `Ok(true)` when
    /// created. A replaced endpoint keeps its secret and is enabled again.
    async fn put_webhook(&self, hook: WebhookRecord, audit: AuditCtx) -> Result<bool>;
    async fn webhook(&self, name: &str) -> Result<Option<WebhookRecord>>;
    async fn webhooks(&self) -> Result<Vec<WebhookRecord>>;
    /// Deletes an endpoint and its undelivered messages (audited).
    async fn delete_webhook(&self, name: &str, audit: AuditCtx) -> Result<bool>;
    /// An endpoint's messages: (delivered, failed, waiting).
    async fn webhook_counts(&self, name: &str) -> Result<(u64, u64, u64)>;
    /// Takes up to `limit` due deliveries for `lease` (another controller takes them
    /// only once the lease is over).
    async fn claim_deliveries(
        &self,
        now: Timestamp,
        lease: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<Delivery>>;
    /// Records an attempt's outcome, if the claim `claimed_until` still holds (a
    /// delivery another controller took over after the lease is left to it).
    async fn finish_delivery(
        &self,
        msg_id: &str,
        claimed_until: Timestamp,
        result: DeliveryResult,
        now: Timestamp,
    ) -> Result<()>;

    // ---- command-line sign-ins under way ----
    /// Stores a sign-in under way, first dropping those expired at `signin.created`.
    /// `Ok(false)` (nothing stored) when `max_open` unexpired ones of its kind (device,
    /// or loopback) exist already, or, for a device sign-in, `max_per_source` from its
    /// address: the device flow starts without a credential, so nobody can grow the
    /// table unbounded, nor take every place.
    async fn start_signin(
        &self,
        signin: SigninRecord,
        max_open: usize,
        max_per_source: usize,
    ) -> Result<bool>;
    /// The unexpired sign-in with that user code.
    async fn signin_by_user_code(
        &self,
        user_code: &str,
        now: Timestamp,
    ) -> Result<Option<SigninRecord>>;
    /// Approves or denies the pending, unexpired sign-in with that user code (the
    /// status carries who), audited as `auth.device.approve` / `auth.device.deny`.
    /// `Ok(false)` when there is no such pending sign-in.
    async fn decide_signin(
        &self,
        user_code: &str,
        decision: SigninStatus,
        audit: AuditCtx,
    ) -> Result<bool>;
    /// The sign-in with that id as it was, taken once: a pending, unexpired one stays
    /// (its `polled` becomes `now`), any other is deleted by this call.
    async fn take_signin(&self, id: &str, now: Timestamp) -> Result<Option<SigninRecord>>;

    // ---- user NSG rules ----
    /// Creates or replaces the VM's user rule of that name. `Ok(true)` when created.
    async fn put_nsg_rule(
        &self,
        vm: &VmId,
        rule: NsgRule,
        audit: AuditCtx,
    ) -> Result<bool, OpError<NsgRuleError>>;
    async fn delete_nsg_rule(&self, vm: &VmId, name: &str, audit: AuditCtx) -> Result<bool>;
    /// The VM's user rules by priority.
    async fn nsg_rules(&self, vm: &VmId) -> Result<Vec<NsgRule>>;

    // ---- agents ----
    /// Creates an enrollment token (audited), with its one-time install code if given,
    /// in one transaction.
    async fn create_enroll_token(
        &self,
        token: EnrollTokenRecord,
        install: Option<InstallCodeRecord>,
        audit: AuditCtx,
    ) -> Result<()>;
    /// Uses an install code once: its record when it exists, has uses left and has not
    /// expired at `audit.now` (one use is then taken, audited), else None.
    async fn take_install_code(
        &self,
        code_hash: &str,
        audit: AuditCtx,
    ) -> Result<Option<InstallCodeRecord>>;
    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>>;
    /// Enrollment tokens oldest first, a page at a time.
    async fn enroll_tokens_page(&self, paging: &Paging) -> Result<Vec<EnrollTokenRecord>>;
    /// Uses one enrollment: registers the VM if needed, revokes its previous agent
    /// credentials, stores the new one with the Agent role on the VM.
    /// Revokes an enrollment token (audited); false if unknown or already revoked.
    async fn revoke_enroll_token(&self, id: &str, audit: AuditCtx) -> Result<bool>;
    async fn enroll(&self, args: EnrollArgs, audit: AuditCtx)
    -> Result<VmId, OpError<EnrollError>>;
    /// Keeps the agent's last report, and `facts`, what recommendations classify from
    /// it (their `last_seen` is `status.last_seen`, whatever `facts.last_seen` says),
    /// updating the VM's verdict in the same transaction.
    async fn put_agent_status(&self, status: AgentStatusRecord, facts: AgentFacts) -> Result<()>;
    /// Marks the agents last seen before `seen_before` offline, each once (audited as
    /// `agent.offline`; its next report audits `agent.online`); returns their VMs.
    async fn mark_agents_offline(
        &self,
        seen_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<VmId>>;
    async fn agent_status(&self, vm: &VmId) -> Result<Option<AgentStatusRecord>>;
    /// Appends blocked-attempt counts (a time series per VM and port).
    async fn record_blocked(&self, points: Vec<BlockedPoint>) -> Result<()>;
    /// Deletes the blocked-attempt points older than `before` (the retention); returns
    /// how many. Like the points themselves, not audited: telemetry, not a change
    /// anyone made.
    async fn prune_blocked(&self, before: Timestamp) -> Result<u64>;
    /// Blocked-attempt counts since `since`, oldest first (one VM, or all).
    async fn blocked_series(
        &self,
        vm: Option<&VmId>,
        since: Timestamp,
    ) -> Result<Vec<BlockedPoint>>;

    // ---- recommendations ----
    /// One page of VMs' recommendations at `now`, in key order: for each VM, what
    /// `core::recommend::classify` gives from its current facts (agent report, policy
    /// ports, user rules, exclusions) with the store's `RecommendConfig`. A backend
    /// keeps each VM's verdict up to date in the transaction of every write that
    /// changes its facts, and decides what depends on `now` (an agent gone silent) at
    /// the read, so no VM is classified here.
    async fn recommendations(
        &self,
        subscription: SubscriptionId,
        page: &VerdictPage,
        now: Timestamp,
    ) -> Result<Vec<VmVerdict>>;
    /// How many VMs of `scope` have each verdict at `now` (one aggregate read).
    async fn verdict_counts(
        &self,
        subscription: SubscriptionId,
        scope: &VerdictScope,
        now: Timestamp,
    ) -> Result<VerdictCounts>;
    /// How many VMs of `scope` are on each dashboard tab at `now`, with the agents
    /// offline and the enforcement drifts among them (one aggregate read).
    async fn tab_counts(
        &self,
        subscription: SubscriptionId,
        scope: &VerdictScope,
        now: Timestamp,
    ) -> Result<TabCounts>;
    async fn add_exclusion(&self, exclusion: ExclusionRecord, audit: AuditCtx) -> Result<()>;
    async fn list_exclusions(&self) -> Result<Vec<ExclusionRecord>>;
    /// Exclusions oldest first, a page at a time.
    async fn exclusions_page(&self, paging: &Paging) -> Result<Vec<ExclusionRecord>>;
    async fn remove_exclusion(&self, id: &str, audit: AuditCtx) -> Result<bool>;

    // ---- audit ----
    /// Appends one event on its own (denied and failed calls).
    async fn append_audit(&self, entry: AuditEntry) -> Result<u64>;
    async fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>>;
    /// Verifies the whole chain, against signed checkpoints when given.
    async fn verify_audit(&self, anchors: Option<AnchorSet>) -> Result<VerifyReport>;
    /// The newest event's sequence number and hash (0 and the genesis hash when empty):
    /// what a checkpoint signs.
    async fn audit_tail(&self) -> Result<(u64, String)>;
    /// The start-up check: the whole chain against the given (newest) checkpoint,
    /// except what precedes the newest `audit.break_accepted` event that the
    /// checkpoint covers (that part was found broken, and the break accepted).
    async fn verify_audit_from(&self, anchor: AnchorSet) -> Result<VerifyReport>;

    // ---- operations ----
    /// The write queue's state, for a backend that has one.
    fn write_queue(&self) -> Option<WriteQueueStats> {
        None
    }

    /// For a database several controllers share: a doorbell rung (the value bumped)
    /// when another controller may have committed a change, and after every lost and
    /// restored connection to it. It carries no data and may be late or lost: the audit
    /// log, which every change extends in the same transaction, is the record a
    /// controller catches up from. `None` when this process is the database's only
    /// writer (the embedded SQLite file, locked by its data directory).
    fn shared_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

#[cfg(feature = "rusqlite")]
impl<E> From<rusqlite::Error> for OpError<E> {
    fn from(e: rusqlite::Error) -> Self {
        OpError::Store(e.into())
    }
}
