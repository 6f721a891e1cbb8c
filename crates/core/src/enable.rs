//! Enabling JIT where the recommendations say a machine is exposed, or on machines an
//! administrator picked: the plan of `recommendations/apply`.
//!
//! Each unhealthy machine's exposed management ports go into one policy: the policy
//! that protects the machine already, else the first policy (by key) of its resource
//! group, else a new policy (`default`: [`NewPolicy::standard`]) of its resource group
//! in its location (`global` when it has none). Every port becomes a rule for TCP from any source, for at most
//! three hours, unless the machine's entry already has a rule for that port number,
//! which is kept as the admin wrote it. The plan only adds: no rule, machine or policy
//! is removed or changed, so applying it never ends a live grant.
//!
//! The store writes the whole plan and its audit event in one transaction
//! (`Store::apply_policies`), so a refused write leaves nothing half-applied.

use crate::duration::MaxDuration;
use std::collections::{BTreeMap, HashSet};

use crate::ids::{Location, PolicyName, VmId};
use crate::net::{Port, Protocol, SourcePrefix};
use crate::policy::{AllowedSources, Policy, PolicyKey, PolicySpec, PolicyVm, PortRule};

/// An unhealthy machine and the management ports it exposes to everyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    pub vm: VmId,
    /// Where the machine is, for a policy created for it.
    pub location: Option<Location>,
    /// The rules to add for it: [`recommended_rule`] of each exposed port, or what an
    /// administrator chose ("Enable JIT on N VMs").
    pub rules: Vec<PortRule>,
}

/// One machine the plan enables JIT on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    pub vm: VmId,
    /// Its exposed ports (those its policy already had included).
    pub ports: Vec<Port>,
    pub policy: PolicyKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnablePlan {
    /// Every policy to write, whole, in key order.
    pub writes: Vec<(PolicyKey, PolicySpec)>,
    /// The machines enabled, grouped by policy in the order of `writes`, each group
    /// in the order of `exposed`.
    pub enabled: Vec<Enabled>,
}

/// What a policy the plan creates is called, and where it is when its machine's
/// location is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPolicy {
    pub name: PolicyName,
    pub location: Location,
}

impl NewPolicy {
    /// `default`, in `global` for a machine of unknown location.
    pub fn standard() -> Result<NewPolicy, String> {
        Ok(NewPolicy {
            name: PolicyName::parse("default")?,
            location: Location::parse("global")?,
        })
    }
}

/// Plans enabling JIT on `exposed` machines, given the current `policies`; a policy it
/// creates is named and placed by `new`.
///
/// `policies` must hold every policy of the resource groups of `exposed` machines (a
/// policy only holds machines of its own resource group, so that includes each
/// machine's current policy); others are ignored. A machine listed twice is enabled
/// once, with its first entry.
pub fn plan_enable(exposed: &[Exposed], policies: &[Policy], new: &NewPolicy) -> EnablePlan {
    // Target policy (by lower-cased key) → its spec as it will be written, and the
    // machines it enables.
    let mut targets: BTreeMap<String, (PolicyKey, PolicySpec, Vec<Enabled>)> = BTreeMap::new();
    let mut done: HashSet<String> = HashSet::new();
    for e in exposed {
        if !done.insert(e.vm.key()) {
            continue;
        }
        let key = target_key(e, policies, new);
        let (_, spec, enabled) = targets.entry(key.key()).or_insert_with(|| {
            let spec = policies
                .iter()
                .find(|p| p.key.key() == key.key())
                .map(|p| p.spec.clone())
                .unwrap_or_else(|| PolicySpec {
                    kind: "Basic".to_owned(),
                    vms: Vec::new(),
                });
            (key.clone(), spec, Vec::new())
        });
        let entry = match spec.vms.iter().position(|v| v.id == e.vm) {
            Some(i) => &mut spec.vms[i],
            None => {
                spec.vms.push(PolicyVm {
                    id: e.vm.clone(),
                    ports: Vec::new(),
                    public_ip_address: None,
                });
                let last = spec.vms.len() - 1;
                &mut spec.vms[last]
            }
        };
        for rule in &e.rules {
            if entry.port(rule.number).is_none() {
                entry.ports.push(rule.clone());
            }
        }
        enabled.push(Enabled {
            vm: e.vm.clone(),
            ports: e.rules.iter().map(|r| r.number).collect(),
            policy: key,
        });
    }
    let mut plan = EnablePlan {
        writes: Vec::with_capacity(targets.len()),
        enabled: Vec::new(),
    };
    for (_, (key, spec, enabled)) in targets {
        plan.writes.push((key, spec));
        plan.enabled.extend(enabled);
    }
    plan
}

