//! RFC 9162 Merkle trees in the "stored hashes" layout of Go's `sumdb/tlog` (via `tlog_tiles`):
//! every complete subtree hash gets a fixed index ([`stored_hash_index`]), written once when
//! its last leaf arrives and never changed. Tiles are slices of these hashes.
use tlog_tiles::{HashReader, check_record, check_tree, prove_record, prove_tree, tree_hash};

pub use tlog_tiles::{EMPTY_HASH, HASH_SIZE, Hash, stored_hash_index};

use crate::LogError;

/// `SHA-256(0x00 || data)`: the hash of a leaf.
pub fn leaf_hash(data: &[u8]) -> Hash {
    tlog_tiles::record_hash(data)
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: Hash, right: Hash) -> Hash {
    tlog_tiles::node_hash(left, right)
}

/// The right edge of a tree: the hashes of its maximal complete subtrees, left to right (one
/// per set bit of the size). Enough to append and to compute the root, with no reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The stored-hash indexes [`Frontier::from_hashes`] needs for a tree of `size` leaves, in
    /// order (largest subtree first).
    pub fn indexes(size: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            let width = 1u64 << level;
            if size & width != 0 {
                out.push(stored_hash_index(level, start >> level));
                start += width;
            }
        }
        out
    }

    /// Rebuilds the frontier of a tree of `size` leaves from the hashes stored at
    /// [`Frontier::indexes`]`(size)`.
    pub fn from_hashes(size: u64, hashes: Vec<Hash>) -> Result<Self, LogError> {
        let want = usize::try_from(size.count_ones()).unwrap_or(usize::MAX);
        if hashes.len() != want {
            return Err(LogError::OutOfRange(format!(
                "a tree of {size} leaves has {want} frontier hashes, got {}",
                hashes.len()
            )));
        }
        Ok(Self {
            size,
            nodes: hashes,
        })
    }

    /// Appends a leaf (by its [`leaf_hash`]) and returns the hashes to store for it, starting
    /// at `stored_hash_index(0, old size)`: the leaf hash, then each subtree it completes.
    pub fn append(&mut self, leaf: Hash) -> Vec<Hash> {
        let mut out = vec![leaf];
        let mut carry = leaf;
        let mut n = self.size;
        while n & 1 == 1 {
            let Some(left) = self.nodes.pop() else { break };
            carry = node_hash(left, carry);
            out.push(carry);
            n >>= 1;
        }
        self.nodes.push(carry);
        self.size += 1;
        out
    }

    /// The tree head (root hash); [`EMPTY_HASH`] for the empty tree.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(&last) = it.next() else {
            return EMPTY_HASH;
        };
        it.fold(last, |acc, &left| node_hash(left, acc))
    }
}

/// A whole tree in memory (every stored hash): for verifiers, which recompute a log from its
/// entries, and for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    hashes: Vec<Hash>,
    frontier: Frontier,
}

impl HashReader for MemoryTree {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.hashes.get(i))
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

impl MemoryTree {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf by its data; returns its index.
    pub fn push(&mut self, data: &[u8]) -> u64 {
        self.push_hash(leaf_hash(data))
    }

    /// Appends a leaf by its hash; returns its index.
    pub fn push_hash(&mut self, leaf: Hash) -> u64 {
        let index = self.frontier.size();
        let new = self.frontier.append(leaf);
        self.hashes.extend(new);
        index
    }

    /// How many leaves.
    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    /// The current tree head.
    pub fn root(&self) -> Hash {
        self.frontier.root()
    }

