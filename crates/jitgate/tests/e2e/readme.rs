//! The README cannot rot (issue 9.9).
//!
//! - `every_jitgate_command_in_the_readme_parses`: every `jitgate ...` command line of
//!   every `sh` block is given to the real binary's argument parser (with `--help`
//!   added, so nothing runs): a renamed flag or verb fails here.
//! - `the_first_hour_works_as_written`: every block marked `<!-- walk: ROLE ... -->` is
//!   executed by bash, in README order, in one of three network namespaces standing in
//!   for the machines of the README (`controller` = jit.example.com, `machine` = web-1,
//!   `laptop`), sharing one working directory (the files the README says to copy are
//!   simply there). Shell variables carry from block to block of the same role, as in
//!   one terminal. A block marked `background` runs on (the controller, the agent) and
//!   the walk waits for its `ready="..."` command to succeed. `jitgate` on the PATH is
//!   the binary under test (`JITGATE_BIN` makes `run-controller.sh` use it instead of a
//!   release build); `web-1` has a TCP service on port 22 in place of sshd.
//!
//! The walk needs root, `ip`, `nft`, `curl` and `openssl`; without them it fails saying
//! what to install.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::lab::{BIN, run};

const README: &str = include_str!("../../../../README.md");

#[derive(Debug, Clone)]
struct Walk {
    role: String,
    background: bool,
    ready: Option<String>,
}

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    walk: Option<Walk>,
    text: String,
}

fn parse_marker(m: &str) -> Walk {
    let body = m
        .trim()
        .strip_prefix("<!-- walk:")
        .and_then(|r| r.strip_suffix("-->"))
        .unwrap_or_else(|| panic!("bad walk marker {m:?}"))
        .trim();
    let (head, ready) = match body.split_once("ready=\"") {
        Some((h, r)) => (
            h,
            Some(
                r.strip_suffix('"')
                    .unwrap_or_else(|| panic!("unterminated ready= in {m:?}"))
                    .to_owned(),
            ),
        ),
        None => (body, None),
    };
    let mut words = head.split_whitespace();
    let role = words.next().expect("a role").to_owned();
    assert!(
        ["controller", "machine", "laptop"].contains(&role.as_str()),
        "unknown role {role} in {m:?}"
    );
    let background = words.any(|w| w == "background");
    assert!(
        !background || ready.is_some(),
        "a background block needs ready=\"...\": {m:?}"
    );
    Walk {
        role,
        background,
        ready,
    }
}

/// The `sh` blocks of the README, with their walk markers.
fn blocks() -> Vec<Block> {
    let lines: Vec<&str> = README.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "```sh" {
            let marker = (i > 0 && lines[i - 1].trim_start().starts_with("<!-- walk:"))
                .then(|| parse_marker(lines[i - 1]));
            let start = i;
            // Blocks inside list items are indented as their fence is.
            let indent = &lines[i][..lines[i].len() - lines[i].trim_start().len()];
            i += 1;
            let mut text = String::new();
            while i < lines.len() && lines[i].trim() != "```" {
                text.push_str(lines[i].strip_prefix(indent).unwrap_or(lines[i]));
                text.push('\n');
                i += 1;
            }
            out.push(Block {
                line: start + 1,
                walk: marker,
                text,
            });
        }
        i += 1;
    }
    out
}

/// The `jitgate ...` command lines of a block (continuations joined).
fn jitgate_lines(text: &str) -> Vec<String> {
    let mut joined = Vec::new();
    let mut cur = String::new();
    for l in text.lines() {
        if let Some(head) = l.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(l);
        joined.push(std::mem::take(&mut cur));
    }
    joined
        .into_iter()
        .map(|l| l.trim().to_owned())
        .filter(|l| l.starts_with("jitgate "))
        .collect()
}

