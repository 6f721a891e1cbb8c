//! The agent's main loop: enroll, restore, long-poll, apply, report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jitgate_core::Timestamp;
use jitgate_proto::{Desired, DesiredState, EnrollRequest, EnrollResponse, StatusReport};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::drift::Check;
use crate::enforce::{ApplyKind, Enforcer};
use crate::host;
use crate::netlink::{Heard, Monitor, NfSocket};
use crate::nft::Nft;
use crate::state::{Credentials, StateDir};
use jitgate_core::nfnl::Notice;

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the status report says besides host facts.
#[derive(Default, Clone)]
struct Progress {
    /// The desired state last applied successfully (its revision is reported; the
    /// table watchdog rebuilds from it; the next delta applies to it).
    last: Option<Arc<Desired>>,
    applied_at: Option<String>,
    error: Option<String>,
    /// Some(false) from finding drift until a later check confirms the table matches.
    table_matches: Option<bool>,
    drift_events: u64,
    last_drift: Option<jitgate_proto::WireDrift>,
}

impl Progress {
    fn applied_revision(&self) -> Option<String> {
        self.last.as_ref().map(|d| d.revision.clone())
    }
}

/// Host facts gathered at each full report, reused by light ones.
#[derive(Default, Clone)]
struct Inventory {
    addresses: Vec<String>,
    listening: Vec<jitgate_proto::WireListener>,
    /// What could not be read while gathering `listening`.
    errors: Vec<String>,
    counters: Vec<jitgate_proto::WireCounter>,
}

struct Shared {
    config: AgentConfig,
    inventory: Mutex<Inventory>,
    /// A second handle for reading counters, so reports never wait on an apply.
    counter_nft: Nft,
    http: reqwest::Client,
    creds: Credentials,
    enforcer: Mutex<Enforcer>,
    /// The table's structure as read back after the last full rebuild (None: not
    /// read yet since).
    baseline: Mutex<Option<crate::drift::Baseline>>,
    /// A sequence lock around applies: odd while an apply runs, bumped twice by each.
    /// A read-back is trusted only when the number is even and unchanged across it,
    /// so reading the table holds up no apply (but for a held element read,
    /// [`crate::drift::ElementReads`]).
    apply_seq: std::sync::atomic::AtomicU64,
    /// Counts full rebuilds, bumped under the enforcer's lock.
    full_applies: std::sync::atomic::AtomicU64,
    /// While an element check reads the kernel: the elements deltas changed
    /// meanwhile (added under the enforcer's lock), which that check leaves out.
    in_flux: Mutex<Option<std::collections::HashSet<ElementKey>>>,
    /// Taken for writing around an element check that holds changes
    /// ([`crate::drift::ElementReads`]); the poll loop takes it for reading before an
    /// apply, so that it waits without blocking the agent's one thread. (The only
    /// other applies, a repair and the boot-time restore, never run beside a check.)
    changes_held: Arc<tokio::sync::RwLock<()>>,
    /// Wakes the watchdog to read the table back right after an apply.
    baseline_wanted: tokio::sync::Notify,
    /// Wakes the watchdog when the kernel announces a change of the table by another
    /// process (see [`watch_changes`]).
    table_changed: tokio::sync::Notify,
    /// The same for a gateway's `table inet jitgate_gw`.
    gateway_changed: Arc<tokio::sync::Notify>,
    /// Reads the grant sets' elements for the drift check (a socket of its own, so
    /// reading never waits for an apply).
    reader: Mutex<Option<NfSocket>>,
    progress: Mutex<Progress>,
    /// What is on disk (one writer of the state files at a time: held while writing).
    saving: Mutex<Option<Saved>>,
    nft_version: Option<String>,
}

/// The applied state on disk: the state saved last, and the sizes of the whole state
/// and of the log of changes written since (see [`StateDir`]).
struct Saved {
    state: Arc<Desired>,
    whole_bytes: u64,
    log_bytes: u64,
}

/// The log is folded into a new whole state once it is larger than this or than the
/// whole state, whichever is larger: writing stays proportional to what changed.
const LOG_AT_LEAST: u64 = 64 * 1024;

/// The HTTP client: trusts the controller by `--ca-cert` and the pinned fingerprint
/// when given (see `jitgate_proto::tls`), else by the system's roots.
pub(crate) fn client(
    config: &AgentConfig,
    pin: Option<jitgate_proto::tls::Fingerprint>,
) -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(jitgate_proto::CLIENT_POOL_IDLE)
        .timeout(config.poll_wait + Duration::from_secs(15));
    let mut anchors = Vec::new();
    if let Some(ca) = &config.ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        anchors = jitgate_proto::tls::certs_from_pem(&pem)
            .map_err(|e| Permanent(format!("--ca-cert {}: {e}", ca.display())))?;
    }
    if !anchors.is_empty() || pin.is_some() {
        let verifier = jitgate_proto::tls::PinnedVerifier::new(anchors, pin.into_iter().collect());
        b = b.tls_backend_preconfigured(verifier.client_config()?);
    }
    Ok(b.build()?)
}

/// A failed request, in words: TLS failures become advice (what to fix).
fn describe(e: &reqwest::Error, controller: &str) -> String {
    jitgate_proto::tls::advice(e, controller).unwrap_or_else(|| {
        let mut text = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            text.push_str(": ");
            text.push_str(&s.to_string());
            src = s.source();
        }
        text
    })
}

