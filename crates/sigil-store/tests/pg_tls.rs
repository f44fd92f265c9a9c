//! The store and `connect_postgres` on a PostgreSQL that accepts only TLS on TCP (the fixture
//! of the `sigil` crate's tests): `verify-full` with the right CA and host connects over TLS;
//! an unrelated CA, plaintext and a host the certificate does not name are refused. Skipped
//! (not failed) only when no PostgreSQL server binaries are installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../../sigil/tests/common/pg_tls.rs"]
mod pg_tls;

use pg_tls::PgTls;
use sigil_store::{Backend, SqlStore, StoreError, connect_postgres};

#[tokio::test]
async fn verify_full_connects_over_tls_and_refuses_what_it_must() {
    let Some(pg) = PgTls::start("verify_full_connects_over_tls_and_refuses_what_it_must") else {
        return;
    };
    let url = pg.verify_full_url();

    let mut conn = connect_postgres(&url).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl, "connect_postgres did not use TLS");

    let store = SqlStore::connect(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    store.close().await;
    assert_ne!(
        pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'entries'"),
        "0",
        "the store did not migrate over TLS"
    );

    let refused = [
        (
            pg.url("localhost", "verify-full", Some(&pg.other_ca)),
            "UnknownIssuer",
        ),
        (pg.url("localhost", "disable", None), "no encryption"),
        (
            pg.url("127.0.0.1", "verify-full", Some(&pg.ca)),
            "not valid for name",
        ),
    ];
    for (url, why) in &refused {
        match connect_postgres(url).await {
            Err(StoreError::Database(e)) => assert!(e.to_string().contains(why), "{url}: {e}"),
            other => panic!("{url}: {other:?}"),
        }
        match SqlStore::connect(url).await {
            Err(StoreError::Database(e)) => assert!(e.to_string().contains(why), "{url}: {e}"),
            other => panic!("{url}: {:?}", other.map(|_| ())),
        }
    }

    // The same address without verification connects: the refusal by IP above was the
    // certificate check. (`verify-ca` is no way to show it: sqlx 0.8.6 only skips rustls's
    // old `NotValidForName`, not the `NotValidForNameContext` rustls 0.23 now reports, so
    // `verify-ca` checks the name too.)
    let mut conn = connect_postgres(&pg.url("127.0.0.1", "require", None))
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl);
}
