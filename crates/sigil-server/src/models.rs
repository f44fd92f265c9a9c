//! Sealed models at the trust authority (the KMS role): a data key per model version,
//! wrapped under the model key-encryption key; the signing of a sealed file's header; and the
//! release of a data key to a workload, decided by Cedar (`decrypt` on `Model::"<name>"`,
//! with the node's attestation selectors in context), logged, then HPKE-sealed to the public
//! key of the X.509-SVID the workload presented.
use std::sync::{Arc, Mutex};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sigil_policy::PolicyEngine;
use sigil_seal::{
    DataKey, FORMAT, Header, KeyEncryptionKey, SignedHeader, WrappedDataKey, release_info,
    valid_model_name,
};
use sigil_store::ModelKeyRecord;

use crate::admin::{ApiError, ApiResult, log_change, ok, parse_body};
use crate::keyvault::KeyVault;
use crate::tls::PeerAuth;
use crate::{AppState, ServerError};

/// The vault names of the model key-encryption key and the header signing key.
const KEK_NAME: &str = "model-kek.hex";
const SIGNING_KEY_NAME: &str = "model-signing-seed.hex";

/// The trust authority's model keys.
pub struct ModelAuthority {
    kek: KeyEncryptionKey,
    signer: Ed25519KeyPair,
    /// The policy engine of the latest bundle, by revision.
    engine: Mutex<Option<(i64, Arc<PolicyEngine>)>>,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::Rng::fill(&mut rand::rng(), b.as_mut_slice());
    hex::encode(b)
}

fn decode_32(name: &str, text: &str) -> Result<[u8; 32], ServerError> {
    hex::decode(text.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| ServerError::Internal(format!("{name}: not 64 hex digits")))
}

impl ModelAuthority {
    /// Loads the model KEK and the header signing key from the vault (files under
    /// `<data_dir>/keys`, 0600; or sealed in the database when replicas share one), creating
    /// them at first start.
    pub async fn load(vault: &KeyVault) -> Result<Self, ServerError> {
        let kek = vault
            .get_or_create(KEK_NAME, || Ok(format!("{}\n", random_hex(32))))
            .await?;
        let kek = KeyEncryptionKey::from_bytes(&decode_32(KEK_NAME, &kek)?)
            .map_err(|e| ServerError::Internal(e.to_string()))?;
        let seed = vault
            .get_or_create(SIGNING_KEY_NAME, || Ok(format!("{}\n", random_hex(32))))
            .await?;
        let signer = Ed25519KeyPair::from_seed_unchecked(&decode_32(SIGNING_KEY_NAME, &seed)?)
            .map_err(|_| ServerError::Internal("bad model signing key".into()))?;
        Ok(Self {
            kek,
            signer,
            engine: Mutex::new(None),
        })
    }

    /// The header signing key (Ed25519, 32 bytes).
    pub fn signing_public_key(&self) -> &[u8] {
        self.signer.public_key().as_ref()
    }

    /// The engine of the latest signed policy bundle (verified with the trust bundle's policy
    /// keys), or why there is none.
    pub(crate) async fn engine(&self, app: &AppState) -> Result<Arc<PolicyEngine>, String> {
        let record = app
            .store
            .latest_policy_bundle()
            .await
            .map_err(|e| format!("store: {e}"))?
            .ok_or("no policy bundle has been pushed")?;
        if let Ok(g) = self.engine.lock()
            && let Some((rev, e)) = g.as_ref()
            && *rev == record.revision
        {
            return Ok(e.clone());
        }
        let set = app.authorities.current();
        let keys = sigil_policy::bundle::PolicyKeys::from_jwks(&set.bundle.policy_authorities)
            .map_err(|e| e.to_string())?;
        let verified = sigil_policy::bundle::open(&record.envelope, &keys)
            .map_err(|e| format!("policy bundle: {e}"))?;
        let engine = Arc::new(
            verified
                .content
                .engine()
                .map_err(|e| format!("policy bundle: {e}"))?,
        );
        if let Ok(mut g) = self.engine.lock() {
            *g = Some((record.revision, engine.clone()));
        }
        Ok(engine)
    }
}

fn check_name(name: &str, version: i64) -> Result<(), ApiError> {
    if !valid_model_name(name) {
        return Err(ApiError::invalid(format!(
            "bad model name {name:?}: 1 to 128 of A-Z a-z 0-9 . _ -"
        )));
    }
    if version < 1 {
        return Err(ApiError::invalid("the version must be at least 1"));
    }
    Ok(())
}

