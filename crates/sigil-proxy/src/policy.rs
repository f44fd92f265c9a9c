//! The proxy's policies: loaded from a directory of `*.cedar` files, swapped atomically on
//! SIGHUP and when the files change (polled once a second), or (`policy_source = "agent"`)
//! from the signed policy bundles the local agent streams, verified here ([`BundleFollower`]).
//! In-flight requests finish with the set they started with; a bad set is refused (logged)
//! and the old one kept.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::ratelimit::{LimitSettings, Limits};
use sigil_policy::PolicyEngine;
use sigil_policy::bundle::{Accepted, PolicyKeys, Verdict, verify};

/// How often [`watch`] looks at the policy directory.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

fn cedar_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Loads every `*.cedar` file of `dir` (none: an empty set, which denies everything).
pub fn load(dir: Option<&Path>) -> anyhow::Result<PolicyEngine> {
    let mut files = Vec::new();
    if let Some(dir) = dir {
        let paths =
            cedar_files(dir).with_context(|| format!("reading policy_dir {}", dir.display()))?;
        for p in paths {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((name, text));
        }
    }
    let engine = PolicyEngine::new(&files)?;
    tracing::info!(policies = engine.len(), "policies loaded");
    Ok(engine)
}

/// What identifies the state of a policy directory: the name, size and modification time
/// (ns) of each `*.cedar` file (following symlinks, as [`load`] does), or `None` when the
/// directory cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Option<Vec<(PathBuf, u64, Option<u128>)>>);

impl Fingerprint {
    pub fn of(dir: &Path) -> Self {
        let Ok(paths) = cedar_files(dir) else {
            return Self(None);
        };
        Self(Some(
            paths
                .into_iter()
                .map(|p| {
                    let meta = std::fs::metadata(&p).ok();
                    let size = meta.as_ref().map_or(0, |m| m.len());
                    let mtime = meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_nanos());
                    (p, size, mtime)
                })
                .collect(),
        ))
    }
}

/// Decides when a changed directory is reloaded: once its fingerprint differs from the one
/// last loaded (or refused) and has stayed the same for one poll, so that a file being written
/// is not loaded half-written.
#[derive(Debug)]
pub struct ChangeDetector {
    seen: Fingerprint,
    candidate: Option<Fingerprint>,
}

impl ChangeDetector {
    /// `loaded`: the fingerprint of the set in use.
    pub fn new(loaded: Fingerprint) -> Self {
        Self {
            seen: loaded,
            candidate: None,
        }
    }

    /// Takes the current fingerprint; true when the directory should be reloaded now.
    pub fn poll(&mut self, now: Fingerprint) -> bool {
        if now == self.seen {
            self.candidate = None;
            return false;
        }
        if self.candidate.as_ref() != Some(&now) {
            self.candidate = Some(now);
            return false;
        }
        self.seen = now;
        self.candidate = None;
        true
    }
}

fn reload(dir: Option<&Path>, current: &ArcSwap<PolicyEngine>, why: &str) {
    match load(dir) {
        Ok(engine) => {
            tracing::info!(trigger = why, "policies reloaded");
            current.store(Arc::new(engine));
        }
        Err(e) => {
            tracing::error!(trigger = why, error = %e, "policy reload refused; keeping the previous policies")
        }
    }
}

/// Reloads the policies on every SIGHUP and, when there is a policy directory, whenever its
/// `*.cedar` files change (polled every [`POLL_INTERVAL`]).
pub fn watch(dir: Option<PathBuf>, current: Arc<ArcSwap<PolicyEngine>>) {
    watch_every(dir, current, POLL_INTERVAL);
}

/// [`watch`], polling every `interval`.
pub fn watch_every(dir: Option<PathBuf>, current: Arc<ArcSwap<PolicyEngine>>, interval: Duration) {
    if let Some(d) = dir.clone() {
        let current = current.clone();
        // The fingerprint now stands for the set `start` just loaded: a change in between is
        // picked up by the next SIGHUP or change.
        let mut changes = ChangeDetector::new(Fingerprint::of(&d));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if changes.poll(Fingerprint::of(&d)) {
                    reload(Some(&d), &current, "file change");
                }
            }
        });
    }
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; policies will not reload on it");
            return;
        };
        while hup.recv().await.is_some() {
            reload(dir.as_deref(), &current, "SIGHUP");
        }
    });
}

