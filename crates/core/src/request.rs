//! Access requests and the lifecycle of their ports.
//!
//! A request asks, for some VMs and ports of one policy, that a source may connect
//! until an end time. Each requested port moves through:
//!
//! ```text
//! Initiated --(end time passes)-----------------> Revoked/Expired
//!           --(requestor or admin revokes)------> Revoked/UserRequested
//!           --(same requestor's newer request,
//!              same vm/port/src)----------------> Revoked/NewerRequestInitiated
//!           --(the policy no longer allows it)--> Revoked/PolicyChanged
//! ```
//!
//! Revoked is final. A port is a live *grant* while it is Initiated and its end time
//! is after `now`; only live grants are revoked, superseded or ended by a policy
//! change, and a port past its end stays Initiated until the expiry marks it Expired.
//! Every function here takes `now`; none reads the clock.
//!
//! This module decides what an initiate does ([`plan_initiate`]) and who may end which
//! ports early ([`plan_revoke`]); the store applies
//! the transitions, in its write transactions, and `jitgate_store::conformance::model`
//! checks every backend against a reference model of this lifecycle.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use jiff::{SignedDuration, Timestamp};
use uuid::Uuid;

use crate::duration::parse_iso8601_secs;
use crate::error::FieldError;
use crate::ids::VmId;
use crate::net::{Port, Protocol, SourcePrefix};
use crate::policy::Policy;

/// How far past the policy's maximum a client-computed `endTimeUtc` may reach, to
/// absorb clock skew between client and controller. The granted end is still capped
/// at `now + maximum`.
pub const END_TIME_SKEW_SECS: i64 = 60;

/// Longest justification kept.
pub const MAX_JUSTIFICATION_LEN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(Uuid);