#[test]
fn every_jitgate_command_in_the_readme_parses() {
    let all = blocks();
    assert!(all.len() > 10, "the README has {} sh blocks", all.len());
    assert!(
        all.iter().filter(|b| b.walk.is_some()).count() >= 8,
        "the README's walk blocks are missing"
    );
    let dir = tempfile::tempdir().unwrap();
    // Files the commands read from (`< my-token`) exist, empty.
    for f in ["my-token", "enroll-token", "alice-token"] {
        std::fs::write(dir.path().join(f), "").unwrap();
    }
    // As `openssl x509 -noout -fingerprint -sha256` writes it.
    std::fs::write(
        dir.path().join("ca-fingerprint"),
        format!("sha256 Fingerprint={}\n", vec!["AB"; 32].join(":")),
    )
    .unwrap();
    let mut checked = 0;
    for b in &all {
        for line in jitgate_lines(&b.text) {
            // Files it reads from (`< jitgate-data/bootstrap-token`) exist, empty.
            let words: Vec<&str> = line.split_whitespace().collect();
            for w in words.windows(2).filter(|w| w[0] == "<") {
                let f = dir.path().join(w[1]);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, "").unwrap();
            }
            // A function named jitgate shadows the binary: it drops what follows `--`
            // (ssh's own arguments) and asks for --help, so only parsing happens.
            let script = format!(
                "jitgate() {{ local a=(); for x in \"$@\"; do [ \"$x\" = -- ] && break; a+=(\"$x\"); done; {BIN} \"${{a[@]}}\" --help >/dev/null; }}\n{line}\n"
            );
            let out = Command::new("bash")
                .args(["-c", &script])
                .current_dir(dir.path())
                .env("HOME", dir.path())
                .env("JITGATE_URL", "http://127.0.0.1:1")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "README line {} block: `{line}` does not parse ({}):\n{}",
                b.line,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} jitgate commands found");
}

// ---- the walk -------------------------------------------------------------------------------

fn preconditions() {
    crate::lab::preconditions();
    for (bin, arg, package) in [
        ("curl", "--version", "curl"),
        ("openssl", "version", "openssl"),
    ] {
        let ok = Command::new(bin)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "`{bin}` is missing: install the Debian package {package} (scripts/setup-deps.sh does)"
        );
    }
}

/// Three hosts on a bridge, each a network namespace; `jit.example.com` resolves to the
/// controller through `/etc/netns/<ns>/hosts` (which `ip netns exec` mounts).
struct Net {
    names: Vec<String>,
    stop: Arc<AtomicBool>,
}

impl Net {
    fn ns(&self, role: &str) -> &str {
        let i = match role {
            "controller" => 1,
            "machine" => 2,
            "laptop" => 3,
            _ => unreachable!(),
        };
        &self.names[i]
    }

