//! The on-disk cache that lets the agent serve through outages and restarts: node identity,
//! trust bundle, entries, workload SVIDs and the revocation list, each file 0600 and replaced
//! atomically.
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sigil_core::{EntryId, RegistrationEntry, SpiffeId, UnixTime};

use crate::revocation::RevocationList;

/// An X.509-SVID with its private key (DER chain leaf first, PKCS#8 DER key).
#[derive(Clone, PartialEq, Eq)]
pub struct HeldSvid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
    pub serial: String,
    pub not_after: UnixTime,
    /// When the agent received it: renewal is due at half of (not_after - received_at).
    pub received_at: UnixTime,
}

impl std::fmt::Debug for HeldSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl HeldSvid {
    /// Whether it is past half its lifetime (or expired) at `now`.
    pub fn needs_renewal(&self, now: UnixTime) -> bool {
        let half = (self.not_after - self.received_at) / 2;
        now >= self.received_at + half
    }
}

#[derive(Serialize, Deserialize)]
struct SvidFile {
    spiffe_id: SpiffeId,
    chain: Vec<String>,
    key: String,
    serial: String,
    not_after: UnixTime,
    received_at: UnixTime,
}

impl From<&HeldSvid> for SvidFile {
    fn from(s: &HeldSvid) -> Self {
        Self {
            spiffe_id: s.spiffe_id.clone(),
            chain: s.chain.iter().map(|c| B64.encode(c)).collect(),
            key: B64.encode(&s.key),
            serial: s.serial.clone(),
            not_after: s.not_after,
            received_at: s.received_at,
        }
    }
}

impl TryFrom<SvidFile> for HeldSvid {
    type Error = CacheError;
    fn try_from(f: SvidFile) -> Result<Self, CacheError> {
        let dec = |s: &str| {
            B64.decode(s)
                .map_err(|e| CacheError::Corrupt(format!("base64: {e}")))
        };
        Ok(Self {
            spiffe_id: f.spiffe_id,
            chain: f.chain.iter().map(|c| dec(c)).collect::<Result<_, _>>()?,
            key: dec(&f.key)?,
            serial: f.serial,
            not_after: f.not_after,
            received_at: f.received_at,
        })
    }
}

/// Workload state that survives restarts.
#[derive(Debug, Clone, Default)]
pub struct CachedState {
    pub entries: Vec<RegistrationEntry>,
    pub svids: Vec<(EntryId, HeldSvid)>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    entries: Vec<RegistrationEntry>,
    svids: Vec<(EntryId, SvidFile)>,
}

/// Why a cache file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("{0}")]
    Io(String),
    #[error("corrupt: {0}")]
    Corrupt(String),
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

const NODE: &str = "node.json";
const BUNDLE: &str = "bundle.json";
const STATE: &str = "state.json";
const REVOCATIONS: &str = "revocations.json";
const LOG: &str = "log.json";

