//! End-to-end tests of `sigil server` as a real process, with real clients: the `sigil` CLI,
//! `openssl`, `curl`, and a gRPC client over rustls.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Server, TD, jwt_payload, run, thumbprint, token_request};
use sigil_pki::{CertificateAuthority, KeyAlgorithm, KeyPair, SvidSpec, parse_csr};
use sigil_proto::node::v1 as pb;

fn app_id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

fn create_entry(s: &Server, id: &str, parent: &str, scopes: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        id,
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
        "--group",
        "factory-floor",
    ];
    for sc in scopes {
        args.extend(["--scope", sc]);
    }
    s.sigil_json(&args)
}

fn files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    (
        dir.join("svid.pem"),
        dir.join("key.pem"),
        dir.join("bundle.pem"),
    )
}

#[test]
fn openssl_verifies_an_issued_svid_with_exactly_one_uri_san() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let out = tmp.path().join("svid");
    s.mint(&app_id("app"), &out);
    let (svid, key, bundle) = files(&out);
    let (ok, stdout, stderr) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&bundle)
        .arg(&svid));
    assert!(ok, "openssl verify failed: {stdout} {stderr}");
    let (ok, text, _) = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&svid));
    assert!(ok);
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(text.contains(&format!("URI:{}", app_id("app"))));
    assert!(text.contains("CA:FALSE"));
    assert!(text.contains("Digital Signature"));
    assert!(!text.contains("Certificate Sign"));
    let mode = std::fs::metadata(&key).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // The server's own key files are 0600 too.
    for f in std::fs::read_dir(s.dir.join("keys")).unwrap() {
        let m = f.unwrap().metadata().unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
            0o600
        );
    }
    // A certificate from another CA does not verify against the bundle.
    let other = CertificateAuthority::generate(
        &sigil_core::TrustDomain::new(TD).unwrap(),
        KeyAlgorithm::EcdsaP256,
        now(),
        3600,
    )
    .unwrap();
    let foreign = tmp.path().join("foreign-ca.pem");
    std::fs::write(&foreign, other.cert_pem()).unwrap();
    let (ok, _, _) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&foreign)
        .arg(&svid));
    assert!(!ok, "an SVID must not verify against a foreign CA");
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Writes an SVID for `id` signed by a CA the server does not know.
fn foreign_svid(dir: &Path, id: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let td = sigil_core::TrustDomain::new(TD).unwrap();
    let ca = CertificateAuthority::generate(&td, KeyAlgorithm::EcdsaP256, now(), 3600).unwrap();
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let spiffe_id = sigil_core::SpiffeId::new(id).unwrap();
    let csr = parse_csr(&key.csr_der(Some(&spiffe_id)).unwrap()).unwrap();
    let svid = ca
        .sign_x509_svid(
            &csr,
            &SvidSpec {
                spiffe_id,
                dns_names: vec![],
                ttl_secs: 600,
            },
            now(),
        )
        .unwrap();
    let (c, k) = (dir.join("svid.pem"), dir.join("key.pem"));
    std::fs::write(&c, svid.pem()).unwrap();
    std::fs::write(&k, key.pkcs8_pem()).unwrap();
    (c, k)
}