    /// The stored hash at `index` (see [`stored_hash_index`]).
    pub fn stored_hash(&self, index: u64) -> Option<Hash> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.hashes.get(i))
            .copied()
    }

    /// The tree head of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, LogError> {
        self.check_size(size)?;
        tree_hash(size, self).map_err(|e| LogError::OutOfRange(e.to_string()))
    }

    /// The inclusion proof (RFC 9162 §2.1.3) of leaf `index` in the tree of `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LogError> {
        self.check_size(size)?;
        if index >= size {
            return Err(LogError::OutOfRange(format!(
                "leaf {index} not in a tree of {size}"
            )));
        }
        prove_record(size, index, self).map_err(|e| LogError::OutOfRange(e.to_string()))
    }

    /// The consistency proof (RFC 9162 §2.1.4) from the tree of `old` leaves to that of `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LogError> {
        self.check_size(new)?;
        if old > new {
            return Err(LogError::OutOfRange(format!("{old} > {new}")));
        }
        if old == 0 || old == new {
            return Ok(Vec::new());
        }
        prove_tree(new, old, self).map_err(|e| LogError::OutOfRange(e.to_string()))
    }

    fn check_size(&self, size: u64) -> Result<(), LogError> {
        if size > self.size() {
            return Err(LogError::OutOfRange(format!(
                "tree has {} leaves, not {size}",
                self.size()
            )));
        }
        Ok(())
    }
}

/// Records the indexes a proof needs (answering with placeholder hashes): which stored
/// hashes a proof reads depends on the sizes only.
struct IndexRecorder(std::cell::RefCell<Vec<u64>>);

impl HashReader for IndexRecorder {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        self.0.borrow_mut().extend_from_slice(indexes);
        Ok(vec![EMPTY_HASH; indexes.len()])
    }
}

/// Answers from hashes fetched beforehand.
struct Fetched(std::collections::HashMap<u64, Hash>);

impl HashReader for Fetched {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| {
                self.0
                    .get(i)
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

/// The stored-hash indexes ([`stored_hash_index`]) that the consistency proof from `old` to
/// `new` leaves is made of: fetch them (e.g. from a database), then call
/// [`consistency_proof_from`]. Empty when no proof is needed (`old` is 0 or `new`).
pub fn consistency_proof_indexes(old: u64, new: u64) -> Result<Vec<u64>, LogError> {
    if old > new {
        return Err(LogError::OutOfRange(format!("{old} > {new}")));
    }
    if old == 0 || old == new {
        return Ok(Vec::new());
    }
    let rec = IndexRecorder(std::cell::RefCell::new(Vec::new()));
    prove_tree(new, old, &rec).map_err(|e| LogError::OutOfRange(e.to_string()))?;
    Ok(rec.0.into_inner())
}

/// The consistency proof from `old` to `new` leaves, from the stored hashes at
/// [`consistency_proof_indexes`]`(old, new)` (`hashes[i]` at `indexes[i]`).
pub fn consistency_proof_from(
    old: u64,
    new: u64,
    indexes: &[u64],
    hashes: &[Hash],
) -> Result<Vec<Hash>, LogError> {
    if old > new {
        return Err(LogError::OutOfRange(format!("{old} > {new}")));
    }
    if old == 0 || old == new {
        return Ok(Vec::new());
    }
    if indexes.len() != hashes.len() {
        return Err(LogError::OutOfRange(format!(
            "{} indexes, {} hashes",
            indexes.len(),
            hashes.len()
        )));
    }
    let map = indexes
        .iter()
        .copied()
        .zip(hashes.iter().copied())
        .collect();
    prove_tree(new, old, &Fetched(map)).map_err(|e| LogError::OutOfRange(e.to_string()))
}

/// Checks that `proof` proves leaf `index` (hash `leaf`) is in the tree of `size` leaves whose
/// head is `root`.
pub fn verify_inclusion(
    leaf: Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: Hash,
) -> Result<(), LogError> {
    if index >= size {
        return Err(LogError::OutOfRange(format!(
            "leaf {index} not in a tree of {size}"
        )));
    }
    check_record(&proof.to_vec(), size, root, index, leaf)
        .map_err(|e| LogError::InvalidProof(format!("inclusion of leaf {index} in {size}: {e}")))
}

/// Checks that `proof` proves the tree of `old_size` leaves (head `old_root`) is a prefix of
/// the tree of `new_size` leaves (head `new_root`).
pub fn verify_consistency(
    old_size: u64,
    old_root: Hash,
    new_size: u64,
    new_root: Hash,
    proof: &[Hash],
) -> Result<(), LogError> {
    if old_size > new_size {
        return Err(LogError::InvalidProof(format!(
            "old size {old_size} > new size {new_size}"
        )));
    }
    if old_size == 0 {
        // Every tree extends the empty one; the proof is empty (RFC 9162 §2.1.4.2).
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(LogError::InvalidProof(
                "consistency from the empty tree takes an empty proof".into(),
            ))
        };
    }
    if old_size == new_size {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else {
            Err(LogError::InvalidProof(format!(
                "two different heads for size {old_size}"
            )))
        };
    }
    check_tree(&proof.to_vec(), new_size, new_root, old_size, old_root)
        .map_err(|e| LogError::InvalidProof(format!("consistency {old_size} -> {new_size}: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn consistency_proof_from_fetched_hashes_equals_the_memory_proof() {
        let mut t = MemoryTree::new();
        for i in 0..70u8 {
            t.push(&[i]);
        }
        for (old, new) in [
            (1, 2),
            (3, 7),
            (7, 8),
            (5, 70),
            (64, 70),
            (69, 70),
            (0, 9),
            (9, 9),
        ] {
            let idx = consistency_proof_indexes(old, new).unwrap();
            let hashes: Vec<Hash> = idx.iter().map(|&i| t.stored_hash(i).unwrap()).collect();
            let proof = consistency_proof_from(old, new, &idx, &hashes).unwrap();
            assert_eq!(
                proof,
                t.consistency_proof(old, new).unwrap(),
                "{old}->{new}"
            );
            verify_consistency(
                old,
                t.root_at(old).unwrap(),
                new,
                t.root_at(new).unwrap(),
                &proof,
            )
            .unwrap();
        }
        assert!(consistency_proof_indexes(3, 2).is_err());
        assert!(consistency_proof_from(3, 7, &[1], &[]).is_err());
    }

    use super::*;

    fn h(s: &str) -> Hash {
        Hash(hex::decode(s).unwrap().try_into().unwrap())
    }

    /// Leaf inputs and tree heads from transparency-dev/merkle `testonly/constants.go`
    /// (the RFC 6962 reference vectors, also in google/certificate-transparency).
    fn leaves() -> Vec<Vec<u8>> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|s| hex::decode(s).unwrap())
        .collect()
    }

    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn vector_tree() -> MemoryTree {
        let mut t = MemoryTree::new();
        for l in leaves() {
            t.push(&l);
        }
        t
    }

