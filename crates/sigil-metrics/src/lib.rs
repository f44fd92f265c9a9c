//! The opt-in observability listener of sigil's services (`--metrics-addr`): Prometheus
//! metrics at `/metrics` (OpenMetrics text format, which Prometheus scrapes natively),
//! liveness at `/healthz` (always 200 while the process serves) and readiness at `/readyz`
//! (200, or 503 with the reason). Plain HTTP: bind it to loopback (the default advice) or to
//! an address only the monitoring system reaches; it exposes no secret, but it is not
//! authenticated.
//!
//! Each service keeps its own metrics (`metrics.rs` in the service crate) in a
//! `prometheus_client` registry, resolves every labelled series once at start (so the request
//! path only touches atomics and never allocates for labels) and implements [`Exporter`].
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use prometheus_client;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The answer of a readiness check: `Err(why)` when not ready.
pub type ReadyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send + 'a>>;

/// Why a service is not ready (`/readyz` answers 503 with it). What is wrong with the thing
/// named decides what to do: wait for what is missing, renew what expired, repair what is
/// unreadable, look at the dependency that does not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    /// It has not received something it needs yet (a node SVID, a trust bundle, policies).
    #[error("no {0}")]
    Missing(&'static str),
    /// Something it needs has expired and no replacement has arrived.
    #[error("{0} expired")]
    Expired(&'static str),
    /// Something it holds cannot be read.
    #[error("{0} unreadable")]
    Unreadable(&'static str),
    /// A service it depends on does not answer (`why`: its error, or a timeout).
    #[error("{what} unreachable: {why}")]
    Unreachable { what: &'static str, why: String },
}

/// What a service exposes on its metrics listener.
pub trait Exporter: Send + Sync + 'static {
    /// Refreshes the values computed at scrape time (expiry gauges, ...) and writes every
    /// metric in text format.
    fn encode(&self, out: &mut String) -> std::fmt::Result;
    /// Updates what needs I/O before [`Exporter::encode`] (e.g. a store query); nothing by
    /// default.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
    /// Whether the service is ready to do its job, or why not. Must be cheap: it answers
    /// every probe.
    fn ready(&self) -> ReadyFuture<'_>;
}

/// Content type of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running metrics listener; dropping it stops it.
pub struct Listener {
    /// The bound address.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` from `exporter`.
pub async fn serve(addr: SocketAddr, exporter: Arc<dyn Exporter>) -> anyhow::Result<Listener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics_addr {addr}: {e}"))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics listener is not on loopback (plain HTTP, unauthenticated)");
    }
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let exporter = exporter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let exporter = exporter.clone();
                    async move { Ok::<_, Infallible>(answer(&req, exporter.as_ref()).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc);
                // A scraper that stalls is dropped rather than held forever.
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            });
        }
    });
    tracing::info!(%addr, "metrics listening");
    Ok(Listener { addr, task })
}

/// The response to one request of the metrics listener.
pub async fn answer(req: &Request<Incoming>, exporter: &dyn Exporter) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            exporter.refresh().await;
            let mut out = String::with_capacity(8 * 1024);
            match exporter.encode(&mut out) {
                Ok(()) => {
                    let mut resp = text(StatusCode::OK, out);
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(CONTENT_TYPE),
                    );
                    resp
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match exporter.ready().await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A latency histogram in seconds with buckets from 25 µs to ~3.3 s (doubling): fine enough
/// for the proxy's microsecond-scale steps and wide enough for an upstream model call.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_025, 2.0, 18))
}

/// The `notAfter` of a DER certificate, Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

/// Seconds from `now` until `not_after` (negative once past).
pub fn seconds_until(not_after: i64, now: i64) -> i64 {
    not_after.saturating_sub(now)
}

