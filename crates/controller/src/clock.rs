//! The controller's clock: the one place it reads the time and waits for a time.
//!
//! Everything time-dependent in the controller (handlers deciding with `now`, the
//! expiry scheduler, the desired-state long-poll) goes through [`Clock`] in
//! `AppState`. In production it is the system clock. Tests hand the controller a
//! [`ManualClock`] instead and move it forward themselves, so a grant that lasts an
//! hour expires the moment the test says so, and no test sleeps to let time pass.
//!
//! Only wall-clock time goes through here. Monotonic intervals that bound work rather
//! than decide anything (rate-limit windows, cache lifetimes, TLS renewal checks,
//! socket timeouts) stay on `std::time::Instant` / tokio's timer.

use std::fmt;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

/// The controller's source of time: the system clock, or a [`ManualClock`].
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<ManualClock>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    pub fn now(&self) -> Timestamp {
        match &self.manual {
            None => Timestamp::now(),
            Some(m) => m.now(),
        }
    }

    /// Returns once the clock reads `t` or later (at once if it already does).
    ///
    /// On the system clock this sleeps for the time left as measured now, so a later
    /// jump of the wall clock is noticed only when it returns; callers cap their
    /// sleeps to bound that (the expiry scheduler wakes at least every 30 s).
    pub async fn sleep_until(&self, t: Timestamp) {
        match &self.manual {
            None => {
                let left = t.duration_since(Timestamp::now());
                if left.is_positive() {
                    let left = std::time::Duration::try_from(left).unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
            }
            Some(m) => m.sleep_until(t).await,
        }
    }
}

impl From<ManualClock> for Clock {
    fn from(m: ManualClock) -> Clock {
        Clock { manual: Some(m) }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::system"),
            Some(m) => write!(f, "Clock::manual({})", m.now()),
        }
    }
}

/// A clock that moves only when told to: for tests. Clones share the same time.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<Timestamp>>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            now: Arc::new(watch::channel(start).0),
        }
    }

    /// Starting at the system's time now (so that times computed from the real clock,
    /// such as a client's `endTimeUtc`, make sense to the controller).
    pub fn starting_now() -> ManualClock {
        ManualClock::new(Timestamp::now())
    }

    pub fn now(&self) -> Timestamp {
        *self.now.borrow()
    }

    /// Moves the time forward by `by` and wakes every sleeper whose time has come.
    pub fn advance(&self, by: std::time::Duration) {
        let by = SignedDuration::try_from(by).unwrap_or(SignedDuration::MAX);
        self.now.send_modify(|t| {
            *t = t.saturating_add(by).unwrap_or(Timestamp::MAX);
        });
    }

    /// Moves the time forward to `t` (never back).
    pub fn advance_to(&self, t: Timestamp) {
        self.now.send_modify(|now| *now = (*now).max(t));
    }

    async fn sleep_until(&self, t: Timestamp) {
        let mut rx = self.now.subscribe();
        while *rx.borrow_and_update() < t {
            if rx.changed().await.is_err() {
                // Unreachable while `self` holds the sender; never wake early.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    /// A sleeper wakes exactly when the manual clock reaches its time, not before,
    /// however long real time passes.
    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_advanced_past_their_time() {
        let manual = ManualClock::new(t0());
        let clock = Clock::from(manual.clone());
        let until = t0().checked_add(SignedDuration::from_secs(3600)).unwrap();
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(until).await }
        });
        tokio::task::yield_now().await;
        manual.advance(Duration::from_secs(3599));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke before its time");
        assert_eq!(
            clock.now(),
            until.checked_sub(SignedDuration::from_secs(1)).unwrap()
        );
        manual.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(10), sleeper)
            .await
            .unwrap()
            .unwrap();
        // A time already reached returns at once; the clock never goes back.
        clock.sleep_until(t0()).await;
        manual.advance_to(t0());
        assert_eq!(clock.now(), until);
    }

    #[tokio::test]
    async fn the_system_clock_is_the_system_time() {
        let clock = Clock::system();
        let before = Timestamp::now();
        let now = clock.now();
        assert!(now >= before && now <= Timestamp::now());
        // A time in the past returns at once.
        tokio::time::timeout(Duration::from_secs(10), clock.sleep_until(before))
            .await
            .unwrap();
    }
}
