//! Regression tests for issue 8.4: enrollment tokens can be revoked, and a leaked one
//! cannot silently take over a machine whose agent is online.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::util::Ctl;

async fn token(ctl: &Ctl, body: Value) -> (String, String) {
    let et = ctl.post("/api/v1/enrollTokens", body).await;
    assert_eq!(et.status, StatusCode::CREATED, "{:?}", et.body);
    (
        et.body["id"].as_str().unwrap().to_owned(),
        et.body["token"].as_str().unwrap().to_owned(),
    )
}

async fn enroll(ctl: &Ctl, token: &str, name: &str) -> crate::util::Resp {
    ctl.call(
        Method::POST,
        "/api/v1/agent/enroll",
        None,
        Some(json!({"enrollToken": token, "resourceGroup": "lab", "name": name})),
    )
    .await
}

async fn report(ctl: &Ctl, vm: &str, agent: &str) -> StatusCode {
    ctl.call(
        Method::POST,
        &format!("/api/v1/agent/status?vm={}", vm.replace('/', "%2F")),
        Some(agent),
        Some(json!({"nftVersion": "nftables v1.0.6"})),
    )
    .await
    .status
}

#[tokio::test]
async fn a_revoked_enrollment_token_enrolls_nothing() {
    let ctl = Ctl::start().await;
    let (id, text) = token(&ctl, json!({"uses": 5})).await;
    let r = ctl.delete(&format!("/api/v1/enrollTokens/{id}")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let again = ctl.delete(&format!("/api/v1/enrollTokens/{id}")).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "revoking twice changes nothing"
    );
    let e = enroll(&ctl, &text, "web-1").await;
    assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{:?}", e.body);
    assert!(e.message().contains("revoked"), "{:?}", e.body);
    let listed = ctl.get("/api/v1/enrollTokens").await;
    assert!(listed.body["value"][0]["revokedAt"].is_string());
    assert_eq!(ctl.audit("action=enrollToken.revoke").await.len(), 1);
    // Unknown ids, and callers without VM-write rights, get 404 / 403, and nothing changes.
    let r = ctl.delete("/api/v1/enrollTokens/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let (id2, _) = token(&ctl, json!({})).await;
    let reader = ctl
        .principal("rita", "Reader", &format!("/subscriptions/{}", ctl.sub))
        .await;
    let r = ctl
        .call(
            Method::DELETE,
            &format!("/api/v1/enrollTokens/{id2}"),
            Some(&reader),
            None,
        )
        .await;
    assert!(
        r.status == StatusCode::NOT_FOUND || r.status == StatusCode::FORBIDDEN,
        "{:?}",
        r.body
    );
    let listed = ctl.get("/api/v1/enrollTokens").await;
    let t = listed.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id2.as_str())
        .unwrap()
        .clone();
    assert!(t["revokedAt"].is_null());
}

#[tokio::test]
async fn a_leaked_token_cannot_take_over_an_online_agent() {
    let ctl = Ctl::start().await;
    let (_, text) = token(&ctl, json!({"uses": 5})).await;
    let real = enroll(&ctl, &text, "web-1").await;
    assert_eq!(real.status, StatusCode::OK, "{:?}", real.body);
    let vm = real.body["vmId"].as_str().unwrap().to_owned();
    let real_cred = real.body["token"].as_str().unwrap().to_owned();
    assert_eq!(report(&ctl, &vm, &real_cred).await, StatusCode::NO_CONTENT);

    // The attacker enrolls under the same name with the (leaked) token: refused.
    let evil = enroll(&ctl, &text, "WEB-1").await;
    assert_eq!(evil.status, StatusCode::CONFLICT, "{:?}", evil.body);
    assert_eq!(evil.code(), "AgentAlreadyEnrolled");
    assert_eq!(evil.body["error"]["target"], "name");
    // The real agent is untouched.
    assert_eq!(report(&ctl, &vm, &real_cred).await, StatusCode::NO_CONTENT);
    let refused = ctl.audit("action=request.rejected").await;
    assert!(
        refused
            .iter()
            .any(|e| e["details"].to_string().contains("AgentAlreadyEnrolled")),
        "{refused:?}"
    );

    // A token made for replacing (a reinstall) may, and the old agent is told.
    let (_, replace) = token(&ctl, json!({"allowReplace": true})).await;
    let new = enroll(&ctl, &replace, "web-1").await;
    assert_eq!(new.status, StatusCode::OK, "{:?}", new.body);
    let old = ctl
        .call(
            Method::GET,
            &format!("/api/v1/agent/desired?vm={}&wait=0", vm.replace('/', "%2F")),
            Some(&real_cred),
            None,
        )
        .await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    assert_eq!(old.code(), "AgentCredentialRevoked", "{:?}", old.body);
    let enrolls = ctl.audit("action=agent.enroll").await;
    assert_eq!(enrolls.last().unwrap()["details"]["replacedAgent"], true);
}

