//! The native API under `/api/v1`: VMs and their NSG view, requests (list, get,
//! revoke), tokens, role assignments, audit (query, export, verify), whoami, health,
//! and the OpenAPI document that describes all of it.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jitgate_core::Timestamp;
use jitgate_core::audit::AuditRecord;
use jitgate_core::duration::parse_iso8601_secs;
use jitgate_core::ids::{Location, ResourceGroup, Scope, VmId, VmName};
use jitgate_core::net::Port;
use jitgate_core::nsg::{NsgRule, RuleOrigin};
use jitgate_core::rbac::{Action, Role, RoleAssignment};
use jitgate_core::request::{AccessRequest, RequestId, RevokeRefusal};
use jitgate_store::{
    AuditQuery, OpError, PortSelector, RegisterOutcome, RequestFilter, RevokeError,
    RoleAssignmentRecord, TokenRecord, VmError, VmRecord,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{CallerIp, Principal, generate_token};
use crate::body::{JsonBody, OptionalJsonBody};
use crate::error::{ApiError, ApiResult};

pub const OPENAPI: &str = include_str!("openapi.json");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/vms", get(list_vms).post(register_vm))
        .route("/api/v1/vms/{rg}/{name}", get(get_vm).delete(delete_vm))
        .route("/api/v1/vms/{rg}/{name}/nsg", get(get_nsg))
        .route("/api/v1/vms/{rg}/{name}/nsg/rules", get(list_nsg_rules))
        .route(
            "/api/v1/vms/{rg}/{name}/nsg/rules/{rule}",
            axum::routing::put(put_nsg_rule).delete(delete_nsg_rule),
        )
        .route(
            "/api/v1/enrollTokens",
            get(crate::agent::list_enroll_tokens).post(crate::agent::create_enroll_token),
        )
        .route(
            "/api/v1/enrollTokens/{id}",
            axum::routing::delete(crate::agent::revoke_enroll_token),
        )
        .route("/api/v1/agent/enroll", post(crate::agent::enroll))
        .route("/api/v1/agent/desired", get(crate::agent::desired))
        .route("/api/v1/agent/status", post(crate::agent::status))
        .route("/api/v1/recommendations", get(crate::recommend::list))
        .route(
            "/api/v1/recommendations/apply",
            post(crate::recommend::apply),
        )
        .route(
            "/api/v1/exclusions",
            get(crate::recommend::list_exclusions).post(crate::recommend::create_exclusion),
        )
        .route(
            "/api/v1/exclusions/{id}",
            axum::routing::delete(crate::recommend::delete_exclusion),
        )
        .route(
            "/api/v1/vms/{rg}/{name}/blocked",
            get(crate::recommend::blocked),
        )
        .route("/api/v1/requests", get(list_requests))
        .route("/api/v1/requests/{id}", get(get_request))
        .route("/api/v1/requests/{id}/revoke", post(revoke_request))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route(
            "/api/v1/roleAssignments",
            get(list_role_assignments).post(create_role_assignment),
        )
        .route(
            "/api/v1/roleAssignments/{id}",
            axum::routing::delete(delete_role_assignment),
        )
        .route("/api/v1/audit", get(query_audit))
        .route("/api/v1/audit/verify", get(verify_audit))
}

/// The `scope` field: a subscription, resource group or VM scope of a subscription
/// that exists.
pub fn scope_param(state: &AppState, scope: Option<&str>) -> ApiResult<Scope> {
    let scope = Scope::parse(scope.ok_or_else(|| ApiError::bad_param("scope", "is required"))?)
        .map_err(|e| ApiError::bad_param("scope", e))?;
    if !state.subscriptions.contains(&scope.subscription()) {
        // A well-formed scope of a subscription that is not here: not found, as Azure
        // answers for an unknown subscription.
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "SubscriptionNotFound",
            format!("subscription {} does not exist", scope.subscription()),
        )
        .with_target("scope"));
    }
    Ok(scope)
}

