//! Signed policy bundles: what the server publishes and every agent and proxy enforces.
//!
//! A bundle's *content* is the Cedar policies (file name → text), the Cedar schema they were
//! validated against, an optional rate-limit configuration (a JSON value), a `revision` that
//! strictly increases with every push, a validity window (`not_before`, `not_after`, unix
//! seconds) and the trust domain it is for. The content is serialized as JSON with its keys
//! in sorted order (struct fields are declared sorted, policies are a `BTreeMap`) and signed
//! with Ed25519 (aws-lc-rs) by the trust domain's *policy key*, over
//! `"sigil-policy-bundle-v1\n" || payload`, so a signature made for anything else never
//! verifies as a bundle. The envelope on the wire is
//! `{"key_id": <kid>, "payload": <base64 payload>, "signature": <base64 signature>}`; its
//! payload bytes are what is verified and hashed, never a re-serialization.
//!
//! [`verify`] refuses: a payload or signature that was altered, a key that is not among the
//! trust bundle's policy keys (`use: "sigil-policy"` JWKs), another trust domain, a bundle not
//! yet valid or expired, an older revision than the last accepted one (anti-rollback), and the
//! same revision with other content. The same revision with the same content is
//! [`Verdict::Unchanged`]. No I/O: the caller persists [`Accepted`] across restarts.
use std::collections::{BTreeMap, HashMap};

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sigil_pki::Jwk;

use crate::{PolicyEngine, PolicyError};

/// `use` of a policy key in a SPIFFE bundle document.
pub const USE_SIGIL_POLICY: &str = sigil_pki::USE_SIGIL_POLICY;
/// The largest envelope [`verify`] reads.
pub const MAX_ENVELOPE_LEN: usize = 4 * 1024 * 1024;
/// How far in the future `not_before` may be (clock skew between server and node).
pub const NOT_BEFORE_SKEW_SECS: i64 = 60;
/// The signed message is this prefix followed by the payload.
const SIGNING_CONTEXT: &[u8] = b"sigil-policy-bundle-v1\n";

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error("bundle signed by unknown policy key {0:?}")]
    UnknownKey(String),
    #[error("bundle signature does not verify")]
    BadSignature,
    #[error("bundle is for trust domain {found:?}, not {expected:?}")]
    TrustDomain { expected: String, found: String },
    #[error("bundle revision {revision} expired at {not_after} (now {now})")]
    Expired {
        revision: u64,
        not_after: i64,
        now: i64,
    },
    #[error("bundle revision {revision} is not valid before {not_before} (now {now})")]
    NotYetValid {
        revision: u64,
        not_before: i64,
        now: i64,
    },
    #[error("bundle revision {revision} is older than the accepted revision {accepted} (rollback)")]
    Rollback { revision: u64, accepted: u64 },
    #[error("bundle revision {revision} differs from the accepted bundle of the same revision")]
    Conflict { revision: u64 },
    #[error("bad policy key: {0}")]
    Key(String),
    #[error("bundle policies: {0}")]
    Policy(String),
}

/// What a bundle carries. Fields are declared in sorted order: serde_json writes them so, and
/// the payload is canonical JSON with sorted keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleContent {
    /// Unix seconds after which the bundle must not be enforced.
    pub not_after: i64,
    /// Unix seconds before which the bundle is not valid.
    pub not_before: i64,
    /// Cedar policies: file name → text.
    pub policies: BTreeMap<String, String>,
    /// Rate-limit configuration, as given to `sigil policy push --rate-limits`.
    #[serde(default)]
    pub rate_limits: Option<serde_json::Value>,
    /// Strictly increasing with every push.
    pub revision: u64,
    /// The Cedar schema (text) the policies were validated against.
    pub schema: String,
    /// The trust domain the bundle is for.
    pub trust_domain: String,
}