impl Cache {
    /// Opens (creating, mode 0700) the cache directory.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CacheError::Io(format!("creating {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io(format!("reading {name}: {e}"))),
        }
    }

    /// Moves a corrupt file aside (kept for inspection) so it is not read again.
    pub fn quarantine(&self, name: &str) {
        let from = self.dir.join(name);
        let to = self.dir.join(format!("{name}.corrupt"));
        if let Err(e) = std::fs::rename(&from, &to) {
            tracing::warn!(file = %from.display(), error = %e, "could not move corrupt cache file aside");
        }
    }

    /// Deletes everything the node was (after eviction).
    pub fn wipe(&self) {
        for name in [NODE, STATE] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    pub fn load_node(&self) -> Result<Option<HeldSvid>, CacheError> {
        let Some(bytes) = self.read(NODE)? else {
            return Ok(None);
        };
        let f: SvidFile = serde_json::from_slice(&bytes)
            .map_err(|e| CacheError::Corrupt(format!("{NODE}: {e}")))?;
        HeldSvid::try_from(f).map(Some)
    }

    pub fn save_node(&self, svid: &HeldSvid) -> Result<(), CacheError> {
        self.write(NODE, &SvidFile::from(svid))
    }

    pub fn load_bundle(&self) -> Result<Option<String>, CacheError> {
        Ok(self
            .read(BUNDLE)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub fn save_bundle(&self, json: &str) -> Result<(), CacheError> {
        write_atomic(&self.dir.join(BUNDLE), json.as_bytes())
    }

    pub fn load_state(&self) -> Result<Option<CachedState>, CacheError> {
        let Some(bytes) = self.read(STATE)? else {
            return Ok(None);
        };
        let f: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| CacheError::Corrupt(format!("{STATE}: {e}")))?;
        let svids = f
            .svids
            .into_iter()
            .map(|(id, s)| HeldSvid::try_from(s).map(|h| (id, h)))
            .collect::<Result<_, _>>()?;
        Ok(Some(CachedState {
            entries: f.entries,
            svids,
        }))
    }

    pub fn save_state(&self, state: &CachedState) -> Result<(), CacheError> {
        let f = StateFile {
            entries: state.entries.clone(),
            svids: state
                .svids
                .iter()
                .map(|(id, s)| (id.clone(), SvidFile::from(s)))
                .collect(),
        };
        self.write(STATE, &f)
    }

    /// The cached revocation list, as received (the caller drops expired entries).
    pub fn load_revocations(&self) -> Result<Option<RevocationList>, CacheError> {
        let Some(bytes) = self.read(REVOCATIONS)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CacheError::Corrupt(format!("{REVOCATIONS}: {e}")))
    }

    pub fn save_revocations(&self, list: &RevocationList) -> Result<(), CacheError> {
        self.write(REVOCATIONS, list)
    }

    /// The last verified transparency-log checkpoint and the pinned key (see `log_witness`).
    pub fn load_log_witness(&self) -> Result<Option<Vec<u8>>, CacheError> {
        self.read(LOG)
    }

    pub fn save_log_witness(&self, data: &[u8]) -> Result<(), CacheError> {
        write_atomic(&self.dir.join(LOG), data)
    }

    /// Runs blocking cache I/O (the fsyncs of [`write_atomic`]) on tokio's blocking pool, so
    /// an agent waiting on its disk does not stall the async worker thread and every task
    /// queued on it. It completes when `f` has: a write awaited here is durable, so callers
    /// keep "persist, then publish".
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, CacheError>
    where
        F: FnOnce(&Cache) -> Result<T, CacheError> + Send + 'static,
        T: Send + 'static,
    {
        let c = self.clone();
        tokio::task::spawn_blocking(move || f(&c))
            .await
            .map_err(|e| CacheError::Io(format!("cache I/O task: {e}")))?
    }

    fn write<T: Serialize>(&self, name: &str, v: &T) -> Result<(), CacheError> {
        let bytes =
            serde_json::to_vec(v).map_err(|e| CacheError::Io(format!("encoding {name}: {e}")))?;
        write_atomic(&self.dir.join(name), &bytes)
    }

    /// File names, for log messages.
    pub const NODE_FILE: &'static str = NODE;
    pub const BUNDLE_FILE: &'static str = BUNDLE;
    pub const STATE_FILE: &'static str = STATE;
    pub const REVOCATIONS_FILE: &'static str = REVOCATIONS;
    pub const LOG_FILE: &'static str = LOG;
}

/// Writes `data` to `path` with mode 0600: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CacheError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| CacheError::Io(format!("writing {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svid(n: i64) -> HeldSvid {
        HeldSvid {
            spiffe_id: SpiffeId::new("spiffe://td/a").unwrap(),
            chain: vec![vec![1, 2, 3]],
            key: vec![4, 5],
            serial: "ab".into(),
            not_after: 1000 + n,
            received_at: 900,
        }
    }

    #[test]
    fn round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(&dir.path().join("c")).unwrap();
        assert!(c.load_node().unwrap().is_none());
        c.save_node(&svid(1)).unwrap();
        assert_eq!(c.load_node().unwrap(), Some(svid(1)));
        let mode = std::fs::metadata(dir.path().join("c").join(NODE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let st = CachedState {
            entries: vec![],
            svids: vec![(EntryId::random(), svid(2))],
        };
        c.save_state(&st).unwrap();
        assert_eq!(c.load_state().unwrap().unwrap().svids, st.svids);
    }

    #[test]
    fn corrupt_files_are_reported_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(NODE), b"{\"spiffe_id\": 42").unwrap();
        assert!(matches!(c.load_node(), Err(CacheError::Corrupt(_))));
        std::fs::write(dir.path().join(STATE), b"\x00\xff garbage").unwrap();
        assert!(matches!(c.load_state(), Err(CacheError::Corrupt(_))));
        c.quarantine(NODE);
        assert!(c.load_node().unwrap().is_none());
        assert!(dir.path().join("node.json.corrupt").exists());
    }

    #[test]
    fn revocations_round_trip_and_corruption_is_reported() {
        use crate::revocation::RevokedSvid;
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        assert!(c.load_revocations().unwrap().is_none());
        let l = RevocationList {
            revision: 3,
            revoked: vec![RevokedSvid {
                serial: String::new(),
                spiffe_id: "spiffe://td/a".into(),
                revoked_at: 10,
                expires_at: 20,
            }],
        };
        c.save_revocations(&l).unwrap();
        assert_eq!(c.load_revocations().unwrap(), Some(l));
        std::fs::write(dir.path().join(REVOCATIONS), b"[1,").unwrap();
        assert!(matches!(c.load_revocations(), Err(CacheError::Corrupt(_))));
    }

    #[test]
    fn renewal_at_half_life() {
        let s = svid(100); // received 900, expires 1100
        assert!(!s.needs_renewal(999));
        assert!(s.needs_renewal(1000));
    }
}
