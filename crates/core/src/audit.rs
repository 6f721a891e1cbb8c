//! The tamper-evident audit chain.
//!
//! Every event carries the hash of the event before it; its own hash covers its
//! sequence number, its fields and that previous hash. Changing, deleting or
//! reordering any event breaks the chain at that point, and `verify` says where.
//!
//! Hash: SHA-256 over the length-prefixed fields, hex-encoded. The first event's
//! previous hash is 64 zeros.
//!
//! An unkeyed chain only proves that the events agree with each other: whoever can
//! write the database can delete the newest events, or edit one and rehash everything
//! after it, and the chain is again consistent. So the chain is *anchored*: the
//! controller signs [`Checkpoint`]s ("event `seq` has hash `hash`") with an Ed25519
//! key that lives outside the database, and ships them to places the database's
//! writer cannot rewrite. `verify` checks the chain against the checkpoints it is
//! given: a rewritten event no longer has the signed hash, and a truncated log ends
//! before a signed event.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
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

/// A signed statement that the chain's event `seq` had hash `hash` at `time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    /// RFC 3339, when it was signed (signed too).
    pub time: String,
    pub signature: [u8; 64],
}

/// What a checkpoint's signature covers: a domain tag, then the length-prefixed fields.
fn checkpoint_message(seq: u64, hash: &str, time: &str) -> Vec<u8> {
    let mut m = b"jitgate audit checkpoint v1\0".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    for field in [hash, time] {
        m.extend_from_slice(&(field.len() as u64).to_be_bytes());
        m.extend_from_slice(field.as_bytes());
    }
    m
}

/// The controller's checkpoint signing key. A secret: its `Debug` shows only the
/// public half, and it is never serialized here (the edge stores its seed).
pub struct CheckpointKey(SigningKey);

impl CheckpointKey {
    /// From 32 random bytes (the caller reads them from the OS, or from its key file).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        CheckpointKey(SigningKey::from_bytes(seed))
    }

    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> CheckpointPublicKey {
        CheckpointPublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, seq: u64, hash: &str, time: &str) -> Checkpoint {
        let sig = self.0.sign(&checkpoint_message(seq, hash, time));
        Checkpoint {
            seq,
            hash: hash.to_owned(),
            time: time.to_owned(),
            signature: sig.to_bytes(),
        }
    }
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckpointKey(public {})", self.public().to_hex())
    }
}

/// The public half, which anyone verifying the log may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPublicKey(VerifyingKey);

impl CheckpointPublicKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let bytes = hex::decode(s.trim()).map_err(|e| format!("not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("{} bytes, expected 32", bytes.len()))?;
        VerifyingKey::from_bytes(&arr)
            .map(CheckpointPublicKey)
            .map_err(|e| format!("not an Ed25519 public key: {e}"))
    }

    /// SHA-256 of the key, hex: what a person compares.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    pub fn verifies(&self, cp: &Checkpoint) -> bool {
        let sig = Signature::from_bytes(&cp.signature);
        self.0
            .verify_strict(&checkpoint_message(cp.seq, &cp.hash, &cp.time), &sig)
            .is_ok()
    }
}

