//! The agent-facing API: enrollment, the long-polled desired state, status reports;
//! the long-poll wakes on [`crate::desired`]'s per-VM change notifications.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jiff::SignedDuration;
use jitgate_core::Timestamp;
use jitgate_core::blocked::{CounterReading, counter_deltas};
use jitgate_core::ids::{Location, ResourceGroup, Scope, VmId, VmName};
use jitgate_core::net::Protocol;
use jitgate_core::rbac::Action;
use jitgate_core::recommend::{AgentFacts, Listening};
use jitgate_proto::{DesiredState, EnrollRequest, EnrollResponse, StatusReport};
use jitgate_store::{
    AgentStatusRecord, AuditCtx, EnrollArgs, EnrollError, EnrollTokenRecord, OpError, TokenRecord,
};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::auth::{CallerIp, Principal, sha256_hex};
use crate::body::JsonBody;
use crate::desired::{Built, agent_state};
use crate::error::{ApiError, ApiResult};

/// Longest a desired-state long-poll is held open.
pub const MAX_WAIT_SECS: u64 = 60;

fn vm_query(q: &HashMap<String, String>) -> ApiResult<VmId> {
    let id = q
        .get("vm")
        .ok_or_else(|| ApiError::bad_param("vm", "is required (the VM id)"))?;
    VmId::parse(id).map_err(|e| ApiError::bad_param("vm", e))
}

/// The caller must be the agent of `vm`, or, for a VM behind a gateway, the gateway's
/// agent (and only that one: the VM's own credential no longer enforces it).
async fn require_agent(state: &AppState, principal: &Principal, vm: &VmId) -> ApiResult<()> {
    match state.store.placement(vm).await? {
        Some(p) => principal.require(Action::AgentReport, &p.gateway.scope())?,
        None => principal.require(Action::AgentReport, &vm.scope())?,
    }
    if state.store.get_vm(vm).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "virtual machine '{vm}' is not registered"
        )));
    }
    Ok(())
}

/// The VMs a gateway enforces, for `jitgate gateway`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Behind {
    /// A hash of the list, for `known`.
    pub revision: String,
    pub vms: Vec<String>,
}

fn behind_of(vms: Vec<String>) -> Behind {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for v in &vms {
        h.update(v.to_ascii_lowercase().as_bytes());
        h.update(b"\n");
    }
    Behind {
        revision: hex::encode(&h.finalize()[..16]),
        vms,
    }
}

#[utoipa::path(get, path = "/api/v1/agent/behind", tag = "agents",
    params(("vm" = String, Query, description = "The gateway (its agent's VM id)"), ("known" = Option<String>, Query, description = "The list's revision the gateway has"), ("wait" = Option<u64>, Query, maximum = 60, description = "Seconds (0-60) to hold the call open until the list differs from `known`")),
    responses((status = 200, body = Behind)))]
pub async fn behind(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Behind>> {
    let gateway = vm_query(&q)?;
    let wait = wait_query(&q)?;
    require_agent(&state, &principal, &gateway).await?;
    let known = q.get("known").cloned();
    let mut rx = state.vm_changes.subscribe(&gateway);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        rx.borrow_and_update();
        let list = state.store.behind(&gateway).await?;
        let now = behind_of(list.into_iter().map(|(v, _)| v.to_string()).collect());
        if known.as_deref() != Some(now.revision.as_str()) {
            return Ok(Json(now));
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return Ok(Json(now)); },
            _ = tokio::time::sleep_until(deadline) => return Ok(Json(now)),
        }
    }
}

fn wait_query(q: &HashMap<String, String>) -> ApiResult<u64> {
    match q.get("wait") {
        None => Ok(0),
        Some(w) => w
            .parse::<u64>()
            .ok()
            .filter(|w| *w <= MAX_WAIT_SECS)
            .ok_or_else(|| {
                ApiError::bad_param(
                    "wait",
                    format!("'{w}' is not a number of seconds from 0 to {MAX_WAIT_SECS}"),
                )
            }),
    }
}

/// The answer to an agent whose credential was revoked (told apart from other 401s so
/// that the agent stops instead of retrying forever).
pub fn credential_revoked() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "AgentCredentialRevoked",
        "Authentication failed. This agent's credential was revoked: its VM was enrolled again by another agent, or an administrator revoked it.",
    )
}

