//! The SPIFFE Workload API on a unix socket. Callers are identified by the kernel (peer
//! credentials → selectors), never by anything they send; a caller gets exactly the
//! identities whose entries' selectors are all among its own.
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use sigil_core::{EntryId, RegistrationEntry, Selector, SpiffeId};
use sigil_proto::workload as wl;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::h2_authority::AuthorityRewriter;
use crate::identity::{Identities, Snapshot};
use crate::peer::{PeerCred, WorkloadAttestor};

/// The metadata every Workload API request must carry (SPIFFE Workload Endpoint spec).
const SECURITY_HEADER: &str = "workload.spiffe.io";
/// How long a first FetchX509SVID waits for an SVID that is being signed.
const FIRST_SVID_WAIT: Duration = Duration::from_secs(10);

/// What the kernel told us about a connection when it was accepted.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    pub accepted_at: SystemTime,
    pub has_cred: bool,
}

/// An accepted Workload API connection, carrying its peer credentials into every request.
///
/// The byte stream goes through [`AuthorityRewriter`]: grpc-core (Python, C++), grpc-java and
/// grpc-swift put the socket path in `:authority`, which h2 rejects; unchanged SPIFFE
/// clients in those languages must work.
pub struct AcceptedStream {
    inner: AuthorityRewriter<UnixStream>,
    info: ConnInfo,
}

impl AcceptedStream {
    pub fn new(inner: UnixStream) -> Self {
        let accepted_at = SystemTime::now();
        let inner = AuthorityRewriter::new(inner);
        let info = match inner.get_ref().peer_cred() {
            Ok(c) => ConnInfo {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
                accepted_at,
                has_cred: true,
            },
            Err(_) => ConnInfo {
                pid: None,
                uid: u32::MAX,
                gid: u32::MAX,
                accepted_at,
                has_cred: false,
            },
        };
        Self { inner, info }
    }
}

impl Connected for AcceptedStream {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info
    }
}

impl AsyncRead for AcceptedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AcceptedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A cached JWT-SVID: token, expiry, when it was received.
type CachedJwt = (String, i64, i64);

/// The Workload API service.
pub struct WorkloadApi {
    identities: Arc<Identities>,
    attestor: Arc<WorkloadAttestor>,
    jwts: Mutex<HashMap<(EntryId, Vec<String>), CachedJwt>>,
}

impl WorkloadApi {
    /// The service, attesting callers with `attestor` (shared with the other services on the
    /// socket, so they share its executable-hash cache).
    pub fn new(identities: Arc<Identities>, attestor: Arc<WorkloadAttestor>) -> Self {
        Self {
            identities,
            attestor,
            jwts: Mutex::new(HashMap::new()),
        }
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Vec<Selector>, Status> {
        attest_caller(&self.attestor, req).await
    }

    fn serving(&self) -> Result<Snapshot, Status> {
        serving(&self.identities)
    }
}

/// Checks the security header (else `InvalidArgument`) and attests the caller by its peer
/// credentials (else `PermissionDenied`); returns its selectors. The rule for every service
/// on the Workload API socket.
pub(crate) async fn attest_caller<T>(
    attestor: &WorkloadAttestor,
    req: &Request<T>,
) -> Result<Vec<Selector>, Status> {
    let header = req
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok());
    if header != Some("true") {
        return Err(Status::invalid_argument(
            "security header missing: requests must carry metadata workload.spiffe.io: true",
        ));
    }
    let info = req
        .extensions()
        .get::<ConnInfo>()
        .copied()
        .ok_or_else(|| Status::internal("no connection info"))?;
    let pid = match (info.has_cred, info.pid) {
        (true, Some(pid)) if pid > 0 => pid,
        _ => {
            return Err(Status::permission_denied(
                "caller's peer credentials unavailable",
            ));
        }
    };
    attestor
        .attest(PeerCred {
            pid,
            uid: info.uid,
            gid: info.gid,
            accepted_at: info.accepted_at,
        })
        .await
        .map_err(|e| Status::permission_denied(format!("could not attest the caller: {e}")))
}

/// The current snapshot if the agent is serving; `Unavailable` while it attests its node,
/// `PermissionDenied` once it has no node identity.
pub(crate) fn serving(identities: &Identities) -> Result<Snapshot, Status> {
    let snap = identities.subscribe().borrow().clone();
    if !snap.serving && snap.attesting {
        return Err(Status::unavailable(
            "this agent is attesting its node; retry shortly",
        ));
    }
    if !snap.serving {
        return Err(Status::permission_denied(
            "this agent has no node identity (not attested, or evicted)",
        ));
    }
    Ok(snap)
}

