//! nf_tables over netlink: the few messages the agent sends to change, read and watch
//! its grant sets (and a gateway's sets and DNAT maps, `crate::gateway`), encoded
//! and decoded here (no IO; the agent owns the socket).
//!
//! Why by hand: no maintained crate on a permissive licence encodes set elements with
//! per-element timeouts and concatenated keys (see `docs/ARCHITECTURE.md`); the
//! messages jitgate needs are few and fixed:
//!
//! * a **batch** `NFNL_MSG_BATCH_BEGIN`, one `NFT_MSG_DELSETELEM` or
//!   `NFT_MSG_NEWSETELEM` per element, `NFNL_MSG_BATCH_END`. The kernel commits the
//!   whole batch or nothing; it answers only the messages that failed (none carries
//!   `NLM_F_ACK`), each with its sequence number, so [`Outcome`] can say which
//!   element failed and why. One element per message is what lets the agent drop a
//!   delete that failed with "no such element" (the kernel expired it a moment ago)
//!   and send the rest again: a revoke closes the port at any moment.
//! * `NFT_MSG_GETGEN`, sent after a batch: its answer comes after every answer to
//!   the batch, so reading up to it collects them all.
//! * `NFT_MSG_GETSETELEM` with `NLM_F_DUMP`: every element of a set with its timeout
//!   and the milliseconds left (`nft -j` prints whole seconds only).
//! * the notifications of group `NFNLGRP_NFTABLES` (what `nft monitor` reads): which
//!   table each change touched, and which process committed it (`NFT_MSG_NEWGEN`).
//!
//! Wire facts (kernel UAPI `linux/netfilter/nf_tables.h`, `nfnetlink.h`): headers
//! and attribute headers are in host order, nf_tables values (timeouts, ports, the
//! generation) in network order; attributes are padded to 4 bytes. A concatenated key
//! puts each field in its own 4-byte register: `ipv4_addr . inet_proto .
//! inet_service` is `a.b.c.d | proto 0 0 0 | port_hi port_lo 0 0` (12 bytes), with
//! an IPv6 address 24. An interval set's element carries its first key and, in
//! `NFTA_SET_ELEM_KEY_END`, its last (the prefix's broadcast address); a hash set's
//! only the key. A map element's data (`NFTA_SET_ELEM_DATA`) is laid out the same
//! way: a gateway's `ipv4_addr . inet_service` is 8 bytes. Timeouts are milliseconds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use jiff::Timestamp;

use crate::net::Port;
use crate::nft::{Element, L4, TABLE};

// netlink (linux/netlink.h)
const NLMSG_HDRLEN: usize = 16;
/// An error or acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// The end of a dump.
pub const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
/// Set on a dump's messages when the table changed while the dump ran: it may have
/// skipped or repeated elements.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// nfnetlink (linux/netfilter/nfnetlink.h)
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
/// The multicast group of nf_tables changes.
pub const NFNLGRP_NFTABLES: u32 = 7;

// nf_tables (linux/netfilter/nf_tables.h)
/// `NFT_MSG_*` message kinds.
pub mod msg {
    pub const NEWTABLE: u16 = 0;
    pub const DELTABLE: u16 = 2;
    pub const NEWCHAIN: u16 = 3;
    pub const DELCHAIN: u16 = 5;
    pub const NEWRULE: u16 = 6;
    pub const DELRULE: u16 = 8;
    pub const NEWSET: u16 = 9;
    pub const GETSET: u16 = 10;
    pub const DELSET: u16 = 11;
    pub const NEWSETELEM: u16 = 12;
    pub const GETSETELEM: u16 = 13;
    pub const DELSETELEM: u16 = 14;
    pub const NEWGEN: u16 = 15;
    pub const GETGEN: u16 = 16;
    pub const NEWOBJ: u16 = 18;
    pub const DELOBJ: u16 = 20;
}
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_GEN_ID: u16 = 1;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
/// In every object message (table, chain, rule, set, element list, object,
/// flowtable) attribute 1 is the table's name.
const NFTA_ANY_TABLE: u16 = 1;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The message type of an nf_tables message kind.
fn nft_type(kind: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | kind
}

