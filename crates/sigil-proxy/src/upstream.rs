//! The connection to the upstream model or tool server: TCP (`http://host:port`) or a unix
//! socket (`unix:///path`), HTTP/1.1 or HTTP/2 with prior knowledge (h2c), pooled keep-alive
//! connections either way.
//!
//! HTTP/1.1 upstreams have a pool of their own ([`Http1Pool`]): one address, so no pool key
//! to hash and no task spawned per request to return a connection, which the general
//! pooled client does on every request. HTTP/2 and outbound routes use that client.
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;

use crate::respond::Body;

/// Connects every request to one unix socket.
#[derive(Clone)]
pub struct UnixConnector(Arc<PathBuf>);

impl tower::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(&*path).await?)) })
    }
}

/// Where an HTTP/1.1 upstream listens.
enum Addr {
    /// `host:port`.
    Tcp(String),
    Unix(PathBuf),
}

/// At most this many connections are kept; more are closed once their answer is done.
const MAX_POOLED: usize = 1024;

/// A kept connection unused this long is closed (the general pooled client's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Kept-alive HTTP/1.1 connections to one upstream. A connection goes back in as soon as
/// its answer's head is in; it is taken out again only once hyper says it is ready for
/// another request (its answer's body read to the end), so one connection never carries
/// two requests at once.
pub struct Http1Pool {
    addr: Addr,
    conns: std::sync::Mutex<Conns>,
    idle_timeout: Duration,
}

/// The kept connections, each with when it was last put back (its answer's head in: a
/// connection that then streamed longer than the idle timeout is closed once it is done).
#[derive(Default)]
struct Conns {
    list: Vec<(SendRequest<Body>, Instant)>,
    /// Takes since the list was last pruned.
    takes: u32,
}

/// The list is pruned of closed and idle connections every this many takes.
const PRUNE_EVERY: u32 = 64;

/// Why a request did not reach the upstream.
pub type UpstreamError = Box<dyn std::error::Error + Send + Sync>;

