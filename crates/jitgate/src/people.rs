//! The verbs a person uses daily: login, enable/disable, request, ssh/connect, revoke,
//! requests, vm show, audit show. All go through the controller's API.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use jitgate_core::Timestamp;
use jitgate_core::net::SourcePrefix;
use serde_json::{Value, json};

use crate::cli::{ClientArgs, items, print, s};
use crate::client::{self, Client, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_TIMEOUT, Exit};
use crate::human;
use crate::table::Table;
use crate::usage::{FlagMap, bad_flag, name_flags, usage};

const MANAGEMENT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];
const API: &str = "api-version=2020-01-01";

fn invalid(msg: impl Into<String>) -> anyhow::Error {
    Exit::err(EXIT_INVALID, msg)
}

// ---- shared lookups ---------------------------------------------------------------

struct Session {
    c: Client,
    json: bool,
}

impl Session {
    fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        Ok(Session {
            c: Client::new(args)?,
            json: args.json,
        })
    }

    /// The machine's full view (policy, agent report, addresses), found by name
    /// without listing every machine.
    async fn vm(&self, name: &str) -> anyhow::Result<Value> {
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
    async fn whoami(&self) -> anyhow::Result<(String, String)> {
        let v = self.c.get("/api/v1/whoami").await?;
        Ok((s(&v["principal"]), s(&v["callerIp"])))
    }
}

fn policy_path_of(vm: &Value) -> Option<String> {
    vm["policy"].as_str().map(str::to_owned)
}

// ---- login ------------------------------------------------------------------------

#[derive(Args)]
pub struct LoginArgs {
    /// Controller URL, e.g. https://jit.example.com:8443
    pub url: String,
    /// Your token (from `jitgate token create`); or give --token-stdin.
    #[arg(long, env = "JITGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from standard input.
    #[arg(long)]
    pub token_stdin: bool,
    /// CA certificate (PEM) for a controller with a private CA, or the controller's
    /// self-signed certificate (pinned as it is).
    #[arg(long, conflicts_with = "ca_fingerprint")]
    pub ca_cert: Option<PathBuf>,
    /// SHA-256 fingerprint of the controller's CA (`jitgate serve` prints it): pin the
    /// certificate with that fingerprint without asking. Without it, login shows the
    /// fingerprint of a certificate this machine does not trust and asks once.
    #[arg(long, value_parser = crate::cli::parse_fingerprint)]
    pub ca_fingerprint: Option<jitgate_proto::tls::Fingerprint>,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

pub async fn login(a: LoginArgs) -> anyhow::Result<ExitCode> {
    let token = match (a.token, a.token_stdin) {
        (_, true) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the token from standard input")?;
            line.trim().to_owned()
        }
        (Some(t), false) => t,
        (None, false) => return Err(usage("give --token TOKEN or --token-stdin")),
    };
    if token.is_empty() {
        return Err(usage("the token is empty"));
    }
    let url = a.url.trim_end_matches('/').to_owned();
    let ca = match a.ca_cert {
        Some(p) => Some(std::fs::canonicalize(&p).unwrap_or(p)),
        None => crate::trust::first_contact(&url, a.ca_fingerprint).await?,
    };
    let c = Client::build(&url, Some(token.clone()), ca.as_deref())?;
    let who = c.get("/api/v1/whoami").await?;
    let path = client::save(&client::Saved {
        url: Some(a.url.trim_end_matches('/').to_owned()),
        token: Some(token),
        ca_cert: ca,
    })?;
    let out = json!({
        "url": a.url.trim_end_matches('/'),
        "principal": who["principal"],
        "callerIp": who["callerIp"],
        "saved": path.display().to_string(),
    });
    print(a.json, &out, |v| {
        println!(
            "logged in to {} as {} (your address as the controller sees it: {}); saved in {}",
            s(&v["url"]),
            s(&v["principal"]),
            s(&v["callerIp"]),
            s(&v["saved"])
        )
    });
    Ok(ExitCode::SUCCESS)
}

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

