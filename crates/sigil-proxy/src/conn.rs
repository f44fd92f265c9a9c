//! One client connection: the identity is taken from the certificate the handshake
//! verified; requests are served over HTTP/1.1 or HTTP/2 with bounded patience; a
//! revocation of the client closes it.
//!
//! Patience, as Go's `net/http` and Envoy count it (hyper's own header timer cannot: it
//! starts as soon as a keep-alive connection waits for its next request, so it would also be
//! the idle timeout):
//! - `header_read_timeout_secs`: an HTTP/1 request head must be complete this long after its
//!   first byte (the first request's: after the connection opened);
//! - `idle_timeout_secs`: a connection with no request in flight and no bytes moving is
//!   closed after this long; over HTTP/2, with no request in flight, whatever frames move
//!   (a client cannot keep an idle connection by pinging, as Envoy counts it).
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_pki::verify_x509_svid;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Outcome;
use crate::stack::Proxy;

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// When the connection last moved bytes, how many requests are in flight, and since when an
/// HTTP/1 request head has been arriving.
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds since `start` + 1 when the pending request head began (0: none pending).
    head_since: AtomicU64,
    /// The connection speaks HTTP/2: heads are frames, and idle connections exchange frames.
    http2: AtomicBool,
}

/// Why a connection was closed for want of progress.
#[derive(Debug, PartialEq, Eq)]
enum Stalled {
    /// An HTTP/1 request head was not complete within the header timeout.
    Head,
    /// No request in flight and no bytes moving for the idle timeout.
    Idle,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            // The first request's head is due from the start.
            head_since: AtomicU64::new(1),
            http2: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes moved on the connection. Over HTTP/1 that is activity; over HTTP/2 it is not
    /// (PINGs and other frames move while no stream is open): only requests count there, so
    /// a client cannot hold an idle connection open by pinging.
    fn moved(&self) {
        if !self.http2.load(Ordering::Relaxed) {
            self.touch();
        }
    }

