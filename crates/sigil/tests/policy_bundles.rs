//! End-to-end tests of signed policy bundles (issue 6): `sigil policy push` → server → the
//! agent's sync stream → the agent's Enforcer API → `sigil proxy` with
//! `policy_source = "agent"`. Bad bundles are fed to the agent through the server's own
//! database (what a restored backup or a tampered database would serve): tampered, signed by
//! another key, expired, the same revision with other content, and an older revision — each
//! refused, the last good bundle still enforced, also across an agent restart. Finally the
//! server is stopped: the proxy enforces the last bundle until its expiry, then answers 503.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::proxy::{Client, register_entry};
use common::upstream::Upstream;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Agent, Server, TD, free_port, run};
use sigil_policy::bundle::{BundleContent, Envelope, PolicySigner};

const ALLOW_HTTP: &str = r#"@id("allow-http")
permit (principal == Workload::"spiffe://td.test/agent", action == Action::"http", resource);
"#;
const ONLY_MODELS: &str = r#"@id("only-models")
permit (principal == Workload::"spiffe://td.test/agent", action == Action::"list_models", resource);
"#;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Proxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Proxy {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A registered client with a minted SVID and a bound token.
fn client(s: &Server, name: &str, dir: &Path) -> Client {
    Client::new(s, &register_entry(s, name, None), dir)
}

/// `curl` through the proxy: (HTTP status, body).
fn call(p: &Proxy, c: &Client, path: &str) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "--cacert"])
        .arg(&c.bundle)
        .arg("--cert")
        .arg(&c.cert)
        .arg("--key")
        .arg(&c.key)
        .args(["-H", &format!("Authorization: Bearer {}", c.token)])
        .arg(format!("https://localhost:{}{path}", p.port));
    let (_, out, _) = run(&mut cmd);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Polls `f` until it is true; the time it took.
fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
    t0.elapsed()
}

fn push(s: &Server, dir: &Path, policy: &str, ttl: &str) -> i64 {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("p.cedar"), policy).unwrap();
    let v = s.sigil_json(&["policy", "push", dir.to_str().unwrap(), "--ttl", ttl]);
    v["revision"].as_i64().unwrap()
}

/// Runs SQL on the server's SQLite database, behind its back (python3's sqlite3).
fn db(s_dir: &Path, sql: &str, args: &[String]) {
    let script = "import sqlite3, sys\n\
        c = sqlite3.connect(sys.argv[1], timeout=10)\n\
        c.execute(sys.argv[2], sys.argv[3:])\n\
        c.commit()\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(s_dir.join("sigil.db"))
        .arg(sql)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stores `envelope` as the server's bundle of `revision` (replacing any).
fn store_bundle(s_dir: &Path, revision: i64, envelope: &str) {
    db(
        s_dir,
        "DELETE FROM policy_bundles WHERE revision = ?",
        &[revision.to_string()],
    );
    db(
        s_dir,
        "INSERT INTO policy_bundles (revision, envelope, payload_sha256, key_id, not_after, created_at) \
         VALUES (?, ?, 'x', 'x', 0, 0)",
        &[revision.to_string(), envelope.to_owned()],
    );
}

/// The server's policy key, read from its key directory (to sign crafted bundles as the
/// server would).
fn server_policy_key(s_dir: &Path) -> PolicySigner {
    let keys = s_dir.join("keys");
    let file = std::fs::read_dir(&keys)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("policy-")
        })
        .expect("no policy key file");
    PolicySigner::from_pkcs8_pem(&std::fs::read_to_string(file).unwrap()).unwrap()
}

fn content(revision: u64, policy: &str, not_after: i64) -> BundleContent {
    BundleContent {
        not_after,
        not_before: now() - 5,
        policies: BTreeMap::from([("p.cedar".to_owned(), policy.to_owned())]),
        rate_limits: None,
        revision,
        schema: sigil_policy::SCHEMA.to_owned(),
        trust_domain: TD.to_owned(),
    }
}

/// The envelope with one character of its payload changed.
fn tampered(envelope: &str) -> String {
    let mut e: Envelope = serde_json::from_str(envelope).unwrap();
    let mut chars: Vec<char> = e.payload.chars().collect();
    let n = chars.len() / 2;
    chars[n] = if chars[n] == 'A' { 'B' } else { 'A' };
    e.payload = chars.into_iter().collect();
    serde_json::to_string(&e).unwrap()
}

