//! The nft plan against the real kernel: render, apply with `nft -f` in a fresh
//! network namespace, read the sets back, check every element carries an expiry no
//! later than its end.
//!
//! This is the test the DESIGN's enforcement contract asks for: nft 1.0.6's JSON
//! input silently drops a fractional timeout and makes the element permanent; we
//! write text with millisecond timeouts, and this proves every element the kernel
//! holds has a timeout. It needs root, `nft` (nftables) and `ip` (iproute2), and
//! fails (never skips) without them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use jitgate_core::Timestamp;
use jitgate_core::net::{Port, PortRange, Protocol, SourcePrefix};
use jitgate_core::nft::{self, Element, L4};
use jitgate_core::nsg::{Access, GrantRef, NsgRule, RuleOrigin};
use jitgate_core::request::RequestId;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use uuid::Uuid;

// ---------------------------------------------------------------------------------
// A throwaway network namespace
// ---------------------------------------------------------------------------------

mod netns {
    include!("support/netns.rs");
}
use netns::{Netns, held_text, proto};

// ---------------------------------------------------------------------------------
// Reading the sets back
// ---------------------------------------------------------------------------------

/// An element as the kernel reports it.
#[derive(Debug)]
struct Held {
    key: (IpNet, L4, u16),
    /// Seconds (nft JSON output rounds down to whole seconds).
    timeout_s: i64,
    expires_s: i64,
}

fn key_of(e: &Element) -> (IpNet, L4, u16) {
    (e.net, e.proto, e.port.get())
}

/// `nft -j list set inet jitgate <set>`: every element must be the `{"elem": {...}}`
/// form with `timeout` and `expires` (an element without timeout is printed as its
/// bare value).
fn held_json(ns: &Netns, set: &str) -> Vec<Held> {
    let text = ns.nft(&["-j", "list", "set", "inet", "jitgate", set]);
    let doc =
        serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let sets: Vec<&serde_json::Value> = doc
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .unwrap()
        .iter()
        .filter_map(|o| o.get("set"))
        .collect();
    assert_eq!(sets.len(), 1, "{text}");
    let Some(elems) = sets[0].get("elem").and_then(serde_json::Value::as_array) else {
        return Vec::new();
    };
    elems
        .iter()
        .map(|item| {
            let e = item
                .get("elem")
                .unwrap_or_else(|| panic!("element without timeout in {set}: {item:?}"));
            let concat = e
                .get("val")
                .and_then(|v| v.get("concat"))
                .and_then(serde_json::Value::as_array)
                .unwrap();
            let net = match &concat[0] {
                serde_json::Value::String(a) => IpNet::from(a.parse::<IpAddr>().unwrap()),
                p => {
                    let p = p.get("prefix").unwrap();
                    let addr = p.get("addr").and_then(serde_json::Value::as_str).unwrap();
                    let len = p.get("len").and_then(serde_json::Value::as_f64).unwrap();
                    format!("{addr}/{len}").parse().unwrap()
                }
            };
            let l4 = proto(concat[1].as_str().unwrap());
            let port = concat[2].as_f64().unwrap() as u16;
            let secs = |k: &str| {
                e.get(k)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or_else(|| panic!("element {net} . {l4:?} . {port} has no {k}"))
                    as i64
            };
            Held {
                key: (net, l4, port),
                timeout_s: secs("timeout"),
                expires_s: secs("expires"),
            }
        })
        .collect()
}

fn ms_between(a: Timestamp, b: Timestamp) -> i64 {
    b.duration_since(a).as_millis() as i64
}

