//! Following the other controllers that share the database (PostgreSQL).
//!
//! Every change is written with its audit event in the same transaction, and the
//! audit log's sequence is gap-free and in commit order (each write holds the
//! database's write lock). So the log is the change feed: this task reads the events
//! after the last one it saw and applies what this controller keeps in memory:
//!
//! - the agents long-polling here are woken for the VMs an event names (for a policy,
//!   exclusion or recommendations change, all of them: each re-reads its state and
//!   keeps waiting when nothing of its own changed);
//! - the authentication cache is dropped on any token, role or agent-credential event,
//!   so a token revoked through another controller is refused here too;
//! - the expiry scheduler is woken by a new request (its end may be the next).
//!
//! It reads when the store's doorbell rings (a PostgreSQL notification sent with each
//! commit, and after a lost and restored connection) and at least every second, so a
//! lost notification delays a change by at most that. Events of this controller's own
//! writes come back too; applying them again only wakes what is already awake.

use std::time::Duration;

use jitgate_core::audit::AuditRecord;
use jitgate_core::ids::VmId;
use jitgate_store::AuditQuery;
use tokio::sync::watch;

use crate::AppState;

/// The longest a change waits when notifications are lost.
const POLL: Duration = Duration::from_secs(1);

/// Events read per query while catching up.
const PAGE: usize = 1000;

pub async fn run(state: AppState, bell: watch::Receiver<u64>, mut shutdown: watch::Receiver<bool>) {
    // What happened before this controller started is already in the database, and
    // nothing in memory depends on it.
    let mut last = loop {
        match state.store.audit_tail().await {
            Ok((seq, _)) => break seq,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit log's tail; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    let mut bell = Some(bell);
    loop {
        tokio::select! {
            _ = rung(&mut bell) => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
        loop {
            let q = AuditQuery {
                after_seq: Some(last),
                limit: PAGE,
                ..AuditQuery::default()
            };
            match state.store.query_audit(&q).await {
                Ok(events) => {
                    for e in &events {
                        apply(&state, e);
                        last = last.max(e.seq);
                    }
                    if events.len() < PAGE {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read other controllers' changes; retrying");
                    break;
                }
            }
        }
    }
}

/// Returns when the doorbell rings. A doorbell whose store is gone never rings again
/// (only the poll is left), rather than answering at once forever.
async fn rung(bell: &mut Option<watch::Receiver<u64>>) {
    let closed = match bell.as_mut() {
        Some(b) => b.changed().await.is_err(),
        None => return std::future::pending().await,
    };
    if closed {
        *bell = None;
    }
}

/// What one event changes in this controller's memory.
fn apply(state: &AppState, e: &AuditRecord) {
    let action = e.entry.action.as_str();
    let family = action.split('.').next().unwrap_or_default();
    if matches!(
        family,
        "token" | "roleAssignment" | "agent" | "enrollToken" | "admin"
    ) {
        state.auth_cache.invalidate();
    }
    if action == "request.initiate" {
        state.expiry_wake.notify_one();
    }
    match VmId::parse(&e.entry.target) {
        // A request's actions change only grants.
        Ok(vm) if family == "request" => state.vm_changes.touch_grants([&vm]),
        Ok(vm) => state.vm_changes.touch([&vm]),
        Err(_) if matches!(family, "policy" | "exclusion" | "recommendations") => {
            state.vm_changes.touch_all();
        }
        Err(_) => {}
    }
}
