//! The agent's signed policy bundle: verified on arrival from the sync stream with the policy
//! keys of the trust bundle, never rolled back (the highest accepted revision is persisted in
//! the cache directory, so it survives restarts), kept when a bad one arrives, and persisted
//! for offline use. The Enforcer API serves it verbatim to the local proxy, which verifies it
//! again.
//!
//! File (in `<data_dir>/cache`, 0600):
//! - `policy-state.slots`: a two-slot file ([`crate::slotfile`]) whose newest valid record
//!   is `{"revision", "payload_sha256", "envelope"}`: the highest accepted revision (the
//!   anti-rollback floor) and the envelope of that bundle together, so the bundle and its
//!   floor can never be out of step on disk. Accepting a bundle overwrites the other slot in
//!   place and flushes once (`fdatasync`, no metadata change), instead of a temp + rename
//!   replace (two flushes, two journal commits): with hundreds of agents on one disk
//!   (`sigil bench propagation`), or one agent on eMMC/SD, that halves the cost of an
//!   accepted bundle. A write torn by a crash leaves the previous record in the other slot,
//!   so the floor at load is never above what was acknowledged nor below the previous
//!   acknowledged one. A file with no valid slot is moved aside (`.corrupt`).
//!
//! Previous layouts (still read, so an upgraded agent keeps its floor):
//! `policy-revision.json` (replaced atomically) held `{"revision", "payload_sha256",
//! "envelope"}`, and before that `policy-bundle.json` held the envelope and
//! `policy-revision.json` only `{"revision", "payload_sha256"}`. At load the floor is the
//! highest of the records and every cached bundle that verifies (the two-file layout wrote
//! the bundle first, so it may be newer than its record). The old files are removed once a
//! newer bundle is durable in the slot file. An agent of a version before the slot file,
//! after a downgrade, does not see the floor (the proxy keeps its own).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sigil_policy::bundle::{
    Accepted, BundleError, PolicyKeys, Verdict, VerifiedBundle, check_time, open, verify,
};

use crate::cache::{CacheError, move_aside};
use crate::slotfile::SlotFile;

/// The anti-rollback record with the accepted bundle's envelope, in a two-slot file.
pub const STATE_FILE: &str = "policy-state.slots";
/// The two-file layout's file for the last accepted bundle's envelope (read, then removed).
pub const BUNDLE_FILE: &str = "policy-bundle.json";
/// The previous layouts' anti-rollback record (read, then removed).
pub const REVISION_FILE: &str = "policy-revision.json";

/// The record (in `policy-state.slots`, as in `policy-revision.json`). `envelope` is absent
/// in the two-file layout.
#[derive(Serialize, Deserialize)]
struct RecordFile {
    revision: u64,
    payload_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    envelope: Option<String>,
}

/// What the agent holds of policy.
#[derive(Debug)]
pub struct PolicyState {
    dir: PathBuf,
    trust_domain: String,
    accepted: Option<Accepted>,
    current: Option<Arc<VerifiedBundle>>,
    /// The open slot file (opened or created at the first write if not at load).
    slots: Option<SlotFile>,
    /// A previous layout's file was there at load (removed after the next write).
    legacy_files: bool,
}

/// What [`PolicyState::offer`] did.
#[derive(Debug)]
pub enum Offer {
    /// A newer bundle was accepted and persisted.
    Accepted(Arc<VerifiedBundle>),
    /// The bundle already held.
    Unchanged,
}

