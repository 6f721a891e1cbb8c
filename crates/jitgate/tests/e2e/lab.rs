//! The network-namespace lab: a bridge in a "lan" namespace and four hosts plugged
//! into it (controller, protected VM, client A, client B), each its own network
//! namespace with IPv4 and IPv6 addresses. The real `jitgate serve` runs in the
//! controller's namespace, the real `jitgate agent` in the VM's; echo services and
//! probes run on threads of this test process that have entered a namespace
//! (`setns` changes only the calling thread, and a socket lives in the namespace it
//! was created in).
//!
//! [`Lab::builder`] makes variants (port 22 left free for a real sshd, extra flags
//! for `jitgate serve`); [`Lab::jitgate`] runs the real client in a host's namespace
//! and [`run_in_ns`] any other program, each with a deadline.
//!
//! Every lab has unique namespace names (`jge2e<pid>x<n>-<host>`; interface names
//! are fixed and per namespace, so they never collide) and is torn down on drop:
//! services stopped, child processes killed, namespaces deleted. The host's root
//! namespace is never changed.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use serde_json::{Value, json};

pub use crate::common::BIN;
/// The bootstrap Owner token every lab's controller starts with.
pub const OWNER: &str = "jg-e2e-owner-token-0123456789abcdef";
pub const RG: &str = "lab";
pub const VM: &str = "vm1";
pub const LOCATION: &str = "westeurope";
pub const POLICY: &str = "default";
/// The protected TCP service.
pub const SSH: u16 = 22;
/// An unprotected TCP service.
pub const WEB: u16 = 8080;
/// The protected UDP service.
pub const DNS: u16 = 5353;
/// Where the controller listens inside its namespace.
const CTL_PORT: u16 = 8080;
/// A probe expected to fail: a dropped SYN shows as a timeout (no SYN retransmit
/// happens within it, so a port opening meanwhile cannot turn it into a success).
pub const CLOSED_PROBE: Duration = Duration::from_millis(300);
/// A probe expected to succeed; generous, a local handshake takes microseconds.
pub const OPEN_PROBE: Duration = Duration::from_millis(900);

static LABS: AtomicU32 = AtomicU32::new(0);
static SWEEP: std::sync::Once = std::sync::Once::new();

// ---- preconditions and commands -------------------------------------------------------------

/// Fails (never skips) when the lab cannot be built, naming what to install.
pub fn preconditions() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_owned();
    assert!(
        euid == "0",
        "the end-to-end tests build network namespaces and nftables tables and must run as root \
         (effective uid is {euid}); run e.g. `sudo -E cargo test -p jitgate --test e2e`"
    );
    for (bin, arg, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        match Command::new(bin).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`{bin} {arg}` failed ({}): {}; install or repair the Debian package {package} \
                 (apt-get install -y {package})",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!(
                "`{bin}` is not runnable ({e}); install the Debian package {package} \
                 (apt-get install -y {package})"
            ),
        }
    }
}

