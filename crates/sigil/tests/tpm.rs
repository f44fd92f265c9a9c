//! TPM 2.0 node attestation end to end: software TPMs (swtpm) manufactured with EK
//! certificates from a test CA, a real `sigil server` trusting that CA, real `sigil agent`s
//! attesting with `--attestor tpm`, and a workload fetching its SVID through the agent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
#[path = "../../sigil-tpm/tests/swtpm/mod.rs"]
mod swtpm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Agent, Server, TD, my_uid};
use sigil_tpm::{
    EkRoots, EventLogBuilder, TpmDevice, ek_public_endorsement, verify_ek_certificate,
};
use swtpm::{SwTpm, TestCa};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Measures a boot into the TPM and writes its event log to `log_path`; returns the node
/// SPIFFE ID the TPM's EK maps to.
fn boot(tpm: &SwTpm, roots_pem: &str, secure_boot: bool, log_path: &Path) -> String {
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    let mut log = EventLogBuilder::new();
    let d = log.event(0, 0x0000_0008, b"sigil test firmware 1.0");
    dev.extend_pcr(0, d).unwrap();
    let d = log.secure_boot(secure_boot);
    dev.extend_pcr(7, d).unwrap();
    for pcr in [0u8, 7] {
        let d = log.separator(u32::from(pcr));
        dev.extend_pcr(pcr, d).unwrap();
    }
    let d = log.event(4, 0x8000_0003, b"bootloader image");
    dev.extend_pcr(4, d).unwrap();
    std::fs::write(log_path, log.finish()).unwrap();
    // The node ID from the EK public area, as a TPM without a certificate gives it; where
    // the certificate verifies, its key must give the same hash.
    let ek_hash = ek_public_endorsement(&dev.ek_public().unwrap())
        .unwrap()
        .ek_hash;
    if let Ok(cert) = dev.ek_certificate()
        && let Ok(e) = verify_ek_certificate(&cert, &EkRoots::from_pem(roots_pem).unwrap(), now())
    {
        assert_eq!(
            e.ek_hash, ek_hash,
            "EK certificate and EK public area disagree"
        );
    }
    format!("spiffe://{TD}/sigil/node/tpm/{ek_hash}")
}

struct Setup {
    tmp: tempfile::TempDir,
    server: Server,
    ca: TestCa,
}

/// A server trusting a fresh test CA, requiring Secure Boot.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("ca"));
    // Manufacturing the first TPM creates the CA.
    ca.manufacture(&tmp.path().join("tpm-1"));
    let roots = tmp.path().join("ek-roots.pem");
    std::fs::write(&roots, ca.roots_pem()).unwrap();
    let server = Server::start(
        &tmp.path().join("srv"),
        &[
            "--tpm-ek-roots",
            roots.to_str().unwrap(),
            "--tpm-require-secure-boot",
        ],
    );
    Setup { tmp, server, ca }
}

