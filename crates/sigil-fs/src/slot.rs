//! A crash-safe state file updated with one flush per write: two fixed-capacity slots, each
//! write going into the slot *not* holding the newest valid record (in place, with `pwrite`,
//! then `fdatasync`). The file is created fully written with zeros, so an overwrite changes
//! no metadata (no allocation, no size change, no unwritten extent to convert): on ext4 it
//! costs one data flush and no journal commit, where a temp + rename replace costs two
//! (and two flushes). A write torn by a crash leaves the other slot, the previous
//! acknowledged record, intact; at load the valid slot with the highest sequence wins.
//!
//! Layout (all integers little-endian):
//! - file header, 16 bytes: `b"SGLSLOTF"`, capacity `u32` (payload bytes per slot),
//!   crc32c of the previous 12 bytes `u32`;
//! - two slots of `24 + capacity` bytes: `b"SGLSLOT1"`, sequence `u64`, length `u32`,
//!   crc32c of sequence (8 bytes LE) followed by the payload `u32`, the payload, zeros to
//!   the end of the slot. A slot of all zeros is empty (never written).
//!
//! The file is 0600 and always created (or grown, when a payload exceeds the capacity) as a
//! whole: temp file, fsync, rename, fsync of the directory, so a half-created file is never
//! seen.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a slot file could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotError {
    /// The file system refused (or a payload does not fit): the message says which.
    Io(String),
    /// The file is not a slot file, or neither slot holds a valid record.
    Corrupt(String),
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotError::Io(m) => f.write_str(m),
            SlotError::Corrupt(m) => write!(f, "corrupt: {m}"),
        }
    }
}

impl std::error::Error for SlotError {}

const FILE_MAGIC: &[u8; 8] = b"SGLSLOTF";
const SLOT_MAGIC: &[u8; 8] = b"SGLSLOT1";
const FILE_HEADER: usize = 16;
const SLOT_HEADER: usize = 24;
/// The smallest slot capacity.
pub const MIN_CAPACITY: usize = 16 * 1024;
/// The largest slot capacity (the length field is a `u32`; far above any cache record).
const MAX_CAPACITY: usize = 1 << 30;

/// An open slot file and its newest valid payload (`None`: never written).
pub type Opened = (SlotFile, Option<Vec<u8>>);

/// An open two-slot file.
#[derive(Debug)]
pub struct SlotFile {
    path: PathBuf,
    file: File,
    capacity: usize,
    /// The slot holding the newest valid record and its sequence.
    newest: Option<(usize, u64)>,
    /// Per slot, how many bytes from its start may be non-zero (what a shorter write must
    /// zero to keep the padding zero).
    extent: [usize; 2],
}

enum Slot {
    Empty,
    Valid { sequence: u64, payload: Vec<u8> },
    Invalid(&'static str),
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(s))
}

fn record_crc(sequence: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&sequence.to_le_bytes()), payload)
}

fn file_header(capacity: usize) -> Result<[u8; FILE_HEADER], SlotError> {
    let cap = u32::try_from(capacity)
        .map_err(|_| SlotError::Io(format!("slot capacity {capacity} too large")))?;
    let mut h = [0u8; FILE_HEADER];
    let (head, crc) = h.split_at_mut(12);
    let (magic, cap_bytes) = head.split_at_mut(8);
    magic.copy_from_slice(FILE_MAGIC);
    cap_bytes.copy_from_slice(&cap.to_le_bytes());
    crc.copy_from_slice(&crc32c::crc32c(head).to_le_bytes());
    Ok(h)
}

/// The bytes of a slot record (header and payload, no padding).
fn slot_record(sequence: u64, payload: &[u8]) -> Result<Vec<u8>, SlotError> {
    let len = u32::try_from(payload.len())
        .map_err(|_| SlotError::Io(format!("payload of {} bytes too large", payload.len())))?;
    let mut r = Vec::with_capacity(SLOT_HEADER + payload.len());
    r.extend_from_slice(SLOT_MAGIC);
    r.extend_from_slice(&sequence.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(&record_crc(sequence, payload).to_le_bytes());
    r.extend_from_slice(payload);
    Ok(r)
}

fn parse_slot(b: &[u8], capacity: usize) -> Slot {
    let Some(header) = b.get(..SLOT_HEADER) else {
        return Slot::Invalid("short slot");
    };
    if header.iter().all(|&x| x == 0) {
        return if b.iter().all(|&x| x == 0) {
            Slot::Empty
        } else {
            Slot::Invalid("zero header over data")
        };
    }
    if header.get(..8) != Some(SLOT_MAGIC.as_slice()) {
        return Slot::Invalid("bad magic");
    }
    let (Some(sequence), Some(len), Some(crc)) = (le_u64(b, 8), le_u32(b, 16), le_u32(b, 20))
    else {
        return Slot::Invalid("short header");
    };
    let len = len as usize;
    if len > capacity {
        return Slot::Invalid("length above capacity");
    }
    let Some(payload) = b.get(SLOT_HEADER..SLOT_HEADER + len) else {
        return Slot::Invalid("short payload");
    };
    if record_crc(sequence, payload) != crc {
        return Slot::Invalid("checksum mismatch");
    }
    Slot::Valid {
        sequence,
        payload: payload.to_vec(),
    }
}

/// The smallest power of two at least `n` and [`MIN_CAPACITY`] (at most `MAX_CAPACITY`).
fn pow2_at_least(n: usize) -> usize {
    n.max(MIN_CAPACITY)
        .checked_next_power_of_two()
        .unwrap_or(MAX_CAPACITY)
        .min(MAX_CAPACITY)
}

/// The capacity a file is grown to for a payload of `len` bytes.
fn capacity_for(len: usize) -> usize {
    pow2_at_least(len.saturating_mul(2))
}

/// Bytes from the start of `b` up to its last non-zero byte.
fn used(b: &[u8]) -> usize {
    b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1)
}

