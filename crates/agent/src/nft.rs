//! The thin executor: runs `nft` for the agent. Only `table inet jitgate` is ever
//! named; the ruleset as a whole is never listed.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The process ids of the last `nft` runs started here, so that the notification of a
/// change they commit is known as the agent's own (see [`is_recent_child`]).
static CHILDREN: std::sync::Mutex<std::collections::VecDeque<u32>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const CHILDREN_KEPT: usize = 32;

fn remember_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        if c.len() == CHILDREN_KEPT {
            c.pop_front();
        }
        c.push_back(pid);
    }
}

/// True when `pid` is one of the last `nft` runs this process started.
pub fn is_recent_child(pid: u32) -> bool {
    CHILDREN.lock().map(|c| c.contains(&pid)).unwrap_or(false)
}

#[derive(Debug, Clone)]
pub struct Nft {
    bin: PathBuf,
}

impl Nft {
    pub fn new(bin: PathBuf) -> Self {
        Nft { bin }
    }

    /// Applies a script as one transaction (`nft -f -`): all or nothing.
    pub fn apply(&self, script: &str) -> anyhow::Result<()> {
        if script.is_empty() {
            return Ok(());
        }
        self.pipe(&["-f", "-"], script)
            .map_err(|e| anyhow::anyhow!("nft -f failed: {e:#}"))
    }

    /// Checks a script against the kernel without committing it (`nft -c -f -`): needs
    /// the same privileges and kernel support as an apply.
    pub fn check(&self, script: &str) -> anyhow::Result<()> {
        self.pipe(&["-c", "-f", "-"], script)
    }

    /// Runs nft with `script` on its standard input; its error output is the error.
    fn pipe(&self, args: &[&str], script: &str) -> anyhow::Result<()> {
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (is the nftables package installed?)",
                    self.bin.display()
                )
            })?;
        // Before nft reads its script, so before it can commit anything.
        remember_child(child.id());
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .context("cannot write to nft")?;
        }
        let out = child.wait_with_output().context("nft did not finish")?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| {
                format!(
                    "cannot run {} (is the nftables package installed?)",
                    self.bin.display()
                )
            })?;
        if !out.status.success() {
            bail!(
                "nft {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `nft --version`, e.g. `nftables v1.0.6 (Lester Gooch #5)`.
    pub fn version(&self) -> anyhow::Result<String> {
        Ok(self.run(&["--version"])?.trim().to_owned())
    }

    /// `nft -t -j list table inet jitgate`: the table without set elements; None
    /// when the table does not exist.
    pub fn list_table_terse_json(&self) -> anyhow::Result<Option<String>> {
        match self.run(&["-t", "-j", "list", "table", "inet", "jitgate"]) {
            Ok(json) => Ok(Some(json)),
            Err(e) if format!("{e:#}").contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Packet counts of the table's named counters.
    pub fn counters(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let text = self.run(&["-j", "list", "counters", "table", "inet", "jitgate"])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).context("nft printed invalid JSON")?;
        let mut out = Vec::new();
        for item in v["nftables"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let c = &item["counter"];
            if c["table"] == "jitgate"
                && let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64())
            {
                out.push((name.to_owned(), packets));
            }
        }
        Ok(out)
    }
}
