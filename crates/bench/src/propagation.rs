//! `jitgate-bench propagation`: from the client sending an initiate to the protected
//! port answering a TCP connect, through the real controller and the real agent.
//!
//! Hosts: the controller and the client in the root namespace on one end of a veth,
//! the agent and a TCP service on port 22 in a "vm" namespace on the other end. Each
//! round: initiate (source = the client's address, as seen by the controller), then
//! connect attempts with a 1 ms timeout until one succeeds; then revoke and wait until
//! the port is closed again. With `approval`, a rule makes each request wait, and the
//! clock starts when the approval is sent (by an approver other than the requestor).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use super::rig::{Rig, port_open, time_to_close, time_to_open};
use super::{BENCH_TOKEN, percentiles};

pub async fn run(grants: usize, approval: bool, background: usize) -> anyhow::Result<()> {
    let rig = Rig::start().await?;
    let (http, base, vm_id, policy, service) =
        (&rig.http, &rig.base, &rig.vm_id, &rig.policy, rig.service);
    let t = Instant::now();
    fill(http, policy, vm_id, background).await?;
    if background > 0 {
        println!(
            "  {background} other live grants made in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // Let the agent catch up with the last of them.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let approver = if approval {
        Some(approver(http, base, vm_id).await?)
    } else {
        None
    };
    // The client of the measured rounds runs on a thread of its own with a
    // single-threaded runtime and its own connection, as the `jitgate` CLI and the
    // SDKs' clients do, rather than as one task of this multi-thread runtime.
    let (base, policy, vm_id) = (base.clone(), policy.clone(), vm_id.clone());
    let (open_hist, http_hist, close_hist) = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(rounds(&base, &policy, &vm_id, service, approver, grants))
    })
    .await
    .context("the measuring client stopped")??;
    println!(
        "jitgate-bench propagation (controller + real agent + real nftables, veth between namespaces; {background} other live grants on the VM)"
    );
    let what = if approval { "approval" } else { "initiate" };
    println!(
        "  {what} sent -> port answers TCP connect: {}",
        percentiles(&open_hist)
    );
    println!(
        "  {what} HTTP round trip (answer received):  {}",
        percentiles(&http_hist)
    );
    println!(
        "  revoke sent -> port refuses new connects:  {} (start of the first refused 1 ms probe)",
        percentiles(&close_hist)
    );
    Ok(())
}

/// The measured rounds: initiate (or approve), wait for the port to open, revoke,
/// wait for it to close. Blocking probes run on this client's only thread, as a
/// command-line client's do.
async fn rounds(
    base: &str,
    policy: &str,
    vm_id: &str,
    service: std::net::SocketAddr,
    approver: Option<String>,
    grants: usize,
) -> anyhow::Result<(Hist, Hist, Hist)> {
    let http = &reqwest::Client::new();
    let mut open_hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut http_hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut close_hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let body =
        json!({"virtualMachines": [{"id": vm_id, "ports": [{"number": 22, "duration": "PT10M"}]}]});
    for _ in 0..grants {
        let mut t0 = Instant::now();
        let resp = super::lab::initiate(http, policy, &body).await?;
        let mut t_http = t0.elapsed();
        let id = resp
            .headers()
            .get("x-jitgate-request-id")
            .and_then(|v| v.to_str().ok())
            .context("no request id")?
            .to_owned();
        if let Some(token) = &approver {
            // The port waits for approval: the clock starts at the approval.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if port_open(service, Duration::from_millis(5)) {
                bail!("the port opened before the approval");
            }
            t0 = Instant::now();
            let r = http
                .post(format!("{base}/api/v1/requests/{id}/approve"))
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await?;
            t_http = t0.elapsed();
            if !r.status().is_success() {
                bail!("approve: {}", r.text().await?);
            }
        }
        let opened = time_to_open(service, t0, Duration::from_secs(5))
            .context("the port did not open within 5 s")?;
        open_hist.record(opened.as_micros() as u64)?;
        if std::env::var_os("JITGATE_BENCH_TRACE").is_some() {
            eprintln!(
                "trace: initiate at {} http {:?} open after {:?}",
                jiff::Timestamp::now() - jiff::SignedDuration::try_from(opened).unwrap_or_default(),
                t_http,
                opened
            );
        }
        http_hist.record(t_http.as_micros() as u64)?;

        let t1 = Instant::now();
        let r = http
            .post(format!("{base}/api/v1/requests/{id}/revoke"))
            .bearer_auth(BENCH_TOKEN)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("revoke: {}", r.text().await?);
        }
        let closed = time_to_close(service, t1, Duration::from_secs(5))
            .context("the port did not close within 5 s after revoke")?;
        close_hist.record(closed.as_micros() as u64)?;
        // Let the agent finish this round (a probe can time out while nft is still
        // committing) so that rounds do not overlap.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((open_hist, http_hist, close_hist))
}

type Hist = hdrhistogram::Histogram<u64>;

/// `n` live grants of port 22 for other sources (172.16.0.0/12, one address each),
/// made by 8 concurrent clients.
async fn fill(http: &reqwest::Client, policy: &str, vm_id: &str, n: usize) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::<anyhow::Result<()>>::new();
    for worker in 0..8usize {
        let (http, policy, vm_id) = (http.clone(), policy.to_owned(), vm_id.to_owned());
        tasks.spawn(async move {
            for i in (worker..n).step_by(8) {
                let addr = std::net::Ipv4Addr::from(0xAC10_0000u32 + i as u32);
                let body = json!({"virtualMachines": [{"id": vm_id, "ports": [
                    {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": addr.to_string()}
                ]}]});
                super::lab::initiate(&http, &policy, &body).await?;
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// An approval rule on the subscription for port 22 and a token of an approver.
async fn approver(http: &reqwest::Client, base: &str, vm_id: &str) -> anyhow::Result<String> {
    let scope = vm_id
        .split("/resourceGroups/")
        .next()
        .context("the VM id has no subscription")?
        .to_owned();
    let r = http
        .put(format!("{base}/api/v1/approvalRules/bench"))
        .bearer_auth(BENCH_TOKEN)
        .json(&json!({"scope": scope, "ports": [22], "requireJustification": false}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("approval rule: {}", r.text().await?);
    }
    let t: serde_json::Value = http
        .post(format!("{base}/api/v1/tokens"))
        .bearer_auth(BENCH_TOKEN)
        .json(&json!({"principal": "bench-approver"}))
        .send()
        .await?
        .json()
        .await?;
    let r = http
        .post(format!("{base}/api/v1/roleAssignments"))
        .bearer_auth(BENCH_TOKEN)
        .json(&json!({"principal": "bench-approver", "role": "JIT Approver", "scope": scope}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("role assignment: {}", r.text().await?);
    }
    t["token"]
        .as_str()
        .map(str::to_owned)
        .context("no approver token")
}
