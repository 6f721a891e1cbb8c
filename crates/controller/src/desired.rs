//! What each VM's firewall should hold: its NSG view (user rules, the JIT deny rules
//! of its policy, the JIT allow rules of live grants) and the desired state sent to its
//! agent; and the per-VM change notifications that wake long-polls within
//! milliseconds. Read by the agent API and the VM views alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jitgate_core::Timestamp;
use jitgate_core::ids::VmId;
use jitgate_core::nsg::{GrantRef, NsgRule, nsg_view};
use jitgate_proto::DesiredState;
use tokio::sync::watch;

use crate::AppState;
use crate::error::ApiResult;

/// One watch channel per VM: bumped whenever that VM's desired state may have changed.
/// A channel exists only while a long-poll waits on it: the last [`VmWatch`] to go
/// removes it, so the map holds the VMs being watched now, not every VM ever watched.
///
/// Beside the channels, the last desired state built for each long-polled VM
/// ([`Built`]), so that a long-poll that finds nothing new reads nothing, and the one
/// before it, so that a change can be answered as a delta from the state the agent
/// has. Every `touch` drops the VM's current state; a state built from reads that
/// began before a touch is never kept (each read is stamped).
#[derive(Default)]
pub struct VmChanges {
    map: Mutex<HashMap<String, watch::Sender<u64>>>,
    states: Mutex<States>,
    /// While an initiate waits for a VM's agent ([`VmChanges::expect_ack`]): the last
    /// revision the agent long-polled with, which it sends right after applying.
    acks: Mutex<HashMap<String, watch::Sender<Option<String>>>>,
}

/// How long an initiate waits for the agents of its machines to take the new state
/// before it answers anyway.
pub const ENFORCED_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// A wait for one VM's agent to take a state (see [`VmChanges::expect_ack`]).
pub struct AckWait {
    changes: Arc<VmChanges>,
    key: String,
    rx: Option<watch::Receiver<Option<String>>>,
}

