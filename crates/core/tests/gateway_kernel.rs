//! The gateway's table (`core::gateway`) against the real kernel: the whole table and
//! its deltas load with `nft -f` in a fresh network namespace, and the sets and maps
//! then hold exactly the planned elements, each with a timeout no later than its end,
//! IPv4 and IPv6, routed and DNAT. Traffic through a gateway is the end-to-end test's
//! (`crates/jitgate/tests/e2e/gateway.rs`). Needs root, `nft` and `ip`; fails (never
//! skips) without them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use jitgate_core::Timestamp;
use jitgate_core::gateway::{self, MappedPort, Mode, Placement, Target};
use jitgate_core::net::{Port, PortRange, Protocol, SourcePrefix};
use jitgate_core::nsg::{Access, GrantRef, NsgRule, RuleOrigin};
use jitgate_core::request::RequestId;
use uuid::Uuid;

// Shared with the other kernel tests, which use more of it.
#[allow(dead_code)]
mod netns {
    include!("support/netns.rs");
}
use netns::{Netns, nft_ms};

fn port(n: u16) -> Port {
    Port::new(i64::from(n)).unwrap()
}

fn deny(p: u16) -> NsgRule {
    NsgRule {
        name: format!("JIT deny {p}"),
        priority: 4000 + p % 90,
        access: Access::Deny,
        protocol: Protocol::Any,
        sources: vec![SourcePrefix::Any],
        ports: vec![PortRange::single(port(p))],
        description: String::new(),
        origin: RuleOrigin::JitDeny { policy: "p".into() },
    }
}

fn grant(n: u128, p: u16, source: &str, secs: i64, now: Timestamp) -> GrantRef {
    GrantRef {
        request: RequestId::new(Uuid::from_u128(n)),
        number: port(p),
        protocol: Protocol::Tcp,
        source: SourcePrefix::parse(source).unwrap(),
        start: now,
        end: now + jiff::SignedDuration::from_secs(secs),
    }
}

fn targets(now: Timestamp, extra: bool) -> Vec<Target> {
    let mapped = |pairs: &[(u16, u16)]| {
        pairs
            .iter()
            .map(|(p, m)| MappedPort {
                port: port(*p),
                mapped: port(*m),
            })
            .collect::<Vec<_>>()
    };
    let mut routed = Target {
        name: "routed".into(),
        place: Placement {
            address: "192.0.2.5".parse().unwrap(),
            mode: Mode::Routed,
            masquerade: false,
            public: None,
            mapped: vec![],
        },
        rules: vec![deny(22), deny(3389)],
        grants: vec![
            grant(1, 3389, "198.51.100.10", 3600, now),
            grant(2, 3389, "10.0.0.0/8", 600, now),
            grant(3, 22, "*", 1200, now),
        ],
    };
    let mut dnat = Target {
        name: "dnat".into(),
        place: Placement {
            address: "192.0.2.6".parse().unwrap(),
            mode: Mode::Dnat,
            masquerade: true,
            public: Some("198.51.100.1".parse().unwrap()),
            mapped: mapped(&[(3389, 50001), (22, 50002)]),
        },
        rules: vec![deny(22), deny(3389)],
        grants: vec![grant(4, 3389, "198.51.100.0/24", 900, now)],
    };
    let v6 = Target {
        name: "v6".into(),
        place: Placement {
            address: "2001:db8:1::5".parse().unwrap(),
            mode: Mode::Dnat,
            masquerade: false,
            public: Some("2001:db8::1".parse().unwrap()),
            mapped: mapped(&[(3389, 50001)]),
        },
        rules: vec![deny(3389)],
        grants: vec![grant(5, 3389, "2001:db8:99::/48", 300, now)],
    };
    if extra {
        routed
            .grants
            .retain(|g| g.request != RequestId::new(Uuid::from_u128(1)));
        routed.grants.push(grant(6, 3389, "203.0.113.7", 60, now));
        dnat.grants.push(grant(7, 22, "203.0.113.8", 120, now));
    }
    vec![routed, dnat, v6]
}

