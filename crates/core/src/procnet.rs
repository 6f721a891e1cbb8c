//! Listening sockets from the text of Linux `/proc/net/{tcp,tcp6,udp,udp6}`.
//!
//! The agent reads those files (IO stays at the edge) and hands the text here, to
//! learn which protected ports actually have a listener. Only sockets that can
//! receive new inbound traffic count: TCP sockets in state `0A` (LISTEN) and UDP
//! sockets in state `07` (unconnected) bound to a port other than 0.
//!
//! Encoding: `local_address` is `ADDR:PORT` in hex. The port is a plain big-endian
//! number. The address is the kernel's in-memory network-order bytes printed as
//! 32-bit words in host byte order: an IPv4 address is one word (`0100007F` is
//! 127.0.0.1) and an IPv6 address four words, each byte-reversed
//! (`00000000000000000000000001000000` is `::1`). This parser assumes a
//! little-endian host (x86-64, arm64), which is what jitgate agents run on.
//!
//! Addresses are reported as the kernel shows them: a dual-stack listener on
//! `::ffff:127.0.0.1` stays an IPv6 address in the `V6` family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::nft::L4;

/// The socket file a text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcNetFile {
    Tcp,
    Tcp6,
    Udp,
    Udp6,
}

impl ProcNetFile {
    pub const ALL: [ProcNetFile; 4] = [
        ProcNetFile::Tcp,
        ProcNetFile::Tcp6,
        ProcNetFile::Udp,
        ProcNetFile::Udp6,
    ];

    /// Where the file lives (for the caller that reads it).
    pub fn path(self) -> &'static str {
        match self {
            ProcNetFile::Tcp => "/proc/net/tcp",
            ProcNetFile::Tcp6 => "/proc/net/tcp6",
            ProcNetFile::Udp => "/proc/net/udp",
            ProcNetFile::Udp6 => "/proc/net/udp6",
        }
    }

    pub fn proto(self) -> L4 {
        match self {
            ProcNetFile::Tcp | ProcNetFile::Tcp6 => L4::Tcp,
            ProcNetFile::Udp | ProcNetFile::Udp6 => L4::Udp,
        }
    }

    pub fn family(self) -> Family {
        match self {
            ProcNetFile::Tcp | ProcNetFile::Udp => Family::V4,
            ProcNetFile::Tcp6 | ProcNetFile::Udp6 => Family::V6,
        }
    }

    /// The socket state that means "accepts new inbound traffic".
    fn listening_state(self) -> u8 {
        match self.proto() {
            L4::Tcp => 0x0A, // TCP_LISTEN
            L4::Udp => 0x07, // TCP_CLOSE: an unconnected datagram socket
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// A socket that accepts inbound traffic on `addr:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listener {
    pub proto: L4,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// Parses one file's text. The header line is skipped, as are blank lines; any other
/// line that does not have the expected shape is an error naming its line number,
/// because silently missing a listener would misreport what is exposed.
pub fn parse(file: ProcNetFile, text: &str) -> Result<Vec<Listener>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || (i == 0 && fields.first() == Some(&"sl")) {
            continue;
        }
        let parsed = parse_line(file, &fields)
            .map_err(|e| format!("{} line {}: {e}: '{}'", file.path(), i + 1, line.trim()))?;
        out.extend(parsed);
    }
    Ok(out)
}

/// Fields: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_line(file: ProcNetFile, fields: &[&str]) -> Result<Option<Listener>, String> {
    if fields.len() < 10 || !fields[0].ends_with(':') {
        return Err("not a socket line".into());
    }
    let (addr, port) = parse_endpoint(file.family(), fields[1])?;
    let state = u8::from_str_radix(fields[3], 16)
        .map_err(|_| format!("state '{}' is not hex", fields[3]))?;
    let inode: u64 = fields[9]
        .parse()
        .map_err(|_| format!("inode '{}' is not a number", fields[9]))?;
    if state != file.listening_state() || port == 0 {
        return Ok(None);
    }
    Ok(Some(Listener {
        proto: file.proto(),
        family: file.family(),
        addr,
        port,
        inode,
    }))
}

