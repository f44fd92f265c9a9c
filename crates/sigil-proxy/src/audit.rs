//! Audit before forward: every decision (allow and deny) is appended to a local audit segment
//! and made durable (fdatasync) before the request proceeds. If it cannot be written, the
//! request is refused: the only failure mode is deny. Each request task writes its own record
//! (into the page cache, in order, under the log's lock: no thread hand-off before the
//! request goes on) and one writer thread syncs; records written while a sync is in flight
//! share the next one (group commit), so the sync cost is paid per batch. A failed sync
//! fails every record written since the last good one, and the next record overwrites them.
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
use sigil_metrics::prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

/// The first line of a segment.
const MAGIC: &[u8] = b"sigil-audit v1\n";
/// `<8 hex> <8 hex> `
const PREFIX: usize = 18;
/// Largest record accepted when reading.
const MAX_RECORD: usize = 16 << 20;
/// How far ahead of the writer the file is zero-filled.
pub const PREALLOC_STEP: u64 = 4 << 20;
/// Zeros are written in chunks of this size; the writer takes the log's lock once per chunk.
const ZERO_CHUNK: u64 = 64 * 1024;

/// One authorization decision, borrowing what the request already holds (it is serialized
/// once, into the segment).
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord<'a> {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u128,
    pub request_id: &'a str,
    pub spiffe_id: &'a str,
    /// base64url SHA-256 of the client certificate.
    pub cert_thumbprint: &'a str,
    /// The access token's `jti`, when a token was validated.
    pub jti: Option<String>,
    pub method: &'a str,
    pub path: &'a str,
    /// What the request asks to do (model, tool, endpoint), when it could be read.
    pub calls: Vec<crate::extract::Call>,
    /// The policies that decided (permits for an allow, forbids for a deny).
    pub policy_ids: &'a [String],
    /// `allow` or `deny`.
    pub decision: &'static str,
    pub reason: &'a str,
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
#[cfg(test)]
pub(crate) fn frame(json: &[u8]) -> Vec<u8> {
    let mut line = vec![b' '; PREFIX];
    line.extend_from_slice(json);
    seal(line)
}

/// One framed line for `rec`, serialized in place after room for the prefix (no second
/// buffer and copy per record).
fn frame_record(rec: &DecisionRecord<'_>) -> Result<Vec<u8>, AuditError> {
    let mut line = Vec::with_capacity(512);
    line.resize(PREFIX, b' ');
    serde_json::to_writer(&mut line, rec).map_err(|e| AuditError(e.to_string()))?;
    // Refused, not written: a longer line would not verify when the segment is read again.
    // A default body (1 MiB) re-serialized stays far below (numbers grow at most ~5x).
    let len = line.len() - PREFIX;
    if len > MAX_RECORD {
        return Err(AuditError(format!(
            "a record of {len} bytes is over the audit log's limit of {MAX_RECORD}"
        )));
    }
    Ok(seal(line))
}

