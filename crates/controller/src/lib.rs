//! The jitgate controller: the Azure-compatible JIT API, the native API, bearer-token
//! authentication, RBAC enforcement, failure auditing and the expiry scheduler, over
//! any [`jitgate_store::Store`].
//!
//! Handlers are thin: they parse and authorize, then call one store operation, which
//! runs the core's decision inside its transaction. Nothing here decides policy.

pub mod agent;
pub mod auth;
pub mod authcache;
pub mod azure;
pub mod body;
pub mod checkpoint;
pub mod clock;
pub mod desired;
pub mod error;
pub mod expiry;
pub mod feed;
pub mod install;
pub mod limits;
pub mod metrics;
pub mod native;
pub mod oidc;
pub mod openapi;
pub mod params;
pub mod proxy;
pub mod recommend;
mod server;
pub mod signin;
pub mod tls;
pub mod web;
pub mod webhooks;

pub use server::{
    BOOTSTRAP_TOKEN_FILE, Config, DB_FILE, DEFAULT_BLOCKED_RETENTION, Running, TlsFiles,
    migrate_to_postgres, recover, start,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::middleware;
use jitgate_core::ids::SubscriptionId;
use jitgate_store::Store;
use tokio::sync::Notify;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// The time, for every decision and wait that depends on it (a test clock in
    /// tests).
    pub clock: clock::Clock,
    pub subscriptions: Arc<Vec<SubscriptionId>>,
    pub metrics: Arc<metrics::Metrics>,
    /// Wakes the expiry scheduler (a new earliest end time may exist).
    pub expiry_wake: Arc<Notify>,
    /// When the expiry scheduler will next wake (Unix nanoseconds, on `clock`): an
    /// initiate wakes it only when it ends earlier.
    pub expiry_at: Arc<AtomicI64>,
    /// Per-VM change notifications that wake agents' long-polls.
    pub vm_changes: Arc<desired::VmChanges>,
    pub tls: bool,
    /// The SHA-256 fingerprint clients pin (the controller's own CA, or the top of a
    /// given chain); carried by enrollment tokens.
    pub tls_pin: Option<jitgate_proto::tls::Fingerprint>,
    /// The certificate served (its public key is what install lines pin).
    pub tls_cert: Option<std::path::PathBuf>,
    /// The binary served to machines as the agent (`/download/...`, `/install.sh`).
    pub agent_binary: Option<Arc<install::AgentBinary>>,
    pub recommend: Arc<jitgate_core::recommend::RecommendConfig>,
    /// Signs and ships audit checkpoints; its file anchors `audit verify`.
    pub checkpoints: Arc<checkpoint::Checkpointer>,
    /// Refused calls per source (audit burst, 429 past the block threshold).
    pub refusals: Arc<limits::RefusalLimiter>,
    /// Recently authenticated tokens (no store read on the hot path); invalidated by
    /// every token or role change.
    pub auth_cache: Arc<authcache::AuthCache>,
    /// Proxies whose `X-Forwarded-For` names the caller (`proxy`).
    pub trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    /// Sign-in with the organisation's OpenID Provider, when configured.
    pub oidc: Option<Arc<oidc::Oidc>>,
    /// How long break-glass access lasts at most (seconds).
    pub break_glass_max: i64,
    /// URL prefixes webhooks may reach even on private or loopback addresses.
    pub webhook_allow: Arc<Vec<String>>,
    /// The first retry of a failed webhook delivery.
    pub webhook_retry: std::time::Duration,
    /// The API as the dashboard calls it, in process (set by [`router`]).
    pub web_api: web::Api,
}

impl AppState {
    pub fn default_subscription(&self) -> SubscriptionId {
        self.subscriptions[0]
    }

    /// After a write that may have revoked `revoked` ports.
    pub fn changed(&self, revoked: usize) {
        self.metrics.revoked.inc_by(revoked as u64);
    }

    /// After an accepted request whose earliest port ends at `first_end`.
    pub fn initiated(&self, first_end: jitgate_core::Timestamp) {
        self.metrics.initiates.inc();
        if (first_end.as_nanosecond() as i64) < self.expiry_at.load(Ordering::Acquire) {
            self.expiry_wake.notify_one();
        }
    }
}

/// `scheme://host` as the caller addressed us, for `nextLink`.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("{}://{host}", if state.tls { "https" } else { "http" })
}

/// Azure treats path segments such as `resourceGroups` case-insensitively; route on
/// one spelling.
fn canonical_path(path: &str) -> Option<String> {
    if !path
        .get(..15)
        .is_some_and(|p| p.eq_ignore_ascii_case("/subscriptions/"))
    {
        return None;
    }
    const FIXED: [&str; 6] = [
        "subscriptions",
        "resourceGroups",
        "providers",
        "Microsoft.Security",
        "locations",
        "jitNetworkAccessPolicies",
    ];
    let mut changed = false;
    let out: Vec<String> = path
        .split('/')
        .map(
            |seg| match FIXED.iter().find(|f| f.eq_ignore_ascii_case(seg)) {
                Some(f) if *f != seg => {
                    changed = true;
                    (*f).to_owned()
                }
                _ => seg.to_owned(),
            },
        )
        .collect();
    changed.then(|| out.join("/"))
}

