//! The request lifecycle against a reference model: a state-machine property test any
//! backend runs (feature `model`).
//!
//! [`LifecycleRef`] is a small model of what the store must do, written from the rules
//! (DESIGN and `core::request`'s lifecycle) and not from the code: it calls none of the
//! core decisions it checks (`plan_initiate`, `still_allows`, `removed_ports`,
//! `rbac::is_allowed`, prefix containment). Its world is fixed and tiny so that random
//! sequences collide often: three registered VMs and one that never is, ports 22, 3389
//! and 8080, two policy names, five principals with different rights, and six source
//! prefixes that nest (`*` ⊃ `10.0.0.0/8` ⊃ `10.1.0.0/16` ⊃ `10.1.2.3/32`, and
//! `192.168.0.0/16` ⊃ `192.168.7.7/32`), the two host prefixes doubling as the callers'
//! "my IP".
//!
//! `proptest-state-machine` generates sequences of [`Step`]s: policy writes (random VMs,
//! ports, protocols, allowed prefixes and maxima, sometimes an unregistered VM or one of
//! the other policy) and deletes, initiates (mostly fitting the policy, sometimes not:
//! a port it does not protect, a source outside the allowed prefixes, a duration over
//! the maximum, an end time past it, a VM the caller may not touch), revokes (by the
//! requestor, or by someone else with or without the right; all ports or a selection),
//! simulated time passing (often to exactly a grant's end, or a second either side)
//! with or without `expire_due(now)`, store restarts (the
//! backend reopens the same database), and bursts: a few writes sent together, which
//! a backend that groups commits (SQLite's writer) may commit in one transaction,
//! chosen so that their order does not matter. Policy keys and VM ids are sometimes
//! spelled upper-case (they compare case-insensitively). [`StoreUnderTest`] applies each step
//! through the [`Store`] trait and, after every step, compares with the model:
//!
//! - the step's outcome: acceptance or the refusal and the field it names, the created
//!   request, the ports a revoke, an expiry or a policy change ended (with reasons);
//! - every VM's live grants (request, requestor, port, protocol, source, start, end) and
//!   their count;
//! - every request with every port's status and reason, newest first, and the requests
//!   live now;
//! - each policy as written, the requests of its current incarnation, which policy
//!   protects each VM, the earliest end among initiated ports;
//! - how many audit events the step appended (and the chain verifies after restarts and
//!   at the end).
//!
//! Revoking someone else's request needs the revoke right, which the controller checks
//! before calling the store (the store's `revoke_request` takes no assignments); the
//! harness makes that check as the controller does, with core's `plan_revoke` and
//! `rbac::is_allowed`, and the model predicts it from its own table of rights.
//!
//! The number of cases is `PROPTEST_CASES` (default [`DEFAULT_CASES`]); sequences have
//! up to [`MAX_STEPS`] steps. A failure prints the shortest sequence found.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::Poll;

use proptest::prelude::*;
use proptest::sample::{Index, select, subsequence};
use proptest::strategy::Union;
use proptest::test_runner::{Config, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use tokio::runtime::Runtime;

use async_trait::async_trait;
use jitgate_core::rbac::{Action, is_allowed};
use jitgate_core::request::{RevokeRefusal, plan_revoke};

use super::*;

/// Cases when `PROPTEST_CASES` is not set: enough to find the lifecycle's corners in a
/// few seconds of the normal `cargo test`.
pub const DEFAULT_CASES: u32 = 32;
/// The longest sequence of steps in a case.
pub const MAX_STEPS: usize = 30;

/// How a backend is created and reopened (a restart) for the model.
#[async_trait]
pub trait ModelBackend: 'static {
    /// What holds the database between restarts (a temporary directory, a schema);
    /// dropped at the end of the case, after the store.
    type Data: Send + Sync;
    /// A new, empty database.
    async fn create() -> Self::Data;
    /// Opens a store on `data`: the first time, and again after each restart.
    async fn open(data: &Self::Data) -> Box<dyn Store>;
}

/// Runs the model test on backend `B`; panics with the shortest failing sequence found.
pub fn run<B: ModelBackend>() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let config = Config {
        cases,
        // Every case runs on a real database: a failure prints its shortest sequence,
        // which becomes a focused regression test, rather than a seed file.
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(
        &LifecycleRef::sequential_strategy(1..=MAX_STEPS),
        |(state, steps, seen)| {
            StoreUnderTest::<B>::test_sequential(config.clone(), state, steps, seen);
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("the store disagrees with the lifecycle model: {e}\n{runner}");
    }
}

// ---- the world ----------------------------------------------------------------------

const GROUP: &str = "rg";
/// The VMs; the last one is never registered.
const VMS: [&str; 4] = ["vm0", "vm1", "vm2", "vm3"];
const REGISTERED: usize = 3;
const PORTS: [u16; 3] = [22, 3389, 8080];
const POLICIES: [&str; 2] = ["p0", "p1"];
/// Policy maxima, in seconds, with the text written.
const MAXIMA: [(i64, &str); 3] = [(300, "PT5M"), (900, "PT15M"), (3600, "PT1H")];
/// How far past the maximum a client's end time may reach (clock skew); the grant still
/// ends at the maximum.
const END_SKEW: i64 = 60;

fn model_vm(i: usize) -> VmId {
    vm(GROUP, VMS[i])
}

fn policy_key(p: usize) -> PolicyKey {
    pkey(GROUP, "westeurope", POLICIES[p])
}

/// The VM's id as a step spells it.
fn spelled_vm(i: usize, loud: bool) -> VmId {
    if loud {
        shout(&model_vm(i))
    } else {
        model_vm(i)
    }
}

/// The policy's key as a step spells it.
fn spelled_key(p: usize, loud: bool) -> PolicyKey {
    if loud {
        shout_key(&policy_key(p))
    } else {
        policy_key(p)
    }
}

/// Source prefixes that nest, so that "inside the allowed prefix" and "same source"
/// differ often.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Src {
    Any,
    Ten,
    TenOne,
    /// The office's address, 10.1.2.3.
    Office,
    Lan,
    /// The home address, 192.168.7.7.
    Home,
}

const SRCS: [Src; 6] = [
    Src::Any,
    Src::Ten,
    Src::TenOne,
    Src::Office,
    Src::Lan,
    Src::Home,
];

impl Src {
    fn text(self) -> &'static str {
        match self {
            Src::Any => "*",
            Src::Ten => "10.0.0.0/8",
            Src::TenOne => "10.1.0.0/16",
            Src::Office => "10.1.2.3/32",
            Src::Lan => "192.168.0.0/16",
            Src::Home => "192.168.7.7/32",
        }
    }

    /// Whether every address of `self` is inside `outer`, written out by hand.
    fn within(self, outer: Src) -> bool {
        use Src::*;
        match outer {
            Any => true,
            Ten => matches!(self, Ten | TenOne | Office),
            TenOne => matches!(self, TenOne | Office),
            Office => self == Office,
            Lan => matches!(self, Lan | Home),
            Home => self == Home,
        }
    }

    fn of(p: &SourcePrefix) -> Src {
        SRCS.into_iter()
            .find(|s| prefix(s.text()) == *p)
            .unwrap_or_else(|| panic!("the store returned a source the model never used: {p}"))
    }
}

