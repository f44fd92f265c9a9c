//! Smoke test of `sigil bench propagation`: a real server, 5 in-process agents and 2 proxies
//! on two of them; every policy change and revocation reaches every agent and proxy (no
//! timing assertions).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

#[test]
fn bench_propagation_delivers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args([
            "bench",
            "propagation",
            "--agents",
            "5",
            "--changes",
            "5",
            "--revocations",
            "2",
            "--proxies",
            "2",
            "--output",
            "json",
            "--dir",
        ])
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sigil bench failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["agents"], 5, "{v:#}");
    for (kind, n) in [("policy", 5), ("revocation", 2)] {
        let k = &v[kind];
        assert_eq!(k["changes"], n, "{kind}: {v:#}");
        assert_eq!(k["delivered"], n, "{kind}: {v:#}");
        assert_eq!(k["delivered_fraction"].as_f64(), Some(1.0), "{kind}: {v:#}");
        assert_eq!(k["agent_deliveries"], n * 5, "{kind}: {v:#}");
        let p = &v[format!("proxy_{kind}")];
        assert_eq!(p["delivered"], n, "proxy {kind}: {v:#}");
        assert_eq!(p["agent_deliveries"], n * 2, "proxy {kind}: {v:#}");
        assert_eq!(p["latencies_ms"].as_array().map(Vec::len), Some(n), "{v:#}");
    }
    assert_eq!(v["proxies"], 2, "{v:#}");
    // More proxies than agents is refused.
    let bad = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["bench", "propagation", "--agents", "1", "--proxies", "2"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--proxies must not exceed --agents"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
