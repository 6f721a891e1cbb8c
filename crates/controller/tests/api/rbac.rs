//! Authentication and RBAC: 401 and 403 answers, scope nesting, and their audit.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::util::Ctl;

const V: &str = "api-version=2020-01-01";

#[tokio::test]
async fn unauthenticated_calls_are_refused_and_audited() {
    let ctl = Ctl::start().await;
    let path = format!(
        "/subscriptions/{}/providers/Microsoft.Security/jitNetworkAccessPolicies?{V}",
        ctl.sub
    );
    for token in [
        None,
        Some("jg_000000000000.deadbeef"),
        Some("not-a-token-at-all"),
    ] {
        let r = ctl.call(Method::GET, &path, token, None).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNAUTHORIZED, "AuthenticationFailed"),
            "{token:?}"
        );
    }
    let r = ctl
        .http
        .get(format!("{}{path}", ctl.base))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let events = ctl.audit("action=authentication.failed").await;
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| e["outcome"] == "denied"
        && e["actor"] == "anonymous"
        && e["source"] == "127.0.0.1"));
    // Health, metrics and the OpenAPI document need no token.
    for p in ["/api/v1/health", "/metrics", "/api/v1/openapi.json"] {
        assert_eq!(
            ctl.call(Method::GET, p, None, None).await.status,
            StatusCode::OK,
            "{p}"
        );
    }
}

#[tokio::test]
async fn revoked_and_expired_tokens_stop_working() {
    let ctl = Ctl::start_simulated().await;
    let t = ctl
        .post(
            "/api/v1/tokens",
            json!({"principal": "alice", "description": "laptop"}),
        )
        .await;
    let token = t.body["token"].as_str().unwrap().to_owned();
    let id = t.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        ctl.get_as(&token, "/api/v1/whoami").await.body["principal"],
        "alice"
    );
    // Listing never shows the secret.
    let list = ctl.get("/api/v1/tokens").await;
    assert!(!list.body.to_string().contains(&token));
    assert_eq!(
        ctl.delete(&format!("/api/v1/tokens/{id}")).await.status,
        StatusCode::OK
    );
    let r = ctl.get_as(&token, "/api/v1/whoami").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.message().contains("revoked"), "{}", r.message());

    let t = ctl
        .post(
            "/api/v1/tokens",
            json!({"principal": "bob", "expiresIn": "PT1S"}),
        )
        .await;
    let token = t.body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        ctl.get_as(&token, "/api/v1/whoami").await.status,
        StatusCode::OK
    );
    ctl.advance(std::time::Duration::from_millis(1200));
    let r = ctl.get_as(&token, "/api/v1/whoami").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.message().contains("expired"), "{}", r.message());
}

