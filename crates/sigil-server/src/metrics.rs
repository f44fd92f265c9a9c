//! The server's metrics (Prometheus, opt-in with `metrics_addr`) and its `/readyz` check
//! (ready: the store answers a cheap query).
//!
//! Node API calls and token requests are counted by a tower layer on the public router
//! (method from the gRPC path, result from the status in the response head), so handlers are
//! untouched; connected agents are the open `Sync` streams (a guard held by each streaming
//! response body); identities issued and store reachability are read at scrape time.
use std::sync::Arc;
use std::time::Duration;

use sigil_metrics::prometheus_client::metrics::counter::Counter;
use sigil_metrics::prometheus_client::metrics::family::Family;
use sigil_metrics::prometheus_client::metrics::gauge::Gauge;
use sigil_metrics::prometheus_client::registry::Registry;
use sigil_metrics::{Exporter, GRPC_CODE_NAMES, NotReady, Observer, ReadyFuture, grpc_code_name};
use sigil_store::Store;

/// The node API's methods (a fixed set of label values; "other" last).
const METHODS: [&str; 7] = [
    "Attest",
    "RenewNodeSvid",
    "FetchEntries",
    "SignX509Svids",
    "MintJwtSvid",
    "Sync",
    "other",
];
const SYNC: usize = 5;
const NODE_PREFIX: &str = "/sigil.node.v1.Node/";
const TOKEN_PATH: &str = "/oauth2/token";

/// Token endpoint results: `ok` (200), `invalid_request` (400: invalid_scope, bad grant,
/// ...), `invalid_client` (401: no or bad client certificate), `error` (anything else).
const TOKEN_RESULTS: [&str; 4] = ["ok", "invalid_request", "invalid_client", "error"];

/// What the observer tells apart.
#[derive(Debug, Clone, Copy)]
pub enum Route {
    Node(usize),
    Token,
}

/// The server's metrics; a no-op when the listener is not configured.
pub struct ServerMetrics {
    inner: Option<Inner>,
}

struct Inner {
    registry: Registry,
    /// `[method][result]`, flattened.
    node_calls: Vec<Counter>,
    tokens: Vec<Counter>,
    connected_agents: Gauge,
    issued: Gauge,
    store_up: Gauge,
}

impl ServerMetrics {
    /// Metrics that are recorded (`enabled`) or a no-op.
    pub fn new(enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: enabled.then(Inner::new),
        })
    }
}

impl Inner {
    fn new() -> Self {
        let mut registry = Registry::default();
        let node = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "sigil_server_node_api_requests",
            "Node API calls by method and gRPC result (Attest/RenewNodeSvid issue node SVIDs, \
             SignX509Svids workload X.509-SVIDs, MintJwtSvid JWT-SVIDs)",
            node.clone(),
        );
        let mut node_calls = Vec::new();
        for m in METHODS {
            for r in GRPC_CODE_NAMES {
                node_calls.push(node.get_or_create(&[("method", m), ("result", r)]).clone());
            }
        }
        let token = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "sigil_server_token_requests",
            "OAuth token endpoint requests by result",
            token.clone(),
        );
        let tokens = TOKEN_RESULTS
            .iter()
            .map(|r| token.get_or_create(&[("result", *r)]).clone())
            .collect();
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<i64>::default();
            registry.register(name, help, g.clone());
            g
        };
        Self {
            node_calls,
            tokens,
            connected_agents: gauge(
                &mut registry,
                "sigil_server_connected_agents",
                "Agents with an open sync stream",
            ),
            issued: gauge(
                &mut registry,
                "sigil_server_issued_identities",
                "Identities (X.509-SVIDs, JWT-SVIDs, access tokens) recorded as issued in the store",
            ),
            store_up: gauge(
                &mut registry,
                "sigil_server_store_up",
                "1 if the store answered the last scrape's query, else 0",
            ),
            registry,
        }
    }
}

/// Decrements `sigil_server_connected_agents` when a sync stream ends.
struct Connected(Gauge);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Observer for ServerMetrics {
    type Route = Route;

    fn route(&self, path: &str) -> Option<Route> {
        self.inner.as_ref()?;
        if path == TOKEN_PATH {
            return Some(Route::Token);
        }
        let method = path.strip_prefix(NODE_PREFIX)?;
        let other = METHODS.len() - 1;
        Some(Route::Node(
            METHODS
                .iter()
                .take(other)
                .position(|m| *m == method)
                .unwrap_or(other),
        ))
    }

