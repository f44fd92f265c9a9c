//! Secrets at the trust authority: static secrets, envelope-encrypted at rest under the
//! secret key-encryption key and versioned; dynamic PostgreSQL credentials made per request
//! and dropped when their lease ends; and the leases of those credentials.
//!
//! A workload reads over mTLS with its X.509-SVID (directly, or through its agent, which
//! holds the SVID): `POST /secrets/v1/read`. The current signed policy bundle decides
//! (`read_secret` on `Secret::"<path>"`, with the workload's node and its attestation
//! selectors in context) before anything about the path is looked up, so a workload that may
//! not read a path gets the same refusal whether it exists or not. Every read, issue, renewal
//! and revocation is appended to the transparency log before the answer is sent.
//!
//! Paths under `database/creds/<role>` are dynamic: each read makes a PostgreSQL role with a
//! random password and `VALID UNTIL` the lease end (at most the SVID's expiry), recorded as a
//! lease before it exists, so a crash never leaves a role nobody will drop. A sweeper closes
//! leases that ended, whose SVID or identity was revoked, or whose node was evicted: it ends
//! the role's sessions and drops it, then marks the lease closed and logs it.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::json;
use sigil_pki::VerifiedX509Svid;
use sigil_seal::{KeyEncryptionKey, SecretEnvelope, WrappedDataKey, open_secret, seal_secret};
use sigil_store::{DbRoleRecord, LeaseFilter, LeaseRecord, SecretVersionRecord};
use sqlx::{Connection as _, Executor as _};

use crate::admin::{ApiError, ApiResult, log_change, ok, parse_body};
use crate::keyvault::KeyVault;
use crate::models::{
    Refusal, hour_and_weekday, internal, json_response, node_of, parse_request, refuse,
    verified_caller, workload_groups,
};
use crate::tls::PeerAuth;
use crate::{AppState, ServerError};

/// The vault name of the secret key-encryption key.
const KEK_NAME: &str = "secret-kek.hex";
/// Paths under this prefix are dynamic database credentials: `database/creds/<role>`.
pub const DB_CREDS_PREFIX: &str = "database/creds/";
/// Largest secret value, bytes.
const MAX_VALUE: usize = 64 * 1024;
/// How often the sweeper looks for leases to close (it is also woken at once by a
/// revocation or an eviction).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The trust authority's secrets: the KEK and the sweeper's wake-up.
pub struct SecretAuthority {
    kek: KeyEncryptionKey,
    wake: tokio::sync::Notify,
    /// Connection pools of the dynamic credential engines, by role name and sealing key id
    /// (a redefined role gets a new pool).
    pools: Mutex<HashMap<(String, String), sqlx::PgPool>>,
}

