//! The signing keys of the trust domain: the X.509 CA, the JWT key and the policy key, their
//! rotation, the trust bundle that publishes them, and the signing of policy bundles.
//!
//! Rotation is two-step, so no relying party ever sees a signature from a key it does not
//! know yet: `rotate` first *prepares* a new key (published in the bundle, not signing); the
//! next `rotate` *activates* it and retires the old key, which stays in the bundle until the
//! last credential it could have signed has expired.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use sigil_core::{Clock, TrustDomain, UnixTime};
use sigil_pki::{CertificateAuthority, Jwk, JwtAlgorithm, JwtSigner, KeyAlgorithm, TrustBundle};
use sigil_policy::bundle::{BundleContent, PolicySigner};
use sigil_store::{AuthorityKind, AuthorityRecord, AuthorityState, PolicyBundleRecord, Store};

use crate::ServerError;
use crate::keyvault::KeyVault;

/// How long a retired key may still have live credentials: the longest TTL anything may have.
const X509_RETIRE_GRACE: i64 = sigil_core::MAX_X509_TTL_SECS as i64;
const JWT_RETIRE_GRACE: i64 = sigil_core::MAX_JWT_TTL_SECS as i64;
/// The longest lifetime a policy bundle may be given (`sigil policy push --ttl`); a retired
/// policy key stays published that long, so every bundle it signed can still be verified.
pub const MAX_POLICY_TTL_SECS: i64 = 30 * 24 * 3600;
const POLICY_RETIRE_GRACE: i64 = MAX_POLICY_TTL_SECS;
/// Lifetime recorded for JWT keys (they have no certificate); rotation is expected well before.
const JWT_KEY_TTL: i64 = 10 * 365 * 24 * 3600;
/// How often relying parties should re-fetch the bundle.
const REFRESH_HINT_SECS: u64 = 300;

/// The keys in force right now and the bundle that publishes them.
pub struct AuthoritySet {
    pub ca: Arc<CertificateAuthority>,
    pub ca_id: String,
    pub jwt: Arc<JwtSigner>,
    /// The active policy-bundle signing key.
    pub policy: Arc<PolicySigner>,
    pub bundle: TrustBundle,
    pub bundle_json: String,
    pub oidc_jwks_json: String,
    pub x509_pem: String,
}

/// Settings for key generation.
#[derive(Clone)]
pub struct KeySettings {
    pub trust_domain: TrustDomain,
    pub ca_alg: KeyAlgorithm,
    pub ca_ttl_secs: u32,
    pub jwt_alg: JwtAlgorithm,
    pub key_dir: PathBuf,
}

/// Owns the signing keys and swaps them atomically on rotation.
pub struct Authorities {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    settings: KeySettings,
    vault: Arc<KeyVault>,
    current: ArcSwap<AuthoritySet>,
    rotating: tokio::sync::Mutex<()>,
}

/// The outcome of a rotation, for the admin.
#[derive(Debug, Serialize)]
pub struct RotationOutcome {
    pub kind: &'static str,
    /// `prepared` (new key published, not yet signing) or `activated`.
    pub action: &'static str,
    pub key_id: String,
    pub bundle_sequence: i64,
}

/// The outcome of a policy push, for the admin.
#[derive(Debug, Serialize)]
pub struct PolicyPushOutcome {
    pub revision: i64,
    pub key_id: String,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub policies: usize,
    pub payload_sha256: String,
    /// Lowercase hex SHA-256 of the signed envelope as sent to agents (logged).
    pub envelope_sha256: String,
}

/// One authority as the admin sees it.
#[derive(Debug, Serialize)]
pub struct AuthorityInfo {
    pub kind: &'static str,
    pub key_id: String,
    pub state: &'static str,
    pub algorithm: String,
    pub not_after: UnixTime,
    pub created_at: UnixTime,
}