// ---------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages to one buffer.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Starts a message (header and `nfgenmsg`); returns its offset for [`Self::end`].
    fn begin(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `end`
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len() + align(len) - len, 0);
    }

    fn str_attr(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    fn nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// An address's bytes (4 or 16: a whole number of registers).
fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A port in its register: `port_hi port_lo 0 0`.
fn port_register(port: u16) -> [u8; 4] {
    let [hi, lo] = port.to_be_bytes();
    [hi, lo, 0, 0]
}

/// The 4-byte-register layout of `addr . proto . port`.
pub fn key_bytes(addr: IpAddr, proto: L4, port: u16) -> Vec<u8> {
    let mut k = addr_bytes(addr);
    k.extend_from_slice(&[l4_number(proto), 0, 0, 0]);
    k.extend_from_slice(&port_register(port));
    k
}

fn l4_number(p: L4) -> u8 {
    match p {
        L4::Tcp => IPPROTO_TCP,
        L4::Udp => IPPROTO_UDP,
    }
}

/// What an element of a set (or map) is on the wire: where it goes, its key (and
/// key end in an interval set), and in a map its data.
pub trait Encode {
    /// The table, in family `inet`.
    fn table(&self) -> &str;
    /// The set or map.
    fn set(&self) -> &str;
    /// The key (for an interval, its first key).
    fn key(&self) -> Vec<u8>;
    /// An interval's last key (`NFTA_SET_ELEM_KEY_END`); None in a hash set.
    fn key_end(&self) -> Option<Vec<u8>>;
    /// A map element's data; None in a set.
    fn data(&self) -> Option<Vec<u8>> {
        None
    }
}

impl Encode for Element {
    fn table(&self) -> &str {
        TABLE
    }

    fn set(&self) -> &str {
        Element::set(self)
    }

    fn key(&self) -> Vec<u8> {
        key_bytes(self.net.network(), self.proto, self.port.get())
    }

    fn key_end(&self) -> Option<Vec<u8>> {
        (!self.is_host()).then(|| key_bytes(self.net.broadcast(), self.proto, self.port.get()))
    }
}

/// A gateway set's key, `source . address . proto . port`, or a map's, `public .
/// source . proto . port` (each field in its register: 16 or 40 bytes); see
/// [`parse_gw_key`].
fn gw_key(first: IpAddr, second: IpAddr, proto: L4, port: u16) -> Vec<u8> {
    let mut k = addr_bytes(first);
    k.extend_from_slice(&key_bytes(second, proto, port));
    k
}

/// An entry of `table inet jitgate_gw`: in a set, the key `source . address . proto
/// . port`; in a DNAT map (`to_port` given), the key `public address . source .
/// proto . mapped port` and the data `address . port`. The interval sets and maps
/// hold a prefix, the `h` ones a single address (as [`crate::gateway::entries`]
/// chooses).
impl Encode for crate::gateway::Entry {
    fn table(&self) -> &str {
        crate::gateway::TABLE
    }

    fn set(&self) -> &str {
        self.set
    }

    fn key(&self) -> Vec<u8> {
        self.key_from(self.net.network())
    }

    fn key_end(&self) -> Option<Vec<u8>> {
        (self.net.prefix_len() != self.net.max_prefix_len())
            .then(|| self.key_from(self.net.broadcast()))
    }

    fn data(&self) -> Option<Vec<u8>> {
        self.to_port.map(|to| {
            let mut d = addr_bytes(self.address);
            d.extend_from_slice(&port_register(to.get()));
            d
        })
    }
}

impl crate::gateway::Entry {
    fn key_from(&self, source: IpAddr) -> Vec<u8> {
        match (self.to_port, self.public) {
            (Some(_), Some(public)) => gw_key(public, source, self.proto, self.port.get()),
            _ => gw_key(source, self.address, self.proto, self.port.get()),
        }
    }
}

/// One change to a set: an element of `table inet jitgate`'s grant sets
/// ([`SetOp`]) or of `table inet jitgate_gw`'s sets and maps ([`GwOp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<E> {
    /// Add the element with this many milliseconds to live (never 0: a timeout of
    /// 0 means "no timeout" to the kernel, i.e. permanent access).
    Add { element: E, timeout_ms: u64 },
    /// Delete the element.
    Del(E),
}

/// A change to a grant set of `table inet jitgate`.
pub type SetOp = Op<Element>;
/// A change to a set or map of `table inet jitgate_gw`.
pub type GwOp = Op<crate::gateway::Entry>;

impl<E> Op<E> {
    pub fn element(&self) -> &E {
        match self {
            Op::Add { element, .. } | Op::Del(element) => element,
        }
    }
}

/// The operations of a change: deletes of `dels` first, then adds of `adds`, each
/// with the time left until its end (`nft::timeout_ms`) as its timeout; an add too
/// close to its end is left out, as a render leaves it out.
pub fn changes<E>(
    dels: impl IntoIterator<Item = E>,
    adds: impl IntoIterator<Item = (E, Timestamp)>,
    now: Timestamp,
) -> Vec<Op<E>> {
    let mut ops: Vec<Op<E>> = dels.into_iter().map(Op::Del).collect();
    for (element, end) in adds {
        if let Some(ms) = crate::nft::timeout_ms(end, now) {
            ops.push(Op::Add {
                element,
                timeout_ms: u64::try_from(ms).unwrap_or(u64::MAX),
            });
        }
    }
    ops
}

fn element_attrs<E: Encode>(w: &mut Writer, op: &Op<E>) {
    let e = op.element();
    w.str_attr(NFTA_SET_ELEM_LIST_TABLE, e.table());
    w.str_attr(NFTA_SET_ELEM_LIST_SET, e.set());
    let list = w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
    let item = w.nest(NFTA_LIST_ELEM);
    let key = w.nest(NFTA_SET_ELEM_KEY);
    w.attr(NFTA_DATA_VALUE, &e.key());
    w.nest_end(key);
    if let Some(last) = e.key_end() {
        let end = w.nest(NFTA_SET_ELEM_KEY_END);
        w.attr(NFTA_DATA_VALUE, &last);
        w.nest_end(end);
    }
    if let Op::Add { timeout_ms, .. } = op {
        w.attr(NFTA_SET_ELEM_TIMEOUT, &timeout_ms.max(&1).to_be_bytes());
        if let Some(data) = e.data() {
            let d = w.nest(NFTA_SET_ELEM_DATA);
            w.attr(NFTA_DATA_VALUE, &data);
            w.nest_end(d);
        }
    }
    w.nest_end(item);
    w.nest_end(list);
}