impl SecretAuthority {
    /// Loads the secret KEK from the vault (created at first start).
    pub async fn load(vault: &KeyVault) -> Result<Self, ServerError> {
        let kek = vault
            .get_or_create(KEK_NAME, || {
                let b: [u8; 32] = rand::random();
                Ok(format!("{}\n", hex::encode(b)))
            })
            .await?;
        let bytes: [u8; 32] = hex::decode(kek.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| ServerError::Internal(format!("{KEK_NAME}: not 64 hex digits")))?;
        let kek = KeyEncryptionKey::from_bytes(&bytes)
            .map_err(|e| ServerError::Internal(e.to_string()))?;
        Ok(Self {
            kek,
            wake: tokio::sync::Notify::new(),
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// Makes the sweeper look at the leases now (after a revocation or an eviction).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn open(&self, v: &SecretVersionRecord) -> Result<Vec<u8>, sigil_seal::SealError> {
        open_secret(
            &self.kek,
            &v.path,
            u64::try_from(v.version).unwrap_or(0),
            &SecretEnvelope {
                key_id: v.key_id.clone(),
                wrapped_key: WrappedDataKey(v.wrapped_key.clone()),
                ciphertext: v.ciphertext.clone(),
            },
        )
    }

    /// The engine connection URL of a role, unsealed.
    fn connection_url(&self, role: &DbRoleRecord) -> Result<String, String> {
        let bytes = open_secret(
            &self.kek,
            &role_seal_path(&role.name),
            1,
            &SecretEnvelope {
                key_id: role.key_id.clone(),
                wrapped_key: WrappedDataKey(role.wrapped_key.clone()),
                ciphertext: role.connection.clone(),
            },
        )
        .map_err(|e| e.to_string())?;
        String::from_utf8(bytes).map_err(|_| "the connection URL is not UTF-8".into())
    }

    /// A pool on the role's database (made on first use).
    fn pool(&self, role: &DbRoleRecord) -> Result<sqlx::PgPool, String> {
        let key = (role.name.clone(), role.key_id.clone());
        if let Ok(g) = self.pools.lock()
            && let Some(p) = g.get(&key)
        {
            return Ok(p.clone());
        }
        let url = self.connection_url(role)?;
        let opts = sigil_store::postgres_connect_options(&url)
            .map_err(|e| format!("the role's connection URL: {e}"))?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(opts);
        if let Ok(mut g) = self.pools.lock() {
            g.retain(|(name, _), _| name != &role.name);
            g.insert(key, pool.clone());
        }
        Ok(pool)
    }
}

/// The path a role's sealed connection URL is bound to (not a secret path: it has a NUL).
fn role_seal_path(name: &str) -> String {
    format!("db-role\0{name}")
}

/// A secret path: 1 to 256 bytes of `A-Z a-z 0-9 . _ - /`, segments separated by single
/// slashes, none empty, `.` or `..`.
pub fn valid_secret_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 256
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// A role name: 1 to 32 of `a-z 0-9 _`, starting with a letter.
fn valid_role_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn random_alnum(n: usize) -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::Rng::fill(&mut rand::rng(), b.as_mut_slice());
    hex::encode(b)
}

/// RFC 3339 (UTC) of unix time `t`, for `VALID UNTIL`.
fn rfc3339(t: i64) -> Result<String, String> {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map_err(|e| e.to_string())?
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// Admin API (the root-only local socket)
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutRequest {
    path: String,
    /// The value, base64.
    value_b64: String,
}

fn check_static_path(path: &str) -> Result<(), ApiError> {
    if !valid_secret_path(path) {
        return Err(ApiError::invalid(format!(
            "bad secret path {path:?}: 1 to 256 of A-Z a-z 0-9 . _ - /, no empty, . or .. segments"
        )));
    }
    if path.starts_with(DB_CREDS_PREFIX) || path == "database/creds" {
        return Err(ApiError::invalid(format!(
            "{DB_CREDS_PREFIX}... is for dynamic database credentials (`sigil secret db-role`)"
        )));
    }
    Ok(())
}

/// `POST /v1/secrets` (`sigil secret put`): a new version of the secret at `path`.
pub(crate) async fn put(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: PutRequest = parse_body(&body)?;
    check_static_path(&req.path)?;
    let value = B64
        .decode(req.value_b64.as_bytes())
        .map_err(|_| ApiError::invalid("value_b64 is not base64"))?;
    if value.len() > MAX_VALUE {
        return Err(ApiError::invalid(format!(
            "a secret value is at most {MAX_VALUE} bytes"
        )));
    }
    let version = app
        .store
        .latest_secret_version(&req.path)
        .await?
        .map_or(1, |v| v.version + 1);
    let sealed = seal_secret(
        &app.secrets.kek,
        &req.path,
        u64::try_from(version).unwrap_or(0),
        &value,
    )
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let now = app.clock.now();
    let record = SecretVersionRecord {
        path: req.path.clone(),
        version,
        key_id: sealed.key_id,
        wrapped_key: sealed.wrapped_key.0,
        ciphertext: sealed.ciphertext,
        created_at: now,
        deleted_at: None,
    };
    app.store.create_secret_version(&record).await?;
    let mut c = sigil_log::ChangeRecord::new("secret", now);
    c.action = Some("put".into());
    c.path = Some(req.path.clone());
    c.revision = Some(version);
    c.key_id = Some(record.key_id.clone());
    log_change(&app, c).await?;
    ok(
        StatusCode::CREATED,
        &json!({"path": req.path, "version": version, "created_at": now}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PathRequest {
    path: String,
    #[serde(default)]
    version: Option<i64>,
}

/// `POST /v1/secrets/get` (`sigil secret get`): a version's value (the newest by default),
/// to the administrator. Logged like a workload's read.
pub(crate) async fn get(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: PathRequest = parse_body(&body)?;
    check_static_path(&req.path)?;
    let versions = app.store.secret_versions(&req.path).await?;
    let found = match req.version {
        Some(n) => versions.into_iter().find(|v| v.version == n),
        None => versions.into_iter().next_back(),
    };
    let Some(v) = found.filter(|v| v.deleted_at.is_none()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no secret at {:?} (or that version was deleted)", req.path),
        ));
    };
    let value = app
        .secrets
        .open(&v)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let now = app.clock.now();
    let mut c = sigil_log::ChangeRecord::new("secret", now);
    c.action = Some("admin-read".into());
    c.path = Some(v.path.clone());
    c.revision = Some(v.version);
    log_change(&app, c).await?;
    ok(
        StatusCode::OK,
        &json!({"path": v.path, "version": v.version, "value_b64": B64.encode(value)}),
    )
}

fn version_view(v: &SecretVersionRecord) -> serde_json::Value {
    json!({
        "path": v.path,
        "version": v.version,
        "created_at": v.created_at,
        "deleted_at": v.deleted_at,
    })
}

/// `GET /v1/secrets` (`sigil secret list`): every path with its newest version (no values).
pub(crate) async fn list(State(app): State<Arc<AppState>>) -> ApiResult {
    let all = app.store.list_secrets().await?;
    let views: Vec<_> = all.iter().map(version_view).collect();
    ok(StatusCode::OK, &json!({ "secrets": views }))
}

/// `POST /v1/secrets/versions` (`sigil secret versions`).
pub(crate) async fn versions(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: PathRequest = parse_body(&body)?;
    check_static_path(&req.path)?;
    let all = app.store.secret_versions(&req.path).await?;
    if all.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no secret at {:?}", req.path),
        ));
    }
    let views: Vec<_> = all.iter().map(version_view).collect();
    ok(StatusCode::OK, &json!({ "versions": views }))
}

