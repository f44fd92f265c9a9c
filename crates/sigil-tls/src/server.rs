//! The server as one expected SPIFFE ID.
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sigil_core::SpiffeId;
use sigil_pki::{SvidUsage, verify_x509_svid_for_usage};

use crate::SvidTrust;
use crate::signatures::{HandshakeSignatures, chain, handshake_signature_methods};

/// Verifies the server as an X.509-SVID for server authentication, chaining to the bundle in
/// force, whose SPIFFE ID is exactly the expected one. DNS names play no part: the name the
/// client connected to is ignored.
pub struct SvidServerVerifier<T> {
    trust: Arc<ArcSwap<T>>,
    expected: SpiffeId,
    signatures: HandshakeSignatures,
}

impl<T: SvidTrust> SvidServerVerifier<T> {
    /// A verifier admitting only `expected`, against the trust in force in `trust`.
    pub fn new(trust: Arc<ArcSwap<T>>, expected: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        Self {
            trust,
            expected,
            signatures: HandshakeSignatures::new(provider),
        }
    }
}

impl<T> fmt::Debug for SvidServerVerifier<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl<T: SvidTrust> ServerCertVerifier for SvidServerVerifier<T> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = chain(end_entity, intermediates);
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let trust = self.trust.load();
        let svid =
            verify_x509_svid_for_usage(&chain, trust.x509_bundle(), now, SvidUsage::ServerAuth)
                .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if svid.spiffe_id != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented {}, expected {}",
                svid.spiffe_id, self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signature_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{TestCa, der};
    use sigil_pki::X509Bundle;

    fn verify(
        v: &SvidServerVerifier<X509Bundle>,
        leaf: &CertificateDer<'_>,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("ignored.example").unwrap();
        v.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(drop)
    }

    #[test]
    fn admits_only_the_expected_spiffe_id_of_the_bundle_in_force() {
        let ca = TestCa::new("td.test");
        let bundle = Arc::new(ArcSwap::from_pointee(ca.bundle()));
        let v = SvidServerVerifier::new(bundle.clone(), ca.id("/sigil/server"), crate::provider());
        verify(&v, &der(&ca.svid("/sigil/server"))).unwrap();

        match verify(&v, &der(&ca.svid("/impostor"))) {
            Err(rustls::Error::General(m)) => assert_eq!(
                m,
                "server presented spiffe://td.test/impostor, expected spiffe://td.test/sigil/server"
            ),
            other => panic!("{other:?}"),
        }

        let other = TestCa::new("td.test");
        match verify(&v, &der(&other.svid("/sigil/server"))) {
            Err(rustls::Error::General(m)) => assert!(m.starts_with("server certificate: "), "{m}"),
            other => panic!("{other:?}"),
        }
        // The bundle in force is read at each handshake.
        bundle.store(Arc::new(other.bundle()));
        verify(&v, &der(&other.svid("/sigil/server"))).unwrap();
    }
}
