//! What the OTLP exporters of the proxy share (the audit logs of `export.rs` and the spans of
//! `trace.rs`): the standard `OTEL_*` environment variables, the resource, and the exporters
//! themselves, built with the OpenTelemetry SDK (`opentelemetry-otlp`): OTLP/HTTP with
//! protobuf over a rustls client, or OTLP/gRPC over tonic; TLS (`https://`, with
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` and an optional client certificate), gzip
//! (`OTEL_EXPORTER_OTLP_COMPRESSION`), the SDK's retries and timeouts. Each exporter is
//! wrapped to count what was exported and what was dropped, for `/metrics`.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use sigil_metrics::prometheus_client::metrics::counter::Counter;
use sigil_metrics::prometheus_client::metrics::family::Family;

/// The default `service.name`.
const DEFAULT_SERVICE: &str = "sigil-proxy";
/// Longest one OTLP/HTTP request may take (connect, send, answer).
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest OTLP/HTTP answer read.
const MAX_ANSWER: usize = 1 << 20;

/// How an OTLP signal is sent (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `http/protobuf` (the default).
    HttpProtobuf,
    /// `grpc`.
    Grpc,
}

/// Where and how OTLP requests of one signal are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// OTLP/HTTP: the full URL (`…/v1/logs`, `…/v1/traces`); gRPC: the collector's URL.
    pub url: String,
    pub protocol: Protocol,
    /// Extra request headers (gRPC metadata) (`OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS` /
    /// `OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(String, String)>,
    /// `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`.
    pub gzip: bool,
    /// PEM roots for `https://` (`OTEL_EXPORTER_OTLP_CERTIFICATE`); the system's roots
    /// without it.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key for mutual TLS (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`,
    /// `OTEL_EXPORTER_OTLP_CLIENT_KEY`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// One OTLP signal: its path under a base endpoint and its environment variable infix.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Signal {
    Logs,
    Traces,
}

impl Signal {
    fn path(self) -> &'static str {
        match self {
            Signal::Logs => "/v1/logs",
            Signal::Traces => "/v1/traces",
        }
    }

    fn var(self, what: &str) -> String {
        let s = match self {
            Signal::Logs => "LOGS",
            Signal::Traces => "TRACES",
        };
        format!("OTEL_EXPORTER_OTLP_{s}_{what}")
    }

    /// The signal's own variable, else the generic one.
    fn setting(self, env: &dyn Fn(&str) -> Option<String>, what: &str) -> Option<String> {
        var(env, &self.var(what)).or_else(|| var(env, &format!("OTEL_EXPORTER_OTLP_{what}")))
    }
}

/// Reads a non-blank environment variable through `env`.
pub(crate) fn var(env: &dyn Fn(&str) -> Option<String>, k: &str) -> Option<String> {
    env(k).filter(|v| !v.trim().is_empty())
}

