//! Approvals in SQL: the rules (`approval_rules`), a request's snapshot of the rule it
//! waits under (columns of `requests`), the decisions (`approval_votes`), and the
//! transitions of pending ports, each audited in the transaction that makes it.

use jitgate_core::approval::{self, ApprovalRule, DecideError, Outcome, Snapshot, Vote};

use super::*;

// ---- rules ----------------------------------------------------------------------------

fn read_rules(c: &dyn Db, tail: &str, params: &[&dyn ToParam]) -> Result<Vec<ApprovalRule>> {
    c.all(
        &format!(
            "SELECT name, scope, ports, approvers, min_approvals, deny_threshold, require_justification,
                    justification_pattern, pending_timeout_s FROM approval_rules {tail}"
        ),
        params,
        |r| {
            let ports: Vec<i64> = serde_json::from_str(&r.get::<String>(2)?)
                .map_err(|e| StoreError::Corrupt(format!("approval rule ports: {e}")))?;
            Ok(ApprovalRule {
                name: r.get(0)?,
                scope: Scope::parse(&r.get::<String>(1)?).map_err(corrupt("scope"))?,
                ports: ports
                    .into_iter()
                    .map(Port::new)
                    .collect::<std::result::Result<_, _>>()
                    .map_err(corrupt("port"))?,
                approvers: serde_json::from_str(&r.get::<String>(3)?)
                    .map_err(|e| StoreError::Corrupt(format!("approvers: {e}")))?,
                min_approvals: u32::try_from(r.get::<i64>(4)?).map_err(corrupt("minApprovals"))?,
                deny_threshold: u32::try_from(r.get::<i64>(5)?).map_err(corrupt("denyThreshold"))?,
                require_justification: r.get::<i64>(6)? != 0,
                justification_pattern: r.get(7)?,
                pending_timeout: r.get(8)?,
            })
        },
    )
}

/// Every rule, by name.
pub(crate) fn all_rules(c: &dyn Db) -> Result<Vec<ApprovalRule>> {
    read_rules(c, "ORDER BY name", &[])
}

pub(crate) fn rule(c: &dyn Db, name: &str) -> Result<Option<ApprovalRule>> {
    Ok(read_rules(c, "WHERE name = ?1", &[&name])?
        .into_iter()
        .next())
}

fn rule_json(r: &ApprovalRule) -> serde_json::Value {
    serde_json::json!({
        "scope": r.scope.to_string(),
        "ports": r.ports.iter().map(|p| p.get()).collect::<Vec<_>>(),
        "approvers": r.approvers,
        "minApprovals": r.min_approvals,
        "denyThreshold": r.deny_threshold,
        "requireJustification": r.require_justification,
        "justificationPattern": r.justification_pattern,
        "pendingTimeoutSeconds": r.pending_timeout,
    })
}

/// Creates or replaces a rule; `Ok(true)` when created.
pub(crate) fn put_rule(ctx: &mut WriteCtx<'_>, r: &ApprovalRule, audit: &AuditCtx) -> Result<bool> {
    let created = !ctx
        .tx
        .exists("SELECT 1 FROM approval_rules WHERE name = ?1", &[&r.name])?;
    let ports = serde_json::to_string(&r.ports.iter().map(|p| p.get()).collect::<Vec<_>>())
        .map_err(|e| StoreError::Db(e.to_string()))?;
    let approvers =
        serde_json::to_string(&r.approvers).map_err(|e| StoreError::Db(e.to_string()))?;
    ctx.tx.execute(
        "INSERT INTO approval_rules(name, scope, ports, approvers, min_approvals, deny_threshold,
            require_justification, justification_pattern, pending_timeout_s, created_ns, updated_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
         ON CONFLICT(name) DO UPDATE SET scope = excluded.scope, ports = excluded.ports,
            approvers = excluded.approvers, min_approvals = excluded.min_approvals,
            deny_threshold = excluded.deny_threshold,
            require_justification = excluded.require_justification,
            justification_pattern = excluded.justification_pattern,
            pending_timeout_s = excluded.pending_timeout_s, updated_ns = excluded.updated_ns",
        &[
            &r.name,
            &r.scope.to_string(),
            &ports,
            &approvers,
            &i64::from(r.min_approvals),
            &i64::from(r.deny_threshold),
            &i64::from(r.require_justification),
            &r.justification_pattern,
            &r.pending_timeout,
            &ns(audit.now),
        ],
    )?;
    ctx.audit(
        audit,
        if created {
            "approvalRule.create"
        } else {
            "approvalRule.update"
        },
        &r.name,
        rule_json(r),
    )?;
    Ok(created)
}

