//! Validates a peer's X.509-SVID chain against a trust domain's X.509 authorities: path
//! validation by rustls-webpki, then the SPIFFE X509-SVID leaf rules.
use std::time::Duration;

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime as PkiTime};
use sigil_core::{SpiffeId, TrustDomain, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;

use crate::ca::parse_cert;
use crate::error::SvidError;
use crate::keys::{b64url, sha256, sha256_hex};

/// The longest chain (leaf plus intermediates) accepted.
pub const MAX_CHAIN_LEN: usize = 8;
/// The largest single certificate accepted, in DER bytes.
pub const MAX_CERT_LEN: usize = 64 * 1024;

/// Signature algorithms accepted on certificates in a chain.
static SIG_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::ED25519,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// A trust domain's X.509 authorities (CA certificates, DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Bundle {
    /// The trust domain these authorities speak for.
    pub trust_domain: TrustDomain,
    /// CA certificates, DER.
    pub authorities: Vec<Vec<u8>>,
}

/// The role the peer's certificate is used in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidUsage {
    /// The peer is a TLS client (EKU clientAuth, if the leaf has EKUs).
    ClientAuth,
    /// The peer is a TLS server (EKU serverAuth, if the leaf has EKUs).
    ServerAuth,
}

/// What a validated X.509-SVID says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedX509Svid {
    /// The peer's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's serial, lowercase hex without leading zero bytes.
    pub serial: String,
    /// The leaf's `notBefore`.
    pub not_before: UnixTime,
    /// The leaf's `notAfter`.
    pub not_after: UnixTime,
    /// Lowercase hex SHA-256 of the leaf DER.
    pub sha256: String,
    /// base64url (no padding) SHA-256 of the leaf DER: `x5t#S256` of RFC 8705.
    pub x5t_s256: String,
    /// The leaf's DNS SANs.
    pub dns_names: Vec<String>,
    /// The leaf's subjectPublicKey bits (for P-256: the uncompressed SEC1 point, 65 bytes).
    pub public_key: Vec<u8>,
}

/// base64url (no padding) SHA-256 of a DER certificate: the `x5t#S256` thumbprint of RFC 8705.
pub fn x5t_s256(der: &[u8]) -> String {
    b64url(&sha256(der))
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and `bundle` fields)
/// into one DER each. At most `MAX_CHAIN_LEN * 16` certificates; anything that is not a whole
/// certificate is an error.
pub fn split_der_certs(concat: &[u8]) -> Result<Vec<Vec<u8>>, SvidError> {
    let mut out = Vec::new();
    let mut rest = concat;
    while !rest.is_empty() {
        if out.len() >= MAX_CHAIN_LEN * 16 {
            return Err(SvidError::Malformed("too many certificates".into()));
        }
        let (tail, _) = x509_parser::parse_x509_certificate(rest)
            .map_err(|e| SvidError::Malformed(format!("bad DER certificate: {e}")))?;
        let (one, tail) = rest.split_at(rest.len() - tail.len());
        if one.len() > MAX_CERT_LEN {
            return Err(SvidError::Malformed("certificate too large".into()));
        }
        out.push(one.to_vec());
        rest = tail;
    }
    Ok(out)
}

/// Validates an X.509-SVID presented by a TLS client. See [`verify_x509_svid_for_usage`].
pub fn verify_x509_svid(
    chain: &[&[u8]],
    bundle: &X509Bundle,
    now: UnixTime,
) -> Result<VerifiedX509Svid, SvidError> {
    verify_x509_svid_for_usage(chain, bundle, now, SvidUsage::ClientAuth)
}

