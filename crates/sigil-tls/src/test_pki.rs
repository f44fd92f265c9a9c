//! A CA and SVIDs minted in memory, for the verifiers' tests.
use rustls::pki_types::{CertificateDer, UnixTime as TlsTime};
use sigil_core::{SpiffeId, TrustDomain};
use sigil_pki::{
    CertificateAuthority, IssuedX509Svid, KeyAlgorithm, KeyPair, SvidSpec, X509Bundle, parse_csr,
};

/// Now, as rustls passes it to a server verifier (and as the CA mints).
pub(crate) fn now() -> i64 {
    i64::try_from(TlsTime::now().as_secs()).unwrap()
}

pub(crate) struct TestCa {
    pub ca: CertificateAuthority,
    pub td: TrustDomain,
}

impl TestCa {
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let ca = CertificateAuthority::generate(&td, KeyAlgorithm::EcdsaP256, now(), 3600).unwrap();
        Self { ca, td }
    }

    pub fn bundle(&self) -> X509Bundle {
        X509Bundle {
            trust_domain: self.td.clone(),
            authorities: vec![self.ca.cert_der().to_vec()],
        }
    }

    pub fn svid(&self, path: &str) -> IssuedX509Svid {
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = parse_csr(&key.csr_der(None).unwrap()).unwrap();
        let spec = SvidSpec {
            spiffe_id: self.id(path),
            dns_names: Vec::new(),
            ttl_secs: 600,
        };
        self.ca.sign_x509_svid(&csr, &spec, now()).unwrap()
    }

    pub fn id(&self, path: &str) -> SpiffeId {
        self.td.id(path).unwrap()
    }
}

pub(crate) fn der(svid: &IssuedX509Svid) -> CertificateDer<'static> {
    CertificateDer::from(svid.der.clone())
}
