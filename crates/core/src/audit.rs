//! The tamper-evident audit chain.
//!
//! Every event carries the hash of the event before it; its own hash covers its
//! sequence number, its fields and that previous hash. Changing, deleting or
//! reordering any event breaks the chain at that point, and `verify` says where.
//!
//! Hash: SHA-256 over the length-prefixed fields, hex-encoded. The first event's
//! previous hash is 64 zeros.

use sha2::{Digest, Sha256};

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "success" => Some(Outcome::Success),
            "denied" => Some(Outcome::Denied),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

/// What happened, before it is given its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// RFC 3339 time, as stored (the hash covers this exact text).
    pub time: String,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub target: String,
    pub outcome: Outcome,
    /// A JSON object with the details.
    pub details: String,
}

/// An event in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub entry: AuditEntry,
    pub prev_hash: String,
    pub hash: String,
}

pub fn compute_hash(seq: u64, prev_hash: &str, e: &AuditEntry) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_be_bytes());
    for field in [
        prev_hash,
        &e.time,
        &e.actor,
        &e.source,
        &e.action,
        &e.target,
        e.outcome.as_str(),
        &e.details,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Links `entry` after the event with sequence `prev_seq` and hash `prev_hash`.
pub fn link(prev_seq: u64, prev_hash: &str, entry: AuditEntry) -> AuditRecord {
    let seq = prev_seq + 1;
    let hash = compute_hash(seq, prev_hash, &entry);
    AuditRecord {
        seq,
        entry,
        prev_hash: prev_hash.to_owned(),
        hash,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The event's content does not match its own hash: it was modified.
    Modified { seq: u64 },
    /// The event does not follow the one before it: events before it were deleted,
    /// or events were reordered.
    Broken { seq: u64, expected_prev: String },
    /// Sequence numbers skip: events are missing.
    Gap { after: u64, next: u64 },
    /// The chain ends before the recorded head: events at the end were deleted.
    Truncated { last: u64, head: u64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Modified { seq } => write!(
                f,
                "event {seq} was modified (its hash does not match its content)"
            ),
            Problem::Broken { seq, .. } => write!(
                f,
                "event {seq} does not follow the event before it (events were deleted or reordered)"
            ),
            Problem::Gap { after, next } => {
                write!(f, "events {} to {} are missing", after + 1, next - 1)
            }
            Problem::Truncated { last, head } => {
                write!(f, "events {} to {head} were deleted from the end", last + 1)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub count: u64,
    pub last_seq: u64,
    pub head_hash: String,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Walks the chain in storage order. `recorded_head` is the sequence number the store
/// recorded as its last, when it keeps one, to detect deletions at the end.
pub fn verify(
    records: impl IntoIterator<Item = AuditRecord>,
    recorded_head: Option<u64>,
) -> VerifyReport {
    let mut prev_seq = 0u64;
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut count = 0u64;
    let mut problems = Vec::new();
    for r in records {
        count += 1;
        if compute_hash(r.seq, &r.prev_hash, &r.entry) != r.hash {
            problems.push(Problem::Modified { seq: r.seq });
        }
        if r.seq != prev_seq + 1 {
            if r.seq > prev_seq + 1 {
                problems.push(Problem::Gap {
                    after: prev_seq,
                    next: r.seq,
                });
            } else {
                problems.push(Problem::Broken {
                    seq: r.seq,
                    expected_prev: prev_hash.clone(),
                });
            }
        } else if r.prev_hash != prev_hash {
            problems.push(Problem::Broken {
                seq: r.seq,
                expected_prev: prev_hash.clone(),
            });
        }
        prev_seq = r.seq;
        prev_hash = r.hash;
    }
    if let Some(head) = recorded_head
        && head > prev_seq
    {
        problems.push(Problem::Truncated {
            last: prev_seq,
            head,
        });
    }
    VerifyReport {
        count,
        last_seq: prev_seq,
        head_hash: prev_hash,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            time: format!("2026-01-01T00:00:{:02}Z", i % 60),
            actor: "alice".into(),
            source: "10.0.0.1".into(),
            action: "policy.write".into(),
            target: format!("policy-{i}"),
            outcome: Outcome::Success,
            details: "{}".into(),
        }
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let (s, h) = out
                .last()
                .map(|r| (r.seq, r.hash.clone()))
                .unwrap_or((0, GENESIS_HASH.into()));
            out.push(link(s, &h, entry(i)));
        }
        out
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(10);
        let head = c.last().unwrap().hash.clone();
        let r = verify(c, Some(10));
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!((r.count, r.last_seq, r.head_hash), (10, 10, head));
    }

    #[test]
    fn modification_is_found() {
        let mut c = chain(10);
        c[4].entry.actor = "mallory".into();
        assert_eq!(
            verify(c, Some(10)).problems,
            vec![Problem::Modified { seq: 5 }]
        );
    }

    #[test]
    fn rehashed_modification_breaks_the_next_link() {
        let mut c = chain(10);
        c[4].entry.actor = "mallory".into();
        c[4].hash = compute_hash(5, &c[4].prev_hash.clone(), &c[4].entry);
        let p = verify(c, Some(10)).problems;
        assert!(
            matches!(p.as_slice(), [Problem::Broken { seq: 6, .. }]),
            "{p:?}"
        );
    }

    #[test]
    fn deletion_is_found() {
        let mut c = chain(10);
        c.remove(3);
        let p = verify(c, Some(10)).problems;
        assert_eq!(p, vec![Problem::Gap { after: 3, next: 5 }]);
    }

    #[test]
    fn reordering_is_found() {
        let mut c = chain(10);
        c.swap(2, 3);
        let p = verify(c, Some(10)).problems;
        assert!(!p.is_empty());
        assert!(
            p.iter()
                .any(|x| matches!(x, Problem::Broken { seq: 3, .. } | Problem::Gap { .. })),
            "{p:?}"
        );
    }

    #[test]
    fn truncation_is_found_against_the_head() {
        let mut c = chain(10);
        c.truncate(8);
        assert_eq!(
            verify(c, Some(10)).problems,
            vec![Problem::Truncated { last: 8, head: 10 }]
        );
    }
}
