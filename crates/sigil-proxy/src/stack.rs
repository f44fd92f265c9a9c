//! The request path, top to bottom. Each step is a function in its own file that returns
//! the next value or a [`Deny`]:
//!
//! admit (`admit.rs`) → token (`authenticate.rs`) → limit (`limit.rs`) → session
//! (`session.rs`) → body (`body.rs`) → extract (`extract.rs`) → limit per call →
//! decide (`decide.rs`) → limit per resource → audit (`audit.rs`) → forward (`forward.rs`)
//! → respond (`respond.rs`).
//!
//! The audit record is filled once, from what the steps returned; one observer
//! (`observe.rs`) does metrics and traces for all of them.
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::{Bytes, Incoming};
use sigil_core::Clock;
use sigil_pki::VerifiedX509Svid;
use sigil_policy::PolicyEngine;

use crate::admit::admit;
use crate::audit::{AuditLog, DecisionRecord, Durable};
use crate::authenticate::{Audience, Presenter, authenticate};
use crate::config::{Enforce, Validated};
use crate::decide::{Seeing, decide};
use crate::deny::Deny;
use crate::egress::{Egress, Route};
use crate::extract::{Call, ExtractError, Routes, Target, extract};
use crate::forward::{Vouch, forward};
use crate::headers::{Identity, IdentityHeaders};
use crate::metrics::{Metrics, Outcome};
use crate::observe::Observer;
use crate::path::RequestPath;
use crate::ratelimit::Limits;
use crate::respond::{Body, ResponseFilter, drain, filter_response, full, openai_error, refusal};
use crate::session::{SESSION_HEADER, SessionError, Sessions};
use crate::token::TokenCache;
use crate::trace::Tracer;
use crate::{Credentials, ProxyConfig};

/// Which way a proxy's requests go.
pub(crate) enum Side {
    /// Calls received over mTLS from other workloads, for the upstream behind this sidecar:
    /// a token for `audience` is required of each.
    Inbound {
        upstream: Box<crate::upstream::Upstream>,
        audience: String,
        tokens: TokenCache,
        dpop: Box<crate::dpop::DpopState>,
    },
    /// The local workload's own calls, sent on its routes; the principal is this sidecar's
    /// own SVID and the token comes from the trust authority.
    Outbound(Arc<Egress>),
}

/// Shared proxy state.
pub struct Proxy {
    pub(crate) cfg: ProxyConfig,
    routes: Routes,
    pub(crate) creds: Arc<ArcSwap<Credentials>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) side: Side,
    policies: Arc<ArcSwap<PolicyEngine>>,
    /// Per identity and per identity × resource; from the config or the policy bundle.
    limits: Arc<ArcSwap<Limits>>,
    audit: AuditLog,
    pub(crate) revoked: tokio::sync::watch::Receiver<i64>,
    pub(crate) metrics: Arc<Metrics>,
    /// Traces (off unless configured).
    tracer: Option<Tracer>,
    /// The fleet's node risks from the agent (empty when run from files).
    risks: Arc<ArcSwap<crate::risk::RiskTable>>,
    /// Behaviour counters (off unless `telemetry_broker` is set).
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    sessions: Sessions,
    /// The proxy's own SPIFFE ID (XFCC's `By`).
    proxy_id: Option<String>,
    /// Requests in flight on every connection, each until its answer's body ends: the
    /// audit log's ([`AuditLog::in_flight`]).
    pub(crate) in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// What the steps learned about a request, for its audit record and its refusal.
#[derive(Default)]
struct Seen {
    jti: Option<String>,
    /// A delegated token's user and chain.
    delegation: Option<sigil_policy::Delegation>,
    body: Bytes,
    calls: Vec<Call>,
}

/// How a forwarded request's answer is released: what the caller may see of it, whether
/// it opens or ends an MCP session, and the audit record it waits for.
struct Answer {
    filter: ResponseFilter,
    mcp: bool,
    durable: Option<Durable>,
}

/// A permitted request: its body, the policies that permitted it, its answer's filter,
/// and (outbound) the route and token it goes with.
struct Authorized {
    body: Bytes,
    policy_ids: Vec<String>,
    filter: ResponseFilter,
    mcp: bool,
    route: Option<(Arc<Route>, Arc<str>)>,
}