/// The policies in force, kept current in the background from `policy_dir` or from the agent
/// (`policy_source`).
pub fn start(
    cfg: &crate::ProxyConfig,
    clock: Arc<dyn sigil_core::Clock>,
    limits: Arc<ArcSwap<Limits>>,
) -> anyhow::Result<Arc<ArcSwap<PolicyEngine>>> {
    match (cfg.policy_source, &cfg.workload_api_socket) {
        (crate::config::PolicySource::Agent, Some(socket)) => {
            let current = Arc::new(ArcSwap::from_pointee(no_bundle_yet()?));
            let follower = BundleFollower::new(
                cfg.trust_domain.name(),
                revision_file(&cfg.audit_log),
                current.clone(),
            )?
            .with_limits(limits, cfg.limit_settings());
            tracing::info!(
                floor = follower.accepted_revision(),
                "policies from the agent's signed bundles"
            );
            watch_agent(socket, follower, current.clone(), clock);
            Ok(current)
        }
        _ => {
            let current = Arc::new(ArcSwap::from_pointee(load(cfg.policy_dir.as_deref())?));
            watch(cfg.policy_dir.clone(), current.clone());
            Ok(current)
        }
    }
}

// ---- policy_source = "agent": signed bundles from the local agent ----

/// The proxy's anti-rollback record: `<audit_log>.policy-revision.slots`, a two-slot file
/// ([`sigil_fs::slot`]): one data flush per accepted bundle.
pub fn revision_file(audit_log: &Path) -> PathBuf {
    let mut s = audit_log.as_os_str().to_owned();
    s.push(".policy-revision.slots");
    PathBuf::from(s)
}

/// Where earlier versions kept the record (JSON, replaced whole), read when the slot file
/// does not exist yet: `<audit_log>.policy-revision` beside it.
fn legacy_revision_file(slots: &Path) -> Option<PathBuf> {
    let s = slots.to_str()?.strip_suffix(".slots")?;
    Some(PathBuf::from(s))
}

/// The set in force before any bundle is known: empty, and already past its validity, so
/// every request is refused with 503 (never allowed, never "denied by policy").
pub fn no_bundle_yet() -> anyhow::Result<PolicyEngine> {
    Ok(PolicyEngine::new(&[])?.with_bundle(0, i64::MIN))
}

#[derive(serde::Deserialize)]
struct KeysDoc {
    keys: Vec<sigil_pki::Jwk>,
}

/// Verifies the bundles the agent sends and swaps them in: signature by a policy key of the
/// trust bundle, trust domain, validity, and never a revision below (or, at the same
/// revision, different from) the highest accepted one, which is persisted before the new set
/// is used. A refused bundle leaves the set in force untouched.
pub struct BundleFollower {
    trust_domain: String,
    state_file: PathBuf,
    /// The slot file, once opened or created.
    slots: Option<sigil_fs::slot::SlotFile>,
    accepted: Option<Accepted>,
    /// The revision of the set in force (none before the first bundle since start).
    loaded: Option<u64>,
    current: Arc<ArcSwap<PolicyEngine>>,
    /// The rate limits in force and the configuration's, used when a bundle carries none.
    limits: Option<(Arc<ArcSwap<Limits>>, LimitSettings)>,
}

