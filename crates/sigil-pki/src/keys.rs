//! Key algorithms and key pairs (generate, load and save as PKCS#8, make CSRs), plus the small
//! encoding helpers every other module shares.
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{CertificateParams, DistinguishedName, PublicKeyData, SanType, SignatureAlgorithm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sigil_core::{SpiffeId, UnixTime};

use crate::error::PkiError;

/// The key algorithms sigil generates and signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256.
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// Ed25519.
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl KeyAlgorithm {
    /// The configuration spelling: `ecdsa-p256` or `ed25519`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::Ed25519 => "ed25519",
        }
    }

    pub(crate) fn rcgen_alg(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ecdsa-p256" => Ok(Self::EcdsaP256),
            "ed25519" => Ok(Self::Ed25519),
            other => Err(PkiError::UnsupportedAlgorithm(format!(
                "{other:?} (expected \"ecdsa-p256\" or \"ed25519\")"
            ))),
        }
    }
}

/// A private key held by a client (CLI, agent, test) that asks the CA for an X.509-SVID.
pub struct KeyPair {
    alg: KeyAlgorithm,
    inner: rcgen::KeyPair,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh random key.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, PkiError> {
        Ok(Self {
            alg,
            inner: generate_rcgen_key(alg)?,
        })
    }

    /// Loads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), P-256 or Ed25519.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, PkiError> {
        let (alg, inner) = load_rcgen_key(pem)?;
        Ok(Self { alg, inner })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }

    /// The private key as PKCS#8 PEM. Secret: store with mode 0600.
    pub fn pkcs8_pem(&self) -> String {
        self.inner.serialize_pem()
    }

    /// The private key as PKCS#8 DER. Secret.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        self.inner.serialize_der()
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.inner.subject_public_key_info()
    }

    /// A DER PKCS#10 CSR signed by this key, with an empty subject and, if given, the SPIFFE ID
    /// as its only URI SAN. The CA decides the certificate's contents; the CSR proves key
    /// possession.
    pub fn csr_der(&self, spiffe_id: Option<&SpiffeId>) -> Result<Vec<u8>, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(id) = spiffe_id {
            params.subject_alt_names = vec![SanType::URI(ia5(id.as_str())?)];
        }
        let csr = params
            .serialize_request(&self.inner)
            .map_err(|e| PkiError::Signing(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    /// The same CSR as [`KeyPair::csr_der`], PEM-encoded.
    pub fn csr_pem(&self, spiffe_id: Option<&SpiffeId>) -> Result<String, PkiError> {
        Ok(pem_encode("CERTIFICATE REQUEST", &self.csr_der(spiffe_id)?))
    }
}

pub(crate) fn generate_rcgen_key(alg: KeyAlgorithm) -> Result<rcgen::KeyPair, PkiError> {
    rcgen::KeyPair::generate_for(alg.rcgen_alg()).map_err(|e| PkiError::InvalidKey(e.to_string()))
}

/// Loads a PKCS#8 PEM key and tells which supported algorithm it is for.
pub(crate) fn load_rcgen_key(pem: &str) -> Result<(KeyAlgorithm, rcgen::KeyPair), PkiError> {
    let block = pem_decode_one(pem, &["PRIVATE KEY"])?;
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(block.as_slice());
        if let Ok(kp) = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, alg.rcgen_alg()) {
            return Ok((alg, kp));
        }
    }
    Err(PkiError::InvalidKey(
        "not a PKCS#8 ECDSA P-256 or Ed25519 private key".into(),
    ))
}

pub(crate) fn ia5(s: &str) -> Result<rcgen::string::Ia5String, PkiError> {
    rcgen::string::Ia5String::try_from(s).map_err(|e| PkiError::InvalidCertificate(e.to_string()))
}

/// Lowercase hex of SHA-256.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub(crate) fn b64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Strict base64url: no padding, no whitespace, canonical trailing bits.
pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

pub(crate) fn b64std(data: &[u8]) -> String {
    STANDARD.encode(data)
}

pub(crate) fn b64std_decode(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s).ok()
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], PkiError> {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf)
        .map_err(|_| PkiError::Signing("random source failed".into()))?;
    Ok(buf)
}

pub(crate) fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The largest PEM document this crate parses.
const MAX_PEM_LEN: usize = 256 * 1024;

/// Decodes exactly one PEM block whose label is one of `tags`.
pub(crate) fn pem_decode_one(pem_text: &str, tags: &[&str]) -> Result<Vec<u8>, PkiError> {
    if pem_text.len() > MAX_PEM_LEN {
        return Err(PkiError::Pem("input too large".into()));
    }
    let blocks = pem::parse_many(pem_text).map_err(|e| PkiError::Pem(e.to_string()))?;
    let mut iter = blocks.into_iter();
    let (Some(block), None) = (iter.next(), iter.next()) else {
        return Err(PkiError::Pem("expected exactly one PEM block".into()));
    };
    if !tags.contains(&block.tag()) {
        return Err(PkiError::Pem(format!(
            "unexpected PEM label {:?}, expected {tags:?}",
            block.tag()
        )));
    }
    Ok(block.into_contents())
}

pub(crate) fn to_offset_datetime(t: UnixTime) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map_err(|_| PkiError::InvalidTtl("time out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_spellings_round_trip() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
            assert_eq!(alg.as_str().parse::<KeyAlgorithm>().unwrap(), alg);
            let json = serde_json::to_string(&alg).unwrap();
            assert_eq!(json, format!("\"{}\"", alg.as_str()));
            assert_eq!(serde_json::from_str::<KeyAlgorithm>(&json).unwrap(), alg);
        }
        assert!("rsa".parse::<KeyAlgorithm>().is_err());
        assert!("ECDSA-P256".parse::<KeyAlgorithm>().is_err());
    }

    #[test]
    fn key_pair_pem_round_trip() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
            let kp = KeyPair::generate(alg).unwrap();
            let back = KeyPair::from_pkcs8_pem(&kp.pkcs8_pem()).unwrap();
            assert_eq!(back.algorithm(), alg);
            assert_eq!(back.public_key_der(), kp.public_key_der());
        }
        assert!(KeyPair::from_pkcs8_pem("not pem").is_err());
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(KeyPair::from_pkcs8_pem(&p384.serialize_pem()).is_err());
    }
}
