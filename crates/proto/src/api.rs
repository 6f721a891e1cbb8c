//! The native API's wire types (`/api/v1`): what the controller sends and reads, what
//! the CLI reads and sends, and what the OpenAPI document describes (it is generated
//! from these types, so the three cannot drift apart).
//!
//! Plain data: identifiers, times and addresses travel as the strings the core prints
//! (`Timestamp`'s RFC 3339, `VmId`'s Azure resource id). Request bodies have every field
//! optional so that a missing field is answered with a 400 naming it, by the handler,
//! rather than a generic decoding error. Conversions from the domain types live in the
//! controller, next to the handlers, so this crate depends on nothing but serde.
//!
//! Lists are pages: `value`, plus `continuationToken` when more follow; pass it back
//! unchanged (`?continuationToken=...`) for the next page.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A page of a list.
macro_rules! page {
    ($(#[$doc:meta])* $name:ident, $item:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            pub value: Vec<$item>,
            /// Present when more items follow: pass it back unchanged for the next page.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub continuation_token: Option<String>,
        }
    };
}

// ---- errors ---------------------------------------------------------------------------

/// Every error, as Azure answers them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CloudError {
    pub error: CloudErrorBody,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CloudErrorBody {
    /// A machine-readable code: `InvalidRequestContent`, `AuthenticationFailed`,
    /// `AuthorizationFailed`, `NotFound`, `Conflict`, `ServerBusy`, ...
    pub code: String,
    pub message: String,
    /// The field or parameter at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Always empty (Azure's shape).
    #[serde(default)]
    pub details: Vec<serde_json::Value>,
    /// Always empty (Azure's shape).
    #[serde(default, rename = "additionalInfo")]
    pub additional_info: Vec<serde_json::Value>,
}

// ---- service --------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` when the store answers.
    pub status: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub principal: String,
    pub token_id: String,
    pub subscription: String,
    pub roles: Vec<RoleAt>,
    /// The address the controller sees the call from (what "My IP" would use).
    pub caller_ip: String,
    /// What the credential is: `signIn` (a person signed in with the identity
    /// provider), `providerToken` (a token the provider issued, presented as is),
    /// `automation` (a token an administrator made) or `agent`.
    #[serde(default)]
    pub credential: String,
    /// The person's display name, for a sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The person's groups at the provider when they signed in (their roles follow
    /// them through the controller's group mapping).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// When the credential stops working, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

// ---- the command line's sign-in --------------------------------------------------------

/// `POST /auth/device`: a device sign-in begun. The person opens
/// `verificationUriComplete` (or `verificationUri` and types `userCode`), signs in and
/// confirms; meanwhile the command line asks `POST /auth/token` every `interval` s.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStart {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_in: u64,
    pub interval: u64,
}

/// `POST /auth/token`: what the command line exchanges for its credential.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "grantType", rename_all = "camelCase")]
pub enum SigninGrant {
    /// The one-time code its loopback address received, and the PKCE verifier whose
    /// S256 challenge it sent to `/auth/login`.
    #[serde(rename_all = "camelCase")]
    Loopback { code: String, code_verifier: String },
    /// The device code of `POST /auth/device`.
    #[serde(rename_all = "camelCase")]
    Device { device_code: String },
}

/// `POST /auth/token` answered 200: the sign-in credential (a jitgate token that
/// expires).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SigninToken {
    pub token: String,
    pub token_id: String,
    pub principal: String,
    pub name: String,
    pub groups: Vec<String>,
    pub expires_at: String,
}

/// `POST /auth/token` answered 202: not yet confirmed; ask again after `interval` s
/// (`slowDown`: the command line asked too often, and the interval grew).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SigninPending {
    pub status: String,
    pub interval: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoleAt {
    pub role: String,
    pub scope: String,
}

// ---- VMs ------------------------------------------------------------------------------

/// Registers a VM: `id`, or `resourceGroup` and `name`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterVm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Vm {
    /// The VM's Azure resource id.
    pub id: String,
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: Option<String>,
    pub registered_at: String,
    pub registered_by: String,
}

