//! One observer around the request path: the steps report what they did, and it feeds both
//! the metrics (when `metrics_addr` is set) and the request's trace (when sampled). With
//! both off every call is a branch and no clock is read.
use std::time::Instant;

use http::HeaderMap;

use crate::audit::DecisionRecord;
use crate::extract::Call;
use crate::metrics::{Metrics, Outcome};
use crate::token::TokenError;
use crate::trace::RequestTrace;

/// The observer of one request.
pub(crate) struct Observer<'a> {
    metrics: &'a Metrics,
    trace: Option<Box<RequestTrace>>,
    /// When the request was received (metrics only).
    received: Option<Instant>,
    /// When the upstream request was sent.
    sent: Option<Instant>,
}

impl<'a> Observer<'a> {
    pub fn new(metrics: &'a Metrics, trace: Option<Box<RequestTrace>>) -> Self {
        Self {
            received: metrics.start(),
            metrics,
            trace,
            sent: None,
        }
    }

    /// The trace, to be finished once the response head is ready.
    pub fn into_trace(self) -> Option<Box<RequestTrace>> {
        self.trace
    }

    /// The time a step starts when metrics or the trace measure it (`None`, no clock read,
    /// otherwise).
    #[inline]
    pub fn start(&self) -> Option<Instant> {
        self.metrics
            .start()
            .or_else(|| self.trace.as_ref().map(|_| Instant::now()))
    }

    pub fn request_id(&mut self, id: &str) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.request_id(id);
        }
    }

    pub fn mtls_only(&mut self) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.mtls_only();
        }
    }

    pub fn token_checked(&mut self, started: Option<Instant>, hit: bool, err: Option<&TokenError>) {
        self.metrics.token_checked(started);
        self.metrics.token_cache(hit);
        if let Some(t) = self.trace.as_deref_mut() {
            t.token_checked(started, hit, err.map(ToString::to_string));
        }
    }

    pub fn policy_evaluated(
        &mut self,
        started: Option<Instant>,
        call: &Call,
        decided: Result<&sigil_policy::Decision, String>,
    ) {
        self.metrics.policy_evaluated(started);
        if let Some(t) = self.trace.as_deref_mut() {
            t.policy_evaluated(started, call, decided);
        }
    }

    /// The decision, as the audit record holds it.
    pub fn decided(&mut self, record: &DecisionRecord<'_>) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.decided(record);
        }
    }

    /// Refused after the decision (its record could not be written).
    pub fn refused_after_decision(&mut self, reason: &str) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.refused(reason);
        }
    }

    /// The upstream request is about to be sent with `headers`.
    pub fn forwarding(&mut self, headers: &mut HeaderMap, method: &http::Method) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.inject(headers, method);
        }
        self.metrics.forwarding(self.received);
        self.sent = self.metrics.start();
    }

    /// The upstream answered with a status (response head) or failed.
    pub fn upstream_done(&mut self, result: Result<u16, String>) {
        self.metrics.upstream_done(self.sent);
        if let Some(t) = self.trace.as_deref_mut() {
            t.upstream_done(result);
        }
    }

    /// How the request ended.
    pub fn outcome(&self, outcome: Outcome) {
        self.metrics.request(outcome);
    }
}
