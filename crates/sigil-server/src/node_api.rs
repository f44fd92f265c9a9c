//! The node API (gRPC): join-token attestation, node SVID renewal, and signing of workload
//! identities for the entries a node is the parent of.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};
use sigil_core::{Credential, EntryId, RevocationSet, RevokedSvid, SpiffeId};
use sigil_pki::{IssuedX509Svid, SvidSpec, parse_csr};
use sigil_proto::node::v1 as pb;
use sigil_store::{EntryFilter, JoinTokenError, NodeRecord, Revocation, StoreError};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::issuer::IssueError;
use crate::tls::PeerAuth;
use crate::tpm::{TpmAttestation, node_id_for_ek};
use crate::{AppState, ServerError};

/// Most CSRs one SignX509Svids call may carry.
const MAX_BATCH: usize = 256;

/// The node API service.
pub struct NodeApi {
    app: Arc<AppState>,
    /// The shared sync state, published by one refresher task (started by the first sync).
    shared: OnceLock<watch::Receiver<SharedState>>,
    /// Consistency proofs already computed, by (old size, new size). The log only grows, so
    /// a proof between two sizes never changes; after a change every agent asks for the
    /// same one. Bounded: cleared when full.
    proofs: Mutex<HashMap<(u64, u64), Proof>>,
    /// TPM 2.0 attestation, when the server trusts some EK roots.
    tpm: Option<TpmAttestation>,
}

/// A consistency proof's hashes (32 bytes each), shared.
type Proof = Arc<Vec<Vec<u8>>>;

/// Most consistency proofs [`NodeApi`] keeps.
const MAX_CACHED_PROOFS: usize = 64;

impl NodeApi {
    pub fn new(app: Arc<AppState>, tpm: Option<TpmAttestation>) -> Self {
        Self {
            app,
            shared: OnceLock::new(),
            proofs: Mutex::new(HashMap::new()),
            tpm,
        }
    }

    /// The node's active quarantines (of itself, or of workloads on it).
    async fn quarantines_of(
        &self,
        node: &NodeRecord,
    ) -> Result<Vec<sigil_store::QuarantineRecord>, Status> {
        Ok(self
            .app
            .store
            .active_quarantines()
            .await
            .map_err(internal)?
            .into_iter()
            .filter(|q| q.node_id == node.spiffe_id.as_str())
            .collect())
    }

