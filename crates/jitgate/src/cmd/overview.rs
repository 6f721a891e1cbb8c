//! `jitgate whoami` and `jitgate status`: who the controller takes you for, and how the
//! controller is doing, each from the API a client already has (whoami, health, the
//! machine list, audit verify). Nothing here changes anything.

use std::process::ExitCode;

use clap::Args;
use serde_json::{Value, json};

use crate::cli::ClientArgs;
use crate::client::{Client, EXIT_AUTH, Exit};
use crate::output::{items, print, s};
use crate::usage::EXIT_AUDIT_BROKEN;

#[derive(Args)]
pub struct WhoamiArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn whoami(a: WhoamiArgs) -> anyhow::Result<ExitCode> {
    let c = Client::new(&a.client)?;
    let mut who = c.get("/api/v1/whoami").await?;
    who["controller"] = json!(c.base);
    print(a.client.json, &who, |v| {
        println!("principal:    {}", s(&v["principal"]));
        println!("token:        {}", s(&v["tokenId"]));
        println!("subscription: {}", s(&v["subscription"]));
        println!(
            "your address: {} (as the controller sees it; requests from `my-ip` open ports to it)",
            s(&v["callerIp"])
        );
        println!("controller:   {}", s(&v["controller"]));
        let roles = v["roles"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if roles.is_empty() {
            println!("roles:        none (ask an Owner for one: `jitgate role assign`)");
        } else {
            println!("roles:");
            for r in roles {
                println!("  {} at {}", s(&r["role"]), s(&r["scope"]));
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

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let c = Client::new(&a.client)?;
    // Reachable at all (health needs no token), and which version.
    let health = c.get("/api/v1/health").await?;
    let who = c.get("/api/v1/whoami").await?;
    let vms = c.get_all_pages("/api/v1/vms", &[]).await?;
    let mut agents = json!({"online": 0, "offline": 0, "none": 0});
    let mut grants = 0u64;
    for vm in items(&vms) {
        let key = match (&vm["agent"]["enrolled"], &vm["agent"]["online"]) {
            (Value::Bool(true), Value::Bool(true)) => "online",
            (Value::Bool(true), _) => "offline",
            _ => "none",
        };
        agents[key] = json!(agents[key].as_u64().unwrap_or(0) + 1);
        grants += vm["liveGrants"].as_u64().unwrap_or(0);
    }
    // The audit chain, verified now, if this principal may read the audit log.
    let audit = match c.get("/api/v1/audit/verify").await {
        Ok(v) => json!({
            "ok": v["ok"],
            "events": v["events"],
            "anchoredAt": v["anchoredAt"],
            "checkpoints": v["checkpoints"],
            "problems": v["problems"],
        }),
        Err(e)
            if e.downcast_ref::<Exit>()
                .is_some_and(|x| x.code == EXIT_AUTH) =>
        {
            json!({"ok": null, "visible": false})
        }
        Err(e) => return Err(e),
    };
    let tls = c.base.starts_with("https://");
    let out = json!({
        "controller": c.base,
        "reachable": true,
        "version": health["version"],
        "tls": tls,
        "principal": who["principal"],
        "machines": items(&vms).len(),
        "agents": agents,
        "liveGrants": grants,
        "audit": audit,
    });
    print(a.client.json, &out, |v| {
        println!(
            "controller:  {} reachable, version {}",
            s(&v["controller"]),
            s(&v["version"])
        );
        println!(
            "connection:  {}",
            if v["tls"] == true {
                "TLS"
            } else {
                "plain HTTP, not encrypted (fine on loopback only)"
            }
        );
        println!("you:         {}", s(&v["principal"]));
        let ag = &v["agents"];
        println!(
            "machines:    {} you can see; agents {} online, {} offline, {} without an agent",
            s(&v["machines"]),
            s(&ag["online"]),
            s(&ag["offline"]),
            s(&ag["none"])
        );
        println!("live grants: {}", s(&v["liveGrants"]));
        let au = &v["audit"];
        match au["ok"].as_bool() {
            Some(true) => println!(
                "audit chain: intact, {} events{}",
                s(&au["events"]),
                match au["anchoredAt"].as_u64() {
                    Some(seq) => format!(", anchored by a signed checkpoint at event {seq}"),
                    None => ", no signed checkpoint yet".to_owned(),
                }
            ),
            Some(false) => {
                println!(
                    "audit chain: BROKEN ({} events read); see `jitgate audit verify`",
                    s(&au["events"])
                );
                for p in au["problems"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                    println!("  - {}", s(p));
                }
            }
            None => {
                println!("audit chain: not shown (your roles do not include reading the audit log)")
            }
        }
    });
    Ok(if audit["ok"] == false {
        ExitCode::from(EXIT_AUDIT_BROKEN)
    } else {
        ExitCode::SUCCESS
    })
}
