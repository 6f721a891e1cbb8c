//! `jitgate enroll-token`: create, list and revoke the tokens agents enroll with.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::cli::ClientArgs;
use crate::cli::ScopeArgs;
use crate::client::Client;
use crate::cmd::{check_scope, lifetime, scope_flag, scope_id};
use crate::output::table::Table;
use crate::output::{human, items, print, s};
use crate::usage::{bad_flag, name_flags};

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

pub async fn enroll_token(cmd: EnrollTokenCommand) -> anyhow::Result<ExitCode> {
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