#[tokio::test]
async fn a_requester_scoped_to_one_vm_cannot_read_or_open_another() {
    let ctl = Ctl::start().await;
    ctl.enable("web", &["web-1", "web-2"], "*").await;
    let alice = ctl
        .principal("alice", "JIT Requester", &ctl.vm_id("web", "web-1"))
        .await;
    let policy = format!("{}?{V}", ctl.policy_path("web", "westeurope", "default"));

    // Reads: only web-1 is visible.
    let r = ctl.get_as(&alice, &policy).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let vms = r.body["properties"]["virtualMachines"].as_array().unwrap();
    assert_eq!(vms.len(), 1);
    assert!(vms[0]["id"].as_str().unwrap().ends_with("/web-1"));
    let list = ctl
        .get_as(
            &alice,
            &format!(
                "/subscriptions/{}/providers/Microsoft.Security/jitNetworkAccessPolicies?{V}",
                ctl.sub
            ),
        )
        .await;
    assert_eq!(
        list.body["value"][0]["properties"]["virtualMachines"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Initiate: web-1 yes, web-2 no.
    let ok = ctl
        .initiate_as(
            &alice,
            "web",
            "web-1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{:?}", ok.body);
    assert_eq!(ok.body["requestor"], "alice");
    let before = ctl.snapshot().await;
    let no = ctl
        .initiate_as(
            &alice,
            "web",
            "web-2",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    assert_eq!(
        (no.status, no.code()),
        (StatusCode::FORBIDDEN, "AuthorizationFailed")
    );
    assert!(
        no.message().contains("initiate/action") && no.message().contains("web-2"),
        "{}",
        no.message()
    );

    // Writes: refused.
    let body = json!({"properties": {"virtualMachines": []}});
    let r = ctl
        .call(Method::PUT, &policy, Some(&alice), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = ctl.call(Method::DELETE, &policy, Some(&alice), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = ctl
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(&alice),
            Some(json!({"principal": "mallory"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = ctl
        .call(Method::POST, "/api/v1/roleAssignments", Some(&alice), Some(json!({"principal": "alice", "role": "Owner", "scope": format!("/subscriptions/{}", ctl.sub)})))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(ctl.snapshot().await, before);

    // Alice's native view: her own VM only.
    let vms = ctl.get_as(&alice, "/api/v1/vms").await;
    assert_eq!(vms.body["value"].as_array().unwrap().len(), 1);
    assert_eq!(
        ctl.get_as(&alice, "/api/v1/vms/web/web-2").await.status,
        StatusCode::FORBIDDEN
    );
    // The owner's request on web-2 is invisible to her; her own is visible and revocable.
    let theirs = ctl
        .initiate(
            "web",
            "web-2",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.9", "duration": "PT1H"}]),
        )
        .await;
    let their_id = theirs.request_id();
    assert_eq!(
        ctl.get_as(&alice, &format!("/api/v1/requests/{their_id}"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{their_id}/revoke"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let mine = ok.request_id();
    let r = ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{mine}/revoke"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    // Denials are audited with the actor.
    let denied = ctl.audit("action=authorization.denied").await;
    assert!(denied.len() >= 6, "{denied:?}");
    assert!(
        denied
            .iter()
            .all(|e| e["actor"] == "alice" && e["outcome"] == "denied")
    );
}

#[tokio::test]
async fn a_bob_with_a_requesters_role_on_the_group_can_use_every_vm_in_it_but_a_reader_cannot_open()
{
    let ctl = Ctl::start().await;
    ctl.enable("web", &["web-1", "web-2"], "*").await;
    ctl.enable("db", &["db-1"], "*").await;
    let rg = format!("/subscriptions/{}/resourceGroups/web", ctl.sub);
    let bob = ctl.principal("bob", "jit-requester", &rg).await;
    let carol = ctl
        .principal("carol", "Reader", &format!("/subscriptions/{}", ctl.sub))
        .await;
    let p = json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]);
    assert_eq!(
        ctl.initiate_as(&bob, "web", "web-2", p.clone())
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        ctl.initiate_as(&bob, "db", "db-1", p.clone()).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        ctl.initiate_as(&carol, "web", "web-1", p.clone())
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        ctl.get_as(
            &carol,
            &format!("{}?{V}", ctl.policy_path("db", "westeurope", "default"))
        )
        .await
        .status,
        StatusCode::OK
    );
    // Bob cannot see db's policy at all.
    assert_eq!(
        ctl.get_as(
            &bob,
            &format!("{}?{V}", ctl.policy_path("db", "westeurope", "default"))
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    let list = ctl
        .get_as(
            &bob,
            &format!(
                "/subscriptions/{}/providers/Microsoft.Security/jitNetworkAccessPolicies?{V}",
                ctl.sub
            ),
        )
        .await;
    assert_eq!(list.body["value"].as_array().unwrap().len(), 1);
    // Role assignments can be listed and removed; removal takes effect at once.
    let ras = ctl.get("/api/v1/roleAssignments?principal=bob").await;
    let id = ras.body["value"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        ctl.delete(&format!("/api/v1/roleAssignments/{id}"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        ctl.initiate_as(&bob, "web", "web-2", p).await.status,
        StatusCode::FORBIDDEN
    );
}
