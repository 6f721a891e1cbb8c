//! The expiry scheduler: at each grant's end time, mark its port Revoked/Expired and
//! audit it.
//!
//! The kernel closes the port on its own (the agent sets a timeout on each grant);
//! this task keeps the controller's record true to that. It sleeps until the earliest
//! end time, or until woken by a new request, so ports are marked within milliseconds
//! of their end. At start it first processes everything that ended while the
//! controller was down.

use std::time::Duration;

use jitgate_core::Timestamp;
use tokio::sync::watch;

use crate::AppState;

/// Longest sleep between checks even with nothing due (guards against clock jumps).
const MAX_SLEEP: Duration = Duration::from_secs(30);

pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        let now = Timestamp::now();
        match state.store.expire_due(now).await {
            Ok(expired) if !expired.is_empty() => {
                tracing::info!(count = expired.len(), "grants expired");
                state.metrics.expired.inc_by(expired.len() as u64);
                state.notify_change();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiry pass failed"),
        }
        if let Ok(n) = state.store.count_live_grants(now).await {
            state.metrics.live_grants.set(n as i64);
        }
        let sleep = match state.store.next_expiry().await {
            Ok(Some(next)) => {
                let ms = next.duration_since(Timestamp::now()).as_millis().max(0) as u64;
                Duration::from_millis(ms).min(MAX_SLEEP)
            }
            Ok(None) => MAX_SLEEP,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the next expiry");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = state.expiry_wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
