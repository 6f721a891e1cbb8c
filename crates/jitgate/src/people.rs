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

const MANAGEMENT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];
const API: &str = "api-version=2020-01-01";

// ---- durations --------------------------------------------------------------------

/// Accepts `90m`, `3h`, `1h30m`, `1d`, `45s` or ISO 8601 (`PT3H`); returns ISO 8601.
/// Durations of zero, and ones too long to represent, are refused.
pub fn iso_duration(text: &str) -> Result<String, String> {
    let t = text.trim();
    let too_long = || format!("'{text}' is too long a duration");
    let zero = || format!("'{text}' is zero: ask for some time");
    if t.starts_with(['P', 'p']) {
        if jitgate_core::duration::parse_iso8601_secs(t)? <= 0 {
            return Err(zero());
        }
        return Ok(t.to_ascii_uppercase());
    }
    let bad = || format!("'{text}' is not a duration such as 30m, 3h, 1h30m, 1d or PT3H");
    let mut secs: i64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        if num.is_empty() {
            return Err(bad());
        }
        let unit: i64 = match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        // Only digits: parsing fails only when the number is too large.
        let n: i64 = num.parse().map_err(|_| too_long())?;
        num.clear();
        secs = n
            .checked_mul(unit)
            .and_then(|s| secs.checked_add(s))
            .ok_or_else(too_long)?;
    }
    if !num.is_empty() || t.is_empty() {
        return Err(bad());
    }
    if secs <= 0 {
        return Err(zero());
    }
    let iso = format!("PT{secs}S");
    // The controller must be able to read it back.
    jitgate_core::duration::parse_iso8601_secs(&iso).map_err(|_| too_long())?;
    Ok(iso)
}

fn secs_of(iso: &str) -> i64 {
    jitgate_core::duration::parse_iso8601_secs(iso).unwrap_or(0)
}

fn human_secs(mut secs: i64) -> String {
    if secs <= 0 {
        return "ended".into();
    }
    let h = secs / 3600;
    secs %= 3600;
    let m = secs / 60;
    let s = secs % 60;
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m"),
    }
}

