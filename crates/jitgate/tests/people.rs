//! The verbs a person uses daily, run as the real `jitgate` binary against a real
//! controller (`jitgate serve` as a child process): login, enable/disable, request,
//! requests, revoke, connect, ssh (with `--ssh /bin/echo` instead of OpenSSH), audit
//! show, bad input (one-line errors, exit codes, nothing changed), help, completions
//! and the man page. No agent runs here: nothing is enforced in a kernel, so these
//! tests check the flow and what the controller records.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{BIN, capture_stderr, feed_stdin, free_port, http_get};

const ADMIN: &str = "people-test-bootstrap-token";

/// Variables that would let the caller's environment leak into a test.
const CLEARED_ENV: [&str; 6] = [
    "JITGATE_URL",
    "JITGATE_TOKEN",
    "JITGATE_CA_CERT",
    "JITGATE_CONFIG_DIR",
    "XDG_CONFIG_HOME",
    "JITGATE_LOG",
];

/// A controller child process on a free loopback port with a known bootstrap token.
struct Controller {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run of the binary did.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Fails with `code` and a single-line error on stderr containing every one of `words`.
    #[track_caller]
    fn fails(&self, code: i32, words: &[&str]) {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        let err = self.stderr.trim_end();
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("jitgate: "),
            "the error is not a `jitgate: ...` line: {err}"
        );
        for w in words {
            assert!(last.contains(w), "the error does not mention {w:?}: {last}");
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs the binary with a clean environment plus `envs`; the config directory is
/// always set so a developer's own `~/.config/jitgate` is never read or written.
fn run(args: &[&str], envs: &[(&str, &str)], config_dir: &Path) -> Out {
    run_with_stdin(args, envs, config_dir, None)
}

fn run_with_stdin(
    args: &[&str],
    envs: &[(&str, &str)],
    config_dir: &Path,
    stdin: Option<&str>,
) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for k in CLEARED_ENV {
        cmd.env_remove(k);
    }
    cmd.env("JITGATE_CONFIG_DIR", config_dir);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        feed_stdin(&mut child, text);
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn start() -> Controller {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("JITGATE_BOOTSTRAP_TOKEN", ADMIN)
        .env_remove("JITGATE_CONFIG")
        .env_remove("JITGATE_LISTEN")
        .env_remove("JITGATE_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = capture_stderr(&mut child);
    let mut c = Controller {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
        dir,
    };
    common::wait_listening(
        &mut c.child,
        &format!("127.0.0.1:{port}"),
        &c.log,
        Duration::from_secs(20),
    );
    c
}

impl Controller {
    /// A config directory nobody logged in to: only flags and environment count.
    fn no_config(&self) -> PathBuf {
        self.dir.path().join("no-config")
    }

    /// Runs a client verb as the bootstrap admin (URL and token in the environment).
    fn jg(&self, args: &[&str]) -> Out {
        self.jg_as(ADMIN, args)
    }

    /// Runs a verb as the admin with extra environment (e.g. `COLUMNS`).
    fn jg_env(&self, envs: &[(&str, &str)], args: &[&str]) -> Out {
        let mut all = vec![
            ("JITGATE_URL", self.base.as_str()),
            ("JITGATE_TOKEN", ADMIN),
        ];
        all.extend_from_slice(envs);
        run(args, &all, &self.no_config())
    }

    fn jg_as(&self, token: &str, args: &[&str]) -> Out {
        run(
            args,
            &[("JITGATE_URL", &self.base), ("JITGATE_TOKEN", token)],
            &self.no_config(),
        )
    }

    /// Runs a verb with `--json` as the admin, expecting success.
    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        self.jg(&all).ok().json()
    }

    fn register(&self, rg: &str, name: &str) {
        self.jg(&["vm", "register", rg, name]).ok();
    }

    fn subscription(&self) -> String {
        let (status, who) = http_get(&format!("{}/api/v1/whoami", self.base), ADMIN);
        assert_eq!(status, 200, "{who}");
        who["subscription"].as_str().unwrap().to_owned()
    }

    /// The Azure policy `vm` belongs to (its JSON), or `None` when it has none.
    fn policy_of(&self, vm: &str) -> Option<Value> {
        let show = self.json(&["vm", "show", vm]);
        let path = show["policy"].as_str()?;
        let (status, body) = http_get(
            &format!("{}{path}?api-version=2020-01-01", self.base),
            ADMIN,
        );
        assert_eq!(status, 200, "{body}");
        Some(body)
    }

    /// Everything a refused command must leave as it was: machines, their policies,
    /// NSGs and grants, and the requests.
    fn snapshot(&self, vms: &[&str]) -> Value {
        let mut out = json!({
            "vms": self.json(&["vm", "list"]),
            "requests": self.json(&["requests", "--limit", "1000"]),
        });
        for vm in vms {
            let mut show = self.json(&["vm", "show", vm]);
            // The one field that changes by itself as time passes.
            for g in show["grants"].as_array_mut().unwrap() {
                g.as_object_mut().unwrap().remove("secondsLeft");
            }
            out[*vm] = json!({"show": show, "policy": self.policy_of(vm)});
        }
        out
    }

    /// Creates a token for `principal` and gives it `role` on the subscription: (id, token).
    fn user(&self, principal: &str, role: &str) -> (String, String) {
        let t = self.json(&["token", "create", "--principal", principal]);
        let scope = format!("/subscriptions/{}", self.subscription());
        self.jg(&[
            "role",
            "assign",
            "--principal",
            principal,
            "--role",
            role,
            "--scope",
            &scope,
        ])
        .ok();
        (
            t["id"].as_str().unwrap().to_owned(),
            t["token"].as_str().unwrap().to_owned(),
        )
    }
}

/// The entries of a policy by short machine name.
fn entries(policy: &Value) -> std::collections::BTreeMap<String, Value> {
    policy["properties"]["virtualMachines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let id = e["id"].as_str().unwrap();
            (
                id.rsplit('/').next().unwrap().to_owned(),
                e["ports"].clone(),
            )
        })
        .collect()
}

fn port_rule(number: u16, max: &str, from: &str) -> Value {
    json!({
        "number": number,
        "protocol": "*",
        "allowedSourceAddressPrefix": from,
        "maxRequestAccessDuration": max,
    })
}

fn seconds_until(end: &str) -> i64 {
    let end: jiff::Timestamp = end.parse().unwrap();
    end.as_second() - jiff::Timestamp::now().as_second()
}

/// The ids of the requests in a `requests --json` answer.
fn request_ids(v: &Value) -> Vec<String> {
    v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

// ---- 1. login -----------------------------------------------------------------------

#[test]
fn login_saves_a_private_config_that_later_commands_use_and_flags_override() {
    let c = start();
    let cfg = c.dir.path().join("home/.config/jitgate");
    let out = run(&["login", &c.base, "--token", ADMIN], &[], &cfg).ok();
    assert!(
        out.stdout.contains("logged in") && out.stdout.contains("bootstrap-admin"),
        "{}",
        out.stdout
    );
    use std::os::unix::fs::PermissionsExt;
    let file = cfg.join("config.toml");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the config holds a token: owner only");
    let dir_mode = std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.contains(&c.base) && saved.contains(ADMIN), "{saved}");

    // No URL or token in the environment: the saved ones are used.
    run(&["vm", "register", "lab", "box-1"], &[], &cfg).ok();
    let list = run(&["vm", "list", "--json"], &[], &cfg).ok().json();
    assert_eq!(list["value"][0]["name"], "box-1");

    // Flags and environment override the file.
    run(
        &["vm", "list", "--token", "wrong-token-wrong-token"],
        &[],
        &cfg,
    )
    .fails(4, &["not authenticated", "jitgate login"]);
    run(
        &["vm", "list"],
        &[("JITGATE_TOKEN", "wrong-token-wrong-token")],
        &cfg,
    )
    .fails(4, &["not authenticated"]);
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    run(&["vm", "list", "--url", &nowhere], &[], &cfg).fails(1, &["cannot reach", &nowhere]);
    run(&["vm", "list"], &[("JITGATE_URL", &nowhere)], &cfg).fails(1, &["cannot reach"]);

    // A bad token at login fails and writes nothing: neither a new file...
    let fresh = c.dir.path().join("fresh");
    run(
        &["login", &c.base, "--token", "not-a-valid-token"],
        &[],
        &fresh,
    )
    .fails(4, &["not authenticated"]);
    assert!(!fresh.join("config.toml").exists());
    // ... nor over the existing one.
    run(
        &["login", &c.base, "--token", "not-a-valid-token"],
        &[],
        &cfg,
    )
    .fails(4, &["not authenticated"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), saved);
    run(&["vm", "list"], &[], &cfg).ok();

    // The token can come from standard input instead of the command line.
    let piped = c.dir.path().join("piped");
    run_with_stdin(
        &["login", &c.base, "--token-stdin"],
        &[],
        &piped,
        Some(&format!("{ADMIN}\n")),
    )
    .ok();
    run(&["vm", "list"], &[], &piped).ok();
    // No token at all: says how to give one.
    run(&["login", &c.base], &[], &fresh).fails(2, &["--token"]);
}

// ---- 2. enable / disable ---------------------------------------------------------------

#[test]
fn enable_adds_machines_without_touching_others_and_disable_removes_only_them() {
    let c = start();
    for vm in ["web-1", "web-2", "web-3"] {
        c.register("prod", vm);
    }
    let out = c.jg(&["enable", "web-1", "web-2"]).ok();
    assert!(
        out.stdout.contains("JIT enabled on prod/web-1: ports 22")
            && out.stdout.contains("JIT enabled on prod/web-2: ports 22"),
        "{}",
        out.stdout
    );
    let policy = c.policy_of("web-1").unwrap();
    let e = entries(&policy);
    assert_eq!(e.len(), 2, "{policy}");
    // No agent reports listeners: port 22, any protocol, the default maximum of 3h.
    assert_eq!(e["web-1"], json!([port_rule(22, "PT10800S", "*")]));
    assert_eq!(e["web-2"], json!([port_rule(22, "PT10800S", "*")]));
    assert_eq!(
        c.policy_of("web-2").unwrap()["id"],
        policy["id"],
        "one policy per resource group"
    );

    // A third machine joins the same policy; the first two are untouched.
    c.jg(&["enable", "web-3", "--port", "3389", "--max", "30m"])
        .ok();
    let e3 = entries(&c.policy_of("web-3").unwrap());
    assert_eq!(e3.len(), 3);
    assert_eq!(e3["web-1"], e["web-1"]);
    assert_eq!(e3["web-2"], e["web-2"]);
    assert_eq!(e3["web-3"], json!([port_rule(3389, "PT1800S", "*")]));

    // Updating one machine changes only that machine.
    c.jg(&[
        "enable",
        "web-1",
        "--port",
        "22",
        "--port",
        "5985",
        "--from",
        "10.0.0.0/8",
    ])
    .ok();
    let e4 = entries(&c.policy_of("web-1").unwrap());
    assert_eq!(
        e4["web-1"],
        json!([
            port_rule(22, "PT10800S", "10.0.0.0/8"),
            port_rule(5985, "PT10800S", "10.0.0.0/8")
        ])
    );
    assert_eq!(e4["web-2"], e3["web-2"]);
    assert_eq!(e4["web-3"], e3["web-3"]);
    // Protocol and an ISO 8601 maximum, several sources.
    c.jg(&[
        "enable",
        "prod/web-2",
        "--protocol",
        "TCP",
        "--max",
        "PT1H",
        "--from",
        "10.0.0.0/8",
        "--from",
        "192.168.1.0/24",
    ])
    .ok();
    let e5 = entries(&c.policy_of("web-2").unwrap());
    assert_eq!(e5["web-2"][0]["number"], 22);
    assert_eq!(e5["web-2"][0]["protocol"], "TCP");
    assert_eq!(e5["web-2"][0]["maxRequestAccessDuration"], "PT1H");
    assert_eq!(
        e5["web-2"][0]["allowedSourceAddressPrefixes"],
        json!(["10.0.0.0/8", "192.168.1.0/24"])
    );
    assert_eq!(e5["web-1"], e4["web-1"]);
    assert_eq!(e5["web-3"], e4["web-3"]);
    // The machine list shows what is protected; the NSG has the deny rules.
    let list = c.json(&["vm", "list"]);
    let ports = |name: &str| {
        list["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["protectedPorts"]
            .clone()
    };
    assert_eq!(ports("web-1"), json!([22, 5985]));
    assert_eq!(ports("web-3"), json!([3389]));
    let show = c.json(&["vm", "show", "web-1"]);
    let denies: Vec<&Value> = show["nsg"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["origin"] == "jit-deny")
        .collect();
    assert_eq!(denies.len(), 2, "{show}");

    // Disabling one machine removes only it.
    let out = c.jg(&["disable", "web-2"]).ok();
    assert!(
        out.stdout.contains("JIT disabled on prod/web-2"),
        "{}",
        out.stdout
    );
    let e6 = entries(&c.policy_of("web-1").unwrap());
    assert_eq!(e6.len(), 2);
    assert_eq!(e6["web-1"], e5["web-1"]);
    assert_eq!(e6["web-3"], e5["web-3"]);
    assert!(c.policy_of("web-2").is_none());
    assert!(
        c.json(&["vm", "show", "web-2"])["nsg"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Disabling the last machines deletes the policy.
    let path = c.json(&["vm", "show", "web-1"])["policy"]
        .as_str()
        .unwrap()
        .to_owned();
    c.jg(&["disable", "web-1", "prod/web-3"]).ok();
    let (status, _) = http_get(&format!("{}{path}?api-version=2020-01-01", c.base), ADMIN);
    assert_eq!(status, 404, "the empty policy is deleted");
    assert!(c.policy_of("web-1").is_none() && c.policy_of("web-3").is_none());
    // Disabling an unprotected machine is not an error, and says so.
    let out = c.jg(&["disable", "web-1"]).ok();
    assert!(out.stderr.contains("not protected"), "{}", out.stderr);
    // Machines of another resource group get their own policy.
    c.register("lab", "box");
    c.jg(&["enable", "box"]).ok();
    let lab = c.policy_of("box").unwrap();
    assert!(
        lab["id"].as_str().unwrap().contains("/resourceGroups/lab/"),
        "{lab}"
    );
}

// ---- 3. request, requests, revoke ---------------------------------------------------------

#[test]
fn request_prints_the_grant_and_revoke_ends_it() {
    let c = start();
    c.register("prod", "web-1");
    c.register("prod", "web-2");
    c.jg(&["enable", "web-1", "web-2", "--port", "22"]).ok();

    let out = c
        .jg(&[
            "request", "web-1", "--port", "22", "--for", "30m", "--from", "10.1.2.3", "--reason",
            "x",
        ])
        .ok();
    // Local wall time and what is left, not nanosecond UTC; then how to end it.
    let mut lines = out.stdout.lines();
    let line = lines.next().unwrap();
    assert!(
        line.starts_with("granted prod/web-1 port 22 from 10.1.2.3 until "),
        "{line}"
    );
    let until = line.split(" until ").nth(1).unwrap();
    assert!(
        until.contains(" (in 29m 5") || until.contains(" (in 30m)"),
        "{line}"
    );
    assert!(!line.contains('Z') && !line.contains("PT"), "{line}");
    let first = line.rsplit("request ").next().unwrap().to_owned();
    uuid::Uuid::parse_str(&first).unwrap();
    assert_eq!(
        lines.next(),
        Some(format!("end it sooner with: jitgate revoke {first}").as_str())
    );

    // --json parses and says the same.
    let v = c.json(&[
        "request", "web-1", "--port", "22", "--for", "1h", "--from", "10.1.2.4",
    ]);
    let second = v["requests"][0]["request"].as_str().unwrap().to_owned();
    let port = &v["requests"][0]["granted"]["virtualMachines"][0]["ports"][0];
    assert_eq!(port["number"], 22);
    assert_eq!(port["status"], "Initiated");
    assert_eq!(port["allowedSourceAddressPrefix"], "10.1.2.4");
    let left = seconds_until(port["endTimeUtc"].as_str().unwrap());
    assert!((3590..=3600).contains(&left), "{left}");

    // Both are listed as mine and active, newest first, with the justification.
    let mine = c.json(&["requests", "--mine", "--active"]);
    assert_eq!(request_ids(&mine), vec![second.clone(), first.clone()]);
    assert_eq!(mine["value"][1]["justification"], "x");
    let table = c.jg(&["requests", "--mine", "--active"]).ok().stdout;
    assert!(
        table.contains(&first) && table.contains(&second) && table.contains("Active"),
        "{table}"
    );
    let by_vm = c.json(&["requests", "--vm", "web-2"]);
    assert!(request_ids(&by_vm).is_empty());

    // `revoke VM` ends my live requests on it.
    let out = c.jg(&["revoke", "web-1"]).ok();
    assert_eq!(
        out.stdout.matches("revoked prod/web-1 port 22").count(),
        2,
        "{}",
        out.stdout
    );
    assert!(request_ids(&c.json(&["requests", "--mine", "--active"])).is_empty());
    assert!(
        c.json(&["vm", "show", "web-1"])["grants"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let all = c.json(&["requests", "--vm", "web-1"]);
    for r in all["value"].as_array().unwrap() {
        let p = &r["virtualMachines"][0]["ports"][0];
        assert_eq!(p["status"], "Revoked");
        assert_eq!(p["statusReason"], "UserRequested");
    }
    c.jg(&["revoke", "web-1"])
        .fails(3, &["no live request", "jitgate requests --mine --active"]);

    // `revoke REQUEST` by id; a second time says there is nothing left to revoke.
    let v = c.json(&["request", "web-1", "--port", "22", "--from", "10.1.2.5"]);
    let id = v["requests"][0]["request"].as_str().unwrap().to_owned();
    let out = c.jg(&["revoke", &id]).ok();
    assert!(
        out.stdout.contains("revoked prod/web-1 port 22"),
        "{}",
        out.stdout
    );
    c.jg(&["revoke", &id]).fails(5, &[&id, "no live port"]);
    c.jg(&["revoke", "5d1b7c34-2f7e-4f57-9f3b-8d0c6d4e2a10"])
        .fails(3, &["not found"]);

    // A request spanning two machines whose port on web-2 was superseded: `revoke
    // web-2` still ends every live request of mine on web-2 and leaves web-1 open.
    let older = c.json(&["request", "web-2", "--port", "22", "--from", "10.9.9.9"]);
    let older = older["requests"][0]["request"].as_str().unwrap().to_owned();
    let both = c.json(&[
        "request", "web-1", "web-2", "--port", "22", "--from", "10.1.1.1",
    ]);
    let both = both["requests"][0]["request"].as_str().unwrap().to_owned();
    c.json(&["request", "web-2", "--port", "22", "--from", "10.1.1.1"]);
    let out = c.jg(&["revoke", "web-2"]).ok();
    assert_eq!(
        out.stdout.matches("revoked prod/web-2 port 22").count(),
        2,
        "{}",
        out.stdout
    );
    assert!(
        c.json(&["vm", "show", "web-2"])["grants"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let web1 = c.json(&["vm", "show", "web-1"]);
    assert_eq!(web1["grants"].as_array().unwrap().len(), 1, "{web1}");
    assert_eq!(web1["grants"][0]["request"], both.as_str());
    let older = c.json(&["requests", "--vm", "web-2"])["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == older.as_str())
        .unwrap()
        .clone();
    assert_eq!(older["virtualMachines"][0]["ports"][0]["status"], "Revoked");
}

// ---- 4. bad input -----------------------------------------------------------------------------

#[test]
fn bad_input_is_one_line_naming_problem_and_fix_with_its_exit_code_and_changes_nothing() {
    let c = start();
    c.register("prod", "web-1");
    c.register("lab", "web-1");
    c.register("prod", "db");
    c.register("prod", "app");
    c.jg(&[
        "enable",
        "prod/web-1",
        "app",
        "--port",
        "22",
        "--port",
        "3389",
        "--max",
        "1h",
    ])
    .ok();
    c.jg(&["request", "app", "--port", "22", "--from", "10.0.0.7"])
        .ok();
    c.register("prod", "ghost");
    c.jg(&["enable", "ghost", "--port", "22"]).ok();
    let vms = ["prod/web-1", "lab/web-1", "db", "app", "ghost"];
    let before = c.snapshot(&vms);
    let tokens_before = c.json(&["token", "list"]);
    let roles_before = c.json(&["role", "list"]);
    let enroll_before = c.json(&["enroll-token", "list"]);

    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec!["request", "nope", "--port", "22"],
            3,
            vec!["'nope'", "jitgate vm list"],
        ),
        (
            vec!["request", "web-1", "--port", "22", "--from", "10.0.0.1"],
            3,
            vec![
                "ambiguous",
                "prod/web-1",
                "lab/web-1",
                "resource-group/name",
            ],
        ),
        (vec!["enable", "web-1"], 3, vec!["ambiguous", "prod/web-1"]),
        (
            vec![
                "request",
                "prod/web-1",
                "--port",
                "23",
                "--from",
                "10.0.0.1",
            ],
            5,
            vec!["port 23", "22, 3389"],
        ),
        (
            vec![
                "request",
                "prod/web-1",
                "--port",
                "22",
                "--for",
                "2h",
                "--from",
                "10.0.0.1",
            ],
            5,
            vec!["--for 2h", "longer than the 1h maximum", "port 22"],
        ),
        (
            vec![
                "request",
                "prod/web-1",
                "--port",
                "22",
                "--from",
                "10.0.0.5/24",
            ],
            2,
            vec!["--from", "10.0.0.0/24"],
        ),
        (
            vec!["request", "prod/web-1", "--port", "22", "--for", "soon"],
            2,
            vec!["--for", "'soon'", "30m"],
        ),
        (
            vec!["request", "prod/web-1", "--port", "0"],
            2,
            vec!["--port", "1 to 65535"],
        ),
        (
            vec!["request", "prod/web-1", "--from", "10.0.0.1"],
            5,
            vec!["22, 3389", "--port"],
        ),
        (
            vec!["request", "db", "--port", "22"],
            5,
            vec!["not protected", "jitgate enable prod/db"],
        ),
        (
            vec![
                "connect",
                "prod/web-1",
                "--port",
                "23",
                "--host",
                "127.0.0.1",
                "--wait",
                "1",
            ],
            5,
            vec!["port 23", "jitgate enable prod/web-1 --port 23"],
        ),
        (
            vec!["connect", "prod/web-1", "--wait", "soon"],
            2,
            vec!["--wait", "'soon'"],
        ),
        // The machine's address is unknown (no agent, a name that does not resolve):
        // said before anything is requested.
        (
            vec!["ssh", "ghost", "--ssh", "/bin/echo"],
            3,
            vec!["address of prod/ghost", "--host", "nothing was requested"],
        ),
        (
            vec!["connect", "ghost", "--host", "no-such-host.invalid"],
            3,
            vec!["--host no-such-host.invalid", "does not resolve"],
        ),
        (
            vec!["enable", "db", "--from", "10.0.0.5/24"],
            2,
            vec!["--from", "10.0.0.0/24"],
        ),
        (
            vec!["enable", "db", "--max", "soon"],
            2,
            vec!["--max", "'soon'"],
        ),
        (
            vec!["enable", "db", "--max", "2d"],
            2,
            vec!["--max 2d is longer than the 1d maximum"],
        ),
        (
            vec!["enable", "db", "--max", "1m"],
            2,
            vec!["--max 1m is shorter than the 5m minimum"],
        ),
        (
            vec!["enable", "db", "--protocol", "ICMP"],
            2,
            vec!["--protocol"],
        ),
        (
            vec![
                "token",
                "create",
                "--principal",
                "zed",
                "--expires-in",
                "soon",
            ],
            2,
            vec!["--expires-in", "'soon'", "1d"],
        ),
        (
            vec!["enroll-token", "create", "--expires-in", "0m"],
            2,
            vec!["--expires-in", "zero"],
        ),
        (
            vec!["enroll-token", "create", "--scope", "prod"],
            2,
            vec!["--scope", "'prod'", "--resource-group"],
        ),
        (
            vec!["enroll-token", "create", "--uses", "0"],
            2,
            vec!["--uses"],
        ),
        (
            vec!["enroll-token", "create", "--print-install"],
            2,
            vec!["--print-install", "--resource-group"],
        ),
        (
            vec![
                "role",
                "assign",
                "--principal",
                "zed",
                "--role",
                "Reader",
                "--resource-group",
                "bad rg",
            ],
            2,
            vec!["--resource-group", "bad rg"],
        ),
        // What only the controller can judge comes back naming the flag, not the
        // JSON field the verb filled.
        (
            vec![
                "role",
                "assign",
                "--principal",
                "zed",
                "--role",
                "Wizard",
                "--resource-group",
                "prod",
            ],
            5,
            vec!["--role: ", "Wizard"],
        ),
        (
            vec!["token", "create", "--principal", "zed zed"],
            5,
            vec!["--principal: "],
        ),
        (vec!["audit", "show", "--limit", "0"], 2, vec!["--limit"]),
        (
            vec!["recommendations", "--verdict", "Meh"],
            5,
            vec!["--verdict: ", "'Meh'"],
        ),
        (vec!["requests", "--limit", "0"], 5, vec!["--limit: "]),
        (
            vec!["vm", "list", "--resource-group", "bad rg"],
            5,
            vec!["--resource-group: "],
        ),
        // Gateway mode: a placement the controller refuses names the flag.
        (
            vec![
                "vm",
                "place",
                "db",
                "--behind",
                "prod/app",
                "--address",
                "nope",
            ],
            5,
            vec!["--address: ", "'nope'"],
        ),
        (
            vec![
                "vm",
                "place",
                "db",
                "--behind",
                "prod/app",
                "--address",
                "10.0.0.5",
                "--mode",
                "dnat",
            ],
            5,
            vec!["--public-address: "],
        ),
        (
            vec!["vm", "place", "db", "--address", "10.0.0.5"],
            2,
            vec!["--behind"],
        ),
        (
            vec![
                "vm",
                "place",
                "db",
                "--behind",
                "prod/db",
                "--address",
                "10.0.0.5",
            ],
            5,
            vec!["--behind: ", "its own gateway"],
        ),
        (
            vec!["enable", "db", "nope"],
            3,
            vec!["'nope'", "jitgate vm list"],
        ),
        (vec!["disable", "nope"], 3, vec!["jitgate vm list"]),
        (vec!["revoke", "nope"], 3, vec!["jitgate vm list"]),
        (vec!["vm", "show", "nope"], 3, vec!["jitgate vm list"]),
        (vec!["requests", "--vm", "nope"], 3, vec!["jitgate vm list"]),
        (
            vec!["audit", "show", "--since", "bogus"],
            2,
            vec!["--since", "'bogus'", "30m"],
        ),
    ];
    for (args, code, words) in &cases {
        let out = c.jg(args);
        assert_eq!(
            out.stderr.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {}",
            out.stderr
        );
        out.fails(*code, words);
    }
    assert_eq!(
        c.snapshot(&vms),
        before,
        "a refused command changed something"
    );
    assert_eq!(c.json(&["token", "list"]), tokens_before);
    assert_eq!(c.json(&["role", "list"]), roles_before);
    assert_eq!(c.json(&["enroll-token", "list"]), enroll_before);
    // clap's own usage errors (an unknown flag, a missing scope) are exit 2 as well.
    let out = c.jg(&["requests", "--bogus"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--bogus"), "{}", out.stderr);
    let out = c.jg(&["role", "assign", "--principal", "zed", "--role", "Reader"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("--scope") && out.stderr.contains("--resource-group"),
        "{}",
        out.stderr
    );

    // An expired token says so and how to log in again.
    let bob = c.json(&[
        "token",
        "create",
        "--principal",
        "bob",
        "--expires-in",
        "PT1S",
    ]);
    let bob = bob["token"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(1500));
    c.jg_as(
        &bob,
        &["request", "app", "--port", "22", "--from", "10.0.0.8"],
    )
    .fails(4, &["expired", "jitgate login", &c.base]);
    // A revoked one too.
    let (carol_id, carol) = c.user("carol", "JIT Requester");
    c.jg_as(&carol, &["requests", "--mine"]).ok();
    c.jg(&["token", "revoke", &carol_id]).ok();
    c.jg_as(
        &carol,
        &["request", "app", "--port", "22", "--from", "10.0.0.8"],
    )
    .fails(4, &["revoked", "jitgate login"]);
    // A token valid for centuries (past the year 2262) is not taken for expired.
    let eve = c.json(&[
        "token",
        "create",
        "--principal",
        "eve",
        "--expires-in",
        "P120000D",
    ]);
    assert!(
        eve["expiresAt"].as_str().unwrap().starts_with("2355-"),
        "{eve}"
    );
    c.jg_as(eve["token"].as_str().unwrap(), &["requests", "--mine"])
        .ok();
    let listed = c.json(&["token", "list"]);
    let listed = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["principal"] == "eve")
        .unwrap()
        .clone();
    assert!(
        listed["expiresAt"].as_str().unwrap() > "2262",
        "stored expiry went backwards: {listed}"
    );
    // A reader may look but not ask.
    let (_, dave) = c.user("dave", "Reader");
    c.jg_as(&dave, &["vm", "show", "app"]).ok();
    c.jg_as(
        &dave,
        &["request", "app", "--port", "22", "--from", "10.0.0.8"],
    )
    .fails(4, &["not permitted"]);
    c.jg_as(&dave, &["enable", "db"])
        .fails(4, &["not permitted"]);
    c.jg_as(&dave, &["disable", "app"])
        .fails(4, &["not permitted"]);
    assert_eq!(
        c.snapshot(&vms),
        before,
        "a refused command changed something"
    );
}

// ---- 5. connect -----------------------------------------------------------------------------

#[test]
fn connect_requests_waits_for_the_port_and_reuses_a_live_grant() {
    let c = start();
    c.register("prod", "web-1");
    c.register("prod", "web-2");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().port().to_string();
    c.jg(&["enable", "web-1", "--port", &open]).ok();
    let connect = [
        "connect",
        "web-1",
        "--port",
        open.as_str(),
        "--host",
        "127.0.0.1",
        "--wait",
        "5",
    ];

    let out = c.jg(&connect).ok();
    assert!(
        out.stderr
            .contains(&format!("granted port {open} on prod/web-1 from 127.0.0.1")),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains(&format!(
            "prod/web-1 port {open} is open: connect to 127.0.0.1:{open}"
        )),
        "{}",
        out.stdout
    );
    // It really connected.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_ok(), "nothing connected to the port");
    let grants = c.json(&["vm", "show", "web-1"])["grants"].clone();
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants[0]["source"], "127.0.0.1");
    assert_eq!(grants[0]["port"].to_string(), open);

    // A second run reuses the live grant instead of asking again.
    let out = c.jg(&connect).ok();
    assert!(out.stderr.contains("reusing"), "{}", out.stderr);
    assert!(out.stdout.contains("is open"), "{}", out.stdout);
    assert_eq!(
        c.json(&["requests", "--vm", "web-1"])["value"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "no second request"
    );
    // Someone else from the same address does not ride on that grant (issue 9.5): she
    // gets her own, so her access is on record as hers.
    let (_, alice) = c.user("alice", "JIT Requester");
    let out = c.jg_as(&alice, &connect).ok();
    assert!(!out.stderr.contains("reusing"), "{}", out.stderr);
    assert!(out.stderr.contains("granted port"), "{}", out.stderr);
    let requests = c.json(&["requests", "--vm", "web-1"])["value"].clone();
    let requestors: Vec<&str> = requests
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requestor"].as_str().unwrap())
        .collect();
    assert!(requestors.contains(&"alice"), "{requestors:?}");
    assert_eq!(requestors.len(), 2, "{requestors:?}");

    // A port that never opens: exit 6 after the deadline, with what to check.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    c.jg(&["enable", "web-2", "--port", &closed]).ok();
    let started = Instant::now();
    let out = c.jg(&[
        "connect",
        "web-2",
        "--port",
        &closed,
        "--host",
        "127.0.0.1",
        "--wait",
        "1",
    ]);
    out.fails(
        6,
        &[
            &format!("port {closed} on 127.0.0.1 did not open within 1s"),
            "--host",
        ],
    );
    assert!(out.stderr.contains("granted port"), "{}", out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the deadline was not kept: {:?}",
        started.elapsed()
    );
}

// ---- 6. ssh ---------------------------------------------------------------------------------

#[test]
fn ssh_waits_then_execs_the_ssh_program_with_port_options_destination_and_command() {
    let c = start();
    c.register("prod", "web-1");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = listener.local_addr().unwrap().port().to_string();
    c.jg(&["enable", "web-1", "--port", &p]).ok();
    let out = c
        .jg(&[
            "ssh",
            "admin@web-1",
            "--port",
            &p,
            "--host",
            "127.0.0.1",
            "--ssh",
            "/bin/echo",
            "--",
            "-i",
            "key",
            "-o",
            "BatchMode=yes",
            "uname",
            "-a",
        ])
        .ok();
    assert_eq!(
        out.stdout,
        format!("-p {p} -i key -o BatchMode=yes admin@127.0.0.1 uname -a\n")
    );
    assert!(out.stderr.contains("granted port"), "{}", out.stderr);
    // Again, without a user: the live grant is reused.
    let out = c
        .jg(&[
            "ssh",
            "prod/web-1",
            "--port",
            &p,
            "--host",
            "127.0.0.1",
            "--ssh",
            "/bin/echo",
            "--",
            "hostname",
        ])
        .ok();
    assert_eq!(out.stdout, format!("-p {p} 127.0.0.1 hostname\n"));
    assert!(out.stderr.contains("reusing"), "{}", out.stderr);
    // A missing ssh program is a clear error.
    c.jg(&[
        "ssh",
        "web-1",
        "--port",
        &p,
        "--host",
        "127.0.0.1",
        "--ssh",
        "/nonexistent/ssh",
    ])
    .fails(1, &["/nonexistent/ssh"]);
}

// ---- 7. audit show ----------------------------------------------------------------------------

#[test]
fn audit_show_filters_exports_csv_and_follows() {
    let c = start();
    c.register("prod", "web-1");
    c.register("prod", "web-2");
    c.jg(&["enable", "web-1", "web-2"]).ok();
    c.jg(&[
        "request",
        "web-1",
        "--port",
        "22",
        "--from",
        "10.1.2.3",
        "--reason",
        "deploy-fix-42",
    ])
    .ok();
    c.jg(&["request", "web-2", "--port", "22", "--from", "10.1.2.3"])
        .ok();

    let out = c.jg(&["audit", "show", "--vm", "web-1"]).ok();
    let initiates: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("request.initiate"))
        .collect();
    assert_eq!(initiates.len(), 1, "{}", out.stdout);
    assert!(
        initiates[0].contains("bootstrap-admin") && initiates[0].contains("prod/web-1"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("prod/web-2"), "{}", out.stdout);
    // `audit` without a subcommand shows, with the same filters.
    let bare = c.jg(&["audit", "--vm", "web-1"]).ok();
    assert_eq!(bare.stdout, out.stdout);

    let csv = c
        .jg(&["audit", "show", "--vm", "web-1", "--csv"])
        .ok()
        .stdout;
    assert!(
        csv.starts_with("seq,time,actor,source,action,target,outcome,details,prev_hash,hash\n"),
        "{csv}"
    );
    assert!(
        csv.contains("request.initiate") && csv.contains("deploy-fix-42"),
        "{csv}"
    );

    let recent = c.jg(&["audit", "show", "--since", "1h"]).ok().stdout;
    assert_eq!(recent.matches("request.initiate").count(), 2, "{recent}");
    let json_lines = c.jg(&["audit", "show", "--since", "1h", "--json"]).ok();
    let events: Vec<Value> = json_lines
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["action"] == "request.initiate"));
    let future = c
        .jg(&["audit", "show", "--since", "2999-01-01T00:00:00Z"])
        .ok();
    assert!(future.stdout.trim().is_empty(), "{}", future.stdout);
    let by_actor = c.jg(&["audit", "show", "--actor", "nobody"]).ok();
    assert!(by_actor.stdout.trim().is_empty(), "{}", by_actor.stdout);

    // --follow prints new events as they happen.
    let mut follow = Command::new(BIN);
    for k in CLEARED_ENV {
        follow.env_remove(k);
    }
    let mut child = follow
        .args(["audit", "show", "--vm", "web-1", "--follow"])
        .env("JITGATE_CONFIG_DIR", c.no_config())
        .env("JITGATE_URL", &c.base)
        .env("JITGATE_TOKEN", ADMIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    // Reads until the revoke shows up, then closes the pipe (like `| grep -m1`).
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let last = line.contains("request.revoke");
            if tx.send(line).is_err() || last {
                break;
            }
        }
    });
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(e) => panic!("--follow never printed {what}: {e}"),
            }
        }
    };
    wait_for("request.initiate");
    c.jg(&["revoke", "web-1"]).ok();
    let line = wait_for("request.revoke");
    assert!(line.contains("prod/web-1"), "{line}");
    reader.join().unwrap();
    // The reader is gone: the next event ends `--follow` quietly (the shell's SIGPIPE
    // status), not with a panic about a broken pipe.
    c.jg(&["request", "web-1", "--port", "22", "--from", "10.1.2.9"])
        .ok();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("--follow kept running after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(141), "{status}: {err}");
}

// ---- 8. help, completions, man --------------------------------------------------------------

/// The subcommand names listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_subcommand_has_an_example_and_completions_and_man_page_render() {
    let none = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell], &[], none.path()).ok();
        assert!(
            out.stdout.len() > 1000 && out.stdout.contains("jitgate"),
            "{shell}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("revoke"), "{shell} completes verbs");
    }
    let man = run(&["man"], &[], none.path()).ok();
    assert!(man.stdout.contains(".TH") && man.stdout.contains("jitgate"));

