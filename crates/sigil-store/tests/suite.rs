//! The store's one test suite, run against SQLite (always) and PostgreSQL (when
//! `SIGIL_TEST_POSTGRES_URL` is set; required when `CI` is set).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use sigil_core::{EntryId, EntrySpec, RegistrationEntry, Selector, SpiffeId};
use sigil_store::{
    AuthorityKind, AuthorityRecord, AuthorityState, Backend, DbRoleRecord, EntryFilter,
    IdentityKind, IssuedIdentity, JoinTokenError, LeaseFilter, LeaseRecord, ModelKeyRecord,
    NodeRecord, PolicyBundleRecord, QuarantineRecord, Revocation, SCHEMA_VERSION,
    SecretVersionRecord, SqlStore, Store, StoreError,
};
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

const T0: i64 = 1_700_000_000;
const PG_ENV: &str = "SIGIL_TEST_POSTGRES_URL";

// ---------------------------------------------------------------------------------------------
// Harness: one database per test, reopenable, with raw SQL access behind the store's back.
// ---------------------------------------------------------------------------------------------

enum Db {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        base_url: String,
        schema: String,
    },
}

impl Db {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sigil.db");
        Db::Sqlite { _dir: dir, path }
    }

    /// A fresh schema on the test PostgreSQL, or `None` (after saying so) when none is configured.
    async fn postgres(test: &str) -> Option<Self> {
        let Ok(base_url) = std::env::var(PG_ENV) else {
            if std::env::var_os("CI").is_some() {
                panic!("{PG_ENV} is not set but CI is: the PostgreSQL suite must run in CI");
            }
            // Straight to stderr, past the test harness's capture, so the skip is visible.
            let _ = writeln!(
                std::io::stderr(),
                "postgres::{test} skipped: set {PG_ENV} (e.g. postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL tests"
            );
            return None;
        };
        let schema = format!("sigil_t_{}", uuid::Uuid::new_v4().simple());
        let admin = raw_pool(&base_url).await;
        sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        Some(Db::Postgres { base_url, schema })
    }

    fn url(&self) -> String {
        match self {
            Db::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
            Db::Postgres { base_url, schema } => {
                let sep = if base_url.contains('?') { '&' } else { '?' };
                format!("{base_url}{sep}options=-c%20search_path%3D{schema}")
            }
        }
    }

    async fn open(&self) -> SqlStore {
        SqlStore::connect(&self.url()).await.unwrap()
    }

    /// A pool on the same database that bypasses the store, for tampering.
    async fn raw(&self) -> AnyPool {
        raw_pool(&self.url()).await
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Runs even when the test panicked, so no schema is left behind.
        if let Db::Postgres { base_url, schema } = self {
            let (url, sql) = (base_url.clone(), format!("DROP SCHEMA {schema} CASCADE"));
            let done = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async {
                        let pool = raw_pool(&url).await;
                        let _ = sqlx::raw_sql(&sql).execute(&pool).await;
                        pool.close().await;
                    });
            });
            let _ = done.join();
        }
    }
}

async fn raw_pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap()
}

/// Runs each listed `async fn(&Db)` once on SQLite and once on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::Db::sqlite();
                    super::$name(&db).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::Db::postgres(stringify!($name)).await else {
                        return;
                    };
                    super::$name(&db).await;
                }
            )+
        }
    };
}

on_both_backends!(
    entries_round_trip_and_filters,
    entries_written_without_the_enforcer_column_are_not_enforcers,
    duplicate_entries_conflict,
    not_found_paths,
    revisions_strictly_increase,
    nodes_round_trip_and_eviction,
    join_tokens_are_single_use,
    join_token_race_has_one_winner,
    issued_identities,
    issued_batches_are_atomic,
    revocation_by_serial,
    revocation_by_spiffe_id_respects_issued_at,
    revocation_expiry_and_pruning,
    authorities_lifecycle,
    bundle_sequence,
    policy_bundles_and_policy_keys,
    durable_across_reopen_and_migrations_idempotent,
    corrupt_rows_are_reported_not_panicked_on,
    newer_schema_is_refused,
    backend_is_reported,
    concurrent_first_opens_migrate_once,
    model_keys_register_once_and_seal_once,
    secrets_are_versioned_and_deleted_for_good,
    db_roles_and_leases_open_extend_and_close_once,
    node_risk_and_quarantines,
);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn sel(s: &[&str]) -> Vec<Selector> {
    s.iter().map(|s| Selector::parse(s).unwrap()).collect()
}

fn spec(spiffe: &str, parent: &str, selectors: &[&str]) -> EntrySpec {
    EntrySpec {
        spiffe_id: id(spiffe),
        parent_id: id(parent),
        selectors: sel(selectors),
        x509_ttl_secs: 3600,
        jwt_ttl_secs: 300,
        dns_names: vec![],
        groups: vec![],
        scopes: vec![],
        enforcer: false,
        node_selectors: vec![],
    }
}

fn entry(spec: EntrySpec) -> RegistrationEntry {
    RegistrationEntry {
        id: EntryId::random(),
        spec,
        revision: 1,
        created_at: T0,
        updated_at: T0,
    }
}

/// An entry with every field away from its default.
fn full_entry() -> RegistrationEntry {
    RegistrationEntry {
        id: EntryId::random(),
        spec: EntrySpec {
            spiffe_id: id("spiffe://td/ns/prod/sa/api"),
            parent_id: id("spiffe://td/sigil/node/n1"),
            selectors: sel(&[
                "unix:uid:1000",
                "unix:path:/usr/bin/api server",
                &format!("unix:sha256:{}", "ab".repeat(32)),
            ]),
            x509_ttl_secs: 7200,
            jwt_ttl_secs: 600,
            dns_names: vec!["api.local".into(), "*.api.internal".into()],
            groups: vec!["factory-floor".into(), "tier:gold".into()],
            scopes: vec!["model:invoke".into(), "read".into()],
            enforcer: true,
            node_selectors: vec![
                "tpm:secureboot:true".into(),
                format!("tpm:pcr:7:{}", "cd".repeat(32)),
            ],
        },
        revision: 3,
        created_at: T0 - 100,
        updated_at: T0 - 50,
    }
}

fn node(n: &str) -> NodeRecord {
    NodeRecord {
        spiffe_id: id(&format!("spiffe://td/sigil/node/{n}")),
        attestation_type: "join_token".into(),
        serial: format!("0a{n}ff"),
        not_after: T0 + 3600,
        evicted: false,
        selectors: Vec::new(),
        created_at: T0,
        updated_at: T0 + 1,
    }
}

fn issued(kind: IdentityKind, serial: &str, who: &str, issued_at: i64) -> IssuedIdentity {
    IssuedIdentity {
        kind,
        serial_or_jti: serial.into(),
        spiffe_id: id(who),
        thumbprint: "cd".repeat(32),
        audience: match kind {
            IdentityKind::X509Svid => vec![],
            _ => vec!["https://api.example".into(), "spiffe://td/b".into()],
        },
        issued_at,
        not_after: issued_at + 3600,
        requester: "spiffe://td/sigil/node/n1".into(),
    }
}