impl BundleContent {
    /// The policies as `(name, text)` pairs, in name order.
    pub fn policy_files(&self) -> Vec<(String, String)> {
        self.policies
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Parses and validates the policies against the bundle's schema; the engine knows the
    /// bundle's revision and expiry ([`PolicyEngine::expired`]).
    pub fn engine(&self) -> Result<PolicyEngine, PolicyError> {
        PolicyEngine::with_schema(&self.schema, &self.policy_files())
            .map(|e| e.with_bundle(self.revision, self.not_after))
    }

    /// The canonical payload: JSON with sorted keys.
    pub fn to_payload(&self) -> Result<Vec<u8>, BundleError> {
        // `rate_limits` is a serde_json::Value whose maps may keep insertion order (feature
        // `preserve_order` elsewhere in the build): sort them explicitly.
        let mut c = self.clone();
        c.rate_limits = c.rate_limits.map(sorted_value);
        serde_json::to_vec(&c).map_err(|e| BundleError::Malformed(e.to_string()))
    }
}

fn sorted_value(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: BTreeMap<String, serde_json::Value> =
                m.into_iter().map(|(k, v)| (k, sorted_value(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted_value).collect())
        }
        other => other,
    }
}

/// The signed envelope, as sent on the wire (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The `kid` of the policy key that signed it.
    pub key_id: String,
    /// The canonical content, standard base64.
    pub payload: String,
    /// Ed25519 signature over `"sigil-policy-bundle-v1\n" || payload bytes`, standard base64.
    pub signature: String,
}

/// What an agent or proxy remembers of the last bundle it accepted (persist it: it is the
/// anti-rollback state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub revision: u64,
    /// Lowercase hex SHA-256 of the payload bytes.
    pub payload_sha256: String,
}

/// A bundle whose signature, trust domain and validity were checked.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub content: BundleContent,
    /// Lowercase hex SHA-256 of the payload bytes.
    pub payload_sha256: String,
    pub key_id: String,
    /// The envelope as received, to be forwarded verbatim.
    pub envelope: String,
}

impl VerifiedBundle {
    /// The anti-rollback record of this bundle.
    pub fn accepted(&self) -> Accepted {
        Accepted {
            revision: self.content.revision,
            payload_sha256: self.payload_sha256.clone(),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone)]
pub enum Verdict {
    /// A newer bundle: enforce it (and persist [`VerifiedBundle::accepted`]).
    New(Box<VerifiedBundle>),
    /// The bundle already accepted, again.
    Unchanged(Box<VerifiedBundle>),
}

/// The policy key of a trust domain (Ed25519), which signs bundles. Lives on the server only.
pub struct PolicySigner {
    key: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    jwk: Jwk,
}

impl std::fmt::Debug for PolicySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySigner")
            .field("kid", &self.jwk.kid)
            .finish_non_exhaustive()
    }
}