/// `POST /v1/secrets/delete` (`sigil secret delete`): every version's key and ciphertext
/// destroyed. A later `put` starts the next version.
pub(crate) async fn delete(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: PathRequest = parse_body(&body)?;
    check_static_path(&req.path)?;
    let now = app.clock.now();
    let n = app.store.delete_secret(&req.path, now).await?;
    if n == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no secret at {:?} (or it was deleted before)", req.path),
        ));
    }
    let mut c = sigil_log::ChangeRecord::new("secret", now);
    c.action = Some("delete".into());
    c.path = Some(req.path.clone());
    log_change(&app, c).await?;
    ok(
        StatusCode::OK,
        &json!({"path": req.path, "deleted_versions": n}),
    )
}

/// The default SQL that drops a dynamic role (after its sessions were ended).
pub const DEFAULT_REVOCATION_SQL: &str =
    "DROP OWNED BY \"{{name}}\"; DROP ROLE IF EXISTS \"{{name}}\";";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DbRoleRequest {
    name: String,
    connection_url: String,
    creation_sql: String,
    #[serde(default)]
    revocation_sql: Option<String>,
    default_ttl_secs: i64,
    max_ttl_secs: i64,
}

fn role_view(r: &DbRoleRecord) -> serde_json::Value {
    json!({
        "name": r.name,
        "path": format!("{DB_CREDS_PREFIX}{}", r.name),
        "creation_sql": r.creation_sql,
        "revocation_sql": r.revocation_sql,
        "default_ttl_secs": r.default_ttl,
        "max_ttl_secs": r.max_ttl,
        "created_at": r.created_at,
    })
}

