//! Onboarding in one line (issue 17): on a "fresh" machine (the VM namespace with its
//! own agent stopped, a root directory of its own, and a PATH holding only `curl`,
//! `sh` and the base tools of a Debian system), the line `jitgate enroll-token create
//! --print-install` prints installs the agent from a TLS controller with no CA file
//! copied by hand, enrolls it, and the machine is then protected like any other. A
//! wrong key pin or a tampered binary stops the script before anything is installed;
//! running the line again changes nothing; a non-Debian system is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::lab::{BIN, LOCATION, Lab, LabTls, OWNER, RG, SSH, run_in_ns, wait_for};

const NAME: &str = "fresh-1";

/// The tools a minimal Debian system has, and nothing of jitgate's: a directory of
/// links to use as the whole PATH.
fn minimal_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in [
        "sh",
        "curl",
        "id",
        "sed",
        "tr",
        "uname",
        "mktemp",
        "rm",
        "sha256sum",
        "cut",
        "chmod",
        "cat",
        "cmp",
        "mkdir",
        "dirname",
        "mv",
        "setsid",
        "sleep",
        "nft",
        "ip",
    ] {
        let found = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!("{tool} is not installed (scripts/setup-deps.sh installs it)")
            });
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }
    bin
}

/// A root directory for a machine of `os` (`debian` or another ID).
fn machine_root(dir: &Path, name: &str, os: &str) -> PathBuf {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        format!("PRETTY_NAME=\"{os} test\"\nID={os}\n"),
    )
    .unwrap();
    root
}

/// The agent the installer started in the background, stopped with the test.
struct Started(PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("run/jitgate-agent.pid")) {
            let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// Runs the printed line (as root: without `sudo`) in the VM's namespace.
fn run_line(lab: &Lab, line: &str, path: &Path, root: &Path) -> crate::lab::Ran {
    let line = line
        .strip_suffix("| sudo sh")
        .unwrap_or_else(|| panic!("the line does not end in '| sudo sh': {line}"));
    run_in_ns(
        &lab.vm.ns,
        "sh",
        &["-c", &format!("{line} | sh")],
        &[
            ("PATH", path.to_str().unwrap()),
            ("JITGATE_INSTALL_ROOT", root.to_str().unwrap()),
            ("JITGATE_VM_NAME", NAME),
        ],
        Duration::from_secs(120),
    )
}

/// A new install line from the command line, as an administrator prints it.
fn new_line(lab: &Lab) -> String {
    let ran = lab.jitgate(
        &lab.a,
        OWNER,
        &[
            "enroll-token",
            "create",
            "--resource-group",
            RG,
            "--print-install",
        ],
    );
    assert!(ran.success(), "{ran}");
    assert!(
        !ran.stdout.contains("je_"),
        "the token itself was printed: {ran}"
    );
    ran.stdout.trim().to_owned()
}

/// Every file under `root` except the agent's state and log (which it keeps
/// writing): path, mode and content hash.
fn snapshot(root: &Path) -> Vec<(String, u32, String)> {
    use sha2::Digest as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel.starts_with("var/lib/jitgate-agent") || rel.starts_with("var/log") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                todo.push(p);
            } else {
                let sum = hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()));
                out.push((rel, meta.permissions().mode() & 0o7777, sum));
            }
        }
    }
    out.sort();
    out
}

/// A lab whose TLS controller serves a copy of the binary under test (so a test can
/// tamper with it), without its debugging sections (a fifth of the size, the same
/// program); the copy's path.
fn serving_a_copy(scratch: &Path) -> (Lab, PathBuf) {
    let served = scratch.join("jitgate-served");
    let stripped = std::process::Command::new("objcopy")
        .args(["--strip-debug", BIN, served.to_str().unwrap()])
        .status()
        .expect("objcopy is missing: install binutils (scripts/setup-deps.sh does)");
    assert!(stripped.success());
    let lab = Lab::builder()
        .tls(LabTls::Auto)
        .serve_args(&["--agent-binary", served.to_str().unwrap()])
        .start();
    (lab, served)
}

fn is_empty(dir: &Path) -> bool {
    snapshot(dir).iter().all(|(p, _, _)| p == "etc/os-release")
}

