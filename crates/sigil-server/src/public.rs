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
use crate::exchange::{self, ExchangeError, ExchangeRequest};
use crate::issuer::{DelegationGrant, Grant, IssueError};
use crate::tlog::{self, AuditAppendError, TransparencyLog};
use crate::tls::PeerAuth;

/// The routes of the public listener (gRPC is merged in by the caller).
pub fn router(app: Arc<AppState>) -> Router {
    let max = app.config.max_body_bytes;
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/oauth-authorization-server", get(as_metadata))
        .route("/keys", get(jwks))
        .route("/bundle", get(bundle))
        .route("/log/checkpoint", get(log_checkpoint))
        .route("/log/key", get(log_key))
        .route("/log/tile/{*path}", get(log_tile))
        // The token endpoint reads its body itself (see `read_limited`).
        .route("/oauth2/token", post(token))
        .route("/models/v1/release", post(crate::models::release))
        .route("/secrets/v1/read", post(crate::secrets::read))
        .route("/secrets/v1/renew", post(crate::secrets::renew))
        .route("/secrets/v1/revoke", post(crate::secrets::revoke))
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

/// The authorization server's metadata (RFC 8414; also the OIDC discovery document).
fn metadata(app: &AppState) -> serde_json::Value {
    let iss = app.config.issuer();
    json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/keys"),
        "token_endpoint": format!("{iss}/oauth2/token"),
        "grant_types_supported": ["client_credentials", exchange::GRANT_TYPE],
        "token_endpoint_auth_methods_supported": ["tls_client_auth", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "EdDSA"],
        "tls_client_certificate_bound_access_tokens": true,
        "dpop_signing_alg_values_supported": sigil_pki::DPOP_ALGORITHMS,
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [app.authorities.current().jwt.algorithm().to_string()],
        "scopes_supported": app.config.oauth_scopes,
    })
}

async fn discovery(State(app): State<Arc<AppState>>) -> Response {
    json_response(StatusCode::OK, metadata(&app).to_string())
}

/// RFC 8414 `/.well-known/oauth-authorization-server`.
async fn as_metadata(State(app): State<Arc<AppState>>) -> Response {
    json_response(StatusCode::OK, metadata(&app).to_string())
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
    subject_token: Option<String>,
    subject_token_type: Option<String>,
    actor_token: Option<String>,
    requested_token_type: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
}