/// `POST /v1/db-roles` (`sigil secret db-role put`): defines (or redefines) a dynamic
/// PostgreSQL credential role. The engine connection is checked before it is stored.
pub(crate) async fn put_db_role(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: DbRoleRequest = parse_body(&body)?;
    if !valid_role_name(&req.name) {
        return Err(ApiError::invalid(format!(
            "bad role name {:?}: 1 to 32 of a-z 0-9 _, starting with a letter",
            req.name
        )));
    }
    if !(1..=31 * 86_400).contains(&req.default_ttl_secs)
        || !(req.default_ttl_secs..=31 * 86_400).contains(&req.max_ttl_secs)
    {
        return Err(ApiError::invalid(
            "ttls: 1 s <= default_ttl_secs <= max_ttl_secs <= 31 days",
        ));
    }
    for (what, sql, needs) in [
        (
            "creation_sql",
            Some(req.creation_sql.as_str()),
            &["{{name}}", "{{password}}", "{{expiration}}"][..],
        ),
        (
            "revocation_sql",
            req.revocation_sql.as_deref(),
            &["{{name}}"][..],
        ),
    ] {
        if let Some(sql) = sql
            && let Some(missing) = needs.iter().find(|n| !sql.contains(**n))
        {
            return Err(ApiError::invalid(format!("{what} must use {missing}")));
        }
    }
    let opts = sigil_store::postgres_connect_options(&req.connection_url)
        .map_err(|e| ApiError::invalid(format!("connection_url: {e}")))?;
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::PgConnection::connect_with(&opts),
    )
    .await
    .map_err(|_| ApiError::invalid("connection_url: PostgreSQL did not answer within 10 s"))?
    .map_err(|e| ApiError::invalid(format!("connection_url: cannot connect to PostgreSQL: {e}")))?;
    let _ = conn.close().await;
    let sealed = seal_secret(
        &app.secrets.kek,
        &role_seal_path(&req.name),
        1,
        req.connection_url.as_bytes(),
    )
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let now = app.clock.now();
    let record = DbRoleRecord {
        name: req.name.clone(),
        key_id: sealed.key_id,
        wrapped_key: sealed.wrapped_key.0,
        connection: sealed.ciphertext,
        creation_sql: req.creation_sql,
        revocation_sql: req
            .revocation_sql
            .unwrap_or_else(|| DEFAULT_REVOCATION_SQL.to_owned()),
        default_ttl: req.default_ttl_secs,
        max_ttl: req.max_ttl_secs,
        created_at: now,
    };
    app.store.put_db_role(&record).await?;
    let mut c = sigil_log::ChangeRecord::new("db-role", now);
    c.action = Some("put".into());
    c.path = Some(format!("{DB_CREDS_PREFIX}{}", record.name));
    c.key_id = Some(record.key_id.clone());
    log_change(&app, c).await?;
    ok(StatusCode::CREATED, &role_view(&record))
}

/// `GET /v1/db-roles`: the role definitions (never the connection URL).
pub(crate) async fn list_db_roles(State(app): State<Arc<AppState>>) -> ApiResult {
    let all = app.store.list_db_roles().await?;
    let views: Vec<_> = all.iter().map(role_view).collect();
    ok(StatusCode::OK, &json!({ "roles": views }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NameRequest {
    name: String,
}

/// `POST /v1/db-roles/delete`: no new credentials for the role; its open leases stay until
/// they end or are revoked.
pub(crate) async fn delete_db_role(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: NameRequest = parse_body(&body)?;
    if !app.store.delete_db_role(&req.name).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no role {:?}", req.name),
        ));
    }
    let mut c = sigil_log::ChangeRecord::new("db-role", app.clock.now());
    c.action = Some("delete".into());
    c.path = Some(format!("{DB_CREDS_PREFIX}{}", req.name));
    log_change(&app, c).await?;
    ok(StatusCode::OK, &json!({"deleted": req.name}))
}

#[derive(Deserialize)]
pub(crate) struct LeaseListQuery {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    spiffe_id: Option<String>,
}

/// `GET /v1/leases` (`sigil lease list`): open leases (`?all=true`: closed ones too).
pub(crate) async fn list_leases(
    State(app): State<Arc<AppState>>,
    Query(q): Query<LeaseListQuery>,
) -> ApiResult {
    let leases = app
        .store
        .list_leases(&LeaseFilter {
            spiffe_id: q.spiffe_id,
            include_revoked: q.all,
            ..LeaseFilter::default()
        })
        .await?;
    ok(StatusCode::OK, &json!({ "leases": leases }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminRevokeRequest {
    id: String,
}

/// `POST /v1/leases/revoke` (`sigil lease revoke`): ends the lease now.
pub(crate) async fn admin_revoke_lease(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: AdminRevokeRequest = parse_body(&body)?;
    let lease = app.store.lease(&req.id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no lease {:?}", req.id),
        )
    })?;
    if lease.revoked_at.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("lease {:?} was closed before", req.id),
        ));
    }
    close_lease(&app, &lease, "revoked by the administrator")
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    ok(StatusCode::OK, &json!({"revoked": req.id}))
}

