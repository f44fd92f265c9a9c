//! A CA and SVIDs minted in memory, with rustls signing keys.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use sigil_core::{SpiffeId, TrustDomain};
use sigil_pki::{CertificateAuthority, KeyAlgorithm, KeyPair, SvidSpec, TrustBundle, parse_csr};
use sigil_risk::{IdentityWindow, TelemetryMessage};

pub fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

pub struct TestCa {
    pub ca: CertificateAuthority,
    pub td: TrustDomain,
}

impl TestCa {
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let ca = CertificateAuthority::generate(&td, KeyAlgorithm::EcdsaP256, now(), 3600).unwrap();
        Self { ca, td }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.td.clone(),
            x509_authorities: vec![self.ca.cert_der().to_vec()],
            jwt_authorities: Vec::new(),
            policy_authorities: Vec::new(),
            sequence: 1,
            refresh_hint_secs: 300,
        }
    }

    pub fn id(&self, path: &str) -> SpiffeId {
        self.td.id(path).unwrap()
    }

    /// An SVID for `path` (TTL 600 s) with its key, as a rustls `CertifiedKey`.
    pub fn svid_key(&self, path: &str, alg: KeyAlgorithm) -> CertifiedKey {
        let key = KeyPair::generate(alg).unwrap();
        let csr = parse_csr(&key.csr_der(None).unwrap()).unwrap();
        let spec = SvidSpec {
            spiffe_id: self.id(path),
            dns_names: Vec::new(),
            ttl_secs: 600,
        };
        let svid = self.ca.sign_x509_svid(&csr, &spec, now()).unwrap();
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.pkcs8_der()),
        ))
        .unwrap();
        let ck = CertifiedKey::new(vec![CertificateDer::from(svid.der)], signing);
        ck.keys_match().unwrap();
        ck
    }
}

pub fn message(source: &SpiffeId) -> TelemetryMessage {
    TelemetryMessage {
        source: source.to_string(),
        node: "spiffe://example.org/node/n1".into(),
        window_start: 1_700_000_000,
        window_secs: 60,
        seq: 7,
        identities: vec![IdentityWindow {
            spiffe_id: "spiffe://example.org/app/vision".into(),
            requests: [("invoke:defect-detector".to_string(), 12u64)].into(),
            denied: 1,
            bytes_in: 4096,
            bytes_out: 1024,
            max_response_bytes: 512,
        }],
        node_window: None,
    }
}

pub fn arc(ck: CertifiedKey) -> Arc<CertifiedKey> {
    Arc::new(ck)
}
