//! The audit log through the API: what is recorded, queries, exports, verification.

use reqwest::StatusCode;
use serde_json::json;

use crate::util::{Ctl, OWNER};

#[tokio::test]
async fn state_changes_are_recorded_and_queryable() {
    let ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1", "vm2"], "*").await;
    let alice = ctl
        .principal("alice", "JIT Requester", &ctl.vm_id("rg", "vm1"))
        .await;
    let r = ctl
        .initiate_as(
            &alice,
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);

    let all = ctl.audit("limit=1000").await;
    let actions: Vec<&str> = all.iter().map(|e| e["action"].as_str().unwrap()).collect();
    for want in [
        "subscription.create",
        "token.create",
        "roleAssignment.create",
        "vm.register",
        "policy.create",
        "request.initiate",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    // Sequence numbers are consecutive and chained.
    for w in all.windows(2) {
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1
        );
        assert_eq!(w[1]["prevHash"], w[0]["hash"]);
    }
    let by_vm = ctl
        .audit(&format!("vm={}", ctl.vm_id("rg", "vm1").to_uppercase()))
        .await;
    assert!(by_vm.iter().any(|e| e["action"] == "request.initiate"));
    assert!(by_vm.iter().all(|e| {
        e["target"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("/vm1")
    }));
    let by_actor = ctl.audit("actor=alice").await;
    assert_eq!(by_actor.len(), 1);
    assert_eq!(by_actor[0]["source"], "127.0.0.1");
    assert_eq!(by_actor[0]["details"]["ports"][0]["number"], 22);
    let since = ctl
        .audit(&format!("since={}", crate::util::in_secs(3600)))
        .await;
    assert!(since.is_empty());
    let after = ctl
        .audit(&format!("afterSeq={}", all[all.len() - 2]["seq"]))
        .await;
    assert_eq!(after.len(), 1);

    // Exports.
    let csv = ctl
        .http
        .get(format!("{}/api/v1/audit?format=csv", ctl.base))
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), StatusCode::OK);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = csv.text().await.unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "seq,time,actor,source,action,target,outcome,details,prev_hash,hash"
    );
    assert_eq!(text.lines().count(), all.len() + 1);
    let jsonl = ctl
        .http
        .get(format!("{}/api/v1/audit?format=jsonl", ctl.base))
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    let text = jsonl.text().await.unwrap();
    assert_eq!(text.lines().count(), all.len());
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }

    // Verify through the API.
    let v = ctl.get("/api/v1/audit/verify").await;
    assert_eq!(v.body["ok"], true, "{:?}", v.body);
    assert!(v.body["events"].as_u64().unwrap() >= all.len() as u64);
    // A reader of one VM cannot read the audit log.
    assert_eq!(
        ctl.get_as(&alice, "/api/v1/audit").await.status,
        StatusCode::FORBIDDEN
    );
}
