//! `jitgate serve`: the controller, configured from flags, `JITGATE_*` variables and a
//! TOML file (flag > environment > file > default; unknown keys in the file are an
//! error), with logging and a graceful stop on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// TOML file with the settings below by their long names with underscores
    /// (listen, data_dir, database, trusted_proxies, public_url, ...); the sign-in ones
    /// in an [oidc] table (issuer, client_id, client_secret_file, audience, scopes,
    /// name_claim, groups_claim, session_lifetime, session_idle_timeout, and
    /// [[oidc.role]] group/role/scope).
    #[arg(long, env = "JITGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "JITGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database and the bootstrap token [default: ./jitgate-data].
    #[arg(long, env = "JITGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL database to keep all state in instead of the embedded SQLite file,
    /// for several controllers sharing one database: postgres://user@host/db or
    /// host=... dbname=... (several hosts with target_session_attrs=read-write follow
    /// a promoted standby). The data directory still holds this controller's own files
    /// (TLS, checkpoint key and checkpoints).
    #[arg(long, env = "JITGATE_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
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
    /// The binary served to machines as the agent (`/install.sh`, `/download/...`)
    /// [default: this controller's own binary].
    #[arg(long, env = "JITGATE_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
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
    /// How long break-glass access lasts at most, e.g. 1h [default: 1h; 5m to 1d].
    #[arg(long, env = "JITGATE_BREAK_GLASS_MAX", value_parser = parse_break_glass_max)]
    pub break_glass_max: Option<u64>,
    /// A URL prefix webhooks may reach even on a private or loopback address, e.g.
    /// https://hooks.internal.example:8443/ (repeatable; plain http:// only so).
    #[arg(long, env = "JITGATE_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<String>,
    /// A load balancer or reverse proxy (address or network, e.g. 10.0.0.0/24) whose
    /// X-Forwarded-For header names the caller: the address grants default to ("My
    /// IP"), the audit log's source and the per-source limits then use it. The header
    /// of any other connection is ignored. Repeatable.
    #[arg(long = "trusted-proxy", env = "JITGATE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_trusted_proxy)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The controller's address as browsers reach it (https://jit.example.net:8443):
    /// the sign-in redirect URI is <public-url>/auth/callback.
    #[arg(long, env = "JITGATE_PUBLIC_URL")]
    pub public_url: Option<url::Url>,
    /// Sign in with this OpenID Provider (its issuer URL); see also the [oidc] table of
    /// the TOML file, which maps the provider's groups to roles.
    #[arg(long, env = "JITGATE_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// The controller's client id at the provider.
    #[arg(long, env = "JITGATE_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,
    /// A file holding the controller's client secret at the provider.
    #[arg(long, env = "JITGATE_OIDC_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// The audience of the provider's own tokens accepted as bearer credentials on the
    /// API (automation with workload identity) [default: the client id].
    #[arg(long, env = "JITGATE_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// Scopes asked for [default: openid,email,profile,groups].
    #[arg(long, env = "JITGATE_OIDC_SCOPES", value_delimiter = ',')]
    pub oidc_scopes: Option<Vec<String>>,
    /// How long a sign-in lasts, e.g. 8h [default: 8h; 5m to 7d].
    #[arg(long, env = "JITGATE_SESSION_LIFETIME", value_parser = parse_session_lifetime)]
    pub session_lifetime: Option<u64>,
    /// A sign-in unused this long ends, e.g. 1h [default: 1h; 5m to 7d].
    #[arg(long, env = "JITGATE_SESSION_IDLE_TIMEOUT", value_parser = parse_session_lifetime)]
    pub session_idle_timeout: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure_http: Option<bool>,
    auto_tls: Option<bool>,
    tls_san: Option<Vec<String>>,
    log_format: Option<String>,
    management_ports: Option<Vec<u16>>,
    agent_offline_after: Option<u64>,
    agent_binary: Option<PathBuf>,
    audit_checkpoints: Option<PathBuf>,
    refusals_audited: Option<u32>,
    refusals_block_after: Option<u32>,
    max_connections: Option<usize>,
    write_queue: Option<usize>,
    blocked_attempts_retention: Option<String>,
    break_glass_max: Option<String>,
    webhook_allow: Option<Vec<String>>,
    trusted_proxies: Option<Vec<String>>,
    public_url: Option<String>,
    oidc: Option<FileOidc>,
}

/// The `[oidc]` table.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileOidc {
    issuer: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    audience: Option<String>,
    scopes: Option<Vec<String>>,
    name_claim: Option<String>,
    groups_claim: Option<String>,
    session_lifetime: Option<String>,
    session_idle_timeout: Option<String>,
    #[serde(default)]
    role: Vec<FileGroupRole>,
}

/// `[[oidc.role]] group = "ops" role = "JIT Requester" scope = "/subscriptions/..."`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGroupRole {
    group: String,
    role: String,
    scope: String,
}

