//! Audit before forward: every decision (allow and deny) is appended to a local audit segment
//! and made durable (fdatasync) before the request proceeds. If it cannot be written, the
//! request is refused: the only failure mode is deny. Records that arrive while a sync is in
//! flight share the next one (group commit), so the sync cost is paid per batch.
//!
//! # Segment format
//!
//! A text file, so `grep` and `tail` keep working: the line `sigil-audit v1`, then one line
//! per record, `<length> <crc32c> <json>\n`, where length is the JSON's byte length and crc32c
//! its CRC-32C, both as 8 lowercase hex digits. The file is extended ahead of the writer with
//! zero bytes (in [`PREALLOC_STEP`] steps), so a record write overwrites blocks that already
//! exist and the file size does not change: `fdatasync` then has no metadata to commit, which
//! makes the per-request sync cheaper. Readers stop at the first NUL byte.
//!
//! On open, the segment is scanned: a torn tail — one last record that a crash cut short or
//! that fails its CRC, followed only by zeros — is cut (zeroed) and logged; anything else that
//! does not verify (a bad record followed by more data, or a file in another format) refuses
//! to start rather than overwrite it.
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;
use tokio::sync::oneshot;

/// Most records per sync.
const MAX_BATCH: usize = 512;
/// The first line of a segment.
const MAGIC: &[u8] = b"sigil-audit v1\n";
/// `<8 hex> <8 hex> `
const PREFIX: usize = 18;
/// Largest record accepted when reading.
const MAX_RECORD: usize = 1 << 20;
/// How far ahead of the writer the file is zero-filled.
pub const PREALLOC_STEP: u64 = 4 << 20;

/// One authorization decision.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u128,
    pub request_id: String,
    pub spiffe_id: String,
    /// base64url SHA-256 of the client certificate.
    pub cert_thumbprint: String,
    /// The access token's `jti`, when a token was validated.
    pub jti: Option<String>,
    pub method: String,
    pub path: String,
    /// What the request asks to do (model, tool, endpoint), when it could be read.
    pub calls: Vec<crate::extract::Call>,
    /// The policies that decided (permits for an allow, forbids for a deny).
    pub policy_ids: Vec<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    pub reason: String,
    /// `outbound` for the local workload's own calls (the outbound listener); absent for
    /// calls received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    /// The outbound route the call was sent on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The user a delegated token acts for (its `sub`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The workloads acting for `user`, the caller first (the token's `act` chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<String>>,
}

/// Why a record could not be made durable, or a segment not opened or read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit log unavailable: {0}")]
pub struct AuditError(String);

/// One framed line for `json`.
pub(crate) fn frame(json: &[u8]) -> Vec<u8> {
    let mut line = format!("{:08x} {:08x} ", json.len(), crc32c::crc32c(json)).into_bytes();
    line.extend_from_slice(json);
    line.push(b'\n');
    line
}

/// The JSON of one framed line (with its `\n`), if it verifies.
pub(crate) fn unframe(line: &[u8]) -> Option<&[u8]> {
    let body = line.strip_suffix(b"\n")?;
    let head = std::str::from_utf8(body.get(..PREFIX)?).ok()?;
    let (len, rest) = head.split_once(' ')?;
    let crc = rest.strip_suffix(' ')?;
    if len.len() != 8 || crc.len() != 8 {
        return None;
    }
    let len = usize::from_str_radix(len, 16).ok()?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    let json = body.get(PREFIX..)?;
    (json.len() == len && crc32c::crc32c(json) == crc).then_some(json)
}

/// What a scan of a segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The records' JSON, in order.
    pub records: Vec<Vec<u8>>,
    /// Where the next record goes.
    pub end: u64,
    /// Bytes of a torn last record (0 if none).
    pub torn: u64,
    /// Whether the file is empty or holds only part of the header (a crash at creation).
    pub fresh: bool,
}

