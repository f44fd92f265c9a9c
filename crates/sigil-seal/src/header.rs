//! The signed header of a sealed file: what model it is, how it is chunked, which key opens
//! it, and the plaintext's SHA-256; encoded as canonical JSON and signed with Ed25519.
use std::io::Read;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::SealError;

/// The first eight bytes of every sealed file.
pub const MAGIC: &[u8; 8] = b"SIGILSM1";
/// The header's `format` value.
pub const FORMAT: &str = "sigil-sealed-model/1";
/// Longest header JSON accepted.
pub const MAX_HEADER_LEN: usize = 4096;
/// Length of the Ed25519 signature after the header.
pub const SIGNATURE_LEN: usize = 64;
/// Length of the random nonce prefix (StreamBE32: 12 − 4 − 1).
pub const NONCE_PREFIX_LEN: usize = 7;
/// Smallest and largest plaintext chunk.
pub const MIN_CHUNK_SIZE: u32 = 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// What the signature covers: this context string, then the header's binding hash.
const SIGNING_CONTEXT: &[u8] = b"sigil sealed model header v1\0";

/// The header's fields. Declared in sorted order: serde_json writes them so, and the encoded
/// header must be exactly that canonical form (one way to read it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Plaintext bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// Always [`FORMAT`].
    pub format: String,
    /// The data key's id at the trust authority.
    pub key_id: String,
    /// The model's name (`Model::"<name>"` in policy).
    pub name: String,
    /// The 7-byte random nonce prefix, lowercase hex.
    pub nonce_prefix: String,
    /// The plaintext's length in bytes.
    pub plaintext_len: u64,
    /// The plaintext's SHA-256, lowercase hex.
    pub plaintext_sha256: String,
    /// The id of the key that signed the header (lowercase hex SHA-256 of its public key).
    pub signer: String,
    /// The model version (from 1).
    pub version: u64,
}

/// Whether `name` is a model name: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Header {
    /// Checks every field's range; a header failing this is never used.
    pub fn validate(&self) -> Result<(), SealError> {
        let bad = |m: String| Err(SealError::BadHeader(m));
        if self.format != FORMAT {
            return bad(format!("format {:?} is not {FORMAT:?}", self.format));
        }
        if !valid_model_name(&self.name) {
            return bad(format!("bad model name {:?}", self.name));
        }
        if self.version == 0 || self.version > i64::MAX as u64 {
            return bad("version must be at least 1".into());
        }
        if self.key_id.is_empty()
            || self.key_id.len() > 128
            || !self.key_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return bad("bad key_id".into());
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return bad(format!(
                "chunk_size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if !is_lower_hex(&self.nonce_prefix, NONCE_PREFIX_LEN * 2) {
            return bad("nonce_prefix must be 14 lowercase hex digits".into());
        }
        if !is_lower_hex(&self.plaintext_sha256, 64) || !is_lower_hex(&self.signer, 64) {
            return bad("plaintext_sha256 and signer must be 64 lowercase hex digits".into());
        }
        if self.chunk_count() > u64::from(u32::MAX) + 1 {
            return bad("too many chunks for a 32-bit counter".into());
        }
        Ok(())
    }

    /// How many chunks the content has: at least one (an empty plaintext is one empty chunk).
    pub fn chunk_count(&self) -> u64 {
        self.plaintext_len
            .div_ceil(u64::from(self.chunk_size))
            .max(1)
    }

    /// The nonce prefix as bytes.
    pub fn nonce_prefix_bytes(&self) -> Result<[u8; NONCE_PREFIX_LEN], SealError> {
        let v = hex::decode(&self.nonce_prefix)
            .map_err(|_| SealError::BadHeader("bad nonce_prefix".into()))?;
        v.try_into()
            .map_err(|_| SealError::BadHeader("bad nonce_prefix".into()))
    }
}

