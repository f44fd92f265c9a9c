//! The trust authority's configuration, validated completely before anything binds.
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use sigil_core::TrustDomain;
use sigil_pki::{JwtAlgorithm, KeyAlgorithm};

/// Scopes a fresh server knows. Extend with `oauth_scopes` in the config file.
pub const DEFAULT_SCOPES: &[&str] = &[
    "model:invoke",
    "model:list",
    "tool:call",
    "tool:list",
    "http:request",
];

/// `sigil server` configuration. Every key can be set in the TOML file, overridden by the
/// environment variable `SIGIL_<KEY>` (upper case) and by the matching command-line flag.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The trust domain this server is the authority for, e.g. `factory.example`.
    pub trust_domain: TrustDomain,
    /// Where the database (SQLite), keys and the admin socket live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The HTTPS + gRPC listener (node API, OIDC, token endpoint, bundle).
    #[serde(default = "default_listen")]
    pub listen_addr: SocketAddr,
    /// The admin API's unix socket; default `<data_dir>/admin.sock`.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// `sqlite://...` or `postgres://...`; default SQLite at `<data_dir>/sigil.db`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// How long a workload may keep a static secret it read before it must read it again
    /// (the lease its answer carries), seconds; never past its X.509-SVID's expiry.
    #[serde(default = "default_secret_lease")]
    pub secret_lease_secs: u32,
    /// Score thresholds of the risk levels (`[risk]`: medium, high, critical).
    #[serde(default)]
    pub risk: crate::risk::RiskLevels,
    /// Behaviour telemetry over MQTT (`[telemetry]`); off when absent.
    #[serde(default)]
    pub telemetry: Option<crate::risk::TelemetryConfig>,
    /// The OAuth issuer URL; default `https://localhost:<port>`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// DNS names on the server's own TLS certificate.
    #[serde(default = "default_dns")]
    pub server_dns_names: Vec<String>,
    /// CA key algorithm: `ecdsa-p256` (default) or `ed25519`.
    #[serde(default = "default_ca_alg")]
    pub ca_key_type: KeyAlgorithm,
    /// CA certificate lifetime in seconds (default one year).
    #[serde(default = "default_ca_ttl")]
    pub ca_ttl_secs: u32,
    /// JWT signing algorithm: `ES256` (default) or `EdDSA`.
    #[serde(default = "default_jwt_alg")]
    pub jwt_key_type: JwtAlgorithm,
    /// PEM CA certificate to sign with instead of generating one (needs `upstream_ca_key`).
    #[serde(default)]
    pub upstream_ca_cert: Option<PathBuf>,
    /// PEM PKCS#8 key of `upstream_ca_cert`.
    #[serde(default)]
    pub upstream_ca_key: Option<PathBuf>,
    /// OAuth scopes this authority knows; requests for others get `invalid_scope`.
    #[serde(default = "default_scopes")]
    pub oauth_scopes: Vec<String>,
    /// Audience of access tokens when the client names none (RFC 8707 `resource`).
    #[serde(default = "default_audience")]
    pub default_audience: String,
    /// Access token lifetime in seconds.
    #[serde(default = "default_token_ttl")]
    pub access_token_ttl_secs: u32,
    /// Node SVID lifetime in seconds.
    #[serde(default = "default_node_ttl")]
    pub node_svid_ttl_secs: u32,
    /// Largest request body accepted on the public listener, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Where to serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over plain
    /// HTTP; off when unset. Use a loopback address.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// With PostgreSQL (replicas sharing one database): a file of 32 random bytes (or 64 hex
    /// digits), mode 0600, the same on every replica; the private keys are stored in the
    /// database sealed (AES-256-GCM) under it. Required with `postgres://`.
    #[serde(default)]
    pub key_encryption_key_file: Option<PathBuf>,
    /// PEM CA certificates of the TPM manufacturers whose EK certificates are trusted.
    /// Setting it turns on TPM 2.0 node attestation; unset, TPM attestation is refused.
    #[serde(default)]
    pub tpm_ek_roots: Option<PathBuf>,
    /// The SHA-256 PCRs a TPM node's quote must cover (default 0–7).
    #[serde(default = "default_tpm_pcrs")]
    pub tpm_pcrs: Vec<u8>,
    /// Refuse TPM nodes whose event log does not show Secure Boot enabled.
    #[serde(default)]
    pub tpm_require_secure_boot: bool,
    /// Golden PCR values: a table of PCR index (as a string key, `"7"`) → SHA-256 value (64
    /// hex digits). A TPM node whose replayed PCR differs is refused. Each PCR must be
    /// among `tpm_pcrs`.
    #[serde(default)]
    pub tpm_golden_pcrs: std::collections::BTreeMap<String, String>,
    /// EKs accepted without an EK certificate (TPMs that have none in NV): SHA-256 of the
    /// EK's SubjectPublicKeyInfo, 64 hex digits each, as `sigil tpm ek-hash` prints it on
    /// the device. Setting it (or `tpm_ek_roots`) turns on TPM node attestation.
    #[serde(default)]
    pub tpm_ek_hashes: Vec<String>,
    /// OpenID providers whose users' tokens workloads may exchange (RFC 8693) for tokens
    /// that act for those users (`[[external_issuers]]` tables). None: only sigil's own
    /// delegated tokens can be exchanged further.
    #[serde(default)]
    pub external_issuers: Vec<ExternalIssuer>,
    /// The longest chain of workloads a delegated token may pass through (1: only the first
    /// agent may act for the user, no further hop).
    #[serde(default = "default_max_delegation_depth")]
    pub max_delegation_depth: u32,
}

