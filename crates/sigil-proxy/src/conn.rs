//! One client connection: the identity is taken from the certificate the handshake
//! verified; requests are served over HTTP/1.1 or HTTP/2 with bounded patience (a head must
//! arrive within `header_read_timeout_secs`, a connection with no request in flight and no
//! bytes moving is closed after `idle_timeout_secs`); a revocation of the client closes it.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_pki::verify_x509_svid;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Outcome;
use crate::stack::Proxy;

/// When the connection last moved bytes, and how many requests are in flight.
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed();
        now.saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// Counts a request in flight until its response body ends (or is dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's stream, noting when bytes move.
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Proxy {
    /// Serves one accepted TLS connection.
    pub async fn serve_connection<IO>(self: Arc<Self>, stream: tokio_rustls::server::TlsStream<IO>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The verifier admitted the chain; derive the identity from the same certificate.
        // Without one (only admitted with `dpop`), each request's DPoP-bound token names it.
        if stream.get_ref().1.peer_certificates().is_none() {
            if self.cfg.dpop {
                self.serve_http(stream, None).await;
            }
            return;
        }
        let peer = {
            let Some(certs) = stream.get_ref().1.peer_certificates() else {
                return;
            };
            let chain: Vec<&[u8]> = certs.iter().map(|c| c.as_ref()).collect();
            match verify_x509_svid(&chain, &self.creds.load().x509, self.clock.now()) {
                Ok(v) => Some(Arc::new(v)),
                Err(e) => {
                    self.metrics.request(Outcome::BadCert);
                    tracing::info!(error = %e, "client certificate refused after handshake");
                    return;
                }
            }
        };
        self.serve_http(stream, peer).await;
    }

    /// Serves one connection to the outbound listener from a local process of `uid` (as
    /// the kernel says, `None` when it could not say): the workload this sidecar serves, or
    /// a 403 for anyone else.
    pub async fn serve_local<IO>(self: Arc<Self>, stream: IO, uid: Result<u32, String>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let allowed = match (&self.side, &uid) {
            (crate::stack::Side::Outbound(e), Ok(u)) => e.allow_uids.contains(u),
            _ => false,
        };
        if !allowed {
            let why = match &uid {
                Ok(u) => format!(
                    "this outbound listener serves only the workload it belongs to; \
                     uid {u} may not use it"
                ),
                Err(e) => format!("the caller's uid could not be established: {e}"),
            };
            tracing::warn!(reason = %why, "outbound caller refused");
            self.metrics.request(Outcome::BadCert);
            let deny = crate::deny::Deny::forbidden(why, Vec::new());
            let svc = hyper::service::service_fn(move |_req| {
                let resp = crate::respond::openai_error(&deny, "-");
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            return;
        }
        let own = match &self.side {
            crate::stack::Side::Outbound(e) => e.own(&self.creds, self.clock.now()),
            crate::stack::Side::Inbound { .. } => return,
        };
        match own {
            Ok(peer) => self.serve_http(stream, Some(peer)).await,
            Err(e) => tracing::error!(error = %e, "this sidecar's own SVID does not verify"),
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 on a connection whose caller is `peer` (outbound: the
    /// sidecar's own SVID when the connection opened; requests use the one in force).
    async fn serve_http<IO>(
        self: Arc<Self>,
        stream: IO,
        peer: Option<Arc<sigil_pki::VerifiedX509Svid>>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        });
        let idle_timeout = Duration::from_secs(self.cfg.idle_timeout_secs);
        let header_timeout = Duration::from_secs(self.cfg.header_read_timeout_secs);
        let mut revoked = self.revoked.clone();
        let outbound = matches!(self.side, crate::stack::Side::Outbound(_));
        let creds = self.creds.clone();
        let watched = peer.clone();
        let peer_id = peer
            .as_ref()
            .map(|p| p.spiffe_id.to_string())
            .unwrap_or_default();
        let svc = {
            let activity = activity.clone();
            hyper::service::service_fn(move |req| {
                let this = self.clone();
                let peer = peer.clone();
                let guard = InFlight::new(&activity);
                async move {
                    let resp = this.handle(req, peer.as_deref()).await;
                    // The request stays in flight until its answer's body ends.
                    let resp = resp.map(|b| {
                        b.map_frame(move |f| {
                            let _in_flight = &guard;
                            f
                        })
                        .boxed()
                    });
                    Ok::<_, std::convert::Infallible>(resp)
                }
            })
        };
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        builder.http2().timer(TokioTimer::new());
        let io = Tracked {
            io: stream,
            activity: activity.clone(),
        };
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        // A revocation closes the client's open connections, not only its next handshake.
        // Outbound, the caller is this sidecar's own identity: its revocation is answered per
        // request (401), so the local workload is told why rather than cut off.
        let revoked_now = async move {
            // A DPoP client's identity is checked per request (its token's).
            let Some(watched) = watched.filter(|_| !outbound) else {
                std::future::pending::<()>().await;
                return;
            };
            loop {
                if creds.load().revoked.is_revoked(&watched) {
                    return;
                }
                if revoked.changed().await.is_err() {
                    // No more updates can come (standalone): never fires.
                    std::future::pending::<()>().await;
                }
            }
        };
        let idle = async move {
            let tick = (idle_timeout / 4).max(Duration::from_millis(100));
            loop {
                tokio::time::sleep(tick).await;
                if activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.idle_for() >= idle_timeout
                {
                    return;
                }
            }
        };
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            },
            () = revoked_now => {
                tracing::info!(spiffe_id = %peer_id, "client revoked: connection closed");
            }
            () = idle => {
                tracing::debug!(spiffe_id = %peer_id, "idle connection closed");
            }
        }
    }
}
