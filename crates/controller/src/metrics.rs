//! Prometheus metrics, served at `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub initiates: Counter,
    pub expired: Counter,
    pub revoked: Counter,
    pub refused: Family<StatusLabel, Counter>,
    pub live_grants: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub http_requests: Counter<u64, AtomicU64>,
    pub verdicts: Family<VerdictLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub blocked: Family<PortLabel, Counter>,
    pub drift: Counter,
    pub refusals_suppressed: Counter,
    pub connections_refused: Counter,
    pub auth_cache_hits: Counter,
    pub auth_cache_misses: Counter,
    /// The store's write queue, read from the store at each scrape.
    pub write_queue_depth: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub write_queue_capacity: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub writes_refused: Counter<u64, AtomicU64>,
    pub blocked_pruned: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: u16,
    pub protocol: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("jitgate");
        let initiates = Counter::default();
        let expired = Counter::default();
        let revoked = Counter::default();
        let refused = Family::<StatusLabel, Counter>::default();
        let live_grants = Gauge::default();
        let http_requests = Counter::default();
        let verdicts = Family::<VerdictLabel, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        let blocked = Family::<PortLabel, Counter>::default();
        let drift = Counter::default();
        let refusals_suppressed = Counter::default();
        let connections_refused = Counter::default();
        let auth_cache_hits = Counter::default();
        let auth_cache_misses = Counter::default();
        registry.register(
            "auth_cache_hits",
            "Calls authenticated from the token cache, without a store read",
            auth_cache_hits.clone(),
        );
        registry.register(
            "auth_cache_misses",
            "Calls whose token was looked up in the store",
            auth_cache_misses.clone(),
        );
        let write_queue_depth = Gauge::default();
        let write_queue_capacity = Gauge::default();
        let writes_refused = Counter::default();
        let blocked_pruned = Counter::default();
        registry.register(
            "write_queue_depth",
            "Writes waiting for the store's writer (besides the group being committed)",
            write_queue_depth.clone(),
        );
        registry.register(
            "write_queue_capacity",
            "The most writes that may wait for the store's writer (--write-queue)",
            write_queue_capacity.clone(),
        );
        registry.register(
            "writes_refused",
            "Writes refused because the write queue was full (answered 503 with Retry-After)",
            writes_refused.clone(),
        );
        registry.register(
            "blocked_attempts_pruned",
            "Blocked-attempt points deleted for being older than the retention",
            blocked_pruned.clone(),
        );
        registry.register(
            "refusals_suppressed",
            "Refused calls past a source's audit burst: counted here and summarized in the audit log instead of written one by one",
            refusals_suppressed.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once because the connection cap was reached",
            connections_refused.clone(),
        );
        registry.register(
            "enforcement_drift",
            "Changes to an agent's table inet jitgate made outside jitgate, as reported by agents",
            drift.clone(),
        );
        registry.register(
            "recommendation_vms",
            "VMs by recommendation verdict (Healthy, Unhealthy, NotApplicable)",
            verdicts.clone(),
        );
        registry.register(
            "blocked_attempts",
            "Connection attempts dropped by JIT deny rules, as reported by agents",
            blocked.clone(),
        );
        registry.register(
            "initiates",
            "Accepted access requests (initiate calls)",
            initiates.clone(),
        );
        registry.register(
            "grants_expired",
            "Request ports that reached their end time",
            expired.clone(),
        );
        registry.register(
            "grants_revoked",
            "Request ports revoked early (user, supersede or policy change)",
            revoked.clone(),
        );
        registry.register(
            "refused_calls",
            "API calls answered with an error, by status",
            refused.clone(),
        );
        registry.register(
            "live_grants",
            "Request ports currently open",
            live_grants.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests served",
            http_requests.clone(),
        );
        Metrics {
            registry,
            initiates,
            expired,
            revoked,
            refused,
            live_grants,
            http_requests,
            verdicts,
            blocked,
            drift,
            refusals_suppressed,
            connections_refused,
            auth_cache_hits,
            auth_cache_misses,
            write_queue_depth,
            write_queue_capacity,
            writes_refused,
            blocked_pruned,
        }
    }

    /// Takes in the store's write-queue figures (at each scrape: the store counts).
    pub fn observe_write_queue(&self, stats: Option<jitgate_store::WriteQueueStats>) {
        if let Some(q) = stats {
            self.write_queue_depth.set(q.depth as i64);
            self.write_queue_capacity.set(q.capacity as i64);
            self.writes_refused
                .inner()
                .store(q.refused, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn refused(&self, status: u16) {
        self.refused.get_or_create(&StatusLabel { status }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
