//! `jitgate enable` and `jitgate disable`: a machine joins or leaves its JIT policy
//! (Azure's `jitNetworkAccessPolicies`), the policy's other machines untouched;
//! `enable --recommended` calls the server's apply.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use jitgate_core::net::SourcePrefix;
use serde_json::{Value, json};

use crate::cli::ClientArgs;
use crate::client::Client;
use crate::cmd::{API, Session, get_policy, policy_path_of};
use crate::output::short_id;
use crate::output::{human, items, print, s};
use crate::usage::{FlagMap, bad_flag, name_flags, usage};

const MANAGEMENT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];

// ---- enable / disable --------------------------------------------------------------

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

/// The policy a VM should join: its own, else an existing one in its resource group,
/// else a new `default` one in the VM's location (or `global`).
/// Also says whether that policy exists already.
async fn target_policy(c: &Client, vm: &Value) -> anyhow::Result<(String, bool)> {
    if let Some(p) = policy_path_of(vm) {
        return Ok((p, true));
    }
    let sub = s(&vm["subscription"]);
    let rg = s(&vm["resourceGroup"]);
    let list = c
        .get(&format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/jitNetworkAccessPolicies?{API}"))
        .await?;
    if let Some(first) = items(&list).first() {
        return Ok((s(&first["id"]), true));
    }
    let loc = vm["location"].as_str().unwrap_or("global");
    Ok((
        format!(
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/default"
        ),
        false,
    ))
}

fn default_ports(vm: &Value) -> Vec<u16> {
    let listening: Vec<u16> = vm["agent"]["listening"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| {
                    l["protocol"]
                        .as_str()
                        .is_some_and(|p| p.eq_ignore_ascii_case("tcp"))
                })
                .filter_map(|l| l["port"].as_u64().map(|p| p as u16))
                .collect()
        })
        .unwrap_or_default();
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
        let v = ses
            .c
            .post(
                "/api/v1/recommendations/apply",
                &json!({"resourceGroup": a.resource_group}),
            )
            .await
            .map_err(|e| name_flags(e, &[("resourceGroup", "--resource-group")]))?;
        print(ses.json, &v, |v| {
            let list = v["enabled"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if list.is_empty() {
                println!("no Unhealthy machine: nothing to enable");
            }
            for e in list {
                let ports: Vec<String> = e["ports"]
                    .as_array()
                    .map(|a| a.iter().map(s).collect())
                    .unwrap_or_default();
                println!(
                    "JIT enabled on {}: ports {} (max 3h per request)",
                    short_id(&s(&e["vm"])),
                    ports.join(", ")
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
        let (target, exists) = target_policy(&ses.c, &vm).await?;
        plan.entry(target)
            .or_insert((exists, Vec::new()))
            .1
            .push((s(&vm["id"]), ports));
    }
    let mut done = Vec::new();
    for (path, (exists, vms)) in plan {
        // A policy known not to exist is not asked for (a 404 would be audited as a
        // refused call).
        let existing = if exists {
            get_policy(&ses.c, &path).await?
        } else {
            None
        };
        let mut entries: Vec<Value> = existing
            .as_ref()
            .and_then(|p| p["properties"]["virtualMachines"].as_array().cloned())
            .unwrap_or_default();
        let is = |e: &Value, id: &str| s(&e["id"]).eq_ignore_ascii_case(id);
        for (id, ports) in &vms {
            // The machine's current rules: every port stays unless listed and reshaped.
            let mut rules: Vec<Value> = entries
                .iter()
                .find(|e| is(e, id))
                .and_then(|e| e["ports"].as_array().cloned())
                .unwrap_or_default();
            for p in ports {
                let current = rules
                    .iter()
                    .position(|r| r["number"].as_u64() == Some(u64::from(*p)));
                if current.is_some() && !reshape {
                    continue;
                }
                let mut r =
                    json!({"number": p, "protocol": protocol, "maxRequestAccessDuration": max});
                match a.from.as_slice() {
                    [] => r["allowedSourceAddressPrefix"] = json!("*"),
                    [one] => r["allowedSourceAddressPrefix"] = json!(one),
                    many => r["allowedSourceAddressPrefixes"] = json!(many),
                }
                match current {
                    Some(i) => rules[i] = r,
                    None => rules.push(r),
                }
            }
            entries.retain(|e| !is(e, id));
            entries.push(json!({"id": id, "ports": rules}));
            done.push(json!({"vm": id, "ports": ports, "policy": path, "max": max}));
        }
        let kind = existing
            .as_ref()
            .map(|p| p["kind"].clone())
            .unwrap_or(json!("Basic"));
        ses.c
            .put(
                &format!("{path}?{API}"),
                &json!({"kind": kind, "properties": {"virtualMachines": entries}}),
            )
            .await
            .map_err(|e| name_flags(e, ENABLE_FLAGS))?;
    }
    let out = json!({"enabled": done});
    print(ses.json, &out, |v| {
        for e in v["enabled"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let ports: Vec<String> = e["ports"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            println!(
                "JIT enabled on {}: ports {} (max {} per request)",
                short_id(&s(&e["vm"])),
                ports.join(", "),
                human::iso(&s(&e["max"]))
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
        match policy_path_of(&vm) {
            Some(p) => plan.entry(p).or_default().push(s(&vm["id"])),
            None => eprintln!(
                "{} is not protected by JIT; nothing to do",
                short_id(&s(&vm["id"]))
            ),
        }
    }
    let mut done = Vec::new();
    for (path, ids) in plan {
        let Some(policy) = get_policy(&ses.c, &path).await? else {
            continue;
        };
        let mut entries = policy["properties"]["virtualMachines"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        entries.retain(|e| !ids.iter().any(|id| s(&e["id"]).eq_ignore_ascii_case(id)));
        if entries.is_empty() {
            ses.c.delete(&format!("{path}?{API}")).await?;
        } else {
            ses.c
                .put(
                    &format!("{path}?{API}"),
                    &json!({"kind": policy["kind"], "properties": {"virtualMachines": entries}}),
                )
                .await?;
        }
        for id in ids {
            done.push(json!({"vm": id, "policy": path}));
        }
    }
    print(ses.json, &json!({"disabled": done}), |v| {
        for e in v["disabled"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            println!(
                "JIT disabled on {} (its deny rules are removed; live grants revoked)",
                short_id(&s(&e["vm"]))
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}
