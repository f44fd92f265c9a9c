//! DPoP proofs (RFC 9449): a JWS of type `dpop+jwt` signed by the key in its own header,
//! naming the request (`htm`, `htu`), when (`iat`), once (`jti`), and for a protected
//! resource the access token (`ath`). Signatures are checked by `jsonwebtoken`; the replay
//! cache is a bounded in-memory set the caller keeps.
use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::jwk::Jwk;
use crate::keys::{b64url, b64url_decode};

/// The JWS algorithms a DPoP proof may use.
pub const DPOP_ALGORITHMS: &[&str] = &["ES256", "EdDSA", "RS256", "PS256"];

/// The longest proof looked at, bytes.
pub const MAX_PROOF_LEN: usize = 8 * 1024;

/// Why a DPoP proof is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DpopError {
    #[error("malformed DPoP proof: {0}")]
    Malformed(&'static str),
    #[error("DPoP proof algorithm {0:?} is not accepted")]
    Algorithm(String),
    #[error("DPoP proof signature does not verify")]
    BadSignature,
    #[error("DPoP proof is for another method")]
    WrongMethod,
    #[error("DPoP proof is for another URL")]
    WrongUrl,
    #[error("DPoP proof iat is outside the accepted window")]
    Stale,
    #[error("DPoP proof ath does not match the access token")]
    WrongAccessToken,
    #[error("DPoP proof is signed by another key than the token is bound to")]
    WrongKey,
    #[error("DPoP proof jti was already used")]
    Replayed,
    #[error("DPoP proof lacks the current nonce")]
    Nonce,
}

/// What a proof is checked against.
pub struct DpopCheck<'a> {
    /// The request's method.
    pub method: &'a str,
    /// The request's URL, normalized ([`normalize_htu`]).
    pub url: &'a str,
    pub now: i64,
    /// How far `iat` may be from `now`, either way, seconds.
    pub window_secs: i64,
    /// At a protected resource: the access token (`ath` must be its hash).
    pub access_token: Option<&'a str>,
    /// The nonces the server accepts now, if it requires one.
    pub nonces: Option<&'a [String]>,
}

/// A proof that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopProof {
    /// RFC 7638 thumbprint (SHA-256, base64url) of the proof's key: `cnf.jkt`.
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
}

#[derive(Deserialize)]
struct RawHeader {
    typ: Option<String>,
    alg: Option<String>,
    jwk: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawClaims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<i64>,
    ath: Option<String>,
    nonce: Option<String>,
}

/// Verifies `proof` against `c`. The replay check is the caller's ([`JtiCache`]); the key
/// binding too (compare [`DpopProof::jkt`] with the token's `cnf.jkt`).
pub fn verify_dpop_proof(proof: &str, c: &DpopCheck<'_>) -> Result<DpopProof, DpopError> {
    if proof.len() > MAX_PROOF_LEN {
        return Err(DpopError::Malformed("too long"));
    }
    let h64 = proof
        .split('.')
        .next()
        .ok_or(DpopError::Malformed("not a JWS"))?;
    let header: RawHeader = b64url_decode(h64)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(DpopError::Malformed("header is not base64url JSON"))?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err(DpopError::Malformed("typ must be dpop+jwt"));
    }
    let alg_name = header.alg.ok_or(DpopError::Malformed("no alg"))?;
    if !DPOP_ALGORITHMS.contains(&alg_name.as_str()) {
        return Err(DpopError::Algorithm(alg_name));
    }
    let alg: Algorithm = alg_name
        .parse()
        .map_err(|_| DpopError::Algorithm(alg_name.clone()))?;
    let jwk_value = header
        .jwk
        .ok_or(DpopError::Malformed("no jwk in the header"))?;
    if jwk_value.get("d").is_some() {
        return Err(DpopError::Malformed("the header's jwk is a private key"));
    }
    let jwk: Jwk = serde_json::from_value(jwk_value.clone())
        .map_err(|_| DpopError::Malformed("the header's jwk is not a JWK"))?;
    let jkt = jwk
        .thumbprint()
        .map_err(|_| DpopError::Malformed("the header's jwk has no thumbprint"))?;
    let key_jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk_value)
        .map_err(|_| DpopError::Malformed("the header's jwk is not a JWK"))?;
    let key = DecodingKey::from_jwk(&key_jwk)
        .map_err(|_| DpopError::Malformed("the header's jwk is not a usable public key"))?;
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<RawClaims>(proof, &key, &v)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => DpopError::BadSignature,
            // A key of another type than the alg, an unparsable signature, ...
            _ => DpopError::BadSignature,
        })?
        .claims;
    let jti = claims.jti.filter(|j| !j.is_empty() && j.len() <= 256);
    let jti = jti.ok_or(DpopError::Malformed("jti missing or too long"))?;
    let htm = claims.htm.ok_or(DpopError::Malformed("no htm"))?;
    let htu = claims.htu.ok_or(DpopError::Malformed("no htu"))?;
    let iat = claims.iat.ok_or(DpopError::Malformed("no iat"))?;
    if htm != c.method {
        return Err(DpopError::WrongMethod);
    }
    if normalize_htu(&htu).as_deref() != Some(c.url) {
        return Err(DpopError::WrongUrl);
    }
    if (iat - c.now).abs() > c.window_secs.max(0) {
        return Err(DpopError::Stale);
    }
    match (c.access_token, claims.ath) {
        (Some(token), Some(ath)) if ath == ath_of(token) => {}
        (Some(_), _) => return Err(DpopError::WrongAccessToken),
        (None, _) => {}
    }
    if let Some(accepted) = c.nonces
        && !claims.nonce.is_some_and(|n| accepted.contains(&n))
    {
        return Err(DpopError::Nonce);
    }
    Ok(DpopProof { jkt, jti, iat })
}