/// Reads and verifies a whole segment.
pub fn scan(file: &File) -> Result<Scan, AuditError> {
    let err = |m: String| AuditError(m);
    let mut r = BufReader::with_capacity(64 * 1024, file);
    r.seek(SeekFrom::Start(0)).map_err(|e| err(e.to_string()))?;
    let mut head = Vec::new();
    r.by_ref()
        .take(MAGIC.len() as u64)
        .read_to_end(&mut head)
        .map_err(|e| err(e.to_string()))?;
    if head != MAGIC {
        // Empty, or a crash while the header was written: a prefix of it, then only zeros.
        let written = head.iter().position(|b| *b == 0).unwrap_or(head.len());
        let (start, zeros) = head.split_at(written);
        if MAGIC.starts_with(start) && zeros.iter().all(|b| *b == 0) && rest_is_zero(&mut r)? {
            return Ok(Scan {
                records: Vec::new(),
                end: 0,
                torn: 0,
                fresh: true,
            });
        }
        return Err(err(
            "the file is not a sigil audit segment (move it aside to start a new one)".into(),
        ));
    }
    let mut pos = MAGIC.len() as u64;
    let mut records = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        r.by_ref()
            .take((PREFIX + MAX_RECORD + 1) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| err(e.to_string()))?;
        if line.is_empty() || line.first() == Some(&0) {
            // The end: EOF, or the zero-filled region ahead of the writer.
            if !line.iter().all(|b| *b == 0) || !rest_is_zero(&mut r)? {
                return Err(err(format!(
                    "data after the end of the records at byte {pos}"
                )));
            }
            return Ok(Scan {
                records,
                end: pos,
                torn: 0,
                fresh: false,
            });
        }
        match unframe(&line) {
            Some(json) => {
                records.push(json.to_vec());
                pos += line.len() as u64;
            }
            None => {
                // A torn tail is the last thing in the file: zeros (or nothing) follow it.
                let cut = line.iter().position(|b| *b == 0).unwrap_or(line.len());
                let after_zero = line.get(cut..).unwrap_or(&[]).iter().all(|b| *b == 0);
                if after_zero && rest_is_zero(&mut r)? {
                    return Ok(Scan {
                        records,
                        end: pos,
                        torn: cut as u64,
                        fresh: false,
                    });
                }
                return Err(err(format!(
                    "record {} at byte {pos} does not verify and is not the last (corrupt segment)",
                    records.len()
                )));
            }
        }
    }
}

fn rest_is_zero(r: &mut impl Read) -> Result<bool, AuditError> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).map_err(|e| AuditError(e.to_string()))?;
        if n == 0 {
            return Ok(true);
        }
        if buf.get(..n).is_some_and(|b| b.iter().any(|x| *x != 0)) {
            return Ok(false);
        }
    }
}

/// The records of the segment at `path`, verified, as JSON values (a torn tail is skipped).
pub fn read_records(path: &Path) -> Result<Vec<serde_json::Value>, AuditError> {
    let file = File::open(path).map_err(|e| AuditError(format!("{}: {e}", path.display())))?;
    scan(&file)?
        .records
        .iter()
        .map(|j| serde_json::from_slice(j).map_err(|e| AuditError(e.to_string())))
        .collect()
}

/// Where the first record of a segment starts.
pub const FIRST_RECORD: u64 = MAGIC.len() as u64;

/// The offset just after each record of a scanned segment (the record boundaries after the
/// header), in order.
pub fn record_ends(s: &Scan) -> Vec<u64> {
    let mut at = FIRST_RECORD;
    s.records
        .iter()
        .map(|r| {
            at += (PREFIX + r.len() + 1) as u64;
            at
        })
        .collect()
}

