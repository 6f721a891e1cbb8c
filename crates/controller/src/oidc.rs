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
use jitgate_store::{AuditCtx, RoleAssignmentRecord, SigninRecord, SigninStatus, TokenRecord};
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreIdToken, CoreJsonWebKey, CoreJsonWebKeySet,
    CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{
    AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IdTokenVerifier, IssuerUrl, JsonWebTokenType,
    Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope as OidcScope,
    SignatureVerificationError, TokenResponse,
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
    /// The audience of the provider's tokens accepted as bearer credentials on the API
    /// (by default the client id).
    pub audience: String,
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
    /// A sign-in credential unused this long ends (its use is recorded to the minute).
    pub idle: Duration,
    /// The shortest time between two fetches of the provider's keys caused by a
    /// bearer token signed with a key id the controller does not know (anyone can
    /// present such a token: it must not make the controller hammer the provider).
    pub key_refetch: Duration,
}

/// The default of [`OidcConfig::key_refetch`].
pub const KEY_REFETCH: Duration = Duration::from_secs(60);

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

/// What discovery found: the client made from the provider's metadata and its keys.
struct Discovered {
    client: Client,
    issuer: IssuerUrl,
    jwks: CoreJsonWebKeySet,
    fetched: Instant,
}

/// Signing algorithms accepted from the provider: asymmetric ones only (never `none`,
/// never a MAC keyed with a secret some other party holds), and of those only what the
/// provider announces.
const ALLOWED_ALGS: [CoreJwsSigningAlgorithm; 10] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EcdsaP521Sha512,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// The controller's OIDC client: configuration, the provider's discovered metadata
/// (fetched on first use, and again when a token is signed with a key it lacks).
pub struct Oidc {
    pub config: OidcConfig,
    http: reqwest::Client,
    discovered: RwLock<Option<Arc<Discovered>>>,
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
    /// A command line's sign-in: where it returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<CliReturn>,
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
            discovered: RwLock::new(None),
            cookie_key,
        })
    }

    /// What discovery found; `refresh` fetches it again (new signing keys), once for
    /// all the callers waiting at the same time.
    async fn discovered(&self, refresh: bool) -> Result<Arc<Discovered>, String> {
        let asked = Instant::now();
        if !refresh && let Some(d) = &*self.discovered.read().await {
            return Ok(d.clone());
        }
        let mut guard = self.discovered.write().await;
        if let Some(d) = &*guard
            && (!refresh || d.fetched >= asked)
        {
            return Ok(d.clone());
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
        let issuer = metadata.issuer().clone();
        let jwks = metadata.jwks().clone();
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            Some(ClientSecret::new(
                self.config.client_secret.expose().to_owned(),
            )),
        )
        .set_redirect_uri(RedirectUrl::new(self.config.redirect_uri()).map_err(|e| e.to_string())?);
        let d = Arc::new(Discovered {
            client,
            issuer,
            jwks,
            fetched: Instant::now(),
        });
        *guard = Some(d.clone());
        Ok(d)
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

/// Where a command line's sign-in returns (`jitgate login`, RFC 8252): its loopback
/// port, its `state`, and the S256 challenge of the verifier it will present with the
/// code.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CliReturn {
    p: u16,
    s: String,
    c: String,
}

#[derive(Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
    cli_port: Option<u16>,
    cli_state: Option<String>,
    cli_challenge: Option<String>,
}

/// The command line's return, checked: all three parameters or none.
fn cli_return(q: &LoginQuery) -> Result<Option<CliReturn>, ApiError> {
    let (port, st, ch) = match (&q.cli_port, &q.cli_state, &q.cli_challenge) {
        (None, None, None) => return Ok(None),
        (Some(p), Some(s), Some(c)) => (*p, s, c),
        _ => {
            return Err(ApiError::bad_param(
                "cli_port",
                "cli_port, cli_state and cli_challenge go together (jitgate login sets them)",
            ));
        }
    };
    if port == 0 {
        return Err(ApiError::bad_param("cli_port", "must be a port, 1-65535"));
    }
    let unreserved = |c: char| c.is_ascii_alphanumeric() || "-._~".contains(c);
    if !(8..=128).contains(&st.len()) || !st.chars().all(unreserved) {
        return Err(ApiError::bad_param(
            "cli_state",
            "must be 8-128 characters of A-Z a-z 0-9 - . _ ~",
        ));
    }
    if ch.len() != 43
        || !ch
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::bad_param(
            "cli_challenge",
            "must be a PKCE S256 challenge (43 characters of base64url)",
        ));
    }
    Ok(Some(CliReturn {
        p: port,
        s: st.clone(),
        c: ch.clone(),
    }))
}