/// One atomic batch: `ops[i]` is sent with sequence number `seq + 1 + i` (the
/// batch's begin takes `seq`, its end `seq + 1 + ops.len()`). Adds carry
/// `NLM_F_CREATE | NLM_F_EXCL`: an element already in the kernel fails the batch
/// ("File exists") rather than keep an old timeout.
pub fn batch<E: Encode>(ops: &[Op<E>], seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let b = w.begin(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    w.end(b);
    for (i, op) in ops.iter().enumerate() {
        let (kind, flags) = match op {
            Op::Add { .. } => (msg::NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL),
            Op::Del(_) => (msg::DELSETELEM, NLM_F_REQUEST),
        };
        let m = w.begin(
            nft_type(kind),
            flags,
            seq.wrapping_add(1 + i as u32),
            NFPROTO_INET,
            0,
        );
        element_attrs(&mut w, op);
        w.end(m);
    }
    let e = w.begin(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq.wrapping_add(1 + ops.len() as u32),
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    w.end(e);
    w.buf
}

/// `NFT_MSG_GETGEN`: asks for the ruleset's generation. Its answer is a
/// `NFT_MSG_NEWGEN` with the same sequence number.
pub fn get_gen(seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let m = w.begin(nft_type(msg::GETGEN), NLM_F_REQUEST, seq, NFPROTO_UNSPEC, 0);
    w.end(m);
    w.buf
}

/// `NFT_MSG_GETSET` of one set of `table inet <table>`: answered by its
/// `NFT_MSG_NEWSET`, or by ENOENT when the set or the table does not exist.
pub fn get_set(table: &str, set: &str, seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let m = w.begin(nft_type(msg::GETSET), NLM_F_REQUEST, seq, NFPROTO_INET, 0);
    w.str_attr(NFTA_SET_TABLE, table);
    w.str_attr(NFTA_SET_NAME, set);
    w.end(m);
    w.buf
}

/// `NFT_MSG_GETSETELEM` with `NLM_F_DUMP`: every element of `set` in `table inet
/// jitgate`, answered by `NFT_MSG_NEWSETELEM` messages (see [`dumped_elements`]) and
/// `NLMSG_DONE`.
pub fn dump_set(set: &str, seq: u32) -> Vec<u8> {
    dump_set_of(TABLE, set, seq)
}

/// [`dump_set`] of a set (or map) in `table inet <table>`.
pub fn dump_set_of(table: &str, set: &str, seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let m = w.begin(
        nft_type(msg::GETSETELEM),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_INET,
        0,
    );
    w.str_attr(NFTA_SET_ELEM_LIST_TABLE, table);
    w.str_attr(NFTA_SET_ELEM_LIST_SET, set);
    w.end(m);
    w.buf
}

// ---------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------

/// A message that cannot be decoded (truncated or with bad lengths).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct Malformed(&'static str);

/// One netlink message as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// The port id of the socket that caused it (0: the kernel).
    pub port: u32,
    /// Everything after the 16-byte header.
    pub payload: &'a [u8],
}

impl Message<'_> {
    /// True on a dump's message when the ruleset changed while the dump ran: the
    /// dump as a whole may have skipped or repeated elements, and must be read again.
    pub fn dump_interrupted(&self) -> bool {
        self.flags & NLM_F_DUMP_INTR != 0
    }
}

