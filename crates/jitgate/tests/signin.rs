//! `jitgate login` and `jitgate logout`, the real binary against a real `jitgate serve`
//! signing in with a real OpenID Provider (`testing/oidc-op`), the browser driven over
//! HTTP: the loopback flow (RFC 8252) and the device flow.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

mod common;
#[path = "../../controller/tests/api/op.rs"]
mod op;

use common::{BIN, capture_stderr, free_port};
use op::{Browser, Op, SECRET};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `jitgate serve` signing in with `op`, on `port`.
fn serve(dir: &std::path::Path, port: u16, op: &Op) -> Running {
    let secret = dir.join("client-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--public-url",
            &base,
        ])
        .args(["--oidc-issuer", &op.issuer, "--oidc-client-id", "jitgate"])
        .arg("--oidc-client-secret-file")
        .arg(&secret)
        .args(["--session-lifetime", "2h"])
        .env("JITGATE_BOOTSTRAP_TOKEN", "signin-test-owner-token-0123")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = capture_stderr(&mut child);
    common::wait_listening(
        &mut child,
        &format!("127.0.0.1:{port}"),
        &log,
        Duration::from_secs(10),
    );
    Running(child)
}

/// `jitgate ARGS` with its own configuration directory; (status, stdout, stderr).
fn jitgate(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("JITGATE_CONFIG_DIR", config)
        .env_remove("JITGATE_TOKEN")
        .env_remove("JITGATE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `jitgate login ARGS` and returns it with the first line of its standard
/// error that contains `marker`.
fn start_login(config: &std::path::Path, args: &[&str], marker: &str) -> (Child, String) {
    let mut child = Command::new(BIN)
        .arg("login")
        .args(args)
        .env("JITGATE_CONFIG_DIR", config)
        .env_remove("JITGATE_TOKEN")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    for _ in 0..20 {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains(marker) {
            // Keep draining its standard error so it never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            return (child, line.trim().to_owned());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("jitgate login printed no line with {marker}: {line}");
}

/// Waits for `child` to end (at most `within`); its standard output.
fn finish(mut child: Child, within: Duration) -> String {
    let until = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
            assert!(status.success(), "jitgate login failed: {out}");
            return out;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            panic!("jitgate login did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn whoami(config: &std::path::Path) -> Value {
    let (ok, out, err) = jitgate(config, &["whoami", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// The loopback flow: `jitgate login URL --no-browser` prints the address, the person
/// signs in at the provider, the browser comes back to the command line's port, and
/// the command line holds an expiring credential of that person (saved 0600), which
/// `jitgate logout` revokes. Then the device flow, confirmed on the controller's page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_through_the_browser_and_with_a_device_code_then_logout() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let op = Op::start(
        &format!("{base}/auth/callback"),
        json!({"gil": {"name": "Gil Example", "groups": ["ops", "db"]}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let _ctl = serve(dir.path(), port, &op);
    let config = dir.path().join("cli");

    let (child, line) = start_login(&config, &[&base, "--no-browser"], "/auth/login?");
    let start = line.trim().to_owned();
    assert!(
        start.starts_with(&format!("{base}/auth/login?cli_port=")),
        "{start}"
    );
    let mut browser = Browser::new();
    let callback = browser.sign_in_from(&start, &base, &op.issuer, "gil").await;
    let (status, _, page) = browser.send(Method::GET, &callback, None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let back = op::first_link(&page);
    assert!(back.starts_with("http://127.0.0.1:"), "{back}");
    // A wrong state at the command line's port is not this sign-in.
    let forged = back.replace("state=", "state=x");
    let (status, _, _) = Browser::new().send(Method::GET, &forged, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, page) = browser.send(Method::GET, &back, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Signed in"), "{page}");
    let out = tokio::task::spawn_blocking(move || finish(child, Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(out.contains("as Gil Example"), "{out}");
    assert!(out.contains("expires at"), "{out}");

    let file = config.join("config.toml");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let who = whoami(&config);
    assert_eq!(who["principal"], format!("{}#gil", op.issuer));
    assert_eq!(who["name"], "Gil Example");
    assert_eq!(who["groups"], json!(["ops", "db"]));
    assert_eq!(who["credential"], "signIn");
    assert!(who["expiresAt"].is_string(), "{who}");
    let (ok, text, _) = jitgate(&config, &["whoami"]);
    assert!(ok && text.contains("Gil Example"), "{text}");

    // Sign out: revoked at the controller, forgotten here.
    let saved = std::fs::read_to_string(&file).unwrap();
    let token = saved
        .lines()
        .find_map(|l| l.strip_prefix("token = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let (ok, text, err) = jitgate(&config, &["logout"]);
    assert!(ok, "{err}");
    assert!(text.contains("revoked"), "{text}");
    assert!(!std::fs::read_to_string(&file).unwrap().contains("token"));
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/whoami"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // The device flow: the person confirms the code on the controller's page.
    let (child, line) = start_login(&config, &[&base, "--device"], "/auth/device?code=");
    let page = line
        .split_whitespace()
        .find(|w| w.contains("/auth/device?code="))
        .unwrap()
        .trim_end_matches(')')
        .to_owned();
    let code = page.rsplit('=').next().unwrap().to_owned();
    let mut person = Browser::new();
    let (status, to_login, _) = person.send(Method::GET, &page, None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let callback = person
        .sign_in_from(&format!("{base}{to_login}"), &base, &op.issuer, "gil")
        .await;
    let (status, back, _) = person.send(Method::GET, &callback, None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(back, format!("/auth/device?code={code}"));
    let (status, _, html) = person.send(Method::GET, &page, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(&code), "{html}");
    let (status, _, done) = person
        .send(
            Method::POST,
            &format!("{base}/auth/device/decide"),
            Some(&[("code", &code), ("decision", "approve")]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let out = tokio::task::spawn_blocking(move || finish(child, Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(out.contains("as Gil Example"), "{out}");
    let who = whoami(&config);
    assert_eq!(who["credential"], "signIn");
    assert_eq!(who["name"], "Gil Example");

    // The owner's token list tells sign-ins from automation.
    let (ok, list, err) = jitgate(
        &config,
        &[
            "token",
            "list",
            "--url",
            &base,
            "--token",
            "signin-test-owner-token-0123",
        ],
    );
    assert!(ok, "{err}");
    let kinds: Vec<&str> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(
        kinds.contains(&"sign-in") && kinds.contains(&"automation"),
        "{list}"
    );
}