/// Counts requests of a router (HTTP or gRPC) by route and outcome, without touching the
/// handlers: wrap the router with [`ObserveLayer`].
pub trait Observer: Send + Sync + 'static {
    /// What the observer tells routes apart by (resolved once per request, no allocation).
    type Route: Copy + Send + Sync + 'static;
    /// The route of a request path; `None`: not observed.
    fn route(&self, path: &str) -> Option<Self::Route>;
    /// The response head of an observed request: its HTTP status and, for gRPC, the
    /// `grpc-status` sent in the head (trailers-only answers: errors; absent means the call
    /// was answered or its stream opened). What it returns is held until the response body is
    /// dropped (e.g. to count open streams).
    fn response(
        &self,
        route: Self::Route,
        status: http::StatusCode,
        grpc_status: Option<i32>,
    ) -> Option<Box<dyn Send + Sync>>;
}

/// A tower layer applying an [`Observer`].
pub struct ObserveLayer<O>(pub Arc<O>);

impl<O> Clone for ObserveLayer<O> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<O, S> tower::Layer<S> for ObserveLayer<O> {
    type Service = Observed<O, S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observed {
            observer: self.0.clone(),
            inner,
        }
    }
}

/// The service [`ObserveLayer`] makes.
pub struct Observed<O, S> {
    observer: Arc<O>,
    inner: S,
}

impl<O, S: Clone> Clone for Observed<O, S> {
    fn clone(&self) -> Self {
        Self {
            observer: self.observer.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<O, S, B, RB> tower::Service<Request<B>> for Observed<O, S>
where
    O: Observer,
    S: tower::Service<Request<B>, Response = Response<RB>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = Response<GuardedBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = self.observer.route(req.uri().path());
        let fut = self.inner.call(req);
        let observer = self.observer.clone();
        Box::pin(async move {
            let resp = fut.await?;
            let guard = route.and_then(|r| {
                let grpc = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok());
                observer.response(r, resp.status(), grpc)
            });
            Ok(resp.map(|inner| GuardedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body holding a guard until it is dropped.
pub struct GuardedBody<B> {
    inner: B,
    _guard: Option<Box<dyn Send + Sync>>,
}

impl<B> hyper::body::Body for GuardedBody<B>
where
    B: hyper::body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The canonical name of a gRPC status code (a fixed set, for labels).
pub fn grpc_code_name(code: i32) -> &'static str {
    match code {
        0 => "ok",
        1 => "cancelled",
        2 => "unknown",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "unknown",
    }
}

/// Every name [`grpc_code_name`] returns, to resolve labelled series at start.
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::registry::Registry;

    struct Fixed {
        registry: Registry,
        ready: Result<(), NotReady>,
    }

    impl Exporter for Fixed {
        fn encode(&self, out: &mut String) -> std::fmt::Result {
            prometheus_client::encoding::text::encode(out, &self.registry)
        }
        fn ready(&self) -> ReadyFuture<'_> {
            let r = self.ready.clone();
            Box::pin(async move { r })
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status = buf[9..12].parse().unwrap();
        let body = buf.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        registry.register("sigil_test_things", "Things", c.clone());
        c.inc();
        c.inc();
        let exporter = Arc::new(Fixed {
            registry,
            ready: Err(NotReady::Missing("SVID")),
        });
        let l = serve("127.0.0.1:0".parse().unwrap(), exporter)
            .await
            .unwrap();
        let (status, body) = get(l.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("sigil_test_things_total 2"), "{body}");
        assert!(body.contains("# EOF"), "{body}");
        assert_eq!(get(l.addr, "/healthz").await.0, 200);
        let (status, body) = get(l.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert_eq!(body, "not ready: no SVID\n");
        assert_eq!(get(l.addr, "/nope").await.0, 404);
        let addr = l.addr;
        drop(l);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "stopped on drop"
        );
    }

    #[test]
    fn expiry_helpers() {
        assert_eq!(seconds_until(100, 40), 60);
        assert_eq!(seconds_until(100, 140), -40);
        assert_eq!(not_after(b"not a certificate"), None);
    }
}
