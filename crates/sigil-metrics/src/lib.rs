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

/// The answer of a readiness check: `Err(reason)` when not ready.
pub type ReadyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// What a service exposes on its metrics listener.
pub trait Exporter: Send + Sync + 'static {
    /// Refreshes the values computed at scrape time (expiry gauges, ...) and writes every
    /// metric in text format.
    fn encode(&self, out: &mut String) -> std::fmt::Result;
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::registry::Registry;

    struct Fixed {
        registry: Registry,
        ready: Result<(), String>,
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
            ready: Err("no SVID yet".into()),
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
        assert!(body.contains("no SVID yet"), "{body}");
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
