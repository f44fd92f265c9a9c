//! The connection to the upstream model or tool server: TCP (`http://host:port`) or a unix
//! socket (`unix:///path`), HTTP/1.1 or HTTP/2 with prior knowledge (h2c), pooled keep-alive
//! connections either way.
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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
    },
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
                Self::Tcp {
                    client: builder.build(connector),
                    // INVARIANT: validated by ProxyConfig::validate.
                    base: upstream.parse().unwrap_or_default(),
                    http2,
                }
            }
        }
    }

    /// The upstream URI for `path_and_query`.
    pub fn uri(&self, path_and_query: &str) -> Option<Uri> {
        let mut parts = match self {
            Self::Tcp { base, .. } | Self::Route { base, .. } => base.clone().into_parts(),
            // The pool key and Host of a unix upstream.
            Self::Unix { .. } => Uri::from_static("http://localhost").into_parts(),
        };
        parts.path_and_query = path_and_query.parse().ok();
        Uri::from_parts(parts).ok()
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
        assert_eq!(
            u.uri("/v1/models?x=1").unwrap().to_string(),
            "http://localhost/v1/models?x=1"
        );
        assert_eq!(u.version(), http::Version::HTTP_11);
        let t = Upstream::new("http://127.0.0.1:8000", true);
        assert_eq!(t.uri("/a").unwrap().to_string(), "http://127.0.0.1:8000/a");
        assert_eq!(t.version(), http::Version::HTTP_2);
    }
}
