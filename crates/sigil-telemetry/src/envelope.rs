//! The signed envelope: a [`TelemetryMessage`] signed by its publisher's X.509-SVID key and
//! bound to the topic it is published on. See the crate docs for the wire format.
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::SignatureScheme;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm};
use serde::{Deserialize, Serialize};
use sigil_core::SpiffeId;
use sigil_pki::{MAX_CHAIN_LEN, TrustBundle, verify_x509_svid};
use sigil_risk::TelemetryMessage;

use crate::error::TelemetryError;
use crate::topic::{Kind, topic_for};

/// The largest envelope [`open`] parses, in bytes (checked before any parsing).
pub const MAX_ENVELOPE_LEN: usize = 256 * 1024;
/// The largest JSON payload [`seal`] signs, in bytes: what fits in [`MAX_ENVELOPE_LEN`] once
/// base64-encoded (4/3) next to a chain of a few certificates.
pub const MAX_PAYLOAD_LEN: usize = 160 * 1024;
/// The domain-separation prefix of the signed bytes.
pub const SIGNING_CONTEXT: &[u8] = b"sigil-telemetry-v1\0";

/// `scheme` for ECDSA P-256 with SHA-256 (ASN.1 DER signature).
pub const SCHEME_ECDSA_P256_SHA256: &str = "ecdsa-p256-sha256";
/// `scheme` for ECDSA P-384 with SHA-384 (ASN.1 DER signature).
pub const SCHEME_ECDSA_P384_SHA384: &str = "ecdsa-p384-sha384";
/// `scheme` for Ed25519 (64-byte signature).
pub const SCHEME_ED25519: &str = "ed25519";
/// Every `scheme` accepted, in the signer's order of preference.
pub const SCHEMES: [&str; 3] = [
    SCHEME_ECDSA_P256_SHA256,
    SCHEME_ECDSA_P384_SHA384,
    SCHEME_ED25519,
];

const OFFERED: [SignatureScheme; 3] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
];

/// The envelope as it travels (JSON). Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The publisher's X.509-SVID chain, standard base64 DER, leaf first.
    pub chain: Vec<String>,
    /// One of [`SCHEMES`].
    pub scheme: String,
    /// Standard base64 of the JSON [`TelemetryMessage`].
    pub payload: String,
    /// Standard base64 of the signature over [`signed_bytes`].
    pub signature: String,
}

/// The bytes signed: `"sigil-telemetry-v1\0" || topic || "\0" || payload` (payload = the JSON
/// bytes, not their base64).
pub fn signed_bytes(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + topic.len() + 1 + payload.len());
    out.extend_from_slice(SIGNING_CONTEXT);
    out.extend_from_slice(topic.as_bytes());
    out.push(0);
    out.extend_from_slice(payload);
    out
}

fn scheme_name(s: SignatureScheme) -> Option<&'static str> {
    match s {
        SignatureScheme::ECDSA_NISTP256_SHA256 => Some(SCHEME_ECDSA_P256_SHA256),
        SignatureScheme::ECDSA_NISTP384_SHA384 => Some(SCHEME_ECDSA_P384_SHA384),
        SignatureScheme::ED25519 => Some(SCHEME_ED25519),
        _ => None,
    }
}

fn verification_alg(name: &str) -> Option<&'static dyn SignatureVerificationAlgorithm> {
    match name {
        SCHEME_ECDSA_P256_SHA256 => Some(webpki::aws_lc_rs::ECDSA_P256_SHA256),
        SCHEME_ECDSA_P384_SHA384 => Some(webpki::aws_lc_rs::ECDSA_P384_SHA384),
        SCHEME_ED25519 => Some(webpki::aws_lc_rs::ED25519),
        _ => None,
    }
}

