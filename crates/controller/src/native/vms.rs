//! VMs: register, list (paged, filtered in the store), view one (with its agent's
//! status, live grants and blocked attempts), delete.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jitgate_core::Timestamp;
use jitgate_core::ids::{Location, VmId, VmName};
use jitgate_core::rbac::Action;
use jitgate_proto::StatusReport;
use jitgate_proto::api::{
    AgentPresence, AgentStatus, BlockedPoint, BlockedSeries, BlockedTotal, Grant, Placement,
    PutPlacement, RegisterVm, Vm, VmDetail, VmListItem, VmPage,
};
use jitgate_store::{
    OpError, PlaceError, RegisterOutcome, RequestFilter, VmError, VmPlacement, VmRecord, VmSummary,
};

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::params::{self, Q};

pub fn vm_wire(vm: &VmRecord) -> Vm {
    Vm {
        id: vm.id.to_string(),
        subscription: vm.id.subscription.to_string(),
        resource_group: vm.id.resource_group.to_string(),
        name: vm.id.name.to_string(),
        location: vm.location.as_ref().map(|l| l.to_string()),
        registered_at: vm.created.to_string(),
        registered_by: vm.created_by.clone(),
    }
}

/// Whether a VM has an agent and whether it reports (from when it last reported).
pub fn presence(state: &AppState, last_seen: Option<Timestamp>, now: Timestamp) -> AgentPresence {
    match last_seen {
        None => AgentPresence {
            enrolled: false,
            online: false,
            last_seen: None,
        },
        Some(seen) => AgentPresence {
            enrolled: true,
            online: online(state, seen, now),
            last_seen: Some(seen.to_string()),
        },
    }
}

fn online(state: &AppState, seen: Timestamp, now: Timestamp) -> bool {
    now.duration_since(seen).as_secs() <= state.recommend.offline_after.as_secs()
}

/// Whether the agent is older than this controller, or speaks less than its state
/// needs (None: it did not say its version).
fn outdated(report: &StatusReport, requires: Option<u32>) -> Option<bool> {
    let short = report.protocol.unwrap_or(1) < requires.unwrap_or(1);
    let older = report
        .agent_version
        .as_deref()
        .and_then(|v| jitgate_proto::older_version(v, env!("CARGO_PKG_VERSION")));
    match (older, short) {
        (_, true) => Some(true),
        (o, false) => o,
    }
}

/// A VM's agent in full: its last report, and whether it applied the current state.
pub async fn agent_status(state: &AppState, vm: &VmId, now: Timestamp) -> ApiResult<AgentStatus> {
    let Some(rec) = state.store.agent_status(vm).await? else {
        return Ok(AgentStatus::default());
    };
    let report: StatusReport = serde_json::from_str(&rec.report).unwrap_or_default();
    // The state the agent is sent, kept between changes: no store read when it is.
    let current = crate::desired::agent_state(state, vm).await?;
    Ok(AgentStatus {
        enrolled: true,
        online: online(state, rec.last_seen, now),
        last_seen: Some(rec.last_seen.to_string()),
        up_to_date: Some(
            report
                .applied_revision
                .as_deref()
                .is_some_and(|r| current.is_revision(r)),
        ),
        outdated: outdated(&report, current.head.requires),
        report,
    })
}

/// Registers a VM (idempotent: 201 when new, 200 when it was already registered).
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = RegisterVm,
    responses((status = 201, body = Vm), (status = 200, description = "Already registered", body = Vm)))]