/// A count query parameter from 1 to `max`, `default` when absent.
pub fn count_param(
    q: &HashMap<String, String>,
    name: &str,
    default: usize,
    max: usize,
) -> ApiResult<usize> {
    match q.get(name) {
        None => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_param(name, format!("'{l}' is not a number from 1 to {max}"))
            }),
    }
}

fn sub_scope(state: &AppState) -> Scope {
    Scope::Subscription(state.default_subscription())
}

/// A registered VM the caller may read, from the path's resource group and name.
async fn readable_vm(
    state: &AppState,
    principal: &Principal,
    rg: &str,
    name: &str,
) -> ApiResult<VmId> {
    let id = vm_param(state, rg, name)?;
    principal.require(Action::VmRead, &id.scope())?;
    if state.store.get_vm(&id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "virtual machine '{id}' is not registered"
        )));
    }
    Ok(id)
}

fn vm_param(state: &AppState, rg: &str, name: &str) -> ApiResult<VmId> {
    Ok(VmId::new(
        state.default_subscription(),
        ResourceGroup::parse(rg).map_err(|e| ApiError::bad_param("resourceGroup", e))?,
        VmName::parse(name).map_err(|e| ApiError::bad_param("name", e))?,
    ))
}

// ---- health, metrics, openapi, whoami --------------------------------------------------

async fn health(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    state.store.subscriptions().await?;
    Ok(Json(
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
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

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn whoami(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
) -> Json<Value> {
    let roles: Vec<Value> = principal
        .assignments
        .iter()
        .map(|a| json!({"role": a.role.as_str(), "scope": a.scope.to_string()}))
        .collect();
    Json(json!({
        "principal": principal.name,
        "tokenId": principal.token_id,
        "subscription": state.default_subscription().to_string(),
        "roles": roles,
        "callerIp": ip.to_string(),
    }))
}

// ---- VMs ----------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterVmIn {
    id: Option<String>,
    resource_group: Option<String>,
    name: Option<String>,
    location: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GrantOut {
    request: String,
    requestor: String,
    port: u16,
    protocol: String,
    source: String,
    start_time_utc: String,
    end_time_utc: String,
    seconds_left: i64,
}

fn vm_json(vm: &VmRecord) -> Value {
    json!({
        "id": vm.id.to_string(),
        "subscription": vm.id.subscription.to_string(),
        "resourceGroup": vm.id.resource_group.to_string(),
        "name": vm.id.name.to_string(),
        "location": vm.location.as_ref().map(|l| l.to_string()),
        "registeredAt": vm.created.to_string(),
        "registeredBy": vm.created_by,
    })
}

async fn register_vm(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    JsonBody(body): JsonBody<RegisterVmIn>,
) -> ApiResult<Response> {
    let id = match (&body.id, &body.resource_group, &body.name) {
        (Some(id), None, None) => VmId::parse(id).map_err(|e| ApiError::bad_param("id", e))?,
        (None, Some(rg), Some(name)) => vm_param(&state, rg, name).map_err(|mut e| {
            if e.target.as_deref() == Some("resourceGroup") || e.target.as_deref() == Some("name") {
                e.code = "InvalidRequestContent";
            }
            e
        })?,
        (Some(_), _, _) => {
            return Err(ApiError::bad_param(
                "id",
                "give either id, or resourceGroup and name, not both",
            ));
        }
        (None, None, _) => {
            return Err(ApiError::bad_param(
                "resourceGroup",
                "is required (or give id)",
            ));
        }
        (None, Some(_), None) => return Err(ApiError::bad_param("name", "is required")),
    };
    let location = body
        .location
        .as_deref()
        .map(Location::parse)
        .transpose()
        .map_err(|e| ApiError::bad_param("location", e))?;
    principal.require(Action::VmWrite, &id.scope())?;
    let record = VmRecord {
        id: id.clone(),
        location,
        created: state.clock.now(),
        created_by: principal.name.clone(),
    };
    let outcome = state
        .store
        .register_vm(record, principal.audit_ctx(ip, state.clock.now()))
        .await
        .map_err(|e| match e {
            OpError::Refused(VmError::UnknownSubscription(s)) => ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "SubscriptionNotFound",
                format!("subscription {s} does not exist"),
            )
            .with_target("id"),
            OpError::Refused(VmError::InPolicy(p)) => ApiError::conflict(format!("in policy {p}")),
            OpError::Store(s) => s.into(),
        })?;
    let vm = state
        .store
        .get_vm(&id)
        .await?
        .ok_or_else(|| ApiError::internal("vm vanished"))?;
    let status = match outcome {
        RegisterOutcome::Created => StatusCode::CREATED,
        RegisterOutcome::AlreadyRegistered => StatusCode::OK,
    };
    Ok((status, Json(vm_json(&vm))).into_response())
}

/// `vm_summaries` of `vms`, by VM key (a VM deleted meanwhile has none).
pub async fn summaries_by_key(
    state: &AppState,
    vms: &[jitgate_store::VmRecord],
    now: Timestamp,
) -> ApiResult<HashMap<String, jitgate_store::VmSummary>> {
    let ids: Vec<VmId> = vms.iter().map(|v| v.id.clone()).collect();
    Ok(state
        .store
        .vm_summaries(&ids, now)
        .await?
        .into_iter()
        .map(|s| (s.vm.key(), s))
        .collect())
}

/// The opaque continuation token of a page that ended at VM key `key`.
pub fn continuation(key: &str) -> String {
    hex::encode(key)
}

pub fn after_continuation(q: &HashMap<String, String>) -> ApiResult<Option<String>> {
    q.get("continuationToken")
        .map(|t| {
            hex::decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::bad_param(
                        "continuationToken",
                        "is not a token this API returned (pass it back unchanged)",
                    )
                })
        })
        .transpose()
}

