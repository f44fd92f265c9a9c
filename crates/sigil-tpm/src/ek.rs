//! The endorsement key: its certificate, checked against the manufacturers' roots, is what
//! says "this is a genuine TPM"; the hash of its public key is the device's stable identity.
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use sha2::{Digest, Sha256};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, X509Certificate};

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
