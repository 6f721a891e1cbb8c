//! TLS that just works (issue 9.1) and the agent's preflight (issue 9.8): a controller
//! on a network address serves HTTPS with its own CA, enrollment tokens carry the CA's
//! fingerprint so the agent pins it with nothing else to copy, `jitgate login` pins it
//! by fingerprint, a certificate made the usual way with openssl works when pinned, and
//! an agent that cannot work stops before enrolling, with advice, without using up a
//! token or registering a machine.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::lab::{BIN, Lab, LabTls, OWNER, RG, Ran, SSH, run_in_ns};

fn fingerprint_in_log(lab: &Lab) -> String {
    let log = lab.log_tail("controller");
    let at = log
        .find("ca_fingerprint=")
        .unwrap_or_else(|| panic!("serve printed no CA fingerprint:\n{log}"));
    log[at + "ca_fingerprint=".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn new_enroll_token(lab: &Lab) -> (String, String) {
    let t = lab.admin(
        "POST",
        "/api/v1/enrollTokens",
        Some(json!({"uses": 1, "expiresIn": "PT1H"})),
    );
    assert_eq!(t.status, 201, "{:?}", t.body);
    (
        t.body["id"].as_str().unwrap().to_owned(),
        t.body["token"].as_str().unwrap().to_owned(),
    )
}

fn uses_left(lab: &Lab, id: &str) -> u64 {
    let all = lab.admin("GET", "/api/v1/enrollTokens", None);
    all.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap()["usesLeft"]
        .as_u64()
        .unwrap()
}

/// A one-off `jitgate agent` in the VM's namespace for machine `name`, with its own
/// state directory, through `prefix` (e.g. `setpriv ...`) when given.
fn agent_once(lab: &Lab, prefix: &[&str], name: &str, extra: &[&str]) -> Ran {
    let state = lab.dir().join(format!("agent-{name}"));
    let mut args: Vec<&str> = prefix[1.min(prefix.len())..].to_vec();
    if !prefix.is_empty() {
        args.push(BIN);
    }
    let base = lab.base();
    args.extend([
        "agent",
        "--controller",
        base.as_str(),
        "--resource-group",
        RG,
        "--name",
        name,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    let program = prefix.first().copied().unwrap_or(BIN);
    run_in_ns(
        &lab.vm.ns,
        program,
        &args,
        &[("NO_COLOR", "1")],
        Duration::from_secs(30),
    )
}

fn assert_not_registered(lab: &Lab, name: &str) {
    let r = lab.admin("GET", &format!("/api/v1/vms/{RG}/{name}"), None);
    assert_eq!(r.status, 404, "{name} was registered: {:?}", r.body);
}

#[test]
fn a_controller_on_the_network_serves_https_with_its_own_ca_and_agents_pin_it_from_the_token() {
    let lab = Lab::builder().tls(LabTls::Auto).start();
    // The agent enrolled with nothing but the token (which carries the pin) and keeps
    // the pin with its credential.
    let fp = fingerprint_in_log(&lab);
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    let creds: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lab.agent_state_dir().join("credentials.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(creds["caFingerprint"], fp.as_str(), "{creds}");
    let (_, token) = new_enroll_token(&lab);
    assert!(token.ends_with(&format!("#{fp}")), "{token}");

    // The CA and the keys are private to the controller.
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"] {
        let mode = std::fs::metadata(lab.controller_data().join("tls").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is mode {mode:o}");
    }

    // Enforcement works through it.
    lab.enable_default();
    lab.initiate(&lab.a, json!([{"number": SSH, "duration": "PT5M"}]));
    lab.a
        .wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(5));

    // `jitgate login` pins the CA by fingerprint, then every verb trusts it.
    let config = lab.dir().join("login-a");
    let login = |args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.a.ns, BIN, "login", &lab.base()])
            .args(args)
            .env("JITGATE_CONFIG_DIR", &config)
            .env_remove("JITGATE_URL")
            .env_remove("JITGATE_TOKEN")
            .env_remove("JITGATE_CA_CERT")
            .stdin(std::process::Stdio::null());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // No terminal to ask on and no fingerprint given: refused as a usage error,
    // after showing the fingerprint to compare.
    let (code, text) = login(&["--token", OWNER]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&fp) && text.contains("--ca-fingerprint"),
        "{text}"
    );
    // A wrong fingerprint: refused, nothing saved.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (code, text) = login(&["--token", OWNER, "--ca-fingerprint", &wrong]);
    assert_eq!(code, Some(8), "{text}");
    assert!(!config.join("config.toml").exists());
    // OpenSSL's spelling of the right one.
    let colons = fp.as_bytes()["sha256:".len()..]
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let (code, text) = login(&["--token", OWNER, "--ca-fingerprint", &colons]);
    assert_eq!(code, Some(0), "{text}");
    let listed = Command::new("ip")
        .args(["netns", "exec", &lab.a.ns, BIN, "vm", "list"])
        .env("JITGATE_CONFIG_DIR", &config)
        .env_remove("JITGATE_URL")
        .env_remove("JITGATE_TOKEN")
        .env_remove("JITGATE_CA_CERT")
        .output()
        .unwrap();
    assert!(
        listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains("vm1"),
        "{listed:?}"
    );
}

#[test]
fn an_agent_that_cannot_work_stops_before_enrolling_with_advice() {
    let lab = Lab::builder().tls(LabTls::Auto).start();
    let (id, token) = new_enroll_token(&lab);

    // A token pinning another controller's CA.
    let (bare, _) = token.split_once('#').unwrap();
    let other = format!("{bare}#sha256:{}", "cd".repeat(32));
    let r = agent_once(&lab, &[], "vm-pin", &["--enroll-token", &other]);
    assert_eq!(r.status.code(), Some(78), "{r}");
    assert!(
        r.stderr.contains("not the one the fingerprint names"),
        "{r}"
    );
    assert_not_registered(&lab, "vm-pin");

    // Plain HTTP against the TLS port.
    let plain = lab.base().replace("https://", "http://");
    let state = lab.dir().join("agent-vm-http");
    let r = run_in_ns(
        &lab.vm.ns,
        BIN,
        &[
            "agent",
            "--controller",
            &plain,
            "--resource-group",
            RG,
            "--name",
            "vm-http",
            "--state-dir",
            state.to_str().unwrap(),
            "--enroll-token",
            bare,
        ],
        &[("NO_COLOR", "1")],
        Duration::from_secs(30),
    );
    assert_eq!(r.status.code(), Some(78), "{r}");
    assert!(r.stderr.contains("serves HTTPS"), "{r}");
    assert_not_registered(&lab, "vm-http");

    // No nft.
    let r = agent_once(
        &lab,
        &[],
        "vm-nonft",
        &["--enroll-token", &token, "--nft", "/nonexistent/nft"],
    );
    assert_eq!(r.status.code(), Some(78), "{r}");
    assert!(r.stderr.contains("install the nftables package"), "{r}");
    assert_not_registered(&lab, "vm-nonft");

    // Root without CAP_NET_ADMIN.
    let r = agent_once(
        &lab,
        &[
            "setpriv",
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
        ],
        "vm-nocap",
        &["--enroll-token", &token],
    );
    assert_eq!(r.status.code(), Some(78), "{r}");
    assert!(r.stderr.contains("CAP_NET_ADMIN"), "{r}");
    assert_not_registered(&lab, "vm-nocap");

    // A controller that does not answer: one message, a non-zero exit (systemd
    // restarts it), no retry loop.
    let r = run_in_ns(
        &lab.vm.ns,
        BIN,
        &[
            "agent",
            "--controller",
            &format!("https://{}", lab.ctl.v4_at(9)),
            "--resource-group",
            RG,
            "--name",
            "vm-down",
            "--state-dir",
            lab.dir().join("agent-vm-down").to_str().unwrap(),
            "--enroll-token",
            &token,
        ],
        &[("NO_COLOR", "1")],
        Duration::from_secs(30),
    );
    assert_eq!(r.status.code(), Some(1), "{r}");
    assert!(r.stderr.contains("does not answer"), "{r}");

    // None of them used the token.
    assert_eq!(uses_left(&lab, &id), 1);
}

#[test]
fn a_certificate_made_with_openssl_works_when_pinned() {
    // As a newcomer makes one: self-signed, CA flag set, no subject alternative name.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", "/CN=jitgate-e2e"])
        .output()
        .expect(
            "openssl is needed (apt-get install -y openssl; scripts/setup-deps.sh installs it)",
        );
    assert!(out.status.success(), "{out:?}");
    // The lab's controller serves it; its agent enrolls with the token (which pins
    // this exact certificate) and the CLI pins it with --ca-cert.
    let lab = Lab::builder()
        .tls(LabTls::Given {
            cert: cert.clone(),
            key,
        })
        .start();
    let log = lab.log_tail("controller");
    assert!(
        log.contains("has no subject alternative name for the listen address"),
        "{log}"
    );
    lab.enable_default();
    lab.initiate(&lab.a, json!([{"number": SSH, "duration": "PT5M"}]));
    lab.a
        .wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(5));
    let listed = lab.jitgate(&lab.a, OWNER, &["vm", "list"]).expect_ok();
    assert!(listed.stdout.contains("vm1"), "{listed}");
    // Without the pin the CLI says what to do, with its own exit code.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.a.ns, BIN, "vm", "list"])
        .env("JITGATE_URL", lab.base())
        .env("JITGATE_TOKEN", OWNER)
        .env("JITGATE_CONFIG_DIR", lab.dir().join("nopin"))
        .env_remove("JITGATE_CA_CERT");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(err.contains("--ca-cert"), "{err}");
}

#[test]
fn plain_http_on_the_network_is_a_warned_choice() {
    let lab = Lab::start();
    let log = lab.log_tail("controller");
    assert!(
        log.contains("serving plain HTTP on a non-loopback address (--insecure-http)"),
        "{log}"
    );
    let listed = lab.jitgate(&lab.a, OWNER, &["vm", "list"]).expect_ok();
    assert!(
        listed
            .stderr
            .contains("warning: sending your token in clear text"),
        "{listed}"
    );
}
