//! The real `jitgate` binary: `serve` start-up, bootstrap, configuration, signals,
//! durability across `kill -9`, admin verbs, and `audit verify` on a tampered database.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{BIN, call, capture_stderr, free_port};

struct Server {
    child: Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str], envs: &[(&str, &str)]) -> Server {
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !args.contains(&"--listen") && !args.contains(&"--config") {
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log = capture_stderr(&mut child);
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    }
}

fn wait_listening(s: &mut Server, base: &str) {
    common::wait_listening(
        &mut s.child,
        base.trim_start_matches("http://"),
        &s.log,
        Duration::from_secs(10),
    );
}

fn jitgate(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn first_start_writes_a_private_bootstrap_token_and_never_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = serve(&["--data-dir", data.to_str().unwrap()], &[]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let path = data.join("bootstrap-token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    let (status, who) = call("GET", &format!("{base}/api/v1/whoami"), &token, None);
    assert_eq!(status, 200);
    assert_eq!(who["principal"], "bootstrap-admin");
    // A second start keeps the installation and its token.
    drop(s);
    let mut s = serve(&["--data-dir", data.to_str().unwrap()], &[]);
    let base2 = s.base.clone();
    wait_listening(&mut s, &base2);
    let (status, who2) = call("GET", &format!("{base2}/api/v1/whoami"), &token, None);
    assert_eq!(status, 200);
    assert_eq!(who2["subscription"], who["subscription"]);
    let secret = token.split('.').nth(1).unwrap();
    assert!(
        !s.log.lock().unwrap().contains(secret),
        "the token leaked into the log"
    );
    // Logged into a pipe, not a terminal: no colour codes.
    let log = s.log.lock().unwrap().clone();
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a log that is not a terminal: {log:?}"
    );
}

#[test]
fn bootstrap_token_from_the_environment_and_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("jitgate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nlog_format = \"json\"\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let token = "operator-chosen-bootstrap-token";
    let mut s = serve(
        &["--config", config.to_str().unwrap()],
        &[("JITGATE_BOOTSTRAP_TOKEN", token)],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_listening(&mut s, &base);
    let (status, _) = call("GET", &format!("{base}/api/v1/whoami"), token, None);
    assert_eq!(status, 200);
    assert!(
        !dir.path().join("d/bootstrap-token").exists(),
        "no file when the token is given"
    );
    // JSON logs.
    std::thread::sleep(Duration::from_millis(100));
    let log = s.log.lock().unwrap().clone();
    let first = log.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<Value>(first).is_ok(),
        "not JSON: {first}"
    );
    assert!(!log.contains(token));
}

#[test]
fn a_public_address_without_a_certificate_gets_https_from_the_controllers_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let s = serve(
        &[
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--tls-san",
            "jit.example.com",
        ],
        &[("NO_COLOR", "1")],
    );
    let start = Instant::now();
    while !s.log.lock().unwrap().contains("controller listening") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not listening: {}",
            s.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.contains("serving HTTPS with the controller's own CA"),
        "{log}"
    );
    assert!(log.contains("ca_fingerprint=sha256:"), "{log}");
    // curl-style clients trust it with the CA file; plain HTTP gets nothing.
    let ca = data.join("tls").join("ca.pem");
    let out = Command::new("curl")
        .args(["-sS", "--cacert", ca.to_str().unwrap()])
        .args(["--resolve", &format!("jit.example.com:{port}:127.0.0.1")])
        .arg(format!("https://jit.example.com:{port}/api/v1/health"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"status\":\"ok\""),
        "{out:?}"
    );
    let out = jitgate(
        &[
            "vm",
            "list",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--token",
            "x",
        ],
        &[("JITGATE_CONFIG_DIR", dir.path().to_str().unwrap())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(err.contains("serves HTTPS"), "{err}");
    drop(s);

    // Flags that exclude each other are refused before anything starts.
    let out = jitgate(
        &[
            "serve",
            "--tls-cert",
            "x.pem",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a certificate without a key must be refused"
    );
    let out = jitgate(&["serve", "--tls-san", "not a name"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--tls-san"), "{err}");
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[("JITGATE_BOOTSTRAP_TOKEN", "sigterm-test-token-123")],
    );
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let status = stop(&mut s);
    assert!(status.success(), "{status}: {}", s.log.lock().unwrap());
    assert!(s.log.lock().unwrap().contains("shutting down"));
}

fn setup_policy(base: &str, token: &str, sub: &str) {
    let (s, b) = call(
        "POST",
        &format!("{base}/api/v1/vms"),
        token,
        Some(json!({"resourceGroup": "rg", "name": "vm1"})),
    );
    assert_eq!(s, 201, "{b}");
    let vm = format!(
        "/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
    );
    let url = format!(
        "{base}/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?api-version=2020-01-01"
    );
    let (s, b) = call(
        "PUT",
        &url,
        token,
        Some(
            json!({"properties": {"virtualMachines": [{"id": vm, "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT3H"}]}]}}),
        ),
    );
    assert_eq!(s, 200, "{b}");
    let url = url.replace("/default?", "/default/initiate?");
    let (s, b) = call(
        "POST",
        &url,
        token,
        Some(
            json!({"virtualMachines": [{"id": vm, "ports": [{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]}]}),
        ),
    );
    assert_eq!(s, 202, "{b}");
}

/// A controller on `data` with `token` as its bootstrap token, a policy and a request
/// (`setup_policy`); returns it and its subscription.
fn serve_with_a_request(data: &str, token: &str) -> (Server, String) {
    let mut s = serve(&["--data-dir", data], &[("JITGATE_BOOTSTRAP_TOKEN", token)]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let (_, who) = call("GET", &format!("{base}/api/v1/whoami"), token, None);
    let sub = who["subscription"].as_str().unwrap().to_owned();
    setup_policy(&base, token, &sub);
    (s, sub)
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let token = "kill-nine-test-token-123";
    let data = dir.path().to_str().unwrap();
    let (mut s, sub) = serve_with_a_request(data, token);
    s.child.kill().unwrap(); // SIGKILL: no shutdown code runs.
    s.child.wait().unwrap();
    let mut s = serve(&["--data-dir", data], &[("JITGATE_BOOTSTRAP_TOKEN", token)]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let url = format!(
        "{base}/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?api-version=2020-01-01"
    );
    let (status, policy) = call("GET", &url, token, None);
    assert_eq!(status, 200);
    assert_eq!(
        policy["properties"]["requests"].as_array().unwrap().len(),
        1
    );
    assert_eq!(
        policy["properties"]["requests"][0]["virtualMachines"][0]["ports"][0]["status"],
        "Initiated"
    );
    let out = jitgate(&["audit", "verify", "--data-dir", data], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn admin_verbs_and_audit_verify_detect_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let token = "admin-verbs-test-token-123";
    let data = dir.path().to_str().unwrap();
    let mut s = serve(&["--data-dir", data], &[("JITGATE_BOOTSTRAP_TOKEN", token)]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let env = [("JITGATE_URL", base.as_str()), ("JITGATE_TOKEN", token)];
    let out = jitgate(
        &["vm", "register", "lab", "box-1", "--location", "westeurope"],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("/resourceGroups/lab/providers/Microsoft.Compute/virtualMachines/box-1")
    );
    let out = jitgate(&["vm", "list", "--json"], &env);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["value"].as_array().unwrap().len(), 1);
    let out = jitgate(
        &[
            "token",
            "create",
            "--principal",
            "alice@example.com",
            "--expires-in",
            "P1D",
        ],
        &env,
    );
    assert!(out.status.success());
    let alice = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(alice.starts_with("jg_"), "{alice}");
    let (_, who) = call("GET", &format!("{base}/api/v1/whoami"), token, None);
    let scope = format!("/subscriptions/{}", who["subscription"].as_str().unwrap());
    let out = jitgate(
        &[
            "role",
            "assign",
            "--principal",
            "alice@example.com",
            "--role",
            "Reader",
            "--scope",
            &scope,
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = jitgate(
        &["vm", "list"],
        &[
            ("JITGATE_URL", base.as_str()),
            ("JITGATE_TOKEN", alice.as_str()),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("box-1"));
    // Errors are one line with the reason, and a non-zero exit.
    // Errors are one line naming the argument (not the JSON field) and exit 5.
    let out = jitgate(&["vm", "register", "bad rg", "x"], &env);
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("jitgate: RESOURCE_GROUP: "), "{err}");
    let out = jitgate(
        &["vm", "list"],
        &[
            ("JITGATE_URL", base.as_str()),
            ("JITGATE_TOKEN", "wrong-token-wrong-token"),
        ],
    );
    assert_eq!(out.status.code(), Some(4), "not authenticated: exit code 4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not authenticated") && err.contains("jitgate login"),
        "{err}"
    );
    let out = jitgate(&["audit", "verify"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(s);

    let db = Path::new(data).join("jitgate.db");
    let verify = || {
        let out = jitgate(&["audit", "verify", "--data-dir", data], &[]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(verify().0, Some(0), "{}", verify().1);
    let conn = rusqlite::Connection::open(&db).unwrap();
    // Modify one event.
    conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 4", [])
        .unwrap();
    let (code, text) = verify();
    assert_eq!(
        code,
        Some(7),
        "a broken chain is exit 7 (2 is a usage error)"
    );
    assert!(text.contains("event 4 was modified"), "{text}");
    conn.execute(
        "UPDATE audit SET actor = (SELECT actor FROM audit WHERE seq = 5) WHERE seq = 4",
        [],
    )
    .unwrap();
    // (seq 4 and 5 were both by the bootstrap admin: restored.)
    assert_eq!(verify().0, Some(0), "{}", verify().1);
    // Delete one from the middle.
    let row: (String, String, i64, String, String, String, String, String, String, String, String) = conn
        .query_row("SELECT seq, time, time_ns, actor, source, action, target, outcome, details, prev_hash, hash FROM audit WHERE seq = 3", [], |r| {
            Ok((r.get::<_, i64>(0)?.to_string(), r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?))
        })
        .unwrap();
    conn.execute("DELETE FROM audit WHERE seq = 3", []).unwrap();
    let (code, text) = verify();
    assert_eq!(
        code,
        Some(7),
        "a broken chain is exit 7 (2 is a usage error)"
    );
    assert!(text.contains("missing"), "{text}");
    // Put it back, then swap two events' contents (reordering).
    conn.execute(
        "INSERT INTO audit(seq, time, time_ns, actor, source, action, target, outcome, details, prev_hash, hash) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
        rusqlite::params![row.0.parse::<i64>().unwrap(), row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8, row.9, row.10],
    )
    .unwrap();
    assert_eq!(verify().0, Some(0), "{}", verify().1);
    conn.execute_batch(
        "UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = -1;",
    )
    .unwrap();
    let (code, text) = verify();
    assert_eq!(
        code,
        Some(7),
        "a broken chain is exit 7 (2 is a usage error)"
    );
    assert!(text.contains("BROKEN"), "{text}");
    conn.execute_batch(
        "UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = -1;",
    )
    .unwrap();
    // Delete the last event: caught against the recorded head.
    conn.execute(
        "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)",
        [],
    )
    .unwrap();
    let (code, text) = verify();
    assert_eq!(
        code,
        Some(7),
        "a broken chain is exit 7 (2 is a usage error)"
    );
    assert!(text.contains("deleted from the end"), "{text}");
}

/// SIGTERM, then waits (at most 10 s) for the exit.
fn stop(s: &mut Server) -> std::process::ExitStatus {
    let pid = s.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Regression (issue 8.6): the last Owner could revoke its own token and lock
/// everybody out for good. The revoke is refused; and should every Owner credential be
/// lost anyway, `jitgate admin recover` mints a new one locally, only with the
/// controller stopped, audited, with the audit log still anchored.
#[test]
fn admin_recover_mints_an_owner_token_locally_and_only_when_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let owner = "recover-test-owner-token-1234";
    let mut s = serve(&["--data-dir", d], &[("JITGATE_BOOTSTRAP_TOKEN", owner)]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    // While the controller runs, recovery is refused (two writers would fork the chain).
    let out = jitgate(&["admin", "recover", "--data-dir", d], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop the controller first"), "{err}");
    // Lose the Owner credential the hard way (as if its file were gone): revoke it
    // through a second Owner, then revoke that one too.
    let (_, tokens) = call("GET", &format!("{base}/api/v1/tokens"), owner, None);
    let boot = tokens["value"][0]["id"].as_str().unwrap().to_owned();
    let (st, _) = call(
        "DELETE",
        &format!("{base}/api/v1/tokens/{boot}"),
        owner,
        None,
    );
    assert_eq!(st, 409, "the last Owner credential was revocable");
    assert!(stop(&mut s).success());

    let out = jitgate(&["admin", "recover", "--data-dir", d], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(token.starts_with("jg_"), "{token}");

    let mut s = serve(&["--data-dir", d], &[]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let (st, who) = call("GET", &format!("{base}/api/v1/whoami"), &token, None);
    assert_eq!(st, 200, "{who}");
    assert_eq!(who["principal"], "recovery-admin", "{who}");
    let (_, ev) = call(
        "GET",
        &format!("{base}/api/v1/audit?action=admin.recover"),
        &token,
        None,
    );
    assert_eq!(ev["value"].as_array().unwrap().len(), 1, "{ev}");
    let (_, v) = call("GET", &format!("{base}/api/v1/audit/verify"), &token, None);
    assert_eq!(v["ok"], true, "{v}");
    assert!(stop(&mut s).success());
    let out = jitgate(&["audit", "verify", "--data-dir", d], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// An installation moves from its embedded SQLite file to PostgreSQL with
/// `jitgate admin migrate` (refused while the controller runs), its audit chain
/// verifies there against the signed checkpoints of the data directory
/// (`audit verify --database`), and `serve --database` serves the same policy and
/// request from it, to the same bootstrap token.
#[test]
fn an_installation_moves_to_postgres_and_is_served_from_it() {
    let db = jitgate_store_sql::testpg::TestDb::empty();
    let dir = tempfile::tempdir().unwrap();
    let token = "migrate-test-token-1234";
    let data = dir.path().to_str().unwrap();
    let (mut s, sub) = serve_with_a_request(data, token);

    let busy = jitgate(
        &["admin", "migrate", "--from-data-dir", data, "--to", &db.url],
        &[],
    );
    assert!(
        !busy.status.success(),
        "a running controller's data is not copied"
    );
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop the controller"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert!(stop(&mut s).success());

    let out = jitgate(
        &["admin", "migrate", "--from-data-dir", data, "--to", &db.url],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("requests") && stdout.contains("audit chain verified"),
        "{stdout}"
    );

    let out = jitgate(
        &["audit", "verify", "--database", &db.url, "--data-dir", data],
        &[],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("anchored by a signed checkpoint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut s = serve(
        &["--data-dir", data, "--database", &db.url],
        &[("JITGATE_BOOTSTRAP_TOKEN", token)],
    );
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let url = format!(
        "{base}/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?api-version=2020-01-01"
    );
    let (status, policy) = call("GET", &url, token, None);
    assert_eq!(status, 200, "{policy}");
    assert_eq!(
        policy["properties"]["requests"][0]["virtualMachines"][0]["ports"][0]["status"],
        "Initiated"
    );
    assert!(
        s.log.lock().unwrap().contains("PostgreSQL"),
        "{}",
        s.log.lock().unwrap()
    );
}

/// A minimal HTTP receiver on `port` (one request per connection, answered 200):
/// what it got, as (webhook-id, body).
fn hook_receiver(port: u16) -> std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> {
    use std::io::{BufRead, BufReader, Read, Write};
    let got: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut id, mut len) = (String::new(), 0usize);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("webhook-id:") {
                    id = v.trim().to_owned();
                }
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            g.lock()
                .unwrap()
                .push((id, String::from_utf8_lossy(&body).into_owned()));
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    got
}

/// Issue 13: events whose endpoint is down wait in the durable outbox; a kill -9 of
/// the controller loses none, and after the restart each is delivered once.
#[test]
fn undelivered_webhooks_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let token = "webhook-kill-nine-token-12";
    let data = dir.path().to_str().unwrap();
    let hook_port = common::free_port();
    let allow = format!("http://127.0.0.1:{hook_port}/");
    let args = ["--data-dir", data, "--webhook-allow", &allow];
    let mut s = serve(&args, &[("JITGATE_BOOTSTRAP_TOKEN", token)]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    let (status, body) = call(
        "PUT",
        &format!("{base}/api/v1/webhooks/ops"),
        token,
        Some(
            json!({"url": format!("http://127.0.0.1:{hook_port}/hook"), "events": ["grant.started"]}),
        ),
    );
    assert_eq!(status, 201, "{body}");
    let (_, who) = call("GET", &format!("{base}/api/v1/whoami"), token, None);
    setup_policy(&base, token, who["subscription"].as_str().unwrap());
    // At least one attempt fails (nothing listens), then SIGKILL.
    std::thread::sleep(Duration::from_millis(1200));
    let (_, hook) = call("GET", &format!("{base}/api/v1/webhooks/ops"), token, None);
    assert_eq!(hook["waiting"], 1, "{hook}");
    s.child.kill().unwrap();
    s.child.wait().unwrap();

    let got = hook_receiver(hook_port);
    let mut s = serve(&args, &[("JITGATE_BOOTSTRAP_TOKEN", token)]);
    let base = s.base.clone();
    wait_listening(&mut s, &base);
    common::wait_for(
        "the delivery after the restart",
        Duration::from_secs(30),
        || (!got.lock().unwrap().is_empty()).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered once: {got:?}");
    assert!(got[0].0.starts_with("msg_"), "{got:?}");
    let event: Value = serde_json::from_str(&got[0].1).unwrap();
    assert_eq!(event["type"], "grant.started");
}
