//! Bad input: every case is a 4xx CloudError naming the field, and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::util::{Ctl, OWNER};

const V: &str = "api-version=2020-01-01";

fn policy_with_port(ctl: &Ctl, port: Value) -> Value {
    json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("rg", "vm1"), "ports": [port]}]}})
}

fn port(overrides: Value) -> Value {
    let mut p = json!({"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT3H"});
    for (k, v) in overrides.as_object().unwrap() {
        if v.is_null() {
            p.as_object_mut().unwrap().remove(k);
        } else {
            p[k] = v.clone();
        }
    }
    p
}

#[tokio::test]
async fn bad_policies_are_rejected_naming_the_field_and_change_nothing() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    ctl.register("other", "x1").await;
    let path = format!("{}?{V}", ctl.policy_path("rg", "westeurope", "default"));
    let f = "properties.virtualMachines[0].ports[0]";
    let cases: Vec<(Value, u16, String)> = vec![
        (
            policy_with_port(&ctl, port(json!({"number": 0}))),
            400,
            format!("{f}.number"),
        ),
        (
            policy_with_port(&ctl, port(json!({"number": 65536}))),
            400,
            format!("{f}.number"),
        ),
        (
            policy_with_port(&ctl, port(json!({"number": "22"}))),
            400,
            format!("{f}.number"),
        ),
        (
            policy_with_port(&ctl, port(json!({"number": 22.5}))),
            400,
            format!("{f}.number"),
        ),
        (
            policy_with_port(&ctl, port(json!({"protocol": "ICMP"}))),
            400,
            format!("{f}.protocol"),
        ),
        (
            policy_with_port(
                &ctl,
                port(json!({"allowedSourceAddressPrefix": "10.0.0.5/24"})),
            ),
            400,
            format!("{f}.allowedSourceAddressPrefix"),
        ),
        (
            policy_with_port(
                &ctl,
                port(json!({"allowedSourceAddressPrefix": "10.0.0.300"})),
            ),
            400,
            format!("{f}.allowedSourceAddressPrefix"),
        ),
        (
            policy_with_port(
                &ctl,
                port(json!({"allowedSourceAddressPrefixes": ["10.0.0.0/8"]})),
            ),
            400,
            format!("{f}.allowedSourceAddressPrefixes"),
        ),
        (
            policy_with_port(&ctl, port(json!({"maxRequestAccessDuration": "PT4M"}))),
            400,
            format!("{f}.maxRequestAccessDuration"),
        ),
        (
            policy_with_port(&ctl, port(json!({"maxRequestAccessDuration": "P2D"}))),
            400,
            format!("{f}.maxRequestAccessDuration"),
        ),
        (
            policy_with_port(&ctl, port(json!({"maxRequestAccessDuration": "3h"}))),
            400,
            format!("{f}.maxRequestAccessDuration"),
        ),
        (
            json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("rg", "vm1"), "ports": [port(json!({})), port(json!({}))]}]}}),
            400,
            "properties.virtualMachines[0].ports[1].number".into(),
        ),
        (
            json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("rg", "ghost"), "ports": [port(json!({}))]}]}}),
            400,
            "properties.virtualMachines[0].id".into(),
        ),
        (
            json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("other", "x1"), "ports": [port(json!({}))]}]}}),
            400,
            "properties.virtualMachines[0].id".into(),
        ),
        (
            json!({"properties": {"virtualMachines": [{"id": "/subscriptions/nope/vm1", "ports": [port(json!({}))]}]}}),
            400,
            "properties.virtualMachines[0].id".into(),
        ),
        (
            json!({"properties": {}}),
            400,
            "properties.virtualMachines".into(),
        ),
        (json!({"kind": "Basic"}), 400, "properties".into()),
        (json!([1, 2]), 400, String::new()),
    ];
    let before = ctl.snapshot().await;
    for (body, status, field) in cases {
        let r = ctl.put(&path, body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {:?}", r.body);
        assert!(
            r.body["error"]["code"].is_string(),
            "not a CloudError: {:?}",
            r.body
        );
        assert!(
            r.message().contains(&field),
            "{body}: message '{}' does not name {field}",
            r.message()
        );
        assert_eq!(ctl.snapshot().await, before, "{body} changed state");
    }
    // Path parameters.
    for (path, field) in [
        (
            format!(
                "/subscriptions/not-a-guid/resourceGroups/rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?{V}"
            ),
            "subscriptionId",
        ),
        (
            format!("{}?{V}", ctl.policy_path("bad rg", "westeurope", "default")),
            "resourceGroupName",
        ),
        (
            format!("{}?{V}", ctl.policy_path("rg", "west europe", "default")),
            "ascLocation",
        ),
        (
            format!("{}?{V}", ctl.policy_path("rg", "westeurope", "bad!name")),
            "jitNetworkAccessPolicyName",
        ),
    ] {
        let r = ctl
            .put(&path, policy_with_port(&ctl, port(json!({}))))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {:?}", r.body);
        assert!(r.message().contains(field), "{path}: {}", r.message());
    }
    assert_eq!(ctl.snapshot().await, before);
}

