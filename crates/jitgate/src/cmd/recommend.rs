//! `jitgate recommendations`: which machines still expose management ports.

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::{items, print, s};
use crate::usage::name_flags;

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
