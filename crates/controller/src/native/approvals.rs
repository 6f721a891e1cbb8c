//! Approvals: the rules (`/api/v1/approvalRules/{name}`, a native resource, so an Azure
//! client that rewrites a policy never wipes them) and the decisions on pending
//! requests (`approve`, `deny`, `cancel`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jitgate_core::approval::{self, ApprovalRule, ApprovalRuleInput, DecideError, Outcome};
use jitgate_core::duration::parse_iso8601_secs;
use jitgate_core::net::SourcePrefix;
use jitgate_core::rbac::Action;
use jitgate_proto::api::{
    ApprovalRuleIn, ApprovalRuleOut, ApprovalRulePage, ApproveIn, DecisionOut, DenyIn, Request,
};
use jitgate_store::{CancelRefusal, DecideArgs, DecideRefusal, OpError, ReviewRefusal};

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::{JsonBody, OptionalJsonBody};
use crate::error::{ApiError, ApiResult};
use crate::native::requests::{request_wire, visible_request};

pub fn rule_wire(r: &ApprovalRule) -> ApprovalRuleOut {
    ApprovalRuleOut {
        name: r.name.clone(),
        scope: r.scope.to_string(),
        ports: r.ports.iter().map(|p| p.get()).collect(),
        approvers: r.approvers.clone(),
        min_approvals: r.min_approvals,
        deny_threshold: r.deny_threshold,
        require_justification: r.require_justification,
        justification_pattern: r.justification_pattern.clone(),
        pending_timeout: jitgate_core::duration::format_iso8601_secs(r.pending_timeout),
    }
}

fn name_param(name: &str) -> ApiResult<()> {
    approval::check_rule_name(name).map_err(ApiError::field)
}

/// Approval rules, by name (anyone who may read policies somewhere).
#[utoipa::path(get, path = "/api/v1/approvalRules", tag = "approvals",
    responses((status = 200, body = ApprovalRulePage)))]
pub async fn list_rules(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<ApprovalRulePage>> {
    let rules = state.store.approval_rules().await?;
    Ok(Json(ApprovalRulePage {
        value: rules
            .iter()
            .filter(|r| principal.can(Action::PolicyRead, &r.scope))
            .map(rule_wire)
            .collect(),
        continuation_token: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/approvalRules/{rule}", tag = "approvals",
    params(("rule" = String, Path)),
    responses((status = 200, body = ApprovalRuleOut)))]
pub async fn get_rule(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<ApprovalRuleOut>> {
    name_param(&name)?;
    let r = state
        .store
        .approval_rule(&name)
        .await?
        .filter(|r| principal.can(Action::PolicyRead, &r.scope))
        .ok_or_else(|| ApiError::not_found(format!("approval rule {name} not found")))?;
    Ok(Json(rule_wire(&r)))
}

/// Creates or replaces a rule: policy-write rights at its scope (and at the scope of
/// the rule it replaces); every approver named must be known to this controller.
#[utoipa::path(put, path = "/api/v1/approvalRules/{rule}", tag = "approvals",
    params(("rule" = String, Path)), request_body = ApprovalRuleIn,
    responses((status = 200, body = ApprovalRuleOut), (status = 201, body = ApprovalRuleOut)))]
pub async fn put_rule(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ApprovalRuleIn>,
) -> ApiResult<Response> {
    let input = ApprovalRuleInput {
        scope: body.scope,
        ports: body.ports,
        approvers: body.approvers,
        min_approvals: body.min_approvals,
        deny_threshold: body.deny_threshold,
        require_justification: body.require_justification,
        justification_pattern: body.justification_pattern,
        pending_timeout: body.pending_timeout,
    };
    let check = |p: &str| {
        crate::params::check_principal("approver", p).map_err(|_| {
            "must be 1 to 256 characters with no spaces or control characters".to_owned()
        })
    };
    let rule = approval::validate_rule(&name, &input, &check).map_err(ApiError::field)?;
    if rule.scope.subscription() != state.default_subscription() {
        return Err(ApiError::bad_param(
            "scope",
            format!(
                "must be inside this installation's subscription {}",
                state.default_subscription()
            ),
        ));
    }
    principal.require(Action::PolicyWrite, &rule.scope)?;
    if let Some(old) = state.store.approval_rule(&name).await? {
        principal.require(Action::PolicyWrite, &old.scope)?;
    }
    // An approver nobody knows is a typo that would make the rule unreachable.
    for (i, a) in rule.approvers.iter().enumerate() {
        if state.store.role_assignments(Some(a)).await?.is_empty() {
            return Err(ApiError::bad_param(
                &format!("approvers[{i}]"),
                format!("'{a}' holds no role here: assign it one first (jitgate role assign)"),
            ));
        }
    }
    let created = state
        .store
        .put_approval_rule(rule.clone(), principal.audit_ctx(ip, state.clock.now()))
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(rule_wire(&rule))).into_response())
}

