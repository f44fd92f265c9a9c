//! What one TPM attestation costs: the server's two steps (begin: EK chain, AK checks,
//! MakeCredential; finish: credential, quote signature and binding, event-log replay,
//! policy) and the whole exchange including the TPM's work, against a real swtpm.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../tests/swtpm/mod.rs"]
mod swtpm;

use criterion::{Criterion, criterion_group, criterion_main};
use sigil_tpm::{
    EkRoots, EventLogBuilder, Evidence, TpmDevice, TpmPolicy, begin_attestation,
    finish_attestation, parse_event_log, qualifying_data,
};

const CSR_KEY: &[u8] = b"node CSR SubjectPublicKeyInfo";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let ca = swtpm::TestCa::new(&tmp.path().join("ca"));
    let state = tmp.path().join("tpm");
    ca.manufacture(&state);
    let tpm = swtpm::SwTpm::start(&state);
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    // A log of realistic length: 100 boot events over PCRs 0-7.
    let mut log = EventLogBuilder::new();
    for i in 0..100u32 {
        let pcr = i % 8;
        let d = if pcr == 7 && i == 7 {
            log.secure_boot(true)
        } else {
            log.event(pcr, 0x8000_0003, format!("boot component {i}").as_bytes())
        };
        dev.extend_pcr(pcr as u8, d).unwrap();
    }
    let log = log.finish();
    let policy = TpmPolicy {
        require_secure_boot: true,
        ..TpmPolicy::new(EkRoots::from_pem(&ca.roots_pem()).unwrap())
    };
    let ek = dev.ek_certificate().unwrap();
    let ak = dev.ak_public().to_vec();

    c.bench_function("tpm_server_begin", |b| {
        b.iter(|| begin_attestation(&policy, &ek, &ak, now()).unwrap())
    });

    let (ch, pending) = begin_attestation(&policy, &ek, &ak, now()).unwrap();
    let activated = dev
        .activate_credential(&ch.sealed.credential_blob, &ch.sealed.encrypted_secret)
        .unwrap();
    let (attest, signature) = dev
        .quote(&qualifying_data(&ch.nonce, CSR_KEY), &ch.pcrs)
        .unwrap();
    let evidence = Evidence {
        activated_credential: &activated,
        attest: &attest,
        signature: &signature,
        event_log: &log,
    };
    c.bench_function("tpm_server_finish", |b| {
        b.iter(|| finish_attestation(&policy, &pending, &evidence, CSR_KEY, now()).unwrap())
    });
    c.bench_function("tpm_event_log_replay_100_events", |b| {
        b.iter(|| parse_event_log(&log).unwrap().replay().unwrap())
    });

    let mut g = c.benchmark_group("tpm_round_trip");
    g.sample_size(10);
    g.bench_function("begin_activate_quote_finish_swtpm", |b| {
        b.iter(|| {
            let (ch, pending) = begin_attestation(&policy, &ek, &ak, now()).unwrap();
            let activated = dev
                .activate_credential(&ch.sealed.credential_blob, &ch.sealed.encrypted_secret)
                .unwrap();
            let (attest, signature) = dev
                .quote(&qualifying_data(&ch.nonce, CSR_KEY), &ch.pcrs)
                .unwrap();
            let e = Evidence {
                activated_credential: &activated,
                attest: &attest,
                signature: &signature,
                event_log: &log,
            };
            finish_attestation(&policy, &pending, &e, CSR_KEY, now()).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
