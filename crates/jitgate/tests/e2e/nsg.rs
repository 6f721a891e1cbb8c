//! The NSG in the kernel: deleting a policy removes its deny rule and nothing else;
//! user rules apply in priority order, above the JIT deny rule for their port.

use std::time::Duration;

use serde_json::{Value, json};

use crate::lab::{DNS, Lab, POLICY, RG, SSH, VM, WEB};

fn jit_deny_rules(rules: &[Value]) -> Vec<&Value> {
    rules.iter().filter(|r| r["origin"] == "jit-deny").collect()
}

/// The lines of `nft list table inet jitgate` that belong to user rules (by their
/// comments).
fn user_rule_lines(table: &str, names: &[&str]) -> Vec<String> {
    table
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(&format!("\"{n}"))))
        .map(|l| l.trim().to_owned())
        .collect()
}

#[test]
fn deleting_the_policy_removes_the_deny_rules_and_nothing_else() {
    let lab = Lab::start();
    let (a, b) = (&lab.a, &lab.b);
    lab.put_rule(
        "deny-a-web",
        json!({"priority": 300, "access": "Deny", "protocol": "TCP",
               "sourceAddressPrefixes": [format!("{}/32", a.v4)], "destinationPortRanges": [WEB.to_string()]}),
    );
    lab.enable_default();
    assert_eq!(jit_deny_rules(&lab.nsg()).len(), 2, "{:?}", lab.nsg());
    assert!(!a.tcp_open(lab.vm.v4_at(SSH)));
    assert!(!b.tcp_open(lab.vm.v6_at(SSH)));
    // A live grant, which the deletion revokes.
    let g = lab.initiate(a, json!([{"number": SSH, "duration": "PT5M"}]));
    a.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));
    assert!(!b.tcp_open(lab.vm.v4_at(SSH)));
    let table_with_policy = lab.nft(&["list", "table", "inet", "jitgate"]);
    assert!(
        table_with_policy.contains("JIT-Deny"),
        "{table_with_policy}"
    );
    let user_lines = user_rule_lines(&table_with_policy, &["deny-a-web"]);
    assert!(!user_lines.is_empty(), "{table_with_policy}");
    let other_before = lab.nft(&["list", "table", "ip", "e2e_other"]);

    let r = lab.admin(
        "DELETE",
        &format!("{}?api-version=2020-01-01", lab.policy_path()),
        None,
    );
    assert!(
        r.status == 200 || r.status == 204,
        "DELETE policy {POLICY}: {} {:?}",
        r.status,
        r.body
    );
    lab.wait_agent_up_to_date();

    // The protected ports answer everyone again, over IPv4 and IPv6, TCP and UDP.
    for c in [a, b] {
        c.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));
        assert!(c.tcp_open(lab.vm.v6_at(SSH)), "{} v6:22", c.role);
        assert!(c.udp_echo(lab.vm.v4_at(DNS)), "{} udp", c.role);
    }
    // The user's rule still holds: A stays blocked on 8080, B is not.
    assert!(
        !a.tcp_open(lab.vm.v4_at(WEB)),
        "the user's deny rule is gone"
    );
    assert!(b.tcp_open(lab.vm.v4_at(WEB)));

    let r = lab.admin("GET", &format!("/api/v1/requests/{}", g.id), None);
    assert_eq!(
        r.body["virtualMachines"][0]["ports"][0]["status"], "Revoked",
        "{:?}",
        r.body
    );

    // The NSG keeps the user rule only.
    let rules = lab.nsg();
    assert!(jit_deny_rules(&rules).is_empty(), "{rules:?}");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["name"], "deny-a-web");
    assert_eq!(rules[0]["priority"], 300);

    // In the kernel: the table is still there with the same user rule; no deny rule.
    let table = lab.nft(&["list", "table", "inet", "jitgate"]);
    assert!(!table.contains("JIT-Deny"), "{table}");
    assert!(
        !table.contains("elements"),
        "a revoked grant is left: {table}"
    );
    assert_eq!(
        user_rule_lines(&table, &["deny-a-web"]),
        user_lines,
        "the user rule changed:\n{table}"
    );
    // jitgate never made or touched another table.
    let mut tables: Vec<String> = lab
        .nft(&["list", "tables"])
        .lines()
        .map(str::to_owned)
        .collect();
    tables.sort();
    let mut want: Vec<String> = lab.tables_before.lines().map(str::to_owned).collect();
    want.push("table inet jitgate".to_owned());
    want.sort();
    assert_eq!(tables, want);
    assert_eq!(
        lab.nft(&["list", "table", "ip", "e2e_other"]),
        other_before,
        "another table was changed"
    );
}

