//! JSON Web Keys: the `Jwk` document type, RFC 7638 thumbprints, JWKs from X.509 public keys,
//! and `JwtKeySet`, the verified set of keys JWT validation looks `kid`s up in.
use std::collections::HashMap;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ED25519, ParsedPublicKey};
use serde::{Deserialize, Serialize};
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::error::PkiError;
use crate::jwt::JwtAlgorithm;
use crate::keys::{b64url, b64url_decode, sha256};

/// A JSON Web Key (RFC 7517), public parameters only. Absent members are not serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `EC`, `OKP` or `RSA`.
    pub kty: String,
    /// Curve: `P-256`, `P-384` or `Ed25519` (empty for RSA).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crv: String,
    /// EC x coordinate or OKP public key, base64url (empty for RSA).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub x: String,
    /// EC y coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Key ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Algorithm the key is for, e.g. `ES256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Public key use: `sig`, or in SPIFFE bundles `x509-svid` / `jwt-svid`.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// Certificate chain, base64 (standard, padded) DER, first the key's own certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
}

/// The RFC 7638 members, in lexicographic order, so serde_json emits the canonical form.
#[derive(Serialize)]
struct EcThumb<'a> {
    crv: &'a str,
    kty: &'a str,
    x: &'a str,
    y: &'a str,
}
#[derive(Serialize)]
struct OkpThumb<'a> {
    crv: &'a str,
    kty: &'a str,
    x: &'a str,
}
#[derive(Serialize)]
struct RsaThumb<'a> {
    e: &'a str,
    kty: &'a str,
    n: &'a str,
}

impl Jwk {
    /// An EC or OKP JWK with only the key parameters set.
    pub(crate) fn bare(kty: &str, crv: &str, x: String, y: Option<String>) -> Self {
        Self {
            kty: kty.into(),
            crv: crv.into(),
            x,
            y,
            n: None,
            e: None,
            kid: None,
            alg: None,
            use_: None,
            x5c: None,
        }
    }

    /// The RFC 7638 SHA-256 thumbprint, base64url.
    pub fn thumbprint(&self) -> Result<String, PkiError> {
        let missing = |m: &str| PkiError::Jwk(format!("{} key lacks {m}", self.kty));
        let canonical = match self.kty.as_str() {
            "EC" => serde_json::to_vec(&EcThumb {
                crv: &self.crv,
                kty: &self.kty,
                x: &self.x,
                y: self.y.as_deref().ok_or_else(|| missing("y"))?,
            }),
            "OKP" => serde_json::to_vec(&OkpThumb {
                crv: &self.crv,
                kty: &self.kty,
                x: &self.x,
            }),
            "RSA" => serde_json::to_vec(&RsaThumb {
                e: self.e.as_deref().ok_or_else(|| missing("e"))?,
                kty: &self.kty,
                n: self.n.as_deref().ok_or_else(|| missing("n"))?,
            }),
            other => return Err(PkiError::Jwk(format!("unsupported kty {other:?}"))),
        }
        .map_err(|e| PkiError::Jwk(e.to_string()))?;
        Ok(b64url(&sha256(&canonical)))
    }

