//! Gateway mode through the HTTP API (issue 16): placing a VM behind a gateway, bad
//! input refused naming the field and changing nothing, who may enforce a placed VM,
//! mapped ports as Azure shows them, and the gateway's list of machines.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::util::{Ctl, OWNER, enroll};

fn enc(id: &str) -> String {
    id.replace('/', "%2F")
}

async fn place(ctl: &Ctl, token: &str, name: &str, body: Value) -> crate::util::Resp {
    ctl.call(
        reqwest::Method::PUT,
        &format!("/api/v1/vms/lab/{name}/placement"),
        Some(token),
        Some(body),
    )
    .await
}

async fn view(ctl: &Ctl, name: &str) -> Value {
    let r = ctl.get(&format!("/api/v1/vms/lab/{name}")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body
}

#[tokio::test]
async fn bad_placements_are_refused_naming_the_field_and_change_nothing() {
    let ctl = Ctl::start().await;
    let (_, _) = enroll(&ctl, "gw-1").await;
    ctl.register("lab", "win-1").await;
    let ok = json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "mode": "dnat", "publicIpAddress": "198.51.100.1"});
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"address": "10.0.0.5"}),
            StatusCode::BAD_REQUEST,
            "gateway",
        ),
        (
            json!({"gateway": "gw-1", "address": "10.0.0.5"}),
            StatusCode::BAD_REQUEST,
            "gateway",
        ),
        (
            json!({"gateway": "lab/gw-1"}),
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (
            json!({"gateway": "lab/gw-1", "address": "10.0.0.300"}),
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (
            json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "mode": "bridge"}),
            StatusCode::BAD_REQUEST,
            "mode",
        ),
        (
            json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "mode": "dnat"}),
            StatusCode::BAD_REQUEST,
            "publicIpAddress",
        ),
        (
            json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "mode": "dnat", "publicIpAddress": "2001:db8::1"}),
            StatusCode::BAD_REQUEST,
            "publicIpAddress",
        ),
        (
            json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "publicIpAddress": "198.51.100.1"}),
            StatusCode::BAD_REQUEST,
            "publicIpAddress",
        ),
        (
            json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "masquerade": true}),
            StatusCode::BAD_REQUEST,
            "masquerade",
        ),
        (
            json!({"gateway": "lab/nowhere", "address": "10.0.0.5"}),
            StatusCode::NOT_FOUND,
            "gateway",
        ),
        (
            json!({"gateway": "lab/win-1", "address": "10.0.0.5"}),
            StatusCode::CONFLICT,
            "gateway",
        ),
    ];
    for (body, status, field) in cases {
        let r = place(&ctl, OWNER, "win-1", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        assert_eq!(r.body["error"]["target"], field, "{body}: {:?}", r.body);
        assert!(
            view(&ctl, "win-1").await.get("placement").is_none(),
            "{body} placed it"
        );
    }
    // Unknown VM.
    let r = place(&ctl, OWNER, "ghost", ok.clone()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    assert_eq!(r.body["error"]["target"], "vm");

    let r = place(&ctl, OWNER, "win-1", ok.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // Another machine cannot take the same address behind the same gateway.
    ctl.register("lab", "win-2").await;
    let r = place(&ctl, OWNER, "win-2", ok.clone()).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert_eq!(r.body["error"]["target"], "address");
    // No chains: the gateway cannot go behind a machine, nor a machine behind win-1.
    let r = place(
        &ctl,
        OWNER,
        "gw-1",
        json!({"gateway": "lab/win-2", "address": "10.0.0.9"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    let r = place(
        &ctl,
        OWNER,
        "win-2",
        json!({"gateway": "lab/win-1", "address": "10.0.0.9"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    // A gateway in use cannot be deleted.
    let r = ctl.delete("/api/v1/vms/lab/gw-1").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    // Placements are audited.
    let events = ctl.audit("action=vm.place").await;
    assert_eq!(events.len(), 1, "{events:?}");
}

#[tokio::test]
async fn only_the_gateway_enforces_a_placed_machine_and_requesters_cannot_place() {
    let ctl = Ctl::start().await;
    let (gw, gw_token) = enroll(&ctl, "gw-1").await;
    let (win, win_token) = enroll(&ctl, "win-1").await;
    let (_, other_token) = enroll(&ctl, "web-1").await;
    ctl.enable("lab", &["win-1"], "*").await;

    let requester = ctl
        .principal(
            "alice@example.com",
            "JIT Requester",
            &format!("/subscriptions/{}", ctl.sub),
        )
        .await;
    let body = json!({"gateway": "lab/gw-1", "address": "10.0.0.5"});
    let r = place(&ctl, &requester, "win-1", body.clone()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    // The gateway's own agent credential cannot place machines behind itself.
    let r = place(&ctl, &gw_token, "win-1", body.clone()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);

    let desired = |token: &str| {
        let (ctl, token, win) = (&ctl, token.to_owned(), win.clone());
        async move {
            ctl.get_as(
                &token,
                &format!("/api/v1/agent/desired?vm={}&wait=0", enc(&win)),
            )
            .await
        }
    };
    // Before: win-1's own agent, nobody else.
    assert_eq!(desired(&win_token).await.status, StatusCode::OK);
    assert_eq!(desired(&gw_token).await.status, StatusCode::FORBIDDEN);

    let r = place(&ctl, OWNER, "win-1", body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // After: the gateway only, and the state says where the machine sits.
    let r = desired(&gw_token).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["gateway"]["address"], "10.0.0.5", "{:?}", r.body);
    assert_eq!(r.body["gateway"]["mode"], "routed");
    let state: jitgate_proto::DesiredState = serde_json::from_value(r.body).unwrap();
    let decoded = jitgate_proto::decode(&state).expect("the placement is in the revision");
    assert_eq!(decoded.gateway.unwrap().address.to_string(), "10.0.0.5");
    for t in [&win_token, &other_token] {
        assert_eq!(desired(t).await.status, StatusCode::FORBIDDEN);
        let r = ctl
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/agent/status?vm={}", enc(&win)),
                Some(t),
                Some(json!({"appliedRevision": state.revision})),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    }
    // The gateway lists what is behind it; another agent cannot read that list.
    let r = ctl
        .get_as(
            &gw_token,
            &format!("/api/v1/agent/behind?vm={}&wait=0", enc(&gw)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["vms"], json!([win]), "{:?}", r.body);
    let r = ctl
        .get_as(
            &other_token,
            &format!("/api/v1/agent/behind?vm={}&wait=0", enc(&gw)),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let r = ctl
        .get_as(
            &gw_token,
            &format!("/api/v1/agent/behind?vm={}&wait=99", enc(&gw)),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["target"], "wait");

    // Taken from behind the gateway: its own agent again.
    let r = ctl.delete("/api/v1/vms/lab/win-1/placement").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(desired(&win_token).await.status, StatusCode::OK);
    assert_eq!(desired(&gw_token).await.status, StatusCode::FORBIDDEN);
    let r = ctl.delete("/api/v1/vms/lab/win-1/placement").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn dnat_machines_get_stable_mapped_ports_shown_as_azure_shows_them() {
    let ctl = Ctl::start().await;
    enroll(&ctl, "gw-1").await;
    ctl.register("lab", "win-1").await;
    ctl.register("lab", "win-2").await;
    let public = "198.51.100.1";
    for (name, addr) in [("win-1", "10.0.0.5"), ("win-2", "10.0.0.6")] {
        let r = place(&ctl, OWNER, name, json!({"gateway": "lab/gw-1", "address": addr, "mode": "dnat", "publicIpAddress": public})).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    // Ports come with the policy (22 and 3389 on both).
    ctl.enable("lab", &["win-1", "win-2"], "*").await;
    let mapped = |v: &Value| -> Vec<(u64, u64)> {
        v["placement"]["mappedPorts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["number"].as_u64().unwrap(),
                    m["mappedPort"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let m1 = mapped(&view(&ctl, "win-1").await);
    let m2 = mapped(&view(&ctl, "win-2").await);
    assert_eq!(m1.len(), 2, "{m1:?}");
    assert_eq!(m2.len(), 2, "{m2:?}");
    let mut all: Vec<u64> = m1.iter().chain(&m2).map(|(_, m)| *m).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        4,
        "mapped ports are unique on the public address: {all:?}"
    );
    assert!(all.iter().all(|p| (50000..=59999).contains(p)), "{all:?}");

    // Azure's answers: the policy's VM has the public address, the request's port its
    // mapped port.
    let policy = ctl.get_policy("lab").await;
    let vms = policy["properties"]["virtualMachines"].as_array().unwrap();
    assert!(
        vms.iter().all(|v| v["publicIpAddress"] == public),
        "{policy}"
    );
    let r = ctl
        .initiate("lab", "win-1", json!([{"number": 3389, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.9"}]))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let want = m1.iter().find(|(n, _)| *n == 3389).unwrap().1;
    assert_eq!(
        r.body["virtualMachines"][0]["ports"][0]["mappedPort"], want,
        "{:?}",
        r.body
    );
    let policy = ctl.get_policy("lab").await;
    assert!(
        policy
            .to_string()
            .contains(&format!("\"mappedPort\":{want}")),
        "{policy}"
    );

    // Placing again on the same address keeps the ports; another public address
    // allocates afresh; routed has none.
    let r = place(&ctl, OWNER, "win-1", json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "mode": "dnat", "publicIpAddress": public, "masquerade": true})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(mapped(&view(&ctl, "win-1").await), m1);
    let r = place(
        &ctl,
        OWNER,
        "win-1",
        json!({"gateway": "lab/gw-1", "address": "10.0.0.5", "mode": "routed"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(
        view(&ctl, "win-1").await["placement"]
            .get("mappedPorts")
            .is_none()
    );
    let policy = ctl.get_policy("lab").await;
    let w1 = policy["properties"]["virtualMachines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"].as_str().unwrap().ends_with("/win-1"))
        .unwrap()
        .clone();
    assert!(w1.get("publicIpAddress").is_none(), "{w1}");
}
