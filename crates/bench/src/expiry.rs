//! `jitgate-bench expiry`: when a grant really closes, relative to its end time, seen
//! from the client: with everything running, and with the controller and the agent both
//! killed (`kill -9`) while the grant is live.
//!
//! Each round: a grant of a few seconds from the client's address; once the port
//! answers, and from 100 ms before the end, connect attempts (each a new connection,
//! 2 ms timeout, one per millisecond) until one fails. The close time is the start of
//! the first failed attempt; it is compared with the grant's `endTimeUtc`.
//! A negative figure means closed early (the agent shortens timeouts by the time nft
//! takes to commit, so a grant never outlives its end).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jiff::Timestamp;
use serde_json::json;

use super::rig::{Rig, port_open};

/// min, p50, p90, max of signed milliseconds.
fn spread(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    if v.is_empty() {
        return "no rounds".into();
    }
    format!(
        "min {:+.1} ms, p50 {:+.1} ms, p90 {:+.1} ms, max {:+.1} ms (n={})",
        v[0],
        at(0.5),
        at(0.9),
        v[v.len() - 1],
        v.len()
    )
}

/// Starts a grant of `secs` seconds for the client and waits until the port answers;
/// returns the grant's end time.
async fn open_grant(rig: &Rig, secs: u64) -> anyhow::Result<Timestamp> {
    let body = json!({"virtualMachines": [{"id": rig.vm_id, "ports": [{"number": 22, "duration": format!("PT{secs}S")}]}]});
    let r = super::lab::initiate(&rig.http, &rig.policy, &body).await?;
    let v: serde_json::Value = r.json().await?;
    let end: Timestamp = v["virtualMachines"][0]["ports"][0]["endTimeUtc"]
        .as_str()
        .context("no end time")?
        .parse()?;
    let service = rig.service;
    let t0 = Instant::now();
    tokio::task::block_in_place(|| {
        while !port_open(service, Duration::from_millis(2)) {
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("the port did not open within 5 s");
            }
        }
        Ok(())
    })?;
    Ok(end)
}

pub async fn run(grants: usize, killed: usize) -> anyhow::Result<()> {
    let mut rig = Rig::start().await?;
    let mut live: Vec<f64> = Vec::new();
    let mut dead: Vec<f64> = Vec::new();
    let mut open_after_end = 0usize;
    for i in 0..grants + killed {
        let kill = i >= grants;
        let end = open_grant(&rig, 3).await?;
        if kill {
            rig.kill_all();
        }
        let service = rig.service;
        // Sleep until shortly before the end, then probe every millisecond: probing
        // the whole grant would leave tens of thousands of TIME_WAIT sockets.
        let lead = end.duration_since(Timestamp::now()) - jiff::SignedDuration::from_millis(100);
        if lead.is_positive() {
            tokio::time::sleep(Duration::try_from(lead).unwrap_or_default()).await;
        }
        // The close lies between the start of the last attempt that connected and the
        // start of the first that did not; the latter is reported (an upper bound).
        let closed_at = tokio::task::block_in_place(|| {
            let start = Instant::now();
            loop {
                let attempt = Timestamp::now();
                if !port_open(service, Duration::from_millis(2)) {
                    return Some(attempt);
                }
                if start.elapsed() > Duration::from_secs(10) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .context("the port did not close within 10 s")?;
        let delta_ms = closed_at.duration_since(end).as_secs_f64() * 1000.0;
        if delta_ms > 0.0 {
            open_after_end += 1;
        }
        if kill { &mut dead } else { &mut live }.push(delta_ms);
        if kill {
            rig.restart_all().await?;
            // Wait until the restarted agent has applied its state again.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("jitgate-bench expiry (real controller, agent and nftables; close seen by a client)");
    println!(
        "  close - end, all running:                 {}",
        spread(&mut live)
    );
    if killed > 0 {
        println!(
            "  close - end, controller and agent killed: {}",
            spread(&mut dead)
        );
    }
    println!(
        "  rounds where a new connection succeeded after the end time: {open_after_end} of {}",
        grants + killed
    );
    Ok(())
}
