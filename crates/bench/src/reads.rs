//! `jitgate bench reads`: how reads scale with the number of VMs. Starts a real
//! controller on a fresh SQLite directory, registers VMs and policies through the API
//! (as `bench initiate` does) plus some live grants, then times, one call at a time
//! over loopback HTTP (so a call's time is the server's plus a loopback round trip):
//! one VM's view by name, the lookup by name the CLI uses, pages of 100 VMs, the
//! recommendations summary, and `jitgate vm show` as a person runs it (a process per
//! call). Prints percentiles and the controller's peak memory.

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
struct Walk(u64);

impl Walk {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

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

pub async fn run(vms: usize, rounds: usize, dir: &Path) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().build()?;
    let port = super::lab::free_port([127, 0, 0, 1].into())?;
    let (child, base, sub) =
        super::lab::controller(SocketAddr::from(([127, 0, 0, 1], port)), dir, &http).await?;
    let pid = child.0.id();
    let setup = Instant::now();
    let groups = super::initiate::populate(&http, &base, &sub, vms, 8).await?;
    // Some live grants, so views count real ones.
    let mut walk = Walk(0x9E37_79B9_7F4A_7C15);
    for _ in 0..200.min(vms) {
        let vm = walk.next(vms);
        let g = vm / 100;
        let r = http
            .post(format!(
                "{base}/subscriptions/{sub}/resourceGroups/rg-{g}/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default/initiate?api-version=2020-01-01"
            ))
            .bearer_auth(BENCH_TOKEN)
            .json(&json!({"virtualMachines": [{
                "id": format!("/subscriptions/{sub}/resourceGroups/rg-{g}/providers/Microsoft.Compute/virtualMachines/vm-{vm}"),
                "ports": [{"number": 22, "allowedSourceAddressPrefix": "10.1.2.3", "duration": "PT1H"}]}]}))
            .send()
            .await?;
        if r.status().as_u16() != 202 {
            bail!("initiate: {}", r.text().await?);
        }
    }
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
    // The recommendations summary (every VM classified).
    let mut recs = hist()?;
    for _ in 0..rounds.clamp(1, 10) {
        timed_get(&http, &format!("{base}/api/v1/recommendations"), &mut recs).await?;
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
    println!("jitgate bench reads");
    println!(
        "  setup:           {vms} VMs in {groups} policies, 200 live grants, through the API in {setup_secs:.1} s"
    );
    println!("  one VM's view:   {}", percentiles(&view));
    println!("  VM by name:      {}", percentiles(&by_name));
    println!(
        "  page of 100 VMs: {} ({listed} VMs listed)",
        percentiles(&pages)
    );
    println!("  recommendations: {}", percentiles(&recs));
    println!(
        "  jitgate vm show: {} (a process per call)",
        percentiles(&show)
    );
    println!(
        "  controller peak RSS: {} MiB after setup, {} MiB at the end",
        rss_after_setup.map_or("?".into(), |k| (k / 1024).to_string()),
        rss.map_or("?".into(), |k| (k / 1024).to_string())
    );
    Ok(())
}