fn parse_endpoint(family: Family, s: &str) -> Result<(IpAddr, u16), String> {
    let (addr, port) = s
        .split_once(':')
        .ok_or_else(|| format!("address '{s}' has no port"))?;
    let port = u16::from_str_radix(port, 16).map_err(|_| format!("port '{port}' is not hex"))?;
    let words = parse_words(addr)?;
    let addr = match (family, words.as_slice()) {
        (Family::V4, [w]) => IpAddr::V4(Ipv4Addr::from(w.to_le_bytes())),
        (Family::V6, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (chunk, w) in bytes.chunks_exact_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return Err(format!("address '{addr}' has the wrong length")),
    };
    Ok((addr, port))
}

/// Splits a hex address into 32-bit words (8 hex digits each).
fn parse_words(hex: &str) -> Result<Vec<u32>, String> {
    if hex.is_empty() || !hex.len().is_multiple_of(8) || !hex.is_ascii() {
        return Err(format!("address '{hex}' has the wrong length"));
    }
    (0..hex.len())
        .step_by(8)
        .map(|i| {
            u32::from_str_radix(&hex[i..i + 8], 16)
                .map_err(|_| format!("address '{hex}' is not hex"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses `text` as `file` and compares `(addr, port, inode)` of the listeners.
    fn check(file: ProcNetFile, text: &str, expect: &[(&str, u16, u64)]) {
        let got = parse(file, text).unwrap();
        for l in &got {
            assert_eq!((l.proto, l.family), (file.proto(), file.family()));
        }
        let got: Vec<(String, u16, u64)> = got
            .iter()
            .map(|l| (l.addr.to_string(), l.port, l.inode))
            .collect();
        let want: Vec<(String, u16, u64)> = expect
            .iter()
            .map(|(a, p, i)| (a.to_string(), *p, *i))
            .collect();
        assert_eq!(got, want);
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1609 1 0000000013f94096 100 0 0 10 0
   1: 0100007F:CEF0 0100007F:A113 06 00000000:00000000 03:00000344 00000000     0        0 0 3 000000005d3252ed
   2: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 53422 1 00000000bd8b95bf 100 0 0 10 0
   3: 0F02000A:0016 0101000A:D3A2 01 00000000:00000000 02:000A7B2D 00000000     0        0 88121 4 00000000aa5b1c2e 20 4 30 10 -1
   4: 0F02000A:0D3D 00000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 90210 1 00000000cc11dd22 100 0 0 10 0
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 53424 1 000000009f59c03d 100 0 0 10 0
   1: 00000000000000000000000001000000:08AE 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 53420 1 00000000f919c97d 100 0 0 10 0
   2: B80D0120000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 61000 1 0000000011112222 100 0 0 10 0
   3: B80D0120000000000000000001000000:0016 B80D0120000000000000000002000000:E1F2 01 00000000:00000000 02:00000A7B 00000000     0        0 61001 2 0000000033334444 20 4 30 10 -1
";

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1431: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 53423 2 00000000c7367d51 0
 1500: 0F02000A:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12001 2 00000000c7367d52 0
 1501: 0F02000A:E6C1 08080808:0035 01 00000000:00000000 00:00000000 00000000  1000        0 12002 2 00000000c7367d53 0
 1502: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12003 2 00000000c7367d54 0
";

    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 6731: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 53421 2 00000000118c9847 0
 6732: 000080FE00000000FF005450563412FE:0222 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 53499 2 00000000118c9848 0
";

    #[test]
    fn tcp_listeners_only() {
        check(
            ProcNetFile::Tcp,
            TCP,
            &[
                ("0.0.0.0", 2024, 1609),
                ("127.0.0.1", 22, 53422),
                ("10.0.2.15", 3389, 90210),
            ],
        );
        check(
            ProcNetFile::Tcp6,
            TCP6,
            &[
                ("::ffff:127.0.0.1", 8080, 53424),
                ("::1", 2222, 53420),
                ("2001:db8::1", 22, 61000),
            ],
        );
    }

    #[test]
    fn udp_bound_unconnected_only() {
        check(
            ProcNetFile::Udp,
            UDP,
            &[("0.0.0.0", 53, 53423), ("10.0.2.15", 68, 12001)],
        );
        check(
            ProcNetFile::Udp6,
            UDP6,
            &[("::", 5353, 53421), ("fe80::5054:ff:fe12:3456", 546, 53499)],
        );
    }

    #[test]
    fn empty_and_header_only() {
        check(ProcNetFile::Tcp, "", &[]);
        check(ProcNetFile::Udp6, UDP6.lines().next().unwrap(), &[]);
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        let header = TCP.lines().next().unwrap();
        for bad in [
            "   0: 0000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1609",
            "   0: 00000000 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1609",
            "   0: 00000000:XYZ1 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1609",
            "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 ino",
            "   0: 00000000:07E8 00000000:0000 0A",
            "garbage",
        ] {
            let e = parse(ProcNetFile::Tcp, &format!("{header}\n{bad}\n")).unwrap_err();
            assert!(e.starts_with("/proc/net/tcp line 2:"), "{e}");
        }
        // A v4 address in a v6 file is the wrong length.
        let e = parse(
            ProcNetFile::Tcp6,
            "   0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1",
        )
        .unwrap_err();
        assert!(e.contains("wrong length"), "{e}");
    }

    // ---------------------------------------------------------------------------
    // Properties
    // ---------------------------------------------------------------------------

    fn arb_file() -> impl Strategy<Value = ProcNetFile> {
        prop::sample::select(ProcNetFile::ALL.to_vec())
    }

    /// A socket as the kernel would print it: `(address, port, state, inode)`.
    type Sock = (IpAddr, u16, u8, u64);

    fn arb_sock(family: Family) -> BoxedStrategy<Sock> {
        let addr = match family {
            Family::V4 => any::<u32>()
                .prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                .boxed(),
            Family::V6 => any::<u128>()
                .prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                .boxed(),
        };
        let state = prop_oneof![Just(0x0Au8), Just(0x07), Just(0x01), any::<u8>()];
        (
            addr,
            prop_oneof![Just(0u16), any::<u16>()],
            state,
            any::<u64>(),
        )
            .boxed()
    }

    /// The kernel's hex form of an address (see the module docs).
    fn hex_addr(addr: IpAddr) -> String {
        let octets = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        octets
            .chunks_exact(4)
            .map(|c| format!("{:08X}", u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    }

    fn line(sl: usize, (addr, port, state, inode): Sock) -> String {
        let zero = hex_addr(match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        });
        format!(
            "{sl:4}: {}:{port:04X} {zero}:0000 {state:02X} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0",
            hex_addr(addr)
        )
    }

    fn text_of(socks: &[Sock]) -> String {
        let mut t = TCP.lines().next().unwrap().to_owned();
        t.push('\n');
        for (i, s) in socks.iter().enumerate() {
            t.push_str(&line(i, *s));
            t.push('\n');
        }
        t
    }

    fn arb_file_and_socks() -> impl Strategy<Value = (ProcNetFile, Vec<Sock>)> {
        arb_file().prop_flat_map(|f| (Just(f), prop::collection::vec(arb_sock(f.family()), 0..12)))
    }

    /// An error names the file and a line that exists and is not blank, and quotes it.
    fn check_error(file: ProcNetFile, text: &str, e: &str) -> Result<(), TestCaseError> {
        let prefix = format!("{} line ", file.path());
        prop_assert!(e.starts_with(&prefix), "{}", e);
        let rest = &e[prefix.len()..];
        let n: usize = rest[..rest.find(':').unwrap()].parse().unwrap();
        let named = text.lines().nth(n - 1);
        prop_assert!(named.is_some(), "line {} of {:?}", n, text);
        let named = named.unwrap().trim();
        prop_assert!(!named.is_empty());
        prop_assert!(e.ends_with(&format!(": '{named}'")), "{}", e);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary text never panics; an error names its line.
        #[test]
        fn arbitrary_text_never_panics(file in arb_file(), text in prop_oneof![
            any::<String>(),
            "([ 0-9A-Fa-f:x]{0,60}\n){0,6}",
        ]) {
            if let Err(e) = parse(file, &text) {
                check_error(file, &text, &e)?;
            }
        }

        /// Well-formed files give exactly the listening sockets, with their address,
        /// port and inode.
        #[test]
        fn well_formed_files_round_trip((file, socks) in arb_file_and_socks()) {
            let got = parse(file, &text_of(&socks)).unwrap();
            let want: Vec<Listener> = socks
                .iter()
                .filter(|(_, port, state, _)| *state == file.listening_state() && *port != 0)
                .map(|&(addr, port, _, inode)| Listener {
                    proto: file.proto(),
                    family: file.family(),
                    addr,
                    port,
                    inode,
                })
                .collect();
            prop_assert_eq!(got, want);
        }

        /// A well-formed file with one byte replaced, or text inserted, never panics,
        /// and an error names a line.
        #[test]
        fn mutated_files_never_panic(
            (file, socks) in arb_file_and_socks(),
            at in any::<prop::sample::Index>(),
            insert in prop_oneof![any::<char>().prop_map(String::from), "[ :\n0-9A-Fxg\u{e9}]{1,4}"],
            replace in any::<bool>(),
        ) {
            let mut text = text_of(&socks);
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            if replace && i < text.len() {
                let next = text[i..].chars().next().unwrap();
                text.replace_range(i..i + next.len_utf8(), &insert);
            } else {
                text.insert_str(i, &insert);
            }
            match parse(file, &text) {
                Ok(found) => {
                    for l in found {
                        prop_assert_eq!((l.proto, l.family), (file.proto(), file.family()));
                        prop_assert!(l.port != 0);
                    }
                }
                Err(e) => check_error(file, &text, &e)?,
            }
        }
    }
}