fn parse_params(body: &[u8]) -> Result<TokenParams, OAuthError> {
    let mut p = TokenParams::default();
    for (k, v) in form_urlencoded::parse(body) {
        let slot = match k.as_ref() {
            "grant_type" => &mut p.grant_type,
            "scope" => &mut p.scope,
            "client_id" => &mut p.client_id,
            "resource" | "audience" => &mut p.audience,
            "subject_token" => &mut p.subject_token,
            "subject_token_type" => &mut p.subject_token_type,
            "actor_token" | "actor_token_type" => &mut p.actor_token,
            "requested_token_type" => &mut p.requested_token_type,
            "client_assertion_type" => &mut p.client_assertion_type,
            "client_assertion" => &mut p.client_assertion,
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

/// The authenticated client of a token request: by its X.509-SVID over mTLS
/// (`tls_client_auth`), or by a JWT-SVID as client assertion (RFC 7523, for clients without
/// mTLS; they must then bind the token to a DPoP key).
pub(crate) struct Client {
    pub spiffe_id: sigil_core::SpiffeId,
    /// The serial of its X.509-SVID, or the `jti` of its JWT-SVID client assertion.
    pub serial: String,
    /// The client certificate's `x5t#S256`, with mTLS.
    pub x5t_s256: Option<String>,
}

/// RFC 7523's client assertion type.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Who the client is: its certificate, else its client assertion; revoked credentials are
/// refused.
async fn authenticate_client(
    app: &AppState,
    peer: PeerAuth,
    params: &TokenParams,
    now: i64,
) -> Result<Client, OAuthError> {
    let (client, serial, issued_at) = match peer {
        PeerAuth::Verified(svid) => (
            Client {
                spiffe_id: svid.spiffe_id.clone(),
                serial: svid.serial.clone(),
                x5t_s256: Some(svid.x5t_s256.clone()),
            },
            svid.serial.clone(),
            svid.not_before,
        ),
        PeerAuth::Rejected(why) => {
            return Err(OAuthError::new(
                "invalid_client",
                format!("client certificate rejected: {why}"),
            ));
        }
        PeerAuth::Anonymous => {
            let (Some(kind), Some(assertion)) =
                (&params.client_assertion_type, &params.client_assertion)
            else {
                return Err(OAuthError::new(
                    "invalid_client",
                    "a client certificate (X.509-SVID, tls_client_auth) or a JWT-SVID client                      assertion (private_key_jwt) is required",
                ));
            };
            if kind != JWT_BEARER {
                return Err(OAuthError::new(
                    "invalid_client",
                    format!("client_assertion_type must be {JWT_BEARER}"),
                ));
            }
            let keys = app
                .authorities
                .current()
                .bundle
                .jwt_key_set()
                .map_err(|e| server_error(&e))?;
            let iss = app.config.issuer();
            let endpoint = format!("{iss}/oauth2/token");
            let td = &app.config.trust_domain;
            let claims = sigil_pki::validate_jwt_svid(assertion, &keys, td, &endpoint, now, 0)
                .or_else(|_| sigil_pki::validate_jwt_svid(assertion, &keys, td, &iss, now, 0))
                .map_err(|e| OAuthError::new("invalid_client", format!("client assertion: {e}")))?;
            let spiffe_id = sigil_core::SpiffeId::new(&claims.sub)
                .map_err(|e| OAuthError::new("invalid_client", e.to_string()))?;
            let jti = claims.jti.unwrap_or_default();
            (
                Client {
                    spiffe_id,
                    serial: jti.clone(),
                    x5t_s256: None,
                },
                jti,
                claims.iat,
            )
        }
    };
    let revoked = app
        .store
        .is_revoked(&serial, &client.spiffe_id, issued_at, now)
        .await
        .map_err(|e| server_error(&e))?;
    if revoked {
        return Err(OAuthError::new(
            "invalid_client",
            "the client's credential has been revoked",
        ));
    }
    if let Some(cid) = &params.client_id
        && cid != client.spiffe_id.as_str()
    {
        return Err(OAuthError::new(
            "invalid_client",
            "client_id does not match the client's SPIFFE ID",
        ));
    }
    Ok(client)
}

/// What the token is bound to: the DPoP key of the request's proof (RFC 9449 §5), else the
/// client certificate. A client without either gets nothing.
fn binding(
    app: &AppState,
    headers: &HeaderMap,
    client: &Client,
    now: i64,
) -> Result<sigil_pki::Confirmation, OAuthError> {
    let mut proofs = headers.get_all("dpop").iter();
    let proof =
        match (proofs.next(), proofs.next()) {
            (None, _) => None,
            (Some(v), None) => Some(v.to_str().map_err(|_| {
                OAuthError::new("invalid_dpop_proof", "the DPoP header is not text")
            })?),
            (Some(_), Some(_)) => {
                return Err(OAuthError::new(
                    "invalid_dpop_proof",
                    "more than one DPoP header",
                ));
            }
        };
    match (proof, &client.x5t_s256) {
        (Some(proof), _) => {
            let url = format!("{}/oauth2/token", app.config.issuer());
            let url = sigil_pki::normalize_htu(&url).unwrap_or(url);
            let p = app
                .exchange
                .dpop_proof(proof, &url, now)
                .map_err(|e| OAuthError::new("invalid_dpop_proof", e.to_string()))?;
            Ok(sigil_pki::Confirmation {
                x5t_s256: String::new(),
                jkt: Some(p.jkt),
            })
        }
        (None, Some(x5t)) => Ok(sigil_pki::Confirmation {
            x5t_s256: x5t.clone(),
            jkt: None,
        }),
        (None, None) => Err(OAuthError::new(
            "invalid_request",
            "a client authenticated by client assertion must bind its token to a DPoP key \
             (send a DPoP proof)",
        )),
    }
}

async fn token(
    State(app): State<Arc<AppState>>,
    Extension(peer): Extension<PeerAuth>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OAuthError> {
    let body = read_limited(body, app.config.max_body_bytes).await?;
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
    let client = authenticate_client(&app, peer, &params, now).await?;
    let cnf = binding(&app, &headers, &client, now)?;
    match params.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(exchange::GRANT_TYPE) => {
            return exchange_token(&app, &client, cnf, &params, now).await;
        }
        Some(other) => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                format!(
                    "grant_type {other:?} is not supported; use client_credentials or {}",
                    exchange::GRANT_TYPE
                ),
            ));
        }
        None => return Err(OAuthError::new("invalid_request", "grant_type is missing")),
    }
    let entries = app
        .store
        .list_entries(&EntryFilter {
            spiffe_id: Some(client.spiffe_id.clone()),
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
    let risk = crate::risk::claim_for(&app, &client.serial, client.spiffe_id.as_str())
        .await
        .map_err(|e| server_error(&e))?
        .map_err(|why| OAuthError::new("invalid_client", why))?;
    let ttl = app.config.access_token_ttl_secs;
    let token_type = token_type(&cnf);
    let (token, claims) = app
        .issuer
        .grant(Grant {
            issuer: &app.config.issuer(),
            client: &client.spiffe_id,
            subject: None,
            audience: &audience,
            scopes: &granted,
            groups: &groups,
            cnf,
            ttl_secs: ttl,
            not_after: None,
            delegation: None,
            risk,
        })
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
        "token_type": token_type,
        "expires_in": ttl,
        "scope": claims.scope,
    });
    let mut resp = json_response(StatusCode::OK, body.to_string());
    no_store(resp.headers_mut());
    Ok(resp)
}

