//! The proxy forwards only what it has read in exactly one way. Each test is an attack by a
//! workload with a valid SVID and token that may invoke model `m` and call some tools: a
//! request that a real upstream reads differently from the proxy (charset, colliding keys,
//! model-choosing fields, path spellings, id spellings, MCP methods beyond tools, identity
//! headers, batches, slow clients). Real processes: `sigil server`, `sigil proxy`, a Python
//! upstream that answers like an OpenAI/MCP server, and `curl` / a rustls client.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::proxy::{Client, KeptConnection, Proxy, call_path, register, start_proxy_env};
use common::upstream::Upstream;
use common::{Server, TD};

/// An upstream that answers like a model and MCP server: a model list on `GET /v1/models`,
/// `tools/list` and `resources/list` answers (whatever the id), a session id on
/// `initialize`; everything else echoed (path, body, headers) as JSON.
const UPSTREAM: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
TOOLS = [{"name": "read_sensor"}, {"name": "shutdown_line"}]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def reply(self, obj, extra=()):
        self.raw(json.dumps(obj), extra)
    def echo(self, raw=b""):
        self.reply({"path": self.path, "method": self.command, "body": raw.decode("utf-8", "replace"),
                    "headers": [[k.lower(), v] for k, v in self.headers.items()]})
    def do_GET(self):
        if self.path == "/mcp":
            # A server-to-client stream replaying an earlier tools/list answer.
            return self.sse('event: message\nid: 1\ndata: {"jsonrpc":"2.0","id":5,"result":{"tools":%s}}\n\n' % json.dumps(TOOLS))
        if self.path.rstrip("/").lower() in ("/v1/models", "/models"):
            return self.reply({"object": "list", "data": [{"id": "m"}, {"id": "forbidden"}]})
        self.echo()
    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            msg = json.loads(raw)
        except Exception:
            msg = None
        if isinstance(msg, dict) and "jsonrpc" in msg:
            # Integer ids come back spelled as floats (as a JavaScript or Python server
            # holding them as numbers may): the answer to 7 is 7.0.
            rid = msg.get("id")
            rid = json.dumps(float(rid) if isinstance(rid, int) else rid)
            method = msg.get("method")
            if method == "initialize":
                body = '{"jsonrpc":"2.0","id":%s,"result":{}}' % rid
                return self.raw(body, [("mcp-session-id", "s-%d" % id(msg))])
            if method == "tools/list" and rid == '"dup"':
                # Every tool under a first `result`, none under a second (a first-wins
                # client reads the first; serde_json the second).
                return self.raw('{"jsonrpc":"2.0","id":%s,"result":{"tools":%s},"result":{"tools":[]}}' % (rid, json.dumps(TOOLS)))
            if method == "tools/list" and rid == '"surrogate"':
                # As an SSE event whose data JSON.parse takes and serde_json refuses.
                return self.sse('event: message\ndata: {"jsonrpc":"2.0","id":"surrogate","result":{"tools":%s},"x":"\\ud800"}\n\n' % json.dumps(TOOLS))
            if method == "tools/list":
                return self.raw('{"jsonrpc":"2.0","id":%s,"result":{"tools":%s}}' % (rid, json.dumps(TOOLS)))
        self.echo(raw)
    def sse(self, events):
        self.raw(events, content_type="text/event-stream")
    def raw(self, body, extra=(), content_type="application/json"):
        out = body.encode()
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(out)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// MCP for the factory floor: any `mcp` method (initialize, ping, ...), and resources only
/// under `file:///data/` (the read_resource permit lives in its own file: the schema of
/// older proxies had no such action).
const MCP_POLICY: &str = r#"
@id("floor-mcp")
permit (principal in Group::"factory-floor", action == Action::"mcp", resource);
"#;

/// A server, the upstream, a proxy (with `env` settings) and a client `agent` in group
/// factory-floor (may invoke `m`, call tools except `shutdown_line`, and `http`).
struct World {
    s: Server,
    _up: Upstream,
    p: Proxy,
    c: Client,
    dir: tempfile::TempDir,
}

