//! The sigil trust authority (`sigil server`): a private CA issuing X.509-SVIDs, JWT-SVIDs and
//! certificate-bound OAuth access tokens, node attestation by join token, registration
//! entries, revocation, and the admin API, on SQLite or PostgreSQL.
#![forbid(unsafe_code)]

mod admin;
mod authority;
mod config;
mod exchange;
mod issuance_log;
mod issuer;
mod keyvault;
mod metrics;
mod models;
mod node_api;
mod public;
mod risk;
pub mod secrets;
mod tlog;
mod tls;
mod tpm;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sigil_core::{Clock, SpiffeId};
use sigil_pki::CertificateAuthority;
use sigil_store::{SqlStore, Store};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use authority::{
    Authorities, AuthorityInfo, KeySettings, RotationOutcome, create_private_dir,
    write_private_file,
};
pub use config::{ConfigError, DEFAULT_SCOPES, ExternalIssuer, ServerConfig};
pub use issuer::{IssueError, Issuer};
pub use node_api::{hash_join_token, node_id_for_token};
pub use tlog::{LOG_KEY_FILE, TransparencyLog, origin_for as log_origin_for};
pub use tls::PeerAuth;

/// What can stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] sigil_store::StoreError),
    #[error("pki: {0}")]
    Pki(#[from] sigil_pki::PkiError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Internal(String),
}

/// Everything a request handler needs.
pub struct AppState {
    pub config: ServerConfig,
    pub store: Arc<dyn Store>,
    pub authorities: Arc<Authorities>,
    pub issuer: Arc<Issuer>,
    pub clock: Arc<dyn Clock>,
    /// Bumped after every change an agent must hear about; sync streams wake on it.
    pub changes: watch::Sender<u64>,
    /// The transparency log of issued identities (served read-only).
    pub tlog: Arc<TransparencyLog>,
    /// Token exchange (RFC 8693): external issuers' keys and the `act_for` policy.
    pub exchange: exchange::Exchange,
    /// Sealed models: the data-key KEK and the header signing key.
    pub models: Arc<models::ModelAuthority>,
    /// Secrets: the secret KEK, the dynamic credential engines and the lease sweeper.
    pub secrets: Arc<secrets::SecretAuthority>,
}

impl AppState {
    /// Wakes every sync stream so it re-reads the store at once.
    pub fn notify_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A started server; dropping it does not stop it, [`RunningServer::shutdown`] does.
pub struct RunningServer {
    /// The bound address of the public listener.
    pub addr: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Shared state, for in-process callers (e.g. `sigil dev`).
    pub state: Arc<AppState>,
    /// The bound metrics listener address, if `metrics_addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl RunningServer {
    /// Stops accepting and ends the background tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_file(&self.admin_socket);
    }

    /// Waits until a background task ends (which only happens on failure or shutdown).
    pub async fn wait(&mut self) {
        let _ = self.tasks.join_next().await;
    }
}

