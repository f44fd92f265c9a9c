//! A data key released to one workload: HPKE (RFC 9180) base mode, DHKEM(P-256,
//! HKDF-SHA256), HKDF-SHA256, AES-256-GCM, to the public key of the X.509-SVID the workload
//! presented; `info` binds the model, its version, the workload's SPIFFE ID and the header,
//! so a wrapped key is useless to any other workload (it lacks the private key) and to any
//! other model or header (the info differs).
use aws_lc_rs::encoding::AsBigEndian as _;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable as _, OpModeR, OpModeS, Serializable as _};

use crate::{DataKey, SealError};

/// The HPKE cipher suite, as named in RFC 9180.
pub const HPKE_SUITE: &str = "DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM";

type Kem = DhP256HkdfSha256;

/// A data key sealed to one SVID key: the encapsulated key and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidKeyWrap {
    /// HPKE `enc` (65 bytes, an uncompressed P-256 point).
    pub enc: Vec<u8>,
    /// The AES-256-GCM ciphertext of the 32-byte data key and its tag.
    pub ciphertext: Vec<u8>,
}

/// The HPKE `info` of a release: model, version, SPIFFE ID and header binding hash.
pub fn release_info(name: &str, version: u64, spiffe_id: &str, binding: &[u8; 32]) -> Vec<u8> {
    let mut v =
        format!("sigil model key release v1\0{name}\0{version}\0{spiffe_id}\0").into_bytes();
    v.extend_from_slice(binding);
    v
}

/// Seals `key` to `public_key`: the SVID's subjectPublicKey, an uncompressed SEC1 P-256
/// point (65 bytes). Other key types (Ed25519 SVIDs) are refused.
pub fn wrap_to_svid_key(
    key: &DataKey,
    public_key: &[u8],
    info: &[u8],
) -> Result<SvidKeyWrap, SealError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(public_key).map_err(|_| {
        SealError::Key(
            "the SVID's public key is not a P-256 point: key release needs an ecdsa-p256 SVID"
                .into(),
        )
    })?;
    let mut rng = rand::rng();
    let (enc, ciphertext) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &pk,
        info,
        key.as_bytes(),
        b"",
        &mut rng,
    )
    .map_err(|_| SealError::Crypto("HPKE seal"))?;
    Ok(SvidKeyWrap {
        enc: enc.to_bytes().to_vec(),
        ciphertext,
    })
}

/// Opens a release with the SVID's private key (PKCS#8 DER, as the Workload API hands it).
pub fn unwrap_with_svid_key(
    wrap: &SvidKeyWrap,
    private_key_pkcs8: &[u8],
    info: &[u8],
) -> Result<DataKey, SealError> {
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, private_key_pkcs8)
        .map_err(|_| SealError::Key("the SVID key is not a P-256 PKCS#8 key".into()))?;
    let scalar = kp
        .private_key()
        .as_be_bytes()
        .map_err(|_| SealError::Crypto("exporting the P-256 scalar"))?;
    let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(scalar.as_ref())
        .map_err(|_| SealError::Key("bad P-256 scalar".into()))?;
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&wrap.enc)
        .map_err(|_| SealError::Unwrap("bad encapsulated key"))?;
    let mut plain = hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
        &OpModeR::Base,
        &sk,
        &enc,
        info,
        &wrap.ciphertext,
        b"",
    )
    .map_err(|_| SealError::Unwrap("not sealed to this SVID key for this model and workload"))?;
    let key = DataKey::from_bytes(&plain);
    plain.fill(0);
    key
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::KeyPair as _;

    fn svid_key() -> (Vec<u8>, Vec<u8>) {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();
        (doc.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
    }

    #[test]
    fn release_opens_only_with_the_svid_key_and_the_same_binding() {
        let (sk, pk) = svid_key();
        let (other_sk, _) = svid_key();
        let key = DataKey::from_bytes(&[5u8; 32]).unwrap();
        let info = release_info("m", 1, "spiffe://t/a", &[1u8; 32]);
        let w = wrap_to_svid_key(&key, &pk, &info).unwrap();
        assert_eq!(w.enc.len(), 65);
        assert_eq!(
            unwrap_with_svid_key(&w, &sk, &info).unwrap().as_bytes(),
            &[5u8; 32]
        );
        // Another workload's key cannot open it (a replayed release).
        assert!(matches!(
            unwrap_with_svid_key(&w, &other_sk, &info),
            Err(SealError::Unwrap(_))
        ));
        // Another binding (model, version, workload, header) cannot either.
        for other in [
            release_info("n", 1, "spiffe://t/a", &[1u8; 32]),
            release_info("m", 2, "spiffe://t/a", &[1u8; 32]),
            release_info("m", 1, "spiffe://t/b", &[1u8; 32]),
            release_info("m", 1, "spiffe://t/a", &[2u8; 32]),
        ] {
            assert!(unwrap_with_svid_key(&w, &sk, &other).is_err());
        }
        // A non-P-256 public key is refused.
        assert!(matches!(
            wrap_to_svid_key(&key, &[0u8; 32], &info),
            Err(SealError::Key(_))
        ));
    }
}
