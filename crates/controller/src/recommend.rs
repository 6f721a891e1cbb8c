//! Recommendations (Defender's tabs) from what agents really report; applying them
//! (enable JIT on every unhealthy machine's listening management ports, one call,
//! audited); exclusions (JIT switched off for a scope); blocked-attempt series and
//! their retention.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jitgate_core::Timestamp;
use jitgate_core::audit::{AuditEntry, Outcome};
use jitgate_core::duration::MaxDuration;
use jitgate_core::ids::{Location, PolicyName, ResourceGroup, Scope, VmId};
use jitgate_core::net::{Port, Protocol, SourcePrefix};
use jitgate_core::policy::{AllowedSources, PolicyKey, PolicySpec, PolicyVm, PortRule};
use jitgate_core::rbac::{Action, scopes_allowing};
use jitgate_core::recommend::{AgentFacts, Listening, Recommendation, Verdict, VmFacts, classify};
use jitgate_proto::StatusReport;
use jitgate_store::{ExclusionRecord, OpError, PolicyError, VerdictPage, VerdictScope, VmRecord};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::OptionalJsonBody;
use crate::error::{ApiError, ApiResult};

/// What recommendations classify from an agent's report (the store keeps it with the
/// report and classifies the VM again when it changes).
pub(crate) fn agent_facts(report: &StatusReport, last_seen: Timestamp) -> AgentFacts {
    AgentFacts {
        last_seen,
        nft_version: report.nft_version.clone(),
        error: report.error.clone(),
        drift: (report.table_matches == Some(false)).then(|| {
            report
                .last_drift
                .as_ref()
                .map(|d| d.changes.join("; "))
                .unwrap_or_else(|| "unknown change".to_owned())
        }),
        listening: report
            .listening
            .iter()
            .filter_map(|l| {
                Some(Listening {
                    protocol: Protocol::parse(&l.protocol).ok()?,
                    addr: l.address.parse().ok()?,
                    port: l.port,
                    process: l.process.clone(),
                })
            })
            .collect(),
        inventory_errors: report.inventory_errors.clone(),
    }
}

/// Recommendations for `vms` at `now`, read 500 VMs at a time (policies, user rules
/// and agent reports in batched reads; never every agent's report at once).
pub async fn recommendations(
    state: &AppState,
    vms: &[VmRecord],
    now: Timestamp,
) -> ApiResult<Vec<(VmRecord, Recommendation)>> {
    let exclusions = state.store.list_exclusions().await?;
    let mut out = Vec::with_capacity(vms.len());
    for chunk in vms.chunks(500) {
        out.extend(classify_chunk(state, chunk, &exclusions, now).await?);
    }
    Ok(out)
}

