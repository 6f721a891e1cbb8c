//! The API's input types (`PolicyInput`, `InitiateInput`, `UserRuleInput`) filled with
//! arbitrary values, through the core's validation: never a panic, every refusal
//! names a field that exists in the input (or is a required one that is missing), and
//! every acceptance keeps the validated invariants.
//!
//! The controller's JSON wire types convert into these field by field, so this covers
//! any JSON body that deserializes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use jitgate_core::Timestamp;
use jitgate_core::ids::{Location, PolicyName, ResourceGroup, SubscriptionId, VmId};
use jitgate_core::net::SourcePrefix;
use jitgate_core::nsg::{MAX_PRIORITY, MIN_PRIORITY, UserRuleInput, validate_user_rule};
use jitgate_core::policy::{
    Policy, PolicyInput, PolicyKey, PolicyVmInput, PortRuleInput, RawPrefix, validate_policy,
};
use jitgate_core::request::{
    InitiateContext, InitiateError, InitiateInput, InitiatePortInput, InitiateVmInput, RequestId,
    plan_initiate,
};
use proptest::prelude::*;
use uuid::Uuid;

const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

fn key() -> PolicyKey {
    PolicyKey {
        subscription: SubscriptionId::parse(SUB).unwrap(),
        resource_group: ResourceGroup::parse("rg").unwrap(),
        location: Location::parse("westeurope").unwrap(),
        name: PolicyName::parse("default").unwrap(),
    }
}

fn vm_id(rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

fn now() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

// ---- strategies --------------------------------------------------------------------

/// Strings a hostile or careless client might send.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        any::<String>(),
        "[a-zA-Z0-9\"';{}#\n\\\\ /.:*-]{0,30}",
        "\\PC{1000,1100}",
    ]
}

/// Mostly plausible values from `good`, sometimes anything.
fn or_nasty(good: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(good).prop_map(str::to_owned),
        1 => nasty(),
    ]
}

fn opt<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    prop::option::weighted(0.9, s)
}

fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => prop::sample::select(vec![22i64, 3389, 5985]),
        1 => any::<i64>(),
        1 => -1i64..70_000,
    ]
}

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(&[
            "*", "10.0.0.0/8", "10.0.0.0/16", "10.1.2.3", "10.0.0.5/24", "0.0.0.0/0",
            "::ffff:10.0.0.0/120", "::ffff:10.0.0.0/64", "2001:db8::/32", "::/0",
            "10.0.0.0/33", "Internet",
        ][..])
        .prop_map(str::to_owned),
        1 => nasty(),
    ]
}

fn vm() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["vm1", "vm2", "VM1"]).prop_map(|n| vm_id("rg", n)),
        1 => Just(vm_id("other-rg", "vm1")),
        1 => Just(vm_id("rg", "bad name")),
        1 => nasty(),
    ]
}

const DURATIONS: &[&str] = &[
    "PT1H",
    "PT3H",
    "P1D",
    "PT5M",
    "PT4M",
    "PT0S",
    "P2D",
    "PT30M",
    "P1M",
    "-PT1H",
    "PT99999999999999999H",
    "p1d",
];

fn arb_port_rule() -> impl Strategy<Value = PortRuleInput> {
    (
        opt(number()),
        opt(or_nasty(&["TCP", "udp", "*", "ICMP"])),
        opt(prop_oneof![
            prefix().prop_map(RawPrefix::One),
            prop::collection::vec(prefix(), 0..3).prop_map(RawPrefix::List),
        ]),
        prop::option::weighted(0.3, prop::collection::vec(prefix(), 0..3)),
        opt(or_nasty(DURATIONS)),
    )
        .prop_map(|(number, protocol, one, many, max)| PortRuleInput {
            number,
            protocol,
            allowed_source_address_prefix: one,
            allowed_source_address_prefixes: many,
            max_request_access_duration: max,
        })
}

