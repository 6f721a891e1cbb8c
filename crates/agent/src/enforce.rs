//! From a validated desired state to the kernel.
//!
//! A change of grants only is applied as a delta: the set elements it changes are
//! deleted and added over netlink in one atomic batch ([`crate::netlink`]), which
//! the kernel commits in microseconds. Anything else (the first apply after start, a
//! change of rules, a batch the kernel refuses, no netlink socket) rebuilds the whole
//! table in one `nft -f` transaction, re-adding every live grant with its remaining
//! lifetime. Either way the kernel never sees a half-applied state.
//!
//! The delta costs what changed, not what the table holds: the desired grants come
//! sorted (the controller sorts them; an unsorted list is sorted here), so one walk
//! of the previous and the new list finds the grants added and removed. A host grant
//! touches one element (its address, protocol and port: the latest end among the
//! grants on it); a prefix grant replans only its group (family, protocol, port).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use jitgate_core::Timestamp;
use jitgate_core::net::Port;
use jitgate_core::nfnl;
use jitgate_core::nft::{self, Element, Group, L4};
use jitgate_core::nsg::{GrantRef, NsgRule};
use jitgate_core::request::RequestId;
use jitgate_proto::Desired;

use crate::netlink::{BatchError, NfSocket};
use crate::nft::Nft;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyKind {
    Full,
    Delta,
    Nothing,
}

/// A single-address element's key.
type HostKey = (IpAddr, L4, Port);
/// Which grant an entry came from.
type GrantId = (RequestId, Port);

/// What the agent last put in the kernel, indexed for small changes.
#[derive(Debug)]
struct Applied {
    rules: Vec<NsgRule>,
    /// The state applied (its grants sorted), shared with the agent's record of it.
    state: Arc<Desired>,
    /// True when the grants' keys strictly increase (see `changed`).
    by_key: bool,
    /// For each host key, the grants on it and their ends.
    hosts: HashMap<HostKey, Vec<(GrantId, Timestamp)>>,
    /// The element in the kernel for each host key (its end).
    host_elements: HashMap<HostKey, Timestamp>,
    /// For each prefix group, the grants in it.
    nets: BTreeMap<Group, Vec<(IpNet, Timestamp, GrantId)>>,
    /// The elements in the kernel for each prefix group.
    net_elements: BTreeMap<Group, Vec<Element>>,
}

fn host_key(group: Group, net: IpNet) -> HostKey {
    (net.addr(), group.2, group.3)
}

/// The element of a host key ending at `end`.
fn host_element(key: &HostKey, end: Timestamp) -> Element {
    Element {
        net: IpNet::from(key.0),
        proto: key.1,
        port: key.2,
        end,
    }
}

impl Applied {
    fn index(&mut self, g: &GrantRef, add: bool) -> (Vec<HostKey>, Vec<Group>) {
        let id = (g.request, g.number);
        let (mut hosts, mut groups) = (Vec::new(), Vec::new());
        for (group, net) in nft::grant_parts(g) {
            if group.1 {
                let key = host_key(group, net);
                let v = self.hosts.entry(key).or_default();
                if add {
                    v.push((id, g.end));
                } else if let Some(i) = v.iter().position(|(i, e)| *i == id && *e == g.end) {
                    v.swap_remove(i);
                }
                hosts.push(key);
            } else {
                let v = self.nets.entry(group).or_default();
                if add {
                    v.push((net, g.end, id));
                } else if let Some(i) = v
                    .iter()
                    .position(|(n, e, i)| *i == id && *e == g.end && *n == net)
                {
                    v.swap_remove(i);
                }
                groups.push(group);
            }
        }
        (hosts, groups)
    }