/// Makes the server send a sync update (any change will do: a new entry).
fn poke(s: &Server, n: usize) {
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/poke-{n}"),
        "--parent-id",
        &format!("spiffe://{TD}/sigil/node/n"),
        "--selector",
        &format!("unix:uid:{}", 10_000 + n),
    ]);
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Everything running: server, agent, a client, an upstream, the proxy (agent mode).
struct World {
    s: Server,
    srv_dir: PathBuf,
    agent: Agent,
    c: Client,
    pol: PathBuf,
    p: Proxy,
    _up: Upstream,
}

/// Starts the world; `before_proxy` runs once the server and agent are up.
fn start_world(dir: &Path, before_proxy: impl FnOnce(&Server, &Path)) -> World {
    let srv_dir = dir.join("srv");
    let s = Server::start(&srv_dir, &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    let proxy_id = format!("spiffe://{TD}/proxy");
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &proxy_id,
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", common::my_uid()),
        "--dns",
        "localhost",
        "--enforcer",
    ]);
    let agent = Agent::start(&s, &dir.join("agent"), jt["token"].as_str());
    let c = client(&s, "agent", &dir.join("client"));
    let up = Upstream::start();
    let pol = dir.join("pol");

    // The trust bundle publishes the policy key.
    let bundle = s.sigil_json(&["bundle", "show"]);
    assert!(
        bundle["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["use"] == "sigil-policy"),
        "{bundle}"
    );

    before_proxy(&s, &pol);
    let port = free_port();
    let plog = dir.join("proxy.log");
    let audit = dir.join("audit.log");
    let child = Command::new(common::sigil_bin())
        .args(["proxy", "--trust-domain", TD])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &format!("http://127.0.0.1:{}", up.port)])
        .args(["--audience", "model-gw", "--issuer", &s.url("")])
        .arg("--workload-api-socket")
        .arg(format!("unix://{}", agent.socket.display()))
        .args(["--spiffe-id", &proxy_id, "--policy-source", "agent"])
        .arg("--audit-log")
        .arg(&audit)
        .env("SIGIL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&plog).unwrap())
        .spawn()
        .unwrap();
    let p = Proxy {
        child,
        port,
        log: plog,
    };
    wait_until("the proxy listens", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    World {
        s,
        srv_dir,
        agent,
        c,
        pol,
        p,
        _up: up,
    }
}

#[test]
fn signed_bundles_propagate_are_never_rolled_back_and_expire_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let World {
        mut s,
        srv_dir,
        mut agent,
        c,
        pol,
        p,
        _up,
    } = start_world(tmp.path(), |s, pol| {
        // An invalid set is refused with the validator's reasons, and takes no revision.
        std::fs::create_dir_all(pol).unwrap();
        std::fs::write(
            pol.join("p.cedar"),
            "permit (principal, action == Action::\"no_such_action\", resource);",
        )
        .unwrap();
        let out = s.sigil(&["policy", "push", pol.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no_such_action"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        assert_eq!(push(s, pol, ALLOW_HTTP, "1h"), 1);
    });
    // Revision 1 is enforced: plain HTTP allowed, listing models denied.
    wait_until("revision 1 enforced", Duration::from_secs(10), || {
        call(&p, &c, "/v1/echo").0 == 200
    });
    assert_eq!(call(&p, &c, "/v1/models").0, 403);
    assert_eq!(floor_revision(tmp.path()), Some(1));

    // A new revision is enforced within a second or two of the push.
    let t0 = Instant::now();
    assert_eq!(push(&s, &pol, ONLY_MODELS, "1h"), 2);
    wait_until("revision 2 enforced", Duration::from_secs(3), || {
        call(&p, &c, "/v1/echo").0 == 403
    });
    let took = t0.elapsed();
    eprintln!("push → enforced at the proxy: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(push(&s, &pol, ALLOW_HTTP, "1h"), 3);
    wait_until("revision 3 enforced", Duration::from_secs(3), || {
        call(&p, &c, "/v1/echo").0 == 200
    });

    // Bad bundles, served by the server from its (tampered) database: each refused by the
    // agent, and revision 3 stays in force at the proxy.
    let key = server_policy_key(&srv_dir);
    let other = PolicySigner::generate().unwrap();
    let good4 = key.sign(&content(4, ONLY_MODELS, now() + 3600)).unwrap();
    let cases: [(i64, String, &str); 3] = [
        (4, tampered(&good4), "bundle signature does not verify"),
        (
            5,
            other.sign(&content(5, ONLY_MODELS, now() + 3600)).unwrap(),
            "unknown policy key",
        ),
        (
            6,
            key.sign(&content(6, ONLY_MODELS, now() - 1)).unwrap(),
            "expired at",
        ),
    ];
    for (revision, envelope, why) in &cases {
        let before = count(&agent.log_text(), why);
        store_bundle(&srv_dir, *revision, envelope);
        wait_until(why, Duration::from_secs(5), || {
            count(&agent.log_text(), why) > before
        });
        assert_eq!(call(&p, &c, "/v1/echo").0, 200, "after: {why}");
    }
    // The same revision as the one in force, with other content. Stored while revision 6
    // is still the latest, then the later ones go in one statement: the authority caches the
    // bundle by its revision, so a refresh that saw revision 3 again before its content
    // changed would never send the new content.
    let why = "differs from the accepted bundle of the same revision";
    let before = count(&agent.log_text(), why);
    store_bundle(
        &srv_dir,
        3,
        &key.sign(&content(3, ONLY_MODELS, now() + 3600)).unwrap(),
    );
    db(
        &srv_dir,
        "DELETE FROM policy_bundles WHERE revision > 3",
        &[],
    );
    poke(&s, 1);
    wait_until(why, Duration::from_secs(5), || {
        count(&agent.log_text(), why) > before
    });
    assert_eq!(call(&p, &c, "/v1/echo").0, 200);
    // An older revision (the database rolled back to revision 2).
    db(
        &srv_dir,
        "DELETE FROM policy_bundles WHERE revision = 3",
        &[],
    );
    let why = "older than the accepted revision 3";
    let before = count(&agent.log_text(), why);
    poke(&s, 2);
    wait_until(why, Duration::from_secs(5), || {
        count(&agent.log_text(), why) > before
    });
    assert_eq!(call(&p, &c, "/v1/echo").0, 200);

    // Restart the agent: it still refuses the older bundle (the highest revision it accepted
    // is persisted), serves revision 3 from its cache, and the proxy keeps enforcing it.
    let before = count(&agent.log_text(), why);
    agent.restart();
    wait_until(
        "older bundle refused after restart",
        Duration::from_secs(10),
        || count(&agent.log_text(), why) > before,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(call(&p, &c, "/v1/echo").0, 200);
    assert_eq!(call(&p, &c, "/v1/models").0, 403);

    // Server gone: the proxy enforces the last bundle until it expires, then refuses
    // everything with 503. (A garbage row at revision 9 makes the next push revision 10.)
    store_bundle(&srv_dir, 9, "{}");
    let ttl = 6;
    let pushed_at = now();
    assert_eq!(push(&s, &pol, ALLOW_HTTP, &format!("{ttl}s")), 10);
    wait_until("revision 10 in force", Duration::from_secs(5), || {
        floor_revision(tmp.path()) == Some(10)
    });
    s.stop();
    assert_eq!(call(&p, &c, "/v1/echo").0, 200);
    wait_until(
        "503 after expiry",
        Duration::from_secs(ttl as u64 + 10),
        || call(&p, &c, "/v1/echo").0 == 503,
    );
    assert!(now() >= pushed_at + ttl - 1, "refused before expiry");
    let (code, body) = call(&p, &c, "/v1/echo");
    assert_eq!(code, 503);
    assert!(body.contains("policy bundle expired"), "{body}");
    wait_until("expiry logged", Duration::from_secs(3), || {
        p.log_text()
            .contains("policy bundle expired and no newer one has arrived")
    });
    assert!(agent.is_running());
}

#[test]
fn a_rotated_policy_key_signs_bundles_agents_and_proxies_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let w = start_world(tmp.path(), |s, pol| {
        assert_eq!(push(s, pol, ALLOW_HTTP, "1h"), 1);
    });
    wait_until("revision 1 enforced", Duration::from_secs(10), || {
        call(&w.p, &w.c, "/v1/echo").0 == 200
    });
    let old_key = w.s.sigil_json(&["policy", "show"])["key_id"].clone();
    // Prepare: the new key is published (two policy keys in the bundle), the old one signs.
    let prepared = w.s.sigil_json(&["policy", "rotate-key"]);
    assert_eq!(prepared["action"], "prepared", "{prepared}");
    let bundle = w.s.sigil_json(&["bundle", "show"]);
    let policy_keys = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "sigil-policy")
        .count();
    assert_eq!(policy_keys, 2, "{bundle}");
    assert_eq!(push(&w.s, &w.pol, ONLY_MODELS, "1h"), 2);
    assert_eq!(w.s.sigil_json(&["policy", "show"])["key_id"], old_key);
    wait_until("revision 2 enforced", Duration::from_secs(3), || {
        call(&w.p, &w.c, "/v1/echo").0 == 403
    });
    // Activate: the new key signs; agent and proxy accept its bundles.
    let activated = w.s.sigil_json(&["policy", "rotate-key"]);
    assert_eq!(activated["action"], "activated", "{activated}");
    // (With a rate-limit configuration, TOML, carried signed in the bundle.)
    let limits = tmp.path().join("limits.toml");
    std::fs::write(
        &limits,
        "rate_limit_per_sec = 0.01\nrate_limit_burst = 3.0\n[[resource_rate_limits]]\nresource_type = \"Model\"\nresource_id = \"m\"\nper_sec = 1.0\n",
    )
    .unwrap();
    std::fs::write(w.pol.join("p.cedar"), ALLOW_HTTP).unwrap();
    let pushed = w.s.sigil_json(&[
        "policy",
        "push",
        w.pol.to_str().unwrap(),
        "--rate-limits",
        limits.to_str().unwrap(),
    ]);
    assert_eq!(pushed["revision"], 3, "{pushed}");
    let shown = w.s.sigil_json(&["policy", "show"]);
    assert_eq!(shown["key_id"], prepared["key_id"], "{shown}");
    let env: Envelope = serde_json::from_str(shown["envelope"].as_str().unwrap()).unwrap();
    let payload: serde_json::Value = {
        use base64::Engine as _;
        serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(env.payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(payload["revision"], 3);
    assert_eq!(payload["rate_limits"]["rate_limit_per_sec"], 0.01);
    assert_eq!(
        payload["rate_limits"]["resource_rate_limits"][0]["resource_id"],
        "m"
    );
    wait_until(
        "revision 3 (new key) enforced",
        Duration::from_secs(3),
        || call(&w.p, &w.c, "/v1/echo").0 == 200,
    );
    // Limits the proxy would refuse are refused at push, and change nothing.
    let bad = tmp.path().join("bad-limits.toml");
    std::fs::write(&bad, "rate_limit_per_sec = -1.0\n").unwrap();
    let out = w.s.sigil(&[
        "policy",
        "push",
        w.pol.to_str().unwrap(),
        "--rate-limits",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rate_limit_per_sec"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.s.sigil_json(&["policy", "show"])["revision"], 3);
    // The bundle's limits are in force: a burst of 3 per identity, then 429.
    let codes: Vec<u16> = (0..4).map(|_| call(&w.p, &w.c, "/v1/echo").0).collect();
    assert!(
        codes.contains(&429),
        "the bundle's rate limits were not applied: {codes:?}\n{}",
        w.p.log_text()
    );
    assert!(!w.agent.log_text().contains("refused a policy bundle"));
}

/// The revision in the proxy's anti-rollback record (`<audit_log>.policy-revision.slots`).
fn floor_revision(dir: &std::path::Path) -> Option<u64> {
    let (_, record) =
        sigil_fs::slot::SlotFile::open(&dir.join("audit.log.policy-revision.slots")).ok()??;
    let v: serde_json::Value = serde_json::from_slice(&record?).ok()?;
    v.get("revision")?.as_u64()
}
