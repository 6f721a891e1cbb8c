//! Regression tests for issue 8.2: the audit log is anchored by signed checkpoints
//! outside the database. Each variant below is an attack by someone who can write the
//! database file (delete, insert, edit, reorder, retime, and rehash the chain after
//! it, or edit the stored head); each must be reported by `verify` against the
//! checkpoints, and must stop the controller from starting on the tampered log unless
//! `--accept-audit-break`, which is itself audited.

use std::path::Path;

use jitgate_core::audit::{self, AuditEntry, CheckpointKey, CheckpointPublicKey, Outcome};
use jitgate_store::AnchorSet;
use reqwest::StatusCode;
use rusqlite::{Connection, params};
use serde_json::json;

use crate::util::{Ctl, config};

type Row = (
    i64,
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
);

/// A controller that wrote some events and stopped (its last checkpoint written).
async fn installed() -> tempfile::TempDir {
    let mut ctl = Ctl::start().await;
    ctl.enable("rg", &["vm1", "vm2"], "*").await;
    for i in 0..3 {
        let r = ctl
            .initiate(
                "rg",
                "vm1",
                json!([{"number": 22, "allowedSourceAddressPrefix": format!("10.0.0.{i}"), "duration": "PT1H"}]),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
    }
    ctl.stop().await;
    ctl.dir
}

fn db(dir: &Path) -> Connection {
    Connection::open(dir.join(jitgate_controller::DB_FILE)).unwrap()
}

fn rows(c: &Connection) -> Vec<Row> {
    let mut st = c
        .prepare("SELECT seq, time, time_ns, actor, source, action, target, outcome, details FROM audit ORDER BY seq")
        .unwrap();
    st.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// The attacker's rewrite: the table replaced by `rows`, renumbered from 1, every
/// link and hash recomputed, and the stored head set to the new end.
fn rewrite(c: &Connection, rows: &[Row]) {
    c.execute("DELETE FROM audit", []).unwrap();
    let mut prev = audit::GENESIS_HASH.to_owned();
    for (i, r) in rows.iter().enumerate() {
        let seq = i as u64 + 1;
        let e = AuditEntry {
            time: r.1.clone(),
            actor: r.3.clone(),
            source: r.4.clone(),
            action: r.5.clone(),
            target: r.6.clone(),
            outcome: Outcome::parse(&r.7).unwrap(),
            details: r.8.clone(),
        };
        let hash = audit::compute_hash(seq, &prev, &e);
        c.execute(
            "INSERT INTO audit(seq, time, time_ns, actor, source, action, target, outcome, details, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![seq as i64, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, prev, hash],
        )
        .unwrap();
        prev = hash;
    }
    c.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'audit_head'",
        [rows.len().to_string()],
    )
    .unwrap();
}

fn anchors(dir: &Path) -> AnchorSet {
    let key = std::fs::read_to_string(dir.join("audit-signing.pub")).unwrap();
    AnchorSet {
        key: CheckpointPublicKey::parse(&key).unwrap(),
        checkpoints: jitgate_store::checkpoint::read(&dir.join("audit-checkpoints.jsonl")).unwrap(),
    }
}

fn verify(dir: &Path) -> audit::VerifyReport {
    jitgate_store_sql::verify_file(&dir.join(jitgate_controller::DB_FILE), Some(&anchors(dir)))
        .unwrap()
}

type Tamper = fn(&Connection);

fn variants() -> Vec<(&'static str, Tamper)> {
    vec![
        ("delete the last events", |c| {
            c.execute(
                "DELETE FROM audit WHERE seq > (SELECT max(seq) - 3 FROM audit)",
                [],
            )
            .unwrap();
        }),
        ("delete the last events and edit the stored head", |c| {
            c.execute(
                "DELETE FROM audit WHERE seq > (SELECT max(seq) - 3 FROM audit)",
                [],
            )
            .unwrap();
            c.execute(
                "UPDATE meta SET value = (SELECT max(seq) FROM audit) WHERE key = 'audit_head'",
                [],
            )
            .unwrap();
        }),
        ("delete every event", |c| {
            c.execute("DELETE FROM audit", []).unwrap();
            c.execute("DELETE FROM meta WHERE key = 'audit_head'", [])
                .unwrap();
        }),
        (
            "delete the last events and append a forged, linked event",
            |c| {
                let mut r = rows(c);
                r.truncate(r.len() - 3);
                let mut extra = r[r.len() - 1].clone();
                extra.5 = "policy.write".into();
                r.push(extra);
                rewrite(c, &r);
            },
        ),
        ("edit an event without rehashing", |c| {
            c.execute("UPDATE audit SET details = '{\"x\":1}' WHERE seq = 3", [])
                .unwrap();
        }),
        ("edit the actor of an event and rehash the rest", |c| {
            let mut r = rows(c);
            r[4].3 = "someone-else".into();
            rewrite(c, &r);
        }),
        ("edit an outcome and rehash the rest", |c| {
            let mut r = rows(c);
            r[2].7 = "denied".into();
            rewrite(c, &r);
        }),
        ("edit the details of the newest event and rehash it", |c| {
            let mut r = rows(c);
            let n = r.len() - 1;
            r[n].8 = "{}".into();
            rewrite(c, &r);
        }),
        ("change only the time index (time_ns)", |c| {
            c.execute(
                "UPDATE audit SET time_ns = time_ns - 86400000000000 WHERE seq = 4",
                [],
            )
            .unwrap();
        }),
        ("change the time text without rehashing", |c| {
            c.execute(
                "UPDATE audit SET time = '2020-01-01T00:00:00Z' WHERE seq = 4",
                [],
            )
            .unwrap();
        }),
        ("change the time of an event and rehash the rest", |c| {
            let mut r = rows(c);
            r[3].1 = "2020-01-01T00:00:00Z".into();
            r[3].2 = 1_577_836_800_000_000_000;
            rewrite(c, &r);
        }),
        ("insert an event in the middle and rehash the rest", |c| {
            let mut r = rows(c);
            let mut e = r[3].clone();
            e.5 = "token.create".into();
            r.insert(4, e);
            rewrite(c, &r);
        }),
        ("delete an event in the middle without rehashing", |c| {
            c.execute("DELETE FROM audit WHERE seq = 5", []).unwrap();
        }),
        ("delete an event in the middle and rehash the rest", |c| {
            let mut r = rows(c);
            r.remove(5);
            rewrite(c, &r);
        }),
        ("swap two events without rehashing", |c| {
            c.execute("UPDATE audit SET seq = -1 WHERE seq = 3", [])
                .unwrap();
            c.execute("UPDATE audit SET seq = 3 WHERE seq = 4", [])
                .unwrap();
            c.execute("UPDATE audit SET seq = 4 WHERE seq = -1", [])
                .unwrap();
        }),
        ("swap two events and rehash the rest", |c| {
            let mut r = rows(c);
            r.swap(3, 4);
            rewrite(c, &r);
        }),
        ("replace the whole chain with a consistent forgery", |c| {
            let mut r = rows(c);
            for row in &mut r {
                row.4 = "10.9.9.9".into();
            }
            rewrite(c, &r);
        }),
        ("edit a previous-hash link", |c| {
            c.execute("UPDATE audit SET prev_hash = hash WHERE seq = 6", [])
                .unwrap();
        }),
        ("renumber an event", |c| {
            c.execute(
                "UPDATE audit SET seq = 1000 WHERE seq = (SELECT max(seq) FROM audit)",
                [],
            )
            .unwrap();
        }),
    ]
}

#[tokio::test]
async fn an_untouched_log_verifies_against_its_checkpoints_and_restarts() {
    let dir = installed().await;
    let r = verify(dir.path());
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(
        r.anchored_at,
        Some(r.last_seq),
        "the shutdown checkpoint covers the end"
    );
    let ctl = Ctl::start_in(dir).await;
    let v = ctl.get("/api/v1/audit/verify").await;
    assert_eq!(v.body["ok"], true, "{:?}", v.body);
    assert!(v.body["checkpoints"].as_u64().unwrap() >= 1);
    assert_eq!(v.body["publicKey"].as_str().unwrap().len(), 64);
}

#[tokio::test]
async fn every_tampering_is_caught_by_verify_and_at_start() {
    let mut missed = Vec::new();
    for (name, tamper) in variants() {
        let dir = installed().await;
        assert!(verify(dir.path()).ok());
        tamper(&db(dir.path()));
        let report = verify(dir.path());
        if report.ok() {
            missed.push(format!("verify missed: {name}"));
        }
        match jitgate_controller::start(config(dir.path().to_owned())).await {
            Ok(r) => {
                r.shutdown().await.unwrap();
                missed.push(format!("the controller started on: {name}"));
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("--accept-audit-break"), "{name}: {msg}");
            }
        }
    }
    assert!(missed.is_empty(), "{missed:#?}");
}