impl RequestId {
    /// The id as a number (for fast comparisons).
    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }

    pub fn new(uuid: Uuid) -> Self {
        RequestId(uuid)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        Uuid::parse_str(s)
            .map(RequestId)
            .map_err(|_| format!("'{s}' is not a request id (a GUID)"))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevokeReason {
    Expired,
    UserRequested,
    NewerRequestInitiated,
    /// The port was removed from the policy, or the policy deleted.
    PolicyChanged,
    /// It waited for approval longer than its rule allows.
    ApprovalExpired,
    /// Its requestor withdrew it while it waited for approval.
    Cancelled,
}

impl RevokeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Expired => "Expired",
            RevokeReason::UserRequested => "UserRequested",
            RevokeReason::NewerRequestInitiated => "NewerRequestInitiated",
            RevokeReason::PolicyChanged => "PolicyChanged",
            RevokeReason::ApprovalExpired => "ApprovalExpired",
            RevokeReason::Cancelled => "Cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            RevokeReason::Expired,
            RevokeReason::UserRequested,
            RevokeReason::NewerRequestInitiated,
            RevokeReason::PolicyChanged,
            RevokeReason::ApprovalExpired,
            RevokeReason::Cancelled,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortStatus {
    /// Waiting for approval (see `approval`): it reaches no agent.
    Pending,
    Initiated,
    Revoked(RevokeReason),
    /// Its approvers denied it.
    Denied,
}

impl PortStatus {
    /// Azure's `status` field.
    pub fn status_str(self) -> &'static str {
        match self {
            PortStatus::Pending => "Pending",
            PortStatus::Initiated => "Initiated",
            PortStatus::Revoked(_) => "Revoked",
            PortStatus::Denied => "Denied",
        }
    }

    /// Azure's `statusReason` field. An initiated port reads `UserRequested`, as in
    /// Azure's own responses.
    pub fn reason_str(self) -> &'static str {
        match self {
            PortStatus::Pending => "ApprovalRequired",
            PortStatus::Initiated => "UserRequested",
            PortStatus::Revoked(r) => r.as_str(),
            PortStatus::Denied => "ApproverDenied",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPort {
    pub number: Port,
    pub protocol: Protocol,
    pub source: SourcePrefix,
    pub end: Timestamp,
    pub status: PortStatus,
}

impl RequestPort {
    /// Live: initiated and not yet at its end time.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.status == PortStatus::Initiated && self.end > now
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestVm {
    pub id: VmId,
    pub ports: Vec<RequestPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    pub id: RequestId,
    /// Lower-cased key of the policy the request was made against.
    pub policy_key: String,
    pub requestor: String,
    pub justification: Option<String>,
    pub start: Timestamp,
    /// The caller's observed address when it made the request.
    pub caller_ip: IpAddr,
    pub vms: Vec<RequestVm>,
    /// The approval it waits (or waited) under, if a rule covered one of its ports.
    pub approval: Option<crate::approval::Approval>,
    /// Set when it was a break-glass request: opened at once, without approvals.
    pub break_glass: Option<crate::approval::BreakGlass>,
}

// ---- raw input -------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
pub struct InitiatePortInput {
    pub number: Option<i64>,
    pub allowed_source_address_prefix: Option<String>,
    pub end_time_utc: Option<String>,
    pub duration: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct InitiateVmInput {
    pub id: Option<String>,
    pub ports: Option<Vec<InitiatePortInput>>,
}

#[derive(Debug, Clone, Default)]
pub struct InitiateInput {
    pub virtual_machines: Option<Vec<InitiateVmInput>>,
    pub justification: Option<String>,
}

/// A live grant already stored, as far as superseding needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveGrant {
    pub request: RequestId,
    /// Who asked for it: only the same requestor's grants are superseded.
    pub requestor: String,
    pub vm: VmId,
    pub number: Port,
    pub source: SourcePrefix,
}

/// The live grants a request supersedes: the same requestor's, for a VM, port and
/// source the request asks for again. A store may pass every live grant of the VMs or
/// only those it found by (VM, port, source): the answer is the same.
pub fn superseded_by(vms: &[RequestVm], requestor: &str, live: &[LiveGrant]) -> Vec<LiveGrant> {
    live.iter()
        .filter(|g| g.requestor == requestor)
        .filter(|g| {
            vms.iter().any(|v| {
                v.id == g.vm
                    && v.ports
                        .iter()
                        .any(|p| p.number == g.number && p.source == g.source)
            })
        })
        .cloned()
        .collect()
}

/// Who asks, from where, when.
pub struct InitiateContext<'a> {
    pub id: RequestId,
    pub policy: &'a Policy,
    pub requestor: &'a str,
    pub caller_ip: IpAddr,
    pub now: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiateError {
    Invalid(FieldError),
    /// The caller may not initiate on this VM (the field names it).
    Forbidden {
        field: String,
        vm: VmId,
    },
}

impl From<FieldError> for InitiateError {
    fn from(e: FieldError) -> Self {
        InitiateError::Invalid(e)
    }
}

/// What an accepted initiate changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitiatePlan {
    pub request: AccessRequest,
    /// The same requestor's older live grants for the same VM, port and source: they
    /// become `Revoked/NewerRequestInitiated`. Other people's grants are never touched
    /// (ending them needs the revoke right); the kernel element carries the latest end
    /// of all grants that cover it. Empty from [`plan_initiate`]: the store, which
    /// reads only the grants the planned request could supersede, fills it with
    /// [`superseded_by`] (before the approval rules, which may keep them).
    pub superseded: Vec<LiveGrant>,
}

pub fn parse_time(s: &str) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    // Some clients send a UTC time without its offset.
    s.parse::<jiff::civil::DateTime>()
        .ok()
        .and_then(|dt| dt.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| format!("'{s}' is not a date-time such as 2026-05-17T09:06:45Z"))
}

/// Validates an initiate against its policy and decides what it does.
///
/// `may_initiate` answers whether the caller holds the initiate action on a VM; it is
/// asked for each VM before anything else about that VM is checked.
pub fn plan_initiate(
    ctx: &InitiateContext<'_>,
    input: &InitiateInput,
    may_initiate: &dyn Fn(&VmId) -> bool,
) -> Result<InitiatePlan, InitiateError> {
    let justification = match &input.justification {
        Some(j) if j.len() > MAX_JUSTIFICATION_LEN => {
            return Err(FieldError::new(
                "justification",
                format!("is longer than {MAX_JUSTIFICATION_LEN} characters"),
            )
            .into());
        }
        Some(j) if j.trim().is_empty() => None,
        other => other.clone(),
    };
    let raw_vms = input
        .virtual_machines
        .as_ref()
        .ok_or_else(|| FieldError::new("virtualMachines", "is required"))?;
    if raw_vms.is_empty() {
        return Err(
            FieldError::new("virtualMachines", "must list at least one virtual machine").into(),
        );
    }
    let mut vms = Vec::with_capacity(raw_vms.len());
    let mut seen = HashSet::new();
    for (i, raw) in raw_vms.iter().enumerate() {
        let field = format!("virtualMachines[{i}]");
        let id_text = raw
            .id
            .as_deref()
            .ok_or_else(|| FieldError::new(format!("{field}.id"), "is required"))?;
        let id = VmId::parse(id_text).map_err(|e| FieldError::new(format!("{field}.id"), e))?;
        if !may_initiate(&id) {
            return Err(InitiateError::Forbidden {
                field: format!("{field}.id"),
                vm: id,
            });
        }
        if !seen.insert(id.key()) {
            return Err(FieldError::new(
                format!("{field}.id"),
                format!("virtual machine '{id}' is listed twice"),
            )
            .into());
        }
        let policy_vm = ctx.policy.vm(&id).ok_or_else(|| {
            FieldError::new(
                format!("{field}.id"),
                format!(
                    "virtual machine '{id}' is not in policy '{}'",
                    ctx.policy.key.name
                ),
            )
        })?;
        let raw_ports = raw
            .ports
            .as_ref()
            .ok_or_else(|| FieldError::new(format!("{field}.ports"), "is required"))?;
        if raw_ports.is_empty() {
            return Err(
                FieldError::new(format!("{field}.ports"), "must list at least one port").into(),
            );
        }
        let mut ports: Vec<RequestPort> = Vec::with_capacity(raw_ports.len());
        for (j, rp) in raw_ports.iter().enumerate() {
            let pf = format!("{field}.ports[{j}]");
            let number = rp
                .number
                .ok_or_else(|| FieldError::new(format!("{pf}.number"), "is required"))
                .and_then(|n| {
                    Port::new(n).map_err(|e| FieldError::new(format!("{pf}.number"), e))
                })?;
            if ports.iter().any(|p| p.number == number) {
                return Err(FieldError::new(
                    format!("{pf}.number"),
                    format!("port {number} is listed twice"),
                )
                .into());
            }
            let rule = policy_vm.port(number).ok_or_else(|| {
                FieldError::new(
                    format!("{pf}.number"),
                    format!(
                        "port {number} is not protected by the policy for '{}'",
                        id.name
                    ),
                )
            })?;
            let max = rule.max_duration.secs();
            let end = match (&rp.end_time_utc, &rp.duration) {
                (Some(_), Some(_)) => {
                    return Err(FieldError::new(
                        format!("{pf}.duration"),
                        "give endTimeUtc or duration, not both",
                    )
                    .into());
                }
                (None, None) => {
                    return Err(FieldError::new(
                        format!("{pf}.endTimeUtc"),
                        "is required (or give duration)",
                    )
                    .into());
                }
                (Some(t), None) => {
                    let f = format!("{pf}.endTimeUtc");
                    let end = parse_time(t).map_err(|e| FieldError::new(&f, e))?;
                    if end <= ctx.now {
                        return Err(
                            FieldError::new(f, format!("{end} is not in the future")).into()
                        );
                    }
                    let secs = end.duration_since(ctx.now).as_secs();
                    if secs > max + END_TIME_SKEW_SECS {
                        return Err(FieldError::new(
                            f,
                            format!(
                                "{end} is further away than the policy's maximum of {} for port {number}",
                                rule.max_duration.as_str()
                            ),
                        )
                        .into());
                    }
                    end.min(add_secs(ctx.now, max))
                }
                (None, Some(d)) => {
                    let f = format!("{pf}.duration");
                    let secs = parse_iso8601_secs(d).map_err(|e| FieldError::new(&f, e))?;
                    if secs <= 0 {
                        return Err(FieldError::new(f, "must be longer than zero").into());
                    }
                    if secs > max {
                        return Err(FieldError::new(
                            f,
                            format!(
                                "{d} is longer than the policy's maximum of {} for port {number}",
                                rule.max_duration.as_str()
                            ),
                        )
                        .into());
                    }
                    add_secs(ctx.now, secs)
                }
            };
            let source = match &rp.allowed_source_address_prefix {
                Some(s) => SourcePrefix::parse(s)
                    .map_err(|e| FieldError::new(format!("{pf}.allowedSourceAddressPrefix"), e))?,
                None => SourcePrefix::host(ctx.caller_ip),
            };
            if !rule.allowed.permits(&source) {
                let allowed: Vec<String> = rule
                    .allowed
                    .prefixes()
                    .iter()
                    .map(|p| p.to_string())
                    .collect();
                return Err(FieldError::new(
                    format!("{pf}.allowedSourceAddressPrefix"),
                    format!(
                        "source {source} is not inside the prefixes allowed for port {number} ({})",
                        allowed.join(", ")
                    ),
                )
                .into());
            }
            ports.push(RequestPort {
                number,
                protocol: rule.protocol,
                source,
                end,
                status: PortStatus::Initiated,
            });
        }
        vms.push(RequestVm { id, ports });
    }
    Ok(InitiatePlan {
        request: AccessRequest {
            id: ctx.id,
            policy_key: ctx.policy.key.key(),
            requestor: ctx.requestor.to_owned(),
            justification,
            start: ctx.now,
            caller_ip: ctx.caller_ip,
            vms,
            approval: None,
            break_glass: None,
        },
        superseded: Vec::new(),
    })
}

/// Which ports of a request a revoke names: every port (both fields `None`), the ports
/// of one VM, one port number on every VM, or one port of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokeSelection {
    pub vm: Option<VmId>,
    pub number: Option<Port>,
}