pub async fn register_vm(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    JsonBody(body): JsonBody<RegisterVm>,
) -> ApiResult<Response> {
    let id = match (&body.id, &body.resource_group, &body.name) {
        (Some(id), None, None) => VmId::parse(id).map_err(|e| ApiError::bad_param("id", e))?,
        (None, Some(rg), Some(name)) => params::vm_param(&state, rg, name).map_err(|mut e| {
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
                StatusCode::NOT_FOUND,
                "SubscriptionNotFound",
                format!("subscription {s} does not exist"),
            )
            .with_target("id"),
            OpError::Refused(VmError::InPolicy(p)) => ApiError::conflict(format!("in policy {p}")),
            OpError::Refused(VmError::GatewayInUse(v)) => {
                ApiError::conflict(format!("the gateway of {v}"))
            }
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
    Ok((status, Json(vm_wire(&vm))).into_response())
}

/// `vm_summaries` of `vms`, by VM key (a VM deleted meanwhile has none).
pub async fn summaries_by_key(
    state: &AppState,
    vms: &[VmRecord],
    now: Timestamp,
) -> ApiResult<HashMap<String, VmSummary>> {
    let ids: Vec<VmId> = vms.iter().map(|v| v.id.clone()).collect();
    Ok(state
        .store
        .vm_summaries(&ids, now)
        .await?
        .into_iter()
        .map(|s| (s.vm.key(), s))
        .collect())
}

/// VMs the caller may read, a page at a time, filtered by `resourceGroup` and `name`
/// in the store. A page is filled with readable VMs however many unreadable ones lie
/// between them; what each shows is read for the whole page at once.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    params(
        ("resourceGroup" = Option<String>, Query, description = "Only this resource group"),
        ("name" = Option<String>, Query, description = "Only the VM of this name (case-insensitive; one indexed read)"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"),
        ("continuationToken" = Option<String>, Query, description = "From the previous page"),
    ),
    responses((status = 200, body = VmPage)))]
pub async fn list_vms(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<Q>,
) -> ApiResult<Json<VmPage>> {
    let name = q
        .get("name")
        .map(|n| VmName::parse(n))
        .transpose()
        .map_err(|e| ApiError::bad_param("name", e))?;
    let limit = params::count_param(&q, "limit", 100, 1000)?;
    let filter = jitgate_store::VmFilter {
        resource_group: params::rg_param(&q)?,
        name,
        after: None,
        limit,
    };
    let sub = state.default_subscription();
    let (page, next) = params::filtered_page(
        params::after_continuation(&q)?,
        limit,
        |vm: &VmRecord| vm.id.key(),
        |vm| principal.can(Action::VmRead, &vm.id.scope()),
        |after, n| {
            let filter = jitgate_store::VmFilter {
                after,
                limit: n,
                ..filter.clone()
            };
            let store = state.store.clone();
            async move { Ok(store.find_vms(sub, &filter).await?) }
        },
    )
    .await?;
    let now = state.clock.now();
    let summaries = summaries_by_key(&state, &page, now).await?;
    let value = page
        .iter()
        // A VM deleted since the page was read is left out.
        .filter_map(|vm| {
            let sum = summaries.get(&vm.id.key())?;
            Some(VmListItem {
                vm: vm_wire(vm),
                policy: sum.policy.as_ref().map(|p| p.key.id()),
                protected_ports: sum
                    .policy
                    .as_ref()
                    .map(|p| p.vm.ports.iter().map(|r| r.number.get()).collect())
                    .unwrap_or_default(),
                live_grants: sum.live_grants as u64,
                agent: presence(&state, sum.agent_last_seen, now),
            })
        })
        .collect();
    Ok(Json(VmPage {
        value,
        continuation_token: next,
    }))
}