/// Where an initiate comes from: "my IP" is the caller's host prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Office,
    Home,
}

impl Caller {
    fn ip(self) -> IpAddr {
        ip(match self {
            Caller::Office => "10.1.2.3",
            Caller::Home => "192.168.7.7",
        })
    }

    fn src(self) -> Src {
        match self {
            Caller::Office => Src::Office,
            Caller::Home => Src::Home,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Any,
}

impl Proto {
    fn text(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Any => "*",
        }
    }

    fn of(p: Protocol) -> Proto {
        match p {
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
            Protocol::Any => Proto::Any,
        }
    }
}

/// The principals. Their role assignments (given to the store) and their rights (the
/// model's own table) are side by side in `Who::assignments` and the `may_*` methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Owner of the subscription.
    Alice,
    /// JIT Requester on the resource group.
    Bob,
    /// JIT Requester on vm0 only.
    Carol,
    /// Reader of the subscription.
    Dave,
    /// JIT Administrator on vm1 only.
    Erin,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Alice => OWNER,
            Who::Bob => "bob",
            Who::Carol => "carol",
            Who::Dave => "dave",
            Who::Erin => "erin",
        }
    }

    fn assignments(self) -> Vec<RoleAssignment> {
        let (role, scope) = match self {
            Who::Alice => (Role::Owner, Scope::Subscription(sub())),
            Who::Bob => (Role::JitRequester, Scope::ResourceGroup(sub(), rg(GROUP))),
            Who::Carol => (Role::JitRequester, Scope::Vm(model_vm(0))),
            Who::Dave => (Role::Reader, Scope::Subscription(sub())),
            Who::Erin => (Role::JitAdministrator, Scope::Vm(model_vm(1))),
        };
        assignment(self.name(), role, scope)
    }

    /// Owners, JIT Requesters and JIT Administrators may initiate where they are
    /// assigned; Readers nowhere.
    fn may_initiate(self, vm: usize) -> bool {
        match self {
            Who::Alice | Who::Bob => true,
            Who::Carol => vm == 0,
            Who::Dave => false,
            Who::Erin => vm == 1,
        }
    }

    /// Owners and JIT Administrators may revoke other people's requests where they are
    /// assigned (anyone may revoke their own).
    fn may_revoke_others(self, vm: usize) -> bool {
        match self {
            Who::Alice => true,
            Who::Erin => vm == 1,
            Who::Bob | Who::Carol | Who::Dave => false,
        }
    }
}

// ---- steps --------------------------------------------------------------------------

/// A port rule of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub port: u16,
    pub protocol: Proto,
    /// One or two prefixes.
    pub allowed: Vec<Src>,
    /// Index into the maxima (5 minutes, 15 minutes, an hour).
    pub max: usize,
}

impl Rule {
    fn max_secs(&self) -> i64 {
        MAXIMA[self.max].0
    }

    fn permits(&self, source: Src) -> bool {
        self.allowed.iter().any(|a| source.within(*a))
    }
}

/// How long a requested port should stay open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `duration`: seconds from now.
    Duration(i64),
    /// `endTimeUtc`: now plus this many seconds.
    At(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub port: u16,
    /// `None`: "my IP", the caller's address.
    pub source: Option<Src>,
    pub end: End,
}

/// `shout`: the policy key and VM ids are spelled upper-case (ids compare
/// case-insensitively, as in Azure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    PutPolicy {
        policy: usize,
        vms: Vec<(usize, Vec<Rule>)>,
        shout: bool,
    },
    DeletePolicy {
        policy: usize,
        shout: bool,
    },
    Initiate {
        id: u128,
        policy: usize,
        shout: bool,
        who: Who,
        caller: Caller,
        vms: Vec<(usize, Vec<Want>)>,
    },
    /// Revokes the `request`-th accepted request (`None`: an id nobody used).
    Revoke {
        request: Option<usize>,
        by: Who,
        /// `vm` and `port` of a selection; `None` revokes every port.
        only: Option<(Option<usize>, Option<u16>)>,
    },
    /// Time passes; `expire` calls `expire_due(now)`.
    Advance {
        secs: i64,
        expire: bool,
    },
    Restart,
    /// Writes sent together, which the backend may commit in one group; they are chosen
    /// so that their order does not matter.
    Burst(Vec<Step>),
}

// ---- the model ----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Expired,
    UserRequested,
    NewerRequestInitiated,
    PolicyChanged,
}