fn left_until(end: &str) -> String {
    match end.parse::<Timestamp>() {
        Ok(t) => human_secs(t.duration_since(Timestamp::now()).as_secs()),
        Err(_) => "?".into(),
    }
}

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

    async fn vms(&self) -> anyhow::Result<Vec<Value>> {
        Ok(items(&self.c.get("/api/v1/vms").await?).to_vec())
    }

    async fn vm(&self, all: &[Value], name: &str) -> anyhow::Result<Value> {
        let v = client::resolve(all, name)?;
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
        (None, false) => return Err(invalid("give --token TOKEN or --token-stdin")),
    };
    if token.is_empty() {
        return Err(invalid("the token is empty"));
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
    println!(
        "logged in to {} as {} (your address as the controller sees it: {}); saved in {}",
        a.url,
        s(&who["principal"]),
        s(&who["callerIp"]),
        path.display()
    );
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
            .await?;
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
                    "JIT enabled on {}: ports {} (max PT3H per request)",
                    short_id(&s(&e["vm"])),
                    ports.join(", ")
                );
            }
        });
        return Ok(ExitCode::SUCCESS);
    }
    let max = iso_duration(a.max.as_deref().unwrap_or("3h"))
        .map_err(|e| invalid(format!("--max: {e}")))?;
    let protocol = a.protocol.clone().unwrap_or_else(|| "*".to_owned());
    jitgate_core::net::Protocol::parse(&protocol)
        .map_err(|e| invalid(format!("--protocol: {e}")))?;
    // Without a flag that says how, a port already protected keeps its rule (and so
    // its live grants); only new ports get the defaults.
    let reshape = a.max.is_some() || a.protocol.is_some() || !a.from.is_empty();
    for f in &a.from {
        SourcePrefix::parse(f).map_err(|e| invalid(format!("--from: {e}")))?;
    }
    let ses = Session::new(&a.client)?;
    let all = ses.vms().await?;
    // Target policy -> (exists, [(vm id, ports)])
    let mut plan: BTreeMap<String, (bool, Vec<VmPorts>)> = BTreeMap::new();
    for name in &a.vms {
        let vm = ses.vm(&all, name).await?;
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
            .await?;
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
                s(&e["max"])
            );
        }
    });
    Ok(ExitCode::SUCCESS)
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
    let all = ses.vms().await?;
    let mut plan: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in &a.vms {
        let vm = ses.vm(&all, name).await?;
        match policy_path_of(&vm) {
            Some(p) => plan.entry(p).or_default().push(s(&vm["id"])),
            None => eprintln!(
                "{} is not protected by JIT; nothing to do",
                short_id(&s(&vm["id"]))
            ),
        }
    }
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
            println!(
                "JIT disabled on {} (its deny rules are removed; live grants revoked)",
                short_id(&id)
            );
        }
    }
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
                            None => format!("PT{}S", secs_of(max).clamp(1, 3600)),
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
            .await?;
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
    let duration = a
        .duration
        .as_deref()
        .map(iso_duration)
        .transpose()
        .map_err(|e| invalid(format!("--for: {e}")))?;
    if a.from != "my-ip" {
        SourcePrefix::parse(&a.from).map_err(|e| invalid(format!("--from: {e} (or use my-ip)")))?;
    }
    let ses = Session::new(&a.client)?;
    let all = ses.vms().await?;
    let mut wanted = Vec::new();
    for name in &a.vms {
        let vm = ses.vm(&all, name).await?;
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
                if secs_of(d) > secs_of(max) {
                    return Err(invalid(format!(
                        "--for {} is longer than the maximum of {max} for port {p} on {short}; ask for less",
                        a.duration.as_deref().unwrap_or("")
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
                    "granted {} port {} from {} until {} ({} left), request {}",
                    short_id(&s(&vm["id"])),
                    s(&p["number"]),
                    s(&p["allowedSourceAddressPrefix"]),
                    s(&p["endTimeUtc"]),
                    left_until(&s(&p["endTimeUtc"])),
                    s(&r["request"])
                );
            }
        }
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
    /// How long to ask for when no live grant covers you [default: policy maximum, at most 1h].
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// Seconds to wait for the port to open.
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
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
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long = "for")]
    pub duration: Option<String>,
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
    #[arg(long)]
    pub reason: Option<String>,
    /// The ssh program.
    #[arg(long, default_value = "ssh")]
    pub ssh: PathBuf,
    /// Arguments for ssh: options, then optionally a remote command.
    #[arg(last = true)]
    pub ssh_args: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The host's address from the agent's report (global IPv4 first), else the name.
fn host_of(vm: &Value) -> String {
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
        .unwrap_or_else(|| s(&vm["name"]))
}

/// Makes sure a live grant of mine from my address covers `port`; returns its end
/// time. Only my own grants are reused: someone else's grant from the same address
/// (a shared office NAT) is not mine to use, and my access must be on record as mine.
async fn ensure_grant(
    ses: &Session,
    vm: &Value,
    port: u16,
    duration: Option<&str>,
    reason: Option<&str>,
) -> anyhow::Result<String> {
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
            "reusing a live grant for port {port} ({} left)",
            left_until(&s(&g["endTimeUtc"]))
        );
        return Ok(s(&g["endTimeUtc"]));
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
    eprintln!("granted port {port} on {short} from {my_ip} until {end}");
    Ok(end)
}