/// The verified records that start at byte `from` of a live segment (a record boundary;
/// anything before the first record means the first record), each with the offset just
/// after it. Stops at the end of the written records (zeros or EOF), at a record still being
/// written, after `max_records`, or once `max_bytes` of records are collected. Reads only
/// what it returns (plus one buffer), so polling the end of a segment is cheap.
pub fn read_from(
    file: &File,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<(Vec<u8>, u64)>, AuditError> {
    let io = |e: std::io::Error| AuditError(e.to_string());
    let mut pos = from.max(FIRST_RECORD);
    let mut r = BufReader::with_capacity(64 * 1024, file);
    r.seek(SeekFrom::Start(pos)).map_err(io)?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut line = Vec::new();
    while out.len() < max_records && bytes < max_bytes {
        // The zero-filled region ahead of the writer (or EOF): nothing more yet.
        match r.fill_buf().map_err(io)?.first() {
            None | Some(0) => break,
            Some(_) => {}
        }
        line.clear();
        r.by_ref()
            .take((PREFIX + MAX_RECORD + 1) as u64)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        // A record being written (or torn): read it again next time.
        let Some(json) = unframe(&line) else {
            break;
        };
        pos += line.len() as u64;
        bytes += json.len();
        out.push((json.to_vec(), pos));
    }
    Ok(out)
}

/// A framed record and who waits for it: to be written (optional), to be durable.
struct Pending {
    line: Vec<u8>,
    written: Option<oneshot::Sender<Result<(), AuditError>>>,
    durable: oneshot::Sender<Result<(), AuditError>>,
}

/// A request for the writer other than a record.
struct Rotate {
    /// Start a new segment if every record of this one is acknowledged (the writer is at
    /// `acked`) and it holds at least `min_bytes`: the old segment is deleted.
    acked: u64,
    min_bytes: u64,
    done: oneshot::Sender<Result<bool, AuditError>>,
}

/// What waits for the writer thread.
#[derive(Default)]
struct Queue {
    /// Framed records, in order, each with who waits for it to be durable.
    records: Vec<Pending>,
    rotations: Vec<Rotate>,
    /// The writer is waiting for work (not writing or syncing).
    idle: bool,
    /// A request is about to wake the idle writer (see [`AuditLog::record`]).
    waking: bool,
    /// Every handle is gone: the writer finishes what is queued and stops.
    closed: bool,
}

/// The queue between the request tasks and the writer thread.
#[derive(Default)]
struct Shared {
    queue: std::sync::Mutex<Queue>,
    work: std::sync::Condvar,
    /// Batches written (each one sync).
    syncs: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Queue>, AuditError> {
        self.queue
            .lock()
            .map_err(|_| AuditError("writer failed".into()))
    }
}

/// Ends a request's turn at waking the idle writer (see [`AuditLog::record`]).
struct WakeOnDrop<'a>(&'a Shared);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        if let Ok(mut q) = self.0.queue.lock() {
            q.waking = false;
        }
        self.0.work.notify_one();
    }
}

/// The last handle closes the queue.
struct Handle(std::sync::Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        if let Ok(mut q) = self.0.queue.lock() {
            q.closed = true;
        }
        self.0.work.notify_one();
    }
}

/// A record written but maybe not yet on disk: resolves once it is (or could not be).
pub struct Durable(oneshot::Receiver<Result<(), AuditError>>);

impl Durable {
    /// Waits until the record is on disk.
    pub async fn wait(self) -> Result<(), AuditError> {
        self.0
            .await
            .map_err(|_| AuditError("writer stopped".into()))?
    }
}

/// A handle to the audit writer thread.
#[derive(Clone)]
pub struct AuditLog {
    shared: std::sync::Arc<Handle>,
}

