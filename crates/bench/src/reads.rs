//! `jitgate-bench reads`: how reads scale with the number of VMs. Starts a real
//! controller on a fresh SQLite directory, registers VMs and policies through the API
//! (as `bench initiate` does) plus some live grants, then times, one call at a time
//! over loopback HTTP (so a call's time is the server's plus a loopback round trip):
//! one VM's view by name, the lookup by name the CLI uses, pages of 100 VMs, the
//! recommendations summary, and `jitgate vm show` as a person runs it (a process per
//! call). One VM in 20 (at most 2,000) gets an enrolled agent that reports what
//! listens, half of them a management port no policy protects, so verdicts differ.
//! Prints percentiles and the controller's peak and final memory.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use serde_json::{Value, json};

use super::{BENCH_TOKEN, peak_rss_kib, percentiles};

fn hist() -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    Ok(hdrhistogram::Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?)
}

/// A small deterministic generator of VM numbers.
async fn timed_get(
    http: &reqwest::Client,
    url: &str,
    h: &mut hdrhistogram::Histogram<u64>,
) -> anyhow::Result<Value> {
    let t = Instant::now();
    let r = http.get(url).bearer_auth(BENCH_TOKEN).send().await?;
    let status = r.status();
    let body = r.bytes().await?;
    h.record(t.elapsed().as_micros().max(1) as u64)?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// One dashboard page, signed in with the bench's token in the session cookie.
async fn timed_page(
    http: &reqwest::Client,
    url: &str,
    h: &mut hdrhistogram::Histogram<u64>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let r = http
        .get(url)
        .header("cookie", format!("jitgate_session={BENCH_TOKEN}"))
        .send()
        .await?;
    let status = r.status();
    let body = r.text().await?;
    h.record(t.elapsed().as_micros().max(1) as u64)?;
    if !status.is_success() || !body.trim_end().ends_with("</html>") {
        bail!("GET {url}: {status}: {}", &body[..body.len().min(500)]);
    }
    Ok(())
}

pub async fn run(vms: usize, rounds: usize, dir: &Path) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().build()?;
    let port = super::lab::free_port([127, 0, 0, 1].into())?;
    let (child, base, sub) =
        super::lab::controller(SocketAddr::from(([127, 0, 0, 1], port)), dir, &http).await?;
    let pid = child.0.id();
    let setup = Instant::now();
    let groups = super::initiate::populate(&http, &base, &sub, vms, 8).await?;
    // Some live grants, so views count real ones.
    let mut walk = super::lab::Walk(0x9E37_79B9_7F4A_7C15);
    for _ in 0..200.min(vms) {
        let vm = walk.next(vms);
        super::initiate::initiate_one(&http, &base, &sub, vm, "10.1.2.3").await?;
    }
    let agents = report_agents(&http, &base, vms).await?;
    let setup_secs = setup.elapsed().as_secs_f64();
    let rss_after_setup = peak_rss_kib(pid);

    // One VM's full view, by its resource group and name.
    let mut view = hist()?;
    for _ in 0..rounds {
        let vm = walk.next(vms);
        timed_get(
            &http,
            &format!("{base}/api/v1/vms/rg-{}/vm-{vm}", vm / 100),
            &mut view,
        )
        .await?;
    }
    // The lookup by name the CLI makes (any resource group).
    let mut by_name = hist()?;
    for _ in 0..rounds {
        let vm = walk.next(vms);
        let v = timed_get(
            &http,
            &format!("{base}/api/v1/vms?name=vm-{vm}&limit=50"),
            &mut by_name,
        )
        .await?;
        if v["value"].as_array().map(Vec::len) != Some(1) {
            bail!("vm-{vm} not found by name: {v}");
        }
    }
    // Pages of 100, following the continuation tokens from the start.
    let mut pages = hist()?;
    let mut next: Option<String> = None;
    let mut listed = 0usize;
    for _ in 0..rounds {
        let url = match &next {
            Some(t) => format!("{base}/api/v1/vms?limit=100&continuationToken={t}"),
            None => format!("{base}/api/v1/vms?limit=100"),
        };
        let v = timed_get(&http, &url, &mut pages).await?;
        listed += v["value"].as_array().map(Vec::len).unwrap_or(0);
        next = v["continuationToken"].as_str().map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    // The recommendations summary alone (a first page of one VM), then with the
    // default first page of 1,000.
    let mut summary = hist()?;
    let mut counted = Value::Null;
    for _ in 0..rounds.clamp(1, 20) {
        counted = timed_get(
            &http,
            &format!("{base}/api/v1/recommendations?limit=1"),
            &mut summary,
        )
        .await?["summary"]
            .clone();
        let total: u64 = ["Healthy", "Unhealthy", "NotApplicable"]
            .iter()
            .map(|v| counted[v].as_u64().unwrap_or(0))
            .sum();
        if total != vms as u64 {
            bail!("the summary counts {total} VMs of {vms}: {counted}");
        }
    }
    let mut recs = hist()?;
    for _ in 0..rounds.clamp(1, 10) {
        timed_get(&http, &format!("{base}/api/v1/recommendations"), &mut recs).await?;
    }
    // The dashboard's pages, as a signed-in browser loads them (the session cookie
    // holds the token): every tab reads every VM the person may see.
    let mut pages_ui: Vec<(&str, hdrhistogram::Histogram<u64>)> = Vec::new();
    for (label, path) in [
        ("dashboard Configured tab", "/".to_owned()),
        (
            "dashboard Not configured tab",
            "/?tab=not-configured".to_owned(),
        ),
        ("dashboard Unsupported tab", "/?tab=unsupported".to_owned()),
        (
            "dashboard Requests tab (all)",
            "/?tab=requests&view=all".to_owned(),
        ),
        ("dashboard VM page", "/ui/vms/rg-0/vm-20".to_owned()),
    ] {
        let mut h = hist()?;
        for _ in 0..rounds.clamp(1, 20) {
            timed_page(&http, &format!("{base}{path}"), &mut h).await?;
        }
        pages_ui.push((label, h));
    }
    // `jitgate vm show` as a person runs it: a process per call.
    let exe = super::lab::jitgate_exe()?;
    let mut show = hist()?;
    for _ in 0..rounds.clamp(1, 20) {
        let vm = walk.next(vms);
        let t = Instant::now();
        let out = tokio::process::Command::new(&exe)
            .args(["vm", "show", &format!("vm-{vm}")])
            .env("JITGATE_URL", &base)
            .env("JITGATE_TOKEN", BENCH_TOKEN)
            .env("JITGATE_CONFIG_DIR", dir.join("cli"))
            .output()
            .await?;
        show.record(t.elapsed().as_micros().max(1) as u64)?;
        if !out.status.success() {
            bail!(
                "jitgate vm show vm-{vm}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let rss = peak_rss_kib(pid);
    let rss_now = super::lab::rss_kib(pid);
    println!("jitgate-bench reads");
    println!(
        "  setup:           {vms} VMs in {groups} policies, 200 live grants, {agents} agents reporting, through the API in {setup_secs:.1} s"
    );
    println!("  one VM's view:   {}", percentiles(&view));
    println!("  VM by name:      {}", percentiles(&by_name));
    println!(
        "  page of 100 VMs: {} ({listed} VMs listed)",
        percentiles(&pages)
    );
    println!(
        "  recommendations summary: {} (first page of 1 VM; {counted})",
        percentiles(&summary)
    );
    println!(
        "  recommendations: {} (summary and first page of 1,000)",
        percentiles(&recs)
    );
    println!(
        "  jitgate vm show: {} (a process per call)",
        percentiles(&show)
    );
    for (label, h) in &pages_ui {
        println!("  {label}: {}", percentiles(h));
    }
    println!(
        "  controller peak RSS: {} MiB after setup, {} MiB at the end; RSS at the end {} MiB",
        rss_after_setup.map_or("?".into(), |k| (k / 1024).to_string()),
        rss.map_or("?".into(), |k| (k / 1024).to_string()),
        rss_now.map_or("?".into(), |k| (k / 1024).to_string())
    );
    Ok(())
}

/// Enrolls an agent on one VM in 20 (at most 2,000), 16 at a time, and has each report
/// once: SSH listening (protected by the VM's policy), and on every other one WinRM
/// (5985, protected by nothing) too. Returns how many.
async fn report_agents(http: &reqwest::Client, base: &str, vms: usize) -> anyhow::Result<usize> {
    let agents = (vms / 20).min(2000);
    if agents == 0 {
        return Ok(0);
    }
    let et = super::lab::enroll_token(http, base, agents).await?;
    for chunk in (0..agents).collect::<Vec<_>>().chunks(16) {
        let mut tasks = Vec::new();
        for &n in chunk {
            let (http, base, et) = (http.clone(), base.to_owned(), et.clone());
            // Spread over the installation.
            let vm = n * 20;
            tasks.push(tokio::spawn(async move {
                let r = http
                    .post(format!("{base}/api/v1/agent/enroll"))
                    .json(&json!({"enrollToken": et, "resourceGroup": format!("rg-{}", vm / 100), "name": format!("vm-{vm}")}))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("enroll vm-{vm}: {}", r.text().await?);
                }
                let v: Value = r.json().await?;
                let (id, token) = (
                    v["vmId"].as_str().unwrap_or_default(),
                    v["token"].as_str().unwrap_or_default(),
                );
                let mut ports = vec![22];
                if n % 2 == 1 {
                    ports.push(5985);
                }
                let listening: Vec<Value> = ports
                    .iter()
                    .map(|p| json!({"protocol": "tcp", "family": "IPv4", "address": "0.0.0.0", "port": p, "process": "sshd"}))
                    .collect();
                let r = http
                    .post(format!("{base}/api/v1/agent/status"))
                    .query(&[("vm", id)])
                    .bearer_auth(token)
                    .json(&json!({"nftVersion": "nftables v1.0.6", "listening": listening}))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("status of vm-{vm}: {}", r.text().await?);
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
    }
    Ok(agents)
}