/// Whether a VM has an enrolled agent and whether it reports.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPresence {
    pub enrolled: bool,
    /// Reported within the offline threshold (`--agent-offline-after`).
    pub online: bool,
    /// When the agent last reported (only when enrolled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// A VM in a list, with what protects it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmListItem {
    #[serde(flatten)]
    pub vm: Vm,
    /// Id of the policy protecting the VM.
    pub policy: Option<String>,
    pub protected_ports: Vec<u16>,
    /// Number of live grants.
    pub live_grants: u64,
    pub agent: AgentPresence,
}

page!(
    /// A page of VMs.
    VmPage,
    VmListItem
);

/// One VM with its agent's full status, live grants and recent blocked attempts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmDetail {
    #[serde(flatten)]
    pub vm: Vm,
    pub policy: Option<String>,
    pub agent: AgentStatus,
    /// Start of the newest request for this VM.
    pub last_access: Option<String>,
    /// Who made the newest request for this VM.
    pub last_user: Option<String>,
    pub blocked_last24h: Vec<BlockedTotal>,
    pub grants: Vec<Grant>,
    /// Set when a gateway enforces this VM's state (it runs no agent): the gateway
    /// then reports as its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// Places a VM behind a gateway (`PUT /api/v1/vms/{rg}/{name}/placement`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PutPlacement {
    /// The gateway: a registered VM whose agent runs `jitgate gateway`, as its
    /// resource id or `resourceGroup/name`.
    pub gateway: Option<String>,
    /// The VM's private address, as the gateway reaches it.
    pub address: Option<String>,
    /// `routed` (clients reach the VM's own address through the gateway) or `dnat`
    /// (clients reach the gateway's public address on a mapped port).
    pub mode: Option<String>,
    /// DNAT: the VM sees connections come from the gateway.
    #[serde(default)]
    pub masquerade: bool,
    /// DNAT: the gateway's public address clients connect to.
    pub public_ip_address: Option<String>,
}

/// Where a VM sits behind a gateway.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// The gateway's VM id.
    pub gateway: String,
    #[serde(flatten)]
    pub place: crate::WireGateway,
}

/// A VM's agent as the controller knows it: whether it reports, whether it applied the
/// current desired state, and its last report (`enrolled: false`: the report is empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub enrolled: bool,
    pub online: bool,
    #[serde(default)]
    pub last_seen: Option<String>,
    /// Whether the agent applied the current desired state.
    #[serde(default)]
    pub up_to_date: Option<bool>,
    /// Whether the agent is older than this controller (its version), or speaks less
    /// than the protocol its desired state needs; `jitgate agent upgrade` on the
    /// machine installs the controller's.
    #[serde(default)]
    pub outdated: Option<bool>,
    #[serde(flatten)]
    pub report: crate::StatusReport,
}

/// A live grant on a VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub request: String,
    pub requestor: String,
    pub port: u16,
    pub protocol: String,
    pub source: String,
    pub start_time_utc: String,
    pub end_time_utc: String,
    pub seconds_left: i64,
}

/// Attempts the firewall dropped on one protected port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlockedTotal {
    pub port: u16,
    pub protocol: String,
    pub count: u64,
}

/// One point of a blocked-attempt series.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlockedPoint {
    pub port: u16,
    pub protocol: String,
    pub at: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlockedSeries {
    pub vm: String,
    pub since: String,
    pub totals: Vec<BlockedTotal>,
    pub series: Vec<BlockedPoint>,
}

// ---- NSG view -------------------------------------------------------------------------

