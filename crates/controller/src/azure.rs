//! The Azure-compatible API: `Microsoft.Security/locations/jitNetworkAccessPolicies`,
//! api-version 2020-01-01, as in `shared/reference/azure-jit/jitNetworkAccessPolicies.json`.
//!
//! Wire types here are one view of the core's model; they convert explicitly. Input
//! types are permissive (every field optional, numbers as i64) so that the core's
//! validation, not serde, names what is wrong.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jitgate_core::ids::{Location, PolicyName, ResourceGroup, Scope, SubscriptionId, VmId};
use jitgate_core::policy::{
    AllowedSources, Policy, PolicyInput, PolicyKey, PolicySpec, PolicyVmInput, PortRuleInput,
    RawPrefix, validate_policy,
};
use jitgate_core::rbac::Action;
use jitgate_core::request::{
    AccessRequest, InitiateInput, InitiatePortInput, InitiateVmInput, PortStatus, RequestId,
    RevokeReason,
};
use jitgate_store::{InitiateArgs, InitiateRefusal, OpError, PolicyError, PolicyFilter};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};

pub const API_VERSION: &str = "2020-01-01";
pub const POLICY_TYPE: &str = "Microsoft.Security/locations/jitNetworkAccessPolicies";
/// How many of a policy's requests `properties.requests` shows (newest first); the
/// native API lists all.
pub const REQUESTS_SHOWN: usize = 100;
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

