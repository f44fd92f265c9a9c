//! Split-view detection: the agent verifies the transparency-log checkpoint of every sync
//! update against the last one it verified (consistency proof from the server), persists it,
//! and refuses, loudly, one that does not extend it.
//!
//! End to end: a real server and agent; the agent's held checkpoint follows the log as admin
//! changes are appended. Then the agent is shown a fork: its cached checkpoint is replaced by
//! one validly signed with the server's log key but for a different tree (what a server
//! showing different logs to different agents would have handed it before), and the next
//! sync update is refused as a split view. Unit-level: forked proofs and another key,
//! injected into the agent's verifier.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, Server, TD};
use sigil_agent::log_witness::{LogWitness, Offer, SplitView};
use sigil_agent::slotfile::SlotFile;
use sigil_log::{LogKey, MemoryTree, verify_checkpoint};

fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if e.file_name() == name {
            return Some(p);
        }
    }
    None
}

/// The agent's persisted witness state (`cache/log.slots`, its newest record).
fn witness_file(agent_dir: &Path) -> Option<Vec<u8>> {
    SlotFile::open(&agent_dir.join("cache/log.slots")).ok()??.1
}

fn held(agent_dir: &Path) -> Option<(String, u64)> {
    let f = witness_file(agent_dir)?;
    let v: serde_json::Value = serde_json::from_slice(&f).ok()?;
    let note = v["checkpoint"].as_str()?.to_owned();
    let size = note.lines().nth(1)?.parse().ok()?;
    Some((note, size))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server and an agent joined to it (in `dir/srv`, `dir/agent`): the server, the agent's
/// node ID, its data directory and the agent.
fn server_and_agent(dir: &Path) -> (Server, String, std::path::PathBuf, Agent) {
    let s = Server::start(&dir.join("srv"), &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    let agent_dir = dir.join("agent");
    let a = Agent::start(&s, &agent_dir, jt["token"].as_str());
    (s, node, agent_dir, a)
}

/// Registers `spiffe://<TD>/sv/<name>` under `node` (an admin change: a logged leaf that
/// the sync streams send).
fn create_entry(s: &Server, node: &str, name: &str) {
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/sv/{name}"),
        "--parent-id",
        node,
        "--selector",
        "unix:uid:4242",
    ]);
}

#[test]
fn agent_follows_the_log_and_refuses_a_forked_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, node, dir, mut a) = server_and_agent(tmp.path());

    // The vkey the server serves is the one the agent pinned, and its checkpoint verifies.
    let vkey = std::fs::read_to_string(find_file(&s.dir, "log.key").unwrap()).unwrap();
    let log_key = LogKey::from_skey(vkey.trim()).unwrap();
    wait_for("a held checkpoint", || held(&dir).is_some());
    let (note, size0) = held(&dir).unwrap();
    verify_checkpoint(note.as_bytes(), log_key.vkey()).unwrap();
    let pinned: serde_json::Value = serde_json::from_slice(&witness_file(&dir).unwrap()).unwrap();
    assert_eq!(pinned["vkey"].as_str().unwrap(), log_key.vkey());

    // An admin change (a logged leaf) wakes the sync stream: the agent moves forward, with a
    // consistency proof.
    for i in 0..3 {
        create_entry(&s, &node, &format!("w{i}"));
    }
    wait_for("the held checkpoint to grow", || {
        held(&dir).is_some_and(|(_, n)| n >= size0 + 3)
    });
    assert!(!a.log_text().contains("SPLIT VIEW"), "{}", a.log_text());

    // A fork: the agent was shown (before) a tree of the same key that is not a prefix of
    // the server's. Its next update must be refused and the forked checkpoint kept.
    a.stop();
    let (_, size) = held(&dir).unwrap();
    let mut fake = MemoryTree::new();
    for i in 0..size {
        fake.push(format!("forked leaf {i}").as_bytes());
    }
    let forked = log_key.sign_checkpoint(size, fake.root()).unwrap();
    let file = serde_json::json!({
        "vkey": log_key.vkey(),
        "checkpoint": String::from_utf8(forked.clone()).unwrap(),
    });
    let (mut f, _) = SlotFile::open(&dir.join("cache/log.slots"))
        .unwrap()
        .unwrap();
    f.write(file.to_string().as_bytes()).unwrap();
    drop(f);
    a.restart();
    create_entry(&s, &node, "after-fork");
    wait_for("the split view to be reported", || {
        a.log_text().contains("SPLIT VIEW")
    });
    let (kept, _) = held(&dir).unwrap();
    assert_eq!(
        kept.as_bytes(),
        &forked[..],
        "the old checkpoint must be kept"
    );
    a.stop();
}