/// `GET /auth/login`: to the provider. With `cli_port`, `cli_state` and
/// `cli_challenge` the sign-in is a command line's: it ends on its loopback address
/// with a one-time code instead of a browser session.
#[utoipa::path(get, path = "/auth/login", tag = "signin",
    params(
        ("return_to" = Option<String>, Query, description = "A path on this controller to return to after signing in (default /)"),
        ("cli_port" = Option<u16>, Query, description = "A command line's loopback port (jitgate login): the sign-in ends at http://127.0.0.1:<port>/callback"),
        ("cli_state" = Option<String>, Query, description = "The command line's state, returned to it"),
        ("cli_challenge" = Option<String>, Query, description = "The S256 challenge of the command line's PKCE verifier"),
    ),
    responses((status = 303, description = "To the identity provider")))]
pub async fn login(
    State(state): State<AppState>,
    Query(q): Query<LoginQuery>,
) -> Result<Response, ApiError> {
    let oidc = state.oidc.clone().ok_or_else(not_configured)?;
    let return_to = return_path(q.return_to.as_ref())?;
    let cli = cli_return(&q)?;
    let d = oidc.discovered(false).await.map_err(provider_unavailable)?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = d.client.authorize_url(
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
        c: cli,
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

/// How a sign-in ends: a browser session, or the command line's loopback address
/// with a one-time code.
enum Signed {
    Web {
        token: String,
        return_to: String,
    },
    Cli {
        location: String,
        port: u16,
        name: String,
    },
}

/// `GET /auth/callback`: back from the provider.
#[utoipa::path(get, path = "/auth/callback", tag = "signin",
    params(
        ("code" = Option<String>, Query, description = "The provider's authorization code"),
        ("state" = Option<String>, Query, description = "The state /auth/login sent"),
        ("error" = Option<String>, Query, description = "The provider's refusal"),
        ("error_description" = Option<String>, Query, description = "The provider's words on it"),
    ),
    responses(
        (status = 303, description = "Signed in: to the page asked for, with the session cookie"),
        (status = 200, description = "A command line's sign-in: a page asking the person to confirm, whose link takes the one-time code to the command line's loopback address", content_type = "text/html", body = String),
    ))]
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
        // A command line's sign-in: the person confirms it before the code goes to the
        // loopback port. A link crafted by someone else on a shared machine (their own
        // port and challenge) would otherwise hand them the person's sign-in in one
        // click, silently when the provider remembers the person.
        Ok(Signed::Cli {
            location,
            port,
            name,
        }) => Ok(crate::signin::confirm_cli_page(&location, port, &name)),
        Ok(signed) => {
            let mut resp = StatusCode::SEE_OTHER.into_response();
            let h = resp.headers_mut();
            h.append(header::SET_COOKIE, clear_cookie(LOGIN_COOKIE));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            // The page the browser leaves must not pass the code on in `Referer`.
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            let location = match signed {
                Signed::Web { token, return_to } => {
                    h.append(
                        header::SET_COOKIE,
                        cookie(SESSION_COOKIE, &token, oidc.config.session),
                    );
                    return_to
                }
                Signed::Cli { location, .. } => location,
            };
            h.insert(
                header::LOCATION,
                HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/")),
            );
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

/// Who a sign-in credential was issued to, as its token record keeps it
/// (`TokenRecord::identity`): shown by `whoami`, and how `token list` tells sign-ins
/// from automation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignedIn {
    pub name: String,
    pub groups: Vec<String>,
    /// `web`, `cli` (loopback) or `device`.
    pub via: String,
    /// A device sign-in confirmed from a browser session ends no later than that
    /// session (RFC 3339): a credential cannot renew itself past the sign-in it came
    /// from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

impl SignedIn {
    pub fn parse(json: &str) -> Option<SignedIn> {
        serde_json::from_str(json).ok()
    }
}

/// A sign-in credential: a jitgate token that expires after the session lifetime.
pub(crate) struct Minted {
    pub id: String,
    pub token: String,
    pub expires: Timestamp,
}

/// Issues a sign-in credential to `principal` (audited as `token.create`).
pub(crate) async fn mint(
    state: &AppState,
    oidc: &Oidc,
    principal: &str,
    who: &SignedIn,
    source: &str,
    now: Timestamp,
) -> Result<Minted, String> {
    let (id, token, hash) = generate_token();
    let mut expires = now
        .checked_add(
            jiff::SignedDuration::try_from(oidc.config.session).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    if let Some(cap) = who
        .not_after
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
    {
        expires = expires.min(cap);
    }
    state
        .store
        .create_token(
            TokenRecord {
                id: id.clone(),
                principal: principal.to_owned(),
                secret_hash: hash,
                description: format!("sign-in ({}) of {}", who.via, who.name),
                created: now,
                expires: Some(expires),
                revoked: None,
                identity: Some(serde_json::to_string(who).map_err(|e| e.to_string())?),
                last_used: None,
            },
            AuditCtx {
                actor: principal.to_owned(),
                source: source.to_owned(),
                now,
            },
        )
        .await
        .map_err(|e| format!("the credential cannot be stored: {e}"))?;
    Ok(Minted { id, token, expires })
}

/// The verifier of tokens from the provider, at the controller's time: the
/// provider's keys, its issuer, `audience`, the asymmetric algorithms only.
fn verifier<'a>(
    d: &'a Discovered,
    audience: &str,
    now: Timestamp,
) -> IdTokenVerifier<'a, CoreJsonWebKey> {
    let at =
        chrono::DateTime::from_timestamp(now.as_second(), now.subsec_nanosecond().max(0) as u32)
            .unwrap_or_default();
    IdTokenVerifier::new_public_client(
        ClientId::new(audience.to_owned()),
        d.issuer.clone(),
        d.jwks.clone(),
    )
    .set_allowed_algs(ALLOWED_ALGS)
    .set_time_fn(move || at)
}

