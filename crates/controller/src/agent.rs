//! The agent-facing API: enrollment, the long-polled desired state, status reports;
//! and the per-VM change notifications that wake long-polls within milliseconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jitgate_core::Timestamp;
use jitgate_core::ids::{Location, ResourceGroup, Scope, VmId, VmName};
use jitgate_core::nsg::{GrantRef, NsgRule, nsg_view};
use jitgate_core::rbac::Action;
use jitgate_proto::{DesiredState, EnrollRequest, EnrollResponse, StatusReport};
use jitgate_store::{
    AgentStatusRecord, AuditCtx, EnrollArgs, EnrollError, EnrollTokenRecord, OpError, TokenRecord,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::AppState;
use crate::auth::{CallerIp, Principal, sha256_hex};
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};

/// Longest a desired-state long-poll is held open.
pub const MAX_WAIT_SECS: u64 = 60;

/// One watch channel per VM: bumped whenever that VM's desired state may have changed.
/// A channel exists only while a long-poll waits on it: the last [`VmWatch`] to go
/// removes it, so the map holds the VMs being watched now, not every VM ever watched.
#[derive(Default)]
pub struct VmChanges {
    map: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl VmChanges {
    pub fn subscribe(self: &Arc<Self>, vm: &VmId) -> VmWatch {
        let key = vm.key();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map
            .entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        VmWatch {
            changes: self.clone(),
            key,
            rx: Some(rx),
        }
    }

    pub fn touch<'a>(&self, vms: impl IntoIterator<Item = &'a VmId>) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for vm in vms {
            if let Some(tx) = map.get(&vm.key()) {
                tx.send_modify(|r| *r += 1);
            }
        }
    }

    /// How many VMs are watched now.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A long-poll's subscription to one VM's changes; dropping the last one of a VM
/// removes its channel.
pub struct VmWatch {
    changes: Arc<VmChanges>,
    key: String,
    /// Always `Some` until dropped: taken in `drop`, under the map's lock.
    rx: Option<watch::Receiver<u64>>,
}

impl VmWatch {
    /// Marks the current value seen.
    pub fn borrow_and_update(&mut self) {
        if let Some(rx) = &mut self.rx {
            rx.borrow_and_update();
        }
    }

    /// Waits for a change not yet seen.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        match &mut self.rx {
            Some(rx) => rx.changed().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for VmWatch {
    fn drop(&mut self) {
        // Under the lock, like `subscribe`: a subscriber arriving now either finds the
        // channel still counted or creates a fresh one, never a channel being removed.
        let mut map = self.changes.map.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.rx.take());
        if map
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            map.remove(&self.key);
        }
    }
}

/// The VM's NSG view (user, JIT deny and JIT allow rules) and live grants at `now`.
pub async fn nsg_now(
    state: &AppState,
    vm: &VmId,
    now: Timestamp,
) -> ApiResult<(Vec<NsgRule>, Vec<GrantRef>)> {
    let user = state.store.nsg_rules(vm).await?;
    let policy = state.store.vm_policy(vm).await?;
    let grants: Vec<GrantRef> = state
        .store
        .live_grants(vm, now)
        .await?
        .into_iter()
        .map(|g| GrantRef {
            request: g.request,
            number: g.number,
            protocol: g.protocol,
            source: g.source,
            start: g.start,
            end: g.end,
        })
        .collect();
    let pvm = policy.as_ref().map(|p| (&p.key, &p.vm));
    Ok((nsg_view(vm, &user, pvm, &grants), grants))
}

/// The VM's desired state now.
pub async fn desired_state(state: &AppState, vm: &VmId) -> ApiResult<DesiredState> {
    let now = Timestamp::now();
    let (view, grants) = nsg_now(state, vm, now).await?;
    Ok(jitgate_proto::encode(vm, &view, &grants, now))
}

