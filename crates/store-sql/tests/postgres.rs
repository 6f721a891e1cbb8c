//! The PostgreSQL engine: the whole conformance suite and the lifecycle model against
//! a real server (see `testpg`), plus what only a shared database has: several
//! controllers (stores) writing one database at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jitgate_core::ids::SubscriptionId;
use jitgate_store::conformance::model::{self, ModelBackend};
use jitgate_store::*;
use jitgate_store_sql::testpg::TestDb;
use jitgate_store_sql::{SqlStore, StoreOptions};

async fn open(db: &TestDb) -> SqlStore {
    SqlStore::connect_postgres(&db.url, StoreOptions::default())
        .await
        .unwrap()
}

async fn fresh() -> (Box<dyn Store>, TestDb) {
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let store = open(&db).await;
    (Box::new(store), db)
}

jitgate_store::store_conformance_tests!(fresh);

/// The request lifecycle against the reference model; a restart connects again.
struct Postgres;

#[async_trait::async_trait]
impl ModelBackend for Postgres {
    type Data = TestDb;

    async fn create() -> TestDb {
        tokio::task::spawn_blocking(TestDb::create).await.unwrap()
    }

    async fn open(db: &TestDb) -> Box<dyn Store> {
        Box::new(open(db).await)
    }
}

#[test]
fn request_lifecycle_matches_the_model() {
    model::run::<Postgres>();
}

// ---- one database, several controllers ------------------------------------------------

/// Two stores on one new database, as two controllers open it (at the same time: the
/// schema is migrated once, under its lock).
async fn two_on_one() -> (SqlStore, SqlStore, TestDb) {
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let (a, b) = tokio::join!(open(&db), open(&db));
    (a, b, db)
}

#[tokio::test]
async fn shared_writers_keep_one_chain() {
    let (a, b, _db) = two_on_one().await;
    jitgate_store::conformance::shared_writers_keep_one_chain(&a, &b).await;
}

#[tokio::test]
async fn shared_expiry_happens_once() {
    let (a, b, _db) = two_on_one().await;
    jitgate_store::conformance::shared_expiry_happens_once(&a, &b).await;
}

/// A commit through one store rings the other's doorbell.
#[tokio::test]
async fn a_commit_rings_the_other_stores_doorbell() {
    let (a, b, _db) = two_on_one().await;
    let mut bell = b
        .shared_changes()
        .expect("a shared database has a doorbell");
    let seen = *bell.borrow_and_update();
    a.bootstrap(
        Bootstrap {
            subscription: SubscriptionId::parse(jitgate_store::conformance::SUB).unwrap(),
            owner_principal: "alice".into(),
            owner_token: TokenRecord {
                id: "jg_boot".into(),
                principal: "alice".into(),
                secret_hash: "ab".repeat(32),
                description: "bootstrap".into(),
                created: jitgate_store::conformance::t0(),
                expires: None,
                revoked: None,
            },
        },
        AuditCtx {
            actor: "system".into(),
            source: "test".into(),
            now: jitgate_store::conformance::t0(),
        },
    )
    .await
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), bell.changed())
        .await
        .expect("the doorbell rang")
        .unwrap();
    assert_ne!(*bell.borrow(), seen);
}

// ---- moving an installation over ------------------------------------------------------

async fn all_vms(store: &dyn Store) -> Vec<VmRecord> {
    let sub = SubscriptionId::parse(jitgate_store::conformance::SUB).unwrap();
    let all = VmFilter {
        limit: 1_000,
        ..Default::default()
    };
    store.find_vms(sub, &all).await.unwrap()
}

/// An SQLite installation copied into PostgreSQL reads the same through the store, and
/// its audit chain is intact (same events, same head); a second copy into the same
/// database is refused and changes nothing.
#[tokio::test]
async fn an_sqlite_installation_moves_to_postgres_with_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jitgate.db");
    let lite = SqlStore::open(&file).unwrap();
    // A scene, 80 requests and their audit events.
    jitgate_store::conformance::shared_writers_keep_one_chain(&lite, &lite).await;
    let all = RequestFilter {
        limit: 1_000,
        ..Default::default()
    };
    let requests = lite.list_requests(&all).await.unwrap();
    let chain = lite.verify_audit(None).await.unwrap();
    let vms = all_vms(&lite).await;
    drop(lite);

    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let (f, url) = (file.clone(), db.url.clone());
    let report =
        tokio::task::spawn_blocking(move || jitgate_store_sql::copy_sqlite_to_postgres(&f, &url))
            .await
            .unwrap()
            .unwrap();
    assert!(report.audit.ok());
    assert_eq!(report.audit.count, chain.count);
    assert_eq!(report.audit.head_hash, chain.head_hash);
    assert!(
        report
            .tables
            .iter()
            .any(|(t, n)| *t == "requests" && *n == 80)
    );

    let pg = open(&db).await;
    assert_eq!(pg.list_requests(&all).await.unwrap(), requests);
    assert_eq!(all_vms(&pg).await, vms);
    let verified = pg.verify_audit(None).await.unwrap();
    assert_eq!(
        (verified.count, verified.head_hash),
        (chain.count, chain.head_hash.clone())
    );

    // Into a database that holds an installation: refused, nothing changed.
    let (f, url) = (file.clone(), db.url.clone());
    let again =
        tokio::task::spawn_blocking(move || jitgate_store_sql::copy_sqlite_to_postgres(&f, &url))
            .await
            .unwrap();
    assert!(again.is_err(), "{again:?}");
    assert_eq!(pg.verify_audit(None).await.unwrap().count, chain.count);
}

/// A source file someone tampered with cannot bring SQL of its own into the copy
/// through a column name: refused, and nothing is copied.
#[tokio::test]
async fn a_tampered_source_cannot_inject_sql_through_a_column_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jitgate.db");
    let lite = SqlStore::open(&file).unwrap();
    jitgate_store::conformance::shared_expiry_happens_once(&lite, &lite).await;
    drop(lite);
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute_batch(r#"ALTER TABLE vms ADD COLUMN "name_key) SELECT 1; --" TEXT"#)
        .unwrap();
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let (f, url) = (file.clone(), db.url.clone());
    let r =
        tokio::task::spawn_blocking(move || jitgate_store_sql::copy_sqlite_to_postgres(&f, &url))
            .await
            .unwrap();
    assert!(
        matches!(&r, Err(StoreError::Corrupt(m)) if m.contains("column")),
        "{r:?}"
    );
    let pg = open(&db).await;
    assert!(
        pg.subscriptions().await.unwrap().is_empty(),
        "nothing was copied"
    );
}
