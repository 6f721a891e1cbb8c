//! Recommendations: which machines JIT protects, which still expose a management
//! port to everyone, and which jitgate cannot protect — each with a reason a person
//! understands. Defender for Cloud guesses this from cloud metadata; here the facts
//! come from the host itself (the sockets that really listen, the rules that really
//! apply), as reported by its agent.

use std::net::IpAddr;

use jiff::{SignedDuration, Timestamp};

use crate::net::{Port, Protocol, SourcePrefix};
use crate::nsg::{Access, NsgRule};

/// Defender's tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// JIT covers every listening management port, or none listens.
    Healthy,
    /// A management port listens and is reachable from any source.
    Unhealthy,
    /// No enforcement point (or JIT switched off for the scope).
    NotApplicable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "Healthy",
            Verdict::Unhealthy => "Unhealthy",
            Verdict::NotApplicable => "NotApplicable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Verdict::Healthy, Verdict::Unhealthy, Verdict::NotApplicable]
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
    }
}

/// A socket the agent saw accepting inbound traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    pub protocol: Protocol,
    pub addr: IpAddr,
    pub port: u16,
    pub process: Option<String>,
}

/// What the agent reported, if it ever did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    pub last_seen: Timestamp,
    pub nft_version: Option<String>,
    pub error: Option<String>,
    pub listening: Vec<Listening>,
    /// What the agent could not read about the host's sockets: `listening` may miss
    /// some, so "nothing exposed" cannot be concluded.
    pub inventory_errors: Vec<String>,
    /// The agent found its table changed outside jitgate and has not yet confirmed
    /// that it matches again: what was changed.
    pub drift: Option<String>,
}

/// Everything the classification looks at for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFacts {
    pub agent: Option<AgentFacts>,
    /// Set when an admin switched JIT off for a scope containing the VM (its reason).
    pub excluded: Option<String>,
    /// The VM's JIT-protected ports (from its policy).
    pub protected: Vec<(Port, Protocol)>,
    /// The VM's own NSG rules.
    pub user_rules: Vec<NsgRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecommendConfig {
    pub management_ports: Vec<u16>,
    /// An agent silent for longer is offline.
    pub offline_after: SignedDuration,
}

