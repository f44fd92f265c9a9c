//! The token step: exactly one `Authorization: Bearer` header, a certificate-bound access
//! token for this proxy's audience (validated once, then from the cache; the binding to this
//! connection's certificate and the signing key's presence checked every time), whose
//! subject is the certificate's SPIFFE ID.
use std::sync::Arc;

use http::HeaderMap;
use http::header;
use sigil_pki::{AccessTokenClaims, VerifiedX509Svid};

use crate::Credentials;
use crate::deny::Deny;
use crate::observe::Observer;
use crate::token::{Expect, TokenCache, TokenError};

/// What a token is checked against, besides the connection's certificate.
pub(crate) struct Audience<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub leeway: i64,
    pub now: i64,
}

/// Checks the request's token.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    peer: &VerifiedX509Svid,
    creds: &Credentials,
    tokens: &TokenCache,
    aud: &Audience<'_>,
    obs: &mut Observer<'_>,
) -> Result<Arc<AccessTokenClaims>, Deny> {
    let token = bearer(headers).map_err(|e| Deny::token(e.to_string()))?;
    let expect = Expect {
        keys: &creds.jwt_keys,
        issuer: aud.issuer,
        audience: aud.audience,
        now: aud.now,
        leeway: aud.leeway,
        x5t_s256: &peer.x5t_s256,
    };
    let started = obs.start();
    let (checked, cache_hit) = tokens.lookup(token, &expect);
    obs.token_checked(started, cache_hit, checked.as_ref().err());
    let claims = checked.map_err(|e| Deny::token(e.to_string()))?;
    if claims.sub != peer.spiffe_id.as_str() {
        return Err(Deny::token(
            "token subject is not the certificate's SPIFFE ID",
        ));
    }
    Ok(claims)
}

/// Exactly one `Authorization: Bearer <token>` header.
fn bearer(h: &HeaderMap) -> Result<&str, TokenError> {
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(TokenError::Missing);
    };
    let v = v.to_str().map_err(|_| TokenError::Missing)?;
    let (scheme, token) = v.split_once(' ').ok_or(TokenError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(TokenError::Missing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_needs_exactly_one_well_formed_header() {
        let mut h = HeaderMap::new();
        assert!(bearer(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h).unwrap(), "abc");
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer def"),
        );
        assert!(bearer(&h).is_err(), "two Authorization headers");
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer a b", "bearerabc"] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert!(bearer(&h).is_err(), "{bad}");
        }
    }
}