#[tokio::test]
async fn malformed_and_oversized_bodies() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let path = format!(
        "{}{}?{V}",
        ctl.base,
        ctl.policy_path("rg", "westeurope", "default")
    );
    let before = ctl.snapshot().await;
    let r = ctl
        .http
        .put(&path)
        .bearer_auth(OWNER)
        .header("content-type", "application/json")
        .body("{\"properties\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidRequestContent");
    let r = ctl
        .http
        .put(&path)
        .bearer_auth(OWNER)
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let big = format!("{{\"kind\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let r = ctl
        .http
        .put(&path)
        .bearer_auth(OWNER)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RequestEntityTooLarge");
    assert_eq!(ctl.snapshot().await, before);
}

#[tokio::test]
async fn bad_initiates_are_rejected_naming_the_field_and_change_nothing() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "10.0.0.0/16").await;
    ctl.register("rg", "outside").await;
    let f = "virtualMachines[0].ports[0]";
    let p = |o: Value| {
        let mut base =
            json!({"number": 22, "allowedSourceAddressPrefix": "10.0.1.0/24", "duration": "PT1H"});
        for (k, v) in o.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        json!([base])
    };
    let cases: Vec<(&str, Value, String)> = vec![
        ("vm1", p(json!({"number": 8080})), format!("{f}.number")),
        ("vm1", p(json!({"number": -1})), format!("{f}.number")),
        (
            "vm1",
            p(json!({"duration": "PT4H"})),
            format!("{f}.duration"),
        ),
        (
            "vm1",
            p(json!({"duration": "an hour"})),
            format!("{f}.duration"),
        ),
        (
            "vm1",
            p(json!({"duration": null})),
            format!("{f}.endTimeUtc"),
        ),
        (
            "vm1",
            p(json!({"endTimeUtc": crate::util::in_secs(600)})),
            format!("{f}.duration"),
        ),
        (
            "vm1",
            p(json!({"duration": null, "endTimeUtc": crate::util::in_secs(-60)})),
            format!("{f}.endTimeUtc"),
        ),
        (
            "vm1",
            p(json!({"duration": null, "endTimeUtc": crate::util::in_secs(4 * 3600)})),
            format!("{f}.endTimeUtc"),
        ),
        (
            "vm1",
            p(json!({"duration": null, "endTimeUtc": "next tuesday"})),
            format!("{f}.endTimeUtc"),
        ),
        (
            "vm1",
            p(json!({"allowedSourceAddressPrefix": "10.0.1.5/24"})),
            format!("{f}.allowedSourceAddressPrefix"),
        ),
        (
            "vm1",
            p(json!({"allowedSourceAddressPrefix": "10.1.0.0/24"})),
            format!("{f}.allowedSourceAddressPrefix"),
        ),
        (
            "vm1",
            p(json!({"allowedSourceAddressPrefix": "*"})),
            format!("{f}.allowedSourceAddressPrefix"),
        ),
        // Omitted: the caller's address, 127.0.0.1, is outside 10.0.0.0/16.
        (
            "vm1",
            p(json!({"allowedSourceAddressPrefix": null})),
            format!("{f}.allowedSourceAddressPrefix"),
        ),
        ("outside", p(json!({})), "virtualMachines[0].id".into()),
        (
            "vm1",
            json!([{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "10.0.1.1"}, {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "10.0.1.1"}]),
            "virtualMachines[0].ports[1].number".into(),
        ),
        ("vm1", json!([]), "virtualMachines[0].ports".into()),
    ];
    let before = ctl.snapshot().await;
    for (vm, ports, field) in cases {
        let r = ctl.initiate("rg", vm, ports.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{ports}: {:?}", r.body);
        assert!(
            r.message().contains(&field),
            "{ports}: '{}' does not name {field}",
            r.message()
        );
        assert_eq!(ctl.snapshot().await, before, "{ports} changed state");
    }
    // Wrong action name and unknown policy.
    let r = ctl
        .call(
            Method::POST,
            &format!(
                "{}/open?{V}",
                ctl.policy_path("rg", "westeurope", "default")
            ),
            Some(OWNER),
            Some(json!({"virtualMachines": []})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("jitNetworkAccessPolicyInitiateType"));
    let r = ctl
        .call(
            Method::POST,
            &format!(
                "{}/initiate?{V}",
                ctl.policy_path("rg", "westeurope", "nope")
            ),
            Some(OWNER),
            Some(json!({"virtualMachines": []})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(ctl.snapshot().await, before);
    // Every refusal is in the audit log.
    let rejected = ctl.audit("action=request.rejected&limit=1000").await;
    assert!(rejected.len() >= 18, "{}", rejected.len());
    assert!(rejected.iter().all(|e| e["outcome"] == "failed"));
}

#[tokio::test]
async fn bad_native_input() {
    let ctl = Ctl::start().await;
    let before = ctl.snapshot().await;
    for (path, body, field) in [
        (
            "/api/v1/vms",
            json!({"resourceGroup": "bad rg", "name": "x"}),
            "resourceGroup",
        ),
        ("/api/v1/vms", json!({"resourceGroup": "rg"}), "name"),
        ("/api/v1/vms", json!({"id": "nonsense"}), "id"),
        (
            "/api/v1/vms",
            json!({"resourceGroup": "rg", "name": "x", "location": "west europe"}),
            "location",
        ),
        ("/api/v1/tokens", json!({}), "principal"),
        ("/api/v1/tokens", json!({"principal": "a b"}), "principal"),
        (
            "/api/v1/tokens",
            json!({"principal": "alice", "expiresIn": "soon"}),
            "expiresIn",
        ),
        (
            "/api/v1/roleAssignments",
            json!({"principal": "alice", "role": "God", "scope": format!("/subscriptions/{}", ctl.sub)}),
            "role",
        ),
        (
            "/api/v1/roleAssignments",
            json!({"principal": "alice", "role": "Reader", "scope": "/nowhere"}),
            "scope",
        ),
    ] {
        let r = ctl.post(path, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {:?}", r.body);
        assert!(r.message().contains(field), "{body}: {}", r.message());
        assert_eq!(ctl.snapshot().await, before, "{body}");
    }
    // A well-formed scope of a subscription that is not here is not found (404),
    // naming the field, and changes nothing.
    let body = json!({"principal": "alice", "role": "Reader", "scope": "/subscriptions/00000000-0000-0000-0000-000000000009"});
    let r = ctl.post("/api/v1/roleAssignments", body.clone()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{body}: {:?}", r.body);
    assert_eq!(r.code(), "SubscriptionNotFound");
    assert_eq!(r.body["error"]["target"], "scope");
    assert_eq!(ctl.snapshot().await, before, "{body}");
    for (path, field) in [
        ("/api/v1/requests/not-a-guid", "id"),
        ("/api/v1/requests?limit=0", "limit"),
        ("/api/v1/requests?active=maybe", "active"),
        ("/api/v1/audit?since=yesterday", "since"),
        ("/api/v1/audit?format=xml", "format"),
    ] {
        let r = ctl.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {:?}", r.body);
        assert!(r.message().contains(field), "{path}: {}", r.message());
    }
}
