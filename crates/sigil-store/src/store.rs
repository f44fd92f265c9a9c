//! The `Store` trait: every read and write the trust authority makes to its persistent state.
use async_trait::async_trait;
use sigil_core::{EntryId, EntrySpec, RegistrationEntry, SpiffeId, UnixTime};

use crate::sql::BootstrapLock;
use crate::{
    AuthorityKind, AuthorityRecord, AuthorityState, DbRoleRecord, EntryFilter, IssuedIdentity,
    LeaseFilter, LeaseRecord, ModelKeyRecord, NodeRecord, NodeRiskRecord, PolicyBundleRecord,
    QuarantineRecord, Revocation, SecretVersionRecord, StoreError,
};

/// The trust authority's persistent state. Object safe: the server holds an `Arc<dyn Store>`.
///
/// Every write is committed (durable) before the method returns.
#[async_trait]
pub trait Store: Send + Sync {
    // ---- registration entries ----

    /// Stores a new entry as given. [`StoreError::Conflict`] if its ID is taken, or if an entry
    /// with the same SPIFFE ID, parent ID and selector *set* (order and repeats ignored) exists.
    async fn create_entry(&self, entry: &RegistrationEntry) -> Result<(), StoreError>;

    /// One entry; [`StoreError::NotFound`] if absent.
    async fn get_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError>;

    /// Entries matching `filter`, ordered by SPIFFE ID, then entry ID.
    async fn list_entries(
        &self,
        filter: &EntryFilter,
    ) -> Result<Vec<RegistrationEntry>, StoreError>;

    /// Replaces an entry's spec: revision + 1, `updated_at = now`. [`StoreError::NotFound`] if
    /// absent, [`StoreError::Conflict`] if the new spec duplicates another entry.
    async fn update_entry(
        &self,
        id: &EntryId,
        spec: &EntrySpec,
        now: UnixTime,
    ) -> Result<RegistrationEntry, StoreError>;

    /// Deletes an entry; [`StoreError::NotFound`] if absent.
    async fn delete_entry(&self, id: &EntryId) -> Result<(), StoreError>;

    /// How many entries exist.
    async fn count_entries(&self) -> Result<i64, StoreError>;

    /// A persisted number that strictly increases on every entry create, update and delete.
    async fn entries_revision(&self) -> Result<i64, StoreError>;

    // ---- nodes ----

    /// Inserts or replaces a node (its `created_at` is kept from the first insert).
    async fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError>;

    /// One node, if known.
    async fn get_node(&self, id: &SpiffeId) -> Result<Option<NodeRecord>, StoreError>;

    /// All nodes, ordered by SPIFFE ID.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// The SPIFFE IDs of evicted nodes, ordered.
    async fn list_evicted_nodes(&self) -> Result<Vec<SpiffeId>, StoreError>;

    /// Marks a node evicted; `false` if the node is unknown.
    async fn evict_node(&self, id: &SpiffeId, now: UnixTime) -> Result<bool, StoreError>;

    // ---- join tokens (only their SHA-256, lowercase hex, is ever stored) ----

    /// Stores a join token's hash. [`StoreError::Invalid`] unless `token_hash` is 64 lowercase
    /// hex digits; [`StoreError::Conflict`] if it exists.
    async fn create_join_token(
        &self,
        token_hash: &str,
        expires_at: UnixTime,
        created_at: UnixTime,
    ) -> Result<(), StoreError>;

    /// Atomically consumes a join token for `node_id`: of any number of concurrent callers,
    /// exactly one succeeds. Otherwise [`StoreError::JoinToken`] says why.
    async fn consume_join_token(
        &self,
        token_hash: &str,
        node_id: &SpiffeId,
        now: UnixTime,
    ) -> Result<(), StoreError>;

    // ---- issued identities ----

    /// Records an issued credential. [`StoreError::Conflict`] if its kind and serial/jti exist.
    async fn record_issued(&self, issued: &IssuedIdentity) -> Result<(), StoreError>;

    /// Records several issued credentials in one transaction (one durable commit): all or
    /// none. Used for group commit under load.
    async fn record_issued_batch(&self, issued: &[IssuedIdentity]) -> Result<(), StoreError>;