pub(crate) fn matching<'a>(
    snap: &'a Snapshot,
    selectors: &[Selector],
) -> Vec<&'a RegistrationEntry> {
    snap.entries
        .iter()
        .filter(|e| e.spec.matches(selectors))
        .collect()
}

pub(crate) fn no_entry() -> Status {
    Status::permission_denied("no registration entry matches the caller")
}

fn bundle_der(snap: &Snapshot) -> Vec<u8> {
    snap.bundle
        .as_ref()
        .map(|b| b.x509_authorities.concat())
        .unwrap_or_default()
}

/// The X.509 response for `selectors` in `snap`, or the status that ends the stream.
fn x509_response(
    snap: &Snapshot,
    selectors: &[Selector],
) -> Result<Option<wl::X509svidResponse>, Status> {
    if !snap.serving {
        return Err(Status::permission_denied(
            "this agent no longer has a node identity",
        ));
    }
    let entries = matching(snap, selectors);
    if entries.is_empty() {
        return Err(no_entry());
    }
    let bundle = bundle_der(snap);
    let svids: Vec<wl::X509svid> = entries
        .iter()
        .filter_map(|e| snap.svids.get(&e.id))
        .map(|s| wl::X509svid {
            spiffe_id: s.spiffe_id.to_string(),
            x509_svid: s.chain.concat(),
            x509_svid_key: s.key.clone(),
            bundle: bundle.clone(),
            hint: String::new(),
        })
        .collect();
    if svids.is_empty() {
        return Ok(None);
    }
    Ok(Some(wl::X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }))
}

