//! sigil-log: the transparency log core. No I/O.
//!
//! - [`merkle`]: RFC 9162 (RFC 6962) Merkle tree hashing — leaf `SHA-256(0x00 || data)`, node
//!   `SHA-256(0x01 || left || right)` — tree heads, inclusion and consistency proofs, and the
//!   right edge of a growing tree ([`Frontier`]) so appends cost O(log n) with no reads.
//! - [`checkpoint`]: C2SP `tlog-checkpoint` tree heads signed as C2SP `signed-note`s with
//!   Ed25519 (key name + key ID, `vkey` format).
//! - [`tiles`]: C2SP `tlog-tiles` paths, hash tiles and entry bundles, for serving and reading.
//! - [`record`]: the canonical JSON of the leaves sigil's server logs.
//!
//! Hashing, proofs and the checkpoint text come from the `tlog_tiles` crate, notes and keys
//! from `signed_note` (Cloudflare's ports of Go's `sumdb/tlog` and `sumdb/note`). The tile
//! *paths* are written here: `tlog_tiles` 0.2 implements Go's sumdb layout
//! (`tile/<H>/<L>/…`, `tile/<H>/data/…`), not C2SP's (`tile/<L>/…`, `tile/entries/…`).
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod merkle;
pub mod record;
pub mod tiles;

pub use checkpoint::{LogKey, VerifiedCheckpoint, verify_checkpoint};
pub use merkle::{
    EMPTY_HASH, Frontier, HASH_SIZE, Hash, MemoryTree, consistency_proof_from,
    consistency_proof_indexes, leaf_hash, node_hash, stored_hash_index, verify_consistency,
    verify_inclusion,
};
pub use record::{ChangeRecord, LogRecord};
pub use tiles::{TILE_WIDTH, TileId, TilePath};

/// Why a log operation or check failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogError {
    /// A proof does not verify, or its shape is wrong for the sizes given.
    #[error("invalid proof: {0}")]
    InvalidProof(String),
    /// An index or size outside the tree.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Bytes that are not what the format requires.
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    /// A signature that does not verify, or no signature by the expected key.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// A hash needed for the computation is missing.
    #[error("missing hash at stored index {0}")]
    MissingHash(u64),
}

impl LogError {
    pub(crate) fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what,
            detail: detail.to_string(),
        }
    }
}
