//! HA on PostgreSQL (issue 6, item 4): two `sigil server` replicas on one database (a fresh
//! schema per test), the same key-encryption key; an agent connected to replica 2 gets what is
//! pushed through replica 1 (LISTEN/NOTIFY); SVIDs of both replicas verify against the one
//! bundle; replica 1 SIGKILLed during a series of pushes: the agent never goes down a revision
//! and reaches the last one; then replica 2 killed and replica 1 restarted: the agent fails
//! over back. Skipped (not failed) when `SIGIL_TEST_POSTGRES_URL` is unset.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, TD, run};

const PG_ENV: &str = "SIGIL_TEST_POSTGRES_URL";

const POLICY: &str = "permit (principal == Workload::\"spiffe://td.test/agent\", action == Action::\"http\", resource);\n";

/// A fresh schema on the test PostgreSQL, dropped at the end.
struct Schema {
    base: String,
    name: String,
}

impl Schema {
    fn create(test: &str) -> Option<Self> {
        let Ok(base) = std::env::var(PG_ENV) else {
            let _ = writeln!(
                std::io::stderr(),
                "{test} skipped: set {PG_ENV} (e.g. postgres://postgres@127.0.0.1:5432/test)"
            );
            return None;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("sigil_ha_{}_{nanos}", std::process::id());
        let s = Self { base, name };
        s.psql(&format!("CREATE SCHEMA {}", s.name));
        Some(s)
    }

    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-c%20search_path%3D{}", self.base, self.name)
    }

    fn psql(&self, sql: &str) -> String {
        let (ok, out, err) = run(Command::new("psql").arg(&self.base).args([
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        ]));
        assert!(ok, "psql {sql}: {err}");
        out.trim().to_owned()
    }

    fn max_revision(&self) -> i64 {
        self.psql(&format!(
            "SELECT COALESCE(MAX(revision), 0) FROM {}.policy_bundles",
            self.name
        ))
        .parse()
        .unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(&self.base)
            .args([
                "-c",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            ])
            .output();
    }
}

/// An agent given several servers (`--server a,b`), started here rather than with
/// `common::Agent`, which takes one port.
struct HaAgent {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl HaAgent {
    fn start(dir: &Path, servers: &[u16], join_token: &str, bundle_pem: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let bundle = dir.with_extension("bootstrap.pem");
        std::fs::write(&bundle, bundle_pem).unwrap();
        let socket = dir.with_extension("sock.d").join("api.sock");
        let log = dir.with_extension("log");
        let list: Vec<String> = servers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let child = Command::new(common::sigil_bin())
            .args(["agent", "--trust-domain", TD, "--server", &list.join(",")])
            .arg("--data-dir")
            .arg(dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--trust-bundle")
            .arg(&bundle)
            .args(["--join-token", join_token])
            .env("SIGIL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            dir: dir.to_owned(),
            log,
        }
    }

    /// The highest policy revision the agent accepted (its persisted anti-rollback record).
    fn revision(&self) -> i64 {
        revision_in(&self.dir)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn revision_in(dir: &Path) -> i64 {
    sigil_agent::slotfile::SlotFile::open(&dir.join("cache").join("policy-state.slots"))
        .ok()
        .flatten()
        .and_then(|(_, b)| b)
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["revision"].as_i64())
        .unwrap_or(0)
}

impl Drop for HaAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t0.elapsed()
}

fn push(socket: &Path, dir: &Path, n: usize) -> Result<i64, String> {
    std::fs::create_dir_all(dir).unwrap();
    // Each push differs (a comment), so every revision has its own content.
    std::fs::write(dir.join("p.cedar"), format!("// push {n}\n{POLICY}")).unwrap();
    let out = Command::new(common::sigil_bin())
        .args(["policy", "push"])
        .arg(dir)
        .args(["--ttl", "1h", "--output", "json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get("revision")?.as_i64())
        .ok_or_else(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn sigkill(s: &Server) {
    let pid = s.pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn two_replicas_share_keys_propagate_changes_and_agents_fail_over() {
    let Some(db) = Schema::create("two_replicas_share_keys_propagate_changes_and_agents_fail_over")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // One key-encryption key for both replicas: 32 random bytes, 0600.
    let kek = tmp.path().join("kek");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&kek)
            .unwrap();
        let mut key = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key)
            .unwrap();
        f.write_all(&key).unwrap();
        drop(f);
    }
    let url = db.url();
    let cfg = |name: &str| {
        let p = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "key_encryption_key_file = {:?}\n",
                kek.display().to_string()
            ),
        )
        .unwrap();
        p
    };
    let (c1, c2) = (cfg("r1"), cfg("r2"));
    let args = |c: &PathBuf| -> Vec<String> {
        vec![
            "--config".into(),
            c.display().to_string(),
            "--database-url".into(),
            url.clone(),
        ]
    };
    let a1 = args(&c1);
    let a2 = args(&c2);
    // Both start at once: only one may create the CA and keys (the bootstrap lock).
    let d1 = tmp.path().join("r1");
    let d2 = tmp.path().join("r2");
    let (mut r1, mut r2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| Server::start(&d1, &strs(&a1)));
        let h2 = s.spawn(|| Server::start(&d2, &strs(&a2)));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    let _ = &mut r2;

    // Shared keys: one bundle, one CA; SVIDs minted by either verify against it.
    let bundle = r1.bundle_pem();
    assert_eq!(
        bundle,
        r2.bundle_pem(),
        "the replicas publish different bundles"
    );
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    let bundle_file = tmp.path().join("bundle.pem");
    std::fs::write(&bundle_file, &bundle).unwrap();
    for (r, name) in [(&r1, "one"), (&r2, "two")] {
        let out = tmp.path().join(format!("svid-{name}"));
        r.mint(&format!("spiffe://{TD}/app/{name}"), &out);
        let (ok, o, e) = run(Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&bundle_file)
            .arg(out.join("svid.pem")));
        assert!(ok, "SVID of replica {name} does not verify: {o} {e}");
    }
    // No private key in the clear in the database, none in the key directories.
    let sealed = db.psql(&format!(
        "SELECT string_agg(sealed, ' ') FROM {}.sealed_keys",
        db.name
    ));
    assert!(
        sealed.starts_with("v1:") && !sealed.contains("PRIVATE"),
        "{sealed}"
    );
    for d in [&d1, &d2] {
        for f in std::fs::read_dir(d.join("keys")).unwrap() {
            let name = f.unwrap().file_name().into_string().unwrap();
            assert!(!name.ends_with(".key.pem"), "{name} in {}", d.display());
        }
    }