/// Signs `msg` for publication on `topic` with the publisher's SVID key and chain, and returns
/// the envelope's JSON bytes.
///
/// Nothing here checks that `topic` is the key's own topic or that `msg.source` is its SPIFFE
/// ID: [`open`] refuses both, so a mistake shows at the server.
pub fn seal(
    topic: &str,
    msg: &TelemetryMessage,
    key: &CertifiedKey,
) -> Result<Vec<u8>, TelemetryError> {
    if key.cert.is_empty() {
        return Err(TelemetryError::Signing("the key has no certificate".into()));
    }
    let payload = serde_json::to_vec(msg).map_err(|e| TelemetryError::Signing(e.to_string()))?;
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(TelemetryError::TooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD_LEN,
        });
    }
    let signer = key.key.choose_scheme(&OFFERED).ok_or_else(|| {
        TelemetryError::Signing("the key supports none of ECDSA P-256/P-384, Ed25519".into())
    })?;
    let scheme = scheme_name(signer.scheme())
        .ok_or_else(|| TelemetryError::Signing(format!("unexpected {:?}", signer.scheme())))?;
    let signature = signer
        .sign(&signed_bytes(topic, &payload))
        .map_err(|e| TelemetryError::Signing(e.to_string()))?;
    let env = Envelope {
        chain: key.cert.iter().map(|c| B64.encode(c.as_ref())).collect(),
        scheme: scheme.into(),
        payload: B64.encode(&payload),
        signature: B64.encode(signature),
    };
    let out = serde_json::to_vec(&env).map_err(|e| TelemetryError::Signing(e.to_string()))?;
    if out.len() > MAX_ENVELOPE_LEN {
        return Err(TelemetryError::TooLarge {
            len: out.len(),
            max: MAX_ENVELOPE_LEN,
        });
    }
    Ok(out)
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, TelemetryError> {
    B64.decode(s)
        .map_err(|e| TelemetryError::Malformed(format!("{field}: {e}")))
}

/// Verifies an envelope received on `topic` against the trust domain's `bundle` at `now` (unix
/// seconds), and returns the publisher's verified SPIFFE ID and its message.
///
/// In order: at most [`MAX_ENVELOPE_LEN`] bytes; strict JSON; the chain is a valid X.509-SVID
/// of `bundle`'s trust domain at `now` ([`sigil_pki::verify_x509_svid`]); the signature
/// verifies under the leaf's key over [`signed_bytes`]`(topic, payload)`; `topic` is one of the
/// publisher's own topics ([`topic_for`] with either [`Kind`]); the payload is a
/// [`TelemetryMessage`] whose `source` is the publisher's SPIFFE ID.
///
/// Replay (the `seq` check) is the caller's: this function is stateless.
pub fn open(
    topic: &str,
    bytes: &[u8],
    bundle: &TrustBundle,
    now: i64,
) -> Result<(SpiffeId, TelemetryMessage), TelemetryError> {
    if bytes.len() > MAX_ENVELOPE_LEN {
        return Err(TelemetryError::TooLarge {
            len: bytes.len(),
            max: MAX_ENVELOPE_LEN,
        });
    }
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| TelemetryError::Malformed(e.to_string()))?;
    if env.chain.is_empty() {
        return Err(TelemetryError::Malformed("empty chain".into()));
    }
    if env.chain.len() > MAX_CHAIN_LEN {
        return Err(TelemetryError::Malformed(format!(
            "chain longer than {MAX_CHAIN_LEN}"
        )));
    }
    let alg = verification_alg(&env.scheme)
        .ok_or_else(|| TelemetryError::UnsupportedScheme(env.scheme.clone()))?;
    let chain = env
        .chain
        .iter()
        .map(|c| b64("chain", c))
        .collect::<Result<Vec<_>, _>>()?;
    let payload = b64("payload", &env.payload)?;
    let signature = b64("signature", &env.signature)?;

    let chain_refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let svid = verify_x509_svid(&chain_refs, &bundle.x509_bundle(), now)?;

    let leaf_der = chain
        .first()
        .map(|d| CertificateDer::from(d.as_slice()))
        .ok_or_else(|| TelemetryError::Malformed("empty chain".into()))?;
    let leaf = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| TelemetryError::Malformed(format!("leaf certificate: {e}")))?;
    leaf.verify_signature(alg, &signed_bytes(topic, &payload), &signature)
        .map_err(|_| TelemetryError::BadSignature)?;

    let own_topic = Kind::ALL
        .iter()
        .any(|k| topic_for(&svid.spiffe_id, *k).is_ok_and(|t| t == topic));
    if !own_topic {
        return Err(TelemetryError::TopicMismatch {
            topic: topic.into(),
            publisher: svid.spiffe_id.to_string(),
        });
    }

    let msg: TelemetryMessage = serde_json::from_slice(&payload)
        .map_err(|e| TelemetryError::Malformed(format!("payload: {e}")))?;
    if msg.source != svid.spiffe_id.as_str() {
        return Err(TelemetryError::SourceMismatch {
            source_id: msg.source,
            publisher: svid.spiffe_id.to_string(),
        });
    }
    Ok((svid.spiffe_id, msg))
}