/// Checks the kernel holds exactly the elements of `planned` that have at least
/// the minimum timeout left at `now`, each with a timeout and an expiry that cannot
/// reach past its end by more than the time `nft` took (`applied_at - now`).
fn check_held(
    ns: &Netns,
    planned: &[Element],
    now: Timestamp,
    applied_at: Timestamp,
) -> Vec<(Element, i64)> {
    let want: Vec<Element> = planned
        .iter()
        .filter(|e| nft::timeout_ms(e.end, now).is_some())
        .copied()
        .collect();
    let listed_at = Timestamp::now();
    let mut json_keys = BTreeSet::new();
    let mut text_keys = BTreeSet::new();
    let mut out = Vec::new();
    for set in nft::SETS {
        for h in held_json(ns, set) {
            let e = want
                .iter()
                .find(|e| key_of(e) == h.key)
                .unwrap_or_else(|| panic!("kernel holds unplanned {:?}", h.key));
            let planned_ms = nft::timeout_ms(e.end, now).unwrap();
            assert!(h.timeout_s * 1000 <= planned_ms, "{h:?} vs {planned_ms} ms");
            assert!(h.expires_s * 1000 <= planned_ms, "{h:?} vs {planned_ms} ms");
            assert!(json_keys.insert(h.key), "duplicate {:?}", h.key);
        }
        for (key, timeout, expires) in held_text(ns, set) {
            let e = *want.iter().find(|e| key_of(e) == key).unwrap();
            let planned_ms = nft::timeout_ms(e.end, now).unwrap();
            // The kernel rounds down to jiffies (at most 10 ms each).
            assert!(
                timeout <= planned_ms && timeout > planned_ms - 10,
                "{key:?}: timeout {timeout} ms, planned {planned_ms} ms"
            );
            // The element expires at (listing time + expires), which is no later
            // than end + the time nft took to commit.
            let late_ms = ms_between(e.end, listed_at) + expires;
            assert!(
                late_ms <= ms_between(now, applied_at),
                "{key:?} expires {late_ms} ms after its end"
            );
            assert!(text_keys.insert(key));
            out.push((e, timeout));
        }
    }
    let want_keys: BTreeSet<_> = want.iter().map(key_of).collect();
    assert_eq!(json_keys, want_keys);
    assert_eq!(text_keys, want_keys);
    out
}

// ---------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------

fn port(n: u16) -> Port {
    Port::new(i64::from(n)).unwrap()
}

fn after(now: Timestamp, ms: i64) -> Timestamp {
    now.checked_add(jiff::SignedDuration::from_millis(ms))
        .unwrap()
}

fn grant(n: u128, p: u16, protocol: Protocol, source: &str, end: Timestamp) -> GrantRef {
    GrantRef {
        request: RequestId::new(Uuid::from_u128(n)),
        number: port(p),
        protocol,
        source: SourcePrefix::parse(source).unwrap(),
        start: end,
        end,
    }
}

/// About fifty grants: hosts and networks, v4 and v6, nested prefixes ending before
/// and after their containers, duplicates, `*` protocols and sources, one already
/// over and one below the minimum timeout.
fn grants(now: Timestamp) -> Vec<GrantRef> {
    let mut g = Vec::new();
    let mut n = 0u128;
    let mut add = |p: u16, proto: Protocol, src: &str, ms: i64| {
        n += 1;
        g.push(grant(n, p, proto, src, after(now, ms)));
    };
    for i in 1..=12u16 {
        add(
            22,
            Protocol::Tcp,
            &format!("10.0.0.{i}"),
            20_000 + 7_777 * i64::from(i),
        );
    }
    add(22, Protocol::Tcp, "10.0.0.0/24", 60_000); // split around later hosts
    add(22, Protocol::Any, "10.0.0.0/16", 45_000); // split around the /24
    add(22, Protocol::Tcp, "10.0.0.0/24", 30_000); // duplicate, earlier: dropped
    add(22, Protocol::Tcp, "10.0.0.0/24", 60_000); // identical
    add(3389, Protocol::Any, "*", 90_000);
    add(3389, Protocol::Tcp, "192.168.7.0/24", 150_000); // inside *, later
    add(3389, Protocol::Tcp, "192.168.8.0/24", 10_000); // inside *, earlier
    add(443, Protocol::Udp, "*", 75_500);
    add(53, Protocol::Udp, "172.16.0.0/12", 33_333);
    add(53, Protocol::Udp, "172.16.5.5", 66_666);
    for i in 1..=10u16 {
        add(
            22,
            Protocol::Tcp,
            &format!("2001:db8::{i:x}"),
            15_000 + 9_001 * i64::from(i),
        );
    }
    add(22, Protocol::Tcp, "2001:db8::/64", 50_000);
    add(22, Protocol::Any, "2001:db8::/32", 40_000);
    add(5985, Protocol::Tcp, "2001:db8:1::/48", 100_000);
    add(5985, Protocol::Tcp, "2001:db8:1:2::/64", 200_000);
    add(5985, Protocol::Tcp, "10.20.0.0/16", 100_000);
    for i in 0..8u16 {
        add(
            8000 + i,
            Protocol::Any,
            &format!("198.51.100.{}", i * 3),
            61_000 + i64::from(i),
        );
    }
    add(22, Protocol::Tcp, "10.9.9.9", -1_000); // over
    add(22, Protocol::Tcp, "10.9.9.8", 5); // below the minimum timeout
    g
}

