//! What the proxy trusts and presents: the trust bundle (X.509 authorities for client
//! certificates, JWT keys for tokens) and its own serving certificate.
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sigil_pki::{JwtKeySet, TrustBundle, X509Bundle};

use crate::ProxyConfig;
use crate::revocation::Revocations;

/// One consistent set of credentials; swapped whole on rotation.
pub struct Credentials {
    pub x509: X509Bundle,
    pub jwt_keys: JwtKeySet,
    pub serving: Arc<CertifiedKey>,
    /// Revoked SVIDs (from the agent; empty when run standalone from files).
    pub revoked: Arc<Revocations>,
}

impl Credentials {
    /// Loads the standalone files named by the configuration.
    pub fn load_files(cfg: &ProxyConfig) -> anyhow::Result<Self> {
        let (Some(cert), Some(key), Some(bundle_path)) = (&cfg.cert, &cfg.key, &cfg.bundle) else {
            anyhow::bail!("cert, key and bundle are required without workload_api_socket");
        };
        let bundle_json = std::fs::read_to_string(bundle_path)
            .with_context(|| format!("reading bundle {}", bundle_path.display()))?;
        let bundle = TrustBundle::from_spiffe_json(&cfg.trust_domain, &bundle_json)
            .with_context(|| format!("bundle {}", bundle_path.display()))?;
        anyhow::ensure!(
            !bundle.x509_authorities.is_empty(),
            "bundle {} has no X.509 authorities",
            bundle_path.display()
        );
        let chain: Vec<CertificateDer<'static>> = pem::parse_many(
            std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
        )?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.contents().to_vec()))
        .collect();
        anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
        let key_path = key;
        let key = pem::parse(
            std::fs::read(key_path).with_context(|| format!("reading {}", key_path.display()))?,
        )?;
        let key = PrivateKeyDer::try_from(key.contents().to_vec())
            .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
        let signing = sigil_tls::provider()
            .key_provider
            .load_private_key(key)
            .with_context(|| format!("loading {}", key_path.display()))?;
        Ok(Self {
            x509: bundle.x509_bundle(),
            jwt_keys: bundle.jwt_key_set()?,
            serving: Arc::new(CertifiedKey::new(chain, signing)),
            revoked: Arc::new(Revocations::default()),
        })
    }
}