/// For tests: a pause in each read of the grant sets' elements, after the first part
/// of each set's dump (`JITGATE_TEST_READ_PAUSE_MS`), so that a read of a small table
/// lasts as long as a large table's does (half a second at 100,000 elements) and the
/// agent's own changes fall inside it. Unset: no pause.
/// Debug builds only: a release agent never pauses its reads (a held read would hold
/// revokes for as long).
fn read_pause() -> Option<Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| {
        std::env::var("JITGATE_TEST_READ_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    })
}

/// True when `pid` (a committing task, as the kernel names it) is this process's:
/// one of its threads, or an `nft` it started.
fn is_own_task(pid: u32) -> bool {
    crate::nft::is_recent_child(pid)
        || std::path::Path::new(&format!("/proc/self/task/{pid}")).exists()
}

/// Listens to the kernel's nf_tables change notifications on a thread of its own and
/// wakes the watchdog when a transaction committed by another process touched
/// `table inet jitgate` (or when notifications were lost), so drift is found the
/// moment it happens rather than at the next periodic check. Ends with the agent.
fn watch_changes(shared: std::sync::Weak<Shared>) {
    let mut monitor = match Monitor::open() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot listen to nf_tables changes; drift is found by the periodic check only");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("nft-monitor".into())
        .spawn(move || {
            // Whether the transaction being announced touched the table (the
            // gateway's table) from a socket that is not the agent's.
            let (mut foreign, mut foreign_gw) = (false, false);
            loop {
                let heard = match monitor.listen() {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "nf_tables notifications stopped; drift is found by the periodic check only");
                        return;
                    }
                };
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                for h in heard {
                    match h {
                        Heard::Lost => {
                            tracing::debug!("nf_tables notifications were lost; checking the table");
                            shared.table_changed.notify_one();
                            shared.gateway_changed.notify_one();
                        }
                        Heard::Notice { notice, port } => match notice {
                            Notice::Commit { pid, process, .. } => {
                                let other = !is_own_task(pid);
                                if foreign && other {
                                    tracing::info!(pid, %process, "another process changed table inet jitgate; checking it now");
                                    shared.table_changed.notify_one();
                                }
                                if foreign_gw && other {
                                    tracing::info!(pid, %process, "another process changed table inet jitgate_gw; checking it now");
                                    shared.gateway_changed.notify_one();
                                }
                                (foreign, foreign_gw) = (false, false);
                            }
                            // The agent's and the gateway's netlink sockets make
                            // their changes from any thread: known by their port.
                            n if n.touches_jitgate() && !crate::netlink::is_own_port(port) => {
                                foreign = true;
                            }
                            n if n.touches(jitgate_core::gateway::TABLE)
                                && !crate::netlink::is_own_port(port) =>
                            {
                                foreign_gw = true;
                            }
                            _ => {}
                        },
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the nf_tables monitor thread");
    }
}

/// A condition restarting the agent with the same configuration cannot fix (nft
/// missing, no privilege, a certificate that does not validate, a refused token):
/// the agent exits with EX_CONFIG (78) and this advice instead of retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

/// Before enrolling (which uses up a token use and registers the VM): checks that
/// this machine can enforce and that the controller answers and its TLS validates.
/// Each failure is one message; a permanent one is [`Permanent`].
pub async fn preflight(config: &AgentConfig, http: &reqwest::Client) -> anyhow::Result<()> {
    let nft = Nft::new(config.nft.clone());
    if let Err(e) = nft.version() {
        return Err(Permanent(format!(
            "cannot run {} ({e:#}): install the nftables package (apt install nftables) or give --nft PATH",
            config.nft.display()
        ))
        .into());
    }
    if let Err(e) = nft.check("add table inet jitgate_preflight\n") {
        let text = format!("{e:#}");
        let lower = text.to_ascii_lowercase();
        let advice = if lower.contains("operation not permitted")
            || lower.contains("permission denied")
        {
            "the agent needs root (CAP_NET_ADMIN) to change the firewall: run it as root, as the systemd unit does"
        } else if lower.contains("not supported") || lower.contains("no such file") {
            "the kernel has no nf_tables support: load it (modprobe nf_tables) or use a kernel with CONFIG_NF_TABLES"
        } else {
            "nft cannot change the firewall here"
        };
        return Err(Permanent(format!("{advice} (nft -c said: {text})")).into());
    }
    let url = format!("{}/api/v1/health", config.controller);
    let resp = http.get(&url).send().await.map_err(|e| {
        match jitgate_proto::tls::advice(&e, &config.controller) {
            Some(advice) => anyhow::Error::new(Permanent(advice)),
            None => anyhow::anyhow!(
                "the controller at {} does not answer ({}): is `jitgate serve` running there, is the port open to this machine, is --controller right?",
                config.controller,
                describe(&e, &config.controller)
            ),
        }
    })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let healthy = status.is_success()
        && serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .is_some_and(|v| v.get("status").is_some());
    if !healthy {
        return Err(Permanent(format!(
            "{} does not look like a jitgate controller (GET /api/v1/health answered {status}): check --controller",
            config.controller
        ))
        .into());
    }
    Ok(())
}

/// Why an enrollment did not succeed: retry only when the controller was not reached
/// or failed (5xx); a refusal is final.
#[derive(Debug, thiserror::Error)]
enum EnrollFailure {
    #[error(
        "this agent has no credential yet: give --enroll-token-file (a token from `jitgate enroll-token create`)"
    )]
    NoToken,
    #[error("enrollment refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("cannot enroll at {controller}: {reason}")]
    Unreachable { controller: String, reason: String },
}

async fn enroll(
    config: &AgentConfig,
    http: &reqwest::Client,
) -> Result<Credentials, EnrollFailure> {
    let token = config.enroll_token.clone().ok_or(EnrollFailure::NoToken)?;
    let body = EnrollRequest {
        enroll_token: token,
        resource_group: config.resource_group.clone(),
        name: config.name.clone(),
        location: config.location.clone(),
    };
    let unreachable = |reason: String| EnrollFailure::Unreachable {
        controller: config.controller.clone(),
        reason,
    };
    let resp = http
        .post(format!("{}/api/v1/agent/enroll", config.controller))
        .json(&body)
        .send()
        .await
        .map_err(|e| unreachable(describe(&e, &config.controller)))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if status.is_server_error() {
        return Err(unreachable(format!("the controller answered {status}")));
    }
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        return Err(EnrollFailure::Refused {
            status: status.as_u16(),
            message,
        });
    }
    let r: EnrollResponse = serde_json::from_str(&text)
        .map_err(|e| unreachable(format!("the enrollment answer is not understood: {e}")))?;
    Ok(Credentials {
        controller: config.controller.clone(),
        vm_id: r.vm_id,
        token: r.token,
        ca_fingerprint: None,
    })
}

