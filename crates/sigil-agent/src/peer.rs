//! Workload attestation: who is calling the Workload API, from kernel peer credentials.
//!
//! When the agent accepts a connection on its unix socket it asks the kernel for the peer's
//! credentials (`SO_PEERCRED`, via tokio's `UnixStream::peer_cred()`). The kernel records them
//! at `connect()` time, so the caller cannot forge them and they cannot be raced. They become:
//!
//! | selector      | source                                                             |
//! |---------------|--------------------------------------------------------------------|
//! | `unix:uid`    | kernel credentials (the caller's effective uid at `connect()`)     |
//! | `unix:gid`    | kernel credentials (the caller's effective gid at `connect()`)     |
//! | `unix:user`   | that uid's name in `/etc/passwd` (re-read when the file changes)   |
//! | `unix:group`  | that gid's name in `/etc/group` (re-read when the file changes)    |
//! | `unix:path`   | `readlink /proc/<pid>/exe`                                         |
//! | `unix:sha256` | SHA-256 of the executable's bytes, read through `/proc/<pid>/exe`  |
//!
//! # The PID-reuse race
//!
//! The kernel gives us a PID, and everything else about the process is read from
//! `/proc/<pid>`. Between `connect()` and those reads the caller may exit and its PID may be
//! recycled by an unrelated process. [`WorkloadAttestor::attest`] defends against that with
//! the process start time (field 22 of `/proc/<pid>/stat`, which `exec` does not change):
//! it is read before and after every other read of `/proc/<pid>`, and must be identical; and
//! the process must have started before the connection was accepted. In addition the
//! process's current effective uid/gid must still be those the kernel recorded at `connect()`
//! (catches a PID reused by another user's process, and a caller that executed a set-id
//! program after connecting).
//!
//! # What `unix:path` / `unix:sha256` mean, and what they do not
//!
//! * They describe the image the process runs *when it is attested*, not when it connected:
//!   a process may connect and then `execve` any binary its uid can execute. So they prove
//!   "uid U now runs X", never more: registration entries should always combine them with
//!   `unix:uid` or `unix:user`.
//! * A deleted executable (`... (deleted)`: unlinked or replaced since it was started, or run
//!   from a memfd) gets neither: there is no path to vouch for.
//! * `unix:path` is only emitted when that path, resolved in the agent's own mount namespace,
//!   is the very file (device + inode) the process runs. A process in another mount namespace
//!   (a container) whose path does not resolve to the same file on the host gets `unix:sha256`
//!   only: otherwise a container could claim any host path by creating it in its own rootfs.
//! * Names come from the `/etc/passwd` and `/etc/group` files only (no NSS: LDAP or SSSD users
//!   get uid/gid selectors only). Only the effective gid is reported: supplementary groups are
//!   only available from `/proc`, which the caller could change after connecting.
//!
//! # Requirements
//!
//! The agent must run in the host PID namespace (otherwise the kernel reports PID 0 for
//! callers it cannot see: [`AttestError::NoPid`]), as root or with `CAP_SYS_PTRACE` to read
//! `/proc/<pid>/exe` of other users' processes, and with a `/proc` not mounted with `hidepid`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use sigil_core::{Selector, SelectorKind};

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`, what `getconf
/// CLK_TCK` prints). The kernel converts its internal HZ to this fixed userspace ABI value,
/// which is 100 on every mainstream architecture (x86, arm, arm64, riscv, ppc, s390); only
/// long-dead ones (alpha, ia64) differ. Hard-coded because reading it needs `sysconf` (libc).
const USER_HZ: u64 = 100;

/// Slack when comparing the process start time with the time the connection was accepted.
/// The computed start time is never later than the real one (`btime` is truncated to whole
/// seconds and `starttime` to ticks), so this only absorbs wall-clock adjustments (NTP)
/// between the two readings.
const START_TIME_SLACK: Duration = Duration::from_secs(1);

/// How many executable hashes are remembered.
const HASH_CACHE_CAPACITY: usize = 256;

/// Executables larger than this are not hashed (and not attested).
const MAX_EXECUTABLE_SIZE: u64 = 1 << 30;

/// Read size when hashing an executable.
const HASH_CHUNK_SIZE: usize = 64 * 1024;

/// `ESRCH` on Linux: what reading an already-open `/proc/<pid>` file of a dead process returns.
const ESRCH: i32 = 3;

/// What the kernel appends to `/proc/<pid>/exe` when the executable was unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// What the kernel says about the peer of an accepted unix socket (from tokio's
/// `UnixStream::peer_cred()`), plus when we accepted it.
#[derive(Debug, Clone, Copy)]
pub struct PeerCred {
    /// The caller's PID, as seen from the agent's PID namespace (0 or less: unknown).
    pub pid: i32,
    /// The caller's effective uid when it connected.
    pub uid: u32,
    /// The caller's effective gid when it connected.
    pub gid: u32,
    /// When the agent accepted the connection (take it right after `accept()`).
    pub accepted_at: SystemTime,
}