/// Waits until a TCP connection to `host:port` succeeds from here.
fn wait_open(host: &str, port: u16, wait: Duration) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}; give --host ADDRESS"))?
        .collect();
    let tty = std::io::stderr().is_terminal();
    let spinner = ['|', '/', '-', '\\'];
    let start = Instant::now();
    let mut i = 0;
    loop {
        for a in &addrs {
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
                    "port {port} on {host} did not open within {}s; check the machine's agent with `jitgate vm show`, or that {host} is the right address (--host)",
                    wait.as_secs()
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
    let duration = a
        .duration
        .as_deref()
        .map(iso_duration)
        .transpose()
        .map_err(|e| invalid(format!("--for: {e}")))?;
    let ses = Session::new(&a.client)?;
    let all = ses.vms().await?;
    let vm = ses.vm(&all, &a.vm).await?;
    let end = ensure_grant(&ses, &vm, a.port, duration.as_deref(), a.reason.as_deref()).await?;
    let host = a.host.clone().unwrap_or_else(|| host_of(&vm));
    let addr =
        tokio::task::block_in_place(|| wait_open(&host, a.port, Duration::from_secs(a.wait)))?;
    println!(
        "{} port {} is open: connect to {addr} (until {end}, {} left)",
        short_id(&s(&vm["id"])),
        a.port,
        left_until(&end)
    );
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
    let duration = a
        .duration
        .as_deref()
        .map(iso_duration)
        .transpose()
        .map_err(|e| invalid(format!("--for: {e}")))?;
    let (user, machine) = match a.target.split_once('@') {
        Some((u, m)) => (Some(u.to_owned()), m.to_owned()),
        None => (None, a.target.clone()),
    };
    let ses = Session::new(&a.client)?;
    let all = ses.vms().await?;
    let vm = ses.vm(&all, &machine).await?;
    ensure_grant(&ses, &vm, a.port, duration.as_deref(), a.reason.as_deref()).await?;
    let host = a.host.clone().unwrap_or_else(|| host_of(&vm));
    tokio::task::block_in_place(|| wait_open(&host, a.port, Duration::from_secs(a.wait)))?;
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
    // Replace this process: the terminal and signals belong to ssh from here on.
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(anyhow::anyhow!(
        "cannot run {}: {err} (is openssh-client installed?)",
        a.ssh.display()
    ))
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
        let all = ses.vms().await?;
        let vm = client::resolve(&all, &a.target)?;
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
        let all = ses.vms().await?;
        q.push(("vm", s(&client::resolve(&all, v)?["id"])));
    }
    let v = ses.c.get_query("/api/v1/requests", &q).await?;
    print(ses.json, &v, |v| {
        println!(
            "{:<36} {:<20} {:<22} {:<6} {:<18} {:<8} LEFT",
            "REQUEST", "REQUESTOR", "MACHINE", "PORT", "SOURCE", "STATUS"
        );
        for r in items(v) {
            for vm in r["virtualMachines"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                for p in vm["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                    let status = if p["status"] == "Initiated" {
                        "open".to_owned()
                    } else {
                        s(&p["statusReason"])
                    };
                    let status = if p["status"] == "Initiated" && p["live"] == false {
                        "ended".to_owned()
                    } else {
                        status
                    };
                    println!(
                        "{:<36} {:<20} {:<22} {:<6} {:<18} {:<8} {}",
                        s(&r["id"]),
                        s(&r["requestor"]),
                        short_id(&s(&vm["id"])),
                        s(&p["number"]),
                        s(&p["allowedSourceAddressPrefix"]),
                        status,
                        if p["live"] == true {
                            left_until(&s(&p["endTimeUtc"]))
                        } else {
                            "-".into()
                        }
                    );
                }
            }
        }
    });
    Ok(ExitCode::SUCCESS)
}

// ---- vm show -------------------------------------------------------------------------------

