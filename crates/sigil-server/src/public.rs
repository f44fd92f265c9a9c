//! The public HTTPS endpoints: OIDC discovery, JWKS, the SPIFFE bundle, and the OAuth 2.0
//! token endpoint (client credentials, mTLS client auth, certificate-bound tokens); the two
//! Merkle logs (`/log/…` issued identities, `/log/audit/…` proxy decisions), and the audit
//! shipping endpoint `POST /audit/v1/records` for authenticated proxies.
use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use futures::StreamExt;
use serde_json::json;
use sigil_store::EntryFilter;

use crate::AppState;
use crate::tlog::{self, AuditAppendError, TransparencyLog};
use crate::tls::PeerAuth;

/// The routes of the public listener (gRPC is merged in by the caller).
pub fn router(app: Arc<AppState>) -> Router {
    let max = app.config.max_body_bytes;
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/keys", get(jwks))
        .route("/bundle", get(bundle))
        .route("/log/checkpoint", get(log_checkpoint))
        .route("/log/key", get(log_key))
        .route("/log/tile/{*path}", get(log_tile))
        // The token endpoint reads its body itself (see `read_limited`).
        .route("/oauth2/token", post(token))
        .route("/models/v1/release", post(crate::models::release))
        .layer(DefaultBodyLimit::max(max))
        .with_state(app.clone())
        .merge(audit_router(app))
}

/// The audit log's state: its key is loaded (created at first start) here, so a bad key
/// file leaves the audit routes answering 503 and the rest of the server up.
struct AuditState {
    app: Arc<AppState>,
    log: Option<Arc<TransparencyLog>>,
}

fn audit_router(app: Arc<AppState>) -> Router {
    let max = app.config.max_body_bytes.max(AUDIT_BATCH_BYTES);
    let log = match TransparencyLog::load_or_create_audit(
        app.store.clone(),
        &app.config.data_dir.join("keys"),
        &tlog::audit_origin_for(&app.config.trust_domain.to_string()),
    ) {
        Ok(l) => Some(Arc::new(l)),
        Err(e) => {
            tracing::error!(error = %e, "the audit log is unavailable");
            None
        }
    };
    Router::new()
        .route("/log/audit/checkpoint", get(audit_checkpoint))
        .route("/log/audit/key", get(audit_key))
        .route("/log/audit/tile/{*path}", get(audit_tile))
        .route("/audit/v1/records", post(audit_records))
        .layer(DefaultBodyLimit::max(max))
        .with_state(Arc::new(AuditState { app, log }))
}

/// Largest shipped batch body accepted even when `max_body_bytes` is smaller.
const AUDIT_BATCH_BYTES: usize = 4 << 20;

fn audit_unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "audit log unavailable\n").into_response()
}

async fn audit_checkpoint(State(s): State<Arc<AuditState>>) -> Response {
    let Some(log) = &s.log else {
        return audit_unavailable();
    };
    match log.checkpoint().await {
        Ok(note) => log_response("text/plain; charset=utf-8", "no-cache", note),
        Err(e) => log_error(&e),
    }
}

async fn audit_key(State(s): State<Arc<AuditState>>) -> Response {
    let Some(log) = &s.log else {
        return audit_unavailable();
    };
    let body = format!("{}\n", log.vkey()).into_bytes();
    log_response("text/plain; charset=utf-8", "no-cache", body)
}

async fn audit_tile(
    State(s): State<Arc<AuditState>>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    let Some(log) = &s.log else {
        return audit_unavailable();
    };
    tile_response(log.tile(&format!("tile/{path}")).await)
}