/// Deletes a rule; requests already waiting under it keep their snapshot.
#[utoipa::path(delete, path = "/api/v1/approvalRules/{rule}", tag = "approvals",
    params(("rule" = String, Path)),
    responses((status = 200, description = "Deleted"), (status = 204, description = "There was no such rule")))]
pub async fn delete_rule(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    name_param(&name)?;
    let Some(old) = state.store.approval_rule(&name).await? else {
        return Ok(StatusCode::NO_CONTENT);
    };
    principal.require(Action::PolicyWrite, &old.scope)?;
    let deleted = state
        .store
        .delete_approval_rule(&name, principal.audit_ctx(ip, state.clock.now()))
        .await?;
    Ok(if deleted {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    })
}

fn reason_param(reason: Option<String>, required: bool) -> ApiResult<Option<String>> {
    match reason {
        Some(r) if r.len() > approval::MAX_REASON_LEN => Err(ApiError::bad_param(
            "reason",
            format!("is longer than {} characters", approval::MAX_REASON_LEN),
        )),
        Some(r) if !r.trim().is_empty() => Ok(Some(r)),
        _ if required => Err(ApiError::bad_param("reason", "is required")),
        _ => Ok(None),
    }
}

fn decide_error(e: DecideError) -> ApiError {
    let status = match e {
        DecideError::OwnRequest | DecideError::NotAnApprover => StatusCode::FORBIDDEN,
        DecideError::NotPending
        | DecideError::Expired
        | DecideError::AlreadyDecided
        | DecideError::PolicyChanged => StatusCode::CONFLICT,
    };
    let code = match e {
        DecideError::OwnRequest => "SelfApprovalRefused",
        DecideError::NotAnApprover => "NotAnApprover",
        DecideError::NotPending => "NotPending",
        DecideError::Expired => "ApprovalExpired",
        DecideError::AlreadyDecided => "AlreadyDecided",
        DecideError::PolicyChanged => "PolicyChanged",
    };
    ApiError::new(status, code, e.message())
}

async fn decide(
    state: &AppState,
    principal: &Principal,
    ip: std::net::IpAddr,
    id: &str,
    approve: bool,
    reason: Option<String>,
    (duration, source): (Option<i64>, Option<SourcePrefix>),
) -> ApiResult<Json<DecisionOut>> {
    let (id, _) = visible_or_reviewable(state, principal, id).await?;
    let now = state.clock.now();
    let decided = state
        .store
        .decide_request(
            DecideArgs {
                request: id,
                who: principal.name.clone(),
                approve,
                reason,
                duration,
                source,
                assignments: principal.assignments.clone(),
            },
            principal.audit_ctx(ip, now),
        )
        .await
        .map_err(|e| match e {
            OpError::Refused(DecideRefusal::NotFound) => {
                ApiError::not_found(format!("request {id} not found"))
            }
            OpError::Refused(DecideRefusal::Decide(d)) => decide_error(d),
            OpError::Refused(DecideRefusal::Invalid(f)) => ApiError::field(f),
            OpError::Store(s) => s.into(),
        })?;
    let r = &decided.request;
    if decided.outcome == Outcome::Approved {
        state.vm_changes.touch_grants(r.vms.iter().map(|v| &v.id));
        if let Some(first_end) = r
            .vms
            .iter()
            .flat_map(|v| v.ports.iter().filter(|p| p.is_live(now)).map(|p| p.end))
            .min()
        {
            state.initiated(first_end);
        }
    }
    let votes = r
        .approval
        .as_ref()
        .map(|a| a.votes.as_slice())
        .unwrap_or(&[]);
    let needed = r.approval.as_ref().map_or(0, |a| a.snapshot.min_approvals);
    Ok(Json(DecisionOut {
        outcome: match decided.outcome {
            Outcome::Counted { .. } => "counted",
            Outcome::Approved => "approved",
            Outcome::Denied => "denied",
        }
        .into(),
        approvals: votes.iter().filter(|v| v.approve).count() as u32,
        needed,
        request: request_wire(r, now),
    }))
}

