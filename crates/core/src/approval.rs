//! Approvals: the rules that make a request port wait for people's decisions, which
//! rule applies to a port, and what a decision does. Pure: the store runs these inside
//! its transactions.
//!
//! A port covered by a rule starts `Pending` and reaches no agent. The request carries
//! a snapshot of the strictest rule over its pending ports ([`Snapshot`]), so changing
//! or deleting a rule later never changes a request already made. Decisions are
//! counted per distinct principal; the requestor never counts, whatever roles it
//! holds; on the `min_approvals`-th approval the pending ports become active and their
//! durations start then; `deny_threshold` denials end the request as denied; an
//! approver may shorten the duration or narrow the source, never widen them.

use std::cmp::Reverse;

use jiff::Timestamp;

use crate::duration::parse_iso8601_secs;
use crate::error::FieldError;
use crate::ids::{Scope, VmId};
use crate::net::{Port, SourcePrefix};

/// Bounds of a rule's numbers.
pub const MAX_APPROVALS: u32 = 10;
pub const MIN_PENDING_SECS: i64 = 5 * 60;
pub const MAX_PENDING_SECS: i64 = 86_400;
pub const DEFAULT_PENDING_SECS: i64 = 3_600;
pub const MAX_PATTERN_LEN: usize = 256;
pub const MAX_APPROVERS: usize = 100;
pub const MAX_REASON_LEN: usize = 1024;

/// A rule as a client sends it (`PUT /api/v1/approvalRules/{name}`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApprovalRuleInput {
    pub scope: Option<String>,
    pub ports: Option<Vec<i64>>,
    pub approvers: Option<Vec<String>>,
    pub min_approvals: Option<i64>,
    pub deny_threshold: Option<i64>,
    pub require_justification: Option<bool>,
    pub justification_pattern: Option<String>,
    pub pending_timeout: Option<String>,
}

/// A valid rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRule {
    pub name: String,
    pub scope: Scope,
    /// The ports it covers; empty: every port.
    pub ports: Vec<Port>,
    /// Who may decide; empty: everyone holding `JIT Approver` (the approve action) at
    /// the request's machines.
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    pub deny_threshold: u32,
    pub require_justification: bool,
    pub justification_pattern: Option<String>,
    /// Seconds a request waits for its decisions before it ends as expired.
    pub pending_timeout: i64,
}

/// A rule's name: what a path segment can carry.
pub fn check_rule_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 80
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "name",
            "must be 1-80 characters of A-Z a-z 0-9 - _ .",
        ))
    }
}

/// Compiles a justification pattern with bounded size (a rule's writer must not make
/// every initiate slow).
pub fn compile_pattern(p: &str) -> Result<regex::Regex, String> {
    if p.len() > MAX_PATTERN_LEN {
        return Err(format!("is longer than {MAX_PATTERN_LEN} characters"));
    }
    regex::RegexBuilder::new(p)
        .size_limit(1 << 16)
        .build()
        .map_err(|e| format!("does not compile: {e}"))
}

fn count(field: &str, v: Option<i64>, default: u32) -> Result<u32, FieldError> {
    match v {
        None => Ok(default),
        Some(n) if (1..=i64::from(MAX_APPROVALS)).contains(&n) => Ok(n as u32),
        Some(n) => Err(FieldError::new(
            field,
            format!("{n} is not between 1 and {MAX_APPROVALS}"),
        )),
    }
}

