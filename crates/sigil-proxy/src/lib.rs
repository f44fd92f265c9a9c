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
mod discovery;
mod dpop;
mod egress;
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
mod peer;
mod policy;
mod ratelimit;
mod respond;
mod revocation;
mod risk;
mod session;
mod shipper;
mod stack;
mod telemetry;
mod tls;
mod token;
mod trace;
mod upstream;
mod workload;

pub use audit::{AuditError, Scan as AuditScan, read_records, scan as scan_audit};
pub use config::ProxyConfig;
pub use credentials::Credentials;
pub use egress::{OutboundConfig, RouteConfig};
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

/// For the criterion benches (`benches/read_body.rs`) only: not an API.
#[doc(hidden)]
pub mod bench {
    pub use crate::json::{parse, parse_picking};

    /// Reads model calls' bodies as the proxy does (the default routes and model fields).
    pub struct ModelCalls {
        routes: crate::extract::Routes,
        path: crate::path::RequestPath,
    }

    impl ModelCalls {
        /// For requests to `path`.
        pub fn new(path: &str) -> Result<Self, String> {
            Ok(Self {
                routes: crate::extract::Routes::new(&[], None, None, "/mcp")
                    .map_err(|e| e.to_string())?,
                path: crate::path::RequestPath::parse(path).map_err(|e| e.to_string())?,
            })
        }

        /// The models `body` names, as the extract step reads them.
        pub fn models(&self, body: &[u8]) -> Result<Vec<String>, String> {
            let target = crate::extract::Target {
                method: "POST",
                path: &self.path,
                json_declared: true,
            };
            crate::extract::extract(&self.routes, &target, body)
                .map(|calls| calls.into_iter().map(|c| c.resource_id).collect())
                .map_err(|e| e.to_string())
        }
    }
}

