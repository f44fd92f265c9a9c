//! The proxy's metrics (Prometheus, opt-in with `metrics_addr`) and its `/readyz` check.
//!
//! Every labelled series is resolved once at start: the request path increments a counter
//! picked by index (an atomic add) and observes histograms (one uncontended lock each); it
//! never formats or allocates a label. With no `metrics_addr` every call is a no-op and no
//! clock is read.
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use sigil_core::Clock;
use sigil_metrics::prometheus_client::metrics::counter::Counter;
use sigil_metrics::prometheus_client::metrics::family::Family;
use sigil_metrics::prometheus_client::metrics::gauge::Gauge;
use sigil_metrics::prometheus_client::metrics::histogram::Histogram;
use sigil_metrics::prometheus_client::registry::Registry;
use sigil_metrics::{Exporter, NotReady, ReadyFuture};
use sigil_policy::PolicyEngine;

use crate::Credentials;
use crate::config::Enforce;

/// How a request ended, as the `decision` and `reason` labels of
/// `sigil_proxy_requests_total`. A fixed set: never a free-text label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Permitted by policy and answered by the upstream.
    Allowed,
    /// Forwarded in `enforce = "mtls-only"` mode (no token or policy).
    AllowedMtlsOnly,
    /// Refused by policy (or a call policy could not evaluate).
    Policy,
    /// Missing, invalid, expired or wrongly bound token.
    BadToken,
    /// Client certificate refused (at the handshake or right after it): counted per
    /// connection, since no request could be read.
    BadCert,
    /// Client certificate revoked.
    Revoked,
    /// Rate limited (per identity or per identity × model/tool).
    RateLimited,
    /// Allowed, but the audit record could not be made durable: refused.
    AuditFailure,
    /// Body larger than `max_body_bytes`.
    TooLarge,
    /// Unreadable or ambiguous request (framing, JSON, path).
    BadRequest,
    /// Allowed, but the upstream failed or its answer could not be filtered.
    Upstream,
}

impl Outcome {
    const ALL: [Outcome; 11] = [
        Outcome::Allowed,
        Outcome::AllowedMtlsOnly,
        Outcome::Policy,
        Outcome::BadToken,
        Outcome::BadCert,
        Outcome::Revoked,
        Outcome::RateLimited,
        Outcome::AuditFailure,
        Outcome::TooLarge,
        Outcome::BadRequest,
        Outcome::Upstream,
    ];

    fn labels(self) -> [(&'static str, &'static str); 2] {
        let (decision, reason) = match self {
            Outcome::Allowed => ("allow", "policy"),
            Outcome::AllowedMtlsOnly => ("allow", "mtls_only"),
            Outcome::Policy => ("deny", "policy"),
            Outcome::BadToken => ("deny", "bad_token"),
            Outcome::BadCert => ("deny", "bad_cert"),
            Outcome::Revoked => ("deny", "revoked"),
            Outcome::RateLimited => ("deny", "rate_limited"),
            Outcome::AuditFailure => ("deny", "audit_failure"),
            Outcome::TooLarge => ("deny", "too_large"),
            Outcome::BadRequest => ("deny", "bad_request"),
            Outcome::Upstream => ("deny", "upstream"),
        };
        [("decision", decision), ("reason", reason)]
    }
}

/// The proxy's metrics; a no-op when the listener is not configured.
pub struct Metrics {
    inner: Option<Inner>,
}

struct Inner {
    registry: Registry,
    /// Indexed by `Outcome as usize`.
    requests: Vec<Counter>,
    request_duration: Histogram,
    upstream_duration: Histogram,
    policy_evaluation: Histogram,
    token_validation: Histogram,
    token_cache_hits: Counter,
    token_cache_misses: Counter,
    open_connections: Gauge,
    svid_expiry: Gauge,
    policies: Gauge,
    /// Only present while the set in force came from a signed bundle.
    bundle_expiry: Family<[(&'static str, &'static str); 0], Gauge>,
    bundle_revision: Family<[(&'static str, &'static str); 0], Gauge>,
}