impl Authorities {
    /// Loads the keys from the store (generating or importing them on first start), private
    /// keys as files under `settings.key_dir`.
    pub async fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: KeySettings,
        upstream: Option<CertificateAuthority>,
    ) -> Result<Self, ServerError> {
        let vault = Arc::new(KeyVault::Files(settings.key_dir.clone()));
        Self::load_with_vault(store, clock, settings, upstream, vault).await
    }

    /// [`Self::load`] with the private keys in `vault` (e.g. sealed in the shared database).
    /// The first start creates the keys under the store's bootstrap lock, so replicas
    /// starting at once do not both create a CA.
    pub async fn load_with_vault(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: KeySettings,
        upstream: Option<CertificateAuthority>,
        vault: Arc<KeyVault>,
    ) -> Result<Self, ServerError> {
        create_private_dir(&settings.key_dir)?;
        let lock = store.bootstrap_lock().await?;
        let created = Self::create_missing(&*store, &*clock, &settings, upstream, &vault).await;
        lock.release().await?;
        created?;
        let now = clock.now();
        let set = build_set(&*store, &settings, &vault, now).await?;
        Ok(Self {
            store,
            clock,
            settings,
            vault,
            current: ArcSwap::from_pointee(set),
            rotating: tokio::sync::Mutex::new(()),
        })
    }

    /// Generates (or imports) whatever active key is missing.
    async fn create_missing(
        store: &dyn Store,
        clock: &dyn Clock,
        settings: &KeySettings,
        upstream: Option<CertificateAuthority>,
        vault: &KeyVault,
    ) -> Result<(), ServerError> {
        let now = clock.now();
        let x509 = store.list_authorities(AuthorityKind::X509).await?;
        let mut changed = false;
        if let Some(ca) = upstream {
            if !x509.iter().any(|r| r.id == ca.key_id()) {
                for r in x509.iter().filter(|r| r.state == AuthorityState::Active) {
                    retire(store, r, now, X509_RETIRE_GRACE).await?;
                }
                save_ca(store, vault, &ca, AuthorityState::Active, now).await?;
                tracing::info!(key_id = %ca.key_id(), "imported upstream CA");
                changed = true;
            }
        } else if !x509.iter().any(|r| r.state == AuthorityState::Active) {
            let ca = CertificateAuthority::generate(
                &settings.trust_domain,
                settings.ca_alg,
                now,
                settings.ca_ttl_secs,
            )?;
            save_ca(store, vault, &ca, AuthorityState::Active, now).await?;
            tracing::info!(key_id = %ca.key_id(), "generated CA");
            changed = true;
        }
        let jwt = store.list_authorities(AuthorityKind::Jwt).await?;
        if !jwt.iter().any(|r| r.state == AuthorityState::Active) {
            let signer = JwtSigner::generate(settings.jwt_alg)?;
            save_jwt(store, vault, &signer, AuthorityState::Active, now).await?;
            tracing::info!(kid = %signer.kid(), "generated JWT signing key");
            changed = true;
        }
        let policy = store.list_authorities(AuthorityKind::Policy).await?;
        if !policy.iter().any(|r| r.state == AuthorityState::Active) {
            let signer = PolicySigner::generate().map_err(policy_err)?;
            save_policy(store, vault, &signer, AuthorityState::Active, now).await?;
            tracing::info!(kid = %signer.kid(), "generated policy signing key");
            changed = true;
        }
        if changed || store.bundle_sequence().await? == 0 {
            store.bump_bundle_sequence().await?;
        }
        Ok(())
    }

    /// The keys and bundle in force.
    pub fn current(&self) -> Arc<AuthoritySet> {
        self.current.load_full()
    }

    /// Re-reads the store (e.g. after another replica rotated) and drops expired retired keys.
    pub async fn refresh(&self) -> Result<(), ServerError> {
        let _guard = self.rotating.lock().await;
        let now = self.clock.now();
        let mut pruned = false;
        for kind in [
            AuthorityKind::X509,
            AuthorityKind::Jwt,
            AuthorityKind::Policy,
        ] {
            for r in self.store.list_authorities(kind).await? {
                if r.state == AuthorityState::Retired && r.last_use_expiry.min(r.not_after) <= now {
                    self.store.delete_authority(&r.id).await?;
                    self.vault.remove(&r.key_ref).await;
                    pruned = true;
                }
            }
        }
        if pruned {
            self.store.bump_bundle_sequence().await?;
        }
        let set = build_set(&*self.store, &self.settings, &self.vault, now).await?;
        self.current.store(Arc::new(set));
        Ok(())
    }

    /// One rotation step for `kind`: prepare a new key, or activate the prepared one.
    pub async fn rotate(&self, kind: AuthorityKind) -> Result<RotationOutcome, ServerError> {
        let _guard = self.rotating.lock().await;
        let now = self.clock.now();
        let records = self.store.list_authorities(kind).await?;
        let (action, key_id) =
            if let Some(prepared) = records.iter().find(|r| r.state == AuthorityState::Prepared) {
                // Load before switching, so a missing key file leaves the old key in force.
                self.vault.get(&prepared.key_ref).await?;
                let grace = match kind {
                    AuthorityKind::X509 => X509_RETIRE_GRACE,
                    AuthorityKind::Jwt => JWT_RETIRE_GRACE,
                    AuthorityKind::Policy => POLICY_RETIRE_GRACE,
                };
                for r in records.iter().filter(|r| r.state == AuthorityState::Active) {
                    retire(&*self.store, r, now, grace).await?;
                }
                self.store
                    .set_authority_state(&prepared.id, AuthorityState::Active, now)
                    .await?;
                ("activated", prepared.id.clone())
            } else {
                let id = match kind {
                    AuthorityKind::X509 => {
                        let ca = CertificateAuthority::generate(
                            &self.settings.trust_domain,
                            self.settings.ca_alg,
                            now,
                            self.settings.ca_ttl_secs,
                        )?;
                        save_ca(
                            &*self.store,
                            &self.vault,
                            &ca,
                            AuthorityState::Prepared,
                            now,
                        )
                        .await?;
                        ca.key_id()
                    }
                    AuthorityKind::Jwt => {
                        let signer = JwtSigner::generate(self.settings.jwt_alg)?;
                        save_jwt(
                            &*self.store,
                            &self.vault,
                            &signer,
                            AuthorityState::Prepared,
                            now,
                        )
                        .await?;
                        signer.kid().to_owned()
                    }
                    AuthorityKind::Policy => {
                        let signer = PolicySigner::generate().map_err(policy_err)?;
                        save_policy(
                            &*self.store,
                            &self.vault,
                            &signer,
                            AuthorityState::Prepared,
                            now,
                        )
                        .await?;
                        signer.kid().to_owned()
                    }
                };
                ("prepared", id)
            };
        let bundle_sequence = self.store.bump_bundle_sequence().await?;
        let set = build_set(&*self.store, &self.settings, &self.vault, now).await?;
        self.current.store(Arc::new(set));
        tracing::info!(kind = kind_name(kind), action, key_id = %key_id, bundle_sequence, "rotated");
        Ok(RotationOutcome {
            kind: kind_name(kind),
            action,
            key_id,
            bundle_sequence,
        })
    }

    /// Signs and stores the next policy bundle: `policies` (already validated by the caller)
    /// with sigil's schema, valid from now for `ttl_secs`, at the revision after the highest
    /// stored one. Another replica pushing at the same time makes the insert conflict: the
    /// bundle is then re-signed at the next revision.
    pub async fn push_policy(
        &self,
        policies: std::collections::BTreeMap<String, String>,
        rate_limits: Option<serde_json::Value>,
        ttl_secs: i64,
    ) -> Result<PolicyPushOutcome, ServerError> {
        let _guard = self.rotating.lock().await;
        let signer = self.current().policy.clone();
        let mut last_err = None;
        for _ in 0..8 {
            let now = self.clock.now();
            let revision = self.store.policy_revision().await? + 1;
            let content = BundleContent {
                not_after: now + ttl_secs,
                not_before: now,
                policies: policies.clone(),
                rate_limits: rate_limits.clone(),
                revision: u64::try_from(revision).unwrap_or(0),
                schema: sigil_policy::SCHEMA.to_owned(),
                trust_domain: self.settings.trust_domain.to_string(),
            };
            let envelope = signer.sign(&content).map_err(policy_err)?;
            let payload_sha256 = {
                use sha2::Digest as _;
                hex::encode(sha2::Sha256::digest(
                    content.to_payload().map_err(policy_err)?,
                ))
            };
            let envelope_sha256 = {
                use sha2::Digest as _;
                hex::encode(sha2::Sha256::digest(envelope.as_bytes()))
            };
            let record = PolicyBundleRecord {
                revision,
                envelope,
                payload_sha256: payload_sha256.clone(),
                key_id: signer.kid().to_owned(),
                not_after: content.not_after,
                created_at: now,
            };
            match self.store.insert_policy_bundle(&record).await {
                Ok(()) => {
                    tracing::info!(
                        revision,
                        key_id = %signer.kid(),
                        not_after = content.not_after,
                        policies = policies.len(),
                        "policy bundle pushed"
                    );
                    return Ok(PolicyPushOutcome {
                        revision,
                        key_id: signer.kid().to_owned(),
                        not_before: content.not_before,
                        not_after: content.not_after,
                        policies: policies.len(),
                        payload_sha256,
                        envelope_sha256,
                    });
                }
                Err(sigil_store::StoreError::Conflict(e)) => last_err = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServerError::Internal(format!(
            "could not take a policy revision: {}",
            last_err.unwrap_or_default()
        )))
    }

    /// Every authority with its state.
    pub async fn list(&self) -> Result<Vec<AuthorityInfo>, ServerError> {
        let mut out = Vec::new();
        for kind in [
            AuthorityKind::X509,
            AuthorityKind::Jwt,
            AuthorityKind::Policy,
        ] {
            for r in self.store.list_authorities(kind).await? {
                out.push(AuthorityInfo {
                    kind: kind_name(kind),
                    key_id: r.id,
                    state: state_name(r.state),
                    algorithm: r.algorithm,
                    not_after: r.not_after,
                    created_at: r.created_at,
                });
            }
        }
        Ok(out)
    }
}

