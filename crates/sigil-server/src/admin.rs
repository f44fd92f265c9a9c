//! The admin API: JSON over HTTP on a unix socket that only the server's own user may use.
//! The `sigil entry|jointoken|node|svid|ca|bundle` commands are its client.
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sigil_core::{EntryId, EntrySpec, RegistrationEntry, SpiffeId};
use sigil_pki::SvidSpec;
use sigil_store::{AuthorityKind, EntryFilter, Revocation, StoreError};

use crate::AppState;
use crate::issuer::IssueError;
use crate::node_api::{hash_join_token, node_id_for_token};

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 1024 * 1024;

/// An admin API error: an HTTP status and a JSON body `{"error":{"code","message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::new(StatusCode::NOT_FOUND, "not_found", what),
            StoreError::Conflict(what) => Self::new(StatusCode::CONFLICT, "conflict", what),
            e => {
                tracing::error!(error = %e, "admin API store failure");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "store failure",
                )
            }
        }
    }
}

impl From<crate::ServerError> for ApiError {
    fn from(e: crate::ServerError) -> Self {
        tracing::error!(error = %e, "admin API failure");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::BadCsr(m) => Self::invalid(format!("bad CSR: {m}")),
            e @ IssueError::NotEntitled { .. } => {
                Self::new(StatusCode::FORBIDDEN, "permission_denied", e.to_string())
            }
            IssueError::InvalidRequest(m) => Self::invalid(m),
            IssueError::Server(e) => e.into(),
        }
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// Appends an admin change to the transparency log, returning once it is durable. Called
/// after the change is stored and before the admin API (or an agent's sync) sees it: through
/// the issuance group-commit writer, so not in the change's own transaction (a crash in
/// between leaves a stored change without its leaf; the error is the admin's answer).
pub(crate) async fn log_change(
    app: &AppState,
    change: sigil_log::ChangeRecord,
) -> Result<(), ApiError> {
    let kind = change.kind.clone();
    app.issuer.log_change(change).await.map_err(|e| {
        tracing::error!(error = %e, kind, "the change is stored but its log leaf is not");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the change was stored but appending it to the transparency log failed: {e}"),
        )
    })
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// The leaf of an entry created or updated.
fn entry_change(action: &str, entry: &RegistrationEntry) -> sigil_log::ChangeRecord {
    let mut c = sigil_log::ChangeRecord::new("entry", entry.updated_at);
    c.action = Some(action.to_owned());
    c.entry_id = Some(entry.id.to_string());
    c.spiffe_id = Some(entry.spec.spiffe_id.to_string());
    c.parent_id = Some(entry.spec.parent_id.to_string());
    c.revision = Some(entry.revision);
    c.spec_sha256 = Some(sha256_hex(
        &serde_json::to_vec(&entry.spec).unwrap_or_default(),
    ));
    c
}

/// The leaf of a revocation.
pub(crate) fn revocation_change(rev: &Revocation) -> sigil_log::ChangeRecord {
    let mut c = sigil_log::ChangeRecord::new("revocation", rev.revoked_at);
    c.revocation_id = Some(rev.id);
    c.serial = rev.serial.clone();
    c.spiffe_id = rev.spiffe_id.as_ref().map(ToString::to_string);
    c.reason = Some(rev.reason.clone());
    c.expires_at = Some(rev.expires_at);
    c
}

pub(crate) fn ok<T: Serialize>(status: StatusCode, v: &T) -> ApiResult {
    let body = serde_json::to_string(v)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok((
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
}

/// The admin routes.
pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/entries", post(create_entry).get(list_entries))
        .route(
            "/v1/entries/{id}",
            get(show_entry).put(update_entry).delete(delete_entry),
        )
        .route("/v1/jointokens", post(create_join_token))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/evict", post(evict_node))
        .route(
            "/v1/nodes/quarantine",
            post(crate::risk::quarantine_handler),
        )
        .route("/v1/nodes/clear", post(crate::risk::clear_handler))
        .route("/v1/risk", get(crate::risk::list))
        .route("/v1/revocations", post(revoke).get(list_revocations))
        .route("/v1/svids/x509", post(mint_x509))
        .route("/v1/svids/jwt", post(mint_jwt))
        .route("/v1/issued", get(list_issued))
        .route("/v1/ca", get(list_authorities))
        .route("/v1/ca/rotate", post(rotate))
        .route("/v1/bundle", get(bundle))
        .route("/v1/policy", get(show_policy))
        .route("/v1/policy/push", post(push_policy))
        .route(
            "/v1/models",
            post(crate::models::register).get(crate::models::list),
        )
        .route("/v1/models/seal", post(crate::models::seal))
        .route(
            "/v1/secrets",
            post(crate::secrets::put).get(crate::secrets::list),
        )
        .route("/v1/secrets/get", post(crate::secrets::get))
        .route("/v1/secrets/versions", post(crate::secrets::versions))
        .route("/v1/secrets/delete", post(crate::secrets::delete))
        .route(
            "/v1/db-roles",
            post(crate::secrets::put_db_role).get(crate::secrets::list_db_roles),
        )
        .route("/v1/db-roles/delete", post(crate::secrets::delete_db_role))
        .route("/v1/leases", get(crate::secrets::list_leases))
        .route(
            "/v1/leases/revoke",
            post(crate::secrets::admin_revoke_lease),
        )
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY))
        .with_state(app)
}

