//! Gateway mode: the nftables table of a Linux gateway in front of machines that run
//! no agent (Windows with RDP, appliances), the analogue of JIT on Azure Firewall.
//!
//! The gateway owns `table inet jitgate_gw`, apart from the `inet jitgate` table its
//! own agent may keep for the gateway's own ports. Each machine behind it (a
//! [`Target`]) has one private address and one of two modes:
//!
//! * **routed**: clients reach the machine's own address through the gateway. A grant
//!   is an element `source . address . protocol . port` of `fwd4`/`fwd6` (`hfwd4`/
//!   `hfwd6` for a single source address), accepted in the `forward` chain;
//! * **DNAT** (Azure Firewall's way): clients reach the gateway's public address on a
//!   *mapped port* the controller allocated for the machine's port. A grant is an
//!   element `public address . source . protocol . mapped port : address . port` of
//!   the `dnat4`/`dnat6` map (`hdnat4`/`hdnat6`), which the `prerouting` chain uses to
//!   translate (the public address is in the key: two public addresses may map the
//!   same port to different machines, for the same source), plus the
//!   element `source . address . protocol . port` of `dfwd4`/`dfwd6` (`hdfwd4`/
//!   `hdfwd6`), accepted in `forward` only for
//!   translated connections (`ct status dnat`): a granted source still cannot reach
//!   the private address directly.
//!
//! Every element carries a kernel timeout equal to the time left until its grant's
//! end (as in [`crate::nft`]), so grants close on time with the gateway's agent and
//! the controller dead. In `forward`, after the grants, each machine's NSG rules
//! apply to traffic to its address, in priority order, its JIT deny rules last: a
//! protected port is closed to everyone without a grant, in both modes. Established
//! and related traffic is accepted first, so a connection opened under a grant keeps
//! working after its end (Azure's documented behaviour); the translation of a
//! connection lives in conntrack and outlives the map element.
//!
//! The `input` chain drops new connections to the public address's mapped ports that
//! no grant translated, so an ungranted client sees a filtered port, not a refusal
//! from the gateway's own stack. It accepts established and related traffic first:
//! the gateway's own connections (to the controller) take ephemeral source ports,
//! which overlap the mapped ports (50000-59999), and their replies must pass. With `masquerade`, a DNAT machine sees connections come
//! from the gateway (for machines whose default route is not the gateway).
//!
//! Sources are planned as in [`crate::nft::plan_group`]: single addresses (the latest
//! end per address) into hash sets and maps, where adding or deleting an element costs
//! the same whatever they hold; prefixes of one group (family, protocol, port,
//! machine) into disjoint prefixes in interval sets and maps, whose deletes cost
//! more as they grow (about 60-90 ms at 10,000 elements, measured with `nft -f`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use jiff::Timestamp;

use crate::net::Port;
use crate::nft::{self, L4};
use crate::nsg::{GrantRef, NsgRule, RuleOrigin};

/// The table a gateway owns (family `inet`).
pub const TABLE: &str = "jitgate_gw";

/// The grant sets of the table (keys `source . address . protocol . port`): interval
/// sets for prefixes, hash sets (`h…`) for single addresses.
pub const SETS: [&str; 8] = [
    "fwd4", "fwd6", "dfwd4", "dfwd6", "hfwd4", "hfwd6", "hdfwd4", "hdfwd6",
];

/// The DNAT maps of the table (keys `public address . source . protocol . mapped
/// port`, data `address . port`): interval maps for prefixes, hash maps for single
/// addresses.
pub const MAPS: [&str; 4] = ["dnat4", "dnat6", "hdnat4", "hdnat6"];

/// How clients reach a machine behind a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Routed,
    Dnat,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s.to_ascii_lowercase().as_str() {
            "routed" => Ok(Mode::Routed),
            "dnat" => Ok(Mode::Dnat),
            _ => Err(format!("mode '{s}' is not one of routed, dnat")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Routed => "routed",
            Mode::Dnat => "dnat",
        }
    }
}