impl PolicySigner {
    /// A fresh random key.
    pub fn generate() -> Result<Self, BundleError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|e| BundleError::Key(e.to_string()))?;
        Self::from_pkcs8_der(doc.as_ref())
    }

    /// From a PKCS#8 PEM (`PRIVATE KEY`) Ed25519 key.
    pub fn from_pkcs8_pem(text: &str) -> Result<Self, BundleError> {
        let block = pem::parse(text).map_err(|e| BundleError::Key(e.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(BundleError::Key(format!(
                "expected a PRIVATE KEY PEM block, got {}",
                block.tag()
            )));
        }
        Self::from_pkcs8_der(block.contents())
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, BundleError> {
        let key = Ed25519KeyPair::from_pkcs8(der).map_err(|e| BundleError::Key(e.to_string()))?;
        let mut jwk = Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(key.public_key().as_ref()),
            y: None,
            n: None,
            e: None,
            kid: None,
            alg: None,
            use_: None,
            x5c: None,
        };
        let kid = jwk
            .thumbprint()
            .map_err(|e| BundleError::Key(e.to_string()))?;
        jwk.kid = Some(kid);
        jwk.alg = Some("EdDSA".into());
        jwk.use_ = Some(USE_SIGIL_POLICY.into());
        Ok(Self {
            key,
            pkcs8: der.to_vec(),
            jwk,
        })
    }

    /// The private key as PKCS#8 PEM. Secret: write with mode 0600.
    pub fn pkcs8_pem(&self) -> String {
        pem::encode_config(
            &pem::Pem::new("PRIVATE KEY", self.pkcs8.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    /// The key ID: the RFC 7638 thumbprint of the public JWK.
    pub fn kid(&self) -> &str {
        self.jwk.kid.as_deref().unwrap_or_default()
    }

    /// The public key as a JWK with `kid`, `alg: "EdDSA"` and `use: "sigil-policy"`.
    pub fn public_jwk(&self) -> Jwk {
        self.jwk.clone()
    }

    /// Signs `content`: the envelope JSON.
    pub fn sign(&self, content: &BundleContent) -> Result<String, BundleError> {
        let payload = content.to_payload()?;
        self.sign_payload(&payload)
    }

    /// Signs raw payload bytes (tests use it to sign malformed content).
    pub fn sign_payload(&self, payload: &[u8]) -> Result<String, BundleError> {
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(payload);
        let sig = self.key.sign(&msg);
        serde_json::to_string(&Envelope {
            key_id: self.kid().to_owned(),
            payload: STANDARD.encode(payload),
            signature: STANDARD.encode(sig.as_ref()),
        })
        .map_err(|e| BundleError::Malformed(e.to_string()))
    }
}

/// The policy keys a node trusts, by `kid`.
#[derive(Clone, Default)]
pub struct PolicyKeys {
    keys: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for PolicyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("PolicyKeys").field("kids", &kids).finish()
    }
}

impl PolicyKeys {
    /// The keys with `use: "sigil-policy"` among `jwks` (others are ignored). Each must be an
    /// Ed25519 OKP key whose `kid` is its RFC 7638 thumbprint.
    pub fn from_jwks(jwks: &[Jwk]) -> Result<Self, BundleError> {
        let mut keys = HashMap::new();
        for jwk in jwks {
            if jwk.use_.as_deref() != Some(USE_SIGIL_POLICY) {
                continue;
            }
            if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
                return Err(BundleError::Key(format!(
                    "policy key {:?} is {} {}, not OKP Ed25519",
                    jwk.kid, jwk.kty, jwk.crv
                )));
            }
            let kid = jwk
                .kid
                .clone()
                .ok_or_else(|| BundleError::Key("policy key without kid".into()))?;
            let thumb = jwk
                .thumbprint()
                .map_err(|e| BundleError::Key(e.to_string()))?;
            if thumb != kid {
                return Err(BundleError::Key(format!(
                    "policy key kid {kid:?} is not its thumbprint"
                )));
            }
            let x = URL_SAFE_NO_PAD
                .decode(&jwk.x)
                .map_err(|_| BundleError::Key(format!("policy key {kid}: x is not base64url")))?;
            if x.len() != 32 {
                return Err(BundleError::Key(format!(
                    "policy key {kid}: Ed25519 key must be 32 bytes"
                )));
            }
            keys.insert(kid, x);
        }
        Ok(Self { keys })
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Lowercase hex SHA-256.
fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses an envelope and checks its signature against `keys` only (no time, trust domain or
/// revision checks): for reading back a stored bundle.
pub fn open(envelope: &str, keys: &PolicyKeys) -> Result<VerifiedBundle, BundleError> {
    if envelope.len() > MAX_ENVELOPE_LEN {
        return Err(BundleError::Malformed("envelope too large".into()));
    }
    let env: Envelope =
        serde_json::from_str(envelope).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let key = keys
        .keys
        .get(&env.key_id)
        .ok_or_else(|| BundleError::UnknownKey(env.key_id.clone()))?;
    let payload = STANDARD
        .decode(&env.payload)
        .map_err(|_| BundleError::Malformed("payload is not base64".into()))?;
    let sig = STANDARD
        .decode(&env.signature)
        .map_err(|_| BundleError::Malformed("signature is not base64".into()))?;
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(&payload);
    UnparsedPublicKey::new(&ED25519, key.as_slice())
        .verify(&msg, &sig)
        .map_err(|_| BundleError::BadSignature)?;
    let content: BundleContent =
        serde_json::from_slice(&payload).map_err(|e| BundleError::Malformed(e.to_string()))?;
    Ok(VerifiedBundle {
        content,
        payload_sha256: sha256_hex(&payload),
        key_id: env.key_id,
        envelope: envelope.to_owned(),
    })
}

/// Verifies a bundle for enforcement at `now` (unix seconds), given the last accepted one.
pub fn verify(
    envelope: &str,
    keys: &PolicyKeys,
    trust_domain: &str,
    now: i64,
    last: Option<&Accepted>,
) -> Result<Verdict, BundleError> {
    let b = open(envelope, keys)?;
    let c = &b.content;
    if c.trust_domain != trust_domain {
        return Err(BundleError::TrustDomain {
            expected: trust_domain.to_owned(),
            found: c.trust_domain.clone(),
        });
    }
    if let Some(last) = last {
        if c.revision < last.revision {
            return Err(BundleError::Rollback {
                revision: c.revision,
                accepted: last.revision,
            });
        }
        if c.revision == last.revision {
            if b.payload_sha256 != last.payload_sha256 {
                return Err(BundleError::Conflict {
                    revision: c.revision,
                });
            }
            check_time(c, now)?;
            return Ok(Verdict::Unchanged(Box::new(b)));
        }
    }
    check_time(c, now)?;
    Ok(Verdict::New(Box::new(b)))
}

/// Whether `content` may be enforced at `now`.
pub fn check_time(c: &BundleContent, now: i64) -> Result<(), BundleError> {
    if now >= c.not_after {
        return Err(BundleError::Expired {
            revision: c.revision,
            not_after: c.not_after,
            now,
        });
    }
    if c.not_before > now.saturating_add(NOT_BEFORE_SKEW_SECS) {
        return Err(BundleError::NotYetValid {
            revision: c.revision,
            not_before: c.not_before,
            now,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const TD: &str = "sigil.test";

    fn content(revision: u64, policy: &str) -> BundleContent {
        BundleContent {
            not_after: NOW + 3600,
            not_before: NOW - 10,
            policies: [("a.cedar".to_owned(), policy.to_owned())].into(),
            rate_limits: Some(serde_json::json!({"z": 1, "a": {"y": 2, "b": 3}})),
            revision,
            schema: crate::SCHEMA.to_owned(),
            trust_domain: TD.to_owned(),
        }
    }

    const P1: &str = "permit(principal, action == Action::\"list_models\", resource);";
    const P2: &str = "permit(principal, action == Action::\"list_tools\", resource);";

    fn keys(s: &PolicySigner) -> PolicyKeys {
        PolicyKeys::from_jwks(&[s.public_jwk()]).unwrap()
    }

    fn accept(env: &str, k: &PolicyKeys, last: Option<&Accepted>) -> Result<Accepted, BundleError> {
        match verify(env, k, TD, NOW, last)? {
            Verdict::New(b) | Verdict::Unchanged(b) => Ok(b.accepted()),
        }
    }

    #[test]
    fn signed_bundle_verifies_and_builds_an_engine() {
        let s = PolicySigner::generate().unwrap();
        let env = s.sign(&content(1, P1)).unwrap();
        let Verdict::New(b) = verify(&env, &keys(&s), TD, NOW, None).unwrap() else {
            panic!("expected a new bundle");
        };
        assert_eq!(b.content, content(1, P1));
        assert_eq!(b.envelope, env);
        assert_eq!(b.content.engine().unwrap().len(), 1);
        // Canonical: sorted keys all the way down.
        let e: Envelope = serde_json::from_str(&env).unwrap();
        let payload = String::from_utf8(STANDARD.decode(e.payload).unwrap()).unwrap();
        assert!(payload.starts_with("{\"not_after\":"), "{payload}");
        assert!(payload.contains("\"rate_limits\":{\"a\":{\"b\":3,\"y\":2},\"z\":1}"));
        // The key survives PEM.
        let again = PolicySigner::from_pkcs8_pem(&s.pkcs8_pem()).unwrap();
        assert_eq!(again.kid(), s.kid());
        assert_eq!(again.public_jwk().use_.as_deref(), Some(USE_SIGIL_POLICY));
    }

    #[test]
    fn one_flipped_byte_is_refused() {
        let s = PolicySigner::generate().unwrap();
        let k = keys(&s);
        let env = s.sign(&content(1, P1)).unwrap();
        let e: Envelope = serde_json::from_str(&env).unwrap();
        let payload = STANDARD.decode(&e.payload).unwrap();
        let sig = STANDARD.decode(&e.signature).unwrap();
        for i in 0..payload.len() {
            let mut p = payload.clone();
            p[i] ^= 0x01;
            let t = serde_json::to_string(&Envelope {
                payload: STANDARD.encode(&p),
                ..e.clone()
            })
            .unwrap();
            let err = verify(&t, &k, TD, NOW, None).unwrap_err();
            assert_eq!(err, BundleError::BadSignature, "byte {i}");
        }
        for i in 0..sig.len() {
            let mut g = sig.clone();
            g[i] ^= 0x80;
            let t = serde_json::to_string(&Envelope {
                signature: STANDARD.encode(&g),
                ..e.clone()
            })
            .unwrap();
            assert_eq!(
                verify(&t, &k, TD, NOW, None).unwrap_err(),
                BundleError::BadSignature
            );
        }
    }

    #[test]
    fn another_key_is_refused() {
        let s = PolicySigner::generate().unwrap();
        let other = PolicySigner::generate().unwrap();
        let env = other.sign(&content(1, P1)).unwrap();
        assert!(matches!(
            verify(&env, &keys(&s), TD, NOW, None),
            Err(BundleError::UnknownKey(_))
        ));
        // Claiming the trusted key's id does not help.
        let mut e: Envelope = serde_json::from_str(&env).unwrap();
        e.key_id = s.kid().to_owned();
        let forged = serde_json::to_string(&e).unwrap();
        assert_eq!(
            verify(&forged, &keys(&s), TD, NOW, None).unwrap_err(),
            BundleError::BadSignature
        );
        // A JWT key (use "sig") is not a policy key.
        let mut jwk = other.public_jwk();
        jwk.use_ = Some("sig".into());
        assert!(PolicyKeys::from_jwks(&[jwk]).unwrap().is_empty());
    }

    #[test]
    fn older_revision_is_refused() {
        let s = PolicySigner::generate().unwrap();
        let k = keys(&s);
        let a5 = accept(&s.sign(&content(5, P1)).unwrap(), &k, None).unwrap();
        let old = s.sign(&content(4, P2)).unwrap();
        assert_eq!(
            accept(&old, &k, Some(&a5)).unwrap_err(),
            BundleError::Rollback {
                revision: 4,
                accepted: 5
            }
        );
        let a6 = accept(&s.sign(&content(6, P2)).unwrap(), &k, Some(&a5)).unwrap();
        assert_eq!(a6.revision, 6);
    }

    #[test]
    fn same_revision_different_content_is_refused() {
        let s = PolicySigner::generate().unwrap();
        let k = keys(&s);
        let env = s.sign(&content(3, P1)).unwrap();
        let a = accept(&env, &k, None).unwrap();
        assert!(matches!(
            verify(&env, &k, TD, NOW, Some(&a)).unwrap(),
            Verdict::Unchanged(_)
        ));
        let replay = s.sign(&content(3, P2)).unwrap();
        assert_eq!(
            accept(&replay, &k, Some(&a)).unwrap_err(),
            BundleError::Conflict { revision: 3 }
        );
    }

    #[test]
    fn expired_or_not_yet_valid_is_refused() {
        let s = PolicySigner::generate().unwrap();
        let k = keys(&s);
        let mut c = content(1, P1);
        c.not_after = NOW;
        assert!(matches!(
            verify(&s.sign(&c).unwrap(), &k, TD, NOW, None),
            Err(BundleError::Expired { .. })
        ));
        let mut c = content(1, P1);
        c.not_before = NOW + NOT_BEFORE_SKEW_SECS + 1;
        assert!(matches!(
            verify(&s.sign(&c).unwrap(), &k, TD, NOW, None),
            Err(BundleError::NotYetValid { .. })
        ));
    }

    #[test]
    fn other_trust_domain_and_garbage_are_refused() {
        let s = PolicySigner::generate().unwrap();
        let k = keys(&s);
        let mut c = content(1, P1);
        c.trust_domain = "evil.test".into();
        assert!(matches!(
            verify(&s.sign(&c).unwrap(), &k, TD, NOW, None),
            Err(BundleError::TrustDomain { .. })
        ));
        for bad in ["", "{}", "null", "{\"key_id\":\"x\"}"] {
            assert!(matches!(
                verify(bad, &k, TD, NOW, None),
                Err(BundleError::Malformed(_))
            ));
        }
        // Signed but not a bundle.
        let env = s.sign_payload(b"{\"revision\":1}").unwrap();
        assert!(matches!(
            verify(&env, &k, TD, NOW, None),
            Err(BundleError::Malformed(_))
        ));
    }
}
