//! Group commit for issuance records: every caller waits until its own record is durable,
//! and records that arrive while a commit is in flight share the next commit, so the cost of
//! a durable write (an fsync) is paid once per batch instead of once per credential.
//!
//! Each record's transparency-log leaf is appended in the same transaction as the record.
//! The same writer appends the leaves of admin changes ([`IssuanceLog::append`]): they share
//! the tree's in-memory right edge, so there is one appender per server process.
use std::sync::Arc;

use sigil_log::{Frontier, LogRecord, leaf_hash, stored_hash_index};
use sigil_store::{IssuedIdentity, Store, StoreError, TlogAppend};
use tokio::sync::{mpsc, oneshot};

use crate::tlog;

/// Most records in one commit.
const MAX_BATCH: usize = 256;

/// What a caller waits on: an issued credential (its record and its leaf) or a leaf alone.
#[derive(Clone)]
enum Item {
    Issued(IssuedIdentity),
    Leaf(LogRecord),
}

type Pending = (Item, oneshot::Sender<Result<(), StoreError>>);

/// A handle to the writer task.
#[derive(Clone)]
pub struct IssuanceLog {
    tx: mpsc::Sender<Pending>,
}

impl IssuanceLog {
    /// Starts the writer task (needs a Tokio runtime).
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(writer(store, rx));
        Self { tx }
    }

    /// Returns once `record` is committed (durable), or with the store's error.
    pub async fn record(&self, record: IssuedIdentity) -> Result<(), StoreError> {
        self.submit(Item::Issued(record)).await
    }

    /// Returns once `leaf` is appended to the transparency log (durable).
    pub async fn append(&self, leaf: LogRecord) -> Result<(), StoreError> {
        self.submit(Item::Leaf(leaf)).await
    }

    async fn submit(&self, item: Item) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((item, done))
            .await
            .map_err(|_| StoreError::Unsupported("issuance log writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Unsupported("issuance log writer stopped".into()))?
    }
}

async fn writer(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Pending>) {
    // The transparency log's right edge, kept in memory so an append reads nothing; `None`
    // until loaded from the stored hashes (at the first record, and after a failed commit,
    // which may mean another writer appended).
    let mut frontier: Option<Frontier> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let records: Vec<Item> = batch.iter().map(|(r, _)| r.clone()).collect();
        // The batch and its log leaves are one transaction.
        let result = commit(&*store, &mut frontier, &records).await;
        match result {
            Ok(()) => {
                for (_, done) in batch {
                    let _ = done.send(Ok(()));
                }
            }
            // One bad record (e.g. a duplicate) must not fail the others: the batch was
            // rolled back as a whole, so retry each alone and report each outcome.
            Err(_) if batch.len() > 1 => {
                for (r, done) in batch {
                    let one = commit(&*store, &mut frontier, std::slice::from_ref(&r)).await;
                    let _ = done.send(one);
                }
            }
            Err(e) => {
                for (_, done) in batch {
                    let _ = done.send(Err(clone_err(&e)));
                }
            }
        }
    }
}

/// How often a commit is retried when another writer (a replica on the same PostgreSQL
/// database) took the leaf index meanwhile.
const LOG_RACE_RETRIES: usize = 8;

/// [`commit_once`], again on a reloaded frontier while another writer took the leaf index.
async fn commit(
    store: &dyn Store,
    frontier: &mut Option<Frontier>,
    items: &[Item],
) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        match commit_once(store, frontier, items).await {
            Err(StoreError::Conflict(m)) if m.starts_with("log ") && attempt < LOG_RACE_RETRIES => {
                attempt += 1;
                *frontier = None;
                tracing::debug!(attempt, "another writer appended to the log; retrying");
            }
            other => return other,
        }
    }
}