    /// Issued credentials, newest first, optionally only of one SPIFFE ID; at most `limit`
    /// (clamped to `0..=10_000`).
    async fn list_issued(
        &self,
        spiffe_id: Option<&SpiffeId>,
        limit: i64,
    ) -> Result<Vec<IssuedIdentity>, StoreError>;

    /// How many credentials were recorded.
    async fn count_issued(&self) -> Result<i64, StoreError>;

    /// The credential with this serial or jti (the newest, if kinds share it).
    async fn issued_by_serial(&self, serial: &str) -> Result<Option<IssuedIdentity>, StoreError>;

    // ---- revocations ----

    /// Stores a revocation and returns its ID. [`StoreError::Invalid`] if it names neither a
    /// serial nor a SPIFFE ID.
    async fn add_revocation(&self, revocation: &Revocation) -> Result<i64, StoreError>;

    /// Revocations still in force (`expires_at > now`), ordered by ID.
    async fn list_revocations(&self, now: UnixTime) -> Result<Vec<Revocation>, StoreError>;

    /// Whether a credential is revoked: `sigil_core`'s rule ([`sigil_core::RevokedSvid::revokes`])
    /// over the stored revocations (a live one names `serial`, or names `spiffe_id` with
    /// `revoked_at >= issued_at`).
    async fn is_revoked(
        &self,
        serial: &str,
        spiffe_id: &SpiffeId,
        issued_at: UnixTime,
        now: UnixTime,
    ) -> Result<bool, StoreError>;

    /// Deletes revocations with `expires_at <= now`; returns how many.
    async fn prune_revocations(&self, now: UnixTime) -> Result<u64, StoreError>;

    /// A persisted number that strictly increases whenever the set of revocations changes.
    async fn revocations_revision(&self) -> Result<i64, StoreError>;

    // ---- signing authorities ----

    /// Inserts an authority, or replaces the one with the same ID.
    async fn save_authority(&self, authority: &AuthorityRecord) -> Result<(), StoreError>;

    /// Authorities of `kind`, ordered by `created_at`, then ID.
    async fn list_authorities(
        &self,
        kind: AuthorityKind,
    ) -> Result<Vec<AuthorityRecord>, StoreError>;

    /// Moves an authority to `state`; entering `Active` from another state sets
    /// `activated_at = now`. [`StoreError::NotFound`] if absent.
    async fn set_authority_state(
        &self,
        id: &str,
        state: AuthorityState,
        now: UnixTime,
    ) -> Result<(), StoreError>;

    /// `last_use_expiry = max(last_use_expiry, not_after)`. [`StoreError::NotFound`] if absent.
    async fn bump_authority_use(&self, id: &str, not_after: UnixTime) -> Result<(), StoreError>;

    /// Deletes an authority. [`StoreError::NotFound`] if absent.
    async fn delete_authority(&self, id: &str) -> Result<(), StoreError>;

    // ---- policy bundles ----

    /// Stores a pushed bundle. [`StoreError::Conflict`] if its revision exists (another
    /// replica pushed meanwhile: take the next revision and sign again).
    async fn insert_policy_bundle(&self, bundle: &PolicyBundleRecord) -> Result<(), StoreError>;

    /// The bundle with the highest revision, if any was pushed.
    async fn latest_policy_bundle(&self) -> Result<Option<PolicyBundleRecord>, StoreError>;

    /// The highest pushed revision (0 before the first push).
    async fn policy_revision(&self) -> Result<i64, StoreError>;

    // ---- transparency log ----

    /// Records issued credentials and appends their transparency-log leaves (with the
    /// tree's new stored hashes) in ONE transaction: all or none. [`StoreError::Conflict`] if a
    /// credential exists or a leaf index is taken (another writer appended meanwhile).
    async fn record_issued_logged(
        &self,
        issued: &[IssuedIdentity],
        log: &TlogAppend,
    ) -> Result<(), StoreError>;

    /// How many leaves the transparency log holds.
    async fn tlog_size(&self) -> Result<u64, StoreError>;

    /// The stored tree hashes at these indexes, in order. [`StoreError::NotFound`] if one is
    /// missing.
    async fn tlog_hashes(&self, indexes: &[u64]) -> Result<Vec<[u8; 32]>, StoreError>;