/// Regression (issue 8.6): a hostile agent's status reports grew `/metrics` without
/// bound (free-text labels), wrapped counters above i64 to -1, and could forge log
/// lines. Reports are bounded and validated, naming the field, and change nothing
/// when refused.
#[tokio::test]
async fn hostile_status_reports_are_bounded_and_refused_by_field() {
    let ctl = Ctl::start().await;
    let (_, text) = token(&ctl, json!({})).await;
    let r = enroll(&ctl, &text, "web-1").await;
    let vm = r.body["vmId"].as_str().unwrap().to_owned();
    let agent = r.body["token"].as_str().unwrap().to_owned();
    let send = |body: Value| {
        let ctl = &ctl;
        let vm = vm.clone();
        let agent = agent.clone();
        async move {
            ctl.call(
                Method::POST,
                &format!("/api/v1/agent/status?vm={}", vm.replace('/', "%2F")),
                Some(&agent),
                Some(body),
            )
            .await
        }
    };
    let bad = [
        (
            json!({"counters": [{"rule": "r", "port": 22, "protocol": "x\ny", "packets": 1}]}),
            "counters[0].protocol",
        ),
        (
            json!({"listening": [{"protocol": "sctp", "family": "IPv4", "address": "0.0.0.0", "port": 22}]}),
            "listening[0].protocol",
        ),
        (
            json!({"listening": [{"protocol": "tcp", "family": "IPv4", "address": "nope", "port": 22}]}),
            "listening[0].address",
        ),
        (json!({"error": "x".repeat(5000)}), "error"),
        (json!({"addresses": vec!["10.0.0.1/24"; 2000]}), "addresses"),
        (
            json!({"lastDrift": {"detectedAt": "t", "changes": vec!["c"; 100], "repaired": true}}),
            "lastDrift.changes",
        ),
    ];
    for (body, field) in bad {
        let r = send(body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{field}: {:?}", r.body);
        assert_eq!(r.body["error"]["target"], field, "{:?}", r.body);
    }
    let view = ctl.get("/api/v1/vms/lab/web-1").await;
    assert_eq!(
        view.body["agent"]["enrolled"], false,
        "a refused report was stored"
    );

    // A huge counter is clamped, not wrapped; the metric label is canonical.
    let r = send(json!({"nftVersion": "nftables v1.0.6",
        "counters": [{"rule": "JIT-Deny-default-22", "port": 22, "protocol": "tcp", "packets": u64::MAX}]}))
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let view = ctl.get("/api/v1/vms/lab/web-1").await;
    assert_eq!(
        view.body["agent"]["counters"][0]["packets"],
        i64::MAX as u64
    );
    let metrics = ctl.call(Method::GET, "/metrics", None, None).await;
    let m = metrics.body.as_str().unwrap();
    assert!(m.contains("protocol=\"TCP\""), "{m}");
    assert!(!m.contains("-1"), "a counter wrapped: {m}");
}

/// Issue 9.7 (`jitgate status`, `vm list`): the VM list says which machines have an
/// enrolled agent and whether it reports, without a call per machine.
#[tokio::test]
async fn the_vm_list_says_which_machines_have_an_agent_and_whether_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_simulated_with(dir, |c| {
        c.recommend.offline_after = jiff::SignedDuration::from_secs(1);
    })
    .await;
    ctl.register("lab", "bare").await;
    let (_, text) = token(&ctl, json!({"uses": 1})).await;
    let e = enroll(&ctl, &text, "web-1").await;
    assert_eq!(e.status, StatusCode::OK, "{:?}", e.body);
    let vm = e.body["vmId"].as_str().unwrap().to_owned();
    let cred = e.body["token"].as_str().unwrap().to_owned();
    assert_eq!(report(&ctl, &vm, &cred).await, StatusCode::NO_CONTENT);
    let agent_of = |list: &Value, name: &str| {
        list["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["agent"]
            .clone()
    };
    let list = ctl.get("/api/v1/vms").await.body;
    assert_eq!(
        agent_of(&list, "bare"),
        json!({"enrolled": false, "online": false})
    );
    let web = agent_of(&list, "web-1");
    assert_eq!(web["enrolled"], true, "{web}");
    assert_eq!(web["online"], true, "{web}");
    assert!(web["lastSeen"].is_string(), "{web}");
    // Silent past the threshold: offline, as the VM's own page says.
    ctl.advance(std::time::Duration::from_millis(2100));
    let list = ctl.get("/api/v1/vms").await.body;
    assert_eq!(agent_of(&list, "web-1")["online"], false, "{list}");
    let one = ctl.get("/api/v1/vms/lab/web-1").await.body;
    assert_eq!(one["agent"]["online"], false, "{one}");
}

/// Issue 17: the install line. Its code gives the enrollment token to the script as
/// many times as the token has uses (here once), only to whoever presents it, and the
/// database never holds the token in clear; bad input is refused naming the field and
/// creates nothing; the binary and its checksum are served to anyone.
#[tokio::test]
async fn an_install_line_delivers_its_token_once_and_the_binary_is_served() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("agent-binary");
    std::fs::write(&binary, b"#!/bin/sh\necho a stand-in for the agent\n").unwrap();
    let served = binary.clone();
    let ctl = crate::util::Ctl::start_with(tempfile::tempdir().unwrap(), move |c| {
        c.agent_binary = Some(served)
    })
    .await;
    let rg = format!("/subscriptions/{}/resourceGroups/lab", ctl.sub);

    // Refused, naming the field, and no token made.
    let before = ctl.get("/api/v1/enrollTokens").await.body["value"]
        .as_array()
        .map_or(0, Vec::len);
    let r = ctl
        .post("/api/v1/enrollTokens", json!({"install": true}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.body["error"]["target"], "install", "{:?}", r.body);
    let r = ctl
        .call_with(
            Method::POST,
            "/api/v1/enrollTokens",
            Some(crate::util::OWNER),
            Some(json!({"scope": rg, "install": true})),
            &[("host", "evil;touch${IFS}x")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.body["error"]["target"], "Host", "{:?}", r.body);
    let after = ctl.get("/api/v1/enrollTokens").await.body["value"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(before, after, "a refused request made a token");

    let r = ctl
        .post(
            "/api/v1/enrollTokens",
            json!({"scope": rg, "install": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let token = r.body["token"].as_str().unwrap().to_owned();
    let url = r.body["install"]["url"].as_str().unwrap().to_owned();
    let command = r.body["install"]["command"].as_str().unwrap();
    assert_eq!(command, format!("curl -fsS '{url}' | sudo sh"));
    assert!(!command.contains(&token));
    let code = url.split("code=").nth(1).unwrap().to_owned();

    // The database holds neither the token nor the code.
    let mut db = std::fs::read(ctl.dir.path().join("jitgate.db")).unwrap();
    db.extend(std::fs::read(ctl.dir.path().join("jitgate.db-wal")).unwrap_or_default());
    assert!(db.len() > 4096, "the database was not read");
    let secret = token.split('.').nth(1).unwrap();
    for s in [secret, code.as_str()] {
        assert!(
            !db.windows(s.len()).any(|w| w == s.as_bytes()),
            "{s} is in the database file"
        );
    }

    let anonymous = reqwest::Client::new();
    let fetch = |u: String| {
        let c = anonymous.clone();
        async move {
            let r = c.get(u).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let (status, first) = fetch(url.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(first.starts_with("#!/bin/sh"), "{first}");
    assert!(first.contains(&format!("TOKEN='{token}'")), "{first}");
    assert!(first.contains("RESOURCE_GROUP='lab'"), "{first}");
    let want = hex::encode(sha2::Sha256::digest(std::fs::read(&binary).unwrap()));
    assert!(first.contains(&format!("SHA256='{want}'")), "{first}");
    // Spent, wrong or absent codes: the script without a token.
    for u in [
        url.clone(),
        url.replace(&code, "nope"),
        format!("{}/install.sh", ctl.base),
    ] {
        let (status, text) = fetch(u).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains("TOKEN=''") && !text.contains(&token),
            "{text}"
        );
    }
    assert_eq!(
        ctl.audit("action=enrollToken.installCodeUsed").await.len(),
        1
    );

    // The binary and its checksum, to anyone.
    let bin_url = format!("{}{}", ctl.base, jitgate_controller::install::binary_path());
    let r = anonymous.get(&bin_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        std::fs::read(&binary).unwrap().as_slice()
    );
    let (status, sum) = fetch(format!("{bin_url}.sha256")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        sum,
        format!(
            "{want}  jitgate-linux-{}\n",
            jitgate_controller::install::ARCH
        )
    );
    // Nothing else under /download is public.
    let (status, _) = fetch(format!("{}/download/other", ctl.base)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Issue 17: the VM view says when a machine's agent is older than the controller.
#[tokio::test]
async fn an_agent_older_than_the_controller_is_shown_outdated() {
    let ctl = Ctl::start().await;
    let (_, text) = token(&ctl, json!({"uses": 1})).await;
    let e = enroll(&ctl, &text, "old-1").await;
    assert_eq!(e.status, StatusCode::OK, "{:?}", e.body);
    let vm = e.body["vmId"].as_str().unwrap().to_owned();
    let agent = e.body["token"].as_str().unwrap().to_owned();
    for (version, want) in [
        ("0.0.1", true),
        (env!("CARGO_PKG_VERSION"), false),
        ("999.0.0", false),
    ] {
        let r = ctl
            .call(
                Method::POST,
                &format!("/api/v1/agent/status?vm={}", vm.replace('/', "%2F")),
                Some(&agent),
                Some(json!({"agentVersion": version, "protocol": jitgate_proto::AGENT_PROTOCOL})),
            )
            .await;
        assert!(r.status.is_success(), "{:?}", r.body);
        let v = ctl.get("/api/v1/vms/lab/old-1").await;
        assert_eq!(v.body["agent"]["outdated"], want, "{version}: {:?}", v.body);
    }
}

/// Issue 17: anyone may download the agent, so downloads under way are bounded per
/// source address (429 with Retry-After past the limit), and a place is given back
/// when a download ends or its client goes away.
#[tokio::test]
async fn downloads_of_the_agent_are_bounded_per_source() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("agent-binary");
    // Large enough that an unread download stays under way (socket buffers full).
    std::fs::write(&binary, vec![7u8; 64 << 20]).unwrap();
    let served = binary.clone();
    let ctl = crate::util::Ctl::start_with(tempfile::tempdir().unwrap(), move |c| {
        c.agent_binary = Some(served)
    })
    .await;
    let url = format!("{}{}", ctl.base, jitgate_controller::install::binary_path());
    let fresh = || reqwest::Client::builder().build().unwrap();
    let mut open = Vec::new();
    for _ in 0..jitgate_controller::install::DOWNLOADS_PER_SOURCE {
        let r = fresh().get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        open.push(r);
    }
    let r = fresh().get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "2");
    // One client goes away: its place comes back.
    drop(open.pop());
    let mut got = None;
    for _ in 0..100 {
        let r = fresh().get(&url).send().await.unwrap();
        if r.status() == StatusCode::OK {
            got = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = got.expect("the place of a download that went away never came back");
    assert_eq!(r.bytes().await.unwrap().len(), 64 << 20);
}
