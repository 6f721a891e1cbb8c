//! The agent's netlink sockets to nf_tables: one that changes and reads the grant sets
//! ([`NfSocket`]), and one that listens to every change of the ruleset
//! ([`Monitor`]). The messages are encoded and decoded by `jitgate_core::nfnl`; this
//! module only moves bytes.
//!
//! The kernel handles a message sent to it synchronously, in `sendmsg`, and answers
//! in order. So after a batch the socket asks for the ruleset's generation: its
//! answer arrives after every answer to the batch, and reading up to it collects
//! them all, with no timer involved (a receive timeout of [`RECV_TIMEOUT`] only
//! guards against a kernel that never answers).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, bail};
use jitgate_core::gateway;
use jitgate_core::nfnl::{self, Encode, GwHeld, Held, Message, NLMSG_DONE, Notice, Op, Outcome};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, getsockname,
    recv, sendto, setsockopt, socket, sockopt,
};

/// The longest the agent waits for the kernel's answer.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer asked for (root may exceed `net.core.rmem_max`).
const RCVBUF: usize = 8 << 20;
/// Send buffer asked for: a batch goes in one `sendmsg`.
const SNDBUF: usize = 8 << 20;
/// The largest batch sent in one message; a larger change is a full rebuild.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// How many times a batch is re-sent without the deletes of elements that were
/// already gone.
const MAX_ROUNDS: usize = 4;

const ENOENT: i32 = Errno::ENOENT as i32;

/// A netlink socket to nf_tables, bound to `groups`, whose receives give up after
/// `recv_timeout`.
fn open(groups: u32, recv_timeout: Duration) -> anyhow::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .context("cannot open a netlink socket to nf_tables")?;
    // Larger buffers: a dump of a large set, a burst of notifications. Forcing needs
    // CAP_NET_ADMIN, which the agent has; the plain option is the fallback.
    if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
        let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
    }
    if setsockopt(&fd, sockopt::SndBufForce, &SNDBUF).is_err() {
        let _ = setsockopt(&fd, sockopt::SndBuf, &SNDBUF);
    }
    let timeout = nix::sys::time::TimeVal::new(recv_timeout.as_secs() as _, 0);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).context("cannot set a receive timeout")?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).context("cannot bind the netlink socket")?;
    Ok(fd)
}

/// What one [`NfSocket::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Deletes dropped because the kernel had already expired the element.
    pub already_gone: usize,
    /// Batches sent (1 unless some deletes were dropped and the rest re-sent).
    pub rounds: usize,
}

/// A failed batch: nothing of it was committed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The kernel refused an operation (for example an element that is already there,
    /// "File exists", which means the kernel holds what the agent did not put there).
    #[error("nf_tables refused {op}: {errno}")]
    Refused { op: String, errno: Errno },
    /// The batch would not fit in one message (bytes).
    #[error("a batch of {0} bytes is too large for one message")]
    TooLarge(usize),
    /// Anything else: the socket, the batch as a whole, a malformed answer.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// The netlink port ids of this process's open [`NfSocket`]s: a change notification
/// that carries one of them is this process's own change, whichever thread made it.
static OWN_PORTS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// True when `port` is one of this process's open [`NfSocket`]s.
pub fn is_own_port(port: u32) -> bool {
    OWN_PORTS.lock().map(|p| p.contains(&port)).unwrap_or(false)
}

/// A socket that changes and reads `table inet jitgate`'s sets (and a gateway's `table inet
/// jitgate_gw`).
pub struct NfSocket {
    fd: OwnedFd,
    seq: u32,
    port: u32,
    buf: Vec<u8>,
}

impl Drop for NfSocket {
    fn drop(&mut self) {
        if let Ok(mut p) = OWN_PORTS.lock()
            && let Some(i) = p.iter().position(|x| *x == self.port)
        {
            p.swap_remove(i);
        }
    }
}

impl NfSocket {
    /// Opens a socket in the current network namespace.
    pub fn open() -> anyhow::Result<Self> {
        let fd = open(0, RECV_TIMEOUT)?;
        let port = getsockname::<NetlinkAddr>(fd.as_raw_fd())
            .map(|a| a.pid())
            .context("cannot read the netlink port id")?;
        if let Ok(mut p) = OWN_PORTS.lock() {
            p.push(port);
        }
        Ok(NfSocket {
            fd,
            seq: std::process::id().wrapping_mul(1_000_003),
            port,
            buf: vec![0; 1 << 20],
        })
    }

    /// The socket's netlink port id: the kernel's notifications of the changes this
    /// socket makes carry it.
    pub fn port(&self) -> u32 {
        self.port
    }

