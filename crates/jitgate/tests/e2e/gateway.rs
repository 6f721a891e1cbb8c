//! Gateway mode (issue 16): a machine that runs no agent, behind a Linux gateway
//! running `jitgate gateway`. The lab's VM namespace is the gateway (its LAN address is
//! the public one); the machine sits on a network of its own behind it, with TCP
//! services on 3389 and 22; the clients reach that network through the gateway.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::lab::{BIN, Host, LOCATION, Lab, OPEN_PROBE, RG, VM, echo, run_in_ns, sleep_until};

const RDP: u16 = 3389;
const SSH: u16 = 22;
const WIN: &str = "win-1";

/// The lab with its agent turned into a gateway and `win-1` behind it, registered and
/// placed with `placement` (`gateway` and `address` filled in).
fn gateway_lab(mut placement: Value) -> (Lab, Host) {
    let mut lab = Lab::start();
    lab.kill_agent();
    lab.agent_cmd = "gateway";
    lab.start_agent();
    lab.wait_agent_up_to_date();
    let win = lab.behind("win", &[RDP, SSH]);
    let r = lab.admin(
        "POST",
        "/api/v1/vms",
        Some(json!({"resourceGroup": RG, "name": WIN})),
    );
    assert_eq!(r.status, 201, "register: {:?}", r.body);
    placement["gateway"] = json!(format!("{RG}/{VM}"));
    placement["address"] = json!(win.v4.to_string());
    let r = lab.admin(
        "PUT",
        &format!("/api/v1/vms/{RG}/{WIN}/placement"),
        Some(placement),
    );
    assert_eq!(r.status, 200, "place: {:?}", r.body);
    (lab, win)
}

fn win_id(lab: &Lab) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/{WIN}",
        lab.sub
    )
}

fn policy_path(lab: &Lab) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{RG}/providers/Microsoft.Security/locations/{LOCATION}/jitNetworkAccessPolicies/behind",
        lab.sub
    )
}

fn win_view(lab: &Lab) -> Value {
    let r = lab.admin("GET", &format!("/api/v1/vms/{RG}/{WIN}"), None);
    assert_eq!(r.status, 200, "GET win-1: {:?}", r.body);
    r.body
}

