//! SIEM export of the audit records: once a batch of decision records is durable in the
//! audit segment, the writer thread offers it here ([`ExportSink::offer`], never blocking:
//! a full queue drops the export, counted and logged). An exporter task maps each record to
//! ECS-style fields ([`ecs_fields`]) and writes them
//!
//! - as JSON lines (`audit_export = "stdout"` or a file path, appended, 0600), one nested ECS
//!   object per decision, and/or
//! - as OpenTelemetry log records over OTLP (`audit_otlp_endpoint`, or the standard
//!   `OTEL_EXPORTER_OTLP_*` variables; HTTP/protobuf or gRPC, see `otlp.rs`), through the
//!   SDK's batch log processor (`OTEL_BLRP_*`): its retries, then a drop, counted on
//!   `/metrics`.
//!
//! Export is best effort and never on the request path: the durable segment and the shipping
//! to the server (`shipper.rs`) are the lossless path. Only records that were synced are
//! exported, so an exported decision is always in the segment too.
use std::time::{Duration, SystemTime};

use anyhow::Context;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::{InstrumentationScope, StringValue};
use opentelemetry_sdk::logs::{BatchLogProcessor, SdkLogger, SdkLoggerProvider};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use crate::otlp::OtlpConfig;
use crate::otlp::{ExportCounters, Signal, SignalCounters};

/// Batches (of one sync each, ≤ 512 records) waiting for the exporter; beyond, dropped.
const QUEUE_BATCHES: usize = 64;

/// Why the export settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportConfigError {
    #[error("audit_export must be \"stdout\" or a file path")]
    AuditExport,
    #[error("{0}")]
    Otlp(crate::otlp::EndpointError),
}

impl ExportConfigError {
    /// The configuration key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            ExportConfigError::AuditExport => "audit_export",
            ExportConfigError::Otlp(_) => "audit_otlp_endpoint",
        }
    }
}

/// What the exporter does, resolved from the configuration and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// `stdout`, or a file path for JSON lines.
    pub jsonl: Option<String>,
    /// OTLP/HTTP logs export.
    pub otlp: Option<OtlpConfig>,
    /// `service.name` (`OTEL_SERVICE_NAME`, else `service.name` of
    /// `OTEL_RESOURCE_ATTRIBUTES`, else `sigil-proxy`).
    pub service_name: String,
    /// Further resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource: Vec<(String, String)>,
}

impl ExportConfig {
    /// Resolves the export settings; `env` reads an environment variable. `Ok(None)` when
    /// neither export is configured. The error names what is wrong.
    pub fn resolve(
        audit_export: Option<&str>,
        audit_otlp_endpoint: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ExportConfigError> {
        if let Some(e) = audit_export
            && e.trim().is_empty()
        {
            return Err(ExportConfigError::AuditExport);
        }
        let otlp = OtlpConfig::resolve(Signal::Logs, audit_otlp_endpoint, env)
            .map_err(ExportConfigError::Otlp)?;
        if audit_export.is_none() && otlp.is_none() {
            return Ok(None);
        }
        let (service_name, resource) = crate::otlp::resource(env);
        Ok(Some(Self {
            jsonl: audit_export.map(str::to_owned),
            otlp,
            service_name,
            resource,
        }))
    }
}

/// The writer thread's end of the export queue.
#[derive(Clone)]
pub struct ExportSink {
    tx: mpsc::Sender<Vec<Vec<u8>>>,
    /// Counts records the queue refused (as the logs' queue drops).
    dropped: SignalCounters,
}

impl ExportSink {
    /// Offers the framed segment lines of a batch that is durable. Never blocks: when the
    /// queue is full the batch is dropped, counted, and logged (every 1,000 drops).
    pub fn offer(&self, lines: Vec<Vec<u8>>) {
        let n = lines.len() as u64;
        if let Err(e) = self.tx.try_send(lines) {
            let before = self.dropped.dropped_queue.inc_by(n);
            if before == 0 || (before + n) / 1000 > before / 1000 {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "export queue full",
                    mpsc::error::TrySendError::Closed(_) => "exporter stopped",
                };
                tracing::warn!(
                    dropped_total = before + n,
                    "audit export: {why}; records dropped from the export (they are in the \
                     audit segment)"
                );
            }
        }
    }
}

/// Ends the SDK's logger provider off the runtime's threads (its last export may need them).
struct Provider(Option<SdkLoggerProvider>);