fn arb_policy() -> impl Strategy<Value = PolicyInput> {
    (
        prop::option::weighted(0.3, or_nasty(&["Basic", ""])),
        opt(prop::collection::vec(
            (
                opt(vm()),
                opt(prop::collection::vec(arb_port_rule(), 0..4)),
                prop::option::of(nasty()),
            )
                .prop_map(|(id, ports, ip)| PolicyVmInput {
                    id,
                    ports,
                    public_ip_address: ip,
                }),
            0..4,
        )),
    )
        .prop_map(|(kind, vms)| PolicyInput {
            kind,
            virtual_machines: vms,
        })
}

fn time() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (-7_200i64..30_000).prop_map(|s| {
            now().checked_add(jiff::SignedDuration::from_secs(s)).unwrap().to_string()
        }),
        1 => Just("2026-01-01T02:00:00".to_owned()),
        1 => Just("9999-12-31T23:59:59Z".to_owned()),
        1 => Just("-009999-01-01T00:00:00Z".to_owned()),
        1 => nasty(),
    ]
}

/// Initiates that mostly fit the policy of [`policy`]: its VMs, their ports, short
/// durations or end times, sources inside or near the allowed ones.
fn arb_fitting_initiate() -> impl Strategy<Value = InitiateInput> {
    let port = |n: i64| {
        (
            prop_oneof![9 => Just(n), 1 => number()],
            prop::option::weighted(
                0.3,
                prop_oneof![
                    prop::sample::select(vec![
                        "10.1.2.3",
                        "10.0.0.0/16",
                        "2001:db8::5",
                        "2001:db8:1::/48",
                        "192.0.2.1"
                    ])
                    .prop_map(str::to_owned),
                    prefix(),
                ],
            ),
            prop_oneof![
                4 => prop::sample::select(vec!["PT5M", "PT30M", "PT1H", "PT0S"])
                    .prop_map(|d| (None, Some(d.to_owned()))),
                4 => (-60i64..3_600).prop_map(|s| {
                    let t = now().checked_add(jiff::SignedDuration::from_secs(s)).unwrap();
                    (Some(t.to_string()), None)
                }),
                1 => (prop::option::of(time()), prop::option::of(or_nasty(DURATIONS))),
            ],
        )
            .prop_map(|(number, source, (end, duration))| InitiatePortInput {
                number: Some(number),
                allowed_source_address_prefix: source,
                end_time_utc: end,
                duration,
            })
    };
    let vm = move |name: &'static str, ports: Vec<i64>| {
        {
            let len = ports.len();
            prop::sample::subsequence(ports, 1..=len)
        }
        .prop_flat_map(move |ports| {
            let ports: Vec<_> = ports.into_iter().map(port).collect();
            ports.prop_map(move |ports| InitiateVmInput {
                id: Some(vm_id("rg", name)),
                ports: Some(ports),
            })
        })
    };
    (
        prop_oneof![
            vm("vm1", vec![22, 3389]).prop_map(|v| vec![v]),
            vm("vm2", vec![5985]).prop_map(|v| vec![v]),
            (vm("vm1", vec![22, 3389]), vm("vm2", vec![5985])).prop_map(|(a, b)| vec![a, b]),
        ],
        prop::option::of(prop_oneof![
            8 => "[ -~]{0,100}",
            1 => Just("  ".to_owned()),
            1 => "\\PC{1000,1100}",
        ]),
    )
        .prop_map(|(vms, justification)| InitiateInput {
            virtual_machines: Some(vms),
            justification,
        })
}

fn arb_initiate() -> impl Strategy<Value = InitiateInput> {
    prop_oneof![arb_fitting_initiate(), arb_any_initiate()]
}

fn arb_any_initiate() -> impl Strategy<Value = InitiateInput> {
    let port = (
        opt(number()),
        prop::option::weighted(0.5, prefix()),
        prop::option::weighted(0.4, time()),
        prop::option::weighted(0.7, or_nasty(DURATIONS)),
    )
        .prop_map(|(number, source, end, duration)| InitiatePortInput {
            number,
            allowed_source_address_prefix: source,
            end_time_utc: end,
            duration,
        });
    (
        opt(prop::collection::vec(
            (opt(vm()), opt(prop::collection::vec(port, 0..4)))
                .prop_map(|(id, ports)| InitiateVmInput { id, ports }),
            0..4,
        )),
        prop::option::of(prop_oneof![nasty(), Just("  ".to_owned())]),
    )
        .prop_map(|(vms, justification)| InitiateInput {
            virtual_machines: vms,
            justification,
        })
}

