//! The agent's configuration, validated completely before anything binds.
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use sigil_core::TrustDomain;

/// `sigil agent` configuration (TOML; each key overridable by `SIGIL_<KEY>` and by a flag).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The trust domain of the server.
    pub trust_domain: TrustDomain,
    /// The server's public listener, `host:port`; with several replicas a comma-separated
    /// list (`a:8443,b:8443`): the agent uses one and moves to the next on disconnect.
    pub server_address: String,
    /// Data directory: `cache/` (node identity, SVIDs, bundle, entries; 0700, files 0600)
    /// and, by default, `public/api.sock`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The Workload API socket; default `<data_dir>/public/api.sock`.
    #[serde(default)]
    pub socket_path: Option<PathBuf>,
    /// A single-use join token for the first attestation.
    #[serde(default)]
    pub join_token: Option<String>,
    /// How the node proves itself: `join_token` (the default when a join token is given) or
    /// `tpm` (TPM 2.0: EK certificate, credential activation, quote, event log).
    #[serde(default)]
    pub attestor: Option<String>,
    /// With `attestor = "tpm"`: the TPM's TCTI, e.g. `device:/dev/tpmrm0` (the default) or
    /// `swtpm:host=127.0.0.1,port=2321`.
    #[serde(default)]
    pub tpm_tcti: Option<String>,
    /// With `attestor = "tpm"`: the TCG event log to send (default the kernel's
    /// `/sys/kernel/security/tpm0/binary_bios_measurements`).
    #[serde(default)]
    pub tpm_event_log: Option<PathBuf>,
    /// PEM CA certificates to trust the server with before the first attestation.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Where to serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over plain
    /// HTTP; off when unset. Use a loopback address.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Where secret files are written, in a directory per workload uid (use a tmpfs, e.g.
    /// under `/run`); default `/run/sigil/secrets`.
    #[serde(default = "default_secrets_dir")]
    pub secrets_dir: PathBuf,
    /// Secrets kept written to files for workloads that cannot call the Secrets API:
    /// `[[secret_files]] spiffe_id = "...", secret = "<path>", file = "<name>"` writes
    /// `<secrets_dir>/<uid>/<name>` (0400, the workload's uid from its entry's `unix:uid`).
    #[serde(default)]
    pub secret_files: Vec<crate::secrets::SecretFile>,
    /// The posture ruleset (TOML, see docs/posture.md); the built-in default when unset.
    #[serde(default)]
    pub posture_rules: Option<PathBuf>,
    /// How often posture is observed (seconds); a change is reported at once. 0: off.
    #[serde(default = "default_posture_interval")]
    pub posture_interval_secs: u32,
    /// Publish the node's behaviour (new executables, posture score) each posture round to
    /// this MQTT broker (`mqtt://host:port`), signed with the node SVID. Off when unset.
    #[serde(default)]
    pub telemetry_broker: Option<String>,
}

fn default_posture_interval() -> u32 {
    30
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/sigil/agent")
}
fn default_secrets_dir() -> PathBuf {
    PathBuf::from("/run/sigil/secrets")
}
fn default_log_format() -> String {
    "text".into()
}

/// A configuration value that is present but wrong; names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct AgentConfigError {
    pub key: &'static str,
    pub message: String,
}

impl AgentConfig {
    /// Every key of the configuration file.
    pub const KEYS: &'static [&'static str] = &[
        "trust_domain",
        "server_address",
        "data_dir",
        "socket_path",
        "join_token",
        "attestor",
        "tpm_tcti",
        "tpm_event_log",
        "trust_bundle",
        "log_format",
        "metrics_addr",
        "secrets_dir",
        "secret_files",
        "posture_rules",
        "posture_interval_secs",
        "telemetry_broker",
    ];

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), AgentConfigError> {
        let bad = |key, message: &str| AgentConfigError {
            key,
            message: message.to_owned(),
        };
        let servers = self.servers();
        if servers.is_empty() {
            return Err(bad("server_address", "must be host:port[,host:port...]"));
        }
        for server in servers {
            match server.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => return Err(bad("server_address", "must be host:port[,host:port...]")),
            }
        }
        if let Some(t) = &self.join_token
            && (t.is_empty() || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(bad("join_token", "malformed join token"));
        }
        match self.attestor.as_deref() {
            None | Some("join_token") => {}
            Some("tpm") if self.join_token.is_some() => {
                return Err(bad(
                    "attestor",
                    "a join token is not used with the tpm attestor",
                ));
            }
            Some("tpm") => {}
            Some(_) => return Err(bad("attestor", "must be \"join_token\" or \"tpm\"")),
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(bad("log_format", "must be \"text\" or \"json\""));
        }
        if let Some(b) = &self.telemetry_broker
            && sigil_telemetry::BrokerConfig::new(b, sigil_telemetry::DEFAULT_KEEP_ALIVE_SECS)
                .is_err()
        {
            return Err(bad("telemetry_broker", "must be mqtt://host:port"));
        }
        if self.telemetry_broker.is_some() && self.posture_interval_secs == 0 {
            return Err(bad(
                "telemetry_broker",
                "node telemetry is published each posture round: posture_interval_secs must not be 0",
            ));
        }
        if !self.secrets_dir.is_absolute() {
            return Err(bad("secrets_dir", "must be an absolute path"));
        }
        for f in &self.secret_files {
            if sigil_core::SpiffeId::new(&f.spiffe_id).is_err() {
                return Err(bad("secret_files", "spiffe_id must be a SPIFFE ID"));
            }
            if f.secret.is_empty() || f.secret.len() > 256 {
                return Err(bad("secret_files", "secret must be a secret path"));
            }
            if !f.valid_file_name() {
                return Err(bad(
                    "secret_files",
                    "file must be one plain name (A-Z a-z 0-9 . _ -, not starting with .)",
                ));
            }
        }
        Ok(())
    }

    /// Whether the node attests with its TPM.
    pub fn uses_tpm(&self) -> bool {
        self.attestor.as_deref() == Some("tpm")
    }

    /// The server replicas, in the order given.
    pub fn servers(&self) -> Vec<&str> {
        self.server_address
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The Workload API socket path.
    pub fn socket(&self) -> PathBuf {
        self.socket_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("public").join("api.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::AgentConfig;

    fn config(extra: serde_json::Value) -> AgentConfig {
        let mut v = serde_json::json!({
            "trust_domain": "td.test",
            "server_address": "127.0.0.1:8443",
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_tpm_attestor_is_accepted_alone() {
        let c = config(serde_json::json!({"attestor": "tpm", "tpm_tcti": "swtpm:port=2321"}));
        assert!(c.validate().is_ok());
        assert!(c.uses_tpm());
        assert!(!config(serde_json::json!({"join_token": "t"})).uses_tpm());
    }

    #[test]
    fn an_unknown_attestor_or_a_token_with_the_tpm_attestor_is_refused() {
        let e = config(serde_json::json!({"attestor": "tmp"}))
            .validate()
            .unwrap_err();
        assert_eq!(e.key, "attestor");
        let e = config(serde_json::json!({"attestor": "tpm", "join_token": "t"}))
            .validate()
            .unwrap_err();
        assert_eq!(e.key, "attestor");
    }
}
