//! End-to-end tests of the metrics listeners (`--metrics-addr`) of `sigil proxy`, `sigil
//! server` and `sigil agent`, with real processes: a scripted run, then a scrape whose
//! counters must match the requests made; `/healthz`, `/readyz` and `sigil status`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::proxy::{Client, register};
use common::upstream::Upstream;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, TD, free_port, my_uid, run};

/// A plain-HTTP GET: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// The samples of a scrape, `name{labels}` → value.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse::<f64>().unwrap())
        })
        .collect()
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} missing from {:#?}", m.keys().collect::<Vec<_>>()))
}

/// Waits until `addr` accepts connections.
fn wait_listening(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const POLICY: &str = r#"
@id("factory-floor-models")
permit (principal in Group::"factory-floor", action == Action::"invoke", resource)
when { resource == Model::"m" && context.scopes.contains("model:invoke") };
"#;

/// Starts `sigil proxy` (standalone, credentials minted by the server) with metrics on.
fn start_proxy(s: &Server, dir: &Path, upstream: u16, metrics: &str) -> (Killed, u16) {
    let (pdir, bundle) = s.proxy_credentials(dir, &format!("spiffe://{TD}/proxy"));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("p.cedar"), POLICY).unwrap();
    let port = free_port();
    let child = Command::new(common::sigil_bin())
        .args(["proxy", "--trust-domain", TD])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &format!("http://127.0.0.1:{upstream}")])
        .args(["--audience", "model-gw", "--issuer", &s.url("")])
        .arg("--cert")
        .arg(pdir.join("svid.pem"))
        .arg("--key")
        .arg(pdir.join("key.pem"))
        .arg("--bundle")
        .arg(&bundle)
        .arg("--policy-dir")
        .arg(&policies)
        .arg("--audit-log")
        .arg(dir.join("audit.log"))
        .args(["--metrics-addr", metrics])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .unwrap();
    let child = Killed(child);
    wait_listening(&format!("127.0.0.1:{port}"), "proxy");
    wait_listening(metrics, "proxy metrics");
    (child, port)
}

/// A client SVID minted for `spiffe://td.test/agent` (group factory-floor) and its token.
fn client(s: &Server, dir: &Path) -> (PathBuf, PathBuf, PathBuf, String) {
    let c = Client::new(s, &register(s, "agent", "factory-floor"), dir);
    (c.cert, c.key, c.bundle, c.token)
}

