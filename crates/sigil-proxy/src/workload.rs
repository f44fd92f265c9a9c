//! Credentials from the local agent over the SPIFFE Workload API: the proxy's serving SVID
//! (`FetchX509SVID`, the one whose SPIFFE ID is configured, or the default one) and the trust
//! domain's X.509 and JWT authorities (`FetchX509SVID`'s bundle, `FetchJWTBundles`). Both
//! streams stay open; every update is checked and swapped in whole, so rotation never restarts
//! anything and in-flight requests finish with the credentials they started with. When the
//! agent goes away the last good credentials stay in force (they expire on their own: the
//! serving certificate by its `notAfter`, client certificates are checked against theirs) and
//! the proxy reconnects with backoff.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use sigil_core::{Clock, TrustDomain};
use sigil_pki::{Jwk, JwtKeySet, X509Bundle, split_der_certs};
use sigil_proto::enforcer as epb;
use sigil_proto::enforcer::enforcer_client::EnforcerClient;
use sigil_proto::workload as wl;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::Credentials;
use crate::revocation::Revocations;

/// How long the proxy waits for its first credentials at start.
const FIRST_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The socket path of a `unix:///path`, `unix:/path` or plain path address.
pub(crate) fn socket_path(addr: &str) -> PathBuf {
    PathBuf::from(
        addr.strip_prefix("unix://")
            .or_else(|| addr.strip_prefix("unix:"))
            .unwrap_or(addr),
    )
}

pub(crate) async fn connect(path: PathBuf) -> anyhow::Result<Channel> {
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .context("connecting to the Workload API")?;
    Ok(channel)
}

pub(crate) fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// The serving identity and X.509 authorities of one `X509SVIDResponse`.
struct X509Part {
    serving: Arc<CertifiedKey>,
    bundle: X509Bundle,
}

fn x509_part(
    resp: &wl::X509svidResponse,
    want: Option<&str>,
    td: &TrustDomain,
) -> anyhow::Result<X509Part> {
    let svid = match want {
        Some(id) => resp
            .svids
            .iter()
            .find(|s| s.spiffe_id == id)
            .with_context(|| format!("the Workload API offers no SVID for {id}"))?,
        None => resp
            .svids
            .first()
            .context("the Workload API returned no SVID")?,
    };
    let chain: Vec<CertificateDer<'static>> = split_der_certs(&svid.x509_svid)?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    anyhow::ensure!(!chain.is_empty(), "the SVID has no certificate");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone()));
    let signing = sigil_tls::provider()
        .key_provider
        .load_private_key(key)
        .context("loading the SVID's key")?;
    let serving = CertifiedKey::new(chain, signing);
    serving
        .keys_match()
        .context("the SVID's key does not match its certificate")?;
    let authorities = split_der_certs(&svid.bundle)?;
    anyhow::ensure!(
        !authorities.is_empty(),
        "the Workload API sent an empty X.509 bundle"
    );
    Ok(X509Part {
        serving: Arc::new(serving),
        bundle: X509Bundle {
            trust_domain: td.clone(),
            authorities,
        },
    })
}

#[derive(serde::Deserialize)]
struct JwksDoc {
    keys: Vec<Jwk>,
}

fn jwt_part(resp: &wl::JwtBundlesResponse, td: &TrustDomain) -> anyhow::Result<JwtKeySet> {
    let jwks = resp
        .bundles
        .get(&td.id_string())
        .with_context(|| format!("the Workload API has no JWT bundle for {}", td.id_string()))?;
    anyhow::ensure!(
        jwks.len() <= sigil_pki::MAX_BUNDLE_JSON_LEN,
        "JWT bundle too large"
    );
    let doc: JwksDoc = serde_json::from_slice(jwks).context("JWT bundle is not a JWKS")?;
    Ok(JwtKeySet::from_jwks(&doc.keys)?)
}

