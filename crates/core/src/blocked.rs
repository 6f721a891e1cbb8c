//! Blocked attempts ("attempts on attack"): how many packets each JIT deny rule dropped
//! between two reports of an agent.
//!
//! An agent reports, for every JIT deny rule, the rule's named nftables counter: the
//! packets it dropped since the agent last built its table. The counters are
//! cumulative, so what happened between two reports is a difference; but a counter
//! also starts again from zero whenever the table is rebuilt (the agent restarted,
//! repaired drift, or the rules changed), and a rule appears and disappears with the
//! policy. [`counter_deltas`] turns two reports into per-rule counts that are never
//! negative and never invented.

use std::collections::{HashMap, HashSet};

/// One counter as an agent reports it: the deny rule's name and the packets it dropped
/// since the table was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterReading<'a> {
    pub rule: &'a str,
    pub packets: u64,
}

/// The attempts each reading of `current` adds to those of `previous` (the agent's
/// previous report, empty for its first): one count per reading, in order.
///
/// - A counter that grew adds the difference.
/// - A counter lower than before was reset with the table: it holds exactly what was
///   dropped since, so that is what it adds. A 64-bit counter wrapping around cannot
///   be told apart from a reset (and would take centuries at line rate); it is treated
///   the same, which may miss attempts but never invents any.
/// - A rule new since the previous report (or in the first report) started from zero
///   with the rule: it adds its whole count.
/// - A rule that vanished adds nothing: there is no reading to count.
/// - A rule named twice in `current` counts once (its first reading): an agent's
///   counters are named, so a repeat can only come from a broken or hostile agent, and
///   counting it again would inflate the series. In `previous`, the first reading of
///   a name is the one compared with.
pub fn counter_deltas(previous: &[CounterReading<'_>], current: &[CounterReading<'_>]) -> Vec<u64> {
    let mut before: HashMap<&str, u64> = HashMap::with_capacity(previous.len());
    for r in previous {
        before.entry(r.rule).or_insert(r.packets);
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(current.len());
    current
        .iter()
        .map(|r| {
            if !seen.insert(r.rule) {
                return 0;
            }
            match before.get(r.rule) {
                Some(&b) if r.packets >= b => r.packets - b,
                // Reset (or wrapped), or new: everything it holds is new.
                _ => r.packets,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn readings<'a>(v: &'a [(&'a str, u64)]) -> Vec<CounterReading<'a>> {
        v.iter()
            .map(|(rule, packets)| CounterReading {
                rule,
                packets: *packets,
            })
            .collect()
    }

    fn check(previous: &[(&str, u64)], current: &[(&str, u64)], expect: &[u64]) {
        assert_eq!(
            counter_deltas(&readings(previous), &readings(current)),
            expect,
            "{previous:?} -> {current:?}"
        );
    }

    #[test]
    fn growth_adds_the_difference() {
        check(
            &[("ssh", 10), ("rdp", 0)],
            &[("ssh", 15), ("rdp", 0)],
            &[5, 0],
        );
        check(&[("ssh", 10)], &[("ssh", 10)], &[0]);
        // Order does not matter; names do.
        check(&[("a", 1), ("b", 2)], &[("b", 7), ("a", 1)], &[5, 0]);
    }

    #[test]
    fn a_counter_that_went_down_was_reset_and_counts_from_zero() {
        // The agent restarted and rebuilt its table: 3 drops since.
        check(&[("ssh", 1000)], &[("ssh", 3)], &[3]);
        check(&[("ssh", 1000)], &[("ssh", 0)], &[0]);
        // A wrap looks the same: what is counted since is all that is known.
        check(&[("ssh", u64::MAX - 1)], &[("ssh", 4)], &[4]);
        check(&[("ssh", u64::MAX - 1)], &[("ssh", u64::MAX)], &[1]);
    }

    #[test]
    fn new_and_first_counters_count_whole_and_vanished_ones_nothing() {
        check(&[], &[("ssh", 7), ("rdp", 2)], &[7, 2]);
        check(&[("ssh", 5)], &[("ssh", 6), ("winrm", 9)], &[1, 9]);
        check(&[("ssh", 5), ("rdp", 9)], &[("ssh", 5)], &[0]);
        check(&[("ssh", 5)], &[], &[]);
    }

    #[test]
    fn a_rule_named_twice_counts_once() {
        check(
            &[("ssh", 5)],
            &[("ssh", 8), ("ssh", 8), ("ssh", 100)],
            &[3, 0, 0],
        );
        check(&[("ssh", 5), ("ssh", 0)], &[("ssh", 8)], &[3]);
    }

    proptest! {
        /// Never more than a counter holds, one count per reading, and with no reset
        /// the deltas of two steps add up to the delta of one.
        #[test]
        fn deltas_are_bounded_and_add_up(
            a in prop::collection::vec((0usize..4, 0u64..1000), 0..6),
            grow1 in prop::collection::vec(0u64..1000, 4),
            grow2 in prop::collection::vec(0u64..1000, 4),
        ) {
            let names = ["a", "b", "c", "d"];
            let mut first: Vec<(&str, u64)> = Vec::new();
            for (i, p) in &a {
                if !first.iter().any(|(n, _)| *n == names[*i]) {
                    first.push((names[*i], *p));
                }
            }
            let step = |from: &[(&'static str, u64)], grow: &[u64]| -> Vec<(&'static str, u64)> {
                from.iter()
                    .map(|(n, p)| {
                        let i = names.iter().position(|x| x == n).unwrap_or(0);
                        (*n, p + grow[i])
                    })
                    .collect()
            };
            let second = step(&first, &grow1);
            let third = step(&second, &grow2);
            let d12 = counter_deltas(&readings(&first), &readings(&second));
            let d23 = counter_deltas(&readings(&second), &readings(&third));
            let d13 = counter_deltas(&readings(&first), &readings(&third));
            prop_assert_eq!(d12.len(), second.len());
            for (i, (_, p)) in third.iter().enumerate() {
                prop_assert!(d13[i] <= *p);
                prop_assert_eq!(d12[i] + d23[i], d13[i]);
            }
        }
    }
}