/// Waits until the gateway reports win-1's current state applied.
fn wait_win_up_to_date(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = win_view(lab);
        if v["agent"]["upToDate"] == true {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not apply win-1's state within 15 s: {v}\n{}",
            lab.log_tail("agent")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until win-1's recommendation has `verdict`; returns it.
fn wait_recommendation(lab: &Lab, verdict: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = lab.admin("GET", "/api/v1/recommendations", None);
        assert_eq!(r.status, 200, "{r:?}");
        let mine = r.body["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == WIN)
            .cloned()
            .unwrap_or_default();
        if mine["verdict"] == verdict {
            return mine;
        }
        assert!(
            Instant::now() < deadline,
            "win-1 is not {verdict} within 15 s: {mine}\n{}",
            lab.log_tail("agent")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// JIT on win-1's RDP and SSH ports (Azure API); returns the policy as answered.
fn enable_win(lab: &Lab) -> Value {
    let ports: Vec<Value> = [RDP, SSH]
        .iter()
        .map(|p| json!({"number": p, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT1H"}))
        .collect();
    let body = json!({"kind": "Basic", "properties": {"virtualMachines": [{"id": win_id(lab), "ports": ports}]}});
    let r = lab.admin(
        "PUT",
        &format!("{}?api-version=2020-01-01", policy_path(lab)),
        Some(body),
    );
    assert_eq!(r.status, 200, "PUT policy: {:?}", r.body);
    wait_win_up_to_date(lab);
    r.body
}

/// Initiates `port` of win-1 from `from` for `duration`; the answer's port.
fn initiate(lab: &Lab, from: &Host, port: u16, duration: &str) -> (String, Value) {
    let body = json!({"virtualMachines": [{"id": win_id(lab), "ports": [{"number": port, "duration": format!("PT{duration}S"), "allowedSourceAddressPrefix": from.v4.to_string()}]}], "justification": "e2e"});
    let r = lab.call(
        from,
        "POST",
        &format!("{}/initiate?api-version=2020-01-01", policy_path(lab)),
        Some(crate::lab::OWNER),
        Some(body),
    );
    assert_eq!(r.status, 202, "initiate: {:?}", r.body);
    let id = r.headers["x-jitgate-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    (id, r.body["virtualMachines"][0]["ports"][0].clone())
}

#[test]
fn routed_the_gateway_opens_the_machines_own_address_to_the_requester_only() {
    let (lab, win) = gateway_lab(json!({"mode": "routed"}));
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let rdp = win.v4_at(RDP);
    // Before JIT the gateway forwards everything: what follows is jitgate's doing.
    assert!(
        a.tcp_open(rdp) && b.tcp_open(rdp),
        "win-1 unreachable before JIT"
    );

    let view = win_view(&lab);
    assert_eq!(view["placement"]["mode"], "routed", "{view}");
    assert_eq!(view["placement"]["gateway"].as_str().unwrap(), lab.vm_id());
    // Without an agent on win-1, the gateway's probe finds RDP and SSH answering, and
    // a machine exposing them without a policy is Unhealthy like any other.
    let rec = wait_recommendation(&lab, "Unhealthy");
    let exposed = rec.to_string();
    assert!(exposed.contains("3389") && exposed.contains("22"), "{rec}");
    enable_win(&lab);
    wait_recommendation(&lab, "Healthy");
    for c in [&a, &b] {
        assert!(!c.tcp_open(rdp), "{} reached RDP without a grant", c.role);
        assert!(!c.tcp_open(win.v4_at(SSH)), "{} reached SSH", c.role);
    }

    let (id, port) = initiate(&lab, &a, RDP, "600");
    assert!(port.get("mappedPort").is_none(), "routed: {port}");
    a.wait_tcp_open(rdp, Duration::from_secs(2));
    let ran = lab.jitgate(
        &a,
        crate::lab::OWNER,
        &["connect", WIN, "--port", "3389", "--json"],
    );
    assert!(ran.success(), "{ran}");
    let out: Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(out["address"], rdp.to_string(), "{ran}");
    assert!(!b.tcp_open(rdp), "the grant opened RDP to another source");
    assert!(!a.tcp_open(win.v4_at(SSH)), "the grant opened another port");
    // The gateway's own agent table still protects the gateway itself.
    let gw = lab.nft(&["list", "tables"]);
    assert!(gw.contains("inet jitgate_gw"), "{gw}");

    // Revoked: closed at once.
    let r = lab.admin(
        "POST",
        &format!("/api/v1/requests/{id}/revoke"),
        Some(json!({})),
    );
    assert!(r.status == 200 || r.status == 202, "revoke: {r:?}");
    a.wait_tcp_closed(rdp, Duration::from_secs(2));
}

#[test]
fn dnat_the_requester_reaches_the_mapped_port_only_and_grants_end_on_time_without_gateway_or_controller()
 {
    let (mut lab, win) = gateway_lab(json!({"mode": "routed"}));
    let public = lab.vm.v4;
    // No public address: refused, naming the field, and nothing changed.
    let r = lab.admin(
        "PUT",
        &format!("/api/v1/vms/{RG}/{WIN}/placement"),
        Some(
            json!({"gateway": format!("{RG}/{VM}"), "address": win.v4.to_string(), "mode": "dnat"}),
        ),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.body["error"]["target"], "publicIpAddress", "{r:?}");
    let r = lab.admin(
        "PUT",
        &format!("/api/v1/vms/{RG}/{WIN}/placement"),
        Some(json!({"gateway": format!("{RG}/{VM}"), "address": win.v4.to_string(), "mode": "dnat", "publicIpAddress": public.to_string()})),
    );
    assert_eq!(r.status, 200, "{r:?}");

    let policy = enable_win(&lab);
    assert_eq!(
        policy["properties"]["virtualMachines"][0]["publicIpAddress"],
        public.to_string(),
        "{policy}"
    );
    let view = win_view(&lab);
    let mapped: Vec<(u64, u64)> = view["placement"]["mappedPorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["number"].as_u64().unwrap(),
                m["mappedPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(mapped.len(), 2, "{view}");
    let rdp_mapped = mapped.iter().find(|(n, _)| *n == u64::from(RDP)).unwrap().1 as u16;
    let front = SocketAddr::new(IpAddr::V4(public), rdp_mapped);
    let (a, b) = (lab.a.clone(), lab.b.clone());
    for c in [&a, &b] {
        assert!(!c.tcp_open(front), "{} reached the mapped port", c.role);
        assert!(
            !c.tcp_open(win.v4_at(RDP)),
            "{} reached RDP directly",
            c.role
        );
    }

    let (_, port) = initiate(&lab, &a, RDP, "8");
    assert_eq!(port["mappedPort"], rdp_mapped, "{port}");
    let end = crate::lab::instant_of(port["endTimeUtc"].as_str().unwrap());
    a.wait_tcp_open(front, Duration::from_secs(2));
    assert!(
        !b.tcp_open(front),
        "the grant opened the mapped port to another source"
    );
    assert!(
        !a.tcp_open(win.v4_at(RDP)),
        "a DNAT grant opened the private address directly"
    );
    // A connection opened under the grant keeps working after its end.
    let mut held = a.connect(front);
    assert_eq!(echo(&mut held, b"before"), b"before");

    // Gateway and controller dead: the kernel still ends the grant on time.
    lab.kill_agent();
    lab.kill_controller();
    sleep_until(end - Duration::from_millis(1500));
    assert!(
        a.connect_within(front, OPEN_PROBE).is_some(),
        "the grant closed more than 1.5 s early with gateway and controller dead"
    );
    sleep_until(end + Duration::from_millis(250));
    assert!(
        !a.tcp_open(front),
        "the mapped port was still open 250 ms after the end"
    );
    assert_eq!(
        echo(&mut held, b"after"),
        b"after",
        "the established connection was cut at the end"
    );

    // Both back; a gateway restart during a grant keeps it.
    lab.start_controller();
    lab.start_agent();
    wait_win_up_to_date(&lab);
    let (_, port) = initiate(&lab, &a, RDP, "600");
    assert_eq!(
        port["mappedPort"], rdp_mapped,
        "the mapped port moved: {port}"
    );
    a.wait_tcp_open(front, Duration::from_secs(2));
    lab.kill_agent();
    lab.start_agent();
    wait_win_up_to_date(&lab);
    assert!(
        a.connect_within(front, OPEN_PROBE).is_some(),
        "the restarted gateway dropped a live grant"
    );
    assert!(!b.tcp_open(front));
    // `jitgate connect` says where to connect: the public address and mapped port.
    let ran = lab.jitgate(
        &a,
        crate::lab::OWNER,
        &["connect", WIN, "--port", "3389", "--json"],
    );
    assert!(ran.success(), "{ran}");
    let out: Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(out["address"], front.to_string(), "{ran}");
    assert_eq!(out["reused"], true, "{ran}");
    // Let the restarted gateway save its states before the "reboot".
    wait_win_up_to_date(&lab);

    // A reboot loses the tables; the boot-time step rebuilds the gateway's from its
    // saved states, controller and gateway down: closed to others, the grant kept.
    lab.kill_agent();
    lab.kill_controller();
    lab.nft(&["delete", "table", "inet", "jitgate_gw"]);
    assert!(
        b.tcp_open(win.v4_at(RDP)),
        "without the table RDP is open to everyone"
    );
    let r = run_in_ns(
        &lab.vm.ns,
        BIN,
        &[
            "agent",
            "restore",
            "--state-dir",
            lab.agent_state_dir().to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(20),
    );
    assert!(r.success(), "{r}");
    assert!(
        r.stdout
            .contains("jitgate_gw (1 machine behind this gateway, 1 live grant)"),
        "{r}"
    );
    assert!(
        !b.tcp_open(win.v4_at(RDP)),
        "the restored table left RDP open"
    );
    assert!(!b.tcp_open(front));
    assert!(
        a.connect_within(front, OPEN_PROBE).is_some(),
        "the live grant did not survive the reboot"
    );
}

/// Drift of the gateway's table (`table inet jitgate_gw`): each change made by
/// someone else is found the moment the kernel announces it (the periodic check is
/// once an hour here), reported on the machine behind the gateway, audited, and
/// repaired by rendering the whole table again with the grants' remaining lifetimes.
/// Each attack is made while the gateway is frozen (SIGSTOP), which proves it really
/// opens the machine to someone without a grant.
#[test]
fn drift_of_the_gateway_table_is_found_repaired_and_reported_on_the_machine() {
    let (mut lab, win) = gateway_lab(json!({"mode": "routed"}));
    lab.kill_agent();
    lab.agent_args = vec!["--drift-check-secs".into(), "3600".into()];
    lab.start_agent();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let rdp = win.v4_at(RDP);
    enable_win(&lab);
    initiate(&lab, &a, RDP, "600");
    a.wait_tcp_open(rdp, Duration::from_secs(2));
    assert!(!b.tcp_open(rdp));

    let attack_then_repair = |what: &str, attack: &dyn Fn()| {
        let before = win_view(&lab)["agent"]["driftEvents"].as_u64().unwrap_or(0);
        lab.pause_agent();
        attack();
        let opened = b.tcp_open(rdp);
        lab.resume_agent();
        assert!(
            opened,
            "{what}: the attack did not open RDP: the test proves nothing"
        );
        b.wait_tcp_closed(rdp, Duration::from_secs(4));
        crate::lab::wait_for(
            &format!("drift reported on win-1 after: {what}"),
            Duration::from_secs(6),
            || {
                let v = win_view(&lab);
                v["agent"]["driftEvents"].as_u64().unwrap_or(0) > before
                    && v["agent"]["tableMatches"] == true
                    && v["agent"]["lastDrift"]["repaired"] == true
            },
        );
        a.wait_tcp_open(rdp, Duration::from_secs(2));
    };
    let b_element = format!("{{ {} . {} . tcp . {RDP} }}", b.v4, win.v4);
    attack_then_repair("a permanent element for b", &|| {
        lab.nft(&["add", "element", "inet", "jitgate_gw", "fwd4", &b_element]);
    });
    attack_then_repair("nft flush chain inet jitgate_gw forward", &|| {
        lab.nft(&["flush", "chain", "inet", "jitgate_gw", "forward"]);
    });
    attack_then_repair("nft delete table inet jitgate_gw", &|| {
        lab.nft(&["delete", "table", "inet", "jitgate_gw"]);
    });

    // A flushed grant set: a loses access and gets it back with its remaining
    // lifetime.
    lab.nft(&["flush", "set", "inet", "jitgate_gw", "hfwd4"]);
    a.wait_tcp_open(rdp, Duration::from_secs(4));
    let listing = lab.nft(&["list", "set", "inet", "jitgate_gw", "hfwd4"]);
    assert!(
        listing.contains(&a.v4.to_string()) && listing.contains("expires"),
        "the grant came back without its lifetime:\n{listing}"
    );

    // On record, on win-1 (not on the gateway's own machine, whose table is intact).
    let events = lab.admin(
        "GET",
        "/api/v1/audit?action=enforcement.drift&limit=100",
        None,
    );
    let all = serde_json::to_string(&events.body["value"]).unwrap();
    for want in [
        "in set fwd4 was added",
        "chain forward",
        "table inet jitgate_gw was deleted",
        "was removed before its end",
        WIN,
    ] {
        assert!(all.contains(want), "no drift event mentions {want}: {all}");
    }
    assert_eq!(
        lab.vm_view()["agent"]["driftEvents"].as_u64().unwrap_or(0),
        0
    );
}