    /// Bytes were read: activity over HTTP/1 (see [`Activity::moved`]), and between its
    /// requests the first byte starts the next head's clock. One clock reading for both.
    fn read(&self) {
        if self.http2.load(Ordering::Relaxed) {
            return;
        }
        let now = self.now_ms();
        self.last.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let _ = self.head_since.compare_exchange(
                0,
                now.saturating_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// The connection opened with HTTP/2's preface: no head clock.
    fn http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed();
        now.saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    /// Whether the connection has waited too long for a head or for anything at all.
    fn stalled(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Stalled> {
        let since = self.head_since.load(Ordering::Relaxed);
        if since > 0 {
            let waited = self.now_ms().saturating_sub(since - 1);
            if Duration::from_millis(waited) >= header_timeout {
                return Some(Stalled::Head);
            }
        }
        (self.in_flight.load(Ordering::Relaxed) == 0 && self.idle_for() >= idle_timeout)
            .then_some(Stalled::Idle)
    }
}

/// Counts a request in flight, on its connection and in the proxy, until its response body
/// ends (or is dropped). Made when the request's head is complete: its head clock stops.
struct InFlight(Arc<Activity>, Arc<AtomicUsize>);

impl InFlight {
    fn new(a: &Arc<Activity>, proxy: &Arc<AtomicUsize>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        proxy.fetch_add(1, Ordering::Relaxed);
        a.head_since.store(0, Ordering::Relaxed);
        a.touch();
        Self(a.clone(), proxy.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's stream, noting when bytes move.
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    /// How much of HTTP/2's preface the first bytes matched (`None`: decided).
    preface: Option<usize>,
}

impl<IO> Tracked<IO> {
    /// Follows the first bytes until they are HTTP/2's whole preface or differ from it. Until
    /// then the connection counts as HTTP/1: a preface sent slowly is a slow head.
    fn follow_preface(&mut self, bytes: &[u8]) {
        let Some(matched) = self.preface else {
            return;
        };
        let want = H2_PREFACE.get(matched..).unwrap_or_default();
        let n = bytes.len().min(want.len());
        if bytes.get(..n) != want.get(..n) {
            self.preface = None;
        } else if matched + n == H2_PREFACE.len() {
            self.preface = None;
            self.activity.http2();
        } else {
            self.preface = Some(matched + n);
        }
    }
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
            let read = buf.filled().get(before..).unwrap_or_default();
            self.follow_preface(read);
            self.activity.read();
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
            self.activity.moved();
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
            self.activity.moved();
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
        let activity = Arc::new(Activity::new());
        let idle_timeout = Duration::from_secs(self.cfg.idle_timeout_secs);
        let header_timeout = Duration::from_secs(self.cfg.header_read_timeout_secs);
        let mut revoked = self.revoked.clone();
        let outbound = matches!(self.side, crate::stack::Side::Outbound(_));
        let creds = self.creds.clone();
        let watched = peer.clone();
        // Inbound, the headers that name the caller upstream hold for the whole connection.
        let identity = match (&self.side, &peer) {
            (crate::stack::Side::Inbound { .. }, Some(p)) => {
                Some(Arc::new(self.identity_headers(p)))
            }
            _ => None,
        };
        let peer_id = peer
            .as_ref()
            .map(|p| p.spiffe_id.to_string())
            .unwrap_or_default();
        let svc = {
            let activity = activity.clone();
            hyper::service::service_fn(move |req| {
                let this = self.clone();
                let peer = peer.clone();
                let identity = identity.clone();
                let guard = InFlight::new(&activity, &this.in_flight);
                async move {
                    let resp = this.handle(req, peer.as_deref(), identity.as_deref()).await;
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
        // The head clock is ours (see the module's doc): hyper's is switched off.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None);
        builder.http2().timer(TokioTimer::new());
        let io = Tracked {
            io: stream,
            activity: activity.clone(),
            preface: Some(0),
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
        let stalled = async move {
            let tick = (header_timeout.min(idle_timeout) / 8)
                .clamp(Duration::from_millis(50), Duration::from_secs(5));
            loop {
                tokio::time::sleep(tick).await;
                if let Some(why) = activity.stalled(header_timeout, idle_timeout) {
                    return why;
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
            why = stalled => match why {
                Stalled::Head => tracing::debug!(
                    spiffe_id = %peer_id,
                    "request head not complete within header_read_timeout_secs: connection closed"
                ),
                Stalled::Idle => tracing::debug!(spiffe_id = %peer_id, "idle connection closed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked() -> Tracked<()> {
        Tracked {
            io: (),
            activity: Arc::new(Activity::new()),
            preface: Some(0),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_head_is_due_from_the_start_and_a_complete_head_stops_its_clock() {
        let a = Arc::new(Activity::new());
        assert_eq!(a.stalled(Duration::ZERO, SECOND), Some(Stalled::Head));
        let proxy = Arc::new(AtomicUsize::new(0));
        let request = InFlight::new(&a, &proxy);
        assert_eq!(a.stalled(Duration::ZERO, Duration::ZERO), None, "in flight");
        assert_eq!(proxy.load(Ordering::Relaxed), 1, "in flight in the proxy");
        drop(request);
        assert_eq!(proxy.load(Ordering::Relaxed), 0);
        // Waiting for the next request is idle time, not head time.
        assert_eq!(a.stalled(Duration::ZERO, SECOND), None);
        assert_eq!(
            a.stalled(Duration::ZERO, Duration::ZERO),
            Some(Stalled::Idle)
        );
        // Its first byte starts the head clock again.
        a.read();
        assert_eq!(a.stalled(Duration::ZERO, SECOND), Some(Stalled::Head));
        assert_eq!(a.stalled(SECOND, SECOND), None);
    }

    #[test]
    fn bytes_read_while_a_request_is_in_flight_start_no_head_clock() {
        let a = Arc::new(Activity::new());
        let request = InFlight::new(&a, &Arc::default());
        a.read();
        drop(request);
        assert_eq!(a.stalled(Duration::ZERO, SECOND), None);
    }

    #[test]
    fn only_the_whole_http2_preface_switches_the_head_clock_off() {
        // At once, and in pieces.
        for pieces in [vec![H2_PREFACE.len()], vec![1, 3, 10, 10]] {
            let mut t = tracked();
            let mut at = 0;
            for n in pieces {
                t.follow_preface(&H2_PREFACE[at..at + n]);
                at += n;
            }
            assert!(t.activity.http2.load(Ordering::Relaxed));
            assert_eq!(t.activity.stalled(Duration::ZERO, SECOND), None);
            t.activity.read();
            assert_eq!(t.activity.stalled(Duration::ZERO, SECOND), None);
            // Frames moving with no request open are not activity.
            t.activity.last.store(0, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
            t.activity.read();
            t.activity.moved();
            let idle = Duration::from_millis(10);
            assert_eq!(t.activity.stalled(SECOND, idle), Some(Stalled::Idle));
        }
        // HTTP/1, an HTTP/1 method that starts like the preface, and a preface sent only
        // in part: the head clock runs.
        for bytes in [
            &b"POST / HTTP/1.1\r\n"[..],
            b"PROPFIND / HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n",
        ] {
            let mut t = tracked();
            for b in bytes {
                t.follow_preface(&[*b]);
            }
            assert!(!t.activity.http2.load(Ordering::Relaxed), "{bytes:?}");
            assert_eq!(
                t.activity.stalled(Duration::ZERO, SECOND),
                Some(Stalled::Head),
                "{bytes:?}"
            );
        }
    }
}
