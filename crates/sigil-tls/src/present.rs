//! What a client presents: its own SVID, whatever the server hints.
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;

/// Presents one SVID (chain and key) as the client certificate of every handshake.
#[derive(Debug)]
pub struct PresentSvid(pub Arc<CertifiedKey>);

impl ResolvesClientCert for PresentSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