// ---- wire types: input -------------------------------------------------------------

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    List(Vec<String>),
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRuleIn {
    number: Option<i64>,
    protocol: Option<String>,
    allowed_source_address_prefix: Option<StringOrList>,
    allowed_source_address_prefixes: Option<Vec<String>>,
    max_request_access_duration: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVmIn {
    id: Option<String>,
    ports: Option<Vec<PortRuleIn>>,
    public_ip_address: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPropertiesIn {
    virtual_machines: Option<Vec<PolicyVmIn>>,
    // `requests` and `provisioningState` are the server's: ignored on input.
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct PolicyIn {
    kind: Option<String>,
    properties: Option<PolicyPropertiesIn>,
    // `id`, `name`, `type`, `location` are read-only: ignored on input.
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitiatePortIn {
    number: Option<i64>,
    allowed_source_address_prefix: Option<String>,
    end_time_utc: Option<String>,
    duration: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitiateVmIn {
    id: Option<String>,
    ports: Option<Vec<InitiatePortIn>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitiateIn {
    virtual_machines: Option<Vec<InitiateVmIn>>,
    justification: Option<String>,
}

impl From<PolicyIn> for PolicyInput {
    fn from(p: PolicyIn) -> Self {
        PolicyInput {
            kind: p.kind,
            virtual_machines: p.properties.and_then(|pr| pr.virtual_machines).map(|vms| {
                vms.into_iter()
                    .map(|v| PolicyVmInput {
                        id: v.id,
                        public_ip_address: v.public_ip_address,
                        ports: v.ports.map(|ports| {
                            ports
                                .into_iter()
                                .map(|r| PortRuleInput {
                                    number: r.number,
                                    protocol: r.protocol,
                                    allowed_source_address_prefix: r
                                        .allowed_source_address_prefix
                                        .map(|x| match x {
                                            StringOrList::One(s) => RawPrefix::One(s),
                                            StringOrList::List(l) => RawPrefix::List(l),
                                        }),
                                    allowed_source_address_prefixes: r
                                        .allowed_source_address_prefixes,
                                    max_request_access_duration: r.max_request_access_duration,
                                })
                                .collect()
                        }),
                    })
                    .collect()
            }),
        }
    }
}

impl From<InitiateIn> for InitiateInput {
    fn from(i: InitiateIn) -> Self {
        InitiateInput {
            justification: i.justification,
            virtual_machines: i.virtual_machines.map(|vms| {
                vms.into_iter()
                    .map(|v| InitiateVmInput {
                        id: v.id,
                        ports: v.ports.map(|ports| {
                            ports
                                .into_iter()
                                .map(|p| InitiatePortInput {
                                    number: p.number,
                                    allowed_source_address_prefix: p.allowed_source_address_prefix,
                                    end_time_utc: p.end_time_utc,
                                    duration: p.duration,
                                })
                                .collect()
                        }),
                    })
                    .collect()
            }),
        }
    }
}

// ---- wire types: output ------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRuleOut {
    pub number: u16,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefixes: Option<Vec<String>>,
    pub max_request_access_duration: String,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVmOut {
    pub id: String,
    pub ports: Vec<PortRuleOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_ip_address: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestPortOut {
    pub number: u16,
    /// The port of the gateway's public address that leads to `number`, for a VM
    /// behind a DNAT gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped_port: Option<u16>,
    pub allowed_source_address_prefix: String,
    pub end_time_utc: String,
    pub status: String,
    pub status_reason: String,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestVmOut {
    pub id: String,
    pub ports: Vec<RequestPortOut>,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestOut {
    pub virtual_machines: Vec<RequestVmOut>,
    pub start_time_utc: String,
    pub requestor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPropertiesOut {
    pub virtual_machines: Vec<PolicyVmOut>,
    pub requests: Vec<RequestOut>,
    pub provisioning_state: String,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct PolicyOut {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind_type: String,
    pub location: String,
    pub kind: String,
    pub properties: PolicyPropertiesOut,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyListOut {
    pub value: Vec<PolicyOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
}

/// Azure's wire has three revoke reasons; a port revoked because the policy changed
/// was revoked at a user's request (the native API keeps the precise reason).
fn azure_reason(s: PortStatus) -> &'static str {
    match s {
        PortStatus::Revoked(RevokeReason::PolicyChanged) => RevokeReason::UserRequested.as_str(),
        other => other.reason_str(),
    }
}

/// The placements of VMs behind a DNAT gateway, by VM key: they give a policy's VM its
/// `publicIpAddress` and a request's port its `mappedPort`, as on Azure Firewall.
pub type DnatPlaces = HashMap<String, jitgate_core::gateway::Placement>;

/// The DNAT placements of `vms`.
pub async fn dnat_places<'a>(
    state: &AppState,
    vms: impl IntoIterator<Item = &'a VmId>,
) -> ApiResult<DnatPlaces> {
    let vms: Vec<VmId> = vms.into_iter().cloned().collect();
    Ok(state
        .store
        .placements(&vms)
        .await?
        .into_iter()
        .filter(|(_, p)| p.place.mode == jitgate_core::gateway::Mode::Dnat)
        .map(|(v, p)| (v.key(), p.place))
        .collect())
}

pub fn request_out(r: &AccessRequest, places: &DnatPlaces) -> RequestOut {
    RequestOut {
        virtual_machines: r
            .vms
            .iter()
            .map(|vm| RequestVmOut {
                id: vm.id.to_string(),
                ports: vm
                    .ports
                    .iter()
                    .map(|p| RequestPortOut {
                        number: p.number.get(),
                        mapped_port: places
                            .get(&vm.id.key())
                            .and_then(|pl| pl.mapped_port(p.number))
                            .map(|m| m.get()),
                        allowed_source_address_prefix: p.source.to_string(),
                        end_time_utc: p.end.to_string(),
                        status: p.status.status_str().to_owned(),
                        status_reason: azure_reason(p.status).to_owned(),
                    })
                    .collect(),
            })
            .collect(),
        start_time_utc: r.start.to_string(),
        requestor: r.requestor.clone(),
        justification: r.justification.clone(),
    }
}

pub fn policy_out(p: &Policy, requests: &[AccessRequest], places: &DnatPlaces) -> PolicyOut {
    PolicyOut {
        id: p.key.id(),
        name: p.key.name.to_string(),
        kind_type: POLICY_TYPE.to_owned(),
        location: p.key.location.to_string(),
        kind: p.spec.kind.clone(),
        properties: PolicyPropertiesOut {
            virtual_machines: p
                .spec
                .vms
                .iter()
                .map(|vm| PolicyVmOut {
                    id: vm.id.to_string(),
                    // Behind a DNAT gateway: its public address, as Azure shows its
                    // firewall's; otherwise what the caller stored.
                    public_ip_address: places
                        .get(&vm.id.key())
                        .and_then(|pl| pl.public)
                        .map(|a| a.to_string())
                        .or_else(|| vm.public_ip_address.clone()),
                    ports: vm
                        .ports
                        .iter()
                        .map(|r| {
                            let prefixes: Vec<String> =
                                r.allowed.prefixes().iter().map(|x| x.to_string()).collect();
                            let (one, many) = match &r.allowed {
                                AllowedSources::Single(_) => (prefixes.into_iter().next(), None),
                                AllowedSources::Many(_) => (None, Some(prefixes)),
                            };
                            PortRuleOut {
                                number: r.number.get(),
                                protocol: r.protocol.as_str().to_owned(),
                                allowed_source_address_prefix: one,
                                allowed_source_address_prefixes: many,
                                max_request_access_duration: r.max_duration.as_str().to_owned(),
                            }
                        })
                        .collect(),
                })
                .collect(),
            requests: requests.iter().map(|r| request_out(r, places)).collect(),
            provisioning_state: "Succeeded".to_owned(),
        },
    }
}

// ---- parameters ----------------------------------------------------------------------

/// The caller's idempotency key: `Idempotency-Key`, else Azure's
/// `x-ms-client-request-id` (its SDKs send the same one with every retry of a call).
/// 1 to 128 visible ASCII characters.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> ApiResult<Option<String>> {
    for name in ["idempotency-key", "x-ms-client-request-id"] {
        if let Some(v) = headers.get(name) {
            let ok = v.to_str().ok().filter(|t| {
                !t.is_empty() && t.len() <= 128 && t.bytes().all(|b| b.is_ascii_graphic())
            });
            return match ok {
                Some(t) => Ok(Some(t.to_owned())),
                None => Err(ApiError::bad_param(
                    name,
                    "must be 1 to 128 visible ASCII characters".to_owned(),
                )),
            };
        }
    }
    Ok(None)
}

pub fn check_api_version(q: &HashMap<String, String>) -> ApiResult<()> {
    match q.get("api-version").map(String::as_str) {
        Some(API_VERSION) => Ok(()),
        None => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            format!("The api-version query parameter (?api-version=) is required for all requests. Supported: {API_VERSION}."),
        )
        .with_target("api-version")),
        Some(v) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidApiVersionParameter",
            format!("The api-version '{v}' is invalid. The supported version is '{API_VERSION}'."),
        )
        .with_target("api-version")),
    }
}

pub fn subscription_param(state: &AppState, s: &str) -> ApiResult<SubscriptionId> {
    let sub = SubscriptionId::parse(s).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidSubscriptionId",
            format!("subscriptionId: {e}"),
        )
        .with_target("subscriptionId")
    })?;
    if !state.subscriptions.contains(&sub) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "SubscriptionNotFound",
            format!("The subscription '{sub}' could not be found."),
        )
        .with_target("subscriptionId"));
    }
    Ok(sub)
}

