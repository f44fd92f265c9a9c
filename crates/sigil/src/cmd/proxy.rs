//! `sigil proxy`: run the sidecar enforcer in the foreground until SIGINT/SIGTERM.
use std::path::PathBuf;
use std::sync::Arc;

use sigil_core::SystemClock;
use sigil_proxy::ProxyConfig;

use crate::config::load;

/// Flags of `sigil proxy`; each overrides the config file key of the same name.
#[derive(Debug, Default, clap::Args)]
pub struct ProxyArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "SIGIL_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Trust domain whose SVIDs are admitted.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Listener address (mTLS).
    #[arg(long = "listen")]
    pub listen_addr: Option<String>,
    /// Upstream server, http://host:port or unix:///path.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Speak HTTP/2 with prior knowledge (h2c) to the upstream.
    #[arg(long)]
    pub upstream_http2: bool,
    /// Audience access tokens must carry.
    #[arg(long)]
    pub audience: Option<String>,
    /// Token issuer URL.
    #[arg(long)]
    pub issuer: Option<String>,
    /// The local agent's Workload API socket (unix:///path): serving SVID and bundles come
    /// from it and rotate live. Instead of --cert/--key/--bundle.
    #[arg(long)]
    pub workload_api_socket: Option<String>,
    /// Which SVID from the Workload API to serve with (default: the first).
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// `full` (token + policy + rate limit + audit, default) or `mtls-only`.
    #[arg(long)]
    pub enforce: Option<String>,
    /// The proxy's certificate chain (PEM).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// The proxy's PKCS#8 key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Trust bundle, SPIFFE bundle JSON (`sigil bundle show`).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Directory of Cedar policies (*.cedar); reloaded on SIGHUP. Without it all is denied.
    #[arg(long)]
    pub policy_dir: Option<PathBuf>,
    /// Where policies come from: dir (policy_dir, default) or agent (signed bundles from
    /// the local agent on workload_api_socket, enforced until they expire).
    #[arg(long)]
    pub policy_source: Option<String>,

    /// Path where the upstream serves MCP (default /mcp).
    #[arg(long)]
    pub mcp_path: Option<String>,
    /// The audit and trace export flags (boxed: keeps the `Command` enum's variants of
    /// similar size).
    #[command(flatten)]
    pub audit: Box<AuditArgs>,
    /// How requests are read and classified, and the client timeouts.
    #[command(flatten)]
    pub reading: Box<ReadingArgs>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long)]
    pub max_body_bytes: Option<i64>,
    /// Requests per second per identity (0 = unlimited).
    #[arg(long)]
    pub rate_limit_per_sec: Option<f64>,
    /// Burst per identity.
    #[arg(long)]
    pub rate_limit_burst: Option<f64>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Serve Prometheus /metrics, /healthz and /readyz here (plain HTTP; use loopback).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Publish behaviour summaries to this MQTT broker (mqtt://host:port).
    #[arg(long)]
    pub telemetry_broker: Option<String>,
    /// The telemetry window in seconds (default 10).
    #[arg(long)]
    pub telemetry_window_secs: Option<i64>,
}

/// Where the audit records go.
#[derive(Debug, Default, clap::Args)]
pub struct AuditArgs {
    /// The audit segment (see `sigil audit show`).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Ship the audit records to this trust authority (https://host:port), acknowledged by
    /// index in its audit Merkle log.
    #[arg(long)]
    pub audit_ship_to: Option<String>,
    /// With --audit-ship-to: replace the segment once it holds this many bytes and the
    /// server has acknowledged all of it (default 64 MiB).
    #[arg(long)]
    pub audit_rotate_bytes: Option<i64>,
    /// Export the durable audit records as ECS-style JSON lines to `stdout` or a file.
    #[arg(long)]
    pub audit_export: Option<String>,
    /// Export the audit records as OpenTelemetry logs to this OTLP base URL
    /// (http://host:4318, or host:4317 with OTEL_EXPORTER_OTLP_PROTOCOL=grpc;
    /// default: OTEL_EXPORTER_OTLP_LOGS_ENDPOINT / _ENDPOINT).
    #[arg(long)]
    pub audit_otlp_endpoint: Option<String>,
    /// Export a trace of every proxied request over OTLP to this base URL
    /// (http://host:4318, or host:4317 with OTEL_EXPORTER_OTLP_PROTOCOL=grpc;
    /// default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / _ENDPOINT).
    #[arg(long)]
    pub trace_otlp_endpoint: Option<String>,
}

