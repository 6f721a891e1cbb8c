//! Webhooks through the API, delivered to a real HTTP receiver on loopback: every
//! delivery's signature checked with the Standard Webhooks algorithm, a failed
//! delivery retried with the same message id, 410 disabling the endpoint, delivery
//! after a restart, and bad input refused naming its field.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::util::Ctl;

/// What the receiver saw: (webhook-id, webhook-timestamp, webhook-signature, body).
type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// A receiver answering the statuses in `script` in turn, then 200.
struct Receiver {
    addr: SocketAddr,
    seen: Seen,
    script: Arc<Mutex<Vec<u16>>>,
}

async fn receiver(listener: Option<tokio::net::TcpListener>) -> Receiver {
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let script: Arc<Mutex<Vec<u16>>> = Arc::default();
    let (s2, sc2) = (seen.clone(), script.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (seen, script) = (s2.clone(), sc2.clone());
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default()
                };
                seen.lock().unwrap().push((
                    h("webhook-id"),
                    h("webhook-timestamp"),
                    h("webhook-signature"),
                    body,
                ));
                let mut s = script.lock().unwrap();
                let code = if s.is_empty() { 200 } else { s.remove(0) };
                axum::http::StatusCode::from_u16(code).unwrap()
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver { addr, seen, script }
}

/// The Standard Webhooks verification, written from the specification.
fn verify(secret: &str, id: &str, ts: &str, sig: &str, body: &str) -> bool {
    let key = B64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let want = B64.encode(mac.finalize().into_bytes());
    sig.split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == want)
}

