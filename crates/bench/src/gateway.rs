//! `jitgate-bench gateway`: from the client sending an initiate to the port of a
//! machine behind a DNAT gateway answering a TCP connect on the gateway's public
//! address and mapped port, through the real controller and the real `jitgate
//! gateway`; and revoke to refused. Optionally with many machines behind the gateway
//! and many live grants across them.
//!
//! Hosts: the controller and the client in the root namespace; the gateway in a "gw"
//! namespace on a veth (its namespace-side address is the public one); the machine
//! (a TCP service on 3389, no agent) in a third namespace behind the gateway, default
//! route through it. The other machines are registered and placed at addresses where
//! nothing answers: the gateway enforces their states (and probes them) all the same.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::lab::{self, sh};
use super::rig::{port_open, time_to_close, time_to_open};
use super::{BENCH_TOKEN, Child, percentiles};

const RDP: u16 = 3389;

/// The machine behind the gateway: its namespace and the veth to the gateway.
struct Machine {
    ns: String,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

fn address_of(i: usize) -> Ipv4Addr {
    // 10.253.0.0/16 behind the gateway; .0.1 is the gateway, machine 0 is .0.2.
    let n = i as u32 + 2;
    Ipv4Addr::new(10, 253, (n / 250) as u8, (n % 250) as u8 + 1)
}

pub async fn run(rounds: usize, machines: usize, background: usize) -> anyhow::Result<()> {
    lab::require_root_tools()?;
    lab::raise_nofile();
    let gw = lab::Host::create("gw", 252)?;
    let public = gw.ns_addr;
    let pid = std::process::id();
    let machine = Machine {
        ns: format!("jgb-win-{pid}"),
    };
    let inner = format!("jgi{}", pid % 100_000);
    sh(&["ip", "netns", "add", &machine.ns])?;
    sh(&[
        "ip",
        "-n",
        &gw.ns,
        "link",
        "add",
        &inner,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &machine.ns,
    ])?;
    sh(&[
        "ip",
        "-n",
        &gw.ns,
        "addr",
        "add",
        "10.253.0.1/16",
        "dev",
        &inner,
    ])?;
    sh(&["ip", "-n", &gw.ns, "link", "set", &inner, "up"])?;
    let m0 = address_of(0);
    sh(&[
        "ip",
        "-n",
        &machine.ns,
        "addr",
        "add",
        &format!("{m0}/16"),
        "dev",
        "eth0",
    ])?;
    sh(&["ip", "-n", &machine.ns, "link", "set", "eth0", "up"])?;
    sh(&["ip", "-n", &machine.ns, "link", "set", "lo", "up"])?;
    sh(&[
        "ip",
        "-n",
        &machine.ns,
        "route",
        "add",
        "default",
        "via",
        "10.253.0.1",
    ])?;
    sh(&[
        "ip",
        "netns",
        "exec",
        &gw.ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])?;
    let ns_file = std::fs::File::open(format!("/run/netns/{}", machine.ns))?;
    std::thread::spawn(move || {
        if nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).is_ok()
            && let Ok(l) = TcpListener::bind(("0.0.0.0", RDP))
        {
            for s in l.incoming().flatten() {
                drop(s);
            }
        }
    });

