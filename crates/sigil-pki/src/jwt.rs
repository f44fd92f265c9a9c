//! Mints and strictly validates JWTs: JWT-SVIDs (SPIFFE JWT-SVID spec) and OAuth access tokens
//! (RFC 9068) bound to an X.509 certificate (RFC 8705 `cnf.x5t#S256`).
use std::fmt;

use jsonwebtoken::{Algorithm, EncodingKey};
use rcgen::PublicKeyData;
use serde::{Deserialize, Deserializer, Serialize};
use sigil_core::{SpiffeId, TrustDomain, UnixTime};

use crate::error::{JwtError, PkiError};
use crate::jwk::{Jwk, JwtKeyRef, JwtKeySet, split_uncompressed_point};
use crate::keys::{
    KeyAlgorithm, b64url, b64url_decode, generate_rcgen_key, pem_decode_one, random_bytes,
};
use crate::x509_verify::x5t_s256;

/// The longest token, in bytes, that validation looks at.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The `typ` header of an RFC 9068 access token.
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// The JWS algorithms sigil signs and accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// ECDSA P-256 SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl JwtAlgorithm {
    /// The JOSE name: `ES256` or `EdDSA`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }

    fn from_header(alg: &str) -> Option<Self> {
        match alg {
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }

    fn jose(self) -> Algorithm {
        match self {
            Self::Es256 => Algorithm::ES256,
            Self::EdDsa => Algorithm::EdDSA,
        }
    }

    fn key_algorithm(self) -> KeyAlgorithm {
        match self {
            Self::Es256 => KeyAlgorithm::EcdsaP256,
            Self::EdDsa => KeyAlgorithm::Ed25519,
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JwtSvidClaims {
    /// The workload's SPIFFE ID.
    pub sub: String,
    /// Audiences; never empty.
    pub aud: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at, seconds since the epoch (0 if the token had none).
    pub iat: i64,
    /// Unique token ID, if present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// The `cnf` claim: what the token is bound to, exactly one of a client certificate
/// (RFC 8705 `x5t#S256`) or a DPoP key (RFC 9449 `jkt`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url SHA-256 of the client certificate's DER; empty for a DPoP-bound token.
    #[serde(rename = "x5t#S256", default, skip_serializing_if = "String::is_empty")]
    pub x5t_s256: String,
    /// The RFC 7638 thumbprint (SHA-256, base64url) of the DPoP public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jkt: Option<String>,
}

/// Most actors an `act` claim may nest (RFC 8693 §4.1); deeper is refused as malformed.
pub const MAX_ACT_DEPTH: usize = 16;

/// The `act` claim of a delegated token (RFC 8693 §4.1): the actor (a workload's SPIFFE ID),
/// and inside it the actor before it, back to the first one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's SPIFFE ID.
    pub sub: String,
    /// The previous actor, if this one acts on a token that was itself delegated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The chain of actors, the current (outermost) one first.
    pub fn chain(&self) -> Vec<&str> {
        let mut out = vec![self.sub.as_str()];
        let mut next = self.act.as_deref();
        while let Some(a) = next {
            out.push(a.sub.as_str());
            next = a.act.as_deref();
        }
        out
    }

    /// A chain as an `act` claim: `chain[0]` outermost.
    pub fn from_chain(chain: &[String]) -> Option<Self> {
        let mut inner: Option<Box<Actor>> = None;
        for sub in chain.iter().rev() {
            inner = Some(Box::new(Actor {
                sub: sub.clone(),
                act: inner,
            }));
        }
        inner.map(|b| *b)
    }
}

/// The claims of an RFC 9068 access token bound to a client certificate or a DPoP key. A
/// delegated token (RFC 8693 token exchange) has the user as `sub`, the chain of workloads
/// acting for them in `act`, and the user's groups in `user_groups`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AccessTokenClaims {
    /// Issuer (the authorization server's URL).
    pub iss: String,
    /// Subject: for sigil, the client's SPIFFE ID.
    pub sub: String,
    /// Audiences (resource servers).
    pub aud: Vec<String>,
    /// OAuth client ID.
    pub client_id: String,
    /// Granted scopes, space-separated (may be empty).
    pub scope: String,
    /// Unique token ID.
    pub jti: String,
    /// Issued at.
    pub iat: i64,
    /// Not before, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Groups of the client (RFC 9068 §2.2.3.1), from its registration entries; for policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Expiry.
    pub exp: i64,
    /// Certificate or DPoP key binding.
    pub cnf: Confirmation,
    /// The actors of a delegated token, the current one outermost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// The user's groups (from their issuer's groups claim), in a delegated token.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_groups: Vec<String>,
    /// The trust authority's view of the risk of the client's node when it issued the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskClaim>,
}

/// The `risk` claim: the client's node, its risk level (`low`, `medium`, `high`,
/// `critical`) and score (0-100), and when the trust authority assessed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskClaim {
    pub level: String,
    pub score: i64,
    pub at: i64,
    pub node: String,
}