    /// The data of leaves `start..end` (fewer if the log is shorter), in order.
    async fn tlog_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError>;

    // ---- audit log (proxy decision records) ----

    /// The audit-log index of each of these request ids shipped by `proxy`, `None` where the
    /// record is not in the log.
    async fn audit_lookup(
        &self,
        proxy: &str,
        request_ids: &[String],
    ) -> Result<Vec<Option<u64>>, StoreError>;

    /// Appends records shipped by `proxy` to the audit log with the tree's new stored hashes
    /// in ONE transaction; `request_ids[i]` is the id of `log.leaves[i]`.
    /// [`StoreError::Conflict`] if a leaf index is taken (another writer appended meanwhile)
    /// or a `(proxy, request_id)` is already logged.
    async fn audit_append(
        &self,
        proxy: &str,
        request_ids: &[String],
        log: &TlogAppend,
    ) -> Result<(), StoreError>;

    /// How many leaves the audit log holds.
    async fn audit_size(&self) -> Result<u64, StoreError>;

    /// The audit log's stored tree hashes at these indexes, in order.
    async fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<[u8; 32]>, StoreError>;

    /// The data of audit leaves `start..end` (fewer if the log is shorter), in order.
    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError>;

    // ---- sealed private keys (HA: every replica signs with the same keys) ----

    /// Stores a sealed (encrypted) private key under `name` unless one exists; returns
    /// whether this call stored it (of concurrent callers, exactly one does).
    async fn put_sealed_key(
        &self,
        name: &str,
        sealed: &str,
        now: UnixTime,
    ) -> Result<bool, StoreError>;

