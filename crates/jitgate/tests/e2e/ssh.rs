//! `jitgate ssh` against a real OpenSSH server (issue 4): Debian's sshd listens on
//! port 22 of the VM's namespace behind the real agent; from client A's namespace
//! `jitgate ssh` asks for access, waits until the port opens and execs `ssh`, which
//! runs a remote command with a test key in batch mode. The same `ssh` without
//! jitgate times out before the grant and after it ends, and from client B always.
//!
//! sshd is started by the test itself (never the system service), with its own
//! configuration, host key and authorized keys in a temporary directory, and killed
//! when the test ends.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::{Host, Lab, OWNER, Ran, SSH, in_ns, instant_of, run, run_in_ns, sleep_until};

const SSHD: &str = "/usr/sbin/sshd";
/// What the remote command prints through jitgate, and without it.
const VIA_JITGATE: &str = "jitgate-ssh-ok";
const PLAIN: &str = "plain-ssh-ok";

/// Fails (never skips) when OpenSSH is missing, naming the package to install.
fn require_openssh() {
    let on_path = |bin: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
    };
    assert!(
        Path::new(SSHD).is_file(),
        "{SSHD} is missing: install the Debian package openssh-server \
         (apt-get install -y openssh-server, or scripts/setup-deps.sh)"
    );
    for bin in ["ssh", "ssh-keygen"] {
        assert!(
            on_path(bin),
            "`{bin}` is not on PATH: install the Debian package openssh-client \
             (apt-get install -y openssh-client, or scripts/setup-deps.sh)"
        );
    }
}

