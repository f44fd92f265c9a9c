//! Node attestation: how an agent proves its device to the server the first time. Each
//! method is a [`NodeAttestor`]; the join token is the first, a TPM attestor plugs in beside it.
use sigil_proto::node::v1 as pb;
use sigil_proto::node::v1::node_client::NodeClient;
use tonic::transport::Channel;

/// Why attestation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// The server refused the evidence (unknown, expired or spent token...): retrying the
    /// same evidence cannot succeed.
    #[error("{0}")]
    Refused(String),
    /// The server could not be reached or failed: worth retrying.
    #[error("{0}")]
    Transient(String),
}

/// Proves this device to the server and obtains its node SVID for `csr`.
#[tonic::async_trait]
pub trait NodeAttestor: Send + Sync {
    /// The attestation type, for logs (e.g. `join_token`).
    fn kind(&self) -> &'static str;

    /// Runs the attestation exchange over `client` (TLS to the server, no client cert).
    async fn attest(
        &self,
        client: &mut NodeClient<Channel>,
        csr: Vec<u8>,
    ) -> Result<pb::X509SvidResponse, AttestationError>;
}

/// Attestation with a single-use join token from `sigil jointoken create`.
pub struct JoinTokenAttestor {
    token: String,
}

impl JoinTokenAttestor {
    pub fn new(token: String) -> Self {
        Self { token }
    }
}

impl std::fmt::Debug for JoinTokenAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str("JoinTokenAttestor { .. }")
    }
}

#[tonic::async_trait]
impl NodeAttestor for JoinTokenAttestor {
    fn kind(&self) -> &'static str {
        "join_token"
    }

    async fn attest(
        &self,
        client: &mut NodeClient<Channel>,
        csr: Vec<u8>,
    ) -> Result<pb::X509SvidResponse, AttestationError> {
        let resp = client
            .attest(pb::AttestRequest {
                join_token: self.token.clone(),
                csr,
                tpm: None,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                    AttestationError::Refused(s.message().to_owned())
                }
                _ => AttestationError::Transient(format!("{}: {}", s.code(), s.message())),
            })?
            .into_inner();
        resp.svid
            .ok_or_else(|| AttestationError::Transient("empty attestation response".into()))
    }
}

/// Attestation with the node's TPM 2.0: the EK certificate says which TPM (hence which
/// board), credential activation ties the attestation key to it, and a quote of the PCRs
/// with the event log says what it booted. Not single use: the TPM can answer any number of
/// challenges, so a node re-attests after losing its identity (or its agent's data).
#[derive(Debug, Clone)]
pub struct TpmAttestor {
    tcti: String,
    event_log: std::path::PathBuf,
}

impl TpmAttestor {
    pub fn new(tcti: String, event_log: std::path::PathBuf) -> Self {
        Self { tcti, event_log }
    }

    /// Runs one TPM challenge over `client` for the node key of `csr`: the evidence for an
    /// attestation or a renewal.
    pub async fn evidence(
        &self,
        client: &mut NodeClient<Channel>,
        csr: &[u8],
    ) -> Result<pb::TpmEvidence, AttestationError> {
        let csr_key = sigil_pki::parse_csr(csr)
            .map_err(|e| AttestationError::Transient(format!("own CSR: {e}")))?
            .public_key_der()
            .to_vec();
        // The TPM stack blocks: every TPM command runs off the async runtime.
        let tcti = self.tcti.clone();
        let (mut device, ek_certificate, ek_public, ak_public) = joined(
            tokio::task::spawn_blocking(move || {
                let mut d = sigil_tpm::TpmDevice::open(&tcti)?;
                // A TPM without an EK certificate in NV sends its EK public area instead;
                // the server accepts it only if an administrator pinned its hash.
                let (cert, public) = match d.ek_certificate() {
                    Ok(cert) => (cert, Vec::new()),
                    Err(sigil_tpm::DeviceError::NoEkCertificate) => {
                        tracing::info!("no EK certificate in the TPM: sending the EK public key");
                        (Vec::new(), d.ek_public()?)
                    }
                    Err(e) => return Err(e),
                };
                let ak = d.ak_public().to_vec();
                Ok::<_, sigil_tpm::DeviceError>((d, cert, public, ak))
            })
            .await,
        )?
        .map_err(refused_by_tpm)?;
        let challenge = client
            .begin_tpm_attestation(pb::TpmAttestationRequest {
                ek_certificate,
                ak_public,
                ek_public,
            })
            .await
            .map_err(from_status)?
            .into_inner();
        let pcrs = challenge
            .pcrs
            .iter()
            .map(|p| {
                u8::try_from(*p)
                    .ok()
                    .filter(|p| usize::from(*p) < sigil_tpm::PCR_COUNT)
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| AttestationError::Refused("the server asked for a bad PCR".into()))?;
        let qd = sigil_tpm::qualifying_data(&challenge.nonce, &csr_key);
        let log_path = self.event_log.display().to_string();
        let (blob, secret) = (
            challenge.credential_blob.clone(),
            challenge.encrypted_secret.clone(),
        );
        let (activated, quote, signature, event_log) = joined(
            tokio::task::spawn_blocking(move || {
                let activated = device.activate_credential(&blob, &secret)?;
                let (quote, signature) = device.quote(&qd, &pcrs)?;
                let log = sigil_tpm::read_event_log(&log_path)?;
                Ok::<_, sigil_tpm::DeviceError>((activated, quote, signature, log))
            })
            .await,
        )?
        .map_err(refused_by_tpm)?;
        Ok(pb::TpmEvidence {
            challenge_id: challenge.challenge_id,
            activated_credential: activated,
            quote,
            quote_signature: signature,
            event_log,
        })
    }
}

fn refused_by_tpm(e: sigil_tpm::DeviceError) -> AttestationError {
    AttestationError::Refused(format!("TPM: {e}"))
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, AttestationError> {
    r.map_err(|e| AttestationError::Transient(format!("TPM task: {e}")))
}

fn from_status(s: tonic::Status) -> AttestationError {
    match s.code() {
        tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition => AttestationError::Refused(s.message().to_owned()),
        _ => AttestationError::Transient(format!("{}: {}", s.code(), s.message())),
    }
}

#[tonic::async_trait]
impl NodeAttestor for TpmAttestor {
    fn kind(&self) -> &'static str {
        "tpm"
    }

    async fn attest(
        &self,
        client: &mut NodeClient<Channel>,
        csr: Vec<u8>,
    ) -> Result<pb::X509SvidResponse, AttestationError> {
        let evidence = self.evidence(client, &csr).await?;
        let resp = client
            .attest(pb::AttestRequest {
                join_token: String::new(),
                csr,
                tpm: Some(evidence),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        resp.svid
            .ok_or_else(|| AttestationError::Transient("empty attestation response".into()))
    }
}
