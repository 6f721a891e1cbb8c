//! The expiry scheduler: at each grant's end time, mark its port Revoked/Expired and
//! audit it.
//!
//! The kernel closes the port on its own (the agent sets a timeout on each grant);
//! this task keeps the controller's record true to that. It sleeps (on the
//! controller's [`Clock`](crate::clock::Clock)) until the earliest end time, or until
//! woken by a new request, so ports are marked within milliseconds of their end. At start it first processes everything that ended while the
//! controller was down.

use std::time::Duration;

use jitgate_core::Timestamp;
use tokio::sync::watch;

use crate::AppState;

/// Longest sleep between checks even with nothing due (guards against clock jumps).
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// How often the live-grants gauge is recounted.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let mut counted: Option<std::time::Instant> = None;
    loop {
        let now = state.clock.now();
        match state.store.expire_due(now).await {
            Ok(expired) if !expired.is_empty() => {
                tracing::info!(count = expired.len(), "grants expired");
                state.metrics.expired.inc_by(expired.len() as u64);
                state.vm_changes.touch_grants(expired.iter().map(|p| &p.vm));
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiry pass failed"),
        }
        if counted.is_none_or(|t| t.elapsed() >= GAUGE_EVERY)
            && let Ok(n) = state.store.count_live_grants(now).await
        {
            state.metrics.live_grants.set(n as i64);
            counted = Some(std::time::Instant::now());
        }
        let latest = later(now, MAX_SLEEP);
        let wake_at = match state.store.next_expiry().await {
            Ok(Some(next)) => next.min(latest),
            Ok(None) => latest,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the next expiry");
                later(now, Duration::from_secs(1))
            }
        };
        state.expiry_at.store(
            i64::try_from(wake_at.as_nanosecond()).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Release,
        );
        tokio::select! {
            _ = state.clock.sleep_until(wake_at) => {}
            _ = state.expiry_wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn later(t: Timestamp, by: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(by)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}