fn rule(
    name: &str,
    priority: u16,
    access: Access,
    protocol: Protocol,
    sources: &[&str],
    ports: &[(u16, u16)],
    origin: RuleOrigin,
) -> NsgRule {
    NsgRule {
        name: name.into(),
        priority,
        access,
        protocol,
        sources: sources
            .iter()
            .map(|s| SourcePrefix::parse(s).unwrap())
            .collect(),
        ports: ports
            .iter()
            .map(|&(a, b)| PortRange {
                first: port(a),
                last: port(b),
            })
            .collect(),
        description: String::new(),
        origin,
    }
}

fn rules(now: Timestamp) -> Vec<NsgRule> {
    let deny = || RuleOrigin::JitDeny {
        policy: "default".into(),
    };
    vec![
        rule(
            "JIT-Allow-1-22",
            100,
            Access::Allow,
            Protocol::Tcp,
            &["10.0.0.1"],
            &[(22, 22)],
            RuleOrigin::JitAllow {
                request: RequestId::new(Uuid::from_u128(1)),
                expires: after(now, 60_000),
            },
        ),
        rule(
            "corp \"mgmt\"",
            300,
            Access::Allow,
            Protocol::Any,
            &["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "192.0.2.7"],
            &[(22, 22), (5985, 5986)],
            RuleOrigin::User,
        ),
        rule(
            "JIT-Deny-default-22",
            301,
            Access::Deny,
            Protocol::Tcp,
            &["*"],
            &[(22, 22)],
            deny(),
        ),
        rule(
            "JIT-Deny-default-3389",
            302,
            Access::Deny,
            Protocol::Any,
            &["*"],
            &[(3389, 3389)],
            deny(),
        ),
        rule(
            "no-dns",
            400,
            Access::Deny,
            Protocol::Udp,
            &["*"],
            &[(53, 53)],
            RuleOrigin::User,
        ),
        rule(
            "v6-web",
            500,
            Access::Allow,
            Protocol::Tcp,
            &["2001:db8::1", "2001:db8:2::/48"],
            &[(8000, 8100), (443, 443)],
            RuleOrigin::User,
        ),
    ]
}

// ---------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------

#[test]
fn full_render_and_delta_apply_with_every_element_timed() {
    let ns = Netns::new("full");

    // Full render.
    let now = Timestamp::now();
    let rules = rules(now);
    nft::validate(&rules).unwrap();
    let planned = nft::plan_elements(&grants(now), now);
    assert!(planned.len() >= 50, "only {} elements", planned.len());
    let script = nft::render_full(&rules, &planned, now);
    ns.apply(&script)
        .unwrap_or_else(|e| panic!("{e}\n--- script ---\n{script}"));
    let applied_at = Timestamp::now();
    check_held(&ns, &planned, now, applied_at);
    for (name, _, _) in nft::deny_counter_names(&rules) {
        let text = ns.nft(&["list", "counter", "inet", "jitgate", &name]);
        assert!(text.contains("packets 0"), "{text}");
    }
    // Applying the full script again replaces the table atomically.
    let now = Timestamp::now();
    ns.apply(&nft::render_full(&rules, &planned, now)).unwrap();
    let applied_at = Timestamp::now();
    check_held(&ns, &planned, now, applied_at);

    // Delta: revoke some grants, add others, extend an inner host so the /24 around
    // it splits differently.
    let now2 = Timestamp::now();
    let mut g2: Vec<GrantRef> = grants(now)
        .into_iter()
        .filter(|g| g.number != port(443) && g.number != port(8003))
        .collect();
    g2.push(grant(
        900,
        22,
        Protocol::Tcp,
        "10.0.0.200",
        after(now2, 500_000),
    ));
    g2.push(grant(
        901,
        4444,
        Protocol::Udp,
        "2001:db8:9::/48",
        after(now2, 70_000),
    ));
    g2.push(grant(
        902,
        3389,
        Protocol::Any,
        "203.0.113.0/24",
        after(now2, 300_000),
    ));
    let desired = nft::plan_elements(&g2, now2);
    let (add, remove) = nft::diff(&planned, &desired, now2);
    assert!(!add.is_empty() && !remove.is_empty());
    let delta = nft::render_delta(&add, &remove, now2);
    ns.apply(&delta)
        .unwrap_or_else(|e| panic!("{e}\n--- delta ---\n{delta}"));
    let applied_at = Timestamp::now();
    let held = check_held(&ns, &desired, now2, applied_at);
    // The new elements carry their own timeouts, not the old ones.
    for a in &add {
        let (_, timeout) = held.iter().find(|(e, _)| e == a).unwrap();
        assert!(*timeout > nft::timeout_ms(a.end, now2).unwrap() - 10);
    }
    assert_eq!(nft::render_delta(&[], &[], now2), "");
}

/// Why the agent sends deltas over netlink, one element per message: in an `nft -f`
/// transaction, deleting an element the kernel has already expired fails and takes
/// the whole transaction down with it (the netlink path drops that one delete and
/// commits the rest; see the agent's `netlink_kernel` test).
#[test]
fn deleting_an_expired_element_fails_an_nft_transaction() {
    let ns = Netns::new("expired");
    let now = Timestamp::now();
    let short = nft::plan_elements(
        &[grant(1, 22, Protocol::Tcp, "10.0.0.1", after(now, 300))],
        now,
    );
    ns.apply(&nft::render_full(&[], &short, now)).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let now = Timestamp::now();
    let other = nft::plan_elements(
        &[grant(2, 22, Protocol::Tcp, "10.0.0.2", after(now, 60_000))],
        now,
    );
    let err = ns
        .apply(&nft::render_delta(&other, &short, now))
        .unwrap_err();
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(held_text(&ns, nft::HOSTS4).is_empty());

    // diff does not delete an element that has ended, so the delta applies.
    let (add, remove) = nft::diff(&short, &other, now);
    assert!(remove.is_empty());
    ns.apply(&nft::render_delta(&add, &remove, now)).unwrap();
    assert_eq!(held_text(&ns, nft::HOSTS4).len(), 1);
}

// ---------------------------------------------------------------------------------
// Random rule names: nft accepts the script and holds exactly the planned rules
// ---------------------------------------------------------------------------------

mod hostile_rules {
    include!("support/hostile_rules.rs");
}

/// Rule names as a hostile user might write them, within what `nft::validate`
/// accepts (1 to 128 characters).
fn arb_rules() -> impl Strategy<Value = Vec<NsgRule>> {
    let names = hostile_rules::arb_name()
        .prop_map(|n| n.chars().take(128).collect::<String>())
        .prop_filter("validate refuses empty names", |n| !n.is_empty());
    hostile_rules::arb_rules(names, 1, "\"; flush ruleset\n#")
}

/// A rule name as the kernel must hold its comment: printable ASCII kept, `"` and `\`
/// replaced (nft strings have no escapes), anything else `_`, at most 128 characters.
fn sanitized(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            c if c == ' ' || c.is_ascii_graphic() => c,
            _ => '_',
        })
        .take(128)
        .collect()
}

