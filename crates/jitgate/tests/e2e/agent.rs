//! The agent as the controller sees it: its reports (online, applied revision, nft
//! version, listening sockets, blocked-attempt counters), the kernel's grant elements
//! and their expiry, and refused agent credentials.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::lab::{DNS, Lab, SSH, instant_of, wait_for};

fn listens(view: &Value, port: u16, protocol: &str) -> bool {
    view["agent"]["listening"].as_array().is_some_and(|l| {
        l.iter().any(|s| {
            s["port"] == port
                && s["protocol"]
                    .as_str()
                    .is_some_and(|p| p.eq_ignore_ascii_case(protocol))
        })
    })
}

fn blocked(view: &Value, port: u16) -> u64 {
    view["agent"]["counters"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c["port"] == port)
                .filter_map(|c| c["packets"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn the_agent_reports_its_state_listeners_and_blocked_attempts() {
    let lab = Lab::start();
    lab.enable_default();
    let mut view = Value::Null;
    wait_for("a complete agent report", Duration::from_secs(5), || {
        view = lab.vm_view();
        let agent = &view["agent"];
        agent["online"] == true
            && agent["upToDate"] == true
            && listens(&view, SSH, "tcp")
            && listens(&view, DNS, "udp")
    });
    let agent = &view["agent"];
    assert_eq!(agent["enrolled"], true);
    assert!(agent["error"].is_null(), "{agent}");
    let nft = agent["nftVersion"].as_str().unwrap_or_default();
    assert!(nft.contains("nftables"), "nftVersion: {agent}");
    let addresses: Vec<&str> = agent["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        addresses.contains(&format!("{}/24", lab.vm.v4).as_str()),
        "addresses: {addresses:?}"
    );
    assert_eq!(
        blocked(&view, SSH),
        0,
        "blocked attempts before any: {agent}"
    );

    for _ in 0..3 {
        assert!(!lab.b.tcp_open(lab.vm.v4_at(SSH)));
    }
    assert!(!lab.b.tcp_open(lab.vm.v6_at(SSH)));
    wait_for(
        "the blocked attempts on 22 in a report",
        Duration::from_secs(5),
        || {
            view = lab.vm_view();
            blocked(&view, SSH) >= 4
        },
    );
    let counter = view["agent"]["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["port"] == SSH)
        .unwrap();
    assert_eq!(counter["protocol"], "TCP", "{counter}");
    assert!(
        counter["rule"].as_str().is_some_and(|r| !r.is_empty()),
        "{counter}"
    );
    assert_eq!(blocked(&view, DNS), 0, "nothing was sent to 5353: {view}");
}

/// A grant as requested: source range, protocol, port, end.
struct Want {
    lo: u128,
    hi: u128,
    v6: bool,
    proto: &'static str,
    port: u16,
    end: Instant,
}

/// (first, last, is IPv6) of an address or prefix.
fn range(addr: &str, len: Option<u32>) -> (u128, u128, bool) {
    let ip: IpAddr = addr.parse().unwrap();
    let (v, bits, v6) = match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32, false),
        IpAddr::V6(a) => (u128::from(a), 128, true),
    };
    let len = len.unwrap_or(bits);
    let host_bits = bits - len;
    let mask = if host_bits == 0 {
        0
    } else {
        (1u128 << host_bits) - 1
    };
    (v & !mask, v | mask, v6)
}

fn source_range(s: &str) -> (u128, u128, bool) {
    match s.split_once('/') {
        Some((a, l)) => range(a, Some(l.parse().unwrap())),
        None => range(s, None),
    }
}

/// Parses nft's text durations such as `1m58s776ms` or `2h`.
pub(crate) fn nft_ms(s: &str) -> u64 {
    let mut total = 0u64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().unwrap_or_else(|_| panic!("bad duration {s}"));
        num.clear();
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            1
        } else {
            match c {
                'd' => 86_400_000,
                'h' => 3_600_000,
                'm' => 60_000,
                's' => 1000,
                other => panic!("unit {other} in {s}"),
            }
        };
        total += n * unit;
    }
    assert!(num.is_empty(), "bad duration {s}");
    total
}

