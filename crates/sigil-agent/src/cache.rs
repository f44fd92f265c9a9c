//! The on-disk cache that lets the agent serve through outages and restarts: node identity,
//! trust bundle, entries, workload SVIDs and the revocation list, each file 0600 and replaced
//! atomically. The files rewritten on every change pushed by the server, the revocation list
//! (`revocations.slots`) and the log witness (`log.slots`), are two-slot files
//! ([`crate::slotfile`]): one in-place write and one flush per change instead of a temp +
//! rename replace. Their previous files (`revocations.json`, `log.json`) are still read when
//! the slot file does not exist, and removed after the first write.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sigil_core::{EntryId, RegistrationEntry, SpiffeId, UnixTime};

use crate::revocation::RevocationList;
use crate::slotfile::SlotFile;

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

impl From<crate::slotfile::SlotError> for CacheError {
    fn from(e: crate::slotfile::SlotError) -> Self {
        match e {
            crate::slotfile::SlotError::Io(m) => CacheError::Io(m),
            crate::slotfile::SlotError::Corrupt(m) => CacheError::Corrupt(m),
        }
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    revocations: Arc<Slotted>,
    log: Arc<Slotted>,
}

const NODE: &str = "node.json";
const BUNDLE: &str = "bundle.json";
const STATE: &str = "state.json";
const REVOCATIONS: &str = "revocations.slots";
const LOG: &str = "log.slots";
/// The files [`REVOCATIONS`] and [`LOG`] replace (read if those do not exist).
const LEGACY_REVOCATIONS: &str = "revocations.json";
const LEGACY_LOG: &str = "log.json";

/// A two-slot cache file, opened at the first load or write; the mutex serializes writes
/// from the clones of the [`Cache`].
#[derive(Debug)]
struct Slotted {
    name: &'static str,
    /// The file it replaces.
    legacy: &'static str,
    open: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    file: Option<SlotFile>,
    /// The legacy file is known to be gone.
    legacy_gone: bool,
}

impl Slotted {
    fn new(name: &'static str, legacy: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            legacy,
            open: Mutex::new(SlotState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic while holding it cannot leave the file half-updated in memory (the state
        // is replaced only after a write succeeds).
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest record: the slot file's, or the legacy file's if there is no slot file.
    fn load(&self, dir: &Path) -> Result<Option<Vec<u8>>, CacheError> {
        let mut st = self.lock();
        st.file = None;
        match SlotFile::open(&dir.join(self.name))? {
            Some((f, payload)) => {
                st.file = Some(f);
                Ok(payload)
            }
            None => match std::fs::read(dir.join(self.legacy)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    st.legacy_gone = true;
                    Ok(None)
                }
                Err(e) => Err(CacheError::Io(format!("reading {}: {e}", self.legacy))),
            },
        }
    }

    /// Durably stores `data` (one slot write and one flush), then removes the legacy file.
    fn save(&self, dir: &Path, data: &[u8]) -> Result<(), CacheError> {
        let mut st = self.lock();
        SlotFile::write_into(&mut st.file, &dir.join(self.name), data)?;
        if !st.legacy_gone {
            match std::fs::remove_file(dir.join(self.legacy)) {
                Ok(()) => st.legacy_gone = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => st.legacy_gone = true,
                Err(e) => {
                    tracing::warn!(file = self.legacy, error = %e, "could not remove a previous cache file")
                }
            }
        }
        Ok(())
    }

    /// Forgets the open file (it is being moved aside).
    fn close(&self) {
        self.lock().file = None;
    }
}

impl Cache {
    /// Opens (creating, mode 0700) the cache directory.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        sigil_fs::create_private_dir(dir)
            .map_err(|e| CacheError::Io(format!("creating {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
            revocations: Slotted::new(REVOCATIONS, LEGACY_REVOCATIONS),
            log: Slotted::new(LOG, LEGACY_LOG),
        })
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io(format!("reading {name}: {e}"))),
        }
    }

    /// Moves a corrupt file aside (kept for inspection) so it is not read again. For a
    /// two-slot file, its previous file too (whichever was read).
    pub fn quarantine(&self, name: &str) {
        for s in [&self.revocations, &self.log] {
            if name == s.name {
                s.close();
                if self.dir.join(s.legacy).exists() {
                    self.move_aside(s.legacy);
                }
                if !self.dir.join(s.name).exists() {
                    return;
                }
            }
        }
        self.move_aside(name);
    }

    fn move_aside(&self, name: &str) {
        move_aside(&self.dir, name);
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
        let Some(bytes) = self.revocations.load(&self.dir)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CacheError::Corrupt(format!("{REVOCATIONS}: {e}")))
    }

