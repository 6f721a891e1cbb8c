//! The records the store keeps and the arguments and outcomes of its operations.

use std::net::IpAddr;

use jitgate_core::FieldError;
use jitgate_core::Timestamp;
use jitgate_core::ids::{Location, ResourceGroup, SubscriptionId, VmId};
use jitgate_core::net::{Port, Protocol, SourcePrefix};
use jitgate_core::rbac::RoleAssignment;
use jitgate_core::request::{InitiateInput, RequestId, RevokeReason};

/// Who is changing something, from where, when: the audit event's context.
#[derive(Debug, Clone)]
pub struct AuditCtx {
    pub actor: String,
    pub source: String,
    pub now: Timestamp,
}

/// Signed checkpoints and the key they must be signed with, to verify the audit
/// chain against.
#[derive(Debug, Clone)]
pub struct AnchorSet {
    pub key: jitgate_core::audit::CheckpointPublicKey,
    pub checkpoints: Vec<jitgate_core::audit::Checkpoint>,
}

impl AnchorSet {
    pub fn anchors(&self) -> jitgate_core::audit::Anchors<'_> {
        jitgate_core::audit::Anchors {
            key: &self.key,
            checkpoints: &self.checkpoints,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub subscription: SubscriptionId,
    pub owner_principal: String,
    pub owner_token: TokenRecord,
}

#[derive(Debug, Clone)]
pub struct BootstrapOutcome {
    pub subscription: SubscriptionId,
    /// True when this call created the installation.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub id: VmId,
    pub location: Option<Location>,
    pub created: Timestamp,
    pub created_by: String,
}

/// Which VMs a list reads: one page, in key order (the lower-cased id).
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    pub resource_group: Option<jitgate_core::ids::ResourceGroup>,
    /// Machines of this name in any resource group (an indexed lookup).
    pub name: Option<jitgate_core::ids::VmName>,
    /// Only VMs whose key sorts after this one: the previous page's last.
    pub after: Option<String>,
    pub limit: usize,
}

/// What a VM list shows about each VM, read for a whole page at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSummary {
    pub vm: VmId,
    /// The policy protecting it, with its ports there.
    pub policy: Option<VmPolicy>,
    pub live_grants: u64,
    /// When its agent last reported; `None` when no agent ever enrolled.
    pub agent_last_seen: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    Created,
    AlreadyRegistered,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmError {
    UnknownSubscription(SubscriptionId),
    /// A VM in a policy cannot be deleted; the policy key is given.
    InPolicy(String),
    /// A gateway with machines behind it cannot be deleted; one of them is given.
    GatewayInUse(VmId),
}

/// Where a VM sits behind a gateway: the gateway (a VM whose agent enforces this
/// VM's state) and the placement, with the mapped ports allocated so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlacement {
    pub gateway: VmId,
    pub place: jitgate_core::gateway::Placement,
}

/// A refused `place_vm`, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceError {
    /// The VM or the gateway is not registered (`vm` or `gateway`).
    Unknown(FieldError),
    /// A gateway cannot be behind itself or behind a machine that is itself behind a
    /// gateway, and a machine with machines behind it cannot move behind one.
    Chain(FieldError),
    /// Another machine behind the same gateway has this address.
    AddressTaken(FieldError),
    /// No free mapped port is left on the public address.
    NoMappedPort(FieldError),
}

/// The first and last ports a DNAT gateway hands out as mapped ports.
pub const MAPPED_PORTS: (u16, u16) = (50000, 59999);

/// An audit event a caller composes (its actor, source and time come from the
/// operation's `AuditCtx`): the summary `apply_policies` appends after its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditNote {
    pub action: String,
    pub target: String,
    /// JSON text.
    pub details: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutPolicyOutcome {
    pub created: bool,
    /// The VMs the policy protected before this write (their agents need the news too).
    pub previous_vms: Vec<VmId>,
    /// Live grants revoked because their port left the policy.
    pub revoked: Vec<RevokedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    UnknownSubscription(SubscriptionId),
    /// The VM at this field is not registered.
    UnknownVm(FieldError),
    /// The VM at this field is already protected by another policy.
    VmInOtherPolicy(FieldError),
    /// The VM at this field is behind a DNAT gateway whose public address has no
    /// mapped port left for a new port.
    NoMappedPort(FieldError),
}

#[derive(Debug, Clone, Default)]
pub struct PolicyFilter {
    pub subscription: Option<SubscriptionId>,
    pub resource_group: Option<ResourceGroup>,
    pub location: Option<Location>,
}