    /// The address of host `i` (1 controller, 2 machine, 3 laptop).
    fn addr(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 66, (std::process::id() % 200) as u8 + 1, i)
    }

    fn build() -> Net {
        let id = format!("jgrd{}", std::process::id());
        let names: Vec<String> = ["lan", "ctl", "vm", "lap"]
            .iter()
            .map(|r| format!("{id}-{r}"))
            .collect();
        let net = Net {
            names,
            stop: Arc::new(AtomicBool::new(false)),
        };
        for ns in &net.names {
            run("ip", &["netns", "add", ns]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        let lan = net.names[0].as_str();
        run(
            "ip",
            &[
                "-n",
                lan,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        );
        run("ip", &["-n", lan, "link", "set", "br0", "up"]);
        for (i, ns) in net.names[1..].iter().enumerate() {
            let port = format!("p{i}");
            run(
                "ip",
                &[
                    "-n", lan, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", ns,
                ],
            );
            run(
                "ip",
                &["-n", lan, "link", "set", &port, "master", "br0", "up"],
            );
            let addr = format!("{}/24", net.addr(i as u8 + 1));
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            let etc = PathBuf::from("/etc/netns").join(ns);
            std::fs::create_dir_all(&etc).unwrap();
            std::fs::write(
                etc.join("hosts"),
                format!(
                    "127.0.0.1 localhost\n::1 localhost\n{} jit.example.com\n",
                    net.addr(1)
                ),
            )
            .unwrap();
        }
        net
    }

    /// A TCP service on port 22 of `ns` (in place of sshd): accepts and closes.
    fn serve_port_22(&self, ns: &str) {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        let stop = self.stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = TcpListener::bind("0.0.0.0:22").unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for ns in &self.names {
            // Whatever still runs in the namespace (the controller, the agent).
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
    }
}

struct Background(Vec<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The bash that runs a block as `role`: that role's variables from earlier blocks,
/// the working directory, errors fatal; afterwards the variables are kept (`set -a`
/// exports every assignment, so `export -p` has them all).
fn script(env: &Path, walk_dir: &Path, block: &str, keep: bool) -> String {
    let mut s = format!(
        "set -euo pipefail\nset -a\nsource '{}'\ncd '{}'\n",
        env.display(),
        walk_dir.display()
    );
    s.push_str(block);
    if keep {
        s.push_str(&format!(
            "\nexport -p > '{0}.new' && mv '{0}.new' '{0}'\n",
            env.display()
        ));
    }
    s
}

fn bash_in(ns: &str, script: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "bash", "-c", script])
        .stdin(Stdio::null());
    cmd
}

#[test]
fn the_first_hour_works_as_written() {
    preconditions();
    let walk: Vec<Block> = blocks().into_iter().filter(|b| b.walk.is_some()).collect();
    assert!(
        walk.len() >= 8,
        "the README's walk has {} blocks",
        walk.len()
    );
    let net = Net::build();
    net.serve_port_22(net.ns("machine"));
    let dir = tempfile::tempdir().unwrap();
    let walk_dir = dir.path().join("walk");
    std::fs::create_dir_all(&walk_dir).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::os::unix::fs::symlink(
        repo.join("scripts").canonicalize().unwrap(),
        walk_dir.join("scripts"),
    )
    .unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for role in ["controller", "machine", "laptop"] {
        let home = dir.path().join(format!("home-{role}"));
        std::fs::create_dir_all(&home).unwrap();
        let mut env = format!(
            "export PATH='{path}'\nexport HOME='{}'\nexport JITGATE_BIN='{BIN}'\nexport NO_COLOR=1\n",
            home.display()
        );
        if role == "machine" {
            env.push_str(&format!(
                "export JITGATE_STATE_DIR='{}'\n",
                dir.path().join("agent-state").display()
            ));
        }
        std::fs::write(dir.path().join(format!("{role}.env")), env).unwrap();
    }
    let mut background = Background(Vec::new());
    let mut transcript = String::new();
    for (n, b) in walk.iter().enumerate() {
        let w = b.walk.as_ref().unwrap();
        let ns = net.ns(&w.role);
        let env = dir.path().join(format!("{}.env", w.role));
        let started = Instant::now();
        if w.background {
            let log = dir.path().join(format!("bg-{n}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = bash_in(ns, &script(&env, &walk_dir, &b.text, false))
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            background.0.push(child);
            let ready = w.ready.as_deref().unwrap();
            let ctl_env = dir.path().join("controller.env");
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let ok = bash_in(
                    net.ns("controller"),
                    &script(&ctl_env, &walk_dir, ready, false),
                )
                .output()
                .unwrap()
                .status
                .success();
                if ok {
                    break;
                }
                if let Some(status) = background.0.last_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "README line {} ({}): the background block ended with {status}:\n{}\n--- its output:\n{}",
                        b.line,
                        w.role,
                        b.text,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "README line {} ({}): not ready after 120 s ({ready}):\n{}",
                    b.line,
                    w.role,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        } else {
            let out = bash_in(ns, &script(&env, &walk_dir, &b.text, true))
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "README line {} ({}) failed with {}:\n{}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}\n--- walk so far:\n{transcript}",
                b.line,
                w.role,
                out.status,
                b.text
            );
            transcript.push_str(&format!("$ [{}] {}{stdout}{stderr}", w.role, b.text));
        }
        let _ = writeln!(
            std::io::stderr(),
            "walk: README line {} as {} took {:?}",
            b.line,
            w.role,
            started.elapsed()
        );
    }
    // What the walk did is really there: Alice's access was granted and revoked, and
    // the audit log names her.
    let ctl_env = dir.path().join("controller.env");
    let out = bash_in(
        net.ns("controller"),
        &script(&ctl_env, &walk_dir, "jitgate requests --json", false),
    )
    .output()
    .unwrap();
    let requests: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let text = requests.to_string();
    assert!(text.contains("alice@example.com"), "{text}");
    assert!(transcript.contains("alice@example.com"), "{transcript}");
    // And the kernel agrees: Alice revoked her access, so port 22 of web-1 drops the
    // laptop's connections again, while web-1 still reaches itself.
    let vm_addr = net.addr(2);
    let probe = format!("timeout 1 bash -c '</dev/tcp/{vm_addr}/22'");
    let from_laptop = bash_in(net.ns("laptop"), &probe).output().unwrap();
    assert!(
        !from_laptop.status.success(),
        "port 22 of web-1 answers the laptop after the revoke"
    );
    let from_itself = bash_in(
        net.ns("machine"),
        "timeout 1 bash -c '</dev/tcp/127.0.0.1/22'",
    )
    .output()
    .unwrap();
    assert!(from_itself.status.success(), "{from_itself:?}");
    drop(background);
    // The whole walk, for whoever runs this with --nocapture.
    eprintln!("{transcript}");
}
