//! TPM 2.0 node attestation on the node API: the challenges handed out and not yet answered
//! (single use, short-lived, bounded in number), and the mapping of the verifier's verdicts
//! to gRPC statuses. The verification itself is `sigil-tpm`'s.
use std::collections::HashMap;
use std::sync::Mutex;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use sigil_core::{SpiffeId, TrustDomain, UnixTime};
use sigil_proto::node::v1 as pb;
use sigil_tpm::{
    AttestedNode, EkRoots, Evidence, PendingAttestation, TpmPolicy, VerifyError, begin_attestation,
    begin_attestation_pinned, finish_attestation,
};
use tonic::Status;

use crate::config::{ConfigError, ServerConfig};

/// Most challenges outstanding at once: a flood of BeginTpmAttestation calls cannot grow
/// the server's memory past this.
const MAX_PENDING: usize = 4096;

/// The SPIFFE ID path prefix of TPM-attested nodes; the EK hash follows.
pub const TPM_NODE_PATH: &str = "/sigil/node/tpm/";

/// TPM attestation, when configured.
pub struct TpmAttestation {
    policy: TpmPolicy,
    pending: Mutex<HashMap<String, PendingAttestation>>,
}

impl std::fmt::Debug for TpmAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmAttestation")
            .field("pcrs", &self.policy.pcrs)
            .finish_non_exhaustive()
    }
}

/// The node SPIFFE ID of the TPM whose EK public key hashes to `ek_hash`: the same for as
/// long as the TPM is the same, whatever happens to the agent.
pub fn node_id_for_ek(td: &TrustDomain, ek_hash: &str) -> Result<SpiffeId, Status> {
    td.id(&format!("{TPM_NODE_PATH}{ek_hash}"))
        .map_err(|e| Status::internal(e.to_string()))
}

impl TpmAttestation {
    /// From the configuration: `None` when neither `tpm_ek_roots` nor `tpm_ek_hashes` is
    /// set. Reads the roots file.
    pub fn from_config(cfg: &ServerConfig) -> Result<Option<Self>, ConfigError> {
        let roots = match &cfg.tpm_ek_roots {
            None if cfg.tpm_ek_hashes.is_empty() => return Ok(None),
            None => EkRoots::none(),
            Some(path) => {
                let bad = |message: String| ConfigError {
                    key: "tpm_ek_roots",
                    message,
                };
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("reading {}: {e}", path.display())))?;
                EkRoots::from_pem(&pem).map_err(|e| bad(e.to_string()))?
            }
        };
        let policy = TpmPolicy {
            pcrs: cfg.tpm_pcrs.clone(),
            require_secure_boot: cfg.tpm_require_secure_boot,
            golden_pcrs: cfg.golden_pcrs()?,
            ek_hashes: cfg
                .tpm_ek_hashes
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            ..TpmPolicy::new(roots)
        };
        policy.validate().map_err(|e| ConfigError {
            key: "tpm_pcrs",
            message: e.to_string(),
        })?;
        Ok(Some(Self {
            policy,
            pending: Mutex::new(HashMap::new()),
        }))
    }

    fn ttl(&self) -> i64 {
        i64::try_from(self.policy.challenge_ttl_secs).unwrap_or(i64::MAX)
    }

    /// Checks the EK (its certificate, or for a TPM without one its pinned public key) and
    /// the AK, and hands out a challenge.
    pub fn begin(
        &self,
        req: &pb::TpmAttestationRequest,
        now: UnixTime,
    ) -> Result<pb::TpmChallenge, Status> {
        let at = u64::try_from(now).unwrap_or(0);
        let begun = if req.ek_certificate.is_empty() && !req.ek_public.is_empty() {
            begin_attestation_pinned(&self.policy, &req.ek_public, &req.ak_public, at)
        } else {
            begin_attestation(&self.policy, &req.ek_certificate, &req.ak_public, at)
        };
        let (challenge, pending) = begun.map_err(refusal)?;
        let mut id = [0u8; 16];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| Status::internal("internal error"))?;
        let id = hex::encode(id);
        {
            let mut map = self
                .pending
                .lock()
                .map_err(|_| Status::internal("internal error"))?;
            if map.len() >= MAX_PENDING {
                let ttl = self.ttl();
                map.retain(|_, p| now.saturating_sub(issued_at(p)) <= ttl);
            }
            if map.len() >= MAX_PENDING {
                return Err(Status::resource_exhausted(
                    "too many TPM challenges outstanding; retry shortly",
                ));
            }
            map.insert(id.clone(), pending);
        }
        Ok(pb::TpmChallenge {
            challenge_id: id,
            credential_blob: challenge.sealed.credential_blob,
            encrypted_secret: challenge.sealed.encrypted_secret,
            nonce: challenge.nonce.to_vec(),
            pcrs: challenge.pcrs.iter().map(|p| u32::from(*p)).collect(),
            ttl_secs: u32::try_from(self.policy.challenge_ttl_secs).unwrap_or(u32::MAX),
        })
    }

    /// Checks the answer to a challenge (which is spent, whatever the outcome) for the node
    /// key `csr_public_key_der`. An unknown or spent challenge is NOT_FOUND.
    pub fn finish(
        &self,
        evidence: &pb::TpmEvidence,
        csr_public_key_der: &[u8],
        now: UnixTime,
    ) -> Result<AttestedNode, Status> {
        let pending = self
            .pending
            .lock()
            .map_err(|_| Status::internal("internal error"))?
            .remove(&evidence.challenge_id)
            // NOT_FOUND, not PERMISSION_DENIED: a fresh challenge can succeed (e.g. after
            // this replica restarted between the two calls).
            .ok_or_else(|| Status::not_found("unknown or already answered TPM challenge"))?;
        finish_attestation(
            &self.policy,
            &pending,
            &Evidence {
                activated_credential: &evidence.activated_credential,
                attest: &evidence.quote,
                signature: &evidence.quote_signature,
                event_log: &evidence.event_log,
            },
            csr_public_key_der,
            u64::try_from(now).unwrap_or(0),
        )
        .map_err(refusal)
    }
}

fn issued_at(p: &PendingAttestation) -> i64 {
    i64::try_from(p.issued_at()).unwrap_or(i64::MAX)
}

/// A verifier refusal as a status: the evidence's fault is PERMISSION_DENIED (retrying it
/// cannot succeed), a server fault is INTERNAL.
fn refusal(e: VerifyError) -> Status {
    match e {
        VerifyError::Crypto(_) | VerifyError::Config(_) => {
            tracing::error!(error = %e, "TPM attestation failure");
            Status::internal("internal error")
        }
        e => {
            tracing::warn!(error = %e, "TPM attestation refused");
            Status::permission_denied(e.to_string())
        }
    }
}
