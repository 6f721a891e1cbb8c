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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    // Priorities are only added from here on, so the search for the next free one
    // resumes after the last one taken (searching from the bottom for every grant
    // made a VM with thousands of grants cost seconds of CPU per change).
    let mut next = MIN_PRIORITY;
    for g in grants {
        let Some(priority) = first_free_from(&used, next) else {
            break;
        };
        next = priority.saturating_add(1);
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

// ---- user rules -----------------------------------------------------------------

/// A user NSG rule as received, before validation.
#[derive(Debug, Clone, Default)]
pub struct UserRuleInput {
    pub priority: Option<i64>,
    pub access: Option<String>,
    pub protocol: Option<String>,
    pub source_address_prefixes: Option<Vec<String>>,
    pub destination_port_ranges: Option<Vec<String>>,
    pub description: Option<String>,
}

/// Parses `22` or `5985-5986`.
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let bad = || format!("'{s}' is not a port or a port range such as 22 or 5985-5986");
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    let first = a.parse::<i64>().map_err(|_| bad())?;
    let last = b.parse::<i64>().map_err(|_| bad())?;
    let first = Port::new(first)?;
    let last = Port::new(last)?;
    if first > last {
        return Err(format!("'{s}': the first port is above the last"));
    }
    Ok(PortRange { first, last })
}

