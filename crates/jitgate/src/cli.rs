//! Command-line definitions (raw flags) and their dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::cmd;

#[derive(Parser)]
#[command(
    name = "jitgate",
    version,
    about = "Just-in-time network access: management ports closed until someone asks",
    after_help = crate::usage::exit_codes_text(),
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the controller.
    ///
    /// Example: jitgate serve --listen 127.0.0.1:8080 --data-dir ./jitgate-data
    Serve(Box<cmd::serve::ServeArgs>),
    /// Run the agent on a protected host (as root): enforce its VM's rules in nftables.
    ///
    /// Example: jitgate agent --controller https://jit.example.com:8443 --enroll-token-file /etc/jitgate/enroll-token --resource-group prod-web
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Agent(cmd::agent::AgentArgs),
    /// Run the agent of a Linux gateway (as root): enforce its own rules and those of
    /// the machines placed behind it (`jitgate vm place`), which run no agent, in its
    /// forward and NAT chains. It enrolls and restores like an agent.
    ///
    /// Example: jitgate gateway --controller https://jit.example.com:8443 --enroll-token-file /etc/jitgate/enroll-token --resource-group edge --name gw-1
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Gateway(cmd::agent::AgentArgs),
    /// Create, list and revoke enrollment tokens for agents.
    ///
    /// Example: jitgate enroll-token create --resource-group prod-web --uses 10 --expires-in 1d
    #[command(subcommand)]
    EnrollToken(cmd::enroll::EnrollTokenCommand),
    /// Sign in (with your organisation's identity provider, in a browser) or present a
    /// token, and store the controller URL and the credential for the other commands.
    ///
    /// Example: jitgate login https://jit.example.com:8443
    Login(cmd::login::LoginArgs),
    /// Sign out: revoke the sign-in's credential and forget it.
    ///
    /// Example: jitgate logout
    Logout(cmd::login::LogoutArgs),
    /// Protect machines with JIT: deny their management ports except on request.
    ///
    /// Example: jitgate enable web-1 web-2 --port 22 --max 3h
    Enable(cmd::policy::EnableArgs),
    /// Stop protecting machines (removes them from their policy).
    ///
    /// Example: jitgate disable web-1
    Disable(cmd::policy::DisableArgs),
    /// Ask for access to ports of machines, from your address (or a range), for a while.
    ///
    /// Example: jitgate request web-1 --port 22 --for 1h --reason "deploy fix"
    Request(cmd::access::RequestArgs),
    /// Get access to port 22 (reusing a live grant), wait until it opens, then run ssh.
    ///
    /// Example: jitgate ssh admin@web-1 -- -i ~/.ssh/id_ed25519
    Ssh(cmd::ssh::SshArgs),
    /// Get access to a port (reusing a live grant), wait until it opens, print where to connect.
    ///
    /// Example: jitgate connect win-1 --port 3389
    Connect(cmd::ssh::ConnectArgs),
    /// End access now: a request by id, or your live requests on a machine.
    ///
    /// Example: jitgate revoke web-1
    Revoke(cmd::access::RevokeArgs),
    /// List access requests.
    ///
    /// Example: jitgate requests --mine --active
    Requests(cmd::access::RequestsArgs),
    /// Requests waiting for your decision.
    ///
    /// Example: jitgate approvals
    Approvals(cmd::approvals::ApprovalsArgs),
    /// Approve a pending request (optionally for less time or from a narrower source).
    ///
    /// Example: jitgate approve 6f1c... --reason "CHG-1234" --for 30m
    Approve(cmd::approvals::ApproveArgs),
    /// Deny a pending request, saying why.
    ///
    /// Example: jitgate deny 6f1c... --reason "no change ticket"
    Deny(cmd::approvals::DenyArgs),
    /// Withdraw your own pending request.
    ///
    /// Example: jitgate cancel 6f1c...
    Cancel(cmd::approvals::CancelArgs),
    /// Mark a break-glass request reviewed.
    ///
    /// Example: jitgate review 6f1c...
    Review(cmd::approvals::ReviewArgs),
    /// Which machines still expose management ports (Healthy / Unhealthy / Not applicable).
    ///
    /// Example: jitgate recommendations --resource-group prod-web
    Recommendations(cmd::recommend::RecommendationsArgs),
    /// Print shell completions.
    ///
    /// Example: jitgate completions bash > /etc/bash_completion.d/jitgate
    Completions { shell: clap_complete::Shell },
    /// Print a man page (roff): the top page, or a verb's (`jitgate man ssh`).
    ///
    /// Example: jitgate man ssh | man -l -
    Man {
        /// A verb, or a verb and its subcommand (`jitgate man token create`).
        verb: Vec<String>,
    },
    /// Who you are to the controller: principal, roles, subscription, your address.
    ///
    /// Example: jitgate whoami
    Whoami(cmd::overview::WhoamiArgs),
    /// The controller at a glance: reachable, version, TLS, agents, live grants, audit chain.
    ///
    /// Example: jitgate status
    Status(cmd::overview::StatusArgs),
    /// Local administration of a controller's data directory.
    ///
    /// Example: sudo jitgate admin recover --data-dir /var/lib/jitgate
    #[command(subcommand)]
    Admin(cmd::admin::AdminCommand),
    /// Register, list and show protected machines.
    ///
    /// Example: jitgate vm show web-1
    #[command(subcommand)]
    Vm(cmd::vm::VmCommand),
    /// Create, list and revoke API tokens.
    ///
    /// Example: jitgate token create --principal alice@example.com --expires-in 30d
    #[command(subcommand)]
    Token(cmd::token::TokenCommand),
    /// Assign, list and remove roles.
    ///
    /// Example: jitgate role list --principal alice@example.com
    #[command(subcommand)]
    Role(cmd::role::RoleCommand),
    /// Show and verify the audit log (without a subcommand: show).
    ///
    /// Example: jitgate audit --vm web-1 --since 24h --follow
    Audit(cmd::audit::AuditArgs),
}