/// The claims of a verified token that name the person: display name and groups.
fn person(
    payload: &serde_json::Value,
    config: &OidcConfig,
    subject: &str,
) -> (String, Vec<String>) {
    let name = payload[&config.name_claim]
        .as_str()
        .or(payload["email"].as_str())
        .unwrap_or(subject)
        .chars()
        .take(256)
        .collect::<String>();
    let groups = match &payload[&config.groups_claim] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|g| g.as_str().map(|g| g.chars().take(256).collect()))
            .take(1000)
            .collect(),
        serde_json::Value::String(s) => vec![s.chars().take(256).collect()],
        _ => Vec::new(),
    };
    (name, groups)
}

/// The principal of the provider's subject: `<issuer>#<subject>`.
fn principal_of(issuer: &str, subject: &str) -> Result<String, String> {
    let principal = format!("{}#{subject}", issuer.trim_end_matches('/'));
    if principal.len() > 256
        || principal
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err("the provider's subject cannot name a jitgate principal (spaces, or over 256 characters with the issuer)".into());
    }
    Ok(principal)
}

/// The payload of a JWT whose signature was verified.
fn payload_of(jwt: &str) -> Result<serde_json::Value, String> {
    jwt.split('.')
        .nth(1)
        .and_then(|p| B64.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| "the token's payload cannot be read".to_owned())
}

