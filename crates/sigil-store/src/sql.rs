//! `SqlStore`: the one `Store` implementation, on SQLite or PostgreSQL through sqlx's `Any` driver.
use std::fmt::Display;
use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use sigil_core::{Credential, EntryId, EntrySpec, RegistrationEntry, SpiffeId, UnixTime};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Row, Transaction};

use crate::migrate::migrate;
use crate::store::TlogAppend;
use crate::{
    AuthorityKind, AuthorityRecord, AuthorityState, DbRoleRecord, EntryFilter, IdentityKind,
    IssuedIdentity, JoinTokenError, LeaseFilter, LeaseRecord, ModelKeyRecord, NodeRecord,
    NodeRiskRecord, PolicyBundleRecord, QuarantineRecord, Revocation, SecretVersionRecord, Store,
    StoreError,
};

/// Which database a [`SqlStore`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (single server).
    Sqlite,
    /// PostgreSQL (several servers sharing one database).
    Postgres,
}

const SQLITE_POOL_SIZE: u32 = 4;
const POSTGRES_POOL_SIZE: u32 = 8;
/// Upper bound on `list_issued`'s `limit`.
const MAX_ISSUED_LIMIT: i64 = 10_000;

/// The store on SQLite or PostgreSQL. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
}

impl SqlStore {
    /// Opens the database at `url` and migrates its schema.
    ///
    /// * `sqlite://<path>`: the file is created (mode 0600) if missing; `sqlite:///abs/path` for
    ///   an absolute path. No query parameters. Every connection runs with `journal_mode=WAL`,
    ///   `synchronous=FULL`, `foreign_keys=ON`, `busy_timeout=5000`.
    /// * `postgres://...` or `postgresql://...`: libpq's URL form, checked with
    ///   [`postgres_connect_options`] and then passed to the driver; e.g.
    ///   `?options=-c%20search_path%3Dmy_schema` selects a schema. TLS (rustls) follows
    ///   libpq's `sslmode`: `disable`, `prefer` (the default when no `sslmode` is given, as
    ///   in libpq: TLS if the server offers it, unverified, else plaintext), `require`
    ///   (TLS, unverified), `verify-ca` (the chain must reach a trusted root) and
    ///   `verify-full` (that, and the host in the URL must be in the certificate). Across a
    ///   network use `?sslmode=verify-full&sslrootcert=/path/to/ca.pem`; `sslcert` and
    ///   `sslkey` give a client certificate. The `PGSSLMODE`, `PGSSLROOTCERT`, ... variables
    ///   are the defaults for what the URL omits.
    ///
    /// Anything else is [`StoreError::Unsupported`]. A database migrated by a newer sigil is
    /// [`StoreError::SchemaTooNew`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (pool, backend) = match parse_url(url)? {
            Target::Sqlite(path) => (open_sqlite(path).await?, Backend::Sqlite),
            Target::Postgres => {
                // The Any driver parses the URL with the same parser (sslmode, sslrootcert
                // and the rest reach it); checking first turns a malformed URL into a
                // configuration error rather than a connection failure.
                postgres_connect_options(url)?;
                let pool = AnyPoolOptions::new()
                    .max_connections(POSTGRES_POOL_SIZE)
                    .connect(url)
                    .await?;
                (pool, Backend::Postgres)
            }
        };
        migrate(&pool, backend).await?;
        Ok(Self { pool, backend })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every connection, waiting for queries in flight.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Parses a PostgreSQL URL (`postgres://` or `postgresql://`) into connect options by the
/// rules [`SqlStore::connect`] follows: libpq's URL form, with `sslmode` (default `prefer`),
/// `sslrootcert`, `sslcert` and `sslkey` for TLS over rustls. For connections to a
/// PostgreSQL other than the store's (e.g. one that sigil manages credentials on).
///
/// Any other scheme, or a URL the driver cannot parse, is [`StoreError::Unsupported`]; the
/// message never repeats the URL, which may hold a password.
pub fn postgres_connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    if !matches!(parse_url(url)?, Target::Postgres) {
        return Err(StoreError::Unsupported(
            "a PostgreSQL URL starts with postgres:// or postgresql://".into(),
        ));
    }
    PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unsupported(format!("invalid PostgreSQL URL: {e}")))
}

/// Opens one connection to the PostgreSQL at `url`, by the rules of
/// [`postgres_connect_options`] (TLS and certificate verification as `sslmode` says). There
/// is no timeout of its own: wrap the call in one where a hung server matters.
pub async fn connect_postgres(url: &str) -> Result<PgConnection, StoreError> {
    let options = postgres_connect_options(url)?;
    Ok(PgConnection::connect_with(&options).await?)
}

enum Target<'a> {
    Sqlite(&'a str),
    Postgres,
}

fn parse_url(url: &str) -> Result<Target<'_>, StoreError> {
    if let Some(rest) = url.strip_prefix("sqlite://") {
        if rest.is_empty() {
            return Err(StoreError::Unsupported(
                "a sqlite:// URL needs a file path (sqlite://<path>)".into(),
            ));
        }
        if rest.contains(['?', '#', '%']) || rest == ":memory:" {
            return Err(StoreError::Unsupported(
                "a sqlite:// URL is a plain file path: no query parameters, '#', '%' or :memory:"
                    .into(),
            ));
        }
        return Ok(Target::Sqlite(rest));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres);
    }
    // Never echo the whole URL: it may hold a password.
    let scheme: String = url
        .split(':')
        .next()
        .unwrap_or_default()
        .chars()
        .take(32)
        .collect();
    Err(StoreError::Unsupported(format!(
        "database URL scheme {scheme:?}: use sqlite://<path> or postgres://..."
    )))
}

async fn open_sqlite(path: &str) -> Result<AnyPool, StoreError> {
    create_private_file(Path::new(path)).map_err(sqlx::Error::Io)?;
    let pool = AnyPoolOptions::new()
        .max_connections(SQLITE_POOL_SIZE)
        // An embedded database's connection cannot drop like a network one: no ping round
        // trip to the connection's worker thread before every query.
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // busy_timeout first, so switching the journal mode waits for other openers.
                for pragma in [
                    "PRAGMA busy_timeout = 5000",
                    "PRAGMA journal_mode = WAL",
                    // Durability: a commit is on disk before it is acknowledged.
                    "PRAGMA synchronous = FULL",
                    "PRAGMA foreign_keys = ON",
                ] {
                    conn.execute(pragma).await?;
                }
                Ok(())
            })
        })
        // mode=rw: the file exists (created above with the right mode); never let SQLite create
        // one with default permissions somewhere else.
        .connect(&format!("sqlite://{path}?mode=rw"))
        .await?;
    Ok(pool)
}

/// Creates `path` readable and writable by the owner only, if it does not exist.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Starts a transaction that will write. On SQLite it takes the write lock up front
/// (`BEGIN IMMEDIATE`), so a read followed by a write can never fail with a lock upgrade error.
pub(crate) async fn begin_write(
    pool: &AnyPool,
    backend: Backend,
) -> Result<Transaction<'static, Any>, sqlx::Error> {
    match backend {
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => pool.begin().await,
    }
}

const ENTRIES_REVISION: &str = "entries_revision";
const REVOCATIONS_REVISION: &str = "revocations_revision";
const BUNDLE_SEQUENCE: &str = "bundle_sequence";
const RISK_REVISION: &str = "risk_revision";
const NODE_RISK_COLS: &str = "node_id, posture_json, posture_score, posture_reasons_json, \
     anomaly_score, anomaly_reasons_json, updated_at";

