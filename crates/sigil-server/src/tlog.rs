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
//!
//! The same type serves the **audit log** (origin `sigil.<td>/audit`, key `audit-log.key`,
//! tables `audit_leaves`/`audit_hashes`, paths under `/log/audit/`): its leaves are the
//! proxies' decision records, verbatim, appended by [`TransparencyLog::append_audit`].
use std::path::Path;
use std::sync::Arc;

use sigil_log::tiles::{TilePath, encode_entry_bundle, encode_hash_tile, parse_tile_path};
use sigil_log::{Frontier, Hash, LogKey, LogRecord, leaf_hash, record, stored_hash_index};
use sigil_store::{IdentityKind, IssuedIdentity, Store, StoreError, TlogAppend};

use crate::ServerError;
use crate::authority::{create_private_dir, write_private_file};

/// The key file's name under the key directory.
pub const LOG_KEY_FILE: &str = "log.key";
/// The audit log's key file under the key directory.
pub const AUDIT_KEY_FILE: &str = "audit-log.key";
/// Most records in one shipped batch.
pub const MAX_AUDIT_BATCH: usize = 1000;
/// Longest request id accepted in an audit record.
const MAX_REQUEST_ID: usize = 256;

/// Which of the server's two Merkle logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// Issued identities (`/log/`).
    Issuance,
    /// Proxy decision records (`/log/audit/`).
    Audit,
}

/// The log's origin (and key name) for a trust domain.
pub fn origin_for(trust_domain: &str) -> String {
    format!("sigil.{trust_domain}/log")
}

/// The audit log's origin (and key name) for a trust domain.
pub fn audit_origin_for(trust_domain: &str) -> String {
    format!("sigil.{trust_domain}/audit")
}

/// Why a shipped batch was refused (the client's fault: `BadRecord`, `TooManyRecords`) or
/// failed (`Server`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditAppendError {
    /// Record `index` (from 0) of the batch cannot be logged.
    #[error("record {index}: {reason}")]
    BadRecord { index: usize, reason: RecordError },
    /// The batch holds more than [`MAX_AUDIT_BATCH`] records.
    #[error("at most {MAX_AUDIT_BATCH} records per batch")]
    TooManyRecords,
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// What is wrong with one shipped record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no string request_id")]
    NoRequestId,
    #[error("request_id must be 1 to {MAX_REQUEST_ID} bytes")]
    RequestIdLength,
}

/// The `request_id` of one shipped record: a JSON object with a non-empty string id.
fn request_id_of(record: &[u8]) -> Result<String, RecordError> {
    let v: serde_json::Value = serde_json::from_slice(record).map_err(RecordError::NotJson)?;
    let id = v
        .as_object()
        .ok_or(RecordError::NotAnObject)?
        .get("request_id")
        .and_then(|i| i.as_str())
        .ok_or(RecordError::NoRequestId)?;
    if id.is_empty() || id.len() > MAX_REQUEST_ID {
        return Err(RecordError::RequestIdLength);
    }
    Ok(id.to_owned())
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
    load_frontier_of(store, LogKind::Issuance).await
}

/// The right edge of either stored tree.
pub async fn load_frontier_of(store: &dyn Store, kind: LogKind) -> Result<Frontier, StoreError> {
    let size = size_of(store, kind).await?;
    let hashes = hashes_of(store, kind, &Frontier::indexes(size)).await?;
    Frontier::from_hashes(size, to_hashes(hashes)).map_err(|e| StoreError::Corrupt(e.to_string()))
}

async fn size_of(store: &dyn Store, kind: LogKind) -> Result<u64, StoreError> {
    match kind {
        LogKind::Issuance => store.tlog_size().await,
        LogKind::Audit => store.audit_size().await,
    }
}

async fn hashes_of(
    store: &dyn Store,
    kind: LogKind,
    indexes: &[u64],
) -> Result<Vec<[u8; 32]>, StoreError> {
    match kind {
        LogKind::Issuance => store.tlog_hashes(indexes).await,
        LogKind::Audit => store.audit_hashes(indexes).await,
    }
}

async fn entries_of(
    store: &dyn Store,
    kind: LogKind,
    start: u64,
    end: u64,
) -> Result<Vec<Vec<u8>>, StoreError> {
    match kind {
        LogKind::Issuance => store.tlog_entries(start, end).await,
        LogKind::Audit => store.audit_entries(start, end).await,
    }
}

/// Serves the log: signs checkpoints and reads tiles from the store.
pub struct TransparencyLog {
    store: Arc<dyn Store>,
    key: LogKey,
    kind: LogKind,
    /// Serialises appends ([`Self::append_audit`]) and caches the tree's right edge
    /// (`None` until loaded, and after a failed commit).
    appender: tokio::sync::Mutex<Option<Frontier>>,
}

