//! `sigil server`: run the trust authority in the foreground until SIGINT/SIGTERM.
use std::path::PathBuf;
use std::sync::Arc;

use sigil_core::SystemClock;
use sigil_server::ServerConfig;

use crate::config::load;

/// Flags of `sigil server`; each overrides the config file key of the same name.
#[derive(Debug, Default, clap::Args)]
pub struct ServerArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "SIGIL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Trust domain, e.g. `factory.example`.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Data directory (database, keys, admin socket).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Public listener address (HTTPS + gRPC).
    #[arg(long)]
    pub listen_addr: Option<String>,
    /// Admin socket path.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// `sqlite://...` or `postgres://...`.
    #[arg(long)]
    pub database_url: Option<String>,
    /// OAuth/OIDC issuer URL.
    #[arg(long)]
    pub issuer: Option<String>,
    /// CA key algorithm: ecdsa-p256 or ed25519.
    #[arg(long)]
    pub ca_key_type: Option<String>,
    /// JWT algorithm: ES256 or EdDSA.
    #[arg(long)]
    pub jwt_key_type: Option<String>,
    /// Sign with this CA certificate (PEM) instead of generating one; needs --upstream-ca-key.
    #[arg(long)]
    pub upstream_ca_cert: Option<PathBuf>,
    /// PKCS#8 PEM key of --upstream-ca-cert.
    #[arg(long)]
    pub upstream_ca_key: Option<PathBuf>,
    /// 32-byte key (file, 0600) sealing the signing keys in PostgreSQL; the same on every
    /// replica. Required with a postgres:// database.
    #[arg(long)]
    pub key_encryption_key_file: Option<PathBuf>,
    /// PEM CA certificates of trusted TPM manufacturers; turns on TPM node attestation.
    #[arg(long)]
    pub tpm_ek_roots: Option<PathBuf>,
    /// Refuse TPM nodes whose event log does not show Secure Boot enabled.
    #[arg(long)]
    pub tpm_require_secure_boot: bool,
    /// Golden PCR value, PCR=SHA-256 hex (e.g. 7=ab12…; repeat for several PCRs).
    #[arg(long = "tpm-golden-pcr", value_parser = parse_golden_pcr)]
    pub tpm_golden_pcrs: Vec<(String, String)>,
    /// Accept this EK without an EK certificate: the SHA-256 of its public key, as
    /// `sigil tpm ek-hash` prints it on the device (repeat for several).
    #[arg(long = "tpm-ek-hash")]
    pub tpm_ek_hashes: Vec<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Serve Prometheus /metrics, /healthz and /readyz here (plain HTTP; use loopback).
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

impl ServerArgs {
    /// The flags that were given, as configuration values.
    pub fn flags(&self) -> Vec<(&'static str, toml::Value)> {
        let mut v = Vec::new();
        let mut s = |k: &'static str, x: &Option<String>| {
            if let Some(x) = x {
                v.push((k, toml::Value::String(x.clone())));
            }
        };
        s("trust_domain", &self.trust_domain);
        s("listen_addr", &self.listen_addr);
        s("database_url", &self.database_url);
        s("issuer", &self.issuer);
        s("ca_key_type", &self.ca_key_type);
        s("jwt_key_type", &self.jwt_key_type);
        s("log_format", &self.log_format);
        s("metrics_addr", &self.metrics_addr);
        let mut p = |k: &'static str, x: &Option<PathBuf>| {
            if let Some(x) = x {
                v.push((k, toml::Value::String(x.display().to_string())));
            }
        };
        p("data_dir", &self.data_dir);
        p("admin_socket", &self.admin_socket);
        p("upstream_ca_cert", &self.upstream_ca_cert);
        p("upstream_ca_key", &self.upstream_ca_key);
        p("key_encryption_key_file", &self.key_encryption_key_file);
        p("tpm_ek_roots", &self.tpm_ek_roots);
        if self.tpm_require_secure_boot {
            v.push(("tpm_require_secure_boot", toml::Value::Boolean(true)));
        }
        if !self.tpm_golden_pcrs.is_empty() {
            let table = self
                .tpm_golden_pcrs
                .iter()
                .map(|(k, x)| (k.clone(), toml::Value::String(x.clone())))
                .collect();
            v.push(("tpm_golden_pcrs", toml::Value::Table(table)));
        }
        if !self.tpm_ek_hashes.is_empty() {
            let list = self
                .tpm_ek_hashes
                .iter()
                .map(|h| toml::Value::String(h.clone()))
                .collect();
            v.push(("tpm_ek_hashes", toml::Value::Array(list)));
        }
        v
    }
}

/// `--tpm-golden-pcr PCR=HEX`; the values are checked with the rest of the configuration.
fn parse_golden_pcr(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, x)| (k.trim().to_owned(), x.trim().to_owned()))
        .ok_or_else(|| format!("{s:?}: expected PCR=SHA-256 hex, e.g. 7=ab12…"))
}

/// Loads and validates the configuration (exit 64 on any problem).
pub fn load_config(args: &ServerArgs) -> anyhow::Result<ServerConfig> {
    let cfg: ServerConfig = load(args.config.as_deref(), ServerConfig::KEYS, args.flags())?;
    cfg.validate()?;
    Ok(cfg)
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args)?;
    super::init_logging(cfg.log_format == "json");
    let server = sigil_server::start(cfg, Arc::new(SystemClock)).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
