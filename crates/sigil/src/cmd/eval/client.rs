//! The load generator's HTTP client: HTTP/1.1 keep-alive connections (plain or TLS with a
//! client certificate) over sockets that count every byte they carry, handshakes included.
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes on the wire, both directions, at the client's sockets.
#[derive(Default)]
pub(super) struct Wire {
    pub(super) sent: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) connections: AtomicU64,
}

impl Wire {
    pub(super) fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}

/// A TCP stream that adds what it reads and writes to a [`Wire`].
struct Counted {
    inner: TcpStream,
    wire: Arc<Wire>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.wire.received.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.wire.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client SVID: the chain and key as the Workload API gave them.
#[derive(Clone)]
pub(super) struct Svid {
    pub(super) spiffe_id: String,
    pub(super) chain: Vec<Vec<u8>>,
    pub(super) key: Arc<CertifiedKey>,
    /// The leaf's SHA-256 (base64url): what a bound token's `cnf` names.
    pub(super) x5t: String,
    pub(super) chain_pem: String,
    pub(super) key_pem: String,
}

impl Svid {
    pub(super) fn from_der(
        spiffe_id: &str,
        chain: Vec<Vec<u8>>,
        key: Vec<u8>,
    ) -> anyhow::Result<Self> {
        let leaf = chain.first().context("an SVID without a certificate")?;
        let x5t = sigil_pki::x5t_s256(leaf);
        let chain_pem = chain
            .iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
            .collect::<String>();
        let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", key.clone()));
        let signing = sigil_tls::provider()
            .key_provider
            .load_private_key(
                PrivateKeyDer::try_from(key).map_err(|e| anyhow::anyhow!("SVID key: {e}"))?,
            )
            .context("loading the SVID key")?;
        let certs = chain.iter().cloned().map(CertificateDer::from).collect();
        Ok(Self {
            spiffe_id: spiffe_id.to_owned(),
            chain,
            key: Arc::new(CertifiedKey::new(certs, signing)),
            x5t,
            chain_pem,
            key_pem,
        })
    }
}

/// A TLS client configuration: the server must present an SVID of `expected` chaining to
/// `bundle`; the client presents `svid` (or nothing).
pub(super) fn tls_config(
    bundle: &sigil_pki::X509Bundle,
    expected: &str,
    svid: Option<&Svid>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = sigil_tls::provider();
    let verifier = sigil_tls::SvidServerVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundle.clone())),
        sigil_core::SpiffeId::new(expected)?,
        provider.clone(),
    );
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let cfg = match svid {
        Some(s) => b.with_client_cert_resolver(Arc::new(sigil_tls::PresentSvid(s.key.clone()))),
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// Where a pool connects: a loopback port, plain or TLS.
#[derive(Clone)]
pub(super) struct Endpoint {
    pub(super) port: u16,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
}

/// Idle keep-alive connections to one endpoint for one caller.
pub(super) struct Pool {
    endpoint: Endpoint,
    wire: Arc<Wire>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// How a request ended at the client.
pub(super) enum Outcome {
    /// An HTTP answer with this status (the body read whole).
    Status(u16),
    /// No answer: the connection or the TLS handshake was refused, or closed.
    Refused(String),
}

const TIMEOUT: Duration = Duration::from_secs(30);

impl Pool {
    pub(super) fn new(endpoint: Endpoint, wire: Arc<Wire>) -> Self {
        Self {
            endpoint,
            wire,
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(("127.0.0.1", self.endpoint.port)).await?;
        let _ = tcp.set_nodelay(true);
        self.wire.connections.fetch_add(1, Ordering::Relaxed);
        let io = Counted {
            inner: tcp,
            wire: self.wire.clone(),
        };
        let send = match &self.endpoint.tls {
            Some(cfg) => {
                // The authority's certificate names `localhost`; SVID verifiers ignore the name.
                let name = ServerName::try_from("localhost")?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, io)
                    .await?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                send
            }
            None => {
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
                tokio::spawn(conn);
                send
            }
        };
        Ok(send)
    }

    /// Sends `req` on an idle connection or a new one; the connection goes back to the pool
    /// after a complete answer.
    pub(super) async fn send(&self, req: http::Request<Full<Bytes>>) -> Outcome {
        let idle = {
            let mut g = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let mut found = None;
            while let Some(s) = g.pop() {
                if !s.is_closed() {
                    found = Some(s);
                    break;
                }
            }
            found
        };
        let mut send = match idle {
            Some(s) => s,
            None => match tokio::time::timeout(TIMEOUT, self.connect()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Outcome::Refused(format!("{e:#}")),
                Err(_) => return Outcome::Refused("connect timed out".into()),
            },
        };
        let r = tokio::time::timeout(TIMEOUT, async {
            send.ready().await?;
            let resp = send.send_request(req).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            anyhow::Ok(status)
        })
        .await;
        match r {
            Ok(Ok(status)) => {
                if !send.is_closed() {
                    self.idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(send);
                }
                Outcome::Status(status)
            }
            Ok(Err(e)) => Outcome::Refused(format!("{e:#}")),
            Err(_) => Outcome::Refused("no answer within 30 s".into()),
        }
    }
}

/// `POST /oauth2/token` (client credentials) over mTLS with `svid`: a bound access token.
pub(super) async fn client_credentials(
    port: u16,
    bundle: &sigil_pki::X509Bundle,
    svid: &Svid,
    audience: &str,
    scope: &str,
) -> anyhow::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in &bundle.authorities {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(sigil_tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(sigil_tls::PresentSvid(svid.key.clone())));
    let pool = Pool::new(
        Endpoint {
            port,
            tls: Some(Arc::new(cfg)),
        },
        Arc::new(Wire::default()),
    );
    let mut send = pool.connect().await.context("the token endpoint")?;
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("audience", audience)
        .append_pair("scope", scope)
        .finish();
    let req = http::Request::post("/oauth2/token")
        .header(http::header::HOST, format!("127.0.0.1:{port}"))
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "the token endpoint answered {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    v.get("access_token")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .context("no access_token in the answer")
}
