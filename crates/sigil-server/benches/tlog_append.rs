//! Audit log appends through `TransparencyLog::append_audit`, the code path of
//! `POST /audit/v1/records`: request-id lookup, Merkle tree hashes, and the records plus
//! their stored hashes committed in one SQLite transaction (WAL, synchronous=FULL) before
//! returning — durable. Batches of 1, 16 and 256 records of a realistic decision record
//! (~450 bytes of JSON); every record has a fresh request id, so each is appended.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sigil_server::TransparencyLog;
use sigil_store::{SqlStore, Store};

const PROXY: &str = "spiffe://bench.test/proxy/p1";

fn record(n: u64) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"time_ms":1735689600000,"request_id":"req-{:016x}","#,
            r#""spiffe_id":"spiffe://bench.test/ns/default/sa/client","#,
            r#""cert_thumbprint":"q1bH0a9PzUJX3-Xw5Kc4mY6Yh2rXr8kz7T0n6bLw9cE","#,
            r#""jti":"7f0c2f7e-3a5e-4f54-9f7a-0c2b8e1d4a6b","method":"POST","#,
            r#""path":"/v1/chat/completions","#,
            r#""calls":[{{"kind":"model","name":"gpt-4o-mini"}}],"#,
            r#""policy_ids":["allow-chat"],"decision":"allow","#,
            r#""reason":"permitted by allow-chat"}}"#
        ),
        n
    )
    .into_bytes()
}

fn tlog_append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = rt.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("sigil.db").display());
        let store: Arc<dyn Store> = Arc::new(SqlStore::connect(&url).await.unwrap());
        let log = TransparencyLog::load_or_create_audit(
            store.clone(),
            &dir.path().join("keys"),
            "sigil.bench.test/audit",
        )
        .unwrap();
        (log, store)
    });
    let mut next: u64 = 0;
    let mut g = c.benchmark_group("audit_log");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for batch in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(batch));
        g.bench_function(format!("append_durable_batch_{batch}"), |b| {
            b.iter_batched(
                || {
                    let recs: Vec<Vec<u8>> = (next..next + batch).map(record).collect();
                    next += batch;
                    recs
                },
                |recs| {
                    let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
                    let idx = rt.block_on(log.append_audit(PROXY, &refs)).unwrap();
                    assert_eq!(idx.len(), refs.len());
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    rt.block_on(async {
        assert_eq!(store.audit_size().await.unwrap(), next);
        let (size, _) = log.head().await.unwrap();
        assert_eq!(size, next);
    });
}

criterion_group!(benches, tlog_append);
criterion_main!(benches);