async fn normalize(mut req: Request, next: middleware::Next) -> axum::response::Response {
    if let Some(p) = canonical_path(req.uri().path()) {
        let pq = match req.uri().query() {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        if let Ok(uri) = pq.parse() {
            *req.uri_mut() = uri;
        }
    }
    next.run(req).await
}

async fn count(
    state: axum::extract::State<AppState>,
    req: Request,
    next: middleware::Next,
) -> axum::response::Response {
    state.metrics.http_requests.inc();
    next.run(req).await
}

async fn not_found() -> error::ApiError {
    error::ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "NotFound",
        "no such API path; see /api/v1/openapi.json",
    )
}

/// Every route of both APIs, with the OpenAPI description of each.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(azure::list_subscription))
        .routes(routes!(azure::list_region))
        .routes(routes!(azure::list_resource_group))
        .routes(routes!(azure::list_resource_group_region))
        .routes(routes!(azure::get, azure::put, azure::delete))
        .routes(routes!(azure::initiate))
        .merge(native::routes())
        .merge(agent::routes())
        .merge(recommend::routes())
        .merge(auth_routes())
}

/// Sign-in with the identity provider: browsers and the command line.
fn auth_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(oidc::login))
        .routes(routes!(oidc::callback))
        .routes(routes!(oidc::logout))
        .routes(routes!(signin::token))
        .routes(routes!(signin::device_page, signin::device_start))
        .routes(routes!(signin::device_decide))
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let (routes, _) = api_router().split_for_parts();
    // The dashboard calls every route as the person it signed in, past the
    // authentication layer (it authenticated them itself).
    state
        .web_api
        .set(routes.clone().fallback(not_found).with_state(state.clone()));
    let api = routes
        .merge(web::routes())
        .route(install::SCRIPT_PATH, axum::routing::get(install::script))
        .route(
            &install::binary_path(),
            axum::routing::get(install::download),
        )
        .route(
            &format!("{}.sha256", install::binary_path()),
            axum::routing::get(install::checksum),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::auth_layer,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::audit_failures,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            proxy::client_address,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state);
    // Path normalization must run before routing, so it wraps the router.
    Router::new()
        .fallback_service(api)
        .layer(middleware::from_fn(normalize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FIXED: [&str; 6] = [
        "subscriptions",
        "resourceGroups",
        "providers",
        "Microsoft.Security",
        "locations",
        "jitNetworkAccessPolicies",
    ];

    #[test]
    fn fixed_segments_take_one_spelling() {
        assert_eq!(
            canonical_path("/SUBSCRIPTIONS/x/RESOURCEGROUPS/Rg/Providers/microsoft.security/x")
                .as_deref(),
            Some("/subscriptions/x/resourceGroups/Rg/providers/Microsoft.Security/x")
        );
        assert_eq!(canonical_path("/subscriptions/x/resourceGroups/rg"), None);
        assert_eq!(canonical_path("/api/v1/Subscriptions"), None);
        assert_eq!(canonical_path("/subscription\u{e9}/x"), None);
    }

    /// A fixed segment in a random case.
    fn fixed_segment() -> impl Strategy<Value = String> {
        (
            prop::sample::select(FIXED.to_vec()),
            prop::collection::vec(any::<bool>(), 32),
        )
            .prop_map(|(f, upper)| {
                f.chars()
                    .zip(upper)
                    .map(|(c, u)| {
                        if u {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect()
            })
    }

    fn arb_path() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            2 => fixed_segment(),
            2 => "[a-zA-Z0-9._()-]{0,12}",
            1 => "\\PC{0,12}",
        ];
        prop_oneof![
            4 => (fixed_segment(), prop::collection::vec(segment, 0..10))
                .prop_map(|(first, rest)| format!("/{first}/{}", rest.join("/"))),
            1 => any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Never panics; idempotent; only fixed segments change, and only their case;
        /// only paths under /subscriptions/ are touched.
        #[test]
        fn canonical_path_only_fixes_the_case_of_fixed_segments(path in arb_path()) {
            let out = canonical_path(&path);
            if !path.get(..15).is_some_and(|p| p.eq_ignore_ascii_case("/subscriptions/")) {
                prop_assert_eq!(out, None);
                return Ok(());
            }
            let canonical = out.clone().unwrap_or_else(|| path.clone());
            prop_assert_eq!(canonical_path(&canonical), None, "not idempotent: {}", canonical);
            let before: Vec<&str> = path.split('/').collect();
            let after: Vec<&str> = canonical.split('/').collect();
            prop_assert_eq!(before.len(), after.len());
            for (b, a) in before.iter().zip(&after) {
                match FIXED.iter().find(|f| f.eq_ignore_ascii_case(b)) {
                    Some(f) => prop_assert_eq!(a, f),
                    None => prop_assert_eq!(a, b),
                }
            }
            prop_assert_eq!(out.is_some(), canonical != path);
        }
    }
}
