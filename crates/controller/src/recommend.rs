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
use jitgate_core::duration::MaxDuration;
use jitgate_core::enable::{Exposed, NewPolicy, plan_enable, recommended_rule};
use jitgate_core::ids::{ResourceGroup, Scope, SubscriptionId, VmId};
use jitgate_core::net::{Port, Protocol, SourcePrefix};
use jitgate_core::policy::{AllowedSources, Policy, PortRule, PortRuleInput, validate_port_rule};
use jitgate_core::rbac::{Action, scopes_allowing};
use jitgate_core::recommend::{Recommendation, Verdict};
use jitgate_proto::api::{ApplyResult, Enabled, PortRuleSpec, RecommendationPage, VerdictCounts};
use jitgate_store::{AuditNote, ExclusionRecord, OpError, PolicyError, VerdictPage, VerdictScope};
use serde::Deserialize;
use tokio::sync::watch;

use crate::AppState;
use crate::auth::{CallerIp, Principal};
use crate::body::OptionalJsonBody;
use crate::error::{ApiError, ApiResult};

fn rec_wire(vm: &VmId, r: &Recommendation, protected: bool) -> jitgate_proto::api::Recommendation {
    jitgate_proto::api::Recommendation {
        vm: vm.to_string(),
        resource_group: vm.resource_group.to_string(),
        name: vm.name.to_string(),
        verdict: r.verdict.as_str().to_owned(),
        reason: r.reason.clone(),
        exposed_ports: r.exposed.clone(),
        listening_management_ports: r.listening_management.clone(),
        protected,
    }
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
#[utoipa::path(get, path = "/api/v1/recommendations", tag = "recommendations",
    params(("verdict" = Option<String>, Query, pattern = "^(Healthy|Unhealthy|NotApplicable)$", description = "Healthy, Unhealthy or NotApplicable"), ("resourceGroup" = Option<String>, Query),
        ("tab" = Option<String>, Query, pattern = "^(configured|notConfigured|unsupported)$", description = "Only the VMs of one of the dashboard's tabs: configured (a policy protects it), notConfigured (no policy, JIT possible), unsupported (no policy, NotApplicable)"),
        ("search" = Option<String>, Query, description = "Only VMs whose resource group or name contains this (case-insensitive; 1-80 characters)"),
        ("tabs" = Option<bool>, Query, description = "With the first page: count the dashboard's tabs too (`tabs`)"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 5000, description = "Page size, 1-5000 (default 1000)"), ("continuationToken" = Option<String>, Query, description = "From the previous page")),
    responses((status = 200, body = jitgate_proto::api::RecommendationPage)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<RecommendationPage>> {
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
    let tab = match q.get("tab").map(String::as_str) {
        None => None,
        Some("configured") => Some(jitgate_store::JitTab::Configured),
        Some("notConfigured") => Some(jitgate_store::JitTab::NotConfigured),
        Some("unsupported") => Some(jitgate_store::JitTab::Unsupported),
        Some(other) => {
            return Err(ApiError::bad_param(
                "tab",
                format!("'{other}' is not configured, notConfigured or unsupported"),
            ));
        }
    };
    let search = match q.get("search") {
        None => None,
        Some(t) if t.is_empty() || t.chars().count() > 80 || t.chars().any(char::is_control) => {
            return Err(ApiError::bad_param(
                "search",
                "must be 1 to 80 characters, none of them a control character",
            ));
        }
        Some(t) => Some(t.clone()),
    };
    let limit = crate::params::count_param(&q, "limit", 1000, 5000)?;
    let after = crate::params::after_continuation(&q)?;
    let with_summary = after.is_none();
    let with_tabs = with_summary && crate::params::flag_param(&q, "tabs")?;
    let now = state.clock.now();
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
                tab,
                search,
            },
            now,
        )
        .await?;
    let more = page.len() > limit;
    page.truncate(limit);
    let (summary, tabs) = if with_summary {
        let counts = state.store.verdict_counts(sub, &scope, now).await?;
        let tabs = if with_tabs {
            let t = state.store.tab_counts(sub, &scope, now).await?;
            Some(jitgate_proto::api::TabCounts {
                configured: t.configured,
                not_configured: t.not_configured,
                unsupported: t.unsupported,
                agents_offline: t.agents_offline,
                drift: t.drift,
            })
        } else {
            None
        };
        (
            Some(VerdictCounts {
                healthy: counts.get(Verdict::Healthy),
                unhealthy: counts.get(Verdict::Unhealthy),
                not_applicable: counts.get(Verdict::NotApplicable),
            }),
            tabs,
        )
    } else {
        (None, None)
    };
    let continuation_token = more
        .then(|| {
            page.last()
                .map(|last| crate::params::continuation(&last.vm.key()))
        })
        .flatten();
    Ok(Json(RecommendationPage {
        value: page
            .iter()
            .map(|v| rec_wire(&v.vm, &v.recommendation, v.protected))
            .collect(),
        summary,
        tabs,
        continuation_token,
    }))
}

