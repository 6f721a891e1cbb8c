//! Gateway mode (`jitgate gateway`): the agent of a Linux gateway also enforces the
//! desired states of the machines placed behind it, which run no agent, in `table
//! inet jitgate_gw` (see `jitgate_core::gateway`).
//!
//! ```text
//! long-poll /api/v1/agent/behind  -> the machines behind this gateway
//! per machine: long-poll desired  -> decode (with its placement) -> the map
//! grants:     the changed machines' set and map entries -> one netlink batch
//! otherwise:  validate every target -> one `nft -f` of the whole table
//! then:       save -> report each machine's applied revision (as its agent would)
//! every heartbeat: TCP probes of each machine's management ports -> its report
//! drift: the table read back (structure, every element over netlink) when the
//!        kernel announces another process changed it, and periodically; on drift
//!        -> reported on the machines concerned -> the whole table rendered again
//! ```
//!
//! Grants are set and map elements with kernel timeouts: they close on time with
//! this process and the controller dead. A restart keeps the table as it is until
//! every machine's state has been fetched again, so it never drops a live grant;
//! `jitgate agent restore` rebuilds it at boot from the saved states.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use jitgate_core::Timestamp;
use jitgate_core::gateway::{self, Target};
use jitgate_core::nfnl;
use jitgate_proto::{Desired, DesiredState, StatusReport, WireListener};
use tokio::sync::{Notify, watch};

use crate::drift::Check;
use crate::netlink::{BatchError, NfSocket};
use crate::nft::Nft;

/// Ports probed on each machine (the reference's management ports).
pub const PROBED_PORTS: [u16; 4] = [22, 3389, 5985, 5986];

/// The file the machines' applied states are kept in, for restarts and the boot-time
/// restore.
pub const STATE_FILE: &str = "gateway.json";

/// What the gateway needs from the agent that runs it.
pub struct Gateway {
    pub controller: String,
    pub http: reqwest::Client,
    /// The gateway's own VM id and credential.
    pub vm: String,
    pub token: jitgate_proto::Secret,
    pub nft: Nft,
    pub state_dir: std::path::PathBuf,
    pub poll_wait: Duration,
    pub heartbeat: Duration,
    pub nft_version: Option<String>,
    /// How often the table is read back to find drift (elements less often on a
    /// large table).
    pub drift_check: Duration,
    /// Woken when the kernel announces that another process changed the table.
    pub table_changed: Arc<Notify>,
    /// Each machine's saved state in wire form, with the revision it was encoded at
    /// (only the saver uses it).
    pub encoded: Mutex<BTreeMap<String, (String, Vec<u8>)>>,
    /// What the table holds since the last apply (None: unknown, render it whole).
    /// Held while applying.
    pub applied: Mutex<Option<Applied>>,
    /// A sequence lock around applies: odd while one runs, bumped twice by each. A
    /// read-back is trusted only when it is even and unchanged across it, so reading
    /// the table back holds up no apply (but for a held element read,
    /// [`crate::drift::ElementReads`]).
    pub apply_seq: std::sync::atomic::AtomicU64,
}

/// The table as last applied: per machine, and the structure as the kernel listed it.
pub struct Applied {
    machines: BTreeMap<String, MachineApplied>,
    /// The structure as the kernel listed it right after the last whole render
    /// (None: not read yet).
    baseline: Option<crate::drift::Baseline>,
    /// The netlink socket deltas are applied with (opened at the first one; None
    /// when it cannot be: deltas then run `nft -f`).
    socket: Option<NfSocket>,
}

/// One machine's part of the table as last applied.
struct MachineApplied {
    revision: String,
    place: gateway::Placement,
    rules: Vec<jitgate_core::nsg::NsgRule>,
    /// Its elements as planned (ended ones included until its next change).
    elements: Vec<gateway::GwElement>,
}

impl Applied {
    /// Every element applied, of every machine.
    pub fn elements(&self) -> Vec<gateway::GwElement> {
        self.machines
            .values()
            .flat_map(|m| m.elements.iter().copied())
            .collect()
    }

    fn len(&self) -> usize {
        self.machines.values().map(|m| m.elements.len()).sum()
    }
}

/// What one machine's reports say about drift of the gateway's table.
#[derive(Default)]
struct MachineDrift {
    /// Some(false) from finding drift until a later check finds the table as applied.
    table_matches: Option<bool>,
    events: u64,
    last: Option<jitgate_proto::WireDrift>,
}