/// A permitted request refused after all because its record could not be written: the
/// observer is told, and the refusal returned.
fn audit_unavailable(obs: &mut Observer<'_>) -> Deny {
    obs.refused_after_decision("audit log unavailable");
    let deny = Deny::unavailable("audit log unavailable", Outcome::AuditFailure);
    obs.outcome(deny.outcome);
    deny
}

impl From<ExtractError> for Deny {
    fn from(e: ExtractError) -> Self {
        match e {
            ExtractError::Json(crate::json::JsonError::Syntax(_)) => {
                Deny::parse_error(e.to_string())
            }
            e => Deny::bad_request(e.to_string()),
        }
    }
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        v: Validated,
        side: Side,
        creds: Arc<ArcSwap<Credentials>>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        policies: Arc<ArcSwap<PolicyEngine>>,
        revoked: tokio::sync::watch::Receiver<i64>,
        limits: Arc<ArcSwap<Limits>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cfg = v.cfg;
        // The proxy's own SPIFFE ID (the same across rotations), for XFCC's `By`.
        let proxy_id = {
            let c = creds.load();
            let chain: Vec<&[u8]> = c.serving.cert.iter().map(|d| d.as_ref()).collect();
            sigil_pki::verify_x509_svid(&chain, &c.x509, clock.now())
                .ok()
                .map(|v| v.spiffe_id.to_string())
        };
        Self {
            limits,
            metrics,
            routes: v.routes,
            cfg,
            creds,
            clock,
            side,
            policies,
            revoked,
            tracer: None,
            risks: Arc::default(),
            telemetry: None,
            sessions: Sessions::default(),
            proxy_id,
            // The audit log's: the only request in flight syncs its own record.
            in_flight: audit.in_flight(),
            audit,
        }
    }

    /// The headers that name `caller` to the upstream: its SPIFFE ID, and Envoy's XFCC
    /// when configured.
    pub(crate) fn identity_headers(&self, caller: &VerifiedX509Svid) -> IdentityHeaders {
        IdentityHeaders::new(&Identity {
            spiffe_id: caller.spiffe_id.as_str(),
            cert_sha256: &caller.sha256,
            proxy_id: self.proxy_id.as_deref(),
            xfcc: self.cfg.xfcc,
        })
    }

    /// Traces every sampled request with `tracer`.
    pub fn with_tracer(mut self, tracer: Option<Tracer>) -> Self {
        self.tracer = tracer;
        self
    }

    pub(crate) fn with_telemetry(
        mut self,
        telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    ) -> Self {
        self.telemetry = telemetry;
        self
    }

    pub(crate) fn with_risks(mut self, risks: Arc<ArcSwap<crate::risk::RiskTable>>) -> Self {
        self.risks = risks;
        self
    }

    /// Answers one request; `peer` is the connection's client certificate (`None`: a client
    /// without one, admitted only with a DPoP-bound token), `identity` the headers that name
    /// it upstream (built once per connection by [`Self::identity_headers`]).
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: Option<&VerifiedX509Svid>,
        identity: Option<&IdentityHeaders>,
    ) -> Response<Body> {
        // Inbound: the protected resource metadata (RFC 9728) is public, and refusals of
        // missing or bad credentials say where to find it (the base URL is built only then;
        // the request's `Host` and authority are kept for it, a reference count each).
        let origin = match &self.side {
            Side::Inbound { dpop, .. } => {
                if req.uri().path() == crate::discovery::METADATA_PATH {
                    let base = dpop.base_url(req.headers(), req.uri());
                    return crate::discovery::metadata(&self.cfg, &req, base.as_deref());
                }
                Some((
                    req.headers().get(http::header::HOST).cloned(),
                    req.uri().authority().cloned(),
                ))
            }
            Side::Outbound(_) => None,
        };
        // Outbound, the caller is this sidecar's SVID in force (it may have rotated since the
        // connection opened).
        let own;
        let peer = match &self.side {
            Side::Outbound(e) => match e.own(&self.creds, self.clock.now()) {
                Ok(p) => {
                    own = p;
                    Some(&*own)
                }
                Err(e) => {
                    tracing::error!(error = %e, "this sidecar's own SVID does not verify");
                    let deny =
                        Deny::unavailable("this sidecar has no valid SVID", Outcome::BadCert);
                    self.metrics.request(deny.outcome);
                    return openai_error(&deny, "-");
                }
            },
            Side::Inbound { .. } => peer,
        };
        let trace = self.tracer.as_ref().and_then(|t| {
            t.begin(
                req.headers(),
                req.method(),
                req.uri().path(),
                peer.map_or("", |p| p.spiffe_id.as_str()),
            )
        });
        let mut obs = Observer::new(&self.metrics, trace);
        let mut resp = self.handle_request(req, peer, identity, &mut obs).await;
        if let (Some(tracer), Some(t)) = (&self.tracer, obs.into_trace()) {
            tracer.finish(t, resp.status());
        }
        if let Some(c) = resp.extensions_mut().remove::<crate::deny::Challenge>() {
            let base = match (&self.side, origin) {
                (Side::Inbound { dpop, .. }, Some((host, authority))) => {
                    dpop.base_url_for(host.as_ref(), authority.as_ref().map(|a| a.as_str()))
                }
                _ => None,
            };
            crate::discovery::challenge(&self.cfg, base.as_deref(), &c, resp.headers_mut());
        }
        resp
    }

    async fn handle_request(
        &self,
        req: Request<Incoming>,
        peer: Option<&VerifiedX509Svid>,
        identity: Option<&IdentityHeaders>,
        obs: &mut Observer<'_>,
    ) -> Response<Body> {
        let request_id = request_id();
        obs.request_id(&request_id);
        let (parts, body) = req.into_parts();
        let outbound = matches!(self.side, Side::Outbound(_));
        if self.cfg.enforce == Enforce::MtlsOnly && !outbound {
            obs.mtls_only();
            let Some(peer) = peer else {
                let deny = Deny::no_token("a client certificate is required");
                obs.outcome(deny.outcome);
                return openai_error(&deny, &request_id);
            };
            if self.creds.load().revoked.is_revoked(peer) {
                let deny = Deny::revoked();
                obs.outcome(deny.outcome);
                return openai_error(&deny, &request_id);
            }
            use http_body_util::BodyExt;
            let answer = Answer {
                filter: ResponseFilter::None,
                mcp: false,
                durable: None,
            };
            return self
                .pass(
                    parts,
                    body.boxed(),
                    peer,
                    identity,
                    &request_id,
                    answer,
                    None,
                    obs,
                )
                .await;
        }
        let mut seen = Seen::default();
        let mut chosen_route: Option<String> = None;
        let mut unread = Some(body);
        // A DPoP client without a certificate: the workload its token names.
        let mut dpop_caller: Option<VerifiedX509Svid> = None;
        let decided: Result<Authorized, Deny> = async {
            // Revoked after the handshake: the connection is being closed; refuse the rest.
            let creds = self.creds.load();
            if peer.is_some_and(|p| creds.revoked.is_revoked(p)) {
                return Err(Deny::revoked());
            }
            let head = admit(&parts)?;
            let now = self.clock.now();
            // Inbound, the caller's token; outbound, the route's (once the route is known).
            let inbound = match &self.side {
                Side::Inbound {
                    audience,
                    tokens,
                    dpop,
                    ..
                } => {
                    let aud = Audience {
                        issuer: &self.cfg.issuer,
                        audience,
                        leeway: self.cfg.token_leeway_secs,
                        now,
                    };
                    let (claims, presenter) =
                        authenticate(&parts, peer, &creds, tokens, &aud, dpop, obs)?;
                    seen.jti = Some(claims.jti.clone());
                    seen.delegation = crate::decide::delegation(&claims);
                    if let Presenter::Dpop(caller) = presenter {
                        if creds.revoked.is_revoked(&caller) {
                            return Err(Deny::revoked());
                        }
                        dpop_caller = Some(caller);
                    }
                    Some(claims)
                }
                Side::Outbound(_) => None,
            };
            let Some(peer) = dpop_caller.as_ref().or(peer) else {
                return Err(Deny::no_token(
                    "no client certificate and no DPoP-bound token",
                ));
            };
            let who = peer.spiffe_id.as_str();
            let limits = self.limits.load_full();
            crate::limit::identity(&limits, who)?;
            if let Some(id) = &head.session {
                self.sessions.check(id, who).map_err(|e| match e {
                    SessionError::Unknown => Deny::unknown_session(),
                    SessionError::NotYours => {
                        Deny::forbidden("MCP session belongs to another identity", Vec::new())
                    }
                })?;
            }
            let body = unread
                .take()
                .ok_or_else(|| Deny::bad_request("body already taken"))?;
            let body = crate::body::read(
                &parts,
                body,
                self.cfg.max_body_bytes,
                Duration::from_secs(self.cfg.body_read_timeout_secs),
            )
            .await?;
            seen.body = body.clone();
            let target = Target {
                method: parts.method.as_str(),
                path: &head.path,
                json_declared: head.json_declared,
            };
            seen.calls = extract(&self.routes, &target, &body)?;
            let mcp = self.routes.is_mcp(&head.path);
            // Each message of a JSON-RPC batch is a call; any other request is one.
            let cost = if mcp { seen.calls.len() } else { 1 };
            crate::limit::batch(&limits, who, cost)?;
            let answer = if mcp {
                Seeing::Mcp
            } else if Routes::is_model_list(target.method, &head.path) {
                Seeing::Models
            } else {
                Seeing::Other
            };
            let (claims, route) = match (&self.side, inbound) {
                (Side::Outbound(egress), _) => {
                    let host = parts
                        .headers
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
                    let route = egress
                        .select(host, &seen.calls)
                        .map_err(|e| Deny::not_found(e.to_string()))?;
                    chosen_route = Some(route.cfg.name.clone());
                    // Egress policy decides the route first, then every call on it.
                    seen.calls.insert(
                        0,
                        Call {
                            action: "egress",
                            resource_type: "Route",
                            resource_id: route.cfg.name.clone(),
                            arguments: None,
                        },
                    );
                    let t = egress
                        .token(&route, peer)
                        .await
                        .map_err(|e| Deny::upstream(e.to_string()))?;
                    seen.jti = Some(t.claims.jti.clone());
                    (t.claims, Some((route, t.token)))
                }
                (Side::Inbound { .. }, Some(claims)) => (claims, None),
                (Side::Inbound { .. }, None) => return Err(Deny::token("no token was checked")),
            };
            let engine = self.policies.load_full();
            let risk = self.risks.load().context_for(&claims);
            let permit = decide(
                engine,
                now,
                peer,
                &claims,
                risk.as_ref(),
                &seen.calls,
                answer,
                obs,
            )?;
            crate::limit::resources(&limits, who, &seen.calls)?;
            Ok(Authorized {
                body,
                policy_ids: permit.policy_ids,
                filter: permit.filter,
                mcp,
                route,
            })
        }
        .await;
        if let Some(rest) = unread {
            // Refused before the body was read: take what the client is still sending
            // (bounded) so the refusal is not lost to a connection reset.
            drain(rest).await;
        }
        let caller = dpop_caller.as_ref().or(peer);
        let (decision, reason, policy_ids) = match &decided {
            Ok(a) => ("allow", "permitted by policy", &a.policy_ids[..]),
            Err(d) => ("deny", d.message.as_str(), &d.policy_ids[..]),
        };
        let record = DecisionRecord {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            request_id: &request_id,
            spiffe_id: caller.map_or("", |p| p.spiffe_id.as_str()),
            cert_thumbprint: caller.map_or("", |p| p.x5t_s256.as_str()),
            jti: seen.jti,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            calls: seen.calls,
            policy_ids,
            decision,
            reason,
            direction: outbound.then_some("outbound"),
            route: chosen_route,
            user: seen.delegation.as_ref().map(|d| d.user.clone()),
            chain: seen.delegation.map(|d| d.chain),
        };
        obs.decided(&record);
        if let (Some(t), Some(c)) = (&self.telemetry, caller) {
            let bytes_in = match &decided {
                Ok(a) => a.body.len() as u64,
                Err(_) => 0,
            };
            t.request(
                c.spiffe_id.as_str(),
                record
                    .calls
                    .iter()
                    .filter(|c| c.action != "egress")
                    .map(|c| (c.action, c.resource_id.as_str())),
                decision == "deny",
                bytes_in,
            );
        }
        // INVARIANT: a permitted call without side effects (audit_flush_overlap) has its
        // record written before it is forwarded and durable before its answer is released;
        // any other decision is durable before anything is forwarded or answered. A
        // decision that cannot be recorded is a refusal.
        let overlap = decided.is_ok()
            && flush_overlaps(
                record.calls.iter().map(|c| c.action),
                &self.cfg.audit_flush_overlap,
            );
        let audited = if overlap {
            self.audit.write(&record).map(Some)
        } else {
            self.audit.record(&record).await.map(|()| None)
        };
        let durable = match audited {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, request_id, "audit failed; refusing");
                if decided.is_ok() {
                    let deny = audit_unavailable(obs);
                    return refusal(self.mcp_shape(&parts), &deny, &seen.body, &request_id);
                }
                None
            }
        };
        match (decided, caller) {
            (Ok(a), Some(caller)) => {
                let answer = Answer {
                    filter: a.filter,
                    mcp: a.mcp,
                    durable,
                };
                // A DPoP caller is not the connection's: its headers are its own.
                let identity = identity.filter(|_| dpop_caller.is_none());
                self.pass(
                    parts,
                    full(a.body),
                    caller,
                    identity,
                    &request_id,
                    answer,
                    a.route,
                    obs,
                )
                .await
            }
            (Ok(_), None) => {
                // INVARIANT: a permitted request had its caller authenticated.
                let deny = Deny::no_token("no caller was authenticated");
                obs.outcome(deny.outcome);
                refusal(self.mcp_shape(&parts), &deny, &seen.body, &request_id)
            }
            (Err(deny), _) => {
                obs.outcome(deny.outcome);
                tracing::info!(spiffe_id = caller.map_or("", |c| c.spiffe_id.as_str()), request_id, reason = %deny.message, "request refused");
                refusal(self.mcp_shape(&parts), &deny, &seen.body, &request_id)
            }
        }
    }

    /// The shape a refusal of this request takes: JSON-RPC on the MCP endpoint (worked out
    /// only for a refusal).
    fn mcp_shape(&self, parts: &http::request::Parts) -> bool {
        parts.method == http::Method::POST
            && RequestPath::parse(parts.uri.path()).is_ok_and(|p| self.routes.is_mcp(&p))
    }

    /// Forwards a permitted request (to the upstream, or outbound on its route with the
    /// route's token) and returns what the caller may see of the answer; binds the MCP
    /// session the upstream opens to the caller.
    #[allow(clippy::too_many_arguments)]
    async fn pass(
        &self,
        parts: http::request::Parts,
        body: Body,
        peer: &VerifiedX509Svid,
        identity: Option<&IdentityHeaders>,
        request_id: &str,
        answer: Answer,
        route: Option<(Arc<Route>, Arc<str>)>,
        obs: &mut Observer<'_>,
    ) -> Response<Body> {
        let Answer {
            filter,
            mcp,
            mut durable,
        } = answer;
        let ends_session = (mcp && parts.method == http::Method::DELETE)
            .then(|| parts.headers.get(SESSION_HEADER).cloned())
            .flatten();
        let filtered = !matches!(filter, ResponseFilter::None);
        let (routed, built);
        let (upstream, vouch) = match (&self.side, &route) {
            (Side::Inbound { upstream, .. }, _) => {
                let identity = match identity {
                    Some(h) => h,
                    None => {
                        built = self.identity_headers(peer);
                        &built
                    }
                };
                (&**upstream, Vouch::Identity(identity))
            }
            (Side::Outbound(_), Some((r, token))) => match r.client(&self.creds) {
                Ok(u) => {
                    routed = u;
                    (&routed, Vouch::Bearer(token))
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), route = %r.cfg.name, "route unusable");
                    let deny = Deny::upstream("the route's TLS client could not be built");
                    obs.outcome(deny.outcome);
                    return openai_error(&deny, request_id);
                }
            },
            (Side::Outbound(_), None) => {
                let deny = Deny::upstream("no route chosen");
                obs.outcome(deny.outcome);
                return openai_error(&deny, request_id);
            }
        };
        let forwarded = forward(upstream, parts, body, &vouch, request_id, filtered, obs);
        // A record written before the forward wakes the writer (if it is the one to), or is
        // synced by this request when it is the only one, once the forward is on its way:
        // its connection runs before the kick's yield returns, so neither the wake-up nor
        // the sync delays the request.
        let forwarded = match durable.as_mut() {
            Some(d) => tokio::join!(forwarded, d.kick()).0,
            None => forwarded.await,
        };
        let resp = match forwarded {
            Ok(r) => r,
            Err(deny) => {
                obs.outcome(deny.outcome);
                return openai_error(&deny, request_id);
            }
        };
        // The answer is released only once the decision's record is on disk.
        if let Some(d) = durable
            && let Err(e) = d.wait().await
        {
            tracing::error!(error = %e, request_id, "audit failed; answer withheld");
            return openai_error(&audit_unavailable(obs), request_id);
        }
        if mcp && resp.status().is_success() {
            if let Some(id) = resp
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                self.sessions.bind(id, peer.spiffe_id.as_str());
            }
            if let Some(id) = ends_session.as_ref().and_then(|v| v.to_str().ok()) {
                self.sessions.end(id);
            }
        }
        let (mut parts, body) = resp.into_parts();
        match filter_response(&mut parts, body, filter).await {
            Ok(body) => {
                obs.outcome(match self.cfg.enforce {
                    Enforce::Full => Outcome::Allowed,
                    Enforce::MtlsOnly => Outcome::AllowedMtlsOnly,
                });
                let body = match &self.telemetry {
                    Some(t) => t.count_response(peer.spiffe_id.as_str(), body),
                    None => body,
                };
                Response::from_parts(parts, body)
            }
            Err(e) => {
                obs.outcome(Outcome::Upstream);
                tracing::warn!(error = %e, request_id, "upstream response refused");
                openai_error(
                    &Deny::upstream("upstream response could not be filtered"),
                    request_id,
                )
            }
        }
    }
}

