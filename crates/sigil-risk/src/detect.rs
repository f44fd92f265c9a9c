//! Behaviour detection: is this identity (or this node) doing something it does not do?
//!
//! # Design
//!
//! **Per-identity baselines, one forest.** Identities differ by orders of magnitude: a camera
//! pipeline calls one model 50 times a window, a maintenance agent calls three tools twice an
//! hour. A forest over raw counts would learn "what the fleet looks like" and flag every quiet
//! or busy identity. So each identity first *learns* its own baseline (its first
//! [`DetectorConfig::learning_windows`] non-empty windows: resources it calls, request rate,
//! response sizes, bytes out per request, hours of the day, share of denials), and every window
//! is then described by [`FEATURES`], each *relative to that identity's baseline* (log-ratios,
//! fractions, differences). In that normalised space "ordinary for itself" looks the same for
//! every identity, so one isolation forest serves the whole fleet, learns from all of it, and
//! stays cheap: one refit, not one per identity.
//!
//! **Training data.** When an identity finishes learning, each of its learning windows is
//! described against the baseline of the *other* learning windows (leave-one-out). That gives
//! the forest honest examples of ordinary variation (a quiet window, a busy one, a rarely used
//! tool, a rare hour) without scoring a window against a baseline that already contains it.
//! These vectors join a training pool (at most [`TRAINING_POOL_CAP`] rows, reservoir-sampled
//! beyond that), and the forest is refitted lazily: once, at the next scored window after any
//! identity finished learning. A refit grows `trees` trees of `sample_size` rows, whatever the
//! size of the pool (about a millisecond in release builds with the defaults).
//!
//! **Hard signals beside the forest.** An isolation score is a statement about rarity in the
//! training data, not about harm, and it is diluted across features: a window that is ordinary
//! in five ways and outrageous in one may still score moderately. Some behaviours are
//! unambiguous enough to flag on their own, whatever the forest says:
//! * at least [`NEW_RESOURCE_SHARE`] of the window's requests, and at least
//!   [`NEW_RESOURCE_MIN_REQUESTS`] requests, go to resources the identity never called in its
//!   baseline;
//! * its largest response is at least [`EXFIL_FACTOR`] times the largest of its baseline;
//! * it makes requests in an hour of the day (UTC) where neither that hour nor the ones on
//!   either side of it ever had a baseline request, once the baseline covers at least
//!   [`OFF_HOURS_MIN_WINDOWS`] windows. The ±1 hour margin keeps someone who starts work an
//!   hour early from being flagged.
//!
//! A window is flagged when its isolation score reaches [`DetectorConfig::threshold`] or any
//! hard signal fires. It asks for quarantine when the score reaches
//! [`DetectorConfig::quarantine_threshold`], or when a hard signal is corroborated (a second
//! hard signal, or a score at or above the flagging threshold).
//!
//! **Drift.** Behaviour changes legitimately (more traffic, a new tool). After scoring, a window
//! that was *not* flagged updates its identity's baseline: means by an exponentially weighted
//! moving average with weight [`BASELINE_ALPHA`] (about 50 windows of memory), the largest
//! response by maximum but by at most [`MAX_RESPONSE_GROWTH`] per window (so a missed
//! exfiltration does not make the next one look ordinary), the hour histogram by accumulation, and a new resource joins the
//! baseline once it has appeared in [`RESOURCE_ADOPTION_WINDOWS`] unflagged windows. Flagged
//! windows never update it.
//!
//! **Nodes.** [`Detector::observe_node`] is simpler: during a node's first `learning_windows`
//! windows every executable its agent reports as new joins the node's baseline (path and
//! SHA-256); afterwards, any new executable whose path and SHA-256 pair is not in the baseline
//! is a finding at the quarantine level. A legitimate update is re-baselined with
//! [`Detector::accept_executable`].
//!
//! # What an attacker who mimics the baseline can still do
//!
//! Everything the baseline allows: call the identity's usual models at its usual rate and
//! hours, with responses of the usual sizes. A stolen credential used *as its owner uses it*
//! is invisible here; that is what short-lived SVIDs, token binding and policy are for. The
//! detector raises the cost: exfiltration must be paced below the baseline's bytes per request
//! and largest response, new targets must stay a small share of traffic, and slow drift is
//! slowed further (new resources need several clean windows; flagged windows never teach the
//! baseline). A patient attacker can still boil the frog over hundreds of windows by staying
//! under the threshold, and one who compromises an identity *during* its learning period
//! becomes its baseline.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::iforest::IsolationForest;
use crate::rng::SplitMix64;
use crate::telemetry::{IdentityWindow, NodeWindow};