impl AckWait {
    /// Waits until the agent long-polls with a revision `taken` accepts, or until
    /// `deadline`. True when it did.
    pub async fn until(
        &mut self,
        taken: impl Fn(&str) -> bool,
        deadline: tokio::time::Instant,
    ) -> bool {
        let Some(rx) = self.rx.as_mut() else {
            return false;
        };
        loop {
            if rx.borrow_and_update().as_deref().is_some_and(&taken) {
                return true;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return false; },
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

impl Drop for AckWait {
    fn drop(&mut self) {
        release(&self.changes.acks, &self.key, &mut self.rx);
    }
}

/// At most this many VMs' states are kept (beyond, all are dropped: a cache, not a
/// record).
const MAX_STATES: usize = 100_000;

#[derive(Default)]
struct States {
    /// Counts touches; a read is stamped with the count when it begins.
    stamp: u64,
    /// Reads stamped before this are never kept (the entries that would tell whether
    /// a touch came after them were dropped).
    floor: u64,
    entries: HashMap<String, StateEntry>,
}

#[derive(Default)]
struct StateEntry {
    /// The stamp of the last touch.
    touched: u64,
    /// The stamp of the last touch that may have changed more than grants (rules,
    /// policy, placement): a state built later may reuse the head of one whose head
    /// was read after this.
    head_touched: u64,
    /// The state now, unless touched since.
    current: Option<Arc<Built>>,
    /// The state before it: an agent that has it gets a delta.
    previous: Option<Arc<Built>>,
}

impl StateEntry {
    /// A change at `stamp`: the current state becomes the one before. `head`: it may
    /// have changed more than the VM's grants.
    fn touch(&mut self, stamp: u64, head: bool) {
        self.touched = stamp;
        if head {
            self.head_touched = stamp;
        }
        if let Some(cur) = self.current.take() {
            self.previous = Some(cur);
        }
    }
}

/// A VM's desired state as built: its sorted grants (the delta's input) with their
/// digest (`proto::GrantDigest`, carried from the state it was built on, so a change
/// hashes only the grants it adds or removes), and the rest of the wire state.
pub struct Built {
    /// The wire state without its grants ([`Built::full`] adds them); its revision is
    /// of scheme 2.
    pub head: DesiredState,
    /// Sorted, and shared with the states built from this one (a persistent set).
    pub grants: Grants,
    digest: jitgate_proto::GrantDigest,
    /// The revision of scheme 1, for agents that speak protocol 2 or less: computed
    /// (over every grant) the first time one asks.
    revision_v1: std::sync::OnceLock<String>,
    /// The first end among its grants: from then on the state is a different one.
    pub next_end: Option<Timestamp>,
    /// How many grants end at each time (persistent, like `grants`): the first end
    /// after a change without a walk of every grant.
    ends: imbl::OrdMap<Timestamp, u32>,
    /// The store's grant changes it includes ([`jitgate_store::GrantChanges::upto`]):
    /// the next state reads only those after.
    pub upto: u64,
    /// The stamp of the read its rules and placement come from ([`VmChanges::begin`]).
    head_stamp: u64,
    /// The state it was built on (its revision) and what changed since: an agent that
    /// has that state is answered with this change, with no walk of the grants.
    from: Option<(String, Change)>,
}

/// A VM's grants, in order: a persistent set, so that a state built from another
/// shares all but the tree nodes its change touched.
pub use jitgate_proto::Grants;

/// The grants a state added to, and removed from, the one it was built on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<GrantRef>,
    pub removed: Vec<GrantRef>,
}

impl Built {
    /// The state of `vm` with these rules and (sorted) grants; the digest of grants
    /// `base` has is carried over.
    pub fn new(
        vm: &VmId,
        gateway: Option<&jitgate_core::gateway::Placement>,
        rules: &[NsgRule],
        grants: Vec<GrantRef>,
        base: Option<&Built>,
        upto: u64,
        now: Timestamp,
    ) -> Self {
        let rules = jitgate_proto::rules_to_wire(rules);
        let gateway = gateway.map(jitgate_proto::WireGateway::from_placement);
        let grants: Grants = grants.into_iter().collect();
        Self::from_wire(vm, rules, gateway, grants, base, None, upto, now, 0)
    }

    /// [`Built::new`] with the rules and placement in their wire form, read at
    /// `head_stamp`.
    #[allow(clippy::too_many_arguments)]
    fn from_wire(
        vm: &VmId,
        rules: Vec<jitgate_proto::WireRule>,
        gateway: Option<jitgate_proto::WireGateway>,
        grants: Grants,
        base: Option<&Built>,
        change: Option<Change>,
        upto: u64,
        now: Timestamp,
        head_stamp: u64,
    ) -> Self {
        let mut ends = None;
        let digest = match (base, &change) {
            (None, _) => jitgate_proto::GrantDigest::of(&grants),
            // What changed is known: hash only that.
            (Some(b), Some(c)) => {
                let mut d = b.digest;
                for g in &c.removed {
                    d.remove(g);
                }
                for g in &c.added {
                    d.add(g);
                }
                let mut e = b.ends.clone();
                for g in &c.removed {
                    if let Some(n) = e.get_mut(&g.end) {
                        *n -= 1;
                        if *n == 0 {
                            e.remove(&g.end);
                        }
                    }
                }
                for g in &c.added {
                    *e.entry(g.end).or_insert(0) += 1;
                }
                ends = Some(e);
                d
            }
            (Some(b), None) => {
                // The two sets share most of their tree: hash what differs.
                let mut d = b.digest;
                for item in b.grants.diff(&grants) {
                    match item {
                        imbl::ordset::DiffItem::Add(g) => d.add(g),
                        imbl::ordset::DiffItem::Remove(g) => d.remove(g),
                    }
                }
                d
            }
        };
        let ends = ends.unwrap_or_else(|| {
            let mut e = imbl::OrdMap::new();
            for g in &grants {
                *e.entry(g.end).or_insert(0) += 1;
            }
            e
        });
        let vm_text = vm.to_string();
        let revision =
            jitgate_proto::revision_of_digest(&vm_text, gateway.as_ref(), &rules, &digest);
        Built {
            head: DesiredState {
                vm: vm_text,
                revision,
                generated_at: now.to_string(),
                rules,
                grants: Vec::new(),
                base: None,
                removed: Vec::new(),
                requires: jitgate_proto::requires_for(gateway.as_ref()),
                gateway,
            },
            next_end: ends.keys().next().copied(),
            ends,
            grants,
            digest,
            revision_v1: std::sync::OnceLock::new(),
            upto,
            head_stamp,
            from: base.zip(change).map(|(b, c)| (b.revision().to_owned(), c)),
        }
    }

    /// What changed since the state of revision `base` (scheme 2), when this state was
    /// built on it.
    pub fn change_since(&self, base: &str) -> Option<&Change> {
        self.from
            .as_ref()
            .filter(|(b, _)| b == base)
            .map(|(_, c)| c)
    }

    /// The revision (scheme 2).
    pub fn revision(&self) -> &str {
        &self.head.revision
    }

    /// The revision an agent speaking `protocol` computes: scheme 2 from protocol 3,
    /// scheme 1 before.
    pub fn revision_for(&self, protocol: u32) -> &str {
        if protocol >= 3 {
            return self.revision();
        }
        self.revision_v1.get_or_init(|| {
            jitgate_proto::revision_of_lines(
                &self.head.vm,
                self.head.gateway.as_ref(),
                &self.head.rules,
                self.grants.iter().map(jitgate_proto::grant_line),
            )
        })
    }

    /// Whether `revision` names this state, in either scheme.
    pub fn is_revision(&self, revision: &str) -> bool {
        self.revision() == revision || self.revision_for(1) == revision
    }

    /// The wire state without its grants, with the revision `protocol` reads.
    pub fn head_for(&self, protocol: u32) -> DesiredState {
        DesiredState {
            revision: self.revision_for(protocol).to_owned(),
            ..self.head.clone()
        }
    }

    /// The whole wire state, with the revision `protocol` reads.
    pub fn full_for(&self, protocol: u32) -> DesiredState {
        DesiredState {
            grants: self
                .grants
                .iter()
                .map(jitgate_proto::grant_to_wire)
                .collect(),
            ..self.head_for(protocol)
        }
    }

    /// The whole wire state.
    pub fn full(&self) -> DesiredState {
        self.full_for(jitgate_proto::AGENT_PROTOCOL)
    }
}

impl VmChanges {
    /// Starts listening for the revisions `vm`'s agent long-polls with (before the
    /// change it is to take is made, so that no answer is missed).
    pub fn expect_ack(self: &Arc<Self>, vm: &VmId) -> AckWait {
        let key = vm.key();
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let rx = acks
            .entry(key.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        AckWait {
            changes: self.clone(),
            key,
            rx: Some(rx),
        }
    }

    /// `vm`'s agent long-polls with `known`: the state it has applied.
    pub fn ack(&self, vm: &VmId, known: &str) {
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = acks.get(&vm.key()) {
            tx.send_replace(Some(known.to_owned()));
        }
    }

    /// Whether a long-poll of `vm`'s agent is waiting now.
    pub fn is_polled(&self, vm: &VmId) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&vm.key()).is_some_and(|tx| tx.receiver_count() > 0)
    }

    pub fn subscribe(self: &Arc<Self>, vm: &VmId) -> VmWatch {
        let key = vm.key();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map
            .entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        VmWatch {
            changes: self.clone(),
            key,
            rx: Some(rx),
        }
    }

    /// Something about these VMs changed (their rules, policy or placement, perhaps).
    pub fn touch<'a>(&self, vms: impl IntoIterator<Item = &'a VmId>) {
        self.touch_with(vms, true);
    }

