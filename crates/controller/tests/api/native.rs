//! The native API: VMs, whoami, health, metrics, OpenAPI, and TLS.

use reqwest::StatusCode;
use serde_json::json;

use crate::util::{Ctl, OWNER};

#[tokio::test]
async fn vms_register_list_show_delete() {
    let ctl = Ctl::start().await;
    let r = ctl
        .post(
            "/api/v1/vms",
            json!({"resourceGroup": "lab", "name": "box-1"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["id"], ctl.vm_id("lab", "box-1"));
    // Registering again (any case) is idempotent.
    let r = ctl
        .post("/api/v1/vms", json!({"id": ctl.vm_id("LAB", "BOX-1")}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    ctl.enable("lab", &["box-2"], "*").await;
    let list = ctl.get("/api/v1/vms?resourceGroup=lab").await;
    let vms = list.body["value"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    let box2 = vms.iter().find(|v| v["name"] == "box-2").unwrap();
    assert_eq!(box2["protectedPorts"], json!([22, 3389]));
    let show = ctl.get("/api/v1/vms/lab/box-2").await;
    assert!(
        show.body["policy"]
            .as_str()
            .unwrap()
            .ends_with("/jitNetworkAccessPolicies/default")
    );
    assert_eq!(
        ctl.get("/api/v1/vms/lab/none").await.status,
        StatusCode::NOT_FOUND
    );
    // A VM in a policy cannot be deleted; one outside can.
    let r = ctl.delete("/api/v1/vms/lab/box-2").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(
        ctl.delete("/api/v1/vms/lab/box-1").await.status,
        StatusCode::OK
    );
    assert_eq!(
        ctl.delete("/api/v1/vms/lab/box-1").await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn whoami_health_metrics_openapi() {
    let ctl = Ctl::start().await;
    let w = ctl.get("/api/v1/whoami").await;
    assert_eq!(w.body["principal"], "bootstrap-admin");
    assert_eq!(w.body["subscription"], ctl.sub);
    assert_eq!(w.body["roles"][0]["role"], "Owner");
    assert_eq!(w.body["callerIp"], "127.0.0.1");
    let h = ctl
        .call(reqwest::Method::GET, "/api/v1/health", None, None)
        .await;
    assert_eq!(h.body["status"], "ok");
    ctl.enable("rg", &["vm1"], "*").await;
    ctl.initiate(
        "rg",
        "vm1",
        json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
    )
    .await;
    let m = ctl
        .http
        .get(format!("{}/metrics", ctl.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("jitgate_initiates_total 1"), "{m}");
    assert!(m.contains("jitgate_http_requests_total"), "{m}");
    let o = ctl
        .call(reqwest::Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert!(
        o.body["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{:?}",
        o.body
    );
    // Unknown paths: a CloudError 404.
    let r = ctl.get("/api/v1/nothing-here").await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "NotFound"));
}

#[tokio::test]
async fn serves_tls_with_a_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut config = crate::util::config(dir.path().join("data"));
    config.tls = Some(jitgate_controller::TlsFiles {
        cert: cert_path,
        key: key_path,
    });
    let running = jitgate_controller::start(config).await.unwrap();
    let port = running.local_addr.port();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", running.local_addr)
        .build()
        .unwrap();
    let r = client
        .get(format!("https://localhost:{port}/api/v1/whoami"))
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // nextLink uses https when serving TLS.
    let body: serde_json::Value = client
        .get(format!("https://localhost:{port}/subscriptions/{}/providers/Microsoft.Security/jitNetworkAccessPolicies?api-version=2020-01-01&$top=1", running.subscription))
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(body["value"].as_array().unwrap().is_empty());
    // Plain HTTP to the TLS port fails.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/api/v1/health"))
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_public_address_is_served_over_https_from_the_controllers_own_ca_unless_told() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::util::config(dir.path().to_owned());
    config.listen = "0.0.0.0:0".parse().unwrap();
    let running = jitgate_controller::start(config.clone()).await.unwrap();
    assert!(running.state.tls);
    let pin = running.state.tls_pin.expect("a pin");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], running.local_addr.port()));
    // A client pinning the CA's fingerprint, and nothing else, verifies the server.
    let verifier = jitgate_proto::tls::PinnedVerifier::new(Vec::new(), vec![pin]);
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(verifier.client_config().unwrap())
        .build()
        .unwrap();
    let r = client
        .post(format!("https://{addr}/api/v1/enrollTokens"))
        .bearer_auth(OWNER)
        .json(&json!({"uses": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: serde_json::Value = r.json().await.unwrap();
    // The enrollment token carries the fingerprint for the agent to pin.
    assert_eq!(body["caFingerprint"], pin.to_string());
    let token = body["token"].as_str().unwrap();
    assert_eq!(
        jitgate_proto::tls::split_pinned_token(token).unwrap().1,
        Some(pin)
    );
    // The token with its pin enrolls (the controller ignores the pin part).
    let r = client
        .post(format!("https://{addr}/api/v1/agent/enroll"))
        .json(&json!({"enrollToken": token, "resourceGroup": "rg", "name": "vm-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    // A client pinning another fingerprint gets nowhere.
    let other = jitgate_proto::tls::PinnedVerifier::new(
        Vec::new(),
        vec![jitgate_proto::tls::Fingerprint([7; 32])],
    );
    let err = reqwest::Client::builder()
        .tls_backend_preconfigured(other.client_config().unwrap())
        .build()
        .unwrap()
        .get(format!("https://{addr}/api/v1/health"))
        .send()
        .await
        .unwrap_err();
    let advice = jitgate_proto::tls::advice(&err, &format!("https://{addr}")).unwrap();
    assert!(
        advice.contains("not the one the fingerprint names"),
        "{advice}"
    );
    running.shutdown().await.unwrap();

    // A second start keeps the CA: the pin agents hold stays valid.
    let running = jitgate_controller::start(config.clone()).await.unwrap();
    assert_eq!(running.state.tls_pin, Some(pin));
    running.shutdown().await.unwrap();

    // Plain HTTP only when told, and then without a pin.
    config.insecure_http = true;
    let running = jitgate_controller::start(config).await.unwrap();
    assert!(!running.state.tls);
    assert_eq!(running.state.tls_pin, None);
    running.shutdown().await.unwrap();
}

/// `GET /api/v1/vms` pages (a continuation token, pages filled with what the caller
/// may read however many others lie between), filters by name across resource groups
/// and by group in the store, and refuses a token it did not issue.
#[tokio::test]
async fn vm_lists_are_paged_filtered_and_only_what_the_caller_may_read() {
    let ctl = Ctl::start().await;
    for (rg, name) in [
        ("rg-a", "web-1"),
        ("rg-a", "web-2"),
        ("rg-b", "web-1"),
        ("rg-b", "db-1"),
        ("rg-b", "db-2"),
        ("rg-c", "web-1"),
        ("rg-c", "web-3"),
    ] {
        ctl.register(rg, name).await;
    }
    ctl.enable("rg-b", &["db-1"], "*").await;
    let all_pages = |token: String, query: &'static str| {
        let ctl = &ctl;
        async move {
            let mut names = Vec::new();
            let mut pages = 0;
            let mut next: Option<String> = None;
            loop {
                let mut path = format!("/api/v1/vms?limit=2{query}");
                if let Some(t) = &next {
                    path.push_str(&format!("&continuationToken={t}"));
                }
                let r = ctl.get_as(&token, &path).await;
                assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
                let value = r.body["value"].as_array().unwrap();
                assert!(value.len() <= 2);
                pages += 1;
                for v in value {
                    names.push(format!(
                        "{}/{}",
                        v["resourceGroup"].as_str().unwrap(),
                        v["name"].as_str().unwrap()
                    ));
                }
                match r.body["continuationToken"].as_str() {
                    Some(t) => {
                        assert_eq!(value.len(), 2, "a page before the last is full");
                        next = Some(t.to_owned());
                    }
                    None => break,
                }
            }
            (names, pages)
        }
    };
    let (names, pages) = all_pages(OWNER.to_owned(), "").await;
    assert_eq!(
        names,
        [
            "rg-a/web-1",
            "rg-a/web-2",
            "rg-b/db-1",
            "rg-b/db-2",
            "rg-b/web-1",
            "rg-c/web-1",
            "rg-c/web-3"
        ]
    );
    assert_eq!(pages, 4);
    // A reader of rg-a and rg-c sees full pages of just those.
    let scope = |rg: &str| format!("/subscriptions/{}/resourceGroups/{rg}", ctl.sub);
    let carol = ctl.principal("carol", "Reader", &scope("rg-a")).await;
    let r = ctl
        .post(
            "/api/v1/roleAssignments",
            json!({"principal": "carol", "role": "Reader", "scope": scope("rg-c")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let (names, _) = all_pages(carol.clone(), "").await;
    assert_eq!(
        names,
        ["rg-a/web-1", "rg-a/web-2", "rg-c/web-1", "rg-c/web-3"]
    );
    // By name, across groups; by group and name.
    let (names, _) = all_pages(OWNER.to_owned(), "&name=WEB-1").await;
    assert_eq!(names, ["rg-a/web-1", "rg-b/web-1", "rg-c/web-1"]);
    let (names, _) = all_pages(carol, "&name=web-1").await;
    assert_eq!(names, ["rg-a/web-1", "rg-c/web-1"]);
    let r = ctl.get("/api/v1/vms?name=db-1&resourceGroup=rg-b").await;
    let v = &r.body["value"];
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["protectedPorts"], json!([22, 3389]));
    assert!(v[0]["policy"].as_str().unwrap().ends_with("/default"));
    assert_eq!(v[0]["liveGrants"], 0);
    assert_eq!(v[0]["agent"]["enrolled"], false);
    // Bad input names the parameter.
    for (query, field) in [
        ("continuationToken=zz", "continuationToken"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("name=a%20b", "name"),
    ] {
        let r = ctl.get(&format!("/api/v1/vms?{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {:?}", r.body);
        assert_eq!(r.body["error"]["target"], field, "{query}: {:?}", r.body);
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Authentication reads nothing from the store for a token seen moments ago, yet a
/// revoke or a removed role takes effect on the very next call.
#[tokio::test]
async fn authentication_is_cached_and_every_token_or_role_change_is_seen_at_once() {
    let ctl = Ctl::start().await;
    ctl.register("rg1", "vm1").await;
    let scope = format!("/subscriptions/{}/resourceGroups/rg1", ctl.sub);
    let dave = ctl.principal("dave", "Reader", &scope).await;
    let counts = || async {
        let m = ctl
            .call(reqwest::Method::GET, "/metrics", None, None)
            .await
            .body;
        let text = m.as_str().unwrap_or_default().to_owned();
        (
            metric(&text, "jitgate_auth_cache_hits_total"),
            metric(&text, "jitgate_auth_cache_misses_total"),
        )
    };
    assert_eq!(
        ctl.get_as(&dave, "/api/v1/vms/rg1/vm1").await.status,
        StatusCode::OK
    );
    let (hits0, misses0) = counts().await;
    for _ in 0..5 {
        assert_eq!(
            ctl.get_as(&dave, "/api/v1/vms/rg1/vm1").await.status,
            StatusCode::OK
        );
    }
    let (hits1, misses1) = counts().await;
    assert!(hits1 - hits0 >= 5.0, "hits {hits0} -> {hits1}");
    assert_eq!(misses1, misses0, "no store lookup for a cached token");
    // A wrong secret for a cached token id is still refused.
    let last = dave.chars().last().unwrap();
    let wrong = format!(
        "{}{}",
        &dave[..dave.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    assert_eq!(
        ctl.get_as(&wrong, "/api/v1/whoami").await.status,
        StatusCode::UNAUTHORIZED
    );
    // Removing dave's role is seen by the next call.
    let ras = ctl.get("/api/v1/roleAssignments?principal=dave").await;
    let id = ras.body["value"][0]["id"].as_str().unwrap().to_owned();
    let r = ctl.delete(&format!("/api/v1/roleAssignments/{id}")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        ctl.get_as(&dave, "/api/v1/vms/rg1/vm1").await.status,
        StatusCode::FORBIDDEN
    );
    // And so is a revoke of the token.
    let tokens = ctl.get("/api/v1/tokens").await;
    let tid = tokens.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["principal"] == "dave")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        ctl.get_as(&dave, "/api/v1/whoami").await.status,
        StatusCode::OK
    );
    let r = ctl.delete(&format!("/api/v1/tokens/{tid}")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        ctl.get_as(&dave, "/api/v1/whoami").await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// Every operation of the document, called for real with a successful outcome (and a
/// refused one where that is a different body), each answer checked against the
/// document by `Ctl::call`. An operation added without a call here fails the test.
#[tokio::test]
async fn every_operation_answers_as_documented() {
    use crate::schema::{SEEN, operations};
    use reqwest::Method;
    let ctl = Ctl::start().await;
    let sub = ctl.sub.clone();
    let pol = ctl.policy_path("rg", "westeurope", "default");
    let q = "?api-version=2020-01-01";
    // Service.
    ctl.call(Method::GET, "/api/v1/health", None, None).await;
    ctl.call(Method::GET, "/api/v1/health/live", None, None)
        .await;
    ctl.call(Method::GET, "/metrics", None, None).await;
    ctl.call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    ctl.get("/api/v1/whoami").await;
    // VMs, policies, requests.
    let r = ctl
        .post("/api/v1/vms", json!({"resourceGroup": "rg", "name": "vm1"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    ctl.enable("rg", &["vm1", "vm2"], "*").await;
    ctl.get(&format!("{pol}{q}")).await;
    for p in [
        format!("/subscriptions/{sub}/providers/Microsoft.Security/jitNetworkAccessPolicies"),
        format!(
            "/subscriptions/{sub}/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies"
        ),
        format!(
            "/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Security/jitNetworkAccessPolicies"
        ),
        format!(
            "/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies"
        ),
    ] {
        assert_eq!(ctl.get(&format!("{p}{q}")).await.status, StatusCode::OK);
    }
    let i = ctl
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    assert_eq!(i.status, StatusCode::ACCEPTED, "{:?}", i.body);
    let id = i.request_id();
    ctl.get("/api/v1/vms").await;
    ctl.get("/api/v1/vms/rg/vm1").await;
    ctl.get("/api/v1/vms/rg/vm1/nsg").await;
    ctl.get("/api/v1/vms/rg/vm1/blocked").await;
    let rule = "/api/v1/vms/rg/vm1/nsg/rules/allow-mon";
    let body = json!({"priority": 200, "access": "Allow", "destinationPortRanges": ["9100"]});
    assert_eq!(ctl.put(rule, body).await.status, StatusCode::CREATED);
    ctl.get("/api/v1/vms/rg/vm1/nsg/rules").await;
    assert_eq!(ctl.delete(rule).await.status, StatusCode::OK);
    ctl.get("/api/v1/requests").await;
    ctl.get(&format!("/api/v1/requests/{id}")).await;
    let r = ctl
        .post(&format!("/api/v1/requests/{id}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // People.
    let t = ctl
        .principal("dora", "Reader", &format!("/subscriptions/{sub}"))
        .await;
    ctl.get("/api/v1/tokens").await;
    ctl.get("/api/v1/roleAssignments").await;
    let ras = ctl.get("/api/v1/roleAssignments?principal=dora").await;
    let ra = ras.body["value"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        ctl.delete(&format!("/api/v1/roleAssignments/{ra}"))
            .await
            .status,
        StatusCode::OK
    );
    assert!(t.starts_with("jg_"));
    let tokens = ctl.get("/api/v1/tokens").await;
    let tid = tokens.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["principal"] == "dora")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        ctl.delete(&format!("/api/v1/tokens/{tid}")).await.status,
        StatusCode::OK
    );
    let t2 = ctl
        .principal("erin", "JIT Requester", &format!("/subscriptions/{sub}"))
        .await;
    // Agents.
    let (vm, agent) = crate::util::enroll(&ctl, "web-1").await;
    let d = ctl
        .get_as(&agent, &format!("/api/v1/agent/desired?vm={vm}"))
        .await;
    assert_eq!(d.status, StatusCode::OK, "{:?}", d.body);
    let s = ctl
        .call(
            Method::POST,
            &format!("/api/v1/agent/status?vm={vm}"),
            Some(&agent),
            Some(json!({"nftVersion": "1.0.6", "listening": [
                {"protocol": "tcp", "family": "IPv4", "address": "0.0.0.0", "port": 22}
            ]})),
        )
        .await;
    assert_eq!(s.status, StatusCode::NO_CONTENT, "{:?}", s.body);
    ctl.get("/api/v1/enrollTokens").await;
    let et = ctl.post("/api/v1/enrollTokens", json!({})).await;
    let etid = et.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        ctl.delete(&format!("/api/v1/enrollTokens/{etid}"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    // Recommendations.
    ctl.get("/api/v1/recommendations").await;
    let a = ctl.post("/api/v1/recommendations/apply", json!({})).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let x = ctl
        .post(
            "/api/v1/exclusions",
            json!({"scope": format!("/subscriptions/{sub}/resourceGroups/legacy"), "reason": "appliances"}),
        )
        .await;
    assert_eq!(x.status, StatusCode::CREATED, "{:?}", x.body);
    ctl.get("/api/v1/exclusions").await;
    let xid = x.body["id"].as_str().unwrap();
    assert_eq!(
        ctl.delete(&format!("/api/v1/exclusions/{xid}"))
            .await
            .status,
        StatusCode::OK
    );
    // Audit, then the policy's end.
    ctl.get("/api/v1/audit").await;
    ctl.get("/api/v1/audit?format=csv").await;
    ctl.get("/api/v1/audit/verify").await;
    assert_eq!(
        ctl.delete(&format!("{pol}{q}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        ctl.delete("/api/v1/vms/rg/vm2").await.status,
        StatusCode::OK
    );
    // Errors are documented too (the `default` CloudError).
    let e = ctl.get("/api/v1/requests?limit=0").await;
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    // Checked before any answer, also one that would be empty anyway.
    let e = ctl
        .get_as(&t2, "/api/v1/requests?active=maybe&requestor=someone-else")
        .await;
    assert_eq!(
        (e.status, e.body["error"]["target"].as_str()),
        (StatusCode::BAD_REQUEST, Some("active"))
    );

    // Approvals: a rule, a pending request, approve, deny, cancel.
    ctl.enable("appr", &["vma"], "*").await;
    let scope = format!("/subscriptions/{sub}/resourceGroups/appr");
    let r = ctl
        .put(
            "/api/v1/approvalRules/ops",
            json!({"scope": scope, "ports": [22], "requireJustification": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    ctl.get("/api/v1/approvalRules").await;
    ctl.get("/api/v1/approvalRules/ops").await;
    let approver = ctl.principal("approver", "JIT Approver", &scope).await;
    let mut pending = Vec::new();
    for _ in 0..3 {
        let r = ctl
            .initiate(
                "appr",
                "vma",
                json!([{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "10.0.0.1"}]),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        pending.push(r.request_id());
    }
    let r = ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{}/approve", pending[0]),
            Some(&approver),
            Some(json!({"reason": "ok"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{}/deny", pending[1]),
            Some(&approver),
            Some(json!({"reason": "no"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{}/cancel", pending[2]),
            Some(crate::util::OWNER),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // Break-glass, reviewed.
    let glass = ctl.principal("glass", "JIT Break-glass", &scope).await;
    let body = json!({"virtualMachines": [{"id": ctl.vm_id("appr", "vma"), "ports": [{"number": 22, "duration": "PT10M", "allowedSourceAddressPrefix": "10.0.0.2"}]}], "justification": "outage"});
    let r = ctl
        .call_with(
            Method::POST,
            &format!(
                "{}/initiate?api-version=2020-01-01",
                ctl.policy_path("appr", "westeurope", "default")
            ),
            Some(&glass),
            Some(body),
            &[("x-jitgate-break-glass", "true")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let r = ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{}/review", r.request_id()),
            Some(&approver),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        ctl.delete("/api/v1/approvalRules/ops").await.status,
        StatusCode::OK
    );

    // Webhooks (a public address: nothing is delivered to it during the test).
    let r = ctl
        .put(
            "/api/v1/webhooks/ops",
            json!({"url": "https://192.0.43.10/hook"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    ctl.get("/api/v1/webhooks").await;
    ctl.get("/api/v1/webhooks/ops").await;
    assert_eq!(
        ctl.delete("/api/v1/webhooks/ops").await.status,
        StatusCode::OK
    );

    // Sign-in: this controller has no identity provider, so each answers 404 saying
    // so (the sign-in tests in `oidc` call them configured).
    for (method, path, body) in [
        (Method::GET, "/auth/login", None),
        (Method::GET, "/auth/callback?code=x&state=y", None),
        (Method::POST, "/auth/logout", None),
        (Method::POST, "/auth/device", None),
        (Method::GET, "/auth/device", None),
        (
            Method::POST,
            "/auth/token",
            Some(json!({"grantType": "device", "deviceCode": "0".repeat(64)})),
        ),
    ] {
        let r = ctl.call(method, path, None, body).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {:?}", r.body);
        assert!(r.message().contains("--oidc-issuer"), "{:?}", r.body);
    }
    let r = ctl
        .call_with(
            Method::POST,
            "/auth/device/decide",
            None,
            None,
            &[("Content-Type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert!(r.status.is_client_error());

    let seen = SEEN.lock().unwrap().clone();
    let missing: Vec<_> = operations().difference(&seen).cloned().collect();
    assert!(missing.is_empty(), "operations never called: {missing:?}");
}

/// The bounds the document gives parameters are the server's: on every GET operation,
/// an integer parameter at its documented minimum and maximum is accepted and one past
/// either is refused naming it, and a path name of the documented maximum length (and
/// matching its pattern) is not refused as malformed while one character more is. A
/// client or fuzzer that trusts the document never sends what the server refuses.
#[tokio::test]
async fn documented_bounds_are_the_servers() {
    use crate::schema::DOC;
    use reqwest::Method;
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1"], "*").await;
    let (vm, agent) = crate::util::enroll(&ctl, "web-1").await;
    let mut checked = 0;
    for (template, item) in DOC["paths"].as_object().unwrap() {
        let Some(op) = item.get("get") else { continue };
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let token = if template.starts_with("/api/v1/agent/") {
            agent.as_str()
        } else {
            OWNER
        };
        // A call with every path parameter at a valid value and the required query
        // parameters set, except `name`, which is set to `value` in its place.
        let url = |name: &str, value: &str| {
            let mut path = template.clone();
            let mut query = Vec::new();
            for p in &params {
                let n = p["name"].as_str().unwrap();
                let v = if n == name {
                    value.to_owned()
                } else {
                    match n {
                        "sub" => ctl.sub.clone(),
                        "rg" => "rg".into(),
                        "loc" => "westeurope".into(),
                        "name" if template.contains("jitNetworkAccessPolicies") => "default".into(),
                        "name" => "vm1".into(),
                        "rule" => "r1".into(),
                        "id" => "0".into(),
                        "api-version" => "2020-01-01".into(),
                        "vm" if p["required"] == true => vm.clone(),
                        _ => continue,
                    }
                };
                if p["in"] == "path" {
                    path = path.replace(&format!("{{{n}}}"), &v);
                } else if p["required"] == true || n == name {
                    query.push(format!("{n}={v}"));
                }
            }
            if query.is_empty() {
                path
            } else {
                format!("{path}?{}", query.join("&"))
            }
        };
        for p in &params {
            let name = p["name"].as_str().unwrap();
            let schema = &p["schema"];
            let refused_naming = |r: &crate::util::Resp| {
                r.status == StatusCode::BAD_REQUEST
                    && (r.body["error"]["target"].as_str() == Some(name)
                        || r.message().contains(name))
            };
            if let Some(max) = schema["maximum"].as_i64() {
                let min = schema["minimum"].as_i64().unwrap_or(0);
                for ok in [min, max] {
                    let r = ctl
                        .call(Method::GET, &url(name, &ok.to_string()), Some(token), None)
                        .await;
                    assert_ne!(
                        r.status,
                        StatusCode::BAD_REQUEST,
                        "{template} {name}={ok}: {:?}",
                        r.body
                    );
                }
                for bad in [min - 1, max + 1] {
                    let r = ctl
                        .call(Method::GET, &url(name, &bad.to_string()), Some(token), None)
                        .await;
                    assert!(
                        refused_naming(&r),
                        "{template} {name}={bad}: {} {:?}",
                        r.status,
                        r.body
                    );
                }
                checked += 1;
            }
            if p["in"] == "path"
                && let Some(max) = schema["maxLength"].as_u64()
            {
                let longest = "a".repeat(max as usize);
                let r = ctl
                    .call(Method::GET, &url(name, &longest), Some(token), None)
                    .await;
                assert_ne!(
                    r.status,
                    StatusCode::BAD_REQUEST,
                    "{template} {name} of {max}: {:?}",
                    r.body
                );
                let over = "a".repeat(max as usize + 1);
                let r = ctl
                    .call(Method::GET, &url(name, &over), Some(token), None)
                    .await;
                assert_eq!(
                    r.status,
                    StatusCode::BAD_REQUEST,
                    "{template} {name} of {}: {:?}",
                    max + 1,
                    r.body
                );
                checked += 1;
            }
        }
    }
    // The limits of every list, `$top`, `wait`, and the names of the VM and policy paths.
    assert!(checked >= 20, "only {checked} bounds checked");
}

/// Every list pages: a continuation token walks each item exactly once, and a forged
/// token is refused naming the parameter.
#[tokio::test]
async fn every_list_pages_without_gaps() {
    let ctl = Ctl::start().await;
    let sub = ctl.sub.clone();
    for i in 0..5 {
        ctl.principal(&format!("p{i}"), "Reader", &format!("/subscriptions/{sub}"))
            .await;
        ctl.post("/api/v1/enrollTokens", json!({})).await;
        ctl.post(
            "/api/v1/exclusions",
            json!({"scope": format!("/subscriptions/{sub}/resourceGroups/x{i}"), "reason": "lab"}),
        )
        .await;
    }
    ctl.enable("rg", &["vm1", "vm2", "vm3"], "*").await;
    for vm in ["vm1", "vm2", "vm3", "vm1", "vm2"] {
        let r = ctl
            .initiate(
                "rg",
                vm,
                json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
    }
    for list in [
        "/api/v1/vms",
        "/api/v1/requests",
        "/api/v1/tokens",
        "/api/v1/roleAssignments",
        "/api/v1/enrollTokens",
        "/api/v1/exclusions",
        "/api/v1/audit",
    ] {
        let whole = ctl.get(&format!("{list}?limit=1000")).await;
        assert_eq!(whole.status, StatusCode::OK, "{list}: {:?}", whole.body);
        assert!(whole.body.get("continuationToken").is_none(), "{list}");
        let want: Vec<serde_json::Value> = whole.body["value"].as_array().unwrap().clone();
        assert!(want.len() >= 3, "{list} has {} items", want.len());
        let mut got: Vec<serde_json::Value> = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let url = match &next {
                None => format!("{list}?limit=2"),
                Some(t) => format!("{list}?limit=2&continuationToken={t}"),
            };
            let page = ctl.get(&url).await;
            assert_eq!(page.status, StatusCode::OK, "{url}: {:?}", page.body);
            let items = page.body["value"].as_array().unwrap();
            assert!(items.len() <= 2, "{url}");
            got.extend(items.iter().cloned());
            match page.body["continuationToken"].as_str() {
                Some(t) => {
                    assert_eq!(items.len(), 2, "{url}: a page before the end is full");
                    next = Some(t.to_owned());
                }
                None => break,
            }
        }
        // Items carry times that move (live grants' seconds left): compare ids.
        let key = |v: &serde_json::Value| {
            ["id", "seq"]
                .iter()
                .find_map(|k| v.get(*k).map(|x| x.to_string()))
                .unwrap()
        };
        assert_eq!(
            got.iter().map(key).collect::<Vec<_>>(),
            want.iter().map(key).collect::<Vec<_>>(),
            "{list}: pages of 2"
        );
        let forged = ctl.get(&format!("{list}?continuationToken=zz")).await;
        assert_eq!(
            (forged.status, forged.body["error"]["target"].as_str()),
            (StatusCode::BAD_REQUEST, Some("continuationToken")),
            "{list}"
        );
    }
}

/// The document is OpenAPI 3.1; exactly the paths the authentication layer lets
/// through without a token are documented with no security requirement, every other
/// operation inherits the bearer token; every operation documents its errors.
#[test]
fn the_document_marks_exactly_the_public_paths() {
    let doc = &*crate::schema::DOC;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["security"], json!([{"bearerAuth": []}]));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    let mut public = Vec::new();
    for op in crate::schema::operations() {
        let (m, t) = op.split_once(' ').unwrap();
        let o = &doc["paths"][t][m.to_ascii_lowercase()];
        match o.get("security") {
            Some(s) if s == &json!([]) => public.push(t.to_owned()),
            Some(s) => panic!("{op} has its own security {s}"),
            None => {}
        }
        assert!(
            o["responses"].get("default").is_some(),
            "{op} documents no errors"
        );
        assert!(
            o["tags"].as_array().is_some_and(|t| !t.is_empty()),
            "{op} has no tag"
        );
    }
    public.sort();
    assert_eq!(
        public,
        [
            "/api/v1/agent/enroll",
            "/api/v1/health",
            "/api/v1/health/live",
            "/api/v1/openapi.json",
            "/auth/callback",
            "/auth/device",
            "/auth/device",
            "/auth/login",
            "/auth/logout",
            "/auth/token",
            "/metrics"
        ]
    );
}
