//! End-to-end tests of `sigil proxy` (first slice: mTLS, bound tokens, forwarding) with real
//! processes: `sigil server`, `sigil proxy`, a Python HTTP upstream, and `curl` as the client.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{
    Client, KeptConnection, call, call_path, call_with, files, register, spawn_proxy, start_proxy,
    start_proxy_to,
};
use common::upstream::Upstream;
use common::{Server, TD, free_port, run, token_request};

#[test]
fn proxy_admits_only_bound_tokens_over_svid_mtls_and_sets_identity_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let client_id = register(&s, "agent", "factory-floor");
    let up = Upstream::start();
    let audit = tmp.path().join("audit.log");
    let p = start_proxy(
        &s,
        tmp.path(),
        up.port,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--max-body-bytes",
            "4096",
        ],
    );
    let c1 = tmp.path().join("c1");
    s.mint(&client_id, &c1);
    let (cert, key, bundle) = files(&c1);
    let token = |cert: &Path, key: &Path, resource: &str| {
        let (code, body) = token_request(
            &s,
            &bundle,
            Some((cert, key)),
            &[
                "grant_type=client_credentials",
                &format!("resource={resource}"),
            ],
        );
        assert_eq!(code, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    };
    let t1 = token(&cert, &key, "model-gw");
    let auth = |t: &str| format!("Authorization: Bearer {t}");

    // Allowed; the upstream sees the proxy's identity header, not the client's spoofed one,
    // and never the token.
    let (ok, code, body) = call(
        &p,
        &bundle,
        Some((&cert, &key)),
        &[
            auth(&t1),
            format!("x-sigil-spiffe-id: spiffe://{TD}/admin"),
            "X-Sigil-Groups: root".into(),
        ],
    );
    assert!(ok && code == 200, "{code} {body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/v1/echo?x=1");
    assert_eq!(seen["headers"]["x-sigil-spiffe-id"], client_id);
    assert!(seen["headers"]["x-sigil-groups"].is_null());
    assert!(seen["headers"]["authorization"].is_null());
    assert!(
        seen["headers"]["x-sigil-request-id"]
            .as_str()
            .is_some_and(|r| r.len() == 36)
    );
    // Same token again (from the cache) still works.
    let (_, code, _) = call(&p, &bundle, Some((&cert, &key)), &[auth(&t1)]);
    assert_eq!(code, 200);

    // No client certificate, or one from another CA: the handshake itself fails.
    let (ok, code, _) = call(&p, &bundle, None, &[auth(&t1)]);
    assert!(!ok || code == 0, "no client cert admitted ({code})");
    let foreign_dir = tmp.path().join("foreign");
    let other = Server::start(&tmp.path().join("other"), &[]);
    other.mint(&client_id, &foreign_dir);
    let (fc, fk, _) = files(&foreign_dir);
    let (ok, code, _) = call(&p, &bundle, Some((&fc, &fk)), &[auth(&t1)]);
    assert!(!ok || code == 0, "foreign cert admitted ({code})");

    // No token; token for another audience; token bound to another certificate.
    let (_, code, body) = call(&p, &bundle, Some((&cert, &key)), &[]);
    assert_eq!(code, 401, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["type"], "authentication_error");
    let t_other = token(&cert, &key, "other-service");
    let (_, code, _) = call(&p, &bundle, Some((&cert, &key)), &[auth(&t_other)]);
    assert_eq!(code, 401);
    let c2 = tmp.path().join("c2");
    s.mint(&client_id, &c2);
    let (cert2, key2, _) = files(&c2);
    let (_, code, body) = call(&p, &bundle, Some((&cert2, &key2)), &[auth(&t1)]);
    assert_eq!(code, 401, "stolen token replayed with another cert: {body}");
    assert!(body.contains("another certificate"), "{body}");
    // Forged signature, alg none, trailing bytes.
    // Flip a character in the middle of the signature (the last one may hold only padding bits).
    let mut forged = t1.clone().into_bytes();
    let i = forged.len() - 20;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let parts: Vec<&str> = t1.split('.').collect();
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiYXQrand0In0"; // {"alg":"none","typ":"at+jwt"}
    let alg_none = format!("{none_header}.{}.", parts[1]);
    for bad in [forged, alg_none, format!("{t1}x"), format!("{t1}.")] {
        let (_, code, _) = call(&p, &bundle, Some((&cert, &key)), &[auth(&bad)]);
        assert_eq!(code, 401, "{bad}");
    }
}

