//! The outbound side (`[outbound]`): a plain-HTTP listener for the local workload the
//! sidecar serves, and the routes it may reach. For each route the sidecar holds pooled mTLS
//! connections to the callee's sidecar (its SVID as client certificate, the callee's exact
//! SPIFFE ID required of the server certificate, TLS sessions resumed), and an access token
//! for the route's audience and scope from the trust authority (OAuth2 client credentials
//! over mTLS, certificate-bound, validated here like the callee will, refreshed in the
//! background after half its life and at once when the SVID rotates). The app's own
//! `Authorization` is never forwarded.
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use rustls::sign::CertifiedKey;
use serde::Deserialize;
use sigil_core::SpiffeId;
use sigil_metrics::prometheus_client::metrics::counter::Counter;
use sigil_metrics::prometheus_client::metrics::family::Family;
use sigil_pki::{AccessTokenClaims, VerifiedX509Svid};
use sigil_tls::SvidServerVerifier;

use crate::Credentials;
use crate::extract::Call;
use crate::respond::Body;

/// The `[outbound]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// A loopback address for the workload's plain-HTTP calls (e.g. `127.0.0.1:7070`).
    #[serde(default)]
    pub listen_addr: Option<SocketAddr>,
    /// A unix socket for the same.
    #[serde(default)]
    pub listen_socket: Option<PathBuf>,
    /// The uids the listener serves (default: the sidecar's own uid). Connections of any
    /// other uid are refused with 403.
    #[serde(default)]
    pub allow_uids: Option<Vec<u32>>,
    /// Where calls may go.
    pub routes: Vec<RouteConfig>,
}

/// One callee.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name (`Route::"<name>"` in egress policy).
    pub name: String,
    /// The callee sidecar's `host:port`.
    pub address: String,
    /// The SPIFFE ID the callee's sidecar must present.
    pub spiffe_id: String,
    /// The audience the route's access tokens are for (the callee's `audience`).
    pub audience: String,
    /// The scopes to ask for (space-separated; default: all the entry may have).
    #[serde(default)]
    pub scope: Option<String>,
    /// Models this route serves: a call naming one of them goes here.
    #[serde(default)]
    pub models: Vec<String>,
    /// `Host` names (without port) that select this route.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The route for requests no other route claims.
    #[serde(default)]
    pub default: bool,
}

/// Why an `[outbound]` section is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("outbound: {0}")]
pub struct OutboundConfigError(pub String);

impl OutboundConfig {
    /// Checks the section.
    pub fn check(&self) -> Result<(), OutboundConfigError> {
        let bad = |m: String| Err(OutboundConfigError(m));
        if self.listen_addr.is_none() && self.listen_socket.is_none() {
            return bad("listen_addr or listen_socket is required".into());
        }
        if let Some(a) = self.listen_addr
            && !a.ip().is_loopback()
        {
            return bad(format!(
                "listen_addr {a} is not a loopback address (the listener is plain HTTP)"
            ));
        }
        if self.routes.is_empty() {
            return bad("at least one [[outbound.routes]] is required".into());
        }
        if self.routes.iter().filter(|r| r.default).count() > 1 {
            return bad("more than one route is the default".into());
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.name.is_empty() || r.name.len() > 128 {
                return bad(format!("route {i}: name must be 1 to 128 bytes"));
            }
            if self.routes.iter().skip(i + 1).any(|o| o.name == r.name) {
                return bad(format!("route {:?} is defined twice", r.name));
            }
            if route_base(&r.address).is_none() {
                return bad(format!(
                    "route {:?}: address must be host:port, got {:?}",
                    r.name, r.address
                ));
            }
            if SpiffeId::new(&r.spiffe_id).is_err() {
                return bad(format!(
                    "route {:?}: spiffe_id {:?} is not a SPIFFE ID",
                    r.name, r.spiffe_id
                ));
            }
            if r.audience.is_empty() || r.audience.contains(char::is_whitespace) {
                return bad(format!(
                    "route {:?}: audience is empty or has spaces",
                    r.name
                ));
            }
            for m in &r.models {
                if let Some(o) = self
                    .routes
                    .iter()
                    .skip(i + 1)
                    .find(|o| o.models.contains(m))
                {
                    return bad(format!(
                        "model {m:?} is served by two routes, {:?} and {:?}",
                        r.name, o.name
                    ));
                }
            }
            for h in &r.hosts {
                if self
                    .routes
                    .iter()
                    .skip(i + 1)
                    .any(|o| o.hosts.iter().any(|x| x.eq_ignore_ascii_case(h)))
                {
                    return bad(format!("host {h:?} selects two routes"));
                }
            }
        }
        Ok(())
    }
}

