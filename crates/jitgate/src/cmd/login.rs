//! `jitgate login`: sign in (with the organisation's identity provider, through the
//! controller) or present a token, check it, and save the controller and the
//! credential (mode 0600). `jitgate logout`: end a sign-in and forget it.
//!
//! Sign-in without a token: the browser opens the controller's `/auth/login` with this
//! process's loopback port, `state` and PKCE challenge (RFC 8252); after the provider,
//! the controller sends the browser back to `http://127.0.0.1:<port>/callback` with a
//! one-time code, which is exchanged with the verifier at `POST /auth/token`.
//! `--device` is for machines without a browser: the person confirms a code on the
//! controller's page from any other device, while this process asks every few seconds.
//! The credential is a jitgate token bound to the person that expires (the
//! controller's `--session-lifetime`); signing in again renews it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use clap::Args;
use jitgate_proto::api;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::client::Client;
use crate::config;
use crate::output::print;
use crate::usage::{EXIT_AUTH, Exit, usage};

#[derive(Args)]
pub struct LoginArgs {
    /// Controller URL, e.g. https://jit.example.com:8443
    pub url: String,
    /// A token (from `jitgate token create`, for automation) instead of signing in;
    /// or give --token-stdin.
    #[arg(long, env = "JITGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from standard input.
    #[arg(long)]
    pub token_stdin: bool,
    /// Sign in from a machine without a browser: confirm a code on the controller's
    /// page from another device.
    #[arg(long, conflicts_with_all = ["token", "token_stdin"])]
    pub device: bool,
    /// Print the sign-in URL instead of opening a browser.
    #[arg(long, conflicts_with_all = ["token", "token_stdin", "device"])]
    pub no_browser: bool,
    /// How long to wait for the sign-in to finish, e.g. 5m [default: 10m].
    #[arg(long, value_parser = parse_timeout, default_value = "10m")]
    pub timeout: u64,
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

/// How long to wait for a sign-in, in seconds: 10 s to 1 h.
fn parse_timeout(text: &str) -> Result<u64, String> {
    let secs = crate::output::human::parse_secs(text)?;
    if !(10..=3600).contains(&secs) {
        return Err(format!("'{text}' is not between 10s and 1h"));
    }
    Ok(secs as u64)
}

pub async fn login(a: LoginArgs) -> anyhow::Result<ExitCode> {
    let url = a.url.trim_end_matches('/').to_owned();
    let token = match (a.token.clone(), a.token_stdin) {
        (_, true) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the token from standard input")?;
            let t = line.trim().to_owned();
            if t.is_empty() {
                return Err(usage("the token is empty"));
            }
            Some(t)
        }
        (Some(t), false) if t.is_empty() => return Err(usage("the token is empty")),
        (t, false) => t,
    };
    let ca = match &a.ca_cert {
        Some(p) => Some(std::fs::canonicalize(p).unwrap_or(p.clone())),
        None => crate::trust::first_contact(&url, a.ca_fingerprint).await?,
    };
    let (token, signed) = match token {
        Some(t) => (t, None),
        None => {
            let anon = Client::build(&url, None, ca.as_deref())?;
            // Only a controller with an identity provider signs people in.
            if anon.status_of("/auth/login").await? == 404 {
                return Err(usage(format!(
                    "{url} does not sign people in with an identity provider: give your token with --token TOKEN or --token-stdin"
                )));
            }
            let wait = Duration::from_secs(a.timeout);
            let s = if a.device {
                device(&anon, wait).await?
            } else {
                loopback(&anon, !a.no_browser, wait).await?
            };
            (s.token.clone(), Some(s))
        }
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
        name: who.name,
        caller_ip: who.caller_ip,
        expires_at: signed.map(|s| s.expires_at).or(who.expires_at),
        saved: path.display().to_string(),
    };
    print(a.json, &out, || {
        let name = out
            .name
            .as_ref()
            .map(|n| format!("{n} ({})", out.principal))
            .unwrap_or_else(|| out.principal.clone());
        println!(
            "logged in to {} as {name} (your address as the controller sees it: {}); saved in {}",
            out.url, out.caller_ip, out.saved
        );
        if let Some(e) = &out.expires_at {
            println!(
                "the credential expires at {e}: run `jitgate login {}` again then",
                out.url
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// Random bytes as unpadded base64url (RFC 7636's verifier alphabet).
fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    B64.encode(b)
}

/// The loopback flow (RFC 8252): a listener on 127.0.0.1, the browser sent through
/// the controller, the code exchanged with the PKCE verifier.
async fn loopback(c: &Client, open: bool, wait: Duration) -> anyhow::Result<api::SigninToken> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen on a loopback port for the sign-in's return")?;
    let port = listener.local_addr()?.port();
    let verifier = random_b64(32);
    let challenge = B64.encode(Sha256::digest(verifier.as_bytes()));
    let state = random_b64(16);
    let mut start = url::Url::parse(&format!("{}/auth/login", c.base))
        .map_err(|e| usage(format!("the controller URL: {e}")))?;
    start
        .query_pairs_mut()
        .append_pair("cli_port", &port.to_string())
        .append_pair("cli_state", &state)
        .append_pair("cli_challenge", &challenge);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    let expected = state.clone();
    let app = axum::Router::new().route(
        "/callback",
        axum::routing::get(
            move |axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>| {
                let tx = tx.clone();
                let expected = expected.clone();
                async move {
                    // Only the answer to this sign-in (its state) ends the wait: another
                    // local program cannot end it with a code of its own.
                    match (q.get("state"), q.get("code")) {
                        (Some(s), Some(code)) if *s == expected => {
                            let _ = tx.send(code.clone()).await;
                            axum::response::Html(
                                "<!doctype html><title>jitgate</title><p>Signed in. You can close this tab and return to your terminal.</p>",
                            )
                            .into_response()
                        }
                        _ => (axum::http::StatusCode::BAD_REQUEST, "not this sign-in").into_response(),
                    }
                }
            },
        ),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    eprintln!("To sign in, open this address in a browser on this machine:\n\n  {start}\n");
    if open {
        open_browser(start.as_str());
    }
    let code = tokio::time::timeout(wait, rx.recv())
        .await
        .map_err(|_| Exit::err(EXIT_AUTH, "the sign-in did not finish in time"))?
        .context("the sign-in's return was lost")?;
    server.abort();
    let grant = api::SigninGrant::Loopback {
        code,
        code_verifier: verifier,
    };
    Ok(c.post::<_, api::SigninToken>("/auth/token", &grant)
        .await?
        .data)
}

/// Opens `url` in the desktop's browser, if there is a desktop; the address is printed
/// either way.
fn open_browser(url: &str) {
    let desktop =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    if !desktop {
        return;
    }
    let _ = std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// The device flow: a code the person confirms on the controller's page.
async fn device(c: &Client, wait: Duration) -> anyhow::Result<api::SigninToken> {
    let d = c
        .post::<_, api::DeviceStart>("/auth/device", &())
        .await?
        .data;
    eprintln!(
        "To sign in, open {} on any device, sign in, and confirm the code\n\n  {}\n\n(or open {} directly). Waiting...",
        d.verification_uri, d.user_code, d.verification_uri_complete
    );
    let deadline = tokio::time::Instant::now() + wait.min(Duration::from_secs(d.expires_in));
    let mut interval = d.interval.max(1);
    let grant = api::SigninGrant::Device {
        device_code: d.device_code,
    };
    loop {
        tokio::time::sleep(Duration::from_secs(interval)).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(Exit::err(
                EXIT_AUTH,
                "the sign-in was not confirmed in time",
            ));
        }
        let reply = c
            .post::<_, serde_json::Value>("/auth/token", &grant)
            .await?;
        if reply.json.get("token").is_some() {
            return Ok(serde_json::from_value(reply.json)?);
        }
        let pending: api::SigninPending = serde_json::from_value(reply.json)?;
        interval = pending.interval.max(1);
    }
}

/// What `login --json` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoggedIn {
    url: String,
    principal: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    caller_ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    saved: String,
}

#[derive(Args)]
pub struct LogoutArgs {
    /// Print JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// `jitgate logout`: a sign-in's credential is revoked at the controller; any saved
/// credential is forgotten (the controller's URL and trust are kept). A token an
/// administrator made is not revoked (`jitgate token revoke` does that).
pub async fn logout(a: LogoutArgs) -> anyhow::Result<ExitCode> {
    let mut saved = config::load_saved()?;
    let Some(token) = saved.token.take() else {
        return Err(usage("not logged in: no credential is saved"));
    };
    let url = saved
        .url
        .clone()
        .unwrap_or_else(|| crate::client::DEFAULT_URL.to_owned());
    let c = Client::build(&url, Some(token), saved.ca_cert.as_deref())?;
    let revoked = match c.post::<_, serde_json::Value>("/auth/logout", &()).await {
        Ok(r) => r.json["revoked"].as_str().map(str::to_owned),
        Err(e) => {
            // Not a sign-in (an automation token), no sign-in at this controller, or a
            // credential already expired or revoked: nothing to end there.
            eprintln!("note: nothing revoked at the controller: {e}");
            None
        }
    };
    let path = config::save(&saved)?;
    let out = serde_json::json!({
        "revoked": revoked,
        "forgotten": path.display().to_string(),
    });
    print(a.json, &out, || match &revoked {
        Some(id) => println!(
            "signed out: credential {id} revoked and removed from {}",
            path.display()
        ),
        None => println!("the credential was removed from {}", path.display()),
    });
    Ok(ExitCode::SUCCESS)
}
