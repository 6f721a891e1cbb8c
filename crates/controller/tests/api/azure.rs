//! The Azure-compatible policy API: create, get, the four lists, paging, update,
//! delete, api-version and path handling.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::util::{Ctl, OWNER};

const V: &str = "api-version=2020-01-01";

#[tokio::test]
async fn policies_list_at_all_four_scopes() {
    let ctl = Ctl::start().await;
    ctl.enable("rg-a", &["a1"], "*").await;
    ctl.enable("rg-b", &["b1"], "*").await;
    // A third policy in another location of rg-a.
    ctl.register("rg-a", "a2").await;
    let body = json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("rg-a", "a2"), "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT1H"}]}]}});
    let r = ctl
        .put(
            &format!("{}?{V}", ctl.policy_path("rg-a", "northeurope", "other")),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    let sub = &ctl.sub;
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                p["id"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .nth(2)
                    .unwrap()
                    .to_owned()
                    + "/"
                    + p["name"].as_str().unwrap()
            })
            .collect()
    };
    let cases = [
        (
            format!(
                "/subscriptions/{sub}/providers/Microsoft.Security/jitNetworkAccessPolicies?{V}"
            ),
            3,
        ),
        (
            format!(
                "/subscriptions/{sub}/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies?{V}"
            ),
            2,
        ),
        (
            format!(
                "/subscriptions/{sub}/resourceGroups/rg-a/providers/Microsoft.Security/jitNetworkAccessPolicies?{V}"
            ),
            2,
        ),
        (
            format!(
                "/subscriptions/{sub}/resourceGroups/rg-a/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies?{V}"
            ),
            1,
        ),
        (
            format!(
                "/subscriptions/{sub}/resourceGroups/RG-A/providers/Microsoft.Security/locations/NorthEurope/jitNetworkAccessPolicies?{V}"
            ),
            1,
        ),
    ];
    for (path, n) in cases {
        let r = ctl.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        assert_eq!(
            r.body["value"].as_array().unwrap().len(),
            n,
            "{path}: {:?}",
            names(&r.body)
        );
        for p in r.body["value"].as_array().unwrap() {
            assert_eq!(
                p["type"],
                "Microsoft.Security/locations/jitNetworkAccessPolicies"
            );
            assert_eq!(p["properties"]["provisioningState"], "Succeeded");
        }
    }
}

#[tokio::test]
async fn lists_page_with_next_link() {
    let ctl = Ctl::start().await;
    for rg in ["p1", "p2", "p3"] {
        ctl.enable(rg, &["vm"], "*").await;
    }
    let mut url = format!(
        "{}/subscriptions/{}/providers/Microsoft.Security/jitNetworkAccessPolicies?{V}&$top=2",
        ctl.base, ctl.sub
    );
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = ctl.http.get(&url).bearer_auth(OWNER).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body: serde_json::Value = r.json().await.unwrap();
        pages += 1;
        for p in body["value"].as_array().unwrap() {
            seen.push(p["id"].as_str().unwrap().to_owned());
        }
        match body["nextLink"].as_str() {
            Some(next) => url = next.to_owned(),
            None => break,
        }
        assert!(pages < 5, "paging does not end");
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(pages, 2);
    let mut dedup = seen.clone();
    dedup.dedup();
    assert_eq!(dedup, seen);
}

