//! The three error enums of this crate: minting/loading (`PkiError`), X.509-SVID validation
//! (`SvidError`) and JWT validation (`JwtError`).

/// Why a key, CA, CSR, bundle or credential could not be loaded or minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The key or signature algorithm is not one sigil supports.
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// A private or public key could not be parsed or generated.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A certificate could not be parsed or is unusable.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// The certificate given as a CA is not a CA (basicConstraints CA:true, keyCertSign).
    #[error("certificate is not a CA: {0}")]
    NotACa(&'static str),
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// The CSR is larger than the limit.
    #[error("CSR is larger than {max} bytes")]
    CsrTooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// The CSR is not a well-formed PKCS#10 request.
    #[error("malformed CSR: {0}")]
    CsrMalformed(String),
    /// The CSR's self-signature does not verify: the requester did not prove key possession.
    #[error("CSR signature does not verify")]
    CsrBadSignature,
    /// The CSR's public key is of a type sigil does not certify.
    #[error("unsupported CSR key: {0}")]
    UnsupportedCsrKey(String),
    /// A TTL of zero or one that overflows time.
    #[error("invalid TTL: {0}")]
    InvalidTtl(&'static str),
    /// The signing CA has expired (or is not valid at `now`).
    #[error("the CA is not valid at this time")]
    CaExpired,
    /// The SPIFFE ID belongs to a trust domain other than the CA's.
    #[error("SPIFFE ID {id} is not in the CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The requested ID.
        id: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The SPIFFE ID is a bare trust domain ID, which names the trust domain, not a workload.
    #[error("SPIFFE ID {0} has no path: a trust domain ID cannot be a workload identity")]
    NotAWorkloadId(String),
    /// A DNS name is not valid for a SAN.
    #[error("invalid DNS name: {0}")]
    InvalidDnsName(String),
    /// A JWT needs at least one audience, and none may be empty.
    #[error("JWT audience must be non-empty")]
    EmptyAudience,
    /// A required JWT claim value is empty.
    #[error("claim {0} must not be empty")]
    EmptyClaim(&'static str),
    /// Signing failed inside the crypto library.
    #[error("signing failed: {0}")]
    Signing(String),
    /// PEM input is malformed or has the wrong label.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// A trust bundle document is malformed.
    #[error("bad trust bundle: {0}")]
    Bundle(String),
    /// A JWK is malformed or unusable.
    #[error("bad JWK: {0}")]
    Jwk(String),
}

/// Why a presented X.509-SVID chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The chain is empty, too long, or a certificate is not valid DER.
    #[error("malformed certificate chain: {0}")]
    Malformed(String),
    /// No path to a bundle authority, a bad signature, or a constraint violation.
    #[error("untrusted chain: {0}")]
    UntrustedChain(String),
    /// A certificate in the path has expired.
    #[error("certificate has expired")]
    Expired,
    /// A certificate in the path is not valid yet.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// The leaf has no URI SAN.
    #[error("leaf has no URI SAN (no SPIFFE ID)")]
    NoSpiffeId,
    /// The leaf has more than one URI SAN; an X.509-SVID has exactly one.
    #[error("leaf has more than one URI SAN")]
    MultipleUriSans,
    /// The leaf's URI SAN is not a valid SPIFFE ID.
    #[error("leaf URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(String),
    /// The SPIFFE ID is a bare trust domain ID.
    #[error("leaf SPIFFE ID {0} has no path")]
    NotAWorkloadId(String),
    /// The SPIFFE ID's trust domain is not the bundle's.
    #[error("SPIFFE ID {found} is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// The bundle's trust domain.
        expected: String,
        /// The leaf's SPIFFE ID.
        found: String,
    },
    /// The leaf is a CA certificate.
    #[error("leaf certificate is a CA")]
    LeafIsCa,
    /// The leaf's key usage is missing or wrong for an X.509-SVID.
    #[error("bad key usage: {0}")]
    BadKeyUsage(&'static str),
    /// The leaf's extended key usage does not allow the requested role.
    #[error("extended key usage does not allow this use")]
    WrongUsage,
}

/// Why a JWT (JWT-SVID or access token) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not a compact JWS of three base64url segments with JSON header and claims.
    #[error("malformed JWT: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not ES256 or EdDSA (e.g. `none`, HS256, RS256).
    #[error("unsupported JWT algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The header's `alg` is supported, but not the algorithm of the key named by `kid`.
    #[error("JWT alg {header} does not match key algorithm {key}")]
    AlgorithmMismatch {
        /// From the header.
        header: String,
        /// The key's.
        key: &'static str,
    },
    /// The header has no `kid`.
    #[error("JWT header has no kid")]
    MissingKid,
    /// No key in the key set has this `kid`.
    #[error("unknown JWT key id {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("JWT signature does not verify")]
    BadSignature,
    /// `exp` is past (beyond leeway).
    #[error("JWT has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond leeway).
    #[error("JWT is not valid yet")]
    NotYetValid,
    /// `aud` does not contain the expected audience.
    #[error("JWT audience does not include the expected one")]
    WrongAudience,
    /// `iss` is not the expected issuer.
    #[error("JWT issuer is not the expected one")]
    WrongIssuer,
    /// The header's `typ` is wrong for this kind of token.
    #[error("JWT typ is wrong for this token kind")]
    WrongType,
    /// `sub` is not a SPIFFE ID in the expected trust domain.
    #[error("JWT subject is not acceptable: {0}")]
    BadSubject(String),
    /// A required claim is absent.
    #[error("JWT claim {0} is missing")]
    MissingClaim(&'static str),
    /// The header marks extensions critical (`crit`), which sigil does not implement.
    #[error("JWT header has crit extensions, which are not supported")]
    UnsupportedCritical,
    /// The token's certificate binding (`cnf.x5t#S256`) does not match the presented certificate.
    #[error("access token is bound to a different certificate")]
    CertificateMismatch,
}
