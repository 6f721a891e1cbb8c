//! Limits that keep anonymous, failing and slow callers from exhausting the
//! controller.
//!
//! - **Refused calls per source.** Every refused call (status 400 and up) used to be
//!   written to the audit log on its own, so an anonymous flood grew the database
//!   without bound. Now each source (an IPv4 address, or an IPv6 /64) may have
//!   `audit_burst` refusals audited one by one per `window`; past that they are
//!   counted in `jitgate_refusals_suppressed_total` and summarized in one
//!   `audit.refusals_suppressed` event per source and window. A source with more than
//!   `block_after` refusals in a window gets 429 for every call that does not carry a
//!   valid credential, until the window ends (a valid credential still works, so a
//!   flood from a shared address does not lock out the people behind it).
//! - **Connections.** At most `max_connections` at once (agents' long-polls included:
//!   one each); a connection beyond that is closed at once. hyper closes a
//!   connection that has not sent a complete request head within
//!   `header_read_timeout`, which also ends idle keep-alive connections.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct Limits {
    pub window: Duration,
    /// Refusals per source and window audited one by one.
    pub audit_burst: u32,
    /// Refusals per source and window after which calls without a valid credential
    /// are answered 429.
    pub block_after: u32,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            window: Duration::from_secs(10),
            audit_burst: 100,
            block_after: 300,
            max_connections: 16_384,
            header_read_timeout: Duration::from_secs(15),
        }
    }
}

/// The unit a limit applies to: an IPv4 address, or the /64 of an IPv6 address (one
/// host commonly holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match jitgate_core::net::canonical_addr(ip) {
            IpAddr::V6(v6) => {
                let mut o = v6.octets();
                o[8..].fill(0);
                Source(IpAddr::V6(o.into()))
            }
            v4 => Source(v4),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(a) => write!(f, "{a}/64"),
            IpAddr::V4(a) => write!(f, "{a}"),
        }
    }
}

struct Window {
    start: Instant,
    refused: u32,
    suppressed: u64,
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Write it to the audit log.
    Audit,
    /// Count it only; it is summarized later.
    Suppress,
}

/// A summary of refusals not audited one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub source: String,
    pub count: u64,
    pub window_seconds: u64,
}

/// Refusals per source, in fixed windows. Bounded: at most `MAX_SOURCES` are
/// tracked; when full, windows that have ended are dropped first, and a new source
/// beyond that is treated as over its burst (suppressed, not audited).
pub struct RefusalLimiter {
    limits: Limits,
    sources: Mutex<HashMap<Source, Window>>,
}

const MAX_SOURCES: usize = 100_000;

impl RefusalLimiter {
    pub fn new(limits: Limits) -> Self {
        RefusalLimiter {
            limits,
            sources: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether calls without a valid credential from `ip` are answered 429 now.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(map) = self.sources.lock() else {
            return false;
        };
        map.get(&Source::of(ip)).is_some_and(|w| {
            now.duration_since(w.start) < self.limits.window && w.refused > self.limits.block_after
        })
    }

    /// Records one refused call from `ip`.
    pub fn refused(&self, ip: IpAddr, now: Instant) -> Refusal {
        let Ok(mut map) = self.sources.lock() else {
            return Refusal::Audit;
        };
        let key = Source::of(ip);
        if !map.contains_key(&key) && map.len() >= MAX_SOURCES {
            let window = self.limits.window;
            map.retain(|_, w| now.duration_since(w.start) < window || w.suppressed > 0);
            if map.len() >= MAX_SOURCES {
                return Refusal::Suppress;
            }
        }
        let w = map.entry(key).or_insert(Window {
            start: now,
            refused: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= self.limits.window && w.suppressed == 0 {
            w.start = now;
            w.refused = 0;
        }
        w.refused = w.refused.saturating_add(1);
        if w.refused > self.limits.audit_burst {
            w.suppressed += 1;
            Refusal::Suppress
        } else {
            Refusal::Audit
        }
    }

    /// Summaries of the windows that have ended with suppressed refusals; those
    /// windows (and every ended one) are forgotten.
    pub fn take_summaries(&self, now: Instant) -> Vec<Suppressed> {
        let Ok(mut map) = self.sources.lock() else {
            return Vec::new();
        };
        let window = self.limits.window;
        let mut out = Vec::new();
        map.retain(|source, w| {
            if now.duration_since(w.start) < window {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Suppressed {
                    source: source.to_string(),
                    count: w.suppressed,
                    window_seconds: now.duration_since(w.start).as_secs(),
                });
            }
            false
        });
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }
}

/// Closes connections beyond the cap at once.
#[derive(Clone)]
pub struct CapAcceptor {
    permits: Arc<Semaphore>,
    refused: prometheus_client::metrics::counter::Counter,
}

impl CapAcceptor {
    pub fn new(max: usize, refused: prometheus_client::metrics::counter::Counter) -> Self {
        CapAcceptor {
            permits: Arc::new(Semaphore::new(max)),
            refused,
        }
    }

    pub fn open(&self, max: usize) -> usize {
        max - self.permits.available_permits()
    }
}

impl<S> axum_server::accept::Accept<TcpStream, S> for CapAcceptor {
    type Stream = Capped;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Capped, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        std::future::ready(match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let _ = stream.set_nodelay(true);
                Ok((
                    Capped {
                        inner: stream,
                        _permit: permit,
                    },
                    service,
                ))
            }
            Err(_) => {
                self.refused.inc();
                // Dropping the stream closes it.
                Err(io::Error::other("connection cap reached"))
            }
        })
    }
}