/// Validates a rule; every error names its field. `check_principal` validates an
/// approver's name (the same rules as everywhere else principals are written).
pub fn validate_rule(
    name: &str,
    input: &ApprovalRuleInput,
    check_principal: &dyn Fn(&str) -> Result<(), String>,
) -> Result<ApprovalRule, FieldError> {
    check_rule_name(name)?;
    let scope_text = input
        .scope
        .as_deref()
        .ok_or_else(|| FieldError::new("scope", "is required"))?;
    let scope = Scope::parse(scope_text).map_err(|e| FieldError::new("scope", e))?;
    let mut ports: Vec<Port> = Vec::new();
    for (i, n) in input.ports.iter().flatten().enumerate() {
        let p = Port::new(*n).map_err(|e| FieldError::new(format!("ports[{i}]"), e))?;
        if ports.contains(&p) {
            return Err(FieldError::new(
                format!("ports[{i}]"),
                format!("port {p} is listed twice"),
            ));
        }
        ports.push(p);
    }
    if input.ports.as_ref().is_some_and(Vec::is_empty) {
        return Err(FieldError::new(
            "ports",
            "must list at least one port (leave it out to cover every port)",
        ));
    }
    let min_approvals = count("minApprovals", input.min_approvals, 1)?;
    let deny_threshold = count("denyThreshold", input.deny_threshold, 1)?;
    let mut approvers: Vec<String> = Vec::new();
    if let Some(list) = &input.approvers {
        if list.len() > MAX_APPROVERS {
            return Err(FieldError::new(
                "approvers",
                format!("lists more than {MAX_APPROVERS} principals"),
            ));
        }
        for (i, a) in list.iter().enumerate() {
            check_principal(a).map_err(|e| FieldError::new(format!("approvers[{i}]"), e))?;
            if approvers.contains(a) {
                return Err(FieldError::new(
                    format!("approvers[{i}]"),
                    format!("'{a}' is listed twice"),
                ));
            }
            approvers.push(a.clone());
        }
        if approvers.is_empty() {
            return Err(FieldError::new(
                "approvers",
                "must list at least one principal (leave it out for everyone holding JIT Approver)",
            ));
        }
        if (approvers.len() as u32) < min_approvals {
            return Err(FieldError::new(
                "minApprovals",
                format!(
                    "{min_approvals} approvals can never be reached by the {} approvers listed",
                    approvers.len()
                ),
            ));
        }
    }
    let justification_pattern = match &input.justification_pattern {
        None => None,
        Some(p) => {
            compile_pattern(p).map_err(|e| FieldError::new("justificationPattern", e))?;
            Some(p.clone())
        }
    };
    let pending_timeout = match &input.pending_timeout {
        None => DEFAULT_PENDING_SECS,
        Some(d) => {
            let secs = parse_iso8601_secs(d).map_err(|e| FieldError::new("pendingTimeout", e))?;
            if !(MIN_PENDING_SECS..=MAX_PENDING_SECS).contains(&secs) {
                return Err(FieldError::new(
                    "pendingTimeout",
                    format!("{d} is not between PT5M and P1D"),
                ));
            }
            secs
        }
    };
    Ok(ApprovalRule {
        name: name.to_owned(),
        scope,
        ports,
        approvers,
        min_approvals,
        deny_threshold,
        require_justification: input.require_justification.unwrap_or(true),
        justification_pattern,
        pending_timeout,
    })
}

impl ApprovalRule {
    pub fn covers(&self, vm: &VmId, port: Port) -> bool {
        self.scope.contains(&vm.scope()) && (self.ports.is_empty() || self.ports.contains(&port))
    }

    /// Orders rules from the least to the most strict: more approvals needed, fewer
    /// denials to end it, a justification required, less time to decide; the name last,
    /// so the choice never depends on the order rules are read in.
    fn strictness(&self) -> impl Ord + '_ {
        (
            self.min_approvals,
            Reverse(self.deny_threshold),
            self.require_justification,
            self.justification_pattern.is_some(),
            Reverse(self.pending_timeout),
            Reverse(&self.name),
        )
    }
}

/// The strictest of `rules` covering `port` of `vm`.
pub fn rule_for<'a>(rules: &'a [ApprovalRule], vm: &VmId, port: Port) -> Option<&'a ApprovalRule> {
    rules
        .iter()
        .filter(|r| r.covers(vm, port))
        .max_by(|a, b| a.strictness().cmp(&b.strictness()))
}

/// The strictest of `rules` (those that cover some port of a request).
pub fn strictest<'a>(rules: &[&'a ApprovalRule]) -> Option<&'a ApprovalRule> {
    rules
        .iter()
        .copied()
        .max_by(|a, b| a.strictness().cmp(&b.strictness()))
}

/// Checks a request's justification against the rule.
pub fn check_justification(
    rule: &ApprovalRule,
    justification: Option<&str>,
) -> Result<(), FieldError> {
    let j = justification.unwrap_or("");
    if rule.require_justification && j.trim().is_empty() {
        return Err(FieldError::new(
            "justification",
            format!("is required: approval rule '{}' asks for one", rule.name),
        ));
    }
    if let Some(p) = &rule.justification_pattern {
        let re = compile_pattern(p).map_err(|e| FieldError::new("justification", e))?;
        if !re.is_match(j) {
            return Err(FieldError::new(
                "justification",
                format!(
                    "'{}' does not match the pattern {p} of approval rule '{}'",
                    j.chars().take(80).collect::<String>(),
                    rule.name
                ),
            ));
        }
    }
    Ok(())
}