/// Reads a policy (Azure JSON) or `None` when it does not exist yet.
async fn get_policy(c: &Client, path: &str) -> anyhow::Result<Option<Value>> {
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
fn check_ports(ports: &[u16]) -> anyhow::Result<()> {
    if ports.contains(&0) {
        return Err(bad_flag("--port", "0 is not a port; give 1 to 65535"));
    }
    Ok(())
}

fn short_id(id: &str) -> String {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() == 9 {
        format!("{}/{}", parts[4], parts[8])
    } else {
        id.to_owned()
    }
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

// ---- request ------------------------------------------------------------------------

#[derive(Args)]
pub struct RequestArgs {
    #[arg(required = true)]
    pub vms: Vec<String>,
    /// Ports (repeatable) [default: the machine's only protected port].
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// How long (e.g. 30m, 1h, PT1H) [default: the policy's maximum, at most 1h].
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// `my-ip` (the address the controller sees) or a CIDR within the allowed sources.
    #[arg(long, default_value = "my-ip")]
    pub from: String,
    /// Why you need access (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The protected ports of a VM and their maximum durations, from its policy.
async fn protected_ports(c: &Client, vm: &Value) -> anyhow::Result<(String, Vec<(u16, String)>)> {
    let name = short_id(&s(&vm["id"]));
    let path = policy_path_of(vm).ok_or_else(|| {
        invalid(format!("{name} is not protected by JIT; an administrator can enable it with `jitgate enable {name}`"))
    })?;
    let policy = get_policy(c, &path)
        .await?
        .ok_or_else(|| Exit::err(EXIT_NOT_FOUND, format!("the policy of {name} is gone")))?;
    let id = s(&vm["id"]);
    let entry = policy["properties"]["virtualMachines"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| s(&e["id"]).eq_ignore_ascii_case(&id))
                .cloned()
        })
        .ok_or_else(|| {
            Exit::err(
                EXIT_NOT_FOUND,
                format!("{name} is not in its policy any more"),
            )
        })?;
    let ports = entry["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["number"].as_u64()? as u16,
                        s(&p["maxRequestAccessDuration"]),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((path, ports))
}

struct Wanted {
    vm: Value,
    path: String,
    ports: Vec<(u16, String)>,
}

/// The initiate fields a request fills, and the flags they come from.
const INITIATE_FLAGS: FlagMap = &[
    ("duration", "--for"),
    ("allowedSourceAddressPrefix", "--from"),
    ("justification", "--reason"),
    ("number", "--port"),
    ("ports", "--port"),
];

/// `--for` as ISO 8601 (none: the policy decides).
fn for_duration(text: Option<&str>) -> anyhow::Result<Option<String>> {
    text.map(|t| human::to_iso(t).map_err(|e| bad_flag("--for", e)))
        .transpose()
}

async fn initiate(
    ses: &Session,
    wanted: &[Wanted],
    duration: Option<&str>,
    from: &str,
    reason: Option<&str>,
) -> anyhow::Result<Vec<Value>> {
    let mut by_policy: BTreeMap<&str, Vec<&Wanted>> = BTreeMap::new();
    for w in wanted {
        by_policy.entry(&w.path).or_default().push(w);
    }
    let mut out = Vec::new();
    for (path, ws) in by_policy {
        let vms: Vec<Value> = ws
            .iter()
            .map(|w| {
                let ports: Vec<Value> = w
                    .ports
                    .iter()
                    .map(|(n, max)| {
                        let d = match duration {
                            Some(d) => d.to_owned(),
                            None => format!("PT{}S", human::iso_secs(max).clamp(1, 3600)),
                        };
                        let mut p = json!({"number": n, "duration": d});
                        if from != "my-ip" {
                            p["allowedSourceAddressPrefix"] = json!(from);
                        }
                        p
                    })
                    .collect();
                json!({"id": w.vm["id"], "ports": ports})
            })
            .collect();
        let mut body = json!({"virtualMachines": vms});
        if let Some(r) = reason {
            body["justification"] = json!(r);
        }
        let (resp, headers) = ses
            .c
            .post_with_headers(&format!("{path}/initiate?{API}"), &body)
            .await
            .map_err(|e| name_flags(e, INITIATE_FLAGS))?;
        let id = headers
            .get("x-jitgate-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        out.push(json!({"request": id, "granted": resp}));
    }
    Ok(out)
}

pub async fn request(a: RequestArgs) -> anyhow::Result<ExitCode> {
    let duration = for_duration(a.duration.as_deref())?;
    if a.from != "my-ip" {
        SourcePrefix::parse(&a.from)
            .map_err(|e| bad_flag("--from", format!("{e} (or use my-ip)")))?;
    }
    check_ports(&a.ports)?;
    let ses = Session::new(&a.client)?;
    let mut wanted = Vec::new();
    for name in &a.vms {
        let vm = ses.vm(name).await?;
        let (path, protected) = protected_ports(&ses.c, &vm).await?;
        let short = short_id(&s(&vm["id"]));
        let list: Vec<String> = protected.iter().map(|(p, _)| p.to_string()).collect();
        let ports: Vec<(u16, String)> = if a.ports.is_empty() {
            match protected.as_slice() {
                [one] => vec![one.clone()],
                _ => {
                    return Err(invalid(format!(
                        "{short} protects ports {}: say which with --port",
                        list.join(", ")
                    )));
                }
            }
        } else {
            let mut v = Vec::new();
            for p in &a.ports {
                match protected.iter().find(|(n, _)| n == p) {
                    Some(x) => v.push(x.clone()),
                    None => {
                        return Err(invalid(format!(
                            "port {p} is not protected on {short} (protected: {}); ask for one of those",
                            list.join(", ")
                        )));
                    }
                }
            }
            v
        };
        if let Some(d) = &duration {
            for (p, max) in &ports {
                if human::iso_secs(d) > human::iso_secs(max) {
                    return Err(invalid(format!(
                        "--for {} is longer than the {} maximum for port {p} on {short}; ask for less",
                        a.duration.as_deref().unwrap_or(""),
                        human::iso(max)
                    )));
                }
            }
        }
        wanted.push(Wanted { vm, path, ports });
    }
    let results = initiate(
        &ses,
        &wanted,
        duration.as_deref(),
        &a.from,
        a.reason.as_deref(),
    )
    .await?;
    let out = json!({"requests": results});
    print(ses.json, &out, print_granted);
    Ok(ExitCode::SUCCESS)
}

fn print_granted(v: &Value) {
    for r in v["requests"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        for vm in r["granted"]["virtualMachines"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            for p in vm["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                println!(
                    "granted {} port {} from {} until {}, request {}",
                    short_id(&s(&vm["id"])),
                    s(&p["number"]),
                    s(&p["allowedSourceAddressPrefix"]),
                    human::time(&s(&p["endTimeUtc"])),
                    s(&r["request"])
                );
            }
        }
        println!("end it sooner with: jitgate revoke {}", s(&r["request"]));
    }
}

// ---- ssh / connect --------------------------------------------------------------------

#[derive(Args)]
pub struct ConnectArgs {
    pub vm: String,
    #[arg(long, default_value_t = 22)]
    pub port: u16,
    /// Address or name to connect to [default: the address the agent reports, else the machine name].
    #[arg(long)]
    pub host: Option<String>,
    /// How long to ask for when no live grant covers you (e.g. 15m, 1h) [default: the
    /// policy's maximum, at most 1h].
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// How long to wait for the port to open (e.g. 30s, 2m; a bare number is seconds).
    #[arg(long, default_value = "30s")]
    pub wait: String,
    /// Why you need access (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct SshArgs {
    /// [user@]machine
    pub target: String,
    #[arg(long, default_value_t = 22)]
    pub port: u16,
    /// Address or name to connect to [default: the address the agent reports, else the machine name].
    #[arg(long)]
    pub host: Option<String>,
    /// How long to ask for when no live grant covers you: a short grant for one
    /// session, e.g. 15m [default: the policy's maximum, at most 1h].
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// How long to wait for the port to open (e.g. 30s, 2m; a bare number is seconds).
    #[arg(long, default_value = "30s")]
    pub wait: String,
    /// Why you need access (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    /// Stay the parent of ssh and revoke the grant when ssh exits (a grant this run did
    /// not make, reused from earlier, is left as it is).
    #[arg(long)]
    pub revoke_on_exit: bool,
    /// The ssh program.
    #[arg(long, default_value = "ssh")]
    pub ssh: PathBuf,
    /// Arguments for ssh: options, then optionally a remote command.
    #[arg(last = true)]
    pub ssh_args: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--wait`: a duration, or a bare number of seconds (zero: try once).
fn wait_duration(text: &str) -> anyhow::Result<Duration> {
    if let Ok(secs) = text.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let secs = human::parse_secs(text).map_err(|e| bad_flag("--wait", e))?;
    Ok(Duration::from_secs(secs.unsigned_abs()))
}

/// The host's address from the agent's report (global IPv4 first).
fn agent_address(vm: &Value) -> Option<String> {
    let addrs: Vec<String> = vm["agent"]["addresses"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    let ip = |a: &String| a.split('/').next().and_then(|x| x.parse::<IpAddr>().ok());
    addrs
        .iter()
        .filter_map(ip)
        .find(|i| i.is_ipv4() && !i.is_loopback())
        .or_else(|| addrs.iter().filter_map(ip).find(|i| matches!(i, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_loopback())))
        .map(|i| i.to_string())
}

/// The host's address from the agent's report, else the machine name.
fn host_of(vm: &Value) -> String {
    agent_address(vm).unwrap_or_else(|| s(&vm["name"]))
}

/// Where to connect, resolved before anything is asked of the controller: a machine
/// whose address is unknown gets no grant nobody could use.
fn resolve_host(
    vm: &Value,
    flag: Option<&str>,
    port: u16,
) -> anyhow::Result<(String, Vec<SocketAddr>)> {
    let host = flag.map(str::to_owned).unwrap_or_else(|| host_of(vm));
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    if !addrs.is_empty() {
        return Ok((host, addrs));
    }
    let short = short_id(&s(&vm["id"]));
    Err(Exit::err(
        EXIT_NOT_FOUND,
        match flag {
            Some(h) => format!(
                "--host {h} does not resolve to an address; give an address or a name that resolves"
            ),
            None => format!(
                "cannot find the address of {short}: its agent reported none and the name {host} does not resolve; give --host ADDRESS (nothing was requested)"
            ),
        },
    ))
}

/// A live grant of mine that covers a port.
struct Grant {
    request: String,
    end: String,
    /// Made earlier (by me), not by this run.
    reused: bool,
}

/// Makes sure a live grant of mine from my address covers `port`. Only my own grants
/// are reused: someone else's grant from the same address (a shared office NAT) is not
/// mine to use, and my access must be on record as mine.
async fn ensure_grant(
    ses: &Session,
    vm: &Value,
    port: u16,
    duration: Option<&str>,
    reason: Option<&str>,
) -> anyhow::Result<Grant> {
    let (principal, my_ip) = ses.whoami().await?;
    let my_ip: IpAddr = my_ip
        .parse()
        .context("the controller reported an unreadable address")?;
    let me = SourcePrefix::host(my_ip);
    let reusable = vm["grants"].as_array().and_then(|gs| {
        gs.iter().find(|g| {
            g["requestor"].as_str() == Some(principal.as_str())
                && g["port"].as_u64() == Some(port as u64)
                && g["secondsLeft"].as_i64().unwrap_or(0) > 30
                && SourcePrefix::parse(g["source"].as_str().unwrap_or(""))
                    .is_ok_and(|src| src.contains(&me))
        })
    });
    if let Some(g) = reusable {
        eprintln!(
            "reusing a live grant for port {port} ({} left, request {})",
            human::left(&s(&g["endTimeUtc"])),
            s(&g["request"])
        );
        return Ok(Grant {
            request: s(&g["request"]),
            end: s(&g["endTimeUtc"]),
            reused: true,
        });
    }
    let (path, protected) = protected_ports(&ses.c, vm).await?;
    let short = short_id(&s(&vm["id"]));
    let rule = protected.into_iter().find(|(p, _)| *p == port).ok_or_else(|| {
        invalid(format!("port {port} is not protected by JIT on {short}; connect directly, or ask an admin to `jitgate enable {short} --port {port}`"))
    })?;
    let wanted = [Wanted {
        vm: vm.clone(),
        path,
        ports: vec![rule],
    }];
    let res = initiate(ses, &wanted, duration, "my-ip", reason).await?;
    let end = s(&res[0]["granted"]["virtualMachines"][0]["ports"][0]["endTimeUtc"]);
    eprintln!(
        "granted port {port} on {short} from {my_ip} until {}",
        human::time(&end)
    );
    Ok(Grant {
        request: s(&res[0]["request"]),
        end,
        reused: false,
    })
}

/// Waits until a TCP connection to one of `addrs` succeeds from here.
fn wait_open(
    host: &str,
    addrs: &[SocketAddr],
    port: u16,
    wait: Duration,
) -> anyhow::Result<SocketAddr> {
    let tty = std::io::stderr().is_terminal();
    let spinner = ['|', '/', '-', '\\'];
    let start = Instant::now();
    let mut i = 0;
    loop {
        for a in addrs {
            if TcpStream::connect_timeout(a, Duration::from_millis(300)).is_ok() {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return Ok(*a);
            }
        }
        if start.elapsed() >= wait {
            if tty {
                eprint!("\r\x1b[K");
            }
            return Err(Exit::err(
                EXIT_TIMEOUT,
                format!(
                    "port {port} on {host} did not open within {}; check the machine's agent with `jitgate vm show`, or that {host} is the right address (--host)",
                    human::duration(wait.as_secs() as i64)
                ),
            ));
        }
        if tty {
            eprint!(
                "\r{} waiting for {host}:{port} to open ({}s)",
                spinner[i % 4],
                start.elapsed().as_secs()
            );
            let _ = std::io::stderr().flush();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub async fn connect(a: ConnectArgs) -> anyhow::Result<ExitCode> {
    let duration = for_duration(a.duration.as_deref())?;
    let wait = wait_duration(&a.wait)?;
    let ses = Session::new(&a.client)?;
    let vm = ses.vm(&a.vm).await?;
    let (host, addrs) = resolve_host(&vm, a.host.as_deref(), a.port)?;
    let grant = ensure_grant(&ses, &vm, a.port, duration.as_deref(), a.reason.as_deref()).await?;
    let addr = tokio::task::block_in_place(|| wait_open(&host, &addrs, a.port, wait))?;
    let out = json!({
        "vm": vm["id"],
        "port": a.port,
        "address": addr.to_string(),
        "request": grant.request,
        "endTimeUtc": grant.end,
        "reused": grant.reused,
    });
    print(ses.json, &out, |v| {
        println!(
            "{} port {} is open: connect to {}",
            short_id(&s(&v["vm"])),
            s(&v["port"]),
            s(&v["address"])
        );
        println!(
            "it stays open until {}; end it sooner with: jitgate revoke {}",
            human::time(&s(&v["endTimeUtc"])),
            s(&v["request"])
        );
    });
    Ok(ExitCode::SUCCESS)
}

/// ssh's options that take a value (from ssh(1)).
const SSH_OPTS_WITH_VALUE: &str = "BbcDEeFIiJLlmOoPpQRSWw";

/// Splits user arguments into ssh options (before the destination) and the remote
/// command (after it).
pub fn split_ssh_args(args: &[String]) -> (Vec<String>, Vec<String>) {
    let mut opts = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if !a.starts_with('-') || a == "-" {
            break;
        }
        opts.push(a.clone());
        if a == "--" {
            i += 1;
            break;
        }
        // `-i key`: the value is the next argument unless attached (`-ikey`).
        let last = a.chars().last().unwrap_or(' ');
        if a.len() == 2 && SSH_OPTS_WITH_VALUE.contains(last) && i + 1 < args.len() {
            opts.push(args[i + 1].clone());
            i += 1;
        }
        i += 1;
    }
    (opts, args[i.min(args.len())..].to_vec())
}

pub async fn ssh(a: SshArgs) -> anyhow::Result<ExitCode> {
    let duration = for_duration(a.duration.as_deref())?;
    let wait = wait_duration(&a.wait)?;
    let (user, machine) = match a.target.split_once('@') {
        Some((u, m)) => (Some(u.to_owned()), m.to_owned()),
        None => (None, a.target.clone()),
    };
    let ses = Session::new(&a.client)?;
    let vm = ses.vm(&machine).await?;
    let short = short_id(&s(&vm["id"]));
    let (host, addrs) = resolve_host(&vm, a.host.as_deref(), a.port)?;
    let grant = ensure_grant(&ses, &vm, a.port, duration.as_deref(), a.reason.as_deref()).await?;
    tokio::task::block_in_place(|| wait_open(&host, &addrs, a.port, wait))?;
    let until = human::time(&grant.end);
    if a.revoke_on_exit && !grant.reused {
        eprintln!(
            "port {} on {short} is open until {until} or until ssh exits (then it is revoked)",
            a.port
        );
    } else {
        eprintln!(
            "port {} on {short} stays open until {until}; end it sooner with: jitgate revoke {}",
            a.port, grant.request
        );
    }
    let (opts, command) = split_ssh_args(&a.ssh_args);
    let dest = match user {
        Some(u) => format!("{u}@{host}"),
        None => host,
    };
    let mut cmd = std::process::Command::new(&a.ssh);
    cmd.arg("-p")
        .arg(a.port.to_string())
        .args(&opts)
        .arg(&dest)
        .args(&command);
    let cannot_run = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot run {}: {e} (is openssh-client installed?)",
            a.ssh.display()
        )
    };
    if !a.revoke_on_exit {
        // Replace this process: the terminal and signals belong to ssh from here on.
        use std::os::unix::process::CommandExt;
        return Err(cannot_run(cmd.exec()));
    }
    let code = run_child(cmd).await.map_err(cannot_run)?;
    if grant.reused {
        eprintln!(
            "ssh exited; request {} was not made by this run and stays open until {until}; end it with: jitgate revoke {}",
            grant.request, grant.request
        );
        return Ok(ExitCode::from(code));
    }
    ses.c
        .post(
            &format!("/api/v1/requests/{}/revoke", grant.request),
            &json!({"vm": vm["id"]}),
        )
        .await
        .with_context(|| {
            format!(
                "ssh exited, but revoking request {} failed; it stays open until {until}: run `jitgate revoke {}`",
                grant.request, grant.request
            )
        })?;
    eprintln!(
        "ssh exited; revoked request {}: port {} on {short} is closed",
        grant.request, a.port
    );
    Ok(ExitCode::from(code))
}

/// Runs ssh as a child and waits for it; its exit status (128 + the signal when a
/// signal ended it). Ctrl-C belongs to ssh (the terminal sends it to both; this process
/// stays to revoke); SIGTERM and SIGHUP are passed on to ssh.
async fn run_child(cmd: std::process::Command) -> std::io::Result<u8> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    let pass_on = |child: &tokio::process::Child, sig: nix::sys::signal::Signal| {
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = int.recv() => {}
            _ = term.recv() => pass_on(&child, nix::sys::signal::Signal::SIGTERM),
            _ = hup.recv() => pass_on(&child, nix::sys::signal::Signal::SIGHUP),
        }
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        (None, None) => 1,
    })
}

// ---- revoke / requests ------------------------------------------------------------------

#[derive(Args)]
pub struct RevokeArgs {
    /// A request id, or a machine (your live requests on it are revoked).
    pub target: String,
    /// With a machine: also revoke other people's live requests (needs permission).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn revoke(a: RevokeArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let mut revoked = Vec::new();
    if jitgate_core::request::RequestId::parse(&a.target).is_ok() {
        let r = ses
            .c
            .post(&format!("/api/v1/requests/{}/revoke", a.target), &json!({}))
            .await?;
        revoked.extend(r["revoked"].as_array().cloned().unwrap_or_default());
    } else {
        let vm = ses.c.find_vm(&a.target).await?;
        let id = s(&vm["id"]);
        let mut q = vec![("active", "true".to_owned()), ("vm", id.clone())];
        if !a.all {
            q.push(("mine", "true".to_owned()));
        }
        let list = ses.c.get_query("/api/v1/requests", &q).await?;
        // The list holds requests with a live port anywhere that also name this
        // machine; revoke only those still live on it (revoking one whose port here
        // already ended would fail and stop before the others).
        let live_here = |r: &&Value| {
            r["virtualMachines"].as_array().is_some_and(|vms| {
                vms.iter().any(|v| {
                    s(&v["id"]).eq_ignore_ascii_case(&id)
                        && v["ports"]
                            .as_array()
                            .is_some_and(|ps| ps.iter().any(|p| p["live"] == true))
                })
            })
        };
        for r in items(&list).iter().filter(live_here) {
            let res = ses
                .c
                .post(
                    &format!("/api/v1/requests/{}/revoke", s(&r["id"])),
                    &json!({"vm": id}),
                )
                .await?;
            revoked.extend(res["revoked"].as_array().cloned().unwrap_or_default());
        }
        if revoked.is_empty() {
            return Err(Exit::err(
                EXIT_NOT_FOUND,
                format!(
                    "no live request of yours on {}; see `jitgate requests --mine --active`",
                    a.target
                ),
            ));
        }
    }
    let out = json!({"revoked": revoked});
    print(ses.json, &out, |v| {
        for p in v["revoked"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            println!("revoked {} port {}", short_id(&s(&p["vm"])), s(&p["port"]));
        }
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct RequestsArgs {
    /// Only requests you made.
    #[arg(long)]
    pub mine: bool,
    /// Only requests with a port still open.
    #[arg(long)]
    pub active: bool,
    /// Only requests for this machine.
    #[arg(long)]
    pub vm: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn requests(a: RequestsArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let mut q = vec![("limit", a.limit.to_string())];
    if a.mine {
        q.push(("mine", "true".to_owned()));
    }
    if a.active {
        q.push(("active", "true".to_owned()));
    }
    if let Some(v) = &a.vm {
        q.push(("vm", s(&ses.c.find_vm(v).await?["id"])));
    }
    let v = ses
        .c
        .get_query("/api/v1/requests", &q)
        .await
        .map_err(|e| name_flags(e, &[("limit", "--limit")]))?;
    print(ses.json, &v, |v| {
        let mut t = Table::new(&[
            "REQUEST",
            "REQUESTOR",
            "MACHINE",
            "PORT",
            "SOURCE",
            "STATUS",
            "REASON",
            "UNTIL",
        ]);
        for r in items(v) {
            for vm in r["virtualMachines"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                for p in vm["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                    let (status, reason) = port_status(p);
                    t.row(vec![
                        s(&r["id"]),
                        s(&r["requestor"]),
                        short_id(&s(&vm["id"])),
                        s(&p["number"]),
                        s(&p["allowedSourceAddressPrefix"]),
                        status.to_owned(),
                        reason.to_owned(),
                        human::time(&s(&p["endTimeUtc"])),
                    ]);
                }
            }
        }
        t.print();
    });
    Ok(ExitCode::SUCCESS)
}

/// A requested port's STATUS (Active or Ended) and, once ended, why.
fn port_status(p: &Value) -> (&'static str, &'static str) {
    if p["status"] == "Initiated" {
        if p["live"] == false {
            ("Ended", "Expired")
        } else {
            ("Active", "")
        }
    } else {
        let reason = match p["statusReason"].as_str().unwrap_or("") {
            "Expired" => "Expired",
            "UserRequested" => "Revoked",
            "NewerRequestInitiated" => "Superseded by a newer request",
            "PolicyChanged" => "Policy changed",
            _ => "Ended",
        };
        ("Ended", reason)
    }
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
        let rules = crate::cli::nsg_table(v["nsg"].as_array().map(Vec::as_slice).unwrap_or(&[]));
        for line in rules
            .render(crate::table::terminal_width().map(|w| w.saturating_sub(4)))
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

// ---- audit show ----------------------------------------------------------------------------

#[derive(Args)]
pub struct AuditShowArgs {
    /// Only events about this machine: its requests, grants and agent, and the policy
    /// changes that added, changed or removed it.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only events by this principal.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only actions starting with this (e.g. request., policy.create, authorization.denied).
    #[arg(long)]
    pub action: Option<String>,
    /// How far back (e.g. 24h, 30m, P1D) or a time (2026-01-01T00:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Keep printing new events.
    #[arg(long)]
    pub follow: bool,
    /// Print CSV (the export format, every field; with --vm only the events whose
    /// target is the machine). --json prints JSON lines.
    #[arg(long, conflicts_with = "follow")]
    pub csv: bool,
    /// At most this many events (1 to 100000).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The largest page the controller serves.
const AUDIT_PAGE_MAX: usize = 100_000;

/// `--since`: a duration back from now, or a time.
fn since_time(text: &str) -> anyhow::Result<Timestamp> {
    match human::parse_secs(text) {
        Ok(secs) => Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(secs))
            .map_err(|_| bad_flag("--since", format!("'{text}' is too far back"))),
        Err(_) => jitgate_core::request::parse_time(text).map_err(|_| {
            bad_flag(
                "--since",
                format!(
                    "'{text}' is neither a duration ({}) nor a time such as 2026-05-17T09:06:45Z",
                    human::DURATION_FORMS
                ),
            )
        }),
    }
}

/// Which policy events concern one machine: those that list it (it was added or its
/// rules changed), and the next event on a policy that listed it but no longer does
/// (it was removed, or the policy deleted). Fed every policy event in order.
struct PolicyEventsOf {
    vm: String,
    /// Policies (lower-cased ids) that list the machine as of the last event seen.
    member_of: std::collections::BTreeSet<String>,
}

impl PolicyEventsOf {
    fn new(vm: &str) -> Self {
        PolicyEventsOf {
            vm: vm.to_owned(),
            member_of: Default::default(),
        }
    }

    /// Whether `e` (a `policy.*` event) concerns the machine.
    fn concerns(&mut self, e: &Value) -> bool {
        let policy = s(&e["target"]).to_ascii_lowercase();
        let lists = e["details"]["virtualMachines"]
            .as_array()
            .is_some_and(|vms| {
                vms.iter()
                    .any(|v| s(&v["vm"]).eq_ignore_ascii_case(&self.vm))
            });
        if lists {
            self.member_of.insert(policy);
            true
        } else {
            self.member_of.remove(&policy)
        }
    }
}

/// One audit event as a table row.
fn audit_row(e: &Value) -> Vec<String> {
    let d = &e["details"];
    let why = d["justification"]
        .as_str()
        .or(d["reason"].as_str())
        .unwrap_or("")
        .to_owned();
    vec![
        s(&e["seq"]),
        human::stamp(&s(&e["time"])),
        s(&e["actor"]),
        s(&e["source"]),
        s(&e["action"]),
        short_target(&s(&e["target"])),
        s(&e["outcome"]),
        why,
    ]
}

const AUDIT_HEADERS: [&str; 8] = [
    "SEQ",
    "TIME",
    "ACTOR",
    "SOURCE",
    "ACTION",
    "TARGET",
    "OUTCOME",
    "JUSTIFICATION",
];

/// A machine or policy id in short (`prod/web-1`, `policy prod/default`); other
/// targets as they are.
fn short_target(id: &str) -> String {
    let parts: Vec<&str> = id.split('/').collect();
    match parts.as_slice() {
        [
            "",
            "subscriptions",
            _,
            "resourceGroups",
            rg,
            "providers",
            _,
            "locations",
            _,
            "jitNetworkAccessPolicies",
            name,
        ] => {
            format!("policy {rg}/{name}")
        }
        _ => short_id(id),
    }
}

pub async fn audit_show(a: AuditShowArgs) -> anyhow::Result<ExitCode> {
    if !(1..=AUDIT_PAGE_MAX).contains(&a.limit) {
        return Err(bad_flag(
            "--limit",
            format!("{} is not from 1 to {AUDIT_PAGE_MAX}", a.limit),
        ));
    }
    let since = a.since.as_deref().map(since_time).transpose()?;
    let ses = Session::new(&a.client)?;
    let vm = match &a.vm {
        Some(v) => Some(s(&ses.c.find_vm(v).await?["id"])),
        None => None,
    };
    let mut q = vec![("limit", a.limit.to_string())];
    if let Some(x) = &a.actor {
        q.push(("actor", x.clone()));
    }
    // The machine's own events; its policy events are found apart (they name the
    // policy as their target).
    let mut own = q.clone();
    if let Some(x) = &a.action {
        own.push(("action", x.clone()));
    }
    if let Some(id) = &vm {
        own.push(("vm", id.clone()));
    }
    if let Some(t) = since {
        own.push(("since", t.to_string()));
    }
    if a.csv {
        own.push(("format", "csv".to_owned()));
        print!("{}", ses.c.get_text("/api/v1/audit", &own).await?);
        return Ok(ExitCode::SUCCESS);
    }
    // Policy events: every one from the start (whether a later one removed the
    // machine depends on the earlier ones), shown from --since on.
    let policy_action = match a.action.as_deref() {
        None => Some("policy.".to_owned()),
        Some(x) if x.starts_with("policy.") || "policy.".starts_with(x) => Some(
            if x.len() > "policy.".len() {
                x
            } else {
                "policy."
            }
            .to_owned(),
        ),
        Some(_) => None,
    };
    // Every policy event is followed (by anyone: membership depends on them all);
    // --actor applies to what is shown.
    let mut policies = match (&vm, &policy_action) {
        (Some(id), Some(action)) => Some((
            vec![
                ("limit", AUDIT_PAGE_MAX.to_string()),
                ("action", action.clone()),
            ],
            PolicyEventsOf::new(id),
        )),
        _ => None,
    };
    // Policy events of the machine not shown yet (past --limit), and how far the
    // policy events were read.
    let mut pending: Vec<Value> = Vec::new();
    let mut policy_after: Option<u64> = None;
    let mut after: Option<u64> = None;
    let mut widths: Option<Vec<usize>> = None;
    loop {
        let mut page = own.clone();
        if let Some(seq) = after {
            page.push(("afterSeq", seq.to_string()));
        }
        let mut events = items(&ses.c.get_query("/api/v1/audit", &page).await?).to_vec();
        if let Some((query, tracker)) = &mut policies {
            let mut page = query.clone();
            if let Some(seq) = policy_after {
                page.push(("afterSeq", seq.to_string()));
            }
            let all = ses.c.get_query("/api/v1/audit", &page).await?;
            for e in items(&all) {
                policy_after = e["seq"].as_u64().or(policy_after);
                let concerns = tracker.concerns(e);
                let shown = since.is_none_or(|t| {
                    jitgate_core::request::parse_time(&s(&e["time"])).is_ok_and(|at| at >= t)
                }) && a.actor.as_ref().is_none_or(|x| e["actor"] == x.as_str());
                if concerns && shown {
                    pending.push(e.clone());
                }
            }
            events.append(&mut pending);
            events.sort_by_key(|e| e["seq"].as_u64());
            events.dedup_by_key(|e| e["seq"].as_u64());
            if events.len() > a.limit {
                // The machine's own events past the limit are read again next time;
                // its policy events are kept.
                pending = events
                    .split_off(a.limit)
                    .into_iter()
                    .filter(|e| s(&e["action"]).starts_with("policy."))
                    .collect();
            }
        }
        for e in &events {
            after = e["seq"].as_u64().or(after);
        }
        if ses.json {
            for e in &events {
                println!("{e}");
            }
        } else if events.is_empty() && !a.follow {
            eprintln!("no matching events");
        } else if !events.is_empty() || widths.is_none() {
            let mut t = Table::new(&AUDIT_HEADERS);
            if a.follow {
                // Room for the events still to come.
                t.at_least(&[6, 19, 16, 15, 22, 24, 7]);
            }
            for e in &events {
                t.row(audit_row(e));
            }
            let fit = crate::table::terminal_width();
            match &widths {
                None => {
                    let w = t.widths(fit);
                    print!("{}", t.render_with(&w, true, fit.is_some()));
                    widths = Some(w);
                }
                Some(w) => print!("{}", t.render_with(w, false, fit.is_some())),
            }
            let _ = std::io::stdout().flush();
        }
        if !a.follow {
            break;
        }
        if after.is_none() {
            after = Some(0);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(ExitCode::SUCCESS)
}

// ---- recommendations -------------------------------------------------------------------

#[derive(Args)]
pub struct RecommendationsArgs {
    #[arg(long)]
    pub resource_group: Option<String>,
    /// Only this verdict: Healthy, Unhealthy or NotApplicable.
    #[arg(long)]
    pub verdict: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn recommendations(a: RecommendationsArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let mut q = Vec::new();
    if let Some(rg) = &a.resource_group {
        q.push(("resourceGroup", rg.clone()));
    }
    if let Some(v) = &a.verdict {
        q.push(("verdict", v.clone()));
    }
    let v = ses
        .c
        .get_all_pages("/api/v1/recommendations", &q)
        .await
        .map_err(|e| {
            name_flags(
                e,
                &[
                    ("verdict", "--verdict"),
                    ("resourceGroup", "--resource-group"),
                ],
            )
        })?;
    print(ses.json, &v, |v| {
        for (verdict, title) in [
            (
                "Unhealthy",
                "Not configured (Unhealthy): management ports open to everyone",
            ),
            ("Healthy", "Configured (Healthy)"),
            ("NotApplicable", "Unsupported (Not applicable)"),
        ] {
            let rows: Vec<&Value> = items(v)
                .iter()
                .filter(|r| r["verdict"] == verdict)
                .collect();
            println!("{title}: {}", s(&v["summary"][verdict]));
            for r in rows {
                println!(
                    "  {:<28} {}",
                    format!("{}/{}", s(&r["resourceGroup"]), s(&r["name"])),
                    s(&r["reason"])
                );
            }
        }
        if v["summary"]["Unhealthy"].as_u64().unwrap_or(0) > 0 {
            println!("Protect them: jitgate enable --recommended");
        }
    });
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ssh_args_split_options_from_the_remote_command() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            split_ssh_args(&v(&[
                "-i",
                "key",
                "-o",
                "BatchMode=yes",
                "-v",
                "uname",
                "-a"
            ])),
            (
                v(&["-i", "key", "-o", "BatchMode=yes", "-v"]),
                v(&["uname", "-a"])
            )
        );
        assert_eq!(
            split_ssh_args(&v(&["-ikey", "hostname"])),
            (v(&["-ikey"]), v(&["hostname"]))
        );
        assert_eq!(split_ssh_args(&v(&[])), (vec![], vec![]));
        assert_eq!(split_ssh_args(&v(&["--", "-x"])), (v(&["--"]), v(&["-x"])));
    }

    #[test]
    fn host_prefers_a_global_ipv4() {
        let vm = json!({"name": "web-1", "agent": {"addresses": ["fe80::1/64", "2001:db8::5/64", "10.0.0.5/24"]}});
        assert_eq!(host_of(&vm), "10.0.0.5");
        let vm = json!({"name": "web-1", "agent": {"addresses": ["fe80::1/64", "2001:db8::5/64"]}});
        assert_eq!(host_of(&vm), "2001:db8::5");
        assert_eq!(host_of(&json!({"name": "web-1"})), "web-1");
    }
}