/// Decrements `sigil_proxy_open_connections` when the connection ends.
pub(crate) struct OpenConnection(Option<Gauge>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

impl Metrics {
    /// Metrics that are recorded (`enabled`) or a no-op.
    pub fn new(enabled: bool) -> Self {
        Self {
            inner: enabled.then(Inner::new),
        }
    }

    /// Registers the counters of the telemetry exports (`sigil_proxy_telemetry_exported` and
    /// `sigil_proxy_telemetry_dropped`, by signal and reason).
    pub(crate) fn with_export(mut self, c: &crate::otlp::ExportCounters) -> Self {
        if let Some(inner) = self.inner.as_mut() {
            inner.registry.register(
                "sigil_proxy_telemetry_exported",
                "Telemetry items (spans, audit log records) accepted by their receiver",
                c.exported.clone(),
            );
            inner.registry.register(
                "sigil_proxy_telemetry_dropped",
                "Telemetry items dropped: a full queue, or a batch that failed after retries",
                c.dropped.clone(),
            );
        }
        self
    }

    /// Registers the audit log's counters: records written (`sigil_proxy_audit_records`) and
    /// syncs made (`sigil_proxy_audit_syncs`); their ratio is the group commit's batch size.
    pub(crate) fn with_audit(mut self, audit: &crate::audit::AuditLog) -> Self {
        if let Some(inner) = self.inner.as_mut() {
            let (records, syncs) = audit.counters();
            inner.registry.register(
                "sigil_proxy_audit_records",
                "Decision records written to the audit log",
                records,
            );
            inner.registry.register(
                "sigil_proxy_audit_syncs",
                "Syncs (fdatasync) of the audit log; records / syncs is the batch size",
                syncs,
            );
        }
        self
    }

    /// Registers the outbound routes' connection counter (`sigil_proxy_outbound_connections`,
    /// by route): each connection is one TLS handshake.
    pub(crate) fn with_outbound(mut self, e: &crate::egress::Egress) -> Self {
        if let Some(inner) = self.inner.as_mut() {
            inner.registry.register(
                "sigil_proxy_outbound_connections",
                "mTLS connections (each one handshake) opened to outbound routes",
                e.connects.clone(),
            );
        }
        self
    }

    /// The time a measured step starts (`None`, no clock read, when disabled).
    #[inline]
    pub(crate) fn start(&self) -> Option<Instant> {
        self.inner.as_ref().map(|_| Instant::now())
    }

    /// Counts a request by how it ended.
    #[inline]
    pub(crate) fn request(&self, outcome: Outcome) {
        if let Some(c) = self
            .inner
            .as_ref()
            .and_then(|i| i.requests.get(outcome as usize))
        {
            c.inc();
        }
    }

    /// A TLS handshake failed: counted as `bad_cert` / `revoked` when the client certificate
    /// was the reason (other failures, e.g. a client going away, are not requests).
    pub(crate) fn handshake_failed(&self, e: &std::io::Error) {
        if self.inner.is_none() {
            return;
        }
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
                self.request(Outcome::Revoked)
            }
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
                self.request(Outcome::BadCert)
            }
            _ => {}
        }
    }

    /// Added latency: from the request received to the upstream request sent.
    #[inline]
    pub(crate) fn forwarding(&self, received: Option<Instant>) {
        observe(self.inner.as_ref().map(|i| &i.request_duration), received);
    }

    /// The upstream answered (response head) or failed.
    #[inline]
    pub(crate) fn upstream_done(&self, sent: Option<Instant>) {
        observe(self.inner.as_ref().map(|i| &i.upstream_duration), sent);
    }

    /// One Cedar decision.
    #[inline]
    pub(crate) fn policy_evaluated(&self, started: Option<Instant>) {
        observe(self.inner.as_ref().map(|i| &i.policy_evaluation), started);
    }

    /// One token check (cache lookup, or full validation on a miss).
    #[inline]
    pub(crate) fn token_checked(&self, started: Option<Instant>) {
        observe(self.inner.as_ref().map(|i| &i.token_validation), started);
    }

    /// Counts a token check answered from the cache (`hit`) or fully validated.
    #[inline]
    pub(crate) fn token_cache(&self, hit: bool) {
        if let Some(i) = &self.inner {
            if hit {
                i.token_cache_hits.inc();
            } else {
                i.token_cache_misses.inc();
            }
        }
    }

    /// Counts an open client connection until the returned guard is dropped.
    pub(crate) fn connection_opened(&self) -> OpenConnection {
        OpenConnection(self.inner.as_ref().map(|i| {
            i.open_connections.inc();
            i.open_connections.clone()
        }))
    }
}

#[inline]
fn observe(h: Option<&Histogram>, started: Option<Instant>) {
    if let (Some(h), Some(t)) = (h, started) {
        h.observe(t.elapsed().as_secs_f64());
    }
}