async fn status(State(app): State<Arc<AppState>>) -> ApiResult {
    let set = app.authorities.current();
    ok(
        StatusCode::OK,
        &json!({
            "trust_domain": app.config.trust_domain,
            "listen_addr": app.config.listen_addr.to_string(),
            "issuer": app.config.issuer(),
            "bundle_sequence": set.bundle.sequence,
            "ca_key_id": set.ca_id,
            "jwt_kid": set.jwt.kid(),
            "entries": app.store.count_entries().await?,
            "issued": app.store.count_issued().await?,
        }),
    )
}

fn check_spec(app: &AppState, spec: &EntrySpec) -> Result<(), ApiError> {
    spec.validate(&app.config.trust_domain)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(s) = spec
        .scopes
        .iter()
        .find(|s| !app.config.oauth_scopes.iter().any(|k| k == *s))
    {
        return Err(ApiError::invalid(format!(
            "unknown scope {s:?}: add it to oauth_scopes in the server configuration"
        )));
    }
    Ok(())
}

async fn create_entry(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let spec: EntrySpec = parse_body(&body)?;
    check_spec(&app, &spec)?;
    let now = app.clock.now();
    let entry = RegistrationEntry {
        id: EntryId::random(),
        spec,
        revision: 1,
        created_at: now,
        updated_at: now,
    };
    app.store.create_entry(&entry).await?;
    log_change(&app, entry_change("create", &entry)).await?;
    app.notify_change();
    tracing::info!(entry = %entry.id, spiffe_id = %entry.spec.spiffe_id, "entry created");
    ok(StatusCode::CREATED, &entry)
}

#[derive(Deserialize)]
struct EntryQuery {
    parent_id: Option<String>,
    spiffe_id: Option<String>,
}

fn parse_id(field: &str, s: Option<String>) -> Result<Option<SpiffeId>, ApiError> {
    s.map(|s| SpiffeId::new(&s).map_err(|e| ApiError::invalid(format!("{field}: {e}"))))
        .transpose()
}

async fn list_entries(State(app): State<Arc<AppState>>, Query(q): Query<EntryQuery>) -> ApiResult {
    let filter = EntryFilter {
        parent_id: parse_id("parent_id", q.parent_id)?,
        spiffe_id: parse_id("spiffe_id", q.spiffe_id)?,
    };
    ok(StatusCode::OK, &app.store.list_entries(&filter).await?)
}

fn entry_id(s: &str) -> Result<EntryId, ApiError> {
    EntryId::parse(s).map_err(|e| ApiError::invalid(e.to_string()))
}

async fn show_entry(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    ok(StatusCode::OK, &app.store.get_entry(&entry_id(&id)?).await?)
}