fn node_risk_from_row(row: &AnyRow) -> Result<NodeRiskRecord, StoreError> {
    let r = Reader::new(row, "node_risk", "node_id");
    let list = |col: &str| -> Result<Vec<String>, StoreError> {
        let text: String = r.get(col)?;
        serde_json::from_str(&text).map_err(|e| r.corrupt(col, e))
    };
    Ok(NodeRiskRecord {
        node_id: r.get("node_id")?,
        posture_json: r.get("posture_json")?,
        posture_score: r.get("posture_score")?,
        posture_reasons: list("posture_reasons_json")?,
        anomaly_score: r.get("anomaly_score")?,
        anomaly_reasons: list("anomaly_reasons_json")?,
        updated_at: r.get("updated_at")?,
    })
}

async fn node_risk_in(
    conn: &mut AnyConnection,
    node_id: &str,
) -> Result<Option<NodeRiskRecord>, StoreError> {
    sqlx::query(&format!(
        "SELECT {NODE_RISK_COLS} FROM node_risk WHERE node_id = $1"
    ))
    .bind(node_id)
    .fetch_optional(conn)
    .await?
    .as_ref()
    .map(node_risk_from_row)
    .transpose()
}

async fn insert_issued(
    conn: &mut AnyConnection,
    issued: &IssuedIdentity,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO issued (kind, serial_or_jti, spiffe_id, thumbprint, audience_json, \
         issued_at, not_after, requester) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(issued.kind.as_str())
    .bind(&issued.serial_or_jti)
    .bind(issued.spiffe_id.as_str())
    .bind(&issued.thumbprint)
    .bind(to_json(&issued.audience)?)
    .bind(issued.issued_at)
    .bind(issued.not_after)
    .bind(&issued.requester)
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        StoreError::conflict_or(e, || {
            format!(
                "{} {} was already recorded",
                issued.kind, issued.serial_or_jti
            )
        })
    })?;
    Ok(())
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("index {v} out of range")))
}

/// Increments a `meta` counter and returns its new value.
async fn bump_meta(conn: &mut AnyConnection, key: &str) -> Result<i64, StoreError> {
    sqlx::query_scalar("UPDATE meta SET value = value + 1 WHERE key = $1 RETURNING value")
        .bind(key)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("meta row {key:?} is missing")))
}

const ENTRY_COLS: &str = "id, spiffe_id, parent_id, selectors_json, x509_ttl_secs, jwt_ttl_secs, \
     dns_names_json, groups_json, scopes_json, enforcer, node_selectors_json, revision, \
     created_at, updated_at";
const NODE_COLS: &str = "spiffe_id, attestation_type, serial, not_after, evicted, selectors_json, created_at, updated_at";
const ISSUED_COLS: &str = "id, kind, serial_or_jti, spiffe_id, thumbprint, audience_json, \
     issued_at, not_after, requester";
const REVOCATION_COLS: &str = "id, serial, spiffe_id, reason, revoked_at, expires_at";
const AUTHORITY_COLS: &str = "id, kind, state, public_der, key_ref, algorithm, not_after, \
     last_use_expiry, created_at, activated_at";

/// The columns of an entry spec, encoded for storage.
struct EncodedSpec {
    selectors_json: String,
    dedup_key: String,
    dns_names_json: String,
    groups_json: String,
    scopes_json: String,
    node_selectors_json: String,
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("cannot encode: {e}")))
}

impl EncodedSpec {
    fn new(spec: &EntrySpec) -> Result<Self, StoreError> {
        Ok(Self {
            selectors_json: to_json(&spec.selectors)?,
            dedup_key: dedup_key(spec)?,
            dns_names_json: to_json(&spec.dns_names)?,
            groups_json: to_json(&spec.groups)?,
            scopes_json: to_json(&spec.scopes)?,
            node_selectors_json: to_json(&spec.node_selectors)?,
        })
    }
}

/// What makes two entries the same: SPIFFE ID, parent ID and the *set* of selectors. Hashed so
/// the unique index stays small whatever the selectors' length.
fn dedup_key(spec: &EntrySpec) -> Result<String, StoreError> {
    let mut selectors: Vec<String> = spec.selectors.iter().map(ToString::to_string).collect();
    selectors.sort();
    selectors.dedup();
    let canonical = to_json(&(spec.spiffe_id.as_str(), spec.parent_id.as_str(), selectors))?;
    Ok(hex::encode(Sha256::digest(canonical.as_bytes())))
}

fn validate_token_hash(token_hash: &str) -> Result<(), StoreError> {
    let ok = token_hash.len() == 64
        && token_hash
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "a join token is stored as its SHA-256 in lowercase hex (64 characters)".into(),
        ))
    }
}

/// Reads one row, turning anything unparsable into [`StoreError::Corrupt`] naming the row.
struct Reader<'r> {
    row: &'r AnyRow,
    table: &'static str,
    key: String,
}

impl<'r> Reader<'r> {
    fn new(row: &'r AnyRow, table: &'static str, key_col: &str) -> Self {
        let key = match row.try_get::<String, _>(key_col) {
            Ok(s) => format!("{s:?}"),
            Err(_) => row
                .try_get::<i64, _>(key_col)
                .map(|i| i.to_string())
                .unwrap_or_else(|_| "?".into()),
        };
        Self { row, table, key }
    }

    fn corrupt(&self, col: &str, err: impl Display) -> StoreError {
        StoreError::Corrupt(format!(
            "{} row {}, column {col}: {err}",
            self.table, self.key
        ))
    }

    fn get<T>(&self, col: &str) -> Result<T, StoreError>
    where
        T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
    {
        self.row.try_get(col).map_err(|e| self.corrupt(col, e))
    }

    fn parse<T>(&self, col: &str) -> Result<T, StoreError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let s: String = self.get(col)?;
        s.parse().map_err(|e| self.corrupt(col, e))
    }

    fn opt_parse<T>(&self, col: &str) -> Result<Option<T>, StoreError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let s: Option<String> = self.get(col)?;
        s.map(|s| s.parse().map_err(|e| self.corrupt(col, e)))
            .transpose()
    }

    fn json<T: DeserializeOwned>(&self, col: &str) -> Result<T, StoreError> {
        let s: String = self.get(col)?;
        serde_json::from_str(&s).map_err(|e| self.corrupt(col, e))
    }

    fn u32(&self, col: &str) -> Result<u32, StoreError> {
        let v: i64 = self.get(col)?;
        u32::try_from(v).map_err(|e| self.corrupt(col, e))
    }

    fn bool(&self, col: &str) -> Result<bool, StoreError> {
        match self.get::<i64>(col)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.corrupt(col, format_args!("{v} is not a boolean"))),
        }
    }
}