pub(crate) fn delete_rule(ctx: &mut WriteCtx<'_>, name: &str, audit: &AuditCtx) -> Result<bool> {
    let Some(r) = rule(ctx.tx, name)? else {
        return Ok(false);
    };
    ctx.tx
        .execute("DELETE FROM approval_rules WHERE name = ?1", &[&name])?;
    ctx.audit(audit, "approvalRule.delete", name, rule_json(&r))?;
    Ok(true)
}

// ---- a request's approval -------------------------------------------------------------

/// Writes a new request's snapshot (with `insert` of the request).
pub(crate) fn write_snapshot(tx: &dyn Db, request: &str, s: &Snapshot) -> Result<()> {
    let approvers =
        serde_json::to_string(&s.approvers).map_err(|e| StoreError::Db(e.to_string()))?;
    tx.defer(
        "UPDATE requests SET approval_rule = ?2, min_approvals = ?3, deny_threshold = ?4,
            approvers = ?5, pending_until_ns = ?6, open_until_ns = ?6 WHERE id = ?1",
        &[
            &request,
            &s.rule,
            &i64::from(s.min_approvals),
            &i64::from(s.deny_threshold),
            &approvers,
            &ns(s.pending_until),
        ],
    )?;
    Ok(())
}

/// The snapshot in a `requests` row whose columns `approval_rule, min_approvals,
/// deny_threshold, approvers, pending_until_ns` start at `at`; `None` for a request no
/// rule covered.
pub(crate) fn snapshot_at(r: &mut Row, at: usize) -> Result<Option<Snapshot>> {
    let Some(rule) = r.get::<Option<String>>(at)? else {
        return Ok(None);
    };
    Ok(Some(Snapshot {
        rule,
        min_approvals: u32::try_from(r.get::<i64>(at + 1)?).map_err(corrupt("minApprovals"))?,
        deny_threshold: u32::try_from(r.get::<i64>(at + 2)?).map_err(corrupt("denyThreshold"))?,
        approvers: serde_json::from_str(&r.get::<String>(at + 3)?)
            .map_err(|e| StoreError::Corrupt(format!("approvers: {e}")))?,
        pending_until: from_ns(r.get(at + 4)?)?,
    }))
}

/// The decisions on a request, in the order they were made.
pub(crate) fn votes(c: &dyn Db, request: &str) -> Result<Vec<Vote>> {
    c.all(
        "SELECT principal, approve, reason, at_ns FROM approval_votes
         WHERE request_id = ?1 ORDER BY at_ns, principal",
        &[&request],
        |r| {
            Ok(Vote {
                principal: r.get(0)?,
                approve: r.get::<i64>(1)? != 0,
                reason: r.get(2)?,
                at: from_ns(r.get(3)?)?,
            })
        },
    )
}

/// The pending ports of a request: (vm_idx, port_idx, vm id, number, source, requested
/// seconds).
type PendingPort = (i64, i64, VmId, Port, SourcePrefix, i64);

