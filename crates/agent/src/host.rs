//! What the agent reports about its host: listening sockets (with process names when
//! readable), addresses, hostname, OS.

use std::collections::HashMap;
use std::path::Path;

use jitgate_core::procnet::{Family, ProcNetFile};
use jitgate_proto::WireListener;

/// Listening TCP sockets and bound UDP sockets, from `<proc>/net/{tcp,tcp6,udp,udp6}`.
pub fn listeners(proc_root: &Path) -> Vec<WireListener> {
    let names = socket_owners(proc_root);
    let mut out = Vec::new();
    for file in ProcNetFile::ALL {
        let name = file.path().rsplit('/').next().unwrap_or_default();
        let Ok(text) = std::fs::read_to_string(proc_root.join("net").join(name)) else {
            continue;
        };
        let Ok(parsed) = jitgate_core::procnet::parse(file, &text) else {
            continue;
        };
        for l in parsed {
            out.push(WireListener {
                protocol: l.proto.as_str().to_owned(),
                family: match l.family {
                    Family::V4 => "IPv4".to_owned(),
                    Family::V6 => "IPv6".to_owned(),
                },
                address: l.addr.to_string(),
                port: l.port,
                process: names.get(&l.inode).cloned(),
            });
        }
    }
    out.sort_by(|a, b| (a.port, &a.protocol, &a.address).cmp(&(b.port, &b.protocol, &b.address)));
    out.dedup();
    out
}

/// Socket inode -> process name, from `<proc>/<pid>/fd/*` links (`socket:[inode]`).
/// Processes whose descriptors cannot be read are skipped.
fn socket_owners(proc_root: &Path) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return out;
    };
    for e in entries.flatten() {
        let pid = e.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let base = proc_root.join(pid);
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            continue;
        };
        let comm = std::fs::read_to_string(base.join("comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default();
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
            {
                out.entry(inode).or_insert_with(|| comm.clone());
            }
        }
    }
    out
}

pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
}

/// `PRETTY_NAME` from /etc/os-release.
pub fn os_name() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
}

/// The host's addresses (`ip -j addr`), loopback excluded.
pub fn addresses() -> Vec<String> {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-j", "addr", "show"])
        .output()
    else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    for link in v.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        if link["ifname"] == "lo" {
            continue;
        }
        for a in link["addr_info"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                addrs.push(format!("{ip}/{len}"));
            }
        }
    }
    addrs
}