#[test]
fn proxy_audits_every_decision_limits_rate_and_size_and_fails_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let client_id = register(&s, "agent", "factory-floor");
    let up = Upstream::start();
    let audit = tmp.path().join("audit.log");
    let p = start_proxy(
        &s,
        tmp.path(),
        up.port,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--max-body-bytes",
            "4096",
            "--rate-limit-per-sec",
            "1",
            "--rate-limit-burst",
            "3",
        ],
    );
    let c = Client::new(&s, &client_id, &tmp.path().join("c1"));
    let (cert, key, bundle, auth) = (c.cert.clone(), c.key.clone(), c.bundle.clone(), c.auth());

    // A body within the limit goes through (POST); one over it gets 413 and never arrives.
    let small = tmp.path().join("small.json");
    std::fs::write(&small, r#"{"model":"m","messages":[]}"#).unwrap();
    let (_, code, body) = call_with(
        &p,
        &bundle,
        Some((&cert, &key)),
        &[auth.clone(), "content-type: application/json".into()],
        &["--data-binary", &format!("@{}", small.display())],
    );
    assert_eq!(code, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["body"], r#"{"model":"m","messages":[]}"#);
    let big = tmp.path().join("big.json");
    std::fs::write(&big, "x".repeat(10_000)).unwrap();
    let (_, code, body) = call_with(
        &p,
        &bundle,
        Some((&cert, &key)),
        std::slice::from_ref(&auth),
        &["--data-binary", &format!("@{}", big.display())],
    );
    assert_eq!(code, 413, "{body}");
    // Chunked (no Content-Length) over the limit: also 413.
    let (_, code, _) = call_with(
        &p,
        &bundle,
        Some((&cert, &key)),
        &[auth.clone(), "Transfer-Encoding: chunked".into()],
        &["--data-binary", &format!("@{}", big.display())],
    );
    assert_eq!(code, 413);

    // Burst of 3 per identity, 1/s: the next request in the same second gets 429 + Retry-After.
    let mut limited = None;
    for _ in 0..3 {
        let (_, code, _) = call_with(
            &p,
            &bundle,
            Some((&cert, &key)),
            std::slice::from_ref(&auth),
            &["-D", "/dev/stdout"],
        );
        if code == 429 {
            limited = Some(code);
            break;
        }
    }
    let (_, code, body) = call_with(
        &p,
        &bundle,
        Some((&cert, &key)),
        std::slice::from_ref(&auth),
        &["-D", "/dev/stdout"],
    );
    assert!(limited.is_some() || code == 429, "no 429: {code}");
    if code == 429 {
        assert!(body.to_ascii_lowercase().contains("retry-after:"), "{body}");
        assert!(body.contains("rate_limit_error"), "{body}");
    }

    // Every decision is in the audit file, allow and deny, with identity and token jti.
    // Read back through the verifying reader (length + CRC-32C per record).
    let records = sigil_proxy::read_records(&audit).unwrap();
    let text = format!("{records:?}");
    assert!(records.len() >= 5, "{text}");
    assert!(
        records
            .iter()
            .any(|r| r["decision"] == "allow" && r["jti"].is_string())
    );
    // What was called is part of the record.
    assert!(
        records.iter().any(|r| r["decision"] == "allow"
            && r["calls"][0]["action"] == "http"
            && r["calls"][0]["resource_id"] == "POST /v1/echo"),
        "{text}"
    );
    assert!(records.iter().any(|r| r["decision"] == "deny" && r["reason"].as_str().unwrap().contains("too large")));
    assert!(records.iter().all(|r| r["spiffe_id"] == client_id.as_str()
        && r["request_id"].as_str().is_some_and(|id| id.len() == 36)));
    drop(p);
    // `sigil audit` reads the same records; one flipped byte in a middle record is named.
    let verify = |path: &Path| {
        run(Command::new(common::sigil_bin())
            .args(["audit", "verify"])
            .arg(path))
    };
    let (ok, out, _) = verify(&audit);
    assert!(
        ok && out.contains(&format!("{} records verify", records.len())),
        "{out}"
    );
    let (ok, shown, _) = run(Command::new(common::sigil_bin())
        .args(["audit", "show"])
        .arg(&audit));
    assert!(ok);
    assert_eq!(shown.lines().count(), records.len());
    let mut bytes = std::fs::read(&audit).unwrap();
    let second = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(1)
        .unwrap()
        .0;
    bytes[second + 30] ^= 0x01;
    let bad = tmp.path().join("tampered.log");
    std::fs::write(&bad, &bytes).unwrap();
    let (ok, _, err) = verify(&bad);
    assert!(!ok && err.contains("record 1 "), "{err}");

    // An audit log that cannot be written: nothing is forwarded, the client gets 503.
    let p = start_proxy(
        &s,
        &tmp.path().join("p2"),
        up.port,
        &["--audit-log", "/dev/full"],
    );
    let (_, code, body) = call(
        &p,
        &bundle,
        Some((&cert, &key)),
        std::slice::from_ref(&auth),
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("audit"), "{body}");
}

/// An upstream that streams Server-Sent Events, pausing between chunks.
fn sse_upstream() -> Upstream {
    let script = r#"
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(3):
            data = f"data: chunk-{i}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(1.0)
        self.wfile.write(b"0\r\n\r\n")
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    Upstream::start_script(script)
}

#[test]
fn sse_streams_through_unbuffered_and_smuggled_requests_never_reach_the_upstream() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let client_id = register(&s, "agent", "factory-floor");
    let up = sse_upstream();
    let audit = tmp.path().join("audit.log");
    let p = start_proxy(
        &s,
        tmp.path(),
        up.port,
        &["--audit-log", audit.to_str().unwrap()],
    );
    let c = Client::new(&s, &client_id, &tmp.path().join("c1"));
    let (cert, key, bundle, auth) = (c.cert.clone(), c.key.clone(), c.bundle.clone(), c.auth());

    // The first event reaches the client while the upstream is still pausing before the next.
    let started = Instant::now();
    let mut child = Command::new("curl")
        .args(["-sN", "--cacert"])
        .arg(&bundle)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args([
            "-H",
            &auth,
            &format!("https://localhost:{}/v1/chat/completions", p.port),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first, "data: chunk-0");
    let rest: Vec<String> = lines
        .map_while(Result::ok)
        .filter(|l| !l.is_empty())
        .collect();
    let total = started.elapsed();
    assert_eq!(rest, ["data: chunk-1", "data: chunk-2"]);
    assert!(
        total >= Duration::from_secs(2),
        "upstream pauses 1 s between chunks"
    );
    assert!(
        first_at + Duration::from_millis(1500) < total,
        "first chunk {first_at:?} was held until the end {total:?}"
    );
    child.wait().unwrap();
    // Request smuggling: with conflicting Content-Length and Transfer-Encoding the proxy
    // (hyper, RFC 9112 §6.3) frames by Transfer-Encoding, drops Content-Length and closes the
    // connection after answering, so the request hidden behind the first one is never parsed;
    // the upstream receives one well-framed request. Sent raw over TLS with openssl s_client.
    let echo = Upstream::start();
    let a2 = tmp.path().join("a2.jsonl");
    let p = start_proxy(
        &s,
        &tmp.path().join("p2"),
        echo.port,
        &["--audit-log", a2.to_str().unwrap()],
    );
    let chunk = r#"{"model":"m"}"#;
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n{auth}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n\r\n",
        chunk.len()
    );
    let mut ossl = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{}", p.port),
            "-CAfile",
        ])
        .arg(&bundle)
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .args(["-servername", "localhost", "-alpn", "http/1.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = ossl.stdin.take().unwrap();
        stdin.write_all(raw.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(800));
    }
    let out = ossl.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "the smuggled request got an answer: {text}"
    );
    assert!(text.contains("\"path\": \"/v1/completions\""), "{text}");
    assert!(text.contains(r#""body": "{\"model\":\"m\"}""#), "{text}");
    assert!(!text.contains("/admin"), "{text}");
    drop(up);
}

#[test]
fn cedar_policy_decides_on_models_tools_and_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let mk = |name: &str, group: &str| {
        let c = Client::new(&s, &register(&s, name, group), &tmp.path().join(name));
        let auth = c.auth();
        (c.cert, c.key, c.bundle, auth)
    };
    let floor = mk("camera", "factory-floor");
    let office = mk("office-bot", "office");
    let up = Upstream::start();
    let audit = tmp.path().join("audit.log");
    // Per identity × model: two calls to defect-detector, then wait (an hour per token).
    let conf = tmp.path().join("proxy.toml");
    std::fs::write(
        &conf,
        "[[resource_rate_limits]]\nresource_type = \"Model\"\nresource_id = \"defect-detector\"\n\
         per_sec = 0.0003\nburst = 2\n",
    )
    .unwrap();
    let p = start_proxy(
        &s,
        tmp.path(),
        up.port,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "-c",
            conf.to_str().unwrap(),
        ],
    );
    let post = |who: &(PathBuf, PathBuf, PathBuf, String), path: &str, body: &str| {
        let f = tmp.path().join(format!("body-{}", body.len()));
        std::fs::write(&f, body).unwrap();
        call_path(
            &p,
            &who.2,
            Some((&who.0, &who.1)),
            &[who.3.clone(), "content-type: application/json".into()],
            &["--data-binary", &format!("@{}", f.display())],
            path,
        )
    };
    // Only factory-floor may invoke defect-detector; other models are denied to everyone.
    let (_, code, body) = post(
        &floor,
        "/v1/chat/completions",
        r#"{"model":"defect-detector","messages":[]}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (_, code, body) = post(
        &office,
        "/v1/chat/completions",
        r#"{"model":"defect-detector","messages":[]}"#,
    );
    assert_eq!(code, 403, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["type"], "permission_error");
    let (_, code, _) = post(
        &floor,
        "/v1/chat/completions",
        r#"{"model":"gpt-x","messages":[]}"#,
    );
    assert_eq!(code, 403);
    // The per-model limit: the second call passes, the third is refused with 429 and
    // Retry-After; another model is not limited.
    let (_, code, body) = post(
        &floor,
        "/v1/chat/completions",
        r#"{"model":"defect-detector","messages":[]}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (_, code, body) = post(
        &floor,
        "/v1/chat/completions",
        r#"{"model":"defect-detector","messages":[]}"#,
    );
    assert_eq!(code, 429, "{body}");
    assert!(
        body.contains("rate_limit_error") && body.contains("defect-detector"),
        "{body}"
    );
    let (_, code, body) = post(
        &floor,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[]}"#,
    );
    assert_eq!(code, 200, "{body}");
    // MCP: an allowed tool passes; a forbidden one is refused, also hidden in a batch.
    let (_, code, body) = post(
        &floor,
        "/mcp",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_sensor","arguments":{}}}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (_, code, body) = post(
        &floor,
        "/mcp",
        r#"{"jsonrpc":"2.0","id":"a1","method":"tools/call","params":{"name":"shutdown_line"}}"#,
    );
    assert_eq!(code, 403);
    // MCP refusals are JSON-RPC error objects answering the request's id.
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["jsonrpc"], "2.0");
    assert_eq!(err["id"], "a1");
    assert_eq!(err["error"]["code"], -32003);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutdown_line")
    );
    let (_, code, body) = post(
        &floor,
        "/mcp",
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"shutdown_line"}}]"#,
    );
    assert_eq!(code, 403, "a batch hid a forbidden call: {body}");
    let errs: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&serde_json::Value> = errs.as_array().unwrap().iter().map(|e| &e["id"]).collect();
    assert_eq!(
        ids,
        [&serde_json::json!(1), &serde_json::json!(2)],
        "{body}"
    );
    // Unauthenticated MCP calls get a JSON-RPC error too (id unknown before the body is read).
    let (_, code, body) = call_path(
        &p,
        &floor.2,
        Some((&floor.0, &floor.1)),
        &["content-type: application/json".into()],
        &[
            "--data-binary",
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/list"}"#,
        ],
        "/mcp",
    );
    assert_eq!(code, 401, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], -32001, "{body}");
    // The decisions name the policies that made them.
    // Read back through the verifying reader (length + CRC-32C per record).
    let records = sigil_proxy::read_records(&audit).unwrap();
    let allowed = records
        .iter()
        .find(|r| r["decision"] == "allow" && r["calls"][0]["resource_id"] == "defect-detector")
        .unwrap();
    assert_eq!(
        allowed["policy_ids"],
        serde_json::json!(["factory-floor-models"])
    );
    assert!(records.iter().any(|r| {
        r["decision"] == "deny"
            && r["reason"]
                .as_str()
                .unwrap()
                .contains("Tool::\"shutdown_line\"")
    }));
}

