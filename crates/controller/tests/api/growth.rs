//! Bounded growth (issue 10): per-VM change channels go with their long-polls, the
//! write queue is bounded (503 with Retry-After when full), blocked-attempt series
//! have a retention.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::util::Ctl;

/// Enrolls an agent for lab/<name>; returns (vm id, agent token).
async fn enroll(ctl: &Ctl, name: &str) -> (String, String) {
    let et = ctl.post("/api/v1/enrollTokens", json!({"uses": 1})).await;
    assert_eq!(et.status, StatusCode::CREATED, "{:?}", et.body);
    let r = ctl
        .call(
            Method::POST,
            "/api/v1/agent/enroll",
            None,
            Some(json!({"enrollToken": et.body["token"], "resourceGroup": "lab", "name": name})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    (
        r.body["vmId"].as_str().unwrap().to_owned(),
        r.body["token"].as_str().unwrap().to_owned(),
    )
}

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
    let ctl = Ctl::start().await;
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
    assert_eq!(watched(&ctl), 0, "an immediate answer leaves nothing behind");

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

    // A long-poll that ends at its deadline removes its channel too.
    let started = std::time::Instant::now();
    assert_eq!(desired(a.clone(), 1).await, a);
    assert!(started.elapsed() >= Duration::from_millis(900));
    until("the channel is removed", || watched(&ctl) == 0).await;
}
