//! The endorsement key: its certificate, checked against the manufacturers' roots, is what
//! says "this is a genuine TPM"; the hash of its public key is the device's stable identity.
use std::collections::BTreeSet;

use aws_lc_rs::encoding::AsDer;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use sha2::{Digest, Sha256};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SymmetricMode};
use tss_esapi::interface_types::key_bits::{AesKeyBits, RsaKeyBits};
use tss_esapi::structures::{Public, SymmetricDefinitionObject};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ak::{first_unset, parse_canonical_public, rsa_exponent};
use crate::error::VerifyError;

/// The largest EK certificate accepted, in DER bytes.
pub const MAX_EK_CERT_LEN: usize = 16 * 1024;

/// tcg-kp-EKCertificate (2.23.133.8.1), DER contents of the OID: the extended key usage of
/// an EK certificate (TCG EK Credential Profile §3.2.16).
const EKU_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];

/// Signature algorithms accepted on EK certificate chains.
static SIG_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// The TPM manufacturers' CA certificates an EK certificate must chain to. Every
/// certificate given is trusted as an anchor (manufacturers publish roots and issuing CAs
/// alike); each is also offered as an intermediate.
#[derive(Debug, Clone)]
pub struct EkRoots {
    certs: Vec<CertificateDer<'static>>,
}

impl EkRoots {
    /// No manufacturer trusted: every EK certificate is refused (a server that accepts only
    /// EKs pinned by hash).
    pub fn none() -> Self {
        Self { certs: Vec::new() }
    }

    /// Reads every `CERTIFICATE` block of a PEM bundle. Refuses a bundle with none, or one
    /// whose certificates cannot be anchors.
    pub fn from_pem(pem_text: &str) -> Result<Self, VerifyError> {
        let blocks = pem::parse_many(pem_text.as_bytes())
            .map_err(|e| VerifyError::Config(format!("EK roots: {e}")))?;
        let certs: Vec<CertificateDer<'static>> = blocks
            .into_iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .map(|b| CertificateDer::from(b.into_contents()))
            .collect();
        if certs.is_empty() {
            return Err(VerifyError::Config("EK roots: no certificate".into()));
        }
        for c in &certs {
            webpki::anchor_from_trusted_cert(c)
                .map_err(|e| VerifyError::Config(format!("EK roots: {e:?}")))?;
        }
        Ok(Self { certs })
    }
}

/// A verified endorsement key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endorsement {
    /// SHA-256 of the EK's SubjectPublicKeyInfo (DER), lowercase hex: the device identity.
    pub ek_hash: String,
    /// The EK's SubjectPublicKeyInfo, DER.
    pub(crate) spki_der: Vec<u8>,
}

/// Verifies an EK certificate (DER) against `roots` at `now` (Unix seconds): chain,
/// validity, the EK certificate usage, and an RSA key (the EK the credential is sealed to).
pub fn verify_ek_certificate(
    cert_der: &[u8],
    roots: &EkRoots,
    now: u64,
) -> Result<Endorsement, VerifyError> {
    if cert_der.is_empty() || cert_der.len() > MAX_EK_CERT_LEN {
        return Err(VerifyError::EkCertificate(format!(
            "{} bytes (1 to {MAX_EK_CERT_LEN} accepted)",
            cert_der.len()
        )));
    }
    let (rest, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| VerifyError::EkCertificate(format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(VerifyError::EkCertificate("trailing bytes".into()));
    }
    let spki = &cert.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
        return Err(VerifyError::EkCertificate(format!(
            "key algorithm {} is not RSA",
            spki.algorithm.algorithm
        )));
    }
    let spki_der = spki.raw.to_vec();

    let anchors: Vec<_> = roots
        .certs
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let leaf = CertificateDer::from(cert_der);
    let ee =
        EndEntityCert::try_from(&leaf).map_err(|e| VerifyError::EkCertificate(format!("{e:?}")))?;
    ee.verify_for_usage(
        SIG_ALGS,
        &anchors,
        &roots.certs,
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
        KeyUsage::required(EKU_EK_CERTIFICATE),
        None,
        None,
    )
    .map_err(|e| VerifyError::EkCertificate(format!("chain: {e:?}")))?;

    Ok(Endorsement {
        ek_hash: hex::encode(Sha256::digest(&spki_der)),
        spki_der,
    })
}

