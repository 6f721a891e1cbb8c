//! Faults: grants end in the kernel with the controller and the agent dead; an agent
//! restart keeps a live grant and its end time.

use std::time::Duration;

use serde_json::json;

use crate::lab::{Lab, OPEN_PROBE, SSH, sleep_until};

#[test]
fn grants_end_on_time_with_controller_and_agent_killed_and_survive_an_agent_restart() {
    let mut lab = Lab::start();
    lab.enable_default();
    let a = lab.a.clone();
    let ssh4 = lab.vm.v4_at(SSH);

    // 1. kill -9 of both during a live grant.
    let g = lab.initiate(&a, json!([{"number": SSH, "duration": "PT6S"}]));
    a.wait_tcp_open(ssh4, Duration::from_secs(2));
    lab.kill_controller();
    lab.kill_agent();
    sleep_until(g.end() - Duration::from_millis(1500));
    assert!(
        a.connect_within(ssh4, OPEN_PROBE).is_some(),
        "the grant closed more than 1.5 s early with controller and agent dead"
    );
    sleep_until(g.end() + Duration::from_millis(250));
    assert!(
        !a.tcp_open(ssh4),
        "the port was still open 250 ms after the end time ({}) with controller and agent dead",
        g.end_times[0]
    );
    assert!(!lab.b.tcp_open(ssh4));

    // Both come back (the agent from its state directory) and things work again.
    lab.start_controller();
    lab.start_agent();
    lab.wait_agent_up_to_date();
    assert!(!a.tcp_open(ssh4), "the expired grant came back");

    // 2. restart of the agent alone during a live grant.
    let g = lab.initiate(&a, json!([{"number": SSH, "duration": "PT8S"}]));
    a.wait_tcp_open(ssh4, Duration::from_secs(2));
    lab.stop_agent();
    assert!(
        a.connect_within(ssh4, OPEN_PROBE).is_some(),
        "stopping the agent closed a live grant"
    );
    lab.start_agent();
    lab.wait_agent_up_to_date();
    assert!(
        a.connect_within(ssh4, OPEN_PROBE).is_some(),
        "the restarted agent dropped a live grant"
    );
    assert!(!lab.b.tcp_open(ssh4));
    // Also a kill -9 and start without a pause: the table is rebuilt with the grant.
    lab.kill_agent();
    lab.start_agent();
    lab.wait_agent_up_to_date();
    assert!(
        a.connect_within(ssh4, OPEN_PROBE).is_some(),
        "the restarted agent dropped a live grant"
    );
    sleep_until(g.end() - Duration::from_millis(1500));
    assert!(
        a.connect_within(ssh4, OPEN_PROBE).is_some(),
        "after the agent restarts the grant closed more than 1.5 s early"
    );
    sleep_until(g.end() + Duration::from_millis(250));
    assert!(
        !a.tcp_open(ssh4),
        "after the agent restarts the port was still open 250 ms after the end time ({})",
        g.end_times[0]
    );
}
