//! Audit before forward: every decision (allow and deny) is appended to a local JSON-lines
//! file and made durable (fdatasync) before the request proceeds. If it cannot be written,
//! the request is refused: the only failure mode is deny. Records that arrive while a sync is
//! in flight share the next one (group commit), so the fsync cost is paid per batch.
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Most records per sync.
const MAX_BATCH: usize = 512;

/// One authorization decision.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u128,
    pub request_id: String,
    pub spiffe_id: String,
    /// base64url SHA-256 of the client certificate.
    pub cert_thumbprint: String,
    /// The access token's `jti`, when a token was validated.
    pub jti: Option<String>,
    pub method: String,
    pub path: String,
    /// What the request asks to do (model, tool, endpoint), when it could be read.
    pub calls: Vec<crate::extract::Call>,
    /// The policies that decided (permits for an allow, forbids for a deny).
    pub policy_ids: Vec<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    pub reason: String,
}

/// Why a record could not be made durable.
#[derive(Debug, thiserror::Error)]
#[error("audit log unavailable: {0}")]
pub struct AuditError(String);

type Pending = (Vec<u8>, oneshot::Sender<Result<(), String>>);

/// A handle to the audit writer thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) `path` for appending and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| AuditError(format!("opening {}: {e}", path.display())))?;
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        std::thread::Builder::new()
            .name("sigil-audit".into())
            .spawn(move || writer(file, rx))
            .map_err(|e| AuditError(format!("starting the audit writer: {e}")))?;
        Ok(Self { tx })
    }

    /// Returns once `rec` is durable in the file.
    pub async fn record(&self, rec: &DecisionRecord) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(rec).map_err(|e| AuditError(e.to_string()))?;
        line.push(b'\n');
        let (done, wait) = oneshot::channel();
        self.tx
            .send((line, done))
            .await
            .map_err(|_| AuditError("writer stopped".into()))?;
        wait.await
            .map_err(|_| AuditError("writer stopped".into()))?
            .map_err(AuditError)
    }
}

fn writer(mut file: std::fs::File, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let bytes: Vec<u8> = batch.iter().flat_map(|(l, _)| l.iter().copied()).collect();
        let result = file
            .write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, "audit log write failed; refusing requests");
        }
        for (_, done) in batch {
            let _ = done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> DecisionRecord {
        DecisionRecord {
            time_ms: 1,
            request_id: format!("r{i}"),
            spiffe_id: "spiffe://td/a".into(),
            cert_thumbprint: "t".into(),
            jti: None,
            method: "GET".into(),
            path: "/".into(),
            calls: Vec::new(),
            policy_ids: Vec::new(),
            decision: "allow",
            reason: String::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_is_written_once_and_failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..300 {
            let log = log.clone();
            set.spawn(async move { log.record(&rec(i)).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 300);
        assert_eq!(text.lines().count(), 300);
        // A device that cannot take writes: every record fails, none is acknowledged.
        let full = AuditLog::open(Path::new("/dev/full")).unwrap();
        assert!(full.record(&rec(1)).await.is_err());
    }
}
