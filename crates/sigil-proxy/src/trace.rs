//! Traces of proxied requests over OTLP/HTTP (JSON encoding), off unless configured.
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
//! JSON is built and posted there, batched. With tracing off, the request path tests one
//! `Option` per step: no allocation, no clock read.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::otlp::{OtlpConfig, OtlpPoster, Signal};

/// Finished traces waiting for the exporter; beyond, dropped.
const QUEUE_TRACES: usize = 4096;
/// Most traces (of up to a few spans each) per OTLP request.
pub const MAX_BATCH: usize = 256;
/// Longest a finished trace waits for its batch to fill.
pub const LINGER: Duration = Duration::from_secs(1);

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// OTLP span kinds.
const KIND_INTERNAL: u8 = 1;
const KIND_SERVER: u8 = 2;
const KIND_CLIENT: u8 = 3;
/// OTLP status codes.
const STATUS_UNSET: u8 = 0;
const STATUS_ERROR: u8 = 2;

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
    ) -> Result<Option<Self>, String> {
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
        let Some(url) = crate::otlp::signal_url(Signal::Traces, trace_otlp_endpoint, env)
            .map_err(|e| format!("trace_otlp_endpoint: {e}"))?
        else {
            return Ok(None);
        };
        let sampler = Sampler::from_env(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let (service_name, resource) = crate::otlp::resource(env);
        Ok(Some(Self {
            otlp: OtlpConfig {
                url,
                headers: crate::otlp::signal_headers(Signal::Traces, env),
            },
            service_name,
            resource,
            sampler,
        }))
    }

    /// The protocol variables name one the proxy does not speak (it always sends
    /// `http/json`): the warning to log.
    pub fn protocol_warning(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        let p = crate::otlp::var(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| crate::otlp::var(env, "OTEL_EXPORTER_OTLP_PROTOCOL"))?;
        (p.trim() != "http/json").then(|| {
            format!("OTEL_EXPORTER_OTLP_PROTOCOL={p}: traces are sent as http/json (the only protocol supported)")
        })
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
    attributes: Vec<(&'static str, Value)>,
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
    start_unix_nanos: u128,
    end: Option<Instant>,
    method: String,
    path: String,
    spiffe_id: String,
    request_id: String,
    decision: &'static str,
    reason: String,
    jti: Option<String>,
    calls: Vec<(&'static str, &'static str, String)>,
    policy_ids: Vec<String>,
    status: u16,
    steps: Vec<(&'static str, u8, Step)>,
    /// The upstream span (its id is in the upstream's `traceparent`).
    upstream: Option<Step>,
}

impl RequestTrace {
    /// The request id (also `x-sigil-request-id` and the audit record's).
    pub(crate) fn request_id(&mut self, id: &str) {
        id.clone_into(&mut self.request_id);
    }

    /// The decision as the audit record holds it.
    pub(crate) fn decided(&mut self, r: &crate::audit::DecisionRecord) {
        self.decision = r.decision;
        self.reason.clone_from(&r.reason);
        self.jti.clone_from(&r.jti);
        self.calls = r
            .calls
            .iter()
            .map(|c| (c.action, c.resource_type, c.resource_id.clone()))
            .collect();
        self.policy_ids.clone_from(&r.policy_ids);
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
            KIND_INTERNAL,
            Step {
                span_id: random_id(),
                start: started.unwrap_or(end),
                end,
                attributes: vec![(
                    "sigil.token.cache",
                    Value::from(if cache_hit { "hit" } else { "miss" }),
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
            ("sigil.action", Value::from(call.action)),
            ("sigil.resource.type", Value::from(call.resource_type)),
            ("sigil.resource.id", Value::from(call.resource_id.as_str())),
        ];
        let error = match decision {
            Ok(d) => {
                attributes.push((
                    "sigil.decision",
                    Value::from(if d.allow { "allow" } else { "deny" }),
                ));
                attributes.push(("sigil.policy_ids", Value::from(d.policy_ids.clone())));
                None
            }
            Err(e) => {
                attributes.push(("sigil.decision", Value::from("deny")));
                Some(e)
            }
        };
        self.steps.push((
            "sigil.policy.evaluate",
            KIND_INTERNAL,
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
            attributes: vec![("http.request.method", Value::from(method.as_str()))],
            error: None,
        });
    }

    /// The upstream answered with `status` (response head) or failed.
    pub(crate) fn upstream_done(&mut self, result: Result<u16, String>) {
        if let Some(u) = self.upstream.as_mut() {
            u.end = Instant::now();
            match result {
                Ok(status) => {
                    u.attributes
                        .push(("http.response.status_code", Value::from(status)));
                    if status >= 500 {
                        u.error = Some(format!("HTTP {status}"));
                    }
                }
                Err(e) => u.error = Some(e),
            }
        }
    }

    fn nanos(&self, t: Instant) -> String {
        let since = t.saturating_duration_since(self.start).as_nanos();
        (self.start_unix_nanos + since).to_string()
    }

    fn span(
        &self,
        name: &str,
        kind: u8,
        (span_id, parent): (&[u8; 8], Option<&[u8; 8]>),
        (start, end): (Instant, Instant),
        attributes: &[(&'static str, Value)],
        error: Option<&str>,
    ) -> Value {
        let mut s = json!({
            "traceId": hex::encode(self.trace_id),
            "spanId": hex::encode(span_id),
            "name": name,
            "kind": kind,
            "startTimeUnixNano": self.nanos(start),
            "endTimeUnixNano": self.nanos(end),
            "attributes": attributes
                .iter()
                .map(|(k, v)| json!({ "key": k, "value": any_value(v) }))
                .collect::<Vec<_>>(),
            "status": match error {
                Some(m) => json!({ "code": STATUS_ERROR, "message": m }),
                None => json!({ "code": STATUS_UNSET }),
            },
        });
        if let Some(o) = s.as_object_mut() {
            if let Some(p) = parent {
                o.insert("parentSpanId".into(), Value::from(hex::encode(p)));
            }
            if let Some(ts) = &self.tracestate {
                o.insert("traceState".into(), Value::from(ts.as_str()));
            }
        }
        s
    }

    /// The root span's attributes.
    fn attributes(&self) -> Vec<(&'static str, Value)> {
        let mut a = vec![
            ("sigil.spiffe_id", Value::from(self.spiffe_id.as_str())),
            ("sigil.request_id", Value::from(self.request_id.as_str())),
            ("sigil.decision", Value::from(self.decision)),
            ("sigil.reason", Value::from(self.reason.as_str())),
            ("http.request.method", Value::from(self.method.as_str())),
            ("url.path", Value::from(self.path.as_str())),
            ("http.response.status_code", Value::from(self.status)),
        ];
        if let Some((action, rtype, rid)) = self.calls.first() {
            a.push(("sigil.action", Value::from(*action)));
            a.push(("sigil.resource.type", Value::from(*rtype)));
            a.push(("sigil.resource.id", Value::from(rid.as_str())));
        }
        a.push(("sigil.call_count", Value::from(self.calls.len())));
        if self.calls.len() > 1 {
            let all: Vec<String> = self
                .calls
                .iter()
                .map(|(a, t, id)| format!("{a} {t}::{id:?}"))
                .collect();
            a.push(("sigil.calls", Value::from(all)));
        }
        if let Some(jti) = &self.jti {
            a.push(("sigil.token.jti", Value::from(jti.as_str())));
        }
        if !self.policy_ids.is_empty() {
            a.push(("sigil.policy_ids", Value::from(self.policy_ids.clone())));
        }
        a
    }

    /// The OTLP spans of this request: the request's, then its steps'.
    pub fn spans(&self) -> Vec<Value> {
        let end = self.end.unwrap_or(self.start);
        let error = (self.status >= 500).then(|| {
            if self.reason.is_empty() || self.decision == "allow" {
                format!("HTTP {}", self.status)
            } else {
                self.reason.clone()
            }
        });
        let mut out = vec![self.span(
            "sigil.proxy.request",
            KIND_SERVER,
            (&self.span_id, self.parent.as_ref()),
            (self.start, end),
            &self.attributes(),
            error.as_deref(),
        )];
        let steps = self
            .steps
            .iter()
            .map(|(name, kind, s)| (*name, *kind, s))
            .chain(
                self.upstream
                    .iter()
                    .map(|s| ("sigil.upstream", KIND_CLIENT, s)),
            );
        for (name, kind, s) in steps {
            out.push(self.span(
                name,
                kind,
                (&s.span_id, Some(&self.span_id)),
                (s.start, s.end),
                &s.attributes,
                s.error.as_deref(),
            ));
        }
        out
    }
}

/// The OTLP `AnyValue` of a JSON value (int64 as a decimal string).
fn any_value(v: &Value) -> Value {
    match v {
        Value::Bool(b) => json!({ "boolValue": b }),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({ "intValue": n.to_string() }),
        Value::Number(n) => json!({ "doubleValue": n }),
        Value::Array(items) => json!({
            "arrayValue": { "values": items.iter().map(any_value).collect::<Vec<_>>() }
        }),
        Value::String(s) => json!({ "stringValue": s }),
        other => json!({ "stringValue": other.to_string() }),
    }
}

/// Counts of what the tracer exported or dropped.
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Traces dropped because the queue was full.
    pub dropped_queue: AtomicU64,
    /// Spans accepted by the receiver.
    pub spans_sent: AtomicU64,
    /// Spans dropped after their batch failed.
    pub spans_dropped: AtomicU64,
}

/// The request path's end of the tracer.
pub struct Tracer {
    tx: mpsc::Sender<Box<RequestTrace>>,
    sampler: Sampler,
    stats: Arc<TraceStats>,
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
        let start_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Some(Box::new(RequestTrace {
            trace_id,
            parent: parent.map(|p| p.parent_id),
            span_id: random_id(),
            // Recorded, so sampled downstream too.
            flags: parent.map_or(0, |p| p.flags) | 1,
            tracestate,
            start: Instant::now(),
            start_unix_nanos,
            end: None,
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            request_id: String::new(),
            decision: "deny",
            reason: String::new(),
            jti: None,
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
        if self.tx.try_send(t).is_err() {
            let before = self.stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
            if before.is_multiple_of(1000) {
                tracing::warn!(
                    dropped_total = before + 1,
                    "traces: export queue full; trace dropped"
                );
            }
        }
    }
}

/// Starts the trace exporter; the tracer for the request path and the task (abort to stop).
pub fn spawn(cfg: TraceConfig) -> anyhow::Result<(Tracer, JoinHandle<()>)> {
    let poster = OtlpPoster::new(&cfg.otlp)?;
    let resource = crate::otlp::resource_json(&cfg.service_name, &cfg.resource);
    let stats = Arc::new(TraceStats::default());
    let (tx, rx) = mpsc::channel(QUEUE_TRACES);
    let task = tokio::spawn(export_loop(poster, resource, rx, stats.clone()));
    Ok((
        Tracer {
            tx,
            sampler: cfg.sampler,
            stats,
        },
        task,
    ))
}

/// The `ExportTraceServiceRequest` of `traces`.
pub fn request(resource: &Value, traces: &[Box<RequestTrace>]) -> Value {
    let spans: Vec<Value> = traces.iter().flat_map(|t| t.spans()).collect();
    json!({
        "resourceSpans": [{
            "resource": resource,
            "scopeSpans": [{
                "scope": { "name": "sigil.proxy", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }],
    })
}

async fn export_loop(
    poster: OtlpPoster,
    resource: Value,
    mut rx: mpsc::Receiver<Box<RequestTrace>>,
    stats: Arc<TraceStats>,
) {
    let mut pending: Vec<Box<RequestTrace>> = Vec::new();
    let mut deadline = tokio::time::Instant::now();
    loop {
        let open = tokio::select! {
            got = rx.recv() => match got {
                Some(t) => {
                    if pending.is_empty() {
                        deadline = tokio::time::Instant::now() + LINGER;
                    }
                    pending.push(t);
                    true
                }
                None => false,
            },
            () = tokio::time::sleep_until(deadline), if !pending.is_empty() => true,
        };
        let due = !open || pending.len() >= MAX_BATCH || tokio::time::Instant::now() >= deadline;
        while due && !pending.is_empty() {
            let take = pending.len().min(MAX_BATCH);
            let batch: Vec<Box<RequestTrace>> = pending.drain(..take).collect();
            let n: u64 = batch
                .iter()
                .map(|t| 1 + t.steps.len() as u64 + u64::from(t.upstream.is_some()))
                .sum();
            let body = match serde_json::to_vec(&request(&resource, &batch)) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    tracing::warn!(error = %e, "traces: OTLP body not serialized");
                    continue;
                }
            };
            match poster.post_retrying(body).await {
                Ok(()) => {
                    stats.spans_sent.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    let total = stats.spans_dropped.fetch_add(n, Ordering::Relaxed) + n;
                    tracing::warn!(error = %e.message, spans = n, dropped_total = total, "traces: OTLP batch dropped");
                }
            }
        }
        if !open {
            return;
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
                stats: Arc::default(),
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
            request_id: "req-1".into(),
            spiffe_id: "spiffe://td/cam".into(),
            cert_thumbprint: "t".into(),
            jti: Some("j1".into()),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            calls: vec![call],
            policy_ids: vec!["p1".into()],
            decision: "allow",
            reason: "permitted by policy".into(),
        });
        tr.inject(&mut h, &post);
        tr.upstream_done(Ok(503));
        t.finish(tr, http::StatusCode::SERVICE_UNAVAILABLE);
        let tr = rx.try_recv().unwrap();
        let req = request(&crate::otlp::resource_json("gw", &[]), &[tr]);
        let rs = &req["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0]["value"]["stringValue"],
            "gw"
        );
        assert_eq!(rs["scopeSpans"][0]["scope"]["name"], "sigil.proxy");
        let spans = rs["scopeSpans"][0]["spans"].as_array().unwrap();
        let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
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
        assert_eq!(root["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(root["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(root["kind"], KIND_SERVER);
        assert_eq!(root["status"]["code"], STATUS_ERROR);
        assert_eq!(root["status"]["message"], "HTTP 503");
        let start: u128 = root["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u128 = root["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 1_700_000_000_000_000_000 && end >= start);
        let attr = |s: &Value, k: &str| {
            s["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
        };
        assert_eq!(
            attr(root, "sigil.spiffe_id"),
            Some(json!({"stringValue": "spiffe://td/cam"}))
        );
        assert_eq!(
            attr(root, "sigil.action"),
            Some(json!({"stringValue": "invoke"}))
        );
        assert_eq!(
            attr(root, "sigil.resource.id"),
            Some(json!({"stringValue": "m1"}))
        );
        assert_eq!(
            attr(root, "sigil.decision"),
            Some(json!({"stringValue": "allow"}))
        );
        assert_eq!(
            attr(root, "http.response.status_code"),
            Some(json!({"intValue": "503"}))
        );
        assert_eq!(
            attr(root, "sigil.policy_ids"),
            Some(json!({"arrayValue": {"values": [{"stringValue": "p1"}]}}))
        );
        for child in &spans[1..] {
            assert_eq!(child["traceId"], root["traceId"]);
            assert_eq!(child["parentSpanId"], root["spanId"]);
            assert_eq!(child["spanId"].as_str().unwrap().len(), 16);
        }
        assert_eq!(
            attr(&spans[1], "sigil.token.cache"),
            Some(json!({"stringValue": "hit"}))
        );
        assert_eq!(
            spans[2]["status"],
            json!({"code": STATUS_ERROR, "message": "no"})
        );
        assert_eq!(spans[3]["kind"], KIND_CLIENT);
        assert_eq!(
            spans[3]["spanId"],
            hex::encode(TraceParent::from_headers(&h).unwrap().parent_id)
        );
        // The token itself is nowhere.
        assert!(!req.to_string().contains("Bearer"));
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
        assert!(TraceConfig::resolve(Some("https://c:3"), &env(&[])).is_err());
        let grpc = env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        assert!(TraceConfig::protocol_warning(&grpc).is_some());
        assert!(TraceConfig::protocol_warning(&env(&[])).is_none());
    }
}