/// How long break-glass access lasts at most, in seconds: 5 minutes to 1 day.
pub fn parse_break_glass_max(text: &str) -> Result<u64, String> {
    let secs = crate::output::human::parse_secs(text)?;
    if !(300..=86_400).contains(&secs) {
        return Err(format!("'{text}' is not between 5m and 1d"));
    }
    Ok(secs as u64)
}

/// How long a sign-in lasts, in seconds: a duration from 5 minutes to 7 days.
pub fn parse_session_lifetime(text: &str) -> Result<u64, String> {
    let secs = crate::output::human::parse_secs(text)?;
    if !(300..=7 * 86_400).contains(&secs) {
        return Err(format!("'{text}' is not between 5m and 7d"));
    }
    Ok(secs as u64)
}

/// The sign-in settings (from the flags over the `[oidc]` table, and the public URL
/// from the flag over the file's `public_url`), or none when no issuer is given.
fn oidc_config(
    args: &ServeArgs,
    file: Option<FileOidc>,
    file_public_url: Option<String>,
) -> anyhow::Result<Option<jitgate_controller::oidc::OidcConfig>> {
    let given = file.is_some()
        || args.oidc_client_id.is_some()
        || args.oidc_client_secret_file.is_some()
        || args.oidc_scopes.is_some()
        || args.oidc_audience.is_some()
        || args.session_lifetime.is_some()
        || args.session_idle_timeout.is_some();
    let file = file.unwrap_or_default();
    let Some(issuer) = args.oidc_issuer.clone().or(file.issuer) else {
        if given {
            bail!("oidc: give the provider's issuer (--oidc-issuer or issuer in [oidc])");
        }
        return Ok(None);
    };
    let public_url = match (&args.public_url, file_public_url) {
        (Some(u), _) => Some(u.clone()),
        (None, Some(t)) => {
            Some(url::Url::parse(&t).map_err(|e| anyhow::anyhow!("public_url: '{t}': {e}"))?)
        }
        (None, None) => None,
    };
    let client_id = args
        .oidc_client_id
        .clone()
        .or(file.client_id)
        .context("oidc: give the client id (--oidc-client-id or client_id in [oidc])")?;
    let secret_file = args
        .oidc_client_secret_file
        .clone()
        .or(file.client_secret_file)
        .context("oidc: give the client secret's file (--oidc-client-secret-file or client_secret_file in [oidc])")?;
    let secret = std::fs::read_to_string(&secret_file)
        .with_context(|| {
            format!(
                "oidc: cannot read the client secret file {}",
                secret_file.display()
            )
        })?
        .trim()
        .to_owned();
    if secret.is_empty() {
        bail!(
            "oidc: the client secret file {} is empty",
            secret_file.display()
        );
    }
    let public_url = public_url
        .context("oidc: give the controller's public URL (--public-url https://jit.example.net:8443): the provider sends browsers back to <public-url>/auth/callback")?;
    let lifetime = match (args.session_lifetime, file.session_lifetime) {
        (Some(secs), _) => secs,
        (None, Some(t)) => {
            parse_session_lifetime(&t).map_err(|e| anyhow::anyhow!("oidc.session_lifetime: {e}"))?
        }
        (None, None) => 8 * 3600,
    };
    let idle = match (args.session_idle_timeout, file.session_idle_timeout) {
        (Some(secs), _) => secs,
        (None, Some(t)) => parse_session_lifetime(&t)
            .map_err(|e| anyhow::anyhow!("oidc.session_idle_timeout: {e}"))?,
        (None, None) => 3600,
    };
    let mut roles = Vec::new();
    for (i, r) in file.role.iter().enumerate() {
        let role = jitgate_core::rbac::Role::parse(&r.role)
            .map_err(|e| anyhow::anyhow!("oidc.role[{i}].role: {e}"))?;
        if role == jitgate_core::rbac::Role::Agent {
            bail!("oidc.role[{i}].role: the Agent role is for agents' credentials, not people");
        }
        let scope = jitgate_core::ids::Scope::parse(&r.scope)
            .map_err(|e| anyhow::anyhow!("oidc.role[{i}].scope: {e}"))?;
        if r.group.is_empty() {
            bail!("oidc.role[{i}].group: is empty");
        }
        roles.push(jitgate_controller::oidc::GroupRole {
            group: r.group.clone(),
            role,
            scope,
        });
    }
    let audience = args
        .oidc_audience
        .clone()
        .or(file.audience)
        .unwrap_or_else(|| client_id.clone());
    if audience.is_empty() {
        bail!("oidc: the audience is empty");
    }
    let config = jitgate_controller::oidc::OidcConfig {
        issuer: issuer.trim_end_matches('/').to_owned(),
        audience,
        client_id,
        client_secret: jitgate_proto::Secret::new(secret),
        scopes: args.oidc_scopes.clone().or(file.scopes).unwrap_or_else(|| {
            ["openid", "email", "profile", "groups"]
                .map(str::to_owned)
                .to_vec()
        }),
        name_claim: file.name_claim.unwrap_or_else(|| "name".into()),
        groups_claim: file.groups_claim.unwrap_or_else(|| "groups".into()),
        roles,
        public_url,
        session: std::time::Duration::from_secs(lifetime),
        idle: std::time::Duration::from_secs(idle),
        key_refetch: jitgate_controller::oidc::KEY_REFETCH,
    };
    jitgate_controller::oidc::check_config(&config).map_err(anyhow::Error::msg)?;
    Ok(Some(config))
}