impl OtlpConfig {
    /// The settings of `signal`: `configured` (a base URL from the proxy's configuration),
    /// else the signal's own endpoint variable (a full URL, used as is), else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (+ `/v1/<signal>` over HTTP); then the protocol,
    /// headers, compression and TLS files of the environment. `Ok(None)` when no endpoint is
    /// set.
    pub(crate) fn resolve(
        signal: Signal,
        configured: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, EndpointError> {
        let protocol = match signal.setting(env, "PROTOCOL").as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => return Err(EndpointError::Protocol(other.to_owned())),
        };
        let join = |base: &str| match protocol {
            Protocol::HttpProtobuf => join(base, signal),
            Protocol::Grpc => base.trim().to_owned(),
        };
        let url = match (configured, var(env, &signal.var("ENDPOINT"))) {
            (Some(base), _) => join(base),
            (None, Some(full)) => full.trim().to_owned(),
            (None, None) => match var(env, "OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(base) => join(&base),
                None => return Ok(None),
            },
        };
        check_url(&url)?;
        let gzip = match signal.setting(env, "COMPRESSION").as_deref().map(str::trim) {
            None | Some("none") => false,
            Some("gzip") => true,
            Some(other) => return Err(EndpointError::Compression(other.to_owned())),
        };
        let ca_file = signal.setting(env, "CERTIFICATE").map(PathBuf::from);
        let client_cert = match (
            signal.setting(env, "CLIENT_CERTIFICATE"),
            signal.setting(env, "CLIENT_KEY"),
        ) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            _ => return Err(EndpointError::ClientCertificate),
        };
        Ok(Some(Self {
            url,
            protocol,
            headers: signal_headers(signal, env),
            gzip,
            ca_file,
            client_cert,
        }))
    }

    fn https(&self) -> bool {
        self.url.starts_with("https://")
    }

    fn header_map(&self) -> HashMap<String, String> {
        self.headers.iter().cloned().collect()
    }

    fn metadata(&self) -> opentelemetry_otlp::tonic_types::metadata::MetadataMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                h.append(k, v);
            }
        }
        opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(h)
    }

    /// tonic's TLS settings for an `https://` collector.
    fn tonic_tls(
        &self,
    ) -> Result<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig, BuildError> {
        use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.client_cert {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(tls)
    }

    /// The rustls client of an `https://` collector.
    fn rustls(&self) -> Result<rustls::ClientConfig, BuildError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let tls_err =
            |what: &str, e: &dyn std::fmt::Display| BuildError::Tls(format!("{what}: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(ca) => {
                for c in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| tls_err(&ca.display().to_string(), &e))?
                {
                    let c = c.map_err(|e| tls_err(&ca.display().to_string(), &e))?;
                    roots
                        .add(c)
                        .map_err(|e| tls_err(&ca.display().to_string(), &e))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        if roots.is_empty() {
            return Err(BuildError::Tls(
                "no trusted roots for the https collector".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("protocol versions", &e))?
            .with_root_certificates(roots);
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| tls_err(&cert.display().to_string(), &e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| tls_err(&cert.display().to_string(), &e))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| tls_err(&key.display().to_string(), &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_err("client certificate", &e))
            }
        }
    }

    fn http_client(&self) -> Result<HyperClient, BuildError> {
        HyperClient::new(if self.https() {
            Some(self.rustls()?)
        } else {
            None
        })
    }

    fn compression(&self) -> Option<opentelemetry_otlp::Compression> {
        self.gzip.then_some(opentelemetry_otlp::Compression::Gzip)
    }

    /// The span exporter (call inside the runtime: the gRPC channel starts its task there).
    pub(crate) fn span_exporter(
        &self,
        counters: SignalCounters,
    ) -> Result<Counted<opentelemetry_otlp::SpanExporter>, BuildError> {
        let b = opentelemetry_otlp::SpanExporter::builder();
        let exporter = match self.protocol {
            Protocol::Grpc => {
                let mut b = b
                    .with_tonic()
                    .with_endpoint(self.url.clone())
                    .with_metadata(self.metadata());
                if let Some(c) = self.compression() {
                    b = b.with_compression(c);
                }
                if self.https() {
                    b = b.with_tls_config(self.tonic_tls()?);
                }
                b.build()
            }
            Protocol::HttpProtobuf => {
                let mut b = b
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(self.url.clone())
                    .with_headers(self.header_map())
                    .with_http_client(self.http_client()?);
                if let Some(c) = self.compression() {
                    b = b.with_compression(c);
                }
                b.build()
            }
        }
        .map_err(|e| BuildError::Exporter(e.to_string()))?;
        Ok(Counted::new(exporter, counters, "traces"))
    }

    /// The log exporter (call inside the runtime, as for spans).
    pub(crate) fn log_exporter(
        &self,
        counters: SignalCounters,
    ) -> Result<Counted<opentelemetry_otlp::LogExporter>, BuildError> {
        let b = opentelemetry_otlp::LogExporter::builder();
        let exporter = match self.protocol {
            Protocol::Grpc => {
                let mut b = b
                    .with_tonic()
                    .with_endpoint(self.url.clone())
                    .with_metadata(self.metadata());
                if let Some(c) = self.compression() {
                    b = b.with_compression(c);
                }
                if self.https() {
                    b = b.with_tls_config(self.tonic_tls()?);
                }
                b.build()
            }
            Protocol::HttpProtobuf => {
                let mut b = b
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(self.url.clone())
                    .with_headers(self.header_map())
                    .with_http_client(self.http_client()?);
                if let Some(c) = self.compression() {
                    b = b.with_compression(c);
                }
                b.build()
            }
        }
        .map_err(|e| BuildError::Exporter(e.to_string()))?;
        Ok(Counted::new(exporter, counters, "audit logs"))
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|e| BuildError::Tls(format!("{}: {e}", path.display())))
}

/// Why an exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("OTLP TLS: {0}")]
    Tls(String),
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// The headers of `signal` (its own variable, else the generic one); invalid ones are logged
/// and skipped.
pub(crate) fn signal_headers(
    signal: Signal,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    signal
        .setting(env, "HEADERS")
        .map(|h| key_values(&h, "OTEL_EXPORTER_OTLP_HEADERS"))
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| {
            let ok = HeaderName::try_from(k.as_str()).is_ok()
                && HeaderValue::try_from(v.as_str()).is_ok();
            if !ok {
                tracing::warn!(header = %k, "OTEL_EXPORTER_OTLP_HEADERS: invalid header; ignored");
            }
            ok
        })
        .collect()
}