    /// The element a host key should hold at `now` (None: none).
    fn host_element(&self, key: &HostKey, now: Timestamp) -> Option<Element> {
        let end = self
            .hosts
            .get(key)?
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| nft::timeout_ms(*e, now).is_some())
            .max()?;
        Some(host_element(key, end))
    }

    fn net_plan(&self, group: Group, now: Timestamp) -> Vec<Element> {
        let items: Vec<(IpNet, Timestamp)> = self
            .nets
            .get(&group)
            .map(|v| {
                v.iter()
                    .filter(|(_, e, _)| nft::timeout_ms(*e, now).is_some())
                    .map(|(n, e, _)| (*n, *e))
                    .collect()
            })
            .unwrap_or_default();
        nft::plan_group(group, items)
    }

    /// Indexes the grants `added` and un-indexes the `removed` ones, and returns the
    /// element changes this makes at `now`: (to delete, to add).
    fn change(
        &mut self,
        added: &[&GrantRef],
        removed: &[GrantRef],
        now: Timestamp,
    ) -> (Vec<Element>, Vec<Element>) {
        let mut hosts: BTreeSet<HostKey> = BTreeSet::new();
        let mut groups: BTreeSet<Group> = BTreeSet::new();
        for (g, add) in removed
            .iter()
            .map(|g| (g, false))
            .chain(added.iter().map(|g| (*g, true)))
        {
            let (h, n) = self.index(g, add);
            hosts.extend(h);
            groups.extend(n);
        }
        let (mut dels, mut adds): (Vec<Element>, Vec<Element>) = (Vec::new(), Vec::new());
        let mut host_updates = Vec::new();
        for key in &hosts {
            let old = self.host_elements.get(key).copied();
            let new = self.host_element(key, now).map(|e| e.end);
            if old == new {
                continue;
            }
            let element = |end| host_element(key, end);
            if let Some(end) = old.filter(|e| *e > now) {
                dels.push(element(end));
            }
            if let Some(end) = new {
                adds.push(element(end));
            }
            host_updates.push((*key, new));
        }
        let mut net_updates = Vec::new();
        for group in &groups {
            let old = self.net_elements.get(group).cloned().unwrap_or_default();
            let new = self.net_plan(*group, now);
            let (a, d) = nft::diff(&old, &new, now);
            dels.extend(d);
            adds.extend(a);
            net_updates.push((*group, new));
        }
        for (key, new) in host_updates {
            match new {
                Some(end) => self.host_elements.insert(key, end),
                None => self.host_elements.remove(&key),
            };
            if self.hosts.get(&key).is_some_and(Vec::is_empty) {
                self.hosts.remove(&key);
            }
        }
        for (group, new) in net_updates {
            if new.is_empty() {
                self.net_elements.remove(&group);
            } else {
                self.net_elements.insert(group, new);
            }
            if self.nets.get(&group).is_some_and(Vec::is_empty) {
                self.nets.remove(&group);
            }
        }
        (dels, adds)
    }

    /// Every element, as [`nft::plan_elements`] would plan the grants.
    fn all_elements(&self) -> Vec<Element> {
        let mut out: Vec<Element> = self
            .host_elements
            .iter()
            .map(|(k, end)| host_element(k, *end))
            .collect();
        out.extend(self.net_elements.values().flatten().copied());
        out
    }

    /// Indexes `grants` from scratch and plans every element at `now`.
    fn build(rules: Vec<NsgRule>, state: Arc<Desired>, now: Timestamp) -> Self {
        let mut a = Applied {
            rules,
            state: state.clone(),
            by_key: false,
            hosts: HashMap::new(),
            host_elements: HashMap::new(),
            nets: BTreeMap::new(),
            net_elements: BTreeMap::new(),
        };
        for g in &state.grants {
            a.index(g, true);
        }
        a.by_key = strictly_sorted(&state.grants);
        let keys: Vec<HostKey> = a.hosts.keys().copied().collect();
        for k in keys {
            if let Some(e) = a.host_element(&k, now) {
                a.host_elements.insert(k, e.end);
            }
        }
        let groups: Vec<Group> = a.nets.keys().copied().collect();
        for g in groups {
            let plan = a.net_plan(g, now);
            if !plan.is_empty() {
                a.net_elements.insert(g, plan);
            }
        }
        a
    }
}

