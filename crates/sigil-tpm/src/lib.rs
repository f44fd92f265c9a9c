//! TPM 2.0 node attestation: a device proves *what it is* (an EK certified by its TPM's
//! manufacturer) and *what it booted* (a quote of its PCRs, explained by the TCG event log).
//!
//! The server's half ([`begin_attestation`], [`finish_attestation`] and the checks they
//! compose) does no I/O: bytes and the time go in, a verdict comes out. The device's half
//! ([`TpmDevice`]) talks to a TPM through libtss2.
//!
//! The exchange:
//! 1. device → server: EK certificate, AK public area;
//! 2. server → device: a credential sealed to the EK for the AK (MakeCredential), a nonce;
//! 3. device → server: the activated credential (ActivateCredential: AK and EK share a
//!    TPM), a quote whose qualifying data is H(nonce || H(CSR public key)), the event log.
#![forbid(unsafe_code)]

mod ak;
mod credential;
mod device;
mod ek;
mod error;
mod eventlog;
mod quote;
mod verifier;

pub use ak::{AttestationKey, MAX_PUBLIC_LEN, check_ak_public};
pub use credential::{SealedCredential, make_credential};
pub use device::{DEFAULT_EVENT_LOG, DEFAULT_TCTI, TpmDevice, read_event_log};
pub use ek::{
    EkRoots, Endorsement, MAX_EK_CERT_LEN, ek_public_endorsement, verify_ek_certificate,
    verify_ek_public,
};
pub use error::{DeviceError, VerifyError};
pub use eventlog::{
    BootState, EventLog, EventLogBuilder, MAX_EVENT_LOG_LEN, PCR_COUNT, parse_event_log,
};
pub use quote::{MAX_QUOTE_LEN, QuotedPcrs, qualifying_data, verify_quote};
pub use verifier::{
    AttestedNode, Challenge, DEFAULT_CHALLENGE_TTL_SECS, DEFAULT_PCRS, Evidence,
    PendingAttestation, TpmPolicy, begin_attestation, begin_attestation_pinned, finish_attestation,
};
