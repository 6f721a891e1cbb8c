//! `jitgate role`: assign, list and remove role assignments.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::cli::ClientArgs;
use crate::cli::RequiredScopeArgs;
use crate::client::Client;
use crate::cmd::{check_scope, scope_flag, scope_id};
use crate::output::table::Table;
use crate::output::{items, print, s};
use crate::usage::name_flags;

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

pub async fn role(cmd: RoleCommand) -> anyhow::Result<ExitCode> {
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