impl Reason {
    fn of(r: RevokeReason) -> Reason {
        match r {
            RevokeReason::Expired => Reason::Expired,
            RevokeReason::UserRequested => Reason::UserRequested,
            RevokeReason::NewerRequestInitiated => Reason::NewerRequestInitiated,
            RevokeReason::PolicyChanged => Reason::PolicyChanged,
            RevokeReason::ApprovalExpired | RevokeReason::Cancelled => {
                panic!("the model makes no approval rules, yet a port ended as {r:?}")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Initiated,
    Revoked(Reason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPort {
    pub port: u16,
    pub protocol: Proto,
    pub source: Src,
    /// Seconds after `t0`.
    pub end: i64,
    pub status: Status,
}

impl ModelPort {
    fn live(&self, now: i64) -> bool {
        self.status == Status::Initiated && self.end > now
    }
}

/// A request as the store shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestView {
    pub id: u128,
    pub requestor: String,
    pub start: i64,
    pub vms: Vec<(usize, Vec<ModelPort>)>,
}

#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub view: RequestView,
    pub who: Who,
    pub policy: usize,
    /// Which incarnation of the policy (a policy deleted and created again is new).
    pub generation: u32,
    /// The burst it was made in, if any.
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPolicy {
    pub vms: Vec<(usize, Vec<Rule>)>,
    pub generation: u32,
}

impl ModelPolicy {
    fn rules(&self, vm: usize) -> Option<&[Rule]> {
        self.vms
            .iter()
            .find(|(v, _)| *v == vm)
            .map(|(_, r)| r.as_slice())
    }

    /// Whether a live grant keeps running under this policy: the VM keeps a rule for the
    /// port, whose protocol is the grant's or both, and whose prefixes contain its source.
    fn keeps(&self, vm: usize, p: &ModelPort) -> bool {
        self.rules(vm)
            .and_then(|rules| rules.iter().find(|r| r.port == p.port))
            .is_some_and(|r| {
                (r.protocol == Proto::Any || r.protocol == p.protocol) && r.permits(p.source)
            })
    }
}

/// A port a step ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ended {
    pub request: u128,
    pub vm: usize,
    pub port: u16,
    pub source: Src,
    pub end: i64,
    pub reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    PolicyNotFound,
    /// The caller may not initiate on a VM: the field and the VM.
    Forbidden(String, usize),
    /// An invalid initiate: the field named.
    Invalid(String),
    UnknownVm(String),
    VmInOtherPolicy(String),
    /// The controller's check: revoking someone else's request without the right.
    RevokeForbidden,
    NotFound,
    NothingLive,
}

/// What a step answered, in the model's terms (lists of ended ports sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    None,
    PolicyPut {
        created: bool,
        previous: Vec<usize>,
        ended: Vec<Ended>,
    },
    PolicyDeleted(Option<(Vec<usize>, Vec<Ended>)>),
    Initiated(RequestView),
    Revoked(Vec<Ended>),
    Expired(Vec<Ended>),
    Refused(Refusal),
    TimePassed,
    Restarted,
    Burst(Vec<Outcome>),
}

#[derive(Debug, Clone)]
pub struct State {
    /// Seconds after `t0`.
    pub now: i64,
    pub policies: [Option<ModelPolicy>; 2],
    generations: [u32; 2],
    /// Accepted requests, oldest first.
    pub requests: Vec<ModelRequest>,
    next_id: u128,
    /// Bursts so far, and the one being applied.
    bursts: u32,
    burst: Option<u32>,
    /// Audit events appended since the setup.
    pub audit: u64,
    /// What the last step should have answered.
    pub last: Outcome,
}

impl Default for State {
    fn default() -> Self {
        State {
            now: 0,
            policies: [None, None],
            generations: [0, 0],
            requests: Vec::new(),
            next_id: 1,
            bursts: 0,
            burst: None,
            audit: 0,
            last: Outcome::None,
        }
    }
}

impl State {
    /// Ends the initiated ports that `pick(requestor, request, vm, port)` selects, one
    /// audit event each.
    fn end_where(
        &mut self,
        reason: Reason,
        pick: impl Fn(Who, u128, usize, &ModelPort) -> bool,
    ) -> Vec<Ended> {
        let mut out = Vec::new();
        for r in &mut self.requests {
            for (vm, ports) in &mut r.view.vms {
                for p in ports.iter_mut() {
                    if p.status == Status::Initiated && pick(r.who, r.view.id, *vm, p) {
                        p.status = Status::Revoked(reason);
                        out.push(Ended {
                            request: r.view.id,
                            vm: *vm,
                            port: p.port,
                            source: p.source,
                            end: p.end,
                            reason,
                        });
                    }
                }
            }
        }
        self.audit += out.len() as u64;
        out.sort();
        out
    }

    fn put_policy(&mut self, policy: usize, vms: &[(usize, Vec<Rule>)]) -> Outcome {
        for (i, (vm, _)) in vms.iter().enumerate() {
            let field = format!("properties.virtualMachines[{i}].id");
            if *vm >= REGISTERED {
                return Outcome::Refused(Refusal::UnknownVm(field));
            }
            let other = &self.policies[1 - policy];
            if other.as_ref().is_some_and(|o| o.rules(*vm).is_some()) {
                return Outcome::Refused(Refusal::VmInOtherPolicy(field));
            }
        }
        let now = self.now;
        let old = self.policies[policy].take();
        let generation = match &old {
            Some(o) => o.generation,
            None => {
                self.generations[policy] += 1;
                self.generations[policy]
            }
        };
        let new = ModelPolicy {
            vms: vms.to_vec(),
            generation,
        };
        let (previous, ended) = match &old {
            None => (Vec::new(), Vec::new()),
            Some(o) => {
                let on_old: Vec<usize> = o.vms.iter().map(|(v, _)| *v).collect();
                let ended = self.end_where(Reason::PolicyChanged, |_, _, vm, p| {
                    p.live(now) && on_old.contains(&vm) && !new.keeps(vm, p)
                });
                let mut previous = on_old;
                previous.sort();
                (previous, ended)
            }
        };
        self.policies[policy] = Some(new);
        self.audit += 1;
        Outcome::PolicyPut {
            created: old.is_none(),
            previous,
            ended,
        }
    }

    fn delete_policy(&mut self, policy: usize) -> Outcome {
        let Some(old) = self.policies[policy].take() else {
            return Outcome::PolicyDeleted(None);
        };
        let now = self.now;
        let mut vms: Vec<usize> = old.vms.iter().map(|(v, _)| *v).collect();
        let ended = self.end_where(Reason::PolicyChanged, |_, _, vm, p| {
            p.live(now) && vms.contains(&vm)
        });
        self.audit += 1;
        vms.sort();
        Outcome::PolicyDeleted(Some((vms, ended)))
    }

    fn initiate(
        &mut self,
        id: u128,
        policy: usize,
        who: Who,
        caller: Caller,
        vms: &[(usize, Vec<Want>)],
    ) -> Outcome {
        let refuse = |r| Outcome::Refused(r);
        let Some(pol) = &self.policies[policy] else {
            return refuse(Refusal::PolicyNotFound);
        };
        let now = self.now;
        let mut granted: Vec<(usize, Vec<ModelPort>)> = Vec::new();
        for (i, (vm, wants)) in vms.iter().enumerate() {
            let field = format!("virtualMachines[{i}]");
            if !who.may_initiate(*vm) {
                return refuse(Refusal::Forbidden(format!("{field}.id"), *vm));
            }
            if granted.iter().any(|(v, _)| v == vm) {
                return refuse(Refusal::Invalid(format!("{field}.id")));
            }
            let Some(rules) = pol.rules(*vm) else {
                return refuse(Refusal::Invalid(format!("{field}.id")));
            };
            let mut ports: Vec<ModelPort> = Vec::new();
            for (j, w) in wants.iter().enumerate() {
                let f = format!("{field}.ports[{j}]");
                if ports.iter().any(|p| p.port == w.port) {
                    return refuse(Refusal::Invalid(format!("{f}.number")));
                }
                let Some(rule) = rules.iter().find(|r| r.port == w.port) else {
                    return refuse(Refusal::Invalid(format!("{f}.number")));
                };
                let max = rule.max_secs();
                let end = match w.end {
                    End::Duration(s) if s <= 0 || s > max => {
                        return refuse(Refusal::Invalid(format!("{f}.duration")));
                    }
                    End::Duration(s) => now + s,
                    End::At(off) if off <= 0 || off > max + END_SKEW => {
                        return refuse(Refusal::Invalid(format!("{f}.endTimeUtc")));
                    }
                    End::At(off) => now + off.min(max),
                };
                let source = w.source.unwrap_or(caller.src());
                if !rule.permits(source) {
                    return refuse(Refusal::Invalid(format!("{f}.allowedSourceAddressPrefix")));
                }
                ports.push(ModelPort {
                    port: w.port,
                    protocol: rule.protocol,
                    source,
                    end,
                    status: Status::Initiated,
                });
            }
            granted.push((*vm, ports));
        }
        let generation = pol.generation;
        // The same requestor's live grants for the same VM, port and source end; other
        // people's never do.
        self.end_where(Reason::NewerRequestInitiated, |requestor, _, vm, p| {
            requestor == who
                && p.live(now)
                && granted.iter().any(|(v, ports)| {
                    *v == vm
                        && ports
                            .iter()
                            .any(|q| q.port == p.port && q.source == p.source)
                })
        });
        self.audit += granted.len() as u64;
        let view = RequestView {
            id,
            requestor: who.name().to_owned(),
            start: now,
            vms: granted,
        };
        self.requests.push(ModelRequest {
            view: view.clone(),
            who,
            policy,
            generation,
            burst: self.burst,
        });
        Outcome::Initiated(view)
    }

    fn revoke(
        &mut self,
        request: Option<usize>,
        by: Who,
        only: Option<(Option<usize>, Option<u16>)>,
    ) -> Outcome {
        let Some(i) = request else {
            return Outcome::Refused(Refusal::NotFound);
        };
        let (only_vm, only_port) = only.unwrap_or((None, None));
        let target = &self.requests[i];
        if by != target.who
            && target
                .view
                .vms
                .iter()
                .filter(|(vm, _)| only_vm.is_none_or(|o| o == *vm))
                .any(|(vm, _)| !by.may_revoke_others(*vm))
        {
            return Outcome::Refused(Refusal::RevokeForbidden);
        }
        let id = target.view.id;
        let now = self.now;
        let ended = self.end_where(Reason::UserRequested, |_, request, vm, p| {
            request == id
                && p.live(now)
                && only_vm.is_none_or(|o| o == vm)
                && only_port.is_none_or(|o| o == p.port)
        });
        if ended.is_empty() {
            Outcome::Refused(Refusal::NothingLive)
        } else {
            Outcome::Revoked(ended)
        }
    }

    fn advance(&mut self, secs: i64, expire: bool) -> Outcome {
        self.now += secs;
        if !expire {
            return Outcome::TimePassed;
        }
        let now = self.now;
        Outcome::Expired(self.end_where(Reason::Expired, |_, _, _, p| p.end <= now))
    }

    fn live_grants(&self, vm: usize) -> Vec<GrantView> {
        let mut out: Vec<GrantView> = self
            .requests
            .iter()
            .flat_map(|r| {
                r.view
                    .vms
                    .iter()
                    .filter(|(v, _)| *v == vm)
                    .flat_map(|(_, ports)| ports)
                    .filter(|p| p.live(self.now))
                    .map(|p| GrantView {
                        request: r.view.id,
                        requestor: r.view.requestor.clone(),
                        port: p.port,
                        protocol: p.protocol,
                        source: p.source,
                        start: r.view.start,
                        end: p.end,
                    })
            })
            .collect();
        out.sort();
        out
    }

    /// `items` (requests or their ids, newest first) with the requests made in one
    /// burst ordered by id: the store may commit a burst's writes in any order.
    fn canon<T>(&self, mut items: Vec<T>, id: impl Fn(&T) -> u128) -> Vec<T> {
        let burst_of = |t: &T| {
            self.requests
                .iter()
                .find(|r| r.view.id == id(t))
                .and_then(|r| r.burst)
        };
        let mut i = 0;
        while i < items.len() {
            let b = burst_of(&items[i]);
            let mut j = i + 1;
            while b.is_some() && j < items.len() && burst_of(&items[j]) == b {
                j += 1;
            }
            items[i..j].sort_by_key(|t| id(t));
            i = j;
        }
        items
    }

    fn is_live(&self, r: &ModelRequest) -> bool {
        r.view
            .vms
            .iter()
            .flat_map(|(_, ports)| ports)
            .any(|p| p.live(self.now))
    }
}

/// A live grant as `live_grants` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GrantView {
    pub request: u128,
    pub requestor: String,
    pub port: u16,
    pub protocol: Proto,
    pub source: Src,
    pub start: i64,
    pub end: i64,
}

// ---- generation ---------------------------------------------------------------------

/// The reference state machine: generates steps from the model's state and applies
/// them to it.
pub struct LifecycleRef;

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![
        5 => Just(Who::Alice),
        5 => Just(Who::Bob),
        2 => Just(Who::Carol),
        1 => Just(Who::Dave),
        1 => Just(Who::Erin),
    ]
}