    fn next_seq(&mut self, n: usize) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n as u32 + 1);
        s
    }

    fn send(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let sent = sendto(
            self.fd.as_raw_fd(),
            bytes,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .context("cannot send to nf_tables")?;
        if sent != bytes.len() {
            bail!("nf_tables took {sent} of {} bytes", bytes.len());
        }
        Ok(())
    }

    /// Receives datagrams, handing each message to `each`, until it returns true.
    fn receive_until(
        &mut self,
        mut each: impl FnMut(&Message<'_>) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => bail!("nf_tables did not answer within {RECV_TIMEOUT:?}"),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("cannot receive from nf_tables"),
            };
            for m in nfnl::messages(&self.buf[..n])? {
                if each(&m)? {
                    return Ok(());
                }
            }
        }
    }

    /// Sends one batch and collects the kernel's verdict on it.
    fn send_batch<E: Encode>(&mut self, ops: &[Op<E>]) -> Result<Outcome, BatchError> {
        let seq = self.next_seq(ops.len() + 3);
        let bytes = nfnl::batch(ops, seq);
        if bytes.len() > MAX_BATCH_BYTES {
            return Err(BatchError::TooLarge(bytes.len()));
        }
        self.collect(ops.len(), seq, &bytes)
            .map_err(BatchError::Other)
    }

    /// Sends `bytes` (requests numbered before `fence`), then a generation request
    /// numbered `fence`, and hands each answer to `each` until the generation's: the
    /// kernel answers in order, so every answer to `bytes` comes before it.
    fn fenced(
        &mut self,
        bytes: &[u8],
        fence: u32,
        mut each: impl FnMut(&Message<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.send(bytes)?;
        self.send(&nfnl::get_gen(fence))?;
        self.receive_until(|m| {
            if m.seq != fence {
                each(m)?;
                return Ok(false);
            }
            if let Some(code) = m.error().filter(|c| *c != 0) {
                bail!(
                    "nf_tables refused the generation request: {}",
                    Errno::from_raw(code)
                );
            }
            Ok(true)
        })
    }

    /// Sends an encoded batch of `len` operations at `seq` and collects the answers.
    fn collect(&mut self, len: usize, seq: u32, bytes: &[u8]) -> anyhow::Result<Outcome> {
        let mut outcome = Outcome::default();
        self.fenced(bytes, seq.wrapping_add(len as u32 + 2), |m| {
            let o = Outcome::from_answers(std::slice::from_ref(m), seq, len);
            outcome.failed.extend(o.failed);
            outcome.batch_error = outcome.batch_error.or(o.batch_error);
            Ok(())
        })?;
        Ok(outcome)
    }

    /// Whether set `set` of `table inet <table>` exists (false also when the table
    /// does not).
    pub fn set_exists(&mut self, table: &str, set: &str) -> anyhow::Result<bool> {
        let seq = self.next_seq(2);
        let mut exists = None;
        self.fenced(&nfnl::get_set(table, set, seq), seq.wrapping_add(1), |m| {
            if m.seq == seq {
                match m.error() {
                    Some(ENOENT) => exists = Some(false),
                    Some(0) => {}
                    Some(code) => bail!("cannot read set {set}: {}", Errno::from_raw(code)),
                    None if m.nft_kind() == Some(nfnl::msg::NEWSET) => exists = Some(true),
                    None => {}
                }
            }
            Ok(())
        })?;
        exists.context("nf_tables did not answer the set request")
    }

    /// Applies `ops` as one atomic batch. A delete that fails because the element is
    /// already gone (the kernel expired it between plan and commit) counts as done:
    /// the batch is sent again without it, so the other operations still happen.
    /// The elements are `table inet jitgate`'s ([`nfnl::SetOp`]) or a gateway's
    /// ([`nfnl::GwOp`]).
    pub fn apply<E: Encode + Clone + std::fmt::Debug>(
        &mut self,
        ops: &[Op<E>],
    ) -> Result<BatchReport, BatchError> {
        // Every operation takes at least 64 bytes (a host's delete, the smallest, 72):
        // a batch far too large is refused before anything is encoded (`send_batch`
        // checks the encoded size).
        let least = ops.len() * 64;
        if least > MAX_BATCH_BYTES {
            return Err(BatchError::TooLarge(least));
        }
        let mut ops = ops.to_vec();
        let mut report = BatchReport::default();
        while !ops.is_empty() {
            if report.rounds == MAX_ROUNDS {
                return Err(BatchError::Other(anyhow::anyhow!(
                    "elements kept disappearing during {MAX_ROUNDS} batches"
                )));
            }
            report.rounds += 1;
            let outcome = self.send_batch(&ops)?;
            if outcome.committed() {
                return Ok(report);
            }
            if let Some(code) = outcome.batch_error {
                return Err(BatchError::Other(anyhow::anyhow!(
                    "nf_tables refused the batch: {}",
                    Errno::from_raw(code)
                )));
            }
            let gone =
                |i: usize, code: i32| code == ENOENT && matches!(ops.get(i), Some(Op::Del(_)));
            if let Some(&(i, code)) = outcome.failed.iter().find(|(i, c)| !gone(*i, *c)) {
                let op = match ops.get(i) {
                    Some(Op::Add { element, .. }) => format!("adding {element:?}"),
                    Some(Op::Del(element)) => format!("deleting {element:?}"),
                    None => "an unknown operation".to_owned(),
                };
                return Err(BatchError::Refused {
                    op,
                    errno: Errno::from_raw(code),
                });
            }
            let mut drop: Vec<usize> = outcome.failed.iter().map(|(i, _)| *i).collect();
            drop.sort_unstable();
            drop.dedup();
            // ENOENT also answers a delete from a set, or a table, that is not there
            // (deleted by someone): only an element gone from a set that is there
            // counts as done. Otherwise the caller rebuilds.
            let mut sets: Vec<(&str, &str)> = drop
                .iter()
                .map(|&i| (ops[i].element().table(), ops[i].element().set()))
                .collect();
            sets.sort_unstable();
            sets.dedup();
            for (table, set) in sets {
                if !self.set_exists(table, set).map_err(BatchError::Other)? {
                    return Err(BatchError::Other(anyhow::anyhow!(
                        "set {set} of table inet {table} is gone"
                    )));
                }
            }
            report.already_gone += drop.len();
            for i in drop.into_iter().rev() {
                ops.remove(i);
            }
        }
        Ok(report)
    }

    /// Every element of the grant sets (`core::nft::SETS`), with its set, its
    /// timeout and the time left. A set that does not exist reads as empty (a drift
    /// check's structure comparison reports it missing).
    pub fn dump_grant_sets(&mut self) -> anyhow::Result<Vec<(&'static str, Held)>> {
        self.dump_grant_sets_pausing(|| {})
    }

    /// [`Self::dump_grant_sets`], calling `pause` once each dump has received its first
    /// part (for tests: a change made then falls inside a dump).
    #[doc(hidden)]
    pub fn dump_grant_sets_pausing(
        &mut self,
        mut pause: impl FnMut(),
    ) -> anyhow::Result<Vec<(&'static str, Held)>> {
        self.consistently(jitgate_core::nft::TABLE, |s| {
            let (mut out, mut flagged) = (Vec::new(), false);
            for set in jitgate_core::nft::SETS {
                let (held, f) = s.dump_of(
                    jitgate_core::nft::TABLE,
                    set,
                    nfnl::dumped_elements,
                    &mut pause,
                )?;
                flagged |= f;
                if let Some(held) = held {
                    out.extend(held.into_iter().map(|h| (set, h)));
                }
            }
            Ok((out, flagged))
        })
    }

    /// Every element of the sets and maps of `table inet jitgate_gw`
    /// (`core::gateway::SETS` and `MAPS`), with its set. A set that does not exist
    /// reads as empty (the structure comparison reports it missing).
    pub fn dump_gateway_sets(&mut self) -> anyhow::Result<Vec<(&'static str, GwHeld)>> {
        self.consistently(gateway::TABLE, |s| {
            let (mut out, mut flagged) = (Vec::new(), false);
            for (sets, map) in [(&gateway::SETS[..], false), (&gateway::MAPS[..], true)] {
                for set in sets {
                    let (held, f) = s.dump_of(
                        gateway::TABLE,
                        set,
                        |m| nfnl::dumped_gw_elements(m, map),
                        &mut || {},
                    )?;
                    flagged |= f;
                    if let Some(held) = held {
                        out.extend(held.into_iter().map(|h| (*set, h)));
                    }
                }
            }
            Ok((out, flagged))
        })
    }

    /// `read` (dumps of `table`'s sets, and whether the kernel flagged any of them
    /// interrupted) between two readings of the ruleset's generation; read again while
    /// the generation moved or a part was flagged, up to [`DUMP_ATTEMPTS`] times, then
    /// [`DumpInterrupted`]. The kernel does not flag an element dump interrupted: it
    /// walks a set's elements again from the start for each part of the answer, so a
    /// change in between skips or repeats elements. One bracket around all the sets
    /// also makes them one state of the table.
    fn consistently<R>(
        &mut self,
        table: &str,
        mut read: impl FnMut(&mut Self) -> anyhow::Result<(R, bool)>,
    ) -> anyhow::Result<R> {
        for _ in 0..DUMP_ATTEMPTS {
            let before = self.generation()?;
            let (got, flagged) = read(self)?;
            if !flagged && self.generation()? == before {
                return Ok(got);
            }
        }
        Err(DumpInterrupted {
            table: table.to_owned(),
        }
        .into())
    }

    /// The ruleset's generation now (`NFT_MSG_GETGEN`): every committed change to any
    /// table moves it.
    fn generation(&mut self) -> anyhow::Result<u32> {
        let seq = self.next_seq(1);
        self.send(&nfnl::get_gen(seq))?;
        let mut generation = None;
        self.receive_until(|m| {
            if m.seq != seq {
                return Ok(false);
            }
            if let Some(code) = m.error().filter(|c| *c != 0) {
                bail!(
                    "cannot read the ruleset's generation: {}",
                    Errno::from_raw(code)
                );
            }
            generation = nfnl::generation(m);
            Ok(generation.is_some())
        })?;
        generation.context("no generation in the answer")
    }

    /// Every element of `set` in `table inet <table>`, decoded by `decode` (None when
    /// there is no such set), and whether the kernel flagged a part interrupted. Calls
    /// `pause` once the first part is in (see [`Self::dump_grant_sets_pausing`]).
    fn dump_of<T>(
        &mut self,
        table: &str,
        set: &str,
        decode: impl Fn(&nfnl::Message<'_>) -> Result<Vec<T>, nfnl::Malformed>,
        pause: &mut dyn FnMut(),
    ) -> anyhow::Result<(Option<Vec<T>>, bool)> {
        let seq = self.next_seq(1);
        self.send(&nfnl::dump_set_of(table, set, seq))?;
        let mut out = Some(Vec::new());
        let (mut interrupted, mut paused) = (false, false);
        self.receive_until(|m| {
            if m.seq != seq {
                return Ok(false);
            }
            interrupted |= m.dump_interrupted();
            match m.error().filter(|c| *c != 0) {
                Some(ENOENT) => {
                    out = None;
                    return Ok(true);
                }
                Some(code) => bail!("cannot list set {set}: {}", Errno::from_raw(code)),
                None => {}
            }
            if m.ty == NLMSG_DONE {
                return Ok(true);
            }
            if let Some(v) = out.as_mut() {
                v.extend(decode(m)?);
            }
            if !paused {
                paused = true;
                pause();
            }
            Ok(false)
        })?;
        Ok((out, interrupted))
    }
}

/// How many times a table's sets are read while changes keep interrupting the read.
/// Two: a change that happened to fall in the first read does not fall in the second
/// as a rule; under a steady stream of changes every read is interrupted, and the
/// watchdog paces its reads instead (`drift::ElementReads`), each try costing a whole
/// dump (about half a second at 100,000 elements).
pub const DUMP_ATTEMPTS: usize = 2;

/// Every read of a table's sets was interrupted by changes: no consistent read.
#[derive(Debug)]
pub struct DumpInterrupted {
    pub table: String,
}

impl std::fmt::Display for DumpInterrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table inet {} changed during each of {DUMP_ATTEMPTS} reads of its sets",
            self.table
        )
    }
}