pub(crate) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn stream_of<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> ResponseStream<T> {
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A stream that sends `render(snapshot)` now and again whenever it changes, until the node
/// loses its identity (then PermissionDenied) or the client goes away. `render` returns
/// `None` while there is nothing to send yet.
pub(crate) fn bundle_stream<T, F>(identities: &Identities, render: F) -> ResponseStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&Snapshot) -> Option<Result<T, Status>> + Send + 'static,
{
    let mut rx = identities.subscribe();
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut last: Option<T> = None;
        loop {
            let snap = rx.borrow_and_update().clone();
            if !snap.serving {
                let _ = tx
                    .send(Err(Status::permission_denied("no node identity")))
                    .await;
                return;
            }
            match render(&snap) {
                Some(Ok(resp)) if last.as_ref() != Some(&resp) => {
                    if tx.send(Ok(resp.clone())).await.is_err() {
                        return;
                    }
                    last = Some(resp);
                }
                Some(Err(status)) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                _ => {}
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    stream_of(out)
}

fn jwks_bytes(snap: &Snapshot) -> Result<Vec<u8>, Status> {
    let keys = snap
        .bundle
        .as_ref()
        .map(|b| b.jwt_authorities.clone())
        .unwrap_or_default();
    serde_json::to_vec(&serde_json::json!({ "keys": keys }))
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl wl::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<wl::X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<wl::X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<wl::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.caller(&req).await?;
        let snap = self.serving()?;
        if matching(&snap, &selectors).is_empty() {
            return Err(no_entry());
        }
        let mut rx = self.identities.subscribe();
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<wl::X509svidResponse> = None;
            let started = tokio::time::Instant::now();
            loop {
                let snap = rx.borrow_and_update().clone();
                match x509_response(&snap, &selectors) {
                    Ok(Some(resp)) => {
                        if last.as_ref() != Some(&resp) {
                            if tx.send(Ok(resp.clone())).await.is_err() {
                                return;
                            }
                            last = Some(resp);
                        }
                    }
                    Ok(None) => {
                        // Nothing valid to hand out: while the first SVID is being signed,
                        // wait a little; once SVIDs expired (e.g. offline), fail closed.
                        if last.is_some() || started.elapsed() > FIRST_SVID_WAIT {
                            let _ = tx
                                .send(Err(Status::unavailable(
                                    "no valid X.509-SVID is available (expired, and the server is unreachable?)",
                                )))
                                .await;
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(1)), if last.is_none() => {},
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(stream_of(out)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.caller(&req).await?;
        self.serving()?;
        Ok(Response::new(bundle_stream(&self.identities, |snap| {
            let b = snap.bundle.as_ref()?;
            Some(Ok(wl::X509BundlesResponse {
                crl: Vec::new(),
                bundles: HashMap::from([(b.trust_domain.id_string(), bundle_der(snap))]),
            }))
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        let selectors = self.caller(&req).await?;
        let snap = self.serving()?;
        let r = req.get_ref();
        if r.audience.is_empty() || r.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument("audience is required"));
        }
        let mut entries = matching(&snap, &selectors);
        if entries.is_empty() {
            return Err(no_entry());
        }
        if !r.spiffe_id.is_empty() {
            let want = SpiffeId::new(&r.spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
            entries.retain(|e| e.spec.spiffe_id == want);
            if entries.is_empty() {
                return Err(Status::permission_denied(format!(
                    "the caller is not entitled to {want}"
                )));
            }
        }
        let mut audience = r.audience.clone();
        audience.sort();
        audience.dedup();
        let now = self.identities.clock().now();
        let mut svids = Vec::new();
        for e in entries {
            let key = (e.id.clone(), audience.clone());
            let cached = self
                .jwts
                .lock()
                .ok()
                .and_then(|m| m.get(&key).cloned())
                .filter(|(_, exp, got)| now < got + (exp - got) / 2);
            let token = match cached {
                Some((t, _, _)) => t,
                None => {
                    let client = self.identities.client.load_full().ok_or_else(|| {
                        Status::unavailable(
                            "the server is unreachable and no cached JWT-SVID is fresh",
                        )
                    })?;
                    let resp = (*client)
                        .clone()
                        .mint_jwt_svid(sigil_proto::node::v1::MintJwtSvidRequest {
                            entry_id: e.id.to_string(),
                            audience: audience.clone(),
                        })
                        .await
                        .map_err(|s| {
                            Status::unavailable(format!("minting JWT-SVID: {}", s.message()))
                        })?
                        .into_inner();
                    if let Ok(mut m) = self.jwts.lock() {
                        m.retain(|_, (_, exp, _)| *exp > now);
                        m.insert(key, (resp.token.clone(), resp.expires_at, now));
                    }
                    resp.token
                }
            };
            svids.push(wl::Jwtsvid {
                spiffe_id: e.spec.spiffe_id.to_string(),
                svid: token,
                hint: String::new(),
            });
        }
        Ok(Response::new(wl::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.caller(&req).await?;
        self.serving()?;
        Ok(Response::new(bundle_stream(&self.identities, |snap| {
            let b = snap.bundle.as_ref()?;
            Some(jwks_bytes(snap).map(|jwks| wl::JwtBundlesResponse {
                bundles: HashMap::from([(b.trust_domain.id_string(), jwks)]),
            }))
        })))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        self.caller(&req).await?;
        let snap = self.serving()?;
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        let bundle = snap
            .bundle
            .as_ref()
            .ok_or_else(|| Status::unavailable("no trust bundle yet"))?;
        let keys = bundle
            .jwt_key_set()
            .map_err(|e| Status::internal(format!("bundle JWT keys: {e}")))?;
        let claims = sigil_pki::validate_jwt_svid(
            &r.svid,
            &keys,
            &bundle.trust_domain,
            &r.audience,
            self.identities.clock().now(),
            30,
        )
        .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        use prost_types::value::Kind;
        let s = |v: &str| prost_types::Value {
            kind: Some(Kind::StringValue(v.to_owned())),
        };
        let n = |v: i64| prost_types::Value {
            kind: Some(Kind::NumberValue(v as f64)),
        };
        let mut fields = BTreeMap::new();
        fields.insert("sub".to_owned(), s(&claims.sub));
        fields.insert(
            "aud".to_owned(),
            prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: claims.aud.iter().map(|a| s(a)).collect(),
                })),
            },
        );
        fields.insert("exp".to_owned(), n(claims.exp));
        if claims.iat != 0 {
            fields.insert("iat".to_owned(), n(claims.iat));
        }
        if let Some(jti) = &claims.jti {
            fields.insert("jti".to_owned(), s(jti));
        }
        Ok(Response::new(wl::ValidateJwtsvidResponse {
            spiffe_id: claims.sub.clone(),
            claims: Some(prost_types::Struct { fields }),
        }))
    }
}
