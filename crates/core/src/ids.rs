//! Azure-style identifiers: subscriptions, resource groups, locations, policy and VM
//! names, VM resource ids and RBAC scopes.
//!
//! Azure compares resource ids case-insensitively; so do we. Each id keeps the casing
//! it was created with for display, and exposes a lower-cased `key()` for comparison
//! and storage lookups.

use std::fmt;

use uuid::Uuid;

/// A subscription id: a GUID, shown lower-case and hyphenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(Uuid);

impl SubscriptionId {
    pub fn new(uuid: Uuid) -> Self {
        SubscriptionId(uuid)
    }

    /// Parses the hyphenated GUID form Azure uses (`20ff7fc3-e762-44dd-bd96-b71116dcdc23`).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() != 36 {
            return Err(format!(
                "'{s}' is not a GUID (expected the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
            ));
        }
        Uuid::parse_str(s).map(SubscriptionId).map_err(|_| {
            format!("'{s}' is not a GUID (expected the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
        })
    }
}

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

fn check_name(kind: &str, s: &str, max: usize, extra: &[char]) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("{kind} must be 1 to {max} characters long"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || extra.contains(c)))
    {
        return Err(format!(
            "{kind} '{s}' contains the character '{c}', which is not allowed"
        ));
    }
    if s.ends_with('.') {
        return Err(format!("{kind} '{s}' must not end with '.'"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, String> {
                check_name($kind, s, $max, $extra)?;
                Ok($name(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The lower-cased form used for comparison.
            pub fn key(&self) -> String {
                self.0.to_ascii_lowercase()
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.eq_ignore_ascii_case(&other.0)
            }
        }

        impl Eq for $name {}

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A resource group name: 1-90 of letters, digits, `-_.()`, not ending in `.`.
    ResourceGroup, "resource group name", 90, &['.', '(', ')']
);
name_type!(
    /// A location (`westeurope`): 1-64 letters, digits, `-`, `_`.
    Location, "location", 64, &[]
);
name_type!(
    /// A JIT policy name: 1-90 of letters, digits, `-_.`.
    PolicyName, "policy name", 90, &['.']
);
name_type!(
    /// A virtual machine name: 1-64 of letters, digits, `-_.`.
    VmName, "virtual machine name", 64, &['.']
);

/// The full Azure resource id of a protected machine:
/// `/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmId {
    pub subscription: SubscriptionId,
    pub resource_group: ResourceGroup,
    pub name: VmName,
}

impl VmId {
    pub fn new(subscription: SubscriptionId, resource_group: ResourceGroup, name: VmName) -> Self {
        VmId {
            subscription,
            resource_group,
            name,
        }
    }

    /// Parses a VM resource id; the fixed segments are matched case-insensitively.
    pub fn parse(s: &str) -> Result<Self, String> {
        let expected = "expected /subscriptions/{guid}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}";
        let parts: Vec<&str> = s.split('/').collect();
        let fixed = [
            (0, ""),
            (1, "subscriptions"),
            (3, "resourcegroups"),
            (5, "providers"),
            (6, "microsoft.compute"),
            (7, "virtualmachines"),
        ];
        if parts.len() != 9
            || fixed
                .iter()
                .any(|(i, v)| !parts[*i].eq_ignore_ascii_case(v))
        {
            return Err(format!(
                "'{s}' is not a virtual machine resource id ({expected})"
            ));
        }
        let subscription = SubscriptionId::parse(parts[2])?;
        let resource_group = ResourceGroup::parse(parts[4])?;
        let name = VmName::parse(parts[8])?;
        Ok(VmId::new(subscription, resource_group, name))
    }

    /// Lower-cased canonical id: equal for ids Azure would consider equal.
    pub fn key(&self) -> String {
        self.to_string().to_ascii_lowercase()
    }

    pub fn scope(&self) -> Scope {
        Scope::Vm(self.clone())
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
            self.subscription, self.resource_group, self.name
        )
    }
}

/// Where a role assignment applies. Scopes nest: subscription > resource group > VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Subscription(SubscriptionId),
    ResourceGroup(SubscriptionId, ResourceGroup),
    Vm(VmId),
}

impl Scope {
    /// Parses `/subscriptions/{sub}`, `/subscriptions/{sub}/resourceGroups/{rg}` or a VM id.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim_end_matches('/').split('/').collect();
        let bad = || {
            format!(
                "'{s}' is not a scope (expected /subscriptions/{{guid}}, /subscriptions/{{guid}}/resourceGroups/{{rg}} or a virtual machine id)"
            )
        };
        match parts.len() {
            3 if parts[0].is_empty() && parts[1].eq_ignore_ascii_case("subscriptions") => {
                Ok(Scope::Subscription(SubscriptionId::parse(parts[2])?))
            }
            5 if parts[0].is_empty()
                && parts[1].eq_ignore_ascii_case("subscriptions")
                && parts[3].eq_ignore_ascii_case("resourcegroups") =>
            {
                Ok(Scope::ResourceGroup(
                    SubscriptionId::parse(parts[2])?,
                    ResourceGroup::parse(parts[4])?,
                ))
            }
            9 => VmId::parse(s).map(Scope::Vm),
            _ => Err(bad()),
        }
    }

    pub fn subscription(&self) -> SubscriptionId {
        match self {
            Scope::Subscription(s) | Scope::ResourceGroup(s, _) => *s,
            Scope::Vm(vm) => vm.subscription,
        }
    }

    /// True when `self` is `other` or an ancestor of it.
    pub fn contains(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::Subscription(a), o) => *a == o.subscription(),
            (Scope::ResourceGroup(s, rg), Scope::ResourceGroup(s2, rg2)) => s == s2 && rg == rg2,
            (Scope::ResourceGroup(s, rg), Scope::Vm(vm)) => {
                *s == vm.subscription && *rg == vm.resource_group
            }
            (Scope::Vm(a), Scope::Vm(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Subscription(s) => write!(f, "/subscriptions/{s}"),
            Scope::ResourceGroup(s, rg) => write!(f, "/subscriptions/{s}/resourceGroups/{rg}"),
            Scope::Vm(vm) => vm.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

    #[test]
    fn vm_id_round_trips_and_compares_case_insensitively() {
        let id = format!(
            "/subscriptions/{SUB}/resourceGroups/myRg1/providers/Microsoft.Compute/virtualMachines/vm1"
        );
        let a = VmId::parse(&id).unwrap();
        assert_eq!(a.to_string(), id);
        let b = VmId::parse(&id.to_uppercase().replace("SUBSCRIPTIONS", "subscriptions")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn vm_id_rejects_other_shapes() {
        for bad in [
            "",
            "vm1",
            &format!("/subscriptions/{SUB}/resourceGroups/rg"),
            &format!(
                "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Network/virtualMachines/vm1"
            ),
            "/subscriptions/not-a-guid/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1",
            &format!(
                "/subscriptions/{SUB}/resourceGroups/r g/providers/Microsoft.Compute/virtualMachines/vm1"
            ),
        ] {
            assert!(VmId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn scopes_nest() {
        let sub = Scope::parse(&format!("/subscriptions/{SUB}")).unwrap();
        let rg = Scope::parse(&format!("/subscriptions/{SUB}/resourceGroups/RG")).unwrap();
        let vm = Scope::parse(&format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/a"
        ))
        .unwrap();
        let other_vm = Scope::parse(&format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/b"
        ))
        .unwrap();
        let other_rg = Scope::parse(&format!("/subscriptions/{SUB}/resourceGroups/rg2")).unwrap();
        assert!(sub.contains(&rg) && sub.contains(&vm) && rg.contains(&vm));
        assert!(vm.contains(&vm) && !vm.contains(&other_vm) && !vm.contains(&rg));
        assert!(!rg.contains(&sub) && !other_rg.contains(&vm));
    }

    #[test]
    fn names_are_checked() {
        assert!(ResourceGroup::parse("prod-web_(1).x").is_ok());
        assert!(ResourceGroup::parse("bad.").is_err());
        assert!(ResourceGroup::parse(&"a".repeat(91)).is_err());
        assert!(PolicyName::parse("default").is_ok());
        assert!(PolicyName::parse("a/b").is_err());
        assert!(Location::parse("westeurope").is_ok());
        assert!(Location::parse("west europe").is_err());
    }
}
