//! Grants with real connections: closed before, open for the requester only, closed
//! after the end time (established connections survive), early revoke.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::lab::{DNS, Lab, SSH, WEB, echo, sleep_until};

#[test]
fn before_any_grant_protected_ports_are_closed_and_others_open() {
    let lab = Lab::start();
    // Without a policy the services answer everyone: what follows is jitgate's doing.
    for c in [&lab.a, &lab.b] {
        assert!(c.tcp_open(lab.vm.v4_at(SSH)), "{} v4:22 before JIT", c.role);
        assert!(c.tcp_open(lab.vm.v6_at(SSH)), "{} v6:22 before JIT", c.role);
        assert!(c.udp_echo(lab.vm.v4_at(DNS)), "{} udp before JIT", c.role);
    }
    lab.enable_default();
    for c in [&lab.a, &lab.b] {
        assert!(!c.tcp_open(lab.vm.v4_at(SSH)), "{} reached v4:22", c.role);
        assert!(!c.tcp_open(lab.vm.v6_at(SSH)), "{} reached v6:22", c.role);
        assert!(
            !c.udp_echo(lab.vm.v4_at(DNS)),
            "{} got a v4 UDP echo",
            c.role
        );
        assert!(
            !c.udp_echo(lab.vm.v6_at(DNS)),
            "{} got a v6 UDP echo",
            c.role
        );
        // The unprotected port stays the host's business.
        assert!(c.tcp_open(lab.vm.v4_at(WEB)), "{} lost v4:8080", c.role);
        assert!(c.tcp_open(lab.vm.v6_at(WEB)), "{} lost v6:8080", c.role);
    }
    // The machine talking to itself is not the network: `ssh localhost` and local
    // monitoring keep working (issue 9.4), over IPv4 and IPv6 loopback.
    for lo in ["127.0.0.1:22", "[::1]:22"] {
        let lo: std::net::SocketAddr = lo.parse().unwrap();
        assert!(lab.vm.tcp_open(lo), "the VM cannot reach itself on {lo}");
    }
}

#[test]
fn a_grant_opens_for_the_requester_only_over_ipv4_ipv6_and_udp() {
    let lab = Lab::start();
    lab.enable_default();
    let (a, b) = (&lab.a, &lab.b);

    // "My IP": no source given, called from A's namespace.
    let g = lab.initiate(a, json!([{"number": SSH, "duration": "PT5M"}]));
    assert_eq!(
        g.body["virtualMachines"][0]["ports"][0]["allowedSourceAddressPrefix"],
        a.v4.to_string(),
        "my IP should be A's address: {}",
        g.body
    );
    a.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));
    let mut conn = a.connect(lab.vm.v4_at(SSH));
    assert_eq!(echo(&mut conn, b"ssh?\n"), b"ssh?\n");
    assert!(
        !b.tcp_open(lab.vm.v4_at(SSH)),
        "B reached v4:22 on A's grant"
    );
    assert!(
        !b.tcp_open(lab.vm.v6_at(SSH)),
        "B reached v6:22 on A's grant"
    );
    assert!(
        !a.tcp_open(lab.vm.v6_at(SSH)),
        "A's IPv4 grant opened IPv6 as well"
    );

    // IPv6, explicit source.
    lab.initiate(
        a,
        json!([{"number": SSH, "allowedSourceAddressPrefix": a.v6.to_string(), "duration": "PT5M"}]),
    );
    a.wait_tcp_open(lab.vm.v6_at(SSH), Duration::from_secs(2));
    a.connect(lab.vm.v6_at(SSH));
    assert!(
        !b.tcp_open(lab.vm.v6_at(SSH)),
        "B reached v6:22 on A's grant"
    );
    assert!(
        !b.tcp_open(lab.vm.v4_at(SSH)),
        "B reached v4:22 on A's grant"
    );

    // UDP.
    assert!(!a.udp_echo(lab.vm.v4_at(DNS)), "UDP open before its grant");
    lab.initiate(a, json!([{"number": DNS, "duration": "PT5M"}]));
    crate::lab::wait_for("A's UDP echo", Duration::from_secs(2), || {
        a.udp_echo(lab.vm.v4_at(DNS))
    });
    assert!(
        !b.udp_echo(lab.vm.v4_at(DNS)),
        "B got a UDP echo on A's grant"
    );
    assert!(
        !b.udp_echo(lab.vm.v6_at(DNS)),
        "B got a UDP echo on A's grant"
    );
    // A's TCP grants are untouched by the UDP one, and the first connection lives on.
    assert!(a.tcp_open(lab.vm.v4_at(SSH)));
    assert_eq!(echo(&mut conn, b"still\n"), b"still\n");
}

