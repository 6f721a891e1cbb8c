//! Webhooks in SQL: the endpoints (`webhooks`) and a durable outbox
//! (`webhook_outbox`). An audit event that people are told about becomes one outbox
//! row per subscribed endpoint, written in the transaction that writes the event, so an
//! event is never told without having happened nor lost when a controller dies. Rows
//! are claimed under the writer's lock with a lease (several controllers deliver
//! without doubling; a claim that dies with its controller is taken again when the
//! lease ends), and keep their message id through every attempt.

use std::time::{Duration, Instant};

use super::*;

/// How long the writer trusts its copy of the endpoints list (a change made by another
/// controller on the same database is seen within this time).
const HOOKS_TTL: Duration = Duration::from_secs(1);

/// The endpoints as the writer last read them.
#[derive(Default)]
pub(crate) struct HookCache {
    hooks: Vec<(String, Vec<String>)>,
    fetched: Option<Instant>,
}

impl HookCache {
    pub(crate) fn invalidate(&mut self) {
        self.fetched = None;
    }
}

/// The webhook event an audit action is, given its details: `None` for what nobody is
/// told about.
pub fn event_of(action: &str, details: &serde_json::Value) -> Vec<&'static str> {
    match action {
        "request.initiate" => {
            let ports = details["ports"].as_array().cloned().unwrap_or_default();
            let mut out = Vec::new();
            if ports.iter().any(|p| p["status"] == "Pending") {
                out.push("request.pending");
            }
            if ports.iter().any(|p| p["status"] != "Pending") {
                out.push("grant.started");
            }
            out
        }
        "request.approved" => vec!["request.approved", "grant.started"],
        "request.denied" => vec!["request.denied"],
        "request.approvalExpired" => vec!["request.expired"],
        "request.cancel" => vec!["request.cancelled"],
        "request.expire" => vec!["grant.ended"],
        "request.revoke" | "request.endedByPolicy" => vec!["grant.revoked"],
        "request.breakGlass" => vec!["breakglass.used"],
        "enforcement.drift" => vec!["enforcement.drift"],
        "agent.offline" => vec!["agent.offline"],
        "agent.online" => vec!["agent.online"],
        _ => Vec::new(),
    }
}

/// Every event type an endpoint can subscribe to.
pub const EVENTS: &[&str] = &[
    "request.pending",
    "request.approved",
    "request.denied",
    "request.expired",
    "request.cancelled",
    "grant.started",
    "grant.ended",
    "grant.revoked",
    "breakglass.used",
    "enforcement.drift",
    "agent.offline",
    "agent.online",
];

/// Queues the events of an audit record for the endpoints subscribed to them (in the
/// record's transaction).
pub(crate) fn enqueue(ctx: &mut WriteCtx<'_>, rec: &AuditRecord) -> Result<()> {
    if rec.entry.outcome != Outcome::Success && rec.entry.action != "enforcement.drift" {
        return Ok(());
    }
    let cache = &mut ctx.policies.hooks;
    if cache.fetched.is_none_or(|t| t.elapsed() > HOOKS_TTL) {
        cache.hooks = ctx.tx.all(
            "SELECT name, events FROM webhooks WHERE disabled_ns IS NULL ORDER BY name",
            &[],
            |r| {
                let events: Vec<String> = serde_json::from_str(&r.get::<String>(1)?)
                    .map_err(|e| StoreError::Corrupt(format!("webhook events: {e}")))?;
                Ok((r.get::<String>(0)?, events))
            },
        )?;
        cache.fetched = Some(Instant::now());
    }
    // Without an endpoint (the usual case) nothing more is done per record: its
    // details are parsed only for someone to tell.
    if cache.hooks.is_empty() {
        return Ok(());
    }
    let details: serde_json::Value =
        serde_json::from_str(&rec.entry.details).unwrap_or(serde_json::Value::Null);
    let events = event_of(&rec.entry.action, &details);
    if events.is_empty() {
        return Ok(());
    }
    let now_ns = rec.entry.time.parse::<Timestamp>().map(ns).unwrap_or(0);
    let hooks = ctx.policies.hooks.hooks.clone();
    for event in events {
        for (name, subscribed) in &hooks {
            if !subscribed.iter().any(|e| e == "*" || e == event) {
                continue;
            }
            let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
            let payload = serde_json::json!({
                "type": event,
                "timestamp": rec.entry.time,
                "data": {
                    "auditSeq": rec.seq,
                    "actor": rec.entry.actor,
                    "source": rec.entry.source,
                    "target": rec.entry.target,
                    "action": rec.entry.action,
                    "details": details,
                },
            });
            ctx.tx.defer(
                "INSERT INTO webhook_outbox(msg_id, webhook, event, payload, created_ns, attempts, next_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?5)",
                &[&msg_id, name, &event, &payload.to_string(), &now_ns],
            )?;
        }
    }
    Ok(())
}