impl PeerCred {
    /// From `UnixStream::peer_cred()`. A PID the kernel did not report becomes 0, which
    /// [`WorkloadAttestor::attest`] refuses with [`AttestError::NoPid`].
    pub fn from_ucred(cred: tokio::net::unix::UCred, accepted_at: SystemTime) -> Self {
        Self {
            pid: cred.pid().unwrap_or(0),
            uid: cred.uid(),
            gid: cred.gid(),
            accepted_at,
        }
    }
}

/// Why a caller could not be attested. In every case the caller gets no identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The kernel reported no PID for the caller.
    #[error(
        "the kernel reported no PID for the caller: it is in a PID namespace the agent cannot see \
         (run the agent in the host PID namespace)"
    )]
    NoPid,
    /// The process exited (or is a zombie) before it could be inspected.
    #[error(
        "the calling process exited before it could be attested \
         (or /proc hides it from the agent: is /proc mounted with hidepid?)"
    )]
    ProcessGone,
    /// The PID now belongs to another process than the one that connected.
    #[error(
        "the caller's PID belongs to a different process than the one that connected (PID reuse); \
         the caller must reconnect"
    )]
    PidReused,
    /// The process's effective uid/gid are not those it connected with.
    #[error(
        "the caller connected as uid {connected_uid} gid {connected_gid} but now runs as uid \
         {current_uid} gid {current_gid} (it changed credentials, e.g. by executing a set-id \
         program, or its PID was reused); it must reconnect"
    )]
    CredentialsChanged {
        /// Effective uid recorded by the kernel at `connect()`.
        connected_uid: u32,
        /// Effective gid recorded by the kernel at `connect()`.
        connected_gid: u32,
        /// Effective uid in `/proc/<pid>/status` now.
        current_uid: u32,
        /// Effective gid in `/proc/<pid>/status` now.
        current_gid: u32,
    },
    /// The agent may not inspect the process.
    #[error(
        "permission denied reading {0}: the agent needs root (or CAP_SYS_PTRACE) to inspect \
         other users' processes"
    )]
    PermissionDenied(String),
    /// The executable is too large to hash.
    #[error("the caller's executable is {size} bytes, more than the {max} bytes the agent hashes")]
    ExecutableTooLarge {
        /// Size of the executable (or bytes read so far).
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The executable was modified while it was being hashed.
    #[error("the caller's executable was modified while it was being hashed; retry")]
    ExecutableChanged,
    /// A `/proc` file did not have the expected format.
    #[error("unexpected content in {0}")]
    Malformed(String),
    /// Any other I/O error (the message names the file).
    #[error("I/O error: {0}")]
    Io(String),
    /// A bug or a runtime failure (e.g. the blocking task was cancelled).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Attests callers of the Workload API. Cheap to clone (the caches are shared).
#[derive(Clone)]
pub struct WorkloadAttestor {
    inner: Arc<Inner>,
}

impl Default for WorkloadAttestor {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for WorkloadAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadAttestor")
            .field("proc_root", &self.inner.proc_root)
            .finish_non_exhaustive()
    }
}

impl WorkloadAttestor {
    /// An attestor reading `/proc`, `/etc/passwd` and `/etc/group`.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner::new(
                PathBuf::from("/proc"),
                PathBuf::from("/etc/passwd"),
                PathBuf::from("/etc/group"),
            )),
        }
    }

    /// Selectors of the caller: `unix:uid` and `unix:gid` from the kernel credentials (not
    /// /proc: those cannot be raced), `unix:user` / `unix:group` names when /etc/passwd and
    /// /etc/group (re-read when they change) map them, `unix:path` = the executable (readlink
    /// /proc/<pid>/exe; a "(deleted)" executable gets no path/sha256 selectors), `unix:sha256`
    /// = lowercase hex SHA-256 of the executable's bytes, read through /proc/<pid>/exe (so it
    /// is the binary actually running, even if the path was replaced).
    ///
    /// Refuses (see [`AttestError`]) when the PID may no longer be the process that connected.
    /// The file I/O runs on tokio's blocking pool.
    pub async fn attest(&self, cred: PeerCred) -> Result<Vec<Selector>, AttestError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.attest_blocking(cred))
            .await
            .map_err(|e| AttestError::Internal(format!("attestation task failed: {e}")))?
    }
}

struct Inner {
    proc_root: PathBuf,
    users: IdNames,
    groups: IdNames,
    hashes: Mutex<HashCache>,
    /// How many times an executable was actually hashed (not served from the cache).
    #[cfg(test)]
    hashes_computed: std::sync::atomic::AtomicUsize,
    /// Runs after the per-process reads, before the second start-time read.
    #[cfg(test)]
    between_reads: Option<Box<dyn Fn() + Send + Sync>>,
}