fn rule(port: u16) -> impl Strategy<Value = Rule> {
    let protocol = prop_oneof![3 => Just(Proto::Tcp), 1 => Just(Proto::Udp), 1 => Just(Proto::Any)];
    let allowed = prop_oneof![
        3 => Just(Src::Any),
        3 => Just(Src::Ten),
        2 => Just(Src::TenOne),
        1 => Just(Src::Office),
        1 => Just(Src::Lan),
        1 => Just(Src::Home),
    ];
    (
        protocol,
        prop::collection::vec(allowed, 1..=2),
        0..MAXIMA.len(),
    )
        .prop_map(move |(protocol, mut allowed, max)| {
            allowed.dedup();
            Rule {
                port,
                protocol,
                allowed,
                max,
            }
        })
}

fn put_policy() -> BoxedStrategy<Step> {
    let vms = (
        prop_oneof![
            1 => Just(Vec::new()),
            9 => subsequence((0..REGISTERED).collect::<Vec<_>>(), 1..=REGISTERED),
        ],
        prop::bool::weighted(0.1),
    )
        .prop_map(|(mut vms, stranger)| {
            if stranger {
                vms.push(REGISTERED);
            }
            vms
        })
        .prop_shuffle();
    (0..POLICIES.len(), vms, prop::bool::weighted(0.2))
        .prop_flat_map(|(policy, vms, shout)| {
            let rules: Vec<_> = vms
                .into_iter()
                .map(|vm| {
                    subsequence(PORTS.to_vec(), 1..=PORTS.len())
                        .prop_flat_map(|ports| ports.into_iter().map(rule).collect::<Vec<_>>())
                        .prop_map(move |rules| (vm, rules))
                })
                .collect();
            (Just(policy), rules, Just(shout))
        })
        .prop_map(|(policy, vms, shout)| Step::PutPolicy { policy, vms, shout })
        .boxed()
}

fn end() -> impl Strategy<Value = End> {
    // Exact maxima and the skew's edge come up often, and so do values past them.
    prop_oneof![
        3 => prop_oneof![Just(60), Just(300), Just(900), Just(3600), 0..=4000i64]
            .prop_map(End::Duration),
        1 => prop_oneof![Just(360), Just(361), Just(960), Just(3660), Just(3661), -5..=4000i64]
            .prop_map(End::At),
    ]
}

/// One requested port before the policy is known: which port, source and end to pick
/// among those the policy allows, and whether to stray from them.
#[derive(Debug, Clone)]
struct RawWant {
    port: Index,
    stray_port: bool,
    source: Index,
    stray_source: bool,
    end: End,
    stray_end: bool,
}

