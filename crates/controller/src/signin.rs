//! The command line's sign-in (`jitgate login`), through the controller, which is the
//! identity provider's one client:
//!
//! - **Loopback** (RFC 8252): the command line listens on `127.0.0.1:<port>` and opens
//!   `/auth/login?cli_port=..&cli_state=..&cli_challenge=..` in the browser. After the
//!   provider, the callback sends the browser to `http://127.0.0.1:<port>/callback`
//!   with a one-time code (60 s) and the command line's `state`; the command line
//!   exchanges the code with its PKCE verifier at `POST /auth/token`. A process that
//!   sees the redirect cannot use the code without the verifier, and a code is taken
//!   once, used or not.
//! - **Device** (RFC 8628 style): `POST /auth/device` gives a device code (kept by the
//!   command line) and a user code the person confirms at `/auth/device` after signing
//!   in there; the page shows the address that asked, so a person sent a stranger's
//!   code can see it is not theirs. The command line asks `POST /auth/token` every
//!   `interval` seconds (202 until decided; faster is told to slow down).
//!
//! Either way the result is a sign-in credential: a jitgate token bound to the person,
//! expiring after the session lifetime (`--session-lifetime`), issued at the exchange.
//! Codes are stored as their SHA-256 only; sign-ins under way are in the store, so any
//! replica finishes what another began, and bounded in number.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jiff::SignedDuration;
use jitgate_proto::api::{DeviceStart, SigninGrant, SigninPending, SigninToken};
use jitgate_store::{SigninRecord, SigninStatus};
use rand::{Rng, RngCore};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::auth::{CallerIp, Principal, sha256_hex};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::oidc::{Oidc, SignedIn};

/// How long the loopback flow's code can be exchanged.
pub const LOOPBACK_CODE_TTL: SignedDuration = SignedDuration::from_secs(60);
/// How long a device sign-in waits for the person.
pub const DEVICE_CODE_TTL: SignedDuration = SignedDuration::from_secs(600);
/// How often the command line asks whether a device sign-in was confirmed (seconds).
pub const POLL_INTERVAL: u64 = 5;
/// At most this many sign-ins under way at once (the device flow starts without a
/// credential: nobody can fill the store through it).
pub const MAX_OPEN: usize = 1000;
/// At most this many device sign-ins under way from one address.
pub const MAX_PER_SOURCE: usize = 5;
/// User codes: consonants only (no vowels, so no words; no look-alikes such as 0/O).
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// 256 random bits, hex: a loopback code or a device code.
pub fn one_time_code() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// `XXXX-XXXX` from [`USER_CODE_ALPHABET`] (20^8, about 2.6 * 10^10).
fn user_code() -> String {
    let mut rng = rand::rng();
    let c: String = (0..8)
        .map(|_| USER_CODE_ALPHABET[rng.random_range(0..USER_CODE_ALPHABET.len())] as char)
        .collect();
    format!("{}-{}", &c[..4], &c[4..])
}

/// A user code as a person may type it (any case, with or without the dash and
/// spaces), written as stored; `None` when it cannot be one.
pub fn normalize_user_code(typed: &str) -> Option<String> {
    let c: String = typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (c.len() == 8 && c.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)))
        .then(|| format!("{}-{}", &c[..4], &c[4..]))
}

fn oidc_of(state: &AppState) -> Result<std::sync::Arc<Oidc>, ApiError> {
    state.oidc.clone().ok_or_else(|| {
        ApiError::not_found(
            "sign-in with an identity provider is not configured (serve --oidc-issuer)",
        )
    })
}

fn too_many_signins() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManySignins",
        format!(
            "too many device sign-ins are under way (at most {MAX_PER_SOURCE} from one address, {MAX_OPEN} in all); finish or let them expire (10 minutes)"
        ),
    )
}

/// `POST /auth/device`: begins a device sign-in.
#[utoipa::path(post, path = "/auth/device", tag = "signin",
    responses((status = 200, body = DeviceStart)))]
