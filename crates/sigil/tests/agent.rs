//! End-to-end tests of `sigil agent` as a real process next to a real `sigil server`, with
//! the Rust `spiffe` crate (unchanged) and raw gRPC as clients.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, Server, TD, my_uid, raw_workload_client, with_header};
use sigil_proto::workload as wl;

fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

/// A server, a join token, an entry for this test process's uid, and an attested agent.
fn stack(tmp: &std::path::Path, x509_ttl: &str) -> (Server, Agent, String, serde_json::Value) {
    let s = Server::start(&tmp.join("srv"), &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    let entry = s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &id("workload"),
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
        "--x509-ttl",
        x509_ttl,
    ]);
    let a = Agent::start(&s, &tmp.join("agent"), jt["token"].as_str());
    (s, a, node, entry)
}

async fn spiffe_client(a: &Agent) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(a.endpoint())
        .await
        .unwrap()
}

/// Retries `f` until it returns Some or `within` passes.
async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_crate_fetches_svids_and_bundles_and_validates_jwts() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, a, _node, _) = tokio::task::block_in_place(|| stack(tmp.path(), "1h"));
    let c = spiffe_client(&a).await;
    let svid = eventually(Duration::from_secs(15), || async {
        c.fetch_x509_svid().await.ok()
    })
    .await
    .unwrap_or_else(|| panic!("no SVID; agent log:\n{}", a.log_text()));
    assert_eq!(svid.spiffe_id().to_string(), id("workload"));
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = bundles.get(&td).expect("bundle for the trust domain");
    // The bundle the agent serves is the server's.
    let server_pem = tokio::task::block_in_place(|| s.bundle_pem());
    let server_ders: Vec<Vec<u8>> = pem::parse_many(server_pem)
        .unwrap()
        .iter()
        .map(|p| p.contents().to_vec())
        .collect();
    let agent_ders: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    assert_eq!(agent_ders, server_ders);

    let jwt = c.fetch_jwt_svid(["model-gw"], None).await.unwrap();
    assert_eq!(jwt.audience(), ["model-gw".to_string()]);
    let validated = c.validate_jwt_token("model-gw", jwt.token()).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), id("workload"));
    // Wrong audience, and a token with one signature byte changed: refused.
    assert!(c.validate_jwt_token("other", jwt.token()).await.is_err());
    let mut t = jwt.token().to_owned();
    let i = t.len() - 5;
    let flipped = if &t[i..i + 1] == "A" { "B" } else { "A" };
    t.replace_range(i..i + 1, flipped);
    assert!(c.validate_jwt_token("model-gw", &t).await.is_err());
    let jb = c.fetch_jwt_bundles().await.unwrap();
    assert!(jb.get(&td).is_some());

    // Without the security header: InvalidArgument.
    let mut raw = raw_workload_client(&a.socket).await;
    let err = raw
        .fetch_jwtsvid(tonic::Request::new(wl::JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = raw
        .fetch_x509svid(tonic::Request::new(wl::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // With it, but no audience: InvalidArgument.
    let err = raw
        .fetch_jwtsvid(with_header(wl::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Asking for an ID the caller is not entitled to: PermissionDenied.
    let err = raw
        .fetch_jwtsvid(with_header(wl::JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: id("other"),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[test]
fn other_uids_and_other_executables_get_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, a, node, entry) = stack(tmp.path(), "1h");
    // A copy of the sigil binary that `nobody` can execute, and a world-writable output dir.
    let bin_dir = tmp.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let bin = bin_dir.join("sigil");
    std::fs::copy(common::sigil_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = bin_dir.join("out");
    let fetch = |uid: Option<u32>| {
        let mut cmd = Command::new(&bin);
        cmd.args([
            "workload",
            "fetch-x509",
            "--socket",
            &a.endpoint(),
            "--out-dir",
        ])
        .arg(&out);
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        cmd.output().unwrap()
    };
    // Our own uid gets its SVID (proves the setup can succeed).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let o = fetch(None);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::remove_dir_all(&out).unwrap();
    // `nobody` (uid 65534): PermissionDenied and no key material.
    let o = fetch(Some(65534));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no registration entry matches")
            || err.contains("PermissionDenied")
            || err.contains("permission"),
        "{err}"
    );
    assert!(!out.join("key.pem").exists());

    // An entry that also requires the executable's hash: a different binary gets nothing.
    let wrong = "0".repeat(64);
    s.sigil_json(&[
        "entry",
        "update",
        entry["id"].as_str().unwrap(),
        "--selector",
        &format!("unix:uid:{}", my_uid()),
        "--selector",
        &format!("unix:sha256:{wrong}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = fetch(None);
        if !o.status.success() {
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("no registration entry"),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hash-restricted entry still served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!out.join("key.pem").exists() || std::fs::remove_dir_all(&out).is_ok());
    // And the matching hash makes it work again.
    let hash = {
        use sha2::Digest;
        hex_lower(&sha2::Sha256::digest(std::fs::read(&bin).unwrap()))
    };
    s.sigil_json(&[
        "entry",
        "update",
        entry["id"].as_str().unwrap(),
        "--selector",
        &format!("unix:uid:{}", my_uid()),
        "--selector",
        &format!("unix:sha256:{hash}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fetch(None).status.success() {
        assert!(
            Instant::now() < deadline,
            "hash-matching caller not served:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = node;
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_gets_the_renewed_svid_before_half_life() {
    let tmp = tempfile::tempdir().unwrap();
    let (_s, a, _, _) = tokio::task::block_in_place(|| stack(tmp.path(), "60s"));
    let raw = raw_workload_client(&a.socket).await;
    // Opens once the agent has attested (before that it has no identity to serve).
    let mut stream = eventually(Duration::from_secs(15), || {
        let mut raw = raw.clone();
        async move {
            raw.fetch_x509svid(with_header(wl::X509svidRequest {}))
                .await
                .ok()
        }
    })
    .await
    .unwrap()
    .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let received = Instant::now();
    let serial = |r: &wl::X509svidResponse| {
        let (_, c) = x509_parser::parse_x509_certificate(&r.svids[0].x509_svid).unwrap();
        (c.raw_serial().to_vec(), c.validity().not_after.timestamp())
    };
    let (s1, not_after1) = serial(&first);
    // The agent renews at half of the lifetime it was handed (60 s TTL → about 30 s).
    let next = tokio::time::timeout(Duration::from_secs(30 + 8), stream.message())
        .await
        .expect("no renewed SVID within half-life + margin")
        .unwrap()
        .unwrap();
    let (s2, not_after2) = serial(&next);
    assert_ne!(s1, s2);
    assert!(not_after2 > not_after1);
    assert!(received.elapsed() < Duration::from_secs(38));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_cuts_the_node_off() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, mut a, node, _) = tokio::task::block_in_place(|| stack(tmp.path(), "1h"));
    let c = spiffe_client(&a).await;
    eventually(Duration::from_secs(15), || async {
        c.fetch_x509_svid().await.ok()
    })
    .await
    .unwrap();
    tokio::task::block_in_place(|| s.sigil_json(&["node", "evict", &node]));
    // The agent drops its identity and stops: nothing new is served.
    let code = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(10)));
    assert!(
        matches!(code, Some(c) if c != 0),
        "agent still running after eviction:\n{}",
        a.log_text()
    );
    assert!(a.log_text().contains("evicted"));
    assert!(
        spiffe::WorkloadApiClient::connect_to(a.endpoint())
            .await
            .map(|_| ())
            .is_err()
            || c.fetch_x509_svid().await.is_err()
    );
    assert!(
        !a.dir.join("cache/node.json").exists(),
        "node identity must be wiped"
    );
    // Restarted without a token, it has no identity and says so.
    tokio::task::block_in_place(|| a.restart());
    let code = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(10)));
    assert!(matches!(code, Some(c) if c != 0));
    assert!(
        a.log_text().contains("no node identity"),
        "{}",
        a.log_text()
    );
}

#[test]
fn bad_join_tokens_untrusted_servers_and_corrupt_caches_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    // Garbage token: refused, clear message, exit non-zero.
    let mut a = Agent::start(&s, &tmp.path().join("a1"), Some("garbage-token"));
    assert!(matches!(a.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    assert!(
        a.log_text().contains("unknown join token"),
        "{}",
        a.log_text()
    );
    assert!(!a.log_text().contains("panicked"));
    // A reused token: the first agent gets in, the second is refused.
    let jt = s.sigil_json(&["jointoken", "create"]);
    let token = jt["token"].as_str().unwrap();
    let mut first = Agent::start(&s, &tmp.path().join("a2"), Some(token));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !first.log_text().contains("node attested") {
        assert!(Instant::now() < deadline, "{}", first.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut second = Agent::start(&s, &tmp.path().join("a3"), Some(token));
    assert!(matches!(second.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    assert!(
        second.log_text().contains("already been used"),
        "{}",
        second.log_text()
    );
    // A server whose certificate does not chain to the bundle the agent trusts.
    let other = Server::start(&tmp.path().join("other-srv"), &[]);
    let jt2 = other.sigil_json(&["jointoken", "create"]);
    let wrong_bundle = tmp.path().join("wrong.pem");
    std::fs::write(&wrong_bundle, s.bundle_pem()).unwrap();
    let mut untrusting = Agent::start_with(
        other.port,
        &tmp.path().join("a4"),
        jt2["token"].as_str(),
        &wrong_bundle,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(untrusting.is_running() || untrusting.wait_exit(Duration::from_secs(1)).is_some());
    let log = untrusting.log_text();
    assert!(
        log.contains("server certificate")
            || log.contains("UntrustedChain")
            || log.contains("certificate"),
        "{log}"
    );
    assert!(!log.contains("node attested"));
    assert!(!log.contains("panicked"));
    // The token was not spent on the impostor.
    assert_eq!(
        other
            .sigil_json(&["node", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // A corrupted cache file: refused with a message, re-synced from the server.
    let node = jt["node_id"].as_str().unwrap();
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &id("w"),
        "--parent-id",
        node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);
    let state = first.dir.join("cache/state.json");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !state.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    first.stop();
    std::fs::write(&state, b"{ this is not json").unwrap();
    first.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        if serde_json::from_str::<serde_json::Value>(&text).is_ok() && text.contains(&id("w")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache not re-synced:\n{}",
            first.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(first.log_text().contains("corrupt"), "{}", first.log_text());
    assert!(first.dir.join("cache/state.json.corrupt").exists());
    assert!(!first.log_text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_changes_are_pushed_on_open_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, a, _, _) = tokio::task::block_in_place(|| stack(tmp.path(), "1h"));
    let mut raw = raw_workload_client(&a.socket).await;
    let count = |der: &[u8]| {
        let mut n = 0;
        let mut rest = der;
        while !rest.is_empty() {
            let (tail, _) = x509_parser::parse_x509_certificate(rest).unwrap();
            rest = tail;
            n += 1;
        }
        n
    };
    // Once the agent has attested and holds an SVID, open both streams.
    let mut svids = eventually(Duration::from_secs(15), || {
        let mut raw = raw.clone();
        async move {
            raw.fetch_x509svid(with_header(wl::X509svidRequest {}))
                .await
                .ok()
        }
    })
    .await
    .unwrap()
    .into_inner();
    let mut bundles = raw
        .fetch_x509_bundles(with_header(wl::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = bundles.message().await.unwrap().unwrap();
    assert_eq!(count(&first.bundles[&format!("spiffe://{TD}")]), 1);
    let before = svids.message().await.unwrap().unwrap();
    assert_eq!(count(&before.svids[0].bundle), 1);
    // `sigil ca rotate` pre-publishes a new CA key: both streams receive the 2-key bundle.
    tokio::task::block_in_place(|| s.sigil_json(&["ca", "rotate"]));
    let next = tokio::time::timeout(Duration::from_secs(5), bundles.message())
        .await
        .expect("bundle not pushed")
        .unwrap()
        .unwrap();
    assert_eq!(count(&next.bundles[&format!("spiffe://{TD}")]), 2);
    let after = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .expect("SVID response not pushed")
        .unwrap()
        .unwrap();
    assert_eq!(count(&after.svids[0].bundle), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_still_attesting_says_unavailable_not_denied() {
    let tmp = tempfile::tempdir().unwrap();
    let td = sigil_core::TrustDomain::new(TD).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ca = sigil_pki::CertificateAuthority::generate(
        &td,
        sigil_pki::KeyAlgorithm::EcdsaP256,
        now,
        3600,
    )
    .unwrap();
    let bundle = tmp.path().join("ca.pem");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();
    // No server listens on this port: attestation keeps retrying.
    let port = common::free_port();
    let mut a = tokio::task::block_in_place(|| {
        Agent::start_with(port, &tmp.path().join("agent"), Some("some-token"), &bundle)
    });
    let mut raw = raw_workload_client(&a.socket).await;
    let err = raw
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("attesting"), "{err}");
    assert!(tokio::task::block_in_place(|| a.is_running()));
}
