//! Traces of proxied requests over OTLP (HTTP/protobuf or gRPC), off unless configured.
//!
//! A sampled request gets a `SERVER` span `sigil.proxy.request` (SPIFFE ID, action,
//! resource, decision, reason, status) with child spans `sigil.token.validate`,
//! `sigil.policy.evaluate` (one per call decided) and `sigil.upstream` (`CLIENT`). A valid
//! W3C `traceparent` from the client is the parent (its `tracestate` is forwarded); an
//! absent or invalid one starts a new trace (an inbound `tracestate` is then dropped). The
//! upstream gets `traceparent` with the upstream span's id.
//!
//! The request path only fills a [`RequestTrace`] (instants, a few strings) and hands it to
//! the exporter task with `try_send` (a full queue drops the trace, counted and logged); the
//! task turns it into the SDK's spans and hands them to the SDK's batch span processor
//! (`OTEL_BSP_*`), which exports them with `opentelemetry-otlp`. With tracing off, the
//! request path tests one `Option` per step: no allocation, no clock read.
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, StringValue};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::otlp::{OtlpConfig, Signal, SignalCounters};

/// Finished traces waiting for the exporter task; beyond, dropped.
const QUEUE_TRACES: usize = 4096;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Which requests are recorded (`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Fraction of new traces recorded (`always_on` 1, `always_off` 0, `traceidratio`).
    pub ratio: f64,
    /// Follow the sampled flag of a valid inbound `traceparent` (`parentbased_*`, the
    /// default).
    pub parent_based: bool,
}

impl Sampler {
    fn from_env(name: Option<&str>, arg: Option<&str>) -> Result<Self, SamplerError> {
        let ratio = || -> Result<f64, SamplerError> {
            match arg {
                None => Ok(1.0),
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| SamplerError::Ratio(a.to_owned())),
            }
        };
        let (ratio, parent_based) = match name.map(str::trim) {
            None | Some("parentbased_always_on") => (1.0, true),
            Some("always_on") => (1.0, false),
            Some("always_off") => (0.0, false),
            Some("parentbased_always_off") => (0.0, true),
            Some("traceidratio") => (ratio()?, false),
            Some("parentbased_traceidratio") => (ratio()?, true),
            Some(other) => return Err(SamplerError::Unsupported(other.to_owned())),
        };
        Ok(Self {
            ratio,
            parent_based,
        })
    }

    /// Whether a request with this (valid) parent, in trace `trace_id`, is recorded.
    fn sample(&self, parent: Option<&TraceParent>, trace_id: &[u8; 16]) -> bool {
        if self.parent_based
            && let Some(p) = parent
        {
            return p.sampled();
        }
        if self.ratio >= 1.0 {
            return true;
        }
        // TraceIdRatioBased: the trace id's last 8 bytes against the ratio.
        let mut low = [0u8; 8];
        low.copy_from_slice(trace_id.get(8..).unwrap_or(&[0; 8]));
        (u64::from_be_bytes(low) as f64) < self.ratio * (u64::MAX as f64)
    }
}

/// Why the sampler variables were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplerError {
    #[error("OTEL_TRACES_SAMPLER_ARG: {0:?} is not in [0, 1]")]
    Ratio(String),
    #[error(
        "OTEL_TRACES_SAMPLER: {0:?} is not supported (always_on, always_off, traceidratio, \
         parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
    )]
    Unsupported(String),
}

/// Why the trace settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceConfigError {
    #[error("{0}")]
    Otlp(crate::otlp::EndpointError),
    #[error("{0}")]
    Sampler(SamplerError),
}

/// What the tracer does, resolved from the configuration and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    pub otlp: OtlpConfig,
    pub service_name: String,
    pub resource: Vec<(String, String)>,
    pub sampler: Sampler,
}

impl TraceConfig {
    /// `trace_otlp_endpoint` (a base URL), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (full
    /// URL), else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`; `Ok(None)` when none is set,
    /// or when the environment turns traces off (`OTEL_SDK_DISABLED=true`,
    /// `OTEL_TRACES_EXPORTER=none`) and the endpoint is not configured explicitly.
    pub fn resolve(
        trace_otlp_endpoint: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TraceConfigError> {
        let var = |k: &str| crate::otlp::var(env, k);
        if trace_otlp_endpoint.is_none() {
            let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim() == "true");
            let exporter_none = var("OTEL_TRACES_EXPORTER").is_some_and(|v| {
                v.split(',')
                    .map(str::trim)
                    .all(|e| e != "otlp" && !e.is_empty())
            });
            if disabled || exporter_none {
                return Ok(None);
            }
        }
        let Some(otlp) = OtlpConfig::resolve(Signal::Traces, trace_otlp_endpoint, env)
            .map_err(TraceConfigError::Otlp)?
        else {
            return Ok(None);
        };
        let sampler = Sampler::from_env(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
        .map_err(TraceConfigError::Sampler)?;
        let (service_name, resource) = crate::otlp::resource(env);
        Ok(Some(Self {
            otlp,
            service_name,
            resource,
            sampler,
        }))
    }
}

/// A W3C Trace Context `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value strictly (W3C Trace Context level 1): lowercase hex,
    /// version `00` exactly 55 characters (a higher version may carry more after a `-`),
    /// version `ff`, an all-zero trace id or parent id refused.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let head = b.get(..55)?;
        let version = hex_field::<1>(head.get(0..2)?)?;
        match version {
            [0x00] if b.len() != 55 => return None,
            [0xff] => return None,
            _ if b.len() > 55 && b.get(55) != Some(&b'-') => return None,
            _ => {}
        }
        if head.get(2) != Some(&b'-') || head.get(35) != Some(&b'-') || head.get(52) != Some(&b'-')
        {
            return None;
        }
        let trace_id = hex_field::<16>(head.get(3..35)?)?;
        let parent_id = hex_field::<8>(head.get(36..52)?)?;
        let [flags] = hex_field::<1>(head.get(53..55)?)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The one `traceparent` of a request (two or more are invalid, like a malformed one).
    pub fn from_headers(h: &HeaderMap) -> Option<Self> {
        let mut all = h.get_all(TRACEPARENT).iter();
        let (Some(v), None) = (all.next(), all.next()) else {
            return None;
        };
        Self::parse(v.to_str().ok()?)
    }

    fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// `00-<trace id>-<parent id>-<flags>`.
    pub fn format(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.parent_id),
            self.flags
        )
    }
}

