//! The request path: identity from the TLS connection, token check, identity headers set by
//! the proxy (never trusted from the client), and a streaming forward to the upstream.
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sigil_core::Clock;
use sigil_pki::{VerifiedX509Svid, verify_x509_svid};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::{AuditLog, DecisionRecord};
use crate::config::Enforce;
use crate::extract::extract;
use crate::filter::{FilterError, SseFilter, filter_models, filter_tools_json, tools_list_ids};
use crate::metrics::{Metrics, Outcome};
use crate::ratelimit::Limits;
use crate::token::{Expect, TokenCache, TokenError};
use crate::trace::{RequestTrace, Tracer};
use crate::upstream::Upstream;
use crate::{Credentials, ProxyConfig};
use sigil_policy::{Caller, PolicyEngine, Principal, Query};
use std::time::{Duration, Instant};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// Largest upstream response the proxy buffers to filter (`/v1/models`, JSON `tools/list`).
const MAX_FILTERED_RESPONSE: usize = 16 * 1024 * 1024;

/// Hour of day (UTC) and weekday (0 = Monday) of `now`, as policy context sees them.
fn hour_and_weekday(now: i64) -> (i64, i64) {
    // 1970-01-01 was a Thursday.
    (
        now.rem_euclid(86_400) / 3600,
        (now.div_euclid(86_400) + 3).rem_euclid(7),
    )
}

/// Whether `engine` permits `caller` `action` on `resource_type::resource_id` (errors deny).
fn permits(
    caller: &Caller,
    engine: &PolicyEngine,
    action: &str,
    resource_type: &str,
    resource_id: &str,
) -> bool {
    engine
        .decide(&caller.query(action, resource_type, resource_id))
        .is_ok_and(|d| d.allow)
}

/// What an authorized request may see of the response.
enum ResponseFilter {
    None,
    /// Keep the models the caller may invoke.
    Models(Caller, Arc<PolicyEngine>),
    /// Keep the tools the caller may call in the answers to these `tools/list` ids.
    Tools(Caller, Arc<PolicyEngine>, std::collections::HashSet<String>),
}

/// An authorized request: its body and how to filter the response.
struct Authorized {
    body: Bytes,
    filter: ResponseFilter,
}

/// The header carrying the caller's SPIFFE ID to the upstream.
pub const SPIFFE_ID_HEADER: &str = "x-sigil-spiffe-id";
/// The header carrying the proxy's request id to the upstream.
pub const REQUEST_ID_HEADER: &str = "x-sigil-request-id";

/// Shared proxy state.
pub struct Proxy {
    cfg: ProxyConfig,
    creds: Arc<ArcSwap<Credentials>>,
    clock: Arc<dyn Clock>,
    tokens: TokenCache,
    policies: Arc<ArcSwap<PolicyEngine>>,
    /// Per identity and per identity × resource; from the config or the policy bundle.
    limits: Arc<ArcSwap<Limits>>,
    audit: AuditLog,
    upstream: Upstream,
    revoked: tokio::sync::watch::Receiver<i64>,
    pub(crate) metrics: Arc<Metrics>,
    /// Traces (off unless configured).
    tracer: Option<Tracer>,
}

/// The trace of the request being handled (`None`: tracing off or not sampled).
type Trace = Option<Box<RequestTrace>>;

/// A refusal: the status and message the client gets, and how long to wait for a 429.
struct Deny {
    status: StatusCode,
    message: String,
    retry_after: Option<Duration>,
}