#[test]
fn user_rules_apply_in_priority_order_above_the_jit_deny_rule() {
    let lab = Lab::start();
    let (a, b) = (&lab.a, &lab.b);
    let web = WEB.to_string();
    // Rules that exist before JIT is enabled keep priority over its deny rule.
    lab.put_rule(
        "allow-b-ssh",
        json!({"priority": 200, "access": "Allow", "protocol": "TCP",
               "sourceAddressPrefixes": [format!("{}/32", b.v4)], "destinationPortRanges": ["22"]}),
    );
    lab.put_rule(
        "deny-a-web",
        json!({"priority": 150, "access": "Deny", "protocol": "TCP",
               "sourceAddressPrefixes": [format!("{}/32", a.v4)], "destinationPortRanges": [web]}),
    );
    // Lower precedence than the deny above: must not let A in.
    lab.put_rule(
        "allow-a-web",
        json!({"priority": 160, "access": "Allow", "protocol": "*",
               "sourceAddressPrefixes": [format!("{}/32", a.v4)], "destinationPortRanges": [web]}),
    );
    lab.enable_default();

    let rules = lab.nsg();
    let deny22 = rules
        .iter()
        .find(|r| {
            r["origin"] == "jit-deny"
                && r["destinationPortRanges"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p == "22"))
        })
        .unwrap_or_else(|| panic!("no JIT deny rule for 22: {rules:?}"));
    let prio = deny22["priority"].as_i64().unwrap();
    assert!(
        prio > 200,
        "the JIT deny rule for 22 (priority {prio}) must come after the existing allow-b-ssh (200): {rules:?}"
    );

    // B gets in through its user rule, without a grant; only over IPv4 (its /32).
    b.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));
    b.connect(lab.vm.v4_at(SSH));
    assert!(!b.tcp_open(lab.vm.v6_at(SSH)), "B's v4 rule opened v6");
    assert!(
        !a.tcp_open(lab.vm.v4_at(SSH)),
        "A reached 22 without a grant"
    );
    assert!(!a.tcp_open(lab.vm.v6_at(SSH)));
    // 8080: the Deny at 150 beats the Allow at 160 for A; B is not affected.
    assert!(
        !a.tcp_open(lab.vm.v4_at(WEB)),
        "A reached 8080 past a Deny at 150"
    );
    assert!(a.tcp_open(lab.vm.v6_at(WEB)), "A's v4 deny blocked v6");
    assert!(b.tcp_open(lab.vm.v4_at(WEB)));

    // Changing priorities reorders: the Allow at 140 now comes first.
    lab.put_rule(
        "allow-a-web",
        json!({"priority": 140, "access": "Allow", "protocol": "*",
               "sourceAddressPrefixes": [format!("{}/32", a.v4)], "destinationPortRanges": [WEB.to_string()]}),
    );
    lab.wait_agent_up_to_date();
    a.wait_tcp_open(lab.vm.v4_at(WEB), Duration::from_secs(2));
    // And removing B's rule closes 22 for B again.
    let r = lab.admin(
        "DELETE",
        &format!("/api/v1/vms/{RG}/{VM}/nsg/rules/allow-b-ssh"),
        None,
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    b.wait_tcp_closed(lab.vm.v4_at(SSH), Duration::from_secs(2));
}
