//! `jitgate vm`: register, list and show machines, and a machine's NSG.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use jitgate_proto::api;
use serde_json::Value;

use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::table::Table;
use crate::output::{human, joined, nsg_table, or_dash, print};
use crate::usage::name_flags;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Register a machine without an agent; with --behind, a machine a gateway
    /// protects (one that cannot run the agent: Windows, an appliance).
    ///
    /// Example: jitgate vm register prod-web win-1 --behind edge/gw-1 --address 10.1.2.3 --mode dnat --public-address 203.0.113.10
    Register {
        resource_group: String,
        name: String,
        #[arg(long)]
        location: Option<String>,
        #[command(flatten)]
        place: PlaceArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put a registered machine behind a gateway (or move it): the gateway's agent
    /// (`jitgate gateway`) enforces it from then on, and its own agent no longer can.
    ///
    /// Example: jitgate vm place win-1 --behind edge/gw-1 --address 10.1.2.3
    Place {
        /// Machine: name, resource-group/name, or full id.
        vm: String,
        #[command(flatten)]
        place: PlaceArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Take a machine from behind its gateway (its own agent enforces it again).
    ///
    /// Example: jitgate vm unplace win-1
    Unplace {
        /// Machine: name, resource-group/name, or full id.
        vm: String,
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

/// Where a machine sits behind a gateway (`vm register --behind`, `vm place`).
#[derive(Args, Clone, Default)]
pub struct PlaceArgs {
    /// The gateway in front of the machine: a registered machine running `jitgate
    /// gateway` (name, resource-group/name, or full id).
    #[arg(long, value_name = "GATEWAY")]
    pub behind: Option<String>,
    /// The machine's private address, as the gateway reaches it.
    #[arg(long)]
    pub address: Option<String>,
    /// routed: clients reach the machine's own address through the gateway; dnat:
    /// clients reach the gateway's public address on a port mapped to the machine's.
    #[arg(long, value_parser = ["routed", "dnat"])]
    pub mode: Option<String>,
    /// dnat: the gateway's public address clients connect to.
    #[arg(long)]
    pub public_address: Option<String>,
    /// dnat: the machine sees connections come from the gateway (when its default
    /// route is not the gateway).
    #[arg(long)]
    pub masquerade: bool,
}

/// Places `vm` (rg, name) as `place` says; the placement as stored.
async fn place_vm(
    ses: &Session,
    rg: &str,
    name: &str,
    place: PlaceArgs,
) -> anyhow::Result<crate::client::Reply<api::Placement>> {
    let Some(behind) = place.behind else {
        return Err(crate::usage::bad_flag(
            "--behind",
            "is required: the gateway in front of the machine (resource-group/name of a machine running `jitgate gateway`)",
        ));
    };
    // A short gateway name is found like any machine name.
    let gateway = if behind.contains('/') {
        behind
    } else {
        ses.find_vm(&behind).await?.vm.id
    };
    let body = api::PutPlacement {
        gateway: Some(gateway),
        address: place.address,
        mode: place.mode,
        masquerade: place.masquerade,
        public_ip_address: place.public_address,
    };
    ses.c
        .put::<_, api::Placement>(&format!("/api/v1/vms/{rg}/{name}/placement"), &body)
        .await
        .map_err(|e| {
            name_flags(
                e,
                &[
                    ("gateway", "--behind"),
                    ("address", "--address"),
                    ("mode", "--mode"),
                    ("publicIpAddress", "--public-address"),
                    ("masquerade", "--masquerade"),
                ],
            )
        })
}

/// One line about a placement.
fn placement_line(p: &api::Placement) -> String {
    let mut line = format!(
        "behind gateway {} at {} ({})",
        p.gateway, p.place.address, p.place.mode
    );
    if let Some(public) = &p.place.public_ip_address {
        let ports: Vec<String> = p
            .place
            .mapped_ports
            .iter()
            .map(|m| format!("{} -> {public}:{}", m.number, m.mapped_port))
            .collect();
        line.push_str(&format!(", reached at {public}"));
        if !ports.is_empty() {
            line.push_str(&format!(" [{}]", ports.join(", ")));
        }
    }
    line
}

pub async fn vm(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Show { vm, client } => return vm_show(&vm, &client).await,
        VmCommand::Place { vm, place, client } => {
            let ses = Session::new(&client)?;
            let found = ses.find_vm(&vm).await?;
            let p = place_vm(&ses, &found.vm.resource_group, &found.vm.name, place).await?;
            print(ses.json, &p.json, || {
                println!("{}: {}", found.vm.id, placement_line(&p))
            });
        }
        VmCommand::Unplace { vm, client } => {
            let ses = Session::new(&client)?;
            let found = ses.find_vm(&vm).await?;
            ses.c
                .delete(&format!(
                    "/api/v1/vms/{}/{}/placement",
                    found.vm.resource_group, found.vm.name
                ))
                .await?;
            print(
                ses.json,
                &serde_json::json!({"vm": found.vm.id, "placement": null}),
                || println!("{}: enforced by its own agent again", found.vm.id),
            );
        }
        VmCommand::Register {
            resource_group,
            name,
            location,
            place,
            client,
        } => {
            if place.behind.is_none()
                && (place.address.is_some()
                    || place.mode.is_some()
                    || place.public_address.is_some()
                    || place.masquerade)
            {
                return Err(crate::usage::bad_flag(
                    "--behind",
                    "is required with --address, --mode, --public-address and --masquerade (nothing was registered)",
                ));
            }
            let ses = Session::new(&client)?;
            let body = api::RegisterVm {
                id: None,
                resource_group: Some(resource_group.clone()),
                name: Some(name.clone()),
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
            if place.behind.is_none() {
                print(ses.json, &v.json, || println!("registered {}", v.id));
            } else {
                let p = place_vm(&ses, &resource_group, &name, place).await?;
                let mut out = v.json.clone();
                if let Value::Object(m) = &mut out {
                    m.insert("placement".to_owned(), p.json.clone());
                }
                print(ses.json, &out, || {
                    println!("registered {}, {}", v.id, placement_line(&p))
                });
            }
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
        let agent_state = match (agent.outdated, &agent.report.agent_version) {
            (Some(true), Some(v)) => format!(
                "{agent_state}; version {v}, older than the controller's: run 'jitgate agent upgrade' on the machine"
            ),
            _ => agent_state,
        };
        println!("{}", vm.vm.id);
        println!(
            "  policy:      {}",
            vm.policy.as_deref().unwrap_or("none (JIT not enabled)")
        );
        if let Some(p) = &vm.placement {
            println!(
                "  gateway:     {} (the gateway reports as its agent)",
                placement_line(p)
            );
        }
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
