//! Ports, protocols and source prefixes.
//!
//! Source prefixes must be canonical: `10.0.0.5/24` is rejected rather than widened
//! to `10.0.0.0/24`, because nft would silently widen it and the requester would get
//! more than they asked for.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A TCP/UDP port number, 1-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(u16);

impl Port {
    pub fn new(n: i64) -> Result<Self, String> {
        if (1..=65535).contains(&n) {
            Ok(Port(n as u16))
        } else {
            Err(format!("port {n} is out of range (1-65535)"))
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An inclusive port range (`22`, `5985-5986`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: Port,
    pub last: Port,
}

impl PortRange {
    pub fn single(p: Port) -> Self {
        PortRange { first: p, last: p }
    }

    pub fn contains(&self, p: Port) -> bool {
        self.first <= p && p <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// `TCP`, `UDP` or `*` (both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

impl Protocol {
    /// Accepts `TCP`, `UDP` and `*`, case-insensitively as Azure does.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "*" => Ok(Protocol::Any),
            _ => Err(format!("protocol '{s}' is not one of TCP, UDP, *")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Any => "*",
        }
    }

    pub fn overlaps(self, other: Protocol) -> bool {
        self == Protocol::Any || other == Protocol::Any || self == other
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source address prefix: any address (`*`) or one canonical network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourcePrefix {
    Any,
    Net(IpNet),
}

impl SourcePrefix {
    /// Parses `*`, an address (`192.168.0.3`, `2001:db8::1`) or a canonical CIDR.
    /// IPv4-mapped IPv6 addresses and prefixes are the IPv4 ones they carry
    /// (`::ffff:10.0.0.0/120` is `10.0.0.0/24`); a mapped prefix shorter than /96 is
    /// refused.
    /// `Internet`, `Any` and `0.0.0.0/0` style spellings of "everyone" other than `*`
    /// are taken literally (a /0 is a valid, canonical network).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(SourcePrefix::Any);
        }
        if let Ok(addr) = s.parse::<IpAddr>() {
            return Ok(SourcePrefix::Net(IpNet::from(canonical_addr(addr))));
        }
        let net: IpNet = s.parse().map_err(|_| {
            format!("'{s}' is not an IP address, a CIDR prefix (10.0.0.0/24) or '*'")
        })?;
        let net = unmap_prefix(s, net)?;
        if net.trunc() != net {
            return Err(format!(
                "'{s}' is not a canonical CIDR: host bits are set (did you mean {}?)",
                net.trunc()
            ));
        }
        Ok(SourcePrefix::Net(net))
    }

    /// The single-address prefix of an observed caller address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        SourcePrefix::Net(IpNet::from(canonical_addr(addr)))
    }

    /// True when every address of `inner` is inside `self`.
    pub fn contains(&self, inner: &SourcePrefix) -> bool {
        match (self, inner) {
            (SourcePrefix::Any, _) => true,
            (SourcePrefix::Net(_), SourcePrefix::Any) => false,
            (SourcePrefix::Net(outer), SourcePrefix::Net(inner)) => outer.contains(inner),
        }
    }
}

/// An IPv4-mapped IPv6 prefix (`::ffff:10.0.0.0/120`) never matches anything in
/// nftables: IPv4 traffic is matched by `ip saddr`, never as a mapped IPv6 address. It
/// is the IPv4 prefix it carries (`10.0.0.0/24`, 96 bits shorter). One shorter than
/// /96 is refused: it covers no IPv4 prefix at all, only IPv6 addresses beside the
/// mapped ones, which is certainly not what its author meant.
fn unmap_prefix(text: &str, net: IpNet) -> Result<IpNet, String> {
    let IpNet::V6(v6) = net else {
        return Ok(net);
    };
    let Some(v4) = v6.addr().to_ipv4_mapped() else {
        return Ok(net);
    };
    let len = v6.prefix_len();
    if len < 96 {
        return Err(format!(
            "'{text}' is an IPv4-mapped IPv6 prefix shorter than /96, which cannot match IPv4 traffic: write the IPv4 prefix instead (::ffff:10.0.0.0/120 is 10.0.0.0/24)"
        ));
    }
    ipnet::Ipv4Net::new(v4, len - 96)
        .map(IpNet::V4)
        .map_err(|_| format!("'{text}' is not a valid IPv4-mapped IPv6 prefix"))
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a dual-stack socket reports an
/// IPv4 caller) is the IPv4 address it carries.
pub fn canonical_addr(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourcePrefix::Any => f.write_str("*"),
            // A host prefix is shown as the bare address, as Azure shows it.
            SourcePrefix::Net(n) if n.prefix_len() == n.max_prefix_len() => n.addr().fmt(f),
            SourcePrefix::Net(n) => n.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_prefixes() {
        assert_eq!(SourcePrefix::parse("*").unwrap(), SourcePrefix::Any);
        assert_eq!(
            SourcePrefix::parse("192.168.0.3").unwrap().to_string(),
            "192.168.0.3"
        );
        assert_eq!(
            SourcePrefix::parse("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            SourcePrefix::parse("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(
            SourcePrefix::parse("10.0.0.7/32").unwrap().to_string(),
            "10.0.0.7"
        );
        assert_eq!(
            SourcePrefix::parse("::ffff:10.1.2.3").unwrap().to_string(),
            "10.1.2.3"
        );
    }

    #[test]
    fn rejects_non_canonical_and_garbage() {
        let e = SourcePrefix::parse("10.0.0.5/24").unwrap_err();
        assert!(e.contains("10.0.0.0/24"), "{e}");
        for bad in [
            "",
            "10.0.0.256",
            "10.0.0.0/33",
            "any",
            "10.0.0.0/",
            "2001:db8::1/32",
        ] {
            assert!(SourcePrefix::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn containment() {
        let p = |s| SourcePrefix::parse(s).unwrap();
        assert!(p("*").contains(&p("1.2.3.4")));
        assert!(p("*").contains(&p("*")));
        assert!(!p("10.0.0.0/8").contains(&p("*")));
        assert!(p("10.0.0.0/8").contains(&p("10.1.0.0/16")));
        assert!(p("10.0.0.0/24").contains(&p("10.0.0.5")));
        assert!(!p("10.0.0.0/24").contains(&p("10.0.1.5")));
        assert!(!p("10.0.0.0/24").contains(&p("10.0.0.0/16")));
        assert!(!p("10.0.0.0/8").contains(&p("2001:db8::1")));
    }

    #[test]
    fn ports_and_protocols() {
        assert!(Port::new(0).is_err() && Port::new(65536).is_err() && Port::new(-1).is_err());
        assert_eq!(Port::new(65535).unwrap().get(), 65535);
        assert_eq!(Protocol::parse("tcp").unwrap(), Protocol::Tcp);
        assert!(Protocol::parse("ICMP").is_err());
        assert!(Protocol::Any.overlaps(Protocol::Udp) && !Protocol::Tcp.overlaps(Protocol::Udp));
    }

    #[test]
    fn ipv4_mapped_prefixes_become_ipv4() {
        let p = |s| SourcePrefix::parse(s).unwrap().to_string();
        assert_eq!(p("::ffff:10.0.0.0/120"), "10.0.0.0/24");
        assert_eq!(p("::FFFF:10.0.0.0/104"), "10.0.0.0/8");
        assert_eq!(p("::ffff:0.0.0.0/96"), "0.0.0.0/0");
        assert_eq!(p("::ffff:10.1.2.3/128"), "10.1.2.3");
        assert_eq!(p("::ffff:a01:203/128"), "10.1.2.3");
        assert_eq!(
            SourcePrefix::parse("::ffff:10.0.0.0/120").unwrap(),
            SourcePrefix::parse("10.0.0.0/24").unwrap()
        );
        // Host bits are still refused, and the suggestion is the IPv4 prefix.
        let e = SourcePrefix::parse("::ffff:10.0.0.5/120").unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/24"), "{e}");
        // Shorter than /96: no IPv4 prefix to convert to.
        for bad in ["::ffff:10.0.0.0/95", "::ffff:0.0.0.0/90", "::ffff:0:0/80"] {
            let e = SourcePrefix::parse(bad).unwrap_err();
            assert!(
                e.contains("IPv4-mapped IPv6 prefix shorter than /96"),
                "{bad}: {e}"
            );
        }
        // Plain IPv6 prefixes that merely contain the mapped range are IPv6.
        assert_eq!(p("::/0"), "::/0");
        assert_eq!(p("::ff00:0:0/88"), "::ff00:0:0/88");
        assert_eq!(p("::a00:0/120"), "::a00:0/120");
    }

    /// Text that looks like addresses and prefixes: digits, hex, separators, a few
    /// stray characters, and whole arbitrary strings.
    fn arb_prefix_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9a-fA-F:./*% -]{0,48}",
            "(::ffff:)?[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3})?",
            "[0-9a-f]{0,4}(:[0-9a-f]{0,4}){0,8}(/[0-9]{1,3})?",
            any::<String>(),
        ]
    }

    /// Any network, canonical or not, as text.
    fn arb_net_text() -> impl Strategy<Value = String> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, len)| format!("{}/{len}", std::net::Ipv4Addr::from(a))),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, len)| format!("{}/{len}", std::net::Ipv6Addr::from(a))),
            (any::<u32>(), 0u8..=128).prop_map(|(a, len)| format!(
                "{}/{len}",
                std::net::Ipv4Addr::from(a).to_ipv6_mapped()
            )),
        ]
    }

    /// What every accepted prefix must be: canonical, never IPv4-mapped, and
    /// reparsing its display gives it back.
    fn check_accepted(p: &SourcePrefix) -> Result<(), TestCaseError> {
        if let SourcePrefix::Net(n) = p {
            prop_assert_eq!(n.trunc(), *n, "not canonical: {}", n);
            if let IpNet::V6(v6) = n {
                prop_assert!(v6.addr().to_ipv4_mapped().is_none(), "mapped: {}", n);
            }
        }
        let text = p.to_string();
        prop_assert!(!text.chars().any(char::is_whitespace));
        prop_assert_eq!(SourcePrefix::parse(&text), Ok(*p), "{}", text);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary text never panics; what is accepted is canonical and round-trips.
        #[test]
        fn parse_never_panics_and_accepts_only_canonical(s in arb_prefix_text()) {
            if let Ok(p) = SourcePrefix::parse(&s) {
                check_accepted(&p)?;
            }
        }

        /// Networks as text: accepted exactly when canonical (an IPv4-mapped one is
        /// judged as the IPv4 network it carries), and round-trip when accepted.
        #[test]
        fn networks_parse_iff_canonical(text in arb_net_text()) {
            let net: IpNet = text.parse().unwrap();
            let effective = match net {
                IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                    Some(v4) if v6.prefix_len() >= 96 => {
                        Some(IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).unwrap()))
                    }
                    Some(_) => None,
                    None => Some(net),
                },
                IpNet::V4(_) => Some(net),
            };
            let got = SourcePrefix::parse(&text);
            match effective {
                Some(n) if n.trunc() == n => {
                    prop_assert_eq!(&got, &Ok(SourcePrefix::Net(n)));
                }
                Some(n) => {
                    let e = got.unwrap_err();
                    prop_assert!(e.contains(&format!("did you mean {}", n.trunc())), "{}", e);
                }
                None => {
                    let e = got.unwrap_err();
                    prop_assert!(e.contains("shorter than /96"), "{}", e);
                }
            }
            if let Ok(p) = SourcePrefix::parse(&text) {
                check_accepted(&p)?;
            }
        }

        /// An IPv4-mapped prefix of /96 or longer is the same prefix as its IPv4 form.
        #[test]
        fn mapped_prefixes_equal_their_ipv4_form(base in any::<u32>(), len in 0u8..=32) {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let v4 = std::net::Ipv4Addr::from(base & mask);
            let plain = SourcePrefix::parse(&format!("{v4}/{len}")).unwrap();
            let mapped = SourcePrefix::parse(&format!("{}/{}", v4.to_ipv6_mapped(), len + 96));
            prop_assert_eq!(mapped, Ok(plain));
        }

        /// Addresses: canonical_addr is idempotent, keeps IPv4 and unmaps IPv6.
        #[test]
        fn canonical_addr_unmaps(v4 in any::<u32>(), v6 in any::<u128>()) {
            let v4 = std::net::Ipv4Addr::from(v4);
            let v6 = std::net::Ipv6Addr::from(v6);
            prop_assert_eq!(canonical_addr(IpAddr::V4(v4)), IpAddr::V4(v4));
            prop_assert_eq!(canonical_addr(IpAddr::V6(v4.to_ipv6_mapped())), IpAddr::V4(v4));
            let c = canonical_addr(IpAddr::V6(v6));
            prop_assert_eq!(canonical_addr(c), c);
            if let IpAddr::V6(c6) = c {
                prop_assert!(c6.to_ipv4_mapped().is_none());
                prop_assert_eq!(c6, v6);
            }
            for addr in [IpAddr::V4(v4), IpAddr::V6(v6)] {
                let host = SourcePrefix::host(addr);
                check_accepted(&host)?;
                prop_assert_eq!(SourcePrefix::parse(&addr.to_string()), Ok(host));
            }
        }
    }

    proptest! {
        /// A network contains exactly the addresses whose masked form equals its base.
        #[test]
        fn v4_containment_matches_masking(base in any::<u32>(), len in 0u8..=32, addr in any::<u32>()) {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let net = SourcePrefix::parse(&format!("{}/{}", std::net::Ipv4Addr::from(base & mask), len)).unwrap();
            let host = SourcePrefix::host(IpAddr::V4(addr.into()));
            prop_assert_eq!(net.contains(&host), addr & mask == base & mask);
            prop_assert!(SourcePrefix::Any.contains(&net));
        }

        /// Non-canonical CIDRs are always rejected, canonical ones always accepted.
        #[test]
        fn canonical_only(base in any::<u32>(), len in 0u8..=32) {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let text = format!("{}/{}", std::net::Ipv4Addr::from(base), len);
            prop_assert_eq!(SourcePrefix::parse(&text).is_ok(), base & mask == base);
        }
    }
}
