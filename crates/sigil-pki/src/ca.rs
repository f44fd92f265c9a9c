//! The signing CA: generates or loads the CA certificate and key, and issues X.509-SVIDs that
//! follow the SPIFFE X509-SVID specification.
use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sigil_core::{SpiffeId, TrustDomain, UnixTime, validate_dns_name};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::csr::ParsedCsr;
use crate::error::PkiError;
use crate::keys::{
    KeyAlgorithm, generate_rcgen_key, ia5, load_rcgen_key, pem_encode, random_bytes, sha256,
    sha256_hex, to_offset_datetime,
};

/// How far back an SVID's `notBefore` is set, to tolerate clock skew between peers.
pub const SVID_BACKDATE_SECS: i64 = 30;
/// How far back a generated CA's `notBefore` is set.
pub const CA_BACKDATE_SECS: i64 = 60;
/// The most DNS SANs one SVID may carry.
pub const MAX_DNS_NAMES: usize = 32;

/// What to put in an X.509-SVID. The CA decides; the CSR only supplies the public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidSpec {
    /// The workload's SPIFFE ID: the certificate's only URI SAN.
    pub spiffe_id: SpiffeId,
    /// Optional DNS SANs.
    pub dns_names: Vec<String>,
    /// Lifetime in seconds; capped at the CA's expiry.
    pub ttl_secs: u32,
}

/// An issued X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedX509Svid {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// `notBefore`, seconds since the epoch.
    pub not_before: UnixTime,
    /// `notAfter`, seconds since the epoch.
    pub not_after: UnixTime,
    /// Lowercase hex SHA-256 of the DER.
    pub sha256: String,
    /// The SPIFFE ID it certifies.
    pub spiffe_id: SpiffeId,
}

impl IssuedX509Svid {
    /// The certificate as PEM.
    pub fn pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }

    /// base64url SHA-256 of the DER, as in `cnf.x5t#S256` (RFC 8705).
    pub fn x5t_s256(&self) -> String {
        crate::x509_verify::x5t_s256(&self.der)
    }
}