fn u16_ne(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn u32_ne(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// The messages in one received datagram.
pub fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, Malformed> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_ne(&buf[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(Malformed("message length"));
        }
        out.push(Message {
            ty: u16_ne(&buf[4..6]),
            flags: u16_ne(&buf[6..8]),
            seq: u32_ne(&buf[8..12]),
            port: u32_ne(&buf[12..16]),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

impl Message<'_> {
    /// For `NLMSG_ERROR`: the errno (positive; 0 is an acknowledgement).
    pub fn error(&self) -> Option<i32> {
        if self.ty != NLMSG_ERROR || self.payload.len() < 4 {
            return None;
        }
        let code = i32::from_ne_bytes([
            self.payload[0],
            self.payload[1],
            self.payload[2],
            self.payload[3],
        ]);
        Some(code.saturating_neg())
    }

    /// The nf_tables message kind (`msg::*`), if this is one.
    pub fn nft_kind(&self) -> Option<u16> {
        (self.ty >> 8 == NFNL_SUBSYS_NFTABLES).then_some(self.ty & 0xff)
    }

    /// The `nfgenmsg` family and the attributes after it.
    fn nfgen(&self) -> Result<(u8, Attrs<'_>), Malformed> {
        if self.payload.len() < 4 {
            return Err(Malformed("nfgenmsg"));
        }
        Ok((self.payload[0], attrs(&self.payload[4..])?))
    }
}

/// Attributes: (type without flags, payload).
type Attrs<'a> = Vec<(u16, &'a [u8])>;

/// The attributes in `buf`.
fn attrs(mut buf: &[u8]) -> Result<Attrs<'_>, Malformed> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16_ne(&buf[0..2]) as usize;
        if len < 4 || len > buf.len() {
            return Err(Malformed("attribute length"));
        }
        out.push((u16_ne(&buf[2..4]) & NLA_TYPE_MASK, &buf[4..len]));
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

fn find<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

fn nul_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// One element as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub net: IpNet,
    pub proto: L4,
    pub port: Port,
    /// The timeout it was added with (None: it never expires).
    pub timeout_ms: Option<u64>,
    /// Milliseconds left before the kernel expires it.
    pub expires_ms: Option<u64>,
}

/// Decodes a key (`addr . proto . port`, see [`key_bytes`]).
fn parse_key(b: &[u8]) -> Result<(IpAddr, L4, Port), Malformed> {
    let (addr, rest) = match b.len() {
        12 => {
            let o: [u8; 4] = b[..4].try_into().map_err(|_| Malformed("key"))?;
            (IpAddr::V4(Ipv4Addr::from(o)), &b[4..])
        }
        24 => {
            let o: [u8; 16] = b[..16].try_into().map_err(|_| Malformed("key"))?;
            (IpAddr::V6(Ipv6Addr::from(o)), &b[16..])
        }
        _ => return Err(Malformed("key length")),
    };
    let proto = match rest[0] {
        IPPROTO_TCP => L4::Tcp,
        IPPROTO_UDP => L4::Udp,
        _ => return Err(Malformed("key protocol")),
    };
    let port = Port::new(i64::from(u16::from_be_bytes([rest[4], rest[5]])))
        .map_err(|_| Malformed("key port"))?;
    Ok((addr, proto, port))
}

/// The prefix from its first and last address; None when they do not bound one CIDR.
fn prefix_between(first: IpAddr, last: IpAddr) -> Option<IpNet> {
    let (a, b, bits) = match (first, last) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return None,
    };
    let host_bits = 128 - (a ^ b).leading_zeros();
    let len = bits - host_bits.min(bits);
    let net = IpNet::new(first, len as u8).ok()?;
    (net.network() == first && net.broadcast() == last).then_some(net)
}

fn nested_value(b: &[u8]) -> Result<&[u8], Malformed> {
    find(&attrs(b)?, NFTA_DATA_VALUE).ok_or(Malformed("key without a value"))
}

/// The attributes of each element in one answer to [`dump_set_of`].
fn dumped_items<'a>(m: &'a Message<'_>) -> Result<Vec<Attrs<'a>>, Malformed> {
    if m.nft_kind() != Some(msg::NEWSETELEM) {
        return Ok(Vec::new());
    }
    let (_, top) = m.nfgen()?;
    let Some(list) = find(&top, NFTA_SET_ELEM_LIST_ELEMENTS) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (ty, item) in attrs(list)? {
        if ty == NFTA_LIST_ELEM {
            out.push(attrs(item)?);
        }
    }
    Ok(out)
}

/// The source of an element: its key's first field, a prefix when the element is an
/// interval (its key end's first field is the prefix's last address).
fn source(
    first: IpAddr,
    a: &Attrs<'_>,
    last: impl Fn(&[u8]) -> Result<IpAddr, Malformed>,
) -> Result<IpNet, Malformed> {
    match find(a, NFTA_SET_ELEM_KEY_END) {
        Some(end) => prefix_between(first, last(nested_value(end)?)?)
            .ok_or(Malformed("interval is not a prefix")),
        None => Ok(IpNet::from(first)),
    }
}

/// An element's timeout and the milliseconds it has left.
fn lifetimes(a: &Attrs<'_>) -> (Option<u64>, Option<u64>) {
    (
        find(a, NFTA_SET_ELEM_TIMEOUT).and_then(be_u64),
        find(a, NFTA_SET_ELEM_EXPIRATION).and_then(be_u64),
    )
}

/// The elements in one answer to [`dump_set`].
pub fn dumped_elements(m: &Message<'_>) -> Result<Vec<Held>, Malformed> {
    let mut out = Vec::new();
    for a in dumped_items(m)? {
        let key = find(&a, NFTA_SET_ELEM_KEY).ok_or(Malformed("element without a key"))?;
        let (first, proto, port) = parse_key(nested_value(key)?)?;
        let net = source(first, &a, |b| parse_key(b).map(|k| k.0))?;
        let (timeout_ms, expires_ms) = lifetimes(&a);
        out.push(Held {
            net,
            proto,
            port,
            timeout_ms,
            expires_ms,
        });
    }
    Ok(out)
}

/// One element of a set or map of `table inet jitgate_gw` as the kernel holds it
/// (see `crate::gateway`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GwHeld {
    /// The source prefix.
    pub net: IpNet,
    pub proto: L4,
    /// In a set, the machine's port; in a map, the mapped port.
    pub port: Port,
    /// The machine's address: in a set's key, in a map's data.
    pub address: IpAddr,
    /// In a map, the machine's port the mapped port leads to.
    pub to_port: Option<Port>,
    /// In a map, the gateway's public address (the key's first field).
    pub public: Option<IpAddr>,
    pub timeout_ms: Option<u64>,
    pub expires_ms: Option<u64>,
}

