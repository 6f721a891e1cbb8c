// Generators of NSG rules as a hostile user might write them, shared by the unit
// properties in `src/nft.rs` and the kernel test `tests/nft_kernel.rs` (each includes
// this file with `include!`; the types and `port` come from the including module).

use super::*;

/// Rule names as a hostile user might write them (any unicode, quotes, newlines, `;`,
/// braces, `#`, up to 300 characters).
pub fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\"';{}#\\\\\n\r\t $@a-z]{1,40}",
        "\\PC{100,300}",
        Just("x\" ; drop ; comment \"y".to_owned()),
        Just("a\"\n}\ntable inet evil { chain c { type filter hook input priority 0; policy drop; } }\n#".to_owned()),
        Just("\\\" accept #".to_owned()),
        Just(" ".to_owned()),
    ]
}

pub fn arb_source() -> impl Strategy<Value = SourcePrefix> {
    prop_oneof![
        1 => Just(SourcePrefix::Any),
        3 => (any::<u32>(), 8u32..=32).prop_map(|(a, len)| {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            SourcePrefix::parse(&format!("{}/{len}", std::net::Ipv4Addr::from(a & mask))).unwrap()
        }),
        2 => (any::<u128>(), 16u32..=128).prop_map(|(a, len)| {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            SourcePrefix::parse(&format!("{}/{len}", std::net::Ipv6Addr::from(a & mask))).unwrap()
        }),
    ]
}

/// `min..8` rules named by `names`, unique priorities, any access, protocol, sources
/// and ports, user or JIT deny, each with `description`.
pub fn arb_rules(
    names: impl Strategy<Value = String>,
    min: usize,
    description: &'static str,
) -> impl Strategy<Value = Vec<NsgRule>> {
    prop::collection::vec(
        (
            names,
            100u16..=4096,
            any::<bool>(),
            prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Any]),
            prop::collection::vec(arb_source(), 1..4),
            prop::collection::vec((1u16..=65535, 0u16..50), 1..4),
            any::<bool>(),
        ),
        min..8,
    )
    .prop_map(move |raw| {
        let mut rules: Vec<NsgRule> = Vec::new();
        for (name, priority, allow, protocol, sources, ports, deny) in raw {
            if rules.iter().any(|r| r.priority == priority) {
                continue;
            }
            rules.push(NsgRule {
                name,
                priority,
                access: if allow && !deny {
                    Access::Allow
                } else {
                    Access::Deny
                },
                protocol,
                sources,
                ports: ports
                    .into_iter()
                    .map(|(a, w)| PortRange {
                        first: port(a),
                        last: port(a.saturating_add(w)),
                    })
                    .collect(),
                description: description.into(),
                origin: if deny {
                    RuleOrigin::JitDeny { policy: "p".into() }
                } else {
                    RuleOrigin::User
                },
            });
        }
        rules
    })
}