/// `N` bytes from `2N` lowercase hex digits.
fn hex_field<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        for b in id.iter_mut() {
            *b = rand::random();
        }
        if id != [0; N] {
            return id;
        }
    }
}

/// A timed step of a request (a child span).
#[derive(Debug, Clone)]
struct Step {
    span_id: [u8; 8],
    start: Instant,
    end: Instant,
    attributes: Vec<KeyValue>,
    error: Option<String>,
}

/// One sampled request, filled on the request path and exported when it is finished.
#[derive(Debug)]
pub struct RequestTrace {
    trace_id: [u8; 16],
    /// The client's span, from its `traceparent`.
    parent: Option<[u8; 8]>,
    span_id: [u8; 8],
    flags: u8,
    tracestate: Option<String>,
    start: Instant,
    start_unix: SystemTime,
    end: Option<Instant>,
    method: String,
    path: String,
    spiffe_id: String,
    request_id: String,
    decision: &'static str,
    reason: String,
    jti: Option<String>,
    /// The user a delegated token acts for, and the chain of workloads acting.
    user: Option<String>,
    chain: Vec<String>,
    calls: Vec<(&'static str, &'static str, String)>,
    policy_ids: Vec<String>,
    status: u16,
    steps: Vec<(&'static str, SpanKind, Step)>,
    /// The upstream span (its id is in the upstream's `traceparent`).
    upstream: Option<Step>,
}

impl RequestTrace {
    /// The spans this trace becomes.
    fn span_count(&self) -> u64 {
        1 + self.steps.len() as u64 + u64::from(self.upstream.is_some())
    }

    /// The request id (also `x-sigil-request-id` and the audit record's).
    pub(crate) fn request_id(&mut self, id: &str) {
        id.clone_into(&mut self.request_id);
    }