async fn classify_chunk(
    state: &AppState,
    chunk: &[VmRecord],
    exclusions: &[ExclusionRecord],
    now: Timestamp,
) -> ApiResult<Vec<(VmRecord, Recommendation)>> {
    let ids: Vec<VmId> = chunk.iter().map(|v| v.id.clone()).collect();
    let mut summaries = crate::native::summaries_by_key(state, chunk, now).await?;
    let statuses: HashMap<String, (StatusReport, Timestamp)> = state
        .store
        .agent_statuses(&ids)
        .await?
        .into_iter()
        .map(|s| {
            (
                s.vm.key(),
                (
                    serde_json::from_str(&s.report).unwrap_or_default(),
                    s.last_seen,
                ),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(chunk.len());
    for vm in chunk {
        // A VM deleted meanwhile is left out.
        let Some(summary) = summaries.remove(&vm.id.key()) else {
            continue;
        };
        let facts = VmFacts {
            agent: statuses
                .get(&vm.id.key())
                .map(|(r, seen)| agent_facts(r, *seen)),
            excluded: exclusions
                .iter()
                .find(|e| e.scope.contains(&vm.id.scope()))
                .map(|e| e.reason.clone()),
            protected: summary
                .policy
                .map(|p| p.vm.ports.iter().map(|r| (r.number, r.protocol)).collect())
                .unwrap_or_default(),
            user_rules: summary.user_rules,
        };
        out.push((vm.clone(), classify(&facts, &state.recommend, now)));
    }
    Ok(out)
}

fn rec_json(vm: &VmId, r: &Recommendation) -> Value {
    json!({
        "vm": vm.to_string(),
        "resourceGroup": vm.resource_group.to_string(),
        "name": vm.name.to_string(),
        "verdict": r.verdict.as_str(),
        "reason": r.reason,
        "exposedPorts": r.exposed,
        "listeningManagementPorts": r.listening_management,
    })
}

async fn visible_vms(
    state: &AppState,
    principal: &Principal,
    rg: Option<&ResourceGroup>,
) -> ApiResult<Vec<VmRecord>> {
    Ok(state
        .store
        .list_vms(state.default_subscription(), rg)
        .await?
        .into_iter()
        .filter(|v| principal.can(Action::VmRead, &v.id.scope()))
        .collect())
}

fn rg_query(q: &HashMap<String, String>) -> ApiResult<Option<ResourceGroup>> {
    q.get("resourceGroup")
        .map(|r| ResourceGroup::parse(r))
        .transpose()
        .map_err(|e| ApiError::bad_param("resourceGroup", e))
}

/// Recommendations a page at a time (`limit`, default 1000, at most 5000;
/// `continuationToken` from the previous page), optionally only one `verdict`. The
/// first page (no continuation token) also carries the `summary` of every VM the
/// caller may read. Nothing is classified here: the store keeps each VM's verdict
/// current with every write that changes its facts, so a page is one read and the
/// summary one aggregate, both filtered by the caller's readable scopes in the store.
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let verdict = q
        .get("verdict")
        .map(|v| {
            Verdict::parse(v).ok_or_else(|| {
                ApiError::bad_param(
                    "verdict",
                    format!("'{v}' is not Healthy, Unhealthy or NotApplicable"),
                )
            })
        })
        .transpose()?;
    let rg = rg_query(&q)?;
    let limit = crate::native::count_param(&q, "limit", 1000, 5000)?;
    let after = crate::native::after_continuation(&q)?;
    let with_summary = after.is_none();
    let now = Timestamp::now();
    let sub = state.default_subscription();
    let scope = VerdictScope {
        resource_group: rg,
        readable: Some(scopes_allowing(
            &principal.assignments,
            &principal.name,
            Action::VmRead,
        )),
    };
    // One more than a page: whether another page follows.
    let mut page = state
        .store
        .recommendations(
            sub,
            &VerdictPage {
                scope: scope.clone(),
                verdict,
                after,
                limit: limit + 1,
            },
            now,
        )
        .await?;
    let more = page.len() > limit;
    page.truncate(limit);
    let value: Vec<Value> = page
        .iter()
        .map(|v| rec_json(&v.vm, &v.recommendation))
        .collect();
    let mut body = json!({ "value": value });
    if with_summary {
        let counts = state.store.verdict_counts(sub, &scope, now).await?;
        let summary: BTreeMap<&str, u64> =
            [Verdict::Healthy, Verdict::Unhealthy, Verdict::NotApplicable]
                .into_iter()
                .map(|v| (v.as_str(), counts.get(v)))
                .collect();
        body["summary"] = json!(summary);
    }
    if more && let Some(last) = page.last() {
        body["continuationToken"] = json!(crate::native::continuation(&last.vm.key()));
    }
    Ok(Json(body))
}

/// A VM and the ports to protect on it.
type VmPorts = (VmId, Vec<u16>);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyIn {
    resource_group: Option<String>,
}

/// Enables JIT on every unhealthy machine the caller may see (in one resource group,
/// or all), on its listening management ports: TCP, any source, at most 3 hours.
pub async fn apply(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    OptionalJsonBody(body): OptionalJsonBody<ApplyIn>,
) -> ApiResult<Json<Value>> {
    // A caller who may write no policy anywhere has nothing to apply: refuse rather
    // than answer (and audit) an empty success.
    if !principal
        .assignments
        .iter()
        .any(|a| a.principal == principal.name && a.role.permits(Action::PolicyWrite))
    {
        return Err(ApiError::forbidden(
            &principal.name,
            Action::PolicyWrite.as_str(),
            &Scope::Subscription(state.default_subscription()).to_string(),
        ));
    }
    let rg = body
        .and_then(|b| b.resource_group)
        .map(|r| ResourceGroup::parse(&r))
        .transpose()
        .map_err(|e| ApiError::bad_param("resourceGroup", e))?;
    let now = Timestamp::now();
    let vms = visible_vms(&state, &principal, rg.as_ref()).await?;
    let recs = recommendations(&state, &vms, now).await?;
    // Target policy key -> VMs (with their ports) to add.
    let mut plan: BTreeMap<String, (PolicyKey, Vec<VmPorts>)> = BTreeMap::new();
    for (vm, r) in recs.iter().filter(|(_, r)| r.verdict == Verdict::Unhealthy) {
        let rg_scope = Scope::ResourceGroup(vm.id.subscription, vm.id.resource_group.clone());
        principal.require(Action::PolicyWrite, &rg_scope)?;
        let key = match state.store.vm_policy(&vm.id).await? {
            Some(p) => p.key,
            None => {
                let existing = state
                    .store
                    .list_policies(
                        &jitgate_store::PolicyFilter {
                            subscription: Some(vm.id.subscription),
                            resource_group: Some(vm.id.resource_group.clone()),
                            location: None,
                        },
                        None,
                        1,
                    )
                    .await?;
                match existing.into_iter().next() {
                    Some(p) => p.key,
                    None => PolicyKey {
                        subscription: vm.id.subscription,
                        resource_group: vm.id.resource_group.clone(),
                        location: vm
                            .location
                            .clone()
                            .unwrap_or(Location::parse("global").map_err(ApiError::internal)?),
                        name: PolicyName::parse("default").map_err(ApiError::internal)?,
                    },
                }
            }
        };
        plan.entry(key.key())
            .or_insert_with(|| (key.clone(), Vec::new()))
            .1
            .push((vm.id.clone(), r.exposed.clone()));
    }
    let audit = principal.audit_ctx(ip, now);
    let mut enabled = Vec::new();
    for (_, (key, adds)) in plan {
        let mut spec = state
            .store
            .get_policy(&key)
            .await?
            .map(|p| p.spec)
            .unwrap_or(PolicySpec {
                kind: "Basic".to_owned(),
                vms: Vec::new(),
            });
        for (vm, ports) in &adds {
            let rule = |p: u16| -> ApiResult<PortRule> {
                Ok(PortRule {
                    number: Port::new(p as i64).map_err(ApiError::internal)?,
                    protocol: Protocol::Tcp,
                    allowed: AllowedSources::Single(SourcePrefix::Any),
                    max_duration: MaxDuration::default_three_hours(),
                })
            };
            match spec.vms.iter_mut().find(|v| v.id == *vm) {
                Some(entry) => {
                    for p in ports {
                        if entry.ports.iter().all(|r| r.number.get() != *p) {
                            entry.ports.push(rule(*p)?);
                        }
                    }
                }
                None => spec.vms.push(PolicyVm {
                    id: vm.clone(),
                    ports: ports.iter().map(|p| rule(*p)).collect::<ApiResult<_>>()?,
                    public_ip_address: None,
                }),
            }
            enabled.push(json!({"vm": vm.to_string(), "ports": ports, "policy": key.id()}));
        }
        state
            .store
            .put_policy(key.clone(), spec, audit.clone())
            .await
            .map_err(|e| match e {
                OpError::Refused(PolicyError::UnknownVm(f) | PolicyError::VmInOtherPolicy(f)) => {
                    ApiError::conflict(f.to_string())
                }
                OpError::Refused(PolicyError::UnknownSubscription(s)) => {
                    ApiError::not_found(format!("subscription {s}"))
                }
                OpError::Store(s) => s.into(),
            })?;
        state.vm_changes.touch(adds.iter().map(|(v, _)| v));
    }
    let entry = AuditEntry {
        time: now.to_string(),
        actor: principal.name.clone(),
        source: ip.to_string(),
        action: "recommendations.apply".to_owned(),
        target: rg
            .as_ref()
            .map(|r| Scope::ResourceGroup(state.default_subscription(), r.clone()).to_string())
            .unwrap_or_else(|| Scope::Subscription(state.default_subscription()).to_string()),
        outcome: Outcome::Success,
        details: json!({"enabled": enabled}).to_string(),
    };
    state.store.append_audit(entry).await?;
    Ok(Json(json!({"enabled": enabled})))
}

// ---- exclusions -------------------------------------------------------------------------

#[derive(Deserialize)]
pub struct ExclusionIn {
    scope: Option<String>,
    reason: Option<String>,
}

fn exclusion_json(e: &ExclusionRecord) -> Value {
    json!({
        "id": e.id,
        "scope": e.scope.to_string(),
        "reason": e.reason,
        "createdAt": e.created.to_string(),
        "createdBy": e.created_by,
    })
}

pub async fn list_exclusions(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let all = state.store.list_exclusions().await?;
    let value: Vec<Value> = all
        .iter()
        .filter(|e| {
            jitgate_core::rbac::is_allowed_somewhere_under(
                &principal.assignments,
                &principal.name,
                Action::PolicyRead,
                &e.scope,
            )
        })
        .map(exclusion_json)
        .collect();
    Ok(Json(json!({"value": value})))
}

pub async fn create_exclusion(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    crate::body::JsonBody(body): crate::body::JsonBody<ExclusionIn>,
) -> ApiResult<Response> {
    let scope = crate::native::scope_param(&state, body.scope.as_deref())?;
    let reason = body.reason.unwrap_or_default();
    if reason.trim().is_empty() || reason.len() > 512 {
        return Err(ApiError::bad_param(
            "reason",
            "is required (1 to 512 characters): say why JIT does not apply",
        ));
    }
    principal.require(Action::PolicyWrite, &scope)?;
    let record = ExclusionRecord {
        id: uuid::Uuid::new_v4().to_string(),
        scope,
        reason,
        created: Timestamp::now(),
        created_by: principal.name.clone(),
    };
    let audit = principal.audit_ctx(ip, record.created);
    state.store.add_exclusion(record.clone(), audit).await?;
    Ok((StatusCode::CREATED, Json(exclusion_json(&record))).into_response())
}

pub async fn delete_exclusion(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let all = state.store.list_exclusions().await?;
    let Some(e) = all.iter().find(|e| e.id == id) else {
        return Err(ApiError::not_found(format!("exclusion {id} not found")));
    };
    principal.require(Action::PolicyWrite, &e.scope)?;
    let audit = principal.audit_ctx(ip, Timestamp::now());
    state.store.remove_exclusion(&id, audit).await?;
    Ok(StatusCode::OK)
}

// ---- blocked attempts ---------------------------------------------------------------------

pub async fn blocked(
    State(state): State<AppState>,
    principal: Principal,
    Path((rg, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let id = VmId::new(
        state.default_subscription(),
        ResourceGroup::parse(&rg).map_err(|e| ApiError::bad_param("resourceGroup", e))?,
        jitgate_core::ids::VmName::parse(&name).map_err(|e| ApiError::bad_param("name", e))?,
    );
    principal.require(Action::VmRead, &id.scope())?;
    let since = match q.get("since") {
        Some(s) => {
            jitgate_core::request::parse_time(s).map_err(|e| ApiError::bad_param("since", e))?
        }
        None => Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_hours(24))
            .map_err(ApiError::internal)?,
    };
    let points = state.store.blocked_series(Some(&id), since).await?;
    let mut totals: BTreeMap<(u16, String), u64> = BTreeMap::new();
    for p in &points {
        *totals.entry((p.port, p.protocol.clone())).or_default() += p.count;
    }
    Ok(Json(json!({
        "vm": id.to_string(),
        "since": since.to_string(),
        "totals": totals.iter().map(|((port, proto), n)| json!({"port": port, "protocol": proto, "count": n})).collect::<Vec<_>>(),
        "series": points.iter().map(|p| json!({"port": p.port, "protocol": p.protocol, "at": p.at.to_string(), "count": p.count})).collect::<Vec<_>>(),
    })))
}

/// How often points past the retention are deleted (also once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Deletes blocked-attempt points older than `retention`, at start and then hourly.
pub async fn prune_blocked(
    state: AppState,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let before = jiff::SignedDuration::try_from(retention)
            .ok()
            .and_then(|r| Timestamp::now().checked_sub(r).ok());
        if let Some(before) = before {
            match state.store.prune_blocked(before).await {
                Ok(0) => {}
                Ok(n) => {
                    state.metrics.blocked_pruned.inc_by(n);
                    tracing::info!(deleted = n, %before, "pruned blocked-attempt points past the retention");
                }
                Err(e) => tracing::error!(error = %e, "cannot prune blocked-attempt points"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Keeps the verdict gauges current (every 30 s), from the store's aggregate.
pub async fn refresh_metrics(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        match state
            .store
            .verdict_counts(
                state.default_subscription(),
                &VerdictScope::default(),
                Timestamp::now(),
            )
            .await
        {
            Ok(counts) => {
                for verdict in [Verdict::Healthy, Verdict::Unhealthy, Verdict::NotApplicable] {
                    state
                        .metrics
                        .verdicts
                        .get_or_create(&crate::metrics::VerdictLabel {
                            verdict: verdict.as_str().to_owned(),
                        })
                        .set(i64::try_from(counts.get(verdict)).unwrap_or(i64::MAX));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot count the recommendations' verdicts"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
