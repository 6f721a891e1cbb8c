//! Drift: any change to `table inet jitgate` made outside jitgate.
//!
//! Right after every apply the agent reads its table back and keeps a [`Baseline`]:
//! the table's structure (`nft -t -j list table inet jitgate`: chains with hook,
//! priority and policy, rules in order, sets with type and flags, counters; handles
//! and counter values left out) and every set element with the moment it is due to
//! expire (read over netlink, to the millisecond; nft's JSON says whole seconds).
//! Whenever the kernel announces a change to the table made by another process, and
//! every few seconds as a backstop, the watchdog reads the table again and
//! [`compare`]s: a changed structure, an element that disappeared before its end, an
//! element that was added, or one whose lifetime was extended is drift. The agent
//! then reports it and rebuilds the table from the last desired state (grants with
//! their remaining lifetimes).
//!
//! Comparing the kernel with itself (rather than with the text the agent rendered)
//! makes the check independent of how nft prints what it was given.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jitgate_core::nfnl::Held;
use serde_json::Value;

/// An element may vanish this long before its expected expiry, or outlive it by
/// this much, without being drift: the kernel counts in ticks, and the table is read
/// a moment before the time it is compared at.
const SLACK: Duration = Duration::from_millis(500);

/// At most this many changes are described.
const MAX_CHANGES: usize = 20;

#[derive(Debug, Clone)]
pub struct Baseline {
    structure: Vec<(String, String)>,
    /// (set, element) -> when it expires (None: no timeout).
    elements: BTreeMap<(String, String), Option<Instant>>,
}

/// What one listing holds.
struct Listing {
    /// (summary for people, normalized JSON) of each object, in order.
    structure: Vec<(String, String)>,
    /// (set, element) -> milliseconds left (None: no timeout).
    elements: BTreeMap<(String, String), Option<u64>>,
}