async fn update_entry(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = entry_id(&id)?;
    let spec: EntrySpec = parse_body(&body)?;
    check_spec(&app, &spec)?;
    let entry = app.store.update_entry(&id, &spec, app.clock.now()).await?;
    log_change(&app, entry_change("update", &entry)).await?;
    app.notify_change();
    tracing::info!(entry = %id, "entry updated");
    ok(StatusCode::OK, &entry)
}

async fn delete_entry(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let id = entry_id(&id)?;
    app.store.delete_entry(&id).await?;
    let mut change = sigil_log::ChangeRecord::new("entry", app.clock.now());
    change.action = Some("delete".into());
    change.entry_id = Some(id.to_string());
    log_change(&app, change).await?;
    app.notify_change();
    tracing::info!(entry = %id, "entry deleted");
    ok(StatusCode::OK, &json!({"deleted": id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenRequest {
    #[serde(default = "default_join_ttl")]
    ttl_secs: u32,
}

fn default_join_ttl() -> u32 {
    600
}

async fn create_join_token(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: JoinTokenRequest = if body.is_empty() {
        JoinTokenRequest {
            ttl_secs: default_join_ttl(),
        }
    } else {
        parse_body(&body)?
    };
    if !(10..=7 * 24 * 3600).contains(&req.ttl_secs) {
        return Err(ApiError::invalid(
            "ttl_secs must be between 10 s and 7 days",
        ));
    }
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = hex::encode(raw);
    let hash = hash_join_token(&token);
    let node_id = node_id_for_token(&app.config.trust_domain, &hash)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let now = app.clock.now();
    let expires_at = now + i64::from(req.ttl_secs);
    app.store.create_join_token(&hash, expires_at, now).await?;
    let mut change = sigil_log::ChangeRecord::new("join-token", now);
    change.token_sha256 = Some(hash.clone());
    change.node_id = Some(node_id.to_string());
    change.expires_at = Some(expires_at);
    log_change(&app, change).await?;
    tracing::info!(node = %node_id, expires_at, "join token created");
    ok(
        StatusCode::CREATED,
        &json!({"token": token, "node_id": node_id, "expires_at": expires_at}),
    )
}

async fn list_nodes(State(app): State<Arc<AppState>>) -> ApiResult {
    ok(StatusCode::OK, &app.store.list_nodes().await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvictRequest {
    spiffe_id: SpiffeId,
}

async fn evict_node(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: EvictRequest = parse_body(&body)?;
    let now = app.clock.now();
    if !app.store.evict_node(&req.spiffe_id, now).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no node {}", req.spiffe_id),
        ));
    }
    let rev = Revocation {
        id: 0,
        serial: None,
        spiffe_id: Some(req.spiffe_id.clone()),
        reason: "node evicted".into(),
        revoked_at: now,
        expires_at: now + i64::from(sigil_core::MAX_X509_TTL_SECS),
    };
    let id = app.store.add_revocation(&rev).await?;
    log_change(&app, revocation_change(&Revocation { id, ..rev })).await?;
    app.notify_change();
    app.secrets.wake();
    tracing::warn!(node = %req.spiffe_id, "node evicted");
    ok(StatusCode::OK, &json!({"evicted": req.spiffe_id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    /// A certificate serial (hex) or a SPIFFE ID.
    target: String,
    #[serde(default)]
    reason: String,
}

async fn revoke(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: RevokeRequest = parse_body(&body)?;
    let now = app.clock.now();
    let reason = req.reason.chars().take(256).collect::<String>();
    let rev = if req.target.starts_with("spiffe://") {
        let id = SpiffeId::new(&req.target).map_err(|e| ApiError::invalid(e.to_string()))?;
        Revocation {
            id: 0,
            serial: None,
            spiffe_id: Some(id),
            reason,
            revoked_at: now,
            // Every SVID of this ID issued so far expires within the longest TTL.
            expires_at: now + i64::from(sigil_core::MAX_X509_TTL_SECS),
        }
    } else {
        let serial = req.target.to_ascii_lowercase();
        if serial.is_empty() || serial.len() > 64 || !serial.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(ApiError::invalid(
                "target must be a certificate serial (hex) or a SPIFFE ID",
            ));
        }
        let issued = app.store.issued_by_serial(&serial).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no SVID with serial {serial} was issued here"),
            )
        })?;
        Revocation {
            id: 0,
            serial: Some(serial),
            spiffe_id: None,
            reason,
            revoked_at: now,
            expires_at: issued.not_after,
        }
    };
    let id = app.store.add_revocation(&rev).await?;
    let rev = Revocation { id, ..rev };
    log_change(&app, revocation_change(&rev)).await?;
    app.notify_change();
    app.secrets.wake();
    tracing::warn!(target = %req.target, "revoked");
    ok(StatusCode::CREATED, &rev)
}

async fn list_revocations(State(app): State<Arc<AppState>>) -> ApiResult {
    ok(
        StatusCode::OK,
        &app.store.list_revocations(app.clock.now()).await?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintX509Request {
    spiffe_id: SpiffeId,
    csr_pem: String,
    #[serde(default = "default_x509_ttl")]
    ttl_secs: u32,
    #[serde(default)]
    dns_names: Vec<String>,
}

fn default_x509_ttl() -> u32 {
    sigil_core::DEFAULT_X509_TTL_SECS
}

async fn mint_x509(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: MintX509Request = parse_body(&body)?;
    check_ttl(req.ttl_secs, sigil_core::MAX_X509_TTL_SECS)?;
    for d in &req.dns_names {
        sigil_core::validate_dns_name(d).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let csr = pem::parse(req.csr_pem.as_bytes())
        .ok()
        .filter(|p| p.tag() == "CERTIFICATE REQUEST" || p.tag() == "NEW CERTIFICATE REQUEST")
        .ok_or_else(|| ApiError::invalid("bad CSR: csr_pem is not a PEM CERTIFICATE REQUEST"))?;
    let spec = SvidSpec {
        spiffe_id: req.spiffe_id,
        dns_names: req.dns_names,
        ttl_secs: req.ttl_secs,
    };
    let svid = app
        .issuer
        .sign_x509_svid(csr.contents(), spec, "admin")
        .await?;
    ok(
        StatusCode::CREATED,
        &json!({
            "spiffe_id": svid.spiffe_id,
            "serial": svid.serial,
            "expires_at": svid.not_after,
            "cert_pem": svid.pem(),
            "bundle_pem": app.authorities.current().x509_pem,
        }),
    )
}

fn check_ttl(ttl: u32, max: u32) -> Result<(), ApiError> {
    if (sigil_core::MIN_TTL_SECS..=max).contains(&ttl) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "ttl_secs must be between {} and {max}",
            sigil_core::MIN_TTL_SECS
        )))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintJwtRequest {
    spiffe_id: SpiffeId,
    audience: Vec<String>,
    #[serde(default = "default_jwt_ttl")]
    ttl_secs: u32,
}

fn default_jwt_ttl() -> u32 {
    sigil_core::DEFAULT_JWT_TTL_SECS
}

async fn mint_jwt(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: MintJwtRequest = parse_body(&body)?;
    check_ttl(req.ttl_secs, sigil_core::MAX_JWT_TTL_SECS)?;
    if !req.spiffe_id.is_member_of(&app.config.trust_domain) {
        return Err(ApiError::invalid(format!(
            "{} is not in trust domain {}",
            req.spiffe_id, app.config.trust_domain
        )));
    }
    let (token, exp) = app
        .issuer
        .mint_jwt_svid(&req.spiffe_id, &req.audience, req.ttl_secs, "admin")
        .await?;
    ok(
        StatusCode::CREATED,
        &json!({"spiffe_id": req.spiffe_id, "token": token, "expires_at": exp}),
    )
}

#[derive(Deserialize)]
struct IssuedQuery {
    spiffe_id: Option<String>,
    limit: Option<i64>,
}

async fn list_issued(State(app): State<Arc<AppState>>, Query(q): Query<IssuedQuery>) -> ApiResult {
    let id = parse_id("spiffe_id", q.spiffe_id)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    ok(
        StatusCode::OK,
        &app.store.list_issued(id.as_ref(), limit).await?,
    )
}

async fn list_authorities(State(app): State<Arc<AppState>>) -> ApiResult {
    ok(StatusCode::OK, &app.authorities.list().await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    kind: String,
}

async fn rotate(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: RotateRequest = parse_body(&body)?;
    let kind = match req.kind.as_str() {
        "x509" => AuthorityKind::X509,
        "jwt" => AuthorityKind::Jwt,
        "policy" => AuthorityKind::Policy,
        other => {
            return Err(ApiError::invalid(format!(
                "kind must be \"x509\", \"jwt\" or \"policy\", not {other:?}"
            )));
        }
    };
    let outcome = app.authorities.rotate(kind).await?;
    let mut change = sigil_log::ChangeRecord::new("key-rotation", app.clock.now());
    change.authority = Some(req.kind.clone());
    change.action = Some(outcome.action.to_owned());
    change.key_id = Some(outcome.key_id.clone());
    change.bundle_sequence = Some(outcome.bundle_sequence);
    log_change(&app, change).await?;
    app.notify_change();
    ok(StatusCode::OK, &outcome)
}

async fn bundle(State(app): State<Arc<AppState>>) -> ApiResult {
    let set = app.authorities.current();
    ok(
        StatusCode::OK,
        &json!({
            "spiffe": serde_json::from_str::<serde_json::Value>(&set.bundle_json).unwrap_or_default(),
            "x509_pem": set.x509_pem,
            "sequence": set.bundle.sequence,
        }),
    )
}

/// Default lifetime of a pushed policy bundle.
const DEFAULT_POLICY_TTL_SECS: i64 = 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushPolicyRequest {
    /// File name → Cedar text.
    policies: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    ttl_secs: Option<i64>,
    #[serde(default)]
    rate_limits: Option<serde_json::Value>,
}

/// `sigil policy push`: validates the policies against sigil's schema (refusing them with the
/// validator's reasons), signs the next revision with the policy key, stores it, and wakes
/// every agent's sync stream.
async fn push_policy(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: PushPolicyRequest = parse_body(&body)?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_POLICY_TTL_SECS);
    if !(1..=crate::authority::MAX_POLICY_TTL_SECS).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "ttl_secs must be between 1 and {}",
            crate::authority::MAX_POLICY_TTL_SECS
        )));
    }
    for name in req.policies.keys() {
        if name.is_empty()
            || name.len() > 255
            || name.contains('/')
            || name.starts_with('.')
            || name.chars().any(char::is_control)
        {
            return Err(ApiError::invalid(format!("bad policy file name {name:?}")));
        }
    }
    let files: Vec<(String, String)> = req
        .policies
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Err(e) = sigil_policy::PolicyEngine::new(&files) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_policy",
            e.to_string(),
        ));
    }
    let outcome = app
        .authorities
        .push_policy(req.policies, req.rate_limits, ttl)
        .await?;
    let mut change = sigil_log::ChangeRecord::new("policy-bundle", outcome.not_before);
    change.revision = Some(outcome.revision);
    change.envelope_sha256 = Some(outcome.envelope_sha256.clone());
    change.payload_sha256 = Some(outcome.payload_sha256.clone());
    change.key_id = Some(outcome.key_id.clone());
    change.not_after = Some(outcome.not_after);
    log_change(&app, change).await?;
    app.notify_change();
    ok(StatusCode::CREATED, &outcome)
}

/// The current policy bundle: revision, expiry, key and the envelope.
async fn show_policy(State(app): State<Arc<AppState>>) -> ApiResult {
    match app.store.latest_policy_bundle().await? {
        Some(b) => ok(
            StatusCode::OK,
            &json!({
                "revision": b.revision,
                "key_id": b.key_id,
                "not_after": b.not_after,
                "created_at": b.created_at,
                "payload_sha256": b.payload_sha256,
                "envelope": b.envelope,
            }),
        ),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no policy bundle has been pushed",
        )),
    }
}
