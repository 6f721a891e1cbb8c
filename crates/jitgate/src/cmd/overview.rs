//! `jitgate whoami` and `jitgate status`: who the controller takes you for, and how the
//! controller is doing, each from the API a client already has (whoami, health, the
//! machine list, audit verify). Nothing here changes anything.

use std::process::ExitCode;

use clap::Args;
use jitgate_proto::api;
use serde::Serialize;
use serde_json::Value;

use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::print;
use crate::usage::{EXIT_AUDIT_BROKEN, EXIT_AUTH, has_code};

#[derive(Args)]
pub struct WhoamiArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn whoami(a: WhoamiArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let who = ses.whoami().await?;
    // The controller's answer, and which controller answered.
    let mut out = who.json.clone();
    if let Value::Object(m) = &mut out {
        m.insert("controller".to_owned(), ses.c.base.clone().into());
    }
    print(ses.json, &out, || {
        println!("principal:    {}", who.principal);
        if let Some(n) = &who.name {
            println!("name:         {n}");
        }
        if !who.groups.is_empty() {
            println!("groups:       {}", who.groups.join(", "));
        }
        let kind = match who.credential.as_str() {
            "signIn" => "signed in with the identity provider",
            "providerToken" => "a token of the identity provider",
            "agent" => "an agent's",
            "automation" => "a token made by an administrator (automation)",
            other => other,
        };
        let expiry = who
            .expires_at
            .as_ref()
            .map(|e| format!(", expires at {e}"))
            .unwrap_or_default();
        println!("credential:   {} ({kind}{expiry})", who.token_id);
        println!("subscription: {}", who.subscription);
        println!(
            "your address: {} (as the controller sees it; requests from `my-ip` open ports to it)",
            who.caller_ip
        );
        println!("controller:   {}", ses.c.base);
        if who.roles.is_empty() {
            println!("roles:        none (ask an Owner for one: `jitgate role assign`)");
        } else {
            println!("roles:");
            for r in &who.roles {
                println!("  {} at {}", r.role, r.scope);
            }
        }
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What `status --json` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    controller: String,
    reachable: bool,
    version: String,
    tls: bool,
    principal: String,
    machines: usize,
    agents: Agents,
    live_grants: u64,
    audit: Audit,
}

#[derive(Serialize, Default)]
struct Agents {
    online: u64,
    offline: u64,
    none: u64,
}

/// The audit chain, verified now, or why it is not shown.
#[derive(Serialize)]
#[serde(untagged)]
enum Audit {
    #[serde(rename_all = "camelCase")]
    Verified {
        ok: bool,
        events: u64,
        anchored_at: Option<u64>,
        checkpoints: usize,
        problems: Vec<String>,
    },
    /// The caller's roles do not include reading the audit log (`ok` is null).
    Hidden { ok: Option<bool>, visible: bool },
}

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let ses = Session::new(&a.client)?;
    let c = &ses.c;
    // Reachable at all (health needs no token), and which version.
    let health = c.get::<api::Health>("/api/v1/health", &[]).await?.data;
    let who = ses.whoami().await?.data;
    let vms = c
        .get_all_pages::<api::VmPage>("/api/v1/vms", &[("limit", "1000".to_owned())])
        .await?
        .data
        .value;
    let mut agents = Agents::default();
    let mut grants = 0u64;
    for vm in &vms {
        match (vm.agent.enrolled, vm.agent.online) {
            (true, true) => agents.online += 1,
            (true, false) => agents.offline += 1,
            (false, _) => agents.none += 1,
        }
        grants += vm.live_grants;
    }
    // The audit chain, verified now, if this principal may read the audit log.
    let audit = match c.get::<api::AuditVerify>("/api/v1/audit/verify", &[]).await {
        Ok(v) => Audit::Verified {
            ok: v.data.ok,
            events: v.data.events,
            anchored_at: v.data.anchored_at,
            checkpoints: v.data.checkpoints,
            problems: v.data.problems,
        },
        Err(e) if has_code(&e, EXIT_AUTH) => Audit::Hidden {
            ok: None,
            visible: false,
        },
        Err(e) => return Err(e),
    };
    let out = Status {
        controller: c.base.clone(),
        reachable: true,
        version: health.version,
        tls: c.base.starts_with("https://"),
        principal: who.principal,
        machines: vms.len(),
        agents,
        live_grants: grants,
        audit,
    };
    print(ses.json, &out, || {
        println!(
            "controller:  {} reachable, version {}",
            out.controller, out.version
        );
        println!(
            "connection:  {}",
            if out.tls {
                "TLS"
            } else {
                "plain HTTP, not encrypted (fine on loopback only)"
            }
        );
        println!("you:         {}", out.principal);
        let ag = &out.agents;
        println!(
            "machines:    {} you can see; agents {} online, {} offline, {} without an agent",
            out.machines, ag.online, ag.offline, ag.none
        );
        println!("live grants: {}", out.live_grants);
        match &out.audit {
            Audit::Verified {
                ok: true,
                events,
                anchored_at,
                ..
            } => println!(
                "audit chain: intact, {events} events{}",
                match anchored_at {
                    Some(seq) => format!(", anchored by a signed checkpoint at event {seq}"),
                    None => ", no signed checkpoint yet".to_owned(),
                }
            ),
            Audit::Verified {
                ok: false,
                events,
                problems,
                ..
            } => {
                println!("audit chain: BROKEN ({events} events read); see `jitgate audit verify`");
                for p in problems {
                    println!("  - {p}");
                }
            }
            Audit::Hidden { .. } => {
                println!("audit chain: not shown (your roles do not include reading the audit log)")
            }
        }
    });
    Ok(if matches!(out.audit, Audit::Verified { ok: false, .. }) {
        ExitCode::from(EXIT_AUDIT_BROKEN)
    } else {
        ExitCode::SUCCESS
    })
}
