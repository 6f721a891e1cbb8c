//! The agent protocol.
//!
//! ```text
//! agent                                   controller
//!   POST /api/v1/agent/enroll  {EnrollRequest}   -> {EnrollResponse}   (once; enroll token)
//!   GET  /api/v1/agent/desired?vm=ID&known=REV&wait=S -> {DesiredState} (long-poll)
//!   POST /api/v1/agent/status?vm=ID {StatusReport}                       (after each apply; heartbeat)
//! ```
//!
//! The desired state is the VM's whole enforcement state: its NSG rules (user rules
//! and JIT deny rules, in priority order) and its live grants with absolute end times.
//! `revision` is a hash of exactly that content, so the agent can say which state it
//! has applied and the controller answers a long-poll as soon as the state differs.
//!
//! Wire types live here and convert explicitly; the agent validates everything it
//! receives (`decode`) before it touches the kernel.

use jitgate_core::Timestamp;
use jitgate_core::gateway::{self, MappedPort, Placement};
use jitgate_core::ids::VmId;
use jitgate_core::net::{Port, Protocol, SourcePrefix};
use jitgate_core::nft;
use jitgate_core::nsg::{Access, GrantRef, NsgRule, RuleOrigin, parse_port_range};
use jitgate_core::request::RequestId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireRule {
    pub name: String,
    pub priority: u16,
    pub access: String,
    pub protocol: String,
    pub source_address_prefixes: Vec<String>,
    pub destination_port_ranges: Vec<String>,
    /// `user` or `jit-deny`.
    pub origin: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireGrant {
    pub request: String,
    pub port: u16,
    pub protocol: String,
    pub source: String,
    pub start_time_utc: String,
    pub end_time_utc: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    pub vm: String,
    pub revision: String,
    pub generated_at: String,
    pub rules: Vec<WireRule>,
    /// Every live grant; in a delta, only the grants added since `base`.
    pub grants: Vec<WireGrant>,
    /// Set in a delta (asked for with `delta=1`): the revision it changes, which is
    /// the agent's `known` one. The state is then `base`'s grants without `removed`,
    /// with `grants`; `rules` are always whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// In a delta, the grants removed since `base`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<WireGrant>,
    /// Set for a machine behind a gateway: where it sits. Its gateway enforces the
    /// state; the machine runs no agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<WireGateway>,
    /// The agent protocol this state needs (see [`AGENT_PROTOCOL`]); absent: 1. An
    /// agent that speaks less refuses the state, keeps the one it enforces, and says
    /// so, rather than enforce a state whose newer parts it would silently ignore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<u32>,
}

/// The agent protocol this build speaks: 1 is desired states with rules and grants
/// (and deltas), 2 adds `gateway` (gateway mode), 3 reads revisions of scheme 2
/// ([`revision_of_digest`]). An agent sends it in its reports and its long-polls
/// (`protocol=`); a state says in `requires` what it needs.
pub const AGENT_PROTOCOL: u32 = 3;

/// How long a client (the agent, the command line) keeps an idle connection to the
/// controller for its next request. The controller closes a connection that sends no
/// request for 15 s (its header-read timeout); a request sent on a connection just as
/// it closes fails with "peer closed connection" (`agent upgrade` did, when hashing
/// the binary it had took longer than that between its two requests), so clients let
/// an idle connection go before. Longer than the agent's 10 s between status reports,
/// which then keep reusing their connection instead of opening one each time.
pub const CLIENT_POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(12);

/// [`AGENT_PROTOCOL`] as a long-poll's `protocol=` value.
pub const AGENT_PROTOCOL_PARAM: &str = "3";
const _: () = assert!(
    AGENT_PROTOCOL < 10 && AGENT_PROTOCOL_PARAM.as_bytes()[0] == b'0' + AGENT_PROTOCOL as u8
);

/// True when version `agent` (`1.2.3`, maybe followed by a note) is older than
/// `ours`; None when either is not `major.minor.patch`.
pub fn older_version(agent: &str, ours: &str) -> Option<bool> {
    fn parse(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.split_whitespace().next()?.split(['-', '+']).next()?;
        let mut it = core.split('.').map(|n| n.parse::<u64>().ok());
        let v = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }
    Some(parse(agent)? < parse(ours)?)
}

/// The architecture of this build as Debian names it: the controller serves its own
/// binary as `/download/jitgate-linux-<ARCH>`.
pub const ARCH: &str = if cfg!(target_arch = "x86_64") {
    "amd64"
} else if cfg!(target_arch = "aarch64") {
    "arm64"
} else {
    "unknown"
};

/// Where a controller serves its binary for this architecture (the checksum at the
/// same path with `.sha256`).
pub fn binary_path() -> String {
    format!("/download/jitgate-linux-{ARCH}")
}

/// What a state with this content needs of the agent.
pub fn requires_for(gateway: Option<&WireGateway>) -> Option<u32> {
    gateway.map(|_| 2)
}

/// Refuses a state this agent cannot fully enforce, saying what to do.
fn check_protocol(d: &DesiredState) -> Result<(), String> {
    match d.requires {
        Some(n) if n > AGENT_PROTOCOL => Err(format!(
            "requires: the controller sends a state for agent protocol {n}; this agent ({}) speaks {AGENT_PROTOCOL}: upgrade it (jitgate agent upgrade)",
            env!("CARGO_PKG_VERSION")
        )),
        _ => Ok(()),
    }
}

/// Where a machine behind a gateway sits (see `jitgate_core::gateway`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireGateway {
    /// The machine's private address.
    pub address: String,
    /// `routed` or `dnat`.
    pub mode: String,
    #[serde(default)]
    pub masquerade: bool,
    /// DNAT: the gateway's public address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip_address: Option<String>,
    /// DNAT: the gateway's port for each protected port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mapped_ports: Vec<WireMappedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireMappedPort {
    pub number: u16,
    pub mapped_port: u16,
}

impl WireGateway {
    pub fn from_placement(p: &Placement) -> WireGateway {
        WireGateway {
            address: p.address.to_string(),
            mode: p.mode.as_str().to_owned(),
            masquerade: p.masquerade,
            public_ip_address: p.public.map(|a| a.to_string()),
            mapped_ports: p
                .mapped
                .iter()
                .map(|m| WireMappedPort {
                    number: m.port.get(),
                    mapped_port: m.mapped.get(),
                })
                .collect(),
        }
    }

    /// Validates it, naming the bad field.
    pub fn to_placement(&self) -> Result<Placement, String> {
        let f = |what: &str, e: String| format!("gateway.{what}: {e}");
        let address: IpAddr = self.address.parse().map_err(|_| {
            f(
                "address",
                format!("'{}' is not an IP address", self.address),
            )
        })?;
        let public = match &self.public_ip_address {
            None => None,
            Some(a) => Some(
                a.parse::<IpAddr>()
                    .map_err(|_| f("publicIpAddress", format!("'{a}' is not an IP address")))?,
            ),
        };
        let mut mapped = Vec::with_capacity(self.mapped_ports.len());
        for (i, m) in self.mapped_ports.iter().enumerate() {
            mapped.push(MappedPort {
                port: Port::new(i64::from(m.number))
                    .map_err(|e| f(&format!("mappedPorts[{i}].number"), e))?,
                mapped: Port::new(i64::from(m.mapped_port))
                    .map_err(|e| f(&format!("mappedPorts[{i}].mappedPort"), e))?,
            });
        }
        let p = Placement {
            address,
            mode: gateway::Mode::parse(&self.mode).map_err(|e| f("mode", e))?,
            masquerade: self.masquerade,
            public,
            mapped,
        };
        p.validate().map_err(|e| format!("gateway: {e}"))?;
        Ok(p)
    }
}