fn u64_version(version: i64) -> u64 {
    // INVARIANT: check_name refused versions below 1.
    u64::try_from(version).unwrap_or(0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    name: String,
    version: i64,
}

/// What the admin sees of a model version (never the key).
#[derive(Serialize)]
struct ModelView<'a> {
    name: &'a str,
    version: i64,
    key_id: &'a str,
    sealed: bool,
    header_sha256: Option<&'a str>,
    plaintext_sha256: Option<&'a str>,
    created_at: i64,
    sealed_at: Option<i64>,
}

fn view(r: &ModelKeyRecord) -> ModelView<'_> {
    ModelView {
        name: &r.name,
        version: r.version,
        key_id: &r.key_id,
        sealed: r.header_sha256.is_some(),
        header_sha256: r.header_sha256.as_deref(),
        plaintext_sha256: r.plaintext_sha256.as_deref(),
        created_at: r.created_at,
        sealed_at: r.sealed_at,
    }
}

/// `POST /v1/models` (`sigil model register`): a new random data key for the model version,
/// wrapped under the KEK and stored (logged as a `model-key` leaf). 409 if the version exists.
pub(crate) async fn register(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: RegisterRequest = parse_body(&body)?;
    check_name(&req.name, req.version)?;
    let record = register_version(&app, &req.name, req.version).await?;
    ok(StatusCode::CREATED, &view(&record))
}

async fn register_version(
    app: &AppState,
    name: &str,
    version: i64,
) -> Result<ModelKeyRecord, ApiError> {
    let key = DataKey::generate();
    let key_id = format!("mk-{}", random_hex(12));
    let wrapped = app
        .models
        .kek
        .wrap(&key, name, u64_version(version), &key_id)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let record = ModelKeyRecord {
        name: name.to_owned(),
        version,
        key_id,
        wrapped_key: wrapped.0,
        header_sha256: None,
        plaintext_sha256: None,
        created_at: app.clock.now(),
        sealed_at: None,
    };
    app.store.create_model_key(&record).await?;
    let mut c = sigil_log::ChangeRecord::new("model-key", record.created_at);
    c.action = Some("register".into());
    c.model = Some(record.name.clone());
    c.revision = Some(version);
    c.key_id = Some(record.key_id.clone());
    log_change(app, c).await?;
    Ok(record)
}

/// `GET /v1/models`: every registered version.
pub(crate) async fn list(State(app): State<Arc<AppState>>) -> ApiResult {
    let all = app.store.list_model_keys().await?;
    let views: Vec<ModelView<'_>> = all.iter().map(view).collect();
    ok(StatusCode::OK, &json!({ "models": views }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SealRequest {
    name: String,
    version: i64,
    chunk_size: u32,
    plaintext_len: u64,
    plaintext_sha256: String,
    /// Register the version first if it is not (`sigil model seal --register`).
    #[serde(default)]
    register: bool,
}

/// `POST /v1/models/seal` (`sigil model seal`): the signed header for the version's one
/// sealed file and its data key (to this local, root-only admin socket only). A version is
/// sealed once: its header's binding hash is recorded (and logged) before the key is handed
/// out, and a second seal is refused (409), so one data key encrypts exactly one file.
pub(crate) async fn seal(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: SealRequest = parse_body(&body)?;
    check_name(&req.name, req.version)?;
    let record = match app.store.model_key(&req.name, req.version).await? {
        Some(r) => r,
        None if req.register => register_version(&app, &req.name, req.version).await?,
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "model {:?} version {} is not registered: `sigil model register` it first",
                    req.name, req.version
                ),
            ));
        }
    };
    if record.header_sha256.is_some() {
        return Err(sealed_before(&req.name, req.version));
    }
    let header = Header {
        chunk_size: req.chunk_size,
        format: FORMAT.into(),
        key_id: record.key_id.clone(),
        name: req.name.clone(),
        nonce_prefix: random_hex(sigil_seal::NONCE_PREFIX_LEN),
        plaintext_len: req.plaintext_len,
        plaintext_sha256: req.plaintext_sha256.clone(),
        signer: hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            app.models.signing_public_key(),
        )),
        version: u64_version(req.version),
    };
    let signed = SignedHeader::sign(header, |m| app.models.signer.sign(m).as_ref().to_vec())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let key = data_key(&app, &record)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let binding = hex::encode(signed.binding());
    let now = app.clock.now();
    if !app
        .store
        .mark_model_sealed(&req.name, req.version, &binding, &req.plaintext_sha256, now)
        .await?
    {
        return Err(sealed_before(&req.name, req.version));
    }
    let mut c = sigil_log::ChangeRecord::new("model-key", now);
    c.action = Some("seal".into());
    c.model = Some(req.name.clone());
    c.revision = Some(req.version);
    c.key_id = Some(record.key_id.clone());
    c.header_sha256 = Some(binding.clone());
    c.payload_sha256 = Some(req.plaintext_sha256.clone());
    log_change(&app, c).await?;
    ok(
        StatusCode::OK,
        &json!({
            "header": B64.encode(signed.to_bytes()),
            "header_sha256": binding,
            "data_key": B64.encode(key.as_bytes()),
            "key_id": record.key_id,
        }),
    )
}