/// A port that changed from Initiated to Revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedPort {
    pub request: RequestId,
    pub vm: VmId,
    pub number: Port,
    pub source: SourcePrefix,
    pub end: Timestamp,
    pub reason: RevokeReason,
}

pub struct InitiateArgs {
    pub policy: jitgate_core::policy::PolicyKey,
    pub input: InitiateInput,
    pub id: RequestId,
    pub requestor: String,
    pub caller_ip: IpAddr,
    /// The caller's role assignments: the initiate action is checked per VM.
    pub assignments: Vec<RoleAssignment>,
    /// The client's key for this request (`Idempotency-Key`, or Azure's
    /// `x-ms-client-request-id`): an initiate by the same requestor with a key seen in
    /// the last [`IDEMPOTENCY_WINDOW`] returns the request made then and changes
    /// nothing, so a retry after an unknown outcome (a failover) is never doubled.
    pub idempotency_key: Option<String>,
    /// Break-glass: open every port now whatever the approval rules say, for at most
    /// this many seconds (the caller needs the break-glass action on every VM).
    pub break_glass: Option<i64>,
}

/// How long an initiate's idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiateRefusal {
    PolicyNotFound,
    Invalid(FieldError),
    Forbidden { field: String, vm: VmId },
}

#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    pub vm: Option<VmId>,
    pub requestor: Option<String>,
    /// Only requests with at least one port live at this time.
    pub live_at: Option<Timestamp>,
    /// Only requests with a port waiting for approval.
    pub pending: bool,
    /// Only requests after this one in the list's order (newest first): the previous
    /// page's last request.
    pub after: Option<Cursor>,
    pub limit: usize,
}

/// Where a page of a list ended: the time and id of its last item (lists are ordered
/// by time, then id, so a page continues exactly where the previous one stopped
/// whatever was written meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub at: Timestamp,
    pub id: String,
}

/// A page of a list ordered by creation: at most `limit` items after `after`.
#[derive(Debug, Clone, Default)]
pub struct Paging {
    pub after: Option<Cursor>,
    pub limit: usize,
}

/// Which ports of a request a revoke names (core's type: the rule is
/// `jitgate_core::request::plan_revoke`).
pub type PortSelector = jitgate_core::request::RevokeSelection;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeError {
    NotFound,
    /// Nothing was live to revoke.
    NothingLive,
}

/// A live grant on a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub request: RequestId,
    pub requestor: String,
    pub number: Port,
    pub protocol: Protocol,
    pub source: SourcePrefix,
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Grant {
    /// The grant as the NSG view and the agent's state know it (without who asked).
    pub fn to_ref(&self) -> jitgate_core::nsg::GrantRef {
        jitgate_core::nsg::GrantRef {
            request: self.request,
            number: self.number,
            protocol: self.protocol,
            source: self.source,
            start: self.start,
            end: self.end,
        }
    }
}

/// What [`crate::Store::grant_changes`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrantChanges {
    /// Where the next read starts.
    pub upto: u64,
    /// The rows changed: each grant, and whether it is initiated now (a row that is
    /// not, or whose end has passed, is no longer live).
    pub rows: Vec<(Grant, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public identifier (the part of the token before the secret).
    pub id: String,
    pub principal: String,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_hash: String,
    pub description: String,
    pub created: Timestamp,
    pub expires: Option<Timestamp>,
    pub revoked: Option<Timestamp>,
    /// For a credential a person got by signing in with the identity provider: who they
    /// were at that sign-in (JSON the controller writes: display name, groups, how they
    /// signed in). `None` for tokens an administrator minted (automation) and agents'.
    pub identity: Option<String>,
    /// When a sign-in credential was last used (kept to the minute: its idle timeout).
    pub last_used: Option<Timestamp>,
}