impl Deny {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        creds: Arc<ArcSwap<Credentials>>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        policies: Arc<ArcSwap<PolicyEngine>>,
        revoked: tokio::sync::watch::Receiver<i64>,
        limits: Arc<ArcSwap<Limits>>,
    ) -> Self {
        let upstream = Upstream::new(&cfg.upstream, cfg.upstream_http2);
        Self {
            limits,
            metrics: Arc::new(Metrics::new(cfg.metrics_addr.is_some())),
            cfg,
            creds,
            clock,
            tokens: TokenCache::default(),
            policies,
            audit,
            upstream,
            revoked,
            tracer: None,
        }
    }

    /// Traces every sampled request with `tracer`.
    pub fn with_tracer(mut self, tracer: Option<Tracer>) -> Self {
        self.tracer = tracer;
        self
    }

    /// The time a step starts when metrics or the request's trace measure it (`None`, no
    /// clock read, otherwise).
    #[inline]
    fn start(&self, trace: &Trace) -> Option<Instant> {
        self.metrics
            .start()
            .or_else(|| trace.as_ref().map(|_| Instant::now()))
    }

    /// Serves one accepted TLS connection.
    pub async fn serve_connection<IO>(self: Arc<Self>, stream: tokio_rustls::server::TlsStream<IO>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The verifier admitted the chain; derive the identity from the same certificate.
        let peer = {
            let Some(certs) = stream.get_ref().1.peer_certificates() else {
                return;
            };
            let chain: Vec<&[u8]> = certs.iter().map(|c| c.as_ref()).collect();
            match verify_x509_svid(&chain, &self.creds.load().x509, self.clock.now()) {
                Ok(v) => Arc::new(v),
                Err(e) => {
                    self.metrics.request(Outcome::BadCert);
                    tracing::info!(error = %e, "client certificate refused after handshake");
                    return;
                }
            }
        };
        let mut revoked = self.revoked.clone();
        let creds = self.creds.clone();
        let watched = peer.clone();
        let peer_id = peer.spiffe_id.to_string();
        let svc = hyper::service::service_fn(move |req| {
            let this = self.clone();
            let peer = peer.clone();
            async move { Ok::<_, std::convert::Infallible>(this.handle(req, &peer).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        // A revocation closes the client's open connections, not only its next handshake.
        let revoked_now = async move {
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
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            },
            () = revoked_now => {
                tracing::info!(spiffe_id = %peer_id, "client revoked: connection closed");
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: &VerifiedX509Svid) -> Response<Body> {
        // Tracing off: one branch, nothing else.
        let Some(tracer) = &self.tracer else {
            return self.handle_request(req, peer, &mut None).await;
        };
        let mut trace = tracer.begin(
            req.headers(),
            req.method(),
            req.uri().path(),
            peer.spiffe_id.as_str(),
        );
        let resp = self.handle_request(req, peer, &mut trace).await;
        if let Some(t) = trace {
            tracer.finish(t, resp.status());
        }
        resp
    }

    async fn handle_request(
        &self,
        req: Request<Incoming>,
        peer: &VerifiedX509Svid,
        trace: &mut Trace,
    ) -> Response<Body> {
        let received = self.metrics.start();
        let request_id = uuid::Uuid::new_v4().to_string();
        if let Some(t) = trace.as_deref_mut() {
            t.request_id(&request_id);
        }
        let (parts, body) = req.into_parts();
        if self.cfg.enforce == Enforce::MtlsOnly {
            if let Some(t) = trace.as_deref_mut() {
                t.mtls_only();
            }
            if self.creds.load().revoked.is_revoked(peer) {
                let deny = Deny::new(StatusCode::UNAUTHORIZED, "client certificate revoked");
                self.metrics.request(Outcome::Revoked);
                return openai_error(&deny, &request_id);
            }
            return self
                .forward(
                    parts,
                    body.boxed(),
                    peer,
                    &request_id,
                    ResponseFilter::None,
                    received,
                    trace,
                )
                .await;
        }
        let mcp = parts.method == http::Method::POST && parts.uri.path() == self.cfg.mcp_path;
        let mut record = DecisionRecord {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            request_id: request_id.clone(),
            spiffe_id: peer.spiffe_id.to_string(),
            cert_thumbprint: peer.x5t_s256.clone(),
            jti: None,
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            calls: Vec::new(),
            policy_ids: Vec::new(),
            decision: "deny",
            reason: String::new(),
        };
        let mut body_seen = Bytes::new();
        let mut unread = Some(body);
        let decided = self
            .authorize(
                &parts,
                &mut unread,
                peer,
                &mut record,
                &mut body_seen,
                trace,
            )
            .await;
        if let Some(rest) = unread {
            // Refused before the body was read: take what the client is still sending
            // (bounded) so the refusal is not lost to a connection reset.
            drain(rest).await;
        }
        let allowed = decided.is_ok();
        record.decision = if allowed { "allow" } else { "deny" };
        if let Some(t) = trace.as_deref_mut() {
            t.decided(&record);
        }
        // INVARIANT: the decision is durable before anything is forwarded; a decision that
        // cannot be recorded is a refusal.
        if let Err(e) = self.audit.record(&record).await {
            tracing::error!(error = %e, request_id, "audit failed; refusing");
            if allowed {
                self.metrics.request(Outcome::AuditFailure);
                if let Some(t) = trace.as_deref_mut() {
                    t.refused("audit log unavailable");
                }
                let deny = Deny::new(StatusCode::SERVICE_UNAVAILABLE, "audit log unavailable");
                return self.refusal(mcp, &deny, &body_seen, &request_id);
            }
        }
        match decided {
            Ok(ok) => {
                let body = Full::new(ok.body).map_err(|never| match never {}).boxed();
                self.forward(parts, body, peer, &request_id, ok.filter, received, trace)
                    .await
            }
            Err(deny) => {
                self.metrics.refused(deny.status, &deny.message);
                tracing::info!(spiffe_id = %peer.spiffe_id, request_id, reason = %deny.message, "request refused");
                self.refusal(mcp, &deny, &body_seen, &request_id)
            }
        }
    }

    /// A refusal in the client's own shape: JSON-RPC error objects on the MCP endpoint, the
    /// OpenAI error object elsewhere.
    fn refusal(&self, mcp: bool, deny: &Deny, body: &[u8], request_id: &str) -> Response<Body> {
        if mcp {
            jsonrpc_error(deny, body, request_id)
        } else {
            openai_error(deny, request_id)
        }
    }

    /// Token, rate limit and body size: the request body (bounded) if the request may go on.
    async fn authorize(
        &self,
        parts: &http::request::Parts,
        body: &mut Option<Incoming>,
        peer: &VerifiedX509Svid,
        record: &mut DecisionRecord,
        body_seen: &mut Bytes,
        trace: &mut Trace,
    ) -> Result<Authorized, Deny> {
        // Revoked after the handshake: the connection is being closed; refuse what is left.
        if self.creds.load().revoked.is_revoked(peer) {
            record.reason = "client certificate revoked".into();
            return Err(Deny::new(StatusCode::UNAUTHORIZED, record.reason.clone()));
        }
        // Ambiguous framing is how requests are smuggled past a proxy: refuse, never guess.
        let h = &parts.headers;
        if (h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH))
            || h.get_all(header::CONTENT_LENGTH).iter().count() > 1
        {
            record.reason =
                "ambiguous message framing (Content-Length with Transfer-Encoding)".into();
            return Err(Deny::new(StatusCode::BAD_REQUEST, record.reason.clone()));
        }
        let token = bearer(&parts.headers).map_err(|e| {
            record.reason = e.to_string();
            Deny::new(StatusCode::UNAUTHORIZED, e.to_string())
        })?;
        let creds = self.creds.load();
        let expect = Expect {
            keys: &creds.jwt_keys,
            issuer: &self.cfg.issuer,
            audience: &self.cfg.audience,
            now: self.clock.now(),
            leeway: self.cfg.token_leeway_secs,
            x5t_s256: &peer.x5t_s256,
        };
        let token_started = self.start(trace);
        let (checked, cache_hit) = self.tokens.lookup(&token, &expect);
        self.metrics.token_checked(token_started);
        self.metrics.token_cache(cache_hit);
        if let Some(t) = trace.as_deref_mut() {
            let error = checked.as_ref().err().map(ToString::to_string);
            t.token_checked(token_started, cache_hit, error);
        }
        let claims = checked.map_err(|e| {
            record.reason = e.to_string();
            Deny::new(StatusCode::UNAUTHORIZED, e.to_string())
        })?;
        record.jti = Some(claims.jti.clone());
        if claims.sub != peer.spiffe_id.as_str() {
            record.reason = "token subject is not the certificate's SPIFFE ID".into();
            return Err(Deny::new(StatusCode::UNAUTHORIZED, record.reason.clone()));
        }
        let limits = self.limits.load_full();
        if let Err(wait) = limits
            .per_identity
            .check(peer.spiffe_id.as_str(), Instant::now())
        {
            record.reason = "rate limit exceeded".into();
            return Err(Deny {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: record.reason.clone(),
                retry_after: Some(wait),
            });
        }
        let max = self.cfg.max_body_bytes;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = || {
            Deny::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {max} bytes"),
            )
        };
        if declared.is_some_and(|n| n > max as u64) {
            record.reason = "request body too large".into();
            return Err(too_large());
        }
        let Some(body) = body.take() else {
            record.reason = "request body already taken".into();
            return Err(Deny::new(StatusCode::BAD_REQUEST, record.reason.clone()));
        };
        let body = match http_body_util::Limited::new(body, max).collect().await {
            Ok(c) => c.to_bytes(),
            Err(_) => {
                record.reason = "request body too large or unreadable".into();
                return Err(too_large());
            }
        };
        *body_seen = body.clone();
        // What is being called; policy on it comes next. A request that cannot be read
        // cannot be authorized.
        record.calls = extract(
            parts.method.as_str(),
            parts.uri.path(),
            &self.cfg.mcp_path,
            &body,
        )
        .map_err(|e| {
            record.reason = e.to_string();
            Deny::new(StatusCode::BAD_REQUEST, e.to_string())
        })?;
        // Every call must be permitted (a batch hiding one forbidden call is refused whole).
        let now = self.clock.now();
        let scopes: Vec<String> = claims
            .scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let engine = self.policies.load_full();
        if engine.expired(now) {
            record.reason = "policy bundle expired (or none received yet)".into();
            return Err(Deny::new(
                StatusCode::SERVICE_UNAVAILABLE,
                record.reason.clone(),
            ));
        }
        let (hour, weekday) = hour_and_weekday(now);
        for call in &record.calls {
            let query = Query {
                principal: Principal {
                    spiffe_id: peer.spiffe_id.as_str(),
                    trust_domain: peer.spiffe_id.trust_domain_name(),
                    groups: &claims.groups,
                },
                action: call.action,
                resource_type: call.resource_type,
                resource_id: &call.resource_id,
                scopes: &scopes,
                hour,
                weekday,
                arguments: call.arguments.as_ref(),
            };
            let policy_started = self.start(trace);
            let decided = engine.decide(&query);
            self.metrics.policy_evaluated(policy_started);
            if let Some(t) = trace.as_deref_mut() {
                let d = decided.as_ref().map_err(ToString::to_string);
                t.policy_evaluated(policy_started, call, d);
            }
            let decision = decided.map_err(|e| {
                record.reason = e.to_string();
                Deny::new(StatusCode::FORBIDDEN, "request could not be evaluated")
            })?;
            record
                .policy_ids
                .extend(decision.policy_ids.iter().cloned());
            if !decision.allow {
                record.reason = format!(
                    "policy denies {} on {}::\"{}\"",
                    call.action, call.resource_type, call.resource_id
                );
                if !decision.errors.is_empty() {
                    record
                        .reason
                        .push_str(&format!(" (errors: {})", decision.errors.join("; ")));
                }
                return Err(Deny::new(StatusCode::FORBIDDEN, record.reason.clone()));
            }
        }
        // Limits per identity × model/tool, taken only once every call is permitted.
        let per_resource = if limits.resources.is_empty() {
            &[][..]
        } else {
            &record.calls[..]
        };
        for call in per_resource {
            let key = (call.resource_type.to_owned(), call.resource_id.clone());
            if let Some(limiter) = limits.resources.get(&key)
                && let Err(wait) = limiter.check(peer.spiffe_id.as_str(), Instant::now())
            {
                record.reason = format!(
                    "rate limit exceeded for {}::\"{}\"",
                    call.resource_type, call.resource_id
                );
                return Err(Deny {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: record.reason.clone(),
                    retry_after: Some(wait),
                });
            }
        }
        record.reason = "permitted by policy".into();
        let caller = || Caller {
            spiffe_id: peer.spiffe_id.as_str().to_owned(),
            trust_domain: peer.spiffe_id.trust_domain_name().to_owned(),
            groups: claims.groups.clone(),
            scopes: scopes.clone(),
            hour,
            weekday,
        };
        let filter = if record.calls.iter().any(|c| c.action == "list_models") {
            ResponseFilter::Models(caller(), engine.clone())
        } else if record.calls.iter().any(|c| c.action == "list_tools") {
            ResponseFilter::Tools(caller(), engine.clone(), tools_list_ids(&body))
        } else {
            ResponseFilter::None
        };
        Ok(Authorized { body, filter })
    }

    // The request's parts, and what the decision left for the forward.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        peer: &VerifiedX509Svid,
        request_id: &str,
        filter: ResponseFilter,
        received: Option<Instant>,
        trace: &mut Trace,
    ) -> Response<Body> {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let Some(uri) = self.upstream.uri(&path) else {
            self.metrics.request(Outcome::BadRequest);
            return openai_error(
                &Deny::new(StatusCode::BAD_REQUEST, "invalid request path"),
                request_id,
            );
        };
        parts.uri = uri;
        parts.version = self.upstream.version();
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        strip_identity(headers);
        headers.remove(header::AUTHORIZATION);
        headers.remove(header::HOST);
        if !matches!(filter, ResponseFilter::None) {
            // The proxy must read what it filters: ask for an unencoded response.
            headers.remove(header::ACCEPT_ENCODING);
        }
        if let Ok(v) = HeaderValue::from_str(peer.spiffe_id.as_str()) {
            headers.insert(HeaderName::from_static(SPIFFE_ID_HEADER), v);
        }
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
        }
        if let Some(t) = trace.as_deref_mut() {
            t.inject(headers, &parts.method);
        }
        self.metrics.forwarding(received);
        let sent = self.metrics.start();
        match self
            .upstream
            .request(Request::from_parts(parts, body))
            .await
        {
            Ok(resp) => {
                self.metrics.upstream_done(sent);
                if let Some(t) = trace.as_deref_mut() {
                    t.upstream_done(Ok(resp.status().as_u16()));
                }
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                match filter_response(&mut parts, body, filter).await {
                    Ok(body) => {
                        self.metrics.allowed(self.cfg.enforce);
                        Response::from_parts(parts, body)
                    }
                    Err(e) => {
                        self.metrics.request(Outcome::Upstream);
                        tracing::warn!(error = %e, request_id, "upstream response refused");
                        openai_error(
                            &Deny::new(
                                StatusCode::BAD_GATEWAY,
                                "upstream response could not be filtered",
                            ),
                            request_id,
                        )
                    }
                }
            }
            Err(e) => {
                self.metrics.upstream_done(sent);
                if let Some(t) = trace.as_deref_mut() {
                    t.upstream_done(Err(e.to_string()));
                }
                self.metrics.request(Outcome::Upstream);
                tracing::warn!(error = %e, request_id, "upstream unreachable");
                openai_error(
                    &Deny::new(StatusCode::BAD_GATEWAY, "upstream unavailable"),
                    request_id,
                )
            }
        }
    }
}