#[utoipa::path(get, path = "/api/v1/agent/desired", tag = "agents",
    params(("vm" = String, Query, description = "The agent's VM (resource id)"), ("known" = Option<String>, Query, description = "The revision the agent has"), ("wait" = Option<u64>, Query, maximum = 60, description = "Seconds (0-60) to hold the call open until the state differs from `known`"), ("delta" = Option<bool>, Query, description = "1: when the controller still has the state `known` names, answer with what changed since (`base`, `grants` added, `removed`) instead of the whole state"), ("protocol" = Option<u32>, Query, description = "The agent protocol the caller speaks; from 3, revisions are of scheme 2 (an order-free digest of the grants); absent: 1")),
    responses((status = 200, body = jitgate_proto::DesiredState)))]
pub async fn desired(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<DesiredState>> {
    let vm = vm_query(&q)?;
    let wait = wait_query(&q)?;
    let want_delta = match q.get("delta").map(String::as_str) {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_param(
                "delta",
                format!("'{other}' is not 1 or 0 (true or false)"),
            ));
        }
    };
    // The agent protocol the caller speaks (absent: an agent older than protocol 3),
    // which says how it computes revisions.
    let protocol = match q.get("protocol") {
        None => 1,
        Some(p) => p.parse::<u32>().ok().filter(|p| *p >= 1).ok_or_else(|| {
            ApiError::bad_param(
                "protocol",
                format!("'{p}' is not an agent protocol number (1 or more)"),
            )
        })?,
    };
    require_agent(&state, &principal, &vm).await?;
    let known = q.get("known").cloned();
    // The agent polls again right after applying: an initiate waiting for it to take
    // a state learns it here.
    if let Some(k) = &known {
        state.vm_changes.ack(&vm, k);
    }
    // The answer: the whole state, or, when the agent asked for deltas and the state
    // it has is still kept here, what changed since.
    let answer = |built: &Built| -> Json<DesiredState> {
        if want_delta
            && let Some(k) = known.as_deref()
            && let Some(base) = state.vm_changes.of_revision(&vm, k, protocol)
        {
            if let Some(c) = built.change_since(base.revision()) {
                return Json(jitgate_proto::delta_of(
                    k,
                    &c.added,
                    &c.removed,
                    &built.head_for(protocol),
                ));
            }
            // Two or more states behind: compare the grants (their shared parts are
            // skipped).
            return Json(jitgate_proto::delta_between(
                k,
                &base.grants,
                &built.grants,
                &built.head_for(protocol),
            ));
        }
        Json(built.full_for(protocol))
    };
    let mut rx = state.vm_changes.subscribe(&vm);
    // The deadline is on the controller's clock; a long-poll is also never held longer
    // than `wait` of real time (a wall clock set back must not hold it for hours).
    let wait = SignedDuration::from_secs(wait as i64);
    let deadline = state
        .clock
        .now()
        .saturating_add(wait)
        .unwrap_or(Timestamp::MAX);
    let hard_stop = tokio::time::Instant::now() + wait.unsigned_abs();
    let mut woken = false;
    loop {
        rx.borrow_and_update();
        let built = agent_state(&state, &vm).await?;
        if known.as_deref() != Some(built.revision_for(protocol)) {
            return Ok(answer(&built));
        }
        // Woken with nothing new for this VM: it may be this agent being replaced or
        // revoked; tell it now (off the path of real changes).
        if woken
            && state
                .store
                .find_token(&principal.token_id)
                .await?
                .is_none_or(|t| t.revoked.is_some())
        {
            return Err(credential_revoked());
        }
        woken = false;
        // Grants leave the desired state at their end even without a write; wake then.
        let until = built.next_end.map_or(deadline, |e| e.min(deadline));
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { return Ok(answer(&built)); }
                woken = true;
            }
            _ = state.clock.sleep_until(until) => {
                if state.clock.now() >= deadline {
                    return Ok(answer(&built));
                }
            }
            _ = tokio::time::sleep_until(hard_stop) => return Ok(answer(&built)),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/agent/status", tag = "agents",
    params(("vm" = String, Query, description = "The agent's VM (resource id)")), request_body = jitgate_proto::StatusReport,
    responses((status = 204, description = "Recorded")))]