/// Commits `records` with their transparency-log leaves in one transaction; advances the
/// in-memory frontier only once the commit succeeded.
async fn commit_once(
    store: &dyn Store,
    frontier: &mut Option<Frontier>,
    items: &[Item],
) -> Result<(), StoreError> {
    let base = match frontier.take() {
        Some(f) => f,
        None => tlog::load_frontier(store).await?,
    };
    let mut next = base.clone();
    let mut append = TlogAppend::default();
    let mut records = Vec::new();
    for item in items {
        let data = match item {
            Item::Issued(r) => {
                records.push(r.clone());
                tlog::leaf_for(r).to_bytes()
            }
            Item::Leaf(l) => l.to_bytes(),
        };
        let index = next.size();
        let first = stored_hash_index(0, index);
        for (at, h) in (first..).zip(next.append(leaf_hash(&data))) {
            append.hashes.push((at, h.0));
        }
        append.leaves.push((index, data));
    }
    match store.record_issued_logged(&records, &append).await {
        Ok(()) => {
            *frontier = Some(next);
            Ok(())
        }
        Err(e) => {
            // A duplicate credential leaves the tree as it was; a taken leaf index means
            // another writer appended, so the next commit reloads the frontier.
            if !matches!(&e, StoreError::Conflict(m) if !m.starts_with("log ")) {
                *frontier = None;
            } else {
                *frontier = Some(base);
            }
            Err(e)
        }
    }
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
        other => StoreError::Unsupported(format!("recording the issuance failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_core::SpiffeId;
    use sigil_store::{IdentityKind, SqlStore};

    fn rec(serial: &str) -> IssuedIdentity {
        IssuedIdentity {
            kind: IdentityKind::X509Svid,
            serial_or_jti: serial.into(),
            spiffe_id: SpiffeId::new("spiffe://td/a").unwrap(),
            thumbprint: "00".repeat(32),
            audience: vec![],
            issued_at: 1,
            not_after: 2,
            requester: "test".into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_are_all_durable_and_a_duplicate_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let store: Arc<dyn Store> = Arc::new(SqlStore::connect(&url).await.unwrap());
        let log = IssuanceLog::start(store.clone());
        log.record(rec("dup")).await.unwrap();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..200 {
            let log = log.clone();
            set.spawn(async move { (i, log.record(rec(&format!("s{i}"))).await) });
        }
        let dup = {
            let log = log.clone();
            tokio::spawn(async move { log.record(rec("dup")).await })
        };
        while let Some(r) = set.join_next().await {
            let (i, r) = r.unwrap();
            assert!(r.is_ok(), "record {i}: {r:?}");
        }
        assert!(matches!(dup.await.unwrap(), Err(StoreError::Conflict(_))));
        // Durable: a fresh connection sees every record.
        let reopened = SqlStore::connect(&url).await.unwrap();
        assert_eq!(reopened.count_issued().await.unwrap(), 201);
        // Every record is a log leaf, and the stored tree matches one rebuilt from them.
        assert_eq!(reopened.tlog_size().await.unwrap(), 201);
        let entries = reopened.tlog_entries(0, 201).await.unwrap();
        let mut tree = sigil_log::MemoryTree::new();
        for e in &entries {
            sigil_log::LogRecord::from_bytes(e).unwrap();
            tree.push(e);
        }
        let f = tlog::load_frontier(&reopened).await.unwrap();
        assert_eq!((f.size(), f.root()), (201, tree.root()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn change_leaves_share_the_tree_with_issued_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let store: Arc<dyn Store> = Arc::new(SqlStore::connect(&url).await.unwrap());
        let log = IssuanceLog::start(store.clone());
        log.record(rec("a")).await.unwrap();
        let mut change = sigil_log::ChangeRecord::new("revocation", 5);
        change.serial = Some("a".into());
        let leaf = LogRecord::Change(Box::new(change));
        log.append(leaf.clone()).await.unwrap();
        log.record(rec("b")).await.unwrap();
        // Only credentials are issuance records; every item is a leaf, in order.
        assert_eq!(store.count_issued().await.unwrap(), 2);
        let entries = store.tlog_entries(0, 3).await.unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(LogRecord::from_bytes(&entries[1]).unwrap(), leaf);
        let mut tree = sigil_log::MemoryTree::new();
        for e in &entries {
            tree.push(e);
        }
        let f = tlog::load_frontier(&*store).await.unwrap();
        assert_eq!((f.size(), f.root()), (3, tree.root()));
    }
}
