//! Client certificates: verified as X.509-SVIDs at the handshake, or only proven at the
//! handshake and verified by the caller afterwards.
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};
use sigil_core::Clock;
use sigil_pki::verify_x509_svid;

use crate::SvidTrust;
use crate::signatures::{HandshakeSignatures, chain, handshake_signature_methods};

/// Requires a client certificate and admits it only as an X.509-SVID of the trust domain that
/// chains to the bundle in force at the handshake (time from the injected clock) and is not
/// revoked. A refusal ends the handshake with a TLS alert: `access_denied` for a chain that
/// does not verify as an SVID, `certificate_revoked` for a revoked one.
pub struct SvidClientVerifier<T> {
    trust: Arc<ArcSwap<T>>,
    clock: Arc<dyn Clock>,
    signatures: HandshakeSignatures,
    /// A client may also present no certificate (one it presents is still verified).
    optional: bool,
}

impl<T: SvidTrust> SvidClientVerifier<T> {
    /// A verifier reading the trust in force from `trust` at every handshake.
    pub fn new(
        trust: Arc<ArcSwap<T>>,
        clock: Arc<dyn Clock>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            trust,
            clock,
            signatures: HandshakeSignatures::new(provider),
            optional: false,
        }
    }

    /// Lets clients connect without a certificate (for DPoP clients); a certificate that is
    /// presented must still verify. The server must then authenticate such clients itself.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

impl<T> fmt::Debug for SvidClientVerifier<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidClientVerifier").finish_non_exhaustive()
    }
}

impl<T: SvidTrust> ClientCertVerifier for SvidClientVerifier<T> {
    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let trust = self.trust.load();
        let chain = chain(end_entity, intermediates);
        let svid =
            verify_x509_svid(&chain, trust.x509_bundle(), self.clock.now()).map_err(|e| {
                tracing::info!(error = %e, "client certificate refused");
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
            })?;
        if trust.is_revoked(&svid) {
            tracing::info!(spiffe_id = %svid.spiffe_id, serial = svid.serial, "client certificate revoked");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signature_methods!();
}

/// Asks for a client certificate without requiring one, and at the TLS layer checks only the
/// handshake signature (proof of possession of the key), accepting any chain. For endpoints
/// that must answer a bad certificate in their own protocol (an OAuth `invalid_client`, a
/// gRPC `Unauthenticated`) rather than with a TLS alert, and that verify against the bundle
/// in force per connection without rebuilding the rustls config.
///
/// INVARIANT (for the user): nothing about the peer may be trusted until its chain has been
/// verified after the handshake (`sigil_pki::verify_x509_svid`).
#[derive(Debug)]
pub struct DeferredClientVerifier {
    signatures: HandshakeSignatures,
}

impl DeferredClientVerifier {
    /// A verifier checking handshake signatures with `provider`'s algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self {
            signatures: HandshakeSignatures::new(provider),
        }
    }
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    handshake_signature_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{TestCa, der, now};
    use sigil_core::ManualClock;
    use sigil_pki::{VerifiedX509Svid, X509Bundle};

    /// A bundle and the serials revoked under it.
    struct Trust {
        bundle: X509Bundle,
        revoked: Vec<String>,
    }

    impl SvidTrust for Trust {
        fn x509_bundle(&self) -> &X509Bundle {
            &self.bundle
        }
        fn is_revoked(&self, svid: &VerifiedX509Svid) -> bool {
            self.revoked.contains(&svid.serial)
        }
    }

    fn verifier(trust: &Arc<ArcSwap<Trust>>) -> SvidClientVerifier<Trust> {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now()));
        SvidClientVerifier::new(trust.clone(), clock, crate::provider())
    }

    fn verify(
        v: &SvidClientVerifier<Trust>,
        leaf: &CertificateDer<'_>,
    ) -> Result<(), rustls::Error> {
        v.verify_client_cert(leaf, &[], UnixTime::now()).map(drop)
    }

    #[test]
    fn admits_an_svid_of_the_bundle_in_force_unless_revoked() {
        let ca = TestCa::new("td.test");
        let client = ca.svid("/client");
        let trust = Arc::new(ArcSwap::from_pointee(Trust {
            bundle: ca.bundle(),
            revoked: Vec::new(),
        }));
        let v = verifier(&trust);
        assert!(v.client_auth_mandatory());
        verify(&v, &der(&client)).unwrap();

        trust.store(Arc::new(Trust {
            bundle: ca.bundle(),
            revoked: vec![client.serial.clone()],
        }));
        assert_eq!(
            verify(&v, &der(&client)),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        );

        // Another CA's bundle in force: the same certificate no longer chains.
        trust.store(Arc::new(Trust {
            bundle: TestCa::new("td.test").bundle(),
            revoked: Vec::new(),
        }));
        assert_eq!(
            verify(&v, &der(&client)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))
        );
    }

    #[test]
    fn refuses_a_foreign_trust_domain_and_garbage() {
        let ca = TestCa::new("td.test");
        let trust = Arc::new(ArcSwap::from_pointee(Trust {
            bundle: ca.bundle(),
            revoked: Vec::new(),
        }));
        let v = verifier(&trust);
        let foreign = TestCa::new("other.test").svid("/client");
        let refused = Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
        assert_eq!(verify(&v, &der(&foreign)), refused);
        assert_eq!(verify(&v, &CertificateDer::from(vec![0x30, 0x00])), refused);
    }

    #[test]
    fn the_deferred_verifier_asks_accepts_anything_and_leaves_the_chain_to_the_caller() {
        let v = DeferredClientVerifier::new(crate::provider());
        assert!(v.offer_client_auth());
        assert!(!v.client_auth_mandatory());
        let garbage = CertificateDer::from(vec![0x30, 0x00]);
        assert!(v.verify_client_cert(&garbage, &[], UnixTime::now()).is_ok());
        assert!(!v.supported_verify_schemes().is_empty());
    }
}