/// A chat completion for Model::"m" (TEST_POLICY lets factory-floor invoke it).
const CHAT_M: &str = r#"{"model":"m","messages":[]}"#;

#[test]
fn proxy_takes_its_identity_from_the_agent_rotates_it_and_cuts_off_revoked_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    let proxy_id = format!("spiffe://{TD}/proxy");
    // The proxy is a workload like any other: its entry, its SVID from the agent, a short TTL
    // so the test sees it rotate.
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
        "--x509-ttl",
        "60",
        "--enforcer",
    ]);
    let agent = common::Agent::start(&s, &tmp.path().join("agent"), jt["token"].as_str());
    // TEST_POLICY lets spiffe://td.test/agent make plain HTTP calls.
    let victim = Client::new(
        &s,
        &register(&s, "agent", "factory-floor"),
        &tmp.path().join("agent-client"),
    );
    let up = Upstream::start();
    let creds = [
        "--workload-api-socket".to_owned(),
        format!("unix://{}", agent.socket.display()),
        "--spiffe-id".into(),
        proxy_id.clone(),
    ];
    let audit = tmp.path().join("audit.log");
    let p = spawn_proxy(
        &s,
        &tmp.path().join("p"),
        &format!("http://127.0.0.1:{}", up.port),
        &creds,
        &["--audit-log", audit.to_str().unwrap()],
    );
    let bundle_pem = std::fs::read_to_string(&victim.bundle).unwrap();

    // The proxy serves with the SVID the agent gave it (its SPIFFE ID, DNS name localhost).
    let mut conn = KeptConnection::open(p.port, &bundle_pem, &victim.cert, &victim.key).unwrap();
    let first = conn.server_cert();
    let (_, leaf) = x509_parser::parse_x509_certificate(&first).unwrap();
    let sans = format!(
        "{:?}",
        leaf.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(
        sans.contains(&proxy_id) && sans.contains("localhost"),
        "{sans}"
    );
    assert_eq!(conn.get("/v1/echo", &victim.token).unwrap(), 200);

    // Rotation: the agent renews the proxy's SVID at half-life; new connections get the new
    // certificate with no restart, and the connection opened before keeps working. It is
    // used while the test waits: an idle keep-alive connection is closed once
    // header_read_timeout_secs (30 s by default, about the SVID's half-life here) pass
    // without a request, which is not what this test is about.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = KeptConnection::open(p.port, &bundle_pem, &victim.cert, &victim.key).unwrap();
        if c.server_cert() != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy's SVID was not rotated"
        );
        assert_eq!(conn.get("/v1/echo", &victim.token).unwrap(), 200);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(conn.get("/v1/echo", &victim.token).unwrap(), 200);

    // Revocation: the client's open keep-alive connection is closed, and it cannot
    // reconnect; another identity is unaffected. (The server pushes the revocation to the
    // agent, the agent to the proxy.)
    let bystander = Client::new(
        &s,
        &format!("spiffe://{TD}/agent"),
        &tmp.path().join("bystander"),
    );
    let (bc, bk, bystander_token) = (&bystander.cert, &bystander.key, &bystander.token);
    let mut other = KeptConnection::open(p.port, &bundle_pem, bc, bk).unwrap();
    assert_eq!(other.get("/v1/echo", bystander_token).unwrap(), 200);
    // And another identity altogether, on its own kept connection.
    let camera = Client::new(
        &s,
        &register(&s, "camera", "factory-floor"),
        &tmp.path().join("camera"),
    );
    let chat = CHAT_M;
    let mut cam = KeptConnection::open(p.port, &bundle_pem, &camera.cert, &camera.key).unwrap();
    assert_eq!(
        cam.send("POST", "/v1/chat/completions", &camera.token, chat)
            .unwrap(),
        200
    );
    let serial = victim.minted["serial"].as_str().unwrap().to_owned();
    s.sigil_json(&["svid", "revoke", &serial]);
    // Within a second (server, then agent, then proxy, which wakes the connection).
    let took = conn.closed_within(Duration::from_secs(1));
    assert!(
        took.is_some(),
        "the revoked client's connection stayed open for more than 1 s"
    );
    eprintln!("revoked connection closed {took:?} after `sigil svid revoke` returned");
    let refused = KeptConnection::open(p.port, &bundle_pem, &victim.cert, &victim.key)
        .and_then(|mut c| c.get("/v1/echo", &victim.token));
    assert!(
        refused.is_err(),
        "a revoked SVID connected again: {refused:?}"
    );
    // The same SPIFFE ID with another (unrevoked) certificate, on its open connection: fine.
    assert_eq!(other.get("/v1/echo", bystander_token).unwrap(), 200);
    assert_eq!(
        cam.send("POST", "/v1/chat/completions", &camera.token, chat)
            .unwrap(),
        200
    );
    drop(agent);
}

