//! `jitgate login`: check the controller and the token, then save both (mode 0600).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use jitgate_proto::api;
use serde::Serialize;

use crate::client::Client;
use crate::config;
use crate::output::print;
use crate::usage::usage;

#[derive(Args)]
pub struct LoginArgs {
    /// Controller URL, e.g. https://jit.example.com:8443
    pub url: String,
    /// Your token (from `jitgate token create`); or give --token-stdin.
    #[arg(long, env = "JITGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from standard input.
    #[arg(long)]
    pub token_stdin: bool,
    /// CA certificate (PEM) for a controller with a private CA, or the controller's
    /// self-signed certificate (pinned as it is).
    #[arg(long, conflicts_with = "ca_fingerprint")]
    pub ca_cert: Option<PathBuf>,
    /// SHA-256 fingerprint of the controller's CA (`jitgate serve` prints it): pin the
    /// certificate with that fingerprint without asking. Without it, login shows the
    /// fingerprint of a certificate this machine does not trust and asks once.
    #[arg(long, value_parser = crate::cli::parse_fingerprint)]
    pub ca_fingerprint: Option<jitgate_proto::tls::Fingerprint>,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

pub async fn login(a: LoginArgs) -> anyhow::Result<ExitCode> {
    let token = match (a.token, a.token_stdin) {
        (_, true) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the token from standard input")?;
            line.trim().to_owned()
        }
        (Some(t), false) => t,
        (None, false) => return Err(usage("give --token TOKEN or --token-stdin")),
    };
    if token.is_empty() {
        return Err(usage("the token is empty"));
    }
    let url = a.url.trim_end_matches('/').to_owned();
    let ca = match a.ca_cert {
        Some(p) => Some(std::fs::canonicalize(&p).unwrap_or(p)),
        None => crate::trust::first_contact(&url, a.ca_fingerprint).await?,
    };
    let c = Client::build(&url, Some(token.clone()), ca.as_deref())?;
    let who = c.get::<api::WhoAmI>("/api/v1/whoami", &[]).await?.data;
    let path = config::save(&config::Saved {
        url: Some(url.clone()),
        token: Some(token),
        ca_cert: ca,
    })?;
    let out = LoggedIn {
        url,
        principal: who.principal,
        caller_ip: who.caller_ip,
        saved: path.display().to_string(),
    };
    print(a.json, &out, || {
        println!(
            "logged in to {} as {} (your address as the controller sees it: {}); saved in {}",
            out.url, out.principal, out.caller_ip, out.saved
        )
    });
    Ok(ExitCode::SUCCESS)
}

/// What `login --json` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoggedIn {
    url: String,
    principal: String,
    caller_ip: String,
    saved: String,
}