fn kind_name(kind: AuthorityKind) -> &'static str {
    match kind {
        AuthorityKind::X509 => "x509",
        AuthorityKind::Jwt => "jwt",
        AuthorityKind::Policy => "policy",
    }
}

fn policy_err(e: sigil_policy::bundle::BundleError) -> ServerError {
    ServerError::Internal(format!("policy key: {e}"))
}

fn state_name(s: AuthorityState) -> &'static str {
    match s {
        AuthorityState::Prepared => "prepared",
        AuthorityState::Active => "active",
        AuthorityState::Retired => "retired",
    }
}

async fn retire(
    store: &dyn Store,
    r: &AuthorityRecord,
    now: UnixTime,
    grace: i64,
) -> Result<(), ServerError> {
    let mut retired = r.clone();
    retired.state = AuthorityState::Retired;
    retired.last_use_expiry = (now + grace).min(r.not_after);
    store.save_authority(&retired).await?;
    Ok(())
}

async fn save_ca(
    store: &dyn Store,
    vault: &KeyVault,
    ca: &CertificateAuthority,
    state: AuthorityState,
    now: UnixTime,
) -> Result<(), ServerError> {
    // INVARIANT: the key is durable (on disk, or sealed in the database) before the store
    // points at it.
    let key_ref = vault
        .put(
            &format!("x509-{}.key.pem", ca.key_id()),
            ca.key_pkcs8_pem().as_bytes(),
        )
        .await?;
    store
        .save_authority(&AuthorityRecord {
            id: ca.key_id(),
            kind: AuthorityKind::X509,
            state,
            public_der: ca.cert_der().to_vec(),
            key_ref,
            algorithm: ca.algorithm().to_string(),
            not_after: ca.not_after(),
            last_use_expiry: 0,
            created_at: now,
            activated_at: (state == AuthorityState::Active).then_some(now),
        })
        .await?;
    Ok(())
}