pub fn rg_param(s: &str) -> ApiResult<ResourceGroup> {
    ResourceGroup::parse(s).map_err(|e| ApiError::bad_param("resourceGroupName", e))
}

fn location_param(s: &str) -> ApiResult<Location> {
    Location::parse(s).map_err(|e| ApiError::bad_param("ascLocation", e))
}

fn policy_key(
    state: &AppState,
    sub: &str,
    rg: &str,
    loc: &str,
    name: &str,
) -> ApiResult<PolicyKey> {
    Ok(PolicyKey {
        subscription: subscription_param(state, sub)?,
        resource_group: rg_param(rg)?,
        location: location_param(loc)?,
        name: PolicyName::parse(name)
            .map_err(|e| ApiError::bad_param("jitNetworkAccessPolicyName", e))?,
    })
}

fn page_size(q: &HashMap<String, String>) -> ApiResult<usize> {
    crate::params::count_param(q, "$top", DEFAULT_PAGE, MAX_PAGE)
}

fn skip_token(q: &HashMap<String, String>) -> ApiResult<Option<String>> {
    match q.get("$skipToken") {
        None => Ok(None),
        Some(t) => hex::decode(t)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_param("$skipToken", "is not a token this server issued")),
    }
}

// ---- visibility ------------------------------------------------------------------------

/// The part of a policy the caller may read: all of it with read on its resource
/// group (or above), else only the VMs they may read; `None` when nothing.
fn visible_part(principal: &Principal, p: &Policy) -> Option<Policy> {
    let rg = Scope::ResourceGroup(p.key.subscription, p.key.resource_group.clone());
    if principal.can(Action::PolicyRead, &rg) {
        return Some(p.clone());
    }
    let vms: Vec<_> = p
        .spec
        .vms
        .iter()
        .filter(|v| principal.can(Action::PolicyRead, &v.id.scope()))
        .cloned()
        .collect();
    if vms.is_empty() {
        return None;
    }
    Some(Policy {
        key: p.key.clone(),
        spec: PolicySpec {
            kind: p.spec.kind.clone(),
            vms,
        },
    })
}