/// VMs the caller may read, a page at a time (`limit`, default 100, at most 1000;
/// `continuationToken` from the previous page), filtered by `resourceGroup` and `name`
/// in the store. A page is filled with readable VMs however many unreadable ones lie
/// between them; what each shows is read for the whole page at once.
async fn list_vms(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let rg = q
        .get("resourceGroup")
        .map(|r| ResourceGroup::parse(r))
        .transpose()
        .map_err(|e| ApiError::bad_param("resourceGroup", e))?;
    let name = q
        .get("name")
        .map(|n| VmName::parse(n))
        .transpose()
        .map_err(|e| ApiError::bad_param("name", e))?;
    let limit = count_param(&q, "limit", 100, 1000)?;
    let mut filter = jitgate_store::VmFilter {
        resource_group: rg,
        name,
        after: after_continuation(&q)?,
        limit,
    };
    let mut page: Vec<jitgate_store::VmRecord> = Vec::new();
    let mut more = false;
    loop {
        let batch = state
            .store
            .find_vms(state.default_subscription(), &filter)
            .await?;
        let exhausted = batch.len() < limit;
        for vm in batch {
            filter.after = Some(vm.id.key());
            if principal.can(Action::VmRead, &vm.id.scope()) {
                if page.len() == limit {
                    more = true;
                    break;
                }
                page.push(vm);
            }
        }
        if more || exhausted {
            break;
        }
    }
    if more {
        // The page ends at its own last VM; the one found beyond it comes again.
        filter.after = page.last().map(|v| v.id.key());
    }
    let now = state.clock.now();
    let summaries = summaries_by_key(&state, &page, now).await?;
    let mut out = Vec::with_capacity(page.len());
    for vm in &page {
        // A VM deleted since the page was read is left out.
        let Some(sum) = summaries.get(&vm.id.key()) else {
            continue;
        };
        let mut v = vm_json(vm);
        v["policy"] = json!(sum.policy.as_ref().map(|p| p.key.id()));
        v["protectedPorts"] = json!(
            sum.policy
                .as_ref()
                .map(|p| p
                    .vm
                    .ports
                    .iter()
                    .map(|r| r.number.get())
                    .collect::<Vec<_>>())
                .unwrap_or_default()
        );
        v["liveGrants"] = json!(sum.live_grants);
        v["agent"] = crate::agent::presence_json(&state, sum.agent_last_seen, now);
        out.push(v);
    }
    let mut body = json!({ "value": out });
    if more && let Some(after) = &filter.after {
        body["continuationToken"] = json!(continuation(after));
    }
    Ok(Json(body))
}

