//! The nftables plan: a VM's desired state as text for `nft -f`.
//!
//! jitgate owns exactly one table, `inet jitgate`, and never names another one. Its
//! content is:
//!
//! * four sets of live grants, by shape. A grant for one address (a /32 or /128, the
//!   common "My IP" case) goes into `hosts4` (`ipv4_addr . inet_proto . inet_service`)
//!   or `hosts6` (`ipv6_addr . ...`), hash sets with `flags timeout`, where the kernel
//!   adds and deletes an element in microseconds whatever the set's size. A grant for
//!   a prefix goes into `nets4` or `nets6`, `flags interval, timeout`, which the kernel
//!   keeps in its pipapo backend (a delete there costs milliseconds on a large set).
//!   Every element carries a kernel timeout equal to the time left until its grant's
//!   end, rounded *down* to the millisecond, so a grant closes in the kernel on time
//!   even when the agent and the controller are dead;
//! * one named counter per JIT deny rule, which is how the agent reports blocked
//!   attempts per protected port;
//! * one `input` chain: established traffic, then the four grant sets, then the VM's
//!   NSG rules (user allow/deny rules and JIT deny rules) in priority order.
//!
//! The chain accepts a packet that any of the sets matches, so an address is open
//! until the latest end among the grants containing it, whichever set holds them.
//!
//! Why the prefix elements are planned here rather than written as they come: nft
//! rejects overlapping intervals in an interval set ("File exists"), and for a
//! concatenation the key space is the whole tuple, so `10.0.0.0/8 . tcp . 22` and
//! `10.1.0.0/16 . tcp . 22` collide. [`plan_elements`] turns the prefix grants into
//! disjoint CIDR elements that cover, for every address, exactly the latest end among
//! the prefix grants containing it. Single-address grants need no such care: one
//! element per address, protocol and port, with the latest end.
//!
//! Why text and not JSON: with nft 1.0.6's JSON input a fractional `"timeout": 1.5` is
//! silently dropped and the element is added *without any timeout*, i.e. permanent
//! access. The text syntax takes milliseconds (`timeout 2345ms`, verified against nft
//! 1.0.6, as is `2s345ms`).
//!
//! Why elements with less than [`MIN_TIMEOUT_MS`] left are dropped rather than written
//! with a tiny timeout: kernels without upstream commit e0c47281723f ("netfilter:
//! nf_tables: elements with timeout below CONFIG_HZ never expire", 2024) convert the
//! millisecond timeout to jiffies rounding down, and a timeout shorter than one jiffy
//! becomes 0, which allocates no expiration at all: the element is permanent. One
//! jiffy is at most 10 ms (`CONFIG_HZ=100`), so nothing under 10 ms is ever written.
//! The kernel's own rounding to jiffies is downwards too, so it never extends a grant.
//!
//! [`render_full`] replaces the whole table in one atomic `nft -f` transaction (used
//! at start and whenever a delta cannot be trusted). The common case, a grant opening
//! or being revoked, adds and deletes elements: the agent sends those over netlink as
//! one batch ([`crate::nfnl`]); [`render_delta`] is the same change as nft text.
//!
//! A timeout is relative: the kernel starts counting when it commits the transaction,
//! not at `now`. Callers take `now` immediately before running `nft`, so an element
//! outlives its end by at most the time `nft` takes to commit.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use jiff::Timestamp;

use crate::net::{Port, PortRange, Protocol, SourcePrefix};
use crate::nsg::{Access, GrantRef, MAX_PRIORITY, MIN_PRIORITY, NsgRule, RuleOrigin};

/// The one table jitgate owns (family `inet`).
pub const TABLE: &str = "jitgate";
/// The hash set of single-address IPv4 grants.
pub const HOSTS4: &str = "hosts4";
/// The hash set of single-address IPv6 grants.
pub const HOSTS6: &str = "hosts6";
/// The interval set of IPv4 prefix grants.
pub const NETS4: &str = "nets4";
/// The interval set of IPv6 prefix grants.
pub const NETS6: &str = "nets6";
/// Every grant set, in the order they are rendered and matched.
pub const SETS: [&str; 4] = [HOSTS4, NETS4, HOSTS6, NETS6];
/// Elements with less time left than this are not written (see the module docs: a
/// timeout below one jiffy is permanent on unpatched kernels).
pub const MIN_TIMEOUT_MS: i64 = 10;
/// Longest rule name accepted by [`validate`], in characters. User rule names are at
/// most 80, but the JIT deny rules' are `JIT-Deny-<policy name>-<port>`, up to 105
/// with a 90-character policy name; a lower limit here made the agent refuse every
/// state of such a policy's VMs. It is the nft comment limit, so no name is cut.
pub const MAX_RULE_NAME_LEN: usize = MAX_COMMENT_LEN;
/// nft refuses comments longer than this.
const MAX_COMMENT_LEN: usize = 128;

/// A transport protocol as the kernel sees it (`*` is expanded into both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    /// The nft keyword (`tcp`, `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }

    /// The kernel protocols a rule's protocol stands for.
    pub fn of(protocol: Protocol) -> &'static [L4] {
        match protocol {
            Protocol::Tcp => &[L4::Tcp],
            Protocol::Udp => &[L4::Udp],
            Protocol::Any => &[L4::Tcp, L4::Udp],
        }
    }
}

/// One element of a grant set: traffic from `net` with protocol `proto` to `port` is
/// allowed until `end`. A host prefix (/32, /128) is an element of `hosts4`/`hosts6`,
/// any other of `nets4`/`nets6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Element {
    pub net: IpNet,
    pub proto: L4,
    pub port: Port,
    pub end: Timestamp,
}

impl Element {
    /// True for a single address (/32 or /128): an element of a hash set.
    pub fn is_host(&self) -> bool {
        self.net.prefix_len() == self.net.max_prefix_len()
    }