/// How requests are read and classified.
#[derive(Debug, Default, clap::Args)]
pub struct ReadingArgs {
    /// A path that is a model call, added to the built-in inference routes (repeatable).
    #[arg(long = "model-route")]
    pub model_routes: Vec<String>,
    /// A body field that chooses a model (repeatable; replaces the default list: model,
    /// fallbacks, context_window_fallbacks, models).
    #[arg(long = "model-field")]
    pub model_fields: Vec<String>,
    /// The model a model route's body may leave unnamed (a one-model upstream).
    #[arg(long)]
    pub default_model: Option<String>,
    /// Do not set X-Forwarded-Client-Cert on forwarded requests.
    #[arg(long)]
    pub no_xfcc: bool,
    /// Accept DPoP-bound tokens from clients without a client certificate (RFC 9449).
    #[arg(long)]
    pub dpop: bool,
    /// With --dpop: require a server-issued nonce in every DPoP proof.
    #[arg(long)]
    pub dpop_nonce: bool,
    /// The URL clients reach this proxy at (DPoP htu, RFC 9728 resource metadata).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Seconds a client has to send a request head (default 30).
    #[arg(long)]
    pub header_read_timeout_secs: Option<i64>,
    /// Seconds a client has to send a request body (default 30).
    #[arg(long)]
    pub body_read_timeout_secs: Option<i64>,
    /// Seconds an idle connection stays open (default 120).
    #[arg(long)]
    pub idle_timeout_secs: Option<i64>,
}

impl ReadingArgs {
    fn flags(&self) -> Vec<(&'static str, Option<toml::Value>)> {
        let list = |v: &[String]| {
            (!v.is_empty())
                .then(|| toml::Value::Array(v.iter().cloned().map(toml::Value::String).collect()))
        };
        vec![
            ("model_routes", list(&self.model_routes)),
            ("model_fields", list(&self.model_fields)),
            (
                "default_model",
                self.default_model.clone().map(toml::Value::String),
            ),
            ("xfcc", self.no_xfcc.then_some(toml::Value::Boolean(false))),
            ("dpop", self.dpop.then_some(toml::Value::Boolean(true))),
            (
                "dpop_nonce",
                self.dpop_nonce.then_some(toml::Value::Boolean(true)),
            ),
            (
                "public_url",
                self.public_url.clone().map(toml::Value::String),
            ),
            (
                "header_read_timeout_secs",
                self.header_read_timeout_secs.map(toml::Value::Integer),
            ),
            (
                "body_read_timeout_secs",
                self.body_read_timeout_secs.map(toml::Value::Integer),
            ),
            (
                "idle_timeout_secs",
                self.idle_timeout_secs.map(toml::Value::Integer),
            ),
        ]
    }
}

impl ProxyArgs {
    fn flags(&self) -> Vec<(&'static str, toml::Value)> {
        let s = |x: &Option<String>| x.clone().map(toml::Value::String);
        let p = |x: &Option<PathBuf>| {
            x.as_ref()
                .map(|p| toml::Value::String(p.display().to_string()))
        };
        [
            ("trust_domain", s(&self.trust_domain)),
            ("listen_addr", s(&self.listen_addr)),
            ("upstream", s(&self.upstream)),
            ("audience", s(&self.audience)),
            ("issuer", s(&self.issuer)),
            ("log_format", s(&self.log_format)),
            ("workload_api_socket", s(&self.workload_api_socket)),
            ("spiffe_id", s(&self.spiffe_id)),
            ("enforce", s(&self.enforce)),
            (
                "upstream_http2",
                self.upstream_http2.then_some(toml::Value::Boolean(true)),
            ),
            ("cert", p(&self.cert)),
            ("key", p(&self.key)),
            ("bundle", p(&self.bundle)),
        ]
        .into_iter()
        .chain([
            ("audit_log", p(&self.audit.audit_log)),
            ("audit_ship_to", s(&self.audit.audit_ship_to)),
            (
                "audit_rotate_bytes",
                self.audit.audit_rotate_bytes.map(toml::Value::Integer),
            ),
            ("audit_export", s(&self.audit.audit_export)),
            ("audit_otlp_endpoint", s(&self.audit.audit_otlp_endpoint)),
            ("trace_otlp_endpoint", s(&self.audit.trace_otlp_endpoint)),
            ("mcp_path", s(&self.mcp_path)),
            ("policy_dir", p(&self.policy_dir)),
            ("policy_source", s(&self.policy_source)),
            ("metrics_addr", s(&self.metrics_addr)),
            ("telemetry_broker", s(&self.telemetry_broker)),
            (
                "telemetry_window_secs",
                self.telemetry_window_secs.map(toml::Value::Integer),
            ),
            (
                "max_body_bytes",
                self.max_body_bytes.map(toml::Value::Integer),
            ),
            (
                "rate_limit_per_sec",
                self.rate_limit_per_sec.map(toml::Value::Float),
            ),
            (
                "rate_limit_burst",
                self.rate_limit_burst.map(toml::Value::Float),
            ),
        ])
        .chain(self.reading.flags())
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let cfg: ProxyConfig = load(args.config.as_deref(), ProxyConfig::KEYS, args.flags())?;
    cfg.validate()
        .map_err(|e| crate::config::UsageError(e.to_string()))?;
    super::init_logging(cfg.log_format == "json");
    let proxy = sigil_proxy::start(cfg, Arc::new(SystemClock)).await?;
    super::server::wait_for_signal().await;
    proxy.shutdown();
    Ok(())
}
