//! An isolation forest (Liu, Ting, Zhou, "Isolation Forest", ICDM 2008).
//!
//! Anomalies are few and different, so random axis-parallel splits isolate them in fewer
//! steps than normal points. Each tree is grown on a random subsample of `ψ = sample_size`
//! rows (without replacement) by picking a feature and a split value uniformly between the
//! node's minimum and maximum, down to a depth limit of `ceil(log2 ψ)`. A point's path length
//! `h(x)` is the depth at which it lands plus `c(size)` for the leaf's unexpanded size, and its
//! score is `2^(-E[h(x)] / c(ψ))` with `c(n) = 2H(n-1) - 2(n-1)/n`, `H(i) = ln(i) + γ`:
//! about 0.5 for ordinary points, towards 1 for anomalies, towards 0 for points deep inside
//! dense regions.
//!
//! Two deliberate deviations from the paper, both for degenerate data:
//! * the split feature is drawn among the features that are *not constant* in the node (the
//!   paper draws among all and may waste a split); a node where every feature is constant is
//!   a leaf. So a forest fitted on identical rows is a forest of single leaves, and every
//!   point scores exactly 0.5 (`h = c(ψ)`): no information, no alarm.
//! * with a single training row, `c(1) = 0` and the formula is undefined; [`score`] then
//!   returns 0.5 for the same reason.
//!
//! Randomness comes from a seeded SplitMix64, so the same data, parameters and seed give the
//! same forest and the same scores on every platform. Trees are stored as flat node arrays,
//! which serialise compactly with serde; a deserialised forest is not trusted to be well
//! formed: child indices are checked and walks are bounded, so a corrupt one scores oddly but
//! never panics.
//!
//! [`score`]: IsolationForest::score
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

const EULER_GAMMA: f64 = 0.577_215_664_9;

/// Why a forest could not be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForestError {
    #[error("isolation forest: no samples")]
    Empty,
    #[error("isolation forest: samples have no features")]
    NoFeatures,
    #[error("isolation forest: row {row} has {found} features, expected {expected}")]
    Ragged {
        row: usize,
        expected: usize,
        found: usize,
    },
    #[error("isolation forest: row {row}, feature {feature} is not finite")]
    NonFinite { row: usize, feature: usize },
    #[error("isolation forest: trees and sample_size must be at least 1")]
    BadParameters,
}

/// One node of a tree, in a flat array (the root is index 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Node {
    /// `x[feature] < value` goes left, anything else (including NaN) goes right.
    Split {
        feature: u32,
        value: f64,
        left: u32,
        right: u32,
    },
    /// `size` training rows ended here.
    Leaf { size: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tree {
    nodes: Vec<Node>,
}

/// A fitted isolation forest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IsolationForest {
    /// Features per row.
    dims: usize,
    /// The subsample size actually used: `min(sample_size, rows)`.
    psi: usize,
    trees: Vec<Tree>,
}

/// Average path length of an unsuccessful search in a binary search tree of `n` nodes: the
/// normaliser `c(n)`.
pub fn average_path_length(n: usize) -> f64 {
    match n {
        0 | 1 => 0.0,
        2 => 1.0,
        _ => {
            let n = n as f64;
            2.0 * ((n - 1.0).ln() + EULER_GAMMA) - 2.0 * (n - 1.0) / n
        }
    }
}

impl IsolationForest {
    /// Fits `trees` trees, each on `min(sample_size, rows)` rows drawn without replacement.
    /// Refuses empty data, rows of different lengths, zero-length rows and non-finite values.
    pub fn fit(
        samples: &[Vec<f64>],
        trees: usize,
        sample_size: usize,
        seed: u64,
    ) -> Result<IsolationForest, ForestError> {
        if trees == 0 || sample_size == 0 {
            return Err(ForestError::BadParameters);
        }
        let first = samples.first().ok_or(ForestError::Empty)?;
        let dims = first.len();
        if dims == 0 {
            return Err(ForestError::NoFeatures);
        }
        for (row, s) in samples.iter().enumerate() {
            if s.len() != dims {
                return Err(ForestError::Ragged {
                    row,
                    expected: dims,
                    found: s.len(),
                });
            }
            if let Some(feature) = s.iter().position(|v| !v.is_finite()) {
                return Err(ForestError::NonFinite { row, feature });
            }
        }
        let n = samples.len();
        let psi = sample_size.min(n);
        let max_depth = usize::try_from(psi.next_power_of_two().trailing_zeros()).unwrap_or(0);
        let mut rng = SplitMix64::new(seed);
        let mut builder = Builder {
            samples,
            dims,
            max_depth,
            lo: vec![0.0; dims],
            hi: vec![0.0; dims],
        };
        let mut forest = Vec::with_capacity(trees);
        for _ in 0..trees {
            let mut idx = subsample(&mut rng, n, psi);
            let mut nodes = Vec::with_capacity(2 * psi);
            builder.grow(&mut rng, &mut nodes, &mut idx, 0);
            forest.push(Tree { nodes });
        }
        Ok(IsolationForest {
            dims,
            psi,
            trees: forest,
        })
    }

