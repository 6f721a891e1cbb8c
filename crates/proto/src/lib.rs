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
use jitgate_core::ids::VmId;
use jitgate_core::net::{Port, Protocol, SourcePrefix};
use jitgate_core::nsg::{Access, GrantRef, NsgRule, RuleOrigin, parse_port_range};
use jitgate_core::request::RequestId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireGrant {
    pub request: String,
    pub port: u16,
    pub protocol: String,
    pub source: String,
    pub start_time_utc: String,
    pub end_time_utc: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    pub vm: String,
    pub revision: String,
    pub generated_at: String,
    pub rules: Vec<WireRule>,
    pub grants: Vec<WireGrant>,
}

/// The validated content of a desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub vm: VmId,
    pub revision: String,
    /// User and JIT deny rules, by priority.
    pub rules: Vec<NsgRule>,
    pub grants: Vec<GrantRef>,
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

fn revision_of(vm: &str, rules: &[WireRule], grants: &[WireGrant]) -> String {
    let mut h = Sha256::new();
    h.update(vm.to_ascii_lowercase().as_bytes());
    for r in rules {
        // serde_json output of these plain structs is deterministic (field order).
        h.update(serde_json::to_vec(r).unwrap_or_default());
        h.update(b"\n");
    }
    for g in grants {
        h.update(serde_json::to_vec(g).unwrap_or_default());
        h.update(b"\n");
    }
    hex::encode(&h.finalize()[..16])
}

/// Builds the desired state of `vm` from its NSG view (JIT allow rules are carried as
/// grants instead) and live grants.
pub fn encode(vm: &VmId, nsg: &[NsgRule], grants: &[GrantRef], now: Timestamp) -> DesiredState {
    let rules: Vec<WireRule> = nsg.iter().filter_map(rule_to_wire).collect();
    let grants: Vec<WireGrant> = grants
        .iter()
        .map(|g| WireGrant {
            request: g.request.to_string(),
            port: g.number.get(),
            protocol: g.protocol.as_str().to_owned(),
            source: g.source.to_string(),
            start_time_utc: g.start.to_string(),
            end_time_utc: g.end.to_string(),
        })
        .collect();
    let vm_text = vm.to_string();
    DesiredState {
        revision: revision_of(&vm_text, &rules, &grants),
        vm: vm_text,
        generated_at: now.to_string(),
        rules,
        grants,
    }
}

/// Validates a received desired state. Nothing half-valid gets through: any bad field
/// rejects the whole state, naming it.
pub fn decode(d: &DesiredState) -> Result<Desired, String> {
    let vm = VmId::parse(&d.vm).map_err(|e| format!("vm: {e}"))?;
    if revision_of(&d.vm, &d.rules, &d.grants) != d.revision {
        return Err(
            "revision: does not match the content (corrupted or tampered state)".to_owned(),
        );
    }
    let mut rules = Vec::with_capacity(d.rules.len());
    for (i, r) in d.rules.iter().enumerate() {
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
        rules.push(NsgRule {
            name: r.name.clone(),
            priority: r.priority,
            access,
            protocol: Protocol::parse(&r.protocol).map_err(|e| f("protocol", e))?,
            sources,
            ports,
            description: r.description.clone(),
            origin,
        });
    }
    for w in rules.windows(2) {
        if w[0].priority >= w[1].priority {
            return Err(format!(
                "rules: priorities must be unique and ascending ({} then {})",
                w[0].priority, w[1].priority
            ));
        }
    }
    let mut grants = Vec::with_capacity(d.grants.len());
    for (i, g) in d.grants.iter().enumerate() {
        let f = |what: &str, e: String| format!("grants[{i}].{what}: {e}");
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
    Ok(Desired {
        vm,
        revision: d.revision.clone(),
        rules,
        grants,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    pub enroll_token: String,
    pub resource_group: String,
    pub name: String,
    #[serde(default)]
    pub location: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub vm_id: String,
    pub subscription: String,
    /// The agent's own credential, usable for its VM only.
    pub token: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireListener {
    pub protocol: String,
    pub family: String,
    pub address: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireCounter {
    pub rule: String,
    pub port: u16,
    pub protocol: String,
    /// Packets dropped by the rule since the table was last (re)built.
    pub packets: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub listening: Vec<WireListener>,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
    use jitgate_core::ids::{ResourceGroup, SubscriptionId, VmName};
    use jitgate_core::net::PortRange;

    fn vm() -> VmId {
        VmId::new(
            SubscriptionId::parse("20ff7fc3-e762-44dd-bd96-b71116dcdc23").unwrap(),
            ResourceGroup::parse("rg").unwrap(),
            VmName::parse("vm1").unwrap(),
        )
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
        encode(&vm(), &rules, &grants, t)
    }

    #[test]
    fn round_trips_and_revision_tracks_content() {
        let d = sample();
        let back = decode(&d).unwrap();
        assert_eq!(back.rules.len(), 2);
        assert_eq!(back.grants.len(), 1);
        let again = encode(
            &back.vm,
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
            d.revision = revision_of(&d.vm, &d.rules, &d.grants);
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
}
