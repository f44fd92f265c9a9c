//! The proxy's configuration, validated completely before anything binds.
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use sigil_core::TrustDomain;

/// `sigil proxy` configuration (TOML; each key overridable by `SIGIL_<KEY>` and by a flag).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The trust domain whose SVIDs are admitted.
    pub trust_domain: TrustDomain,
    /// Where clients connect (mTLS).
    #[serde(default = "default_listen")]
    pub listen_addr: SocketAddr,
    /// The upstream model or tool server: `http://host:port` or `unix:///path/to.sock`.
    /// Without it there is no inbound listener (an `[outbound]`-only sidecar on the
    /// caller's side).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Speak HTTP/2 with prior knowledge (h2c) to the upstream instead of HTTP/1.1.
    #[serde(default)]
    pub upstream_http2: bool,
    /// The audience access tokens must name (RFC 8707 resource of this service); required
    /// with `upstream`.
    #[serde(default)]
    pub audience: Option<String>,
    /// The token issuer (the trust authority's issuer URL).
    pub issuer: String,
    /// The local agent's Workload API socket (`unix:///path` or a path): the proxy's serving
    /// SVID and the trust bundles come from it and rotate without a restart. Exclusive with
    /// `cert`/`key`/`bundle`.
    #[serde(default)]
    pub workload_api_socket: Option<String>,
    /// Which of the SVIDs the Workload API returns the proxy serves with (default: the first,
    /// the API's default SVID).
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// The proxy's own certificate chain (PEM) when run standalone.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its PKCS#8 key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The trust bundle in SPIFFE bundle JSON (X.509 and JWT authorities), e.g. from
    /// `sigil bundle show`.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// `full` (default): token, policy, rate limit and audit on every request. `mtls-only`:
    /// only the client SVID is checked and the identity headers set (no token, policy or
    /// audit), for upstreams that do their own authorization and for benchmarks.
    #[serde(default)]
    pub enforce: Enforce,
    /// Accept DPoP-bound access tokens (RFC 9449) from clients without mTLS: the listener
    /// then asks for a client certificate without requiring one. Every request with a
    /// DPoP-bound token must carry a fresh proof for it (`htm`, `htu`, `iat`, `ath`, unused
    /// `jti`); a certificate-bound token still needs its certificate.
    #[serde(default)]
    pub dpop: bool,
    /// With `dpop`: require a server-issued nonce in every proof (RFC 9449 §9); a proof
    /// without the current one is answered 401 `use_dpop_nonce` with a `DPoP-Nonce` header.
    #[serde(default)]
    pub dpop_nonce: bool,
    /// How far a DPoP proof's `iat` may be from now, seconds.
    #[serde(default = "default_dpop_window")]
    pub dpop_proof_window_secs: i64,
    /// The URL clients reach this proxy at (`https://host[:port]`): the base of DPoP `htu`
    /// and the protected resource metadata (RFC 9728). Default: `https://` + the request's
    /// `Host`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, seconds.
    #[serde(default = "default_skew")]
    pub token_leeway_secs: i64,
    /// Directory of Cedar policies (`*.cedar`), validated against sigil's schema; reloaded
    /// on SIGHUP. Without it every call is denied.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Where policies come from: `dir` (default, `policy_dir`) or `agent`: the signed policy
    /// bundle the local agent streams (`WatchPolicy` on `workload_api_socket`), verified
    /// here, never rolled back (highest revision kept in `<audit_log>.policy-revision.slots`), and
    /// enforced until its `not_after`; then every request is refused (503) until a newer
    /// bundle arrives.
    #[serde(default)]
    pub policy_source: PolicySource,

    /// Path where the upstream serves MCP (JSON-RPC over streamable HTTP).
    #[serde(default = "default_mcp_path")]
    pub mcp_path: String,
    /// Paths that are model calls, added to the built-in inference routes of OpenAI,
    /// llama.cpp, Ollama, vLLM and Anthropic-style servers (matched case-insensitively,
    /// trailing slash ignored).
    #[serde(default)]
    pub model_routes: Vec<String>,
    /// The body fields that choose a model, each authorized as `invoke` (default: `model`,
    /// `fallbacks`, `context_window_fallbacks`, `models`); replaces the default list.
    #[serde(default)]
    pub model_fields: Option<Vec<String>>,
    /// The model a model route's body may leave unnamed (a one-model server such as
    /// llama.cpp's `/completion`); without it such a body is refused.
    #[serde(default)]
    pub default_model: Option<String>,
    /// Set Envoy's `X-Forwarded-Client-Cert` (`By=<proxy>;Hash=<cert SHA-256>;URI=<client>`)
    /// on forwarded requests, for upstreams built to sit behind Envoy or Istio.
    #[serde(default = "default_true")]
    pub xfcc: bool,
    /// Seconds a client has to complete an HTTP/1 request head once its first byte arrived
    /// (the first request's: once the connection opened). Waiting for the next request on
    /// a keep-alive connection is idle time (`idle_timeout_secs`), not head time.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request body the proxy reads.
    #[serde(default = "default_body_timeout")]
    pub body_read_timeout_secs: u64,
    /// Seconds a connection with no request in flight and no bytes moving stays open (over
    /// HTTP/2: with no request in flight, whatever frames such as PINGs move).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// The audit segment (0600): framed JSON records, see `sigil audit show`.
    #[serde(default = "default_audit_log")]
    pub audit_log: PathBuf,
    /// The actions whose audit record is written before the request is forwarded and made
    /// durable before the answer is released, so the disk flush overlaps the upstream's
    /// work: calls without side effects. Every other action's record is durable before
    /// the request is forwarded. Outbound, the `egress` decision takes the rule of the calls
    /// it carries. Default: `invoke`, `list_models`.
    #[serde(default = "default_flush_overlap")]
    pub audit_flush_overlap: Vec<String>,
    /// Largest request body, bytes (413 beyond).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Requests per second allowed per identity (0 = unlimited).
    #[serde(default)]
    pub rate_limit_per_sec: f64,
    /// Requests an identity may make at once after being idle.
    #[serde(default = "default_burst")]
    pub rate_limit_burst: f64,
    /// Limits per identity × model or tool (`[[resource_rate_limits]]` tables), on top of
    /// the per-identity limit.
    #[serde(default)]
    pub resource_rate_limits: Vec<ResourceRateLimit>,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Where to serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over plain
    /// HTTP; off when unset. Use a loopback address.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Publish per-identity behaviour summaries to this MQTT broker (`mqtt://host:port`),
    /// one signed message per window (docs/posture.md). Off when unset.
    #[serde(default)]
    pub telemetry_broker: Option<String>,
    /// The telemetry window, seconds.
    #[serde(default = "default_telemetry_window")]
    pub telemetry_window_secs: u32,
    /// Ship the audit segment's records to this sigil server (`https://host:port`), over
    /// mTLS with the proxy's own SVID; the acknowledged position is kept in
    /// `<audit_log>.acked`. Off when unset.
    #[serde(default)]
    pub audit_ship_to: Option<String>,
    /// SIEM export of the durable audit records as ECS-style JSON lines: `stdout` or a file
    /// path (appended, 0600). Best effort (a full export queue drops, counted and logged);
    /// off when unset.
    #[serde(default)]
    pub audit_export: Option<String>,
    /// OTLP/HTTP base URL (`http://host:4318`) to export the audit records to as
    /// OpenTelemetry log records (JSON encoding, POST `<url>/v1/logs`). Defaults to
    /// `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT` (full URL) or `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (+ `/v1/logs`); `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` and
    /// `OTEL_RESOURCE_ATTRIBUTES` apply. Off when none is set. http:// only for now.
    #[serde(default)]
    pub audit_otlp_endpoint: Option<String>,
    /// OTLP/HTTP base URL (`http://host:4318`) to export a trace of every proxied request
    /// to (JSON encoding, POST `<url>/v1/traces`). Defaults to
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (full URL) or `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (+ `/v1/traces`); `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`, `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)` apply, and
    /// `OTEL_SDK_DISABLED=true` / `OTEL_TRACES_EXPORTER=none` turn the variables off. Off
    /// when none is set. http:// only for now.
    #[serde(default)]
    pub trace_otlp_endpoint: Option<String>,
    /// With `audit_ship_to`: once the segment holds this many bytes and every record in it is
    /// acknowledged by the server, it is replaced by a new one (the old one is deleted).
    #[serde(default = "default_audit_rotate_bytes")]
    pub audit_rotate_bytes: u64,
    /// The outbound side: a plain-HTTP listener for the local workload, whose calls go out on
    /// `[[outbound.routes]]` over mTLS with this sidecar's SVID and a token from `issuer`,
    /// decided by egress policy (principal: this sidecar's SPIFFE ID) and audited.
    #[serde(default)]
    pub outbound: Option<crate::egress::OutboundConfig>,
}

fn default_dpop_window() -> i64 {
    60
}

fn default_audit_rotate_bytes() -> u64 {
    64 * 1024 * 1024
}

/// A configuration checked once, with what it resolves to.
pub struct Validated {
    pub cfg: ProxyConfig,
    pub(crate) routes: crate::extract::Routes,
    pub(crate) export: Option<crate::export::ExportConfig>,
    pub(crate) trace: Option<crate::trace::TraceConfig>,
    /// What the telemetry exports did, for `/metrics`.
    pub(crate) counters: crate::otlp::ExportCounters,
}

impl Validated {
    /// The same settings for the outbound side (exports and traces stay with the first).
    pub(crate) fn for_outbound(&self) -> Self {
        Self {
            cfg: self.cfg.clone(),
            routes: self.routes.clone(),
            export: None,
            trace: None,
            counters: self.counters.clone(),
        }
    }
}

/// A token bucket per caller for one model or tool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRateLimit {
    /// `Model` or `Tool`.
    pub resource_type: String,
    /// The model or tool name.
    pub resource_id: String,
    /// Calls per second each identity may make to it.
    pub per_sec: f64,
    /// Calls an identity may make at once after being idle.
    #[serde(default = "default_burst")]
    pub burst: f64,
}

/// Where the proxy's policies come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicySource {
    /// `*.cedar` files of `policy_dir`.
    #[default]
    Dir,
    /// Signed policy bundles from the local agent.
    Agent,
}

/// How much the proxy checks per request.

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforce {
    /// Token, policy, rate limit and audit.
    #[default]
    Full,
    /// The client SVID only.
    MtlsOnly,
}

fn default_flush_overlap() -> Vec<String> {
    vec!["invoke".into(), "list_models".into()]
}

/// Every action the proxy decides on.
pub const ACTIONS: &[&str] = &[
    "invoke",
    "list_models",
    "call_tool",
    "list_tools",
    "read_resource",
    "get_prompt",
    "complete",
    "mcp",
    "http",
    "egress",
];

fn default_true() -> bool {
    true
}
fn default_header_timeout() -> u64 {
    30
}
fn default_body_timeout() -> u64 {
    30
}
fn default_idle_timeout() -> u64 {
    120
}

fn default_mcp_path() -> String {
    "/mcp".into()
}
fn default_audit_log() -> PathBuf {
    PathBuf::from("/var/lib/sigil/proxy/audit.log")
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_burst() -> f64 {
    20.0
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9443))
}
fn default_skew() -> i64 {
    30
}
fn default_telemetry_window() -> u32 {
    10
}

fn default_log_format() -> String {
    "text".into()
}

/// A configuration value that is present but wrong; names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ProxyConfigError {
    pub key: &'static str,
    pub message: String,
}

impl ProxyConfig {
    /// Every key of the configuration file.
    pub const KEYS: &'static [&'static str] = &[
        "trust_domain",
        "listen_addr",
        "upstream",
        "upstream_http2",
        "audience",
        "issuer",
        "workload_api_socket",
        "spiffe_id",
        "cert",
        "key",
        "bundle",
        "enforce",
        "dpop",
        "dpop_nonce",
        "dpop_proof_window_secs",
        "public_url",
        "token_leeway_secs",
        "policy_dir",
        "policy_source",
        "mcp_path",
        "model_routes",
        "model_fields",
        "default_model",
        "xfcc",
        "header_read_timeout_secs",
        "body_read_timeout_secs",
        "idle_timeout_secs",
        "audit_log",
        "audit_flush_overlap",
        "max_body_bytes",
        "rate_limit_per_sec",
        "rate_limit_burst",
        "resource_rate_limits",
        "log_format",
        "metrics_addr",
        "telemetry_broker",
        "telemetry_window_secs",
        "audit_ship_to",
        "audit_rotate_bytes",
        "audit_export",
        "audit_otlp_endpoint",
        "trace_otlp_endpoint",
        "outbound",
    ];

    /// The rate limits of the configuration (a policy bundle's `rate_limits` replace them).
    pub fn limit_settings(&self) -> crate::ratelimit::LimitSettings {
        crate::ratelimit::LimitSettings {
            rate_limit_per_sec: self.rate_limit_per_sec,
            rate_limit_burst: self.rate_limit_burst,
            resource_rate_limits: self.resource_rate_limits.clone(),
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ProxyConfigError> {
        self.check().map(|_| ())
    }

    /// The configuration checked, with what it resolves to (the route table, the export and
    /// trace settings), for [`crate::start`] to use as it is.
    pub fn into_validated(self) -> Result<Validated, ProxyConfigError> {
        let (routes, export, trace) = self.check()?;
        Ok(Validated {
            cfg: self,
            routes,
            export,
            trace,
            counters: crate::otlp::ExportCounters::default(),
        })
    }

    #[allow(clippy::type_complexity)]
    fn check(
        &self,
    ) -> Result<
        (
            crate::extract::Routes,
            Option<crate::export::ExportConfig>,
            Option<crate::trace::TraceConfig>,
        ),
        ProxyConfigError,
    > {
        let bad = |key, message: &str| ProxyConfigError {
            key,
            message: message.to_owned(),
        };
        const UPSTREAM: &str = "must be an http://host:port URL or unix:///path";
        if let Some(b) = &self.telemetry_broker
            && sigil_telemetry::BrokerConfig::new(b, sigil_telemetry::DEFAULT_KEEP_ALIVE_SECS)
                .is_err()
        {
            return Err(bad("telemetry_broker", "must be mqtt://host:port"));
        }
        if self.telemetry_broker.is_some() && self.workload_api_socket.is_none() {
            return Err(bad(
                "telemetry_broker",
                "telemetry is signed with the SVID from the agent: set workload_api_socket",
            ));
        }
        if !(1..=3600).contains(&self.telemetry_window_secs) {
            return Err(bad("telemetry_window_secs", "must be 1-3600"));
        }
        match (&self.upstream, &self.audience, &self.outbound) {
            (None, _, None) => {
                return Err(bad(
                    "upstream",
                    "required (or an [outbound] section for a caller-side sidecar)",
                ));
            }
            (Some(_), None, _) => return Err(bad("audience", "required with upstream")),
            (Some(_), Some(a), _) if a.is_empty() => {
                return Err(bad("audience", "must not be empty"));
            }
            (None, Some(_), _) => return Err(bad("audience", "only applies with upstream")),
            _ => {}
        }
        if !(1..=600).contains(&self.dpop_proof_window_secs) {
            return Err(bad("dpop_proof_window_secs", "must be between 1 and 600"));
        }
        if self.dpop_nonce && !self.dpop {
            return Err(bad("dpop_nonce", "only applies with dpop = true"));
        }
        if let Some(u) = &self.public_url
            && (!u.starts_with("https://")
                || u.ends_with('/')
                || sigil_pki::normalize_htu(u).is_none()
                || u[8..].contains('/'))
        {
            return Err(bad(
                "public_url",
                "must be https://host[:port], without a path or a trailing slash",
            ));
        }
        if let Some(o) = &self.outbound {
            o.check().map_err(|e| bad("outbound", &e.0))?;
        }
        if let Some(upstream) = &self.upstream
            && upstream.starts_with("unix:")
        {
            if crate::upstream::unix_path(upstream).is_none() {
                return Err(bad("upstream", UPSTREAM));
            }
        } else if let Some(upstream) = &self.upstream {
            let uri: http::Uri = upstream.parse().map_err(|_| bad("upstream", UPSTREAM))?;
            if uri.scheme_str() != Some("http")
                || uri.authority().is_none()
                || uri.path_and_query().is_some_and(|p| p.as_str() != "/")
            {
                return Err(bad("upstream", UPSTREAM));
            }
        }
        match (
            &self.workload_api_socket,
            &self.cert,
            &self.key,
            &self.bundle,
        ) {
            (Some(s), None, None, None) => {
                if s.is_empty() {
                    return Err(bad("workload_api_socket", "must not be empty"));
                }
            }
            (None, Some(_), Some(_), Some(_)) => {
                if self.spiffe_id.is_some() {
                    return Err(bad(
                        "spiffe_id",
                        "only applies with workload_api_socket (the cert file names the identity)",
                    ));
                }
            }
            (Some(_), _, _, _) => {
                return Err(bad(
                    "workload_api_socket",
                    "give either workload_api_socket or cert + key + bundle, not both",
                ));
            }
            (None, c, k, _) => {
                let key = if c.is_none() {
                    "cert"
                } else if k.is_none() {
                    "key"
                } else {
                    "bundle"
                };
                return Err(bad(
                    key,
                    "required without workload_api_socket (cert + key + bundle, or the agent's socket)",
                ));
            }
        }
        if self.audit_rotate_bytes < 4096 {
            return Err(bad("audit_rotate_bytes", "must be at least 4096"));
        }
        if let Some(to) = &self.audit_ship_to
            && crate::shipper::parse_target(to).is_none()
        {
            return Err(bad("audit_ship_to", "must be an https://host:port URL"));
        }
        let export = self
            .export_config()
            .map_err(|e| bad(e.key(), &e.to_string()))?;
        let trace = self
            .trace_config()
            .map_err(|e| bad("trace_otlp_endpoint", &e.to_string()))?;
        let routes = crate::extract::Routes::new(
            &self.model_routes,
            self.model_fields.as_deref(),
            self.default_model.clone(),
            &self.mcp_path,
        )
        .map_err(|e| bad(e.key(), &e.to_string()))?;
        if let Some(a) = self
            .audit_flush_overlap
            .iter()
            .find(|a| !ACTIONS.contains(&a.as_str()))
        {
            return Err(bad(
                "audit_flush_overlap",
                &format!("unknown action {a:?} (one of {})", ACTIONS.join(", ")),
            ));
        }
        for (key, v) in [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("body_read_timeout_secs", self.body_read_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(bad(key, "must be between 1 and 3600 seconds"));
            }
        }
        if let Some(id) = &self.spiffe_id {
            match sigil_core::SpiffeId::new(id) {
                Ok(id) if id.is_member_of(&self.trust_domain) => {}
                Ok(_) => return Err(bad("spiffe_id", "must be in the proxy's trust domain")),
                Err(e) => return Err(bad("spiffe_id", &e.to_string())),
            }
        }
        if self.policy_source == PolicySource::Agent {
            if self.workload_api_socket.is_none() {
                return Err(bad(
                    "policy_source",
                    "\"agent\" needs workload_api_socket (the bundles come from the agent)",
                ));
            }
            if self.policy_dir.is_some() {
                return Err(bad(
                    "policy_dir",
                    "only applies with policy_source = \"dir\"",
                ));
            }
        }

        if !self.issuer.starts_with("https://") {
            return Err(bad("issuer", "must be an https:// URL"));
        }
        if !(0..=300).contains(&self.token_leeway_secs) {
            return Err(bad("token_leeway_secs", "must be between 0 and 300"));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(bad("max_body_bytes", "must be between 1 KiB and 64 MiB"));
        }
        self.limit_settings()
            .validate()
            .map_err(|(key, message)| bad(key, message))?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(bad("log_format", "must be \"text\" or \"json\""));
        }
        Ok((routes, export, trace))
    }
}

impl ProxyConfig {
    /// The SIEM export settings (`audit_export`, `audit_otlp_endpoint` and the standard
    /// `OTEL_*` environment variables); `None` when no export is configured.
    pub fn export_config(
        &self,
    ) -> Result<Option<crate::export::ExportConfig>, crate::export::ExportConfigError> {
        crate::export::ExportConfig::resolve(
            self.audit_export.as_deref(),
            self.audit_otlp_endpoint.as_deref(),
            &|k| std::env::var(k).ok(),
        )
    }

    /// The trace export settings (`trace_otlp_endpoint` and the standard `OTEL_*`
    /// environment variables); `None` when traces are off.
    pub fn trace_config(
        &self,
    ) -> Result<Option<crate::trace::TraceConfig>, crate::trace::TraceConfigError> {
        crate::trace::TraceConfig::resolve(self.trace_otlp_endpoint.as_deref(), &|k| {
            std::env::var(k).ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<ProxyConfig, String> {
        let text = format!(
            "trust_domain = \"td\"\nupstream = \"http://127.0.0.1:1\"\naudience = \"a\"\n\
             issuer = \"https://i\"\n{extra}"
        );
        let c: ProxyConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        c.validate().map(|()| c).map_err(|e| e.key.to_owned())
    }

    #[test]
    fn credentials_come_from_files_or_the_agent_not_both() {
        let files = "cert = \"c\"\nkey = \"k\"\nbundle = \"b\"\n";
        assert!(cfg(files).is_ok());
        assert!(cfg("workload_api_socket = \"unix:///run/a.sock\"\n").is_ok());
        assert_eq!(cfg("").unwrap_err(), "cert");
        assert_eq!(cfg("cert = \"c\"\n").unwrap_err(), "key");
        assert_eq!(cfg("cert = \"c\"\nkey = \"k\"\n").unwrap_err(), "bundle");
        assert_eq!(
            cfg(&format!("{files}workload_api_socket = \"/s\"\n")).unwrap_err(),
            "workload_api_socket"
        );
        assert_eq!(
            cfg(&format!("{files}spiffe_id = \"spiffe://td/p\"\n")).unwrap_err(),
            "spiffe_id"
        );
        let sock = "workload_api_socket = \"/s\"\n";
        assert!(cfg(&format!("{sock}spiffe_id = \"spiffe://td/p\"\n")).is_ok());
        assert_eq!(
            cfg(&format!("{sock}spiffe_id = \"spiffe://other/p\"\n")).unwrap_err(),
            "spiffe_id"
        );
        assert!(cfg(&format!("{sock}enforce = \"mtls-only\"\n")).is_ok());
        assert!(cfg(&format!("{sock}enforce = \"none\"\n")).is_err());
    }

    #[test]
    fn resource_rate_limits_are_checked() {
        let sock = "workload_api_socket = \"/s\"\n";
        let limit = |body: &str| format!("{sock}[[resource_rate_limits]]\n{body}");
        assert!(
            cfg(&limit(
                "resource_type = \"Model\"\nresource_id = \"m\"\nper_sec = 2\n"
            ))
            .is_ok()
        );
        for bad in [
            "resource_type = \"Endpoint\"\nresource_id = \"m\"\nper_sec = 2\n",
            "resource_type = \"Tool\"\nresource_id = \"\"\nper_sec = 2\n",
            "resource_type = \"Tool\"\nresource_id = \"t\"\nper_sec = 0\n",
            "resource_type = \"Tool\"\nresource_id = \"t\"\nper_sec = 1\nburst = 0.5\n",
        ] {
            assert_eq!(
                cfg(&limit(bad)).unwrap_err(),
                "resource_rate_limits",
                "{bad}"
            );
        }
        let twice = format!(
            "{}[[resource_rate_limits]]\nresource_type = \"Model\"\nresource_id = \"m\"\nper_sec = 1\n",
            limit("resource_type = \"Model\"\nresource_id = \"m\"\nper_sec = 2\n")
        );
        assert_eq!(cfg(&twice).unwrap_err(), "resource_rate_limits");
    }
}