    /// The set that holds this element.
    pub fn set(&self) -> &'static str {
        match (self.net, self.is_host()) {
            (IpNet::V4(_), true) => HOSTS4,
            (IpNet::V4(_), false) => NETS4,
            (IpNet::V6(_), true) => HOSTS6,
            (IpNet::V6(_), false) => NETS6,
        }
    }

    /// The element's key in nft syntax, without timeout (a host set's key is an
    /// address, an interval set's a prefix).
    fn key(&self) -> String {
        if self.is_host() {
            format!(
                "{} . {} . {}",
                self.net.addr(),
                self.proto.as_str(),
                self.port
            )
        } else {
            format!("{} . {} . {}", self.net, self.proto.as_str(), self.port)
        }
    }

    /// True when both elements would collide in one set.
    pub fn overlaps(&self, other: &Element) -> bool {
        self.set() == other.set()
            && self.proto == other.proto
            && self.port == other.port
            && (self.net.contains(&other.net) || other.net.contains(&self.net))
    }
}

/// The deterministic order of elements: family, protocol, port, network, end.
pub(crate) fn element_order(e: &Element) -> (bool, L4, Port, IpNet, Timestamp) {
    (matches!(e.net, IpNet::V6(_)), e.proto, e.port, e.net, e.end)
}

/// Whole milliseconds left until `end`, or `None` when fewer than
/// [`MIN_TIMEOUT_MS`] remain. Rounded down: the kernel never holds an element past
/// its end because of rounding.
pub fn timeout_ms(end: Timestamp, now: Timestamp) -> Option<i64> {
    let ms = end.duration_since(now).as_millis();
    if ms < i128::from(MIN_TIMEOUT_MS) {
        return None;
    }
    Some(i64::try_from(ms).unwrap_or(i64::MAX))
}

// ---------------------------------------------------------------------------------
// Planning
// ---------------------------------------------------------------------------------

fn grant_nets(source: &SourcePrefix) -> Vec<IpNet> {
    match source {
        SourcePrefix::Any => vec![
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ],
        SourcePrefix::Net(n) => vec![n.trunc()],
    }
}

/// Turns live grants into set elements.
///
/// Single-address grants give one element per address, protocol and port, ending at
/// the latest end among them. Prefix grants give disjoint elements: for every
/// (family, protocol, port) they cover each address with exactly the latest end among
/// the prefix grants containing it, and no two overlap. Grants with less than
/// [`MIN_TIMEOUT_MS`] left produce nothing. The result is sorted.
///
/// Method for prefixes: take them latest end first (broader first on equal ends) and
/// add to each only the part not yet covered, as CIDRs. Everything already covered
/// ends at least as late, so an identical or nested prefix that ends no later is
/// dropped, and an outer prefix around a later inner one is split around it.
pub fn plan_elements(grants: &[GrantRef], now: Timestamp) -> Vec<Element> {
    let mut out = Vec::new();
    for (group, items) in group_grants(grants, now) {
        out.extend(plan_group(group, items));
    }
    out.sort_by_key(element_order);
    out
}

/// Elements are planned independently per group: the same family, set shape,
/// protocol and port. The agent replans only the groups a change touches.
pub type Group = (bool, bool, L4, Port);

/// A grant's (group, prefix) pairs: `*` is both families, protocol `*` both
/// protocols.
pub fn grant_parts(g: &GrantRef) -> impl Iterator<Item = (Group, IpNet)> + '_ {
    grant_nets(&g.source).into_iter().flat_map(move |net| {
        L4::of(g.protocol).iter().map(move |proto| {
            let host = net.prefix_len() == net.max_prefix_len();
            ((matches!(net, IpNet::V6(_)), host, *proto, g.number), net)
        })
    })
}

/// The live grants' (prefix, end) pairs, by group.
pub fn group_grants(
    grants: &[GrantRef],
    now: Timestamp,
) -> BTreeMap<Group, Vec<(IpNet, Timestamp)>> {
    let mut groups: BTreeMap<Group, Vec<(IpNet, Timestamp)>> = BTreeMap::new();
    for g in grants.iter().filter(|g| timeout_ms(g.end, now).is_some()) {
        for (group, net) in grant_parts(g) {
            groups.entry(group).or_default().push((net, g.end));
        }
    }
    groups
}

/// The elements of one group (see [`plan_elements`]), sorted by network.
pub fn plan_group(group: Group, mut items: Vec<(IpNet, Timestamp)>) -> Vec<Element> {
    let (_, host, proto, port) = group;
    let element = |(net, end): (IpNet, Timestamp)| Element {
        net,
        proto,
        port,
        end,
    };
    if host {
        let mut latest: BTreeMap<IpNet, Timestamp> = BTreeMap::new();
        for (net, end) in items {
            let e = latest.entry(net).or_insert(end);
            *e = (*e).max(end);
        }
        return latest.into_iter().map(element).collect();
    }
    items.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(a.0.prefix_len().cmp(&b.0.prefix_len()))
            .then(a.0.cmp(&b.0))
    });
    // Disjoint nets chosen so far, keyed by network address.
    let mut chosen: BTreeMap<IpAddr, (IpNet, Timestamp)> = BTreeMap::new();
    for (net, end) in items {
        // Disjoint CIDRs never share a network address, so a chosen net that
        // contains `net` is the last one starting at or before it.
        if let Some((_, (c, _))) = chosen.range(..=net.network()).next_back()
            && c.contains(&net)
        {
            continue;
        }
        let inside: Vec<IpNet> = chosen
            .range(net.network()..=net.broadcast())
            .map(|(_, (c, _))| *c)
            .collect();
        for part in subtract(net, &inside) {
            chosen.insert(part.network(), (part, end));
        }
    }
    chosen.into_values().map(element).collect()
}

/// `net` minus the union of `covered`, as CIDRs. Any two CIDRs are nested or
/// disjoint, so halving `net` until no half partially overlaps `covered` terminates
/// within the address length.
fn subtract(net: IpNet, covered: &[IpNet]) -> Vec<IpNet> {
    let hits: Vec<IpNet> = covered
        .iter()
        .copied()
        .filter(|c| net.contains(c) || c.contains(&net))
        .collect();
    if hits.is_empty() {
        return vec![net];
    }
    if hits.iter().any(|c| c.contains(&net)) {
        return Vec::new();
    }
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        // Unreachable: a net strictly containing another is never a host prefix.
        // Covering nothing is the fail-closed answer.
        return Vec::new();
    };
    halves.flat_map(|half| subtract(half, &hits)).collect()
}

// ---------------------------------------------------------------------------------
// Diff
// ---------------------------------------------------------------------------------

