//! The proxy's policies: loaded from a directory of `*.cedar` files, swapped atomically on
//! SIGHUP and when the files change (polled once a second). In-flight requests finish with the
//! set they started with; a bad set is refused (logged) and the old one kept.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use sigil_policy::PolicyEngine;

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
}
