//! TLS to the server: the server must present the X.509-SVID `spiffe://<td>/sigil/server`
//! chaining to the trust bundle the agent holds; the agent presents its node SVID.
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sigil_core::SpiffeId;
use sigil_pki::{SvidUsage, X509Bundle, verify_x509_svid_for_usage};

/// Verifies the server as an X.509-SVID with one expected SPIFFE ID (no DNS names involved).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<ArcSwap<X509Bundle>>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain: Vec<&[u8]> = vec![end_entity.as_ref()];
        chain.extend(intermediates.iter().map(|c| c.as_ref()));
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let svid =
            verify_x509_svid_for_usage(&chain, &self.bundle.load(), now, SvidUsage::ServerAuth)
                .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if svid.spiffe_id != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented {}, expected {}",
                svid.spiffe_id, self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
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

/// A client config that trusts `bundle` for `expected` and presents `client` if given
/// (DER chain, PKCS#8 DER key).
pub fn client_config(
    bundle: Arc<ArcSwap<X509Bundle>>,
    expected: SpiffeId,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle,
        expected,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        Some((chain, key)) => builder.with_client_auth_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