/// The validated content of a desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub vm: VmId,
    pub revision: String,
    /// User and JIT deny rules, by priority.
    pub rules: Vec<NsgRule>,
    pub grants: Grants,
    /// Set for a machine behind a gateway.
    pub gateway: Option<Placement>,
    /// The digest of `grants` ([`GrantDigest::of`]), kept up to date by
    /// [`apply_delta`] in the time of the change.
    pub digest: GrantDigest,
}

/// A machine's grants, in order: a persistent sorted set, so that a state made from
/// another by a delta shares all but the tree nodes the change touched (applying a
/// delta to a state of 100,000 grants costs the change, not a copy).
pub type Grants = imbl::OrdSet<GrantRef>;

/// An order-free digest of a set of grants: the sum, modulo 2^256, of the SHA-256 of
/// each grant's [`grant_line`]. Adding or removing a grant costs one hash whatever the
/// size of the set, so the revision of a state with 100,000 grants is recomputed in
/// the time of what changed (revision 2, [`revision_of_digest`]).
///
/// The revision is a consistency check between an agent and the controller it is
/// authenticated to, not a proof of origin: each line holds a request id the
/// controller chose at random, so nobody picks the values being summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GrantDigest([u64; 4]);

impl GrantDigest {
    /// The digest of these grants.
    pub fn of<'a>(grants: impl IntoIterator<Item = &'a GrantRef>) -> Self {
        let mut d = GrantDigest::default();
        for g in grants {
            d.add(g);
        }
        d
    }

    fn limbs(line: &[u8]) -> [u64; 4] {
        let h = Sha256::digest(line);
        let mut out = [0u64; 4];
        for (i, chunk) in h.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            out[i] = u64::from_le_bytes(b);
        }
        out
    }

    pub fn add(&mut self, g: &GrantRef) {
        self.add_line(&grant_line(g));
    }

    pub fn remove(&mut self, g: &GrantRef) {
        self.remove_line(&grant_line(g));
    }

    /// Adds a grant given as its [`grant_line`] (the JSON of its wire form, as sent).
    pub fn add_line(&mut self, line: &[u8]) {
        self.combine(Self::limbs(line), u64::overflowing_add);
    }

    pub fn remove_line(&mut self, line: &[u8]) {
        self.combine(Self::limbs(line), u64::overflowing_sub);
    }

    /// Adds or subtracts (by `op`) a 256-bit number, limb by limb with the carry or
    /// borrow, modulo 2^256.
    fn combine(&mut self, x: [u64; 4], op: fn(u64, u64) -> (u64, bool)) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(x) {
            let (s1, c1) = op(*a, b);
            let (s2, c2) = op(s1, u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, l) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
        }
        out
    }
}

fn rule_to_wire(r: &NsgRule) -> Option<WireRule> {
    let origin = match &r.origin {
        RuleOrigin::User => "user",
        RuleOrigin::JitDeny { .. } => "jit-deny",
        RuleOrigin::JitAllow { .. } => return None,
    };
    Some(WireRule {
        name: r.name.clone(),
        priority: r.priority,
        access: r.access.as_str().to_owned(),
        protocol: r.protocol.as_str().to_owned(),
        source_address_prefixes: r.sources.iter().map(|s| s.to_string()).collect(),
        destination_port_ranges: r.ports.iter().map(|p| p.to_string()).collect(),
        origin: origin.to_owned(),
        description: r.description.clone(),
    })
}

fn revision_of(
    vm: &str,
    gateway: Option<&WireGateway>,
    rules: &[WireRule],
    grants: &[WireGrant],
) -> String {
    revision_of_lines(vm, gateway, rules, grants.iter().map(wire_line))
}

/// A grant received, as it enters the revision: the JSON of its wire form as sent.
fn wire_line(g: &WireGrant) -> Vec<u8> {
    serde_json::to_vec(g).unwrap_or_default()
}

/// A grant as it enters the revision: the JSON of its wire form. A controller that
/// keeps a VM's grants keeps their lines too, and hashes a new state without
/// formatting the grants that stayed.
pub fn grant_line(g: &GrantRef) -> Vec<u8> {
    serde_json::to_vec(&grant_to_wire(g)).unwrap_or_default()
}

/// The revision of the state of `vm` with its placement behind a gateway, if any, and
/// these rules and grants (given as [`grant_line`]s, in order): what [`encode`]
/// computes. A machine without a gateway hashes as it did before gateways existed,
/// so states saved then still match.
pub fn revision_of_lines(
    vm: &str,
    gateway: Option<&WireGateway>,
    rules: &[WireRule],
    grant_lines: impl IntoIterator<Item = impl AsRef<[u8]>>,
) -> String {
    let mut h = Sha256::new();
    h.update(vm.to_ascii_lowercase().as_bytes());
    if let Some(g) = gateway {
        h.update(b"\ngateway ");
        h.update(serde_json::to_vec(g).unwrap_or_default());
    }
    for r in rules {
        // serde_json output of these plain structs is deterministic (field order).
        h.update(serde_json::to_vec(r).unwrap_or_default());
        h.update(b"\n");
    }
    for g in grant_lines {
        h.update(g.as_ref());
        h.update(b"\n");
    }
    hex::encode(&h.finalize()[..16])
}

/// The revision (scheme 2) of the state of `vm` with its placement behind a gateway,
/// if any, and these rules and grants (given by their [`GrantDigest`]): what
/// [`encode`] computes, in the time of the rules whatever the number of grants.
/// Scheme 1 ([`revision_of_lines`], an ordered hash of every grant) is still what a
/// controller sends to an agent that does not say it speaks protocol 3, and is still
/// accepted by [`decode`] and [`revision_matches`].
pub fn revision_of_digest(
    vm: &str,
    gateway: Option<&WireGateway>,
    rules: &[WireRule],
    digest: &GrantDigest,
) -> String {
    let mut h = Sha256::new();
    h.update(b"jitgate revision 2\n");
    h.update(vm.to_ascii_lowercase().as_bytes());
    if let Some(g) = gateway {
        h.update(b"\ngateway ");
        h.update(serde_json::to_vec(g).unwrap_or_default());
    }
    for r in rules {
        h.update(b"\n");
        h.update(serde_json::to_vec(r).unwrap_or_default());
    }
    h.update(b"\ngrants ");
    h.update(digest.bytes());
    hex::encode(&h.finalize()[..16])
}

/// The rules of a desired state on the wire (JIT allow rules travel as grants).
pub fn rules_to_wire(nsg: &[NsgRule]) -> Vec<WireRule> {
    nsg.iter().filter_map(rule_to_wire).collect()
}