impl SlotFile {
    /// Writes `payload` into the file held in `held`, first opening `path` (or creating it,
    /// slots sized for twice the payload) if none is held: the lazily opened file of a writer.
    pub fn write_into(
        held: &mut Option<SlotFile>,
        path: &Path,
        payload: &[u8],
    ) -> Result<(), SlotError> {
        let f = match held {
            Some(f) => f,
            None => {
                let (f, _) = Self::open_or_create(path, payload.len() * 2)?;
                held.insert(f)
            }
        };
        f.write(payload)
    }

    /// Opens `path`, or creates it (empty, slots of at least `min_capacity` bytes) if it does
    /// not exist; returns the newest valid payload. Both slots invalid (or a bad file
    /// header) is [`SlotError::Corrupt`]: the caller moves the file aside.
    pub fn open_or_create(path: &Path, min_capacity: usize) -> Result<Opened, SlotError> {
        match Self::open(path)? {
            Some(opened) => Ok(opened),
            None => Ok((Self::create(path, pow2_at_least(min_capacity), None)?, None)),
        }
    }

    /// Opens `path` if it exists (`None` if not), with the newest valid payload.
    pub fn open(path: &Path) -> Result<Option<Opened>, SlotError> {
        let io = |e: std::io::Error| SlotError::Io(format!("reading {}: {e}", path.display()));
        let corrupt = |why: &str| SlotError::Corrupt(format!("{}: {why}", path.display()));
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        let header = bytes
            .get(..FILE_HEADER)
            .ok_or_else(|| corrupt("shorter than its header"))?;
        if header.get(..8) != Some(FILE_MAGIC.as_slice()) {
            return Err(corrupt("not a slot file"));
        }
        let (Some(cap), Some(crc)) = (le_u32(header, 8), le_u32(header, 12)) else {
            return Err(corrupt("short header"));
        };
        if header.get(..12).map(crc32c::crc32c) != Some(crc) {
            return Err(corrupt("header checksum mismatch"));
        }
        let capacity = cap as usize;
        let slot_size = SLOT_HEADER + capacity;
        if capacity > MAX_CAPACITY || bytes.len() != FILE_HEADER + 2 * slot_size {
            return Err(corrupt("size does not match its capacity"));
        }
        let mut newest: Option<(usize, u64, Vec<u8>)> = None;
        let mut extent = [0; 2];
        let mut invalid = Vec::new();
        let mut empty = 0;
        for (i, ext) in extent.iter_mut().enumerate() {
            let at = FILE_HEADER + i * slot_size;
            let slot = bytes.get(at..at + slot_size).unwrap_or_default();
            *ext = used(slot);
            match parse_slot(slot, capacity) {
                Slot::Empty => empty += 1,
                Slot::Valid { sequence, payload } => {
                    if newest.as_ref().is_none_or(|(_, s, _)| sequence > *s) {
                        newest = Some((i, sequence, payload));
                    }
                }
                Slot::Invalid(why) => invalid.push(format!("slot {i}: {why}")),
            }
        }
        if newest.is_none() && empty < 2 {
            return Err(corrupt(&format!(
                "no valid record ({})",
                invalid.join(", ")
            )));
        }
        if !invalid.is_empty() {
            tracing::warn!(file = %path.display(), problems = %invalid.join(", "), "slot file: ignoring an invalid slot (a torn write?); using the other");
        }
        let (newest, payload) = match newest {
            Some((i, s, p)) => (Some((i, s)), Some(p)),
            None => (None, None),
        };
        Ok(Some((
            Self {
                path: path.to_owned(),
                file,
                capacity,
                newest,
                extent,
            },
            payload,
        )))
    }