async fn save_jwt(
    store: &dyn Store,
    vault: &KeyVault,
    signer: &JwtSigner,
    state: AuthorityState,
    now: UnixTime,
) -> Result<(), ServerError> {
    let key_ref = vault
        .put(
            &format!("jwt-{}.key.pem", signer.kid()),
            signer.pkcs8_pem().as_bytes(),
        )
        .await?;
    let jwk = serde_json::to_vec(&signer.public_jwk())
        .map_err(|e| ServerError::Internal(format!("encoding JWK: {e}")))?;
    store
        .save_authority(&AuthorityRecord {
            id: signer.kid().to_owned(),
            kind: AuthorityKind::Jwt,
            state,
            // For JWT keys the public material is stored as the JWK JSON.
            public_der: jwk,
            key_ref,
            algorithm: signer.algorithm().to_string(),
            not_after: now + JWT_KEY_TTL,
            last_use_expiry: 0,
            created_at: now,
            activated_at: (state == AuthorityState::Active).then_some(now),
        })
        .await?;
    Ok(())
}

async fn save_policy(
    store: &dyn Store,
    vault: &KeyVault,
    signer: &PolicySigner,
    state: AuthorityState,
    now: UnixTime,
) -> Result<(), ServerError> {
    let key_ref = vault
        .put(
            &format!("policy-{}.key.pem", signer.kid()),
            signer.pkcs8_pem().as_bytes(),
        )
        .await?;
    let jwk = serde_json::to_vec(&signer.public_jwk())
        .map_err(|e| ServerError::Internal(format!("encoding JWK: {e}")))?;
    store
        .save_authority(&AuthorityRecord {
            id: signer.kid().to_owned(),
            kind: AuthorityKind::Policy,
            state,
            // As for JWT keys, the public material is the JWK JSON.
            public_der: jwk,
            key_ref,
            algorithm: "EdDSA".into(),
            not_after: now + JWT_KEY_TTL,
            last_use_expiry: 0,
            created_at: now,
            activated_at: (state == AuthorityState::Active).then_some(now),
        })
        .await?;
    Ok(())
}