    fn response(
        &self,
        route: Route,
        status: http::StatusCode,
        grpc_status: Option<i32>,
    ) -> Option<Box<dyn Send + Sync>> {
        let inner = self.inner.as_ref()?;
        match route {
            Route::Token => {
                let i = match status.as_u16() {
                    200 => 0,
                    400 => 1,
                    401 => 2,
                    _ => 3,
                };
                if let Some(c) = inner.tokens.get(i) {
                    c.inc();
                }
                None
            }
            Route::Node(method) => {
                let code = match grpc_status {
                    Some(c) => c,
                    None if status.is_success() => 0,
                    None => 2,
                };
                let result = GRPC_CODE_NAMES
                    .iter()
                    .position(|n| *n == grpc_code_name(code))
                    .unwrap_or(2);
                if let Some(c) = inner
                    .node_calls
                    .get(method * GRPC_CODE_NAMES.len() + result)
                {
                    c.inc();
                }
                if method == SYNC && code == 0 {
                    inner.connected_agents.inc();
                    return Some(Box::new(Connected(inner.connected_agents.clone())));
                }
                None
            }
        }
    }
}

/// What the metrics listener reads at scrape time.
pub struct ServerExporter {
    pub metrics: Arc<ServerMetrics>,
    pub store: Arc<dyn Store>,
}

/// How long a readiness or scrape query may take before the store counts as unreachable.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

impl ServerExporter {
    async fn ping(&self) -> Result<(), NotReady> {
        let unreachable = |why: String| NotReady::Unreachable { what: "store", why };
        match tokio::time::timeout(STORE_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable("timed out".into())),
        }
    }
}

impl Exporter for ServerExporter {
    fn refresh(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let Some(inner) = &self.metrics.inner else {
                return;
            };
            let up = self.ping().await.is_ok();
            inner.store_up.set(i64::from(up));
            if up
                && let Ok(Ok(n)) =
                    tokio::time::timeout(STORE_TIMEOUT, self.store.count_issued()).await
            {
                inner.issued.set(n);
            }
        })
    }

    fn encode(&self, out: &mut String) -> std::fmt::Result {
        let Some(inner) = &self.metrics.inner else {
            return Ok(());
        };
        sigil_metrics::prometheus_client::encoding::text::encode(out, &inner.registry)
    }

    fn ready(&self) -> ReadyFuture<'_> {
        Box::pin(self.ping())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(m: &ServerMetrics) -> String {
        let mut out = String::new();
        if let Some(i) = &m.inner {
            sigil_metrics::prometheus_client::encoding::text::encode(&mut out, &i.registry)
                .unwrap();
        }
        out
    }

    #[test]
    fn node_calls_tokens_and_connected_agents() {
        let m = ServerMetrics::new(true);
        let ok = http::StatusCode::OK;
        let attest = m.route("/sigil.node.v1.Node/Attest").unwrap();
        m.response(attest, ok, None);
        m.response(attest, ok, Some(7));
        let t = m.route("/oauth2/token").unwrap();
        m.response(t, ok, None);
        m.response(t, http::StatusCode::UNAUTHORIZED, None);
        m.response(t, http::StatusCode::BAD_REQUEST, None);
        assert!(m.route("/keys").is_none());
        let sync = m.route("/sigil.node.v1.Node/Sync").unwrap();
        let a = m.response(sync, ok, None);
        let b = m.response(sync, ok, None);
        assert!(m.response(sync, ok, Some(7)).is_none());
        let text = encode(&m);
        for line in [
            "sigil_server_node_api_requests_total{method=\"Attest\",result=\"ok\"} 1",
            "sigil_server_node_api_requests_total{method=\"Attest\",result=\"permission_denied\"} 1",
            "sigil_server_node_api_requests_total{method=\"Sync\",result=\"ok\"} 2",
            "sigil_server_token_requests_total{result=\"ok\"} 1",
            "sigil_server_token_requests_total{result=\"invalid_client\"} 1",
            "sigil_server_token_requests_total{result=\"invalid_request\"} 1",
            "sigil_server_connected_agents 2",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        drop((a, b));
        assert!(encode(&m).contains("sigil_server_connected_agents 0"));
    }
}