    /// Durable when it returns (one slot write, one flush).
    pub fn save_revocations(&self, list: &RevocationList) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(list)
            .map_err(|e| CacheError::Io(format!("encoding {REVOCATIONS}: {e}")))?;
        self.revocations.save(&self.dir, &bytes)
    }

    /// The last verified transparency-log checkpoint and the pinned key (see `log_witness`).
    pub fn load_log_witness(&self) -> Result<Option<Vec<u8>>, CacheError> {
        self.log.load(&self.dir)
    }

    /// Durable when it returns (one slot write, one flush).
    pub fn save_log_witness(&self, data: &[u8]) -> Result<(), CacheError> {
        self.log.save(&self.dir, data)
    }

    /// Runs blocking cache I/O (the flushes of [`write_atomic`] and of the slot files) on tokio's blocking pool, so
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

/// Moves the corrupt file `name` of `dir` aside (to `<name>.corrupt`, kept for inspection) so
/// it is not read again.
pub(crate) fn move_aside(dir: &Path, name: &str) {
    let from = dir.join(name);
    let to = dir.join(format!("{name}.corrupt"));
    if let Err(e) = std::fs::rename(&from, &to) {
        tracing::warn!(file = %from.display(), error = %e, "could not move corrupt cache file aside");
    }
}

/// Writes `data` to `path` with mode 0600, atomically and durably ([`sigil_fs::write_private`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CacheError> {
    sigil_fs::write_private(path, data)
        .map_err(|e| CacheError::Io(format!("writing {}: {e}", path.display())))
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
        use sigil_core::RevokedSvid;
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
        assert_eq!(c.load_revocations().unwrap(), Some(l.clone()));
        // Another handle on the directory (a restart).
        let c2 = Cache::open(dir.path()).unwrap();
        assert_eq!(c2.load_revocations().unwrap(), Some(l));
        std::fs::write(dir.path().join(REVOCATIONS), b"[1,").unwrap();
        assert!(matches!(c.load_revocations(), Err(CacheError::Corrupt(_))));
        c.quarantine(REVOCATIONS);
        assert!(dir.path().join("revocations.slots.corrupt").exists());
        assert!(c.load_revocations().unwrap().is_none());
    }

    fn list(revision: i64) -> RevocationList {
        RevocationList {
            revision,
            revoked: vec![],
        }
    }

    #[test]
    fn slot_files_survive_a_torn_write_and_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        // Clones (the blocking tasks) share one open file: the writes alternate slots.
        for r in 1..=4 {
            c.clone().save_revocations(&list(r)).unwrap();
        }
        c.save_log_witness(b"witness 1").unwrap();
        c.save_log_witness(b"witness 2").unwrap();
        for name in [REVOCATIONS, LOG] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        // Tear the newest record of each: the previous one is loaded.
        for (name, needle) in [
            (REVOCATIONS, b"\"revision\":4".as_slice()),
            (LOG, b"witness 2".as_slice()),
        ] {
            let path = dir.path().join(name);
            let mut b = std::fs::read(&path).unwrap();
            let at = b.windows(needle.len()).position(|w| w == needle).unwrap();
            b[at + needle.len() - 1] ^= 0x01;
            std::fs::write(&path, b).unwrap();
        }
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.load_revocations().unwrap(), Some(list(3)));
        assert_eq!(c.load_log_witness().unwrap().unwrap(), b"witness 1");
        // Writing goes on into the torn slot.
        c.save_revocations(&list(5)).unwrap();
        c.save_log_witness(b"witness 3").unwrap();
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.load_revocations().unwrap(), Some(list(5)));
        assert_eq!(c.load_log_witness().unwrap().unwrap(), b"witness 3");
    }

    #[test]
    fn the_previous_files_are_read_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(LEGACY_REVOCATIONS),
            serde_json::to_vec(&list(7)).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join(LEGACY_LOG), b"old witness").unwrap();
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.load_revocations().unwrap(), Some(list(7)));
        assert_eq!(c.load_log_witness().unwrap().unwrap(), b"old witness");
        c.save_revocations(&list(8)).unwrap();
        c.save_log_witness(b"new witness").unwrap();
        assert!(!dir.path().join(LEGACY_REVOCATIONS).exists());
        assert!(!dir.path().join(LEGACY_LOG).exists());
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.load_revocations().unwrap(), Some(list(8)));
        assert_eq!(c.load_log_witness().unwrap().unwrap(), b"new witness");

        // A corrupt previous file is quarantined under its own name.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEGACY_REVOCATIONS), b"[1,").unwrap();
        let c = Cache::open(dir.path()).unwrap();
        assert!(matches!(c.load_revocations(), Err(CacheError::Corrupt(_))));
        c.quarantine(Cache::REVOCATIONS_FILE);
        assert!(dir.path().join("revocations.json.corrupt").exists());
        assert!(c.load_revocations().unwrap().is_none());
        c.save_revocations(&list(1)).unwrap();
        assert_eq!(c.load_revocations().unwrap(), Some(list(1)));
    }

    #[test]
    fn renewal_at_half_life() {
        let s = svid(100); // received 900, expires 1100
        assert!(!s.needs_renewal(999));
        assert!(s.needs_renewal(1000));
    }
}
