//! The agent when nftables fails: it reports the error, the controller shows it (VM
//! view and recommendations), and the agent retries until nft works again.
//!
//! The agent runs the real binary with `--nft` pointing at a stand-in script, so this
//! test changes nothing in the host's firewall; real nftables is exercised by the
//! end-to-end suite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

mod common;
use common::{BIN, Kill, call, free_port, wait_for};

const OWNER: &str = "agent-faults-owner-token";

/// A stand-in `nft`: `--version` answers; everything else fails like nft without
/// CAP_NET_ADMIN, or succeeds (logging its script) once `ok` exists beside it.
fn fake_nft(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("nft");
    let script = format!(
        r#"#!/bin/sh
if [ "$1" = "--version" ]; then echo "nftables v1.0.6 (stand-in)"; exit 0; fi
# The preflight's check (-c) passes: the failures come after enrollment.
if [ "$1" = "-c" ]; then cat > /dev/null; exit 0; fi
if [ -e "{ok}" ]; then
  if [ "$1" = "-f" ]; then cat >> "{log}"; fi
  if [ "$1" = "-j" ]; then echo '{{"nftables": []}}'; fi
  exit 0
fi
echo "Error: Could not process rule: Operation not permitted" >&2
exit 1
"#,
        ok = dir.join("ok").display(),
        log = dir.join("applied.nft").display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn nft_failures_are_reported_shown_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _ctl = Kill(
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path().join("ctl"))
            .env("JITGATE_BOOTSTRAP_TOKEN", OWNER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let who = wait_for("the controller", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        let (s, v) = call("GET", &format!("{base}/api/v1/whoami"), OWNER, None);
        (s == 200).then_some(v)
    });
    let sub = who["subscription"].as_str().unwrap().to_owned();
    let (s, et) = call(
        "POST",
        &format!("{base}/api/v1/enrollTokens"),
        OWNER,
        Some(json!({"uses": 1})),
    );
    assert_eq!(s, 201, "{et}");
    let nft = fake_nft(dir.path());
    let _agent = Kill(
        Command::new(BIN)
            .args([
                "agent",
                "--controller",
                &base,
                "--resource-group",
                "lab",
                "--name",
                "vm1",
                "--heartbeat-secs",
                "1",
            ])
            .arg("--enroll-token")
            .arg(et["token"].as_str().unwrap())
            .arg("--state-dir")
            .arg(dir.path().join("agent"))
            .arg("--nft")
            .arg(&nft)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the agent to enroll", Duration::from_secs(10), || {
        (call("GET", &format!("{base}/api/v1/vms/lab/vm1"), OWNER, None).0 == 200).then_some(())
    });
    let vm = format!(
        "/subscriptions/{sub}/resourceGroups/lab/providers/Microsoft.Compute/virtualMachines/vm1"
    );
    let (s, b) = call(
        "PUT",
        &format!(
            "{base}/subscriptions/{sub}/resourceGroups/lab/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?api-version=2020-01-01"
        ),
        OWNER,
        Some(
            json!({"properties": {"virtualMachines": [{"id": vm, "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT1H"}]}]}}),
        ),
    );
    assert_eq!(s, 200, "{b}");

    // nft fails: the agent reports it and the controller shows it.
    let agent = wait_for("the agent's error report", Duration::from_secs(15), || {
        let (_, v) = call("GET", &format!("{base}/api/v1/vms/lab/vm1"), OWNER, None);
        v["agent"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Operation not permitted"))
            .then_some(v["agent"].clone())
    });
    assert_eq!(agent["upToDate"], false, "{agent}");
    assert_eq!(agent["nftVersion"], "nftables v1.0.6 (stand-in)");
    let (_, recs) = call(
        "GET",
        &format!("{base}/api/v1/recommendations"),
        OWNER,
        None,
    );
    let rec = &recs["value"][0];
    assert_eq!(rec["verdict"], "NotApplicable", "{recs}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("cannot apply rules"),
        "{recs}"
    );

    // nft works again: the agent's retries succeed without a restart.
    std::fs::write(dir.path().join("ok"), "").unwrap();
    let agent = wait_for("the agent to recover", Duration::from_secs(20), || {
        let (_, v) = call("GET", &format!("{base}/api/v1/vms/lab/vm1"), OWNER, None);
        (v["agent"]["error"].is_null() && v["agent"]["upToDate"] == true)
            .then_some(v["agent"].clone())
    });
    assert_eq!(agent["online"], true);
    let applied = std::fs::read_to_string(dir.path().join("applied.nft")).unwrap();
    assert!(applied.contains("table inet jitgate"), "{applied}");
    assert!(applied.contains("tcp dport 22"), "{applied}");
    // Only jitgate's table is ever named.
    for line in applied
        .lines()
        .filter(|l| l.trim_start().starts_with("table ") || l.contains("delete table"))
    {
        assert!(line.contains("inet jitgate"), "another table named: {line}");
    }
}
