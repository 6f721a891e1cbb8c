// A throwaway network namespace with nftables, for the kernel tests of `jitgate-core`
// and `jitgate-agent` (included by both with `include!`). It needs root, `nft`
// (nftables) and `ip` (iproute2), and fails (never skips) without them.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use jitgate_core::nft::L4;

fn preflight() {
    let install = "install nftables and iproute2 (apt-get install nftables iproute2) and run \
                   this test as root: it applies rules with real nft in a network namespace";
    for (tool, arg) in [("nft", "--version"), ("ip", "-V")] {
        match Command::new(tool).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("`{tool} {arg}` failed ({}): {install}", o.status),
            Err(e) => panic!("`{tool}` cannot be run ({e}): {install}"),
        }
    }
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    match uid {
        Ok(out) if String::from_utf8_lossy(&out).trim() == "0" => {}
        _ => panic!("not running as root: {install}"),
    }
}

pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Self {
        preflight();
        let name = format!("jg-{}-{}-{tag}", &env!("CARGO_CRATE_NAME")[..4], std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    /// Runs `nft -f -` with `script` on stdin.
    pub fn apply(&self, script: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn nft(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `1d2h3m4s5ms` as milliseconds.
pub fn nft_ms(s: &str) -> i64 {
    let mut total = 0;
    let mut n = 0i64;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(d) = c.to_digit(10) {
            n = n * 10 + i64::from(d);
            continue;
        }
        let unit = match c {
            'd' => 86_400_000,
            'h' => 3_600_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            's' => 1_000,
            _ => panic!("bad duration {s}"),
        };
        total += n * unit;
        n = 0;
    }
    total
}


pub fn proto(s: &str) -> L4 {
    match s {
        "tcp" => L4::Tcp,
        "udp" => L4::Udp,
        other => panic!("unexpected protocol {other}"),
    }
}

/// `nft list set` text, which has millisecond precision:
/// `(key, timeout ms, expires ms)` for every element.
pub fn held_text(ns: &Netns, set: &str) -> Vec<((IpNet, L4, u16), i64, i64)> {
    let text = ns.nft(&["list", "set", "inet", "jitgate", set]);
    let Some(start) = text.find("elements = {") else {
        return Vec::new();
    };
    let body = &text[start + "elements = {".len()..];
    let body = &body[..body.find('}').unwrap()];
    body.split(',')
        .map(|item| {
            let t: Vec<&str> = item.split_whitespace().collect();
            assert!(
                t.len() == 9 && t[5] == "timeout" && t[7] == "expires",
                "element without timeout/expires in {set}: '{}'",
                item.trim()
            );
            let net: IpNet = if t[0].contains('/') {
                t[0].parse().unwrap()
            } else {
                IpNet::from(t[0].parse::<IpAddr>().unwrap())
            };
            (
                (net, proto(t[2]), t[4].parse().unwrap()),
                nft_ms(t[6]),
                nft_ms(t[8]),
            )
        })
        .collect()
}