/// Enables JIT on every unhealthy machine the caller may see (in one resource group,
/// or all), on its listening management ports: TCP, any source, at most 3 hours.
#[utoipa::path(post, path = "/api/v1/recommendations/apply", tag = "recommendations",
    request_body(content = Option<jitgate_proto::api::ApplyRecommendations>, description = "Limit to one resource group (none: every VM the caller may see), or name the VMs and ports"),
    responses((status = 200, body = jitgate_proto::api::ApplyResult)))]
pub async fn apply(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    OptionalJsonBody(body): OptionalJsonBody<jitgate_proto::api::ApplyRecommendations>,
) -> ApiResult<Json<ApplyResult>> {
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
    let body = body.unwrap_or_default();
    let rg = body
        .resource_group
        .as_ref()
        .map(|r| ResourceGroup::parse(r))
        .transpose()
        .map_err(|e| ApiError::bad_param("resourceGroup", e))?;
    let now = state.clock.now();
    let mut exposed = Vec::new();
    let mut groups: BTreeMap<String, (SubscriptionId, ResourceGroup)> = BTreeMap::new();
    let chosen = body.vms.is_some();
    match &body.vms {
        Some(vms) => {
            let rules = chosen_rules(body.ports.as_deref())?;
            for (vm, record) in chosen_vms(&state, &principal, vms, rg.as_ref()).await? {
                groups.insert(
                    Scope::ResourceGroup(vm.subscription, vm.resource_group.clone())
                        .to_string()
                        .to_ascii_lowercase(),
                    (vm.subscription, vm.resource_group.clone()),
                );
                exposed.push(Exposed {
                    vm,
                    location: record.location,
                    rules: rules.clone(),
                });
            }
        }
        None if body.ports.is_some() => {
            return Err(ApiError::bad_param(
                "ports",
                "is only allowed with vms (the recommendations enable each VM's exposed ports)",
            ));
        }
        None => {
            unhealthy(
                &state,
                &principal,
                rg.as_ref(),
                now,
                &mut exposed,
                &mut groups,
            )
            .await?;
        }
    }
    // The plan needs every policy of those groups (a machine's own is among them).
    let mut policies = Vec::new();
    for (subscription, group) in groups.into_values() {
        let filter = jitgate_store::PolicyFilter {
            subscription: Some(subscription),
            resource_group: Some(group),
            location: None,
        };
        // Pages of this group only: the previous group's last key is no cursor here.
        let mut after: Option<String> = None;
        loop {
            let page: Vec<Policy> = state
                .store
                .list_policies(&filter, after.as_deref(), POLICY_PAGE)
                .await?;
            let full = page.len() == POLICY_PAGE;
            after = page.last().map(|p| p.key.key());
            policies.extend(page);
            if !full {
                break;
            }
        }
    }
    let plan = plan_enable(
        &exposed,
        &policies,
        &NewPolicy::standard().map_err(ApiError::internal)?,
    );
    let result = ApplyResult {
        enabled: plan
            .enabled
            .iter()
            .map(|e| Enabled {
                vm: e.vm.to_string(),
                ports: e.ports.iter().map(|p| p.get()).collect(),
                policy: e.policy.id(),
            })
            .collect(),
    };
    let target = rg
        .as_ref()
        .map(|r| Scope::ResourceGroup(state.default_subscription(), r.clone()).to_string())
        .unwrap_or_else(|| Scope::Subscription(state.default_subscription()).to_string());
    // The policy writes and the summary commit together, or not at all.
    let outcomes = state
        .store
        .apply_policies(
            plan.writes,
            AuditNote {
                action: if chosen {
                    "policies.enable"
                } else {
                    "recommendations.apply"
                }
                .to_owned(),
                target,
                details: serde_json::to_string(&result).map_err(ApiError::internal)?,
            },
            principal.audit_ctx(ip, now),
        )
        .await
        .map_err(|e| match e {
            OpError::Refused(
                PolicyError::UnknownVm(f)
                | PolicyError::VmInOtherPolicy(f)
                | PolicyError::NoMappedPort(f),
            ) => ApiError::conflict(f.to_string()),
            OpError::Refused(PolicyError::UnknownSubscription(s)) => {
                ApiError::not_found(format!("subscription {s}"))
            }
            OpError::Store(s) => s.into(),
        })?;
    state.changed(outcomes.iter().map(|o| o.revoked.len()).sum());
    state.vm_changes.touch(plan.enabled.iter().map(|e| &e.vm));
    Ok(Json(result))
}