fn pending_ports(c: &dyn Db, request: &str, start: Timestamp) -> Result<Vec<PendingPort>> {
    c.all(
        "SELECT vm_idx, port_idx, vm_id, number, source, end_ns FROM request_ports
         WHERE request_id = ?1 AND status = 'Pending' ORDER BY vm_idx, port_idx",
        &[&request],
        |r| {
            let end = from_ns(r.get(5)?)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                VmId::parse(&r.get::<String>(2)?).map_err(corrupt("vm id"))?,
                Port::new(r.get(3)?).map_err(corrupt("port"))?,
                SourcePrefix::parse(&r.get::<String>(4)?).map_err(corrupt("source"))?,
                end.duration_since(start).as_secs(),
            ))
        },
    )
}

/// Ends every pending port of `request` with `status`, closes its wait, and audits it
/// as `action` on each VM.
fn end_pending(
    ctx: &mut WriteCtx<'_>,
    audit: &AuditCtx,
    request: &str,
    start: Timestamp,
    status: PortStatus,
    action: &str,
    details: serde_json::Value,
) -> Result<usize> {
    let ports = pending_ports(ctx.tx, request, start)?;
    let (st, reason) = status_cols(status);
    ctx.tx.defer(
        "UPDATE request_ports SET status = ?2, reason = ?3, changed = ?4 WHERE request_id = ?1 AND status = 'Pending'",
        &[&request, &st, &reason, &ctx.change_point()],
    )?;
    ctx.tx.defer(
        "UPDATE requests SET open_until_ns = NULL WHERE id = ?1",
        &[&request],
    )?;
    let mut vms: Vec<&VmId> = Vec::new();
    for (_, _, vm, ..) in &ports {
        if !vms.contains(&vm) {
            vms.push(vm);
        }
    }
    for vm in vms {
        let mut d = details.clone();
        d["request"] = request.into();
        d["ports"] = ports
            .iter()
            .filter(|p| p.2 == *vm)
            .map(|p| p.3.get())
            .collect::<Vec<_>>()
            .into();
        d["status"] = st.into();
        d["statusReason"] = reason.into();
        ctx.audit(audit, action, &vm.to_string(), d)?;
    }
    Ok(ports.len())
}