/// A grant's identity: its request and port. The controller sends at most one grant
/// per request and port; the order of grants is the order of their keys (the derived
/// order of `GrantRef` starts with the same two fields).
#[inline]
fn key(g: &GrantRef) -> (u128, u16) {
    (g.request.as_u128(), g.number.get())
}

/// A change of the state applied last, as the agent received it (see
/// [`Enforcer::apply_change`]).
#[derive(Debug, Clone, Copy)]
pub struct Told<'a> {
    /// The revision of the state it changes.
    pub base: &'a str,
    pub added: &'a [GrantRef],
    pub removed: &'a [GrantRef],
}

/// Whether `g`'s key is held by exactly one grant of `grants` (in order, so a key's
/// grants follow the least grant with that key).
fn one_of_key(grants: &jitgate_proto::Grants, g: &GrantRef) -> bool {
    let least = GrantRef {
        request: g.request,
        number: g.number,
        protocol: jitgate_core::net::Protocol::Tcp,
        source: jitgate_core::net::SourcePrefix::Any,
        start: Timestamp::MIN,
        end: Timestamp::MIN,
    };
    let k = key(g);
    grants
        .range(least..)
        .take_while(|x| key(x) == k)
        .take(2)
        .count()
        == 1
}

/// True when the keys strictly increase: sorted, and no key twice.
fn strictly_sorted<'a>(grants: impl IntoIterator<Item = &'a GrantRef>) -> bool {
    let mut last = None;
    grants.into_iter().all(|g| {
        let k = key(g);
        let up = last.is_none_or(|l| l < k);
        last = Some(k);
        up
    })
}

/// The grants in `new` and not in `old`, and in `old` and not in `new`, for lists
/// whose keys strictly increase. A grant whose key is in both but whose content
/// changed is in both results.
fn changed<'o, 'n>(
    old: impl IntoIterator<Item = &'o GrantRef>,
    new: impl IntoIterator<Item = &'n GrantRef>,
) -> (Vec<&'n GrantRef>, Vec<&'o GrantRef>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (old.into_iter().peekable(), new.into_iter().peekable());
    while let (Some(a), Some(b)) = (old.peek().copied(), new.peek().copied()) {
        match key(a).cmp(&key(b)) {
            std::cmp::Ordering::Equal => {
                if a != b {
                    removed.push(a);
                    added.push(b);
                }
                old.next();
                new.next();
            }
            std::cmp::Ordering::Less => {
                removed.push(a);
                old.next();
            }
            std::cmp::Ordering::Greater => {
                added.push(b);
                new.next();
            }
        }
    }
    removed.extend(old);
    added.extend(new);
    (added, removed)
}

pub struct Enforcer {
    nft: Nft,
    socket: Option<NfSocket>,
    applied: Option<Applied>,
    /// How long recent commits took: the kernel starts an element's timeout when the
    /// transaction commits, not when it is planned.
    recent: Duration,
    /// The elements the last delta deleted or added (empty after a full rebuild).
    last_changed: Vec<Element>,
}

/// The kernel keeps element timeouts in jiffies: an element may outlive its timeout by up
/// to one tick (10 ms at HZ=100, the coarsest common setting).
pub const KERNEL_TICK: Duration = Duration::from_millis(10);

/// The most a grant may close early to make sure it never closes late.
pub const MAX_COMMIT_MARGIN: Duration = Duration::from_millis(100);

/// What one apply did and how long the kernel took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub kind: ApplyKind,
    /// The time spent in the kernel (`nft -f` or the netlink batch).
    pub kernel: Duration,
    /// Elements deleted and added.
    pub deleted: usize,
    pub added: usize,
    /// Deletes that found the element already expired.
    pub already_gone: usize,
}