    /// TPM attestation, or FAILED_PRECONDITION where the server is not configured for it.
    fn tpm_verifier(&self) -> Result<&TpmAttestation, Status> {
        self.tpm.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this server does not accept TPM attestation (neither tpm_ek_roots nor tpm_ek_hashes is configured)",
            )
        })
    }

    /// The TPM attestation of the node that sent `tpm` evidence for `csr`: its node ID
    /// (from the EK) and node selectors.
    fn attest_tpm(
        &self,
        tpm: &pb::TpmEvidence,
        csr: &[u8],
    ) -> Result<(SpiffeId, Vec<String>), Status> {
        let verifier = self.tpm_verifier()?;
        let parsed =
            parse_csr(csr).map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let node = verifier.finish(tpm, parsed.public_key_der(), self.app.clock.now())?;
        let node_id = node_id_for_ek(&self.app.config.trust_domain, &node.ek_hash)?;
        tracing::info!(node = %node_id, selectors = ?node.selectors, "TPM evidence verified");
        Ok((node_id, node.selectors))
    }

    /// A TPM node's renewal: fresh evidence from the same TPM, passing the same checks as
    /// at attestation. Evidence that fails them (a changed boot state, another TPM, none)
    /// revokes the node: it is evicted, its identities are revoked, and the revocation is a
    /// transparency-log leaf. A spent or unknown challenge only fails this call.
    async fn reattest_tpm(
        &self,
        node: &NodeRecord,
        req: &pb::RenewNodeSvidRequest,
    ) -> Result<Vec<String>, Status> {
        let verifier = self.tpm_verifier()?;
        let parsed =
            parse_csr(&req.csr).map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let why = match &req.tpm {
            None => "a TPM node renews with fresh TPM evidence".to_owned(),
            Some(ev) => match verifier.finish(ev, parsed.public_key_der(), self.app.clock.now()) {
                Ok(att) => {
                    let id = node_id_for_ek(&self.app.config.trust_domain, &att.ek_hash)?;
                    if id == node.spiffe_id {
                        return Ok(att.selectors);
                    }
                    "the evidence comes from another TPM".to_owned()
                }
                Err(s) if s.code() == tonic::Code::PermissionDenied => s.message().to_owned(),
                Err(s) => return Err(s),
            },
        };
        self.revoke_tpm_node(node, &why).await?;
        Err(Status::permission_denied(format!(
            "TPM re-attestation failed, node revoked: {why}"
        )))
    }

    /// Evicts `node` and revokes its SPIFFE ID, with a transparency-log leaf saying why.
    async fn revoke_tpm_node(&self, node: &NodeRecord, why: &str) -> Result<(), Status> {
        let now = self.app.clock.now();
        self.app
            .store
            .evict_node(&node.spiffe_id, now)
            .await
            .map_err(internal)?;
        let rev = Revocation {
            id: 0,
            serial: None,
            spiffe_id: Some(node.spiffe_id.clone()),
            reason: format!("TPM re-attestation failed: {why}"),
            revoked_at: now,
            expires_at: now + i64::from(sigil_core::MAX_X509_TTL_SECS),
        };
        let id = self
            .app
            .store
            .add_revocation(&rev)
            .await
            .map_err(internal)?;
        self.app
            .issuer
            .log_change(crate::admin::revocation_change(&Revocation { id, ..rev }))
            .await
            .map_err(internal)?;
        self.app.notify_change();
        tracing::warn!(node = %node.spiffe_id, why, "TPM node failed re-attestation: evicted and revoked");
        Ok(())
    }

    /// The join-token attestation of a node: spends the token, returns the node ID.
    async fn attest_join_token(&self, token: &str, csr: &[u8]) -> Result<SpiffeId, Status> {
        let token = token.trim();
        if token.is_empty() || token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Status::invalid_argument("malformed join token"));
        }
        // Check the CSR before spending the token, so a bad CSR does not burn it.
        parse_csr(csr).map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let hash = hash_join_token(token);
        let node_id = node_id_for_token(&self.app.config.trust_domain, &hash).map_err(internal)?;
        let now = self.app.clock.now();
        match self
            .app
            .store
            .consume_join_token(&hash, &node_id, now)
            .await
        {
            Ok(()) => Ok(node_id),
            Err(StoreError::JoinToken(e)) => {
                let why = match e {
                    JoinTokenError::Unknown => "unknown join token",
                    JoinTokenError::Expired => "join token has expired",
                    JoinTokenError::AlreadyUsed => "join token has already been used",
                    _ => "join token refused",
                };
                tracing::warn!(node = %node_id, why, "attestation refused");
                Err(Status::permission_denied(why))
            }
            Err(e) => Err(internal(e)),
        }
    }

    /// A receiver of the shared sync state; starts the refresher on first use.
    fn shared_sync(&self) -> watch::Receiver<SharedState> {
        self.shared
            .get_or_init(|| {
                let (tx, rx) = watch::channel(None);
                tokio::spawn(refresh_shared(
                    Arc::downgrade(&self.app),
                    self.app.changes.subscribe(),
                    tx,
                ));
                rx
            })
            .clone()
    }

    /// The SPIFFE ID path prefix of node identities.
    pub const NODE_PATH: &'static str = "/sigil/node/";

    /// The calling node, if its SVID verified, is not revoked and the node is not evicted.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<NodeRecord, Status> {
        let svid = match req.extensions().get::<PeerAuth>() {
            Some(PeerAuth::Verified(svid)) => svid.clone(),
            Some(PeerAuth::Rejected(why)) => {
                return Err(Status::unauthenticated(format!(
                    "client certificate rejected: {why}"
                )));
            }
            _ => {
                return Err(Status::unauthenticated(
                    "a node X.509-SVID client certificate is required",
                ));
            }
        };
        if !svid.spiffe_id.path().starts_with(Self::NODE_PATH) {
            return Err(Status::permission_denied(format!(
                "{} is not a node identity",
                svid.spiffe_id
            )));
        }
        let now = self.app.clock.now();
        if self
            .app
            .store
            .is_revoked(&svid.serial, &svid.spiffe_id, svid.not_before, now)
            .await
            .map_err(internal)?
        {
            return Err(Status::unauthenticated("node SVID has been revoked"));
        }
        let node = self
            .app
            .store
            .get_node(&svid.spiffe_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::permission_denied("unknown node"))?;
        if node.evicted {
            return Err(Status::permission_denied("node has been evicted"));
        }
        Ok(node)
    }

    fn svid_response(&self, svid: &IssuedX509Svid) -> pb::X509SvidResponse {
        pb::X509SvidResponse {
            spiffe_id: svid.spiffe_id.to_string(),
            cert_chain: vec![svid.der.clone()],
            expires_at: svid.not_after,
            bundle_json: self.app.authorities.current().bundle_json.clone(),
        }
    }

    async fn entry_of(
        &self,
        node: &NodeRecord,
        id: &str,
    ) -> Result<sigil_core::RegistrationEntry, Status> {
        let id = EntryId::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let entry = match self.app.store.get_entry(&id).await {
            Ok(e) => e,
            Err(StoreError::NotFound(_)) => {
                return Err(Status::not_found(format!("no entry {id}")));
            }
            Err(e) => return Err(internal(e)),
        };
        if entry.spec.parent_id != node.spiffe_id {
            return Err(Status::permission_denied(format!(
                "entry {id} does not belong to node {}",
                node.spiffe_id
            )));
        }
        if !entry.spec.node_matches(&node.selectors) {
            return Err(Status::permission_denied(format!(
                "entry {id} requires node selectors {:?}, which node {} did not prove",
                entry.spec.node_selectors, node.spiffe_id
            )));
        }
        Ok(entry)
    }
}