    /// The decision as the audit record holds it.
    pub(crate) fn decided(&mut self, r: &crate::audit::DecisionRecord<'_>) {
        self.decision = r.decision;
        r.reason.clone_into(&mut self.reason);
        self.jti.clone_from(&r.jti);
        self.user.clone_from(&r.user);
        self.chain = r.chain.clone().unwrap_or_default();
        self.calls = r
            .calls
            .iter()
            .map(|c| (c.action, c.resource_type, c.resource_id.clone()))
            .collect();
        r.policy_ids.clone_into(&mut self.policy_ids);
    }

    /// Refused after the decision (the audit record could not be written).
    pub(crate) fn refused(&mut self, reason: &str) {
        self.decision = "deny";
        reason.clone_into(&mut self.reason);
    }

    /// Forwarded without token or policy (`enforce = "mtls-only"`).
    pub(crate) fn mtls_only(&mut self) {
        self.decision = "allow";
        "mtls-only".clone_into(&mut self.reason);
    }

    /// The token check that started at `started` just ended.
    pub(crate) fn token_checked(
        &mut self,
        started: Option<Instant>,
        cache_hit: bool,
        error: Option<String>,
    ) {
        let end = Instant::now();
        self.steps.push((
            "sigil.token.validate",
            SpanKind::Internal,
            Step {
                span_id: random_id(),
                start: started.unwrap_or(end),
                end,
                attributes: vec![KeyValue::new(
                    "sigil.token.cache",
                    if cache_hit { "hit" } else { "miss" },
                )],
                error,
            },
        ));
    }

    /// One policy decision that started at `started` just ended.
    pub(crate) fn policy_evaluated(
        &mut self,
        started: Option<Instant>,
        call: &crate::extract::Call,
        decision: Result<&sigil_policy::Decision, String>,
    ) {
        let end = Instant::now();
        let mut attributes = vec![
            KeyValue::new("sigil.action", call.action),
            KeyValue::new("sigil.resource.type", call.resource_type),
            KeyValue::new("sigil.resource.id", call.resource_id.clone()),
        ];
        let error = match decision {
            Ok(d) => {
                attributes.push(KeyValue::new(
                    "sigil.decision",
                    if d.allow { "allow" } else { "deny" },
                ));
                attributes.push(strings("sigil.policy_ids", &d.policy_ids));
                None
            }
            Err(e) => {
                attributes.push(KeyValue::new("sigil.decision", "deny"));
                Some(e)
            }
        };
        self.steps.push((
            "sigil.policy.evaluate",
            SpanKind::Internal,
            Step {
                span_id: random_id(),
                start: started.unwrap_or(end),
                end,
                attributes,
                error,
            },
        ));
    }

    /// Sets the upstream request's `traceparent` (the upstream span's id) and, for a new
    /// trace, removes the client's `tracestate`. Call right before the request is sent.
    pub(crate) fn inject(&mut self, headers: &mut HeaderMap, method: &http::Method) {
        let span_id = random_id();
        let tp = TraceParent {
            trace_id: self.trace_id,
            parent_id: span_id,
            flags: self.flags,
        };
        headers.remove(TRACEPARENT);
        if self.parent.is_none() {
            headers.remove(TRACESTATE);
        }
        if let Ok(v) = HeaderValue::from_str(&tp.format()) {
            headers.insert(HeaderName::from_static(TRACEPARENT), v);
        }
        let now = Instant::now();
        self.upstream = Some(Step {
            span_id,
            start: now,
            end: now,
            attributes: vec![KeyValue::new(
                "http.request.method",
                method.as_str().to_owned(),
            )],
            error: None,
        });
    }

    /// The upstream answered with `status` (response head) or failed.
    pub(crate) fn upstream_done(&mut self, result: Result<u16, String>) {
        if let Some(u) = self.upstream.as_mut() {
            u.end = Instant::now();
            match result {
                Ok(status) => {
                    u.attributes.push(KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    ));
                    if status >= 500 {
                        u.error = Some(format!("HTTP {status}"));
                    }
                }
                Err(e) => u.error = Some(e),
            }
        }
    }

    fn time(&self, t: Instant) -> SystemTime {
        self.start_unix + t.saturating_duration_since(self.start)
    }