#[test]
fn proxy_forwards_to_unix_socket_and_http2_upstreams() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let client_id = register(&s, "agent", "factory-floor");
    let c = Client::new(&s, &client_id, &tmp.path().join("client"));
    let (cert, key, bundle, auth) = (c.cert.clone(), c.key.clone(), c.bundle.clone(), c.auth());

    // An upstream on a unix socket (HTTP/1.1).
    let sock = tmp.path().join("up.sock");
    let _unix_up = Upstream::start_unix(&sock);
    let audit = tmp.path().join("audit.log");
    let audit_flag = ["--audit-log", audit.to_str().unwrap()];
    let p = start_proxy_to(
        &s,
        &tmp.path().join("p1"),
        &format!("unix://{}", sock.display()),
        &audit_flag,
    );
    let (_, code, body) = call(
        &p,
        &bundle,
        Some((&cert, &key)),
        std::slice::from_ref(&auth),
    );
    assert_eq!(code, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/v1/echo?x=1");
    assert_eq!(seen["headers"]["x-sigil-spiffe-id"], client_id);
    drop(p);

    // HTTP/2 with prior knowledge: the demo model server speaks it; the HTTP/1-only echo
    // server does not, which shows the proxy really sends HTTP/2.
    let model_port = free_port();
    let _model = Reaped(
        Command::new(common::sigil_bin())
            .args(["demo-model", "--listen", &format!("127.0.0.1:{model_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", model_port)).is_err() {
        assert!(Instant::now() < deadline, "demo model did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = start_proxy_to(
        &s,
        &tmp.path().join("p2"),
        &format!("http://127.0.0.1:{model_port}"),
        &["--upstream-http2", audit_flag[0], audit_flag[1]],
    );
    let f = tmp.path().join("chat.json");
    std::fs::write(
        &f,
        r#"{"model":"defect-detector","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    let (_, code, body) = call_path(
        &p,
        &bundle,
        Some((&cert, &key)),
        &[auth.clone(), "content-type: application/json".into()],
        &["--data-binary", &format!("@{}", f.display())],
        "/v1/chat/completions",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("chat.completion"), "{body}");
    drop(p);
    let echo = Upstream::start();
    let p = start_proxy_to(
        &s,
        &tmp.path().join("p3"),
        &format!("http://127.0.0.1:{}", echo.port),
        &["--upstream-http2", audit_flag[0], audit_flag[1]],
    );
    let (_, code, body) = call(
        &p,
        &bundle,
        Some((&cert, &key)),
        std::slice::from_ref(&auth),
    );
    assert_eq!(code, 502, "an HTTP/1-only upstream answered HTTP/2: {body}");
}

/// A child process killed and reaped when dropped (also when a test fails).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_oversized_body_gets_its_413_not_a_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("srv"), &[]);
    let client_id = register(&s, "agent", "factory-floor");
    let up = Upstream::start();
    let audit = tmp.path().join("audit.log");
    let p = start_proxy(
        &s,
        tmp.path(),
        up.port,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--max-body-bytes",
            "4096",
        ],
    );
    let c = Client::new(&s, &client_id, &tmp.path().join("c1"));
    let (cert, key, bundle, auth) = (c.cert.clone(), c.key.clone(), c.bundle.clone(), c.auth());
    // The proxy reads (and drops) a bounded rest of the body before answering, so no unread
    // bytes make the kernel reset the connection ahead of the 413: the client gets the
    // refusal every time, whether the length was declared or the body chunked.
    let bigger = tmp.path().join("bigger.json");
    std::fs::write(&bigger, "x".repeat(200_000)).unwrap();
    for chunked in [false, true] {
        for _ in 0..5 {
            let mut headers = vec![auth.clone()];
            if chunked {
                headers.push("Transfer-Encoding: chunked".into());
            }
            let (_, code, _) = call_with(
                &p,
                &bundle,
                Some((&cert, &key)),
                &headers,
                &["--data-binary", &format!("@{}", bigger.display())],
            );
            assert_eq!(code, 413, "chunked: {chunked}");
        }
    }
}
