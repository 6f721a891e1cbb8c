//! The thin executor: runs `nft` for the agent. Only `table inet jitgate` (and a
//! gateway's `table inet jitgate_gw`) is ever named or changed; the ruleset is listed
//! tersely and filtered to these tables.

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

    /// The items of `table inet <table>` in `nft -t -j list ruleset` (chains, rules,
    /// sets without their elements, named counters with their values); None when the
    /// table does not exist.
    ///
    /// Listed with `list ruleset` and filtered here: nft 1.0.6 fetches every set
    /// element for `list table` or `list counters` even with `-t` (0.1 s of CPU at
    /// 10,000 elements, ten times that at 100,000), but not for `list ruleset -t`.
    fn table_items(&self, table: &str) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
        let text = self.run(&["-t", "-j", "list", "ruleset"])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).context("nft printed invalid JSON")?;
        let ours =
            |body: &serde_json::Value, key: &str| body["family"] == "inet" && body[key] == table;
        let mut items = Vec::new();
        let mut found = false;
        for item in v["nftables"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let Some((kind, body)) = item.as_object().and_then(|m| m.iter().next()) else {
                continue;
            };
            if kind == "table" {
                if ours(body, "name") {
                    found = true;
                    items.push(item.clone());
                }
            } else if kind != "metainfo" && ours(body, "table") {
                items.push(item.clone());
            }
        }
        Ok(found.then_some(items))
    }

    /// Table `inet jitgate` without set elements, as `nft -t -j` lists it; None when
    /// the table does not exist.
    pub fn list_table_terse_json(&self) -> anyhow::Result<Option<String>> {
        self.list_terse_json_of(jitgate_core::nft::TABLE)
    }

    /// [`Self::list_table_terse_json`] of `table inet <table>`.
    pub fn list_terse_json_of(&self, table: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .table_items(table)?
            .map(|items| serde_json::json!({ "nftables": items }).to_string()))
    }

    /// Packet counts of the table's named counters.
    pub fn counters(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for item in self
            .table_items(jitgate_core::nft::TABLE)?
            .unwrap_or_default()
        {
            let c = &item["counter"];
            if let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64()) {
                out.push((name.to_owned(), packets));
            }
        }
        Ok(out)
    }
}
