//! The agent's metrics (Prometheus, opt-in with `metrics_addr`) and its `/readyz` check
//! (ready: a node SVID and a trust bundle with an unexpired X.509 authority).
//!
//! Workload API calls are counted by a tower layer on the socket's router (method from the
//! gRPC path, result from the status in the response head), so the handlers are untouched;
//! rotations are counted by watching the identities' snapshots; expiries and the sync state
//! are read at scrape time.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use sigil_metrics::prometheus_client::metrics::counter::Counter;
use sigil_metrics::prometheus_client::metrics::family::Family;
use sigil_metrics::prometheus_client::metrics::gauge::Gauge;
use sigil_metrics::prometheus_client::registry::Registry;
use sigil_metrics::{Exporter, GRPC_CODE_NAMES, NotReady, Observer, ReadyFuture, grpc_code_name};
use tokio::task::JoinHandle;

use crate::Identities;
use crate::cache::Cache;

/// The methods served on the agent's socket (a fixed set of label values; "other" last).
const METHODS: [&str; 7] = [
    "FetchX509SVID",
    "FetchX509Bundles",
    "FetchJWTSVID",
    "FetchJWTBundles",
    "ValidateJWTSVID",
    "WatchRevocations",
    "other",
];

/// The agent's metrics; a no-op when the listener is not configured.
pub struct AgentMetrics {
    inner: Option<Inner>,
}

struct Inner {
    registry: Registry,
    /// `[method][result]`, flattened.
    requests: Vec<Counter>,
    rotations: Counter,
    svids: Gauge,
    node_svid_expiry: Gauge,
    workload_svid_expiry: Gauge,
    sync_connected: Gauge,
    bundle_sequence: Gauge,
}

impl AgentMetrics {
    /// Metrics that are recorded (`enabled`) or a no-op.
    pub fn new(enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: enabled.then(Inner::new),
        })
    }

    fn request(&self, method: usize, code: i32) {
        let Some(inner) = &self.inner else { return };
        let result = GRPC_CODE_NAMES
            .iter()
            .position(|n| *n == grpc_code_name(code))
            .unwrap_or(2);
        if let Some(c) = inner.requests.get(method * GRPC_CODE_NAMES.len() + result) {
            c.inc();
        }
    }
}

impl Inner {
    fn new() -> Self {
        let mut registry = Registry::default();
        let family = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "sigil_agent_workload_api_requests",
            "Workload API (and Enforcer API) calls by method and gRPC result",
            family.clone(),
        );
        let mut requests = Vec::new();
        for m in METHODS {
            for r in GRPC_CODE_NAMES {
                requests.push(
                    family
                        .get_or_create(&[("method", m), ("result", r)])
                        .clone(),
                );
            }
        }
        let rotations = Counter::default();
        registry.register(
            "sigil_agent_svid_rotations",
            "Workload X.509-SVIDs replaced by a new one for the same entry",
            rotations.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<i64>::default();
            registry.register(name, help, g.clone());
            g
        };
        Self {
            requests,
            rotations,
            svids: gauge(
                &mut registry,
                "sigil_agent_workload_svids",
                "Workload X.509-SVIDs held",
            ),
            node_svid_expiry: gauge(
                &mut registry,
                "sigil_agent_node_svid_expiry_seconds",
                "Seconds until the node SVID's notAfter (negative once expired; absent without one)",
            ),
            workload_svid_expiry: gauge(
                &mut registry,
                "sigil_agent_workload_svid_expiry_seconds",
                "Seconds until the earliest workload SVID's notAfter (0 without any)",
            ),
            sync_connected: gauge(
                &mut registry,
                "sigil_agent_sync_connected",
                "1 while the sync stream with the server is up, else 0",
            ),
            bundle_sequence: gauge(
                &mut registry,
                "sigil_agent_bundle_sequence",
                "spiffe_sequence of the trust bundle in force",
            ),
            registry,
        }
    }
}

impl Observer for AgentMetrics {
    type Route = usize;

    fn route(&self, path: &str) -> Option<usize> {
        self.inner.as_ref()?;
        let method = path.rsplit('/').next().unwrap_or("");
        let other = METHODS.len() - 1;
        Some(
            METHODS
                .iter()
                .take(other)
                .position(|m| *m == method)
                .unwrap_or(other),
        )
    }

    fn response(
        &self,
        route: usize,
        status: http::StatusCode,
        grpc_status: Option<i32>,
    ) -> Option<Box<dyn Send + Sync>> {
        let code = match grpc_status {
            Some(c) => c,
            None if status.is_success() => 0,
            None => 2,
        };
        self.request(route, code);
        None
    }
}

/// The running metrics listener and rotation watcher; dropping it stops both.
pub struct Running {
    _listener: sigil_metrics::Listener,
    watcher: JoinHandle<()>,
}