/// An address of `len` bytes (4 or 16) at the start of `b`.
fn addr_at(b: &[u8], len: usize) -> Result<IpAddr, Malformed> {
    match len {
        4 => {
            let o: [u8; 4] = b
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(Malformed("address"))?;
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        _ => {
            let o: [u8; 16] = b
                .get(..16)
                .and_then(|s| s.try_into().ok())
                .ok_or(Malformed("address"))?;
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
    }
}

/// A gateway set's key, `source . address . proto . port` (16 or 40 bytes).
fn parse_gw_key(b: &[u8]) -> Result<(IpAddr, IpAddr, L4, Port), Malformed> {
    let alen = match b.len() {
        16 => 4,
        40 => 16,
        _ => return Err(Malformed("gateway key length")),
    };
    let (src, dst) = (addr_at(b, alen)?, addr_at(&b[alen..], alen)?);
    let (_, proto, port) = parse_key(&[&b[..alen], &b[2 * alen..]].concat())?;
    Ok((src, dst, proto, port))
}

/// A gateway map's data, `address . port` (8 or 20 bytes).
fn parse_gw_data(b: &[u8]) -> Result<(IpAddr, Port), Malformed> {
    let alen = match b.len() {
        8 => 4,
        20 => 16,
        _ => return Err(Malformed("gateway map data length")),
    };
    let port = Port::new(i64::from(u16::from_be_bytes([b[alen], b[alen + 1]])))
        .map_err(|_| Malformed("map data port"))?;
    Ok((addr_at(b, alen)?, port))
}

/// The elements in one answer to [`dump_set_of`] for a set (`map` false: keys
/// `source . address . proto . port`) or a DNAT map (`map` true: keys `public .
/// source . proto . mapped port`, data `address . port`) of `table inet jitgate_gw`.
pub fn dumped_gw_elements(m: &Message<'_>, map: bool) -> Result<Vec<GwHeld>, Malformed> {
    let mut out = Vec::new();
    for a in dumped_items(m)? {
        let key =
            nested_value(find(&a, NFTA_SET_ELEM_KEY).ok_or(Malformed("element without a key"))?)?;
        let (net, address, proto, port, to_port, public) = if map {
            // public . source . proto . mapped port : address . port
            let (public, first, proto, port) = parse_gw_key(key)?;
            let data = find(&a, NFTA_SET_ELEM_DATA).ok_or(Malformed("map element without data"))?;
            let (address, to) = parse_gw_data(nested_value(data)?)?;
            let net = source(first, &a, |b| parse_gw_key(b).map(|k| k.1))?;
            (net, address, proto, port, Some(to), Some(public))
        } else {
            let (first, address, proto, port) = parse_gw_key(key)?;
            let net = source(first, &a, |b| parse_gw_key(b).map(|k| k.0))?;
            (net, address, proto, port, None, None)
        };
        let (timeout_ms, expires_ms) = lifetimes(&a);
        out.push(GwHeld {
            net,
            proto,
            port,
            address,
            to_port,
            public,
            timeout_ms,
            expires_ms,
        });
    }
    Ok(out)
}

/// The generation in an answer to [`get_gen`] or a `NEWGEN` notification.
pub fn generation(m: &Message<'_>) -> Option<u32> {
    if m.nft_kind() != Some(msg::NEWGEN) {
        return None;
    }
    let (_, a) = m.nfgen().ok()?;
    find(&a, NFTA_GEN_ID).and_then(be_u32)
}

/// What one notification of [`NFNLGRP_NFTABLES`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A change to an object (`kind` is a `msg::*`) of `table` in `family`.
    Change {
        kind: u16,
        family: u8,
        table: String,
    },
    /// A transaction committed: the changes notified since the previous one are
    /// its. `pid` is the committing task's id (a thread's, for a threaded process).
    Commit {
        generation: u32,
        pid: u32,
        process: String,
    },
}

impl Notice {
    /// True for a change to `table inet jitgate`.
    pub fn touches_jitgate(&self) -> bool {
        self.touches(TABLE)
    }

    /// True for a change to `table inet <name>`.
    pub fn touches(&self, name: &str) -> bool {
        matches!(self, Notice::Change { family, table, .. } if *family == NFPROTO_INET && table == name)
    }
}

/// Decodes a notification (None for anything else, such as a trace message).
pub fn notice(m: &Message<'_>) -> Option<Notice> {
    let kind = m.nft_kind()?;
    let (family, a) = m.nfgen().ok()?;
    if kind == msg::NEWGEN {
        return Some(Notice::Commit {
            generation: find(&a, NFTA_GEN_ID).and_then(be_u32)?,
            pid: find(&a, NFTA_GEN_PROC_PID).and_then(be_u32).unwrap_or(0),
            process: find(&a, NFTA_GEN_PROC_NAME)
                .map(nul_str)
                .unwrap_or_default(),
        });
    }
    let known = [
        msg::NEWTABLE,
        msg::DELTABLE,
        msg::NEWCHAIN,
        msg::DELCHAIN,
        msg::NEWRULE,
        msg::DELRULE,
        msg::NEWSET,
        msg::DELSET,
        msg::NEWSETELEM,
        msg::DELSETELEM,
        msg::NEWOBJ,
        msg::DELOBJ,
    ];
    if !known.contains(&kind) {
        return None;
    }
    Some(Notice::Change {
        kind,
        family,
        table: find(&a, NFTA_ANY_TABLE).map(nul_str)?,
    })
}

/// What the kernel answered to a batch sent with [`batch`] at sequence `seq` with
/// `len` operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// (index into the operations, errno) of every operation that failed.
    pub failed: Vec<(usize, i32)>,
    /// An error about the batch as a whole (at its begin or end, or at commit).
    pub batch_error: Option<i32>,
}