/// Builds the desired state of `vm` from its NSG view (JIT allow rules are carried as
/// grants instead), live grants and placement behind a gateway.
pub fn encode<'a>(
    vm: &VmId,
    gateway: Option<&Placement>,
    nsg: &[NsgRule],
    grants: impl IntoIterator<Item = &'a GrantRef>,
    now: Timestamp,
) -> DesiredState {
    let rules = rules_to_wire(nsg);
    let mut digest = GrantDigest::default();
    let grants: Vec<WireGrant> = grants
        .into_iter()
        .map(|g| {
            digest.add(g);
            grant_to_wire(g)
        })
        .collect();
    let gateway = gateway.map(WireGateway::from_placement);
    let vm_text = vm.to_string();
    DesiredState {
        revision: revision_of_digest(&vm_text, gateway.as_ref(), &rules, &digest),
        vm: vm_text,
        generated_at: now.to_string(),
        rules,
        grants,
        base: None,
        removed: Vec::new(),
        requires: requires_for(gateway.as_ref()),
        gateway,
    }
}

/// A grant on the wire.
pub fn grant_to_wire(g: &GrantRef) -> WireGrant {
    WireGrant {
        request: g.request.to_string(),
        port: g.number.get(),
        protocol: g.protocol.as_str().to_owned(),
        source: g.source.to_string(),
        start_time_utc: g.start.to_string(),
        end_time_utc: g.end.to_string(),
    }
}

/// The delta from a state whose grants were `old` (revision `base`) to `to`, whose
/// grants are `new` (`to.grants` is not read: it may be left empty): what changed,
/// so its size does not grow with the grants that stayed. Only the parts of the sets
/// that are not shared are visited (two states made from one another differ by a few
/// tree nodes).
pub fn delta_between(base: &str, old: &Grants, new: &Grants, to: &DesiredState) -> DesiredState {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for item in old.diff(new) {
        match item {
            imbl::ordset::DiffItem::Add(g) => added.push(grant_to_wire(g)),
            imbl::ordset::DiffItem::Remove(g) => removed.push(grant_to_wire(g)),
        }
    }
    delta_with(base, added, removed, to)
}

/// The delta from the state of revision `base` to `to`, given what it adds and
/// removes (a controller that knows what changed need not walk both lists).
pub fn delta_of(
    base: &str,
    added: &[GrantRef],
    removed: &[GrantRef],
    to: &DesiredState,
) -> DesiredState {
    delta_with(
        base,
        added.iter().map(grant_to_wire).collect(),
        removed.iter().map(grant_to_wire).collect(),
        to,
    )
}

fn delta_with(
    base: &str,
    added: Vec<WireGrant>,
    removed: Vec<WireGrant>,
    to: &DesiredState,
) -> DesiredState {
    DesiredState {
        vm: to.vm.clone(),
        revision: to.revision.clone(),
        generated_at: to.generated_at.clone(),
        rules: to.rules.clone(),
        grants: added,
        base: Some(base.to_owned()),
        removed,
        gateway: to.gateway.clone(),
        requires: to.requires,
    }
}

/// The state `delta` leads to from `prev`, validated like [`decode`] validates a whole
/// state. The delta must change `prev` (its `base` is `prev`'s revision), every grant
/// it removes must be in `prev` and none it adds may be.
///
/// The new revision is taken as sent; checking it means hashing the whole state,
/// which the agent does off the path of the change ([`revision_matches`]) and, on a
/// mismatch, asks for the whole state.
pub fn apply_delta(prev: &Desired, d: &DesiredState) -> Result<Desired, String> {
    apply_delta_parts(prev, d).map(|a| a.state)
}

/// A delta applied: the state it leads to, and the grants it added and removed
/// (sorted), so that enforcing it need not compare every grant again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaApplied {
    pub state: Desired,
    pub added: Vec<GrantRef>,
    pub removed: Vec<GrantRef>,
}

/// [`apply_delta`], with what it added and removed.
pub fn apply_delta_parts(prev: &Desired, d: &DesiredState) -> Result<DeltaApplied, String> {
    check_protocol(d)?;
    if d.base.as_deref() != Some(prev.revision.as_str()) {
        return Err(format!(
            "base: the delta changes revision {}, not the applied {}",
            d.base.as_deref().unwrap_or("(none)"),
            prev.revision
        ));
    }
    let vm = VmId::parse(&d.vm).map_err(|e| format!("vm: {e}"))?;
    if vm != prev.vm {
        return Err(format!("vm: the delta is for {vm}, not {}", prev.vm));
    }
    if !valid_revision(&d.revision) {
        return Err("revision: not 32 hexadecimal digits".to_owned());
    }
    let rules = decode_rules(&d.rules)?;
    let mut removed = decode_grants("removed", &d.removed)?;
    let mut added = decode_grants("grants", &d.grants)?;
    removed.sort_unstable();
    added.sort_unstable();
    // The digest follows the lines as sent (a grant sent in another spelling than
    // the one it was added with leaves a digest that matches no revision: the agent
    // then asks for the whole state).
    let mut digest = prev.digest;
    for g in &d.removed {
        digest.remove_line(&wire_line(g));
    }
    for g in &d.grants {
        digest.add_line(&wire_line(g));
    }
    // `prev`'s set, shared, changed in the time of the change.
    let mut grants = prev.grants.clone();
    for g in &removed {
        if grants.remove(g).is_none() {
            return Err("removed: a grant that the applied state does not hold".to_owned());
        }
    }
    for g in &added {
        if grants.insert(g.clone()).is_some() {
            return Err("grants: a grant that the applied state already holds".to_owned());
        }
    }
    Ok(DeltaApplied {
        state: Desired {
            vm,
            revision: d.revision.clone(),
            rules,
            grants,
            gateway: decode_gateway(d)?,
            digest,
        },
        added,
        removed,
    })
}

/// Whether `d`'s revision is the hash of its content, as the controller computes it:
/// scheme 2 from the kept digest (no grant is hashed), else scheme 1 (every grant).
pub fn revision_matches(d: &Desired, now: Timestamp) -> bool {
    let wire = encode(&d.vm, d.gateway.as_ref(), &d.rules, &[], now);
    revision_of_digest(&wire.vm, wire.gateway.as_ref(), &wire.rules, &d.digest) == d.revision
        || revision_of_lines(
            &wire.vm,
            wire.gateway.as_ref(),
            &wire.rules,
            d.grants.iter().map(grant_line),
        ) == d.revision
}