/// `https://host:port` of a route address.
fn route_base(address: &str) -> Option<Uri> {
    let uri: Uri = format!("https://{address}").parse().ok()?;
    let auth = uri.authority()?;
    (auth.port_u16().is_some()
        && auth.as_str() == address
        && !address.contains('@')
        && uri.path() == "/")
        .then_some(uri)
}

/// Why a request has no route, or its route cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EgressError {
    #[error("no outbound route for this request (name a routed model, or use a routed host)")]
    NoRoute,
    #[error("the request names models on different routes ({0} and {1})")]
    TwoRoutes(String, String),
    #[error("no access token for route {route:?}: {why}")]
    Token { route: String, why: String },
}

/// A callee: its settings, its connection pool and its token.
pub(crate) struct Route {
    pub cfg: RouteConfig,
    expected: SpiffeId,
    base: Uri,
    /// `Host` for the callee's sidecar.
    host: Option<http::HeaderValue>,
    pool: ArcSwap<Pool>,
    token: tokio::sync::Mutex<Option<Held>>,
    refreshing: std::sync::atomic::AtomicBool,
    connects: Counter,
}

/// The pooled connections made with one SVID.
struct Pool {
    serving: Arc<CertifiedKey>,
    client: Client<hyper_rustls::HttpsConnector<Counting>, Body>,
}

/// A token held for a route, bound to the certificate it was issued for.
#[derive(Clone)]
struct Held {
    token: Arc<str>,
    claims: Arc<AccessTokenClaims>,
    bound_to: String,
}

/// A route's token and claims, for one request.
pub(crate) struct RouteToken {
    pub token: Arc<str>,
    pub claims: Arc<AccessTokenClaims>,
}

/// Counts the connections a route opens (each one is a TLS handshake).
#[derive(Clone)]
pub(crate) struct Counting {
    inner: HttpConnector,
    n: Counter,
}

impl tower::Service<Uri> for Counting {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        self.n.inc();
        let fut = self.inner.call(uri);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// The outbound side's routes, token source and counters.
pub(crate) struct Egress {
    pub routes: Vec<Arc<Route>>,
    /// The uids the outbound listener serves.
    pub allow_uids: Vec<u32>,
    /// This sidecar's own SVID as verified, for the certificate it was verified from.
    own: std::sync::Mutex<Option<(Arc<CertifiedKey>, Arc<VerifiedX509Svid>)>>,
    creds: Arc<ArcSwap<Credentials>>,
    issuer: String,
    leeway: i64,
    clock: Arc<dyn sigil_core::Clock>,
    pub(crate) connects: Family<Vec<(String, String)>, Counter>,
}

impl Egress {
    pub fn new(
        cfg: &OutboundConfig,
        issuer: &str,
        leeway: i64,
        creds: Arc<ArcSwap<Credentials>>,
        clock: Arc<dyn sigil_core::Clock>,
    ) -> anyhow::Result<Self> {
        let allow_uids = match &cfg.allow_uids {
            Some(u) => u.clone(),
            None => vec![crate::peer::own_uid()?],
        };
        let connects = Family::<Vec<(String, String)>, Counter>::default();
        let mut routes = Vec::new();
        for r in &cfg.routes {
            let expected = SpiffeId::new(&r.spiffe_id)?;
            let base = route_base(&r.address)
                .ok_or_else(|| anyhow::anyhow!("route {:?}: bad address", r.name))?;
            let n = connects
                .get_or_create(&vec![("route".to_owned(), r.name.clone())])
                .clone();
            let pool = pool(&creds, &expected, n.clone())?;
            routes.push(Arc::new(Route {
                cfg: r.clone(),
                expected,
                host: crate::upstream::host_header(&base),
                base,
                pool: ArcSwap::from_pointee(pool),
                token: tokio::sync::Mutex::new(None),
                refreshing: std::sync::atomic::AtomicBool::new(false),
                connects: n,
            }));
        }
        Ok(Self {
            routes,
            allow_uids,
            own: std::sync::Mutex::new(None),
            creds,
            issuer: issuer.trim_end_matches('/').to_owned(),
            leeway,
            clock,
            connects,
        })
    }