impl BundleFollower {
    /// Reads the anti-rollback record. A record that cannot be read is an error: starting
    /// without it could accept a rolled-back bundle.
    pub fn new(
        trust_domain: &str,
        state_file: PathBuf,
        current: Arc<ArcSwap<PolicyEngine>>,
    ) -> anyhow::Result<Self> {
        let corrupt = |path: &Path| {
            format!(
                "policy revision record {} is corrupt (remove it only if you know the last revision enforced)",
                path.display()
            )
        };
        let (slots, record) = match sigil_fs::slot::SlotFile::open(&state_file) {
            Ok(Some((f, record))) => (Some(f), record),
            Ok(None) => (None, None),
            Err(e) => return Err(anyhow::Error::new(e)).with_context(|| corrupt(&state_file)),
        };
        let record = match (record, legacy_revision_file(&state_file)) {
            (Some(r), _) => Some(r),
            (None, Some(legacy)) if slots.is_none() => match std::fs::read(&legacy) {
                Ok(b) => {
                    serde_json::from_slice::<Accepted>(&b).with_context(|| corrupt(&legacy))?;
                    Some(b)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", legacy.display()));
                }
            },
            (None, _) => None,
        };
        let accepted = match record {
            Some(b) => {
                Some(serde_json::from_slice::<Accepted>(&b).with_context(|| corrupt(&state_file))?)
            }
            None => None,
        };
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            state_file,
            slots,
            accepted,
            loaded: None,
            current,
            limits: None,
        })
    }

    /// Also applies the bundles' `rate_limits` (replacing `defaults`, the configuration's).
    pub fn with_limits(mut self, limits: Arc<ArcSwap<Limits>>, defaults: LimitSettings) -> Self {
        self.limits = Some((limits, defaults));
        self
    }

    /// The highest accepted revision.
    pub fn accepted_revision(&self) -> Option<u64> {
        self.accepted.as_ref().map(|a| a.revision)
    }

    /// Takes one message of the agent's `WatchPolicy` stream at `now`. `Ok(true)`: a set was
    /// swapped in.
    pub fn offer(
        &mut self,
        envelope: &str,
        policy_keys_jwks: &str,
        now: i64,
    ) -> anyhow::Result<bool> {
        anyhow::ensure!(
            policy_keys_jwks.len() <= sigil_pki::MAX_BUNDLE_JSON_LEN,
            "policy keys document too large"
        );
        let doc: KeysDoc =
            serde_json::from_str(policy_keys_jwks).context("policy keys are not a JWKS")?;
        let keys = PolicyKeys::from_jwks(&doc.keys)?;
        let b = match verify(
            envelope,
            &keys,
            &self.trust_domain,
            now,
            self.accepted.as_ref(),
        )? {
            Verdict::New(b) => b,
            // The bundle accepted before (e.g. before a restart of the proxy): load it if
            // it is not the set in force.
            Verdict::Unchanged(b) if self.loaded != Some(b.content.revision) => b,
            Verdict::Unchanged(_) => return Ok(false),
        };
        let engine = b
            .content
            .engine()
            .with_context(|| format!("bundle revision {} policies", b.content.revision))?;
        // A bundle whose rate limits do not check is refused whole, like bad policies.
        let settings = match (&self.limits, &b.content.rate_limits) {
            (Some(_), Some(v)) if !v.is_null() => Some(
                LimitSettings::from_bundle(v)
                    .map_err(|e| anyhow::anyhow!("bundle revision {}: {e}", b.content.revision))?,
            ),
            (Some((_, defaults)), _) => Some(defaults.clone()),
            (None, _) => None,
        };
        let record = b.accepted();
        if self.accepted.as_ref() != Some(&record) {
            // INVARIANT: the floor is on disk before the new set is used.
            sigil_fs::slot::SlotFile::write_into(
                &mut self.slots,
                &self.state_file,
                &serde_json::to_vec(&record)?,
            )
            .with_context(|| format!("writing {}", self.state_file.display()))?;
        }
        self.current.store(Arc::new(engine));
        if let (Some((limits, _)), Some(settings)) = (&self.limits, settings) {
            // Same settings: keep the buckets (and what callers have used of them).
            if limits.load().settings != settings {
                limits.store(Arc::new(Limits::new(settings)));
                tracing::info!(
                    revision = b.content.revision,
                    "rate limits from the policy bundle in force"
                );
            }
        }
        tracing::info!(
            revision = b.content.revision,
            key_id = %b.key_id,
            not_after = b.content.not_after,
            policies = self.current.load().len(),
            "policy bundle in force"
        );
        self.accepted = Some(record);
        self.loaded = Some(b.content.revision);
        Ok(true)
    }
}