fn valid_revision(r: &str) -> bool {
    r.len() == 32 && r.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Validates a received desired state. Nothing half-valid gets through: any bad field
/// rejects the whole state, naming it. The rules of a decoded state always pass
/// [`jitgate_core::nft::validate`].
pub fn decode(d: &DesiredState) -> Result<Desired, String> {
    check_protocol(d)?;
    if d.base.is_some() {
        return Err(
            "base: a delta is applied to the state it changes, not decoded alone".to_owned(),
        );
    }
    let vm = VmId::parse(&d.vm).map_err(|e| format!("vm: {e}"))?;
    let mut digest = GrantDigest::default();
    for g in &d.grants {
        digest.add_line(&wire_line(g));
    }
    // Scheme 2, or scheme 1 from a controller (or a saved state) older than it.
    if revision_of_digest(&d.vm, d.gateway.as_ref(), &d.rules, &digest) != d.revision
        && revision_of(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants) != d.revision
    {
        return Err(
            "revision: does not match the content (corrupted or tampered state)".to_owned(),
        );
    }
    Ok(Desired {
        vm,
        revision: d.revision.clone(),
        rules: decode_rules(&d.rules)?,
        grants: decode_grants("grants", &d.grants)?.into_iter().collect(),
        gateway: decode_gateway(d)?,
        digest,
    })
}

fn decode_gateway(d: &DesiredState) -> Result<Option<Placement>, String> {
    d.gateway
        .as_ref()
        .map(WireGateway::to_placement)
        .transpose()
}

fn decode_rules(wire: &[WireRule]) -> Result<Vec<NsgRule>, String> {
    let mut rules = Vec::with_capacity(wire.len());
    for (i, r) in wire.iter().enumerate() {
        let f = |what: &str, e: String| format!("rules[{i}].{what}: {e}");
        let origin = match r.origin.as_str() {
            "user" => RuleOrigin::User,
            "jit-deny" => RuleOrigin::JitDeny {
                policy: String::new(),
            },
            other => return Err(f("origin", format!("'{other}' is not user or jit-deny"))),
        };
        let access = match r.access.as_str() {
            "Allow" => Access::Allow,
            "Deny" => Access::Deny,
            other => return Err(f("access", format!("'{other}' is not Allow or Deny"))),
        };
        let sources = r
            .source_address_prefixes
            .iter()
            .map(|s| SourcePrefix::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| f("sourceAddressPrefixes", e))?;
        let ports = r
            .destination_port_ranges
            .iter()
            .map(|s| parse_port_range(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| f("destinationPortRanges", e))?;
        let rule = NsgRule {
            name: r.name.clone(),
            priority: r.priority,
            access,
            protocol: Protocol::parse(&r.protocol).map_err(|e| f("protocol", e))?,
            sources,
            ports,
            description: r.description.clone(),
            origin,
        };
        // What the renderer relies on (a name, a priority in range, ports, sources).
        nft::validate(std::slice::from_ref(&rule)).map_err(|e| format!("rules[{i}]: {e}"))?;
        rules.push(rule);
    }
    for w in rules.windows(2) {
        if w[0].priority >= w[1].priority {
            return Err(format!(
                "rules: priorities must be unique and ascending ({} then {})",
                w[0].priority, w[1].priority
            ));
        }
    }
    // The whole set too, so that a decoded state is one the agent can render.
    nft::validate(&rules).map_err(|e| format!("rules: {e}"))?;
    Ok(rules)
}

fn decode_grants(field: &str, wire: &[WireGrant]) -> Result<Vec<GrantRef>, String> {
    let mut grants = Vec::with_capacity(wire.len());
    for (i, g) in wire.iter().enumerate() {
        let f = |what: &str, e: String| format!("{field}[{i}].{what}: {e}");
        let start: Timestamp = g
            .start_time_utc
            .parse()
            .map_err(|e| f("startTimeUtc", format!("{e}")))?;
        let end: Timestamp = g
            .end_time_utc
            .parse()
            .map_err(|e| f("endTimeUtc", format!("{e}")))?;
        grants.push(GrantRef {
            request: RequestId::parse(&g.request).map_err(|e| f("request", e))?,
            number: Port::new(g.port as i64).map_err(|e| f("port", e))?,
            protocol: Protocol::parse(&g.protocol).map_err(|e| f("protocol", e))?,
            source: SourcePrefix::parse(&g.source).map_err(|e| f("source", e))?,
            start,
            end,
        });
    }
    Ok(grants)
}

/// A secret (a token): its `Debug` never shows it, so it cannot reach a log through a
/// `{:?}` of the struct that holds it. On the wire it is the plain string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must send or check it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    #[schema(value_type = String)]
    pub enroll_token: Secret,
    pub resource_group: String,
    pub name: String,
    #[serde(default)]
    pub location: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub vm_id: String,
    pub subscription: String,
    /// The agent's own credential, usable for its VM only.
    #[schema(value_type = String)]
    pub token: Secret,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireListener {
    pub protocol: String,
    pub family: String,
    pub address: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireCounter {
    pub rule: String,
    pub port: u16,
    pub protocol: String,
    /// Packets dropped by the rule since the table was last (re)built.
    pub packets: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    #[serde(default)]
    pub applied_revision: Option<String>,
    #[serde(default)]
    pub applied_at: Option<String>,
    #[serde(default)]
    pub nft_version: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub agent_version: Option<String>,
    /// The agent protocol it speaks ([`AGENT_PROTOCOL`]; absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub listening: Vec<WireListener>,
    /// What the agent could not read about the host (a `/proc/net` file that cannot
    /// be read or does not parse), one sentence each: `listening` may be incomplete.
    /// Kept apart from `error`, which says that enforcement failed.
    #[serde(default)]
    pub inventory_errors: Vec<String>,
    #[serde(default)]
    pub counters: Vec<WireCounter>,
    /// False while the agent has found its table changed outside jitgate and not yet
    /// confirmed it matches what it applied (absent: no check has run).
    #[serde(default)]
    pub table_matches: Option<bool>,
    /// Drifts found since the agent started.
    #[serde(default)]
    pub drift_events: u64,
    /// The newest drift found.
    #[serde(default)]
    pub last_drift: Option<WireDrift>,
}

/// A change to `table inet jitgate` made outside jitgate, as the agent found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireDrift {
    pub detected_at: String,
    /// What differed, one line each (bounded by the agent and again by the controller).
    pub changes: Vec<String>,
    /// The agent rebuilt the table after finding it.
    pub repaired: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use jitgate_core::duration::MaxDuration;
    use jitgate_core::ids::{Location, PolicyName, ResourceGroup, SubscriptionId, VmName};
    use jitgate_core::net::PortRange;
    use jitgate_core::nsg::{UserRuleInput, nsg_view, validate_user_rule};
    use jitgate_core::policy::{AllowedSources, PolicyKey, PolicyVm, PortRule};
    use proptest::prelude::*;
    use serde_json::Value;

    fn vm() -> VmId {
        VmId::new(
            SubscriptionId::parse("20ff7fc3-e762-44dd-bd96-b71116dcdc23").unwrap(),
            ResourceGroup::parse("rg").unwrap(),
            VmName::parse("vm1").unwrap(),
        )
    }

    #[test]
    fn versions_compare_by_number() {
        assert_eq!(older_version("0.1.0", "0.2.0"), Some(true));
        assert_eq!(older_version("0.1.0 (gateway)", "0.1.0"), Some(false));
        assert_eq!(older_version("0.10.0", "0.9.9"), Some(false));
        assert_eq!(older_version("1.0.0-rc.1", "1.0.1"), Some(true));
        assert_eq!(older_version("banana", "0.1.0"), None);
        assert_eq!(older_version("1.2", "0.1.0"), None);
    }

    /// Issue 17: a state needing a newer agent protocol is refused, saying what to do;
    /// one this agent speaks decodes, and a gateway's placement needs protocol 2.
    #[test]
    fn a_state_for_a_newer_agent_is_refused_with_advice() {
        let mut d = sample();
        assert_eq!(d.requires, None);
        assert!(decode(&d).is_ok());
        d.requires = Some(AGENT_PROTOCOL);
        assert!(decode(&d).is_ok());
        d.requires = Some(AGENT_PROTOCOL + 1);
        let e = decode(&d).unwrap_err();
        assert!(
            e.starts_with("requires:") && e.contains("jitgate agent upgrade"),
            "{e}"
        );
        let prev = decode(&sample()).unwrap();
        let mut delta = sample();
        delta.base = Some(prev.revision.clone());
        delta.requires = Some(AGENT_PROTOCOL + 1);
        assert!(
            apply_delta(&prev, &delta)
                .unwrap_err()
                .starts_with("requires:")
        );
        let gw = WireGateway {
            address: "10.0.0.5".into(),
            mode: "routed".into(),
            masquerade: false,
            public_ip_address: None,
            mapped_ports: Vec::new(),
        };
        assert_eq!(requires_for(Some(&gw)), Some(2));
        assert!(requires_for(Some(&gw)) <= Some(AGENT_PROTOCOL));
    }

    fn grant_n(n: u128, port: i64) -> GrantRef {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        GrantRef {
            request: RequestId::parse(&format!("00000000-0000-4000-8000-{n:012}")).unwrap(),
            number: Port::new(port).unwrap(),
            protocol: Protocol::Tcp,
            source: SourcePrefix::parse(&format!("10.0.{}.{}", n / 250, n % 250)).unwrap(),
            start: t,
            end: t
                .checked_add(jiff::SignedDuration::from_secs(3600))
                .unwrap(),
        }
    }

    proptest! {
        /// The digest of a set is the same whatever the order grants were added in,
        /// and adding then removing a grant leaves it as it was (carries and borrows
        /// across all four limbs included).
        #[test]
        fn the_digest_is_of_the_set_not_the_history(
            ids in proptest::collection::vec(0u128..2000, 0..40),
            gone in proptest::collection::vec(any::<proptest::sample::Index>(), 0..10),
        ) {
            let set: Vec<GrantRef> = ids.iter().map(|n| grant_n(*n, 22)).collect();
            let mut forward = GrantDigest::default();
            for g in &set {
                forward.add(g);
            }
            prop_assert_eq!(forward, GrantDigest::of(set.iter().rev()));
            let mut d = forward;
            let mut left = set.clone();
            for i in &gone {
                if left.is_empty() {
                    break;
                }
                let g = left.remove(i.index(left.len()));
                d.remove(&g);
            }
            prop_assert_eq!(d, GrantDigest::of(&left));
            for g in &left {
                d.remove(g);
            }
            prop_assert_eq!(d, GrantDigest::default());
        }
    }

    /// Issue 15: revisions of scheme 2 follow deltas in the time of the change; a state
    /// decodes with a revision of either scheme, and with no other.
    #[test]
    fn revisions_of_both_schemes_name_the_same_content() {
        let d = sample();
        let grants = decode(&d).unwrap().grants;
        let (rules, gw) = (d.rules.clone(), d.gateway.clone());
        let v2 = revision_of_digest(&d.vm, gw.as_ref(), &rules, &GrantDigest::of(&grants));
        let v1 = revision_of_lines(&d.vm, gw.as_ref(), &rules, grants.iter().map(grant_line));
        assert_eq!(d.revision, v2, "encode computes scheme 2");
        assert_ne!(v1, v2);
        for rev in [&v1, &v2] {
            let s = DesiredState {
                revision: rev.clone(),
                ..d.clone()
            };
            let got = decode(&s).unwrap();
            assert!(revision_matches(&got, Timestamp::UNIX_EPOCH));
        }
        let bad = DesiredState {
            revision: "0".repeat(32),
            ..d.clone()
        };
        assert!(decode(&bad).unwrap_err().starts_with("revision:"));

        // A delta adding and removing grants: the digest follows, and the result's
        // scheme-2 revision matches without hashing the grants that stayed.
        let prev = decode(&d).unwrap();
        let added = grant_n(7, 3389);
        let mut next_grants: Vec<GrantRef> = prev.grants.iter().skip(1).cloned().collect();
        next_grants.push(added.clone());
        next_grants.sort_unstable();
        let to = DesiredState {
            revision: revision_of_digest(
                &d.vm,
                gw.as_ref(),
                &rules,
                &GrantDigest::of(&next_grants),
            ),
            ..d.clone()
        };
        let next_set: Grants = next_grants.iter().cloned().collect();
        let delta = delta_between(&prev.revision, &prev.grants, &next_set, &to);
        let applied = apply_delta(&prev, &delta).unwrap();
        assert_eq!(applied.digest, GrantDigest::of(&next_grants));
        assert!(revision_matches(&applied, Timestamp::UNIX_EPOCH));
        let mut wrong = applied.clone();
        wrong.digest.add(&added);
        assert!(!revision_matches(&wrong, Timestamp::UNIX_EPOCH));
    }

    fn sample() -> DesiredState {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let rules = vec![
            NsgRule {
                name: "corp".into(),
                priority: 200,
                access: Access::Allow,
                protocol: Protocol::Tcp,
                sources: vec![SourcePrefix::parse("10.0.0.0/8").unwrap()],
                ports: vec![PortRange::single(Port::new(443).unwrap())],
                description: String::new(),
                origin: RuleOrigin::User,
            },
            NsgRule {
                name: "JIT-Deny-default-22".into(),
                priority: 1000,
                access: Access::Deny,
                protocol: Protocol::Tcp,
                sources: vec![SourcePrefix::Any],
                ports: vec![PortRange::single(Port::new(22).unwrap())],
                description: String::new(),
                origin: RuleOrigin::JitDeny { policy: "p".into() },
            },
        ];
        let grants = vec![GrantRef {
            request: RequestId::parse("00000000-0000-0000-0000-000000000001").unwrap(),
            number: Port::new(22).unwrap(),
            protocol: Protocol::Tcp,
            source: SourcePrefix::parse("10.1.1.1").unwrap(),
            start: t,
            end: t
                .checked_add(jiff::SignedDuration::from_secs(3600))
                .unwrap(),
        }];
        encode(&vm(), None, &rules, &grants, t)
    }

    /// A pool of grants for the delta tests: three requests, two ports, two sources.
    fn pool() -> Vec<GrantRef> {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut out = Vec::new();
        for r in 1..=3u8 {
            for port in [22, 3389] {
                for src in ["10.1.1.1", "2001:db8::/64"] {
                    out.push(GrantRef {
                        request: RequestId::parse(&format!(
                            "00000000-0000-0000-0000-00000000000{r}"
                        ))
                        .unwrap(),
                        number: Port::new(port).unwrap(),
                        protocol: Protocol::Tcp,
                        source: SourcePrefix::parse(src).unwrap(),
                        start: t,
                        end: t
                            .checked_add(jiff::SignedDuration::from_secs(60 * r as i64))
                            .unwrap(),
                    });
                }
            }
        }
        out.sort_unstable();
        out
    }

    fn pick(mask: u16) -> Vec<GrantRef> {
        pool()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, g)| g)
            .collect()
    }

    proptest! {
        /// Any change from any state: the delta applied to the old state is the new
        /// state, revision included, and carries only what changed.
        #[test]
        fn a_delta_applied_is_the_new_state(old in 0u16..4096, new in 0u16..4096) {
            let rules = decode(&sample()).unwrap().rules;
            let (old, new) = (pick(old), pick(new));
            let prev = decode(&encode(&vm(), None, &rules, &old, t0())).unwrap();
            let full = encode(&vm(), None, &rules, &new, t0());
            let prev_set: Grants = old.iter().cloned().collect();
            let next_set: Grants = new.iter().cloned().collect();
            let d = delta_between(&prev.revision, &prev_set, &next_set, &full);
            let changed = old.iter().filter(|g| !new.contains(g)).count()
                + new.iter().filter(|g| !old.contains(g)).count();
            prop_assert_eq!(d.grants.len() + d.removed.len(), changed);
            let wire: DesiredState = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
            let parts = apply_delta_parts(&prev, &wire).unwrap();
            let mut added: Vec<GrantRef> = new.iter().filter(|g| !old.contains(g)).cloned().collect();
            let mut removed: Vec<GrantRef> = old.iter().filter(|g| !new.contains(g)).cloned().collect();
            added.sort_unstable();
            removed.sort_unstable();
            prop_assert_eq!((&parts.added, &parts.removed), (&added, &removed));
            let next = parts.state;
            prop_assert_eq!(&next, &decode(&full).unwrap());
            prop_assert!(revision_matches(&next, t0()));
        }
    }

    #[test]
    fn a_delta_that_does_not_fit_the_applied_state_is_refused() {
        let rules = decode(&sample()).unwrap().rules;
        let all = pool();
        let (a, b) = (all[..4].to_vec(), all[2..6].to_vec());
        let prev = decode(&encode(&vm(), None, &rules, &a, t0())).unwrap();
        let full = encode(&vm(), None, &rules, &b, t0());
        let good = delta_between(
            &prev.revision,
            &a.iter().cloned().collect(),
            &b.iter().cloned().collect(),
            &full,
        );
        assert!(apply_delta(&prev, &good).is_ok());

        let mut other_base = good.clone();
        other_base.base = Some("f".repeat(32));
        assert!(
            apply_delta(&prev, &other_base)
                .unwrap_err()
                .starts_with("base:")
        );

        let mut absent = good.clone();
        absent
            .removed
            .push(encode(&vm(), None, &rules, &all[8..9], t0()).grants[0].clone());
        assert!(
            apply_delta(&prev, &absent)
                .unwrap_err()
                .starts_with("removed:")
        );

        let mut present = good.clone();
        present
            .grants
            .push(encode(&vm(), None, &rules, &all[2..3], t0()).grants[0].clone());
        assert!(
            apply_delta(&prev, &present)
                .unwrap_err()
                .starts_with("grants:")
        );

        let mut bad_grant = good.clone();
        bad_grant.grants[0].source = "10.0.0.1/8".into();
        assert!(
            apply_delta(&prev, &bad_grant)
                .unwrap_err()
                .starts_with("grants[0].source")
        );

        let mut bad_revision = good.clone();
        bad_revision.revision = "not-hex".into();
        assert!(
            apply_delta(&prev, &bad_revision)
                .unwrap_err()
                .starts_with("revision:")
        );

        // A wrong new revision passes here and is caught by the check made after.
        let mut lying = good.clone();
        lying.revision = "0".repeat(32);
        assert!(!revision_matches(
            &apply_delta(&prev, &lying).unwrap(),
            t0()
        ));

        assert!(
            decode(&good).unwrap_err().starts_with("base:"),
            "a delta is never a whole state"
        );
    }

    #[test]
    fn a_whole_state_carries_no_delta_fields() {
        let json = serde_json::to_value(sample()).unwrap();
        assert!(
            json.get("base").is_none() && json.get("removed").is_none(),
            "{json}"
        );
    }

    #[test]
    fn round_trips_and_revision_tracks_content() {
        let d = sample();
        let back = decode(&d).unwrap();
        assert_eq!(back.rules.len(), 2);
        assert_eq!(back.grants.len(), 1);
        let again = encode(
            &back.vm,
            None,
            &back.rules,
            &back.grants,
            "2027-01-01T00:00:00Z".parse().unwrap(),
        );
        assert_eq!(
            again.revision, d.revision,
            "generatedAt is not part of the revision"
        );
        let json = serde_json::to_string(&d).unwrap();
        let parsed: DesiredState = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, d);
    }

    #[test]
    fn bad_states_are_rejected_whole() {
        let mut d = sample();
        d.grants[0].source = "10.1.1.1/8".into();
        assert!(
            decode(&d).unwrap_err().starts_with("revision"),
            "content changed without a new revision"
        );
        let fix = |mut d: DesiredState| {
            d.revision = revision_of(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants);
            d
        };
        let e = decode(&fix(d)).unwrap_err();
        assert!(e.starts_with("grants[0].source"), "{e}");
        let mut d = sample();
        d.rules[1].priority = 200;
        assert!(decode(&fix(d)).unwrap_err().starts_with("rules:"));
        let mut d = sample();
        d.rules[0].destination_port_ranges = vec!["70000".into()];
        assert!(
            decode(&fix(d))
                .unwrap_err()
                .starts_with("rules[0].destinationPortRanges")
        );
        let mut d = sample();
        d.rules[0].origin = "jit-allow".into();
        assert!(decode(&fix(d)).unwrap_err().starts_with("rules[0].origin"));
        let mut d = sample();
        d.grants[0].end_time_utc = "tomorrow".into();
        assert!(
            decode(&fix(d))
                .unwrap_err()
                .starts_with("grants[0].endTimeUtc")
        );
    }

    // ---------------------------------------------------------------------------
    // Properties: nothing the agent decodes fails nft::validate, nothing panics,
    // and everything the controller encodes decodes.
    // ---------------------------------------------------------------------------

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    /// Strings a hostile or broken controller might send.
    fn nasty() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            any::<String>(),
            "[a-zA-Z0-9\"';{}#\n\\\\ $@-]{0,40}",
            "[a-z]{100,140}",
        ]
    }

    fn prefix_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_owned()),
            Just("10.0.0.0/8".to_owned()),
            Just("10.0.0.5/24".to_owned()),
            Just("::ffff:10.0.0.0/120".to_owned()),
            Just("::ffff:10.0.0.0/64".to_owned()),
            Just("2001:db8::/32".to_owned()),
            "[0-9a-f:./]{0,20}",
            nasty(),
        ]
    }

    fn range_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u16>().prop_map(|p| p.to_string()),
            (any::<u16>(), any::<u16>()).prop_map(|(a, b)| format!("{a}-{b}")),
            Just("70000".to_owned()),
            nasty(),
        ]
    }

    fn one_of(fixed: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(fixed).prop_map(str::to_owned),
            1 => nasty(),
        ]
    }

    fn arb_wire_rule() -> impl Strategy<Value = WireRule> {
        (
            prop_oneof!["[a-zA-Z0-9._-]{1,90}", nasty()],
            prop_oneof![any::<u16>(), 100u16..=4096],
            one_of(&["Allow", "Deny"]),
            one_of(&["TCP", "UDP", "*"]),
            prop::collection::vec(prefix_text(), 0..4),
            prop::collection::vec(range_text(), 0..4),
            one_of(&["user", "jit-deny"]),
            nasty(),
        )
            .prop_map(
                |(name, priority, access, protocol, sources, ports, origin, description)| {
                    WireRule {
                        name,
                        priority,
                        access,
                        protocol,
                        source_address_prefixes: sources,
                        destination_port_ranges: ports,
                        origin,
                        description,
                    }
                },
            )
    }

    fn arb_time() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (-100_000i64..100_000).prop_map(|s| t0()
                .checked_add(jiff::SignedDuration::from_secs(s))
                .unwrap()
                .to_string()),
            1 => nasty(),
        ]
    }

    fn arb_wire_grant() -> impl Strategy<Value = WireGrant> {
        (
            prop_oneof![
                4 => any::<u128>().prop_map(|n| uuid_of(n).to_string()),
                1 => nasty(),
            ],
            any::<u16>(),
            one_of(&["TCP", "UDP", "*"]),
            prefix_text(),
            arb_time(),
            arb_time(),
        )
            .prop_map(|(request, port, protocol, source, start, end)| WireGrant {
                request,
                port,
                protocol,
                source,
                start_time_utc: start,
                end_time_utc: end,
            })
    }

    fn uuid_of(n: u128) -> RequestId {
        RequestId::parse(&format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (n >> 96) as u32,
            (n >> 80) as u16,
            (n >> 64) as u16,
            (n >> 48) as u16,
            n & 0xffff_ffff_ffff
        ))
        .unwrap()
    }

    /// A state with random content. Most get a correct revision (else decoding stops
    /// there) and rules sorted by unique priority (else it stops at the order check).
    fn arb_state() -> impl Strategy<Value = DesiredState> {
        (
            prop_oneof![4 => Just(vm().to_string()), 1 => nasty()],
            prop::collection::vec(arb_wire_rule(), 0..6),
            prop::collection::vec(arb_wire_grant(), 0..6),
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.8),
        )
            .prop_map(|(vm, mut rules, grants, fix_revision, sort)| {
                if sort {
                    rules.sort_by_key(|r| r.priority);
                    rules.dedup_by_key(|r| r.priority);
                }
                let mut d = DesiredState {
                    revision: "0".repeat(32),
                    vm,
                    generated_at: t0().to_string(),
                    rules,
                    grants,
                    base: None,
                    removed: Vec::new(),
                    gateway: None,
                    requires: None,
                };
                if fix_revision {
                    d.revision = revision_of(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants);
                }
                d
            })
    }

    /// An error names what is wrong: `vm`, `revision`, `rules`, `rules[i]...` or
    /// `grants[i]...`.
    fn names_a_field(e: &str) -> bool {
        let Some((field, _)) = e.split_once(": ") else {
            return false;
        };
        let indexed = |head: &str| {
            field
                .strip_prefix(head)
                .and_then(|r| r.split_once(']'))
                .is_some_and(|(n, rest)| {
                    n.parse::<usize>().is_ok()
                        && (rest.is_empty()
                            || rest
                                .strip_prefix('.')
                                .is_some_and(|w| w.chars().all(|c| c.is_ascii_alphabetic())))
                })
        };
        matches!(field, "vm" | "revision" | "rules") || indexed("rules[") || indexed("grants[")
    }

    /// What must hold of any decode: an accepted state passes nft::validate, renders,
    /// and survives encode/decode unchanged; a refused one names its field.
    fn check_decode(d: &DesiredState) -> Result<(), TestCaseError> {
        match decode(d) {
            Ok(got) => {
                prop_assert_eq!(nft::validate(&got.rules), Ok(()));
                let grants: Vec<GrantRef> = got.grants.iter().cloned().collect();
                let elements = nft::plan_elements(&grants, t0());
                let script = nft::render_full(&got.rules, &elements, t0());
                prop_assert!(script.ends_with("}\n"), "{}", script);
                let again = decode(&encode(&got.vm, None, &got.rules, &got.grants, t0()));
                prop_assert!(again.is_ok(), "{:?}", again);
                let again = again.unwrap();
                prop_assert_eq!(again.rules, got.rules);
                prop_assert_eq!(again.grants, got.grants);
            }
            Err(e) => prop_assert!(names_a_field(&e), "{}", e),
        }
        Ok(())
    }

    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(&[
                "vm", "revision", "generatedAt", "rules", "grants", "name", "priority",
                "access", "protocol", "sourceAddressPrefixes", "destinationPortRanges",
                "origin", "description", "request", "port", "source", "startTimeUtc",
                "endTimeUtc",
            ][..])
            .prop_map(str::to_owned),
            1 => nasty(),
        ]
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u16>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            nasty().prop_map(Value::String),
            prefix_text().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((arb_key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Replaces the `n`th node (pre-order, modulo the node count) of `v`, or removes it
    /// from its object or array when `with` is None.
    fn mutate(v: &mut Value, n: usize, with: Option<Value>) {
        fn count(v: &Value) -> usize {
            1 + match v {
                Value::Array(a) => a.iter().map(count).sum(),
                Value::Object(o) => o.values().map(count).sum(),
                _ => 0,
            }
        }
        fn walk(v: &mut Value, n: &mut usize, with: &mut Option<Option<Value>>) {
            let children: Vec<&mut Value> = match v {
                Value::Array(a) => a.iter_mut().collect(),
                Value::Object(o) => o.values_mut().collect(),
                _ => return,
            };
            let mut remove = None;
            for (i, child) in children.into_iter().enumerate() {
                if with.is_none() {
                    return;
                }
                if *n == 0 {
                    match with.take().flatten() {
                        Some(new) => *child = new,
                        None => remove = Some(i),
                    }
                    break;
                }
                *n -= 1;
                walk(child, n, with);
            }
            if let Some(i) = remove {
                match v {
                    Value::Array(a) => {
                        a.remove(i);
                    }
                    Value::Object(o) => {
                        let key = o.keys().nth(i).cloned().unwrap();
                        o.remove(&key);
                    }
                    _ => {}
                }
            }
        }
        let total = count(v);
        let mut n = n % total;
        if n == 0 {
            if let Some(new) = with {
                *v = new;
            }
            return;
        }
        n -= 1;
        walk(v, &mut n, &mut Some(with));
    }

    /// A valid state with a few of everything, as the controller sends it.
    fn rich_sample() -> DesiredState {
        let mut d = sample();
        d.rules.push(WireRule {
            name: "web".into(),
            priority: 2000,
            access: "Deny".into(),
            protocol: "*".into(),
            source_address_prefixes: vec!["2001:db8::/32".into(), "192.0.2.7".into()],
            destination_port_ranges: vec!["80".into(), "8000-8100".into()],
            origin: "user".into(),
            description: "d".into(),
        });
        let mut g = d.grants[0].clone();
        g.source = "*".into();
        g.protocol = "*".into();
        d.grants.push(g);
        d.revision = revision_of(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants);
        d
    }

    fn arb_policy_name() -> impl Strategy<Value = PolicyName> {
        "[a-zA-Z0-9_.-]{0,89}[a-zA-Z0-9_-]".prop_map(|s| PolicyName::parse(&s).unwrap())
    }

    fn arb_canonical_prefix() -> impl Strategy<Value = SourcePrefix> {
        prop_oneof![
            1 => Just(SourcePrefix::Any),
            4 => (any::<u32>(), 0u32..=32).prop_map(|(a, len)| {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                let net = std::net::Ipv4Addr::from(a & mask);
                SourcePrefix::parse(&format!("{net}/{len}")).unwrap()
            }),
            2 => (any::<u128>(), 0u32..=128).prop_map(|(a, len)| {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                let net = std::net::Ipv6Addr::from(a & mask);
                SourcePrefix::parse(&format!("{net}/{len}")).unwrap()
            }),
        ]
    }

    fn arb_protocol() -> impl Strategy<Value = Protocol> {
        prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Any])
    }

    /// User rules as the store keeps them: valid, unique names and priorities.
    fn arb_user_rules() -> impl Strategy<Value = Vec<NsgRule>> {
        prop::collection::vec(
            (
                "[a-zA-Z0-9._-]{1,80}",
                100i64..=4096,
                any::<bool>(),
                prop::sample::select(vec!["TCP", "UDP", "*"]),
                prop::collection::vec(arb_canonical_prefix(), 1..4),
                prop::collection::vec((1u16..=65535, 0u16..100), 1..4),
                "[ -~]{0,256}",
            ),
            0..6,
        )
        .prop_map(|raw| {
            let mut out: Vec<NsgRule> = Vec::new();
            for (name, priority, allow, protocol, sources, ports, description) in raw {
                let input = UserRuleInput {
                    priority: Some(priority),
                    access: Some(if allow { "Allow" } else { "Deny" }.into()),
                    protocol: Some(protocol.into()),
                    source_address_prefixes: Some(sources.iter().map(|s| s.to_string()).collect()),
                    destination_port_ranges: Some(
                        ports
                            .iter()
                            .map(|&(a, w)| format!("{a}-{}", a.saturating_add(w)))
                            .collect(),
                    ),
                    description: Some(description),
                };
                let Ok(rule) = validate_user_rule(&name, &input) else {
                    continue; // a reserved JIT- name
                };
                if out
                    .iter()
                    .all(|r| r.priority != rule.priority && r.name != rule.name)
                {
                    out.push(rule);
                }
            }
            out
        })
    }

    fn arb_view() -> impl Strategy<Value = (Vec<NsgRule>, Vec<GrantRef>)> {
        (
            arb_policy_name(),
            arb_user_rules(),
            prop::collection::btree_map(1u16..=65535, arb_protocol(), 0..4),
            prop::collection::vec(
                (
                    any::<u128>(),
                    any::<prop::sample::Index>(),
                    arb_canonical_prefix(),
                    1i64..86_400,
                ),
                0..6,
            ),
        )
            .prop_map(|(name, user, ports, raw_grants)| {
                let key = PolicyKey {
                    subscription: vm().subscription,
                    resource_group: vm().resource_group,
                    location: Location::parse("westeurope").unwrap(),
                    name,
                };
                let pvm = PolicyVm {
                    id: vm(),
                    ports: ports
                        .iter()
                        .map(|(&n, &protocol)| PortRule {
                            number: Port::new(i64::from(n)).unwrap(),
                            protocol,
                            allowed: AllowedSources::Single(SourcePrefix::Any),
                            max_duration: MaxDuration::default_three_hours(),
                        })
                        .collect(),
                    public_ip_address: None,
                };
                let grants: Vec<GrantRef> = if pvm.ports.is_empty() {
                    Vec::new()
                } else {
                    raw_grants
                        .into_iter()
                        .map(|(n, i, source, secs)| {
                            let rule = &pvm.ports[i.index(pvm.ports.len())];
                            GrantRef {
                                request: uuid_of(n),
                                number: rule.number,
                                protocol: rule.protocol,
                                source,
                                start: t0(),
                                end: t0()
                                    .checked_add(jiff::SignedDuration::from_secs(secs))
                                    .unwrap(),
                            }
                        })
                        .collect()
                };
                let view = nsg_view(&vm(), &user, Some((&key, &pvm)), &grants);
                (view, grants)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random states: never a panic; accepted ones validate and round-trip.
        #[test]
        fn decoded_states_always_validate(d in arb_state()) {
            check_decode(&d)?;
        }

        /// Arbitrary JSON: whatever deserializes as a DesiredState decodes safely.
        #[test]
        fn arbitrary_json_never_panics(v in arb_json(), fix in any::<bool>()) {
            if let Ok(mut d) = serde_json::from_value::<DesiredState>(v) {
                if fix {
                    d.revision = revision_of(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants);
                }
                check_decode(&d)?;
            }
        }

        /// A valid state with one JSON node replaced or removed, or one byte of its
        /// text changed: never a panic, and the same guarantees.
        #[test]
        fn mutated_json_never_panics(
            node in any::<usize>(),
            with in proptest::option::of(arb_json()),
            byte in proptest::option::of((any::<prop::sample::Index>(), 0x20u8..0x7f)),
            fix in prop::bool::weighted(0.8),
        ) {
            let mut v = serde_json::to_value(rich_sample()).unwrap();
            mutate(&mut v, node, with);
            let mut text = serde_json::to_vec(&v).unwrap();
            if let Some((at, b)) = byte {
                let i = at.index(text.len());
                text[i] = b;
            }
            if let Ok(mut d) = serde_json::from_slice::<DesiredState>(&text) {
                if fix {
                    d.revision = revision_of(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants);
                }
                check_decode(&d)?;
            }
        }

        /// Everything the controller can encode (any valid policy name, user rules,
        /// protected ports and grants) the agent accepts, unchanged.
        #[test]
        fn every_encoded_view_decodes((view, grants) in arb_view()) {
            let d = encode(&vm(), None, &view, &grants, t0());
            let got = decode(&d);
            prop_assert!(got.is_ok(), "{:?}", got);
            let got = got.unwrap();
            let sent: Vec<&NsgRule> = view
                .iter()
                .filter(|r| !matches!(r.origin, RuleOrigin::JitAllow { .. }))
                .collect();
            prop_assert_eq!(got.rules.len(), sent.len());
            for (g, s) in got.rules.iter().zip(sent) {
                prop_assert_eq!(
                    (&g.name, g.priority, g.access, g.protocol, &g.sources, &g.ports, &g.description),
                    (&s.name, s.priority, s.access, s.protocol, &s.sources, &s.ports, &s.description)
                );
            }
            // Decoded grants are sorted (the order deltas are applied in).
            let mut want = grants.clone();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(got.grants.into_iter().collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn rules_the_renderer_cannot_use_are_rejected_naming_the_rule() {
        let fix = |mut d: DesiredState| {
            d.revision = revision_of(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants);
            d
        };
        type Change = fn(&mut WireRule);
        let cases: Vec<(Change, &str)> = vec![
            (|r| r.name = String::new(), "empty name"),
            (|r| r.priority = 99, "outside 100-4096"),
            (|r| r.priority = 5000, "outside 100-4096"),
            (|r| r.source_address_prefixes.clear(), "no source"),
            (|r| r.destination_port_ranges.clear(), "no destination port"),
        ];
        for (change, want) in cases {
            let mut d = sample();
            change(&mut d.rules[0]);
            let e = decode(&fix(d)).unwrap_err();
            assert!(e.starts_with("rules[0]: ") && e.contains(want), "{e}");
        }
    }
}
pub mod api;
pub mod tls;
