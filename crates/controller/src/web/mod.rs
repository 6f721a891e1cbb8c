//! The dashboard: server-rendered HTML at `/` and under `/ui/`, a client of the
//! controller's own API.
//!
//! Every page reads, and every form changes, through the same HTTP API a script would
//! call, in process ([`Api::call`]): the dashboard can do exactly what its user's
//! credential allows there, with the same validation, RBAC and audit, and nothing of
//! its own decides. Pages are askama templates, checked at compile time and escaping
//! every value (VM names, justifications and rule names are the attackers' text).
//!
//! A browser is signed in by a cookie holding its credential: the identity provider's
//! session (`/auth/login`), or a token pasted on the sign-in page where no provider is
//! configured. The cookie is `HttpOnly` and `SameSite=Lax` (`Secure` and
//! `__Host-` over HTTPS). Every form carries a CSRF token derived from the cookie
//! (HMAC-SHA-256 keyed with it), and a change is also refused when its `Origin` is
//! another site's. Pages are sent with a strict Content-Security-Policy: scripts and
//! styles only from `/ui/assets/`, no inline script, no framing.

mod pages;
mod render;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use jitgate_core::net::canonical_addr;
use sha2::Sha256;
use tower::ServiceExt;

use crate::AppState;
use crate::auth::Principal;

/// The cookie a browser's credential lives in over HTTPS (`__Host-`: only from this
/// exact origin, `Secure`, path `/`). Shared with the identity provider's sign-in.
pub const SECURE_COOKIE: &str = crate::oidc::SESSION_COOKIE;
/// The cookie over plain HTTP (allowed only on loopback or with `--insecure-http`),
/// where browsers refuse `Secure` and `__Host-`.
pub const PLAIN_COOKIE: &str = "jitgate_session";

/// The in-process API the dashboard calls: every route, without the authentication
/// layer (the dashboard has authenticated the caller and passes its principal).
#[derive(Clone, Default)]
pub struct Api(Arc<OnceLock<Router>>);

impl Api {
    pub(crate) fn set(&self, router: Router) {
        let _ = self.0.set(router);
    }

    /// Calls the API as `who` from `ip`: the status and the body.
    pub(crate) async fn call(
        &self,
        who: &Principal,
        ip: IpAddr,
        method: Method,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> Result<
        (
            StatusCode,
            axum::body::Bytes,
            Option<crate::error::ErrorInfo>,
        ),
        String,
    > {
        let router = self.0.get().ok_or("the API is not ready")?.clone();
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let mut req = req.body(body).map_err(|e| e.to_string())?;
        req.extensions_mut().insert(who.clone());
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(ip, 0)));
        let resp = router.oneshot(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let info = resp.extensions().get::<crate::error::ErrorInfo>().cloned();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, bytes, info))
    }
}

/// The dashboard's routes (public to the authentication layer: each page
/// authenticates its own caller and sends a browser without a session to sign in).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::home))
        .route("/ui/signin", get(pages::signin_page).post(pages::signin))
        .route("/ui/signout", post(pages::signout))
        .route("/ui/live", get(pages::live))
        .route("/ui/assets/{file}", get(asset))
        .route("/ui/vms/{rg}/{name}", get(pages::vm_page))
        .route("/ui/vms/{rg}/{name}/activity.csv", get(pages::activity_csv))
        .route(
            "/ui/vms/{rg}/{name}/edit",
            get(pages::edit_page).post(pages::edit),
        )
        .route(
            "/ui/vms/{rg}/{name}/remove",
            get(pages::remove_page).post(pages::remove),
        )
        .route("/ui/enable", get(pages::enable_page).post(pages::enable))
        .route("/ui/request", get(pages::request_page).post(pages::request))
        .route("/ui/requests/{id}/{action}", post(pages::decide))
        .route("/ui/access", get(pages::access_page).post(pages::access))
        .route(
            "/ui/machines",
            get(pages::machines_page).post(pages::machines),
        )
}

/// Whether a path is the dashboard's (the authentication layer lets it through).
pub fn is_dashboard(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

/// Where the browser's credential lives on this controller.
fn cookie_name(state: &AppState) -> &'static str {
    if secure(state) {
        SECURE_COOKIE
    } else {
        PLAIN_COOKIE
    }
}

/// Browsers reach this controller over HTTPS: it serves TLS, or its identity
/// provider's public URL (behind a proxy that terminates TLS) is `https://`.
fn secure(state: &AppState) -> bool {
    state.tls || state.oidc.is_some()
}

/// The sign-in page, coming back to `back`.
fn signin_href(back: &str) -> String {
    format!("/ui/signin?return_to={}", render::url_component(back))
}

/// A `Set-Cookie` value for the browser's credential (a session cookie: it ends with
/// the browser unless the provider's sign-in set a lifetime).
fn session_cookie(state: &AppState, token: &str) -> HeaderValue {
    let secure = if secure(state) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Lax{secure}",
        cookie_name(state)
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_session_cookie(state: &AppState) -> HeaderValue {
    let secure = if secure(state) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}",
        cookie_name(state)
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The CSRF token of a session: HMAC-SHA-256 keyed with the session's credential, so
/// only a page that could read the `HttpOnly` cookie's value (the controller's own)
/// knows it, and it needs no state on any replica.
fn csrf_token(session: &str) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(session.as_bytes()) else {
        return String::new();
    };
    mac.update(b"jitgate dashboard csrf v1");
    hex::encode(mac.finalize().into_bytes())
}

