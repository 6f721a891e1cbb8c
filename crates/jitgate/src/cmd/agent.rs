//! `jitgate agent`: flags to an `AgentConfig`, then the agent's loop until SIGTERM
//! (a clean stop that leaves the kernel table in place); `agent restore` for boot.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::cmd::serve::{init_logging, stop_signals};

#[derive(Subcommand, Clone)]
pub enum AgentCommand {
    /// The boot-time step, run before the network comes up: rebuild table inet jitgate
    /// from the last applied state (each grant with its remaining lifetime, expired ones
    /// dropped), with no network and no controller, so the machine boots closed.
    ///
    /// Example: jitgate agent restore --state-dir /var/lib/jitgate-agent
    Restore {
        /// Where the agent keeps its credential and last applied state.
        #[arg(
            long,
            env = "JITGATE_STATE_DIR",
            default_value = "/var/lib/jitgate-agent"
        )]
        state_dir: PathBuf,
        /// The nft binary.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
    /// Replace this machine's jitgate binary with the one the controller serves
    /// (trusted by the CA fingerprint pinned at enrollment, its SHA-256 checked,
    /// written beside the old one and renamed over it). Then restart the agent to run
    /// it (`systemctl restart jitgate-agent`): live grants are kept across restarts.
    ///
    /// Example: jitgate agent upgrade
    Upgrade {
        /// Where the agent keeps its credential (it names the controller).
        #[arg(
            long,
            env = "JITGATE_STATE_DIR",
            default_value = "/var/lib/jitgate-agent"
        )]
        state_dir: PathBuf,
        /// The binary to replace [default: this one].
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub cmd: Option<AgentCommand>,
    /// Controller URL.
    #[arg(long, env = "JITGATE_CONTROLLER", required = true)]
    pub controller: Option<String>,
    /// Enrollment token (needed until the agent has its own credential). Prefer
    /// --enroll-token-file or the environment: a command line is visible in `ps`.
    #[arg(
        long,
        env = "JITGATE_ENROLL_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub enroll_token: Option<String>,
    /// File holding the enrollment token (`-` reads it from standard input). Once the
    /// agent has enrolled, a missing file is no error (the installer removes the used
    /// token).
    #[arg(
        long,
        env = "JITGATE_ENROLL_TOKEN_FILE",
        conflicts_with = "enroll_token"
    )]
    pub enroll_token_file: Option<PathBuf>,
    /// Resource group of this machine.
    #[arg(long, env = "JITGATE_RESOURCE_GROUP", required = true)]
    pub resource_group: Option<String>,
    /// Machine name [default: the hostname].
    #[arg(long, env = "JITGATE_VM_NAME")]
    pub name: Option<String>,
    /// Location label (e.g. westeurope).
    #[arg(long, env = "JITGATE_LOCATION")]
    pub location: Option<String>,
    /// Where the agent keeps its credential and last applied state.
    #[arg(
        long,
        env = "JITGATE_STATE_DIR",
        default_value = "/var/lib/jitgate-agent"
    )]
    pub state_dir: PathBuf,
    /// PEM CA certificate of a controller with a private CA (or the controller's
    /// self-signed certificate, pinned as it is).
    #[arg(long, env = "JITGATE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// SHA-256 fingerprint of the controller's CA to pin (`jitgate serve` prints it;
    /// enrollment tokens created over HTTPS carry it, so it is rarely needed).
    #[arg(long, env = "JITGATE_CA_FINGERPRINT", value_parser = crate::cli::parse_fingerprint)]
    pub ca_fingerprint: Option<jitgate_proto::tls::Fingerprint>,
    /// The nft binary.
    #[arg(long, default_value = "nft")]
    pub nft: PathBuf,
    /// Seconds between status reports when nothing changes.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_secs: u64,
    /// Seconds between full comparisons of table inet jitgate with what the agent
    /// applied. A change by another process is caught at once from the kernel's
    /// change notifications; this is the backstop.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub drift_check_secs: u64,
    /// Log format: text or json.
    #[arg(long, env = "JITGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    run(args, false).await
}

/// `jitgate gateway`: the agent, also enforcing the machines placed behind it.
pub async fn gateway(args: AgentArgs) -> anyhow::Result<ExitCode> {
    run(args, true).await
}