fn entry_from_row(row: &AnyRow) -> Result<RegistrationEntry, StoreError> {
    let r = Reader::new(row, "entries", "id");
    let id: String = r.get("id")?;
    Ok(RegistrationEntry {
        id: EntryId::parse(&id).map_err(|e| r.corrupt("id", e))?,
        spec: EntrySpec {
            spiffe_id: r.parse("spiffe_id")?,
            parent_id: r.parse("parent_id")?,
            selectors: r.json("selectors_json")?,
            x509_ttl_secs: r.u32("x509_ttl_secs")?,
            jwt_ttl_secs: r.u32("jwt_ttl_secs")?,
            dns_names: r.json("dns_names_json")?,
            groups: r.json("groups_json")?,
            scopes: r.json("scopes_json")?,
            enforcer: r.bool("enforcer")?,
            node_selectors: r.json("node_selectors_json")?,
        },
        revision: r.get("revision")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

fn node_from_row(row: &AnyRow) -> Result<NodeRecord, StoreError> {
    let r = Reader::new(row, "nodes", "spiffe_id");
    Ok(NodeRecord {
        spiffe_id: r.parse("spiffe_id")?,
        attestation_type: r.get("attestation_type")?,
        serial: r.get("serial")?,
        not_after: r.get("not_after")?,
        evicted: r.bool("evicted")?,
        selectors: r.json("selectors_json")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

fn issued_from_row(row: &AnyRow) -> Result<IssuedIdentity, StoreError> {
    let r = Reader::new(row, "issued", "id");
    Ok(IssuedIdentity {
        kind: r.parse::<IdentityKind>("kind")?,
        serial_or_jti: r.get("serial_or_jti")?,
        spiffe_id: r.parse("spiffe_id")?,
        thumbprint: r.get("thumbprint")?,
        audience: r.json("audience_json")?,
        issued_at: r.get("issued_at")?,
        not_after: r.get("not_after")?,
        requester: r.get("requester")?,
    })
}

fn revocation_from_row(row: &AnyRow) -> Result<Revocation, StoreError> {
    let r = Reader::new(row, "revocations", "id");
    Ok(Revocation {
        id: r.get("id")?,
        serial: r.get("serial")?,
        spiffe_id: r.opt_parse("spiffe_id")?,
        reason: r.get("reason")?,
        revoked_at: r.get("revoked_at")?,
        expires_at: r.get("expires_at")?,
    })
}

fn authority_from_row(row: &AnyRow) -> Result<AuthorityRecord, StoreError> {
    let r = Reader::new(row, "authorities", "id");
    Ok(AuthorityRecord {
        id: r.get("id")?,
        kind: r.parse::<AuthorityKind>("kind")?,
        state: r.parse::<AuthorityState>("state")?,
        public_der: r.get("public_der")?,
        key_ref: r.get("key_ref")?,
        algorithm: r.get("algorithm")?,
        not_after: r.get("not_after")?,
        last_use_expiry: r.get("last_use_expiry")?,
        created_at: r.get("created_at")?,
        activated_at: r.get("activated_at")?,
    })
}

impl SqlStore {
    async fn meta_value(&self, key: &str) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("meta row {key:?} is missing")))
    }

    async fn count(&self, table: &'static str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await?)
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn create_entry(&self, entry: &RegistrationEntry) -> Result<(), StoreError> {
        let spec = &entry.spec;
        let enc = EncodedSpec::new(spec)?;
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM entries WHERE id = $1 OR dedup_key = $2 LIMIT 1")
                .bind(entry.id.as_str())
                .bind(&enc.dedup_key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(existing) = existing {
            return Err(StoreError::Conflict(if existing == entry.id.as_str() {
                format!("entry {existing} already exists")
            } else {
                format!(
                    "entry {existing} already gives {} to {} with the same selectors",
                    spec.spiffe_id, spec.parent_id
                )
            }));
        }
        sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors_json, dedup_key, \
             x509_ttl_secs, jwt_ttl_secs, dns_names_json, groups_json, scopes_json, enforcer, \
             node_selectors_json, revision, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(entry.id.as_str())
        .bind(spec.spiffe_id.as_str())
        .bind(spec.parent_id.as_str())
        .bind(&enc.selectors_json)
        .bind(&enc.dedup_key)
        .bind(i64::from(spec.x509_ttl_secs))
        .bind(i64::from(spec.jwt_ttl_secs))
        .bind(&enc.dns_names_json)
        .bind(&enc.groups_json)
        .bind(&enc.scopes_json)
        .bind(i64::from(spec.enforcer))
        .bind(&enc.node_selectors_json)
        .bind(entry.revision)
        .bind(entry.created_at)
        .bind(entry.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            StoreError::conflict_or(e, || {
                format!(
                    "entry {} or an entry with the same SPIFFE ID, parent ID and selectors already exists",
                    entry.id
                )
            })
        })?;
        bump_meta(&mut tx, ENTRIES_REVISION).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError> {
        let row = sqlx::query(&format!("SELECT {ENTRY_COLS} FROM entries WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
        entry_from_row(&row)
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let mut sql = format!("SELECT {ENTRY_COLS} FROM entries");
        let mut binds: Vec<&str> = Vec::new();
        for (col, value) in [
            ("parent_id", &filter.parent_id),
            ("spiffe_id", &filter.spiffe_id),
        ] {
            if let Some(v) = value {
                sql.push_str(if binds.is_empty() { " WHERE " } else { " AND " });
                binds.push(v.as_str());
                sql.push_str(&format!("{col} = ${}", binds.len()));
            }
        }
        sql.push_str(" ORDER BY spiffe_id, id");
        let mut query = sqlx::query(&sql);
        for b in binds {
            query = query.bind(b);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn update_entry(
        &self,
        id: &EntryId,
        spec: &EntrySpec,
        now: UnixTime,
    ) -> Result<RegistrationEntry, StoreError> {
        let enc = EncodedSpec::new(spec)?;
        let conflict = || {
            format!(
                "another entry already gives {} to {} with the same selectors",
                spec.spiffe_id, spec.parent_id
            )
        };
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let duplicate: Option<String> =
            sqlx::query_scalar("SELECT id FROM entries WHERE dedup_key = $1 AND id <> $2")
                .bind(&enc.dedup_key)
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(other) = duplicate {
            return Err(StoreError::Conflict(format!(
                "entry {other} already gives {} to {} with the same selectors",
                spec.spiffe_id, spec.parent_id
            )));
        }
        let row = sqlx::query(&format!(
            "UPDATE entries SET spiffe_id = $1, parent_id = $2, selectors_json = $3, \
             dedup_key = $4, x509_ttl_secs = $5, jwt_ttl_secs = $6, dns_names_json = $7, \
             groups_json = $8, scopes_json = $9, enforcer = $10, node_selectors_json = $11, \
             revision = revision + 1, updated_at = $12 WHERE id = $13 RETURNING {ENTRY_COLS}"
        ))
        .bind(spec.spiffe_id.as_str())
        .bind(spec.parent_id.as_str())
        .bind(&enc.selectors_json)
        .bind(&enc.dedup_key)
        .bind(i64::from(spec.x509_ttl_secs))
        .bind(i64::from(spec.jwt_ttl_secs))
        .bind(&enc.dns_names_json)
        .bind(&enc.groups_json)
        .bind(&enc.scopes_json)
        .bind(i64::from(spec.enforcer))
        .bind(&enc.node_selectors_json)
        .bind(now)
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| StoreError::conflict_or(e, conflict))?
        .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
        let entry = entry_from_row(&row)?;
        bump_meta(&mut tx, ENTRIES_REVISION).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<(), StoreError> {
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let deleted = sqlx::query("DELETE FROM entries WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound(format!("entry {id}")));
        }
        bump_meta(&mut tx, ENTRIES_REVISION).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn count_entries(&self) -> Result<i64, StoreError> {
        self.count("entries").await
    }

    async fn entries_revision(&self) -> Result<i64, StoreError> {
        self.meta_value(ENTRIES_REVISION).await
    }

    async fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (spiffe_id, attestation_type, serial, not_after, evicted, \
             selectors_json, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = excluded.attestation_type, \
             serial = excluded.serial, not_after = excluded.not_after, \
             evicted = excluded.evicted, selectors_json = excluded.selectors_json, \
             updated_at = excluded.updated_at",
        )
        .bind(node.spiffe_id.as_str())
        .bind(&node.attestation_type)
        .bind(&node.serial)
        .bind(node.not_after)
        .bind(i64::from(node.evicted))
        .bind(to_json(&node.selectors)?)
        .bind(node.created_at)
        .bind(node.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_node(&self, id: &SpiffeId) -> Result<Option<NodeRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {NODE_COLS} FROM nodes WHERE spiffe_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(node_from_row)
        .transpose()
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY spiffe_id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_from_row).collect()
    }

    async fn list_evicted_nodes(&self) -> Result<Vec<SpiffeId>, StoreError> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT spiffe_id FROM nodes WHERE evicted = 1 ORDER BY spiffe_id")
                .fetch_all(&self.pool)
                .await?;
        ids.iter()
            .map(|s| {
                SpiffeId::new(s)
                    .map_err(|e| StoreError::Corrupt(format!("nodes.spiffe_id {s:?}: {e}")))
            })
            .collect()
    }

    async fn evict_node(&self, id: &SpiffeId, now: UnixTime) -> Result<bool, StoreError> {
        let n = sqlx::query("UPDATE nodes SET evicted = 1, updated_at = $1 WHERE spiffe_id = $2")
            .bind(now)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn create_join_token(
        &self,
        token_hash: &str,
        expires_at: UnixTime,
        created_at: UnixTime,
    ) -> Result<(), StoreError> {
        validate_token_hash(token_hash)?;
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, expires_at, created_at) VALUES ($1, $2, $3)",
        )
        .bind(token_hash)
        .bind(expires_at)
        .bind(created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::conflict_or(e, || "join token already exists".into()))?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        node_id: &SpiffeId,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        validate_token_hash(token_hash)?;
        // One statement: the database serialises concurrent consumers; only one sees the row
        // still unused.
        let won = sqlx::query(
            "UPDATE join_tokens SET used_at = $1, node_id = $2 \
             WHERE token_hash = $3 AND used_at IS NULL AND expires_at > $4",
        )
        .bind(now)
        .bind(node_id.as_str())
        .bind(token_hash)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if won == 1 {
            return Ok(());
        }
        let row = sqlx::query("SELECT used_at, expires_at FROM join_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        let why = match row {
            None => JoinTokenError::Unknown,
            Some(row) => {
                let r = Reader::new(&row, "join_tokens", "token_hash");
                let used_at: Option<i64> = r.get("used_at")?;
                let expires_at: i64 = r.get("expires_at")?;
                if used_at.is_some() {
                    JoinTokenError::AlreadyUsed
                } else if expires_at <= now {
                    JoinTokenError::Expired
                } else {
                    // Created after our UPDATE ran: it was not there when we looked.
                    JoinTokenError::Unknown
                }
            }
        };
        Err(StoreError::JoinToken(why))
    }

    async fn record_issued(&self, issued: &IssuedIdentity) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        insert_issued(&mut conn, issued).await
    }

    async fn record_issued_batch(&self, issued: &[IssuedIdentity]) -> Result<(), StoreError> {
        let mut tx = begin_write(&self.pool, self.backend).await?;
        for i in issued {
            insert_issued(&mut tx, i).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_issued(
        &self,
        spiffe_id: Option<&SpiffeId>,
        limit: i64,
    ) -> Result<Vec<IssuedIdentity>, StoreError> {
        let limit = limit.clamp(0, MAX_ISSUED_LIMIT);
        let rows = match spiffe_id {
            Some(id) => {
                sqlx::query(&format!(
                    "SELECT {ISSUED_COLS} FROM issued WHERE spiffe_id = $1 \
                     ORDER BY issued_at DESC, id DESC LIMIT $2"
                ))
                .bind(id.as_str())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {ISSUED_COLS} FROM issued ORDER BY issued_at DESC, id DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(issued_from_row).collect()
    }

    async fn count_issued(&self) -> Result<i64, StoreError> {
        self.count("issued").await
    }

    async fn issued_by_serial(&self, serial: &str) -> Result<Option<IssuedIdentity>, StoreError> {
        sqlx::query(&format!(
            "SELECT {ISSUED_COLS} FROM issued WHERE serial_or_jti = $1 ORDER BY id DESC LIMIT 1"
        ))
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(issued_from_row)
        .transpose()
    }

    async fn add_revocation(&self, revocation: &Revocation) -> Result<i64, StoreError> {
        let serial = revocation.serial.as_deref();
        if serial.is_none() && revocation.spiffe_id.is_none() {
            return Err(StoreError::Invalid(
                "a revocation must name a serial, a SPIFFE ID, or both".into(),
            ));
        }
        if serial == Some("") {
            return Err(StoreError::Invalid(
                "a revoked serial cannot be empty".into(),
            ));
        }
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO revocations (serial, spiffe_id, reason, revoked_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(serial)
        .bind(revocation.spiffe_id.as_ref().map(SpiffeId::as_str))
        .bind(&revocation.reason)
        .bind(revocation.revoked_at)
        .bind(revocation.expires_at)
        .fetch_one(&mut *tx)
        .await?;
        bump_meta(&mut tx, REVOCATIONS_REVISION).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn list_revocations(&self, now: UnixTime) -> Result<Vec<Revocation>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {REVOCATION_COLS} FROM revocations WHERE expires_at > $1 ORDER BY id"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(revocation_from_row).collect()
    }

    async fn is_revoked(
        &self,
        serial: &str,
        spiffe_id: &SpiffeId,
        issued_at: UnixTime,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        // The query only finds the revocations that name this serial or ID; whether one
        // revokes the credential is sigil_core's rule, the one every node applies.
        let rows = sqlx::query(&format!(
            "SELECT {REVOCATION_COLS} FROM revocations WHERE serial = $1 OR spiffe_id = $2"
        ))
        .bind(serial)
        .bind(spiffe_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        let credential = Credential {
            serial,
            spiffe_id: spiffe_id.as_str(),
            not_before: issued_at,
        };
        for row in &rows {
            if revocation_from_row(row)?
                .revoked_svid()
                .revokes(&credential, now)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn prune_revocations(&self, now: UnixTime) -> Result<u64, StoreError> {
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let n = sqlx::query("DELETE FROM revocations WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            bump_meta(&mut tx, REVOCATIONS_REVISION).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn revocations_revision(&self) -> Result<i64, StoreError> {
        self.meta_value(REVOCATIONS_REVISION).await
    }

    async fn save_authority(&self, a: &AuthorityRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO authorities (id, kind, state, public_der, key_ref, algorithm, not_after, \
             last_use_expiry, created_at, activated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, state = excluded.state, \
             public_der = excluded.public_der, key_ref = excluded.key_ref, \
             algorithm = excluded.algorithm, not_after = excluded.not_after, \
             last_use_expiry = excluded.last_use_expiry, created_at = excluded.created_at, \
             activated_at = excluded.activated_at",
        )
        .bind(&a.id)
        .bind(a.kind.as_str())
        .bind(a.state.as_str())
        .bind(a.public_der.as_slice())
        .bind(&a.key_ref)
        .bind(&a.algorithm)
        .bind(a.not_after)
        .bind(a.last_use_expiry)
        .bind(a.created_at)
        .bind(a.activated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_authorities(
        &self,
        kind: AuthorityKind,
    ) -> Result<Vec<AuthorityRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {AUTHORITY_COLS} FROM authorities WHERE kind = $1 ORDER BY created_at, id"
        ))
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(authority_from_row).collect()
    }

    async fn set_authority_state(
        &self,
        id: &str,
        state: AuthorityState,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        let result = match state {
            AuthorityState::Active => {
                sqlx::query(
                    "UPDATE authorities SET activated_at = CASE \
                     WHEN state <> 'active' OR activated_at IS NULL THEN $1 \
                     ELSE activated_at END, state = $2 WHERE id = $3",
                )
                .bind(now)
                .bind(state.as_str())
                .bind(id)
                .execute(&self.pool)
                .await?
            }
            AuthorityState::Prepared | AuthorityState::Retired => {
                sqlx::query("UPDATE authorities SET state = $1 WHERE id = $2")
                    .bind(state.as_str())
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
        };
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("authority {id:?}")));
        }
        Ok(())
    }

    async fn bump_authority_use(&self, id: &str, not_after: UnixTime) -> Result<(), StoreError> {
        let n = sqlx::query(
            "UPDATE authorities SET last_use_expiry = CASE \
             WHEN last_use_expiry < $1 THEN $2 ELSE last_use_expiry END WHERE id = $3",
        )
        .bind(not_after)
        .bind(not_after)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(format!("authority {id:?}")));
        }
        Ok(())
    }

    async fn delete_authority(&self, id: &str) -> Result<(), StoreError> {
        let n = sqlx::query("DELETE FROM authorities WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound(format!("authority {id:?}")));
        }
        Ok(())
    }

    async fn insert_policy_bundle(&self, b: &PolicyBundleRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO policy_bundles (revision, envelope, payload_sha256, key_id, not_after, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(b.revision)
        .bind(&b.envelope)
        .bind(&b.payload_sha256)
        .bind(&b.key_id)
        .bind(b.not_after)
        .bind(b.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            StoreError::conflict_or(e, || {
                format!("policy bundle revision {} exists", b.revision)
            })
        })?;
        Ok(())
    }

    async fn latest_policy_bundle(&self) -> Result<Option<PolicyBundleRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT revision, envelope, payload_sha256, key_id, not_after, created_at \
             FROM policy_bundles ORDER BY revision DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let r = Reader::new(&row, "policy_bundles", "revision");
        Ok(Some(PolicyBundleRecord {
            revision: r.get("revision")?,
            envelope: r.get("envelope")?,
            payload_sha256: r.get("payload_sha256")?,
            key_id: r.get("key_id")?,
            not_after: r.get("not_after")?,
            created_at: r.get("created_at")?,
        }))
    }

    async fn policy_revision(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(revision) FROM policy_bundles")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn bundle_sequence(&self) -> Result<i64, StoreError> {
        self.meta_value(BUNDLE_SEQUENCE).await
    }

    async fn bump_bundle_sequence(&self) -> Result<i64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        bump_meta(&mut conn, BUNDLE_SEQUENCE).await
    }

    async fn record_issued_logged(
        &self,
        issued: &[IssuedIdentity],
        log: &TlogAppend,
    ) -> Result<(), StoreError> {
        let mut tx = begin_write(&self.pool, self.backend).await?;
        for i in issued {
            insert_issued(&mut tx, i).await?;
        }
        for (idx, data) in &log.leaves {
            sqlx::query("INSERT INTO tlog_leaves (idx, data) VALUES ($1, $2)")
                .bind(to_i64(*idx)?)
                .bind(data.clone())
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    StoreError::conflict_or(e, || format!("log leaf {idx} already exists"))
                })?;
        }
        for (idx, hash) in &log.hashes {
            sqlx::query("INSERT INTO tlog_hashes (idx, hash) VALUES ($1, $2)")
                .bind(to_i64(*idx)?)
                .bind(hash.to_vec())
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    StoreError::conflict_or(e, || format!("log hash {idx} already exists"))
                })?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn tlog_size(&self) -> Result<u64, StoreError> {
        log_size(&self.pool, "tlog_leaves").await
    }

    async fn tlog_hashes(&self, indexes: &[u64]) -> Result<Vec<[u8; 32]>, StoreError> {
        log_hashes(&self.pool, "tlog_hashes", indexes).await
    }

    async fn tlog_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        log_entries(&self.pool, "tlog_leaves", start, end).await
    }

    async fn audit_lookup(
        &self,
        proxy: &str,
        request_ids: &[String],
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let mut out = Vec::with_capacity(request_ids.len());
        for id in request_ids {
            let idx: Option<i64> = sqlx::query_scalar(
                "SELECT idx FROM audit_leaves WHERE proxy = $1 AND request_id = $2",
            )
            .bind(proxy)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
            out.push(match idx {
                None => None,
                Some(i) => Some(
                    u64::try_from(i)
                        .map_err(|_| StoreError::Corrupt(format!("negative log index {i}")))?,
                ),
            });
        }
        Ok(out)
    }

    async fn audit_append(
        &self,
        proxy: &str,
        request_ids: &[String],
        log: &TlogAppend,
    ) -> Result<(), StoreError> {
        if request_ids.len() != log.leaves.len() {
            return Err(StoreError::Unsupported(
                "one request id per audit leaf is required".into(),
            ));
        }
        let mut tx = begin_write(&self.pool, self.backend).await?;
        for ((idx, data), id) in log.leaves.iter().zip(request_ids) {
            sqlx::query(
                "INSERT INTO audit_leaves (idx, data, proxy, request_id) VALUES ($1, $2, $3, $4)",
            )
            .bind(to_i64(*idx)?)
            .bind(data.clone())
            .bind(proxy)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                StoreError::conflict_or(e, || {
                    format!("log leaf {idx} or audit record {proxy} {id} already exists")
                })
            })?;
        }
        for (idx, hash) in &log.hashes {
            sqlx::query("INSERT INTO audit_hashes (idx, hash) VALUES ($1, $2)")
                .bind(to_i64(*idx)?)
                .bind(hash.to_vec())
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    StoreError::conflict_or(e, || format!("log hash {idx} already exists"))
                })?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn audit_size(&self) -> Result<u64, StoreError> {
        log_size(&self.pool, "audit_leaves").await
    }

    async fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<[u8; 32]>, StoreError> {
        log_hashes(&self.pool, "audit_hashes", indexes).await
    }

    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        log_entries(&self.pool, "audit_leaves", start, end).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn put_sealed_key(
        &self,
        name: &str,
        sealed: &str,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "INSERT INTO sealed_keys (name, sealed, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(sealed)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn sealed_key(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM sealed_keys WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn delete_sealed_key(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sealed_keys WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_model_key(&self, k: &ModelKeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO model_keys (name, version, key_id, wrapped_key, header_sha256, \
             plaintext_sha256, created_at, sealed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&k.name)
        .bind(k.version)
        .bind(&k.key_id)
        .bind(&k.wrapped_key)
        .bind(k.header_sha256.as_deref())
        .bind(k.plaintext_sha256.as_deref())
        .bind(k.created_at)
        .bind(k.sealed_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            StoreError::conflict_or(e, || {
                format!("model {:?} version {} is registered", k.name, k.version)
            })
        })?;
        Ok(())
    }

    async fn model_key(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<ModelKeyRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {MODEL_KEY_COLUMNS} FROM model_keys WHERE name = $1 AND version = $2"
        ))
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(model_key_from_row).transpose()
    }

    async fn mark_model_sealed(
        &self,
        name: &str,
        version: i64,
        header_sha256: &str,
        plaintext_sha256: &str,
        now: UnixTime,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE model_keys SET header_sha256 = $1, plaintext_sha256 = $2, sealed_at = $3 \
             WHERE name = $4 AND version = $5 AND header_sha256 IS NULL",
        )
        .bind(header_sha256)
        .bind(plaintext_sha256)
        .bind(now)
        .bind(name)
        .bind(version)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn list_model_keys(&self) -> Result<Vec<ModelKeyRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {MODEL_KEY_COLUMNS} FROM model_keys ORDER BY name, version"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(model_key_from_row).collect()
    }

    async fn create_secret_version(&self, v: &SecretVersionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO secret_versions (path, version, key_id, wrapped_key, ciphertext, \
             created_at, deleted_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&v.path)
        .bind(v.version)
        .bind(&v.key_id)
        .bind(&v.wrapped_key)
        .bind(&v.ciphertext)
        .bind(v.created_at)
        .bind(v.deleted_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            StoreError::conflict_or(e, || {
                format!("secret {:?} version {} exists", v.path, v.version)
            })
        })?;
        Ok(())
    }

    async fn latest_secret_version(
        &self,
        path: &str,
    ) -> Result<Option<SecretVersionRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SECRET_COLUMNS} FROM secret_versions WHERE path = $1 \
             ORDER BY version DESC LIMIT 1"
        ))
        .bind(path)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(secret_from_row).transpose()
    }

    async fn secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SECRET_COLUMNS} FROM secret_versions WHERE path = $1 ORDER BY version"
        ))
        .bind(path)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(secret_from_row).collect()
    }

    async fn list_secrets(&self) -> Result<Vec<SecretVersionRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SECRET_COLUMNS} FROM secret_versions s WHERE version = \
             (SELECT MAX(version) FROM secret_versions t WHERE t.path = s.path) ORDER BY path"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(secret_from_row).collect()
    }

    async fn delete_secret(&self, path: &str, now: UnixTime) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE secret_versions SET deleted_at = $1, wrapped_key = '', ciphertext = '' \
             WHERE path = $2 AND deleted_at IS NULL",
        )
        .bind(now)
        .bind(path)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn put_db_role(&self, r: &DbRoleRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO db_roles (name, key_id, wrapped_key, connection, creation_sql, \
             revocation_sql, default_ttl, max_ttl, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, \
             wrapped_key = excluded.wrapped_key, connection = excluded.connection, \
             creation_sql = excluded.creation_sql, revocation_sql = excluded.revocation_sql, \
             default_ttl = excluded.default_ttl, max_ttl = excluded.max_ttl, \
             created_at = excluded.created_at",
        )
        .bind(&r.name)
        .bind(&r.key_id)
        .bind(&r.wrapped_key)
        .bind(&r.connection)
        .bind(&r.creation_sql)
        .bind(&r.revocation_sql)
        .bind(r.default_ttl)
        .bind(r.max_ttl)
        .bind(r.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn db_role(&self, name: &str) -> Result<Option<DbRoleRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {DB_ROLE_COLUMNS} FROM db_roles WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(db_role_from_row).transpose()
    }

    async fn list_db_roles(&self) -> Result<Vec<DbRoleRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {DB_ROLE_COLUMNS} FROM db_roles ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(db_role_from_row).collect()
    }

    async fn delete_db_role(&self, name: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("DELETE FROM db_roles WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    async fn create_lease(&self, l: &LeaseRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO leases (id, path, spiffe_id, serial, node_id, db_role, username, \
             issued_at, expires_at, max_expires_at, revoked_at, revoke_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&l.id)
        .bind(&l.path)
        .bind(&l.spiffe_id)
        .bind(&l.serial)
        .bind(&l.node_id)
        .bind(&l.db_role)
        .bind(&l.username)
        .bind(l.issued_at)
        .bind(l.expires_at)
        .bind(l.max_expires_at)
        .bind(l.revoked_at)
        .bind(l.revoke_reason.as_deref())
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::conflict_or(e, || format!("lease {:?} exists", l.id)))?;
        Ok(())
    }

    async fn lease(&self, id: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(lease_from_row).transpose()
    }

    async fn list_leases(&self, f: &LeaseFilter) -> Result<Vec<LeaseRecord>, StoreError> {
        // Every condition is always present, with a NULL parameter meaning "any", so the
        // statement text does not vary.
        let rows = sqlx::query(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE \
             ($1 IS NULL OR spiffe_id = $1) AND ($2 IS NULL OR serial = $2) AND \
             ($3 IS NULL OR node_id = $3) AND ($4 IS NULL OR expires_at <= $4) AND \
             ($5 = 1 OR revoked_at IS NULL) ORDER BY expires_at, id"
        ))
        .bind(f.spiffe_id.as_deref())
        .bind(f.serial.as_deref())
        .bind(f.node_id.as_deref())
        .bind(f.due_by)
        .bind(i64::from(f.include_revoked))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(lease_from_row).collect()
    }

    async fn extend_lease(&self, id: &str, expires_at: UnixTime) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("UPDATE leases SET expires_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(expires_at)
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }

    async fn close_lease(&self, id: &str, now: UnixTime, reason: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            "UPDATE leases SET revoked_at = $1, revoke_reason = $2 \
             WHERE id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(reason)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    async fn put_posture(
        &self,
        node_id: &str,
        posture_json: &str,
        score: i64,
        reasons: &[String],
        now: UnixTime,
    ) -> Result<NodeRiskRecord, StoreError> {
        let reasons_json = to_json(reasons)?;
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let before = node_risk_in(&mut tx, node_id).await?;
        let changed = before
            .as_ref()
            .is_none_or(|b| b.posture_score != score || b.posture_reasons != reasons);
        sqlx::query(
            "INSERT INTO node_risk (node_id, posture_json, posture_score, posture_reasons_json, \
             anomaly_score, anomaly_reasons_json, updated_at) VALUES ($1, $2, $3, $4, 0, '[]', $5) \
             ON CONFLICT (node_id) DO UPDATE SET posture_json = $2, posture_score = $3, \
             posture_reasons_json = $4, updated_at = $5",
        )
        .bind(node_id)
        .bind(posture_json)
        .bind(score)
        .bind(&reasons_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if changed {
            bump_meta(&mut tx, RISK_REVISION).await?;
        }
        let after = node_risk_in(&mut tx, node_id).await?;
        tx.commit().await?;
        after.ok_or_else(|| StoreError::Corrupt("node_risk row vanished".into()))
    }

    async fn set_anomaly(
        &self,
        node_id: &str,
        score: i64,
        reasons: &[String],
        now: UnixTime,
    ) -> Result<NodeRiskRecord, StoreError> {
        let reasons_json = to_json(reasons)?;
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let before = node_risk_in(&mut tx, node_id).await?;
        let changed = before
            .as_ref()
            .is_none_or(|b| b.anomaly_score != score || b.anomaly_reasons != reasons);
        sqlx::query(
            "INSERT INTO node_risk (node_id, posture_json, posture_score, posture_reasons_json, \
             anomaly_score, anomaly_reasons_json, updated_at) VALUES ($1, '', 0, '[]', $2, $3, $4) \
             ON CONFLICT (node_id) DO UPDATE SET anomaly_score = $2, anomaly_reasons_json = $3, \
             updated_at = $4",
        )
        .bind(node_id)
        .bind(score)
        .bind(&reasons_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if changed {
            bump_meta(&mut tx, RISK_REVISION).await?;
        }
        let after = node_risk_in(&mut tx, node_id).await?;
        tx.commit().await?;
        after.ok_or_else(|| StoreError::Corrupt("node_risk row vanished".into()))
    }

    async fn list_node_risk(&self) -> Result<Vec<NodeRiskRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {NODE_RISK_COLS} FROM node_risk ORDER BY node_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_risk_from_row).collect()
    }

    async fn node_risk(&self, node_id: &str) -> Result<Option<NodeRiskRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        node_risk_in(&mut conn, node_id).await
    }

    async fn risk_revision(&self) -> Result<i64, StoreError> {
        self.meta_value(RISK_REVISION).await
    }

    async fn quarantine(
        &self,
        q: &QuarantineRecord,
        expires_at: UnixTime,
    ) -> Result<(i64, Vec<String>), StoreError> {
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM quarantines WHERE node_id = $1 AND cleared_at IS NULL \
             AND (spiffe_id IS NULL OR spiffe_id = $2) ORDER BY id LIMIT 1",
        )
        .bind(&q.node_id)
        .bind(q.spiffe_id.as_deref().unwrap_or(""))
        .fetch_optional(&mut *tx)
        .await?;
        let id = match existing {
            Some(id) => id,
            None => {
                sqlx::query_scalar(
                    "INSERT INTO quarantines (node_id, spiffe_id, reason, features_json, \
                     created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                )
                .bind(&q.node_id)
                .bind(q.spiffe_id.as_deref())
                .bind(&q.reason)
                .bind(&q.features_json)
                .bind(q.created_at)
                .fetch_one(&mut *tx)
                .await?
            }
        };
        // Every unexpired X.509-SVID the node asked for (of that workload), not yet revoked.
        let serials: Vec<String> = sqlx::query_scalar(
            "SELECT serial_or_jti FROM issued WHERE kind = 'x509-svid' AND requester = $1 \
             AND not_after > $2 AND ($3 = '' OR spiffe_id = $3) \
             AND serial_or_jti NOT IN (SELECT serial FROM revocations WHERE serial IS NOT NULL)",
        )
        .bind(&q.node_id)
        .bind(q.created_at)
        .bind(q.spiffe_id.as_deref().unwrap_or(""))
        .fetch_all(&mut *tx)
        .await?;
        let reason = format!("quarantine {id}: {}", q.reason);
        for serial in &serials {
            sqlx::query(
                "INSERT INTO revocations (serial, spiffe_id, reason, revoked_at, expires_at) \
                 VALUES ($1, NULL, $2, $3, $4)",
            )
            .bind(serial)
            .bind(&reason)
            .bind(q.created_at)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        }
        if !serials.is_empty() {
            bump_meta(&mut tx, REVOCATIONS_REVISION).await?;
        }
        bump_meta(&mut tx, RISK_REVISION).await?;
        tx.commit().await?;
        Ok((id, serials))
    }

    async fn active_quarantines(&self) -> Result<Vec<QuarantineRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, node_id, spiffe_id, reason, features_json, created_at, cleared_at \
             FROM quarantines WHERE cleared_at IS NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let r = Reader::new(row, "quarantines", "id");
                Ok(QuarantineRecord {
                    id: r.get("id")?,
                    node_id: r.get("node_id")?,
                    spiffe_id: r.get("spiffe_id")?,
                    reason: r.get("reason")?,
                    features_json: r.get("features_json")?,
                    created_at: r.get("created_at")?,
                    cleared_at: r.get("cleared_at")?,
                })
            })
            .collect()
    }

    async fn clear_quarantine(
        &self,
        node_id: &str,
        spiffe_id: Option<&str>,
        now: UnixTime,
    ) -> Result<u64, StoreError> {
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let n = sqlx::query(
            "UPDATE quarantines SET cleared_at = $1 WHERE node_id = $2 AND cleared_at IS NULL \
             AND ($3 = '' OR spiffe_id = $3)",
        )
        .bind(now)
        .bind(node_id)
        .bind(spiffe_id.unwrap_or(""))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            sqlx::query(
                "UPDATE node_risk SET anomaly_score = 0, anomaly_reasons_json = '[]', \
                 updated_at = $1 WHERE node_id = $2",
            )
            .bind(now)
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
            bump_meta(&mut tx, RISK_REVISION).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn bootstrap_lock(&self) -> Result<BootstrapLock, StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(BootstrapLock { conn: None }),
            Backend::Postgres => {
                let mut conn = self.pool.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(BOOTSTRAP_LOCK)
                    .execute(&mut *conn)
                    .await?;
                Ok(BootstrapLock { conn: Some(conn) })
            }
        }
    }
}