    /// The key parameters (`kty`, `crv`, `x`, `y` or `n`, `e`) of a DER SubjectPublicKeyInfo:
    /// EC P-256/P-384, Ed25519 or RSA.
    pub fn from_spki_der(spki_der: &[u8]) -> Result<Self, PkiError> {
        let (rest, spki) =
            SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| PkiError::Jwk(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::Jwk("trailing bytes after SPKI".into()));
        }
        Self::from_spki(&spki)
    }

    pub(crate) fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, PkiError> {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_SIG_ED25519 {
            let x: &[u8] = &spki.subject_public_key.data;
            if x.len() != 32 {
                return Err(PkiError::Jwk("Ed25519 key must be 32 bytes".into()));
            }
            return Ok(Self::bare("OKP", "Ed25519", b64url(x), None));
        }
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve.as_str() {
                "1.2.840.10045.3.1.7" => ("P-256", 32),
                "1.3.132.0.34" => ("P-384", 48),
                other => return Err(PkiError::Jwk(format!("unsupported EC curve {other:?}"))),
            };
            let point: &[u8] = &spki.subject_public_key.data;
            let (x, y) = split_uncompressed_point(point, len)
                .ok_or_else(|| PkiError::Jwk("EC point is not uncompressed".into()))?;
            return Ok(Self::bare("EC", crv, b64url(x), Some(b64url(y))));
        }
        if *alg == OID_PKCS1_RSAENCRYPTION {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err(PkiError::Jwk("bad RSA key".into()));
            };
            let strip = |b: &[u8]| {
                b.iter()
                    .skip_while(|v| **v == 0)
                    .copied()
                    .collect::<Vec<u8>>()
            };
            let mut jwk = Self::bare("RSA", "", String::new(), None);
            jwk.n = Some(b64url(&strip(rsa.modulus)));
            jwk.e = Some(b64url(&strip(rsa.exponent)));
            return Ok(jwk);
        }
        Err(PkiError::Jwk(format!("unsupported key algorithm {alg}")))
    }

    /// The JWT algorithm this key's parameters are for, if sigil supports it.
    pub(crate) fn jwt_algorithm(&self) -> Option<JwtAlgorithm> {
        match (self.kty.as_str(), self.crv.as_str()) {
            ("EC", "P-256") => Some(JwtAlgorithm::Es256),
            ("OKP", "Ed25519") => Some(JwtAlgorithm::EdDsa),
            _ => None,
        }
    }
}

/// `04 || x || y` split into coordinates of `len` bytes each.
pub(crate) fn split_uncompressed_point(point: &[u8], len: usize) -> Option<(&[u8], &[u8])> {
    let (tag, xy) = point.split_first()?;
    if *tag != 0x04 || xy.len() != len.checked_mul(2)? {
        return None;
    }
    Some(xy.split_at(len))
}

/// A verification key from a JWK, parsed once (re-parsing an EC point on every
/// verification costs as much as the verification itself).
#[derive(Clone)]
pub(crate) struct VerifyKey {
    pub(crate) alg: JwtAlgorithm,
    pub(crate) key: ParsedPublicKey,
}

/// The key a JWT was verified with: its `kid` and its public key, so that a verdict kept for
/// later (a token cache) can ask whether a newer key set still holds that same key. The key
/// material is compared too, not only the `kid`: a `kid` is a name the bundle chose, and a
/// bundle may reuse it for another key.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtKeyRef {
    kid: String,
    alg: JwtAlgorithm,
    public: Box<[u8]>,
}

impl JwtKeyRef {
    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

impl std::fmt::Debug for JwtKeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeyRef")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// JWT verification keys by `kid`. Only ES256 (P-256) and EdDSA (Ed25519) keys are kept.
#[derive(Clone, Default)]
pub struct JwtKeySet {
    keys: HashMap<String, VerifyKey>,
}

impl std::fmt::Debug for JwtKeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("JwtKeySet").field("kids", &kids).finish()
    }
}

impl JwtKeySet {
    /// Builds the set from JWKs. Keys of types sigil cannot verify with (RSA, P-384, ...) and
    /// keys whose `use` is neither absent, `sig` nor `jwt-svid` are skipped. A usable key
    /// without a `kid`, with an `alg` that contradicts its curve, with invalid coordinates, or
    /// whose `kid` repeats, is an error: a key set must be unambiguous.
    pub fn from_jwks(keys: &[Jwk]) -> Result<Self, PkiError> {
        let mut out = HashMap::new();
        for jwk in keys {
            if !matches!(jwk.use_.as_deref(), None | Some("sig") | Some("jwt-svid")) {
                continue;
            }
            let Some(alg) = jwk.jwt_algorithm() else {
                continue;
            };
            let kid = jwk
                .kid
                .clone()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| PkiError::Jwk("JWT key has no kid".into()))?;
            if let Some(a) = jwk.alg.as_ref().filter(|a| *a != alg.as_str()) {
                return Err(PkiError::Jwk(format!(
                    "key {kid}: alg {a} does not fit {} {}",
                    jwk.kty, jwk.crv
                )));
            }
            let key =
                decoding_key(jwk, alg).map_err(|e| PkiError::Jwk(format!("key {kid}: {e}")))?;
            if out.insert(kid.clone(), VerifyKey { alg, key }).is_some() {
                return Err(PkiError::Jwk(format!("duplicate kid {kid}")));
            }
        }
        Ok(Self { keys: out })
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key with this `kid` is present.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Whether the set still holds `key`: the same `kid` for the same algorithm and public key.
    /// A map lookup and a compare of at most 65 bytes; no parsing, no signature check.
    pub fn holds(&self, key: &JwtKeyRef) -> bool {
        self.keys
            .get(&key.kid)
            .is_some_and(|k| k.alg == key.alg && k.key.as_ref() == &*key.public)
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.get(kid)
    }
}

