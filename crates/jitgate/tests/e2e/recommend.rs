//! Recommendations from what real agents see (issue 5): a real listener on 22 without
//! a policy is Unhealthy, `jitgate enable --recommended` makes it Healthy, blocked
//! connection attempts are counted per VM and port (API and metrics), a VM listening
//! on no management port is Healthy, and a VM whose agent stops becomes Not
//! applicable once the configured offline time has passed.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::lab::{Host, Lab, OWNER, RG, Ran, SSH, VM, WEB, wait_for};

/// GET /api/v1/recommendations (optionally with a query), as the Owner.
fn recommendations(lab: &Lab, query: &str) -> Value {
    let r = lab.admin("GET", &format!("/api/v1/recommendations{query}"), None);
    assert_eq!(r.status, 200, "GET recommendations: {:?}", r.body);
    r.body
}

/// The recommendation of machine `name` in the lab's resource group.
fn recommendation_of(all: &Value, name: &str) -> Value {
    all["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resourceGroup"] == RG && r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no recommendation for {RG}/{name}: {all}"))
}

/// Polls until vm1's verdict is `verdict` (agents report every second); returns it.
fn wait_verdict(lab: &Lab, verdict: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let last = recommendation_of(&recommendations(lab, ""), VM);
        if last["verdict"] == verdict {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "{VM} is not {verdict} after {within:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the agent's latest report lists a TCP listener on `port`.
fn reports_listener(lab: &Lab, port: u16) -> bool {
    lab.vm_view()["agent"]["listening"]
        .as_array()
        .is_some_and(|l| {
            l.iter().any(|s| {
                s["port"] == port
                    && s["protocol"]
                        .as_str()
                        .is_some_and(|p| p.eq_ignore_ascii_case("tcp"))
            })
        })
}

/// `jitgate recommendations` as the Owner, from the controller's host.
fn cli_recommendations(lab: &Lab) -> Ran {
    lab.jitgate(&lab.ctl, OWNER, &["recommendations"])
        .expect_ok()
}

/// The lines of one group of `jitgate recommendations` (its title line first).
fn group<'a>(out: &'a str, title: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = out.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(title))
        .unwrap_or_else(|| panic!("no group '{title}' in:\n{out}"));
    let mut g = vec![lines[start]];
    g.extend(
        lines[start + 1..]
            .iter()
            .take_while(|l| l.starts_with("  ")),
    );
    g
}

/// A group whose count is 0 and that lists no machine.
fn assert_empty_group(r: &Ran, title: &str) {
    let g = group(&r.stdout, title);
    assert!(
        g.len() == 1 && g[0].ends_with(": 0"),
        "'{title}' is not empty: {r}"
    );
}

const UNHEALTHY: &str = "Not configured (Unhealthy)";
const HEALTHY: &str = "Configured (Healthy)";
const NOT_APPLICABLE: &str = "Unsupported (Not applicable)";