/// Requests filtered to the VMs of the (possibly partial) policy view.
fn visible_requests(view: &Policy, requests: Vec<AccessRequest>) -> Vec<AccessRequest> {
    requests
        .into_iter()
        .filter_map(|mut r| {
            r.vms.retain(|v| view.vm(&v.id).is_some());
            (!r.vms.is_empty()).then_some(r)
        })
        .collect()
}

async fn render(state: &AppState, view: &Policy) -> ApiResult<PolicyOut> {
    let requests = state
        .store
        .policy_requests(&view.key, REQUESTS_SHOWN)
        .await?;
    let places = dnat_places(state, view.spec.vms.iter().map(|v| &v.id)).await?;
    Ok(policy_out(view, &visible_requests(view, requests), &places))
}

// ---- handlers --------------------------------------------------------------------------

async fn list(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    path: &str,
    q: &HashMap<String, String>,
    filter: PolicyFilter,
) -> ApiResult<Json<PolicyListOut>> {
    let limit = page_size(q)?;
    let after = skip_token(q)?;
    let page = state
        .store
        .list_policies(&filter, after.as_deref(), limit)
        .await?;
    let mut value = Vec::with_capacity(page.len());
    for p in &page {
        if let Some(view) = visible_part(principal, p) {
            value.push(render(state, &view).await?);
        }
    }
    let next_link = if page.len() == limit {
        page.last().map(|last| {
            let mut link = format!(
                "{}{path}?api-version={API_VERSION}&$skipToken={}",
                crate::base_url(state, headers),
                hex::encode(last.key.key())
            );
            if q.contains_key("$top") {
                link.push_str(&format!("&$top={limit}"));
            }
            link
        })
    } else {
        None
    };
    Ok(Json(PolicyListOut { value, next_link }))
}

#[utoipa::path(get, path = "/subscriptions/{sub}/providers/Microsoft.Security/jitNetworkAccessPolicies", tag = "azure",
    params(("sub" = String, Path, description = "Subscription id"), ("api-version" = String, Query, description = "2020-01-01"), ("$top" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"), ("$skipToken" = Option<String>, Query, description = "From nextLink")),
    responses((status = 200, body = PolicyListOut)))]