    /// Only the grants of these VMs changed (initiated, approved, revoked, ended): the
    /// next state is built from the grant changes alone, with the rules and placement
    /// of the state before.
    pub fn touch_grants<'a>(&self, vms: impl IntoIterator<Item = &'a VmId>) {
        self.touch_with(vms, false);
    }

    fn touch_with<'a>(&self, vms: impl IntoIterator<Item = &'a VmId>, head: bool) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        for vm in vms {
            let key = vm.key();
            states.stamp += 1;
            let stamp = states.stamp;
            if let Some(e) = states.entries.get_mut(&key) {
                e.touch(stamp, head);
            }
            if let Some(tx) = map.get(&key) {
                tx.send_modify(|r| *r += 1);
            }
        }
    }

    /// Wakes every long-poll (each re-reads its VM's state).
    pub fn touch_all(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.stamp += 1;
        let stamp = states.stamp;
        for e in states.entries.values_mut() {
            e.touch(stamp, true);
        }
        for tx in map.values() {
            tx.send_modify(|r| *r += 1);
        }
    }

    /// The VM's state, if one was built since its last touch and none of its grants
    /// has ended since.
    pub fn current(&self, vm: &VmId, now: Timestamp) -> Option<Arc<Built>> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let cur = states.entries.get(&vm.key())?.current.clone()?;
        cur.next_end.is_none_or(|e| now < e).then_some(cur)
    }

    /// The state of revision `revision` (as an agent speaking `protocol` computes it)
    /// kept for the VM: the current one or the one before it.
    pub fn of_revision(&self, vm: &VmId, revision: &str, protocol: u32) -> Option<Arc<Built>> {
        let kept: Vec<Arc<Built>> = {
            let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            let e = states.entries.get(&vm.key())?;
            [&e.current, &e.previous]
                .into_iter()
                .flatten()
                .cloned()
                .collect()
        };
        // Outside the lock: a scheme-1 revision may be computed here.
        kept.into_iter()
            .find(|b| b.revision_for(protocol) == revision)
    }

    /// The newest state kept for the VM, current or not (the base a new one is built
    /// on: its grants plus the changes since).
    pub fn newest(&self, vm: &VmId) -> Option<Arc<Built>> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let e = states.entries.get(&vm.key())?;
        e.current.clone().or_else(|| e.previous.clone())
    }

    /// Whether nothing but grants changed for the VM since the read stamped `since`.
    fn head_unchanged_since(&self, vm: &VmId, since: u64) -> bool {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        since >= states.floor
            && states
                .entries
                .get(&vm.key())
                .is_some_and(|e| e.head_touched <= since)
    }

    /// Stamps a read of the VM's state that begins now.
    pub fn begin(&self, vm: &VmId) -> u64 {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = states.stamp;
        if !states.entries.contains_key(&vm.key()) {
            if states.entries.len() >= MAX_STATES {
                states.entries.clear();
                states.stamp += 1;
                states.floor = states.stamp;
                // This read too began before the drop: it is not kept.
                return stamp;
            }
            states.entries.insert(
                vm.key(),
                StateEntry {
                    touched: stamp,
                    head_touched: stamp,
                    ..StateEntry::default()
                },
            );
        }
        stamp
    }

    /// Keeps the state built from the read stamped `stamp`, unless the VM was touched
    /// after that read began.
    pub fn keep(&self, vm: &VmId, stamp: u64, built: Arc<Built>) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if stamp < states.floor {
            return;
        }
        let Some(e) = states.entries.get_mut(&vm.key()) else {
            return;
        };
        if e.touched > stamp {
            return;
        }
        if let Some(cur) = e.current.take()
            && cur.revision() != built.revision()
        {
            e.previous = Some(cur);
        }
        e.current = Some(built);
    }

    /// How many VMs are watched now.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A long-poll's subscription to one VM's changes; dropping the last one of a VM