#[derive(Default)]
struct Machines {
    /// The last desired state fetched for each machine behind the gateway.
    fetched: BTreeMap<String, Arc<Desired>>,
    /// The machines listed by the controller; a render waits until each was fetched.
    listed: Vec<String>,
    /// The revision applied and saved per machine (what is reported as applied, so
    /// "up to date" means it survives a reboot).
    applied: BTreeMap<String, String>,
    /// The states of the last apply, until the saver has written them.
    unsaved: Option<Vec<Arc<Desired>>>,
    applied_at: Option<String>,
    error: Option<String>,
    probes: BTreeMap<String, Vec<WireListener>>,
    /// The revision last reported applied for each machine (a change reports only
    /// the machines whose revision moved).
    reported: BTreeMap<String, String>,
    drift: BTreeMap<String, MachineDrift>,
}

/// What the boot-time restore put back in `table inet jitgate_gw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredGateway {
    pub machines: usize,
    /// Grants still live (each with its remaining lifetime).
    pub grants: usize,
}

/// The boot-time step for a gateway: rebuilds `table inet jitgate_gw` from the saved
/// states (each validated as received; expired grants dropped), with no network and
/// no controller. `None` when this machine saved none (it is not a gateway).
pub fn restore(state_dir: &std::path::Path, nft: &Nft) -> anyhow::Result<Option<RestoredGateway>> {
    if !state_dir.join(STATE_FILE).exists() {
        return Ok(None);
    }
    let b = std::fs::read(state_dir.join(STATE_FILE))
        .with_context(|| format!("cannot read {}", state_dir.join(STATE_FILE).display()))?;
    let wire: Vec<DesiredState> = serde_json::from_slice(&b)
        .with_context(|| format!("{} is corrupt", state_dir.join(STATE_FILE).display()))?;
    let states = wire
        .iter()
        .map(|d| jitgate_proto::decode(d).map_err(|e| anyhow::anyhow!("{}: {e}", d.vm)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = Timestamp::now();
    let grants = states
        .iter()
        .map(|d| d.grants.iter().filter(|g| g.end > now).count())
        .sum();
    enforce(nft, &states)?;
    Ok(Some(RestoredGateway {
        machines: states.len(),
        grants,
    }))
}

/// The targets of decoded states: each must carry its placement.
pub fn targets<D: Borrow<Desired>>(states: &[D]) -> anyhow::Result<Vec<Target>> {
    states
        .iter()
        .map(|d| {
            let d = d.borrow();
            let place = d.gateway.clone().with_context(|| {
                format!(
                    "{}: the controller sent no placement for a machine behind this gateway",
                    d.vm
                )
            })?;
            Ok(Target {
                name: d.vm.to_string(),
                place,
                rules: d.rules.clone(),
                grants: d.grants.iter().cloned().collect(),
            })
        })
        .collect()
}

/// Renders and applies the whole gateway table for `states`, timeouts from now.
pub fn enforce<D: Borrow<Desired>>(nft: &Nft, states: &[D]) -> anyhow::Result<()> {
    enforce_from(nft, states, &mut None).map(|_| ())
}

/// How [`enforce_from`] changed the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Only the changed machines' elements.
    Delta,
    /// The whole table.
    Whole,
}

/// Applies `states` and records in `last` what the table then holds (None after a
/// failure). When the machines are those `last` applied and each machine whose
/// revision moved kept its placement and rules, only that machine's elements that
/// changed are applied, in one netlink batch (the cost of a change does not grow
/// with the machines behind the gateway, and no `nft` runs); otherwise, or when that
/// fails, the whole table is rendered with `nft -f`. A delete of an element the
/// kernel expired meanwhile counts as done, as on a host.
pub fn enforce_from<D: Borrow<Desired>>(
    nft: &Nft,
    states: &[D],
    last: &mut Option<Applied>,
) -> anyhow::Result<Change> {
    let now = Timestamp::now();
    let mut socket = None;
    if let Some(l) = last.as_mut() {
        match delta(nft, states, l, now) {
            Ok(true) => return Ok(Change::Delta),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "the change did not apply as a delta; rendering the whole table")
            }
        }
        // The socket serves the next delta after this render.
        socket = l.socket.take();
    }
    *last = None;
    let targets = targets(states)?;
    gateway::validate(&targets).map_err(|e| anyhow::anyhow!(e))?;
    nft.apply(&gateway::render_full(&targets, now))?;
    let machines = states
        .iter()
        .zip(&targets)
        .map(|(d, t)| {
            let elements = gateway::plan(std::slice::from_ref(t), now);
            let m = MachineApplied {
                revision: d.borrow().revision.clone(),
                place: t.place.clone(),
                rules: t.rules.clone(),
                elements,
            };
            (t.name.clone(), m)
        })
        .collect();
    // What the kernel made of it, the baseline later read-backs are compared with.
    let baseline = match nft.list_terse_json_of(gateway::TABLE) {
        Ok(Some(json)) => crate::drift::baseline(gateway::TABLE, &json).ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read table inet jitgate_gw back");
            None
        }
    };
    *last = Some(Applied {
        machines,
        baseline,
        socket,
    });
    Ok(Change::Whole)
}