/// The node SPIFFE ID a join token attests to: derived from the token's hash, so an admin
/// can register entries for a node before it first connects.
pub fn node_id_for_token(
    td: &sigil_core::TrustDomain,
    token_hash: &str,
) -> Result<SpiffeId, sigil_core::SpiffeIdError> {
    let short = token_hash.get(..16).unwrap_or(token_hash);
    td.id(&format!("{}{short}", NodeApi::NODE_PATH))
}

/// SHA-256 (hex) of a join token: the only form in which tokens are stored.
pub fn hash_join_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "node API failure");
    Status::internal("internal error")
}

fn issue_status(e: IssueError) -> Status {
    match e {
        IssueError::BadCsr(m) => Status::invalid_argument(format!("bad CSR: {m}")),
        e @ IssueError::NotEntitled { .. } => Status::permission_denied(e.to_string()),
        IssueError::InvalidRequest(m) => Status::invalid_argument(m),
        IssueError::Server(e) => internal(e),
    }
}

/// What a node's sync stream last sent: resend when any of it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SyncKey {
    entries: i64,
    revocations: i64,
    bundle: i64,
    policy: i64,
    risk: i64,
    cut_off: bool,
}

/// The fleet-wide part of every sync update, read once per change by the refresher task
/// and shared by every stream (instead of each stream re-reading it from the store).
///
/// Read in the order the streams used to read it: the revisions first, then the data
/// (so the data is at least as new as the revisions), the log checkpoint last (so it
/// covers what the update says).
#[derive(Debug)]
struct SharedSync {
    entries_revision: i64,
    /// Every entry, grouped by parent (node) ID, each group in the store's order, with the
    /// node selectors it requires of its parent.
    entries: Arc<HashMap<String, Vec<NodeEntry>>>,
    revocations_revision: i64,
    /// Unexpired at the time of reading; filtered again at the time of sending.
    revocations: Arc<Vec<pb::RevokedSvid>>,
    /// The same revocations, indexed for the streams' cut-off checks.
    revoked: Arc<RevocationSet>,
    bundle_sequence: i64,
    bundle_json: String,
    policy_revision: i64,
    /// The latest policy bundle (envelope, revision), if `policy_revision > 0`.
    policy: Arc<(String, i64)>,
    /// The SPIFFE IDs of evicted nodes, read on every refresh (an eviction notifies the
    /// refresher). A stream whose node is listed confirms it from the store before it cuts
    /// the node off, so a snapshot read before a re-attestation cannot cut off a node that
    /// is no longer evicted.
    evicted: Arc<HashSet<String>>,
    risk_revision: i64,
    /// Every node's risk, as relying parties see it.
    risks: Arc<Vec<pb::NodeRisk>>,
    /// The tree size `log_checkpoint` signs.
    log_size: u64,
    log_checkpoint: Vec<u8>,
    /// A consistency proof from `sent_size` of the previous snapshot (the checkpoint most
    /// agents hold) to `log_size`: `(0, [])` when there is none to give.
    log_consistency: Arc<(u64, Vec<Vec<u8>>)>,
    /// The tree size of the checkpoint the streams last sent: this snapshot's when its
    /// revisions differ from the previous one's (the streams send it), else the previous
    /// snapshot's. A log that grew between updates (token issuances) is proven from the
    /// checkpoint the agents were sent, not from a snapshot they never saw, so they need
    /// not each fetch a proof.
    sent_size: u64,
}

