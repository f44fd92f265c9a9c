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
use sigil_tpm::{EkRoots, EventLogBuilder, TpmDevice, verify_ek_certificate};
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
    let ek = dev.ek_certificate().unwrap();
    // The test CA may not verify (the untrusted case): the EK hash is then not needed.
    match verify_ek_certificate(&ek, &EkRoots::from_pem(roots_pem).unwrap(), now()) {
        Ok(e) => format!("spiffe://{TD}/sigil/node/tpm/{}", e.ek_hash),
        Err(_) => String::new(),
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_challenge_is_answered_once_and_malformed_requests_are_refused() {
    use sigil_pki::{KeyAlgorithm, KeyPair};
    use sigil_proto::node::v1 as pb;

    let s = tokio::task::block_in_place(setup);
    let tpm = SwTpm::start(&s.tmp.path().join("tpm-1"));
    let log_path = s.tmp.path().join("tpm-1.log");
    tokio::task::block_in_place(|| boot(&tpm, &s.ca.roots_pem(), true, &log_path));
    let event_log = std::fs::read(&log_path).unwrap();
    let mut c = s.server.node_client(None).await;

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
        csr: csr.clone(),
        tpm: Some(pb::TpmEvidence {
            challenge_id: ch.challenge_id.clone(),
            activated_credential: activated,
            quote,
            quote_signature,
            event_log,
        }),
    };
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
