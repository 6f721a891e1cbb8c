//! Anchoring the audit chain outside the database.
//!
//! At first start the controller creates an Ed25519 signing key (`audit-signing.key`,
//! mode 0600, in the data directory but not in the database) and writes its public
//! half next to it (`audit-signing.pub`) and to the log. Every `interval` in which the
//! chain grew, and at shutdown, it signs a checkpoint of the chain's newest event and
//! ships it to every destination: today the checkpoint file (by default
//! `audit-checkpoints.jsonl` in the data directory; point `--audit-checkpoints` at
//! another directory or a mounted log volume), later also the notification outbox.
//!
//! At start, the chain from the newest validly signed checkpoint to the end must be
//! intact, else the controller refuses to serve unless told `--accept-audit-break`,
//! which it audits (with what was wrong) before anchoring the chain anew.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use jitgate_core::Timestamp;
use jitgate_core::audit::{AuditEntry, Checkpoint, CheckpointKey, CheckpointPublicKey, Outcome};
use jitgate_store::checkpoint as file;
use jitgate_store::{AnchorSet, Store};
use tokio::sync::{Mutex, watch};

pub const SIGNING_KEY_FILE: &str = "audit-signing.key";
pub const PUBLIC_KEY_FILE: &str = "audit-signing.pub";
pub const CHECKPOINT_FILE: &str = "audit-checkpoints.jsonl";

/// A place checkpoints are shipped to, out of reach of whoever can write the
/// database. The file is the first; the notification outbox (webhooks) will be
/// another, receiving the same line (`jitgate_store::checkpoint::to_line`).
pub trait CheckpointSink: Send + Sync {
    fn ship(&self, cp: &Checkpoint, key: &CheckpointPublicKey) -> anyhow::Result<()>;
    fn describe(&self) -> String;
}

/// Appends checkpoints to a file (fsynced), which the controller also reads back to
/// verify against.
pub struct FileSink(pub PathBuf);