impl Enforcer {
    /// An enforcer that changes elements over netlink (falling back to `nft -f` when
    /// no netlink socket can be opened) and rebuilds with `nft`.
    pub fn new(nft: Nft) -> Self {
        let socket = match NfSocket::open() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no netlink socket to nf_tables; every change will run nft");
                None
            }
        };
        Enforcer {
            nft,
            socket,
            applied: None,
            recent: Duration::from_millis(20),
            last_changed: Vec::new(),
        }
    }

    pub fn nft(&self) -> &Nft {
        &self.nft
    }

    /// The netlink socket's port id (its changes' notifications carry it).
    pub fn netlink_port(&self) -> Option<u32> {
        self.socket.as_ref().map(NfSocket::port)
    }

    /// Makes the kernel match `desired` at `now`.
    ///
    /// The kernel starts an element's timeout when the transaction commits, and keeps
    /// it in jiffies. So timeouts are computed as if it were already `now` plus the
    /// expected time to commit (1.5 times the last commit) plus one kernel tick
    /// ([`KERNEL_TICK`]), at most [`MAX_COMMIT_MARGIN`]: a grant may close that much
    /// early, never late.
    pub fn apply(
        &mut self,
        desired: impl Into<Arc<Desired>>,
        now: Timestamp,
    ) -> anyhow::Result<ApplyStats> {
        self.apply_with(desired.into(), None, now)
    }

    /// [`Enforcer::apply`] of a state known to be the one applied last (of revision
    /// `told.base`) with `told.added` and without `told.removed`: the change is
    /// planned without walking every grant. Taken as a plain apply when the state
    /// applied last is another.
    pub fn apply_change(
        &mut self,
        desired: Arc<Desired>,
        told: Told<'_>,
        now: Timestamp,
    ) -> anyhow::Result<ApplyStats> {
        self.apply_with(desired, Some(told), now)
    }

    fn apply_with(
        &mut self,
        desired: Arc<Desired>,
        told: Option<Told<'_>>,
        now: Timestamp,
    ) -> anyhow::Result<ApplyStats> {
        nft::validate(&desired.rules)
            .map_err(|e| anyhow::anyhow!("refusing an invalid desired state: {e}"))?;
        let margin = (self.recent + self.recent / 2 + KERNEL_TICK).min(MAX_COMMIT_MARGIN);
        let now = now
            .checked_add(jiff::SignedDuration::try_from(margin).unwrap_or_default())
            .unwrap_or(now);
        // What changed, when told and it changes the state applied last into this one
        // while keeping one grant per key.
        let told = told.filter(|t| {
            self.applied
                .as_ref()
                .is_some_and(|a| a.by_key && a.state.revision == t.base)
                && t.added.iter().all(|g| one_of_key(&desired.grants, g))
        });
        // The grants are a sorted set: the keys increase unless one key has two
        // grants (which the controller never sends).
        let by_key = told.is_some() || strictly_sorted(&desired.grants);

        // Two different grants with one key (which the controller never sends) cannot
        // be walked by key: such a state is rebuilt in full.
        let same_rules = by_key
            && self
                .applied
                .as_ref()
                .is_some_and(|a| a.rules == desired.rules && a.by_key);
        if same_rules && let Some(mut applied) = self.applied.take() {
            let (added, removed): (Vec<&GrantRef>, Vec<GrantRef>) = match &told {
                Some(t) => (t.added.iter().collect(), t.removed.to_vec()),
                None => {
                    let (a, r) = changed(&applied.state.grants, &desired.grants);
                    (a, r.into_iter().cloned().collect())
                }
            };
            match self.delta(&mut applied, &added, &removed, now) {
                Ok(Some(stats)) => {
                    drop(added);
                    applied.state = desired;
                    self.applied = Some(applied);
                    return Ok(stats);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "a delta failed; rebuilding the table")
                }
            }
        }
        let rules = desired.rules.clone();
        self.full(rules, desired, now)
    }

    /// Rebuilds the whole table.
    fn full(
        &mut self,
        rules: Vec<NsgRule>,
        state: Arc<Desired>,
        now: Timestamp,
    ) -> anyhow::Result<ApplyStats> {
        self.applied = None;
        self.last_changed.clear();
        let applied = Applied::build(rules, state, now);
        let elements = applied.all_elements();
        let started = Instant::now();
        self.nft
            .apply(&nft::render_full(&applied.rules, &elements, now))?;
        let took = started.elapsed();
        self.recent = took;
        let added = elements.len();
        self.applied = Some(applied);
        Ok(ApplyStats {
            kind: ApplyKind::Full,
            kernel: took,
            deleted: 0,
            added,
            already_gone: 0,
        })
    }

    /// Applies a change of grants as element deletes and adds. `Ok(None)`: a delta
    /// cannot do it (too large); the caller rebuilds. On error `applied` may be
    /// half-updated and must be dropped; on success the caller stores the new state
    /// in it.
    fn delta(
        &mut self,
        applied: &mut Applied,
        added: &[&GrantRef],
        removed: &[GrantRef],
        now: Timestamp,
    ) -> anyhow::Result<Option<ApplyStats>> {
        let (dels, adds) = applied.change(added, removed, now);
        self.last_changed.clear();
        self.last_changed.extend(dels.iter().chain(&adds).copied());
        // Elements too close to their end to be written are left out of `adds` by
        // the planner already (see `nft::timeout_ms`).
        let ops = nfnl::changes(dels.iter().copied(), adds.iter().map(|e| (*e, e.end)), now);
        if ops.is_empty() {
            return Ok(Some(ApplyStats {
                kind: ApplyKind::Nothing,
                kernel: Duration::ZERO,
                deleted: 0,
                added: 0,
                already_gone: 0,
            }));
        }
        let started = Instant::now();
        let already_gone = match &mut self.socket {
            Some(socket) => match socket.apply(&ops) {
                Ok(report) => report.already_gone,
                Err(BatchError::TooLarge(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            },
            None => {
                self.nft.apply(&nft::render_delta(&adds, &dels, now))?;
                0
            }
        };
        let took = started.elapsed();
        self.recent = took;
        Ok(Some(ApplyStats {
            kind: ApplyKind::Delta,
            kernel: took,
            deleted: dels.len() - already_gone,
            added: adds.len(),
            already_gone,
        }))
    }

    /// The elements the last apply deleted or added, when it was a delta.
    pub fn last_changed(&self) -> &[Element] {
        &self.last_changed
    }

    /// Forgets what was applied, so the next apply rebuilds the whole table.
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// The rules last applied (for reading their counters without holding `self`).
    pub fn applied_rules(&self) -> Vec<NsgRule> {
        self.applied
            .as_ref()
            .map(|a| a.rules.clone())
            .unwrap_or_default()
    }

    /// How many elements were last applied.
    pub fn applied_len(&self) -> usize {
        self.applied.as_ref().map_or(0, |a| {
            a.host_elements.len() + a.net_elements.values().map(Vec::len).sum::<usize>()
        })
    }

    /// Every element last applied (its planned end), for the drift check.
    pub fn applied_elements(&self) -> Vec<Element> {
        self.applied
            .as_ref()
            .map(Applied::all_elements)
            .unwrap_or_default()
    }

    /// Every element of the grant sets as the kernel holds it now (over netlink).
    pub fn kernel_elements(
        &mut self,
    ) -> anyhow::Result<Vec<(&'static str, jitgate_core::nfnl::Held)>> {
        let Some(socket) = &mut self.socket else {
            anyhow::bail!("no netlink socket to nf_tables");
        };
        socket.dump_grant_sets()
    }
}

/// Blocked-attempt counters of the JIT deny rules among `rules`.
pub fn read_counters(nft: &Nft, rules: &[NsgRule]) -> Vec<jitgate_proto::WireCounter> {
    if rules.is_empty() {
        return Vec::new();
    }
    let Ok(values) = nft.counters() else {
        return Vec::new();
    };
    nft::deny_counter_names(rules)
        .into_iter()
        .filter_map(|(name, port, protocol)| {
            values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, packets)| jitgate_proto::WireCounter {
                    rule: name.clone(),
                    port: port.get(),
                    protocol: protocol.as_str().to_owned(),
                    packets: *packets,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use jitgate_core::net::{Protocol, SourcePrefix};
    use uuid::Uuid;

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn grant(n: u128, p: u16, proto: Protocol, source: &str, end_s: i64) -> GrantRef {
        GrantRef {
            request: RequestId::new(Uuid::from_u128(n)),
            number: Port::new(i64::from(p)).unwrap(),
            protocol: proto,
            source: SourcePrefix::parse(source).unwrap(),
            start: t0(),
            end: t0()
                .checked_add(jiff::SignedDuration::from_secs(end_s))
                .unwrap(),
        }
    }

    /// The incremental index ends up planning exactly what the planner plans from
    /// scratch, through a sequence of adds and removes.
    #[test]
    fn small_changes_keep_the_index_equal_to_a_fresh_plan() {
        let all = [
            grant(1, 22, Protocol::Tcp, "10.0.0.1", 100),
            grant(2, 22, Protocol::Tcp, "10.0.0.1", 200),
            grant(3, 22, Protocol::Any, "10.0.0.0/30", 150),
            grant(4, 22, Protocol::Tcp, "10.0.0.0/29", 300),
            grant(5, 3389, Protocol::Tcp, "*", 50),
            grant(6, 22, Protocol::Udp, "2001:db8::1", 80),
            grant(7, 22, Protocol::Tcp, "10.0.0.2", 1),
        ];
        let now = t0();
        let empty = Arc::new(Desired {
            vm: jitgate_core::ids::VmId::parse("/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1").unwrap(),
            revision: String::new(),
            rules: Vec::new(),
            grants: Default::default(),
            gateway: None,
            digest: Default::default(),
        });
        let mut applied = Applied::build(Vec::new(), empty, now);
        // Every subset in a Gray-code order: each step adds or removes one grant.
        let mut current: Vec<GrantRef> = Vec::new();
        for step in 1u32..(1 << all.len()) {
            let bit = step.trailing_zeros() as usize;
            let g = all[bit].clone();
            let mut next = current.clone();
            match next.iter().position(|x| *x == g) {
                Some(i) => {
                    next.remove(i);
                }
                None => next.push(g),
            }
            next.sort();
            let (added, removed) = changed(&current, &next);
            assert_eq!(added.len() + removed.len(), 1);
            let removed: Vec<GrantRef> = removed.into_iter().cloned().collect();
            applied.change(&added, &removed, now);
            let mut got = applied.all_elements();
            got.sort_by_key(|e| (e.net, e.proto, e.port, e.end));
            let mut want = nft::plan_elements(&next, now);
            want.sort_by_key(|e| (e.net, e.proto, e.port, e.end));
            assert_eq!(got, want, "after step {step}");
            current = next;
        }
    }

    #[test]
    fn the_walk_finds_what_was_added_and_removed() {
        let a = grant(1, 22, Protocol::Tcp, "10.0.0.1", 100);
        let b = grant(2, 22, Protocol::Tcp, "10.0.0.2", 100);
        let c = grant(3, 22, Protocol::Tcp, "10.0.0.3", 100);
        let mut b2 = b.clone();
        b2.end = t0();
        let mut old = vec![a.clone(), b.clone()];
        let mut new = vec![b2.clone(), c.clone()];
        old.sort();
        new.sort();
        let (added, removed) = changed(&old, &new);
        assert_eq!(added, [&b2, &c]);
        assert_eq!(removed, [&a, &b]);
        assert_eq!(changed(&old, &old), (vec![], vec![]));
    }
}
