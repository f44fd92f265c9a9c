//! The server's key-encryption key: wraps each model version's data key at rest
//! (AES-256-GCM, random 96-bit nonce, the model name, version and key id as associated data,
//! so a wrapped key moved to another model or version does not open).
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;

use crate::{DataKey, SealError};

const WRAP_FORMAT: &str = "kek1:";

/// A data key wrapped under the KEK: `kek1:` + base64(nonce ‖ ciphertext ‖ tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDataKey(pub String);

/// The key-encryption key (32 bytes).
pub struct KeyEncryptionKey(RandomizedNonceKey);

impl KeyEncryptionKey {
    /// A KEK from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        if bytes.len() != 32 {
            return Err(SealError::Key("a key-encryption key is 32 bytes".into()));
        }
        RandomizedNonceKey::new(&AES_256_GCM, bytes)
            .map(Self)
            .map_err(|_| SealError::Crypto("AES-256-GCM key setup"))
    }

    /// Wraps `key` for model `name` version `version` with id `key_id`.
    pub fn wrap(
        &self,
        key: &DataKey,
        name: &str,
        version: u64,
        key_id: &str,
    ) -> Result<WrappedDataKey, SealError> {
        self.wrap_bound(key, aad(name, version, key_id))
    }

    /// Wraps `key` with `aad` as associated data (what the wrapped key is bound to).
    pub(crate) fn wrap_bound(
        &self,
        key: &DataKey,
        aad: Vec<u8>,
    ) -> Result<WrappedDataKey, SealError> {
        let mut buf = key.as_bytes().to_vec();
        let nonce = self
            .0
            .seal_in_place_append_tag(Aad::from(aad), &mut buf)
            .map_err(|_| SealError::Crypto("AES-256-GCM seal"))?;
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&buf);
        buf.fill(0);
        Ok(WrappedDataKey(format!(
            "{WRAP_FORMAT}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )))
    }

    /// Unwraps a data key wrapped by [`KeyEncryptionKey::wrap`] for the same model, version
    /// and key id.
    pub fn unwrap(
        &self,
        wrapped: &WrappedDataKey,
        name: &str,
        version: u64,
        key_id: &str,
    ) -> Result<DataKey, SealError> {
        self.unwrap_bound(
            wrapped,
            aad(name, version, key_id),
            "not wrapped under this key-encryption key for this model",
        )
    }

    /// Unwraps a data key wrapped by [`KeyEncryptionKey::wrap_bound`] with the same `aad`;
    /// `mismatch` says what a failure means.
    pub(crate) fn unwrap_bound(
        &self,
        wrapped: &WrappedDataKey,
        aad: Vec<u8>,
        mismatch: &'static str,
    ) -> Result<DataKey, SealError> {
        let bad = SealError::Unwrap(mismatch);
        let b64 = wrapped
            .0
            .strip_prefix(WRAP_FORMAT)
            .ok_or(SealError::Unwrap("not a wrapped data key"))?;
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| SealError::Unwrap("not a wrapped data key"))?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Unwrap("not a wrapped data key"));
        }
        let mut ct = raw.split_off(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(&raw).map_err(|_| SealError::Unwrap("nonce"))?;
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut ct)
            .map_err(|_| bad)?;
        let key = DataKey::from_bytes(plain);
        ct.fill(0);
        key
    }
}

fn aad(name: &str, version: u64, key_id: &str) -> Vec<u8> {
    format!("sigil model data key v1\0{name}\0{version}\0{key_id}").into_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wrapped_key_opens_only_for_its_model_version_and_kek() {
        let kek = KeyEncryptionKey::from_bytes(&[7u8; 32]).unwrap();
        let other = KeyEncryptionKey::from_bytes(&[8u8; 32]).unwrap();
        let key = DataKey::from_bytes(&[9u8; 32]).unwrap();
        let w = kek.wrap(&key, "m", 1, "k1").unwrap();
        assert!(!w.0.contains("CQkJ"), "the key must not appear in clear");
        assert_eq!(kek.unwrap(&w, "m", 1, "k1").unwrap().as_bytes(), &[9u8; 32]);
        assert!(kek.unwrap(&w, "m", 2, "k1").is_err());
        assert!(kek.unwrap(&w, "n", 1, "k1").is_err());
        assert!(kek.unwrap(&w, "m", 1, "k2").is_err());
        assert!(other.unwrap(&w, "m", 1, "k1").is_err());
        assert!(
            kek.unwrap(&WrappedDataKey("kek1:AAAA".into()), "m", 1, "k1")
                .is_err()
        );
        assert!(KeyEncryptionKey::from_bytes(&[1u8; 31]).is_err());
    }
}