    // An agent on replica 2 (replica 1 second in its list).
    let jt = r1.sigil_json(&["jointoken", "create"]);
    let agent = HaAgent::start(
        &tmp.path().join("agent"),
        &[r2.port, r1.port],
        jt["token"].as_str().unwrap(),
        &bundle,
    );
    wait_until(
        "the agent syncs with replica 2",
        Duration::from_secs(20),
        || {
            agent.log_text().contains(&format!("127.0.0.1:{}", r2.port))
                && agent.log_text().contains("connected; syncing")
        },
    );

    // Pushed through replica 1, delivered by replica 2.
    let pol = tmp.path().join("pol");
    let mut latencies = Vec::new();
    for n in 0..5 {
        let t0 = Instant::now();
        let rev =
            push(&r1.socket, &pol, n).unwrap_or_else(|e| panic!("push through replica 1: {e}"));
        wait_until(
            &format!("revision {rev} reaches the agent on replica 2"),
            Duration::from_secs(5),
            || agent.revision() >= rev,
        );
        latencies.push(t0.elapsed());
    }
    eprintln!("push via replica 1 -> agent on replica 2: {latencies:?}");

    // Watch the agent's revision: it must never go down.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicI64::new(agent.revision()));
    let went_down = Arc::new(Mutex::new(None));
    let watcher = {
        let (stop, seen, went_down, dir) = (
            stop.clone(),
            seen.clone(),
            went_down.clone(),
            agent.dir.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let r = revision_in(&dir);
                let before = seen.fetch_max(r, Ordering::SeqCst);
                if r < before {
                    *went_down.lock().unwrap() = Some((before, r));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // A series of pushes through replica 1; SIGKILL it in the middle of one.
    let pusher = {
        let (socket, pol) = (r1.socket.clone(), pol.clone());
        std::thread::spawn(move || {
            let mut ok = Vec::new();
            for n in 100..400 {
                match push(&socket, &pol, n) {
                    Ok(r) => ok.push(r),
                    Err(_) => break,
                }
            }
            ok
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    sigkill(&r1);
    let acked = pusher.join().unwrap();
    assert!(!acked.is_empty(), "no push succeeded before the kill");
    // Every committed change (acknowledged or cut off after its commit) is delivered.
    let last = db.max_revision();
    assert!(last >= *acked.last().unwrap());
    wait_until(
        &format!("the agent reaches the last revision {last}"),
        Duration::from_secs(10),
        || agent.revision() >= last,
    );
    eprintln!(
        "{} pushes acknowledged before SIGKILL; last committed revision {last}",
        acked.len()
    );

    // Replica 2 down, replica 1 back: the agent fails over to it.
    sigkill(&r2);
    r1.restart();
    let after = push(&r1.socket, &pol, 1000)
        .unwrap_or_else(|e| panic!("push through the restarted replica 1: {e}"));
    wait_until(
        "the agent fails over to replica 1 and gets the new revision",
        Duration::from_secs(20),
        || agent.revision() >= after,
    );
    assert!(
        agent.log_text().contains("failing over"),
        "{}",
        agent.log_text()
    );

    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert_eq!(
        *went_down.lock().unwrap(),
        None,
        "the agent went down a revision"
    );
    assert_eq!(agent.revision(), after);
    drop(r2);
}

#[test]
fn postgres_without_a_key_encryption_key_is_refused() {
    let Some(db) = Schema::create("postgres_without_a_key_encryption_key_is_refused") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(common::sigil_bin())
        .args(["server", "--trust-domain", TD, "--data-dir"])
        .arg(tmp.path().join("srv"))
        .args(["--listen-addr", "127.0.0.1:0", "--database-url", &db.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_encryption_key_file"));
}
