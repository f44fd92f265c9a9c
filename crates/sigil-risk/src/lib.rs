//! Continuous verification: what a node's posture and its workloads' behaviour say about the
//! risk of trusting them. This crate does no I/O: the agent collects posture, the proxy counts
//! behaviour, the server decides; all of them share these types.
#![forbid(unsafe_code)]

pub mod detect;
pub mod iforest;
pub mod posture;
pub mod replay;
pub mod telemetry;

mod rng;

pub use detect::{Detector, DetectorConfig, FEATURES, Finding};
pub use iforest::{ForestError, IsolationForest};
pub use posture::{
    Assessment, BootRule, BootState, DEFAULT_RULESET_TOML, ExecutablesRule, Levels, ListeningRule,
    Posture, RiskLevel, Ruleset, RulesetError, SigilRule, UpdatesRule,
};
pub use replay::{KindReport, ReplayConfig, ReplayReport};
pub use telemetry::{IdentityWindow, NodeWindow, TelemetryMessage};

/// The risk a relying party sees: in an access token's `risk` claim, in the risk table the
/// agent streams to its proxies, and as `context.risk` in Cedar.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Risk {
    /// `low`, `medium`, `high` or `critical`.
    pub level: RiskLevel,
    /// 0 to 100.
    pub score: u8,
    /// When the trust authority last assessed it (unix seconds).
    pub at: i64,
}