impl PolicyState {
    /// Loads the anti-rollback record and the cached bundle (its signature checked with
    /// `keys`, the policy keys of the cached trust bundle), from either layout. A cached
    /// bundle that does not verify is ignored (logged); the record stays, so nothing older
    /// is accepted later.
    pub fn load(dir: &Path, trust_domain: &str, keys: &PolicyKeys) -> Self {
        let mut slots = None;
        let slot_record = match SlotFile::open(&dir.join(STATE_FILE)) {
            Ok(None) => None,
            Ok(Some((f, payload))) => {
                match payload.map(|p| serde_json::from_slice::<RecordFile>(&p)) {
                    None => {
                        slots = Some(f);
                        None
                    }
                    Some(Ok(r)) => {
                        slots = Some(f);
                        Some(r)
                    }
                    Some(Err(e)) => {
                        tracing::error!(file = STATE_FILE, error = %e, "policy state record is corrupt");
                        drop(f);
                        move_aside(dir, STATE_FILE);
                        None
                    }
                }
            }
            Err(crate::slotfile::SlotError::Corrupt(e)) => {
                // Fail safe: refuse to forget the floor silently. Keep the file for
                // inspection and start from the previous layout's record, if any, and the
                // cached bundles' revisions.
                tracing::error!(file = STATE_FILE, error = %e, "policy state file is corrupt");
                move_aside(dir, STATE_FILE);
                None
            }
            Err(e) => {
                tracing::error!(file = STATE_FILE, error = %e, "cannot read the policy state file; the previous layout's record and cached bundles are the floor");
                None
            }
        };
        let legacy_record = match std::fs::read(dir.join(REVISION_FILE)) {
            Ok(b) => match serde_json::from_slice::<RecordFile>(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(file = REVISION_FILE, error = %e, "policy revision record is corrupt");
                    move_aside(dir, REVISION_FILE);
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::error!(file = REVISION_FILE, error = %e, "cannot read the policy revision record; the cached bundle's revision is the floor");
                None
            }
        };
        let legacy = std::fs::read(dir.join(BUNDLE_FILE))
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let legacy_files = legacy_record.is_some()
            || legacy.is_some()
            || dir.join(BUNDLE_FILE).exists()
            || dir.join(REVISION_FILE).exists();
        // The floor: the higher of the two records (the slot file's on a tie).
        let (slot_record, legacy_record) = match (slot_record, legacy_record) {
            (Some(s), Some(l)) if l.revision > s.revision => (None, Some(l)),
            (Some(s), _) => (Some(s), None),
            (None, l) => (None, l),
        };
        let (mut accepted, embedded) = match slot_record.or(legacy_record) {
            Some(r) => (
                Some(Accepted {
                    revision: r.revision,
                    payload_sha256: r.payload_sha256,
                }),
                r.envelope,
            ),
            None => (None, None),
        };
        let mut current = None;
        // The record's own envelope first, then the two-file layout's bundle file (which
        // that layout wrote before its record, so it may be the newer one).
        for (file, text) in [("policy record", embedded), (BUNDLE_FILE, legacy)] {
            let Some(text) = text else { continue };
            match open(&text, keys) {
                Ok(b) if b.content.trust_domain != trust_domain => {
                    tracing::error!(
                        file,
                        found = %b.content.trust_domain,
                        "cached policy bundle is for another trust domain; ignoring it"
                    );
                }
                Ok(b) => {
                    let a = b.accepted();
                    match &accepted {
                        Some(r) if a.revision < r.revision => tracing::warn!(
                            file,
                            cached = a.revision,
                            floor = r.revision,
                            "cached policy bundle is older than the highest accepted revision; not serving it"
                        ),
                        Some(r) if a.revision == r.revision && a != *r => tracing::error!(
                            file,
                            revision = a.revision,
                            "cached policy bundle differs from the accepted one of its revision; not serving it"
                        ),
                        _ => {
                            if accepted.as_ref().is_none_or(|r| a.revision > r.revision) {
                                accepted = Some(a);
                            }
                            current = Some(Arc::new(b));
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(file, error = %e, "cached policy bundle does not verify; ignoring it")
                }
            }
        }
        Self {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            accepted,
            current,
            slots,
            legacy_files,
        }
    }

    /// The bundle being served, if any.
    pub fn current(&self) -> Option<Arc<VerifiedBundle>> {
        self.current.clone()
    }

    /// The highest accepted revision and its payload hash.
    pub fn accepted(&self) -> Option<&Accepted> {
        self.accepted.as_ref()
    }

    /// Verifies `envelope` at `now` against `keys` and the highest accepted revision; a
    /// newer valid bundle is persisted (bundle and record in one slot write and one flush:
    /// this blocks on the disk, call it off the async worker threads) and becomes current. On any
    /// refusal the current bundle stays.
    pub fn offer(
        &mut self,
        envelope: &str,
        keys: &PolicyKeys,
        now: i64,
    ) -> Result<Offer, BundleError> {
        match verify(
            envelope,
            keys,
            &self.trust_domain,
            now,
            self.accepted.as_ref(),
        )? {
            Verdict::Unchanged(_) => Ok(Offer::Unchanged),
            Verdict::New(b) => {
                let b: Arc<VerifiedBundle> = Arc::from(b);
                let a = b.accepted();
                let record = serde_json::to_vec(&RecordFile {
                    revision: a.revision,
                    payload_sha256: a.payload_sha256,
                    envelope: Some(b.envelope.clone()),
                })
                .map_err(|e| BundleError::Malformed(e.to_string()))?;
                // INVARIANT: persisted (durably) before it is served.
                self.persist(&record)
                    .map_err(|e| BundleError::Malformed(format!("persisting: {e}")))?;
                if self.legacy_files {
                    // Older than what was just persisted (their revisions, when they
                    // verified, were in the floor), so losing them, or keeping them after a
                    // crash, is safe.
                    self.legacy_files = false;
                    for file in [REVISION_FILE, BUNDLE_FILE] {
                        match std::fs::remove_file(self.dir.join(file)) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                self.legacy_files = true;
                                tracing::warn!(file, error = %e, "could not remove a previous layout's policy file")
                            }
                        }
                    }
                }
                self.accepted = Some(b.accepted());
                self.current = Some(b.clone());
                Ok(Offer::Accepted(b))
            }
        }
    }

