//! Secret values at rest: envelope encryption under the server's key-encryption key.
//!
//! Each secret version gets a fresh random data key. The value is encrypted with it
//! (AES-256-GCM, random 96-bit nonce); the data key is wrapped under the KEK
//! ([`KeyEncryptionKey`]). Both carry the secret's path, version and key id as associated
//! data, under their own domain labels (distinct from a sealed model's), so a ciphertext or
//! a wrapped key moved to another path, version or row does not open, and a model data key
//! cannot be passed off as a secret's or the reverse.
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::{DataKey, KeyEncryptionKey, SealError, WrappedDataKey};

const VALUE_FORMAT: &str = "sv1:";

/// A secret version as stored: never the value or its key in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEnvelope {
    /// The data key's id (random, unique).
    pub key_id: String,
    /// The data key wrapped under the KEK.
    pub wrapped_key: WrappedDataKey,
    /// `sv1:` + base64(nonce ‖ ciphertext ‖ tag).
    pub ciphertext: String,
}

fn key_aad(path: &str, version: u64, key_id: &str) -> Vec<u8> {
    format!("sigil secret data key v1\0{path}\0{version}\0{key_id}").into_bytes()
}

fn value_aad(path: &str, version: u64, key_id: &str) -> Vec<u8> {
    format!("sigil secret value v1\0{path}\0{version}\0{key_id}").into_bytes()
}

fn random_key_id() -> String {
    let b: [u8; 12] = rand::random();
    format!("sk-{}", hex::encode(b))
}

fn value_cipher(key: &DataKey) -> Result<RandomizedNonceKey, SealError> {
    RandomizedNonceKey::new(&AES_256_GCM, key.as_bytes())
        .map_err(|_| SealError::Crypto("AES-256-GCM key setup"))
}

/// Encrypts `value` as version `version` of the secret at `path`.
pub fn seal_secret(
    kek: &KeyEncryptionKey,
    path: &str,
    version: u64,
    value: &[u8],
) -> Result<SecretEnvelope, SealError> {
    let key = DataKey::generate();
    let key_id = random_key_id();
    let mut buf = value.to_vec();
    let nonce = value_cipher(&key)?
        .seal_in_place_append_tag(Aad::from(value_aad(path, version, &key_id)), &mut buf)
        .map_err(|_| SealError::Crypto("AES-256-GCM seal"))?;
    let mut out = nonce.as_ref().to_vec();
    out.extend_from_slice(&buf);
    let wrapped_key = kek.wrap_bound(&key, key_aad(path, version, &key_id))?;
    Ok(SecretEnvelope {
        key_id,
        wrapped_key,
        ciphertext: format!("{VALUE_FORMAT}{}", B64.encode(out)),
    })
}

/// Decrypts version `version` of the secret at `path` from its stored envelope.
pub fn open_secret(
    kek: &KeyEncryptionKey,
    path: &str,
    version: u64,
    sealed: &SecretEnvelope,
) -> Result<Vec<u8>, SealError> {
    let key = kek.unwrap_bound(
        &sealed.wrapped_key,
        key_aad(path, version, &sealed.key_id),
        "not wrapped under this key-encryption key for this secret version",
    )?;
    let not_ours = || SealError::Unwrap("not a sealed secret value");
    let raw = sealed
        .ciphertext
        .strip_prefix(VALUE_FORMAT)
        .and_then(|b| B64.decode(b).ok())
        .ok_or_else(not_ours)?;
    if raw.len() < NONCE_LEN {
        return Err(not_ours());
    }
    let (nonce, ct) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| not_ours())?;
    let mut ct = ct.to_vec();
    let plain = value_cipher(&key)?
        .open_in_place(
            nonce,
            Aad::from(value_aad(path, version, &sealed.key_id)),
            &mut ct,
        )
        .map_err(|_| {
            SealError::Unwrap("the secret value does not open for this path and version")
        })?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_path_version_row_and_kek() {
        let kek = KeyEncryptionKey::from_bytes(&[7u8; 32]).unwrap();
        let other = KeyEncryptionKey::from_bytes(&[8u8; 32]).unwrap();
        let value = b"hunter2-postgres-password";
        let s = seal_secret(&kek, "app/db", 1, value).unwrap();
        assert!(!s.ciphertext.contains("hunter2"));
        assert_eq!(open_secret(&kek, "app/db", 1, &s).unwrap(), value);
        assert!(open_secret(&kek, "app/db", 2, &s).is_err());
        assert!(open_secret(&kek, "app/dc", 1, &s).is_err());
        assert!(open_secret(&other, "app/db", 1, &s).is_err());
        // Another row's key or ciphertext does not open with this row's.
        let t = seal_secret(&kek, "app/db", 1, value).unwrap();
        let mixed = SecretEnvelope {
            ciphertext: t.ciphertext.clone(),
            ..s.clone()
        };
        assert!(open_secret(&kek, "app/db", 1, &mixed).is_err());
        let relabelled = SecretEnvelope {
            key_id: t.key_id.clone(),
            ..s.clone()
        };
        assert!(open_secret(&kek, "app/db", 1, &relabelled).is_err());
        // A model data key wrap is not a secret key wrap.
        let model_wrap = kek
            .wrap(&DataKey::generate(), "app/db", 1, &s.key_id)
            .unwrap();
        let swapped = SecretEnvelope {
            wrapped_key: model_wrap,
            ..s.clone()
        };
        assert!(open_secret(&kek, "app/db", 1, &swapped).is_err());
        // A flipped bit or a truncation is refused.
        let mut bad = s.clone();
        bad.ciphertext = format!("sv1:{}", B64.encode([0u8; 8]));
        assert!(open_secret(&kek, "app/db", 1, &bad).is_err());
        bad.ciphertext = "plain".into();
        assert!(open_secret(&kek, "app/db", 1, &bad).is_err());
    }
}
