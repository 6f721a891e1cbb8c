//! Webhooks: endpoints told about requests, decisions, grants, break-glass use and
//! drift (`/api/v1/webhooks/{name}`), and the task that delivers the store's outbox.
//!
//! Deliveries follow the Standard Webhooks specification: headers `webhook-id` (the
//! outbox message id, the same on every attempt), `webhook-timestamp` (Unix seconds)
//! and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with
//! the base64 part of the endpoint's `whsec_` secret. A 2xx answer delivers; 410
//! disables the endpoint; anything else is tried again with backoff (8 attempts over
//! about 8 hours, then given up). Redirects are never followed. Targets on private,
//! loopback, link-local (cloud metadata) or other non-public addresses are refused,
//! at registration and again at each delivery (the address checked is the one
//! connected to), unless the URL starts with a prefix the controller's configuration
//! allows (`--webhook-allow`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use jitgate_core::Timestamp;
use jitgate_core::rbac::Action;
use jitgate_proto::api::{WebhookIn, WebhookOut, WebhookPage};
use jitgate_store::{Delivery, DeliveryResult, WebhookRecord};
use rand::RngCore;
use sha2::Sha256;

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::params;

/// Retries after a failed attempt: multiples of the configured base (5 s by default).
const BACKOFF: [u32; 7] = [1, 6, 24, 120, 360, 720, 1440];
/// How long a claimed delivery is the claimer's: longer than a batch can take
/// (`BATCH` attempts of at most `DNS_TIMEOUT` and `SEND_TIMEOUT` each).
const LEASE: Duration = Duration::from_secs(120);
const BATCH: usize = 5;
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_URL: usize = 2048;

/// An address no webhook may reach unless its URL is allowed explicitly.
pub fn forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 192 && o[1] == 88 && o[2] == 99)
                || o == [168, 63, 129, 16]
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_ip(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // IPv4 carried inside IPv6: NAT64 (64:ff9b::/96, 64:ff9b:1::/48),
            // IPv4-compatible (::a.b.c.d), SIIT (::ffff:0:a.b.c.d), 6to4 (2002::/16).
            let v4 = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            let embedded = if (s[0] == 0x0064 && s[1] == 0xff9b)
                || s[..6] == [0, 0, 0, 0, 0, 0]
                || s[..6] == [0, 0, 0, 0, 0xffff, 0]
            {
                Some(v4(s[6], s[7]))
            } else if s[0] == 0x2002 {
                Some(v4(s[1], s[2]))
            } else {
                None
            };
            if embedded.is_some_and(|a| forbidden_ip(IpAddr::V4(a))) {
                return true;
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x2001 && s[1] == 0x0000)
        }
    }
}

/// Whether `url` is under one of the allowed prefixes: the same scheme, host and port
/// exactly, and a path under the prefix's (a prefix `http://hooks` never allows
/// `http://hooks.attacker.example`).
fn allowed_explicitly(state: &AppState, url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    state.webhook_allow.iter().any(|p| {
        let Ok(a) = url::Url::parse(p) else {
            return false;
        };
        let dir = if a.path().ends_with('/') {
            a.path().to_owned()
        } else {
            format!("{}/", a.path())
        };
        a.scheme() == u.scheme()
            && a.host_str() == u.host_str()
            && a.port_or_known_default() == u.port_or_known_default()
            && (u.path() == a.path() || u.path().starts_with(&dir))
    })
}

/// The address a delivery to `url` connects to: resolved, every answer checked.
async fn target(state: &AppState, url: &url::Url) -> Result<Option<SocketAddr>, String> {
    let host = url.host_str().ok_or("the URL has no host")?;
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("{host} was not resolved within {DNS_TIMEOUT:?}"))?
            .map_err(|e| format!("{host} cannot be resolved: {e}"))?
            .collect(),
    };
    if allowed_explicitly(state, url.as_str()) {
        return Ok(addrs.first().copied());
    }
    if let Some(bad) = addrs.iter().find(|a| forbidden_ip(a.ip())) {
        return Err(format!(
            "{host} is {}, a private, loopback or otherwise non-public address (allow it with the controller's --webhook-allow)",
            bad.ip()
        ));
    }
    Ok(addrs.first().copied())
}

fn wire(h: &WebhookRecord, counts: (u64, u64, u64), secret: Option<String>) -> WebhookOut {
    WebhookOut {
        name: h.name.clone(),
        url: h.url.clone(),
        events: h.events.clone(),
        format: h.format.clone(),
        disabled_at: h.disabled.as_ref().map(|d| d.0.to_string()),
        disabled_reason: h.disabled.as_ref().map(|d| d.1.clone()),
        delivered: counts.0,
        failed: counts.1,
        waiting: counts.2,
        secret,
    }
}

fn name_param(name: &str) -> ApiResult<()> {
    jitgate_core::approval::check_rule_name(name).map_err(ApiError::field)
}