/// Starts the server: opens the store, loads or creates the keys, binds both listeners.
pub async fn start(
    mut config: ServerConfig,
    clock: Arc<dyn Clock>,
) -> Result<RunningServer, ServerError> {
    config.validate()?;
    let tpm = tpm::TpmAttestation::from_config(&config)?;
    create_private_dir(&config.data_dir)?;
    let store: Arc<dyn Store> = Arc::new(SqlStore::connect(&config.database_url()).await?);
    let key_dir = config.data_dir.join("keys");
    let vault = Arc::new(match &config.key_encryption_key_file {
        Some(kek) => keyvault::KeyVault::sealed(key_dir.clone(), kek, store.clone())?,
        None => keyvault::KeyVault::Files(key_dir.clone()),
    });
    if matches!(*vault, keyvault::KeyVault::Sealed { .. }) {
        share_log_keys(&vault, &key_dir, &config.trust_domain.to_string()).await?;
    }
    let models = Arc::new(models::ModelAuthority::load(&vault).await?);
    let secrets = Arc::new(secrets::SecretAuthority::load(&vault).await?);
    let upstream = match (&config.upstream_ca_cert, &config.upstream_ca_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| ServerError::Io(format!("reading {}: {e}", p.display())))
            };
            Some(CertificateAuthority::from_pem(&read(cert)?, &read(key)?)?)
        }
        _ => None,
    };
    let authorities = Arc::new(
        Authorities::load_with_vault(
            store.clone(),
            clock.clone(),
            KeySettings {
                trust_domain: config.trust_domain.clone(),
                ca_alg: config.ca_key_type,
                ca_ttl_secs: config.ca_ttl_secs,
                jwt_alg: config.jwt_key_type,
                key_dir: config.data_dir.join("keys"),
            },
            upstream,
            vault,
        )
        .await?,
    );
    let tlog = Arc::new(TransparencyLog::load_or_create(
        store.clone(),
        &config.data_dir.join("keys"),
        &tlog::origin_for(&config.trust_domain.to_string()),
    )?);
    let issuer = Arc::new(Issuer::new(
        store.clone(),
        authorities.clone(),
        clock.clone(),
        config.trust_domain.clone(),
    ));
    let server_id = server_spiffe_id(&config)?;
    let identity =
        tls::ServerIdentity::issue(&issuer, server_id, config.server_dns_names.clone()).await?;
    let tls_config = identity.server_config()?;

    let listener = TcpListener::bind(config.listen_addr)
        .await
        .map_err(|e| ServerError::Io(format!("binding {}: {e}", config.listen_addr)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Io(e.to_string()))?;
    // Port 0 asks for any free port: what is derived from the address (the default issuer,
    // `https://localhost:<port>`) uses the one bound.
    if config.listen_addr.port() == 0 {
        config.listen_addr.set_port(addr.port());
    }
    let admin_socket = config.admin_socket_path();
    let admin_listener = bind_admin_socket(&admin_socket)?;
    let admin_uid = std::fs::metadata(&admin_socket)
        .map_err(|e| ServerError::Io(format!("{}: {e}", admin_socket.display())))?
        .uid();

    let server_metrics = metrics::ServerMetrics::new(config.metrics_addr.is_some());
    let exchange = exchange::Exchange::new(&config)?;
    let state = Arc::new(AppState {
        exchange,
        config,
        store,
        authorities: authorities.clone(),
        issuer: issuer.clone(),
        clock: clock.clone(),
        changes: watch::channel(0).0,
        tlog,
        models,
        secrets,
    });
    let node = sigil_proto::node::v1::node_server::NodeServer::new(node_api::NodeApi::new(
        state.clone(),
        tpm,
    ))
    .max_decoding_message_size(4 * 1024 * 1024);
    let public =
        public::router(state.clone()).merge(tonic::service::Routes::new(node).into_axum_router());
    let public = public.layer(sigil_metrics::ObserveLayer(server_metrics.clone()));
    let admin = admin::router(state.clone());

    let (shutdown, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut metrics_addr = None;
    if let Some(at) = state.config.metrics_addr {
        let exporter = metrics::ServerExporter {
            metrics: server_metrics,
            store: state.store.clone(),
        };
        let listener = sigil_metrics::serve(at, Arc::new(exporter))
            .await
            .map_err(|e| ServerError::Io(e.to_string()))?;
        metrics_addr = Some(listener.addr);
        // Held by a task so that shutdown (which aborts the tasks) stops it.
        tasks.spawn(async move {
            let _listener = listener;
            std::future::pending::<()>().await
        });
    }
    tasks.spawn(tls::serve_tls(
        listener,
        tls_config,
        public,
        authorities.clone(),
        clock.clone(),
        rx.clone(),
    ));
    tasks.spawn(serve_admin(admin_listener, admin, admin_uid, rx));
    tasks.spawn(identity.rotate_forever(issuer));
    tasks.spawn(secrets::sweep_forever(state.clone()));
    if let Some(t) = state.config.telemetry.clone() {
        tasks.spawn(risk::telemetry_forever(state.clone(), t));
    }
    if state.config.is_postgres() {
        // Changes committed through any replica (or any other writer) reach this replica's
        // sync streams at once; the streams' 1 s poll stays as the fallback.
        let url = state.config.database_url();
        let app = state.clone();
        let (refresh_tx, mut refresh_rx) = watch::channel(0u64);
        tasks.spawn(async move {
            sigil_store::listen_for_changes(&url, |what| {
                // The trust bundle (rotation, pruning) is cached: re-read it first.
                if matches!(what, None | Some("bundle_sequence")) {
                    refresh_tx.send_modify(|n| *n = n.wrapping_add(1));
                }
                app.notify_change();
            })
            .await;
        });
        let app = state.clone();
        tasks.spawn(async move {
            while refresh_rx.changed().await.is_ok() {
                if let Err(e) = app.authorities.refresh().await {
                    tracing::warn!(error = %e, "refreshing authorities failed");
                }
                app.notify_change();
            }
        });
    }
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if let Err(e) = authorities.refresh().await {
                tracing::warn!(error = %e, "refreshing authorities failed");
            }
        }
    });
    tracing::info!(%addr, admin_socket = %admin_socket.display(), trust_domain = %state.config.trust_domain, "sigil server ready");
    Ok(RunningServer {
        addr,
        admin_socket,
        state,
        metrics_addr,
        shutdown,
        tasks,
    })
}

