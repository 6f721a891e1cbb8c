//! JIT policies: which ports of which VMs JIT protects, from where, for how long.
//!
//! `validate_policy` turns the caller's raw input (already decoded from JSON, but not
//! yet checked) into a `PolicySpec`, naming the first offending field on failure.
//! Checks that need stored state (is the VM registered, is it already in another
//! policy) are the store's, inside its write transaction.

use std::collections::HashSet;

use crate::duration::MaxDuration;
use crate::error::FieldError;
use crate::ids::{Location, PolicyName, ResourceGroup, SubscriptionId, VmId};
use crate::net::{Port, Protocol, SourcePrefix};

/// Where a policy lives: it is always resource-group and location scoped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyKey {
    pub subscription: SubscriptionId,
    pub resource_group: ResourceGroup,
    pub location: Location,
    pub name: PolicyName,
}

impl PolicyKey {
    /// Lower-cased identity used for lookups.
    pub fn key(&self) -> String {
        self.id().to_ascii_lowercase()
    }

    /// The ARM id of the policy resource.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Security/locations/{}/jitNetworkAccessPolicies/{}",
            self.subscription, self.resource_group, self.location, self.name
        )
    }
}

/// The allowed sources of a port rule. Which of Azure's two mutually exclusive fields
/// the caller used is kept, so the policy reads back as it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedSources {
    /// `allowedSourceAddressPrefix`
    Single(SourcePrefix),
    /// `allowedSourceAddressPrefixes`
    Many(Vec<SourcePrefix>),
}

impl AllowedSources {
    pub fn prefixes(&self) -> &[SourcePrefix] {
        match self {
            AllowedSources::Single(p) => std::slice::from_ref(p),
            AllowedSources::Many(v) => v,
        }
    }

    /// True when a request from `source` fits inside one of the allowed prefixes.
    pub fn permits(&self, source: &SourcePrefix) -> bool {
        self.prefixes()
            .iter()
            .any(|allowed| allowed.contains(source))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    pub number: Port,
    pub protocol: Protocol,
    pub allowed: AllowedSources,
    pub max_duration: MaxDuration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVm {
    pub id: VmId,
    pub ports: Vec<PortRule>,
    /// Azure's `publicIpAddress`: kept and echoed, not used.
    pub public_ip_address: Option<String>,
}

impl PolicyVm {
    pub fn port(&self, number: Port) -> Option<&PortRule> {
        self.ports.iter().find(|r| r.number == number)
    }
}

/// The writable content of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub kind: String,
    pub vms: Vec<PolicyVm>,
}

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub key: PolicyKey,
    pub spec: PolicySpec,
}

impl Policy {
    pub fn vm(&self, id: &VmId) -> Option<&PolicyVm> {
        self.spec.vms.iter().find(|v| v.id == *id)
    }
}

// ---- raw input -------------------------------------------------------------------

/// `allowedSourceAddressPrefix` as received: a string, or (PowerShell's documented
/// sample) an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawPrefix {
    One(String),
    List(Vec<String>),
}

