//! Sign-in with the organisation's OpenID Provider: the controller is its one client
//! (authorization code flow with PKCE S256, `state` and `nonce`).
//!
//! `GET /auth/login` sends the browser to the provider with a signed, short-lived
//! cookie holding what the callback needs (state, nonce, PKCE verifier, where to go
//! back), so any controller replica can finish a sign-in another one started.
//! `GET /auth/callback` checks that cookie against `state`, exchanges the code, verifies
//! the ID token (signature against the provider's keys, refetched once on an unknown
//! key id; issuer; audience; expiry; nonce; the provider's announced algorithms, never
//! `none`), names the person by issuer and subject, recomputes their role assignments
//! from their groups, and opens a session: a jitgate token with an expiry, held in an
//! `HttpOnly`, `Secure`, `SameSite=Lax`, `__Host-` cookie. Sessions are tokens, so every
//! replica authenticates them and a sign-out (`POST /auth/logout`, which revokes it) is
//! seen by all. Every sign-in, refusal and sign-out is audited; no code, token or
//! secret is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use jitgate_core::Timestamp;
use jitgate_core::audit::{AuditEntry, Outcome};
use jitgate_core::ids::Scope;
use jitgate_core::rbac::{Role, RoleAssignment};
use jitgate_store::{AuditCtx, RoleAssignmentRecord, TokenRecord};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet,
    EndpointSet, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    Scope as OidcScope, TokenResponse,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::RwLock;

use crate::AppState;
use crate::auth::generate_token;
use crate::error::ApiError;

/// The session cookie: the `__Host-` prefix makes browsers refuse it unless it is
/// `Secure`, has `Path=/` and no `Domain` (no sibling host can set or read it).
pub const SESSION_COOKIE: &str = "__Host-jitgate_session";
/// The cookie that carries a sign-in from `/auth/login` to `/auth/callback`.
pub const LOGIN_COOKIE: &str = "__Host-jitgate_login";
/// How long a person has to sign in at the provider.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// The largest answer read from the provider.
const MAX_PROVIDER_BODY: usize = 1 << 20;

/// A group of the provider given a role at a scope.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRole {
    pub group: String,
    pub role: Role,
    pub scope: Scope,
}

#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The provider's issuer URL (discovery is read at `<issuer>/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: jitgate_proto::Secret,
    pub scopes: Vec<String>,
    /// The ID token claim with the person's display name.
    pub name_claim: String,
    /// The ID token claim with the person's groups (a list of strings).
    pub groups_claim: String,
    pub roles: Vec<GroupRole>,
    /// The controller as browsers reach it (`https://jit.example.net:8443`): the
    /// redirect URI is `<public_url>/auth/callback`, and unsafe calls made with a
    /// session cookie must come from this origin.
    pub public_url: url::Url,
    /// How long a session lasts (its token's expiry).
    pub session: Duration,
}

impl OidcConfig {
    pub fn redirect_uri(&self) -> String {
        format!("{}/auth/callback", self.origin())
    }

    /// `scheme://host[:port]` of the public URL, as browsers send it in `Origin`.
    pub fn origin(&self) -> String {
        self.public_url.origin().ascii_serialization()
    }
}

/// Checks what can be checked without the provider: an issuer over HTTPS (plain HTTP
/// only on loopback, for tests and development), a public URL that is an origin.
pub fn check_config(c: &OidcConfig) -> Result<(), String> {
    let issuer = url::Url::parse(&c.issuer)
        .map_err(|e| format!("oidc issuer '{}' is not a URL: {e}", c.issuer))?;
    let loopback = |u: &url::Url| match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    if issuer.scheme() != "https" && !(issuer.scheme() == "http" && loopback(&issuer)) {
        return Err(format!(
            "oidc issuer '{}' must be https:// (plain http only on loopback): its keys sign who may open ports",
            c.issuer
        ));
    }
    let p = &c.public_url;
    if !matches!(p.scheme(), "https" | "http") || p.host().is_none() {
        return Err(format!("public URL '{p}' must be http(s)://host[:port]"));
    }
    if p.scheme() == "http" && !loopback(p) {
        return Err(format!(
            "public URL '{p}' must be https:// (session cookies are only sent over HTTPS)"
        ));
    }
    if c.client_id.is_empty() {
        return Err("oidc client id is empty".into());
    }
    Ok(())
}

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// The controller's OIDC client: configuration, the provider's discovered metadata
/// (fetched on first use, and again when an ID token is signed with a key it lacks).
pub struct Oidc {
    pub config: OidcConfig,
    http: reqwest::Client,
    client: RwLock<Option<(Arc<Client>, Instant)>>,
    /// Signs the login cookie; derived from the client secret, which every replica has.
    cookie_key: [u8; 32],
}

