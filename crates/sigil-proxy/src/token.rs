//! Per-request tokens: a certificate-bound access token, validated once per token and then
//! served from a bounded cache; the binding to this connection's certificate is checked on
//! every request.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use sigil_pki::{AccessTokenClaims, JwtError, JwtKeySet, validate_access_token};

/// Most tokens kept; beyond that expired ones are dropped, then the cache is cleared.
const MAX_CACHED: usize = 16 * 1024;

/// Why a request's token is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] JwtError),
    #[error("token is bound to another certificate")]
    WrongCertificate,
}

/// Verified tokens by SHA-256 of the token.
#[derive(Default)]
pub struct TokenCache {
    map: Mutex<HashMap<[u8; 32], Arc<AccessTokenClaims>>>,
}

/// What a token is checked against.
pub struct Expect<'a> {
    pub keys: &'a JwtKeySet,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub now: i64,
    pub leeway: i64,
    /// base64url SHA-256 of the connection's client certificate.
    pub x5t_s256: &'a str,
}

impl TokenCache {
    /// Validates `token` (signature once, then from cache) and its binding to this
    /// connection; and whether the token was found in the cache (a hit) rather than fully
    /// validated (a miss), whatever the outcome.
    pub fn lookup(
        &self,
        token: &str,
        e: &Expect<'_>,
    ) -> (Result<Arc<AccessTokenClaims>, TokenError>, bool) {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.map.lock().ok().and_then(|m| m.get(&key).cloned());
        let hit = cached.is_some();
        (self.finish(token, key, cached, e), hit)
    }

    fn finish(
        &self,
        token: &str,
        key: [u8; 32],
        cached: Option<Arc<AccessTokenClaims>>,
        e: &Expect<'_>,
    ) -> Result<Arc<AccessTokenClaims>, TokenError> {
        let claims = match cached {
            Some(c) => {
                if c.exp + e.leeway <= e.now {
                    return Err(TokenError::Invalid(JwtError::Expired));
                }
                c
            }
            None => {
                let c = Arc::new(validate_access_token(
                    token, e.keys, e.issuer, e.audience, e.now, e.leeway,
                )?);
                if let Ok(mut m) = self.map.lock() {
                    if m.len() >= MAX_CACHED {
                        m.retain(|_, v| v.exp + e.leeway > e.now);
                        if m.len() >= MAX_CACHED {
                            m.clear();
                        }
                    }
                    m.insert(key, c.clone());
                }
                c
            }
        };
        // The binding is per connection: a cached token presented over another certificate
        // is refused like a fresh one.
        if claims.cnf.x5t_s256 != e.x5t_s256 {
            return Err(TokenError::WrongCertificate);
        }
        Ok(claims)
    }
}