pub async fn device_start(
    State(state): State<AppState>,
    CallerIp(ip): CallerIp,
) -> Result<Json<DeviceStart>, ApiError> {
    let oidc = oidc_of(&state)?;
    let now = state.clock.now();
    let device_code = one_time_code();
    let code = user_code();
    let stored = state
        .store
        .start_signin(
            SigninRecord {
                id: sha256_hex(&device_code),
                user_code: Some(code.clone()),
                challenge: None,
                source: ip.to_string(),
                status: SigninStatus::Pending,
                created: now,
                expires: now + DEVICE_CODE_TTL,
                polled: None,
            },
            MAX_OPEN,
            MAX_PER_SOURCE,
        )
        .await?;
    if !stored {
        return Err(too_many_signins());
    }
    let page = format!("{}/auth/device", oidc.config.origin());
    Ok(Json(DeviceStart {
        device_code,
        verification_uri_complete: format!("{page}?code={code}"),
        verification_uri: page,
        user_code: code,
        expires_in: DEVICE_CODE_TTL.as_secs().unsigned_abs(),
        interval: POLL_INTERVAL,
    }))
}

/// A refusal of the exchange: 400 with its reason, audited as `auth.signin` by the
/// refused-call layer.
fn refused(code: &'static str, message: impl Into<String>) -> Response {
    let mut resp = ApiError::new(StatusCode::BAD_REQUEST, code, message)
        .with_target("signin")
        .into_response();
    resp.extensions_mut()
        .insert(crate::auth::AuditAs("auth.signin"));
    resp
}

/// `POST /auth/token`: the command line's code for its credential.
#[utoipa::path(post, path = "/auth/token", tag = "signin", request_body = SigninGrant,
    responses(
        (status = 200, description = "The sign-in credential", body = SigninToken),
        (status = 202, description = "Not decided yet: ask again after `interval` seconds", body = SigninPending),
    ))]
pub async fn token(
    State(state): State<AppState>,
    CallerIp(ip): CallerIp,
    JsonBody(grant): JsonBody<SigninGrant>,
) -> Result<Response, ApiError> {
    let oidc = oidc_of(&state)?;
    let now = state.clock.now();
    let (code, verifier) = match &grant {
        SigninGrant::Loopback {
            code,
            code_verifier,
        } => (code, Some(code_verifier)),
        SigninGrant::Device { device_code } => (device_code, None),
    };
    let field = if verifier.is_some() {
        "code"
    } else {
        "deviceCode"
    };
    if code.len() != 64 || !code.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_param(field, "must be 64 hexadecimal digits"));
    }
    let Some(s) = state.store.take_signin(&sha256_hex(code), now).await? else {
        return Ok(refused(
            "InvalidGrant",
            "this code is unknown or was used already; sign in again",
        ));
    };
    // A loopback code is exchanged with the verifier of its challenge; a device code
    // cannot be presented as one, nor the other way round.
    match (verifier, &s.challenge) {
        (Some(v), Some(challenge)) => {
            let computed = B64.encode(Sha256::digest(v.as_bytes()));
            if !bool::from(computed.as_bytes().ct_eq(challenge.as_bytes())) {
                return Ok(refused(
                    "InvalidGrant",
                    "the code verifier does not match the challenge this sign-in began with",
                ));
            }
        }
        (None, None) => {}
        _ => {
            return Ok(refused("InvalidGrant", "this code is not one of that kind"));
        }
    }
    if s.expires <= now {
        return Ok(refused(
            "ExpiredToken",
            "the sign-in was not finished in time; sign in again",
        ));
    }
    let (principal, identity) = match s.status {
        SigninStatus::Pending => {
            // Asked again sooner than the interval (a second's grace for the clock):
            // slow down, as RFC 8628 says, by 5 seconds.
            let too_soon = s.polled.is_some_and(|p| {
                now.duration_since(p) < SignedDuration::from_secs(POLL_INTERVAL as i64 - 1)
            });
            let (status, interval) = if too_soon {
                ("slowDown", POLL_INTERVAL + 5)
            } else {
                ("authorizationPending", POLL_INTERVAL)
            };
            return Ok((
                StatusCode::ACCEPTED,
                Json(SigninPending {
                    status: status.into(),
                    interval,
                }),
            )
                .into_response());
        }
        SigninStatus::Denied { principal } => {
            return Ok(refused(
                "AccessDenied",
                format!("{principal} refused this sign-in at the controller's page"),
            ));
        }
        SigninStatus::Approved {
            principal,
            identity,
        } => (principal, identity),
    };
    let mut who = SignedIn::parse(&identity)
        .ok_or_else(|| ApiError::internal("a sign-in's identity cannot be read"))?;
    if verifier.is_none() {
        who.via = "device".into();
    }
    let m = crate::oidc::mint(&state, &oidc, &principal, &who, &ip.to_string(), now)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(SigninToken {
        token: m.token,
        token_id: m.id,
        principal,
        name: who.name,
        groups: who.groups,
        expires_at: m.expires.to_string(),
    })
    .into_response())
}