impl Outcome {
    /// Collects the errors in `answers` that belong to the batch.
    pub fn from_answers(answers: &[Message<'_>], seq: u32, len: usize) -> Self {
        let mut out = Outcome::default();
        for m in answers {
            let Some(code) = m.error().filter(|c| *c != 0) else {
                continue;
            };
            let offset = m.seq.wrapping_sub(seq) as usize;
            if (1..=len).contains(&offset) {
                out.failed.push((offset - 1, code));
            } else if offset == 0 || offset == len + 1 {
                out.batch_error = Some(code);
            }
        }
        out
    }

    /// True when the kernel committed the batch.
    pub fn committed(&self) -> bool {
        self.failed.is_empty() && self.batch_error.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    fn el(net: &str, proto: L4, port: u16) -> Element {
        Element {
            net: net.parse().unwrap(),
            proto,
            port: Port::new(i64::from(port)).unwrap(),
            end: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn keys_put_each_field_in_a_register() {
        assert_eq!(
            key_bytes("10.1.2.3".parse().unwrap(), L4::Tcp, 22),
            [10, 1, 2, 3, 6, 0, 0, 0, 0, 22, 0, 0]
        );
        let k6 = key_bytes("2001:db8::1".parse().unwrap(), L4::Udp, 3389);
        assert_eq!(k6.len(), 24);
        assert_eq!(&k6[16..], [17, 0, 0, 0, 0x0d, 0x3d, 0, 0]);
        assert_eq!(
            parse_key(&k6).unwrap(),
            (
                "2001:db8::1".parse().unwrap(),
                L4::Udp,
                Port::new(3389).unwrap()
            )
        );
        assert!(parse_key(&[0; 11]).is_err());
    }

    /// The exact bytes of a one-element batch, checked field by field.
    #[test]
    fn a_batch_is_begin_one_message_per_element_end() {
        let add = SetOp::Add {
            element: el("10.0.0.0/8", L4::Tcp, 22),
            timeout_ms: 90_000,
        };
        let del = SetOp::Del(el("192.0.2.7/32", L4::Udp, 53));
        let bytes = batch(&[del, add], 100);
        let msgs = messages(&bytes).unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!((msgs[0].ty, msgs[0].seq), (NFNL_MSG_BATCH_BEGIN, 100));
        assert_eq!(
            msgs[0].payload,
            [0, 0, 0, 10],
            "res_id is the nf_tables subsystem"
        );
        assert_eq!((msgs[3].ty, msgs[3].seq), (NFNL_MSG_BATCH_END, 103));

        let d = msgs[1];
        assert_eq!((d.ty, d.flags, d.seq), (0x0a0e, NLM_F_REQUEST, 101));
        // The smallest operation there is (the agent's size check counts 64 bytes at
        // least for each).
        assert_eq!(NLMSG_HDRLEN + d.payload.len(), 72);
        let (family, a) = d.nfgen().unwrap();
        assert_eq!(family, NFPROTO_INET);
        assert_eq!(find(&a, 1).unwrap(), b"jitgate\0");
        assert_eq!(find(&a, 2).unwrap(), b"hosts4\0");
        let list = attrs(find(&a, 3).unwrap()).unwrap();
        let item = attrs(find(&list, 1).unwrap()).unwrap();
        assert_eq!(
            nested_value(find(&item, NFTA_SET_ELEM_KEY).unwrap()).unwrap(),
            [192, 0, 2, 7, 17, 0, 0, 0, 0, 53, 0, 0]
        );
        assert!(
            find(&item, NFTA_SET_ELEM_KEY_END).is_none(),
            "a hash set has no key end"
        );
        assert!(find(&item, NFTA_SET_ELEM_TIMEOUT).is_none());

        let n = msgs[2];
        assert_eq!(
            (n.ty, n.flags, n.seq),
            (0x0a0c, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, 102)
        );
        let (_, a) = n.nfgen().unwrap();
        assert_eq!(find(&a, 2).unwrap(), b"nets4\0");
        let list = attrs(find(&a, 3).unwrap()).unwrap();
        let item = attrs(find(&list, 1).unwrap()).unwrap();
        assert_eq!(
            nested_value(find(&item, NFTA_SET_ELEM_KEY).unwrap()).unwrap(),
            [10, 0, 0, 0, 6, 0, 0, 0, 0, 22, 0, 0]
        );
        assert_eq!(
            nested_value(find(&item, NFTA_SET_ELEM_KEY_END).unwrap()).unwrap(),
            [10, 255, 255, 255, 6, 0, 0, 0, 0, 22, 0, 0]
        );
        assert_eq!(
            find(&item, NFTA_SET_ELEM_TIMEOUT).unwrap(),
            90_000u64.to_be_bytes()
        );
        // Nested attributes are flagged as such.
        let a = {
            let mut rest = &n.payload[4..];
            let mut flags = Vec::new();
            while rest.len() >= 4 {
                let len = u16_ne(&rest[0..2]) as usize;
                flags.push(u16_ne(&rest[2..4]));
                rest = &rest[align(len)..];
            }
            flags
        };
        assert_eq!(a, [1, 2, 3 | NLA_F_NESTED]);
    }

    #[test]
    fn a_zero_timeout_is_never_written() {
        let add = SetOp::Add {
            element: el("10.0.0.1/32", L4::Tcp, 22),
            timeout_ms: 0,
        };
        let bytes = batch(&[add], 1);
        let msgs = messages(&bytes).unwrap();
        let (_, a) = msgs[1].nfgen().unwrap();
        let list = attrs(find(&a, 3).unwrap()).unwrap();
        let item = attrs(find(&list, 1).unwrap()).unwrap();
        assert_eq!(
            find(&item, NFTA_SET_ELEM_TIMEOUT).unwrap(),
            1u64.to_be_bytes()
        );
    }

    fn error_msg(seq: u32, errno: i32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&36u32.to_ne_bytes());
        v.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&(-errno).to_ne_bytes());
        v.extend_from_slice(&[0; 16]);
        v
    }

    #[test]
    fn a_dump_part_flagged_interrupted_says_so() {
        let mut buf = error_msg(7, 0);
        assert!(!messages(&buf).unwrap()[0].dump_interrupted());
        // NLM_F_MULTI | NLM_F_DUMP_INTR
        buf[6..8].copy_from_slice(&0x12u16.to_ne_bytes());
        assert!(messages(&buf).unwrap()[0].dump_interrupted());
    }

    #[test]
    fn answers_name_the_failed_operations() {
        let mut buf = error_msg(12, 2);
        buf.extend(error_msg(14, 17));
        buf.extend(error_msg(99, 1)); // another request's
        buf.extend(error_msg(11, 0)); // an acknowledgement
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 4);
        let o = Outcome::from_answers(&msgs, 10, 5);
        assert_eq!(o.failed, [(1, 2), (3, 17)]);
        assert_eq!(o.batch_error, None);
        assert!(!o.committed());
        let whole = error_msg(10, 1);
        let o = Outcome::from_answers(&messages(&whole).unwrap(), 10, 5);
        assert_eq!((o.failed.len(), o.batch_error), (0, Some(1)));
        assert!(Outcome::from_answers(&[], 10, 5).committed());
        // Truncated input is an error, not a panic.
        assert!(messages(&buf[..20]).is_err());
        let mut bad = error_msg(1, 1);
        bad[0] = 200;
        assert!(messages(&bad).is_err());
    }

    proptest::proptest! {
        /// Whatever arrives on the socket, decoding never panics: a malformed
        /// message is an error or is skipped.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            ty in proptest::sample::select(vec![
                nft_type(msg::NEWSETELEM),
                nft_type(msg::DELSETELEM),
                nft_type(msg::NEWGEN),
                nft_type(msg::NEWTABLE),
                nft_type(msg::NEWRULE),
                NLMSG_ERROR,
                NLMSG_DONE,
                0xffff,
            ]),
        ) {
            if let Ok(msgs) = messages(&bytes) {
                for m in &msgs {
                    let _ = m.error();
                    let _ = dumped_elements(m);
                    let _ = dumped_gw_elements(m, false);
                    let _ = dumped_gw_elements(m, true);
                    let _ = notice(m);
                    let _ = generation(m);
                }
            }
            // The same bytes as the payload of a message of any type.
            let mut framed = Vec::new();
            framed.extend_from_slice(&((16 + bytes.len()) as u32).to_ne_bytes());
            framed.extend_from_slice(&ty.to_ne_bytes());
            framed.extend_from_slice(&[0; 10]);
            framed.extend_from_slice(&bytes);
            let msgs = messages(&framed).unwrap();
            for m in &msgs {
                let _ = m.error();
                let _ = dumped_elements(m);
                let _ = dumped_gw_elements(m, false);
                let _ = dumped_gw_elements(m, true);
                let _ = notice(m);
                let _ = generation(m);
            }
        }
    }

    /// A dump answer of `set` holding one element: key, optional key end and data,
    /// timeout and time left.
    fn answer(set: &str, key: &[u8], end: Option<&[u8]>, data: Option<&[u8]>) -> Vec<u8> {
        let mut w = Writer::default();
        let m = w.begin(nft_type(msg::NEWSETELEM), 0, 1, NFPROTO_INET, 0);
        w.str_attr(NFTA_SET_ELEM_LIST_TABLE, "jitgate_gw");
        w.str_attr(NFTA_SET_ELEM_LIST_SET, set);
        let list = w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        let item = w.nest(NFTA_LIST_ELEM);
        for (ty, v) in [
            (NFTA_SET_ELEM_KEY, Some(key)),
            (NFTA_SET_ELEM_KEY_END, end),
            (NFTA_SET_ELEM_DATA, data),
        ] {
            if let Some(v) = v {
                let n = w.nest(ty);
                w.attr(NFTA_DATA_VALUE, v);
                w.nest_end(n);
            }
        }
        w.attr(NFTA_SET_ELEM_TIMEOUT, &60_000u64.to_be_bytes());
        w.attr(NFTA_SET_ELEM_EXPIRATION, &59_500u64.to_be_bytes());
        w.nest_end(item);
        w.nest_end(list);
        w.end(m);
        w.buf
    }

    #[test]
    fn gateway_elements_are_read_with_their_machine() {
        // fwd4: 10.0.0.0/8 . 10.78.1.5 . tcp . 3389
        let key = [10, 0, 0, 0, 10, 78, 1, 5, 6, 0, 0, 0, 0x0d, 0x3d, 0, 0];
        let end = [
            10, 255, 255, 255, 10, 78, 1, 5, 6, 0, 0, 0, 0x0d, 0x3d, 0, 0,
        ];
        let bytes = answer("fwd4", &key, Some(&end), None);
        let got = dumped_gw_elements(&messages(&bytes).unwrap()[0], false).unwrap();
        assert_eq!(
            got,
            [GwHeld {
                net: "10.0.0.0/8".parse().unwrap(),
                proto: L4::Tcp,
                port: Port::new(3389).unwrap(),
                address: "10.78.1.5".parse().unwrap(),
                to_port: None,
                public: None,
                timeout_ms: Some(60_000),
                expires_ms: Some(59_500),
            }]
        );
        // dnat6: 2001:db8:ff::1 . 2001:db8::7 . udp . 50000 : 2001:db8:1::5 . 53
        let mut key = "2001:db8:ff::1"
            .parse::<Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        key.extend("2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        key.extend([17, 0, 0, 0, 0xc3, 0x50, 0, 0]);
        let mut data = "2001:db8:1::5"
            .parse::<Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        data.extend([0, 53, 0, 0]);
        let bytes = answer("dnat6", &key, None, Some(&data));
        let got = dumped_gw_elements(&messages(&bytes).unwrap()[0], true).unwrap();
        assert_eq!(got.len(), 1);
        let h = got[0];
        assert_eq!(h.net, "2001:db8::7/128".parse::<IpNet>().unwrap());
        assert_eq!((h.proto, h.port.get()), (L4::Udp, 50000));
        assert_eq!(h.address, "2001:db8:1::5".parse::<IpAddr>().unwrap());
        assert_eq!(h.to_port, Some(Port::new(53).unwrap()));
        assert_eq!(h.public, Some("2001:db8:ff::1".parse().unwrap()));
        // A map element without data, or a key of the wrong length, is malformed.
        let bytes = answer("dnat6", &key, None, None);
        assert!(dumped_gw_elements(&messages(&bytes).unwrap()[0], true).is_err());
        let bytes = answer("fwd4", &key[..12], None, None);
        assert!(dumped_gw_elements(&messages(&bytes).unwrap()[0], false).is_err());
    }

    /// A gateway batch's messages carry each entry as a dump answers it: the same
    /// bytes, read back by the dump's decoder, in the table and set named.
    #[test]
    fn gateway_entries_are_written_as_they_are_read() {
        use crate::gateway::Entry;
        let port = |p: i64| Port::new(p).unwrap();
        let entry = |set, net: &str, proto, p, address: &str, to: Option<(i64, &str)>| Entry {
            set,
            public: to.map(|(_, public)| public.parse().unwrap()),
            net: net.parse().unwrap(),
            proto,
            port: port(p),
            address: address.parse().unwrap(),
            to_port: to.map(|(to, _)| port(to)),
        };
        let fwd = entry("fwd4", "10.0.0.0/8", L4::Tcp, 3389, "10.78.1.5", None);
        let dnat = entry(
            "hdnat6",
            "2001:db8::7/128",
            L4::Udp,
            50000,
            "2001:db8:1::5",
            Some((53, "2001:db8:ff::1")),
        );
        assert_eq!(
            fwd.key(),
            [10, 0, 0, 0, 10, 78, 1, 5, 6, 0, 0, 0, 0x0d, 0x3d, 0, 0]
        );
        assert_eq!(
            fwd.key_end().unwrap(),
            [
                10, 255, 255, 255, 10, 78, 1, 5, 6, 0, 0, 0, 0x0d, 0x3d, 0, 0
            ]
        );
        assert!(dnat.key_end().is_none(), "a host entry has no key end");
        // A map's key starts with the public address, then the source.
        assert_eq!(
            dnat.key()[..32],
            [
                "2001:db8:ff::1".parse::<Ipv6Addr>().unwrap().octets(),
                "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets()
            ]
            .concat()
        );
        assert_eq!(dnat.data().unwrap()[16..], [0, 53, 0, 0]);
        let bytes = batch(
            &[
                GwOp::Del(fwd),
                GwOp::Add {
                    element: dnat,
                    timeout_ms: 60_000,
                },
            ],
            7,
        );
        let msgs = messages(&bytes).unwrap();
        assert_eq!(msgs.len(), 4);
        for (m, kind, entry, map) in [
            (msgs[1], msg::DELSETELEM, fwd, false),
            (msgs[2], msg::NEWSETELEM, dnat, true),
        ] {
            assert_eq!(m.nft_kind(), Some(kind));
            let (_, a) = m.nfgen().unwrap();
            assert_eq!(find(&a, NFTA_SET_ELEM_LIST_TABLE).unwrap(), b"jitgate_gw\0");
            assert_eq!(
                find(&a, NFTA_SET_ELEM_LIST_SET).unwrap(),
                format!("{}\0", entry.set).as_bytes()
            );
            // The decoder reads NEWSETELEM messages only.
            let mut copy = bytes[..].to_vec();
            let at = m.payload.as_ptr() as usize - bytes.as_ptr() as usize - NLMSG_HDRLEN;
            copy[at + 4..at + 6].copy_from_slice(&nft_type(msg::NEWSETELEM).to_ne_bytes());
            let read = dumped_gw_elements(&messages(&copy).unwrap()[if map { 2 } else { 1 }], map)
                .unwrap();
            assert_eq!(read.len(), 1);
            let h = read[0];
            assert_eq!(
                (h.net, h.proto, h.port, h.address, h.to_port, h.public),
                (
                    entry.net,
                    entry.proto,
                    entry.port,
                    entry.address,
                    entry.to_port,
                    entry.public
                )
            );
            let timeout = if map { Some(60_000) } else { None };
            assert_eq!(h.timeout_ms, timeout);
        }
    }

    #[test]
    fn prefixes_come_back_from_their_bounds() {
        let p = |a: &str, b: &str| prefix_between(a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(
            p("10.0.0.0", "10.255.255.255"),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            p("0.0.0.0", "255.255.255.255"),
            Some("0.0.0.0/0".parse().unwrap())
        );
        assert_eq!(
            p("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            Some("::/0".parse().unwrap())
        );
        assert_eq!(
            p("10.0.0.1", "10.0.0.1"),
            Some("10.0.0.1/32".parse().unwrap())
        );
        assert_eq!(p("10.0.0.1", "10.0.0.2"), None);
        assert_eq!(p("10.0.0.0", "10.0.0.2"), None);
    }
}
