//! Trust bundles: a trust domain's X.509 and JWT authorities, in the SPIFFE bundle format
//! (a JWKS with `spiffe_sequence` and `spiffe_refresh_hint`), as PEM, and as an OIDC JWKS.
use serde::{Deserialize, Serialize};
use sigil_core::TrustDomain;

use crate::ca::parse_cert;
use crate::error::PkiError;
use crate::jwk::{Jwk, JwtKeySet};
use crate::keys::{b64std, b64std_decode, pem_encode};
use crate::x509_verify::X509Bundle;

/// The largest bundle document parsed.
pub const MAX_BUNDLE_JSON_LEN: usize = 1024 * 1024;

/// `use` of an X.509 authority in a SPIFFE bundle.
pub const USE_X509_SVID: &str = "x509-svid";
/// `use` of a JWT authority in a SPIFFE bundle.
pub const USE_JWT_SVID: &str = "jwt-svid";
/// `use` of a sigil policy-bundle signing key in a SPIFFE bundle (sigil's extension; SPIFFE
/// consumers ignore keys of a `use` they do not know).
pub const USE_SIGIL_POLICY: &str = "sigil-policy";

/// A trust domain's authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// Whose authorities these are.
    pub trust_domain: TrustDomain,
    /// CA certificates, DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT signing keys (each with a `kid`).
    pub jwt_authorities: Vec<Jwk>,
    /// Policy-bundle signing keys (each with a `kid`), published with `use: "sigil-policy"`.
    pub policy_authorities: Vec<Jwk>,
    /// `spiffe_sequence`: increases with every change.
    pub sequence: u64,
    /// `spiffe_refresh_hint`: how often consumers should re-fetch, in seconds.
    pub refresh_hint_secs: u64,
}

#[derive(Serialize, Deserialize)]
struct SpiffeBundleDoc {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
}

#[derive(Serialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

impl TrustBundle {
    /// The SPIFFE bundle document: X.509 authorities as JWKs with `use: "x509-svid"`, the key's
    /// parameters and `x5c: [base64 DER]`; JWT authorities with `use: "jwt-svid"` and `kid`.
    pub fn to_spiffe_json(&self) -> Result<String, PkiError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for der in &self.x509_authorities {
            let cert = parse_cert(der)?;
            let mut jwk = Jwk::from_spki(cert.public_key())?;
            jwk.use_ = Some(USE_X509_SVID.into());
            jwk.x5c = Some(vec![b64std(der)]);
            keys.push(jwk);
        }
        for jwk in &self.jwt_authorities {
            if jwk.kid.as_deref().is_none_or(str::is_empty) {
                return Err(PkiError::Bundle("a JWT authority has no kid".into()));
            }
            let mut jwk = jwk.clone();
            jwk.use_ = Some(USE_JWT_SVID.into());
            jwk.x5c = None;
            keys.push(jwk);
        }
        for jwk in &self.policy_authorities {
            if jwk.kid.as_deref().is_none_or(str::is_empty) {
                return Err(PkiError::Bundle("a policy authority has no kid".into()));
            }
            let mut jwk = jwk.clone();
            jwk.use_ = Some(USE_SIGIL_POLICY.into());
            jwk.x5c = None;
            keys.push(jwk);
        }
        serde_json::to_string(&SpiffeBundleDoc {
            keys,
            spiffe_refresh_hint: Some(self.refresh_hint_secs),
            spiffe_sequence: Some(self.sequence),
        })
        .map_err(|e| PkiError::Bundle(e.to_string()))
    }

    /// Parses a SPIFFE bundle document for `td`. Each `x509-svid` key must carry exactly one
    /// certificate in `x5c`, a CA whose public key equals the JWK's parameters when those are
    /// given; each `jwt-svid` key must have a `kid`. Keys with any other `use` are ignored.
    pub fn from_spiffe_json(td: &TrustDomain, json: &str) -> Result<Self, PkiError> {
        if json.len() > MAX_BUNDLE_JSON_LEN {
            return Err(PkiError::Bundle("document too large".into()));
        }
        let doc: SpiffeBundleDoc =
            serde_json::from_str(json).map_err(|e| PkiError::Bundle(e.to_string()))?;
        let mut x509_authorities = Vec::new();
        let mut jwt_authorities = Vec::new();
        let mut policy_authorities = Vec::new();
        for jwk in doc.keys {
            match jwk.use_.as_deref() {
                Some(USE_X509_SVID) => x509_authorities.push(x509_authority(&jwk)?),
                Some(USE_JWT_SVID) => {
                    if jwk.kid.as_deref().is_none_or(str::is_empty) {
                        return Err(PkiError::Bundle("a jwt-svid key has no kid".into()));
                    }
                    jwt_authorities.push(jwk);
                }
                Some(USE_SIGIL_POLICY) => {
                    if jwk.kid.as_deref().is_none_or(str::is_empty) {
                        return Err(PkiError::Bundle("a sigil-policy key has no kid".into()));
                    }
                    policy_authorities.push(jwk);
                }
                _ => {}
            }
        }
        Ok(Self {
            trust_domain: td.clone(),
            x509_authorities,
            jwt_authorities,
            policy_authorities,
            sequence: doc.spiffe_sequence.unwrap_or(0),
            refresh_hint_secs: doc.spiffe_refresh_hint.unwrap_or(0),
        })
    }

    /// The X.509 authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn x509_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|d| pem_encode("CERTIFICATE", d))
            .collect()
    }

    /// A plain JWKS (`{"keys":[...]}`) of the ES256/EdDSA JWT authorities, each with
    /// `use: "sig"`, `alg` and `kid`, for OIDC discovery (`jwks_uri`).
    pub fn oidc_jwks_json(&self) -> Result<String, PkiError> {
        let keys = self
            .jwt_authorities
            .iter()
            .filter_map(|jwk| {
                let alg = jwk.jwt_algorithm()?;
                let mut out = jwk.clone();
                out.use_ = Some("sig".into());
                out.alg = Some(alg.as_str().into());
                out.x5c = None;
                Some(out)
            })
            .collect();
        serde_json::to_string(&Jwks { keys }).map_err(|e| PkiError::Bundle(e.to_string()))
    }

    /// The X.509 authorities for [`crate::verify_x509_svid`].
    pub fn x509_bundle(&self) -> X509Bundle {
        X509Bundle {
            trust_domain: self.trust_domain.clone(),
            authorities: self.x509_authorities.clone(),
        }
    }

    /// The JWT authorities for [`crate::validate_jwt_svid`].
    pub fn jwt_key_set(&self) -> Result<JwtKeySet, PkiError> {
        JwtKeySet::from_jwks(&self.jwt_authorities)
    }
}

