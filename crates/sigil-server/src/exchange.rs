//! Token exchange (RFC 8693): a workload, authenticated by its X.509-SVID, trades a user's
//! token (from a configured OpenID provider, or a delegated sigil token one hop earlier) for
//! a token that acts for that user, bound to its own certificate, narrowed, decided by Cedar
//! (`act_for`) and logged.
//!
//! This module decides; the token endpoint (`public.rs`) reads the request and answers.
use std::collections::{BTreeSet, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sigil_core::SpiffeId;
use sigil_pki::{
    AccessTokenClaims, DpopCheck, DpopError, DpopProof, JtiCache, MAX_TOKEN_LEN,
    validate_access_token, verify_dpop_proof,
};
use sigil_policy::{Delegation, PolicyEngine, Principal, Query};
use sigil_store::{EntryFilter, Store};

use crate::config::{ExternalIssuer, ServerConfig};

/// The token types a subject token may be (RFC 8693 §3).
pub const SUBJECT_TOKEN_TYPES: &[&str] = &[
    "urn:ietf:params:oauth:token-type:access_token",
    "urn:ietf:params:oauth:token-type:jwt",
];

/// The grant type.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// Largest JWKS document fetched.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// How long a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a policy engine built from the stored bundle is used without looking again.
const ENGINE_MAX_AGE: Duration = Duration::from_secs(5);

/// Why an exchange is refused; each maps to one RFC 6749 §5.2 / RFC 8693 §2.2.2 error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// `invalid_request`: a parameter is missing or malformed.
    #[error("{0}")]
    InvalidRequest(String),
    /// `invalid_grant`: the subject token is not acceptable (issuer, signature, audience,
    /// expiry, chain length).
    #[error("{0}")]
    InvalidGrant(String),
    /// `invalid_scope`: nothing of what was asked remains after narrowing.
    #[error("{0}")]
    InvalidScope(String),
    /// `invalid_target`: a bad `resource`.
    #[error("{0}")]
    InvalidTarget(String),
    /// `invalid_client`: the actor has no registration entry.
    #[error("{0}")]
    InvalidClient(String),
    /// `unauthorized_client`: policy does not let this workload act for this user.
    #[error("{0}")]
    Unauthorized(String),
    /// `server_error`: nothing was issued.
    #[error("{0}")]
    Server(String),
}

impl ExchangeError {
    /// The OAuth `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidGrant(_) => "invalid_grant",
            Self::InvalidScope(_) => "invalid_scope",
            Self::InvalidTarget(_) => "invalid_target",
            Self::InvalidClient(_) => "invalid_client",
            Self::Unauthorized(_) => "unauthorized_client",
            Self::Server(_) => "server_error",
        }
    }
}

/// The user a subject token speaks for, and the chain it already went through.
#[derive(Debug, Clone)]
pub struct Subject {
    pub user: String,
    pub issuer: String,
    pub groups: Vec<String>,
    pub scopes: BTreeSet<String>,
    pub exp: i64,
    /// The actors so far, the latest first (empty for a user's own token).
    pub chain: Vec<String>,
}

/// What the exchange grants, before the token is minted.
#[derive(Debug)]
pub struct Decided {
    pub subject: Subject,
    /// The new chain: the actor first.
    pub chain: Vec<String>,
    pub scopes: Vec<String>,
    pub audience: String,
    /// The actor's groups (from its registration entries).
    pub actor_groups: Vec<String>,
}

/// The request's parameters that matter to an exchange.
pub struct ExchangeRequest<'a> {
    pub scope: Option<&'a str>,
    pub audience: Option<&'a str>,
}

/// One configured external issuer and its cached keys.
struct ExternalKeys {
    cfg: ExternalIssuer,
    algorithms: Vec<Algorithm>,
    cache: tokio::sync::Mutex<KeyCache>,
}