// ---------------------------------------------------------------------------------------
// Workload API (public listener, mTLS with the workload's X.509-SVID)
// ---------------------------------------------------------------------------------------

/// The refusal a workload gets for a path it may not read, whether the path exists or not.
fn not_permitted() -> Refusal {
    (
        StatusCode::FORBIDDEN,
        "permission_denied",
        "not permitted to read this secret".into(),
    )
}

/// Whether the current policy lets `svid` read `path`; `Ok(node)` if so.
async fn authorize(app: &AppState, svid: &VerifiedX509Svid, path: &str) -> Result<String, Refusal> {
    let now = app.clock.now();
    let (node, node_selectors) = node_of(app, &svid.serial).await?;
    let engine = app.models.engine(app).await.map_err(|why| {
        tracing::warn!(why, "no policy to decide a secret read with");
        not_permitted()
    })?;
    if engine.expired(now) {
        tracing::warn!("the policy bundle has expired: secret reads are denied");
        return Err(not_permitted());
    }
    let groups = workload_groups(app, &svid.spiffe_id).await?;
    let (hour, weekday) = hour_and_weekday(now);
    let trust_domain = app.config.trust_domain.to_string();
    let query = sigil_policy::Query {
        principal: sigil_policy::Principal {
            spiffe_id: svid.spiffe_id.as_str(),
            trust_domain: &trust_domain,
            groups: &groups,
        },
        action: "read_secret",
        resource_type: "Secret",
        resource_id: path,
        scopes: &[],
        hour,
        weekday,
        arguments: None,
        delegation: None,
        risk: None,
    };
    let decision = engine
        .decide_secret_read(&query, path, &node, &node_selectors)
        .map_err(|e| {
            tracing::warn!(error = %e, "policy error deciding a secret read: denied");
            not_permitted()
        })?;
    if !decision.allow {
        tracing::info!(spiffe_id = %svid.spiffe_id, path, node, "secret read denied by policy");
        return Err(not_permitted());
    }
    Ok(node)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadRequest {
    path: String,
    /// For dynamic credentials: the lease length asked for (capped by the role).
    #[serde(default)]
    ttl_secs: Option<i64>,
}

fn respond(result: Result<serde_json::Value, Refusal>, what: &str) -> axum::response::Response {
    match result {
        Ok(v) => json_response(StatusCode::OK, v.to_string()),
        Err((status, code, message)) => {
            tracing::warn!(%status, code, message, what, "refused");
            refuse(status, code, message)
        }
    }
}

/// `POST /secrets/v1/read`: a static secret's newest value, or a new dynamic credential.
pub(crate) async fn read(
    State(app): State<Arc<AppState>>,
    Extension(peer): Extension<PeerAuth>,
    body: Bytes,
) -> axum::response::Response {
    respond(read_inner(&app, peer, &body).await, "secret read")
}

async fn read_inner(
    app: &AppState,
    peer: PeerAuth,
    body: &[u8],
) -> Result<serde_json::Value, Refusal> {
    let svid = verified_caller(app, peer).await?;
    let req: ReadRequest = parse_request(body)?;
    if !valid_secret_path(&req.path) {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "bad secret path".into(),
        ));
    }
    let node = authorize(app, &svid, &req.path).await?;
    match req.path.strip_prefix(DB_CREDS_PREFIX) {
        Some(role) => issue_credential(app, &svid, &node, &req.path, role, req.ttl_secs).await,
        None => read_static(app, &svid, &node, &req.path).await,
    }
}