/// The running executable of a process.
struct Executable {
    /// `None` when the path does not resolve to the running file (see the module docs).
    path: Option<String>,
    sha256: String,
}

impl Inner {
    fn new(proc_root: PathBuf, passwd: PathBuf, group: PathBuf) -> Self {
        Self {
            proc_root,
            users: IdNames::new(passwd),
            groups: IdNames::new(group),
            hashes: Mutex::new(HashCache::new(HASH_CACHE_CAPACITY)),
            #[cfg(test)]
            hashes_computed: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            between_reads: None,
        }
    }

    fn attest_blocking(&self, cred: PeerCred) -> Result<Vec<Selector>, AttestError> {
        if cred.pid <= 0 {
            return Err(AttestError::NoPid);
        }
        let pid_dir = self.proc_root.join(cred.pid.to_string());

        // INVARIANT: the start time is read BEFORE and AFTER every other read of /proc/<pid>,
        // and both readings must match. A PID is only recycled after its process exited, and
        // (pid, start time) never repeats, so if they match, every read in between saw the
        // same process. Without this, the caller could exit after connecting and let a more
        // privileged process take its PID before we read /proc.
        let started = read_start_time(&pid_dir, cred.pid)?;

        // INVARIANT: the process that connected existed before we accepted the connection.
        // A process that started later took the PID after the caller exited: refuse it.
        let started_at = start_wall_time(self.read_boot_time()?, started)
            .ok_or_else(|| AttestError::Malformed(pid_dir.join("stat").display().to_string()))?;
        let latest = cred
            .accepted_at
            .checked_add(START_TIME_SLACK)
            .unwrap_or(cred.accepted_at);
        if started_at > latest {
            return Err(AttestError::PidReused);
        }

        let (current_uid, current_gid) = read_effective_ids(&pid_dir)?;
        let exe = self.inspect_executable(&pid_dir)?;

        #[cfg(test)]
        if let Some(hook) = &self.between_reads {
            hook();
        }

        // The second start-time reading (see the INVARIANT above): nothing read from
        // /proc/<pid> is used unless this matches the first one.
        let started_again = read_start_time(&pid_dir, cred.pid)?;
        if started_again != started {
            return Err(AttestError::PidReused);
        }

        // The uid/gid selectors come from the kernel credentials, which cannot be raced; the
        // /proc ones only serve to check that the process still runs as those ids.
        if (current_uid, current_gid) != (cred.uid, cred.gid) {
            return Err(AttestError::CredentialsChanged {
                connected_uid: cred.uid,
                connected_gid: cred.gid,
                current_uid,
                current_gid,
            });
        }

        let mut selectors = vec![
            selector(SelectorKind::UnixUid, cred.uid.to_string())?,
            selector(SelectorKind::UnixGid, cred.gid.to_string())?,
        ];
        // Names that are not valid selector values (exotic characters) are left out: fewer
        // selectors can only match fewer entries.
        if let Some(name) = self.users.name_of(cred.uid)? {
            selectors.extend(Selector::new(SelectorKind::UnixUser, name).ok());
        }
        if let Some(name) = self.groups.name_of(cred.gid)? {
            selectors.extend(Selector::new(SelectorKind::UnixGroup, name).ok());
        }
        if let Some(exe) = exe {
            if let Some(path) = exe.path {
                selectors.extend(Selector::new(SelectorKind::UnixPath, path).ok());
            }
            selectors.push(selector(SelectorKind::UnixSha256, exe.sha256)?);
        }
        Ok(selectors)
    }