    #[test]
    fn leaf_and_node_hashes_match_the_vectors() {
        assert_eq!(
            leaf_hash(b""),
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
        );
        assert_eq!(
            leaf_hash(&[0x00]),
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7")
        );
        assert_eq!(
            node_hash(leaf_hash(b""), leaf_hash(&[0x00])),
            h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")
        );
    }

    #[test]
    fn tree_heads_match_the_vectors() {
        let mut t = MemoryTree::new();
        assert_eq!(t.root(), h(ROOTS[0]));
        for (i, l) in leaves().iter().enumerate() {
            t.push(l);
            assert_eq!(t.root(), h(ROOTS[i + 1]), "size {}", i + 1);
        }
        for (n, r) in ROOTS.iter().enumerate() {
            assert_eq!(t.root_at(n as u64).unwrap(), h(r), "root_at {n}");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_vectors() {
        // (leaf index, tree size, proof) from transparency-dev/merkle proof/verify_test.go
        // (there 1-based leaf numbers).
        let cases: [(u64, u64, &[&str]); 4] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                3,
                &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        let t = vector_tree();
        let data = leaves();
        for (index, size, want) in cases {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            assert_eq!(
                t.inclusion_proof(index, size).unwrap(),
                want,
                "{index}/{size}"
            );
            let leaf = leaf_hash(&data[index as usize]);
            verify_inclusion(leaf, index, size, &want, h(ROOTS[size as usize])).unwrap();
        }
    }

    #[test]
    fn consistency_proofs_match_the_vectors() {
        let cases: [(u64, u64, &[&str]); 4] = [
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
            (
                6,
                7,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        let t = vector_tree();
        for (old, new, want) in cases {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            assert_eq!(t.consistency_proof(old, new).unwrap(), want, "{old}->{new}");
            verify_consistency(
                old,
                h(ROOTS[old as usize]),
                new,
                h(ROOTS[new as usize]),
                &want,
            )
            .unwrap();
        }
    }

    fn tamper(proof: &[Hash], i: usize) -> Vec<Hash> {
        let mut p = proof.to_vec();
        p[i].0[0] ^= 0x08;
        p
    }

    #[test]
    fn every_proof_up_to_64_leaves_verifies_and_tampering_fails() {
        let mut t = MemoryTree::new();
        let mut roots = vec![t.root()];
        for i in 0..64u64 {
            t.push(format!("leaf {i}").as_bytes());
            roots.push(t.root());
        }
        let bogus = leaf_hash(b"not a root");
        for n in 1..=64u64 {
            let root = roots[n as usize];
            assert_eq!(t.root_at(n).unwrap(), root);
            for i in 0..n {
                let leaf = leaf_hash(format!("leaf {i}").as_bytes());
                let p = t.inclusion_proof(i, n).unwrap();
                verify_inclusion(leaf, i, n, &p, root).unwrap();
                assert!(verify_inclusion(leaf, i, n, &p, bogus).is_err());
                assert!(verify_inclusion(bogus, i, n, &p, root).is_err());
                for k in 0..p.len() {
                    assert!(verify_inclusion(leaf, i, n, &tamper(&p, k), root).is_err());
                }
                if !p.is_empty() {
                    assert!(verify_inclusion(leaf, i, n, &p[1..], root).is_err());
                }
                let mut longer = p.clone();
                longer.push(root);
                assert!(verify_inclusion(leaf, i, n, &longer, root).is_err());
                if n > 1 {
                    let other = (i + 1) % n;
                    assert!(verify_inclusion(leaf, other, n, &p, root).is_err());
                }
            }
            for m in 0..=n {
                let old = roots[m as usize];
                let p = t.consistency_proof(m, n).unwrap();
                verify_consistency(m, old, n, root, &p).unwrap();
                if m > 0 && m < n {
                    assert!(verify_consistency(m, bogus, n, root, &p).is_err());
                    assert!(verify_consistency(m, old, n, bogus, &p).is_err());
                    for k in 0..p.len() {
                        assert!(verify_consistency(m, old, n, root, &tamper(&p, k)).is_err());
                    }
                    assert!(verify_consistency(m, old, n, root, &p[1..]).is_err());
                    assert!(verify_consistency(m, old, n, root, &[]).is_err());
                }
                if m == n {
                    assert!(verify_consistency(m, bogus, n, root, &p).is_err());
                }
            }
            assert!(verify_consistency(n + 1, root, n, root, &[]).is_err());
            assert!(verify_inclusion(leaf_hash(b"x"), n, n, &[], root).is_err());
        }
    }

    #[test]
    fn frontier_rebuilt_from_stored_hashes_matches() {
        let mut t = MemoryTree::new();
        for i in 0..300u64 {
            let idx = Frontier::indexes(t.size());
            let hashes = idx.iter().map(|&x| t.stored_hash(x).unwrap()).collect();
            let mut f = Frontier::from_hashes(t.size(), hashes).unwrap();
            assert_eq!(f.root(), t.root());
            let leaf = leaf_hash(&i.to_be_bytes());
            let want = tlog_tiles::stored_hashes_for_record_hash(t.size(), leaf, &t).unwrap();
            assert_eq!(f.append(leaf), want, "stored hashes for leaf {i}");
            t.push_hash(leaf);
            assert_eq!(f.root(), t.root());
        }
        assert!(Frontier::from_hashes(3, vec![EMPTY_HASH]).is_err());
    }
}
