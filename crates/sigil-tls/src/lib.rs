//! rustls verifiers for SPIFFE X.509-SVIDs, shared by every sigil TLS endpoint: a client
//! verified at the handshake against the trust bundle and revocations in force, a client
//! whose chain is verified after the handshake, and a server that must be one SPIFFE ID.
//!
//! The chain and SVID rules are `sigil-pki`'s (`verify_x509_svid_for_usage`); this crate only
//! puts them where rustls asks. It does no I/O: what to trust is read from an
//! [`arc_swap::ArcSwap`] its owner updates, so a new bundle or revocation list applies to the
//! next handshake without a new rustls config.
#![forbid(unsafe_code)]

mod client;
mod present;
mod server;
mod signatures;
mod trust;

#[cfg(test)]
mod test_pki;

pub use client::{DeferredClientVerifier, SvidClientVerifier};
pub use present::PresentSvid;
pub use server::SvidServerVerifier;
pub use signatures::provider;
pub use trust::SvidTrust;