    let top = run(&["--help"], &[], none.path()).ok().stdout;
    let mut todo: Vec<Vec<String>> = subcommands(&top).into_iter().map(|c| vec![c]).collect();
    for expected in [
        "login",
        "enable",
        "disable",
        "request",
        "ssh",
        "connect",
        "revoke",
        "requests",
        "vm",
        "token",
        "role",
        "audit",
        "enroll-token",
        "completions",
        "man",
    ] {
        assert!(
            todo.iter().any(|c| c[0] == expected),
            "`jitgate --help` does not list {expected}: {top}"
        );
    }
    let mut seen = 0;
    let mut missing = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = run(&args, &[], none.path()).ok();
        seen += 1;
        if !out.stdout.contains("Example:") {
            missing.push(path.join(" "));
        }
        for sub in subcommands(&out.stdout) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    assert!(seen > 30, "only {seen} commands found");
    assert!(missing.is_empty(), "--help without an example: {missing:?}");
}

/// Issue 9.6: `enable web-1 --port 22 --port 2222` replaced port 22's rule and so
/// ended everyone's live grant on it, though nothing about port 22 changed. A port
/// already protected keeps its rule (and its grants) unless a flag reshapes it.
#[test]
fn enable_keeps_the_rules_and_grants_of_ports_it_does_not_change() {
    let c = start();
    c.register("prod", "web-1");
    c.jg(&[
        "enable",
        "web-1",
        "--port",
        "22",
        "--max",
        "1h",
        "--from",
        "10.0.0.0/8",
    ])
    .ok();
    c.jg(&[
        "request", "web-1", "--port", "22", "--for", "30m", "--from", "10.1.2.3",
    ])
    .ok();
    let before = entries(&c.policy_of("web-1").unwrap())["web-1"].clone();

    c.jg(&["enable", "web-1", "--port", "22", "--port", "2222"])
        .ok();
    let after = entries(&c.policy_of("web-1").unwrap())["web-1"].clone();
    assert_eq!(after[0], before[0], "port 22's rule changed: {after}");
    assert_eq!(after[1], port_rule(2222, "PT10800S", "*"), "{after}");
    let live = c.json(&["requests", "--vm", "web-1", "--active"]);
    assert_eq!(
        live["value"].as_array().unwrap().len(),
        1,
        "the live grant on port 22 was ended: {live}"
    );

    // A flag that reshapes the port does change it (and the policy update decides
    // which grants the new rule still allows).
    c.jg(&["enable", "web-1", "--port", "22", "--max", "2h"])
        .ok();
    let reshaped = entries(&c.policy_of("web-1").unwrap())["web-1"].clone();
    assert_eq!(
        reshaped[0]["maxRequestAccessDuration"], "PT7200S",
        "{reshaped}"
    );
    assert_eq!(reshaped[1], after[1], "port 2222 was not listed and stays");
}

