//! Where the private signing keys live: PKCS#8 PEM files under `<data_dir>/keys` (one server,
//! SQLite), or — when replicas share a PostgreSQL database — in the database, sealed with
//! AES-256-GCM under the key-encryption key (`key_encryption_key_file`) each replica is given.
//!
//! A sealed key is `v1:` + base64(nonce ‖ ciphertext ‖ tag); its name is the additional
//! authenticated data, so a sealed key moved to another name does not open. An authority's
//! `key_ref` is the file name, or `sealed:<name>` for a key in the database (so a database
//! that started with files keeps working: each key_ref says where its key is).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use sigil_store::Store;

use crate::ServerError;
use crate::authority::{create_private_dir, write_private_file};

const SEALED_PREFIX: &str = "sealed:";
const FORMAT: &str = "v1:";
/// Length of a key-encryption key file.
pub const KEK_LEN: usize = 32;

/// The private keys' storage.
pub enum KeyVault {
    /// Files in this directory (0700, files 0600).
    Files(PathBuf),
    /// Sealed in the database; `dir` still serves key_refs written before (files).
    Sealed {
        dir: PathBuf,
        kek: Box<RandomizedNonceKey>,
        store: Arc<dyn Store>,
    },
}

impl KeyVault {
    /// Keys sealed in `store` under the key-encryption key read from `kek_file`: exactly 32
    /// bytes (or 64 hex digits), readable by its owner only.
    pub fn sealed(
        dir: PathBuf,
        kek_file: &Path,
        store: Arc<dyn Store>,
    ) -> Result<Self, ServerError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |e: std::io::Error| ServerError::Io(format!("{}: {e}", kek_file.display()));
        let mode = std::fs::metadata(kek_file)
            .map_err(io)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(ServerError::Io(format!(
                "{}: the key-encryption key must be readable by its owner only (mode 0600), not {:o}",
                kek_file.display(),
                mode & 0o777
            )));
        }
        let raw = std::fs::read(kek_file).map_err(io)?;
        let key = decode_kek(&raw).ok_or_else(|| {
            ServerError::Io(format!(
                "{}: a key-encryption key is {KEK_LEN} random bytes (or {} hex digits)",
                kek_file.display(),
                KEK_LEN * 2
            ))
        })?;
        let kek = RandomizedNonceKey::new(&AES_256_GCM, &key)
            .map_err(|_| ServerError::Internal("AES-256-GCM key setup failed".into()))?;
        Ok(Self::Sealed {
            dir,
            kek: Box::new(kek),
            store,
        })
    }

    /// Stores a new private key named `name` (e.g. `x509-<id>.key.pem`); returns its key_ref.
    /// INVARIANT: the key is durable before the caller points an authority at it.
    pub async fn put(&self, name: &str, secret: &[u8]) -> Result<String, ServerError> {
        match self {
            Self::Files(dir) => {
                write_private_file(&dir.join(name), secret)?;
                Ok(name.to_owned())
            }
            Self::Sealed { kek, store, .. } => {
                let sealed = seal(kek, name, secret)?;
                if !store
                    .put_sealed_key(
                        name,
                        &sealed,
                        sigil_core::Clock::now(&sigil_core::SystemClock),
                    )
                    .await?
                {
                    return Err(ServerError::Internal(format!(
                        "a sealed key named {name:?} already exists"
                    )));
                }
                Ok(format!("{SEALED_PREFIX}{name}"))
            }
        }
    }

    /// The private key `key_ref` points at (PEM text).
    pub async fn get(&self, key_ref: &str) -> Result<String, ServerError> {
        if let Some(name) = key_ref.strip_prefix(SEALED_PREFIX) {
            let Self::Sealed { kek, store, .. } = self else {
                return Err(ServerError::Internal(format!(
                    "key {name:?} is sealed in the database: set key_encryption_key_file"
                )));
            };
            let sealed = store
                .sealed_key(name)
                .await?
                .ok_or_else(|| ServerError::Internal(format!("sealed key {name:?} is missing")))?;
            return open(kek, name, &sealed);
        }
        load_key_file(self.dir(), key_ref)
    }

    /// Deletes the key `key_ref` points at (a retired, pruned authority's); logs failures.
    pub async fn remove(&self, key_ref: &str) {
        if let Some(name) = key_ref.strip_prefix(SEALED_PREFIX) {
            if let Self::Sealed { store, .. } = self
                && let Err(e) = store.delete_sealed_key(name).await
            {
                tracing::warn!(key_ref, error = %e, "could not remove a retired sealed key");
            }
            return;
        }
        if key_ref.contains('/') || key_ref.starts_with('.') {
            return;
        }
        if let Err(e) = std::fs::remove_file(self.dir().join(key_ref)) {
            tracing::warn!(key_ref, error = %e, "could not remove retired key file");
        }
    }

    /// The secret named `name` (e.g. the transparency log key), made by `create` and stored
    /// if there is none yet. With sealed keys, of replicas starting at once exactly one
    /// stores its secret and every one returns that one.
    pub async fn get_or_create(
        &self,
        name: &str,
        create: impl FnOnce() -> Result<String, ServerError>,
    ) -> Result<String, ServerError> {
        match self {
            Self::Files(dir) => {
                create_private_dir(dir)?;
                let path = dir.join(name);
                match std::fs::read_to_string(&path) {
                    Ok(s) => Ok(s),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let s = create()?;
                        write_private_file(&path, s.as_bytes())?;
                        Ok(s)
                    }
                    Err(e) => Err(ServerError::Io(format!("reading {}: {e}", path.display()))),
                }
            }
            Self::Sealed { kek, store, .. } => {
                if let Some(sealed) = store.sealed_key(name).await? {
                    return open(kek, name, &sealed);
                }
                let s = create()?;
                let sealed = seal(kek, name, s.as_bytes())?;
                if store
                    .put_sealed_key(
                        name,
                        &sealed,
                        sigil_core::Clock::now(&sigil_core::SystemClock),
                    )
                    .await?
                {
                    return Ok(s);
                }
                // Another replica stored its own meanwhile: use that one.
                let sealed = store.sealed_key(name).await?.ok_or_else(|| {
                    ServerError::Internal(format!("sealed key {name:?} vanished"))
                })?;
                open(kek, name, &sealed)
            }
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Self::Files(dir) | Self::Sealed { dir, .. } => dir,
        }
    }
}

