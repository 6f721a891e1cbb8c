//! Bounded growth (issue 10): per-VM change channels go with their long-polls, the
//! write queue is bounded (503 with Retry-After when full), blocked-attempt series
//! have a retention.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::util::{Ctl, enroll};

fn watched(ctl: &Ctl) -> usize {
    ctl.running.as_ref().unwrap().state.vm_changes.len()
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A VM's change channel exists while a long-poll waits on it, and goes with the last
/// one, whether it was answered by a change or by its deadline.
#[tokio::test]
async fn change_channels_go_when_their_long_polls_end() {
    let ctl = Ctl::start_simulated().await;
    let (vm, agent) = enroll(&ctl, "web").await;
    let desired = |known: String, wait: u64| {
        let url = format!(
            "{}/api/v1/agent/desired?vm={}&known={known}&wait={wait}",
            ctl.base,
            vm.replace('/', "%2F")
        );
        let req = ctl.http.get(url).bearer_auth(&agent);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<serde_json::Value>().await.unwrap()["revision"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let rev = desired(String::new(), 0).await;
    assert_eq!(
        watched(&ctl),
        0,
        "an immediate answer leaves nothing behind"
    );

    // Two long-polls on the VM share its channel; a change answers both.
    let polls = tokio::spawn({
        let (a, b) = (desired(rev.clone(), 30), desired(rev.clone(), 30));
        async move { tokio::join!(a, b) }
    });
    until("both long-polls wait", || watched(&ctl) == 1).await;
    let r = ctl
        .put(
            "/api/v1/vms/lab/web/nsg/rules/allow-monitoring",
            json!({"priority": 200, "access": "Allow", "protocol": "TCP",
                   "sourceAddressPrefixes": ["10.0.0.0/8"], "destinationPortRanges": ["9100"]}),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let (a, b) = tokio::time::timeout(Duration::from_secs(10), polls)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(a, rev);
    assert_eq!(a, b);
    until("the channel is removed", || watched(&ctl) == 0).await;

    // A long-poll that ends at its deadline removes its channel too. It is answered
    // when the controller's clock reaches the deadline, not before.
    let poll = tokio::spawn(desired(a.clone(), 20));
    until("the long-poll waits", || watched(&ctl) == 1).await;
    ctl.advance(Duration::from_secs(19));
    tokio::task::yield_now().await;
    assert_eq!(watched(&ctl), 1, "answered before its deadline");
    assert!(!poll.is_finished(), "answered before its deadline");
    ctl.advance(Duration::from_secs(1));
    let answered = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answered, a);
    until("the channel is removed", || watched(&ctl) == 0).await;
}

/// The metrics text.
async fn metrics(ctl: &Ctl) -> String {
    ctl.http
        .get(format!("{}/metrics", ctl.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// With a write queue of 2, a burst of writes while the writer is held (another
/// connection holds the database's write lock, as a backup tool might) gets 503 with
/// `Retry-After` and a CloudError for what does not fit; every write answered 2xx is
/// there, also after a restart, and every refused one changed nothing. Refused calls
/// are still audited: their audit events wait for room instead of being refused.
#[tokio::test]
async fn a_full_write_queue_answers_503_and_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_with(dir, |c| c.write_queue = 2).await;
    let db = ctl.dir.path().join(jitgate_controller::DB_FILE);
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();

    const BURST: usize = 40;
    let burst = tokio::spawn({
        let (http, base) = (ctl.http.clone(), ctl.base.clone());
        async move {
            let calls = (0..BURST).map(|i| {
                let req = http
                    .post(format!("{base}/api/v1/vms"))
                    .bearer_auth(crate::util::OWNER)
                    .json(&json!({"resourceGroup": "burst", "name": format!("vm-{i}")}));
                async move {
                    let r = req.send().await.unwrap();
                    let status = r.status();
                    let retry = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .map(|v| v.to_str().unwrap().to_owned());
                    let body: serde_json::Value = r.json().await.unwrap();
                    (i, status, retry, body)
                }
            });
            futures_join_all(calls).await
        }
    });
    // Every call reaches the store while the writer waits for the lock.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lock.execute_batch("COMMIT").unwrap();
    let results = tokio::time::timeout(Duration::from_secs(30), burst)
        .await
        .unwrap()
        .unwrap();

    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (i, status, retry, body) in results {
        if status.is_success() {
            accepted.push(i);
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert_eq!(retry.as_deref(), Some("1"), "Retry-After on {body}");
            assert_eq!(body["error"]["code"], "ServerBusy", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("2 writes waiting"),
                "{body}"
            );
            refused.push(i);
        }
    }
    assert!(!accepted.is_empty(), "some writes fit");
    assert!(
        refused.len() >= BURST / 2,
        "a queue of 2 refuses most of a burst of {BURST}: {} refused",
        refused.len()
    );
    let m = metrics(&ctl).await;
    assert!(
        m.contains(&format!("jitgate_writes_refused_total {}", refused.len())),
        "{m}"
    );
    assert!(m.contains("jitgate_write_queue_capacity 2"), "{m}");
    assert!(m.contains("jitgate_write_queue_depth 0"), "{m}");
    let failed = ctl.audit("action=request.failed&limit=1000").await;
    assert_eq!(failed.len(), refused.len(), "every 503 is audited");

    check_burst(&ctl, &accepted, &refused).await;
    let ctl = ctl.restart().await;
    check_burst(&ctl, &accepted, &refused).await;
}

/// Every acknowledged VM is there, no refused one is, and the audit chain verifies.
async fn check_burst(ctl: &Ctl, accepted: &[usize], refused: &[usize]) {
    for i in accepted {
        let r = ctl.get(&format!("/api/v1/vms/burst/vm-{i}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "acknowledged vm-{i}: {:?}",
            r.body
        );
    }
    for i in refused {
        let r = ctl.get(&format!("/api/v1/vms/burst/vm-{i}")).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "refused vm-{i}: {:?}",
            r.body
        );
    }
    let v = ctl.get("/api/v1/audit/verify").await;
    assert_eq!(v.body["ok"], true, "{:?}", v.body);
}

/// `join_all` without a futures dependency: every call is started before any is
/// awaited.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    calls: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Blocked-attempt points past the retention are deleted by the controller in the
/// background (at start, then hourly); recent ones stay. (The exact cut is the store
/// conformance suite's `prune_blocked_keeps_exactly_the_recent_points`.)
#[tokio::test]
async fn blocked_attempts_past_the_retention_are_pruned_at_start() {
    let mut ctl = Ctl::start().await;
    let (vm, _) = enroll(&ctl, "web").await;
    ctl.stop().await;

    // Points as agents reported them, 40 days and 1 hour ago.
    let now = jiff::Timestamp::now();
    let ago = |h: i64| {
        now.checked_sub(jiff::SignedDuration::from_hours(h))
            .unwrap()
    };
    {
        let store =
            jitgate_store_sql::SqlStore::open(&ctl.dir.path().join(jitgate_controller::DB_FILE))
                .unwrap();
        let point = |at, count| jitgate_store::BlockedPoint {
            vm: jitgate_core::ids::VmId::parse(&vm).unwrap(),
            port: 22,
            protocol: "TCP".into(),
            at,
            count,
        };
        use jitgate_store::Store;
        store
            .record_blocked(vec![point(ago(40 * 24), 7), point(ago(1), 3)])
            .await
            .unwrap();
        store.close();
    }

    let ctl = Ctl::start_with(ctl.dir, |c| {
        c.blocked_retention = Duration::from_secs(30 * 86_400)
    })
    .await;
    let since = ago(60 * 24).to_string();
    let mut counts = Vec::new();
    for _ in 0..200 {
        let b = ctl
            .get(&format!("/api/v1/vms/lab/web/blocked?since={since}"))
            .await;
        assert_eq!(b.status, StatusCode::OK, "{:?}", b.body);
        counts = b.body["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["count"].as_u64().unwrap())
            .collect();
        if counts == [3] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        counts,
        vec![3],
        "the 40-day-old point went, the recent one stayed"
    );
    assert!(
        metrics(&ctl)
            .await
            .contains("jitgate_blocked_attempts_pruned_total 1"),
        "counted"
    );
}