const MODEL_KEY_COLUMNS: &str = "name, version, key_id, wrapped_key, header_sha256, \
     plaintext_sha256, created_at, sealed_at";

fn model_key_from_row(row: &AnyRow) -> Result<ModelKeyRecord, StoreError> {
    let r = Reader::new(row, "model_keys", "key_id");
    Ok(ModelKeyRecord {
        name: r.get("name")?,
        version: r.get("version")?,
        key_id: r.get("key_id")?,
        wrapped_key: r.get("wrapped_key")?,
        header_sha256: r.get("header_sha256")?,
        plaintext_sha256: r.get("plaintext_sha256")?,
        created_at: r.get("created_at")?,
        sealed_at: r.get("sealed_at")?,
    })
}

const SECRET_COLUMNS: &str =
    "path, version, key_id, wrapped_key, ciphertext, created_at, deleted_at";

fn secret_from_row(row: &AnyRow) -> Result<SecretVersionRecord, StoreError> {
    let r = Reader::new(row, "secret_versions", "key_id");
    Ok(SecretVersionRecord {
        path: r.get("path")?,
        version: r.get("version")?,
        key_id: r.get("key_id")?,
        wrapped_key: r.get("wrapped_key")?,
        ciphertext: r.get("ciphertext")?,
        created_at: r.get("created_at")?,
        deleted_at: r.get("deleted_at")?,
    })
}

