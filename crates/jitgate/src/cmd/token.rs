//! `jitgate token`: create, list and revoke API tokens.

use std::process::ExitCode;

use clap::Subcommand;
use jitgate_proto::api;
use serde::Serialize;

use crate::cli::ClientArgs;
use crate::cmd::{Session, lifetime};
use crate::output::table::Table;
use crate::output::{human, print};
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

/// What `token revoke` prints with `--json`.
#[derive(Serialize)]
struct Revoked<'a> {
    revoked: &'a str,
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
            let ses = Session::new(&client)?;
            let body = api::CreateToken {
                principal: Some(principal),
                description,
                expires_in,
            };
            let t = ses
                .c
                .post::<_, api::CreatedToken>("/api/v1/tokens", &body)
                .await
                .map_err(|e| name_flags(e, TOKEN_FLAGS))?;
            print(ses.json, &t.json, || {
                let expires = match &t.info.expires_at {
                    Some(at) => format!("expires {}", human::time(at)),
                    None => "never expires".to_owned(),
                };
                eprintln!(
                    "token {} for {} ({expires}; shown once, store it now):",
                    t.info.id, t.info.principal
                );
                println!("{}", t.token);
            });
        }
        TokenCommand::List { client } => {
            let ses = Session::new(&client)?;
            let list = ses
                .c
                .get_all_pages::<api::TokenPage>("/api/v1/tokens", &[])
                .await?;
            print(ses.json, &list.json, || {
                let mut t = Table::new(&[
                    "ID",
                    "KIND",
                    "PRINCIPAL",
                    "CREATED",
                    "EXPIRES",
                    "STATUS",
                    "REASON",
                    "DESCRIPTION",
                ]);
                for tok in &list.value {
                    let expired = tok
                        .expires_at
                        .as_deref()
                        .and_then(|e| jitgate_core::request::parse_time(e).ok())
                        .is_some_and(|e| e <= jitgate_core::Timestamp::now());
                    let (status, reason) = if tok.revoked_at.is_some() {
                        ("Ended", "Revoked")
                    } else if expired {
                        ("Ended", "Expired")
                    } else {
                        ("Active", "")
                    };
                    t.row(vec![
                        tok.id.clone(),
                        match tok.kind.as_str() {
                            "signIn" => "sign-in",
                            "" => "-",
                            k => k,
                        }
                        .to_owned(),
                        tok.principal.clone(),
                        human::time(&tok.created_at),
                        match &tok.expires_at {
                            Some(e) => human::time(e),
                            None => "never".to_owned(),
                        },
                        status.to_owned(),
                        reason.to_owned(),
                        tok.description.clone(),
                    ]);
                }
                t.print();
            });
        }
        TokenCommand::Revoke { id, client } => {
            let ses = Session::new(&client)?;
            ses.c.delete(&format!("/api/v1/tokens/{id}")).await?;
            print(ses.json, &Revoked { revoked: &id }, || {
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