    /// Features per row the forest was fitted on.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The subsample size each tree was grown on (`min(sample_size, rows)`).
    pub fn sample_size(&self) -> usize {
        self.psi
    }

    /// Number of trees.
    pub fn trees(&self) -> usize {
        self.trees.len()
    }

    /// The mean path length `E[h(x)]` of `x` over the trees.
    pub fn mean_path_length(&self, x: &[f64]) -> f64 {
        if self.trees.is_empty() {
            return 0.0;
        }
        let total: f64 = self.trees.iter().map(|t| t.path_length(x)).sum();
        total / self.trees.len() as f64
    }

    /// The anomaly score of `x`, in (0, 1]: `2^(-E[h(x)] / c(ψ))`. Around 0.5 or below is
    /// ordinary; close to 1 is anomalous. A forest fitted on one row (or a corrupt one with no
    /// trees) returns 0.5. `x` should have [`dims`](Self::dims) values: missing ones are read
    /// as 0, extra ones are ignored, and NaN always takes the right branch.
    pub fn score(&self, x: &[f64]) -> f64 {
        let c = average_path_length(self.psi);
        if c <= 0.0 || self.trees.is_empty() {
            return 0.5;
        }
        2f64.powf(-self.mean_path_length(x) / c)
    }
}

/// `k` distinct indices of `0..n` in random order (Floyd's algorithm when `k` is small against
/// `n`, so fitting costs O(trees × ψ) however large the training set is).
fn subsample(rng: &mut SplitMix64, n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        let mut all: Vec<usize> = (0..n).collect();
        shuffle(rng, &mut all);
        return all;
    }
    let mut chosen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(k);
    for j in (n - k)..n {
        let t = rng.below(j + 1);
        let pick = if chosen.contains(&t) { j } else { t };
        chosen.insert(pick);
        out.push(pick);
    }
    out
}

fn shuffle(rng: &mut SplitMix64, v: &mut [usize]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

struct Builder<'a> {
    samples: &'a [Vec<f64>],
    dims: usize,
    max_depth: usize,
    lo: Vec<f64>,
    hi: Vec<f64>,
}

impl Builder<'_> {
    fn value(&self, row: usize, feature: usize) -> f64 {
        self.samples
            .get(row)
            .and_then(|r| r.get(feature))
            .copied()
            .unwrap_or(0.0)
    }

    /// Grows the subtree of the rows `idx` and returns its index in `nodes`.
    fn grow(
        &mut self,
        rng: &mut SplitMix64,
        nodes: &mut Vec<Node>,
        idx: &mut [usize],
        depth: usize,
    ) -> u32 {
        let me = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
        let leaf = Node::Leaf {
            size: u32::try_from(idx.len()).unwrap_or(u32::MAX),
        };
        if depth >= self.max_depth || idx.len() <= 1 {
            nodes.push(leaf);
            return me;
        }
        // The node's range of every feature; split among the non-constant ones.
        for f in 0..self.dims {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for &r in idx.iter() {
                let v = self.value(r, f);
                lo = lo.min(v);
                hi = hi.max(v);
            }
            if let (Some(l), Some(h)) = (self.lo.get_mut(f), self.hi.get_mut(f)) {
                *l = lo;
                *h = hi;
            }
        }
        let varying: Vec<usize> = (0..self.dims)
            .filter(|&f| matches!((self.lo.get(f), self.hi.get(f)), (Some(l), Some(h)) if h > l))
            .collect();
        let Some(&feature) = varying.get(rng.below(varying.len())) else {
            nodes.push(leaf);
            return me;
        };
        let lo = self.lo.get(feature).copied().unwrap_or(0.0);
        let hi = self.hi.get(feature).copied().unwrap_or(0.0);
        let value = rng.range_f64(lo, hi);
        // Partition in place: rows below `value` first.
        let mut split = 0;
        for i in 0..idx.len() {
            if self.value(idx.get(i).copied().unwrap_or(0), feature) < value {
                idx.swap(i, split);
                split += 1;
            }
        }
        nodes.push(Node::Split {
            feature: u32::try_from(feature).unwrap_or(u32::MAX),
            value,
            left: 0,
            right: 0,
        });
        let (l_idx, r_idx) = idx.split_at_mut(split);
        let left = self.grow(rng, nodes, l_idx, depth + 1);
        let right = self.grow(rng, nodes, r_idx, depth + 1);
        if let Some(Node::Split {
            left: l, right: r, ..
        }) = nodes.get_mut(me as usize)
        {
            *l = left;
            *r = right;
        }
        me
    }
}

impl Tree {
    fn path_length(&self, x: &[f64]) -> f64 {
        let mut at = 0usize;
        let mut depth = 0usize;
        // A well-formed tree is walked in at most `nodes.len()` steps; a corrupt one (a cycle)
        // is cut off there.
        while depth <= self.nodes.len() {
            match self.nodes.get(at) {
                Some(Node::Split {
                    feature,
                    value,
                    left,
                    right,
                }) => {
                    let v = x.get(*feature as usize).copied().unwrap_or(0.0);
                    at = if v < *value {
                        *left as usize
                    } else {
                        *right as usize
                    };
                    depth += 1;
                }
                Some(Node::Leaf { size }) => {
                    return depth as f64 + average_path_length(*size as usize);
                }
                None => break,
            }
        }
        depth as f64
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    use super::*;

    fn blob(n: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| vec![r.normal(), r.normal()]).collect()
    }