/// The authPolicy of the TCG default EK templates: PolicySecret(TPM_RH_ENDORSEMENT)
/// (TCG EK Credential Profile 2.0, §B.3.3).
const EK_AUTH_POLICY_SHA256: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// The SPKI hash of an EK given by its public area (a marshalled TPMT_PUBLIC), after
/// checking that it is an EK of the TCG default RSA 2048 template (what MakeCredential
/// assumes): a restricted decryption key, `fixedTPM`, `fixedParent`, `sensitiveDataOrigin`,
/// `adminWithPolicy`, not `sign`, SHA-256 names, AES-128-CFB, the endorsement-hierarchy
/// policy. The hash is the same one an EK certificate of the same key gives.
pub fn ek_public_endorsement(tpmt_public: &[u8]) -> Result<Endorsement, VerifyError> {
    let bad = |m: String| VerifyError::EkCertificate(format!("EK public area: {m}"));
    let public = parse_canonical_public(tpmt_public).map_err(bad)?;
    let Public::Rsa {
        object_attributes: attrs,
        name_hashing_algorithm,
        auth_policy,
        parameters,
        unique,
    } = &public
    else {
        return Err(bad("not an RSA key".into()));
    };
    let required = [
        (attrs.restricted(), "restricted"),
        (attrs.decrypt(), "decrypt"),
        (attrs.fixed_tpm(), "fixedTPM"),
        (attrs.fixed_parent(), "fixedParent"),
        (attrs.sensitive_data_origin(), "sensitiveDataOrigin"),
        (attrs.admin_with_policy(), "adminWithPolicy"),
    ];
    if let Some(attr) = first_unset(&required) {
        return Err(bad(format!("attribute {attr} is not set")));
    }
    if attrs.sign_encrypt() {
        return Err(bad("attribute sign is set".into()));
    }
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        return Err(bad("name algorithm is not SHA-256".into()));
    }
    if auth_policy.value() != EK_AUTH_POLICY_SHA256 {
        return Err(bad("auth policy is not the endorsement hierarchy's".into()));
    }
    if parameters.key_bits() != RsaKeyBits::Rsa2048 {
        return Err(bad("not RSA 2048".into()));
    }
    let aes128_cfb = SymmetricDefinitionObject::Aes {
        key_bits: AesKeyBits::Aes128,
        mode: SymmetricMode::Cfb,
    };
    if parameters.symmetric_definition_object() != aes128_cfb {
        return Err(bad("symmetric algorithm is not AES-128-CFB".into()));
    }
    let components = aws_lc_rs::rsa::PublicKeyComponents {
        n: unique.value().to_vec(),
        e: rsa_exponent(parameters),
    };
    let spki_der = components
        .as_der()
        .map_err(|_| bad("not a valid RSA public key".into()))?
        .as_ref()
        .to_vec();
    Ok(Endorsement {
        ek_hash: hex::encode(Sha256::digest(&spki_der)),
        spki_der,
    })
}

/// An EK without a certificate: its public area, accepted only if its hash is among the
/// administrator's pinned `allowed` hashes (lowercase hex).
pub fn verify_ek_public(
    tpmt_public: &[u8],
    allowed: &BTreeSet<String>,
) -> Result<Endorsement, VerifyError> {
    let ek = ek_public_endorsement(tpmt_public)?;
    if !allowed.contains(&ek.ek_hash) {
        return Err(VerifyError::EkCertificate(format!(
            "no EK certificate, and EK {} is not pinned (tpm_ek_hashes)",
            ek.ek_hash
        )));
    }
    Ok(ek)
}