/// What the refresher last published: nothing yet, a snapshot, or a failed refresh (which
/// ends the streams, as a failed store read used to).
type SharedState = Option<Result<Arc<SharedSync>, ()>>;

/// Reads the shared sync state, reusing from `prev` what did not change since (by revision).
async fn read_shared(app: &AppState, prev: Option<&SharedSync>) -> Result<SharedSync, ServerError> {
    let entries_revision = app.store.entries_revision().await?;
    let revocations_revision = app.store.revocations_revision().await?;
    let authorities = app.authorities.current();
    let bundle_sequence = i64::try_from(authorities.bundle.sequence).unwrap_or(i64::MAX);
    let policy_revision = app.store.policy_revision().await?;
    let risk_revision = app.store.risk_revision().await?;
    let entries = match prev {
        Some(p) if p.entries_revision == entries_revision => p.entries.clone(),
        _ => {
            let all = app.store.list_entries(&EntryFilter::default()).await?;
            let mut by_parent: HashMap<String, Vec<NodeEntry>> = HashMap::new();
            for e in all {
                by_parent
                    .entry(e.spec.parent_id.as_str().to_owned())
                    .or_default()
                    .push(NodeEntry {
                        requires: e.spec.node_selectors.clone(),
                        entry: entry_to_pb(e),
                    });
            }
            Arc::new(by_parent)
        }
    };
    let (revocations, revoked) = match prev {
        Some(p) if p.revocations_revision == revocations_revision => {
            (p.revocations.clone(), p.revoked.clone())
        }
        _ => {
            let listed: Vec<RevokedSvid> = app
                .store
                .list_revocations(app.clock.now())
                .await?
                .iter()
                .map(Revocation::revoked_svid)
                .collect();
            let revoked = Arc::new(RevocationSet::new(&listed));
            let revocations = listed
                .into_iter()
                .map(|r| pb::RevokedSvid {
                    serial: r.serial,
                    spiffe_id: r.spiffe_id,
                    revoked_at: r.revoked_at,
                    expires_at: r.expires_at,
                })
                .collect();
            (Arc::new(revocations), revoked)
        }
    };
    let policy = match prev {
        _ if policy_revision <= 0 => Arc::new((String::new(), 0)),
        Some(p) if p.policy_revision == policy_revision => p.policy.clone(),
        _ => Arc::new(match app.store.latest_policy_bundle().await? {
            Some(b) => (b.envelope, b.revision),
            None => (String::new(), 0),
        }),
    };
    let risks = match prev {
        Some(p) if p.risk_revision == risk_revision => p.risks.clone(),
        _ => Arc::new(
            crate::risk::fleet(app)
                .await?
                .into_iter()
                .map(|v| pb::NodeRisk {
                    node_id: v.node_id,
                    level: v.level.as_str().to_owned(),
                    score: u32::from(v.score),
                    at: v.at,
                    quarantined: v.quarantined,
                })
                .collect(),
        ),
    };
    let evicted = Arc::new(
        app.store
            .list_evicted_nodes()
            .await?
            .into_iter()
            .map(|id| id.as_str().to_owned())
            .collect::<HashSet<_>>(),
    );
    // After everything else was read, so the checkpoint covers what the updates say.
    let (log_size, root) = app.tlog.head().await?;
    let log_checkpoint = app.tlog.sign_checkpoint(log_size, root)?;
    let log_consistency = match prev {
        Some(p) if p.log_size == log_size && p.log_consistency.0 == p.sent_size => {
            p.log_consistency.clone()
        }
        Some(p) if p.sent_size > 0 && p.sent_size < log_size => {
            let proof = app.tlog.consistency_proof(p.sent_size, log_size).await?;
            Arc::new((
                p.sent_size,
                proof.into_iter().map(|h| h.0.to_vec()).collect(),
            ))
        }
        _ => Arc::new((0, Vec::new())),
    };
    let revisions = (
        entries_revision,
        revocations_revision,
        bundle_sequence,
        policy_revision,
        risk_revision,
    );
    let sent_size = match prev {
        Some(p)
            if (
                p.entries_revision,
                p.revocations_revision,
                p.bundle_sequence,
                p.policy_revision,
                p.risk_revision,
            ) == revisions =>
        {
            p.sent_size
        }
        _ => log_size,
    };
    Ok(SharedSync {
        entries_revision,
        entries,
        revocations_revision,
        revocations,
        revoked,
        bundle_sequence,
        bundle_json: authorities.bundle_json.clone(),
        policy_revision,
        policy,
        risk_revision,
        risks,
        evicted,
        log_size,
        log_checkpoint,
        log_consistency,
        sent_size,
    })
}

