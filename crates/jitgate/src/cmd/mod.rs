//! The verbs, one module per resource. Each module holds its verbs' clap arguments
//! next to the code that runs them; `cli.rs` gathers them into the command line.

pub mod access;
pub mod admin;
pub mod agent;
pub mod audit;
pub mod enroll;
pub mod login;
pub mod overview;
pub mod policy;
pub mod recommend;
pub mod role;
pub mod serve;
pub mod ssh;
pub mod token;
pub mod vm;

use serde_json::Value;

use crate::cli::ClientArgs;
use crate::client::{Client, Exit};
use crate::client::{EXIT_INVALID, EXIT_NOT_FOUND};
use crate::output::{human, s};
use crate::usage::{FlagMap, bad_flag};

/// The query parameter of every Azure-compatible call.
pub const API: &str = "api-version=2020-01-01";

pub fn invalid(msg: impl Into<String>) -> anyhow::Error {
    Exit::err(EXIT_INVALID, msg)
}

// ---- shared lookups ---------------------------------------------------------------

pub struct Session {
    pub c: Client,
    pub json: bool,
}

impl Session {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        Ok(Session {
            c: Client::new(args)?,
            json: args.json,
        })
    }

    /// The machine's full view (policy, agent report, addresses), found by name
    /// without listing every machine.
    pub async fn vm(&self, name: &str) -> anyhow::Result<Value> {
        let v = self.c.find_vm(name).await?;
        self.c
            .get(&format!(
                "/api/v1/vms/{}/{}",
                s(&v["resourceGroup"]),
                s(&v["name"])
            ))
            .await
    }

    /// (my principal, the address the controller sees).
    pub async fn whoami(&self) -> anyhow::Result<(String, String)> {
        let v = self.c.get("/api/v1/whoami").await?;
        Ok((s(&v["principal"]), s(&v["callerIp"])))
    }
}

pub fn policy_path_of(vm: &Value) -> Option<String> {
    vm["policy"].as_str().map(str::to_owned)
}

/// Reads a policy (Azure JSON) or `None` when it does not exist yet.
pub async fn get_policy(c: &Client, path: &str) -> anyhow::Result<Option<Value>> {
    match c.get(&format!("{path}?{API}")).await {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if e.downcast_ref::<Exit>()
                .is_some_and(|x| x.code == EXIT_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `--expires-in` as ISO 8601.
pub fn lifetime(text: Option<&str>) -> anyhow::Result<Option<String>> {
    text.map(|t| human::to_iso(t).map_err(|e| bad_flag("--expires-in", e)))
        .transpose()
}

/// The scope id a verb sends for `--scope` or `--resource-group` (checked here
/// first); `None` when neither is given.
pub async fn scope_id(
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
pub fn check_scope(scope: Option<&str>, resource_group: Option<&str>) -> anyhow::Result<()> {
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
pub fn scope_flag(scope: Option<&str>) -> FlagMap {
    if scope.is_some() {
        &[("scope", "--scope")]
    } else {
        &[("scope", "--resource-group")]
    }
}
