//! The sigil node agent (`sigil agent`): attests its device to the server with a join token,
//! follows the server's sync stream, signs and rotates workload SVIDs (keys made here, never
//! sent), caches everything on disk for offline operation, and serves the standard SPIFFE
//! Workload API on a unix socket to local processes identified by the kernel, with sigil's
//! Enforcer API (the revocation list, for the sidecar proxy) on the same socket.
#![forbid(unsafe_code)]

mod attestor;
mod cache;
mod client;
mod config;
mod enforcer;
mod h2_authority;
mod identity;
pub mod log_witness;
mod metrics;
mod peer;
pub mod policy;
mod posture;
mod revocation;
mod secrets;
pub use sigil_fs::slot as slotfile;

mod tls;
mod workload_api;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sigil_core::Clock;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

pub use attestor::{AttestationError, JoinTokenAttestor, NodeAttestor, TpmAttestor};
pub use config::{AgentConfig, AgentConfigError};
pub use identity::{Identities, IdentityError, Snapshot};
pub use peer::{AttestError, PeerCred, WorkloadAttestor};
pub use revocation::RevocationList;
pub use secrets::SecretFile;

/// A started agent.
pub struct RunningAgent {
    /// The Workload API (and Enforcer API) socket.
    pub socket: PathBuf,
    /// The node's identities and what comes with them (snapshots, for in-process callers).
    pub identities: Arc<Identities>,
    identity_task: JoinHandle<Result<(), IdentityError>>,
    server_task: JoinHandle<()>,
    /// Keeps `secret_files` written, if any.
    render_task: Option<JoinHandle<()>>,
    posture_task: Option<JoinHandle<()>>,
    /// The bound metrics listener address, if `metrics_addr` is set.
    pub metrics_addr: Option<std::net::SocketAddr>,
    _metrics: Option<metrics::Running>,
}

impl RunningAgent {
    /// Waits until the node has lost its identity for good (eviction, none to attest with).
    pub async fn wait(&mut self) -> Result<(), IdentityError> {
        match (&mut self.identity_task).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.identity_task.abort();
        self.server_task.abort();
        if let Some(t) = &self.render_task {
            t.abort();
        }
        if let Some(t) = &self.posture_task {
            t.abort();
        }
        let _ = self.server_task.await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Loads the cache, starts serving it at once, and starts syncing with the server.
pub async fn start(cfg: AgentConfig, clock: Arc<dyn Clock>) -> anyhow::Result<RunningAgent> {
    cfg.validate()?;
    let socket = cfg.socket();
    let (metrics_at, cache_dir) = (cfg.metrics_addr, cfg.data_dir.join("cache"));
    let agent_metrics = metrics::AgentMetrics::new(metrics_at.is_some());
    let (secrets_dir, secret_files) = (cfg.secrets_dir.clone(), cfg.secret_files.clone());
    let posture = match cfg.posture_interval_secs {
        0 => None,
        secs => Some((
            posture::load_ruleset(cfg.posture_rules.as_deref())?,
            std::time::Duration::from_secs(u64::from(secs)),
            cfg.telemetry_broker.clone(),
        )),
    };
    let identities = Identities::load(cfg, clock)?;
    let listener = bind_socket(&socket)?;
    let server_task = serve_observed(listener, identities.clone(), agent_metrics.clone());
    let render_task = (!secret_files.is_empty()).then(|| {
        tokio::spawn(secrets::render_forever(
            identities.clone(),
            secrets_dir,
            secret_files,
        ))
    });
    let metrics_running = match metrics_at {
        Some(at) => Some(metrics::start(at, agent_metrics, identities.clone(), cache_dir).await?),
        None => None,
    };
    let identity_task = tokio::spawn(identities.clone().run());
    let posture_task = posture.map(|(rules, every, broker)| {
        tokio::spawn(posture::report_forever(
            identities.clone(),
            rules,
            every,
            broker,
        ))
    });
    tracing::info!(socket = %socket.display(), "Workload API listening");
    Ok(RunningAgent {
        socket,
        identities,
        identity_task,
        server_task,
        render_task,
        posture_task,
        metrics_addr: metrics_running.as_ref().map(|m| m.addr()),
        _metrics: metrics_running,
    })
}

/// Serves the SPIFFE Workload API and sigil's Enforcer API on one tonic router, over the
/// `:authority` adapter, every connection carrying its peer credentials.
#[cfg_attr(not(test), allow(dead_code))]
fn serve(listener: UnixListener, identities: Arc<Identities>) -> JoinHandle<()> {
    serve_observed(listener, identities, metrics::AgentMetrics::new(false))
}

/// [`serve`], counting the calls in `agent_metrics`.
fn serve_observed(
    listener: UnixListener,
    identities: Arc<Identities>,
    agent_metrics: Arc<metrics::AgentMetrics>,
) -> JoinHandle<()> {
    let attestor = Arc::new(WorkloadAttestor::new());
    let api = workload_api::WorkloadApi::new(identities.clone(), attestor.clone());
    let enforcer = enforcer::EnforcerApi::new(identities.clone(), attestor.clone());
    let secrets = secrets::SecretsApi::new(identities, attestor);
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|s| s.map(workload_api::AcceptedStream::new));
    tokio::spawn(async move {
        let svc =
            sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(api);
        let enf = sigil_proto::enforcer::enforcer_server::EnforcerServer::new(enforcer);
        let sec = sigil_proto::agent::secrets_server::SecretsServer::new(secrets);
        if let Err(e) = tonic::transport::Server::builder()
            .layer(sigil_metrics::ObserveLayer(agent_metrics))
            .add_service(svc)
            .add_service(enf)
            .add_service(sec)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "Workload API server failed");
        }
    })
}

/// Binds the Workload API socket: any local process may connect (what it gets is decided by
/// its kernel-reported identity), so the socket is 0666 in a 0755 directory.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            m.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "{} is in use: is another agent running?",
            path.display()
        );
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}