/// Token exchange (RFC 8693): the client (the actor, by its certificate) trades
/// `subject_token` for a token acting for its user. See `exchange.rs`.
async fn exchange_token(
    app: &AppState,
    client: &Client,
    cnf: sigil_pki::Confirmation,
    params: &TokenParams,
    now: i64,
) -> Result<Response, OAuthError> {
    let refuse = |e: ExchangeError| {
        let code = e.code();
        if matches!(e, ExchangeError::Server(_)) {
            return server_error(&e);
        }
        tracing::info!(actor = %client.spiffe_id, error = code, reason = %e, "token exchange refused");
        OAuthError::new(code, e.to_string())
    };
    let (Some(subject_token), Some(subject_token_type)) =
        (&params.subject_token, &params.subject_token_type)
    else {
        return Err(OAuthError::new(
            "invalid_request",
            "subject_token and subject_token_type are required",
        ));
    };
    if !exchange::SUBJECT_TOKEN_TYPES.contains(&subject_token_type.as_str()) {
        return Err(OAuthError::new(
            "invalid_request",
            format!(
                "subject_token_type must be one of {:?}",
                exchange::SUBJECT_TOKEN_TYPES
            ),
        ));
    }
    if params.actor_token.is_some() {
        return Err(OAuthError::new(
            "invalid_request",
            "actor_token is not accepted: the actor is the client certificate",
        ));
    }
    if let Some(t) = &params.requested_token_type
        && t != ACCESS_TOKEN_TYPE
    {
        return Err(OAuthError::new(
            "invalid_request",
            format!("requested_token_type must be {ACCESS_TOKEN_TYPE}"),
        ));
    }
    let set = app.authorities.current();
    let own_keys = set.bundle.jwt_key_set().map_err(|e| server_error(&e))?;
    let own_issuer = app.config.issuer();
    let subject = app
        .exchange
        .subject(
            subject_token,
            &own_issuer,
            &own_keys,
            &client.spiffe_id,
            now,
        )
        .await
        .map_err(refuse)?;
    // Not held across the await: the watch guard is not Send.
    let changes = *app.changes.borrow();
    let engine = app
        .exchange
        .engine(app.store.as_ref(), &set.bundle.policy_authorities, changes)
        .await
        .map_err(refuse)?;
    let req = ExchangeRequest {
        scope: params.scope.as_deref(),
        audience: params.audience.as_deref(),
    };
    let d = app
        .exchange
        .decide(
            &req,
            subject,
            &client.spiffe_id,
            app.store.as_ref(),
            &app.config,
            engine,
            now,
        )
        .await
        .map_err(refuse)?;
    let risk = crate::risk::claim_for(app, &client.serial, client.spiffe_id.as_str())
        .await
        .map_err(|e| server_error(&e))?
        .map_err(|why| OAuthError::new("invalid_client", why))?;
    let token_type = token_type(&cnf);
    let grant = Grant {
        issuer: &own_issuer,
        client: &client.spiffe_id,
        subject: Some(&d.subject.user),
        audience: &d.audience,
        scopes: &d.scopes,
        groups: &d.actor_groups,
        cnf,
        ttl_secs: app.config.access_token_ttl_secs,
        not_after: Some(d.subject.exp),
        delegation: Some(DelegationGrant {
            chain: d.chain.clone(),
            user_groups: d.subject.groups.clone(),
            subject_issuer: d.subject.issuer.clone(),
            subject_token_sha256: exchange::token_sha256(subject_token),
        }),
        risk,
    };
    let (token, claims) = app.issuer.grant(grant).await.map_err(|e| match e {
        IssueError::InvalidRequest(m) => OAuthError::new("invalid_grant", m),
        e => server_error(&e),
    })?;
    let body = json!({
        "access_token": token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": token_type,
        "expires_in": claims.exp - claims.iat,
        "scope": claims.scope,
    });
    let mut resp = json_response(StatusCode::OK, body.to_string());
    no_store(resp.headers_mut());
    Ok(resp)
}

/// `DPoP` for a DPoP-bound token, `Bearer` for a certificate-bound one (RFC 9449 §5).
fn token_type(cnf: &sigil_pki::Confirmation) -> &'static str {
    if cnf.jkt.is_some() { "DPoP" } else { "Bearer" }
}

/// RFC 8693's token type of an access token.
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

fn server_error(e: &dyn std::fmt::Display) -> OAuthError {
    tracing::error!(error = %e, "token endpoint failed");
    OAuthError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: "server_error",
        description: "internal error".into(),
    }
}