// ---- 9. a command line that speaks human (issue 9.7) ------------------------------------

/// The lines of a table whose first column is `first`.
fn rows_starting<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table.lines().filter(|l| l.starts_with(first)).collect()
}

/// The column of `header` in a table's header line (its start, in characters).
fn column(table: &str, header: &str) -> usize {
    let head = table.lines().next().unwrap();
    head.find(header)
        .unwrap_or_else(|| panic!("no {header} column: {head}"))
}

#[test]
fn whoami_and_status_tell_who_you_are_and_how_the_controller_is() {
    let c = start();
    c.register("prod", "web-1");
    c.register("prod", "web-2");
    c.jg(&["enable", "web-1", "--port", "22"]).ok();
    c.jg(&["request", "web-1", "--port", "22", "--from", "10.0.0.7"])
        .ok();
    let sub = c.subscription();

    let who = c.jg(&["whoami"]).ok().stdout;
    for want in [
        "principal:    bootstrap-admin",
        &format!("subscription: {sub}"),
        "your address: 127.0.0.1",
        &format!("controller:   {}", c.base),
        &format!("Owner at /subscriptions/{sub}"),
    ] {
        assert!(who.contains(want), "no {want:?} in:\n{who}");
    }
    let v = c.json(&["whoami"]);
    assert_eq!(v["principal"], "bootstrap-admin");
    assert_eq!(v["callerIp"], "127.0.0.1");
    assert_eq!(v["controller"], c.base.as_str());
    assert_eq!(v["roles"][0]["role"], "Owner", "{v}");

    let out = c.jg(&["status"]).ok().stdout;
    for want in [
        &format!(
            "controller:  {} reachable, version {}",
            c.base,
            env!("CARGO_PKG_VERSION")
        ),
        "connection:  plain HTTP, not encrypted",
        "you:         bootstrap-admin",
        "machines:    2 you can see; agents 0 online, 0 offline, 2 without an agent",
        "live grants: 1",
        "audit chain: intact, ",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let v = c.json(&["status"]);
    assert_eq!(v["reachable"], true);
    assert_eq!(v["tls"], false);
    assert_eq!(v["machines"], 2);
    assert_eq!(v["agents"], json!({"online": 0, "offline": 0, "none": 2}));
    assert_eq!(v["liveGrants"], 1);
    assert_eq!(v["audit"]["ok"], true, "{v}");
    assert!(v["audit"]["events"].as_u64().unwrap() > 3, "{v}");
    // The VM list says which machines have an agent (none here).
    let vms = c.json(&["vm", "list"]);
    assert_eq!(vms["value"][0]["agent"]["enrolled"], false, "{vms}");
    let table = c.jg(&["vm", "list"]).ok().stdout;
    assert!(table.lines().next().unwrap().contains("AGENT"), "{table}");
    assert_eq!(rows_starting(&table, "prod").len(), 2, "{table}");

    // Someone who may not read the audit log still gets the rest.
    let (_, alice) = c.user("alice", "JIT Requester");
    let out = c.jg_as(&alice, &["status"]).ok().stdout;
    assert!(out.contains("audit chain: not shown"), "{out}");
    assert!(out.contains("you:         alice"), "{out}");
    let who = c.jg_as(&alice, &["whoami"]).ok().stdout;
    assert!(who.contains("JIT Requester at /subscriptions/"), "{who}");
    // A controller that is not there: exit 1, saying where it looked.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    run(&["status", "--url", &nowhere], &[], &c.no_config()).fails(1, &["cannot reach", &nowhere]);
}

#[test]
fn tables_say_active_or_ended_with_the_reason_apart_and_fit_the_terminal() {
    let c = start();
    c.register("prod", "web-1");
    c.register("prod", "web-2");
    c.jg(&["enable", "web-1", "web-2", "--port", "22", "--port", "3389"])
        .ok();
    let id = |out: Out| {
        out.json()["requests"][0]["request"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let live = id(c.jg(&[
        "request", "web-1", "--port", "22", "--from", "10.0.0.1", "--json",
    ]));
    let revoked = id(c.jg(&[
        "request", "web-2", "--port", "22", "--from", "10.0.0.2", "--json",
    ]));
    c.jg(&["revoke", &revoked]).ok();
    let superseded = id(c.jg(&[
        "request", "web-1", "--port", "3389", "--from", "10.0.0.3", "--json",
    ]));
    let newer = id(c.jg(&[
        "request", "web-1", "--port", "3389", "--from", "10.0.0.3", "--json",
    ]));
    let by_policy = id(c.jg(&[
        "request", "web-2", "--port", "3389", "--from", "10.0.0.4", "--json",
    ]));
    // Narrowing port 3389's sources on web-2 ends the grant from 10.0.0.4.
    c.jg(&[
        "enable",
        "web-2",
        "--port",
        "3389",
        "--from",
        "192.0.2.0/24",
    ])
    .ok();

    let table = c.jg(&["requests"]).ok().stdout;
    let (status, reason, until) = (
        column(&table, "STATUS"),
        column(&table, "REASON"),
        column(&table, "UNTIL"),
    );
    let row = |id: &str| {
        let r = rows_starting(&table, id);
        assert_eq!(r.len(), 1, "{id}: {table}");
        let cell = |from: usize, to: usize| {
            r[0].chars()
                .skip(from)
                .take(to - from)
                .collect::<String>()
                .trim()
                .to_owned()
        };
        (cell(status, reason), cell(reason, until))
    };
    assert_eq!(row(&live), ("Active".into(), "-".into()), "{table}");
    assert_eq!(row(&newer), ("Active".into(), "-".into()), "{table}");
    assert_eq!(row(&revoked), ("Ended".into(), "Revoked".into()), "{table}");
    assert_eq!(
        row(&superseded),
        ("Ended".into(), "Superseded by a newer request".into()),
        "{table}"
    );
    assert_eq!(
        row(&by_policy),
        ("Ended".into(), "Policy changed".into()),
        "{table}"
    );
    // Times are local wall times with what is left or past, never raw UTC.
    assert!(!table.contains("Z ") && !table.contains("T0"), "{table}");
    assert!(table.contains("(in "), "{table}");

    // A narrow terminal: every line fits, the widest columns give way.
    let narrow = c.jg_env(&[("COLUMNS", "100")], &["requests"]).ok().stdout;
    for line in narrow.lines() {
        assert!(line.chars().count() <= 100, "{} wide: {line}", line.len());
    }
    assert!(narrow.contains('…'), "nothing was cut: {narrow}");
    assert!(
        narrow.lines().next().unwrap().contains("STATUS"),
        "{narrow}"
    );
    // A pipe without COLUMNS is never cut.
    assert!(!table.contains('…'), "{table}");

    // Tokens say Active or Ended and why, with their expiry in local time.
    let t = c.json(&[
        "token",
        "create",
        "--principal",
        "zed",
        "--expires-in",
        "2h",
    ]);
    c.jg(&["token", "revoke", t["id"].as_str().unwrap()]).ok();
    let tokens = c.jg(&["token", "list"]).ok().stdout;
    let zed = rows_starting(&tokens, t["id"].as_str().unwrap());
    assert!(
        zed[0].contains("Ended") && zed[0].contains("Revoked") && zed[0].contains("(in 1h 59m"),
        "{tokens}"
    );
    assert!(
        tokens.contains("never") && tokens.contains("Active"),
        "{tokens}"
    );
}

#[test]
fn durations_and_scopes_as_people_write_them() {
    let c = start();
    let sub = c.subscription();
    // --expires-in: 30d and ISO P30D mean the same.
    for text in ["30d", "P30D"] {
        let t = c.json(&[
            "token",
            "create",
            "--principal",
            "zed",
            "--expires-in",
            text,
        ]);
        let left = seconds_until(t["expiresAt"].as_str().unwrap());
        assert!(
            (30 * 86400 - 60..=30 * 86400).contains(&left),
            "{text}: {t}"
        );
    }
    let out = c
        .jg(&[
            "token",
            "create",
            "--principal",
            "zed",
            "--expires-in",
            "12h",
        ])
        .ok();
    assert!(
        out.stderr.contains("expires ") && out.stderr.contains("(in 11h 59m"),
        "{}",
        out.stderr
    );
    // Scopes by resource group name, or by full id.
    let e = c.json(&[
        "enroll-token",
        "create",
        "--resource-group",
        "prod",
        "--expires-in",
        "1d",
    ]);
    assert_eq!(
        e["scope"],
        format!("/subscriptions/{sub}/resourceGroups/prod")
    );
    let left = seconds_until(e["expiresAt"].as_str().unwrap());
    assert!((86400 - 60..=86400).contains(&left), "{e}");
    let e = c.json(&[
        "enroll-token",
        "create",
        "--scope",
        &format!("/subscriptions/{sub}"),
    ]);
    assert_eq!(e["scope"], format!("/subscriptions/{sub}"));
    let listed = c.jg(&["enroll-token", "list"]).ok().stdout;
    assert!(
        listed.lines().next().unwrap().contains("STATUS"),
        "{listed}"
    );
    assert_eq!(listed.matches("Active").count(), 2, "{listed}");
    let r = c.json(&[
        "role",
        "assign",
        "--principal",
        "zed",
        "--role",
        "JIT Requester",
        "--resource-group",
        "prod",
    ]);
    assert_eq!(
        r["scope"],
        format!("/subscriptions/{sub}/resourceGroups/prod")
    );
    // --scope and --resource-group together: clap says they conflict.
    let out = c.jg(&[
        "role",
        "assign",
        "--principal",
        "zed",
        "--role",
        "Reader",
        "--resource-group",
        "prod",
        "--scope",
        &format!("/subscriptions/{sub}"),
    ]);
    assert_eq!(out.code, Some(2), "{out:?}");
    // Durations come out as people write them.
    c.register("prod", "web-1");
    let out = c
        .jg(&["enable", "web-1", "--port", "22", "--max", "90m"])
        .ok();
    assert!(
        out.stdout
            .contains("JIT enabled on prod/web-1: ports 22 (max 1h 30m per request)"),
        "{}",
        out.stdout
    );
    let rule = &entries(&c.policy_of("web-1").unwrap())["web-1"][0];
    assert_eq!(rule["maxRequestAccessDuration"], "PT5400S");
}

#[test]
fn audit_show_has_a_header_source_and_justification_and_the_vms_policy_events() {
    let c = start();
    c.register("prod", "web-1");
    c.register("prod", "web-2");
    c.register("lab", "db");
    c.jg(&["enable", "web-1", "web-2", "--port", "22"]).ok();
    c.jg(&["enable", "db", "--port", "22"]).ok();
    c.jg(&[
        "request",
        "web-1",
        "--port",
        "22",
        "--from",
        "10.1.2.3",
        "--reason",
        "deploy-fix-42",
    ])
    .ok();
    c.jg(&["disable", "web-1"]).ok();
    // A change to its old policy after web-1 left it is not web-1's.
    c.jg(&["enable", "web-2", "--port", "2222"]).ok();

    let out = c.jg(&["audit", "show", "--vm", "web-1"]).ok().stdout;
    let head = out.lines().next().unwrap();
    for h in [
        "SEQ",
        "TIME",
        "ACTOR",
        "SOURCE",
        "ACTION",
        "TARGET",
        "OUTCOME",
        "JUSTIFICATION",
    ] {
        assert!(head.contains(h), "no {h} in {head}");
    }
    let actions: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(5).unwrap())
        .collect();
    // (SEQ, date, time, ACTOR, SOURCE, ACTION...): web-1's own events, the policy
    // change that added it and the one that removed it (ending its grant), not the
    // later change to that policy, nor anything of lab/db.
    assert_eq!(
        actions,
        [
            "vm.register",
            "policy.create",
            "request.initiate",
            "request.endedByPolicy",
            "policy.update"
        ],
        "{out}"
    );
    let initiate = out
        .lines()
        .find(|l| l.contains("request.initiate"))
        .unwrap();
    assert!(
        initiate.contains("127.0.0.1")
            && initiate.contains("deploy-fix-42")
            && initiate.contains("prod/web-1"),
        "{initiate}"
    );
    assert!(out.contains("policy prod/default"), "{out}");
    assert!(!out.contains("lab/"), "{out}");
    // --since still finds the removal, though web-1 joined the policy before it.
    let json = c
        .jg(&["audit", "show", "--vm", "web-1", "--json"])
        .ok()
        .stdout;
    let events: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let removal = events
        .iter()
        .rfind(|e| e["action"] == "policy.update")
        .unwrap();
    let since = removal["time"].as_str().unwrap();
    let later = c
        .jg(&["audit", "show", "--vm", "web-1", "--since", since])
        .ok()
        .stdout;
    assert!(later.contains("policy.update"), "{later}");
    assert!(!later.contains("policy.create"), "{later}");
    // --limit takes the first events of the merged list; --actor applies to both.
    let first = c
        .jg(&["audit", "show", "--vm", "web-1", "--limit", "2", "--json"])
        .ok()
        .stdout;
    let first: Vec<Value> = first
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[1]["action"], "policy.create", "{first:?}");
    c.jg(&["audit", "show", "--vm", "web-1", "--actor", "nobody"])
        .ok();
    let none = c
        .jg(&[
            "audit", "show", "--vm", "web-1", "--actor", "nobody", "--json",
        ])
        .ok()
        .stdout;
    assert!(none.trim().is_empty(), "{none}");
    // --action narrows the policy events too.
    let only = c
        .jg(&["audit", "show", "--vm", "web-1", "--action", "request."])
        .ok()
        .stdout;
    assert!(!only.contains("policy."), "{only}");
    assert!(only.contains("request.initiate"), "{only}");
}

#[test]
fn ssh_says_until_when_and_how_to_revoke_and_revoke_on_exit_ends_the_grant() {
    let c = start();
    c.register("prod", "web-1");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = listener.local_addr().unwrap().port().to_string();
    c.jg(&["enable", "web-1", "--port", &p, "--max", "1h"]).ok();
    // A stand-in for ssh that says what it got and ends with its own status.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake-ssh");
    std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\nexit 42\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = fake.to_str().unwrap();
    let ssh = |extra: &[&str]| {
        let mut args = vec![
            "ssh",
            "admin@web-1",
            "--port",
            p.as_str(),
            "--host",
            "127.0.0.1",
            "--ssh",
            fake,
        ];
        args.extend_from_slice(extra);
        c.jg(&args)
    };

    // --for: a short grant; --revoke-on-exit: ended when ssh exits, whose status is ours.
    let out = ssh(&["--for", "15m", "--revoke-on-exit", "--", "uptime"]);
    assert_eq!(out.code, Some(42), "{out:?}");
    assert_eq!(out.stdout, format!("-p {p} admin@127.0.0.1 uptime\n"));
    assert!(
        out.stderr.contains("(in 14m 5") || out.stderr.contains("(in 15m)"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("until ssh exits"), "{}", out.stderr);
    assert!(
        out.stderr.contains("ssh exited; revoked request"),
        "{}",
        out.stderr
    );
    let reqs = c.json(&["requests", "--vm", "web-1"]);
    let port = &reqs["value"][0]["virtualMachines"][0]["ports"][0];
    assert_eq!(port["status"], "Revoked", "{reqs}");
    assert_eq!(port["statusReason"], "UserRequested", "{reqs}");
    assert!(
        c.json(&["vm", "show", "web-1"])["grants"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Without it: ssh replaces jitgate, after saying until when and how to revoke.
    let out = ssh(&["--for", "20m"]);
    assert_eq!(out.code, Some(42), "{out:?}");
    let id = c.json(&["requests", "--vm", "web-1", "--active"])["value"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        out.stderr.contains("stays open until")
            && out
                .stderr
                .contains(&format!("end it sooner with: jitgate revoke {id}")),
        "{}",
        out.stderr
    );
    // A grant reused from earlier is not this run's to revoke.
    let out = ssh(&["--revoke-on-exit"]);
    assert_eq!(out.code, Some(42), "{out:?}");
    assert!(out.stderr.contains("reusing"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("request {id} was not made by this run")),
        "{}",
        out.stderr
    );
    assert_eq!(
        c.json(&["requests", "--vm", "web-1", "--active"])["value"][0]["id"],
        id.as_str()
    );

    // connect --json: where to connect, until when, which request.
    let v = c.json(&[
        "connect",
        "web-1",
        "--port",
        &p,
        "--host",
        "127.0.0.1",
        "--wait",
        "5s",
    ]);
    assert_eq!(v["address"], format!("127.0.0.1:{p}"));
    assert_eq!(v["request"], id.as_str());
    assert_eq!(v["reused"], true);
    assert!(seconds_until(v["endTimeUtc"].as_str().unwrap()) > 60, "{v}");
    let out = c
        .jg(&["connect", "web-1", "--port", &p, "--host", "127.0.0.1"])
        .ok();
    assert!(
        out.stdout
            .contains(&format!("end it sooner with: jitgate revoke {id}")),
        "{}",
        out.stdout
    );
}

#[test]
fn man_pages_per_verb_and_help_document_the_exit_codes() {
    let none = tempfile::tempdir().unwrap();
    let ssh = run(&["man", "ssh"], &[], none.path()).ok().stdout;
    for section in [
        ".TH JITGATE-SSH",
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH \"EXAMPLES\"",
        ".SH \"EXIT STATUS\"",
        ".SH \"ENVIRONMENT\"",
        ".SH \"FILES\"",
    ] {
        assert!(
            ssh.contains(section),
            "no {section} in `jitgate man ssh`:\n{ssh}"
        );
    }
    assert!(
        ssh.contains("revoke\\-on\\-exit") && ssh.contains("JITGATE_URL"),
        "{ssh}"
    );
    let top = run(&["man"], &[], none.path()).ok().stdout;
    assert!(
        top.contains(".TH JITGATE ") && top.contains(".SH \"EXIT STATUS\""),
        "{top}"
    );
    let sub = run(&["man", "token", "create"], &[], none.path())
        .ok()
        .stdout;
    assert!(
        sub.contains(".TH JITGATE-TOKEN-CREATE") && sub.contains("\\-\\-expires\\-in"),
        "{sub}"
    );
    run(&["man", "nope"], &[], none.path()).fails(2, &["`nope`"]);
    let help = run(&["--help"], &[], none.path()).ok().stdout;
    assert!(help.contains("Exit status:"), "{help}");
    for line in [
        "  2   Usage error",
        "  5   Refused as invalid",
        "  7   audit verify",
    ] {
        assert!(help.contains(line), "no {line:?} in --help:\n{help}");
    }
}

#[test]
fn every_verb_that_prints_has_json() {
    let c = start();
    c.register("prod", "web-1");
    c.register("prod", "web-2");
    c.jg(&["enable", "web-1", "web-2", "--port", "22"]).ok();
    let v = c.json(&["disable", "web-2"]);
    assert!(
        v["disabled"][0]["vm"].as_str().unwrap().ends_with("/web-2"),
        "{v}"
    );
    let t = c.json(&["token", "create", "--principal", "zed"]);
    let id = t["id"].as_str().unwrap();
    assert_eq!(c.json(&["token", "revoke", id]), json!({"revoked": id}));
    let r = c.json(&[
        "role",
        "assign",
        "--principal",
        "zed",
        "--role",
        "Reader",
        "--resource-group",
        "prod",
    ]);
    let rid = r["id"].as_str().unwrap();
    assert_eq!(c.json(&["role", "remove", rid]), json!({"removed": rid}));
    let e = c.json(&["enroll-token", "create"]);
    let eid = e["id"].as_str().unwrap();
    assert_eq!(
        c.json(&["enroll-token", "revoke", eid]),
        json!({"revoked": eid})
    );
    let cfg = c.dir.path().join("json-login");
    let out = run_with_stdin(
        &["login", &c.base, "--token-stdin", "--json"],
        &[],
        &cfg,
        Some(&format!("{ADMIN}\n")),
    )
    .ok();
    let v = out.json();
    assert_eq!(v["principal"], "bootstrap-admin");
    assert_eq!(v["url"], c.base.as_str());
    let v = c.json(&["vm", "nsg", "prod", "web-1"]);
    assert!(v["rules"].is_array(), "{v}");
}

// ---- approvals ---------------------------------------------------------------------------

/// A rule makes a request wait: `request --wait` waits and says who decided; the
/// approver finds it with `approvals`, decides with `approve`/`deny`; nobody approves
/// their own request; `cancel` withdraws one.
#[test]
fn approvers_decide_from_the_command_line_and_the_requester_waits_for_them() {
    let c = start();
    c.register("prod", "web-1");
    c.jg(&["enable", "web-1"]).ok();
    let scope = format!("/subscriptions/{}/resourceGroups/prod", c.subscription());
    let (status, body) = common::call(
        "PUT",
        &format!("{}/api/v1/approvalRules/ssh", c.base),
        ADMIN,
        Some(json!({"scope": scope, "justificationPattern": "^CHG-"})),
    );
    assert_eq!(status, 201, "{body}");
    let (status, t) = common::call(
        "POST",
        &format!("{}/api/v1/tokens", c.base),
        ADMIN,
        Some(json!({"principal": "amy"})),
    );
    assert_eq!(status, 201, "{t}");
    let amy = t["token"].as_str().unwrap().to_owned();
    let (status, body) = common::call(
        "POST",
        &format!("{}/api/v1/roleAssignments", c.base),
        ADMIN,
        Some(json!({"principal": "amy", "role": "JIT Approver", "scope": scope})),
    );
    assert_eq!(status, 201, "{body}");

    // The justification the rule asks for is checked before anything is made.
    c.jg(&["request", "web-1", "--reason", "fix"])
        .fails(5, &["--reason", "CHG-"]);
    assert_eq!(
        c.jg_as(&amy, &["approvals"]).ok().stdout.trim(),
        "no request waits for your decision"
    );

    // Waiting for the decision, in the background.
    let base = c.base.clone();
    let cfg = c.no_config();
    let waiting = std::thread::spawn(move || {
        run(
            &["request", "web-1", "--reason", "CHG-1 restart", "--wait"],
            &[("JITGATE_URL", &base), ("JITGATE_TOKEN", ADMIN)],
            &cfg,
        )
    });
    let id = common::wait_for(
        "the request in amy's approvals",
        Duration::from_secs(10),
        || {
            let list = c.jg_as(&amy, &["approvals", "--json"]).ok().json();
            list["value"][0]["id"].as_str().map(str::to_owned)
        },
    );
    // Nobody approves their own request, an Owner included.
    c.jg(&["approve", &id]).fails(4, &["own request"]);
    let out = c
        .jg_as(&amy, &["approve", &id, "--reason", "ok", "--for", "30m"])
        .ok();
    assert!(out.stdout.contains("approved"), "{}", out.stdout);
    let done = waiting.join().unwrap().ok();
    assert!(
        done.stderr.contains("approved by amy (ok)"),
        "{}",
        done.stderr
    );
    assert!(
        done.stdout.contains("waiting for approval"),
        "{}",
        done.stdout
    );
    assert!(
        done.stdout.contains("open prod/web-1 port 22"),
        "{}",
        done.stdout
    );

    // Denied: the waiting requester is told by whom and why, and fails.
    let base = c.base.clone();
    let cfg = c.no_config();
    let waiting = std::thread::spawn(move || {
        run(
            &["request", "web-1", "--reason", "CHG-2", "--wait"],
            &[("JITGATE_URL", &base), ("JITGATE_TOKEN", ADMIN)],
            &cfg,
        )
    });
    let id = common::wait_for("the second request", Duration::from_secs(10), || {
        let list = c.jg_as(&amy, &["approvals", "--json"]).ok().json();
        list["value"][0]["id"].as_str().map(str::to_owned)
    });
    c.jg_as(&amy, &["deny", &id, "--reason", "not today"]).ok();
    waiting
        .join()
        .unwrap()
        .fails(4, &["denied by amy (not today)"]);

    // Withdrawn by its requestor.
    let out = c
        .jg(&["request", "web-1", "--reason", "CHG-3", "--json"])
        .ok()
        .json();
    let id = out["requests"][0]["request"].as_str().unwrap().to_owned();
    c.jg_as(&amy, &["cancel", &id]).fails(4, &["requestor"]);
    c.jg(&["cancel", &id]).ok();
    let shown = c.json(&["requests", "--mine"]);
    assert!(shown.to_string().contains("Cancelled"), "{shown}");
}