fn world(env: &[(&str, &str)], extra: &[&str]) -> World {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("srv"), &[]);
    let id = register(&s, "agent", "factory-floor");
    let up = Upstream::start_script(UPSTREAM);
    let audit = dir.path().join("audit.log");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("mcp.cedar"), MCP_POLICY).unwrap();
    let mut args = vec!["--audit-log", audit.to_str().unwrap()];
    args.extend_from_slice(extra);
    let p = start_proxy_env(
        &s,
        dir.path(),
        &format!("http://127.0.0.1:{}", up.port),
        &args,
        env,
    );
    let c = Client::new(&s, &id, &dir.path().join("agent"));
    World {
        s,
        _up: up,
        p,
        c,
        dir,
    }
}

impl World {
    /// `curl` with the client's credentials and token: (status, body).
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&str>,
    ) -> (u16, String) {
        let mut h = vec![self.c.auth()];
        h.extend(headers.iter().map(|s| (*s).to_owned()));
        let f = self.dir.path().join("body");
        let mut extra = vec!["--path-as-is", "-X", method];
        let data;
        if let Some(b) = body {
            std::fs::write(&f, b).unwrap();
            data = format!("@{}", f.display());
            extra.extend(["--data-binary", &data]);
        }
        let (_, code, out) = call_path(
            &self.p,
            &self.c.bundle,
            Some((&self.c.cert, &self.c.key)),
            &h,
            &extra,
            path,
        );
        (code, out)
    }

    fn post_json(&self, path: &str, body: &str) -> (u16, String) {
        self.send(
            "POST",
            path,
            &["content-type: application/json"],
            Some(body),
        )
    }

    /// Each of `bodies` posted as JSON to `path` gets `code`.
    fn each_gets(&self, code: u16, path: &str, bodies: &[&str]) {
        for body in bodies {
            let (got, out) = self.post_json(path, body);
            assert_eq!(got, code, "{path} {body}: {out}");
        }
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn a_charset_or_content_coding_the_proxy_does_not_read_is_refused() {
    let w = world(&[], &[]);
    let allowed =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_sensor"}}"#;
    let (code, body) = w.post_json("/mcp", allowed);
    assert_eq!(code, 200, "{body}");
    // UTF-7: `+ACI-` is `"`; an upstream decoding by the declared charset reads a second
    // "name" here, calling shutdown_line.
    let utf7 = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_sensor","x":"+ACIAfQB9ACwAIgBuAGEAbQBl-"}}"#;
    for ct in [
        "content-type: application/json; charset=utf-7",
        "content-type: application/json; charset=UTF-16LE",
        "content-type: application/json; charset=latin1",
    ] {
        let (code, body) = w.send("POST", "/mcp", &[ct], Some(utf7));
        assert_eq!(code, 415, "{ct}: {body}");
    }
    let (code, body) = w.send(
        "POST",
        "/v1/chat/completions",
        &["content-type: application/json", "content-encoding: gzip"],
        Some(r#"{"model":"m"}"#),
    );
    assert_eq!(code, 415, "{body}");
    let (code, _) = w.send(
        "POST",
        "/v1/chat/completions",
        &["content-type: application/json; charset=utf-8"],
        Some(r#"{"model":"m"}"#),
    );
    assert_eq!(code, 200);
}

#[test]
fn keys_an_upstream_reads_as_one_are_refused_at_every_level() {
    let w = world(&[], &[]);
    w.each_gets(400, "/v1/chat/completions", &[
        // Go's encoding/json matches "Model" to the model field (last wins): runs forbidden.
        r#"{"model":"m","Model":"forbidden","messages":[]}"#,
        // Exact duplicates: serde_json and Python keep the last, some parsers the first.
        r#"{"model":"forbidden","model":"m","messages":[]}"#,
        // Unicode folding: U+212A KELVIN SIGN folds to k.
        "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"a\",\"\u{212a}\":1,\"k\":2}]}",
        // Escapes are decoded first.
        r#"{"model":"m","mod\u0065l":"forbidden"}"#,
    ]);
    let (code, out) = w.post_json(
        "/mcp",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_sensor","Name":"shutdown_line"}}"#,
    );
    assert_eq!(code, 400, "{out}");
    let (code, _) = w.post_json("/v1/chat/completions", r#"{"model":"m","messages":[]}"#);
    assert_eq!(code, 200);
}

#[test]
fn every_field_that_chooses_a_model_is_authorized() {
    let w = world(&[], &[]);
    w.each_gets(
        403,
        "/v1/chat/completions",
        &[
            r#"{"model":"m","fallbacks":["forbidden"],"messages":[]}"#,
            r#"{"model":"m","fallbacks":[{"model":"forbidden"}],"messages":[]}"#,
            r#"{"model":"m","context_window_fallbacks":[{"m":["forbidden"]}],"messages":[]}"#,
            r#"{"model":"m","models":["m","forbidden"],"messages":[]}"#,
        ],
    );
    let (code, out) = w.post_json(
        "/v1/chat/completions",
        r#"{"model":"m","fallbacks":["m"],"messages":[]}"#,
    );
    assert_eq!(code, 200, "{out}");
}

#[test]
fn every_spelling_of_a_model_route_is_a_model_call_or_refused() {
    // The test policy permits `http` on any endpoint for this client: a path the proxy
    // misreads as a plain endpoint would run the forbidden model.
    let w = world(&[], &[]);
    let forbidden = r#"{"model":"forbidden","messages":[]}"#;
    for path in [
        "/v1/chat/completions/",
        "/V1/CHAT/COMPLETIONS",
        "/v1/Chat/Completions",
        "/completion",
        "/chat/completions",
        "/embedding",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/v1/messages",
        // Not a model route at all: a body naming a model is a model call anywhere.
        "/v1/anything",
    ] {
        let (code, out) = w.post_json(path, forbidden);
        assert_eq!(code, 403, "{path}: {out}");
    }
    for path in [
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/./chat/completions",
        "/v1/chat/../chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/chat/%63ompletions",
        "/v1/chat/completions;x=1",
        "/v1/chat%5ccompletions",
    ] {
        let (code, out) = w.post_json(path, forbidden);
        assert_eq!(code, 400, "{path}: {out}");
    }
    // The model list is filtered whatever its spelling.
    for path in ["/v1/models", "/v1/models/", "/V1/MODELS"] {
        let (code, out) = w.send("GET", path, &[], None);
        assert_eq!(code, 200, "{path}: {out}");
        let ids: Vec<String> = json(&out)["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["m"], "{path}");
    }
}

#[test]
fn mcp_lists_are_filtered_whatever_the_id_and_odd_ids_are_refused() {
    let w = world(&[], &[]);
    // The answer to id 7 comes back as 7.0: filtered all the same.
    let (code, out) = w.post_json("/mcp", r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#);
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("7.0") && out.contains("read_sensor"), "{out}");
    assert!(!out.contains("shutdown_line"), "unfiltered: {out}");
    // A GET stream (which can replay a POST's events) is filtered too.
    let (code, out) = w.send("GET", "/mcp", &["accept: text/event-stream"], None);
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("read_sensor"), "{out}");
    assert!(!out.contains("shutdown_line"), "unfiltered stream: {out}");
    // Answers a client may read otherwise than the proxy: a second `result` is refused (502),
    // an SSE event that opens like JSON but is not strict JSON ends the stream.
    let (code, out) = w.post_json(
        "/mcp",
        r#"{"jsonrpc":"2.0","id":"dup","method":"tools/list"}"#,
    );
    assert_eq!(code, 502, "{out}");
    assert!(!out.contains("shutdown_line"), "unfiltered: {out}");
    let (code, out) = w.post_json(
        "/mcp",
        r#"{"jsonrpc":"2.0","id":"surrogate","method":"tools/list"}"#,
    );
    assert_eq!(code, 200, "{out}");
    assert!(!out.contains("shutdown_line"), "unfiltered stream: {out}");
    for id in ["1.0", "1e0", "-0", "-0.0", "null", "[1]", "{}"] {
        let (code, out) = w.post_json(
            "/mcp",
            &format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#),
        );
        assert_eq!(code, 400, "id {id}: {out}");
        assert!(!out.contains("shutdown_line"), "{out}");
    }
}

#[test]
fn mcp_resources_and_prompts_are_decided_on_their_targets_and_sessions_bound() {
    let w = world(&[], &[]);
    // `mcp` is permitted for the floor; reading a resource is `read_resource` on it, which
    // no policy permits here.
    let (code, out) = w.post_json(
        "/mcp",
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc/shadow"}}"#,
    );
    assert_eq!(code, 403, "{out}");
    assert!(
        out.contains("Resource::\\\"file:///etc/shadow\\\""),
        "{out}"
    );
    let (code, out) = w.post_json(
        "/mcp",
        r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"leak"}}"#,
    );
    assert_eq!(code, 403, "{out}");
    let (code, out) = w.post_json(
        "/mcp",
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:////etc/shadow"}}"#,
    );
    assert_eq!(code, 400, "{out}");

    // Sessions: the one the upstream opens for this client is this client's only.
    let (_, code, out) = call_path(
        &w.p,
        &w.c.bundle,
        Some((&w.c.cert, &w.c.key)),
        &[w.c.auth(), "content-type: application/json".into()],
        &[
            "-D",
            "/dev/stdout",
            "--data-binary",
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#,
        ],
        "/mcp",
    );
    assert_eq!(code, 200, "{out}");
    let session = out
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("mcp-session-id:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no session id: {out}"));
    let ping = r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#;
    let with_session = format!("mcp-session-id: {session}");
    let (code, out) = w.send(
        "POST",
        "/mcp",
        &["content-type: application/json", &with_session],
        Some(ping),
    );
    assert_eq!(code, 200, "owner: {out}");
    // Another identity of the same group presenting it is refused.
    let other_id = register(&w.s, "other", "factory-floor");
    let other = Client::new(&w.s, &other_id, &w.dir.path().join("other"));
    let (_, code, out) = call_path(
        &w.p,
        &other.bundle,
        Some((&other.cert, &other.key)),
        &[
            other.auth(),
            "content-type: application/json".into(),
            with_session.clone(),
        ],
        &["--data-binary", ping],
        "/mcp",
    );
    assert_eq!(code, 403, "another identity used the session: {out}");
    // A session id the proxy never saw opened: start a new session (404).
    let (code, out) = w.send(
        "POST",
        "/mcp",
        &["content-type: application/json", "mcp-session-id: made-up"],
        Some(ping),
    );
    assert_eq!(code, 404, "{out}");
}

#[test]
fn identity_headers_come_only_from_the_proxy() {
    let w = world(&[], &[]);
    let (code, out) = w.send(
        "GET",
        "/v1/echo",
        &[
            "X-Forwarded-Client-Cert: By=spiffe://td.test/x;URI=spiffe://td.test/admin",
            "x_sigil_spiffe_id: spiffe://td.test/admin",
            "x_forwarded_client_cert: URI=spiffe://td.test/admin",
            "Forwarded: for=10.9.9.9;by=admin",
            "X-Forwarded-For: 10.9.9.9",
            "X-Real-IP: 10.9.9.9",
            "X-Forwarded-User: admin",
        ],
        None,
    );
    assert_eq!(code, 200, "{out}");
    let seen = json(&out);
    let headers: Vec<(String, String)> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            (
                kv[0].as_str().unwrap().to_owned(),
                kv[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let client_id = format!("spiffe://{TD}/agent");
    for (k, v) in &headers {
        assert!(
            !v.contains("admin") && !v.contains("10.9.9.9"),
            "{k}: {v} reached the upstream"
        );
    }
    let xfcc: Vec<&String> = headers
        .iter()
        .filter(|(k, _)| k == "x-forwarded-client-cert")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(xfcc.len(), 1, "{headers:?}");
    assert!(
        xfcc[0].starts_with(&format!("By=spiffe://{TD}/proxy;Hash="))
            && xfcc[0].ends_with(&format!(";URI={client_id}")),
        "{}",
        xfcc[0]
    );
    let hash = xfcc[0]
        .split(';')
        .nth(1)
        .unwrap()
        .trim_start_matches("Hash=");
    assert_eq!(hash.len(), 64, "hex SHA-256: {hash}");
    let leaf = pem::parse_many(std::fs::read(&w.c.cert).unwrap()).unwrap();
    use sha2::Digest;
    assert_eq!(hash, hex::encode(sha2::Sha256::digest(leaf[0].contents())));
}

#[test]
fn a_batch_costs_one_rate_limit_token_per_call() {
    let w = world(
        &[],
        &["--rate-limit-per-sec", "0.001", "--rate-limit-burst", "4"],
    );
    let call =
        r#"{"jsonrpc":"2.0","id":%ID%,"method":"tools/call","params":{"name":"read_sensor"}}"#;
    let batch: Vec<String> = (0..6)
        .map(|i| call.replace("%ID%", &i.to_string()))
        .collect();
    let (code, out) = w.post_json("/mcp", &format!("[{}]", batch.join(",")));
    assert_eq!(code, 429, "6 calls on a burst of 4: {out}");
    let (code, out) = w.post_json("/mcp", &format!("[{}]", batch[..3].join(",")));
    assert_eq!(code, 200, "3 calls: {out}");
    // 4 taken so far (1 for the refused batch, 3 for this one): nothing is left.
    let (code, out) = w.post_json("/mcp", &batch[0]);
    assert_eq!(code, 429, "{out}");
}

/// A TLS connection to the proxy with the client's certificate.
fn raw_connection(w: &World) -> KeptConnection {
    let bundle_pem = std::fs::read_to_string(&w.c.bundle).unwrap();
    KeptConnection::open(w.p.port, &bundle_pem, &w.c.cert, &w.c.key).unwrap()
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    let w = world(
        &[
            ("SIGIL_HEADER_READ_TIMEOUT_SECS", "1"),
            ("SIGIL_BODY_READ_TIMEOUT_SECS", "1"),
            ("SIGIL_IDLE_TIMEOUT_SECS", "4"),
        ],
        &[],
    );
    // A head sent byte by byte, never finished.
    let mut conn = raw_connection(&w);
    for b in b"POST /v1/chat/completions HTTP/1.1\r\nhost: local" {
        conn.tls.write_all(&[*b]).unwrap();
        conn.tls.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = conn.closed_within(Duration::from_secs(6));
    assert!(
        took.is_some(),
        "a head that never ends kept the connection open"
    );
    // A body that never ends: refused (408) within the body timeout.
    let mut conn = raw_connection(&w);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":",
        w.c.token
    );
    conn.tls.write_all(head.as_bytes()).unwrap();
    conn.tls.flush().unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    conn.tls
        .sock
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    let n = std::io::Read::read(&mut conn.tls, &mut buf).unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "{answer:?} after {:?}",
        t0.elapsed()
    );
    // A keep-alive connection waiting for its next request is idle, not slow: the header
    // timeout (1 s) does not close it, the idle timeout (4 s) does.
    let mut conn = raw_connection(&w);
    let call = |conn: &mut KeptConnection| {
        conn.send(
            "POST",
            "/v1/chat/completions",
            &w.c.token,
            r#"{"model":"m"}"#,
        )
    };
    assert_eq!(call(&mut conn).unwrap(), 200);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        call(&mut conn).ok(),
        Some(200),
        "a keep-alive connection idle for 2.5 s was closed (header timeout 1 s, idle 4 s)"
    );
    let took = conn.closed_within(Duration::from_secs(10));
    assert!(
        took.is_some_and(|t| t >= Duration::from_secs(3)),
        "an idle connection must be closed after the idle timeout (4 s), not before: {took:?}"
    );
    // The next request's head, once begun, is due within the header timeout again.
    let mut conn = raw_connection(&w);
    assert_eq!(call(&mut conn).unwrap(), 200);
    conn.tls
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: l")
        .unwrap();
    conn.tls.flush().unwrap();
    let took = conn.closed_within(Duration::from_secs(10));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(3)),
        "a second head left unfinished must be cut by the header timeout (1 s): {took:?}"
    );
}

