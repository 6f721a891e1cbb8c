//! Recommendations from agent reports, applying them, exclusions, blocked attempts.
//! Agents are played here by HTTP calls with real agent credentials (enrollment);
//! the end-to-end tests run real agents.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::util::{Ctl, enroll};

async fn report(ctl: &Ctl, vm: &str, token: &str, listening: &[u16], counters: Value) {
    let listening: Vec<Value> = listening
        .iter()
        .map(|p| json!({"protocol": "tcp", "family": "IPv4", "address": "0.0.0.0", "port": p, "process": "sshd"}))
        .collect();
    let body =
        json!({"nftVersion": "nftables v1.0.6", "listening": listening, "counters": counters});
    let r = ctl
        .call(
            Method::POST,
            &format!("/api/v1/agent/status?vm={}", urlenc(vm)),
            Some(token),
            Some(body),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
}

fn urlenc(s: &str) -> String {
    s.replace('/', "%2F")
}

fn verdict_of(list: &Value, name: &str) -> (String, String) {
    let r = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"));
    (
        r["verdict"].as_str().unwrap().to_owned(),
        r["reason"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn verdicts_follow_what_agents_report_and_enable_recommended_fixes_them() {
    let ctl = Ctl::start().await;
    let (web, web_t) = enroll(&ctl, "web").await;
    let (quiet, quiet_t) = enroll(&ctl, "quiet").await;
    ctl.register("lab", "noagent").await;
    report(&ctl, &web, &web_t, &[22, 8080], json!([])).await;
    report(&ctl, &quiet, &quiet_t, &[8080], json!([])).await;

    let list = ctl.get("/api/v1/recommendations").await.body;
    let (v, why) = verdict_of(&list, "web");
    assert_eq!(v, "Unhealthy");
    assert!(why.contains("22") && why.contains("sshd"), "{why}");
    assert_eq!(verdict_of(&list, "quiet").0, "Healthy");
    let (v, why) = verdict_of(&list, "noagent");
    assert_eq!(v, "NotApplicable");
    assert!(why.contains("no agent"), "{why}");
    assert_eq!(
        list["summary"],
        json!({"Healthy": 1, "NotApplicable": 1, "Unhealthy": 1})
    );
    let only = ctl
        .get("/api/v1/recommendations?verdict=Unhealthy")
        .await
        .body;
    assert_eq!(only["value"].as_array().unwrap().len(), 1);
    assert_eq!(
        ctl.get("/api/v1/recommendations?verdict=Bad").await.status,
        StatusCode::BAD_REQUEST
    );

    // One call enables JIT on every unhealthy machine, on its listening management ports.
    let r = ctl
        .post(
            "/api/v1/recommendations/apply",
            json!({"resourceGroup": "lab"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["enabled"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["enabled"][0]["ports"], json!([22]));
    let list = ctl.get("/api/v1/recommendations").await.body;
    let (v, why) = verdict_of(&list, "web");
    assert_eq!(v, "Healthy", "{why}");
    let vm = ctl.get("/api/v1/vms/lab/web").await.body;
    assert!(
        vm["policy"]
            .as_str()
            .unwrap()
            .ends_with("/jitNetworkAccessPolicies/default")
    );
    let applied = ctl.audit("action=recommendations.apply").await;
    assert_eq!(applied.len(), 1);
    // The summary says what the answer said, about the group asked for; it was
    // committed with the policy write (core plan, one store transaction).
    assert_eq!(applied[0]["details"]["enabled"], r.body["enabled"]);
    assert!(
        applied[0]["target"]
            .as_str()
            .unwrap()
            .ends_with("/resourceGroups/lab"),
        "{}",
        applied[0]
    );
    assert_eq!(ctl.audit("action=policy.create").await.len(), 1);
    // A second run has nothing to do.
    let r = ctl.post("/api/v1/recommendations/apply", json!({})).await;
    assert_eq!(r.body["enabled"], json!([]));
}

#[tokio::test]
async fn offline_agents_and_exclusions_are_not_applicable() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_simulated_with(dir, |c| {
        c.recommend.offline_after = jiff::SignedDuration::from_secs(1)
    })
    .await;
    let (vm, t) = enroll(&ctl, "box").await;
    report(&ctl, &vm, &t, &[], json!([])).await;
    assert_eq!(
        verdict_of(&ctl.get("/api/v1/recommendations").await.body, "box").0,
        "Healthy"
    );
    ctl.advance(std::time::Duration::from_millis(2100));
    let (v, why) = verdict_of(&ctl.get("/api/v1/recommendations").await.body, "box");
    assert_eq!(v, "NotApplicable");
    assert!(why.contains("offline"), "{why}");
    assert_eq!(
        ctl.get("/api/v1/vms/lab/box").await.body["agent"]["online"],
        false
    );

    report(&ctl, &vm, &t, &[22], json!([])).await;
    assert_eq!(
        verdict_of(&ctl.get("/api/v1/recommendations").await.body, "box").0,
        "Unhealthy"
    );
    let scope = format!("/subscriptions/{}/resourceGroups/lab", ctl.sub);
    let bad = ctl
        .post("/api/v1/exclusions", json!({"scope": scope}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.message().contains("reason"));
    let e = ctl
        .post(
            "/api/v1/exclusions",
            json!({"scope": scope, "reason": "lab machines are disposable"}),
        )
        .await;
    assert_eq!(e.status, StatusCode::CREATED, "{:?}", e.body);
    let (v, why) = verdict_of(&ctl.get("/api/v1/recommendations").await.body, "box");
    assert_eq!(v, "NotApplicable");
    assert!(why.contains("disposable"), "{why}");
    let id = e.body["id"].as_str().unwrap();
    assert_eq!(
        ctl.delete(&format!("/api/v1/exclusions/{id}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        verdict_of(&ctl.get("/api/v1/recommendations").await.body, "box").0,
        "Unhealthy"
    );
}

#[tokio::test]
async fn blocked_attempts_become_a_time_series_and_metrics() {
    let ctl = Ctl::start().await;
    let (vm, t) = enroll(&ctl, "web").await;
    let c = |n: u64| json!([{"rule": "deny_tcp_22", "port": 22, "protocol": "TCP", "packets": n}]);
    report(&ctl, &vm, &t, &[22], c(3)).await;
    report(&ctl, &vm, &t, &[22], c(5)).await;
    report(&ctl, &vm, &t, &[22], c(5)).await;
    // The agent rebuilt its table: the counter restarted.
    report(&ctl, &vm, &t, &[22], c(1)).await;
    let b = ctl.get("/api/v1/vms/lab/web/blocked").await.body;
    let counts: Vec<u64> = b["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![3, 2, 1]);
    assert_eq!(
        b["totals"],
        json!([{"port": 22, "protocol": "TCP", "count": 6}])
    );
    let vmv = ctl.get("/api/v1/vms/lab/web").await.body;
    assert_eq!(vmv["blockedLast24h"][0]["count"], 6);
    let m = ctl
        .http
        .get(format!("{}/metrics", ctl.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("jitgate_blocked_attempts_total{port=\"22\",protocol=\"TCP\"} 6"),
        "{m}"
    );
}

/// Recommendations come a page at a time; the first page carries the summary of every
/// VM the caller may read, whatever the page size or verdict filter.
#[tokio::test]
async fn recommendations_are_paged_and_the_first_page_summarizes_all() {
    let ctl = Ctl::start().await;
    // Three with agents exposing SSH (Unhealthy), four without agents (NotApplicable).
    for name in ["a1", "a2", "a3"] {
        let (vm, token) = enroll(&ctl, name).await;
        report(&ctl, &vm, &token, &[22], json!([])).await;
    }
    for name in ["n1", "n2", "n3", "n4"] {
        ctl.register("lab", name).await;
    }
    let mut names = Vec::new();
    let mut next: Option<String> = None;
    let mut first = true;
    loop {
        let mut path = "/api/v1/recommendations?limit=2".to_owned();
        if let Some(t) = &next {
            path.push_str(&format!("&continuationToken={t}"));
        }
        let r = ctl.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        if first {
            assert_eq!(
                r.body["summary"],
                json!({"Healthy": 0, "Unhealthy": 3, "NotApplicable": 4})
            );
            first = false;
        } else {
            assert!(r.body.get("summary").is_none(), "{:?}", r.body);
        }
        for v in r.body["value"].as_array().unwrap() {
            names.push(v["name"].as_str().unwrap().to_owned());
        }
        match r.body["continuationToken"].as_str() {
            Some(t) => next = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(names, ["a1", "a2", "a3", "n1", "n2", "n3", "n4"]);
    // Only the Unhealthy ones, in pages of two; the summary still counts all.
    let r = ctl
        .get("/api/v1/recommendations?limit=2&verdict=Unhealthy")
        .await;
    let page: Vec<&str> = r.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(page, ["a1", "a2"]);
    assert_eq!(r.body["summary"]["NotApplicable"], 4);
    let t = r.body["continuationToken"].as_str().unwrap().to_owned();
    let r = ctl
        .get(&format!(
            "/api/v1/recommendations?limit=2&verdict=Unhealthy&continuationToken={t}"
        ))
        .await;
    assert_eq!(r.body["value"].as_array().unwrap().len(), 1);
    assert!(r.body.get("continuationToken").is_none());
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=5001", "limit"),
        ("continuationToken=xyz", "continuationToken"),
    ] {
        let r = ctl.get(&format!("/api/v1/recommendations?{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(r.body["error"]["target"], field);
    }
}

/// Issue 10: what the agent could not read about the host's sockets is shown with the
/// VM (`agent.inventoryErrors`, apart from the enforcement `error`), keeps a machine
/// that otherwise looks clean from being called Healthy, and is bounded like the rest
/// of a report.
#[tokio::test]
async fn unreadable_sockets_are_shown_and_never_healthy() {
    let ctl = Ctl::start().await;
    let (vm, t) = enroll(&ctl, "box").await;
    let status = |body: Value| {
        let path = format!("/api/v1/agent/status?vm={}", urlenc(&vm));
        let t = t.clone();
        let ctl = &ctl;
        async move { ctl.call(Method::POST, &path, Some(&t), Some(body)).await }
    };
    let unreadable = "/proc/net/tcp6 line 7: state 'zz' is not hex: '6: ...'";
    let r = status(
        json!({"nftVersion": "nftables v1.0.6", "listening": [], "inventoryErrors": [unreadable]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);

    let agent = &ctl.get("/api/v1/vms/lab/box").await.body["agent"];
    assert_eq!(agent["inventoryErrors"], json!([unreadable]));
    assert_eq!(agent["error"], Value::Null, "enforcement did not fail");
    let (v, why) = verdict_of(&ctl.get("/api/v1/recommendations").await.body, "box");
    assert_eq!(v, "NotApplicable");
    assert!(why.contains(unreadable), "{why}");

    // Once everything is read again, the verdict is the usual one.
    report(&ctl, &vm, &t, &[], json!([])).await;
    assert_eq!(
        ctl.get("/api/v1/vms/lab/box").await.body["agent"]["inventoryErrors"],
        json!([])
    );
    assert_eq!(
        verdict_of(&ctl.get("/api/v1/recommendations").await.body, "box").0,
        "Healthy"
    );

    // Bounded: at most 16 sentences, each printable and at most 1024 characters.
    for (body, field) in [
        (json!({"inventoryErrors": vec!["x"; 17]}), "inventoryErrors"),
        (json!({"inventoryErrors": ["a\nb"]}), "inventoryErrors[0]"),
        (
            json!({"inventoryErrors": ["ok", "y".repeat(1025)]}),
            "inventoryErrors[1]",
        ),
    ] {
        let r = status(body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
        assert_eq!(r.body["error"]["target"], field, "{:?}", r.body);
    }
}

/// Issue 10: the summary and the pages count and list only the VMs the caller may
/// read (a role at the subscription, a resource group or one VM), filtered in the
/// store; a caller who may read none gets an empty page and zero counts, and an agent's
/// credential reads nothing.
#[tokio::test]
async fn recommendations_show_only_what_the_caller_may_read() {
    let ctl = Ctl::start().await;
    let (web, web_t) = enroll(&ctl, "web").await;
    report(&ctl, &web, &web_t, &[22], json!([])).await;
    ctl.register("lab", "idle").await;
    ctl.register("prod", "db").await;
    ctl.register("prod", "cache").await;
    let sub = format!("/subscriptions/{}", ctl.sub);
    let everyone = ctl.principal("auditor", "Reader", &sub).await;
    let prod = ctl
        .principal(
            "prod-team",
            "JIT Requester",
            &format!("{sub}/resourceGroups/PROD"),
        )
        .await;
    let one = ctl
        .principal("web-owner", "Reader", &web.to_uppercase())
        .await;
    let nobody = ctl
        .principal("stranger", "Reader", &format!("{sub}/resourceGroups/empty"))
        .await;
    let cases = [
        (
            &everyone,
            vec!["idle", "web", "cache", "db"],
            json!({"Healthy": 0, "Unhealthy": 1, "NotApplicable": 3}),
        ),
        (
            &prod,
            vec!["cache", "db"],
            json!({"Healthy": 0, "Unhealthy": 0, "NotApplicable": 2}),
        ),
        (
            &one,
            vec!["web"],
            json!({"Healthy": 0, "Unhealthy": 1, "NotApplicable": 0}),
        ),
        (
            &nobody,
            vec![],
            json!({"Healthy": 0, "Unhealthy": 0, "NotApplicable": 0}),
        ),
        (
            &web_t,
            vec![],
            json!({"Healthy": 0, "Unhealthy": 0, "NotApplicable": 0}),
        ),
    ];
    for (token, names, summary) in cases {
        let r = ctl.get_as(token, "/api/v1/recommendations?limit=1").await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["summary"], summary, "{names:?}");
        // Page by page, one VM each.
        let mut seen = Vec::new();
        let mut page = r.body;
        loop {
            for v in page["value"].as_array().unwrap() {
                seen.push(v["name"].as_str().unwrap().to_owned());
            }
            let Some(t) = page["continuationToken"].as_str() else {
                break;
            };
            page = ctl
                .get_as(
                    token,
                    &format!("/api/v1/recommendations?limit=1&continuationToken={t}"),
                )
                .await
                .body;
        }
        assert_eq!(seen, names);
    }
    // Within the readable ones, one resource group.
    let r = ctl
        .get_as(&prod, "/api/v1/recommendations?resourceGroup=lab")
        .await;
    assert_eq!(r.body["value"], json!([]));
    let r = ctl
        .get_as(
            &everyone,
            "/api/v1/recommendations?resourceGroup=LAB&verdict=notapplicable",
        )
        .await;
    assert_eq!(r.body["value"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["value"][0]["name"], "idle");
    assert_eq!(r.body["summary"]["Unhealthy"], 1);
    let bad = ctl.get("/api/v1/recommendations?resourceGroup=a/b").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body["error"]["target"], "resourceGroup");
}