/// A header with its canonical encoding and signature, as it stands at the start of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeader {
    header: Header,
    json: Vec<u8>,
    signature: [u8; SIGNATURE_LEN],
}

impl SignedHeader {
    /// Encodes `header` and signs it with `sign`, which gets the bytes to sign (see
    /// [`SignedHeader::signing_input_of`]) and returns an Ed25519 signature.
    pub fn sign(header: Header, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Result<Self, SealError> {
        header.validate()?;
        let json = serde_json::to_vec(&header).map_err(|e| SealError::BadHeader(e.to_string()))?;
        if json.len() > MAX_HEADER_LEN {
            return Err(SealError::BadHeader("header too long".into()));
        }
        let input = signing_input(&binding(&json));
        let signature: [u8; SIGNATURE_LEN] = sign(&input)
            .try_into()
            .map_err(|_| SealError::Crypto("the signer did not return a 64-byte signature"))?;
        Ok(Self {
            header,
            json,
            signature,
        })
    }

    /// The bytes an Ed25519 signer signs for `header` (the server's signing endpoint uses it).
    pub fn signing_input_of(header: &Header) -> Result<Vec<u8>, SealError> {
        let json = serde_json::to_vec(header).map_err(|e| SealError::BadHeader(e.to_string()))?;
        Ok(signing_input(&binding(&json)))
    }

    /// Reads and checks (magic, length, canonical JSON, field ranges) the header at the start
    /// of `r`, leaving `r` at the first chunk. The signature is not verified here: see
    /// [`SignedHeader::verify`].
    pub fn read_from(r: &mut impl Read) -> Result<Self, SealError> {
        let mut magic = [0u8; 8];
        read_exact_or(r, &mut magic, SealError::BadMagic)?;
        if &magic != MAGIC {
            return Err(SealError::BadMagic);
        }
        let mut len = [0u8; 4];
        read_exact_or(r, &mut len, SealError::BadHeader("truncated".into()))?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_HEADER_LEN {
            return Err(SealError::BadHeader(format!("header length {len}")));
        }
        let mut json = vec![0u8; len];
        read_exact_or(r, &mut json, SealError::BadHeader("truncated".into()))?;
        let mut signature = [0u8; SIGNATURE_LEN];
        read_exact_or(r, &mut signature, SealError::BadHeader("truncated".into()))?;
        let header: Header =
            serde_json::from_slice(&json).map_err(|e| SealError::BadHeader(e.to_string()))?;
        let canonical =
            serde_json::to_vec(&header).map_err(|e| SealError::BadHeader(e.to_string()))?;
        if canonical != json {
            return Err(SealError::BadHeader(
                "not in canonical form (sorted keys, no whitespace)".into(),
            ));
        }
        header.validate()?;
        Ok(Self {
            header,
            json,
            signature,
        })
    }

    /// Parses a header from its encoded bytes (exactly [`SignedHeader::to_bytes`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let mut r = bytes;
        let h = Self::read_from(&mut r)?;
        if !r.is_empty() {
            return Err(SealError::BadHeader("bytes after the signature".into()));
        }
        Ok(h)
    }

    /// Verifies the signature with an Ed25519 public key (32 bytes), and that the header
    /// names that key as its signer.
    pub fn verify(&self, ed25519_public_key: &[u8]) -> Result<(), SealError> {
        if self.header.signer != signer_id(ed25519_public_key) {
            return Err(SealError::BadSignature);
        }
        UnparsedPublicKey::new(&ED25519, ed25519_public_key)
            .verify(&signing_input(&self.binding()), &self.signature)
            .map_err(|_| SealError::BadSignature)
    }

    /// The header's fields.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The binding hash: SHA-256 of magic ‖ length ‖ header JSON. It is every chunk's
    /// associated data and what a key release is bound to.
    pub fn binding(&self) -> [u8; 32] {
        binding(&self.json)
    }