impl RevokeSelection {
    /// True when port `number` of `vm` is among the selected ones.
    pub fn selects(&self, vm: &VmId, number: Port) -> bool {
        self.selects_vm(vm) && self.number.is_none_or(|n| n == number)
    }

    fn selects_vm(&self, vm: &VmId) -> bool {
        self.vm.as_ref().is_none_or(|v| v == vm)
    }
}

/// Why a revoke changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeRefusal {
    /// The caller is not the requestor and lacks the revoke right on this VM.
    Forbidden { vm: VmId },
    /// No port of the request matching the selection is live: they have all reached
    /// their end, were revoked already, or the selection names none of the request's
    /// ports.
    NothingLive,
}

/// A port a revoke ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedRef {
    pub vm: VmId,
    pub number: Port,
}

/// Decides a revoke of `request`'s ports named by `only`, by `revoker`, at `now`.
///
/// - The requestor may end their own request, with no right at all (even one they have
///   since lost: ending access early only ever takes access away).
/// - Anyone else needs the revoke right (`may_revoke`) on every VM of the request the
///   selection names by VM (all of them when it names none), whether or not that VM's
///   ports are still live. This is checked before anything else, so a caller without
///   the right learns nothing about which ports are live.
/// - Only live ports (`Initiated` and before their end) matching the selection are
///   ended, as `Revoked/UserRequested`. A port past its end is left to the expiry,
///   which records the truth (`Expired`); a revoked port stays as it is (Revoked is
///   final). When that leaves nothing to end the revoke is refused, so that a revoke
///   that changed nothing never reads as a success.
///
/// Returns the ports that end, in the request's order. The store applies the same
/// selection in its write transaction (`jitgate_store::Store::revoke_request`), which
/// has the last word if a port reached its end meanwhile.
pub fn plan_revoke(
    request: &AccessRequest,
    revoker: &str,
    only: &RevokeSelection,
    may_revoke: &dyn Fn(&VmId) -> bool,
    now: Timestamp,
) -> Result<Vec<RevokedRef>, RevokeRefusal> {
    if request.requestor != revoker
        && let Some(vm) = request
            .vms
            .iter()
            .filter(|v| only.selects_vm(&v.id))
            .find(|v| !may_revoke(&v.id))
    {
        return Err(RevokeRefusal::Forbidden { vm: vm.id.clone() });
    }
    let ended: Vec<RevokedRef> = request
        .vms
        .iter()
        .flat_map(|v| {
            v.ports
                .iter()
                .filter(|p| p.is_live(now) && only.selects(&v.id, p.number))
                .map(|p| RevokedRef {
                    vm: v.id.clone(),
                    number: p.number,
                })
        })
        .collect();
    if ended.is_empty() {
        return Err(RevokeRefusal::NothingLive);
    }
    Ok(ended)
}