/// `ath`: base64url SHA-256 of the access token.
pub fn ath_of(token: &str) -> String {
    b64url(&Sha256::digest(token.as_bytes()))
}

/// An `htu` in the one spelling compared (RFC 9449 §4.3, RFC 3986 §6.2.2–6.2.3): scheme and
/// host in lower case, no default port, an empty path as `/`, percent-escapes in upper case,
/// without query and fragment. `None` when it is not an absolute http(s) URL.
pub fn normalize_htu(url: &str) -> Option<String> {
    let url = url.split(['?', '#']).next()?;
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let mut host = authority.to_ascii_lowercase();
    if host.ends_with(default_port) {
        host.truncate(host.len() - default_port.len());
    }
    let path = if path.is_empty() { "/" } else { path };
    let mut out = format!("{scheme}://{host}");
    let mut chars = path.chars();
    while let Some(ch) = chars.next() {
        out.push(ch);
        if ch == '%' {
            for _ in 0..2 {
                out.push(chars.next()?.to_ascii_uppercase());
            }
        }
    }
    Some(out)
}

/// The `jti`s of recent proofs, per key, until their `iat` leaves the window: a proof seen
/// twice is refused. Bounded: when full of unexpired entries, new proofs are refused (fails
/// closed) rather than old ones forgotten.
pub struct JtiCache {
    seen: HashMap<[u8; 32], i64>,
    max: usize,
}

impl JtiCache {
    /// A cache of at most `max` proofs.
    pub fn new(max: usize) -> Self {
        Self {
            seen: HashMap::new(),
            max,
        }
    }

    /// Records the proof; `Err(Replayed)` if it was seen before. `forget_at`: when the proof
    /// can no longer be accepted anyway (`iat` + window).
    pub fn check(&mut self, p: &DpopProof, forget_at: i64, now: i64) -> Result<(), DpopError> {
        let mut h = Sha256::new();
        h.update(p.jkt.as_bytes());
        h.update([0]);
        h.update(p.jti.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        if self.seen.get(&key).is_some_and(|t| *t >= now) {
            return Err(DpopError::Replayed);
        }
        if self.seen.len() >= self.max {
            self.seen.retain(|_, t| *t >= now);
            if self.seen.len() >= self.max {
                return Err(DpopError::Replayed);
            }
        }
        self.seen.insert(key, forget_at);
        Ok(())
    }

    /// How many proofs are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JwtAlgorithm, JwtSigner};
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;
    const URL: &str = "https://proxy.example/v1/chat/completions";

    fn proof(
        signer: &JwtSigner,
        header_jwk: serde_json::Value,
        claims: serde_json::Value,
    ) -> String {
        let header =
            json!({"typ": "dpop+jwt", "alg": signer.algorithm().as_str(), "jwk": header_jwk});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let enc = match signer.algorithm() {
            JwtAlgorithm::Es256 => {
                jsonwebtoken::EncodingKey::from_ec_pem(signer.pkcs8_pem().as_bytes())
            }
            JwtAlgorithm::EdDsa => {
                jsonwebtoken::EncodingKey::from_ed_pem(signer.pkcs8_pem().as_bytes())
            }
        }
        .unwrap();
        let alg = if signer.algorithm() == JwtAlgorithm::Es256 {
            Algorithm::ES256
        } else {
            Algorithm::EdDSA
        };
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &enc, alg).unwrap();
        format!("{input}.{sig}")
    }