/// The callback's checks, then the session or the command line's code; an error is
/// the refusal's reason (audited, shown to the person), never a code, token or secret.
async fn finish(
    state: &AppState,
    oidc: &Oidc,
    headers: &HeaderMap,
    q: CallbackQuery,
    now: Timestamp,
    source: &str,
) -> Result<Signed, String> {
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
    let d = oidc.discovered(false).await?;
    let http = oidc.http.clone();
    let fetch = move |r| call(http.clone(), r);
    let tokens = d
        .client
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
    let id = &oidc.config.client_id;
    let claims = match id_token.claims(&verifier(&d, id, now), &nonce) {
        Ok(c) => c.clone(),
        Err(first) => {
            // Keys rotated since they were fetched: fetch them again, once. (ID tokens
            // come only from the provider's token endpoint: nobody else can cause it.)
            let fresh = oidc.discovered(true).await?;
            id_token
                .claims(&verifier(&fresh, id, now), &nonce)
                .map_err(|_| format!("the ID token is not valid: {}", chain(&first)))?
                .clone()
        }
    };
    // The signature is verified: the payload's other claims are the provider's.
    let payload = payload_of(&id_token.to_string())?;
    let issuer = claims.issuer().as_str().trim_end_matches('/').to_owned();
    let subject = claims.subject().as_str().to_owned();
    let principal = principal_of(&issuer, &subject)?;
    let (name, groups) = person(&payload, &oidc.config, &subject);
    let via = if pending.c.is_some() { "cli" } else { "web" };
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
    let who = SignedIn {
        name: identity.name.clone(),
        groups: identity.groups.clone(),
        via: via.into(),
        not_after: None,
    };
    let mut details = serde_json::json!({
        "subject": identity.subject,
        "name": identity.name,
        "groups": identity.groups,
        "roles": roles,
        "via": via,
    });
    let signed = match &pending.c {
        None => {
            let m = mint(state, oidc, &identity.principal, &who, source, now).await?;
            details["session"] = m.id.clone().into();
            details["expires"] = m.expires.to_string().into();
            Signed::Web {
                token: m.token,
                return_to: pending.r.clone(),
            }
        }
        Some(cli) => {
            let code = crate::signin::one_time_code();
            let stored = state
                .store
                .start_signin(
                    SigninRecord {
                        id: crate::auth::sha256_hex(&code),
                        user_code: None,
                        challenge: Some(cli.c.clone()),
                        source: source.to_owned(),
                        status: SigninStatus::Approved {
                            principal: identity.principal.clone(),
                            identity: serde_json::to_string(&who).map_err(|e| e.to_string())?,
                        },
                        created: now,
                        expires: now + crate::signin::LOOPBACK_CODE_TTL,
                        polled: None,
                    },
                    crate::signin::MAX_OPEN,
                    crate::signin::MAX_PER_SOURCE,
                )
                .await
                .map_err(|e| format!("the sign-in cannot be stored: {e}"))?;
            if !stored {
                return Err("too many sign-ins are under way; try again in a few minutes".into());
            }
            let mut back = url::Url::parse(&format!("http://127.0.0.1:{}/callback", cli.p))
                .map_err(|e| e.to_string())?;
            back.query_pairs_mut()
                .append_pair("code", &code)
                .append_pair("state", &cli.s);
            Signed::Cli {
                location: back.to_string(),
                port: cli.p,
                name: identity.name.clone(),
            }
        }
    };
    state
        .store
        .append_audit(AuditEntry {
            time: now.to_string(),
            actor: identity.principal.clone(),
            source: source.to_owned(),
            action: "auth.signin".into(),
            target: identity.issuer.clone(),
            outcome: Outcome::Success,
            details: details.to_string(),
        })
        .await
        .map_err(|e| format!("the sign-in cannot be audited: {e}"))?;
    tracing::info!(principal = %identity.principal, via, "signed in");
    Ok(signed)
}

/// A caller who presented a token the provider issued for jitgate (automation with
/// workload identity: `Authorization: Bearer <JWT>`).
#[derive(Debug, Clone)]
pub struct ProviderCaller {
    pub principal: String,
    pub name: String,
    pub groups: Vec<String>,
    pub expires: Timestamp,
    /// Names the token in the audit log without being it: `jwt-` and the first 12 hex
    /// digits of its SHA-256.
    pub id: String,
}

/// Whether `token` has the shape of a JWS (three base64url parts, the first a JSON
/// header naming an algorithm): only those are sent to the provider's keys.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    B64.decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("alg").is_some())
}

