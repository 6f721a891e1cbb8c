//! `jitgate-bench replicas`: several controllers (this binary's `jitgate serve`, as
//! child processes) on one PostgreSQL database. Reports durable initiates per second
//! through all of them (clients spread over the replicas) with latency percentiles,
//! and the propagation of a grant made through one replica to an agent long-polling
//! another.
//!
//! Without `--database` it starts its own PostgreSQL (the newest installed) on
//! loopback with durability on: `fsync=on`, `synchronous_commit=on`, as a production
//! primary without a synchronous standby.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use super::BENCH_TOKEN;
use super::lab::{self, Child};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    #[arg(long, default_value_t = 10_000)]
    pub vms: usize,
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Propagation rounds (with two or more replicas).
    #[arg(long, default_value_t = 200)]
    pub rounds: usize,
    /// An existing PostgreSQL database (empty) instead of a throwaway server.
    #[arg(long)]
    pub database: Option<String>,
    /// Then, with the controllers stopped: what PostgreSQL alone takes of the rows
    /// initiates write (pgbench, one initiate per transaction, as many clients),
    /// durable and with synchronous_commit=off. Only on the throwaway server.
    #[arg(long, conflicts_with = "database")]
    pub ceiling: bool,
}

/// A durable throwaway PostgreSQL and the URL of its `jitgate` database.
fn start_postgres() -> String {
    let s = jitgate_store_sql::testpg::start_own(
        "jitgate-bench-pg",
        "-c fsync=on -c synchronous_commit=on -c shared_buffers=256MB",
    );
    s.psql("CREATE DATABASE jitgate");
    s.url("jitgate")
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let url = match &args.database {
        Some(u) => u.clone(),
        None => tokio::task::spawn_blocking(start_postgres).await?,
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * 2)
        .build()?;
    let mut children: Vec<Child> = Vec::new();
    let mut bases = Vec::new();
    let mut dirs = Vec::new();
    let mut sub = String::new();
    for _ in 0..args.replicas {
        let dir = lab::tempdir()?;
        let port = lab::free_port([127, 0, 0, 1].into())?;
        let (child, base, s) = lab::controller_with(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &dir,
            &http,
            &["--database", &url],
        )
        .await?;
        children.push(child);
        bases.push(base);
        dirs.push(dir);
        sub = s;
    }
    let setup = Instant::now();
    let groups = super::initiate::populate(&http, &bases[0], &sub, args.vms, args.clients).await?;
    let setup_secs = setup.elapsed().as_secs_f64();

    // Initiates through every replica at once.
    let (total, hist, elapsed) =
        super::initiate::drive_all(&http, &bases, &sub, args.vms, args.clients, args.seconds)
            .await?;

    // Propagation: an agent long-polls the last replica, grants go through the first.
    let propagation = if args.replicas > 1 {
        Some(propagation(&http, &bases[0], &bases[bases.len() - 1], &sub, args.rounds).await?)
    } else {
        None
    };

    println!("jitgate-bench replicas");
    println!(
        "  database:     PostgreSQL{}",
        if args.database.is_some() {
            " (given)"
        } else {
            " on loopback, fsync=on, synchronous_commit=on"
        }
    );
    println!(
        "  replicas:     {} controllers; {} VMs in {groups} policies set up through the first in {setup_secs:.1} s",
        args.replicas, args.vms
    );
    println!(
        "  clients:      {} concurrent, spread over the replicas, {} s",
        args.clients, args.seconds
    );
    println!(
        "  initiates:    {total} accepted (202) in {elapsed:.2} s = {:.0} /s",
        total as f64 / elapsed
    );
    println!("  latency:      {}", super::percentiles(&hist));
    if let Some(h) = propagation {
        println!(
            "  propagation:  initiate on replica 1 -> agent long-polling replica {}: {}",
            args.replicas,
            super::percentiles(&h)
        );
    }
    drop(children);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    if args.ceiling {
        let (clients, seconds) = (args.clients, args.seconds);
        let tps = tokio::task::spawn_blocking(move || ceiling(&url, clients, seconds)).await??;
        for (label, tps) in ["durable", "synchronous_commit=off"].into_iter().zip(tps) {
            println!(
                "  ceiling:      PostgreSQL alone (pgbench, an initiate's rows per transaction, {clients} clients, {label}): {tps:.0} /s"
            );
        }
    }
    Ok(())
}