async fn get_vm(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let id = vm_param(&state, &rg, &name)?;
    principal.require(Action::VmRead, &id.scope())?;
    let vm =
        state.store.get_vm(&id).await?.ok_or_else(|| {
            ApiError::not_found(format!("virtual machine '{id}' is not registered"))
        })?;
    let now = state.clock.now();
    let policy = state.store.vm_policy(&id).await?;
    let grants = state.store.live_grants(&id, now).await?;
    let mut v = vm_json(&vm);
    v["policy"] = json!(policy.as_ref().map(|p| p.key.id()));
    v["agent"] = crate::agent::status_json(&state, &id).await?;
    let last = state
        .store
        .list_requests(&RequestFilter {
            vm: Some(id.clone()),
            limit: 1,
            ..Default::default()
        })
        .await?;
    v["lastAccess"] = json!(last.first().map(|r| r.start.to_string()));
    v["lastUser"] = json!(last.first().map(|r| r.requestor.clone()));
    let day_ago = now
        .checked_sub(jiff::SignedDuration::from_hours(24))
        .map_err(ApiError::internal)?;
    let mut blocked: std::collections::BTreeMap<(u16, String), u64> =
        std::collections::BTreeMap::new();
    for p in state.store.blocked_series(Some(&id), day_ago).await? {
        *blocked.entry((p.port, p.protocol)).or_default() += p.count;
    }
    v["blockedLast24h"] = json!(
        blocked
            .iter()
            .map(|((port, proto), n)| json!({"port": port, "protocol": proto, "count": n}))
            .collect::<Vec<_>>()
    );
    v["grants"] = json!(
        grants
            .iter()
            .map(|g| GrantOut {
                request: g.request.to_string(),
                requestor: g.requestor.clone(),
                port: g.number.get(),
                protocol: g.protocol.as_str().to_owned(),
                source: g.source.to_string(),
                start_time_utc: g.start.to_string(),
                end_time_utc: g.end.to_string(),
                seconds_left: g.end.duration_since(now).as_secs(),
            })
            .collect::<Vec<_>>()
    );
    Ok(Json(v))
}

async fn delete_vm(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let id = vm_param(&state, &rg, &name)?;
    principal.require(Action::VmWrite, &id.scope())?;
    match state
        .store
        .delete_vm(&id, principal.audit_ctx(ip, state.clock.now()))
        .await
    {
        Ok(true) => Ok(StatusCode::OK),
        Ok(false) => Ok(StatusCode::NO_CONTENT),
        Err(OpError::Refused(VmError::InPolicy(p))) => Err(ApiError::conflict(format!(
            "virtual machine '{id}' is protected by policy {p}; remove it from the policy first"
        ))),
        Err(OpError::Refused(VmError::UnknownSubscription(s))) => {
            Err(ApiError::not_found(format!("subscription {s} not found")))
        }
        Err(OpError::Store(s)) => Err(s.into()),
    }
}

fn rule_json(r: &NsgRule) -> Value {
    let (origin, extra) = match &r.origin {
        RuleOrigin::User => ("user", json!(null)),
        RuleOrigin::JitDeny { policy } => ("jit-deny", json!({"policy": policy})),
        RuleOrigin::JitAllow { request, expires } => (
            "jit-allow",
            json!({"request": request.to_string(), "endTimeUtc": expires.to_string()}),
        ),
    };
    json!({
        "name": r.name,
        "priority": r.priority,
        "access": r.access.as_str(),
        "direction": "Inbound",
        "protocol": r.protocol.as_str(),
        "sourceAddressPrefixes": r.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "destinationPortRanges": r.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "description": r.description,
        "origin": origin,
        "jit": extra,
    })
}