/// removes its channel.
pub struct VmWatch {
    changes: Arc<VmChanges>,
    key: String,
    /// Always `Some` until dropped: taken in `drop`, under the map's lock.
    rx: Option<watch::Receiver<u64>>,
}

impl VmWatch {
    /// Marks the current value seen.
    pub fn borrow_and_update(&mut self) {
        if let Some(rx) = &mut self.rx {
            rx.borrow_and_update();
        }
    }

    /// Waits for a change not yet seen.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        match &mut self.rx {
            Some(rx) => rx.changed().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for VmWatch {
    fn drop(&mut self) {
        release(&self.changes.map, &self.key, &mut self.rx);
    }
}

/// Drops a receiver of `map`'s channel for `key`, and the channel with its last one.
/// Under the map's lock, like subscribing: a subscriber arriving now either finds the
/// channel still counted or creates a fresh one, never a channel being removed.
fn release<T>(
    map: &Mutex<HashMap<String, watch::Sender<T>>>,
    key: &str,
    rx: &mut Option<watch::Receiver<T>>,
) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    drop(rx.take());
    if map.get(key).is_some_and(|tx| tx.receiver_count() == 0) {
        map.remove(key);
    }
}

/// The VM's NSG view (user, JIT deny and JIT allow rules) with its live grants at
/// `now`.
pub async fn nsg_now(state: &AppState, vm: &VmId, now: Timestamp) -> ApiResult<Vec<NsgRule>> {
    let grants: Vec<GrantRef> = state
        .store
        .live_grants(vm, now)
        .await?
        .iter()
        .map(jitgate_store::Grant::to_ref)
        .collect();
    view_with(state, vm, &grants).await
}