/// Runs pgbench with `initiate-ceiling.sql` on `url`, durable and then with
/// `synchronous_commit=off`; returns both transactions-per-second figures.
fn ceiling(url: &str, clients: usize, seconds: u64) -> anyhow::Result<[f64; 2]> {
    use jitgate_store_sql::testpg;
    let bin = testpg::bin_dir();
    testpg::psql_at(
        &bin,
        url,
        "CREATE SEQUENCE IF NOT EXISTS ceiling_seq START 1000000000000",
    );
    let dir = lab::tempdir()?;
    let script = dir.join("initiate-ceiling.sql");
    std::fs::write(&script, include_str!("initiate-ceiling.sql"))?;
    let run = |options: &str| -> anyhow::Result<f64> {
        let out = std::process::Command::new(bin.join("pgbench"))
            .args(["-n", "-M", "prepared", "-j", "2", "-c"])
            .arg(clients.to_string())
            .arg("-T")
            .arg(seconds.to_string())
            .arg("-f")
            .arg(&script)
            .arg(url)
            .env("PGOPTIONS", options)
            .stdin(std::process::Stdio::null())
            .output()
            .context("cannot run pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "pgbench failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        text.lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no tps in pgbench's output: {text}"))
    };
    let tps = [run(""), run("-c synchronous_commit=off")];
    let _ = std::fs::remove_dir_all(&dir);
    let [durable, relaxed] = tps;
    Ok([durable?, relaxed?])
}

/// Enrolls a simulated agent through `a` for a VM in a policy, then `rounds` times:
/// the agent long-polls `b`, a grant is made through `a`, and the time from sending
/// the initiate to `b` answering the long-poll is recorded.
async fn propagation(
    http: &reqwest::Client,
    a: &str,
    b: &str,
    sub: &str,
    rounds: usize,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let et = lab::enroll_token(http, a, 1).await?;
    let en: serde_json::Value = http
        .post(format!("{a}/api/v1/agent/enroll"))
        .json(&json!({"enrollToken": et, "resourceGroup": "prop", "name": "agent-1"}))
        .send()
        .await?
        .json()
        .await?;
    let vm = en["vmId"].as_str().context("no vmId")?.to_owned();
    let agent = en["token"].as_str().context("no agent token")?.to_owned();
    let r = http
        .put(format!(
            "{a}/subscriptions/{sub}/resourceGroups/prop/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?api-version=2020-01-01"
        ))
        .bearer_auth(BENCH_TOKEN)
        .json(&json!({"kind": "Basic", "properties": {"virtualMachines": [{"id": vm, "ports": [
            {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT3H"}]}]}}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("policy: {}", r.text().await?);
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    // The revision the agent knows: read once, then each round's answer.
    let d: serde_json::Value = http
        .get(format!("{b}/api/v1/agent/desired?vm={vm}"))
        .bearer_auth(&agent)
        .send()
        .await?
        .json()
        .await?;
    let mut known = d["revision"].as_str().context("no revision")?.to_owned();
    for i in 0..rounds {
        let poll = {
            let (http, b, vm, agent, known) = (
                http.clone(),
                b.to_owned(),
                vm.clone(),
                agent.clone(),
                known.clone(),
            );
            tokio::spawn(async move {
                let r: serde_json::Value = http
                    .get(format!(
                        "{b}/api/v1/agent/desired?vm={vm}&known={known}&wait=30"
                    ))
                    .bearer_auth(agent)
                    .send()
                    .await?
                    .json()
                    .await?;
                anyhow::Ok((r, Instant::now()))
            })
        };
        // Let the long-poll reach the replica before the change.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let src = format!("10.200.{}.{}", i / 250, i % 250 + 1);
        let t = Instant::now();
        super::lab::initiate(
            http,
            &format!("{a}/subscriptions/{sub}/resourceGroups/prop/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default"),
            &json!({"virtualMachines": [{"id": vm, "ports": [
                {"number": 22, "allowedSourceAddressPrefix": src, "duration": "PT1H"}]}]}),
        )
        .await?;
        let (body, at) = poll.await??;
        if body["revision"] == known.as_str() {
            bail!("the long-poll on the other replica ended without the change");
        }
        hist.record(at.saturating_duration_since(t).as_micros().max(1) as u64)?;
        known = body["revision"].as_str().context("no revision")?.to_owned();
    }
    Ok(hist)
}
