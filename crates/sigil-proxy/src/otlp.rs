//! What the OTLP/HTTP exporters of the proxy share (the audit logs of `export.rs` and the
//! spans of `trace.rs`): the standard `OTEL_*` environment variables, the resource, and a
//! poster that sends one JSON body (protobuf JSON mapping) and says whether a failure is
//! worth retrying.
use std::time::Duration;

use anyhow::Context;
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// Tries per OTLP batch (on connection errors, 429, 502, 503, 504).
pub(crate) const OTLP_ATTEMPTS: u32 = 3;
const OTLP_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `service.name`.
const DEFAULT_SERVICE: &str = "sigil-proxy";

/// Where and how OTLP requests of one signal are posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The full URL (`…/v1/logs`, `…/v1/traces`).
    pub url: String,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS` /
    /// `OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(String, String)>,
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
}

/// Reads a non-blank environment variable through `env`.
pub(crate) fn var(env: &dyn Fn(&str) -> Option<String>, k: &str) -> Option<String> {
    env(k).filter(|v| !v.trim().is_empty())
}

/// The URL of `signal`: the configured base (`<base>/v1/<signal>`), else the signal's own
/// variable (a full URL, used as is), else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/<signal>`;
/// checked. `Ok(None)` when none is set.
pub(crate) fn signal_url(
    signal: Signal,
    configured: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, EndpointError> {
    let url = match (configured, var(env, &signal.var("ENDPOINT"))) {
        (Some(base), _) => Some(join(base, signal)),
        (None, Some(full)) => Some(full.trim().to_owned()),
        (None, None) => var(env, "OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| join(&b, signal)),
    };
    if let Some(url) = &url {
        check_http_url(url)?;
    }
    Ok(url)
}

/// The headers of `signal` (its own variable, else the generic one); invalid ones are logged
/// and skipped.
pub(crate) fn signal_headers(
    signal: Signal,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    var(env, &signal.var("HEADERS"))
        .or_else(|| var(env, "OTEL_EXPORTER_OTLP_HEADERS"))
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
pub(crate) fn resource_json(service_name: &str, attrs: &[(String, String)]) -> Value {
    let mut all = vec![
        json!({ "key": "service.name", "value": { "stringValue": service_name } }),
        json!({ "key": "service.version", "value": { "stringValue": env!("CARGO_PKG_VERSION") } }),
    ];
    all.extend(
        attrs
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": { "stringValue": v } })),
    );
    json!({ "attributes": all })
}

/// `<base>/v1/<signal>`.
fn join(base: &str, signal: Signal) -> String {
    format!("{}{}", base.trim().trim_end_matches('/'), signal.path())
}

/// Why an OTLP endpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error("{0}: not a URL (OTLP/HTTP endpoint)")]
    NotAUrl(String),
    /// `https://`: the exporter has no client TLS roots yet.
    #[error(
        "{0}: https is not supported for OTLP export yet; send to an http:// collector \
         on loopback (e.g. an OpenTelemetry Collector beside the proxy)"
    )]
    Https(String),
    #[error("{0}: must be an http://host:port URL")]
    NotHttp(String),
}

fn check_http_url(url: &str) -> Result<(), EndpointError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| EndpointError::NotAUrl(url.to_owned()))?;
    match uri.scheme_str() {
        Some("http") if uri.authority().is_some() => Ok(()),
        Some("https") => Err(EndpointError::Https(url.to_owned())),
        _ => Err(EndpointError::NotHttp(url.to_owned())),
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

/// Posts JSON bodies to one OTLP/HTTP URL.
pub(crate) struct OtlpPoster {
    client: Client<HttpConnector, Full<Bytes>>,
    url: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Why a post failed, and whether trying again may help.
pub(crate) struct PostError {
    pub retry: bool,
    pub message: String,
}

impl OtlpPoster {
    pub(crate) fn new(cfg: &OtlpConfig) -> anyhow::Result<Self> {
        let url: Uri = cfg.url.parse().context("OTLP endpoint")?;
        let headers = cfg
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::try_from(k.as_str()).ok()?,
                    HeaderValue::try_from(v.as_str()).ok()?,
                ))
            })
            .collect();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(OTLP_TIMEOUT));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            url,
            headers,
        })
    }

    pub(crate) async fn post(&self, body: Bytes) -> Result<(), PostError> {
        let fail = |retry, message: String| PostError { retry, message };
        let mut req = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| fail(false, e.to_string()))?;
        for (k, v) in &self.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let resp = tokio::time::timeout(OTLP_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| fail(true, "no answer in 10 s".into()))?
            .map_err(|e| fail(true, e.to_string()))?;
        let status = resp.status();
        let body = tokio::time::timeout(OTLP_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| fail(true, "answer body timed out".into()))?
            .map_err(|e| fail(true, e.to_string()))?
            .to_bytes();
        if status.is_success() {
            // A partial success names what the receiver rejected
            // (`rejectedLogRecords`, `rejectedSpans`).
            if let Ok(v) = serde_json::from_slice::<Value>(&body)
                && let Some(p) = v.get("partialSuccess").and_then(Value::as_object)
                && p.keys().any(|k| k.starts_with("rejected"))
            {
                tracing::warn!(url = %self.url, partial_success = ?p, "OTLP receiver rejected part of a batch");
            }
            return Ok(());
        }
        let retry = matches!(status.as_u16(), 429 | 502 | 503 | 504);
        Err(fail(
            retry,
            format!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(body.get(..body.len().min(300)).unwrap_or_default()).trim()
            ),
        ))
    }

    /// Posts `body`, retrying a retryable failure ([`OTLP_ATTEMPTS`] tries, 200 ms then
    /// doubling apart). The last error when it was not accepted.
    pub(crate) async fn post_retrying(&self, body: Bytes) -> Result<(), PostError> {
        let mut wait = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.post(body.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.retry && attempt < OTLP_ATTEMPTS => {
                    tracing::debug!(error = %e.message, attempt, url = %self.url, "OTLP post failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