/// Validates an X.509-SVID chain (leaf first, then intermediates) against `bundle` at `now`:
/// a path to one of the bundle's authorities, every certificate valid at `now`, EKU fit for
/// `usage`; then the leaf rules: not a CA, key usage present with digitalSignature and without
/// keyCertSign/cRLSign, exactly one URI SAN, which is a SPIFFE ID with a path in the bundle's
/// trust domain.
pub fn verify_x509_svid_for_usage(
    chain: &[&[u8]],
    bundle: &X509Bundle,
    now: UnixTime,
    usage: SvidUsage,
) -> Result<VerifiedX509Svid, SvidError> {
    let (leaf_der, intermediates) = chain
        .split_first()
        .ok_or_else(|| SvidError::Malformed("empty chain".into()))?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(SvidError::Malformed(format!(
            "chain longer than {MAX_CHAIN_LEN}"
        )));
    }
    if chain.iter().any(|c| c.len() > MAX_CERT_LEN) {
        return Err(SvidError::Malformed("certificate too large".into()));
    }
    let secs = u64::try_from(now).map_err(|_| SvidError::NotYetValid)?;
    let time = PkiTime::since_unix_epoch(Duration::from_secs(secs));

    let anchor_ders: Vec<CertificateDer<'_>> = bundle
        .authorities
        .iter()
        .map(|a| CertificateDer::from(a.as_slice()))
        .collect();
    let anchors: Vec<_> = anchor_ders
        .iter()
        .filter_map(|a| webpki::anchor_from_trusted_cert(a).ok())
        .collect();
    if anchors.is_empty() {
        return Err(SvidError::UntrustedChain(
            "the bundle has no usable authorities".into(),
        ));
    }
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(*c))
        .collect();
    let leaf_cd = CertificateDer::from(*leaf_der);
    let ee = EndEntityCert::try_from(&leaf_cd).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let ku = match usage {
        SvidUsage::ClientAuth => KeyUsage::client_auth(),
        SvidUsage::ServerAuth => KeyUsage::server_auth(),
    };
    ee.verify_for_usage(SIG_ALGS, &anchors, &inter, time, ku, None, None)
        .map_err(map_webpki_error)?;

    check_leaf(leaf_der, &bundle.trust_domain)
}

fn map_webpki_error(e: webpki::Error) -> SvidError {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => SvidError::Expired,
        E::CertNotValidYet { .. } => SvidError::NotYetValid,
        E::CaUsedAsEndEntity => SvidError::LeafIsCa,
        E::RequiredEkuNotFoundContext(_) => SvidError::WrongUsage,
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::InvalidCertValidity => {
            SvidError::Malformed(e.to_string())
        }
        other => SvidError::UntrustedChain(other.to_string()),
    }
}

