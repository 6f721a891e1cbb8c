//! Where the controller is and who we are, as `jitgate login` saved it: a TOML file
//! (mode 0600, in a 0700 directory) under `$JITGATE_CONFIG_DIR`, else
//! `$XDG_CONFIG_HOME/jitgate`, else `~/.config/jitgate`.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What `jitgate login` stores (mode 0600).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub url: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// `$JITGATE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/jitgate`, else `~/.config/jitgate`.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("JITGATE_CONFIG_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(d).join("jitgate"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config").join("jitgate"))
}

pub fn config_file() -> Option<PathBuf> {
    config_dir().map(|d| d.join("config.toml"))
}

pub fn load_saved() -> anyhow::Result<Saved> {
    let Some(path) = config_file() else {
        return Ok(Saved::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("{} is not a valid jitgate config", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn save(saved: &Saved) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path =
        config_file().context("cannot find a config directory: set HOME or JITGATE_CONFIG_DIR")?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = toml::to_string(saved)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(path)
}