/// A CA that signs X.509-SVIDs: its certificate and private key.
pub struct CertificateAuthority {
    alg: KeyAlgorithm,
    cert_der: Vec<u8>,
    upstream_chain: Vec<Vec<u8>>,
    issuer: Issuer<'static, rcgen::KeyPair>,
    not_before: UnixTime,
    not_after: UnixTime,
    key_id: String,
    trust_domain: Option<TrustDomain>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("alg", &self.alg)
            .field("key_id", &self.key_id)
            .field("trust_domain", &self.trust_domain)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed root CA for `td`: subject `O=SPIFFE, CN=sigil CA <td>`, URI SAN the
    /// trust domain ID, basicConstraints CA:true (no path length limit, so downstream CAs can
    /// nest), key usage keyCertSign + cRLSign, random serial, valid from `now - 60` for `ttl_secs`.
    pub fn generate(
        td: &TrustDomain,
        alg: KeyAlgorithm,
        now: UnixTime,
        ttl_secs: u32,
    ) -> Result<Self, PkiError> {
        if ttl_secs == 0 {
            return Err(PkiError::InvalidTtl("CA TTL must be positive"));
        }
        let key = generate_rcgen_key(alg)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        dn.push(DnType::CommonName, format!("sigil CA {td}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(ia5(&td.id_string())?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        params.not_before = to_offset_datetime(now.saturating_sub(CA_BACKDATE_SECS))?;
        params.not_after = to_offset_datetime(now.saturating_add(i64::from(ttl_secs)))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| PkiError::Signing(e.to_string()))?;
        let cert_der = cert.der().to_vec();
        let issuer = Issuer::new(params, key);
        Self::assemble(alg, cert_der, Vec::new(), issuer)
    }

    /// Loads an existing CA (e.g. one an upstream CA signed): `cert_pem` holds the CA certificate
    /// first, optionally followed by its upstream chain; `key_pem` its PKCS#8 private key.
    /// Checks the certificate is a CA and the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let blocks = pem::parse_many(cert_pem).map_err(|e| PkiError::Pem(e.to_string()))?;
        if blocks.iter().any(|b| b.tag() != "CERTIFICATE") {
            return Err(PkiError::Pem("expected only CERTIFICATE blocks".into()));
        }
        let mut ders = blocks.into_iter().map(pem::Pem::into_contents);
        let cert_der = ders
            .next()
            .ok_or_else(|| PkiError::Pem("no CERTIFICATE block".into()))?;
        let upstream_chain: Vec<Vec<u8>> = ders.collect();
        let (alg, key) = load_rcgen_key(key_pem)?;
        {
            let cert = parse_cert(&cert_der)?;
            match cert.basic_constraints() {
                Ok(Some(bc)) if bc.value.ca => {}
                _ => return Err(PkiError::NotACa("basicConstraints CA:true is missing")),
            }
            match cert.key_usage() {
                Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                    return Err(PkiError::NotACa("key usage lacks keyCertSign"));
                }
                Ok(_) => {}
                Err(e) => return Err(PkiError::InvalidCertificate(e.to_string())),
            }
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(PkiError::KeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.as_slice()), key)
            .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
        Self::assemble(alg, cert_der, upstream_chain, issuer)
    }

    fn assemble(
        alg: KeyAlgorithm,
        cert_der: Vec<u8>,
        upstream_chain: Vec<Vec<u8>>,
        issuer: Issuer<'static, rcgen::KeyPair>,
    ) -> Result<Self, PkiError> {
        let cert = parse_cert(&cert_der)?;
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        let digest = sha256(cert.public_key().raw);
        let key_id = hex::encode(digest.iter().take(16).copied().collect::<Vec<u8>>());
        let trust_domain = single_uri_san(&cert)
            .and_then(|u| SpiffeId::new(&u).ok())
            .map(|id| id.trust_domain());
        drop(cert);
        Ok(Self {
            alg,
            cert_der,
            upstream_chain,
            issuer,
            not_before,
            not_after,
            key_id,
            trust_domain,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// Certificates above this CA (from [`CertificateAuthority::from_pem`]), DER, nearest first.
    /// Empty for a self-signed root.
    pub fn upstream_chain(&self) -> &[Vec<u8>] {
        &self.upstream_chain
    }

    /// The private key as PKCS#8 PEM. Secret: write with mode 0600.
    pub fn key_pkcs8_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A stable key identifier: lowercase hex of the first 16 bytes of SHA-256(SPKI).
    pub fn key_id(&self) -> String {
        self.key_id.clone()
    }

    /// The CA certificate's `notBefore`.
    pub fn not_before(&self) -> UnixTime {
        self.not_before
    }

    /// The CA certificate's `notAfter`.
    pub fn not_after(&self) -> UnixTime {
        self.not_after
    }

    /// The CA key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }

    /// The trust domain named by the CA certificate's URI SAN, if it has one. When known, the
    /// CA refuses to sign SVIDs for other trust domains.
    pub fn trust_domain(&self) -> Option<&TrustDomain> {
        self.trust_domain.as_ref()
    }

    /// Issues an X.509-SVID for the CSR's public key: exactly one URI SAN (the SPIFFE ID), the
    /// spec's DNS SANs, CA:false, key usage digitalSignature, EKU serverAuth + clientAuth,
    /// a random 126-bit serial, `notBefore = now - 30`, `notAfter = now + ttl` capped at the
    /// CA's `notAfter`, AKI and SKI.
    pub fn sign_x509_svid(
        &self,
        csr: &ParsedCsr,
        spec: &SvidSpec,
        now: UnixTime,
    ) -> Result<IssuedX509Svid, PkiError> {
        if now < self.not_before || now >= self.not_after {
            return Err(PkiError::CaExpired);
        }
        if spec.ttl_secs == 0 {
            return Err(PkiError::InvalidTtl("SVID TTL must be positive"));
        }
        let id = &spec.spiffe_id;
        if id.path().is_empty() {
            return Err(PkiError::NotAWorkloadId(id.to_string()));
        }
        if let Some(td) = self.trust_domain.as_ref().filter(|td| !id.is_member_of(td)) {
            return Err(PkiError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: td.to_string(),
            });
        }
        if spec.dns_names.len() > MAX_DNS_NAMES {
            return Err(PkiError::InvalidDnsName(format!(
                "at most {MAX_DNS_NAMES} DNS names"
            )));
        }
        let mut sans = vec![SanType::URI(ia5(id.as_str())?)];
        for name in &spec.dns_names {
            validate_dns_name(name).map_err(|e| PkiError::InvalidDnsName(e.to_string()))?;
            sans.push(SanType::DnsName(ia5(name)?));
        }
        let not_before = now.saturating_sub(SVID_BACKDATE_SECS);
        let not_after = now
            .saturating_add(i64::from(spec.ttl_secs))
            .min(self.not_after);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.not_before = to_offset_datetime(not_before)?;
        params.not_after = to_offset_datetime(not_after)?;
        let cert = params
            .signed_by(csr.rcgen_public_key(), &self.issuer)
            .map_err(|e| PkiError::Signing(e.to_string()))?;
        let der = cert.der().to_vec();
        Ok(IssuedX509Svid {
            sha256: sha256_hex(&der),
            der,
            serial: serial_hex,
            not_before,
            not_after,
            spiffe_id: id.clone(),
        })
    }
}

/// 16 random bytes, top bit cleared (positive) and the next set (so the DER INTEGER is always
/// exactly 16 bytes): 126 bits of entropy, above the 64 the CA/B and SPIFFE guidance ask for.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = random_bytes::<16>()?;
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x40;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::InvalidCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert)
}