impl TransparencyLog {
    /// Loads the log key from `key_dir`, creating it on first start.
    pub fn load_or_create(
        store: Arc<dyn Store>,
        key_dir: &Path,
        origin: &str,
    ) -> Result<Self, ServerError> {
        Self::load_or_create_kind(store, key_dir, origin, LogKind::Issuance)
    }

    /// The audit log: its key (`audit-log.key`) from `key_dir`, created on first start.
    pub fn load_or_create_audit(
        store: Arc<dyn Store>,
        key_dir: &Path,
        origin: &str,
    ) -> Result<Self, ServerError> {
        Self::load_or_create_kind(store, key_dir, origin, LogKind::Audit)
    }

    fn load_or_create_kind(
        store: Arc<dyn Store>,
        key_dir: &Path,
        origin: &str,
        kind: LogKind,
    ) -> Result<Self, ServerError> {
        create_private_dir(key_dir)?;
        let path = key_dir.join(match kind {
            LogKind::Issuance => LOG_KEY_FILE,
            LogKind::Audit => AUDIT_KEY_FILE,
        });
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
        Ok(Self {
            store,
            key,
            kind,
            appender: tokio::sync::Mutex::new(None),
        })
    }

    /// The public key (note `vkey` format).
    pub fn vkey(&self) -> &str {
        self.key.vkey()
    }

    /// The current size and root hash.
    pub async fn head(&self) -> Result<(u64, Hash), ServerError> {
        let f = load_frontier_of(&*self.store, self.kind).await?;
        Ok((f.size(), f.root()))
    }

    /// The consistency proof from the tree of `old` leaves to that of `new` (at most the
    /// current size), from the stored hashes.
    pub async fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, ServerError> {
        let size = size_of(&*self.store, self.kind).await?;
        if old > new || new > size {
            return Err(ServerError::Internal(format!(
                "no consistency proof from {old} to {new} in a tree of {size}"
            )));
        }
        let bad = |e: sigil_log::LogError| ServerError::Internal(e.to_string());
        let indexes = sigil_log::consistency_proof_indexes(old, new).map_err(bad)?;
        let hashes = to_hashes(hashes_of(&*self.store, self.kind, &indexes).await?);
        sigil_log::consistency_proof_from(old, new, &indexes, &hashes).map_err(bad)
    }

    /// A signed checkpoint of the current tree.
    pub async fn checkpoint(&self) -> Result<Vec<u8>, ServerError> {
        let (size, root) = self.head().await?;
        self.sign_checkpoint(size, root)
    }

    /// A signed checkpoint of the tree of `size` leaves with root `root` (from [`Self::head`]).
    pub fn sign_checkpoint(&self, size: u64, root: Hash) -> Result<Vec<u8>, ServerError> {
        self.key
            .sign_checkpoint(size, root)
            .map_err(|e| ServerError::Internal(e.to_string()))
    }

    /// The content at `path` (`tile/…`), or `None` if there is no such tile in the current tree.
    pub async fn tile(&self, path: &str) -> Result<Option<Vec<u8>>, ServerError> {
        let Ok(parsed) = parse_tile_path(path) else {
            return Ok(None);
        };
        let size = size_of(&*self.store, self.kind).await?;
        match parsed {
            TilePath::Hashes(t) if t.within(size) => {
                let hashes = hashes_of(&*self.store, self.kind, &t.hash_indexes()).await?;
                Ok(Some(encode_hash_tile(&to_hashes(hashes))))
            }
            TilePath::Entries(t) if t.within(size) => {
                let (start, end) = t.leaf_range();
                let entries = entries_of(&*self.store, self.kind, start, end).await?;
                let bundle = encode_entry_bundle(&entries)
                    .map_err(|e| ServerError::Internal(e.to_string()))?;
                Ok(Some(bundle))
            }
            _ => Ok(None),
        }
    }