/// The one task that re-reads the shared sync state: at start, on every change
/// notification (local writes, and PostgreSQL LISTEN/NOTIFY from other replicas) and
/// every [`SYNC_POLL`]. Every refresh is published (even when nothing fleet-wide changed),
/// so that every stream re-checks its own node's eviction and revocation at once. Ends
/// when the server's state is dropped.
async fn refresh_shared(
    app: std::sync::Weak<AppState>,
    mut changes: watch::Receiver<u64>,
    tx: watch::Sender<SharedState>,
) {
    let mut prev: Option<Arc<SharedSync>> = None;
    loop {
        // Marked seen before reading: a change made during the read triggers another round.
        changes.borrow_and_update();
        let Some(state) = app.upgrade() else { return };
        let started = std::time::Instant::now();
        match read_shared(&state, prev.as_deref()).await {
            Ok(s) => {
                tracing::debug!(
                    elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    policy_revision = s.policy_revision,
                    revocations_revision = s.revocations_revision,
                    "sync state refreshed"
                );
                let s = Arc::new(s);
                prev = Some(s.clone());
                tx.send_replace(Some(Ok(s)));
            }
            Err(e) => {
                tracing::error!(error = %e, "node API failure: reading the sync state");
                prev = None;
                tx.send_replace(Some(Err(())));
            }
        }
        drop(state);
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(SYNC_POLL) => {}
        }
    }
}

/// Whether `node` must be cut off: evicted, unknown, or its SVID revoked.
///
/// Decided from the shared snapshot, which the refresher re-reads after every change (an
/// eviction or a revocation notifies it), so no stream queries the store on a change in
/// the common case. A node the snapshot lists as evicted is confirmed from the store (it may
/// have re-attested since the snapshot was read); an unknown node is cut off. The
/// revocation check is `sigil_core`'s rule (the store's `is_revoked` too) applied to the
/// snapshot's revocations: the SVID's serial, or its SPIFFE ID revoked at or after the SVID
/// was issued.
/// It is skipped while `revoked_clear_at` (the revocations revision at which it last came
/// back negative) is still current: every new revocation bumps that revision, and one only
/// ever stops applying (it expires), never starts by itself.
async fn is_cut_off(
    app: &AppState,
    s: &SharedSync,
    node: &SpiffeId,
    serial: &str,
    not_before: i64,
    revoked_clear_at: &mut Option<i64>,
) -> Result<bool, Status> {
    if s.evicted.contains(node.as_str()) {
        let record = app.store.get_node(node).await.map_err(internal)?;
        if record.as_ref().is_none_or(|n| n.evicted) {
            return Ok(true);
        }
    }
    if *revoked_clear_at == Some(s.revocations_revision) {
        return Ok(false);
    }
    let now = app.clock.now();
    let svid = Credential {
        serial,
        spiffe_id: node.as_str(),
        not_before,
    };
    let revoked = s.revoked.is_revoked(&svid, now);
    if !revoked {
        *revoked_clear_at = Some(s.revocations_revision);
    }
    Ok(revoked)
}