    /// This sidecar's SVID in force, verified (once per certificate): the principal of its
    /// workload's calls.
    pub fn own(
        &self,
        creds: &ArcSwap<Credentials>,
        now: i64,
    ) -> Result<Arc<VerifiedX509Svid>, sigil_pki::SvidError> {
        let c = creds.load();
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, svid)) = own.as_ref()
            && Arc::ptr_eq(key, &c.serving)
            && svid.not_after > now
        {
            return Ok(svid.clone());
        }
        let svid = Arc::new(own_svid(&c, now)?);
        *own = Some((c.serving.clone(), svid.clone()));
        Ok(svid)
    }

    /// The route of a request: by its `Host`, else by the models it names, else the
    /// default route.
    pub fn select(&self, host: Option<&str>, calls: &[Call]) -> Result<Arc<Route>, EgressError> {
        if let Some(h) = host {
            // Without its port (`[::1]:80` → `[::1]`; a bare IPv6 address has no port).
            let name = match h.rsplit_once(':') {
                Some((n, p))
                    if !p.is_empty()
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && (n.ends_with(']') || !n.contains(':')) =>
                {
                    n
                }
                _ => h,
            };
            if let Some(r) = self
                .routes
                .iter()
                .find(|r| r.cfg.hosts.iter().any(|x| x.eq_ignore_ascii_case(name)))
            {
                return Ok(r.clone());
            }
        }
        let mut chosen: Option<&Arc<Route>> = None;
        for c in calls.iter().filter(|c| c.resource_type == "Model") {
            let Some(r) = self
                .routes
                .iter()
                .find(|r| r.cfg.models.contains(&c.resource_id))
            else {
                continue;
            };
            match chosen {
                Some(prev) if !Arc::ptr_eq(prev, r) => {
                    return Err(EgressError::TwoRoutes(
                        prev.cfg.name.clone(),
                        r.cfg.name.clone(),
                    ));
                }
                _ => chosen = Some(r),
            }
        }
        chosen
            .or_else(|| self.routes.iter().find(|r| r.cfg.default))
            .cloned()
            .ok_or(EgressError::NoRoute)
    }

    /// The token for `route`, bound to `own`'s certificate: the held one while it is in
    /// the first half of its life (a background refresh starts after that), else a new one.
    pub async fn token(
        self: &Arc<Self>,
        route: &Arc<Route>,
        own: &VerifiedX509Svid,
    ) -> Result<RouteToken, EgressError> {
        let now = self.clock.now();
        let mut held = route.token.lock().await;
        if let Some(h) = held.as_ref().filter(|h| h.bound_to == own.x5t_s256) {
            let (iat, exp) = (h.claims.iat, h.claims.exp);
            let life = (exp - iat).max(1);
            // Fresh, or still valid for a tenth of its life while a refresh runs.
            if now < iat + life / 2 || now < exp - life / 10 {
                if now >= iat + life / 2
                    && !route
                        .refreshing
                        .swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let (this, route) = (self.clone(), route.clone());
                    tokio::spawn(async move {
                        let fresh = this.fetch(&route).await;
                        match fresh {
                            Ok(h) => *route.token.lock().await = Some(h),
                            Err(e) => {
                                tracing::warn!(route = %route.cfg.name, error = %e, "token refresh failed; keeping the current token")
                            }
                        }
                        route
                            .refreshing
                            .store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                return Ok(RouteToken {
                    token: h.token.clone(),
                    claims: h.claims.clone(),
                });
            }
        }
        let h = self.fetch(route).await?;
        *held = Some(h.clone());
        Ok(RouteToken {
            token: h.token,
            claims: h.claims,
        })
    }

    /// Client credentials over mTLS at the issuer's token endpoint; the answer is validated
    /// as the callee will validate it (signature, issuer, audience, binding, subject).
    async fn fetch(&self, route: &Route) -> Result<Held, EgressError> {
        let err = |why: String| EgressError::Token {
            route: route.cfg.name.clone(),
            why,
        };
        let creds = self.creds.load_full();
        let own = own_svid(&creds, self.clock.now()).map_err(|e| err(e.to_string()))?;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("audience", route.cfg.audience.as_str()),
        ];
        if let Some(s) = &route.cfg.scope {
            form.push(("scope", s.as_str()));
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            post_form(&self.issuer, &creds, body),
        )
        .await
        .map_err(|_| err("the token endpoint did not answer within 10 s".into()))?
        .map_err(|e| err(format!("{e:#}")))?;
        #[derive(Deserialize)]
        struct TokenAnswer {
            access_token: String,
        }
        let t: TokenAnswer = serde_json::from_slice(&answer)
            .map_err(|e| err(format!("token endpoint answer: {e}")))?;
        let claims = sigil_pki::validate_access_token_keyed(
            &t.access_token,
            &creds.jwt_keys,
            &self.issuer,
            &route.cfg.audience,
            self.clock.now(),
            self.leeway,
        )
        .map(|(c, _)| c)
        .map_err(|e| err(format!("the issued token does not validate: {e}")))?;
        if claims.cnf.x5t_s256 != own.x5t_s256 || claims.sub != own.spiffe_id.as_str() {
            return Err(err("the issued token is not bound to this SVID".into()));
        }
        tracing::debug!(route = %route.cfg.name, exp = claims.exp, "access token obtained");
        Ok(Held {
            token: t.access_token.into(),
            claims: Arc::new(claims),
            bound_to: own.x5t_s256,
        })
    }
}