    /// Writes `record` durably into the slot file (created at the first write).
    fn persist(&mut self, record: &[u8]) -> Result<(), CacheError> {
        Ok(SlotFile::write_into(
            &mut self.slots,
            &self.dir.join(STATE_FILE),
            record,
        )?)
    }

    /// Whether the current bundle may still be enforced at `now`.
    pub fn current_is_valid(&self, now: i64) -> bool {
        self.current
            .as_ref()
            .is_some_and(|b| check_time(&b.content, now).is_ok())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::collections::BTreeMap;

    use sigil_policy::bundle::{BundleContent, Envelope, PolicySigner};

    use super::*;

    const NOW: i64 = 1_700_000_000;
    const TD: &str = "td.test";
    const P1: &str = "permit(principal, action == Action::\"list_models\", resource);";
    const P2: &str = "permit(principal, action == Action::\"list_tools\", resource);";

    fn content(revision: u64, policy: &str, not_after: i64) -> BundleContent {
        BundleContent {
            not_after,
            not_before: NOW - 5,
            policies: BTreeMap::from([("a.cedar".to_owned(), policy.to_owned())]),
            rate_limits: None,
            revision,
            schema: sigil_policy::SCHEMA.to_owned(),
            trust_domain: TD.to_owned(),
        }
    }

    fn keys(s: &PolicySigner) -> PolicyKeys {
        PolicyKeys::from_jwks(&[s.public_jwk()]).unwrap()
    }

    fn tamper(env: &str) -> String {
        use base64::Engine as _;
        let mut e: Envelope = serde_json::from_str(env).unwrap();
        let mut p = base64::engine::general_purpose::STANDARD
            .decode(&e.payload)
            .unwrap();
        let n = p.len() / 2;
        p[n] ^= 0x01;
        e.payload = base64::engine::general_purpose::STANDARD.encode(p);
        serde_json::to_string(&e).unwrap()
    }

    fn revision(s: &PolicyState) -> Option<u64> {
        s.current().map(|b| b.content.revision)
    }

    #[test]
    fn every_bad_bundle_is_refused_and_the_last_good_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let other = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        let good = signer.sign(&content(2, P1, NOW + 3600)).unwrap();
        assert!(matches!(st.offer(&good, &k, NOW), Ok(Offer::Accepted(_))));
        assert!(matches!(st.offer(&good, &k, NOW), Ok(Offer::Unchanged)));

        let bad = [
            (
                "tampered",
                tamper(&signer.sign(&content(3, P2, NOW + 3600)).unwrap()),
            ),
            (
                "other key",
                other.sign(&content(3, P2, NOW + 3600)).unwrap(),
            ),
            ("older", signer.sign(&content(1, P2, NOW + 3600)).unwrap()),
            (
                "same revision, other content",
                signer.sign(&content(2, P2, NOW + 3600)).unwrap(),
            ),
            ("expired", signer.sign(&content(3, P2, NOW)).unwrap()),
        ];
        for (what, env) in &bad {
            assert!(st.offer(env, &k, NOW).is_err(), "{what} was accepted");
            assert_eq!(revision(&st), Some(2), "{what}");
            assert_eq!(st.current().unwrap().envelope, good, "{what}");
        }
        let newer = signer.sign(&content(3, P2, NOW + 3600)).unwrap();
        assert!(matches!(st.offer(&newer, &k, NOW), Ok(Offer::Accepted(_))));
        assert_eq!(revision(&st), Some(3));
    }