/// A port of a machine behind a DNAT gateway and the gateway's port for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappedPort {
    pub port: Port,
    pub mapped: Port,
}

/// Where a machine sits behind its gateway: what the controller says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The machine's private address, as the gateway reaches it.
    pub address: IpAddr,
    pub mode: Mode,
    /// DNAT only: the machine sees connections come from the gateway.
    pub masquerade: bool,
    /// DNAT only: the gateway's public address clients connect to.
    pub public: Option<IpAddr>,
    /// DNAT only: the mapped port of each protected port.
    pub mapped: Vec<MappedPort>,
}

impl Placement {
    pub fn mapped_port(&self, port: Port) -> Option<Port> {
        self.mapped
            .iter()
            .find(|m| m.port == port)
            .map(|m| m.mapped)
    }

    /// What can be checked of one placement alone: for DNAT a public address of the
    /// machine's family and each port mapped once.
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == Mode::Routed {
            return Ok(());
        }
        match self.public {
            None => return Err("DNAT mode needs the gateway's public address".to_owned()),
            Some(p) if p.is_ipv4() != self.address.is_ipv4() => {
                return Err(format!(
                    "the public address {p} and the machine's {} are of different families",
                    self.address
                ));
            }
            Some(_) => {}
        }
        let mut ports = BTreeSet::new();
        for m in &self.mapped {
            if !ports.insert(m.port) {
                return Err(format!("port {} is mapped twice", m.port));
            }
        }
        Ok(())
    }
}

/// A machine behind the gateway, with what its desired state says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// For comments and errors (the VM's id).
    pub name: String,
    pub place: Placement,
    pub rules: Vec<NsgRule>,
    pub grants: Vec<GrantRef>,
}

/// Checks what the renderer relies on, before anything touches the kernel: valid
/// rules and placements, one machine per address, mapped ports unique per public
/// address and one for every port a DNAT grant names.
pub fn validate(targets: &[Target]) -> Result<(), String> {
    let mut addresses = BTreeSet::new();
    let mut mapped: BTreeMap<(IpAddr, Port), &str> = BTreeMap::new();
    for t in targets {
        let p = &t.place;
        nft::validate(&t.rules).map_err(|e| format!("{}: {e}", t.name))?;
        p.validate().map_err(|e| format!("{}: {e}", t.name))?;
        if !addresses.insert(p.address) {
            return Err(format!(
                "{}: address {} is also another machine's",
                t.name, p.address
            ));
        }
        let Some(public) = p.public.filter(|_| p.mode == Mode::Dnat) else {
            continue;
        };
        for m in &p.mapped {
            if let Some(other) = mapped.insert((public, m.mapped), &t.name) {
                return Err(format!(
                    "{}: mapped port {public}:{} is also {other}'s",
                    t.name, m.mapped
                ));
            }
        }
        if let Some(g) = t.grants.iter().find(|g| p.mapped_port(g.number).is_none()) {
            return Err(format!(
                "{}: port {} has a grant but no mapped port",
                t.name, g.number
            ));
        }
    }
    Ok(())
}

/// One element of the gateway's grant sets: traffic from `net` with `proto` to
/// `address`:`port` (reached on `mapped` for DNAT) until `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GwElement {
    pub mode: Mode,
    pub address: IpAddr,
    /// DNAT: the gateway's public address the machine is reached on.
    pub public: Option<IpAddr>,
    pub proto: L4,
    pub port: Port,
    pub mapped: Option<Port>,
    pub net: IpNet,
    pub end: Timestamp,
}