/// Most bytes of a refused request's body read and discarded, and for how long.
const DRAIN_MAX: usize = 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and discards what is left of a refused request's body, within bounds, so the client
/// finishes sending and reads the refusal (instead of a reset). Beyond the bounds the
/// connection is closed after the response, as before.
async fn drain(body: Incoming) {
    let read = http_body_util::Limited::new(body, DRAIN_MAX).collect();
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Applies `filter` to a successful upstream response: buffered for JSON bodies (bounded),
/// event by event for SSE. Anything it cannot read is refused, never passed unfiltered.
async fn filter_response(
    parts: &mut http::response::Parts,
    body: Incoming,
    filter: ResponseFilter,
) -> Result<Body, FilterError> {
    if matches!(filter, ResponseFilter::None) || !parts.status.is_success() {
        return Ok(body.boxed());
    }
    if parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return Err(FilterError::Shape("encoded response"));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let sse = content_type.starts_with("text/event-stream");
    match filter {
        ResponseFilter::None => Ok(body.boxed()),
        ResponseFilter::Tools(caller, engine, ids) if sse => {
            let allow = move |t: &str| permits(&caller, &engine, "call_tool", "Tool", t);
            Ok(sse_filtered(
                body,
                SseFilter::new(ids, allow, MAX_FILTERED_RESPONSE),
            ))
        }
        ResponseFilter::Models(..) | ResponseFilter::Tools(..)
            if parts.status == StatusCode::ACCEPTED && content_type.is_empty() =>
        {
            Ok(body.boxed())
        }
        filter => {
            let bytes = http_body_util::Limited::new(body, MAX_FILTERED_RESPONSE)
                .collect()
                .await
                .map_err(|_| FilterError::Shape("response too large or unreadable"))?
                .to_bytes();
            let out = match filter {
                ResponseFilter::Models(caller, engine) => {
                    filter_models(&bytes, |m| permits(&caller, &engine, "invoke", "Model", m))?
                }
                ResponseFilter::Tools(caller, engine, ids) => {
                    let allow = |t: &str| permits(&caller, &engine, "call_tool", "Tool", t);
                    filter_tools_json(&bytes, &ids, &allow)?
                }
                ResponseFilter::None => bytes.to_vec(),
            };
            parts.headers.remove(header::CONTENT_LENGTH);
            if let Ok(v) = HeaderValue::from_str(&out.len().to_string()) {
                parts.headers.insert(header::CONTENT_LENGTH, v);
            }
            Ok(Full::new(Bytes::from(out))
                .map_err(|never| match never {})
                .boxed())
        }
    }
}

/// An SSE body passed on event by event through `filter`.
fn sse_filtered<F>(body: Incoming, filter: SseFilter<F>) -> Body
where
    F: Fn(&str) -> bool + Send + Sync + Unpin + 'static,
{
    SseBody {
        inner: body,
        filter,
        done: false,
    }
    .boxed()
}

struct SseBody<F> {
    inner: Incoming,
    filter: SseFilter<F>,
    done: bool,
}

impl<F> hyper::body::Body for SseBody<F>
where
    F: Fn(&str) -> bool + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry nothing to filter; they end the stream here.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match this.filter.push(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => {
                            return Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(
                                out,
                            )))));
                        }
                        Err(e) => {
                            // Nothing unfiltered is passed on: the stream ends here.
                            tracing::warn!(error = %e, "SSE response cut");
                            this.done = true;
                            return Poll::Ready(None);
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.filter.finish();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(rest)))));
                }
            }
        }
    }
}

