//! Approvals through the HTTP API: rules, pending requests, decisions by distinct
//! approvers (never the requestor, even an Owner), narrowing, denial, cancellation and
//! the pending timeout on a simulated clock; bad input refused naming its field.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::util::{Ctl, OWNER, Resp};

/// A controller with `vm1` in resource group `prod` (ports 22 and 3389 from 10.0.0.0/8),
/// a requester `rita`, approvers `amy` and `ben`, and `ivan` with no approve right.
struct Scene {
    ctl: Ctl,
    rita: String,
    amy: String,
    ben: String,
    ivan: String,
}

async fn scene() -> Scene {
    let ctl = Ctl::start_simulated().await;
    ctl.enable("prod", &["vm1"], "10.0.0.0/8").await;
    let rg = format!("/subscriptions/{}/resourceGroups/prod", ctl.sub);
    let rita = ctl.principal("rita", "JIT Requester", &rg).await;
    let amy = ctl.principal("amy", "JIT Approver", &rg).await;
    let ben = ctl.principal("ben", "JIT Approver", &rg).await;
    let ivan = ctl.principal("ivan", "Reader", &rg).await;
    Scene {
        ctl,
        rita,
        amy,
        ben,
        ivan,
    }
}

impl Scene {
    fn rg_scope(&self) -> String {
        format!("/subscriptions/{}/resourceGroups/prod", self.ctl.sub)
    }

    async fn rule(&self, name: &str, body: Value) -> Resp {
        self.ctl
            .put(&format!("/api/v1/approvalRules/{name}"), body)
            .await
    }