fn authority(key_id: &str, kind: AuthorityKind, created_at: i64) -> AuthorityRecord {
    AuthorityRecord {
        id: key_id.into(),
        kind,
        state: AuthorityState::Prepared,
        public_der: vec![0x30, 0x82, 0x00, 0xff, 0x00, 0x01, 0x7f, 0x80],
        key_ref: format!("/var/lib/sigil/keys/{key_id}.pem"),
        algorithm: "ES256".into(),
        not_after: created_at + 86_400 * 30,
        last_use_expiry: 0,
        created_at,
        activated_at: None,
    }
}

fn token_hash(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn revocation(serial: Option<&str>, spiffe: Option<&str>, revoked_at: i64) -> Revocation {
    Revocation {
        id: 0,
        serial: serial.map(Into::into),
        spiffe_id: spiffe.map(id),
        reason: "key compromise".into(),
        revoked_at,
        expires_at: revoked_at + 3600,
    }
}

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

async fn entries_round_trip_and_filters(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let e = full_entry();
    s.create_entry(&e).await.unwrap();
    assert_eq!(s.get_entry(&e.id).await.unwrap(), e, "every field survives");

    let a = entry(spec("spiffe://td/a", "spiffe://td/n1", &["unix:uid:1"]));
    let b = entry(spec("spiffe://td/b", "spiffe://td/n2", &["unix:uid:2"]));
    let a2 = entry(spec("spiffe://td/a", "spiffe://td/n2", &["unix:uid:3"]));
    for x in [&b, &a2, &a] {
        s.create_entry(x).await.unwrap();
    }
    assert_eq!(s.count_entries().await.unwrap(), 4);

    // Ordered by spiffe_id, then id.
    let all = s.list_entries(&EntryFilter::default()).await.unwrap();
    let keys: Vec<_> = all
        .iter()
        .map(|e| (e.spec.spiffe_id.to_string(), e.id.to_string()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(all.len(), 4);

    let by_parent = s
        .list_entries(&EntryFilter {
            parent_id: Some(id("spiffe://td/n2")),
            spiffe_id: None,
        })
        .await
        .unwrap();
    assert_eq!(
        by_parent.iter().map(|e| &e.id).collect::<HashSet<_>>(),
        HashSet::from([&b.id, &a2.id])
    );
    let by_id = s
        .list_entries(&EntryFilter {
            parent_id: None,
            spiffe_id: Some(id("spiffe://td/a")),
        })
        .await
        .unwrap();
    assert_eq!(
        by_id.iter().map(|e| &e.id).collect::<HashSet<_>>(),
        HashSet::from([&a.id, &a2.id])
    );
    let both = s
        .list_entries(&EntryFilter {
            parent_id: Some(id("spiffe://td/n2")),
            spiffe_id: Some(id("spiffe://td/a")),
        })
        .await
        .unwrap();
    assert_eq!(both, vec![a2.clone()]);
    let none = s
        .list_entries(&EntryFilter {
            parent_id: Some(id("spiffe://td/nobody")),
            spiffe_id: None,
        })
        .await
        .unwrap();
    assert!(none.is_empty());

    // Update: spec replaced, revision + 1, updated_at = now, created_at kept.
    let mut new_spec = spec(
        "spiffe://td/ns/prod/sa/api2",
        "spiffe://td/sigil/node/n9",
        &["unix:gid:7", "unix:user:www-data"],
    );
    new_spec.groups = vec!["g2".into()];
    new_spec.x509_ttl_secs = 120;
    let updated = s.update_entry(&e.id, &new_spec, T0 + 500).await.unwrap();
    assert_eq!(updated.spec, new_spec);
    assert_eq!(updated.revision, e.revision + 1);
    assert_eq!(updated.updated_at, T0 + 500);
    assert_eq!(updated.created_at, e.created_at);
    assert_eq!(updated.id, e.id);
    assert_eq!(s.get_entry(&e.id).await.unwrap(), updated);
    let again = s.update_entry(&e.id, &new_spec, T0 + 600).await.unwrap();
    assert_eq!(again.revision, e.revision + 2);

    // The enforcer flag: dropped by the update above (full_entry sets it), set again here,
    // and read back by get and list alike.
    assert!(e.spec.enforcer);
    assert!(!again.spec.enforcer);
    let mut enforcer_spec = new_spec.clone();
    enforcer_spec.enforcer = true;
    let flagged = s
        .update_entry(&e.id, &enforcer_spec, T0 + 650)
        .await
        .unwrap();
    assert!(flagged.spec.enforcer);
    assert_eq!(s.get_entry(&e.id).await.unwrap(), flagged);
    let listed = s.list_entries(&EntryFilter::default()).await.unwrap();
    let enforcers: Vec<_> = listed
        .iter()
        .filter(|x| x.spec.enforcer)
        .map(|x| &x.id)
        .collect();
    assert_eq!(enforcers, [&e.id]);
    s.update_entry(&e.id, &new_spec, T0 + 700).await.unwrap();

    s.delete_entry(&e.id).await.unwrap();
    assert!(matches!(
        s.get_entry(&e.id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.count_entries().await.unwrap(), 3);
    // The old spec's selectors are free again once it is gone.
    s.create_entry(&entry(new_spec)).await.unwrap();
}

async fn entries_written_without_the_enforcer_column_are_not_enforcers(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    // A row as schema v5 wrote it (no `enforcer` column): the migration's default applies.
    let raw = db.raw().await;
    let eid = EntryId::random();
    sqlx::query(
        "INSERT INTO entries (id, spiffe_id, parent_id, selectors_json, dedup_key, \
         x509_ttl_secs, jwt_ttl_secs, dns_names_json, groups_json, scopes_json, revision, \
         created_at, updated_at) \
         VALUES ($1, 'spiffe://td/old', 'spiffe://td/n', '[\"unix:uid:1\"]', $2, 3600, 300, \
         '[]', '[]', '[]', 1, 0, 0)",
    )
    .bind(eid.as_str())
    .bind("ef".repeat(32))
    .execute(&raw)
    .await
    .unwrap();
    let got = s.get_entry(&eid).await.unwrap();
    assert!(!got.spec.enforcer);
    // Only 0 and 1 are stored.
    let bad = sqlx::query("UPDATE entries SET enforcer = 2 WHERE id = $1")
        .bind(eid.as_str())
        .execute(&raw)
        .await;
    assert!(bad.is_err(), "{bad:?}");
    raw.close().await;
}

async fn duplicate_entries_conflict(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let sels = ["unix:uid:1000", "unix:gid:50", "unix:user:svc"];
    let first = entry(spec("spiffe://td/app", "spiffe://td/node", &sels));
    s.create_entry(&first).await.unwrap();
    let rev = s.entries_revision().await.unwrap();

    // Same selectors in another order, and with a repeat: still the same set.
    for order in [
        vec!["unix:user:svc", "unix:uid:1000", "unix:gid:50"],
        vec![
            "unix:gid:50",
            "unix:user:svc",
            "unix:uid:1000",
            "unix:gid:50",
        ],
    ] {
        let dup = entry(spec("spiffe://td/app", "spiffe://td/node", &order));
        let err = s.create_entry(&dup).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert!(matches!(
            s.get_entry(&dup.id).await,
            Err(StoreError::NotFound(_))
        ));
    }
    // Same entry ID.
    let mut same_id = entry(spec(
        "spiffe://td/other",
        "spiffe://td/node",
        &["unix:uid:1"],
    ));
    same_id.id = first.id.clone();
    assert!(matches!(
        s.create_entry(&same_id).await,
        Err(StoreError::Conflict(_))
    ));
    // Failed writes change nothing.
    assert_eq!(s.entries_revision().await.unwrap(), rev);
    assert_eq!(s.count_entries().await.unwrap(), 1);

    // A subset, a different parent, a different SPIFFE ID: all distinct.
    for other in [
        spec("spiffe://td/app", "spiffe://td/node", &sels[..2]),
        spec("spiffe://td/app", "spiffe://td/node2", &sels),
        spec("spiffe://td/app2", "spiffe://td/node", &sels),
    ] {
        s.create_entry(&entry(other)).await.unwrap();
    }
    assert_eq!(s.count_entries().await.unwrap(), 4);

    // Updating an entry into a duplicate of another is a conflict too, and changes nothing.
    let subset = s
        .list_entries(&EntryFilter {
            parent_id: Some(id("spiffe://td/node")),
            spiffe_id: Some(id("spiffe://td/app")),
        })
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.spec.selectors.len() == 2)
        .unwrap();
    let rev = s.entries_revision().await.unwrap();
    let reordered = spec(
        "spiffe://td/app",
        "spiffe://td/node",
        &["unix:gid:50", "unix:user:svc", "unix:uid:1000"],
    );
    assert!(matches!(
        s.update_entry(&subset.id, &reordered, T0 + 9).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.get_entry(&subset.id).await.unwrap(), subset);
    assert_eq!(s.entries_revision().await.unwrap(), rev);
    // Updating an entry to its own (reordered) selectors is not a conflict with itself.
    let own = spec(
        "spiffe://td/app",
        "spiffe://td/node",
        &["unix:gid:50", "unix:uid:1000"],
    );
    s.update_entry(&subset.id, &own, T0 + 10).await.unwrap();
}

async fn not_found_paths(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let missing = EntryId::random();
    let spec = spec("spiffe://td/a", "spiffe://td/n", &["unix:uid:1"]);
    assert!(matches!(
        s.get_entry(&missing).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.update_entry(&missing, &spec, T0).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.delete_entry(&missing).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.entries_revision().await.unwrap(), 0);
    assert_eq!(s.get_node(&id("spiffe://td/none")).await.unwrap(), None);
    assert!(!s.evict_node(&id("spiffe://td/none"), T0).await.unwrap());
    assert_eq!(s.issued_by_serial("00ff").await.unwrap(), None);
    for r in [
        s.set_authority_state("nope", AuthorityState::Active, T0)
            .await,
        s.set_authority_state("nope", AuthorityState::Retired, T0)
            .await,
        s.bump_authority_use("nope", T0).await,
        s.delete_authority("nope").await,
    ] {
        assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    }
    // A deleted entry cannot be deleted twice.
    let e = entry(spec.clone());
    s.create_entry(&e).await.unwrap();
    s.delete_entry(&e.id).await.unwrap();
    assert!(matches!(
        s.delete_entry(&e.id).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn revisions_strictly_increase(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let mut last = s.entries_revision().await.unwrap();
    assert_eq!(last, 0);
    let mut check = async |what: &str| {
        let now = s.entries_revision().await.unwrap();
        assert!(now > last, "{what}: {now} after {last}");
        last = now;
    };
    let e = entry(spec("spiffe://td/a", "spiffe://td/n", &["unix:uid:1"]));
    s.create_entry(&e).await.unwrap();
    check("create").await;
    s.update_entry(&e.id, &e.spec, T0 + 1).await.unwrap();
    check("update (even to the same spec)").await;
    s.delete_entry(&e.id).await.unwrap();
    check("delete").await;

    let mut last = s.revocations_revision().await.unwrap();
    s.add_revocation(&revocation(Some("01"), None, T0))
        .await
        .unwrap();
    let r = s.revocations_revision().await.unwrap();
    assert!(r > last);
    last = r;
    assert_eq!(s.prune_revocations(T0).await.unwrap(), 0);
    assert_eq!(
        s.revocations_revision().await.unwrap(),
        last,
        "pruning nothing changes nothing"
    );
    assert_eq!(s.prune_revocations(T0 + 7200).await.unwrap(), 1);
    assert!(s.revocations_revision().await.unwrap() > last);
}

async fn nodes_round_trip_and_eviction(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let (n1, n2) = (node("n1"), node("n2"));
    s.upsert_node(&n2).await.unwrap();
    s.upsert_node(&n1).await.unwrap();
    assert_eq!(s.get_node(&n1.spiffe_id).await.unwrap(), Some(n1.clone()));
    assert_eq!(s.list_nodes().await.unwrap(), vec![n1.clone(), n2.clone()]);

    // Re-attestation: new serial, expiry and selectors; created_at stays the first one.
    let renewed = NodeRecord {
        serial: "beef".into(),
        selectors: vec!["tpm:secureboot:true".into(), "tpm:pcr:7:ab".into()],
        not_after: T0 + 7200,
        created_at: T0 + 999,
        updated_at: T0 + 1000,
        attestation_type: "join_token".into(),
        ..n1.clone()
    };
    s.upsert_node(&renewed).await.unwrap();
    let got = s.get_node(&n1.spiffe_id).await.unwrap().unwrap();
    assert_eq!(
        got,
        NodeRecord {
            created_at: n1.created_at,
            ..renewed
        }
    );

    assert!(s.evict_node(&n1.spiffe_id, T0 + 2000).await.unwrap());
    let evicted = s.get_node(&n1.spiffe_id).await.unwrap().unwrap();
    assert!(evicted.evicted);
    assert_eq!(evicted.updated_at, T0 + 2000);
    assert!(!s.get_node(&n2.spiffe_id).await.unwrap().unwrap().evicted);
    assert_eq!(
        s.list_evicted_nodes().await.unwrap(),
        vec![n1.spiffe_id.clone()]
    );
    // Re-attesting after an eviction clears it.
    s.upsert_node(&NodeRecord {
        evicted: false,
        ..evicted
    })
    .await
    .unwrap();
    assert!(s.list_evicted_nodes().await.unwrap().is_empty());
}

async fn join_tokens_are_single_use(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let n1 = id("spiffe://td/sigil/node/n1");
    let n2 = id("spiffe://td/sigil/node/n2");
    let (good, expiring) = (token_hash(1), token_hash(2));
    s.create_join_token(&good, T0 + 600, T0).await.unwrap();
    s.create_join_token(&expiring, T0 + 10, T0).await.unwrap();
    assert!(matches!(
        s.create_join_token(&good, T0 + 600, T0).await,
        Err(StoreError::Conflict(_))
    ));
    // Only hashes are stored: a raw token is refused outright.
    assert!(matches!(
        s.create_join_token("my-secret-token", T0 + 600, T0).await,
        Err(StoreError::Invalid(_))
    ));

    let join = |h: String, n: SpiffeId, now: i64| async move {
        match s.consume_join_token(&h, &n, now).await {
            Ok(()) => Ok(()),
            Err(StoreError::JoinToken(e)) => Err(e),
            Err(e) => panic!("unexpected {e:?}"),
        }
    };
    assert_eq!(join(good.clone(), n1.clone(), T0 + 5).await, Ok(()));
    assert_eq!(
        join(good.clone(), n2.clone(), T0 + 6).await,
        Err(JoinTokenError::AlreadyUsed)
    );
    assert_eq!(
        join(token_hash(3), n1.clone(), T0).await,
        Err(JoinTokenError::Unknown)
    );
    // Expiry is exclusive: at expires_at the token is dead.
    assert_eq!(
        join(expiring.clone(), n1.clone(), T0 + 10).await,
        Err(JoinTokenError::Expired)
    );
    assert_eq!(
        join(expiring.clone(), n1.clone(), T0 + 9).await,
        Ok(()),
        "a refused attempt does not burn the token"
    );
    assert_eq!(
        join(expiring, n1, T0 + 100).await,
        Err(JoinTokenError::AlreadyUsed),
        "used wins over expired"
    );
}

async fn join_token_race_has_one_winner(db: &Db) {
    let store: Arc<dyn Store> = Arc::new(db.open().await);
    for round in 0..3u8 {
        let hash = token_hash(0x10 + round);
        store.create_join_token(&hash, T0 + 600, T0).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (store, hash, barrier) = (store.clone(), hash.clone(), barrier.clone());
                tokio::spawn(async move {
                    let node = id(&format!("spiffe://td/sigil/node/racer{i}"));
                    barrier.wait().await;
                    store.consume_join_token(&hash, &node, T0 + 1).await
                })
            })
            .collect();
        let results = futures::future::join_all(tasks).await;
        let mut wins = 0;
        for r in results {
            match r.unwrap() {
                Ok(()) => wins += 1,
                Err(StoreError::JoinToken(JoinTokenError::AlreadyUsed)) => {}
                Err(e) => panic!("round {round}: unexpected {e:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one consumer wins");
    }
}

async fn issued_identities(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let a = "spiffe://td/a";
    let x1 = issued(IdentityKind::X509Svid, "01aa", a, T0);
    let j1 = issued(IdentityKind::JwtSvid, "jti-1", a, T0 + 10);
    let t1 = issued(IdentityKind::AccessToken, "jti-2", "spiffe://td/b", T0 + 20);
    let x2 = issued(IdentityKind::X509Svid, "02bb", a, T0 + 30);
    for i in [&x1, &j1, &t1, &x2] {
        s.record_issued(i).await.unwrap();
    }
    assert!(matches!(
        s.record_issued(&x1).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.count_issued().await.unwrap(), 4);
    assert_eq!(
        s.list_issued(None, 100).await.unwrap(),
        vec![x2.clone(), t1.clone(), j1.clone(), x1.clone()],
        "newest first, all fields intact"
    );
    assert_eq!(
        s.list_issued(Some(&id(a)), 2).await.unwrap(),
        vec![x2.clone(), j1.clone()]
    );
    assert!(s.list_issued(None, 0).await.unwrap().is_empty());
    assert!(s.list_issued(None, -5).await.unwrap().is_empty());
    assert_eq!(s.issued_by_serial("jti-2").await.unwrap(), Some(t1));
    assert_eq!(s.issued_by_serial("02bb").await.unwrap(), Some(x2));
    assert_eq!(s.issued_by_serial("02BB").await.unwrap(), None);
}

async fn issued_batches_are_atomic(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let batch: Vec<_> = (0..5)
        .map(|i| {
            issued(
                IdentityKind::X509Svid,
                &format!("b{i}"),
                "spiffe://td/a",
                T0 + i,
            )
        })
        .collect();
    s.record_issued_batch(&batch).await.unwrap();
    assert_eq!(s.count_issued().await.unwrap(), 5);
    // A batch holding one duplicate records nothing at all.
    let bad = vec![
        issued(IdentityKind::X509Svid, "c1", "spiffe://td/a", T0),
        batch[2].clone(),
        issued(IdentityKind::X509Svid, "c2", "spiffe://td/a", T0),
    ];
    assert!(matches!(
        s.record_issued_batch(&bad).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.count_issued().await.unwrap(), 5);
    assert_eq!(s.issued_by_serial("c1").await.unwrap(), None);
    s.record_issued_batch(&[]).await.unwrap();
}

async fn revocation_by_serial(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let who = id("spiffe://td/a");
    assert!(!s.is_revoked("0abc", &who, T0, T0).await.unwrap());
    let rid = s
        .add_revocation(&revocation(Some("0abc"), None, T0 + 100))
        .await
        .unwrap();
    // Serial revocation: independent of issue time and of the SPIFFE ID asked about.
    assert!(s.is_revoked("0abc", &who, T0, T0 + 200).await.unwrap());
    assert!(
        s.is_revoked("0abc", &id("spiffe://td/z"), T0 + 9999, T0 + 200)
            .await
            .unwrap()
    );
    assert!(!s.is_revoked("0abd", &who, T0, T0 + 200).await.unwrap());
    let listed = s.list_revocations(T0 + 200).await.unwrap();
    assert_eq!(
        listed,
        vec![Revocation {
            id: rid,
            ..revocation(Some("0abc"), None, T0 + 100)
        }]
    );
    // Neither serial nor ID, or an empty serial: refused.
    assert!(matches!(
        s.add_revocation(&revocation(None, None, T0)).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.add_revocation(&revocation(Some(""), None, T0)).await,
        Err(StoreError::Invalid(_))
    ));
    let rid2 = s
        .add_revocation(&revocation(Some("0abd"), Some("spiffe://td/b"), T0))
        .await
        .unwrap();
    assert_ne!(rid, rid2);
}

async fn revocation_by_spiffe_id_respects_issued_at(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let who = id("spiffe://td/a");
    let revoked_at = T0 + 100;
    s.add_revocation(&revocation(None, Some("spiffe://td/a"), revoked_at))
        .await
        .unwrap();
    let now = T0 + 200;
    // Issued before, and at the same second as, the revocation: dead.
    assert!(s.is_revoked("01", &who, T0, now).await.unwrap());
    assert!(s.is_revoked("02", &who, revoked_at, now).await.unwrap());
    // Issued afterwards: alive.
    assert!(!s.is_revoked("03", &who, revoked_at + 1, now).await.unwrap());
    // Another ID: alive.
    assert!(
        !s.is_revoked("01", &id("spiffe://td/ab"), T0, now)
            .await
            .unwrap()
    );
    let listed = s.list_revocations(now).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].spiffe_id, Some(who));
    assert_eq!(listed[0].serial, None);
    assert_eq!(listed[0].reason, "key compromise");
}

async fn revocation_expiry_and_pruning(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let who = id("spiffe://td/a");
    let r = revocation(Some("aa"), Some("spiffe://td/a"), T0); // expires T0 + 3600
    s.add_revocation(&r).await.unwrap();
    let mut long = revocation(Some("bb"), None, T0);
    long.expires_at = T0 + 10_000;
    s.add_revocation(&long).await.unwrap();

    assert!(s.is_revoked("aa", &who, T0, T0 + 3599).await.unwrap());
    // At expires_at a revocation no longer counts (the credentials it covered are expired).
    assert!(!s.is_revoked("aa", &who, T0, T0 + 3600).await.unwrap());
    assert!(!s.is_revoked("zz", &who, T0 - 5, T0 + 3600).await.unwrap());
    assert_eq!(s.list_revocations(T0 + 3599).await.unwrap().len(), 2);
    let live = s.list_revocations(T0 + 3600).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].serial.as_deref(), Some("bb"));

    assert_eq!(s.prune_revocations(T0 + 3600).await.unwrap(), 1);
    assert_eq!(s.prune_revocations(T0 + 3600).await.unwrap(), 0);
    // Pruning removed the expired row only; the live one still answers.
    assert_eq!(s.list_revocations(T0).await.unwrap().len(), 1);
    assert!(s.is_revoked("bb", &who, T0, T0 + 5000).await.unwrap());
    assert_eq!(s.prune_revocations(T0 + 10_000).await.unwrap(), 1);
    assert!(s.list_revocations(T0).await.unwrap().is_empty());
}

async fn authorities_lifecycle(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let ca1 = authority("ca-1", AuthorityKind::X509, T0);
    let ca2 = authority("ca-2", AuthorityKind::X509, T0 + 10);
    let jwt = authority("jwt-1", AuthorityKind::Jwt, T0 + 5);
    for a in [&ca2, &jwt, &ca1] {
        s.save_authority(a).await.unwrap();
    }
    assert_eq!(
        s.list_authorities(AuthorityKind::X509).await.unwrap(),
        vec![ca1.clone(), ca2.clone()],
        "ordered by created_at, all fields intact"
    );
    assert_eq!(
        s.list_authorities(AuthorityKind::Jwt).await.unwrap(),
        vec![jwt.clone()]
    );

    s.set_authority_state("ca-1", AuthorityState::Active, T0 + 100)
        .await
        .unwrap();
    let get = async |key_id: &str| {
        let mut all = s.list_authorities(AuthorityKind::X509).await.unwrap();
        all.extend(s.list_authorities(AuthorityKind::Jwt).await.unwrap());
        all.into_iter().find(|a| a.id == key_id).unwrap()
    };
    let a = get("ca-1").await;
    assert_eq!(a.state, AuthorityState::Active);
    assert_eq!(a.activated_at, Some(T0 + 100));
    // Re-activating an active authority keeps its activation time.
    s.set_authority_state("ca-1", AuthorityState::Active, T0 + 200)
        .await
        .unwrap();
    assert_eq!(get("ca-1").await.activated_at, Some(T0 + 100));

    s.bump_authority_use("ca-1", T0 + 5000).await.unwrap();
    s.bump_authority_use("ca-1", T0 + 4000).await.unwrap();
    assert_eq!(
        get("ca-1").await.last_use_expiry,
        T0 + 5000,
        "max, not last"
    );
    s.bump_authority_use("ca-1", T0 + 6000).await.unwrap();
    assert_eq!(get("ca-1").await.last_use_expiry, T0 + 6000);

    // Rotation: ca-2 becomes active, ca-1 retires (keeping activated_at).
    s.set_authority_state("ca-2", AuthorityState::Active, T0 + 300)
        .await
        .unwrap();
    s.set_authority_state("ca-1", AuthorityState::Retired, T0 + 300)
        .await
        .unwrap();
    let (r1, r2) = (get("ca-1").await, get("ca-2").await);
    assert_eq!(
        (r1.state, r1.activated_at),
        (AuthorityState::Retired, Some(T0 + 100))
    );
    assert_eq!(
        (r2.state, r2.activated_at),
        (AuthorityState::Active, Some(T0 + 300))
    );

    // save_authority replaces by ID.
    let mut replaced = jwt.clone();
    replaced.public_der = vec![1, 2, 3];
    replaced.algorithm = "EdDSA".into();
    replaced.state = AuthorityState::Active;
    replaced.activated_at = Some(T0 + 7);
    s.save_authority(&replaced).await.unwrap();
    assert_eq!(get("jwt-1").await, replaced);

    s.delete_authority("ca-1").await.unwrap();
    assert_eq!(
        s.list_authorities(AuthorityKind::X509).await.unwrap(),
        vec![r2]
    );
    assert!(matches!(
        s.delete_authority("ca-1").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn bundle_sequence(db: &Db) {
    let store: Arc<dyn Store> = Arc::new(db.open().await);
    assert_eq!(store.bundle_sequence().await.unwrap(), 0);
    assert_eq!(store.bump_bundle_sequence().await.unwrap(), 1);
    assert_eq!(store.bump_bundle_sequence().await.unwrap(), 2);
    assert_eq!(store.bundle_sequence().await.unwrap(), 2);
    // Concurrent bumps: each gets a distinct value, none is lost.
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.bump_bundle_sequence().await.unwrap() })
        })
        .collect();
    let mut got: Vec<i64> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    got.sort_unstable();
    assert_eq!(got, (3..=12).collect::<Vec<_>>());
    assert_eq!(store.bundle_sequence().await.unwrap(), 12);
    store.ping().await.unwrap();
}

async fn policy_bundles_and_policy_keys(db: &Db) {
    let store = db.open().await;
    assert_eq!(store.policy_revision().await.unwrap(), 0);
    assert!(store.latest_policy_bundle().await.unwrap().is_none());
    let b = |revision: i64| PolicyBundleRecord {
        revision,
        envelope: format!("{{\"r\":{revision}}}"),
        payload_sha256: "ab".repeat(32),
        key_id: "pk-1".into(),
        not_after: T0 + 3600,
        created_at: T0,
    };
    store.insert_policy_bundle(&b(1)).await.unwrap();
    store.insert_policy_bundle(&b(2)).await.unwrap();
    // A revision is taken once: a second push at the same revision is a conflict.
    assert!(matches!(
        store.insert_policy_bundle(&b(2)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.policy_revision().await.unwrap(), 2);
    assert_eq!(store.latest_policy_bundle().await.unwrap(), Some(b(2)));
    // Policy keys are authorities of their own kind.
    let pk = authority("pk-1", AuthorityKind::Policy, T0);
    store.save_authority(&pk).await.unwrap();
    assert_eq!(
        store.list_authorities(AuthorityKind::Policy).await.unwrap(),
        vec![pk.clone()]
    );
    assert!(
        store
            .list_authorities(AuthorityKind::Jwt)
            .await
            .unwrap()
            .is_empty()
    );
    drop(store);
    let store = db.open().await;
    assert_eq!(store.latest_policy_bundle().await.unwrap(), Some(b(2)));
    assert_eq!(
        store.list_authorities(AuthorityKind::Policy).await.unwrap(),
        vec![pk]
    );
}

async fn durable_across_reopen_and_migrations_idempotent(db: &Db) {
    let e = full_entry();
    let n = node("n1");
    let x = issued(IdentityKind::X509Svid, "77", "spiffe://td/a", T0);
    let mut ca = authority("ca-1", AuthorityKind::X509, T0);
    {
        let store = db.open().await;
        let s: &dyn Store = &store;
        s.create_entry(&e).await.unwrap();
        s.upsert_node(&n).await.unwrap();
        s.record_issued(&x).await.unwrap();
        s.save_authority(&ca).await.unwrap();
        s.set_authority_state("ca-1", AuthorityState::Active, T0 + 1)
            .await
            .unwrap();
        s.create_join_token(&token_hash(9), T0 + 600, T0)
            .await
            .unwrap();
        s.consume_join_token(&token_hash(9), &n.spiffe_id, T0 + 1)
            .await
            .unwrap();
        s.add_revocation(&revocation(Some("66"), None, T0))
            .await
            .unwrap();
        s.bump_bundle_sequence().await.unwrap();
        store.close().await;
    }
    ca.state = AuthorityState::Active;
    ca.activated_at = Some(T0 + 1);
    for _ in 0..2 {
        let store = db.open().await;
        let s: &dyn Store = &store;
        assert_eq!(s.get_entry(&e.id).await.unwrap(), e);
        assert_eq!(s.entries_revision().await.unwrap(), 1);
        assert_eq!(s.get_node(&n.spiffe_id).await.unwrap(), Some(n.clone()));
        assert_eq!(s.issued_by_serial("77").await.unwrap(), Some(x.clone()));
        assert_eq!(
            s.list_authorities(AuthorityKind::X509).await.unwrap(),
            vec![ca.clone()]
        );
        assert!(matches!(
            s.consume_join_token(&token_hash(9), &n.spiffe_id, T0 + 2)
                .await,
            Err(StoreError::JoinToken(JoinTokenError::AlreadyUsed))
        ));
        assert!(
            s.is_revoked("66", &id("spiffe://td/a"), T0, T0 + 1)
                .await
                .unwrap()
        );
        assert_eq!(s.revocations_revision().await.unwrap(), 1);
        assert_eq!(s.bundle_sequence().await.unwrap(), 1);
        store.close().await;
    }
    // Reopening applied no migration twice.
    let raw = db.raw().await;
    let rows: Vec<(i64,)> =
        sqlx::query_as("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(&raw)
            .await
            .unwrap();
    assert_eq!(
        rows.into_iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    raw.close().await;
}

async fn corrupt_rows_are_reported_not_panicked_on(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let e = entry(spec("spiffe://td/a", "spiffe://td/n", &["unix:uid:1"]));
    let fine = entry(spec("spiffe://td/b", "spiffe://td/n", &["unix:uid:2"]));
    s.create_entry(&e).await.unwrap();
    s.create_entry(&fine).await.unwrap();
    s.upsert_node(&node("n1")).await.unwrap();
    s.record_issued(&issued(IdentityKind::JwtSvid, "j", "spiffe://td/a", T0))
        .await
        .unwrap();
    s.save_authority(&authority("ca", AuthorityKind::X509, T0))
        .await
        .unwrap();

    let raw = db.raw().await;
    let tamper = async |sql: &str, arg: &str| {
        let n = sqlx::query(sql)
            .bind(arg)
            .execute(&raw)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(n, 1, "{sql}");
    };
    let corrupt = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::Corrupt(msg)) => assert!(!msg.is_empty()),
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    };

    tamper(
        "UPDATE entries SET spiffe_id = 'SPIFFE://Bad ID' WHERE id = $1",
        e.id.as_str(),
    )
    .await;
    corrupt(s.get_entry(&e.id).await.map(drop), "get_entry bad id");
    corrupt(
        s.list_entries(&EntryFilter::default()).await.map(drop),
        "list_entries",
    );
    // The untouched entry still reads.
    assert_eq!(s.get_entry(&fine.id).await.unwrap(), fine);

    tamper(
        "UPDATE entries SET selectors_json = '[\"docker:label:x\"]' WHERE id = $1",
        fine.id.as_str(),
    )
    .await;
    corrupt(s.get_entry(&fine.id).await.map(drop), "unknown selector");
    tamper(
        "UPDATE entries SET selectors_json = 'not json' WHERE id = $1",
        fine.id.as_str(),
    )
    .await;
    corrupt(s.get_entry(&fine.id).await.map(drop), "bad json");
    tamper(
        "UPDATE entries SET x509_ttl_secs = -1, spiffe_id = 'spiffe://td/b', selectors_json = '[]' WHERE id = $1",
        fine.id.as_str(),
    )
    .await;
    corrupt(s.get_entry(&fine.id).await.map(drop), "negative ttl");

    tamper(
        "UPDATE nodes SET spiffe_id = 'not-an-id' WHERE spiffe_id = $1",
        "spiffe://td/sigil/node/n1",
    )
    .await;
    corrupt(s.list_nodes().await.map(drop), "list_nodes");
    tamper(
        "UPDATE issued SET audience_json = '{' WHERE serial_or_jti = $1",
        "j",
    )
    .await;
    corrupt(s.issued_by_serial("j").await.map(drop), "issued audience");
    corrupt(s.list_issued(None, 10).await.map(drop), "list_issued");

    // Text where a number belongs (SQLite allows it; PostgreSQL refuses it, so only there).
    if matches!(db, Db::Sqlite { .. }) {
        tamper(
            "UPDATE authorities SET not_after = 'soon' WHERE id = $1",
            "ca",
        )
        .await;
        corrupt(
            s.list_authorities(AuthorityKind::X509).await.map(drop),
            "authority not_after",
        );
        s.upsert_node(&node("n2")).await.unwrap();
        tamper(
            "UPDATE nodes SET not_after = 'later' WHERE spiffe_id = $1",
            "spiffe://td/sigil/node/n2",
        )
        .await;
        corrupt(
            s.get_node(&id("spiffe://td/sigil/node/n2")).await.map(drop),
            "node not_after",
        );
    }
    raw.close().await;
}

async fn newer_schema_is_refused(db: &Db) {
    db.open().await.close().await;
    let raw = db.raw().await;
    sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
        .bind(SCHEMA_VERSION + 1)
        .bind("from the future")
        .bind(T0)
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    match SqlStore::connect(&db.url()).await {
        Err(StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

async fn concurrent_first_opens_migrate_once(db: &Db) {
    // Several servers starting at once against an empty database (the HA case).
    let url = db.url();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { SqlStore::connect(&url).await })
        })
        .collect();
    let stores: Vec<SqlStore> = futures::future::join_all(opens)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    for (i, store) in stores.iter().enumerate() {
        assert_eq!(
            store.bump_bundle_sequence().await.unwrap(),
            i64::try_from(i).unwrap() + 1
        );
        store.close().await;
    }
    let raw = db.raw().await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(n, SCHEMA_VERSION);
    raw.close().await;
}

async fn backend_is_reported(db: &Db) {
    let store = db.open().await;
    let want = match db {
        Db::Sqlite { .. } => Backend::Sqlite,
        Db::Postgres { .. } => Backend::Postgres,
    };
    assert_eq!(store.backend(), want);
    store.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Backend-specific
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sqlite_file_is_private_and_in_wal_mode() {
    let db = Db::sqlite();
    let store = db.open().await;
    let Db::Sqlite { path, .. } = &db else {
        unreachable!()
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "database file mode {mode:o}");
        // SQLite gives its WAL and shared-memory files the database file's mode.
        store.bump_bundle_sequence().await.unwrap();
        let wal = path.with_extension("db-wal");
        let mode = std::fs::metadata(&wal).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "WAL file mode {mode:o}");
    }
    let raw = db.raw().await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    raw.close().await;
    store.close().await;
}

#[tokio::test]
async fn sqlite_in_a_missing_directory_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/no/such/dir/x.db", dir.path().display());
    assert!(matches!(
        SqlStore::connect(&url).await,
        Err(StoreError::Database(_))
    ));
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    for url in [
        "mysql://root:hunter2@localhost/sigil",
        "sqlite://",
        "sqlite://x.db?mode=memory",
        "/var/lib/sigil.db",
    ] {
        match SqlStore::connect(url).await {
            Err(StoreError::Unsupported(msg)) => assert!(!msg.contains("hunter2"), "{msg}"),
            other => panic!("{url}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn store_is_object_safe_and_shareable() {
    fn assert_send_sync<T: Send + Sync + ?Sized>() {}
    assert_send_sync::<dyn Store>();
    assert_send_sync::<SqlStore>();
    let _: Option<Arc<dyn Store>> = None;
}

async fn model_keys_register_once_and_seal_once(db: &Db) {
    let store = db.open().await;
    let k = |name: &str, version: i64, key_id: &str| ModelKeyRecord {
        name: name.into(),
        version,
        key_id: key_id.into(),
        wrapped_key: format!("kek1:{key_id}"),
        header_sha256: None,
        plaintext_sha256: None,
        created_at: T0,
        sealed_at: None,
    };
    assert!(store.model_key("m", 1).await.unwrap().is_none());
    store.create_model_key(&k("m", 1, "k1")).await.unwrap();
    store.create_model_key(&k("m", 2, "k2")).await.unwrap();
    store.create_model_key(&k("a", 1, "k3")).await.unwrap();
    // The same version again, or a reused key id, conflicts.
    assert!(matches!(
        store.create_model_key(&k("m", 1, "k9")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.create_model_key(&k("z", 1, "k1")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.model_key("m", 1).await.unwrap().unwrap(),
        k("m", 1, "k1")
    );
    // Sealed once only; an unknown version is not.
    assert!(
        store
            .mark_model_sealed("m", 1, "h1", "p1", T0 + 5)
            .await
            .unwrap()
    );
    assert!(
        !store
            .mark_model_sealed("m", 1, "h2", "p2", T0 + 6)
            .await
            .unwrap()
    );
    assert!(!store.mark_model_sealed("m", 9, "h", "p", T0).await.unwrap());
    let got = store.model_key("m", 1).await.unwrap().unwrap();
    assert_eq!(got.header_sha256.as_deref(), Some("h1"));
    assert_eq!(got.plaintext_sha256.as_deref(), Some("p1"));
    assert_eq!(got.sealed_at, Some(T0 + 5));
    let all = store.list_model_keys().await.unwrap();
    let names: Vec<(String, i64)> = all.iter().map(|r| (r.name.clone(), r.version)).collect();
    assert_eq!(
        names,
        vec![("a".into(), 1), ("m".into(), 1), ("m".into(), 2)]
    );
    // Durable across reopening.
    drop(store);
    let store = db.open().await;
    assert_eq!(store.model_key("m", 1).await.unwrap().unwrap(), got);
}

async fn secrets_are_versioned_and_deleted_for_good(db: &Db) {
    let store = db.open().await;
    let v = |path: &str, version: i64| SecretVersionRecord {
        path: path.into(),
        version,
        key_id: format!("sk-{path}-{version}"),
        wrapped_key: format!("kek1:{path}{version}"),
        ciphertext: format!("sv1:{path}{version}"),
        created_at: T0 + version,
        deleted_at: None,
    };
    assert!(store.latest_secret_version("a/b").await.unwrap().is_none());
    for r in [v("a/b", 1), v("a/b", 2), v("c", 1)] {
        store.create_secret_version(&r).await.unwrap();
    }
    // A version written twice (two writers racing) conflicts.
    assert!(matches!(
        store.create_secret_version(&v("a/b", 2)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.latest_secret_version("a/b").await.unwrap().unwrap(),
        v("a/b", 2)
    );
    let versions: Vec<i64> = store
        .secret_versions("a/b")
        .await
        .unwrap()
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, vec![1, 2]);
    let listed: Vec<(String, i64)> = store
        .list_secrets()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.path, r.version))
        .collect();
    assert_eq!(listed, vec![("a/b".into(), 2), ("c".into(), 1)]);
    // Deleting destroys every version's key and ciphertext, once.
    assert_eq!(store.delete_secret("a/b", T0 + 9).await.unwrap(), 2);
    assert_eq!(store.delete_secret("a/b", T0 + 10).await.unwrap(), 0);
    for r in store.secret_versions("a/b").await.unwrap() {
        assert_eq!(r.deleted_at, Some(T0 + 9));
        assert!(r.wrapped_key.is_empty() && r.ciphertext.is_empty());
    }
    // The next write continues the numbering.
    store.create_secret_version(&v("a/b", 3)).await.unwrap();
    drop(store);
    let store = db.open().await;
    assert_eq!(
        store.latest_secret_version("a/b").await.unwrap().unwrap(),
        v("a/b", 3)
    );
    assert_eq!(
        store.latest_secret_version("c").await.unwrap().unwrap(),
        v("c", 1)
    );
}

async fn db_roles_and_leases_open_extend_and_close_once(db: &Db) {
    let store = db.open().await;
    let role = DbRoleRecord {
        name: "app_ro".into(),
        key_id: "sk-1".into(),
        wrapped_key: "kek1:x".into(),
        connection: "sv1:y".into(),
        creation_sql: "CREATE ROLE".into(),
        revocation_sql: "DROP ROLE".into(),
        default_ttl: 60,
        max_ttl: 600,
        created_at: T0,
    };
    store.put_db_role(&role).await.unwrap();
    let redefined = DbRoleRecord {
        key_id: "sk-2".into(),
        max_ttl: 900,
        ..role.clone()
    };
    store.put_db_role(&redefined).await.unwrap();
    assert_eq!(store.db_role("app_ro").await.unwrap().unwrap(), redefined);
    assert_eq!(store.list_db_roles().await.unwrap(), vec![redefined]);
    let lease = |id: &str, who: &str, node: &str, expires_at: i64| LeaseRecord {
        id: id.into(),
        path: "database/creds/app_ro".into(),
        spiffe_id: who.into(),
        serial: format!("serial-{id}"),
        node_id: node.into(),
        db_role: "app_ro".into(),
        username: format!("sigil_app_ro_{id}"),
        issued_at: T0,
        expires_at,
        max_expires_at: T0 + 600,
        revoked_at: None,
        revoke_reason: None,
    };
    let a = lease("a", "spiffe://t/x", "spiffe://t/n1", T0 + 60);
    let b = lease("b", "spiffe://t/y", "spiffe://t/n2", T0 + 30);
    store.create_lease(&a).await.unwrap();
    store.create_lease(&b).await.unwrap();
    assert!(matches!(
        store.create_lease(&a).await,
        Err(StoreError::Conflict(_))
    ));
    let ids = |l: Vec<LeaseRecord>| l.into_iter().map(|l| l.id).collect::<Vec<_>>();
    // Soonest end first; each filter narrows.
    assert_eq!(
        ids(store.list_leases(&LeaseFilter::default()).await.unwrap()),
        ["b", "a"]
    );
    let f = |f: LeaseFilter| {
        let store = &store;
        async move { ids(store.list_leases(&f).await.unwrap()) }
    };
    assert_eq!(
        f(LeaseFilter {
            spiffe_id: Some("spiffe://t/x".into()),
            ..LeaseFilter::default()
        })
        .await,
        ["a"]
    );
    assert_eq!(
        f(LeaseFilter {
            serial: Some("serial-b".into()),
            ..LeaseFilter::default()
        })
        .await,
        ["b"]
    );
    assert_eq!(
        f(LeaseFilter {
            node_id: Some("spiffe://t/n1".into()),
            ..LeaseFilter::default()
        })
        .await,
        ["a"]
    );
    assert_eq!(
        f(LeaseFilter {
            due_by: Some(T0 + 30),
            ..LeaseFilter::default()
        })
        .await,
        ["b"]
    );
    // Extended while open; closed once (of two closers, one wins); closed ones stay listed
    // only when asked for, and cannot be extended.
    assert!(store.extend_lease("a", T0 + 120).await.unwrap());
    assert_eq!(
        store.lease("a").await.unwrap().unwrap().expires_at,
        T0 + 120
    );
    assert!(store.close_lease("b", T0 + 31, "expired").await.unwrap());
    assert!(
        !store
            .close_lease("b", T0 + 32, "identity revoked")
            .await
            .unwrap()
    );
    assert!(!store.extend_lease("b", T0 + 500).await.unwrap());
    assert!(!store.close_lease("nope", T0, "x").await.unwrap());
    let closed = store.lease("b").await.unwrap().unwrap();
    assert_eq!(
        (
            closed.revoked_at,
            closed.revoke_reason.as_deref(),
            closed.expires_at
        ),
        (Some(T0 + 31), Some("expired"), T0 + 30)
    );
    assert_eq!(
        ids(store.list_leases(&LeaseFilter::default()).await.unwrap()),
        ["a"]
    );
    assert_eq!(
        f(LeaseFilter {
            include_revoked: true,
            ..LeaseFilter::default()
        })
        .await,
        ["b", "a"]
    );
    assert!(store.delete_db_role("app_ro").await.unwrap());
    assert!(!store.delete_db_role("app_ro").await.unwrap());
}

async fn node_risk_and_quarantines(db: &Db) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let (n1, n2) = ("spiffe://td/sigil/node/n1", "spiffe://td/sigil/node/n2");
    let r0 = s.risk_revision().await.unwrap();
    // A posture bumps the revision; the same score and reasons again do not.
    let rec = s
        .put_posture(n1, "{}", 40, &["unknown executable /tmp/x: +40".into()], T0)
        .await
        .unwrap();
    assert_eq!((rec.posture_score, rec.anomaly_score), (40, 0));
    let r1 = s.risk_revision().await.unwrap();
    assert!(r1 > r0);
    s.put_posture(
        n1,
        "{\"kernel\":\"6\"}",
        40,
        &["unknown executable /tmp/x: +40".into()],
        T0 + 1,
    )
    .await
    .unwrap();
    assert_eq!(s.risk_revision().await.unwrap(), r1);
    let rec = s
        .set_anomaly(n1, 90, &["new model".into()], T0 + 2)
        .await
        .unwrap();
    assert_eq!((rec.posture_score, rec.anomaly_score), (40, 90));
    assert_eq!(rec.posture_json, "{\"kernel\":\"6\"}");
    assert!(s.risk_revision().await.unwrap() > r1);
    assert_eq!(s.list_node_risk().await.unwrap().len(), 1);
    assert!(s.node_risk(n2).await.unwrap().is_none());

    // The node asked for SVIDs of two workloads; another node for one of the same ID.
    let mut mine = issued(IdentityKind::X509Svid, "a1", "spiffe://td/cam", T0);
    mine.requester = n1.into();
    let mut other = issued(IdentityKind::X509Svid, "b1", "spiffe://td/belt", T0);
    other.requester = n1.into();
    let mut elsewhere = issued(IdentityKind::X509Svid, "c1", "spiffe://td/cam", T0);
    elsewhere.requester = n2.into();
    let mut expired = issued(IdentityKind::X509Svid, "d1", "spiffe://td/cam", T0 - 7200);
    expired.requester = n1.into();
    for i in [&mine, &other, &elsewhere, &expired] {
        s.record_issued(i).await.unwrap();
    }
    let rev = s.revocations_revision().await.unwrap();
    let q = QuarantineRecord {
        node_id: n1.into(),
        spiffe_id: Some("spiffe://td/cam".into()),
        reason: "anomaly".into(),
        features_json: "{\"new_resource_share\":0.9}".into(),
        created_at: T0 + 10,
        ..Default::default()
    };
    let (qid, serials) = s.quarantine(&q, T0 + 9999).await.unwrap();
    // Only that workload's unexpired SVIDs from that node.
    assert_eq!(serials, vec!["a1".to_string()]);
    assert!(s.revocations_revision().await.unwrap() > rev);
    assert!(
        s.is_revoked("a1", &id("spiffe://td/cam"), T0, T0 + 11)
            .await
            .unwrap()
    );
    assert!(
        !s.is_revoked("b1", &id("spiffe://td/belt"), T0, T0 + 11)
            .await
            .unwrap()
    );
    assert!(
        !s.is_revoked("c1", &id("spiffe://td/cam"), T0, T0 + 11)
            .await
            .unwrap()
    );
    // Again: the same quarantine, nothing new to revoke.
    let (again, serials) = s.quarantine(&q, T0 + 9999).await.unwrap();
    assert_eq!((again, serials.len()), (qid, 0));
    let active = s.active_quarantines().await.unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].spiffe_id.as_deref(), Some("spiffe://td/cam"));
    // The whole node: the rest of what it was issued.
    let whole = QuarantineRecord {
        spiffe_id: None,
        ..q.clone()
    };
    let (_, serials) = s.quarantine(&whole, T0 + 9999).await.unwrap();
    assert_eq!(serials, vec!["b1".to_string()]);
    assert_eq!(s.active_quarantines().await.unwrap().len(), 2);
    // Clearing another node clears nothing; clearing one workload leaves the node's.
    assert_eq!(s.clear_quarantine(n2, None, T0 + 20).await.unwrap(), 0);
    assert_eq!(
        s.clear_quarantine(n1, Some("spiffe://td/cam"), T0 + 20)
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.active_quarantines().await.unwrap().len(), 1);
    assert_eq!(s.clear_quarantine(n1, None, T0 + 21).await.unwrap(), 1);
    assert!(s.active_quarantines().await.unwrap().is_empty());
    // Clearing resets the behaviour score, not the posture.
    let rec = s.node_risk(n1).await.unwrap().unwrap();
    assert_eq!((rec.posture_score, rec.anomaly_score), (40, 0));
}