impl VerifyKey {
    /// A reference to this key under `kid`, for [`JwtKeySet::holds`].
    pub(crate) fn key_ref(&self, kid: String) -> JwtKeyRef {
        JwtKeyRef {
            kid,
            alg: self.alg,
            public: self.key.as_ref().into(),
        }
    }
}

fn decoding_key(jwk: &Jwk, alg: JwtAlgorithm) -> Result<ParsedPublicKey, &'static str> {
    let x = b64url_decode(&jwk.x).ok_or("x is not base64url")?;
    match alg {
        JwtAlgorithm::Es256 => {
            let y = jwk
                .y
                .as_deref()
                .and_then(b64url_decode)
                .ok_or("y is missing or not base64url")?;
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes");
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                .map_err(|_| "not a point on P-256")
        }
        JwtAlgorithm::EdDsa => {
            if x.len() != 32 {
                return Err("Ed25519 key must be 32 bytes");
            }
            ParsedPublicKey::new(&ED25519, &x).map_err(|_| "not an Ed25519 key")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 section 3.1 uses RSA; its thumbprint is NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
        let jwk = Jwk {
            n: Some("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".into()),
            e: Some("AQAB".into()),
            ..Jwk::bare("RSA", "", String::new(), None)
        };
        assert_eq!(
            jwk.thumbprint().unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn serializes_standard_member_names_and_skips_absent() {
        let mut jwk = Jwk::bare("EC", "P-256", "xx".into(), Some("yy".into()));
        jwk.use_ = Some("sig".into());
        jwk.kid = Some("k1".into());
        let v: serde_json::Value = serde_json::to_value(&jwk).unwrap();
        let obj = v.as_object().unwrap();
        let mut names: Vec<_> = obj.keys().cloned().collect();
        names.sort();
        assert_eq!(names, vec!["crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(obj["use"], "sig");
    }

    #[test]
    fn key_set_skips_unusable_and_refuses_ambiguous_keys() {
        let signer = crate::jwt::JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let jwk = signer.public_jwk();
        let mut rsa = Jwk::bare("RSA", "", String::new(), None);
        rsa.n = Some("AQAB".into());
        rsa.e = Some("AQAB".into());
        rsa.kid = Some("rsa".into());
        let mut x509 = jwk.clone();
        x509.use_ = Some("x509-svid".into());
        x509.kid = Some("other".into());
        let set = JwtKeySet::from_jwks(&[jwk.clone(), rsa, x509]).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.contains(signer.kid()));

        assert!(JwtKeySet::from_jwks(&[jwk.clone(), jwk.clone()]).is_err());
        let mut no_kid = jwk.clone();
        no_kid.kid = None;
        assert!(JwtKeySet::from_jwks(&[no_kid]).is_err());
        let mut wrong_alg = jwk.clone();
        wrong_alg.alg = Some("EdDSA".into());
        assert!(JwtKeySet::from_jwks(&[wrong_alg]).is_err());
        let mut off_curve = jwk.clone();
        off_curve.y = Some(b64url(&[7u8; 32]));
        assert!(JwtKeySet::from_jwks(&[off_curve]).is_err());
        let mut short = jwk;
        short.x = b64url(&[1u8; 31]);
        assert!(JwtKeySet::from_jwks(&[short]).is_err());
    }
}