impl Drop for Provider {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            std::thread::spawn(move || {
                let _ = p.shutdown_with_timeout(Duration::from_secs(5));
            });
        }
    }
}

/// Starts the exporter (inside the runtime); the sink to give the audit writer, and the task
/// (abort to stop).
pub fn spawn(
    cfg: ExportConfig,
    counters: ExportCounters,
) -> anyhow::Result<(ExportSink, Vec<JoinHandle<()>>)> {
    let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
    let otlp = match &cfg.otlp {
        Some(o) => {
            let exporter = o.log_exporter(counters.logs.clone())?;
            let provider = SdkLoggerProvider::builder()
                .with_resource(crate::otlp::sdk_resource(&cfg.service_name, &cfg.resource))
                .with_log_processor(BatchLogProcessor::builder(exporter).build())
                .build();
            let scope = InstrumentationScope::builder("sigil.audit")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build();
            Some((provider.logger_with_scope(scope), Provider(Some(provider))))
        }
        None => None,
    };
    let out: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> = match cfg.jsonl.as_deref() {
        None => None,
        Some("stdout") | Some("-") => {
            // A duplicate of fd 1, written like a file (off the runtime's threads).
            use std::os::fd::AsFd;
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("audit_export: stdout")?;
            Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(fd))))
        }
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("audit_export: opening {path}"))?;
            Some(Box::new(tokio::fs::File::from_std(f)))
        }
    };
    let dropped = if otlp.is_some() {
        counters.logs.clone()
    } else {
        counters.jsonl.clone()
    };
    let task = tokio::spawn(dispatch(
        rx,
        out,
        otlp,
        cfg.service_name.clone(),
        counters.jsonl,
    ));
    Ok((ExportSink { tx, dropped }, vec![task]))
}

/// Maps each durable batch and hands it to the JSON-lines output and the OTLP logger.
async fn dispatch(
    mut rx: mpsc::Receiver<Vec<Vec<u8>>>,
    mut out: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>>,
    otlp: Option<(SdkLogger, Provider)>,
    service: String,
    jsonl: SignalCounters,
) {
    let mut buf = Vec::new();
    while let Some(lines) = rx.recv().await {
        let events: Vec<Event> = lines
            .iter()
            .filter_map(|l| crate::audit::unframe(l))
            .filter_map(|json| match serde_json::from_slice::<Record>(json) {
                Ok(r) => Some(Event::new(&r, &service)),
                Err(e) => {
                    tracing::warn!(error = %e, "audit export: record not understood; skipped");
                    None
                }
            })
            .collect();
        if let Some(w) = out.as_mut() {
            buf.clear();
            for ev in &events {
                // Serializing a Value into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut buf, &ev.ecs_json());
                buf.push(b'\n');
            }
            let n = events.len() as u64;
            match async {
                w.write_all(&buf).await?;
                w.flush().await
            }
            .await
            {
                Ok(()) => {
                    jsonl.exported.inc_by(n);
                }
                Err(e) => {
                    let before = jsonl.dropped_failed.inc_by(n);
                    if before == 0 || (before + n) / 1000 > before / 1000 {
                        tracing::warn!(error = %e, failed_total = before + n, "audit export: writing JSON lines failed");
                    }
                }
            }
        }
        if let Some((logger, _)) = &otlp {
            for ev in &events {
                ev.emit(logger);
            }
        }
    }
}

/// A decision record as the segment holds it (see `audit::DecisionRecord`).
#[derive(Debug, Deserialize)]
pub struct Record {
    pub time_ms: u64,
    pub request_id: String,
    pub spiffe_id: String,
    pub cert_thumbprint: String,
    #[serde(default)]
    pub jti: Option<String>,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub calls: Vec<RecordCall>,
    #[serde(default)]
    pub policy_ids: Vec<String>,
    pub decision: String,
    #[serde(default)]
    pub reason: String,
}

/// One call of a record (tool arguments are not exported).
#[derive(Debug, Deserialize)]
pub struct RecordCall {
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
}

/// One exported field's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Str(String),
    Int(i64),
    Strs(Vec<String>),
}

impl Field {
    fn json(&self) -> Value {
        match self {
            Field::Str(s) => Value::from(s.as_str()),
            Field::Int(i) => Value::from(*i),
            Field::Strs(v) => Value::from(v.clone()),
        }
    }