impl Inner {
    fn new() -> Self {
        let mut registry = Registry::default();
        let family = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "sigil_proxy_requests",
            "Requests by decision and reason (client certificate refusals count per connection)",
            family.clone(),
        );
        // Resolved once, so every series exists from the start and the hot path never looks
        // a label up.
        let requests = Outcome::ALL
            .iter()
            .map(|o| family.get_or_create(&o.labels()).clone())
            .collect();
        let histogram = |registry: &mut Registry, name: &str, help: &str| {
            let h = sigil_metrics::latency_histogram();
            registry.register(name, help, h.clone());
            h
        };
        let request_duration = histogram(
            &mut registry,
            "sigil_proxy_request_duration_seconds",
            "Latency the proxy adds: from the request received to the upstream request sent",
        );
        let upstream_duration = histogram(
            &mut registry,
            "sigil_proxy_upstream_duration_seconds",
            "From the upstream request sent to its response head (or failure)",
        );
        let policy_evaluation = histogram(
            &mut registry,
            "sigil_proxy_policy_evaluation_seconds",
            "One Cedar policy decision",
        );
        let token_validation = histogram(
            &mut registry,
            "sigil_proxy_token_validation_seconds",
            "One access token check (cached or fully validated)",
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let token_cache_hits = counter(
            &mut registry,
            "sigil_proxy_token_cache_hits",
            "Access token checks answered from the cache of validated tokens",
        );
        let token_cache_misses = counter(
            &mut registry,
            "sigil_proxy_token_cache_misses",
            "Access token checks that needed a full validation (signature, claims)",
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<i64>::default();
            registry.register(name, help, g.clone());
            g
        };
        let open_connections = gauge(
            &mut registry,
            "sigil_proxy_open_connections",
            "Client connections open (handshaking included)",
        );
        let svid_expiry = gauge(
            &mut registry,
            "sigil_proxy_svid_expiry_seconds",
            "Seconds until the serving X.509-SVID's notAfter (negative once expired)",
        );
        let policies = gauge(
            &mut registry,
            "sigil_proxy_policies",
            "Cedar policies in the set in force",
        );
        let bundle_expiry = Family::<[(&'static str, &'static str); 0], Gauge>::default();
        registry.register(
            "sigil_proxy_policy_bundle_expiry_seconds",
            "Seconds until the signed policy bundle in force expires (absent without a bundle)",
            bundle_expiry.clone(),
        );
        let bundle_revision = Family::<[(&'static str, &'static str); 0], Gauge>::default();
        registry.register(
            "sigil_proxy_policy_bundle_revision",
            "Revision of the signed policy bundle in force (absent without a bundle)",
            bundle_revision.clone(),
        );
        Self {
            registry,
            bundle_expiry,
            bundle_revision,
            requests,
            request_duration,
            upstream_duration,
            policy_evaluation,
            token_validation,
            token_cache_hits,
            token_cache_misses,
            open_connections,
            svid_expiry,
            policies,
        }
    }
}

/// What the metrics listener reads at scrape time.
pub(crate) struct ProxyExporter {
    pub metrics: Arc<Metrics>,
    pub creds: Arc<ArcSwap<Credentials>>,
    pub policies: Arc<ArcSwap<PolicyEngine>>,
    pub clock: Arc<dyn Clock>,
    pub enforce: Enforce,
}

impl ProxyExporter {
    /// Seconds until the serving SVID expires (`None` if its leaf cannot be read).
    fn svid_expiry(&self) -> Option<i64> {
        let creds = self.creds.load();
        let leaf = creds.serving.cert.first()?;
        let not_after = sigil_metrics::not_after(leaf.as_ref())?;
        Some(sigil_metrics::seconds_until(not_after, self.clock.now()))
    }
}

impl Exporter for ProxyExporter {
    fn encode(&self, out: &mut String) -> std::fmt::Result {
        let Some(inner) = &self.metrics.inner else {
            return Ok(());
        };
        inner.svid_expiry.set(self.svid_expiry().unwrap_or(0));
        let engine = self.policies.load();
        inner
            .policies
            .set(i64::try_from(engine.len()).unwrap_or(i64::MAX));
        match engine.bundle() {
            Some((revision, not_after)) => {
                let left = sigil_metrics::seconds_until(not_after, self.clock.now());
                inner.bundle_expiry.get_or_create(&[]).set(left);
                let revision = i64::try_from(revision).unwrap_or(i64::MAX);
                inner.bundle_revision.get_or_create(&[]).set(revision);
            }
            None => {
                inner.bundle_expiry.clear();
                inner.bundle_revision.clear();
            }
        }
        sigil_metrics::prometheus_client::encoding::text::encode(out, &inner.registry)
    }