/// A sign-in of the command line under way (`jitgate login`): the loopback flow's
/// one-time code, or the device flow's device code. Found by the SHA-256 of the code
/// the command line holds (never the code itself); taken once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigninRecord {
    /// Hex SHA-256 of the code the command line presents.
    pub id: String,
    /// Device flow: the short code the person confirms on the controller's page.
    pub user_code: Option<String>,
    /// Loopback flow: the PKCE S256 challenge of the command line's verifier.
    pub challenge: Option<String>,
    /// The address that started it (shown to the person asked to confirm).
    pub source: String,
    pub status: SigninStatus,
    pub created: Timestamp,
    pub expires: Timestamp,
    /// When the command line last asked (device flow: polls slower than the interval).
    pub polled: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigninStatus {
    Pending,
    /// Confirmed by `principal`, who was `identity` (as [`TokenRecord::identity`]).
    Approved {
        principal: String,
        identity: String,
    },
    /// Refused by `principal`.
    Denied {
        principal: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleAssignmentRecord {
    pub id: String,
    pub assignment: RoleAssignment,
    pub created: Timestamp,
}

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Events whose target contains this text (case-insensitive), e.g. a VM id.
    pub target: Option<String>,
    pub actor: Option<String>,
    /// Events whose action starts with this text.
    pub action: Option<String>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub after_seq: Option<u64>,
    pub limit: usize,
}

/// A one-purpose token with which agents enroll: scoped, expiring, limited in uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub secret_hash: String,
    pub scope: jitgate_core::ids::Scope,
    pub expires: Timestamp,
    pub uses_left: u32,
    pub description: String,
    pub created: Timestamp,
    pub created_by: String,
    pub revoked: Option<Timestamp>,
    /// May enroll a VM whose agent is online, replacing it (a reinstall).
    pub allow_replace: bool,
}

/// An install code (`jitgate enroll-token create --print-install`): the line a machine
/// runs carries the code, the controller exchanges it for the enrollment token as
/// many times as the token has uses (once, by default), and keeps the token here
/// encrypted with a key only the code gives (someone with the database cannot recover
/// the token from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallCodeRecord {
    /// Hex SHA-256 of the code (with its own domain label): how it is looked up.
    pub code_hash: String,
    /// The enrollment token it delivers (its id; the secret is in `sealed`).
    pub token_id: String,
    /// The token, sealed with the code.
    pub sealed: String,
    pub expires: Timestamp,
    /// How many more times it delivers the token.
    pub uses_left: u32,
}

pub struct EnrollArgs {
    pub token_id: String,
    /// Hex SHA-256 of the presented secret.
    pub presented_hash: String,
    pub vm: VmId,
    pub location: Option<Location>,
    /// The credential the agent receives; its principal gets the Agent role on `vm`.
    pub agent_token: TokenRecord,
    /// An agent that reported at or after this is online: replacing it needs a token
    /// created with `allow_replace`.
    pub online_since: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollError {
    InvalidToken,
    Expired,
    UsedUp,
    Revoked,
    OutOfScope(String),
    UnknownSubscription,
    /// The VM's agent is online and the token was not made for replacing it.
    AgentOnline,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsgRuleError {
    UnknownVm,
    /// Another rule of the VM has this priority.
    PriorityTaken(String),
}

/// What an agent last reported, kept as the JSON it sent (the controller's wire type
/// reads it back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatusRecord {
    pub vm: VmId,
    pub report: String,
    pub last_seen: Timestamp,
}

/// A VM's entry in the policy that protects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPolicy {
    pub key: jitgate_core::policy::PolicyKey,
    pub vm: jitgate_core::policy::PolicyVm,
}

/// An administrator's decision that JIT does not apply to a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExclusionRecord {
    pub id: String,
    pub scope: jitgate_core::ids::Scope,
    pub reason: String,
    pub created: Timestamp,
    pub created_by: String,
}

/// Attempts blocked by a VM's JIT deny rule for one port, between two agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedPoint {
    pub vm: VmId,
    pub port: u16,
    pub protocol: String,
    pub at: Timestamp,
    pub count: u64,
}

/// What deleting a policy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedPolicy {
    /// The VMs it protected.
    pub vms: Vec<VmId>,
    /// Their live grants, now revoked.
    pub revoked: Vec<RevokedPort>,
}

/// Which VMs a recommendations read covers.
#[derive(Debug, Clone, Default)]
pub struct VerdictScope {
    pub resource_group: Option<ResourceGroup>,
    /// Only VMs one of these scopes contains (the caller's, from
    /// `rbac::scopes_allowing`); `None`: every VM. Scopes of another subscription
    /// contain none of the subscription's VMs.
    pub readable: Option<Vec<jitgate_core::ids::Scope>>,
}

/// One page of recommendations, in key order (the lower-cased VM id).
#[derive(Debug, Clone, Default)]
pub struct VerdictPage {
    pub scope: VerdictScope,
    /// Only VMs with this verdict (at the time of the read).
    pub verdict: Option<jitgate_core::recommend::Verdict>,
    /// Only VMs whose key sorts after this one: the previous page's last.
    pub after: Option<String>,
    pub limit: usize,
    /// Only the VMs of this tab of the dashboard.
    pub tab: Option<JitTab>,
    /// Only VMs whose resource group or name contains this text (case-insensitive).
    pub search: Option<String>,
}

