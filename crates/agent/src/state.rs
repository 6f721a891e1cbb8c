//! What the agent keeps on disk: its credential and the last desired state it applied.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use jitgate_proto::DesiredState;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub controller: String,
    pub vm_id: String,
    pub token: jitgate_proto::Secret,
    /// The controller CA's fingerprint pinned at enrollment (from the enrollment token
    /// or --ca-fingerprint), kept so later starts trust the same controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
}

pub struct StateDir {
    dir: PathBuf,
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename), mode 0600.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

impl StateDir {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn credentials(&self) -> anyhow::Result<Option<Credentials>> {
        let p = self.path("credentials.json");
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b)
                    .with_context(|| format!("{} is corrupt", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    pub fn save_credentials(&self, c: &Credentials) -> anyhow::Result<()> {
        write_private(
            &self.path("credentials.json"),
            &serde_json::to_vec_pretty(c)?,
        )
    }

    /// The last desired state applied, if any (and readable).
    pub fn applied(&self) -> Option<DesiredState> {
        let b = std::fs::read(self.path("applied.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn save_applied(&self, d: &DesiredState) -> anyhow::Result<()> {
        write_private(&self.path("applied.json"), &serde_json::to_vec(d)?)
    }
}
