//! DPoP at the proxy (RFC 9449 §7): a DPoP-bound token is accepted only with a fresh proof
//! of its key for this very request (method, URL, `iat` window, `ath` of the token, a `jti`
//! not seen before, and the current nonce when nonces are on).
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use sigil_pki::{DpopCheck, DpopError, JtiCache, normalize_htu, verify_dpop_proof};

use crate::ProxyConfig;

/// Most proofs remembered against replay; beyond that, new proofs are refused until old
/// ones leave the window.
const MAX_JTIS: usize = 100_000;
/// How long a nonce is current; the one before it is still accepted.
const NONCE_PERIOD: Duration = Duration::from_secs(60);

/// Why a request's DPoP proof is refused: the error for `WWW-Authenticate`, and with nonces
/// on, the nonce to retry with.
#[derive(Debug)]
pub(crate) struct DpopRefusal {
    pub error: DpopError,
    pub nonce: Option<String>,
}

/// The proxy's DPoP state.
pub(crate) struct DpopState {
    pub enabled: bool,
    window: i64,
    public_url: Option<String>,
    jtis: Mutex<JtiCache>,
    nonces: Option<Mutex<Nonces>>,
}

struct Nonces {
    current: String,
    previous: String,
    since: Instant,
}

impl Nonces {
    fn fresh() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// The accepted nonces, rotated when the current one is old.
    fn accepted(&mut self) -> [String; 2] {
        if self.since.elapsed() >= NONCE_PERIOD {
            self.previous = std::mem::replace(&mut self.current, Self::fresh());
            self.since = Instant::now();
        }
        [self.current.clone(), self.previous.clone()]
    }
}

impl DpopState {
    pub fn new(cfg: &ProxyConfig) -> Self {
        Self {
            enabled: cfg.dpop,
            window: cfg.dpop_proof_window_secs,
            public_url: cfg.public_url.clone(),
            jtis: Mutex::new(JtiCache::new(MAX_JTIS)),
            nonces: cfg.dpop_nonce.then(|| {
                Mutex::new(Nonces {
                    current: Nonces::fresh(),
                    previous: Nonces::fresh(),
                    since: Instant::now(),
                })
            }),
        }
    }

    /// This proxy's base URL as clients see it: `public_url`, else `https://` + `Host`.
    pub fn base_url(&self, headers: &HeaderMap, uri: &http::Uri) -> Option<String> {
        self.base_url_for(
            headers.get(http::header::HOST),
            uri.authority().map(|a| a.as_str()),
        )
    }

    /// [`Self::base_url`] of a request whose `Host` header and URI authority were these.
    pub fn base_url_for(
        &self,
        host: Option<&http::HeaderValue>,
        authority: Option<&str>,
    ) -> Option<String> {
        if let Some(u) = &self.public_url {
            return Some(u.clone());
        }
        let host = host.and_then(|v| v.to_str().ok()).or(authority)?;
        Some(format!("https://{host}"))
    }

    /// Checks the request's proof for `token`, whose `cnf.jkt` is `jkt`.
    pub fn check(
        &self,
        headers: &HeaderMap,
        method: &http::Method,
        uri: &http::Uri,
        token: &str,
        jkt: &str,
        now: i64,
    ) -> Result<(), DpopRefusal> {
        let refuse = |error| DpopRefusal { error, nonce: None };
        if !self.enabled {
            return Err(refuse(DpopError::Malformed(
                "DPoP-bound tokens are not accepted here",
            )));
        }
        let mut proofs = headers.get_all("dpop").iter();
        let proof = match (proofs.next(), proofs.next()) {
            (Some(v), None) => v
                .to_str()
                .map_err(|_| refuse(DpopError::Malformed("the DPoP header is not text")))?,
            (None, _) => {
                return Err(refuse(DpopError::Malformed(
                    "a DPoP-bound token needs a DPoP proof",
                )));
            }
            _ => return Err(refuse(DpopError::Malformed("more than one DPoP header"))),
        };
        let url = self
            .base_url(headers, uri)
            .map(|b| format!("{b}{}", uri.path()))
            .and_then(|u| normalize_htu(&u))
            .ok_or_else(|| refuse(DpopError::Malformed("the request's URL is unknown")))?;
        let nonces = match &self.nonces {
            Some(n) => Some(n.lock().map_err(|_| refuse(DpopError::Nonce))?.accepted()),
            None => None,
        };
        let check = DpopCheck {
            method: method.as_str(),
            url: &url,
            now,
            window_secs: self.window,
            access_token: Some(token),
            nonces: nonces.as_ref().map(|n| n.as_slice()),
        };
        let with_nonce = |error| DpopRefusal {
            error,
            nonce: nonces.as_ref().map(|n| n[0].clone()),
        };
        let p = verify_dpop_proof(proof, &check).map_err(with_nonce)?;
        if p.jkt != jkt {
            return Err(refuse(DpopError::WrongKey));
        }
        self.jtis
            .lock()
            .map_err(|_| refuse(DpopError::Replayed))?
            .check(&p, p.iat.saturating_add(self.window), now)
            .map_err(refuse)?;
        Ok(())
    }
}
