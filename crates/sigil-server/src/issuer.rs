//! Issuing identities: every credential is checked, signed, and durably recorded before it is
//! handed out.
use std::sync::Arc;

use sigil_core::{Clock, SpiffeId, TrustDomain, UnixTime};
use sigil_pki::{AccessTokenClaims, Actor, Confirmation, IssuedX509Svid, SvidSpec, parse_csr};
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
        self.grant(Grant {
            issuer,
            client,
            subject: None,
            audience,
            scopes,
            groups,
            cnf: Confirmation {
                x5t_s256: x5t_s256.to_owned(),
                jkt: None,
            },
            ttl_secs,
            not_after: None,
            delegation: None,
            risk: None,
        })
        .await
    }

    /// Mints an access token for `g`, recorded (and, for a token exchange, the exchange
    /// appended to the transparency log) before it is returned.
    pub async fn grant(&self, g: Grant<'_>) -> Result<(String, AccessTokenClaims), IssueError> {
        let now = self.clock.now();
        let mut exp = now.saturating_add(i64::from(g.ttl_secs));
        if let Some(cap) = g.not_after {
            exp = exp.min(cap);
        }
        if exp <= now {
            return Err(IssueError::InvalidRequest(
                "the subject token has no lifetime left".into(),
            ));
        }
        let (act, user_groups) = match &g.delegation {
            Some(d) => (Actor::from_chain(&d.chain), d.user_groups.clone()),
            None => (None, Vec::new()),
        };
        let claims = AccessTokenClaims {
            groups: g.groups.to_vec(),
            iss: g.issuer.to_owned(),
            sub: g.subject.unwrap_or(g.client.as_str()).to_owned(),
            aud: vec![g.audience.to_owned()],
            client_id: g.client.to_string(),
            scope: g.scopes.join(" "),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            nbf: Some(now),
            exp,
            cnf: g.cnf,
            act,
            user_groups,
            risk: g.risk,
        };
        let set = self.authorities.current();
        let token = set
            .jwt
            .mint_access_token(&claims)
            .map_err(|e| IssueError::Server(e.into()))?;
        let thumbprint = claims
            .cnf
            .jkt
            .clone()
            .unwrap_or_else(|| claims.cnf.x5t_s256.clone());
        let exchange = g.delegation.as_ref().map(|d| {
            let mut change = sigil_log::ChangeRecord::new("token-exchange", now);
            change.actors = Some(d.chain.clone());
            change.jti = Some(claims.jti.clone());
            change.not_after = Some(claims.exp);
            change.spiffe_id = Some(g.client.to_string());
            change.subject = Some(claims.sub.clone());
            change.subject_issuer = Some(d.subject_issuer.clone());
            change.token_sha256 = Some(d.subject_token_sha256.clone());
            change
        });
        let record = self.log.record(IssuedIdentity {
            kind: IdentityKind::AccessToken,
            serial_or_jti: claims.jti.clone(),
            spiffe_id: g.client.clone(),
            thumbprint,
            audience: claims.aud.clone(),
            issued_at: now,
            not_after: claims.exp,
            requester: g.client.to_string(),
        });
        // INVARIANT: the token and, for an exchange, who acts for whom are durable in the
        // transparency log before the token is returned. Both are submitted at once, so the
        // group-commit writer usually makes them durable in one commit.
        let logged = async {
            match exchange {
                Some(change) => self.log_change(change).await,
                None => Ok(()),
            }
        };
        let (recorded, logged) = tokio::join!(record, logged);
        recorded.map_err(ServerError::from)?;
        logged?;
        tracing::info!(client = %g.client, sub = %claims.sub, jti = %claims.jti, scope = %claims.scope, delegated = g.delegation.is_some(), "issued access token");
        Ok((token, claims))
    }
}

/// What an access token is issued for.
pub struct Grant<'a> {
    /// The authorization server's issuer URL.
    pub issuer: &'a str,
    /// The workload the token is issued to (`client_id`).
    pub client: &'a SpiffeId,
    /// `sub` when it is not the client (a user, in a delegated token).
    pub subject: Option<&'a str>,
    pub audience: &'a str,
    pub scopes: &'a [String],
    /// The client's groups.
    pub groups: &'a [String],
    pub cnf: Confirmation,
    pub ttl_secs: u32,
    /// The token expires no later than this (the subject token's `exp`).
    pub not_after: Option<UnixTime>,
    /// For a token exchange: who acts for whom.
    pub delegation: Option<DelegationGrant>,
    /// The client's node's risk (the `risk` claim).
    pub risk: Option<sigil_pki::RiskClaim>,
}

/// The delegation a token exchange grants.
pub struct DelegationGrant {
    /// The actors, the client (the current one) first.
    pub chain: Vec<String>,
    pub user_groups: Vec<String>,
    /// The issuer of the user's original token.
    pub subject_issuer: String,
    /// SHA-256 (hex) of the subject token that was exchanged.
    pub subject_token_sha256: String,
}