/// Records a decision and applies what it decides.
pub(crate) fn decide(
    ctx: &mut WriteCtx<'_>,
    args: &DecideArgs,
    audit: &AuditCtx,
) -> std::result::Result<Decided, OpError<DecideRefusal>> {
    let id = args.request.to_string();
    let Some(request) = load_requests(ctx.tx, std::slice::from_ref(&id))?.pop() else {
        return Err(OpError::Refused(DecideRefusal::NotFound));
    };
    let Some(approval) = request.approval.clone() else {
        return Err(OpError::Refused(DecideRefusal::Decide(
            DecideError::NotPending,
        )));
    };
    let ports = pending_ports(ctx.tx, &id, request.start)?;
    if ports.is_empty() {
        return Err(OpError::Refused(DecideRefusal::Decide(
            DecideError::NotPending,
        )));
    }
    // Eligibility now: the approve action at every machine of the request.
    let eligible = request.vms.iter().all(|v| {
        rbac::is_allowed(
            &args.assignments,
            &args.who,
            Action::RequestApprove,
            &v.id.scope(),
        )
    });
    let outcome = approval::decide(
        &approval.snapshot,
        &request.requestor,
        &approval.votes,
        &args.who,
        eligible,
        args.approve,
        audit.now,
    )
    .map_err(|e| OpError::Refused(DecideRefusal::Decide(e)))?;
    // What the approver narrows is checked before anything is written, and so is what
    // opens: the policy as it is now must still allow every port (its VM, its port,
    // the source, the duration), and the requestor must still hold the initiate right.
    let mut activated: Vec<(i64, i64, i64, SourcePrefix)> = Vec::new();
    if outcome == Outcome::Approved {
        let policy_uid: Option<String> = ctx.tx.one(
            "SELECT policy_uid FROM requests WHERE id = ?1",
            &[&id],
            |r| r.get(0),
        )?;
        let policy = ctx
            .policy(&request.policy_key)?
            .filter(|(uid, _)| Some(uid) == policy_uid.as_ref())
            .map(|(_, p)| p);
        let requestor_rights =
            read_role_assignments(ctx.tx, "WHERE principal = ?1", &[&request.requestor])?;
        let changed = || OpError::Refused(DecideRefusal::Decide(DecideError::PolicyChanged));
        let Some(policy) = policy else {
            return Err(changed());
        };
        for (vm_idx, port_idx, vm, number, source, secs) in &ports {
            let (secs, src) = approval::narrow(*secs, source, args.duration, args.source.as_ref())
                .map_err(|e| OpError::Refused(DecideRefusal::Invalid(e)))?;
            let rule = policy
                .vm(vm)
                .and_then(|v| v.port(*number))
                .ok_or_else(changed)?;
            if !rule.allowed.permits(&src) || secs > rule.max_duration.secs() {
                return Err(changed());
            }
            let rights: Vec<RoleAssignment> = requestor_rights
                .iter()
                .map(|r| r.assignment.clone())
                .collect();
            if !rbac::is_allowed(&rights, &request.requestor, Action::Initiate, &vm.scope()) {
                return Err(changed());
            }
            activated.push((*vm_idx, *port_idx, secs, src));
        }
    } else if args.duration.is_some() || args.source.is_some() {
        return Err(OpError::Refused(DecideRefusal::Invalid(FieldError::new(
            if args.duration.is_some() {
                "duration"
            } else {
                "sourcePrefix"
            },
            "only the approval that activates the request can narrow it",
        ))));
    }
    ctx.tx.execute(
        "INSERT INTO approval_votes(request_id, principal, approve, reason, at_ns) VALUES (?1, ?2, ?3, ?4, ?5)",
        &[&id, &args.who, &i64::from(args.approve), &args.reason, &ns(audit.now)],
    )?;
    let vote = serde_json::json!({
        "request": id,
        "reason": args.reason,
        "approvals": approval.votes.iter().filter(|v| v.approve).count() + usize::from(args.approve),
        "needed": approval.snapshot.min_approvals,
        "rule": approval.snapshot.rule,
    });
    for vm in &request.vms {
        ctx.audit(
            audit,
            if args.approve {
                "request.approve"
            } else {
                "request.deny"
            },
            &vm.id.to_string(),
            vote.clone(),
        )?;
    }
    match outcome {
        Outcome::Counted { .. } => {}
        Outcome::Denied => {
            end_pending(
                ctx,
                audit,
                &id,
                request.start,
                PortStatus::Denied,
                "request.denied",
                serde_json::json!({"reason": args.reason}),
            )?;
        }
        Outcome::Approved => {
            for (vm_idx, port_idx, secs, src) in &activated {
                let end = audit.now + jiff::SignedDuration::from_secs(*secs);
                ctx.tx.defer(
                    "UPDATE request_ports SET status = 'Initiated', reason = NULL, end_ns = ?4, source = ?5, changed = ?6
                     WHERE request_id = ?1 AND vm_idx = ?2 AND port_idx = ?3",
                    &[&id, vm_idx, port_idx, &ns(end), &src.to_string(), &ctx.change_point()],
                )?;
            }
            ctx.tx.defer(
                "UPDATE requests SET open_until_ns = NULL WHERE id = ?1",
                &[&id],
            )?;
            for vm in &request.vms {
                let now_active: Vec<serde_json::Value> = ports
                    .iter()
                    .zip(&activated)
                    .filter(|(p, _)| p.2 == vm.id)
                    .map(|(p, (_, _, secs, src))| {
                        serde_json::json!({
                            "number": p.3.get(),
                            "source": src.to_string(),
                            "endTimeUtc": (audit.now + jiff::SignedDuration::from_secs(*secs)).to_string(),
                        })
                    })
                    .collect();
                if !now_active.is_empty() {
                    ctx.audit(
                        audit,
                        "request.approved",
                        &vm.id.to_string(),
                        serde_json::json!({"request": id, "ports": now_active}),
                    )?;
                }
            }
        }
    }
    let request = load_requests(ctx.tx, std::slice::from_ref(&id))?
        .pop()
        .ok_or_else(|| StoreError::Db("the request vanished".into()))?;
    Ok(Decided { outcome, request })
}