const DB_ROLE_COLUMNS: &str = "name, key_id, wrapped_key, connection, creation_sql, \
     revocation_sql, default_ttl, max_ttl, created_at";

fn db_role_from_row(row: &AnyRow) -> Result<DbRoleRecord, StoreError> {
    let r = Reader::new(row, "db_roles", "name");
    Ok(DbRoleRecord {
        name: r.get("name")?,
        key_id: r.get("key_id")?,
        wrapped_key: r.get("wrapped_key")?,
        connection: r.get("connection")?,
        creation_sql: r.get("creation_sql")?,
        revocation_sql: r.get("revocation_sql")?,
        default_ttl: r.get("default_ttl")?,
        max_ttl: r.get("max_ttl")?,
        created_at: r.get("created_at")?,
    })
}

const LEASE_COLUMNS: &str = "id, path, spiffe_id, serial, node_id, db_role, username, \
     issued_at, expires_at, max_expires_at, revoked_at, revoke_reason";

fn lease_from_row(row: &AnyRow) -> Result<LeaseRecord, StoreError> {
    let r = Reader::new(row, "leases", "id");
    Ok(LeaseRecord {
        id: r.get("id")?,
        path: r.get("path")?,
        spiffe_id: r.get("spiffe_id")?,
        serial: r.get("serial")?,
        node_id: r.get("node_id")?,
        db_role: r.get("db_role")?,
        username: r.get("username")?,
        issued_at: r.get("issued_at")?,
        expires_at: r.get("expires_at")?,
        max_expires_at: r.get("max_expires_at")?,
        revoked_at: r.get("revoked_at")?,
        revoke_reason: r.get("revoke_reason")?,
    })
}

