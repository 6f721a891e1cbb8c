//! The audit log: query (JSON pages, JSON lines or CSV) and verify.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use jitgate_core::audit::AuditRecord;
use jitgate_core::rbac::Action;
use jitgate_proto::api::{AuditEvent, AuditPage, AuditVerify};
use jitgate_store::AuditQuery;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::params::{self, Q};

fn event_wire(r: &AuditRecord) -> AuditEvent {
    AuditEvent {
        seq: r.seq,
        time: r.entry.time.clone(),
        actor: r.entry.actor.clone(),
        source: r.entry.source.clone(),
        action: r.entry.action.clone(),
        target: r.entry.target.clone(),
        outcome: r.entry.outcome.as_str().to_owned(),
        details: serde_json::from_str(&r.entry.details)
            .unwrap_or_else(|_| serde_json::Value::String(r.entry.details.clone())),
        prev_hash: r.prev_hash.clone(),
        hash: r.hash.clone(),
    }
}

/// Audit events in sequence order, filtered in the store; `format=json` (pages:
/// `continuationToken`, or `afterSeq`), `jsonl` or `csv` (one download of up to
/// `limit` events).
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(
        ("vm" = Option<String>, Query, description = "Only events whose target contains this (case-insensitive); `target` is the same"),
        ("actor" = Option<String>, Query),
        ("action" = Option<String>, Query),
        ("since" = Option<String>, Query, format = DateTime, description = "RFC 3339"),
        ("until" = Option<String>, Query, format = DateTime, description = "RFC 3339"),
        ("afterSeq" = Option<u64>, Query, description = "Only events after this sequence number"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 100000, description = "1-100000 (default 1000)"),
        ("continuationToken" = Option<String>, Query, description = "From the previous page"),
        ("format" = Option<String>, Query, pattern = "^(json|jsonl|csv)$", description = "json (default), jsonl or csv"),
    ),
    responses((status = 200, content(
        (AuditPage = "application/json"),
        (String = "application/x-ndjson"),
        (String = "text/csv"),
    ))))]
pub async fn query_audit(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<Q>,
) -> ApiResult<Response> {
    principal.require(Action::AuditRead, &params::sub_scope(&state))?;
    let limit = params::count_param(&q, "limit", 1000, 100_000)?;
    let seq = |name: &str, s: &str| {
        s.parse::<u64>()
            .map_err(|_| ApiError::bad_param(name, "is not a sequence number"))
    };
    let after_seq = match (q.get("afterSeq"), params::after_continuation(&q)?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_param(
                "continuationToken",
                "give afterSeq or continuationToken, not both",
            ));
        }
        (Some(s), None) => Some(seq("afterSeq", s)?),
        (None, Some(t)) => Some(seq("continuationToken", &t)?),
        (None, None) => None,
    };
    let format = q.get("format").map(String::as_str).unwrap_or("json");
    if !matches!(format, "json" | "jsonl" | "csv") {
        return Err(ApiError::bad_param(
            "format",
            format!("'{format}' is not one of json, jsonl, csv"),
        ));
    }
    let query = AuditQuery {
        target: q.get("vm").or(q.get("target")).cloned(),
        actor: q.get("actor").cloned(),
        action: q.get("action").cloned(),
        since: params::time_param(&q, "since")?,
        until: params::time_param(&q, "until")?,
        after_seq,
        // One more than the page says whether another follows.
        limit: if format == "json" { limit + 1 } else { limit },
    };
    let records = state.store.query_audit(&query).await?;
    match format {
        "jsonl" => {
            let mut out = String::new();
            for r in &records {
                out.push_str(&serde_json::to_string(&event_wire(r)).map_err(ApiError::internal)?);
                out.push('\n');
            }
            Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
        }
        "csv" => csv(&records),
        _ => {
            let (page, next) = params::page(records, limit, |r| r.seq.to_string());
            Ok(Json(AuditPage {
                value: page.iter().map(event_wire).collect(),
                continuation_token: next,
            })
            .into_response())
        }
    }
}

fn csv(records: &[AuditRecord]) -> ApiResult<Response> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let write = |w: &mut csv::Writer<Vec<u8>>| -> Result<(), csv::Error> {
        w.write_record([
            "seq",
            "time",
            "actor",
            "source",
            "action",
            "target",
            "outcome",
            "details",
            "prev_hash",
            "hash",
        ])?;
        for r in records {
            w.write_record([
                r.seq.to_string().as_str(),
                &r.entry.time,
                &r.entry.actor,
                &r.entry.source,
                &r.entry.action,
                &r.entry.target,
                r.entry.outcome.as_str(),
                &r.entry.details,
                &r.prev_hash,
                &r.hash,
            ])?;
        }
        Ok(())
    };
    write(&mut w).map_err(ApiError::internal)?;
    let bytes = w.into_inner().map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"jitgate-audit.csv\"",
            ),
        ],
        bytes,
    )
        .into_response())
}

/// Verifies the whole hash chain, against the signed checkpoints.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    responses((status = 200, body = AuditVerify)))]
pub async fn verify_audit(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<AuditVerify>> {
    principal.require(Action::AuditRead, &params::sub_scope(&state))?;
    let anchors = state
        .checkpoints
        .anchors()
        .map_err(|e| ApiError::internal(format!("cannot read the audit checkpoints: {e:#}")))?;
    let checkpoints = anchors.checkpoints.len();
    let report = state.store.verify_audit(Some(anchors)).await?;
    Ok(Json(AuditVerify {
        ok: report.ok(),
        events: report.count,
        last_seq: report.last_seq,
        head_hash: report.head_hash.clone(),
        problems: report.problems.iter().map(|p| p.to_string()).collect(),
        checkpoints,
        anchored_at: report.anchored_at,
        public_key: state.checkpoints.public().to_hex(),
    }))
}
