//! The sealed format end to end in memory: round trip, the committed test vector, and every
//! tampering the format must refuse (flipped bit, truncation, swapped chunks, a header from
//! another model, appended bytes).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use sigil_seal::{
    DataKey, FORMAT, Header, SealError, SignedHeader, TAG_LEN, digest_reader, open, seal,
    sealed_len,
};

const VECTOR_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");

fn signer() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[0x11; 32]).unwrap()
}

fn vector_plaintext() -> Vec<u8> {
    (0..2600u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn sealed(plain: &[u8], name: &str, prefix: &str, key: &DataKey, chunk: u32) -> Vec<u8> {
    let kp = signer();
    let d = digest_reader(&mut &plain[..]).unwrap();
    let header = Header {
        chunk_size: chunk,
        format: FORMAT.into(),
        key_id: "vector-key".into(),
        name: name.into(),
        nonce_prefix: prefix.into(),
        plaintext_len: d.len,
        plaintext_sha256: d.sha256,
        signer: sigil_seal_signer_id(&kp),
        version: 3,
    };
    let h = SignedHeader::sign(header, |m| kp.sign(m).as_ref().to_vec()).unwrap();
    let mut out = Vec::new();
    seal(&mut &plain[..], &mut out, &h, key).unwrap();
    assert_eq!(out.len() as u64, sealed_len(&h));
    out
}

fn sigil_seal_signer_id(kp: &Ed25519KeyPair) -> String {
    use aws_lc_rs::digest;
    hex::encode(digest::digest(&digest::SHA256, kp.public_key().as_ref()))
}

fn open_all(file: &[u8], key: &DataKey) -> Result<Vec<u8>, SealError> {
    let mut r = file;
    let h = SignedHeader::read_from(&mut r)?;
    h.verify(signer().public_key().as_ref())?;
    let mut out = Vec::new();
    open(&mut r, &mut out, &h, key)?;
    Ok(out)
}

fn key() -> DataKey {
    DataKey::from_bytes(&[0x42; 32]).unwrap()
}

#[test]
fn committed_vector_seals_and_opens_exactly() {
    let plain = vector_plaintext();
    let file = sealed(&plain, "defect-detector", "a0a1a2a3a4a5a6", &key(), 1024);
    if std::env::var_os("SIGIL_WRITE_SEAL_VECTORS").is_some() {
        std::fs::write(format!("{VECTOR_DIR}/model.plain"), &plain).unwrap();
        std::fs::write(format!("{VECTOR_DIR}/model.sealed"), &file).unwrap();
    }
    let committed_plain = std::fs::read(format!("{VECTOR_DIR}/model.plain")).unwrap();
    let committed = std::fs::read(format!("{VECTOR_DIR}/model.sealed")).unwrap();
    assert_eq!(committed_plain, plain);
    assert_eq!(
        committed, file,
        "sealing is deterministic given key, prefix and signer"
    );
    assert_eq!(open_all(&committed, &key()).unwrap(), plain);
}

#[test]
fn round_trips_at_every_size_edge() {
    for len in [0usize, 1, 1023, 1024, 1025, 4096, 5000] {
        let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let file = sealed(&plain, "m", "00000000000001", &key(), 1024);
        assert_eq!(open_all(&file, &key()).unwrap(), plain, "len {len}");
    }
}

fn header_len(file: &[u8]) -> usize {
    let mut r = file;
    SignedHeader::read_from(&mut r).unwrap().encoded_len()
}

#[test]
fn a_flipped_bit_in_any_chunk_is_refused_naming_the_chunk() {
    let plain = vector_plaintext();
    let file = sealed(&plain, "m", "00000000000001", &key(), 1024);
    let hl = header_len(&file);
    for (chunk, at) in [
        (0u64, 5usize),
        (1, 1024 + TAG_LEN + 3),
        (2, 2 * (1024 + TAG_LEN) + 500),
    ] {
        let mut bad = file.clone();
        bad[hl + at] ^= 0x01;
        match open_all(&bad, &key()) {
            Err(SealError::Chunk {
                index, count: 3, ..
            }) => assert_eq!(index, chunk),
            other => panic!("flipped bit in chunk {chunk}: {other:?}"),
        }
        let msg = open_all(&bad, &key()).unwrap_err().to_string();
        assert!(msg.contains(&format!("chunk {chunk} of 3")), "{msg}");
    }
    // A flipped bit in a tag, too.
    let mut bad = file.clone();
    bad[hl + 1024 + 2] ^= 0x80;
    assert!(matches!(
        open_all(&bad, &key()),
        Err(SealError::Chunk { index: 0, .. })
    ));
}

#[test]
fn truncation_is_refused_even_at_a_chunk_boundary() {
    let plain = vector_plaintext();
    let file = sealed(&plain, "m", "00000000000001", &key(), 1024);
    let hl = header_len(&file);
    for cut in [
        hl + 2 * (1024 + TAG_LEN),
        hl + 1024 + TAG_LEN,
        file.len() - 1,
        hl,
    ] {
        assert!(
            matches!(
                open_all(&file[..cut], &key()),
                Err(SealError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
}

#[test]
fn swapped_chunks_are_refused() {
    let plain: Vec<u8> = (0..4096u32).map(|i| (i / 1024) as u8).collect();
    let file = sealed(&plain, "m", "00000000000001", &key(), 1024);
    let hl = header_len(&file);
    let c = 1024 + TAG_LEN;
    let mut swapped = file.clone();
    let (a, b) = (hl + c, hl + 2 * c);
    let first = file[a..a + c].to_vec();
    swapped[a..a + c].copy_from_slice(&file[b..b + c]);
    swapped[b..b + c].copy_from_slice(&first);
    assert!(matches!(
        open_all(&swapped, &key()),
        Err(SealError::Chunk { index: 1, .. })
    ));
    // The last chunk moved before its place, or a middle one made last, fails too.
    let mut dropped = file[..hl + c].to_vec();
    dropped.extend_from_slice(&file[hl + 3 * c..]);
    assert!(open_all(&dropped, &key()).is_err());
}

#[test]
fn a_header_from_another_model_is_refused() {
    let plain = vector_plaintext();
    let a = sealed(&plain, "model-a", "00000000000001", &key(), 1024);
    // Same key and even the same nonce prefix: only the header differs.
    let b = sealed(&plain, "model-b", "00000000000001", &key(), 1024);
    let (ha, hb) = (header_len(&a), header_len(&b));
    let mut mixed = b[..hb].to_vec();
    mixed.extend_from_slice(&a[ha..]);
    assert!(matches!(
        open_all(&mixed, &key()),
        Err(SealError::Chunk { index: 0, .. })
    ));
    // And chunks moved between two files of the same header content but another prefix.
    let c = sealed(&plain, "model-a", "00000000000002", &key(), 1024);
    let mut mixed = a[..ha].to_vec();
    mixed.extend_from_slice(&c[header_len(&c)..]);
    assert!(open_all(&mixed, &key()).is_err());
}

#[test]
fn appended_bytes_and_wrong_keys_are_refused() {
    let plain = vector_plaintext();
    let file = sealed(&plain, "m", "00000000000001", &key(), 1024);
    let mut longer = file.clone();
    longer.push(0);
    assert!(matches!(
        open_all(&longer, &key()),
        Err(SealError::TrailingData)
    ));
    let other = DataKey::from_bytes(&[0x43; 32]).unwrap();
    assert!(matches!(
        open_all(&file, &other),
        Err(SealError::Chunk { index: 0, .. })
    ));
}

#[test]
fn sealing_a_file_that_changed_since_it_was_hashed_fails() {
    let kp = signer();
    let plain = vector_plaintext();
    let d = digest_reader(&mut &plain[..]).unwrap();
    let header = Header {
        chunk_size: 1024,
        format: FORMAT.into(),
        key_id: "k".into(),
        name: "m".into(),
        nonce_prefix: "00000000000001".into(),
        plaintext_len: d.len,
        plaintext_sha256: d.sha256,
        signer: sigil_seal_signer_id(&kp),
        version: 1,
    };
    let h = SignedHeader::sign(header, |m| kp.sign(m).as_ref().to_vec()).unwrap();
    let mut changed = plain.clone();
    changed[100] ^= 1;
    assert!(matches!(
        seal(&mut &changed[..], &mut Vec::new(), &h, &key()),
        Err(SealError::Digest { .. })
    ));
    assert!(seal(&mut &plain[..2000], &mut Vec::new(), &h, &key()).is_err());
}