impl AccessTokenClaims {
    /// The granted scopes.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|s| !s.is_empty())
    }

    /// Whether `scope` was granted.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|s| s == scope)
    }

    /// The workload presenting the token: the current actor of a delegated token, else the
    /// subject.
    pub fn presenter(&self) -> &str {
        self.act
            .as_ref()
            .map_or(self.sub.as_str(), |a| a.sub.as_str())
    }

    /// How many workloads a delegated token passed through (0: not delegated).
    pub fn delegation_depth(&self) -> usize {
        self.act.as_ref().map_or(0, |a| a.chain().len())
    }

    /// Checks the token is bound to the certificate the client presented on this connection
    /// (RFC 8705 section 3): `cnf.x5t#S256` must equal the thumbprint of `leaf_der`.
    pub fn confirm_certificate(&self, leaf_der: &[u8]) -> Result<(), JwtError> {
        if self.cnf.x5t_s256 == x5t_s256(leaf_der) {
            Ok(())
        } else {
            Err(JwtError::CertificateMismatch)
        }
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

#[derive(Deserialize)]
struct HeaderIn {
    alg: Option<String>,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<serde_json::Value>,
}

/// Signs JWT-SVIDs and access tokens with one key.
pub struct JwtSigner {
    alg: JwtAlgorithm,
    key: rcgen::KeyPair,
    enc: EncodingKey,
    jwk: Jwk,
    kid: String,
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// A signer with a fresh random key.
    pub fn generate(alg: JwtAlgorithm) -> Result<Self, PkiError> {
        Self::from_key(alg, generate_rcgen_key(alg.key_algorithm())?)
    }

    /// A signer from a PKCS#8 PEM private key of the algorithm's type.
    pub fn from_pkcs8_pem(pem: &str, alg: JwtAlgorithm) -> Result<Self, PkiError> {
        let der = pem_decode_one(pem, &["PRIVATE KEY"])?;
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_slice()),
            alg.key_algorithm().rcgen_alg(),
        )
        .map_err(|e| PkiError::InvalidKey(format!("not a PKCS#8 {alg} key: {e}")))?;
        Self::from_key(alg, key)
    }

    fn from_key(alg: JwtAlgorithm, key: rcgen::KeyPair) -> Result<Self, PkiError> {
        let raw = key.public_key_raw();
        let mut jwk = match alg {
            JwtAlgorithm::Es256 => {
                let (x, y) = split_uncompressed_point(raw, 32)
                    .ok_or_else(|| PkiError::InvalidKey("unexpected P-256 point".into()))?;
                Jwk::bare("EC", "P-256", b64url(x), Some(b64url(y)))
            }
            JwtAlgorithm::EdDsa => Jwk::bare("OKP", "Ed25519", b64url(raw), None),
        };
        let kid = jwk.thumbprint()?;
        jwk.kid = Some(kid.clone());
        jwk.alg = Some(alg.as_str().into());
        jwk.use_ = Some("sig".into());
        let enc = match alg {
            JwtAlgorithm::Es256 => EncodingKey::from_ec_der(key.serialized_der()),
            JwtAlgorithm::EdDsa => EncodingKey::from_ed_der(key.serialized_der()),
        };
        // Fail now, not at the first mint, if the crypto library refuses the key.
        jsonwebtoken::crypto::sign(b"probe", &enc, alg.jose())
            .map_err(|e| PkiError::InvalidKey(e.to_string()))?;
        Ok(Self {
            alg,
            key,
            enc,
            jwk,
            kid,
        })
    }

    /// The private key as PKCS#8 PEM. Secret: write with mode 0600.
    pub fn pkcs8_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The key ID: the RFC 7638 JWK thumbprint (SHA-256, base64url).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The signing algorithm.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.alg
    }

    /// The public key as a JWK with `kid`, `alg` and `use: "sig"`.
    pub fn public_jwk(&self) -> Jwk {
        self.jwk.clone()
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }

    /// Mints a JWT-SVID: header `{alg, kid, typ: "JWT"}`, claims `sub`, `aud` (array), `exp`,
    /// `iat`, `jti`.
    pub fn mint_jwt_svid(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl_secs: u32,
        now: UnixTime,
    ) -> Result<(String, JwtSvidClaims), PkiError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(PkiError::EmptyAudience);
        }
        if ttl_secs == 0 {
            return Err(PkiError::InvalidTtl("JWT-SVID TTL must be positive"));
        }
        if sub.path().is_empty() {
            return Err(PkiError::NotAWorkloadId(sub.to_string()));
        }
        let claims = JwtSvidClaims {
            sub: sub.to_string(),
            aud: audience.to_vec(),
            exp: now.saturating_add(i64::from(ttl_secs)),
            iat: now,
            jti: Some(hex::encode(random_bytes::<16>()?)),
        };
        let token = self.sign("JWT", &claims)?;
        Ok((token, claims))
    }

    /// Mints an RFC 9068 access token (header `typ: "at+jwt"`) with the given claims.
    pub fn mint_access_token(&self, claims: &AccessTokenClaims) -> Result<String, PkiError> {
        for (name, value) in [
            ("iss", &claims.iss),
            ("sub", &claims.sub),
            ("client_id", &claims.client_id),
            ("jti", &claims.jti),
        ] {
            if value.is_empty() {
                return Err(PkiError::EmptyClaim(name));
            }
        }
        // Exactly one binding: a certificate or a DPoP key.
        match (&claims.cnf.x5t_s256, &claims.cnf.jkt) {
            (x, None) if !x.is_empty() => {}
            (x, Some(j)) if x.is_empty() && !j.is_empty() => {}
            _ => return Err(PkiError::EmptyClaim("cnf.x5t#S256")),
        }
        if claims.aud.is_empty() || claims.aud.iter().any(String::is_empty) {
            return Err(PkiError::EmptyAudience);
        }
        if claims.exp <= claims.iat {
            return Err(PkiError::InvalidTtl("exp must be after iat"));
        }
        self.sign(ACCESS_TOKEN_TYP, claims)
    }

    fn sign<T: Serialize>(&self, typ: &'static str, claims: &T) -> Result<String, PkiError> {
        let header = serde_json::to_vec(&HeaderOut {
            alg: self.alg.as_str(),
            kid: &self.kid,
            typ,
        })
        .map_err(|e| PkiError::Signing(e.to_string()))?;
        let payload = serde_json::to_vec(claims).map_err(|e| PkiError::Signing(e.to_string()))?;
        let mut token = format!("{}.{}", b64url(&header), b64url(&payload));
        let sig = jsonwebtoken::crypto::sign(token.as_bytes(), &self.enc, self.alg.jose())
            .map_err(|e| PkiError::Signing(e.to_string()))?;
        token.push('.');
        token.push_str(&sig);
        Ok(token)
    }
}