    fn span(
        &self,
        scope: &InstrumentationScope,
        (name, kind): (&'static str, SpanKind),
        (span_id, parent): ([u8; 8], Option<[u8; 8]>),
        (start, end): (Instant, Instant),
        attributes: Vec<KeyValue>,
        error: Option<&str>,
    ) -> SpanData {
        let state = self
            .tracestate
            .as_deref()
            .and_then(|t| t.parse::<TraceState>().ok())
            .unwrap_or_default();
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(self.trace_id),
                SpanId::from_bytes(span_id),
                TraceFlags::new(self.flags),
                false,
                state,
            ),
            parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            // Only the request's span has a remote parent (the client's).
            parent_span_is_remote: kind == SpanKind::Server && parent.is_some(),
            span_kind: kind,
            name: Cow::Borrowed(name),
            start_time: self.time(start),
            end_time: self.time(end),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match error {
                Some(m) => Status::error(m.to_owned()),
                None => Status::Unset,
            },
            instrumentation_scope: scope.clone(),
        }
    }

    /// The root span's attributes.
    fn attributes(&self) -> Vec<KeyValue> {
        let mut a = vec![
            KeyValue::new("sigil.spiffe_id", self.spiffe_id.clone()),
            KeyValue::new("sigil.request_id", self.request_id.clone()),
            KeyValue::new("sigil.decision", self.decision),
            KeyValue::new("sigil.reason", self.reason.clone()),
            KeyValue::new("http.request.method", self.method.clone()),
            KeyValue::new("url.path", self.path.clone()),
            KeyValue::new("http.response.status_code", i64::from(self.status)),
        ];
        if let Some((action, rtype, rid)) = self.calls.first() {
            a.push(KeyValue::new("sigil.action", *action));
            a.push(KeyValue::new("sigil.resource.type", *rtype));
            a.push(KeyValue::new("sigil.resource.id", rid.clone()));
        }
        a.push(KeyValue::new(
            "sigil.call_count",
            i64::try_from(self.calls.len()).unwrap_or(i64::MAX),
        ));
        if self.calls.len() > 1 {
            let all: Vec<String> = self
                .calls
                .iter()
                .map(|(a, t, id)| format!("{a} {t}::{id:?}"))
                .collect();
            a.push(strings("sigil.calls", &all));
        }
        if let Some(jti) = &self.jti {
            a.push(KeyValue::new("sigil.token.jti", jti.clone()));
        }
        if let Some(user) = &self.user {
            a.push(KeyValue::new("enduser.id", user.clone()));
            a.push(strings("sigil.delegation.chain", &self.chain));
        }
        if !self.policy_ids.is_empty() {
            a.push(strings("sigil.policy_ids", &self.policy_ids));
        }
        a
    }

    /// The spans of this request: the request's, then its steps'.
    pub fn spans(self: Box<Self>, scope: &InstrumentationScope) -> Vec<SpanData> {
        let end = self.end.unwrap_or(self.start);
        let error = (self.status >= 500).then(|| {
            if self.reason.is_empty() || self.decision == "allow" {
                format!("HTTP {}", self.status)
            } else {
                self.reason.clone()
            }
        });
        let mut out = Vec::with_capacity(2 + self.steps.len());
        out.push(self.span(
            scope,
            ("sigil.proxy.request", SpanKind::Server),
            (self.span_id, self.parent),
            (self.start, end),
            self.attributes(),
            error.as_deref(),
        ));
        let steps = self
            .steps
            .iter()
            .map(|(name, kind, s)| (*name, kind.clone(), s))
            .chain(
                self.upstream
                    .iter()
                    .map(|s| ("sigil.upstream", SpanKind::Client, s)),
            );
        for (name, kind, s) in steps {
            out.push(self.span(
                scope,
                (name, kind),
                (s.span_id, Some(self.span_id)),
                (s.start, s.end),
                s.attributes.clone(),
                s.error.as_deref(),
            ));
        }
        out
    }
}

/// A string-array attribute.
fn strings(key: &'static str, values: &[String]) -> KeyValue {
    KeyValue::new(
        key,
        opentelemetry::Value::Array(
            values
                .iter()
                .map(|v| StringValue::from(v.clone()))
                .collect::<Vec<_>>()
                .into(),
        ),
    )
}

/// The request path's end of the tracer.
#[derive(Clone)]
pub struct Tracer {
    tx: mpsc::Sender<Box<RequestTrace>>,
    sampler: Sampler,
    counters: SignalCounters,
}

