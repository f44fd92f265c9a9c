//! TLS to the server: the server must present the X.509-SVID `spiffe://<td>/sigil/server`
//! chaining to the trust bundle the agent holds; the agent presents its node SVID.
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_core::SpiffeId;
use sigil_pki::X509Bundle;
use sigil_tls::SvidServerVerifier;

/// A client config that trusts `bundle` for `expected` and presents `client` if given
/// (DER chain, PKCS#8 DER key).
pub fn client_config(
    bundle: Arc<ArcSwap<X509Bundle>>,
    expected: SpiffeId,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = sigil_tls::provider();
    let verifier = Arc::new(SvidServerVerifier::new(bundle, expected, provider.clone()));
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