    fn ready(&self) -> ReadyFuture<'_> {
        let r = match self.svid_expiry() {
            None => Err(NotReady::Unreadable("serving SVID")),
            Some(s) if s <= 0 => Err(NotReady::Expired("serving SVID")),
            Some(_) if self.enforce == Enforce::Full && self.policies.load().is_empty() => {
                Err(NotReady::Missing("policies"))
            }
            Some(_)
                if self.enforce == Enforce::Full
                    && self.policies.load().expired(self.clock.now()) =>
            {
                Err(NotReady::Expired("policy bundle"))
            }
            Some(_) => Ok(()),
        };
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(m: &Metrics) -> String {
        let mut out = String::new();
        if let Some(i) = &m.inner {
            sigil_metrics::prometheus_client::encoding::text::encode(&mut out, &i.registry)
                .unwrap();
        }
        out
    }

    #[test]
    fn counts_outcomes_and_exposes_every_series_from_the_start() {
        let m = Metrics::new(true);
        let text = encode(&m);
        for o in Outcome::ALL {
            let [(_, d), (_, r)] = o.labels();
            let line = format!("sigil_proxy_requests_total{{decision=\"{d}\",reason=\"{r}\"}} 0");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        for _ in 0..7 {
            m.request(Outcome::Allowed);
        }
        m.request(Outcome::Policy);
        m.request(Outcome::Revoked);
        m.policy_evaluated(m.start());
        m.token_cache(false);
        m.token_cache(true);
        m.token_cache(true);
        let conn = m.connection_opened();
        let text = encode(&m);
        assert!(
            text.contains("sigil_proxy_requests_total{decision=\"allow\",reason=\"policy\"} 7")
        );
        assert!(text.contains("sigil_proxy_requests_total{decision=\"deny\",reason=\"policy\"} 1"));
        assert!(
            text.contains("sigil_proxy_requests_total{decision=\"deny\",reason=\"revoked\"} 1")
        );
        assert!(
            text.contains("sigil_proxy_policy_evaluation_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("sigil_proxy_open_connections 1"));
        assert!(
            text.contains("sigil_proxy_token_cache_hits_total 2"),
            "{text}"
        );
        assert!(
            text.contains("sigil_proxy_token_cache_misses_total 1"),
            "{text}"
        );
        drop(conn);
        assert!(encode(&m).contains("sigil_proxy_open_connections 0"));
    }

    #[test]
    fn disabled_metrics_record_nothing_and_read_no_clock() {
        let m = Metrics::new(false);
        assert!(m.start().is_none());
        m.request(Outcome::Allowed);
        m.request(Outcome::Policy);
        drop(m.connection_opened());
        assert!(encode(&m).is_empty());
    }

    /// What metrics add to one allowed request on the hot path (clock reads, histogram
    /// observations, one counter), enabled vs disabled. Prints; asserts nothing on timing.
    /// `cargo test -p sigil-proxy --release --lib per_request_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn per_request_cost() {
        fn one(m: &Metrics) {
            let received = m.start();
            let t = m.start();
            m.token_checked(t);
            let t = m.start();
            m.policy_evaluated(t);
            m.forwarding(received);
            let sent = m.start();
            m.upstream_done(sent);
            m.request(Outcome::Allowed);
        }
        for enabled in [false, true] {
            let m = Metrics::new(enabled);
            let n = 2_000_000;
            for _ in 0..n / 10 {
                one(std::hint::black_box(&m));
            }
            let t = Instant::now();
            for _ in 0..n {
                one(std::hint::black_box(&m));
            }
            let ns = t.elapsed().as_nanos() as f64 / f64::from(n);
            println!("metrics enabled={enabled}: {ns:.1} ns per request");
        }
    }

    #[test]
    fn handshake_failures_count_only_certificate_refusals() {
        let m = Metrics::new(true);
        let tls = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        m.handshake_failed(&tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked,
        )));
        m.handshake_failed(&tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )));
        m.handshake_failed(&tls(rustls::Error::NoCertificatesPresented));
        m.handshake_failed(&std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        let text = encode(&m);
        assert!(text.contains("reason=\"revoked\"} 1"), "{text}");
        assert!(text.contains("reason=\"bad_cert\"} 2"), "{text}");
    }
}
