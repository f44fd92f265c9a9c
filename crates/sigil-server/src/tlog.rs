//! The transparency log of issued identities: every X.509-SVID, JWT-SVID and access token is a
//! leaf (canonical JSON, [`LogRecord`]) appended in the same transaction as its issuance record
//! (see `issuance_log.rs`), and the log is served read-only as C2SP tiles and a signed
//! C2SP checkpoint:
//!
//! - `GET /log/checkpoint`: the signed tree head (`text/plain`, signed note, Ed25519);
//! - `GET /log/tile/<L>/<N>[.p/<W>]`: hash tiles; `GET /log/tile/entries/<N>[.p/<W>]`: the
//!   leaves' data (entry bundles);
//! - `GET /log/key`: the log's public key in the note `vkey` format.
//!
//! The signing key lives in `<data_dir>/keys/log.key` (0600, note `PRIVATE+KEY+…` format),
//! made at first start.
use std::path::Path;
use std::sync::Arc;

use sigil_log::tiles::{TilePath, encode_entry_bundle, encode_hash_tile, parse_tile_path};
use sigil_log::{Frontier, Hash, LogKey, LogRecord, record};
use sigil_store::{IdentityKind, IssuedIdentity, Store, StoreError};

use crate::ServerError;
use crate::authority::{create_private_dir, write_private_file};

/// The key file's name under the key directory.
pub const LOG_KEY_FILE: &str = "log.key";

/// The log's origin (and key name) for a trust domain.
pub fn origin_for(trust_domain: &str) -> String {
    format!("sigil.{trust_domain}/log")
}

/// The leaf logged for an issued credential.
pub fn leaf_for(issued: &IssuedIdentity) -> LogRecord {
    match issued.kind {
        IdentityKind::X509Svid => LogRecord::X509Svid(record::X509SvidRecord {
            cert_sha256: issued.thumbprint.clone(),
            issued_at: issued.issued_at,
            kind: issued.kind.as_str().to_owned(),
            not_after: issued.not_after,
            serial: issued.serial_or_jti.clone(),
            spiffe_id: issued.spiffe_id.to_string(),
        }),
        _ => LogRecord::Token(record::TokenRecord {
            audience: issued.audience.clone(),
            expires_at: issued.not_after,
            issued_at: issued.issued_at,
            jti: issued.serial_or_jti.clone(),
            kind: issued.kind.as_str().to_owned(),
            subject: issued.spiffe_id.to_string(),
        }),
    }
}

fn to_hashes(raw: Vec<[u8; 32]>) -> Vec<Hash> {
    raw.into_iter().map(Hash).collect()
}

/// The right edge of the stored tree, read from its stored hashes (at most 64 of them).
pub async fn load_frontier(store: &dyn Store) -> Result<Frontier, StoreError> {
    let size = store.tlog_size().await?;
    let hashes = store.tlog_hashes(&Frontier::indexes(size)).await?;
    Frontier::from_hashes(size, to_hashes(hashes)).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Serves the log: signs checkpoints and reads tiles from the store.
pub struct TransparencyLog {
    store: Arc<dyn Store>,
    key: LogKey,
}

impl TransparencyLog {
    /// Loads the log key from `key_dir`, creating it on first start.
    pub fn load_or_create(
        store: Arc<dyn Store>,
        key_dir: &Path,
        origin: &str,
    ) -> Result<Self, ServerError> {
        create_private_dir(key_dir)?;
        let path = key_dir.join(LOG_KEY_FILE);
        let key = match std::fs::read_to_string(&path) {
            Ok(skey) => LogKey::from_skey(&skey)
                .map_err(|e| ServerError::Internal(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand::Rng::fill(&mut rand::rng(), &mut seed);
                let key = LogKey::from_seed(origin, &seed)
                    .map_err(|e| ServerError::Internal(e.to_string()))?;
                write_private_file(&path, format!("{}\n", key.skey()).as_bytes())?;
                tracing::info!(vkey = key.vkey(), "created the transparency log key");
                key
            }
            Err(e) => return Err(ServerError::Io(format!("reading {}: {e}", path.display()))),
        };
        if key.name() != origin {
            return Err(ServerError::Internal(format!(
                "{} is the key of log {:?}, not {origin:?}",
                path.display(),
                key.name()
            )));
        }
        Ok(Self { store, key })
    }

    /// The public key (note `vkey` format).
    pub fn vkey(&self) -> &str {
        self.key.vkey()
    }

    /// The current size and root hash.
    pub async fn head(&self) -> Result<(u64, Hash), ServerError> {
        let f = load_frontier(&*self.store).await?;
        Ok((f.size(), f.root()))
    }

    /// A signed checkpoint of the current tree.
    pub async fn checkpoint(&self) -> Result<Vec<u8>, ServerError> {
        let (size, root) = self.head().await?;
        self.key
            .sign_checkpoint(size, root)
            .map_err(|e| ServerError::Internal(e.to_string()))
    }

    /// The content at `path` (`tile/…`), or `None` if there is no such tile in the current tree.
    pub async fn tile(&self, path: &str) -> Result<Option<Vec<u8>>, ServerError> {
        let Ok(parsed) = parse_tile_path(path) else {
            return Ok(None);
        };
        let size = self.store.tlog_size().await?;
        match parsed {
            TilePath::Hashes(t) if t.within(size) => {
                let hashes = self.store.tlog_hashes(&t.hash_indexes()).await?;
                Ok(Some(encode_hash_tile(&to_hashes(hashes))))
            }
            TilePath::Entries(t) if t.within(size) => {
                let (start, end) = t.leaf_range();
                let entries = self.store.tlog_entries(start, end).await?;
                let bundle = encode_entry_bundle(&entries)
                    .map_err(|e| ServerError::Internal(e.to_string()))?;
                Ok(Some(bundle))
            }
            _ => Ok(None),
        }
    }
}
