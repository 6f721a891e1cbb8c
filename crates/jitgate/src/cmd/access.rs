//! `jitgate request`, `revoke` and `requests`: ask for access through the Azure
//! `initiate` call, end it early, list requests.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use jitgate_core::net::SourcePrefix;
use jitgate_proto::api;
use serde::Serialize;
use serde_json::Value;

use crate::azure::{self, API};
use crate::cli::ClientArgs;
use crate::client::Reply;
use crate::cmd::policy::check_ports;
use crate::cmd::{Session, invalid};
use crate::output::table::Table;
use crate::output::{human, print, short_id};
use crate::usage::{EXIT_NOT_FOUND, Exit, FlagMap, bad_flag, name_flags};

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
    /// An emergency that cannot wait for approvals (the JIT Break-glass role): the
    /// ports open now, --reason is required, at most the controller's break-glass
    /// maximum; every approver is told, and it stays flagged until one reviews it.
    #[arg(long, requires = "reason")]
    pub break_glass: bool,
    /// When an approval rule makes the request wait: wait for the decision and say who
    /// decided.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The protected ports of a VM and their maximum durations, from its policy.
pub async fn protected_ports(
    ses: &Session,
    vm: &api::VmDetail,
) -> anyhow::Result<(String, Vec<(u16, String)>)> {
    let name = short_id(&vm.vm.id);
    let path = vm.policy.clone().ok_or_else(|| {
        invalid(format!("{name} is not protected by JIT; an administrator can enable it with `jitgate enable {name}`"))
    })?;
    let policy = azure::get_policy(&ses.c, &path)
        .await?
        .ok_or_else(|| Exit::err(EXIT_NOT_FOUND, format!("the policy of {name} is gone")))?;
    let entry = policy
        .properties
        .virtual_machines
        .into_iter()
        .find(|e| e.id.eq_ignore_ascii_case(&vm.vm.id))
        .ok_or_else(|| {
            Exit::err(
                EXIT_NOT_FOUND,
                format!("{name} is not in its policy any more"),
            )
        })?;
    let ports = entry
        .ports
        .into_iter()
        .map(|p| (p.number, p.max_request_access_duration))
        .collect();
    Ok((path, ports))
}

/// Ports of one machine to ask for, under the policy at `path`.
pub struct Wanted {
    pub vm: String,
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

/// One initiate: the request's id (from the `x-jitgate-request-id` header) and what
/// was granted.
pub struct Initiation {
    pub request: String,
    pub granted: Reply<azure::Initiated>,
}

/// What `request` prints with `--json`: each request's id and the controller's answer.
#[derive(Serialize)]
struct Requested<'a> {
    requests: Vec<RequestedOne<'a>>,
}

#[derive(Serialize)]
struct RequestedOne<'a> {
    request: &'a str,
    granted: &'a Value,
}