/// The elements of every target, sorted: per (target, protocol, port), the grants'
/// sources of the target's family, disjoint, each with the latest end covering it.
/// Grants with less than [`nft::MIN_TIMEOUT_MS`] left give nothing.
pub fn plan(targets: &[Target], now: Timestamp) -> Vec<GwElement> {
    let mut out = Vec::new();
    for t in targets {
        let p = &t.place;
        let v6 = p.address.is_ipv6();
        for ((fam6, host, proto, port), items) in nft::group_grants(&t.grants, now) {
            if fam6 != v6 {
                continue;
            }
            let mapped = match p.mode {
                Mode::Routed => None,
                // validate() refuses a DNAT grant without a mapped port.
                Mode::Dnat => match p.mapped_port(port) {
                    Some(m) => Some(m),
                    None => continue,
                },
            };
            for e in nft::plan_group((v6, host, proto, port), items) {
                out.push(GwElement {
                    mode: p.mode,
                    address: p.address,
                    public: p.public.filter(|_| p.mode == Mode::Dnat),
                    proto,
                    port,
                    mapped,
                    net: e.net,
                    end: e.end,
                });
            }
        }
    }
    out.sort();
    out
}

fn family(a: &IpAddr) -> &'static str {
    if a.is_ipv4() { "ip" } else { "ip6" }
}

fn suffix(v6: bool) -> &'static str {
    if v6 { "6" } else { "4" }
}

fn addr_type(v6: bool) -> &'static str {
    if v6 { "ipv6_addr" } else { "ipv4_addr" }
}

/// True when the element's source is one address: it goes to the hash sets.
fn is_host(e: &GwElement) -> bool {
    e.net.prefix_len() == e.net.max_prefix_len()
}

/// How an element is held in one set or map, as read back from the kernel: the
/// source, protocol, port (the mapped one in a map), the machine's address, and in
/// a map the public address and the machine's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    pub set: &'static str,
    /// In a map, the gateway's public address (the key's first field).
    pub public: Option<IpAddr>,
    pub net: IpNet,
    pub proto: L4,
    pub port: Port,
    pub address: IpAddr,
    pub to_port: Option<Port>,
}

/// The entries an element puts in the table: one set element, and for DNAT one map
/// element too; nothing for a DNAT element without a mapped port or public address
/// (never rendered: `validate` refuses both).
pub fn entries(e: &GwElement) -> Vec<Entry> {
    let v6 = e.address.is_ipv6();
    let host = is_host(e);
    let pick = |net4: &'static str, net6: &'static str, host4: &'static str, host6| match (host, v6)
    {
        (false, false) => net4,
        (false, true) => net6,
        (true, false) => host4,
        (true, true) => host6,
    };
    let fwd = |set| Entry {
        set,
        public: None,
        net: e.net,
        proto: e.proto,
        port: e.port,
        address: e.address,
        to_port: None,
    };
    match (e.mode, e.mapped.zip(e.public)) {
        (Mode::Routed, _) => vec![fwd(pick("fwd4", "fwd6", "hfwd4", "hfwd6"))],
        (Mode::Dnat, None) => Vec::new(),
        (Mode::Dnat, Some((m, public))) => vec![
            fwd(pick("dfwd4", "dfwd6", "hdfwd4", "hdfwd6")),
            Entry {
                set: pick("dnat4", "dnat6", "hdnat4", "hdnat6"),
                public: Some(public),
                net: e.net,
                proto: e.proto,
                port: m,
                address: e.address,
                to_port: Some(e.port),
            },
        ],
    }
}

impl Entry {
    /// The key as `nft` writes it: `source . address . proto . port` in a set, `public
    /// . source . proto . mapped port` in a map (a single-address source bare, as the
    /// hash sets take it).
    fn key_text(&self) -> String {
        let (src, proto) = (nft::net_text(&self.net), self.proto.as_str());
        match (self.to_port, self.public) {
            (Some(_), Some(public)) => format!("{public} . {src} . {proto} . {}", self.port),
            _ => format!("{src} . {} . {proto} . {}", self.address, self.port),
        }
    }
}

/// The lines of each set and map (key, timeout and data), by name.
fn element_lines(elements: &[GwElement], now: Timestamp) -> BTreeMap<&'static str, Vec<String>> {
    let mut sets: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for e in elements {
        let Some(ms) = nft::timeout_ms(e.end, now) else {
            continue;
        };
        for x in entries(e) {
            let mut line = format!("{} timeout {ms}ms", x.key_text());
            if let Some(to) = x.to_port {
                let _ = write!(line, " : {} . {to}", x.address);
            }
            sets.entry(x.set).or_default().push(line);
        }
    }
    sets
}