#[derive(Deserialize)]
pub struct DeviceQuery {
    code: Option<String>,
}

/// Text for HTML.
fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

/// A small page of the controller's own (no script, nothing from elsewhere).
fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} - jitgate</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem}}\
         code{{font-size:1.6rem;letter-spacing:.1em}}button{{font-size:1rem;padding:.5rem 1.2rem;margin-right:1rem}}</style>\
         </head><body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    );
    let mut resp = Html(html).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Never framed (clickjacking of the confirm button), no script at all.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// The page that asks a person to confirm a command line's sign-in before its one-time
/// code goes to the loopback address (`Continue` is a plain link to it).
pub fn confirm_cli_page(location: &str, port: u16, name: &str) -> Response {
    let mut resp = page(
        "Sign in the command line?",
        &format!(
            "<p>A command line on this computer (listening on port {port}) asks to act as you, \
             <b>{name}</b>, until its credential expires.</p>\
             <p>Continue only if you ran <code>jitgate login</code> yourself just now.</p>\
             <p><a href=\"{href}\"><button>Continue</button></a> <a href=\"/\">Cancel</a></p>",
            name = esc(name),
            href = esc(location),
        ),
    );
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax",
        crate::oidc::LOGIN_COOKIE
    )) {
        h.append(header::SET_COOKIE, v);
    }
    // The code in the link must not leave in a `Referer`.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /auth/device`: the page where a person confirms a device sign-in, after
/// signing in here (a browser without a session is sent to `/auth/login` first).
#[utoipa::path(get, path = "/auth/device", tag = "signin",
    params(("code" = Option<String>, Query, description = "The user code (XXXX-XXXX)")),
    responses(
        (status = 200, description = "The page where a signed-in person confirms the code", content_type = "text/html", body = String),
        (status = 303, description = "Not signed in: to /auth/login first"),
    ))]