/// The effective rules of a VM, in Azure's NSG form, by priority.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NsgView {
    pub vm: String,
    pub rules: Vec<NsgRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NsgRule {
    pub name: String,
    pub priority: u16,
    /// `Allow` or `Deny`.
    pub access: String,
    /// Always `Inbound`.
    pub direction: String,
    /// `TCP`, `UDP` or `*`.
    pub protocol: String,
    pub source_address_prefixes: Vec<String>,
    pub destination_port_ranges: Vec<String>,
    pub description: String,
    /// `user`, `jit-deny` or `jit-allow`.
    pub origin: String,
    /// What JIT object made the rule (null for a user rule).
    pub jit: Option<JitOrigin>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JitOrigin {
    /// The policy of a `jit-deny` rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The request of a `jit-allow` rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time_utc: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NsgRuleList {
    pub value: Vec<NsgRule>,
}

/// A user rule (priority 100-4096).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NsgRuleInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address_prefixes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port_ranges: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

// ---- requests -------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub id: String,
    /// Id of the policy the request was made against.
    pub policy: String,
    pub requestor: String,
    pub justification: Option<String>,
    pub start_time_utc: String,
    pub caller_ip: String,
    pub virtual_machines: Vec<RequestVm>,
    /// `Pending`, `Active`, `Denied`, `Expired`, `Cancelled` or `Ended`.
    #[serde(default)]
    pub state: String,
    /// The approval the request waits (or waited) under, with every decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<RequestApproval>,
    /// Present for break-glass requests (opened at once, without approvals): flagged
    /// until an approver reviews it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<BreakGlassOut>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BreakGlassOut {
    pub reviewed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RequestVm {
    pub id: String,
    pub ports: Vec<RequestPort>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestPort {
    pub number: u16,
    pub protocol: String,
    pub allowed_source_address_prefix: String,
    pub end_time_utc: String,
    /// `Initiated` or `Revoked` (Azure's values).
    pub status: String,
    /// `Initiated`, `Expired`, `UserRequested` or `NewerRequestInitiated`.
    pub status_reason: String,
    /// Whether the port is open for this request now.
    pub live: bool,
}

page!(
    /// A page of requests, newest first.
    RequestPage,
    Request
);

/// Which ports to revoke (none given: all live ports of the request).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RevokeSelection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RevokedPort {
    pub vm: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RevokeResult {
    pub revoked: Vec<RevokedPort>,
    /// The request after the revoke.
    pub request: Request,
}

// ---- tokens and role assignments ------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateToken {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// ISO 8601 duration until the token expires (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub id: String,
    pub principal: String,
    pub description: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// `signIn` (issued when a person signed in with the identity provider; expires),
    /// `automation` (made by an administrator) or `agent` (an enrolled agent's).
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: Token,
    /// The bearer token text (`jg_<id>.<secret>`), shown only here.
    pub token: String,
}

page!(
    /// A page of tokens, oldest first.
    TokenPage,
    Token
);

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateRoleAssignment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// `Owner`, `JIT Administrator`, `JIT Requester`, `JIT Approver`, `Reader` or `Agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleAssignment {
    pub id: String,
    pub principal: String,
    pub role: String,
    pub scope: String,
    pub created_at: String,
}

page!(
    /// A page of role assignments, oldest first.
    RoleAssignmentPage,
    RoleAssignment
);

// ---- audit ----------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub target: String,
    /// `success`, `denied` or `failed`.
    pub outcome: String,
    /// What the action changed (an object for most actions).
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

page!(
    /// A page of audit events, in sequence order.
    AuditPage,
    AuditEvent
);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerify {
    pub ok: bool,
    pub events: u64,
    pub last_seq: u64,
    pub head_hash: String,
    pub problems: Vec<String>,
    /// Signed checkpoints the chain was checked against.
    pub checkpoints: usize,
    /// The newest sequence number a signed checkpoint covers.
    pub anchored_at: Option<u64>,
    /// The checkpoint signing key (Ed25519, hex).
    pub public_key: String,
}

// ---- recommendations and exclusions ---------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub vm: String,
    pub resource_group: String,
    pub name: String,
    /// `Healthy`, `Unhealthy` or `NotApplicable`.
    pub verdict: String,
    pub reason: String,
    /// Management ports reachable from anywhere.
    pub exposed_ports: Vec<u16>,
    pub listening_management_ports: Vec<u16>,
    /// A JIT policy protects the VM.
    #[serde(default)]
    pub protected: bool,
}

/// How many VMs the caller may read have each verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct VerdictCounts {
    pub healthy: u64,
    pub unhealthy: u64,
    pub not_applicable: u64,
}