impl Tracer {
    /// Starts a request's trace, or `None` when it is not sampled (its headers then pass to
    /// the upstream untouched).
    pub(crate) fn begin(
        &self,
        headers: &HeaderMap,
        method: &http::Method,
        path: &str,
        spiffe_id: &str,
    ) -> Option<Box<RequestTrace>> {
        let parent = TraceParent::from_headers(headers);
        let trace_id = parent.map_or_else(random_id, |p| p.trace_id);
        if !self.sampler.sample(parent.as_ref(), &trace_id) {
            return None;
        }
        let tracestate = parent
            .and_then(|_| {
                let all: Vec<&str> = headers
                    .get_all(TRACESTATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!all.is_empty()).then(|| all.join(","))
            })
            .filter(|s| s.len() <= 512);
        Some(Box::new(RequestTrace {
            trace_id,
            parent: parent.map(|p| p.parent_id),
            span_id: random_id(),
            // Recorded, so sampled downstream too.
            flags: parent.map_or(0, |p| p.flags) | 1,
            tracestate,
            start: Instant::now(),
            start_unix: SystemTime::now(),
            end: None,
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            request_id: String::new(),
            decision: "deny",
            reason: String::new(),
            jti: None,
            user: None,
            chain: Vec::new(),
            calls: Vec::new(),
            policy_ids: Vec::new(),
            status: 0,
            steps: Vec::new(),
            upstream: None,
        }))
    }

    /// Ends the request's span (its response head is ready) and queues the trace; never
    /// blocks: a full queue drops it (counted, logged every 1,000).
    pub(crate) fn finish(&self, mut t: Box<RequestTrace>, status: http::StatusCode) {
        t.end = Some(Instant::now());
        t.status = status.as_u16();
        if let Err(e) = self.tx.try_send(t) {
            let spans = match &e {
                mpsc::error::TrySendError::Full(t) | mpsc::error::TrySendError::Closed(t) => {
                    t.span_count()
                }
            };
            let before = self.counters.dropped_queue.inc_by(spans);
            if before.is_multiple_of(1000) {
                tracing::warn!(
                    dropped_total = before + 1,
                    "traces: export queue full; trace dropped"
                );
            }
        }
    }
}

/// Ends the SDK's batch processor off the runtime's threads (its last export may need them).
struct Processor(Option<Arc<BatchSpanProcessor>>);

impl Drop for Processor {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            std::thread::spawn(move || {
                let _ = p.shutdown_with_timeout(Duration::from_secs(5));
            });
        }
    }
}

/// Starts the trace exporter (inside the runtime); the tracer for the request path and the
/// task (abort to stop).
pub fn spawn(
    cfg: TraceConfig,
    counters: SignalCounters,
) -> Result<(Tracer, JoinHandle<()>), crate::otlp::BuildError> {
    let mut processor =
        BatchSpanProcessor::builder(cfg.otlp.span_exporter(counters.clone())?).build();
    processor.set_resource(&crate::otlp::sdk_resource(&cfg.service_name, &cfg.resource));
    let (tx, rx) = mpsc::channel(QUEUE_TRACES);
    let task = tokio::spawn(export_loop(Processor(Some(Arc::new(processor))), rx));
    Ok((
        Tracer {
            tx,
            sampler: cfg.sampler,
            counters,
        },
        task,
    ))
}