/// Webhooks are configuration of the whole installation: policy writers of the
/// subscription manage them.
fn require_admin(state: &AppState, p: &Principal) -> ApiResult<()> {
    p.require(Action::PolicyWrite, &params::sub_scope(state))
}

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookPage)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<WebhookPage>> {
    require_admin(&state, &principal)?;
    let mut value = Vec::new();
    for h in state.store.webhooks().await? {
        let counts = state.store.webhook_counts(&h.name).await?;
        value.push(wire(&h, counts, None));
    }
    Ok(Json(WebhookPage {
        value,
        continuation_token: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/webhooks/{webhook}", tag = "webhooks",
    params(("webhook" = String, Path)),
    responses((status = 200, body = WebhookOut)))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<WebhookOut>> {
    name_param(&name)?;
    require_admin(&state, &principal)?;
    let h = state
        .store
        .webhook(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook {name} not found")))?;
    let counts = state.store.webhook_counts(&name).await?;
    Ok(Json(wire(&h, counts, None)))
}

/// Creates (201, with the signing secret, shown this once) or replaces (200; the
/// secret is kept, a disabled endpoint is enabled again) an endpoint.
#[utoipa::path(put, path = "/api/v1/webhooks/{webhook}", tag = "webhooks",
    params(("webhook" = String, Path)), request_body = WebhookIn,
    responses((status = 200, body = WebhookOut), (status = 201, body = WebhookOut)))]
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<WebhookIn>,
) -> ApiResult<Response> {
    name_param(&name)?;
    require_admin(&state, &principal)?;
    let url_text = body
        .url
        .ok_or_else(|| ApiError::bad_param("url", "is required"))?;
    if url_text.len() > MAX_URL {
        return Err(ApiError::bad_param(
            "url",
            format!("is longer than {MAX_URL} characters"),
        ));
    }
    let url = url::Url::parse(&url_text).map_err(|e| ApiError::bad_param("url", e))?;
    if !matches!(url.scheme(), "https" | "http")
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(ApiError::bad_param(
            "url",
            "must be an http(s):// URL without a user name or password",
        ));
    }
    if url.scheme() == "http" && !allowed_explicitly(&state, url.as_str()) {
        return Err(ApiError::bad_param(
            "url",
            "must be https:// (plain http only for a URL the controller's --webhook-allow names)",
        ));
    }
    target(&state, &url)
        .await
        .map_err(|e| ApiError::bad_param("url", e))?;
    let events = body.events.unwrap_or_else(|| vec!["*".to_owned()]);
    if events.is_empty() {
        return Err(ApiError::bad_param(
            "events",
            "must list at least one event (or \"*\")",
        ));
    }
    for (i, e) in events.iter().enumerate() {
        if e != "*" && !jitgate_store_sql::webhooks::EVENTS.contains(&e.as_str()) {
            return Err(ApiError::bad_param(
                &format!("events[{i}]"),
                format!(
                    "'{e}' is not an event (one of: *, {})",
                    jitgate_store_sql::webhooks::EVENTS.join(", ")
                ),
            ));
        }
    }
    let format = body.format.unwrap_or_else(|| "standard".to_owned());
    if !matches!(format.as_str(), "standard" | "slack") {
        return Err(ApiError::bad_param("format", "must be standard or slack"));
    }
    let existing = state.store.webhook(&name).await?;
    let now = state.clock.now();
    let secret = match &existing {
        Some(h) => h.secret.clone(),
        None => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            format!("whsec_{}", B64.encode(key))
        }
    };
    let record = WebhookRecord {
        name: name.clone(),
        url: url.to_string(),
        events,
        format,
        secret: secret.clone(),
        created: existing.as_ref().map_or(now, |h| h.created),
        updated: now,
        disabled: None,
    };
    let created = state
        .store
        .put_webhook(record.clone(), principal.audit_ctx(ip, now))
        .await?;
    let counts = state.store.webhook_counts(&name).await?;
    let out = wire(&record, counts, created.then_some(secret));
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(out)).into_response())
}

#[utoipa::path(delete, path = "/api/v1/webhooks/{webhook}", tag = "webhooks",
    params(("webhook" = String, Path)),
    responses((status = 200, description = "Deleted, with its undelivered messages"), (status = 204, description = "There was no such webhook")))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    name_param(&name)?;
    require_admin(&state, &principal)?;
    let deleted = state
        .store
        .delete_webhook(&name, principal.audit_ctx(ip, state.clock.now()))
        .await?;
    Ok(if deleted {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    })
}