/// One VM: its policy, its agent's full status, live grants, the newest request and
/// the last 24 hours' blocked attempts.
#[utoipa::path(get, path = "/api/v1/vms/{rg}/{name}", tag = "vms",
    params(("rg" = String, Path, description = "Resource group"), ("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmDetail)))]
pub async fn get_vm(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<Json<VmDetail>> {
    let id = params::vm_param(&state, &rg, &name)?;
    principal.require(Action::VmRead, &id.scope())?;
    let vm =
        state.store.get_vm(&id).await?.ok_or_else(|| {
            ApiError::not_found(format!("virtual machine '{id}' is not registered"))
        })?;
    let now = state.clock.now();
    let policy = state.store.vm_policy(&id).await?;
    let grants = state.store.live_grants(&id, now).await?;
    let last = state
        .store
        .list_requests(&RequestFilter {
            vm: Some(id.clone()),
            limit: 1,
            ..Default::default()
        })
        .await?;
    let blocked = state.store.blocked_series(Some(&id), day_ago(now)?).await?;
    let placement = state.store.placement(&id).await?;
    Ok(Json(VmDetail {
        placement: placement.as_ref().map(placement_wire),
        vm: vm_wire(&vm),
        policy: policy.as_ref().map(|p| p.key.id()),
        agent: agent_status(&state, &id, now).await?,
        last_access: last.first().map(|r| r.start.to_string()),
        last_user: last.first().map(|r| r.requestor.clone()),
        blocked_last24h: blocked_totals(&blocked),
        grants: grants
            .iter()
            .map(|g| Grant {
                request: g.request.to_string(),
                requestor: g.requestor.clone(),
                port: g.number.get(),
                protocol: g.protocol.as_str().to_owned(),
                source: g.source.to_string(),
                start_time_utc: g.start.to_string(),
                end_time_utc: g.end.to_string(),
                seconds_left: g.end.duration_since(now).as_secs(),
            })
            .collect(),
    }))
}

/// Deletes a VM that no policy protects (200 deleted, 204 there was none).
#[utoipa::path(delete, path = "/api/v1/vms/{rg}/{name}", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Deleted"), (status = 204, description = "There was no such VM")))]
pub async fn delete_vm(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let id = params::vm_param(&state, &rg, &name)?;
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
        Err(OpError::Refused(VmError::GatewayInUse(v))) => Err(ApiError::conflict(format!(
            "virtual machine '{id}' is the gateway of '{v}' (and maybe others); move them first (DELETE .../placement)"
        ))),
        Err(OpError::Refused(VmError::UnknownSubscription(s))) => {
            Err(ApiError::not_found(format!("subscription {s} not found")))
        }
        Err(OpError::Store(s)) => Err(s.into()),
    }
}

/// Blocked attempts per protected port, summed over `points`.
fn blocked_totals(points: &[jitgate_store::BlockedPoint]) -> Vec<BlockedTotal> {
    let mut totals: BTreeMap<(u16, &str), u64> = BTreeMap::new();
    for p in points {
        *totals.entry((p.port, p.protocol.as_str())).or_default() += p.count;
    }
    totals
        .into_iter()
        .map(|((port, protocol), count)| BlockedTotal {
            port,
            protocol: protocol.to_owned(),
            count,
        })
        .collect()
}

/// Attempts the VM's firewall dropped on protected ports since `since`: totals per port
/// and the series the agents reported.
#[utoipa::path(get, path = "/api/v1/vms/{rg}/{name}/blocked", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path), ("since" = Option<String>, Query, format = DateTime, description = "RFC 3339 (default: 24 hours ago)")),
    responses((status = 200, body = BlockedSeries)))]
pub async fn blocked(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
    Query(q): Query<Q>,
) -> ApiResult<Json<BlockedSeries>> {
    let id = params::vm_param(&state, &rg, &name)?;
    principal.require(Action::VmRead, &id.scope())?;
    let since = match params::time_param(&q, "since")? {
        Some(t) => t,
        None => day_ago(state.clock.now())?,
    };
    let points = state.store.blocked_series(Some(&id), since).await?;
    Ok(Json(BlockedSeries {
        vm: id.to_string(),
        since: since.to_string(),
        totals: blocked_totals(&points),
        series: points
            .iter()
            .map(|p| BlockedPoint {
                port: p.port,
                protocol: p.protocol.clone(),
                at: p.at.to_string(),
                count: p.count,
            })
            .collect(),
    }))
}

fn day_ago(now: Timestamp) -> ApiResult<Timestamp> {
    now.checked_sub(jiff::SignedDuration::from_hours(24))
        .map_err(ApiError::internal)
}

/// A placement on the wire.
pub fn placement_wire(p: &VmPlacement) -> Placement {
    Placement {
        gateway: p.gateway.to_string(),
        place: jitgate_proto::WireGateway::from_placement(&p.place),
    }
}

/// The gateway named in a request: a resource id or `resourceGroup/name`.
fn gateway_param(state: &AppState, s: &str) -> ApiResult<VmId> {
    if s.starts_with('/') {
        return VmId::parse(s).map_err(|e| ApiError::bad_param("gateway", e));
    }
    match s.split_once('/') {
        Some((rg, name)) => {
            params::vm_param(state, rg, name).map_err(|e| ApiError::bad_param("gateway", e.message))
        }
        None => Err(ApiError::bad_param(
            "gateway",
            format!("'{s}' is neither a resource id nor resourceGroup/name"),
        )),
    }
}