/// A new request id: a random (v4) UUID from the thread's CSPRNG (`rand`'s, seeded from the
/// OS and reseeded by it), not one `getrandom` system call per request as `Uuid::new_v4`.
fn request_id() -> String {
    let bytes: [u8; 16] = rand::random();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Whether a permitted request's record may be made durable while the upstream works (its
/// answer held until it is): every call it carries is one without side effects (listed in
/// `overlap`). The outbound side's `egress` decision is not a call of its own: it takes the
/// rule of the calls it carries, so a model call through two sidecars is flushed behind the
/// upstream on both, and a tool call is durable first on both. A request that carries no
/// call is durable first.
fn flush_overlaps<'a>(actions: impl IntoIterator<Item = &'a str>, overlap: &[String]) -> bool {
    let mut carried = false;
    for action in actions.into_iter().filter(|a| *a != "egress") {
        if !overlap.iter().any(|o| o == action) {
            return false;
        }
        carried = true;
    }
    carried
}

#[cfg(test)]
mod tests {
    use super::{flush_overlaps, request_id};

    #[test]
    fn request_ids_are_v4_uuids_and_differ() {
        let (a, b) = (request_id(), request_id());
        for id in [&a, &b] {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
        assert_ne!(a, b);
    }

    #[test]
    fn egress_takes_the_flush_rule_of_the_calls_it_carries() {
        let overlap = ["invoke".to_string(), "list_models".to_string()];
        let cases: &[(&[&str], bool)] = &[
            (&["invoke"], true),
            (&["list_models"], true),
            (&["egress", "invoke"], true),
            (&["egress", "list_models"], true),
            (&["call_tool"], false),
            (&["egress", "call_tool"], false),
            (&["egress", "invoke", "call_tool"], false),
            (&["egress", "http"], false),
            (&["egress"], false),
            (&[], false),
        ];
        for (actions, want) in cases {
            assert_eq!(
                flush_overlaps(actions.iter().copied(), &overlap),
                *want,
                "{actions:?}"
            );
        }
        // Listing `egress` itself changes nothing: it is never a call of its own.
        let with_egress = ["egress".to_string()];
        assert!(!flush_overlaps(["egress"], &with_egress));
        assert!(!flush_overlaps(["egress", "call_tool"], &with_egress));
    }
}