pub async fn status(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
    JsonBody(report): JsonBody<StatusReport>,
) -> ApiResult<StatusCode> {
    let vm = vm_query(&q)?;
    require_agent(&state, &principal, &vm).await?;
    let report = checked_report(report)?;
    if let Some(e) = &report.error {
        // Debug formatting escapes newlines: an agent cannot forge log lines.
        tracing::warn!(vm = %vm, error = ?e, "agent reports an enforcement error");
    }
    let now = state.clock.now();
    // Blocked attempts since the previous report (`core::blocked::counter_deltas`:
    // counters grow, and restart from zero when the agent rebuilds its table).
    let previous: Option<StatusReport> = state
        .store
        .agent_status(&vm)
        .await?
        .and_then(|r| serde_json::from_str(&r.report).ok());
    // The host facts the agent could not read: logged when they change (reports
    // come every 10 s), shown with the VM and in its recommendation.
    if !report.inventory_errors.is_empty()
        && previous
            .as_ref()
            .is_none_or(|p| p.inventory_errors != report.inventory_errors)
    {
        tracing::warn!(vm = %vm, errors = ?report.inventory_errors, "agent cannot read all of the host's listening sockets");
    }
    fn readings(r: &StatusReport) -> Vec<CounterReading<'_>> {
        r.counters
            .iter()
            .map(|c| CounterReading {
                rule: &c.rule,
                packets: c.packets,
            })
            .collect()
    }
    let deltas = counter_deltas(
        &previous.as_ref().map(readings).unwrap_or_default(),
        &readings(&report),
    );
    let mut points = Vec::new();
    for (c, delta) in report.counters.iter().zip(deltas) {
        if delta > 0 {
            state
                .metrics
                .blocked
                .get_or_create(&crate::metrics::PortLabel {
                    port: c.port,
                    protocol: c.protocol.clone(),
                })
                .inc_by(delta);
            points.push(jitgate_store::BlockedPoint {
                vm: vm.clone(),
                port: c.port,
                protocol: c.protocol.clone(),
                at: now,
                count: delta,
            });
        }
    }
    // A drift the agent found that the previous report did not carry: on record.
    if let Some(d) = &report.last_drift
        && previous
            .as_ref()
            .and_then(|p| p.last_drift.as_ref())
            .is_none_or(|p| p.detected_at != d.detected_at)
    {
        state.metrics.drift.inc();
        tracing::warn!(vm = %vm, changes = ?d.changes, "enforcement drift reported by the agent");
        state
            .store
            .append_audit(jitgate_core::audit::AuditEntry {
                time: now.to_string(),
                actor: principal.name.clone(),
                source: "agent".to_owned(),
                action: "enforcement.drift".to_owned(),
                target: vm.to_string(),
                outcome: jitgate_core::audit::Outcome::Failed,
                details: json!({
                    "detectedAt": d.detected_at,
                    "changes": d.changes,
                    "repaired": d.repaired,
                })
                .to_string(),
            })
            .await?;
    }
    let text = serde_json::to_string(&report).map_err(ApiError::internal)?;
    let facts = agent_facts(&report, now);
    state
        .store
        .put_agent_status(
            AgentStatusRecord {
                vm,
                report: text,
                last_seen: now,
            },
            facts,
        )
        .await?;
    state.store.record_blocked(points).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What recommendations classify from an agent's report (the store keeps it with the