fn decode_kek(raw: &[u8]) -> Option<[u8; KEK_LEN]> {
    if raw.len() == KEK_LEN {
        return raw.try_into().ok();
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    hex::decode(text).ok()?.try_into().ok()
}

fn seal(kek: &RandomizedNonceKey, name: &str, secret: &[u8]) -> Result<String, ServerError> {
    let mut buf = secret.to_vec();
    let nonce = kek
        .seal_in_place_append_tag(Aad::from(name.as_bytes()), &mut buf)
        .map_err(|_| ServerError::Internal("sealing a key failed".into()))?;
    let mut out = nonce.as_ref().to_vec();
    out.extend_from_slice(&buf);
    Ok(format!(
        "{FORMAT}{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    ))
}

fn open(kek: &RandomizedNonceKey, name: &str, sealed: &str) -> Result<String, ServerError> {
    let bad = || {
        ServerError::Internal(format!(
            "sealed key {name:?} does not open: is key_encryption_key_file the key the other \
             replicas use?"
        ))
    };
    let b64 = sealed.strip_prefix(FORMAT).ok_or_else(bad)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad())?;
    let (nonce, ct) = raw.split_at_checked(NONCE_LEN).ok_or_else(bad)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
    let mut buf = ct.to_vec();
    let plain = kek
        .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
        .map_err(|_| bad())?;
    String::from_utf8(plain.to_vec()).map_err(|_| bad())
}

fn load_key_file(key_dir: &Path, key_ref: &str) -> Result<String, ServerError> {
    if key_ref.contains('/') || key_ref.starts_with('.') {
        return Err(ServerError::Internal(format!(
            "bad key reference {key_ref:?}"
        )));
    }
    let path = key_dir.join(key_ref);
    std::fs::read_to_string(&path)
        .map_err(|e| ServerError::Io(format!("reading key {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_under_their_name_and_key() {
        let kek = RandomizedNonceKey::new(&AES_256_GCM, &[7u8; 32]).unwrap();
        let other = RandomizedNonceKey::new(&AES_256_GCM, &[8u8; 32]).unwrap();
        let s = seal(&kek, "x509-a.key.pem", b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(s.starts_with("v1:"));
        assert!(!s.contains("PRIVATE"));
        assert_eq!(
            open(&kek, "x509-a.key.pem", &s).unwrap(),
            "-----BEGIN PRIVATE KEY-----"
        );
        assert!(open(&kek, "x509-b.key.pem", &s).is_err());
        assert!(open(&other, "x509-a.key.pem", &s).is_err());
        let mut flipped = s.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert!(open(&kek, "x509-a.key.pem", &String::from_utf8(flipped).unwrap()).is_err());
        // Two seals of the same secret differ (random nonces).
        assert_ne!(
            s,
            seal(&kek, "x509-a.key.pem", b"-----BEGIN PRIVATE KEY-----").unwrap()
        );
    }

    #[test]
    fn kek_is_32_bytes_or_64_hex_digits() {
        assert!(decode_kek(&[1u8; 32]).is_some());
        assert!(decode_kek(format!("{}\n", "ab".repeat(32)).as_bytes()).is_some());
        assert!(decode_kek(&[1u8; 31]).is_none());
        assert!(decode_kek(b"short").is_none());
    }
}
