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