    /// Appends the decision records `proxy` shipped (each one record's JSON, stored verbatim
    /// as a leaf) and returns the tree index of each, once they are committed: the new
    /// records and their tree hashes in ONE transaction. Idempotent: a record whose
    /// `(proxy, request_id)` is already logged is not appended again; its existing index is
    /// returned (also for a repeat inside the batch).
    pub async fn append_audit(
        &self,
        proxy: &str,
        records: &[&[u8]],
    ) -> Result<Vec<u64>, AuditAppendError> {
        if self.kind != LogKind::Audit {
            return Err(ServerError::Internal("not the audit log".into()).into());
        }
        if records.len() > MAX_AUDIT_BATCH {
            return Err(AuditAppendError::TooManyRecords);
        }
        let mut ids = Vec::with_capacity(records.len());
        for (index, r) in records.iter().enumerate() {
            ids.push(
                request_id_of(r).map_err(|reason| AuditAppendError::BadRecord { index, reason })?,
            );
        }
        let mut edge = self.appender.lock().await;
        // A conflict means another replica appended meanwhile (or logged one of these ids):
        // reload and try again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.try_append(&mut edge, proxy, records, &ids).await {
                Ok(indexes) => return Ok(indexes),
                Err(StoreError::Conflict(m)) if attempts < 5 => {
                    tracing::info!(reason = %m, "audit append raced another writer; retrying");
                }
                Err(e) => return Err(ServerError::from(e).into()),
            }
        }
    }

    async fn try_append(
        &self,
        edge: &mut Option<Frontier>,
        proxy: &str,
        records: &[&[u8]],
        ids: &[String],
    ) -> Result<Vec<u64>, StoreError> {
        let known = self.store.audit_lookup(proxy, ids).await?;
        let base = match edge.take() {
            Some(f) => f,
            None => load_frontier_of(&*self.store, self.kind).await?,
        };
        let mut next = base.clone();
        let mut append = TlogAppend::default();
        let mut new_ids: Vec<String> = Vec::new();
        let mut in_batch: std::collections::HashMap<&str, u64> = Default::default();
        let mut indexes = Vec::with_capacity(records.len());
        for ((data, id), known) in records.iter().zip(ids).zip(known) {
            if let Some(i) = known.or_else(|| in_batch.get(id.as_str()).copied()) {
                indexes.push(i);
                continue;
            }
            let index = next.size();
            let first = stored_hash_index(0, index);
            for (at, h) in (first..).zip(next.append(leaf_hash(data))) {
                append.hashes.push((at, h.0));
            }
            append.leaves.push((index, data.to_vec()));
            new_ids.push(id.clone());
            in_batch.insert(id.as_str(), index);
            indexes.push(index);
        }
        if append.leaves.is_empty() {
            *edge = Some(base);
            return Ok(indexes);
        }
        match self.store.audit_append(proxy, &new_ids, &append).await {
            Ok(()) => {
                *edge = Some(next);
                Ok(indexes)
            }
            Err(e) => {
                // Reloaded at the next attempt: another writer may have moved the tree.
                *edge = None;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_store::SqlStore;

    fn rec(id: &str) -> Vec<u8> {
        format!(r#"{{"request_id":"{id}","decision":"allow"}}"#).into_bytes()
    }

    #[tokio::test]
    async fn audit_append_is_idempotent_per_proxy_and_request_id() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let store: Arc<dyn Store> = Arc::new(SqlStore::connect(&url).await.unwrap());
        let keys = dir.path().join("keys");
        let log =
            TransparencyLog::load_or_create_audit(store.clone(), &keys, "sigil.td/audit").unwrap();
        let (a, b, c) = (rec("a"), rec("b"), rec("c"));
        let first = log.append_audit("spiffe://td/p1", &[&a, &b]).await.unwrap();
        assert_eq!(first, vec![0, 1]);
        // A re-sent batch (lost ack) keeps its indexes; new records and an in-batch repeat
        // are appended once.
        let again = log
            .append_audit("spiffe://td/p1", &[&a, &b, &c, &c])
            .await
            .unwrap();
        assert_eq!(again, vec![0, 1, 2, 2]);
        // Another proxy's record with the same request id is a different record.
        let other = log.append_audit("spiffe://td/p2", &[&a]).await.unwrap();
        assert_eq!(other, vec![3]);
        // A second instance (another replica, or after a restart) sees the same.
        let log2 =
            TransparencyLog::load_or_create_audit(store.clone(), &keys, "sigil.td/audit").unwrap();
        assert_eq!(
            log2.append_audit("spiffe://td/p1", &[&c, &a])
                .await
                .unwrap(),
            vec![2, 0]
        );
        // Stale cached frontier in the first instance: it retries after the conflict.
        let d = rec("d");
        assert_eq!(
            log2.append_audit("spiffe://td/p1", &[&d]).await.unwrap(),
            vec![4]
        );
        let e = rec("e");
        assert_eq!(
            log.append_audit("spiffe://td/p1", &[&e]).await.unwrap(),
            vec![5]
        );
        // Leaves are the records verbatim; the stored tree is the tree of those leaves.
        let entries = store.audit_entries(0, 10).await.unwrap();
        assert_eq!(entries, vec![a.clone(), b, c, a, d, e]);
        let mut tree = sigil_log::MemoryTree::new();
        for x in &entries {
            tree.push(x);
        }
        assert_eq!(log.head().await.unwrap(), (6, tree.root()));
        // The issuance log is untouched, and the audit checkpoint has its own origin.
        assert_eq!(store.tlog_size().await.unwrap(), 0);
        let note = String::from_utf8(log.checkpoint().await.unwrap()).unwrap();
        assert!(note.starts_with("sigil.td/audit\n6\n"), "{note}");
        // Bad records refuse the whole batch, naming the record.
        let bad: &[u8] = b"{\"no_id\":1}";
        let err = log.append_audit("spiffe://td/p1", &[&rec("f"), bad]).await;
        assert!(
            matches!(err, Err(AuditAppendError::BadRecord { index: 1, .. })),
            "{err:?}"
        );
        assert_eq!(store.audit_size().await.unwrap(), 6);
    }
}
