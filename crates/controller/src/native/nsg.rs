//! A VM's NSG view (what its firewall enforces, in Azure's rule form) and its user
//! rules.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jitgate_core::ids::VmId;
use jitgate_core::nsg::RuleOrigin;
use jitgate_core::rbac::Action;
use jitgate_proto::api::{JitOrigin, NsgRule, NsgRuleInput, NsgRuleList, NsgView};
use jitgate_store::{NsgRuleError, OpError};

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::params;

pub fn rule_wire(r: &jitgate_core::nsg::NsgRule) -> NsgRule {
    let (origin, jit) = match &r.origin {
        RuleOrigin::User => ("user", None),
        RuleOrigin::JitDeny { policy } => (
            "jit-deny",
            Some(JitOrigin {
                policy: Some(policy.clone()),
                request: None,
                end_time_utc: None,
            }),
        ),
        RuleOrigin::JitAllow { request, expires } => (
            "jit-allow",
            Some(JitOrigin {
                policy: None,
                request: Some(request.to_string()),
                end_time_utc: Some(expires.to_string()),
            }),
        ),
    };
    NsgRule {
        name: r.name.clone(),
        priority: r.priority,
        access: r.access.as_str().to_owned(),
        direction: "Inbound".to_owned(),
        protocol: r.protocol.as_str().to_owned(),
        source_address_prefixes: r.sources.iter().map(|s| s.to_string()).collect(),
        destination_port_ranges: r.ports.iter().map(|p| p.to_string()).collect(),
        description: r.description.clone(),
        origin: origin.to_owned(),
        jit,
    }
}

/// A registered VM the caller may read, from the path's resource group and name.
pub async fn readable_vm(
    state: &AppState,
    principal: &Principal,
    rg: &str,
    name: &str,
) -> ApiResult<VmId> {
    let id = params::vm_param(state, rg, name)?;
    principal.require(Action::VmRead, &id.scope())?;
    if state.store.get_vm(&id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "virtual machine '{id}' is not registered"
        )));
    }
    Ok(id)
}

/// The rules the VM's firewall enforces now: user rules, JIT deny rules of its policy,
/// JIT allow rules of live grants, by priority.
#[utoipa::path(get, path = "/api/v1/vms/{rg}/{name}/nsg", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = NsgView)))]
pub async fn get_nsg(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<Json<NsgView>> {
    let id = readable_vm(&state, &principal, &rg, &name).await?;
    let rules = crate::desired::nsg_now(&state, &id, state.clock.now()).await?;
    Ok(Json(NsgView {
        vm: id.to_string(),
        rules: rules.iter().map(rule_wire).collect(),
    }))
}

/// The VM's user rules.
#[utoipa::path(get, path = "/api/v1/vms/{rg}/{name}/nsg/rules", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = NsgRuleList)))]
pub async fn list_nsg_rules(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<Json<NsgRuleList>> {
    let id = readable_vm(&state, &principal, &rg, &name).await?;
    let rules = state.store.nsg_rules(&id).await?;
    Ok(Json(NsgRuleList {
        value: rules.iter().map(rule_wire).collect(),
    }))
}

/// Creates (201) or replaces (200) a user rule.
#[utoipa::path(put, path = "/api/v1/vms/{rg}/{name}/nsg/rules/{rule}", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path), ("rule" = String, Path, description = "Rule name")),
    request_body = NsgRuleInput,
    responses((status = 201, body = NsgRule), (status = 200, description = "Replaced", body = NsgRule)))]
pub async fn put_nsg_rule(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name, rule)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<NsgRuleInput>,
) -> ApiResult<Response> {
    let id = params::vm_param(&state, &rg, &name)?;
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
            OpError::Refused(NsgRuleError::UnknownVm) => {
                ApiError::not_found(format!("virtual machine '{id}' is not registered"))
            }
            OpError::Refused(NsgRuleError::PriorityTaken(other)) => ApiError::new(
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
    Ok((status, Json(rule_wire(&parsed))).into_response())
}

/// Deletes a user rule (200 deleted, 204 there was none).
#[utoipa::path(delete, path = "/api/v1/vms/{rg}/{name}/nsg/rules/{rule}", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path), ("rule" = String, Path)),
    responses((status = 200, description = "Deleted"), (status = 204, description = "There was no such rule")))]
pub async fn delete_nsg_rule(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name, rule)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let id = params::vm_param(&state, &rg, &name)?;
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