/// A request the caller may see, or may decide on (an approver need not hold the read
/// action to be asked).
async fn visible_or_reviewable(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> ApiResult<(
    jitgate_core::request::RequestId,
    jitgate_core::request::AccessRequest,
)> {
    match visible_request(state, principal, id).await {
        Ok(v) => Ok(v),
        Err(e) => {
            let Ok(rid) = jitgate_core::request::RequestId::parse(id) else {
                return Err(e);
            };
            match state.store.get_request(rid).await? {
                Some(r) if crate::native::requests::reviewable(principal, &r) => Ok((rid, r)),
                _ => Err(e),
            }
        }
    }
}

/// Approves a pending request: counted per distinct principal; the last approval
/// needed opens its ports now, for their duration from now (shortened by `duration`,
/// narrowed to `sourcePrefix` if given; never widened). Nobody approves their own.
#[utoipa::path(post, path = "/api/v1/requests/{id}/approve", tag = "approvals",
    params(("id" = String, Path)), request_body(content = Option<ApproveIn>),
    responses((status = 200, body = DecisionOut)))]
pub async fn approve(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<ApproveIn>,
) -> ApiResult<Json<DecisionOut>> {
    let body = body.unwrap_or_default();
    let reason = reason_param(body.reason, false)?;
    let duration = body
        .duration
        .as_deref()
        .map(parse_iso8601_secs)
        .transpose()
        .map_err(|e| ApiError::bad_param("duration", e))?;
    let source = body
        .source_prefix
        .as_deref()
        .map(SourcePrefix::parse)
        .transpose()
        .map_err(|e| ApiError::bad_param("sourcePrefix", e))?;
    decide(
        &state,
        &principal,
        ip,
        &id,
        true,
        reason,
        (duration, source),
    )
    .await
}

/// Denies a pending request (a reason is required: the requestor is told it); at the
/// rule's deny threshold the request ends as denied.
#[utoipa::path(post, path = "/api/v1/requests/{id}/deny", tag = "approvals",
    params(("id" = String, Path)), request_body = DenyIn,
    responses((status = 200, body = DecisionOut)))]
pub async fn deny(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<DenyIn>,
) -> ApiResult<Json<DecisionOut>> {
    let reason = reason_param(body.reason, true)?;
    decide(&state, &principal, ip, &id, false, reason, (None, None)).await
}

/// The requestor withdraws its pending request.
#[utoipa::path(post, path = "/api/v1/requests/{id}/cancel", tag = "approvals",
    params(("id" = String, Path)),
    responses((status = 200, body = Request)))]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
) -> ApiResult<Json<Request>> {
    let (id, _) = visible_request(&state, &principal, &id).await?;
    let now = state.clock.now();
    let r = state
        .store
        .cancel_request(id, &principal.name, principal.audit_ctx(ip, now))
        .await
        .map_err(|e| match e {
            OpError::Refused(CancelRefusal::NotFound) => {
                ApiError::not_found(format!("request {id} not found"))
            }
            OpError::Refused(CancelRefusal::NotYours) => ApiError::new(
                StatusCode::FORBIDDEN,
                "NotYourRequest",
                "only the requestor cancels a request (approvers deny it)",
            ),
            OpError::Refused(CancelRefusal::NotPending) => ApiError::new(
                StatusCode::CONFLICT,
                "NotPending",
                "the request is not waiting for approval (revoke a live one)",
            ),
            OpError::Store(s) => s.into(),
        })?;
    Ok(Json(request_wire(&r, now)))
}

/// An approver marks a break-glass request reviewed (it stays flagged in lists until
/// then). Not its requestor; the approve action at every VM of the request.
#[utoipa::path(post, path = "/api/v1/requests/{id}/review", tag = "approvals",
    params(("id" = String, Path)),
    responses((status = 200, body = Request)))]
pub async fn review(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
) -> ApiResult<Json<Request>> {
    let (id, _) = visible_request(&state, &principal, &id).await?;
    let now = state.clock.now();
    let r = state
        .store
        .review_break_glass(
            id,
            &principal.name,
            principal.assignments.clone(),
            principal.audit_ctx(ip, now),
        )
        .await
        .map_err(|e| match e {
            OpError::Refused(ReviewRefusal::NotFound) => {
                ApiError::not_found(format!("request {id} not found"))
            }
            OpError::Refused(ReviewRefusal::NotBreakGlass) => ApiError::new(
                StatusCode::CONFLICT,
                "NotBreakGlass",
                "only break-glass requests are reviewed",
            ),
            OpError::Refused(ReviewRefusal::AlreadyReviewed) => ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyReviewed",
                "this break-glass request was reviewed already",
            ),
            OpError::Refused(ReviewRefusal::OwnRequest) => ApiError::new(
                StatusCode::FORBIDDEN,
                "SelfReviewRefused",
                "nobody reviews their own break-glass request",
            ),
            OpError::Refused(ReviewRefusal::NotAnApprover) => ApiError::forbidden(
                &principal.name,
                Action::RequestApprove.as_str(),
                &id.to_string(),
            ),
            OpError::Store(s) => s.into(),
        })?;
    Ok(Json(request_wire(&r, now)))
}