/// Places a VM behind a gateway, or moves it (gateway mode): from then on the
/// gateway's agent enforces the VM's state, and in DNAT mode each port of its policy
/// gets a mapped port on the public address. 200 with the placement as stored.
#[utoipa::path(put, path = "/api/v1/vms/{rg}/{name}/placement", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path)), request_body = PutPlacement,
    responses((status = 200, body = Placement)))]
pub async fn put_placement(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<PutPlacement>,
) -> ApiResult<Json<Placement>> {
    let id = params::vm_param(&state, &rg, &name)?;
    let gateway = gateway_param(
        &state,
        body.gateway
            .as_deref()
            .ok_or_else(|| ApiError::bad_param("gateway", "is required"))?,
    )?;
    let address = body
        .address
        .as_deref()
        .ok_or_else(|| ApiError::bad_param("address", "is required (the VM's private address)"))?;
    let address: std::net::IpAddr = address
        .parse()
        .map_err(|_| ApiError::bad_param("address", format!("'{address}' is not an IP address")))?;
    let mode = jitgate_core::gateway::Mode::parse(body.mode.as_deref().unwrap_or("routed"))
        .map_err(|e| ApiError::bad_param("mode", e))?;
    let public = body
        .public_ip_address
        .as_deref()
        .map(|p| {
            p.parse::<std::net::IpAddr>().map_err(|_| {
                ApiError::bad_param("publicIpAddress", format!("'{p}' is not an IP address"))
            })
        })
        .transpose()?;
    let place = jitgate_core::gateway::Placement {
        address,
        mode,
        masquerade: body.masquerade,
        public,
        mapped: Vec::new(),
    };
    if mode == jitgate_core::gateway::Mode::Routed && (public.is_some() || body.masquerade) {
        return Err(ApiError::bad_param(
            if public.is_some() {
                "publicIpAddress"
            } else {
                "masquerade"
            },
            "applies to mode dnat only",
        ));
    }
    // With no mapped ports yet, what validate can refuse is the public address (missing
    // in DNAT mode, or of another family than the address).
    place
        .validate()
        .map_err(|e| ApiError::bad_param("publicIpAddress", e))?;
    // Placing a VM decides who enforces it, which is the VM's and the gateway's business.
    principal.require(Action::VmWrite, &id.scope())?;
    principal.require(Action::VmWrite, &gateway.scope())?;
    let stored = state
        .store
        .place_vm(
            &id,
            &gateway,
            place,
            principal.audit_ctx(ip, state.clock.now()),
        )
        .await
        .map_err(|e| match e {
            OpError::Refused(PlaceError::Unknown(f)) => ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{}: {}", f.field, f.message),
            )
            .with_target(f.field),
            OpError::Refused(
                PlaceError::Chain(f) | PlaceError::AddressTaken(f) | PlaceError::NoMappedPort(f),
            ) => ApiError::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!("{}: {}", f.field, f.message),
            )
            .with_target(f.field),
            OpError::Store(s) => s.into(),
        })?;
    state.vm_changes.touch([&id, &gateway]);
    Ok(Json(placement_wire(&stored)))
}

/// Takes a VM from behind its gateway (200 done, 204 it was not behind one). Its
/// grants then close on the gateway; an agent on the VM enforces it from then on.
#[utoipa::path(delete, path = "/api/v1/vms/{rg}/{name}/placement", tag = "vms",
    params(("rg" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Taken from behind its gateway"), (status = 204, description = "It was not behind one")))]
pub async fn delete_placement(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path((rg, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let id = params::vm_param(&state, &rg, &name)?;
    principal.require(Action::VmWrite, &id.scope())?;
    let before = state.store.placement(&id).await?;
    let done = state
        .store
        .unplace_vm(&id, principal.audit_ctx(ip, state.clock.now()))
        .await?;
    let mut touched = vec![id.clone()];
    touched.extend(before.map(|p| p.gateway));
    state.vm_changes.touch(touched.iter());
    Ok(if done {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    })
}