/// What a request keeps of the rule it waits under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub rule: String,
    pub min_approvals: u32,
    pub deny_threshold: u32,
    /// Empty: everyone holding the approve action at the request's machines.
    pub approvers: Vec<String>,
    /// When it ends as expired if not decided.
    pub pending_until: Timestamp,
}

impl Snapshot {
    /// What a request covered by several rules waits under: every rule's demand at
    /// once (the most approvals any asks, the fewest denials, the shortest wait, and
    /// only approvers every rule that names approvers names), so no rule is weakened by
    /// another, whoever wrote it. Refused when the named approvers have nobody in
    /// common (nobody could ever approve).
    pub fn combine(rules: &[&ApprovalRule], now: Timestamp) -> Result<Snapshot, FieldError> {
        let mut sorted: Vec<&ApprovalRule> = rules.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let Some(first) = sorted.first() else {
            return Err(FieldError::new(
                "virtualMachines",
                "no approval rule applies",
            ));
        };
        let mut approvers: Option<Vec<String>> = None;
        for r in sorted.iter().filter(|r| !r.approvers.is_empty()) {
            approvers = Some(match approvers {
                None => r.approvers.clone(),
                Some(a) => a.into_iter().filter(|p| r.approvers.contains(p)).collect(),
            });
        }
        let min_approvals = sorted.iter().map(|r| r.min_approvals).max().unwrap_or(1);
        if let Some(a) = &approvers
            && (a.len() as u32) < min_approvals
        {
            let names: Vec<&str> = sorted.iter().map(|r| r.name.as_str()).collect();
            return Err(FieldError::new(
                "virtualMachines",
                format!(
                    "the approval rules {} together leave {} common approver(s) for {min_approvals} approvals: nobody could approve this request; ask for those ports separately",
                    names.join(", "),
                    a.len()
                ),
            ));
        }
        let timeout = sorted
            .iter()
            .map(|r| r.pending_timeout)
            .min()
            .unwrap_or(first.pending_timeout);
        Ok(Snapshot {
            rule: sorted
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            min_approvals,
            deny_threshold: sorted.iter().map(|r| r.deny_threshold).min().unwrap_or(1),
            approvers: approvers.unwrap_or_default(),
            pending_until: now + jiff::SignedDuration::from_secs(timeout),
        })
    }

    pub fn of(rule: &ApprovalRule, now: Timestamp) -> Snapshot {
        Snapshot {
            rule: rule.name.clone(),
            min_approvals: rule.min_approvals,
            deny_threshold: rule.deny_threshold,
            approvers: rule.approvers.clone(),
            pending_until: now + jiff::SignedDuration::from_secs(rule.pending_timeout),
        }
    }
}

/// One person's decision on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    pub principal: String,
    pub approve: bool,
    pub reason: Option<String>,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecideError {
    /// The request is not waiting for decisions (active, denied, expired, cancelled).
    NotPending,
    /// Its pending time is over (the expiry task has not ended it yet).
    Expired,
    /// The requestor cannot decide on its own request, whatever roles it holds.
    OwnRequest,
    /// The caller is not one of the rule's approvers, or does not hold the approve
    /// action at the request's machines (checked at the decision).
    NotAnApprover,
    /// The caller decided already.
    AlreadyDecided,
    /// What the request asks is no longer allowed (the policy changed or is gone, or
    /// the requestor lost the right to ask): it can only be denied or cancelled.
    PolicyChanged,
}

