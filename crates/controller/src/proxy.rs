//! The caller's address behind a load balancer or reverse proxy.
//!
//! Behind a proxy every connection comes from the proxy, so the address a grant opens
//! to by default ("My IP"), the audit log's `source` and the per-source refusal limits
//! would all be the proxy's. A proxy the operator trusts (`--trusted-proxy`) says whom
//! it forwards in `X-Forwarded-For`; each hop appends the address it received from, so
//! the header is read from the right, and the first address that is not a trusted
//! proxy is the caller. What lies to the left of it was written by the caller and is
//! ignored, and the header is ignored altogether on a connection that does not come
//! from a trusted proxy.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use jitgate_core::net::canonical_addr;

use crate::AppState;
use crate::error::ApiError;

/// The caller's address: `peer`, or when `peer` is a trusted proxy, the rightmost
/// address of `forwarded` (every `X-Forwarded-For` value, in order) that is not one.
/// An entry that is not an address is an error naming the header.
pub fn client_addr<'a>(
    peer: IpAddr,
    forwarded: impl DoubleEndedIterator<Item = &'a HeaderValue>,
    trusted: &[IpNet],
) -> Result<IpAddr, String> {
    // Every address below is canonical (IPv4-mapped IPv6 as IPv4) before it is asked.
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    let peer = canonical_addr(peer);
    if !is_trusted(peer) {
        return Ok(peer);
    }
    let mut caller = peer;
    for value in forwarded.rev() {
        let text = value.to_str().map_err(|_| "it is not text".to_owned())?;
        for entry in text.rsplit(',') {
            let entry = entry.trim();
            let ip = parse_entry(entry).ok_or_else(|| {
                format!(
                    "it holds '{}', which is not an IP address",
                    entry.chars().take(64).collect::<String>()
                )
            })?;
            caller = canonical_addr(ip);
            if !is_trusted(caller) {
                return Ok(caller);
            }
        }
    }
    // Every hop is a trusted proxy (or none was named): the leftmost one is the caller.
    Ok(caller)
}

/// An address as proxies write it: `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`, with
/// or without a port (`192.0.2.1:443`, `[2001:db8::1]:443`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = entry.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .and_then(|e| e.parse::<IpAddr>().ok())
}

/// Replaces the connection's address with the caller's (see [`client_addr`]) before
/// anything reads it: authentication, limits, the audit log and "My IP".
pub async fn client_address(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    if state.trusted_proxies.is_empty() {
        return next.run(req).await;
    }
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() else {
        return next.run(req).await;
    };
    let forwarded = req.headers().get_all("x-forwarded-for");
    match client_addr(peer.ip(), forwarded.iter(), &state.trusted_proxies) {
        Ok(ip) => {
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::new(ip, peer.port())));
            next.run(req).await
        }
        Err(m) => ApiError::bad_param("X-Forwarded-For", m).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn addr(peer: &str, headers: &[&str], trusted: &[&str]) -> Result<String, String> {
        let values: Vec<HeaderValue> = headers
            .iter()
            .map(|h| HeaderValue::from_str(h).unwrap())
            .collect();
        let trusted: Vec<IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        client_addr(peer.parse().unwrap(), values.iter(), &trusted).map(|ip| ip.to_string())
    }

    #[test]
    fn the_caller_is_the_rightmost_untrusted_hop() {
        let lb = ["10.0.0.0/24"];
        assert_eq!(
            addr("10.0.0.5", &["203.0.113.7"], &lb).unwrap(),
            "203.0.113.7"
        );
        // What the caller wrote itself, to the left, is ignored.
        assert_eq!(
            addr("10.0.0.5", &["198.51.100.1, 203.0.113.7"], &lb).unwrap(),
            "203.0.113.7"
        );
        assert_eq!(
            addr("10.0.0.5", &["198.51.100.1", "203.0.113.7"], &lb).unwrap(),
            "203.0.113.7"
        );
        // Two proxies in a row, both trusted.
        assert_eq!(
            addr("10.0.0.5", &["203.0.113.7, 10.0.0.9"], &lb).unwrap(),
            "203.0.113.7"
        );
        // Ports, brackets, IPv6, IPv4-mapped IPv6.
        assert_eq!(
            addr("10.0.0.5", &["[2001:db8::7]:4711"], &lb).unwrap(),
            "2001:db8::7"
        );
        assert_eq!(
            addr("10.0.0.5", &["203.0.113.7:4711"], &lb).unwrap(),
            "203.0.113.7"
        );
        assert_eq!(
            addr("::ffff:10.0.0.5", &["::ffff:203.0.113.7"], &lb).unwrap(),
            "203.0.113.7"
        );
        // No header: the proxy's own call (a health check).
        assert_eq!(addr("10.0.0.5", &[], &lb).unwrap(), "10.0.0.5");
        // Only trusted hops: the leftmost.
        assert_eq!(
            addr("10.0.0.5", &["10.0.0.8, 10.0.0.9"], &lb).unwrap(),
            "10.0.0.8"
        );
    }

    #[test]
    fn an_untrusted_peer_cannot_claim_an_address() {
        assert_eq!(
            addr("203.0.113.7", &["10.1.2.3"], &["10.0.0.0/24"]).unwrap(),
            "203.0.113.7"
        );
        assert_eq!(
            addr("203.0.113.7", &["10.1.2.3"], &[]).unwrap(),
            "203.0.113.7"
        );
        // Garbage from an untrusted peer is not even read.
        assert_eq!(
            addr("203.0.113.7", &["not an address"], &["10.0.0.0/24"]).unwrap(),
            "203.0.113.7"
        );
    }

    #[test]
    fn a_garbled_header_from_a_proxy_is_refused() {
        let e = addr("10.0.0.5", &["203.0.113.7, unknown"], &["10.0.0.0/24"]).unwrap_err();
        assert!(e.contains("'unknown'"), "{e}");
        assert!(addr("10.0.0.5", &[""], &["10.0.0.0/24"]).is_err());
    }
}