/// An external OpenID provider trusted for token exchange.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuer {
    /// The `iss` its tokens carry, exactly.
    pub issuer: String,
    /// Where its signing keys are (JWKS); fetched on first use, cached, and fetched again
    /// when a token names a key the cache lacks (at most once per `jwks_refresh_secs`).
    /// `https://`, or `http://` on a loopback address only.
    pub jwks_uri: String,
    /// The audience its tokens must carry to be exchanged here.
    pub audience: String,
    /// The claim holding the user's groups (an array of strings, or one string).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The JWS algorithms accepted (asymmetric only).
    #[serde(default = "default_external_algs")]
    pub algorithms: Vec<String>,
    /// Least seconds between two JWKS fetches.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
}

fn default_groups_claim() -> String {
    "groups".into()
}
fn default_external_algs() -> Vec<String> {
    vec![
        "RS256".into(),
        "ES256".into(),
        "PS256".into(),
        "EdDSA".into(),
    ]
}
fn default_jwks_refresh() -> u64 {
    30
}
fn default_secret_lease() -> u32 {
    300
}
fn default_max_delegation_depth() -> u32 {
    3
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/sigil/server")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_dns() -> Vec<String> {
    vec!["localhost".into()]
}
fn default_ca_alg() -> KeyAlgorithm {
    KeyAlgorithm::EcdsaP256
}
fn default_ca_ttl() -> u32 {
    365 * 24 * 3600
}
fn default_jwt_alg() -> JwtAlgorithm {
    JwtAlgorithm::Es256
}
fn default_scopes() -> Vec<String> {
    DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect()
}
fn default_audience() -> String {
    "sigil".into()
}
fn default_token_ttl() -> u32 {
    300
}
fn default_node_ttl() -> u32 {
    24 * 3600
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_log_format() -> String {
    "text".into()
}
fn default_tpm_pcrs() -> Vec<u8> {
    vec![0, 1, 2, 3, 4, 5, 6, 7]
}

/// A configuration value that is present but wrong; names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    /// The offending key, as written in the TOML file.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// 64 hex digits (either case).
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn bad(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        message: message.into(),
    }
}