/// What to change to go from the `applied` elements to the `desired` ones:
/// `(to_add, to_remove)`, both sorted. An element whose end changed is removed and
/// re-added (deletions go first in the same transaction), because older kernels such
/// as Debian 12's 6.1 silently ignore re-adding an existing element, keeping its old
/// timeout; newer ones update it. Delete-then-add works on both.
///
/// Applied elements that have already ended (at `now`) are not removed: the kernel
/// has expired them. One the kernel expires between this plan and the commit is
/// still in `to_remove`; the netlink path treats "no such element" as done for that
/// element (see [`crate::nfnl`]), so a revoke closes the port at any moment, even in
/// a grant's last milliseconds.
pub fn diff(
    applied: &[Element],
    desired: &[Element],
    now: Timestamp,
) -> (Vec<Element>, Vec<Element>) {
    let applied_set: HashSet<&Element> = applied.iter().collect();
    let desired_set: HashSet<&Element> = desired.iter().collect();
    let mut to_add: Vec<Element> = desired
        .iter()
        .filter(|e| !applied_set.contains(e))
        .copied()
        .collect();
    let mut to_remove: Vec<Element> = applied
        .iter()
        .filter(|e| !desired_set.contains(e) && e.end > now)
        .copied()
        .collect();
    to_add.sort_by_key(element_order);
    to_add.dedup();
    to_remove.sort_by_key(element_order);
    to_remove.dedup();
    (to_add, to_remove)
}

// ---------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------

/// Checks what the renderer relies on; the agent calls it before touching the kernel.
pub fn validate(rules: &[NsgRule]) -> Result<(), String> {
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    for r in rules {
        if r.name.is_empty() {
            return Err(format!("rule at priority {} has an empty name", r.priority));
        }
        if r.name.chars().count() > MAX_RULE_NAME_LEN {
            return Err(format!(
                "rule '{}': name is longer than {MAX_RULE_NAME_LEN} characters",
                r.name
            ));
        }
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&r.priority) {
            return Err(format!(
                "rule '{}': priority {} is outside {MIN_PRIORITY}-{MAX_PRIORITY}",
                r.name, r.priority
            ));
        }
        if let Some(other) = seen.insert(r.priority, &r.name) {
            return Err(format!(
                "rules '{other}' and '{}' have the same priority {}",
                r.name, r.priority
            ));
        }
        if r.ports.is_empty() {
            return Err(format!("rule '{}' has no destination port", r.name));
        }
        if let Some(bad) = r.ports.iter().find(|p| p.first > p.last) {
            return Err(format!(
                "rule '{}': port range {}-{} is reversed",
                r.name, bad.first, bad.last
            ));
        }
        if r.sources.is_empty() {
            return Err(format!("rule '{}' has no source", r.name));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------

/// The rules in evaluation order (stable by priority, so equal input order is kept).
pub(crate) fn ordered(rules: &[NsgRule]) -> Vec<&NsgRule> {
    let mut v: Vec<&NsgRule> = rules.iter().collect();
    v.sort_by_key(|r| r.priority);
    v
}

/// The named counter of each JIT deny rule, in evaluation order: `deny_<proto>_<port>`
/// (`deny_tcp_22`, `deny_any_3389`, `deny_udp_5985_to_5986`), with `_2`, `_3`... when
/// two deny rules would share a name.
fn deny_counters(rules: &[NsgRule]) -> Vec<(&NsgRule, String)> {
    let mut used: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for r in ordered(rules) {
        if !matches!(r.origin, RuleOrigin::JitDeny { .. }) {
            continue;
        }
        let proto = match r.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        };
        let ports: Vec<String> = r
            .ports
            .iter()
            .map(|p| {
                if p.first == p.last {
                    p.first.to_string()
                } else {
                    format!("{}_to_{}", p.first, p.last)
                }
            })
            .collect();
        let base = format!("deny_{proto}_{}", ports.join("_"));
        let mut name = base.clone();
        let mut n = 1;
        while !used.insert(name.clone()) {
            n += 1;
            name = format!("{base}_{n}");
        }
        out.push((r, name));
    }
    out
}

/// The named counters the agent reads to report blocked attempts, in evaluation
/// order: `(counter name, protected port, protocol)`, one per JIT deny rule. The port
/// is the first one the rule covers (JIT deny rules cover exactly one).
pub fn deny_counter_names(rules: &[NsgRule]) -> Vec<(String, Port, Protocol)> {
    deny_counters(rules)
        .into_iter()
        .filter_map(|(r, name)| r.ports.first().map(|p| (name, p.first, r.protocol)))
        .collect()
}

/// A rule name as an nft comment: printable ASCII without `"` or `\` (nft strings
/// have no escapes), at most 128 characters.
pub(crate) fn comment(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            c if c == ' ' || c.is_ascii_graphic() => c,
            _ => '_',
        })
        .take(MAX_COMMENT_LEN)
        .collect()
}

/// `22`, `5985-5986` or `{ 22, 5985-5986 }`, after merging overlapping and adjacent
/// ranges.
pub(crate) fn ports_expr(ports: &[PortRange]) -> String {
    let mut ranges: Vec<(u16, u16)> = ports
        .iter()
        .filter(|p| p.first <= p.last)
        .map(|p| (p.first.get(), p.last.get()))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let parts: Vec<String> = merged
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    braces(&parts)
}

fn braces(items: &[String]) -> String {
    match items {
        [one] => one.clone(),
        many => format!("{{ {} }}", many.join(", ")),
    }
}