/// The VM's NSG view with these grants (with none: its user and deny rules, which do
/// not depend on the grants).
async fn view_with(state: &AppState, vm: &VmId, grants: &[GrantRef]) -> ApiResult<Vec<NsgRule>> {
    let user = state.store.nsg_rules(vm).await?;
    let policy = state.store.vm_policy(vm).await?;
    let pvm = policy.as_ref().map(|p| (&p.key, &p.vm));
    Ok(nsg_view(vm, &user, pvm, grants))
}

/// The VM's desired state now for its agent: the one kept since the last change;
/// else the newest one kept with the grants changed since (only those are read); else
/// built from the store. Kept for the next call.
pub async fn agent_state(state: &AppState, vm: &VmId) -> ApiResult<Arc<Built>> {
    let now = state.clock.now();
    if let Some(b) = state.vm_changes.current(vm, now) {
        return Ok(b);
    }
    let stamp = state.vm_changes.begin(vm);
    let base = state.vm_changes.newest(vm);
    let after = base.as_ref().map_or(0, |b| b.upto);
    let changes = state.store.grant_changes(vm, after, now).await?;
    let none = Grants::new();
    let (grants, change) = patch_grants(
        base.as_ref().map_or(&none, |b| &b.grants),
        base.as_ref().and_then(|b| b.next_end),
        &changes.rows,
        now,
    );
    // Only grants changed since the base was read: its rules and placement stand.
    let (rules, gateway, head_stamp) = match base
        .as_ref()
        .filter(|b| state.vm_changes.head_unchanged_since(vm, b.head_stamp))
    {
        Some(b) => (b.head.rules.clone(), b.head.gateway.clone(), b.head_stamp),
        None => {
            // The agent gets grants, not allow rules.
            let view = view_with(state, vm, &[]).await?;
            let placement = state.store.placement(vm).await?;
            (
                jitgate_proto::rules_to_wire(&view),
                placement
                    .as_ref()
                    .map(|p| jitgate_proto::WireGateway::from_placement(&p.place)),
                stamp,
            )
        }
    };
    let built = Arc::new(Built::from_wire(
        vm,
        rules,
        gateway,
        grants,
        base.as_deref(),
        change,
        changes.upto,
        now,
        head_stamp,
    ));
    state.vm_changes.keep(vm, stamp, built.clone());
    Ok(built)
}