/// The requestor ends its own request's wait.
pub(crate) fn cancel(
    ctx: &mut WriteCtx<'_>,
    request: RequestId,
    who: &str,
    audit: &AuditCtx,
) -> std::result::Result<AccessRequest, OpError<CancelRefusal>> {
    let id = request.to_string();
    let Some(r) = load_requests(ctx.tx, std::slice::from_ref(&id))?.pop() else {
        return Err(OpError::Refused(CancelRefusal::NotFound));
    };
    if r.requestor != who {
        return Err(OpError::Refused(CancelRefusal::NotYours));
    }
    let n = end_pending(
        ctx,
        audit,
        &id,
        r.start,
        PortStatus::Revoked(RevokeReason::Cancelled),
        "request.cancel",
        serde_json::json!({}),
    )?;
    if n == 0 {
        return Err(OpError::Refused(CancelRefusal::NotPending));
    }
    Ok(load_requests(ctx.tx, std::slice::from_ref(&id))?
        .pop()
        .ok_or_else(|| StoreError::Db("the request vanished".into()))?)
}

/// Ends the waits that are over (`open_until_ns <= now`) as expired; their count.
pub(crate) fn expire_pending(ctx: &mut WriteCtx<'_>, audit: &AuditCtx) -> Result<usize> {
    let due: Vec<(String, i64)> = ctx.tx.all(
        "SELECT id, start_ns FROM requests WHERE open_until_ns <= ?1",
        &[&ns(audit.now)],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut n = 0;
    for (id, start) in due {
        n += end_pending(
            ctx,
            audit,
            &id,
            from_ns(start)?,
            PortStatus::Revoked(RevokeReason::ApprovalExpired),
            "request.approvalExpired",
            serde_json::json!({}),
        )?;
    }
    Ok(n)
}

/// The earliest end of a wait, if any request waits.
pub(crate) fn next_pending_end(c: &dyn Db) -> Result<Option<Timestamp>> {
    let n: Option<i64> = c.row("SELECT MIN(open_until_ns) FROM requests", &[], |r| r.get(0))?;
    n.map(from_ns).transpose()
}

/// An approver marks a break-glass request reviewed.
pub(crate) fn review(
    ctx: &mut WriteCtx<'_>,
    request: RequestId,
    who: &str,
    assignments: &[RoleAssignment],
    audit: &AuditCtx,
) -> std::result::Result<AccessRequest, OpError<ReviewRefusal>> {
    let id = request.to_string();
    let Some(r) = load_requests(ctx.tx, std::slice::from_ref(&id))?.pop() else {
        return Err(OpError::Refused(ReviewRefusal::NotFound));
    };
    let Some(bg) = &r.break_glass else {
        return Err(OpError::Refused(ReviewRefusal::NotBreakGlass));
    };
    if bg.reviewed_by.is_some() {
        return Err(OpError::Refused(ReviewRefusal::AlreadyReviewed));
    }
    if r.requestor == who {
        return Err(OpError::Refused(ReviewRefusal::OwnRequest));
    }
    if !r
        .vms
        .iter()
        .all(|v| rbac::is_allowed(assignments, who, Action::RequestApprove, &v.id.scope()))
    {
        return Err(OpError::Refused(ReviewRefusal::NotAnApprover));
    }
    ctx.tx.defer(
        "UPDATE requests SET reviewed_by = ?2, reviewed_ns = ?3 WHERE id = ?1",
        &[&id, &who, &ns(audit.now)],
    )?;
    for vm in &r.vms {
        ctx.audit(
            audit,
            "request.breakGlassReviewed",
            &vm.id.to_string(),
            serde_json::json!({"request": id}),
        )?;
    }
    let mut r = r;
    r.break_glass = Some(jitgate_core::approval::BreakGlass {
        reviewed_by: Some(who.to_owned()),
        reviewed_at: Some(audit.now),
    });
    Ok(r)
}