/// Fills the prefix (`<len> <crc32c> `, 8 hex digits each) of a line whose JSON follows
/// `PREFIX` bytes of room, and ends it.
fn seal(mut line: Vec<u8>) -> Vec<u8> {
    let json = line.get(PREFIX..).unwrap_or_default();
    let (len, crc) = (json.len(), crc32c::crc32c(json));
    let mut head = [b' '; PREFIX];
    // A record is at most MAX_RECORD bytes long, so its length takes 8 hex digits
    // (`frame_record`).
    let _ = write!(head.as_mut_slice(), "{len:08x} {crc:08x} ");
    if let Some(h) = line.get_mut(..PREFIX) {
        h.copy_from_slice(&head);
    }
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

/// The longest last sync after which a lone request still syncs its own record.
const LONE_SYNC_MAX: std::time::Duration = std::time::Duration::from_millis(1);

/// Who waits for a record written to the segment to be made durable by a sync.
type Waiter = oneshot::Sender<Result<(), AuditError>>;

/// A request for the writer other than a sync.
struct Rotate {
    /// Start a new segment if every record of this one is acknowledged (the writer is at
    /// `acked`) and it holds at least `min_bytes`: the old segment is deleted.
    acked: u64,
    min_bytes: u64,
    done: oneshot::Sender<Result<bool, AuditError>>,
}

/// The segment and what waits for the writer thread.
struct Log {
    file: std::sync::Arc<File>,
    /// Where the next record goes in a regular-file segment (`None`: a device or pipe,
    /// written as a stream).
    cursor: Option<Cursor>,
    /// Bytes written so far: the segment position, or what a stream was given.
    end: u64,
    /// Everything up to here is on disk.
    synced: u64,
    /// Records written and not yet durable, in order.
    waiters: Vec<Waiter>,
    /// Their lines, for the export (only when there is one).
    lines: Vec<Vec<u8>>,
    rotations: Vec<Rotate>,
    /// The writer is waiting for work (not syncing).
    idle: bool,
    /// A request is about to wake the idle writer (see [`AuditLog::write`]).
    waking: bool,
    /// A lone request is syncing its own record (see [`Durable::kick`]): the
    /// writer waits until it is done.
    syncing: bool,
    /// Every handle is gone: the writer syncs what is written and stops.
    closed: bool,
    /// Records after a failed sync could not be cleared: nothing more is written.
    broken: Option<AuditError>,
}

/// The segment shared by the request tasks (which write records) and the writer thread
/// (which syncs them).
struct Shared {
    log: std::sync::Mutex<Log>,
    work: std::sync::Condvar,
    /// Records written, and syncs made (records / syncs: the group commit's batch size).
    records: Counter,
    syncs: Counter,
    /// How long the last sync took, in µs: a lone request syncs its own record only while
    /// the device answers quickly (see [`Durable::kick`]).
    last_sync_us: std::sync::atomic::AtomicU64,
    exporting: bool,
    /// Requests in flight in the proxy that writes to this log (kept by the proxy: see
    /// [`AuditLog::in_flight`]).
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Shared {
    /// Syncs `file` (what is written to it), counting the sync and timing it.
    fn sync(&self, file: &File) -> Result<(), AuditError> {
        let start = std::time::Instant::now();
        let synced = file.sync_data().map_err(|e| AuditError(e.to_string()));
        self.syncs.inc();
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_sync_us
            .store(us, std::sync::atomic::Ordering::Relaxed);
        synced
    }

    /// Whether the device answered the last sync quickly enough for a request to sync its
    /// own record ([`LONE_SYNC_MAX`]).
    fn quick(&self) -> bool {
        self.last_sync_us.load(std::sync::atomic::Ordering::Relaxed)
            < LONE_SYNC_MAX.as_micros() as u64
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Log>, AuditError> {
        self.log
            .lock()
            .map_err(|_| AuditError("writer failed".into()))
    }
}

/// A request's turn at waking the idle writer (see [`AuditLog::write`]): the writer is woken
/// when the turn ends, after the request's yield or when the request is dropped.
struct Kick {
    shared: std::sync::Arc<Shared>,
    /// Cleared once the request synced its record itself: nothing to wake.
    armed: bool,
}

impl Kick {
    /// The end of the turn: the only request in flight, with the writer idle and nothing
    /// but its own record to sync, syncs it itself and the writer is not woken (see
    /// [`Durable::kick`]). A model call gets here once its forward is on its way: the sync
    /// then runs while the upstream works, on the thread that would otherwise wait for the
    /// writer. Otherwise (another request in flight, a slow device, an export) the writer is
    /// woken as usual.
    fn sync_alone(mut self) {
        let shared = self.shared.clone();
        let own = shared.lock().ok().and_then(|mut q| {
            let alone = shared.in_flight.load(std::sync::atomic::Ordering::Relaxed) <= 1
                && shared.quick()
                && q.idle
                && !q.syncing
                && !q.closed
                && q.broken.is_none()
                && q.rotations.is_empty()
                && !shared.exporting;
            alone.then(|| {
                // Still this request's turn (`waking`): no one else has woken the writer.
                q.waking = false;
                q.syncing = true;
                (q.file.clone(), q.end, std::mem::take(&mut q.waiters))
            })
        });
        let Some((file, target, waiters)) = own else {
            return; // dropped: wakes the writer
        };
        self.armed = false;
        let synced = shared.sync(&file);
        let more = match shared.lock() {
            Ok(mut q) => {
                q.syncing = false;
                q.synced_to(target, &synced);
                // Records written meanwhile, or the allocation to extend ahead (the writer
                // does it after its own syncs, and here it made none).
                !q.waiters.is_empty() || !q.rotations.is_empty() || q.allocation_target().is_some()
            }
            Err(_) => true,
        };
        for w in waiters {
            let _ = w.send(synced.clone());
        }
        if more {
            shared.work.notify_one();
        }
    }
}

impl Drop for Kick {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(mut q) = self.shared.log.lock() {
            q.waking = false;
        }
        self.shared.work.notify_one();
    }
}

/// The last handle closes the log.
struct Handle(std::sync::Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        if let Ok(mut q) = self.0.log.lock() {
            q.closed = true;
        }
        self.0.work.notify_one();
    }
}

/// A record written but maybe not yet on disk: resolves once it is (or could not be).
pub struct Durable {
    done: oneshot::Receiver<Result<(), AuditError>>,
    /// This record found the writer idle: it wakes it (dropped unused, it wakes it too).
    kick: Option<Kick>,
}

impl Durable {
    /// Wakes the writer if this record's request is the one to: after one yield to the
    /// runtime, so that what is ready to run now goes first — the other requests, which add
    /// their records to the same sync, and the connection this request has just handed its
    /// forward to. Returns at once for any other record.
    ///
    /// The only request the proxy is handling syncs its record itself instead, on its own
    /// thread, when the writer is idle with nothing else to sync: no hand-off to the writer
    /// and back, which is two thread wake-ups, each of a halted core on an idle device
    /// (measured in docs/performance.md). It blocks its thread for one flush, so only when
    /// no other request is in flight (there is nothing else to do then, and a request
    /// arriving meanwhile waits at most that flush), and only while the last sync took less
    /// than [`LONE_SYNC_MAX`] (on a slow card a flush can take tens of milliseconds: the
    /// runtime is not stalled for that), and not with an export to feed.
    pub async fn kick(&mut self) {
        if let Some(kick) = self.kick.take() {
            tokio::task::yield_now().await;
            kick.sync_alone();
        }
    }

    /// Waits until the record is on disk.
    pub async fn wait(mut self) -> Result<(), AuditError> {
        self.kick().await;
        self.done
            .await
            .map_err(|_| AuditError("writer stopped".into()))?
    }
}

/// A handle to the audit segment and its writer thread.
#[derive(Clone)]
pub struct AuditLog {
    shared: std::sync::Arc<Handle>,
}

/// Where the writer is in a regular-file segment.
struct Cursor {
    pos: u64,
    allocated: u64,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the segment at `path`, recovers it (cutting a torn tail),
    /// and starts the writer thread.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with_export(path, None)
    }

    /// [`AuditLog::open`], and after each successful sync the records it made durable are
    /// offered (without blocking) to `export`: only durable records are exported.
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
        let end = cursor.as_ref().map_or(0, |c| c.pos);
        let shared = std::sync::Arc::new(Shared {
            log: std::sync::Mutex::new(Log {
                file: std::sync::Arc::new(file),
                cursor,
                end,
                synced: end,
                waiters: Vec::new(),
                lines: Vec::new(),
                rotations: Vec::new(),
                idle: false,
                waking: false,
                syncing: false,
                closed: false,
                broken: None,
            }),
            work: std::sync::Condvar::new(),
            records: Counter::default(),
            syncs: Counter::default(),
            last_sync_us: std::sync::atomic::AtomicU64::new(0),
            exporting: export.is_some(),
            in_flight: std::sync::Arc::default(),
        });
        std::thread::Builder::new()
            .name("sigil-audit".into())
            .spawn({
                let path = path.to_owned();
                let shared = shared.clone();
                move || writer(&shared, export, path)
            })
            .map_err(|e| AuditError(format!("starting the audit writer: {e}")))?;
        Ok(Self {
            shared: std::sync::Arc::new(Handle(shared)),
        })
    }

    /// Returns once `rec` is durable in the segment: [`AuditLog::write`], then
    /// [`Durable::wait`]. For the only request in flight, with the writer idle, the request
    /// syncs its record itself (see [`Durable::kick`]).
    pub async fn record(&self, rec: &DecisionRecord<'_>) -> Result<(), AuditError> {
        self.write(rec)?.wait().await
    }

    /// Writes `rec` to the segment (into the kernel: it survives a crash of this process)
    /// and returns a [`Durable`] that resolves once it is on disk. For calls without side
    /// effects, whose answer is held until then: the flush overlaps the upstream's work.
    ///
    /// The request task writes its record itself (into the page cache, in order, under the
    /// log's lock) and the writer thread syncs. Group commit: records written while the
    /// writer syncs go into its next sync. When the writer is idle, the first record does
    /// not wake it at once: its [`Durable`] does, on its first poll and after one yield to
    /// the runtime, so that the other requests ready to run now add their records to the
    /// same sync (on a busy proxy, one sync and one thread wake-up for many records; idle,
    /// the yield returns at once). Until then the writer does not sync, so a caller that
    /// holds a [`Durable`] polls it (or drops it) without delay.
    pub fn write(&self, rec: &DecisionRecord<'_>) -> Result<Durable, AuditError> {
        self.append(frame_record(rec)?)
    }

    /// [`AuditLog::write`] of a framed record.
    fn append(&self, line: Vec<u8>) -> Result<Durable, AuditError> {
        let shared = &self.shared.0;
        let (durable, done) = oneshot::channel();
        let wake = {
            let mut q = shared.lock()?;
            q.append(&line)?;
            shared.records.inc();
            q.waiters.push(durable);
            if shared.exporting {
                q.lines.push(line);
            }
            let wake = q.idle && !q.waking;
            q.waking |= wake;
            wake
        };
        Ok(Durable {
            done,
            kick: wake.then(|| Kick {
                shared: shared.clone(),
                armed: true,
            }),
        })
    }

    /// The count of requests in flight that the proxy keeps (each from its arrival until
    /// its answer's body ends): the only request in flight syncs its own record (see
    /// [`Durable::kick`]).
    pub(crate) fn in_flight(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        self.shared.0.in_flight.clone()
    }

    /// How many syncs the writer has made.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn syncs(&self) -> u64 {
        self.shared.0.syncs.get()
    }

    /// The counters of records written and syncs made, for `/metrics`.
    pub(crate) fn counters(&self) -> (Counter, Counter) {
        let shared = &self.shared.0;
        (shared.records.clone(), shared.syncs.clone())
    }

    /// Replaces the segment by a new, empty one if the writer is exactly at `acked` (every
    /// record written has been acknowledged by the server) and the segment holds at least
    /// `min_bytes`; whether it did. Decided by the writer thread under the log's lock once
    /// everything written is durable, so no record can slip in between the check and the
    /// switch. The new segment is made durable (header, fsync, rename over the old one,
    /// fsync of the directory) before anything is written to it.
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