    /// The OTLP `AnyValue`.
    fn otlp(&self) -> AnyValue {
        match self {
            Field::Str(s) => AnyValue::String(StringValue::from(s.clone())),
            Field::Int(i) => AnyValue::Int(*i),
            Field::Strs(v) => AnyValue::ListAny(Box::new(
                v.iter()
                    .map(|s| AnyValue::String(StringValue::from(s.clone())))
                    .collect(),
            )),
        }
    }
}

/// One decision, mapped.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub time_ms: u64,
    pub allow: bool,
    /// ECS field name → value, in a fixed order.
    pub fields: Vec<(&'static str, Field)>,
}

/// Fields that OTLP carries outside the attributes (timeUnixNano, body, severity, resource).
const NOT_OTLP_ATTRIBUTES: &[&str] = &["@timestamp", "message", "log.level", "service.name"];

impl Event {
    pub fn new(r: &Record, service: &str) -> Self {
        let allow = r.decision == "allow";
        Self {
            time_ms: r.time_ms,
            allow,
            fields: ecs_fields(r, service),
        }
    }

    /// The ECS document: dotted names become nested objects.
    pub fn ecs_json(&self) -> Value {
        let mut doc = Map::new();
        for (k, v) in &self.fields {
            insert_nested(&mut doc, k, v.json());
        }
        Value::Object(doc)
    }

    /// Emits the OTLP log record (to the SDK's batch processor).
    pub fn emit(&self, logger: &SdkLogger) {
        let mut rec = logger.create_log_record();
        let (number, text) = if self.allow {
            (Severity::Info, "INFO")
        } else {
            (Severity::Warn, "WARN")
        };
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(self.time_ms);
        rec.set_timestamp(time);
        rec.set_observed_timestamp(time);
        rec.set_severity_number(number);
        rec.set_severity_text(text);
        if let Some((_, Field::Str(m))) = self.fields.iter().find(|(k, _)| *k == "message") {
            rec.set_body(AnyValue::String(StringValue::from(m.clone())));
        }
        rec.add_attributes(
            self.fields
                .iter()
                .filter(|(k, _)| !NOT_OTLP_ATTRIBUTES.contains(k))
                .map(|(k, v)| (*k, v.otlp())),
        );
        logger.emit(rec);
    }
}