impl Http1Pool {
    fn new(addr: Addr) -> Self {
        Self {
            addr,
            conns: std::sync::Mutex::default(),
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// Sends `req` (origin-form URI) on a ready connection, or on a new one. A request
    /// that a kept connection could not take (closed by the upstream meanwhile) comes
    /// back unsent and is tried on the next.
    async fn request(&self, mut req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        while let Some(mut conn) = self.take_ready() {
            match conn.try_send_request(req).await {
                Ok(resp) => {
                    self.put_back(conn);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut conn = self.connect().await?;
        let resp = conn.send_request(req).await?;
        self.put_back(conn);
        Ok(resp)
    }

    /// A kept connection ready for a request, the last put back. Connections the upstream
    /// closed, or unused for the idle timeout, are dropped when met; every [`PRUNE_EVERY`]
    /// takes (and when the list is full), all such ones are.
    fn take_ready(&self) -> Option<SendRequest<Body>> {
        let now = Instant::now();
        let mut conns = self.conns.lock().ok()?;
        conns.takes += 1;
        if conns.takes >= PRUNE_EVERY {
            self.prune(&mut conns, now);
        }
        while let Some(i) = conns
            .list
            .iter()
            .rposition(|(c, _)| c.is_ready() || c.is_closed())
        {
            let (c, since) = conns.list.swap_remove(i);
            if c.is_ready() && now.duration_since(since) <= self.idle_timeout {
                return Some(c);
            }
        }
        None
    }

    fn prune(&self, conns: &mut Conns, now: Instant) {
        conns.list.retain(|(c, since)| {
            let expired = c.is_ready() && now.duration_since(*since) > self.idle_timeout;
            !c.is_closed() && !expired
        });
        conns.takes = 0;
    }

    fn put_back(&self, conn: SendRequest<Body>) {
        let Ok(mut conns) = self.conns.lock() else {
            return;
        };
        let now = Instant::now();
        if conns.list.len() >= MAX_POOLED {
            self.prune(&mut conns, now);
        }
        if conns.list.len() < MAX_POOLED {
            conns.list.push((conn, now));
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, UpstreamError> {
        match &self.addr {
            Addr::Tcp(a) => {
                let stream = tokio::net::TcpStream::connect(a.as_str()).await?;
                stream.set_nodelay(true)?;
                handshake(stream).await
            }
            Addr::Unix(p) => handshake(UnixStream::connect(p).await?).await,
        }
    }
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own.
async fn handshake<IO>(io: IO) -> Result<SendRequest<Body>, UpstreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(send)
}

/// The `host:port` a TCP upstream's address connects to.
fn socket_address(base: &Uri) -> Option<String> {
    let host = base.host()?;
    let port = base.port_u16().unwrap_or(80);
    Some(format!("{host}:{port}"))
}

/// A pooled client for the configured upstream.
pub enum Upstream {
    /// HTTP/1.1 over TCP or a unix socket.
    Http1 { pool: Http1Pool, host: HeaderValue },
    /// HTTP/2 with prior knowledge over TCP.
    Tcp {
        client: Client<HttpConnector, Body>,
        base: Uri,
    },
    /// HTTP/2 with prior knowledge over a unix socket.
    Unix { client: Client<UnixConnector, Body> },
    /// An outbound route: mTLS to the callee's sidecar (HTTP/1.1).
    Route {
        client: Client<hyper_rustls::HttpsConnector<crate::egress::Counting>, Body>,
        base: Uri,
        host: Option<HeaderValue>,
    },
}

/// The `Host` of a unix upstream (its pool key's too).
static LOCALHOST: HeaderValue = HeaderValue::from_static("localhost");

/// The `Host` header for requests to `base`: its host, and its port unless the scheme's
/// default, as the pooled client would set it. The proxy sets it once per upstream, not
/// the client once per request.
pub fn host_header(base: &Uri) -> Option<HeaderValue> {
    let host = base.host()?;
    let default = match base.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match base.port_u16().filter(|p| *p != default) {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        None => HeaderValue::from_str(host).ok(),
    }
}

/// The socket path of a `unix:` upstream address, if it is one.
pub fn unix_path(upstream: &str) -> Option<PathBuf> {
    upstream
        .strip_prefix("unix://")
        .or_else(|| upstream.strip_prefix("unix:"))
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
}

impl Upstream {
    /// A client for `upstream` (validated by the configuration).
    pub fn new(upstream: &str, http2: bool) -> Self {
        let h2 = || {
            let mut builder = Client::builder(TokioExecutor::new());
            builder.http2_only(true);
            builder
        };
        // INVARIANT: validated by ProxyConfig::validate (a unix path, or an http:// URI with
        // a host).
        match (unix_path(upstream), http2) {
            (Some(path), false) => Self::Http1 {
                pool: Http1Pool::new(Addr::Unix(path)),
                host: LOCALHOST.clone(),
            },
            (Some(path), true) => Self::Unix {
                client: h2().build(UnixConnector(Arc::new(path))),
            },
            (None, false) => {
                let base: Uri = upstream.parse().unwrap_or_default();
                Self::Http1 {
                    pool: Http1Pool::new(Addr::Tcp(socket_address(&base).unwrap_or_default())),
                    host: host_header(&base).unwrap_or_else(|| LOCALHOST.clone()),
                }
            }
            (None, true) => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                Self::Tcp {
                    client: h2().build(connector),
                    base: upstream.parse().unwrap_or_default(),
                }
            }
        }
    }

    /// The upstream URI for a request's `path_and_query` (none: `/`): origin-form on an
    /// HTTP/1.1 connection of our own, absolute (the pool's key) for the general client.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Option<Uri> {
        let mut parts = match self {
            Self::Tcp { base, .. } | Self::Route { base, .. } => base.clone().into_parts(),
            Self::Unix { .. } => Uri::from_static("http://localhost").into_parts(),
            Self::Http1 { .. } => http::uri::Parts::default(),
        };
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).ok()
    }

    /// The `Host` header requests go out with (none: HTTP/2, which has `:authority`).
    pub fn host(&self) -> Option<&HeaderValue> {
        match self {
            Self::Http1 { host, .. } => Some(host),
            Self::Route { host, .. } => host.as_ref(),
            Self::Tcp { .. } | Self::Unix { .. } => None,
        }
    }

    /// The HTTP version requests go out with.
    pub fn version(&self) -> http::Version {
        match self {
            Self::Tcp { .. } | Self::Unix { .. } => http::Version::HTTP_2,
            Self::Http1 { .. } | Self::Route { .. } => http::Version::HTTP_11,
        }
    }

    /// Sends one request.
    pub async fn request(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        match self {
            Self::Http1 { pool, .. } => pool.request(req).await,
            Self::Tcp { client, .. } => Ok(client.request(req).await?),
            Self::Unix { client, .. } => Ok(client.request(req).await?),
            Self::Route { client, .. } => Ok(client.request(req).await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            unix_path("unix:///run/m.sock"),
            Some(PathBuf::from("/run/m.sock"))
        );
        assert_eq!(
            unix_path("unix:/run/m.sock"),
            Some(PathBuf::from("/run/m.sock"))
        );
        assert_eq!(unix_path("unix://relative"), None);
        assert_eq!(unix_path("http://127.0.0.1:8000"), None);
        let pq = |s: &'static str| PathAndQuery::from_static(s);
        // HTTP/1.1 on a connection of our own: origin-form, and a Host.
        let u = Upstream::new("unix:///run/m.sock", false);
        assert_eq!(
            u.uri(Some(&pq("/v1/models?x=1"))).unwrap().to_string(),
            "/v1/models?x=1"
        );
        assert_eq!(u.uri(None).unwrap().to_string(), "/");
        assert_eq!(u.version(), http::Version::HTTP_11);
        assert_eq!(u.host().unwrap(), "localhost");
        let t = Upstream::new("http://127.0.0.1:8000", false);
        assert_eq!(t.uri(Some(&pq("/a"))).unwrap().to_string(), "/a");
        assert_eq!(t.host().unwrap(), "127.0.0.1:8000");
        // HTTP/2: absolute (the general client's pool key), and `:authority`, not `Host`.
        let t = Upstream::new("http://127.0.0.1:8000", true);
        assert_eq!(
            t.uri(Some(&pq("/a"))).unwrap().to_string(),
            "http://127.0.0.1:8000/a"
        );
        assert_eq!(t.version(), http::Version::HTTP_2);
        assert_eq!(t.host(), None);
        let u = Upstream::new("unix:///run/m.sock", true);
        assert_eq!(u.uri(None).unwrap().to_string(), "http://localhost/");
        assert_eq!(u.host(), None);
    }

    #[test]
    fn host_headers_leave_out_only_the_schemes_default_port() {
        let host = |u: &str| host_header(&u.parse().unwrap()).unwrap();
        assert_eq!(host("http://model:80"), "model");
        assert_eq!(host("http://model"), "model");
        assert_eq!(host("http://model:443"), "model:443");
        assert_eq!(host("https://model:443"), "model");
        assert_eq!(host("https://model:80"), "model:80");
        assert_eq!(host("http://[::1]:8000"), "[::1]:8000");
    }
}

#[cfg(test)]
mod pool_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper::body::Bytes;

    use super::*;
    use crate::respond::full;

    /// A real HTTP/1.1 upstream on loopback (requests without bodies) that counts its
    /// connections and answers with the request target and Host it read. `/slow` sends its
    /// head at once and its body 300 ms later; `/close` answers and closes.
    async fn upstream() -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                            continue;
                        };
                        let head = String::from_utf8(buf.drain(..end + 4).collect()).unwrap();
                        let target = head.split(' ').nth(1).unwrap().to_owned();
                        let host = head
                            .lines()
                            .find_map(|l| l.strip_prefix("host: "))
                            .unwrap_or("-")
                            .to_owned();
                        if target == "/slow" {
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
                                .await
                                .unwrap();
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            s.write_all(b"slow").await.unwrap();
                            continue;
                        }
                        let body = format!("{target} {host}");
                        let close = target == "/close";
                        let connection = if close { "connection: close\r\n" } else { "" };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{connection}\r\n{body}",
                            body.len()
                        );
                        s.write_all(answer.as_bytes()).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), accepted)
    }

    async fn get(u: &Upstream, path: &'static str) -> String {
        let mut req = Request::new(full(Bytes::new()));
        *req.uri_mut() = u.uri(Some(&PathAndQuery::from_static(path))).unwrap();
        req.headers_mut()
            .insert(http::header::HOST, u.host().unwrap().clone());
        let resp = u.request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn connections_are_kept_reused_one_request_at_a_time_and_replaced_when_closed() {
        let (base, accepted) = upstream().await;
        let u = Upstream::new(&base, false);
        let host = base.trim_start_matches("http://");
        // Origin-form on the wire, and the upstream's Host.
        assert_eq!(get(&u, "/a?x=1").await, format!("/a?x=1 {host}"));
        for _ in 0..5 {
            get(&u, "/a").await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one kept connection");
        // While one answer's body is still coming, another request needs a connection of
        // its own.
        let (slow, other) = tokio::join!(get(&u, "/slow"), async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            get(&u, "/b").await
        });
        assert_eq!(slow, "slow");
        assert_eq!(other, format!("/b {host}"));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // An upstream that closes a connection: the next request goes on another one.
        get(&u, "/close").await;
        get(&u, "/close").await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(get(&u, "/c").await, format!("/c {host}"));
        assert!(u_conns(&u) <= 2, "closed connections are dropped");
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed() {
        let (base, accepted) = upstream().await;
        let mut u = Upstream::new(&base, false);
        if let Upstream::Http1 { pool, .. } = &mut u {
            pool.idle_timeout = std::time::Duration::from_millis(100);
        }
        // Two connections at once; then both idle past the timeout: neither is reused, and
        // neither is kept.
        let (a, b) = tokio::join!(get(&u, "/slow"), get(&u, "/slow"));
        assert_eq!((a.as_str(), b.as_str()), ("slow", "slow"));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(u_conns(&u), 2);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        get(&u, "/a").await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "an idle connection was reused"
        );
        assert_eq!(u_conns(&u), 1, "idle connections were kept");
        // Within the timeout, the kept one is reused.
        get(&u, "/a").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let u = Upstream::new(&format!("http://{addr}"), false);
        let mut req = Request::new(full(Bytes::new()));
        *req.uri_mut() = u.uri(None).unwrap();
        assert!(u.request(req).await.is_err());
    }

    fn u_conns(u: &Upstream) -> usize {
        match u {
            Upstream::Http1 { pool, .. } => pool.conns.lock().unwrap().list.len(),
            _ => 0,
        }
    }
}