/// The features of a window, in the order of the forest's vectors. Each is relative to the
/// identity's own baseline:
/// * `rate`: `ln((requests + 1) / (baseline mean requests + 1))`;
/// * `new_resources`: the fraction of requests to resources never seen in the baseline;
/// * `max_response`: `ln((largest response + 1) / (baseline largest response + 1))`;
/// * `bytes_per_request`: `ln((bytes out per request + 1) / (baseline mean + 1))`;
/// * `denials`: the window's share of denied requests minus the baseline's;
/// * `hour_rarity`: `1 - (baseline requests in this UTC hour + 1) / (baseline requests + 24)`.
pub const FEATURES: [&str; 6] = [
    "rate",
    "new_resources",
    "max_response",
    "bytes_per_request",
    "denials",
    "hour_rarity",
];

/// Hard signal: share of a window's requests going to never-seen resources…
pub const NEW_RESOURCE_SHARE: f64 = 0.25;
/// …and at least this many of them (one stray health check is not an attack).
pub const NEW_RESOURCE_MIN_REQUESTS: u64 = 3;
/// Hard signal: largest response against the baseline's largest.
pub const EXFIL_FACTOR: f64 = 5.0;
/// An unflagged window raises the baseline's largest response by at most this factor.
pub const MAX_RESPONSE_GROWTH: f64 = 1.1;
/// Hard signal: the off-hours rule needs a baseline of at least this many windows.
pub const OFF_HOURS_MIN_WINDOWS: f64 = 12.0;
/// Weight of an unflagged window in the baseline's moving averages.
pub const BASELINE_ALPHA: f64 = 0.02;
/// Unflagged windows a new resource must appear in before it joins the baseline.
pub const RESOURCE_ADOPTION_WINDOWS: u32 = 3;
/// Most feature vectors kept to fit the forest on.
pub const TRAINING_POOL_CAP: usize = 20_000;

/// The detector's knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Non-empty windows an identity (or windows a node) is only learned from.
    pub learning_windows: usize,
    /// Isolation score at which a window is flagged.
    pub threshold: f64,
    /// Isolation score at which a finding asks for quarantine.
    pub quarantine_threshold: f64,
    /// Trees of the forest.
    pub trees: usize,
    /// Subsample size of each tree.
    pub sample_size: usize,
    /// Seed of the forest's randomness (refit `k` uses `seed + k`).
    pub seed: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            learning_windows: 30,
            threshold: 0.66,
            quarantine_threshold: 0.72,
            trees: 100,
            sample_size: 256,
            seed: 0x5167_11c0_ffee,
        }
    }
}

/// A flagged window: what the server records (its features go to the transparency log) and
/// acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The identity, or for a node finding the node itself.
    pub spiffe_id: String,
    /// The node whose proxy (or agent) reported the window.
    pub node: String,
    /// Start of the window (unix seconds); 0 for node findings, whose windows carry no time.
    pub window_start: i64,
    /// The forest's isolation score (1.0 for a node finding).
    pub score: f64,
    /// Whether the finding asks for quarantine.
    pub quarantine: bool,
    /// The window's features ([`FEATURES`]; for nodes, `new_executables` and `posture_score`).
    pub features: BTreeMap<String, f64>,
    /// Human-readable reasons, hard signals first.
    pub reasons: Vec<String>,
}