fn single_uri_san(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) => Some(u),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::parse_csr;
    use crate::keys::KeyPair;
    use x509_parser::extensions::ParsedExtension;

    const NOW: UnixTime = 1_700_000_000;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn spec(ttl: u32) -> SvidSpec {
        SvidSpec {
            spiffe_id: td().id("/ns/prod/sa/api").unwrap(),
            dns_names: vec!["api.example.org".into()],
            ttl_secs: ttl,
        }
    }

    fn csr(alg: KeyAlgorithm) -> ParsedCsr {
        let kp = KeyPair::generate(alg).unwrap();
        parse_csr(&kp.csr_der(None).unwrap()).unwrap()
    }

    #[test]
    fn generated_ca_has_the_right_shape() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
            let ca = CertificateAuthority::generate(&td(), alg, NOW, 86_400).unwrap();
            assert_eq!(ca.algorithm(), alg);
            assert_eq!(ca.not_after(), NOW + 86_400);
            assert_eq!(ca.not_before(), NOW - 60);
            assert_eq!(ca.trust_domain(), Some(&td()));
            assert_eq!(ca.key_id().len(), 32);
            let cert = parse_cert(ca.cert_der()).unwrap();
            assert!(cert.is_ca());
            let ku = cert.key_usage().unwrap().unwrap().value;
            assert!(ku.key_cert_sign() && ku.crl_sign());
            assert_eq!(single_uri_san(&cert).unwrap(), "spiffe://example.org");
            let cn: Vec<_> = cert
                .subject()
                .iter_common_name()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(cn, vec!["sigil CA example.org".to_owned()]);
        }
    }

    #[test]
    fn ca_pem_round_trip_and_checks() {
        let ca = CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 3600).unwrap();
        let back = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pkcs8_pem()).unwrap();
        assert_eq!(back.key_id(), ca.key_id());
        assert_eq!(back.not_after(), ca.not_after());
        assert_eq!(back.trust_domain(), Some(&td()));
        // A loaded CA still issues SVIDs whose AKI matches the CA's SKI.
        let svid = back
            .sign_x509_svid(&csr(KeyAlgorithm::EcdsaP256), &spec(60), NOW)
            .unwrap();
        let leaf = parse_cert(&svid.der).unwrap();
        let ca_cert = parse_cert(ca.cert_der()).unwrap();
        let ski = ca_cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .unwrap();
        let aki = leaf
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(aki, ski);

        // Wrong key for the certificate.
        let other =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 3600).unwrap();
        assert_eq!(
            CertificateAuthority::from_pem(&ca.cert_pem(), &other.key_pkcs8_pem()).unwrap_err(),
            PkiError::KeyMismatch
        );
        // A leaf certificate is not a CA.
        let kp = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf_pem = ca
            .sign_x509_svid(
                &parse_csr(&kp.csr_der(None).unwrap()).unwrap(),
                &spec(60),
                NOW,
            )
            .unwrap()
            .pem();
        assert!(matches!(
            CertificateAuthority::from_pem(&leaf_pem, &kp.pkcs8_pem()),
            Err(PkiError::NotACa(_))
        ));
        assert!(CertificateAuthority::from_pem("garbage", &ca.key_pkcs8_pem()).is_err());
    }

    #[test]
    fn issued_svid_follows_the_x509_svid_spec() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
            let ca = CertificateAuthority::generate(&td(), alg, NOW, 86_400).unwrap();
            let svid = ca
                .sign_x509_svid(&csr(KeyAlgorithm::EcdsaP256), &spec(3600), NOW)
                .unwrap();
            let cert = parse_cert(&svid.der).unwrap();

            let san = cert.subject_alternative_name().unwrap().unwrap().value;
            let uris: Vec<_> = san
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect();
            assert_eq!(uris, vec!["spiffe://example.org/ns/prod/sa/api"]);
            assert!(
                san.general_names
                    .contains(&GeneralName::DNSName("api.example.org"))
            );

            let bc = cert.basic_constraints().unwrap().unwrap();
            assert!(!bc.value.ca);
            assert!(bc.critical);
            let ku = cert.key_usage().unwrap().unwrap();
            assert!(ku.critical);
            assert!(ku.value.digital_signature());
            assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);

            // Positive serial, 16 bytes, as reported.
            let raw = cert.raw_serial();
            assert_eq!(raw.len(), 16);
            assert!(raw[0] & 0x80 == 0);
            assert_eq!(hex::encode(raw), svid.serial);

            assert_eq!(svid.not_before, NOW - 30);
            assert_eq!(svid.not_after, NOW + 3600);
            assert_eq!(cert.validity().not_before.timestamp(), NOW - 30);
            assert_eq!(cert.validity().not_after.timestamp(), NOW + 3600);
            assert_eq!(svid.sha256, sha256_hex(&svid.der));
            assert!(svid.pem().starts_with("-----BEGIN CERTIFICATE-----\n"));

            // SKI and AKI present.
            let has = |want: fn(&ParsedExtension<'_>) -> bool| {
                cert.extensions().iter().any(|e| want(e.parsed_extension()))
            };
            assert!(has(|e| matches!(
                e,
                ParsedExtension::SubjectKeyIdentifier(_)
            )));
            assert!(has(|e| matches!(
                e,
                ParsedExtension::AuthorityKeyIdentifier(_)
            )));
        }
    }

    #[test]
    fn serials_differ() {
        let ca = CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 3600).unwrap();
        let c = csr(KeyAlgorithm::EcdsaP256);
        let a = ca.sign_x509_svid(&c, &spec(60), NOW).unwrap();
        let b = ca.sign_x509_svid(&c, &spec(60), NOW).unwrap();
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.der, b.der);
    }

    #[test]
    fn ttl_is_capped_at_ca_expiry() {
        let ca = CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 600).unwrap();
        let svid = ca
            .sign_x509_svid(&csr(KeyAlgorithm::Ed25519), &spec(3600), NOW + 100)
            .unwrap();
        assert_eq!(svid.not_after, NOW + 600);
        assert_eq!(
            parse_cert(&svid.der)
                .unwrap()
                .validity()
                .not_after
                .timestamp(),
            NOW + 600
        );
        assert_eq!(
            ca.sign_x509_svid(&csr(KeyAlgorithm::Ed25519), &spec(60), NOW + 600)
                .unwrap_err(),
            PkiError::CaExpired
        );
    }

    #[test]
    fn refuses_bad_specs() {
        let ca = CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 3600).unwrap();
        let c = csr(KeyAlgorithm::EcdsaP256);
        assert!(matches!(
            ca.sign_x509_svid(&c, &spec(0), NOW),
            Err(PkiError::InvalidTtl(_))
        ));
        let mut foreign = spec(60);
        foreign.spiffe_id = SpiffeId::new("spiffe://evil.org/x").unwrap();
        assert!(matches!(
            ca.sign_x509_svid(&c, &foreign, NOW),
            Err(PkiError::ForeignTrustDomain { .. })
        ));
        let mut bare = spec(60);
        bare.spiffe_id = SpiffeId::new("spiffe://example.org").unwrap();
        assert!(matches!(
            ca.sign_x509_svid(&c, &bare, NOW),
            Err(PkiError::NotAWorkloadId(_))
        ));
        let mut dns = spec(60);
        dns.dns_names = vec!["bad name".into()];
        assert!(matches!(
            ca.sign_x509_svid(&c, &dns, NOW),
            Err(PkiError::InvalidDnsName(_))
        ));
    }
}
