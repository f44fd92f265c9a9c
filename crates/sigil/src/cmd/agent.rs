//! `sigil agent`: run the node agent in the foreground until SIGINT/SIGTERM (or eviction).
use std::path::PathBuf;
use std::sync::Arc;

use sigil_agent::AgentConfig;
use sigil_core::SystemClock;

use crate::config::load;

/// Flags of `sigil agent`; each overrides the config file key of the same name.
#[derive(Debug, Default, clap::Args)]
pub struct AgentArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "SIGIL_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Trust domain of the server.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// The server, host:port.
    #[arg(long = "server")]
    pub server_address: Option<String>,
    /// Cache directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Workload API socket path.
    #[arg(long = "socket")]
    pub socket_path: Option<PathBuf>,
    /// Join token for the first attestation.
    #[arg(long)]
    pub join_token: Option<String>,
    /// Node attestor: join_token or tpm.
    #[arg(long)]
    pub attestor: Option<String>,
    /// TPM TCTI (with --attestor tpm), e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321.
    #[arg(long)]
    pub tpm_tcti: Option<String>,
    /// TCG event log to send (with --attestor tpm).
    #[arg(long)]
    pub tpm_event_log: Option<PathBuf>,
    /// PEM CA bundle to trust the server with before the first attestation.
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Serve Prometheus /metrics, /healthz and /readyz here (plain HTTP; use loopback).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Where secret files are written (a directory per workload uid; use a tmpfs).
    #[arg(long)]
    pub secrets_dir: Option<PathBuf>,
    /// Keep a secret written to a file for a workload: SPIFFE_ID,SECRET_PATH,FILE_NAME
    /// (repeatable; adds to the config file's `secret_files`).
    #[arg(long = "secret-file", value_parser = parse_secret_file)]
    pub secret_files: Vec<sigil_agent::SecretFile>,
    /// The posture ruleset (TOML); the built-in default when unset.
    #[arg(long)]
    pub posture_rules: Option<PathBuf>,
    /// How often posture is observed, seconds (default 30; 0: off).
    #[arg(long)]
    pub posture_interval_secs: Option<i64>,
    /// Publish the node's behaviour telemetry to this MQTT broker (mqtt://host:port).
    #[arg(long)]
    pub telemetry_broker: Option<String>,
}

/// `--secret-file SPIFFE_ID,SECRET_PATH,FILE_NAME`.
fn parse_secret_file(s: &str) -> Result<sigil_agent::SecretFile, String> {
    let mut parts = s.splitn(3, ',');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(id), Some(secret), Some(file)) if !id.is_empty() && !secret.is_empty() => {
            Ok(sigil_agent::SecretFile {
                spiffe_id: id.to_owned(),
                secret: secret.to_owned(),
                file: file.to_owned(),
            })
        }
        _ => Err("expected SPIFFE_ID,SECRET_PATH,FILE_NAME".into()),
    }
}

impl AgentArgs {
    fn flags(&self) -> Vec<(&'static str, toml::Value)> {
        let mut v = Vec::new();
        let s = |x: &Option<String>| x.clone().map(toml::Value::String);
        let p = |x: &Option<PathBuf>| {
            x.as_ref()
                .map(|p| toml::Value::String(p.display().to_string()))
        };
        for (k, val) in [
            ("trust_domain", s(&self.trust_domain)),
            ("server_address", s(&self.server_address)),
            ("join_token", s(&self.join_token)),
            ("attestor", s(&self.attestor)),
            ("tpm_tcti", s(&self.tpm_tcti)),
            ("tpm_event_log", p(&self.tpm_event_log)),
            ("log_format", s(&self.log_format)),
            ("metrics_addr", s(&self.metrics_addr)),
            ("data_dir", p(&self.data_dir)),
            ("socket_path", p(&self.socket_path)),
            ("trust_bundle", p(&self.trust_bundle)),
            ("secrets_dir", p(&self.secrets_dir)),
            ("posture_rules", p(&self.posture_rules)),
            (
                "posture_interval_secs",
                self.posture_interval_secs.map(toml::Value::Integer),
            ),
            ("telemetry_broker", s(&self.telemetry_broker)),
        ] {
            if let Some(val) = val {
                v.push((k, val));
            }
        }
        v
    }
}

/// Loads and validates the agent configuration (exit 64 on any problem).
pub fn load_config(args: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let mut cfg: AgentConfig = load(args.config.as_deref(), AgentConfig::KEYS, args.flags())?;
    cfg.secret_files.extend(args.secret_files.iter().cloned());
    cfg.validate()
        .map_err(|e| crate::config::UsageError(e.to_string()))?;
    Ok(cfg)
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args)?;
    super::init_logging(cfg.log_format == "json");
    let mut agent = sigil_agent::start(cfg, Arc::new(SystemClock)).await?;
    let result = tokio::select! {
        _ = super::server::wait_for_signal() => Ok(()),
        r = agent.wait() => r.map_err(anyhow::Error::from),
    };
    agent.shutdown().await;
    result
}
