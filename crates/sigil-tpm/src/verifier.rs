//! One attestation, server side: the challenge (credential sealed to the EK for the AK, and
//! a nonce), then the checks of the device's answer, in the order that makes each one mean
//! something — the AK is in the EK's TPM, so its quote speaks for that TPM; the quote is
//! fresh and bound to the node key; the log explains the quoted PCRs; the policy accepts what
//! the log says.
use std::collections::{BTreeMap, BTreeSet};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

use crate::ak::{AttestationKey, check_ak_public};
use crate::credential::{SealedCredential, make_credential};
use crate::ek::{EkRoots, Endorsement, verify_ek_certificate, verify_ek_public};
use crate::error::VerifyError;
use crate::eventlog::{PCR_COUNT, parse_event_log};
use crate::quote::{qualifying_data, verify_quote};

/// The PCRs quoted when none are configured: the firmware's (0–7).
pub const DEFAULT_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
/// How long a challenge may be answered, when not configured.
pub const DEFAULT_CHALLENGE_TTL_SECS: u64 = 60;

/// What the server requires of a TPM node.
#[derive(Debug, Clone)]
pub struct TpmPolicy {
    /// The manufacturers' CAs an EK certificate must chain to.
    pub roots: EkRoots,
    /// The SHA-256 PCRs the quote must cover.
    pub pcrs: Vec<u8>,
    /// Refuse a node whose log does not show Secure Boot enabled.
    pub require_secure_boot: bool,
    /// PCR values a node must have (index → SHA-256 value).
    pub golden_pcrs: BTreeMap<u8, [u8; 32]>,
    /// EKs accepted without a certificate: SHA-256 of their SubjectPublicKeyInfo,
    /// lowercase hex, pinned by an administrator.
    pub ek_hashes: BTreeSet<String>,
    /// How long a challenge may be answered.
    pub challenge_ttl_secs: u64,
}

impl TpmPolicy {
    /// A policy with the default PCRs and TTL, no Secure Boot or golden-value requirement.
    pub fn new(roots: EkRoots) -> Self {
        Self {
            roots,
            pcrs: DEFAULT_PCRS.to_vec(),
            require_secure_boot: false,
            golden_pcrs: BTreeMap::new(),
            ek_hashes: BTreeSet::new(),
            challenge_ttl_secs: DEFAULT_CHALLENGE_TTL_SECS,
        }
    }

    /// Refuses PCR indices out of range, an empty selection, and golden values for PCRs the
    /// quote does not cover (they could never be checked).
    pub fn validate(&self) -> Result<(), VerifyError> {
        if self.pcrs.is_empty() {
            return Err(VerifyError::Config("no PCRs to quote".into()));
        }
        if let Some(p) = self.pcrs.iter().find(|p| usize::from(**p) >= PCR_COUNT) {
            return Err(VerifyError::Config(format!("PCR {p} out of range")));
        }
        if let Some(p) = self.golden_pcrs.keys().find(|p| !self.pcrs.contains(p)) {
            return Err(VerifyError::Config(format!(
                "golden value for PCR {p}, which is not quoted"
            )));
        }
        Ok(())
    }
}

/// What the server sends the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The credential sealed to the EK for the AK.
    pub sealed: SealedCredential,
    /// The nonce the quote's qualifying data must bind.
    pub nonce: [u8; 32],
    /// The PCRs to quote.
    pub pcrs: Vec<u8>,
}

/// The server's half of one attestation, kept (once, briefly) between challenge and answer.
#[derive(Clone)]
pub struct PendingAttestation {
    ek: Endorsement,
    ak: AttestationKey,
    nonce: [u8; 32],
    credential: [u8; 32],
    issued_at: u64,
}

impl std::fmt::Debug for PendingAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credential.
        f.debug_struct("PendingAttestation")
            .field("ek_hash", &self.ek.ek_hash)
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}

impl PendingAttestation {
    /// The device identity this attestation is about.
    pub fn ek_hash(&self) -> &str {
        &self.ek.ek_hash
    }

    /// When the challenge was made (Unix seconds).
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }
}

/// The device's answer.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    /// What TPM2_ActivateCredential returned.
    pub activated_credential: &'a [u8],
    /// The quote: TPMS_ATTEST as the TPM produced it.
    pub attest: &'a [u8],
    /// The quote's TPMT_SIGNATURE.
    pub signature: &'a [u8],
    /// The TCG event log.
    pub event_log: &'a [u8],
}