/// `POST /audit/v1/records`: a proxy ships decision records, one JSON object per line
/// (`application/x-ndjson`). The caller is the proxy, authenticated by its X.509-SVID over
/// mTLS (verified against the bundle, not revoked); each record is stored verbatim with the
/// proxy's SPIFFE ID. The answer, once the batch is committed, is `{"indexes": [...]}`: the
/// audit-log index of each record, in order. A record already logged for this proxy (same
/// `request_id`) keeps its index and is not appended again, so re-sending is safe.
async fn audit_records(
    State(s): State<Arc<AuditState>>,
    Extension(peer): Extension<PeerAuth>,
    body: Bytes,
) -> Response {
    let refuse =
        |status: StatusCode, msg: String| json_response(status, json!({"error": msg}).to_string());
    let svid = match peer {
        PeerAuth::Verified(svid) => svid,
        PeerAuth::Anonymous => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "a client certificate (the proxy's X.509-SVID) is required".into(),
            );
        }
        PeerAuth::Rejected(why) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                format!("client certificate rejected: {why}"),
            );
        }
    };
    let Some(log) = &s.log else {
        return audit_unavailable();
    };
    let now = s.app.clock.now();
    match s
        .app
        .store
        .is_revoked(&svid.serial, &svid.spiffe_id, svid.not_before, now)
        .await
    {
        Ok(false) => {}
        Ok(true) => {
            return refuse(
                StatusCode::FORBIDDEN,
                "client certificate has been revoked".into(),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "audit shipping: revocation check failed");
            return audit_unavailable();
        }
    }
    let records: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    match log.append_audit(svid.spiffe_id.as_str(), &records).await {
        Ok(indexes) => {
            let mut resp = json_response(StatusCode::OK, json!({"indexes": indexes}).to_string());
            no_store(resp.headers_mut());
            resp
        }
        Err(e @ (AuditAppendError::BadRecord { .. } | AuditAppendError::TooManyRecords)) => {
            refuse(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(AuditAppendError::Server(e)) => {
            tracing::error!(error = %e, proxy = %svid.spiffe_id, "appending audit records failed");
            audit_unavailable()
        }
    }
}

async fn log_checkpoint(State(app): State<Arc<AppState>>) -> Response {
    match app.tlog.checkpoint().await {
        Ok(note) => log_response("text/plain; charset=utf-8", "no-cache", note),
        Err(e) => log_error(&e),
    }
}

async fn log_key(State(app): State<Arc<AppState>>) -> Response {
    let body = format!("{}\n", app.tlog.vkey()).into_bytes();
    log_response("text/plain; charset=utf-8", "no-cache", body)
}

async fn log_tile(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    tile_response(app.tlog.tile(&format!("tile/{path}")).await)
}

fn tile_response(tile: Result<Option<Vec<u8>>, crate::ServerError>) -> Response {
    match tile {
        // Tiles never change once they exist (a partial tile is its own path).
        Ok(Some(data)) => log_response(
            "application/octet-stream",
            "public, max-age=31536000, immutable",
            data,
        ),
        Ok(None) => (StatusCode::NOT_FOUND, "no such tile\n").into_response(),
        Err(e) => log_error(&e),
    }
}

fn log_response(content_type: &'static str, cache: &'static str, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

fn log_error(e: &crate::ServerError) -> Response {
    tracing::error!(error = %e, "serving the transparency log failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "transparency log unavailable\n",
    )
        .into_response()
}

async fn discovery(State(app): State<Arc<AppState>>) -> Response {
    let iss = app.config.issuer();
    let doc = json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/keys"),
        "token_endpoint": format!("{iss}/oauth2/token"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": true,
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [app.authorities.current().jwt.algorithm().to_string()],
        "scopes_supported": app.config.oauth_scopes,
    });
    json_response(StatusCode::OK, doc.to_string())
}

async fn jwks(State(app): State<Arc<AppState>>) -> Response {
    json_response(
        StatusCode::OK,
        app.authorities.current().oidc_jwks_json.clone(),
    )
}

async fn bundle(State(app): State<Arc<AppState>>) -> Response {
    json_response(
        StatusCode::OK,
        app.authorities.current().bundle_json.clone(),
    )
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// An RFC 6749 §5.2 error.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<String>) -> Self {
        let status = if error == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        Self {
            status,
            error,
            description: description.into(),
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "error_description": self.description});
        let mut resp = json_response(self.status, body.to_string());
        no_store(resp.headers_mut());
        resp
    }
}

fn no_store(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The token request's parameters; each may appear at most once (RFC 6749 §3.2).
#[derive(Default)]
struct TokenParams {
    grant_type: Option<String>,
    scope: Option<String>,
    client_id: Option<String>,
    audience: Option<String>,
}

fn parse_params(body: &[u8]) -> Result<TokenParams, OAuthError> {
    let mut p = TokenParams::default();
    for (k, v) in form_urlencoded::parse(body) {
        let slot = match k.as_ref() {
            "grant_type" => &mut p.grant_type,
            "scope" => &mut p.scope,
            "client_id" => &mut p.client_id,
            "resource" | "audience" => &mut p.audience,
            _ => continue,
        };
        if slot.is_some() {
            return Err(OAuthError::new(
                "invalid_request",
                format!("parameter {k} given more than once"),
            ));
        }
        *slot = Some(v.into_owned());
    }
    Ok(p)
}

/// Reads a request body of at most `limit` bytes. A larger body gets 413, but is first read
/// and discarded up to a cap, so the client (still uploading) receives the answer instead of
/// a connection reset.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, OAuthError> {
    const DRAIN_CAP: usize = 4 * 1024 * 1024;
    let too_large = || OAuthError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        error: "invalid_request",
        description: format!("request body larger than {limit} bytes"),
    };
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next()).await;
        let chunk = match next {
            Ok(Some(Ok(c))) => c,
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => {
                return Err(if seen > limit {
                    too_large()
                } else {
                    OAuthError::new("invalid_request", "could not read the request body")
                });
            }
        };
        seen = seen.saturating_add(chunk.len());
        if seen > DRAIN_CAP {
            return Err(too_large());
        }
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