    /// The newest record in the slot file.
    fn record(dir: &Path) -> serde_json::Value {
        let (_, p) = SlotFile::open(&dir.join(STATE_FILE)).unwrap().unwrap();
        serde_json::from_slice(&p.unwrap()).unwrap()
    }

    /// Rewrites the slot file's record, keeping its floor, with `envelope` in it (or none).
    fn set_record_envelope(dir: &Path, envelope: Option<&str>) {
        let mut r = record(dir);
        match envelope {
            Some(e) => r["envelope"] = e.into(),
            None => {
                r.as_object_mut().unwrap().remove("envelope");
            }
        }
        let (mut f, _) = SlotFile::open(&dir.join(STATE_FILE)).unwrap().unwrap();
        f.write(&serde_json::to_vec(&r).unwrap()).unwrap();
    }

    /// Flips a byte of the slot holding the record of `revision` (a torn write of it).
    fn tear(dir: &Path, revision: u64) {
        let path = dir.join(STATE_FILE);
        let mut b = std::fs::read(&path).unwrap();
        let needle = format!("{{\"revision\":{revision},");
        let at = b
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap();
        b[at + needle.len() + 3] ^= 0x20;
        std::fs::write(&path, b).unwrap();
    }

    /// Writes the one-file layout before the slot file: `policy-revision.json` with the
    /// envelope.
    fn write_one_file(dir: &Path, bundle: &str, k: &PolicyKeys) {
        let a = accepted_of(bundle, k);
        let r = RecordFile {
            revision: a.revision,
            payload_sha256: a.payload_sha256,
            envelope: Some(bundle.to_owned()),
        };
        std::fs::write(dir.join(REVISION_FILE), serde_json::to_vec(&r).unwrap()).unwrap();
    }

    /// Writes the previous version's two-file layout: the bundle, and a record of `floor`.
    fn write_legacy(dir: &Path, bundle: &str, floor: &Accepted) {
        std::fs::write(dir.join(BUNDLE_FILE), bundle).unwrap();
        std::fs::write(dir.join(REVISION_FILE), serde_json::to_vec(floor).unwrap()).unwrap();
    }

    fn accepted_of(env: &str, k: &PolicyKeys) -> Accepted {
        open(env, k).unwrap().accepted()
    }

    #[test]
    fn the_floor_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        let r5 = signer.sign(&content(5, P1, NOW + 3600)).unwrap();
        st.offer(&r5, &k, NOW).unwrap();
        drop(st);
        // One file: the floor and the bundle together.
        assert!(!dir.path().join(BUNDLE_FILE).exists());
        assert!(!dir.path().join(REVISION_FILE).exists());
        let rec = record(dir.path());
        assert_eq!(rec["revision"], 5);
        assert_eq!(rec["envelope"], r5.as_str());

