//! `jitgate approvals`, `approve`, `deny`, `cancel`: the requests waiting for a
//! decision, and the decisions.

use std::process::ExitCode;

use clap::Args;
use jitgate_proto::api;

use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::human;
use crate::output::print;
use crate::output::table::Table;
use crate::usage::usage;

#[derive(Args)]
pub struct ApprovalsArgs {
    /// Every pending request you can see, not only those waiting for your decision.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The machines and ports of a request, short.
fn ports(r: &api::Request) -> String {
    r.virtual_machines
        .iter()
        .map(|v| {
            let ports: Vec<String> = v.ports.iter().map(|p| p.number.to_string()).collect();
            format!("{}:{}", crate::output::short_id(&v.id), ports.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn approvals(a: ApprovalsArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let mut q = vec![("state", "Pending".to_owned())];
    if !a.all {
        q.push(("reviewable", "true".to_owned()));
    }
    let list = ses
        .c
        .get_all_pages::<api::RequestPage>("/api/v1/requests", &q)
        .await?;
    print(ses.json, &list.json, || {
        if list.value.is_empty() {
            println!("no request waits for your decision");
            return;
        }
        let mut t = Table::new(&[
            "REQUEST",
            "REQUESTOR",
            "MACHINES:PORTS",
            "APPROVALS",
            "WAITS UNTIL",
            "JUSTIFICATION",
        ]);
        for r in &list.value {
            let (got, needed, until) = match &r.approval {
                Some(ap) => (
                    ap.decisions
                        .iter()
                        .filter(|d| d.decision == "approve")
                        .count(),
                    ap.min_approvals,
                    human::time(&ap.pending_until),
                ),
                None => (0, 0, String::new()),
            };
            t.row(vec![
                r.id.clone(),
                r.requestor.clone(),
                ports(r),
                format!("{got} of {needed}"),
                until,
                r.justification.clone().unwrap_or_default(),
            ]);
        }
        t.print();
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ApproveArgs {
    /// The request's id (`jitgate approvals` lists them).
    pub id: String,
    /// Why (recorded, and shown to the requestor).
    #[arg(long)]
    pub reason: Option<String>,
    /// A shorter time than asked for, counted from the approval, e.g. 30m.
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// A narrower source than asked for, e.g. 203.0.113.7.
    #[arg(long)]
    pub source: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn said(d: &api::DecisionOut) -> String {
    match d.outcome.as_str() {
        "approved" => "approved: its ports are open now".to_owned(),
        "denied" => "denied".to_owned(),
        _ => format!(
            "your approval is counted ({} of {} needed)",
            d.approvals, d.needed
        ),
    }
}

pub async fn approve(a: ApproveArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let duration = match &a.duration {
        None => None,
        Some(t) => Some(format!(
            "PT{}S",
            human::parse_secs(t).map_err(|e| usage(format!("--for: {e}")))?
        )),
    };
    let body = api::ApproveIn {
        reason: a.reason.clone(),
        duration,
        source_prefix: a.source.clone(),
    };
    let d = ses
        .c
        .post::<_, api::DecisionOut>(&format!("/api/v1/requests/{}/approve", a.id), &body)
        .await
        .map_err(|e| {
            crate::usage::name_flags(e, &[("duration", "--for"), ("sourcePrefix", "--source")])
        })?;
    print(ses.json, &d.json, || {
        println!("request {} {}", a.id, said(&d));
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct DenyArgs {
    /// The request's id.
    pub id: String,
    /// Why (required: the requestor is told).
    #[arg(long)]
    pub reason: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn deny(a: DenyArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let body = api::DenyIn {
        reason: Some(a.reason.clone()),
    };
    let d = ses
        .c
        .post::<_, api::DecisionOut>(&format!("/api/v1/requests/{}/deny", a.id), &body)
        .await?;
    print(ses.json, &d.json, || {
        println!("request {} {}", a.id, said(&d));
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct CancelArgs {
    /// The id of your pending request.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn cancel(a: CancelArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let r = ses
        .c
        .post::<_, api::Request>(&format!("/api/v1/requests/{}/cancel", a.id), &())
        .await?;
    print(ses.json, &r.json, || {
        println!("request {} cancelled", a.id);
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ReviewArgs {
    /// The id of a break-glass request.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Marks a break-glass request reviewed.
pub async fn review(a: ReviewArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let r = ses
        .c
        .post::<_, api::Request>(&format!("/api/v1/requests/{}/review", a.id), &())
        .await?;
    print(ses.json, &r.json, || {
        println!("break-glass request {} marked reviewed", a.id);
    });
    Ok(ExitCode::SUCCESS)
}

/// Waits until a pending request is decided (asking every 2 seconds, a spinner on a
/// terminal), says who decided, and returns the request then. An approved request is
/// returned; a denied, expired or cancelled one is an error saying so.
pub async fn wait_decision(ses: &Session, id: &str) -> anyhow::Result<api::Request> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let spinner = ['|', '/', '-', '\\'];
    let mut i = 0;
    let r = loop {
        let r = ses
            .c
            .get::<api::Request>(&format!("/api/v1/requests/{id}"), &[])
            .await?
            .data;
        if r.state != "Pending" {
            break r;
        }
        if tty {
            let (got, needed) = r.approval.as_ref().map_or((0, 0), |a| {
                (
                    a.decisions
                        .iter()
                        .filter(|d| d.decision == "approve")
                        .count(),
                    a.min_approvals,
                )
            });
            eprint!(
                "\r\x1b[K{} waiting for approval of request {id} ({got} of {needed})",
                spinner[i % spinner.len()]
            );
            i += 1;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    if tty {
        eprint!("\r\x1b[K");
    }
    let decisions = r
        .approval
        .as_ref()
        .map(|a| a.decisions.clone())
        .unwrap_or_default();
    let by = |approve: bool| {
        decisions
            .iter()
            .filter(|d| (d.decision == "approve") == approve)
            .map(|d| match &d.reason {
                Some(why) => format!("{} ({why})", d.principal),
                None => d.principal.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match r.state.as_str() {
        "Active" | "Ended" | "Expired" if !by(true).is_empty() => {
            eprintln!("request {id} approved by {}", by(true));
            Ok(r)
        }
        "Denied" => Err(crate::usage::Exit::err(
            crate::usage::EXIT_AUTH,
            format!("request {id} was denied by {}", by(false)),
        )),
        "Cancelled" => Err(crate::usage::Exit::err(
            1,
            format!("request {id} was cancelled"),
        )),
        _ => Err(crate::usage::Exit::err(
            crate::usage::EXIT_TIMEOUT,
            format!("request {id} was not approved in time (it is {})", r.state),
        )),
    }
}