    /// `token` asks for port 22 (and 3389 when `both`) of vm1 from 10.1.2.3 for an hour.
    async fn initiate(&self, token: &str, justification: &str, both: bool) -> Resp {
        let mut ports = vec![
            json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "10.1.2.0/24"}),
        ];
        if both {
            ports.push(json!({"number": 3389, "duration": "PT1H", "allowedSourceAddressPrefix": "10.1.2.0/24"}));
        }
        let body = json!({
            "virtualMachines": [{"id": self.ctl.vm_id("prod", "vm1"), "ports": ports}],
            "justification": justification,
        });
        self.ctl
            .call(
                Method::POST,
                &format!(
                    "{}/initiate?api-version=2020-01-01",
                    self.ctl.policy_path("prod", "westeurope", "default")
                ),
                Some(token),
                Some(body),
            )
            .await
    }

    async fn decide(&self, token: &str, id: &str, verb: &str, body: Value) -> Resp {
        self.ctl
            .call(
                Method::POST,
                &format!("/api/v1/requests/{id}/{verb}"),
                Some(token),
                Some(body),
            )
            .await
    }

    /// A break-glass initiate (header `header`) of port 22 for `duration`.
    async fn glass(&self, token: &str, justification: &str, duration: &str, header: &str) -> Resp {
        let body = json!({
            "virtualMachines": [{"id": self.ctl.vm_id("prod", "vm1"), "ports": [
                {"number": 22, "duration": duration, "allowedSourceAddressPrefix": "10.9.9.9"}
            ]}],
            "justification": justification,
        });
        let path = format!(
            "{}/initiate?api-version=2020-01-01",
            self.ctl.policy_path("prod", "westeurope", "default")
        );
        self.ctl
            .call_with(
                Method::POST,
                &path,
                Some(token),
                Some(body),
                &[("x-jitgate-break-glass", header)],
            )
            .await
    }

    async fn review(&self, token: &str, id: &str) -> Resp {
        self.ctl
            .call(
                Method::POST,
                &format!("/api/v1/requests/{id}/review"),
                Some(token),
                None,
            )
            .await
    }

    /// How many unreviewed break-glass requests `token` sees.
    async fn flagged(&self, token: &str) -> usize {
        self.ctl
            .get_as(token, "/api/v1/requests?breakGlass=unreviewed")
            .await
            .body["value"]
            .as_array()
            .unwrap()
            .len()
    }

    async fn request(&self, id: &str) -> Value {
        let r = self.ctl.get(&format!("/api/v1/requests/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body
    }
}

fn port(request: &Value, number: u64) -> &Value {
    request["virtualMachines"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["number"] == number)
        .unwrap()
}

/// Two distinct approvers open a pending port; the requestor (even an Owner) never
/// counts; an approver may shorten and narrow, never widen; the duration starts at the
/// approval; the Azure answer says Pending/ApprovalRequired, then Initiated.
#[tokio::test]
async fn two_distinct_approvers_open_a_pending_port_from_the_approval_on() {
    let s = scene().await;
    let r = s
        .rule(
            "prod-ssh",
            json!({"scope": s.rg_scope(), "ports": [22], "minApprovals": 2, "justificationPattern": "^CHG-[0-9]+"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["pendingTimeout"], "PT1H");

    // The justification must match the rule; nothing is made otherwise.
    let before = s.ctl.snapshot().await;
    let r = s.initiate(&s.rita, "fix it", true).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["target"], "justification");
    assert_eq!(s.ctl.snapshot().await, before);

    let r = s.initiate(&s.rita, "CHG-1234 restart", true).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.request_id();
    let ports = &r.body["virtualMachines"][0]["ports"];
    assert_eq!(ports[0]["status"], "Pending");
    assert_eq!(ports[0]["statusReason"], "ApprovalRequired");
    // 3389 has no rule: open at once.
    assert_eq!(ports[1]["status"], "Initiated");
    let req = s.request(&id).await;
    assert_eq!(req["state"], "Pending");
    assert_eq!(req["approval"]["rule"], "prod-ssh");
    assert_eq!(port(&req, 22)["live"], false);

    // The requestor cannot approve its own request.
    let r = s.decide(&s.rita, &id, "approve", json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "SelfApprovalRefused")
    );
    // Nor can someone without the approve right.
    let r = s.decide(&s.ivan, &id, "approve", json!({})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // What amy may decide on is listed for her; then counted once.
    let mine = s
        .ctl
        .get_as(&s.amy, "/api/v1/requests?state=Pending&reviewable=true")
        .await;
    assert_eq!(
        mine.body["value"].as_array().unwrap().len(),
        1,
        "{:?}",
        mine.body
    );
    s.ctl.advance(Duration::from_secs(600));
    let r = s
        .decide(&s.amy, &id, "approve", json!({"reason": "looks right"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        (r.body["outcome"].as_str(), r.body["approvals"].as_u64()),
        (Some("counted"), Some(1))
    );
    let r = s.decide(&s.amy, &id, "approve", json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "AlreadyDecided")
    );
    let mine = s
        .ctl
        .get_as(&s.amy, "/api/v1/requests?state=Pending&reviewable=true")
        .await;
    assert!(mine.body["value"].as_array().unwrap().is_empty());

    // ben may shorten and narrow, never widen (and a refused widening changes nothing).
    for (body, field) in [
        (json!({"duration": "PT2H"}), "duration"),
        (json!({"sourcePrefix": "10.0.0.0/8"}), "sourcePrefix"),
        (json!({"sourcePrefix": "not an address"}), "sourcePrefix"),
        (json!({"duration": "soon"}), "duration"),
        (json!({"reason": "x".repeat(2000)}), "reason"),
    ] {
        let r = s.decide(&s.ben, &id, "approve", body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.body["error"]["target"], field, "{body}");
    }
    assert_eq!(
        s.request(&id).await["approval"]["decisions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = s
        .decide(
            &s.ben,
            &id,
            "approve",
            json!({"duration": "PT30M", "sourcePrefix": "10.1.2.3"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["outcome"], "approved");
    let req = &r.body["request"];
    assert_eq!(req["state"], "Active");
    let p22 = port(req, 22);
    assert_eq!(
        (p22["status"].as_str(), p22["live"].as_bool()),
        (Some("Initiated"), Some(true))
    );
    assert_eq!(p22["allowedSourceAddressPrefix"], "10.1.2.3");
    // Thirty minutes from the approval (ten minutes after the request), not from the request.
    let end: jiff::Timestamp = p22["endTimeUtc"].as_str().unwrap().parse().unwrap();
    assert_eq!(end, s.ctl.now() + jiff::SignedDuration::from_secs(1800));
    // The Azure API shows it Initiated; the decisions stay on record.
    let policy = s.ctl.get_policy("prod").await;
    let azure = &policy["properties"]["requests"][0]["virtualMachines"][0]["ports"][0];
    assert_eq!(
        (azure["number"].as_u64(), azure["status"].as_str()),
        (Some(22), Some("Initiated"))
    );
    let decisions = s.request(&id).await["approval"]["decisions"].clone();
    assert_eq!(decisions.as_array().unwrap().len(), 2);
    assert_eq!(decisions[0]["principal"], "amy");
    assert_eq!(decisions[0]["reason"], "looks right");
    for a in ["request.approve", "request.approved", "approvalRule.create"] {
        assert!(!s.ctl.audit(&format!("action={a}")).await.is_empty(), "{a}");
    }

    // An Owner's own request: the Owner holds every right, and still cannot approve it.
    let r = s.initiate(OWNER, "CHG-9 owner", false).await;
    let own = r.request_id();
    let r = s.decide(OWNER, &own, "approve", json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "SelfApprovalRefused")
    );
}

/// Denials need a reason and end the request; the requestor can cancel; an approver who
/// lost the right cannot decide (nor see the request); an unanswered request expires after its timeout.
#[tokio::test]
async fn denials_cancellations_lost_rights_and_timeouts_end_waits() {
    let s = scene().await;
    let r = s
        .rule(
            "prod",
            json!({"scope": s.rg_scope(), "pendingTimeout": "PT10M", "requireJustification": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    let id = s.initiate(&s.rita, "", false).await.request_id();
    let r = s.decide(&s.amy, &id, "deny", json!({})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["target"], "reason");
    let r = s
        .decide(&s.amy, &id, "deny", json!({"reason": "no ticket"}))
        .await;
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (StatusCode::OK, Some("denied"))
    );
    let req = s.request(&id).await;
    assert_eq!(req["state"], "Denied");
    assert_eq!(port(&req, 22)["status"], "Denied");
    let r = s.decide(&s.ben, &id, "approve", json!({})).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "NotPending"));

    // Cancelled by its requestor only.
    let id = s.initiate(&s.rita, "", false).await.request_id();
    let r = s
        .ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{id}/cancel"),
            Some(&s.amy),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = s
        .ctl
        .call(
            Method::POST,
            &format!("/api/v1/requests/{id}/cancel"),
            Some(&s.rita),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["state"], "Cancelled");

    // amy loses her role before deciding: refused at the decision.
    let id = s.initiate(&s.rita, "", false).await.request_id();
    let roles = s
        .ctl
        .get("/api/v1/roleAssignments?principal=amy")
        .await
        .body;
    let amy_role = roles["value"][0]["id"].as_str().unwrap().to_owned();
    let d = s
        .ctl
        .delete(&format!("/api/v1/roleAssignments/{amy_role}"))
        .await;
    assert!(d.status.is_success(), "{:?}", d.body);
    // Without the role she no longer even sees it (404, as if absent); the store
    // checks the decider's rights at the decision too (the conformance suite).
    let r = s.decide(&s.amy, &id, "approve", json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);

    // Unanswered for ten minutes: expired by the expiry task.
    s.ctl.advance(Duration::from_secs(601));
    let start = Instant::now();
    loop {
        let req = s.request(&id).await;
        if req["state"] == "Expired" {
            assert_eq!(port(&req, 22)["statusReason"], "ApprovalExpired");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not expired: {req}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !s.ctl
            .audit("action=request.approvalExpired")
            .await
            .is_empty()
    );
    let r = s.decide(&s.ben, &id, "approve", json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

/// Rules: bad input names its field and changes nothing; writing one needs policy
/// write rights at its scope; a deleted rule stops making requests wait.
#[tokio::test]
async fn rules_are_checked_and_need_policy_rights() {
    let s = scene().await;
    let scope = s.rg_scope();
    let before = s.ctl.snapshot().await;
    for (name, body, field) in [
        (
            "r",
            json!({"scope": scope, "minApprovals": 0}),
            "minApprovals",
        ),
        (
            "r",
            json!({"scope": scope, "denyThreshold": 11}),
            "denyThreshold",
        ),
        (
            "r",
            json!({"scope": scope, "justificationPattern": "^CHG-[0-9"}),
            "justificationPattern",
        ),
        (
            "r",
            json!({"scope": scope, "approvers": ["nobody-knows-me"]}),
            "approvers[0]",
        ),
        (
            "r",
            json!({"scope": scope, "approvers": ["has space"]}),
            "approvers[0]",
        ),
        (
            "r",
            json!({"scope": scope, "pendingTimeout": "PT1M"}),
            "pendingTimeout",
        ),
        ("r", json!({"scope": scope, "ports": [70000]}), "ports[0]"),
        ("r", json!({"scope": "/subscriptions/not-a-guid"}), "scope"),
        ("r", json!({}), "scope"),
        (
            "r",
            json!({"scope": "/subscriptions/00000000-0000-0000-0000-000000000000"}),
            "scope",
        ),
        ("bad..name!", json!({"scope": scope}), "name"),
    ] {
        let r = s.rule(name, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {:?}", r.body);
        assert_eq!(r.body["error"]["target"], field, "{body}");
    }
    let r = s
        .rule("r", json!({"scope": scope, "unknownField": 1}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.ctl.snapshot().await, before);

    // An approver cannot write rules (no policy write).
    let r = s
        .ctl
        .call(
            Method::PUT,
            "/api/v1/approvalRules/r",
            Some(&s.amy),
            Some(json!({"scope": scope})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Named approvers: only they decide.
    let r = s
        .rule(
            "named",
            json!({"scope": scope, "approvers": ["ben"], "requireJustification": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = s
        .rule(
            "named",
            json!({"scope": scope, "approvers": ["ben"], "requireJustification": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        s.ctl.get("/api/v1/approvalRules/named").await.body["approvers"],
        json!(["ben"])
    );
    assert_eq!(
        s.ctl.get("/api/v1/approvalRules").await.body["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let id = s.initiate(&s.rita, "", false).await.request_id();
    let r = s.decide(&s.amy, &id, "approve", json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "NotAnApprover")
    );
    let r = s.decide(&s.ben, &id, "approve", json!({})).await;
    assert_eq!(r.body["outcome"], "approved");

    // Deleted: requests no longer wait.
    assert_eq!(
        s.ctl.delete("/api/v1/approvalRules/named").await.status,
        StatusCode::OK
    );
    assert_eq!(
        s.ctl.delete("/api/v1/approvalRules/named").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.ctl.get("/api/v1/approvalRules/named").await.status,
        StatusCode::NOT_FOUND
    );
    let r = s.initiate(&s.rita, "", false).await;
    assert_eq!(
        r.body["virtualMachines"][0]["ports"][0]["status"],
        "Initiated"
    );
    assert!(!s.ctl.audit("action=approvalRule.delete").await.is_empty());
}

/// Break-glass: its own right; opens at once whatever the rules say; needs a
/// justification; capped; flagged until an approver (not its requestor) reviews it.
#[tokio::test]
async fn break_glass_opens_at_once_and_stays_flagged_until_reviewed() {
    let s = scene().await;
    let bea = s
        .ctl
        .principal("bea", "JIT Break-glass", &s.rg_scope())
        .await;
    let r = s
        .rule("strict", json!({"scope": s.rg_scope(), "minApprovals": 2}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let before = s.ctl.snapshot().await;
    let r = s.glass(&bea, "", "PT30M", "true").await;
    assert_eq!(r.body["error"]["target"], "justification", "{:?}", r.body);
    let r = s.glass(&bea, "db down", "PT2H", "true").await;
    assert_eq!(
        r.body["error"]["target"], "virtualMachines[0].ports[0].duration",
        "{:?}",
        r.body
    );
    let r = s.glass(&bea, "db down", "PT30M", "maybe").await;
    assert_eq!(r.body["error"]["target"], "x-jitgate-break-glass");
    // The right is its own: a requester cannot.
    let r = s.glass(&s.rita, "db down", "PT30M", "true").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(s.ctl.snapshot().await, before);

    let r = s.glass(&bea, "db down, INC-7", "PT30M", "true").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(
        r.body["virtualMachines"][0]["ports"][0]["status"],
        "Initiated"
    );
    let id = r.request_id();
    let req = s.request(&id).await;
    assert_eq!(req["state"], "Active");
    assert_eq!(req["breakGlass"]["reviewed"], false);
    assert!(!s.ctl.audit("action=request.breakGlass").await.is_empty());
    // Without the header the same person waits for the rule like anyone.
    let r = s.glass(&bea, "routine", "PT30M", "false").await;
    assert_eq!(
        r.body["virtualMachines"][0]["ports"][0]["status"],
        "Pending"
    );

    assert_eq!(s.flagged(&s.amy).await, 1);
    assert_eq!(s.review(&bea, &id).await.status, StatusCode::FORBIDDEN);
    assert_eq!(s.review(&s.ivan, &id).await.status, StatusCode::FORBIDDEN);
    let r = s.review(&s.amy, &id).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["breakGlass"]["reviewedBy"], "amy");
    assert_eq!(s.review(&s.ben, &id).await.status, StatusCode::CONFLICT);
    assert_eq!(s.flagged(&s.amy).await, 0);
    assert!(
        !s.ctl
            .audit("action=request.breakGlassReviewed")
            .await
            .is_empty()
    );
    let r = s.ctl.get("/api/v1/requests?breakGlass=sometimes").await;
    assert_eq!(r.body["error"]["target"], "breakGlass");
}

/// What opens is what the policy allows at the approval: a request whose source the
/// policy no longer allows cannot be approved (only denied or cancelled). Several rules
/// on one port: none is weakened (only approvers every naming rule names count).
#[tokio::test]
async fn approval_rechecks_the_policy_and_combines_rules() {
    let s = scene().await;
    let r = s
        .rule(
            "prod",
            json!({"scope": s.rg_scope(), "requireJustification": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let id = s.initiate(&s.rita, "", false).await.request_id();
    // The policy now allows 192.168.0.0/16 only: 10.1.2.0/24 cannot open.
    s.ctl.enable("prod", &["vm1"], "192.168.0.0/16").await;
    let r = s.decide(&s.amy, &id, "approve", json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "PolicyChanged"),
        "{:?}",
        r.body
    );
    assert_eq!(s.request(&id).await["state"], "Pending");
    let r = s
        .decide(&s.amy, &id, "deny", json!({"reason": "policy changed"}))
        .await;
    assert_eq!(r.body["outcome"], "denied");
    s.ctl.enable("prod", &["vm1"], "10.0.0.0/8").await;

    // A second rule naming ben only: amy no longer counts for port 22, ben does.
    let r = s
        .rule("ssh-ben", json!({"scope": s.rg_scope(), "ports": [22], "approvers": ["ben"], "requireJustification": false}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let id = s.initiate(&s.rita, "", false).await.request_id();
    assert_eq!(
        s.request(&id).await["approval"]["approvers"],
        json!(["ben"])
    );
    let r = s.decide(&s.amy, &id, "approve", json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "NotAnApprover")
    );
    let r = s.decide(&s.ben, &id, "approve", json!({})).await;
    assert_eq!(r.body["outcome"], "approved", "{:?}", r.body);
    // A rule naming only ivan beside it: nobody is named by both, so nobody could
    // approve, and the request is refused up front.
    let r = s
        .rule("ssh-ivan", json!({"scope": s.rg_scope(), "ports": [22], "approvers": ["ivan"], "requireJustification": false}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = s.initiate(&s.rita, "", false).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        r.message().contains("nobody could approve"),
        "{}",
        r.message()
    );
}