/// The unhealthy VMs the caller may read (in `rg`, or all), with their exposed ports.
async fn unhealthy(
    state: &AppState,
    principal: &Principal,
    rg: Option<&ResourceGroup>,
    now: jitgate_core::Timestamp,
    exposed: &mut Vec<Exposed>,
    groups: &mut BTreeMap<String, (SubscriptionId, ResourceGroup)>,
) -> ApiResult<()> {
    // The stored verdicts, Unhealthy only, of the VMs the caller may read: nothing is
    // classified here either.
    let scope = VerdictScope {
        resource_group: rg.cloned(),
        readable: Some(scopes_allowing(
            &principal.assignments,
            &principal.name,
            Action::VmRead,
        )),
    };
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .recommendations(
                state.default_subscription(),
                &VerdictPage {
                    scope: scope.clone(),
                    verdict: Some(Verdict::Unhealthy),
                    after: after.clone(),
                    limit: VERDICT_PAGE,
                    ..Default::default()
                },
                now,
            )
            .await?;
        let full = page.len() == VERDICT_PAGE;
        after = page.last().map(|v| v.vm.key());
        for v in page {
            let rg_scope = Scope::ResourceGroup(v.vm.subscription, v.vm.resource_group.clone());
            principal.require(Action::PolicyWrite, &rg_scope)?;
            // Its location names a new policy; a VM deleted meanwhile is left out.
            let Some(record) = state.store.get_vm(&v.vm).await? else {
                continue;
            };
            groups.insert(
                rg_scope.to_string().to_ascii_lowercase(),
                (v.vm.subscription, v.vm.resource_group.clone()),
            );
            exposed.push(Exposed {
                vm: v.vm.clone(),
                location: record.location,
                rules: v
                    .recommendation
                    .exposed
                    .iter()
                    .map(|p| Port::new(*p as i64).map(recommended_rule))
                    .collect::<Result<_, _>>()
                    .map_err(ApiError::internal)?,
            });
        }
        if !full {
            break;
        }
    }
    Ok(())
}

/// The most VMs one "Enable JIT" names.
const MAX_CHOSEN: usize = 1000;

/// The ports an administrator chose for "Enable JIT on N VMs", validated like a
/// policy's (none given: the reference's four management ports).
fn chosen_rules(ports: Option<&[PortRuleSpec]>) -> ApiResult<Vec<PortRule>> {
    let Some(ports) = ports else {
        return [22, 3389, 5985, 5986]
            .into_iter()
            .map(|n| {
                Ok(PortRule {
                    number: Port::new(n).map_err(ApiError::internal)?,
                    protocol: Protocol::Any,
                    allowed: AllowedSources::Single(SourcePrefix::Any),
                    max_duration: MaxDuration::default_three_hours(),
                })
            })
            .collect();
    };
    if ports.is_empty() || ports.len() > 64 {
        return Err(ApiError::bad_param("ports", "must name 1 to 64 port rules"));
    }
    let mut out: Vec<PortRule> = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let rule = validate_port_rule(
            &format!("ports[{i}]"),
            &PortRuleInput {
                number: p.number,
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "*".to_owned())),
                allowed_source_address_prefix: None,
                allowed_source_address_prefixes: Some(
                    p.allowed_source_address_prefixes
                        .clone()
                        .unwrap_or_else(|| vec!["*".to_owned()]),
                ),
                max_request_access_duration: Some(
                    p.max_request_access_duration
                        .clone()
                        .unwrap_or_else(|| "PT3H".to_owned()),
                ),
            },
        )
        .map_err(ApiError::field)?;
        if out.iter().any(|r| r.number == rule.number) {
            return Err(ApiError::bad_param(
                &format!("ports[{i}].number"),
                format!("port {} is given twice", rule.number.get()),
            ));
        }
        out.push(rule);
    }
    Ok(out)
}

