//! Parses PKCS#10 CSRs and checks their self-signature, so the CA only certifies keys the
//! requester proved it holds.
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::error::PkiError;
use crate::keys::pem_decode_one;

/// The largest CSR, in DER bytes, that sigil parses.
pub const MAX_CSR_LEN: usize = 16 * 1024;

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// The public key type of a CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CsrKeyType {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

/// A CSR whose signature verified: its public key and the names it asked for.
#[derive(Debug, Clone)]
pub struct ParsedCsr {
    key_type: CsrKeyType,
    spki_der: Vec<u8>,
    spki: rcgen::SubjectPublicKeyInfo,
    requested_uris: Vec<String>,
    requested_dns: Vec<String>,
}

impl ParsedCsr {
    /// The URI SANs the CSR asks for (may be empty). The CA does not copy them: the caller
    /// compares them with what the requester is authorised for.
    pub fn requested_spiffe_ids(&self) -> Vec<String> {
        self.requested_uris.clone()
    }

    /// The DNS SANs the CSR asks for (may be empty).
    pub fn requested_dns_names(&self) -> Vec<String> {
        self.requested_dns.clone()
    }

    /// The requester's public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The requester's key type.
    pub fn key_type(&self) -> CsrKeyType {
        self.key_type
    }

    pub(crate) fn rcgen_public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.spki
    }
}

/// Parses a DER CSR and verifies its self-signature. Refuses empty, oversize, trailing bytes,
/// bad signatures and keys other than P-256, P-384 and Ed25519.
pub fn parse_csr(der: &[u8]) -> Result<ParsedCsr, PkiError> {
    if der.is_empty() {
        return Err(PkiError::CsrMalformed("empty input".into()));
    }
    if der.len() > MAX_CSR_LEN {
        return Err(PkiError::CsrTooLarge { max: MAX_CSR_LEN });
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| PkiError::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CsrMalformed(
            "trailing bytes after the CSR".into(),
        ));
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(PkiError::CsrMalformed("CSR version must be v1 (0)".into()));
    }
    let spki = &info.subject_pki;
    let key_type = classify_key(spki)?;
    let sig_oid = &csr.signature_algorithm.algorithm;
    let sig_ok = match key_type {
        CsrKeyType::Ed25519 => *sig_oid == OID_SIG_ED25519,
        CsrKeyType::EcdsaP256 | CsrKeyType::EcdsaP384 => {
            *sig_oid == OID_SIG_ECDSA_WITH_SHA256 || *sig_oid == OID_SIG_ECDSA_WITH_SHA384
        }
    };
    if !sig_ok {
        return Err(PkiError::UnsupportedCsrKey(format!(
            "signature algorithm {sig_oid} does not fit the key"
        )));
    }
    csr.verify_signature()
        .map_err(|_| PkiError::CsrBadSignature)?;

    let mut requested_uris = Vec::new();
    let mut requested_dns = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => requested_uris.push((*u).to_owned()),
                        GeneralName::DNSName(d) => requested_dns.push((*d).to_owned()),
                        _ => {}
                    }
                }
            }
        }
    }
    let rc_spki = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| PkiError::UnsupportedCsrKey(e.to_string()))?;
    Ok(ParsedCsr {
        key_type,
        spki_der: spki.raw.to_vec(),
        spki: rc_spki,
        requested_uris,
        requested_dns,
    })
}

/// Parses a PEM CSR (`CERTIFICATE REQUEST`) and verifies it like [`parse_csr`].
pub fn parse_csr_pem(pem: &str) -> Result<ParsedCsr, PkiError> {
    let der = pem_decode_one(pem, &["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"])?;
    parse_csr(&der)
}

fn classify_key(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<CsrKeyType, PkiError> {
    let alg = &spki.algorithm;
    if alg.algorithm == OID_SIG_ED25519 {
        if alg.parameters.is_some() {
            return Err(PkiError::UnsupportedCsrKey(
                "Ed25519 key must not have parameters".into(),
            ));
        }
        return Ok(CsrKeyType::Ed25519);
    }
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|oid| oid.to_id_string())
            .unwrap_or_default();
        return match curve.as_str() {
            OID_P256 => Ok(CsrKeyType::EcdsaP256),
            OID_P384 => Ok(CsrKeyType::EcdsaP384),
            other => Err(PkiError::UnsupportedCsrKey(format!(
                "EC curve {other:?} (P-256 or P-384 only)"
            ))),
        };
    }
    Err(PkiError::UnsupportedCsrKey(format!(
        "key algorithm {} (P-256, P-384 or Ed25519 only)",
        alg.algorithm
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyAlgorithm, KeyPair};
    use sigil_core::SpiffeId;

    fn id() -> SpiffeId {
        SpiffeId::new("spiffe://example.org/ns/prod/sa/api").unwrap()
    }

    #[test]
    fn parses_valid_csrs() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
            let kp = KeyPair::generate(alg).unwrap();
            let csr = parse_csr(&kp.csr_der(Some(&id())).unwrap()).unwrap();
            assert_eq!(csr.requested_spiffe_ids(), vec![id().to_string()]);
            assert_eq!(csr.public_key_der(), kp.public_key_der().as_slice());
            let csr = parse_csr(&kp.csr_der(None).unwrap()).unwrap();
            assert!(csr.requested_spiffe_ids().is_empty());
            let csr = parse_csr_pem(&kp.csr_pem(None).unwrap()).unwrap();
            assert!(csr.requested_dns_names().is_empty());
        }
    }

    #[test]
    fn accepts_p384() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        assert_eq!(
            parse_csr(csr.der()).unwrap().key_type(),
            CsrKeyType::EcdsaP384
        );
    }

    #[test]
    fn refuses_rsa_keys() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        assert!(matches!(
            parse_csr(csr.der()),
            Err(PkiError::UnsupportedCsrKey(_))
        ));
    }

    #[test]
    fn refuses_broken_signature() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
            let kp = KeyPair::generate(alg).unwrap();
            let mut der = kp.csr_der(Some(&id())).unwrap();
            // The signature BIT STRING is last: flip a bit in its final byte.
            let last = der.len() - 1;
            der[last] ^= 0x01;
            assert_eq!(parse_csr(&der).unwrap_err(), PkiError::CsrBadSignature);
        }
    }

    #[test]
    fn refuses_a_changed_request_body() {
        let kp = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let der = kp.csr_der(Some(&id())).unwrap();
        // Swap a byte of the SPIFFE ID inside the signed body: the signature must break.
        let pos = der.windows(4).position(|w| w == b"prod").unwrap();
        let mut bad = der.clone();
        bad[pos] = b'q';
        assert_eq!(parse_csr(&bad).unwrap_err(), PkiError::CsrBadSignature);
    }

    #[test]
    fn refuses_garbage_empty_oversize_and_trailing() {
        assert!(matches!(parse_csr(&[]), Err(PkiError::CsrMalformed(_))));
        assert!(matches!(
            parse_csr(b"this is not a CSR"),
            Err(PkiError::CsrMalformed(_))
        ));
        assert!(matches!(
            parse_csr(&vec![0x30; MAX_CSR_LEN + 1]),
            Err(PkiError::CsrTooLarge { .. })
        ));
        let kp = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut der = kp.csr_der(None).unwrap();
        der.push(0);
        assert!(matches!(parse_csr(&der), Err(PkiError::CsrMalformed(_))));
        assert!(
            parse_csr_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}
