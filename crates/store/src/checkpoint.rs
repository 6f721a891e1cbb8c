//! The audit checkpoint file: signed checkpoints (`core::audit::Checkpoint`), one JSON
//! object a line, appended and fsynced. It lives outside the database (by default next
//! to it in the data directory; in production in another directory or on another
//! machine), so that whoever rewrites the database cannot also rewrite what was
//! signed. Each line names the public key that signed it, for a person reading it; the
//! verifier trusts only the key it is given.
//!
//! Other destinations (a webhook, a log shipper) receive the same line: this is the
//! one wire format of a checkpoint.

use std::io::{BufRead, Write};
use std::path::Path;

use jitgate_core::audit::{Checkpoint, CheckpointPublicKey};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Line {
    seq: u64,
    hash: String,
    time: String,
    key: String,
    signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointFileError {
    #[error("{path}: {err}")]
    Io {
        path: String,
        #[source]
        err: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Malformed {
        path: String,
        line: usize,
        message: String,
    },
}

/// One line of the file, as shipped to every destination.
pub fn to_line(cp: &Checkpoint, key: &CheckpointPublicKey) -> String {
    let line = Line {
        seq: cp.seq,
        hash: cp.hash.clone(),
        time: cp.time.clone(),
        key: key.to_hex(),
        signature: hex::encode(cp.signature),
    };
    serde_json::to_string(&line).unwrap_or_default()
}

pub fn parse_line(s: &str) -> Result<Checkpoint, String> {
    let l: Line = serde_json::from_str(s).map_err(|e| e.to_string())?;
    let sig = hex::decode(&l.signature).map_err(|e| format!("signature: {e}"))?;
    let signature: [u8; 64] = sig
        .as_slice()
        .try_into()
        .map_err(|_| format!("signature: {} bytes, expected 64", sig.len()))?;
    Ok(Checkpoint {
        seq: l.seq,
        hash: l.hash,
        time: l.time,
        signature,
    })
}

/// Every checkpoint in the file, oldest first; a missing file has none.
pub fn read(path: &Path) -> Result<Vec<Checkpoint>, CheckpointFileError> {
    let p = path.display().to_string();
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(CheckpointFileError::Io { path: p, err }),
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|err| CheckpointFileError::Io {
            path: p.clone(),
            err,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            parse_line(&line).map_err(|message| CheckpointFileError::Malformed {
                path: p.clone(),
                line: i + 1,
                message,
            })?,
        );
    }
    Ok(out)
}

/// Appends one checkpoint and fsyncs (the file is created 0600 if missing).
pub fn append(
    path: &Path,
    cp: &Checkpoint,
    key: &CheckpointPublicKey,
) -> Result<(), CheckpointFileError> {
    let io = |err| CheckpointFileError::Io {
        path: path.display().to_string(),
        err,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    let mut line = to_line(cp, key);
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jitgate_core::audit::CheckpointKey;

    #[test]
    fn lines_round_trip_and_bad_lines_name_their_number() {
        let k = CheckpointKey::from_seed(&[3; 32]);
        let cp = k.sign(4, &"ab".repeat(32), "2026-01-01T00:00:00Z");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.jsonl");
        assert!(read(&path).unwrap().is_empty());
        append(&path, &cp, &k.public()).unwrap();
        append(&path, &cp, &k.public()).unwrap();
        assert_eq!(read(&path).unwrap(), vec![cp.clone(), cp]);
        std::fs::write(&path, "{\"seq\":1}\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
