//! Per-request tokens: a certificate- or DPoP-bound access token, validated once per token
//! and then served from a bounded cache; the binding to this connection's certificate (the
//! DPoP proof is the caller's, `dpop.rs`), and that the key which verified the token is still
//! trusted, are checked on every request.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use sigil_pki::{AccessTokenClaims, JwtError, JwtKeyRef, JwtKeySet, validate_access_token_keyed};

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
    #[error("certificate-bound token presented without its certificate")]
    NoCertificate,
}

/// Verified tokens by SHA-256 of the token.
#[derive(Default)]
pub struct TokenCache {
    map: Mutex<HashMap<[u8; 32], Verified>>,
}

/// A token whose signature verified, and the key that verified it.
struct Verified {
    claims: Arc<AccessTokenClaims>,
    key: JwtKeyRef,
}

/// What a token is checked against.
pub struct Expect<'a> {
    pub keys: &'a JwtKeySet,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub now: i64,
    pub leeway: i64,
    /// base64url SHA-256 of the connection's client certificate, if it presented one.
    pub x5t_s256: Option<&'a str>,
}

impl TokenCache {
    /// Validates `token` (signature once, then from cache for as long as the key that
    /// verified it is in `e.keys`) and its binding to this connection; and whether the token
    /// was found in the cache (a hit) rather than fully validated (a miss), whatever the
    /// outcome.
    pub fn lookup(
        &self,
        token: &str,
        e: &Expect<'_>,
    ) -> (Result<Arc<AccessTokenClaims>, TokenError>, bool) {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self
            .map
            .lock()
            .ok()
            .and_then(|mut m| cached(&mut m, &key, e.keys));
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
                let (claims, signer) = validate_access_token_keyed(
                    token, e.keys, e.issuer, e.audience, e.now, e.leeway,
                )?;
                let c = Arc::new(claims);
                if let Ok(mut m) = self.map.lock() {
                    if m.len() >= MAX_CACHED {
                        m.retain(|_, v| v.claims.exp + e.leeway > e.now);
                        if m.len() >= MAX_CACHED {
                            m.clear();
                        }
                    }
                    let verified = Verified {
                        claims: c.clone(),
                        key: signer,
                    };
                    m.insert(key, verified);
                }
                c
            }
        };
        // The binding is per connection: a cached token presented over another certificate
        // is refused like a fresh one. A DPoP-bound token's proof is checked per request by
        // the caller.
        if claims.cnf.jkt.is_none() {
            match e.x5t_s256 {
                Some(x) if x == claims.cnf.x5t_s256 => {}
                Some(_) => return Err(TokenError::WrongCertificate),
                None => return Err(TokenError::NoCertificate),
            }
        }
        Ok(claims)
    }
}

/// The cached claims of the token with this hash, if its key is still in `keys`. A token whose
/// key has left the trust bundle is evicted and goes through full validation again, which
/// refuses it like any token signed by an unknown key.
fn cached(
    m: &mut HashMap<[u8; 32], Verified>,
    hash: &[u8; 32],
    keys: &JwtKeySet,
) -> Option<Arc<AccessTokenClaims>> {
    let v = m.get(hash)?;
    if keys.holds(&v.key) {
        return Some(v.claims.clone());
    }
    m.remove(hash);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_pki::{Confirmation, JwtAlgorithm, JwtSigner};

    const NOW: i64 = 1_700_000_000;
    const ISS: &str = "https://sigil.example.org";
    const AUD: &str = "https://api.example.org";
    const X5T: &str = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU";

    fn keys(signers: &[&JwtSigner]) -> JwtKeySet {
        let jwks: Vec<_> = signers.iter().map(|s| s.public_jwk()).collect();
        JwtKeySet::from_jwks(&jwks).unwrap()
    }

    fn token(signer: &JwtSigner) -> String {
        signer
            .mint_access_token(&AccessTokenClaims {
                iss: ISS.into(),
                sub: "spiffe://example.org/agent".into(),
                aud: vec![AUD.into()],
                client_id: "client-1".into(),
                scope: String::new(),
                jti: "jti-1".into(),
                iat: NOW,
                nbf: None,
                groups: vec![],
                exp: NOW + 300,
                cnf: Confirmation {
                    x5t_s256: X5T.into(),
                    jkt: None,
                },
                ..Default::default()
            })
            .unwrap()
    }

    fn expect(keys: &JwtKeySet) -> Expect<'_> {
        Expect {
            keys,
            issuer: ISS,
            audience: AUD,
            now: NOW,
            leeway: 0,
            x5t_s256: Some(X5T),
        }
    }

    #[test]
    fn serves_a_verified_token_from_the_cache() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let (keys, cache, t) = (keys(&[&signer]), TokenCache::default(), token(&signer));
        let (first, hit) = cache.lookup(&t, &expect(&keys));
        assert!(first.is_ok() && !hit);
        let (again, hit) = cache.lookup(&t, &expect(&keys));
        assert!(again.is_ok() && hit);
        let other_cert = Expect {
            x5t_s256: Some("another-certificate"),
            ..expect(&keys)
        };
        let (wrong, hit) = cache.lookup(&t, &other_cert);
        assert!(matches!(wrong, Err(TokenError::WrongCertificate)) && hit);
        let no_cert = Expect {
            x5t_s256: None,
            ..expect(&keys)
        };
        let (none, _) = cache.lookup(&t, &no_cert);
        assert!(matches!(none, Err(TokenError::NoCertificate)));
    }

    #[test]
    fn refuses_a_cached_token_once_its_key_left_the_key_set() {
        let old = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let new = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let cache = TokenCache::default();
        let t = token(&old);
        let (first, _) = cache.lookup(&t, &expect(&keys(&[&old, &new])));
        assert!(first.is_ok());
        // The bundle drops the old key: the cached verdict no longer stands.
        let (after, hit) = cache.lookup(&t, &expect(&keys(&[&new])));
        assert!(
            matches!(after, Err(TokenError::Invalid(JwtError::UnknownKey(_)))),
            "{after:?}"
        );
        assert!(!hit);
        // Evicted, not only refused: with the key back it is validated afresh.
        let (back, hit) = cache.lookup(&t, &expect(&keys(&[&old])));
        assert!(back.is_ok() && !hit);
        // Another key under the old key's kid does not keep the token either.
        let mut impostor = new.public_jwk();
        impostor.kid = Some(old.kid().to_owned());
        let swapped = JwtKeySet::from_jwks(&[impostor]).unwrap();
        let (after, hit) = cache.lookup(&t, &expect(&swapped));
        assert!(
            matches!(after, Err(TokenError::Invalid(JwtError::BadSignature))),
            "{after:?}"
        );
        assert!(!hit);
    }
}
