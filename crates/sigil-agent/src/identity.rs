//! Keeps the node's identities current: attests the node, follows the server's sync stream,
//! signs and renews workload SVIDs at half-life, persists everything, and publishes a
//! [`Snapshot`] the Workload API serves from. Never serves anything past its expiry.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use sigil_core::{
    Clock, Credential, EntryError, EntryId, EntrySpec, RegistrationEntry, Selector, SelectorError,
    SpiffeId, SpiffeIdError,
};
use sigil_pki::{
    KeyAlgorithm, KeyPair, PkiError, SvidError, SvidUsage, TrustBundle, X509Bundle,
    verify_x509_svid_for_usage,
};
use sigil_proto::node::v1 as pb;
use sigil_proto::node::v1::node_client::NodeClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::attestor::{AttestationError, JoinTokenAttestor, NodeAttestor, TpmAttestor};
use crate::cache::{Cache, CacheError, CachedState, HeldSvid};
use crate::config::AgentConfig;
use crate::policy::{Offer, PolicyState};
use sigil_policy::bundle::{BundleError, PolicyKeys, VerifiedBundle};

use crate::revocation::RevocationList;
use crate::{client, tls};

/// What the Workload API serves right now.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The trust bundle (`None` until the first one arrives).
    pub bundle: Option<Arc<TrustBundle>>,
    /// The registration entries of this node.
    pub entries: Arc<Vec<RegistrationEntry>>,
    /// Current X.509-SVIDs by entry, none expired.
    pub svids: Arc<HashMap<EntryId, HeldSvid>>,
    /// False once the node has no identity (never attested, or evicted): serve nothing.
    pub serving: bool,
    /// True while a first attestation is under way (not serving yet, but soon).
    pub attesting: bool,
    /// The latest revocation list (from the server, or the cache), none expired; `None`
    /// until one is known, so enforcers are never told "nothing is revoked" by default.
    pub revocations: Option<Arc<RevocationList>>,
    /// The signed policy bundle in force (verified; persisted; never an older revision than
    /// one accepted before), served verbatim to local enforcers. `None` until one is known.
    pub policy: Option<Arc<VerifiedBundle>>,
    /// When `policy` was last replaced (monotonic clock): the moment a new bundle came into
    /// force here, for `sigil bench propagation` and freshness checks.
    pub policy_changed_at: Option<std::time::Instant>,
    /// When `revocations` was last replaced.
    pub revocations_changed_at: Option<std::time::Instant>,
    /// The fleet's node risks as the server last sent them (not cached: offline, proxies
    /// decide on the `risk` claim of the caller's token). `None` until one arrives.
    pub risks: Option<Arc<sigil_proto::enforcer::RiskTable>>,
}

/// Why the node holds no identity and the agent stopped keeping one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("this node has been evicted; it needs a new join token")]
    Evicted,
    #[error("no node identity: the cache holds none and no join token was given")]
    NotAttested,
    #[error("attestation refused: {0}")]
    AttestationRefused(String),
}

/// Why a session with the server ended. The agent serves from its cache meanwhile and
/// starts another, on the next replica first.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum SessionError {
    /// The node has no SVID to authenticate with (it must attest first).
    #[error("no node identity")]
    NoNodeIdentity,
    /// The client TLS config could not be built from the node SVID.
    #[error("TLS client config: {0}")]
    Tls(#[from] rustls::Error),
    /// The server could not be reached.
    #[error("connecting to {server}: {source:?}")]
    Connect {
        server: String,
        source: tonic::transport::Error,
    },
    /// A node API call failed (`call` says which).
    #[error("{call}: {}: {}", .status.code(), .status.message())]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    /// The server ended the sync stream.
    #[error("sync stream closed by the server")]
    StreamClosed,
    /// The server returned an SVID that does not verify against the bundle in force.
    #[error("server returned an SVID that does not verify: {0}")]
    BadSvid(SvidError),
    /// The server sent a trust bundle that does not parse.
    #[error("bad bundle from server: {0}")]
    BadBundle(PkiError),
    /// The server refused the node's TPM re-attestation and revoked it.
    #[error("node revoked: {0}")]
    NodeRevoked(String),
    /// The TPM evidence for a renewal could not be produced or was refused.
    #[error("TPM re-attestation: {0}")]
    Reattestation(String),
    /// A key or CSR could not be made.
    #[error("making a key or CSR: {0}")]
    Key(PkiError),
    /// The cache could not be written (nothing is served that is not persisted).
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl SessionError {
    fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Call { call, status }
    }
}

