//! The Azure contract (`jitNetworkAccessPolicies`, api-version 2020-01-01), operation
//! by operation, with fixtures of our own written in the shape of the published
//! examples: every request body is accepted and answered with the response's shape.
//! The repository carries them; nothing outside it is read (a fresh clone has no
//! `shared/`).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::util::{Ctl, OWNER};

/// The subscription the fixtures are written for; rewritten to the controller's.
const FIXTURE_SUB: &str = "7d1c2a64-3b9e-4f20-9a8d-5e6f70819a2b";
const RG: &str = "prod-web";
const LOC: &str = "northeurope";
const POLICY: &str = "default";

fn vm(name: &str) -> String {
    format!(
        "/subscriptions/{FIXTURE_SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

fn policy_id() -> String {
    format!(
        "/subscriptions/{FIXTURE_SUB}/resourceGroups/{RG}/providers/Microsoft.Security/locations/{LOC}/jitNetworkAccessPolicies/{POLICY}"
    )
}

/// Path parameters as the contract names them.
fn params(rg: bool, loc: bool, name: bool, action: bool) -> Value {
    let mut p = json!({"api-version": "2020-01-01", "subscriptionId": FIXTURE_SUB});
    if rg {
        p["resourceGroupName"] = json!(RG);
    }
    if loc {
        p["ascLocation"] = json!(LOC);
    }
    if name {
        p["jitNetworkAccessPolicyName"] = json!(POLICY);
    }
    if action {
        p["jitNetworkAccessPolicyInitiateType"] = json!("initiate");
    }
    p
}

/// The policy as the contract shows it (with one request, whose shape the answers
/// must have once requests exist).
fn policy_body(with_request: bool) -> Value {
    let requests = if with_request {
        json!([{
            "virtualMachines": [{
                "id": vm("web-1"),
                "ports": [{
                    "number": 22,
                    "allowedSourceAddressPrefix": "203.0.113.7",
                    "endTimeUtc": "2026-03-01T10:00:00.0000000Z",
                    "status": "Initiated",
                    "statusReason": "UserRequested"
                }]
            }],
            "startTimeUtc": "2026-03-01T09:00:00.0000000Z",
            "requestor": "someone@example.com"
        }])
    } else {
        json!([])
    };
    json!({
        "id": policy_id(),
        "name": POLICY,
        "type": "Microsoft.Security/locations/jitNetworkAccessPolicies",
        "kind": "Basic",
        "location": LOC,
        "properties": {
            "virtualMachines": [
                {
                    "id": vm("web-1"),
                    "ports": [
                        {"number": 22, "protocol": "*", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT3H"},
                        {"number": 3389, "protocol": "TCP", "allowedSourceAddressPrefixes": ["203.0.113.0/24", "198.51.100.0/24"], "maxRequestAccessDuration": "PT1H"}
                    ]
                },
                {
                    "id": vm("db-1"),
                    "ports": [
                        {"number": 5986, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT30M"}
                    ]
                }
            ],
            "requests": requests,
            "provisioningState": "Succeeded"
        }
    })
}

fn fixture(params: Value, body: Option<Value>, status: &str, response: Value) -> Value {
    let mut p = params;
    if let Some(b) = body {
        p["body"] = b;
    }
    json!({"parameters": p, "responses": {status: {"body": response}}})
}

/// Create or update: the body carries read-only fields and a `requests` array, which
/// the server ignores.
fn create() -> Value {
    fixture(
        params(true, true, true, false),
        Some(policy_body(true)),
        "200",
        policy_body(false),
    )
}

/// Initiate with `duration`, as the current contract's example sends it.
fn initiate() -> Value {
    let body = json!({
        "virtualMachines": [{
            "id": vm("web-1"),
            "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.7"}]
        }],
        "justification": "rotate the host keys"
    });
    let response = json!({
        "virtualMachines": [{
            "id": vm("web-1"),
            "ports": [{
                "number": 22,
                "allowedSourceAddressPrefix": "203.0.113.7",
                "endTimeUtc": "2026-03-01T10:00:00.0000000Z",
                "status": "Initiated",
                "statusReason": "UserRequested"
            }]
        }],
        "startTimeUtc": "2026-03-01T09:00:00.0000000Z",
        "requestor": "someone@example.com",
        "justification": "rotate the host keys"
    });
    fixture(params(true, true, true, true), Some(body), "202", response)
}

/// Get, and the four lists (subscription, subscription + location, resource group,
/// resource group + location), each answered with the policy and its requests.
fn reads() -> Vec<(&'static str, Value, bool)> {
    let list = json!({"value": [policy_body(true)]});
    vec![
        (
            "get",
            fixture(
                params(true, true, true, false),
                None,
                "200",
                policy_body(true),
            ),
            false,
        ),
        (
            "list",
            fixture(
                params(false, false, false, false),
                None,
                "200",
                list.clone(),
            ),
            true,
        ),
        (
            "list by location",
            fixture(params(false, true, false, false), None, "200", list.clone()),
            true,
        ),
        (
            "list by resource group",
            fixture(params(true, false, false, false), None, "200", list.clone()),
            true,
        ),
        (
            "list by resource group and location",
            fixture(params(true, true, false, false), None, "200", list),
            true,
        ),
    ]
}

fn delete() -> Value {
    fixture(params(true, true, true, false), None, "200", Value::Null)
}

/// Every key of `want` exists in `got` with the same JSON type, recursively; arrays
/// compare their first elements when both have one.
fn same_shape(want: &Value, got: &Value, path: &str) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let gv = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} missing in response: {got}"));
                same_shape(wv, gv, &format!("{path}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            if let (Some(w0), Some(g0)) = (w.first(), g.first()) {
                same_shape(w0, g0, &format!("{path}[0]"));
            } else {
                assert_eq!(
                    w.is_empty(),
                    g.is_empty(),
                    "{path}: one array is empty: want {want}, got {got}"
                );
            }
        }
        (Value::String(_), Value::String(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::Bool(_), Value::Bool(_)) => {}
        _ => panic!("{path}: type differs: want {want}, got {got}"),
    }
}