#[derive(Default)]
struct KeyCache {
    keys: Option<JwkSet>,
    fetched: Option<Instant>,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The token-exchange authority.
pub struct Exchange {
    issuers: Vec<ExternalKeys>,
    http: Option<HttpClient>,
    max_depth: usize,
    /// The engine of the stored policy bundle: the change counter it was built at, when, and
    /// the engine (`None`: no bundle pushed).
    engine: Mutex<Option<CachedEngine>>,
    /// DPoP proofs seen at the token endpoint.
    dpop_jtis: Mutex<JtiCache>,
}

/// The engine of the stored bundle: the change counter it was built at, when, and the
/// engine (`None`: no bundle pushed).
type CachedEngine = (u64, Instant, Option<Arc<PolicyEngine>>);

/// How far a DPoP proof's `iat` may be from now at the token endpoint, seconds.
pub const DPOP_WINDOW_SECS: i64 = 60;
/// Most DPoP proofs remembered against replay.
const DPOP_JTIS: usize = 100_000;

impl Exchange {
    /// From the validated configuration.
    pub fn new(cfg: &ServerConfig) -> Result<Self, crate::ServerError> {
        let mut issuers = Vec::new();
        for x in &cfg.external_issuers {
            let algorithms = x
                .algorithms
                .iter()
                .map(|a| {
                    Algorithm::from_str(a).map_err(|e| {
                        crate::ServerError::Internal(format!(
                            "external_issuers: algorithm {a}: {e}"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            issuers.push(ExternalKeys {
                cfg: x.clone(),
                algorithms,
                cache: tokio::sync::Mutex::new(KeyCache::default()),
            });
        }
        let http = if issuers.is_empty() {
            None
        } else {
            Some(http_client()?)
        };
        Ok(Self {
            issuers,
            http,
            max_depth: cfg.max_delegation_depth as usize,
            engine: Mutex::new(None),
            dpop_jtis: Mutex::new(JtiCache::new(DPOP_JTIS)),
        })
    }

    /// Validates the subject token: one of ours (delegated or not, for this actor), or one
    /// from a configured issuer.
    pub async fn subject(
        &self,
        token: &str,
        own_issuer: &str,
        own_keys: &sigil_pki::JwtKeySet,
        actor: &SpiffeId,
        now: i64,
    ) -> Result<Subject, ExchangeError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(ExchangeError::InvalidRequest(
                "subject_token too long".into(),
            ));
        }
        let iss = unverified_issuer(token)
            .ok_or_else(|| ExchangeError::InvalidGrant("subject_token is not a JWT".into()))?;
        if iss == own_issuer {
            // A token this authority issued, sent to the actor (its audience is the actor's
            // SPIFFE ID): the actor goes one hop further.
            let c = validate_access_token(token, own_keys, own_issuer, actor.as_str(), now, 0)
                .map_err(|e| ExchangeError::InvalidGrant(format!("subject_token (sigil): {e}")))?;
            return Ok(sigil_subject(c, own_issuer));
        }
        let Some(x) = self.issuers.iter().find(|x| x.cfg.issuer == iss) else {
            return Err(ExchangeError::InvalidGrant(format!(
                "subject_token issuer {iss:?} is not trusted here"
            )));
        };
        self.external_subject(x, token, now).await
    }

    async fn external_subject(
        &self,
        x: &ExternalKeys,
        token: &str,
        now: i64,
    ) -> Result<Subject, ExchangeError> {
        let grant = |m: String| ExchangeError::InvalidGrant(format!("subject_token: {m}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| grant(e.to_string()))?;
        if !x.algorithms.contains(&header.alg) {
            return Err(grant(format!("algorithm {:?} not accepted", header.alg)));
        }
        let kid = header
            .kid
            .ok_or_else(|| grant("the header names no key (kid)".into()))?;
        let jwk = self.key(x, &kid).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| grant(format!("key {kid}: {e}")))?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.set_issuer(&[&x.cfg.issuer]);
        v.set_audience(&[&x.cfg.audience]);
        // Time is checked below against the authority's clock.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.leeway = 0;
        v.required_spec_claims = HashSet::from(["exp", "sub", "iss", "aud"].map(str::to_owned));
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidAudience => grant(format!(
                    "audience is not {:?} (this authority's audience at {})",
                    x.cfg.audience, x.cfg.issuer
                )),
                _ => grant(e.to_string()),
            }
        })?;
        let c = data.claims;
        let exp = c
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| grant("exp is not an integer".into()))?;
        if exp <= now {
            return Err(grant("expired".into()));
        }
        if c.get("nbf")
            .and_then(Value::as_i64)
            .is_some_and(|t| t > now)
        {
            return Err(grant("not yet valid".into()));
        }
        let user = c
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 512)
            .ok_or_else(|| grant("sub is missing or not a string".into()))?
            .to_owned();
        let scopes = match c.get("scope") {
            Some(Value::String(s)) => s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            None => match c.get("scp") {
                Some(Value::Array(a)) => strings(a).map_err(grant)?,
                None => BTreeSet::new(),
                Some(_) => return Err(grant("scp is not an array of strings".into())),
            },
            Some(_) => return Err(grant("scope is not a string".into())),
        };
        let groups = match c.get(&x.cfg.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => strings(a).map_err(grant)?.into_iter().collect(),
            Some(_) => {
                return Err(grant(format!(
                    "{} is not a string or an array of strings",
                    x.cfg.groups_claim
                )));
            }
        };
        Ok(Subject {
            user,
            issuer: x.cfg.issuer.clone(),
            groups,
            scopes,
            exp,
            chain: Vec::new(),
        })
    }