    /// Builds the file as a whole ([`crate::create_private`]), `first` in slot 0.
    fn create(
        path: &Path,
        capacity: usize,
        first: Option<(u64, &[u8])>,
    ) -> Result<Self, SlotError> {
        let slot_size = SLOT_HEADER + capacity;
        let mut image = vec![0u8; FILE_HEADER + 2 * slot_size];
        let header = file_header(capacity)?;
        let mut extent = [0, 0];
        if let Some(h) = image.get_mut(..FILE_HEADER) {
            h.copy_from_slice(&header);
        }
        if let Some((sequence, payload)) = first {
            let rec = slot_record(sequence, payload)?;
            let dst = image
                .get_mut(FILE_HEADER..FILE_HEADER + rec.len())
                .ok_or_else(|| SlotError::Io("payload above the slot capacity".into()))?;
            dst.copy_from_slice(&rec);
            extent[0] = rec.len();
        }
        // Written, not `set_len`/`fallocate`: unwritten extents would make the first overwrite
        // of each block a metadata change.
        let f = crate::create_private(path, &image)
            .map_err(|e| SlotError::Io(format!("creating {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_owned(),
            file: f,
            capacity,
            newest: first.map(|(s, _)| (0, s)),
            extent,
        })
    }

    /// Payload bytes per slot.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Durably stores `payload` as the newest record: into the other slot than the newest
    /// valid one, one `pwrite` and one `fdatasync`, before returning. A payload above the
    /// capacity rebuilds the file (twice the payload, as a power of two) with it in slot 0.
    pub fn write(&mut self, payload: &[u8]) -> Result<(), SlotError> {
        let sequence = self.newest.map_or(1, |(_, s)| s.saturating_add(1));
        if payload.len() > self.capacity {
            let capacity = capacity_for(payload.len());
            if payload.len() > capacity {
                return Err(SlotError::Io(format!(
                    "{}: payload of {} bytes too large",
                    self.path.display(),
                    payload.len()
                )));
            }
            *self = Self::create(&self.path, capacity, Some((sequence, payload)))?;
            return Ok(());
        }
        let io = |e: std::io::Error| SlotError::Io(format!("writing {}: {e}", self.path.display()));
        let target = match self.newest {
            Some((0, _)) => 1,
            _ => 0,
        };
        let mut rec = slot_record(sequence, payload)?;
        let old = self.extent.get(target).copied().unwrap_or(0);
        if rec.len() < old {
            // Keep the padding zero: clear what a longer earlier record left.
            rec.resize(old, 0);
        }
        let at = (FILE_HEADER + target * (SLOT_HEADER + self.capacity)) as u64;
        self.file.write_all_at(&rec, at).map_err(io)?;
        // Whatever happens next, the slot may now hold anything up to here.
        if let Some(e) = self.extent.get_mut(target) {
            *e = (*e).max(rec.len());
        }
        self.file.sync_data().map_err(io)?;
        if let Some(e) = self.extent.get_mut(target) {
            *e = SLOT_HEADER + payload.len();
        }
        self.newest = Some((target, sequence));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn slot_offset(capacity: usize, slot: usize) -> usize {
        FILE_HEADER + slot * (SLOT_HEADER + capacity)
    }

    fn reopen(path: &Path) -> Option<Vec<u8>> {
        SlotFile::open(path).unwrap().unwrap().1
    }

    #[test]
    fn round_trip_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.slots");
        assert!(SlotFile::open(&p).unwrap().is_none());
        let (mut f, got) = SlotFile::open_or_create(&p, 100).unwrap();
        assert!(got.is_none());
        assert_eq!(f.capacity(), MIN_CAPACITY);
        assert_eq!(reopen(&p), None);
        f.write(b"hello").unwrap();
        assert_eq!(reopen(&p).as_deref(), Some(b"hello".as_slice()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len() as usize,
            FILE_HEADER + 2 * (SLOT_HEADER + MIN_CAPACITY)
        );
        assert!(!crate::temp_path(&p).exists());
    }

    #[test]
    fn writes_alternate_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.slots");
        let (mut f, _) = SlotFile::open_or_create(&p, 0).unwrap();
        for i in 0..9u32 {
            // Varying lengths: a shorter record after a longer one leaves zero padding.
            let payload = format!("record {i} {}", "x".repeat(((i * 7) % 5) as usize * 100));
            f.write(payload.as_bytes()).unwrap();
            assert_eq!(f.newest, Some(((i % 2) as usize, u64::from(i) + 1)));
            let (g, got) = SlotFile::open(&p).unwrap().unwrap();
            assert_eq!(got.unwrap(), payload.as_bytes());
            assert_eq!(g.newest, f.newest);
        }
        // The padding of both slots is zero.
        let bytes = std::fs::read(&p).unwrap();
        for slot in 0..2 {
            let at = slot_offset(f.capacity, slot);
            let len = le_u32(&bytes, at + 16).unwrap() as usize;
            let tail = &bytes[at + SLOT_HEADER + len..at + SLOT_HEADER + f.capacity];
            assert!(tail.iter().all(|&b| b == 0), "slot {slot}");
        }
        // Reopened, writing continues from the newest sequence, into the other slot.
        let (mut g, _) = SlotFile::open(&p).unwrap().unwrap();
        g.write(b"after reopen").unwrap();
        assert_eq!(g.newest, Some((1, 10)));
        assert_eq!(reopen(&p).unwrap(), b"after reopen");
    }

    #[test]
    fn a_torn_write_falls_back_to_the_previous_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.slots");
        let (mut f, _) = SlotFile::open_or_create(&p, 0).unwrap();
        f.write(b"first").unwrap();
        f.write(b"second, acknowledged").unwrap();
        f.write(b"third, torn").unwrap();
        let cap = f.capacity;
        drop(f);
        let clean = std::fs::read(&p).unwrap();
        // The third record went to slot 0. Tear it in each way a crash can: payload half
        // written, header of the new record over the old payload, a garbled byte.
        let at = slot_offset(cap, 0);
        type Tear<'a> = &'a dyn Fn(&mut Vec<u8>);
        let tears: [Tear; 4] = [
            &|b| b[at + SLOT_HEADER + 3] ^= 0x40,
            &|b| b[at + SLOT_HEADER..at + SLOT_HEADER + 11].copy_from_slice(b"first\0\0\0\0\0\0"),
            &|b| b[at + 9] ^= 1, // sequence
            &|b| b[at + 17] = 9, // length
        ];
        for tear in tears {
            let mut b = clean.clone();
            tear(&mut b);
            std::fs::write(&p, &b).unwrap();
            let (mut g, got) = SlotFile::open(&p).unwrap().unwrap();
            assert_eq!(got.unwrap(), b"second, acknowledged");
            // The next write replaces the torn slot, not the good one.
            g.write(b"fourth").unwrap();
            assert_eq!(g.newest, Some((0, 3)));
            assert_eq!(reopen(&p).unwrap(), b"fourth");
            let mut b = std::fs::read(&p).unwrap();
            b[at + SLOT_HEADER] ^= 1;
            std::fs::write(&p, &b).unwrap();
            assert_eq!(reopen(&p).unwrap(), b"second, acknowledged");
        }
        // A torn first write (the other slot never written): no record, reported.
        let q = dir.path().join("q.slots");
        let (mut f, _) = SlotFile::open_or_create(&q, 0).unwrap();
        f.write(b"only").unwrap();
        let mut b = std::fs::read(&q).unwrap();
        b[FILE_HEADER + SLOT_HEADER] ^= 1;
        std::fs::write(&q, &b).unwrap();
        assert!(matches!(SlotFile::open(&q), Err(SlotError::Corrupt(_))));
    }