impl Log {
    /// Writes `line` after the last record (zero-filling ahead first when needed). On an
    /// error nothing moves: the next record overwrites the same place, so a partial record
    /// never sits before a complete one.
    fn append(&mut self, line: &[u8]) -> Result<(), AuditError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let err = |e: std::io::Error| AuditError(e.to_string());
        match self.cursor.as_mut() {
            Some(c) => {
                let end = c.pos + line.len() as u64;
                if end > c.allocated {
                    let to = end.div_ceil(PREALLOC_STEP).max(1) * PREALLOC_STEP;
                    zero(&self.file, c.allocated, to).map_err(err)?;
                    c.allocated = to;
                }
                self.file.write_all_at(line, c.pos).map_err(err)?;
                c.pos = end;
                self.end = end;
            }
            None => {
                (&*self.file).write_all(line).map_err(err)?;
                self.end += line.len() as u64;
            }
        }
        Ok(())
    }

    /// Takes the result of a sync of everything written up to `target`: durable up to there,
    /// or rolled back. The same file either way: a rotation waits for every waiter, and no
    /// lone sync runs during one.
    fn synced_to(&mut self, target: u64, synced: &Result<(), AuditError>) {
        match synced {
            Ok(()) => self.synced = self.synced.max(target),
            Err(e) => {
                tracing::error!(error = %e, "audit log sync failed; refusing requests");
                self.roll_back(e);
            }
        }
    }

    /// After a failed sync: what was written since the last good one may not be on disk
    /// (and the kernel may have dropped it), so the position goes back there and every
    /// record after it is failed (refused, or its answer withheld); the next record
    /// overwrites them.
    fn roll_back(&mut self, e: &AuditError) {
        if let Some(c) = self.cursor.as_mut() {
            // Zeroed, so that a shorter record written next is not followed by the rest of
            // these (readers stop at the first NUL). If even that fails, nothing more is
            // written: every later record fails.
            if let Err(z) = zero(&self.file, self.synced, self.end) {
                tracing::error!(error = %z, "audit log: could not clear after a failed sync");
                self.broken = Some(e.clone());
            }
            c.pos = self.synced;
            self.end = self.synced;
        }
        self.lines.clear();
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(e.clone()));
        }
    }

    /// Where the zero-filled space should end: the next step boundary, when the records are
    /// within half a step of the end of what is allocated (`None`: far enough ahead).
    fn allocation_target(&self) -> Option<u64> {
        self.cursor
            .as_ref()
            .filter(|c| c.allocated.saturating_sub(c.pos) < PREALLOC_STEP / 2)
            .map(|c| (c.allocated / PREALLOC_STEP + 1) * PREALLOC_STEP)
    }

    /// Zero-fills one chunk after what is allocated, up to `target`; whether more is left.
    fn allocate_chunk(&mut self, target: u64) -> std::io::Result<bool> {
        let Self { file, cursor, .. } = self;
        let Some(c) = cursor.as_mut().filter(|c| c.allocated < target) else {
            return Ok(false);
        };
        let to = (c.allocated + ZERO_CHUNK).min(target);
        zero(file, c.allocated, to)?;
        c.allocated = to;
        Ok(to < target)
    }

    /// Carries out the rotations asked for; only once everything written is durable.
    fn rotate(&mut self, path: &Path) {
        for Rotate {
            acked,
            min_bytes,
            done,
        } in std::mem::take(&mut self.rotations)
        {
            let r = match self.cursor.as_mut() {
                Some(c) if c.pos == acked && c.pos >= min_bytes.max(FIRST_RECORD + 1) => {
                    match fresh_segment(path) {
                        Ok(f) => {
                            tracing::info!(
                                path = %path.display(),
                                bytes = c.pos,
                                "audit segment fully acknowledged: replaced by a new one"
                            );
                            self.file = std::sync::Arc::new(f);
                            *c = Cursor {
                                pos: FIRST_RECORD,
                                allocated: FIRST_RECORD,
                            };
                            self.end = FIRST_RECORD;
                            self.synced = FIRST_RECORD;
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

/// Puts the calling thread (the writer) under `SCHED_BATCH`: same share of the CPU as any
/// thread, but waking it never preempts the running one. A request that wakes the writer
/// then goes on to forward (or to wait in the runtime) before the writer starts its sync,
/// instead of being switched out for it on its core; measured in docs/performance.md.
/// Where the policy cannot be set, the writer runs as any thread. Its nice value stays the
/// process's (the policy call also sets one: it is put back).
fn batch_scheduling() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityOsValue, ThreadSchedulePolicy,
    };
    // Linux: the calling thread's.
    let nice = rustix::process::getpriority_process(None);
    let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    if let Err(e) = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Os(ThreadPriorityOsValue::default()),
        batch,
    ) {
        tracing::debug!(error = ?e, "audit writer: SCHED_BATCH not set; runs as any thread");
    }
    if let Ok(n) = nice
        && let Err(e) = rustix::process::setpriority_process(None, n)
    {
        tracing::debug!(error = %e, "audit writer: nice value not restored");
    }
}

/// The writer thread: syncs what the requests wrote, answers them, offers the durable
/// records to the export; rotates the segment when asked.
fn writer(shared: &Shared, export: Option<crate::export::ExportSink>, path: std::path::PathBuf) {
    batch_scheduling();
    let Ok(mut q) = shared.log.lock() else {
        return;
    };
    // Allocated ahead since the writer last slept (once per wake-up: a failing allocation
    // is not retried in a loop).
    let mut allocated = false;
    loop {
        // A request that is waking the writer is about to be joined by others: wait for it.
        // A lone request syncing its own record wakes the writer when it is done.
        let to_sync = !q.waiters.is_empty() && (!q.waking || q.closed) && !q.syncing;
        if !to_sync {
            if !q.rotations.is_empty() && q.waiters.is_empty() && !q.syncing {
                q.rotate(&path);
                continue;
            }
            if q.closed {
                return;
            }
            // Woken after requests synced their own records: extend the allocation ahead.
            if !allocated && !q.syncing && q.allocation_target().is_some() {
                drop(q);
                allocate_ahead(shared);
                allocated = true;
                q = match shared.log.lock() {
                    Ok(q) => q,
                    Err(_) => return,
                };
                continue;
            }
            q.idle = true;
            q = match shared.work.wait(q) {
                Ok(q) => q,
                Err(_) => return,
            };
            q.idle = false;
            allocated = false;
            continue;
        }
        let (file, target) = (q.file.clone(), q.end);
        let waiters = std::mem::take(&mut q.waiters);
        let lines = std::mem::take(&mut q.lines);
        drop(q);
        let synced = shared.sync(&file);
        q = match shared.log.lock() {
            Ok(q) => q,
            Err(_) => return,
        };
        q.synced_to(target, &synced);
        drop(q);
        for w in waiters {
            let _ = w.send(synced.clone());
        }
        // After the waiters are answered: the export never delays a request.
        if let Some(x) = &export
            && synced.is_ok()
            && !lines.is_empty()
        {
            x.offer(lines);
        }
        if synced.is_ok() {
            allocate_ahead(shared);
        }
        q = match shared.log.lock() {
            Ok(q) => q,
            Err(_) => return,
        };
    }
}

/// Keeps zero-filled space ahead of the records, so that requests seldom extend the segment
/// themselves: once they are within half a step of its end, up to the next step boundary.
/// After the durable answers are sent, one [`ZERO_CHUNK`] per turn of the log's lock, so a
/// request never waits behind more than one chunk (the whole step under the lock held every
/// request for milliseconds). Each chunk starts where the allocation ends at that moment: a
/// request that extended the segment meanwhile is never overwritten.
fn allocate_ahead(shared: &Shared) {
    let Some(target) = shared.log.lock().ok().and_then(|q| q.allocation_target()) else {
        return;
    };
    loop {
        let Ok(mut q) = shared.log.lock() else {
            return;
        };
        match q.allocate_chunk(target) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "audit log: could not allocate ahead");
                return;
            }
        }
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
    })
}

