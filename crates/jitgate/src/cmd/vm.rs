//! `jitgate vm`: register, list and show machines, and a machine's NSG.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cli::ClientArgs;
use crate::client::Client;
use crate::cmd::Session;
use crate::output::nsg_table;
use crate::output::table::Table;
use crate::output::{human, items, print, s};
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
            let c = Client::new(&client)?;
            let v = c
                .post(
                    "/api/v1/vms",
                    &json!({"resourceGroup": resource_group, "name": name, "location": location}),
                )
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
            print(client.json, &v, |v| println!("registered {}", s(&v["id"])));
        }
        VmCommand::List {
            resource_group,
            client,
        } => {
            let c = Client::new(&client)?;
            let q: Vec<(&str, String)> = resource_group
                .map(|rg| ("resourceGroup", rg))
                .into_iter()
                .collect();
            let v = c
                .get_all_pages("/api/v1/vms", &q)
                .await
                .map_err(|e| name_flags(e, &[("resourceGroup", "--resource-group")]))?;
            print(client.json, &v, |v| {
                let mut t = Table::new(&[
                    "RESOURCE GROUP",
                    "NAME",
                    "PORTS",
                    "LOCATION",
                    "AGENT",
                    "GRANTS",
                ]);
                for vm in items(v) {
                    let ports: Vec<String> = vm["protectedPorts"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect())
                        .unwrap_or_default();
                    let agent = match (&vm["agent"]["enrolled"], &vm["agent"]["online"]) {
                        (Value::Bool(false), _) => "none",
                        (_, Value::Bool(true)) => "online",
                        (_, Value::Bool(false)) => "offline",
                        _ => "-",
                    };
                    t.row(vec![
                        s(&vm["resourceGroup"]),
                        s(&vm["name"]),
                        ports.join(","),
                        s(&vm["location"]),
                        agent.to_owned(),
                        s(&vm["liveGrants"]),
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
            let c = Client::new(&client)?;
            let v = c
                .get(&format!("/api/v1/vms/{resource_group}/{name}/nsg"))
                .await?;
            print(client.json, &v, |v| {
                nsg_table(v["rules"].as_array().map(Vec::as_slice).unwrap_or(&[])).print();
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---- vm show -------------------------------------------------------------------------------

pub async fn vm_show(name: &str, args: &ClientArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(args)?;
    let mut vm = ses.vm(name).await?;
    let (rg, n) = (s(&vm["resourceGroup"]), s(&vm["name"]));
    let nsg = ses.c.get(&format!("/api/v1/vms/{rg}/{n}/nsg")).await?;
    let last = ses
        .c
        .get_query(
            "/api/v1/requests",
            &[("limit", "1".to_owned()), ("vm", s(&vm["id"]))],
        )
        .await?;
    let last = items(&last).first().cloned();
    vm["nsg"] = nsg["rules"].clone();
    vm["lastAccess"] = last
        .as_ref()
        .map(|r| r["startTimeUtc"].clone())
        .unwrap_or(Value::Null);
    vm["lastUser"] = last
        .as_ref()
        .map(|r| r["requestor"].clone())
        .unwrap_or(Value::Null);
    print(ses.json, &vm, |v| {
        let agent = &v["agent"];
        let agent_state = if agent["enrolled"] != true {
            "no agent enrolled (not enforced)".to_owned()
        } else if agent["online"] == true {
            format!(
                "online, {}",
                if agent["upToDate"] == true {
                    "up to date"
                } else {
                    "applying changes"
                }
            )
        } else {
            format!("OFFLINE, last seen {}", human::time(&s(&agent["lastSeen"])))
        };
        println!("{}", s(&v["id"]));
        println!(
            "  policy:      {}",
            if v["policy"].is_null() {
                "none (JIT not enabled)".into()
            } else {
                s(&v["policy"])
            }
        );
        println!("  agent:       {agent_state}");
        if let Some(e) = agent["error"].as_str() {
            println!("  agent error: {e}");
        }
        for e in agent["inventoryErrors"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            println!("  sockets:     incomplete, {}", s(e));
        }
        if v["lastAccess"].is_null() {
            println!("  last access: never");
        } else {
            println!(
                "  last access: {} by {}",
                human::time(&s(&v["lastAccess"])),
                s(&v["lastUser"])
            );
        }
        println!("  live grants:");
        let grants = v["grants"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if grants.is_empty() {
            println!("    none");
        }
        for g in grants {
            println!(
                "    port {} {} from {} for {} until {}, request {}",
                s(&g["port"]),
                s(&g["protocol"]),
                s(&g["source"]),
                s(&g["requestor"]),
                human::time(&s(&g["endTimeUtc"])),
                s(&g["request"])
            );
        }
        println!("  NSG rules:");
        let rules = nsg_table(v["nsg"].as_array().map(Vec::as_slice).unwrap_or(&[]));
        for line in rules
            .render(crate::output::table::terminal_width().map(|w| w.saturating_sub(4)))
            .lines()
        {
            println!("    {line}");
        }
        if let Some(counters) = agent["counters"].as_array().filter(|c| !c.is_empty()) {
            println!("  blocked attempts:");
            for c in counters {
                println!(
                    "    port {} {}: {}",
                    s(&c["port"]),
                    s(&c["protocol"]),
                    s(&c["packets"])
                );
            }
        }
    });
    Ok(ExitCode::SUCCESS)
}
