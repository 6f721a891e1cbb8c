//! What the agent reports about its host: listening sockets (with process names when
//! readable), addresses, hostname, OS.

use std::collections::HashMap;
use std::path::Path;

use jitgate_core::procnet::{Family, ProcNetFile};
use jitgate_proto::WireListener;

/// What the agent found listening, and what it could not read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listeners {
    pub listening: Vec<WireListener>,
    /// One sentence per `/proc/net` file that could not be read or did not parse
    /// (`/proc/net/tcp line 3: state 'zz' is not hex: '...'`): its sockets are missing
    /// from `listening`, so what is exposed may be misreported.
    pub errors: Vec<String>,
}

/// The longest error sentence reported (a parse error quotes the line).
const MAX_ERROR_CHARS: usize = 512;

/// Listening TCP sockets and bound UDP sockets, from `<proc>/net/{tcp,tcp6,udp,udp6}`.
/// A file that cannot be read or parsed is an error in the result, never skipped
/// silently; a missing IPv6 file is not an error (IPv6 disabled at boot).
pub fn listeners(proc_root: &Path) -> Listeners {
    let names = socket_owners(proc_root);
    let mut out = Listeners::default();
    for file in ProcNetFile::ALL {
        let name = file.path().rsplit('/').next().unwrap_or_default();
        let path = proc_root.join("net").join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.family() == Family::V6 => {
                continue;
            }
            Err(e) => {
                out.errors
                    .push(printable(&format!("cannot read {}: {e}", path.display())));
                continue;
            }
        };
        let parsed = match jitgate_core::procnet::parse(file, &text) {
            Ok(p) => p,
            Err(e) => {
                out.errors.push(printable(&e));
                continue;
            }
        };
        for l in parsed {
            out.listening.push(WireListener {
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
    out.listening
        .sort_by(|a, b| (a.port, &a.protocol, &a.address).cmp(&(b.port, &b.protocol, &b.address)));
    out.listening.dedup();
    out
}

/// `text` as the controller accepts it in a report: control characters (a tab in a
/// quoted line) become `?`, and it is cut at `MAX_ERROR_CHARS`.
fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_ERROR_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > MAX_ERROR_CHARS {
        out.push_str("...");
    }
    out
}

/// The errors of `now` that `before` did not have: each distinct error is logged when
/// it appears, not at every report.
pub fn new_errors<'a>(before: &[String], now: &'a [String]) -> Vec<&'a str> {
    now.iter()
        .filter(|e| !before.contains(e))
        .map(String::as_str)
        .collect()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
    const SSH: &str = "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1609 1 0000000013f94096 100 0 0 10 0\n";
    const DNS: &str = "   0: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2222 2 0000000000000000 0\n";

    fn proc_root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("net")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join("net").join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn readable_files_give_listeners_and_no_errors() {
        let root = proc_root(&[
            ("tcp", &format!("{HEADER}{SSH}")),
            ("udp", &format!("{HEADER}{DNS}")),
            ("udp6", HEADER),
        ]);
        let got = listeners(root.path());
        assert_eq!(got.errors, Vec::<String>::new(), "no tcp6: IPv6 is off");
        let ports: Vec<(u16, &str)> = got
            .listening
            .iter()
            .map(|l| (l.port, l.protocol.as_str()))
            .collect();
        assert_eq!(ports, vec![(22, "tcp"), (53, "udp")]);
    }

    /// Regression (issue 10): a file that did not parse was skipped without a word, so
    /// the report silently missed its listeners.
    #[test]
    fn a_file_that_does_not_parse_is_an_error_naming_it() {
        let root = proc_root(&[
            ("tcp", &format!("{HEADER}{SSH}   1: garbage\tline\n")),
            ("udp", &format!("{HEADER}{DNS}")),
        ]);
        let got = listeners(root.path());
        assert_eq!(got.errors.len(), 1, "{:?}", got.errors);
        let e = &got.errors[0];
        assert!(e.starts_with("/proc/net/tcp line 3: "), "{e}");
        assert!(
            e.contains("garbage?line"),
            "control characters are replaced: {e}"
        );
        assert!(!e.chars().any(char::is_control), "{e}");
        // The other files are still read.
        assert_eq!(got.listening.len(), 1);
        assert_eq!(got.listening[0].port, 53);
    }

    #[test]
    fn a_file_that_cannot_be_read_is_an_error() {
        let root = proc_root(&[("udp", HEADER)]);
        // tcp is missing (IPv4 sockets are always listed by a kernel), tcp6 is a
        // directory.
        std::fs::create_dir(root.path().join("net").join("tcp6")).unwrap();
        let got = listeners(root.path());
        assert_eq!(got.errors.len(), 2, "{:?}", got.errors);
        assert!(
            got.errors[0].starts_with("cannot read "),
            "{:?}",
            got.errors
        );
        assert!(got.errors[0].contains("net/tcp:"), "{:?}", got.errors);
        assert!(got.errors[1].contains("net/tcp6:"), "{:?}", got.errors);
    }

    #[test]
    fn long_errors_are_cut() {
        let long = "x".repeat(2000);
        let root = proc_root(&[("tcp", &format!("{HEADER}   1: {long}\n")), ("udp", HEADER)]);
        let got = listeners(root.path());
        assert_eq!(got.errors.len(), 1);
        assert_eq!(got.errors[0].chars().count(), MAX_ERROR_CHARS + 3);
        assert!(got.errors[0].ends_with("..."));
    }

    #[test]
    fn each_distinct_error_is_new_once() {
        let a = "/proc/net/tcp line 3: not a socket line: 'x'".to_owned();
        let b = "cannot read /proc/net/udp: denied".to_owned();
        assert_eq!(new_errors(&[], std::slice::from_ref(&a)), vec![a.as_str()]);
        assert_eq!(
            new_errors(std::slice::from_ref(&a), std::slice::from_ref(&a)),
            Vec::<&str>::new()
        );
        assert_eq!(
            new_errors(std::slice::from_ref(&a), &[a.clone(), b.clone()]),
            vec![b.as_str()]
        );
        assert_eq!(new_errors(&[a.clone(), b.clone()], &[]), Vec::<&str>::new());
    }
}
