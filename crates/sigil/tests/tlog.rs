//! The transparency log end to end: a real `sigil server`, SVIDs and JWT-SVIDs minted with
//! the CLI, then `sigil log verify` over HTTPS (every minted certificate included), and
//! tampered copies of the served files refused with the first bad index named.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Server, TD, run, sigil_bin};
use sigil_log::tiles::{decode_entry_bundle, encode_entry_bundle};

fn log_cmd(args: &[&str]) -> (bool, String, String) {
    run(Command::new(sigil_bin()).arg("log").args(args))
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// The one entry bundle of a log with fewer than 256 entries.
fn bundle_path(dir: &Path, size: usize) -> std::path::PathBuf {
    dir.join(format!("tile/entries/000.p/{size}"))
}

#[test]
fn issued_identities_are_logged_and_tampering_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), &[]);
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    let url = format!("https://localhost:{}", server.port);
    let bundle_s = bundle.to_str().unwrap();

    // The log's public key, as served.
    let (ok, vkey, err) = run(Command::new("curl")
        .args(["-sf", "--cacert", bundle_s])
        .arg(server.url("/log/key")));
    assert!(ok, "{err}");
    let vkey = vkey.trim().to_owned();
    assert!(vkey.starts_with(&format!("sigil.{TD}/log+")), "{vkey}");

    let mut certs = Vec::new();
    for i in 0..3 {
        let out = tmp.path().join(format!("svid{i}"));
        server.mint(&format!("spiffe://{TD}/tlog/w{i}"), &out);
        certs.push(out.join("svid.pem"));
        if i == 0 {
            // An older checkpoint, for the consistency check.
            let (ok, cp, err) = run(Command::new("curl")
                .args(["-sf", "--cacert", bundle_s])
                .arg(server.url("/log/checkpoint")));
            assert!(ok, "{err}");
            std::fs::write(tmp.path().join("old-checkpoint"), cp).unwrap();
        }
    }
    for i in 0..2 {
        server.sigil_json(&[
            "svid",
            "mint-jwt",
            "--spiffe-id",
            &format!("spiffe://{TD}/tlog/w{i}"),
            "--audience",
            "model-gw",
        ]);
    }

    let saved = tmp.path().join("saved");
    let old = tmp.path().join("old-checkpoint");
    let mut args = vec![
        "verify",
        "--server",
        &url,
        "--ca",
        bundle_s,
        "--key",
        &vkey,
        "--save-dir",
        saved.to_str().unwrap(),
        "--since-checkpoint",
        old.to_str().unwrap(),
    ];
    for c in &certs {
        args.extend(["--inclusion", c.to_str().unwrap()]);
    }
    let (ok, out, err) = log_cmd(&args);
    assert!(ok, "verify failed: {out}{err}");
    assert_eq!(out.matches("included at index").count(), 3, "{out}");
    assert!(out.contains("consistent with the checkpoint"), "{out}");

    // The server's own SVID, 3 minted SVIDs, 2 JWT-SVIDs.
    let cp = std::fs::read_to_string(saved.join("checkpoint")).unwrap();
    let size: usize = cp.lines().nth(1).unwrap().parse().unwrap();
    assert!(size >= 6, "{cp}");

    // Search: each minted ID has its SVID (and w0, w1 their JWT-SVIDs).
    let dir = saved.to_str().unwrap();
    let (ok, found, err) = log_cmd(&[
        "search",
        "--dir",
        dir,
        "--key",
        &vkey,
        "--spiffe-id",
        &format!("spiffe://{TD}/tlog/w0"),
    ]);
    assert!(ok, "{err}");
    let kinds: Vec<String> = found
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["record"]["kind"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(kinds, ["x509-svid", "jwt-svid"], "{found}");

    // The saved copy verifies offline too.
    let (ok, out, err) = log_cmd(&["verify", "--dir", dir, "--key", &vkey]);
    assert!(ok, "{out}{err}");

    let entries = decode_entry_bundle(&std::fs::read(bundle_path(&saved, size)).unwrap()).unwrap();
    assert_eq!(entries.len(), size);
    let tampered = |name: &str, edit: &dyn Fn(&Path)| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        copy_dir(&saved, &d);
        edit(&d);
        let (ok, out, err) = log_cmd(&["verify", "--dir", d.to_str().unwrap(), "--key", &vkey]);
        assert!(!ok, "{name}: tampered log verified: {out}");
        err
    };

    // One byte of entry 2 changed.
    let err = tampered("flip", &|d| {
        let mut e = entries.clone();
        e[2][5] ^= 0x01;
        std::fs::write(bundle_path(d, size), encode_entry_bundle(&e).unwrap()).unwrap();
    });
    assert!(err.contains("index 2:"), "{err}");

    // Entry 3 deleted.
    let err = tampered("drop", &|d| {
        let mut e = entries.clone();
        e.remove(3);
        std::fs::write(bundle_path(d, size), encode_entry_bundle(&e).unwrap()).unwrap();
    });
    assert!(err.contains("index 3:"), "{err}");

    // Entries 1 and 4 swapped.
    let err = tampered("swap", &|d| {
        let mut e = entries.clone();
        e.swap(1, 4);
        std::fs::write(bundle_path(d, size), encode_entry_bundle(&e).unwrap()).unwrap();
    });
    assert!(err.contains("index 1:"), "{err}");

    // Truncated: the last entry cut off.
    let err = tampered("truncate", &|d| {
        let e = &entries[..size - 1];
        std::fs::write(bundle_path(d, size), encode_entry_bundle(e).unwrap()).unwrap();
    });
    assert!(err.contains(&format!("index {}:", size - 1)), "{err}");

    // A checkpoint of the same tree signed by another key of the same name.
    let err = tampered("other-key", &|d| {
        let other = sigil_log::LogKey::from_seed(&format!("sigil.{TD}/log"), &[9u8; 32]).unwrap();
        let mut tree = sigil_log::MemoryTree::new();
        for e in &entries {
            tree.push(e);
        }
        let note = other.sign_checkpoint(tree.size(), tree.root()).unwrap();
        std::fs::write(d.join("checkpoint"), note).unwrap();
    });
    assert!(err.contains("checkpoint"), "{err}");

    // A certificate the log never saw (the CA certificate) is reported as not included.
    let (ok, _, err) = log_cmd(&[
        "verify",
        "--dir",
        dir,
        "--key",
        &vkey,
        "--inclusion",
        tmp.path().join("bundle.pem").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not in the log"), "{err}");
}