impl ServerConfig {
    /// Every key of the configuration file (also the `SIGIL_<KEY>` environment overrides).
    pub const KEYS: &'static [&'static str] = &[
        "trust_domain",
        "data_dir",
        "listen_addr",
        "admin_socket",
        "database_url",
        "issuer",
        "server_dns_names",
        "ca_key_type",
        "ca_ttl_secs",
        "jwt_key_type",
        "upstream_ca_cert",
        "upstream_ca_key",
        "oauth_scopes",
        "default_audience",
        "access_token_ttl_secs",
        "node_svid_ttl_secs",
        "max_body_bytes",
        "log_format",
        "metrics_addr",
        "key_encryption_key_file",
        "tpm_ek_roots",
        "tpm_pcrs",
        "tpm_require_secure_boot",
        "tpm_golden_pcrs",
        "tpm_ek_hashes",
        "external_issuers",
        "max_delegation_depth",
    ];

    /// Checks what serde cannot: ranges, pairs of keys, URL shapes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.risk.validate().map_err(|e| bad("risk", e))?;
        if let Some(t) = &self.telemetry {
            t.validate().map_err(|e| bad("telemetry", e))?;
        }
        if self.upstream_ca_cert.is_some() != self.upstream_ca_key.is_some() {
            return Err(bad(
                "upstream_ca_cert",
                "upstream_ca_cert and upstream_ca_key must be given together",
            ));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("sqlite://")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            return Err(bad(
                "database_url",
                "must start with sqlite:// or postgres://",
            ));
        }
        if self.is_postgres()
            && let Some(url) = &self.database_url
            && let Err(e) = sigil_store::postgres_connect_options(url)
        {
            return Err(bad("database_url", e.to_string()));
        }
        if self.is_postgres() && self.key_encryption_key_file.is_none() {
            return Err(bad(
                "key_encryption_key_file",
                "required with a postgres:// database_url (replicas share the keys, sealed \
                 under it): a file of 32 random bytes, mode 0600, the same on every replica",
            ));
        }
        if let Some(issuer) = &self.issuer
            && (!issuer.starts_with("https://") || issuer.ends_with('/'))
        {
            return Err(bad(
                "issuer",
                "must be an https:// URL without a trailing slash",
            ));
        }
        for d in &self.server_dns_names {
            sigil_core::validate_dns_name(d).map_err(|e| bad("server_dns_names", e.to_string()))?;
        }
        for s in &self.oauth_scopes {
            sigil_core::validate_scope(s).map_err(|e| bad("oauth_scopes", e.to_string()))?;
        }
        if self.default_audience.is_empty() {
            return Err(bad("default_audience", "must not be empty"));
        }
        if !(60..=10 * 365 * 24 * 3600).contains(&self.ca_ttl_secs) {
            return Err(bad("ca_ttl_secs", "must be between 60 s and 10 years"));
        }
        if !(60..=24 * 3600).contains(&self.access_token_ttl_secs) {
            return Err(bad("access_token_ttl_secs", "must be between 60 and 86400"));
        }
        if !(120..=30 * 24 * 3600).contains(&self.node_svid_ttl_secs) {
            return Err(bad(
                "node_svid_ttl_secs",
                "must be between 120 s and 30 days",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(bad("max_body_bytes", "must be between 1 KiB and 16 MiB"));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(bad("log_format", "must be \"text\" or \"json\""));
        }
        if !(1..=sigil_pki::MAX_ACT_DEPTH as u32).contains(&self.max_delegation_depth) {
            return Err(bad(
                "max_delegation_depth",
                format!("must be between 1 and {}", sigil_pki::MAX_ACT_DEPTH),
            ));
        }
        for (n, x) in self.external_issuers.iter().enumerate() {
            x.validate()
                .map_err(|m| bad("external_issuers", format!("[{n}] {}: {m}", x.issuer)))?;
            if self
                .external_issuers
                .get(..n)
                .unwrap_or_default()
                .iter()
                .any(|o| o.issuer == x.issuer)
            {
                return Err(bad("external_issuers", format!("{} given twice", x.issuer)));
            }
        }
        if self.tpm_pcrs.is_empty() || self.tpm_pcrs.iter().any(|p| *p > 23) {
            return Err(bad(
                "tpm_pcrs",
                "must be a non-empty list of PCR indices 0-23",
            ));
        }
        self.golden_pcrs()?;
        if let Some(h) = self.tpm_ek_hashes.iter().find(|h| !is_sha256_hex(h)) {
            return Err(bad(
                "tpm_ek_hashes",
                format!("{h:?} is not a SHA-256 (64 hex digits)"),
            ));
        }
        Ok(())
    }

    /// `tpm_golden_pcrs`, parsed: PCR index → value. Refuses an index that is not a number
    /// among `tpm_pcrs` and a value that is not 64 hex digits.
    pub fn golden_pcrs(&self) -> Result<std::collections::BTreeMap<u8, [u8; 32]>, ConfigError> {
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in &self.tpm_golden_pcrs {
            let pcr: u8 = k
                .parse()
                .ok()
                .filter(|p| self.tpm_pcrs.contains(p))
                .ok_or_else(|| {
                    bad(
                        "tpm_golden_pcrs",
                        format!("PCR {k:?} is not one of tpm_pcrs {:?}", self.tpm_pcrs),
                    )
                })?;
            let value: [u8; 32] = hex::decode(v)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    bad(
                        "tpm_golden_pcrs",
                        format!("PCR {pcr}: {v:?} is not a SHA-256 value (64 hex digits)"),
                    )
                })?;
            out.insert(pcr, value);
        }
        Ok(out)
    }

    /// The admin socket path.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// The database URL.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("sigil.db").display()))
    }

    /// Whether the database is PostgreSQL (possibly shared by several replicas).
    pub fn is_postgres(&self) -> bool {
        self.database_url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"))
    }

    /// The OAuth/OIDC issuer.
    pub fn issuer(&self) -> String {
        self.issuer
            .clone()
            .unwrap_or_else(|| format!("https://localhost:{}", self.listen_addr.port()))
    }
}

