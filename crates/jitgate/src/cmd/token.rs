//! `jitgate token`: create, list and revoke API tokens.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::cli::ClientArgs;
use crate::client::Client;
use crate::cmd::lifetime;
use crate::output::table::Table;
use crate::output::{human, items, print, s};
use crate::usage::{FlagMap, name_flags};

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

pub async fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
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