/// The controller revoked this agent's credential: the VM was enrolled again (by a
/// new agent) or an administrator revoked it. The agent stops for good, leaving the
/// kernel table as it is (fail-closed), instead of retrying forever.
#[derive(Debug, thiserror::Error)]
#[error("this agent's credential was revoked: {0}")]
pub struct Replaced(pub String);

impl Shared {
    /// Sends a status report. `full` adds what takes time to gather (listening
    /// sockets with their processes, addresses, blocked-attempt counters); the report
    /// right after an apply is light so it never delays the next apply.
    async fn report(self: &Arc<Self>, full: bool) {
        let progress = self.progress.lock().map(|p| p.clone()).unwrap_or_default();
        let inventory = if full {
            let me = self.clone();
            let gathered = tokio::task::spawn_blocking(move || {
                // Counters are read without holding the enforcer: only the rule names
                // are copied under the lock.
                let rules = me
                    .enforcer
                    .lock()
                    .map(|e| e.applied_rules())
                    .unwrap_or_default();
                let counters = crate::enforce::read_counters(&me.counter_nft, &rules);
                let listeners = host::listeners(&me.config.proc_root);
                Inventory {
                    addresses: host::addresses(),
                    listening: listeners.listening,
                    errors: listeners.errors,
                    counters,
                }
            })
            .await
            .unwrap_or_default();
            if let Ok(mut last) = self.inventory.lock() {
                // Logged once when it appears (reports come every 10 s); the report
                // carries every current one to the controller.
                for e in host::new_errors(&last.errors, &gathered.errors) {
                    tracing::warn!(error = %e, "cannot read the host's listening sockets; the report may miss some");
                }
                if !last.errors.is_empty() && gathered.errors.is_empty() {
                    tracing::info!("the host's listening sockets are readable again");
                }
                *last = gathered.clone();
            }
            gathered
        } else {
            self.inventory.lock().map(|i| i.clone()).unwrap_or_default()
        };
        let report = StatusReport {
            applied_revision: progress.applied_revision(),
            applied_at: progress.applied_at,
            nft_version: self.nft_version.clone(),
            error: progress.error,
            hostname: host::hostname(),
            os: host::os_name(),
            agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            protocol: Some(jitgate_proto::AGENT_PROTOCOL),
            addresses: inventory.addresses,
            listening: inventory.listening,
            inventory_errors: inventory.errors,
            counters: inventory.counters,
            table_matches: progress.table_matches,
            drift_events: progress.drift_events,
            last_drift: progress.last_drift,
        };
        let r = self
            .http
            .post(format!("{}/api/v1/agent/status", self.config.controller))
            .query(&[("vm", self.creds.vm_id.as_str())])
            .bearer_auth(self.creds.token.expose())
            .json(&report)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => tracing::warn!(status = %resp.status(), "status report refused"),
            Err(e) => tracing::debug!(error = %e, "status report failed"),
        }
    }

    /// Compares the kernel's table with what the agent applied: its structure with
    /// the baseline read after the last full rebuild (or takes that baseline, the
    /// first time after one), and, when `elements` is true, every set element with
    /// the applied plan. On drift, records it (the caller reports, then calls
    /// [`Self::repair`]); when a table found drifted earlier matches again, confirms
    /// it. The watchdog holds the agent's changes around a held read (see
    /// [`crate::drift::ElementReads`] and `changes_held`).
    fn check_table(&self, elements: bool) -> Check {
        use std::sync::atomic::Ordering;
        let has_state = self
            .progress
            .lock()
            .map(|p| p.last.is_some())
            .unwrap_or(false);
        if !has_state {
            return Check::Same;
        }
        let before = self.apply_seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            return Check::Retry;
        }
        let full_before = self.full_applies.load(Ordering::Acquire);
        if elements && let Ok(mut flux) = self.in_flux.lock() {
            *flux = Some(Default::default());
        }
        let listing = match self.counter_nft.list_table_terse_json() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read table inet jitgate back");
                return Check::Same;
            }
        };
        let read_from = Timestamp::now();
        let held = match (&listing, elements) {
            (Some(_), true) => match self.read_elements() {
                Ok(h) => Some((
                    crate::drift::ReadAt {
                        from: read_from,
                        to: Timestamp::now(),
                    },
                    h,
                )),
                // Changes kept coming while it read: compare later.
                Err(e) if e.is::<crate::netlink::DumpInterrupted>() => {
                    return Check::Interrupted;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the grant sets back");
                    return Check::Same;
                }
            },
            _ => None,
        };
        // What the agent applied, taken after the read-back, and the elements deltas
        // changed while it read (left out of the comparison: the read may have seen
        // them before or after).
        let expected = match &held {
            Some(_) => match self.enforcer.lock() {
                Ok(e) => Some(e.applied_elements()),
                Err(_) => return Check::Same,
            },
            None => None,
        };
        let flux = self
            .in_flux
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or_default();
        let applied_meanwhile = self.apply_seq.load(Ordering::Acquire) != before;
        if self.full_applies.load(Ordering::Acquire) != full_before
            || (applied_meanwhile && expected.is_none())
        {
            // The table was rebuilt meanwhile (or, without elements to compare, any
            // apply ran): this listing belongs to no single state. Deltas change
            // elements only, which are compared without the ones they touched.
            return Check::Retry;
        }
        let mut changes = match (&listing, self.baseline.lock().as_deref_mut()) {
            (None, _) => vec!["table inet jitgate was deleted".to_owned()],
            (Some(_), Err(_)) => return Check::Same,
            (Some(json), Ok(slot)) => match slot {
                Some(base) => crate::drift::compare_structure(base, Some(json)),
                None => {
                    // The first read-back after a full rebuild becomes its baseline.
                    match crate::drift::baseline(jitgate_core::nft::TABLE, json) {
                        Ok(b) => *slot = Some(b),
                        Err(e) => tracing::warn!(error = %e, "cannot parse table inet jitgate"),
                    }
                    Vec::new()
                }
            },
        };
        if let (Some((at, held)), Some(expected)) = (&held, &expected) {
            let settled: Vec<jitgate_core::nft::Element>;
            let held_settled: Vec<(&'static str, jitgate_core::nfnl::Held)>;
            let (expected, held): (&[_], &[_]) = if flux.is_empty() {
                (expected, held)
            } else {
                settled = expected
                    .iter()
                    .filter(|e| !flux.contains(&element_key(e)))
                    .copied()
                    .collect();
                held_settled = held
                    .iter()
                    .filter(|(set, h)| !flux.contains(&(*set, h.net, h.proto, h.port)))
                    .cloned()
                    .collect();
                (&settled, &held_settled)
            };
            changes.extend(crate::drift::compare_elements(
                expected,
                held,
                *at,
                crate::enforce::MAX_COMMIT_MARGIN,
            ));
        }
        let changes = crate::drift::limit(changes);
        let Ok(mut p) = self.progress.lock() else {
            return Check::Same;
        };
        if changes.is_empty() {
            if p.table_matches != Some(true) {
                let was_drifted = p.table_matches == Some(false);
                p.table_matches = Some(true);
                return if was_drifted {
                    Check::Confirmed
                } else {
                    Check::Same
                };
            }
            return Check::Same;
        }
        tracing::warn!(changes = ?changes, "table inet jitgate was changed outside jitgate; reporting and rebuilding it");
        p.table_matches = Some(false);
        p.drift_events += 1;
        p.last_drift = Some(jitgate_proto::WireDrift {
            detected_at: Timestamp::now().to_string(),
            changes,
            repaired: false,
        });
        Check::Drift
    }

    /// Every element of the grant sets, over netlink (the reader socket, opened again
    /// after a failure).
    fn read_elements(&self) -> anyhow::Result<Vec<(&'static str, jitgate_core::nfnl::Held)>> {
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| anyhow::anyhow!("reader lock poisoned"))?;
        if reader.is_none() {
            *reader = Some(NfSocket::open()?);
        }
        let Some(socket) = reader.as_mut() else {
            bail!("no netlink socket");
        };
        let read = match read_pause() {
            Some(pause) => socket.dump_grant_sets_pausing(|| std::thread::sleep(pause)),
            None => socket.dump_grant_sets(),
        };
        if read
            .as_ref()
            .is_err_and(|e| !e.is::<crate::netlink::DumpInterrupted>())
        {
            // The socket may be out of step with the kernel: a new one next time.
            *reader = None;
        }
        read
    }

    /// Rebuilds the whole table from the last desired state (grants with their
    /// remaining lifetimes) after drift.
    fn repair(&self) {
        let Some(last) = self.progress.lock().ok().and_then(|p| p.last.clone()) else {
            return;
        };
        if let Ok(mut e) = self.enforcer.lock() {
            e.forget();
        }
        match self.enforce((*last).clone()) {
            Ok(_) => {
                if let Ok(mut p) = self.progress.lock()
                    && let Some(d) = &mut p.last_drift
                {
                    d.repaired = true;
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot rebuild the table"),
        }
    }

    /// Validates and applies a desired state, whole or a delta from the state last
    /// applied; records the outcome.
    fn apply(&self, d: &DesiredState) -> anyhow::Result<ApplyKind> {
        let desired = if d.base.is_some() {
            let prev = self.progress.lock().ok().and_then(|p| p.last.clone());
            match prev {
                Some(prev) => jitgate_proto::apply_delta_parts(&prev, d)
                    .map(|a| (a.state, Some((prev.revision.clone(), a.added, a.removed)))),
                None => Err("base: a delta, and no state is applied".to_owned()),
            }
        } else {
            jitgate_proto::decode(d).map(|s| (s, None))
        };
        match desired {
            Ok((desired, None)) => self.enforce(desired),
            Ok((desired, Some((base, added, removed)))) => self.enforce_told(
                desired,
                Some(crate::enforce::Told {
                    base: &base,
                    added: &added,
                    removed: &removed,
                }),
            ),
            Err(e) => {
                let e = anyhow::anyhow!("invalid desired state: {e}");
                if let Ok(mut p) = self.progress.lock() {
                    p.error = Some(format!("{e:#}"));
                }
                Err(e)
            }
        }
    }

    /// Applies a validated desired state; records the outcome.
    fn enforce(&self, desired: Desired) -> anyhow::Result<ApplyKind> {
        self.enforce_told(desired, None)
    }

    /// [`Shared::enforce`], told what changed since the state applied last when it
    /// is a delta of it.
    fn enforce_told(
        &self,
        desired: Desired,
        told: Option<crate::enforce::Told<'_>>,
    ) -> anyhow::Result<ApplyKind> {
        let desired = Arc::new(desired);
        let result = (|| {
            if !desired
                .vm
                .to_string()
                .eq_ignore_ascii_case(&self.creds.vm_id)
            {
                bail!(
                    "desired state is for {}, not this VM ({})",
                    desired.vm,
                    self.creds.vm_id
                );
            }
            let mut enforcer = self
                .enforcer
                .lock()
                .map_err(|_| anyhow::anyhow!("enforcer lock poisoned"))?;
            let revision = desired.revision.clone();
            let grants = desired.grants.len();
            let stats = {
                let _seq = SeqGuard::enter(&self.apply_seq);
                match told {
                    Some(t) => enforcer.apply_change(desired.clone(), t, Timestamp::now())?,
                    None => enforcer.apply(desired.clone(), Timestamp::now())?,
                }
            };
            // Still under the enforcer's lock: an element check that takes it after
            // reading the kernel sees what changed while it read.
            if stats.kind == ApplyKind::Full {
                self.full_applies
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            } else if let Ok(mut flux) = self.in_flux.lock()
                && let Some(keys) = flux.as_mut()
            {
                keys.extend(enforcer.last_changed().iter().map(element_key));
            }
            if stats.kind == ApplyKind::Full {
                // The watchdog reads the new table back at once, off this path, as
                // the baseline of its structure (a delta changes only elements).
                if let Ok(mut b) = self.baseline.lock() {
                    *b = None;
                }
                self.baseline_wanted.notify_one();
            }
            tracing::info!(%revision, kind = ?stats.kind, kernel_ms = stats.kernel.as_secs_f64() * 1000.0, added = stats.added, deleted = stats.deleted, already_expired = stats.already_gone, grants, "applied");
            Ok(stats.kind)
        })();
        if let Ok(mut p) = self.progress.lock() {
            match &result {
                Ok(_) => {
                    p.last = Some(desired);
                    p.applied_at = Some(Timestamp::now().to_string());
                    p.error = None;
                }
                Err(e) => p.error = Some(format!("{e:#}")),
            }
        }
        result
    }

    /// Writes the state last applied to the state directory (for restarts and the
    /// boot-time restore), whole, after checking that its revision is the hash of its
    /// content: a delta's revision is taken as sent when it is applied, and checked
    /// here, off the path of the change. False on a mismatch: the agent then asks the
    /// controller for its whole state.
    fn save(&self, state: &StateDir) -> bool {
        let mut saved = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let Some(last) = self.progress.lock().ok().and_then(|p| p.last.clone()) else {
            return true;
        };
        let now = Timestamp::now();
        if !jitgate_proto::revision_matches(&last, now) {
            tracing::error!(sent = %last.revision, "the state built from a delta does not hash to the revision the controller sent; asking for the whole state");
            return false;
        }
        if saved
            .as_ref()
            .is_some_and(|s| s.state.revision == last.revision)
        {
            return true;
        }
        // Saved with the revision the controller sent (of either scheme), which the
        // agent asks with after a restart.
        let head = DesiredState {
            revision: last.revision.clone(),
            ..jitgate_proto::encode(&last.vm, last.gateway.as_ref(), &last.rules, &[], now)
        };
        // What changed since the state saved last, appended to the log; or, when the
        // log has grown past the whole state (or nothing was saved by this process),
        // the whole state.
        let logged = match saved.as_mut() {
            // (A state for another VM, after enrolling again, is written whole.)
            Some(s) if s.log_bytes <= s.whole_bytes.max(LOG_AT_LEAST) && s.state.vm == last.vm => {
                let delta = jitgate_proto::delta_between(
                    &s.state.revision,
                    &s.state.grants,
                    &last.grants,
                    &head,
                );
                Some(state.append_applied(&delta).map(|n| {
                    s.log_bytes += n;
                    s.state = last.clone();
                }))
            }
            _ => None,
        };
        let written = match logged {
            Some(r) => r,
            None => {
                let whole = DesiredState {
                    grants: last
                        .grants
                        .iter()
                        .map(jitgate_proto::grant_to_wire)
                        .collect(),
                    ..head
                };
                state.save_applied(&whole).map(|n| {
                    *saved = Some(Saved {
                        state: last.clone(),
                        whole_bytes: n,
                        log_bytes: 0,
                    });
                })
            }
        };
        if let Err(e) = written {
            // The next save writes the whole state.
            *saved = None;
            let e = format!(
                "cannot persist the applied state (a reboot would restore an older one): {e:#}"
            );
            tracing::error!(error = %e, "save failed");
            if let Ok(mut p) = self.progress.lock() {
                p.error = Some(e);
            }
        }
        true
    }

    async fn poll(&self, known: Option<&str>) -> Result<DesiredState, PollError> {
        let wait = self.config.poll_wait.as_secs().to_string();
        let mut q = vec![
            ("vm", self.creds.vm_id.as_str()),
            ("wait", wait.as_str()),
            ("delta", "1"),
            ("protocol", jitgate_proto::AGENT_PROTOCOL_PARAM),
        ];
        if let Some(k) = known {
            q.push(("known", k));
        }
        let resp = self
            .http
            .get(format!("{}/api/v1/agent/desired", self.config.controller))
            .query(&q)
            .bearer_auth(self.creds.token.expose())
            .send()
            .await
            .map_err(|e| PollError::Unreachable(describe(&e, &self.config.controller)))?;
        let status = resp.status();
        if status.as_u16() == 401 || status.as_u16() == 403 {
            let text = resp.text().await.unwrap_or_default();
            let body = serde_json::from_str::<serde_json::Value>(&text).ok();
            let field = |k: &str| {
                body.as_ref()
                    .and_then(|v| v["error"][k].as_str().map(str::to_owned))
            };
            return Err(PollError::Refused {
                code: field("code").unwrap_or_default(),
                message: field("message").unwrap_or(text),
            });
        }
        if !status.is_success() {
            return Err(PollError::Unreachable(format!("{status}")));
        }
        resp.json::<DesiredState>()
            .await
            .map_err(|e| PollError::Unreachable(format!("bad answer: {e}")))
    }
}

/// An element's identity in the kernel: its set, network, protocol and port.
type ElementKey = (
    &'static str,
    ipnet::IpNet,
    jitgate_core::nft::L4,
    jitgate_core::net::Port,
);

fn element_key(e: &jitgate_core::nft::Element) -> ElementKey {
    (e.set(), e.net, e.proto, e.port)
}

/// Holds the apply sequence odd for the duration of an apply (see `Shared::apply_seq`),
/// even on an early return.
struct SeqGuard<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> SeqGuard<'a> {
    fn enter(seq: &'a std::sync::atomic::AtomicU64) -> Self {
        seq.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        SeqGuard(seq)
    }
}

