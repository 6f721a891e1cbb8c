//! Access requests: list (paged, newest first), view one, revoke.

use axum::Json;
use axum::extract::{Path, Query, State};
use jitgate_core::Timestamp;
use jitgate_core::ids::VmId;
use jitgate_core::net::Port;
use jitgate_core::rbac::Action;
use jitgate_core::request::{AccessRequest, RequestId, RevokeRefusal};
use jitgate_proto::api::{
    Request, RequestPage, RequestPort, RequestVm, RevokeResult, RevokeSelection, RevokedPort,
};
use jitgate_store::{OpError, PortSelector, RequestFilter, RevokeError};

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::OptionalJsonBody;
use crate::error::{ApiError, ApiResult};
use crate::params::{self, Q};

/// A request's state as a whole: `Pending` while a port waits for approval, `Active`
/// while a port is live, else how it ended: `Denied`, `Expired` (a wait that ran out,
/// or grants that reached their end), `Cancelled`, or `Ended`.
pub fn request_state(r: &AccessRequest, now: Timestamp) -> &'static str {
    use jitgate_core::request::{PortStatus, RevokeReason};
    let ports = || r.vms.iter().flat_map(|v| v.ports.iter());
    if ports().any(|p| p.status == PortStatus::Pending) {
        "Pending"
    } else if ports().any(|p| p.is_live(now)) {
        "Active"
    } else if ports().any(|p| p.status == PortStatus::Denied) {
        "Denied"
    } else if ports().any(|p| p.status == PortStatus::Revoked(RevokeReason::Cancelled)) {
        "Cancelled"
    } else if ports().all(|p| {
        matches!(
            p.status,
            PortStatus::Initiated
                | PortStatus::Revoked(RevokeReason::Expired | RevokeReason::ApprovalExpired)
        )
    }) {
        "Expired"
    } else {
        "Ended"
    }
}