/// The reference portal's tabs: Configured (a policy protects the VM), Not configured
/// (no policy, JIT possible), Unsupported (no policy, verdict NotApplicable); and how
/// many of those VMs have an agent offline or enforcement drift.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TabCounts {
    pub configured: u64,
    pub not_configured: u64,
    pub unsupported: u64,
    pub agents_offline: u64,
    pub drift: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecommendationPage {
    pub value: Vec<Recommendation>,
    /// On the first page only (no continuation token given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<VerdictCounts>,
    /// On the first page, when asked (`tabs=true`): how many VMs are on each of the
    /// dashboard's tabs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tabs: Option<TabCounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation_token: Option<String>,
}

/// Enables JIT on unhealthy VMs (all the caller may see, or one resource group's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyRecommendations {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<String>,
    /// Enable JIT on exactly these VMs (resource ids), whatever their verdict, instead
    /// of on every unhealthy one ("Enable JIT on N VMs").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
    /// With `vms`: the port rules to add to each (default: 22, 3389, 5985 and 5986,
    /// any protocol, any source, at most 3 hours, as the reference's pane proposes).
    /// A rule a VM's entry already has for a port number is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortRuleSpec>>,
}

/// A policy's port rule, in Azure's field names.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRuleSpec {
    pub number: Option<i64>,
    /// `*`, `TCP` or `UDP` (default `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Sources a request may name: `*` (any), or addresses and prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefixes: Option<Vec<String>>,
    /// ISO 8601, `PT5M` to `PT24H` (default `PT3H`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_access_duration: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Enabled {
    pub vm: String,
    pub ports: Vec<u16>,
    pub policy: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApplyResult {
    pub enabled: Vec<Enabled>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateExclusion {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exclusion {
    pub id: String,
    pub scope: String,
    pub reason: String,
    pub created_at: String,
    pub created_by: String,
}

page!(
    /// A page of exclusions.
    ExclusionPage,
    Exclusion
);

// ---- enrollment tokens ----------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateEnrollToken {
    /// A subscription or resource group scope (default: the subscription).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// How many machines may enroll with it (1-100000, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<i64>,
    /// ISO 8601 duration, 1 second to 30 days (default PT24H).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether a machine may enroll under a name an agent already holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_replace: Option<bool>,
    /// Also make a one-time install line for machines to run (the token must be
    /// scoped to a resource group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<bool>,
}

/// The line that installs and enrolls the agent on a machine: its install code
/// delivers the enrollment token once, never on a command line.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstallLine {
    /// What to run on the machine, as root.
    pub command: String,
    /// The install script's URL, with the one-time code.
    pub url: String,
    /// When the code stops working (the token's end).
    pub expires_at: String,
    /// Over TLS: the controller's public key as curl pins it (`sha256//<base64>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_public_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollToken {
    pub id: String,
    pub scope: String,
    pub uses_left: u32,
    pub expires_at: String,
    pub description: String,
    pub created_at: String,
    pub created_by: String,
    pub revoked_at: Option<String>,
    pub allow_replace: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedEnrollToken {
    #[serde(flatten)]
    pub info: EnrollToken,
    /// The enrollment token text, shown only here: `je_<id>.<secret>`, followed over
    /// TLS by `#sha256:<hex>`, the fingerprint of the controller's CA, which the agent
    /// pins (nothing else to copy).
    pub token: String,
    /// Over TLS: the fingerprint clients pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
    /// With `install`: the line to run on machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallLine>,
}

page!(
    /// A page of enrollment tokens, oldest first.
    EnrollTokenPage,
    EnrollToken
);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flattened_types_keep_one_flat_object() {
        let t = CreatedToken {
            info: Token {
                id: "abc".into(),
                principal: "alice".into(),
                description: String::new(),
                created_at: "2026-01-01T00:00:00Z".into(),
                expires_at: None,
                revoked_at: None,
                kind: "automation".into(),
            },
            token: "jg_abc.secret".into(),
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["id"], "abc");
        assert_eq!(v["token"], "jg_abc.secret");
        assert!(v["expiresAt"].is_null());
        let back: CreatedToken = serde_json::from_value(v).unwrap();
        assert_eq!(back.info.principal, "alice");
    }

    #[test]
    fn pages_omit_an_absent_continuation_token() {
        let p = TokenPage {
            value: vec![],
            continuation_token: None,
        };
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"value":[]}"#);
        let p: TokenPage =
            serde_json::from_str(r#"{"value":[],"continuationToken":"ab"}"#).unwrap();
        assert_eq!(p.continuation_token.as_deref(), Some("ab"));
    }

    #[test]
    fn verdict_counts_use_the_verdict_names() {
        let c = VerdictCounts {
            healthy: 1,
            unhealthy: 2,
            not_applicable: 3,
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"Healthy": 1, "Unhealthy": 2, "NotApplicable": 3})
        );
    }
}