impl DecideError {
    pub fn message(&self) -> &'static str {
        match self {
            DecideError::NotPending => "the request is not waiting for approval",
            DecideError::Expired => "the request waited too long and has expired",
            DecideError::OwnRequest => {
                "nobody can decide on their own request, whatever roles they hold"
            }
            DecideError::NotAnApprover => {
                "you are not an approver of this request (the rule's approvers, or JIT Approver at its machines)"
            }
            DecideError::AlreadyDecided => "you have decided on this request already",
            DecideError::PolicyChanged => {
                "the policy (or the requestor's rights) no longer allows what this request asks: deny it, or let its requestor cancel it"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Recorded; more approvals are needed.
    Counted { approvals: u32, needed: u32 },
    /// The last approval needed: the pending ports become active now.
    Approved,
    /// The denials reached the threshold: the request ends as denied.
    Denied,
}

/// Decides what a vote does. `eligible` is whether the caller holds the approve action
/// at every machine of the request now; `votes` are the decisions made so far.
pub fn decide(
    snapshot: &Snapshot,
    requestor: &str,
    votes: &[Vote],
    who: &str,
    eligible: bool,
    approve: bool,
    now: Timestamp,
) -> Result<Outcome, DecideError> {
    if now >= snapshot.pending_until {
        return Err(DecideError::Expired);
    }
    if who == requestor {
        return Err(DecideError::OwnRequest);
    }
    if !snapshot.approvers.is_empty() && !snapshot.approvers.iter().any(|a| a == who) {
        return Err(DecideError::NotAnApprover);
    }
    if !eligible {
        return Err(DecideError::NotAnApprover);
    }
    if votes.iter().any(|v| v.principal == who) {
        return Err(DecideError::AlreadyDecided);
    }
    // Distinct principals only (the store keeps one vote per principal; the requestor's
    // can never be among them).
    let counted = |approve: bool| {
        votes
            .iter()
            .filter(|v| v.approve == approve && v.principal != requestor)
            .count() as u32
            + 1
    };
    if approve {
        let n = counted(true);
        if n >= snapshot.min_approvals {
            Ok(Outcome::Approved)
        } else {
            Ok(Outcome::Counted {
                approvals: n,
                needed: snapshot.min_approvals,
            })
        }
    } else if counted(false) >= snapshot.deny_threshold {
        Ok(Outcome::Denied)
    } else {
        Ok(Outcome::Counted {
            approvals: votes.iter().filter(|v| v.approve).count() as u32,
            needed: snapshot.min_approvals,
        })
    }
}

/// An approver's narrowing of a pending port: the duration it gets (seconds, counted
/// from the approval) and its source. Never wider than what was asked.
pub fn narrow(
    requested_secs: i64,
    requested_source: &SourcePrefix,
    duration: Option<i64>,
    source: Option<&SourcePrefix>,
) -> Result<(i64, SourcePrefix), FieldError> {
    let secs = match duration {
        None => requested_secs,
        Some(d) if d <= 0 => return Err(FieldError::new("duration", "must be longer than zero")),
        Some(d) if d > requested_secs => {
            return Err(FieldError::new(
                "duration",
                format!(
                    "{d} s is longer than the {requested_secs} s asked for: an approver may shorten, never lengthen"
                ),
            ));
        }
        Some(d) => d,
    };
    let src = match source {
        None => *requested_source,
        Some(s) if requested_source.contains(s) => *s,
        Some(s) => {
            return Err(FieldError::new(
                "sourcePrefix",
                format!(
                    "{s} is not inside the {requested_source} asked for: an approver may narrow the source, never widen it"
                ),
            ));
        }
    };
    Ok((secs, src))
}

/// A request's approval: the rule it waits (or waited) under and the decisions made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub snapshot: Snapshot,
    pub votes: Vec<Vote>,
}

/// A break-glass request's review: an approver looks at it afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BreakGlass {
    pub reviewed_by: Option<String>,
    pub reviewed_at: Option<Timestamp>,
}

/// How long break-glass access lasts at most, by default.
pub const BREAK_GLASS_MAX_SECS: i64 = 3600;

/// Makes an accepted initiate a break-glass one: every port opens now whatever the
/// rules say, a justification is required, and no port lasts longer than `max_secs`.
pub fn apply_break_glass(
    plan: &mut crate::request::InitiatePlan,
    max_secs: i64,
) -> Result<(), FieldError> {
    if plan
        .request
        .justification
        .as_deref()
        .is_none_or(|j| j.trim().is_empty())
    {
        return Err(FieldError::new(
            "justification",
            "is required for break-glass access: say what the emergency is",
        ));
    }
    let start = plan.request.start;
    for (i, vm) in plan.request.vms.iter().enumerate() {
        for (j, p) in vm.ports.iter().enumerate() {
            if p.end.duration_since(start).as_secs() > max_secs {
                return Err(FieldError::new(
                    format!("virtualMachines[{i}].ports[{j}].duration"),
                    format!(
                        "break-glass access lasts at most {}",
                        crate::duration::format_iso8601_secs(max_secs)
                    ),
                ));
            }
        }
    }
    plan.request.break_glass = Some(BreakGlass::default());
    Ok(())
}

