//! Authentication: bearer tokens.
//!
//! A token reads `jg_<id>.<secret>`. Only the SHA-256 of the secret is stored; the id
//! finds the record and the secret's hash is compared in constant time. Any other
//! string (for example an operator-chosen `JITGATE_BOOTSTRAP_TOKEN`) is accepted too:
//! its id is derived from its own hash.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jitgate_core::Timestamp;
use jitgate_core::audit::{AuditEntry, Outcome};
use jitgate_core::ids::Scope;
use jitgate_core::net::canonical_addr;
use jitgate_core::rbac::{self, Action, RoleAssignment};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Splits a presented token into (id, secret).
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix("jg_")?.split_once('.')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// A fresh token: (id, full token text, secret hash).
pub fn generate_token() -> (String, String, String) {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let id = hex::encode(id);
    let secret = hex::encode(secret);
    let hash = sha256_hex(&secret);
    (id.clone(), format!("jg_{id}.{secret}"), hash)
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub token_id: String,
    pub assignments: Vec<RoleAssignment>,
    /// A person signed in with the identity provider: who, as the credential keeps it.
    /// `None` for tokens an administrator made (automation) and agents'.
    pub signed_in: Option<crate::oidc::SignedIn>,
    /// True for a token the provider issued (a bearer JWT), not one jitgate issued.
    pub provider_token: bool,
    pub expires: Option<Timestamp>,
}

impl Principal {
    pub fn can(&self, action: Action, scope: &Scope) -> bool {
        rbac::is_allowed(&self.assignments, &self.name, action, scope)
    }

    /// The audit context of a change this caller makes from `ip` at `now`.
    pub fn audit_ctx(&self, ip: IpAddr, now: Timestamp) -> jitgate_store::AuditCtx {
        jitgate_store::AuditCtx {
            actor: self.name.clone(),
            source: ip.to_string(),
            now,
        }
    }

    /// 403 unless the caller holds `action` on `scope`.
    pub fn require(&self, action: Action, scope: &Scope) -> ApiResult<()> {
        if self.can(action, scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                &self.name,
                action.as_str(),
                &scope.to_string(),
            ))
        }
    }
}

/// The caller's observed address (IPv4-mapped IPv6 shown as IPv4).
#[derive(Debug, Clone, Copy)]
pub struct CallerIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for CallerIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ci| CallerIp(canonical_addr(ci.0.ip())))
            .ok_or_else(|| ApiError::internal("no connection info"))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::unauthenticated("authentication is required"))
    }
}

/// The token of an `Authorization` header: `Bearer <token>`, the scheme
/// case-insensitive (RFC 9110, 11.1).
pub(crate) fn bearer(header: Option<&str>) -> ApiResult<&str> {
    let header = header.ok_or_else(|| {
        ApiError::unauthenticated("Authentication failed. The 'Authorization' header is missing.")
    })?;
    header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthenticated(
                "Authentication failed. The 'Authorization' header must be 'Bearer <token>'.",
            )
        })
}

/// How often a sign-in credential's use is written (its idle timeout's granularity).
const TOUCH_EVERY: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