    #[test]
    fn c_of_n() {
        assert_eq!(average_path_length(0), 0.0);
        assert_eq!(average_path_length(1), 0.0);
        assert_eq!(average_path_length(2), 1.0);
        // c(256) ≈ 10.24 (the paper's normaliser for ψ = 256).
        assert!(
            (average_path_length(256) - 10.244).abs() < 0.01,
            "{}",
            average_path_length(256)
        );
    }

    #[test]
    fn outlier_scores_higher_than_inliers() {
        let data = blob(1000, 1);
        let f = IsolationForest::fit(&data, 100, 256, 42).unwrap();
        assert_eq!((f.dims(), f.sample_size(), f.trees()), (2, 256, 100));
        let centre = f.score(&[0.0, 0.0]);
        let outlier = f.score(&[6.0, -6.0]);
        assert!(outlier > 0.6, "outlier {outlier}");
        assert!(centre < 0.5, "centre {centre}");
        let mean_inlier = data.iter().take(200).map(|x| f.score(x)).sum::<f64>() / 200.0;
        assert!(mean_inlier < 0.5, "mean inlier {mean_inlier}");
        for s in [centre, outlier, mean_inlier] {
            assert!(s > 0.0 && s <= 1.0);
        }
    }

    #[test]
    fn same_seed_same_scores_and_serde_roundtrip() {
        let data = blob(500, 2);
        let a = IsolationForest::fit(&data, 50, 128, 7).unwrap();
        let b = IsolationForest::fit(&data, 50, 128, 7).unwrap();
        let c = IsolationForest::fit(&data, 50, 128, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let probe = [1.5, -0.5];
        assert_eq!(a.score(&probe).to_bits(), b.score(&probe).to_bits());
        let json = serde_json::to_string(&a).unwrap();
        let back: IsolationForest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.score(&probe).to_bits(), a.score(&probe).to_bits());
    }

    #[test]
    fn degenerate_data() {
        let same = vec![vec![1.0, 2.0]; 300];
        let f = IsolationForest::fit(&same, 10, 256, 1).unwrap();
        assert_eq!(f.score(&[1.0, 2.0]), 0.5);
        assert_eq!(f.score(&[100.0, -3.0]), 0.5);
        let one = IsolationForest::fit(&[vec![3.0]], 10, 256, 1).unwrap();
        assert_eq!(one.sample_size(), 1);
        assert_eq!(one.score(&[3.0]), 0.5);
        assert_eq!(one.score(&[-1e9]), 0.5);
        let two = IsolationForest::fit(&[vec![0.0], vec![1.0]], 10, 256, 1).unwrap();
        let s = two.score(&[0.5]);
        assert!(s > 0.0 && s <= 1.0);
        // Wrong-sized or NaN probes do not panic.
        let f = IsolationForest::fit(&blob(100, 3), 10, 64, 1).unwrap();
        for probe in [&[][..], &[f64::NAN, 0.0][..], &[0.0, 0.0, 9.0][..]] {
            let s = f.score(probe);
            assert!(s > 0.0 && s <= 1.0);
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            IsolationForest::fit(&[], 10, 10, 0),
            Err(ForestError::Empty)
        );
        assert_eq!(
            IsolationForest::fit(&[vec![]], 10, 10, 0),
            Err(ForestError::NoFeatures)
        );
        assert_eq!(
            IsolationForest::fit(&[vec![1.0, 2.0], vec![1.0]], 10, 10, 0),
            Err(ForestError::Ragged {
                row: 1,
                expected: 2,
                found: 1
            })
        );
        assert_eq!(
            IsolationForest::fit(&[vec![1.0, 2.0], vec![1.0, f64::INFINITY]], 10, 10, 0),
            Err(ForestError::NonFinite { row: 1, feature: 1 })
        );
        assert_eq!(
            IsolationForest::fit(&[vec![f64::NAN]], 10, 10, 0),
            Err(ForestError::NonFinite { row: 0, feature: 0 })
        );
        assert_eq!(
            IsolationForest::fit(&[vec![1.0]], 0, 10, 0),
            Err(ForestError::BadParameters)
        );
        assert_eq!(
            IsolationForest::fit(&[vec![1.0]], 1, 0, 0),
            Err(ForestError::BadParameters)
        );
    }

    #[test]
    fn corrupt_forest_does_not_panic() {
        let json = r#"{"dims":1,"psi":16,"trees":[{"nodes":[
            {"split":{"feature":0,"value":0.0,"left":0,"right":7}}]}]}"#;
        let f: IsolationForest = serde_json::from_str(json).unwrap();
        let s = f.score(&[-1.0]);
        assert!(s > 0.0 && s <= 1.0);
        assert!(f.score(&[1.0]) > 0.0);
    }
}