    /// The boot time (`btime` in /proc/stat). Read on every call: the kernel derives it from
    /// the current wall clock, so it follows clock adjustments like `accepted_at` does.
    fn read_boot_time(&self) -> Result<SystemTime, AttestError> {
        let path = self.proc_root.join("stat");
        let bytes = fs::read(&path).map_err(|e| other_io_error(&path, &e))?;
        String::from_utf8_lossy(&bytes)
            .lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|secs| secs.trim().parse::<u64>().ok())
            .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
            .ok_or_else(|| AttestError::Malformed(path.display().to_string()))
    }

    fn inspect_executable(&self, pid_dir: &Path) -> Result<Option<Executable>, AttestError> {
        let link = pid_dir.join("exe");
        let target = fs::read_link(&link).map_err(|e| proc_error(&link, e))?;
        // A deleted executable (unlinked or replaced since the process started, or a memfd)
        // has no path to vouch for: no path and no sha256 selectors.
        if target.as_os_str().as_bytes().ends_with(DELETED_SUFFIX) {
            return Ok(None);
        }
        // Opening the magic link opens the file the process actually runs, whatever the path
        // now points to.
        let mut file = File::open(&link).map_err(|e| proc_error(&link, e))?;
        let running = file.metadata().map_err(|e| proc_error(&link, e))?;
        if !running.is_file() {
            return Err(AttestError::Malformed(link.display().to_string()));
        }
        let sha256 = self.sha256_cached(&mut file, &running, &link)?;
        // INVARIANT: unix:path is only emitted when the path, resolved here, is the very file
        // that was hashed (same device and inode). This leaves it out when the process exec'd
        // between the readlink and the open, and when the process lives in another mount
        // namespace, where the path names a different file than on the agent's side.
        let path = match fs::metadata(&target) {
            Ok(on_disk) if on_disk.dev() == running.dev() && on_disk.ino() == running.ino() => {
                target.to_str().map(str::to_owned)
            }
            _ => None,
        };
        Ok(Some(Executable { path, sha256 }))
    }

    /// The SHA-256 of `file` (whose metadata is `meta`), from the cache when the same file
    /// (device, inode, size, mtime, ctime) was already hashed.
    fn sha256_cached(
        &self,
        file: &mut File,
        meta: &fs::Metadata,
        name: &Path,
    ) -> Result<String, AttestError> {
        let key = FileKey::of(meta);
        if let Some(hash) = lock(&self.hashes).get(&key) {
            return Ok(hash);
        }
        if meta.len() > MAX_EXECUTABLE_SIZE {
            return Err(AttestError::ExecutableTooLarge {
                size: meta.len(),
                max: MAX_EXECUTABLE_SIZE,
            });
        }
        let hash = sha256_reader(file, MAX_EXECUTABLE_SIZE, name)?;
        #[cfg(test)]
        self.hashes_computed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Any write to the file changes its size, mtime or ctime: if the key still matches,
        // the bytes hashed are the bytes the key describes, and the hash can be cached.
        let after = file.metadata().map_err(|e| other_io_error(name, &e))?;
        if FileKey::of(&after) != key {
            return Err(AttestError::ExecutableChanged);
        }
        lock(&self.hashes).insert(key, hash.clone());
        Ok(hash)
    }
}

fn selector(kind: SelectorKind, value: String) -> Result<Selector, AttestError> {
    Selector::new(kind, value).map_err(|e| AttestError::Internal(e.to_string()))
}

/// Maps an error reading /proc/<pid>/...: a missing entry means the process is gone.
fn proc_error(path: &Path, err: io::Error) -> AttestError {
    match err.kind() {
        io::ErrorKind::NotFound => AttestError::ProcessGone,
        io::ErrorKind::PermissionDenied => {
            AttestError::PermissionDenied(path.display().to_string())
        }
        _ if err.raw_os_error() == Some(ESRCH) => AttestError::ProcessGone,
        _ => other_io_error(path, &err),
    }
}

fn other_io_error(path: &Path, err: &io::Error) -> AttestError {
    AttestError::Io(format!("{}: {err}", path.display()))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The caches stay consistent even if a holder panicked: every update is a single insert.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The start time (clock ticks since boot) of process `pid`.
fn read_start_time(pid_dir: &Path, pid: i32) -> Result<u64, AttestError> {
    let path = pid_dir.join("stat");
    let bytes = fs::read(&path).map_err(|e| proc_error(&path, e))?;
    parse_stat_start_time(&bytes, pid)
        .ok_or_else(|| AttestError::Malformed(path.display().to_string()))
}

/// Field 22 (`starttime`) of a /proc/<pid>/stat line, if the line is that of `pid`.
///
/// The line is `pid (comm) state ppid ...`. `comm` is chosen by the process (prctl
/// PR_SET_NAME): it may contain spaces, parentheses and non-UTF-8 bytes, but no NUL, and the
/// kernel writes nothing after it that contains ')'. So split at the LAST ')'.
fn parse_stat_start_time(stat: &[u8], pid: i32) -> Option<u64> {
    let open = stat.iter().position(|&b| b == b'(')?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let head = std::str::from_utf8(stat.get(..open)?).ok()?;
    if head.trim().parse::<i32>().ok()? != pid {
        return None;
    }
    let tail = std::str::from_utf8(stat.get(close.checked_add(1)?..)?).ok()?;
    // `tail` starts with field 3 (state), so field 22 is the 20th.
    tail.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Wall-clock time of a start time in ticks since `boot`.
fn start_wall_time(boot: SystemTime, ticks: u64) -> Option<SystemTime> {
    let secs = Duration::from_secs(ticks / USER_HZ);
    let frac = Duration::from_nanos((ticks % USER_HZ) * (1_000_000_000 / USER_HZ));
    boot.checked_add(secs.checked_add(frac)?)
}

/// The effective uid and gid in /proc/<pid>/status.
fn read_effective_ids(pid_dir: &Path) -> Result<(u32, u32), AttestError> {
    let path = pid_dir.join("status");
    let bytes = fs::read(&path).map_err(|e| proc_error(&path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    // "Uid:\treal\teffective\tsaved\tfilesystem" (likewise Gid). The kernel escapes the
    // process name on the "Name:" line, so a process cannot inject lines.
    let effective = |prefix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|ids| ids.split_ascii_whitespace().nth(1))
            .and_then(|id| id.parse::<u32>().ok())
    };
    match (effective("Uid:"), effective("Gid:")) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(AttestError::Malformed(path.display().to_string())),
    }
}

/// Lowercase hex SHA-256 of everything `reader` yields, read in chunks; more than `max`
/// bytes is an error.
fn sha256_reader(reader: &mut impl Read, max: u64, name: &Path) -> Result<String, AttestError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0_u8; HASH_CHUNK_SIZE];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(other_io_error(name, &e)),
        };
        total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        if total > max {
            return Err(AttestError::ExecutableTooLarge { size: total, max });
        }
        if let Some(chunk) = buf.get(..n) {
            hasher.update(chunk);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Identifies one version of one file: any write changes size, mtime or ctime (ctime cannot
/// be set by users), and replacing the file changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileKey {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// A bounded map of executable hashes; the oldest entry is evicted first.
struct HashCache {
    map: HashMap<FileKey, String>,
    order: VecDeque<FileKey>,
    capacity: usize,
}

impl HashCache {
    fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, key: &FileKey) -> Option<String> {
        self.map.get(key).cloned()
    }

    fn insert(&mut self, key: FileKey, hash: String) {
        if self.map.contains_key(&key) {
            return;
        }
        while self.map.len() >= self.capacity {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.map.remove(&oldest);
                }
                None => break,
            }
        }
        self.order.push_back(key);
        self.map.insert(key, hash);
    }
}