/// A JWS whose signature verified: the header's `typ`, the payload bytes, and the key.
struct VerifiedJws {
    typ: Option<String>,
    payload: Vec<u8>,
    key: JwtKeyRef,
}

/// Checks structure, header and signature. Nothing from the payload is read before the
/// signature verifies.
fn verify_jws(token: &str, keys: &JwtKeySet) -> Result<VerifiedJws, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("a JWT has exactly three segments"));
    };
    if h64.is_empty() || p64.is_empty() || s64.is_empty() {
        return Err(JwtError::Malformed("empty segment"));
    }
    let header_bytes = b64url_decode(h64).ok_or(JwtError::Malformed("header is not base64url"))?;
    let header: HeaderIn = serde_json::from_slice(&header_bytes)
        .map_err(|_| JwtError::Malformed("header is not a JSON object"))?;
    if header.crit.is_some() {
        return Err(JwtError::UnsupportedCritical);
    }
    let alg_name = header.alg.ok_or(JwtError::Malformed("header has no alg"))?;
    let alg = JwtAlgorithm::from_header(&alg_name)
        .ok_or_else(|| JwtError::UnsupportedAlgorithm(alg_name.clone()))?;
    let kid = header.kid.ok_or(JwtError::MissingKid)?;
    let Some(key) = keys.get(&kid) else {
        return Err(JwtError::UnknownKey(kid));
    };
    if key.alg != alg {
        return Err(JwtError::AlgorithmMismatch {
            header: alg_name,
            key: key.alg.as_str(),
        });
    }
    let sig = b64url_decode(s64).ok_or(JwtError::Malformed("signature is not base64url"))?;
    if sig.len() != 64 {
        return Err(JwtError::BadSignature);
    }
    let signing_input_len = h64.len().saturating_add(1).saturating_add(p64.len());
    let signing_input = token
        .get(..signing_input_len)
        .ok_or(JwtError::Malformed("segment bounds"))?;
    // JWS ES256 signatures are the fixed-size r||s form (RFC 7518 §3.4), EdDSA's are 64 bytes.
    key.key
        .verify_sig(signing_input.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature)?;
    let payload = b64url_decode(p64).ok_or(JwtError::Malformed("payload is not base64url"))?;
    Ok(VerifiedJws {
        typ: header.typ,
        payload,
        key: key.key_ref(kid),
    })
}

/// `aud` as a string or an array of strings (RFC 7519 section 4.1.3).
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<Aud>::deserialize(d)?.map(|a| match a {
        Aud::One(s) => vec![s],
        Aud::Many(v) => v,
    }))
}

#[derive(Deserialize)]
struct RawSvidClaims {
    sub: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    aud: Option<Vec<String>>,
    exp: Option<i64>,
    iat: Option<i64>,
    nbf: Option<i64>,
    jti: Option<String>,
}

#[derive(Deserialize)]
struct RawConfirmation {
    #[serde(rename = "x5t#S256")]
    x5t_s256: Option<String>,
    jkt: Option<String>,
}

#[derive(Deserialize)]
struct RawAccessClaims {
    iss: Option<String>,
    sub: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    aud: Option<Vec<String>>,
    client_id: Option<String>,
    scope: Option<String>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    jti: Option<String>,
    iat: Option<i64>,
    nbf: Option<i64>,
    exp: Option<i64>,
    cnf: Option<RawConfirmation>,
    act: Option<Actor>,
    #[serde(default)]
    user_groups: Option<Vec<String>>,
    risk: Option<RiskClaim>,
}