/// report and classifies the VM again when it changes).
fn agent_facts(report: &StatusReport, last_seen: Timestamp) -> AgentFacts {
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

/// Bounds and validates what an agent reports (a hostile agent must not grow the
/// database, the metrics or the logs without bound): too many entries or an invalid
/// value is a 400 naming the field; counters are clamped to what storage holds.
fn checked_report(mut r: StatusReport) -> ApiResult<StatusReport> {
    fn text(field: &str, v: &Option<String>, max: usize) -> ApiResult<()> {
        match v {
            Some(t) if t.chars().count() > max => Err(ApiError::bad_param(
                field,
                format!("is longer than {max} characters"),
            )),
            _ => Ok(()),
        }
    }
    fn count<T>(field: &str, v: &[T], max: usize) -> ApiResult<()> {
        if v.len() > max {
            return Err(ApiError::bad_param(
                field,
                format!("has {} entries; at most {max}", v.len()),
            ));
        }
        Ok(())
    }
    fn label(field: &str, v: &str, max: usize) -> ApiResult<()> {
        if v.chars().count() > max || v.chars().any(char::is_control) {
            return Err(ApiError::bad_param(
                field,
                format!("must be at most {max} printable characters"),
            ));
        }
        Ok(())
    }
    for (field, v, max) in [
        ("appliedRevision", &r.applied_revision, 128),
        ("appliedAt", &r.applied_at, 64),
        ("nftVersion", &r.nft_version, 256),
        ("hostname", &r.hostname, 256),
        ("os", &r.os, 256),
        ("agentVersion", &r.agent_version, 64),
        ("error", &r.error, 4096),
    ] {
        text(field, v, max)?;
    }
    count("addresses", &r.addresses, 1024)?;
    for (i, a) in r.addresses.iter().enumerate() {
        label(&format!("addresses[{i}]"), a, 64)?;
    }
    count("listening", &r.listening, 8192)?;
    for (i, l) in r.listening.iter().enumerate() {
        if !matches!(l.protocol.as_str(), "tcp" | "udp") {
            return Err(ApiError::bad_param(
                &format!("listening[{i}].protocol"),
                "must be tcp or udp",
            ));
        }
        if !matches!(l.family.as_str(), "IPv4" | "IPv6") {
            return Err(ApiError::bad_param(
                &format!("listening[{i}].family"),
                "must be IPv4 or IPv6",
            ));
        }
        if l.address.parse::<std::net::IpAddr>().is_err() {
            return Err(ApiError::bad_param(
                &format!("listening[{i}].address"),
                "is not an IP address",
            ));
        }
        if let Some(p) = &l.process {
            label(&format!("listening[{i}].process"), p, 64)?;
        }
    }
    count("inventoryErrors", &r.inventory_errors, 16)?;
    for (i, e) in r.inventory_errors.iter().enumerate() {
        label(&format!("inventoryErrors[{i}]"), e, 1024)?;
    }
    count("counters", &r.counters, 1024)?;
    for (i, c) in r.counters.iter_mut().enumerate() {
        // Canonical spelling, so metric labels stay a small fixed set.
        c.protocol = jitgate_core::net::Protocol::parse(&c.protocol)
            .map_err(|_| {
                ApiError::bad_param(&format!("counters[{i}].protocol"), "must be TCP, UDP or *")
            })?
            .as_str()
            .to_owned();
        label(&format!("counters[{i}].rule"), &c.rule, 128)?;
        c.packets = c.packets.min(i64::MAX as u64);
    }
    if let Some(d) = &r.last_drift {
        label("lastDrift.detectedAt", &d.detected_at, 64)?;
        count("lastDrift.changes", &d.changes, 32)?;
        for (i, c) in d.changes.iter().enumerate() {
            label(&format!("lastDrift.changes[{i}]"), c, 1024)?;
        }
    }
    Ok(r)
}

#[utoipa::path(post, path = "/api/v1/agent/enroll", tag = "agents", request_body = jitgate_proto::EnrollRequest,
    responses((status = 200, body = jitgate_proto::EnrollResponse)))]
