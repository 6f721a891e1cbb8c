//! `jitgate enroll-token`: create, list and revoke the tokens agents enroll with.

use std::process::ExitCode;

use clap::Subcommand;
use jitgate_proto::api;
use serde::Serialize;

use crate::cli::{ClientArgs, ScopeArgs};
use crate::cmd::{Session, check_scope, lifetime, scope_flag, scope_id};
use crate::output::table::Table;
use crate::output::{human, print};
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
        /// Print the line to run on machines instead of the token: it downloads the
        /// agent from this controller (pinned to its key, checksum checked), installs
        /// it with its systemd units, and enrolls it. Its one-time code delivers the
        /// token, which never appears on a command line. Needs --resource-group.
        #[arg(long)]
        print_install: bool,
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

/// What `enroll-token revoke` prints with `--json`.
#[derive(Serialize)]
struct Revoked<'a> {
    revoked: &'a str,
}

pub async fn enroll_token(cmd: EnrollTokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EnrollTokenCommand::Create {
            scope,
            uses,
            expires_in,
            description,
            allow_replace,
            print_install,
            client,
        } => {
            let (sc, rg) = (scope.scope.as_deref(), scope.resource_group.as_deref());
            check_scope(sc, rg)?;
            if print_install && rg.is_none() && sc.is_none_or(|s| !s.contains("/resourceGroups/")) {
                return Err(bad_flag(
                    "--print-install",
                    "needs --resource-group (the machines' resource group)",
                ));
            }
            if uses == 0 {
                return Err(bad_flag("--uses", "0 enrolls nothing; give 1 or more"));
            }
            let expires_in = lifetime(expires_in.as_deref())?;
            let ses = Session::new(&client)?;
            let body = api::CreateEnrollToken {
                scope: scope_id(&ses, sc, rg).await?,
                uses: Some(i64::from(uses)),
                expires_in,
                description,
                allow_replace: Some(allow_replace),
                install: print_install.then_some(true),
            };
            let t = ses
                .c
                .post::<_, api::CreatedEnrollToken>("/api/v1/enrollTokens", &body)
                .await
                .map_err(|e| {
                    let e = name_flags(
                        e,
                        &[
                            ("uses", "--uses"),
                            ("expiresIn", "--expires-in"),
                            ("description", "--description"),
                            ("install", "--print-install"),
                        ],
                    );
                    name_flags(e, scope_flag(sc))
                })?;
            print(ses.json, &t.json, || {
                eprintln!(
                    "enrollment token {} for {} ({} uses, expires {}; shown once):",
                    t.info.id,
                    t.info.scope,
                    t.info.uses_left,
                    human::time(&t.info.expires_at)
                );
                if let Some(line) = &t.install {
                    eprintln!(
                        "run this as root on the machine{} (until {}; its code delivers the token {} time{}, never on a command line):",
                        if t.info.uses_left == 1 { "" } else { "s" },
                        human::time(&line.expires_at),
                        t.info.uses_left,
                        if t.info.uses_left == 1 { "" } else { "s" }
                    );
                    println!("{}", line.command);
                    return;
                }
                if let Some(fp) = &t.ca_fingerprint {
                    eprintln!(
                        "(it carries the controller's CA fingerprint {fp}: the agent pins it, nothing else to copy)"
                    );
                }
                println!("{}", t.token);
            });
        }
        EnrollTokenCommand::Revoke { id, client } => {
            let id = id
                .strip_prefix("je_")
                .map(|r| r.split_once('.').map_or(r, |(i, _)| i))
                .unwrap_or(&id)
                .to_owned();
            let ses = Session::new(&client)?;
            ses.c.delete(&format!("/api/v1/enrollTokens/{id}")).await?;
            print(ses.json, &Revoked { revoked: &id }, || {
                println!("revoked enrollment token {id}")
            });
        }
        EnrollTokenCommand::List { client } => {
            let ses = Session::new(&client)?;
            let list = ses
                .c
                .get_all_pages::<api::EnrollTokenPage>("/api/v1/enrollTokens", &[])
                .await?;
            print(ses.json, &list.json, || {
                let mut t = Table::new(&["ID", "USES", "EXPIRES", "STATUS", "REASON", "SCOPE"]);
                for tok in &list.value {
                    let expired = jitgate_core::request::parse_time(&tok.expires_at)
                        .is_ok_and(|e| e <= jitgate_core::Timestamp::now());
                    let (status, reason) = if tok.revoked_at.is_some() {
                        ("Ended", "Revoked")
                    } else if expired {
                        ("Ended", "Expired")
                    } else if tok.uses_left == 0 {
                        ("Ended", "Used up")
                    } else {
                        ("Active", "")
                    };
                    t.row(vec![
                        tok.id.clone(),
                        tok.uses_left.to_string(),
                        human::time(&tok.expires_at),
                        status.to_owned(),
                        reason.to_owned(),
                        tok.scope.clone(),
                    ]);
                }
                t.print();
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
