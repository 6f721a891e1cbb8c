//! `jitgate-bench`: jitgate's benchmarks, a binary of its own so that the shipped
//! `jitgate` holds only the product. Each starts real parts (the `jitgate` binary as
//! the controller on a fresh SQLite directory and as the agent, real nftables in
//! network namespaces, real TCP) and prints its figures; none asserts timing.
//!
//! The `jitgate` binary is found in `$JITGATE_BIN`, else beside this one (both are in
//! `target/release` after `cargo build --release -p jitgate -p jitgate-bench`).

mod agents;
mod apply;
mod expiry;
mod gateway;
mod initiate;
mod lab;
mod propagation;
mod reads;
mod replicas;
mod rig;

use clap::{Parser, Subcommand};

pub use lab::{BENCH_TOKEN, Child, peak_rss_kib};

/// jitgate's benchmarks: each prints its figures.
#[derive(Parser)]
#[command(name = "jitgate-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Initiates per second against a real controller on SQLite.
    ///
    /// Example: jitgate-bench initiate --vms 10000 --clients 8 --seconds 20
    Initiate {
        /// Registered VMs, all in policies (100 per resource group).
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// How long to drive initiates.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Keep the data directory here instead of a temporary one.
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// Time from sending an initiate to the protected port answering a TCP connect,
    /// through a real controller and a real agent in a network namespace (root only).
    ///
    /// Example: jitgate-bench propagation --grants 200
    ///
    /// With --approval, an approval rule covers the port: each request waits, and the
    /// time measured is from sending the approval to the port answering.
    Propagation {
        #[arg(long, default_value_t = 200)]
        grants: usize,
        #[arg(long)]
        approval: bool,
        /// Other live grants on the VM before the rounds start (one per source
        /// address, through the API like any other).
        #[arg(long, default_value_t = 0)]
        background: usize,
    },
    /// Time from sending an initiate to the port of a machine behind a DNAT gateway
    /// answering on the gateway's public address and mapped port, through a real
    /// controller and a real `jitgate gateway` (root only); optionally with many
    /// machines behind the gateway and live grants across them.
    ///
    /// Example: jitgate-bench gateway --rounds 200 --machines 1000 --background 10000
    Gateway {
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        /// Machines behind the gateway (one real, the others at addresses where
        /// nothing answers).
        #[arg(long, default_value_t = 1)]
        machines: usize,
        /// Other live grants, spread across the machines.
        #[arg(long, default_value_t = 0)]
        background: usize,
    },
    /// Agent apply time of a change to a table holding many grant elements, in a fresh
    /// network namespace (root only), and the agent's memory.
    ///
    /// Example: jitgate-bench apply --elements 10000
    Apply {
        #[arg(long, default_value_t = 10_000)]
        elements: usize,
        /// Run inside an already prepared namespace (used by the benchmark itself).
        #[arg(long, hide = true)]
        inner: bool,
    },
    /// When grants really close relative to their end time, also with the controller
    /// and the agent killed (root only).
    ///
    /// Example: jitgate-bench expiry --grants 30 --killed 5
    Expiry {
        #[arg(long, default_value_t = 30)]
        grants: usize,
        /// Extra rounds in which the controller and the agent are killed during the grant.
        #[arg(long, default_value_t = 5)]
        killed: usize,
    },
    /// How reads scale with the number of VMs: one VM's view, the lookup by name,
    /// pages of 100, the recommendations summary, `jitgate vm show` and the dashboard's
    /// pages, against a
    /// real controller on SQLite.
    ///
    /// Example: jitgate-bench reads --vms 100000
    Reads {
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        /// Calls timed per kind of read.
        #[arg(long, default_value_t = 200)]
        rounds: usize,
    },
    /// Several controllers on one PostgreSQL database: durable initiates per second
    /// through all of them, and propagation from a grant made through one replica to an
    /// agent long-polling another. Starts its own PostgreSQL (the newest installed) unless --database.
    ///
    /// Example: jitgate-bench replicas --replicas 2 --clients 16 --seconds 20
    Replicas(replicas::Args),
    /// Propagation to simulated agents: many long-polling agents connected to one
    /// controller; time from initiate to the VM's agent receiving its new state.
    ///
    /// Example: jitgate-bench agents --agents 1000 --grants 200
    Agents {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 200)]
        grants: usize,
    },
}

async fn run(cmd: BenchCommand) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        BenchCommand::Initiate {
            vms,
            clients,
            seconds,
            data_dir,
        } => {
            let tmp = lab::tempdir()?;
            let dir = data_dir.unwrap_or_else(|| tmp.clone());
            let r = initiate::initiate(vms, clients.max(1), seconds, &dir).await;
            let _ = std::fs::remove_dir_all(&tmp);
            r?;
        }
        BenchCommand::Propagation {
            grants,
            approval,
            background,
        } => propagation::run(grants.max(1), approval, background).await?,
        BenchCommand::Gateway {
            rounds,
            machines,
            background,
        } => gateway::run(rounds.max(1), machines.max(1), background).await?,
        BenchCommand::Reads { vms, rounds } => {
            let tmp = lab::tempdir()?;
            let r = reads::run(vms.max(1), rounds.max(1), &tmp).await;
            let _ = std::fs::remove_dir_all(&tmp);
            r?;
        }
        BenchCommand::Apply { elements, inner } => apply::run(elements.max(1), inner).await?,
        BenchCommand::Expiry { grants, killed } => expiry::run(grants.max(1), killed).await?,
        BenchCommand::Replicas(mut args) => {
            args.replicas = args.replicas.max(1);
            args.vms = args.vms.max(1);
            args.clients = args.clients.max(1);
            args.rounds = args.rounds.max(1);
            replicas::run(args).await?
        }
        BenchCommand::Agents { agents, grants } => {
            agents::run(agents.max(1), grants.max(1)).await?
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Prints p50/p90/p99/max of a histogram in microseconds as milliseconds.
pub fn percentiles(h: &hdrhistogram::Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.9) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // reqwest is built without a default TLS provider: the workspace's is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // On a worker thread, as `jitgate` runs its commands: the HTTP client's connection
    // tasks then run beside the caller instead of a thread wake-up away.
    let ran = match tokio::spawn(run(cli.command)).await {
        Ok(r) => r,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(anyhow::anyhow!("cancelled: {e}")),
        },
    };
    match ran {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jitgate-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
