//! The verbs, one module per resource. Each module holds its verbs' clap arguments
//! next to the code that runs them; `cli.rs` gathers them into the command line.
//! What several verbs share is here: the session (client and `--json`), machines by
//! name, and scopes.

pub mod access;
pub mod admin;
pub mod agent;
pub mod approvals;
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

use jitgate_proto::api;

use crate::cli::ClientArgs;
use crate::client::{Client, Reply};
use crate::output::human;
use crate::usage::{EXIT_INVALID, EXIT_NOT_FOUND, Exit, FlagMap, bad_flag, has_code};

/// Refused as invalid (exit 5), before anything was asked of the controller.
pub fn invalid(msg: impl Into<String>) -> anyhow::Error {
    Exit::err(EXIT_INVALID, msg)
}

/// The client of one command, and whether it prints JSON.
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

    /// The machine `name` names (a full id, `rg/name`, or a short name unique among
    /// those the caller may read), found by the controller with an indexed lookup:
    /// never by listing every machine.
    pub async fn find_vm(&self, name: &str) -> anyhow::Result<api::VmListItem> {
        let (rg, short) = split_vm_name(name);
        let mut q = vec![("name", short.to_owned()), ("limit", "50".to_owned())];
        if let Some(rg) = rg {
            q.push(("resourceGroup", rg.to_owned()));
        }
        let found = match self.c.get::<api::VmPage>("/api/v1/vms", &q).await {
            Ok(page) => page.data.value,
            // A name the controller refuses cannot name a machine.
            Err(e) if has_code(&e, EXIT_INVALID) => Vec::new(),
            Err(e) => return Err(e),
        };
        resolve(&found, name).cloned()
    }

    /// The machine's full view (policy, agent report, addresses, live grants), found
    /// by name without listing every machine.
    pub async fn vm(&self, name: &str) -> anyhow::Result<Reply<api::VmDetail>> {
        let v = self.find_vm(name).await?;
        self.c
            .get(
                &format!("/api/v1/vms/{}/{}", v.vm.resource_group, v.vm.name),
                &[],
            )
            .await
    }

    /// Who the controller takes the caller for, and the address it sees.
    pub async fn whoami(&self) -> anyhow::Result<Reply<api::WhoAmI>> {
        self.c.get("/api/v1/whoami", &[]).await
    }
}

/// (resource group, name) of a machine named by full id, `rg/name` or short name.
pub fn split_vm_name(name: &str) -> (Option<&str>, &str) {
    if name.starts_with('/') {
        let parts: Vec<&str> = name.split('/').collect();
        let after = |seg: &str| {
            parts
                .iter()
                .position(|p| p.eq_ignore_ascii_case(seg))
                .and_then(|i| parts.get(i + 1).copied())
        };
        return (
            after("resourceGroups"),
            after("virtualMachines").unwrap_or(name),
        );
    }
    match name.split_once('/') {
        Some((rg, n)) => (Some(rg), n),
        None => (None, name),
    }
}

/// Finds a machine by full id, `rg/name`, or a unique short name, among `vms`.
pub fn resolve<'a>(vms: &'a [api::VmListItem], name: &str) -> anyhow::Result<&'a api::VmListItem> {
    let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let matches: Vec<&api::VmListItem> = if name.starts_with("/subscriptions/") {
        vms.iter().filter(|v| eq(&v.vm.id, name)).collect()
    } else if let Some((rg, n)) = name.split_once('/') {
        vms.iter()
            .filter(|v| eq(&v.vm.resource_group, rg) && eq(&v.vm.name, n))
            .collect()
    } else {
        vms.iter().filter(|v| eq(&v.vm.name, name)).collect()
    };
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(Exit::err(
            EXIT_NOT_FOUND,
            format!("no machine named '{name}' that you can see; list them with `jitgate vm list`"),
        )),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|v| format!("{}/{}", v.vm.resource_group, v.vm.name))
                .collect();
            Err(Exit::err(
                EXIT_NOT_FOUND,
                format!(
                    "'{name}' is ambiguous: {}; name it as resource-group/name",
                    names.join(", ")
                ),
            ))
        }
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
    ses: &Session,
    scope: Option<&str>,
    resource_group: Option<&str>,
) -> anyhow::Result<Option<String>> {
    check_scope(scope, resource_group)?;
    if let Some(sc) = scope {
        return Ok(Some(sc.to_owned()));
    }
    let Some(rg) = resource_group else {
        return Ok(None);
    };
    let who = ses.whoami().await?;
    Ok(Some(format!(
        "/subscriptions/{}/resourceGroups/{rg}",
        who.subscription
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vm(rg: &str, name: &str) -> api::VmListItem {
        api::VmListItem {
            vm: api::Vm {
                id: format!(
                    "/subscriptions/s/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
                ),
                subscription: "s".into(),
                resource_group: rg.into(),
                name: name.into(),
                location: None,
                registered_at: "2026-01-01T00:00:00Z".into(),
                registered_by: "admin".into(),
            },
            policy: None,
            protected_ports: vec![],
            live_grants: 0,
            agent: api::AgentPresence {
                enrolled: false,
                online: false,
                last_seen: None,
            },
        }
    }

    fn vms() -> Vec<api::VmListItem> {
        vec![vm("prod", "web-1"), vm("lab", "web-1"), vm("lab", "db")]
    }

    #[test]
    fn resolves_names() {
        let v = vms();
        assert_eq!(resolve(&v, "db").unwrap().vm.resource_group, "lab");
        assert_eq!(resolve(&v, "LAB/WEB-1").unwrap().vm.resource_group, "lab");
        assert_eq!(resolve(&v, "/subscriptions/s/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-1").unwrap().vm.resource_group, "prod");
        let e = resolve(&v, "web-1").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("prod/web-1") && e.contains("lab/web-1"),
            "{e}"
        );
        let e = resolve(&v, "nope").unwrap_err();
        assert_eq!(e.downcast_ref::<Exit>().unwrap().code, EXIT_NOT_FOUND);
    }

    #[test]
    fn machine_names_split_into_group_and_name() {
        assert_eq!(split_vm_name("web-1"), (None, "web-1"));
        assert_eq!(split_vm_name("prod/web-1"), (Some("prod"), "web-1"));
        assert_eq!(
            split_vm_name(
                "/subscriptions/s/resourcegroups/Prod/providers/Microsoft.Compute/virtualMachines/Web-1"
            ),
            (Some("Prod"), "Web-1")
        );
    }
}