/// The elements of the grant sets as read over netlink: (set, element).
pub type Elements = [(&'static str, Held)];

fn element_map(elements: &Elements) -> BTreeMap<(String, String), Option<u64>> {
    elements
        .iter()
        .map(|(set, h)| {
            let key = format!("{} . {} . {}", h.net, h.proto.as_str(), h.port);
            // An element with a timeout always reports the time left.
            let left = h.timeout_ms.map(|_| h.expires_ms.unwrap_or(0));
            (((*set).to_owned(), key), left)
        })
        .collect()
}

fn strip(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("handle");
            m.remove("packets");
            m.remove("bytes");
            m.values_mut().for_each(strip);
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

fn summary(kind: &str, body: &Value) -> String {
    let name = body["name"].as_str().unwrap_or("");
    match kind {
        "rule" => match body["comment"].as_str() {
            Some(c) => format!(
                "rule \"{c}\" in chain {}",
                body["chain"].as_str().unwrap_or("")
            ),
            None => {
                let mut e = body["expr"].to_string();
                e.truncate(160);
                format!("rule {e} in chain {}", body["chain"].as_str().unwrap_or(""))
            }
        },
        "chain" => format!(
            "chain {name} (hook {}, priority {}, policy {})",
            body["hook"].as_str().unwrap_or("-"),
            body["prio"],
            body["policy"].as_str().unwrap_or("-")
        ),
        _ => format!("{kind} {name}"),
    }
}

/// `structure` is `nft -t -j list table` (no elements); `elements` come over netlink.
fn parse(json: &str, elements: &Elements) -> anyhow::Result<Listing> {
    let v: Value = serde_json::from_str(json)?;
    let mut structure = Vec::new();
    for item in v["nftables"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let Some((kind, body)) = item.as_object().and_then(|m| m.iter().next()) else {
            continue;
        };
        if kind == "metainfo" {
            continue;
        }
        let mut body = body.clone();
        if let Some(m) = body.as_object_mut() {
            m.remove("elem");
        }
        strip(&mut body);
        structure.push((summary(kind, &body), format!("{kind}:{body}")));
    }
    Ok(Listing {
        structure,
        elements: element_map(elements),
    })
}

/// The baseline from the listing read right after an apply, at `at`.
pub fn baseline(json: &str, elements: &Elements, at: Instant) -> anyhow::Result<Baseline> {
    let l = parse(json, elements)?;
    Ok(Baseline {
        structure: l.structure,
        elements: l
            .elements
            .into_iter()
            .map(|(k, left)| (k, left.map(|ms| at + Duration::from_millis(ms))))
            .collect(),
    })
}

/// What differs between the baseline and the table listed at `now` (`None`: the
/// table is gone). Empty when nothing does.
pub fn compare(base: &Baseline, listing: Option<(&str, &Elements)>, now: Instant) -> Vec<String> {
    let Some((json, elements)) = listing else {
        return vec!["table inet jitgate was deleted".to_owned()];
    };
    let cur = match parse(json, elements) {
        Ok(c) => c,
        Err(e) => return vec![format!("the table cannot be read back: {e}")],
    };
    let mut out = Vec::new();
    if cur.structure != base.structure {
        for (summary, norm) in &base.structure {
            if !cur.structure.iter().any(|(_, n)| n == norm) {
                out.push(format!("removed or changed: {summary}"));
            }
        }
        for (summary, norm) in &cur.structure {
            if !base.structure.iter().any(|(_, n)| n == norm) {
                out.push(format!("added: {summary}"));
            }
        }
        if out.is_empty() {
            out.push("rules were reordered".to_owned());
        }
    }
    for ((set, elem), expires) in &base.elements {
        let due = expires.is_some_and(|t| t <= now + SLACK);
        if !due && !cur.elements.contains_key(&(set.clone(), elem.clone())) {
            out.push(format!(
                "element {elem} removed from set {set} before its end"
            ));
        }
    }
    for ((set, elem), left) in &cur.elements {
        match (base.elements.get(&(set.clone(), elem.clone())), left) {
            (None, _) => out.push(format!("element {elem} added to set {set}")),
            (Some(_), None) => out.push(format!("element {elem} in set {set} has no timeout")),
            (Some(Some(t)), Some(ms)) if now + Duration::from_millis(*ms) > *t + SLACK => out.push(
                format!("element {elem} in set {set} had its lifetime extended"),
            ),
            _ => {}
        }
    }
    if out.len() > MAX_CHANGES {
        let more = out.len() - MAX_CHANGES;
        out.truncate(MAX_CHANGES);
        out.push(format!("... and {more} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use jitgate_core::net::Port;
    use jitgate_core::nft::L4;

    type Table = (String, Vec<(&'static str, Held)>);

    /// A terse listing (as `nft -t -j` prints it) and the elements (as netlink
    /// dumps them: `left` is milliseconds, None for an element without timeout).
    fn listing(rules: &[&str], elems: &[(&str, Option<u64>)]) -> Table {
        let mut items = vec![
            serde_json::json!({"metainfo": {"version": "1.0.6"}}),
            serde_json::json!({"table": {"family": "inet", "name": "jitgate", "handle": 1}}),
            serde_json::json!({"counter": {"family": "inet", "name": "c", "table": "jitgate", "handle": 2, "packets": 5, "bytes": 300}}),
        ];
        items.push(serde_json::json!({"set": {"family": "inet", "name": "nets4", "table": "jitgate", "handle": 3, "flags": ["interval", "timeout"]}}));
        items.push(serde_json::json!({"chain": {"family": "inet", "table": "jitgate", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}));
        for (i, r) in rules.iter().enumerate() {
            items.push(serde_json::json!({"rule": {"family": "inet", "table": "jitgate", "chain": "input", "handle": 10 + i, "comment": r, "expr": [{"accept": null}]}}));
        }
        let elements = elems
            .iter()
            .map(|(net, left)| {
                (
                    "nets4",
                    Held {
                        net: net.parse().unwrap(),
                        proto: L4::Tcp,
                        port: Port::new(22).unwrap(),
                        timeout_ms: left.map(|_| 3_600_000),
                        expires_ms: *left,
                    },
                )
            })
            .collect();
        (
            serde_json::json!({ "nftables": items }).to_string(),
            elements,
        )
    }

    fn of(t: &Table) -> Option<(&str, &Elements)> {
        Some((t.0.as_str(), t.1.as_slice()))
    }

    #[test]
    fn an_unchanged_table_is_no_drift_even_as_counters_and_lifetimes_move() {
        let t0 = Instant::now();
        let (json, els) = listing(&["a", "b"], &[("10.0.0.0/8", Some(100_000))]);
        let b = baseline(&json, &els, t0).unwrap();
        let mut later = listing(&["a", "b"], &[("10.0.0.0/8", Some(90_000))]);
        later.0 = later.0.replace("\"packets\":5", "\"packets\":9");
        assert!(compare(&b, of(&later), t0 + Duration::from_secs(10)).is_empty());
        // An element that reached its end is gone, as it should be.
        let gone = listing(&["a", "b"], &[]);
        assert!(compare(&b, of(&gone), t0 + Duration::from_millis(99_800)).is_empty());
    }

    #[test]
    fn every_kind_of_change_is_drift() {
        let t0 = Instant::now();
        let (json, els) = listing(&["a", "b"], &[("10.0.0.0/8", Some(100_000))]);
        let b = baseline(&json, &els, t0).unwrap();
        let now = t0 + Duration::from_secs(1);
        let same = &[("10.0.0.0/8", Some(99_000))];
        let mut prio = listing(&["a", "b"], same);
        prio.0 = prio.0.replace("\"prio\":0", "\"prio\":10");
        let mut flags = listing(&["a", "b"], same);
        flags.0 = flags.0.replace("\"interval\",", "");
        let cases = [
            (listing(&["a"], same), "removed or changed: rule \"b\""),
            (listing(&["b", "a"], same), "reordered"),
            (listing(&["a", "b", "c"], same), "added: rule \"c\""),
            // A second early: the millisecond lifetimes tell it from expiry.
            (
                listing(&["a", "b"], &[]),
                "removed from set nets4 before its end",
            ),
            (
                listing(
                    &["a", "b"],
                    &[("10.0.0.0/8", Some(99_000)), ("0.0.0.0/0", Some(99_000))],
                ),
                "added to set nets4",
            ),
            (
                listing(&["a", "b"], &[("10.0.0.0/8", None)]),
                "has no timeout",
            ),
            (
                listing(&["a", "b"], &[("10.0.0.0/8", Some(100_000))]),
                "lifetime extended",
            ),
            (prio, "chain input"),
            (flags, "set nets4"),
        ];
        for (cur, want) in cases {
            let d = compare(&b, of(&cur), now);
            assert!(d.iter().any(|c| c.contains(want)), "{want}: {d:?}");
        }
        assert!(compare(&b, None, now).iter().any(|c| c.contains("deleted")));
        // Within the slack of the kernel's ticks: no drift.
        let close = listing(&["a", "b"], &[("10.0.0.0/8", Some(99_300))]);
        assert!(compare(&b, of(&close), now).is_empty());
    }
}
