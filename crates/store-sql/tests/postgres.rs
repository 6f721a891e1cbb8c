//! The PostgreSQL engine: the whole conformance suite and the lifecycle model against
//! a real server (see `testpg`), plus what only a shared database has: several
//! controllers (stores) writing one database at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

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