    fn public(signer: &JwtSigner) -> serde_json::Value {
        let mut v = serde_json::to_value(signer.public_jwk()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("kid");
        o.remove("use");
        o.remove("alg");
        v
    }

    fn check<'a>(token: Option<&'a str>) -> DpopCheck<'a> {
        DpopCheck {
            method: "POST",
            url: URL,
            now: NOW,
            window_secs: 60,
            access_token: token,
            nonces: None,
        }
    }

    #[test]
    fn accepts_a_good_proof_and_refuses_each_mismatch() {
        for alg in [JwtAlgorithm::Es256, JwtAlgorithm::EdDsa] {
            let key = JwtSigner::generate(alg).unwrap();
            let claims =
                json!({"jti": "j1", "htm": "POST", "htu": URL, "iat": NOW, "ath": ath_of("tok")});
            let p = proof(&key, public(&key), claims.clone());
            let ok = verify_dpop_proof(&p, &check(Some("tok"))).unwrap();
            assert_eq!(ok.jkt, key.public_jwk().thumbprint().unwrap());
            assert_eq!(
                verify_dpop_proof(&p, &check(Some("another token"))),
                Err(DpopError::WrongAccessToken)
            );
            let get = DpopCheck {
                method: "GET",
                ..check(Some("tok"))
            };
            assert_eq!(verify_dpop_proof(&p, &get), Err(DpopError::WrongMethod));
            let other = DpopCheck {
                url: "https://proxy.example/v1/models",
                ..check(Some("tok"))
            };
            assert_eq!(verify_dpop_proof(&p, &other), Err(DpopError::WrongUrl));
            let later = DpopCheck {
                now: NOW + 61,
                ..check(Some("tok"))
            };
            assert_eq!(verify_dpop_proof(&p, &later), Err(DpopError::Stale));
            // Signed by another key than the one in its header.
            let thief = JwtSigner::generate(alg).unwrap();
            let forged = proof(&thief, public(&key), claims.clone());
            assert_eq!(
                verify_dpop_proof(&forged, &check(Some("tok"))),
                Err(DpopError::BadSignature)
            );
            // Nonces.
            let nonces = vec!["n1".to_owned()];
            let with = DpopCheck {
                nonces: Some(&nonces),
                ..check(Some("tok"))
            };
            assert_eq!(verify_dpop_proof(&p, &with), Err(DpopError::Nonce));
            let mut c = claims.clone();
            c["nonce"] = json!("n1");
            assert!(verify_dpop_proof(&proof(&key, public(&key), c), &with).is_ok());
        }
    }

    #[test]
    fn refuses_structural_tricks() {
        let key = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let claims = json!({"jti": "j1", "htm": "POST", "htu": URL, "iat": NOW});
        let mut private = public(&key);
        private["d"] = json!("AAAA");
        assert!(matches!(
            verify_dpop_proof(&proof(&key, private, claims.clone()), &check(None)),
            Err(DpopError::Malformed(_))
        ));
        for missing in ["jti", "htm", "htu", "iat"] {
            let mut c = claims.clone();
            c.as_object_mut().unwrap().remove(missing);
            assert!(
                matches!(
                    verify_dpop_proof(&proof(&key, public(&key), c), &check(None)),
                    Err(DpopError::Malformed(_))
                ),
                "{missing}"
            );
        }
        // A proof without ath at a protected resource.
        assert_eq!(
            verify_dpop_proof(&proof(&key, public(&key), claims), &check(Some("tok"))),
            Err(DpopError::WrongAccessToken)
        );
        assert!(verify_dpop_proof("a.b.c", &check(None)).is_err());
        assert!(verify_dpop_proof("", &check(None)).is_err());
    }

    #[test]
    fn htu_is_compared_normalized() {
        let n = |u| normalize_htu(u);
        assert_eq!(
            n("HTTPS://Proxy.Example:443/v1/a?x=1#f").as_deref(),
            Some("https://proxy.example/v1/a")
        );
        assert_eq!(
            n("https://proxy.example").as_deref(),
            Some("https://proxy.example/")
        );
        assert_eq!(
            n("https://p.example:8443/a%2fb").as_deref(),
            Some("https://p.example:8443/a%2Fb")
        );
        assert_eq!(
            n("http://p.example:80/").as_deref(),
            Some("http://p.example/")
        );
        assert!(n("ftp://p.example/").is_none());
        assert!(n("https://user@p.example/").is_none());
        assert!(n("/relative").is_none());
    }

    #[test]
    fn the_replay_cache_refuses_a_second_use_and_fails_closed_when_full() {
        let p = |jti: &str| DpopProof {
            jkt: "k".into(),
            jti: jti.into(),
            iat: NOW,
        };
        let mut c = JtiCache::new(2);
        assert!(c.check(&p("a"), NOW + 60, NOW).is_ok());
        assert_eq!(c.check(&p("a"), NOW + 60, NOW), Err(DpopError::Replayed));
        assert!(c.check(&p("b"), NOW + 60, NOW).is_ok());
        assert_eq!(c.check(&p("c"), NOW + 60, NOW), Err(DpopError::Replayed));
        // Once the old ones expire, there is room again.
        assert!(c.check(&p("c"), NOW + 200, NOW + 61).is_ok());
        assert_eq!(c.len(), 1);
    }
}
