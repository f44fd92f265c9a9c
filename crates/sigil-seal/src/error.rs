//! What can go wrong reading, opening or releasing a sealed model.

/// Why a sealed file, a wrapped key or a release does not open. Every variant is a refusal:
/// nothing of the plaintext is to be used after one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The file does not start with the sealed-model magic.
    #[error("not a sealed model file (bad magic)")]
    BadMagic,
    /// The header is malformed, not canonical, or has a value out of range.
    #[error("bad header: {0}")]
    BadHeader(String),
    /// The header's signature does not verify with the given key.
    #[error("the header's signature does not verify (not signed by this trust authority)")]
    BadSignature,
    /// Chunk `index` (from 0) of `count` failed authentication: changed, moved, or from
    /// another file.
    #[error(
        "chunk {index} of {count} (sealed bytes {start}..{end} after the header) failed authentication: the file was modified, its chunks reordered, or it belongs to another header"
    )]
    Chunk {
        index: u64,
        count: u64,
        start: u64,
        end: u64,
    },
    /// The file ends inside chunk `index` (or before it).
    #[error("the sealed file is truncated: it ends in chunk {index} of {count}")]
    Truncated { index: u64, count: u64 },
    /// Bytes follow the last chunk.
    #[error("bytes follow the last chunk: the file was appended to")]
    TrailingData,
    /// The decrypted content's length or SHA-256 differs from the header's.
    #[error("the plaintext's {what} does not match the header")]
    Digest { what: &'static str },
    /// A wrapped key (KEK or HPKE) does not open: wrong key, wrong binding, or modified.
    #[error("the wrapped data key does not open: {0}")]
    Unwrap(&'static str),
    /// A key is not usable (wrong length or type).
    #[error("bad key: {0}")]
    Key(String),
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The crypto library failed (not the input's fault).
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}
