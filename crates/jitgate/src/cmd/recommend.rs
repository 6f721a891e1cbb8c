//! `jitgate recommendations`: which machines still expose management ports.

use std::process::ExitCode;

use clap::Args;
use jitgate_proto::api;

use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::print;
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
    let mut q = vec![("limit", "1000".to_owned())];
    if let Some(rg) = &a.resource_group {
        q.push(("resourceGroup", rg.clone()));
    }
    if let Some(v) = &a.verdict {
        q.push(("verdict", v.clone()));
    }
    let list = ses
        .c
        .get_all_pages::<api::RecommendationPage>("/api/v1/recommendations", &q)
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
    print(ses.json, &list.json, || {
        let summary = list.summary.as_ref();
        for (verdict, title, count) in [
            (
                "Unhealthy",
                "Not configured (Unhealthy): management ports open to everyone",
                summary.map(|s| s.unhealthy),
            ),
            (
                "Healthy",
                "Configured (Healthy)",
                summary.map(|s| s.healthy),
            ),
            (
                "NotApplicable",
                "Unsupported (Not applicable)",
                summary.map(|s| s.not_applicable),
            ),
        ] {
            let count = count.map_or_else(|| "-".to_owned(), |n| n.to_string());
            println!("{title}: {count}");
            for r in list.value.iter().filter(|r| r.verdict == verdict) {
                println!(
                    "  {:<28} {}",
                    format!("{}/{}", r.resource_group, r.name),
                    r.reason
                );
            }
        }
        if summary.is_some_and(|s| s.unhealthy > 0) {
            println!("Protect them: jitgate enable --recommended");
        }
    });
    Ok(ExitCode::SUCCESS)
}
