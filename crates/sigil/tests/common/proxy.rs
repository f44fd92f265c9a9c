//! The proxy under test: `sigil proxy` started standalone against a test server, a policy
//! every proxy test shares, `curl` as the client, and clients with minted SVIDs and tokens.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Server, TD, free_port, run, token_request};

pub struct Proxy {
    pub child: Child,
    pub port: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The policies every proxy in these tests runs with.
pub const TEST_POLICY: &str = r#"
@id("agent-http")
permit (principal == Workload::"spiffe://td.test/agent", action in [Action::"http", Action::"list_models"], resource);

@id("factory-floor-models")
permit (principal in Group::"factory-floor", action == Action::"invoke", resource)
when {
  (resource == Model::"m" || resource == Model::"defect-detector") &&
  context.scopes.contains("model:invoke")
};

@id("factory-floor-tools")
permit (principal in Group::"factory-floor", action in [Action::"call_tool", Action::"list_tools"], resource)
unless { resource == Tool::"shutdown_line" };
"#;

pub fn start_proxy(s: &Server, dir: &Path, upstream: u16, extra: &[&str]) -> Proxy {
    start_proxy_to(s, dir, &format!("http://127.0.0.1:{upstream}"), extra)
}

/// [`start_proxy`] with any upstream address (`http://…` or `unix://…`).
pub fn start_proxy_to(s: &Server, dir: &Path, upstream: &str, extra: &[&str]) -> Proxy {
    start_proxy_env(s, dir, upstream, extra, &[])
}

/// [`start_proxy_to`] with `SIGIL_*` settings in the environment.
pub fn start_proxy_env(
    s: &Server,
    dir: &Path,
    upstream: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proxy {
    std::fs::create_dir_all(dir).unwrap();
    let (pdir, bundle) = s.proxy_credentials(dir, &format!("spiffe://{TD}/proxy"));
    let creds = [
        "--cert".to_owned(),
        pdir.join("svid.pem").display().to_string(),
        "--key".into(),
        pdir.join("key.pem").display().to_string(),
        "--bundle".into(),
        bundle.display().to_string(),
    ];
    spawn_proxy_env(s, dir, upstream, &creds, extra, env)
}

/// Starts `sigil proxy` with `creds` (files or the agent's socket) and the test policies.
pub fn spawn_proxy(
    s: &Server,
    dir: &Path,
    upstream: &str,
    creds: &[String],
    extra: &[&str],
) -> Proxy {
    spawn_proxy_env(s, dir, upstream, creds, extra, &[])
}

/// [`spawn_proxy`] with `SIGIL_*` settings in the environment.
pub fn spawn_proxy_env(
    s: &Server,
    dir: &Path,
    upstream: &str,
    creds: &[String],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proxy {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("test.cedar"), TEST_POLICY).unwrap();
    let port = free_port();
    let child = Command::new(super::sigil_bin())
        .args([
            "proxy",
            "--trust-domain",
            TD,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--upstream", upstream, "--audience", "model-gw"])
        .args(["--issuer", &s.url("")])
        .args(creds)
        .arg("--policy-dir")
        .arg(&policies)
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "proxy did not start: {}",
            std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Proxy { child, port }
}

/// `curl` through the proxy: (curl succeeded, HTTP status, body).
pub fn call(
    p: &Proxy,
    bundle: &Path,
    cert: Option<(&Path, &Path)>,
    headers: &[String],
) -> (bool, u16, String) {
    call_with(p, bundle, cert, headers, &[])
}

pub fn call_with(
    p: &Proxy,
    bundle: &Path,
    cert: Option<(&Path, &Path)>,
    headers: &[String],
    extra: &[&str],
) -> (bool, u16, String) {
    call_path(p, bundle, cert, headers, extra, "/v1/echo?x=1")
}

pub fn call_path(
    p: &Proxy,
    bundle: &Path,
    cert: Option<(&Path, &Path)>,
    headers: &[String],
    extra: &[&str],
    path: &str,
) -> (bool, u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "--cacert"])
        .arg(bundle);
    cmd.args(extra);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("https://localhost:{}{path}", p.port));
    let (ok, out, _) = run(&mut cmd);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (ok, code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Registers `spiffe://td.test/<name>` in `group` with scope model:invoke (under a node that
/// never connects: these clients get their SVIDs minted by the admin); its SPIFFE ID.
pub fn register(s: &Server, name: &str, group: &str) -> String {
    register_entry(s, name, Some(group))
}

/// [`register`], in a group or in none.
pub fn register_entry(s: &Server, name: &str, group: Option<&str>) -> String {
    let id = format!("spiffe://{TD}/{name}");
    let parent = format!("spiffe://{TD}/sigil/node/n");
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        &id,
        "--parent-id",
        &parent,
        "--selector",
        "unix:uid:1",
        "--scope",
        "model:invoke",
    ];
    if let Some(g) = group {
        args.extend(["--group", g]);
    }
    s.sigil_json(&args);
    id
}

/// A client with a minted SVID and a bound token for the proxy's audience.
pub struct Client {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    pub token: String,
    /// What `sigil svid mint` said (serial, ...).
    pub minted: serde_json::Value,
}

impl Client {
    pub fn new(s: &Server, id: &str, dir: &Path) -> Self {
        let minted = s.mint(id, dir);
        let (cert, key, bundle) = files(dir);
        let (code, body) = token_request(
            s,
            &bundle,
            Some((&cert, &key)),
            &["grant_type=client_credentials", "resource=model-gw"],
        );
        assert_eq!(code, 200, "{body}");
        let token = body["access_token"].as_str().unwrap().to_owned();
        Self {
            cert,
            key,
            bundle,
            token,
            minted,
        }
    }

    pub fn auth(&self) -> String {
        format!("Authorization: Bearer {}", self.token)
    }
}

pub fn files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("svid.pem"),
        dir.join("key.pem"),
        dir.join("bundle.pem"),
    )
}

/// A blocking HTTP/1.1 keep-alive connection over mTLS.
pub struct KeptConnection {
    pub tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl KeptConnection {
    /// Connects; Err if the handshake (or the first read) is refused.
    pub fn open(port: u16, bundle_pem: &str, cert: &Path, key: &Path) -> std::io::Result<Self> {
        let mut cfg = (*super::client_tls(bundle_pem, Some((cert, key)))).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Self { tls })
    }

    /// The server's leaf certificate (DER).
    pub fn server_cert(&self) -> Vec<u8> {
        self.tls.conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// `GET path` with the token; the status code.
    pub fn get(&mut self, path: &str, token: &str) -> std::io::Result<u16> {
        self.send("GET", path, token, "")
    }

    /// `method path` with the token and a JSON body; the status code.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let len = body.len();
        write!(
            self.tls,
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n{body}"
        )?;
        self.tls.flush()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.tls.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = self.tls.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(head[9..12].parse().unwrap());
        }
    }

    /// Waits for the server to close the connection; how long it took.
    pub fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        use std::io::Read;
        let t0 = Instant::now();
        self.tls.sock.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 64];
        match self.tls.read(&mut b) {
            Ok(0) => Some(t0.elapsed()),
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut =>
            {
                Some(t0.elapsed())
            }
            _ => None,
        }
    }
}
