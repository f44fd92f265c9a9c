//! Split-view detection: the agent witnesses the server's transparency log.
//!
//! Every sync update carries the log's latest signed checkpoint. The agent pins the log key
//! (the first one it sees, persisted), keeps the last checkpoint it verified (persisted in
//! its cache), and accepts a new one only if it is signed by the pinned key and a consistency
//! proof from the server shows the old tree is a prefix of the new one. Anything else, a
//! checkpoint by another key, two different roots for one size, a proof that fails, is a
//! **split view** (the server shows this agent a log that others may not see): it is
//! refused, logged as an error, flagged, and the old checkpoint is kept.
//!
//! [`LogWitness`] is the pure verifier (no I/O): [`LogWitness::offer`] says whether a proof
//! is needed, [`LogWitness::finish`] checks it.
use serde::{Deserialize, Serialize};
use sigil_log::{Hash, VerifiedCheckpoint, verify_checkpoint, verify_consistency};

/// Why a checkpoint was refused as a split view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitView {
    /// The update names another log key than the pinned one, or the signature does not
    /// verify with the pinned key.
    #[error("checkpoint not signed by the pinned log key: {0}")]
    OtherKey(String),
    /// The new checkpoint does not extend the held one (or the held one does not extend it).
    #[error(
        "checkpoint of size {new_size} is not consistent with the held one of size {old_size}: {detail}"
    )]
    Fork {
        old_size: u64,
        new_size: u64,
        detail: String,
    },
}

/// Why a cached witness file was not restored (the agent then starts witnessing afresh).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CorruptWitness {
    /// Not the JSON of a witness file.
    #[error("not a witness file: {0}")]
    Format(#[from] serde_json::Error),
    /// The checkpoint it holds does not verify with the key it holds.
    #[error("checkpoint does not verify: {0}")]
    Checkpoint(#[from] sigil_log::LogError),
}

/// What to do with an offered checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Nothing to check: no checkpoint, the same one, or the first one (now held).
    Done { changed: bool },
    /// Fetch the consistency proof from `old` to `new` leaves and call [`LogWitness::finish`].
    NeedProof { old: u64, new: u64 },
}

/// The persisted form (the record of `log.slots` in the cache; `log.json` before).
#[derive(Serialize, Deserialize)]
struct WitnessFile {
    vkey: String,
    checkpoint: String,
}

/// The last verified checkpoint and the pinned key.
#[derive(Debug, Default)]
pub struct LogWitness {
    vkey: Option<String>,
    held: Option<(VerifiedCheckpoint, Vec<u8>)>,
    split_view: Option<SplitView>,
    /// The last note [`Self::verify`] accepted (its bytes, the key it verified with, and
    /// the result), so `offer` then `finish` of one update check its signature once.
    verified: Option<(Vec<u8>, String, VerifiedCheckpoint)>,
}

impl LogWitness {
    /// Nothing pinned, nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// From the cached file; a file that does not verify is an error (the caller starts fresh).
    pub fn restore(bytes: &[u8]) -> Result<Self, CorruptWitness> {
        let f: WitnessFile = serde_json::from_slice(bytes)?;
        let note = f.checkpoint.into_bytes();
        let cp = verify_checkpoint(&note, &f.vkey)?;
        Ok(Self {
            vkey: Some(f.vkey),
            held: Some((cp, note)),
            split_view: None,
            verified: None,
        })
    }

    /// The persisted form, once a checkpoint is held.
    pub fn to_file(&self) -> Option<Vec<u8>> {
        let (vkey, (_, note)) = (self.vkey.as_ref()?, self.held.as_ref()?);
        serde_json::to_vec(&WitnessFile {
            vkey: vkey.clone(),
            checkpoint: String::from_utf8_lossy(note).into_owned(),
        })
        .ok()
    }

    /// The last verified checkpoint (size, root).
    pub fn held(&self) -> Option<(u64, Hash)> {
        self.held.as_ref().map(|(c, _)| (c.size, c.root))
    }

    /// The latest split view detected, if any (sticky: a fork is not forgotten).
    pub fn split_view(&self) -> Option<&SplitView> {
        self.split_view.as_ref()
    }

    fn refuse(&mut self, why: SplitView) -> SplitView {
        self.split_view = Some(why.clone());
        why
    }

    fn verify(&mut self, note: &[u8], key: &str) -> Result<VerifiedCheckpoint, SplitView> {
        let pinned = self.vkey.clone().unwrap_or_else(|| key.to_owned());
        if !key.is_empty() && key.trim() != pinned.trim() {
            return Err(self.refuse(SplitView::OtherKey(format!(
                "the server names key {key:?}, pinned is {pinned:?}"
            ))));
        }
        // The same bytes under the same key verify the same way: check the signature once.
        if let Some((n, k, cp)) = &self.verified
            && n.as_slice() == note
            && *k == pinned
        {
            return Ok(cp.clone());
        }
        let cp = verify_checkpoint(note, &pinned)
            .map_err(|e| self.refuse(SplitView::OtherKey(e.to_string())))?;
        self.verified = Some((note.to_vec(), pinned, cp.clone()));
        Ok(cp)
    }

