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
    let db = tokio::task::spawn_blocking(TestDb::empty).await.unwrap();
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

/// Creates the installation (subscription, owner) through `store`.
async fn bootstrap(store: &SqlStore) {
    store
        .bootstrap(
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
                    identity: None,
                    last_used: None,
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
}

/// A commit through one store rings the other's doorbell.
#[tokio::test]
async fn a_commit_rings_the_other_stores_doorbell() {
    let (a, b, _db) = two_on_one().await;
    let mut bell = b
        .shared_changes()
        .expect("a shared database has a doorbell");
    let seen = *bell.borrow_and_update();
    bootstrap(&a).await;
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

    // Into a new database, as an installation moves: the copy creates the schema.
    let db = tokio::task::spawn_blocking(TestDb::empty).await.unwrap();
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

// ---- TLS ---------------------------------------------------------------------------

/// A certificate authority: its certificate (PEM) and what signs with it.
fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let pem = p.self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(p, key))
}

/// A PostgreSQL server with TLS on (a certificate for `localhost` from its own CA);
/// returns its port, the directory holding `ca.pem` (the server's CA) and
/// `other-ca.pem` (a CA that signed nothing of it).
fn tls_server() -> (u16, std::path::PathBuf) {
    use jitgate_store_sql::testpg;
    let bin = testpg::bin_dir();
    let dir = testpg::server_dir("jitgate-test-pg-tls");
    testpg::clean_up_after_exit(&bin, &dir);
    let data = testpg::init_data_dir(&bin, &dir, "data");
    let (ca_pem, issuer) = ca("server");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("other-ca.pem"), ca("other").0).unwrap();
    let (crt, pk) = (data.join("server.crt"), data.join("server.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&pk, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pk, std::fs::Permissions::from_mode(0o600)).unwrap();
    testpg::give_to_server_user(&crt);
    testpg::give_to_server_user(&pk);
    let port = testpg::free_port();
    testpg::start_server(&bin, &data, port, &dir, "-c ssl=on");
    testpg::psql_at(
        &bin,
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        "CREATE DATABASE tls",
    );
    (port, dir)
}

async fn connect_err(url: &str) -> String {
    match SqlStore::connect_postgres(url, StoreOptions::default()).await {
        Ok(_) => panic!("{url}: connected"),
        Err(e) => e.to_string(),
    }
}

/// Every connection of a store is TLS when the URL asks for it, and the server's
/// certificate is verified: its chain against `sslrootcert` (or the system's roots) and
/// its name against the host. A server without TLS is refused, never used in the clear.
#[tokio::test]
async fn tls_connections_are_verified() {
    let (port, dir) = tokio::task::spawn_blocking(tls_server).await.unwrap();
    let ca = dir.join("ca.pem");
    let other = dir.join("other-ca.pem");

    // Trusted CA, right name, both URL forms: the store works, over TLS only.
    let url = format!(
        "postgres://postgres@localhost:{port}/tls?sslmode=verify-full&sslrootcert={}",
        ca.display()
    );
    let store = SqlStore::connect_postgres(&url, StoreOptions::default())
        .await
        .unwrap();
    bootstrap(&store).await;
    let kv = format!(
        "host=localhost port={port} user=postgres dbname=tls sslmode=require sslrootcert={}",
        ca.display()
    );
    let second = SqlStore::connect_postgres(&kv, StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(second.subscriptions().await.unwrap().len(), 1);
    let bin = jitgate_store_sql::testpg::bin_dir();
    let count = |ssl: bool| {
        jitgate_store_sql::testpg::psql_at(
            &bin,
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'jitgate' AND s.ssl = {ssl}"
            ),
        )
        .parse::<u32>()
        .unwrap()
    };
    assert!(count(true) >= 2, "the stores' connections use TLS");
    assert_eq!(
        count(false),
        0,
        "no connection of the stores is in the clear"
    );
    drop((store, second));

    // An untrusted chain: the system's roots, or a CA that signed nothing of it.
    let e = connect_err(&format!(
        "postgres://postgres@localhost:{port}/tls?sslmode=require"
    ))
    .await;
    assert!(e.contains("certificate"), "{e}");
    let e = connect_err(&format!(
        "postgres://postgres@localhost:{port}/tls?sslmode=require&sslrootcert={}",
        other.display()
    ))
    .await;
    assert!(e.contains("certificate"), "{e}");
    // The right CA, the wrong name (the certificate is for localhost).
    let e = connect_err(&format!(
        "postgres://postgres@127.0.0.1:{port}/tls?sslmode=require&sslrootcert={}",
        ca.display()
    ))
    .await;
    assert!(e.contains("certificate"), "{e}");
    // A missing CA file is named.
    let e = connect_err(&format!(
        "postgres://postgres@localhost:{port}/tls?sslmode=require&sslrootcert=/nonexistent/ca.pem"
    ))
    .await;
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    // A server without TLS (the shared test server) when TLS is required.
    let plain = jitgate_store_sql::testpg::server().url("postgres");
    let e = connect_err(&format!("{plain} sslmode=require")).await;
    assert!(e.to_lowercase().contains("tls") || e.contains("SSL"), "{e}");
}