pub async fn vm_show(name: &str, args: &ClientArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(args)?;
    let all = ses.vms().await?;
    let mut vm = ses.vm(&all, name).await?;
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
            format!("OFFLINE since {}", s(&agent["lastSeen"]))
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
        println!(
            "  last access: {} by {}",
            s(&v["lastAccess"]),
            s(&v["lastUser"])
        );
        println!("  live grants:");
        let grants = v["grants"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if grants.is_empty() {
            println!("    none");
        }
        for g in grants {
            println!(
                "    port {} {} from {} for {} ({} left, request {})",
                s(&g["port"]),
                s(&g["protocol"]),
                s(&g["source"]),
                s(&g["requestor"]),
                human_secs(g["secondsLeft"].as_i64().unwrap_or(0)),
                s(&g["request"])
            );
        }
        println!("  NSG rules:");
        for r in v["nsg"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            println!("    {}", crate::cli::nsg_rule_line(r));
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
    /// Only events about this machine.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only events by this principal.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only actions starting with this (e.g. request., policy.create, authorization.denied).
    #[arg(long)]
    pub action: Option<String>,
    /// How far back (e.g. 24h) or a time (2026-01-01T00:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Keep printing new events.
    #[arg(long)]
    pub follow: bool,
    /// Print CSV (the export format; --json prints JSON lines).
    #[arg(long, conflicts_with = "follow")]
    pub csv: bool,
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn audit_show(a: AuditShowArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let mut q = vec![("limit", a.limit.to_string())];
    if let Some(v) = &a.vm {
        let all = ses.vms().await?;
        q.push(("vm", s(&client::resolve(&all, v)?["id"])));
    }
    if let Some(x) = &a.actor {
        q.push(("actor", x.clone()));
    }
    if let Some(x) = &a.action {
        q.push(("action", x.clone()));
    }
    if let Some(since) = &a.since {
        let t = match iso_duration(since) {
            Ok(d) => Timestamp::now()
                .checked_sub(jiff::SignedDuration::from_secs(secs_of(&d)))
                .map_err(|e| invalid(format!("--since: {e}")))?,
            Err(_) => jitgate_core::request::parse_time(since)
                .map_err(|e| invalid(format!("--since: {e}")))?,
        };
        q.push(("since", t.to_string()));
    }
    if a.csv {
        q.push(("format", "csv".to_owned()));
        print!("{}", ses.c.get_text("/api/v1/audit", &q).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut after: Option<u64> = None;
    loop {
        let mut page = q.clone();
        if let Some(seq) = after {
            page.push(("afterSeq", seq.to_string()));
        }
        let v = ses.c.get_query("/api/v1/audit", &page).await?;
        for e in items(&v) {
            after = e["seq"].as_u64().or(after);
            if ses.json {
                println!("{e}");
            } else {
                println!(
                    "{:<6} {:<32} {:<20} {:<22} {:<8} {}",
                    s(&e["seq"]),
                    s(&e["time"]),
                    s(&e["actor"]),
                    s(&e["action"]),
                    s(&e["outcome"]),
                    short_id(&s(&e["target"]))
                );
            }
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
    let v = ses.c.get_query("/api/v1/recommendations", &q).await?;
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
    fn durations() {
        assert_eq!(iso_duration("3h").unwrap(), "PT10800S");
        assert_eq!(iso_duration("1h30m").unwrap(), "PT5400S");
        assert_eq!(iso_duration("1d").unwrap(), "PT86400S");
        assert_eq!(iso_duration("PT3H").unwrap(), "PT3H");
        for bad in ["", "3", "h", "3x", "-1h", "0m", "P", "soon", "PT0S", "1h m"] {
            assert!(iso_duration(bad).is_err(), "{bad}");
        }
        // Regression: these overflowed (a panic in debug builds, a wrapped, possibly
        // negative duration in release).
        for huge in [
            "99999999999999999h",
            "9223372036854775807s1s",
            "999999999999999999999999d",
            "106751991167301d",
            "99999999d",
            "PT99999999999999999H",
        ] {
            let e = iso_duration(huge).unwrap_err();
            assert!(e.contains("too long"), "{huge}: {e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Arbitrary text never panics; whatever is accepted is an ISO 8601 duration
        /// the controller reads as more than zero seconds.
        #[test]
        fn durations_never_panic(text in proptest::prop_oneof![
            proptest::prelude::any::<String>(),
            "[0-9dhmsPTHMSx -]{0,30}",
            "[0-9]{1,30}[dhms]([0-9]{1,30}[dhms]){0,3}",
        ]) {
            if let Ok(iso) = iso_duration(&text) {
                let secs = jitgate_core::duration::parse_iso8601_secs(&iso);
                proptest::prop_assert!(matches!(secs, Ok(n) if n > 0), "{} -> {} -> {:?}", text, iso, secs);
            }
        }

        /// `1d2h3m4s` and its parts give exactly their seconds, and round-trip.
        #[test]
        fn valid_durations_round_trip(
            parts in proptest::array::uniform4(proptest::option::of(0i64..100_000)),
        ) {
            let text: String = parts
                .iter()
                .zip(["d", "h", "m", "s"])
                .filter_map(|(n, u)| n.map(|n| format!("{n}{u}")))
                .collect();
            let want: i64 = parts
                .iter()
                .zip([86_400, 3_600, 60, 1])
                .map(|(n, u)| n.unwrap_or(0) * u)
                .sum();
            match iso_duration(&text) {
                Ok(iso) => {
                    proptest::prop_assert_eq!(&iso, &format!("PT{want}S"));
                    proptest::prop_assert_eq!(jitgate_core::duration::parse_iso8601_secs(&iso), Ok(want));
                    proptest::prop_assert_eq!(iso_duration(&iso), Ok(iso.clone()));
                }
                Err(_) => proptest::prop_assert!(want == 0, "{} refused", text),
            }
        }
    }

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