fn raw_want() -> impl Strategy<Value = RawWant> {
    (
        (any::<Index>(), prop::bool::weighted(0.05)),
        (any::<Index>(), prop::bool::weighted(0.1)),
        (end(), prop::bool::weighted(0.15)),
    )
        .prop_map(
            |((port, stray_port), (source, stray_source), (end, stray_end))| RawWant {
                port,
                stray_port,
                source,
                stray_source,
                end,
                stray_end,
            },
        )
}

impl RawWant {
    /// The port the raw choices pick under `rules` (the VM's rules, if any): inside
    /// the policy unless told to stray.
    fn pick(&self, rules: Option<&[Rule]>, caller: Caller) -> Want {
        let Some(rule) = rules
            .filter(|_| !self.stray_port)
            .map(|r| &r[self.port.index(r.len())])
        else {
            let mut sources = vec![None];
            sources.extend(SRCS.map(Some));
            return Want {
                port: PORTS[self.port.index(PORTS.len())],
                source: sources[self.source.index(sources.len())],
                end: self.end,
            };
        };
        let mut sources: Vec<Option<Src>> = Vec::new();
        if self.stray_source || rule.permits(caller.src()) {
            sources.push(None);
        }
        sources.extend(
            SRCS.into_iter()
                .filter(|s| self.stray_source || rule.permits(*s))
                .map(Some),
        );
        let max = rule.max_secs();
        let end = match self.end {
            _ if self.stray_end => self.end,
            // Within the maximum (the end time up to the skew past it), the
            // maximum itself often.
            End::Duration(d) => End::Duration(if d % 3 == 0 {
                max
            } else {
                1 + d.rem_euclid(max)
            }),
            End::At(a) => End::At(if a % 3 == 0 {
                max + END_SKEW
            } else {
                1 + a.rem_euclid(max + END_SKEW)
            }),
        };
        Want {
            port: rule.port,
            source: sources[self.source.index(sources.len())],
            end,
        }
    }
}

/// Mostly an initiate the policy allows (an existing policy, its VMs, ports, sources,
/// durations), sometimes straying (another policy, VM or port, a source outside the
/// allowed prefixes, a duration past the maximum), and refused too when the caller
/// may not initiate there.
fn initiate(state: &State) -> BoxedStrategy<Step> {
    let policies = state.policies.clone();
    let id = state.next_id;
    let vm = (
        any::<Index>(),
        prop::bool::weighted(0.05),
        prop::collection::vec(raw_want(), 1..=2),
    );
    (
        any::<Index>(),
        prop::bool::weighted(0.05),
        who(),
        prop_oneof![Just(Caller::Office), Just(Caller::Home)],
        prop::collection::vec(vm, 1..=2),
        prop::bool::weighted(0.2),
    )
        .prop_map(move |(pi, stray_policy, who, caller, raw, shout)| {
            let existing: Vec<usize> = (0..POLICIES.len())
                .filter(|p| policies[*p].is_some())
                .collect();
            let policy = if existing.is_empty() || stray_policy {
                pi.index(POLICIES.len())
            } else {
                existing[pi.index(existing.len())]
            };
            let pol = policies[policy].as_ref().filter(|p| !p.vms.is_empty());
            // Each VM and port once, unless straying.
            let mut vms: Vec<(usize, Vec<Want>)> = Vec::new();
            for (vi, stray_vm, raw_wants) in raw {
                let vm = match pol {
                    Some(p) if !stray_vm => p.vms[vi.index(p.vms.len())].0,
                    _ => vi.index(REGISTERED),
                };
                if !stray_vm && vms.iter().any(|(v, _)| *v == vm) {
                    continue;
                }
                let rules = pol.and_then(|p| p.rules(vm));
                let mut wants: Vec<Want> = Vec::new();
                for w in &raw_wants {
                    let want = w.pick(rules, caller);
                    if w.stray_port || !wants.iter().any(|x| x.port == want.port) {
                        wants.push(want);
                    }
                }
                vms.push((vm, wants));
            }
            Step::Initiate {
                id,
                policy,
                shout,
                who,
                caller,
                vms,
            }
        })
        .boxed()
}

/// Mostly by the requestor, sometimes by anybody; sometimes a selection; rarely an
/// unknown id.
fn revoke(state: &State) -> BoxedStrategy<Step> {
    let requestors: Vec<Who> = state.requests.iter().map(|r| r.who).collect();
    // Mostly a request with a port still initiated (live, or ended and not yet
    // expired); the others can only answer "nothing live".
    let open: Vec<usize> = (0..state.requests.len())
        .filter(|i| {
            state.requests[*i]
                .view
                .vms
                .iter()
                .flat_map(|(_, ports)| ports)
                .any(|p| p.status == Status::Initiated)
        })
        .collect();
    let only = (
        prop::option::of(0..REGISTERED),
        prop::option::of(select(PORTS.to_vec())),
    );
    (
        any::<Index>(),
        prop::bool::weighted(0.2),
        prop::option::weighted(0.4, who()),
        prop::option::weighted(0.3, only),
        prop::bool::weighted(0.05),
    )
        .prop_map(move |(i, any_request, by, only, unknown)| {
            let idx = if open.is_empty() || any_request {
                i.index(requestors.len())
            } else {
                open[i.index(open.len())]
            };
            Step::Revoke {
                request: (!unknown).then_some(idx),
                by: by.unwrap_or(requestors[idx]),
                only,
            }
        })
        .boxed()
}

/// Seconds to minutes, or (often, when something is live) exactly to a live grant's
/// end, a second before or a second after: the boundaries where "live" and "expired"
/// meet.
fn advance(state: &State) -> BoxedStrategy<Step> {
    let now = state.now;
    let ends: Vec<i64> = state
        .requests
        .iter()
        .flat_map(|r| r.view.vms.iter().flat_map(|(_, ports)| ports))
        .filter(|p| p.live(now))
        .map(|p| p.end - now)
        .collect();
    let secs = prop_oneof![
        1 => Just(0i64),
        3 => 1..=59i64,
        4 => (1..=20i64).prop_map(|m| m * 60),
        2 => 600..=4000i64,
    ];
    let secs = if ends.is_empty() {
        secs.boxed()
    } else {
        prop_oneof![
            1 => secs,
            1 => (any::<Index>(), -1..=1i64)
                .prop_map(move |(i, delta)| ends[i.index(ends.len())] + delta),
        ]
        .boxed()
    };
    (secs, prop::bool::weighted(0.6))
        .prop_map(|(secs, expire)| Step::Advance { secs, expire })
        .boxed()
}