/// Asks for `wanted`, one initiate per policy.
pub async fn initiate(
    ses: &Session,
    wanted: &[Wanted],
    duration: Option<&str>,
    from: &str,
    reason: Option<&str>,
    break_glass: bool,
) -> anyhow::Result<Vec<Initiation>> {
    let mut by_policy: BTreeMap<&str, Vec<&Wanted>> = BTreeMap::new();
    for w in wanted {
        by_policy.entry(&w.path).or_default().push(w);
    }
    let mut out = Vec::new();
    for (path, ws) in by_policy {
        let body = azure::Initiate {
            virtual_machines: ws
                .iter()
                .map(|w| azure::InitiateVm {
                    id: w.vm.clone(),
                    ports: w
                        .ports
                        .iter()
                        .map(|(n, max)| azure::InitiatePort {
                            number: *n,
                            duration: match duration {
                                Some(d) => d.to_owned(),
                                None => format!("PT{}S", human::iso_secs(max).clamp(1, 3600)),
                            },
                            allowed_source_address_prefix: (from != "my-ip")
                                .then(|| from.to_owned()),
                        })
                        .collect(),
                })
                .collect(),
            justification: reason.map(str::to_owned),
        };
        let headers: &[(&str, &str)] = if break_glass {
            &[("x-jitgate-break-glass", "true")]
        } else {
            &[]
        };
        let granted = ses
            .c
            .post_with::<_, azure::Initiated>(&format!("{path}/initiate?{API}"), &body, headers)
            .await
            .map_err(|e| name_flags(e, INITIATE_FLAGS))?;
        let request = granted
            .headers
            .get("x-jitgate-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        out.push(Initiation { request, granted });
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
        let (path, protected) = protected_ports(&ses, &vm).await?;
        let short = short_id(&vm.vm.id);
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
        wanted.push(Wanted {
            vm: vm.data.vm.id,
            path,
            ports,
        });
    }
    let results = initiate(
        &ses,
        &wanted,
        duration.as_deref(),
        &a.from,
        a.reason.as_deref(),
        a.break_glass,
    )
    .await?;
    let out = Requested {
        requests: results
            .iter()
            .map(|r| RequestedOne {
                request: &r.request,
                granted: &r.granted.json,
            })
            .collect(),
    };
    print(ses.json, &out, || print_granted(&results));
    if a.wait {
        for r in &results {
            let pending = r
                .granted
                .virtual_machines
                .iter()
                .any(|v| v.ports.iter().any(|p| p.status == "Pending"));
            if pending {
                let decided = crate::cmd::approvals::wait_decision(&ses, &r.request).await?;
                if !ses.json {
                    for vm in &decided.virtual_machines {
                        for p in vm.ports.iter().filter(|p| p.live) {
                            println!(
                                "open {} port {} from {} until {}",
                                short_id(&vm.id),
                                p.number,
                                p.allowed_source_address_prefix,
                                human::time(&p.end_time_utc)
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_granted(results: &[Initiation]) {
    for r in results {
        for vm in &r.granted.virtual_machines {
            for p in &vm.ports {
                if p.status == "Pending" {
                    println!(
                        "waiting for approval: {} port {} from {}, request {} (see it with `jitgate requests --mine`; withdraw it with `jitgate cancel {}`)",
                        short_id(&vm.id),
                        p.number,
                        p.allowed_source_address_prefix,
                        r.request,
                        r.request
                    );
                    continue;
                }
                println!(
                    "granted {} port {} from {} until {}, request {}",
                    short_id(&vm.id),
                    p.number,
                    p.allowed_source_address_prefix,
                    human::time(&p.end_time_utc),
                    r.request
                );
            }
        }
        println!("end it sooner with: jitgate revoke {}", r.request);
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

/// What `revoke` prints with `--json`.
#[derive(Serialize)]
struct Revoked {
    revoked: Vec<api::RevokedPort>,
}

/// Revokes request `id` (all its live ports, or those on `vm`).
pub async fn revoke_request(
    ses: &Session,
    id: &str,
    vm: Option<&str>,
) -> anyhow::Result<api::RevokeResult> {
    let body = api::RevokeSelection {
        vm: vm.map(str::to_owned),
        port: None,
    };
    Ok(ses
        .c
        .post::<_, api::RevokeResult>(&format!("/api/v1/requests/{id}/revoke"), &body)
        .await?
        .data)
}

pub async fn revoke(a: RevokeArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let mut revoked = Vec::new();
    if jitgate_core::request::RequestId::parse(&a.target).is_ok() {
        revoked.extend(revoke_request(&ses, &a.target, None).await?.revoked);
    } else {
        let vm = ses.find_vm(&a.target).await?;
        let id = vm.vm.id;
        let mut q = vec![("active", "true".to_owned()), ("vm", id.clone())];
        if !a.all {
            q.push(("mine", "true".to_owned()));
        }
        let list = ses
            .c
            .get_all_pages::<api::RequestPage>("/api/v1/requests", &q)
            .await?;
        // The list holds requests with a live port anywhere that also name this
        // machine; revoke only those still live on it (revoking one whose port here
        // already ended would fail and stop before the others).
        let live_here = |r: &&api::Request| {
            r.virtual_machines
                .iter()
                .any(|v| v.id.eq_ignore_ascii_case(&id) && v.ports.iter().any(|p| p.live))
        };
        for r in list.value.iter().filter(live_here) {
            revoked.extend(revoke_request(&ses, &r.id, Some(&id)).await?.revoked);
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
    let out = Revoked { revoked };
    print(ses.json, &out, || {
        for p in &out.revoked {
            println!("revoked {} port {}", short_id(&p.vm), p.port);
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
        q.push(("vm", ses.find_vm(v).await?.vm.id));
    }
    // Pages until --limit requests (a page may hold fewer than asked for).
    let list = ses
        .c
        .get_pages::<api::RequestPage>("/api/v1/requests", &q, Some(a.limit))
        .await
        .map_err(|e| name_flags(e, &[("limit", "--limit")]))?;
    print(ses.json, &list.json, || {
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
        for r in &list.value {
            for vm in &r.virtual_machines {
                for p in &vm.ports {
                    let (status, reason) = port_status(p);
                    t.row(vec![
                        r.id.clone(),
                        r.requestor.clone(),
                        short_id(&vm.id),
                        p.number.to_string(),
                        p.allowed_source_address_prefix.clone(),
                        status.to_owned(),
                        reason.to_owned(),
                        human::time(&p.end_time_utc),
                    ]);
                }
            }
        }
        t.print();
    });
    Ok(ExitCode::SUCCESS)
}

/// A requested port's STATUS (Active or Ended) and, once ended, why.
fn port_status(p: &api::RequestPort) -> (&'static str, &'static str) {
    if p.status == "Pending" {
        return ("Pending", "Waiting for approval");
    }
    if p.status == "Denied" {
        return ("Ended", "Denied");
    }
    if p.status == "Initiated" {
        if !p.live {
            ("Ended", "Expired")
        } else {
            ("Active", "")
        }
    } else {
        let reason = match p.status_reason.as_str() {
            "Expired" => "Expired",
            "UserRequested" => "Revoked",
            "NewerRequestInitiated" => "Superseded by a newer request",
            "PolicyChanged" => "Policy changed",
            "ApprovalExpired" => "Not approved in time",
            "Cancelled" => "Cancelled",
            _ => "Ended",
        };
        ("Ended", reason)
    }
}
