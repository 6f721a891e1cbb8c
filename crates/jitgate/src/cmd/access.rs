//! `jitgate request`, `revoke` and `requests`: ask for access through the Azure
//! `initiate` call, end it early, list requests.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use jitgate_core::net::SourcePrefix;
use serde_json::{Value, json};

use crate::cli::ClientArgs;
use crate::client::EXIT_NOT_FOUND;
use crate::client::{Client, Exit};
use crate::cmd::policy::check_ports;
use crate::cmd::{API, Session, get_policy, invalid, policy_path_of};
use crate::output::short_id;
use crate::output::table::Table;
use crate::output::{human, items, print, s};
use crate::usage::{FlagMap, bad_flag, name_flags};

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
pub async fn protected_ports(
    c: &Client,
    vm: &Value,
) -> anyhow::Result<(String, Vec<(u16, String)>)> {
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

pub struct Wanted {
    pub vm: Value,
    pub path: String,
    pub ports: Vec<(u16, String)>,
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
pub fn for_duration(text: Option<&str>) -> anyhow::Result<Option<String>> {
    text.map(|t| human::to_iso(t).map_err(|e| bad_flag("--for", e)))
        .transpose()
}

pub async fn initiate(
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