fn arb_user_rule() -> impl Strategy<Value = (String, UserRuleInput)> {
    prop_oneof![arb_fitting_user_rule(), arb_any_user_rule()]
}

/// User rules that are mostly valid.
fn arb_fitting_user_rule() -> impl Strategy<Value = (String, UserRuleInput)> {
    (
        prop_oneof![19 => "[a-zA-Z0-9._-]{1,80}", 1 => Just("Jit-1".to_owned())],
        prop_oneof![19 => 100i64..=4096, 1 => Just(4097i64)],
        prop::sample::select(vec!["Allow", "Deny", "allow", "DENY"]),
        prop::option::of(prop::sample::select(vec!["TCP", "UDP", "*", "tcp"])),
        prop::option::weighted(
            0.8,
            prop::collection::vec(
                prop::sample::select(vec![
                    "*",
                    "10.0.0.0/8",
                    "10.1.2.3",
                    "2001:db8::/32",
                    "::ffff:10.0.0.0/120",
                ]),
                1..3,
            ),
        ),
        prop::collection::vec((1u16..=65535, 0u16..100), 1..3),
        prop::option::of("[ -~]{0,256}"),
    )
        .prop_map(
            |(name, priority, access, protocol, sources, ports, description)| {
                (
                    name,
                    UserRuleInput {
                        priority: Some(priority),
                        access: Some(access.to_owned()),
                        protocol: protocol.map(str::to_owned),
                        source_address_prefixes: sources
                            .map(|v| v.into_iter().map(str::to_owned).collect()),
                        destination_port_ranges: Some(
                            ports
                                .into_iter()
                                .map(|(a, w)| format!("{a}-{}", a.saturating_add(w)))
                                .collect(),
                        ),
                        description,
                    },
                )
            },
        )
}

fn arb_any_user_rule() -> impl Strategy<Value = (String, UserRuleInput)> {
    (
        prop_oneof![
            3 => "[a-zA-Z0-9._-]{1,80}",
            1 => Just("JIT-Deny-x".to_owned()),
            1 => Just("jit-".to_owned()),
            1 => "[a-z]{81,90}",
            1 => nasty(),
        ],
        opt(prop_oneof![3 => 1i64..5000, 1 => any::<i64>()]),
        opt(or_nasty(&["Allow", "deny", "Permit"])),
        prop::option::weighted(0.8, or_nasty(&["TCP", "UDP", "*", "icmp"])),
        prop::option::weighted(0.8, prop::collection::vec(prefix(), 0..3)),
        opt(prop::collection::vec(
            or_nasty(&[
                "22",
                "5985-5986",
                "0",
                "70000",
                "30-20",
                " 80 - 81 ",
                "1-65535",
            ]),
            0..3,
        )),
        prop::option::weighted(0.5, prop_oneof!["[ -~]{0,300}", nasty()]),
    )
        .prop_map(
            |(name, priority, access, protocol, sources, ports, description)| {
                (
                    name,
                    UserRuleInput {
                        priority,
                        access,
                        protocol,
                        source_address_prefixes: sources,
                        destination_port_ranges: ports,
                        description,
                    },
                )
            },
        )
}

// ---- field paths -------------------------------------------------------------------

/// `<head>[<n>]<rest>` with `n < len`: returns `rest`.
fn indexed<'a>(field: &'a str, head: &str, len: usize) -> Option<&'a str> {
    let rest = field.strip_prefix(head)?.strip_prefix('[')?;
    let (n, rest) = rest.split_once(']')?;
    (n.parse::<usize>().ok()? < len).then_some(rest)
}