fn x509_authority(jwk: &Jwk) -> Result<Vec<u8>, PkiError> {
    let x5c = match jwk.x5c.as_deref() {
        Some([one]) => one,
        _ => {
            return Err(PkiError::Bundle(
                "an x509-svid key must have exactly one x5c certificate".into(),
            ));
        }
    };
    let der =
        b64std_decode(x5c).ok_or_else(|| PkiError::Bundle("x5c is not standard base64".into()))?;
    {
        let cert = parse_cert(&der).map_err(|e| PkiError::Bundle(e.to_string()))?;
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => {
                return Err(PkiError::Bundle(
                    "an x509-svid authority is not a CA".into(),
                ));
            }
        }
        let has_params = !jwk.x.is_empty() || jwk.n.is_some();
        if has_params {
            let want = Jwk::from_spki(cert.public_key())?;
            let same = want.kty == jwk.kty
                && want.crv == jwk.crv
                && want.x == jwk.x
                && want.y == jwk.y
                && want.n == jwk.n
                && want.e == jwk.e;
            if !same {
                return Err(PkiError::Bundle(
                    "x509-svid key parameters do not match the x5c certificate".into(),
                ));
            }
        }
    }
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;
    use crate::jwt::{JwtAlgorithm, JwtSigner, validate_jwt_svid};
    use crate::keys::KeyAlgorithm;
    use serde_json::Value;

    const NOW: i64 = 1_700_000_000;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn sample() -> (TrustBundle, CertificateAuthority, JwtSigner) {
        let ca =
            CertificateAuthority::generate(&td(), KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
        let ca2 =
            CertificateAuthority::generate(&td(), KeyAlgorithm::Ed25519, NOW, 86_400).unwrap();
        let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
        let signer2 = JwtSigner::generate(JwtAlgorithm::EdDsa).unwrap();
        let bundle = TrustBundle {
            trust_domain: td(),
            x509_authorities: vec![ca.cert_der().to_vec(), ca2.cert_der().to_vec()],
            jwt_authorities: vec![signer.public_jwk(), signer2.public_jwk()],
            policy_authorities: Vec::new(),
            sequence: 7,
            refresh_hint_secs: 300,
        };
        (bundle, ca, signer)
    }

    #[test]
    fn spiffe_json_round_trip_and_field_names() {
        let (bundle, ca, signer) = sample();
        let json = bundle.to_spiffe_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 4);

        let x = &keys[0];
        assert_eq!(x["use"], "x509-svid");
        assert_eq!(x["kty"], "EC");
        assert_eq!(x["crv"], "P-256");
        assert!(x["x"].is_string() && x["y"].is_string());
        assert_eq!(x["x5c"][0], b64std(ca.cert_der()));
        assert!(x.get("kid").is_none());
        let ed = &keys[1];
        assert_eq!(ed["kty"], "OKP");
        assert_eq!(ed["crv"], "Ed25519");
        assert!(ed.get("y").is_none());

        let j = &keys[2];
        assert_eq!(j["use"], "jwt-svid");
        assert_eq!(j["kid"], signer.kid());
        assert_eq!(j["kty"], "EC");
        assert!(j.get("x5c").is_none());

        let back = TrustBundle::from_spiffe_json(&td(), &json).unwrap();
        assert_eq!(back.x509_authorities, bundle.x509_authorities);
        assert_eq!(back.sequence, 7);
        assert_eq!(back.refresh_hint_secs, 300);
        assert_eq!(back.jwt_authorities.len(), 2);
        assert_eq!(back.jwt_authorities[0].kid.as_deref(), Some(signer.kid()));
        assert_eq!(back.to_spiffe_json().unwrap(), json);

        // The parsed bundle validates what the originals signed.
        let (token, _) = signer
            .mint_jwt_svid(&td().id("/w").unwrap(), &["aud".into()], 60, NOW)
            .unwrap();
        let keys = back.jwt_key_set().unwrap();
        assert_eq!(keys.len(), 2);
        assert!(validate_jwt_svid(&token, &keys, &td(), "aud", NOW, 0).is_ok());
        assert_eq!(back.x509_bundle().authorities.len(), 2);
    }

    #[test]
    fn oidc_jwks_is_plain() {
        let (bundle, _, signer) = sample();
        let v: Value = serde_json::from_str(&bundle.oidc_jwks_json().unwrap()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 1);
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0]["use"], "sig");
        assert_eq!(keys[0]["alg"], "ES256");
        assert_eq!(keys[0]["kid"], signer.kid());
        assert_eq!(keys[1]["alg"], "EdDSA");
        assert_eq!(keys[1]["kty"], "OKP");
    }

    #[test]
    fn pem_has_every_authority() {
        let (bundle, ca, _) = sample();
        let pem = bundle.x509_pem();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(pem.starts_with(&ca.cert_pem()));
    }

    #[test]
    fn refuses_bad_bundles() {
        let (bundle, ca, _) = sample();
        let json = bundle.to_spiffe_json().unwrap();
        let mut v: Value = serde_json::from_str(&json).unwrap();
        assert!(TrustBundle::from_spiffe_json(&td(), "{").is_err());
        assert!(TrustBundle::from_spiffe_json(&td(), "{}").is_err());

        // Two certificates in one x5c.
        let mut two = v.clone();
        two["keys"][0]["x5c"] = serde_json::json!([b64std(ca.cert_der()), b64std(ca.cert_der())]);
        assert!(TrustBundle::from_spiffe_json(&td(), &two.to_string()).is_err());
        // Key parameters that are not the certificate's.
        let mut swapped = v.clone();
        swapped["keys"][0]["x"] = swapped["keys"][2]["x"].clone();
        assert!(TrustBundle::from_spiffe_json(&td(), &swapped.to_string()).is_err());
        // A JWT authority without kid.
        let mut nokid = v.clone();
        nokid["keys"][2].as_object_mut().unwrap().remove("kid");
        assert!(TrustBundle::from_spiffe_json(&td(), &nokid.to_string()).is_err());
        // Unknown uses are ignored.
        v["keys"][3]["use"] = "enc".into();
        let b = TrustBundle::from_spiffe_json(&td(), &v.to_string()).unwrap();
        assert_eq!(b.jwt_authorities.len(), 1);
    }

    #[test]
    fn policy_keys_round_trip_and_stay_out_of_jwt_sets() {
        let (mut bundle, _, _) = sample();
        let mut policy = JwtSigner::generate(JwtAlgorithm::EdDsa)
            .unwrap()
            .public_jwk();
        policy.use_ = None;
        bundle.policy_authorities = vec![policy.clone()];
        let json = bundle.to_spiffe_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["keys"][4]["use"], USE_SIGIL_POLICY);
        assert_eq!(v["keys"][4]["kid"], policy.kid.clone().unwrap());
        let back = TrustBundle::from_spiffe_json(&td(), &json).unwrap();
        assert_eq!(back.policy_authorities.len(), 1);
        assert_eq!(back.jwt_authorities.len(), 2);
        // A policy key never validates JWTs, and is not in the OIDC JWKS.
        assert_eq!(back.jwt_key_set().unwrap().len(), 2);
        let oidc: Value = serde_json::from_str(&back.oidc_jwks_json().unwrap()).unwrap();
        assert_eq!(oidc["keys"].as_array().unwrap().len(), 2);
        // A policy key without kid is refused.
        let mut nokid = v.clone();
        nokid["keys"][4].as_object_mut().unwrap().remove("kid");
        assert!(TrustBundle::from_spiffe_json(&td(), &nokid.to_string()).is_err());
    }
}
