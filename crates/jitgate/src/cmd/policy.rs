//! `jitgate enable` and `jitgate disable`: a machine joins or leaves its JIT policy
//! (Azure's `jitNetworkAccessPolicies`), the policy's other machines untouched;
//! `enable --recommended` calls the server's apply.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use jitgate_core::net::SourcePrefix;
use jitgate_proto::api;
use serde::Serialize;

use crate::azure::{self, API, Policy, PolicyProperties, PolicyVm, PortRule};
use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::{human, joined, print, short_id};
use crate::usage::{FlagMap, bad_flag, name_flags, usage};

const MANAGEMENT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];

/// A machine's id and the ports to protect on it.
type VmPorts = (String, Vec<u16>);

#[derive(Args)]
pub struct EnableArgs {
    /// Machines: name, resource-group/name, or full id.
    #[arg(required_unless_present = "recommended")]
    pub vms: Vec<String>,
    /// Enable JIT on every Unhealthy machine (its listening management ports, TCP, any
    /// source, at most 3 hours), in one audited call.
    #[arg(long, conflicts_with_all = ["vms", "ports", "from"])]
    pub recommended: bool,
    /// With --recommended: only this resource group.
    #[arg(long, requires = "recommended")]
    pub resource_group: Option<String>,
    /// Ports to protect [default: those of 22, 3389, 5985, 5986 the host listens on, else 22].
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// TCP, UDP or * (both) [default for a new port rule: *].
    #[arg(long)]
    pub protocol: Option<String>,
    /// Sources allowed to request access (CIDR or address; repeatable) [default for a
    /// new port rule: any].
    #[arg(long = "from")]
    pub from: Vec<String>,
    /// Longest access a request may get (e.g. 3h, 30m, PT3H) [default for a new port
    /// rule: 3h].
    #[arg(long)]
    pub max: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What `enable` did, for `--json`.
#[derive(Serialize)]
struct Enabled {
    enabled: Vec<EnabledVm>,
}

#[derive(Serialize)]
struct EnabledVm {
    vm: String,
    ports: Vec<u16>,
    policy: String,
    max: String,
}

/// What `disable` did, for `--json`.
#[derive(Serialize)]
struct Disabled {
    disabled: Vec<DisabledVm>,
}

#[derive(Serialize)]
struct DisabledVm {
    vm: String,
    policy: String,
}

/// The policy a VM should join: its own, else an existing one in its resource group,
/// else a new `default` one in the VM's location (or `global`).
/// Also says whether that policy exists already.
async fn target_policy(ses: &Session, vm: &api::VmDetail) -> anyhow::Result<(String, bool)> {
    if let Some(p) = &vm.policy {
        return Ok((p.clone(), true));
    }
    let (sub, rg) = (&vm.vm.subscription, &vm.vm.resource_group);
    let list = ses
        .c
        .get::<azure::PolicyList>(&format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/jitNetworkAccessPolicies?{API}"), &[])
        .await?;
    if let Some(first) = list.value.first() {
        return Ok((first.id.clone(), true));
    }
    let loc = vm.vm.location.as_deref().unwrap_or("global");
    Ok((
        format!(
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/default"
        ),
        false,
    ))
}

/// The management ports the machine's agent sees listening on TCP, else 22.
fn default_ports(vm: &api::VmDetail) -> Vec<u16> {
    let listening: Vec<u16> = vm
        .agent
        .report
        .listening
        .iter()
        .filter(|l| l.protocol.eq_ignore_ascii_case("tcp"))
        .map(|l| l.port)
        .collect();
    let found: Vec<u16> = MANAGEMENT_PORTS
        .iter()
        .copied()
        .filter(|p| listening.contains(p))
        .collect();
    if found.is_empty() { vec![22] } else { found }
}

pub async fn enable(a: EnableArgs) -> anyhow::Result<ExitCode> {
    if a.recommended {
        let ses = Session::new(&a.client)?;
        let body = api::ApplyRecommendations {
            resource_group: a.resource_group.clone(),
            ..Default::default()
        };
        let r = ses
            .c
            .post::<_, api::ApplyResult>("/api/v1/recommendations/apply", &body)
            .await
            .map_err(|e| name_flags(e, &[("resourceGroup", "--resource-group")]))?;
        print(ses.json, &r.json, || {
            if r.enabled.is_empty() {
                println!("no Unhealthy machine: nothing to enable");
            }
            for e in &r.enabled {
                println!(
                    "JIT enabled on {}: ports {} (max 3h per request)",
                    short_id(&e.vm),
                    joined(&e.ports, ", ")
                );
            }
        });
        return Ok(ExitCode::SUCCESS);
    }
    let max = max_duration(a.max.as_deref())?;
    let protocol = a.protocol.clone().unwrap_or_else(|| "*".to_owned());
    jitgate_core::net::Protocol::parse(&protocol).map_err(|e| bad_flag("--protocol", e))?;
    // Without a flag that says how, a port already protected keeps its rule (and so
    // its live grants); only new ports get the defaults.
    let reshape = a.max.is_some() || a.protocol.is_some() || !a.from.is_empty();
    for f in &a.from {
        SourcePrefix::parse(f).map_err(|e| bad_flag("--from", e))?;
    }
    check_ports(&a.ports)?;
    let ses = Session::new(&a.client)?;
    // Target policy -> (exists, [(vm id, ports)])
    let mut plan: BTreeMap<String, (bool, Vec<VmPorts>)> = BTreeMap::new();
    for name in &a.vms {
        let vm = ses.vm(name).await?;
        let ports = if a.ports.is_empty() {
            default_ports(&vm)
        } else {
            a.ports.clone()
        };
        let (target, exists) = target_policy(&ses, &vm).await?;
        plan.entry(target)
            .or_insert((exists, Vec::new()))
            .1
            .push((vm.vm.id.clone(), ports));
    }
    let mut done = Vec::new();
    for (path, (exists, vms)) in plan {
        // A policy known not to exist is not asked for (a 404 would be audited as a
        // refused call).
        let existing = if exists {
            azure::get_policy(&ses.c, &path).await?
        } else {
            None
        };
        let mut policy = existing.unwrap_or_else(|| Policy {
            kind: "Basic".to_owned(),
            properties: PolicyProperties {
                virtual_machines: Vec::new(),
            },
        });
        let entries = &mut policy.properties.virtual_machines;
        for (id, ports) in &vms {
            // The machine's current entry: every port stays unless listed and reshaped.
            let mut entry = match entries.iter().position(|e| e.id.eq_ignore_ascii_case(id)) {
                Some(i) => entries.remove(i),
                None => PolicyVm {
                    id: id.clone(),
                    ports: Vec::new(),
                    public_ip_address: None,
                },
            };
            entry.id = id.clone();
            for &p in ports {
                let current = entry.ports.iter().position(|r| r.number == p);
                if current.is_some() && !reshape {
                    continue;
                }
                let (one, many) = match a.from.as_slice() {
                    [] => (Some("*".to_owned()), None),
                    [one] => (Some(one.clone()), None),
                    many => (None, Some(many.to_vec())),
                };
                let r = PortRule {
                    number: p,
                    protocol: protocol.clone(),
                    allowed_source_address_prefix: one,
                    allowed_source_address_prefixes: many,
                    max_request_access_duration: max.clone(),
                };
                match current {
                    Some(i) => entry.ports[i] = r,
                    None => entry.ports.push(r),
                }
            }
            entries.push(entry);
            done.push(EnabledVm {
                vm: id.clone(),
                ports: ports.clone(),
                policy: path.clone(),
                max: max.clone(),
            });
        }
        azure::put_policy(&ses.c, &path, &policy)
            .await
            .map_err(|e| name_flags(e, ENABLE_FLAGS))?;
    }
    let out = Enabled { enabled: done };
    print(ses.json, &out, || {
        for e in &out.enabled {
            println!(
                "JIT enabled on {}: ports {} (max {} per request)",
                short_id(&e.vm),
                joined(&e.ports, ", "),
                human::iso(&e.max)
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// The policy fields `enable` fills, and the flags they come from.
const ENABLE_FLAGS: FlagMap = &[
    ("maxRequestAccessDuration", "--max"),
    ("allowedSourceAddressPrefix", "--from"),
    ("allowedSourceAddressPrefixes", "--from"),
    ("protocol", "--protocol"),
    ("number", "--port"),
    ("ports", "--port"),
];

/// `--max` as ISO 8601, checked against the limits every policy has (5m to 1d).
fn max_duration(text: Option<&str>) -> anyhow::Result<String> {
    use jitgate_core::duration::{MAX_MAX_DURATION_SECS, MIN_MAX_DURATION_SECS};
    let Some(text) = text else {
        return Ok("PT10800S".to_owned());
    };
    let secs = human::parse_secs(text).map_err(|e| bad_flag("--max", e))?;
    if secs > MAX_MAX_DURATION_SECS {
        return Err(usage(format!(
            "--max {text} is longer than the {} maximum",
            human::duration(MAX_MAX_DURATION_SECS)
        )));
    }
    if secs < MIN_MAX_DURATION_SECS {
        return Err(usage(format!(
            "--max {text} is shorter than the {} minimum",
            human::duration(MIN_MAX_DURATION_SECS)
        )));
    }
    human::to_iso(text).map_err(|e| bad_flag("--max", e))
}

/// Port 0 is no port.
pub fn check_ports(ports: &[u16]) -> anyhow::Result<()> {
    if ports.contains(&0) {
        return Err(bad_flag("--port", "0 is not a port; give 1 to 65535"));
    }
    Ok(())
}

#[derive(Args)]
pub struct DisableArgs {
    #[arg(required = true)]
    pub vms: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn disable(a: DisableArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let mut plan: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in &a.vms {
        let vm = ses.vm(name).await?;
        match &vm.policy {
            Some(p) => plan.entry(p.clone()).or_default().push(vm.vm.id.clone()),
            None => eprintln!(
                "{} is not protected by JIT; nothing to do",
                short_id(&vm.vm.id)
            ),
        }
    }
    let mut done = Vec::new();
    for (path, ids) in plan {
        let Some(mut policy) = azure::get_policy(&ses.c, &path).await? else {
            continue;
        };
        policy
            .properties
            .virtual_machines
            .retain(|e| !ids.iter().any(|id| e.id.eq_ignore_ascii_case(id)));
        if policy.properties.virtual_machines.is_empty() {
            ses.c.delete(&format!("{path}?{API}")).await?;
        } else {
            azure::put_policy(&ses.c, &path, &policy).await?;
        }
        for id in ids {
            done.push(DisabledVm {
                vm: id,
                policy: path.clone(),
            });
        }
    }
    let out = Disabled { disabled: done };
    print(ses.json, &out, || {
        for e in &out.disabled {
            println!(
                "JIT disabled on {} (its deny rules are removed; live grants revoked)",
                short_id(&e.vm)
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}