/// The VMs an administrator chose, each readable and in a resource group where the
/// caller may write policies (and in `rg`, when given).
async fn chosen_vms(
    state: &AppState,
    principal: &Principal,
    vms: &[String],
    rg: Option<&ResourceGroup>,
) -> ApiResult<Vec<(VmId, jitgate_store::VmRecord)>> {
    if vms.is_empty() || vms.len() > MAX_CHOSEN {
        return Err(ApiError::bad_param(
            "vms",
            format!("must name 1 to {MAX_CHOSEN} VMs"),
        ));
    }
    let mut out: Vec<(VmId, jitgate_store::VmRecord)> = Vec::with_capacity(vms.len());
    for (i, raw) in vms.iter().enumerate() {
        let field = format!("vms[{i}]");
        let vm = VmId::parse(raw).map_err(|e| ApiError::bad_param(&field, e))?;
        if out.iter().any(|(v, _)| v.key() == vm.key()) {
            continue;
        }
        if let Some(rg) = rg
            && !vm.resource_group.as_str().eq_ignore_ascii_case(rg.as_str())
        {
            return Err(ApiError::bad_param(
                &field,
                format!("is not in resource group {rg}"),
            ));
        }
        // A VM the caller may not read is answered as missing (its existence is not
        // told).
        let record = if principal.can(Action::VmRead, &vm.scope()) {
            state.store.get_vm(&vm).await?
        } else {
            None
        };
        let Some(record) = record else {
            return Err(ApiError::bad_param(&field, format!("no such VM: {raw}")));
        };
        principal.require(
            Action::PolicyWrite,
            &Scope::ResourceGroup(vm.subscription, vm.resource_group.clone()),
        )?;
        out.push((vm, record));
    }
    Ok(out)
}

/// Unhealthy verdicts read at a time by `apply`.
const VERDICT_PAGE: usize = 500;

/// Policies read at a time while gathering those of a resource group.
const POLICY_PAGE: usize = 500;

// ---- exclusions -------------------------------------------------------------------------

#[derive(Deserialize)]
pub struct ExclusionIn {
    scope: Option<String>,
    reason: Option<String>,
}

fn exclusion_wire(e: &ExclusionRecord) -> jitgate_proto::api::Exclusion {
    jitgate_proto::api::Exclusion {
        id: e.id.clone(),
        scope: e.scope.to_string(),
        reason: e.reason.clone(),
        created_at: e.created.to_string(),
        created_by: e.created_by.clone(),
    }
}

#[utoipa::path(get, path = "/api/v1/exclusions", tag = "recommendations",
    params(("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"), ("continuationToken" = Option<String>, Query, description = "From the previous page")),
    responses((status = 200, body = jitgate_proto::api::ExclusionPage)))]
pub async fn list_exclusions(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<jitgate_proto::api::ExclusionPage>> {
    use crate::params;
    let limit = params::count_param(&q, "limit", 100, 1000)?;
    let store = state.store.clone();
    let (page, next) = params::cursor_page(
        &q,
        limit,
        |e: &ExclusionRecord| (e.created, e.id.as_str()),
        |e| {
            jitgate_core::rbac::is_allowed_somewhere_under(
                &principal.assignments,
                &principal.name,
                Action::PolicyRead,
                &e.scope,
            )
        },
        |paging| {
            let store = store.clone();
            async move { store.exclusions_page(&paging).await }
        },
    )
    .await?;
    Ok(Json(jitgate_proto::api::ExclusionPage {
        value: page.iter().map(exclusion_wire).collect(),
        continuation_token: next,
    }))
}

#[utoipa::path(post, path = "/api/v1/exclusions", tag = "recommendations", request_body = jitgate_proto::api::CreateExclusion,
    responses((status = 201, body = jitgate_proto::api::Exclusion)))]
pub async fn create_exclusion(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    crate::body::JsonBody(body): crate::body::JsonBody<ExclusionIn>,
) -> ApiResult<Response> {
    let scope = crate::params::scope_param(&state, body.scope.as_deref())?;
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
        created: state.clock.now(),
        created_by: principal.name.clone(),
    };
    let audit = principal.audit_ctx(ip, record.created);
    state.store.add_exclusion(record.clone(), audit).await?;
    Ok((StatusCode::CREATED, Json(exclusion_wire(&record))).into_response())
}

#[utoipa::path(delete, path = "/api/v1/exclusions/{id}", tag = "recommendations",
    params(("id" = String, Path)),
    responses((status = 200, description = "Removed")))]
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
    let audit = principal.audit_ctx(ip, state.clock.now());
    state.store.remove_exclusion(&id, audit).await?;
    Ok(StatusCode::OK)
}

// ---- blocked attempts ---------------------------------------------------------------------

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
            .and_then(|r| state.clock.now().checked_sub(r).ok());
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
                state.clock.now(),
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

/// Recommendations' and exclusions' routes.
pub fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(apply))
        .routes(routes!(list_exclusions, create_exclusion))
        .routes(routes!(delete_exclusion))
}