impl Route {
    /// The pool for the SVID in force; a rotated SVID gets a new pool (and a new TLS session
    /// cache: a resumed session would carry the old certificate). Connections of the old
    /// pool finish what they carry and close.
    pub fn client(
        &self,
        creds: &Arc<ArcSwap<Credentials>>,
    ) -> anyhow::Result<crate::upstream::Upstream> {
        let serving = creds.load().serving.clone();
        let cur = self.pool.load_full();
        let p = if Arc::ptr_eq(&cur.serving, &serving) {
            cur
        } else {
            let p = Arc::new(pool(creds, &self.expected, self.connects.clone())?);
            self.pool.store(p.clone());
            tracing::info!(route = %self.cfg.name, "SVID rotated: new connection pool");
            p
        };
        Ok(crate::upstream::Upstream::Route {
            client: p.client.clone(),
            base: self.base.clone(),
            host: self.host.clone(),
        })
    }
}

fn pool(
    creds: &Arc<ArcSwap<Credentials>>,
    expected: &SpiffeId,
    n: Counter,
) -> anyhow::Result<Pool> {
    let provider = sigil_tls::provider();
    let serving = creds.load().serving.clone();
    let verifier = SvidServerVerifier::new(creds.clone(), expected.clone(), provider.clone());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(sigil_tls::PresentSvid(serving.clone())));
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(Counting { inner: http, n });
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(https);
    Ok(Pool { serving, client })
}