async fn read_static(
    app: &AppState,
    svid: &VerifiedX509Svid,
    node: &str,
    path: &str,
) -> Result<serde_json::Value, Refusal> {
    let now = app.clock.now();
    let v = app
        .store
        .latest_secret_version(path)
        .await
        .map_err(internal)?
        .filter(|v| v.deleted_at.is_none())
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no secret at {path:?}"),
            )
        })?;
    let value = app.secrets.open(&v).map_err(internal)?;
    let lease = i64::from(app.config.secret_lease_secs)
        .min(svid.not_after - now)
        .max(0);
    let lease_id = format!("secret/{}", random_hex(16));
    // INVARIANT: the read is durable in the transparency log before the value leaves.
    let mut c = sigil_log::ChangeRecord::new("secret", now);
    c.action = Some("read".into());
    c.path = Some(path.to_owned());
    c.revision = Some(v.version);
    c.lease_id = Some(lease_id.clone());
    c.spiffe_id = Some(svid.spiffe_id.to_string());
    c.serial = Some(svid.serial.clone());
    c.expires_at = Some(now + lease);
    if !node.is_empty() {
        c.node_id = Some(node.to_owned());
    }
    app.issuer.log_change(c).await.map_err(internal)?;
    Ok(json!({
        "path": path,
        "version": v.version,
        "value_b64": B64.encode(value),
        "lease_id": lease_id,
        "lease_duration": lease,
        "expires_at": now + lease,
        "renewable": false,
    }))
}

/// Fills a SQL template.
fn render(sql: &str, name: &str, password: &str, expiration: &str) -> String {
    sql.replace("{{name}}", name)
        .replace("{{password}}", password)
        .replace("{{expiration}}", expiration)
}

async fn issue_credential(
    app: &AppState,
    svid: &VerifiedX509Svid,
    node: &str,
    path: &str,
    role_name: &str,
    ttl: Option<i64>,
) -> Result<serde_json::Value, Refusal> {
    let now = app.clock.now();
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no database role at {path:?}"),
        )
    };
    if !valid_role_name(role_name) {
        return Err(not_found());
    }
    let role = app
        .store
        .db_role(role_name)
        .await
        .map_err(internal)?
        .ok_or_else(not_found)?;
    let ttl = ttl.unwrap_or(role.default_ttl).clamp(1, role.max_ttl);
    // No credential outlives the identity it was issued to.
    let max_expires_at = (now + role.max_ttl).min(svid.not_after);
    let expires_at = (now + ttl).min(max_expires_at);
    if expires_at <= now {
        return Err((
            StatusCode::FORBIDDEN,
            "permission_denied",
            "the client certificate expires now".into(),
        ));
    }
    let lease = LeaseRecord {
        id: format!("{path}/{}", random_hex(16)),
        path: path.to_owned(),
        spiffe_id: svid.spiffe_id.to_string(),
        serial: svid.serial.clone(),
        node_id: node.to_owned(),
        db_role: role.name.clone(),
        username: format!("sigil_{}_{}", role.name, random_hex(6)),
        issued_at: now,
        expires_at,
        max_expires_at,
        revoked_at: None,
        revoke_reason: None,
    };
    let password = random_alnum(32);
    let pool = app.secrets.pool(&role).map_err(internal)?;
    // INVARIANT: the lease is stored (so the sweeper will drop the role) and logged before
    // the role exists, and the role exists before the credential is handed out.
    app.store.create_lease(&lease).await.map_err(internal)?;
    let mut c = lease_change(&lease, "issue", now);
    c.expires_at = Some(expires_at);
    app.issuer.log_change(c).await.map_err(internal)?;
    let sql = render(
        &role.creation_sql,
        &lease.username,
        &password,
        &rfc3339(expires_at).map_err(internal)?,
    );
    let created = async {
        let mut tx = pool.begin().await?;
        tx.execute(sql.as_str()).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = created {
        tracing::error!(error = %e, role = %role.name, "creating a dynamic database role failed");
        let _ = close_lease(app, &lease, "creation failed").await;
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database credential could not be created".into(),
        ));
    }
    tracing::info!(lease = %lease.id, spiffe_id = %svid.spiffe_id, "issued a database credential");
    let data = json!({"username": lease.username, "password": password});
    Ok(json!({
        "path": path,
        "value_b64": B64.encode(data.to_string()),
        "data": data,
        "lease_id": lease.id,
        "lease_duration": expires_at - now,
        "expires_at": expires_at,
        "renewable": true,
    }))
}

