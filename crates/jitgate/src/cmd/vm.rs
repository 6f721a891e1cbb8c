//! `jitgate vm`: register, list and show machines, and a machine's NSG.

use std::process::ExitCode;

use clap::Subcommand;
use jitgate_proto::api;
use serde_json::Value;

use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::table::Table;
use crate::output::{human, joined, nsg_table, or_dash, print};
use crate::usage::name_flags;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Register a machine without an agent.
    ///
    /// Example: jitgate vm register prod-web web-1 --location westeurope
    Register {
        resource_group: String,
        name: String,
        #[arg(long)]
        location: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a machine: policy, NSG rules, live grants with time left, agent, last access.
    ///
    /// Example: jitgate vm show web-1
    Show {
        /// Machine: name, resource-group/name, or full id.
        vm: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List registered machines.
    ///
    /// Example: jitgate vm list --resource-group prod-web
    List {
        #[arg(long)]
        resource_group: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a machine's NSG: user rules, JIT deny rules and live grants, with priorities.
    ///
    /// Example: jitgate vm nsg prod-web web-1
    Nsg {
        resource_group: String,
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn vm(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Show { vm, client } => return vm_show(&vm, &client).await,
        VmCommand::Register {
            resource_group,
            name,
            location,
            client,
        } => {
            let ses = Session::new(&client)?;
            let body = api::RegisterVm {
                id: None,
                resource_group: Some(resource_group),
                name: Some(name),
                location,
            };
            let v = ses
                .c
                .post::<_, api::Vm>("/api/v1/vms", &body)
                .await
                .map_err(|e| {
                    name_flags(
                        e,
                        &[
                            ("resourceGroup", "RESOURCE_GROUP"),
                            ("name", "NAME"),
                            ("location", "--location"),
                        ],
                    )
                })?;
            print(ses.json, &v.json, || println!("registered {}", v.id));
        }
        VmCommand::List {
            resource_group,
            client,
        } => {
            let ses = Session::new(&client)?;
            let mut q = vec![("limit", "1000".to_owned())];
            if let Some(rg) = resource_group {
                q.push(("resourceGroup", rg));
            }
            let list = ses
                .c
                .get_all_pages::<api::VmPage>("/api/v1/vms", &q)
                .await
                .map_err(|e| name_flags(e, &[("resourceGroup", "--resource-group")]))?;
            print(ses.json, &list.json, || {
                let mut t = Table::new(&[
                    "RESOURCE GROUP",
                    "NAME",
                    "PORTS",
                    "LOCATION",
                    "AGENT",
                    "GRANTS",
                ]);
                for vm in &list.value {
                    let agent = match (vm.agent.enrolled, vm.agent.online) {
                        (false, _) => "none",
                        (true, true) => "online",
                        (true, false) => "offline",
                    };
                    t.row(vec![
                        vm.vm.resource_group.clone(),
                        vm.vm.name.clone(),
                        joined(&vm.protected_ports, ","),
                        or_dash(vm.vm.location.as_deref()),
                        agent.to_owned(),
                        vm.live_grants.to_string(),
                    ]);
                }
                t.print();
            });
        }
        VmCommand::Nsg {
            resource_group,
            name,
            client,
        } => {
            let ses = Session::new(&client)?;
            let nsg = ses
                .c
                .get::<api::NsgView>(&format!("/api/v1/vms/{resource_group}/{name}/nsg"), &[])
                .await?;
            print(ses.json, &nsg.json, || nsg_table(&nsg.rules).print());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `vm show`: the machine's view, its NSG and its last access.
pub async fn vm_show(name: &str, args: &ClientArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(args)?;
    let vm = ses.vm(name).await?;
    let (rg, n) = (&vm.vm.resource_group, &vm.vm.name);
    let nsg = ses
        .c
        .get::<api::NsgView>(&format!("/api/v1/vms/{rg}/{n}/nsg"), &[])
        .await?;
    let (last_access, last_user) = (vm.last_access.clone(), vm.last_user.clone());
    // The controller's view of the machine as it came (its last access included), with
    // its NSG rules beside it.
    let mut out = vm.json.clone();
    if let Value::Object(m) = &mut out {
        m.insert("nsg".to_owned(), serde_json::to_value(&nsg.rules)?);
    }
    print(ses.json, &out, || {
        let agent = &vm.agent;
        let agent_state = if !agent.enrolled {
            "no agent enrolled (not enforced)".to_owned()
        } else if agent.online {
            format!(
                "online, {}",
                if agent.up_to_date == Some(true) {
                    "up to date"
                } else {
                    "applying changes"
                }
            )
        } else {
            format!(
                "OFFLINE, last seen {}",
                human::time(&or_dash(agent.last_seen.as_deref()))
            )
        };
        println!("{}", vm.vm.id);
        println!(
            "  policy:      {}",
            vm.policy.as_deref().unwrap_or("none (JIT not enabled)")
        );
        println!("  agent:       {agent_state}");
        if let Some(e) = &agent.report.error {
            println!("  agent error: {e}");
        }
        for e in &agent.report.inventory_errors {
            println!("  sockets:     incomplete, {e}");
        }
        match (&last_access, &last_user) {
            (Some(at), by) => println!(
                "  last access: {} by {}",
                human::time(at),
                or_dash(by.as_deref())
            ),
            (None, _) => println!("  last access: never"),
        }
        println!("  live grants:");
        if vm.grants.is_empty() {
            println!("    none");
        }
        for g in &vm.grants {
            println!(
                "    port {} {} from {} for {} until {}, request {}",
                g.port,
                g.protocol,
                g.source,
                g.requestor,
                human::time(&g.end_time_utc),
                g.request
            );
        }
        println!("  NSG rules:");
        let rules = nsg_table(&nsg.rules);
        for line in rules
            .render(crate::output::table::terminal_width().map(|w| w.saturating_sub(4)))
            .lines()
        {
            println!("    {line}");
        }
        if !agent.report.counters.is_empty() {
            println!("  blocked attempts:");
            for c in &agent.report.counters {
                println!("    port {} {}: {}", c.port, c.protocol, c.packets);
            }
        }
    });
    Ok(ExitCode::SUCCESS)
}