async fn run(args: AgentArgs, gateway: bool) -> anyhow::Result<ExitCode> {
    init_logging(&args.log_format)?;
    if let Some(AgentCommand::Upgrade { state_dir, binary }) = &args.cmd {
        let binary = match binary {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("cannot find this binary; give --binary")?,
        };
        let u = jitgate_agent::upgrade::upgrade(state_dir, &binary).await?;
        if u.replaced {
            println!(
                "replaced {} with the controller's binary (sha256 {}); restart the agent to run it: systemctl restart jitgate-agent (live grants are kept)",
                u.path.display(),
                u.sha256
            );
        } else {
            println!(
                "{} already is the controller's binary (sha256 {}): nothing to do",
                u.path.display(),
                u.sha256
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(AgentCommand::Restore { state_dir, nft }) = args.cmd {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        return match jitgate_agent::restore(&state_dir, nft)? {
            Some(r) => {
                if let Some(own) = r.own {
                    println!(
                        "restored table inet jitgate (revision {}, {} live grant{})",
                        own.revision,
                        own.grants,
                        plural(own.grants)
                    );
                }
                if let Some(g) = r.gateway {
                    println!(
                        "restored table inet jitgate_gw ({} machine{} behind this gateway, {} live grant{})",
                        g.machines,
                        plural(g.machines),
                        g.grants,
                        plural(g.grants)
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            None => {
                println!(
                    "no saved state in {}: nothing to restore (the agent has not applied a state yet)",
                    state_dir.display()
                );
                Ok(ExitCode::SUCCESS)
            }
        };
    }
    let name = match args.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the hostname; give --name")?
            .trim()
            .to_owned(),
    };
    let mut config = jitgate_agent::AgentConfig::new(
        args.controller
            .as_deref()
            .context("--controller is required")?,
        args.resource_group
            .as_deref()
            .context("--resource-group is required")?,
        &name,
        args.state_dir,
    );
    let enrolled = config.state_dir.join("credentials.json").exists();
    config.enroll_token = match (&args.enroll_token_file, args.enroll_token) {
        (Some(path), _) if enrolled && !path.exists() => None,
        (Some(path), _) => Some(jitgate_proto::Secret::new(
            read_secret(path).context("--enroll-token-file")?,
        )),
        (None, t) => t.map(jitgate_proto::Secret::new),
    };
    config.location = args.location;
    config.ca_cert = args.ca_cert;
    config.ca_fingerprint = args.ca_fingerprint;
    config.nft = args.nft;
    config.heartbeat = std::time::Duration::from_secs(args.heartbeat_secs.max(1));
    config.drift_check = std::time::Duration::from_secs(args.drift_check_secs);
    config.gateway = gateway;
    if gateway {
        check_forwarding();
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (mut term, mut int) = stop_signals()?;
    let task = tokio::spawn(jitgate_agent::run(config, rx));
    tokio::select! {
        r = task => {
            return match r.context("agent task")? {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) if e.downcast_ref::<jitgate_agent::Replaced>().is_some()
                    || e.downcast_ref::<jitgate_agent::Permanent>().is_some() => {
                    tracing::error!(error = %format!("{e:#}"), "stopping for good");
                    // EX_CONFIG: the unit does not restart on it (RestartPreventExitStatus).
                    Ok(ExitCode::from(78))
                }
                Err(e) => Err(e),
            };
        }
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("agent stopping; the kernel keeps enforcing the applied state");
    let _ = tx.send(true);
    Ok(ExitCode::SUCCESS)
}

/// A gateway forwards: warn when the kernel would not (the grants would open nothing).
fn check_forwarding() {
    for (file, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ] {
        if std::fs::read_to_string(file).is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(
                "{what} is 0: this gateway does not forward, so machines behind it are unreachable even with a grant (sysctl -w {what}=1)"
            );
        }
    }
}

/// A secret from a file, or from standard input for `-`; surrounding whitespace
/// (the newline) is dropped, and an empty secret is an error.
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text = if path.as_os_str() == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
            .context("cannot read standard input")?;
        t
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let t = text.trim();
    if t.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(t.to_owned())
}