fn sync_key(s: &SharedSync, cut_off: bool) -> SyncKey {
    SyncKey {
        entries: s.entries_revision,
        revocations: s.revocations_revision,
        bundle: s.bundle_sequence,
        policy: s.policy_revision,
        risk: s.risk_revision,
        cut_off,
    }
}

/// An entry as the sync streams send it, with the node selectors its parent must have.
#[derive(Debug)]
struct NodeEntry {
    requires: Vec<String>,
    entry: pb::Entry,
}

fn sync_update(app: &AppState, s: &SharedSync, node: &NodeRecord, cut_off: bool) -> pb::SyncUpdate {
    if cut_off {
        return pb::SyncUpdate {
            evicted: true,
            ..Default::default()
        };
    }
    let now = app.clock.now();
    pb::SyncUpdate {
        log_checkpoint: s.log_checkpoint.clone(),
        log_key: app.tlog.vkey().to_owned(),
        // Only the entries whose node selectors this node has: the others are neither sent
        // nor signed (`entry_of`).
        entries: s
            .entries
            .get(node.spiffe_id.as_str())
            .map(|group| {
                group
                    .iter()
                    .filter(|e| sigil_core::node_has_all(&e.requires, &node.selectors))
                    .map(|e| e.entry.clone())
                    .collect()
            })
            .unwrap_or_default(),
        entries_revision: s.entries_revision,
        bundle_json: s.bundle_json.clone(),
        bundle_sequence: s.bundle_sequence,
        revocations: s
            .revocations
            .iter()
            .filter(|r| r.expires_at > now)
            .cloned()
            .collect(),
        revocations_revision: s.revocations_revision,
        evicted: false,
        policy_bundle: s.policy.0.clone(),
        policy_revision: s.policy.1,
        log_consistency_from: s.log_consistency.0,
        log_consistency_proof: s.log_consistency.1.clone(),
        node_risks: s.risks.to_vec(),
        risk_revision: s.risk_revision,
    }
}

/// How often the shared sync state is re-read even without a local change notification
/// (changes made through another replica, expiring revocations).
const SYNC_POLL: std::time::Duration = std::time::Duration::from_secs(1);

type SyncStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SyncUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let node = self.authenticate(&req).await?;
        let Some(PeerAuth::Verified(svid)) = req.extensions().get::<PeerAuth>().cloned() else {
            return Err(Status::unauthenticated("node SVID required"));
        };
        let app = self.app.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut shared = self.shared_sync();
        tokio::spawn(async move {
            let mut last: Option<SyncKey> = None;
            let mut revoked_clear_at: Option<i64> = None;
            loop {
                let state = shared.borrow_and_update().clone();
                match state {
                    // Not read yet: wait for the refresher's first round.
                    None => {}
                    Some(Err(())) => {
                        let _ = tx.send(Err(Status::internal("internal error"))).await;
                        return;
                    }
                    Some(Ok(s)) => {
                        let cut_off = match is_cut_off(
                            &app,
                            &s,
                            &node.spiffe_id,
                            &svid.serial,
                            svid.not_before,
                            &mut revoked_clear_at,
                        )
                        .await
                        {
                            Ok(c) => c,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        };
                        let key = sync_key(&s, cut_off);
                        if last != Some(key) {
                            let update = sync_update(&app, &s, &node, cut_off);
                            if tx.send(Ok(update)).await.is_err() {
                                return;
                            }
                            last = Some(key);
                            if cut_off {
                                tracing::warn!(node = %node.spiffe_id, "sync stream ended: node evicted or revoked");
                                return;
                            }
                        }
                    }
                }
                tokio::select! {
                    r = shared.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let req = req.into_inner();
        let (node_id, selectors, method) = match (&req.tpm, req.join_token.is_empty()) {
            (Some(tpm), true) => {
                let (id, selectors) = self.attest_tpm(tpm, &req.csr)?;
                (id, selectors, "tpm")
            }
            (None, false) => (
                self.attest_join_token(&req.join_token, &req.csr).await?,
                Vec::new(),
                "join_token",
            ),
            (Some(_), false) => {
                return Err(Status::invalid_argument(
                    "give a join token or TPM evidence, not both",
                ));
            }
            (None, true) => {
                return Err(Status::invalid_argument("malformed join token"));
            }
        };
        let now = self.app.clock.now();
        let spec = SvidSpec {
            spiffe_id: node_id.clone(),
            dns_names: Vec::new(),
            ttl_secs: self.app.config.node_svid_ttl_secs,
        };
        let svid = self
            .app
            .issuer
            .sign_x509_svid(&req.csr, spec, method)
            .await
            .map_err(issue_status)?;
        self.app
            .store
            .upsert_node(&NodeRecord {
                spiffe_id: node_id.clone(),
                attestation_type: method.into(),
                serial: svid.serial.clone(),
                not_after: svid.not_after,
                evicted: false,
                selectors,
                created_at: now,
                updated_at: now,
            })
            .await
            .map_err(internal)?;
        tracing::info!(node = %node_id, method, "node attested");
        Ok(Response::new(pb::AttestResponse {
            svid: Some(self.svid_response(&svid)),
        }))
    }

    async fn begin_tpm_attestation(
        &self,
        req: Request<pb::TpmAttestationRequest>,
    ) -> Result<Response<pb::TpmChallenge>, Status> {
        let verifier = self.tpm_verifier()?;
        let challenge = verifier.begin(req.get_ref(), self.app.clock.now())?;
        Ok(Response::new(challenge))
    }

    async fn renew_node_svid(
        &self,
        req: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::X509SvidResponse>, Status> {
        let mut node = self.authenticate(&req).await?;
        if node.attestation_type == "tpm" {
            node.selectors = self.reattest_tpm(&node, req.get_ref()).await?;
        }
        let spec = SvidSpec {
            spiffe_id: node.spiffe_id.clone(),
            dns_names: Vec::new(),
            ttl_secs: self.app.config.node_svid_ttl_secs,
        };
        let svid = self
            .app
            .issuer
            .sign_x509_svid(&req.get_ref().csr, spec, node.spiffe_id.as_str())
            .await
            .map_err(issue_status)?;
        let now = self.app.clock.now();
        self.app
            .store
            .upsert_node(&NodeRecord {
                serial: svid.serial.clone(),
                not_after: svid.not_after,
                updated_at: now,
                ..node
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(self.svid_response(&svid)))
    }

    async fn fetch_entries(
        &self,
        req: Request<pb::FetchEntriesRequest>,
    ) -> Result<Response<pb::FetchEntriesResponse>, Status> {
        let node = self.authenticate(&req).await?;
        let revision = self.app.store.entries_revision().await.map_err(internal)?;
        let entries = self
            .app
            .store
            .list_entries(&EntryFilter {
                parent_id: Some(node.spiffe_id),
                spiffe_id: None,
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::FetchEntriesResponse {
            entries: entries
                .into_iter()
                .filter(|e| e.spec.node_matches(&node.selectors))
                .map(entry_to_pb)
                .collect(),
            bundle_json: self.app.authorities.current().bundle_json.clone(),
            entries_revision: revision,
        }))
    }

    async fn sign_x509_svids(
        &self,
        req: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        let node = self.authenticate(&req).await?;
        let csrs = &req.get_ref().csrs;
        if csrs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} CSRs per call"
            )));
        }
        let quarantines = self.quarantines_of(&node).await?;
        if quarantines.iter().any(|q| q.spiffe_id.is_none()) {
            return Err(Status::permission_denied(format!(
                "node {} is quarantined until an operator clears it",
                node.spiffe_id
            )));
        }
        let mut svids = Vec::with_capacity(csrs.len());
        for c in csrs {
            let entry = self.entry_of(&node, &c.entry_id).await?;
            // A quarantined workload gets nothing; the node's other workloads go on.
            if quarantines
                .iter()
                .any(|q| q.spiffe_id.as_deref() == Some(entry.spec.spiffe_id.as_str()))
            {
                tracing::warn!(node = %node.spiffe_id, spiffe_id = %entry.spec.spiffe_id, "not signing: workload quarantined");
                continue;
            }
            let spec = SvidSpec {
                spiffe_id: entry.spec.spiffe_id.clone(),
                dns_names: entry.spec.dns_names.clone(),
                ttl_secs: entry.spec.x509_ttl_secs,
            };
            let svid = self
                .app
                .issuer
                .sign_x509_svid(&c.csr, spec, node.spiffe_id.as_str())
                .await
                .map_err(issue_status)?;
            svids.push(pb::SignedSvid {
                entry_id: entry.id.to_string(),
                svid: Some(self.svid_response(&svid)),
            });
        }
        Ok(Response::new(pb::SignX509SvidsResponse { svids }))
    }

    async fn report_posture(
        &self,
        req: Request<pb::PostureReport>,
    ) -> Result<Response<pb::PostureAck>, Status> {
        let node = self.authenticate(&req).await?;
        let r = req.get_ref();
        let v = crate::risk::report_posture(
            &self.app,
            &node.spiffe_id,
            &r.posture_json,
            r.score,
            &r.reasons,
        )
        .await
        .map_err(|e| match e {
            crate::risk::ReportError::Invalid(m) => Status::invalid_argument(m),
            crate::risk::ReportError::Server(e) => internal(e),
        })?;
        Ok(Response::new(pb::PostureAck {
            risk: Some(pb::NodeRisk {
                node_id: v.node_id,
                level: v.level.as_str().to_owned(),
                score: u32::from(v.score),
                at: v.at,
                quarantined: v.quarantined,
            }),
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<pb::ConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProofResponse>, Status> {
        self.authenticate(&req).await?;
        let r = req.get_ref();
        let key = (r.old_size, r.new_size);
        let cached = self.proofs.lock().ok().and_then(|m| m.get(&key).cloned());
        let hashes = match cached {
            Some(h) => h,
            None => {
                let (size, _) = self.app.tlog.head().await.map_err(internal)?;
                if r.old_size > r.new_size || r.new_size > size {
                    return Err(Status::out_of_range(format!(
                        "sizes {}..{} are not within the log's {size} leaves",
                        r.old_size, r.new_size
                    )));
                }
                let proof = self
                    .app
                    .tlog
                    .consistency_proof(r.old_size, r.new_size)
                    .await
                    .map_err(internal)?;
                let h = Arc::new(proof.into_iter().map(|h| h.0.to_vec()).collect::<Vec<_>>());
                if let Ok(mut m) = self.proofs.lock() {
                    if m.len() >= MAX_CACHED_PROOFS {
                        m.clear();
                    }
                    m.insert(key, h.clone());
                }
                h
            }
        };
        Ok(Response::new(pb::ConsistencyProofResponse {
            hashes: hashes.as_ref().clone(),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let node = self.authenticate(&req).await?;
        let r = req.get_ref();
        let entry = self.entry_of(&node, &r.entry_id).await?;
        if crate::risk::is_quarantined(
            &self.app,
            node.spiffe_id.as_str(),
            entry.spec.spiffe_id.as_str(),
        )
        .await
        .map_err(internal)?
        {
            return Err(Status::permission_denied(format!(
                "{} on {} is quarantined until an operator clears it",
                entry.spec.spiffe_id, node.spiffe_id
            )));
        }
        let (token, exp) = self
            .app
            .issuer
            .mint_jwt_svid(
                &entry.spec.spiffe_id,
                &r.audience,
                entry.spec.jwt_ttl_secs,
                node.spiffe_id.as_str(),
            )
            .await
            .map_err(issue_status)?;
        Ok(Response::new(pb::MintJwtSvidResponse {
            spiffe_id: entry.spec.spiffe_id.to_string(),
            token,
            expires_at: exp,
        }))
    }
}

fn entry_to_pb(e: sigil_core::RegistrationEntry) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spiffe_id: e.spec.spiffe_id.to_string(),
        parent_id: e.spec.parent_id.to_string(),
        selectors: e.spec.selectors.iter().map(ToString::to_string).collect(),
        x509_ttl_secs: e.spec.x509_ttl_secs,
        jwt_ttl_secs: e.spec.jwt_ttl_secs,
        dns_names: e.spec.dns_names,
        groups: e.spec.groups,
        scopes: e.spec.scopes,
        enforcer: e.spec.enforcer,
        revision: e.revision,
    }
}