/// One grant-set element as nft lists it.
struct Elem {
    key: String,
    lo: u128,
    hi: u128,
    v6: bool,
    proto: String,
    plo: u64,
    phi: u64,
    timeout_ms: Option<u64>,
    expires_ms: Option<u64>,
}

/// Elements from `nft -j list set` (times in whole seconds).
fn json_elements(listing: &str) -> Vec<Elem> {
    let v: Value = serde_json::from_str(listing).unwrap();
    let mut out = Vec::new();
    for item in v["nftables"].as_array().unwrap() {
        for e in item["set"]["elem"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let e = &e["elem"];
            let key = e["val"]["concat"]
                .as_array()
                .unwrap_or_else(|| panic!("an element without a concatenated key: {e}"));
            let (lo, hi, v6) = match &key[0] {
                Value::String(a) => range(a, None),
                p => range(
                    p["prefix"]["addr"].as_str().unwrap(),
                    Some(p["prefix"]["len"].as_u64().unwrap() as u32),
                ),
            };
            let (plo, phi) = match &key[2] {
                Value::Number(n) => (n.as_u64().unwrap(), n.as_u64().unwrap()),
                r => (
                    r["range"][0].as_u64().unwrap(),
                    r["range"][1].as_u64().unwrap(),
                ),
            };
            out.push(Elem {
                key: e["val"].to_string(),
                lo,
                hi,
                v6,
                proto: key[1].as_str().unwrap().to_owned(),
                plo,
                phi,
                timeout_ms: e["timeout"].as_u64().map(|s| s * 1000),
                expires_ms: e["expires"].as_u64().map(|s| s * 1000),
            });
        }
    }
    out
}

/// Elements from `nft list set` (times in milliseconds), e.g.
/// `10.1.3.0/24 . udp . 5353 timeout 2m expires 1m58s776ms`.
fn text_elements(listing: &str) -> Vec<Elem> {
    let Some((_, rest)) = listing.split_once("elements = {") else {
        return Vec::new();
    };
    let body = rest.split('}').next().unwrap();
    body.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let t: Vec<&str> = e.split_whitespace().collect();
            assert!(t.len() >= 5 && t[1] == "." && t[3] == ".", "element '{e}'");
            let (lo, hi, v6) = source_range(t[0]);
            let (plo, phi) = match t[4].split_once('-') {
                Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                None => (t[4].parse().unwrap(), t[4].parse().unwrap()),
            };
            let after = |word: &str| t.iter().position(|x| *x == word).map(|i| nft_ms(t[i + 1]));
            Elem {
                key: e.to_owned(),
                lo,
                hi,
                v6,
                proto: t[2].to_owned(),
                plo,
                phi,
                timeout_ms: after("timeout"),
                expires_ms: after("expires"),
            }
        })
        .collect()
}