/// A proxy's address (`10.0.0.5`, as `/32`) or network (`10.0.0.0/24`); never every
/// address, which would let any caller claim any address.
pub fn parse_trusted_proxy(text: &str) -> Result<ipnet::IpNet, String> {
    let net = match text.parse::<ipnet::IpNet>() {
        Ok(n) => n,
        Err(_) => text
            .parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| format!("'{text}' is not an IP address or network"))?,
    };
    if net.prefix_len() == 0 {
        return Err(format!(
            "'{text}' is every address: any caller could then claim any address; name the proxies"
        ));
    }
    Ok(net.trunc())
}

/// A retention in seconds: a duration of at least a day (the VM view and the blocked
/// series show the last 24 hours by default).
pub fn parse_retention(text: &str) -> Result<u64, String> {
    let secs = crate::output::human::parse_secs(text)?;
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

pub fn init_logging(format: &str) -> anyhow::Result<()> {
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
    let mut file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{} is not a valid config file", path.display()))?
        }
        None => FileConfig::default(),
    };
    let oidc = oidc_config(&args, file.oidc.take(), file.public_url.take())?;
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
    config.database = args.database.or(file.database);
    if let Some(url) = &config.database
        && let Err(e) = jitgate_store_sql::check_postgres_url(url)
    {
        bail!("--database: {e} (expected postgres://user@host:port/db or host=... dbname=...)");
    }
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
    if let Some(p) = args.agent_binary.or(file.agent_binary) {
        if !p.is_file() {
            bail!("agent_binary: {} is not a file", p.display());
        }
        config.agent_binary = Some(p);
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
    config.oidc = oidc;
    config.webhook_allow = if args.webhook_allow.is_empty() {
        file.webhook_allow.unwrap_or_default()
    } else {
        args.webhook_allow.clone()
    };
    for (i, p) in config.webhook_allow.iter().enumerate() {
        let u =
            url::Url::parse(p).map_err(|e| anyhow::anyhow!("webhook_allow[{i}]: '{p}': {e}"))?;
        if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
            bail!("webhook_allow[{i}]: '{p}' must be an http(s)://host[:port]/ prefix");
        }
    }
    match (args.break_glass_max, file.break_glass_max) {
        (Some(secs), _) => config.break_glass_max = secs as i64,
        (None, Some(t)) => {
            config.break_glass_max = parse_break_glass_max(&t)
                .map_err(|e| anyhow::anyhow!("break_glass_max: {e}"))?
                as i64;
        }
        (None, None) => {}
    }
    config.trusted_proxies = args.trusted_proxies;
    if config.trusted_proxies.is_empty() {
        for text in file.trusted_proxies.unwrap_or_default() {
            config.trusted_proxies.push(
                parse_trusted_proxy(&text).map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?,
            );
        }
    }
    let log_format = args
        .log_format
        .or(file.log_format)
        .unwrap_or_else(|| "text".to_owned());
    Ok((config, log_format))
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
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

/// SIGTERM and SIGINT streams, registered now.
pub fn stop_signals() -> anyhow::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>
{
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
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn serve_args(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["jitgate", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(a) => Ok(*a),
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
        assert_eq!(d.write_queue, jitgate_store_sql::DEFAULT_WRITE_QUEUE);
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

    /// A malformed database URL is refused by name, before anything starts.
    #[test]
    fn a_malformed_database_url_is_refused_by_name() {
        let e = serve_config(
            serve_args(&["--database", "postgres://x:y@/db?port=notanumber"]).unwrap(),
        )
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("--database"), "{e:#}");
    }

    /// Trusted proxies: addresses and networks from the flag (repeatable or
    /// comma-separated) over the file; "every address" is refused.
    #[test]
    fn trusted_proxy_settings() {
        let c = with_file(
            "trusted_proxies = [\"10.0.0.0/24\", \"2001:db8::5\"]\n",
            &[],
        )
        .unwrap();
        let nets: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/24", "2001:db8::5/128"]);
        let c = with_file(
            "trusted_proxies = [\"10.0.0.0/24\"]\n",
            &["--trusted-proxy", "192.0.2.7,192.0.2.9/31"],
        )
        .unwrap();
        let nets: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["192.0.2.7/32", "192.0.2.8/31"]);
        let e = with_file("trusted_proxies = [\"0.0.0.0/0\"]\n", &[]).unwrap_err();
        assert!(
            format!("{e:#}").contains("trusted_proxies: '0.0.0.0/0' is every address"),
            "{e:#}"
        );
        let e = serve_args(&["--trusted-proxy", "::/0"]).err().unwrap();
        assert!(e.to_string().contains("every address"), "{e}");
        let e = serve_args(&["--trusted-proxy", "lb.example.net"])
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("not an IP address or network"),
            "{e}"
        );
    }
}