/// Deletes the namespaces of labs whose test process is gone (killed before its labs
/// were dropped). Only names of this suite's scheme (`jge2e<pid>x<n>-<host>`) are
/// touched.
fn sweep_stale_labs() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("jge2e")
            .and_then(|r| r.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    assert!(
        out.status.success(),
        "`{bin} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_stdin(bin: &str, args: &[&str], input: &str) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    crate::common::feed_stdin(&mut child, input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "`{bin} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// What a command run to completion printed, and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics unless the command succeeded; returns it for further checks.
    pub fn expect_ok(self) -> Ran {
        assert!(self.success(), "{self}");
        self
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` ended with {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `program args` inside network namespace `ns` (`ip netns exec`, which execs
/// the program: the child is the program itself) with these environment variables
/// added, to completion. Kills it and panics when it has not ended within `within`.
pub fn run_in_ns(
    ns: &str,
    program: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    within: Duration,
) -> Ran {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_bounded(
        cmd,
        format!("ip netns exec {ns} {program} {}", args.join(" ")),
        within,
    )
}

/// Runs `cmd` to completion (standard input empty, outputs captured); kills it and
/// panics when it has not ended within `within`.
fn run_bounded(mut cmd: Command, what: String, within: Duration) -> Ran {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let ran = Ran {
                what,
                status,
                stdout: out.join().unwrap_or_default(),
                stderr: err.join().unwrap_or_default(),
            };
            panic!("killed after {within:?}: {ran}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ran {
        what,
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns`, and returns its
/// result (a panic in `f` is a panic here).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// Polls `cond` until it holds; panics naming `what` if it does not within `within`.
/// A check that starts before the deadline counts.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// The monotonic instant of a wall-clock RFC 3339 timestamp (the controller runs on
/// this machine's clock).
pub fn instant_of(ts: &str) -> Instant {
    let t: jiff::Timestamp = ts
        .parse()
        .unwrap_or_else(|e| panic!("'{ts}' is not a timestamp: {e}"));
    let ms = t.duration_since(jiff::Timestamp::now()).as_millis();
    let now = Instant::now();
    if ms >= 0 {
        now + Duration::from_millis(ms as u64)
    } else {
        now - Duration::from_millis((-ms) as u64)
    }
}

// ---- hosts and probes -----------------------------------------------------------------------

/// One namespace plugged into the lab's bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub role: &'static str,
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Host {
    pub fn v4_at(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.v4), port)
    }

    pub fn v6_at(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.v6), port)
    }

    /// A TCP connection from this host, or None when it is not established within
    /// `timeout`.
    pub fn connect_within(&self, dst: SocketAddr, timeout: Duration) -> Option<TcpStream> {
        in_ns(&self.ns, || TcpStream::connect_timeout(&dst, timeout).ok())
    }

    /// Whether a new TCP connection from this host to `dst` is established within
    /// [`CLOSED_PROBE`].
    pub fn tcp_open(&self, dst: SocketAddr) -> bool {
        self.connect_within(dst, CLOSED_PROBE).is_some()
    }

    /// A connection that must succeed; checks that the echo service answers on it.
    pub fn connect(&self, dst: SocketAddr) -> TcpStream {
        let mut s = self
            .connect_within(dst, OPEN_PROBE)
            .unwrap_or_else(|| panic!("{} cannot connect to {dst}", self.role));
        assert_eq!(echo(&mut s, b"hello\n"), b"hello\n");
        s
    }

    /// Whether the UDP echo service at `dst` answers a datagram from a new socket (a
    /// new source port: an old one would ride on its conntrack entry).
    pub fn udp_echo(&self, dst: SocketAddr) -> bool {
        in_ns(&self.ns, || {
            let bind: SocketAddr = match dst {
                SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
                SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
            };
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(CLOSED_PROBE)).unwrap();
            s.send_to(b"ping", dst).unwrap();
            let mut buf = [0u8; 64];
            matches!(s.recv_from(&mut buf), Ok((4, _))) && &buf[..4] == b"ping"
        })
    }

    /// Waits until a new TCP connection from this host to `dst` succeeds.
    pub fn wait_tcp_open(&self, dst: SocketAddr, within: Duration) {
        wait_for(
            &format!("{} to connect to {dst}", self.role),
            within,
            || self.tcp_open(dst),
        );
    }

    /// Waits until new TCP connections from this host to `dst` fail.
    pub fn wait_tcp_closed(&self, dst: SocketAddr, within: Duration) {
        wait_for(
            &format!("{} to be refused at {dst}", self.role),
            within,
            || !self.tcp_open(dst),
        );
    }
}

/// Writes `msg` and reads the same number of bytes back.
pub fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    buf
}

// ---- echo services --------------------------------------------------------------------------

struct Services {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Services {
    fn start(ns: &str, tcp: &[u16], udp: &[u16]) -> Services {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in tcp {
            threads.push(tcp_echo(ns, port, stop.clone()));
        }
        for &port in udp {
            threads.push(udp_echo(ns, port, stop.clone()));
        }
        Services { stop, threads }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Spawns `serve` on a thread in `ns` after it has bound its socket.
fn service(
    ns: &str,
    bind: impl FnOnce() -> std::io::Result<Box<dyn FnOnce() + Send>> + Send + 'static,
) -> JoinHandle<()> {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        enter(&path);
        match bind() {
            Ok(serve) => {
                let _ = tx.send(Ok(()));
                serve();
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    rx.recv()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start a service in {ns}: {e}"));
    t
}

/// A TCP echo service on `[::]:port` (dual-stack).
fn tcp_echo(ns: &str, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    service(ns, move || {
        let l = TcpListener::bind(("::", port))?;
        l.set_nonblocking(true)?;
        Ok(Box::new(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((conn, _)) => {
                        let stop = stop.clone();
                        std::thread::spawn(move || echo_conn(conn, &stop));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }))
    })
}

fn echo_conn(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A UDP echo service on `[::]:port` (dual-stack).
fn udp_echo(ns: &str, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    service(ns, move || {
        let s = UdpSocket::bind(("::", port))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Box::new(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        }))
    })
}

// ---- HTTP -----------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

/// An HTTP client for the lab's controller: trusts the certificates in `ca` when it
/// serves HTTPS.
pub fn api_client(ca: Option<&Path>) -> reqwest::Client {
    let mut c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10));
    if let Some(ca) = ca {
        let anchors = jitgate_proto::tls::certs_from_pem(&std::fs::read(ca).unwrap()).unwrap();
        c = c.tls_backend_preconfigured(
            jitgate_proto::tls::PinnedVerifier::new(anchors, Vec::new())
                .client_config()
                .unwrap(),
        );
    }
    c.build().unwrap()
}

/// One HTTP call made from namespace `ns` (so the controller sees that host's address).
/// To a controller serving HTTPS, it trusts the certificates in `ca` (a PEM file: its
/// CA, or its self-signed certificate, pinned).
pub fn http_ca(
    ns: &str,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
    ca: Option<&Path>,
) -> Resp {
    in_ns(ns, || {
        crate::common::block_on(async {
            let c = api_client(ca);
            let mut req = c.request(method.parse().unwrap(), url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let text = r.text().await.unwrap();
            let body = if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            };
            Resp {
                status,
                body,
                headers,
            }
        })
    })
}

// ---- the lab --------------------------------------------------------------------------------

/// An access request as initiated.
#[derive(Debug)]
pub struct Initiated {
    pub id: String,
    pub body: Value,
    /// End of each requested port, in request order.
    pub ends: Vec<Instant>,
    pub end_times: Vec<String>,
}

impl Initiated {
    pub fn end(&self) -> Instant {
        self.ends[0]
    }
}

pub struct Lab {
    pub id: String,
    dir: tempfile::TempDir,
    lan: String,
    pub ctl: Host,
    pub vm: Host,
    pub a: Host,
    pub b: Host,
    controller: Option<Child>,
    pub agent: Option<Child>,
    services: Services,
    enroll_token: String,
    pub sub: String,
    /// `nft list tables` in the VM's namespace before the agent first started.
    pub tables_before: String,
    /// Extra flags of every `jitgate serve` this lab starts.
    serve_args: Vec<String>,
    /// Extra flags of every `jitgate agent` this lab starts from now on.
    pub agent_args: Vec<String>,
    /// Extra environment of every `jitgate agent` this lab starts from now on.
    pub agent_env: Vec<(&'static str, String)>,
    /// The subcommand the lab's agent runs: `agent`, or `gateway` (the VM's namespace
    /// is then the gateway of the hosts made by [`Lab::behind`]).
    pub agent_cmd: &'static str,
    /// The binary the agent runs (default: the binary under test).
    pub agent_bin: PathBuf,
    /// Namespaces and services made after the start ([`Lab::behind`]).
    extra_ns: Vec<String>,
    extra_services: Vec<Services>,
    pub tls: LabTls,
    /// The PEM file clients trust when the controller serves HTTPS.
    pub ca: Option<PathBuf>,
}

/// How the lab's controller serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabTls {
    /// Plain HTTP (`--insecure-http`).
    Off,
    /// HTTPS with the controller's own CA (no certificate given, no `--insecure-http`).
    Auto,
    /// HTTPS with a given certificate and key (`--tls-cert`, `--tls-key`).
    Given { cert: PathBuf, key: PathBuf },
}

/// A lab other than the default one: see [`Lab::builder`].
#[derive(Clone, Debug)]
pub struct LabBuilder {
    echo_on_ssh: bool,
    serve_args: Vec<String>,
    tls: LabTls,
}

impl LabBuilder {
    /// No TCP echo service on the VM's port 22: it stays free (for a real sshd), or
    /// the VM listens on no management port at all.
    pub fn without_echo_on_ssh(mut self) -> Self {
        self.echo_on_ssh = false;
        self
    }

    /// Extra flags for `jitgate serve` (kept for restarts), e.g.
    /// `["--agent-offline-after", "3"]`.
    pub fn serve_args(mut self, args: &[&str]) -> Self {
        self.serve_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// How the controller serves (default: plain HTTP).
    pub fn tls(mut self, tls: LabTls) -> Self {
        self.tls = tls;
        self
    }

    /// Builds and starts the lab, as [`Lab::start`] does.
    pub fn start(self) -> Lab {
        Lab::start_with(self)
    }
}

impl Lab {
    /// Builds the namespaces, starts the echo services, the controller and the agent,
    /// and waits until the agent has enrolled and applied its first desired state.
    pub fn start() -> Lab {
        Lab::builder().start()
    }

    /// The default lab, to be changed before [`LabBuilder::start`].
    pub fn builder() -> LabBuilder {
        LabBuilder {
            echo_on_ssh: true,
            serve_args: Vec::new(),
            tls: LabTls::Off,
        }
    }

    fn start_with(options: LabBuilder) -> Lab {
        preconditions();
        SWEEP.call_once(sweep_stale_labs);
        let n = LABS.fetch_add(1, Ordering::SeqCst) + 1;
        let id = format!("jge2e{}x{n}", std::process::id());
        let net = n % 250 + 1;
        let host = |role: &'static str, i: u8| Host {
            role,
            ns: format!("{id}-{role}"),
            v4: Ipv4Addr::new(10, 77, net as u8, i),
            v6: format!("fd00:77:{net}::{i}").parse().unwrap(),
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .unwrap();
        let mut lab = Lab {
            lan: format!("{id}-lan"),
            ctl: host("ctl", 1),
            vm: host("vm", 2),
            a: host("ca", 3),
            b: host("cb", 4),
            id,
            dir,
            controller: None,
            agent: None,
            services: Services {
                stop: Arc::new(AtomicBool::new(false)),
                threads: Vec::new(),
            },
            enroll_token: String::new(),
            sub: String::new(),
            tables_before: String::new(),
            serve_args: options.serve_args,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            agent_cmd: "agent",
            agent_bin: PathBuf::from(BIN),
            extra_ns: Vec::new(),
            extra_services: Vec::new(),
            ca: match &options.tls {
                LabTls::Given { cert, .. } => Some(cert.clone()),
                _ => None,
            },
            tls: options.tls,
        };
        lab.build_network();
        // Something of the host's own in the VM's nftables, which jitgate must leave
        // alone: a table with a regular chain (no hook, so no effect on traffic).
        run_stdin(
            "ip",
            &["netns", "exec", &lab.vm.ns, "nft", "-f", "-"],
            "table ip e2e_other {\n\tchain keep {\n\t\tcounter accept\n\t}\n}\n",
        );
        lab.tables_before = lab.nft(&["list", "tables"]);
        let tcp: &[u16] = if options.echo_on_ssh {
            &[SSH, WEB]
        } else {
            &[WEB]
        };
        lab.services = Services::start(&lab.vm.ns, tcp, &[DNS]);

        lab.start_controller();
        let who = lab.admin("GET", "/api/v1/whoami", None);
        assert_eq!(who.status, 200, "whoami: {:?}", who.body);
        lab.sub = who.body["subscription"].as_str().unwrap().to_owned();
        let t = lab.admin(
            "POST",
            "/api/v1/enrollTokens",
            Some(json!({"uses": 1, "expiresIn": "PT1H", "description": "e2e"})),
        );
        assert_eq!(t.status, 201, "enroll token: {:?}", t.body);
        lab.enroll_token = t.body["token"].as_str().unwrap().to_owned();
        assert!(lab.enroll_token.starts_with("je_"));
        lab.start_agent();
        lab.wait_agent_up_to_date();
        lab
    }

    fn ip(&self, args: &[&str]) {
        run("ip", args);
    }

    fn build_network(&self) {
        let all = [&self.lan, &self.ctl.ns, &self.vm.ns, &self.a.ns, &self.b.ns];
        for ns in all {
            self.ip(&["netns", "add", ns]);
            self.ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let lan = self.lan.as_str();
        self.ip(&[
            "-n",
            lan,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ]);
        self.ip(&["-n", lan, "link", "set", "br0", "up"]);
        for h in [&self.ctl, &self.vm, &self.a, &self.b] {
            let port = format!("p-{}", h.role);
            // Created inside the lan namespace, its peer straight in the host's: nothing
            // ever appears in the root namespace.
            self.ip(&[
                "-n", lan, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &h.ns,
            ]);
            self.ip(&["-n", lan, "link", "set", &port, "master", "br0", "up"]);
            self.ip(&[
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/24", h.v4),
                "dev",
                "eth0",
            ]);
            self.ip(&[
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/64", h.v6),
                "dev",
                "eth0",
                "nodad",
            ]);
            self.ip(&["-n", &h.ns, "link", "set", "eth0", "up"]);
        }
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.dir.path().join(format!("{what}.log"))
    }

    fn spawn_in(&self, ns: &str, args: &[&str], envs: &[(&str, &str)], log: &Path) -> Child {
        self.spawn_bin_in(BIN, ns, args, envs, log)
    }

    fn spawn_bin_in(
        &self,
        bin: &str,
        ns: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Child {
        let out = File::options().create(true).append(true).open(log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, bin])
            .args(args)
            .env("JITGATE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }

    pub fn base(&self) -> String {
        let scheme = if self.tls == LabTls::Off {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", self.ctl.v4_at(CTL_PORT))
    }

    /// The controller's data directory.
    pub fn controller_data(&self) -> PathBuf {
        self.dir.path().join("controller")
    }

    /// The lab's scratch directory (removed with the lab).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts (or restarts, on the same data) the controller and waits until it listens.
    pub fn start_controller(&mut self) {
        assert!(self.controller.is_none(), "the controller is running");
        let data = self.dir.path().join("controller");
        let listen = self.ctl.v4_at(CTL_PORT).to_string();
        let mut args = vec![
            "serve",
            "--listen",
            listen.as_str(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        let tls = self.tls.clone();
        match &tls {
            LabTls::Off => args.push("--insecure-http"),
            LabTls::Auto => {}
            LabTls::Given { cert, key } => args.extend([
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ]),
        }
        args.extend(self.serve_args.iter().map(String::as_str));
        let child = self.spawn_in(
            &self.ctl.ns.clone(),
            &args,
            &[("JITGATE_BOOTSTRAP_TOKEN", OWNER)],
            &self.log_path("controller"),
        );
        self.controller = Some(child);
        let addr = self.ctl.v4_at(CTL_PORT);
        wait_for("the controller to listen", Duration::from_secs(15), || {
            if let Some(status) = self.controller.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the controller exited with {status}:\n{}",
                    self.log_tail("controller")
                );
            }
            self.ctl.tcp_open(addr)
        });
        if self.tls == LabTls::Auto {
            self.ca = Some(data.join("tls").join("ca.pem"));
        }
    }

    /// Starts (or restarts, with the same state directory) the agent. Waits only for
    /// the process to start.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent is running");
        let state = self.agent_state_dir();
        let controller = self.base();
        let bin = self.agent_bin.to_str().unwrap().to_owned();
        let child = self.spawn_bin_in(
            &bin,
            &self.vm.ns.clone(),
            &[
                self.agent_cmd,
                "--controller",
                &controller,
                "--enroll-token",
                &self.enroll_token.clone(),
                "--resource-group",
                RG,
                "--name",
                VM,
                "--state-dir",
                state.to_str().unwrap(),
                "--heartbeat-secs",
                "1",
            ]
            .into_iter()
            .chain(self.agent_args.iter().map(String::as_str))
            .collect::<Vec<_>>(),
            &self
                .agent_env
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
            &self.log_path("agent"),
        );
        self.agent = Some(child);
    }

    /// Runs the real `jitgate` client with `args` in `from`'s namespace, against this
    /// lab's controller with `token` (`JITGATE_URL`, `JITGATE_TOKEN`, and a
    /// configuration directory of the lab's, so nothing of the caller's leaks in).
    /// Killed (and a panic) after 30 s.
    pub fn jitgate(&self, from: &Host, token: &str, args: &[&str]) -> Ran {
        let config = self.dir.path().join(format!("cli-{}", from.role));
        std::fs::create_dir_all(&config).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &from.ns, BIN])
            .args(args)
            .env("JITGATE_URL", self.base())
            .env("JITGATE_TOKEN", token)
            .env("JITGATE_CONFIG_DIR", &config)
            .env("NO_COLOR", "1")
            .env_remove("JITGATE_CA_CERT")
            .env_remove("JITGATE_LOG");
        if let Some(ca) = &self.ca {
            cmd.env("JITGATE_CA_CERT", ca);
        }
        run_bounded(
            cmd,
            format!("jitgate {} (in {})", args.join(" "), from.role),
            Duration::from_secs(30),
        )
    }

    pub fn agent_state_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// `kill -9` of the controller.
    pub fn kill_controller(&mut self) {
        let mut c = self.controller.take().expect("no controller running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// `kill -9` of the agent.
    pub fn kill_agent(&mut self) {
        let mut c = self.agent.take().expect("no agent running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Freezes the agent (SIGSTOP): it neither applies nor repairs until resumed, and
    /// the kernel keeps what it announces meanwhile in the agent's socket buffers.
    pub fn pause_agent(&self) {
        self.signal_agent(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused agent run again (SIGCONT).
    pub fn resume_agent(&self) {
        self.signal_agent(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal_agent(&self, signal: nix::sys::signal::Signal) {
        let c = self.agent.as_ref().expect("no agent running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal).unwrap();
    }

    /// SIGTERM to the agent; waits until it has exited (cleanly).
    pub fn stop_agent(&mut self) {
        let mut c = self.agent.take().expect("no agent running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the agent exited with {status} on SIGTERM:\n{}",
                    self.log_tail("agent")
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the agent did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole log of `what` (`agent`, `controller`).
    pub fn log(&self, what: &str) -> String {
        std::fs::read_to_string(self.log_path(what)).unwrap_or_default()
    }

    pub fn log_tail(&self, what: &str) -> String {
        let text = self.log(what);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `nft <args>` inside the VM's namespace.
    pub fn nft(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.vm.ns, "nft"];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// An API call from `from`'s namespace.
    pub fn call(
        &self,
        from: &Host,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        http_ca(
            &from.ns,
            method,
            &format!("{}{path}", self.base()),
            token,
            body,
            self.ca.as_deref(),
        )
    }

    /// An API call as the Owner, from the controller's own namespace.
    pub fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.call(&self.ctl, method, path, Some(OWNER), body)
    }

    pub fn vm_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/{VM}",
            self.sub
        )
    }

    pub fn policy_path(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{RG}/providers/Microsoft.Security/locations/{LOCATION}/jitNetworkAccessPolicies/{POLICY}",
            self.sub
        )
    }

    /// GET /api/v1/vms/lab/vm1.
    pub fn vm_view(&self) -> Value {
        let r = self.admin("GET", &format!("/api/v1/vms/{RG}/{VM}"), None);
        assert_eq!(r.status, 200, "GET vm: {:?}", r.body);
        r.body
    }

    /// GET /api/v1/vms/lab/vm1/nsg: the rules.
    pub fn nsg(&self) -> Vec<Value> {
        let r = self.admin("GET", &format!("/api/v1/vms/{RG}/{VM}/nsg"), None);
        assert_eq!(r.status, 200, "GET nsg: {:?}", r.body);
        r.body["rules"].as_array().unwrap().clone()
    }

    /// Waits until the agent reports it has applied the current desired state.
    pub fn wait_agent_up_to_date(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.admin("GET", &format!("/api/v1/vms/{RG}/{VM}"), None);
            if r.status == 200 && r.body["agent"]["upToDate"] == true {
                return;
            }
            let last = r.body;
            if let Some(c) = self.agent.as_ref() {
                assert!(
                    alive(c.id()),
                    "the agent has exited:\n{}",
                    self.log_tail("agent")
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not apply the desired state within 15 s; last view: {last}\nagent log:\n{}",
                self.log_tail("agent")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Puts the policy with `ports` for vm1 (Azure API) and waits until the agent has
    /// applied it.
    pub fn enable(&self, ports: Value) {
        let body = json!({
            "kind": "Basic",
            "properties": {"virtualMachines": [{"id": self.vm_id(), "ports": ports}]}
        });
        let r = self.admin(
            "PUT",
            &format!("{}?api-version=2020-01-01", self.policy_path()),
            Some(body),
        );
        assert_eq!(r.status, 200, "PUT policy: {:?}", r.body);
        self.wait_agent_up_to_date();
    }

    /// The usual policy: SSH over TCP and 5353 over UDP, requestable from anywhere.
    pub fn enable_default(&self) {
        self.enable(json!([
            {"number": SSH, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT1H"},
            {"number": DNS, "protocol": "UDP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT1H"},
        ]));
    }

    /// The Azure initiate path of the lab's policy.
    pub fn initiate_path(&self) -> String {
        format!("{}/initiate?api-version=2020-01-01", self.policy_path())
    }

    /// An initiate body for `ports` of vm1.
    pub fn initiate_body(&self, ports: Value) -> Value {
        json!({"virtualMachines": [{"id": self.vm_id(), "ports": ports}], "justification": "e2e"})
    }

    /// Initiates access to `ports` of vm1 as the Owner from `from`'s namespace (an
    /// omitted source is "my IP": `from`'s address). Expects 202.
    pub fn initiate(&self, from: &Host, ports: Value) -> Initiated {
        let r = self.call(
            from,
            "POST",
            &self.initiate_path(),
            Some(OWNER),
            Some(self.initiate_body(ports)),
        );
        assert_eq!(r.status, 202, "initiate: {:?}", r.body);
        let id = r.headers["x-jitgate-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let end_times: Vec<String> = r.body["virtualMachines"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["endTimeUtc"].as_str().unwrap().to_owned())
            .collect();
        Initiated {
            id,
            ends: end_times.iter().map(|t| instant_of(t)).collect(),
            end_times,
            body: r.body,
        }
    }

    /// A host behind the VM's namespace (which becomes a router, the gateway): its own
    /// network `10.78.<lab>.0/24` on a veth from the VM's namespace (`.1` there, `.5` on
    /// the host, whose default route is the gateway), TCP echo services on `tcp`, and a
    /// route to that network through the gateway on both clients. No agent runs there.
    pub fn behind(&mut self, role: &'static str, tcp: &[u16]) -> Host {
        let net = self.vm.v4.octets()[2];
        let host = Host {
            role,
            ns: format!("{}-{role}", self.id),
            v4: Ipv4Addr::new(10, 78, net, 5),
            v6: format!("fd00:78:{net}::5").parse().unwrap(),
        };
        let inside = format!("10.78.{net}.1");
        self.ip(&["netns", "add", &host.ns]);
        self.extra_ns.push(host.ns.clone());
        self.ip(&["-n", &host.ns, "link", "set", "lo", "up"]);
        self.ip(&[
            "-n",
            &self.vm.ns,
            "link",
            "add",
            "in0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.ns,
        ]);
        self.ip(&[
            "-n",
            &self.vm.ns,
            "addr",
            "add",
            &format!("{inside}/24"),
            "dev",
            "in0",
        ]);
        self.ip(&["-n", &self.vm.ns, "link", "set", "in0", "up"]);
        self.ip(&[
            "-n",
            &host.ns,
            "addr",
            "add",
            &format!("{}/24", host.v4),
            "dev",
            "eth0",
        ]);
        self.ip(&["-n", &host.ns, "link", "set", "eth0", "up"]);
        self.ip(&["-n", &host.ns, "route", "add", "default", "via", &inside]);
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.vm.ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        for c in [&self.a, &self.b] {
            self.ip(&[
                "-n",
                &c.ns,
                "route",
                "add",
                &format!("10.78.{net}.0/24"),
                "via",
                &self.vm.v4.to_string(),
            ]);
        }
        self.extra_services
            .push(Services::start(&host.ns, tcp, &[]));
        host
    }

    /// PUT a user NSG rule on vm1.
    pub fn put_rule(&self, name: &str, rule: Value) {
        let r = self.admin(
            "PUT",
            &format!("/api/v1/vms/{RG}/{VM}/nsg/rules/{name}"),
            Some(rule),
        );
        assert!(
            r.status == 200 || r.status == 201,
            "PUT rule {name}: {} {:?}",
            r.status,
            r.body
        );
    }
}

/// Whether process `pid` is running (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- lab {} failed; controller log tail:\n{}\n---- agent log tail:\n{}",
                self.id,
                self.log_tail("controller"),
                self.log_tail("agent")
            );
        }
        for c in [self.agent.take(), self.controller.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        self.services.stop();
        for s in &mut self.extra_services {
            s.stop();
        }
        for ns in self.extra_ns.iter().chain([
            &self.a.ns,
            &self.b.ns,
            &self.vm.ns,
            &self.ctl.ns,
            &self.lan,
        ]) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