#[derive(Debug)]
struct HttpFailure(String);

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpFailure {}

/// One call to the provider through jitgate's reqwest: redirects are not followed (a
/// provider that redirects is an error, never a way to make the controller fetch
/// another address), answers are bounded.
async fn call(
    http: reqwest::Client,
    req: openidconnect::HttpRequest,
) -> Result<openidconnect::HttpResponse, HttpFailure> {
    let (parts, body) = req.into_parts();
    let mut resp = http
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(|e| HttpFailure(format!("{e}")))?;
    let mut out = openidconnect::http::Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| HttpFailure(format!("{e}")))?
    {
        if body.len() + chunk.len() > MAX_PROVIDER_BODY {
            return Err(HttpFailure("the provider's answer is too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    out.body(body).map_err(|e| HttpFailure(e.to_string()))
}

/// What the login cookie carries.
#[derive(Serialize, Deserialize)]
struct Pending {
    /// `state`
    s: String,
    /// `nonce`
    n: String,
    /// PKCE verifier
    v: String,
    /// Where to go after signing in (a path on this controller).
    r: String,
    /// Expiry (Unix seconds).
    e: i64,
}

/// Who signed in.
#[derive(Debug, Clone)]
pub struct Identity {
    pub principal: String,
    pub issuer: String,
    pub subject: String,
    pub name: String,
    pub groups: Vec<String>,
}

impl Oidc {
    pub fn new(config: OidcConfig) -> anyhow::Result<Oidc> {
        check_config(&config).map_err(anyhow::Error::msg)?;
        // reqwest's TLS uses the process's provider (ring, as the server's).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(config.client_secret.expose().as_bytes())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        mac.update(b"jitgate login cookie");
        let cookie_key = mac.finalize().into_bytes().into();
        Ok(Oidc {
            config,
            http,
            client: RwLock::new(None),
            cookie_key,
        })
    }

    /// The client made from the provider's metadata; `refresh` fetches it again (new
    /// signing keys), once for all the callers waiting at the same time. ID tokens come
    /// only from the provider's token endpoint, so nobody else can make the controller
    /// refetch.
    async fn client(&self, refresh: bool) -> Result<Arc<Client>, String> {
        let asked = Instant::now();
        if !refresh && let Some((c, _)) = &*self.client.read().await {
            return Ok(c.clone());
        }
        let mut guard = self.client.write().await;
        if let Some((c, at)) = &*guard
            && (!refresh || *at >= asked)
        {
            return Ok(c.clone());
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(|e| e.to_string())?;
        let http = self.http.clone();
        let fetch = move |r| call(http.clone(), r);
        let metadata = CoreProviderMetadata::discover_async(issuer, &fetch)
            .await
            .map_err(|e| {
                format!(
                    "cannot read the provider's discovery document: {}",
                    chain(&e)
                )
            })?;
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            Some(ClientSecret::new(
                self.config.client_secret.expose().to_owned(),
            )),
        )
        .set_redirect_uri(RedirectUrl::new(self.config.redirect_uri()).map_err(|e| e.to_string())?);
        let client = Arc::new(client);
        *guard = Some((client.clone(), Instant::now()));
        Ok(client)
    }

    fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.cookie_key)
            .unwrap_or_else(|_| unreachable!());
        mac.update(payload);
        mac.finalize().into_bytes().to_vec()
    }

    fn pending_cookie(&self, p: &Pending) -> String {
        let json = serde_json::to_vec(p).unwrap_or_default();
        format!("{}.{}", B64.encode(&json), B64.encode(self.sign(&json)))
    }

    fn read_pending(&self, cookie: &str, now: i64) -> Result<Pending, &'static str> {
        let (body, sig) = cookie
            .split_once('.')
            .ok_or("the sign-in cookie is malformed")?;
        let json = B64
            .decode(body)
            .map_err(|_| "the sign-in cookie is malformed")?;
        let sig = B64
            .decode(sig)
            .map_err(|_| "the sign-in cookie is malformed")?;
        if !bool::from(self.sign(&json).ct_eq(&sig)) {
            return Err("the sign-in cookie's signature is wrong");
        }
        let p: Pending =
            serde_json::from_slice(&json).map_err(|_| "the sign-in cookie is malformed")?;
        if p.e <= now {
            return Err("the sign-in took too long (over 10 minutes); sign in again");
        }
        Ok(p)
    }
}

