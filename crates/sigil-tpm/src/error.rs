//! Why an attestation was refused, and why the device could not produce evidence.

/// Why the server refused a TPM attestation. Every variant is a refusal: nothing here is
/// retried with the same evidence.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The EK certificate does not parse, is not an RSA EK, or does not chain to a
    /// configured manufacturer root.
    #[error("EK certificate refused: {0}")]
    EkCertificate(String),
    /// The attestation key's public area does not parse or lacks a required attribute.
    #[error("attestation key refused: {0}")]
    AttestationKey(String),
    /// The secret returned by the device is not the one sealed to its EK: the AK and the EK
    /// are not in the same TPM.
    #[error("credential activation failed: the attestation key is not in the TPM of the EK")]
    CredentialActivation,
    /// The challenge was answered too late.
    #[error("the challenge has expired")]
    ChallengeExpired,
    /// The quote does not parse, its signature does not verify with the AK, or it covers
    /// other PCRs than asked.
    #[error("quote refused: {0}")]
    Quote(String),
    /// The quote's qualifying data is not H(nonce || H(CSR public key)): an old nonce, or a
    /// quote made for another key.
    #[error("quote refused: its qualifying data binds another nonce or CSR key")]
    QualifyingData,
    /// The event log does not parse, or does not replay to the quoted PCR values.
    #[error("event log refused: {0}")]
    EventLog(String),
    /// The replayed boot state does not satisfy the boot policy.
    #[error("boot policy refused: {0}")]
    BootPolicy(String),
    /// The server's configuration (roots, PCR selection) is unusable.
    #[error("TPM attestation configuration: {0}")]
    Config(String),
    /// A cryptographic primitive failed (not the evidence's fault).
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}

/// Why the device could not produce attestation evidence.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The TCTI string does not parse.
    #[error("bad TCTI {tcti:?}: {reason}")]
    Tcti { tcti: String, reason: String },
    /// A TPM command failed.
    #[error("TPM {op} failed: {source}")]
    Tpm {
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM holds no EK certificate at the RSA 2048 index.
    #[error("the TPM holds no RSA EK certificate in NV")]
    NoEkCertificate,
    /// The event log could not be read.
    #[error("reading the event log {path}: {source}")]
    EventLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl DeviceError {
    pub(crate) fn tpm(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> Self {
        move |source| Self::Tpm { op, source }
    }
}