/// `service.name` (`OTEL_SERVICE_NAME`, else `service.name` of `OTEL_RESOURCE_ATTRIBUTES`,
/// else `sigil-proxy`) and the other resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
pub(crate) fn resource(env: &dyn Fn(&str) -> Option<String>) -> (String, Vec<(String, String)>) {
    let mut resource = var(env, "OTEL_RESOURCE_ATTRIBUTES")
        .map(|r| key_values(&r, "OTEL_RESOURCE_ATTRIBUTES"))
        .unwrap_or_default();
    let from_attrs = resource
        .iter()
        .position(|(k, _)| k == "service.name")
        .map(|i| resource.remove(i).1);
    let service_name = var(env, "OTEL_SERVICE_NAME")
        .or(from_attrs)
        .unwrap_or_else(|| DEFAULT_SERVICE.to_owned());
    (service_name, resource)
}

/// The OTLP `Resource`: `service.name`, `service.version`, then `attrs`.
pub(crate) fn sdk_resource(
    service_name: &str,
    attrs: &[(String, String)],
) -> opentelemetry_sdk::Resource {
    use opentelemetry::KeyValue;
    opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(service_name.to_owned())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            attrs
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

/// `<base>/v1/<signal>`.
fn join(base: &str, signal: Signal) -> String {
    format!("{}{}", base.trim().trim_end_matches('/'), signal.path())
}

/// Why an OTLP setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error("{0}: not a URL (OTLP endpoint)")]
    NotAUrl(String),
    #[error("{0}: must be an http:// or https:// URL with a host")]
    NotHttp(String),
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0:?}: not supported (grpc, http/protobuf)")]
    Protocol(String),
    #[error("OTEL_EXPORTER_OTLP_COMPRESSION={0:?}: not supported (gzip, none)")]
    Compression(String),
    #[error("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together")]
    ClientCertificate,
}

fn check_url(url: &str) -> Result<(), EndpointError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| EndpointError::NotAUrl(url.to_owned()))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => Ok(()),
        _ => Err(EndpointError::NotHttp(url.to_owned())),
    }
}

/// What one signal's export did, as counters on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct SignalCounters {
    /// Items the receiver accepted.
    pub exported: Counter,
    /// Items dropped before export: the proxy's or the SDK's queue was full.
    pub dropped_queue: Counter,
    /// Items dropped because their batch failed (retries exhausted, or refused).
    pub dropped_failed: Counter,
}

type SignalLabel = [(&'static str, &'static str); 1];
type DropLabels = [(&'static str, &'static str); 2];

/// The counters of every export, as two labelled families for `/metrics`.
#[derive(Debug, Clone)]
pub struct ExportCounters {
    pub traces: SignalCounters,
    pub logs: SignalCounters,
    /// The JSON-lines copy of the audit records (`audit_export`).
    pub jsonl: SignalCounters,
    pub(crate) exported: Family<SignalLabel, Counter>,
    pub(crate) dropped: Family<DropLabels, Counter>,
}