pub async fn device_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DeviceQuery>,
) -> Result<Response, ApiError> {
    let _ = oidc_of(&state)?;
    let now = state.clock.now();
    let code = match q.code.as_deref() {
        None => None,
        Some(c) => Some(normalize_user_code(c).ok_or_else(|| {
            ApiError::bad_param(
                "code",
                "must be the 8 letters the command line shows, as XXXX-XXXX",
            )
        })?),
    };
    let session = crate::oidc::read_cookie(&headers, crate::oidc::SESSION_COOKIE);
    let me = match session {
        Some(t) => crate::auth::authenticate(&state, &t, now).await.ok(),
        None => None,
    };
    let Some(me) = me.filter(|p| p.signed_in.is_some()) else {
        let back = match &code {
            Some(c) => format!("/auth/device?code={c}"),
            None => "/auth/device".into(),
        };
        let mut to = url::Url::parse("http://x/auth/login").map_err(ApiError::internal)?;
        to.query_pairs_mut().append_pair("return_to", &back);
        let location = format!("/auth/login?{}", to.query().unwrap_or_default());
        let mut resp = StatusCode::SEE_OTHER.into_response();
        resp.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&location).map_err(ApiError::internal)?,
        );
        return Ok(resp);
    };
    let Some(code) = code else {
        return Ok(page(
            "Sign in a command line",
            "<form method=\"get\" action=\"/auth/device\"><p>Type the code your terminal shows \
             (<code>jitgate login --device</code>):</p><p><input name=\"code\" autocomplete=\"off\" \
             autofocus placeholder=\"XXXX-XXXX\"> <button>Continue</button></p></form>",
        ));
    };
    let Some(s) = state.store.signin_by_user_code(&code, now).await? else {
        return Ok(page(
            "No such sign-in",
            &format!(
                "<p>No sign-in is waiting for the code <code>{}</code>: it expired (after 10 minutes), \
                 was decided already, or was mistyped. Run <code>jitgate login --device</code> again.</p>",
                esc(&code)
            ),
        ));
    };
    if s.status != SigninStatus::Pending {
        return Ok(page(
            "Already decided",
            "<p>This sign-in was decided already. Return to your terminal.</p>",
        ));
    }
    let name = me
        .signed_in
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    Ok(page(
        "Sign in a command line?",
        &format!(
            "<p>A command line at <b>{src}</b> asks to act as you, <b>{name}</b> ({principal}), \
             until its credential expires.</p><p>Code: <code>{code}</code></p>\
             <p>Approve only if you ran <code>jitgate login --device</code> yourself and your \
             terminal shows this same code.</p>\
             <form method=\"post\" action=\"/auth/device/decide\">\
             <input type=\"hidden\" name=\"code\" value=\"{code}\">\
             <button name=\"decision\" value=\"approve\">Approve</button>\
             <button name=\"decision\" value=\"deny\">Deny</button></form>",
            src = esc(&s.source),
            name = esc(&name),
            principal = esc(&me.name),
            code = esc(&code),
        ),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct Decision {
    code: String,
    decision: String,
}

/// `POST /auth/device/decide` (a form of the page above, with the browser's session;
/// the authentication layer has checked its `Origin`): approves or denies. Only a
/// person signed in with the identity provider can: a token an administrator made
/// cannot turn itself into sign-in credentials.
#[utoipa::path(post, path = "/auth/device/decide", tag = "signin",
    request_body(content = Decision, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Decided", content_type = "text/html", body = String)))]
pub async fn device_decide(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    axum::Form(d): axum::Form<Decision>,
) -> Result<Response, ApiError> {
    let _ = oidc_of(&state)?;
    // A browser's session only: a command line's credential (or a token the provider
    // issued) approving a device would renew itself without the provider.
    let Some(mut me) = principal
        .signed_in
        .clone()
        .filter(|s| !principal.provider_token && s.via == "web")
    else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "NotASignIn",
            "only a person signed in at this controller's page can confirm a device sign-in",
        ));
    };
    // The device's credential ends no later than the session that confirmed it.
    me.not_after = principal.expires.map(|e| e.to_string());
    let code = normalize_user_code(&d.code)
        .ok_or_else(|| ApiError::bad_param("code", "must be a code as XXXX-XXXX"))?;
    let decision = match d.decision.as_str() {
        "approve" => SigninStatus::Approved {
            principal: principal.name.clone(),
            identity: serde_json::to_string(&me).map_err(ApiError::internal)?,
        },
        "deny" => SigninStatus::Denied {
            principal: principal.name.clone(),
        },
        _ => return Err(ApiError::bad_param("decision", "must be approve or deny")),
    };
    let approve = matches!(decision, SigninStatus::Approved { .. });
    let now = state.clock.now();
    if !state
        .store
        .decide_signin(&code, decision, principal.audit_ctx(ip, now))
        .await?
    {
        return Err(ApiError::not_found(format!(
            "no sign-in is waiting for the code {code} (expired, decided already, or mistyped)"
        )));
    }
    Ok(if approve {
        page(
            "Approved",
            "<p>The command line is signed in as you. Return to your terminal.</p>",
        )
    } else {
        page("Denied", "<p>The command line was refused.</p>")
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn user_codes_are_typed_loosely_and_stored_one_way() {
        let c = user_code();
        assert_eq!(normalize_user_code(&c).unwrap(), c);
        assert_eq!(normalize_user_code("bcdf ghjk").unwrap(), "BCDF-GHJK");
        assert_eq!(normalize_user_code("BCDFGHJK").unwrap(), "BCDF-GHJK");
        for bad in [
            "BCDF-GHJ",
            "BCDF-GHJKL",
            "ABCD-EFGH",
            "BCDF-GHJ0",
            "<scrip>",
        ] {
            assert_eq!(normalize_user_code(bad), None, "{bad}");
        }
    }

    #[test]
    fn pages_escape_what_they_show() {
        assert_eq!(esc("<b a=\"1\">&'"), "&lt;b a=&quot;1&quot;&gt;&amp;&#39;");
    }
}
