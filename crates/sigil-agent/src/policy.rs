//! The agent's signed policy bundle: verified on arrival from the sync stream with the policy
//! keys of the trust bundle, never rolled back (the highest accepted revision is persisted in
//! the cache directory, so it survives restarts), kept when a bad one arrives, and persisted
//! for offline use. The Enforcer API serves it verbatim to the local proxy, which verifies it
//! again.
//!
//! Files (in `<data_dir>/cache`, 0600, written atomically):
//! - `policy-bundle.json`: the envelope of the last accepted bundle;
//! - `policy-revision.json`: `{"revision", "payload_sha256"}` of the highest accepted one.
//!
//! The bundle is written before the revision record: a crash in between leaves a signed
//! bundle newer than the record, which [`PolicyState::load`] accepts (it verifies); the
//! reverse order could leave a record pointing at a bundle that was never stored.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sigil_policy::bundle::{
    Accepted, BundleError, PolicyKeys, Verdict, VerifiedBundle, check_time, open, verify,
};

use crate::cache::write_atomic;

/// The last accepted bundle's envelope.
pub const BUNDLE_FILE: &str = "policy-bundle.json";
/// The anti-rollback record.
pub const REVISION_FILE: &str = "policy-revision.json";

/// What the agent holds of policy.
#[derive(Debug)]
pub struct PolicyState {
    dir: PathBuf,
    trust_domain: String,
    accepted: Option<Accepted>,
    current: Option<Arc<VerifiedBundle>>,
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
    /// `keys`, the policy keys of the cached trust bundle). A cached bundle that does not
    /// verify is ignored (logged); the record stays, so nothing older is accepted later.
    pub fn load(dir: &Path, trust_domain: &str, keys: &PolicyKeys) -> Self {
        let mut accepted = match std::fs::read(dir.join(REVISION_FILE)) {
            Ok(b) => match serde_json::from_slice::<Accepted>(&b) {
                Ok(a) => Some(a),
                Err(e) => {
                    // Fail safe: refuse to forget the floor silently. Keep the file for
                    // inspection and start from the cached bundle's revision.
                    tracing::error!(file = REVISION_FILE, error = %e, "policy revision record is corrupt");
                    let _ = std::fs::rename(
                        dir.join(REVISION_FILE),
                        dir.join(format!("{REVISION_FILE}.corrupt")),
                    );
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::error!(file = REVISION_FILE, error = %e, "cannot read the policy revision record; the cached bundle's revision is the floor");
                None
            }
        };
        let mut current = None;
        if let Ok(bytes) = std::fs::read(dir.join(BUNDLE_FILE)) {
            let text = String::from_utf8_lossy(&bytes);
            match open(&text, keys) {
                Ok(b) if b.content.trust_domain != trust_domain => {
                    tracing::error!(
                        found = %b.content.trust_domain,
                        "cached policy bundle is for another trust domain; ignoring it"
                    );
                }
                Ok(b) => {
                    let a = b.accepted();
                    match &accepted {
                        Some(r) if a.revision < r.revision => tracing::warn!(
                            cached = a.revision,
                            floor = r.revision,
                            "cached policy bundle is older than the highest accepted revision; not serving it"
                        ),
                        Some(r) if a.revision == r.revision && a != *r => tracing::error!(
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
                    tracing::error!(file = BUNDLE_FILE, error = %e, "cached policy bundle does not verify; ignoring it")
                }
            }
        }
        Self {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            accepted,
            current,
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
    /// newer valid bundle is persisted (bundle, then record) and becomes current. On any
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
                let record = serde_json::to_vec(&b.accepted())
                    .map_err(|e| BundleError::Malformed(e.to_string()))?;
                // INVARIANT: persisted before it is served.
                write_atomic(&self.dir.join(BUNDLE_FILE), b.envelope.as_bytes())
                    .map_err(|e| BundleError::Malformed(format!("persisting: {e}")))?;
                write_atomic(&self.dir.join(REVISION_FILE), &record)
                    .map_err(|e| BundleError::Malformed(format!("persisting: {e}")))?;
                self.accepted = Some(b.accepted());
                self.current = Some(b.clone());
                Ok(Offer::Accepted(b))
            }
        }
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

    #[test]
    fn the_floor_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        let r5 = signer.sign(&content(5, P1, NOW + 3600)).unwrap();
        st.offer(&r5, &k, NOW).unwrap();
        drop(st);

        // Restart: the cached bundle is served, an older one is refused.
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert_eq!(revision(&st), Some(5));
        let r4 = signer.sign(&content(4, P2, NOW + 3600)).unwrap();
        assert!(matches!(
            st.offer(&r4, &k, NOW),
            Err(BundleError::Rollback { .. })
        ));

        // Even with the cached bundle gone (or replaced by an older signed one), the
        // revision record holds the floor.
        std::fs::write(dir.path().join(BUNDLE_FILE), &r4).unwrap();
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert_eq!(st.accepted().unwrap().revision, 5);
        assert!(st.offer(&r4, &k, NOW).is_err());
        std::fs::remove_file(dir.path().join(BUNDLE_FILE)).unwrap();
        let mut st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.offer(&r4, &k, NOW).is_err());
        let r6 = signer.sign(&content(6, P2, NOW + 3600)).unwrap();
        assert!(matches!(st.offer(&r6, &k, NOW), Ok(Offer::Accepted(_))));
    }

    #[test]
    fn a_tampered_cache_file_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let signer = PolicySigner::generate().unwrap();
        let k = keys(&signer);
        let mut st = PolicyState::load(dir.path(), TD, &k);
        let r1 = signer.sign(&content(1, P1, NOW + 3600)).unwrap();
        st.offer(&r1, &k, NOW).unwrap();
        std::fs::write(dir.path().join(BUNDLE_FILE), tamper(&r1)).unwrap();
        let st = PolicyState::load(dir.path(), TD, &k);
        assert!(st.current().is_none());
        assert_eq!(st.accepted().unwrap().revision, 1);
        assert!(!st.current_is_valid(NOW));
    }
}
