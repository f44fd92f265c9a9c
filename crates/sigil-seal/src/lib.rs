//! Sealed model files: encrypted at rest, opened in memory by the workload entitled to.
//!
//! A sealed file is a signed header followed by the content in independently authenticated
//! chunks: AES-256-GCM in the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár,
//! "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015)
//! with the nonce layout of RustCrypto's `aead::stream::StreamBE32` (7-byte random prefix ‖
//! 32-bit big-endian chunk counter ‖ last-chunk flag byte), over aws-lc-rs's AES-256-GCM
//! (≈3.7 GB/s on one core here). Every chunk's associated data is the SHA-256 of the header,
//! so a header cannot be swapped, and the counter and last-chunk flag stop reordering and
//! truncation. The format is specified in `docs/sealed-models.md`.
//!
//! The data key of a model version is wrapped at rest by the server's key-encryption key
//! ([`KeyEncryptionKey`]) and released to a workload wrapped again with HPKE (RFC 9180,
//! DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) to the public key of the X.509-SVID
//! it presented ([`wrap_to_svid_key`], [`unwrap_with_svid_key`]).
//!
//! This crate does no I/O of its own: it reads and writes through `std::io::Read`/`Write`.
#![forbid(unsafe_code)]

mod error;
mod header;
mod kek;
mod release;
mod secret;
mod stream;

pub use error::SealError;
pub use header::{
    FORMAT, Header, MAGIC, MAX_CHUNK_SIZE, MAX_HEADER_LEN, MIN_CHUNK_SIZE, NONCE_PREFIX_LEN,
    SIGNATURE_LEN, SignedHeader, valid_model_name,
};
pub use kek::{KeyEncryptionKey, WrappedDataKey};
pub use release::{HPKE_SUITE, SvidKeyWrap, release_info, unwrap_with_svid_key, wrap_to_svid_key};
pub use secret::{SecretEnvelope, open_secret, seal_secret};
pub use stream::{
    DEFAULT_CHUNK_SIZE, DataKey, Digest, Opened, TAG_LEN, digest_reader, open, seal, sealed_len,
};
