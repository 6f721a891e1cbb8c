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
