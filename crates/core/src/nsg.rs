//! A VM's network security group: the ordered inbound rules the agent renders.
//!
//! The NSG is derived, never stored as such: user rules (stored), the JIT deny rules
//! implied by the VM's policy, and the JIT allow rules implied by live grants. Placement
//! follows Azure:
//!
//! * a JIT deny rule for a port goes *below* every user rule that already covers that
//!   port (those keep priority), at the first free priority after the last of them;
//! * if no user rule covers the port, the deny rule takes top priority among non-JIT
//!   rules: the highest free priority above the first user rule, or 1000 when the VM
//!   has no user rules (Azure's observed default);
//! * JIT allow rules (grants) take the first free priorities from 100 up: "top
//!   priority", above the deny rules.
//!
//! Names are deterministic: `JIT-Deny-<policy>-<port>`, `JIT-Allow-<request>-<port>`.

use std::collections::BTreeSet;

use jiff::Timestamp;

use crate::ids::VmId;
use crate::net::{Port, PortRange, Protocol, SourcePrefix};
use crate::policy::{PolicyKey, PolicyVm};
use crate::request::RequestId;

pub const MIN_PRIORITY: u16 = 100;
pub const MAX_PRIORITY: u16 = 4096;
/// Where JIT deny rules go on a VM with no user rules.
pub const DEFAULT_DENY_PRIORITY: u16 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allow,
    Deny,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Allow => "Allow",
            Access::Deny => "Deny",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleOrigin {
    User,
    JitDeny {
        policy: String,
    },
    JitAllow {
        request: RequestId,
        expires: Timestamp,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsgRule {
    pub name: String,
    pub priority: u16,
    pub access: Access,
    pub protocol: Protocol,
    pub sources: Vec<SourcePrefix>,
    pub ports: Vec<PortRange>,
    pub description: String,
    pub origin: RuleOrigin,
}

impl NsgRule {
    pub fn covers(&self, protocol: Protocol, port: Port) -> bool {
        self.protocol.overlaps(protocol) && self.ports.iter().any(|r| r.contains(port))
    }
}

/// A live grant on this VM, for the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRef {
    pub request: RequestId,
    pub number: Port,
    pub protocol: Protocol,
    pub source: SourcePrefix,
    pub start: Timestamp,
    pub end: Timestamp,
}

fn first_free_from(used: &BTreeSet<u16>, from: u16) -> Option<u16> {
    (from.max(MIN_PRIORITY)..=MAX_PRIORITY).find(|p| !used.contains(p))
}

fn highest_free_below(used: &BTreeSet<u16>, below: u16) -> Option<u16> {
    (MIN_PRIORITY..below).rev().find(|p| !used.contains(p))
}

/// Computes the VM's full NSG, in evaluation order (priority ascending).
///
/// `user` are the VM's own rules; `policy` the VM's entry in its JIT policy, if any;
/// `grants` its live grants (callers pass only live ones).
pub fn nsg_view(
    vm: &VmId,
    user: &[NsgRule],
    policy: Option<(&PolicyKey, &PolicyVm)>,
    grants: &[GrantRef],
) -> Vec<NsgRule> {
    let mut used: BTreeSet<u16> = user.iter().map(|r| r.priority).collect();
    let min_user = user.iter().map(|r| r.priority).min();
    let mut out: Vec<NsgRule> = user.to_vec();

    if let Some((key, pvm)) = policy {
        for rule in &pvm.ports {
            let covering = user
                .iter()
                .filter(|u| u.covers(rule.protocol, rule.number))
                .map(|u| u.priority)
                .max();
            let priority = match (covering, min_user) {
                (Some(last), _) => first_free_from(&used, last.saturating_add(1)),
                (None, None) => first_free_from(&used, DEFAULT_DENY_PRIORITY),
                (None, Some(first)) => highest_free_below(&used, first),
            }
            .or_else(|| first_free_from(&used, MIN_PRIORITY));
            let Some(priority) = priority else { continue };
            used.insert(priority);
            out.push(NsgRule {
                name: format!("JIT-Deny-{}-{}", key.name, rule.number),
                priority,
                access: Access::Deny,
                protocol: rule.protocol,
                sources: vec![SourcePrefix::Any],
                ports: vec![PortRange::single(rule.number)],
                description: format!(
                    "JIT: deny all inbound to port {} (policy '{}', VM '{}')",
                    rule.number, key.name, vm.name
                ),
                origin: RuleOrigin::JitDeny { policy: key.id() },
            });
        }
    }

    let mut grants: Vec<&GrantRef> = grants.iter().collect();
    grants.sort_by_key(|g| (g.start, g.request, g.number));
    for g in grants {
        let Some(priority) = first_free_from(&used, MIN_PRIORITY) else {
            break;
        };
        used.insert(priority);
        out.push(NsgRule {
            name: format!("JIT-Allow-{}-{}", g.request, g.number),
            priority,
            access: Access::Allow,
            protocol: g.protocol,
            sources: vec![g.source],
            ports: vec![PortRange::single(g.number)],
            description: format!(
                "JIT: allow {} to port {} until {} (VM '{}')",
                g.source, g.number, g.end, vm.name
            ),
            origin: RuleOrigin::JitAllow {
                request: g.request,
                expires: g.end,
            },
        });
    }
    out.sort_by_key(|r| r.priority);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::MaxDuration;
    use crate::ids::{Location, PolicyName, ResourceGroup, SubscriptionId, VmName};
    use crate::policy::{AllowedSources, PortRule};
    use uuid::Uuid;

    fn vm() -> VmId {
        VmId::new(
            SubscriptionId::parse("20ff7fc3-e762-44dd-bd96-b71116dcdc23").unwrap(),
            ResourceGroup::parse("rg").unwrap(),
            VmName::parse("vm1").unwrap(),
        )
    }

    fn key() -> PolicyKey {
        PolicyKey {
            subscription: vm().subscription,
            resource_group: vm().resource_group,
            location: Location::parse("westeurope").unwrap(),
            name: PolicyName::parse("default").unwrap(),
        }
    }

    fn pvm(ports: &[u16]) -> PolicyVm {
        PolicyVm {
            id: vm(),
            ports: ports
                .iter()
                .map(|p| PortRule {
                    number: Port::new(*p as i64).unwrap(),
                    protocol: Protocol::Tcp,
                    allowed: AllowedSources::Single(SourcePrefix::Any),
                    max_duration: MaxDuration::default_three_hours(),
                })
                .collect(),
            public_ip_address: None,
        }
    }

    fn user(name: &str, priority: u16, first: u16, last: u16) -> NsgRule {
        NsgRule {
            name: name.into(),
            priority,
            access: Access::Allow,
            protocol: Protocol::Any,
            sources: vec![SourcePrefix::parse("10.0.0.0/8").unwrap()],
            ports: vec![PortRange {
                first: Port::new(first as i64).unwrap(),
                last: Port::new(last as i64).unwrap(),
            }],
            description: String::new(),
            origin: RuleOrigin::User,
        }
    }

    fn check(user_rules: &[NsgRule], ports: &[u16], grants: usize, expect: &[(&str, u16)]) {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let grants: Vec<GrantRef> = (0..grants)
            .map(|i| GrantRef {
                request: RequestId::new(Uuid::from_u128(i as u128 + 1)),
                number: Port::new(ports[0] as i64).unwrap(),
                protocol: Protocol::Tcp,
                source: SourcePrefix::parse("10.1.1.1").unwrap(),
                start: t,
                end: t,
            })
            .collect();
        let k = key();
        let p = pvm(ports);
        let view = nsg_view(&vm(), user_rules, Some((&k, &p)), &grants);
        let got: Vec<(String, u16)> = view.iter().map(|r| (r.name.clone(), r.priority)).collect();
        let want: Vec<(String, u16)> = expect.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn no_user_rules_deny_at_1000_allow_at_100() {
        check(
            &[],
            &[22, 3389],
            1,
            &[
                ("JIT-Allow-00000000-0000-0000-0000-000000000001-22", 100),
                ("JIT-Deny-default-22", 1000),
                ("JIT-Deny-default-3389", 1001),
            ],
        );
    }

    #[test]
    fn existing_rules_for_the_port_keep_priority() {
        check(
            &[
                user("ssh-from-corp", 300, 22, 22),
                user("web", 500, 443, 443),
            ],
            &[22],
            0,
            &[
                ("ssh-from-corp", 300),
                ("JIT-Deny-default-22", 301),
                ("web", 500),
            ],
        );
        // A range covering the port counts; the deny skips used priorities.
        check(
            &[user("mgmt", 200, 20, 30), user("next", 201, 80, 80)],
            &[22],
            0,
            &[("mgmt", 200), ("next", 201), ("JIT-Deny-default-22", 202)],
        );
    }

    #[test]
    fn uncovered_port_takes_top_priority_among_user_rules() {
        check(
            &[user("web", 500, 443, 443)],
            &[22],
            0,
            &[("JIT-Deny-default-22", 499), ("web", 500)],
        );
        // No room above the first user rule: first free priority.
        check(
            &[user("web", 100, 443, 443)],
            &[22],
            0,
            &[("web", 100), ("JIT-Deny-default-22", 101)],
        );
    }

    #[test]
    fn grants_sit_above_everything_else() {
        check(
            &[user("ssh-from-corp", 300, 22, 22)],
            &[22],
            2,
            &[
                ("JIT-Allow-00000000-0000-0000-0000-000000000001-22", 100),
                ("JIT-Allow-00000000-0000-0000-0000-000000000002-22", 101),
                ("ssh-from-corp", 300),
                ("JIT-Deny-default-22", 301),
            ],
        );
    }
}