/// A registered version's data key, unwrapped with the server's key-encryption key (the
/// wrap is bound to the record's model, version and key id).
fn data_key(
    app: &AppState,
    record: &ModelKeyRecord,
) -> Result<sigil_seal::DataKey, sigil_seal::SealError> {
    app.models.kek.unwrap(
        &WrappedDataKey(record.wrapped_key.clone()),
        &record.name,
        u64_version(record.version),
        &record.key_id,
    )
}

fn sealed_before(name: &str, version: i64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        format!(
            "model {name:?} version {version} was sealed before: a data key seals one file; register a new version"
        ),
    )
}

/// A release request: which model version, and the binding hash of the header the workload
/// holds (so the key is released for that file only).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseRequest {
    name: String,
    version: i64,
    header_sha256: String,
}

pub(crate) fn json_response(status: StatusCode, body: String) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    use axum::response::IntoResponse as _;
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

pub(crate) fn refuse(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
) -> axum::response::Response {
    json_response(
        status,
        json!({"error": code, "message": message.into()}).to_string(),
    )
}

/// `POST /models/v1/release` on the public listener, over mTLS with the workload's
/// X.509-SVID: the model version's data key, HPKE-sealed to the SVID's public key, if the
/// current policy permits `decrypt` on `Model::"<name>"` for this workload on its node.
/// The release is appended to the transparency log before the answer is sent.
pub(crate) async fn release(
    State(app): State<Arc<AppState>>,
    Extension(peer): Extension<PeerAuth>,
    body: Bytes,
) -> axum::response::Response {
    match release_inner(&app, peer, &body).await {
        Ok(r) => r,
        Err((status, code, message)) => {
            tracing::warn!(%status, code, message, "model key release refused");
            refuse(status, code, message)
        }
    }
}

pub(crate) type Refusal = (StatusCode, &'static str, String);

/// The X.509-SVID a workload presented on the public listener, verified and not revoked; the
/// refusal (401, or 403 when revoked) otherwise.
pub(crate) async fn verified_caller(
    app: &AppState,
    peer: PeerAuth,
) -> Result<Arc<sigil_pki::VerifiedX509Svid>, Refusal> {
    let svid = match peer {
        PeerAuth::Verified(s) => s,
        PeerAuth::Anonymous => {
            return Err((
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a client certificate (the workload's X.509-SVID) is required".into(),
            ));
        }
        PeerAuth::Rejected(why) => {
            return Err((
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!("client certificate rejected: {why}"),
            ));
        }
    };
    if app
        .store
        .is_revoked(
            &svid.serial,
            &svid.spiffe_id,
            svid.not_before,
            app.clock.now(),
        )
        .await
        .map_err(internal)?
    {
        return Err((
            StatusCode::FORBIDDEN,
            "permission_denied",
            "client certificate has been revoked".into(),
        ));
    }
    Ok(svid)
}

/// A workload's JSON request body, or 400.
pub(crate) fn parse_request<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid request: {e}"),
        )
    })
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "model key release failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the key release could not be completed".into(),
    )
}

