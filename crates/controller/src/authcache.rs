//! Authenticated tokens kept in memory, so that authenticating a call reads nothing
//! from the store on the hot path.
//!
//! An entry holds a valid token's record and its principal's role assignments, keyed by
//! how the token was looked up (its id, or for an operator's own bootstrap token the
//! hash of its text). The presented secret is still compared with the record's hash
//! on every call, and expiry is checked against the call's time. An entry lives at most
//! [`TTL`]; every change this controller makes to tokens or role assignments (a
//! revoke, an assignment added or removed, an enrollment that revokes an agent's old
//! credential) drops them all at once. A lookup that started before such a change
//! never stores its (possibly stale) result: entries carry the generation they were
//! read in. The TTL bounds how long a change made elsewhere (another replica, a
//! recovery) can go unseen. At most [`MAX_ENTRIES`] are kept; when full, the cache is
//! emptied rather than grown.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jitgate_core::rbac::RoleAssignment;
use jitgate_store::TokenRecord;

pub const TTL: Duration = Duration::from_secs(5);
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Cached {
    pub record: TokenRecord,
    pub assignments: Vec<RoleAssignment>,
}

#[derive(Debug, Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<String, (Cached, Instant, u64)>>,
    generation: AtomicU64,
}

impl AuthCache {
    /// The generation to hand back to [`AuthCache::put`] after reading the store.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, key: &str) -> Option<Cached> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (cached, at, generation) = entries.get(key)?;
        (at.elapsed() < TTL && *generation == self.generation()).then(|| cached.clone())
    }

    /// Keeps what was read in `generation`, unless something changed since.
    pub fn put(&self, key: String, cached: Cached, generation: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if generation != self.generation() {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, (cached, Instant::now(), generation));
    }

    /// After any change to tokens or role assignments.
    pub fn invalidate(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(principal: &str) -> Cached {
        Cached {
            record: TokenRecord {
                id: "t1".into(),
                principal: principal.into(),
                secret_hash: "h".into(),
                description: String::new(),
                created: jitgate_core::Timestamp::UNIX_EPOCH,
                expires: None,
                revoked: None,
                identity: None,
                last_used: None,
            },
            assignments: Vec::new(),
        }
    }

    #[test]
    fn a_change_drops_entries_and_a_lookup_from_before_it_is_not_kept() {
        let cache = AuthCache::default();
        let g = cache.generation();
        cache.put("id:t1".into(), cached("alice"), g);
        assert_eq!(cache.get("id:t1").unwrap().record.principal, "alice");
        // A lookup starts, then a revoke lands: what the lookup read is not kept.
        let before = cache.generation();
        cache.invalidate();
        assert!(cache.get("id:t1").is_none());
        cache.put("id:t1".into(), cached("alice"), before);
        assert!(cache.get("id:t1").is_none());
        // A lookup after the change is kept.
        cache.put("id:t1".into(), cached("alice"), cache.generation());
        assert!(cache.get("id:t1").is_some());
    }

    #[test]
    fn it_never_grows_past_its_bound() {
        let cache = AuthCache::default();
        for i in 0..MAX_ENTRIES + 10 {
            cache.put(format!("id:{i}"), cached("x"), cache.generation());
        }
        let n = cache.entries.lock().unwrap().len();
        assert!(n <= MAX_ENTRIES, "{n}");
    }
}