/// The reference portal's tabs: VMs a policy protects; VMs without one that can have
/// one; VMs without one that cannot (their verdict is NotApplicable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JitTab {
    Configured,
    NotConfigured,
    Unsupported,
}

impl JitTab {
    /// Which tab a VM is on.
    pub fn of(protected: bool, verdict: jitgate_core::recommend::Verdict) -> JitTab {
        match (protected, verdict) {
            (true, _) => JitTab::Configured,
            (false, jitgate_core::recommend::Verdict::NotApplicable) => JitTab::Unsupported,
            (false, _) => JitTab::NotConfigured,
        }
    }
}

/// How many VMs are on each tab, and how many of them have an agent gone silent or a
/// table changed outside jitgate (one aggregate read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TabCounts {
    pub configured: u64,
    pub not_configured: u64,
    pub unsupported: u64,
    pub agents_offline: u64,
    pub drift: u64,
}

/// A VM's recommendation, as `core::recommend::classify` gives it from the VM's
/// current facts at the time of the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmVerdict {
    pub vm: VmId,
    pub recommendation: jitgate_core::recommend::Recommendation,
    /// A policy protects the VM (the dashboard's Configured tab).
    pub protected: bool,
}

/// How many VMs have each verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerdictCounts {
    pub healthy: u64,
    pub unhealthy: u64,
    pub not_applicable: u64,
}

impl VerdictCounts {
    pub fn get(&self, v: jitgate_core::recommend::Verdict) -> u64 {
        use jitgate_core::recommend::Verdict;
        match v {
            Verdict::Healthy => self.healthy,
            Verdict::Unhealthy => self.unhealthy,
            Verdict::NotApplicable => self.not_applicable,
        }
    }

    pub fn add(&mut self, v: jitgate_core::recommend::Verdict, n: u64) {
        use jitgate_core::recommend::Verdict;
        match v {
            Verdict::Healthy => self.healthy += n,
            Verdict::Unhealthy => self.unhealthy += n,
            Verdict::NotApplicable => self.not_applicable += n,
        }
    }
}

/// A decision on a pending request (`Store::decide_request`).
#[derive(Debug, Clone)]
pub struct DecideArgs {
    pub request: jitgate_core::request::RequestId,
    pub who: String,
    pub approve: bool,
    pub reason: Option<String>,
    /// The approval's shorter duration (seconds), if any.
    pub duration: Option<i64>,
    /// The approval's narrower source, if any.
    pub source: Option<jitgate_core::net::SourcePrefix>,
    /// The decider's role assignments now (eligibility is checked at the decision).
    pub assignments: Vec<jitgate_core::rbac::RoleAssignment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecideRefusal {
    NotFound,
    Decide(jitgate_core::approval::DecideError),
    Invalid(jitgate_core::FieldError),
}

/// What a decision did, and the request after it.
#[derive(Debug, Clone)]
pub struct Decided {
    pub outcome: jitgate_core::approval::Outcome,
    pub request: jitgate_core::request::AccessRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewRefusal {
    NotFound,
    NotBreakGlass,
    AlreadyReviewed,
    /// Nobody reviews their own break-glass request.
    OwnRequest,
    /// The approve action at every VM of the request is needed.
    NotAnApprover,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelRefusal {
    NotFound,
    NotYours,
    NotPending,
}

/// An endpoint told about events (`PUT /api/v1/webhooks/{name}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub name: String,
    pub url: String,
    /// Event types (`request.pending`, ...), or `*` for all.
    pub events: Vec<String>,
    /// `standard` (Standard Webhooks JSON) or `slack` (a message for Slack).
    pub format: String,
    /// The signing secret (`whsec_` and base64); shown once, at creation.
    pub secret: String,
    pub created: Timestamp,
    pub updated: Timestamp,
    /// When and why deliveries stopped (the endpoint answered 410 Gone).
    pub disabled: Option<(Timestamp, String)>,
}

/// One delivery taken from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The Standard Webhooks message id: the same on every attempt.
    pub msg_id: String,
    pub webhook: String,
    pub event: String,
    /// The event as JSON (`{"type", "timestamp", "data"}`).
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
    pub url: String,
    pub format: String,
    pub secret: String,
    /// Until when this claim holds: its outcome is recorded only while it does.
    pub claimed_until: Timestamp,
}

/// What one delivery attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    Delivered,
    /// Try again at `at`.
    Retry {
        at: Timestamp,
        error: String,
    },
    /// Given up.
    Failed {
        error: String,
    },
    /// The endpoint answered 410: it is disabled, nothing more is sent to it.
    Gone {
        error: String,
    },
}