#[test]
fn token_endpoint_issues_certificate_bound_tokens_and_refuses_bad_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let node = format!("spiffe://{TD}/sigil/node/n1");
    create_entry(&s, &app_id("agent"), &node, &["model:invoke", "model:list"]);
    let out = tmp.path().join("agent");
    let minted = s.mint(&app_id("agent"), &out);
    let (svid, key, bundle) = files(&out);

    // Good client: token bound to its certificate.
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &["grant_type=client_credentials", "scope=model:invoke"],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "model:invoke");
    let claims = jwt_payload(body["access_token"].as_str().unwrap());
    assert_eq!(claims["cnf"]["x5t#S256"], thumbprint(&svid));
    assert_eq!(claims["sub"], app_id("agent"));
    assert_eq!(claims["client_id"], app_id("agent"));
    assert_eq!(claims["groups"], serde_json::json!(["factory-floor"]));
    assert_eq!(claims["iss"], s.url(""));
    assert_eq!(claims["aud"], serde_json::json!(["sigil"]));
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert!(claims["exp"].as_i64().unwrap() > claims["iat"].as_i64().unwrap());

    // No scope requested: everything on the entry; a resource names the audience.
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &["grant_type=client_credentials", "resource=model-gw"],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["scope"], "model:invoke model:list");
    assert_eq!(
        jwt_payload(body["access_token"].as_str().unwrap())["aud"],
        serde_json::json!(["model-gw"])
    );

    // Intersection: a known scope not on the entry is dropped; alone it is refused.
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &[
            "grant_type=client_credentials",
            "scope=model:invoke tool:call",
        ],
    );
    assert_eq!((code, body["scope"].as_str()), (200, Some("model:invoke")));
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &["grant_type=client_credentials", "scope=tool:call"],
    );
    assert_eq!((code, body["error"].as_str()), (400, Some("invalid_scope")));
    // Unknown scope.
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &[
            "grant_type=client_credentials",
            "scope=model:invoke admin:all",
        ],
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("invalid_scope")),
        "{body}"
    );
    // Wrong grant type, duplicated parameter, mismatched client_id.
    let (code, body) = token_request(&s, &bundle, Some((&svid, &key)), &["grant_type=password"]);
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &["grant_type=client_credentials", "scope=a", "scope=b"],
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &[
            "grant_type=client_credentials",
            "client_id=spiffe://td.test/other",
        ],
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (401, Some("invalid_client"))
    );

    // No client certificate.
    let (code, body) = token_request(&s, &bundle, None, &["grant_type=client_credentials"]);
    assert_eq!(
        (code, body["error"].as_str()),
        (401, Some("invalid_client")),
        "{body}"
    );
    // A certificate from another CA, for the same SPIFFE ID.
    let (fc, fk) = foreign_svid(&tmp.path().join("foreign"), &app_id("agent"));
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&fc, &fk)),
        &["grant_type=client_credentials"],
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (401, Some("invalid_client")),
        "{body}"
    );
    // A valid SVID with no registration entry.
    let stray = tmp.path().join("stray");
    s.mint(&app_id("stray"), &stray);
    let (sc, sk, _) = files(&stray);
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&sc, &sk)),
        &["grant_type=client_credentials"],
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (401, Some("invalid_client"))
    );

    // Revoked by serial: refused; a fresh SVID for the same ID still works.
    let serial = minted["serial"].as_str().unwrap();
    let out2 = tmp.path().join("agent2");
    s.mint(&app_id("agent"), &out2);
    s.sigil_json(&["svid", "revoke", serial, "--reason", "key compromise"]);
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &["grant_type=client_credentials"],
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (401, Some("invalid_client")),
        "{body}"
    );
    let (svid2, key2, _) = files(&out2);
    let (code, _) = token_request(
        &s,
        &bundle,
        Some((&svid2, &key2)),
        &["grant_type=client_credentials"],
    );
    assert_eq!(code, 200);
    // Revoked by SPIFFE ID: every SVID issued so far is refused.
    s.sigil_json(&["svid", "revoke", &app_id("agent")]);
    let (code, _) = token_request(
        &s,
        &bundle,
        Some((&svid2, &key2)),
        &["grant_type=client_credentials"],
    );
    assert_eq!(code, 401);

    // Oversized body.
    let big = tmp.path().join("big-body");
    std::fs::write(
        &big,
        format!("grant_type=client_credentials&x={}", "a".repeat(200_000)),
    )
    .unwrap();
    let big_arg = format!("@{}", big.display());
    let (code, _) = token_request(&s, &bundle, Some((&svid2, &key2)), &[&big_arg]);
    assert_eq!(code, 413);

    // Every access token handed out was recorded first.
    let issued = s.sigil_json(&[
        "svid",
        "issued",
        "--spiffe-id",
        &app_id("agent"),
        "--limit",
        "100",
    ]);
    let tokens = issued
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "access-token")
        .count();
    assert_eq!(tokens, 4);
}