/// What to change to go from the `applied` elements to the `desired` ones (both as
/// [`plan`] makes them): `(to_add, to_remove)`. An element whose end changed is
/// removed and added again (older kernels keep the old timeout of an element added
/// twice); applied elements already ended at `now` are left to the kernel.
pub fn diff(
    applied: &[GwElement],
    desired: &[GwElement],
    now: Timestamp,
) -> (Vec<GwElement>, Vec<GwElement>) {
    let a: BTreeSet<&GwElement> = applied.iter().collect();
    let d: BTreeSet<&GwElement> = desired.iter().collect();
    let add = d.difference(&a).map(|e| **e).collect();
    let remove = a
        .difference(&d)
        .filter(|e| e.end > now)
        .map(|e| **e)
        .collect();
    (add, remove)
}

/// The change from one set of elements to another as one `nft -f` transaction:
/// deletions first (keys only), then additions with timeouts from `now`. Empty when
/// nothing changes. It fails as a whole when an element to delete is already gone
/// (expired in the meantime); the caller then renders the whole table. The gateway
/// applies a change over netlink (the same elements, [`entries`]); this text is its
/// path when no netlink socket opens.
pub fn render_delta(add: &[GwElement], remove: &[GwElement], now: Timestamp) -> String {
    let mut out = String::new();
    let mut deletes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for x in remove.iter().flat_map(entries) {
        deletes.entry(x.set).or_default().push(x.key_text());
    }
    for (set, keys) in &deletes {
        let _ = writeln!(
            out,
            "delete element inet {TABLE} {set} {{ {} }}",
            keys.join(", ")
        );
    }
    for (set, lines) in element_lines(add, now) {
        let _ = writeln!(
            out,
            "add element inet {TABLE} {set} {{ {} }}",
            lines.join(", ")
        );
    }
    out
}

/// The targets without their grants: what a whole render depends on besides the
/// elements. While it stays the same, a change is a delta of elements.
pub fn structure(targets: &[Target]) -> Vec<(String, Placement, Vec<NsgRule>)> {
    targets
        .iter()
        .map(|t| (t.name.clone(), t.place.clone(), t.rules.clone()))
        .collect()
}

fn render_elements(out: &mut String, lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(out, "\t\telements = {{");
    for (i, e) in lines.iter().enumerate() {
        let sep = if i + 1 < lines.len() { "," } else { "" };
        let _ = writeln!(out, "\t\t\t{e}{sep}");
    }
    let _ = writeln!(out, "\t\t}}");
}

/// The public addresses of the DNAT machines, each with its mapped ports.
fn publics(targets: &[Target]) -> BTreeMap<IpAddr, BTreeSet<u16>> {
    let mut out: BTreeMap<IpAddr, BTreeSet<u16>> = BTreeMap::new();
    for t in targets.iter().filter(|t| t.place.mode == Mode::Dnat) {
        if let Some(p) = t.place.public {
            out.entry(p)
                .or_default()
                .extend(t.place.mapped.iter().map(|m| m.mapped.get()));
        }
    }
    out
}