/// With sealed keys, the transparency and audit log keys are shared too: the database holds
/// them (the first replica stores its local key file's, or a new one); each replica writes
/// that one to its key file (0600), where the logs load it from.
async fn share_log_keys(
    vault: &keyvault::KeyVault,
    key_dir: &Path,
    trust_domain: &str,
) -> Result<(), ServerError> {
    create_private_dir(key_dir)?;
    for (name, origin) in [
        (tlog::LOG_KEY_FILE, tlog::origin_for(trust_domain)),
        (tlog::AUDIT_KEY_FILE, tlog::audit_origin_for(trust_domain)),
    ] {
        let path = key_dir.join(name);
        let skey = vault
            .get_or_create(name, || match std::fs::read_to_string(&path) {
                Ok(s) => Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut seed = [0u8; 32];
                    rand::Rng::fill(&mut rand::rng(), &mut seed);
                    let key = sigil_log::LogKey::from_seed(&origin, &seed)
                        .map_err(|e| ServerError::Internal(e.to_string()))?;
                    Ok(format!("{}\n", key.skey()))
                }
                Err(e) => Err(ServerError::Io(format!("reading {}: {e}", path.display()))),
            })
            .await?;
        write_private_file(&path, skey.as_bytes())?;
    }
    Ok(())
}

/// The server's own SPIFFE ID.
pub fn server_spiffe_id(config: &ServerConfig) -> Result<SpiffeId, ServerError> {
    config
        .trust_domain
        .id("/sigil/server")
        .map_err(|e| ServerError::Internal(e.to_string()))
}

fn bind_admin_socket(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::Io(format!(
                    "{} is in use: is another server running?",
                    path.display()
                )));
            }
            std::fs::remove_file(path)
                .map_err(|e| ServerError::Io(format!("removing stale {}: {e}", path.display())))?;
        }
        Ok(_) => {
            return Err(ServerError::Io(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path)
        .map_err(|e| ServerError::Io(format!("binding {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ServerError::Io(format!("chmod {}: {e}", path.display())))?;
    Ok(l)
}

/// Serves the admin API to callers running as the socket's owner (or root) only.
async fn serve_admin(
    listener: UnixListener,
    router: axum::Router,
    owner_uid: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !matches!(uid, Some(u) if u == owner_uid || u == 0) {
            tracing::warn!(?uid, "admin connection from another user refused");
            continue;
        }
        let router = router.clone();
        tokio::spawn(tls::serve_http(stream, router, ()));
    }
}
