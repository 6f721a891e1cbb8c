//! `jitgate-bench apply`: how long the agent takes to apply a change to a table that
//! already holds many grant elements, with real nft in a fresh network namespace.
//!
//! The outer process creates the namespace and re-runs itself inside it with
//! `--inner`, so every `nft` the agent spawns runs there, as in production.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use jitgate_agent::enforce::{ApplyKind, Enforcer};
use jitgate_agent::nft::Nft;
use jitgate_core::Timestamp;
use jitgate_core::ids::VmId;
use jitgate_core::net::{Port, PortRange, Protocol, SourcePrefix};
use jitgate_core::nsg::{Access, GrantRef, NsgRule, RuleOrigin};
use jitgate_core::request::RequestId;
use jitgate_proto::Desired;

use super::{lab, peak_rss_kib, percentiles};

pub async fn run(elements: usize, inner: bool) -> anyhow::Result<()> {
    if !inner {
        lab::require_root_tools()?;
        let ns = format!("jgb-apply-{}", std::process::id());
        lab::sh(&["ip", "netns", "add", &ns])?;
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe()?)
            .args(["apply", "--inner", "--elements", &elements.to_string()])
            .status();
        let _ = lab::sh(&["ip", "netns", "del", &ns]);
        if !status.context("cannot run the inner benchmark")?.success() {
            bail!("the inner benchmark failed");
        }
        return Ok(());
    }
    tokio::task::block_in_place(|| inner_run(elements))
}

fn grant(i: u32, now: Timestamp) -> anyhow::Result<GrantRef> {
    let addr = std::net::Ipv4Addr::from(0x0A00_0000u32 + i);
    Ok(GrantRef {
        request: RequestId::new(uuid::Uuid::from_u128(i as u128 + 1)),
        number: Port::new(22).map_err(anyhow::Error::msg)?,
        protocol: Protocol::Tcp,
        source: SourcePrefix::parse(&addr.to_string()).map_err(anyhow::Error::msg)?,
        start: now,
        end: now.checked_add(jiff::SignedDuration::from_secs(3600 + i as i64 % 600))?,
    })
}

fn deny_rule() -> anyhow::Result<NsgRule> {
    Ok(NsgRule {
        name: "JIT-Deny-default-22".into(),
        priority: 1000,
        access: Access::Deny,
        protocol: Protocol::Tcp,
        sources: vec![SourcePrefix::Any],
        ports: vec![PortRange::single(
            Port::new(22).map_err(anyhow::Error::msg)?,
        )],
        description: String::new(),
        origin: RuleOrigin::JitDeny {
            policy: String::new(),
        },
    })
}