/// True when `field` names `.<name>` or `.<name>[k]` with `k < len` (an index only
/// when the field is a list).
fn leaf(rest: &str, name: &str, len: Option<usize>) -> bool {
    let Some(after) = rest.strip_prefix('.').and_then(|r| r.strip_prefix(name)) else {
        return false;
    };
    after.is_empty() || len.is_some_and(|len| indexed(after, "", len) == Some(""))
}

fn policy_field_ok(field: &str, input: &PolicyInput) -> bool {
    if field == "kind" || field == "properties.virtualMachines" {
        return true;
    }
    let vms = input.virtual_machines.as_deref().unwrap_or_default();
    let Some(rest) = indexed(field, "properties.virtualMachines", vms.len()) else {
        return false;
    };
    let i: usize = field["properties.virtualMachines[".len()..]
        .split(']')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    if rest == ".id" || rest == ".ports" {
        return true;
    }
    let ports = vms[i].ports.as_deref().unwrap_or_default();
    let Some(rest) = indexed(rest, ".ports", ports.len()) else {
        return false;
    };
    let j: usize = field[..field.len() - rest.len()]
        .rsplit('[')
        .next()
        .unwrap()
        .trim_end_matches(']')
        .parse()
        .unwrap();
    let rule = &ports[j];
    let one_len = match &rule.allowed_source_address_prefix {
        Some(RawPrefix::List(l)) => Some(l.len()),
        _ => None,
    };
    leaf(rest, "number", None)
        || leaf(rest, "protocol", None)
        || leaf(rest, "maxRequestAccessDuration", None)
        || leaf(rest, "allowedSourceAddressPrefix", one_len)
        || leaf(
            rest,
            "allowedSourceAddressPrefixes",
            rule.allowed_source_address_prefixes.as_ref().map(Vec::len),
        )
}

fn initiate_field_ok(field: &str, input: &InitiateInput) -> bool {
    if field == "justification" || field == "virtualMachines" {
        return true;
    }
    let vms = input.virtual_machines.as_deref().unwrap_or_default();
    let Some(rest) = indexed(field, "virtualMachines", vms.len()) else {
        return false;
    };
    if rest == ".id" || rest == ".ports" {
        return true;
    }
    let i: usize = field["virtualMachines[".len()..]
        .split(']')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ports = vms[i].ports.as_deref().unwrap_or_default();
    let Some(rest) = indexed(rest, ".ports", ports.len()) else {
        return false;
    };
    [
        "number",
        "allowedSourceAddressPrefix",
        "endTimeUtc",
        "duration",
    ]
    .iter()
    .any(|name| leaf(rest, name, None))
}

fn user_rule_field_ok(field: &str, input: &UserRuleInput) -> bool {
    let rest = format!(".{field}");
    ["name", "priority", "access", "protocol", "description"]
        .iter()
        .any(|name| leaf(&rest, name, None))
        || leaf(
            &rest,
            "sourceAddressPrefixes",
            Some(input.source_address_prefixes.as_ref().map_or(1, Vec::len)),
        )
        || leaf(
            &rest,
            "destinationPortRanges",
            input.destination_port_ranges.as_ref().map(Vec::len),
        )
}

// ---- the policy an initiate is checked against --------------------------------------

fn policy() -> Policy {
    let rule = |n: i64, protocol: &str, allowed: &str, max: &str| PortRuleInput {
        number: Some(n),
        protocol: Some(protocol.into()),
        allowed_source_address_prefix: Some(RawPrefix::One(allowed.into())),
        allowed_source_address_prefixes: None,
        max_request_access_duration: Some(max.into()),
    };
    let spec = validate_policy(
        &key(),
        &PolicyInput {
            kind: None,
            virtual_machines: Some(vec![
                PolicyVmInput {
                    id: Some(vm_id("rg", "vm1")),
                    ports: Some(vec![
                        rule(22, "TCP", "*", "PT3H"),
                        rule(3389, "*", "10.0.0.0/8", "PT1H"),
                    ]),
                    public_ip_address: None,
                },
                PolicyVmInput {
                    id: Some(vm_id("rg", "vm2")),
                    ports: Some(vec![rule(5985, "UDP", "2001:db8::/32", "P1D")]),
                    public_ip_address: None,
                },
            ]),
        },
    )
    .unwrap();
    Policy { key: key(), spec }
}