#[tokio::test]
async fn accepting_a_break_is_audited_and_anchors_the_log_anew() {
    let dir = installed().await;
    let (_, tamper) = variants().remove(1);
    tamper(&db(dir.path()));
    let mut ctl = Ctl::start_with(dir, |c| c.accept_audit_break = true).await;
    let ev = ctl.audit("action=audit.break_accepted").await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(
        ev[0]["details"]["problem"]
            .as_str()
            .unwrap()
            .contains("checkpoint"),
        "{ev:?}"
    );
    // verify still reports the old break (history is not rewritten)...
    let v = ctl.get("/api/v1/audit/verify").await;
    assert_eq!(v.body["ok"], false, "{:?}", v.body);
    // ...but the next start is checked against the new anchor and succeeds.
    ctl.stop().await;
    let ctl = Ctl::start_in(ctl.dir).await;
    assert_eq!(ctl.audit("action=audit.break_accepted").await.len(), 1);
}

#[tokio::test]
async fn a_deleted_or_forged_checkpoint_file_stops_the_start() {
    // Deleted: the key exists, the log has events, no checkpoint.
    let dir = installed().await;
    std::fs::remove_file(dir.path().join("audit-checkpoints.jsonl")).unwrap();
    let e = jitgate_controller::start(config(dir.path().to_owned()))
        .await
        .err()
        .expect("started without its checkpoints");
    assert!(format!("{e:#}").contains("no checkpoint"), "{e:#}");

    // Forged: a checkpoint signed by another key appended to the file.
    let dir = installed().await;
    let forger = CheckpointKey::from_seed(&[1; 32]);
    let cp = forger.sign(1, audit::GENESIS_HASH, "2026-01-01T00:00:00Z");
    jitgate_store::checkpoint::append(
        &dir.path().join("audit-checkpoints.jsonl"),
        &cp,
        &forger.public(),
    )
    .unwrap();
    let e = jitgate_controller::start(config(dir.path().to_owned()))
        .await
        .err()
        .expect("started with a forged checkpoint");
    assert!(format!("{e:#}").contains("not signed"), "{e:#}");
    assert!(
        verify(dir.path())
            .problems
            .contains(&audit::Problem::BadCheckpointSignature { seq: 1 })
    );
}

