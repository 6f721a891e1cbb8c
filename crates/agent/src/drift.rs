//! Drift: any change to `table inet jitgate` made outside jitgate.
//!
//! Two comparisons:
//!
//! * **Structure**: right after every full rebuild the agent reads its table back
//!   (`nft -t -j list ruleset`, its items of this table: chains with hook, priority and policy,
//!   rules in order, sets with type and flags, counters; handles and counter values
//!   left out) and keeps it as the [`Baseline`]; a later listing that differs is
//!   drift. Comparing the kernel with itself keeps this independent of how nft prints
//!   what it was given. A delta changes only elements, so the baseline stays.
//! * **Elements**: what the kernel holds (dumped over netlink, lifetimes to the
//!   millisecond) against what the agent applied ([`compare_elements`]): an element
//!   the agent did not put there, one without a timeout, one that outlives its
//!   grant, or one gone before its grant's end is drift.
//!
//! The agent compares whenever the kernel announces a change to the table made by
//! another process, and periodically as a backstop; on drift it reports and rebuilds
//! the table from the last desired state (grants with their remaining lifetimes).
//!
//! A read of the elements is only trusted when no change happened while it ran (the
//! kernel walks a set again from the start for each part of a dump). At 100,000
//! elements a read takes about half a second, so a steady stream of grants and
//! revokes interrupts every one: [`ElementReads`] paces the reads again, and makes
//! one complete by holding the agent's own changes while it reads.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use jitgate_core::Timestamp;
use jitgate_core::gateway::{self, Entry, GwElement};
use jitgate_core::net::Port;
use jitgate_core::nfnl::{GwHeld, Held};
use jitgate_core::nft::{Element, L4};
use serde_json::Value;

/// An element may vanish this long before its grant's end (beyond the agent's commit
/// margin), or outlive it by this much, without being drift: the kernel counts in
/// ticks.
const SLACK: Duration = Duration::from_millis(500);

/// When a dump of the elements ran: each element's time left was read at some moment
/// in between (half a second apart at 100,000 elements). An element outlives its grant
/// only if it does so counted from the start; it is gone early only if its grant was
/// still due at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAt {
    pub from: Timestamp,
    pub to: Timestamp,
}

impl ReadAt {
    /// A read taken as one moment.
    pub fn instant(at: Timestamp) -> Self {
        ReadAt { from: at, to: at }
    }
}

/// At most this many changes are described.
const MAX_CHANGES: usize = 20;

/// The pace of the element reads that changes interrupt. An interrupted read is tried
/// again at the watchdog's usual pause (not at once: each try costs a whole dump, and
/// under a steady stream of changes a read at once is interrupted again). After
/// [`ElementReads::HOLD_AFTER`] interrupted reads in a row, the next read holds the
/// agent's own changes until it has read: a change waits at most one read (about half
/// a second at 100,000 elements, a second if its first try is interrupted), and the
/// agent's own traffic cannot put the backstop comparison off forever. Another
/// process's change can still interrupt a held read (the kernel's notifications report
/// that change anyway); the next read then holds again.
///
/// A read made because the kernel announced that another process changed the table
/// ([`ElementReads::foreign_change`]) holds at once, and so do the reads after it
/// until one completes: that change may be an attack, and a stream of the agent's own
/// changes must not put off finding it (three interrupted reads are 15 s at the
/// default pause).
///
/// Both moments are logged (info), naming the table: when the reads start to hold
/// after interruptions, and when a held read completed.
#[derive(Debug, Default)]
pub struct ElementReads {
    interrupted: u32,
    /// Another process changed the table since the last completed read.
    foreign: bool,
    table: &'static str,
}

impl ElementReads {
    /// Interrupted reads in a row after which the next read holds changes.
    pub const HOLD_AFTER: u32 = 3;

    /// The reads of the elements of `table inet <table>`.
    pub fn of(table: &'static str) -> Self {
        ElementReads {
            interrupted: 0,
            foreign: false,
            table,
        }
    }