    /// Offers the checkpoint of a sync update (`key`: the log key the update names).
    pub fn offer(&mut self, note: &[u8], key: &str) -> Result<Offer, SplitView> {
        if note.is_empty() {
            return Ok(Offer::Done { changed: false });
        }
        let cp = self.verify(note, key)?;
        let Some((old, _)) = &self.held else {
            self.vkey = Some(key.trim().to_owned());
            self.held = Some((cp, note.to_vec()));
            return Ok(Offer::Done { changed: true });
        };
        if cp.size == old.size {
            if cp.root == old.root {
                return Ok(Offer::Done { changed: false });
            }
            let why = SplitView::Fork {
                old_size: old.size,
                new_size: cp.size,
                detail: "two different roots for the same size".into(),
            };
            return Err(self.refuse(why));
        }
        Ok(Offer::NeedProof {
            old: old.size.min(cp.size),
            new: old.size.max(cp.size),
        })
    }

    /// Checks the consistency proof fetched for [`Offer::NeedProof`]. A larger consistent
    /// checkpoint replaces the held one (`Ok(true)`); a smaller one that the held one extends
    /// (a replica lagging behind) is ignored (`Ok(false)`).
    pub fn finish(&mut self, note: &[u8], key: &str, proof: &[Hash]) -> Result<bool, SplitView> {
        let cp = self.verify(note, key)?;
        let Some((old, _)) = &self.held else {
            return self.offer(note, key).map(|_| true);
        };
        let (small, large) = if cp.size > old.size {
            (old, &cp)
        } else {
            (&cp, old)
        };
        if let Err(e) = verify_consistency(small.size, small.root, large.size, large.root, proof) {
            let why = SplitView::Fork {
                old_size: old.size,
                new_size: cp.size,
                detail: e.to_string(),
            };
            return Err(self.refuse(why));
        }
        if cp.size > old.size {
            self.held = Some((cp, note.to_vec()));
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_log::{LogKey, MemoryTree};

    fn tree(n: u8, salt: u8) -> MemoryTree {
        let mut t = MemoryTree::new();
        for i in 0..n {
            t.push(&[i, if i >= 3 { salt } else { 0 }]);
        }
        t
    }

    #[test]
    fn accepts_extensions_and_refuses_forks_and_other_keys() {
        let key = LogKey::from_seed("sigil.td/log", &[1; 32]).unwrap();
        let (a, b) = (tree(8, 0), tree(8, 1));
        let cp = |t: &MemoryTree, n: u64| key.sign_checkpoint(n, t.root_at(n).unwrap()).unwrap();
        let mut w = LogWitness::new();
        assert_eq!(
            w.offer(&cp(&a, 3), key.vkey()),
            Ok(Offer::Done { changed: true })
        );
        assert_eq!(
            w.offer(&cp(&a, 3), key.vkey()),
            Ok(Offer::Done { changed: false })
        );
        // An extension, proven.
        assert_eq!(
            w.offer(&cp(&a, 5), key.vkey()),
            Ok(Offer::NeedProof { old: 3, new: 5 })
        );
        let p = a.consistency_proof(3, 5).unwrap();
        assert_eq!(w.finish(&cp(&a, 5), key.vkey(), &p), Ok(true));
        assert_eq!(w.held().unwrap().0, 5);
        // A fork from leaf 3 on: its proof (honest for its own tree) fails against the held.
        let forked = cp(&b, 7);
        assert_eq!(
            w.offer(&forked, key.vkey()),
            Ok(Offer::NeedProof { old: 5, new: 7 })
        );
        let p = b.consistency_proof(5, 7).unwrap();
        assert!(matches!(
            w.finish(&forked, key.vkey(), &p),
            Err(SplitView::Fork { .. })
        ));
        assert_eq!(w.held().unwrap().0, 5);
        assert!(w.split_view().is_some());
        // Same size, other root.
        assert!(matches!(
            w.offer(&cp(&b, 5), key.vkey()),
            Err(SplitView::Fork { .. })
        ));
        // Another key, named or not.
        let other = LogKey::from_seed("sigil.td/log", &[2; 32]).unwrap();
        let by_other = other.sign_checkpoint(6, a.root_at(6).unwrap()).unwrap();
        assert!(matches!(
            w.offer(&by_other, other.vkey()),
            Err(SplitView::OtherKey(_))
        ));
        assert!(matches!(
            w.offer(&by_other, ""),
            Err(SplitView::OtherKey(_))
        ));
        // A lagging (smaller, consistent) checkpoint is ignored; the held one stays.
        assert_eq!(
            w.offer(&cp(&a, 4), key.vkey()),
            Ok(Offer::NeedProof { old: 4, new: 5 })
        );
        let p = a.consistency_proof(4, 5).unwrap();
        assert_eq!(w.finish(&cp(&a, 4), key.vkey(), &p), Ok(false));
        // Persisted and restored.
        let file = w.to_file().unwrap();
        let restored = LogWitness::restore(&file).unwrap();
        assert_eq!(restored.held(), w.held());
        // A damaged file is refused, saying how.
        assert!(matches!(
            LogWitness::restore(b"{\"vkey\""),
            Err(CorruptWitness::Format(_))
        ));
        let text = String::from_utf8(file).unwrap();
        let other = LogKey::from_seed("sigil.td/log", &[3; 32]).unwrap();
        let forged = text.replace(key.vkey(), other.vkey());
        assert!(matches!(
            LogWitness::restore(forged.as_bytes()),
            Err(CorruptWitness::Checkpoint(_))
        ));
    }
}