/// Two calls by `curl` on one connection, 3 s apart (`--rate 20/m`), over HTTP/1.1 and over
/// HTTP/2: with a 1 s header timeout and a 4 s idle timeout, the second call reuses the
/// first one's connection. Over HTTP/2 the head clock is off once the preface is seen.
#[test]
fn keep_alive_connections_outlive_the_header_timeout() {
    let w = world(
        &[
            ("SIGIL_HEADER_READ_TIMEOUT_SECS", "1"),
            ("SIGIL_IDLE_TIMEOUT_SECS", "4"),
        ],
        &[],
    );
    let url = format!("https://localhost:{}/v1/chat/completions", w.p.port);
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = std::process::Command::new("curl")
            .args(["-sS", flag, "--rate", "20/m", "--cacert"])
            .arg(&w.c.bundle)
            .arg("--cert")
            .arg(&w.c.cert)
            .arg("--key")
            .arg(&w.c.key)
            .args(["-H", &w.c.auth(), "-H", "content-type: application/json"])
            .args(["--data-binary", r#"{"model":"m"}"#])
            .args(["-o", "/dev/null", "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{http_version} %{num_connects}\\n"])
            .args([&url, &url])
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.lines().collect::<Vec<_>>(),
            [format!("200 {version} 1"), format!("200 {version} 0")],
            "{flag}: a second call 3 s later must reuse the connection; {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An HTTP/2 client that pings while it has no request open (hyper's keep-alive, every
/// 300 ms) is idle, not slow: with a 1 s header timeout its connection still serves a
/// second call 2.5 s after the first (read as HTTP/1, each ping would start a head clock).
/// And it is idle: its pings do not keep the connection past the idle timeout.
#[test]
fn http2_pings_between_requests_are_not_a_slow_head() {
    use http_body_util::BodyExt;
    let w = world(
        &[
            ("SIGIL_HEADER_READ_TIMEOUT_SECS", "1"),
            ("SIGIL_IDLE_TIMEOUT_SECS", "4"),
        ],
        &[],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pem = std::fs::read_to_string(&w.c.bundle).unwrap();
        // ALPN h2.
        let cfg = common::client_tls(&pem, Some((&w.c.cert, &w.c.key)));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", w.p.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_millis(300))
                .keep_alive_while_idle(true)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let url = format!("https://localhost:{}/v1/chat/completions", w.p.port);
        let call = || {
            http::Request::post(&url)
                .header("authorization", format!("Bearer {}", w.c.token))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(hyper::body::Bytes::from_static(
                    br#"{"model":"m"}"#,
                )))
                .unwrap()
        };
        let first = send.send_request(call()).await.unwrap();
        assert_eq!(first.status(), 200);
        first.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let second = send.send_request(call()).await;
        assert_eq!(
            second.as_ref().map(|r| r.status().as_u16()).ok(),
            Some(200),
            "an HTTP/2 connection pinging while idle was closed: {:?}",
            second.err()
        );
        if let Ok(r) = second {
            r.into_body().collect().await.unwrap();
        }
        // Pings are not requests: with none open for the idle timeout (4 s), the connection
        // is closed although frames keep moving.
        tokio::time::sleep(Duration::from_millis(5500)).await;
        let third = send.send_request(call()).await;
        assert!(
            third.is_err(),
            "an HTTP/2 connection with no request for 5.5 s (idle timeout 4 s) was kept open \
             by its pings: {:?}",
            third.map(|r| r.status())
        );
    });
}