impl Drop for SeqGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[derive(Debug)]
enum PollError {
    Unreachable(String),
    Refused { code: String, message: String },
}

/// Runs the agent until `shutdown` turns true.
pub async fn run(config: AgentConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut config = config;
    let state = StateDir::open(&config.state_dir)?;
    // An enrollment token may carry the fingerprint of the controller's CA.
    let token_pin = match &config.enroll_token {
        Some(t) => {
            let (token, pin) = jitgate_proto::tls::split_pinned_token(t.expose())
                .map_err(|e| Permanent(format!("the enrollment token: {e}")))?;
            let token = token.to_owned();
            config.enroll_token = Some(jitgate_proto::Secret::new(token));
            pin
        }
        None => None,
    };
    let saved = state
        .credentials()?
        .filter(|c| c.controller == config.controller);
    let saved_pin = saved
        .as_ref()
        .and_then(|c| c.ca_fingerprint.as_deref())
        .map(jitgate_proto::tls::Fingerprint::parse)
        .transpose()
        .map_err(|e| Permanent(format!("the saved credential's CA fingerprint: {e}")))?;
    let pin = config.ca_fingerprint.or(token_pin).or(saved_pin);
    if pin.is_some() && !config.controller.starts_with("https://") {
        return Err(Permanent(format!(
            "a CA fingerprint is pinned but --controller {} is not https://: use the https:// URL",
            config.controller
        ))
        .into());
    }
    let http = client(&config, pin)?;
    let creds = match saved {
        Some(c) => c,
        None => {
            preflight(&config, &http).await?;
            let mut backoff = Duration::from_millis(500);
            loop {
                match enroll(&config, &http).await {
                    Ok(mut c) => {
                        c.ca_fingerprint = pin.map(|p| p.to_string());
                        state.save_credentials(&c)?;
                        tracing::info!(vm = %c.vm_id, pinned = ?c.ca_fingerprint, "enrolled");
                        break c;
                    }
                    Err(e @ EnrollFailure::NoToken) => return Err(Permanent(e.to_string()).into()),
                    Err(e @ EnrollFailure::Refused { .. }) => {
                        return Err(Permanent(e.to_string()).into());
                    }
                    Err(e @ EnrollFailure::Unreachable { .. }) => {
                        tracing::warn!(error = %e, "enrollment failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => return Ok(()),
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    };
    let nft = Nft::new(config.nft.clone());
    let nft_version = nft.version().ok();
    if nft_version.is_none() {
        tracing::error!(
            "nft is not runnable: install the nftables package; enforcement will fail until then"
        );
    }
    let enforcer = Enforcer::new(nft.clone());
    let reader = NfSocket::open()
        .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "cannot open a netlink socket to read the grant sets"))
        .ok();
    let shared = Arc::new(Shared {
        inventory: Mutex::new(Inventory::default()),
        counter_nft: nft,
        http,
        creds,
        enforcer: Mutex::new(enforcer),
        baseline: Mutex::new(None),
        apply_seq: std::sync::atomic::AtomicU64::new(0),
        full_applies: std::sync::atomic::AtomicU64::new(0),
        in_flux: Mutex::new(None),
        changes_held: Default::default(),
        baseline_wanted: tokio::sync::Notify::new(),
        table_changed: tokio::sync::Notify::new(),
        gateway_changed: Arc::new(tokio::sync::Notify::new()),
        reader: Mutex::new(reader),
        progress: Mutex::new(Progress::default()),
        saving: Mutex::new(None),
        nft_version,
        config,
    });

    // Restore what was last applied, with remaining lifetimes, before asking anything:
    // a restart never drops a live grant, and works with the controller down.
    if let Some(cached) = state.applied() {
        match shared.apply(&cached) {
            Ok(_) => tracing::info!(revision = %cached.revision, "restored the last applied state"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot restore the last applied state")
            }
        }
    }

    let gateway = shared.config.gateway.then(|| {
        let g = crate::gateway::Gateway {
            controller: shared.config.controller.clone(),
            http: shared.http.clone(),
            vm: shared.creds.vm_id.clone(),
            token: shared.creds.token.clone(),
            nft: Nft::new(shared.config.nft.clone()),
            state_dir: shared.config.state_dir.clone(),
            poll_wait: shared.config.poll_wait,
            heartbeat: shared.config.heartbeat,
            nft_version: shared.nft_version.clone(),
            drift_check: shared.config.drift_check,
            table_changed: shared.gateway_changed.clone(),
            encoded: Default::default(),
            applied: Default::default(),
            apply_seq: Default::default(),
        };
        tokio::spawn(g.run(shutdown.clone()))
    });
    let hb = shared.clone();
    let mut hb_shutdown = shutdown.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            hb.report(true).await;
            tokio::select! {
                _ = tokio::time::sleep(hb.config.heartbeat) => {}
                _ = hb_shutdown.changed() => return,
            }
        }
    });

    // Watchdog: if something outside jitgate removed the table (`nft flush ruleset`,
    // a restart of nftables.service), rebuild it from the last applied state at once
    // rather than at the next change.
    watch_changes(Arc::downgrade(&shared));
    let wd = shared.clone();
    let mut wd_shutdown = shutdown.clone();
    let watchdog = tokio::spawn(async move {
        let mut pause = wd.config.drift_check;
        let mut elements_checked = Instant::now();
        // Set when an element check could not finish: the next check reads them.
        let mut elements_pending = false;
        let mut element_reads = crate::drift::ElementReads::of(jitgate_core::nft::TABLE);
        loop {
            // Elements are read when the kernel announced a change by someone else,
            // and periodically; a large set is read less often (the kernel's dump of
            // a set costs more than its size: about 0.5 s at 100,000 elements), at most
            // every `drift_check` times one per 10,000 elements.
            let elements = tokio::select! {
                _ = tokio::time::sleep(pause) => {
                    let size = wd.enforcer.lock().map(|e| e.applied_len()).unwrap_or(0);
                    let every = wd.config.drift_check * (1 + size / 10_000) as u32;
                    elements_pending || elements_checked.elapsed() >= every
                }
                _ = wd.baseline_wanted.notified() => false,
                _ = wd.table_changed.notified() => {
                    element_reads.foreign_change();
                    true
                }
                _ = wd_shutdown.changed() => return,
            };
            if elements {
                elements_checked = Instant::now();
                elements_pending = false;
            }
            pause = wd.config.drift_check;
            let me = wd.clone();
            let hold = elements && element_reads.hold();
            let held = match hold {
                true => Some(wd.changes_held.clone().write_owned().await),
                false => None,
            };
            let found = tokio::task::spawn_blocking(move || {
                let found = me.check_table(elements);
                drop(held);
                found
            })
            .await
            .unwrap_or(Check::Same);
            elements_pending |= element_reads.record(elements, found);
            match found {
                Check::Same | Check::Interrupted => {}
                Check::Retry => {
                    pause = Duration::from_millis(20);
                    elements_pending |= elements;
                }
                Check::Confirmed => wd.report(false).await,
                Check::Drift => {
                    // Tell the controller before repairing, so the drift is on record
                    // even if the repair fails; the next check confirms the repair.
                    wd.report(false).await;
                    let me = wd.clone();
                    let _ = tokio::task::spawn_blocking(move || me.repair()).await;
                    wd.report(false).await;
                }
            }
        }
    });

    // The applied state is written to disk by its own task, off the path of the next
    // change (at 10,000 grants a write is a megabyte and an fsync); a burst of changes
    // writes the last. Checking a delta's revision is part of the write: on a
    // mismatch the next poll asks for the whole state.
    let whole_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let save_wanted = Arc::new(tokio::sync::Notify::new());
    let state = Arc::new(state);
    let saver = {
        let (me, wanted, whole) = (shared.clone(), save_wanted.clone(), whole_next.clone());
        let dir = state.clone();
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let (me, dir) = (me.clone(), dir.clone());
                let saved = {
                    let me = me.clone();
                    tokio::task::spawn_blocking(move || me.save(&dir))
                        .await
                        .unwrap_or(true)
                };
                if saved {
                    // Reported once on disk: an agent the controller shows up to date
                    // keeps its grants through a reboot (the boot-time restore).
                    let s = me.clone();
                    tokio::spawn(async move { s.report(false).await });
                } else {
                    whole.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        })
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let known = if whole_next.swap(false, std::sync::atomic::Ordering::AcqRel) {
            None
        } else {
            shared
                .progress
                .lock()
                .ok()
                .and_then(|p| p.applied_revision())
        };
        let polled = tokio::select! {
            r = shared.poll(known.as_deref()) => r,
            _ = shutdown.changed() => break,
        };
        match polled {
            Ok(d) => {
                tracing::debug!(revision = %d.revision, "desired state received");
                backoff = Duration::from_millis(200);
                if known.as_deref() == Some(d.revision.as_str()) {
                    continue;
                }
                let applied = {
                    let _go = shared.changes_held.read().await;
                    shared.apply(&d)
                };
                match applied {
                    Ok(_) => save_wanted.notify_one(),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "apply failed; keeping the previous state");
                        if d.base.is_some() {
                            // A delta that does not fit: the whole state next time.
                            whole_next.store(true, std::sync::atomic::Ordering::Release);
                        }
                        let s = shared.clone();
                        tokio::spawn(async move { s.report(false).await });
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => break,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            Err(e) => {
                match &e {
                    PollError::Refused { code, message } => {
                        if code == "AgentCredentialRevoked" {
                            heartbeat.abort();
                            watchdog.abort();
                            return Err(Replaced(message.clone()).into());
                        }
                        if code == "AuthenticationFailed" {
                            // Retrying the same credential cannot succeed.
                            heartbeat.abort();
                            watchdog.abort();
                            return Err(Permanent(format!(
                                "the controller does not accept this agent's credential ({message}): it was revoked, or the controller's database is not the one this agent enrolled with. The kernel keeps enforcing the last applied state. To enroll again, remove {} and start the agent with a new --enroll-token-file",
                                shared.config.state_dir.join("credentials.json").display()
                            ))
                            .into());
                        }
                        tracing::error!(%code, %message, "the controller refused this agent's credential")
                    }
                    PollError::Unreachable(m) => {
                        tracing::warn!(error = %m, "controller unreachable; keeping the last applied state")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    heartbeat.abort();
    watchdog.abort();
    saver.abort();
    if let Some(g) = gateway {
        g.abort();
    }
    // What the saver may not have written yet.
    let me = shared.clone();
    let _ = tokio::task::spawn_blocking(move || me.save(&state)).await;
    Ok(())
}

/// What `restore` put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The agent's own table, when a state was saved.
    pub own: Option<RestoredOwn>,
    /// The gateway's table, when this machine is a gateway that saved states.
    pub gateway: Option<crate::gateway::RestoredGateway>,
}

/// What the restore put back in `table inet jitgate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredOwn {
    pub revision: String,
    /// Grants still live (each with its remaining lifetime).
    pub grants: usize,
}

/// The boot-time step (`jitgate agent restore`): rebuilds `table inet jitgate` from
/// the state the agent last applied, with each grant's remaining lifetime (expired
/// ones dropped), without the network and without the controller, so a machine boots
/// closed. The same validation as every apply runs first. `None` when there is no
/// saved state (a machine that never enrolled: nothing to close).
pub fn restore(
    state_dir: &std::path::Path,
    nft: std::path::PathBuf,
) -> anyhow::Result<Option<Restored>> {
    // The gateway's table first: it does not depend on the agent's own state.
    let gateway = crate::gateway::restore(state_dir, &Nft::new(nft.clone()))?;
    let own = restore_own(state_dir, nft)?;
    if own.is_none() && gateway.is_none() {
        return Ok(None);
    }
    Ok(Some(Restored { own, gateway }))
}

fn restore_own(
    state_dir: &std::path::Path,
    nft: std::path::PathBuf,
) -> anyhow::Result<Option<RestoredOwn>> {
    let state = StateDir::open(state_dir)?;
    let Some(saved) = state.applied() else {
        return Ok(None);
    };
    let creds = state
        .credentials()?
        .context("the state directory has an applied state but no credential")?;
    let desired = jitgate_proto::decode(&saved)
        .map_err(|e| anyhow::anyhow!("the saved state is invalid: {e}"))?;
    if !desired.vm.to_string().eq_ignore_ascii_case(&creds.vm_id) {
        bail!(
            "the saved state is for {}, not this VM ({})",
            desired.vm,
            creds.vm_id
        );
    }
    let now = Timestamp::now();
    let grants = desired.grants.iter().filter(|g| g.end > now).count();
    Enforcer::new(Nft::new(nft)).apply(desired, now)?;
    Ok(Some(RestoredOwn {
        revision: saved.revision,
        grants,
    }))
}