fn vm_query(q: &HashMap<String, String>) -> ApiResult<VmId> {
    let id = q
        .get("vm")
        .ok_or_else(|| ApiError::bad_param("vm", "is required (the VM id)"))?;
    VmId::parse(id).map_err(|e| ApiError::bad_param("vm", e))
}

async fn require_agent(state: &AppState, principal: &Principal, vm: &VmId) -> ApiResult<()> {
    principal.require(Action::AgentReport, &vm.scope())?;
    if state.store.get_vm(vm).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "virtual machine '{vm}' is not registered"
        )));
    }
    Ok(())
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

pub async fn desired(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<DesiredState>> {
    let vm = vm_query(&q)?;
    let wait = match q.get("wait") {
        None => 0,
        Some(w) => w
            .parse::<u64>()
            .ok()
            .filter(|w| *w <= MAX_WAIT_SECS)
            .ok_or_else(|| {
                ApiError::bad_param(
                    "wait",
                    format!("'{w}' is not a number of seconds from 0 to {MAX_WAIT_SECS}"),
                )
            })?,
    };
    require_agent(&state, &principal, &vm).await?;
    let known = q.get("known").cloned();
    let mut rx = state.vm_changes.subscribe(&vm);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut woken = false;
    loop {
        rx.borrow_and_update();
        let d = desired_state(&state, &vm).await?;
        if known.as_deref() != Some(d.revision.as_str()) {
            return Ok(Json(d));
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
        let next_end = d
            .grants
            .iter()
            .filter_map(|g| g.end_time_utc.parse::<Timestamp>().ok())
            .min()
            .map(|end| {
                let ms = end.duration_since(Timestamp::now()).as_millis().max(0) as u64;
                tokio::time::Instant::now() + Duration::from_millis(ms)
            });
        let until = next_end.map_or(deadline, |e| e.min(deadline));
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { return Ok(Json(d)); }
                woken = true;
            }
            _ = tokio::time::sleep_until(until) => {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(Json(d));
                }
            }
        }
    }
}

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
    let now = Timestamp::now();
    // Blocked attempts since the previous report: counters only grow, except when the
    // agent rebuilds its table (then they restart from zero).
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
    let mut points = Vec::new();
    for c in &report.counters {
        let before = previous.as_ref().and_then(|p| {
            p.counters
                .iter()
                .find(|x| x.rule == c.rule)
                .map(|x| x.packets)
        });
        let delta = match before {
            Some(b) if c.packets >= b => c.packets - b,
            _ => c.packets,
        };
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
    let facts = crate::recommend::agent_facts(&report, now);
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

/// An agent's status for the VM view.
/// Whether a VM has an agent and whether it reports (from when it last reported): the
/// short form of `status_json` for lists, with no store read of its own.
pub fn presence_json(state: &AppState, last_seen: Option<Timestamp>, now: Timestamp) -> Value {
    match last_seen {
        None => json!({"enrolled": false, "online": false}),
        Some(seen) => json!({
            "enrolled": true,
            "online": now.duration_since(seen).as_secs() <= state.recommend.offline_after.as_secs(),
            "lastSeen": seen.to_string(),
        }),
    }
}

pub async fn status_json(state: &AppState, vm: &VmId) -> ApiResult<Value> {
    let Some(rec) = state.store.agent_status(vm).await? else {
        return Ok(json!({"enrolled": false, "online": false}));
    };
    let report: StatusReport = serde_json::from_str(&rec.report).unwrap_or_default();
    let now = Timestamp::now();
    let age = now.duration_since(rec.last_seen).as_secs();
    let current = desired_state(state, vm).await?;
    Ok(json!({
        "enrolled": true,
        "online": age <= state.recommend.offline_after.as_secs(),
        "lastSeen": rec.last_seen.to_string(),
        "appliedRevision": report.applied_revision,
        "appliedAt": report.applied_at,
        "upToDate": report.applied_revision.as_deref() == Some(current.revision.as_str()),
        "nftVersion": report.nft_version,
        "error": report.error,
        "hostname": report.hostname,
        "os": report.os,
        "agentVersion": report.agent_version,
        "addresses": report.addresses,
        "listening": report.listening,
        "inventoryErrors": report.inventory_errors,
        "counters": report.counters,
        "tableMatches": report.table_matches,
        "driftEvents": report.drift_events,
        "lastDrift": report.last_drift,
    }))
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
    let now = Timestamp::now();
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
}

fn enroll_token_json(t: &EnrollTokenRecord) -> Value {
    json!({
        "id": t.id,
        "scope": t.scope.to_string(),
        "usesLeft": t.uses_left,
        "expiresAt": t.expires.to_string(),
        "description": t.description,
        "createdAt": t.created.to_string(),
        "createdBy": t.created_by,
        "revokedAt": t.revoked.map(|r| r.to_string()),
        "allowReplace": t.allow_replace,
    })
}

pub async fn create_enroll_token(
    State(state): State<AppState>,
    principal: Principal,
    CallerIp(ip): CallerIp,
    JsonBody(body): JsonBody<EnrollTokenIn>,
) -> ApiResult<Response> {
    let scope = match body.scope.as_deref() {
        None => Scope::Subscription(state.default_subscription()),
        given => crate::native::scope_param(&state, given)?,
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
    let now = Timestamp::now();
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
    let audit = principal.audit_ctx(ip, now);
    state
        .store
        .create_enroll_token(record.clone(), audit)
        .await?;
    let mut v = enroll_token_json(&record);
    // Over TLS the token carries the fingerprint agents pin: nothing else to copy.
    match state.tls_pin {
        Some(pin) => {
            v["token"] = json!(format!("{token}{}{pin}", jitgate_proto::tls::PIN_SEPARATOR));
            v["caFingerprint"] = json!(pin.to_string());
        }
        None => v["token"] = json!(token),
    }
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub async fn list_enroll_tokens(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let all = state.store.list_enroll_tokens().await?;
    let value: Vec<Value> = all
        .iter()
        .filter(|t| principal.can(Action::VmWrite, &t.scope))
        .map(enroll_token_json)
        .collect();
    Ok(Json(json!({"value": value})))
}

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
        .revoke_enroll_token(&id, principal.audit_ctx(ip, Timestamp::now()))
        .await?;
    Ok(if revoked {
        StatusCode::NO_CONTENT
    } else {
        // Already revoked: nothing changed.
        StatusCode::OK
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn vm(name: &str) -> VmId {
        VmId::new(
            jitgate_core::ids::SubscriptionId::new(uuid::Uuid::nil()),
            ResourceGroup::parse("rg").unwrap(),
            VmName::parse(name).unwrap(),
        )
    }

    /// Issue 10: channels of VMs nobody watches any more are removed (the map grew by
    /// one entry per VM ever long-polled).
    #[tokio::test]
    async fn channels_go_with_their_last_watcher() {
        let changes = Arc::new(VmChanges::default());
        let mut a = changes.subscribe(&vm("a"));
        let mut a2 = changes.subscribe(&vm("A"));
        let b = changes.subscribe(&vm("b"));
        assert_eq!(changes.len(), 2, "one channel per VM, by key");

        changes.touch([&vm("a")]);
        a.changed().await.unwrap();
        a2.changed().await.unwrap();
        drop(a);
        assert_eq!(changes.len(), 2, "a is still watched");
        changes.touch([&vm("a")]);
        a2.changed().await.unwrap();
        drop(a2);
        drop(b);
        assert!(changes.is_empty());

        // Touching an unwatched VM creates nothing; a new watcher starts afresh and
        // is woken by the next change.
        changes.touch([&vm("a")]);
        assert!(changes.is_empty());
        let mut again = changes.subscribe(&vm("a"));
        again.borrow_and_update();
        changes.touch([&vm("a")]);
        tokio::time::timeout(Duration::from_secs(1), again.changed())
            .await
            .unwrap()
            .unwrap();
        drop(again);
        assert!(changes.is_empty());
    }
}