/// A refusal as JSON-RPC error objects (MCP): one per request of the body that carries an
/// `id` (`null` when the body could not be read), with the HTTP status of the refusal.
fn jsonrpc_error(deny: &Deny, body: &[u8], request_id: &str) -> Response<Body> {
    let code = match deny.status {
        StatusCode::BAD_REQUEST if deny.message.contains("not valid JSON") => -32700,
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => -32600,
        StatusCode::UNAUTHORIZED => -32001,
        StatusCode::FORBIDDEN => -32003,
        StatusCode::TOO_MANY_REQUESTS => -32029,
        _ => -32603,
    };
    let error = |id: serde_json::Value| {
        serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": code, "message": deny.message, "data": {"request_id": request_id}},
        })
    };
    let ids = |m: &serde_json::Value| m.get("method").and(m.get("id")).cloned();
    let out = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(batch)) => {
            let errs: Vec<_> = batch.iter().filter_map(ids).map(error).collect();
            if errs.is_empty() {
                error(serde_json::Value::Null)
            } else {
                serde_json::Value::Array(errs)
            }
        }
        Ok(m) => error(ids(&m).unwrap_or(serde_json::Value::Null)),
        Err(_) => error(serde_json::Value::Null),
    };
    let mut resp = openai_error(deny, request_id);
    *resp.body_mut() = Full::new(Bytes::from(out.to_string()))
        .map_err(|never| match never {})
        .boxed();
    resp
}

