//! Whole-process benchmark of the Workload API: real `sigil server` and `sigil agent`
//! processes, 50 registration entries, and a client measuring the time to the first
//! FetchX509SVID response (new connection each time, and on one kept connection).
//! Also reports the agent's idle RSS. Run: `cargo bench -p sigil --bench workload_api`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Agent, Server, TD, my_uid, raw_workload_client, with_header};
use sigil_proto::workload as wl;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo test --benches` runs this with --test-ish args; only run when benchmarking.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("SIGIL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    for i in 0..49 {
        s.sigil_json(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://{TD}/other/{i}"),
            "--parent-id",
            &node,
            "--selector",
            &format!("unix:uid:{}", 20000 + i),
        ]);
    }
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/bench"),
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);
    let a = Agent::start(&s, &tmp.path().join("agent"), jt["token"].as_str());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Wait until all 50 SVIDs are signed and cached.
        let state = a.dir.join("cache/state.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&state).unwrap_or_default();
            if text.matches("\"received_at\"").count() >= 50 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not sign 50 SVIDs:\n{}",
                a.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_idle = rss_kib(a.pid().unwrap());

        let mut fresh = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut c = raw_workload_client(&a.socket).await;
            let mut st = c
                .fetch_x509svid(with_header(wl::X509svidRequest {}))
                .await
                .unwrap()
                .into_inner();
            let first = st.message().await.unwrap().unwrap();
            fresh.push(t.elapsed());
            assert_eq!(first.svids.len(), 1);
        }
        let mut c = raw_workload_client(&a.socket).await;
        let mut kept = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut st = c
                .fetch_x509svid(with_header(wl::X509svidRequest {}))
                .await
                .unwrap()
                .into_inner();
            st.message().await.unwrap().unwrap();
            kept.push(t.elapsed());
        }
        fresh.sort();
        kept.sort();
        let rss_after = rss_kib(a.pid().unwrap());
        println!(
            "workload_api/fetch_x509svid_first_response new_connection: n={n} p50={:?} p99={:?}",
            percentile(&fresh, 0.5),
            percentile(&fresh, 0.99)
        );
        println!(
            "workload_api/fetch_x509svid_first_response kept_connection: n={n} p50={:?} p99={:?}",
            percentile(&kept, 0.5),
            percentile(&kept, 0.99)
        );
        println!(
            "agent RSS with 50 entries: idle {:.1} MiB, after {} fetches {:.1} MiB",
            rss_idle as f64 / 1024.0,
            2 * n,
            rss_after as f64 / 1024.0
        );
    });
}