/// The principal of a presented token (from the header or a session cookie), with its
/// role assignments: the secret compared in constant time, revoked and expired
/// tokens refused.
pub(crate) async fn authenticate(
    state: &AppState,
    token: &str,
    now: Timestamp,
) -> ApiResult<Principal> {
    // `jg_<id>.<secret>` is found by its id. Any other text can only be a bootstrap
    // token an operator chose (JITGATE_BOOTSTRAP_TOKEN); it is stored under a random
    // id and found by the hash of the whole text, so its id reveals nothing about it.
    // A token authenticated moments ago is in the cache (no store read); the secret is
    // compared with its record's hash all the same.
    if let Some(oidc) = &state.oidc
        && crate::oidc::looks_like_jwt(token)
    {
        return provider_token(state, oidc, token, now).await;
    }
    let split = split_token(token);
    let (cache_key, presented) = match split {
        Some((id, secret)) => (format!("id:{id}"), sha256_hex(secret)),
        None => {
            let hash = sha256_hex(token);
            (format!("hash:{hash}"), hash)
        }
    };
    let generation = state.auth_cache.generation();
    let cached = state.auth_cache.get(&cache_key);
    if cached.is_some() {
        state.metrics.auth_cache_hits.inc();
    } else {
        state.metrics.auth_cache_misses.inc();
    }
    let (record, cached_assignments) = match cached {
        Some(c) => (Some(c.record), Some(c.assignments)),
        None => match split {
            Some((id, _)) => (state.store.find_token(id).await?, None),
            None => (
                state.store.find_token_by_secret_hash(&presented).await?,
                None,
            ),
        },
    };
    let valid = match &record {
        Some(r) => bool::from(r.secret_hash.as_bytes().ct_eq(presented.as_bytes())),
        // Compare anyway so an unknown id costs the same as a wrong secret.
        None => {
            let _ = presented.as_bytes().ct_eq(sha256_hex("").as_bytes());
            false
        }
    };
    let record = match record {
        Some(r) if valid => r,
        _ => {
            return Err(ApiError::unauthenticated(
                "Authentication failed. The token is not valid.",
            ));
        }
    };
    if record.revoked.is_some() && record.principal.starts_with("agent:") {
        // Told apart so that the agent stops instead of retrying forever.
        return Err(crate::agent::credential_revoked());
    }
    if record.revoked.is_some() {
        return Err(ApiError::unauthenticated(
            "Authentication failed. The token has been revoked; ask an administrator for a new one.",
        ));
    }
    if record.expires.is_some_and(|e| e <= now) {
        return Err(ApiError::unauthenticated(if record.identity.is_some() {
            "Authentication failed. The sign-in has expired; sign in again."
        } else {
            "Authentication failed. The token has expired; ask an administrator for a new one."
        }));
    }
    // A sign-in's credential also ends when unused for the idle timeout; its use is
    // written at most once a minute (and the cached record updated with it).
    let mut record = record;
    if record.identity.is_some()
        && let Some(oidc) = &state.oidc
    {
        let last = record.last_used.unwrap_or(record.created);
        let idle = now.duration_since(last);
        if idle
            > jiff::SignedDuration::try_from(oidc.config.idle).unwrap_or(jiff::SignedDuration::MAX)
        {
            return Err(ApiError::unauthenticated(format!(
                "Authentication failed. The sign-in ended after {} min without use; sign in again.",
                oidc.config.idle.as_secs() / 60
            )));
        }
        if idle >= TOUCH_EVERY {
            if let Err(e) = state.store.touch_token(&record.id, now).await {
                tracing::warn!(error = %e, "cannot record a sign-in's use");
            }
            record.last_used = Some(now);
            if let Some(a) = &cached_assignments {
                state.auth_cache.put(
                    cache_key.clone(),
                    crate::authcache::Cached {
                        record: record.clone(),
                        assignments: a.clone(),
                    },
                    generation,
                );
            }
        }
    }
    let assignments = match cached_assignments {
        Some(a) => a,
        None => {
            let a: Vec<_> = state
                .store
                .role_assignments(Some(&record.principal))
                .await?
                .into_iter()
                .map(|r| r.assignment)
                .collect();
            state.auth_cache.put(
                cache_key,
                crate::authcache::Cached {
                    record: record.clone(),
                    assignments: a.clone(),
                },
                generation,
            );
            a
        }
    };
    Ok(Principal {
        signed_in: record
            .identity
            .as_deref()
            .and_then(crate::oidc::SignedIn::parse),
        provider_token: false,
        expires: record.expires,
        name: record.principal,
        token_id: record.id,
        assignments,
    })
}

/// The principal of a token the provider issued for jitgate: its roles are those an
/// administrator assigned to it plus what its groups map to now (the mapping a web
/// sign-in stored is not used: the token's own groups are the ones that count).
async fn provider_token(
    state: &AppState,
    oidc: &crate::oidc::Oidc,
    jwt: &str,
    now: Timestamp,
) -> ApiResult<Principal> {
    let caller = oidc.verify_bearer(jwt, now).await.map_err(|reason| {
        ApiError::unauthenticated(format!(
            "Authentication failed. The identity provider's token is not valid: {reason}"
        ))
    })?;
    let mut assignments: Vec<RoleAssignment> = state
        .store
        .role_assignments(Some(&caller.principal))
        .await?
        .into_iter()
        .filter(|r| !r.id.starts_with("oidc-"))
        .map(|r| r.assignment)
        .collect();
    for a in oidc.mapped(&caller.principal, &caller.groups) {
        if !assignments.contains(&a) {
            assignments.push(a);
        }
    }
    Ok(Principal {
        signed_in: Some(crate::oidc::SignedIn {
            name: caller.name,
            groups: caller.groups,
            via: "provider-token".into(),
            not_after: None,
        }),
        provider_token: true,
        expires: Some(caller.expires),
        name: caller.principal,
        token_id: caller.id,
        assignments,
    })
}

/// The authenticated caller's name, carried on the response for the audit layer.
#[derive(Debug, Clone)]
pub(crate) struct Actor(pub String);

/// Paths anyone may call.
pub fn is_public(path: &str) -> bool {
    // Enrollment authenticates with the enrollment token in its body.
    matches!(
        path,
        "/api/v1/health"
            | "/api/v1/health/live"
            | "/metrics"
            | "/api/v1/openapi.json"
            | "/api/v1/agent/enroll"
            | "/auth/login"
            | "/auth/callback"
            | "/auth/logout"
            | "/auth/token"
            | "/auth/device"
    ) || crate::install::is_public(path)
}