#[test]
fn every_grant_element_in_the_kernel_expires_no_later_than_its_end() {
    let lab = Lab::start();
    lab.enable_default();
    let (a, b) = (&lab.a, &lab.b);
    let net24 = format!("10.77.{}.0/28", lab.vm.v4.octets()[2]);
    let v6net = format!("{}/124", {
        let mut o = lab.a.v6.octets();
        o[15] &= 0xf0;
        std::net::Ipv6Addr::from(o)
    });
    let reqs = [
        (a, json!({"number": SSH, "duration": "PT1M"}), "tcp"),
        (
            a,
            json!({"number": SSH, "allowedSourceAddressPrefix": a.v6.to_string(), "duration": "PT2M"}),
            "tcp",
        ),
        (a, json!({"number": DNS, "duration": "PT30M"}), "udp"),
        (b, json!({"number": SSH, "duration": "PT10M"}), "tcp"),
        // Overlaps A's UDP grant (the planner must merge or split) and ends later.
        (
            a,
            json!({"number": DNS, "allowedSourceAddressPrefix": net24, "duration": "PT45M"}),
            "udp",
        ),
        (
            b,
            json!({"number": DNS, "allowedSourceAddressPrefix": v6net, "duration": "PT7M"}),
            "udp",
        ),
    ];
    let mut wants = Vec::new();
    for (from, port, proto) in reqs {
        let g = lab.initiate(from, json!([port]));
        let p = &g.body["virtualMachines"][0]["ports"][0];
        let (lo, hi, v6) = source_range(p["allowedSourceAddressPrefix"].as_str().unwrap());
        wants.push(Want {
            lo,
            hi,
            v6,
            proto,
            port: p["number"].as_u64().unwrap() as u16,
            end: instant_of(p["endTimeUtc"].as_str().unwrap()),
        });
    }
    lab.wait_agent_up_to_date();
    // B's grant works too: the table is live.
    b.wait_tcp_open(lab.vm.v4_at(SSH), Duration::from_secs(2));

    let mut seen = 0;
    for set in ["hosts4", "nets4", "hosts6", "nets6"] {
        // JSON (whole seconds, rounded down), then text (milliseconds).
        let json_text = lab.nft(&["-j", "list", "set", "inet", "jitgate", set]);
        let json_at = Instant::now();
        let text = lab.nft(&["list", "set", "inet", "jitgate", set]);
        let text_at = Instant::now();
        let from_json = json_elements(&json_text);
        let from_text = text_elements(&text);
        assert!(!from_json.is_empty(), "{set} is empty: {json_text}");
        assert_eq!(from_json.len(), from_text.len(), "{json_text}\n{text}");
        for (elems, read_at, listing) in [
            (from_json, json_at, &json_text),
            (from_text, text_at, &text),
        ] {
            for e in elems {
                // The grants this element could stand for (single addresses in the
                // host sets, prefixes in the others); it must end no later than the
                // last of them.
                let latest = wants
                    .iter()
                    .filter(|w| {
                        (w.lo == w.hi) == set.starts_with("hosts")
                            && w.v6 == e.v6
                            && w.proto == e.proto
                            && u64::from(w.port) >= e.plo
                            && u64::from(w.port) <= e.phi
                            && w.lo <= e.hi
                            && e.lo <= w.hi
                    })
                    .map(|w| w.end)
                    .max()
                    .unwrap_or_else(|| {
                        panic!("{set}: element {} matches no grant:\n{listing}", e.key)
                    });
                let left = latest.saturating_duration_since(read_at).as_millis() as u64;
                assert!(
                    e.timeout_ms.is_some(),
                    "{set}: {} has no timeout:\n{listing}",
                    e.key
                );
                let expires = e.expires_ms.unwrap_or_else(|| {
                    panic!(
                        "{set}: element {} has no expiry (permanent access):\n{listing}",
                        e.key
                    )
                });
                assert!(
                    expires <= left + 50,
                    "{set}: element {} expires in {expires} ms, its grant ends in {left} ms:\n{listing}",
                    e.key
                );
                assert!(
                    expires + 5000 >= left,
                    "{set}: element {} expires in {expires} ms, long before its grant ({left} ms):\n{listing}",
                    e.key
                );
                seen += 1;
            }
        }
    }
    assert!(
        seen >= 10,
        "only {seen} element checks for {} grants",
        wants.len()
    );
}

fn desired(lab: &Lab, vm: &str, token: &str) -> crate::lab::Resp {
    lab.call(
        &lab.vm,
        "GET",
        &format!("/api/v1/agent/desired?vm={vm}&wait=0"),
        Some(token),
        None,
    )
}