impl Running {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self._listener.addr
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Starts the listener on `addr` and the rotation watcher.
pub async fn start(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    identities: Arc<Identities>,
    cache_dir: std::path::PathBuf,
) -> anyhow::Result<Running> {
    let watcher = tokio::spawn(watch_rotations(metrics.clone(), identities.clone()));
    let cache = Cache::open(&cache_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let exporter = Arc::new(AgentExporter {
        metrics,
        identities,
        cache,
    });
    let listener = sigil_metrics::serve(addr, exporter).await?;
    Ok(Running {
        _listener: listener,
        watcher,
    })
}

/// Counts an entry whose SVID serial changed as a rotation.
async fn watch_rotations(metrics: Arc<AgentMetrics>, identities: Arc<Identities>) {
    let Some(inner) = &metrics.inner else { return };
    let mut rx = identities.subscribe();
    let mut serials: HashMap<sigil_core::EntryId, String> = HashMap::new();
    loop {
        let rotated = {
            let snap = rx.borrow_and_update();
            let mut rotated = 0u64;
            let mut now = HashMap::with_capacity(snap.svids.len());
            for (entry, svid) in snap.svids.iter() {
                let key = entry.clone();
                if serials.get(&key).is_some_and(|s| *s != svid.serial) {
                    rotated += 1;
                }
                now.insert(key, svid.serial.clone());
            }
            // An entry dropped (expired or deleted) and back later is a new SVID, not a
            // rotation of the one held.
            serials = now;
            rotated
        };
        inner.rotations.inc_by(rotated);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

struct AgentExporter {
    metrics: Arc<AgentMetrics>,
    identities: Arc<Identities>,
    cache: Cache,
}

impl AgentExporter {
    fn node_not_after(&self) -> Option<i64> {
        self.identities.node_id()?;
        self.cache.load_node().ok().flatten().map(|n| n.not_after)
    }

    fn readiness(&self) -> Result<(), NotReady> {
        let now = self.identities.clock().now();
        match self.node_not_after() {
            None => return Err(NotReady::Missing("node SVID")),
            Some(t) if t <= now => return Err(NotReady::Expired("node SVID")),
            Some(_) => {}
        }
        let snap = self.identities.subscribe().borrow().clone();
        let Some(bundle) = &snap.bundle else {
            return Err(NotReady::Missing("trust bundle"));
        };
        let unexpired = bundle
            .x509_authorities
            .iter()
            .filter_map(|der| sigil_metrics::not_after(der))
            .any(|t| t > now);
        if !unexpired {
            return Err(NotReady::Expired("trust bundle"));
        }
        Ok(())
    }
}

impl Exporter for AgentExporter {
    fn encode(&self, out: &mut String) -> std::fmt::Result {
        let Some(inner) = &self.metrics.inner else {
            return Ok(());
        };
        let now = self.identities.clock().now();
        let snap = self.identities.subscribe().borrow().clone();
        inner
            .svids
            .set(i64::try_from(snap.svids.len()).unwrap_or(i64::MAX));
        let earliest = snap.svids.values().map(|s| s.not_after).min();
        inner
            .workload_svid_expiry
            .set(earliest.map_or(0, |t| sigil_metrics::seconds_until(t, now)));
        inner.node_svid_expiry.set(
            self.node_not_after()
                .map_or(0, |t| sigil_metrics::seconds_until(t, now)),
        );
        inner
            .sync_connected
            .set(i64::from(self.identities.client.load().is_some()));
        inner.bundle_sequence.set(
            snap.bundle
                .as_ref()
                .map_or(0, |b| i64::try_from(b.sequence).unwrap_or(i64::MAX)),
        );
        sigil_metrics::prometheus_client::encoding::text::encode(out, &inner.registry)
    }

    fn ready(&self) -> ReadyFuture<'_> {
        let r = self.readiness();
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(m: &AgentMetrics) -> String {
        let mut out = String::new();
        if let Some(i) = &m.inner {
            sigil_metrics::prometheus_client::encoding::text::encode(&mut out, &i.registry)
                .unwrap();
        }
        out
    }

    #[test]
    fn workload_api_calls_by_method_and_result() {
        let m = AgentMetrics::new(true);
        let r = m.route("/SpiffeWorkloadAPI/FetchX509SVID").unwrap();
        m.response(r, http::StatusCode::OK, None);
        m.response(r, http::StatusCode::OK, Some(7));
        let j = m.route("/SpiffeWorkloadAPI/FetchJWTSVID").unwrap();
        m.response(j, http::StatusCode::OK, Some(3));
        let w = m
            .route("/sigil.agent.v1.Enforcer/WatchRevocations")
            .unwrap();
        m.response(w, http::StatusCode::OK, None);
        let o = m.route("/x.Y/Nope").unwrap();
        m.response(o, http::StatusCode::OK, Some(12));
        let text = encode(&m);
        for line in [
            "sigil_agent_workload_api_requests_total{method=\"FetchX509SVID\",result=\"ok\"} 1",
            "sigil_agent_workload_api_requests_total{method=\"FetchX509SVID\",result=\"permission_denied\"} 1",
            "sigil_agent_workload_api_requests_total{method=\"FetchJWTSVID\",result=\"invalid_argument\"} 1",
            "sigil_agent_workload_api_requests_total{method=\"WatchRevocations\",result=\"ok\"} 1",
            "sigil_agent_workload_api_requests_total{method=\"other\",result=\"unimplemented\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn disabled_metrics_observe_nothing() {
        let m = AgentMetrics::new(false);
        assert!(m.route("/SpiffeWorkloadAPI/FetchX509SVID").is_none());
        assert!(encode(&m).is_empty());
    }
}