async fn token(
    State(app): State<Arc<AppState>>,
    Extension(peer): Extension<PeerAuth>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OAuthError> {
    let body = read_limited(body, app.config.max_body_bytes).await?;
    let svid = match peer {
        PeerAuth::Verified(svid) => svid,
        PeerAuth::Anonymous => {
            return Err(OAuthError::new(
                "invalid_client",
                "a client certificate (X.509-SVID) is required: tls_client_auth",
            ));
        }
        PeerAuth::Rejected(why) => {
            return Err(OAuthError::new(
                "invalid_client",
                format!("client certificate rejected: {why}"),
            ));
        }
    };
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Err(OAuthError::new(
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let params = parse_params(&body)?;
    let now = app.clock.now();
    let revoked = app
        .store
        .is_revoked(&svid.serial, &svid.spiffe_id, svid.not_before, now)
        .await
        .map_err(|e| server_error(&e))?;
    if revoked {
        return Err(OAuthError::new(
            "invalid_client",
            "client certificate has been revoked",
        ));
    }
    match params.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                format!("grant_type {other:?} is not supported; use client_credentials"),
            ));
        }
        None => return Err(OAuthError::new("invalid_request", "grant_type is missing")),
    }
    if let Some(cid) = &params.client_id
        && cid != svid.spiffe_id.as_str()
    {
        return Err(OAuthError::new(
            "invalid_client",
            "client_id does not match the client certificate's SPIFFE ID",
        ));
    }
    let entries = app
        .store
        .list_entries(&EntryFilter {
            spiffe_id: Some(svid.spiffe_id.clone()),
            parent_id: None,
        })
        .await
        .map_err(|e| server_error(&e))?;
    if entries.is_empty() {
        return Err(OAuthError::new(
            "invalid_client",
            "no registration entry for this SPIFFE ID",
        ));
    }
    let allowed: BTreeSet<&str> = entries
        .iter()
        .flat_map(|e| e.spec.scopes.iter().map(String::as_str))
        .collect();
    let granted: Vec<String> = match params.scope.as_deref() {
        None => allowed.iter().map(|s| (*s).to_owned()).collect(),
        Some(requested) => {
            let requested: BTreeSet<&str> =
                requested.split(' ').filter(|s| !s.is_empty()).collect();
            if let Some(unknown) = requested
                .iter()
                .find(|s| !app.config.oauth_scopes.iter().any(|k| k == *s))
            {
                return Err(OAuthError::new(
                    "invalid_scope",
                    format!("unknown scope {unknown:?}"),
                ));
            }
            let granted: Vec<String> = requested
                .intersection(&allowed)
                .map(|s| (*s).to_owned())
                .collect();
            if granted.is_empty() && !requested.is_empty() {
                return Err(OAuthError::new(
                    "invalid_scope",
                    "none of the requested scopes is granted to this client",
                ));
            }
            granted
        }
    };
    let audience = params
        .audience
        .unwrap_or_else(|| app.config.default_audience.clone());
    if audience.is_empty() || audience.len() > 512 || audience.contains(char::is_whitespace) {
        return Err(OAuthError::new(
            "invalid_target",
            "invalid resource/audience",
        ));
    }
    let groups: Vec<String> = entries
        .iter()
        .flat_map(|e| e.spec.groups.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let ttl = app.config.access_token_ttl_secs;
    let (token, claims) = app
        .issuer
        .mint_access_token(
            &app.config.issuer(),
            &svid.spiffe_id,
            &audience,
            &granted,
            &groups,
            &svid.x5t_s256,
            ttl,
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "access token issuance failed");
            OAuthError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: "server_error",
                description: "could not issue the token".into(),
            }
        })?;
    let body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": claims.scope,
    });
    let mut resp = json_response(StatusCode::OK, body.to_string());
    no_store(resp.headers_mut());
    Ok(resp)
}

fn server_error(e: &dyn std::fmt::Display) -> OAuthError {
    tracing::error!(error = %e, "token endpoint failed");
    OAuthError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: "server_error",
        description: "internal error".into(),
    }
}
