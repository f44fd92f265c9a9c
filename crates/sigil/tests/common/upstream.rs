//! A real HTTP upstream for proxy tests: Python's http.server answering every request with
//! what it received (path, method, body, headers) as JSON.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The echo handler, in Python (defines class `H`).
pub const ECHO_HANDLER: &str = r#"
import json, sys, socketserver
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_one(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n).decode() if n else ""
        out = json.dumps({"path": self.path, "method": self.command, "body": body,
                          "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = handle_one
    def log_message(self, *a): pass
    def address_string(self): return "local"
"#;

/// The echo upstream on a loopback port (or a unix socket); killed when dropped.
pub struct Upstream {
    child: Child,
    pub port: u16,
}

impl Upstream {
    /// On a free loopback port.
    pub fn start() -> Self {
        Self::start_script(&format!(
            "{ECHO_HANDLER}\nThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()"
        ))
    }

    /// A Python `script` that serves on the loopback port given as its first argument.
    pub fn start_script(script: &str) -> Self {
        let port = free_port();
        let child = spawn(script, &port.to_string());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "upstream did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    /// On the unix socket `path` (`port` is 0).
    pub fn start_unix(path: &Path) -> Self {
        let script = format!(
            "{ECHO_HANDLER}\nclass S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):\n    daemon_threads = True\nS(sys.argv[1], H).serve_forever()"
        );
        let child = spawn(&script, path.to_str().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(path).is_err() {
            assert!(Instant::now() < deadline, "unix upstream did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port: 0 }
    }
}

fn spawn(script: &str, arg: &str) -> Child {
    Command::new("python3")
        .args(["-c", script, arg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
