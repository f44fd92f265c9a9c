//! sigil's PKI: the CA, X.509-SVID and JWT-SVID minting and validation, OAuth access tokens
//! (RFC 9068, certificate-bound per RFC 8705 or DPoP-bound per RFC 9449, delegated per RFC
//! 8693), DPoP proofs, JWKS and SPIFFE trust bundles.
//!
//! This crate does no I/O: keys and certificates go in and out as PEM/DER bytes, and time is
//! passed in as `now`.
#![forbid(unsafe_code)]

mod bundle;
mod ca;
mod csr;
mod dpop;
mod error;
mod jwk;
mod jwt;
mod keys;
mod x509_verify;

pub use bundle::{MAX_BUNDLE_JSON_LEN, TrustBundle, USE_JWT_SVID, USE_SIGIL_POLICY, USE_X509_SVID};
pub use ca::{
    CA_BACKDATE_SECS, CertificateAuthority, IssuedX509Svid, MAX_DNS_NAMES, SVID_BACKDATE_SECS,
    SvidSpec,
};
pub use csr::{CsrKeyType, MAX_CSR_LEN, ParsedCsr, parse_csr, parse_csr_pem};
pub use dpop::{
    DPOP_ALGORITHMS, DpopCheck, DpopError, DpopProof, JtiCache, MAX_PROOF_LEN, ath_of,
    normalize_htu, verify_dpop_proof,
};
pub use error::{JwtError, PkiError, SvidError};
pub use jwk::{Jwk, JwtKeyRef, JwtKeySet};
pub use jwt::{
    ACCESS_TOKEN_TYP, AccessTokenClaims, Actor, Confirmation, JwtAlgorithm, JwtSigner,
    JwtSvidClaims, MAX_ACT_DEPTH, MAX_TOKEN_LEN, RiskClaim, validate_access_token,
    validate_access_token_keyed, validate_jwt_svid,
};
pub use keys::{KeyAlgorithm, KeyPair};
pub use x509_verify::{
    MAX_CERT_LEN, MAX_CHAIN_LEN, SvidUsage, VerifiedX509Svid, X509Bundle, split_der_certs,
    verify_x509_svid, verify_x509_svid_for_usage, x5t_s256,
};
