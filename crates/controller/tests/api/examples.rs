//! Every request body in Azure's published examples is accepted and answered with the
//! example response's shape.

use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::util::{Ctl, OWNER};

const EXAMPLE_SUB: &str = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";

fn examples_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/azure-jit/examples/JitNetworkAccessPolicies");
    assert!(
        dir.is_dir(),
        "Azure's examples are expected at {} (the shared/ folder beside the repository); without them this contract test cannot run",
        dir.display()
    );
    dir
}

fn example(name: &str) -> Value {
    let text = std::fs::read_to_string(examples_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
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

/// Rewrites the example's subscription to ours.
fn adapt(v: &Value, sub: &str) -> Value {
    serde_json::from_str(&v.to_string().replace(EXAMPLE_SUB, sub)).unwrap()
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
    ctl.register("myRg1", "vm1").await;

    // Create (its body carries read-only fields and a requests array: ignored).
    let create = adapt(
        &example("CreateJitNetworkAccessPolicy_example.json"),
        &ctl.sub,
    );
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
    let init = adapt(
        &example("InitiateJitNetworkAccessPolicy_example.json"),
        &ctl.sub,
    );
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
    assert_eq!(port["allowedSourceAddressPrefix"], "192.127.0.2");
    assert_eq!(r.body["requestor"], "bootstrap-admin");
    assert_eq!(
        r.body["justification"],
        "testing a new version of the product"
    );
    let mut older = p["body"].clone();
    let port = &mut older["virtualMachines"][0]["ports"][0];
    port.as_object_mut().unwrap().remove("duration");
    port["endTimeUtc"] = Value::String(crate::util::in_secs(1800));
    let r = ctl
        .call(Method::POST, &path_of(&ctl, p), Some(OWNER), Some(older))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);

    // Get and the four lists now show the policy with its requests, newest first.
    for (file, list) in [
        ("GetJitNetworkAccessPolicy_example.json", false),
        ("GetJitNetworkAccessPoliciesSubscription_example.json", true),
        (
            "GetJitNetworkAccessPoliciesSubscriptionLocation_example.json",
            true,
        ),
        (
            "GetJitNetworkAccessPoliciesResourceGroup_example.json",
            true,
        ),
        (
            "GetJitNetworkAccessPoliciesResourceGroupLocation_example.json",
            true,
        ),
    ] {
        let ex = adapt(&example(file), &ctl.sub);
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
    let del = adapt(
        &example("DeleteJitNetworkAccessPolicy_example.json"),
        &ctl.sub,
    );
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