// ---- properties ----------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Policies: a refusal names one of the input's fields; an accepted policy has the
    /// input's VMs and ports, canonical sources and durations within 5 minutes to 1 day.
    #[test]
    fn policy_inputs(input in arb_policy()) {
        match validate_policy(&key(), &input) {
            Ok(spec) => {
                let vms = input.virtual_machines.as_ref().unwrap();
                prop_assert_eq!(spec.vms.len(), vms.len());
                for (vm, raw) in spec.vms.iter().zip(vms) {
                    prop_assert_eq!(vm.ports.len(), raw.ports.as_ref().unwrap().len());
                    prop_assert_eq!(vm.id.resource_group.as_str(), "rg");
                    for rule in &vm.ports {
                        let secs = rule.max_duration.secs();
                        prop_assert!((300..=86_400).contains(&secs));
                        for p in rule.allowed.prefixes() {
                            prop_assert_eq!(SourcePrefix::parse(&p.to_string()), Ok(*p));
                        }
                    }
                }
            }
            Err(e) => {
                prop_assert!(policy_field_ok(&e.field, &input), "{} in {:?}", e, input);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    /// Initiates against a fixed policy: a refusal names one of the input's fields (a
    /// forbidden VM its id); an accepted request ends within the policy's maximum and
    /// comes from an allowed source.
    #[test]
    fn initiate_inputs(input in arb_initiate(), allowed_vm2 in any::<bool>()) {
        let policy = policy();
        let ctx = InitiateContext {
            id: RequestId::new(Uuid::from_u128(1)),
            policy: &policy,
            requestor: "alice",
            caller_ip: "10.0.0.9".parse().unwrap(),
            now: now(),
        };
        let may = |id: &VmId| allowed_vm2 || id.name.as_str() != "vm2";
        match plan_initiate(&ctx, &input, &may) {
            Ok(plan) => {
                prop_assert!(plan.superseded.is_empty());
                for vm in &plan.request.vms {
                    let pvm = policy.vm(&vm.id).unwrap();
                    for p in &vm.ports {
                        let rule = pvm.port(p.number).unwrap();
                        let left = p.end.duration_since(now()).as_secs();
                        prop_assert!(p.end > now());
                        prop_assert!(left <= rule.max_duration.secs());
                        prop_assert!(rule.allowed.permits(&p.source));
                        prop_assert_eq!(p.protocol, rule.protocol);
                    }
                }
                if let Some(j) = &plan.request.justification {
                    prop_assert!(j.len() <= 1024 && !j.trim().is_empty());
                }
            }
            Err(InitiateError::Invalid(e)) => {
                prop_assert!(initiate_field_ok(&e.field, &input), "{} in {:?}", e, input);
                prop_assert!(!e.message.is_empty());
            }
            Err(InitiateError::Forbidden { field, vm }) => {
                prop_assert!(!allowed_vm2);
                prop_assert_eq!(vm.name.as_str(), "vm2");
                prop_assert!(initiate_field_ok(&field, &input) && field.ends_with(".id"), "{}", field);
            }
        }
    }

    /// User NSG rules: a refusal names one of the input's fields; an accepted rule is
    /// in the priority range, not a JIT name, and has sources and ports.
    #[test]
    fn user_rule_inputs((name, input) in arb_user_rule()) {
        match validate_user_rule(&name, &input) {
            Ok(rule) => {
                prop_assert!((MIN_PRIORITY..=MAX_PRIORITY).contains(&rule.priority));
                prop_assert!(!rule.name.to_ascii_lowercase().starts_with("jit-"));
                prop_assert!(!rule.sources.is_empty() && !rule.ports.is_empty());
                prop_assert!(rule.ports.iter().all(|p| p.first <= p.last));
                prop_assert_eq!(jitgate_core::nft::validate(std::slice::from_ref(&rule)), Ok(()));
            }
            Err(e) => {
                prop_assert!(user_rule_field_ok(&e.field, &input), "{} in {:?}", e, input);
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}