fn check_time(
    exp: i64,
    nbf: Option<i64>,
    iat: Option<i64>,
    now: UnixTime,
    leeway_secs: i64,
) -> Result<(), JwtError> {
    let leeway = leeway_secs.max(0);
    if exp <= now.saturating_sub(leeway) {
        return Err(JwtError::Expired);
    }
    let horizon = now.saturating_add(leeway);
    if nbf.is_some_and(|t| t > horizon) || iat.is_some_and(|t| t > horizon) {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

fn check_audience(aud: &[String], audience: &str) -> Result<(), JwtError> {
    if audience.is_empty() || !aud.iter().any(|a| a == audience) {
        return Err(JwtError::WrongAudience);
    }
    Ok(())
}

/// Validates a JWT-SVID: structure, `alg` (ES256/EdDSA matching the key), known `kid`,
/// signature, `typ` absent or `JWT`/`JOSE`, `exp` present and not past, `nbf`/`iat` not in the
/// future (all with `leeway_secs` against `now`), `aud` containing `audience`, and `sub` a
/// SPIFFE ID with a path in `trust_domain`.
pub fn validate_jwt_svid(
    token: &str,
    keys: &JwtKeySet,
    trust_domain: &TrustDomain,
    audience: &str,
    now: UnixTime,
    leeway_secs: i64,
) -> Result<JwtSvidClaims, JwtError> {
    let VerifiedJws { typ, payload, .. } = verify_jws(token, keys)?;
    if !matches!(typ.as_deref(), None | Some("JWT") | Some("JOSE")) {
        return Err(JwtError::WrongType);
    }
    let raw: RawSvidClaims = serde_json::from_slice(&payload)
        .map_err(|_| JwtError::Malformed("claims are not a valid JSON object"))?;
    let exp = raw.exp.ok_or(JwtError::MissingClaim("exp"))?;
    let aud = raw.aud.ok_or(JwtError::MissingClaim("aud"))?;
    let sub = raw.sub.ok_or(JwtError::MissingClaim("sub"))?;
    check_time(exp, raw.nbf, raw.iat, now, leeway_secs)?;
    check_audience(&aud, audience)?;
    let id = SpiffeId::new(&sub).map_err(|e| JwtError::BadSubject(e.to_string()))?;
    if !id.is_member_of(trust_domain) {
        return Err(JwtError::BadSubject(format!(
            "{id} is not in trust domain {trust_domain}"
        )));
    }
    if id.path().is_empty() {
        return Err(JwtError::BadSubject(format!("{id} has no path")));
    }
    Ok(JwtSvidClaims {
        sub,
        aud,
        exp,
        iat: raw.iat.unwrap_or(0),
        jti: raw.jti,
    })
}

/// Validates an RFC 9068 access token: the checks of [`validate_jwt_svid`] on structure,
/// algorithm, key, signature and time, plus `typ` = `at+jwt`, `iss` = `issuer`, `aud`
/// containing `audience`, and `sub`, `client_id`, `iat`, `jti` and `cnf.x5t#S256` present.
/// The caller must then check the binding with [`AccessTokenClaims::confirm_certificate`].
pub fn validate_access_token(
    token: &str,
    keys: &JwtKeySet,
    issuer: &str,
    audience: &str,
    now: UnixTime,
    leeway_secs: i64,
) -> Result<AccessTokenClaims, JwtError> {
    validate_access_token_keyed(token, keys, issuer, audience, now, leeway_secs)
        .map(|(claims, _)| claims)
}

/// [`validate_access_token`], also returning the key that verified the token, so that a
/// cached verdict can be dropped once [`JwtKeySet::holds`] says that key left the set.
pub fn validate_access_token_keyed(
    token: &str,
    keys: &JwtKeySet,
    issuer: &str,
    audience: &str,
    now: UnixTime,
    leeway_secs: i64,
) -> Result<(AccessTokenClaims, JwtKeyRef), JwtError> {
    let VerifiedJws { typ, payload, key } = verify_jws(token, keys)?;
    let typ_ok = typ.is_some_and(|t| {
        t.eq_ignore_ascii_case(ACCESS_TOKEN_TYP) || t.eq_ignore_ascii_case("application/at+jwt")
    });
    if !typ_ok {
        return Err(JwtError::WrongType);
    }
    let raw: RawAccessClaims = serde_json::from_slice(&payload)
        .map_err(|_| JwtError::Malformed("claims are not a valid JSON object"))?;
    let iss = raw.iss.ok_or(JwtError::MissingClaim("iss"))?;
    let exp = raw.exp.ok_or(JwtError::MissingClaim("exp"))?;
    let aud = raw.aud.ok_or(JwtError::MissingClaim("aud"))?;
    let sub = raw.sub.ok_or(JwtError::MissingClaim("sub"))?;
    let client_id = raw.client_id.ok_or(JwtError::MissingClaim("client_id"))?;
    let iat = raw.iat.ok_or(JwtError::MissingClaim("iat"))?;
    let jti = raw.jti.ok_or(JwtError::MissingClaim("jti"))?;
    let cnf = raw.cnf.ok_or(JwtError::MissingClaim("cnf.x5t#S256"))?;
    let cnf = match (cnf.x5t_s256, cnf.jkt) {
        (Some(x5t), None) => Confirmation {
            x5t_s256: x5t,
            jkt: None,
        },
        (None, Some(jkt)) => Confirmation {
            x5t_s256: String::new(),
            jkt: Some(jkt),
        },
        (None, None) => return Err(JwtError::MissingClaim("cnf.x5t#S256")),
        (Some(_), Some(_)) => {
            return Err(JwtError::Malformed("cnf has both x5t#S256 and jkt"));
        }
    };
    if issuer.is_empty() || iss != issuer {
        return Err(JwtError::WrongIssuer);
    }
    check_time(exp, raw.nbf, Some(iat), now, leeway_secs)?;
    check_audience(&aud, audience)?;
    if sub.is_empty() {
        return Err(JwtError::BadSubject("empty".into()));
    }
    let thumbprint = cnf.jkt.as_deref().unwrap_or(&cnf.x5t_s256);
    if b64url_decode(thumbprint).is_none_or(|d| d.len() != 32) {
        return Err(JwtError::Malformed(
            "cnf.x5t#S256 is not a base64url SHA-256",
        ));
    }
    if let Some(r) = &raw.risk
        && (!(0..=100).contains(&r.score)
            || !matches!(r.level.as_str(), "low" | "medium" | "high" | "critical"))
    {
        return Err(JwtError::Malformed(
            "risk has an unknown level or a score outside 0-100",
        ));
    }
    if let Some(act) = &raw.act {
        let chain = act.chain();
        if chain.len() > MAX_ACT_DEPTH || chain.iter().any(|s| s.is_empty()) {
            return Err(JwtError::Malformed("act nests too deep or names no actor"));
        }
    }
    let claims = AccessTokenClaims {
        iss,
        sub,
        aud,
        client_id,
        scope: raw.scope.unwrap_or_default(),
        jti,
        iat,
        nbf: raw.nbf,
        groups: raw.groups.unwrap_or_default(),
        exp,
        cnf,
        act: raw.act,
        user_groups: raw.user_groups.unwrap_or_default(),
        risk: raw.risk,
    };
    Ok((claims, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;
    const ISS: &str = "https://sigil.example.org";

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn workload() -> SpiffeId {
        td().id("/ns/prod/sa/api").unwrap()
    }

    fn keys_for(signers: &[&JwtSigner]) -> JwtKeySet {
        let jwks: Vec<Jwk> = signers.iter().map(|s| s.public_jwk()).collect();
        JwtKeySet::from_jwks(&jwks).unwrap()
    }

    fn at_claims() -> AccessTokenClaims {
        AccessTokenClaims {
            groups: vec!["factory-floor".into()],
            iss: ISS.into(),
            sub: workload().to_string(),
            aud: vec!["https://api.example.org".into()],
            client_id: "client-1".into(),
            scope: "read write".into(),
            jti: "jti-1".into(),
            iat: NOW,
            nbf: Some(NOW),
            exp: NOW + 300,
            cnf: Confirmation {
                x5t_s256: x5t_s256(b"the client certificate"),
                jkt: None,
            },
            ..Default::default()
        }
    }

    /// Signs an arbitrary header and claims with the signer's real key.
    fn forge(signer: &JwtSigner, header: serde_json::Value, claims: serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &signer.enc, signer.alg.jose()).unwrap();
        format!("{input}.{sig}")
    }

    fn svid_claims(sub: &str, exp: i64) -> serde_json::Value {
        json!({"sub": sub, "aud": ["aud-1"], "exp": exp, "iat": NOW})
    }

    fn validate(token: &str, keys: &JwtKeySet) -> Result<JwtSvidClaims, JwtError> {
        validate_jwt_svid(token, keys, &td(), "aud-1", NOW, 0)
    }

    #[test]
    fn jwt_svid_round_trip() {
        for alg in [JwtAlgorithm::Es256, JwtAlgorithm::EdDsa] {
            let signer = JwtSigner::generate(alg).unwrap();
            let keys = keys_for(&[&signer]);
            let (token, claims) = signer
                .mint_jwt_svid(&workload(), &["aud-1".into(), "aud-2".into()], 300, NOW)
                .unwrap();
            let got = validate_jwt_svid(&token, &keys, &td(), "aud-2", NOW + 10, 0).unwrap();
            assert_eq!(got, claims);
            assert_eq!(got.exp, NOW + 300);
            assert!(got.jti.is_some());
            // The header is exactly {alg, kid, typ}.
            let h64 = token.split('.').next().unwrap();
            let header: serde_json::Value =
                serde_json::from_slice(&b64url_decode(h64).unwrap()).unwrap();
            assert_eq!(
                header,
                json!({"alg": alg.as_str(), "kid": signer.kid(), "typ": "JWT"})
            );
        }
    }

    #[test]
    fn signer_pem_round_trip_and_kid_is_a_thumbprint() {
        for alg in [JwtAlgorithm::Es256, JwtAlgorithm::EdDsa] {
            let signer = JwtSigner::generate(alg).unwrap();
            let back = JwtSigner::from_pkcs8_pem(&signer.pkcs8_pem(), alg).unwrap();
            assert_eq!(back.kid(), signer.kid());
            assert_eq!(back.spki_der(), signer.spki_der());
            assert_eq!(signer.public_jwk().thumbprint().unwrap(), signer.kid());
            assert_eq!(signer.kid().len(), 43);
            let jwk = Jwk::from_spki_der(&signer.spki_der()).unwrap();
            assert_eq!(jwk.thumbprint().unwrap(), signer.kid());
        }
        let es = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        assert!(JwtSigner::from_pkcs8_pem(&es.pkcs8_pem(), JwtAlgorithm::EdDsa).is_err());
    }

    #[test]
    fn mint_refuses_bad_input() {
        let s = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        assert_eq!(
            s.mint_jwt_svid(&workload(), &[], 60, NOW).unwrap_err(),
            PkiError::EmptyAudience
        );
        assert_eq!(
            s.mint_jwt_svid(&workload(), &[String::new()], 60, NOW)
                .unwrap_err(),
            PkiError::EmptyAudience
        );
        assert!(s.mint_jwt_svid(&workload(), &["a".into()], 0, NOW).is_err());
        assert!(
            s.mint_jwt_svid(
                &SpiffeId::new("spiffe://example.org").unwrap(),
                &["a".into()],
                60,
                NOW
            )
            .is_err()
        );
        let mut c = at_claims();
        c.cnf.x5t_s256.clear();
        assert_eq!(
            s.mint_access_token(&c).unwrap_err(),
            PkiError::EmptyClaim("cnf.x5t#S256")
        );
    }

    #[test]
    fn refuses_a_changed_signature_or_payload() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer]);
        let (token, _) = signer
            .mint_jwt_svid(&workload(), &["aud-1".into()], 60, NOW)
            .unwrap();
        let (input, s64) = token.rsplit_once('.').unwrap();
        let mut sig = b64url_decode(s64).unwrap();
        sig[10] ^= 0x01;
        let bad = format!("{input}.{}", b64url(&sig));
        assert_eq!(validate(&bad, &keys), Err(JwtError::BadSignature));
        // Another subject with the original signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let evil = b64url(
            svid_claims("spiffe://example.org/admin", NOW + 60)
                .to_string()
                .as_bytes(),
        );
        parts[1] = &evil;
        assert_eq!(
            validate(&parts.join("."), &keys),
            Err(JwtError::BadSignature)
        );
        // A signature from a different key that claims the same kid.
        let other = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let forged = forge(
            &other,
            json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"}),
            svid_claims(workload().as_str(), NOW + 60),
        );
        assert_eq!(validate(&forged, &keys), Err(JwtError::BadSignature));
    }

    #[test]
    fn refuses_alg_none_hs256_rs256_and_mismatch() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer]);
        let claims = svid_claims(workload().as_str(), NOW + 60);
        let enc = |v: &serde_json::Value| b64url(v.to_string().as_bytes());

        let none_header = json!({"alg": "none", "kid": signer.kid(), "typ": "JWT"});
        let none = format!("{}.{}.", enc(&none_header), enc(&claims));
        assert!(validate(&none, &keys).is_err());
        let none_sig = format!("{}.{}.AAAA", enc(&none_header), enc(&claims));
        assert_eq!(
            validate(&none_sig, &keys),
            Err(JwtError::UnsupportedAlgorithm("none".into()))
        );

        // HS256 "signed" with the public key as the HMAC secret, in every form it is published.
        let jwk_json = serde_json::to_string(&signer.public_jwk()).unwrap();
        let spki_pem = crate::keys::pem_encode("PUBLIC KEY", &signer.spki_der());
        for secret in [
            signer.spki_der(),
            spki_pem.into_bytes(),
            jwk_json.into_bytes(),
            b64url_decode(&signer.public_jwk().x).unwrap(),
        ] {
            let header = jsonwebtoken::Header {
                kid: Some(signer.kid().to_owned()),
                ..jsonwebtoken::Header::new(Algorithm::HS256)
            };
            let token =
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
            assert_eq!(
                validate(&token, &keys),
                Err(JwtError::UnsupportedAlgorithm("HS256".into()))
            );
        }

        let rs = format!(
            "{}.{}.{}",
            enc(&json!({"alg": "RS256", "kid": signer.kid()})),
            enc(&claims),
            b64url(&[1u8; 256])
        );
        assert_eq!(
            validate(&rs, &keys),
            Err(JwtError::UnsupportedAlgorithm("RS256".into()))
        );

        // An EdDSA header naming the ES256 key.
        let ed = JwtSigner::generate(JwtAlgorithm::EdDsa).unwrap();
        let confused = forge(
            &ed,
            json!({"alg": "EdDSA", "kid": signer.kid(), "typ": "JWT"}),
            claims.clone(),
        );
        assert!(matches!(
            validate(&confused, &keys),
            Err(JwtError::AlgorithmMismatch { .. })
        ));
        // Case matters: "es256" is not ES256.
        let lower = forge(
            &signer,
            json!({"alg": "es256", "kid": signer.kid()}),
            claims,
        );
        assert!(matches!(
            validate(&lower, &keys),
            Err(JwtError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn refuses_unknown_and_missing_kid_and_crit() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer]);
        let claims = svid_claims(workload().as_str(), NOW + 60);
        let unknown = forge(
            &signer,
            json!({"alg": "ES256", "kid": "nope"}),
            claims.clone(),
        );
        assert_eq!(
            validate(&unknown, &keys),
            Err(JwtError::UnknownKey("nope".into()))
        );
        let missing = forge(
            &signer,
            json!({"alg": "ES256", "typ": "JWT"}),
            claims.clone(),
        );
        assert_eq!(validate(&missing, &keys), Err(JwtError::MissingKid));
        let crit = forge(
            &signer,
            json!({"alg": "ES256", "kid": signer.kid(), "crit": ["b64"], "b64": false}),
            claims.clone(),
        );
        assert_eq!(validate(&crit, &keys), Err(JwtError::UnsupportedCritical));
        // A token signed by a key that is not in the set.
        let other = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let (token, _) = other
            .mint_jwt_svid(&workload(), &["aud-1".into()], 60, NOW)
            .unwrap();
        assert!(matches!(
            validate(&token, &keys),
            Err(JwtError::UnknownKey(_))
        ));
        assert!(matches!(
            validate(&token, &JwtKeySet::default()),
            Err(JwtError::UnknownKey(_))
        ));
    }

    #[test]
    fn refuses_structural_tricks() {
        let signer = JwtSigner::generate(JwtAlgorithm::EdDsa).unwrap();
        let keys = keys_for(&[&signer]);
        let (token, _) = signer
            .mint_jwt_svid(&workload(), &["aud-1".into()], 60, NOW)
            .unwrap();
        assert!(validate(&token, &keys).is_ok());
        for bad in [
            format!("{token}A"),
            format!("{token}AA"),
            format!("{token}="),
            format!("{token} "),
            format!("{token}\n"),
            format!(" {token}"),
            format!("{token}."),
            format!("{token}.e30"),
            format!("{token}.{token}"),
            token.replacen('.', "..", 1),
            token.split('.').take(2).collect::<Vec<_>>().join("."),
            String::new(),
            "a.b.c".into(),
            "a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(validate(&bad, &keys).is_err(), "accepted {bad:?}");
        }
        // Padding on a segment.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[0].push('=');
        assert!(matches!(
            validate(&parts.join("."), &keys),
            Err(JwtError::Malformed(_))
        ));
        // Standard (non-URL) alphabet in the signature.
        let std_sig = token.replace('-', "+").replace('_', "/");
        if std_sig != token {
            assert!(validate(&std_sig, &keys).is_err());
        }
        // Claims that are not an object, and duplicate header members.
        let arr = forge(
            &signer,
            json!({"alg": "EdDSA", "kid": signer.kid()}),
            json!([1]),
        );
        assert!(matches!(validate(&arr, &keys), Err(JwtError::Malformed(_))));
        let h = format!(r#"{{"alg":"EdDSA","kid":"{}","alg":"none"}}"#, signer.kid());
        let input = format!(
            "{}.{}",
            b64url(h.as_bytes()),
            b64url(
                svid_claims(workload().as_str(), NOW + 60)
                    .to_string()
                    .as_bytes()
            )
        );
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &signer.enc, Algorithm::EdDSA).unwrap();
        assert!(matches!(
            validate(&format!("{input}.{sig}"), &keys),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn checks_time_against_injected_now() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer]);
        let (token, _) = signer
            .mint_jwt_svid(&workload(), &["aud-1".into()], 60, NOW)
            .unwrap();
        let at = |now, leeway| validate_jwt_svid(&token, &keys, &td(), "aud-1", now, leeway);
        assert!(at(NOW + 59, 0).is_ok());
        assert_eq!(at(NOW + 60, 0), Err(JwtError::Expired));
        assert!(at(NOW + 60, 5).is_ok());
        assert_eq!(at(NOW + 65, 5), Err(JwtError::Expired));
        // Negative leeway is treated as zero.
        assert!(at(NOW + 59, -100).is_ok());
        // iat in the future.
        assert_eq!(at(NOW - 10, 0), Err(JwtError::NotYetValid));
        assert!(at(NOW - 10, 10).is_ok());
        // nbf in the future.
        let nbf = forge(
            &signer,
            json!({"alg": "ES256", "kid": signer.kid()}),
            json!({"sub": workload().as_str(), "aud": "aud-1", "exp": NOW + 600, "nbf": NOW + 100}),
        );
        assert_eq!(validate(&nbf, &keys), Err(JwtError::NotYetValid));
        assert!(validate_jwt_svid(&nbf, &keys, &td(), "aud-1", NOW + 100, 0).is_ok());
        // exp is required, and must be an integer.
        let no_exp = forge(
            &signer,
            json!({"alg": "ES256", "kid": signer.kid()}),
            json!({"sub": workload().as_str(), "aud": "aud-1"}),
        );
        assert_eq!(validate(&no_exp, &keys), Err(JwtError::MissingClaim("exp")));
        let str_exp = forge(
            &signer,
            json!({"alg": "ES256", "kid": signer.kid()}),
            json!({"sub": workload().as_str(), "aud": "aud-1", "exp": "9999999999"}),
        );
        assert!(matches!(
            validate(&str_exp, &keys),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn checks_audience_subject_and_type() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer]);
        let (token, _) = signer
            .mint_jwt_svid(&workload(), &["aud-1".into()], 60, NOW)
            .unwrap();
        assert_eq!(
            validate_jwt_svid(&token, &keys, &td(), "aud-2", NOW, 0),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            validate_jwt_svid(&token, &keys, &td(), "", NOW, 0),
            Err(JwtError::WrongAudience)
        );
        // Same key, another trust domain expected.
        let other_td = TrustDomain::new("other.org").unwrap();
        assert!(matches!(
            validate_jwt_svid(&token, &keys, &other_td, "aud-1", NOW, 0),
            Err(JwtError::BadSubject(_))
        ));
        let header = json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"});
        for sub in [
            "spiffe://evil.org/api",
            "spiffe://example.org",
            "not-an-id",
            "",
        ] {
            let t = forge(&signer, header.clone(), svid_claims(sub, NOW + 60));
            assert!(
                matches!(validate(&t, &keys), Err(JwtError::BadSubject(_))),
                "{sub}"
            );
        }
        // A single-string aud is accepted.
        let t = forge(
            &signer,
            header.clone(),
            json!({"sub": workload().as_str(), "aud": "aud-1", "exp": NOW + 60}),
        );
        assert!(validate(&t, &keys).is_ok());
        // An access token is not a JWT-SVID.
        let mut c = at_claims();
        c.aud = vec!["aud-1".into()];
        let at = signer.mint_access_token(&c).unwrap();
        assert_eq!(validate(&at, &keys), Err(JwtError::WrongType));
    }

    #[test]
    fn keyed_validation_names_the_key_a_later_key_set_may_no_longer_hold() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let other = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer, &other]);
        let token = signer.mint_access_token(&at_claims()).unwrap();
        let (claims, key) =
            validate_access_token_keyed(&token, &keys, ISS, "https://api.example.org", NOW, 0)
                .unwrap();
        assert_eq!(claims, at_claims());
        assert_eq!(key.kid(), signer.kid());
        assert!(keys.holds(&key));
        assert!(keys_for(&[&signer]).holds(&key));
        // Rotated out.
        assert!(!keys_for(&[&other]).holds(&key));
        assert!(!JwtKeySet::default().holds(&key));
        // Another key published under the same kid is not the key that verified the token.
        let mut impostor = other.public_jwk();
        impostor.kid = Some(signer.kid().to_owned());
        assert!(!JwtKeySet::from_jwks(&[impostor]).unwrap().holds(&key));
    }

    #[test]
    fn access_token_round_trip_and_binding() {
        for alg in [JwtAlgorithm::Es256, JwtAlgorithm::EdDsa] {
            let signer = JwtSigner::generate(alg).unwrap();
            let keys = keys_for(&[&signer]);
            let claims = at_claims();
            let token = signer.mint_access_token(&claims).unwrap();
            let got = validate_access_token(&token, &keys, ISS, "https://api.example.org", NOW, 0)
                .unwrap();
            assert_eq!(got, claims);
            assert!(got.has_scope("write") && !got.has_scope("admin"));
            assert!(got.confirm_certificate(b"the client certificate").is_ok());
            assert_eq!(
                got.confirm_certificate(b"another certificate"),
                Err(JwtError::CertificateMismatch)
            );
            let h64 = token.split('.').next().unwrap();
            let header: serde_json::Value =
                serde_json::from_slice(&b64url_decode(h64).unwrap()).unwrap();
            assert_eq!(header["typ"], "at+jwt");
            let p64 = token.split('.').nth(1).unwrap();
            let payload: serde_json::Value =
                serde_json::from_slice(&b64url_decode(p64).unwrap()).unwrap();
            assert_eq!(payload["cnf"]["x5t#S256"], claims.cnf.x5t_s256);
        }
    }

    #[test]
    fn the_risk_claim_round_trips_and_a_bad_one_is_refused() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer]);
        let check =
            |t: &str| validate_access_token(t, &keys, ISS, "https://api.example.org", NOW, 0);
        let risk = RiskClaim {
            level: "medium".into(),
            score: 40,
            at: NOW - 5,
            node: "spiffe://example.org/sigil/node/n1".into(),
        };
        let claims = AccessTokenClaims {
            risk: Some(risk.clone()),
            ..at_claims()
        };
        let token = signer.mint_access_token(&claims).unwrap();
        assert_eq!(check(&token).unwrap().risk, Some(risk));
        let header = json!({"alg": "ES256", "kid": signer.kid(), "typ": "at+jwt"});
        for bad in [
            json!({"level": "bogus", "score": 1, "at": NOW, "node": "n"}),
            json!({"level": "low", "score": 101, "at": NOW, "node": "n"}),
            json!({"level": "low", "score": -1, "at": NOW, "node": "n"}),
            json!({"level": "low", "score": 1, "at": NOW}),
            json!({"level": "low", "score": 1, "at": NOW, "node": "n", "extra": 1}),
            json!("low"),
        ] {
            let mut body = serde_json::to_value(at_claims()).unwrap();
            body["risk"] = bad.clone();
            assert!(
                matches!(
                    check(&forge(&signer, header.clone(), body)),
                    Err(JwtError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn access_token_refusals() {
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let keys = keys_for(&[&signer]);
        let check =
            |t: &str| validate_access_token(t, &keys, ISS, "https://api.example.org", NOW, 0);
        let token = signer.mint_access_token(&at_claims()).unwrap();
        assert!(check(&token).is_ok());
        assert_eq!(
            validate_access_token(
                &token,
                &keys,
                "https://evil.example",
                "https://api.example.org",
                NOW,
                0
            ),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            validate_access_token(&token, &keys, ISS, "https://other.example.org", NOW, 0),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            validate_access_token(&token, &keys, ISS, "https://api.example.org", NOW + 300, 0),
            Err(JwtError::Expired)
        );
        let body = serde_json::to_value(at_claims()).unwrap();
        // typ JWT, no typ, and a JWT-SVID are all refused.
        for header in [
            json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"}),
            json!({"alg": "ES256", "kid": signer.kid()}),
        ] {
            assert_eq!(
                check(&forge(&signer, header, body.clone())),
                Err(JwtError::WrongType)
            );
        }
        let (svid, _) = signer
            .mint_jwt_svid(&workload(), &["https://api.example.org".into()], 60, NOW)
            .unwrap();
        assert_eq!(check(&svid), Err(JwtError::WrongType));
        // application/at+jwt is the same type.
        let app = forge(
            &signer,
            json!({"alg": "ES256", "kid": signer.kid(), "typ": "application/at+jwt"}),
            body.clone(),
        );
        assert!(check(&app).is_ok());
        // Required claims.
        let at_header = json!({"alg": "ES256", "kid": signer.kid(), "typ": "at+jwt"});
        for (claim, name) in [
            ("cnf", "cnf.x5t#S256"),
            ("iss", "iss"),
            ("client_id", "client_id"),
            ("jti", "jti"),
            ("iat", "iat"),
            ("exp", "exp"),
            ("sub", "sub"),
            ("aud", "aud"),
        ] {
            let mut b = body.clone();
            b.as_object_mut().unwrap().remove(claim);
            assert_eq!(
                check(&forge(&signer, at_header.clone(), b)),
                Err(JwtError::MissingClaim(name)),
                "{claim}"
            );
        }
        let mut b = body.clone();
        b["cnf"] = json!({});
        assert_eq!(
            check(&forge(&signer, at_header.clone(), b)),
            Err(JwtError::MissingClaim("cnf.x5t#S256"))
        );
        let mut b = body.clone();
        b["cnf"] = json!({"x5t#S256": "short"});
        assert!(matches!(
            check(&forge(&signer, at_header.clone(), b)),
            Err(JwtError::Malformed(_))
        ));
        let mut b = body;
        b["nbf"] = json!(NOW + 100);
        assert_eq!(
            check(&forge(&signer, at_header, b)),
            Err(JwtError::NotYetValid)
        );
    }
}
