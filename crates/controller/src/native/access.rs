//! Who may do what: bearer tokens and role assignments.

use std::collections::HashSet;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jitgate_core::Timestamp;
use jitgate_core::duration::parse_iso8601_secs;
use jitgate_core::ids::VmId;
use jitgate_core::rbac::{Action, Role, RoleAssignment};
use jitgate_proto::api::{
    CreateRoleAssignment, CreateToken, CreatedToken, RoleAssignmentPage, Token, TokenPage,
};
use jitgate_store::{Paging, RoleAssignmentRecord, TokenRecord};

use crate::AppState;
use crate::auth::{CallerIp, Principal, generate_token};
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::params::{self, Q};

fn token_wire(t: &TokenRecord) -> Token {
    Token {
        id: t.id.clone(),
        principal: t.principal.clone(),
        description: t.description.clone(),
        created_at: t.created.to_string(),
        expires_at: t.expires.map(|x| x.to_string()),
        revoked_at: t.revoked.map(|x| x.to_string()),
        kind: if t.identity.is_some() {
            "signIn"
        } else if t.principal.starts_with("agent:") {
            "agent"
        } else {
            "automation"
        }
        .into(),
    }
}

/// Creates a bearer token for a principal; its text is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "access", request_body = CreateToken,
    responses((status = 201, body = CreatedToken)))]
pub async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    JsonBody(body): JsonBody<CreateToken>,
) -> ApiResult<Response> {
    principal.require(Action::TokenWrite, &params::sub_scope(&state))?;
    let who = body
        .principal
        .ok_or_else(|| ApiError::bad_param("principal", "is required"))?;
    params::check_principal("principal", &who)?;
    let description = body.description.unwrap_or_default();
    if description.len() > 1024 {
        return Err(ApiError::bad_param(
            "description",
            "is longer than 1024 characters",
        ));
    }
    let now = state.clock.now();
    let expires = match body.expires_in {
        None => None,
        Some(d) => {
            let secs = parse_iso8601_secs(&d).map_err(|e| ApiError::bad_param("expiresIn", e))?;
            if secs <= 0 {
                return Err(ApiError::bad_param("expiresIn", "must be longer than zero"));
            }
            Some(
                now.checked_add(jiff::SignedDuration::from_secs(secs))
                    .map_err(|e| ApiError::bad_param("expiresIn", e))?,
            )
        }
    };
    let (id, text, hash) = generate_token();
    let record = TokenRecord {
        id,
        principal: who,
        secret_hash: hash,
        description,
        created: now,
        expires,
        revoked: None,
        identity: None,
        last_used: None,
    };
    state
        .store
        .create_token(record.clone(), principal.audit_ctx(ip, state.clock.now()))
        .await?;
    let out = CreatedToken {
        info: token_wire(&record),
        token: text,
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// Tokens, oldest first, a page at a time (token managers only).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "access",
    params(
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"),
        ("continuationToken" = Option<String>, Query, description = "From the previous page"),
    ),
    responses((status = 200, body = TokenPage)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<Q>,
) -> ApiResult<Json<TokenPage>> {
    principal.require(Action::TokenWrite, &params::sub_scope(&state))?;
    let limit = params::count_param(&q, "limit", 100, 1000)?;
    let after = params::after_continuation(&q)?
        .as_deref()
        .map(params::cursor)
        .transpose()?;
    let tokens = state
        .store
        .tokens_page(&Paging {
            after,
            limit: limit + 1,
        })
        .await?;
    let (page, next) = params::page(tokens, limit, |t| params::cursor_key(t.created, &t.id));
    Ok(Json(TokenPage {
        value: page.iter().map(token_wire).collect(),
        continuation_token: next,
    }))
}

/// Revokes a token at once (an agent holding it is told through its long-poll).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "access",
    params(("id" = String, Path)),
    responses((status = 200, description = "Revoked (or already revoked)")))]
pub async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    principal.require(Action::TokenWrite, &params::sub_scope(&state))?;
    let Some(token) = state.store.find_token(&id).await? else {
        return Err(ApiError::not_found(format!("token {id} not found")));
    };
    let now = state.clock.now();
    if token.revoked.is_none() && last_owner_credential(&state, &token, now).await? {
        return Err(ApiError::conflict(
            "this is the last credential of an Owner of the subscription: revoking it would lock everyone out. Create another Owner token first (or recover locally with `jitgate admin recover --data-dir DIR`)",
        )
        .with_target("id"));
    }
    state
        .store
        .revoke_token(&id, principal.audit_ctx(ip, now))
        .await?;
    state.auth_cache.invalidate();
    // An agent holding it is told at once (its long-poll wakes and re-checks).
    if let Some(vm) = token.principal.strip_prefix("agent:")
        && let Ok(vm) = VmId::parse(vm)
    {
        state.vm_changes.touch([&vm]);
    }
    Ok(StatusCode::OK)
}