pub async fn list_subscription(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    Path(sub): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<PolicyListOut>> {
    check_api_version(&q)?;
    let sub = subscription_param(&state, &sub)?;
    let path =
        format!("/subscriptions/{sub}/providers/Microsoft.Security/jitNetworkAccessPolicies");
    let filter = PolicyFilter {
        subscription: Some(sub),
        ..Default::default()
    };
    list(&state, &principal, &headers, &path, &q, filter).await
}

#[utoipa::path(get, path = "/subscriptions/{sub}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies", tag = "azure",
    params(("sub" = String, Path, description = "Subscription id"), ("api-version" = String, Query, description = "2020-01-01"), ("loc" = String, Path), ("$top" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"), ("$skipToken" = Option<String>, Query, description = "From nextLink")),
    responses((status = 200, body = PolicyListOut)))]
pub async fn list_region(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    Path((sub, loc)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<PolicyListOut>> {
    check_api_version(&q)?;
    let sub = subscription_param(&state, &sub)?;
    let loc = location_param(&loc)?;
    let path = format!(
        "/subscriptions/{sub}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies"
    );
    let filter = PolicyFilter {
        subscription: Some(sub),
        location: Some(loc),
        ..Default::default()
    };
    list(&state, &principal, &headers, &path, &q, filter).await
}

#[utoipa::path(get, path = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/jitNetworkAccessPolicies", tag = "azure",
    params(("sub" = String, Path, description = "Subscription id"), ("api-version" = String, Query, description = "2020-01-01"), ("rg" = String, Path), ("$top" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"), ("$skipToken" = Option<String>, Query, description = "From nextLink")),
    responses((status = 200, body = PolicyListOut)))]
pub async fn list_resource_group(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    Path((sub, rg)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<PolicyListOut>> {
    check_api_version(&q)?;
    let sub = subscription_param(&state, &sub)?;
    let rg = rg_param(&rg)?;
    let path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/jitNetworkAccessPolicies"
    );
    let filter = PolicyFilter {
        subscription: Some(sub),
        resource_group: Some(rg),
        ..Default::default()
    };
    list(&state, &principal, &headers, &path, &q, filter).await
}

#[utoipa::path(get, path = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies", tag = "azure",
    params(("sub" = String, Path, description = "Subscription id"), ("api-version" = String, Query, description = "2020-01-01"), ("rg" = String, Path), ("loc" = String, Path), ("$top" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"), ("$skipToken" = Option<String>, Query, description = "From nextLink")),
    responses((status = 200, body = PolicyListOut)))]
pub async fn list_resource_group_region(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    Path((sub, rg, loc)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<PolicyListOut>> {
    check_api_version(&q)?;
    let sub = subscription_param(&state, &sub)?;
    let rg = rg_param(&rg)?;
    let loc = location_param(&loc)?;
    let path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies"
    );
    let filter = PolicyFilter {
        subscription: Some(sub),
        resource_group: Some(rg),
        location: Some(loc),
    };
    list(&state, &principal, &headers, &path, &q, filter).await
}

fn policy_not_found(key: &PolicyKey) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!(
            "The JIT network access policy '{}' was not found.",
            key.id()
        ),
    )
}

#[utoipa::path(get, path = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/{name}", tag = "azure",
    params(("sub" = String, Path), ("rg" = String, Path), ("loc" = String, Path), ("name" = String, Path), ("api-version" = String, Query, description = "2020-01-01")),
    responses((status = 200, body = PolicyOut)))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path((sub, rg, loc, name)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<PolicyOut>> {
    check_api_version(&q)?;
    let key = policy_key(&state, &sub, &rg, &loc, &name)?;
    let rg_scope = Scope::ResourceGroup(key.subscription, key.resource_group.clone());
    let Some(policy) = state.store.get_policy(&key).await? else {
        principal
            .require(Action::PolicyRead, &rg_scope)
            .or_else(|e| {
                // A caller with read on some VM of the group learns only "not found".
                if jitgate_core::rbac::is_allowed_somewhere_under(
                    &principal.assignments,
                    &principal.name,
                    Action::PolicyRead,
                    &rg_scope,
                ) {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        return Err(policy_not_found(&key));
    };
    let view = visible_part(&principal, &policy).ok_or_else(|| {
        ApiError::forbidden(
            &principal.name,
            Action::PolicyRead.as_str(),
            &rg_scope.to_string(),
        )
    })?;
    Ok(Json(render(&state, &view).await?))
}

#[utoipa::path(put, path = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/{name}", tag = "azure",
    params(("sub" = String, Path), ("rg" = String, Path), ("loc" = String, Path), ("name" = String, Path), ("api-version" = String, Query, description = "2020-01-01")), request_body = PolicyIn,
    responses((status = 200, body = PolicyOut)))]
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((sub, rg, loc, name)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    JsonBody(body): JsonBody<PolicyIn>,
) -> ApiResult<Json<PolicyOut>> {
    check_api_version(&q)?;
    let key = policy_key(&state, &sub, &rg, &loc, &name)?;
    principal.require(
        Action::PolicyWrite,
        &Scope::ResourceGroup(key.subscription, key.resource_group.clone()),
    )?;
    if body.properties.is_none() {
        return Err(ApiError::field(jitgate_core::FieldError::new(
            "properties",
            "is required",
        )));
    }
    let spec = validate_policy(&key, &body.into()).map_err(ApiError::field)?;
    let audit = principal.audit_ctx(ip, state.clock.now());
    let new_vms: Vec<jitgate_core::ids::VmId> = spec.vms.iter().map(|v| v.id.clone()).collect();
    let outcome = state
        .store
        .put_policy(key.clone(), spec, audit)
        .await
        .map_err(|e| match e {
            OpError::Refused(PolicyError::UnknownSubscription(s)) => ApiError::new(
                StatusCode::NOT_FOUND,
                "SubscriptionNotFound",
                format!("subscription {s} not found"),
            ),
            OpError::Refused(PolicyError::UnknownVm(f)) => ApiError::field(f),
            OpError::Refused(PolicyError::VmInOtherPolicy(f) | PolicyError::NoMappedPort(f)) => {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("{}: {}", f.field, f.message),
                )
                .with_target(f.field)
            }
            OpError::Store(s) => s.into(),
        })?;
    state.changed(outcome.revoked.len());
    state
        .vm_changes
        .touch(outcome.previous_vms.iter().chain(new_vms.iter()));
    let policy = state
        .store
        .get_policy(&key)
        .await?
        .ok_or_else(|| ApiError::internal("policy vanished after write"))?;
    Ok(Json(render(&state, &policy).await?))
}

#[utoipa::path(delete, path = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/{name}", tag = "azure",
    params(("sub" = String, Path), ("rg" = String, Path), ("loc" = String, Path), ("name" = String, Path), ("api-version" = String, Query, description = "2020-01-01")),
    responses((status = 200, description = "Deleted"), (status = 204, description = "There was no such policy")))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((sub, rg, loc, name)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    check_api_version(&q)?;
    let key = policy_key(&state, &sub, &rg, &loc, &name)?;
    principal.require(
        Action::PolicyDelete,
        &Scope::ResourceGroup(key.subscription, key.resource_group.clone()),
    )?;
    let audit = principal.audit_ctx(ip, state.clock.now());
    match state.store.delete_policy(&key, audit).await? {
        Some(deleted) => {
            state.changed(deleted.revoked.len());
            state.vm_changes.touch(&deleted.vms);
            Ok(StatusCode::OK)
        }
        None => Ok(StatusCode::NO_CONTENT),
    }
}

#[utoipa::path(post, path = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/{name}/{action}", tag = "azure",
    params(("sub" = String, Path), ("rg" = String, Path), ("loc" = String, Path), ("name" = String, Path), ("api-version" = String, Query, description = "2020-01-01"), ("action" = String, Path, description = "initiate"),
        ("Idempotency-Key" = Option<String>, Header, max_length = 128, pattern = "^[!-~]{1,128}$", description = "A retry with the key of a request already made (by the same caller, within 24 hours) answers with that request and changes nothing"),
        ("x-ms-client-request-id" = Option<String>, Header, max_length = 128, pattern = "^[!-~]{1,128}$", description = "Azure's SDKs' request id, used as the idempotency key when there is no Idempotency-Key"),
        ("x-jitgate-break-glass" = Option<bool>, Header, description = "true: break-glass access (the JIT Break-glass role): every port opens now whatever the approval rules say, a justification is required, at most the controller's break-glass maximum (default PT1H); flagged until an approver reviews it")), request_body = InitiateIn,
    responses((status = 202, description = "Accepted: the ports open within milliseconds", body = RequestOut,
        headers(("x-jitgate-request-id" = String, description = "The request's id in the native API")))))]
