//! The content: STREAM over AES-256-GCM, chunk by chunk, with bounded memory (one chunk).
//!
//! Chunk `i` of `n` is sealed with nonce = prefix(7) ‖ BE32(i) ‖ flag, flag = 1 for the last
//! chunk and 0 otherwise (RustCrypto `aead::stream::StreamBE32`), and associated data = the
//! header's binding hash. Its ciphertext is followed by its 16-byte tag.
use std::io::{Read, Write};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::digest;

use crate::SealError;
use crate::header::SignedHeader;

/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// The AES-GCM tag after each chunk.
pub const TAG_LEN: usize = 16;

/// A model version's 256-bit data key. Its bytes are overwritten when it is dropped.
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut k);
        Self(k)
    }

    /// A key from its bytes (exactly 32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let k: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SealError::Key("a data key is 32 bytes".into()))?;
        Ok(Self(k))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn aead(&self) -> Result<LessSafeKey, SealError> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| SealError::Crypto("AES-256-GCM key setup"))
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        for b in &mut self.0 {
            // Best effort without unsafe code: black_box keeps the stores from being
            // optimised away as dead.
            *std::hint::black_box(b) = 0;
        }
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A plaintext's length and SHA-256 (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub sha256: String,
}

/// Reads `r` to the end and returns its length and SHA-256 (the first pass of sealing).
pub fn digest_reader(r: &mut impl Read) -> Result<Digest, SealError> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(buf.get(..n).unwrap_or_default());
        len += n as u64;
    }
    Ok(Digest {
        len,
        sha256: hex::encode(ctx.finish().as_ref()),
    })
}

/// The sealed file's length for `header`.
pub fn sealed_len(header: &SignedHeader) -> u64 {
    header.encoded_len() as u64
        + header.header().plaintext_len
        + header.header().chunk_count() * TAG_LEN as u64
}

fn nonce(prefix: &[u8; 7], index: u64, last: bool) -> Result<Nonce, SealError> {
    let counter = u32::try_from(index).map_err(|_| SealError::Crypto("chunk counter overflow"))?;
    let mut n = [0u8; 12];
    let (p, rest) = n.split_at_mut(7);
    p.copy_from_slice(prefix);
    let (c, flag) = rest.split_at_mut(4);
    c.copy_from_slice(&counter.to_be_bytes());
    if let Some(f) = flag.first_mut() {
        *f = u8::from(last);
    }
    Ok(Nonce::assume_unique_for_key(n))
}

/// The plaintext length of chunk `index`.
fn chunk_len(plaintext_len: u64, chunk_size: u32, index: u64) -> usize {
    let start = index * u64::from(chunk_size);
    // INVARIANT: at most chunk_size (≤ 16 MiB), so it fits a usize.
    plaintext_len
        .saturating_sub(start)
        .min(u64::from(chunk_size)) as usize
}

/// Writes the sealed file: `header` (already signed), then `plaintext` chunk by chunk under
/// `key`. `plaintext` must have exactly the header's length and SHA-256 (checked as it is
/// read: a file that changed since it was hashed is refused, and what was written must be
/// discarded).
pub fn seal(
    plaintext: &mut impl Read,
    out: &mut impl Write,
    header: &SignedHeader,
    key: &DataKey,
) -> Result<(), SealError> {
    let h = header.header();
    let aead = key.aead()?;
    let prefix = h.nonce_prefix_bytes()?;
    let aad = header.binding();
    let count = h.chunk_count();
    out.write_all(&header.to_bytes())?;
    let mut buf = vec![0u8; h.chunk_size as usize];
    let mut hash = digest::Context::new(&digest::SHA256);
    for index in 0..count {
        let len = chunk_len(h.plaintext_len, h.chunk_size, index);
        let chunk = buf
            .get_mut(..len)
            .ok_or(SealError::Crypto("chunk buffer"))?;
        plaintext.read_exact(chunk).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                SealError::Digest { what: "length" }
            } else {
                SealError::Io(e)
            }
        })?;
        hash.update(chunk);
        let tag = aead
            .seal_in_place_separate_tag(
                nonce(&prefix, index, index + 1 == count)?,
                Aad::from(&aad),
                chunk,
            )
            .map_err(|_| SealError::Crypto("AES-256-GCM seal"))?;
        out.write_all(chunk)?;
        out.write_all(tag.as_ref())?;
    }
    let mut extra = [0u8; 1];
    if plaintext.read(&mut extra)? != 0 {
        return Err(SealError::Digest { what: "length" });
    }
    if hex::encode(hash.finish().as_ref()) != h.plaintext_sha256 {
        return Err(SealError::Digest { what: "SHA-256" });
    }
    out.flush()?;
    Ok(())
}

/// What [`open`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub plaintext_len: u64,
    pub plaintext_sha256: String,
    pub chunks: u64,
}

/// Decrypts the chunks that follow `header` in `sealed` (positioned after the header, as
/// [`SignedHeader::read_from`] leaves it) into `out`, one chunk at a time. Every chunk is
/// authenticated before its plaintext is written; the first one that fails stops it with an
/// error naming the chunk. Then the plaintext's length and SHA-256 are checked against the
/// header, and the file must end after the last chunk. On any error, what was written to
/// `out` must be discarded.
pub fn open(
    sealed: &mut impl Read,
    out: &mut impl Write,
    header: &SignedHeader,
    key: &DataKey,
) -> Result<Opened, SealError> {
    let h = header.header();
    let aead = key.aead()?;
    let prefix = h.nonce_prefix_bytes()?;
    let aad = header.binding();
    let count = h.chunk_count();
    let mut buf = vec![0u8; h.chunk_size as usize + TAG_LEN];
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut written = 0u64;
    let mut offset = 0u64;
    for index in 0..count {
        let len = chunk_len(h.plaintext_len, h.chunk_size, index);
        let sealed_chunk = buf
            .get_mut(..len + TAG_LEN)
            .ok_or(SealError::Crypto("chunk buffer"))?;
        sealed.read_exact(sealed_chunk).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                SealError::Truncated { index, count }
            } else {
                SealError::Io(e)
            }
        })?;
        let end = offset + (len + TAG_LEN) as u64;
        let ct = aead
            .open_in_place(
                nonce(&prefix, index, index + 1 == count)?,
                Aad::from(&aad),
                sealed_chunk,
            )
            .map_err(|_| SealError::Chunk {
                index,
                count,
                start: offset,
                end,
            })?;
        hash.update(ct);
        out.write_all(ct)?;
        written += len as u64;
        offset = end;
    }
    let mut extra = [0u8; 1];
    if sealed.read(&mut extra)? != 0 {
        return Err(SealError::TrailingData);
    }
    let sha = hex::encode(hash.finish().as_ref());
    if written != h.plaintext_len {
        return Err(SealError::Digest { what: "length" });
    }
    if sha != h.plaintext_sha256 {
        return Err(SealError::Digest { what: "SHA-256" });
    }
    out.flush()?;
    Ok(Opened {
        plaintext_len: written,
        plaintext_sha256: sha,
        chunks: count,
    })
}
