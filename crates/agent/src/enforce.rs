//! From a validated desired state to the kernel: plan with the pure planner
//! (`jitgate_core::nft`), then one `nft -f` transaction.
//!
//! A change of grants only is applied as a delta (add/delete set elements); anything
//! else, the first apply after start, or a failed delta rebuilds the whole table in one
//! transaction, re-adding every live grant with its remaining lifetime. Either way the
//! kernel never sees a half-applied state.

use std::time::Instant;

use jitgate_core::Timestamp;
use jitgate_core::nft::{self, Element};
use jitgate_core::nsg::NsgRule;
use jitgate_proto::Desired;

use crate::nft::Nft;

/// What the agent last put in the kernel.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub rules: Vec<NsgRule>,
    pub elements: Vec<Element>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyKind {
    Full,
    Delta,
    Nothing,
}

pub struct Enforcer {
    nft: Nft,
    applied: Option<Applied>,
    /// How long recent `nft` runs took: the kernel starts an element's timeout when
    /// the transaction commits, not when it is planned.
    recent: std::time::Duration,
}

/// The kernel keeps element timeouts in jiffies: an element may outlive its timeout by up
/// to one tick (10 ms at HZ=100, the coarsest common setting).
pub const KERNEL_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// The most a grant may close early to make sure it never closes late.
pub const MAX_COMMIT_MARGIN: std::time::Duration = std::time::Duration::from_millis(100);

impl Enforcer {
    pub fn new(nft: Nft) -> Self {
        Enforcer {
            nft,
            applied: None,
            recent: std::time::Duration::from_millis(20),
        }
    }

    pub fn nft(&self) -> &Nft {
        &self.nft
    }

    /// Makes the kernel match `desired` at `now`. Returns what was done and how long
    /// the `nft` run took.
    ///
    /// The kernel starts an element's timeout when the transaction commits, and keeps
    /// it in jiffies. So timeouts are computed as if it were already `now` plus the
    /// expected time to commit (1.5 times the last `nft` run) plus one kernel tick
    /// ([`KERNEL_TICK`]), at most [`MAX_COMMIT_MARGIN`]: a grant may close that much
    /// early, never late.
    pub fn apply(
        &mut self,
        desired: &Desired,
        now: Timestamp,
    ) -> anyhow::Result<(ApplyKind, std::time::Duration)> {
        nft::validate(&desired.rules)
            .map_err(|e| anyhow::anyhow!("refusing an invalid desired state: {e}"))?;
        let margin = (self.recent + self.recent / 2 + KERNEL_TICK).min(MAX_COMMIT_MARGIN);
        let now = now
            .checked_add(jiff::SignedDuration::try_from(margin).unwrap_or_default())
            .unwrap_or(now);
        let elements = nft::plan_elements(&desired.grants, now);
        let started = Instant::now();
        let kind = match &self.applied {
            Some(a) if a.rules == desired.rules => {
                let (add, remove) = nft::diff(&a.elements, &elements, now);
                let script = nft::render_delta(&add, &remove, now);
                if nft::delta_conflicts(&a.elements, &add, now) {
                    self.nft
                        .apply(&nft::render_full(&desired.rules, &elements, now))?;
                    ApplyKind::Full
                } else if script.is_empty() {
                    ApplyKind::Nothing
                } else if self.nft.apply(&script).is_ok() {
                    ApplyKind::Delta
                } else {
                    // An element may have expired in the kernel between plan and apply;
                    // rebuild instead.
                    self.nft
                        .apply(&nft::render_full(&desired.rules, &elements, now))?;
                    ApplyKind::Full
                }
            }
            _ => {
                self.nft
                    .apply(&nft::render_full(&desired.rules, &elements, now))?;
                ApplyKind::Full
            }
        };
        let took = started.elapsed();
        if kind != ApplyKind::Nothing {
            self.recent = took;
        }
        self.applied = Some(Applied {
            rules: desired.rules.clone(),
            elements,
        });
        Ok((kind, took))
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