/// Where the writer is in a regular-file segment.
struct Cursor {
    pos: u64,
    allocated: u64,
    /// A failed batch could not be cleared: nothing more is written.
    broken: bool,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the segment at `path`, recovers it (cutting a torn tail),
    /// and starts the writer thread.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with_export(path, None)
    }

    /// [`AuditLog::open`], and after each successful sync the batch's records are offered
    /// (without blocking) to `export`: only durable records are exported.
    pub fn open_with_export(
        path: &Path,
        export: Option<crate::export::ExportSink>,
    ) -> Result<Self, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let at = |e: std::io::Error| AuditError(format!("opening {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(at)?;
        let regular = file.metadata().map_err(at)?.file_type().is_file();
        // Devices (e.g. /dev/full in tests, a pipe) are written as a stream, unscanned.
        let cursor = if regular {
            Some(recover(&file, path)?)
        } else {
            None
        };
        let shared = std::sync::Arc::new(Shared::default());
        std::thread::Builder::new()
            .name("sigil-audit".into())
            .spawn({
                let path = path.to_owned();
                let shared = shared.clone();
                move || writer(file, cursor, &shared, export, path)
            })
            .map_err(|e| AuditError(format!("starting the audit writer: {e}")))?;
        Ok(Self {
            shared: std::sync::Arc::new(Handle(shared)),
        })
    }

    /// Returns once `rec` is durable in the segment.
    ///
    /// Group commit: records that arrive while the writer syncs go into its next sync. When
    /// the writer is idle, the first record does not wake it at once but yields to the
    /// runtime first, so that the other requests ready to run now add their records to the
    /// same sync (on a busy proxy, one sync and one thread wake-up for many records; idle,
    /// the yield returns at once).
    pub async fn record(&self, rec: &DecisionRecord) -> Result<(), AuditError> {
        let (durable, wait) = oneshot::channel();
        self.enqueue(rec, None, durable).await?;
        wait.await
            .map_err(|_| AuditError("writer stopped".into()))?
    }

    /// Returns once `rec` is written to the segment (in the kernel: it survives a crash of
    /// this process), with a [`Durable`] that resolves once it is on disk. For calls
    /// without side effects, whose answer is held until then: the flush overlaps the
    /// upstream's work.
    pub async fn write(&self, rec: &DecisionRecord) -> Result<Durable, AuditError> {
        let (written, wait_written) = oneshot::channel();
        let (durable, wait_durable) = oneshot::channel();
        self.enqueue(rec, Some(written), durable).await?;
        wait_written
            .await
            .map_err(|_| AuditError("writer stopped".into()))??;
        Ok(Durable(wait_durable))
    }

    /// Queues `rec` for the writer (see [`AuditLog::record`] on how it is woken).
    async fn enqueue(
        &self,
        rec: &DecisionRecord,
        written: Option<oneshot::Sender<Result<(), AuditError>>>,
        durable: oneshot::Sender<Result<(), AuditError>>,
    ) -> Result<(), AuditError> {
        let json = serde_json::to_vec(rec).map_err(|e| AuditError(e.to_string()))?;
        let shared = &self.shared.0;
        let wake = {
            let mut q = shared.lock()?;
            q.records.push(Pending {
                line: frame(&json),
                written,
                durable,
            });
            let wake = q.idle && !q.waking;
            q.waking |= wake;
            wake
        };
        if wake {
            // Wakes the writer after the yield, or if this request is dropped during it.
            let _wake = WakeOnDrop(shared);
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// How many batches the writer has written (one sync each).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn syncs(&self) -> u64 {
        self.shared
            .0
            .syncs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the segment by a new, empty one if the writer is exactly at `acked` (every
    /// record written has been acknowledged by the server) and the segment holds at least
    /// `min_bytes`; whether it did. Decided in the writer thread, so no record can slip in
    /// between the check and the switch. The new segment is made durable (header, fsync,
    /// rename over the old one, fsync of the directory) before anything is written to it.
    pub async fn rotate_if_acked(&self, acked: u64, min_bytes: u64) -> Result<bool, AuditError> {
        let (done, wait) = oneshot::channel();
        let shared = &self.shared.0;
        shared.lock()?.rotations.push(Rotate {
            acked,
            min_bytes,
            done,
        });
        shared.work.notify_one();
        wait.await
            .map_err(|_| AuditError("writer stopped".into()))?
    }
}

/// A new empty segment at `path`, replacing the old one atomically.
fn fresh_segment(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all_at(MAGIC, 0)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// Scans the segment, cuts a torn tail, writes the header of a new one; where to go on.
fn recover(file: &File, path: &Path) -> Result<Cursor, AuditError> {
    let io = |e: std::io::Error| AuditError(format!("{}: {e}", path.display()));
    let s = scan(file).map_err(|e| AuditError(format!("{}: {}", path.display(), e.0)))?;
    let len = file.metadata().map_err(io)?.len();
    if s.fresh {
        file.set_len(0).map_err(io)?;
        file.write_all_at(MAGIC, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        return Ok(Cursor {
            pos: MAGIC.len() as u64,
            allocated: MAGIC.len() as u64,
            broken: false,
        });
    }
    if s.torn > 0 {
        tracing::warn!(
            path = %path.display(),
            records = s.records.len(),
            torn_bytes = s.torn,
            "audit segment had a torn last record (a crash during its write); cut"
        );
        zero(file, s.end, s.end + s.torn).map_err(io)?;
        file.sync_data().map_err(io)?;
    }
    Ok(Cursor {
        pos: s.end,
        allocated: len,
        broken: false,
    })
}

/// Writes zeros over `[from, to)`.
fn zero(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = [0u8; CHUNK as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(CHUNK);
        file.write_all_at(zeros.get(..n as usize).unwrap_or(&[]), at)?;
        at += n;
    }
    Ok(())
}

/// What the writer takes from the queue in one go.
struct Work {
    records: Vec<Pending>,
    rotations: Vec<Rotate>,
}

/// Waits until there is something to write (or rotate), and takes it; `None` once the queue
/// is closed and drained (or broken).
fn next_work(shared: &Shared) -> Option<Work> {
    let mut q = shared.queue.lock().ok()?;
    loop {
        // A request that is waking the writer is about to be joined by others: wait for it.
        let records_ready = !q.records.is_empty() && !q.waking;
        if records_ready || !q.rotations.is_empty() || (q.closed && !q.records.is_empty()) {
            break;
        }
        if q.closed {
            return None;
        }
        q.idle = true;
        q = shared.work.wait(q).ok()?;
    }
    q.idle = false;
    let take = q.records.len().min(MAX_BATCH);
    let records = q.records.drain(..take).collect();
    // Rotations only once the records queued before them are written.
    let rotations = if q.records.is_empty() {
        std::mem::take(&mut q.rotations)
    } else {
        Vec::new()
    };
    Some(Work { records, rotations })
}

fn writer(
    mut file: File,
    mut cursor: Option<Cursor>,
    shared: &Shared,
    export: Option<crate::export::ExportSink>,
    path: std::path::PathBuf,
) {
    while let Some(work) = next_work(shared) {
        if !work.records.is_empty() {
            write_batch(&file, cursor.as_mut(), work.records, export.as_ref());
            shared
                .syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        for Rotate {
            acked,
            min_bytes,
            done,
        } in work.rotations
        {
            let r = match cursor.as_mut() {
                Some(c) if c.pos == acked && c.pos >= min_bytes.max(FIRST_RECORD + 1) => {
                    match fresh_segment(&path) {
                        Ok(f) => {
                            tracing::info!(
                                path = %path.display(),
                                bytes = c.pos,
                                "audit segment fully acknowledged: replaced by a new one"
                            );
                            file = f;
                            *c = Cursor {
                                pos: FIRST_RECORD,
                                allocated: FIRST_RECORD,
                                broken: false,
                            };
                            Ok(true)
                        }
                        Err(e) => Err(AuditError(e.to_string())),
                    }
                }
                _ => Ok(false),
            };
            let _ = done.send(r);
        }
    }
}

/// Writes one batch and answers those waiting for it to be written, syncs it and answers
/// those waiting for it to be durable (and offers it to the export).
fn write_batch(
    mut file: &File,
    mut cursor: Option<&mut Cursor>,
    batch: Vec<Pending>,
    export: Option<&crate::export::ExportSink>,
) {
    let mut bytes = Vec::with_capacity(batch.iter().map(|p| p.line.len()).sum());
    for p in &batch {
        bytes.extend_from_slice(&p.line);
    }
    let mut durable_waiters = Vec::with_capacity(batch.len());
    let mut lines = Vec::new();
    let written = match cursor.as_deref_mut() {
        Some(c) => write_at(file, c, &bytes),
        None => file.write_all(&bytes),
    }
    .map_err(|e| AuditError(e.to_string()));
    for p in batch {
        if let Some(w) = p.written {
            let _ = w.send(written.clone());
        }
        durable_waiters.push(p.durable);
        if export.is_some() {
            lines.push(p.line);
        }
    }
    let result = written.and_then(|()| file.sync_data().map_err(|e| AuditError(e.to_string())));
    if let Some(c) = cursor {
        match &result {
            Ok(()) => c.pos += bytes.len() as u64,
            Err(_) => discard(file, c, bytes.len() as u64),
        }
    }
    if let Err(e) = &result {
        tracing::error!(error = %e, "audit log write failed; refusing requests");
    }
    for done in durable_waiters {
        let _ = done.send(result.clone());
    }
    // After the waiters are answered: the export never delays a request.
    if let Some(x) = export
        && result.is_ok()
        && !lines.is_empty()
    {
        x.offer(lines);
    }
}

/// After a batch of `len` bytes at the cursor failed (its write or its sync): the position
/// is not advanced, so the next batch overwrites the same place, and the place is zeroed
/// first, so that a shorter next batch is not followed by the rest of this one (readers stop
/// at the first NUL): a partial or stale record never sits after a complete one. If even
/// that fails, nothing more is written (every later record fails).
fn discard(file: &File, c: &mut Cursor, len: u64) {
    if let Err(e) = zero(file, c.pos, c.pos + len) {
        tracing::error!(error = %e, "audit log: a failed batch could not be cleared");
        c.broken = true;
    }
}

/// Writes `bytes` at the cursor (zero-filling ahead first when needed); the caller syncs
/// and advances the cursor.
fn write_at(file: &File, c: &mut Cursor, bytes: &[u8]) -> std::io::Result<()> {
    if c.broken {
        return Err(std::io::Error::other(
            "a failed batch could not be cleared from the segment",
        ));
    }
    let end = c.pos + bytes.len() as u64;
    if end > c.allocated {
        let to = end.div_ceil(PREALLOC_STEP).max(1) * PREALLOC_STEP;
        zero(file, c.allocated, to)?;
        c.allocated = to;
    }
    file.write_all_at(bytes, c.pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> DecisionRecord {
        DecisionRecord {
            time_ms: 1,
            request_id: format!("r{i}"),
            spiffe_id: "spiffe://td/a".into(),
            cert_thumbprint: "t".into(),
            jti: None,
            method: "GET".into(),
            path: "/".into(),
            calls: Vec::new(),
            policy_ids: Vec::new(),
            decision: "allow",
            reason: String::new(),
            direction: None,
            route: None,
            user: None,
            chain: None,
        }
    }

    #[test]
    fn crc32c_is_the_castagnoli_crc() {
        // The crate's published check value.
        assert_eq!(crc32c::crc32c(b"Hello world!"), 0x7B98_E751);
        let f = frame(br#"{"a":1}"#);
        assert_eq!(unframe(&f), Some(&br#"{"a":1}"#[..]));
        let mut bad = f.clone();
        bad[PREFIX + 2] ^= 1;
        assert_eq!(unframe(&bad), None);
        assert_eq!(unframe(&f[..f.len() - 1]), None, "no newline: torn");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn records_ready_together_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record(&rec(0)).await.unwrap();
        let before = log.syncs();
        assert_eq!(before, 1);
        // Once that returned the writer has nothing left to do: wait until it sleeps (on a
        // loaded machine it may not have got there yet, and a record arriving before would
        // be written at once, alone).
        for _ in 0..5000 {
            if log.shared.0.lock().unwrap().idle {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let mut set = tokio::task::JoinSet::new();
        for i in 1..=100 {
            let log = log.clone();
            set.spawn(async move { log.record(&rec(i)).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        // All 100 were ready at once: the first one's yield lets the others join its sync.
        let syncs = log.syncs() - before;
        assert!(syncs <= 2, "100 records took {syncs} syncs");
        assert_eq!(read_records(&path).unwrap().len(), 101);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_dropped_while_waking_the_writer_does_not_stall_it() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record(&rec(0)).await.unwrap();
        // Let the writer go idle, then drop a request in its yield (a client that hung up).
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        {
            let r1 = rec(1);
            let mut dropped = Box::pin(log.record(&r1));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(dropped.as_mut().poll(&mut cx).is_pending(), "in its yield");
        }
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), log.record(&rec(2)))
            .await
            .expect("the writer still takes records");
        next.unwrap();
        // The dropped request's decision is on record all the same.
        let ids: Vec<String> = read_records(&path)
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["r0", "r1", "r2"]);
    }

    #[test]
    fn a_failed_batch_is_cleared_before_the_next_one_overwrites_it() {
        // A batch of two records written and then not made durable (its sync failed, as on
        // EIO): the next batch, shorter, goes to the same place, and nothing of the failed
        // one may follow it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let file = fresh_segment(&path).unwrap();
        let mut c = Cursor {
            pos: FIRST_RECORD,
            allocated: FIRST_RECORD,
            broken: false,
        };
        let line = |i| frame(&serde_json::to_vec(&rec(i)).unwrap());
        let failed = [line(1), line(2)].concat();
        write_at(&file, &mut c, &failed).unwrap();
        discard(&file, &mut c, failed.len() as u64);
        write_at(&file, &mut c, &line(3)).unwrap();
        let ids: Vec<String> = read_records(&path)
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["r3"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_is_written_once_and_failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..300 {
            let log = log.clone();
            set.spawn(async move { log.record(&rec(i)).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        let records = read_records(&path).unwrap();
        let mut ids: Vec<String> = records
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!((ids.len(), records.len()), (300, 300));
        // Preallocated ahead, and still text up to the first NUL.
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw.len() as u64 % PREALLOC_STEP, 0);
        let text = String::from_utf8(raw.split(|b| *b == 0).next().unwrap().to_vec()).unwrap();
        assert_eq!(text.lines().count(), 301);
        // A device that cannot take writes: every record fails, none is acknowledged.
        let full = AuditLog::open(Path::new("/dev/full")).unwrap();
        assert!(full.record(&rec(1)).await.is_err());
        assert!(
            full.write(&rec(2)).await.is_err(),
            "written to a full device"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_written_record_is_in_the_file_before_it_is_durable_and_then_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..20 {
            let durable = log.write(&rec(i)).await.unwrap();
            // Written: another process (a reader after a crash of this one) sees it now.
            let records = read_records(&path).unwrap();
            assert_eq!(records.len(), i + 1);
            assert_eq!(records[i]["request_id"], format!("r{i}"));
            durable.wait().await.unwrap();
        }
        // Durable writes and written ones share the writer's order and its syncs.
        let (r100, r101) = (rec(100), rec(101));
        let (a, b) = tokio::join!(log.record(&r100), log.write(&r101));
        a.unwrap();
        b.unwrap().wait().await.unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 22);
        drop(log);
        // Reopened: every record verifies and the next one follows them.
        let log = AuditLog::open(&path).unwrap();
        log.record(&rec(200)).await.unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 23);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopening_continues_after_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        for round in 0..3 {
            let log = AuditLog::open(&path).unwrap();
            for i in 0..5 {
                log.record(&rec(round * 10 + i)).await.unwrap();
            }
        }
        let ids: Vec<String> = read_records(&path)
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 15);
        assert_eq!(ids[5], "r10");
    }

    /// A segment with `n` records, then `tail` written after them.
    fn segment_with(dir: &Path, n: usize, tail: &[u8]) -> std::path::PathBuf {
        let path = dir.join(format!("seg-{n}-{}", tail.len()));
        let mut bytes = MAGIC.to_vec();
        for i in 0..n {
            bytes.extend(frame(&serde_json::to_vec(&rec(i)).unwrap()));
        }
        bytes.extend_from_slice(tail);
        bytes.extend(std::iter::repeat_n(0u8, 1000));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_are_read_from_a_boundary_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..5 {
            log.record(&rec(i)).await.unwrap();
        }
        let file = File::open(&path).unwrap();
        let ends = record_ends(&scan(&file).unwrap());
        assert_eq!(ends.len(), 5);
        let first = read_from(&file, 0, 2, usize::MAX).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first.iter().map(|(_, e)| *e).collect::<Vec<_>>(), ends[..2]);
        let rest = read_from(&file, ends[1], 100, usize::MAX).unwrap();
        assert_eq!(rest.len(), 3);
        let v: serde_json::Value = serde_json::from_slice(&rest[0].0).unwrap();
        assert_eq!(v["request_id"], "r2");
        assert!(
            read_from(&file, ends[4], 100, usize::MAX)
                .unwrap()
                .is_empty()
        );
        // A byte budget stops after the record that crosses it.
        assert_eq!(read_from(&file, 0, 100, 1).unwrap().len(), 1);
        // Records written later are seen by the same handle.
        log.record(&rec(5)).await.unwrap();
        assert_eq!(read_from(&file, ends[4], 100, usize::MAX).unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_tail_is_cut_and_writing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let torn = frame(&serde_json::to_vec(&rec(99)).unwrap());
        // Cut mid-record, and a whole record with one flipped byte: both are torn tails.
        let mut flipped = torn.clone();
        flipped[PREFIX + 5] ^= 0x20;
        for tail in [&torn[..torn.len() / 2], &flipped[..]] {
            let path = segment_with(dir.path(), 3, tail);
            let log = AuditLog::open(&path).unwrap();
            log.record(&rec(7)).await.unwrap();
            let ids: Vec<String> = read_records(&path)
                .unwrap()
                .iter()
                .map(|r| r["request_id"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(ids, ["r0", "r1", "r2", "r7"]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_is_replaced_only_when_everything_in_it_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..3 {
            log.record(&rec(i)).await.unwrap();
        }
        let end = audit_end(&path);
        // Not everything acknowledged, or too small: kept.
        assert!(!log.rotate_if_acked(end - 1, 0).await.unwrap());
        assert!(!log.rotate_if_acked(end, end + 1).await.unwrap());
        assert_eq!(read_records(&path).unwrap().len(), 3);
        // All acknowledged: a new, empty segment; writing goes on in it.
        assert!(log.rotate_if_acked(end, end).await.unwrap());
        assert!(read_records(&path).unwrap().is_empty());
        log.record(&rec(9)).await.unwrap();
        let after = read_records(&path).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0]["request_id"], "r9");
        assert!(!dir.path().join("audit.log.new").exists());
        // Reopened later, it is a valid segment.
        drop(log);
        AuditLog::open(&path).unwrap();
    }

    fn audit_end(path: &Path) -> u64 {
        scan(&File::open(path).unwrap()).unwrap().end
    }

    #[test]
    fn corruption_and_foreign_files_refuse_to_open() {
        let dir = tempfile::tempdir().unwrap();
        // A bad record with good ones after it is corruption, not a torn tail.
        let mut bytes = MAGIC.to_vec();
        let mut bad = frame(b"{\"x\":1}");
        bad[PREFIX] = b'[';
        bytes.extend(bad);
        bytes.extend(frame(b"{\"x\":2}"));
        let corrupt = dir.path().join("corrupt");
        std::fs::write(&corrupt, &bytes).unwrap();
        let e = AuditLog::open(&corrupt).err().unwrap().to_string();
        assert!(e.contains("record 0"), "{e}");
        // A JSON-lines file (the old format) is never overwritten.
        let old = dir.path().join("old.jsonl");
        std::fs::write(&old, "{\"decision\":\"allow\"}\n").unwrap();
        assert!(AuditLog::open(&old).is_err());
        assert_eq!(
            std::fs::read_to_string(&old).unwrap(),
            "{\"decision\":\"allow\"}\n"
        );
        // Data after the zero-filled end is refused too.
        let mut bytes = MAGIC.to_vec();
        bytes.extend(frame(b"{}"));
        bytes.extend([0u8; 10]);
        bytes.extend(frame(b"{}"));
        let gap = dir.path().join("gap");
        std::fs::write(&gap, &bytes).unwrap();
        assert!(AuditLog::open(&gap).is_err());
        // A crash while the header was written leaves a prefix of it: started afresh.
        let partial = dir.path().join("partial");
        std::fs::write(&partial, &MAGIC[..5]).unwrap();
        AuditLog::open(&partial).unwrap();
        assert!(read_records(&partial).unwrap().is_empty());
    }
}