/// A signed-in browser: who, from where, and its session's CSRF token.
#[derive(Clone)]
pub(crate) struct Session {
    pub who: Principal,
    pub ip: IpAddr,
    pub csrf: String,
}

/// Why a page cannot be shown to this browser.
pub(crate) enum Refused {
    /// No session: to the sign-in page, then back.
    SignIn(String),
    /// A session cookie that is not (or no longer) valid: 401, counted and audited
    /// like any refused credential, the cookie cleared.
    Ended { back: String, clear: HeaderValue },
    /// Too many refused credentials from this address: the API's own answer.
    TooMany(Box<Response>),
    /// A change that is not from the controller's own page.
    Forged(&'static str),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::SignIn(back) => {
                let mut resp = StatusCode::SEE_OTHER.into_response();
                if let Ok(v) = HeaderValue::from_str(&signin_href(&back)) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                resp
            }
            Refused::Ended { back, clear } => {
                let to = signin_href(&back);
                let html = format!(
                    "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
                     <title>Signed out · jitgate</title>\
                     <link rel=\"stylesheet\" href=\"/ui/assets/app.css\"></head>\
                     <body><main id=\"main\" class=\"narrow\"><h1>Your session has ended</h1>\
                     <p>It expired, was revoked, or was not valid.</p>\
                     <p><a class=\"button primary\" href=\"{to}\">Sign in again</a></p>\
                     </main></body></html>"
                );
                let mut resp =
                    (StatusCode::UNAUTHORIZED, axum::response::Html(html)).into_response();
                resp.headers_mut().insert(header::SET_COOKIE, clear);
                resp.extensions_mut().insert(crate::error::ErrorInfo {
                    code: "AuthenticationFailed",
                    message: "the browser's session is not valid".into(),
                    target: Some("session".into()),
                });
                secure_headers(&mut resp);
                resp
            }
            Refused::TooMany(resp) => *resp,
            Refused::Forged(why) => crate::error::ApiError::new(
                StatusCode::FORBIDDEN,
                "CrossSiteRefused",
                format!("the form was refused: {why}; reload the page and try again"),
            )
            .into_response(),
        }
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Refused;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let back = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|_| parts.method == Method::GET)
            .unwrap_or_else(|| "/".to_owned());
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| canonical_addr(c.0.ip()))
            .ok_or_else(|| Refused::SignIn(back.clone()))?;
        let token = crate::oidc::read_cookie(&parts.headers, cookie_name(state))
            .ok_or_else(|| Refused::SignIn(back.clone()))?;
        let safe = matches!(parts.method, Method::GET | Method::HEAD);
        if !safe {
            same_origin(state, &parts.headers).map_err(Refused::Forged)?;
        }
        // A wrong or ended credential counts as a refusal (the audit layer sees the
        // 401); past the limit, the address is told to slow down.
        let who = match crate::auth::authenticate(state, &token, state.clock.now()).await {
            Ok(who) => who,
            Err(_) if state.refusals.blocked(ip, std::time::Instant::now()) => {
                return Err(Refused::TooMany(Box::new(crate::auth::too_many(state))));
            }
            Err(_) => {
                return Err(Refused::Ended {
                    back,
                    clear: clear_session_cookie(state),
                });
            }
        };
        Ok(Session {
            who,
            ip,
            csrf: csrf_token(&token),
        })
    }
}

/// A change must come from this controller's own pages: an `Origin` naming another
/// site is refused (browsers send it with every POST).
fn same_origin(state: &AppState, headers: &HeaderMap) -> Result<(), &'static str> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Browsers send Origin with every form POST; a client that does not is no
        // browser, and the CSRF token still has to match.
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| "its Origin is not readable")?;
    // Behind a proxy that terminates TLS the browser's origin is https:// while this
    // controller serves plain HTTP: the same host under either scheme is ours there.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let proxied = !state.trusted_proxies.is_empty()
        && !host.is_empty()
        && (origin == format!("https://{host}") || origin == format!("http://{host}"));
    let ours = match &state.oidc {
        Some(oidc) => oidc.config.origin() == origin,
        None => false,
    } || origin == crate::base_url(state, headers)
        || proxied;
    if ours {
        Ok(())
    } else {
        Err("it came from another site")
    }
}

impl Session {
    /// Checks a form's CSRF token (constant time).
    pub(crate) fn check_csrf(&self, presented: &str) -> Result<(), Refused> {
        use subtle::ConstantTimeEq;
        if !self.csrf.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes())) {
            Ok(())
        } else {
            Err(Refused::Forged("its CSRF token is missing or wrong"))
        }
    }
}

/// The headers of every dashboard answer: a strict Content-Security-Policy, no
/// framing, no sniffing, no caching of pages that show a person's access, no
/// `Referer` to elsewhere.
pub(crate) fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// The stylesheet and the script, embedded in the binary (no CDN, no build step).
const ASSETS: [(&str, &str, &str); 2] = [
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/app.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/app.js"),
    ),
];

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let Some((_, mime, body)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut resp = (*body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    secure_headers(&mut resp);
    resp
}

/// The state the dashboard's handlers see.
pub(crate) type St = State<AppState>;
