//! `jitgate role`: assign, list and remove role assignments.

use std::process::ExitCode;

use clap::Subcommand;
use jitgate_proto::api;
use serde::Serialize;

use crate::cli::{ClientArgs, RequiredScopeArgs};
use crate::cmd::{Session, check_scope, scope_flag, scope_id};
use crate::output::print;
use crate::output::table::Table;
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

/// What `role remove` prints with `--json`.
#[derive(Serialize)]
struct Removed<'a> {
    removed: &'a str,
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
            let ses = Session::new(&client)?;
            let body = api::CreateRoleAssignment {
                principal: Some(principal),
                role: Some(role),
                scope: scope_id(&ses, sc, rg).await?,
            };
            let r = ses
                .c
                .post::<_, api::RoleAssignment>("/api/v1/roleAssignments", &body)
                .await
                .map_err(|e| {
                    let e = name_flags(e, &[("principal", "--principal"), ("role", "--role")]);
                    name_flags(e, scope_flag(sc))
                })?;
            print(ses.json, &r.json, || {
                println!(
                    "assigned {} to {} at {} (id {})",
                    r.role, r.principal, r.scope, r.id
                )
            });
        }
        RoleCommand::List { principal, client } => {
            let ses = Session::new(&client)?;
            let q: Vec<(&str, String)> = principal.map(|p| ("principal", p)).into_iter().collect();
            let list = ses
                .c
                .get_all_pages::<api::RoleAssignmentPage>("/api/v1/roleAssignments", &q)
                .await?;
            print(ses.json, &list.json, || {
                let mut t = Table::new(&["ID", "PRINCIPAL", "ROLE", "SCOPE"]);
                for r in &list.value {
                    t.row(vec![
                        r.id.clone(),
                        r.principal.clone(),
                        r.role.clone(),
                        r.scope.clone(),
                    ]);
                }
                t.print();
            });
        }
        RoleCommand::Remove { id, client } => {
            let ses = Session::new(&client)?;
            ses.c
                .delete(&format!("/api/v1/roleAssignments/{id}"))
                .await?;
            print(ses.json, &Removed { removed: &id }, || {
                println!("removed role assignment {id}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