/// Writes zeros over `[from, to)`.
fn zero(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = [0u8; ZERO_CHUNK as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZERO_CHUNK);
        file.write_all_at(zeros.get(..n as usize).unwrap_or(&[]), at)?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    fn rec(i: usize) -> DecisionRecord<'static> {
        DecisionRecord {
            time_ms: 1,
            request_id: format!("r{i}").leak(),
            spiffe_id: "spiffe://td/a",
            cert_thumbprint: "t",
            jti: None,
            method: "GET",
            path: "/",
            calls: Vec::new(),
            policy_ids: &[],
            decision: "allow",
            reason: "",
            direction: None,
            route: None,
            user: None,
            chain: None,
        }
    }

    #[tokio::test]
    async fn a_record_above_a_megabyte_verifies_on_reopening_and_one_above_the_limit_is_refused() {
        let (_dir, path, log) = new_log();
        // A tool call whose arguments fill a default body (1 MiB).
        let mut big = rec(1);
        big.calls.push(crate::extract::Call {
            action: "call_tool",
            resource_type: "Tool",
            resource_id: "write_file".into(),
            arguments: Some(serde_json::json!({"content": "x".repeat(1 << 20)})),
        });
        log.record(&big).await.unwrap();
        log.record(&rec(2)).await.unwrap();
        let long = "x".repeat(MAX_RECORD);
        let mut huge = rec(3);
        huge.reason = &long;
        let refused = log.record(&huge).await.unwrap_err().to_string();
        assert!(refused.contains("over the audit log's limit"), "{refused}");
        log.record(&rec(4)).await.unwrap();
        drop(log);
        let ids = ids(&path);
        assert_eq!(ids, ["r1", "r2", "r4"]);
        AuditLog::open(&path).unwrap();
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
        let (_dir, path, log) = new_log();
        log.record(&rec(0)).await.unwrap();
        let before = log.syncs();
        assert_eq!(before, 1);
        // Once that returned the writer has nothing left to do: wait until it sleeps (on a
        // loaded machine it may not have got there yet, and a record arriving before would
        // be written at once, alone).
        until_idle(&log).await;
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
        let (_dir, path, log) = new_log();
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
        let ids = ids(&path);
        assert_eq!(ids, ["r0", "r1", "r2"]);
    }

    /// The request ids of the segment at `path`'s verified records, in order.
    fn ids(path: &Path) -> Vec<String> {
        read_records(path)
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A new segment at `audit.log` in a temporary directory (kept until it is dropped).
    fn new_log() -> (tempfile::TempDir, std::path::PathBuf, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        (dir, path, log)
    }

    /// A new segment with one durable record, its writer asleep.
    async fn idle_log() -> (tempfile::TempDir, std::path::PathBuf, AuditLog) {
        let (dir, path, log) = new_log();
        log.record(&rec(0)).await.unwrap();
        until_idle(&log).await;
        (dir, path, log)
    }

    /// Waits until the writer sleeps (after a record it may not have got there yet).
    async fn until_idle(log: &AuditLog) {
        for _ in 0..5000 {
            if log.shared.0.lock().unwrap().idle {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("the writer never went idle");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_written_record_waits_for_its_kick_and_a_dropped_durable_kicks() {
        let (_dir, path, log) = idle_log().await;
        let before = log.syncs();
        // The first record finds the writer idle: its Durable holds the kick.
        let first = log.write(&rec(1)).unwrap();
        let mut second = log.write(&rec(2)).unwrap();
        assert!(first.kick.is_some() && second.kick.is_none());
        // Kicking the second (not the one to) returns at once and wakes nobody: both wait,
        // to share the sync the first one's kick starts.
        second.kick().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(log.syncs(), before, "synced before the kick");
        // The first one's request ends without polling it (its forward failed, say): the
        // drop wakes the writer, which syncs both in one go.
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), second.wait())
            .await
            .expect("the dropped Durable woke the writer")
            .unwrap();
        assert_eq!(log.syncs() - before, 1);
        // A kicked one is synced without being awaited, and the writer goes on taking records.
        until_idle(&log).await;
        let mut third = log.write(&rec(3)).unwrap();
        third.kick().await;
        let r4 = rec(4);
        tokio::time::timeout(std::time::Duration::from_secs(5), log.record(&r4))
            .await
            .expect("the writer still takes records")
            .unwrap();
        third.wait().await.unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_request_syncs_its_record_itself_unless_the_writer_has_work() {
        use std::future::Future;
        let (_dir, path, log) = idle_log().await;
        let before = log.syncs();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // A quick device (the first sync, of a new segment, may not have been: this machine
        // does not decide).
        let last = &log.shared.0.last_sync_us;
        last.store(10, Ordering::Relaxed);
        // The writer idle with nothing to do: durable once the request's yield returns, no
        // wait for the writer.
        let r1 = rec(1);
        let mut alone = Box::pin(log.record(&r1));
        assert!(alone.as_mut().poll(&mut cx).is_pending(), "the yield");
        assert!(
            alone.as_mut().poll(&mut cx).is_ready(),
            "synced by the request"
        );
        assert_eq!(log.syncs() - before, 1);
        assert!(
            log.shared.0.lock().unwrap().idle,
            "the writer was not woken"
        );
        // A record waiting for the writer's sync: the lone request joins it.
        let held = log.write(&rec(2)).unwrap();
        let r3 = rec(3);
        let mut joins = Box::pin(log.record(&r3));
        for _ in 0..2 {
            assert!(
                joins.as_mut().poll(&mut cx).is_pending(),
                "waits for the writer"
            );
        }
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), joins)
            .await
            .expect("synced by the writer")
            .unwrap();
        assert_eq!(log.syncs() - before, 2);
        assert_eq!(read_records(&path).unwrap().len(), 4);
        // A slow device (the last sync took 5 ms), or another request in flight: the
        // request leaves the sync to the writer (woken when its turn ends) rather than
        // stall its thread.
        for (in_flight, last_us) in [(1, 5_000), (2, 10)] {
            until_idle(&log).await;
            last.store(last_us, Ordering::Relaxed);
            log.in_flight().store(in_flight, Ordering::Relaxed);
            let r = rec(5);
            let mut left = Box::pin(log.record(&r));
            assert!(left.as_mut().poll(&mut cx).is_pending(), "the yield");
            assert!(
                left.as_mut().poll(&mut cx).is_pending(),
                "left to the writer ({in_flight} in flight, last sync {last_us} µs)"
            );
            tokio::time::timeout(Duration::from_secs(5), left)
                .await
                .expect("synced by the writer")
                .unwrap();
        }
        // The writer's sync timed itself; once the device is quick again (set here, so that
        // a loaded machine does not decide), the next lone request syncs its own.
        assert_ne!(last.load(Ordering::Relaxed), 5_000);
        last.store(10, Ordering::Relaxed);
        log.in_flight().store(1, Ordering::Relaxed);
        until_idle(&log).await;
        let r7 = rec(7);
        let mut quick = Box::pin(log.record(&r7));
        assert!(quick.as_mut().poll(&mut cx).is_pending(), "the yield");
        assert!(quick.as_mut().poll(&mut cx).is_ready());
        assert_eq!(read_records(&path).unwrap().len(), 7);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_model_calls_record_is_synced_by_the_request_once_its_forward_is_on_its_way() {
        let (_dir, _path, log) = idle_log().await;
        let before = log.syncs();
        log.shared.0.last_sync_us.store(10, Ordering::Relaxed);
        log.in_flight().store(1, Ordering::Relaxed);
        // Written before the forward: not durable, the writer not woken.
        let mut durable = log.write(&rec(1)).unwrap();
        assert_eq!(log.syncs(), before);
        // The kick (joined with the forward): the request syncs it itself, at once.
        durable.kick().await;
        assert_eq!(log.syncs(), before + 1, "synced when the kick returned");
        assert!(
            log.shared.0.lock().unwrap().idle,
            "the writer was not woken"
        );
        tokio::time::timeout(Duration::from_secs(5), durable.wait())
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_written_during_a_requests_own_sync_are_synced_after_it() {
        let (_dir, path, log) = new_log();
        let mut n = 0;
        for round in 0..50 {
            until_idle(&log).await;
            // However slow this machine's last sync, the lone syncs are exercised.
            (log.shared.0.last_sync_us).store(10, std::sync::atomic::Ordering::Relaxed);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..6 {
                let log = log.clone();
                let r = rec(round * 10 + i);
                // Lone syncs racing the writer's: every one ends durable, none stalls.
                set.spawn(async move { log.record(&r).await });
            }
            n += 6;
            let all = async {
                while let Some(r) = set.join_next().await {
                    r.unwrap().unwrap();
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), all)
                .await
                .expect("no record is left waiting");
        }
        assert_eq!(read_records(&path).unwrap().len(), n);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_writer_allocates_ahead_chunk_by_chunk_up_to_the_next_step() {
        let (_dir, path, log) = new_log();
        log.record(&rec(0)).await.unwrap();
        let shared = &log.shared.0;
        let len = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(len(), PREALLOC_STEP);
        // Far enough ahead: nothing to do.
        allocate_ahead(shared);
        assert_eq!(len(), PREALLOC_STEP);
        // Records within half a step of the end (as if 2 MiB had been written): filled to the
        // next boundary, and a request that extended the segment meanwhile is kept.
        {
            let mut q = shared.lock().unwrap();
            let c = q.cursor.as_mut().unwrap();
            c.pos = PREALLOC_STEP - 100;
            let target = q.allocation_target().unwrap();
            assert_eq!(target, 2 * PREALLOC_STEP);
            assert!(q.allocate_chunk(target).unwrap(), "one chunk, more to come");
            assert_eq!(len(), PREALLOC_STEP + ZERO_CHUNK);
            q.file
                .write_all_at(b"kept", PREALLOC_STEP + ZERO_CHUNK - 4)
                .unwrap();
        }
        allocate_ahead(shared);
        assert_eq!(len(), 2 * PREALLOC_STEP);
        let raw = std::fs::read(&path).unwrap();
        let at = (PREALLOC_STEP + ZERO_CHUNK) as usize;
        assert_eq!(&raw[at - 4..at], b"kept");
        assert!(raw[at..].iter().all(|b| *b == 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn after_a_lone_sync_near_the_end_of_the_allocation_the_writer_allocates_ahead() {
        use std::future::Future;
        let (_dir, path, log) = idle_log().await;
        let shared = &log.shared.0;
        shared.last_sync_us.store(10, Ordering::Relaxed);
        log.in_flight().store(1, Ordering::Relaxed);
        let len = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(len(), PREALLOC_STEP);
        // As if 2 MiB had been written: within half a step of the end.
        shared.lock().unwrap().cursor.as_mut().unwrap().pos = PREALLOC_STEP / 2 + 100;
        let before = log.syncs();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let r = rec(1);
        let mut alone = Box::pin(log.record(&r));
        assert!(alone.as_mut().poll(&mut cx).is_pending(), "the yield");
        assert!(
            alone.as_mut().poll(&mut cx).is_ready(),
            "synced by the request"
        );
        assert_eq!(log.syncs(), before + 1);
        // The request did not extend the allocation (its record fit); the writer does.
        for _ in 0..5000 {
            if len() == 2 * PREALLOC_STEP {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(len(), 2 * PREALLOC_STEP, "the writer allocated ahead");
        assert_eq!(log.syncs(), before + 1, "without a sync of its own");
        until_idle(&log).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_sync_fails_what_it_covered_and_the_next_record_overwrites_it() {
        let (_dir, path, log) = new_log();
        log.record(&rec(0)).await.unwrap();
        // Two records written, then their sync fails (as on EIO): rolled back under the
        // lock, before the writer can sync them.
        let waits: Vec<_> = {
            let mut q = log.shared.0.lock().unwrap();
            let waits = [1, 2]
                .map(|i| {
                    q.append(&frame(&serde_json::to_vec(&rec(i)).unwrap()))
                        .unwrap();
                    let (tx, rx) = oneshot::channel();
                    q.waiters.push(tx);
                    Durable {
                        done: rx,
                        kick: None,
                    }
                })
                .into_iter()
                .collect();
            q.roll_back(&AuditError("EIO".into()));
            waits
        };
        for w in waits {
            assert!(w.wait().await.is_err(), "a record the failed sync covered");
        }
        log.record(&rec(3)).await.unwrap();
        let ids = ids(&path);
        assert_eq!(ids, ["r0", "r3"], "the failed records were overwritten");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_is_written_once_and_failures_are_reported() {
        let (_dir, path, log) = new_log();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..300 {
            let log = log.clone();
            set.spawn(async move { log.record(&rec(i)).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        let mut ids = ids(&path);
        let records = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!((ids.len(), records), (300, 300));
        // Preallocated ahead, and still text up to the first NUL.
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw.len() as u64 % PREALLOC_STEP, 0);
        let text = String::from_utf8(raw.split(|b| *b == 0).next().unwrap().to_vec()).unwrap();
        assert_eq!(text.lines().count(), 301);
        // A device that cannot take writes: every record fails, none is acknowledged.
        let full = AuditLog::open(Path::new("/dev/full")).unwrap();
        assert!(full.record(&rec(1)).await.is_err());
        assert!(full.write(&rec(2)).is_err(), "written to a full device");
    }

    /// The scheduling policy of each thread of this process named `name` (field 41 of
    /// `/proc/self/task/<tid>/stat`; 3 is `SCHED_BATCH`).
    fn policies_of(name: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
            let fields: Vec<&str> = after_comm.split_whitespace().collect();
            out.push(fields[41 - 3].parse().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn the_writer_runs_under_sched_batch() {
        let (_dir, _path, log) = new_log();
        // The policy is set as the thread starts: once a record is durable, it has.
        log.record(&rec(0)).await.unwrap();
        let policies = policies_of("sigil-audit");
        assert!(!policies.is_empty(), "no writer thread found");
        assert!(
            policies.iter().all(|p| *p == 3),
            "writer threads' policies: {policies:?} (3 = SCHED_BATCH)"
        );
    }

    #[test]
    fn batch_scheduling_keeps_the_threads_nice_value() {
        std::thread::spawn(|| {
            rustix::process::setpriority_process(None, 7).unwrap();
            super::batch_scheduling();
            assert_eq!(rustix::process::getpriority_process(None).unwrap(), 7);
        })
        .join()
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_written_record_is_in_the_file_before_it_is_durable_and_then_durable() {
        let (_dir, path, log) = new_log();
        for i in 0..20 {
            let durable = log.write(&rec(i)).unwrap();
            // Written: another process (a reader after a crash of this one) sees it now.
            let records = read_records(&path).unwrap();
            assert_eq!(records.len(), i + 1);
            assert_eq!(records[i]["request_id"], format!("r{i}"));
            durable.wait().await.unwrap();
        }
        // Durable writes and written ones share the writer's order and its syncs.
        let (r100, r101) = (rec(100), rec(101));
        let b = log.write(&r101).unwrap();
        let (a, b) = tokio::join!(log.record(&r100), b.wait());
        a.unwrap();
        b.unwrap();
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
        let ids = ids(&path);
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
        let (_dir, path, log) = new_log();
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
            let ids = ids(&path);
            assert_eq!(ids, ["r0", "r1", "r2", "r7"]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_is_replaced_only_when_everything_in_it_is_acknowledged() {
        let (dir, path, log) = new_log();
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