fn inner_run(elements: usize) -> anyhow::Result<()> {
    let vm = VmId::parse("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/bench/providers/Microsoft.Compute/virtualMachines/vm")
        .map_err(anyhow::Error::msg)?;
    let now = Timestamp::now();
    let mut grants = (0..elements as u32)
        .map(|i| grant(i, now))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rules = vec![deny_rule()?];
    let desired = |grants: &[GrantRef], rules: &[NsgRule], rev: usize| Desired {
        vm: vm.clone(),
        revision: format!("{rev:032x}"),
        rules: rules.to_vec(),
        grants: grants.iter().cloned().collect(),
        gateway: None,
        // The enforcer never reads the digest (the agent checks revisions, not it).
        digest: Default::default(),
    };
    let mut enforcer = Enforcer::new(Nft::new("nft".into()));
    if enforcer.netlink_port().is_none() {
        bail!("no netlink socket to nf_tables: deltas would run nft");
    }

    let mut cur = std::sync::Arc::new(desired(&grants, &rules, 0));
    let t = Instant::now();
    let first_stats = enforcer.apply(cur.clone(), Timestamp::now())?;
    let first = t.elapsed();
    assert_kind(first_stats.kind, ApplyKind::Full)?;

    // As the agent takes a delta from the controller: applied to the state it holds
    // (a persistent set: the change, not a copy), then enforced as the change it is.
    let head = jitgate_proto::encode(&vm, None, &rules, std::iter::empty(), now);
    let mut step =
        |cur: &mut std::sync::Arc<Desired>,
         added: &[GrantRef],
         removed: &[GrantRef],
         rev: usize|
         -> anyhow::Result<(std::time::Duration, jitgate_agent::enforce::ApplyStats)> {
            let to = jitgate_proto::DesiredState {
                revision: format!("{rev:032x}"),
                ..head.clone()
            };
            let wire = jitgate_proto::delta_of(&cur.revision, added, removed, &to);
            let t = Instant::now();
            let a = jitgate_proto::apply_delta_parts(cur, &wire).map_err(anyhow::Error::msg)?;
            let next = std::sync::Arc::new(a.state);
            let told = jitgate_agent::enforce::Told {
                base: &cur.revision,
                added: &a.added,
                removed: &a.removed,
            };
            let stats = enforcer.apply_change(next.clone(), told, Timestamp::now())?;
            let took = t.elapsed();
            *cur = next;
            Ok((took, stats))
        };

    // Each round: one single-address grant added, then one revoked; one prefix grant
    // added and revoked. The delta is built before the clock starts: what is timed is
    // the agent's apply (the delta applied to its state, the plan, the netlink batch,
    // the kernel commit).
    let mut add = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut add_kernel = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut remove = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut remove_kernel = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut prefix = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut rev = 1;
    let rounds = 200u32;
    for k in 0..rounds {
        let g = grant(elements as u32 + k, Timestamp::now())?;
        let (took, stats) = step(&mut cur, std::slice::from_ref(&g), &[], rev)?;
        add.record(took.as_micros() as u64)?;
        add_kernel.record(stats.kernel.as_micros() as u64)?;
        assert_kind(stats.kind, ApplyKind::Delta)?;
        grants.push(g);
        rev += 1;

        let gone = grants.remove(k as usize);
        let (took, stats) = step(&mut cur, &[], std::slice::from_ref(&gone), rev)?;
        remove.record(took.as_micros() as u64)?;
        remove_kernel.record(stats.kernel.as_micros() as u64)?;
        assert_kind(stats.kind, ApplyKind::Delta)?;
        rev += 1;

        let mut p = grant(2_000_000_000 + k, Timestamp::now())?;
        p.source = SourcePrefix::parse(&format!("192.168.{}.0/24", k % 256))
            .map_err(anyhow::Error::msg)?;
        let (took1, stats) = step(&mut cur, std::slice::from_ref(&p), &[], rev)?;
        assert_kind(stats.kind, ApplyKind::Delta)?;
        let (took2, stats2) = step(&mut cur, &[], std::slice::from_ref(&p), rev + 1)?;
        prefix.record((took1 + took2).as_micros() as u64)?;
        assert_kind(stats2.kind, ApplyKind::Delta)?;
        rev += 2;
    }
    // A change of rules rebuilds the whole table in one transaction.
    let mut rules2 = rules.clone();
    let mut user = deny_rule()?;
    user.name = "user-web".into();
    user.priority = 500;
    user.access = Access::Allow;
    user.origin = RuleOrigin::User;
    user.ports = vec![PortRange::single(
        Port::new(443).map_err(anyhow::Error::msg)?,
    )];
    rules2.insert(0, user);
    let d = desired(&grants, &rules2, rev);
    let t = Instant::now();
    let stats = enforcer.apply(d, Timestamp::now())?;
    let rebuild = t.elapsed();
    assert_kind(stats.kind, ApplyKind::Full)?;

    let t = Instant::now();
    let in_kernel = enforcer.kernel_elements()?.len();
    let dump = t.elapsed();

    println!(
        "jitgate-bench apply (real nftables {} in a fresh network namespace; deltas over netlink)",
        enforcer.nft().version().unwrap_or_default()
    );
    println!(
        "  table:          {elements} single-address grant elements (+1 deny rule); {in_kernel} elements read back over netlink in {:.1} ms",
        dump.as_secs_f64() * 1000.0
    );
    println!(
        "  first apply:    {:.1} ms (full table; nft -f alone {:.1} ms)",
        first.as_secs_f64() * 1000.0,
        first_stats.kernel.as_secs_f64() * 1000.0
    );
    println!(
        "  add 1 grant:    {} (kernel batch alone: {})",
        percentiles(&add),
        percentiles(&add_kernel)
    );
    println!(
        "  revoke 1 grant: {} (kernel batch alone: {})",
        percentiles(&remove),
        percentiles(&remove_kernel)
    );
    println!(
        "  prefix grant added then revoked (two applies): {}",
        percentiles(&prefix)
    );
    println!(
        "  rule change:    {:.1} ms (full rebuild of the table with every grant)",
        rebuild.as_secs_f64() * 1000.0
    );
    match peak_rss_kib(std::process::id()) {
        Some(kib) => println!(
            "  agent peak RSS (this process, holding the applied state): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("  agent peak RSS: unavailable"),
    }
    Ok(())
}

fn assert_kind(got: ApplyKind, want: ApplyKind) -> anyhow::Result<()> {
    if got != want {
        bail!("expected a {want:?} apply, the agent did {got:?}");
    }
    Ok(())
}