#[derive(Debug, Clone, Default)]
pub struct PortRuleInput {
    pub number: Option<i64>,
    pub protocol: Option<String>,
    pub allowed_source_address_prefix: Option<RawPrefix>,
    pub allowed_source_address_prefixes: Option<Vec<String>>,
    pub max_request_access_duration: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyVmInput {
    pub id: Option<String>,
    pub ports: Option<Vec<PortRuleInput>>,
    pub public_ip_address: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyInput {
    pub kind: Option<String>,
    pub virtual_machines: Option<Vec<PolicyVmInput>>,
}

fn parse_prefix_list(field: &str, items: &[String]) -> Result<Vec<SourcePrefix>, FieldError> {
    if items.is_empty() {
        return Err(FieldError::new(field, "must list at least one prefix"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (k, s) in items.iter().enumerate() {
        let p = SourcePrefix::parse(s).map_err(|e| FieldError::new(format!("{field}[{k}]"), e))?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

pub fn validate_port_rule(field: &str, input: &PortRuleInput) -> Result<PortRule, FieldError> {
    let number = input
        .number
        .ok_or_else(|| FieldError::new(format!("{field}.number"), "is required"))
        .and_then(|n| Port::new(n).map_err(|e| FieldError::new(format!("{field}.number"), e)))?;
    let protocol = match &input.protocol {
        None => {
            return Err(FieldError::new(
                format!("{field}.protocol"),
                "is required (TCP, UDP or *)",
            ));
        }
        Some(p) => {
            Protocol::parse(p).map_err(|e| FieldError::new(format!("{field}.protocol"), e))?
        }
    };
    let allowed = match (
        &input.allowed_source_address_prefix,
        &input.allowed_source_address_prefixes,
    ) {
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                format!("{field}.allowedSourceAddressPrefixes"),
                "allowedSourceAddressPrefix and allowedSourceAddressPrefixes are mutually exclusive: give one",
            ));
        }
        (None, None) => AllowedSources::Single(SourcePrefix::Any),
        (Some(RawPrefix::One(s)), None) => AllowedSources::Single(
            SourcePrefix::parse(s)
                .map_err(|e| FieldError::new(format!("{field}.allowedSourceAddressPrefix"), e))?,
        ),
        (Some(RawPrefix::List(items)), None) => {
            let f = format!("{field}.allowedSourceAddressPrefix");
            let list = parse_prefix_list(&f, items)?;
            if list.len() == 1 {
                AllowedSources::Single(list[0])
            } else {
                AllowedSources::Many(list)
            }
        }
        (None, Some(items)) => AllowedSources::Many(parse_prefix_list(
            &format!("{field}.allowedSourceAddressPrefixes"),
            items,
        )?),
    };
    let max_duration = match &input.max_request_access_duration {
        None => MaxDuration::default_three_hours(),
        Some(s) => MaxDuration::parse(s)
            .map_err(|e| FieldError::new(format!("{field}.maxRequestAccessDuration"), e))?,
    };
    Ok(PortRule {
        number,
        protocol,
        allowed,
        max_duration,
    })
}

/// Checks a policy body against the path it is written to. VMs must belong to the
/// policy's subscription and resource group, appear once, and list each port once.
pub fn validate_policy(key: &PolicyKey, input: &PolicyInput) -> Result<PolicySpec, FieldError> {
    let kind = match &input.kind {
        None => "Basic".to_owned(),
        Some(k) if k.is_empty() || k.len() > 64 => {
            return Err(FieldError::new("kind", "must be 1 to 64 characters long"));
        }
        Some(k) => k.clone(),
    };
    let raw_vms = input.virtual_machines.as_ref().ok_or_else(|| {
        FieldError::new(
            "properties.virtualMachines",
            "is required (a list of virtual machines and their ports)",
        )
    })?;
    let mut vms = Vec::with_capacity(raw_vms.len());
    let mut seen_vms = HashSet::new();
    for (i, raw) in raw_vms.iter().enumerate() {
        let field = format!("properties.virtualMachines[{i}]");
        let id_text = raw
            .id
            .as_deref()
            .ok_or_else(|| FieldError::new(format!("{field}.id"), "is required"))?;
        let id = VmId::parse(id_text).map_err(|e| FieldError::new(format!("{field}.id"), e))?;
        if id.subscription != key.subscription || id.resource_group != key.resource_group {
            return Err(FieldError::new(
                format!("{field}.id"),
                format!(
                    "virtual machine '{id}' is not in the policy's subscription and resource group ({}/{})",
                    key.subscription, key.resource_group
                ),
            ));
        }
        if !seen_vms.insert(id.key()) {
            return Err(FieldError::new(
                format!("{field}.id"),
                format!("virtual machine '{id}' is listed twice"),
            ));
        }
        let raw_ports = raw
            .ports
            .as_ref()
            .ok_or_else(|| FieldError::new(format!("{field}.ports"), "is required"))?;
        if raw_ports.is_empty() {
            return Err(FieldError::new(
                format!("{field}.ports"),
                "must list at least one port",
            ));
        }
        let mut ports: Vec<PortRule> = Vec::with_capacity(raw_ports.len());
        for (j, rp) in raw_ports.iter().enumerate() {
            let pf = format!("{field}.ports[{j}]");
            let rule = validate_port_rule(&pf, rp)?;
            if ports.iter().any(|r| r.number == rule.number) {
                return Err(FieldError::new(
                    format!("{pf}.number"),
                    format!(
                        "port {} is listed twice for this virtual machine",
                        rule.number
                    ),
                ));
            }
            ports.push(rule);
        }
        vms.push(PolicyVm {
            id,
            ports,
            public_ip_address: raw.public_ip_address.clone(),
        });
    }
    Ok(PolicySpec { kind, vms })
}

/// The (VM, port) pairs that `old` protects and `new` does not: their live grants are
/// revoked and their deny rules removed when the policy is updated or deleted.
pub fn removed_ports(old: &PolicySpec, new: Option<&PolicySpec>) -> Vec<(VmId, Port)> {
    let mut out = Vec::new();
    for vm in &old.vms {
        let kept = new.and_then(|n| n.vms.iter().find(|v| v.id == vm.id));
        for rule in &vm.ports {
            let still = kept.and_then(|k| k.port(rule.number));
            // A port whose protocol changed is a different rule: its grants go too.
            if still.is_none_or(|s| s.protocol != rule.protocol) {
                out.push((vm.id.clone(), rule.number));
            }
        }
    }
    out
}

/// Whether `new` (None: the policy is deleted) still allows a live grant of `vm`'s
/// `port` for `protocol` from `source`: the VM keeps a rule for the port whose protocol
/// covers the grant's and whose allowed sources contain the grant's source. A policy
/// update ends exactly the grants for which this is false; the rest keep running.
pub fn still_allows(
    new: Option<&PolicySpec>,
    vm: &VmId,
    port: Port,
    protocol: Protocol,
    source: &SourcePrefix,
) -> bool {
    new.and_then(|n| n.vms.iter().find(|v| v.id == *vm))
        .and_then(|v| v.port(port))
        .is_some_and(|rule| {
            (rule.protocol == Protocol::Any || rule.protocol == protocol)
                && rule.allowed.permits(source)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

    fn key() -> PolicyKey {
        PolicyKey {
            subscription: SubscriptionId::parse(SUB).unwrap(),
            resource_group: ResourceGroup::parse("myRg1").unwrap(),
            location: Location::parse("westeurope").unwrap(),
            name: PolicyName::parse("default").unwrap(),
        }
    }

    fn vm_id(name: &str) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/myRg1/providers/Microsoft.Compute/virtualMachines/{name}"
        )
    }

    fn port(n: i64) -> PortRuleInput {
        PortRuleInput {
            number: Some(n),
            protocol: Some("*".into()),
            allowed_source_address_prefix: Some(RawPrefix::One("*".into())),
            allowed_source_address_prefixes: None,
            max_request_access_duration: Some("PT3H".into()),
        }
    }

    fn input(ports: Vec<PortRuleInput>) -> PolicyInput {
        PolicyInput {
            kind: Some("Basic".into()),
            virtual_machines: Some(vec![PolicyVmInput {
                id: Some(vm_id("vm1")),
                ports: Some(ports),
                public_ip_address: None,
            }]),
        }
    }

    /// One table of bad inputs, each with the field its error must name.
    #[test]
    fn bad_policies_name_their_field() {
        let f = "properties.virtualMachines[0].ports[0]";
        let cases: Vec<(PortRuleInput, String)> = vec![
            (
                PortRuleInput {
                    number: Some(0),
                    ..port(22)
                },
                format!("{f}.number"),
            ),
            (
                PortRuleInput {
                    number: Some(70000),
                    ..port(22)
                },
                format!("{f}.number"),
            ),
            (
                PortRuleInput {
                    number: None,
                    ..port(22)
                },
                format!("{f}.number"),
            ),
            (
                PortRuleInput {
                    protocol: Some("ICMP".into()),
                    ..port(22)
                },
                format!("{f}.protocol"),
            ),
            (
                PortRuleInput {
                    protocol: None,
                    ..port(22)
                },
                format!("{f}.protocol"),
            ),
            (
                PortRuleInput {
                    allowed_source_address_prefix: Some(RawPrefix::One("10.0.0.5/24".into())),
                    ..port(22)
                },
                format!("{f}.allowedSourceAddressPrefix"),
            ),
            (
                PortRuleInput {
                    allowed_source_address_prefixes: Some(vec!["10.0.0.0/8".into()]),
                    ..port(22)
                },
                format!("{f}.allowedSourceAddressPrefixes"),
            ),
            (
                PortRuleInput {
                    allowed_source_address_prefix: None,
                    allowed_source_address_prefixes: Some(vec![
                        "10.0.0.0/8".into(),
                        "bogus".into(),
                    ]),
                    ..port(22)
                },
                format!("{f}.allowedSourceAddressPrefixes[1]"),
            ),
            (
                PortRuleInput {
                    allowed_source_address_prefix: Some(RawPrefix::One(
                        "::ffff:10.0.0.0/90".into(),
                    )),
                    ..port(22)
                },
                format!("{f}.allowedSourceAddressPrefix"),
            ),
            (
                PortRuleInput {
                    allowed_source_address_prefix: None,
                    allowed_source_address_prefixes: Some(vec![
                        "10.0.0.0/8".into(),
                        "::ffff:0:0/64".into(),
                    ]),
                    ..port(22)
                },
                format!("{f}.allowedSourceAddressPrefixes[1]"),
            ),
            (
                PortRuleInput {
                    max_request_access_duration: Some("PT1M".into()),
                    ..port(22)
                },
                format!("{f}.maxRequestAccessDuration"),
            ),
            (
                PortRuleInput {
                    max_request_access_duration: Some("P2D".into()),
                    ..port(22)
                },
                format!("{f}.maxRequestAccessDuration"),
            ),
            (
                PortRuleInput {
                    max_request_access_duration: Some("3 hours".into()),
                    ..port(22)
                },
                format!("{f}.maxRequestAccessDuration"),
            ),
        ];
        for (rule, field) in cases {
            let err = validate_policy(&key(), &input(vec![rule.clone()])).unwrap_err();
            assert_eq!(err.field, field, "{rule:?}: {err}");
        }
        let dup = validate_policy(&key(), &input(vec![port(22), port(22)])).unwrap_err();
        assert_eq!(dup.field, "properties.virtualMachines[0].ports[1].number");
    }

    #[test]
    fn vm_checks() {
        let mut i = input(vec![port(22)]);
        let first = i.virtual_machines.as_ref().unwrap()[0].clone();
        i.virtual_machines.as_mut().unwrap().push(first);
        assert_eq!(
            validate_policy(&key(), &i).unwrap_err().field,
            "properties.virtualMachines[1].id"
        );

        let mut other_rg = input(vec![port(22)]);
        other_rg.virtual_machines.as_mut().unwrap()[0].id =
            Some(vm_id("x").replace("myRg1", "otherRg"));
        assert_eq!(
            validate_policy(&key(), &other_rg).unwrap_err().field,
            "properties.virtualMachines[0].id"
        );

        let none = PolicyInput {
            kind: None,
            virtual_machines: None,
        };
        assert_eq!(
            validate_policy(&key(), &none).unwrap_err().field,
            "properties.virtualMachines"
        );
    }

    #[test]
    fn accepts_the_azure_example_and_powershell_array() {
        let spec = validate_policy(&key(), &input(vec![port(22), port(3389)])).unwrap();
        assert_eq!(spec.vms[0].ports.len(), 2);
        assert_eq!(
            spec.vms[0].ports[0].allowed,
            AllowedSources::Single(SourcePrefix::Any)
        );

        let ps = PortRuleInput {
            allowed_source_address_prefix: Some(RawPrefix::List(vec![
                "10.0.0.0/8".into(),
                "192.168.1.0/24".into(),
            ])),
            ..port(22)
        };
        let spec = validate_policy(&key(), &input(vec![ps])).unwrap();
        assert_eq!(spec.vms[0].ports[0].allowed.prefixes().len(), 2);

        let defaults = PortRuleInput {
            allowed_source_address_prefix: None,
            max_request_access_duration: None,
            ..port(22)
        };
        let spec = validate_policy(&key(), &input(vec![defaults])).unwrap();
        assert_eq!(spec.vms[0].ports[0].max_duration.secs(), 3 * 3600);

        // An IPv4-mapped IPv6 prefix is stored as the IPv4 prefix it carries, which is
        // what nft can match.
        let mapped = PortRuleInput {
            allowed_source_address_prefix: Some(RawPrefix::One("::ffff:10.0.0.0/120".into())),
            ..port(22)
        };
        let spec = validate_policy(&key(), &input(vec![mapped])).unwrap();
        assert_eq!(
            spec.vms[0].ports[0].allowed,
            AllowedSources::Single(SourcePrefix::parse("10.0.0.0/24").unwrap())
        );
    }

    #[test]
    fn removed_ports_lists_dropped_and_reprotocolled_ports() {
        let old = validate_policy(&key(), &input(vec![port(22), port(3389), port(5985)])).unwrap();
        let mut changed = port(5985);
        changed.protocol = Some("TCP".into());
        let new = validate_policy(&key(), &input(vec![port(22), changed])).unwrap();
        let removed: Vec<u16> = removed_ports(&old, Some(&new))
            .iter()
            .map(|(_, p)| p.get())
            .collect();
        assert_eq!(removed, vec![3389, 5985]);
        assert_eq!(removed_ports(&old, None).len(), 3);
    }
}
