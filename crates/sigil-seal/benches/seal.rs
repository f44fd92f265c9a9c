//! Seal and open throughput on one core (one thread), in memory: 64 MiB of plaintext in
//! 64 KiB chunks (the default), AES-256-GCM per chunk plus the SHA-256 of the plaintext.
//! `cargo bench -p sigil-seal --bench seal`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sigil_seal::{DEFAULT_CHUNK_SIZE, DataKey, FORMAT, Header, SignedHeader, digest_reader};

const LEN: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    let plain: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let kp = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
    let d = digest_reader(&mut &plain[..]).unwrap();
    let header = Header {
        chunk_size: DEFAULT_CHUNK_SIZE,
        format: FORMAT.into(),
        key_id: "bench".into(),
        name: "bench".into(),
        nonce_prefix: "01020304050607".into(),
        plaintext_len: d.len,
        plaintext_sha256: d.sha256,
        signer: hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            kp.public_key().as_ref(),
        )),
        version: 1,
    };
    let h = SignedHeader::sign(header, |m| kp.sign(m).as_ref().to_vec()).unwrap();
    let key = DataKey::from_bytes(&[9; 32]).unwrap();
    let mut sealed = Vec::with_capacity(LEN + LEN / 1000 + 4096);
    sigil_seal::seal(&mut &plain[..], &mut sealed, &h, &key).unwrap();
    let body = &sealed[h.encoded_len()..];

    let mut g = c.benchmark_group("sealed_model_64MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(LEN as u64));
    let mut out = Vec::with_capacity(sealed.len());
    g.bench_function("seal", |b| {
        b.iter(|| {
            out.clear();
            sigil_seal::seal(&mut &plain[..], &mut out, &h, &key).unwrap();
        })
    });
    g.bench_function("open", |b| {
        b.iter(|| {
            out.clear();
            sigil_seal::open(&mut &body[..], &mut out, &h, &key).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