/// Every element line of a set or map as nft lists it: (text before `timeout`, ms
/// left).
fn held(ns: &Netns, kind: &str, name: &str) -> Vec<(String, i64)> {
    let text = ns.nft(&["list", kind, "inet", gateway::TABLE, name]);
    let Some(start) = text.find("elements = {") else {
        return Vec::new();
    };
    let body = &text[start + "elements = {".len()..];
    let body = &body[..body.find('}').unwrap()];
    body.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (key, rest) = e
                .split_once(" timeout ")
                .unwrap_or_else(|| panic!("no timeout: {e}"));
            let expires = rest
                .split(" expires ")
                .nth(1)
                .map(|x| x.split_whitespace().next().unwrap())
                .unwrap_or_else(|| panic!("no expiry: {e}"));
            (key.to_owned(), nft_ms(expires))
        })
        .collect()
}

fn check(ns: &Netns, planned: &[gateway::GwElement], now: Timestamp) {
    let mut count = 0;
    for (kind, name) in [
        ("set", "fwd4"),
        ("set", "dfwd4"),
        ("set", "fwd6"),
        ("set", "dfwd6"),
        ("map", "dnat4"),
        ("map", "dnat6"),
        ("set", "hfwd4"),
        ("set", "hdfwd4"),
        ("set", "hfwd6"),
        ("set", "hdfwd6"),
        ("map", "hdnat4"),
        ("map", "hdnat6"),
    ] {
        for (key, left) in held(ns, kind, name) {
            count += 1;
            // A map's key starts with the public address, then the source.
            let mut fields = key.split(" . ");
            let public = if kind == "map" { fields.next() } else { None };
            let src = fields.next().unwrap();
            let e = planned
                .iter()
                .find(|e| {
                    let net = if e.net.prefix_len() == e.net.max_prefix_len() {
                        e.net.addr().to_string()
                    } else {
                        e.net.to_string()
                    };
                    net == src
                        && public.is_none_or(|p| e.public.is_some_and(|x| x.to_string() == p))
                        && key.contains(&format!(" {}", e.proto.as_str()))
                        && (key.contains(&e.address.to_string())
                            || e.mapped.is_some_and(|m| key.ends_with(&m.to_string())))
                })
                .unwrap_or_else(|| panic!("{name} holds {key}, which was not planned"));
            let max = e.end.duration_since(now).as_millis() as i64;
            assert!(
                left <= max,
                "{name} {key}: {left} ms left, the grant has {max}"
            );
            assert!(left > max - 5_000, "{name} {key}: only {left} ms of {max}");
        }
    }
    // Each routed element once, each DNAT element twice (forward set and map).
    let want: usize = planned
        .iter()
        .map(|e| if e.mode == Mode::Dnat { 2 } else { 1 })
        .sum();
    assert_eq!(
        count,
        want,
        "{}",
        ns.nft(&["list", "table", "inet", gateway::TABLE])
    );
}

#[test]
fn the_gateway_table_and_its_deltas_load_and_hold_what_was_planned() {
    let ns = Netns::new("gw");
    let now = Timestamp::now();
    let first = targets(now, false);
    gateway::validate(&first).unwrap();
    let script = gateway::render_full(&first, now);
    ns.apply(&script)
        .unwrap_or_else(|e| panic!("{e}\n--- script ---\n{script}"));
    let planned = gateway::plan(&first, now);
    check(&ns, &planned, now);
    let chains = ns.nft(&["list", "chain", "inet", gateway::TABLE, "forward"]);
    assert!(chains.contains("ct status dnat"), "{chains}");
    assert!(chains.contains("ip daddr 192.0.2.5"), "{chains}");
    let post = ns.nft(&["list", "chain", "inet", gateway::TABLE, "postrouting"]);
    assert!(post.contains("masquerade"), "{post}");

    // A delta: one grant revoked, two added, in one transaction.
    let second = targets(now, true);
    assert_eq!(gateway::structure(&first), gateway::structure(&second));
    let desired = gateway::plan(&second, now);
    let (add, remove) = gateway::diff(&planned, &desired, now);
    assert_eq!((add.len(), remove.len()), (2, 1));
    let delta = gateway::render_delta(&add, &remove, now);
    ns.apply(&delta)
        .unwrap_or_else(|e| panic!("{e}\n--- delta ---\n{delta}"));
    check(&ns, &desired, now);

    // A delta that deletes what is not there fails whole, and changes nothing.
    let again = gateway::render_delta(&[], &remove, now);
    assert!(ns.apply(&again).is_err());
    check(&ns, &desired, now);
}