/// Follows the agent's `WatchPolicy` stream (reconnecting with backoff), and says once in
/// the logs when the bundle in force expires with no newer one (from then on every request
/// is refused: `forward` checks [`PolicyEngine::expired`] per request).
pub fn watch_agent(
    socket: &str,
    follower: BundleFollower,
    current: Arc<ArcSwap<PolicyEngine>>,
    clock: Arc<dyn sigil_core::Clock>,
) {
    let path = crate::workload::socket_path(socket);
    let follow_clock = clock.clone();
    // Verifying a bundle, compiling its policies and flushing the floor take a millisecond
    // or more: on the blocking pool, not on a worker thread that requests are waiting for.
    let follower = Arc::new(std::sync::Mutex::new(follower));
    tokio::spawn(async move {
        use sigil_proto::enforcer as epb;
        let mut backoff = Duration::from_millis(250);
        loop {
            let opened = async {
                let channel = crate::workload::connect(path.clone()).await?;
                let s = epb::enforcer_client::EnforcerClient::new(channel)
                    .watch_policy(crate::workload::request(epb::WatchPolicyRequest {}))
                    .await
                    .context("WatchPolicy (the agent's Enforcer API)")?
                    .into_inner();
                anyhow::Ok(s)
            };
            match opened.await {
                Ok(mut stream) => {
                    backoff = Duration::from_millis(250);
                    loop {
                        match stream.message().await {
                            Ok(Some(m)) => {
                                let now = follow_clock.now();
                                let revision = m.revision;
                                let f = follower.clone();
                                let offered = tokio::task::spawn_blocking(move || {
                                    f.lock().unwrap_or_else(|e| e.into_inner()).offer(
                                        &m.envelope,
                                        &m.policy_keys_jwks,
                                        now,
                                    )
                                })
                                .await
                                .map_err(anyhow::Error::from)
                                .and_then(|r| r);
                                if let Err(e) = offered {
                                    tracing::error!(
                                        revision,
                                        error = format!("{e:#}"),
                                        "policy bundle from the agent refused; keeping the current policies"
                                    );
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "policy stream from the agent ended");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = format!("{e:#}"), "agent policy stream unavailable")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    tokio::spawn(async move {
        let mut said: Option<u64> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let engine = current.load();
            let Some((revision, not_after)) = engine.bundle() else {
                continue;
            };
            if revision > 0 && engine.expired(clock.now()) && said != Some(revision) {
                tracing::error!(
                    revision,
                    not_after,
                    "policy bundle expired and no newer one has arrived: refusing every request (503) until one does"
                );
                said = Some(revision);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const ALLOW: &str = "permit(principal, action == Action::\"list_models\", resource);";
    const MORE: &str = "permit(principal, action == Action::\"list_tools\", resource);";

    #[test]
    fn fingerprint_sees_cedar_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let empty = Fingerprint::of(d);
        assert_eq!(empty, Fingerprint(Some(vec![])));
        std::fs::write(d.join("README.md"), "x").unwrap();
        assert_eq!(Fingerprint::of(d), empty);
        std::fs::write(d.join("a.cedar"), ALLOW).unwrap();
        let one = Fingerprint::of(d);
        assert_ne!(one, empty);
        assert_eq!(Fingerprint::of(d), one);
        // Same name, new content of another size.
        std::fs::write(d.join("a.cedar"), format!("{ALLOW}\n{MORE}")).unwrap();
        let two = Fingerprint::of(d);
        assert_ne!(two, one);
        // Same size, only the mtime changes.
        let f = std::fs::File::options()
            .write(true)
            .open(d.join("a.cedar"))
            .unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        assert_ne!(Fingerprint::of(d), two);
        // A rename changes it too.
        std::fs::rename(d.join("a.cedar"), d.join("b.cedar")).unwrap();
        assert_ne!(Fingerprint::of(d), two);
        assert_eq!(Fingerprint::of(&d.join("missing")), Fingerprint(None));
    }

    #[test]
    fn change_detector_waits_for_a_stable_change() {
        let fp = |n: u64| Fingerprint(Some(vec![(PathBuf::from("a.cedar"), n, Some(1))]));
        let mut c = ChangeDetector::new(fp(1));
        assert!(!c.poll(fp(1)));
        assert!(!c.poll(fp(2))); // changed: wait one poll
        assert!(!c.poll(fp(3))); // still changing
        assert!(c.poll(fp(3))); // stable: reload
        assert!(!c.poll(fp(3))); // once
        assert!(!c.poll(Fingerprint(None)));
        assert!(c.poll(Fingerprint(None))); // unreadable: tried (and refused) once
        assert!(!c.poll(Fingerprint(None)));
        assert!(!c.poll(fp(3))); // readable again: reloaded once stable
        assert!(c.poll(fp(3)));
        assert!(!c.poll(fp(3)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reloads_on_change_and_keeps_the_old_set_when_bad() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::write(d.join("a.cedar"), ALLOW).unwrap();
        let current = Arc::new(ArcSwap::from_pointee(load(Some(&d)).unwrap()));
        let held = current.load_full(); // an "in-flight request"
        watch_every(Some(d.clone()), current.clone(), Duration::from_millis(10));
        let wait_for = |n: usize| {
            let current = current.clone();
            async move {
                for _ in 0..300 {
                    if current.load().len() == n {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        std::fs::write(d.join("b.cedar"), MORE).unwrap();
        assert!(wait_for(2).await);
        assert_eq!(held.len(), 1);
        // A bad file: refused, the two policies stay.
        std::fs::write(d.join("c.cedar"), "permit(").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(current.load().len(), 2);
        // Fixed: loaded.
        std::fs::write(d.join("c.cedar"), "forbid(principal, action, resource);").unwrap();
        assert!(wait_for(3).await);
        std::fs::remove_file(d.join("a.cedar")).unwrap();
        assert!(wait_for(2).await);
    }

    mod bundles {
        use std::collections::BTreeMap;

        use sigil_policy::bundle::{BundleContent, Envelope, PolicySigner};

        use super::*;

        const NOW: i64 = 1_700_000_000;
        const TD: &str = "td.test";

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

        fn jwks(s: &PolicySigner) -> String {
            serde_json::json!({ "keys": [s.public_jwk()] }).to_string()
        }

        /// One base64 character of the payload changed (still valid base64): one byte of
        /// the signed content differs.
        fn tamper(env: &str) -> String {
            let mut e: Envelope = serde_json::from_str(env).unwrap();
            let mut chars: Vec<char> = e.payload.chars().collect();
            let n = chars.len() / 3;
            chars[n] = if chars[n] == 'A' { 'B' } else { 'A' };
            e.payload = chars.into_iter().collect();
            serde_json::to_string(&e).unwrap()
        }

        #[test]
        fn refuses_every_bad_bundle_keeps_the_last_good_one_and_fails_closed_at_expiry() {
            let dir = tempfile::tempdir().unwrap();
            let state = revision_file(&dir.path().join("audit.log"));
            let current = Arc::new(ArcSwap::from_pointee(no_bundle_yet().unwrap()));
            assert!(
                current.load().expired(NOW),
                "nothing is allowed before a bundle"
            );
            let signer = PolicySigner::generate().unwrap();
            let other = PolicySigner::generate().unwrap();
            let k = jwks(&signer);
            let mut f = BundleFollower::new(TD, state.clone(), current.clone()).unwrap();
            let good = signer.sign(&content(2, ALLOW, NOW + 60)).unwrap();
            assert!(f.offer(&good, &k, NOW).unwrap());
            assert!(!f.offer(&good, &k, NOW).unwrap());
            assert_eq!(current.load().bundle(), Some((2, NOW + 60)));
            let bad = [
                (
                    "tampered",
                    tamper(&signer.sign(&content(3, MORE, NOW + 60)).unwrap()),
                ),
                (
                    "other key",
                    other.sign(&content(3, MORE, NOW + 60)).unwrap(),
                ),
                ("older", signer.sign(&content(1, MORE, NOW + 60)).unwrap()),
                (
                    "same revision, other content",
                    signer.sign(&content(2, MORE, NOW + 60)).unwrap(),
                ),
                ("expired", signer.sign(&content(3, MORE, NOW)).unwrap()),
                (
                    "invalid policies",
                    signer.sign(&content(3, "permit(", NOW + 60)).unwrap(),
                ),
            ];
            for (what, env) in &bad {
                assert!(f.offer(env, &k, NOW).is_err(), "{what} accepted");
                assert_eq!(current.load().bundle(), Some((2, NOW + 60)), "{what}");
            }
            // Trust follows the policy keys the agent sends (its trust bundle's): once the
            // other key is among them (a rotation), its bundle is accepted.
            assert!(f.offer(&bad[1].1, &jwks(&other), NOW).is_ok());
            assert_eq!(current.load().bundle().unwrap().0, 3);
            // Expiry: the set stays but is refused from not_after on.
            assert!(!current.load().expired(NOW + 59));
            assert!(current.load().expired(NOW + 60));
        }

        #[test]
        fn the_floor_survives_a_restart() {
            let dir = tempfile::tempdir().unwrap();
            let state = revision_file(&dir.path().join("audit.log"));
            let signer = PolicySigner::generate().unwrap();
            let k = jwks(&signer);
            let current = Arc::new(ArcSwap::from_pointee(no_bundle_yet().unwrap()));
            let mut f = BundleFollower::new(TD, state.clone(), current.clone()).unwrap();
            let r5 = signer.sign(&content(5, ALLOW, NOW + 60)).unwrap();
            f.offer(&r5, &k, NOW).unwrap();
            drop(f);
            let current = Arc::new(ArcSwap::from_pointee(no_bundle_yet().unwrap()));
            let mut f = BundleFollower::new(TD, state.clone(), current.clone()).unwrap();
            assert_eq!(f.accepted_revision(), Some(5));
            let r4 = signer.sign(&content(4, MORE, NOW + 60)).unwrap();
            assert!(f.offer(&r4, &k, NOW).is_err());
            assert!(current.load().expired(NOW));
            // The same bundle again after the restart: loaded.
            assert!(f.offer(&r5, &k, NOW).unwrap());
            assert_eq!(current.load().bundle().unwrap().0, 5);
            // A corrupt record stops the proxy rather than forgetting the floor.
            std::fs::write(&state, "{").unwrap();
            assert!(BundleFollower::new(TD, state, current).is_err());
        }

        #[test]
        fn the_previous_layouts_record_is_the_floor_until_the_first_write() {
            let dir = tempfile::tempdir().unwrap();
            let state = revision_file(&dir.path().join("audit.log"));
            let legacy = dir.path().join("audit.log.policy-revision");
            let signer = PolicySigner::generate().unwrap();
            let k = jwks(&signer);
            let r5 = signer.sign(&content(5, ALLOW, NOW + 60)).unwrap();
            // Record revision 5 the old way: the JSON an earlier proxy wrote.
            let current = Arc::new(ArcSwap::from_pointee(no_bundle_yet().unwrap()));
            let mut f = BundleFollower::new(TD, state.clone(), current.clone()).unwrap();
            f.offer(&r5, &k, NOW).unwrap();
            drop(f);
            let record = sigil_fs::slot::SlotFile::open(&state)
                .unwrap()
                .unwrap()
                .1
                .unwrap();
            std::fs::remove_file(&state).unwrap();
            std::fs::write(&legacy, &record).unwrap();
            let mut f = BundleFollower::new(TD, state.clone(), current.clone()).unwrap();
            assert_eq!(f.accepted_revision(), Some(5));
            let r4 = signer.sign(&content(4, MORE, NOW + 60)).unwrap();
            assert!(f.offer(&r4, &k, NOW).is_err());
            // A corrupt old record is refused too.
            std::fs::write(&legacy, "{").unwrap();
            assert!(BundleFollower::new(TD, state.clone(), current.clone()).is_err());
            // Once the slot file exists, it is the record.
            let r6 = signer.sign(&content(6, ALLOW, NOW + 60)).unwrap();
            std::fs::remove_file(&legacy).unwrap();
            let mut f = BundleFollower::new(TD, state.clone(), current.clone()).unwrap();
            f.offer(&r6, &k, NOW).unwrap();
            std::fs::write(&legacy, "{").unwrap();
            let f = BundleFollower::new(TD, state, current).unwrap();
            assert_eq!(f.accepted_revision(), Some(6));
        }
    }
}