/// Authenticates every non-public request; a failure is answered 401 and audited.
pub async fn auth_layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let blocked = source.is_some_and(|ip| state.refusals.blocked(ip, std::time::Instant::now()));
    let path = req.uri().path();
    // The dashboard's pages authenticate their own callers (a browser without a
    // session is sent to sign in, not answered 401).
    if crate::web::is_dashboard(path) {
        if blocked && req.method() == axum::http::Method::POST && path == "/ui/signin" {
            return too_many(&state);
        }
        return next.run(req).await;
    }
    if is_public(path) {
        // Enrollment tokens are guessed through this door, and sign-in codes through
        // these (each refused callback also costs a call to the provider): they are
        // limited like the rest.
        if blocked
            && matches!(
                path,
                "/api/v1/agent/enroll" | "/auth/callback" | "/auth/token" | "/auth/device"
            )
        {
            return too_many(&state);
        }
        return next.run(req).await;
    }
    let now = state.clock.now();
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // A browser's session (sign-in with the identity provider) is its cookie; a
    // change made with it must come from the controller's own pages (CSRF).
    let session = match (&state.oidc, header) {
        (Some(oidc), None) => {
            crate::oidc::read_cookie(req.headers(), crate::oidc::SESSION_COOKIE).map(|s| (oidc, s))
        }
        _ => None,
    };
    let result = match session {
        Some((oidc, session)) => {
            let safe = matches!(
                *req.method(),
                axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
            );
            if !safe && let Err(e) = crate::oidc::check_origin(oidc, req.headers()) {
                return e.into_response();
            }
            authenticate(&state, &session, now).await
        }
        None => match bearer(header) {
            Ok(token) => authenticate(&state, token, now).await,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(p) => {
            let actor = Actor(p.name.clone());
            req.extensions_mut().insert(p);
            let mut resp = next.run(req).await;
            resp.extensions_mut().insert(actor);
            resp
        }
        // A source past its refusal limit gets 429 instead of 401: it is told to slow
        // down, and nothing more is written for it (a valid credential still works).
        Err(_) if blocked => too_many(&state),
        Err(e) => e.into_response(),
    }
}

pub(crate) fn too_many(state: &AppState) -> Response {
    let secs = state.refusals.limits().window.as_secs().max(1);
    let mut resp = ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        format!(
            "too many refused calls from this address; retry in {secs} s with a valid credential"
        ),
    )
    .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, v);
    }
    resp
}

/// The longest request path written to the audit log (a refused call's path is the
/// caller's choice).
const MAX_AUDITED_PATH: usize = 256;

fn bounded_path(path: &str) -> String {
    if path.len() <= MAX_AUDITED_PATH {
        return path.to_owned();
    }
    let mut end = MAX_AUDITED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &path[..end], path.len())
}

/// The audit action a refused call is recorded as, when the handler names a more
/// precise one than its status gives (`auth.signin` for a refused sign-in).
#[derive(Debug, Clone, Copy)]
pub struct AuditAs(pub &'static str);

/// Records every refused or failed call (status 400 and up) in the audit log.
pub async fn audit_failures(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = bounded_path(req.uri().path());
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| canonical_addr(c.0.ip()));
    let source = ip.map(|i| i.to_string()).unwrap_or_default();
    let resp = next.run(req).await;
    let actor = resp.extensions().get::<Actor>().map(|a| a.0.clone());
    let status = resp.status();
    let audit_it = status.as_u16() >= 400
        && match ip {
            Some(ip) => {
                state.refusals.refused(ip, std::time::Instant::now())
                    == crate::limits::Refusal::Audit
            }
            None => true,
        };
    if status.as_u16() >= 400 && !audit_it {
        state.metrics.refusals_suppressed.inc();
        state.metrics.refused(status.as_u16());
    }
    if audit_it {
        let info = resp.extensions().get::<crate::error::ErrorInfo>().cloned();
        let action = match resp.extensions().get::<AuditAs>() {
            Some(AuditAs(named)) => named,
            None => match status.as_u16() {
                401 => "authentication.failed",
                403 => "authorization.denied",
                s if s >= 500 => "request.failed",
                _ => "request.rejected",
            },
        };
        let outcome = if matches!(status.as_u16(), 401 | 403) {
            Outcome::Denied
        } else {
            Outcome::Failed
        };
        let details = serde_json::json!({
            "method": method.as_str(),
            "status": status.as_u16(),
            "code": info.as_ref().map(|i| i.code),
            "message": info.as_ref().map(|i| i.message.clone()),
            "field": info.as_ref().and_then(|i| i.target.clone()),
        });
        let entry = AuditEntry {
            time: state.clock.now().to_string(),
            actor: actor.unwrap_or_else(|| "anonymous".to_owned()),
            source,
            action: action.to_owned(),
            target: path,
            outcome,
            details: details.to_string(),
        };
        if let Err(e) = state.store.append_audit(entry).await {
            tracing::error!(error = %e, "cannot audit a refused call");
        }
        state.metrics.refused(status.as_u16());
    }
    resp
}