/// An error and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn cookie(name: &str, value: &str, max_age: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
        max_age.as_secs()
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie(name: &str) -> HeaderValue {
    cookie(name, "", Duration::ZERO)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn read_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn not_configured() -> ApiError {
    ApiError::not_found("sign-in with an identity provider is not configured (serve --oidc-issuer)")
}

/// A path on this controller to return to: `/...`, never `//host` or a URL elsewhere.
fn return_path(r: Option<&String>) -> Result<String, ApiError> {
    let Some(r) = r else { return Ok("/".into()) };
    let ok = r.starts_with('/')
        && !r.starts_with("//")
        && !r.starts_with("/\\")
        && r.len() <= 512
        && !r.chars().any(|c| c.is_control() || c.is_whitespace());
    if !ok {
        return Err(ApiError::bad_param(
            "return_to",
            "must be a path on this controller (starting with one '/', at most 512 characters)",
        ));
    }
    Ok(r.clone())
}

#[derive(Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

/// `GET /auth/login`: to the provider.
pub async fn login(
    State(state): State<AppState>,
    Query(q): Query<LoginQuery>,
) -> Result<Response, ApiError> {
    let oidc = state.oidc.clone().ok_or_else(not_configured)?;
    let return_to = return_path(q.return_to.as_ref())?;
    let client = oidc.client(false).await.map_err(provider_unavailable)?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = client.authorize_url(
        CoreAuthenticationFlow::AuthorizationCode,
        CsrfToken::new_random,
        Nonce::new_random,
    );
    for s in &oidc.config.scopes {
        if s != "openid" {
            req = req.add_scope(OidcScope::new(s.clone()));
        }
    }
    let (url, csrf, nonce) = req.set_pkce_challenge(challenge).url();
    let pending = Pending {
        s: csrf.secret().clone(),
        n: nonce.secret().clone(),
        v: verifier.secret().clone(),
        r: return_to,
        e: state.clock.now().as_second() + LOGIN_TTL.as_secs() as i64,
    };
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(url.as_str()).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    h.insert(
        header::SET_COOKIE,
        cookie(LOGIN_COOKIE, &oidc.pending_cookie(&pending), LOGIN_TTL),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

fn provider_unavailable(m: String) -> ApiError {
    tracing::warn!(error = %m, "the identity provider cannot be reached");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "IdentityProviderUnavailable",
        format!("the identity provider cannot be used now: {m}"),
    )
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /auth/callback`: back from the provider.
pub async fn callback(
    State(state): State<AppState>,
    crate::auth::CallerIp(ip): crate::auth::CallerIp,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, ApiError> {
    let oidc = state.oidc.clone().ok_or_else(not_configured)?;
    let source = ip.to_string();
    let now = state.clock.now();
    match finish(&state, &oidc, &headers, q, now, &source).await {
        Ok((identity, token, return_to)) => {
            let mut resp = StatusCode::SEE_OTHER.into_response();
            let h = resp.headers_mut();
            h.insert(
                header::LOCATION,
                HeaderValue::from_str(&return_to).unwrap_or(HeaderValue::from_static("/")),
            );
            h.append(header::SET_COOKIE, clear_cookie(LOGIN_COOKIE));
            h.append(
                header::SET_COOKIE,
                cookie(SESSION_COOKIE, &token, oidc.config.session),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            tracing::info!(principal = %identity.principal, "signed in");
            Ok(resp)
        }
        Err(reason) => {
            // Audited once, as `auth.signin`, by the refused-call layer (within the
            // per-source limit: nobody can grow the log without bound through here).
            let mut resp = ApiError::unauthenticated(format!("sign-in refused: {reason}"))
                .with_target("signin")
                .into_response();
            resp.extensions_mut()
                .insert(crate::auth::AuditAs("auth.signin"));
            resp.headers_mut()
                .append(header::SET_COOKIE, clear_cookie(LOGIN_COOKIE));
            Ok(resp)
        }
    }
}

/// The callback's checks and the session it opens; an error is the refusal's reason
/// (audited, shown to the person), never a code, token or secret.
async fn finish(
    state: &AppState,
    oidc: &Oidc,
    headers: &HeaderMap,
    q: CallbackQuery,
    now: Timestamp,
    source: &str,
) -> Result<(Identity, String, String), String> {
    let cookie = read_cookie(headers, LOGIN_COOKIE)
        .ok_or("no sign-in is under way in this browser (the sign-in cookie is missing)")?;
    let pending = oidc.read_pending(&cookie, now.as_second())?;
    let given = q
        .state
        .as_deref()
        .ok_or("the provider's answer has no state")?;
    if !bool::from(given.as_bytes().ct_eq(pending.s.as_bytes())) {
        return Err("the state does not match this browser's sign-in".into());
    }
    if let Some(e) = q.error {
        let desc = q.error_description.unwrap_or_default();
        return Err(format!(
            "the provider answered {}{}",
            bounded(&e),
            if desc.is_empty() {
                String::new()
            } else {
                format!(": {}", bounded(&desc))
            }
        ));
    }
    let code = q.code.ok_or("the provider's answer has no code")?;
    let client = oidc.client(false).await?;
    let http = oidc.http.clone();
    let fetch = move |r| call(http.clone(), r);
    let tokens = client
        .exchange_code(AuthorizationCode::new(code))
        .map_err(|e| e.to_string())?
        .set_pkce_verifier(PkceCodeVerifier::new(pending.v.clone()))
        .request_async(&fetch)
        .await
        .map_err(|e| format!("the provider refused the code: {}", chain(&e)))?;
    let id_token = tokens
        .id_token()
        .ok_or("the provider's answer has no ID token")?;
    let nonce = Nonce::new(pending.n.clone());
    let claims = match id_token.claims(&client.id_token_verifier(), &nonce) {
        Ok(c) => c.clone(),
        Err(first) => {
            // Keys rotated since they were fetched: fetch them again, once.
            let fresh = oidc.client(true).await?;
            id_token
                .claims(&fresh.id_token_verifier(), &nonce)
                .map_err(|_| format!("the ID token is not valid: {}", chain(&first)))?
                .clone()
        }
    };
    // The signature is verified: the payload's other claims are the provider's.
    let payload: serde_json::Value = id_token
        .to_string()
        .split('.')
        .nth(1)
        .and_then(|p| B64.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the ID token's payload cannot be read")?;
    let issuer = claims.issuer().as_str().trim_end_matches('/').to_owned();
    let subject = claims.subject().as_str().to_owned();
    let principal = format!("{issuer}#{subject}");
    if principal.len() > 256
        || principal
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err("the provider's subject cannot name a jitgate principal (spaces, or over 256 characters with the issuer)".into());
    }
    let name = payload[&oidc.config.name_claim]
        .as_str()
        .or(payload["email"].as_str())
        .unwrap_or(&subject)
        .chars()
        .take(256)
        .collect::<String>();
    let groups: Vec<String> = match &payload[&oidc.config.groups_claim] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    };
    let identity = Identity {
        principal,
        issuer,
        subject,
        name,
        groups,
    };
    let roles = sync_roles(state, oidc, &identity, now)
        .await
        .map_err(|e| format!("the role assignments cannot be updated: {e}"))?;
    let (id, token, hash) = generate_token();
    let audit = AuditCtx {
        actor: identity.principal.clone(),
        source: source.to_owned(),
        now,
    };
    let expires = now
        .checked_add(
            jiff::SignedDuration::try_from(oidc.config.session).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    state
        .store
        .create_token(
            TokenRecord {
                id: id.clone(),
                principal: identity.principal.clone(),
                secret_hash: hash,
                description: format!("web session of {}", identity.name),
                created: now,
                expires: Some(expires),
                revoked: None,
                identity: None,
            },
            audit,
        )
        .await
        .map_err(|e| format!("the session cannot be stored: {e}"))?;
    state
        .store
        .append_audit(AuditEntry {
            time: now.to_string(),
            actor: identity.principal.clone(),
            source: source.to_owned(),
            action: "auth.signin".into(),
            target: identity.issuer.clone(),
            outcome: Outcome::Success,
            details: serde_json::json!({
                "subject": identity.subject,
                "name": identity.name,
                "groups": identity.groups,
                "roles": roles,
                "session": id,
                "expires": expires.to_string(),
            })
            .to_string(),
        })
        .await
        .map_err(|e| format!("the sign-in cannot be audited: {e}"))?;
    Ok((identity, token, pending.r))
}

fn bounded(s: &str) -> String {
    s.chars().take(200).filter(|c| !c.is_control()).collect()
}

/// The id of the assignment a group mapping gives: the same for the same principal,
/// role and scope, so a sign-in finds the ones the previous sign-in made.
fn mapped_id(principal: &str, role: Role, scope: &Scope) -> String {
    let h = Sha256::digest(format!("{principal}\n{}\n{scope}", role.as_str()).as_bytes());
    format!("oidc-{}", &hex::encode(h)[..32])
}

/// Makes the principal's mapped assignments those its groups give now: adds what is
/// missing, removes what its groups no longer give (each audited); assignments an
/// administrator made are left alone. Returns the mapped roles as `role@scope`.
async fn sync_roles(
    state: &AppState,
    oidc: &Oidc,
    who: &Identity,
    now: Timestamp,
) -> Result<Vec<String>, jitgate_store::StoreError> {
    let mut wanted: Vec<(String, RoleAssignment)> = Vec::new();
    for m in &oidc.config.roles {
        if who.groups.contains(&m.group) {
            let id = mapped_id(&who.principal, m.role, &m.scope);
            if !wanted.iter().any(|(i, _)| *i == id) {
                wanted.push((
                    id,
                    RoleAssignment {
                        principal: who.principal.clone(),
                        role: m.role,
                        scope: m.scope.clone(),
                    },
                ));
            }
        }
    }
    let audit = || AuditCtx {
        actor: "oidc".into(),
        source: oidc.config.issuer.clone(),
        now,
    };
    let have = state.store.role_assignments(Some(&who.principal)).await?;
    let mut changed = false;
    for r in &have {
        if r.id.starts_with("oidc-") && !wanted.iter().any(|(id, _)| *id == r.id) {
            state.store.remove_role_assignment(&r.id, audit()).await?;
            changed = true;
        }
    }
    for (id, a) in &wanted {
        if !have.iter().any(|r| r.id == *id) {
            state
                .store
                .add_role_assignment(
                    RoleAssignmentRecord {
                        id: id.clone(),
                        assignment: a.clone(),
                        created: now,
                    },
                    audit(),
                )
                .await?;
            changed = true;
        }
    }
    if changed {
        state.auth_cache.invalidate();
    }
    Ok(wanted
        .iter()
        .map(|(_, a)| format!("{}@{}", a.role.as_str(), a.scope))
        .collect())
}

/// `POST /auth/logout`: ends the browser's session (its token is revoked, on every
/// replica) and clears the cookie. Only from the controller's own pages (`Origin`).
pub async fn logout(
    State(state): State<AppState>,
    crate::auth::CallerIp(ip): crate::auth::CallerIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let oidc = state.oidc.clone().ok_or_else(not_configured)?;
    check_origin(&oidc, &headers)?;
    let now = state.clock.now();
    // A session that is no longer valid has nothing to end: its cookie is cleared all
    // the same.
    if let Some(token) = read_cookie(&headers, SESSION_COOKIE)
        && let Ok(p) = crate::auth::authenticate(&state, &token, now).await
    {
        let audit = AuditCtx {
            actor: p.name.clone(),
            source: ip.to_string(),
            now,
        };
        state.store.revoke_token(&p.token_id, audit.clone()).await?;
        state.auth_cache.invalidate();
        state
            .store
            .append_audit(AuditEntry {
                time: now.to_string(),
                actor: audit.actor,
                source: audit.source,
                action: "auth.signout".into(),
                target: oidc.config.issuer.clone(),
                outcome: Outcome::Success,
                details: serde_json::json!({ "session": p.token_id }).to_string(),
            })
            .await?;
    }
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    resp.headers_mut()
        .insert(header::SET_COOKIE, clear_cookie(SESSION_COOKIE));
    Ok(resp)
}

/// A call authenticated by the session cookie that changes something must come from
/// the controller's own origin (another site's page cannot make it: CSRF).
pub fn check_origin(oidc: &Oidc, headers: &HeaderMap) -> Result<(), ApiError> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin == Some(oidc.config.origin().as_str()) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "CrossOriginRefused",
        format!(
            "a change made with a browser session must come from {} (the Origin header is {})",
            oidc.config.origin(),
            origin
                .map(|o| format!("'{}'", bounded(o)))
                .unwrap_or_else(|| "missing".into())
        ),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(issuer: &str, public: &str) -> OidcConfig {
        OidcConfig {
            issuer: issuer.into(),
            client_id: "jitgate".into(),
            client_secret: jitgate_proto::Secret::new("s3cret"),
            scopes: vec!["openid".into()],
            name_claim: "name".into(),
            groups_claim: "groups".into(),
            roles: Vec::new(),
            public_url: url::Url::parse(public).unwrap(),
            session: Duration::from_secs(3600),
        }
    }

    #[test]
    fn issuers_and_public_urls_need_https_off_loopback() {
        assert!(
            check_config(&config(
                "https://idp.example.net",
                "https://jit.example.net"
            ))
            .is_ok()
        );
        assert!(check_config(&config("http://127.0.0.1:9000", "http://127.0.0.1:8080")).is_ok());
        let e =
            check_config(&config("http://idp.example.net", "https://jit.example.net")).unwrap_err();
        assert!(e.contains("must be https://"), "{e}");
        let e =
            check_config(&config("https://idp.example.net", "http://jit.example.net")).unwrap_err();
        assert!(e.contains("public URL"), "{e}");
        assert_eq!(
            config("https://a", "https://jit.example.net:8443/x/").origin(),
            "https://jit.example.net:8443"
        );
    }

    #[test]
    fn the_login_cookie_is_signed_and_expires() {
        let o = Oidc::new(config("https://idp.example.net", "https://jit.example.net")).unwrap();
        let p = Pending {
            s: "st".into(),
            n: "no".into(),
            v: "ve".into(),
            r: "/x".into(),
            e: 100,
        };
        let c = o.pending_cookie(&p);
        assert_eq!(o.read_pending(&c, 99).unwrap().s, "st");
        assert!(o.read_pending(&c, 100).err().unwrap().contains("too long"));
        // Another client secret (another installation) signs differently.
        let mut other = config("https://idp.example.net", "https://jit.example.net");
        other.client_secret = jitgate_proto::Secret::new("other");
        assert!(
            Oidc::new(other)
                .unwrap()
                .read_pending(&c, 99)
                .err()
                .unwrap()
                .contains("signature")
        );
        // A changed payload keeps no valid signature.
        let (body, sig) = c.split_once('.').unwrap();
        let mut json = B64.decode(body).unwrap();
        json[7] ^= 1;
        let forged = format!("{}.{sig}", B64.encode(&json));
        assert!(o.read_pending(&forged, 99).is_err());
    }

    #[test]
    fn only_paths_on_this_controller_are_returned_to() {
        assert_eq!(return_path(None).unwrap(), "/");
        assert_eq!(
            return_path(Some(&"/requests?x=1".into())).unwrap(),
            "/requests?x=1"
        );
        for bad in [
            "https://evil.example",
            "//evil.example/",
            "/\\evil.example",
            "relative",
            "/a b",
        ] {
            assert!(return_path(Some(&bad.to_owned())).is_err(), "{bad}");
        }
    }
}
