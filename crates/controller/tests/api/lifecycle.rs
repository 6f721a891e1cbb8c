//! Requests through their lifecycle: my-IP, supersede, revoke, expiry (also while the
//! controller was down), policy update and delete revoking what they remove, NSG view.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::util::{Ctl, newest_port_status};

const V: &str = "api-version=2020-01-01";

#[tokio::test]
async fn omitted_source_is_the_callers_address() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "127.0.0.0/8").await;
    let r = ctl
        .initiate("rg", "vm1", json!([{"number": 22, "duration": "PT10M"}]))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(
        r.body["virtualMachines"][0]["ports"][0]["allowedSourceAddressPrefix"],
        "127.0.0.1"
    );
    let whoami = ctl.get("/api/v1/whoami").await;
    assert_eq!(whoami.body["callerIp"], "127.0.0.1");
    // The request id is returned in a header, for revoke.
    assert!(r.headers.get("x-jitgate-request-id").is_some());
}

#[tokio::test]
async fn newer_request_supersedes_same_source_only() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let a = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    let b = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.2", "duration": "PT1H"}]),
        )
        .await;
    let c = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT2H"}]),
        )
        .await;
    for r in [&a, &b, &c] {
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    }
    let policy = ctl.get_policy("rg").await;
    let reqs = policy["properties"]["requests"].as_array().unwrap();
    let status = |i: usize| {
        let p = &reqs[i]["virtualMachines"][0]["ports"][0];
        (
            p["status"].as_str().unwrap().to_owned(),
            p["statusReason"].as_str().unwrap().to_owned(),
        )
    };
    // Newest first: c, b, a.
    assert_eq!(status(0), ("Initiated".into(), "UserRequested".into()));
    assert_eq!(status(1), ("Initiated".into(), "UserRequested".into()));
    assert_eq!(
        status(2),
        ("Revoked".into(), "NewerRequestInitiated".into())
    );
}

/// Regression (issue 8.1): a JIT Requester who may not revoke the admin's request could
/// still end it by initiating a one-second request with the admin's source address.
#[tokio::test]
async fn a_requester_cannot_end_anothers_grant_by_superseding_it() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let scope = format!("/subscriptions/{}", ctl.sub);
    let mallory = ctl.principal("mallory", "JIT Requester", &scope).await;
    let admin = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    assert_eq!(admin.status, StatusCode::ACCEPTED, "{:?}", admin.body);
    let admin_id = admin.request_id();
    // The direct way is refused...
    let revoke = ctl
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/requests/{admin_id}/revoke"),
            Some(&mallory),
            Some(json!({})),
        )
        .await;
    assert!(
        revoke.status == StatusCode::FORBIDDEN || revoke.status == StatusCode::NOT_FOUND,
        "{:?}",
        revoke.body
    );
    // ...and so is the indirect one: the admin's grant survives mallory's request.
    let m = ctl
        .initiate_as(
            &mallory,
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT5M"}]),
        )
        .await;
    assert_eq!(m.status, StatusCode::ACCEPTED, "{:?}", m.body);
    let r = ctl.get(&format!("/api/v1/requests/{admin_id}")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let port = &r.body["virtualMachines"][0]["ports"][0];
    assert_eq!(port["status"], "Initiated", "{:?}", r.body);
    // Both grants are live, and the NSG shows both allow rules.
    let live = ctl.get("/api/v1/requests?active=true").await;
    assert_eq!(
        live.body["value"].as_array().unwrap().len(),
        2,
        "{:?}",
        live.body
    );
}

