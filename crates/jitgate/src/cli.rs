//! Command-line definitions (raw flags) and their dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::Client;
use crate::human;
use crate::table::Table;
use crate::usage::{FlagMap, bad_flag, name_flags};

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
    Serve(ServeArgs),
    /// Run the agent on a protected host (as root): enforce its VM's rules in nftables.
    ///
    /// Example: jitgate agent --controller https://jit.example.com:8443 --enroll-token-file /etc/jitgate/enroll-token --resource-group prod-web
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Agent(AgentArgs),
    /// Create, list and revoke enrollment tokens for agents.
    ///
    /// Example: jitgate enroll-token create --resource-group prod-web --uses 10 --expires-in 1d
    #[command(subcommand)]
    EnrollToken(EnrollTokenCommand),
    /// Store the controller URL and your token for the other commands.
    ///
    /// Example: jitgate login https://jit.example.com:8443 --token-stdin < my-token
    Login(crate::people::LoginArgs),
    /// Protect machines with JIT: deny their management ports except on request.
    ///
    /// Example: jitgate enable web-1 web-2 --port 22 --max 3h
    Enable(crate::people::EnableArgs),
    /// Stop protecting machines (removes them from their policy).
    ///
    /// Example: jitgate disable web-1
    Disable(crate::people::DisableArgs),
    /// Ask for access to ports of machines, from your address (or a range), for a while.
    ///
    /// Example: jitgate request web-1 --port 22 --for 1h --reason "deploy fix"
    Request(crate::people::RequestArgs),
    /// Get access to port 22 (reusing a live grant), wait until it opens, then run ssh.
    ///
    /// Example: jitgate ssh admin@web-1 -- -i ~/.ssh/id_ed25519
    Ssh(crate::people::SshArgs),
    /// Get access to a port (reusing a live grant), wait until it opens, print where to connect.
    ///
    /// Example: jitgate connect win-1 --port 3389
    Connect(crate::people::ConnectArgs),
    /// End access now: a request by id, or your live requests on a machine.
    ///
    /// Example: jitgate revoke web-1
    Revoke(crate::people::RevokeArgs),
    /// List access requests.
    ///
    /// Example: jitgate requests --mine --active
    Requests(crate::people::RequestsArgs),
    /// Which machines still expose management ports (Healthy / Unhealthy / Not applicable).
    ///
    /// Example: jitgate recommendations --resource-group prod-web
    Recommendations(crate::people::RecommendationsArgs),
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
    Whoami(crate::overview::WhoamiArgs),
    /// The controller at a glance: reachable, version, TLS, agents, live grants, audit chain.
    ///
    /// Example: jitgate status
    Status(crate::overview::StatusArgs),
    /// Local administration of a controller's data directory.
    ///
    /// Example: sudo jitgate admin recover --data-dir /var/lib/jitgate
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Register, list and show protected machines.
    ///
    /// Example: jitgate vm show web-1
    #[command(subcommand)]
    Vm(VmCommand),
    /// Create, list and revoke API tokens.
    ///
    /// Example: jitgate token create --principal alice@example.com --expires-in 30d
    #[command(subcommand)]
    Token(TokenCommand),
    /// Assign, list and remove roles.
    ///
    /// Example: jitgate role list --principal alice@example.com
    #[command(subcommand)]
    Role(RoleCommand),
    /// Show and verify the audit log (without a subcommand: show).
    ///
    /// Example: jitgate audit --vm web-1 --since 24h --follow
    Audit(AuditArgs),
    /// Benchmarks.
    ///
    /// Example: jitgate bench initiate --vms 10000 --clients 8 --seconds 20
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// TOML file with any of: listen, data_dir, tls_cert, tls_key, insecure_http, log_format.
    #[arg(long, env = "JITGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "JITGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database and the bootstrap token [default: ./jitgate-data].
    #[arg(long, env = "JITGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "JITGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "JITGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (not recommended: tokens cross the
    /// network in clear text). Without a certificate and without this flag, a
    /// non-loopback address is served over HTTPS with the controller's own CA.
    #[arg(long, env = "JITGATE_INSECURE_HTTP")]
    pub insecure_http: bool,
    /// Serve HTTPS with the controller's own CA also on a loopback address (on other
    /// addresses it is the default when no --tls-cert is given).
    #[arg(long, env = "JITGATE_AUTO_TLS", conflicts_with_all = ["tls_cert", "insecure_http"])]
    pub auto_tls: bool,
    /// Another name (DNS name or IP address) for the controller's own certificate,
    /// besides the listen address, the hostname and localhost. Repeatable.
    #[arg(long = "tls-san", env = "JITGATE_TLS_SAN", value_delimiter = ',', value_parser = parse_tls_san)]
    pub tls_sans: Vec<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "JITGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Management ports for recommendations [default: 22,3389,5985,5986].
    #[arg(long, env = "JITGATE_MANAGEMENT_PORTS", value_delimiter = ',')]
    pub management_ports: Option<Vec<u16>>,
    /// Seconds without a report after which an agent counts as offline [default: 60].
    #[arg(long, env = "JITGATE_AGENT_OFFLINE_AFTER")]
    pub agent_offline_after: Option<u64>,
    /// Use this as the bootstrap Owner token at first start instead of generating one.
    #[arg(
        long,
        env = "JITGATE_BOOTSTRAP_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub bootstrap_token: Option<String>,
    /// File the signed audit checkpoints are appended to; better on another volume
    /// than the database [default: <data-dir>/audit-checkpoints.jsonl].
    #[arg(long, env = "JITGATE_AUDIT_CHECKPOINTS")]
    pub audit_checkpoints: Option<PathBuf>,
    /// Serve even though the audit log does not match its newest signed checkpoint
    /// (deleted, rewritten or truncated events). The decision is audited.
    #[arg(long)]
    pub accept_audit_break: bool,
    /// Refused calls per source address (IPv6: per /64) written to the audit log one by
    /// one in each 10 s window; more are counted and summarized [default: 100].
    #[arg(long, env = "JITGATE_REFUSALS_AUDITED")]
    pub refusals_audited: Option<u32>,
    /// Refused calls per source and 10 s window after which calls without a valid
    /// credential get 429 [default: 300].
    #[arg(long, env = "JITGATE_REFUSALS_BLOCK_AFTER")]
    pub refusals_block_after: Option<u32>,
    /// Most connections open at once (one per agent long-poll), also bounded by the
    /// open-file limit [default: 16384].
    #[arg(long, env = "JITGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most writes waiting for the database; a write beyond it is answered 503 with
    /// Retry-After instead of waiting longer [default: 4096].
    #[arg(long, env = "JITGATE_WRITE_QUEUE")]
    pub write_queue: Option<usize>,
    /// How long blocked-attempt points (agents' deny-rule counters) are kept, e.g.
    /// 30d, 2160h or P90D; older ones are deleted hourly [default: 30d; at least 1d].
    #[arg(long, env = "JITGATE_BLOCKED_ATTEMPTS_RETENTION", value_parser = parse_retention)]
    pub blocked_attempts_retention: Option<u64>,
}

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
    /// File holding the enrollment token (`-` reads it from standard input).
    #[arg(long, conflicts_with = "enroll_token")]
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
    #[arg(long, env = "JITGATE_CA_FINGERPRINT", value_parser = parse_fingerprint)]
    pub ca_fingerprint: Option<jitgate_proto::tls::Fingerprint>,
    /// The nft binary.
    #[arg(long, default_value = "nft")]
    pub nft: PathBuf,
    /// Seconds between status reports when nothing changes.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_secs: u64,
    /// Log format: text or json.
    #[arg(long, env = "JITGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Mint a new Owner token when every Owner credential is lost. Runs on the
    /// controller's machine, as root or the data directory's owner, with the controller
    /// stopped; audited. Prints the token once.
    ///
    /// Example: sudo jitgate admin recover --data-dir /var/lib/jitgate
    Recover {
        #[arg(long)]
        data_dir: PathBuf,
        /// The controller's checkpoint file, if not the default.
        #[arg(long)]
        audit_checkpoints: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum EnrollTokenCommand {
    /// Create an enrollment token (printed once).
    ///
    /// Example: jitgate enroll-token create --resource-group prod-web --uses 10 --expires-in 1d
    Create {
        #[command(flatten)]
        scope: ScopeArgs,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime, e.g. 1d, 12h or ISO 8601 (P1D) [default: 1d].
        #[arg(long)]
        expires_in: Option<String>,
        /// A note for the token list.
        #[arg(long)]
        description: Option<String>,
        /// May enroll a machine whose agent is online, replacing that agent (for a
        /// reinstall). Without it, such an enrollment is refused.
        #[arg(long)]
        allow_replace: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke an enrollment token: it enrolls nothing more.
    ///
    /// Example: jitgate enroll-token revoke 3f2a9c...
    Revoke {
        /// The token's id (as listed; `je_<id>.<secret>` also works).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List enrollment tokens (never their secrets).
    ///
    /// Example: jitgate enroll-token list
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure_http: Option<bool>,
    auto_tls: Option<bool>,
    tls_san: Option<Vec<String>>,
    log_format: Option<String>,
    management_ports: Option<Vec<u16>>,
    agent_offline_after: Option<u64>,
    audit_checkpoints: Option<PathBuf>,
    refusals_audited: Option<u32>,
    refusals_block_after: Option<u32>,
    max_connections: Option<usize>,
    write_queue: Option<usize>,
    blocked_attempts_retention: Option<String>,
}

/// A retention in seconds: a duration of at least a day (the VM view and the blocked
/// series show the last 24 hours by default).
pub fn parse_retention(text: &str) -> Result<u64, String> {
    let secs = crate::human::parse_secs(text)?;
    if secs < 86_400 {
        return Err(format!(
            "'{text}' is less than 1d: blocked attempts of the last 24 hours are shown by default"
        ));
    }
    Ok(secs as u64)
}

pub fn parse_tls_san(text: &str) -> Result<String, String> {
    jitgate_controller::tls::parse_san(text)
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

#[derive(Subcommand)]
pub enum VmCommand {
    /// Register a machine without an agent.
    ///
    /// Example: jitgate vm register prod-web web-1 --location westeurope
    Register {
        resource_group: String,
        name: String,
        #[arg(long)]
        location: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a machine: policy, NSG rules, live grants with time left, agent, last access.
    ///
    /// Example: jitgate vm show web-1
    Show {
        /// Machine: name, resource-group/name, or full id.
        vm: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List registered machines.
    ///
    /// Example: jitgate vm list --resource-group prod-web
    List {
        #[arg(long)]
        resource_group: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a machine's NSG: user rules, JIT deny rules and live grants, with priorities.
    ///
    /// Example: jitgate vm nsg prod-web web-1
    Nsg {
        resource_group: String,
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token for a principal; the token is printed once.
    ///
    /// Example: jitgate token create --principal alice@example.com --expires-in P30D
    Create {
        /// Who the token is for (e.g. alice@example.com).
        #[arg(long)]
        principal: String,
        /// A note for the token list.
        #[arg(long)]
        description: Option<String>,
        /// Lifetime, e.g. 12h, 30d or ISO 8601 (P30D) [default: never expires].
        #[arg(long)]
        expires_in: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List tokens (never their secrets).
    ///
    /// Example: jitgate token list --json
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a token by id.
    ///
    /// Example: jitgate token revoke 3f9a1c2b4d5e
    Revoke {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
pub enum RoleCommand {
    /// Give a principal a role at a scope.
    ///
    /// Example: jitgate role assign --principal alice --role "JIT Requester" --resource-group prod-web
    Assign {
        /// Who gets the role (a token's principal).
        #[arg(long)]
        principal: String,
        /// Owner, JIT Administrator, JIT Requester, JIT Approver, Reader or Agent.
        #[arg(long)]
        role: String,
        #[command(flatten)]
        scope: RequiredScopeArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List role assignments.
    ///
    /// Example: jitgate role list --principal alice@example.com
    List {
        #[arg(long)]
        principal: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a role assignment by id (see `jitgate role list`).
    ///
    /// Example: jitgate role remove 0b6c1e5a-7f2d-4c8e-9a41-3d5f6e7a8b9c
    Remove {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub cmd: Option<AuditCommand>,
    #[command(flatten)]
    pub show: crate::people::AuditShowArgs,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Show audit events (oldest first), optionally following new ones.
    ///
    /// Example: jitgate audit show --vm web-1 --since 24h
    Show(crate::people::AuditShowArgs),
    /// Verify the hash chain: offline on a data directory, or through the API.
    ///
    /// Example: jitgate audit verify --data-dir ./jitgate-data
    Verify {
        /// Verify the database in this data directory directly (no controller needed).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Signed checkpoints to check the chain against (with --data-dir)
        /// [default: <data-dir>/audit-checkpoints.jsonl].
        #[arg(long, requires = "data_dir")]
        checkpoints: Option<PathBuf>,
        /// The controller's audit public key, hex, or a file holding it; trust this
        /// rather than the copy in the data directory (with --data-dir)
        /// [default: <data-dir>/audit-signing.pub].
        #[arg(long, requires = "data_dir")]
        public_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// The checkpoints and key for an offline verify; None when there are none at all.
fn offline_anchors(
    dir: &std::path::Path,
    checkpoints: Option<PathBuf>,
    public_key: Option<String>,
) -> anyhow::Result<Option<jitgate_store::AnchorSet>> {
    use jitgate_controller::checkpoint::{CHECKPOINT_FILE, PUBLIC_KEY_FILE};
    let cp_path = checkpoints.unwrap_or_else(|| dir.join(CHECKPOINT_FILE));
    let key_text = match public_key {
        Some(k) if std::path::Path::new(&k).is_file() => std::fs::read_to_string(&k)
            .with_context(|| format!("cannot read the public key file {k}"))?,
        Some(k) => k,
        None => match std::fs::read_to_string(dir.join(PUBLIC_KEY_FILE)) {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
    };
    let key = jitgate_core::audit::CheckpointPublicKey::parse(&key_text)
        .map_err(|e| anyhow::anyhow!("--public-key: {e}"))?;
    let checkpoints = jitgate_store::checkpoint::read(&cp_path)?;
    Ok(Some(jitgate_store::AnchorSet { key, checkpoints }))
}

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JITGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never into journald or a file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        "text" => builder.try_init(),
        "json" => builder.json().try_init(),
        other => bail!("--log-format: '{other}' is not text or json"),
    }
    .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// Flags over environment over file over defaults.
fn serve_config(args: ServeArgs) -> anyhow::Result<(jitgate_controller::Config, String)> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{} is not a valid config file", path.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("./jitgate-data"));
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
    ) {
        (Some(cert), Some(key)) => Some(jitgate_controller::TlsFiles { cert, key }),
        (None, None) => None,
        _ => bail!("give both tls_cert and tls_key, or neither"),
    };
    let mut config = jitgate_controller::Config::new(listen, data_dir);
    config.tls = tls;
    config.insecure_http = args.insecure_http || file.insecure_http.unwrap_or(false);
    config.auto_tls = args.auto_tls || file.auto_tls.unwrap_or(false);
    config.tls_sans = args.tls_sans;
    for san in file.tls_san.unwrap_or_default() {
        config.tls_sans.push(
            jitgate_controller::tls::parse_san(&san)
                .map_err(|e| anyhow::anyhow!("tls_san: {e}"))?,
        );
    }
    if config.tls.is_some() && config.auto_tls {
        bail!("auto_tls: the controller's own CA and a given tls_cert exclude each other");
    }
    if config.tls.is_some() && !config.tls_sans.is_empty() {
        bail!(
            "--tls-san names the controller's own certificate; with --tls-cert, put the names in that certificate"
        );
    }
    config.bootstrap_token = args.bootstrap_token.map(jitgate_proto::Secret::new);
    config.audit_checkpoints = args.audit_checkpoints.or(file.audit_checkpoints);
    config.accept_audit_break = args.accept_audit_break;
    if let Some(n) = args.refusals_audited.or(file.refusals_audited) {
        config.limits.audit_burst = n;
    }
    if let Some(n) = args.refusals_block_after.or(file.refusals_block_after) {
        config.limits.block_after = n;
    }
    if let Some(n) = args.max_connections.or(file.max_connections) {
        if n < 16 {
            bail!("max_connections: must be at least 16");
        }
        config.limits.max_connections = n;
    }
    if let Some(n) = args.write_queue.or(file.write_queue) {
        if n == 0 {
            bail!("write_queue: must be at least 1");
        }
        config.write_queue = n;
    }
    let retention = match (
        args.blocked_attempts_retention,
        file.blocked_attempts_retention,
    ) {
        (Some(secs), _) => Some(secs),
        (None, Some(text)) => Some(
            parse_retention(&text)
                .map_err(|e| anyhow::anyhow!("blocked_attempts_retention: {e}"))?,
        ),
        (None, None) => None,
    };
    if let Some(secs) = retention {
        config.blocked_retention = std::time::Duration::from_secs(secs);
    }
    if let Some(ports) = args.management_ports.or(file.management_ports) {
        if ports.is_empty() || ports.contains(&0) {
            bail!("management_ports: give ports from 1 to 65535");
        }
        config.recommend.management_ports = ports;
    }
    if let Some(secs) = args.agent_offline_after.or(file.agent_offline_after) {
        if secs == 0 {
            bail!("agent_offline_after: must be at least 1 second");
        }
        config.recommend.offline_after = jiff::SignedDuration::from_secs(secs as i64);
    }
    let log_format = args
        .log_format
        .or(file.log_format)
        .unwrap_or_else(|| "text".to_owned());
    Ok((config, log_format))
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (config, log_format) = serve_config(args)?;
    init_logging(&log_format)?;
    // Handlers first: a signal that arrives while the controller starts is then still
    // a graceful stop, not the default (immediate) death.
    let (mut term, mut int) = stop_signals()?;
    let running = jitgate_controller::start(config).await?;
    tokio::select! {
        _ = int.recv() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
    }
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

pub fn print(json: bool, v: &Value, table: impl FnOnce(&Value)) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
}

pub fn items(v: &Value) -> &[Value] {
    v["value"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Agent(args) => agent(args).await,
        Command::EnrollToken(cmd) => enroll_token(cmd).await,
        Command::Vm(cmd) => vm(cmd).await,
        Command::Login(a) => crate::people::login(a).await,
        Command::Enable(a) => crate::people::enable(a).await,
        Command::Disable(a) => crate::people::disable(a).await,
        Command::Request(a) => crate::people::request(a).await,
        Command::Ssh(a) => crate::people::ssh(a).await,
        Command::Connect(a) => crate::people::connect(a).await,
        Command::Revoke(a) => crate::people::revoke(a).await,
        Command::Requests(a) => crate::people::requests(a).await,
        Command::Recommendations(a) => crate::people::recommendations(a).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "jitgate", &mut out);
            write_stdout(&out)
        }
        Command::Man { verb } => write_stdout(&crate::man::page(&verb)?),
        Command::Whoami(a) => crate::overview::whoami(a).await,
        Command::Status(a) => crate::overview::status(a).await,
        Command::Token(cmd) => token(cmd).await,
        Command::Admin(AdminCommand::Recover {
            data_dir,
            audit_checkpoints,
        }) => {
            let token = jitgate_controller::recover(&data_dir, audit_checkpoints).await?;
            eprintln!(
                "new Owner token for principal recovery-admin (shown once; revoke it once you have another Owner):"
            );
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Role(cmd) => role(cmd).await,
        Command::Audit(AuditArgs { cmd: Some(cmd), .. }) => audit(cmd).await,
        Command::Audit(AuditArgs { cmd: None, show }) => crate::people::audit_show(show).await,
        Command::Bench(cmd) => crate::bench::run(cmd).await,
    }
}

async fn vm(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Show { vm, client } => return crate::people::vm_show(&vm, &client).await,
        VmCommand::Register {
            resource_group,
            name,
            location,
            client,
        } => {
            let c = Client::new(&client)?;
            let v = c
                .post(
                    "/api/v1/vms",
                    &json!({"resourceGroup": resource_group, "name": name, "location": location}),
                )
                .await
                .map_err(|e| {
                    name_flags(
                        e,
                        &[
                            ("resourceGroup", "RESOURCE_GROUP"),
                            ("name", "NAME"),
                            ("location", "--location"),
                        ],
                    )
                })?;
            print(client.json, &v, |v| println!("registered {}", s(&v["id"])));
        }
        VmCommand::List {
            resource_group,
            client,
        } => {
            let c = Client::new(&client)?;
            let q: Vec<(&str, String)> = resource_group
                .map(|rg| ("resourceGroup", rg))
                .into_iter()
                .collect();
            let v = c
                .get_all_pages("/api/v1/vms", &q)
                .await
                .map_err(|e| name_flags(e, &[("resourceGroup", "--resource-group")]))?;
            print(client.json, &v, |v| {
                let mut t = Table::new(&[
                    "RESOURCE GROUP",
                    "NAME",
                    "PORTS",
                    "LOCATION",
                    "AGENT",
                    "GRANTS",
                ]);
                for vm in items(v) {
                    let ports: Vec<String> = vm["protectedPorts"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect())
                        .unwrap_or_default();
                    let agent = match (&vm["agent"]["enrolled"], &vm["agent"]["online"]) {
                        (Value::Bool(false), _) => "none",
                        (_, Value::Bool(true)) => "online",
                        (_, Value::Bool(false)) => "offline",
                        _ => "-",
                    };
                    t.row(vec![
                        s(&vm["resourceGroup"]),
                        s(&vm["name"]),
                        ports.join(","),
                        s(&vm["location"]),
                        agent.to_owned(),
                        s(&vm["liveGrants"]),
                    ]);
                }
                t.print();
            });
        }
        VmCommand::Nsg {
            resource_group,
            name,
            client,
        } => {
            let c = Client::new(&client)?;
            let v = c
                .get(&format!("/api/v1/vms/{resource_group}/{name}/nsg"))
                .await?;
            print(client.json, &v, |v| {
                nsg_table(v["rules"].as_array().map(Vec::as_slice).unwrap_or(&[])).print();
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create {
            principal,
            description,
            expires_in,
            client,
        } => {
            let expires_in = lifetime(expires_in.as_deref())?;
            let c = Client::new(&client)?;
            let v = c
                .post(
                    "/api/v1/tokens",
                    &json!({"principal": principal, "description": description, "expiresIn": expires_in}),
                )
                .await
                .map_err(|e| name_flags(e, TOKEN_FLAGS))?;
            print(client.json, &v, |v| {
                let expires = match v["expiresAt"].as_str() {
                    Some(t) => format!("expires {}", human::time(t)),
                    None => "never expires".to_owned(),
                };
                eprintln!(
                    "token {} for {} ({expires}; shown once, store it now):",
                    s(&v["id"]),
                    s(&v["principal"])
                );
                println!("{}", s(&v["token"]));
            });
        }
        TokenCommand::List { client } => {
            let c = Client::new(&client)?;
            let v = c.get("/api/v1/tokens").await?;
            print(client.json, &v, |v| {
                let mut t = Table::new(&[
                    "ID",
                    "PRINCIPAL",
                    "CREATED",
                    "EXPIRES",
                    "STATUS",
                    "REASON",
                    "DESCRIPTION",
                ]);
                for tok in items(v) {
                    let expired = tok["expiresAt"]
                        .as_str()
                        .and_then(|e| jitgate_core::request::parse_time(e).ok())
                        .is_some_and(|e| e <= jitgate_core::Timestamp::now());
                    let (status, reason) = if !tok["revokedAt"].is_null() {
                        ("Ended", "Revoked")
                    } else if expired {
                        ("Ended", "Expired")
                    } else {
                        ("Active", "")
                    };
                    t.row(vec![
                        s(&tok["id"]),
                        s(&tok["principal"]),
                        human::time(&s(&tok["createdAt"])),
                        match tok["expiresAt"].as_str() {
                            Some(e) => human::time(e),
                            None => "never".to_owned(),
                        },
                        status.to_owned(),
                        reason.to_owned(),
                        tok["description"].as_str().unwrap_or("").to_owned(),
                    ]);
                }
                t.print();
            });
        }
        TokenCommand::Revoke { id, client } => {
            let c = Client::new(&client)?;
            c.delete(&format!("/api/v1/tokens/{id}")).await?;
            print(client.json, &json!({"revoked": id}), |_| {
                println!("revoked token {id}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The request fields `token create` fills, and their flags.
const TOKEN_FLAGS: FlagMap = &[
    ("principal", "--principal"),
    ("expiresIn", "--expires-in"),
    ("description", "--description"),
];

/// `--expires-in` as ISO 8601.
fn lifetime(text: Option<&str>) -> anyhow::Result<Option<String>> {
    text.map(|t| human::to_iso(t).map_err(|e| bad_flag("--expires-in", e)))
        .transpose()
}

/// The scope id a verb sends for `--scope` or `--resource-group` (checked here
/// first); `None` when neither is given.
async fn scope_id(
    c: &Client,
    scope: Option<&str>,
    resource_group: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if let Some(sc) = scope {
        jitgate_core::ids::Scope::parse(sc).map_err(|e| {
            bad_flag(
                "--scope",
                format!("{e}; for a resource group give --resource-group NAME"),
            )
        })?;
        return Ok(Some(sc.to_owned()));
    }
    let Some(rg) = resource_group else {
        return Ok(None);
    };
    jitgate_core::ids::ResourceGroup::parse(rg).map_err(|e| bad_flag("--resource-group", e))?;
    let who = c.get("/api/v1/whoami").await?;
    Ok(Some(format!(
        "/subscriptions/{}/resourceGroups/{rg}",
        s(&who["subscription"])
    )))
}

/// Checks `--scope` / `--resource-group` without the controller (a wrong flag
/// changes nothing, and is told before any call).
fn check_scope(scope: Option<&str>, resource_group: Option<&str>) -> anyhow::Result<()> {
    if let Some(sc) = scope {
        jitgate_core::ids::Scope::parse(sc).map_err(|e| {
            bad_flag(
                "--scope",
                format!("{e}; for a resource group give --resource-group NAME"),
            )
        })?;
    }
    if let Some(rg) = resource_group {
        jitgate_core::ids::ResourceGroup::parse(rg).map_err(|e| bad_flag("--resource-group", e))?;
    }
    Ok(())
}

/// The scope flag a verb was given, to name in a refusal about `scope`.
fn scope_flag(scope: Option<&str>) -> FlagMap {
    if scope.is_some() {
        &[("scope", "--scope")]
    } else {
        &[("scope", "--resource-group")]
    }
}

async fn role(cmd: RoleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RoleCommand::Assign {
            principal,
            role,
            scope,
            client,
        } => {
            let (sc, rg) = (scope.scope.as_deref(), scope.resource_group.as_deref());
            check_scope(sc, rg)?;
            let c = Client::new(&client)?;
            let scope_id = scope_id(&c, sc, rg).await?;
            let v = c
                .post(
                    "/api/v1/roleAssignments",
                    &json!({"principal": principal, "role": role, "scope": scope_id}),
                )
                .await
                .map_err(|e| {
                    let e = name_flags(e, &[("principal", "--principal"), ("role", "--role")]);
                    name_flags(e, scope_flag(sc))
                })?;
            print(client.json, &v, |v| {
                println!(
                    "assigned {} to {} at {} (id {})",
                    s(&v["role"]),
                    s(&v["principal"]),
                    s(&v["scope"]),
                    s(&v["id"])
                )
            });
        }
        RoleCommand::List { principal, client } => {
            let c = Client::new(&client)?;
            let q: Vec<(&str, String)> = principal.map(|p| ("principal", p)).into_iter().collect();
            let v = c.get_query("/api/v1/roleAssignments", &q).await?;
            print(client.json, &v, |v| {
                let mut t = Table::new(&["ID", "PRINCIPAL", "ROLE", "SCOPE"]);
                for r in items(v) {
                    t.row(vec![
                        s(&r["id"]),
                        s(&r["principal"]),
                        s(&r["role"]),
                        s(&r["scope"]),
                    ]);
                }
                t.print();
            });
        }
        RoleCommand::Remove { id, client } => {
            let c = Client::new(&client)?;
            c.delete(&format!("/api/v1/roleAssignments/{id}")).await?;
            print(client.json, &json!({"removed": id}), |_| {
                println!("removed role assignment {id}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Show(a) => crate::people::audit_show(a).await,
        AuditCommand::Verify {
            data_dir,
            checkpoints,
            public_key,
            client,
        } => {
            let (ok, events, head, problems) = match data_dir {
                Some(dir) => {
                    let db = dir.join(jitgate_controller::DB_FILE);
                    if !db.exists() {
                        bail!("no jitgate database at {}", db.display());
                    }
                    let anchors = offline_anchors(&dir, checkpoints, public_key)?;
                    let r = jitgate_store::sqlite::verify_file(&db, anchors.as_ref())?;
                    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
                    match (&anchors, r.anchored_at) {
                        (None, _) => eprintln!(
                            "warning: no audit public key found: the chain was checked only against itself (give --public-key and --checkpoints)"
                        ),
                        (Some(_), None) => eprintln!(
                            "warning: no signed checkpoint found: events at the end could have been deleted unnoticed"
                        ),
                        (Some(_), Some(seq)) => {
                            eprintln!("anchored by a signed checkpoint of event {seq}")
                        }
                    }
                    (r.ok(), r.count, r.head_hash, problems)
                }
                None => {
                    let c = Client::new(&client)?;
                    let v = c.get("/api/v1/audit/verify").await?;
                    let problems = v["problems"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect())
                        .unwrap_or_default();
                    (
                        v["ok"].as_bool().unwrap_or(false),
                        v["events"].as_u64().unwrap_or(0),
                        s(&v["headHash"]),
                        problems,
                    )
                }
            };
            if client.json {
                println!(
                    "{}",
                    json!({"ok": ok, "events": events, "headHash": head, "problems": problems})
                );
            } else if ok {
                println!("audit chain intact: {events} events, head {head}");
            } else {
                println!("audit chain BROKEN ({events} events read):");
                for p in &problems {
                    println!("  - {p}");
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::usage::EXIT_AUDIT_BROKEN)
            })
        }
    }
}

async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    init_logging(&args.log_format)?;
    if let Some(AgentCommand::Restore { state_dir, nft }) = args.cmd {
        return match jitgate_agent::restore(&state_dir, nft)? {
            Some(r) => {
                println!(
                    "restored table inet jitgate (revision {}, {} live grant{})",
                    r.revision,
                    r.grants,
                    if r.grants == 1 { "" } else { "s" }
                );
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
    config.enroll_token = match (&args.enroll_token_file, args.enroll_token) {
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

async fn enroll_token(cmd: EnrollTokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EnrollTokenCommand::Create {
            scope,
            uses,
            expires_in,
            description,
            allow_replace,
            client,
        } => {
            let (sc, rg) = (scope.scope.as_deref(), scope.resource_group.as_deref());
            check_scope(sc, rg)?;
            if uses == 0 {
                return Err(bad_flag("--uses", "0 enrolls nothing; give 1 or more"));
            }
            let expires_in = lifetime(expires_in.as_deref())?;
            let c = Client::new(&client)?;
            let scope_id = scope_id(&c, sc, rg).await?;
            let v = c
                .post(
                    "/api/v1/enrollTokens",
                    &json!({"scope": scope_id, "uses": uses, "expiresIn": expires_in, "description": description, "allowReplace": allow_replace}),
                )
                .await
                .map_err(|e| {
                    let e = name_flags(
                        e,
                        &[
                            ("uses", "--uses"),
                            ("expiresIn", "--expires-in"),
                            ("description", "--description"),
                        ],
                    );
                    name_flags(e, scope_flag(sc))
                })?;
            print(client.json, &v, |v| {
                eprintln!(
                    "enrollment token {} for {} ({} uses, expires {}; shown once):",
                    s(&v["id"]),
                    s(&v["scope"]),
                    s(&v["usesLeft"]),
                    human::time(&s(&v["expiresAt"]))
                );
                if let Some(fp) = v["caFingerprint"].as_str() {
                    eprintln!(
                        "(it carries the controller's CA fingerprint {fp}: the agent pins it, nothing else to copy)"
                    );
                }
                println!("{}", s(&v["token"]));
            });
        }
        EnrollTokenCommand::Revoke { id, client } => {
            let id = id
                .strip_prefix("je_")
                .map(|r| r.split_once('.').map_or(r, |(i, _)| i))
                .unwrap_or(&id)
                .to_owned();
            let c = Client::new(&client)?;
            c.delete(&format!("/api/v1/enrollTokens/{id}")).await?;
            print(client.json, &json!({"revoked": id}), |_| {
                println!("revoked enrollment token {id}")
            });
        }
        EnrollTokenCommand::List { client } => {
            let c = Client::new(&client)?;
            let v = c.get("/api/v1/enrollTokens").await?;
            print(client.json, &v, |v| {
                let mut t = Table::new(&["ID", "USES", "EXPIRES", "STATUS", "REASON", "SCOPE"]);
                for tok in items(v) {
                    let expired = jitgate_core::request::parse_time(&s(&tok["expiresAt"]))
                        .is_ok_and(|e| e <= jitgate_core::Timestamp::now());
                    let (status, reason) = if !tok["revokedAt"].is_null() {
                        ("Ended", "Revoked")
                    } else if expired {
                        ("Ended", "Expired")
                    } else if tok["usesLeft"] == 0 {
                        ("Ended", "Used up")
                    } else {
                        ("Active", "")
                    };
                    t.row(vec![
                        s(&tok["id"]),
                        s(&tok["usesLeft"]),
                        human::time(&s(&tok["expiresAt"])),
                        status.to_owned(),
                        reason.to_owned(),
                        s(&tok["scope"]),
                    ]);
                }
                t.print();
            });
        }
    }
    Ok(ExitCode::SUCCESS)
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

/// Writes generated text; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// NSG rules (native API JSON) as a table.
pub fn nsg_table(rules: &[Value]) -> Table {
    let join = |r: &Value, k: &str| {
        r[k].as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    };
    let mut t = Table::new(&["PRIORITY", "NAME", "ACCESS", "PROTO", "SOURCE", "PORTS"]);
    for r in rules {
        t.row(vec![
            s(&r["priority"]),
            s(&r["name"]),
            s(&r["access"]),
            s(&r["protocol"]),
            join(r, "sourceAddressPrefixes"),
            join(r, "destinationPortRanges"),
        ]);
    }
    t
}

/// SIGTERM and SIGINT streams, registered now.
fn stop_signals() -> anyhow::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok((
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn serve_args(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["jitgate", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    fn with_file(toml: &str, args: &[&str]) -> anyhow::Result<jitgate_controller::Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jitgate.toml");
        std::fs::write(&path, toml).unwrap();
        let mut argv = vec!["--config", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        Ok(serve_config(serve_args(&argv).unwrap())?.0)
    }

    /// Issue 10: the write queue and the blocked-attempt retention, from a flag over
    /// the TOML file over the default.
    #[test]
    fn write_queue_and_retention_settings() {
        let d = serve_config(serve_args(&[]).unwrap()).unwrap().0;
        assert_eq!(d.write_queue, jitgate_store::sqlite::DEFAULT_WRITE_QUEUE);
        assert_eq!(
            d.blocked_retention,
            jitgate_controller::DEFAULT_BLOCKED_RETENTION
        );

        let c = with_file(
            "write_queue = 64\nblocked_attempts_retention = \"P90D\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.write_queue, 64);
        assert_eq!(c.blocked_retention.as_secs(), 90 * 86_400);
        let c = with_file(
            "write_queue = 64\nblocked_attempts_retention = \"P90D\"\n",
            &[
                "--write-queue",
                "8",
                "--blocked-attempts-retention",
                "2d 12h",
            ],
        )
        .unwrap();
        assert_eq!(c.write_queue, 8);
        assert_eq!(c.blocked_retention.as_secs(), 60 * 3600);

        let e = with_file("write_queue = 0\n", &[]).unwrap_err();
        assert!(
            format!("{e:#}").contains("write_queue: must be at least 1"),
            "{e:#}"
        );
        let e = with_file("blocked_attempts_retention = \"12h\"\n", &[]).unwrap_err();
        assert!(
            format!("{e:#}").contains("blocked_attempts_retention: '12h' is less than 1d"),
            "{e:#}"
        );
        let e = serve_args(&["--blocked-attempts-retention", "soon"])
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("--blocked-attempts-retention"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 2);
    }
}