/// Why an entry from the server was ignored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum BadEntry {
    #[error(transparent)]
    Id(#[from] EntryError),
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    #[error(transparent)]
    Selector(#[from] SelectorError),
}

/// The identities this node holds (its own node SVID and its workloads' X.509-SVIDs) and
/// what they are checked and served with: trust bundle, entries, revocations, policy bundle,
/// log checkpoint. Kept current from the server and published as [`Snapshot`]s.
pub struct Identities {
    cfg: AgentConfig,
    cache: Cache,
    clock: Arc<dyn Clock>,
    snapshot: watch::Sender<Snapshot>,
    x509_bundle: Arc<ArcSwap<X509Bundle>>,
    bundle_sequence: std::sync::atomic::AtomicU64,
    node: std::sync::Mutex<Option<HeldSvid>>,
    node_key_alg: KeyAlgorithm,
    /// The live node API client, for on-demand calls (JWT-SVIDs).
    pub client: ArcSwapOption<NodeClient<Channel>>,
    server_id: SpiffeId,
    policy: std::sync::Mutex<PolicyState>,
    /// The transparency log as this agent has seen it (split-view detection).
    witness: std::sync::Mutex<crate::log_witness::LogWitness>,
    /// A newer log checkpoint is held than the one persisted (the sweep writes it within a
    /// second).
    witness_pending: std::sync::atomic::AtomicBool,
    /// Which of the configured server replicas is in use (an index into `cfg.servers()`).
    server_index: std::sync::atomic::AtomicUsize,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Pause before trying the next replica after one failed (backoff applies once all failed).
const FAILOVER_DELAY: Duration = Duration::from_millis(100);

impl Identities {
    /// Loads the cache and publishes what it holds (valid items only).
    pub fn load(cfg: AgentConfig, clock: Arc<dyn Clock>) -> anyhow::Result<Arc<Self>> {
        let cache = Cache::open(&cfg.data_dir.join("cache"))?;
        let now = clock.now();
        let td = cfg.trust_domain.clone();
        let server_id = td.id("/sigil/server")?;

        let mut bundle: Option<TrustBundle> = match cache.load_bundle() {
            Ok(Some(json)) => match TrustBundle::from_spiffe_json(&td, &json) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!(file = Cache::BUNDLE_FILE, error = %e, "cached trust bundle is corrupt; ignoring it and re-syncing");
                    cache.quarantine(Cache::BUNDLE_FILE);
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the cached trust bundle");
                None
            }
        };
        if bundle.is_none()
            && let Some(path) = &cfg.trust_bundle
        {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading trust_bundle {}: {e}", path.display()))?;
            let mut authorities = Vec::new();
            for p in pem::parse_many(text.as_bytes())? {
                if p.tag() == "CERTIFICATE" {
                    authorities.push(p.contents().to_vec());
                }
            }
            anyhow::ensure!(
                !authorities.is_empty(),
                "trust_bundle {} holds no PEM certificates",
                path.display()
            );
            bundle = Some(TrustBundle {
                trust_domain: td.clone(),
                x509_authorities: authorities,
                jwt_authorities: Vec::new(),
                policy_authorities: Vec::new(),
                sequence: 0,
                refresh_hint_secs: 300,
            });
        }
        let x509 = bundle
            .as_ref()
            .map(|b| b.x509_bundle())
            .unwrap_or(X509Bundle {
                trust_domain: td.clone(),
                authorities: Vec::new(),
            });

        let node = match cache.load_node() {
            Ok(Some(n)) => {
                let chain: Vec<&[u8]> = n.chain.iter().map(Vec::as_slice).collect();
                match verify_x509_svid_for_usage(&chain, &x509, now, SvidUsage::ClientAuth) {
                    Ok(_) => Some(n),
                    Err(e) => {
                        tracing::warn!(error = %e, "cached node SVID is not usable; discarding it");
                        None
                    }
                }
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(file = Cache::NODE_FILE, error = %e, "cached node identity is corrupt; ignoring it");
                cache.quarantine(Cache::NODE_FILE);
                None
            }
        };
        let state = match cache.load_state() {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::error!(file = Cache::STATE_FILE, error = %e, "cached workload state is corrupt; ignoring it and re-syncing");
                cache.quarantine(Cache::STATE_FILE);
                CachedState::default()
            }
        };
        let svids: HashMap<EntryId, HeldSvid> = state
            .svids
            .into_iter()
            .filter(|(_, s)| {
                let chain: Vec<&[u8]> = s.chain.iter().map(Vec::as_slice).collect();
                s.not_after > now
                    && verify_x509_svid_for_usage(&chain, &x509, now, SvidUsage::ClientAuth).is_ok()
            })
            .collect();
        let revocations = match cache.load_revocations() {
            Ok(r) => r.map(|mut l| {
                l.drop_expired(now);
                Arc::new(l)
            }),
            Err(e) => {
                tracing::error!(file = Cache::REVOCATIONS_FILE, error = %e, "cached revocation list is corrupt; ignoring it and re-syncing");
                cache.quarantine(Cache::REVOCATIONS_FILE);
                None
            }
        };
        let policy_keys = bundle
            .as_ref()
            .map(|b| PolicyKeys::from_jwks(&b.policy_authorities))
            .transpose()
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cached trust bundle has unusable policy keys");
                None
            })
            .unwrap_or_default();
        let policy = PolicyState::load(&cfg.data_dir.join("cache"), td.name(), &policy_keys);
        let serving = node.is_some();
        let sequence = bundle.as_ref().map(|b| b.sequence).unwrap_or(0);

        let snapshot = Snapshot {
            bundle: bundle.map(Arc::new),
            entries: Arc::new(state.entries),
            svids: Arc::new(svids),
            serving,
            attesting: !serving && (cfg.join_token.is_some() || cfg.uses_tpm()),
            revocations,
            policy: policy.current(),
            // From the cache: in force since the agent started.
            policy_changed_at: None,
            revocations_changed_at: None,
            risks: None,
        };

        let witness = match cache.load_log_witness() {
            Ok(Some(bytes)) => crate::log_witness::LogWitness::restore(&bytes).unwrap_or_else(|e| {
                tracing::error!(file = Cache::LOG_FILE, error = %e, "cached log checkpoint does not verify; ignoring it");
                cache.quarantine(Cache::LOG_FILE);
                Default::default()
            }),
            Ok(None) => Default::default(),
            Err(e) => {
                tracing::error!(file = Cache::LOG_FILE, error = %e, "cached log checkpoint unreadable");
                Default::default()
            }
        };
        let (tx, _) = watch::channel(snapshot);
        Ok(Arc::new(Self {
            cfg,
            cache,
            clock,
            snapshot: tx,
            x509_bundle: Arc::new(ArcSwap::from_pointee(x509)),
            bundle_sequence: std::sync::atomic::AtomicU64::new(sequence),
            node: std::sync::Mutex::new(node),
            node_key_alg: KeyAlgorithm::EcdsaP256,
            client: ArcSwapOption::empty(),
            server_id,
            policy: std::sync::Mutex::new(policy),
            witness: std::sync::Mutex::new(witness),
            witness_pending: std::sync::atomic::AtomicBool::new(false),
            server_index: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// The last transparency-log checkpoint this agent verified (size, root).
    pub fn log_checkpoint(&self) -> Option<(u64, sigil_log::Hash)> {
        self.witness.lock().ok().and_then(|w| w.held())
    }

    /// The split view detected, if the server ever showed this agent a checkpoint that is
    /// not consistent with the one held (or one signed by another key).
    pub fn split_view(&self) -> Option<crate::log_witness::SplitView> {
        self.witness
            .lock()
            .ok()
            .and_then(|w| w.split_view().cloned())
    }

    /// Checks the checkpoint of a sync update against the held one (fetching a consistency
    /// proof when the size moved), persists an accepted one, and refuses a split view loudly.
    /// Never fails the sync: the old checkpoint is kept.
    /// `given`: the proof the update carried (from which tree size), used instead of a fetch
    /// when it is the one needed.
    async fn witness_checkpoint(
        &self,
        c: &mut NodeClient<Channel>,
        note: &[u8],
        key: &str,
        given: (u64, &[Vec<u8>]),
    ) {
        use crate::log_witness::Offer as LogOffer;
        let offer = match self.witness.lock() {
            Ok(mut w) => w.offer(note, key),
            Err(_) => return,
        };
        let changed = match offer {
            Ok(LogOffer::Done { changed }) => Ok(changed),
            Ok(LogOffer::NeedProof { old, new }) => {
                let proof = if given.0 == old && old > 0 && !given.1.is_empty() {
                    given.1.to_vec()
                } else {
                    tracing::info!(
                        old,
                        new,
                        carried_from = given.0,
                        "fetching a log consistency proof (the update carried none from the held checkpoint)"
                    );
                    let fetched = c
                        .get_consistency_proof(pb::ConsistencyProofRequest {
                            old_size: old,
                            new_size: new,
                        })
                        .await;
                    match fetched {
                        Ok(r) => r.into_inner().hashes,
                        Err(s) => {
                            tracing::warn!(old, new, error = %s.message(), "could not fetch a log consistency proof; keeping the held checkpoint");
                            return;
                        }
                    }
                };
                let hashes: Option<Vec<sigil_log::Hash>> = proof
                    .iter()
                    .map(|h| <[u8; 32]>::try_from(h.as_slice()).ok().map(sigil_log::Hash))
                    .collect();
                match self.witness.lock() {
                    Ok(mut w) => w.finish(note, key, &hashes.unwrap_or_default()),
                    Err(_) => return,
                }
            }
            Err(e) => Err(e),
        };
        match changed {
            Ok(true) => self
                .witness_pending
                .store(true, std::sync::atomic::Ordering::Release),
            Ok(false) => {}
            Err(e) => tracing::error!(
                error = %e,
                "SPLIT VIEW: the server showed a transparency-log checkpoint inconsistent with the one this agent verified before; refused, keeping the old one"
            ),
        }
    }

    /// Persists the held log checkpoint; from the sweep, each second, when a newer one is
    /// held (`witness_checkpoint` only marks it pending). A crash loses at most
    /// that second of checkpoints: the agent then witnesses from the last persisted one, which
    /// every later honest checkpoint still extends. (Policy and revocations, which must never
    /// go back, are persisted before they are served.) Never at once on an update: a change
    /// reaches every agent of a fleet at the same moment, and each agent's own sweep spreads
    /// these writes over the second instead of adding one `fdatasync` per agent to the writes
    /// the change itself needs.
    async fn save_witness(&self) {
        let file = self.witness.lock().ok().and_then(|w| w.to_file());
        if let Some(f) = file
            && let Err(e) = self.cache.blocking(move |c| c.save_log_witness(&f)).await
        {
            tracing::warn!(error = %e, "could not persist the log checkpoint");
        }
    }

    /// Offers a signed policy bundle (from the sync stream, or a test): verified with the
    /// policy keys of the trust bundle in force, refused when older than (or, at the same
    /// revision, different from) the highest accepted one, or expired. A refusal keeps the
    /// current bundle. An accepted bundle is persisted (durably), then published.
    ///
    /// The verification, the write (fsyncs) and the publication run on the blocking pool,
    /// not on the async worker thread; they run to the end even if this future is dropped,
    /// so what is on disk, held and published stays in step.
    pub async fn offer_policy(self: &Arc<Self>, envelope: &str) -> Result<bool, BundleError> {
        let keys = match self.snapshot.borrow().bundle.as_deref() {
            Some(b) => PolicyKeys::from_jwks(&b.policy_authorities)?,
            None => PolicyKeys::default(),
        };
        // The bundle in force, byte for byte (every sync update carries it): nothing to do.
        // Verifying it again could only refuse it, which keeps it in force all the same.
        if self
            .snapshot
            .borrow()
            .policy
            .as_ref()
            .is_some_and(|p| p.envelope == envelope)
        {
            return Ok(false);
        }
        let now = self.clock.now();
        let this = self.clone();
        let envelope = envelope.to_owned();
        tokio::task::spawn_blocking(move || this.offer_policy_blocking(&envelope, &keys, now))
            .await
            .map_err(|e| BundleError::Malformed(format!("policy task: {e}")))?
    }

    fn offer_policy_blocking(
        &self,
        envelope: &str,
        keys: &PolicyKeys,
        now: i64,
    ) -> Result<bool, BundleError> {
        // Held through persist and publish: offers are persisted and published in order.
        let mut st = self
            .policy
            .lock()
            .map_err(|_| BundleError::Malformed("policy state lock poisoned".into()))?;
        match st.offer(envelope, keys, now)? {
            Offer::Unchanged => Ok(false),
            Offer::Accepted(b) => {
                tracing::info!(
                    revision = b.content.revision,
                    key_id = %b.key_id,
                    not_after = b.content.not_after,
                    policies = b.content.policies.len(),
                    "policy bundle accepted"
                );
                self.snapshot.send_modify(|s| {
                    s.policy = Some(b);
                    s.policy_changed_at = Some(std::time::Instant::now());
                });
                Ok(true)
            }
        }
    }

    /// Subscribes to snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// This node's SPIFFE ID, once attested.
    pub fn node_id(&self) -> Option<SpiffeId> {
        self.node().map(|n| n.spiffe_id)
    }

    /// The clock's now (unix seconds).
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The boot state for posture: whether this node attests with its TPM, and whether
    /// UEFI Secure Boot is on (the `SecureBoot` EFI variable's last byte is 1).
    pub fn boot_state(&self) -> Option<sigil_risk::BootState> {
        let secure_boot = std::fs::read_dir("/sys/firmware/efi/efivars")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .find(|e| e.file_name().to_string_lossy().starts_with("SecureBoot-"))
            })
            .and_then(|e| std::fs::read(e.path()).ok())
            .is_some_and(|b| b.last() == Some(&1));
        Some(sigil_risk::BootState {
            tpm_attested: self.cfg.uses_tpm(),
            secure_boot,
        })
    }

    /// The node's SPIFFE ID and its SVID as a signing key (for telemetry), if it holds one.
    pub fn node_signing(&self) -> Option<(SpiffeId, Arc<rustls::sign::CertifiedKey>)> {
        let n = self.node()?;
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(
            rustls_pki_types::PrivatePkcs8KeyDer::from(n.key.clone()),
        );
        let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).ok()?;
        let chain = n
            .chain
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
            .collect();
        Some((
            n.spiffe_id.clone(),
            Arc::new(rustls::sign::CertifiedKey::new(chain, key)),
        ))
    }

    fn node(&self) -> Option<HeldSvid> {
        self.node.lock().map(|n| n.clone()).unwrap_or(None)
    }

    fn set_node(&self, n: Option<HeldSvid>) {
        if let Ok(mut g) = self.node.lock() {
            *g = n;
        }
    }

    /// The X.509 authorities of the trust bundle the agent holds, if any yet.
    pub(crate) fn x509_bundle(&self) -> Option<sigil_pki::X509Bundle> {
        let snap = self.subscribe().borrow().clone();
        let b = snap.bundle.as_ref()?;
        Some(sigil_pki::X509Bundle {
            trust_domain: b.trust_domain.clone(),
            authorities: b.x509_authorities.clone(),
        })
    }

    /// The trust authority replica in use (`host:port`).
    pub(crate) fn server_address(&self) -> String {
        self.server()
    }

    /// The server replica in use.
    fn server(&self) -> String {
        let servers = self.cfg.servers();
        let i = self.server_index.load(std::sync::atomic::Ordering::SeqCst);
        servers
            .get(i % servers.len().max(1))
            .map(|s| (*s).to_owned())
            .unwrap_or_else(|| self.cfg.server_address.clone())
    }

    /// After a failure: moves to the next replica. Returns whether to try it at once (it
    /// has not failed in this round) rather than back off (every replica failed in a row).
    fn fail_over(&self, failures_in_row: &mut usize) -> bool {
        let n = self.cfg.servers().len().max(1);
        *failures_in_row += 1;
        if n > 1 {
            self.server_index
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        n > 1 && !failures_in_row.is_multiple_of(n)
    }

    /// Runs until evicted (or unrecoverable); reconnects with backoff on any failure, moving
    /// to the next server replica first.
    pub async fn run(self: Arc<Self>) -> Result<(), IdentityError> {
        let sweeper = tokio::spawn(self.clone().sweep_forever());
        let result = self.run_inner().await;
        sweeper.abort();
        if let Err(e) = &result {
            tracing::error!(error = %e, "stopped keeping the node's identities");
        }
        result
    }

    async fn run_inner(self: &Arc<Self>) -> Result<(), IdentityError> {
        let mut backoff = Duration::from_millis(250);
        let mut failures_in_row = 0usize;
        // A join token is single use: once it got us an identity, it is dropped. The TPM
        // can attest again whenever the node identity is lost.
        let tpm = self.tpm_attestor();
        let mut attestor: Option<Box<dyn NodeAttestor>> = match &tpm {
            Some(t) => Some(Box::new(t.clone())),
            None => self
                .cfg
                .join_token
                .clone()
                .map(|t| Box::new(JoinTokenAttestor::new(t)) as Box<dyn NodeAttestor>),
        };
        loop {
            if self.node().is_none() {
                let Some(method) = attestor.as_deref() else {
                    self.stop_serving();
                    return Err(IdentityError::NotAttested);
                };
                match self.attest(method).await {
                    Ok(()) if tpm.is_some() => {}
                    Ok(()) => attestor = None,
                    Err(AttestationError::Refused(why)) => {
                        self.stop_serving();
                        return Err(IdentityError::AttestationRefused(why));
                    }
                    Err(e) => {
                        if self.fail_over(&mut failures_in_row) {
                            tracing::warn!(error = %e, next = %self.server(), "attestation failed; trying the next server");
                            tokio::time::sleep(FAILOVER_DELAY).await;
                            continue;
                        }
                        tracing::warn!(error = %e, retry_in = ?backoff, "attestation failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            match self.session().await {
                Ok(SessionEnd::Evicted) => {
                    self.cache.wipe();
                    self.set_node(None);
                    self.client.store(None);
                    self.stop_serving();
                    return Err(IdentityError::Evicted);
                }
                Ok(SessionEnd::Reconnect) => {
                    backoff = Duration::from_millis(250);
                    failures_in_row = 0;
                    continue;
                }
                Err(e) => {
                    // A session that got as far as syncing starts a new round of failures.
                    if self.client.swap(None).is_some() {
                        backoff = Duration::from_millis(250);
                        failures_in_row = 0;
                    }
                    if self.fail_over(&mut failures_in_row) {
                        tracing::warn!(error = %e, next = %self.server(), "lost the server; failing over to the next one, serving from cache meanwhile");
                        tokio::time::sleep(FAILOVER_DELAY).await;
                        continue;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "lost the server; serving from cache");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The TPM attestor, when the node attests (and re-attests at renewal) with its TPM.
    fn tpm_attestor(&self) -> Option<TpmAttestor> {
        self.cfg.uses_tpm().then(|| {
            TpmAttestor::new(
                self.cfg
                    .tpm_tcti
                    .clone()
                    .unwrap_or_else(|| sigil_tpm::DEFAULT_TCTI.to_owned()),
                self.cfg
                    .tpm_event_log
                    .clone()
                    .unwrap_or_else(|| sigil_tpm::DEFAULT_EVENT_LOG.into()),
            )
        })
    }

    fn stop_serving(&self) {
        self.snapshot.send_modify(|s| {
            s.serving = false;
            s.attesting = false;
            s.svids = Arc::new(HashMap::new());
        });
    }

    async fn attest(&self, method: &dyn NodeAttestor) -> Result<(), AttestationError> {
        let transient = |e: &dyn std::fmt::Display| AttestationError::Transient(e.to_string());
        let tls = tls::client_config(self.x509_bundle.clone(), self.server_id.clone(), None)
            .map_err(|e| transient(&e))?;
        let mut c = client::connect(&self.server(), tls)
            .await
            .map_err(|e| AttestationError::Transient(format!("connecting: {e:?}")))?;
        let key = KeyPair::generate(self.node_key_alg).map_err(|e| transient(&e))?;
        let csr = key.csr_der(None).map_err(|e| transient(&e))?;
        let svid = method.attest(&mut c, csr).await?;
        self.apply_bundle_json(&svid.bundle_json)
            .await
            .map_err(|e| transient(&e))?;
        let held = self
            .check_svid(&svid, key.pkcs8_der())
            .map_err(|e| transient(&e))?;
        tracing::info!(node = %held.spiffe_id, method = method.kind(), "node attested");
        let h = held.clone();
        self.cache
            .blocking(move |c| c.save_node(&h))
            .await
            .map_err(|e| transient(&e))?;
        self.set_node(Some(held));
        self.snapshot.send_modify(|s| {
            s.serving = true;
            s.attesting = false;
        });
        Ok(())
    }

    /// Verifies a freshly signed SVID against the current bundle and pairs it with its key.
    fn check_svid(
        &self,
        svid: &pb::X509SvidResponse,
        key: Vec<u8>,
    ) -> Result<HeldSvid, SessionError> {
        let now = self.clock.now();
        let chain: Vec<&[u8]> = svid.cert_chain.iter().map(Vec::as_slice).collect();
        let v = verify_x509_svid_for_usage(
            &chain,
            &self.x509_bundle.load(),
            now,
            SvidUsage::ClientAuth,
        )
        .map_err(SessionError::BadSvid)?;
        Ok(HeldSvid {
            spiffe_id: v.spiffe_id,
            chain: svid.cert_chain.clone(),
            key,
            serial: v.serial,
            not_after: v.not_after,
            received_at: now,
        })
    }

    /// Installs a bundle unless it is older than the one held. Returns whether it changed.
    async fn apply_bundle_json(&self, json: &str) -> Result<bool, SessionError> {
        let b = TrustBundle::from_spiffe_json(&self.cfg.trust_domain, json)
            .map_err(SessionError::BadBundle)?;
        let current = self
            .bundle_sequence
            .load(std::sync::atomic::Ordering::SeqCst);
        let have = self.snapshot.borrow().bundle.is_some();
        if have && b.sequence < current {
            tracing::warn!(
                got = b.sequence,
                have = current,
                "ignoring an older trust bundle"
            );
            return Ok(false);
        }
        if have && b.sequence == current && self.snapshot.borrow().bundle.as_deref() == Some(&b) {
            return Ok(false);
        }
        let j = json.to_owned();
        self.cache.blocking(move |c| c.save_bundle(&j)).await?;
        self.bundle_sequence
            .store(b.sequence, std::sync::atomic::Ordering::SeqCst);
        self.x509_bundle.store(Arc::new(b.x509_bundle()));
        self.snapshot.send_modify(|s| s.bundle = Some(Arc::new(b)));
        Ok(true)
    }

    async fn session(self: &Arc<Self>) -> Result<SessionEnd, SessionError> {
        let node = self.node().ok_or(SessionError::NoNodeIdentity)?;
        let tls = tls::client_config(
            self.x509_bundle.clone(),
            self.server_id.clone(),
            Some((node.chain.clone(), node.key.clone())),
        )?;
        let server = self.server();
        let mut c =
            client::connect(&server, tls)
                .await
                .map_err(|source| SessionError::Connect {
                    server: server.clone(),
                    source,
                })?;
        let mut stream = c
            .sync(pb::SyncRequest {})
            .await
            .map_err(SessionError::call("sync"))?
            .into_inner();
        self.client.store(Some(Arc::new(c.clone())));
        tracing::info!(server = %server, "connected; syncing");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(update)) => {
                        if update.evicted {
                            tracing::error!("the server says this node is evicted or revoked");
                            return Ok(SessionEnd::Evicted);
                        }
                        self.apply_update(&mut c, update).await?;
                    }
                    Ok(None) => return Err(SessionError::StreamClosed),
                    Err(s) if s.code() == tonic::Code::PermissionDenied => return Ok(SessionEnd::Evicted),
                    Err(s) => return Err(SessionError::call("sync stream")(s)),
                },
                _ = tick.tick() => {
                    match self.maintain(&mut c).await {
                        Ok(true) => return Ok(SessionEnd::Reconnect),
                        Ok(false) => {}
                        Err(SessionError::NodeRevoked(why)) => {
                            tracing::error!(why, "the server refused this node's re-attestation and revoked it");
                            return Ok(SessionEnd::Evicted);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    async fn apply_update(
        self: &Arc<Self>,
        c: &mut NodeClient<Channel>,
        u: pb::SyncUpdate,
    ) -> Result<(), SessionError> {
        tracing::debug!(
            policy_revision = u.policy_revision,
            revocations_revision = u.revocations_revision,
            "sync update received"
        );
        self.apply_bundle_json(&u.bundle_json).await?;
        if !u.policy_bundle.is_empty()
            && let Err(e) = self.offer_policy(&u.policy_bundle).await
        {
            // Keep enforcing the last good bundle; say why this one was refused.
            tracing::error!(
                revision = u.policy_revision,
                error = %e,
                "refused a policy bundle from the server; keeping the current one"
            );
        }
        let mut entries = Vec::with_capacity(u.entries.len());

        for e in u.entries {
            match entry_from_pb(e) {
                Ok(e) => entries.push(e),
                Err(why) => {
                    tracing::warn!(error = %why, "ignoring an invalid entry from the server")
                }
            }
        }
        let now = self.clock.now();
        let held = self.snapshot.borrow().revocations.clone();
        let incoming = RevocationList::from_sync(u.revocations_revision, &u.revocations, now);
        let revocations = match &held {
            Some(h) => {
                if incoming.revision < h.revision {
                    tracing::warn!(
                        got = incoming.revision,
                        have = h.revision,
                        "revocation list from an older revision; keeping the union"
                    );
                }
                h.updated_with(incoming)
            }
            None => incoming,
        };
        let revocations_changed = held.as_deref() != Some(&revocations);
        if revocations_changed {
            // INVARIANT: persisted before it is served, so a restart serves the same list.
            let list = revocations.clone();
            self.cache
                .blocking(move |c| c.save_revocations(&list))
                .await?;
            tracing::info!(
                revision = revocations.revision,
                count = revocations.revoked.len(),
                "revocation list updated"
            );
        }
        let revoked = |s: &HeldSvid| {
            let svid = Credential {
                serial: &s.serial,
                spiffe_id: s.spiffe_id.as_str(),
                // A held SVID keeps no notBefore; the server backdates it by 30 s, so a
                // minute before it arrived is at or before it.
                not_before: s.received_at - 60,
            };
            revocations.is_revoked(&svid, now)
        };
        let mut svids = (*self.snapshot.borrow().svids).clone();
        svids.retain(|id, s| {
            let keep = s.not_after > now
                && entries.iter().any(|e| &e.id == id && e.spec.spiffe_id == s.spiffe_id)
                && !revoked(s);
            if !keep {
                tracing::info!(entry = %id, spiffe_id = %s.spiffe_id, "dropping SVID (entry gone, revoked or expired)");
            }
            keep
        });
        // The risk table only moves forward (a replica that read it earlier sends an older
        // revision: ignored).
        let held_risk = self.snapshot.borrow().risks.as_ref().map(|r| r.revision);
        let risks = (held_risk.is_none_or(|h| u.risk_revision > h)).then(|| {
            Arc::new(sigil_proto::enforcer::RiskTable {
                revision: u.risk_revision,
                nodes: u
                    .node_risks
                    .iter()
                    .map(|n| sigil_proto::enforcer::NodeRisk {
                        node_id: n.node_id.clone(),
                        level: n.level.clone(),
                        score: n.score,
                        at: n.at,
                        quarantined: n.quarantined,
                    })
                    .collect(),
            })
        });
        self.snapshot.send_modify(|s| {
            s.entries = Arc::new(entries);
            s.svids = Arc::new(svids);
            if revocations_changed {
                s.revocations = Some(Arc::new(revocations));
                s.revocations_changed_at = Some(std::time::Instant::now());
            }
            if let Some(r) = risks {
                s.risks = Some(r);
            }
        });
        // After the policy and revocations are in force: witnessing the log checkpoint (a
        // signature check, maybe a round trip for a consistency proof) must not delay them,
        // nor, on a busy runtime, the other agents' tasks still applying this change.
        tokio::task::yield_now().await;
        let given = (u.log_consistency_from, u.log_consistency_proof.as_slice());
        self.witness_checkpoint(c, &u.log_checkpoint, &u.log_key, given)
            .await;
        self.reconcile(c).await?;
        Ok(())
    }

    /// Periodic work: renew due SVIDs and the node SVID. Returns true when the connection
    /// must be re-made (new node certificate).
    async fn maintain(&self, c: &mut NodeClient<Channel>) -> Result<bool, SessionError> {
        self.reconcile(c).await?;
        let now = self.clock.now();
        let Some(node) = self.node() else {
            return Ok(false);
        };
        if !node.needs_renewal(now) {
            return Ok(false);
        }
        let key = KeyPair::generate(self.node_key_alg).map_err(SessionError::Key)?;
        let csr = key.csr_der(None).map_err(SessionError::Key)?;
        // A TPM node re-attests: fresh nonce, fresh quote, bound to the new key.
        let tpm = match self.tpm_attestor() {
            Some(t) => Some(
                t.evidence(c, &csr)
                    .await
                    .map_err(|e| SessionError::Reattestation(e.to_string()))?,
            ),
            None => None,
        };
        let reattesting = tpm.is_some();
        let resp = c
            .renew_node_svid(pb::RenewNodeSvidRequest { csr, tpm })
            .await
            .map_err(|s| {
                // A refused re-attestation revokes the node on the server.
                if reattesting && s.code() == tonic::Code::PermissionDenied {
                    SessionError::NodeRevoked(s.message().to_owned())
                } else {
                    SessionError::call("renewing node SVID")(s)
                }
            })?
            .into_inner();
        self.apply_bundle_json(&resp.bundle_json).await?;
        let held = self.check_svid(&resp, key.pkcs8_der())?;
        let h = held.clone();
        self.cache.blocking(move |c| c.save_node(&h)).await?;
        tracing::info!(serial = %held.serial, "renewed the node SVID");
        self.set_node(Some(held));
        Ok(true)
    }

    /// Signs SVIDs for entries that have none or whose SVID is past half-life.
    async fn reconcile(&self, c: &mut NodeClient<Channel>) -> Result<(), SessionError> {
        let now = self.clock.now();
        let snap = self.snapshot.borrow().clone();
        let due: Vec<&RegistrationEntry> = snap
            .entries
            .iter()
            .filter(|e| snap.svids.get(&e.id).is_none_or(|s| s.needs_renewal(now)))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let mut keys = HashMap::new();
        let mut csrs = Vec::new();
        for e in due {
            let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).map_err(SessionError::Key)?;
            csrs.push(pb::CsrForEntry {
                entry_id: e.id.to_string(),
                csr: key
                    .csr_der(Some(&e.spec.spiffe_id))
                    .map_err(SessionError::Key)?,
            });
            keys.insert(e.id.to_string(), key);
        }
        let resp = c
            .sign_x509_svids(pb::SignX509SvidsRequest { csrs })
            .await
            .map_err(SessionError::call("signing SVIDs"))?
            .into_inner();
        let mut svids = (*self.snapshot.borrow().svids).clone();
        for signed in resp.svids {
            let (Some(svid), Some(key)) = (signed.svid, keys.remove(&signed.entry_id)) else {
                continue;
            };
            let Ok(id) = EntryId::parse(&signed.entry_id) else {
                continue;
            };
            let held = self.check_svid(&svid, key.pkcs8_der())?;
            tracing::info!(entry = %id, spiffe_id = %held.spiffe_id, serial = %held.serial, not_after = held.not_after, "SVID ready");
            svids.insert(id, held);
        }
        let state = CachedState {
            entries: (*snap.entries).clone(),
            svids: svids.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        // INVARIANT: persisted before it is served, so a restart serves the same SVIDs.
        self.cache.blocking(move |c| c.save_state(&state)).await?;
        self.snapshot.send_modify(|s| s.svids = Arc::new(svids));
        Ok(())
    }

    /// Removes expired SVIDs (and expired revocations) every second, connected or not: never
    /// serve past expiry.
    async fn sweep_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if self
                .witness_pending
                .swap(false, std::sync::atomic::Ordering::AcqRel)
            {
                self.save_witness().await;
            }
            let now = self.clock.now();
            self.snapshot.send_if_modified(|s| {
                let mut changed = false;
                if let Some(r) = &s.revocations
                    && r.revoked.iter().any(|v| v.expires_at <= now)
                {
                    let mut r = (**r).clone();
                    r.drop_expired(now);
                    s.revocations = Some(Arc::new(r));
                    s.revocations_changed_at = Some(std::time::Instant::now());
                    changed = true;
                }
                if s.svids.values().any(|v| v.not_after <= now) {
                    let mut svids = (*s.svids).clone();
                    svids.retain(|id, v| {
                        let live = v.not_after > now;
                        if !live {
                            tracing::warn!(entry = %id, spiffe_id = %v.spiffe_id, "SVID expired; no longer served");
                        }
                        live
                    });
                    s.svids = Arc::new(svids);
                    changed = true;
                }
                changed
            });
        }
    }
}

#[cfg(test)]
impl Identities {
    /// Changes the published snapshot directly (tests without a server).
    pub(crate) fn publish_for_test(&self, f: impl FnOnce(&mut Snapshot)) {
        self.snapshot.send_modify(f);
    }
}

enum SessionEnd {
    Evicted,
    Reconnect,
}

fn entry_from_pb(e: pb::Entry) -> Result<RegistrationEntry, BadEntry> {
    Ok(RegistrationEntry {
        id: EntryId::parse(&e.id)?,
        spec: EntrySpec {
            spiffe_id: SpiffeId::new(&e.spiffe_id)?,
            parent_id: SpiffeId::new(&e.parent_id)?,
            selectors: e
                .selectors
                .iter()
                .map(|s| Selector::parse(s))
                .collect::<Result<_, _>>()?,
            x509_ttl_secs: e.x509_ttl_secs,
            jwt_ttl_secs: e.jwt_ttl_secs,
            dns_names: e.dns_names,
            groups: e.groups,
            scopes: e.scopes,
            enforcer: e.enforcer,
            node_selectors: vec![],
        },
        revision: e.revision,
        created_at: 0,
        updated_at: 0,
    })
}
