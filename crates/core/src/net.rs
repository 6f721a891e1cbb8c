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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourcePrefix {
    Any,
    Net(IpNet),
}

impl SourcePrefix {
    /// Parses `*`, an address (`192.168.0.3`, `2001:db8::1`) or a canonical CIDR.
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