/// Blocked-attempt totals for vm1's port 22 from GET /api/v1/vms/lab/vm1/blocked.
fn blocked_total(lab: &Lab, port: u16) -> u64 {
    let r = lab.admin("GET", &format!("/api/v1/vms/{RG}/{VM}/blocked"), None);
    assert_eq!(r.status, 200, "GET blocked: {:?}", r.body);
    r.body["totals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["port"] == port)
        .filter_map(|t| t["count"].as_u64())
        .sum()
}

/// `jitgate_blocked_attempts_total{...port="22"...} N` in /metrics: N.
fn metric_blocked(lab: &Lab, port: u16) -> u64 {
    let r = lab.call(&lab.ctl, "GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "GET /metrics: {:?}", r.body);
    let text = r.body.as_str().unwrap_or_default().to_owned();
    text.lines()
        .filter(|l| {
            l.starts_with("jitgate_blocked_attempts_total{")
                && l.contains(&format!("port=\"{port}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn attempts(from: &Host, lab: &Lab, n: usize) {
    for _ in 0..n {
        assert!(
            !from.tcp_open(lab.vm.v4_at(SSH)),
            "{} reached 22 without a grant",
            from.role
        );
    }
}

#[test]
fn an_exposed_ssh_port_is_unhealthy_until_enable_recommended_and_blocked_attempts_are_counted() {
    let lab = Lab::start();
    // A second machine, registered without an agent: nothing can enforce JIT there.
    let r = lab.admin(
        "POST",
        "/api/v1/vms",
        Some(json!({"resourceGroup": RG, "name": "vm2"})),
    );
    assert!(
        r.status == 200 || r.status == 201,
        "register vm2: {} {:?}",
        r.status,
        r.body
    );

    // The echo service listens on [::]:22 and no policy covers it.
    let rec = wait_verdict(&lab, "Unhealthy", Duration::from_secs(10));
    let reason = rec["reason"].as_str().unwrap();
    assert!(reason.contains("22"), "the reason does not name 22: {rec}");
    assert_eq!(rec["exposedPorts"], json!([SSH]), "{rec}");
    let all = recommendations(&lab, "");
    let vm2 = recommendation_of(&all, "vm2");
    assert_eq!(vm2["verdict"], "NotApplicable", "{vm2}");
    assert!(
        vm2["reason"].as_str().unwrap().contains("no agent"),
        "{vm2}"
    );
    assert_eq!(
        all["summary"],
        json!({"Healthy": 0, "Unhealthy": 1, "NotApplicable": 1}),
        "{all}"
    );
    let only = recommendations(&lab, "?verdict=Unhealthy");
    let names: Vec<&Value> = only["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["name"])
        .collect();
    assert_eq!(names, [&json!(VM)], "verdict filter: {only}");
    // Not protected yet: anyone connects, and nothing counts as blocked.
    assert!(lab.b.tcp_open(lab.vm.v4_at(SSH)), "22 closed before JIT");

    // The three groups, as Defender's tabs.
    let r = cli_recommendations(&lab);
    let unhealthy = group(&r.stdout, UNHEALTHY);
    assert!(unhealthy[0].ends_with(": 1"), "{r}");
    assert!(
        unhealthy
            .iter()
            .any(|l| l.contains(&format!("{RG}/{VM}")) && l.contains("22")),
        "{r}"
    );
    assert_empty_group(&r, HEALTHY);
    let na = group(&r.stdout, NOT_APPLICABLE);
    assert!(na.iter().any(|l| l.contains(&format!("{RG}/vm2"))), "{r}");
    assert!(r.stdout.contains("jitgate enable --recommended"), "{r}");

    // Enable what is recommended, in one call.
    let r = lab
        .jitgate(&lab.ctl, OWNER, &["enable", "--recommended"])
        .expect_ok();
    assert!(
        r.stdout
            .contains(&format!("JIT enabled on {RG}/{VM}: ports 22")),
        "{r}"
    );
    assert!(!r.stdout.contains("vm2"), "vm2 has no agent: {r}");
    lab.wait_agent_up_to_date();
    let rec = wait_verdict(&lab, "Healthy", Duration::from_secs(5));
    assert!(
        rec["reason"].as_str().unwrap().contains("22"),
        "the reason does not name 22: {rec}"
    );
    let view = lab.vm_view();
    let policy = view["policy"]
        .as_str()
        .unwrap_or_else(|| panic!("no policy on vm1: {view}"));
    let p = lab.admin("GET", &format!("{policy}?api-version=2020-01-01"), None);
    assert_eq!(p.status, 200, "GET policy: {:?}", p.body);
    let vms = p.body["properties"]["virtualMachines"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{}", p.body);
    assert!(
        vms[0]["id"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(&lab.vm_id()),
        "{}",
        p.body
    );
    let ports = vms[0]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "{}", p.body);
    assert_eq!(ports[0]["number"], SSH, "{}", p.body);
    assert_eq!(ports[0]["protocol"], "TCP", "{}", p.body);
    assert_eq!(ports[0]["maxRequestAccessDuration"], "PT3H", "{}", p.body);
    let audit = lab.admin("GET", "/api/v1/audit?action=recommendations.apply", None);
    assert_eq!(audit.status, 200, "GET audit: {:?}", audit.body);
    let events = audit.body["value"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{}", audit.body);
    assert_eq!(events[0]["actor"], audit_actor(&lab), "{}", audit.body);
    assert!(
        events[0]["details"].to_string().contains(VM),
        "the audit event does not name vm1: {}",
        audit.body
    );
    let r = cli_recommendations(&lab);
    let healthy = group(&r.stdout, HEALTHY);
    assert!(
        healthy.iter().any(|l| l.contains(&format!("{RG}/{VM}"))),
        "{r}"
    );
    assert_empty_group(&r, UNHEALTHY);

    // Attempts on attack: B knocks on 22 before any grant; the agent's next reports
    // carry the dropped SYNs, kept per VM and port and exported as a metric.
    assert_eq!(blocked_total(&lab, SSH), 0, "blocked attempts before any");
    attempts(&lab.b, &lab, 3);
    wait_for(
        "blocked attempts on 22 in GET .../blocked",
        Duration::from_secs(5),
        || blocked_total(&lab, SSH) >= 3,
    );
    assert!(
        metric_blocked(&lab, SSH) >= 3,
        "jitgate_blocked_attempts_total for port 22 in /metrics"
    );
    assert_eq!(blocked_total(&lab, WEB), 0, "8080 is not protected");
}

/// Who the bootstrap Owner token belongs to.
fn audit_actor(lab: &Lab) -> Value {
    lab.admin("GET", "/api/v1/whoami", None).body["principal"].clone()
}

#[test]
fn a_vm_without_management_listeners_is_healthy_and_a_stopped_agent_makes_it_not_applicable() {
    let mut lab = Lab::builder()
        .without_echo_on_ssh()
        .serve_args(&["--agent-offline-after", "3"])
        .start();
    // Only 8080 (TCP) and 5353 (UDP) listen: once the agent has said so, the VM needs
    // no JIT.
    wait_for(
        "the agent to report its listener on 8080",
        Duration::from_secs(5),
        || reports_listener(&lab, WEB),
    );
    assert!(!reports_listener(&lab, SSH), "something listens on 22");
    let rec = wait_verdict(&lab, "Healthy", Duration::from_secs(5));
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("no management port is listening"),
        "{rec}"
    );
    assert_eq!(rec["exposedPorts"], json!([]), "{rec}");

    // The agent dies: after 3 s without a report the VM cannot be protected.
    lab.kill_agent();
    let killed = Instant::now();
    let rec = wait_verdict(&lab, "NotApplicable", Duration::from_secs(10));
    let silent = killed.elapsed();
    assert!(
        rec["reason"].as_str().unwrap().contains("offline"),
        "the reason does not say the agent is offline: {rec}"
    );
    // The last report came at most a heartbeat (1 s) before the kill.
    assert!(
        silent >= Duration::from_millis(1500),
        "NotApplicable {silent:?} after the kill, before the 3 s offline time"
    );
    let r = cli_recommendations(&lab);
    let na = group(&r.stdout, NOT_APPLICABLE);
    assert!(na[0].ends_with(": 1"), "{r}");
    assert!(
        na.iter()
            .any(|l| l.contains(&format!("{RG}/{VM}")) && l.contains("offline")),
        "{r}"
    );
    assert_empty_group(&r, HEALTHY);

    // Back online: Healthy again.
    lab.start_agent();
    lab.wait_agent_up_to_date();
    wait_verdict(&lab, "Healthy", Duration::from_secs(5));
}