/// The change from `last` to `states` as a delta of the changed machines' elements:
/// Ok(false) when it cannot be one (machines, placements or rules changed), an error
/// when it was refused (nothing changed then).
fn delta<D: Borrow<Desired>>(
    nft: &Nft,
    states: &[D],
    last: &mut Applied,
    now: Timestamp,
) -> anyhow::Result<bool> {
    if states.len() != last.machines.len() {
        return Ok(false);
    }
    let mut changed = Vec::new();
    for d in states {
        let d = d.borrow();
        let Some(a) = last.machines.get(&d.vm.to_string()) else {
            return Ok(false);
        };
        if a.revision == d.revision {
            continue;
        }
        if d.gateway.as_ref() != Some(&a.place) || d.rules != a.rules {
            return Ok(false);
        }
        changed.push(d);
    }
    let targets = targets(&changed)?;
    // The placements are those validated with every machine's before; this checks
    // the changed machines' grants against them.
    gateway::validate(&targets).map_err(|e| anyhow::anyhow!(e))?;
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let mut planned = Vec::with_capacity(targets.len());
    for t in &targets {
        let elements = gateway::plan(std::slice::from_ref(t), now);
        let (a, r) = gateway::diff(&last.machines[&t.name].elements, &elements, now);
        add.extend(a);
        remove.extend(r);
        planned.push(elements);
    }
    if last.socket.is_none() {
        last.socket = NfSocket::open()
            .map_err(|e| tracing::debug!(error = %format!("{e:#}"), "no netlink socket to nf_tables; the gateway's changes run nft"))
            .ok();
    }
    match &mut last.socket {
        Some(socket) => {
            let ops = nfnl::changes(
                remove.iter().flat_map(gateway::entries),
                add.iter()
                    .flat_map(|e| gateway::entries(e).into_iter().map(|x| (x, e.end))),
                now,
            );
            match socket.apply(&ops) {
                Ok(_) => {}
                Err(BatchError::TooLarge(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        None => nft.apply(&gateway::render_delta(&add, &remove, now))?,
    }
    for ((d, t), elements) in changed.iter().zip(&targets).zip(planned) {
        if let Some(m) = last.machines.get_mut(&t.name) {
            m.revision = d.revision.clone();
            m.elements = elements;
        }
    }
    Ok(true)
}

impl Gateway {
    /// Runs until `shutdown` changes.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let me = Arc::new(self);
        let machines = Arc::new(Mutex::new(Machines::default()));
        let changed = Arc::new(Notify::new());
        let (list_tx, mut list_rx) = watch::channel(Vec::<String>::new());

        // The machines behind this gateway.
        let lister = {
            let (me, mut stop) = (me.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut known: Option<String> = None;
                let mut backoff = Duration::from_millis(200);
                loop {
                    let got = tokio::select! {
                        r = me.behind(known.as_deref()) => r,
                        _ = stop.changed() => return,
                    };
                    match got {
                        Ok((rev, vms)) => {
                            backoff = Duration::from_millis(200);
                            if known.as_deref() != Some(rev.as_str()) {
                                tracing::info!(
                                    machines = vms.len(),
                                    "machines behind this gateway"
                                );
                                known = Some(rev);
                                let _ = list_tx.send(vms);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "cannot list the machines behind this gateway");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = stop.changed() => return,
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            })
        };

        // The applier: one change of the table per burst of changes.
        let save_wanted = Arc::new(Notify::new());
        let applier = {
            let save_wanted = save_wanted.clone();
            let (me, machines, changed, mut stop) = (
                me.clone(),
                machines.clone(),
                changed.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = changed.notified() => {}
                        _ = stop.changed() => return,
                    }
                    let (me2, m2) = (me.clone(), machines.clone());
                    match tokio::task::spawn_blocking(move || me2.apply(&m2))
                        .await
                        .unwrap_or(None)
                    {
                        Some(true) => save_wanted.notify_one(),
                        Some(false) => me.report(&machines, true).await,
                        None => {}
                    }
                }
            })
        };
        // The saver: writes the last applied states, then reports them applied; a
        // burst of changes writes the last, at most ten writes a second (the file
        // holds every machine's state: a megabyte at 10,000 grants).
        let saver = {
            let (me, machines, wanted, mut stop) = (
                me.clone(),
                machines.clone(),
                save_wanted.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = wanted.notified() => {}
                        _ = stop.changed() => return,
                    }
                    let (me2, m2) = (me.clone(), machines.clone());
                    let saved = tokio::task::spawn_blocking(move || me2.save(&m2))
                        .await
                        .unwrap_or(false);
                    if saved {
                        me.report(&machines, true).await;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            })
        };

        // The prober: one machine at a time, one port at a time (a bounded rate that
        // never floods the machines), a pause between rounds.
        let prober = {
            let (me, machines, mut stop) = (me.clone(), machines.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    let targets: Vec<(String, IpAddr)> = machines
                        .lock()
                        .map(|m| {
                            m.fetched
                                .iter()
                                .filter_map(|(k, d)| {
                                    d.gateway.as_ref().map(|g| (k.clone(), g.address))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    for (vm, addr) in targets {
                        let found = tokio::select! {
                            f = probe(addr) => f,
                            _ = stop.changed() => return,
                        };
                        if let Ok(mut m) = machines.lock() {
                            m.probes.insert(vm, found);
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(me.heartbeat) => {}
                        _ = stop.changed() => return,
                    }
                }
            })
        };
        // The heartbeat: every machine's report (what was applied, what the probe
        // found), so the controller sees each one online; spread over half the
        // period, so a thousand machines are a steady trickle of reports rather than
        // a burst the controller's other work waits behind.
        let heartbeat = {
            let (me, machines, mut stop) = (me.clone(), machines.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(me.heartbeat);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every.tick().await;
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = stop.changed() => return,
                    }
                    me.send_reports(&machines, false, Some(me.heartbeat / 2))
                        .await;
                }
            })
        };

        // The drift watch: the table read back when another process changed it (the
        // agent's monitor wakes it) and periodically as a backstop, less often for a
        // large table (a listing costs about 0.1 s of CPU at 1,000 machines): its
        // structure every `drift_check` times one per 250 machines, its elements
        // every `drift_check` times one per 10,000 elements.
        let watchdog = {
            let (me, machines, mut stop) = (me.clone(), machines.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut elements_checked = std::time::Instant::now();
                let mut pause = me.drift_check;
                // Set when a read of the elements was retried: the next check reads them.
                let mut elements_pending = false;
                let mut element_reads = crate::drift::ElementReads::of(gateway::TABLE);
                loop {
                    let elements = tokio::select! {
                        _ = tokio::time::sleep(pause) => {
                            let size = me.applied.lock().ok().and_then(|a| a.as_ref().map(Applied::len)).unwrap_or(0);
                            elements_pending || elements_checked.elapsed() >= me.drift_check * (1 + size / 10_000) as u32
                        }
                        _ = me.table_changed.notified() => {
                            element_reads.foreign_change();
                            true
                        }
                        _ = stop.changed() => return,
                    };
                    if elements {
                        elements_checked = std::time::Instant::now();
                        elements_pending = false;
                    }
                    let machines_behind = me
                        .applied
                        .lock()
                        .ok()
                        .and_then(|a| a.as_ref().map(|a| a.machines.len()))
                        .unwrap_or(0);
                    pause = me.drift_check * (1 + machines_behind / 250) as u32;
                    let (me2, m2) = (me.clone(), machines.clone());
                    let hold = element_reads.hold();
                    let found = tokio::task::spawn_blocking(move || me2.check(&m2, elements, hold))
                        .await
                        .unwrap_or(Check::Same);
                    elements_pending |= element_reads.record(elements, found);
                    match found {
                        Check::Same | Check::Interrupted => {}
                        Check::Retry => {
                            pause = Duration::from_millis(20);
                            elements_pending |= elements;
                        }
                        Check::Confirmed => me.report(&machines, false).await,
                        Check::Drift => {
                            // On record before the repair, so it is known even if the
                            // repair fails; then repaired, read back, and reported.
                            me.report(&machines, false).await;
                            let (me2, m2) = (me.clone(), machines.clone());
                            let _ = tokio::task::spawn_blocking(move || me2.repair(&m2)).await;
                            me.report(&machines, false).await;
                            // Read back at once: the check confirms the repair.
                            pause = Duration::from_millis(20);
                            elements_pending = true;
                        }
                    }
                }
            })
        };

        // One long-poll per machine behind the gateway.
        let mut pollers: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
        loop {
            let list = list_rx.borrow_and_update().clone();
            pollers.retain(|vm, h| {
                let keep = list.contains(vm);
                if !keep {
                    h.abort();
                }
                keep
            });
            let removed = {
                let mut m = machines.lock().unwrap_or_else(|p| p.into_inner());
                m.listed = list.clone();
                let before = m.fetched.len();
                m.fetched.retain(|vm, _| list.contains(vm));
                m.probes.retain(|vm, _| list.contains(vm));
                m.reported.retain(|vm, _| list.contains(vm));
                m.applied.retain(|vm, _| list.contains(vm));
                m.drift.retain(|vm, _| list.contains(vm));
                m.fetched.len() != before
            };
            if removed {
                changed.notify_one();
            }
            for vm in &list {
                if pollers.contains_key(vm) {
                    continue;
                }
                let (me, machines, changed, stop) = (
                    me.clone(),
                    machines.clone(),
                    changed.clone(),
                    shutdown.clone(),
                );
                let vm2 = vm.clone();
                pollers.insert(
                    vm.clone(),
                    tokio::spawn(
                        async move { me.poll_machine(vm2, machines, changed, stop).await },
                    ),
                );
            }
            tokio::select! {
                r = list_rx.changed() => if r.is_err() { break; },
                _ = shutdown.changed() => break,
            }
        }
        for (_, h) in pollers {
            h.abort();
        }
        lister.abort();
        applier.abort();
        saver.abort();
        prober.abort();
        heartbeat.abort();
        watchdog.abort();
    }

    async fn behind(&self, known: Option<&str>) -> anyhow::Result<(String, Vec<String>)> {
        let wait = self.poll_wait.as_secs().to_string();
        let mut q = vec![("vm", self.vm.as_str()), ("wait", wait.as_str())];
        if let Some(k) = known {
            q.push(("known", k));
        }
        let resp = self
            .http
            .get(format!("{}/api/v1/agent/behind", self.controller))
            .query(&q)
            .bearer_auth(self.token.expose())
            .send()
            .await?;
        if !resp.status().is_success() {
            anyhow::bail!("the controller answered {}", resp.status());
        }
        #[derive(serde::Deserialize)]
        struct Behind {
            revision: String,
            vms: Vec<String>,
        }
        let b: Behind = resp.json().await?;
        Ok((b.revision, b.vms))
    }

    async fn poll_machine(
        self: Arc<Self>,
        vm: String,
        machines: Arc<Mutex<Machines>>,
        changed: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut known: Option<String> = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            let wait = self.poll_wait.as_secs().to_string();
            let mut q = vec![
                ("vm", vm.as_str()),
                ("wait", wait.as_str()),
                ("protocol", jitgate_proto::AGENT_PROTOCOL_PARAM),
            ];
            if let Some(k) = &known {
                q.push(("known", k.as_str()));
            }
            let sent = self
                .http
                .get(format!("{}/api/v1/agent/desired", self.controller))
                .query(&q)
                .bearer_auth(self.token.expose())
                .send();
            let got = tokio::select! {
                r = sent => r,
                _ = stop.changed() => return,
            };
            let result: anyhow::Result<DesiredState> = match got {
                Ok(r) if r.status().is_success() => r.json().await.map_err(Into::into),
                Ok(r) => Err(anyhow::anyhow!("the controller answered {}", r.status())),
                Err(e) => Err(e.into()),
            };
            match result.and_then(|d| jitgate_proto::decode(&d).map_err(|e| anyhow::anyhow!(e))) {
                Ok(d) => {
                    backoff = Duration::from_millis(200);
                    if known.as_deref() == Some(d.revision.as_str()) {
                        continue;
                    }
                    known = Some(d.revision.clone());
                    if let Ok(mut m) = machines.lock() {
                        m.fetched.insert(vm.clone(), Arc::new(d));
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    tracing::warn!(%vm, error = %format!("{e:#}"), "cannot fetch the desired state of a machine behind this gateway");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Applies the whole table once every listed machine has been fetched; `Some(true)`
    /// when applied (the saver then writes it), `Some(false)` when it failed (the
    /// error is to be reported), None when nothing was done.
    fn apply(&self, machines: &Mutex<Machines>) -> Option<bool> {
        let states: Vec<Arc<Desired>> = {
            let m = machines.lock().ok()?;
            if m.listed.iter().any(|vm| !m.fetched.contains_key(vm)) {
                // A restart: keep the table as it is until every state is known.
                return None;
            }
            m.fetched.values().cloned().collect()
        };
        let result = {
            use std::sync::atomic::Ordering;
            let mut last = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            self.apply_seq.fetch_add(1, Ordering::AcqRel);
            let r = enforce_from(&self.nft, &states, &mut last).map(|_| ());
            self.apply_seq.fetch_add(1, Ordering::AcqRel);
            r
        };
        match &result {
            Ok(()) => tracing::debug!(
                machines = states.len(),
                grants = states.iter().map(|d| d.grants.len()).sum::<usize>(),
                "applied the gateway table"
            ),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot apply the gateway table; keeping the previous one")
            }
        }
        let mut m = machines.lock().ok()?;
        match result {
            Ok(()) => {
                m.applied_at = Some(Timestamp::now().to_string());
                m.error = None;
                m.unsaved = Some(states);
                Some(true)
            }
            Err(e) => {
                m.error = Some(format!("{e:#}"));
                Some(false)
            }
        }
    }

    /// Writes the states of the last apply to `gateway.json` (for restarts and the
    /// boot-time restore), off the path of the next change; then they count as
    /// applied in reports. False when there was nothing to write.
    fn save(&self, machines: &Mutex<Machines>) -> bool {
        let Some(states) = machines.lock().ok().and_then(|mut m| m.unsaved.take()) else {
            return false;
        };
        // Saved in wire form (the revision is the content's hash, so the restore
        // decodes it as it was received): a JSON array of each machine's state, encoded
        // again only when its revision moved.
        let now = Timestamp::now();
        let saved = {
            let mut cache = self.encoded.lock().unwrap_or_else(|p| p.into_inner());
            let named: Vec<(String, &Arc<Desired>)> =
                states.iter().map(|d| (d.vm.to_string(), d)).collect();
            let names: std::collections::BTreeSet<&str> =
                named.iter().map(|(vm, _)| vm.as_str()).collect();
            cache.retain(|vm, _| names.contains(vm.as_str()));
            let mut out = vec![b'['];
            let mut failed = None;
            for (i, (vm, d)) in named.iter().enumerate() {
                let fresh = cache
                    .get(vm.as_str())
                    .is_some_and(|(rev, _)| *rev == d.revision);
                if !fresh {
                    // With the revision the controller sent (of either scheme).
                    let wire = DesiredState {
                        revision: d.revision.clone(),
                        ..jitgate_proto::encode(&d.vm, d.gateway.as_ref(), &d.rules, &d.grants, now)
                    };
                    match serde_json::to_vec(&wire) {
                        Ok(b) => {
                            cache.insert(vm.clone(), (d.revision.clone(), b));
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if i > 0 {
                    out.push(b',');
                }
                if let Some((_, b)) = cache.get(vm.as_str()) {
                    out.extend_from_slice(b);
                }
            }
            out.push(b']');
            match failed {
                Some(e) => Err(anyhow::Error::from(e)),
                None => crate::state::write_private(&self.state_dir.join(STATE_FILE), &out),
            }
        };
        let Ok(mut m) = machines.lock() else {
            return false;
        };
        match saved {
            Ok(()) => {
                m.applied = states
                    .iter()
                    .map(|d| (d.vm.to_string(), d.revision.clone()))
                    .collect();
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot save the gateway's states");
                m.error = Some(format!(
                    "cannot save the applied states (a reboot would restore older ones): {e:#}"
                ));
            }
        }
        true
    }

    /// Reads the table back and compares it with what was last applied: its structure
    /// with the listing taken after the last whole render, and with `elements`, every
    /// element of its sets and maps (over netlink, lifetimes to the millisecond).
    /// A change is recorded on the machine it concerns (by address); a change of the
    /// structure, or of an element for no machine behind the gateway, on all of them.
    /// With `hold` (and `elements`), applies wait from before the listing until the
    /// comparison is made.
    fn check(&self, machines: &Mutex<Machines>, elements: bool, hold: bool) -> Check {
        use std::sync::atomic::Ordering;
        // Holding changes: an apply waits for `applied`. Taken before the sequence
        // number is read, so no apply of this gateway can fall in the read.
        let holding =
            (elements && hold).then(|| self.applied.lock().unwrap_or_else(|p| p.into_inner()));
        // Otherwise read without holding up applies: trusted only if no apply ran
        // meanwhile.
        let before = self.apply_seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            return Check::Retry;
        }
        let nothing_applied = match &holding {
            Some(a) => a.is_none(),
            None => self.applied.lock().map(|a| a.is_none()).unwrap_or(true),
        };
        if nothing_applied {
            return Check::Same;
        }
        let listing = match self.nft.list_terse_json_of(gateway::TABLE) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read table inet jitgate_gw back");
                return Check::Same;
            }
        };
        let read_elements = listing.is_some() && elements;
        let read_from = Timestamp::now();
        let held = match read_elements
            .then(|| crate::netlink::NfSocket::open()?.dump_gateway_sets())
        {
            Some(Ok(held)) => Some((
                crate::drift::ReadAt {
                    from: read_from,
                    to: Timestamp::now(),
                },
                held,
            )),
            Some(Err(e)) if e.is::<crate::netlink::DumpInterrupted>() => {
                return Check::Interrupted;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the gateway's sets back");
                None
            }
            None => None,
        };
        let (table, by_address) = {
            let mut applied =
                holding.unwrap_or_else(|| self.applied.lock().unwrap_or_else(|p| p.into_inner()));
            if self.apply_seq.load(Ordering::Acquire) != before {
                // The elements read belong to no single state: read them again later.
                return if held.is_some() {
                    Check::Interrupted
                } else {
                    Check::Retry
                };
            }
            let Some(a) = applied.as_mut() else {
                return Check::Same;
            };
            let table = match (&listing, &a.baseline) {
                (None, _) => vec![format!("table inet {} was deleted", gateway::TABLE)],
                (Some(json), Some(base)) => crate::drift::compare_structure(base, Some(json)),
                (Some(json), None) => {
                    a.baseline = crate::drift::baseline(gateway::TABLE, json).ok();
                    Vec::new()
                }
            };
            let by_address = match &held {
                Some((at, held)) => {
                    crate::drift::compare_gateway_elements(&a.elements(), held, *at)
                }
                None => Vec::new(),
            };
            (table, by_address)
        };
        let Ok(mut m) = machines.lock() else {
            return Check::Same;
        };
        let address: BTreeMap<String, IpAddr> = m
            .fetched
            .iter()
            .filter_map(|(vm, d)| d.gateway.as_ref().map(|g| (vm.clone(), g.address)))
            .collect();
        let mut everyone = table;
        everyone.extend(
            by_address
                .iter()
                .filter(|(a, _)| !address.values().any(|x| x == a))
                .map(|(_, c)| c.clone()),
        );
        let now = Timestamp::now().to_string();
        let mut found = Check::Same;
        for vm in m.listed.clone() {
            let mut changes = everyone.clone();
            if let Some(a) = address.get(&vm) {
                changes.extend(
                    by_address
                        .iter()
                        .filter(|(x, _)| x == a)
                        .map(|(_, c)| c.clone()),
                );
            }
            let d = m.drift.entry(vm.clone()).or_default();
            if changes.is_empty() {
                if d.table_matches == Some(false) && found == Check::Same {
                    found = Check::Confirmed;
                }
                d.table_matches = Some(true);
                continue;
            }
            let changes = crate::drift::limit(changes);
            tracing::warn!(%vm, changes = ?changes, "table inet jitgate_gw was changed outside jitgate; reporting and rebuilding it");
            d.table_matches = Some(false);
            d.events += 1;
            d.last = Some(jitgate_proto::WireDrift {
                detected_at: now.clone(),
                changes,
                repaired: false,
            });
            found = Check::Drift;
        }
        found
    }

    /// Renders the whole table again from the states last fetched, after drift.
    fn repair(&self, machines: &Mutex<Machines>) {
        // Forgotten, so the apply renders the whole table (a read-back meanwhile finds
        // nothing applied).
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let repaired = self.apply(machines) == Some(true)
            && self.applied.lock().map(|a| a.is_some()).unwrap_or(false);
        if repaired && let Ok(mut m) = machines.lock() {
            for d in m.drift.values_mut() {
                if d.table_matches == Some(false)
                    && let Some(last) = &mut d.last
                {
                    last.repaired = true;
                }
            }
        }
    }

    /// Reports each machine as its agent would: the revision applied, the ports that
    /// answered the gateway's probe.
    /// With `changed`, only the machines whose applied revision moved since their last
    /// report (all of them while there is an error to tell); 16 at a time.
    async fn report(&self, machines: &Mutex<Machines>, changed: bool) {
        self.send_reports(machines, changed, None).await;
    }

    /// [`Self::report`], 16 at a time, the groups spread evenly over `pace` when given.
    async fn send_reports(
        &self,
        machines: &Mutex<Machines>,
        changed: bool,
        pace: Option<Duration>,
    ) {
        let reports: Vec<(String, StatusReport)> = {
            let Ok(m) = machines.lock() else { return };
            m.listed
                .iter()
                .filter(|vm| {
                    !changed || m.error.is_some() || m.applied.get(*vm) != m.reported.get(*vm)
                })
                .map(|vm| {
                    let addresses = m
                        .fetched
                        .get(vm)
                        .and_then(|d| d.gateway.as_ref())
                        .map(|g| vec![g.address.to_string()])
                        .unwrap_or_default();
                    (
                        vm.clone(),
                        StatusReport {
                            applied_revision: m.applied.get(vm).cloned(),
                            applied_at: m.applied_at.clone(),
                            nft_version: self.nft_version.clone(),
                            error: m.error.clone(),
                            agent_version: Some(format!("{} (gateway)", env!("CARGO_PKG_VERSION"))),
                            protocol: Some(jitgate_proto::AGENT_PROTOCOL),
                            addresses,
                            listening: m.probes.get(vm).cloned().unwrap_or_default(),
                            table_matches: m.drift.get(vm).and_then(|d| d.table_matches),
                            drift_events: m.drift.get(vm).map_or(0, |d| d.events),
                            last_drift: m.drift.get(vm).and_then(|d| d.last.clone()),
                            ..StatusReport::default()
                        },
                    )
                })
                .collect()
        };
        let send = |(vm, report): (String, StatusReport)| async move {
            let r = self
                .http
                .post(format!("{}/api/v1/agent/status", self.controller))
                .query(&[("vm", vm.as_str())])
                .bearer_auth(self.token.expose())
                .json(&report)
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => Some((vm, report.applied_revision)),
                Ok(resp) => {
                    tracing::warn!(%vm, status = %resp.status(), "status report refused");
                    None
                }
                Err(e) => {
                    tracing::debug!(%vm, error = %e, "status report failed");
                    None
                }
            }
        };
        let groups = reports.len().div_ceil(16).max(1);
        let gap = pace.map(|p| p / groups as u32);
        let mut sent = Vec::with_capacity(reports.len());
        let mut reports = reports.into_iter().peekable();
        while reports.peek().is_some() {
            let group: Vec<_> = reports.by_ref().take(16).map(send).collect();
            sent.extend(futures_util::future::join_all(group).await);
            if let Some(g) = gap
                && reports.peek().is_some()
            {
                tokio::time::sleep(g).await;
            }
        }
        if let Ok(mut m) = machines.lock() {
            for (vm, rev) in sent.into_iter().flatten() {
                match rev {
                    Some(r) => {
                        m.reported.insert(vm, r);
                    }
                    None => {
                        m.reported.remove(&vm);
                    }
                }
            }
        }
    }
}

/// The management ports of `addr` that accept a TCP connection from the gateway
/// (one second each, one port at a time: a bounded rate), as listeners.
pub async fn probe(addr: IpAddr) -> Vec<WireListener> {
    let mut out = Vec::new();
    for port in PROBED_PORTS {
        let open = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(SocketAddr::new(addr, port)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if open {
            out.push(WireListener {
                protocol: "tcp".into(),
                family: if addr.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
                address: addr.to_string(),
                port,
                process: Some("gateway-probe".into()),
            });
        }
    }
    out
}
