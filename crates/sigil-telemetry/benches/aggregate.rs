//! `Aggregator::record`, the per-request cost on the proxy: one thread, and two threads
//! recording for the same identity (one shard, so the lock is contended).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sigil_telemetry::Aggregator;

const ID: &str = "spiffe://example.org/ns/prod/sa/vision-pipeline";
const KEYS: [&str; 4] = [
    "invoke:defect-detector",
    "invoke:ocr",
    "call_tool:read_file",
    "http:/health",
];

fn record(c: &mut Criterion) {
    let mut g = c.benchmark_group("aggregate");
    let agg = Aggregator::default();
    let mut i = 0usize;
    g.bench_function("record_1_thread", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            agg.record(
                black_box(ID),
                black_box(KEYS[i % KEYS.len()]),
                false,
                512,
                2048,
            );
        })
    });
    // Two threads hammering the same identity: per-call time seen by each thread.
    let agg = Arc::new(Aggregator::default());
    g.bench_function("record_2_threads_contended", |b| {
        b.iter_custom(|iters| {
            let barrier = Arc::new(Barrier::new(2));
            let other = {
                let agg = Arc::clone(&agg);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    for j in 0..iters {
                        agg.record(ID, KEYS[(j as usize) % KEYS.len()], false, 512, 2048);
                    }
                })
            };
            barrier.wait();
            let start = Instant::now();
            for j in 0..iters {
                agg.record(
                    black_box(ID),
                    black_box(KEYS[(j as usize + 1) % KEYS.len()]),
                    false,
                    512,
                    2048,
                );
            }
            let elapsed = start.elapsed();
            other.join().unwrap();
            elapsed
        })
    });
    g.finish();
    let _ = agg.take();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = record
}
criterion_main!(benches);