/// A started proxy.
pub struct RunningProxy {
    /// The bound (inbound, mTLS) listener address, when there is an upstream.
    pub addr: Option<SocketAddr>,
    /// The bound outbound listener address (loopback, plain HTTP), if configured.
    pub outbound_addr: Option<SocketAddr>,
    /// The bound metrics listener address, if `metrics_addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    task: JoinHandle<()>,
    outbound_tasks: Vec<AbortOnDrop>,
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
        drop(self.outbound_tasks);
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
    let listener = match &cfg.upstream {
        Some(_) => Some(TcpListener::bind(cfg.listen_addr).await?),
        None => None,
    };
    let addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
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
    let telemetry = match &cfg.telemetry_broker {
        Some(b) => Some(telemetry::start(
            b,
            cfg.telemetry_window_secs,
            creds.clone(),
            clock.clone(),
        )?),
        None => None,
    };
    let risks: Arc<ArcSwap<risk::RiskTable>> = Arc::default();
    if let Some(socket) = &cfg.workload_api_socket {
        risk::watch_agent(socket, risks.clone());
    }
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
    let dpop_on = cfg.dpop;
    let mut metrics = metrics::Metrics::new(cfg.metrics_addr.is_some())
        .with_export(&counters)
        .with_audit(&audit);
    // The outbound side shares the credentials, policies, limits, audit log and metrics.
    let egress = match &cfg.outbound {
        Some(o) => {
            let e = Arc::new(egress::Egress::new(
                o,
                &cfg.issuer,
                cfg.token_leeway_secs,
                creds.clone(),
                clock.clone(),
            )?);
            metrics = metrics.with_outbound(&e);
            Some((o.clone(), e))
        }
        None => None,
    };
    let metrics = Arc::new(metrics);
    let outbound_state = egress.as_ref().map(|(_, e)| {
        Arc::new(
            stack::Proxy::new(
                validated.for_outbound(),
                stack::Side::Outbound(e.clone()),
                creds.clone(),
                clock.clone(),
                audit.clone(),
                policies.clone(),
                revoked_rx.clone(),
                limits.clone(),
                metrics.clone(),
            )
            .with_tracer(tracer.clone())
            .with_risks(risks.clone())
            .with_telemetry(telemetry.clone()),
        )
    });
    let inbound_side = match (&cfg.upstream, &cfg.audience) {
        (Some(u), Some(a)) => Some(stack::Side::Inbound {
            upstream: Box::new(upstream::Upstream::new(u, cfg.upstream_http2)),
            audience: a.clone(),
            tokens: token::TokenCache::default(),
            dpop: Box::new(dpop::DpopState::new(cfg)),
        }),
        _ => None,
    };
    let state = inbound_side.map(|side| {
        Arc::new(
            stack::Proxy::new(
                validated,
                side,
                creds.clone(),
                clock.clone(),
                audit,
                policies,
                revoked_rx,
                limits,
                metrics.clone(),
            )
            .with_tracer(tracer)
            .with_risks(risks)
            .with_telemetry(telemetry),
        )
    });
    let mut outbound_tasks = Vec::new();
    let mut outbound_addr = None;
    if let (Some((o, _)), Some(state)) = (&egress, &outbound_state) {
        if let Some(at) = o.listen_addr {
            let l = TcpListener::bind(at).await?;
            outbound_addr = Some(l.local_addr()?);
            outbound_tasks.push(AbortOnDrop(tokio::spawn(serve_outbound_tcp(
                l,
                state.clone(),
            ))));
            tracing::info!(addr = %at, "sigil proxy outbound listener (plain HTTP, local workload only)");
        }
        if let Some(path) = &o.listen_socket {
            let l = bind_unix(path)?;
            outbound_tasks.push(AbortOnDrop(tokio::spawn(serve_outbound_unix(
                l,
                state.clone(),
            ))));
            tracing::info!(socket = %path.display(), "sigil proxy outbound listener (unix socket)");
        }
    }
    let metrics_listener = match metrics_at {
        Some(at) => Some(
            sigil_metrics::serve(
                at,
                Arc::new(metrics::ProxyExporter {
                    metrics: metrics.clone(),
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
    let tls = tls::server_config(creds.clone(), clock.clone(), dpop_on)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        // Stops with the accept loop.
        let _metrics_listener = metrics_listener;
        let _shipper = shipper;
        let _export: Vec<AbortOnDrop> = export_tasks;
        let _traces = trace_task;
        let (Some(listener), Some(state)) = (listener, state) else {
            // Outbound only: nothing to accept here; the guards live until shutdown.
            std::future::pending::<()>().await;
            return;
        };
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
    if let Some(addr) = addr {
        tracing::info!(%addr, "sigil proxy listening");
    }
    Ok(RunningProxy {
        addr,
        outbound_addr,
        metrics_addr,
        task,
        outbound_tasks,
        creds: handle_creds,
        policies: handle_policies,
    })
}

/// Accepts the local workload's loopback TCP connections; each is served once the kernel
/// says which uid opened it.
async fn serve_outbound_tcp(listener: TcpListener, state: Arc<stack::Proxy>) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _open = state.metrics.connection_opened();
            let _ = tcp.set_nodelay(true);
            let uid = tcp
                .local_addr()
                .map_err(peer::PeerError::from)
                .and_then(|local| peer::tcp_peer_uid(local, remote))
                .map_err(|e| e.to_string());
            state.serve_local(tcp, uid).await;
        });
    }
}

/// Accepts the local workload's unix socket connections (`SO_PEERCRED`).
async fn serve_outbound_unix(listener: tokio::net::UnixListener, state: Arc<stack::Proxy>) {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _open = state.metrics.connection_opened();
            let uid = sock.peer_cred().map(|c| c.uid()).map_err(|e| e.to_string());
            state.serve_local(sock, uid).await;
        });
    }
}

/// Binds the outbound unix socket, replacing a stale one; anyone may connect (the peer's
/// uid decides, with a clear refusal, not the file mode).
fn bind_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            m.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(path)?;
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}