/// Checkpoints to verify a chain against, with the key that must have signed them.
pub struct Anchors<'a> {
    pub key: &'a CheckpointPublicKey,
    pub checkpoints: &'a [Checkpoint],
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
    /// The event's stored time index disagrees with its (hashed) time: edited.
    TimeEdited { seq: u64 },
    /// The event differs from what a signed checkpoint recorded: the log was
    /// rewritten (edited and rehashed, events inserted, deleted or reordered).
    CheckpointMismatch { seq: u64 },
    /// The chain ends before an event that a signed checkpoint recorded: events at
    /// the end were deleted.
    CheckpointBeyondEnd { seq: u64, last: u64 },
    /// A checkpoint whose signature is not the controller key's: forged or damaged.
    BadCheckpointSignature { seq: u64 },
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
            Problem::TimeEdited { seq } => write!(
                f,
                "event {seq}'s stored time was edited (it disagrees with the hashed time)"
            ),
            Problem::CheckpointMismatch { seq } => write!(
                f,
                "event {seq} is not the event a signed checkpoint recorded (the log was rewritten)"
            ),
            Problem::CheckpointBeyondEnd { seq, last } => write!(
                f,
                "the log ends at event {last}, but a signed checkpoint recorded event {seq} (events were deleted from the end)"
            ),
            Problem::BadCheckpointSignature { seq } => write!(
                f,
                "the checkpoint for event {seq} is not signed by the audit key (forged or damaged)"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub count: u64,
    pub last_seq: u64,
    pub head_hash: String,
    pub problems: Vec<Problem>,
    /// The newest validly signed checkpoint the chain was checked against.
    pub anchored_at: Option<u64>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Walks the chain in storage order, one event at a time: `records` can stream from
/// disk, and nothing of it is kept but the previous link (and the problems found), so
/// memory does not grow with the chain. `recorded_head` is the sequence number the store
/// recorded as its last, when it keeps one, to detect deletions at the end. With
/// `anchors`, every checkpoint signed by the key must match the event it names.
pub fn verify(
    records: impl IntoIterator<Item = AuditRecord>,
    recorded_head: Option<u64>,
    anchors: Option<Anchors<'_>>,
) -> VerifyReport {
    verify_after(records, (0, GENESIS_HASH), recorded_head, anchors)
}

fn verify_after(
    records: impl IntoIterator<Item = AuditRecord>,
    start: (u64, &str),
    recorded_head: Option<u64>,
    anchors: Option<Anchors<'_>>,
) -> VerifyReport {
    let mut problems = Vec::new();
    // seq -> the hashes signed for it (two checkpoints of one event that disagree
    // cannot both match, so one is reported).
    let mut signed: std::collections::BTreeMap<u64, Vec<&str>> = Default::default();
    if let Some(a) = &anchors {
        for cp in a.checkpoints {
            if a.key.verifies(cp) {
                signed.entry(cp.seq).or_default().push(&cp.hash);
            } else {
                problems.push(Problem::BadCheckpointSignature { seq: cp.seq });
            }
        }
    }
    let anchored_at = signed.keys().next_back().copied();
    let mut tail = chain_walk(records, start, &signed, &mut problems);
    for &seq in signed.keys() {
        if seq > tail.0 {
            problems.push(Problem::CheckpointBeyondEnd { seq, last: tail.0 });
        }
    }
    if let Some(head) = recorded_head
        && head > tail.0
    {
        problems.push(Problem::Truncated { last: tail.0, head });
    }
    VerifyReport {
        count: tail.2,
        last_seq: tail.0,
        head_hash: std::mem::take(&mut tail.1),
        problems,
        anchored_at,
    }
}

/// Like [`verify`], for the part of a chain that starts with `records`' first event:
/// that event's stored link is taken as given (the part before it is not checked),
/// everything from it on is.
pub fn verify_range(
    records: impl IntoIterator<Item = AuditRecord>,
    recorded_head: Option<u64>,
    anchors: Option<Anchors<'_>>,
) -> VerifyReport {
    let mut records = records.into_iter().peekable();
    let start = match records.peek() {
        Some(r) if r.seq > 1 => (r.seq - 1, r.prev_hash.clone()),
        _ => (0, GENESIS_HASH.to_owned()),
    };
    verify_after(records, (start.0, &start.1), recorded_head, anchors)
}

/// Checks links and hashes after the event `start` (seq, hash); returns (last seq,
/// last hash, count).
fn chain_walk(
    records: impl IntoIterator<Item = AuditRecord>,
    start: (u64, &str),
    signed: &std::collections::BTreeMap<u64, Vec<&str>>,
    problems: &mut Vec<Problem>,
) -> (u64, String, u64) {
    let mut prev_seq = start.0;
    let mut prev_hash = start.1.to_owned();
    let mut count = 0u64;
    for r in records {
        count += 1;
        if let Some(hashes) = signed.get(&r.seq)
            && hashes.iter().any(|h| *h != r.hash)
        {
            problems.push(Problem::CheckpointMismatch { seq: r.seq });
        }
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
    (prev_seq, prev_hash, count)
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
        let r = verify(c, Some(10), None);
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!((r.count, r.last_seq, r.head_hash), (10, 10, head));
    }

    #[test]
    fn modification_is_found() {
        let mut c = chain(10);
        c[4].entry.actor = "mallory".into();
        assert_eq!(
            verify(c, Some(10), None).problems,
            vec![Problem::Modified { seq: 5 }]
        );
    }

    #[test]
    fn rehashed_modification_breaks_the_next_link() {
        let mut c = chain(10);
        c[4].entry.actor = "mallory".into();
        c[4].hash = compute_hash(5, &c[4].prev_hash.clone(), &c[4].entry);
        let p = verify(c, Some(10), None).problems;
        assert!(
            matches!(p.as_slice(), [Problem::Broken { seq: 6, .. }]),
            "{p:?}"
        );
    }

    #[test]
    fn deletion_is_found() {
        let mut c = chain(10);
        c.remove(3);
        let p = verify(c, Some(10), None).problems;
        assert_eq!(p, vec![Problem::Gap { after: 3, next: 5 }]);
    }

    #[test]
    fn reordering_is_found() {
        let mut c = chain(10);
        c.swap(2, 3);
        let p = verify(c, Some(10), None).problems;
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
            verify(c, Some(10), None).problems,
            vec![Problem::Truncated { last: 8, head: 10 }]
        );
    }

    fn key() -> CheckpointKey {
        CheckpointKey::from_seed(&[7u8; 32])
    }

    /// An attacker's rewrite: events from index `from` on are relinked and rehashed.
    fn rehash_from(c: &mut [AuditRecord], from: usize) {
        for i in from..c.len() {
            let (s, h) = if i == 0 {
                (0, GENESIS_HASH.to_owned())
            } else {
                (c[i - 1].seq, c[i - 1].hash.clone())
            };
            c[i] = link(s, &h, c[i].entry.clone());
        }
    }

    fn anchored(c: Vec<AuditRecord>, cps: &[Checkpoint]) -> Vec<Problem> {
        let k = key().public();
        verify(
            c,
            None,
            Some(Anchors {
                key: &k,
                checkpoints: cps,
            }),
        )
        .problems
    }

    #[test]
    fn a_checkpointed_chain_verifies_and_reports_its_anchor() {
        let c = chain(10);
        let cp = key().sign(10, &c[9].hash, "2026-01-01T00:01:00Z");
        let k = key().public();
        let r = verify(
            c,
            None,
            Some(Anchors {
                key: &k,
                checkpoints: &[cp],
            }),
        );
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.anchored_at, Some(10));
    }

    #[test]
    fn a_rehashed_edit_is_caught_by_the_checkpoint() {
        let mut c = chain(10);
        let cp = key().sign(10, &c[9].hash, "t");
        c[3].entry.details = r#"{"forged":true}"#.into();
        rehash_from(&mut c, 3);
        assert!(verify(c.clone(), None, None).ok(), "unanchored, it passes");
        assert_eq!(
            anchored(c, &[cp]),
            vec![Problem::CheckpointMismatch { seq: 10 }]
        );
    }

    #[test]
    fn truncation_and_regrowth_are_caught_by_the_checkpoint() {
        let mut c = chain(10);
        let cp = key().sign(10, &c[9].hash, "t");
        c.truncate(7);
        assert_eq!(
            anchored(c.clone(), std::slice::from_ref(&cp)),
            vec![Problem::CheckpointBeyondEnd { seq: 10, last: 7 }]
        );
        // The controller writes new events after the truncation: the log is
        // consistent again, but not with the checkpoint.
        for i in 0..5 {
            let last = c.last().unwrap().clone();
            c.push(link(last.seq, &last.hash, entry(100 + i)));
        }
        assert_eq!(
            anchored(c, &[cp]),
            vec![Problem::CheckpointMismatch { seq: 10 }]
        );
    }

    #[test]
    fn a_forged_checkpoint_is_reported_and_ignored() {
        let mut c = chain(10);
        let good = key().sign(5, &c[4].hash, "t");
        c[7].entry.actor = "mallory".into();
        rehash_from(&mut c, 7);
        let forger = CheckpointKey::from_seed(&[9u8; 32]);
        let forged = forger.sign(10, &c[9].hash, "t");
        let mut tampered = good.clone();
        tampered.seq = 6;
        assert_eq!(
            anchored(c, &[good, forged, tampered]),
            vec![
                Problem::BadCheckpointSignature { seq: 10 },
                Problem::BadCheckpointSignature { seq: 6 },
            ]
        );
    }

    #[test]
    fn public_keys_round_trip_and_reject_garbage() {
        let k = key().public();
        assert_eq!(CheckpointPublicKey::parse(&k.to_hex()).unwrap(), k);
        assert!(CheckpointPublicKey::parse("zz").is_err());
        assert!(CheckpointPublicKey::parse("abcd").is_err());
        assert!(!format!("{:?}", key()).contains(&hex::encode([7u8; 32])));
    }

    #[test]
    fn verify_range_checks_from_its_first_event_on() {
        let c = chain(10);
        let k = key().public();
        let cp = [key().sign(8, &c[7].hash, "t")];
        let check = |r: Vec<AuditRecord>| {
            verify_range(
                r,
                Some(10),
                Some(Anchors {
                    key: &k,
                    checkpoints: &cp,
                }),
            )
            .problems
        };
        assert!(check(c[4..].to_vec()).is_empty());
        // An edit before the range is not its business; one inside it is.
        let mut e = c.clone();
        e[2].entry.target = "x".into();
        assert!(check(e[4..].to_vec()).is_empty());
        e[5].entry.target = "x".into();
        assert_eq!(check(e[4..].to_vec()), vec![Problem::Modified { seq: 6 }]);
        // Rewritten from inside the range: the anchored event differs.
        let mut r = c.clone();
        r[5].entry.target = "x".into();
        rehash_from(&mut r, 5);
        assert_eq!(
            check(r[4..].to_vec()),
            vec![Problem::CheckpointMismatch { seq: 8 }]
        );
        // Truncated before the anchor.
        assert_eq!(
            check(c[4..7].to_vec()),
            vec![
                Problem::CheckpointBeyondEnd { seq: 8, last: 7 },
                Problem::Truncated { last: 7, head: 10 }
            ]
        );
    }
}