impl Default for ExportCounters {
    fn default() -> Self {
        let exported = Family::<SignalLabel, Counter>::default();
        let dropped = Family::<DropLabels, Counter>::default();
        // Each signal's counters are the families' own series (a counter's clone shares it).
        // One statement per series: the family's guard must be gone before the next
        // `get_or_create` (which may take the family's write lock).
        let signal = |name: &'static str| {
            let exported = exported.get_or_create(&[("signal", name)]).clone();
            let dropped_queue = dropped
                .get_or_create(&[("signal", name), ("reason", "queue_full")])
                .clone();
            let dropped_failed = dropped
                .get_or_create(&[("signal", name), ("reason", "export_failed")])
                .clone();
            SignalCounters {
                exported,
                dropped_queue,
                dropped_failed,
            }
        };
        Self {
            traces: signal("traces"),
            logs: signal("logs"),
            jsonl: signal("audit_jsonl"),
            exported,
            dropped,
        }
    }
}

/// An SDK exporter that counts what it exported and what failed.
#[derive(Debug)]
pub(crate) struct Counted<E> {
    inner: E,
    counters: SignalCounters,
    what: &'static str,
}

impl<E> Counted<E> {
    fn new(inner: E, counters: SignalCounters, what: &'static str) -> Self {
        Self {
            inner,
            counters,
            what,
        }
    }

    fn count(&self, n: u64, result: &OTelSdkResult) {
        match result {
            Ok(()) => {
                self.counters.exported.inc_by(n);
            }
            Err(e) => {
                let before = self.counters.dropped_failed.inc_by(n);
                if before == 0 || (before + n) / 1000 > before / 1000 {
                    tracing::warn!(error = %e, dropped_total = before + n, "OTLP export of {} failed; batch dropped", self.what);
                }
            }
        }
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counted<E>
{
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        self.count(n, &result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: opentelemetry_sdk::logs::LogExporter> opentelemetry_sdk::logs::LogExporter for Counted<E> {
    async fn export(&self, batch: opentelemetry_sdk::logs::LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count() as u64;
        let result = self.inner.export(batch).await;
        self.count(n, &result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP/HTTP client: hyper with rustls, its requests run on the proxy's runtime (the
/// SDK's batch processors export from their own threads).
#[derive(Debug, Clone)]
pub(crate) struct HyperClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

impl HyperClient {
    fn new(tls: Option<rustls::ClientConfig>) -> Result<Self, BuildError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| BuildError::Exporter(format!("no runtime: {e}")))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(HTTP_TIMEOUT));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match tls {
            // An http:// URL never reaches TLS; an https:// one always does.
            Some(cfg) => builder.with_tls_config(cfg).https_only(),
            None => builder
                .with_tls_config(
                    rustls::ClientConfig::builder_with_provider(Arc::new(
                        rustls::crypto::aws_lc_rs::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| BuildError::Tls(e.to_string()))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
                .https_or_http(),
        }
        .enable_http1()
        .wrap_connector(http);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            runtime,
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HyperClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            tokio::time::timeout(HTTP_TIMEOUT, async move {
                let (parts, body) = request.into_parts();
                let response = client
                    .request(http::Request::from_parts(parts, Full::new(body)))
                    .await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|e| -> opentelemetry_http::HttpError { e })?
                    .to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
            })
            .await
            .map_err(|_| -> opentelemetry_http::HttpError { "no answer in 10 s".into() })?
        });
        task.await?
    }
}

/// `k1=v1,k2=v2` with percent-encoded values (the OTel environment variable format).
/// Malformed entries are logged and skipped.
pub(crate) fn key_values(text: &str, what: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .filter_map(|kv| {
            let parsed = kv.split_once('=').and_then(|(k, v)| {
                let k = percent_decode(k.trim())?;
                let v = percent_decode(v.trim())?;
                (!k.is_empty()).then_some((k, v))
            });
            if parsed.is_none() {
                tracing::warn!("{what}: malformed entry ignored");
            }
            parsed
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}