fn insert_nested(map: &mut Map<String, Value>, key: &str, value: Value) {
    if let Some((head, rest)) = key.split_once('.') {
        let slot = map
            .entry(head.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(inner) = slot {
            return insert_nested(inner, rest, value);
        }
    }
    // No dot, or the prefix already holds a value: keep the name as it is.
    map.insert(key.to_owned(), value);
}

/// The ECS-style fields of one decision (see docs/architecture.md, "SIEM export").
pub fn ecs_fields(r: &Record, service: &str) -> Vec<(&'static str, Field)> {
    use Field::{Str, Strs};
    let allow = r.decision == "allow";
    let first = r.calls.first();
    let action = first.map_or("request", |c| c.action.as_str());
    let calls: Vec<String> = r
        .calls
        .iter()
        .map(|c| format!("{} {}::{:?}", c.action, c.resource_type, c.resource_id))
        .collect();
    let what = match calls.as_slice() {
        [] => format!("{} {}", r.method, r.path),
        [one] => one.clone(),
        [one, rest @ ..] => format!("{one} (+{} more)", rest.len()),
    };
    let message = format!("{} {} {what}: {}", r.decision, r.spiffe_id, r.reason);
    let mut f: Vec<(&'static str, Field)> = vec![
        ("@timestamp", Str(rfc3339_ms(r.time_ms))),
        ("message", Str(message)),
        ("log.level", Str(if allow { "info" } else { "warn" }.into())),
        ("event.kind", Str("event".into())),
        ("event.category", Strs(vec!["iam".into()])),
        (
            "event.type",
            Strs(vec![if allow { "allowed" } else { "denied" }.into()]),
        ),
        ("event.action", Str(action.to_owned())),
        (
            "event.outcome",
            Str(if allow { "success" } else { "failure" }.into()),
        ),
        ("event.reason", Str(r.reason.clone())),
        ("event.id", Str(r.request_id.clone())),
        ("event.module", Str("sigil".into())),
        ("event.dataset", Str("sigil.audit".into())),
        ("service.name", Str(service.to_owned())),
        ("user.id", Str(r.spiffe_id.clone())),
        ("source.user.id", Str(r.spiffe_id.clone())),
    ];
    if let Some(hex) = b64url_sha256_to_hex(&r.cert_thumbprint) {
        f.push(("tls.client.hash.sha256", Str(hex)));
    }
    f.push(("sigil.cert_thumbprint", Str(r.cert_thumbprint.clone())));
    if let Some(jti) = &r.jti {
        f.push(("sigil.token.jti", Str(jti.clone())));
    }
    f.extend([
        ("http.request.method", Str(r.method.clone())),
        ("url.path", Str(r.path.clone())),
        ("sigil.decision", Str(r.decision.clone())),
        ("sigil.policy_ids", Strs(r.policy_ids.clone())),
    ]);
    if let Some(c) = first {
        f.push(("sigil.resource.type", Str(c.resource_type.clone())));
        f.push(("sigil.resource.id", Str(c.resource_id.clone())));
    }
    f.push((
        "sigil.call_count",
        Field::Int(i64::try_from(r.calls.len()).unwrap_or(i64::MAX)),
    ));
    f.push(("sigil.calls", Strs(calls)));
    f
}

/// The uppercase hex of a base64url (unpadded) SHA-256, as ECS wants hashes; `None` if it is
/// not one.
fn b64url_sha256_to_hex(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(32);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (out.len() == 32).then(|| hex::encode_upper(out))
}

/// RFC 3339 UTC with milliseconds, e.g. `2023-11-14T22:13:20.123Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let milli = ms % 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let sod = secs % 86_400;
    // Days to civil date (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use serde_json::json;
    use sigil_metrics::prometheus_client::metrics::counter::Counter;
    use std::sync::Arc;

    fn record(decision: &str) -> Record {
        serde_json::from_value(json!({
            "time_ms": 1_700_000_000_123u64,
            "request_id": "req-1",
            "spiffe_id": "spiffe://td.test/agent",
            // SHA-256 of "abc", base64url.
            "cert_thumbprint": "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0",
            "jti": "tok-1",
            "method": "POST",
            "path": "/mcp",
            "calls": [
                {"action": "call_tool", "resource_type": "Tool", "resource_id": "read_file",
                 "arguments": {"path": "/etc/passwd"}},
                {"action": "call_tool", "resource_type": "Tool", "resource_id": "grep"}
            ],
            "policy_ids": ["p1", "p2"],
            "decision": decision,
            "reason": "permitted by policy"
        }))
        .unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn thumbprints_become_uppercase_hex() {
        assert_eq!(
            b64url_sha256_to_hex("ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0").as_deref(),
            Some("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD")
        );
        assert_eq!(b64url_sha256_to_hex("abc"), None);
        assert_eq!(b64url_sha256_to_hex("t"), None);
    }

    #[test]
    fn allow_and_deny_map_to_ecs() {
        let allow = Event::new(&record("allow"), "gw").ecs_json();
        assert_eq!(allow["@timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(allow["event"]["kind"], "event");
        assert_eq!(allow["event"]["category"], json!(["iam"]));
        assert_eq!(allow["event"]["type"], json!(["allowed"]));
        assert_eq!(allow["event"]["action"], "call_tool");
        assert_eq!(allow["event"]["outcome"], "success");
        assert_eq!(allow["event"]["reason"], "permitted by policy");
        assert_eq!(allow["event"]["id"], "req-1");
        assert_eq!(allow["user"]["id"], "spiffe://td.test/agent");
        assert_eq!(allow["source"]["user"]["id"], "spiffe://td.test/agent");
        assert_eq!(
            allow["tls"]["client"]["hash"]["sha256"],
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        );
        assert_eq!(
            allow["sigil"]["cert_thumbprint"],
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
        assert_eq!(allow["sigil"]["token"]["jti"], "tok-1");
        assert_eq!(allow["sigil"]["policy_ids"], json!(["p1", "p2"]));
        assert_eq!(allow["sigil"]["resource"]["type"], "Tool");
        assert_eq!(allow["sigil"]["resource"]["id"], "read_file");
        assert_eq!(
            allow["sigil"]["calls"],
            json!(["call_tool Tool::\"read_file\"", "call_tool Tool::\"grep\""])
        );
        assert_eq!(allow["sigil"]["call_count"], 2);
        assert_eq!(allow["url"]["path"], "/mcp");
        assert_eq!(allow["http"]["request"]["method"], "POST");
        assert_eq!(allow["service"]["name"], "gw");
        assert_eq!(allow["log"]["level"], "info");
        assert_eq!(
            allow["message"],
            "allow spiffe://td.test/agent call_tool Tool::\"read_file\" (+1 more): permitted by policy"
        );
        // Tool arguments are not exported.
        assert!(!allow.to_string().contains("passwd"));

        let mut r = record("deny");
        r.calls.clear();
        r.jti = None;
        r.reason = "missing bearer token".into();
        let deny = Event::new(&r, "gw").ecs_json();
        assert_eq!(deny["event"]["outcome"], "failure");
        assert_eq!(deny["event"]["type"], json!(["denied"]));
        assert_eq!(deny["event"]["action"], "request");
        assert_eq!(deny["log"]["level"], "warn");
        assert!(deny["sigil"]["token"].is_null());
        assert!(deny["sigil"]["resource"].is_null());
        assert_eq!(
            deny["message"],
            "deny spiffe://td.test/agent POST /mcp: missing bearer token"
        );
    }

    #[test]
    fn settings_come_from_the_config_or_the_otel_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let none = env(&[]);
        assert_eq!(ExportConfig::resolve(None, None, &none), Ok(None));
        let c = ExportConfig::resolve(Some("stdout"), None, &none)
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.jsonl.as_deref(), c.otlp, c.service_name.as_str()),
            (Some("stdout"), None, "sigil-proxy")
        );
        let c = ExportConfig::resolve(None, Some("http://127.0.0.1:4318/"), &none)
            .unwrap()
            .unwrap();
        assert_eq!(c.otlp.unwrap().url, "http://127.0.0.1:4318/v1/logs");
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=a%20b,bad,x-tenant=t1",
            ),
            ("OTEL_SERVICE_NAME", "edge-gw"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=ignored,host.name=cam-3",
            ),
        ]);
        let c = ExportConfig::resolve(None, None, &vars).unwrap().unwrap();
        let o = c.otlp.unwrap();
        assert_eq!(o.url, "http://collector:4318/v1/logs");
        assert_eq!(
            o.headers,
            [
                ("api-key".to_owned(), "a b".to_owned()),
                ("x-tenant".into(), "t1".into())
            ]
        );
        assert_eq!(c.service_name, "edge-gw");
        assert_eq!(c.resource, [("host.name".to_owned(), "cam-3".to_owned())]);
        // The logs-specific variable is a full URL; the config key wins over both.
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://c:1/custom/logs"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:2"),
        ]);
        let url = |k: Option<&str>| {
            ExportConfig::resolve(None, k, &vars)
                .unwrap()
                .unwrap()
                .otlp
                .unwrap()
                .url
        };
        assert_eq!(url(None), "http://c:1/custom/logs");
        assert_eq!(url(Some("http://c:3")), "http://c:3/v1/logs");
        assert_eq!(url(Some("https://c:3")), "https://c:3/v1/logs");
        assert!(ExportConfig::resolve(None, Some("c:3"), &none).is_err());
        assert_eq!(
            ExportConfig::resolve(Some(""), None, &none),
            Err(ExportConfigError::AuditExport)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_durable_records_are_exported_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("export.jsonl");
        let cfg = ExportConfig::resolve(Some(out.to_str().unwrap()), None, &|_| None)
            .unwrap()
            .unwrap();
        let rec = |i: usize, decision| crate::audit::DecisionRecord {
            time_ms: 1_700_000_000_000,
            request_id: format!("r{i}").leak(),
            spiffe_id: "spiffe://td/a",
            cert_thumbprint: "t",
            jti: None,
            method: "POST",
            path: "/v1/chat/completions",
            calls: Vec::new(),
            policy_ids: &[],
            decision,
            reason: "r",
            direction: None,
            route: None,
            user: None,
            chain: None,
        };
        let (sink, _tasks) = spawn(cfg.clone(), ExportCounters::default()).unwrap();
        let log =
            crate::audit::AuditLog::open_with_export(&dir.path().join("audit.log"), Some(sink))
                .unwrap();
        for i in 0..5 {
            let d = if i % 2 == 0 { "allow" } else { "deny" };
            log.record(&rec(i, d)).await.unwrap();
        }
        // A segment that cannot be written exports nothing.
        let (sink, _tasks2) = spawn(cfg, ExportCounters::default()).unwrap();
        let full =
            crate::audit::AuditLog::open_with_export(std::path::Path::new("/dev/full"), Some(sink))
                .unwrap();
        assert!(full.record(&rec(9, "allow")).await.is_err());
        let mut lines = Vec::new();
        for _ in 0..100 {
            lines = std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect();
            if lines.len() >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let outcomes: Vec<&str> = lines
            .iter()
            .map(|l| l["event"]["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            ["success", "failure", "success", "failure", "success"]
        );
        assert_eq!(lines[4]["event"]["id"], "r4");
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 5);
    }

    /// An OTLP/HTTP receiver answering `statuses` in turn (then 200); the requests it got,
    /// decoded from protobuf.
    async fn receiver(
        statuses: Vec<u16>,
    ) -> (
        String,
        Arc<
            std::sync::Mutex<
                Vec<opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest>,
            >,
        >,
    ) {
        use prost::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let statuses = Arc::new(std::sync::Mutex::new(statuses));
        let seen = got.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (seen, statuses) = (seen.clone(), statuses.clone());
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (seen, statuses) = (seen.clone(), statuses.clone());
                        async move {
                            assert_eq!(req.uri().path(), "/v1/logs");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            assert_eq!(req.headers()["x-tenant"], "t1");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock().unwrap().push(
                                opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest::decode(body)
                                    .unwrap(),
                            );
                            let mut st = statuses.lock().unwrap();
                            let code = if st.is_empty() { 200 } else { st.remove(0) };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(code)
                                    .body(Full::new(hyper::body::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
                );
            }
        });
        (url, got)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_reach_an_otlp_receiver_as_protobuf_and_failures_are_counted() {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Pb;
        let (url, got) = receiver(vec![400]).await;
        let vars = move |k: &str| match k {
            "OTEL_EXPORTER_OTLP_HEADERS" => Some("x-tenant=t1".to_owned()),
            "OTEL_SERVICE_NAME" => Some("gw".to_owned()),
            _ => None,
        };
        let cfg = ExportConfig::resolve(None, Some(&url), &vars)
            .unwrap()
            .unwrap();
        let counters = ExportCounters::default();
        let (sink, _tasks) = spawn(cfg, counters.clone()).unwrap();
        let line = |decision: &str| {
            let json = serde_json::to_vec(&json!({
                "time_ms": 1_700_000_000_123u64, "request_id": "req-1",
                "spiffe_id": "spiffe://td.test/agent",
                "cert_thumbprint": "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0",
                "method": "POST", "path": "/mcp",
                "calls": [{"action": "call_tool", "resource_type": "Tool", "resource_id": "grep"}],
                "policy_ids": ["p1", "p2"], "decision": decision, "reason": "r"
            }))
            .unwrap();
            crate::audit::frame(&json)
        };
        // The first batch is refused (400): dropped and counted; the second arrives.
        sink.offer(vec![line("allow"), line("deny")]);
        let wait = |n: u64, c: &Counter| {
            let c = c.clone();
            async move {
                for _ in 0..200 {
                    if c.get() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                panic!("counter stayed at {}", c.get());
            }
        };
        wait(2, &counters.logs.dropped_failed).await;
        sink.offer(vec![line("deny")]);
        wait(1, &counters.logs.exported).await;
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 2);
        let rl = &got[1].resource_logs[0];
        let res = rl.resource.as_ref().unwrap();
        assert!(res.attributes.iter().any(|a| a.key == "service.name"
            && a.value.as_ref().and_then(|v| v.value.clone())
                == Some(Pb::StringValue("gw".into()))));
        let sl = &rl.scope_logs[0];
        assert_eq!(sl.scope.as_ref().unwrap().name, "sigil.audit");
        let r = &sl.log_records[0];
        assert_eq!(r.time_unix_nano, 1_700_000_000_123_000_000);
        assert_eq!((r.severity_number, r.severity_text.as_str()), (13, "WARN"));
        let attr = |k: &str| {
            r.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.as_ref())
                .and_then(|v| v.value.clone())
        };
        assert_eq!(
            attr("event.outcome"),
            Some(Pb::StringValue("failure".into()))
        );
        assert_eq!(attr("sigil.call_count"), Some(Pb::IntValue(1)));
        assert!(matches!(attr("sigil.policy_ids"), Some(Pb::ArrayValue(a)) if a.values.len() == 2));
        for k in NOT_OTLP_ATTRIBUTES {
            assert_eq!(attr(k), None, "{k}");
        }
        assert_eq!(counters.logs.dropped_failed.get(), 2);
    }

    #[tokio::test]
    async fn a_full_queue_drops_without_blocking() {
        let (tx, _rx) = mpsc::channel(1);
        let sink = ExportSink {
            tx,
            dropped: SignalCounters::default(),
        };
        sink.offer(vec![b"a".to_vec()]);
        sink.offer(vec![b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(sink.dropped.dropped_queue.get(), 2);
    }
}