#[tokio::test]
async fn early_revoke_and_nsg_view() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let nsg = ctl.get("/api/v1/vms/rg/vm1/nsg").await;
    let rules: Vec<(String, u64)> = nsg.body["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["priority"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        vec![
            ("JIT-Deny-default-22".to_owned(), 1000),
            ("JIT-Deny-default-3389".to_owned(), 1001)
        ]
    );

    let r = ctl.initiate("rg", "vm1", json!([{"number": 22, "allowedSourceAddressPrefix": "10.1.2.3", "duration": "PT1H"}, {"number": 3389, "allowedSourceAddressPrefix": "10.1.2.3", "duration": "PT1H"}])).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.request_id();
    let nsg = ctl.get("/api/v1/vms/rg/vm1/nsg").await;
    let first = &nsg.body["rules"][0];
    assert_eq!(first["name"], format!("JIT-Allow-{id}-22"));
    assert_eq!(first["priority"], 100);
    assert_eq!(first["access"], "Allow");
    assert_eq!(first["sourceAddressPrefixes"], json!(["10.1.2.3"]));
    assert_eq!(nsg.body["rules"].as_array().unwrap().len(), 4);

    // Revoke one port, then the rest.
    let r = ctl
        .post(
            &format!("/api/v1/requests/{id}/revoke"),
            json!({"port": 3389}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["revoked"].as_array().unwrap().len(), 1);
    assert_eq!(
        newest_port_status(&ctl.get_policy("rg").await, 3389),
        ("Revoked".into(), "UserRequested".into())
    );
    assert_eq!(
        newest_port_status(&ctl.get_policy("rg").await, 22),
        ("Initiated".into(), "UserRequested".into())
    );
    let r = ctl
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/requests/{id}/revoke"),
            Some(crate::util::OWNER),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        newest_port_status(&ctl.get_policy("rg").await, 22),
        ("Revoked".into(), "UserRequested".into())
    );
    // Nothing left to revoke: 409.
    let r = ctl
        .post(&format!("/api/v1/requests/{id}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let nsg = ctl.get("/api/v1/vms/rg/vm1/nsg").await;
    assert_eq!(
        nsg.body["rules"].as_array().unwrap().len(),
        2,
        "grants gone from the NSG"
    );
    let events = ctl.audit("action=request.revoke").await;
    assert_eq!(events.len(), 2);
}

async fn wait_status(
    ctl: &Ctl,
    rg: &str,
    port: u64,
    want: (&str, &str),
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = newest_port_status(&ctl.get_policy(rg).await, port);
        if got == (want.0.to_owned(), want.1.to_owned()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "port {port} is {got:?}, not {want:?}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn grants_expire_at_their_end_time() {
    let ctl = Ctl::start_simulated().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let r = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.9.9.9", "duration": "PT2S"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let end: jiff::Timestamp = r.body["virtualMachines"][0]["ports"][0]["endTimeUtc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        newest_port_status(&ctl.get_policy("rg").await, 22).0,
        "Initiated"
    );
    // A moment before its end the grant is live; at its end the scheduler marks it.
    ctl.advance(Duration::from_millis(1999));
    assert_eq!(
        newest_port_status(&ctl.get_policy("rg").await, 22).0,
        "Initiated"
    );
    assert!(ctl.audit("action=request.expire").await.is_empty());
    ctl.advance(Duration::from_millis(1));
    wait_status(
        &ctl,
        "rg",
        22,
        ("Revoked", "Expired"),
        Duration::from_secs(4),
    )
    .await;
    // Marked at (not before) the end time, and within a second of it.
    let now = ctl.now();
    assert!(now >= end);
    let events = ctl.audit("action=request.expire").await;
    assert_eq!(events.len(), 1);
    let at: jiff::Timestamp = events[0]["time"].as_str().unwrap().parse().unwrap();
    assert!(
        at >= end && at.duration_since(end) < jiff::SignedDuration::from_secs(1),
        "expired at {at}, end {end}"
    );
    assert_eq!(events[0]["actor"], "system");
    assert_eq!(events[0]["details"]["port"], 22);
}

#[tokio::test]
async fn grants_that_ended_while_the_controller_was_down_expire_at_start() {
    let mut ctl = Ctl::start_simulated().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let r = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.9.9.9", "duration": "PT1S"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    ctl.stop().await;
    ctl.advance(Duration::from_millis(1500));
    let ctl = ctl.start_again().await;
    wait_status(
        &ctl,
        "rg",
        22,
        ("Revoked", "Expired"),
        Duration::from_secs(2),
    )
    .await;
}

#[tokio::test]
async fn policy_update_and_delete_revoke_what_they_remove() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let ports = json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}, {"number": 3389, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]);
    assert_eq!(
        ctl.initiate("rg", "vm1", ports).await.status,
        StatusCode::ACCEPTED
    );
    // Remove 3389 from the policy.
    let body = json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("rg", "vm1"), "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT3H"}]}]}});
    let r = ctl
        .put(
            &format!("{}?{V}", ctl.policy_path("rg", "westeurope", "default")),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let policy = ctl.get_policy("rg").await;
    assert_eq!(
        newest_port_status(&policy, 3389),
        ("Revoked".into(), "UserRequested".into())
    );
    assert_eq!(
        newest_port_status(&policy, 22),
        ("Initiated".into(), "UserRequested".into())
    );
    let native: Value = ctl.get("/api/v1/requests").await.body;
    let p3389 = native["value"][0]["virtualMachines"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["number"] == 3389)
        .unwrap()
        .clone();
    assert_eq!(p3389["statusReason"], "PolicyChanged");
    let nsg = ctl.get("/api/v1/vms/rg/vm1/nsg").await;
    let names: Vec<&str> = nsg.body["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"JIT-Deny-default-22") && !names.contains(&"JIT-Deny-default-3389"),
        "{names:?}"
    );

    // Delete the policy: the remaining grant goes, the deny rules go.
    let r = ctl
        .delete(&format!(
            "{}?{V}",
            ctl.policy_path("rg", "westeurope", "default")
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let native: Value = ctl.get("/api/v1/requests?active=true").await.body;
    assert_eq!(native["value"].as_array().unwrap().len(), 0);
    let nsg = ctl.get("/api/v1/vms/rg/vm1/nsg").await;
    assert_eq!(nsg.body["rules"].as_array().unwrap().len(), 0);
}