async fn wait_seen(
    r: &Receiver,
    n: usize,
    within: Duration,
) -> Vec<(String, String, String, String)> {
    let start = Instant::now();
    loop {
        let seen = r.seen.lock().unwrap().clone();
        if seen.len() >= n {
            return seen;
        }
        assert!(
            start.elapsed() < within,
            "{} deliveries, not {n}: {seen:?}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn controller(port: u16) -> Ctl {
    controller_in(tempfile::tempdir().unwrap(), port).await
}

async fn controller_in(dir: tempfile::TempDir, port: u16) -> Ctl {
    Ctl::start_with(dir, move |c| {
        c.webhook_allow = vec![format!("http://127.0.0.1:{port}/")];
        c.webhook_retry = Duration::from_secs(1);
    })
    .await
}

#[tokio::test]
async fn deliveries_are_signed_retried_with_one_id_and_stop_at_410() {
    let rx = receiver(None).await;
    let ctl = controller(rx.addr.port()).await;
    ctl.enable("rg", &["vm1"], "*").await;
    let url = format!("http://{}/hook", rx.addr);

    // Bad input names its field and changes nothing.
    let before = ctl.snapshot().await;
    for (body, field) in [
        (json!({}), "url"),
        (json!({"url": "https://10.1.2.3/hook"}), "url"),
        (
            json!({"url": "http://169.254.169.254/latest/meta-data"}),
            "url",
        ),
        (json!({"url": "https://[::1]:9/x"}), "url"),
        (json!({"url": "ftp://example.net/x"}), "url"),
        (json!({"url": "https://user:pw@1.1.1.1/x"}), "url"),
        (
            json!({"url": url, "events": ["request.pendin"]}),
            "events[0]",
        ),
        (json!({"url": url, "events": []}), "events"),
        (json!({"url": url, "format": "teams"}), "format"),
    ] {
        let r = ctl.put("/api/v1/webhooks/ops", body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {:?}", r.body);
        assert_eq!(r.body["error"]["target"], field, "{body}");
    }
    assert_eq!(ctl.snapshot().await, before);

    let r = ctl
        .put(
            "/api/v1/webhooks/ops",
            json!({"url": url, "events": ["grant.started", "grant.revoked"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    // Shown once: never read back, never in the audit log.
    assert!(
        ctl.get("/api/v1/webhooks/ops")
            .await
            .body
            .get("secret")
            .is_none()
    );
    assert!(
        !ctl.audit("action=webhook")
            .await
            .iter()
            .any(|e| e.to_string().contains(&secret[6..]))
    );

    // The first delivery is answered 500, the retry 200: same id, both signed.
    rx.script.lock().unwrap().push(500);
    let r = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "10.0.0.1"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let request = r.request_id();
    let seen = wait_seen(&rx, 2, Duration::from_secs(10)).await;
    assert_eq!(seen[0].0, seen[1].0, "a retry keeps its message id");
    assert!(seen[0].0.starts_with("msg_"));
    for (id, ts, sig, body) in &seen {
        assert!(verify(&secret, id, ts, sig, body), "signature of {body}");
        assert!(!verify(
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            id,
            ts,
            sig,
            body
        ));
    }
    let event: Value = serde_json::from_str(&seen[1].3).unwrap();
    assert_eq!(event["type"], "grant.started");
    assert_eq!(event["data"]["details"]["request"], request);
    let start = Instant::now();
    loop {
        let h = ctl.get("/api/v1/webhooks/ops").await.body;
        if h["delivered"] == 1 {
            assert_eq!(h["waiting"], 0);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Not subscribed: nothing. Subscribed and answered 410: the endpoint is disabled.
    rx.script.lock().unwrap().push(410);
    let r = ctl
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/requests/{request}/revoke"),
            Some(crate::util::OWNER),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let seen = wait_seen(&rx, 3, Duration::from_secs(10)).await;
    let event: Value = serde_json::from_str(&seen[2].3).unwrap();
    assert_eq!(event["type"], "grant.revoked");
    let start = Instant::now();
    loop {
        let h = ctl.get("/api/v1/webhooks/ops").await.body;
        if h.get("disabledAt").is_some() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctl.initiate(
        "rg",
        "vm1",
        json!([{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "10.0.0.2"}]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.seen.lock().unwrap().len(),
        3,
        "nothing goes to a disabled endpoint"
    );
    assert!(!ctl.audit("action=webhook.disable").await.is_empty());
}

/// An event whose endpoint is down stays in the outbox through a restart of the
/// controller and is delivered once the endpoint answers.
#[tokio::test]
async fn undelivered_events_survive_a_restart() {
    // A port reserved for the receiver, not listening yet.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut ctl = controller(addr.port()).await;
    ctl.enable("rg", &["vm1"], "*").await;
    let r = ctl
        .put(
            "/api/v1/webhooks/ops",
            json!({"url": format!("http://{addr}/hook")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    ctl.initiate(
        "rg",
        "vm1",
        json!([{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "10.0.0.1"}]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(ctl.get("/api/v1/webhooks/ops").await.body["waiting"], 1);
    ctl.stop().await;
    let rx = receiver(Some(tokio::net::TcpListener::bind(addr).await.unwrap())).await;
    let ctl = controller_in(ctl.dir, addr.port()).await;
    let seen = wait_seen(&rx, 1, Duration::from_secs(15)).await;
    assert!(verify(
        &secret, &seen[0].0, &seen[0].1, &seen[0].2, &seen[0].3
    ));
    let event: Value = serde_json::from_str(&seen[0].3).unwrap();
    assert_eq!(event["type"], "grant.started");
    drop(ctl);
}

/// Two controllers on one PostgreSQL database deliver one outbox: every event once,
/// whichever controller wrote it and whichever claims it.
#[tokio::test]
async fn two_replicas_deliver_each_event_once() {
    let rx = receiver(None).await;
    let port = rx.addr.port();
    let db = tokio::task::spawn_blocking(jitgate_store_sql::testpg::TestDb::create)
        .await
        .unwrap();
    let replica = |url: String| {
        Ctl::start_with(tempfile::tempdir().unwrap(), move |c| {
            c.database = Some(url);
            c.webhook_allow = vec![format!("http://127.0.0.1:{port}/")];
            c.webhook_retry = Duration::from_secs(1);
        })
    };
    let a = replica(db.url.clone()).await;
    let b = replica(db.url.clone()).await;
    a.enable("rg", &["vm1"], "*").await;
    let r = a
        .put(
            "/api/v1/webhooks/ops",
            json!({"url": format!("http://{}/hook", rx.addr), "events": ["grant.started"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // The writers' copies of the endpoint list are at most a second old.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let n = 20;
    for i in 0..n {
        let ctl = if i % 2 == 0 { &a } else { &b };
        let r = ctl
            .initiate("rg", "vm1", json!([{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": format!("10.0.0.{}", i + 1)}]))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    }
    let seen = wait_seen(&rx, n, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen_now = rx.seen.lock().unwrap().clone();
    assert_eq!(
        seen_now.len(),
        n,
        "no event delivered twice: {}",
        seen_now.len()
    );
    let mut ids: Vec<&String> = seen.iter().map(|s| &s.0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    drop((a, b, db));
}

/// An agent that stops reporting is announced once (`agent.offline`), and again when
/// it is back (`agent.online`).
#[tokio::test]
async fn an_agent_that_stops_reporting_is_announced_once() {
    let rx = receiver(None).await;
    let port = rx.addr.port();
    let ctl = Ctl::start_simulated_with(tempfile::tempdir().unwrap(), move |c| {
        c.webhook_allow = vec![format!("http://127.0.0.1:{port}/")];
        c.webhook_retry = Duration::from_secs(1);
        c.recommend.offline_after = jiff::SignedDuration::from_secs(4);
    })
    .await;
    let r = ctl
        .put(
            "/api/v1/webhooks/ops",
            json!({"url": format!("http://{}/hook", rx.addr), "events": ["agent.offline", "agent.online"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let (vm, agent) = crate::util::enroll(&ctl, "box-1").await;
    let path = format!("/api/v1/agent/status?vm={}", vm.replace('/', "%2F"));
    let report = || {
        ctl.call(
            reqwest::Method::POST,
            &path,
            Some(&agent),
            Some(json!({"nftVersion": "nftables v1.0.6"})),
        )
    };
    assert!(report().await.status.is_success());
    ctl.advance(Duration::from_secs(10));
    let seen = wait_seen(&rx, 1, Duration::from_secs(10)).await;
    let event: Value = serde_json::from_str(&seen[0].3).unwrap();
    assert_eq!(event["type"], "agent.offline");
    assert_eq!(event["data"]["target"], vm);
    // Once: more time offline announces nothing more.
    ctl.advance(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(rx.seen.lock().unwrap().len(), 1);
    assert!(report().await.status.is_success());
    let seen = wait_seen(&rx, 2, Duration::from_secs(10)).await;
    let event: Value = serde_json::from_str(&seen[1].3).unwrap();
    assert_eq!(event["type"], "agent.online");
}