#[test]
fn the_printed_line_installs_and_enrolls_a_fresh_machine_once_and_refuses_what_it_cannot_trust() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut lab, served) = serving_a_copy(scratch.path());
    lab.kill_agent();
    let path = minimal_path(scratch.path());

    // The line pins the controller's key, carries no token, and its code delivers
    // the token once.
    let line = new_line(&lab);
    assert!(
        line.starts_with("curl -fsS --insecure --pinnedpubkey 'sha256//")
            && line.contains("/install.sh?code="),
        "{line}"
    );

    // A wrong pin: curl refuses the controller before the script even starts.
    let wrong = {
        let start = line.find("sha256//").unwrap() + "sha256//".len();
        let mut l = line.clone();
        l.replace_range(start..start + 4, "AAAA");
        assert_ne!(l, line);
        l
    };
    let root_w = machine_root(scratch.path(), "wrong-pin", "debian");
    let ran = run_line(&lab, &wrong, &path, &root_w);
    assert!(
        ran.stderr.contains("pinned") || ran.stderr.contains("public key"),
        "curl did not refuse the key: {ran}"
    );
    assert!(is_empty(&root_w), "{:?}", snapshot(&root_w));

    // A non-Debian system is refused with a message saying why, nothing installed.
    let root_f = machine_root(scratch.path(), "fedora", "fedora");
    let ran = run_line(&lab, &line, &path, &root_f);
    assert!(!ran.success(), "{ran}");
    assert!(ran.stderr.contains("supports Debian"), "{ran}");
    assert!(is_empty(&root_f), "{:?}", snapshot(&root_f));

    // The real install, on a Debian machine.
    let line = new_line(&lab);
    let root = machine_root(scratch.path(), "machine", "debian");
    let _agent = Started(root.clone());
    let ran = run_line(&lab, &line, &path, &root);
    assert!(ran.success(), "{ran}");
    for want in [
        "usr/local/bin/jitgate: written",
        "jitgate-agent.service: written",
        "jitgate-agent-restore.service: written",
        "etc/jitgate/agent.env: written",
        "enrolled with https://",
    ] {
        assert!(ran.stdout.contains(want), "no '{want}' in: {ran}");
    }
    let installed = std::fs::read(root.join("usr/local/bin/jitgate")).unwrap();
    assert_eq!(installed, std::fs::read(&served).unwrap());
    let files = snapshot(&root);
    let mode = |p: &str| files.iter().find(|f| f.0 == p).map(|f| f.1);
    assert_eq!(mode("etc/jitgate/agent.env"), Some(0o600), "{files:?}");
    assert_eq!(mode("usr/local/bin/jitgate"), Some(0o755), "{files:?}");
    assert!(
        !root.join("etc/jitgate/enroll-token").exists(),
        "the used token was left on disk"
    );
    let env = std::fs::read_to_string(root.join("etc/jitgate/agent.env")).unwrap();
    assert!(!env.contains("je_"), "{env}");

    // The machine is online and enforcing: a policy closes its port to everyone
    // without a grant.
    let vm_path = format!("/api/v1/vms/{RG}/{NAME}");
    wait_for("fresh-1 online", Duration::from_secs(20), || {
        lab.admin("GET", &vm_path, None).body["agent"]["online"] == true
    });
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let ssh = lab.vm.v4_at(SSH);
    let vm_id = format!(
        "/subscriptions/{}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/{NAME}",
        lab.sub
    );
    let policy = format!(
        "/subscriptions/{}/resourceGroups/{RG}/providers/Microsoft.Security/locations/{LOCATION}/jitNetworkAccessPolicies/fresh?api-version=2020-01-01",
        lab.sub
    );
    let body = json!({"kind": "Basic", "properties": {"virtualMachines": [{"id": vm_id, "ports": [
        {"number": SSH, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT1H"}]}]}});
    let r = lab.admin("PUT", &policy, Some(body));
    assert_eq!(r.status, 200, "{r:?}");
    wait_for("fresh-1 up to date", Duration::from_secs(20), || {
        lab.admin("GET", &vm_path, None).body["agent"]["upToDate"] == true
    });
    a.wait_tcp_closed(ssh, Duration::from_secs(5));
    assert!(!b.tcp_open(ssh));

    // Run again (its code is spent): nothing changes.
    let before = snapshot(&root);
    let ran = run_line(&lab, &line, &path, &root);
    assert!(ran.success(), "{ran}");
    assert!(!ran.stdout.contains(": written"), "{ran}");
    assert!(ran.stdout.contains("already enrolled"), "{ran}");
    assert!(ran.stdout.contains("unchanged"), "{ran}");
    assert_eq!(snapshot(&root), before);

    // A tampered binary on the controller (after it announced its checksum): the
    // script stops before installing anything.
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&served)
            .unwrap();
        f.write_all(b"tampered").unwrap();
    }
    let line = new_line(&lab);
    let root_t = machine_root(scratch.path(), "tampered", "debian");
    let ran = run_line(&lab, &line, &path, &root_t);
    assert!(!ran.success(), "{ran}");
    assert!(ran.stderr.contains("SHA-256"), "{ran}");
    assert!(is_empty(&root_t), "{:?}", snapshot(&root_t));

    // On record: every delivery of a token by an install code.
    let events = lab.admin(
        "GET",
        "/api/v1/audit?action=enrollToken.installCodeUsed&limit=100",
        None,
    );
    let n = events.body["value"].as_array().map_or(0, Vec::len);
    assert!(n >= 2, "{:?}", events.body);
    let _: Value = events.body;
}

/// Issue 17, version skew: `jitgate agent upgrade` replaces the agent's binary with
/// the controller's (pinned, checksum checked, renamed into place) during a live
/// grant; the agent restarted on it keeps the grant, which still ends on time. A
/// second run changes nothing; a binary that does not match the announced checksum
/// is refused and the old one left in place.
#[test]
fn an_agent_upgrades_to_the_controllers_binary_during_a_live_grant() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut lab, served) = serving_a_copy(scratch.path());
    // The agent runs from a binary of its own (the "older" one).
    let old = scratch.path().join("jitgate");
    std::fs::copy(BIN, &old).unwrap();
    lab.kill_agent();
    lab.agent_bin = old.clone();
    lab.start_agent();
    lab.wait_agent_up_to_date();
    lab.enable_default();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let ssh = lab.vm.v4_at(SSH);
    // Long enough for a slow download under load; its end is checked in the kernel.
    let g = lab.initiate(&a, json!([{"number": SSH, "duration": "PT10M"}]));
    a.wait_tcp_open(ssh, Duration::from_secs(3));

    let upgrade = |lab: &Lab, binary: &std::path::Path| {
        run_in_ns(
            &lab.vm.ns,
            BIN,
            &[
                "agent",
                "upgrade",
                "--state-dir",
                lab.agent_state_dir().to_str().unwrap(),
                "--binary",
                binary.to_str().unwrap(),
            ],
            &[],
            Duration::from_secs(60),
        )
    };
    let ran = upgrade(&lab, &old);
    assert!(ran.success(), "{ran}");
    assert!(ran.stdout.contains("replaced"), "{ran}");
    assert_eq!(
        std::fs::read(&old).unwrap(),
        std::fs::read(&served).unwrap()
    );
    // The agent restarted on the new binary keeps the grant, to a only.
    lab.kill_agent();
    lab.start_agent();
    lab.wait_agent_up_to_date();
    assert!(a.tcp_open(ssh), "the upgrade dropped the live grant");
    assert!(!b.tcp_open(ssh));
    let ran = upgrade(&lab, &old);
    assert!(
        ran.success() && ran.stdout.contains("nothing to do"),
        "{ran}"
    );

    // A binary that is not what the controller announced: refused, nothing replaced.
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&served)
            .unwrap();
        f.write_all(b"tampered").unwrap();
    }
    let other = scratch.path().join("other-jitgate");
    std::fs::write(&other, b"an older binary").unwrap();
    let ran = upgrade(&lab, &other);
    assert!(!ran.success(), "{ran}");
    assert!(ran.stderr.contains("SHA-256"), "{ran}");
    assert_eq!(std::fs::read(&other).unwrap(), b"an older binary");

    // The grant still ends on time: the kernel element the restarted agent holds
    // expires at the grant's end (never later, at most a moment earlier).
    // Measured before the listing: the element cannot outlive what is left then.
    let left = g
        .end()
        .saturating_duration_since(std::time::Instant::now())
        .as_millis() as u64;
    let listing = lab.nft(&["list", "set", "inet", "jitgate", "hosts4"]);
    let line = listing
        .split(['{', ',', '}'])
        .find(|e| {
            e.trim_start()
                .starts_with(&format!("{} . tcp . {SSH}", a.v4))
        })
        .unwrap_or_else(|| panic!("no element for a in:\n{listing}"));
    let expires = line
        .split(" expires ")
        .nth(1)
        .map(|x| crate::agent::nft_ms(x.split_whitespace().next().unwrap()))
        .unwrap_or_else(|| panic!("no expiry in {line}"));
    assert!(
        expires <= left + 200 && expires + 5_000 >= left,
        "the element expires in {expires} ms, the grant ends in {left} ms"
    );
}