fn add_secs(t: Timestamp, secs: i64) -> Timestamp {
    t.saturating_add(SignedDuration::from_secs(secs))
        .unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Location, PolicyName, ResourceGroup, SubscriptionId};
    use crate::policy::{
        PolicyInput, PolicyKey, PolicyVmInput, PortRuleInput, RawPrefix, validate_policy,
    };
    use proptest::prelude::*;

    const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

    fn vm_id(name: &str) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"
        )
    }

    fn policy(allowed: &str, max: &str) -> Policy {
        let key = PolicyKey {
            subscription: SubscriptionId::parse(SUB).unwrap(),
            resource_group: ResourceGroup::parse("rg").unwrap(),
            location: Location::parse("westeurope").unwrap(),
            name: PolicyName::parse("default").unwrap(),
        };
        let rule = |n| PortRuleInput {
            number: Some(n),
            protocol: Some("TCP".into()),
            allowed_source_address_prefix: Some(RawPrefix::One(allowed.into())),
            allowed_source_address_prefixes: None,
            max_request_access_duration: Some(max.into()),
        };
        let spec = validate_policy(
            &key,
            &PolicyInput {
                kind: None,
                virtual_machines: Some(vec![PolicyVmInput {
                    id: Some(vm_id("vm1")),
                    ports: Some(vec![rule(22), rule(3389)]),
                    public_ip_address: None,
                }]),
            },
        )
        .unwrap();
        Policy { key, spec }
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn ctx(p: &Policy) -> InitiateContext<'_> {
        InitiateContext {
            id: RequestId::new(Uuid::from_u128(1)),
            policy: p,
            requestor: "alice",
            caller_ip: "10.0.0.9".parse().unwrap(),
            now: now(),
        }
    }

    fn one(port: InitiatePortInput) -> InitiateInput {
        InitiateInput {
            virtual_machines: Some(vec![InitiateVmInput {
                id: Some(vm_id("vm1")),
                ports: Some(vec![port]),
            }]),
            justification: Some("maintenance".into()),
        }
    }

    fn port(n: i64) -> InitiatePortInput {
        InitiatePortInput {
            number: Some(n),
            allowed_source_address_prefix: None,
            end_time_utc: None,
            duration: Some("PT1H".into()),
        }
    }

    fn yes(_: &VmId) -> bool {
        true
    }

    fn field_of(r: Result<InitiatePlan, InitiateError>) -> String {
        match r {
            Err(InitiateError::Invalid(e)) => e.field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn my_ip_is_the_caller_address() {
        let p = policy("10.0.0.0/24", "PT3H");
        let plan = plan_initiate(&ctx(&p), &one(port(22)), &yes).unwrap();
        let rp = &plan.request.vms[0].ports[0];
        assert_eq!(rp.source.to_string(), "10.0.0.9");
        assert_eq!(rp.end, "2026-01-01T01:00:00Z".parse::<Timestamp>().unwrap());
        assert_eq!(rp.protocol, Protocol::Tcp);
        assert_eq!(rp.status, PortStatus::Initiated);
    }

    #[test]
    fn subset_of_allowed_prefix_is_accepted() {
        let p = policy("10.0.0.0/16", "PT3H");
        let mut i = port(22);
        i.allowed_source_address_prefix = Some("10.0.5.0/24".into());
        assert!(plan_initiate(&ctx(&p), &one(i.clone()), &yes).is_ok());
        i.allowed_source_address_prefix = Some("10.1.0.0/24".into());
        assert_eq!(
            field_of(plan_initiate(&ctx(&p), &one(i.clone()), &yes)),
            "virtualMachines[0].ports[0].allowedSourceAddressPrefix"
        );
        i.allowed_source_address_prefix = Some("*".into());
        assert!(plan_initiate(&ctx(&p), &one(i), &yes).is_err());
        let any = policy("*", "PT3H");
        let mut i = port(22);
        i.allowed_source_address_prefix = Some("*".into());
        assert!(plan_initiate(&ctx(&any), &one(i), &yes).is_ok());
    }

    #[test]
    fn bad_initiates_name_their_field() {
        let p = policy("*", "PT3H");
        let f = "virtualMachines[0].ports[0]";
        let cases: Vec<(InitiatePortInput, String)> = vec![
            (port(8080), format!("{f}.number")),
            (port(0), format!("{f}.number")),
            (
                InitiatePortInput {
                    duration: Some("PT4H".into()),
                    ..port(22)
                },
                format!("{f}.duration"),
            ),
            (
                InitiatePortInput {
                    duration: Some("soon".into()),
                    ..port(22)
                },
                format!("{f}.duration"),
            ),
            (
                InitiatePortInput {
                    duration: Some("PT0S".into()),
                    ..port(22)
                },
                format!("{f}.duration"),
            ),
            (
                InitiatePortInput {
                    duration: None,
                    ..port(22)
                },
                format!("{f}.endTimeUtc"),
            ),
            (
                InitiatePortInput {
                    end_time_utc: Some("2026-01-01T01:00:00Z".into()),
                    ..port(22)
                },
                format!("{f}.duration"),
            ),
            (
                InitiatePortInput {
                    duration: None,
                    end_time_utc: Some("2025-12-31T23:00:00Z".into()),
                    ..port(22)
                },
                format!("{f}.endTimeUtc"),
            ),
            (
                InitiatePortInput {
                    duration: None,
                    end_time_utc: Some("2026-01-01T05:00:00Z".into()),
                    ..port(22)
                },
                format!("{f}.endTimeUtc"),
            ),
            (
                InitiatePortInput {
                    duration: None,
                    end_time_utc: Some("tomorrow".into()),
                    ..port(22)
                },
                format!("{f}.endTimeUtc"),
            ),
            (
                InitiatePortInput {
                    allowed_source_address_prefix: Some("10.0.0.5/24".into()),
                    ..port(22)
                },
                format!("{f}.allowedSourceAddressPrefix"),
            ),
        ];
        for (input, field) in cases {
            assert_eq!(
                field_of(plan_initiate(&ctx(&p), &one(input.clone()), &yes)),
                field,
                "{input:?}"
            );
        }
        let mut dup = one(port(22));
        dup.virtual_machines.as_mut().unwrap()[0]
            .ports
            .as_mut()
            .unwrap()
            .push(port(22));
        assert_eq!(
            field_of(plan_initiate(&ctx(&p), &dup, &yes)),
            "virtualMachines[0].ports[1].number"
        );
        let mut other = one(port(22));
        other.virtual_machines.as_mut().unwrap()[0].id = Some(vm_id("vm2"));
        assert_eq!(
            field_of(plan_initiate(&ctx(&p), &other, &yes)),
            "virtualMachines[0].id"
        );
        let empty = InitiateInput {
            virtual_machines: Some(vec![]),
            justification: None,
        };
        assert_eq!(
            field_of(plan_initiate(&ctx(&p), &empty, &yes)),
            "virtualMachines"
        );
    }

    #[test]
    fn forbidden_vm_is_reported_before_anything_else() {
        let p = policy("*", "PT3H");
        let r = plan_initiate(&ctx(&p), &one(port(8080)), &|_: &VmId| false);
        assert!(matches!(r, Err(InitiateError::Forbidden { .. })));
    }

    #[test]
    fn end_time_is_capped_at_the_maximum() {
        let p = policy("*", "PT3H");
        let i = InitiatePortInput {
            duration: None,
            end_time_utc: Some("2026-01-01T03:00:30Z".into()),
            ..port(22)
        };
        let plan = plan_initiate(&ctx(&p), &one(i), &yes).unwrap();
        assert_eq!(
            plan.request.vms[0].ports[0].end,
            "2026-01-01T03:00:00Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn newer_request_supersedes_same_vm_port_and_source_only() {
        let p = policy("*", "PT3H");
        let vm = VmId::parse(&vm_id("vm1")).unwrap();
        let g = |req: u128, n: i64, src: &str| LiveGrant {
            request: RequestId::new(Uuid::from_u128(req)),
            requestor: "alice".into(),
            vm: vm.clone(),
            number: Port::new(n).unwrap(),
            source: SourcePrefix::parse(src).unwrap(),
        };
        let live = vec![
            g(7, 22, "10.0.0.9"),
            g(8, 22, "10.0.0.10"),
            g(9, 3389, "10.0.0.9"),
        ];
        let plan = plan_initiate(&ctx(&p), &one(port(22)), &yes).unwrap();
        assert_eq!(
            superseded_by(&plan.request.vms, "alice", &live),
            vec![live[0].clone()]
        );
    }

    #[test]
    fn another_requestors_grant_is_never_superseded() {
        // Regression (issue 8.1): a requester could end the admin's grant by initiating
        // a short request with the admin's source address.
        let p = policy("*", "PT3H");
        let vm = VmId::parse(&vm_id("vm1")).unwrap();
        let grant = |req: u128, who: &str| LiveGrant {
            request: RequestId::new(Uuid::from_u128(req)),
            requestor: who.into(),
            vm: vm.clone(),
            number: Port::new(22).unwrap(),
            source: SourcePrefix::parse("10.0.0.9").unwrap(),
        };
        let live = vec![grant(7, "admin"), grant(8, "alice")];
        let plan = plan_initiate(&ctx(&p), &one(port(22)), &yes).unwrap();
        assert_eq!(
            superseded_by(&plan.request.vms, "alice", &live),
            vec![live[1].clone()]
        );
    }

    #[test]
    fn a_port_is_live_while_initiated_and_before_its_end() {
        let mut p = RequestPort {
            number: Port::new(22).unwrap(),
            protocol: Protocol::Tcp,
            source: SourcePrefix::Any,
            end: add_secs(now(), 60),
            status: PortStatus::Initiated,
        };
        assert!(p.is_live(now()));
        assert!(p.is_live(add_secs(now(), 59)));
        assert!(
            !p.is_live(add_secs(now(), 60)),
            "the end itself is not live"
        );
        p.status = PortStatus::Revoked(RevokeReason::UserRequested);
        assert!(!p.is_live(now()));
    }

    // ---- the revoke rule ----

    fn id(name: &str) -> VmId {
        VmId::parse(&vm_id(name)).unwrap()
    }

    fn rport(number: u16, end_in_secs: i64, status: PortStatus) -> RequestPort {
        RequestPort {
            number: Port::new(number as i64).unwrap(),
            protocol: Protocol::Tcp,
            source: SourcePrefix::Any,
            end: add_secs(now(), end_in_secs),
            status,
        }
    }

    /// alice's request: on vm1, 22 live and 3389 past its end (not yet marked); on
    /// vm2, 22 live, 80 already revoked and 443 ending exactly now.
    fn alices_request() -> AccessRequest {
        AccessRequest {
            id: RequestId::new(Uuid::from_u128(7)),
            policy_key: "k".into(),
            requestor: "alice".into(),
            justification: None,
            start: now(),
            caller_ip: "10.0.0.9".parse().unwrap(),
            vms: vec![
                RequestVm {
                    id: id("vm1"),
                    ports: vec![
                        rport(22, 600, PortStatus::Initiated),
                        rport(3389, -5, PortStatus::Initiated),
                    ],
                },
                RequestVm {
                    id: id("vm2"),
                    ports: vec![
                        rport(22, 600, PortStatus::Initiated),
                        rport(
                            80,
                            600,
                            PortStatus::Revoked(RevokeReason::NewerRequestInitiated),
                        ),
                        rport(443, 0, PortStatus::Initiated),
                    ],
                },
            ],
            approval: None,
            break_glass: None,
        }
    }

    fn sel(vm: Option<&str>, number: Option<u16>) -> RevokeSelection {
        RevokeSelection {
            vm: vm.map(id),
            number: number.map(|n| Port::new(n as i64).unwrap()),
        }
    }

    /// One revoke of alice's request: by whom, which ports, on which VMs the revoker
    /// holds the revoke right; the expected ports ended as `vm:port`, or the refusal.
    fn check_revoke(
        by: &str,
        only: RevokeSelection,
        rights: &[&str],
        expect: Result<&[&str], RevokeRefusal>,
    ) {
        let may = |vm: &VmId| rights.iter().any(|r| id(r) == *vm);
        let got = plan_revoke(&alices_request(), by, &only, &may, now()).map(|ended| {
            ended
                .iter()
                .map(|p| format!("{}:{}", p.vm.name, p.number))
                .collect::<Vec<_>>()
        });
        let expect = expect.map(|e| e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            got, expect,
            "{by} revoking {only:?} with rights on {rights:?}"
        );
    }

    #[test]
    fn the_requestor_ends_their_own_live_ports_without_any_right() {
        check_revoke("alice", sel(None, None), &[], Ok(&["vm1:22", "vm2:22"]));
        check_revoke("alice", sel(Some("vm2"), None), &[], Ok(&["vm2:22"]));
        check_revoke("alice", sel(None, Some(22)), &[], Ok(&["vm1:22", "vm2:22"]));
        check_revoke("alice", sel(Some("VM1"), Some(22)), &[], Ok(&["vm1:22"]));
    }

    #[test]
    fn ended_revoked_and_unknown_ports_are_nothing_to_revoke() {
        // Past its end but not yet marked: left to the expiry, which says Expired.
        check_revoke(
            "alice",
            sel(Some("vm1"), Some(3389)),
            &[],
            Err(RevokeRefusal::NothingLive),
        );
        // Revoked is final: not revoked again with another reason.
        check_revoke(
            "alice",
            sel(Some("vm2"), Some(80)),
            &[],
            Err(RevokeRefusal::NothingLive),
        );
        // Its end is now: no longer live.
        check_revoke(
            "alice",
            sel(None, Some(443)),
            &[],
            Err(RevokeRefusal::NothingLive),
        );
        check_revoke(
            "alice",
            sel(Some("vm3"), None),
            &[],
            Err(RevokeRefusal::NothingLive),
        );
        check_revoke(
            "alice",
            sel(None, Some(8080)),
            &[],
            Err(RevokeRefusal::NothingLive),
        );
        let mut all_dead = alices_request();
        for v in &mut all_dead.vms {
            for p in &mut v.ports {
                p.status = PortStatus::Revoked(RevokeReason::Expired);
            }
        }
        assert_eq!(
            plan_revoke(&all_dead, "alice", &RevokeSelection::default(), &yes, now()),
            Err(RevokeRefusal::NothingLive)
        );
    }

    #[test]
    fn others_need_the_right_on_every_vm_the_selection_names() {
        check_revoke(
            "bob",
            sel(None, None),
            &["vm1", "vm2"],
            Ok(&["vm1:22", "vm2:22"]),
        );
        check_revoke(
            "bob",
            sel(None, None),
            &["vm1"],
            Err(RevokeRefusal::Forbidden { vm: id("vm2") }),
        );
        check_revoke("bob", sel(Some("vm1"), None), &["vm1"], Ok(&["vm1:22"]));
        // A port number alone names every VM of the request.
        check_revoke(
            "bob",
            sel(None, Some(22)),
            &["vm2"],
            Err(RevokeRefusal::Forbidden { vm: id("vm1") }),
        );
        // The right is checked first: no right, no hint about what is live.
        check_revoke(
            "bob",
            sel(Some("vm1"), Some(3389)),
            &[],
            Err(RevokeRefusal::Forbidden { vm: id("vm1") }),
        );
        check_revoke(
            "bob",
            sel(Some("vm1"), Some(3389)),
            &["vm1"],
            Err(RevokeRefusal::NothingLive),
        );
        // The requestor's name is compared exactly.
        check_revoke(
            "Alice",
            sel(None, None),
            &[],
            Err(RevokeRefusal::Forbidden { vm: id("vm1") }),
        );
    }

    #[test]
    fn a_revoke_at_a_later_time_finds_less_live() {
        let r = alices_request();
        let later = add_secs(now(), 600);
        assert_eq!(
            plan_revoke(&r, "alice", &RevokeSelection::default(), &yes, later),
            Err(RevokeRefusal::NothingLive)
        );
        let just_before = add_secs(now(), 599);
        assert_eq!(
            plan_revoke(&r, "alice", &RevokeSelection::default(), &yes, just_before)
                .map(|v| v.len()),
            Ok(2)
        );
    }

    proptest! {
        /// Any accepted duration yields an end inside (now, now + max]; any rejected one
        /// is zero or above the maximum.
        #[test]
        fn duration_bounds(mins in 0i64..400) {
            let p = policy("*", "PT3H");
            let i = InitiatePortInput { duration: Some(format!("PT{mins}M")), ..port(22) };
            match plan_initiate(&ctx(&p), &one(i), &yes) {
                Ok(plan) => {
                    let end = plan.request.vms[0].ports[0].end;
                    prop_assert!(end > now());
                    prop_assert!(end.duration_since(now()).as_secs() <= 3 * 3600);
                    prop_assert!(mins > 0 && mins <= 180);
                }
                Err(_) => prop_assert!(mins == 0 || mins > 180),
            }
        }
    }
}
