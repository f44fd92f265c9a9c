//! Acceptance: every X.509-SVID issued appears in the transparency log, with its inclusion
//! proof checked. One run drives the issuance paths (the server's own SVID, a node SVID by
//! join-token attestation, a workload SVID through an agent, admin `svid mint`, admin
//! JWT-SVIDs) and some admin changes, then lists every issued identity (`sigil svid issued`)
//! and checks each against the log fetched and verified by `sigil log verify`: each
//! credential has its leaf, each X.509-SVID's inclusion proof verifies against the signed
//! checkpoint, and the log holds exactly the issued identities plus the change leaves.
//!
//! Not driven here: node SVID renewal and OAuth access tokens (their leaves are written by
//! the same `Issuer` path; see tests/tlog.rs and the issuance_log unit tests).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, Server, TD, my_uid, run, sigil_bin};
use sigil_log::tiles::decode_entry_bundle;
use sigil_log::{LogRecord, MemoryTree, leaf_hash, verify_checkpoint, verify_inclusion};

#[test]
fn every_issued_x509_svid_is_in_the_log_with_a_verified_inclusion_proof() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    let workload = format!("spiffe://{TD}/all/workload");
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &workload,
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);
    let mut agent = Agent::start(&s, &tmp.path().join("agent"), jt["token"].as_str());
    let issued_to = |id: &str| {
        s.sigil_json(&["svid", "issued", "--limit", "10000"])
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["spiffe_id"] == id)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(issued_to(&node) && issued_to(&workload)) {
        assert!(Instant::now() < deadline, "agent did not get its SVIDs");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut pems = Vec::new();
    for i in 0..2 {
        let out = tmp.path().join(format!("m{i}"));
        s.mint(&format!("spiffe://{TD}/all/minted{i}"), &out);
        pems.push(out.join("svid.pem"));
    }
    s.sigil_json(&[
        "svid",
        "mint-jwt",
        "--spiffe-id",
        &workload,
        "--audience",
        "aud",
    ]);
    s.sigil_json(&["svid", "revoke", &format!("spiffe://{TD}/all/minted1")]);
    agent.stop();

    let issued = s.sigil_json(&["svid", "issued", "--limit", "10000"]);
    let issued = issued.as_array().unwrap();
    let x509: Vec<_> = issued.iter().filter(|i| i["kind"] == "x509-svid").collect();
    for id in [
        format!("spiffe://{TD}/sigil/server"),
        node.clone(),
        workload.clone(),
    ] {
        assert!(x509.iter().any(|i| i["spiffe_id"] == id.as_str()), "{id}");
    }
    assert!(issued.iter().any(|i| i["kind"] == "jwt-svid"));

    // The whole log, verified by the CLI (signature, every entry, tiles, root), with the
    // minted certificates' inclusion.
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, s.bundle_pem()).unwrap();
    let (ok, vkey, err) = run(Command::new("curl")
        .args(["-sf", "--cacert", bundle.to_str().unwrap()])
        .arg(s.url("/log/key")));
    assert!(ok, "{err}");
    let vkey = vkey.trim().to_owned();
    let saved = tmp.path().join("saved");
    let url = format!("https://localhost:{}", s.port);
    let mut args = vec![
        "log".to_owned(),
        "verify".into(),
        "--server".into(),
        url,
        "--ca".into(),
        bundle.display().to_string(),
        "--key".into(),
        vkey.clone(),
        "--save-dir".into(),
        saved.display().to_string(),
    ];
    for p in &pems {
        args.extend(["--inclusion".into(), p.display().to_string()]);
    }
    let (ok, out, err) = run(Command::new(sigil_bin()).args(&args));
    assert!(ok, "{out}{err}");
    assert_eq!(out.matches("included at index").count(), 2, "{out}");

    // Every issued identity has its leaf; each X.509-SVID's inclusion proof verifies.
    let cp = verify_checkpoint(&std::fs::read(saved.join("checkpoint")).unwrap(), &vkey).unwrap();
    let size = usize::try_from(cp.size).unwrap();
    assert!(size < 256, "one entry bundle expected");
    let entries = decode_entry_bundle(
        &std::fs::read(saved.join(format!("tile/entries/000.p/{size}"))).unwrap(),
    )
    .unwrap();
    assert_eq!(entries.len(), size);
    let mut tree = MemoryTree::new();
    for e in &entries {
        tree.push(e);
    }
    assert_eq!(tree.root(), cp.root);
    let records: Vec<LogRecord> = entries
        .iter()
        .map(|e| LogRecord::from_bytes(e).unwrap())
        .collect();
    for i in issued {
        let serial = i["serial_or_jti"].as_str().unwrap();
        let at = records.iter().position(|r| match r {
            LogRecord::X509Svid(x) => {
                i["kind"] == "x509-svid"
                    && x.serial == serial
                    && i["thumbprint"] == x.cert_sha256.as_str()
                    && i["spiffe_id"] == x.spiffe_id.as_str()
            }
            LogRecord::Token(t) => i["kind"] == t.kind.as_str() && t.jti == serial,
            _ => false,
        });
        let at = at.unwrap_or_else(|| panic!("no leaf for {i}"));
        if i["kind"] == "x509-svid" {
            let index = u64::try_from(at).unwrap();
            let proof = tree.inclusion_proof(index, cp.size).unwrap();
            verify_inclusion(leaf_hash(&entries[at]), index, cp.size, &proof, cp.root).unwrap();
        }
    }
    // Nothing else: the issued identities plus the admin changes (join token, entry,
    // revocation) and the node's risk as its agent's posture reports set it (one leaf per
    // change of score or reasons, at times the test does not control).
    let changes: Vec<&str> = records
        .iter()
        .filter_map(|r| match r {
            LogRecord::Change(c) => Some(c.kind.as_str()),
            _ => None,
        })
        .collect();
    let admin: Vec<&str> = changes.iter().copied().filter(|k| *k != "risk").collect();
    assert_eq!(admin, ["join-token", "entry", "revocation"], "{records:?}");
    assert!(
        records.iter().all(|r| match r {
            LogRecord::Change(c) if c.kind == "risk" =>
                c.action.as_deref() == Some("posture") && c.score.is_some(),
            _ => true,
        }),
        "{records:?}"
    );
    assert_eq!(size, issued.len() + changes.len());
}