/// Writes sent together. So that the model need not know which order the backend
/// commits them in, they commute: initiates by different requestors (one never ends
/// another's grants, and initiates change nothing another initiate checks), revokes by
/// their requestors (no rights to look up first) of different requests that none of
/// those initiators made, and the expiry of what has already ended (initiates and
/// revokes touch only live grants).
fn burst(state: &State) -> BoxedStrategy<Step> {
    let mut parts = vec![
        (4, initiate(state)),
        (
            1,
            Just(Step::Advance {
                secs: 0,
                expire: true,
            })
            .boxed(),
        ),
    ];
    if !state.requests.is_empty() {
        parts.push((3, revoke(state)));
    }
    let first_id = state.next_id;
    let requestors: Vec<Who> = state.requests.iter().map(|r| r.who).collect();
    prop::collection::vec(Union::new_weighted(parts), 2..=4)
        .prop_map(move |steps| {
            let mut steps: Vec<Step> = steps
                .into_iter()
                .zip(first_id..)
                .map(|(step, fresh)| match step {
                    Step::Initiate {
                        id: _,
                        policy,
                        shout,
                        who,
                        caller,
                        vms,
                    } => Step::Initiate {
                        id: fresh,
                        policy,
                        shout,
                        who,
                        caller,
                        vms,
                    },
                    Step::Revoke {
                        request: Some(i),
                        only,
                        ..
                    } => Step::Revoke {
                        request: Some(i),
                        by: requestors[i],
                        only,
                    },
                    other => other,
                })
                .collect();
            // Keep the longest prefix that commutes.
            let n = order_free_with(&requestors, &steps);
            steps.truncate(n);
            Step::Burst(steps)
        })
        .boxed()
}

/// How many of `steps`, from the first, commute (see [`burst`]).
fn order_free(state: &State, steps: &[Step]) -> usize {
    let requestors: Vec<Who> = state.requests.iter().map(|r| r.who).collect();
    order_free_with(&requestors, steps)
}

fn order_free_with(requestors: &[Who], steps: &[Step]) -> usize {
    let mut initiators: Vec<Who> = Vec::new();
    let mut revoked: Vec<usize> = Vec::new();
    let mut ids: Vec<u128> = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let fits = match step {
            Step::Initiate { id, who, .. } => {
                let fits = !initiators.contains(who)
                    && !revoked.iter().any(|i| requestors.get(*i) == Some(who))
                    && !ids.contains(id);
                initiators.push(*who);
                ids.push(*id);
                fits
            }
            Step::Revoke { request: None, .. } => true,
            Step::Revoke {
                request: Some(i),
                by,
                ..
            } => {
                let fits = requestors.get(*i) == Some(by)
                    && !revoked.contains(i)
                    && !initiators.contains(by);
                revoked.push(*i);
                fits
            }
            Step::Advance {
                secs: 0,
                expire: true,
            } => true,
            _ => false,
        };
        if !fits {
            return n;
        }
    }
    steps.len()
}

impl ReferenceStateMachine for LifecycleRef {
    type State = State;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<State> {
        Just(State::default()).boxed()
    }

    fn transitions(state: &State) -> BoxedStrategy<Step> {
        // A policy first: without one every initiate is refused.
        let no_policy = state
            .policies
            .iter()
            .all(|p| p.as_ref().is_none_or(|p| p.vms.is_empty()));
        let mut steps = vec![
            (if no_policy { 12 } else { 2 }, put_policy()),
            (
                1,
                (0..POLICIES.len(), prop::bool::weighted(0.2))
                    .prop_map(|(policy, shout)| Step::DeletePolicy { policy, shout })
                    .boxed(),
            ),
            (6, initiate(state)),
            (3, advance(state)),
            (1, Just(Step::Restart).boxed()),
        ];
        if !state.requests.is_empty() {
            steps.push((3, revoke(state)));
        }
        if !no_policy {
            steps.push((2, burst(state)));
        }
        Union::new_weighted(steps).boxed()
    }

    fn preconditions(state: &State, step: &Step) -> bool {
        match step {
            Step::Revoke {
                request: Some(i), ..
            } => *i < state.requests.len(),
            Step::Initiate { id, .. } => !state.requests.iter().any(|r| r.view.id == *id),
            Step::Burst(steps) => {
                steps.iter().all(|s| Self::preconditions(state, s))
                    && order_free(state, steps) == steps.len()
            }
            _ => true,
        }
    }

    fn apply(mut state: State, step: &Step) -> State {
        state.last = state.step(step);
        state
    }
}

impl State {
    /// Applies a step to the model and says what the store should answer.
    fn step(&mut self, step: &Step) -> Outcome {
        let out = match step {
            Step::PutPolicy { policy, vms, .. } => self.put_policy(*policy, vms),
            Step::DeletePolicy { policy, .. } => self.delete_policy(*policy),
            Step::Initiate {
                id,
                policy,
                who,
                caller,
                vms,
                ..
            } => self.initiate(*id, *policy, *who, *caller, vms),
            Step::Revoke { request, by, only } => self.revoke(*request, *by, *only),
            Step::Advance { secs, expire } => self.advance(*secs, *expire),
            Step::Restart => Outcome::Restarted,
            Step::Burst(steps) => {
                self.bursts += 1;
                self.burst = Some(self.bursts);
                let out = steps.iter().map(|s| self.step(s)).collect();
                self.burst = None;
                Outcome::Burst(out)
            }
        };
        if let Step::Initiate { id, .. } = step {
            self.next_id = self.next_id.max(id + 1);
        }
        out
    }
}

// ---- the system under test ------------------------------------------------------------

/// A store of backend `B`, driven step by step and compared with the model.
pub struct StoreUnderTest<B: ModelBackend> {
    // Dropped first: the store, then its data; then the runtime.
    open: Open<B>,
    rt: Runtime,
}

/// The store and what it keeps its data in.
struct Open<B: ModelBackend> {
    store: Option<Box<dyn Store>>,
    data: B::Data,
    /// Audit events written by the setup.
    audit_base: u64,
    _backend: PhantomData<B>,
}

async fn audit_seq(store: &dyn Store) -> u64 {
    store.audit_tail().await.expect("audit_tail failed").0
}

fn secs(t: Timestamp) -> i64 {
    let d = t.duration_since(t0());
    assert_eq!(
        d.subsec_nanos(),
        0,
        "{t} is not a whole second of the simulated clock"
    );
    d.as_secs()
}

fn vm_index(id: &VmId) -> usize {
    (0..VMS.len())
        .find(|i| model_vm(*i) == *id)
        .unwrap_or_else(|| panic!("the store returned a VM the model never used: {id}"))
}

fn id_of(r: RequestId) -> u128 {
    Uuid::parse_str(&r.to_string())
        .expect("a request id is a GUID")
        .as_u128()
}

fn status(s: PortStatus) -> Status {
    match s {
        PortStatus::Initiated => Status::Initiated,
        PortStatus::Revoked(r) => Status::Revoked(Reason::of(r)),
        PortStatus::Pending | PortStatus::Denied => {
            panic!("the model makes no approval rules, yet a port is {s:?}")
        }
    }
}