/// The SPIFFE X509-SVID leaf rules, on a leaf whose path is already validated.
fn check_leaf(der: &[u8], td: &TrustDomain) -> Result<VerifiedX509Svid, SvidError> {
    let cert = parse_cert(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => return Err(SvidError::LeafIsCa),
        Ok(_) => {}
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    }
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::BadKeyUsage(
                    "leaf must not have keyCertSign or cRLSign",
                ));
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::BadKeyUsage("leaf must have digitalSignature"));
            }
        }
        Ok(None) => return Err(SvidError::BadKeyUsage("leaf has no key usage extension")),
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    }
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.clone(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    };
    let mut uris = names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = match (uris.next(), uris.next()) {
        (None, _) => return Err(SvidError::NoSpiffeId),
        (Some(_), Some(_)) => return Err(SvidError::MultipleUriSans),
        (Some(u), None) => u,
    };
    let spiffe_id = SpiffeId::new(uri).map_err(|e| SvidError::InvalidSpiffeId(e.to_string()))?;
    if !spiffe_id.is_member_of(td) {
        return Err(SvidError::ForeignTrustDomain {
            expected: td.to_string(),
            found: spiffe_id.to_string(),
        });
    }
    if spiffe_id.path().is_empty() {
        return Err(SvidError::NotAWorkloadId(spiffe_id.to_string()));
    }
    let dns_names = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect();
    let raw_serial = cert.raw_serial();
    let serial = hex::encode(
        raw_serial
            .iter()
            .skip_while(|b| **b == 0)
            .copied()
            .collect::<Vec<u8>>(),
    );
    Ok(VerifiedX509Svid {
        spiffe_id,
        serial,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        sha256: sha256_hex(der),
        x5t_s256: x5t_s256(der),
        dns_names,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn splits_concatenated_der_and_refuses_garbage() {
        let ca = crate::CertificateAuthority::generate(
            &TrustDomain::new("td").unwrap(),
            crate::KeyAlgorithm::EcdsaP256,
            1_000_000,
            3600,
        )
        .unwrap();
        let der = ca.cert_der().to_vec();
        let two = [der.clone(), der.clone()].concat();
        assert_eq!(
            split_der_certs(&two).unwrap(),
            vec![der.clone(), der.clone()]
        );
        assert!(split_der_certs(&[]).unwrap().is_empty());
        assert!(split_der_certs(&der[..der.len() - 1]).is_err());
        assert!(split_der_certs(&[der.as_slice(), b"junk"].concat()).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, SvidSpec};
    use crate::csr::parse_csr;
    use crate::keys::{KeyAlgorithm, KeyPair};
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyUsagePurpose, SanType,
    };

    const NOW: UnixTime = 1_700_000_000;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn bundle_for(ca: &CertificateAuthority) -> X509Bundle {
        X509Bundle {
            trust_domain: td(),
            authorities: vec![ca.cert_der().to_vec()],
        }
    }

    fn issue(ca: &CertificateAuthority, id: &str, ttl: u32, now: UnixTime) -> Vec<u8> {
        let kp = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = parse_csr(&kp.csr_der(None).unwrap()).unwrap();
        let spec = SvidSpec {
            spiffe_id: SpiffeId::new(id).unwrap(),
            dns_names: vec!["api.example.org".into()],
            ttl_secs: ttl,
        };
        ca.sign_x509_svid(&csr, &spec, now).unwrap().der
    }

    /// A CA made directly with rcgen, to sign leaves sigil itself would never issue.
    struct RawCa {
        der: Vec<u8>,
        issuer: Issuer<'static, rcgen::KeyPair>,
    }

    fn raw_ca(td_name: &str) -> RawCa {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("raw CA {td_name}"));
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{td_name}").try_into().unwrap(),
        )];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = p.self_signed(&key).unwrap();
        RawCa {
            der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        }
    }

    fn raw_leaf(ca: &RawCa, uris: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2039, 1, 1);
        edit(&mut p);
        p.signed_by(&key, &ca.issuer).unwrap().der().to_vec()
    }

    fn raw_bundle(ca: &RawCa) -> X509Bundle {
        X509Bundle {
            trust_domain: td(),
            authorities: vec![ca.der.clone()],
        }
    }

    #[test]
    fn accepts_a_valid_svid_for_both_algorithms() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
            let ca = CertificateAuthority::generate(&td(), alg, NOW, 86_400).unwrap();
            let leaf = issue(&ca, "spiffe://example.org/api", 3600, NOW);
            let v = verify_x509_svid(&[&leaf], &bundle_for(&ca), NOW + 10).unwrap();
            assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/api");
            assert_eq!(v.dns_names, vec!["api.example.org".to_owned()]);
            assert_eq!(v.not_after, NOW + 3600);
            assert_eq!(v.sha256, sha256_hex(&leaf));
            assert_eq!(v.x5t_s256, x5t_s256(&leaf));
            assert_eq!(v.x5t_s256.len(), 43);
            let s = verify_x509_svid_for_usage(
                &[&leaf],
                &bundle_for(&ca),
                NOW + 10,
                SvidUsage::ServerAuth,
            )
            .unwrap();
            assert_eq!(s, v);
        }
    }

    #[test]
    fn serial_matches_the_issued_one() {
        let ca =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        let kp = KeyPair::generate(KeyAlgorithm::Ed25519).unwrap();
        let csr = parse_csr(&kp.csr_der(None).unwrap()).unwrap();
        let spec = SvidSpec {
            spiffe_id: td().id("/a").unwrap(),
            dns_names: vec![],
            ttl_secs: 60,
        };
        let issued = ca.sign_x509_svid(&csr, &spec, NOW).unwrap();
        let v = verify_x509_svid(&[&issued.der], &bundle_for(&ca), NOW).unwrap();
        assert_eq!(v.serial, issued.serial);
        assert_eq!(v.sha256, issued.sha256);
        assert_eq!(v.x5t_s256, issued.x5t_s256());
    }

    #[test]
    fn refuses_a_chain_from_another_ca() {
        let ca =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        let other =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        let leaf = issue(&other, "spiffe://example.org/api", 3600, NOW);
        assert!(matches!(
            verify_x509_svid(&[&leaf], &bundle_for(&ca), NOW),
            Err(SvidError::UntrustedChain(_))
        ));
        // Presenting the foreign CA as an "intermediate" does not help.
        assert!(matches!(
            verify_x509_svid(&[&leaf, other.cert_der()], &bundle_for(&ca), NOW),
            Err(SvidError::UntrustedChain(_))
        ));
    }

    #[test]
    fn refuses_expired_and_not_yet_valid() {
        let ca =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        let leaf = issue(&ca, "spiffe://example.org/api", 600, NOW);
        let b = bundle_for(&ca);
        assert!(verify_x509_svid(&[&leaf], &b, NOW + 599).is_ok());
        assert_eq!(
            verify_x509_svid(&[&leaf], &b, NOW + 601),
            Err(SvidError::Expired)
        );
        assert_eq!(
            verify_x509_svid(&[&leaf], &b, NOW - 31),
            Err(SvidError::NotYetValid)
        );
        assert_eq!(
            verify_x509_svid(&[&leaf], &b, -5),
            Err(SvidError::NotYetValid)
        );
    }

    #[test]
    fn refuses_a_foreign_trust_domain() {
        // A CA for evil.org, wrongly in example.org's bundle, signs an evil.org SVID.
        let evil = CertificateAuthority::generate(
            &TrustDomain::new("evil.org").unwrap(),
            KeyAlgorithm::EcdsaP256,
            NOW,
            86_400,
        )
        .unwrap();
        let leaf = issue(&evil, "spiffe://evil.org/api", 600, NOW);
        let bundle = X509Bundle {
            trust_domain: td(),
            authorities: vec![evil.cert_der().to_vec()],
        };
        assert!(matches!(
            verify_x509_svid(&[&leaf], &bundle, NOW),
            Err(SvidError::ForeignTrustDomain { .. })
        ));
        // A CA of another trust domain signing an example.org ID is not in the bundle.
        let raw_evil = raw_ca("evil.org");
        let forged = raw_leaf(&raw_evil, &["spiffe://example.org/api"], |_| {});
        let ours =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        assert!(matches!(
            verify_x509_svid(&[&forged], &bundle_for(&ours), NOW),
            Err(SvidError::UntrustedChain(_))
        ));
    }

    #[test]
    fn refuses_zero_or_two_uri_sans_and_bad_ids() {
        let ca = raw_ca("example.org");
        let b = raw_bundle(&ca);
        let ok = raw_leaf(&ca, &["spiffe://example.org/ok"], |_| {});
        assert!(verify_x509_svid(&[&ok], &b, NOW).is_ok());
        let two = raw_leaf(
            &ca,
            &["spiffe://example.org/a", "spiffe://example.org/b"],
            |_| {},
        );
        assert_eq!(
            verify_x509_svid(&[&two], &b, NOW),
            Err(SvidError::MultipleUriSans)
        );
        let none = raw_leaf(&ca, &[], |p| {
            p.subject_alt_names = vec![SanType::DnsName("x.example.org".try_into().unwrap())];
        });
        assert_eq!(
            verify_x509_svid(&[&none], &b, NOW),
            Err(SvidError::NoSpiffeId)
        );
        let https = raw_leaf(&ca, &["https://example.org/a"], |_| {});
        assert!(matches!(
            verify_x509_svid(&[&https], &b, NOW),
            Err(SvidError::InvalidSpiffeId(_))
        ));
        let bare = raw_leaf(&ca, &["spiffe://example.org"], |_| {});
        assert!(matches!(
            verify_x509_svid(&[&bare], &b, NOW),
            Err(SvidError::NotAWorkloadId(_))
        ));
    }

    #[test]
    fn refuses_bad_key_usage_and_eku() {
        let ca = raw_ca("example.org");
        let b = raw_bundle(&ca);
        let id = ["spiffe://example.org/a"];
        let no_ku = raw_leaf(&ca, &id, |p| p.key_usages.clear());
        assert!(matches!(
            verify_x509_svid(&[&no_ku], &b, NOW),
            Err(SvidError::BadKeyUsage(_))
        ));
        let cert_sign = raw_leaf(&ca, &id, |p| {
            p.key_usages.push(KeyUsagePurpose::KeyCertSign);
        });
        assert!(matches!(
            verify_x509_svid(&[&cert_sign], &b, NOW),
            Err(SvidError::BadKeyUsage(_))
        ));
        let no_ds = raw_leaf(&ca, &id, |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyAgreement];
        });
        assert!(matches!(
            verify_x509_svid(&[&no_ds], &b, NOW),
            Err(SvidError::BadKeyUsage(_))
        ));
        let server_only = raw_leaf(&ca, &id, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        assert_eq!(
            verify_x509_svid(&[&server_only], &b, NOW),
            Err(SvidError::WrongUsage)
        );
        assert!(
            verify_x509_svid_for_usage(&[&server_only], &b, NOW, SvidUsage::ServerAuth).is_ok()
        );
    }

    #[test]
    fn refuses_a_ca_presented_as_leaf() {
        let ca =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        assert_eq!(
            verify_x509_svid(&[ca.cert_der()], &bundle_for(&ca), NOW),
            Err(SvidError::LeafIsCa)
        );
        // A CA signed by the bundle CA, with a SPIFFE ID, is not a leaf either.
        let root = raw_ca("example.org");
        let sub = raw_leaf(&root, &["spiffe://example.org/sub"], |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        });
        assert_eq!(
            verify_x509_svid(&[&sub], &raw_bundle(&root), NOW),
            Err(SvidError::LeafIsCa)
        );
    }

    #[test]
    fn accepts_a_path_through_an_intermediate() {
        let root = raw_ca("example.org");
        // An intermediate CA signed by the root; sigil loads it with from_pem.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let inter = p.signed_by(&key, &root.issuer).unwrap();
        let ca = CertificateAuthority::from_pem(&inter.pem(), &key.serialize_pem()).unwrap();
        assert_eq!(ca.algorithm(), KeyAlgorithm::Ed25519);
        let leaf = issue(&ca, "spiffe://example.org/w", 600, NOW);
        let b = raw_bundle(&root);
        let v = verify_x509_svid(&[&leaf, ca.cert_der()], &b, NOW).unwrap();
        assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/w");
        // Without the intermediate there is no path.
        assert!(matches!(
            verify_x509_svid(&[&leaf], &b, NOW),
            Err(SvidError::UntrustedChain(_))
        ));
    }

    #[test]
    fn refuses_malformed_input() {
        let ca =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        let b = bundle_for(&ca);
        assert!(matches!(
            verify_x509_svid(&[], &b, NOW),
            Err(SvidError::Malformed(_))
        ));
        assert!(matches!(
            verify_x509_svid(&[b"garbage"], &b, NOW),
            Err(SvidError::Malformed(_))
        ));
        let leaf = issue(&ca, "spiffe://example.org/api", 600, NOW);
        let mut tampered = leaf.clone();
        let pos = tampered.windows(3).position(|w| w == b"api").unwrap();
        tampered[pos] = b'x';
        assert!(matches!(
            verify_x509_svid(&[&tampered], &b, NOW),
            Err(SvidError::UntrustedChain(_))
        ));
        let empty = X509Bundle {
            trust_domain: td(),
            authorities: vec![],
        };
        assert!(matches!(
            verify_x509_svid(&[&leaf], &empty, NOW),
            Err(SvidError::UntrustedChain(_))
        ));
    }
}