/// Id → name from a passwd- or group-format file (`name:password:id:...`), re-read when the
/// file changes.
struct IdNames {
    path: PathBuf,
    loaded: Mutex<Option<(FileKey, HashMap<u32, String>)>>,
}

impl IdNames {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            loaded: Mutex::new(None),
        }
    }

    fn name_of(&self, id: u32) -> Result<Option<String>, AttestError> {
        let meta = match fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(other_io_error(&self.path, &e)),
        };
        let key = FileKey::of(&meta);
        let mut loaded = lock(&self.loaded);
        if let Some((_, names)) = loaded.as_ref().filter(|(loaded_key, _)| *loaded_key == key) {
            return Ok(names.get(&id).cloned());
        }
        // Read after the metadata: the content is at least as new as `key`; a change after
        // the read gives a new key and another reload.
        let bytes = fs::read(&self.path).map_err(|e| other_io_error(&self.path, &e))?;
        let names = parse_id_file(&String::from_utf8_lossy(&bytes));
        let name = names.get(&id).cloned();
        *loaded = Some((key, names));
        Ok(name)
    }
}

/// Parses /etc/passwd or /etc/group: the id is the third field in both. The first line for an
/// id wins, as with getpwuid(3). Comments, NIS compat (`+`/`-`) and malformed lines are skipped.
fn parse_id_file(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_password), Some(id)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let name = name.trim();
        if name.is_empty() || name.starts_with(['#', '+', '-']) {
            continue;
        }
        if let Ok(id) = id.trim().parse::<u32>() {
            names.entry(id).or_insert_with(|| name.to_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::Ordering;
    use tokio::net::{UnixListener, UnixStream};

    /// SHA-256 by coreutils, independent of the code under test.
    fn sha256sum(path: &Path) -> String {
        let out = Command::new("sha256sum").arg(path).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let hash = text.split_whitespace().next().unwrap().to_owned();
        assert_eq!(hash.len(), 64);
        hash
    }

    fn strings(selectors: &[Selector]) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    fn has(selectors: &[Selector], s: &str) -> bool {
        strings(selectors).iter().any(|x| x == s)
    }

    fn of_kind(selectors: &[Selector], kind: SelectorKind) -> Vec<String> {
        selectors
            .iter()
            .filter(|s| s.kind() == kind)
            .map(|s| s.value().to_owned())
            .collect()
    }

    fn our_ids() -> (u32, u32) {
        let meta = fs::metadata("/proc/self").unwrap();
        (meta.uid(), meta.gid())
    }

    fn cred_of(child: &Child, accepted_at: SystemTime) -> PeerCred {
        let (uid, gid) = our_ids();
        PeerCred {
            pid: i32::try_from(child.id()).unwrap(),
            uid,
            gid,
            accepted_at,
        }
    }

    struct Reaped(Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn_sleep() -> Reaped {
        Reaped(
            Command::new("/bin/sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn attests_the_current_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = PeerCred::from_ucred(a.peer_cred().unwrap(), SystemTime::now());
        assert_eq!(cred.pid, i32::try_from(std::process::id()).unwrap());
        let selectors = WorkloadAttestor::new().attest(cred).await.unwrap();

        let (uid, gid) = our_ids();
        let exe = fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        assert!(has(&selectors, &format!("unix:uid:{uid}")), "{selectors:?}");
        assert!(has(&selectors, &format!("unix:gid:{gid}")), "{selectors:?}");
        assert_eq!(
            of_kind(&selectors, SelectorKind::UnixPath),
            [exe.to_str().unwrap()]
        );
        assert_eq!(
            of_kind(&selectors, SelectorKind::UnixSha256),
            [sha256sum(&exe)]
        );
        if uid == 0 {
            assert!(has(&selectors, "unix:user:root"), "{selectors:?}");
        }
    }

    #[tokio::test]
    async fn attests_a_child_then_refuses_it_once_gone() {
        let mut child = spawn_sleep();
        let attestor = WorkloadAttestor::new();
        let cred = cred_of(&child.0, SystemTime::now());
        let selectors = attestor.attest(cred).await.unwrap();

        let sleep = fs::canonicalize("/bin/sleep").unwrap();
        assert_eq!(
            of_kind(&selectors, SelectorKind::UnixPath),
            [sleep.to_str().unwrap()]
        );
        assert_eq!(
            of_kind(&selectors, SelectorKind::UnixSha256),
            [sha256sum(&sleep)]
        );

        child.0.kill().unwrap();
        child.0.wait().unwrap();
        // Gone; or, if another test's child already took the PID, that one is newer than the
        // connection.
        let err = attestor.attest(cred).await.unwrap_err();
        assert!(
            matches!(err, AttestError::ProcessGone | AttestError::PidReused),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn refuses_a_process_newer_than_the_connection() {
        let child = spawn_sleep();
        let cred = cred_of(&child.0, SystemTime::now() - Duration::from_secs(60));
        let err = WorkloadAttestor::new().attest(cred).await.unwrap_err();
        assert!(matches!(err, AttestError::PidReused), "{err:?}");
        // ... while the same process with a plausible accept time is fine.
        let cred = cred_of(&child.0, SystemTime::now());
        WorkloadAttestor::new().attest(cred).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_changed_credentials_and_missing_pid() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut cred = PeerCred::from_ucred(a.peer_cred().unwrap(), SystemTime::now());
        cred.uid = cred.uid.wrapping_add(12345);
        let err = WorkloadAttestor::new().attest(cred).await.unwrap_err();
        assert!(
            matches!(err, AttestError::CredentialsChanged { current_uid, .. } if current_uid == our_ids().0),
            "{err:?}"
        );
        cred.pid = 0;
        let err = WorkloadAttestor::new().attest(cred).await.unwrap_err();
        assert!(matches!(err, AttestError::NoPid), "{err:?}");
    }

    #[tokio::test]
    async fn deleted_executable_gets_no_path_or_hash() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleepy");
        fs::copy("/bin/sleep", &copy).unwrap();
        // Another test's fork may briefly hold our write fd (ETXTBSY): retry.
        let mut child = None;
        for _ in 0..50 {
            match Command::new(&copy).arg("30").spawn() {
                Ok(c) => {
                    child = Some(Reaped(c));
                    break;
                }
                Err(e) if e.raw_os_error() == Some(26) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
        let child = child.unwrap();
        let attestor = WorkloadAttestor::new();
        let cred = cred_of(&child.0, SystemTime::now());
        let before = attestor.attest(cred).await.unwrap();
        assert_eq!(of_kind(&before, SelectorKind::UnixSha256).len(), 1);
        fs::remove_file(&copy).unwrap();
        let after = attestor.attest(cred).await.unwrap();
        assert!(
            of_kind(&after, SelectorKind::UnixPath).is_empty(),
            "{after:?}"
        );
        assert!(
            of_kind(&after, SelectorKind::UnixSha256).is_empty(),
            "{after:?}"
        );
        assert!(has(&after, &format!("unix:uid:{}", our_ids().0)));
    }

    /// A child running as `nobody` connects to a socket: the selectors follow the kernel's
    /// credentials for that connection.
    #[tokio::test]
    async fn attests_a_nobody_peer_over_a_real_socket() {
        if our_ids().0 != 0 {
            eprintln!("SKIPPED: needs root to run a child as nobody");
            return;
        }
        let python = Path::new("/usr/bin/python3");
        assert!(python.exists(), "this test needs /usr/bin/python3");
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o777)).unwrap();

        let child = Reaped(
            Command::new(python)
                .arg("-c")
                .arg(
                    "import socket,sys,time; s=socket.socket(socket.AF_UNIX); \
                     s.connect(sys.argv[1]); time.sleep(5)",
                )
                .arg(&socket)
                .uid(65534)
                .gid(65534)
                .current_dir("/")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let cred = PeerCred::from_ucred(stream.peer_cred().unwrap(), SystemTime::now());
        assert_eq!(cred.pid, i32::try_from(child.0.id()).unwrap());

        let selectors = WorkloadAttestor::new().attest(cred).await.unwrap();
        assert!(has(&selectors, "unix:uid:65534"), "{selectors:?}");
        assert!(has(&selectors, "unix:gid:65534"), "{selectors:?}");
        assert!(has(&selectors, "unix:user:nobody"), "{selectors:?}");
        assert!(!has(&selectors, "unix:uid:0"), "{selectors:?}");
        assert!(!has(&selectors, "unix:user:root"), "{selectors:?}");
        let exe = fs::canonicalize(python).unwrap();
        assert_eq!(
            of_kind(&selectors, SelectorKind::UnixPath),
            [exe.to_str().unwrap()]
        );
        assert_eq!(
            of_kind(&selectors, SelectorKind::UnixSha256),
            [sha256sum(&exe)]
        );
    }

    /// A fake /proc with one process, so the before/after start-time check can be exercised.
    struct FakeProc {
        dir: tempfile::TempDir,
        exe: PathBuf,
        pid: i32,
    }

    const FAKE_BOOT: u64 = 1_700_000_000;

    impl FakeProc {
        fn new(exe_target: Option<&str>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let pid = 4242;
            let exe = dir.path().join("app");
            fs::write(&exe, b"#!/bin/false\nfake executable\n").unwrap();
            let exe = fs::canonicalize(exe).unwrap();
            fs::write(
                dir.path().join("stat"),
                format!("cpu  1 2 3 4\nbtime {FAKE_BOOT}\nprocesses 9\n"),
            )
            .unwrap();
            let pid_dir = dir.path().join(pid.to_string());
            fs::create_dir(&pid_dir).unwrap();
            fs::write(
                pid_dir.join("status"),
                "Name:\tapp\nUid:\t7\t1000\t1000\t1000\nGid:\t7\t2000\t2000\t2000\n",
            )
            .unwrap();
            let target = exe_target.map_or_else(|| exe.clone(), PathBuf::from);
            std::os::unix::fs::symlink(target, pid_dir.join("exe")).unwrap();
            let fake = Self { dir, exe, pid };
            fake.set_start(500 * USER_HZ);
            fake
        }

        fn set_start(&self, ticks: u64) {
            let stat = format!(
                "{} (my app) S 1 2 3 0 -1 4194560 1 0 0 0 1 2 0 0 20 0 1 0 {ticks} 1000 10\n",
                self.pid
            );
            fs::write(
                self.dir.path().join(self.pid.to_string()).join("stat"),
                stat,
            )
            .unwrap();
        }

        fn inner(&self) -> Inner {
            let names = self.dir.path().join("names");
            fs::write(&names, "app:x:1000:1000::/:/bin/sh\ngrp:x:2000:\n").unwrap();
            Inner::new(self.dir.path().to_owned(), names.clone(), names)
        }

        fn cred(&self) -> PeerCred {
            PeerCred {
                pid: self.pid,
                uid: 1000,
                gid: 2000,
                // The fake process started at boot + 500 s.
                accepted_at: UNIX_EPOCH + Duration::from_secs(FAKE_BOOT + 600),
            }
        }
    }

    #[test]
    fn fake_proc_attests_and_detects_a_start_time_change() {
        let fake = FakeProc::new(None);
        let selectors = fake.inner().attest_blocking(fake.cred()).unwrap();
        let expected = [
            "unix:uid:1000".to_owned(),
            "unix:gid:2000".to_owned(),
            "unix:user:app".to_owned(),
            "unix:group:grp".to_owned(),
            format!("unix:path:{}", fake.exe.display()),
            format!("unix:sha256:{}", sha256sum(&fake.exe)),
        ];
        assert_eq!(strings(&selectors), expected);

        // The PID is recycled while we read: the start time changes between the two readings.
        let fake = Arc::new(fake);
        let mut inner = fake.inner();
        let in_hook = Arc::clone(&fake);
        inner.between_reads = Some(Box::new(move || in_hook.set_start(501 * USER_HZ)));
        let err = inner.attest_blocking(fake.cred()).unwrap_err();
        assert!(matches!(err, AttestError::PidReused), "{err:?}");

        // The process vanishes while we read.
        let mut inner = fake.inner();
        let in_hook = Arc::clone(&fake);
        inner.between_reads = Some(Box::new(move || {
            fs::remove_file(
                in_hook
                    .dir
                    .path()
                    .join(in_hook.pid.to_string())
                    .join("stat"),
            )
            .unwrap();
        }));
        let err = inner.attest_blocking(fake.cred()).unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone), "{err:?}");
    }

    #[test]
    fn fake_proc_start_time_against_accept_time() {
        let fake = FakeProc::new(None);
        let inner = fake.inner();
        let mut cred = fake.cred();
        // Started at boot + 500 s: accepted at 499.5 s is within the slack, 498 s is not.
        cred.accepted_at = UNIX_EPOCH + Duration::from_millis((FAKE_BOOT + 499) * 1000 + 500);
        inner.attest_blocking(cred).unwrap();
        cred.accepted_at = UNIX_EPOCH + Duration::from_secs(FAKE_BOOT + 498);
        let err = inner.attest_blocking(cred).unwrap_err();
        assert!(matches!(err, AttestError::PidReused), "{err:?}");
    }

    #[test]
    fn fake_proc_deleted_executable() {
        let fake = FakeProc::new(Some("/memfd:payload (deleted)"));
        let selectors = fake.inner().attest_blocking(fake.cred()).unwrap();
        assert_eq!(
            strings(&selectors),
            [
                "unix:uid:1000",
                "unix:gid:2000",
                "unix:user:app",
                "unix:group:grp"
            ]
        );
    }

    #[test]
    fn parses_stat_with_a_hostile_comm() {
        let line = b"1234 (a) b) (c d) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615\n";
        assert_eq!(parse_stat_start_time(line, 1234), Some(987_654));
        // Not that process.
        assert_eq!(parse_stat_start_time(line, 123), None);
        // Non-UTF-8 comm.
        let mut raw = b"7 (\xff\xfe) x) R ".to_vec();
        raw.extend_from_slice(b"1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 42 0\n");
        assert_eq!(parse_stat_start_time(&raw, 7), Some(42));
        // Truncated or garbage.
        assert_eq!(parse_stat_start_time(b"7 (x) R 1 2 3", 7), None);
        assert_eq!(parse_stat_start_time(b"7 x R", 7), None);
        assert_eq!(parse_stat_start_time(b"", 7), None);
        // The real thing.
        let me = std::process::id();
        let real = fs::read("/proc/self/stat").unwrap();
        assert!(parse_stat_start_time(&real, i32::try_from(me).unwrap()).is_some());
    }

    #[test]
    fn start_wall_time_uses_user_hz() {
        let boot = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            start_wall_time(boot, 250),
            Some(UNIX_EPOCH + Duration::from_millis(1_002_500))
        );
    }

    #[test]
    fn hash_cache_hashes_a_file_once_until_it_changes() {
        let inner = Inner::new("/proc".into(), "/etc/passwd".into(), "/etc/group".into());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        fs::write(&path, vec![7_u8; 200_000]).unwrap();
        let hash = |inner: &Inner| {
            let mut file = File::open(&path).unwrap();
            let meta = file.metadata().unwrap();
            inner.sha256_cached(&mut file, &meta, &path).unwrap()
        };
        assert_eq!(hash(&inner), sha256sum(&path));
        assert_eq!(hash(&inner), sha256sum(&path));
        assert_eq!(inner.hashes_computed.load(Ordering::Relaxed), 1);

        fs::write(&path, vec![8_u8; 200_000]).unwrap();
        assert_eq!(hash(&inner), sha256sum(&path));
        assert_eq!(inner.hashes_computed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn refuses_to_hash_huge_files() {
        let inner = Inner::new("/proc".into(), "/etc/passwd".into(), "/etc/group".into());
        let file = tempfile::tempfile().unwrap();
        file.set_len(MAX_EXECUTABLE_SIZE + 1).unwrap(); // sparse
        let mut file = file;
        let meta = file.metadata().unwrap();
        let err = inner
            .sha256_cached(&mut file, &meta, Path::new("huge"))
            .unwrap_err();
        assert!(
            matches!(err, AttestError::ExecutableTooLarge { .. }),
            "{err:?}"
        );
        // The streaming limit holds even if the size lied.
        let err = sha256_reader(&mut io::repeat(0).take(1000), 999, Path::new("x")).unwrap_err();
        assert!(
            matches!(
                err,
                AttestError::ExecutableTooLarge {
                    size: 1000,
                    max: 999
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn hash_cache_is_bounded() {
        let key = |ino| FileKey {
            dev: 1,
            ino,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            ctime: 0,
            ctime_nsec: 0,
        };
        let mut cache = HashCache::new(2);
        cache.insert(key(1), "a".into());
        cache.insert(key(2), "b".into());
        cache.insert(key(3), "c".into());
        assert_eq!(cache.map.len(), 2);
        assert_eq!(cache.get(&key(1)), None);
        assert_eq!(cache.get(&key(3)), Some("c".into()));
    }

    #[test]
    fn names_are_reloaded_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        fs::write(
            &path,
            "# comment\n+nis\nbroken\nalice:x:4242:4242::/home/alice:/bin/sh\nalias:x:4242:1::/:/bin/sh\n",
        )
        .unwrap();
        let names = IdNames::new(path.clone());
        assert_eq!(names.name_of(4242).unwrap().as_deref(), Some("alice"));
        assert_eq!(names.name_of(1).unwrap(), None);

        fs::write(&path, "bob:x:4242:4242::/home/bob:/bin/sh\n").unwrap();
        // Make sure the mtime differs even on coarse-timestamp filesystems.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(names.name_of(4242).unwrap().as_deref(), Some("bob"));

        fs::remove_file(&path).unwrap();
        assert_eq!(names.name_of(4242).unwrap(), None);
    }
}