async fn get_nsg(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let id = readable_vm(&state, &principal, &rg, &name).await?;
    let (rules, _) = crate::agent::nsg_now(&state, &id, state.clock.now()).await?;
    Ok(Json(json!({
        "vm": id.to_string(),
        "rules": rules.iter().map(rule_json).collect::<Vec<_>>(),
    })))
}

// ---- requests ------------------------------------------------------------------------------

fn request_json(r: &AccessRequest, now: Timestamp) -> Value {
    json!({
        "id": r.id.to_string(),
        "policy": r.policy_key,
        "requestor": r.requestor,
        "justification": r.justification,
        "startTimeUtc": r.start.to_string(),
        "callerIp": r.caller_ip.to_string(),
        "virtualMachines": r.vms.iter().map(|vm| json!({
            "id": vm.id.to_string(),
            "ports": vm.ports.iter().map(|p| json!({
                "number": p.number.get(),
                "protocol": p.protocol.as_str(),
                "allowedSourceAddressPrefix": p.source.to_string(),
                "endTimeUtc": p.end.to_string(),
                "status": p.status.status_str(),
                "statusReason": p.status.reason_str(),
                "live": p.is_live(now),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The caller sees a request if they may read requests on one of its VMs, or made it.
fn request_visible(p: &Principal, r: &AccessRequest) -> bool {
    r.requestor == p.name
        || r.vms
            .iter()
            .any(|v| p.can(Action::RequestRead, &v.id.scope()))
}

async fn list_requests(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let now = state.clock.now();
    let vm = q
        .get("vm")
        .map(|v| VmId::parse(v))
        .transpose()
        .map_err(|e| ApiError::bad_param("vm", e))?;
    let limit = count_param(&q, "limit", 100, 1000)?;
    let flag = |name: &str| -> ApiResult<bool> {
        match q.get(name).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(o) => Err(ApiError::bad_param(
                name,
                format!("'{o}' is not true or false"),
            )),
        }
    };
    let mine = flag("mine")?;
    let requestor = if mine {
        Some(principal.name.clone())
    } else {
        q.get("requestor").cloned()
    };
    let filter = RequestFilter {
        vm,
        requestor,
        live_at: flag("active")?.then_some(now),
        limit,
    };
    let requests = state.store.list_requests(&filter).await?;
    let value: Vec<Value> = requests
        .iter()
        .filter(|r| request_visible(&principal, r))
        .map(|r| request_json(r, now))
        .collect();
    Ok(Json(json!({"value": value})))
}

/// The request with this id, if the caller may see it (else 404, as if absent).
async fn visible_request(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> ApiResult<(RequestId, AccessRequest)> {
    let id = RequestId::parse(id).map_err(|e| ApiError::bad_param("id", e))?;
    let r = state
        .store
        .get_request(id)
        .await?
        .filter(|r| request_visible(principal, r))
        .ok_or_else(|| ApiError::not_found(format!("request {id} not found")))?;
    Ok((id, r))
}

async fn get_request(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (_, r) = visible_request(&state, &principal, &id).await?;
    Ok(Json(request_json(&r, state.clock.now())))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RevokeIn {
    vm: Option<String>,
    port: Option<i64>,
}

async fn revoke_request(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<RevokeIn>,
) -> ApiResult<Json<Value>> {
    let (id, r) = visible_request(&state, &principal, &id).await?;
    let selector = match body {
        None => None,
        Some(b) => Some(PortSelector {
            vm: b
                .vm
                .as_deref()
                .map(VmId::parse)
                .transpose()
                .map_err(|e| ApiError::bad_param("vm", e))?,
            number: b
                .port
                .map(Port::new)
                .transpose()
                .map_err(|e| ApiError::bad_param("port", e))?,
        }),
    };
    // Who may end which ports is core's rule; the store then ends them.
    let now = state.clock.now();
    let nothing_live = || {
        ApiError::conflict(format!(
            "request {id} has no live port matching the selection to revoke"
        ))
    };
    jitgate_core::request::plan_revoke(
        &r,
        &principal.name,
        &selector.clone().unwrap_or_default(),
        &|vm| principal.can(Action::RequestRevoke, &vm.scope()),
        now,
    )
    .map_err(|e| match e {
        RevokeRefusal::Forbidden { vm } => ApiError::forbidden(
            &principal.name,
            Action::RequestRevoke.as_str(),
            &vm.scope().to_string(),
        ),
        RevokeRefusal::NothingLive => nothing_live(),
    })?;
    let revoked = state
        .store
        .revoke_request(id, selector, principal.audit_ctx(ip, now))
        .await
        .map_err(|e| match e {
            OpError::Refused(RevokeError::NotFound) => {
                ApiError::not_found(format!("request {id} not found"))
            }
            OpError::Refused(RevokeError::NothingLive) => nothing_live(),
            OpError::Store(s) => s.into(),
        })?;
    state.changed(revoked.len());
    state.vm_changes.touch(revoked.iter().map(|p| &p.vm));
    let after = state
        .store
        .get_request(id)
        .await?
        .ok_or_else(|| ApiError::internal("request vanished"))?;
    Ok(Json(json!({
        "revoked": revoked.iter().map(|p| json!({"vm": p.vm.to_string(), "port": p.number.get()})).collect::<Vec<_>>(),
        "request": request_json(&after, state.clock.now()),
    })))
}

// ---- tokens ---------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenIn {
    principal: Option<String>,
    description: Option<String>,
    /// ISO 8601 duration until the token expires (none: never).
    expires_in: Option<String>,
}

fn token_json(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "principal": t.principal,
        "description": t.description,
        "createdAt": t.created.to_string(),
        "expiresAt": t.expires.map(|x| x.to_string()),
        "revokedAt": t.revoked.map(|x| x.to_string()),
    })
}

pub fn check_principal(field: &str, s: &str) -> ApiResult<()> {
    if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::bad_param(
            field,
            "must be 1 to 256 characters with no spaces or control characters",
        ));
    }
    Ok(())
}

async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    JsonBody(body): JsonBody<TokenIn>,
) -> ApiResult<Response> {
    principal.require(Action::TokenWrite, &sub_scope(&state))?;
    let who = body
        .principal
        .ok_or_else(|| ApiError::bad_param("principal", "is required"))?;
    check_principal("principal", &who)?;
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
    };
    state
        .store
        .create_token(record.clone(), principal.audit_ctx(ip, state.clock.now()))
        .await?;
    let mut v = token_json(&record);
    v["token"] = json!(text);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_tokens(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    principal.require(Action::TokenWrite, &sub_scope(&state))?;
    let tokens = state.store.list_tokens().await?;
    Ok(Json(
        json!({"value": tokens.iter().map(token_json).collect::<Vec<_>>()}),
    ))
}

async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    principal.require(Action::TokenWrite, &sub_scope(&state))?;
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
    token: &jitgate_store::TokenRecord,
    now: Timestamp,
) -> ApiResult<bool> {
    let sub = sub_scope(state);
    let owners: std::collections::HashSet<String> = state
        .store
        .role_assignments(None)
        .await?
        .into_iter()
        .filter(|r| {
            r.assignment.role == jitgate_core::rbac::Role::Owner && r.assignment.scope == sub
        })
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

// ---- role assignments -----------------------------------------------------------------------

#[derive(Deserialize)]
struct RoleAssignmentIn {
    principal: Option<String>,
    role: Option<String>,
    scope: Option<String>,
}

fn ra_json(r: &RoleAssignmentRecord) -> Value {
    json!({
        "id": r.id,
        "principal": r.assignment.principal,
        "role": r.assignment.role.as_str(),
        "scope": r.assignment.scope.to_string(),
        "createdAt": r.created.to_string(),
    })
}

async fn create_role_assignment(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    JsonBody(body): JsonBody<RoleAssignmentIn>,
) -> ApiResult<Response> {
    let who = body
        .principal
        .ok_or_else(|| ApiError::bad_param("principal", "is required"))?;
    check_principal("principal", &who)?;
    let role = Role::parse(
        body.role
            .as_deref()
            .ok_or_else(|| ApiError::bad_param("role", "is required"))?,
    )
    .map_err(|e| ApiError::bad_param("role", e))?;
    let scope = scope_param(&state, body.scope.as_deref())?;
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
    Ok((StatusCode::CREATED, Json(ra_json(&record))).into_response())
}

async fn list_role_assignments(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let filter = q.get("principal").cloned();
    let all = state.store.role_assignments(filter.as_deref()).await?;
    // Anyone sees their own; managers of a scope see the assignments inside it.
    let value: Vec<Value> = all
        .iter()
        .filter(|r| {
            r.assignment.principal == principal.name
                || principal.can(Action::RoleAssignmentWrite, &r.assignment.scope)
        })
        .map(ra_json)
        .collect();
    Ok(Json(json!({"value": value})))
}

async fn delete_role_assignment(
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

// ---- audit ----------------------------------------------------------------------------------

fn audit_json(r: &AuditRecord) -> Value {
    json!({
        "seq": r.seq,
        "time": r.entry.time,
        "actor": r.entry.actor,
        "source": r.entry.source,
        "action": r.entry.action,
        "target": r.entry.target,
        "outcome": r.entry.outcome.as_str(),
        "details": serde_json::from_str::<Value>(&r.entry.details).unwrap_or(Value::String(r.entry.details.clone())),
        "prevHash": r.prev_hash,
        "hash": r.hash,
    })
}

fn time_param(q: &HashMap<String, String>, name: &str) -> ApiResult<Option<Timestamp>> {
    q.get(name)
        .map(|s| jitgate_core::request::parse_time(s))
        .transpose()
        .map_err(|e| ApiError::bad_param(name, e))
}

async fn query_audit(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    principal.require(Action::AuditRead, &sub_scope(&state))?;
    let limit = count_param(&q, "limit", 1000, 100_000)?;
    let after_seq = q
        .get("afterSeq")
        .map(|s| s.parse::<u64>())
        .transpose()
        .map_err(|_| ApiError::bad_param("afterSeq", "is not a sequence number"))?;
    let query = AuditQuery {
        target: q.get("vm").or(q.get("target")).cloned(),
        actor: q.get("actor").cloned(),
        action: q.get("action").cloned(),
        since: time_param(&q, "since")?,
        until: time_param(&q, "until")?,
        after_seq,
        limit,
    };
    let records = state.store.query_audit(&query).await?;
    match q.get("format").map(String::as_str) {
        None | Some("json") => Ok(Json(
            json!({"value": records.iter().map(audit_json).collect::<Vec<_>>()}),
        )
        .into_response()),
        Some("jsonl") => {
            let mut out = String::new();
            for r in &records {
                out.push_str(&audit_json(r).to_string());
                out.push('\n');
            }
            Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
        }
        Some("csv") => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let write = |w: &mut csv::Writer<Vec<u8>>| -> Result<(), csv::Error> {
                w.write_record([
                    "seq",
                    "time",
                    "actor",
                    "source",
                    "action",
                    "target",
                    "outcome",
                    "details",
                    "prev_hash",
                    "hash",
                ])?;
                for r in &records {
                    w.write_record([
                        r.seq.to_string().as_str(),
                        &r.entry.time,
                        &r.entry.actor,
                        &r.entry.source,
                        &r.entry.action,
                        &r.entry.target,
                        r.entry.outcome.as_str(),
                        &r.entry.details,
                        &r.prev_hash,
                        &r.hash,
                    ])?;
                }
                Ok(())
            };
            write(&mut w).map_err(ApiError::internal)?;
            let bytes = w.into_inner().map_err(ApiError::internal)?;
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"jitgate-audit.csv\"",
                    ),
                ],
                bytes,
            )
                .into_response())
        }
        Some(other) => Err(ApiError::bad_param(
            "format",
            format!("'{other}' is not one of json, jsonl, csv"),
        )),
    }
}