fn wait_for_log(a: &Agent, needle: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if a.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_node_attests_serves_a_workload_and_keeps_its_id_across_a_reinstall() {
    let s = tokio::task::block_in_place(setup);
    let tmp = s.tmp.path();
    let tpm = SwTpm::start(&tmp.join("tpm-1"));
    let log_path = tmp.join("tpm-1.log");
    let node = boot(&tpm, &s.ca.roots_pem(), true, &log_path);
    assert!(node.starts_with(&format!("spiffe://{TD}/sigil/node/tpm/")));

    let workload = format!("spiffe://{TD}/edge-model");
    s.server.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &workload,
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);

    let agent_dir = tmp.join("agent");
    let a = tokio::task::block_in_place(|| {
        Agent::start_tpm(&s.server, &agent_dir, &tpm.tcti(), &log_path)
    });
    assert!(
        wait_for_log(&a, &node, Duration::from_secs(30)),
        "agent did not attest as {node}:\n{}",
        a.log_text()
    );

    // The workload gets its identity through the TPM-attested node.
    let c = spiffe::WorkloadApiClient::connect_to(a.endpoint())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let svid = loop {
        if let Ok(svid) = c.fetch_x509_svid().await {
            break svid;
        }
        assert!(
            Instant::now() < deadline,
            "no workload SVID; agent log:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(svid.spiffe_id().to_string(), workload);
    drop(c);

    // Reinstall: the agent's data is gone, the TPM is the same: the same node ID.
    drop(a);
    std::fs::remove_dir_all(&agent_dir).unwrap();
    let again_dir = tmp.join("agent-reinstalled");
    let again = tokio::task::block_in_place(|| {
        Agent::start_tpm(&s.server, &again_dir, &tpm.tcti(), &log_path)
    });
    assert!(
        wait_for_log(&again, &node, Duration::from_secs(30)),
        "reinstalled agent did not attest as {node}:\n{}",
        again.log_text()
    );
}

/// Starts an agent on a freshly manufactured TPM (EK certificate from `ca`) booted with
/// `secure_boot`; returns it once it has exited, with its log.
fn refused_agent(s: &Setup, ca: &TestCa, name: &str, secure_boot: bool) -> (Option<i32>, String) {
    let tmp = s.tmp.path();
    let state: PathBuf = tmp.join(name);
    ca.manufacture(&state);
    let tpm = SwTpm::start(&state);
    let log_path = tmp.join(format!("{name}.log"));
    boot(&tpm, &s.ca.roots_pem(), secure_boot, &log_path);
    let mut a = Agent::start_tpm(
        &s.server,
        &tmp.join(format!("agent-{name}")),
        &tpm.tcti(),
        &log_path,
    );
    let code = a.wait_exit(Duration::from_secs(30));
    (code, a.log_text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_an_untrusted_ek_and_secure_boot_disabled() {
    let s = tokio::task::block_in_place(setup);
    let other = TestCa::new(&s.tmp.path().join("other-ca"));

    let (code, log) = tokio::task::block_in_place(|| refused_agent(&s, &other, "untrusted", true));
    assert!(code.is_some_and(|c| c != 0), "agent kept running:\n{log}");
    assert!(log.contains("EK certificate refused"), "{log}");

    let (code, log) = tokio::task::block_in_place(|| refused_agent(&s, &s.ca, "no-sb", false));
    assert!(code.is_some_and(|c| c != 0), "agent kept running:\n{log}");
    assert!(log.contains("Secure Boot is not enabled"), "{log}");
}

/// Runs the TPM exchange by hand on `c` (no client certificate) for a fresh node key:
/// the `Attest` request to send, and the key.
async fn tpm_attest_request(
    c: &mut sigil_proto::node::v1::node_client::NodeClient<tonic::transport::Channel>,
    tpm: &SwTpm,
    log_path: &Path,
) -> (sigil_proto::node::v1::AttestRequest, sigil_pki::KeyPair) {
    use sigil_pki::{KeyAlgorithm, KeyPair};
    use sigil_proto::node::v1 as pb;
    let event_log = std::fs::read(log_path).unwrap();
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = key.csr_der(None).unwrap();
    let csr_key = sigil_pki::parse_csr(&csr)
        .unwrap()
        .public_key_der()
        .to_vec();
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    let ch = c
        .begin_tpm_attestation(pb::TpmAttestationRequest {
            ek_certificate: dev.ek_certificate().unwrap(),
            ak_public: dev.ak_public().to_vec(),
            ek_public: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let activated = dev
        .activate_credential(&ch.credential_blob, &ch.encrypted_secret)
        .unwrap();
    let pcrs: Vec<u8> = ch.pcrs.iter().map(|p| *p as u8).collect();
    let (quote, quote_signature) = dev
        .quote(&sigil_tpm::qualifying_data(&ch.nonce, &csr_key), &pcrs)
        .unwrap();
    drop(dev);
    let request = pb::AttestRequest {
        join_token: String::new(),
        csr,
        tpm: Some(pb::TpmEvidence {
            challenge_id: ch.challenge_id.clone(),
            activated_credential: activated,
            quote,
            quote_signature,
            event_log,
        }),
    };
    (request, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_challenge_is_answered_once_and_malformed_requests_are_refused() {
    use sigil_proto::node::v1 as pb;

    let s = tokio::task::block_in_place(setup);
    let tpm = SwTpm::start(&s.tmp.path().join("tpm-1"));
    let log_path = s.tmp.path().join("tpm-1.log");
    tokio::task::block_in_place(|| boot(&tpm, &s.ca.roots_pem(), true, &log_path));
    let mut c = s.server.node_client(None).await;
    let (request, _key) = tpm_attest_request(&mut c, &tpm, &log_path).await;
    let svid = c.attest(request.clone()).await.unwrap().into_inner();
    assert!(
        svid.svid
            .unwrap()
            .spiffe_id
            .starts_with(&format!("spiffe://{TD}/sigil/node/tpm/"))
    );

    // The same answer again: the challenge is spent.
    let err = c.attest(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("already answered"), "{err}");

    // A join token and TPM evidence at once.
    let mut both = request.clone();
    both.join_token = "some-token".into();
    let err = c.attest(both).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Garbage for an EK certificate and an AK.
    let err = c
        .begin_tpm_attestation(pb::TpmAttestationRequest {
            ek_certificate: b"not a certificate".to_vec(),
            ak_public: b"not a public area".to_vec(),
            ek_public: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_ek_roots_refuses_tpm_attestation() {
    use sigil_proto::node::v1 as pb;
    let tmp = tempfile::tempdir().unwrap();
    let server = tokio::task::block_in_place(|| Server::start(&tmp.path().join("srv"), &[]));
    let mut c = server.node_client(None).await;
    let err = c
        .begin_tpm_attestation(pb::TpmAttestationRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = c
        .attest(pb::AttestRequest {
            join_token: String::new(),
            csr: Vec::new(),
            tpm: Some(pb::TpmEvidence::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_node_re_attests_at_renewal_and_a_changed_boot_state_revokes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("ca"));
    ca.manufacture(&tmp.path().join("tpm-1"));
    let roots = tmp.path().join("ek-roots.pem");
    std::fs::write(&roots, ca.roots_pem()).unwrap();
    // The shortest node SVID lifetime: renewal (and re-attestation) after 60 s.
    let cfg = tmp.path().join("server.toml");
    std::fs::write(&cfg, "node_svid_ttl_secs = 120\n").unwrap();
    let server = tokio::task::block_in_place(|| {
        Server::start(
            &tmp.path().join("srv"),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--tpm-ek-roots",
                roots.to_str().unwrap(),
            ],
        )
    });
    let tpm = SwTpm::start(&tmp.path().join("tpm-1"));
    let log_path = tmp.path().join("tpm-1.log");
    let node = boot(&tpm, &ca.roots_pem(), true, &log_path);
    let workload = format!("spiffe://{TD}/edge-model");
    server.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &workload,
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);
    let mut a = tokio::task::block_in_place(|| {
        Agent::start_tpm(&server, &tmp.path().join("agent"), &tpm.tcti(), &log_path)
    });
    assert!(
        wait_for_log(&a, &node, Duration::from_secs(30)),
        "{}",
        a.log_text()
    );
    let c = spiffe::WorkloadApiClient::connect_to(a.endpoint())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.fetch_x509_svid().await.is_err() {
        assert!(Instant::now() < deadline, "no SVID:\n{}", a.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);

    // A renewal re-attests (fresh challenge, fresh quote) and, the boot state unchanged,
    // succeeds.
    assert!(
        tokio::task::block_in_place(|| wait_for_log(
            &a,
            "renewed the node SVID",
            Duration::from_secs(120)
        )),
        "no renewal:\n{}",
        a.log_text()
    );

    // Something is measured into PCR 7 that the event log does not explain.
    tokio::task::block_in_place(|| {
        let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
        dev.extend_pcr(7, [0x42; 32]).unwrap();
    });

    // Within one renewal period the renewal fails, the node is revoked and the agent,
    // evicted, drops its workloads' identities and stops.
    let code = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(120)));
    let log = a.log_text();
    assert!(code.is_some(), "agent still running:\n{log}");
    assert!(log.contains("TPM re-attestation failed"), "{log}");
    assert!(!a.socket.exists() || std::os::unix::net::UnixStream::connect(&a.socket).is_err());

    // The revocation is a transparency-log leaf naming the node and the reason.
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    let (ok, found, err) = common::run(std::process::Command::new(common::sigil_bin()).args([
        "log",
        "search",
        "--server",
        &server.url(""),
        "--ca",
        bundle.to_str().unwrap(),
        "--spiffe-id",
        &node,
    ]));
    assert!(ok, "{err}");
    assert!(
        found
            .lines()
            .any(|l| l.contains("revocation") && l.contains("TPM re-attestation failed")),
        "{found}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_without_an_ek_certificate_attests_only_when_its_ek_is_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("ca"));
    for name in ["pinned", "unpinned"] {
        ca.manufacture_without_ek_cert(&tmp.path().join(name));
    }
    let pinned = SwTpm::start(&tmp.path().join("pinned"));
    let unpinned = SwTpm::start(&tmp.path().join("unpinned"));
    let (pinned_log, unpinned_log) = (
        tmp.path().join("pinned.log"),
        tmp.path().join("unpinned.log"),
    );
    let node = tokio::task::block_in_place(|| {
        // No EK certificate, so no CA roots to check one against.
        boot(&unpinned, "", true, &unpinned_log);
        boot(&pinned, "", true, &pinned_log)
    });
    assert!(
        TpmDevice::open(&pinned.tcti())
            .unwrap()
            .ek_certificate()
            .is_err()
    );

    // What an administrator runs on the device: the hash to pin.
    let (ok, out, err) = common::run(std::process::Command::new(common::sigil_bin()).args([
        "tpm",
        "ek-hash",
        "--tpm-tcti",
        &pinned.tcti(),
    ]));
    assert!(ok, "{err}");
    let ek_hash = out.trim().to_owned();
    assert_eq!(node, format!("spiffe://{TD}/sigil/node/tpm/{ek_hash}"));

    // A server that trusts no manufacturer, only the pinned EK.
    let server = tokio::task::block_in_place(|| {
        Server::start(&tmp.path().join("srv"), &["--tpm-ek-hash", &ek_hash])
    });
    let a = tokio::task::block_in_place(|| {
        Agent::start_tpm(
            &server,
            &tmp.path().join("agent-pinned"),
            &pinned.tcti(),
            &pinned_log,
        )
    });
    assert!(
        tokio::task::block_in_place(|| wait_for_log(&a, &node, Duration::from_secs(30))),
        "pinned TPM did not attest as {node}:\n{}",
        a.log_text()
    );
    let nodes = server.sigil_json(&["node", "list"]);
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["spiffe_id"] == node.as_str()),
        "{nodes}"
    );

    let mut b = tokio::task::block_in_place(|| {
        Agent::start_tpm(
            &server,
            &tmp.path().join("agent-unpinned"),
            &unpinned.tcti(),
            &unpinned_log,
        )
    });
    let code = tokio::task::block_in_place(|| b.wait_exit(Duration::from_secs(30)));
    let log = b.log_text();
    assert!(
        code.is_some_and(|c| c != 0),
        "unpinned agent kept running:\n{log}"
    );
    assert!(log.contains("is not pinned"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_pcr_values_in_the_server_configuration_refuse_a_node_off_them() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("ca"));
    ca.manufacture(&tmp.path().join("tpm-1"));
    let roots = tmp.path().join("ek-roots.pem");
    std::fs::write(&roots, ca.roots_pem()).unwrap();
    let tpm = SwTpm::start(&tmp.path().join("tpm-1"));
    let log_path = tmp.path().join("tpm-1.log");
    tokio::task::block_in_place(|| boot(&tpm, &ca.roots_pem(), true, &log_path));
    // PCR 4 as this boot left it (read from the replayed log) is golden for one server;
    // another server wants another bootloader.
    let pcr4 = sigil_tpm::parse_event_log(&std::fs::read(&log_path).unwrap())
        .unwrap()
        .replay()
        .unwrap()
        .pcrs[4];
    let run = |name: &str, golden: String| {
        let server = Server::start(
            &tmp.path().join(format!("srv-{name}")),
            &[
                "--tpm-ek-roots",
                roots.to_str().unwrap(),
                "--tpm-golden-pcr",
                &golden,
            ],
        );
        let agent = Agent::start_tpm(
            &server,
            &tmp.path().join(format!("agent-{name}")),
            &tpm.tcti(),
            &log_path,
        );
        (server, agent)
    };
    let (_s1, mut a) =
        tokio::task::block_in_place(|| run("other", format!("4={}", "ab".repeat(32))));
    let code = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(30)));
    let log = a.log_text();
    assert!(code.is_some_and(|c| c != 0), "agent kept running:\n{log}");
    assert!(log.contains("PCR 4 is not its golden value"), "{log}");
    let (_s2, a) = tokio::task::block_in_place(|| run("same", format!("4={}", hex::encode(pcr4))));
    assert!(
        tokio::task::block_in_place(|| wait_for_log(
            &a,
            "/sigil/node/tpm/",
            Duration::from_secs(30)
        )),
        "agent with the golden PCR 4 did not attest:\n{}",
        a.log_text()
    );

    // A golden value for a PCR that is not quoted, or not a SHA-256, is a configuration
    // error (exit 64).
    for bad in ["9=00", &format!("9={}", "00".repeat(32)), "4=zz"] {
        let out = std::process::Command::new(common::sigil_bin())
            .args(["server", "--trust-domain", TD, "--data-dir"])
            .arg(tmp.path().join("srv-bad"))
            .args(["--listen-addr", "127.0.0.1:0", "--tpm-ek-roots"])
            .arg(&roots)
            .args(["--tpm-golden-pcr", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("tpm_golden_pcrs"),
            "{bad}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_require_node_selectors_reach_only_nodes_that_proved_them() {
    use sigil_proto::node::v1 as pb;
    let s = tokio::task::block_in_place(setup);
    let tmp = s.tmp.path();
    let tpm = SwTpm::start(&tmp.join("tpm-1"));
    let log_path = tmp.join("tpm-1.log");
    let node = tokio::task::block_in_place(|| boot(&tpm, &s.ca.roots_pem(), true, &log_path));
    let uid = format!("unix:uid:{}", my_uid());
    let entry = |name: &str, node_selector: &str| {
        let v = s.server.sigil_json(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://{TD}/{name}"),
            "--parent-id",
            &node,
            "--selector",
            &uid,
            "--selector",
            &format!("unix:path:/{name}"),
            "--node-selector",
            node_selector,
        ]);
        v["id"].as_str().unwrap().to_owned()
    };
    let secure = entry("needs-secure-boot", "tpm:secureboot:true");
    let golden = entry(
        "needs-other-pcr7",
        &format!("tpm:pcr:7:{}", "00".repeat(32)),
    );
    // A node selector that is not type:value is refused at creation.
    let out = s.server.sigil(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/x"),
        "--parent-id",
        &node,
        "--selector",
        &uid,
        "--node-selector",
        "secureboot",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node selector"),
        "{out:?}"
    );

    // The node attests (by hand, to hold its SVID) and the server stores its selectors.
    let mut anon = s.server.node_client(None).await;
    let (request, key) = tpm_attest_request(&mut anon, &tpm, &log_path).await;
    let svid = anon
        .attest(request)
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(svid.spiffe_id, node);
    let nodes = s.server.sigil_json(&["node", "list"]);
    let stored = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["spiffe_id"] == node.as_str())
        .unwrap()["selectors"]
        .clone();
    let stored: Vec<String> = serde_json::from_value(stored).unwrap();
    assert!(
        stored.contains(&"tpm:secureboot:true".to_owned()),
        "{stored:?}"
    );
    assert!(
        stored.iter().any(|x| x.starts_with("tpm:ek_hash:")),
        "{stored:?}"
    );
    assert!(
        stored.iter().any(|x| x.starts_with("tpm:pcr:7:")),
        "{stored:?}"
    );

    let (cert, key_path) = (tmp.join("node.pem"), tmp.join("node.key"));
    std::fs::write(
        &cert,
        pem::encode(&pem::Pem::new("CERTIFICATE", svid.cert_chain[0].clone())),
    )
    .unwrap();
    std::fs::write(&key_path, key.pkcs8_pem()).unwrap();
    let mut c = s.server.node_client(Some((&cert, &key_path))).await;

    // Sent to the node: only the entry whose node selectors it proved.
    let listed = c
        .fetch_entries(pb::FetchEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ids: Vec<&str> = listed.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec![secure.as_str()], "{listed:?}");
    let mut sync = c
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let update = sync.message().await.unwrap().unwrap();
    let ids: Vec<&str> = update.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec![secure.as_str()]);

    // Signed for the node: the same; the other is refused even when asked for by ID.
    let wkey = sigil_pki::KeyPair::generate(sigil_pki::KeyAlgorithm::EcdsaP256).unwrap();
    let sign = |id: &str| pb::SignX509SvidsRequest {
        csrs: vec![pb::CsrForEntry {
            entry_id: id.to_owned(),
            csr: wkey.csr_der(None).unwrap(),
        }],
    };
    let ok = c.sign_x509_svids(sign(&secure)).await.unwrap().into_inner();
    assert_eq!(ok.svids.len(), 1);
    let err = c.sign_x509_svids(sign(&golden)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("requires node selectors"), "{err}");
}
