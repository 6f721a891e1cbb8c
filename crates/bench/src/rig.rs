//! The enforcement rig shared by the propagation and expiry benchmarks: the controller
//! and the client in the root namespace, the real agent and a TCP service on port 22 in
//! a "vm" namespace behind a veth, and a policy protecting port 22.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use super::{BENCH_TOKEN, Child, lab};

pub struct Rig {
    pub vm: lab::Host,
    pub service: SocketAddr,
    pub http: reqwest::Client,
    pub base: String,
    pub vm_id: String,
    /// The policy's URL (without api-version).
    pub policy: String,
    listen: SocketAddr,
    dir: PathBuf,
    ctl: Option<Child>,
    agent: Option<Child>,
}

pub fn port_open(addr: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}

/// Time from `since` until `addr` answers a TCP connect (1 ms probes back to back),
/// or None after `limit`.
pub fn time_to_open(addr: SocketAddr, since: Instant, limit: Duration) -> Option<Duration> {
    while !port_open(addr, Duration::from_millis(1)) {
        if since.elapsed() > limit {
            return None;
        }
    }
    Some(since.elapsed())
}

/// Time from `since` until the start of the first refused 1 ms probe of `addr` (the
/// port was closed by then; the probe's own timeout is not counted), or None after
/// `limit`. Paced: every successful probe leaves a TIME_WAIT socket.
pub fn time_to_close(addr: SocketAddr, since: Instant, limit: Duration) -> Option<Duration> {
    loop {
        let started = since.elapsed();
        if !port_open(addr, Duration::from_millis(1)) {
            return Some(started);
        }
        if since.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl Rig {
    pub async fn start() -> anyhow::Result<Rig> {
        lab::require_root_tools()?;
        let vm = lab::Host::create("vm", 251)?;
        let service = SocketAddr::from((vm.ns_addr, 22));
        vm.spawn_in(move || {
            if let Ok(l) = TcpListener::bind("0.0.0.0:22") {
                for s in l.incoming().flatten() {
                    drop(s);
                }
            }
        })?;
        let dir = lab::tempdir()?;
        let http = reqwest::Client::new();
        let listen = SocketAddr::from((vm.root_addr, lab::free_port(vm.root_addr.into())?));
        let (ctl, base, sub) = lab::controller(listen, &dir.join("ctl"), &http).await?;
        let et = lab::enroll_token(&http, &base, 1).await?;
        let vm_id = format!(
            "/subscriptions/{sub}/resourceGroups/bench/providers/Microsoft.Compute/virtualMachines/vm1"
        );
        let policy = format!(
            "{base}/subscriptions/{sub}/resourceGroups/bench/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default"
        );
        let mut rig = Rig {
            vm,
            service,
            http,
            base,
            vm_id,
            policy,
            listen,
            dir,
            ctl: Some(ctl),
            agent: None,
        };
        rig.start_agent(Some(&et))?;
        let started = Instant::now();
        while !rig
            .http
            .get(format!("{}/api/v1/vms/bench/vm1", rig.base))
            .bearer_auth(BENCH_TOKEN)
            .send()
            .await?
            .status()
            .is_success()
        {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("the agent did not enroll within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = rig
            .http
            .put(format!("{}?api-version=2020-01-01", rig.policy))
            .bearer_auth(BENCH_TOKEN)
            .json(&json!({"properties": {"virtualMachines": [{"id": rig.vm_id, "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT1H"}]}]}}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("policy: {}", r.text().await?);
        }
        let started = Instant::now();
        while port_open(service, Duration::from_millis(100)) {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("the deny rule never took effect");
            }
        }
        Ok(rig)
    }

    /// Starts the real agent in the vm namespace (enrolling when given a token).
    pub fn start_agent(&mut self, enroll: Option<&str>) -> anyhow::Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.vm.ns])
            .arg(super::lab::jitgate_exe()?)
            .args([
                "agent",
                "--controller",
                &self.base,
                "--resource-group",
                "bench",
                "--name",
                "vm1",
                "--state-dir",
            ])
            .arg(self.dir.join("agent"))
            .env(
                "JITGATE_LOG",
                std::env::var("JITGATE_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(t) = enroll {
            cmd.args(["--enroll-token", t]);
        }
        self.agent = Some(Child(cmd.spawn().context("cannot start the agent")?));
        Ok(())
    }

    /// SIGKILLs the controller and the agent.
    pub fn kill_all(&mut self) {
        self.agent.take();
        self.ctl.take();
    }

    /// Starts the controller and the agent again on their data.
    pub async fn restart_all(&mut self) -> anyhow::Result<()> {
        let (ctl, _, _) = lab::controller(self.listen, &self.dir.join("ctl"), &self.http).await?;
        self.ctl = Some(ctl);
        self.start_agent(None)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