/// The rule the plan writes for an exposed port: TCP, any source, at most 3 hours.
pub fn recommended_rule(number: Port) -> PortRule {
    PortRule {
        number,
        protocol: Protocol::Tcp,
        allowed: AllowedSources::Single(SourcePrefix::Any),
        max_duration: MaxDuration::default_three_hours(),
    }
}

/// The policy a machine's ports go into.
fn target_key(e: &Exposed, policies: &[Policy], new: &NewPolicy) -> PolicyKey {
    if let Some(p) = policies.iter().find(|p| p.vm(&e.vm).is_some()) {
        return p.key.clone();
    }
    let first_of_group = policies
        .iter()
        .filter(|p| {
            p.key.subscription == e.vm.subscription && p.key.resource_group == e.vm.resource_group
        })
        .min_by_key(|p| p.key.key());
    if let Some(p) = first_of_group {
        return p.key.clone();
    }
    PolicyKey {
        subscription: e.vm.subscription,
        resource_group: e.vm.resource_group.clone(),
        location: e.location.clone().unwrap_or_else(|| new.location.clone()),
        name: new.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ResourceGroup, SubscriptionId, VmName};

    const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

    fn vm(rg: &str, name: &str) -> VmId {
        VmId::new(
            SubscriptionId::parse(SUB).unwrap(),
            ResourceGroup::parse(rg).unwrap(),
            VmName::parse(name).unwrap(),
        )
    }

    fn key(rg: &str, location: &str, name: &str) -> PolicyKey {
        PolicyKey {
            subscription: SubscriptionId::parse(SUB).unwrap(),
            resource_group: ResourceGroup::parse(rg).unwrap(),
            location: Location::parse(location).unwrap(),
            name: PolicyName::parse(name).unwrap(),
        }
    }

    fn port(n: u16) -> Port {
        Port::new(n as i64).unwrap()
    }

    /// An admin's own rule: not what the plan would write.
    fn admin_rule(n: u16) -> PortRule {
        PortRule {
            number: port(n),
            protocol: Protocol::Udp,
            allowed: AllowedSources::Single(SourcePrefix::parse("10.0.0.0/8").unwrap()),
            max_duration: MaxDuration::parse("PT1H").unwrap(),
        }
    }

    fn policy(k: PolicyKey, vms: &[(VmId, &[u16])]) -> Policy {
        Policy {
            key: k,
            spec: PolicySpec {
                kind: "Custom".into(),
                vms: vms
                    .iter()
                    .map(|(id, ports)| PolicyVm {
                        id: id.clone(),
                        ports: ports.iter().map(|n| admin_rule(*n)).collect(),
                        public_ip_address: Some("192.0.2.1".into()),
                    })
                    .collect(),
            },
        }
    }

    fn exposed(id: VmId, location: Option<&str>, ports: &[u16]) -> Exposed {
        Exposed {
            vm: id,
            location: location.map(|l| Location::parse(l).unwrap()),
            rules: ports.iter().map(|n| recommended_rule(port(*n))).collect(),
        }
    }

    fn plan(e: &[Exposed], policies: &[Policy]) -> EnablePlan {
        plan_enable(e, policies, &NewPolicy::standard().unwrap())
    }

    /// Each write as `policy name@location: vm[ports]...`, a port the plan wrote
    /// marked `+`.
    fn summary(p: &EnablePlan) -> Vec<String> {
        p.writes
            .iter()
            .map(|(k, spec)| {
                let vms: Vec<String> = spec
                    .vms
                    .iter()
                    .map(|v| {
                        let ports: Vec<String> = v
                            .ports
                            .iter()
                            .map(|r| {
                                if *r == recommended_rule(r.number) {
                                    format!("+{}", r.number)
                                } else {
                                    r.number.to_string()
                                }
                            })
                            .collect();
                        format!("{}[{}]", v.id.name, ports.join(","))
                    })
                    .collect();
                format!(
                    "{}/{}@{}: {}",
                    k.resource_group,
                    k.name,
                    k.location,
                    vms.join(" ")
                )
            })
            .collect()
    }

    #[test]
    fn a_protected_machine_gains_its_missing_ports_in_its_own_policy() {
        let current = policy(
            key("web", "westeurope", "mine"),
            &[(vm("web", "a"), &[22]), (vm("web", "b"), &[3389])],
        );
        let first = policy(key("web", "westeurope", "aaa"), &[]);
        let p = plan(
            &[exposed(vm("web", "A"), Some("eastus"), &[22, 3389])],
            &[first, current.clone()],
        );
        assert_eq!(summary(&p), ["web/mine@westeurope: a[22,+3389] b[3389]"]);
        // Everything else of the policy is kept as it was.
        let (_, spec) = &p.writes[0];
        assert_eq!(spec.kind, "Custom");
        assert_eq!(spec.vms[0].ports[0], admin_rule(22));
        assert_eq!(spec.vms[1], current.spec.vms[1]);
        assert_eq!(spec.vms[0].public_ip_address.as_deref(), Some("192.0.2.1"));
        assert_eq!(
            p.enabled,
            [Enabled {
                vm: vm("web", "A"),
                ports: vec![port(22), port(3389)],
                policy: key("web", "westeurope", "mine"),
            }]
        );
    }

    #[test]
    fn an_unprotected_machine_joins_the_first_policy_of_its_group() {
        let policies = [
            policy(key("web", "westeurope", "zeta"), &[(vm("web", "z"), &[22])]),
            policy(key("web", "northeurope", "beta"), &[]),
            // Another group's policy, first by key, is not a candidate.
            policy(key("api", "westeurope", "alpha"), &[]),
        ];
        let p = plan(
            &[exposed(vm("web", "new"), Some("westeurope"), &[22])],
            &policies,
        );
        assert_eq!(summary(&p), ["web/beta@northeurope: new[+22]"]);
        assert_eq!(p.writes[0].1.kind, "Custom");
    }

    #[test]
    fn a_group_without_policies_gets_a_default_policy_per_location() {
        let p = plan(
            &[
                exposed(vm("lab", "one"), Some("westeurope"), &[22]),
                exposed(vm("lab", "two"), None, &[3389, 22]),
                exposed(vm("lab", "three"), Some("westeurope"), &[5985]),
                exposed(vm("lab", "four"), None, &[22]),
            ],
            &[],
        );
        assert_eq!(
            summary(&p),
            [
                "lab/default@global: two[+3389,+22] four[+22]",
                "lab/default@westeurope: one[+22] three[+5985]",
            ]
        );
        assert_eq!(p.writes[0].1.kind, "Basic");
        // Grouped by policy, in the order of the writes.
        let names: Vec<String> = p.enabled.iter().map(|e| e.vm.name.to_string()).collect();
        assert_eq!(names, ["two", "four", "one", "three"]);
        assert_eq!(p.enabled[0].policy, key("lab", "global", "default"));
    }

    #[test]
    fn repeats_are_planned_once() {
        let p = plan(
            &[
                exposed(vm("lab", "one"), Some("westeurope"), &[22, 22, 3389]),
                exposed(vm("lab", "ONE"), Some("westeurope"), &[5985]),
            ],
            &[],
        );
        assert_eq!(summary(&p), ["lab/default@westeurope: one[+22,+3389]"]);
        assert_eq!(p.enabled.len(), 1);
    }

    #[test]
    fn nothing_exposed_plans_nothing_and_a_covered_machine_changes_nothing() {
        assert_eq!(
            plan(&[], &[]),
            EnablePlan {
                writes: vec![],
                enabled: vec![]
            }
        );
        let current = policy(key("web", "westeurope", "mine"), &[(vm("web", "a"), &[22])]);
        let p = plan(
            &[exposed(vm("web", "a"), None, &[22])],
            std::slice::from_ref(&current),
        );
        assert_eq!(p.writes, [(current.key.clone(), current.spec.clone())]);
    }

    #[test]
    fn the_standard_new_policy_is_default_in_global() {
        let n = NewPolicy::standard().unwrap();
        assert_eq!(
            (n.name.as_str(), n.location.as_str()),
            ("default", "global")
        );
    }
}
