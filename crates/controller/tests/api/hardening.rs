//! Regression tests for issue 8's smaller findings (item 6) and the refused-call
//! limits (item 5), each reproducing the attack.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::util::{Ctl, OWNER};

#[tokio::test]
async fn a_json_body_with_trailing_garbage_is_refused_and_changes_nothing() {
    let ctl = Ctl::start().await;
    ctl.register("rg", "vm1").await;
    let before = ctl.snapshot().await;
    let body = format!(
        r#"{{"kind": "Basic", "properties": {{"virtualMachines": [{{"id": "{}", "ports": [{{"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT3H"}}]}}]}}}}xyz"#,
        ctl.vm_id("rg", "vm1")
    );
    let r = ctl
        .http
        .put(format!(
            "{}{}?api-version=2020-01-01",
            ctl.base,
            ctl.policy_path("rg", "westeurope", "default")
        ))
        .bearer_auth(OWNER)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let text = r.text().await.unwrap();
    assert!(text.contains("after its JSON value"), "{text}");
    assert_eq!(ctl.snapshot().await, before, "the write happened");
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let ctl = Ctl::start().await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = ctl
            .http
            .get(format!("{}/api/v1/whoami", ctl.base))
            .header("authorization", format!("{scheme} {OWNER}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
    let r = ctl
        .http
        .get(format!("{}/api/v1/whoami", ctl.base))
        .header("authorization", format!("Basic {OWNER}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_bootstrap_tokens_id_reveals_nothing_about_it() {
    let ctl = Ctl::start().await;
    let reader = ctl
        .principal("rita", "Reader", &format!("/subscriptions/{}", ctl.sub))
        .await;
    let r = ctl.get_as(&reader, "/api/v1/tokens").await;
    // Readers may or may not list tokens; the owner may. Either way the bootstrap
    // token's id is not derived from the token.
    let listed = if r.status == StatusCode::OK {
        r.body
    } else {
        ctl.get("/api/v1/tokens").await.body
    };
    let boot = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["principal"] == "bootstrap-admin")
        .unwrap()
        .clone();
    let id = boot["id"].as_str().unwrap();
    use sha2::Digest;
    let derived = hex::encode(sha2::Sha256::digest(OWNER.as_bytes()));
    assert!(!derived.starts_with(id.trim_start_matches('x')), "{id}");
    assert!(!id.starts_with('x'), "{id}");
    // And it still authenticates (found by the hash of the whole text).
    assert_eq!(ctl.get("/api/v1/whoami").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_last_owner_credential_cannot_be_revoked() {
    let ctl = Ctl::start().await;
    let listed = ctl.get("/api/v1/tokens").await.body;
    let boot = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["principal"] == "bootstrap-admin")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = ctl.delete(&format!("/api/v1/tokens/{boot}")).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert!(r.message().contains("last credential"), "{:?}", r.body);
    assert_eq!(ctl.get("/api/v1/whoami").await.status, StatusCode::OK);
    // With a second Owner, it can.
    let other = ctl
        .principal("olga", "Owner", &format!("/subscriptions/{}", ctl.sub))
        .await;
    let r = ctl
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{boot}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        ctl.get("/api/v1/whoami").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn recommendations_apply_without_any_policy_right_is_403() {
    let ctl = Ctl::start().await;
    let reader = ctl
        .principal("rita", "Reader", &format!("/subscriptions/{}", ctl.sub))
        .await;
    let r = ctl
        .call(
            Method::POST,
            "/api/v1/recommendations/apply",
            Some(&reader),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let applied = ctl.audit("action=recommendations.apply").await;
    assert!(applied.is_empty(), "{applied:?}");
}

fn tight(c: &mut jitgate_controller::Config) {
    // Long enough that 300 calls fit in one window on a loaded 2-core machine.
    c.limits.window = std::time::Duration::from_secs(6);
    c.limits.audit_burst = 10;
    c.limits.block_after = 30;
    c.limits.max_connections = 20;
    c.limits.header_read_timeout = std::time::Duration::from_secs(1);
}

/// Regression (issue 8.5): 300 anonymous requests with long paths added 15 MB to the
/// audit log in 0.2 s. Now a source's refusals past its burst are counted and
/// summarized, past the block threshold it gets 429, paths are truncated, and a valid
/// credential from the same address still works.
#[tokio::test]
async fn an_anonymous_flood_is_limited_summarized_and_does_not_lock_out_owners() {
    let ctl = Ctl::start_with(tempfile::tempdir().unwrap(), tight).await;
    let before = ctl.audit("limit=1000").await.len();
    let long = format!("/api/v1/{}", "a".repeat(4000));
    let mut statuses = Vec::new();
    for _ in 0..300 {
        let r = ctl
            .call(Method::GET, &long, Some("jg_bad.token"), None)
            .await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses[0], 401);
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
    // The owner, from the same address, is not locked out.
    assert_eq!(ctl.get("/api/v1/whoami").await.status, StatusCode::OK);
    let events = ctl.audit("limit=1000").await;
    let written = events.len() - before;
    assert!(written <= 12, "{written} events written for 300 refusals");
    for e in &events[before..] {
        assert!(e["target"].as_str().unwrap().len() < 300, "{e}");
    }
    // After the window, one summary says how many were not written one by one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = ctl.audit("action=audit.refusals_suppressed").await;
        if let Some(e) = s.first() {
            assert_eq!(e["details"]["count"], 290, "{e}");
            assert_eq!(e["source"], "127.0.0.1");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no summary");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let m = ctl.call(Method::GET, "/metrics", None, None).await;
    assert!(
        m.body
            .as_str()
            .unwrap()
            .contains("jitgate_refusals_suppressed_total 290"),
        "{}",
        m.body
    );
}

/// Regression (issue 8.5): idle and slow sockets held the controller until it stopped
/// answering anyone. A connection that sends no complete request head within the
/// timeout is closed, and connections past the cap are closed at once.
#[tokio::test]
async fn slow_and_excess_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ctl = Ctl::start_with(tempfile::tempdir().unwrap(), tight).await;
    let addr = ctl.base.trim_start_matches("http://").to_owned();
    // Slowloris: half a request head, then silence.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the slow connection was not closed within 5 s")
        .unwrap_or(0);
    let _ = n; // closed (0 bytes) or a 408 answer, then closed
    // Fill the cap with idle connections: the next one is closed at once.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let got = tokio::time::timeout(std::time::Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("the connection past the cap was neither answered nor closed");
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "a connection past the cap was served: {:?}",
        got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    // The idle ones time out, and the controller serves again.
    drop(idle);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(ctl.get("/api/v1/health").await.status, StatusCode::OK);
    let m = ctl.call(Method::GET, "/metrics", None, None).await;
    assert!(
        m.body
            .as_str()
            .unwrap()
            .contains("jitgate_connections_refused_total"),
        "{}",
        m.body
    );
}

/// Behind a trusted load balancer, the caller is the rightmost address of
/// `X-Forwarded-For` that is not a proxy: grants default to it ("My IP") and the audit
/// log records it. What the caller wrote to the left of it, and the header from a
/// connection that is not a trusted proxy, count for nothing.
#[tokio::test]
async fn only_a_trusted_proxy_names_the_caller() {
    // Port 22 of vm1, without a source: the grant opens to the caller.
    let port22 = || json!([{"number": 22, "duration": "PT1H"}]);
    let granted_to = |r: &crate::util::Resp| {
        r.body["virtualMachines"][0]["ports"][0]["allowedSourceAddressPrefix"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let forwarded = [("X-Forwarded-For", "198.51.100.9, 203.0.113.7")];

    // The controller's own connections come from 127.0.0.1: here, a trusted proxy.
    let ctl = Ctl::start_with(tempfile::tempdir().unwrap(), |c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    ctl.enable("rg", &["vm1"], "*").await;
    let r = ctl
        .initiate_with(OWNER, "rg", "vm1", port22(), &forwarded)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(granted_to(&r), "203.0.113.7");
    let events = ctl.audit("action=request.initiate").await;
    assert_eq!(
        events.last().unwrap()["source"],
        "203.0.113.7",
        "{events:?}"
    );

    // A proxy's garbled header is refused, naming it, and changes nothing.
    let before = ctl.snapshot().await;
    let r = ctl
        .initiate_with(
            OWNER,
            "rg",
            "vm1",
            port22(),
            &[("X-Forwarded-For", "203.0.113.7, unknown")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.body["error"]["target"], "X-Forwarded-For", "{:?}", r.body);
    assert_eq!(ctl.snapshot().await, before);

    // Without trusted proxies the header is the caller's word, and ignored.
    let plain = Ctl::start().await;
    plain.enable("rg", &["vm1"], "*").await;
    let r = plain
        .initiate_with(OWNER, "rg", "vm1", port22(), &forwarded)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(granted_to(&r), "127.0.0.1");
}

/// Sign-in codes are guessed through public doors: past the block threshold a source
/// gets 429 there too (and so never reaches the store or the provider).
#[tokio::test]
async fn guessing_sign_in_codes_is_limited_like_the_rest() {
    let ctl = Ctl::start_with(tempfile::tempdir().unwrap(), tight).await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let r = ctl
            .call(
                Method::POST,
                "/auth/token",
                None,
                Some(serde_json::json!({"grantType": "device", "deviceCode": "0".repeat(64)})),
            )
            .await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses[0], 404, "{statuses:?}");
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
}