fn read_hooks(c: &dyn Db, tail: &str, params: &[&dyn ToParam]) -> Result<Vec<WebhookRecord>> {
    c.all(
        &format!(
            "SELECT name, url, events, format, secret, created_ns, updated_ns, disabled_ns, disabled_reason
             FROM webhooks {tail}"
        ),
        params,
        |r| {
            Ok(WebhookRecord {
                name: r.get(0)?,
                url: r.get(1)?,
                events: serde_json::from_str(&r.get::<String>(2)?)
                    .map_err(|e| StoreError::Corrupt(format!("webhook events: {e}")))?,
                format: r.get(3)?,
                secret: r.get(4)?,
                created: from_ns(r.get(5)?)?,
                updated: from_ns(r.get(6)?)?,
                disabled: match r.get::<Option<i64>>(7)? {
                    Some(t) => Some((from_ns(t)?, r.get::<Option<String>>(8)?.unwrap_or_default())),
                    None => None,
                },
            })
        },
    )
}

pub(crate) fn all(c: &dyn Db) -> Result<Vec<WebhookRecord>> {
    read_hooks(c, "ORDER BY name", &[])
}

pub(crate) fn one(c: &dyn Db, name: &str) -> Result<Option<WebhookRecord>> {
    Ok(read_hooks(c, "WHERE name = ?1", &[&name])?
        .into_iter()
        .next())
}

/// Creates or replaces an endpoint (a replaced one keeps its secret and is enabled
/// again); `Ok(true)` when created. The secret is never audited.
pub(crate) fn put(ctx: &mut WriteCtx<'_>, h: &WebhookRecord, audit: &AuditCtx) -> Result<bool> {
    let created = one(ctx.tx, &h.name)?.is_none();
    let events = serde_json::to_string(&h.events).map_err(|e| StoreError::Db(e.to_string()))?;
    ctx.tx.execute(
        "INSERT INTO webhooks(name, url, events, format, secret, created_ns, updated_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT(name) DO UPDATE SET url = excluded.url, events = excluded.events,
            format = excluded.format, updated_ns = excluded.updated_ns,
            disabled_ns = NULL, disabled_reason = NULL",
        &[
            &h.name,
            &h.url,
            &events,
            &h.format,
            &h.secret,
            &ns(audit.now),
        ],
    )?;
    ctx.policies.hooks.invalidate();
    ctx.audit(
        audit,
        if created {
            "webhook.create"
        } else {
            "webhook.update"
        },
        &h.name,
        // Not the whole URL: a chat's incoming-webhook URL carries its secret in the path.
        serde_json::json!({"url": redacted(&h.url), "events": h.events, "format": h.format}),
    )?;
    Ok(created)
}

/// A URL as it may be shown to anyone who reads the audit log: scheme, host and port.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!("{}/...", u.origin().ascii_serialization()),
        Err(_) => "(not a URL)".into(),
    }
}

pub(crate) fn delete(ctx: &mut WriteCtx<'_>, name: &str, audit: &AuditCtx) -> Result<bool> {
    if one(ctx.tx, name)?.is_none() {
        return Ok(false);
    }
    ctx.tx
        .execute("DELETE FROM webhook_outbox WHERE webhook = ?1", &[&name])?;
    ctx.tx
        .execute("DELETE FROM webhooks WHERE name = ?1", &[&name])?;
    ctx.policies.hooks.invalidate();
    ctx.audit(audit, "webhook.delete", name, serde_json::json!({}))?;
    Ok(true)
}

