//! The token step: exactly one `Authorization` header, `Bearer` with a certificate-bound
//! access token or `DPoP` with a DPoP-bound one and its proof, for this proxy's audience
//! (validated once, then from the cache; the binding to this connection's certificate, or the
//! DPoP proof, and the signing key's presence checked every time), presented by the workload
//! it names: the certificate's SPIFFE ID, or for a DPoP client without a certificate the
//! token's own (its current actor, or its subject).
use std::sync::Arc;

use http::header;
use sigil_pki::{AccessTokenClaims, VerifiedX509Svid};

use crate::Credentials;
use crate::deny::Deny;
use crate::dpop::DpopState;
use crate::observe::Observer;
use crate::token::{Expect, TokenCache, TokenError};

/// What a token is checked against, besides the connection's certificate.
pub(crate) struct Audience<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub leeway: i64,
    pub now: i64,
}

/// Who presented the request's token.
pub(crate) enum Presenter {
    /// The connection's certificate.
    Certificate,
    /// A DPoP client without a certificate: the identity its token names, as a caller
    /// without a certificate (empty thumbprint and serial).
    Dpop(VerifiedX509Svid),
}

/// Checks the request's token.
pub(crate) fn authenticate(
    parts: &http::request::Parts,
    peer: Option<&VerifiedX509Svid>,
    creds: &Credentials,
    tokens: &TokenCache,
    aud: &Audience<'_>,
    dpop: &DpopState,
    obs: &mut Observer<'_>,
) -> Result<(Arc<AccessTokenClaims>, Presenter), Deny> {
    let (scheme, token) =
        authorization(&parts.headers).map_err(|e| Deny::no_token(e.to_string()))?;
    let expect = Expect {
        keys: &creds.jwt_keys,
        issuer: aud.issuer,
        audience: aud.audience,
        now: aud.now,
        leeway: aud.leeway,
        x5t_s256: peer.map(|p| p.x5t_s256.as_str()),
    };
    let started = obs.start();
    let (checked, cache_hit) = tokens.lookup(token, &expect);
    obs.token_checked(started, cache_hit, checked.as_ref().err());
    let claims = checked.map_err(|e| Deny::token(e.to_string()))?;
    match (&claims.cnf.jkt, scheme) {
        (Some(jkt), Scheme::Dpop) => dpop
            .check(
                &parts.headers,
                &parts.method,
                &parts.uri,
                token,
                jkt,
                aud.now,
            )
            .map_err(Deny::dpop)?,
        (Some(_), Scheme::Bearer) => {
            return Err(Deny::token(
                "a DPoP-bound token must be sent with the DPoP scheme and a proof",
            ));
        }
        (None, Scheme::Dpop) => {
            return Err(Deny::token(
                "a certificate-bound token must be sent with the Bearer scheme",
            ));
        }
        (None, Scheme::Bearer) => {}
    }
    // A delegated token's subject is the user; the workload presenting it is its current
    // actor. Either way it must be the certificate's SPIFFE ID.
    let presenter = match peer {
        Some(p) if claims.presenter() == p.spiffe_id.as_str() => Presenter::Certificate,
        Some(_) => {
            return Err(Deny::token(if claims.act.is_some() {
                "token's actor is not the certificate's SPIFFE ID"
            } else {
                "token subject is not the certificate's SPIFFE ID"
            }));
        }
        None => Presenter::Dpop(dpop_caller(&claims, creds)?),
    };
    Ok((claims, presenter))
}

/// The caller a DPoP-bound token names (only such tokens get here without a certificate):
/// a workload of this trust domain.
fn dpop_caller(claims: &AccessTokenClaims, creds: &Credentials) -> Result<VerifiedX509Svid, Deny> {
    let id = sigil_core::SpiffeId::new(claims.presenter())
        .map_err(|e| Deny::token(format!("token's workload is not a SPIFFE ID: {e}")))?;
    if !id.is_member_of(&creds.x509.trust_domain) || id.path().is_empty() {
        return Err(Deny::token("token's workload is not of this trust domain"));
    }
    Ok(VerifiedX509Svid {
        spiffe_id: id,
        serial: String::new(),
        not_before: claims.iat,
        not_after: claims.exp,
        sha256: String::new(),
        x5t_s256: String::new(),
        dns_names: Vec::new(),
        public_key: Vec::new(),
    })
}

/// The authentication scheme of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bearer,
    Dpop,
}

/// Exactly one `Authorization: Bearer|DPoP <token>` header.
fn authorization(h: &http::HeaderMap) -> Result<(Scheme, &str), TokenError> {
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(TokenError::Missing);
    };
    let v = v.to_str().map_err(|_| TokenError::Missing)?;
    let (scheme, token) = v.split_once(' ').ok_or(TokenError::Missing)?;
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        return Err(TokenError::Missing);
    };
    if token.is_empty() || token.contains(' ') {
        return Err(TokenError::Missing);
    }
    Ok((scheme, token))
}

#[cfg(test)]
mod tests {
    use super::authorization as bearer;
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn bearer_needs_exactly_one_well_formed_header() {
        let mut h = HeaderMap::new();
        assert!(bearer(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h).unwrap(), (Scheme::Bearer, "abc"));
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