#[test]
fn join_tokens_work_once_and_node_csrs_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let jt = s.sigil_json(&["jointoken", "create", "--ttl", "10m"]);
        let token = jt["token"].as_str().unwrap().to_owned();
        let node_id = jt["node_id"].as_str().unwrap().to_owned();
        let node_key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = node_key.csr_der(None).unwrap();
        let mut anon = s.node_client(None).await;

        // Garbage CSR: refused without spending the token.
        let err = anon
            .attest(pb::AttestRequest {
                join_token: token.clone(),
                csr: b"garbage".to_vec(),
                tpm: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        // Unknown and garbage tokens.
        for bad in ["0000", "not a token\n", ""] {
            let err = anon
                .attest(pb::AttestRequest {
                    join_token: bad.into(),
                    csr: csr.clone(),
                    tpm: None,
                })
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                ),
                "{bad}: {err}"
            );
        }
        // First use works.
        let resp = anon
            .attest(pb::AttestRequest {
                join_token: token.clone(),
                csr: csr.clone(),
                tpm: None,
            })
            .await
            .unwrap()
            .into_inner();
        let svid = resp.svid.unwrap();
        assert_eq!(svid.spiffe_id, node_id);
        // Second use is refused.
        let err = anon
            .attest(pb::AttestRequest {
                join_token: token.clone(),
                csr: csr.clone(),
                tpm: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("already"), "{err}");

        // The node authenticates with its SVID from now on.
        let dir = tmp.path().join("node");
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("node.pem");
        let key = dir.join("node.key");
        std::fs::write(
            &cert,
            pem::encode(&pem::Pem::new("CERTIFICATE", svid.cert_chain[0].clone())),
        )
        .unwrap();
        std::fs::write(&key, node_key.pkcs8_pem()).unwrap();
        let mut node = s.node_client(Some((&cert, &key))).await;

        let mine = create_entry(&s, &app_id("mine"), &node_id, &[]);
        let theirs = create_entry(
            &s,
            &app_id("theirs"),
            &format!("spiffe://{TD}/sigil/node/other"),
            &[],
        );
        let entries = node
            .fetch_entries(pb::FetchEntriesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(entries.entries.len(), 1);
        assert_eq!(entries.entries[0].spiffe_id, app_id("mine"));

        let wkey = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let sign = |entry: &serde_json::Value, csr: Vec<u8>| pb::SignX509SvidsRequest {
            csrs: vec![pb::CsrForEntry {
                entry_id: entry["id"].as_str().unwrap().into(),
                csr,
            }],
        };
        // Its own entry: signed.
        let ok = node
            .sign_x509_svids(sign(&mine, wkey.csr_der(None).unwrap()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.svids[0].svid.as_ref().unwrap().spiffe_id, app_id("mine"));
        // Another node's entry: refused.
        let err = node
            .sign_x509_svids(sign(&theirs, wkey.csr_der(None).unwrap()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        // A CSR asking for a different SPIFFE ID than the entry's: refused.
        let other = sigil_core::SpiffeId::new(&app_id("theirs")).unwrap();
        let err = node
            .sign_x509_svids(sign(&mine, wkey.csr_der(Some(&other)).unwrap()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        // A CSR whose signature does not verify: refused.
        let mut bad = wkey.csr_der(None).unwrap();
        let n = bad.len();
        bad[n - 3] ^= 0x01;
        let err = node.sign_x509_svids(sign(&mine, bad)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        // JWT-SVID for its own entry; none without an audience.
        let jwt = node
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                entry_id: mine["id"].as_str().unwrap().into(),
                audience: vec!["model-gw".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(jwt_payload(&jwt.token)["sub"], app_id("mine"));
        let err = node
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                entry_id: mine["id"].as_str().unwrap().into(),
                audience: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // Workload SVIDs cannot call the node API.
        let wl = tmp.path().join("wl");
        s.mint(&app_id("mine"), &wl);
        let (wc, wk, _) = files(&wl);
        let mut as_workload = s.node_client(Some((&wc, &wk))).await;
        let err = as_workload
            .fetch_entries(pb::FetchEntriesRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        // Nor can anonymous callers or foreign certificates.
        let err = anon
            .fetch_entries(pb::FetchEntriesRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let (fc, fk) = foreign_svid(&tmp.path().join("f"), &node_id);
        let mut forged = s.node_client(Some((&fc, &fk))).await;
        let err = forged
            .fetch_entries(pb::FetchEntriesRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        // Evicted: the node can no longer obtain anything.
        s.sigil_json(&["node", "evict", &node_id]);
        let err = node
            .fetch_entries(pb::FetchEntriesRequest {})
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{err}"
        );
        let err = node
            .sign_x509_svids(sign(&mine, wkey.csr_der(None).unwrap()))
            .await
            .unwrap_err();
        assert!(matches!(
            err.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ));
    });
}

#[test]
fn malformed_admin_input_gets_a_clear_error_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let node = format!("spiffe://{TD}/sigil/node/n1");
    create_entry(&s, &app_id("keep"), &node, &[]);
    let before_entries = s.sigil_json(&["entry", "list"]);
    let before_issued = s.sigil_json(&["svid", "issued", "--limit", "1000"]);

    let long = format!("spiffe://{TD}/{}", "a".repeat(2100));
    let bad_ids = [
        "spiffe://TD.test/app",
        "spiffe://td.test/a/../b",
        "spiffe://td.test/a?x=1",
        "spiffe://td.test/a#f",
        "spiffe://td.test/",
        "http://td.test/app",
        long.as_str(),
    ];
    for id in bad_ids {
        let out = s.sigil(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            &node,
            "--selector",
            "unix:uid:1",
        ]);
        assert!(!out.status.success(), "{id} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid") || err.contains("SPIFFE"),
            "{id}: {err}"
        );
        let out = s.sigil(&[
            "svid",
            "mint",
            "--spiffe-id",
            id,
            "--out-dir",
            tmp.path().join("x").to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{id} minted");
    }
    // Unknown selector type and bad selector values.
    for sel in ["docker:label:x", "unix:uid:abc", "unix:sha256:XYZ"] {
        let out = s.sigil(&[
            "entry",
            "create",
            "--spiffe-id",
            &app_id("x"),
            "--parent-id",
            &node,
            "--selector",
            sel,
        ]);
        assert!(!out.status.success(), "{sel} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("selector"),
            "{sel}"
        );
    }
    // Unknown scope, foreign trust domain, TTL too short.
    for extra in [["--scope", "root:all"], ["--x509-ttl", "5s"]] {
        let out = s.sigil(&[
            "entry",
            "create",
            "--spiffe-id",
            &app_id("x"),
            "--parent-id",
            &node,
            "--selector",
            "unix:uid:1",
            extra[0],
            extra[1],
        ]);
        assert!(!out.status.success(), "{extra:?} accepted");
    }
    let out = s.sigil(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://other.test/x",
        "--parent-id",
        &node,
        "--selector",
        "unix:uid:1",
    ]);
    assert!(!out.status.success());
    // Duplicate entry: conflict.
    let out = s.sigil(&[
        "entry",
        "create",
        "--spiffe-id",
        &app_id("keep"),
        "--parent-id",
        &node,
        "--selector",
        "unix:uid:1000",
        "--group",
        "factory-floor",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("409"));

    // Raw API: garbage JSON, unknown fields, garbage CSR, CSR with a broken signature.
    let (code, body) = s.admin_raw("POST", "/v1/entries", b"{not json");
    assert_eq!(code, 400, "{body}");
    let (code, _) = s.admin_raw("POST", "/v1/entries", br#"{"spiffe_id":"spiffe://td.test/a","parent_id":"spiffe://td.test/n","selectors":["unix:uid:1"],"admin":true}"#);
    assert_eq!(code, 400);
    let garbage = serde_json::json!({"spiffe_id": app_id("g"), "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"});
    let (code, body) = s.admin_raw("POST", "/v1/svids/x509", garbage.to_string().as_bytes());
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("CSR"), "{body}");
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut der = key.csr_der(None).unwrap();
    let n = der.len();
    der[n - 2] ^= 0x40;
    let tampered = serde_json::json!({"spiffe_id": app_id("g"), "csr_pem": pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))});
    let (code, body) = s.admin_raw("POST", "/v1/svids/x509", tampered.to_string().as_bytes());
    assert_eq!(code, 400, "{body}");
    // A CSR asking for another ID than the one requested.
    let other = sigil_core::SpiffeId::new(&app_id("other")).unwrap();
    let mismatched = serde_json::json!({"spiffe_id": app_id("g"), "csr_pem": pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", key.csr_der(Some(&other)).unwrap()))});
    let (code, _) = s.admin_raw("POST", "/v1/svids/x509", mismatched.to_string().as_bytes());
    assert_eq!(code, 403);
    // Oversized admin body.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let (code, _) = s.admin_raw("POST", "/v1/entries", &big);
    assert_eq!(code, 413);
    // Bad entry id.
    let (code, _) = s.admin_raw("GET", "/v1/entries/not-a-uuid", b"");
    assert_eq!(code, 400);

    assert_eq!(s.sigil_json(&["entry", "list"]), before_entries);
    assert_eq!(
        s.sigil_json(&["svid", "issued", "--limit", "1000"]),
        before_issued
    );
}

#[test]
fn restart_keeps_entries_ca_and_issued_records() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start(&tmp.path().join("srv"), &[]);
    let node = format!("spiffe://{TD}/sigil/node/n1");
    let entry = create_entry(&s, &app_id("persist"), &node, &["model:invoke"]);
    let out = tmp.path().join("svid");
    let minted = s.mint(&app_id("persist"), &out);
    let bundle_before = s.bundle_pem();
    s.restart();
    assert_eq!(s.bundle_pem(), bundle_before, "CA must survive a restart");
    let shown = s.sigil_json(&["entry", "show", entry["id"].as_str().unwrap()]);
    assert_eq!(shown, entry);
    let issued = s.sigil_json(&["svid", "issued", "--spiffe-id", &app_id("persist")]);
    assert!(
        issued
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["serial_or_jti"] == minted["serial"])
    );
    // The SVID minted before the restart still verifies and still gets tokens.
    let (svid, key, bundle) = files(&out);
    let (code, body) = token_request(
        &s,
        &bundle,
        Some((&svid, &key)),
        &["grant_type=client_credentials"],
    );
    assert_eq!(code, 200, "{body}");
}

#[test]
fn ca_rotation_prepublishes_then_activates_and_keeps_the_old_key() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let before = tmp.path().join("before");
    s.mint(&app_id("r"), &before);
    let count = |pem: &str| pem.matches("BEGIN CERTIFICATE").count();
    assert_eq!(count(&s.bundle_pem()), 1);
    let prepared = s.sigil_json(&["ca", "rotate"]);
    assert_eq!(prepared["action"], "prepared");
    // Published, but not yet signing: a new SVID still chains to the old key only.
    assert_eq!(count(&s.bundle_pem()), 2);
    let mid = tmp.path().join("mid");
    s.mint(&app_id("r"), &mid);
    let old_ca = tmp.path().join("old.pem");
    std::fs::write(
        &old_ca,
        std::fs::read_to_string(before.join("bundle.pem")).unwrap(),
    )
    .unwrap();
    let (ok, _, _) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&old_ca)
        .arg(mid.join("svid.pem")));
    assert!(ok, "the prepared key must not sign yet");
    let activated = s.sigil_json(&["ca", "rotate"]);
    assert_eq!(activated["action"], "activated");
    assert_eq!(activated["key_id"], prepared["key_id"]);
    let after = tmp.path().join("after");
    s.mint(&app_id("r"), &after);
    let (ok, _, _) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&old_ca)
        .arg(after.join("svid.pem")));
    assert!(!ok, "after activation the new key signs");
    // Old key retained: both the old and the new SVID verify against the current bundle.
    let bundle = tmp.path().join("bundle-now.pem");
    std::fs::write(&bundle, s.bundle_pem()).unwrap();
    for d in [&before, &after] {
        let (ok, o, e) = run(Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&bundle)
            .arg(d.join("svid.pem")));
        assert!(ok, "{o}{e}");
    }
    let states = s.sigil_json(&["ca", "list"]);
    let x509: Vec<_> = states
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "x509")
        .map(|a| a["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(x509.len(), 2);
    assert!(x509.contains(&"active".to_owned()) && x509.contains(&"retired".to_owned()));
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("sigil.toml");
    for (text, key) in [
        (
            "trust_domain = \"td.test\"\nlisten_adr = \"x\"\n",
            "listen_adr",
        ),
        ("trust_domain = \"TD\"\n", "trust_domain"),
        (
            "trust_domain = \"td.test\"\ndatabase_url = \"mysql://x\"\n",
            "database_url",
        ),
        // A PostgreSQL URL the driver cannot read (here an sslmode libpq does not have) is a
        // configuration error before anything connects.
        (
            "trust_domain = \"td.test\"\ndatabase_url = \"postgres://u@h/db?sslmode=verify-everything\"\n",
            "database_url",
        ),
        (
            "trust_domain = \"td.test\"\nca_key_type = \"rsa\"\n",
            "ca_key_type",
        ),
        (
            "trust_domain = \"td.test\"\nmax_body_bytes = 1\n",
            "max_body_bytes",
        ),
        ("listen_addr = \"127.0.0.1:1\"\n", "trust_domain"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(common::sigil_bin())
            .args(["server", "--config"])
            .arg(&cfg)
            .args(["--data-dir", tmp.path().join("d").to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
    // Environment overrides are validated the same way.
    let out = Command::new(common::sigil_bin())
        .args([
            "server",
            "--trust-domain",
            "td.test",
            "--data-dir",
            tmp.path().join("d").to_str().unwrap(),
        ])
        .env("SIGIL_ACCESS_TOKEN_TTL_SECS", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("access_token_ttl_secs"));
}

#[test]
fn upstream_ca_and_ed25519_ca_sign_verifiable_svids() {
    let tmp = tempfile::tempdir().unwrap();
    // An upstream CA made elsewhere (here with sigil-pki), loaded from PEM files.
    let td = sigil_core::TrustDomain::new(TD).unwrap();
    let upstream =
        CertificateAuthority::generate(&td, KeyAlgorithm::EcdsaP256, now(), 86400).unwrap();
    let (cert, key) = (tmp.path().join("up.pem"), tmp.path().join("up.key"));
    std::fs::write(&cert, upstream.cert_pem()).unwrap();
    std::fs::write(&key, upstream.key_pkcs8_pem()).unwrap();
    let s = Server::start(
        &tmp.path().join("srv-up"),
        &[
            "--upstream-ca-cert",
            cert.to_str().unwrap(),
            "--upstream-ca-key",
            key.to_str().unwrap(),
        ],
    );
    let out = tmp.path().join("a");
    s.mint(&app_id("a"), &out);
    let (ok, o, e) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&cert)
        .arg(out.join("svid.pem")));
    assert!(ok, "SVID must chain to the upstream CA: {o}{e}");
    drop(s);

    let s = Server::start(&tmp.path().join("srv-ed"), &["--ca-key-type", "ed25519"]);
    let out = tmp.path().join("b");
    s.mint(&app_id("b"), &out);
    let (ok, o, e) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(out.join("bundle.pem"))
        .arg(out.join("svid.pem")));
    assert!(ok, "{o}{e}");
    let (_, text, _) = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out.join("bundle.pem")));
    assert!(text.contains("ED25519"), "{text}");
    // A mismatched upstream pair is refused at start (exit non-zero, clear message).
    let other = CertificateAuthority::generate(&td, KeyAlgorithm::EcdsaP256, now(), 86400).unwrap();
    std::fs::write(&key, other.key_pkcs8_pem()).unwrap();
    let out = Command::new(common::sigil_bin())
        .args([
            "server",
            "--trust-domain",
            TD,
            "--listen-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(tmp.path().join("srv-bad"))
        .args([
            "--upstream-ca-cert",
            cert.to_str().unwrap(),
            "--upstream-ca-key",
            key.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}

#[test]
fn policy_validate_accepts_the_demo_and_names_errors() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policy");
    let out = Command::new(common::sigil_bin())
        .args(["policy", "validate"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bad.cedar"),
        "permit(principal, action == Action::\"invok\", resource);",
    )
    .unwrap();
    let out = Command::new(common::sigil_bin())
        .args(["policy", "validate"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invok"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn policy_test_runs_cases_and_fails_on_a_wrong_expectation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policy");
    let out = Command::new(common::sigil_bin())
        .args(["policy", "test"])
        .arg(root.join("demo.tests.json"))
        .arg("--policies")
        .arg(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every case of the file ran and passed.
    let cases = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(root.join("demo.tests.json")).unwrap(),
    )
    .unwrap()
    .as_array()
    .unwrap()
    .len();
    assert!(cases >= 10, "{cases}");
    assert!(
        stdout.contains(&format!("{cases} passed, 0 failed")),
        "{stdout}"
    );
    // Flip one expectation: the run fails and names the case.
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("demo.tests.json")).unwrap();
    let flipped = text.replacen("\"expect\": \"deny\"", "\"expect\": \"allow\"", 1);
    let cases = tmp.path().join("cases.json");
    std::fs::write(&cases, flipped).unwrap();
    let out = Command::new(common::sigil_bin())
        .args(["policy", "test"])
        .arg(&cases)
        .arg("--policies")
        .arg(&root)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL  without the model:invoke scope"));
}
