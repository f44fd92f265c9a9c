//! Time-dependent behaviour of the trust authority, with the server running in-process on
//! real sockets and a clock the test moves: expired join tokens and expired client SVIDs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use common::{TD, token_request};
use sigil_core::{Clock, ManualClock, SystemClock};
use sigil_pki::{KeyAlgorithm, KeyPair};
use sigil_proto::node::v1 as pb;

fn config(dir: &std::path::Path) -> sigil_server::ServerConfig {
    let text = format!(
        "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\nlisten_addr = \"127.0.0.1:{}\"\n",
        dir.display(),
        common::free_port()
    );
    toml::from_str(&text).unwrap()
}

/// Adapts an in-process server to the process harness's helpers.
fn harness(dir: &std::path::Path, port: u16) -> common::Server {
    common::Server::attach(dir, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_join_tokens_and_expired_client_svids_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemClock.now());
    let dir = tmp.path().join("srv");
    let server = sigil_server::start(config(&dir), Arc::new(clock.clone()))
        .await
        .unwrap();
    let h = harness(&dir, server.addr.port());

    // A join token that lived 60 s, used 61 s later.
    let jt = tokio::task::block_in_place(|| h.sigil_json(&["jointoken", "create", "--ttl", "60s"]));
    clock.advance(61);
    let csr = KeyPair::generate(KeyAlgorithm::EcdsaP256)
        .unwrap()
        .csr_der(None)
        .unwrap();
    let mut anon = h.node_client(None).await;
    let err = anon
        .attest(pb::AttestRequest {
            join_token: jt["token"].as_str().unwrap().into(),
            csr,
            tpm: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("expired"), "{err}");

    // A client SVID with a 60 s TTL gets a token now and is refused once expired.
    let id = format!("spiffe://{TD}/short");
    tokio::task::block_in_place(|| {
        h.sigil_json(&[
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &format!("spiffe://{TD}/sigil/node/n"),
            "--selector",
            "unix:uid:1",
            "--scope",
            "model:invoke",
        ]);
        let out = tmp.path().join("svid");
        h.sigil_json(&[
            "svid",
            "mint",
            "--spiffe-id",
            &id,
            "--ttl",
            "60s",
            "--out-dir",
            out.to_str().unwrap(),
        ]);
        let (c, k, b) = (
            out.join("svid.pem"),
            out.join("key.pem"),
            out.join("bundle.pem"),
        );
        let (code, body) =
            token_request(&h, &b, Some((&c, &k)), &["grant_type=client_credentials"]);
        assert_eq!(code, 200, "{body}");
        clock.advance(120);
        let (code, body) =
            token_request(&h, &b, Some((&c, &k)), &["grant_type=client_credentials"]);
        assert_eq!(
            (code, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{body}"
        );
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("xpired"),
            "{body}"
        );
    });
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_a_client_svid_once_it_has_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemClock.now());
    let dir = tmp.path().join("srv");
    let server = sigil_server::start(config(&dir), Arc::new(clock.clone()))
        .await
        .unwrap();
    let h = harness(&dir, server.addr.port());
    let id = format!("spiffe://{TD}/short");
    let out = tmp.path().join("svid");
    let pdir = tmp.path().join("proxy");
    let bundle_json = tmp.path().join("bundle.json");
    let policies = tmp.path().join("policies");
    let token = tokio::task::block_in_place(|| {
        h.sigil_json(&[
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &format!("spiffe://{TD}/sigil/node/n"),
            "--selector",
            "unix:uid:1",
        ]);
        h.sigil_json(&[
            "svid",
            "mint",
            "--spiffe-id",
            &id,
            "--ttl",
            "60s",
            "--out-dir",
            out.to_str().unwrap(),
        ]);
        h.sigil_json(&[
            "svid",
            "mint",
            "--spiffe-id",
            &format!("spiffe://{TD}/proxy"),
            "--dns",
            "localhost",
            "--out-dir",
            pdir.to_str().unwrap(),
        ]);
        let shown = h.sigil(&["bundle", "show"]);
        std::fs::write(&bundle_json, &shown.stdout).unwrap();
        let (c, k, b) = (
            out.join("svid.pem"),
            out.join("key.pem"),
            out.join("bundle.pem"),
        );
        let (code, body) = token_request(
            &h,
            &b,
            Some((&c, &k)),
            &["grant_type=client_credentials", "resource=model-gw"],
        );
        assert_eq!(code, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    });
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.cedar"),
        "permit(principal, action == Action::\"http\", resource);",
    )
    .unwrap();
    let text = format!(
        "trust_domain = \"{TD}\"\nlisten_addr = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\n\
         audience = \"model-gw\"\nissuer = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\n\
         policy_dir = \"{}\"\naudit_log = \"{}\"\n",
        h.url(""),
        pdir.join("svid.pem").display(),
        pdir.join("key.pem").display(),
        bundle_json.display(),
        policies.display(),
        tmp.path().join("audit.log").display(),
    );
    let cfg: sigil_proxy::ProxyConfig = toml::from_str(&text).unwrap();
    let proxy = sigil_proxy::start(cfg, Arc::new(clock.clone()))
        .await
        .unwrap();
    let port = proxy.addr.unwrap().port();
    let call = || {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(out.join("bundle.pem"))
            .arg("--cert")
            .arg(out.join("svid.pem"))
            .arg("--key")
            .arg(out.join("key.pem"))
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://localhost:{port}/v1/echo"));
        let (_, code, _) = common::run(&mut cmd);
        code
    };
    // Valid now: admitted (the upstream on port 9 is down, so 502 from the proxy itself).
    let code = tokio::task::block_in_place(call);
    assert_eq!(code, "502");
    // Past the SVID's notAfter: the handshake itself is refused.
    clock.advance(120);
    let code = tokio::task::block_in_place(call);
    assert_eq!(code, "000", "an expired client SVID was admitted");
    proxy.shutdown();
    server.shutdown().await;
}