pub async fn initiate(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((sub, rg, loc, name, action)): Path<(String, String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<InitiateIn>,
) -> ApiResult<Response> {
    let idempotency_key = idempotency_key(&headers)?;
    let break_glass = match headers
        .get("x-jitgate-break-glass")
        .map(|v| v.to_str().unwrap_or_default().to_ascii_lowercase())
    {
        None => false,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(_) => {
            return Err(ApiError::bad_param(
                "x-jitgate-break-glass",
                "must be true or false",
            ));
        }
    };
    check_api_version(&q)?;
    let key = policy_key(&state, &sub, &rg, &loc, &name)?;
    if !action.eq_ignore_ascii_case("initiate") {
        return Err(ApiError::bad_param(
            "jitNetworkAccessPolicyInitiateType",
            format!("'{action}' is not a supported action (only 'initiate')"),
        ));
    }
    let now = state.clock.now();
    let input: InitiateInput = body.into();
    // The machines asked for, for their mapped ports: read beside the write, not
    // after it (a placement is the same before and after an initiate).
    let asked: Vec<VmId> = input
        .virtual_machines
        .iter()
        .flatten()
        .filter_map(|v| VmId::parse(v.id.as_deref()?).ok())
        .collect();
    let args = InitiateArgs {
        policy: key.clone(),
        input,
        id: RequestId::new(uuid::Uuid::new_v4()),
        requestor: principal.name.clone(),
        caller_ip: ip,
        assignments: principal.assignments.clone(),
        idempotency_key,
        break_glass: break_glass.then_some(state.break_glass_max),
    };
    let audit = principal.audit_ctx(ip, now);
    // Listening for the agents' answers starts before the change is made, so that an
    // agent quicker than this handler is not missed.
    let mut acks: Vec<(VmId, crate::desired::AckWait)> = asked
        .iter()
        .map(|v| (v.clone(), state.vm_changes.expect_ack(v)))
        .collect();
    let (request, places) = tokio::join!(
        state.store.initiate(args, audit),
        dnat_places(&state, asked.iter())
    );
    let request = request.map_err(|e| match e {
        OpError::Refused(InitiateRefusal::PolicyNotFound) => policy_not_found(&key),
        OpError::Refused(InitiateRefusal::Invalid(f)) => ApiError::field(f),
        OpError::Refused(InitiateRefusal::Forbidden { field, vm }) => ApiError::forbidden(
            &principal.name,
            if break_glass {
                Action::BreakGlass.as_str()
            } else {
                Action::Initiate.as_str()
            },
            &vm.to_string(),
        )
        .with_target(field),
        OpError::Store(s) => s.into(),
    })?;
    // The machines whose agent is long-polling now and that this request opens.
    let enforced: Vec<VmId> = request
        .vms
        .iter()
        .filter(|v| v.ports.iter().any(|p| p.status == PortStatus::Initiated))
        .map(|v| v.id.clone())
        .filter(|v| state.vm_changes.is_polled(v))
        .collect();
    state
        .vm_changes
        .touch_grants(request.vms.iter().map(|v| &v.id));
    // The expiry task wakes for the first grant's end, or the end of a wait for
    // approval (a pending port's own end counts only once it is approved).
    if let Some(first_end) = request
        .vms
        .iter()
        .flat_map(|v| {
            v.ports
                .iter()
                .filter(|p| p.status == PortStatus::Initiated)
                .map(|p| p.end)
        })
        .chain(request.approval.as_ref().map(|a| a.snapshot.pending_until))
        .min()
    {
        state.initiated(first_end);
    }
    let places = places?;
    // Answered once those agents have taken the state that opens the ports (their
    // next long-poll names it), for at most `ENFORCED_WAIT`: a client that connects
    // as soon as it has the answer finds the port open. An agent that is offline, or
    // slow, costs nothing or at most that wait; the answer is the same either way.
    let deadline = tokio::time::Instant::now() + crate::desired::ENFORCED_WAIT;
    for vm in &enforced {
        let Some((_, wait)) = acks.iter_mut().find(|(v, _)| v.key() == vm.key()) else {
            continue;
        };
        let Ok(built) = crate::desired::agent_state(&state, vm).await else {
            continue;
        };
        let changes = state.vm_changes.clone();
        wait.until(
            |k| {
                built.is_revision(k)
                    || changes
                        .current(vm, state.clock.now())
                        .is_some_and(|b| b.is_revision(k))
            },
            deadline,
        )
        .await;
    }
    drop(acks);
    let mut resp = (StatusCode::ACCEPTED, Json(request_out(&request, &places))).into_response();
    if let Ok(v) = HeaderValue::from_str(&request.id.to_string()) {
        resp.headers_mut().insert("x-jitgate-request-id", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jitgate_core::ids::VmId;
    use jitgate_core::request::{InitiateContext, InitiateError, plan_initiate};
    use proptest::prelude::*;
    use serde_json::{Value, json};

    const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

    fn key() -> PolicyKey {
        PolicyKey {
            subscription: SubscriptionId::parse(SUB).unwrap(),
            resource_group: ResourceGroup::parse("rg").unwrap(),
            location: Location::parse("westeurope").unwrap(),
            name: PolicyName::parse("default").unwrap(),
        }
    }

    fn vm(name: &str) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"
        )
    }

    /// Azure's documented example, with both forms of allowed sources.
    fn policy_body() -> Value {
        json!({"kind": "Basic", "properties": {"virtualMachines": [{
            "id": vm("vm1"),
            "ports": [
                {"number": 22, "protocol": "*", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT3H"},
                {"number": 3389, "protocol": "TCP", "allowedSourceAddressPrefixes": ["10.0.0.0/8", "192.168.0.0/16"], "maxRequestAccessDuration": "PT1H"},
                {"number": 5985, "protocol": "UDP", "allowedSourceAddressPrefix": ["10.0.0.0/8"]}
            ],
            "publicIpAddress": "203.0.113.7"
        }]}})
    }

    fn initiate_body() -> Value {
        json!({"virtualMachines": [{"id": vm("vm1"), "ports": [
            {"number": 22, "duration": "PT1H"},
            {"number": 3389, "allowedSourceAddressPrefix": "10.1.0.0/16", "endTimeUtc": "2026-01-01T00:30:00Z"}
        ]}], "justification": "maintenance"})
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            prop::sample::select(vec![
                "*",
                "TCP",
                "PT3H",
                "P2D",
                "10.0.0.5/24",
                "::ffff:1.2.3.4/64"
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "kind",
                            "properties",
                            "virtualMachines",
                            "id",
                            "ports",
                            "number",
                            "protocol",
                            "allowedSourceAddressPrefix",
                            "allowedSourceAddressPrefixes",
                            "maxRequestAccessDuration",
                            "duration",
                            "endTimeUtc",
                            "justification",
                            "x",
                        ]),
                        inner,
                    ),
                    0..5,
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    /// Every JSON pointer of `v`, the root first.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    pointers(x, format!("{at}/{i}"), out);
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    pointers(x, format!("{at}/{k}"), out);
                }
            }
            _ => {}
        }
    }

    /// A body: a valid one with one node replaced, maybe a byte changed, or any JSON.
    fn arb_body(valid: fn() -> Value) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => (
                any::<prop::sample::Index>(),
                arb_json(),
                proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
            )
                .prop_map(move |(at, with, byte)| {
                    let mut v = valid();
                    let mut all = Vec::new();
                    pointers(&v, String::new(), &mut all);
                    *v.pointer_mut(&all[at.index(all.len())]).unwrap() = with;
                    let mut bytes = serde_json::to_vec(&v).unwrap();
                    if let Some((i, b)) = byte {
                        let i = i.index(bytes.len());
                        bytes[i] = b;
                    }
                    bytes
                }),
            1 => arb_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ]
    }

    fn bad_request(e: &ApiError) -> bool {
        e.status == StatusCode::BAD_REQUEST && e.code == "InvalidRequestContent"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A policy body: refused as a 400 when it does not decode, else validated with
        /// any refusal naming a field of the body.
        #[test]
        fn policy_bodies(bytes in arb_body(policy_body)) {
            match crate::body::decode::<PolicyIn>(&bytes) {
                Err(e) => prop_assert!(bad_request(&e), "{:?}", e.message),
                Ok(body) => {
                    if let Err(e) = validate_policy(&key(), &body.into()) {
                        prop_assert!(
                            e.field == "kind" || e.field.starts_with("properties.virtualMachines"),
                            "{}", e
                        );
                    }
                }
            }
        }

        /// An initiate body, against the example policy: the same.
        #[test]
        fn initiate_bodies(bytes in arb_body(initiate_body)) {
            let body: PolicyIn = serde_json::from_value(policy_body()).unwrap();
            let policy = Policy { key: key(), spec: validate_policy(&key(), &body.into()).unwrap() };
            let ctx = InitiateContext {
                id: RequestId::new(uuid::Uuid::from_u128(1)),
                policy: &policy,
                requestor: "alice",
                caller_ip: "10.0.0.9".parse().unwrap(),
                now: "2026-01-01T00:00:00Z".parse().unwrap(),
            };
            match crate::body::decode::<InitiateIn>(&bytes) {
                Err(e) => prop_assert!(bad_request(&e), "{:?}", e.message),
                Ok(body) => match plan_initiate(&ctx, &body.into(), &|_: &VmId| true) {
                    Ok(_) => {}
                    Err(InitiateError::Invalid(e)) => prop_assert!(
                        e.field == "justification" || e.field.starts_with("virtualMachines"),
                        "{}", e
                    ),
                    Err(InitiateError::Forbidden { .. }) => prop_assert!(false, "every VM is allowed"),
                },
            }
        }
    }

    #[test]
    fn the_examples_are_valid() {
        let body: PolicyIn = serde_json::from_value(policy_body()).unwrap();
        let spec = validate_policy(&key(), &body.into()).unwrap();
        assert_eq!(spec.vms[0].ports.len(), 3);
        let policy = Policy { key: key(), spec };
        let ctx = InitiateContext {
            id: RequestId::new(uuid::Uuid::from_u128(1)),
            policy: &policy,
            requestor: "alice",
            caller_ip: "10.0.0.9".parse().unwrap(),
            now: "2026-01-01T00:00:00Z".parse().unwrap(),
        };
        let body: InitiateIn = serde_json::from_value(initiate_body()).unwrap();
        let plan = plan_initiate(&ctx, &body.into(), &|_: &VmId| true).unwrap();
        assert_eq!(plan.request.vms[0].ports.len(), 2);
    }
}