impl Default for RecommendConfig {
    fn default() -> Self {
        RecommendConfig {
            management_ports: vec![22, 3389, 5985, 5986],
            offline_after: SignedDuration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recommendation {
    pub verdict: Verdict,
    pub reason: String,
    /// Management ports listening and reachable from anywhere (Unhealthy).
    pub exposed: Vec<u16>,
    /// Listening management ports (any verdict), for enabling JIT on them.
    pub listening_management: Vec<u16>,
}

fn reachable_from_outside(addr: &IpAddr) -> bool {
    !addr.is_loopback()
}

/// True when a user rule denies everyone on this TCP port (so only the rules above it
/// let anyone in): the port is not open to any source.
fn restricted_by_user_rules(rules: &[NsgRule], port: u16) -> bool {
    let Ok(p) = Port::new(port as i64) else {
        return false;
    };
    rules.iter().any(|r| {
        r.access == Access::Deny
            && r.covers(Protocol::Tcp, p)
            && r.sources.contains(&SourcePrefix::Any)
    })
}

fn not_applicable(reason: String) -> Recommendation {
    Recommendation {
        verdict: Verdict::NotApplicable,
        reason,
        exposed: Vec::new(),
        listening_management: Vec::new(),
    }
}

/// Classifies one VM at `now`: [`settle`] applied to [`classify_reported`].
pub fn classify(f: &VmFacts, config: &RecommendConfig, now: Timestamp) -> Recommendation {
    settle(
        classify_reported(f, config),
        f.excluded.as_deref(),
        f.agent.as_ref().map(|a| a.last_seen),
        config,
        now,
    )
}

/// The verdict at `now` of a VM whose reported verdict is `reported`: an exclusion of
/// its scope (`excluded`, its reason), then an agent silent for longer than
/// `offline_after` since `last_seen`, override it. These are the only parts of a
/// verdict that change without a write to the VM's own facts (an exclusion may cover
/// thousands of VMs; silence is the passing of time), so a store can keep
/// `reported` per VM and settle it when it is read.
pub fn settle(
    reported: Recommendation,
    excluded: Option<&str>,
    last_seen: Option<Timestamp>,
    config: &RecommendConfig,
    now: Timestamp,
) -> Recommendation {
    if let Some(why) = excluded {
        return not_applicable(format!(
            "JIT is switched off for this machine's scope by an administrator: {why}"
        ));
    }
    if let Some(seen) = last_seen
        && is_offline(seen, config, now)
    {
        let silent = now.duration_since(seen);
        return not_applicable(format!(
            "the agent is offline: last seen {} ago (at {})",
            human(silent.as_secs()),
            seen
        ));
    }
    reported
}

/// True when an agent last seen at `last_seen` is offline at `now`: silent for longer
/// than `offline_after`, that is, seen before [`offline_cutoff`].
pub fn is_offline(last_seen: Timestamp, config: &RecommendConfig, now: Timestamp) -> bool {
    now.duration_since(last_seen) > config.offline_after
}

/// The earliest time an agent may have last reported and still be online at `now`:
/// an agent is offline exactly when it was last seen before it (a store filters by it).
/// `None` when no time is that early.
pub fn offline_cutoff(config: &RecommendConfig, now: Timestamp) -> Option<Timestamp> {
    now.checked_sub(config.offline_after).ok()
}

/// What `classify` concludes from what was written about the VM (its agent's last
/// report, its JIT-protected ports, its user rules), as if its agent were online and
/// its scope not excluded: [`settle`] adds those.
pub fn classify_reported(f: &VmFacts, config: &RecommendConfig) -> Recommendation {
    let na = not_applicable;
    let Some(agent) = &f.agent else {
        return na(
            "no agent has enrolled for this machine, so nothing can enforce JIT on it".to_owned(),
        );
    };
    if agent.nft_version.is_none() {
        return na(
            "nftables is not available on the host (install the nftables package)".to_owned(),
        );
    }
    if let Some(what) = &agent.drift {
        // Not Healthy whatever the ports: the kernel may not enforce what was planned.
        return Recommendation {
            verdict: Verdict::Unhealthy,
            reason: format!(
                "enforcement drift: table inet jitgate was changed outside jitgate ({what}) and the agent has not confirmed it matches again"
            ),
            exposed: Vec::new(),
            listening_management: Vec::new(),
        };
    }
    if let Some(e) = &agent.error {
        return na(format!("the agent cannot apply rules: {e}"));
    }
    let mut listening: Vec<u16> = agent
        .listening
        .iter()
        .filter(|l| l.protocol == Protocol::Tcp && reachable_from_outside(&l.addr))
        .map(|l| l.port)
        .filter(|p| config.management_ports.contains(p))
        .collect();
    listening.sort_unstable();
    listening.dedup();
    let covered = |port: u16| {
        f.protected
            .iter()
            .any(|(p, proto)| p.get() == port && proto.overlaps(Protocol::Tcp))
    };
    let exposed: Vec<u16> = listening
        .iter()
        .copied()
        .filter(|p| !covered(*p) && !restricted_by_user_rules(&f.user_rules, *p))
        .collect();
    if !exposed.is_empty() {
        let list: Vec<String> = exposed
            .iter()
            .map(|p| {
                let who = agent
                    .listening
                    .iter()
                    .find(|l| l.port == *p)
                    .and_then(|l| l.process.clone())
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                format!("{p}{who}")
            })
            .collect();
        return Recommendation {
            verdict: Verdict::Unhealthy,
            reason: format!(
                "management port{} {} listening and reachable from any source; enable JIT on {}",
                if exposed.len() > 1 { "s" } else { "" },
                list.join(", "),
                if exposed.len() > 1 { "them" } else { "it" }
            ),
            exposed,
            listening_management: listening,
        };
    }
    if let Some(e) = agent.inventory_errors.first() {
        // What was read exposes nothing, but what could not be read might.
        return Recommendation {
            verdict: Verdict::NotApplicable,
            reason: format!(
                "the agent cannot read every listening socket, so an exposed management port may be missed: {e}"
            ),
            exposed: Vec::new(),
            listening_management: listening,
        };
    }
    let reason = if listening.is_empty() {
        "no management port is listening".to_owned()
    } else {
        let l: Vec<String> = listening.iter().map(|p| p.to_string()).collect();
        format!(
            "every listening management port ({}) is protected",
            l.join(", ")
        )
    };
    Recommendation {
        verdict: Verdict::Healthy,
        reason,
        exposed: Vec::new(),
        listening_management: listening,
    }
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::PortRange;
    use crate::nsg::RuleOrigin;

    fn now() -> Timestamp {
        "2026-01-01T12:00:00Z".parse().unwrap()
    }

    fn listen(port: u16, addr: &str) -> Listening {
        Listening {
            protocol: Protocol::Tcp,
            addr: addr.parse().unwrap(),
            port,
            process: Some("sshd".into()),
        }
    }

    fn agent(listening: Vec<Listening>) -> Option<AgentFacts> {
        Some(AgentFacts {
            last_seen: now(),
            nft_version: Some("nftables v1.0.6".into()),
            error: None,
            listening,
            inventory_errors: Vec::new(),
            drift: None,
        })
    }

    fn facts(agent: Option<AgentFacts>) -> VmFacts {
        VmFacts {
            agent,
            excluded: None,
            protected: vec![],
            user_rules: vec![],
        }
    }

    fn rule(access: Access, port: u16, src: &str) -> NsgRule {
        NsgRule {
            name: "r".into(),
            priority: 200,
            access,
            protocol: Protocol::Any,
            sources: vec![SourcePrefix::parse(src).unwrap()],
            ports: vec![PortRange::single(Port::new(port as i64).unwrap())],
            description: String::new(),
            origin: RuleOrigin::User,
        }
    }

    /// Every branch: (facts, expected verdict, text the reason must contain).
    #[test]
    fn classification_table() {
        let c = RecommendConfig::default();
        let p22 = (Port::new(22).unwrap(), Protocol::Tcp);
        let mut excluded = facts(agent(vec![listen(22, "0.0.0.0")]));
        excluded.excluded = Some("lab machines".into());
        let mut offline = facts(agent(vec![]));
        offline.agent.as_mut().unwrap().last_seen = "2026-01-01T11:00:00Z".parse().unwrap();
        let mut no_nft = facts(agent(vec![]));
        no_nft.agent.as_mut().unwrap().nft_version = None;
        let mut failing = facts(agent(vec![]));
        failing.agent.as_mut().unwrap().error =
            Some("nft -f failed: Operation not permitted".into());
        let mut covered = facts(agent(vec![listen(22, "0.0.0.0")]));
        covered.protected = vec![p22];
        let mut covered_any = facts(agent(vec![listen(22, "::")]));
        covered_any.protected = vec![(Port::new(22).unwrap(), Protocol::Any)];
        let mut udp_only_policy = facts(agent(vec![listen(22, "0.0.0.0")]));
        udp_only_policy.protected = vec![(Port::new(22).unwrap(), Protocol::Udp)];
        let mut user_deny = facts(agent(vec![listen(22, "0.0.0.0")]));
        user_deny.user_rules = vec![
            rule(Access::Allow, 22, "10.0.0.0/8"),
            rule(Access::Deny, 22, "*"),
        ];
        let mut user_allow_only = facts(agent(vec![listen(22, "0.0.0.0")]));
        user_allow_only.user_rules = vec![rule(Access::Allow, 22, "10.0.0.0/8")];
        let mut partly = facts(agent(vec![listen(22, "0.0.0.0"), listen(3389, "0.0.0.0")]));
        partly.protected = vec![p22];
        let mut custom = RecommendConfig::default();
        custom.management_ports.push(8443);
        let unreadable = |listening| {
            let mut f = facts(agent(listening));
            f.agent.as_mut().unwrap().inventory_errors =
                vec!["/proc/net/tcp6 line 2: not a socket line: 'x'".into()];
            f
        };

        let cases: Vec<(VmFacts, &RecommendConfig, Verdict, &str)> = vec![
            (
                facts(None),
                &c,
                Verdict::NotApplicable,
                "no agent has enrolled",
            ),
            (excluded, &c, Verdict::NotApplicable, "switched off"),
            (offline, &c, Verdict::NotApplicable, "offline"),
            (
                no_nft,
                &c,
                Verdict::NotApplicable,
                "nftables is not available",
            ),
            (failing, &c, Verdict::NotApplicable, "cannot apply rules"),
            (
                facts(agent(vec![])),
                &c,
                Verdict::Healthy,
                "no management port is listening",
            ),
            (
                facts(agent(vec![listen(22, "127.0.0.1")])),
                &c,
                Verdict::Healthy,
                "no management port",
            ),
            (
                facts(agent(vec![listen(8080, "0.0.0.0")])),
                &c,
                Verdict::Healthy,
                "no management port",
            ),
            (
                facts(agent(vec![listen(22, "0.0.0.0")])),
                &c,
                Verdict::Unhealthy,
                "port 22 (sshd) listening",
            ),
            (
                facts(agent(vec![listen(5985, "10.0.0.5")])),
                &c,
                Verdict::Unhealthy,
                "5985",
            ),
            (covered, &c, Verdict::Healthy, "(22) is protected"),
            (covered_any, &c, Verdict::Healthy, "protected"),
            (udp_only_policy, &c, Verdict::Unhealthy, "22"),
            (user_deny, &c, Verdict::Healthy, "protected"),
            (user_allow_only, &c, Verdict::Unhealthy, "22"),
            (partly, &c, Verdict::Unhealthy, "3389"),
            (
                unreadable(vec![]),
                &c,
                Verdict::NotApplicable,
                "cannot read every listening socket, so an exposed management port may be missed: /proc/net/tcp6 line 2",
            ),
            // What was read is enough to say Unhealthy.
            (
                unreadable(vec![listen(22, "0.0.0.0")]),
                &c,
                Verdict::Unhealthy,
                "22",
            ),
            (
                facts(agent(vec![listen(8443, "0.0.0.0")])),
                &custom,
                Verdict::Unhealthy,
                "8443",
            ),
        ];
        for (f, config, verdict, text) in cases {
            let r = classify(&f, config, now());
            assert_eq!(r.verdict, verdict, "{f:?}: {}", r.reason);
            assert!(r.reason.contains(text), "'{}' lacks '{text}'", r.reason);
            if verdict == Verdict::Unhealthy {
                assert!(!r.exposed.is_empty());
            }
        }
    }

    #[test]
    fn listening_ports_are_reported_for_enabling() {
        let f = facts(agent(vec![
            listen(3389, "0.0.0.0"),
            listen(22, "::"),
            listen(22, "0.0.0.0"),
        ]));
        let r = classify(&f, &RecommendConfig::default(), now());
        assert_eq!(r.listening_management, vec![22, 3389]);
        assert_eq!(r.exposed, vec![22, 3389]);
    }

    /// A store counts offline agents with `last_seen < offline_cutoff`: the same
    /// decision as `is_offline`, to the nanosecond around the threshold.
    #[test]
    fn offline_cutoff_agrees_with_is_offline() {
        let c = RecommendConfig::default();
        let cutoff = offline_cutoff(&c, now()).unwrap();
        for delta in [-1_000_000_000i64, -1, 0, 1, 1_000_000_000] {
            let seen = cutoff
                .checked_add(SignedDuration::from_nanos(delta))
                .unwrap();
            assert_eq!(is_offline(seen, &c, now()), seen < cutoff, "{delta} ns");
        }
        assert_eq!(offline_cutoff(&c, Timestamp::MIN), None);
        // Settled: exclusion first, then silence; otherwise the reported verdict.
        let reported = classify_reported(&facts(agent(vec![listen(22, "0.0.0.0")])), &c);
        assert_eq!(reported.verdict, Verdict::Unhealthy);
        let old = cutoff.checked_sub(SignedDuration::from_secs(1)).unwrap();
        let r = settle(reported.clone(), None, Some(old), &c, now());
        assert!(r.reason.contains("offline"), "{}", r.reason);
        let r = settle(reported.clone(), Some("lab"), Some(old), &c, now());
        assert!(r.reason.contains("switched off") && r.reason.ends_with("lab"));
        assert_eq!(
            settle(reported.clone(), None, Some(now()), &c, now()),
            reported
        );
    }

    #[test]
    fn unconfirmed_drift_is_never_healthy() {
        let mut f = facts(agent(Vec::new()));
        assert_eq!(
            classify(&f, &RecommendConfig::default(), now()).verdict,
            Verdict::Healthy
        );
        if let Some(a) = &mut f.agent {
            a.drift = Some("rule removed: JIT-Deny".into());
        }
        let r = classify(&f, &RecommendConfig::default(), now());
        assert_eq!(r.verdict, Verdict::Unhealthy);
        assert!(r.reason.contains("drift"), "{}", r.reason);
    }
}