    /// The issuer's key `kid`: from the cache, else after fetching the JWKS again (at most
    /// once per `jwks_refresh_secs`).
    async fn key(
        &self,
        x: &ExternalKeys,
        kid: &str,
    ) -> Result<jsonwebtoken::jwk::Jwk, ExchangeError> {
        let mut cache = x.cache.lock().await;
        if let Some(k) = cache.keys.as_ref().and_then(|s| s.find(kid)) {
            return Ok(k.clone());
        }
        let recent = cache
            .fetched
            .is_some_and(|t| t.elapsed() < Duration::from_secs(x.cfg.jwks_refresh_secs));
        if !recent {
            cache.fetched = Some(Instant::now());
            match self.fetch_jwks(&x.cfg.jwks_uri).await {
                Ok(set) => cache.keys = Some(set),
                Err(e) => {
                    tracing::warn!(issuer = %x.cfg.issuer, error = %e, "fetching the JWKS failed");
                }
            }
        }
        cache
            .keys
            .as_ref()
            .and_then(|s| s.find(kid))
            .cloned()
            .ok_or_else(|| {
                ExchangeError::InvalidGrant(format!(
                    "subject_token: key {kid:?} is not among {}'s keys",
                    x.cfg.issuer
                ))
            })
    }

    async fn fetch_jwks(&self, uri: &str) -> Result<JwkSet, String> {
        let http = self.http.as_ref().ok_or("no HTTP client")?;
        let uri: http::Uri = uri.parse().map_err(|e| format!("{e}"))?;
        let resp = tokio::time::timeout(FETCH_TIMEOUT, http.get(uri))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = tokio::time::timeout(
            FETCH_TIMEOUT,
            Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect(),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
    }

    /// Checks a token request's DPoP proof (RFC 9449 §4.3, no `ath`) and that it is used
    /// once.
    pub fn dpop_proof(&self, proof: &str, url: &str, now: i64) -> Result<DpopProof, DpopError> {
        let p = verify_dpop_proof(
            proof,
            &DpopCheck {
                method: "POST",
                url,
                now,
                window_secs: DPOP_WINDOW_SECS,
                access_token: None,
                nonces: None,
            },
        )?;
        let mut jtis = self.dpop_jtis.lock().map_err(|_| DpopError::Replayed)?;
        jtis.check(&p, p.iat.saturating_add(DPOP_WINDOW_SECS), now)?;
        Ok(p)
    }

    /// Narrows and decides the exchange: chain length, scopes, audience, the actor's entry
    /// and Cedar's `act_for`.
    #[allow(clippy::too_many_arguments)]
    pub async fn decide(
        &self,
        req: &ExchangeRequest<'_>,
        subject: Subject,
        actor: &SpiffeId,
        store: &dyn Store,
        cfg: &ServerConfig,
        engine: Option<Arc<PolicyEngine>>,
        now: i64,
    ) -> Result<Decided, ExchangeError> {
        let mut chain = Vec::with_capacity(subject.chain.len() + 1);
        chain.push(actor.to_string());
        chain.extend(subject.chain.iter().cloned());
        if chain.len() > self.max_depth {
            return Err(ExchangeError::InvalidGrant(format!(
                "the delegation chain would be {} workloads long; at most {} allowed",
                chain.len(),
                self.max_depth
            )));
        }
        let entries = store
            .list_entries(&EntryFilter {
                spiffe_id: Some(actor.clone()),
                parent_id: None,
            })
            .await
            .map_err(|e| ExchangeError::Server(e.to_string()))?;
        if entries.is_empty() {
            return Err(ExchangeError::InvalidClient(
                "no registration entry for this SPIFFE ID".into(),
            ));
        }
        let allowed: BTreeSet<&str> = entries
            .iter()
            .flat_map(|e| e.spec.scopes.iter().map(String::as_str))
            .collect();
        let requested: Option<BTreeSet<&str>> = req
            .scope
            .map(|s| s.split(' ').filter(|s| !s.is_empty()).collect());
        if let Some(unknown) = requested
            .iter()
            .flatten()
            .find(|s| !cfg.oauth_scopes.iter().any(|k| k == *s))
        {
            return Err(ExchangeError::InvalidScope(format!(
                "unknown scope {unknown:?}"
            )));
        }
        // Never wider than what was asked, what the subject token carried, and what the
        // actor's entry allows.
        let scopes: Vec<String> = subject
            .scopes
            .iter()
            .map(String::as_str)
            .filter(|s| allowed.contains(s))
            .filter(|s| requested.as_ref().is_none_or(|r| r.contains(s)))
            .map(str::to_owned)
            .collect();
        if scopes.is_empty() {
            return Err(ExchangeError::InvalidScope(
                "no scope remains: none of the requested scopes is both in the subject token \
                 and allowed to this workload"
                    .into(),
            ));
        }
        let audience = req.audience.unwrap_or(&cfg.default_audience).to_owned();
        if audience.is_empty() || audience.len() > 512 || audience.contains(char::is_whitespace) {
            return Err(ExchangeError::InvalidTarget(
                "invalid resource/audience".into(),
            ));
        }
        let actor_groups: Vec<String> = entries
            .iter()
            .flat_map(|e| e.spec.groups.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let Some(engine) = engine else {
            return Err(ExchangeError::Unauthorized(
                "no policy bundle has been pushed: no workload may act for anyone".into(),
            ));
        };
        let delegation = Delegation {
            user: subject.user.clone(),
            groups: subject.groups.clone(),
            chain: chain.clone(),
        };
        let (hour, weekday) = (
            now.rem_euclid(86_400) / 3600,
            (now.div_euclid(86_400) + 3).rem_euclid(7),
        );
        let q = Query {
            principal: Principal {
                spiffe_id: actor.as_str(),
                trust_domain: actor.trust_domain_name(),
                groups: &actor_groups,
            },
            action: "act_for",
            resource_type: "User",
            resource_id: &subject.user,
            scopes: &scopes,
            hour,
            weekday,
            arguments: None,
            delegation: Some(&delegation),
            risk: None,
        };
        let decision = engine.decide(&q).map_err(|e| {
            ExchangeError::Unauthorized(format!("act_for could not be decided: {e}"))
        })?;
        if !decision.allow || engine.expired(now) {
            return Err(ExchangeError::Unauthorized(format!(
                "policy does not let {} act for {:?}",
                actor, subject.user
            )));
        }
        Ok(Decided {
            subject,
            chain,
            scopes,
            audience,
            actor_groups,
        })
    }

    /// The engine of the latest stored policy bundle (rebuilt when the server's change
    /// counter moved, or every few seconds for changes made by another replica).
    pub async fn engine(
        &self,
        store: &dyn Store,
        keys: &[sigil_pki::Jwk],
        changes: u64,
    ) -> Result<Option<Arc<PolicyEngine>>, ExchangeError> {
        if let Ok(g) = self.engine.lock()
            && let Some((at, when, e)) = g.as_ref()
            && *at == changes
            && when.elapsed() < ENGINE_MAX_AGE
        {
            return Ok(e.clone());
        }
        let server = |e: String| ExchangeError::Server(e);
        let engine = match store
            .latest_policy_bundle()
            .await
            .map_err(|e| server(e.to_string()))?
        {
            None => None,
            Some(rec) => {
                let keys = sigil_policy::bundle::PolicyKeys::from_jwks(keys)
                    .map_err(|e| server(e.to_string()))?;
                let b = sigil_policy::bundle::open(&rec.envelope, &keys)
                    .map_err(|e| server(e.to_string()))?;
                Some(Arc::new(
                    b.content.engine().map_err(|e| server(e.to_string()))?,
                ))
            }
        };
        if let Ok(mut g) = self.engine.lock() {
            *g = Some((changes, Instant::now(), engine.clone()));
        }
        Ok(engine)
    }
}

/// A sigil token as a subject: its user (or, not delegated, the workload it was issued to)
/// and its chain.
fn sigil_subject(c: AccessTokenClaims, issuer: &str) -> Subject {
    let chain = c
        .act
        .as_ref()
        .map(|a| a.chain().into_iter().map(str::to_owned).collect())
        .unwrap_or_default();
    let groups = if c.act.is_some() {
        c.user_groups.clone()
    } else {
        c.groups.clone()
    };
    Subject {
        scopes: c.scopes().map(str::to_owned).collect(),
        user: c.sub,
        issuer: issuer.to_owned(),
        groups,
        exp: c.exp,
        chain,
    }
}

fn strings(a: &[Value]) -> Result<BTreeSet<String>, String> {
    a.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| "not an array of strings".to_owned())
        })
        .collect()
}

/// The `iss` of a JWT, read before anything is verified, only to choose the keys to verify
/// it with.
fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (Some(_), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let payload = URL_SAFE_NO_PAD.decode(p).ok()?;
    let v: Value = serde_json::from_slice(&payload).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

/// Lowercase hex SHA-256 of a subject token, for the log.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn http_client() -> Result<HttpClient, crate::ServerError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(FETCH_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .map_err(|e| crate::ServerError::Internal(format!("TLS roots for JWKS fetches: {e}")))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_issuer_only_from_a_three_part_token() {
        let p = URL_SAFE_NO_PAD.encode(br#"{"iss":"https://idp.example"}"#);
        assert_eq!(
            unverified_issuer(&format!("e30.{p}.sig")).as_deref(),
            Some("https://idp.example")
        );
        assert!(unverified_issuer("e30").is_none());
        assert!(unverified_issuer(&format!("e30.{p}")).is_none());
        assert!(unverified_issuer("e30.!!!.sig").is_none());
    }
}