async fn release_inner(
    app: &AppState,
    peer: PeerAuth,
    body: &[u8],
) -> Result<axum::response::Response, Refusal> {
    let svid = verified_caller(app, peer).await?;
    let now = app.clock.now();
    let req: ReleaseRequest = parse_request(body)?;
    if !valid_model_name(&req.name) || req.version < 1 {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "bad model name or version".into(),
        ));
    }
    let record = app
        .store
        .model_key(&req.name, req.version)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "model {:?} version {} is not registered",
                    req.name, req.version
                ),
            )
        })?;
    let Some(sealed_header) = record.header_sha256.as_deref() else {
        return Err((
            StatusCode::CONFLICT,
            "not_sealed",
            "this model version has no sealed file yet".into(),
        ));
    };
    if sealed_header != req.header_sha256 {
        return Err((
            StatusCode::CONFLICT,
            "header_mismatch",
            "the header is not the one sealed for this model version".into(),
        ));
    }
    let binding: [u8; 32] = hex::decode(sealed_header)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| internal("a stored header hash is not 64 hex digits"))?;
    // The node the workload's SVID was signed for, and its attestation selectors.
    let (node, node_selectors) = node_of(app, &svid.serial).await?;
    let engine = app.models.engine(app).await.map_err(|why| {
        (
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!("no policy to decide with ({why}): denied"),
        )
    })?;
    if engine.expired(now) {
        return Err((
            StatusCode::FORBIDDEN,
            "permission_denied",
            "the current policy bundle has expired: denied".into(),
        ));
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
        action: "decrypt",
        resource_type: "Model",
        resource_id: &req.name,
        scopes: &[],
        hour,
        weekday,
        arguments: None,
        delegation: None,
        risk: None,
    };
    let decision = engine
        .decide_release(&query, &req.name, req.version, &node, &node_selectors)
        .map_err(|e| {
            (
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!("policy error ({e}): denied"),
            )
        })?;
    if !decision.allow {
        return Err((
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!(
                "policy does not permit {} to decrypt Model::{:?} on node {node:?} with selectors {node_selectors:?}",
                svid.spiffe_id, req.name
            ),
        ));
    }
    let key = data_key(app, &record).map_err(internal)?;
    let info = release_info(
        &req.name,
        u64_version(req.version),
        svid.spiffe_id.as_str(),
        &binding,
    );
    let wrapped = sigil_seal::wrap_to_svid_key(&key, &svid.public_key, &info)
        .map_err(|e| (StatusCode::BAD_REQUEST, "unsupported_key", e.to_string()))?;
    // INVARIANT: the release is durable in the transparency log before the key leaves.
    let mut c = sigil_log::ChangeRecord::new("key-release", now);
    c.model = Some(req.name.clone());
    c.revision = Some(req.version);
    c.key_id = Some(record.key_id.clone());
    c.header_sha256 = Some(sealed_header.to_owned());
    c.spiffe_id = Some(svid.spiffe_id.to_string());
    c.serial = Some(svid.serial.clone());
    if !node.is_empty() {
        c.node_id = Some(node.clone());
    }
    app.issuer.log_change(c).await.map_err(internal)?;
    tracing::info!(model = %req.name, version = req.version, spiffe_id = %svid.spiffe_id, node, policies = ?decision.policy_ids, "released a model key");
    let body = json!({
        "name": req.name,
        "version": req.version,
        "key_id": record.key_id,
        "suite": sigil_seal::HPKE_SUITE,
        "enc": B64.encode(&wrapped.enc),
        "ciphertext": B64.encode(&wrapped.ciphertext),
        "signer_public_key": B64.encode(app.models.signing_public_key()),
        "policy_ids": decision.policy_ids,
    });
    Ok(json_response(StatusCode::OK, body.to_string()))
}

/// The node an X.509-SVID was signed for (the `requester` of its issuance record) and the
/// node's attestation selectors. An SVID the admin minted has no node: `("", [])`. An evicted
/// node's workloads get nothing.
pub(crate) async fn node_of(
    app: &AppState,
    serial: &str,
) -> Result<(String, Vec<String>), Refusal> {
    let issued = app
        .store
        .issued_by_serial(serial)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            (
                StatusCode::FORBIDDEN,
                "permission_denied",
                "this certificate was not issued by this trust authority's records".into(),
            )
        })?;
    let Ok(node_id) = sigil_core::SpiffeId::new(&issued.requester) else {
        return Ok((String::new(), Vec::new()));
    };
    let node = app.store.get_node(&node_id).await.map_err(internal)?;
    match node {
        Some(n) if n.evicted => Err((
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!("node {node_id} has been evicted"),
        )),
        Some(n) => Ok((n.spiffe_id.to_string(), n.selectors)),
        None => Ok((node_id.to_string(), Vec::new())),
    }
}

/// The groups of the workload's registration entries.
pub(crate) async fn workload_groups(
    app: &AppState,
    id: &sigil_core::SpiffeId,
) -> Result<Vec<String>, Refusal> {
    let entries = app
        .store
        .list_entries(&sigil_store::EntryFilter {
            spiffe_id: Some(id.clone()),
            parent_id: None,
        })
        .await
        .map_err(internal)?;
    let groups: std::collections::BTreeSet<String> = entries
        .iter()
        .flat_map(|e| e.spec.groups.iter().cloned())
        .collect();
    Ok(groups.into_iter().collect())
}

/// Hour of day (UTC) and weekday (0 = Monday) of unix time `t`.
pub(crate) fn hour_and_weekday(t: i64) -> (i64, i64) {
    let days = t.div_euclid(86_400);
    let hour = t.rem_euclid(86_400) / 3600;
    // 1970-01-01 was a Thursday (3 when Monday is 0).
    (hour, (days + 3).rem_euclid(7))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_and_weekday_of_known_times() {
        // 2024-01-01T13:00:00Z was a Monday.
        assert_eq!(hour_and_weekday(1_704_114_000), (13, 0));
        assert_eq!(hour_and_weekday(0), (0, 3));
    }
}