/// Whether `token` is the only live credential of any Owner of the subscription.
async fn last_owner_credential(
    state: &AppState,
    token: &TokenRecord,
    now: Timestamp,
) -> ApiResult<bool> {
    let sub = params::sub_scope(state);
    let owners: HashSet<String> = state
        .store
        .role_assignments(None)
        .await?
        .into_iter()
        .filter(|r| r.assignment.role == Role::Owner && r.assignment.scope == sub)
        .map(|r| r.assignment.principal)
        .collect();
    if !owners.contains(&token.principal) {
        return Ok(false);
    }
    let others = state
        .store
        .list_tokens()
        .await?
        .into_iter()
        .filter(|t| t.id != token.id && t.revoked.is_none())
        .filter(|t| t.expires.is_none_or(|e| e > now))
        .filter(|t| owners.contains(&t.principal))
        .count();
    Ok(others == 0)
}

fn ra_wire(r: &RoleAssignmentRecord) -> jitgate_proto::api::RoleAssignment {
    jitgate_proto::api::RoleAssignment {
        id: r.id.clone(),
        principal: r.assignment.principal.clone(),
        role: r.assignment.role.as_str().to_owned(),
        scope: r.assignment.scope.to_string(),
        created_at: r.created.to_string(),
    }
}

/// Gives a principal a role at a scope (needs role-assignment rights there).
#[utoipa::path(post, path = "/api/v1/roleAssignments", tag = "access",
    request_body = CreateRoleAssignment,
    responses((status = 201, body = jitgate_proto::api::RoleAssignment)))]
pub async fn create_role_assignment(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    JsonBody(body): JsonBody<CreateRoleAssignment>,
) -> ApiResult<Response> {
    let who = body
        .principal
        .ok_or_else(|| ApiError::bad_param("principal", "is required"))?;
    params::check_principal("principal", &who)?;
    let role = Role::parse(
        body.role
            .as_deref()
            .ok_or_else(|| ApiError::bad_param("role", "is required"))?,
    )
    .map_err(|e| ApiError::bad_param("role", e))?;
    let scope = params::scope_param(&state, body.scope.as_deref())?;
    principal.require(Action::RoleAssignmentWrite, &scope)?;
    let record = RoleAssignmentRecord {
        id: uuid::Uuid::new_v4().to_string(),
        assignment: RoleAssignment {
            principal: who,
            role,
            scope,
        },
        created: state.clock.now(),
    };
    state
        .store
        .add_role_assignment(record.clone(), principal.audit_ctx(ip, state.clock.now()))
        .await?;
    state.auth_cache.invalidate();
    Ok((StatusCode::CREATED, Json(ra_wire(&record))).into_response())
}

/// Role assignments the caller may see (their own, and those inside scopes they
/// manage), oldest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/roleAssignments", tag = "access",
    params(
        ("principal" = Option<String>, Query, description = "Only this principal's"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"),
        ("continuationToken" = Option<String>, Query, description = "From the previous page"),
    ),
    responses((status = 200, body = RoleAssignmentPage)))]
pub async fn list_role_assignments(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<Q>,
) -> ApiResult<Json<RoleAssignmentPage>> {
    let limit = params::count_param(&q, "limit", 100, 1000)?;
    // The token is checked before any answer, the empty one below included.
    if let Some(a) = params::after_continuation(&q)? {
        params::cursor(&a)?;
    }
    let manages_any = principal
        .assignments
        .iter()
        .any(|a| a.principal == principal.name && a.role.permits(Action::RoleAssignmentWrite));
    let filter = if manages_any {
        q.get("principal").cloned()
    } else if q.get("principal").is_some_and(|p| *p != principal.name) {
        // Someone who manages no scope sees only their own.
        return Ok(Json(RoleAssignmentPage {
            value: Vec::new(),
            continuation_token: None,
        }));
    } else {
        Some(principal.name.clone())
    };
    let store = state.store.clone();
    let (page, next) = params::cursor_page(
        &q,
        limit,
        |r: &RoleAssignmentRecord| (r.created, r.id.as_str()),
        |r| {
            r.assignment.principal == principal.name
                || principal.can(Action::RoleAssignmentWrite, &r.assignment.scope)
        },
        |paging| {
            let store = store.clone();
            let filter = filter.clone();
            async move {
                store
                    .role_assignments_page(filter.as_deref(), &paging)
                    .await
            }
        },
    )
    .await?;
    Ok(Json(RoleAssignmentPage {
        value: page.iter().map(ra_wire).collect(),
        continuation_token: next,
    }))
}

/// Removes a role assignment (needs role-assignment rights at its scope).
#[utoipa::path(delete, path = "/api/v1/roleAssignments/{id}", tag = "access",
    params(("id" = String, Path)),
    responses((status = 200, description = "Removed")))]
pub async fn delete_role_assignment(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let all = state.store.role_assignments(None).await?;
    let Some(r) = all.iter().find(|r| r.id == id) else {
        return Err(ApiError::not_found(format!(
            "role assignment {id} not found"
        )));
    };
    principal.require(Action::RoleAssignmentWrite, &r.assignment.scope)?;
    state
        .store
        .remove_role_assignment(&id, principal.audit_ctx(ip, state.clock.now()))
        .await?;
    state.auth_cache.invalidate();
    Ok(StatusCode::OK)
}