async fn build_set(
    store: &dyn Store,
    settings: &KeySettings,
    vault: &KeyVault,
    now: UnixTime,
) -> Result<AuthoritySet, ServerError> {
    let live = |r: &AuthorityRecord| {
        r.not_after > now && (r.state != AuthorityState::Retired || r.last_use_expiry > now)
    };
    let x509 = store.list_authorities(AuthorityKind::X509).await?;
    let jwt = store.list_authorities(AuthorityKind::Jwt).await?;
    let active_ca = x509
        .iter()
        .rev()
        .find(|r| r.state == AuthorityState::Active)
        .ok_or_else(|| ServerError::Internal("no active X.509 authority".into()))?;
    let ca_key = vault.get(&active_ca.key_ref).await?;
    let ca_cert = pem::encode(&pem::Pem::new("CERTIFICATE", active_ca.public_der.clone()));
    let ca = CertificateAuthority::from_pem(&ca_cert, &ca_key)?;
    let active_jwt = jwt
        .iter()
        .rev()
        .find(|r| r.state == AuthorityState::Active)
        .ok_or_else(|| ServerError::Internal("no active JWT authority".into()))?;
    let jwt_key = vault.get(&active_jwt.key_ref).await?;
    let signer = JwtSigner::from_pkcs8_pem(&jwt_key, settings_alg(&active_jwt.algorithm)?)?;
    let policy = store.list_authorities(AuthorityKind::Policy).await?;
    let active_policy = policy
        .iter()
        .rev()
        .find(|r| r.state == AuthorityState::Active)
        .ok_or_else(|| ServerError::Internal("no active policy authority".into()))?;
    let policy_signer = PolicySigner::from_pkcs8_pem(&vault.get(&active_policy.key_ref).await?)
        .map_err(policy_err)?;
    let mut policy_jwks = Vec::new();
    for r in policy.iter().filter(|r| live(r)) {
        let jwk: Jwk = serde_json::from_slice(&r.public_der)
            .map_err(|e| ServerError::Internal(format!("stored JWK {} unreadable: {e}", r.id)))?;
        policy_jwks.push(jwk);
    }

    let mut jwks = Vec::new();
    for r in jwt.iter().filter(|r| live(r)) {
        let jwk: Jwk = serde_json::from_slice(&r.public_der)
            .map_err(|e| ServerError::Internal(format!("stored JWK {} unreadable: {e}", r.id)))?;
        jwks.push(jwk);
    }
    let bundle = TrustBundle {
        trust_domain: settings.trust_domain.clone(),
        x509_authorities: x509
            .iter()
            .filter(|r| live(r))
            .map(|r| r.public_der.clone())
            .collect(),
        jwt_authorities: jwks,
        policy_authorities: policy_jwks,
        sequence: u64::try_from(store.bundle_sequence().await?).unwrap_or(0),
        refresh_hint_secs: REFRESH_HINT_SECS,
    };
    Ok(AuthoritySet {
        ca_id: active_ca.id.clone(),
        ca: Arc::new(ca),
        jwt: Arc::new(signer),
        policy: Arc::new(policy_signer),
        bundle_json: bundle.to_spiffe_json()?,
        oidc_jwks_json: bundle.oidc_jwks_json()?,
        x509_pem: bundle.x509_pem(),
        bundle,
    })
}

fn settings_alg(s: &str) -> Result<JwtAlgorithm, ServerError> {
    match s {
        "ES256" => Ok(JwtAlgorithm::Es256),
        "EdDSA" => Ok(JwtAlgorithm::EdDsa),
        _ => Err(ServerError::Internal(format!(
            "stored JWT algorithm {s:?} unknown"
        ))),
    }
}

/// Creates `dir` (and parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), ServerError> {
    sigil_fs::create_private_dir(dir)
        .map_err(|e| ServerError::Io(format!("creating {}: {e}", dir.display())))
}

/// Writes a secret atomically and durably with mode 0600 ([`sigil_fs::write_private`]).
pub fn write_private_file(path: &Path, data: &[u8]) -> Result<(), ServerError> {
    sigil_fs::write_private(path, data)
        .map_err(|e| ServerError::Io(format!("writing {}: {e}", path.display())))
}