/// This sidecar's own SVID, verified against the bundle in force.
pub(crate) fn own_svid(
    creds: &Credentials,
    now: i64,
) -> Result<VerifiedX509Svid, sigil_pki::SvidError> {
    let chain: Vec<&[u8]> = creds.serving.cert.iter().map(|d| d.as_ref()).collect();
    sigil_pki::verify_x509_svid(&chain, &creds.x509, now)
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// POSTs a form to `<issuer>/oauth2/token` over mTLS with this sidecar's SVID.
async fn post_form(issuer: &str, creds: &Credentials, body: String) -> anyhow::Result<Bytes> {
    use anyhow::Context as _;
    let (host, port) = crate::shipper::parse_target(issuer)
        .context("the issuer is not an https://host:port URL")?;
    let mut send = crate::shipper::connect_authority(creds, &host, port).await?;
    let req = http::Request::post("/oauth2/token")
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let bytes = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "the token endpoint answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, extra: &str) -> String {
        format!(
            "[[routes]]\nname = \"{name}\"\naddress = \"127.0.0.1:9000\"\n\
             spiffe_id = \"spiffe://td/{name}\"\naudience = \"{name}\"\n{extra}\n"
        )
    }

    fn cfg(body: &str) -> Result<(), OutboundConfigError> {
        let c: OutboundConfig =
            toml::from_str(&format!("listen_addr = \"127.0.0.1:0\"\n{body}")).unwrap();
        c.check()
    }

    #[test]
    fn sections_are_checked() {
        assert!(cfg(&route("a", "models = [\"m\"]")).is_ok());
        assert!(cfg("routes = []").is_err());
        let c: OutboundConfig = toml::from_str(&route("a", "")).unwrap();
        assert!(c.check().is_err(), "no listener");
        let c: OutboundConfig = toml::from_str(&format!(
            "listen_addr = \"0.0.0.0:7000\"\n{}",
            route("a", "")
        ))
        .unwrap();
        assert!(c.check().is_err(), "not loopback");
        assert!(cfg(&(route("a", "") + &route("a", ""))).is_err(), "twice");
        assert!(cfg(&(route("a", "models = [\"m\"]") + &route("b", "models = [\"m\"]"))).is_err());
        assert!(cfg(&(route("a", "hosts = [\"x\"]") + &route("b", "hosts = [\"X\"]"))).is_err());
        assert!(cfg(&(route("a", "default = true") + &route("b", "default = true"))).is_err());
        for bad in [
            "address = \"127.0.0.1\"",
            "address = \"http://a:1\"",
            "address = \"a:1/x\"",
        ] {
            let text = format!(
                "listen_addr = \"127.0.0.1:0\"\n[[routes]]\nname = \"a\"\n{bad}\n\
                 spiffe_id = \"spiffe://td/a\"\naudience = \"a\"\n"
            );
            let c: OutboundConfig = toml::from_str(&text).unwrap();
            assert!(c.check().is_err(), "{bad}");
        }
        assert!(
            cfg(&route("a", "").replace("spiffe://td/a", "https://td/a")).is_err(),
            "spiffe_id"
        );
    }

    #[test]
    fn route_bases() {
        assert_eq!(
            route_base("127.0.0.1:8443").unwrap().to_string(),
            "https://127.0.0.1:8443/"
        );
        assert!(route_base("[::1]:8443").is_some());
        assert!(route_base("host").is_none());
        assert!(route_base("a:1/b").is_none());
        assert!(route_base("a:1?b").is_none());
        assert!(route_base("u@a:1").is_none());
    }

    #[test]
    fn form_values_are_encoded() {
        assert_eq!(
            urlencode("model:invoke mcp:call"),
            "model%3Ainvoke%20mcp%3Acall"
        );
        assert_eq!(urlencode("a&b=c"), "a%26b%3Dc");
    }
}