/// Rewrites the fixture's subscription to ours.
fn adapt(v: &Value, sub: &str) -> Value {
    serde_json::from_str(&v.to_string().replace(FIXTURE_SUB, sub)).unwrap()
}

fn path_of(ctl: &Ctl, p: &Value) -> String {
    let mut s = format!("/subscriptions/{}", ctl.sub);
    if let Some(rg) = p["resourceGroupName"].as_str() {
        s.push_str(&format!("/resourceGroups/{rg}"));
    }
    s.push_str("/providers/Microsoft.Security");
    if let Some(loc) = p["ascLocation"].as_str() {
        s.push_str(&format!("/locations/{loc}"));
    }
    s.push_str("/jitNetworkAccessPolicies");
    if let Some(name) = p["jitNetworkAccessPolicyName"].as_str() {
        s.push_str(&format!("/{name}"));
    }
    if let Some(action) = p["jitNetworkAccessPolicyInitiateType"].as_str() {
        s.push_str(&format!("/{action}"));
    }
    format!("{s}?api-version={}", p["api-version"].as_str().unwrap())
}

#[tokio::test]
async fn every_azure_example_is_accepted_with_its_response_shape() {
    let ctl = Ctl::start().await;
    ctl.register(RG, "web-1").await;
    ctl.register(RG, "db-1").await;

    // Create (its body carries read-only fields and a requests array: ignored).
    let create = adapt(&create(), &ctl.sub);
    let p = &create["parameters"];
    let r = ctl
        .call(
            Method::PUT,
            &path_of(&ctl, p),
            Some(OWNER),
            Some(p["body"].clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let mut want = create["responses"]["200"]["body"].clone();
    // The server owns `requests`: the example's are not stored, so none exist yet.
    want["properties"]["requests"] = Value::Array(vec![]);
    same_shape(&want, &r.body, "create");
    assert_eq!(
        r.body["properties"]["requests"],
        Value::Array(vec![]),
        "input requests must be ignored"
    );
    assert_eq!(r.body["id"], want["id"]);
    assert_eq!(
        r.body["properties"]["virtualMachines"],
        want["properties"]["virtualMachines"]
    );

    // Initiate, as the current example sends it (`duration`), then as the older one
    // and PowerShell do (`endTimeUtc`).
    let init = adapt(&initiate(), &ctl.sub);
    let p = &init["parameters"];
    let r = ctl
        .call(
            Method::POST,
            &path_of(&ctl, p),
            Some(OWNER),
            Some(p["body"].clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    same_shape(&init["responses"]["202"]["body"], &r.body, "initiate");
    let port = &r.body["virtualMachines"][0]["ports"][0];
    assert_eq!(port["status"], "Initiated");
    assert_eq!(port["statusReason"], "UserRequested");
    assert_eq!(port["allowedSourceAddressPrefix"], "203.0.113.7");
    assert_eq!(r.body["requestor"], "bootstrap-admin");
    assert_eq!(r.body["justification"], "rotate the host keys");
    let mut older = p["body"].clone();
    let port = &mut older["virtualMachines"][0]["ports"][0];
    port.as_object_mut().unwrap().remove("duration");
    port["endTimeUtc"] = Value::String(crate::util::in_secs(1800));
    let r = ctl
        .call(Method::POST, &path_of(&ctl, p), Some(OWNER), Some(older))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);

    // Get and the four lists now show the policy with its requests, newest first.
    for (file, ex, list) in reads() {
        let ex = adapt(&ex, &ctl.sub);
        let r = ctl
            .call(
                Method::GET,
                &path_of(&ctl, &ex["parameters"]),
                Some(OWNER),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{file}: {:?}", r.body);
        same_shape(&ex["responses"]["200"]["body"], &r.body, file);
        let policy = if list { &r.body["value"][0] } else { &r.body };
        let requests = policy["properties"]["requests"].as_array().unwrap();
        assert_eq!(requests.len(), 2, "{file}");
        // The second initiate superseded the first (same VM, port and source).
        assert_eq!(
            requests[1]["virtualMachines"][0]["ports"][0]["statusReason"], "NewerRequestInitiated",
            "{file}"
        );
        assert_eq!(
            requests[0]["virtualMachines"][0]["ports"][0]["status"], "Initiated",
            "{file}"
        );
    }

    // Delete: 200, then 204 when it no longer exists.
    let del = adapt(&delete(), &ctl.sub);
    let r = ctl
        .call(
            Method::DELETE,
            &path_of(&ctl, &del["parameters"]),
            Some(OWNER),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = ctl
        .call(
            Method::DELETE,
            &path_of(&ctl, &del["parameters"]),
            Some(OWNER),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}