/// A connection that holds one of the cap's permits until it closes.
pub struct Capped {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Capped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Writes one `audit.refusals_suppressed` event per source whose window ended with
/// refusals that were not audited one by one.
pub async fn summarize(state: crate::AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let every = state.refusals.limits().window;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        for s in state.refusals.take_summaries(Instant::now()) {
            let entry = jitgate_core::audit::AuditEntry {
                time: state.clock.now().to_string(),
                actor: "system".to_owned(),
                source: s.source.clone(),
                action: "audit.refusals_suppressed".to_owned(),
                target: s.source.clone(),
                outcome: jitgate_core::audit::Outcome::Denied,
                details: serde_json::json!({
                    "count": s.count,
                    "windowSeconds": s.window_seconds,
                })
                .to_string(),
            };
            if let Err(e) = state.store.append_audit(entry).await {
                tracing::error!(error = %e, "cannot audit suppressed refusals");
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit (a controller started by
/// hand inherits a soft limit of 1024, far below what its agents' long-polls need);
/// returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The controller keeps an idle connection open longer than its clients keep it
    /// for reuse, so no client sends a request on a connection the controller is
    /// closing.
    #[test]
    fn idle_connections_outlive_the_clients_pools() {
        assert!(Limits::default().header_read_timeout > jitgate_proto::CLIENT_POOL_IDLE);
    }

    fn limits() -> Limits {
        Limits {
            window: Duration::from_secs(10),
            audit_burst: 3,
            block_after: 5,
            ..Limits::default()
        }
    }

    #[test]
    fn refusals_past_the_burst_are_suppressed_then_summarized() {
        let l = RefusalLimiter::new(limits());
        let t0 = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let got: Vec<Refusal> = (0..7).map(|_| l.refused(ip, t0)).collect();
        assert_eq!(&got[..3], &[Refusal::Audit; 3]);
        assert_eq!(&got[3..], &[Refusal::Suppress; 4]);
        assert!(l.blocked(ip, t0), "7 > block_after");
        assert!(!l.blocked("10.0.0.2".parse().unwrap(), t0));
        assert!(l.take_summaries(t0).is_empty(), "the window is still open");
        let later = t0 + Duration::from_secs(11);
        assert!(!l.blocked(ip, later), "the block ends with the window");
        assert_eq!(
            l.take_summaries(later),
            vec![Suppressed {
                source: "10.0.0.1".into(),
                count: 4,
                window_seconds: 11
            }]
        );
        assert_eq!(l.refused(ip, later), Refusal::Audit, "a new window");
    }

    #[test]
    fn an_ipv6_host_cannot_escape_by_changing_its_interface_id() {
        let l = RefusalLimiter::new(limits());
        let t0 = Instant::now();
        for i in 0..6 {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            l.refused(ip, t0);
        }
        assert!(l.blocked("2001:db8:1:2::ffff".parse().unwrap(), t0));
        assert!(!l.blocked("2001:db8:1:3::1".parse().unwrap(), t0));
        assert_eq!(
            Source::of("::ffff:10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1"
        );
    }
}