/// The chain the rules must give, derived from the rules alone (not from the script):
/// `(comment, verdict)` for the fixed rules (established, loopback, the four grant sets),
/// then for each rule by priority one line per source family (one for `*`).
fn expected_chain(rules: &[NsgRule]) -> Vec<(Option<String>, &'static str)> {
    // established/related, loopback, the four grant sets.
    let mut out = vec![(None, "accept"); 2 + nft::SETS.len()];
    let mut sorted: Vec<&NsgRule> = rules.iter().collect();
    sorted.sort_by_key(|r| r.priority);
    for r in sorted {
        let lines = if r.sources.contains(&SourcePrefix::Any) {
            1
        } else {
            let v4 = r
                .sources
                .iter()
                .any(|s| matches!(s, SourcePrefix::Net(IpNet::V4(_))));
            let v6 = r
                .sources
                .iter()
                .any(|s| matches!(s, SourcePrefix::Net(IpNet::V6(_))));
            usize::from(v4) + usize::from(v6)
        };
        let verdict = match (&r.origin, r.access) {
            (RuleOrigin::User, Access::Allow) => "accept",
            _ => "drop",
        };
        for _ in 0..lines {
            out.push((Some(sanitized(&r.name)), verdict));
        }
    }
    out
}

/// Random rule names, many cases: `nft -f` accepts every script, and the kernel then
/// holds exactly the planned table: one table, one chain, the four sets, the planned
/// counters, and the planned rules in order with their comments and verdicts.
#[test]
fn random_rule_names_give_exactly_the_planned_rules() {
    let ns = Netns::new("names");
    let mut runner = TestRunner::new(ProptestConfig::with_cases(32));
    let result = runner.run(&arb_rules(), |rules| {
        nft::validate(&rules).unwrap();
        let now = Timestamp::now();
        let elements = nft::plan_elements(
            &[
                grant(1, 22, Protocol::Tcp, "10.0.0.1", after(now, 60_000)),
                grant(2, 22, Protocol::Any, "2001:db8::/64", after(now, 60_000)),
            ],
            now,
        );
        let script = nft::render_full(&rules, &elements, now);
        ns.apply(&script)
            .unwrap_or_else(|e| panic!("{e}\n--- script ---\n{script}"));

        let text = ns.nft(&["-j", "list", "ruleset"]);
        let doc = serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        let objects = doc
            .get("nftables")
            .and_then(serde_json::Value::as_array)
            .unwrap();
        let of = |kind: &str| -> Vec<&serde_json::Value> {
            objects.iter().filter_map(|o| o.get(kind)).collect()
        };
        let name = |o: &serde_json::Value| {
            o.get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap()
                .to_owned()
        };
        let tables: Vec<String> = of("table")
            .iter()
            .map(|t| {
                format!(
                    "{} {}",
                    t.get("family").and_then(serde_json::Value::as_str).unwrap(),
                    name(t)
                )
            })
            .collect();
        assert_eq!(tables, ["inet jitgate"]);
        assert_eq!(
            of("chain").iter().map(|c| name(c)).collect::<Vec<_>>(),
            ["input"]
        );
        assert_eq!(
            of("set").iter().map(|c| name(c)).collect::<Vec<_>>(),
            nft::SETS
        );
        let counters: BTreeSet<String> = of("counter").iter().map(|c| name(c)).collect();
        let planned_counters: BTreeSet<String> = nft::deny_counter_names(&rules)
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert_eq!(counters, planned_counters);

        let held: Vec<(Option<String>, &'static str)> = of("rule")
            .iter()
            .map(|r| {
                assert_eq!(
                    r.get("chain").and_then(serde_json::Value::as_str),
                    Some("input")
                );
                let comment = r
                    .get("comment")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned);
                let expr = r.get("expr").and_then(serde_json::Value::as_array).unwrap();
                let verdict = if expr.iter().any(|e| e.get("accept").is_some()) {
                    "accept"
                } else if expr.iter().any(|e| e.get("drop").is_some()) {
                    "drop"
                } else {
                    panic!("rule without verdict: {r:?}")
                };
                (comment, verdict)
            })
            .collect();
        assert_eq!(held, expected_chain(&rules), "\n--- script ---\n{script}");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
