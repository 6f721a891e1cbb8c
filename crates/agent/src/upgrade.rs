//! `jitgate agent upgrade`: replaces this machine's jitgate binary with the one its
//! controller serves (`/download/jitgate-linux-<arch>`), trusted the way the agent
//! trusts the controller (the CA fingerprint pinned at enrollment) and checked against
//! the SHA-256 the controller announces, written beside the old one and renamed over
//! it, so the path holds the old or the new binary, never a part of one. The running
//! agent is not stopped: restarting it (`systemctl restart jitgate-agent`) runs the new
//! binary, and a restart keeps every live grant (they are kernel elements, and the
//! agent restores its state before asking the controller).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::AgentConfig;
use crate::state::StateDir;

/// What the upgrade did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    pub path: PathBuf,
    pub sha256: String,
    /// False when the binary already was the controller's.
    pub replaced: bool,
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Downloads the controller's binary for the agent enrolled in `state_dir` and puts it
/// at `binary`.
pub async fn upgrade(state_dir: &Path, binary: &Path) -> anyhow::Result<Upgraded> {
    let creds = StateDir::open(state_dir)?
        .credentials()?
        .with_context(|| {
            format!(
                "{} holds no credential: this agent has not enrolled, so it knows no controller to upgrade from",
                state_dir.display()
            )
        })?;
    let pin = creds
        .ca_fingerprint
        .as_deref()
        .map(jitgate_proto::tls::Fingerprint::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("the saved CA fingerprint: {e}"))?;
    let config = AgentConfig::new(&creds.controller, "-", "-", state_dir.to_path_buf());
    let http = crate::run::client(&config, pin)?;
    let url = format!("{}{}", creds.controller, jitgate_proto::binary_path());
    let get = |u: String| {
        let http = http.clone();
        async move {
            let r = http
                .get(&u)
                .timeout(std::time::Duration::from_secs(600))
                .send()
                .await
                .with_context(|| format!("cannot reach {u}"))?;
            if !r.status().is_success() {
                bail!("{u} answered {}", r.status());
            }
            Ok(r)
        }
    };
    let announced = get(format!("{url}.sha256")).await?.text().await?;
    let want = announced
        .split_whitespace()
        .next()
        .filter(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()))
        .with_context(|| format!("{url}.sha256 is not a SHA-256: {announced:?}"))?
        .to_ascii_lowercase();
    if binary.exists() && sha256_of(binary)? == want {
        return Ok(Upgraded {
            path: binary.to_path_buf(),
            sha256: want,
            replaced: false,
        });
    }
    let dir = binary
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".jitgate-upgrade-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let mut resp = get(url.clone()).await?;
    let mut h = Sha256::new();
    while let Some(chunk) = resp.chunk().await? {
        h.update(&chunk);
        tmp.write_all(&chunk)?;
    }
    let got = hex::encode(h.finalize());
    if got != want {
        bail!(
            "the downloaded binary's SHA-256 is {got}, not {want} as the controller announced: {} was left as it was",
            binary.display()
        );
    }
    use std::os::unix::fs::PermissionsExt as _;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o755))?;
    tmp.as_file().sync_all()?;
    tmp.persist(binary)
        .with_context(|| format!("cannot replace {}", binary.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Upgraded {
        path: binary.to_path_buf(),
        sha256: want,
        replaced: true,
    })
}