/// Hands each finished trace's spans to the SDK's batch processor, which exports them.
async fn export_loop(processor: Processor, mut rx: mpsc::Receiver<Box<RequestTrace>>) {
    let scope = InstrumentationScope::builder("sigil.proxy")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    while let Some(t) = rx.recv().await {
        if let Some(p) = &processor.0 {
            for span in t.spans(&scope) {
                p.on_end(span);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_parsed_strictly() {
        let tp = TraceParent::parse(VALID).unwrap();
        assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.parent_id), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.format(), VALID);
        let unsampled = TraceParent::parse(&VALID.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
        // A higher version may carry more fields after a dash.
        assert!(TraceParent::parse(&format!("{}-extra", VALID.replacen("00", "01", 1))).is_some());
        for bad in [
            "",
            "00",
            &VALID.to_uppercase(),
            &VALID.replacen("00", "ff", 1),
            &format!("{VALID}-extra"),
            &format!("{VALID}0"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
            &VALID.replacen('4', "\u{e9}", 1),
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        let mut h = HeaderMap::new();
        assert_eq!(TraceParent::from_headers(&h), None);
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(TraceParent::from_headers(&h).is_some());
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(
            TraceParent::from_headers(&h),
            None,
            "two traceparent headers"
        );
    }

    fn tracer(sampler: Sampler) -> (Tracer, mpsc::Receiver<Box<RequestTrace>>) {
        let (tx, rx) = mpsc::channel(4);
        (
            Tracer {
                tx,
                sampler,
                counters: SignalCounters::default(),
            },
            rx,
        )
    }

    const ON: Sampler = Sampler {
        ratio: 1.0,
        parent_based: true,
    };

    #[test]
    fn a_valid_parent_is_continued_and_an_invalid_one_replaced() {
        let (t, _rx) = tracer(ON);
        let post = http::Method::POST;
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let mut tr = t.begin(&h, &post, "/mcp", "spiffe://td/a").unwrap();
        tr.inject(&mut h, &post);
        let sent = TraceParent::from_headers(&h).unwrap();
        assert_eq!(
            hex::encode(sent.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            Some(sent.parent_id),
            tr.upstream.as_ref().map(|u| u.span_id)
        );
        assert_ne!(sent.parent_id, tr.span_id);
        assert_eq!(sent.flags, 1);
        assert_eq!(h[TRACESTATE], "vendor=x");
        assert_eq!(tr.tracestate.as_deref(), Some("vendor=x"));

        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-zz-yy-01"));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let mut tr = t.begin(&h, &post, "/mcp", "spiffe://td/a").unwrap();
        assert_eq!(tr.parent, None);
        tr.inject(&mut h, &post);
        let sent = TraceParent::from_headers(&h).unwrap();
        assert_eq!(sent.trace_id, tr.trace_id);
        assert!(
            !h.contains_key(TRACESTATE),
            "a new trace drops the client's tracestate"
        );
    }

    #[test]
    fn sampling_follows_the_parent_or_the_ratio() {
        let post = http::Method::POST;
        let unsampled = VALID.replace("-01", "-00");
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_str(&unsampled).unwrap());
        let (t, _rx) = tracer(ON);
        assert!(t.begin(&h, &post, "/", "s").is_none());
        assert!(t.begin(&HeaderMap::new(), &post, "/", "s").is_some());
        let (off, _rx) = tracer(Sampler {
            ratio: 0.0,
            parent_based: false,
        });
        assert!(off.begin(&HeaderMap::new(), &post, "/", "s").is_none());
        assert_eq!(Sampler::from_env(None, None), Ok(ON));
        assert_eq!(
            Sampler::from_env(Some("traceidratio"), Some("0.25")),
            Ok(Sampler {
                ratio: 0.25,
                parent_based: false
            })
        );
        assert_eq!(
            Sampler::from_env(Some("traceidratio"), Some("2")),
            Err(SamplerError::Ratio("2".into()))
        );
        assert_eq!(
            Sampler::from_env(Some("jaeger_remote"), None),
            Err(SamplerError::Unsupported("jaeger_remote".into()))
        );
    }

    #[test]
    fn spans_have_the_otlp_json_shape() {
        let (t, mut rx) = tracer(ON);
        let post = http::Method::POST;
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let mut tr = t
            .begin(&h, &post, "/v1/chat/completions", "spiffe://td/cam")
            .unwrap();
        tr.request_id("req-1");
        let started = Some(Instant::now());
        tr.token_checked(started, true, None);
        let call = crate::extract::Call {
            action: "invoke",
            resource_type: "Model",
            resource_id: "m1".into(),
            arguments: None,
        };
        tr.policy_evaluated(started, &call, Err("no".into()));
        tr.decided(&crate::audit::DecisionRecord {
            time_ms: 0,
            request_id: "req-1",
            spiffe_id: "spiffe://td/cam",
            cert_thumbprint: "t",
            jti: Some("j1".into()),
            method: "POST",
            path: "/v1/chat/completions",
            calls: vec![call],
            policy_ids: &["p1".into()],
            decision: "allow",
            reason: "permitted by policy",
            direction: None,
            route: None,
            user: None,
            chain: None,
        });
        tr.inject(&mut h, &post);
        tr.upstream_done(Ok(503));
        t.finish(tr, http::StatusCode::SERVICE_UNAVAILABLE);
        let tr = rx.try_recv().unwrap();
        let scope = InstrumentationScope::builder("sigil.proxy").build();
        let spans = tr.spans(&scope);
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(
            names,
            [
                "sigil.proxy.request",
                "sigil.token.validate",
                "sigil.policy.evaluate",
                "sigil.upstream"
            ]
        );
        let root = &spans[0];
        assert_eq!(
            root.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(root.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(root.parent_span_is_remote);
        assert_eq!(root.span_kind, SpanKind::Server);
        assert_eq!(root.status, Status::error("HTTP 503"));
        assert!(root.start_time > SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert!(root.end_time >= root.start_time);
        let attr = |s: &SpanData, k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key.as_str() == k)
                .map(|a| a.value.clone())
        };
        assert_eq!(
            attr(root, "sigil.spiffe_id"),
            Some("spiffe://td/cam".into())
        );
        assert_eq!(attr(root, "sigil.action"), Some("invoke".into()));
        assert_eq!(attr(root, "sigil.resource.id"), Some("m1".into()));
        assert_eq!(attr(root, "sigil.decision"), Some("allow".into()));
        assert_eq!(
            attr(root, "http.response.status_code"),
            Some(opentelemetry::Value::I64(503))
        );
        assert_eq!(
            attr(root, "sigil.policy_ids"),
            Some(opentelemetry::Value::Array(
                vec![StringValue::from("p1")].into()
            ))
        );
        for child in &spans[1..] {
            assert_eq!(child.span_context.trace_id(), root.span_context.trace_id());
            assert_eq!(child.parent_span_id, root.span_context.span_id());
            assert!(!child.parent_span_is_remote);
        }
        assert_eq!(attr(&spans[1], "sigil.token.cache"), Some("hit".into()));
        assert_eq!(spans[2].status, Status::error("no"));
        assert_eq!(spans[3].span_kind, SpanKind::Client);
        assert_eq!(
            spans[3].span_context.span_id().to_string(),
            hex::encode(TraceParent::from_headers(&h).unwrap().parent_id)
        );
        // The token itself is nowhere.
        assert!(!format!("{spans:?}").contains("Bearer"));
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
        assert_eq!(TraceConfig::resolve(None, &env(&[])), Ok(None));
        let c = TraceConfig::resolve(Some("http://127.0.0.1:4318/"), &env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(c.otlp.url, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(c.sampler, ON);
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
            ("OTEL_SERVICE_NAME", "gw"),
        ]);
        let c = TraceConfig::resolve(None, &vars).unwrap().unwrap();
        assert_eq!(c.otlp.url, "http://c:4318/v1/traces");
        assert_eq!(c.otlp.headers, [("b".to_owned(), "2".to_owned())]);
        assert_eq!(c.service_name, "gw");
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:1/t"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:2"),
        ]);
        let c = TraceConfig::resolve(None, &vars).unwrap().unwrap();
        assert_eq!(c.otlp.url, "http://c:1/t");
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let vars = move |k: &str| match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:2".to_owned()),
                k if k == off.0 => Some(off.1.to_owned()),
                _ => None,
            };
            assert_eq!(TraceConfig::resolve(None, &vars), Ok(None), "{off:?}");
            // An endpoint given explicitly still turns traces on.
            assert!(
                TraceConfig::resolve(Some("http://c:3"), &vars)
                    .unwrap()
                    .is_some()
            );
        }
        assert!(TraceConfig::resolve(Some("ftp://c:3"), &env(&[])).is_err());
        let c = TraceConfig::resolve(Some("https://c:3"), &env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(c.otlp.url, "https://c:3/v1/traces");
        // gRPC takes the collector's address as it is.
        let grpc = env(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ]);
        let c = TraceConfig::resolve(None, &grpc).unwrap().unwrap();
        assert_eq!(c.otlp.url, "http://c:4317");
        assert_eq!(c.otlp.protocol, crate::otlp::Protocol::Grpc);
        assert!(c.otlp.gzip);
        for bad in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
        ] {
            let vars = move |k: &str| match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:2".to_owned()),
                k if k == bad.0 => Some(bad.1.to_owned()),
                _ => None,
            };
            assert!(TraceConfig::resolve(None, &vars).is_err(), "{bad:?}");
        }
    }
}
