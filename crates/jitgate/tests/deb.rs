//! The Debian package (issue 17): `scripts/build-deb.sh` builds it from this test
//! build's binary; its contents and control fields are what a machine needs; it
//! installs into a clean root with dpkg (maintainer scripts run chrootless, against
//! that root), upgrades and is removed there without ever touching nftables (checked
//! in a network namespace holding a live grant element and another table of the
//! host's); removal on a machine whose agent is enrolled is refused unless asked for.
//!
//! Needs root, dpkg, `nft`, `ip` and cargo-deb (`scripts/setup-deps.sh --tests`
//! installs it); fails, never skips, without them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace for the test, deleted with it.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("jgdeb{}", std::process::id());
        ok(Command::new("ip").args(["netns", "add", &name]));
        Netns(name)
    }

    fn nft(&self, args: &[&str]) -> String {
        ok(Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args))
    }

    /// dpkg against `root`, inside the namespace, with its maintainer scripts run
    /// chrootless (they see `DPKG_ROOT`); standard input is not a terminal.
    fn dpkg(&self, root: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, "dpkg"])
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--log=/dev/null",
            ])
            .args(args)
            .stdin(std::process::Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        run(&mut cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// An empty root with a dpkg database and this system's user database.
fn clean_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        std::fs::copy(Path::new("/etc").join(f), root.join("etc").join(f)).unwrap();
    }
    root
}

fn installed(ns: &Netns, root: &Path) -> bool {
    let out = ns.dpkg(root, &["-s", "jitgate"], &[]);
    // "install ok installed", or "deinstall ok installed" after a refused removal
    // (the selection changed, the package stayed).
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("Status: ") && l.ends_with(" ok installed"))
}

#[test]
fn the_package_installs_upgrades_and_is_removed_without_touching_nftables() {
    let work = tempfile::tempdir().unwrap();
    let deb = work.path().join("jitgate.deb");
    // From the binary this test run built (the dev profile), compressed fast.
    let bin = Path::new(env!("CARGO_BIN_EXE_jitgate"));
    let profile = bin.parent().unwrap().file_name().unwrap().to_str().unwrap();
    let profile = if profile == "debug" { "dev" } else { profile };
    let cargo_deb = Command::new("cargo").args(["deb", "--version"]).output();
    assert!(
        cargo_deb.is_ok_and(|o| o.status.success()),
        "cargo-deb is missing: scripts/setup-deps.sh --tests installs it (cargo install --locked cargo-deb --version '^3')"
    );
    ok(Command::new(repo().join("scripts/build-deb.sh")).args([
        "--profile",
        profile,
        "--no-build",
        "--fast",
        "--output",
        deb.to_str().unwrap(),
    ]));

    // Control fields and contents.
    let info = ok(Command::new("dpkg-deb").args(["-I", deb.to_str().unwrap()]));
    assert!(info.contains("Package: jitgate"), "{info}");
    assert!(
        info.contains("nftables") && info.contains("iproute2"),
        "{info}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "no {script}: {info}");
    }
    let contents = ok(Command::new("dpkg-deb").args(["-c", deb.to_str().unwrap()]));
    for path in [
        "./usr/bin/jitgate",
        "./lib/systemd/system/jitgate-agent.service",
        "./lib/systemd/system/jitgate-agent-restore.service",
        "./lib/systemd/system/jitgate-controller.service",
        "./etc/jitgate/controller.toml",
        "./usr/share/doc/jitgate/examples/agent.env",
    ] {
        assert!(contents.contains(path), "no {path} in:\n{contents}");
    }
    // Nothing in the package (or its scripts) touches nftables.
    let control = work.path().join("control");
    ok(Command::new("dpkg-deb").args(["-e", deb.to_str().unwrap(), control.to_str().unwrap()]));
    for script in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(control.join(script)).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            assert!(
                !line.contains("nft ") && !line.contains("nft\t") && !line.ends_with("nft"),
                "{script} runs nft: {line}"
            );
        }
    }

    // A machine with a live grant element and another table of its own.
    let ns = Netns::new();
    ns.nft(&[
        "-f",
        repo()
            .join("crates/jitgate/tests/deb-table.nft")
            .to_str()
            .unwrap(),
    ]);
    let tables_before = ns.nft(&["list", "ruleset"]);
    let same_tables = |when: &str| {
        let now = ns.nft(&["list", "ruleset"]);
        // Element lifetimes count down; everything else is as it was.
        let strip = |t: &str| -> String {
            t.lines()
                .map(|l| l.split(" expires ").next().unwrap_or(l).to_owned())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(&now),
            strip(&tables_before),
            "{when} changed nftables"
        );
    };

    // Install into a clean root.
    let root = clean_root(work.path());
    let out = ns.dpkg(&root, &["-i", deb.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(installed(&ns, &root));
    let installed_bin = root.join("usr/bin/jitgate");
    let version = ok(Command::new(&installed_bin).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/jitgate-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=jitgate agent"), "{unit}");
    assert!(
        !unit
            .lines()
            .any(|l| !l.starts_with('#') && l.starts_with("ExecStop")),
        "the agent unit must not stop anything"
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let uid: u32 = passwd
        .lines()
        .find(|l| l.starts_with("jitgate:"))
        .expect("no jitgate user made")
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        std::fs::metadata(root.join("var/lib/jitgate"))
            .unwrap()
            .uid(),
        uid
    );
    same_tables("installing");

    // An upgrade (the same package again) on a machine whose agent is enrolled.
    std::fs::create_dir_all(root.join("var/lib/jitgate-agent")).unwrap();
    std::fs::write(root.join("var/lib/jitgate-agent/credentials.json"), "{}").unwrap();
    let out = ns.dpkg(&root, &["-i", deb.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    same_tables("upgrading");

    // Removal without a terminal to ask: refused, nothing changed.
    let out = ns.dpkg(&root, &["-r", "jitgate"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("JITGATE_REMOVE_UNPROTECTED=yes"), "{err}");
    assert!(installed(&ns, &root), "the refused removal removed it");
    assert!(installed_bin.exists());

    // Asked for: removed, nftables untouched, the state kept until a purge.
    let out = ns.dpkg(
        &root,
        &["-r", "jitgate"],
        &[("JITGATE_REMOVE_UNPROTECTED", "yes")],
    );
    assert!(
        out.status.success(),
        "remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!installed_bin.exists());
    assert!(root.join("var/lib/jitgate-agent/credentials.json").exists());
    same_tables("removing");
    let out = ns.dpkg(&root, &["--purge", "jitgate"], &[]);
    assert!(
        out.status.success(),
        "purge: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!root.join("var/lib/jitgate-agent").exists());
    same_tables("purging");
}