/// Exactly one `Authorization: Bearer <token>` header.
fn bearer(h: &HeaderMap) -> Result<String, TokenError> {
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(TokenError::Missing);
    };
    let v = v.to_str().map_err(|_| TokenError::Missing)?;
    let (scheme, token) = v.split_once(' ').ok_or(TokenError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(TokenError::Missing);
    }
    Ok(token.to_owned())
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for n in named
        .iter()
        .map(String::as_str)
        .chain(HOP_BY_HOP.iter().copied())
    {
        h.remove(n);
    }
}

/// Removes every `x-sigil-*` header: identity reaches the upstream only from the proxy.
fn strip_identity(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-sigil-"))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// An error in the OpenAI API's own shape.
fn openai_error(deny: &Deny, request_id: &str) -> Response<Body> {
    let (status, message) = (deny.status, deny.message.as_str());
    let (kind, code) = match status {
        StatusCode::UNAUTHORIZED => ("authentication_error", "invalid_token"),
        StatusCode::FORBIDDEN => ("permission_error", "forbidden"),
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "request_too_large"),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", "rate_limited"),
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => {
            ("api_error", "upstream_error")
        }
        _ => ("invalid_request_error", "invalid_request"),
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    if let Some(wait) = deny.retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_needs_exactly_one_well_formed_header() {
        let mut h = HeaderMap::new();
        assert!(bearer(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h).unwrap(), "abc");
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer def"),
        );
        assert!(bearer(&h).is_err(), "two Authorization headers");
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer a b", "bearerabc"] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert!(bearer(&h).is_err(), "{bad}");
        }
    }

    #[test]
    fn identity_and_hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-sigil-spiffe-id",
            HeaderValue::from_static("spiffe://td/admin"),
        );
        h.insert("X-Sigil-Groups", HeaderValue::from_static("root"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }
}