impl std::error::Error for DumpInterrupted {}

/// Listens to the nf_tables change notifications (what `nft monitor` reads).
pub struct Monitor {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// What the monitor heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    Notice {
        notice: Notice,
        port: u32,
    },
    /// The kernel dropped notifications (the buffer overflowed): anything may have
    /// changed.
    Lost,
}

impl Monitor {
    pub fn open() -> anyhow::Result<Self> {
        // Wakes up every second even when nothing changes, so the listening thread
        // notices that the agent has stopped.
        let fd = open(1 << (nfnl::NFNLGRP_NFTABLES - 1), Duration::from_secs(1))?;
        Ok(Monitor {
            fd,
            buf: vec![0; 1 << 20],
        })
    }

    /// Blocks until the next datagram (at most about a second); returns what it
    /// says (nothing when the second passed quietly).
    pub fn listen(&mut self) -> anyhow::Result<Vec<Heard>> {
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(Vec::new()),
                Err(Errno::ENOBUFS) => return Ok(vec![Heard::Lost]),
                Err(e) => return Err(e).context("cannot receive nf_tables notifications"),
            };
            let msgs = nfnl::messages(&self.buf[..n])?;
            return Ok(msgs
                .iter()
                .filter_map(|m| {
                    nfnl::notice(m).map(|notice| Heard::Notice {
                        notice,
                        port: m.port,
                    })
                })
                .collect());
        }
    }
}
