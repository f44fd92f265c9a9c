//! The connection to the upstream model or tool server: TCP (`http://host:port`) or a unix
//! socket (`unix:///path`), HTTP/1.1 or HTTP/2 with prior knowledge (h2c), pooled keep-alive
//! connections either way.
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, Error};
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

/// A pooled client for the configured upstream.
pub enum Upstream {
    Tcp {
        client: Client<HttpConnector, Body>,
        base: Uri,
        /// `Host` (HTTP/1 only).
        host: Option<HeaderValue>,
        http2: bool,
    },
    Unix {
        client: Client<UnixConnector, Body>,
        http2: bool,
    },
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
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(http2);
        match unix_path(upstream) {
            Some(path) => Self::Unix {
                client: builder.build(UnixConnector(Arc::new(path))),
                http2,
            },
            None => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                // INVARIANT: validated by ProxyConfig::validate.
                let base: Uri = upstream.parse().unwrap_or_default();
                Self::Tcp {
                    client: builder.build(connector),
                    host: if http2 { None } else { host_header(&base) },
                    base,
                    http2,
                }
            }
        }
    }

    /// The upstream URI for a request's `path_and_query` (none: `/`).
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Option<Uri> {
        let mut parts = match self {
            Self::Tcp { base, .. } | Self::Route { base, .. } => base.clone().into_parts(),
            // The pool key and Host of a unix upstream.
            Self::Unix { .. } => Uri::from_static("http://localhost").into_parts(),
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
            Self::Tcp { host, .. } | Self::Route { host, .. } => host.as_ref(),
            Self::Unix { http2: false, .. } => Some(&LOCALHOST),
            Self::Unix { http2: true, .. } => None,
        }
    }

    /// The HTTP version requests go out with.
    pub fn version(&self) -> http::Version {
        let http2 = match self {
            Self::Tcp { http2, .. } | Self::Unix { http2, .. } => *http2,
            Self::Route { .. } => false,
        };
        if http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        }
    }

    /// Sends one request.
    pub async fn request(&self, req: Request<Body>) -> Result<Response<Incoming>, Error> {
        match self {
            Self::Tcp { client, .. } => client.request(req).await,
            Self::Unix { client, .. } => client.request(req).await,
            Self::Route { client, .. } => client.request(req).await,
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
        let u = Upstream::new("unix:///run/m.sock", false);
        let pq = |s: &'static str| PathAndQuery::from_static(s);
        assert_eq!(
            u.uri(Some(&pq("/v1/models?x=1"))).unwrap().to_string(),
            "http://localhost/v1/models?x=1"
        );
        assert_eq!(u.uri(None).unwrap().to_string(), "http://localhost/");
        assert_eq!(u.version(), http::Version::HTTP_11);
        assert_eq!(u.host().unwrap(), "localhost");
        let t = Upstream::new("http://127.0.0.1:8000", true);
        assert_eq!(
            t.uri(Some(&pq("/a"))).unwrap().to_string(),
            "http://127.0.0.1:8000/a"
        );
        assert_eq!(t.version(), http::Version::HTTP_2);
        // HTTP/2 carries `:authority`, not `Host`.
        assert_eq!(t.host(), None);
        assert_eq!(Upstream::new("unix:///run/m.sock", true).host(), None);
        let t = Upstream::new("http://127.0.0.1:8000", false);
        assert_eq!(t.host().unwrap(), "127.0.0.1:8000");
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