#[tokio::test]
async fn a_replaced_signing_key_is_caught_with_the_exported_public_key() {
    // An attacker with the whole data directory replaces the key, rewrites the log and
    // re-signs the checkpoint file. The controller starts (it trusts its directory),
    // but verifying with the public key exported at installation finds it.
    let dir = installed().await;
    let exported = std::fs::read_to_string(dir.path().join("audit-signing.pub")).unwrap();
    let c = db(dir.path());
    let mut r = rows(&c);
    r.remove(2);
    rewrite(&c, &r);
    let forger = CheckpointKey::from_seed(&[5; 32]);
    std::fs::write(
        dir.path().join("audit-signing.key"),
        format!("{}\n", hex::encode(forger.seed())),
    )
    .unwrap();
    let (seq, hash): (i64, String) = c
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let cp_file = dir.path().join("audit-checkpoints.jsonl");
    std::fs::remove_file(&cp_file).unwrap();
    jitgate_store::checkpoint::append(
        &cp_file,
        &forger.sign(seq as u64, &hash, "t"),
        &forger.public(),
    )
    .unwrap();
    let honest = AnchorSet {
        key: CheckpointPublicKey::parse(&exported).unwrap(),
        checkpoints: jitgate_store::checkpoint::read(&cp_file).unwrap(),
    };
    let report = jitgate_store_sql::verify_file(
        &dir.path().join(jitgate_controller::DB_FILE),
        Some(&honest),
    )
    .unwrap();
    assert!(
        report
            .problems
            .contains(&audit::Problem::BadCheckpointSignature { seq: seq as u64 }),
        "{:?}",
        report.problems
    );
    assert_eq!(report.anchored_at, None);
}
