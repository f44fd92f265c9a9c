//! Inbound mTLS: a client certificate is required and must verify as an X.509-SVID of the
//! trust domain, against the bundle in force at handshake time.
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DistinguishedName, SignatureScheme};
use sigil_core::Clock;
use sigil_pki::verify_x509_svid;

use crate::Credentials;

/// The crypto provider of every proxy TLS endpoint.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

struct SvidClientVerifier {
    creds: Arc<ArcSwap<Credentials>>,
    clock: Arc<dyn Clock>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("trust_domain", &self.x509.trust_domain)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidClientVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain: Vec<&[u8]> = vec![end_entity.as_ref()];
        chain.extend(intermediates.iter().map(|c| c.as_ref()));
        let creds = self.creds.load();
        let svid = verify_x509_svid(&chain, &creds.x509, self.clock.now()).map_err(|e| {
            tracing::info!(error = %e, "client certificate refused");
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        })?;
        if creds.revoked.is_revoked(&svid) {
            tracing::info!(spiffe_id = %svid.spiffe_id, serial = svid.serial, "client certificate revoked");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct CurrentCert(Arc<ArcSwap<Credentials>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().serving.clone())
    }
}

/// The proxy's rustls server config: client SVID required, certificate from `creds`.
pub fn server_config(
    creds: Arc<ArcSwap<Credentials>>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let verifier = Arc::new(SvidClientVerifier {
        creds: creds.clone(),
        clock,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(creds)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
