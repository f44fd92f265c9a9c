//! Test harness: starts the real `sigil` binary on loopback in a temp dir and talks to it
//! with real clients (the `sigil` CLI, `openssl`, `curl`, a tonic gRPC client over rustls).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sigil_proto::node::v1::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint};

pub mod pg_tls;
pub mod proxy;
pub mod upstream;

pub const TD: &str = "td.test";

pub fn sigil_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sigil")
}

/// A free loopback port (bound and released; fine for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `sigil server` process.
pub struct Server {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub socket: PathBuf,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server with its data in `dir`.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut s = Self {
            child: None,
            dir: dir.to_owned(),
            port: free_port(),
            socket: dir.join("admin.sock"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// Wraps a server already listening (e.g. started in-process by the test).
    pub fn attach(dir: &Path, port: u16) -> Self {
        Self {
            child: None,
            dir: dir.to_owned(),
            port,
            socket: dir.join("admin.sock"),
            extra: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = Command::new(sigil_bin())
            .args(["server", "--trust-domain", TD, "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-addr", &format!("127.0.0.1:{}", self.port)])
            .args(&self.extra)
            .env("SIGIL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log =
                    std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
                panic!("sigil server exited early with {status}:\n{log}");
            }
            let admin = std::os::unix::net::UnixStream::connect(&self.socket).is_ok();
            let public = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if admin && public {
                return;
            }
            assert!(Instant::now() < deadline, "server did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, wait, start again on the same data dir and port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// Runs `sigil <args> --socket <admin socket>`.
    pub fn sigil(&self, args: &[&str]) -> Output {
        Command::new(sigil_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// Runs an admin command that must succeed and parses its `--output json`.
    pub fn sigil_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.sigil(&a);
        assert!(
            out.status.success(),
            "sigil {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Mints an X.509-SVID into `out` (svid.pem, key.pem, bundle.pem); returns the JSON.
    pub fn mint(&self, spiffe_id: &str, out: &Path) -> serde_json::Value {
        self.sigil_json(&[
            "svid",
            "mint",
            "--spiffe-id",
            spiffe_id,
            "--out-dir",
            out.to_str().unwrap(),
        ])
    }

    /// Credentials for a proxy run standalone from files: an X.509-SVID for `spiffe_id` with
    /// the DNS name `localhost` minted into `<dir>/proxy` (svid.pem, key.pem), and the trust
    /// bundle (`sigil bundle show`) in `<dir>/bundle.json`. Returns (that directory, the
    /// bundle file).
    pub fn proxy_credentials(&self, dir: &Path, spiffe_id: &str) -> (PathBuf, PathBuf) {
        let pdir = dir.join("proxy");
        self.sigil_json(&[
            "svid",
            "mint",
            "--spiffe-id",
            spiffe_id,
            "--dns",
            "localhost",
            "--out-dir",
            pdir.to_str().unwrap(),
        ]);
        let bundle = dir.join("bundle.json");
        let out = self.sigil(&["bundle", "show"]);
        assert!(out.status.success());
        std::fs::write(&bundle, &out.stdout).unwrap();
        (pdir, bundle)
    }

    /// A raw admin API call with curl over the unix socket: (status, body).
    pub fn admin_raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("body");
        std::fs::write(&f, body).unwrap();
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/stdout",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
            ])
            .arg(&self.socket)
            .args([
                "-X",
                method,
                "-H",
                "content-type: application/json",
                "--data-binary",
            ])
            .arg(format!("@{}", f.display()))
            .arg(format!("http://sigil{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), body.to_owned())
    }

    /// The trust bundle's X.509 authorities as PEM.
    pub fn bundle_pem(&self) -> String {
        let out = self.sigil(&["bundle", "show", "--format", "pem"]);
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    /// A gRPC node API client, optionally presenting a client certificate.
    pub async fn node_client(&self, client_cert: Option<(&Path, &Path)>) -> NodeClient<Channel> {
        let cfg = client_tls(&self.bundle_pem(), client_cert);
        let port = self.port;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let cfg = cfg.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await
            .unwrap();
        NodeClient::new(channel)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A rustls client config trusting `bundle_pem`, with an optional client certificate.
pub fn client_tls(
    bundle_pem: &str,
    client_cert: Option<(&Path, &Path)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(bundle_pem).unwrap() {
        roots
            .add(CertificateDer::from(p.contents().to_vec()))
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = pem::parse_many(std::fs::read(cert).unwrap())
                .unwrap()
                .into_iter()
                .map(|p| CertificateDer::from(p.contents().to_vec()))
                .collect();
            let key = pem::parse(std::fs::read(key).unwrap()).unwrap();
            let key = PrivateKeyDer::try_from(key.contents().to_vec()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Runs a command, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `curl` to the token endpoint: (HTTP status, JSON body).
pub fn token_request(
    server: &Server,
    bundle: &Path,
    cert: Option<(&Path, &Path)>,
    form: &[&str],
) -> (u16, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "--cacert"])
        .arg(bundle);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    for f in form {
        cmd.args(["-d", f]);
    }
    cmd.arg(server.url("/oauth2/token"));
    let (_, out, err) = run(&mut cmd);
    let (body, code) = out
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("curl gave no status: {out} {err}"));
    let code: u16 = code.trim().parse().unwrap();
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (code, json)
}

/// Decodes a JWT's payload (no verification; the tests compare claims).
pub fn jwt_payload(token: &str) -> serde_json::Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// base64url(SHA-256(DER of the first certificate in `pem_path`)).
pub fn thumbprint(pem_path: &Path) -> String {
    use base64::Engine;
    use sha2::Digest;
    let p = pem::parse(std::fs::read(pem_path).unwrap()).unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(p.contents()))
}

/// A running `sigil agent` process.
pub struct Agent {
    child: Option<Child>,
    exited: Option<i32>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Agent {
    /// Starts an agent for `server` with data in `dir`; `join_token` only for the first start.
    pub fn start(server: &Server, dir: &Path, join_token: Option<&str>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let bundle = dir.with_extension("bootstrap.pem");
        std::fs::write(&bundle, server.bundle_pem()).unwrap();
        Self::start_with(server.port, dir, join_token, &bundle)
    }

    /// Starts an agent trusting `bundle` for the server on `port`.
    pub fn start_with(port: u16, dir: &Path, join_token: Option<&str>, bundle: &Path) -> Self {
        let mut a = Self::unstarted(port, dir, join_token, bundle);
        a.spawn();
        a
    }

    fn unstarted(port: u16, dir: &Path, join_token: Option<&str>, bundle: &Path) -> Self {
        // The socket lives where any user can reach it (tests connect as `nobody` too).
        let socket = dir.with_extension("sock.d").join("api.sock");
        let mut args = vec![
            "agent".to_string(),
            "--trust-domain".into(),
            TD.into(),
            "--server".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            dir.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--trust-bundle".into(),
            bundle.display().to_string(),
        ];
        if let Some(t) = join_token {
            args.extend(["--join-token".into(), t.into()]);
        }
        Self {
            child: None,
            exited: None,
            dir: dir.to_owned(),
            socket,
            log: dir.with_extension("log"),
            args,
        }
    }

    /// Starts an agent for `server` that attests with the TPM at `tcti`, sending the event
    /// log at `event_log`.
    pub fn start_tpm(server: &Server, dir: &Path, tcti: &str, event_log: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let bundle = dir.with_extension("bootstrap.pem");
        std::fs::write(&bundle, server.bundle_pem()).unwrap();
        let mut a = Self::unstarted(server.port, dir, None, &bundle);
        a.args.extend([
            "--attestor".into(),
            "tpm".into(),
            "--tpm-tcti".into(),
            tcti.into(),
            "--tpm-event-log".into(),
            event_log.display().to_string(),
        ]);
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(sigil_bin())
            .args(&self.args)
            .env("SIGIL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.exited = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                self.exited = status.code();
                eprintln!("agent exited early with {status}:\n{}", self.log_text());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts without the join token (the cached node identity must do).
    pub fn restart(&mut self) {
        self.stop();
        if let Some(i) = self.args.iter().position(|a| a == "--join-token") {
            self.args.drain(i..i + 2);
        }
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Waits for the process to exit on its own; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let Some(c) = self.child.as_mut() else {
            return self.exited;
        };
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                self.child = None;
                self.exited = s.code();
                return s.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw Workload API client (tonic over the unix socket), to send requests a well-behaved
/// SPIFFE library would not (e.g. without the security header).
pub async fn raw_workload_client(
    socket: &Path,
) -> sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel> {
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

/// Adds the Workload API security header.
pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// The uid of this (test) process.
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}
