//! What the agent keeps on disk: its credential and the last desired state it applied.
//!
//! The applied state is `applied.json`, a whole state written now and then, plus
//! `applied.log`, the changes since, one delta per line (a `DesiredState` with `base`,
//! as the controller sends them), each appended and synced before the agent reports
//! the state applied. A change therefore writes what changed, not every grant of the
//! machine. Reading replays the log on the whole state while each line's `base` is the
//! revision reached: a line cut short by a crash, or left from before the whole state
//! was last rewritten, ends the replay.

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

    /// The last desired state applied, if any (and readable): the whole state with
    /// the logged changes since replayed on it.
    pub fn applied(&self) -> Option<DesiredState> {
        let b = std::fs::read(self.path(APPLIED)).ok()?;
        let whole: DesiredState = serde_json::from_slice(&b).ok()?;
        let log = match std::fs::read(self.path(APPLIED_LOG)) {
            Ok(l) if !l.is_empty() => l,
            _ => return Some(whole),
        };
        // The caller validates what it gets; an invalid whole state is its to report.
        let Ok(mut state) = jitgate_proto::decode(&whole) else {
            return Some(whole);
        };
        let mut replayed = 0;
        for line in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(delta) = serde_json::from_slice::<DesiredState>(line) else {
                break;
            };
            match jitgate_proto::apply_delta(&state, &delta) {
                Ok(next) => {
                    state = next;
                    replayed += 1;
                }
                Err(_) => break,
            }
        }
        if replayed == 0 {
            return Some(whole);
        }
        Some(DesiredState {
            revision: state.revision.clone(),
            generated_at: whole.generated_at,
            ..jitgate_proto::encode(
                &state.vm,
                state.gateway.as_ref(),
                &state.rules,
                &state.grants,
                jitgate_core::Timestamp::UNIX_EPOCH,
            )
        })
    }

    /// Writes the whole applied state and empties the log; the size written.
    pub fn save_applied(&self, d: &DesiredState) -> anyhow::Result<u64> {
        let bytes = serde_json::to_vec(d)?;
        write_private(&self.path(APPLIED), &bytes)?;
        // A line left in the log now has a base older than the whole state: never
        // replayed. Emptied all the same, so the log's size counts from here.
        self.truncate_log()?;
        Ok(bytes.len() as u64)
    }

    /// Appends a change to the applied state (a delta from the state saved last) and
    /// syncs it; the size written.
    pub fn append_applied(&self, delta: &DesiredState) -> anyhow::Result<u64> {
        let mut line = serde_json::to_vec(delta)?;
        line.push(b'\n');
        let p = self.path(APPLIED_LOG);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("cannot write {}", p.display()))?;
        f.write_all(&line)?;
        f.sync_data()?;
        Ok(line.len() as u64)
    }

    fn truncate_log(&self) -> anyhow::Result<()> {
        let p = self.path(APPLIED_LOG);
        match std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
        {
            Ok(f) => f
                .sync_all()
                .with_context(|| format!("cannot empty {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot empty {}", p.display())),
        }
    }
}

const APPLIED: &str = "applied.json";
const APPLIED_LOG: &str = "applied.log";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use jitgate_core::Timestamp;
    use jitgate_core::ids::VmId;
    use jitgate_core::net::{Port, Protocol, SourcePrefix};
    use jitgate_core::nsg::GrantRef;
    use jitgate_core::request::RequestId;

    fn vm() -> VmId {
        VmId::parse("/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1").unwrap()
    }

    fn grant(n: u32) -> GrantRef {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        GrantRef {
            request: RequestId::new(uuid::Uuid::from_u128(u128::from(n))),
            number: Port::new(22).unwrap(),
            protocol: Protocol::Tcp,
            source: SourcePrefix::parse(&format!("10.0.0.{n}")).unwrap(),
            start: t,
            end: t
                .checked_add(jiff::SignedDuration::from_secs(3600))
                .unwrap(),
        }
    }

    fn state(ns: &[u32]) -> (Vec<GrantRef>, DesiredState) {
        let mut g: Vec<GrantRef> = ns.iter().map(|n| grant(*n)).collect();
        g.sort_unstable();
        let wire = jitgate_proto::encode(&vm(), None, &[], &g, Timestamp::UNIX_EPOCH);
        (g, wire)
    }

    fn delta(from: &[u32], to: &[u32]) -> DesiredState {
        let ((old, a), (new, b)) = (state(from), state(to));
        jitgate_proto::delta_between(
            &a.revision,
            &old.into_iter().collect(),
            &new.into_iter().collect(),
            &b,
        )
    }

    fn grants_of(d: &DesiredState) -> Vec<String> {
        d.grants.iter().map(|g| g.source.clone()).collect()
    }

    /// Issue 15: a change is appended to the log; reading replays the log on the whole
    /// state, stops at a line cut short, and ignores lines older than the whole state.
    #[test]
    fn the_applied_state_is_the_whole_one_with_the_logged_changes() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert!(s.applied().is_none());
        s.save_applied(&state(&[1, 2]).1).unwrap();
        assert_eq!(s.applied().unwrap(), state(&[1, 2]).1);

        s.append_applied(&delta(&[1, 2], &[1, 2, 3])).unwrap();
        s.append_applied(&delta(&[1, 2, 3], &[2, 3])).unwrap();
        let got = s.applied().unwrap();
        assert_eq!(got.revision, state(&[2, 3]).1.revision);
        assert_eq!(grants_of(&got), grants_of(&state(&[2, 3]).1));
        assert!(jitgate_proto::decode(&got).is_ok(), "a valid whole state");

        // A crash in the middle of an append: the state before it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(APPLIED_LOG))
            .unwrap();
        f.write_all(b"{\"vm\":\"/subscr").unwrap();
        assert_eq!(s.applied().unwrap().revision, state(&[2, 3]).1.revision);

        // A new whole state empties the log; a line whose base is not the state reached
        // (left from before, or from another chain) ends the replay.
        s.save_applied(&state(&[4]).1).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join(APPLIED_LOG))
                .unwrap()
                .len(),
            0
        );
        s.append_applied(&delta(&[2, 3], &[3])).unwrap();
        s.append_applied(&delta(&[4], &[4, 5])).unwrap();
        assert_eq!(s.applied().unwrap(), state(&[4]).1);
    }
}