async fn verify_audit(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    principal.require(Action::AuditRead, &sub_scope(&state))?;
    let anchors = state
        .checkpoints
        .anchors()
        .map_err(|e| ApiError::internal(format!("cannot read the audit checkpoints: {e:#}")))?;
    let checkpoints = anchors.checkpoints.len();
    let report = state.store.verify_audit(Some(anchors)).await?;
    Ok(Json(json!({
        "ok": report.ok(),
        "events": report.count,
        "lastSeq": report.last_seq,
        "headHash": report.head_hash,
        "problems": report.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "checkpoints": checkpoints,
        "anchoredAt": report.anchored_at,
        "publicKey": state.checkpoints.public().to_hex(),
    })))
}

// ---- user NSG rules -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NsgRuleIn {
    priority: Option<i64>,
    access: Option<String>,
    protocol: Option<String>,
    source_address_prefixes: Option<Vec<String>>,
    destination_port_ranges: Option<Vec<String>>,
    description: Option<String>,
}

async fn list_nsg_rules(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let id = readable_vm(&state, &principal, &rg, &name).await?;
    let rules = state.store.nsg_rules(&id).await?;
    Ok(Json(
        json!({"value": rules.iter().map(rule_json).collect::<Vec<_>>()}),
    ))
}

async fn put_nsg_rule(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name, rule)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<NsgRuleIn>,
) -> ApiResult<Response> {
    let id = vm_param(&state, &rg, &name)?;
    let input = jitgate_core::nsg::UserRuleInput {
        priority: body.priority,
        access: body.access,
        protocol: body.protocol,
        source_address_prefixes: body.source_address_prefixes,
        destination_port_ranges: body.destination_port_ranges,
        description: body.description,
    };
    let parsed = jitgate_core::nsg::validate_user_rule(&rule, &input).map_err(ApiError::field)?;
    principal.require(Action::VmWrite, &id.scope())?;
    let created = state
        .store
        .put_nsg_rule(
            &id,
            parsed.clone(),
            principal.audit_ctx(ip, state.clock.now()),
        )
        .await
        .map_err(|e| match e {
            OpError::Refused(jitgate_store::NsgRuleError::UnknownVm) => {
                ApiError::not_found(format!("virtual machine '{id}' is not registered"))
            }
            OpError::Refused(jitgate_store::NsgRuleError::PriorityTaken(other)) => ApiError::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "priority: {} is already used by rule '{other}'",
                    parsed.priority
                ),
            )
            .with_target("priority"),
            OpError::Store(s) => s.into(),
        })?;
    state.vm_changes.touch([&id]);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(rule_json(&parsed))).into_response())
}

async fn delete_nsg_rule(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name, rule)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let id = vm_param(&state, &rg, &name)?;
    jitgate_core::nsg::check_rule_name(&rule)
        .map_err(|e| ApiError::bad_param("rule", e.message))?;
    principal.require(Action::VmWrite, &id.scope())?;
    let deleted = state
        .store
        .delete_nsg_rule(&id, &rule, principal.audit_ctx(ip, state.clock.now()))
        .await?;
    if deleted {
        state.vm_changes.touch([&id]);
        Ok(StatusCode::OK)
    } else {
        Ok(StatusCode::NO_CONTENT)
    }
}