#[test]
fn at_the_end_time_new_connections_fail_and_established_ones_continue() {
    let lab = Lab::start();
    lab.enable_default();
    let a = &lab.a;
    let g = lab.initiate(a, json!([{"number": SSH, "duration": "PT3S"}]));
    a.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));
    let mut conn = a.connect(lab.vm.v4_at(SSH));
    assert_eq!(echo(&mut conn, b"before the end\n"), b"before the end\n");
    assert!(
        Instant::now() < g.end(),
        "the 3 s grant ended before the test could use it"
    );

    sleep_until(g.end() + Duration::from_millis(250));
    assert!(
        !a.tcp_open(lab.vm.v4_at(SSH)),
        "a new connection succeeded 250 ms after the end time ({})",
        g.end_times[0]
    );
    assert_eq!(
        echo(&mut conn, b"after the end\n"),
        b"after the end\n",
        "the connection opened before the end was cut"
    );
    // And it stays closed once the controller has recorded the expiry.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!a.tcp_open(lab.vm.v4_at(SSH)));
    assert_eq!(echo(&mut conn, b"later\n"), b"later\n");
}

#[test]
fn an_early_revoke_closes_the_port_at_once() {
    let lab = Lab::start();
    lab.enable_default();
    let a = &lab.a;
    let g = lab.initiate(a, json!([{"number": SSH, "duration": "PT5M"}]));
    a.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));

    let r = lab.call(
        a,
        "POST",
        &format!("/api/v1/requests/{}/revoke", g.id),
        Some(crate::lab::OWNER),
        Some(json!({})),
    );
    assert_eq!(r.status, 200, "revoke: {:?}", r.body);
    a.wait_tcp_closed(lab.vm.v4_at(SSH), Duration::from_secs(1));
    assert!(!a.tcp_open(lab.vm.v4_at(SSH)));

    let r = lab.admin("GET", &format!("/api/v1/requests/{}", g.id), None);
    assert_eq!(r.status, 200);
    let port = &r.body["virtualMachines"][0]["ports"][0];
    assert_eq!(port["status"], "Revoked", "{}", r.body);
    assert_eq!(port["statusReason"], "UserRequested", "{}", r.body);
}

/// Issue 13: a port an approval rule covers stays closed while it waits; the approval
/// opens it (through the same agent path as an initiate, whose latency the bench
/// measures); a denied request never opens.
#[test]
fn a_pending_request_opens_only_when_approved_and_a_denied_one_never() {
    let lab = Lab::start();
    lab.enable_default();
    let a = &lab.a;
    let vm = lab.vm_id();
    let sub_scope = vm.split("/resourceGroups/").next().unwrap().to_owned();
    let r = lab.admin(
        "PUT",
        "/api/v1/approvalRules/ssh",
        Some(json!({"scope": sub_scope, "ports": [SSH], "justificationPattern": "^e2e"})),
    );
    assert_eq!(r.status, 201, "rule: {:?}", r.body);
    let t = lab.admin(
        "POST",
        "/api/v1/tokens",
        Some(json!({"principal": "approver"})),
    );
    assert_eq!(t.status, 201, "{:?}", t.body);
    let approver = t.body["token"].as_str().unwrap().to_owned();
    let r = lab.admin(
        "POST",
        "/api/v1/roleAssignments",
        Some(json!({"principal": "approver", "role": "JIT Approver", "scope": sub_scope})),
    );
    assert_eq!(r.status, 201, "{:?}", r.body);

    let g = lab.initiate(a, json!([{"number": SSH, "duration": "PT5M"}]));
    assert_eq!(
        g.body["virtualMachines"][0]["ports"][0]["status"],
        "Pending"
    );
    lab.wait_agent_up_to_date();
    assert!(!a.tcp_open(lab.vm.v4_at(SSH)), "a pending port is closed");

    let r = lab.call(
        a,
        "POST",
        &format!("/api/v1/requests/{}/approve", g.id),
        Some(&approver),
        Some(json!({"reason": "e2e"})),
    );
    assert_eq!(r.status, 200, "approve: {:?}", r.body);
    assert_eq!(r.body["outcome"], "approved");
    a.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));

    // Revoked, then asked again and denied: it never opens.
    let r = lab.call(
        a,
        "POST",
        &format!("/api/v1/requests/{}/revoke", g.id),
        Some(crate::lab::OWNER),
        Some(json!({})),
    );
    assert_eq!(r.status, 200, "revoke: {:?}", r.body);
    a.wait_tcp_closed(lab.vm.v4_at(SSH), Duration::from_secs(1));
    let g2 = lab.initiate(a, json!([{"number": SSH, "duration": "PT5M"}]));
    let r = lab.call(
        a,
        "POST",
        &format!("/api/v1/requests/{}/deny", g2.id),
        Some(&approver),
        Some(json!({"reason": "not now"})),
    );
    assert_eq!(r.status, 200, "deny: {:?}", r.body);
    assert_eq!(r.body["outcome"], "denied");
    lab.wait_agent_up_to_date();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!a.tcp_open(lab.vm.v4_at(SSH)), "a denied port stays closed");
}
