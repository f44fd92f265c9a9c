//! The proxy's policies: loaded from a directory of `*.cedar` files, swapped atomically on
//! SIGHUP (in-flight requests finish with the set they started with; a bad reload keeps the
//! old set).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use sigil_policy::PolicyEngine;

/// Loads every `*.cedar` file of `dir` (none: an empty set, which denies everything).
pub fn load(dir: Option<&Path>) -> anyhow::Result<PolicyEngine> {
    let mut files = Vec::new();
    if let Some(dir) = dir {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading policy_dir {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect();
        paths.sort();
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

/// Reloads the policies on every SIGHUP.
pub fn reload_on_sighup(dir: Option<PathBuf>, current: Arc<ArcSwap<PolicyEngine>>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; policies will not reload");
            return;
        };
        while hup.recv().await.is_some() {
            match load(dir.as_deref()) {
                Ok(engine) => current.store(Arc::new(engine)),
                Err(e) => {
                    tracing::error!(error = %e, "policy reload refused; keeping the previous policies")
                }
            }
        }
    });
}