    /// The sealed key stored under `name`, if any.
    async fn sealed_key(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Deletes the sealed key `name` (nothing if absent).
    async fn delete_sealed_key(&self, name: &str) -> Result<(), StoreError>;

    /// Takes the database-wide bootstrap lock, held until [`BootstrapLock::release`] (or drop):
    /// replicas starting at once take it around "create the keys if there are none", so only
    /// one creates them. A session advisory lock on PostgreSQL; nothing on SQLite (one server).
    async fn bootstrap_lock(&self) -> Result<BootstrapLock, StoreError>;

    // ---- sealed models ----

    /// Registers a model version's wrapped data key. [`StoreError::Conflict`] if the version
    /// (or the key id) exists.
    async fn create_model_key(&self, key: &ModelKeyRecord) -> Result<(), StoreError>;

    /// One model version's key record, if registered.
    async fn model_key(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<ModelKeyRecord>, StoreError>;

    /// Records that the version's one file was sealed: `false` (and nothing changes) if it
    /// is unknown or was sealed before (of concurrent callers, at most one succeeds).
    async fn mark_model_sealed(
        &self,
        name: &str,
        version: i64,
        header_sha256: &str,
        plaintext_sha256: &str,
        now: UnixTime,
    ) -> Result<bool, StoreError>;

    /// Every registered model version, by name then version.
    async fn list_model_keys(&self) -> Result<Vec<ModelKeyRecord>, StoreError>;

    // ---- secrets ----

    /// Stores a secret version. [`StoreError::Conflict`] if that version (or key id) exists.
    async fn create_secret_version(&self, v: &SecretVersionRecord) -> Result<(), StoreError>;

    /// The newest version of the secret at `path` (deleted or not), if any was written.
    async fn latest_secret_version(
        &self,
        path: &str,
    ) -> Result<Option<SecretVersionRecord>, StoreError>;

    /// Every version of the secret at `path`, oldest first.
    async fn secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError>;

    /// The newest version of every secret, by path.
    async fn list_secrets(&self) -> Result<Vec<SecretVersionRecord>, StoreError>;

    /// Deletes every version of the secret at `path` not deleted yet: marks it and destroys
    /// its wrapped key and ciphertext. Returns how many versions it deleted.
    async fn delete_secret(&self, path: &str, now: UnixTime) -> Result<u64, StoreError>;

    /// Creates or replaces a dynamic credential role definition.
    async fn put_db_role(&self, role: &DbRoleRecord) -> Result<(), StoreError>;

    /// One role definition.
    async fn db_role(&self, name: &str) -> Result<Option<DbRoleRecord>, StoreError>;

    /// Every role definition, by name.
    async fn list_db_roles(&self) -> Result<Vec<DbRoleRecord>, StoreError>;

    /// Deletes a role definition: `false` if there was none.
    async fn delete_db_role(&self, name: &str) -> Result<bool, StoreError>;

    /// Records a new lease. [`StoreError::Conflict`] if the id exists.
    async fn create_lease(&self, lease: &LeaseRecord) -> Result<(), StoreError>;

    /// One lease.
    async fn lease(&self, id: &str) -> Result<Option<LeaseRecord>, StoreError>;

    /// The leases `filter` selects, soonest end first.
    async fn list_leases(&self, filter: &LeaseFilter) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Moves an open lease's end to `expires_at`: `false` if it is closed or unknown.
    async fn extend_lease(&self, id: &str, expires_at: UnixTime) -> Result<bool, StoreError>;

    /// Closes an open lease (its credential is gone): `false` if it was closed before (of
    /// concurrent callers, exactly one gets `true`) or is unknown.
    async fn close_lease(&self, id: &str, now: UnixTime, reason: &str) -> Result<bool, StoreError>;

    // ---- node risk and quarantines ----

    /// Records the posture a node's agent reported with its ruleset's score. Bumps the risk
    /// revision only when the score or its reasons changed. Returns the node's record.
    async fn put_posture(
        &self,
        node_id: &str,
        posture_json: &str,
        score: i64,
        reasons: &[String],
        now: UnixTime,
    ) -> Result<NodeRiskRecord, StoreError>;

    /// Sets a node's behaviour score and reasons (bumps the risk revision when they changed).
    async fn set_anomaly(
        &self,
        node_id: &str,
        score: i64,
        reasons: &[String],
        now: UnixTime,
    ) -> Result<NodeRiskRecord, StoreError>;

    /// Every node's risk record.
    async fn list_node_risk(&self) -> Result<Vec<NodeRiskRecord>, StoreError>;

    /// One node's risk record.
    async fn node_risk(&self, node_id: &str) -> Result<Option<NodeRiskRecord>, StoreError>;

    /// Bumped by every change to node risks and quarantines.
    async fn risk_revision(&self) -> Result<i64, StoreError>;

    /// Quarantines a node or a workload on it, in one transaction: the quarantine row, and a
    /// revocation (by serial) of every unexpired X.509-SVID that node asked for (of that
    /// workload only, when one is named) — never the node's own SVID, so its agent stays
    /// connected and recovers once cleared. Bumps the revocations and risk revisions.
    /// Returns the quarantine's id and the serials revoked. A node or workload already under
    /// an active quarantine gets no second row (its id is returned, serials still revoked).
    async fn quarantine(
        &self,
        q: &QuarantineRecord,
        expires_at: UnixTime,
    ) -> Result<(i64, Vec<String>), StoreError>;

    /// The quarantines not cleared yet.
    async fn active_quarantines(&self) -> Result<Vec<QuarantineRecord>, StoreError>;

    /// Clears the active quarantines of a node (every one of them when `spiffe_id` is None,
    /// else that workload's) and resets its behaviour score. Returns how many were cleared.
    async fn clear_quarantine(
        &self,
        node_id: &str,
        spiffe_id: Option<&str>,
        now: UnixTime,
    ) -> Result<u64, StoreError>;

    // ---- meta ----

    /// The trust bundle's sequence number (0 before the first bump).
    async fn bundle_sequence(&self) -> Result<i64, StoreError>;

    /// Atomically increments the bundle sequence number and returns the new value.
    async fn bump_bundle_sequence(&self) -> Result<i64, StoreError>;

    /// Checks the database answers (for readiness probes).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Leaves to append to the transparency log, with the tree hashes they complete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlogAppend {
    /// `(leaf index, leaf data)`, consecutive from the current size.
    pub leaves: Vec<(u64, Vec<u8>)>,
    /// `(stored hash index, hash)` of every hash the new leaves add to the tree.
    pub hashes: Vec<(u64, [u8; 32])>,
}