impl Oidc {
    /// Verifies a bearer JWT from the provider as an ID token is verified (signature
    /// with the provider's keys, the asymmetric algorithms only, issuer, expiry), for
    /// jitgate's audience (`--oidc-audience`, by default the client id). A key id the
    /// controller lacks fetches the keys again, at most once a minute.
    pub async fn verify_bearer(&self, jwt: &str, now: Timestamp) -> Result<ProviderCaller, String> {
        let token: CoreIdToken = jwt.parse().map_err(|_| {
            "it is not a JWT with the claims of an OpenID token (iss, sub, aud, exp, iat)"
                .to_owned()
        })?;
        let types = ["JWT", "at+jwt"].map(|t| JsonWebTokenType::new(t.to_owned()).normalize());
        let types: Vec<_> = types.into_iter().filter_map(Result::ok).collect();
        let aud = &self.config.audience;
        let check = |d: &Discovered| {
            token
                .claims(
                    &verifier(d, aud, now).set_allowed_jose_types(types.clone()),
                    |_: Option<&Nonce>| Ok::<(), String>(()),
                )
                .cloned()
        };
        let d = self.discovered(false).await?;
        let claims = match check(&d) {
            Ok(c) => c,
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) if d.fetched.elapsed() >= self.config.key_refetch => {
                let fresh = self.discovered(true).await?;
                check(&fresh).map_err(|e| chain(&e))?
            }
            Err(e) => return Err(chain(&e)),
        };
        let payload = payload_of(jwt)?;
        let subject = claims.subject().as_str().to_owned();
        let principal = principal_of(claims.issuer().as_str(), &subject)?;
        let (name, groups) = person(&payload, &self.config, &subject);
        let exp = claims.expiration();
        Ok(ProviderCaller {
            principal,
            name,
            groups,
            expires: Timestamp::from_second(exp.timestamp()).map_err(|e| e.to_string())?,
            id: format!("jwt-{}", &crate::auth::sha256_hex(jwt)[..12]),
        })
    }

    /// The role assignments the configured mapping gives `groups`.
    pub fn mapped(&self, principal: &str, groups: &[String]) -> Vec<RoleAssignment> {
        let mut out: Vec<RoleAssignment> = Vec::new();
        for m in &self.config.roles {
            let a = RoleAssignment {
                principal: principal.to_owned(),
                role: m.role,
                scope: m.scope.clone(),
            };
            if groups.contains(&m.group) && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
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
    let wanted: Vec<(String, RoleAssignment)> = oidc
        .mapped(&who.principal, &who.groups)
        .into_iter()
        .map(|a| (mapped_id(&a.principal, a.role, &a.scope), a))
        .collect();
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

/// `POST /auth/logout`: ends a sign-in, on every replica. A browser's session (its
/// cookie; only from the controller's own pages, `Origin`) is revoked, its cookie
/// cleared, and the browser sent to `/`. A command line's sign-in credential
/// (`Authorization: Bearer`, what `jitgate logout` sends) is revoked and answered
/// `200 {"revoked": id}`; a token an administrator minted is not ended here (`jitgate
/// token revoke` is how).
#[utoipa::path(post, path = "/auth/logout", tag = "signin",
    responses(
        (status = 200, description = "The bearer sign-in credential was revoked", body = serde_json::Value),
        (status = 303, description = "The browser's session was revoked and its cookie cleared"),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    crate::auth::CallerIp(ip): crate::auth::CallerIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let oidc = state.oidc.clone().ok_or_else(not_configured)?;
    let now = state.clock.now();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|h| crate::auth::bearer(Some(h)))
        .transpose()?;
    if let Some(token) = bearer {
        let p = crate::auth::authenticate(&state, token, now).await?;
        if p.signed_in.is_none() || p.provider_token {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "NotASignIn",
                "this credential is not a sign-in's: revoke a token an administrator made with `jitgate token revoke`; a provider's token ends at its expiry",
            ));
        }
        signout(&state, &oidc, &p, ip, now).await?;
        return Ok(axum::Json(serde_json::json!({ "revoked": p.token_id })).into_response());
    }
    check_origin(&oidc, &headers)?;
    // A session that is no longer valid has nothing to end: its cookie is cleared all
    // the same.
    if let Some(token) = read_cookie(&headers, SESSION_COOKIE)
        && let Ok(p) = crate::auth::authenticate(&state, &token, now).await
    {
        signout(&state, &oidc, &p, ip, now).await?;
    }
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    resp.headers_mut()
        .insert(header::SET_COOKIE, clear_cookie(SESSION_COOKIE));
    Ok(resp)
}

/// Revokes a sign-in credential (`token.revoke`) and records `auth.signout`.
async fn signout(
    state: &AppState,
    oidc: &Oidc,
    p: &crate::auth::Principal,
    ip: std::net::IpAddr,
    now: Timestamp,
) -> Result<(), ApiError> {
    let audit = p.audit_ctx(ip, now);
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
    Ok(())
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
            audience: "jitgate".into(),
            scopes: vec!["openid".into()],
            name_claim: "name".into(),
            groups_claim: "groups".into(),
            roles: Vec::new(),
            public_url: url::Url::parse(public).unwrap(),
            session: Duration::from_secs(3600),
            idle: Duration::from_secs(3600),
            key_refetch: KEY_REFETCH,
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
            c: None,
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