fn view(r: &AccessRequest) -> RequestView {
    RequestView {
        id: id_of(r.id),
        requestor: r.requestor.clone(),
        start: secs(r.start),
        vms: r
            .vms
            .iter()
            .map(|v| {
                (
                    vm_index(&v.id),
                    v.ports
                        .iter()
                        .map(|p| ModelPort {
                            port: p.number.get(),
                            protocol: Proto::of(p.protocol),
                            source: Src::of(&p.source),
                            end: secs(p.end),
                            status: status(p.status),
                        })
                        .collect(),
                )
            })
            .collect(),
    }
}

fn ended(ports: &[RevokedPort]) -> Vec<Ended> {
    let mut out: Vec<Ended> = ports
        .iter()
        .map(|p| Ended {
            request: id_of(p.request),
            vm: vm_index(&p.vm),
            port: p.number.get(),
            source: Src::of(&p.source),
            end: secs(p.end),
            reason: Reason::of(p.reason),
        })
        .collect();
    out.sort();
    out
}

fn vm_indices(vms: &[VmId]) -> Vec<usize> {
    let mut out: Vec<usize> = vms.iter().map(vm_index).collect();
    out.sort();
    out
}

/// The policy the model describes, as the store is given it.
fn policy_spec(policy: usize, vms: &[(usize, Vec<Rule>)], loud: bool) -> PolicySpec {
    let key = spelled_key(policy, loud);
    let ids: Vec<VmId> = vms.iter().map(|(vm, _)| spelled_vm(*vm, loud)).collect();
    spec_with(
        &key,
        vms.iter()
            .zip(&ids)
            .map(|((_, rules), id)| {
                let ports = rules
                    .iter()
                    .map(|r| {
                        let texts: Vec<String> =
                            r.allowed.iter().map(|s| s.text().to_owned()).collect();
                        let (one, many) = if texts.len() == 1 {
                            (Some(RawPrefix::One(texts[0].clone())), None)
                        } else {
                            (None, Some(texts))
                        };
                        PortRuleInput {
                            number: Some(i64::from(r.port)),
                            protocol: Some(r.protocol.text().into()),
                            allowed_source_address_prefix: one,
                            allowed_source_address_prefixes: many,
                            max_request_access_duration: Some(MAXIMA[r.max].1.into()),
                        }
                    })
                    .collect();
                (id, ports)
            })
            .collect(),
    )
}

fn initiate_input(vms: &[(usize, Vec<Want>)], now: i64, loud: bool) -> InitiateInput {
    InitiateInput {
        virtual_machines: Some(
            vms.iter()
                .map(|(vm, wants)| InitiateVmInput {
                    id: Some(spelled_vm(*vm, loud).to_string()),
                    ports: Some(
                        wants
                            .iter()
                            .map(|w| {
                                let (end_time_utc, duration) = match w.end {
                                    End::Duration(s) => (None, Some(format!("PT{s}S"))),
                                    End::At(off) => (Some(at(now + off).to_string()), None),
                                };
                                InitiatePortInput {
                                    number: Some(i64::from(w.port)),
                                    allowed_source_address_prefix: w
                                        .source
                                        .map(|s| s.text().to_owned()),
                                    end_time_utc,
                                    duration,
                                }
                            })
                            .collect(),
                    ),
                })
                .collect(),
        ),
        justification: Some("model".into()),
    }
}

/// Runs one step (not a restart, nor a burst) on the store, as the controller would.
async fn on(store: &dyn Store, model: &State, step: Step) -> Outcome {
    // Every step happens at the model's time (after it, for `Advance`).
    let now = at(model.now);
    match step {
        Step::PutPolicy { policy, vms, shout } => {
            let spec = policy_spec(policy, &vms, shout);
            match store
                .put_policy(spelled_key(policy, shout), spec, ctx(now))
                .await
            {
                Ok(out) => Outcome::PolicyPut {
                    created: out.created,
                    previous: vm_indices(&out.previous_vms),
                    ended: ended(&out.revoked),
                },
                Err(OpError::Refused(PolicyError::UnknownVm(f))) => {
                    Outcome::Refused(Refusal::UnknownVm(f.field))
                }
                Err(OpError::Refused(PolicyError::VmInOtherPolicy(f))) => {
                    Outcome::Refused(Refusal::VmInOtherPolicy(f.field))
                }
                Err(e) => panic!("put_policy failed: {e:?}"),
            }
        }
        Step::DeletePolicy { policy, shout } => {
            let out = store
                .delete_policy(&spelled_key(policy, shout), ctx(now))
                .await
                .expect("delete_policy failed");
            Outcome::PolicyDeleted(out.map(|d| (vm_indices(&d.vms), ended(&d.revoked))))
        }
        Step::Initiate {
            id,
            policy,
            shout,
            who,
            caller,
            vms,
        } => {
            let args = InitiateArgs {
                policy: spelled_key(policy, shout),
                input: initiate_input(&vms, model.now, shout),
                id: rid(id),
                requestor: who.name().into(),
                caller_ip: caller.ip(),
                assignments: who.assignments(),
                idempotency_key: None,
                break_glass: None,
            };
            match store.initiate(args, ctx_as(who.name(), now)).await {
                Ok(r) => Outcome::Initiated(view(&r)),
                Err(OpError::Refused(InitiateRefusal::PolicyNotFound)) => {
                    Outcome::Refused(Refusal::PolicyNotFound)
                }
                Err(OpError::Refused(InitiateRefusal::Forbidden { field, vm })) => {
                    Outcome::Refused(Refusal::Forbidden(field, vm_index(&vm)))
                }
                Err(OpError::Refused(InitiateRefusal::Invalid(f))) => {
                    Outcome::Refused(Refusal::Invalid(f.field))
                }
                Err(OpError::Store(e)) => panic!("initiate failed: {e}"),
            }
        }
        Step::Revoke { request, by, only } => {
            let id = match request {
                Some(i) => rid(model.requests[i].view.id),
                None => rid(u128::MAX),
            };
            let selector = only.map(|(vm, port)| PortSelector {
                vm: vm.map(model_vm),
                number: port.map(super::port),
            });
            // The controller's check (core's revoke rule): the requestor may end their
            // own request; anyone else needs the revoke right on every VM the
            // selection names. That nothing is live is left for the store to say.
            let stored = store.get_request(id).await.expect("get_request");
            if let Some(r) = &stored
                && let Err(RevokeRefusal::Forbidden { .. }) = plan_revoke(
                    r,
                    by.name(),
                    &selector.clone().unwrap_or_default(),
                    &|vm| {
                        is_allowed(
                            &by.assignments(),
                            by.name(),
                            Action::RequestRevoke,
                            &vm.scope(),
                        )
                    },
                    now,
                )
            {
                return Outcome::Refused(Refusal::RevokeForbidden);
            }
            match store
                .revoke_request(id, selector, ctx_as(by.name(), now))
                .await
            {
                Ok(ports) => Outcome::Revoked(ended(&ports)),
                Err(OpError::Refused(RevokeError::NotFound)) => Outcome::Refused(Refusal::NotFound),
                Err(OpError::Refused(RevokeError::NothingLive)) => {
                    Outcome::Refused(Refusal::NothingLive)
                }
                Err(OpError::Store(e)) => panic!("revoke_request failed: {e}"),
            }
        }
        Step::Advance { expire, .. } => {
            if expire {
                Outcome::Expired(ended(
                    &store.expire_due(now).await.expect("expire_due failed"),
                ))
            } else {
                Outcome::TimePassed
            }
        }
        Step::Restart | Step::Burst(_) => unreachable!("run by Open::step"),
    }
}