pub fn parse_fingerprint(text: &str) -> Result<jitgate_proto::tls::Fingerprint, String> {
    jitgate_proto::tls::Fingerprint::parse(text)
}

/// Where something applies: a resource group by name, or a full scope id; the
/// subscription when neither is given.
#[derive(Args, Clone)]
pub struct ScopeArgs {
    /// Scope id: /subscriptions/<id>, /subscriptions/<id>/resourceGroups/<name> or a
    /// machine's id [default: the subscription].
    #[arg(long, conflicts_with = "resource_group")]
    pub scope: Option<String>,
    /// A resource group of the subscription, by name (instead of --scope).
    #[arg(long)]
    pub resource_group: Option<String>,
}

/// As `ScopeArgs`, but one of the two must be given.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct RequiredScopeArgs {
    /// Scope id: /subscriptions/<id>, /subscriptions/<id>/resourceGroups/<name> or a
    /// machine's id.
    #[arg(long)]
    pub scope: Option<String>,
    /// A resource group of the subscription, by name (instead of --scope).
    #[arg(long)]
    pub resource_group: Option<String>,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Controller URL [default: from `jitgate login`, else http://127.0.0.1:8080].
    #[arg(long, env = "JITGATE_URL")]
    pub url: Option<String>,
    /// Bearer token.
    #[arg(long, env = "JITGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) for a controller with a private CA, or the controller's
    /// self-signed certificate (pinned as it is).
    #[arg(long, env = "JITGATE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => cmd::serve::serve(*args).await,
        Command::Agent(args) => cmd::agent::agent(args).await,
        Command::Gateway(args) => cmd::agent::gateway(args).await,
        Command::EnrollToken(c) => cmd::enroll::enroll_token(c).await,
        Command::Vm(c) => cmd::vm::vm(c).await,
        Command::Login(a) => cmd::login::login(a).await,
        Command::Logout(a) => cmd::login::logout(a).await,
        Command::Enable(a) => cmd::policy::enable(a).await,
        Command::Disable(a) => cmd::policy::disable(a).await,
        Command::Request(a) => cmd::access::request(a).await,
        Command::Ssh(a) => cmd::ssh::ssh(a).await,
        Command::Connect(a) => cmd::ssh::connect(a).await,
        Command::Revoke(a) => cmd::access::revoke(a).await,
        Command::Requests(a) => cmd::access::requests(a).await,
        Command::Approvals(a) => cmd::approvals::approvals(a).await,
        Command::Approve(a) => cmd::approvals::approve(a).await,
        Command::Deny(a) => cmd::approvals::deny(a).await,
        Command::Cancel(a) => cmd::approvals::cancel(a).await,
        Command::Review(a) => cmd::approvals::review(a).await,
        Command::Recommendations(a) => cmd::recommend::recommendations(a).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "jitgate", &mut out);
            write_stdout(&out)
        }
        Command::Man { verb } => write_stdout(&crate::man::page(&verb)?),
        Command::Whoami(a) => cmd::overview::whoami(a).await,
        Command::Status(a) => cmd::overview::status(a).await,
        Command::Token(c) => cmd::token::token(c).await,
        Command::Admin(c) => cmd::admin::admin(c).await,
        Command::Role(c) => cmd::role::role(c).await,
        Command::Audit(a) => cmd::audit::audit(a).await,
    }
}

/// Writes generated text; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}