/// `v1,<base64 HMAC-SHA256>` of `id.timestamp.body`, keyed with the secret's base64
/// part (Standard Webhooks).
pub fn signature(secret: &str, msg_id: &str, timestamp: i64, body: &str) -> Result<String, String> {
    let key = B64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|e| format!("the webhook secret is not base64: {e}"))?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{msg_id}.{timestamp}.{body}").as_bytes());
    Ok(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// The body sent: the event itself, or a message for Slack.
fn body_of(state: &AppState, d: &Delivery) -> String {
    if d.format != "slack" {
        return d.payload.clone();
    }
    let v: serde_json::Value = serde_json::from_str(&d.payload).unwrap_or_default();
    let data = &v["data"];
    let request = data["details"]["request"].as_str().unwrap_or_default();
    let link = match (&state.oidc, request.is_empty()) {
        (Some(o), false) => format!(
            " <{}/api/v1/requests/{request}|request {request}>",
            o.config.origin()
        ),
        (None, false) => format!(" (request {request})"),
        _ => String::new(),
    };
    let why = data["details"]["justification"]
        .as_str()
        .or(data["details"]["reason"].as_str())
        .map(|j| format!(": \"{}\"", j.chars().take(200).collect::<String>()))
        .unwrap_or_default();
    // Slack reads `<...>` as links and mentions: text from requests is escaped.
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let text = format!(
        "jitgate {}: {} on {}{}{link}",
        d.event,
        esc(data["actor"].as_str().unwrap_or("someone")),
        esc(data["target"].as_str().unwrap_or("")),
        esc(&why),
    );
    serde_json::json!({ "text": text }).to_string()
}

/// One attempt at one delivery.
async fn attempt(state: &AppState, d: &Delivery, now: Timestamp) -> DeliveryResult {
    let retry = |error: String| {
        let n = d.attempts as usize;
        match BACKOFF.get(n) {
            Some(m) => DeliveryResult::Retry {
                at: now
                    + jiff::SignedDuration::try_from(state.webhook_retry * *m)
                        .unwrap_or(jiff::SignedDuration::from_secs(5)),
                error,
            },
            None => DeliveryResult::Failed { error },
        }
    };
    let url = match url::Url::parse(&d.url) {
        Ok(u) => u,
        Err(e) => {
            return DeliveryResult::Failed {
                error: format!("the URL is not valid: {e}"),
            };
        }
    };
    // Checked again now: the name may resolve elsewhere than at registration.
    let addr = match target(state, &url).await {
        Ok(Some(a)) => a,
        Ok(None) => return retry("the URL's host has no address".into()),
        Err(e) => return retry(e),
    };
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(SEND_TIMEOUT);
    if let Some(host) = url.host_str()
        && host.parse::<IpAddr>().is_err()
    {
        // Connect to the address that was checked, whatever DNS answers next.
        builder = builder.resolve(host, addr);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => return retry(e.to_string()),
    };
    let body = body_of(state, d);
    let ts = now.as_second();
    let sig = match signature(&d.secret, &d.msg_id, ts, &body) {
        Ok(s) => s,
        Err(e) => return DeliveryResult::Failed { error: e },
    };
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => DeliveryResult::Delivered,
        Ok(r) if r.status() == reqwest::StatusCode::GONE => DeliveryResult::Gone {
            error: "the endpoint answered 410 Gone".into(),
        },
        Ok(r) => retry(format!("the endpoint answered {}", r.status())),
        // Not the URL (a chat's carries a secret): what went wrong.
        Err(e) => retry(format!("cannot deliver: {}", e.without_url())),
    }
}

/// Marks agents offline once their last report is older than the threshold
/// (`--agent-offline-after`), each once: the `agent.offline` event. Checked every
/// quarter of the threshold (at most every 15 s, at least every second).
pub async fn watch_agents(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let after = state.recommend.offline_after;
    let every = Duration::from_secs((after.as_secs() / 4).clamp(1, 15) as u64);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let now = state.clock.now();
        let Ok(cutoff) = now.checked_sub(after) else {
            continue;
        };
        match state.store.mark_agents_offline(cutoff, now).await {
            Ok(vms) => {
                for vm in vms {
                    tracing::warn!(vm = %vm, "an agent stopped reporting");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot check for offline agents"),
        }
    }
}

/// Delivers the outbox until shutdown: every half second, takes what is due (under a
/// lease), sends it, records the outcome.
pub async fn run(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
        let due = match state
            .store
            .claim_deliveries(state.clock.now(), LEASE, BATCH)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the webhook outbox");
                continue;
            }
        };
        // One after another: a slow endpoint delays the others by its timeout at most.
        for d in &due {
            // Its own time: the signature's timestamp is when it is sent.
            let result = attempt(&state, d, state.clock.now()).await;
            if let DeliveryResult::Retry { error, .. } | DeliveryResult::Failed { error } = &result
            {
                tracing::warn!(message = %d.msg_id, error = %error, "a webhook delivery failed");
            }
            if let Err(e) = state
                .store
                .finish_delivery(&d.msg_id, d.claimed_until, result, state.clock.now())
                .await
            {
                tracing::warn!(error = %e, "cannot record a webhook delivery");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn non_public_addresses_are_forbidden() {
        for bad in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::7f00:1",
            "2002:a00:1::",
            "2001::1",
            "fec0::1",
            "168.63.129.16",
            "192.0.0.8",
        ] {
            assert!(forbidden_ip(bad.parse().unwrap()), "{bad}");
        }
        for good in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(!forbidden_ip(good.parse().unwrap()), "{good}");
        }
    }

    /// The example of the Standard Webhooks specification.
    #[test]
    fn signatures_follow_standard_webhooks() {
        let sig = signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
