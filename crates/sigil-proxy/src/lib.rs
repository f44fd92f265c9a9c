//! The sigil sidecar enforcer (`sigil proxy`): inbound mTLS that only admits X.509-SVIDs of
//! the trust domain, a per-request certificate-bound access token, Cedar policy on the
//! model, tool, resource or prompt being called, rate limits per identity, a durable audit
//! record of every decision, and streaming forwarding with identity headers set by the
//! proxy. It forwards only what it has read in exactly one way; the request path is laid
//! out step by step in `stack.rs`.
#![forbid(unsafe_code)]

mod admit;
mod audit;
mod authenticate;
mod body;
mod config;
mod conn;
mod credentials;
mod decide;
mod deny;
mod export;
mod extract;
mod filter;
mod forward;
mod headers;
mod json;
mod limit;
mod metrics;
mod observe;
mod otlp;
mod path;
mod policy;
mod ratelimit;
mod respond;
mod revocation;
mod session;
mod shipper;
mod stack;
mod tls;
mod token;
mod trace;
mod upstream;
mod workload;

pub use audit::{AuditError, Scan as AuditScan, read_records, scan as scan_audit};
pub use config::ProxyConfig;
pub use credentials::Credentials;
pub use ratelimit::{BundleLimitsError, LimitSettings};
pub use revocation::Revocations;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
pub use config::Enforce;
use sigil_core::Clock;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A started proxy.
pub struct RunningProxy {
    /// The bound listener address.
    pub addr: SocketAddr,
    /// The bound metrics listener address, if `metrics_addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    task: JoinHandle<()>,
    creds: Arc<ArcSwap<Credentials>>,
    policies: Arc<ArcSwap<sigil_policy::PolicyEngine>>,
}

impl RunningProxy {
    /// The revision of the signed policy bundle in force (`policy_source = "agent"`), if any.
    pub fn policy_revision(&self) -> Option<u64> {
        self.policies.load().bundle().map(|(revision, _)| revision)
    }

    /// The revocation list in force (empty when run standalone from files).
    pub fn revocations(&self) -> Arc<Revocations> {
        self.creds.load().revoked.clone()
    }

    /// Stops accepting.
    pub fn shutdown(self) {
        self.task.abort();
    }

    /// Waits until the accept loop ends.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Loads the credentials, binds the listener and starts serving.
pub async fn start(cfg: ProxyConfig, clock: Arc<dyn Clock>) -> anyhow::Result<RunningProxy> {
    let mut validated = cfg.into_validated()?;
    let (export_config, trace_config) = (validated.export.take(), validated.trace.take());
    let cfg = &validated.cfg;
    // Tells open connections that the revocation list changed, so a revoked client's
    // keep-alive connections are closed at once.
    let (revoked_tx, revoked_rx) = tokio::sync::watch::channel(0i64);
    let creds = match &cfg.workload_api_socket {
        Some(socket) => {
            workload::WorkloadSource::new(
                socket,
                cfg.spiffe_id.clone(),
                cfg.trust_domain.clone(),
                clock.clone(),
                revoked_tx,
            )
            .start()
            .await?
        }
        None => Arc::new(ArcSwap::from_pointee(Credentials::load_files(cfg)?)),
    };
    let tls = tls::server_config(creds.clone(), clock.clone())?;
    let listener = TcpListener::bind(cfg.listen_addr).await?;
    let addr = listener.local_addr()?;
    // SIEM export (stopped with the accept loop, like the shipper).
    let counters = validated.counters.clone();
    let (export_sink, export_tasks) = match export_config {
        Some(x) => {
            if let Some(o) = &x.otlp {
                tracing::info!(url = %o.url, protocol = ?o.protocol, "audit records exported over OTLP");
            }
            let (sink, tasks) = export::spawn(x, counters.clone())?;
            (Some(sink), tasks.into_iter().map(AbortOnDrop).collect())
        }
        None => (None, Vec::new()),
    };
    let audit = audit::AuditLog::open_with_export(&cfg.audit_log, export_sink)?;
    // Stopped with the accept loop (the guard is held by its task).
    let shipper = match &cfg.audit_ship_to {
        Some(to) => Some(AbortOnDrop(shipper::spawn(
            to,
            cfg.audit_log.clone(),
            creds.clone(),
            audit.clone(),
            cfg.audit_rotate_bytes,
        )?)),
        None => None,
    };
    let limits = Arc::new(ArcSwap::from_pointee(ratelimit::Limits::new(
        cfg.limit_settings(),
    )));
    let policies = policy::start(cfg, clock.clone(), limits.clone())?;
    let (handle_creds, handle_policies) = (creds.clone(), policies.clone());
    // Traces (stopped with the accept loop).
    let (tracer, trace_task) = match trace_config {
        Some(t) => {
            tracing::info!(url = %t.otlp.url, protocol = ?t.otlp.protocol, "traces exported over OTLP");
            let (tracer, task) = trace::spawn(t, counters.traces.clone())?;
            (Some(tracer), Some(AbortOnDrop(task)))
        }
        None => (None, None),
    };

    let (metrics_at, metrics_policies, enforce) = (cfg.metrics_addr, policies.clone(), cfg.enforce);
    let state = Arc::new(
        stack::Proxy::new(
            validated,
            creds.clone(),
            clock.clone(),
            audit,
            policies,
            revoked_rx,
            limits,
        )
        .with_tracer(tracer),
    );
    let metrics_listener = match metrics_at {
        Some(at) => Some(
            sigil_metrics::serve(
                at,
                Arc::new(metrics::ProxyExporter {
                    metrics: state.metrics.clone(),
                    creds: creds.clone(),
                    policies: metrics_policies,
                    clock: clock.clone(),
                    enforce,
                }),
            )
            .await?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|l| l.addr);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        // Stops with the accept loop.
        let _metrics_listener = metrics_listener;
        let _shipper = shipper;
        let _export: Vec<AbortOnDrop> = export_tasks;
        let _traces = trace_task;
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let _open = state.metrics.connection_opened();
                let _ = tcp.set_nodelay(true);
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            state.metrics.handshake_failed(&e);
                            tracing::info!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => return,
                    };
                state.serve_connection(stream).await;
            });
        }
    });
    tracing::info!(%addr, "sigil proxy listening");
    Ok(RunningProxy {
        addr,
        metrics_addr,
        task,
        creds: handle_creds,
        policies: handle_policies,
    })
}