/// Streams of one Workload API connection.
struct Streams {
    x509: tonic::Streaming<wl::X509svidResponse>,
    jwt: tonic::Streaming<wl::JwtBundlesResponse>,
    revoked: tonic::Streaming<epb::Revocations>,
}

async fn open(path: &std::path::Path) -> anyhow::Result<Streams> {
    let channel = connect(path.to_owned()).await?;
    let mut c = SpiffeWorkloadApiClient::new(channel.clone());
    // The agent's Enforcer API shares the Workload API's socket (and connection).
    let revoked = EnforcerClient::new(channel)
        .watch_revocations(request(epb::WatchRevocationsRequest {}))
        .await
        .context("WatchRevocations (the agent's Enforcer API)")?
        .into_inner();
    let x509 = c
        .fetch_x509svid(request(wl::X509svidRequest {}))
        .await
        .context("FetchX509SVID")?
        .into_inner();
    let jwt = c
        .fetch_jwt_bundles(request(wl::JwtBundlesRequest {}))
        .await
        .context("FetchJWTBundles")?
        .into_inner();
    Ok(Streams { x509, jwt, revoked })
}

/// Live credentials from the Workload API.
pub struct WorkloadSource {
    path: PathBuf,
    want: Option<String>,
    td: TrustDomain,
    clock: Arc<dyn Clock>,
    /// Bumped with every revocation update, so open connections re-check their client.
    revoked_tx: tokio::sync::watch::Sender<i64>,
}

impl WorkloadSource {
    pub fn new(
        addr: &str,
        want: Option<String>,
        td: TrustDomain,
        clock: Arc<dyn Clock>,
        revoked_tx: tokio::sync::watch::Sender<i64>,
    ) -> Self {
        Self {
            path: socket_path(addr),
            want,
            td,
            clock,
            revoked_tx,
        }
    }

