//! The service itself: health, metrics, the OpenAPI document, and who the caller is.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use jitgate_proto::api::{Health, RoleAt, WhoAmI};

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::error::ApiResult;

/// Readiness: whether the controller and its database answer (503 while the database
/// is unreachable, for example during a failover). A load balancer sends calls only
/// to replicas that are ready. No token needed.
#[utoipa::path(get, path = "/api/v1/health", tag = "service",
    responses((status = 200, description = "The store answers", body = Health)))]
pub async fn health(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state.store.subscriptions().await?;
    Ok(Json(Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }))
}

/// Liveness: the process answers, whatever its database does (restart it only when
/// this fails; a database outage is not cured by restarting controllers). No token
/// needed.
#[utoipa::path(get, path = "/api/v1/health/live", tag = "service",
    responses((status = 200, description = "The process answers", body = Health)))]
pub async fn live() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// Prometheus metrics (OpenMetrics text). No token needed.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "OpenMetrics text",
        content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.observe_write_queue(state.store.write_queue());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// This document. No token needed.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document of both APIs",
        content_type = "application/json", body = Object)))]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::json(),
    )
        .into_response()
}

/// The caller: principal, token, roles, and the address the controller sees.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "service",
    responses((status = 200, body = WhoAmI)))]
pub async fn whoami(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
) -> Json<WhoAmI> {
    Json(WhoAmI {
        roles: principal
            .assignments
            .iter()
            .map(|a| RoleAt {
                role: a.role.as_str().to_owned(),
                scope: a.scope.to_string(),
            })
            .collect(),
        credential: match (&principal.signed_in, principal.provider_token) {
            (_, true) => "providerToken",
            (Some(_), false) => "signIn",
            (None, false) if principal.name.starts_with("agent:") => "agent",
            (None, false) => "automation",
        }
        .into(),
        name: principal.signed_in.as_ref().map(|s| s.name.clone()),
        groups: principal.signed_in.map(|s| s.groups).unwrap_or_default(),
        expires_at: principal.expires.map(|e| e.to_string()),
        principal: principal.name,
        token_id: principal.token_id,
        subscription: state.default_subscription().to_string(),
        caller_ip: ip.to_string(),
    })
}