    #[test]
    fn both_slots_corrupt_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.slots");
        let (mut f, _) = SlotFile::open_or_create(&p, 0).unwrap();
        f.write(b"a").unwrap();
        f.write(b"b").unwrap();
        let cap = f.capacity;
        drop(f);
        let mut b = std::fs::read(&p).unwrap();
        b[slot_offset(cap, 0) + SLOT_HEADER] ^= 1;
        b[slot_offset(cap, 1) + 2] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(SlotFile::open(&p), Err(SlotError::Corrupt(_))));
        assert!(matches!(
            SlotFile::open_or_create(&p, 0),
            Err(SlotError::Corrupt(_))
        ));
        // Truncated, garbage, empty: errors, not panics.
        for bytes in [&b[..b.len() - 1], b"garbage".as_slice(), b"".as_slice()] {
            std::fs::write(&p, bytes).unwrap();
            assert!(matches!(SlotFile::open(&p), Err(SlotError::Corrupt(_))));
        }
    }

    #[test]
    fn a_large_payload_grows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.slots");
        let (mut f, _) = SlotFile::open_or_create(&p, 0).unwrap();
        f.write(b"small").unwrap();
        let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        f.write(&big).unwrap();
        assert_eq!(f.capacity(), 128 * 1024);
        let (mut g, got) = SlotFile::open(&p).unwrap().unwrap();
        assert_eq!(got.unwrap(), big);
        assert_eq!(g.capacity(), 128 * 1024);
        // The sequence carried over; the next write goes to slot 1.
        g.write(b"small again").unwrap();
        assert_eq!(g.newest, Some((1, 3)));
        assert_eq!(reopen(&p).unwrap(), b"small again");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A minimum capacity at creation.
        let (f, _) = SlotFile::open_or_create(&dir.path().join("t.slots"), 100_000).unwrap();
        assert_eq!(f.capacity(), 128 * 1024);
    }
}