#[test]
fn a_log_grown_between_updates_is_proven_in_the_next_update_without_a_fetch() {
    // Issuances grow the log; the authority's snapshots move on (each second) past the
    // last checkpoint the agent was sent, without an update. The next update must carry
    // the proof from the checkpoint the agent holds: a fleet of agents would otherwise each
    // fetch one from the authority at once (before the fix: `old=7 new=9 carried_from=8`).
    let tmp = tempfile::tempdir().unwrap();
    let (s, node, dir, mut a) = server_and_agent(tmp.path());
    wait_for("a held checkpoint", || held(&dir).is_some());
    let (_, size0) = held(&dir).unwrap();
    for i in 0..4 {
        s.mint(
            &format!("spiffe://{TD}/minted/{i}"),
            &tmp.path().join(format!("m{i}")),
        );
    }
    // Past two of the authority's periodic refreshes.
    std::thread::sleep(Duration::from_millis(2500));
    create_entry(&s, &node, "after-issuances");
    wait_for("the held checkpoint to cover the issuances", || {
        held(&dir).is_some_and(|(_, n)| n >= size0 + 5)
    });
    let log = a.log_text();
    assert!(
        !log.contains("fetching a log consistency proof"),
        "the update carried no proof from the held checkpoint:\n{log}"
    );
    assert!(!log.contains("SPLIT VIEW"), "{log}");
    a.stop();
}

fn tree(n: u8, fork_at: u8) -> MemoryTree {
    let mut t = MemoryTree::new();
    for i in 0..n {
        t.push(&[i, u8::from(i >= fork_at)]);
    }
    t
}

#[test]
fn injected_forks_and_foreign_keys_are_refused_and_the_old_checkpoint_kept() {
    let key = LogKey::from_seed(&format!("sigil.{TD}/log"), &[9; 32]).unwrap();
    let honest = tree(40, 100);
    let cp = |t: &MemoryTree, n: u64| key.sign_checkpoint(n, t.root_at(n).unwrap()).unwrap();
    let mut w = LogWitness::new();
    assert_eq!(
        w.offer(&cp(&honest, 10), key.vkey()),
        Ok(Offer::Done { changed: true })
    );
    // Honest growth 10 -> 33.
    assert_eq!(
        w.offer(&cp(&honest, 33), key.vkey()),
        Ok(Offer::NeedProof { old: 10, new: 33 })
    );
    let p = honest.consistency_proof(10, 33).unwrap();
    assert_eq!(w.finish(&cp(&honest, 33), key.vkey(), &p), Ok(true));

    // A fork before the held size, with its own (internally valid) proof, and with the
    // honest proof: both refused.
    let forked = tree(40, 20);
    let fcp = cp(&forked, 40);
    assert_eq!(
        w.offer(&fcp, key.vkey()),
        Ok(Offer::NeedProof { old: 33, new: 40 })
    );
    for proof in [
        forked.consistency_proof(33, 40).unwrap(),
        honest.consistency_proof(33, 40).unwrap(),
        vec![],
    ] {
        assert!(matches!(
            w.finish(&fcp, key.vkey(), &proof),
            Err(SplitView::Fork {
                old_size: 33,
                new_size: 40,
                ..
            })
        ));
    }
    assert_eq!(w.held(), Some((33, honest.root_at(33).unwrap())));
    assert!(w.split_view().is_some());

    // Another key: refused whether the update names it or not.
    let other = LogKey::from_seed(&format!("sigil.{TD}/log"), &[10; 32]).unwrap();
    let by_other = other.sign_checkpoint(40, honest.root()).unwrap();
    assert!(matches!(
        w.offer(&by_other, other.vkey()),
        Err(SplitView::OtherKey(_))
    ));
    assert!(matches!(
        w.offer(&by_other, key.vkey()),
        Err(SplitView::OtherKey(_))
    ));
    // The honest continuation is still accepted after the refusals.
    let p = honest.consistency_proof(33, 40).unwrap();
    assert_eq!(w.finish(&cp(&honest, 40), key.vkey(), &p), Ok(true));
    assert_eq!(w.held(), Some((40, honest.root())));
}