/// Polls the futures together, each first in the order given, so that their writes
/// are queued in that order and committed in the same groups as far as the backend
/// groups them; returns their outputs in the same order.
async fn together<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(o) => *out = Some(o),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

impl<B: ModelBackend> Open<B> {
    fn store(&self) -> &dyn Store {
        self.store.as_deref().expect("the store is open")
    }

    async fn step(&mut self, model: &State, step: Step) -> Outcome {
        match step {
            Step::Burst(steps) => {
                let store = self.store();
                Outcome::Burst(together(steps.into_iter().map(|s| on(store, model, s))).await)
            }
            Step::Restart => {
                drop(self.store.take());
                let store = B::open(&self.data).await;
                let report = store.verify_audit(None).await.expect("verify_audit failed");
                assert!(
                    report.ok(),
                    "the audit chain does not verify after a restart: {:?}",
                    report.problems
                );
                self.store = Some(store);
                Outcome::Restarted
            }
            step => on(self.store(), model, step).await,
        }
    }

    /// Everything the store shows about requests, grants and policies, against the model.
    async fn compare(&self, model: &State) {
        let store = self.store();
        let now = at(model.now);
        let mut total = 0;
        for (vm, name) in VMS.iter().enumerate() {
            let mut got: Vec<GrantView> = store
                .live_grants(&model_vm(vm), now)
                .await
                .expect("live_grants failed")
                .iter()
                .map(|g| GrantView {
                    request: id_of(g.request),
                    requestor: g.requestor.clone(),
                    port: g.number.get(),
                    protocol: Proto::of(g.protocol),
                    source: Src::of(&g.source),
                    start: secs(g.start),
                    end: secs(g.end),
                })
                .collect();
            got.sort();
            let want = model.live_grants(vm);
            assert_eq!(got, want, "live grants of {name} at t+{}s", model.now);
            total += want.len() as u64;
        }
        assert_eq!(
            store
                .count_live_grants(now)
                .await
                .expect("count_live_grants"),
            total,
            "count_live_grants at t+{}s",
            model.now
        );

        let all = store
            .list_requests(&RequestFilter {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .expect("list_requests failed");
        let got: Vec<RequestView> = model.canon(all.iter().map(view).collect(), |v| v.id);
        let want: Vec<RequestView> = model.canon(
            model
                .requests
                .iter()
                .rev()
                .map(|r| r.view.clone())
                .collect(),
            |v| v.id,
        );
        assert_eq!(got, want, "requests (newest first) at t+{}s", model.now);

        let live = store
            .list_requests(&RequestFilter {
                live_at: Some(now),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .expect("list_requests(live_at) failed");
        let got: Vec<u128> = model.canon(live.iter().map(|r| id_of(r.id)).collect(), |i| *i);
        let want: Vec<u128> = model.canon(
            model
                .requests
                .iter()
                .rev()
                .filter(|r| model.is_live(r))
                .map(|r| r.view.id)
                .collect(),
            |i| *i,
        );
        assert_eq!(got, want, "requests live at t+{}s", model.now);

        let next = store.next_expiry().await.expect("next_expiry failed");
        let want = model
            .requests
            .iter()
            .flat_map(|r| r.view.vms.iter().flat_map(|(_, ports)| ports))
            .filter(|p| p.status == Status::Initiated)
            .map(|p| p.end)
            .min();
        assert_eq!(next.map(secs), want, "next_expiry at t+{}s", model.now);

        for (p, modelled) in model.policies.iter().enumerate() {
            let key = policy_key(p);
            let got = store.get_policy(&key).await.expect("get_policy failed");
            assert_eq!(
                got.map(|g| g.spec),
                modelled.as_ref().map(|m| policy_spec(p, &m.vms, false)),
                "policy {}",
                POLICIES[p]
            );
            let got: Vec<u128> = store
                .policy_requests(&key, 10_000)
                .await
                .expect("policy_requests failed")
                .iter()
                .map(|r| id_of(r.id))
                .collect();
            let got = model.canon(got, |i| *i);
            let want: Vec<u128> = match modelled {
                None => Vec::new(),
                Some(m) => model
                    .requests
                    .iter()
                    .rev()
                    .filter(|r| r.policy == p && r.generation == m.generation)
                    .map(|r| r.view.id)
                    .collect(),
            };
            let want = model.canon(want, |i| *i);
            assert_eq!(got, want, "requests of policy {}", POLICIES[p]);
        }
        for (vm, name) in VMS.iter().enumerate() {
            let got = store
                .vm_policy(&model_vm(vm))
                .await
                .expect("vm_policy failed")
                .map(|v| v.key.name.as_str().to_ascii_lowercase());
            let want = (0..POLICIES.len())
                .find(|p| {
                    model.policies[*p]
                        .as_ref()
                        .is_some_and(|m| m.rules(vm).is_some())
                })
                .map(|p| POLICIES[p].to_owned());
            assert_eq!(got, want, "the policy protecting {name}");
        }

        assert_eq!(
            audit_seq(store).await,
            self.audit_base + model.audit,
            "audit events: every change and every ended port is one event"
        );
    }
}

impl<B: ModelBackend> StateMachineTest for StoreUnderTest<B> {
    type SystemUnderTest = Self;
    type Reference = LifecycleRef;

    fn init_test(_: &State) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let open = rt.block_on(async {
            let data = B::create().await;
            let store = B::open(&data).await;
            install(&*store).await;
            for i in 0..REGISTERED {
                register(&*store, &model_vm(i), t0()).await;
            }
            Open {
                audit_base: audit_seq(&*store).await,
                store: Some(store),
                data,
                _backend: PhantomData,
            }
        });
        StoreUnderTest { open, rt }
    }

    fn apply(mut sut: Self, model: &State, step: Step) -> Self {
        let got = sut.rt.block_on(sut.open.step(model, step.clone()));
        assert_eq!(got, model.last, "the answer to {step:?}");
        sut
    }

    fn check_invariants(sut: &Self, model: &State) {
        sut.rt.block_on(sut.open.compare(model));
    }

    fn teardown(sut: Self, _: State) {
        let report = sut
            .rt
            .block_on(sut.open.store().verify_audit(None))
            .expect("verify_audit failed");
        assert!(
            report.ok(),
            "the audit chain does not verify: {:?}",
            report.problems
        );
    }
}