impl CheckpointSink for FileSink {
    fn ship(&self, cp: &Checkpoint, key: &CheckpointPublicKey) -> anyhow::Result<()> {
        Ok(file::append(&self.0, cp, key)?)
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

/// Signs and ships checkpoints; remembers the last one it wrote.
pub struct Checkpointer {
    key: CheckpointKey,
    public: CheckpointPublicKey,
    /// The checkpoint file: shipped to and read back for verification.
    path: PathBuf,
    /// Further destinations, each receiving every checkpoint.
    sinks: Vec<Box<dyn CheckpointSink>>,
    /// Sequence number of the newest checkpoint written (0: none yet).
    last: Mutex<u64>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("public", &self.public.to_hex())
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Creates `path` with `content`, mode 0600, failing if it exists (no window in
/// which another user could read it, no following of a planted symlink).
pub fn create_secret_file(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(content)?;
    f.sync_all()?;
    Ok(())
}

impl Checkpointer {
    /// Loads the signing key, or creates it when `create` (first start).
    pub fn open(key_path: &Path, checkpoints: PathBuf) -> anyhow::Result<(Self, bool)> {
        let (key, created) = match std::fs::read_to_string(key_path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                    .with_context(|| {
                        format!("{} is not an audit signing key", key_path.display())
                    })?;
                (CheckpointKey::from_seed(&bytes), false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let seed: [u8; 32] = rand::random();
                let mut text = hex::encode(seed);
                text.push('\n');
                create_secret_file(key_path, text.as_bytes())?;
                (CheckpointKey::from_seed(&seed), true)
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", key_path.display()));
            }
        };
        let public = key.public();
        if let Some(dir) = key_path.parent() {
            let pub_path = dir.join(PUBLIC_KEY_FILE);
            let text = format!("{}\n", public.to_hex());
            if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&pub_path, text)
                    .with_context(|| format!("cannot write {}", pub_path.display()))?;
            }
        }
        Ok((
            Checkpointer {
                key,
                public,
                path: checkpoints,
                sinks: Vec::new(),
                last: Mutex::new(0),
            },
            created,
        ))
    }

    /// Ships every later checkpoint to `sink` too.
    pub fn add_sink(&mut self, sink: Box<dyn CheckpointSink>) {
        self.sinks.push(sink);
    }

    pub fn public(&self) -> &CheckpointPublicKey {
        &self.public
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every checkpoint shipped to the file, with the key, for `verify`.
    pub fn anchors(&self) -> anyhow::Result<AnchorSet> {
        Ok(AnchorSet {
            key: self.public.clone(),
            checkpoints: file::read(&self.path)?,
        })
    }

    /// Signs the chain's newest event and ships it, if the chain grew since the last.
    pub async fn checkpoint(&self, store: &dyn Store) -> anyhow::Result<Option<Checkpoint>> {
        let mut last = self.last.lock().await;
        let (seq, hash) = store.audit_tail().await?;
        if seq == 0 || seq == *last {
            return Ok(None);
        }
        let cp = self.key.sign(seq, &hash, &Timestamp::now().to_string());
        FileSink(self.path.clone()).ship(&cp, &self.public)?;
        for sink in &self.sinks {
            // One destination being down must not stop the others (nor the file).
            if let Err(e) = sink.ship(&cp, &self.public) {
                tracing::error!(sink = %sink.describe(), error = %format!("{e:#}"), "cannot ship an audit checkpoint");
            }
        }
        *last = seq;
        Ok(Some(cp))
    }

    /// The start-up check. Returns a description of what is wrong, if anything.
    async fn check(&self, store: &dyn Store, fresh_key: bool) -> anyhow::Result<Option<String>> {
        let all = file::read(&self.path)?;
        let newest = all.iter().rev().find(|c| self.public.verifies(c));
        if let Some(last) = all.last()
            && !self.public.verifies(last)
        {
            return Ok(Some(format!(
                "the newest checkpoint in {} (event {}) is not signed by this controller's audit key",
                self.path.display(),
                last.seq
            )));
        }
        let Some(anchor) = newest else {
            let (seq, _) = store.audit_tail().await?;
            if fresh_key || seq == 0 {
                return Ok(None);
            }
            return Ok(Some(format!(
                "the audit log has {seq} events but {} holds no checkpoint signed by this controller (was it deleted or moved?)",
                self.path.display()
            )));
        };
        let report = store
            .verify_audit_from(AnchorSet {
                key: self.public.clone(),
                checkpoints: vec![anchor.clone()],
            })
            .await?;
        if report.ok() {
            *self.last.lock().await = report.last_seq.max(anchor.seq);
            return Ok(None);
        }
        let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        Ok(Some(format!(
            "the audit log does not match the checkpoint of event {} in {}: {}",
            anchor.seq,
            self.path.display(),
            problems.join("; ")
        )))
    }
}

/// Runs the start-up check; refuses (an error) on a break unless `accept_break`, in
/// which case the break is audited and the chain anchored anew.
pub async fn check_at_start(
    cp: &Checkpointer,
    store: &dyn Store,
    fresh_key: bool,
    accept_break: bool,
) -> anyhow::Result<()> {
    if let Some(problem) = cp.check(store, fresh_key).await? {
        if !accept_break {
            bail!(
                "refusing to serve: {problem}. Investigate (jitgate audit verify --data-dir DIR), then start with --accept-audit-break to continue; that decision is itself audited"
            );
        }
        tracing::warn!(%problem, "audit chain break accepted (--accept-audit-break)");
        store
            .append_audit(AuditEntry {
                time: Timestamp::now().to_string(),
                actor: "system".into(),
                source: "controller".into(),
                action: "audit.break_accepted".into(),
                target: cp.path.display().to_string(),
                outcome: Outcome::Success,
                details: serde_json::json!({ "problem": problem }).to_string(),
            })
            .await?;
    }
    cp.checkpoint(store).await?;
    Ok(())
}

/// Writes a checkpoint every `interval` in which the chain grew, and a last one when
/// `shutdown` turns true.
pub async fn run(
    cp: Arc<Checkpointer>,
    store: Arc<dyn Store>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
        if let Err(e) = cp.checkpoint(store.as_ref()).await {
            tracing::error!(error = %e, "cannot write an audit checkpoint");
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex as StdMutex;

    struct Collect(Arc<StdMutex<Vec<u64>>>);
    impl CheckpointSink for Collect {
        fn ship(&self, cp: &Checkpoint, _: &CheckpointPublicKey) -> anyhow::Result<()> {
            self.0.lock().unwrap().push(cp.seq);
            Ok(())
        }
        fn describe(&self) -> String {
            "collect".into()
        }
    }
    struct Down;
    impl CheckpointSink for Down {
        fn ship(&self, _: &Checkpoint, _: &CheckpointPublicKey) -> anyhow::Result<()> {
            anyhow::bail!("unreachable")
        }
        fn describe(&self) -> String {
            "down".into()
        }
    }

    #[tokio::test]
    async fn every_sink_gets_every_checkpoint_and_one_down_stops_none() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(jitgate_store_sql::SqlStore::open(&dir.path().join("db")).unwrap());
        let (mut cp, fresh) =
            Checkpointer::open(&dir.path().join("key"), dir.path().join("cp.jsonl")).unwrap();
        assert!(fresh);
        let got = Arc::new(StdMutex::new(Vec::new()));
        cp.add_sink(Box::new(Down));
        cp.add_sink(Box::new(Collect(got.clone())));
        let entry = |i: u64| AuditEntry {
            time: "2026-01-01T00:00:00Z".into(),
            actor: "t".into(),
            source: "t".into(),
            action: format!("test.{i}"),
            target: "t".into(),
            outcome: Outcome::Success,
            details: "{}".into(),
        };
        store.append_audit(entry(1)).await.unwrap();
        assert_eq!(cp.checkpoint(store.as_ref()).await.unwrap().unwrap().seq, 1);
        assert!(
            cp.checkpoint(store.as_ref()).await.unwrap().is_none(),
            "nothing new"
        );
        store.append_audit(entry(2)).await.unwrap();
        cp.checkpoint(store.as_ref()).await.unwrap();
        assert_eq!(*got.lock().unwrap(), vec![1, 2]);
        let anchors = cp.anchors().unwrap();
        assert_eq!(anchors.checkpoints.len(), 2, "the file has both");
        // The key file is private.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
