//! Several controllers on one PostgreSQL database (a real throwaway server, see
//! `jitgate_store_sql::testpg`): any of them answers any call, a change made through
//! one reaches the agents long-polling on another, and a token revoked through one is
//! refused by the others.

use std::time::{Duration, Instant};

use jitgate_store_sql::testpg::TestDb;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::util::{Ctl, OWNER, enroll};

async fn replica(db: &TestDb) -> Ctl {
    let url = db.url.clone();
    Ctl::start_with(tempfile::tempdir().unwrap(), move |c| {
        c.database = Some(url)
    })
    .await
}

async fn two_replicas() -> (TestDb, Ctl, Ctl) {
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let a = replica(&db).await;
    let b = replica(&db).await;
    (db, a, b)
}

#[tokio::test]
async fn any_replica_answers_any_call() {
    let (_db, a, b) = two_replicas().await;
    // One installation: the second controller found the first one's subscription and
    // accepts the same bootstrap token.
    assert_eq!(a.sub, b.sub);
    let put = a.enable("rg", &["vm1", "vm2"], "*").await;
    assert_eq!(put.status, StatusCode::OK, "{:?}", put.body);
    let pol = format!(
        "{}?api-version=2020-01-01",
        a.policy_path("rg", "westeurope", "default")
    );
    let via_a = a.get(&pol).await;
    let via_b = b.get(&pol).await;
    assert_eq!(via_b.status, StatusCode::OK, "{:?}", via_b.body);
    assert_eq!(via_a.body, via_b.body);
    // A request made through B is listed by A, and revoked through A.
    let r = b
        .initiate(
            "rg",
            "vm1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.headers["x-jitgate-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let listed = a.get("/api/v1/requests").await;
    assert_eq!(listed.body["value"][0]["id"], id.as_str());
    let revoked = a
        .post(&format!("/api/v1/requests/{id}/revoke"), json!({}))
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    // One audit chain, written by both, verifies through either.
    for ctl in [&a, &b] {
        let v = ctl.get("/api/v1/audit/verify").await;
        assert_eq!(v.body["ok"], true, "{:?}", v.body);
    }
}

#[tokio::test]
async fn a_grant_made_through_one_replica_wakes_the_agent_polling_another() {
    let (_db, a, b) = two_replicas().await;
    let (vm, agent) = enroll(&a, "web-1").await;
    a.enable("lab", &["web-1"], "*").await;
    let first = b
        .get_as(&agent, &format!("/api/v1/agent/desired?vm={vm}"))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.body["grants"], json!([]));
    let known = first.body["revision"].as_str().unwrap().to_owned();
    // The agent waits on B (up to 30 s) while the grant is made through A.
    let poll = {
        let base = b.base.clone();
        let (vm, agent, known) = (vm.clone(), agent.clone(), known.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let r = reqwest::Client::new()
                .get(format!(
                    "{base}/api/v1/agent/desired?vm={vm}&known={known}&wait=30"
                ))
                .bearer_auth(agent)
                .send()
                .await
                .unwrap();
            let body: serde_json::Value = r.json().await.unwrap();
            (body, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = a
        .initiate(
            "lab",
            "web-1",
            json!([{"number": 22, "allowedSourceAddressPrefix": "10.0.0.1", "duration": "PT1H"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let (body, waited) = poll.await.unwrap();
    // Answered with the new state, not at the end of the wait with the old one.
    assert_ne!(body["revision"], known.as_str(), "{body:?}");
    assert_eq!(body["grants"].as_array().map(Vec::len), Some(1), "{body:?}");
    assert!(
        waited < Duration::from_secs(30),
        "the long-poll ran to its end: {waited:?}"
    );
}

#[tokio::test]
async fn a_token_revoked_through_one_replica_is_refused_by_the_others() {
    let (_db, a, b) = two_replicas().await;
    let sub = a.sub.clone();
    let t = a
        .principal("dora", "Reader", &format!("/subscriptions/{sub}"))
        .await;
    // B has authenticated it (and keeps it in its cache).
    for _ in 0..2 {
        assert_eq!(b.get_as(&t, "/api/v1/whoami").await.status, StatusCode::OK);
    }
    let tokens = a.get("/api/v1/tokens").await;
    let tid = tokens.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["principal"] == "dora")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        a.delete(&format!("/api/v1/tokens/{tid}")).await.status,
        StatusCode::OK
    );
    // Refused by A at once, and by B as soon as it has read the revoke (its feed wakes
    // on the database's notification). The 2 s allowed for a loaded machine are well
    // under the cache's own lifetime (`authcache::TTL`, 5 s), so only the feed can
    // have dropped B's cached entry.
    assert_eq!(
        a.get_as(&t, "/api/v1/whoami").await.status,
        StatusCode::UNAUTHORIZED
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = b.get_as(&t, "/api/v1/whoami").await.status;
        if s == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still accepts the revoked token: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The owner's token works on both throughout.
    let who = b
        .call(Method::GET, "/api/v1/whoami", Some(OWNER), None)
        .await;
    assert_eq!(who.status, StatusCode::OK);
}