/// One chat completion through the proxy for `model`; the HTTP status.
fn chat(port: u16, c: &(PathBuf, PathBuf, PathBuf, String), model: &str) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&c.2)
        .arg("--cert")
        .arg(&c.0)
        .arg("--key")
        .arg(&c.1)
        .args(["-H", &format!("Authorization: Bearer {}", c.3)])
        .args(["-H", "content-type: application/json"])
        .args(["-d", &format!(r#"{{"model":"{model}","messages":[]}}"#)])
        .arg(format!("https://localhost:{port}/v1/chat/completions"));
    let (_, out, _) = run(&mut cmd);
    out.trim().parse().unwrap_or(0)
}

#[test]
fn proxy_and_server_counters_match_a_scripted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let server_metrics = format!("127.0.0.1:{}", free_port());
    let s = Server::start(
        &tmp.path().join("srv"),
        &["--metrics-addr", &server_metrics],
    );
    wait_listening(&server_metrics, "server metrics");
    let c = client(&s, &tmp.path().join("c"));
    let up = Upstream::start();
    let proxy_metrics = format!("127.0.0.1:{}", free_port());
    let (_proxy, port) = start_proxy(&s, tmp.path(), up.port, &proxy_metrics);

    assert_eq!(http_get(&proxy_metrics, "/healthz").0, 200);
    let (ready, why) = http_get(&proxy_metrics, "/readyz");
    assert_eq!(ready, 200, "{why}");

    for _ in 0..7 {
        assert_eq!(chat(port, &c, "m"), 200);
    }
    for _ in 0..3 {
        assert_eq!(chat(port, &c, "forbidden-model"), 403);
    }

    let m = scrape(&proxy_metrics);
    let req = |d: &str, r: &str| {
        value(
            &m,
            &format!("sigil_proxy_requests_total{{decision=\"{d}\",reason=\"{r}\"}}"),
        )
    };
    assert_eq!(req("allow", "policy"), 7.0);
    assert_eq!(req("deny", "policy"), 3.0);
    for r in [
        "bad_token",
        "bad_cert",
        "revoked",
        "rate_limited",
        "audit_failure",
        "too_large",
        "bad_request",
        "upstream",
    ] {
        assert_eq!(req("deny", r), 0.0, "{r}");
    }
    // Every request was token-checked and decided; only the allowed ones were forwarded.
    assert_eq!(
        value(&m, "sigil_proxy_token_validation_seconds_count"),
        10.0
    );
    assert_eq!(
        value(&m, "sigil_proxy_policy_evaluation_seconds_count"),
        10.0
    );
    assert_eq!(value(&m, "sigil_proxy_request_duration_seconds_count"), 7.0);
    assert_eq!(
        value(&m, "sigil_proxy_upstream_duration_seconds_count"),
        7.0
    );
    assert_eq!(value(&m, "sigil_proxy_policies"), 1.0);
    // Every decision was recorded, each made durable by a sync (sequential calls: at most
    // one sync per record).
    assert_eq!(value(&m, "sigil_proxy_audit_records_total"), 10.0);
    let syncs = value(&m, "sigil_proxy_audit_syncs_total");
    assert!((1.0..=10.0).contains(&syncs), "{syncs}");
    // Policies from a directory, not a signed bundle: no bundle series.
    assert!(
        !m.keys()
            .any(|k| k.starts_with("sigil_proxy_policy_bundle_")),
        "{m:?}"
    );
    let expiry = value(&m, "sigil_proxy_svid_expiry_seconds");
    assert!(expiry > 0.0 && expiry <= 24.0 * 3600.0, "{expiry}");

    // The server: one token issued, store up, ready.
    let sm = scrape(&server_metrics);
    assert_eq!(
        value(&sm, "sigil_server_token_requests_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(value(&sm, "sigil_server_store_up"), 1.0);
    assert!(value(&sm, "sigil_server_issued_identities") >= 3.0);
    assert_eq!(http_get(&server_metrics, "/readyz").0, 200);

    // `sigil status` says the same for a person and for a script.
    let (ok, out, err) =
        run(Command::new(common::sigil_bin()).args(["status", "--metrics-addr", &proxy_metrics]));
    assert!(ok, "{out}{err}");
    assert!(out.contains(": ready"), "{out}");
    assert!(out.contains("requests: 7 allowed, 3 denied"), "{out}");
    assert!(out.contains("denied (policy): 3"), "{out}");
    let (ok, out, err) = run(Command::new(common::sigil_bin()).args([
        "status",
        "--metrics-addr",
        &proxy_metrics,
        "--output",
        "json",
    ]));
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(
        v["metrics"]["sigil_proxy_requests_total{decision=\"allow\",reason=\"policy\"}"],
        7.0
    );
}

#[test]
fn agent_metrics_and_readiness() {
    let tmp = tempfile::tempdir().unwrap();
    let server_metrics = format!("127.0.0.1:{}", free_port());
    let s = Server::start(
        &tmp.path().join("srv"),
        &["--metrics-addr", &server_metrics],
    );
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/workload"),
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);
    // The harness's agent takes no extra flags: start one the same way, with metrics.
    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let bootstrap = tmp.path().join("bootstrap.pem");
    std::fs::write(&bootstrap, s.bundle_pem()).unwrap();
    let socket = tmp.path().join("sock.d").join("api.sock");
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let _agent = Killed(
        Command::new(common::sigil_bin())
            .args(["agent", "--trust-domain", TD])
            .args(["--server", &format!("127.0.0.1:{}", s.port)])
            .arg("--data-dir")
            .arg(&dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--trust-bundle")
            .arg(&bootstrap)
            .args(["--join-token", jt["token"].as_str().unwrap()])
            .args(["--metrics-addr", &agent_metrics])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(&agent_metrics, "agent metrics");
    assert_eq!(http_get(&agent_metrics, "/healthz").0, 200);

    // Ready once attested with a bundle; the workload's SVID is then fetched.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&agent_metrics, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "agent never ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut calls = 0;
    loop {
        calls += 1;
        let (ok, _, _) = run(Command::new(common::sigil_bin()).args([
            "workload",
            "fetch-x509",
            "--socket",
            &format!("unix://{}", socket.display()),
            "--out-dir",
            tmp.path().join("w").to_str().unwrap(),
        ]));
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "workload SVID never served");
        std::thread::sleep(Duration::from_millis(100));
    }

    let m = scrape(&agent_metrics);
    let fetches: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("sigil_agent_workload_api_requests_total{method=\"FetchX509SVID\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(fetches, f64::from(calls));
    assert!(
        value(
            &m,
            "sigil_agent_workload_api_requests_total{method=\"FetchX509SVID\",result=\"ok\"}"
        ) >= 1.0
    );
    assert_eq!(value(&m, "sigil_agent_sync_connected"), 1.0);
    assert_eq!(value(&m, "sigil_agent_workload_svids"), 1.0);
    assert!(value(&m, "sigil_agent_node_svid_expiry_seconds") > 0.0);
    assert!(value(&m, "sigil_agent_workload_svid_expiry_seconds") > 0.0);
    assert!(value(&m, "sigil_agent_bundle_sequence") >= 1.0);

    // The server sees one agent attested and syncing.
    let sm = scrape(&server_metrics);
    assert_eq!(
        value(
            &sm,
            "sigil_server_node_api_requests_total{method=\"Attest\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(value(&sm, "sigil_server_connected_agents"), 1.0);
    assert!(
        value(
            &sm,
            "sigil_server_node_api_requests_total{method=\"SignX509Svids\",result=\"ok\"}"
        ) >= 1.0
    );

    let (ok, out, err) =
        run(Command::new(common::sigil_bin()).args(["status", "--metrics-addr", &agent_metrics]));
    assert!(ok, "{out}{err}");
    assert!(out.contains("server sync: connected"), "{out}");
}

/// Readiness follows the serving SVID's validity: an in-process proxy on a manual clock turns
/// not ready once its SVID's notAfter has passed, and ready again when it is valid at the
/// clock's time (as after a rotation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_readiness_follows_its_svid_validity() {
    use sigil_core::{Clock, ManualClock, SystemClock};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let s = tokio::task::block_in_place(|| Server::start(&dir.join("srv"), &[]));
    let pdir = dir.join("proxy");
    let minted = tokio::task::block_in_place(|| s.mint(&format!("spiffe://{TD}/proxy"), &pdir));
    let bundle = dir.join("bundle.json");
    let out = tokio::task::block_in_place(|| s.sigil(&["bundle", "show"]));
    std::fs::write(&bundle, &out.stdout).unwrap();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("p.cedar"), POLICY).unwrap();
    let cfg = format!(
        "trust_domain = \"{TD}\"\nlisten_addr = \"127.0.0.1:0\"\nmetrics_addr = \"127.0.0.1:0\"\n\
         upstream = \"http://127.0.0.1:1\"\naudience = \"model-gw\"\nissuer = \"{}\"\n\
         cert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\npolicy_dir = \"{}\"\naudit_log = \"{}\"\n",
        s.url(""),
        pdir.join("svid.pem").display(),
        pdir.join("key.pem").display(),
        bundle.display(),
        policies.display(),
        dir.join("audit.log").display(),
    );
    let cfg: sigil_proxy::ProxyConfig = toml::from_str(&cfg).unwrap();
    let now = SystemClock.now();
    let clock = ManualClock::new(now);
    let proxy = sigil_proxy::start(cfg, std::sync::Arc::new(clock.clone()))
        .await
        .unwrap();
    let addr = proxy.metrics_addr.unwrap().to_string();
    let probe = |addr: String| tokio::task::spawn_blocking(move || http_get(&addr, "/readyz"));
    assert_eq!(probe(addr.clone()).await.unwrap().0, 200, "{minted}");

    // Past the SVID's notAfter (admin-minted SVIDs live an hour by default).
    clock.set(now + 2 * 3600);
    let (status, body) = probe(addr.clone()).await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("serving SVID expired"), "{body}");
    let m = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || scrape(&addr)
    })
    .await
    .unwrap();
    assert!(value(&m, "sigil_proxy_svid_expiry_seconds") < 0.0);
    let (ok, out, _) = tokio::task::block_in_place(|| {
        run(Command::new(common::sigil_bin()).args(["status", "--metrics-addr", &addr]))
    });
    assert!(!ok, "sigil status must fail when not ready: {out}");
    assert!(out.contains("NOT READY: serving SVID expired"), "{out}");

    // Valid again at the clock's time: ready again.
    clock.set(now);
    assert_eq!(probe(addr).await.unwrap().0, 200);
    proxy.shutdown();
}
