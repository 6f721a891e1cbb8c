//! Issue 15: an agent that asks for deltas (`delta=1`) gets what changed since the
//! state it has, not the whole state; applied in order, the deltas are the whole
//! state, revision included. An agent the controller has no state for, or one that
//! does not ask, gets the whole state.

use reqwest::StatusCode;
use serde_json::{Value, json};

use jitgate_proto::DesiredState;

use crate::util::{Ctl, OWNER, enroll};

async fn desired(ctl: &Ctl, agent: &str, vm: &str, query: &str) -> DesiredState {
    let r = ctl
        .get_as(
            agent,
            &format!(
                "/api/v1/agent/desired?vm={}&wait=0{query}",
                vm.replace('/', "%2F")
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    serde_json::from_value(r.body).unwrap()
}

fn from(d: &DesiredState) -> String {
    format!("&delta=1&known={}", d.revision)
}

fn sources(grants: &[jitgate_proto::WireGrant]) -> Vec<&str> {
    grants.iter().map(|g| g.source.as_str()).collect()
}

async fn initiate(ctl: &Ctl, source: &str) -> String {
    let ports: Value =
        json!([{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": source}]);
    let r = ctl.initiate_as(OWNER, "lab", "web-1", ports).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    r.request_id()
}

/// Revisions of scheme 2 (`protocol=3`, an order-free digest of the grants) and of
/// scheme 1 (agents before protocol 3, which send no `protocol`) both add up.
#[tokio::test]
async fn an_agent_gets_what_changed_since_the_state_it_has() {
    deltas_add_up("&protocol=3").await;
}

#[tokio::test]
async fn an_agent_of_protocol_2_gets_what_changed_with_revisions_it_computes() {
    deltas_add_up("").await;
}

async fn deltas_add_up(protocol: &str) {
    let q = |s: &str| format!("{s}{protocol}");
    let ctl = Ctl::start().await;
    let (vm, agent) = enroll(&ctl, "web-1").await;
    ctl.enable("lab", &["web-1"], "*").await;

    let d0 = desired(&ctl, &agent, &vm, &q("&delta=1")).await;
    assert!(
        d0.base.is_none() && d0.grants.is_empty(),
        "no known state: the whole state"
    );
    let mut applied = jitgate_proto::decode(&d0).unwrap();

    let a = initiate(&ctl, "10.0.0.1").await;
    let d1 = desired(&ctl, &agent, &vm, &q(&from(&d0))).await;
    assert_eq!(d1.base.as_deref(), Some(d0.revision.as_str()));
    assert_eq!(
        (sources(&d1.grants), d1.removed.len()),
        (vec!["10.0.0.1"], 0)
    );
    assert_eq!(d1.rules, d0.rules, "rules are always whole");
    applied = jitgate_proto::apply_delta(&applied, &d1).unwrap();

    initiate(&ctl, "10.0.0.2").await;
    let d2 = desired(&ctl, &agent, &vm, &q(&from(&d1))).await;
    assert_eq!(
        (sources(&d2.grants), d2.removed.len()),
        (vec!["10.0.0.2"], 0)
    );
    applied = jitgate_proto::apply_delta(&applied, &d2).unwrap();

    let r = ctl
        .post(&format!("/api/v1/requests/{a}/revoke"), json!({}))
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let d3 = desired(&ctl, &agent, &vm, &q(&from(&d2))).await;
    assert_eq!(
        (d3.grants.len(), sources(&d3.removed)),
        (0, vec!["10.0.0.1"])
    );
    applied = jitgate_proto::apply_delta(&applied, &d3).unwrap();

    // The deltas add up to the whole state, which hashes to the revision sent.
    let whole = desired(&ctl, &agent, &vm, &q("")).await;
    assert!(whole.base.is_none() && whole.removed.is_empty());
    assert_eq!(whole.revision, d3.revision);
    assert_eq!(applied, jitgate_proto::decode(&whole).unwrap());
    assert!(jitgate_proto::revision_matches(&applied, ctl.now()));

    // Nothing new: the same revision, nothing in it.
    let same = desired(&ctl, &agent, &vm, &q(&from(&d3))).await;
    assert_eq!(same.revision, d3.revision);
    assert!(same.grants.is_empty() && same.removed.is_empty());

    // A state the controller does not keep (another controller's, or made up): whole.
    let unknown = desired(
        &ctl,
        &agent,
        &vm,
        &q(&format!("&delta=1&known={}", "0".repeat(32))),
    )
    .await;
    assert!(unknown.base.is_none());
    assert_eq!(sources(&unknown.grants), vec!["10.0.0.2"]);
    // An agent that does not ask for deltas gets whole states, as before.
    let old = desired(&ctl, &agent, &vm, &q(&format!("&known={}", d0.revision))).await;
    assert!(old.base.is_none());
    assert_eq!(old, whole_but_generated_at(&old, &whole));
}

/// `whole` with `d`'s generation time (the only field that differs between two
/// answers of the same state).
fn whole_but_generated_at(d: &DesiredState, whole: &DesiredState) -> DesiredState {
    DesiredState {
        generated_at: d.generated_at.clone(),
        ..whole.clone()
    }
}

#[tokio::test]
async fn bad_delta_and_protocol_parameters_are_refused_by_name() {
    let ctl = Ctl::start().await;
    let (vm, agent) = enroll(&ctl, "web-1").await;
    for (query, field) in [
        ("&delta=yes", "delta"),
        ("&protocol=0", "protocol"),
        ("&protocol=x", "protocol"),
        ("&protocol=-1", "protocol"),
    ] {
        let r = ctl
            .get_as(
                &agent,
                &format!("/api/v1/agent/desired?vm={}{query}", vm.replace('/', "%2F")),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {:?}", r.body);
        assert!(r.message().contains(field), "{query}: {:?}", r.body);
    }
}

/// The same state has a revision of each scheme, each naming it to the agent that
/// computes it; a bad `protocol` is refused by name.
#[tokio::test]
async fn each_protocol_gets_the_revision_it_computes() {
    let ctl = Ctl::start().await;
    let (vm, agent) = enroll(&ctl, "web-1").await;
    ctl.enable("lab", &["web-1"], "*").await;
    initiate(&ctl, "10.0.0.1").await;
    let v1 = desired(&ctl, &agent, &vm, "").await;
    let v2 = desired(&ctl, &agent, &vm, "&protocol=3").await;
    assert_ne!(v1.revision, v2.revision);
    assert_eq!(v1.grants, v2.grants);
    let (d1, d2) = (
        jitgate_proto::decode(&v1).unwrap(),
        jitgate_proto::decode(&v2).unwrap(),
    );
    assert_eq!(d1.digest, d2.digest);
    assert_eq!(
        v1.revision,
        jitgate_proto::revision_of_lines(
            &v1.vm,
            None,
            &v1.rules,
            d1.grants.iter().map(jitgate_proto::grant_line)
        ),
        "scheme 1 is the ordered hash of every grant, as before protocol 3"
    );
    // Each is "nothing new" to the agent that has it.
    for (query, rev) in [("", &v1.revision), ("&protocol=3", &v2.revision)] {
        let same = desired(&ctl, &agent, &vm, &format!("{query}&delta=1&known={rev}")).await;
        assert_eq!(&same.revision, rev);
        assert!(same.grants.is_empty() && same.removed.is_empty());
    }
}

/// Issue 15: an initiate on a machine whose agent is long-polling is answered once the
/// agent has taken the state that opens the port (its next long-poll names it), so a
/// client that connects on the answer finds the port open; an agent that never polls
/// again delays the answer by a bounded wait only.
#[tokio::test]
async fn an_initiate_is_answered_once_the_polling_agent_has_taken_the_state() {
    let ctl = Ctl::start().await;
    let (vm, agent) = enroll(&ctl, "web-1").await;
    ctl.enable("lab", &["web-1"], "*").await;
    let poll = |known: String, wait: u32| {
        let (ctl, agent, vm) = (&ctl, agent.clone(), vm.clone());
        async move {
            let r = ctl
                .get_as(
                    &agent,
                    &format!(
                        "/api/v1/agent/desired?vm={}&wait={wait}&delta=1&protocol=3&known={known}",
                        vm.replace('/', "%2F")
                    ),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            serde_json::from_value::<DesiredState>(r.body).unwrap()
        }
    };
    for agent_polls_again in [true, false] {
        let d0 = desired(&ctl, &agent, &vm, "&protocol=3").await;
        let order = std::sync::Mutex::new(Vec::new());
        let agent_side = async {
            let d1 = poll(d0.revision.clone(), 30).await;
            order.lock().unwrap().push("the agent has the new state");
            assert_eq!(d1.grants.len(), 1, "{d1:?}");
            if agent_polls_again {
                poll(d1.revision.clone(), 0).await;
            }
        };
        let client_side = async {
            // The long-poll is waiting before the initiate is sent.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let ports: Value = json!([{"number": 22, "duration": "PT1H"}]);
            let r = ctl.initiate_as(OWNER, "lab", "web-1", ports).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
            order.lock().unwrap().push("the initiate is answered");
            r.request_id()
        };
        let ((), id) = tokio::join!(agent_side, client_side);
        assert_eq!(
            *order.lock().unwrap(),
            vec!["the agent has the new state", "the initiate is answered"],
            "agent polls again: {agent_polls_again}"
        );
        let r = ctl
            .post(&format!("/api/v1/requests/{id}/revoke"), json!({}))
            .await;
        assert!(r.status.is_success(), "{:?}", r.body);
    }
}