/// What an identity normally does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Baseline {
    /// Windows learned from (grows with every unflagged window).
    windows: f64,
    req_mean: f64,
    req_var: f64,
    /// Mean bytes out per request.
    bpr_mean: f64,
    /// Largest response ever seen in the baseline.
    max_response: f64,
    denial_share: f64,
    /// Requests per UTC hour.
    hours: [f64; 24],
    resources: BTreeSet<String>,
    /// New resources seen in unflagged windows, and in how many.
    pending: BTreeMap<String, u32>,
}

fn total_requests(w: &IdentityWindow) -> u64 {
    w.requests.values().fold(0u64, |a, &b| a.saturating_add(b))
}

fn hour_of(window_start: i64) -> usize {
    usize::try_from(window_start.div_euclid(3600).rem_euclid(24)).unwrap_or(0)
}

fn hours_total(h: &[f64; 24]) -> f64 {
    h.iter().sum()
}

impl Baseline {
    fn from_windows<'a>(windows: impl Iterator<Item = &'a (i64, IdentityWindow)>) -> Baseline {
        let mut b = Baseline {
            windows: 0.0,
            req_mean: 0.0,
            req_var: 0.0,
            bpr_mean: 0.0,
            max_response: 0.0,
            denial_share: 0.0,
            hours: [0.0; 24],
            resources: BTreeSet::new(),
            pending: BTreeMap::new(),
        };
        let (mut sum, mut sum_sq, mut bpr, mut denied, mut reqs) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (start, w) in windows {
            let n = total_requests(w) as f64;
            b.windows += 1.0;
            sum += n;
            sum_sq += n * n;
            bpr += w.bytes_out as f64 / n.max(1.0);
            denied += (w.denied as f64).min(n);
            reqs += n;
            b.max_response = b.max_response.max(w.max_response_bytes as f64);
            if let Some(h) = b.hours.get_mut(hour_of(*start)) {
                *h += n;
            }
            b.resources.extend(
                w.requests
                    .iter()
                    .filter(|(_, c)| **c > 0)
                    .map(|(r, _)| r.clone()),
            );
        }
        if b.windows > 0.0 {
            b.req_mean = sum / b.windows;
            b.req_var = (sum_sq / b.windows - b.req_mean * b.req_mean).max(0.0);
            b.bpr_mean = bpr / b.windows;
        }
        if reqs > 0.0 {
            b.denial_share = denied / reqs;
        }
        b
    }

    fn features(&self, start: i64, w: &IdentityWindow) -> [f64; 6] {
        let n = total_requests(w) as f64;
        let nn = n.max(1.0);
        let unseen: u64 = w
            .requests
            .iter()
            .filter(|(r, _)| !self.resources.contains(*r))
            .fold(0u64, |a, (_, &c)| a.saturating_add(c));
        let hour = self.hours.get(hour_of(start)).copied().unwrap_or(0.0);
        [
            ((n + 1.0) / (self.req_mean + 1.0)).ln(),
            unseen as f64 / nn,
            ((w.max_response_bytes as f64 + 1.0) / (self.max_response + 1.0)).ln(),
            ((w.bytes_out as f64 / nn + 1.0) / (self.bpr_mean + 1.0)).ln(),
            (w.denied as f64).min(n) / nn - self.denial_share,
            1.0 - (hour + 1.0) / (hours_total(&self.hours) + 24.0),
        ]
    }

    /// Whether the hour of `start` and both its neighbours never had a baseline request.
    fn off_hours(&self, start: i64) -> bool {
        let h = hour_of(start);
        [h + 23, h, h + 1]
            .iter()
            .all(|&k| self.hours.get(k % 24).copied().unwrap_or(0.0) <= 0.0)
    }

    fn learn(&mut self, start: i64, w: &IdentityWindow) {
        let a = BASELINE_ALPHA;
        let n = total_requests(w) as f64;
        let d = n - self.req_mean;
        self.req_mean += a * d;
        self.req_var = (1.0 - a) * (self.req_var + a * d * d);
        self.bpr_mean += a * (w.bytes_out as f64 / n.max(1.0) - self.bpr_mean);
        self.denial_share += a * ((w.denied as f64).min(n) / n.max(1.0) - self.denial_share);
        let capped = (w.max_response_bytes as f64).min(self.max_response * MAX_RESPONSE_GROWTH);
        self.max_response = self.max_response.max(capped);
        if let Some(h) = self.hours.get_mut(hour_of(start)) {
            *h += n;
        }
        self.windows += 1.0;
        for (r, &c) in &w.requests {
            if c == 0 || self.resources.contains(r) {
                continue;
            }
            let seen = self.pending.entry(r.clone()).or_insert(0);
            *seen += 1;
            if *seen >= RESOURCE_ADOPTION_WINDOWS {
                self.pending.remove(r);
                self.resources.insert(r.clone());
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum IdentityState {
    Learning { seen: Vec<(i64, IdentityWindow)> },
    Known(Box<Baseline>),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct NodeState {
    windows: usize,
    /// Executables of the baseline: path → SHA-256s.
    executables: BTreeMap<String, BTreeSet<String>>,
}

/// The per-identity behaviour detector and per-node executable watch. Deterministic: the same
/// observations in the same order give the same findings. Serialisable, so a server can
/// persist it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detector {
    cfg: DetectorConfig,
    identities: BTreeMap<String, IdentityState>,
    nodes: BTreeMap<String, NodeState>,
    pool: Vec<Vec<f64>>,
    /// Vectors ever offered to the pool (for reservoir sampling).
    offered: u64,
    forest: Option<IsolationForest>,
    stale: bool,
    refits: u64,
    rng_state: u64,
}

fn human_bytes(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

impl Detector {
    pub fn new(cfg: DetectorConfig) -> Detector {
        let rng_state = cfg.seed ^ 0xA5A5_5A5A_0F0F_F0F0;
        Detector {
            cfg,
            identities: BTreeMap::new(),
            nodes: BTreeMap::new(),
            pool: Vec::new(),
            offered: 0,
            forest: None,
            stale: false,
            refits: 0,
            rng_state,
        }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Whether the next non-empty window of `spiffe_id` would only be learned from (unknown
    /// identities are learning).
    pub fn learning(&self, spiffe_id: &str) -> bool {
        !matches!(
            self.identities.get(spiffe_id),
            Some(IdentityState::Known(_))
        )
    }

    /// How many times the forest has been fitted.
    pub fn refits(&self) -> u64 {
        self.refits
    }

    /// Feature vectors the forest is fitted on.
    pub fn training_rows(&self) -> usize {
        self.pool.len()
    }

    fn offer(&mut self, v: Vec<f64>) {
        self.offered += 1;
        if self.pool.len() < TRAINING_POOL_CAP {
            self.pool.push(v);
        } else {
            let mut rng = SplitMix64::new(self.rng_state);
            let j = rng.below(usize::try_from(self.offered).unwrap_or(usize::MAX));
            self.rng_state = rng.next_u64();
            if let Some(slot) = self.pool.get_mut(j) {
                *slot = v;
            }
        }
        self.stale = true;
    }

    fn refit(&mut self) {
        self.stale = false;
        let seed = self.cfg.seed.wrapping_add(self.refits);
        self.refits += 1;
        // Only fails on an empty pool or bad parameters; the old forest (if any) then stays.
        if let Ok(f) = IsolationForest::fit(&self.pool, self.cfg.trees, self.cfg.sample_size, seed)
        {
            self.forest = Some(f);
        }
    }

    /// Observes one window of one identity, as reported by `node`'s proxy. Returns a finding
    /// when the window is flagged; `None` while the identity is learning, for windows without
    /// requests (neither learned nor scored), and for ordinary windows (which then update the
    /// baseline).
    pub fn observe(
        &mut self,
        node: &str,
        window_start: i64,
        window_secs: u32,
        w: &IdentityWindow,
    ) -> Option<Finding> {
        let _ = window_secs; // Counts are per window; all windows of a fleet share one length.
        let n = total_requests(w);
        if n == 0 {
            return None;
        }
        let learning_windows = self.cfg.learning_windows.max(1);
        let state = self
            .identities
            .entry(w.spiffe_id.clone())
            .or_insert_with(|| IdentityState::Learning { seen: Vec::new() });
        let baseline = match state {
            IdentityState::Learning { seen } => {
                seen.push((window_start, w.clone()));
                if seen.len() < learning_windows {
                    return None;
                }
                let windows = std::mem::take(seen);
                let baseline = Baseline::from_windows(windows.iter());
                *state = IdentityState::Known(Box::new(baseline));
                // Leave-one-out vectors of the learning windows, for the forest.
                for (j, (start, lw)) in windows.iter().enumerate() {
                    let others = Baseline::from_windows(
                        windows
                            .iter()
                            .enumerate()
                            .filter(|(k, _)| *k != j)
                            .map(|(_, x)| x),
                    );
                    self.offer(others.features(*start, lw).to_vec());
                }
                return None;
            }
            IdentityState::Known(b) => b,
        };

        let f = baseline.features(window_start, w);
        let mut hard = Vec::new();
        let unseen_requests = (f.get(1).copied().unwrap_or(0.0) * n as f64).round() as u64;
        if let Some(&share) = f.get(1)
            && share >= NEW_RESOURCE_SHARE
            && unseen_requests >= NEW_RESOURCE_MIN_REQUESTS
        {
            let unseen: Vec<String> = w
                .requests
                .iter()
                .filter(|(r, c)| **c > 0 && !baseline.resources.contains(*r))
                .map(|(r, c)| format!("{r} ({c})"))
                .collect();
            hard.push(format!(
                "{:.0}% of requests to resources never seen in its baseline: {}",
                share * 100.0,
                unseen.join(", ")
            ));
        }
        let max = w.max_response_bytes as f64;
        if max >= EXFIL_FACTOR * baseline.max_response.max(1.0) {
            hard.push(format!(
                "largest response {} is {:.0}x the baseline's largest ({})",
                human_bytes(max),
                max / baseline.max_response.max(1.0),
                human_bytes(baseline.max_response)
            ));
        }
        if baseline.windows >= OFF_HOURS_MIN_WINDOWS && baseline.off_hours(window_start) {
            hard.push(format!(
                "{n} requests at {:02}:00 UTC: no baseline requests within an hour of it",
                hour_of(window_start)
            ));
        }

        if self.stale || self.forest.is_none() {
            self.refit();
        }
        let score = self.forest.as_ref().map_or(0.5, |forest| forest.score(&f));
        let flagged = score >= self.cfg.threshold || !hard.is_empty();

        // Re-borrow: `refit` needed `self` mutably.
        let Some(IdentityState::Known(baseline)) = self.identities.get_mut(&w.spiffe_id) else {
            return None;
        };
        if !flagged {
            baseline.learn(window_start, w);
            return None;
        }
        let quarantine = score >= self.cfg.quarantine_threshold
            || hard.len() >= 2
            || (!hard.is_empty() && score >= self.cfg.threshold);
        let mut reasons = hard;
        reasons.push(format!(
            "isolation score {score:.3} (flag at {:.2}, quarantine at {:.2})",
            self.cfg.threshold, self.cfg.quarantine_threshold
        ));
        reasons.extend(explain(baseline, &f, w));
        Some(Finding {
            spiffe_id: w.spiffe_id.clone(),
            node: node.to_string(),
            window_start,
            score,
            quarantine,
            features: FEATURES
                .iter()
                .map(|k| k.to_string())
                .zip(f.iter().copied())
                .collect(),
            reasons,
        })
    }

    /// Observes one window of a node's agent. During the node's first `learning_windows`
    /// windows, the executables it reports join the node's baseline; afterwards any new
    /// executable (path and SHA-256) outside the baseline is a quarantine-level finding.
    pub fn observe_node(&mut self, node: &str, n: &NodeWindow) -> Option<Finding> {
        let learning_windows = self.cfg.learning_windows.max(1);
        let st = self.nodes.entry(node.to_string()).or_default();
        st.windows += 1;
        if st.windows <= learning_windows {
            for (path, sha) in &n.new_executables {
                st.executables
                    .entry(path.clone())
                    .or_default()
                    .insert(sha.to_ascii_lowercase());
            }
            return None;
        }
        let unknown: Vec<String> = n
            .new_executables
            .iter()
            .filter(|(p, h)| {
                !st.executables
                    .get(*p)
                    .is_some_and(|s| s.contains(&h.to_ascii_lowercase()))
            })
            .map(|(p, h)| {
                let short: String = h.chars().take(12).collect();
                format!("new executable {p} (sha256 {short}…) is not in the node's baseline")
            })
            .collect();
        if unknown.is_empty() {
            return None;
        }
        let mut features = BTreeMap::new();
        features.insert("new_executables".to_string(), unknown.len() as f64);
        features.insert("posture_score".to_string(), f64::from(n.posture_score));
        Some(Finding {
            spiffe_id: node.to_string(),
            node: node.to_string(),
            window_start: 0,
            score: 1.0,
            quarantine: true,
            features,
            reasons: unknown,
        })
    }

    /// Adds an executable to a node's baseline (after a legitimate update, say).
    pub fn accept_executable(&mut self, node: &str, path: &str, sha256: &str) {
        self.nodes
            .entry(node.to_string())
            .or_default()
            .executables
            .entry(path.to_string())
            .or_default()
            .insert(sha256.to_ascii_lowercase());
    }
}

/// One line per feature that stands out, for the finding's reasons.
fn explain(b: &Baseline, f: &[f64; 6], w: &IdentityWindow) -> Vec<String> {
    let mut out = Vec::new();
    let n = total_requests(w);
    let [rate, new, max, bpr, den, _hour] = *f;
    if rate.abs() >= 0.7 {
        out.push(format!(
            "{n} requests against a baseline mean of {:.1}",
            b.req_mean
        ));
    }
    if new > 0.0 {
        out.push(format!(
            "{:.0}% of requests to resources never seen in its baseline",
            new * 100.0
        ));
    }
    if max >= 0.7 {
        out.push(format!(
            "largest response {} against a baseline largest of {}",
            human_bytes(w.max_response_bytes as f64),
            human_bytes(b.max_response)
        ));
    }
    if bpr >= 0.7 {
        out.push(format!(
            "{} out per request against a baseline mean of {}",
            human_bytes(w.bytes_out as f64 / (n.max(1) as f64)),
            human_bytes(b.bpr_mean)
        ));
    }
    if den >= 0.1 {
        out.push(format!("{} of {n} requests denied", w.denied));
    }
    out
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

    const T0: i64 = 1_767_225_600 + 9 * 3600; // 09:00 UTC

    fn win(id: &str, reqs: &[(&str, u64)], max: u64) -> IdentityWindow {
        let n: u64 = reqs.iter().map(|r| r.1).sum();
        IdentityWindow {
            spiffe_id: id.into(),
            requests: reqs.iter().map(|(r, c)| (r.to_string(), *c)).collect(),
            denied: 0,
            bytes_in: n * 500,
            bytes_out: n * max / 2,
            max_response_bytes: max,
        }
    }

    /// Two identities learn 30 windows each, with a little variation, between 08:00 and 12:00.
    fn trained() -> Detector {
        let mut d = Detector::new(DetectorConfig::default());
        for k in 0..30u64 {
            let start = T0 - 3600 + (k as i64 % 4) * 3600 + k as i64 * 10;
            for id in ["spiffe://t/a", "spiffe://t/b"] {
                let w = win(
                    id,
                    &[("invoke:m1", 10 + k % 5), ("call_tool:t", 2 + k % 2)],
                    40_000 + 1000 * (k % 7),
                );
                assert!(d.learning(id));
                assert_eq!(d.observe("node", start, 10, &w), None);
            }
        }
        assert!(!d.learning("spiffe://t/a"));
        assert_eq!(d.training_rows(), 60);
        d
    }

    #[test]
    fn learns_then_accepts_ordinary_windows() {
        let mut d = trained();
        assert_eq!(
            d.observe("node", T0, 10, &win("spiffe://t/a", &[], 0)),
            None,
            "empty: skipped"
        );
        let ordinary = win(
            "spiffe://t/a",
            &[("invoke:m1", 12), ("call_tool:t", 3)],
            42_000,
        );
        assert_eq!(d.observe("node", T0 + 60, 10, &ordinary), None);
        assert_eq!(d.refits(), 1);
    }

    #[test]
    fn hard_signals_flag() {
        let mut d = trained();
        let f = d
            .observe(
                "node",
                T0,
                10,
                &win(
                    "spiffe://t/a",
                    &[("invoke:m1", 5), ("invoke:secret-model", 8)],
                    40_000,
                ),
            )
            .unwrap();
        assert_eq!(f.spiffe_id, "spiffe://t/a");
        assert!(
            f.reasons[0].contains("invoke:secret-model (8)"),
            "{:?}",
            f.reasons
        );
        assert_eq!(f.features.len(), FEATURES.len());
        assert!(f.features["new_resources"] > 0.6);

        let f = d
            .observe(
                "node",
                T0,
                10,
                &win("spiffe://t/b", &[("invoke:m1", 12)], 2_000_000),
            )
            .unwrap();
        assert!(
            f.reasons[0].starts_with("largest response 2.0 MB"),
            "{:?}",
            f.reasons
        );

        let night = T0 - 6 * 3600; // 03:00 UTC, nothing between 02:00 and 04:00
        let f = d
            .observe(
                "node",
                night,
                10,
                &win("spiffe://t/b", &[("invoke:m1", 12)], 40_000),
            )
            .unwrap();
        assert!(f.reasons[0].contains("03:00 UTC"), "{:?}", f.reasons);
        // Serialisable, for the transparency log.
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<Finding>(&json).unwrap(), f);
    }

    #[test]
    fn node_executables() {
        let mut d = Detector::new(DetectorConfig {
            learning_windows: 2,
            ..Default::default()
        });
        let mut nw = NodeWindow::default();
        nw.new_executables
            .insert("/usr/bin/python3".into(), "AB".repeat(32));
        assert_eq!(d.observe_node("n1", &nw), None);
        assert_eq!(d.observe_node("n1", &NodeWindow::default()), None);
        // The same executable again (restarted) is known; a new one is not.
        assert_eq!(d.observe_node("n1", &nw), None);
        let mut bad = NodeWindow::default();
        bad.new_executables
            .insert("/tmp/.x".into(), "cd".repeat(32));
        let f = d.observe_node("n1", &bad).unwrap();
        assert!(f.quarantine);
        assert_eq!((f.spiffe_id.as_str(), f.node.as_str()), ("n1", "n1"));
        assert!(f.reasons[0].starts_with("new executable /tmp/.x (sha256 cdcdcdcdcdcd"));
        d.accept_executable("n1", "/tmp/.x", &"CD".repeat(32));
        assert_eq!(d.observe_node("n1", &bad), None);
    }

    #[test]
    fn deterministic_and_serialisable() {
        let d = trained();
        let json = serde_json::to_string(&d).unwrap();
        let mut back: Detector = serde_json::from_str(&json).unwrap();
        let mut d = d;
        let w = win(
            "spiffe://t/a",
            &[("invoke:m1", 40), ("call_tool:t", 1)],
            90_000,
        );
        let (a, b) = (
            d.observe("node", T0, 10, &w),
            back.observe("node", T0, 10, &w),
        );
        assert_eq!(a, b);
    }
}