#[tokio::test]
async fn api_version_is_required_and_checked() {
    let ctl = Ctl::start().await;
    let path = format!(
        "/subscriptions/{}/providers/Microsoft.Security/jitNetworkAccessPolicies",
        ctl.sub
    );
    let r = ctl.get(&path).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "MissingApiVersionParameter")
    );
    let r = ctl
        .get(&format!("{path}?api-version=2015-06-01-preview"))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "InvalidApiVersionParameter")
    );
    assert!(r.message().contains("2015-06-01-preview"));
    let r = ctl.get(&format!("{path}?{V}")).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn get_update_delete_and_path_case() {
    let ctl = Ctl::start().await;
    ctl.enable("web", &["w1", "w2"], "10.0.0.0/8").await;
    // Paths and ids compare case-insensitively, as in Azure.
    let lower = ctl
        .policy_path("web", "westeurope", "default")
        .to_lowercase()
        .replace(&ctl.sub.to_lowercase(), &ctl.sub);
    let r = ctl.get(&format!("{lower}?{V}")).await;
    assert_eq!(r.status, StatusCode::OK, "{lower}: {:?}", r.body);
    assert_eq!(
        r.body["properties"]["virtualMachines"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let port = &r.body["properties"]["virtualMachines"][0]["ports"][0];
    assert_eq!(port["allowedSourceAddressPrefix"], "10.0.0.0/8");
    assert!(port.get("allowedSourceAddressPrefixes").is_none());

    // Unknown policy: 404 CloudError.
    let r = ctl
        .get(&format!(
            "{}?{V}",
            ctl.policy_path("web", "westeurope", "nope")
        ))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );

    // Update to the plural prefixes field: it reads back as written.
    let body = json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("web", "w1"), "ports": [
        {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["10.0.0.0/8", "192.168.0.0/16"], "maxRequestAccessDuration": "PT2H"}
    ]}]}});
    let r = ctl
        .put(
            &format!("{}?{V}", ctl.policy_path("web", "westeurope", "default")),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let vms = r.body["properties"]["virtualMachines"].as_array().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(
        vms[0]["ports"][0]["allowedSourceAddressPrefixes"],
        json!(["10.0.0.0/8", "192.168.0.0/16"])
    );
    assert!(
        vms[0]["ports"][0]
            .get("allowedSourceAddressPrefix")
            .is_none()
    );

    // w2 left the policy: it may now join another one.
    let r = ctl
        .call(
            Method::DELETE,
            &format!("{}?{V}", ctl.policy_path("web", "westeurope", "default")),
            Some(OWNER),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = ctl
        .get(&format!(
            "{}?{V}",
            ctl.policy_path("web", "westeurope", "default")
        ))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = ctl
        .call(
            Method::DELETE,
            &format!("{}?{V}", ctl.policy_path("web", "westeurope", "default")),
            Some(OWNER),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_vm_belongs_to_one_policy() {
    let ctl = Ctl::start().await;
    ctl.enable("web", &["w1"], "*").await;
    let body = json!({"properties": {"virtualMachines": [{"id": ctl.vm_id("web", "w1"), "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT1H"}]}]}});
    let before = ctl.snapshot().await;
    let r = ctl
        .put(
            &format!("{}?{V}", ctl.policy_path("web", "westeurope", "second")),
            body,
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "Conflict"));
    assert!(
        r.message().contains("properties.virtualMachines[0].id"),
        "{}",
        r.message()
    );
    assert_eq!(ctl.snapshot().await, before);
}

#[tokio::test]
async fn unknown_subscription_is_404() {
    let ctl = Ctl::start().await;
    let r = ctl.get(&format!("/subscriptions/00000000-0000-0000-0000-000000000001/providers/Microsoft.Security/jitNetworkAccessPolicies?{V}")).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "SubscriptionNotFound")
    );
}

/// An initiate retried with its idempotency key (after a lost answer or a failover)
/// answers with the request made first and makes no second one; Azure's SDKs' own
/// `x-ms-client-request-id` serves as the key; a malformed key is refused by name.
#[tokio::test]
async fn an_initiate_retried_with_its_key_is_not_doubled() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    async fn send(ctl: &Ctl, header: &str, key: &str) -> crate::util::Resp {
        let ports =
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]);
        ctl.initiate_with(OWNER, "rg", "vm1", ports, &[(header, key)])
            .await
    }
    let first = send(&ctl, "Idempotency-Key", "retry-1").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = send(&ctl, "Idempotency-Key", "retry-1").await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.request_id(), first.request_id());
    let sdk = send(&ctl, "x-ms-client-request-id", "0b6c1f3e-sdk").await;
    let sdk_again = send(&ctl, "x-ms-client-request-id", "0b6c1f3e-sdk").await;
    assert_eq!(sdk_again.request_id(), sdk.request_id());
    assert_ne!(sdk.request_id(), first.request_id());
    let listed = ctl.get("/api/v1/requests").await;
    assert_eq!(
        listed.body["value"].as_array().unwrap().len(),
        2,
        "{:?}",
        listed.body
    );
    // A key that is not 1-128 visible ASCII characters: 400 naming it, nothing made.
    let bad = send(&ctl, "Idempotency-Key", "has space").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.body["error"]["target"], "idempotency-key",
        "{:?}",
        bad.body
    );
    let listed = ctl.get("/api/v1/requests").await;
    assert_eq!(listed.body["value"].as_array().unwrap().len(), 2);
}
