//! `jitgate-bench agents`: many simulated agents long-polling one controller; the time
//! from an initiate to the right agent receiving its new desired state, and the
//! controller's memory with all of them connected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jitgate_proto::DesiredState;
use serde_json::json;
use tokio::sync::mpsc;

use super::{BENCH_TOKEN, lab, peak_rss_kib, percentiles};

pub async fn run(agents: usize, grants: usize) -> anyhow::Result<()> {
    lab::raise_nofile();
    let dir = lab::tempdir()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(agents + 16)
        .build()?;
    let port = lab::free_port([127, 0, 0, 1].into())?;
    let (ctl, base, sub) =
        lab::controller(SocketAddr::from(([127, 0, 0, 1], port)), &dir, &http).await?;
    let et = lab::enroll_token(&http, &base, agents).await?;

    // Enroll every simulated agent (16 at a time).
    let mut tokens: Vec<(String, String)> = Vec::with_capacity(agents);
    for chunk in (0..agents).collect::<Vec<_>>().chunks(16) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let (http, base, et) = (http.clone(), base.clone(), et.clone());
            tasks.push(tokio::spawn(async move {
                let r = http
                    .post(format!("{base}/api/v1/agent/enroll"))
                    .json(&json!({"enrollToken": et, "resourceGroup": "sim", "name": format!("vm-{i}")}))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("enroll vm-{i}: {}", r.text().await?);
                }
                let v: serde_json::Value = r.json().await?;
                Ok((v["vmId"].as_str().unwrap_or_default().to_owned(), v["token"].as_str().unwrap_or_default().to_owned()))
            }));
        }
        for t in tasks {
            tokens.push(t.await??);
        }
    }
    let vms: Vec<serde_json::Value> = tokens
        .iter()
        .map(|(id, _)| json!({"id": id, "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT1H"}]}))
        .collect();
    let policy = format!(
        "{base}/subscriptions/{sub}/resourceGroups/sim/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default"
    );
    let r = http
        .put(format!("{policy}?api-version=2020-01-01"))
        .bearer_auth(BENCH_TOKEN)
        .json(&json!({"properties": {"virtualMachines": vms}}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("policy: {}", r.text().await?);
    }

    // The simulated agents: each long-polls its VM and reports every new state.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant, Vec<String>)>();
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (i, (vm, token)) in tokens.iter().enumerate() {
        let (http, base, vm, token, tx, connected) = (
            http.clone(),
            base.clone(),
            vm.clone(),
            token.clone(),
            tx.clone(),
            connected.clone(),
        );
        tokio::spawn(async move {
            let mut known: Option<String> = None;
            loop {
                let mut q = vec![("vm", vm.clone()), ("wait", "30".to_owned())];
                if let Some(k) = &known {
                    q.push(("known", k.clone()));
                }
                let Ok(resp) = http
                    .get(format!("{base}/api/v1/agent/desired"))
                    .query(&q)
                    .bearer_auth(&token)
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Ok(d) = resp.json::<DesiredState>().await else {
                    continue;
                };
                let at = Instant::now();
                if known.is_none() {
                    connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if known.as_deref() != Some(d.revision.as_str()) {
                    known = Some(d.revision.clone());
                    let _ = tx.send((i, at, d.grants.iter().map(|g| g.request.clone()).collect()));
                }
            }
        });
    }
    let started = Instant::now();
    while connected.load(std::sync::atomic::Ordering::Relaxed) < agents {
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} of {agents} agents connected",
                connected.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while rx.try_recv().is_ok() {}

    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut pending: HashMap<usize, Vec<(Instant, Vec<String>)>> = HashMap::new();
    for j in 0..grants {
        let k = (j * 7919) % agents;
        let body = json!({"virtualMachines": [{"id": tokens[k].0, "ports": [{"number": 22, "allowedSourceAddressPrefix": format!("10.1.{}.{}", j / 250, j % 250 + 1), "duration": "PT10M"}]}]});
        let t0 = Instant::now();
        let resp = super::lab::initiate(&http, &policy, &body).await?;
        let id = resp
            .headers()
            .get("x-jitgate-request-id")
            .and_then(|v| v.to_str().ok())
            .context("no id")?
            .to_owned();
        let deadline = t0 + Duration::from_secs(5);
        let got = loop {
            if let Some(list) = pending.get_mut(&k)
                && let Some(pos) = list.iter().position(|(_, ids)| ids.contains(&id))
            {
                break list.remove(pos).0;
            }
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((i, at, ids))) => pending.entry(i).or_default().push((at, ids)),
                _ => bail!("agent {k} did not receive request {id} within 5 s"),
            }
        };
        hist.record(got.duration_since(t0).as_micros() as u64)?;
    }
    println!(
        "jitgate-bench agents ({agents} simulated agents long-polling one controller over loopback HTTP)"
    );
    println!(
        "  initiate sent -> that VM's agent has its new desired state: {}",
        percentiles(&hist)
    );
    match peak_rss_kib(ctl.0.id()) {
        Some(kib) => println!(
            "  controller peak RSS with {agents} agents connected: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("  controller peak RSS: unavailable"),
    }
    drop(ctl);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