// ---- approvals ------------------------------------------------------------------------

/// `PUT /api/v1/approvalRules/{name}`: which request ports wait for people's approval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalRuleIn {
    /// Subscription, resource group or VM scope (`/subscriptions/...`).
    pub scope: Option<String>,
    /// The ports covered (default: every port).
    pub ports: Option<Vec<i64>>,
    /// Who may decide (default: everyone holding `JIT Approver` at the request's VMs).
    pub approvers: Option<Vec<String>>,
    /// Approvals needed, 1-10 (default 1).
    pub min_approvals: Option<i64>,
    /// Denials that end a request, 1-10 (default 1).
    pub deny_threshold: Option<i64>,
    /// Whether a request must say why (default true).
    pub require_justification: Option<bool>,
    /// A regular expression the justification must match, e.g. `^CHG-[0-9]+`.
    pub justification_pattern: Option<String>,
    /// How long a request waits for its decisions, PT5M to P1D (default PT1H).
    pub pending_timeout: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRuleOut {
    pub name: String,
    pub scope: String,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// Empty: everyone holding `JIT Approver` at the request's VMs.
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    pub deny_threshold: u32,
    pub require_justification: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification_pattern: Option<String>,
    pub pending_timeout: String,
}

page!(
    /// Approval rules by name.
    ApprovalRulePage,
    ApprovalRuleOut
);

/// A request's approval: the rule it waits (or waited) under and every decision.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestApproval {
    pub rule: String,
    pub min_approvals: u32,
    pub deny_threshold: u32,
    /// Empty: everyone holding `JIT Approver` at the request's VMs.
    pub approvers: Vec<String>,
    /// When it ends as expired if not decided.
    pub pending_until: String,
    pub decisions: Vec<ApprovalDecision>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalDecision {
    pub principal: String,
    /// `approve` or `deny`.
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub time: String,
}

/// `POST /api/v1/requests/{id}/approve`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApproveIn {
    pub reason: Option<String>,
    /// A shorter duration than asked for (ISO 8601, e.g. PT30M), counted from the
    /// approval.
    pub duration: Option<String>,
    /// A narrower source than asked for.
    pub source_prefix: Option<String>,
}

/// `POST /api/v1/requests/{id}/deny`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DenyIn {
    /// Required: the requestor is told why.
    pub reason: Option<String>,
}

/// What a decision did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecisionOut {
    /// `counted` (more approvals needed), `approved` (the ports are open now) or
    /// `denied`.
    pub outcome: String,
    pub approvals: u32,
    pub needed: u32,
    pub request: Request,
}

// ---- webhooks ---------------------------------------------------------------------------

/// `PUT /api/v1/webhooks/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookIn {
    /// Where events are POSTed (https://; a private address only when the controller's
    /// `--webhook-allow` names it).
    pub url: Option<String>,
    /// Event types (`request.pending`, `request.approved`, `request.denied`,
    /// `request.expired`, `request.cancelled`, `grant.started`, `grant.ended`,
    /// `grant.revoked`, `breakglass.used`, `enforcement.drift`), or `*` (the default).
    pub events: Option<Vec<String>>,
    /// `standard` (Standard Webhooks JSON, the default) or `slack` (a message).
    pub format: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookOut {
    pub name: String,
    pub url: String,
    pub events: Vec<String>,
    pub format: String,
    /// When deliveries stopped (the endpoint answered 410 Gone); PUT it again to resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    pub delivered: u64,
    pub failed: u64,
    /// Messages not delivered yet (due, or waiting for a retry).
    pub waiting: u64,
    /// The signing secret (`whsec_...`): in the answer that creates the webhook only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

page!(
    /// Webhooks by name.
    WebhookPage,
    WebhookOut
);
