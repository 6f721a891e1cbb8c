//! Test hosts for benchmarks: network namespaces, veths, a controller child process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The bootstrap Owner token of the controllers benchmarks start.
pub const BENCH_TOKEN: &str = "bench-owner-token-0123456789abcdef";

/// A process's peak resident memory (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// A process's resident memory now (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// A child process killed (SIGKILL) when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("jitgate-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} (install iproute2 and nftables)", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn require_root_tools() -> anyhow::Result<()> {
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            bail!("`{tool}` is missing: install the Debian package {pkg}");
        }
    }
    if !std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    {
        bail!("this benchmark creates network namespaces: run it as root");
    }
    Ok(())
}

/// A network namespace joined to the root namespace by a veth pair:
/// root side `10.<net>.0.1/24`, namespace side `10.<net>.0.2/24`.
pub struct Host {
    pub ns: String,
    pub veth: String,
    pub root_addr: std::net::Ipv4Addr,
    pub ns_addr: std::net::Ipv4Addr,
}

impl Host {
    pub fn create(tag: &str, net: u8) -> anyhow::Result<Host> {
        let pid = std::process::id();
        let ns = format!("jgb-{tag}-{pid}");
        let veth = format!("jgb{net}-{}", pid % 100_000);
        let peer = format!("jgp{net}-{}", pid % 100_000);
        let root_addr = std::net::Ipv4Addr::new(10, net, 0, 1);
        let ns_addr = std::net::Ipv4Addr::new(10, net, 0, 2);
        let h = Host {
            ns: ns.clone(),
            veth: veth.clone(),
            root_addr,
            ns_addr,
        };
        sh(&["ip", "netns", "add", &ns])?;
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ])?;
        sh(&["ip", "link", "set", &peer, "netns", &ns])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{root_addr}/24"),
            "dev",
            &veth,
        ])?;
        sh(&["ip", "link", "set", &veth, "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{ns_addr}/24"),
            "dev",
            &peer,
        ])?;
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &peer, "up"])?;
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        Ok(h)
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens live there).
    pub fn spawn_in<F: FnOnce() + Send + 'static>(
        &self,
        f: F,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.ns))?;
        Ok(std::thread::spawn(move || {
            if nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                f();
            }
        }))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.veth]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// A small deterministic generator (xorshift): the benchmarks' walks over VMs and
/// source addresses.
pub struct Walk(pub u64);

impl Walk {
    /// The next 64 bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// The next number below `n`.
    pub fn next(&mut self, n: usize) -> usize {
        (self.bits() % n as u64) as usize
    }
}

/// The `jitgate` binary the benchmarks run: `$JITGATE_BIN`, else the one beside this
/// benchmark binary.
pub fn jitgate_exe() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("JITGATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let exe = me.with_file_name("jitgate");
    anyhow::ensure!(
        exe.is_file(),
        "no jitgate binary at {} (build it: cargo build --release -p jitgate -p jitgate-bench, or set JITGATE_BIN)",
        exe.display()
    );
    Ok(exe)
}

/// Starts `jitgate serve` (the `jitgate` binary) and waits until it answers.
pub async fn controller(
    listen: SocketAddr,
    dir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<(Child, String, String)> {
    controller_with(listen, dir, http, &[]).await
}

/// [`controller`] with more `serve` arguments (`--database URL`).
pub async fn controller_with(
    listen: SocketAddr,
    dir: &Path,
    http: &reqwest::Client,
    extra: &[&str],
) -> anyhow::Result<(Child, String, String)> {
    let exe = jitgate_exe()?;
    let child = Command::new(exe)
        .args([
            "serve",
            "--insecure-http",
            "--listen",
            &listen.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .args(extra)
        .env("JITGATE_BOOTSTRAP_TOKEN", BENCH_TOKEN)
        .env("JITGATE_LOG", "warn")
        // As the systemd unit runs it (deploy/jitgate-controller.service).
        .env("MALLOC_ARENA_MAX", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the controller")?;
    let child = Child(child);
    let base = format!("http://{listen}");
    let started = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("{base}/api/v1/whoami"))
            .bearer_auth(BENCH_TOKEN)
            .send()
            .await
            && r.status().is_success()
        {
            let who: serde_json::Value = r.json().await?;
            let sub = who["subscription"]
                .as_str()
                .context("no subscription")?
                .to_owned();
            return Ok((child, base, sub));
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the controller did not start within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new enrollment token for `uses` agents, through the API.
pub async fn enroll_token(
    http: &reqwest::Client,
    base: &str,
    uses: usize,
) -> anyhow::Result<String> {
    let et: serde_json::Value = http
        .post(format!("{base}/api/v1/enrollTokens"))
        .bearer_auth(BENCH_TOKEN)
        .json(&serde_json::json!({ "uses": uses }))
        .send()
        .await?
        .json()
        .await?;
    Ok(et["token"]
        .as_str()
        .context("no enrollment token")?
        .to_owned())
}

/// Sends an Azure initiate for `policy` (the policy's URL) as the bench Owner; fails
/// unless it is accepted (202).
pub async fn initiate(
    http: &reqwest::Client,
    policy: &str,
    body: &serde_json::Value,
) -> anyhow::Result<reqwest::Response> {
    let r = http
        .post(format!("{policy}/initiate?api-version=2020-01-01"))
        .bearer_auth(BENCH_TOKEN)
        .json(body)
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        bail!("initiate: {}", r.text().await?);
    }
    Ok(r)
}

pub fn free_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Raises the open-files soft limit to the hard limit (many connections).
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
