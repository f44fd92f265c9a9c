//! Inbound mTLS: a client certificate is required and must verify as an X.509-SVID of the
//! trust domain, against the bundle in force at handshake time, and not be revoked.
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sigil_core::Clock;
use sigil_pki::{VerifiedX509Svid, X509Bundle};
use sigil_tls::{SvidClientVerifier, SvidTrust};

use crate::Credentials;

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("trust_domain", &self.x509.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A client is checked against the bundle and the revocation list of the credentials in force.
impl SvidTrust for Credentials {
    fn x509_bundle(&self) -> &X509Bundle {
        &self.x509
    }

    fn is_revoked(&self, svid: &VerifiedX509Svid) -> bool {
        self.revoked.is_revoked(svid)
    }
}

#[derive(Debug)]
struct CurrentCert(Arc<ArcSwap<Credentials>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().serving.clone())
    }
}

/// The proxy's rustls server config: client SVID required (optional with `dpop`: a
/// certificate presented must still verify), certificate from `creds`.
pub fn server_config(
    creds: Arc<ArcSwap<Credentials>>,
    clock: Arc<dyn Clock>,
    dpop: bool,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = sigil_tls::provider();
    let mut verifier = SvidClientVerifier::new(creds.clone(), clock, provider.clone());
    if dpop {
        verifier = verifier.optional();
    }
    let verifier = Arc::new(verifier);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(creds)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