/// The advisory lock key of [`Store::bootstrap_lock`] ("sigilkey" in ASCII).
const BOOTSTRAP_LOCK: i64 = 0x7369_6769_6c6b_6579;

/// The database-wide bootstrap lock (see [`Store::bootstrap_lock`]).
pub struct BootstrapLock {
    conn: Option<sqlx::pool::PoolConnection<Any>>,
}

impl std::fmt::Debug for BootstrapLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapLock")
            .field("held", &self.conn.is_some())
            .finish()
    }
}

impl BootstrapLock {
    /// Releases the lock.
    pub async fn release(mut self) -> Result<(), StoreError> {
        if let Some(mut conn) = self.conn.take() {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(BOOTSTRAP_LOCK)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

impl Drop for BootstrapLock {
    fn drop(&mut self) {
        // Not released (an error path): close the connection rather than return it to the
        // pool still holding the lock; PostgreSQL drops a session's locks when it ends.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

/// The PostgreSQL channel the schema's triggers NOTIFY on every change agents must hear
/// about (in the writing transaction, so delivered exactly when it commits).
pub const CHANGES_CHANNEL: &str = "sigil_changes";

/// LISTENs on [`CHANGES_CHANNEL`] on a dedicated PostgreSQL connection to `url` and calls
/// `on_change` with each payload (`entries_revision`, `revocations_revision`,
/// `bundle_sequence`, `policy`, `nodes`), or with `None` after (re)connecting, when
/// notifications may have been missed. Reconnects on error; runs until dropped.
pub async fn listen_for_changes<F>(url: &str, on_change: F)
where
    F: Fn(Option<&str>) + Send,
{
    use sqlx::postgres::PgListener;
    let retry = std::time::Duration::from_secs(1);
    loop {
        let mut listener = match PgListener::connect(url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "change listener: connecting failed; retrying");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANGES_CHANNEL).await {
            tracing::warn!(error = %e, "change listener: LISTEN failed; retrying");
            tokio::time::sleep(retry).await;
            continue;
        }
        tracing::debug!(channel = CHANGES_CHANNEL, "listening for changes");
        on_change(None);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => on_change(Some(n.payload())),
                // The connection was lost; the next call reconnects and re-LISTENs.
                Ok(None) => {
                    tracing::warn!("change listener: connection lost; reconnecting");
                    on_change(None);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "change listener failed; reconnecting");
                    on_change(None);
                    tokio::time::sleep(retry).await;
                    break;
                }
            }
        }
    }
}

/// How many leaves a Merkle log's leaf table (`tlog_leaves`, `audit_leaves`) holds.
async fn log_size(pool: &AnyPool, table: &'static str) -> Result<u64, StoreError> {
    let max: Option<i64> = sqlx::query_scalar(&format!("SELECT MAX(idx) FROM {table}"))
        .fetch_one(pool)
        .await?;
    match max {
        None => Ok(0),
        Some(m) => u64::try_from(m)
            .map(|m| m + 1)
            .map_err(|_| StoreError::Corrupt(format!("negative log index {m}"))),
    }
}

/// Stored tree hashes of a Merkle log's hash table, in order; contiguous runs (tiles) are
/// read with one range query each.
async fn log_hashes(
    pool: &AnyPool,
    table: &'static str,
    indexes: &[u64],
) -> Result<Vec<[u8; 32]>, StoreError> {
    let sql = format!("SELECT idx, hash FROM {table} WHERE idx >= $1 AND idx <= $2 ORDER BY idx");
    let mut out = Vec::with_capacity(indexes.len());
    let mut i = 0;
    while let Some(&start) = indexes.get(i) {
        let mut end = start;
        let mut j = i + 1;
        while indexes.get(j) == Some(&(end + 1)) {
            end += 1;
            j += 1;
        }
        let rows = sqlx::query(&sql)
            .bind(to_i64(start)?)
            .bind(to_i64(end)?)
            .fetch_all(pool)
            .await?;
        if u64::try_from(rows.len()).ok() != Some(end - start + 1) {
            return Err(StoreError::NotFound(format!(
                "log hashes {start}..={end} (have {})",
                rows.len()
            )));
        }
        for row in &rows {
            let hash: Vec<u8> = row.try_get("hash")?;
            let hash: [u8; 32] = hash
                .try_into()
                .map_err(|_| StoreError::Corrupt("log hash is not 32 bytes".into()))?;
            out.push(hash);
        }
        i = j;
    }
    Ok(out)
}

/// The data of leaves `start..end` of a Merkle log's leaf table.
async fn log_entries(
    pool: &AnyPool,
    table: &'static str,
    start: u64,
    end: u64,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT data FROM {table} WHERE idx >= $1 AND idx < $2 ORDER BY idx"
    ))
    .bind(to_i64(start)?)
    .bind(to_i64(end)?)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<Vec<u8>, _>("data").map_err(StoreError::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(matches!(
            parse_url("sqlite://x.db"),
            Ok(Target::Sqlite("x.db"))
        ));
        assert!(matches!(
            parse_url("sqlite:///var/lib/sigil/x.db"),
            Ok(Target::Sqlite("/var/lib/sigil/x.db"))
        ));
        assert!(matches!(
            parse_url("postgres://u@h/db"),
            Ok(Target::Postgres)
        ));
        assert!(matches!(
            parse_url("postgresql://u@h/db"),
            Ok(Target::Postgres)
        ));
        for bad in [
            "sqlite://",
            "sqlite://x.db?mode=ro",
            "sqlite://:memory:",
            "sqlite::memory:",
            "mysql://root:hunter2@h/db",
            "x.db",
            "",
        ] {
            match parse_url(bad) {
                Err(StoreError::Unsupported(msg)) => assert!(!msg.contains("hunter2"), "{msg}"),
                _ => panic!("{bad} was accepted"),
            }
        }
    }

    #[test]
    fn postgres_urls_keep_libpq_tls_settings() {
        use sqlx::postgres::PgSslMode;
        let o = postgres_connect_options(
            "postgres://u@db.example:5433/sigil?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::VerifyFull));
        assert_eq!(o.get_host(), "db.example");
        assert_eq!(o.get_port(), 5433);
        let o = postgres_connect_options("postgresql://u@h/db?sslmode=require").unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::Require));
    }

    #[tokio::test]
    async fn bad_postgres_urls_are_refused_before_connecting() {
        for bad in [
            "postgres://u:hunter2@h/db?sslmode=verify-everything",
            "postgres://u:hunter2@h:99999/db",
            "sqlite://x.db",
            "mysql://u:hunter2@h/db",
            "",
        ] {
            match connect_postgres(bad).await {
                Err(StoreError::Unsupported(msg)) => assert!(!msg.contains("hunter2"), "{msg}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // The store refuses the same URLs the same way, before any connection.
        assert!(matches!(
            SqlStore::connect("postgres://u@h/db?sslmode=verify-everything").await,
            Err(StoreError::Unsupported(_))
        ));
    }

    #[test]
    fn dedup_key_ignores_selector_order_and_repeats() {
        let spec = |sels: &[&str]| EntrySpec {
            spiffe_id: SpiffeId::new("spiffe://td/app").unwrap(),
            parent_id: SpiffeId::new("spiffe://td/node").unwrap(),
            selectors: sels
                .iter()
                .map(|s| sigil_core::Selector::parse(s).unwrap())
                .collect(),
            x509_ttl_secs: 3600,
            jwt_ttl_secs: 300,
            dns_names: vec![],
            groups: vec![],
            scopes: vec![],
            enforcer: false,
            node_selectors: vec![],
        };
        let a = dedup_key(&spec(&["unix:uid:1", "unix:gid:2"])).unwrap();
        let b = dedup_key(&spec(&["unix:gid:2", "unix:uid:1", "unix:uid:1"])).unwrap();
        let c = dedup_key(&spec(&["unix:uid:1"])).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn token_hashes_must_be_sha256_hex() {
        validate_token_hash(&"ab".repeat(32)).unwrap();
        for bad in ["", "secret-token", &"AB".repeat(32), &"ab".repeat(33)] {
            assert!(matches!(
                validate_token_hash(bad),
                Err(StoreError::Invalid(_))
            ));
        }
    }
}