/// One atomic script that recreates `table inet jitgate_gw` (see the module
/// documentation) from the targets; timeouts count from `now`. Call [`validate`]
/// first.
pub fn render_full(targets: &[Target], now: Timestamp) -> String {
    let elements = plan(targets, now);
    let sets = element_lines(&elements, now);
    let publics = publics(targets);
    let none = Vec::new();
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE} {{}}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    for v6 in [false, true] {
        let (s, a) = (suffix(v6), addr_type(v6));
        // Single addresses in hash sets (an element costs the same whatever the set
        // holds), prefixes in interval sets.
        for (h, flags) in [("h", "timeout"), ("", "interval, timeout")] {
            for name in ["fwd", "dfwd"] {
                let _ = writeln!(out, "\tset {h}{name}{s} {{");
                let _ = writeln!(out, "\t\ttype {a} . {a} . inet_proto . inet_service");
                let _ = writeln!(out, "\t\tflags {flags}");
                render_elements(
                    &mut out,
                    sets.get(format!("{h}{name}{s}").as_str()).unwrap_or(&none),
                );
                let _ = writeln!(out, "\t}}");
            }
            let _ = writeln!(out, "\tmap {h}dnat{s} {{");
            let _ = writeln!(
                out,
                "\t\ttype {a} . {a} . inet_proto . inet_service : {a} . inet_service"
            );
            let _ = writeln!(out, "\t\tflags {flags}");
            render_elements(
                &mut out,
                sets.get(format!("{h}dnat{s}").as_str()).unwrap_or(&none),
            );
            let _ = writeln!(out, "\t}}");
        }
    }

    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    // A source not in a map makes the lookup fail and the rule end without a verdict:
    // the host map first, then the prefix map, else no translation.
    for p in publics.keys() {
        let (fam, s) = (family(p), suffix(p.is_ipv6()));
        for h in ["h", ""] {
            let _ = writeln!(
                out,
                "\t\t{fam} daddr {p} meta l4proto {{ tcp, udp }} dnat {fam} to {fam} daddr . {fam} saddr . meta l4proto . th dport map @{h}dnat{s}"
            );
        }
    }
    let _ = writeln!(out, "\t}}");

    let _ = writeln!(out, "\tchain forward {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook forward priority filter; policy accept;"
    );
    let _ = writeln!(out, "\t\tct state established,related accept");
    for v6 in [false, true] {
        let (fam, s) = (if v6 { "ip6" } else { "ip" }, suffix(v6));
        for h in ["h", ""] {
            let _ = writeln!(
                out,
                "\t\t{fam} saddr . {fam} daddr . meta l4proto . th dport @{h}fwd{s} accept"
            );
            let _ = writeln!(
                out,
                "\t\tct status dnat {fam} saddr . {fam} daddr . meta l4proto . th dport @{h}dfwd{s} accept"
            );
        }
    }
    for t in targets {
        let a = t.place.address;
        let destination = format!("{} daddr {a} ", family(&a));
        for rule in nft::ordered(&t.rules) {
            if matches!(rule.origin, RuleOrigin::JitAllow { .. }) {
                continue;
            }
            nft::render_rule_for(&mut out, &destination, rule, None);
        }
    }
    let _ = writeln!(out, "\t}}");

    let _ = writeln!(out, "\tchain input {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook input priority filter; policy accept;"
    );
    // Replies to the gateway's own connections (to the controller, say) may come to
    // a mapped port: its ephemeral source ports and the mapped ports overlap.
    let _ = writeln!(out, "\t\tct state established,related accept");
    for (p, ports) in &publics {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        if ports.is_empty() {
            continue;
        }
        let list = if ports.len() == 1 {
            ports[0].clone()
        } else {
            format!("{{ {} }}", ports.join(", "))
        };
        let _ = writeln!(
            out,
            "\t\t{} daddr {p} meta l4proto {{ tcp, udp }} th dport {list} drop",
            family(p)
        );
    }
    let _ = writeln!(out, "\t}}");

    let _ = writeln!(out, "\tchain postrouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    for t in targets {
        let p = &t.place;
        if p.mode == Mode::Dnat && p.masquerade {
            let _ = writeln!(
                out,
                "\t\tct status dnat {} daddr {} masquerade",
                family(&p.address),
                p.address
            );
        }
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{PortRange, Protocol, SourcePrefix};
    use crate::nsg::Access;
    use crate::request::RequestId;

    fn port(n: u16) -> Port {
        Port::new(i64::from(n)).unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn deny(p: u16) -> NsgRule {
        NsgRule {
            name: format!("JIT-deny-{p}"),
            priority: 4096,
            access: Access::Deny,
            protocol: Protocol::Any,
            sources: vec![SourcePrefix::Any],
            ports: vec![PortRange::single(port(p))],
            origin: RuleOrigin::JitDeny { policy: "p".into() },
            description: String::new(),
        }
    }

    fn grant(p: u16, source: &str, end: &str) -> GrantRef {
        GrantRef {
            request: RequestId::new(uuid::Uuid::from_u128(u128::from(p))),
            number: port(p),
            protocol: Protocol::Tcp,
            source: SourcePrefix::parse(source).unwrap(),
            start: at("2026-01-01T00:00:00Z"),
            end: at(end),
        }
    }

    fn target(name: &str, address: &str, mode: Mode) -> Target {
        Target {
            name: name.into(),
            place: Placement {
                address: address.parse().unwrap(),
                mode,
                masquerade: false,
                public: (mode == Mode::Dnat).then(|| "198.51.100.1".parse().unwrap()),
                mapped: vec![],
            },
            rules: vec![deny(3389)],
            grants: vec![],
        }
    }

    const NOW: &str = "2026-01-01T00:00:00Z";

    #[test]
    fn routed_and_dnat_grants_become_their_elements() {
        let mut r = target("win-1", "192.0.2.5", Mode::Routed);
        r.grants = vec![grant(3389, "198.51.100.10", "2026-01-01T01:00:00Z")];
        let mut d = target("win-2", "192.0.2.6", Mode::Dnat);
        d.place.mapped = vec![MappedPort {
            port: port(3389),
            mapped: port(50001),
        }];
        d.grants = vec![grant(3389, "198.51.100.0/24", "2026-01-01T00:00:02.5Z")];
        validate(&[r.clone(), d.clone()]).unwrap();
        let text = render_full(&[r, d], at(NOW));
        assert!(
            text.contains("198.51.100.10 . 192.0.2.5 . tcp . 3389 timeout 3600000ms"),
            "{text}"
        );
        assert!(
            text.contains("198.51.100.0/24 . 192.0.2.6 . tcp . 3389 timeout 2500ms"),
            "{text}"
        );
        assert!(
            text.contains(
                "198.51.100.1 . 198.51.100.0/24 . tcp . 50001 timeout 2500ms : 192.0.2.6 . 3389"
            ),
            "{text}"
        );
        assert!(text.contains(
            "ip daddr 198.51.100.1 meta l4proto { tcp, udp } dnat ip to ip daddr . ip saddr . meta l4proto . th dport map @dnat4"
        ));
        assert!(text.contains("ip daddr 192.0.2.5 meta l4proto { tcp, udp } th dport 3389 drop"));
        assert!(text.contains("ip daddr 192.0.2.6 meta l4proto { tcp, udp } th dport 3389 drop"));
        assert!(
            text.contains("ip daddr 198.51.100.1 meta l4proto { tcp, udp } th dport 50001 drop")
        );
        // The routed grant is not in the DNAT sets, nor the other way round.
        let dfwd = text.split("set dfwd4").nth(1).unwrap();
        let dfwd = &dfwd[..dfwd.find("}\n\tset").unwrap()];
        assert!(!dfwd.contains("192.0.2.5 "), "{dfwd}");
    }

    #[test]
    fn sources_are_planned_disjoint_per_set_shape_machine_and_port_and_of_its_family() {
        let mut t = target("vm", "192.0.2.5", Mode::Routed);
        t.grants = vec![
            grant(3389, "10.0.0.0/8", "2026-01-01T01:00:00Z"),
            grant(3389, "10.1.2.3", "2026-01-01T02:00:00Z"),
            grant(3389, "*", "2026-01-01T00:30:00Z"),
            grant(3389, "2001:db8::1", "2026-01-01T02:00:00Z"),
        ];
        let elements = plan(&[t], at(NOW));
        assert!(elements.iter().all(|e| e.net.addr().is_ipv4()));
        // Disjoint within each set (single addresses in the hash set, prefixes in the
        // interval set).
        for (i, a) in elements.iter().enumerate() {
            for b in &elements[i + 1..] {
                assert!(
                    is_host(a) != is_host(b) || !(a.net.contains(&b.net) || b.net.contains(&a.net)),
                    "{a:?} overlaps {b:?}"
                );
            }
        }
        let sets: Vec<&str> = elements.iter().map(|e| entries(e)[0].set).collect();
        assert!(sets.contains(&"hfwd4") && sets.contains(&"fwd4"));
        let host = elements
            .iter()
            .find(|e| e.net == "10.1.2.3/32".parse::<IpNet>().unwrap())
            .unwrap();
        assert_eq!(host.end, at("2026-01-01T02:00:00Z"));
    }

    #[test]
    fn a_change_of_grants_is_a_delta_of_keys_and_elements() {
        let mut d = target("win", "192.0.2.6", Mode::Dnat);
        d.place.mapped = vec![MappedPort {
            port: port(3389),
            mapped: port(50001),
        }];
        let kept = grant(3389, "198.51.100.10", "2026-01-01T01:00:00Z");
        d.grants = vec![kept.clone()];
        let before = plan(std::slice::from_ref(&d), at(NOW));
        d.grants = vec![kept, grant(3389, "198.51.100.11", "2026-01-01T00:10:00Z")];
        let after = plan(std::slice::from_ref(&d), at(NOW));
        let (add, remove) = diff(&before, &after, at(NOW));
        assert_eq!((add.len(), remove.len()), (1, 0));
        let text = render_delta(&add, &remove, at(NOW));
        assert_eq!(
            text,
            "add element inet jitgate_gw hdfwd4 { 198.51.100.11 . 192.0.2.6 . tcp . 3389 timeout 600000ms }\n\
             add element inet jitgate_gw hdnat4 { 198.51.100.1 . 198.51.100.11 . tcp . 50001 timeout 600000ms : 192.0.2.6 . 3389 }\n"
        );
        // Revoked: its keys are deleted from the set and the map, nothing added.
        let (add, remove) = diff(&after, &before, at(NOW));
        let text = render_delta(&add, &remove, at(NOW));
        assert_eq!(
            text,
            "delete element inet jitgate_gw hdfwd4 { 198.51.100.11 . 192.0.2.6 . tcp . 3389 }\n\
             delete element inet jitgate_gw hdnat4 { 198.51.100.1 . 198.51.100.11 . tcp . 50001 }\n"
        );
        // What has ended is left to the kernel.
        let later = at("2026-01-01T00:20:00Z");
        let (_, remove) = diff(&after, &before, later);
        assert!(remove.is_empty());
        assert_eq!(structure(&[d.clone()]), structure(&[d]));
    }

    #[test]
    fn what_cannot_be_rendered_is_refused() {
        let mut d = target("win", "192.0.2.6", Mode::Dnat);
        d.grants = vec![grant(3389, "198.51.100.10", "2026-01-01T01:00:00Z")];
        let mut no_public = d.clone();
        no_public.place.public = None;
        assert!(
            validate(&[no_public])
                .unwrap_err()
                .contains("public address")
        );
        let mut v6 = d.clone();
        v6.place.public = Some("2001:db8::1".parse().unwrap());
        assert!(validate(&[v6]).unwrap_err().contains("families"));
        assert!(
            validate(&[d.clone()])
                .unwrap_err()
                .contains("no mapped port")
        );
        d.place.mapped = vec![MappedPort {
            port: port(3389),
            mapped: port(50001),
        }];
        validate(&[d.clone()]).unwrap();
        let mut twice = d.clone();
        twice.place.mapped.push(twice.place.mapped[0]);
        assert!(validate(&[twice]).unwrap_err().contains("mapped twice"));
        let mut e = target("other", "192.0.2.7", Mode::Dnat);
        e.place.mapped = d.place.mapped.clone();
        assert!(
            validate(&[d.clone(), e.clone()])
                .unwrap_err()
                .contains("also win's")
        );
        // The same mapped port on another public address is another port.
        e.place.public = Some("198.51.100.2".parse().unwrap());
        validate(&[d.clone(), e]).unwrap();
        let same = target("twin", "192.0.2.6", Mode::Routed);
        assert!(
            validate(&[d, same])
                .unwrap_err()
                .contains("another machine")
        );
    }
}