    let dir = lab::tempdir()?;
    let http = reqwest::Client::new();
    let listen = SocketAddr::from((gw.root_addr, lab::free_port(gw.root_addr.into())?));
    let (ctl, base, sub) = lab::controller(listen, &dir.join("ctl"), &http).await?;
    let et = lab::enroll_token(&http, &base, 1).await?;
    let gateway = Child(
        std::process::Command::new("ip")
            .args(["netns", "exec", &gw.ns])
            .arg(lab::jitgate_exe()?)
            .args([
                "gateway",
                "--controller",
                &base,
                "--resource-group",
                "bench",
                "--name",
                "gw",
                "--enroll-token",
                &et,
                "--state-dir",
            ])
            .arg(dir.join("gw"))
            .env(
                "JITGATE_LOG",
                std::env::var("JITGATE_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("cannot start the gateway")?,
    );
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let mut r = http.request(method, &url).bearer_auth(BENCH_TOKEN);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await?;
            let status = resp.status();
            let text = resp.text().await?;
            if !status.is_success() {
                bail!("{url}: {status} {text}");
            }
            anyhow::Ok(serde_json::from_str::<Value>(&text).unwrap_or(Value::Null))
        }
    };
    let started = Instant::now();
    while call(reqwest::Method::GET, "/api/v1/vms/bench/gw".into(), None)
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the gateway did not enroll within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The machines, placed in DNAT mode, and one policy protecting 3389 on all.
    let t = Instant::now();
    let vm_id = |i: usize| {
        format!(
            "/subscriptions/{sub}/resourceGroups/bench/providers/Microsoft.Compute/virtualMachines/m{i}"
        )
    };
    for i in 0..machines {
        call(
            reqwest::Method::POST,
            "/api/v1/vms".into(),
            Some(json!({"resourceGroup": "bench", "name": format!("m{i}")})),
        )
        .await?;
        call(
            reqwest::Method::PUT,
            format!("/api/v1/vms/bench/m{i}/placement"),
            Some(json!({"gateway": "bench/gw", "address": address_of(i).to_string(), "mode": "dnat", "publicIpAddress": public.to_string()})),
        )
        .await?;
    }
    let policy = format!(
        "{base}/subscriptions/{sub}/resourceGroups/bench/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/gw"
    );
    let vms: Vec<Value> = (0..machines)
        .map(|i| json!({"id": vm_id(i), "ports": [{"number": RDP, "protocol": "TCP", "maxRequestAccessDuration": "PT3H"}]}))
        .collect();
    call(
        reqwest::Method::PUT,
        format!(
            "{}?api-version=2020-01-01",
            policy.trim_start_matches(&base)
        ),
        Some(json!({"properties": {"virtualMachines": vms}})),
    )
    .await?;
    let view = call(reqwest::Method::GET, "/api/v1/vms/bench/m0".into(), None).await?;
    let mapped = view["placement"]["mappedPorts"][0]["mappedPort"]
        .as_u64()
        .context("m0 has no mapped port")? as u16;
    let front = SocketAddr::from((public, mapped));
    println!(
        "  {machines} machines behind the gateway, placed and protected in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Background grants across the machines, 8 clients.
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::<anyhow::Result<()>>::new();
    for worker in 0..8usize {
        let (http, policy) = (http.clone(), policy.clone());
        let ids: Vec<String> = (0..machines).map(vm_id).collect();
        tasks.spawn(async move {
            for i in (worker..background).step_by(8) {
                let source = Ipv4Addr::from(0xAC10_0000u32 + i as u32);
                let body = json!({"virtualMachines": [{"id": ids[i % ids.len()], "ports": [
                    {"number": RDP, "duration": "PT2H", "allowedSourceAddressPrefix": source.to_string()}
                ]}]});
                lab::initiate(&http, &policy, &body).await?;
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    if background > 0 {
        println!(
            "  {background} other live grants made in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    // Until the gateway has applied everything (m0's state last to change or not).
    let t = Instant::now();
    loop {
        let v = call(reqwest::Method::GET, "/api/v1/vms/bench/m0".into(), None).await?;
        if v["agent"]["upToDate"] == true && !port_open(front, Duration::from_millis(20)) {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the gateway did not catch up within 10 minutes: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  the gateway caught up {:.1} s after the last grant",
        t.elapsed().as_secs_f64()
    );

    let mut open_hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut close_hist = hdrhistogram::Histogram::<u64>::new(3)?;
    // The controller's part: initiate sent -> its answer (a durable commit).
    let mut answer_hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let body = json!({"virtualMachines": [{"id": vm_id(0), "ports": [{"number": RDP, "duration": "PT10M"}]}]});
    for _ in 0..rounds {
        let t0 = Instant::now();
        let resp = lab::initiate(&http, &policy, &body).await?;
        answer_hist.record(t0.elapsed().as_micros() as u64)?;
        let id = resp
            .headers()
            .get("x-jitgate-request-id")
            .and_then(|v| v.to_str().ok())
            .context("no request id")?
            .to_owned();
        let opened =
            tokio::task::block_in_place(|| time_to_open(front, t0, Duration::from_secs(10)))
                .context("the mapped port did not open within 10 s")?;
        open_hist.record(opened.as_micros() as u64)?;
        let t1 = Instant::now();
        call(
            reqwest::Method::POST,
            format!("/api/v1/requests/{id}/revoke"),
            None,
        )
        .await?;
        let closed =
            tokio::task::block_in_place(|| time_to_close(front, t1, Duration::from_secs(10)))
                .context("the mapped port did not close within 10 s after revoke")?;
        close_hist.record(closed.as_micros() as u64)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss = lab::rss_kib(gateway.0.id());
    println!(
        "jitgate-bench gateway (controller + real jitgate gateway + real nftables; DNAT; {machines} machines behind it, {background} other live grants)"
    );
    println!(
        "  initiate sent -> mapped port answers TCP connect: {}",
        percentiles(&open_hist)
    );
    println!(
        "  revoke sent -> mapped port refuses new connects:  {} (start of the first refused 1 ms probe)",
        percentiles(&close_hist)
    );
    println!(
        "  of which the controller: initiate sent -> answered: {}",
        percentiles(&answer_hist)
    );
    if let Some(kib) = rss {
        println!(
            "  gateway process memory (RSS): {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    drop(gateway);
    drop(ctl);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
