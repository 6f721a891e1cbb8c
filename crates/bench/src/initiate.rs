//! `jitgate-bench initiate`: starts a real controller (this binary, `serve`, as a child
//! process on a fresh SQLite data directory), registers VMs and puts them in policies
//! through the API, then drives initiates from concurrent clients over loopback HTTP
//! and reports throughput, latency percentiles and the controller's peak memory.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use super::{BENCH_TOKEN, peak_rss_kib};

const VMS_PER_RG: usize = 100;
pub async fn initiate(vms: usize, clients: usize, seconds: u64, dir: &Path) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .build()?;
    let port = super::lab::free_port([127, 0, 0, 1].into())?;
    let (child, base, sub) =
        super::lab::controller(SocketAddr::from(([127, 0, 0, 1], port)), dir, &http).await?;
    let pid = child.0.id();

    // Setup: register VMs and put them in policies, through the API.
    let setup = Instant::now();
    let groups = populate(&http, &base, &sub, vms, clients).await?;
    let setup_secs = setup.elapsed().as_secs_f64();

    // Drive initiates.
    let bases = [base];
    let (total, hist, elapsed) = drive_all(&http, &bases, &sub, vms, clients, seconds).await?;
    let rss = peak_rss_kib(pid);
    println!("jitgate-bench initiate");
    println!(
        "  controller:   SQLite (WAL, synchronous=FULL, group commit), data dir {}",
        dir.display()
    );
    println!(
        "  setup:        {vms} VMs registered and put in {groups} policies through the API in {setup_secs:.1} s"
    );
    println!(
        "  clients:      {clients} concurrent, HTTP/1.1 keep-alive over loopback, {seconds} s"
    );
    println!(
        "  initiates:    {total} accepted (202) in {elapsed:.2} s = {:.0} /s",
        total as f64 / elapsed
    );
    println!(
        "  latency:      p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.9) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    match rss {
        Some(kib) => println!(
            "  controller peak RSS (VmHWM): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("  controller peak RSS: unavailable (/proc not readable)"),
    }
    drop(child);
    Ok(())
}

/// `clients` concurrent clients (client `c` on `bases[c % len]`) driving initiates for
/// `seconds`: how many were accepted, their latencies, and the seconds it took.
pub async fn drive_all(
    http: &reqwest::Client,
    bases: &[String],
    sub: &str,
    vms: usize,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<(u64, hdrhistogram::Histogram<u64>, f64)> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, base, sub) = (http.clone(), bases[c % bases.len()].clone(), sub.to_owned());
        tasks.push(tokio::spawn(async move {
            drive(&http, &base, &sub, vms, c, deadline).await
        }));
    }
    let mut total = 0u64;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        let (n, h) = t.await??;
        total += n;
        hist.add(h)?;
    }
    Ok((total, hist, started.elapsed().as_secs_f64()))
}

/// One client's initiates until `deadline`: a small deterministic generator walks VMs
/// and sources (client `c` its own walk). Returns how many and their latencies.
async fn drive(
    http: &reqwest::Client,
    base: &str,
    sub: &str,
    vms: usize,
    c: usize,
    deadline: Instant,
) -> anyhow::Result<(u64, hdrhistogram::Histogram<u64>)> {
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut n: u64 = 0;
    let mut walk = super::lab::Walk(0x9E37_79B9_7F4A_7C15 ^ (c as u64));
    while Instant::now() < deadline {
        let x = walk.bits();
        let vm = (x % vms as u64) as usize;
        let src = format!(
            "10.{}.{}.{}",
            (x >> 16) & 255,
            (x >> 24) & 255,
            (x >> 32) & 255
        );
        let t = Instant::now();
        initiate_one(http, base, sub, vm, &src).await?;
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
        n += 1;
    }
    Ok((n, hist))
}

/// Initiates port 22 of `vm-<vm>` from `src` for an hour; fails unless answered 202.
pub async fn initiate_one(
    http: &reqwest::Client,
    base: &str,
    sub: &str,
    vm: usize,
    src: &str,
) -> anyhow::Result<()> {
    let g = vm / VMS_PER_RG;
    let r = http
        .post(format!(
            "{base}/subscriptions/{sub}/resourceGroups/rg-{g}/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default/initiate?api-version=2020-01-01"
        ))
        .bearer_auth(BENCH_TOKEN)
        .json(&json!({
            "virtualMachines": [{
                "id": format!("/subscriptions/{sub}/resourceGroups/rg-{g}/providers/Microsoft.Compute/virtualMachines/vm-{vm}"),
                "ports": [{"number": 22, "allowedSourceAddressPrefix": src, "duration": "PT1H"}]
            }],
            "justification": "bench"
        }))
        .send()
        .await?;
    let status = r.status();
    let body = r.text().await?;
    if status.as_u16() != 202 {
        bail!("initiate answered {status}: {body}");
    }
    Ok(())
}

/// Registers `vms` VMs (`vm-<i>` in `rg-<i / 100>`) and puts each group in a policy
/// protecting ports 22 and 3389, through the API with `clients` concurrent clients.
/// Returns the number of groups.
pub async fn populate(
    http: &reqwest::Client,
    base: &str,
    sub: &str,
    vms: usize,
    clients: usize,
) -> anyhow::Result<usize> {
    let groups = vms.div_ceil(VMS_PER_RG);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, base, next) = (http.clone(), base.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= vms {
                    return anyhow::Ok(());
                }
                let r = http
                    .post(format!("{base}/api/v1/vms"))
                    .bearer_auth(BENCH_TOKEN)
                    .json(&json!({"resourceGroup": format!("rg-{}", i / VMS_PER_RG), "name": format!("vm-{i}")}))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("register vm-{i}: {}", r.text().await?);
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    for g in 0..groups {
        let members: Vec<serde_json::Value> = (g * VMS_PER_RG..((g + 1) * VMS_PER_RG).min(vms))
            .map(|i| {
                json!({
                    "id": format!("/subscriptions/{sub}/resourceGroups/rg-{g}/providers/Microsoft.Compute/virtualMachines/vm-{i}"),
                    "ports": [
                        {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT3H"},
                        {"number": 3389, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT3H"}
                    ]
                })
            })
            .collect();
        let r = http
            .put(format!(
                "{base}/subscriptions/{sub}/resourceGroups/rg-{g}/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?api-version=2020-01-01"
            ))
            .bearer_auth(BENCH_TOKEN)
            .json(&json!({"kind": "Basic", "properties": {"virtualMachines": members}}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("policy rg-{g}: {}", r.text().await?);
        }
    }
    Ok(groups)
}