fn lease_change(lease: &LeaseRecord, action: &str, at: i64) -> sigil_log::ChangeRecord {
    let mut c = sigil_log::ChangeRecord::new("lease", at);
    c.action = Some(action.to_owned());
    c.lease_id = Some(lease.id.clone());
    c.path = Some(lease.path.clone());
    c.spiffe_id = Some(lease.spiffe_id.clone());
    c.serial = Some(lease.serial.clone());
    if !lease.node_id.is_empty() {
        c.node_id = Some(lease.node_id.clone());
    }
    c
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LeaseRequest {
    lease_id: String,
    #[serde(default)]
    increment_secs: Option<i64>,
}

/// The caller's own open lease.
async fn own_lease(
    app: &AppState,
    svid: &VerifiedX509Svid,
    id: &str,
) -> Result<LeaseRecord, Refusal> {
    let unknown = || {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "no such open lease of this workload".to_owned(),
        )
    };
    let lease = app
        .store
        .lease(id)
        .await
        .map_err(internal)?
        .ok_or_else(unknown)?;
    if lease.spiffe_id != svid.spiffe_id.as_str() || lease.revoked_at.is_some() {
        return Err(unknown());
    }
    Ok(lease)
}

/// `POST /secrets/v1/renew`: the holder's lease moved on by `increment_secs` (default the
/// role's default), never past its maximum or the presenting SVID's expiry; the database
/// role's `VALID UNTIL` follows.
pub(crate) async fn renew(
    State(app): State<Arc<AppState>>,
    Extension(peer): Extension<PeerAuth>,
    body: Bytes,
) -> axum::response::Response {
    respond(renew_inner(&app, peer, &body).await, "lease renewal")
}

async fn renew_inner(
    app: &AppState,
    peer: PeerAuth,
    body: &[u8],
) -> Result<serde_json::Value, Refusal> {
    let svid = verified_caller(app, peer).await?;
    let req: LeaseRequest = parse_request(body)?;
    let lease = own_lease(app, &svid, &req.lease_id).await?;
    // Still permitted? A policy change takes away renewals too.
    authorize(app, &svid, &lease.path).await?;
    let role = app
        .store
        .db_role(&lease.db_role)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            (
                StatusCode::CONFLICT,
                "role_deleted",
                "the lease's role was deleted: it cannot be renewed".to_owned(),
            )
        })?;
    let now = app.clock.now();
    let increment = req.increment_secs.unwrap_or(role.default_ttl).max(1);
    let expires_at = (now + increment)
        .min(lease.max_expires_at)
        .min(svid.not_after)
        .max(lease.expires_at);
    let pool = app.secrets.pool(&role).map_err(internal)?;
    let until = rfc3339(expires_at).map_err(internal)?;
    let sql = format!("ALTER ROLE \"{}\" VALID UNTIL '{until}'", lease.username);
    pool.execute(sql.as_str()).await.map_err(internal)?;
    if !app
        .store
        .extend_lease(&lease.id, expires_at)
        .await
        .map_err(internal)?
    {
        return Err((
            StatusCode::NOT_FOUND,
            "not_found",
            "no such open lease of this workload".into(),
        ));
    }
    let mut c = lease_change(&lease, "renew", now);
    c.expires_at = Some(expires_at);
    app.issuer.log_change(c).await.map_err(internal)?;
    Ok(json!({
        "lease_id": lease.id,
        "lease_duration": expires_at - now,
        "expires_at": expires_at,
        "renewable": expires_at < lease.max_expires_at.min(svid.not_after),
    }))
}

/// `POST /secrets/v1/revoke`: the holder ends its own lease now.
pub(crate) async fn revoke(
    State(app): State<Arc<AppState>>,
    Extension(peer): Extension<PeerAuth>,
    body: Bytes,
) -> axum::response::Response {
    respond(revoke_inner(&app, peer, &body).await, "lease revocation")
}

async fn revoke_inner(
    app: &AppState,
    peer: PeerAuth,
    body: &[u8],
) -> Result<serde_json::Value, Refusal> {
    let svid = verified_caller(app, peer).await?;
    let req: LeaseRequest = parse_request(body)?;
    let lease = own_lease(app, &svid, &req.lease_id).await?;
    close_lease(app, &lease, "revoked by the holder")
        .await
        .map_err(internal)?;
    Ok(json!({"revoked": lease.id}))
}

// ---------------------------------------------------------------------------------------
// Closing leases
// ---------------------------------------------------------------------------------------