pub fn request_wire(r: &AccessRequest, now: Timestamp) -> Request {
    Request {
        break_glass: r
            .break_glass
            .as_ref()
            .map(|b| jitgate_proto::api::BreakGlassOut {
                reviewed: b.reviewed_by.is_some(),
                reviewed_by: b.reviewed_by.clone(),
                reviewed_at: b.reviewed_at.map(|t| t.to_string()),
            }),
        state: request_state(r, now).to_owned(),
        approval: r
            .approval
            .as_ref()
            .map(|a| jitgate_proto::api::RequestApproval {
                rule: a.snapshot.rule.clone(),
                min_approvals: a.snapshot.min_approvals,
                deny_threshold: a.snapshot.deny_threshold,
                approvers: a.snapshot.approvers.clone(),
                pending_until: a.snapshot.pending_until.to_string(),
                decisions: a
                    .votes
                    .iter()
                    .map(|v| jitgate_proto::api::ApprovalDecision {
                        principal: v.principal.clone(),
                        decision: if v.approve { "approve" } else { "deny" }.into(),
                        reason: v.reason.clone(),
                        time: v.at.to_string(),
                    })
                    .collect(),
            }),
        id: r.id.to_string(),
        policy: r.policy_key.clone(),
        requestor: r.requestor.clone(),
        justification: r.justification.clone(),
        start_time_utc: r.start.to_string(),
        caller_ip: r.caller_ip.to_string(),
        virtual_machines: r
            .vms
            .iter()
            .map(|vm| RequestVm {
                id: vm.id.to_string(),
                ports: vm
                    .ports
                    .iter()
                    .map(|p| RequestPort {
                        number: p.number.get(),
                        protocol: p.protocol.as_str().to_owned(),
                        allowed_source_address_prefix: p.source.to_string(),
                        end_time_utc: p.end.to_string(),
                        status: p.status.status_str().to_owned(),
                        status_reason: p.status.reason_str().to_owned(),
                        live: p.is_live(now),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The caller sees a request if they may read requests on one of its VMs, made it, or
/// may decide on it.
fn request_visible(p: &Principal, r: &AccessRequest) -> bool {
    r.requestor == p.name
        || r.vms
            .iter()
            .any(|v| p.can(Action::RequestRead, &v.id.scope()))
        || reviewable(p, r)
}

/// Whether the caller may decide on this pending request now: not its requestor, one
/// of its rule's approvers (if the rule names them), holding the approve action at
/// every machine of the request, and not decided yet.
pub fn reviewable(p: &Principal, r: &AccessRequest) -> bool {
    let Some(a) = &r.approval else { return false };
    let pending = r.vms.iter().any(|v| {
        v.ports
            .iter()
            .any(|x| x.status == jitgate_core::request::PortStatus::Pending)
    });
    pending
        && r.requestor != p.name
        && (a.snapshot.approvers.is_empty() || a.snapshot.approvers.contains(&p.name))
        && !a.votes.iter().any(|v| v.principal == p.name)
        && r.vms
            .iter()
            .all(|v| p.can(Action::RequestApprove, &v.id.scope()))
}

/// Requests the caller may see, newest first, a page at a time. Someone who may read
/// no one else's requests anywhere lists their own in the store directly.
#[utoipa::path(get, path = "/api/v1/requests", tag = "requests",
    params(
        ("vm" = Option<String>, Query, description = "Only requests for this VM (resource id)"),
        ("requestor" = Option<String>, Query, description = "Only this requestor's"),
        ("mine" = Option<bool>, Query, description = "Only the caller's own"),
        ("active" = Option<bool>, Query, description = "Only requests with a live port"),
        ("state" = Option<String>, Query, description = "Only requests in this state: Pending (a port waits for approval)"),
        ("reviewable" = Option<bool>, Query, description = "Only requests the caller may decide on now"),
        ("breakGlass" = Option<String>, Query, description = "unreviewed: only break-glass requests no approver has reviewed yet; any: every break-glass request"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"),
        ("continuationToken" = Option<String>, Query, description = "From the previous page"),
    ),
    responses((status = 200, body = RequestPage)))]
pub async fn list_requests(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<Q>,
) -> ApiResult<Json<RequestPage>> {
    let now = state.clock.now();
    let vm = q
        .get("vm")
        .map(|v| VmId::parse(v))
        .transpose()
        .map_err(|e| ApiError::bad_param("vm", e))?;
    let limit = params::count_param(&q, "limit", 100, 1000)?;
    // Every parameter is checked before any answer, the empty one below included.
    let live_at = params::flag_param(&q, "active")?.then_some(now);
    let mine = params::flag_param(&q, "mine")?;
    let pending = match q.get("state").map(String::as_str) {
        None => false,
        Some(s) if s.eq_ignore_ascii_case("pending") => true,
        Some(s) => {
            return Err(ApiError::bad_param(
                "state",
                format!("'{s}' is not a state a list filters by (Pending)"),
            ));
        }
    };
    let reviewable_only = params::flag_param(&q, "reviewable")?;
    let break_glass = match q.get("breakGlass").map(String::as_str) {
        None => None,
        Some("unreviewed") => Some(true),
        Some("any") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_param(
                "breakGlass",
                format!("'{other}' is not one of: unreviewed, any"),
            ));
        }
    };
    let after = params::after_continuation(&q)?;
    if let Some(a) = &after {
        params::cursor(a)?;
    }
    let reads_others = principal
        .assignments
        .iter()
        .any(|a| a.principal == principal.name && a.role.permits(Action::RequestRead));
    // An approver sees the requests it may decide on without the read action.
    let decides = principal
        .assignments
        .iter()
        .any(|a| a.principal == principal.name && a.role.permits(Action::RequestApprove));
    let requestor = if mine || (!reads_others && !(decides && (pending || reviewable_only))) {
        match q.get("requestor") {
            Some(other) if *other != principal.name => {
                // Asking for someone else's while seeing only one's own: nothing.
                return Ok(Json(RequestPage {
                    value: Vec::new(),
                    continuation_token: None,
                }));
            }
            _ => Some(principal.name.clone()),
        }
    } else {
        q.get("requestor").cloned()
    };
    let filter = RequestFilter {
        vm,
        requestor,
        live_at,
        pending: pending || reviewable_only,
        after: None,
        limit,
    };
    let (page, next) = params::filtered_page(
        after,
        limit,
        |r: &AccessRequest| params::cursor_key(r.start, &r.id.to_string()),
        |r| {
            request_visible(&principal, r)
                && (!reviewable_only || reviewable(&principal, r))
                && match (break_glass, &r.break_glass) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(unreviewed), Some(b)) => !unreviewed || b.reviewed_by.is_none(),
                }
        },
        |after, n| {
            let store = state.store.clone();
            let after = after.as_deref().map(params::cursor).transpose();
            let filter = RequestFilter {
                limit: n,
                ..filter.clone()
            };
            async move {
                let filter = RequestFilter {
                    after: after?,
                    ..filter
                };
                Ok(store.list_requests(&filter).await?)
            }
        },
    )
    .await?;
    Ok(Json(RequestPage {
        value: page.iter().map(|r| request_wire(r, now)).collect(),
        continuation_token: next,
    }))
}

/// The request with this id, if the caller may see it (else 404, as if absent).
pub(crate) async fn visible_request(
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

/// One request, if the caller made it or may read requests on one of its VMs.
#[utoipa::path(get, path = "/api/v1/requests/{id}", tag = "requests",
    params(("id" = String, Path)),
    responses((status = 200, body = Request)))]
pub async fn get_request(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Request>> {
    let (_, r) = visible_request(&state, &principal, &id).await?;
    Ok(Json(request_wire(&r, state.clock.now())))
}

/// Ends a request's live ports now (all, or the selected VM/port): the requestor may
/// end their own; anyone else needs the revoke action on every VM whose ports close.
#[utoipa::path(post, path = "/api/v1/requests/{id}/revoke", tag = "requests",
    params(("id" = String, Path)),
    request_body(content = Option<RevokeSelection>, description = "Which ports (none: all live ports)"),
    responses((status = 200, body = RevokeResult)))]
pub async fn revoke_request(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<RevokeSelection>,
) -> ApiResult<Json<RevokeResult>> {
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
    state.vm_changes.touch_grants(revoked.iter().map(|p| &p.vm));
    let after = state
        .store
        .get_request(id)
        .await?
        .ok_or_else(|| ApiError::internal("request vanished"))?;
    Ok(Json(RevokeResult {
        revoked: revoked
            .iter()
            .map(|p| RevokedPort {
                vm: p.vm.to_string(),
                port: p.number.get(),
            })
            .collect(),
        request: request_wire(&after, state.clock.now()),
    }))
}