    /// The encoded header: magic ‖ u32 BE length ‖ JSON ‖ signature.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.json.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.json);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Length of [`SignedHeader::to_bytes`].
    pub fn encoded_len(&self) -> usize {
        MAGIC.len() + 4 + self.json.len() + SIGNATURE_LEN
    }
}

/// The id a header names its signer by: lowercase hex SHA-256 of the Ed25519 public key.
pub fn signer_id(ed25519_public_key: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, ed25519_public_key))
}

fn binding(json: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(MAGIC);
    ctx.update(&(json.len() as u32).to_be_bytes());
    ctx.update(json);
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn signing_input(binding: &[u8; 32]) -> Vec<u8> {
    let mut v = SIGNING_CONTEXT.to_vec();
    v.extend_from_slice(binding);
    v
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], short: SealError) -> Result<(), SealError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(short),
        Err(e) => Err(SealError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};

    pub(crate) fn header(signer: &Ed25519KeyPair) -> Header {
        Header {
            chunk_size: 1024,
            format: FORMAT.into(),
            key_id: "k1".into(),
            name: "defect-detector".into(),
            nonce_prefix: "00112233445566".into(),
            plaintext_len: 3000,
            plaintext_sha256: "ab".repeat(32),
            signer: signer_id(signer.public_key().as_ref()),
            version: 3,
        }
    }

    #[test]
    fn signed_header_round_trips_and_verifies_only_with_its_key() {
        let kp = Ed25519KeyPair::from_seed_unchecked(&[1u8; 32]).unwrap();
        let other = Ed25519KeyPair::from_seed_unchecked(&[2u8; 32]).unwrap();
        let h = SignedHeader::sign(header(&kp), |m| kp.sign(m).as_ref().to_vec()).unwrap();
        let bytes = h.to_bytes();
        let back = SignedHeader::from_bytes(&bytes).unwrap();
        assert_eq!(back, h);
        back.verify(kp.public_key().as_ref()).unwrap();
        assert!(matches!(
            back.verify(other.public_key().as_ref()),
            Err(SealError::BadSignature)
        ));
        // A changed field breaks the signature even if re-encoded canonically.
        let mut h2 = h.header().clone();
        h2.version = 4;
        let forged = SignedHeader::sign(h2, |_| h.signature.to_vec()).unwrap();
        assert!(matches!(
            forged.verify(kp.public_key().as_ref()),
            Err(SealError::BadSignature)
        ));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let kp = Ed25519KeyPair::from_seed_unchecked(&[1u8; 32]).unwrap();
        let h = SignedHeader::sign(header(&kp), |m| kp.sign(m).as_ref().to_vec()).unwrap();
        let bytes = h.to_bytes();
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(matches!(
            SignedHeader::from_bytes(&bad),
            Err(SealError::BadMagic)
        ));
        assert!(SignedHeader::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        // Non-canonical JSON (a space) with a fixed-up length is refused.
        let json = String::from_utf8(h.json.clone())
            .unwrap()
            .replacen(',', ", ", 1);
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&(json.len() as u32).to_be_bytes());
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(&h.signature);
        assert!(matches!(
            SignedHeader::from_bytes(&v),
            Err(SealError::BadHeader(_))
        ));
        // Out-of-range values.
        for f in [
            |h: &mut Header| h.chunk_size = 10,
            |h: &mut Header| h.version = 0,
            |h: &mut Header| h.name = "../x".into(),
            |h: &mut Header| h.nonce_prefix = "00".into(),
            |h: &mut Header| h.format = "other".into(),
        ] {
            let mut hh = header(&kp);
            f(&mut hh);
            assert!(SignedHeader::sign(hh, |m| kp.sign(m).as_ref().to_vec()).is_err());
        }
        // Unknown fields are refused.
        let json = String::from_utf8(h.json.clone())
            .unwrap()
            .replacen('{', "{\"a\":1,", 1);
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&(json.len() as u32).to_be_bytes());
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(&h.signature);
        assert!(SignedHeader::from_bytes(&v).is_err());
    }
}
