//! Audit shipping end to end: a real `sigil server`, a standalone `sigil proxy` shipping its
//! audit segment to the server's audit log (`audit_ship_to`), a Python upstream and `curl`
//! clients. Every decision reaches the server's audit Merkle log once, also across SIGKILLs
//! of the proxy (and one of the server) while requests go on, and the log verifies.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::proxy::register_entry;
use common::{Server, TD, free_port, run};

const ECHO: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        out = json.dumps({"request_id": self.headers.get("x-sigil-request-id")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a): pass
ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"#;

const POLICY: &str = r#"
@id("agent-http")
permit (principal == Workload::"spiffe://td.test/agent", action == Action::"http", resource);
"#;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything needed to (re)start the proxy on the same port and segment.
struct ProxySetup {
    dir: PathBuf,
    port: u16,
    upstream: u16,
    server_port: u16,
    /// `audit_rotate_bytes` (the proxy's default when `None`).
    rotate_bytes: Option<u64>,
}

impl ProxySetup {
    fn new(s: &Server, dir: &Path, upstream: u16) -> Self {
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("policies/test.cedar"), POLICY).unwrap();
        s.proxy_credentials(dir, &format!("spiffe://{TD}/proxy"));
        Self {
            dir: dir.to_owned(),
            port: free_port(),
            upstream,
            server_port: s.port,
            rotate_bytes: None,
        }
    }

    fn segment(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    fn start(&self) -> Kill {
        let log = self.dir.join("proxy.log");
        let d = &self.dir;
        let child = Command::new(common::sigil_bin())
            .args(["proxy", "--trust-domain", TD])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--upstream", &format!("http://127.0.0.1:{}", self.upstream)])
            .args(["--audience", "model-gw"])
            .args([
                "--issuer",
                &format!("https://localhost:{}", self.server_port),
            ])
            .arg("--cert")
            .arg(d.join("proxy/svid.pem"))
            .arg("--key")
            .arg(d.join("proxy/key.pem"))
            .arg("--bundle")
            .arg(d.join("bundle.json"))
            .arg("--policy-dir")
            .arg(d.join("policies"))
            .arg("--audit-log")
            .arg(self.segment())
            .env(
                "SIGIL_AUDIT_SHIP_TO",
                format!("https://localhost:{}", self.server_port),
            )
            .env("SIGIL_LOG", "info")
            .env(
                "SIGIL_AUDIT_ROTATE_BYTES",
                self.rotate_bytes.unwrap_or(64 << 20).to_string(),
            )
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        wait_port(self.port, "proxy", &log);
        Kill(child)
    }
}

/// A client with a minted SVID and a bound token.
struct Client {
    dir: PathBuf,
    token: String,
}

impl Client {
    fn new(s: &Server, name: &str, dir: &Path) -> Self {
        let c = common::proxy::Client::new(s, &register_entry(s, name, None), dir);
        Self {
            dir: dir.to_owned(),
            token: c.token,
        }
    }

    /// One request through the proxy: `Some((status, request id))` if an HTTP response came
    /// back, `None` if the connection failed.
    fn call(&self, port: u16) -> Option<(u16, String)> {
        let (_, out, _) = run(Command::new("curl")
            .args(["-s", "-m", "10", "--cacert"])
            .arg(self.dir.join("bundle.pem"))
            .arg("--cert")
            .arg(self.dir.join("svid.pem"))
            .arg("--key")
            .arg(self.dir.join("key.pem"))
            .args(["-H", &format!("Authorization: Bearer {}", self.token)])
            .args(["-w", "\n%{http_code} %header{x-sigil-request-id}"])
            .arg(format!("https://localhost:{port}/v1/echo")));
        let (body, tail) = out.rsplit_once('\n')?;
        let (code, header_id) = tail.split_once(' ').unwrap_or((tail, ""));
        let code: u16 = code.trim().parse().ok()?;
        if code == 0 {
            return None;
        }
        // Refusals carry the id in a header; allowed requests in the upstream's echo.
        let id = if header_id.trim().is_empty() {
            let v: serde_json::Value = serde_json::from_str(body).ok()?;
            v["request_id"].as_str()?.to_owned()
        } else {
            header_id.trim().to_owned()
        };
        Some((code, id))
    }
}

/// The server's audit log, through `sigil log`.
struct AuditView {
    url: String,
    ca: PathBuf,
    vkey: String,
}

impl AuditView {
    fn new(s: &Server, ca: &Path) -> Self {
        let (ok, vkey, err) = run(Command::new("curl")
            .args(["-sf", "--cacert"])
            .arg(ca)
            .arg(s.url("/log/audit/key")));
        assert!(ok, "{err}");
        let vkey = vkey.trim().to_owned();
        assert!(vkey.starts_with(&format!("sigil.{TD}/audit+")), "{vkey}");
        Self {
            url: format!("https://localhost:{}", s.port),
            ca: ca.to_owned(),
            vkey,
        }
    }

    fn log(&self, args: &[&str]) -> (bool, String, String) {
        run(Command::new(common::sigil_bin())
            .arg("log")
            .args(args)
            .args(["--log", "audit", "--server", &self.url, "--ca"])
            .arg(&self.ca)
            .args(["--key", &self.vkey]))
    }

    /// Verifies the whole log; its size.
    fn verify(&self) -> u64 {
        let (ok, out, err) = self.log(&["verify"]);
        assert!(ok, "sigil log verify --log audit failed: {out}{err}");
        out.split("verified: ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    }

    fn size(&self) -> u64 {
        let (ok, out, _) = run(Command::new("curl")
            .args(["-sf", "--cacert"])
            .arg(&self.ca)
            .arg(format!("{}/log/audit/checkpoint", self.url)));
        if !ok {
            return 0;
        }
        out.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0)
    }

    /// request id → how many times it is in the (verified) log, over these callers.
    fn request_ids(&self, callers: &[&str]) -> BTreeMap<String, usize> {
        let mut ids = BTreeMap::new();
        for c in callers {
            let (ok, out, err) = self.log(&["search", "--spiffe-id", c]);
            assert!(ok, "{out}{err}");
            for line in out.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let id = v["record"]["request_id"].as_str().unwrap().to_owned();
                *ids.entry(id).or_insert(0) += 1;
            }
        }
        ids
    }

    fn wait_size(&self, want: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let n = self.size();
            if n >= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the audit log has {n} leaves, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn decisions_reach_the_server_audit_log_once_across_proxy_and_server_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("server"), &[]);
    let up_port = free_port();
    let upstream = Kill(
        Command::new("python3")
            .args(["-c", ECHO, &up_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(up_port, "upstream", Path::new("/dev/null"));
    let ca = tmp.path().join("bundle.pem");
    std::fs::write(&ca, server.bundle_pem()).unwrap();
    let setup = ProxySetup::new(&server, &tmp.path().join("p"), up_port);
    let agent = Client::new(&server, "agent", &tmp.path().join("agent"));
    let other = Client::new(&server, "other", &tmp.path().join("other"));
    let callers = [
        format!("spiffe://{TD}/agent"),
        format!("spiffe://{TD}/other"),
    ];
    let callers: Vec<&str> = callers.iter().map(String::as_str).collect();
    let view = AuditView::new(&server, &ca);

    // The endpoint only takes authenticated proxies.
    let (ok, out, _) = run(Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .args(["-X", "POST", "--data-binary", "{\"request_id\":\"x\"}"])
        .arg(server.url("/audit/v1/records")));
    assert!(ok);
    assert_eq!(out.trim(), "401");

    // N requests, allowed and denied: each decision is in the server's log once.
    let mut proxy = setup.start();
    let mut sent = Vec::new();
    for i in 0..12 {
        let c = if i % 3 == 0 { &other } else { &agent };
        let (code, id) = c.call(setup.port).expect("response");
        assert_eq!(code, if i % 3 == 0 { 403 } else { 200 }, "request {i}");
        sent.push(id);
    }
    view.wait_size(12, Duration::from_secs(20));
    assert_eq!(view.verify(), 12);
    let logged = view.request_ids(&callers);
    assert_eq!(logged.len(), 12);
    for id in &sent {
        assert_eq!(logged.get(id), Some(&1), "request {id}");
    }
    let acked = std::fs::read_to_string(setup.dir.join("audit.log.acked")).unwrap();
    assert!(acked.starts_with("sigil-audit-acked v1\n"), "{acked}");

    // Requests go on while the proxy is SIGKILLed and restarted (and the server once).
    let stop = Arc::new(AtomicBool::new(false));
    let port = setup.port;
    let load = {
        let stop = stop.clone();
        let (agent, other) = (
            Client {
                dir: agent.dir.clone(),
                token: agent.token.clone(),
            },
            Client {
                dir: other.dir.clone(),
                token: other.token.clone(),
            },
        );
        std::thread::spawn(move || {
            let mut answered = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let c = if i.is_multiple_of(4) { &other } else { &agent };
                if let Some(r) = c.call(port) {
                    answered.push(r);
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
                i += 1;
            }
            answered
        })
    };
    for cycle in 0..4 {
        std::thread::sleep(Duration::from_millis(400 + 150 * cycle));
        drop(proxy); // SIGKILL
        if cycle == 2 {
            let pid = server.pid().unwrap();
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            std::thread::sleep(Duration::from_millis(200));
            server.restart();
        }
        proxy = setup.start();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let answered = load.join().unwrap();
    assert!(answered.len() >= 10, "only {} answered", answered.len());

    // Everything the proxy recorded (answered or not) is shipped; no record twice.
    let local = sigil_proxy::read_records(&setup.segment()).unwrap();
    let local_ids: BTreeSet<String> = local
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(local_ids.len(), local.len());
    view.wait_size(local.len() as u64, Duration::from_secs(30));
    let size = view.verify();
    assert_eq!(size, local.len() as u64);
    let logged = view.request_ids(&callers);
    assert_eq!(logged.len() as u64, size, "a record is in the log twice");
    assert!(logged.values().all(|n| *n == 1));
    for (code, id) in &answered {
        assert_eq!(
            logged.get(id),
            Some(&1),
            "answered request {id} (HTTP {code})"
        );
    }
    for id in &sent {
        assert_eq!(logged.get(id), Some(&1));
    }
    drop(proxy);
    drop(upstream);
}

#[test]
fn a_fully_acknowledged_segment_is_replaced_and_shipping_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), &[]);
    let up_port = free_port();
    let _upstream = Kill(
        Command::new("python3")
            .args(["-c", ECHO, &up_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(up_port, "upstream", Path::new("/dev/null"));
    let ca = tmp.path().join("bundle.pem");
    std::fs::write(&ca, server.bundle_pem()).unwrap();
    let mut setup = ProxySetup::new(&server, &tmp.path().join("p"), up_port);
    setup.rotate_bytes = Some(4096);
    let agent = Client::new(&server, "agent", &tmp.path().join("agent"));
    let callers = [format!("spiffe://{TD}/agent")];
    let callers: Vec<&str> = callers.iter().map(String::as_str).collect();
    let view = AuditView::new(&server, &ca);
    let _proxy = setup.start();
    let log = setup.dir.join("proxy.log");
    let mut sent = Vec::new();
    // Records of ~0.5 KiB: 4 KiB is passed within the first dozen.
    for round in 0..3 {
        for _ in 0..15 {
            let (code, id) = agent.call(setup.port).expect("response");
            assert_eq!(code, 200);
            sent.push(id);
        }
        view.wait_size(sent.len() as u64, Duration::from_secs(20));
        // Once everything is acknowledged, the segment is replaced: what is left locally is
        // only what came after.
        let t0 = std::time::Instant::now();
        loop {
            let local = sigil_proxy::read_records(&setup.segment()).unwrap();
            if local.len() < sent.len() - round * 15 || local.is_empty() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the segment was not replaced: {} records\n{}",
                local.len(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("replaced by a new one")
    );
    // Nothing lost, nothing twice, across the replacements.
    assert_eq!(view.verify(), sent.len() as u64);
    let logged = view.request_ids(&callers);
    assert_eq!(logged.len(), sent.len());
    for id in &sent {
        assert_eq!(logged.get(id), Some(&1), "request {id}");
    }
}