pub async fn enroll(
    State(state): State<AppState>,
    CallerIp(ip): CallerIp,
    JsonBody(req): JsonBody<EnrollRequest>,
) -> ApiResult<Json<EnrollResponse>> {
    let (token_id, secret) = req
        .enroll_token
        .expose()
        // A token may carry the CA fingerprint the agent pinned; it is not secret.
        .split(jitgate_proto::tls::PIN_SEPARATOR)
        .next()
        .unwrap_or_default()
        .strip_prefix("je_")
        .and_then(|r| r.split_once('.'))
        .ok_or_else(|| ApiError::unauthenticated("the enrollment token is not valid"))?;
    let vm = VmId::new(
        state.default_subscription(),
        ResourceGroup::parse(&req.resource_group)
            .map_err(|e| ApiError::bad_param("resourceGroup", e))?,
        VmName::parse(&req.name).map_err(|e| ApiError::bad_param("name", e))?,
    );
    let location = req
        .location
        .as_deref()
        .map(Location::parse)
        .transpose()
        .map_err(|e| ApiError::bad_param("location", e))?;
    let (id, token, hash) = crate::auth::generate_token();
    let principal = format!("agent:{vm}");
    let now = state.clock.now();
    let args = EnrollArgs {
        token_id: token_id.to_owned(),
        presented_hash: sha256_hex(secret),
        vm: vm.clone(),
        location,
        agent_token: TokenRecord {
            id,
            principal: principal.clone(),
            secret_hash: hash,
            description: format!("agent credential for {vm}"),
            created: now,
            expires: None,
            revoked: None,
            identity: None,
            last_used: None,
        },
        online_since: now
            .checked_sub(state.recommend.offline_after)
            .unwrap_or(now),
    };
    let audit = AuditCtx {
        actor: format!("enroll-token:{token_id}"),
        source: ip.to_string(),
        now,
    };
    let vm = state.store.enroll(args, audit).await.map_err(|e| match e {
        OpError::Refused(EnrollError::InvalidToken) => {
            ApiError::unauthenticated("the enrollment token is not valid")
        }
        OpError::Refused(EnrollError::Expired) => ApiError::unauthenticated(
            "the enrollment token has expired; ask an administrator for a new one",
        ),
        OpError::Refused(EnrollError::UsedUp) => ApiError::unauthenticated(
            "the enrollment token has been used up; ask an administrator for a new one",
        ),
        OpError::Refused(EnrollError::Revoked) => {
            ApiError::unauthenticated("the enrollment token has been revoked")
        }
        OpError::Refused(EnrollError::OutOfScope(scope)) => {
            ApiError::forbidden(&format!("enroll-token:{token_id}"), "enroll", &scope)
                .with_target("resourceGroup")
        }
        OpError::Refused(EnrollError::UnknownSubscription) => {
            ApiError::internal("default subscription missing")
        }
        OpError::Refused(EnrollError::AgentOnline) => {
            tracing::warn!(
                vm = %vm,
                enroll_token = %token_id,
                source = %ip,
                "refused an enrollment that would replace the VM's online agent"
            );
            ApiError::new(
                StatusCode::CONFLICT,
                "AgentAlreadyEnrolled",
                format!(
                    "{vm} has an online agent; an administrator must revoke it first, or enroll with a token created with --allow-replace"
                ),
            )
            .with_target("name")
        }
        OpError::Store(s) => s.into(),
    })?;
    // The VM's previous agent credential was revoked with the enrollment.
    state.auth_cache.invalidate();
    state.vm_changes.touch([&vm]);
    Ok(Json(EnrollResponse {
        vm_id: vm.to_string(),
        subscription: vm.subscription.to_string(),
        token: jitgate_proto::Secret::new(token),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollTokenIn {
    scope: Option<String>,
    uses: Option<i64>,
    expires_in: Option<String>,
    description: Option<String>,
    allow_replace: Option<bool>,
    install: Option<bool>,
}

fn enroll_token_wire(t: &EnrollTokenRecord) -> jitgate_proto::api::EnrollToken {
    jitgate_proto::api::EnrollToken {
        id: t.id.clone(),
        scope: t.scope.to_string(),
        uses_left: t.uses_left,
        expires_at: t.expires.to_string(),
        description: t.description.clone(),
        created_at: t.created.to_string(),
        created_by: t.created_by.clone(),
        revoked_at: t.revoked.map(|r| r.to_string()),
        allow_replace: t.allow_replace,
    }
}

#[utoipa::path(post, path = "/api/v1/enrollTokens", tag = "agents", request_body = jitgate_proto::api::CreateEnrollToken,
    responses((status = 201, body = jitgate_proto::api::CreatedEnrollToken)))]
pub async fn create_enroll_token(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    JsonBody(body): JsonBody<EnrollTokenIn>,
) -> ApiResult<Response> {
    let scope = match body.scope.as_deref() {
        None => Scope::Subscription(state.default_subscription()),
        given => crate::params::scope_param(&state, given)?,
    };
    if matches!(scope, Scope::Vm(_)) {
        return Err(ApiError::bad_param(
            "scope",
            "must be a subscription or a resource group",
        ));
    }
    let uses = body.uses.unwrap_or(1);
    if !(1..=100_000).contains(&uses) {
        return Err(ApiError::bad_param(
            "uses",
            format!("{uses} is outside 1-100000"),
        ));
    }
    let secs =
        jitgate_core::duration::parse_iso8601_secs(body.expires_in.as_deref().unwrap_or("PT24H"))
            .map_err(|e| ApiError::bad_param("expiresIn", e))?;
    if !(1..=30 * 86400).contains(&secs) {
        return Err(ApiError::bad_param(
            "expiresIn",
            "must be between 1 second and 30 days",
        ));
    }
    let description = body.description.unwrap_or_default();
    if description.len() > 1024 {
        return Err(ApiError::bad_param(
            "description",
            "is longer than 1024 characters",
        ));
    }
    principal.require(Action::VmWrite, &scope)?;
    let now = state.clock.now();
    let (id, text, hash) = crate::auth::generate_token();
    let token = text.replacen("jg_", "je_", 1);
    let record = EnrollTokenRecord {
        id,
        secret_hash: hash,
        scope,
        expires: now
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .map_err(|e| ApiError::bad_param("expiresIn", e))?,
        uses_left: uses as u32,
        description,
        created: now,
        created_by: principal.name.clone(),
        revoked: None,
        allow_replace: body.allow_replace.unwrap_or(false),
    };
    // Over TLS the token carries the fingerprint agents pin: nothing else to copy.
    let token = match state.tls_pin {
        Some(pin) => format!("{token}{}{pin}", jitgate_proto::tls::PIN_SEPARATOR),
        None => token,
    };
    let install = match (body.install.unwrap_or(false), &record.scope) {
        (false, _) => None,
        (true, Scope::ResourceGroup(_, rg)) => {
            let sealed = crate::install::Sealed {
                token: token.clone(),
                resource_group: rg.to_string(),
            };
            Some(crate::install::make_line(
                &state,
                &headers,
                &uri,
                &record.id,
                &sealed,
                record.expires,
                record.uses_left,
            )?)
        }
        (true, _) => {
            return Err(ApiError::bad_param(
                "install",
                "needs a token scoped to a resource group (the machines' resource group)",
            ));
        }
    };
    let audit = principal.audit_ctx(ip, now);
    let (code, line) = install.unzip();
    state
        .store
        .create_enroll_token(record.clone(), code, audit)
        .await?;
    let v = jitgate_proto::api::CreatedEnrollToken {
        info: enroll_token_wire(&record),
        token,
        ca_fingerprint: state.tls_pin.map(|pin| pin.to_string()),
        install: line,
    };
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[utoipa::path(get, path = "/api/v1/enrollTokens", tag = "agents",
    params(("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000 (default 100)"), ("continuationToken" = Option<String>, Query, description = "From the previous page")),
    responses((status = 200, body = jitgate_proto::api::EnrollTokenPage)))]
pub async fn list_enroll_tokens(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<jitgate_proto::api::EnrollTokenPage>> {
    use crate::params;
    let limit = params::count_param(&q, "limit", 100, 1000)?;
    let store = state.store.clone();
    let (page, next) = params::cursor_page(
        &q,
        limit,
        |t: &EnrollTokenRecord| (t.created, t.id.as_str()),
        |t| principal.can(Action::VmWrite, &t.scope),
        |paging| {
            let store = store.clone();
            async move { store.enroll_tokens_page(&paging).await }
        },
    )
    .await?;
    Ok(Json(jitgate_proto::api::EnrollTokenPage {
        value: page.iter().map(enroll_token_wire).collect(),
        continuation_token: next,
    }))
}

#[utoipa::path(delete, path = "/api/v1/enrollTokens/{id}", tag = "agents",
    params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 200, description = "Already revoked: nothing changed")))]
pub async fn revoke_enroll_token(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<StatusCode> {
    let all = state.store.list_enroll_tokens().await?;
    // Unknown and not-yours look the same.
    let t = all
        .iter()
        .find(|t| t.id == id && principal.can(Action::VmWrite, &t.scope))
        .ok_or_else(|| ApiError::not_found(format!("enrollment token {id} not found")))?;
    principal.require(Action::VmWrite, &t.scope)?;
    let revoked = state
        .store
        .revoke_enroll_token(&id, principal.audit_ctx(ip, state.clock.now()))
        .await?;
    Ok(if revoked {
        StatusCode::NO_CONTENT
    } else {
        // Already revoked: nothing changed.
        StatusCode::OK
    })
}

/// The agent API's routes, and enrollment tokens'.
pub fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(list_enroll_tokens, create_enroll_token))
        .routes(routes!(revoke_enroll_token))
        .routes(routes!(enroll))
        .routes(routes!(desired))
        .routes(routes!(behind))
        .routes(routes!(status))
}