    /// Whether the next read of the elements holds the agent's own changes.
    pub fn hold(&self) -> bool {
        self.foreign || self.interrupted >= Self::HOLD_AFTER
    }

    /// The kernel announced a change of the table by another process: the reads hold
    /// until one completes.
    pub fn foreign_change(&mut self) {
        self.foreign = true;
    }

    /// A read of the elements was interrupted by changes.
    fn interrupted(&mut self) {
        self.interrupted = self.interrupted.saturating_add(1);
    }

    /// A read of the elements completed (compared, drift or not).
    fn completed(&mut self) {
        self.interrupted = 0;
        self.foreign = false;
    }

    /// Records how a check that was to read the elements (`elements`) went; true
    /// when the next check must read them (changes interrupted this read).
    pub fn record(&mut self, elements: bool, found: Check) -> bool {
        match found {
            Check::Interrupted => {
                self.interrupted();
                if self.interrupted == Self::HOLD_AFTER {
                    tracing::info!(
                        table = self.table,
                        reads = self.interrupted,
                        "changes interrupted every read of the set elements; the next read holds this agent's own changes until it has read"
                    );
                }
                true
            }
            Check::Retry => false,
            Check::Same | Check::Drift | Check::Confirmed => {
                if elements {
                    if self.hold() {
                        tracing::info!(
                            table = self.table,
                            drift = found == Check::Drift,
                            "a read of the set elements that held this agent's own changes completed"
                        );
                    }
                    self.completed();
                }
                false
            }
        }
    }
}

/// What a drift check (the agent's or the gateway's) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Same,
    /// An apply ran during the read-back: read again shortly.
    Retry,
    /// Changes interrupted the read of the elements: read them again later (see
    /// [`ElementReads`]).
    Interrupted,
    /// Drift (the gateway records it on the machines it concerns).
    Drift,
    /// A table found drifted earlier is as applied again.
    Confirmed,
}

/// The table's structure as read back after a full rebuild.
#[derive(Debug, Clone)]
pub struct Baseline {
    table: String,
    structure: Vec<(String, String)>,
}