/// Checks the form of a rule name (1 to 80 letters, digits, `-`, `_`, `.`).
pub fn check_rule_name(name: &str) -> Result<(), crate::FieldError> {
    if name.is_empty()
        || name.len() > 80
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(crate::FieldError::new(
            "name",
            "must be 1 to 80 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(())
}

/// Validates a user rule named `name`. JIT rule names (`JIT-...`) are reserved.
pub fn validate_user_rule(name: &str, input: &UserRuleInput) -> Result<NsgRule, crate::FieldError> {
    use crate::FieldError;
    check_rule_name(name)?;
    if name.len() >= 4 && name[..4].eq_ignore_ascii_case("JIT-") {
        return Err(FieldError::new(
            "name",
            "names starting with 'JIT-' are reserved for jitgate's own rules",
        ));
    }
    let priority = input
        .priority
        .ok_or_else(|| FieldError::new("priority", "is required (100-4096)"))?;
    if !(MIN_PRIORITY as i64..=MAX_PRIORITY as i64).contains(&priority) {
        return Err(FieldError::new(
            "priority",
            format!("{priority} is outside 100-4096"),
        ));
    }
    let access = match input
        .access
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("allow") => Access::Allow,
        Some("deny") => Access::Deny,
        Some(other) => {
            return Err(FieldError::new(
                "access",
                format!("'{other}' is not Allow or Deny"),
            ));
        }
        None => return Err(FieldError::new("access", "is required (Allow or Deny)")),
    };
    let protocol = Protocol::parse(input.protocol.as_deref().unwrap_or("*"))
        .map_err(|e| FieldError::new("protocol", e))?;
    let raw_sources = input
        .source_address_prefixes
        .clone()
        .unwrap_or_else(|| vec!["*".to_owned()]);
    if raw_sources.is_empty() {
        return Err(FieldError::new(
            "sourceAddressPrefixes",
            "must list at least one prefix (or '*')",
        ));
    }
    let mut sources = Vec::new();
    for (i, s) in raw_sources.iter().enumerate() {
        let p = SourcePrefix::parse(s)
            .map_err(|e| FieldError::new(format!("sourceAddressPrefixes[{i}]"), e))?;
        if !sources.contains(&p) {
            sources.push(p);
        }
    }
    let raw_ports = input.destination_port_ranges.as_ref().ok_or_else(|| {
        FieldError::new(
            "destinationPortRanges",
            "is required (e.g. [\"22\", \"5985-5986\"])",
        )
    })?;
    if raw_ports.is_empty() {
        return Err(FieldError::new(
            "destinationPortRanges",
            "must list at least one port or range",
        ));
    }
    let mut ports = Vec::new();
    for (i, r) in raw_ports.iter().enumerate() {
        ports.push(
            parse_port_range(r)
                .map_err(|e| FieldError::new(format!("destinationPortRanges[{i}]"), e))?,
        );
    }
    let description = input.description.clone().unwrap_or_default();
    if description.len() > 256 {
        return Err(FieldError::new(
            "description",
            "is longer than 256 characters",
        ));
    }
    Ok(NsgRule {
        name: name.to_owned(),
        priority: priority as u16,
        access,
        protocol,
        sources,
        ports,
        description,
        origin: RuleOrigin::User,
    })
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

    /// Allow rules take the free priorities from the bottom, in order, skipping the
    /// taken ones, until none is left; with thousands of grants too (the view of a
    /// VM with 10,000 grants once cost a second of CPU).
    #[test]
    fn allow_rules_fill_the_free_priorities_in_order_and_stop_when_none_is_left() {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let grants: Vec<GrantRef> = (0..5_000u128)
            .map(|i| GrantRef {
                request: RequestId::new(Uuid::from_u128(i + 1)),
                number: Port::new(22).unwrap(),
                protocol: Protocol::Tcp,
                source: SourcePrefix::parse("10.1.1.1").unwrap(),
                start: t,
                end: t,
            })
            .collect();
        let user_rules = [
            user("a", 101, 1, 1),
            user("b", 103, 2, 2),
            user("c", 4000, 3, 3),
        ];
        let view = nsg_view(&vm(), &user_rules, Some((&key(), &pvm(&[22]))), &grants);
        // The rules besides the allow rules do not depend on the grants (the agent's
        // desired state is built from the view of no grants).
        let others = |v: &[NsgRule]| -> Vec<NsgRule> {
            v.iter()
                .filter(|r| !matches!(r.origin, RuleOrigin::JitAllow { .. }))
                .cloned()
                .collect()
        };
        assert_eq!(
            others(&view),
            others(&nsg_view(
                &vm(),
                &user_rules,
                Some((&key(), &pvm(&[22]))),
                &[]
            ))
        );
        let allow: Vec<u16> = view
            .iter()
            .filter(|r| matches!(r.origin, RuleOrigin::JitAllow { .. }))
            .map(|r| r.priority)
            .collect();
        let taken: Vec<u16> = view
            .iter()
            .filter(|r| !matches!(r.origin, RuleOrigin::JitAllow { .. }))
            .map(|r| r.priority)
            .collect();
        let free: Vec<u16> = (MIN_PRIORITY..=MAX_PRIORITY)
            .filter(|p| !taken.contains(p))
            .collect();
        assert_eq!(allow, free, "every free priority, in order");
        // 100 is the deny rule's (just below the first user rule).
        assert_eq!(&allow[..3], [102, 104, 105]);
        // In grant order (start, request, port).
        let names: Vec<&str> = view
            .iter()
            .filter(|r| matches!(r.origin, RuleOrigin::JitAllow { .. }))
            .take(2)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                format!("JIT-Allow-{}-22", grants[0].request),
                format!("JIT-Allow-{}-22", grants[1].request)
            ]
        );
    }

    #[test]
    fn rules_of_the_longest_policy_name_pass_the_renderers_validation() {
        // Regression: `JIT-Deny-<90 characters>-65535` is 105 characters, and the
        // agent refused every state holding such a rule.
        let mut k = key();
        k.name = PolicyName::parse(&"p".repeat(90)).unwrap();
        let user_rules = [user(&"u".repeat(80), 200, 1, 100)];
        let view = nsg_view(&vm(), &user_rules, Some((&k, &pvm(&[65535]))), &[]);
        let deny = view
            .iter()
            .find(|r| matches!(r.origin, RuleOrigin::JitDeny { .. }))
            .unwrap();
        assert_eq!(deny.name.len(), 105);
        assert_eq!(crate::nft::validate(&view), Ok(()));
    }

    #[test]
    fn user_rules_are_validated_naming_the_field() {
        let ok = UserRuleInput {
            priority: Some(200),
            access: Some("Allow".into()),
            protocol: Some("TCP".into()),
            source_address_prefixes: Some(vec!["10.0.0.0/8".into()]),
            destination_port_ranges: Some(vec!["22".into(), "5985-5986".into()]),
            description: None,
        };
        let r = validate_user_rule("corp-ssh", &ok).unwrap();
        assert_eq!(r.ports[1].to_string(), "5985-5986");
        let mapped = UserRuleInput {
            source_address_prefixes: Some(vec!["::ffff:192.168.0.0/112".into()]),
            ..ok.clone()
        };
        let r = validate_user_rule("corp-ssh", &mapped).unwrap();
        assert_eq!(
            r.sources,
            vec![SourcePrefix::parse("192.168.0.0/16").unwrap()]
        );
        let cases: Vec<(&str, UserRuleInput, &str)> = vec![
            ("JIT-x", ok.clone(), "name"),
            ("bad name", ok.clone(), "name"),
            (
                "r",
                UserRuleInput {
                    priority: Some(99),
                    ..ok.clone()
                },
                "priority",
            ),
            (
                "r",
                UserRuleInput {
                    priority: None,
                    ..ok.clone()
                },
                "priority",
            ),
            (
                "r",
                UserRuleInput {
                    access: Some("Permit".into()),
                    ..ok.clone()
                },
                "access",
            ),
            (
                "r",
                UserRuleInput {
                    protocol: Some("ICMP".into()),
                    ..ok.clone()
                },
                "protocol",
            ),
            (
                "r",
                UserRuleInput {
                    source_address_prefixes: Some(vec!["10.0.0.1/8".into()]),
                    ..ok.clone()
                },
                "sourceAddressPrefixes[0]",
            ),
            (
                "r",
                UserRuleInput {
                    source_address_prefixes: Some(vec![
                        "10.0.0.0/8".into(),
                        "::ffff:0:0/64".into(),
                    ]),
                    ..ok.clone()
                },
                "sourceAddressPrefixes[1]",
            ),
            (
                "r",
                UserRuleInput {
                    destination_port_ranges: Some(vec!["30-20".into()]),
                    ..ok.clone()
                },
                "destinationPortRanges[0]",
            ),
            (
                "r",
                UserRuleInput {
                    destination_port_ranges: Some(vec![]),
                    ..ok.clone()
                },
                "destinationPortRanges",
            ),
            (
                "r",
                UserRuleInput {
                    destination_port_ranges: Some(vec!["0".into()]),
                    ..ok.clone()
                },
                "destinationPortRanges[0]",
            ),
        ];
        for (name, input, field) in cases {
            assert_eq!(
                validate_user_rule(name, &input).unwrap_err().field,
                field,
                "{name} {input:?}"
            );
        }
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