/// A host prefix is written as the bare address.
pub(crate) fn net_text(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// The source matches of a rule: `[""]` for any source, else one `ip saddr ...` and/or
/// one `ip6 saddr ...` (nft cannot mix families in one set); empty when the rule has
/// no source at all (it then matches nothing and renders nothing).
pub(crate) fn source_matches(sources: &[SourcePrefix]) -> Vec<String> {
    if sources.contains(&SourcePrefix::Any) {
        return vec![String::new()];
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for s in sources {
        if let SourcePrefix::Net(n) = s {
            match n.trunc() {
                n @ IpNet::V4(_) => v4.push(n),
                n @ IpNet::V6(_) => v6.push(n),
            }
        }
    }
    let mut out = Vec::new();
    for (family, nets) in [("ip", v4), ("ip6", v6)] {
        if nets.is_empty() {
            continue;
        }
        let items: Vec<String> = IpNet::aggregate(&nets).iter().map(net_text).collect();
        out.push(format!("{family} saddr {} ", braces(&items)));
    }
    out
}

fn render_rule(out: &mut String, rule: &NsgRule, counter: Option<&str>) {
    render_rule_for(out, "", rule, counter);
}

/// A rule's lines, each starting with `destination` (empty on a host; `ip daddr
/// 192.0.2.5 ` on a gateway, for the machine behind it).
pub(crate) fn render_rule_for(
    out: &mut String,
    destination: &str,
    rule: &NsgRule,
    counter: Option<&str>,
) {
    if rule.ports.is_empty() {
        return;
    }
    let ports = ports_expr(&rule.ports);
    let proto = match rule.protocol {
        Protocol::Tcp => format!("tcp dport {ports}"),
        Protocol::Udp => format!("udp dport {ports}"),
        Protocol::Any => format!("meta l4proto {{ tcp, udp }} th dport {ports}"),
    };
    let verdict = match (counter, rule.access) {
        (Some(name), _) => format!("counter name \"{name}\" drop"),
        (None, Access::Allow) => "accept".to_owned(),
        (None, Access::Deny) => "drop".to_owned(),
    };
    let note = comment(&rule.name);
    for saddr in source_matches(&rule.sources) {
        let _ = writeln!(
            out,
            "\t\t{destination}{saddr}{proto} {verdict} comment \"{note}\""
        );
    }
}

fn element_line(e: &Element, now: Timestamp) -> Option<String> {
    timeout_ms(e.end, now).map(|ms| format!("{} timeout {ms}ms", e.key()))
}

/// The key type and flags of each grant set.
fn set_shape(name: &str) -> (&'static str, &'static str) {
    match name {
        HOSTS4 => ("ipv4_addr", "timeout"),
        HOSTS6 => ("ipv6_addr", "timeout"),
        NETS4 => ("ipv4_addr", "interval, timeout"),
        _ => ("ipv6_addr", "interval, timeout"),
    }
}

fn render_set(out: &mut String, name: &str, elements: &[String]) {
    let (key_type, flags) = set_shape(name);
    let _ = writeln!(out, "\tset {name} {{");
    let _ = writeln!(out, "\t\ttype {key_type} . inet_proto . inet_service");
    let _ = writeln!(out, "\t\tflags {flags}");
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{");
        for (i, e) in elements.iter().enumerate() {
            let sep = if i + 1 < elements.len() { "," } else { "" };
            let _ = writeln!(out, "\t\t\t{e}{sep}");
        }
        let _ = writeln!(out, "\t\t}}");
    }
    let _ = writeln!(out, "\t}}");
}

/// One atomic script that recreates `table inet jitgate` from scratch: counters, the
/// grant sets with `elements` (disjoint, as [`plan_elements`] makes them; timeouts
/// from `now`, see [`timeout_ms`]), and the
/// input chain from `rules` (JIT allow rules are skipped: the sets carry them).
///
/// It starts with `table inet jitgate {}` so that the following `delete table` cannot
/// fail on a machine where the table does not exist yet. Replacing the table resets
/// the deny counters to zero.
pub fn render_full(rules: &[NsgRule], elements: &[Element], now: Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE} {{}}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");

    let counters = deny_counters(rules);
    for (_, name) in &counters {
        let _ = writeln!(out, "\tcounter {name} {{}}");
    }

    let mut sorted: Vec<&Element> = elements.iter().collect();
    sorted.sort_by_key(|e| element_order(e));
    sorted.dedup();
    let lines = |set: &str| -> Vec<String> {
        sorted
            .iter()
            .filter(|e| e.set() == set)
            .filter_map(|e| element_line(e, now))
            .collect()
    };
    for set in SETS {
        render_set(&mut out, set, &lines(set));
    }

    let _ = writeln!(out, "\tchain input {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook input priority filter; policy accept;"
    );
    let _ = writeln!(out, "\t\tct state established,related accept");
    // The machine talking to itself (`ssh localhost`, local monitoring) is not the
    // network JIT guards.
    let _ = writeln!(out, "\t\tiif \"lo\" accept");
    for set in SETS {
        let family = if set.ends_with('4') { "ip" } else { "ip6" };
        let _ = writeln!(
            out,
            "\t\t{family} saddr . meta l4proto . th dport @{set} accept"
        );
    }
    for rule in ordered(rules) {
        match rule.origin {
            RuleOrigin::JitAllow { .. } => {}
            RuleOrigin::User => render_rule(&mut out, rule, None),
            RuleOrigin::JitDeny { .. } => {
                let name = counters
                    .iter()
                    .find(|(r, _)| std::ptr::eq(*r, rule))
                    .map(|(_, n)| n.as_str());
                render_rule(&mut out, rule, name);
            }
        }
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
    out
}

/// `delete element` lines for `removed`, then `add element` lines for `added`
/// (timeouts from `now`; elements with less than [`MIN_TIMEOUT_MS`] left are
/// skipped), at most one line per set and operation. Deletions come first so that an
/// element can be replaced or split in the same transaction. Empty when nothing
/// changes.
pub fn render_delta(added: &[Element], removed: &[Element], now: Timestamp) -> String {
    let mut out = String::new();
    let mut removed: Vec<&Element> = removed.iter().collect();
    removed.sort_by_key(|e| element_order(e));
    removed.dedup();
    let mut added: Vec<&Element> = added.iter().collect();
    added.sort_by_key(|e| element_order(e));
    added.dedup();
    for set in SETS {
        let keys: Vec<String> = removed
            .iter()
            .filter(|e| e.set() == set)
            .map(|e| e.key())
            .collect();
        if !keys.is_empty() {
            let _ = writeln!(
                out,
                "delete element inet {TABLE} {set} {{ {} }}",
                keys.join(", ")
            );
        }
    }
    for set in SETS {
        let lines: Vec<String> = added
            .iter()
            .filter(|e| e.set() == set)
            .filter_map(|e| element_line(e, now))
            .collect();
        if !lines.is_empty() {
            let _ = writeln!(
                out,
                "add element inet {TABLE} {set} {{ {} }}",
                lines.join(", ")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestId;
    use jiff::SignedDuration;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn at_ms(ms: i64) -> Timestamp {
        t0().checked_add(SignedDuration::from_millis(ms)).unwrap()
    }

    fn port(n: u16) -> Port {
        Port::new(i64::from(n)).unwrap()
    }

    fn src(s: &str) -> SourcePrefix {
        SourcePrefix::parse(s).unwrap()
    }

    fn grant(n: u128, p: u16, proto: Protocol, source: &str, end_ms: i64) -> GrantRef {
        GrantRef {
            request: RequestId::new(Uuid::from_u128(n)),
            number: port(p),
            protocol: proto,
            source: src(source),
            start: t0(),
            end: at_ms(end_ms),
        }
    }

    fn el(net: &str, proto: L4, p: u16, end_ms: i64) -> Element {
        Element {
            net: net.parse().unwrap(),
            proto,
            port: port(p),
            end: at_ms(end_ms),
        }
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
            sources: sources.iter().map(|s| src(s)).collect(),
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

    fn jit_deny(priority: u16, protocol: Protocol, p: u16) -> NsgRule {
        rule(
            &format!("JIT-Deny-default-{p}"),
            priority,
            Access::Deny,
            protocol,
            &["*"],
            &[(p, p)],
            RuleOrigin::JitDeny {
                policy: "default".into(),
            },
        )
    }

    /// Renders the full script for `rules` and `grants` at t0 and compares it with
    /// `expect` (indentation of `expect` is free: each line is trimmed on both sides).
    fn check(rules: &[NsgRule], grants: &[GrantRef], expect: &str) {
        let elements = plan_elements(grants, t0());
        let got = render_full(rules, &elements, t0());
        let norm = |s: &str| -> Vec<String> {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(norm(&got), norm(expect), "\n--- got ---\n{got}");
    }

    const HEAD: &str = "table inet jitgate {}\ndelete table inet jitgate\ntable inet jitgate {";
    const CHAIN: &str = "chain input {
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iif \"lo\" accept
        ip saddr . meta l4proto . th dport @hosts4 accept
        ip saddr . meta l4proto . th dport @nets4 accept
        ip6 saddr . meta l4proto . th dport @hosts6 accept
        ip6 saddr . meta l4proto . th dport @nets6 accept";

    #[test]
    fn empty_vm_renders_empty_sets_and_chain() {
        check(
            &[],
            &[],
            &format!(
                "{HEAD}
                set hosts4 {{
                    type ipv4_addr . inet_proto . inet_service
                    flags timeout
                }}
                set nets4 {{
                    type ipv4_addr . inet_proto . inet_service
                    flags interval, timeout
                }}
                set hosts6 {{
                    type ipv6_addr . inet_proto . inet_service
                    flags timeout
                }}
                set nets6 {{
                    type ipv6_addr . inet_proto . inet_service
                    flags interval, timeout
                }}
                {CHAIN}
                }}
                }}"
            ),
        );
    }

    #[test]
    fn rules_grants_and_counters() {
        let allow = RuleOrigin::JitAllow {
            request: RequestId::new(Uuid::from_u128(1)),
            expires: at_ms(1000),
        };
        let rules = vec![
            rule(
                "JIT-Allow-1-22",
                100,
                Access::Allow,
                Protocol::Tcp,
                &["10.1.1.1"],
                &[(22, 22)],
                allow,
            ),
            rule(
                "mgmt \"corp\"\\x",
                300,
                Access::Allow,
                Protocol::Any,
                &["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "192.168.1.7"],
                &[(5986, 5986), (22, 22), (5985, 5985)],
                RuleOrigin::User,
            ),
            jit_deny(301, Protocol::Tcp, 22),
            jit_deny(302, Protocol::Any, 3389),
            rule(
                "block-dns",
                400,
                Access::Deny,
                Protocol::Udp,
                &["*", "10.0.0.0/8"],
                &[(53, 53)],
                RuleOrigin::User,
            ),
            rule(
                "v6-only",
                500,
                Access::Allow,
                Protocol::Tcp,
                &["2001:db8::1"],
                &[(8000, 8100)],
                RuleOrigin::User,
            ),
        ];
        let grants = vec![
            grant(1, 22, Protocol::Tcp, "10.1.1.1", 60_000),
            grant(2, 3389, Protocol::Any, "*", 1_234),
            // Ended or below the minimum timeout: nothing.
            grant(3, 22, Protocol::Tcp, "10.9.9.9", 9),
            grant(4, 22, Protocol::Tcp, "10.9.9.8", -5),
        ];
        check(
            &rules,
            &grants,
            &format!(
                "{HEAD}
                counter deny_tcp_22 {{}}
                counter deny_any_3389 {{}}
                set hosts4 {{
                    type ipv4_addr . inet_proto . inet_service
                    flags timeout
                    elements = {{
                        10.1.1.1 . tcp . 22 timeout 60000ms
                    }}
                }}
                set nets4 {{
                    type ipv4_addr . inet_proto . inet_service
                    flags interval, timeout
                    elements = {{
                        0.0.0.0/0 . tcp . 3389 timeout 1234ms,
                        0.0.0.0/0 . udp . 3389 timeout 1234ms
                    }}
                }}
                set hosts6 {{
                    type ipv6_addr . inet_proto . inet_service
                    flags timeout
                }}
                set nets6 {{
                    type ipv6_addr . inet_proto . inet_service
                    flags interval, timeout
                    elements = {{
                        ::/0 . tcp . 3389 timeout 1234ms,
                        ::/0 . udp . 3389 timeout 1234ms
                    }}
                }}
                {CHAIN}
                ip saddr {{ 10.0.0.0/8, 192.168.1.7 }} meta l4proto {{ tcp, udp }} th dport {{ 22, 5985-5986 }} accept comment \"mgmt 'corp'/x\"
                ip6 saddr 2001:db8::/32 meta l4proto {{ tcp, udp }} th dport {{ 22, 5985-5986 }} accept comment \"mgmt 'corp'/x\"
                tcp dport 22 counter name \"deny_tcp_22\" drop comment \"JIT-Deny-default-22\"
                meta l4proto {{ tcp, udp }} th dport 3389 counter name \"deny_any_3389\" drop comment \"JIT-Deny-default-3389\"
                udp dport 53 drop comment \"block-dns\"
                ip6 saddr 2001:db8::1 tcp dport 8000-8100 accept comment \"v6-only\"
                }}
                }}"
            ),
        );
        assert_eq!(
            deny_counter_names(&rules),
            vec![
                ("deny_tcp_22".to_owned(), port(22), Protocol::Tcp),
                ("deny_any_3389".to_owned(), port(3389), Protocol::Any),
            ]
        );
    }

    #[test]
    fn rules_render_in_priority_order_and_counter_names_stay_unique() {
        let rules = vec![
            jit_deny(900, Protocol::Tcp, 22),
            rule(
                "range",
                200,
                Access::Deny,
                Protocol::Tcp,
                &["*"],
                &[(5985, 5986)],
                RuleOrigin::JitDeny {
                    policy: "p2".into(),
                },
            ),
            jit_deny(150, Protocol::Tcp, 22),
        ];
        let names: Vec<String> = deny_counter_names(&rules)
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert_eq!(
            names,
            ["deny_tcp_22", "deny_tcp_5985_to_5986", "deny_tcp_22_2"]
        );
        let text = render_full(&rules, &[], t0());
        let chain: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("counter name"))
            .map(str::trim)
            .collect();
        assert_eq!(
            chain,
            [
                "tcp dport 22 counter name \"deny_tcp_22\" drop comment \"JIT-Deny-default-22\"",
                "tcp dport 5985-5986 counter name \"deny_tcp_5985_to_5986\" drop comment \"range\"",
                "tcp dport 22 counter name \"deny_tcp_22_2\" drop comment \"JIT-Deny-default-22\"",
            ]
        );
    }

    #[test]
    fn comments_are_sanitized_and_bounded() {
        assert_eq!(comment("a\"b\\c\nd\u{e9}"), "a'b/c_d_");
        assert_eq!(comment(&"x".repeat(300)).len(), 128);
    }

    #[test]
    fn timeout_text_is_floor_of_milliseconds() {
        let now = t0();
        let end = now
            .checked_add(SignedDuration::from_nanos(2_345_999_999))
            .unwrap();
        let e = Element {
            end,
            ..el("10.0.0.1/32", L4::Tcp, 22, 0)
        };
        assert_eq!(
            element_line(&e, now).as_deref(),
            Some("10.0.0.1 . tcp . 22 timeout 2345ms")
        );
        assert_eq!(timeout_ms(at_ms(10), t0()), Some(10));
        assert_eq!(
            timeout_ms(
                t0().checked_add(SignedDuration::from_nanos(9_999_999))
                    .unwrap(),
                t0()
            ),
            None
        );
        assert_eq!(timeout_ms(at_ms(-1), t0()), None);
        assert_eq!(timeout_ms(at_ms(86_400_000), t0()), Some(86_400_000));
        // A full render never writes an element below the minimum.
        let text = render_full(&[], &[el("10.0.0.1/32", L4::Tcp, 22, 9)], t0());
        assert!(!text.contains("elements"), "{text}");
    }

    #[test]
    fn nested_prefixes_split_or_drop() {
        // Inner ends later: the outer is split around it.
        let got = plan_elements(
            &[
                grant(1, 22, Protocol::Tcp, "10.0.0.0/29", 1_000),
                grant(2, 22, Protocol::Tcp, "10.0.0.2/31", 5_000),
            ],
            t0(),
        );
        assert_eq!(
            got,
            vec![
                el("10.0.0.0/31", L4::Tcp, 22, 1_000),
                el("10.0.0.2/31", L4::Tcp, 22, 5_000),
                el("10.0.0.4/30", L4::Tcp, 22, 1_000),
            ]
        );
        // Inner ends earlier (or at the same time): it is redundant.
        let got = plan_elements(
            &[
                grant(1, 22, Protocol::Tcp, "10.0.0.0/29", 5_000),
                grant(2, 22, Protocol::Tcp, "10.0.0.2/31", 5_000),
                grant(3, 22, Protocol::Tcp, "10.0.0.4/30", 1_000),
                grant(4, 22, Protocol::Tcp, "10.0.0.0/29", 2_000),
            ],
            t0(),
        );
        assert_eq!(got, vec![el("10.0.0.0/29", L4::Tcp, 22, 5_000)]);
        // Another port or protocol does not interact.
        let got = plan_elements(
            &[
                grant(1, 22, Protocol::Tcp, "*", 5_000),
                grant(2, 22, Protocol::Udp, "10.0.0.0/24", 9_000),
                grant(3, 23, Protocol::Tcp, "2001:db8::/64", 9_000),
            ],
            t0(),
        );
        assert_eq!(
            got,
            vec![
                el("0.0.0.0/0", L4::Tcp, 22, 5_000),
                el("10.0.0.0/24", L4::Udp, 22, 9_000),
                el("::/0", L4::Tcp, 22, 5_000),
                el("2001:db8::/64", L4::Tcp, 23, 9_000),
            ]
        );
    }

    #[test]
    fn single_addresses_go_to_the_host_sets_with_their_latest_end() {
        // A host grant inside a prefix grant: both elements, each in its own set;
        // the chain accepts while either holds, so the later end wins.
        let got = plan_elements(
            &[
                grant(1, 22, Protocol::Tcp, "10.0.0.0/30", 1_000),
                grant(2, 22, Protocol::Tcp, "10.0.0.1", 5_000),
                grant(3, 22, Protocol::Tcp, "10.0.0.1", 3_000),
                grant(4, 22, Protocol::Tcp, "2001:db8::1", 3_000),
            ],
            t0(),
        );
        assert_eq!(
            got,
            vec![
                el("10.0.0.0/30", L4::Tcp, 22, 1_000),
                el("10.0.0.1/32", L4::Tcp, 22, 5_000),
                el("2001:db8::1/128", L4::Tcp, 22, 3_000),
            ]
        );
        let sets: Vec<&str> = got.iter().map(Element::set).collect();
        assert_eq!(sets, [NETS4, HOSTS4, HOSTS6]);
        assert!(!got[0].overlaps(&got[1]), "different sets never collide");
        let text = render_delta(&got, &[], t0());
        assert!(
            text.contains("add element inet jitgate hosts4 { 10.0.0.1 . tcp . 22 timeout 5000ms }"),
            "{text}"
        );
        assert!(
            text.contains(
                "add element inet jitgate hosts6 { 2001:db8::1 . tcp . 22 timeout 3000ms }"
            ),
            "{text}"
        );
    }

    #[test]
    fn diff_replaces_changed_ends_and_removes_even_elements_about_to_expire() {
        let a = el("10.0.0.1/32", L4::Tcp, 22, 60_000);
        let b = el("10.0.0.2/32", L4::Tcp, 22, 60_000);
        let b2 = el("10.0.0.2/32", L4::Tcp, 22, 90_000);
        let c = el("10.0.0.3/32", L4::Tcp, 22, 60_000);
        let soon = el("10.0.0.4/32", L4::Tcp, 22, 15);
        let gone = el("10.0.0.5/32", L4::Tcp, 22, -10_000);
        let (add, remove) = diff(&[a, b, c, soon, gone], &[a, b2], t0());
        assert_eq!(add, vec![b2]);
        // A revoke in the grant's last milliseconds still deletes it; an element
        // that has ended is the kernel's to expire.
        assert_eq!(remove, vec![b, c, soon]);
        assert_eq!(render_delta(&[], &[], t0()), "");
        assert_eq!(diff(&[a], &[a], t0()), (vec![], vec![]));
    }

    #[test]
    fn delta_text() {
        let added = [
            el("2001:db8::/32", L4::Udp, 53, 5_000),
            el("10.0.0.0/9", L4::Tcp, 22, 3_000),
            el("10.128.0.0/9", L4::Tcp, 22, 1_000),
            el("10.9.9.9/32", L4::Tcp, 22, 5), // below the minimum: not written
        ];
        let removed = [
            el("10.0.0.0/8", L4::Tcp, 22, 1_000),
            el("10.1.2.3/32", L4::Tcp, 22, 1_000),
        ];
        assert_eq!(
            render_delta(&added, &removed, t0()),
            "delete element inet jitgate hosts4 { 10.1.2.3 . tcp . 22 }\n\
             delete element inet jitgate nets4 { 10.0.0.0/8 . tcp . 22 }\n\
             add element inet jitgate nets4 { 10.0.0.0/9 . tcp . 22 timeout 3000ms, 10.128.0.0/9 . tcp . 22 timeout 1000ms }\n\
             add element inet jitgate nets6 { 2001:db8::/32 . udp . 53 timeout 5000ms }\n"
        );
    }

    #[test]
    fn validation() {
        let ok = || jit_deny(1000, Protocol::Tcp, 22);
        assert_eq!(validate(&[ok()]), Ok(()));
        assert_eq!(validate(&[]), Ok(()));
        let cases: Vec<(NsgRule, &str)> = vec![
            (
                NsgRule {
                    priority: 99,
                    ..ok()
                },
                "outside 100-4096",
            ),
            (
                NsgRule {
                    priority: 4097,
                    ..ok()
                },
                "outside 100-4096",
            ),
            (
                NsgRule {
                    ports: vec![],
                    ..ok()
                },
                "no destination port",
            ),
            (
                NsgRule {
                    sources: vec![],
                    ..ok()
                },
                "no source",
            ),
            (
                NsgRule {
                    name: String::new(),
                    ..ok()
                },
                "empty name",
            ),
            (
                NsgRule {
                    name: "n".repeat(129),
                    ..ok()
                },
                "longer than 128",
            ),
            (
                NsgRule {
                    ports: vec![PortRange {
                        first: port(30),
                        last: port(20),
                    }],
                    ..ok()
                },
                "reversed",
            ),
        ];
        for (r, want) in cases {
            let e = validate(&[r]).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(
            validate(&[NsgRule {
                name: "\u{e9}".repeat(128),
                ..ok()
            }])
            .is_ok()
        );
        let e = validate(&[ok(), jit_deny(1000, Protocol::Udp, 53)]).unwrap_err();
        assert!(e.contains("same priority 1000"), "{e}");
    }

    // ---------------------------------------------------------------------------
    // Properties of plan_elements
    // ---------------------------------------------------------------------------

    /// Random grants crowded into 10.0.0.0/22 and 2001:db8::/118 (so that they nest
    /// and overlap a lot), a few `*` sources, two ports, all protocols, ends from
    /// already over to a minute away with millisecond jitter.
    fn arb_grant() -> impl Strategy<Value = GrantRef> {
        let source = prop_oneof![
            1 => Just("*".to_owned()),
            6 => (0u32..1024, 22u8..=32).prop_map(|(off, len)| {
                let base = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + off;
                let mask = u32::MAX << (32 - len);
                format!("{}/{len}", std::net::Ipv4Addr::from(base & mask))
            }),
            3 => (0u128..1024, 118u8..=128).prop_map(|(off, len)| {
                let base = u128::from("2001:db8::".parse::<std::net::Ipv6Addr>().unwrap()) + off;
                let mask = u128::MAX << (128 - u32::from(len));
                format!("{}/{len}", std::net::Ipv6Addr::from(base & mask))
            }),
        ];
        let proto = prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Any)
        ];
        (
            0u128..1000,
            prop_oneof![Just(22u16), Just(3389)],
            proto,
            source,
            -2_000i64..60_000,
        )
            .prop_map(|(n, p, proto, source, end)| grant(n, p, proto, &source, end))
    }

    fn arb_probe() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..1100).prop_map(|o| IpAddr::V4(
                (u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + o).into()
            )),
            any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
            (0u128..1100).prop_map(|o| IpAddr::V6(
                (u128::from("2001:db8::".parse::<std::net::Ipv6Addr>().unwrap()) + o).into()
            )),
            any::<u128>().prop_map(|a| IpAddr::V6(a.into())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn planned_elements_never_overlap(grants in prop::collection::vec(arb_grant(), 0..40)) {
            let out = plan_elements(&grants, t0());
            for (i, a) in out.iter().enumerate() {
                for b in &out[i + 1..] {
                    prop_assert!(!a.overlaps(b), "{a:?} overlaps {b:?}");
                }
            }
            let mut sorted = out.clone();
            sorted.sort_by_key(element_order);
            prop_assert_eq!(&sorted, &out);
        }

        #[test]
        fn planned_elements_give_each_address_its_latest_end(
            grants in prop::collection::vec(arb_grant(), 0..40),
            probes in prop::collection::vec(arb_probe(), 1..40),
        ) {
            let out = plan_elements(&grants, t0());
            for addr in probes {
                for proto in [L4::Tcp, L4::Udp] {
                    for p in [22u16, 3389] {
                        let want = grants
                            .iter()
                            .filter(|g| timeout_ms(g.end, t0()).is_some())
                            .filter(|g| g.number == port(p) && L4::of(g.protocol).contains(&proto))
                            .filter(|g| match g.source {
                                SourcePrefix::Any => true,
                                SourcePrefix::Net(n) => n.contains(&addr),
                            })
                            .map(|g| g.end)
                            .max();
                        let hits: Vec<&Element> = out
                            .iter()
                            .filter(|e| e.proto == proto && e.port == port(p) && e.net.contains(&addr))
                            .collect();
                        // At most one element per set shape (a host and a prefix
                        // element may both hold the address); the chain accepts if
                        // any does, so the address is open until the latest of them.
                        prop_assert!(hits.iter().filter(|e| e.is_host()).count() <= 1);
                        prop_assert!(hits.iter().filter(|e| !e.is_host()).count() <= 1);
                        prop_assert_eq!(hits.iter().map(|e| e.end).max(), want, "{} {:?} {}", addr, proto, p);
                    }
                }
            }
        }

        #[test]
        fn timeouts_never_exceed_the_time_left(
            grants in prop::collection::vec(arb_grant(), 0..40),
            now_ns in -3_000_000_000i64..3_000_000_000,
        ) {
            let now = t0().checked_add(SignedDuration::from_nanos(now_ns)).unwrap();
            let out = plan_elements(&grants, now);
            let text = render_full(&[], &out, now);
            for e in &out {
                let ms = timeout_ms(e.end, now).unwrap();
                prop_assert!(ms >= MIN_TIMEOUT_MS);
                prop_assert!(
                    now.checked_add(SignedDuration::from_millis(ms)).unwrap() <= e.end
                );
                let line = format!("{} timeout {ms}ms", e.key());
                prop_assert!(text.contains(&line), "{} missing", line);
            }
            // Every element written has a timeout.
            let is_element = |l: &&str| l.contains(" . tcp . ") || l.contains(" . udp . ");
            let written = text.lines().filter(is_element).count();
            let timed = text.lines().filter(is_element).filter(|l| l.contains(" timeout ")).count();
            prop_assert_eq!(written, timed);
            prop_assert_eq!(written, out.len());
        }

        /// Applying a diff to the applied list yields the desired one, except for
        /// ended elements, which the kernel has expired.
        #[test]
        fn diff_round_trips(
            a in prop::collection::vec(arb_grant(), 0..20),
            b in prop::collection::vec(arb_grant(), 0..20),
        ) {
            let applied = plan_elements(&a, t0());
            let desired = plan_elements(&b, t0());
            let (add, remove) = diff(&applied, &desired, t0());
            let mut result: Vec<Element> = applied
                .iter()
                .filter(|e| !remove.contains(e) && e.end > t0())
                .chain(add.iter())
                .copied()
                .collect();
            result.sort_by_key(element_order);
            result.dedup();
            prop_assert_eq!(result, desired);
        }
    }

    // ---------------------------------------------------------------------------
    // Properties of rendering: user text never changes the script's structure
    // ---------------------------------------------------------------------------

    mod hostile_rules {
        include!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/hostile_rules.rs"
        ));
    }
    use hostile_rules::{arb_name, arb_rules};

    fn arb_named_rules() -> impl Strategy<Value = Vec<NsgRule>> {
        arb_rules(arb_name(), 0, "; drop\n#")
    }

    /// The script with every comment emptied, and the comments in order. Fails when a
    /// comment is not one quoted string ending its line.
    fn split_comments(script: &str) -> Result<(String, Vec<String>), TestCaseError> {
        let mut skeleton = String::new();
        let mut comments = Vec::new();
        for line in script.lines() {
            // The first ` comment "` of a line is the renderer's: everything before it
            // is generated from typed values.
            match line.find(" comment \"") {
                Some(i) => {
                    let text = &line[i + " comment \"".len()..];
                    prop_assert!(text.ends_with('"'), "unterminated comment: {}", line);
                    let text = &text[..text.len() - 1];
                    prop_assert!(!text.contains('"'), "comment escapes its quotes: {}", line);
                    comments.push(text.to_owned());
                    skeleton.push_str(&line[..i]);
                    skeleton.push_str(" comment \"\"\n");
                }
                None => {
                    skeleton.push_str(line);
                    skeleton.push('\n');
                }
            }
        }
        Ok((skeleton, comments))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the rule names, the script is the one rendered with harmless names
        /// except inside the quoted comments, and each comment is the name's printable
        /// ASCII (quotes and backslashes replaced), cut at 128 characters.
        #[test]
        fn names_only_ever_reach_quoted_comments(
            rules in arb_named_rules(),
            grants in prop::collection::vec(arb_grant(), 0..6),
        ) {
            let elements = plan_elements(&grants, t0());
            let script = render_full(&rules, &elements, t0());
            let harmless: Vec<NsgRule> = rules
                .iter()
                .map(|r| NsgRule { name: "n".into(), description: String::new(), ..r.clone() })
                .collect();
            let expected = render_full(&harmless, &elements, t0());
            let (skeleton, comments) = split_comments(&script)?;
            let (expected_skeleton, expected_comments) = split_comments(&expected)?;
            prop_assert_eq!(&skeleton, &expected_skeleton);
            prop_assert_eq!(comments.len(), expected_comments.len());
            prop_assert!(script.chars().all(|c| c == '\n' || c == '\t' || c == ' ' || c.is_ascii_graphic()));

            // Each rendered line of a rule carries that rule's comment, in order.
            let mut names: Vec<&NsgRule> = rules.iter().filter(|r| !matches!(r.origin, RuleOrigin::JitAllow { .. })).collect();
            names.sort_by_key(|r| r.priority);
            let mut k = 0;
            for r in names {
                let lines = source_matches(&r.sources).len();
                for _ in 0..lines {
                    let c: Vec<char> = comments[k].chars().collect();
                    let n: Vec<char> = r.name.chars().collect();
                    prop_assert_eq!(c.len(), n.len().min(MAX_COMMENT_LEN));
                    for (out, name) in c.iter().zip(&n) {
                        prop_assert!(*out == ' ' || out.is_ascii_graphic());
                        prop_assert!(*out != '"' && *out != '\\');
                        if *name == ' ' || (name.is_ascii_graphic() && *name != '"' && *name != '\\') {
                            prop_assert_eq!(out, name);
                        }
                    }
                    k += 1;
                }
            }
            prop_assert_eq!(k, comments.len());
        }
    }
}