/// `base` (sorted) without the grants ended by `now`, with the changed rows: a row
/// replaces the grants of its request, port and protocol, and is one if initiated
/// and not ended. The result is sorted. `base_ends` is the first end among `base`'s
/// grants: while it is to come, a change of a few rows costs a copy of `base` and a
/// search per row, with no hashing of the grants that stay.
fn patch_grants(
    base: &Grants,
    base_ends: Option<Timestamp>,
    rows: &[(jitgate_store::Grant, bool)],
    now: Timestamp,
) -> (Grants, Option<Change>) {
    let added = rows
        .iter()
        .filter(|(g, live)| *live && g.end > now)
        .map(|(g, _)| g.to_ref());
    if rows.len() <= 64 && base_ends.is_none_or(|e| e > now) {
        let mut grants = base.clone();
        let (mut added_now, mut removed) = (Vec::new(), Vec::new());
        // Grants sort by request, port and protocol first: a row's grants are a run,
        // from the least grant with that key.
        for (g, _) in rows {
            let key = (g.request, g.number, g.protocol);
            let least = GrantRef {
                request: g.request,
                number: g.number,
                protocol: g.protocol,
                source: jitgate_core::net::SourcePrefix::Any,
                start: Timestamp::MIN,
                end: Timestamp::MIN,
            };
            let run: Vec<GrantRef> = grants
                .range(least..)
                .take_while(|x| (x.request, x.number, x.protocol) == key)
                .cloned()
                .collect();
            for x in run {
                grants.remove(&x);
                removed.push(x);
            }
        }
        for g in added {
            if grants.insert(g.clone()).is_none() {
                // A row written again unchanged is neither added nor removed.
                match removed.iter().position(|r| *r == g) {
                    Some(i) => {
                        removed.swap_remove(i);
                    }
                    None => added_now.push(g),
                }
            }
        }
        let change = Change {
            added: added_now,
            removed,
        };
        return (grants, Some(change));
    }
    let changed: std::collections::HashSet<_> = rows
        .iter()
        .map(|(g, _)| (g.request, g.number, g.protocol))
        .collect();
    let grants: Grants = base
        .iter()
        .filter(|g| g.end > now && !changed.contains(&(g.request, g.number, g.protocol)))
        .cloned()
        .chain(added)
        .collect();
    (grants, None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use jitgate_core::ids::{ResourceGroup, VmName};
    use std::time::Duration;

    /// [`patch_grants`] on lists.
    fn patch(
        base: &[GrantRef],
        base_ends: Option<Timestamp>,
        rows: &[(jitgate_store::Grant, bool)],
        now: Timestamp,
    ) -> (Vec<GrantRef>, Option<Change>) {
        let (g, c) = patch_grants(&base.iter().cloned().collect(), base_ends, rows, now);
        (g.into_iter().collect(), c)
    }

    fn vm(name: &str) -> VmId {
        VmId::new(
            jitgate_core::ids::SubscriptionId::new(uuid::Uuid::nil()),
            ResourceGroup::parse("rg").unwrap(),
            VmName::parse(name).unwrap(),
        )
    }

    fn built(revision: &str, end: Option<Timestamp>) -> Arc<Built> {
        let full = DesiredState {
            vm: "vm".into(),
            revision: revision.into(),
            generated_at: String::new(),
            rules: Vec::new(),
            grants: Vec::new(),
            base: None,
            removed: Vec::new(),
            gateway: None,
            requires: None,
        };
        Arc::new(Built {
            head: full,
            grants: Grants::new(),
            digest: jitgate_proto::GrantDigest::default(),
            revision_v1: std::sync::OnceLock::from(revision.to_owned()),
            next_end: end,
            ends: imbl::OrdMap::new(),
            upto: 0,
            head_stamp: 0,
            from: None,
        })
    }

    /// The grants of a state built on an older one: ended grants leave, a changed row
    /// replaces its grant (revoked: gone; initiated: in its sorted place).
    #[test]
    fn a_state_is_its_base_with_the_changed_rows() {
        use jitgate_core::net::{Port, Protocol, SourcePrefix};
        use jitgate_core::request::RequestId;
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let at = |s: i64| t.checked_add(jiff::SignedDuration::from_secs(s)).unwrap();
        let row = |r: u128, port: i64, end: i64| jitgate_store::Grant {
            request: RequestId::new(uuid::Uuid::from_u128(r)),
            requestor: "alice".into(),
            number: Port::new(port).unwrap(),
            protocol: Protocol::Tcp,
            source: SourcePrefix::parse("10.0.0.1").unwrap(),
            start: t,
            end: at(end),
        };
        let refs = |rows: &[jitgate_store::Grant]| -> Vec<GrantRef> {
            patch(
                &[],
                None,
                &rows.iter().map(|g| (g.clone(), true)).collect::<Vec<_>>(),
                t,
            )
            .0
        };
        let base = refs(&[row(1, 22, 100), row(3, 22, 300), row(2, 22, 10)]);
        assert!(base.windows(2).all(|w| w[0] < w[1]), "sorted");
        let first_end = base.iter().map(|g| g.end).min();
        let next = patch(
            &base,
            first_end,
            &[
                (row(3, 22, 300), false),
                (row(4, 3389, 400), true),
                (row(0, 22, 50), true),
            ],
            at(20),
        )
        .0;
        // 2 ended at 10, 3 was revoked, 0 and 4 are new.
        assert_eq!(
            next,
            refs(&[row(0, 22, 50), row(1, 22, 100), row(4, 3389, 400)])
        );
        // A row changed while initiated replaces its old values.
        let moved = patch(
            &next,
            next.iter().map(|g| g.end).min(),
            &[(row(1, 22, 200), true)],
            at(20),
        )
        .0;
        assert_eq!(
            moved,
            refs(&[row(0, 22, 50), row(1, 22, 200), row(4, 3389, 400)])
        );
        // The copy-and-search path (nothing ended) and the filtering one agree; the
        // first also says what changed, and a state built with that change is the one
        // built by walking both lists. A row written again unchanged is no change.
        let rows = [
            (row(1, 22, 200), true),
            (row(0, 22, 50), false),
            (row(5, 443, 90), true),
            (row(4, 3389, 400), true),
        ];
        let first_end = next.iter().map(|g| g.end).min();
        let (fast, change) = patch(&next, first_end, &rows, at(20));
        assert_eq!(fast, patch(&next, Some(Timestamp::MIN), &rows, at(20)).0);
        let mut change = change.unwrap();
        change.added.sort_unstable();
        change.removed.sort_unstable();
        assert_eq!(
            (change.added, change.removed),
            (
                refs(&[row(1, 22, 200), row(5, 443, 90)]),
                refs(&[row(1, 22, 100), row(0, 22, 50)])
            )
        );
        let v = vm("a");
        let on = Built::new(&v, None, &[], next.clone(), None, 1, t);
        let (grants, change) = patch(&next, first_end, &rows, at(20));
        let walked = Built::new(&v, None, &[], grants.clone(), Some(&on), 2, t);
        let told = Built::from_wire(
            &v,
            Vec::new(),
            None,
            grants.into_iter().collect(),
            Some(&on),
            change.clone(),
            2,
            t,
            0,
        );
        assert_eq!(told.revision(), walked.revision());
        assert_eq!(told.next_end, walked.next_end);
        assert_eq!(told.change_since(on.revision()), change.as_ref());
        assert!(told.change_since(walked.revision()).is_none());

        // A state built on another carries its digest and is what `encode` builds.
        let v = vm("a");
        let first = Built::new(&v, None, &[], base.clone(), None, 1, t);
        for (grants, on) in [
            (next.clone(), Some(&first)),
            (moved.clone(), None),
            (moved, Some(&first)),
        ] {
            let b = Built::new(&v, None, &[], grants.clone(), on, 2, t);
            let want = jitgate_proto::encode(&v, None, &[], &grants, t);
            assert_eq!(b.revision(), want.revision);
            assert_eq!(b.full(), want);
        }
    }

    /// A state is served from memory only while nothing touched its VM since its read
    /// began, and none of its grants has ended; the one before stays for deltas.
    #[test]
    fn a_kept_state_is_never_older_than_the_last_touch() {
        let changes = VmChanges::default();
        let (a, b) = (vm("a"), vm("b"));
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();

        // A read that began before a touch of its VM is not kept...
        let stamp = changes.begin(&a);
        changes.touch([&a]);
        changes.keep(&a, stamp, built("r1", None));
        assert!(changes.current(&a, now).is_none());
        // ...but a touch of another VM does not matter.
        let stamp = changes.begin(&a);
        changes.touch([&b]);
        changes.keep(&a, stamp, built("r1", None));
        assert_eq!(changes.current(&a, now).unwrap().revision(), "r1");

        // A touch drops it as current and keeps it as the one before.
        changes.touch([&a]);
        assert!(changes.current(&a, now).is_none());
        assert!(changes.of_revision(&a, "r1", 3).is_some());
        let stamp = changes.begin(&a);
        changes.keep(&a, stamp, built("r2", Some(now)));
        assert!(changes.of_revision(&a, "r1", 3).is_some());
        assert!(changes.of_revision(&a, "r2", 3).is_some());
        assert!(changes.of_revision(&b, "r1", 3).is_none());

        // A grant's end makes it another state.
        let before = now.checked_sub(jiff::SignedDuration::from_secs(1)).unwrap();
        assert!(changes.current(&a, before).is_some());
        assert!(changes.current(&a, now).is_none());

        // Touching everything drops everything current, and reads begun before.
        let stamp = changes.begin(&a);
        changes.touch_all();
        changes.keep(&a, stamp, built("r3", None));
        assert!(changes.current(&a, before).is_none());
    }

    /// A state's rules and placement are reused only while nothing but grants changed
    /// since they were read: a grant-only touch keeps them, any other touch (or
    /// dropping every kept state) does not.
    #[test]
    fn only_grant_changes_keep_the_rules_read_before() {
        let changes = VmChanges::default();
        let (a, b) = (vm("a"), vm("b"));
        let read = changes.begin(&a);
        assert!(changes.head_unchanged_since(&a, read));
        changes.touch_grants([&a]);
        assert!(changes.head_unchanged_since(&a, read), "grants only");
        changes.touch([&b]);
        assert!(changes.head_unchanged_since(&a, read), "another VM");
        changes.touch([&a]);
        assert!(
            !changes.head_unchanged_since(&a, read),
            "a's policy or rules"
        );
        let again = changes.begin(&a);
        assert!(changes.head_unchanged_since(&a, again));
        changes.touch_all();
        assert!(!changes.head_unchanged_since(&a, again), "everything");
        // A VM whose entry is unknown (never read, or dropped) has no head to reuse.
        assert!(!changes.head_unchanged_since(&vm("c"), changes.begin(&b)));
    }

    /// Issue 15: an initiate's wait for an agent ends when the agent polls with the
    /// revision it waits for (even one sent before the wait began, once listening),
    /// or at its deadline; acks for VMs nobody waits for are not kept.
    #[tokio::test]
    async fn a_wait_for_an_agent_ends_with_its_ack_or_its_deadline() {
        let changes = Arc::new(VmChanges::default());
        let (a, b) = (vm("a"), vm("b"));
        changes.ack(&a, "r0");
        assert!(changes.acks.lock().unwrap().is_empty(), "nobody waits");

        let mut wait = changes.expect_ack(&a);
        changes.ack(&a, "r1");
        let soon = tokio::time::Instant::now() + Duration::from_secs(10);
        assert!(
            wait.until(|k| k == "r1", soon).await,
            "acked before the wait"
        );

        let later = tokio::time::Instant::now() + Duration::from_secs(10);
        let c2 = changes.clone();
        let acker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            c2.ack(&vm("b"), "r2");
            c2.ack(&vm("a"), "r1-other");
            tokio::time::sleep(Duration::from_millis(10)).await;
            c2.ack(&vm("a"), "r2");
        });
        assert!(
            wait.until(|k| k == "r2", later).await,
            "acked while waiting"
        );
        acker.await.unwrap();

        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_millis(50);
        assert!(!wait.until(|k| k == "r9", deadline).await, "never acked");
        assert!(tokio::time::Instant::now() >= deadline);
        drop(wait);
        assert!(
            changes.acks.lock().unwrap().is_empty(),
            "gone with its waiter"
        );
        assert!(!changes.is_polled(&b));
        let watch = changes.subscribe(&b);
        assert!(changes.is_polled(&b));
        drop(watch);
    }

    /// Issue 10: channels of VMs nobody watches any more are removed (the map grew by
    /// one entry per VM ever long-polled).
    #[tokio::test]
    async fn channels_go_with_their_last_watcher() {
        let changes = Arc::new(VmChanges::default());
        let mut a = changes.subscribe(&vm("a"));
        let mut a2 = changes.subscribe(&vm("A"));
        let b = changes.subscribe(&vm("b"));
        assert_eq!(changes.len(), 2, "one channel per VM, by key");

        changes.touch([&vm("a")]);
        a.changed().await.unwrap();
        a2.changed().await.unwrap();
        drop(a);
        assert_eq!(changes.len(), 2, "a is still watched");
        changes.touch([&vm("a")]);
        a2.changed().await.unwrap();
        drop(a2);
        drop(b);
        assert!(changes.is_empty());

        // Touching an unwatched VM creates nothing; a new watcher starts afresh and
        // is woken by the next change.
        changes.touch([&vm("a")]);
        assert!(changes.is_empty());
        let mut again = changes.subscribe(&vm("a"));
        again.borrow_and_update();
        changes.touch([&vm("a")]);
        tokio::time::timeout(Duration::from_secs(1), again.changed())
            .await
            .unwrap()
            .unwrap();
        drop(again);
        assert!(changes.is_empty());
    }
}