/// A node that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// SHA-256 of the EK public key (SubjectPublicKeyInfo DER), lowercase hex.
    pub ek_hash: String,
    /// Whether the log shows Secure Boot enabled.
    pub secure_boot: bool,
    /// `tpm:ek_hash:…`, `tpm:secureboot:…`, and `tpm:pcr:<i>:…` for each quoted PCR.
    pub selectors: Vec<String>,
}

fn random32() -> Result<[u8; 32], VerifyError> {
    let mut b = [0u8; 32];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| VerifyError::Crypto("random"))?;
    Ok(b)
}

/// Checks the EK certificate and the AK public area, and makes the challenge.
pub fn begin_attestation(
    policy: &TpmPolicy,
    ek_cert_der: &[u8],
    ak_public: &[u8],
    now: u64,
) -> Result<(Challenge, PendingAttestation), VerifyError> {
    let ek = verify_ek_certificate(ek_cert_der, &policy.roots, now)?;
    challenge_for(policy, ek, ak_public, now)
}

/// [`begin_attestation`] for a TPM without an EK certificate: its EK public area
/// (TPMT_PUBLIC), accepted only if its hash is one of the policy's pinned `ek_hashes`.
pub fn begin_attestation_pinned(
    policy: &TpmPolicy,
    ek_public: &[u8],
    ak_public: &[u8],
    now: u64,
) -> Result<(Challenge, PendingAttestation), VerifyError> {
    let ek = verify_ek_public(ek_public, &policy.ek_hashes)?;
    challenge_for(policy, ek, ak_public, now)
}

fn challenge_for(
    policy: &TpmPolicy,
    ek: Endorsement,
    ak_public: &[u8],
    now: u64,
) -> Result<(Challenge, PendingAttestation), VerifyError> {
    let ak = check_ak_public(ak_public)?;
    let credential = random32()?;
    let nonce = random32()?;
    let sealed = make_credential(&ek, &ak, &credential)?;
    Ok((
        Challenge {
            sealed,
            nonce,
            pcrs: policy.pcrs.clone(),
        },
        PendingAttestation {
            ek,
            ak,
            nonce,
            credential,
            issued_at: now,
        },
    ))
}

/// Checks the device's answer to `pending` for the node key `csr_public_key_der`.
pub fn finish_attestation(
    policy: &TpmPolicy,
    pending: &PendingAttestation,
    evidence: &Evidence<'_>,
    csr_public_key_der: &[u8],
    now: u64,
) -> Result<AttestedNode, VerifyError> {
    if now.saturating_sub(pending.issued_at) > policy.challenge_ttl_secs {
        return Err(VerifyError::ChallengeExpired);
    }
    aws_lc_rs::constant_time::verify_slices_are_equal(
        evidence.activated_credential,
        &pending.credential,
    )
    .map_err(|_| VerifyError::CredentialActivation)?;

    let qd = qualifying_data(&pending.nonce, csr_public_key_der);
    let quoted = verify_quote(
        &pending.ak,
        evidence.attest,
        evidence.signature,
        &qd,
        &policy.pcrs,
    )?;

    let state = parse_event_log(evidence.event_log)?.replay()?;
    let mut pcrs = policy.pcrs.clone();
    pcrs.sort_unstable();
    pcrs.dedup();
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    for p in &pcrs {
        let v = state
            .pcrs
            .get(usize::from(*p))
            .ok_or_else(|| VerifyError::Config(format!("PCR {p} out of range")))?;
        sha2::Digest::update(&mut h, v);
    }
    let replayed: [u8; 32] = sha2::Digest::finalize(h).into();
    if replayed.as_slice() != quoted.digest.as_slice() {
        return Err(VerifyError::EventLog(
            "the log does not replay to the quoted PCRs".into(),
        ));
    }

    let secure_boot = state.secure_boot == Some(true);
    if policy.require_secure_boot && !secure_boot {
        return Err(VerifyError::BootPolicy("Secure Boot is not enabled".into()));
    }
    for (p, want) in &policy.golden_pcrs {
        let got = state.pcrs.get(usize::from(*p));
        if got != Some(want) {
            return Err(VerifyError::BootPolicy(format!(
                "PCR {p} is not its golden value"
            )));
        }
    }

    let mut selectors = vec![
        format!("tpm:ek_hash:{}", pending.ek.ek_hash),
        format!("tpm:secureboot:{secure_boot}"),
    ];
    for p in &pcrs {
        if let Some(v) = state.pcrs.get(usize::from(*p)) {
            selectors.push(format!("tpm:pcr:{p}:{}", hex::encode(v)));
        }
    }
    Ok(AttestedNode {
        ek_hash: pending.ek.ek_hash.clone(),
        secure_boot,
        selectors,
    })
}