/// Applies the approval rules to an accepted initiate: each port a rule covers becomes
/// `Pending` (its `end` stays the end asked for as if it started now: the duration is
/// counted again from the approval), the request keeps a snapshot of the strictest of
/// those rules, and only the ports that start now supersede older grants. The
/// justification must satisfy every rule that covers a port.
pub fn apply_rules(
    plan: &mut crate::request::InitiatePlan,
    rules: &[ApprovalRule],
    now: Timestamp,
) -> Result<(), FieldError> {
    let mut covering: Vec<&ApprovalRule> = Vec::new();
    for vm in &mut plan.request.vms {
        for p in &mut vm.ports {
            for r in rules.iter().filter(|r| r.covers(&vm.id, p.number)) {
                p.status = crate::request::PortStatus::Pending;
                if !covering.iter().any(|c| c.name == r.name) {
                    covering.push(r);
                }
            }
        }
    }
    if covering.is_empty() {
        return Ok(());
    }
    for r in &covering {
        check_justification(r, plan.request.justification.as_deref())?;
    }
    plan.request.approval = Some(Approval {
        snapshot: Snapshot::combine(&covering, now)?,
        votes: Vec::new(),
    });
    let vms = &plan.request.vms;
    plan.superseded.retain(|g| {
        vms.iter().any(|v| {
            v.id == g.vm
                && v.ports.iter().any(|p| {
                    p.number == g.number
                        && p.source == g.source
                        && p.status == crate::request::PortStatus::Initiated
                })
        })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

    fn ok(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn rule(name: &str, scope: &str, input: ApprovalRuleInput) -> ApprovalRule {
        validate_rule(
            name,
            &ApprovalRuleInput {
                scope: Some(scope.into()),
                ..input
            },
            &ok,
        )
        .unwrap()
    }

    fn vm(rg: &str, name: &str) -> VmId {
        VmId::parse(&format!(
            "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
        ))
        .unwrap()
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn rules_are_validated_field_by_field() {
        let base = ApprovalRuleInput {
            scope: Some(format!("/subscriptions/{SUB}")),
            ..Default::default()
        };
        let r = validate_rule("prod", &base, &ok).unwrap();
        assert_eq!(
            (
                r.min_approvals,
                r.deny_threshold,
                r.require_justification,
                r.pending_timeout
            ),
            (1, 1, true, 3600)
        );
        let bad = |input: ApprovalRuleInput| validate_rule("prod", &input, &ok).unwrap_err().field;
        assert_eq!(bad(ApprovalRuleInput::default()), "scope");
        assert_eq!(
            bad(ApprovalRuleInput {
                scope: Some("/nope".into()),
                ..base.clone()
            }),
            "scope"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                min_approvals: Some(0),
                ..base.clone()
            }),
            "minApprovals"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                deny_threshold: Some(11),
                ..base.clone()
            }),
            "denyThreshold"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                ports: Some(vec![22, 22]),
                ..base.clone()
            }),
            "ports[1]"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                ports: Some(vec![0]),
                ..base.clone()
            }),
            "ports[0]"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                ports: Some(vec![]),
                ..base.clone()
            }),
            "ports"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                justification_pattern: Some("^CHG-[0-9".into()),
                ..base.clone()
            }),
            "justificationPattern"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                pending_timeout: Some("PT1M".into()),
                ..base.clone()
            }),
            "pendingTimeout"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                pending_timeout: Some("P2D".into()),
                ..base.clone()
            }),
            "pendingTimeout"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                approvers: Some(vec!["alice".into()]),
                min_approvals: Some(2),
                ..base.clone()
            }),
            "minApprovals"
        );
        assert_eq!(
            bad(ApprovalRuleInput {
                approvers: Some(vec![]),
                ..base.clone()
            }),
            "approvers"
        );
        let refuse = |p: &str| {
            if p.contains(' ') {
                Err("has a space".to_owned())
            } else {
                Ok(())
            }
        };
        let e = validate_rule(
            "prod",
            &ApprovalRuleInput {
                approvers: Some(vec!["ok".into(), "not ok".into()]),
                ..base.clone()
            },
            &refuse,
        )
        .unwrap_err();
        assert_eq!(e.field, "approvers[1]");
        assert_eq!(validate_rule("a/b", &base, &ok).unwrap_err().field, "name");
    }

    #[test]
    fn the_strictest_covering_rule_applies() {
        let sub = format!("/subscriptions/{SUB}");
        let rg = format!("{sub}/resourceGroups/prod");
        let rules = vec![
            rule("everything", &sub, ApprovalRuleInput::default()),
            rule(
                "prod-ssh",
                &rg,
                ApprovalRuleInput {
                    ports: Some(vec![22]),
                    min_approvals: Some(2),
                    ..Default::default()
                },
            ),
            rule(
                "prod-rdp",
                &rg,
                ApprovalRuleInput {
                    ports: Some(vec![3389]),
                    pending_timeout: Some("PT10M".into()),
                    ..Default::default()
                },
            ),
        ];
        let p = |n: i64| Port::new(n).unwrap();
        assert_eq!(
            rule_for(&rules, &vm("prod", "a"), p(22)).unwrap().name,
            "prod-ssh"
        );
        // Same approvals; the shorter pending time is stricter.
        assert_eq!(
            rule_for(&rules, &vm("prod", "a"), p(3389)).unwrap().name,
            "prod-rdp"
        );
        assert_eq!(
            rule_for(&rules, &vm("prod", "a"), p(5985)).unwrap().name,
            "everything"
        );
        assert_eq!(
            rule_for(&rules, &vm("dev", "a"), p(22)).unwrap().name,
            "everything"
        );
        assert!(rule_for(&rules[1..], &vm("dev", "a"), p(22)).is_none());
        let all: Vec<&ApprovalRule> = rules.iter().collect();
        assert_eq!(strictest(&all).unwrap().name, "prod-ssh");
    }

    /// Several rules on one request: each one's demand holds; named approvers must be
    /// named by every rule that names any.
    #[test]
    fn several_rules_combine_and_none_is_weakened() {
        let sub = format!("/subscriptions/{SUB}");
        let named = |name: &str, who: &[&str], min: i64| {
            rule(
                name,
                &sub,
                ApprovalRuleInput {
                    approvers: Some(who.iter().map(|s| s.to_string()).collect()),
                    min_approvals: Some(min),
                    ..Default::default()
                },
            )
        };
        let security = named("security", &["sec1", "sec2"], 1);
        let friends = named("friends", &["pal", "sec1"], 1);
        let open = rule(
            "open",
            &sub,
            ApprovalRuleInput {
                min_approvals: Some(2),
                deny_threshold: Some(3),
                pending_timeout: Some("PT10M".into()),
                ..Default::default()
            },
        );
        let s = Snapshot::combine(&[&security, &friends], t(0)).unwrap();
        assert_eq!(s.approvers, ["sec1"]);
        assert_eq!(s.rule, "friends+security");
        // 2 approvals from the 2 named: possible.
        let s = Snapshot::combine(&[&security, &open], t(0)).unwrap();
        assert_eq!((s.min_approvals, s.approvers.len()), (2, 2));
        // 2 approvals from 1 common approver: impossible, refused.
        let e = Snapshot::combine(&[&security, &friends, &open], t(0)).unwrap_err();
        assert_eq!(e.field, "virtualMachines");
        let s = Snapshot::combine(&[&named("a", &["x", "y"], 1), &open], t(0)).unwrap();
        assert_eq!(
            (s.min_approvals, s.deny_threshold, s.approvers.len()),
            (2, 1, 2)
        );
        assert_eq!(s.pending_until, t(600));
        assert!(Snapshot::combine(&[&security, &named("other", &["pal"], 1)], t(0)).is_err());
    }

    #[test]
    fn justifications_are_required_and_matched() {
        let r = rule(
            "chg",
            &format!("/subscriptions/{SUB}"),
            ApprovalRuleInput {
                justification_pattern: Some("^CHG-[0-9]+".into()),
                ..Default::default()
            },
        );
        assert!(check_justification(&r, Some("CHG-42 reboot")).is_ok());
        assert_eq!(
            check_justification(&r, None).unwrap_err().field,
            "justification"
        );
        assert!(
            check_justification(&r, Some("fix it"))
                .unwrap_err()
                .message
                .contains("CHG")
        );
        let free = rule(
            "free",
            &format!("/subscriptions/{SUB}"),
            ApprovalRuleInput {
                require_justification: Some(false),
                ..Default::default()
            },
        );
        assert!(check_justification(&free, None).is_ok());
    }

    fn snapshot(min: u32, deny: u32, approvers: &[&str]) -> Snapshot {
        Snapshot {
            rule: "r".into(),
            min_approvals: min,
            deny_threshold: deny,
            approvers: approvers.iter().map(|s| s.to_string()).collect(),
            pending_until: t(3600),
        }
    }

    fn vote(p: &str, approve: bool) -> Vote {
        Vote {
            principal: p.into(),
            approve,
            reason: None,
            at: t(1),
        }
    }

    /// Every state and transition of a decision.
    #[test]
    fn decisions_follow_the_table() {
        let s = snapshot(2, 2, &[]);
        // The requestor never decides, whatever it holds.
        assert_eq!(
            decide(&s, "req", &[], "req", true, true, t(10)),
            Err(DecideError::OwnRequest)
        );
        assert_eq!(
            decide(&s, "req", &[], "req", true, false, t(10)),
            Err(DecideError::OwnRequest)
        );
        // Eligibility is asked at the decision.
        assert_eq!(
            decide(&s, "req", &[], "bob", false, true, t(10)),
            Err(DecideError::NotAnApprover)
        );
        // First approval counted, second approves.
        assert_eq!(
            decide(&s, "req", &[], "bob", true, true, t(10)),
            Ok(Outcome::Counted {
                approvals: 1,
                needed: 2
            })
        );
        let one = [vote("bob", true)];
        assert_eq!(
            decide(&s, "req", &one, "bob", true, true, t(10)),
            Err(DecideError::AlreadyDecided)
        );
        assert_eq!(
            decide(&s, "req", &one, "carol", true, true, t(10)),
            Ok(Outcome::Approved)
        );
        // Denials: one is counted, the threshold denies.
        assert_eq!(
            decide(&s, "req", &one, "carol", true, false, t(10)),
            Ok(Outcome::Counted {
                approvals: 1,
                needed: 2
            })
        );
        let mixed = [vote("bob", true), vote("carol", false)];
        assert_eq!(
            decide(&s, "req", &mixed, "dave", true, false, t(10)),
            Ok(Outcome::Denied)
        );
        assert_eq!(
            decide(&s, "req", &mixed, "dave", true, true, t(10)),
            Ok(Outcome::Approved)
        );
        // A single deny ends it under the default threshold.
        assert_eq!(
            decide(&snapshot(1, 1, &[]), "req", &[], "bob", true, false, t(10)),
            Ok(Outcome::Denied)
        );
        // Past its pending time, nobody decides.
        assert_eq!(
            decide(&s, "req", &[], "bob", true, true, t(3600)),
            Err(DecideError::Expired)
        );
        // Named approvers only.
        let named = snapshot(1, 1, &["carol"]);
        assert_eq!(
            decide(&named, "req", &[], "bob", true, true, t(10)),
            Err(DecideError::NotAnApprover)
        );
        assert_eq!(
            decide(&named, "req", &[], "carol", true, true, t(10)),
            Ok(Outcome::Approved)
        );
        // A named approver who is the requestor still cannot.
        assert_eq!(
            decide(&named, "carol", &[], "carol", true, true, t(10)),
            Err(DecideError::OwnRequest)
        );
    }

    #[test]
    fn approvers_narrow_and_never_widen() {
        let asked = SourcePrefix::parse("10.0.0.0/8").unwrap();
        assert_eq!(narrow(3600, &asked, None, None).unwrap(), (3600, asked));
        let host = SourcePrefix::parse("10.1.2.3").unwrap();
        assert_eq!(
            narrow(3600, &asked, Some(600), Some(&host)).unwrap(),
            (600, host)
        );
        assert_eq!(
            narrow(3600, &asked, Some(3601), None).unwrap_err().field,
            "duration"
        );
        assert_eq!(
            narrow(3600, &asked, Some(0), None).unwrap_err().field,
            "duration"
        );
        let wider = SourcePrefix::parse("0.0.0.0/0").unwrap();
        assert_eq!(
            narrow(3600, &asked, None, Some(&wider)).unwrap_err().field,
            "sourcePrefix"
        );
        assert_eq!(
            narrow(3600, &asked, None, Some(&SourcePrefix::Any))
                .unwrap_err()
                .field,
            "sourcePrefix"
        );
    }
}
