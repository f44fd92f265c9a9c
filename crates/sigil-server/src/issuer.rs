//! Issuing identities: every credential is checked, signed, and durably recorded before it is
//! handed out.
use std::sync::Arc;

use sigil_core::{Clock, SpiffeId, TrustDomain, UnixTime};
use sigil_pki::{AccessTokenClaims, Confirmation, IssuedX509Svid, SvidSpec, parse_csr};
use sigil_store::{IdentityKind, IssuedIdentity, Store};

use crate::ServerError;
use crate::authority::Authorities;
use crate::issuance_log::IssuanceLog;

/// Why an issuance request is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CSR could not be parsed or its signature does not verify.
    #[error("bad CSR: {0}")]
    BadCsr(String),
    /// The CSR asks for an identity the caller is not entitled to.
    #[error("CSR requests {requested}, but the caller is entitled to {entitled}")]
    NotEntitled { requested: String, entitled: String },
    /// The request itself is malformed (e.g. no audience).
    #[error("{0}")]
    InvalidRequest(String),
    /// Something on our side failed; nothing was handed out.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Signs credentials with the active keys and records each one before returning it.
pub struct Issuer {
    log: IssuanceLog,
    authorities: Arc<Authorities>,
    clock: Arc<dyn Clock>,
    trust_domain: TrustDomain,
}

impl Issuer {
    pub fn new(
        store: Arc<dyn Store>,
        authorities: Arc<Authorities>,
        clock: Arc<dyn Clock>,
        trust_domain: TrustDomain,
    ) -> Self {
        Self {
            log: IssuanceLog::start(store),
            authorities,
            clock,
            trust_domain,
        }
    }

    /// Appends the leaf of an admin change to the transparency log; returns once it is
    /// durable (group-committed with issuance records).
    pub async fn log_change(&self, change: sigil_log::ChangeRecord) -> Result<(), ServerError> {
        self.log
            .append(sigil_log::LogRecord::Change(Box::new(change)))
            .await
            .map_err(ServerError::from)
    }

    /// The current time.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Signs an X.509-SVID for `spec` from a DER CSR. The CSR must be self-signed by its key
    /// and may only ask for `spec.spiffe_id` (or for nothing, in which case it gets it).
    pub async fn sign_x509_svid(
        &self,
        csr_der: &[u8],
        spec: SvidSpec,
        requester: &str,
    ) -> Result<IssuedX509Svid, IssueError> {
        let csr = parse_csr(csr_der).map_err(|e| IssueError::BadCsr(e.to_string()))?;
        for requested in csr.requested_spiffe_ids() {
            if requested != spec.spiffe_id.as_str() {
                return Err(IssueError::NotEntitled {
                    requested,
                    entitled: spec.spiffe_id.to_string(),
                });
            }
        }
        if !spec.spiffe_id.is_member_of(&self.trust_domain) {
            return Err(IssueError::NotEntitled {
                requested: spec.spiffe_id.to_string(),
                entitled: format!("an ID in {}", self.trust_domain),
            });
        }
        let now = self.clock.now();
        let set = self.authorities.current();
        let svid = set
            .ca
            .sign_x509_svid(&csr, &spec, now)
            .map_err(|e| IssueError::Server(e.into()))?;
        // INVARIANT: recorded durably before it is returned (`record` waits for the commit).
        self.log
            .record(IssuedIdentity {
                kind: IdentityKind::X509Svid,
                serial_or_jti: svid.serial.clone(),
                spiffe_id: svid.spiffe_id.clone(),
                thumbprint: svid.sha256.clone(),
                audience: Vec::new(),
                issued_at: now,
                not_after: svid.not_after,
                requester: requester.to_owned(),
            })
            .await
            .map_err(ServerError::from)?;
        tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, requester, "issued X.509-SVID");
        Ok(svid)
    }

    /// Mints a JWT-SVID for `spiffe_id`.
    pub async fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl_secs: u32,
        requester: &str,
    ) -> Result<(String, UnixTime), IssueError> {
        if audience.is_empty() || audience.iter().any(|a| a.is_empty() || a.len() > 512) {
            return Err(IssueError::InvalidRequest(
                "a JWT-SVID needs at least one non-empty audience".into(),
            ));
        }
        let now = self.clock.now();
        let set = self.authorities.current();
        let (token, claims) = set
            .jwt
            .mint_jwt_svid(spiffe_id, audience, ttl_secs, now)
            .map_err(|e| IssueError::Server(e.into()))?;
        let jti = claims.jti.clone().unwrap_or_default();
        self.log
            .record(IssuedIdentity {
                kind: IdentityKind::JwtSvid,
                serial_or_jti: jti.clone(),
                spiffe_id: spiffe_id.clone(),
                thumbprint: String::new(),
                audience: audience.to_vec(),
                issued_at: now,
                not_after: claims.exp,
                requester: requester.to_owned(),
            })
            .await
            .map_err(ServerError::from)?;
        tracing::info!(spiffe_id = %spiffe_id, jti = %jti, requester, "issued JWT-SVID");
        Ok((token, claims.exp))
    }

    /// Mints a certificate-bound OAuth access token (RFC 9068 shape, RFC 8705 `cnf`).
    #[allow(clippy::too_many_arguments)]
    pub async fn mint_access_token(
        &self,
        issuer: &str,
        client: &SpiffeId,
        audience: &str,
        scopes: &[String],
        groups: &[String],
        x5t_s256: &str,
        ttl_secs: u32,
    ) -> Result<(String, AccessTokenClaims), IssueError> {
        let now = self.clock.now();
        let claims = AccessTokenClaims {
            groups: groups.to_vec(),
            iss: issuer.to_owned(),
            sub: client.to_string(),
            aud: vec![audience.to_owned()],
            client_id: client.to_string(),
            scope: scopes.join(" "),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            nbf: Some(now),
            exp: now + i64::from(ttl_secs),
            cnf: Confirmation {
                x5t_s256: x5t_s256.to_owned(),
            },
        };
        let set = self.authorities.current();
        let token = set
            .jwt
            .mint_access_token(&claims)
            .map_err(|e| IssueError::Server(e.into()))?;
        self.log
            .record(IssuedIdentity {
                kind: IdentityKind::AccessToken,
                serial_or_jti: claims.jti.clone(),
                spiffe_id: client.clone(),
                thumbprint: x5t_s256.to_owned(),
                audience: claims.aud.clone(),
                issued_at: now,
                not_after: claims.exp,
                requester: client.to_string(),
            })
            .await
            .map_err(ServerError::from)?;
        tracing::info!(client = %client, jti = %claims.jti, scope = %claims.scope, "issued access token");
        Ok((token, claims))
    }
}