/// A real sshd in the VM's namespace, on port 22 of every address, accepting one
/// test key for root (the tests run as root).
struct Sshd {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Sshd {
    fn start(lab: &Lab) -> Sshd {
        require_openssh();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-sshd-", lab.id))
            .tempdir()
            .unwrap();
        let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        for key in ["host_ed25519", "client_ed25519"] {
            run(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-C", key, "-f", &p(key)],
            );
        }
        std::fs::copy(p("client_ed25519.pub"), p("authorized_keys")).unwrap();
        let config = format!(
            "Port {SSH}\n\
             ListenAddress 0.0.0.0\n\
             ListenAddress ::\n\
             HostKey {host}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {keys}\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             PrintMotd no\n\
             LogLevel VERBOSE\n",
            host = p("host_ed25519"),
            pid = p("sshd.pid"),
            keys = p("authorized_keys"),
        );
        std::fs::write(p("sshd_config"), config).unwrap();
        // The privilege-separation directory (in the shared root filesystem).
        if !Path::new("/run/sshd").exists() {
            std::fs::create_dir_all("/run/sshd").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        run(SSHD, &["-t", "-f", &p("sshd_config")]);
        let log = std::fs::File::create(p("sshd.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.vm.ns, SSHD, "-D", "-e"])
            .args(["-f", &p("sshd_config")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
        let mut sshd = Sshd {
            child: Some(child),
            dir,
        };
        // Ready when it sends its banner on the VM's own loopback.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = sshd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("sshd exited with {status}:\n{}", sshd.log());
            }
            if in_ns(&lab.vm.ns, banner) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not answer on port {SSH} within 10 s:\n{}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd
    }

    /// The client's private key.
    fn key(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

/// Whether an SSH server answers with its banner on 127.0.0.1:22 (of this thread's
/// namespace).
fn banner() -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], SSH).into();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0-"
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- sshd log:\n{}", self.log());
        }
    }
}

/// The ssh options of every connection: the test key, batch mode, no host key
/// checks or user configuration, and a 3 s connect timeout.
fn ssh_options(sshd: &Sshd) -> Vec<String> {
    let key = sshd.key().to_str().unwrap().to_owned();
    [
        "-i",
        &key,
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=3",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// `ssh root@<vm IPv4> echo plain-ssh-ok` from `from`, without jitgate.
fn plain_ssh(lab: &Lab, sshd: &Sshd, from: &Host) -> Ran {
    let opts = ssh_options(sshd);
    let dest = format!("root@{}", lab.vm.v4);
    let mut args: Vec<&str> = opts.iter().map(String::as_str).collect();
    args.extend([dest.as_str(), "echo", PLAIN]);
    run_in_ns(&from.ns, "ssh", &args, &[], Duration::from_secs(20))
}

/// `jitgate ssh root@vm1 --host <vm IPv4> --wait 10 -- <options> echo jitgate-ssh-ok`
/// from `from`, as the Owner.
fn jitgate_ssh(lab: &Lab, sshd: &Sshd, from: &Host) -> Ran {
    jitgate_ssh_with(lab, sshd, from, &[])
}

/// `jitgate_ssh` with more jitgate flags (before `--`).
fn jitgate_ssh_with(lab: &Lab, sshd: &Sshd, from: &Host, flags: &[&str]) -> Ran {
    let host = lab.vm.v4.to_string();
    let opts = ssh_options(sshd);
    let mut args = vec!["ssh", "root@vm1", "--host", &host, "--wait", "10"];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend(opts.iter().map(String::as_str));
    args.extend(["echo", VIA_JITGATE]);
    lab.jitgate(from, OWNER, &args)
}

fn assert_logged_in(r: &Ran, marker: &str, what: &str) {
    assert!(
        r.success() && r.stdout.lines().any(|l| l.trim() == marker),
        "{what}: the remote command did not run: {r}"
    );
}

fn assert_timed_out(r: &Ran, what: &str) {
    assert!(
        !r.success() && r.stderr.to_ascii_lowercase().contains("timed out"),
        "{what}: expected ssh to fail with a connection timeout: {r}"
    );
    assert!(
        !r.stdout.contains(PLAIN),
        "{what}: the remote command ran: {r}"
    );
}

/// Plain ssh from A and from B at the same time (each failure costs the 3 s
/// connect timeout).
fn plain_ssh_a_and_b(lab: &Lab, sshd: &Sshd) -> (Ran, Ran) {
    std::thread::scope(|s| {
        let a = s.spawn(|| plain_ssh(lab, sshd, &lab.a));
        let b = s.spawn(|| plain_ssh(lab, sshd, &lab.b));
        (a.join().unwrap(), b.join().unwrap())
    })
}

fn requests(lab: &Lab) -> Vec<Value> {
    let r = lab.admin("GET", "/api/v1/requests?limit=100", None);
    assert_eq!(r.status, 200, "GET requests: {:?}", r.body);
    r.body["value"].as_array().unwrap().clone()
}

fn port_status(request: &Value) -> (String, String) {
    let p = &request["virtualMachines"][0]["ports"][0];
    (
        p["status"].as_str().unwrap_or_default().to_owned(),
        p["statusReason"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn jitgate_ssh_through_real_sshd_while_plain_ssh_fails_before_and_after_the_grant() {
    require_openssh();
    let lab = Lab::builder().without_echo_on_ssh().start();
    let sshd = Sshd::start(&lab);
    let a = &lab.a;

    // Without JIT sshd answers everyone: the key, the options and the server work.
    assert_logged_in(&plain_ssh(&lab, &sshd, a), PLAIN, "plain ssh before JIT");

    // An admin protects port 22 (the real binary, from the controller's host).
    let r = lab
        .jitgate(&lab.ctl, OWNER, &["enable", "vm1", "--port", "22"])
        .expect_ok();
    assert!(r.stdout.contains("JIT enabled on lab/vm1: ports 22"), "{r}");
    lab.wait_agent_up_to_date();
    // `jitgate status` counts the real agent as online (issue 9.7).
    let r = lab
        .jitgate(&lab.ctl, OWNER, &["status", "--json"])
        .expect_ok();
    let status: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {r}"));
    assert_eq!(status["agents"]["online"], 1, "{status}");
    assert_eq!(status["audit"]["ok"], true, "{status}");
    let (ra, rb) = plain_ssh_a_and_b(&lab, &sshd);
    assert_timed_out(&ra, "plain ssh from A before any grant");
    assert_timed_out(&rb, "plain ssh from B before any grant");
    assert!(
        requests(&lab).is_empty(),
        "a request exists before jitgate ssh"
    );

    // jitgate ssh: requests access from A's address, waits, execs ssh.
    let r = jitgate_ssh(&lab, &sshd, a);
    assert_logged_in(&r, VIA_JITGATE, "jitgate ssh");
    assert!(
        r.stderr
            .contains(&format!("granted port 22 on lab/vm1 from {}", a.v4)),
        "jitgate ssh did not say what it was granted: {r}"
    );
    let all = requests(&lab);
    assert_eq!(all.len(), 1, "one request after jitgate ssh: {all:?}");
    let first = all[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        all[0]["virtualMachines"][0]["ports"][0]["allowedSourceAddressPrefix"],
        a.v4.to_string(),
        "the grant is for A's address: {all:?}"
    );

    // While the grant lives: plain ssh works from A, not from B.
    let (ra, rb) = plain_ssh_a_and_b(&lab, &sshd);
    assert_logged_in(&ra, PLAIN, "plain ssh from A during the grant");
    assert_timed_out(&rb, "plain ssh from B during A's grant");

    // A second jitgate ssh reuses the live grant: no new request.
    let r = jitgate_ssh(&lab, &sshd, a);
    assert_logged_in(&r, VIA_JITGATE, "the second jitgate ssh");
    assert!(r.stderr.contains("reusing"), "no grant reuse: {r}");
    assert_eq!(
        requests(&lab).len(),
        1,
        "the second jitgate ssh asked again"
    );

    // A short grant for the same source supersedes the long one; once it ends,
    // plain ssh from A fails again.
    let r = lab
        .jitgate(
            a,
            OWNER,
            &["request", "vm1", "--port", "22", "--for", "5s", "--json"],
        )
        .expect_ok();
    let out: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("request --json is not JSON ({e}): {r}"));
    let port = &out["requests"][0]["granted"]["virtualMachines"][0]["ports"][0];
    let end = instant_of(port["endTimeUtc"].as_str().unwrap());
    assert_eq!(
        port["allowedSourceAddressPrefix"],
        a.v4.to_string(),
        "{out}"
    );
    let all = requests(&lab);
    let old = all.iter().find(|q| q["id"] == first.as_str()).unwrap();
    assert_eq!(
        port_status(old),
        ("Revoked".to_owned(), "NewerRequestInitiated".to_owned()),
        "the long grant was not superseded: {old}"
    );
    lab.wait_agent_up_to_date();
    assert_logged_in(
        &plain_ssh(&lab, &sshd, a),
        PLAIN,
        "plain ssh from A during the short grant",
    );
    assert!(
        Instant::now() < end,
        "the 5 s grant ended before the test could use it"
    );
    sleep_until(end + Duration::from_millis(300));
    let (ra, rb) = plain_ssh_a_and_b(&lab, &sshd);
    assert_timed_out(&ra, "plain ssh from A after the grant ended");
    assert_timed_out(&rb, "plain ssh from B after the grant ended");

    // --revoke-on-exit (issue 9.7): jitgate stays ssh's parent and revokes the grant
    // when ssh exits, so the port closes long before the grant's 10 minutes are up.
    let r = jitgate_ssh_with(&lab, &sshd, a, &["--for", "10m", "--revoke-on-exit"]);
    assert_logged_in(&r, VIA_JITGATE, "jitgate ssh --revoke-on-exit");
    assert!(
        r.stderr.contains("ssh exited; revoked request"),
        "jitgate ssh --revoke-on-exit did not revoke: {r}"
    );
    lab.wait_agent_up_to_date();
    assert_timed_out(
        &plain_ssh(&lab, &sshd, a),
        "plain ssh from A after jitgate ssh --revoke-on-exit",
    );
}