impl ExternalIssuer {
    fn validate(&self) -> Result<(), String> {
        if self.issuer.is_empty() {
            return Err("issuer must not be empty".into());
        }
        if self.audience.is_empty() {
            return Err("audience must not be empty".into());
        }
        if self.groups_claim.is_empty() {
            return Err("groups_claim must not be empty".into());
        }
        if !jwks_uri_allowed(&self.jwks_uri) {
            return Err("jwks_uri must be https://, or http:// on a loopback address".into());
        }
        if self.algorithms.is_empty() {
            return Err("algorithms must not be empty".into());
        }
        for a in &self.algorithms {
            if !matches!(
                a.as_str(),
                "RS256"
                    | "RS384"
                    | "RS512"
                    | "PS256"
                    | "PS384"
                    | "PS512"
                    | "ES256"
                    | "ES384"
                    | "EdDSA"
            ) {
                return Err(format!(
                    "algorithm {a:?} is not an accepted asymmetric JWS alg"
                ));
            }
        }
        Ok(())
    }
}

/// `https://…`, or `http://` to a loopback host (a provider on the same device, tests).
pub fn jwks_uri_allowed(uri: &str) -> bool {
    let Ok(u) = uri.parse::<http::Uri>() else {
        return false;
    };
    match u.scheme_str() {
        Some("https") => u.host().is_some(),
        Some("http") => u.host().is_some_and(|h| {
            h == "localhost"
                || h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::ServerConfig;

    fn config(extra: serde_json::Value) -> ServerConfig {
        let mut v = serde_json::json!({"trust_domain": "td.test"});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn tpm_pcrs_default_to_the_firmware_pcrs_and_must_be_in_range() {
        let c = config(serde_json::json!({}));
        assert_eq!(c.tpm_pcrs, vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(c.validate().is_ok());
        for bad in [serde_json::json!([]), serde_json::json!([7, 24])] {
            let e = config(serde_json::json!({ "tpm_pcrs": bad }))
                .validate()
                .unwrap_err();
            assert_eq!(e.key, "tpm_pcrs");
        }
    }

    #[test]
    fn external_issuers_and_delegation_depth_are_checked() {
        use super::jwks_uri_allowed;
        assert!(jwks_uri_allowed("https://login.example.org/jwks"));
        assert!(jwks_uri_allowed("http://127.0.0.1:8080/jwks"));
        assert!(jwks_uri_allowed("http://localhost/jwks"));
        assert!(jwks_uri_allowed("http://[::1]:80/jwks"));
        for bad in ["http://login.example.org/jwks", "ftp://x/jwks", "jwks", ""] {
            assert!(!jwks_uri_allowed(bad), "{bad}");
        }
        let issuer = |extra: serde_json::Value| {
            let mut x = serde_json::json!({
                "issuer": "https://login.example.org",
                "jwks_uri": "https://login.example.org/jwks",
                "audience": "urn:sigil",
            });
            if let (Some(o), Some(e)) = (x.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            x
        };
        let ok = config(serde_json::json!({ "external_issuers": [issuer(serde_json::json!({}))] }));
        assert!(ok.validate().is_ok());
        assert_eq!(ok.max_delegation_depth, 3);
        for bad in [
            serde_json::json!({ "external_issuers": [issuer(serde_json::json!({"algorithms": ["HS256"]}))] }),
            serde_json::json!({ "external_issuers": [issuer(serde_json::json!({"audience": ""}))] }),
            serde_json::json!({ "external_issuers": [issuer(serde_json::json!({})), issuer(serde_json::json!({}))] }),
        ] {
            assert_eq!(config(bad).validate().unwrap_err().key, "external_issuers");
        }
        for depth in [0, 17] {
            let e = config(serde_json::json!({ "max_delegation_depth": depth }))
                .validate()
                .unwrap_err();
            assert_eq!(e.key, "max_delegation_depth");
        }
    }

    #[test]
    fn unreadable_or_empty_ek_roots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here").unwrap();
        for path in [dir.path().join("missing.pem"), empty] {
            let c = config(serde_json::json!({ "tpm_ek_roots": path }));
            let e = crate::tpm::TpmAttestation::from_config(&c).unwrap_err();
            assert_eq!(e.key, "tpm_ek_roots");
        }
        assert!(
            crate::tpm::TpmAttestation::from_config(&config(serde_json::json!({})))
                .unwrap()
                .is_none()
        );
    }
}