/// Ends a lease: the role can no longer log in, its sessions are terminated, the role is
/// dropped (all idempotent), then the lease is marked closed and logged (once, whoever
/// closes it).
async fn close_lease(app: &AppState, lease: &LeaseRecord, reason: &str) -> Result<(), String> {
    if let Some(role) = app
        .store
        .db_role(&lease.db_role)
        .await
        .map_err(|e| e.to_string())?
    {
        drop_role(app, &role, &lease.username).await?;
    } else {
        tracing::warn!(lease = %lease.id, role = %lease.db_role,
            "the lease's role definition is gone: its database role cannot be dropped (it expires by VALID UNTIL)");
    }
    let now = app.clock.now();
    if app
        .store
        .close_lease(&lease.id, now, reason)
        .await
        .map_err(|e| e.to_string())?
    {
        let mut c = lease_change(lease, "revoke", now);
        c.reason = Some(reason.to_owned());
        app.issuer.log_change(c).await.map_err(|e| e.to_string())?;
        tracing::info!(lease = %lease.id, reason, "closed a lease");
    }
    Ok(())
}

async fn drop_role(app: &AppState, role: &DbRoleRecord, username: &str) -> Result<(), String> {
    let pool = app.secrets.pool(role)?;
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(username)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    if exists.is_none() {
        return Ok(());
    }
    // No new sessions, then end the open ones, then drop.
    conn.execute(format!("ALTER ROLE \"{username}\" NOLOGIN").as_str())
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(username)
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    let sql = render(&role.revocation_sql, username, "", "");
    let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
    tx.execute(sql.as_str()).await.map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())
}

/// Why an open lease must close now, if it must.
async fn closing_reason(app: &AppState, lease: &LeaseRecord, now: i64) -> Option<&'static str> {
    if lease.expires_at <= now {
        return Some("expired");
    }
    let Ok(id) = sigil_core::SpiffeId::new(&lease.spiffe_id) else {
        return Some("invalid holder");
    };
    // The SVID's notBefore is at or before the lease's issue, and the lease was refused if
    // the SVID was revoked then: revoked by serial, or by ID at or after the issue.
    match app
        .store
        .is_revoked(&lease.serial, &id, lease.issued_at, now)
        .await
    {
        Ok(true) => return Some("identity revoked"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "checking a lease's revocation"),
    }
    if let Ok(node) = sigil_core::SpiffeId::new(&lease.node_id)
        && let Ok(Some(n)) = app.store.get_node(&node).await
        && n.evicted
    {
        return Some("node evicted");
    }
    None
}

/// One pass: closes every open lease that ended, whose identity was revoked or whose node
/// was evicted.
pub async fn sweep(app: &AppState) {
    let leases = match app.store.list_leases(&LeaseFilter::default()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "listing leases");
            return;
        }
    };
    let now = app.clock.now();
    for lease in leases {
        if let Some(reason) = closing_reason(app, &lease, now).await
            && let Err(e) = close_lease(app, &lease, reason).await
        {
            tracing::warn!(lease = %lease.id, error = %e, "closing a lease failed; will retry");
        }
    }
}

/// Runs [`sweep`] every second and whenever woken.
pub async fn sweep_forever(app: Arc<AppState>) {
    loop {
        sweep(&app).await;
        let _ = tokio::time::timeout(SWEEP_EVERY, app.secrets.wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_paths_have_one_spelling() {
        for good in ["a", "app/db", "billing/stripe-key", "x.y_z-1/2"] {
            assert!(valid_secret_path(good), "{good}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "a/./b", "a/../b", "..", "a b", "a\0b", "é", "a\\b",
        ] {
            assert!(!valid_secret_path(bad), "{bad:?}");
        }
        assert!(!valid_secret_path(&"a".repeat(257)));
    }

    #[test]
    fn role_names_are_plain_identifiers() {
        assert!(valid_role_name("app_ro"));
        for bad in ["", "App", "1a", "a-b", "a\"b", "a;b", &"a".repeat(33)] {
            assert!(!valid_role_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn templates_fill_every_placeholder() {
        assert_eq!(
            render(
                "CREATE ROLE \"{{name}}\" PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'",
                "sigil_a_1",
                "pw",
                "2026-01-01T00:00:00Z"
            ),
            "CREATE ROLE \"sigil_a_1\" PASSWORD 'pw' VALID UNTIL '2026-01-01T00:00:00Z'"
        );
        assert_eq!(
            rfc3339(1_704_114_000).as_deref(),
            Ok("2024-01-01T13:00:00Z")
        );
    }
}