    /// Waits for the first complete credentials (the agent may still be attesting), then
    /// keeps them current in the background.
    pub async fn start(self) -> anyhow::Result<Arc<ArcSwap<Credentials>>> {
        let deadline = tokio::time::Instant::now() + FIRST_FETCH_TIMEOUT;
        let mut backoff = Duration::from_millis(100);
        let (first, streams) = loop {
            let attempt = async {
                let mut s = open(&self.path).await?;
                let x = s
                    .x509
                    .next()
                    .await
                    .context("X.509 stream ended")?
                    .context("FetchX509SVID")?;
                let j = s
                    .jwt
                    .next()
                    .await
                    .context("JWT bundle stream ended")?
                    .context("FetchJWTBundles")?;
                let r = s
                    .revoked
                    .next()
                    .await
                    .context("revocation stream ended")?
                    .context("WatchRevocations")?;
                let x = x509_part(&x, self.want.as_deref(), &self.td)?;
                let j = jwt_part(&j, &self.td)?;
                anyhow::Ok((
                    Credentials {
                        x509: x.bundle,
                        jwt_keys: j,
                        serving: x.serving,
                        revoked: Arc::new(Revocations::from_proto(&r, self.clock.now())),
                    },
                    s,
                ))
            };
            match attempt.await {
                Ok(v) => break v,
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::info!(
                        error = format!("{e:#}"),
                        "waiting for credentials from the agent"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "no credentials from the Workload API at {} within {}s",
                        self.path.display(),
                        FIRST_FETCH_TIMEOUT.as_secs()
                    )));
                }
            }
        };
        tracing::info!(socket = %self.path.display(), "credentials from the Workload API");
        let creds = Arc::new(ArcSwap::from_pointee(first));
        tokio::spawn(self.follow(streams, creds.clone()));
        Ok(creds)
    }

    /// Applies every update; reconnects when a stream ends.
    async fn follow(self, mut streams: Streams, creds: Arc<ArcSwap<Credentials>>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let ended = loop {
                tokio::select! {
                    m = streams.x509.next() => match m {
                        Some(Ok(resp)) => match x509_part(&resp, self.want.as_deref(), &self.td) {
                            Ok(x) => {
                                let cur = creds.load();
                                creds.store(Arc::new(Credentials {
                                    x509: x.bundle,
                                    jwt_keys: cur.jwt_keys.clone(),
                                    serving: x.serving,
                                    revoked: cur.revoked.clone(),
                                }));
                                tracing::info!("serving SVID / X.509 bundle updated");
                            }
                            Err(e) => tracing::error!(error = format!("{e:#}"), "X.509 update refused; keeping the current credentials"),
                        },
                        Some(Err(e)) => break format!("X.509 stream: {e}"),
                        None => break "X.509 stream ended".to_owned(),
                    },
                    m = streams.jwt.next() => match m {
                        Some(Ok(resp)) => match jwt_part(&resp, &self.td) {
                            Ok(keys) => {
                                let cur = creds.load();
                                creds.store(Arc::new(Credentials {
                                    x509: cur.x509.clone(),
                                    jwt_keys: keys,
                                    serving: cur.serving.clone(),
                                    revoked: cur.revoked.clone(),
                                }));
                                tracing::info!("JWT bundle updated");
                            }
                            Err(e) => tracing::error!(error = format!("{e:#}"), "JWT bundle update refused; keeping the current keys"),
                        },
                        Some(Err(e)) => break format!("JWT bundle stream: {e}"),
                        None => break "JWT bundle stream ended".to_owned(),
                    },
                    m = streams.revoked.next() => match m {
                        Some(Ok(msg)) => {
                            let list = Revocations::from_proto(&msg, self.clock.now());
                            let cur = creds.load();
                            creds.store(Arc::new(Credentials {
                                x509: cur.x509.clone(),
                                jwt_keys: cur.jwt_keys.clone(),
                                serving: cur.serving.clone(),
                                revoked: Arc::new(list),
                            }));
                            self.revoked_tx.send_replace(msg.revision);
                            tracing::info!(revision = msg.revision, revoked = msg.revoked.len(), "revocation list updated");
                        }
                        Some(Err(e)) => break format!("revocation stream: {e}"),
                        None => break "revocation stream ended".to_owned(),
                    },
                }
            };
            tracing::warn!(
                reason = ended,
                "Workload API connection lost; keeping the last credentials"
            );
            loop {
                tokio::time::sleep(backoff).await;
                match open(&self.path).await {
                    Ok(s) => {
                        streams = s;
                        backoff = Duration::from_millis(250);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = format!("{e:#}"), "Workload API still unreachable");
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(
            socket_path("unix:///run/a.sock"),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            socket_path("unix:/run/a.sock"),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(socket_path("/run/a.sock"), PathBuf::from("/run/a.sock"));
    }

    #[test]
    fn bad_updates_are_refused() {
        let td = TrustDomain::new("td").unwrap();
        let empty = wl::X509svidResponse::default();
        assert!(x509_part(&empty, None, &td).is_err());
        let garbage = wl::X509svidResponse {
            svids: vec![wl::X509svid {
                spiffe_id: "spiffe://td/p".into(),
                x509_svid: b"not der".to_vec(),
                x509_svid_key: b"not a key".to_vec(),
                bundle: Vec::new(),
                hint: String::new(),
            }],
            ..Default::default()
        };
        assert!(x509_part(&garbage, None, &td).is_err());
        assert!(x509_part(&garbage, Some("spiffe://td/other"), &td).is_err());
        let no_td = wl::JwtBundlesResponse::default();
        assert!(jwt_part(&no_td, &td).is_err());
        let mut bad = wl::JwtBundlesResponse::default();
        bad.bundles.insert(td.id_string(), b"{".to_vec());
        assert!(jwt_part(&bad, &td).is_err());
        let mut ok = wl::JwtBundlesResponse::default();
        ok.bundles
            .insert(td.id_string(), br#"{"keys":[]}"#.to_vec());
        assert!(jwt_part(&ok, &td).unwrap().is_empty());
    }
}
