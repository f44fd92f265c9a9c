//! What a peer's SVID is checked against.
use sigil_pki::{VerifiedX509Svid, X509Bundle};

/// The trust in force for a verifier: the trust domain's X.509 authorities and, for clients,
/// which SVIDs have been revoked since they were issued.
pub trait SvidTrust: Send + Sync + 'static {
    /// The X.509 authorities a peer's chain must lead to.
    fn x509_bundle(&self) -> &X509Bundle;

    /// Whether `svid`, whose chain verified, is revoked. Nothing is, unless said otherwise.
    fn is_revoked(&self, _svid: &VerifiedX509Svid) -> bool {
        false
    }
}

impl SvidTrust for X509Bundle {
    fn x509_bundle(&self) -> &X509Bundle {
        self
    }
}
