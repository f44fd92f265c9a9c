//! TLS for the public listener: the server's own rotating certificate, client certificates
//! verified as X.509-SVIDs against the *current* trust bundle, and the accept loop that hands
//! each request the caller's verified identity.
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sigil_core::{Clock, SpiffeId};
use sigil_pki::{KeyAlgorithm, KeyPair, SvidSpec, VerifiedX509Svid, verify_x509_svid};
use sigil_tls::DeferredClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ServerError;
use crate::authority::Authorities;
use crate::issuer::Issuer;

/// The TLS peer of a request, as established once per connection.
#[derive(Clone, Debug)]
pub enum PeerAuth {
    /// No client certificate was presented.
    Anonymous,
    /// A client certificate that verified as an X.509-SVID of this trust domain.
    /// Revocation is checked by the handler, against the store, at request time.
    Verified(Arc<VerifiedX509Svid>),
    /// A client certificate was presented but did not verify; the reason is for logs.
    Rejected(Arc<str>),
}

/// Lifetime of the server's own TLS certificate.
const SERVER_SVID_TTL: u32 = 24 * 3600;

/// Serves whatever certificate the rotation task last installed.
#[derive(Debug)]
pub struct ServerCertResolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Issues the server's own SVID and keeps it fresh.
pub struct ServerIdentity {
    resolver: Arc<ServerCertResolver>,
    not_after: std::sync::atomic::AtomicI64,
    spiffe_id: SpiffeId,
    dns_names: Vec<String>,
}

impl ServerIdentity {
    /// Issues the first certificate.
    pub async fn issue(
        issuer: &Issuer,
        spiffe_id: SpiffeId,
        dns_names: Vec<String>,
    ) -> Result<Arc<Self>, ServerError> {
        let (key, not_after) = issue_cert(issuer, &spiffe_id, &dns_names).await?;
        Ok(Arc::new(Self {
            resolver: Arc::new(ServerCertResolver(ArcSwap::from_pointee(key))),
            not_after: std::sync::atomic::AtomicI64::new(not_after),
            spiffe_id,
            dns_names,
        }))
    }

    /// Renews the certificate at half its lifetime, forever.
    pub async fn rotate_forever(self: Arc<Self>, issuer: Arc<Issuer>) {
        loop {
            let not_after = self.not_after.load(std::sync::atomic::Ordering::Relaxed);
            let wait = ((not_after - issuer.now()) / 2).max(1);
            tokio::time::sleep(Duration::from_secs(u64::try_from(wait).unwrap_or(1))).await;
            match issue_cert(&issuer, &self.spiffe_id, &self.dns_names).await {
                Ok((key, not_after)) => {
                    self.resolver.0.store(Arc::new(key));
                    self.not_after
                        .store(not_after, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!("rotated the server's TLS certificate");
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not rotate the server's TLS certificate");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    }

    /// A rustls server config using this identity and deferred client verification: a
    /// client certificate is asked for, only its key proven at the handshake, and its chain
    /// verified right after against the current bundle (see [`peer_auth`]), so that a bad
    /// certificate gets an OAuth `invalid_client` / gRPC `Unauthenticated` answer instead of
    /// a TLS alert, and CA rotation never needs a new `ServerConfig`.
    ///
    /// INVARIANT: no handler trusts a peer unless it is `PeerAuth::Verified`, which only
    /// [`peer_auth`] produces, after full chain verification.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ServerError> {
        let provider = sigil_tls::provider();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ServerError::Internal(format!("TLS config: {e}")))?
            .with_client_cert_verifier(Arc::new(DeferredClientVerifier::new(provider)))
            .with_cert_resolver(self.resolver.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

async fn issue_cert(
    issuer: &Issuer,
    spiffe_id: &SpiffeId,
    dns_names: &[String],
) -> Result<(CertifiedKey, i64), ServerError> {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256)?;
    let csr = key.csr_der(Some(spiffe_id))?;
    let spec = SvidSpec {
        spiffe_id: spiffe_id.clone(),
        dns_names: dns_names.to_vec(),
        ttl_secs: SERVER_SVID_TTL,
    };
    let svid = issuer
        .sign_x509_svid(&csr, spec, "sigil-server")
        .await
        .map_err(|e| ServerError::Internal(format!("issuing the server certificate: {e}")))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der()));
    let signing_key = sigil_tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| ServerError::Internal(format!("loading the server key: {e}")))?;
    let chain = vec![CertificateDer::from(svid.der.clone())];
    Ok((CertifiedKey::new(chain, signing_key), svid.not_after))
}

/// Verifies the peer's certificates (if any) against the current trust bundle.
pub fn peer_auth(
    certs: Option<&[CertificateDer<'_>]>,
    authorities: &Authorities,
    clock: &dyn Clock,
) -> PeerAuth {
    let Some(certs) = certs.filter(|c| !c.is_empty()) else {
        return PeerAuth::Anonymous;
    };
    let chain: Vec<&[u8]> = certs.iter().map(|c| c.as_ref()).collect();
    let set = authorities.current();
    match verify_x509_svid(&chain, &set.bundle.x509_bundle(), clock.now()) {
        Ok(svid) => PeerAuth::Verified(Arc::new(svid)),
        Err(e) => PeerAuth::Rejected(e.to_string().into()),
    }
}

/// Accepts TLS connections until `shutdown` turns true; each request carries its [`PeerAuth`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    authorities: Arc<Authorities>,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let authorities = authorities.clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
            let peer = peer_auth(
                stream.get_ref().1.peer_certificates(),
                &authorities,
                &*clock,
            );
            serve_http(stream, router, peer).await;
        });
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection, inserting `ext` into every request.
pub async fn serve_http<IO, E>(io: IO, router: axum::Router, ext: E)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    E: Clone + Send + Sync + 'static,
{
    use tower::ServiceExt;
    let svc = router.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ext.clone());
        req
    });
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
