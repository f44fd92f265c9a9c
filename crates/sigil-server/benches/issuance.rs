//! X.509-SVID issuance through the real `Issuer`: CSR check, signing, and the durable
//! issuance record committed to SQLite (WAL, synchronous=FULL) before returning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sigil_core::{Clock, SpiffeId, SystemClock, TrustDomain};
use sigil_pki::{JwtAlgorithm, KeyAlgorithm, KeyPair, SvidSpec};
use sigil_server::{Authorities, Issuer, KeySettings};
use sigil_store::{SqlStore, Store};

fn issuance(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("bench.test").unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (issuer, store) = rt.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("sigil.db").display());
        let store: Arc<dyn Store> = Arc::new(SqlStore::connect(&url).await.unwrap());
        let auth = Authorities::load(
            store.clone(),
            clock.clone(),
            KeySettings {
                trust_domain: td.clone(),
                ca_alg: KeyAlgorithm::EcdsaP256,
                ca_ttl_secs: 86400,
                jwt_alg: JwtAlgorithm::Es256,
                key_dir: dir.path().join("keys"),
            },
            None,
        )
        .await
        .unwrap();
        (
            Issuer::new(store.clone(), Arc::new(auth), clock.clone(), td.clone()),
            store,
        )
    });
    let id = SpiffeId::new("spiffe://bench.test/workload").unwrap();
    let csr = KeyPair::generate(KeyAlgorithm::EcdsaP256)
        .unwrap()
        .csr_der(None)
        .unwrap();
    let spec = SvidSpec {
        spiffe_id: id.clone(),
        dns_names: vec![],
        ttl_secs: 3600,
    };
    let mut g = c.benchmark_group("server");
    g.throughput(Throughput::Elements(1));
    g.bench_function("x509_svid_issue_with_durable_record", |b| {
        b.iter(|| {
            rt.block_on(issuer.sign_x509_svid(&csr, spec.clone(), "bench"))
                .unwrap()
        })
    });
    // Many agents at once: records share commits (group commit).
    const CONCURRENT: u64 = 64;
    let issuer = std::sync::Arc::new(issuer);
    g.throughput(Throughput::Elements(CONCURRENT));
    g.bench_function("x509_svid_issue_with_durable_record_64_concurrent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..CONCURRENT {
                    let issuer = issuer.clone();
                    let csr = csr.clone();
                    let spec = spec.clone();
                    set.spawn(
                        async move { issuer.sign_x509_svid(&csr, spec, "bench").await.unwrap() },
                    );
                }
                while set.join_next().await.is_some() {}
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    let aud = vec!["bench".to_owned()];
    g.bench_function("jwt_svid_issue_with_durable_record", |b| {
        b.iter(|| {
            rt.block_on(issuer.mint_jwt_svid(&id, &aud, 300, "bench"))
                .unwrap()
        })
    });
    g.finish();
    rt.block_on(async { assert!(store.count_issued().await.unwrap() > 0) });
}

criterion_group!(benches, issuance);
criterion_main!(benches);