/// Takes up to `limit` deliveries that are due and not taken, for `lease`.
pub(crate) fn claim(
    ctx: &mut WriteCtx<'_>,
    now: Timestamp,
    lease: Duration,
    limit: usize,
) -> Result<Vec<Delivery>> {
    let until = now + jiff::SignedDuration::try_from(lease).unwrap_or(jiff::SignedDuration::ZERO);
    let due: Vec<Delivery> = ctx.tx.all(
        "SELECT o.msg_id, o.webhook, o.event, o.payload, o.attempts, w.url, w.format, w.secret
         FROM webhook_outbox o JOIN webhooks w ON w.name = o.webhook
         WHERE o.done_ns IS NULL AND o.next_ns <= ?1 AND w.disabled_ns IS NULL
           AND (o.claimed_until_ns IS NULL OR o.claimed_until_ns <= ?1)
         ORDER BY o.created_ns, o.msg_id LIMIT ?2",
        &[&ns(now), &(limit as i64)],
        |r| {
            Ok(Delivery {
                msg_id: r.get(0)?,
                webhook: r.get(1)?,
                event: r.get(2)?,
                payload: r.get(3)?,
                attempts: u32::try_from(r.get::<i64>(4)?).unwrap_or(u32::MAX),
                url: r.get(5)?,
                format: r.get(6)?,
                secret: r.get(7)?,
                claimed_until: until,
            })
        },
    )?;
    for d in &due {
        ctx.tx.defer(
            "UPDATE webhook_outbox SET claimed_until_ns = ?2 WHERE msg_id = ?1",
            &[&d.msg_id, &ns(until)],
        )?;
    }
    Ok(due)
}

/// Records what an attempt did.
pub(crate) fn finish(
    ctx: &mut WriteCtx<'_>,
    msg_id: &str,
    claimed_until: Timestamp,
    result: &DeliveryResult,
    now: Timestamp,
) -> Result<()> {
    // Only while this claim holds: after its lease another controller may have taken
    // the message, and its outcome is the one that counts.
    if !ctx.tx.exists(
        "SELECT 1 FROM webhook_outbox WHERE msg_id = ?1 AND claimed_until_ns = ?2",
        &[&msg_id, &ns(claimed_until)],
    )? {
        return Ok(());
    }
    match result {
        DeliveryResult::Delivered => ctx.tx.defer(
            "UPDATE webhook_outbox SET done_ns = ?2, outcome = 'delivered', attempts = attempts + 1,
                claimed_until_ns = NULL, last_error = NULL WHERE msg_id = ?1",
            &[&msg_id, &ns(now)],
        )?,
        DeliveryResult::Retry { at, error } => ctx.tx.defer(
            "UPDATE webhook_outbox SET attempts = attempts + 1, next_ns = ?2, claimed_until_ns = NULL,
                last_error = ?3 WHERE msg_id = ?1",
            &[&msg_id, &ns(*at), error],
        )?,
        DeliveryResult::Failed { error } => ctx.tx.defer(
            "UPDATE webhook_outbox SET done_ns = ?2, outcome = 'failed', attempts = attempts + 1,
                claimed_until_ns = NULL, last_error = ?3 WHERE msg_id = ?1",
            &[&msg_id, &ns(now), error],
        )?,
        DeliveryResult::Gone { error } => {
            let webhook: Option<String> = ctx.tx.one(
                "SELECT webhook FROM webhook_outbox WHERE msg_id = ?1",
                &[&msg_id],
                |r| r.get(0),
            )?;
            ctx.tx.defer(
                "UPDATE webhook_outbox SET done_ns = ?2, outcome = 'gone', attempts = attempts + 1,
                    claimed_until_ns = NULL, last_error = ?3 WHERE msg_id = ?1",
                &[&msg_id, &ns(now), error],
            )?;
            if let Some(w) = webhook {
                ctx.tx.defer(
                    "UPDATE webhooks SET disabled_ns = ?2, disabled_reason = ?3 WHERE name = ?1",
                    &[&w, &ns(now), error],
                )?;
                ctx.policies.hooks.invalidate();
                ctx.audit(
                    &AuditCtx {
                        actor: "system".into(),
                        source: "controller".into(),
                        now,
                    },
                    "webhook.disable",
                    &w,
                    serde_json::json!({"reason": error}),
                )?;
            }
        }
    }
    Ok(())
}

/// What an endpoint's outbox holds, for the API: (delivered, failed, waiting).
pub(crate) fn counts(c: &dyn Db, name: &str) -> Result<(u64, u64, u64)> {
    c.row(
        "SELECT
            COALESCE(SUM(CASE WHEN outcome = 'delivered' THEN 1 ELSE 0 END), 0),
            COALESCE(SUM(CASE WHEN outcome IN ('failed', 'gone') THEN 1 ELSE 0 END), 0),
            COALESCE(SUM(CASE WHEN done_ns IS NULL THEN 1 ELSE 0 END), 0)
         FROM webhook_outbox WHERE webhook = ?1",
        &[&name],
        |r| {
            Ok((
                r.get::<i64>(0)? as u64,
                r.get::<i64>(1)? as u64,
                r.get::<i64>(2)? as u64,
            ))
        },
    )
}
