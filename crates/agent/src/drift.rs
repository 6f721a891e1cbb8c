//! Drift: any change to `table inet jitgate` made outside jitgate.
//!
//! Right after every apply the agent reads its table back (`nft -j list table inet
//! jitgate`) and keeps a [`Baseline`]: the table's structure (chains with hook,
//! priority and policy, rules in order, sets with type and flags, counters; handles
//! and counter values left out) and every set element with the moment it is due to
//! expire. Every second the watchdog reads the table again and [`compare`]s: a changed
//! structure, an element that disappeared before its end, an element that was added,
//! or one whose lifetime was extended is drift. The agent then reports it and rebuilds
//! the table from the last desired state (grants with their remaining lifetimes).
//!
//! Comparing the kernel with itself (rather than with the text the agent rendered)
//! makes the check independent of how nft prints what it was given.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

/// An element may vanish this long before its expected expiry without being drift
/// (nft prints lifetimes in whole seconds).
const SLACK: Duration = Duration::from_secs(2);

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
    /// (set, element) -> seconds left (None: no timeout).
    elements: BTreeMap<(String, String), Option<u64>>,
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

fn parse(json: &str) -> anyhow::Result<Listing> {
    let v: Value = serde_json::from_str(json)?;
    let mut structure = Vec::new();
    let mut elements = BTreeMap::new();
    for item in v["nftables"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let Some((kind, body)) = item.as_object().and_then(|m| m.iter().next()) else {
            continue;
        };
        if kind == "metainfo" {
            continue;
        }
        let mut body = body.clone();
        if kind == "set"
            && let Some(elems) = body.as_object_mut().and_then(|m| m.remove("elem"))
        {
            let set = body["name"].as_str().unwrap_or("").to_owned();
            for e in elems.as_array().map(Vec::as_slice).unwrap_or(&[]) {
                // With a timeout nft prints {"elem": {"val", "timeout", "expires"}};
                // without one, the bare value.
                let (val, left) = match e.get("elem") {
                    Some(inner) => (
                        inner["val"].clone(),
                        inner["expires"].as_u64().or(Some(0)).filter(|_| {
                            inner.get("timeout").is_some() || inner.get("expires").is_some()
                        }),
                    ),
                    None => (e.clone(), None),
                };
                elements.insert((set.clone(), val.to_string()), left);
            }
        }
        strip(&mut body);
        structure.push((summary(kind, &body), format!("{kind}:{body}")));
    }
    Ok(Listing {
        structure,
        elements,
    })
}

/// The baseline from the listing read right after an apply, at `at`.
pub fn baseline(json: &str, at: Instant) -> anyhow::Result<Baseline> {
    let l = parse(json)?;
    Ok(Baseline {
        structure: l.structure,
        elements: l
            .elements
            .into_iter()
            .map(|(k, left)| (k, left.map(|s| at + Duration::from_secs(s))))
            .collect(),
    })
}

/// What differs between the baseline and the table listed at `now` (`None`: the
/// table is gone). Empty when nothing does.
pub fn compare(base: &Baseline, now_json: Option<&str>, now: Instant) -> Vec<String> {
    let Some(json) = now_json else {
        return vec!["table inet jitgate was deleted".to_owned()];
    };
    let cur = match parse(json) {
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
            (Some(Some(t)), Some(s)) if now + Duration::from_secs(*s) > *t + SLACK => out.push(
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

    fn listing(rules: &[&str], elems: &[(&str, Option<u64>)]) -> String {
        let mut items = vec![
            serde_json::json!({"metainfo": {"version": "1.0.6"}}),
            serde_json::json!({"table": {"family": "inet", "name": "jitgate", "handle": 1}}),
            serde_json::json!({"counter": {"family": "inet", "name": "c", "table": "jitgate", "handle": 2, "packets": 5, "bytes": 300}}),
        ];
        let elem: Vec<Value> = elems
            .iter()
            .map(|(v, left)| match left {
                Some(s) => serde_json::json!({"elem": {"val": {"concat": [v, "tcp", 22]}, "timeout": 3600, "expires": s}}),
                None => serde_json::json!({"concat": [v, "tcp", 22]}),
            })
            .collect();
        items.push(serde_json::json!({"set": {"family": "inet", "name": "grants4", "table": "jitgate", "handle": 3, "flags": ["interval", "timeout"], "elem": elem}}));
        items.push(serde_json::json!({"chain": {"family": "inet", "table": "jitgate", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}));
        for (i, r) in rules.iter().enumerate() {
            items.push(serde_json::json!({"rule": {"family": "inet", "table": "jitgate", "chain": "input", "handle": 10 + i, "comment": r, "expr": [{"accept": null}]}}));
        }
        serde_json::json!({ "nftables": items }).to_string()
    }

    #[test]
    fn an_unchanged_table_is_no_drift_even_as_counters_and_lifetimes_move() {
        let t0 = Instant::now();
        let b = baseline(&listing(&["a", "b"], &[("10.0.0.1", Some(100))]), t0).unwrap();
        let later = listing(&["a", "b"], &[("10.0.0.1", Some(90))])
            .replace("\"packets\":5", "\"packets\":9");
        assert!(compare(&b, Some(&later), t0 + Duration::from_secs(10)).is_empty());
        // An element that reached its end is gone, as it should be.
        let gone = listing(&["a", "b"], &[]);
        assert!(compare(&b, Some(&gone), t0 + Duration::from_secs(99)).is_empty());
    }

    #[test]
    fn every_kind_of_change_is_drift() {
        let t0 = Instant::now();
        let b = baseline(&listing(&["a", "b"], &[("10.0.0.1", Some(100))]), t0).unwrap();
        let now = t0 + Duration::from_secs(1);
        let cases = [
            (
                Some(listing(&["a"], &[("10.0.0.1", Some(99))])),
                "removed or changed: rule \"b\"",
            ),
            (
                Some(listing(&["b", "a"], &[("10.0.0.1", Some(99))])),
                "reordered",
            ),
            (
                Some(listing(&["a", "b", "c"], &[("10.0.0.1", Some(99))])),
                "added: rule \"c\"",
            ),
            (
                Some(listing(&["a", "b"], &[])),
                "removed from set grants4 before its end",
            ),
            (
                Some(listing(
                    &["a", "b"],
                    &[("10.0.0.1", Some(99)), ("0.0.0.0/0", Some(99))],
                )),
                "added to set grants4",
            ),
            (
                Some(listing(&["a", "b"], &[("10.0.0.1", None)])),
                "has no timeout",
            ),
            (
                Some(listing(&["a", "b"], &[("10.0.0.1", Some(5000))])),
                "lifetime extended",
            ),
            (
                Some(
                    listing(&["a", "b"], &[("10.0.0.1", Some(99))])
                        .replace("\"prio\":0", "\"prio\":10"),
                ),
                "chain input",
            ),
            (
                Some(listing(&["a", "b"], &[("10.0.0.1", Some(99))]).replace("\"interval\",", "")),
                "set grants4",
            ),
            (None, "deleted"),
        ];
        for (cur, want) in cases {
            let d = compare(&b, cur.as_deref(), now);
            assert!(d.iter().any(|c| c.contains(want)), "{want}: {d:?}");
        }
    }
}