#[test]
fn revoked_and_foreign_agent_credentials_are_refused_and_audited() {
    let mut lab = Lab::start();
    lab.enable_default();
    let creds: Value = serde_json::from_slice(
        &std::fs::read(lab.agent_state_dir().join("credentials.json")).unwrap(),
    )
    .unwrap();
    let token = creds["token"].as_str().unwrap().to_owned();
    let vm_id = creds["vmId"].as_str().unwrap().to_owned();
    assert!(vm_id.eq_ignore_ascii_case(&lab.vm_id()), "{creds}");
    let r = desired(&lab, &vm_id, &token);
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Another VM: 403, even though it exists.
    let r = lab.admin(
        "POST",
        "/api/v1/vms",
        Some(json!({"resourceGroup": "lab", "name": "vm2"})),
    );
    assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
    let vm2 = vm_id.replace("/vm1", "/vm2");
    let r = desired(&lab, &vm2, &token);
    assert_eq!(r.status, 403, "another VM's desired state: {:?}", r.body);
    assert_eq!(
        r.body["error"]["code"], "AuthorizationFailed",
        "{:?}",
        r.body
    );
    let r = lab.call(
        &lab.vm,
        "POST",
        &format!("/api/v1/agent/status?vm={vm2}"),
        Some(&token),
        Some(json!({})),
    );
    assert_eq!(r.status, 403, "a report for another VM: {:?}", r.body);
    // Nor may it act as a person.
    let r = lab.call(&lab.vm, "GET", "/api/v1/tokens", Some(&token), None);
    assert_eq!(r.status, 403, "{:?}", r.body);

    // Revoke the agent's credential: 401 from then on.
    let tokens = lab.admin("GET", "/api/v1/tokens", None);
    let principal = format!("agent:{vm_id}");
    let t = tokens.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| {
            t["principal"]
                .as_str()
                .is_some_and(|p| p.eq_ignore_ascii_case(&principal))
        })
        .unwrap_or_else(|| panic!("no token for {principal}: {:?}", tokens.body));
    let r = lab.admin(
        "DELETE",
        &format!("/api/v1/tokens/{}", t["id"].as_str().unwrap()),
        None,
    );
    assert!(r.status == 200 || r.status == 204, "{:?}", r.body);
    let r = desired(&lab, &vm_id, &token);
    assert_eq!(r.status, 401, "a revoked agent credential: {:?}", r.body);
    assert_eq!(
        r.body["error"]["code"], "AgentCredentialRevoked",
        "{:?}",
        r.body
    );
    // The running agent is told at its next poll and stops for good (exit 78, which
    // its systemd unit does not restart), leaving the table in place.
    let mut agent = lab.agent.take().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(70);
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not stop after its credential was revoked:\n{}",
            lab.log_tail("agent")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(78), "{}", lab.log_tail("agent"));
    let r = desired(&lab, &vm_id, "jg_notatoken.nosecret");
    assert_eq!(r.status, 401, "a made-up credential: {:?}", r.body);

    // Both refusals are in the audit log.
    let audit = |action: &str| -> Vec<Value> {
        let r = lab.admin("GET", &format!("/api/v1/audit?action={action}"), None);
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["value"].as_array().unwrap().clone()
    };
    let denied = audit("authorization.denied");
    assert!(
        denied.iter().any(|e| e["target"] == "/api/v1/agent/desired"
            && e["actor"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(&principal))
            && e["source"] == lab.vm.v4.to_string()),
        "no authorization.denied for the agent: {denied:?}"
    );
    let failed = audit("authentication.failed");
    assert!(
        failed
            .iter()
            .filter(
                |e| e["target"] == "/api/v1/agent/desired" && e["source"] == lab.vm.v4.to_string()
            )
            .count()
            >= 2,
        "no authentication.failed for the revoked credential: {failed:?}"
    );

    // The VM stays protected with its agent locked out: the kernel keeps the state.
    assert!(!lab.a.tcp_open(lab.vm.v4_at(SSH)));
    let table = lab.nft(&["list", "table", "inet", "jitgate"]);
    assert!(table.contains("JIT-Deny"), "{table}");
}