/// The elements of the grant sets as read over netlink: (set, element).
pub type Elements = [(&'static str, Held)];

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

/// The structure in a terse JSON listing of the table (elements, if any, are left out).
fn parse(json: &str) -> anyhow::Result<Vec<(String, String)>> {
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
    Ok(structure)
}

/// The baseline of `table inet <table>` from its listing read right after a full
/// rebuild.
pub fn baseline(table: &str, json: &str) -> anyhow::Result<Baseline> {
    Ok(Baseline {
        table: table.to_owned(),
        structure: parse(json)?,
    })
}

/// How the structure listed now differs from the baseline (`None`: the table is
/// gone). Empty when it does not.
pub fn compare_structure(base: &Baseline, listing: Option<&str>) -> Vec<String> {
    let Some(json) = listing else {
        return vec![format!("table inet {} was deleted", base.table)];
    };
    let cur = match parse(json) {
        Ok(c) => c,
        Err(e) => return vec![format!("the table cannot be read back: {e}")],
    };
    let mut out = Vec::new();
    if cur != base.structure {
        for (summary, norm) in &base.structure {
            if !cur.iter().any(|(_, n)| n == norm) {
                out.push(format!("removed or changed: {summary}"));
            }
        }
        for (summary, norm) in &cur {
            if !base.structure.iter().any(|(_, n)| n == norm) {
                out.push(format!("added: {summary}"));
            }
        }
        if out.is_empty() {
            out.push("rules were reordered".to_owned());
        }
    }
    out
}

fn describe(set: &str, net: IpNet, proto: L4, port: Port) -> String {
    format!("{net} . {} . {port} in set {set}", proto.as_str())
}

/// How the elements the kernel holds (`held`, dumped during `read`) differ from those
/// the agent applied (`expected`, each with its grant's end). `margin` is the most the
/// agent shortens a timeout to be sure it never ends late.
pub fn compare_elements(
    expected: &[Element],
    held: &Elements,
    read: ReadAt,
    margin: Duration,
) -> Vec<String> {
    let want: HashMap<(&str, IpNet, L4, Port), Timestamp> = expected
        .iter()
        .map(|e| ((e.set(), e.net, e.proto, e.port), e.end))
        .collect();
    let mut out = Vec::new();
    let mut present = std::collections::HashSet::with_capacity(held.len());
    for (set, h) in held {
        let key = (*set, h.net, h.proto, h.port);
        present.insert(key);
        let what = describe(set, h.net, h.proto, h.port);
        match (want.get(&key), h.timeout_ms, h.expires_ms) {
            (None, _, _) => out.push(format!("element {what} was added")),
            (Some(_), None, _) => out.push(format!("element {what} has no timeout")),
            (Some(end), Some(_), left) => {
                let expires = read
                    .from
                    .checked_add(Duration::from_millis(left.unwrap_or(0)))
                    .unwrap_or(Timestamp::MAX);
                let latest = end.checked_add(SLACK).unwrap_or(Timestamp::MAX);
                if expires > latest {
                    out.push(format!("element {what} had its lifetime extended"));
                }
            }
        }
    }
    let still_due = read
        .to
        .checked_add(margin + SLACK)
        .unwrap_or(Timestamp::MAX);
    for e in expected {
        if e.end > still_due && !present.contains(&(e.set(), e.net, e.proto, e.port)) {
            out.push(format!(
                "element {} was removed before its end",
                describe(e.set(), e.net, e.proto, e.port)
            ));
        }
    }
    out
}

fn describe_gw(e: &Entry) -> String {
    match e.to_port {
        None => format!(
            "{} . {} . {} . {} in set {}",
            e.net,
            e.address,
            e.proto.as_str(),
            e.port,
            e.set
        ),
        Some(to) => format!(
            "{} . {} . {} . {} : {} . {to} in map {}",
            e.public.map_or_else(|| "?".to_owned(), |p| p.to_string()),
            e.net,
            e.proto.as_str(),
            e.port,
            e.address,
            e.set
        ),
    }
}

/// How the elements of `table inet jitgate_gw` (`held`, dumped during `read`) differ from
/// those the gateway applied (`expected`): each change with the address of the
/// machine it concerns, so it is reported on that machine.
pub fn compare_gateway_elements(
    expected: &[GwElement],
    held: &[(&'static str, GwHeld)],
    read: ReadAt,
) -> Vec<(IpAddr, String)> {
    let want: HashMap<Entry, Timestamp> = expected
        .iter()
        .flat_map(|e| gateway::entries(e).into_iter().map(|x| (x, e.end)))
        .collect();
    let mut out = Vec::new();
    let mut present = std::collections::HashSet::with_capacity(held.len());
    for (set, h) in held {
        let entry = Entry {
            set,
            public: h.public,
            net: h.net,
            proto: h.proto,
            port: h.port,
            address: h.address,
            to_port: h.to_port,
        };
        present.insert(entry);
        let what = describe_gw(&entry);
        let change = match (want.get(&entry), h.timeout_ms) {
            (None, _) => format!("element {what} was added"),
            (Some(_), None) => format!("element {what} has no timeout"),
            (Some(end), Some(_)) => {
                let expires = read
                    .from
                    .checked_add(Duration::from_millis(h.expires_ms.unwrap_or(0)))
                    .unwrap_or(Timestamp::MAX);
                if expires <= end.checked_add(SLACK).unwrap_or(Timestamp::MAX) {
                    continue;
                }
                format!("element {what} had its lifetime extended")
            }
        };
        out.push((h.address, change));
    }
    let still_due = read.to.checked_add(SLACK).unwrap_or(Timestamp::MAX);
    for (entry, end) in &want {
        if *end > still_due && !present.contains(entry) {
            out.push((
                entry.address,
                format!("element {} was removed before its end", describe_gw(entry)),
            ));
        }
    }
    out.sort();
    out
}

/// Cuts a long list of changes to [`MAX_CHANGES`] with a count of the rest.
pub fn limit(mut out: Vec<String>) -> Vec<String> {
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

    /// Interrupted reads do not hold changes until [`ElementReads::HOLD_AFTER`] of
    /// them in a row; a completed read starts the count again.
    #[test]
    fn element_reads_hold_changes_after_interruptions_in_a_row_or_a_foreign_change() {
        let mut r = ElementReads::default();
        for _ in 0..ElementReads::HOLD_AFTER {
            assert!(!r.hold());
            r.interrupted();
        }
        assert!(r.hold());
        r.interrupted();
        assert!(
            r.hold(),
            "still held while interrupted (by another process)"
        );
        r.completed();
        assert!(!r.hold());
        r.interrupted();
        assert!(!r.hold());
        // As the watchdogs record their checks: a retry for another reason, or a
        // check without elements, neither counts nor resets.
        let mut r = ElementReads::default();
        assert!(r.record(true, Check::Interrupted));
        assert!(!r.record(true, Check::Retry));
        assert!(!r.record(false, Check::Same));
        assert!(r.record(true, Check::Interrupted));
        assert!(r.record(true, Check::Interrupted));
        assert!(r.hold());
        assert!(!r.record(true, Check::Same));
        assert!(!r.hold());
        // Another process changed the table: held at once, and until a read completes.
        r.foreign_change();
        assert!(r.hold());
        assert!(r.record(true, Check::Interrupted));
        assert!(r.hold());
        assert!(!r.record(false, Check::Same), "a check without elements");
        assert!(r.hold());
        assert!(!r.record(true, Check::Drift));
        assert!(!r.hold());
    }

    fn listing(rules: &[&str]) -> String {
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
        serde_json::json!({ "nftables": items }).to_string()
    }

    #[test]
    fn the_structure_is_compared_without_handles_or_counter_values() {
        let b = baseline("jitgate", &listing(&["a", "b"])).unwrap();
        let later = listing(&["a", "b"]).replace("\"packets\":5", "\"packets\":9");
        assert!(compare_structure(&b, Some(&later)).is_empty());
        let cases = [
            (listing(&["a"]), "removed or changed: rule \"b\""),
            (listing(&["b", "a"]), "reordered"),
            (listing(&["a", "b", "c"]), "added: rule \"c\""),
            (
                listing(&["a", "b"]).replace("\"prio\":0", "\"prio\":10"),
                "chain input",
            ),
            (
                listing(&["a", "b"]).replace("\"interval\",", ""),
                "set nets4",
            ),
        ];
        for (cur, want) in cases {
            let d = compare_structure(&b, Some(&cur));
            assert!(d.iter().any(|c| c.contains(want)), "{want}: {d:?}");
        }
        assert!(compare_structure(&b, None)[0].contains("deleted"));
    }

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn at(ms: i64) -> Timestamp {
        t0().checked_add(jiff::SignedDuration::from_millis(ms))
            .unwrap()
    }

    fn el(net: &str, end_ms: i64) -> Element {
        Element {
            net: net.parse().unwrap(),
            proto: L4::Tcp,
            port: Port::new(22).unwrap(),
            end: at(end_ms),
        }
    }

    fn held(net: &str, left: Option<u64>) -> (&'static str, Held) {
        let net: IpNet = net.parse().unwrap();
        let set = el(&net.to_string(), 0).set();
        (
            set,
            Held {
                net,
                proto: L4::Tcp,
                port: Port::new(22).unwrap(),
                timeout_ms: left.map(|_| 3_600_000),
                expires_ms: left,
            },
        )
    }

    #[test]
    fn the_elements_are_compared_with_what_the_agent_applied() {
        let margin = Duration::from_millis(100);
        let expected = [
            el("10.0.0.1/32", 100_000),
            el("10.0.0.0/8", 50_000),
            el("10.0.0.9/32", 300),
        ];
        // At 1 s, everything as applied: each element expires a little before its end
        // (the agent's margin); the one ending at 300 ms has gone, as it should.
        let ok = [
            held("10.0.0.1/32", Some(98_950)),
            held("10.0.0.0/8", Some(48_900)),
        ];
        assert!(compare_elements(&expected, &ok, ReadAt::instant(at(1_000)), margin).is_empty());
        // Within the slack of the kernel's ticks: no drift either.
        let close = [
            held("10.0.0.1/32", Some(99_300)),
            held("10.0.0.0/8", Some(48_900)),
        ];
        assert!(compare_elements(&expected, &close, ReadAt::instant(at(1_000)), margin).is_empty());

        let cases: [(&[(&'static str, Held)], &str); 5] = [
            (
                &[held("10.0.0.0/8", Some(48_900))],
                "10.0.0.1/32 . tcp . 22 in set hosts4 was removed before its end",
            ),
            (
                &[
                    held("10.0.0.1/32", Some(98_950)),
                    held("10.0.0.0/8", Some(48_900)),
                    held("10.0.0.2/32", Some(5_000)),
                ],
                "10.0.0.2/32 . tcp . 22 in set hosts4 was added",
            ),
            (
                &[held("10.0.0.1/32", None), held("10.0.0.0/8", Some(48_900))],
                "has no timeout",
            ),
            (
                &[
                    held("10.0.0.1/32", Some(200_000)),
                    held("10.0.0.0/8", Some(48_900)),
                ],
                "10.0.0.1/32 . tcp . 22 in set hosts4 had its lifetime extended",
            ),
            (
                &[held("10.0.0.1/32", Some(98_950))],
                "10.0.0.0/8 . tcp . 22 in set nets4 was removed",
            ),
        ];
        for (cur, want) in cases {
            let d = compare_elements(&expected, cur, ReadAt::instant(at(1_000)), margin);
            assert!(d.iter().any(|c| c.contains(want)), "{want}: {d:?}");
        }
        // The same address in the other set's shape is not the applied element.
        let wrong_set = [
            ("nets4", held("10.0.0.1/32", Some(98_950)).1),
            held("10.0.0.0/8", Some(48_900)),
        ];
        let d = compare_elements(&expected, &wrong_set, ReadAt::instant(at(1_000)), margin);
        assert!(
            d.iter().any(|c| c.contains("in set nets4 was added")),
            "{d:?}"
        );
        let many: Vec<String> = (0..30).map(|i| i.to_string()).collect();
        assert_eq!(limit(many).len(), MAX_CHANGES + 1);

        // A long read (from 1 s to 1.9 s): an element read at its start, as applied,
        // is not taken for one extended (counted from the read's end it would be), and
        // one that ended during the read is not taken for one removed early.
        let long = ReadAt {
            from: at(1_000),
            to: at(1_900),
        };
        let expected = [el("10.0.0.1/32", 100_000), el("10.0.0.2/32", 1_800)];
        let read_early = [held("10.0.0.1/32", Some(98_950))];
        assert_eq!(
            compare_elements(&expected, &read_early, long, margin),
            Vec::<String>::new()
        );
        assert!(
            !compare_elements(&expected, &read_early, ReadAt::instant(at(1_900)), margin)
                .is_empty(),
            "counted from the end, the same read is drift"
        );
        // Extended by more than the slack counted from the read's start: drift still.
        let extended = [held("10.0.0.1/32", Some(99_700))];
        assert!(
            compare_elements(&expected, &extended, long, margin)
                .iter()
                .any(|c| c.contains("had its lifetime extended"))
        );
    }
}