        // Restart: the cached bundle is served, an older one is refused.
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(5));
        assert_eq!(st.accepted().unwrap().revision, 5);
        let r4 = signer.sign(&content(4, P2, NOW + 3600)).unwrap();
        assert!(matches!(
            st.offer(&r4, &k, NOW),
            Err(BundleError::Rollback { .. })
        ));

        // Even with the cached bundle replaced by an older signed one (in the record, or in
        // the previous layout's file), or gone, the record holds the floor.
        set_record_envelope(dir.path(), Some(&r4));
        std::fs::write(dir.path().join(BUNDLE_FILE), &r4).unwrap();
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert_eq!(st.accepted().unwrap().revision, 5);
        assert!(st.offer(&r4, &k, NOW).is_err());
        std::fs::remove_file(dir.path().join(BUNDLE_FILE)).unwrap();
        set_record_envelope(dir.path(), None);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert!(st.offer(&r4, &k, NOW).is_err());
        let r6 = signer.sign(&content(6, P2, NOW + 3600)).unwrap();
        assert!(matches!(st.offer(&r6, &k, NOW), Ok(Offer::Accepted(_))));

        // And again after that restart.
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(6));
        assert!(st.offer(&r5, &k, NOW).is_err());
        assert!(matches!(st.offer(&r6, &k, NOW), Ok(Offer::Unchanged)));
    }

    #[test]
    fn the_two_file_layout_is_migrated_with_its_floor() {
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let env = |r: u64| signer.sign(&content(r, P1, NOW + 3600)).unwrap();
        let (r5, r6, r7, r8) = (env(5), env(6), env(7), env(8));

        // As the previous version left it: served, floor kept.
        let dir = tempfile::tempdir().unwrap();
        write_legacy(dir.path(), &r5, &accepted_of(&r5, &k));
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(5));
        assert_eq!(st.accepted().unwrap().revision, 5);
        assert!(matches!(st.offer(&r5, &k, NOW), Ok(Offer::Unchanged)));
        assert!(
            st.offer(&signer.sign(&content(4, P2, NOW + 3600)).unwrap(), &k, NOW)
                .is_err()
        );
        // Same revision, other content: refused.
        assert!(
            st.offer(&signer.sign(&content(5, P2, NOW + 3600)).unwrap(), &k, NOW)
                .is_err()
        );

        // A record above the cached bundle: the record is the floor, the bundle not served.
        let dir = tempfile::tempdir().unwrap();
        write_legacy(dir.path(), &r5, &accepted_of(&r7, &k));
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert_eq!(st.accepted().unwrap().revision, 7);
        assert!(st.offer(&r6, &k, NOW).is_err());

        // A crash between the old layout's two writes: the bundle above the record is the
        // floor (it verifies).
        let dir = tempfile::tempdir().unwrap();
        write_legacy(dir.path(), &r6, &accepted_of(&r5, &k));
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(6));
        assert_eq!(st.accepted().unwrap().revision, 6);
        assert!(st.offer(&r5, &k, NOW).is_err());

        // The next accepted bundle goes into the slot file; the old files are removed.
        assert!(matches!(st.offer(&r8, &k, NOW), Ok(Offer::Accepted(_))));
        assert!(!dir.path().join(BUNDLE_FILE).exists());
        assert!(!dir.path().join(REVISION_FILE).exists());
        let rec = record(dir.path());
        assert_eq!(
            serde_json::from_value::<Accepted>(rec.clone()).unwrap(),
            accepted_of(&r8, &k)
        );
        assert_eq!(rec["envelope"], r8.as_str());
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(8));
        assert_eq!(st.current().unwrap().envelope, r8);
        assert!(st.offer(&r7, &k, NOW).is_err());

        // A stale old-layout bundle (a crash before its removal, or a downgrade that wrote
        // only an older bundle file) never lowers the floor nor is served.
        std::fs::write(dir.path().join(BUNDLE_FILE), &r7).unwrap();
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(st.current().unwrap().envelope, r8);
        assert!(st.offer(&r7, &k, NOW).is_err());
    }

    #[test]
    fn the_one_file_layout_is_migrated_with_its_floor() {
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let env = |r: u64| signer.sign(&content(r, P1, NOW + 3600)).unwrap();
        let (r4, r5, r6) = (env(4), env(5), env(6));
        let dir = tempfile::tempdir().unwrap();
        write_one_file(dir.path(), &r5, &k);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(5));
        assert!(st.offer(&r4, &k, NOW).is_err());
        assert!(matches!(st.offer(&r5, &k, NOW), Ok(Offer::Unchanged)));
        // Nothing written yet: the old file stays until a newer bundle is durable.
        assert!(dir.path().join(REVISION_FILE).exists());
        assert!(!dir.path().join(STATE_FILE).exists());
        assert!(matches!(st.offer(&r6, &k, NOW), Ok(Offer::Accepted(_))));
        assert!(!dir.path().join(REVISION_FILE).exists());
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(6));
        assert!(st.offer(&r5, &k, NOW).is_err());

        // An old-layout record above the slot file's (a downgrade that accepted more, then
        // an upgrade): the higher one is the floor.
        write_one_file(dir.path(), &env(9), &k);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(9));
        assert!(st.offer(&env(8), &k, NOW).is_err());
        // And a stale one below it is ignored.
        write_one_file(dir.path(), &r4, &k);
        let st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(6));
    }

    #[test]
    fn a_torn_write_falls_back_to_the_previous_acknowledged_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let env = |r: u64| signer.sign(&content(r, P1, NOW + 3600)).unwrap();
        let mut st = PolicyState::load(dir.path(), TD, &k);
        for r in 1..=6 {
            assert!(matches!(st.offer(&env(r), &k, NOW), Ok(Offer::Accepted(_))));
        }
        drop(st);
        // The write of 6 was torn by a crash (so never acknowledged): 5 is served and is the
        // floor, nothing older is accepted, and 6 is accepted again.
        tear(dir.path(), 6);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(5));
        assert_eq!(st.accepted().unwrap().revision, 5);
        assert!(st.offer(&env(4), &k, NOW).is_err());
        assert!(matches!(st.offer(&env(6), &k, NOW), Ok(Offer::Accepted(_))));
        assert!(matches!(st.offer(&env(7), &k, NOW), Ok(Offer::Accepted(_))));
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(7));
        assert!(st.offer(&env(6), &k, NOW).is_err());
        drop(st);

        // Both slots torn: moved aside, and the agent starts fresh (logged as an error).
        tear(dir.path(), 6);
        tear(dir.path(), 7);
        let st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert!(st.accepted().is_none());
        assert!(!dir.path().join(STATE_FILE).exists());
        assert!(dir.path().join("policy-state.slots.corrupt").exists());
    }

    #[test]
    fn the_state_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        st.offer(&signer.sign(&content(1, P1, NOW + 3600)).unwrap(), &k, NOW)
            .unwrap();
        let mode = std::fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_corrupt_record_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        std::fs::write(dir.path().join(REVISION_FILE), b"{\"revision\": 5, ").unwrap();
        let st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert!(!dir.path().join(REVISION_FILE).exists());
        assert!(dir.path().join("policy-revision.json.corrupt").exists());
    }

    #[test]
    fn a_tampered_cache_file_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        let r1 = signer.sign(&content(1, P1, NOW + 3600)).unwrap();
        st.offer(&r1, &k, NOW).unwrap();
        set_record_envelope(dir.path(), Some(&tamper(&r1)));
        let st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert_eq!(st.accepted().unwrap().revision, 1);
        assert!(!st.current_is_valid(NOW));
        // Same in the previous layout's file.
        set_record_envelope(dir.path(), None);
        std::fs::write(dir.path().join(BUNDLE_FILE), tamper(&r1)).unwrap();
        let st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert_eq!(st.accepted().unwrap().revision, 1);
    }
}
