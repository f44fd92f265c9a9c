//! A node's posture, and the ruleset that turns it into a risk score.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What the agent observes of its device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posture {
    /// `PRETTY_NAME` of `/etc/os-release`.
    pub os_release: String,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// When the package database last changed (unix seconds), if known.
    pub last_package_update: Option<i64>,
    /// The running executables: path → lowercase hex SHA-256 of the file.
    pub executables: BTreeMap<String, String>,
    /// Listening TCP sockets as `<address>:<port>` (`0.0.0.0:22`, `[::]:443`).
    pub listening: BTreeSet<String>,
    /// Lowercase hex SHA-256 of the running sigil binary.
    pub sigil_sha256: String,
    /// Boot state, when the node attested with a TPM.
    pub boot: Option<BootState>,
    /// When this posture was collected (unix seconds).
    pub collected_at: i64,
}

/// What the node's TPM attestation proved of its boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    pub tpm_attested: bool,
    pub secure_boot: bool,
}

/// Risk levels, ordered.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RiskLevel {
    #[default]
    Low,
    Medium,
    High,
    Critical,
}

impl RiskLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
            RiskLevel::Critical => "critical",
        }
    }
}

/// A ruleset's verdict on a posture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assessment {
    /// 0 to 100.
    pub score: u8,
    pub level: RiskLevel,
    /// One line per rule that added to the score, e.g. `unknown executable /tmp/x (sha256 …): +40`.
    pub reasons: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesetError {
    #[error("posture ruleset: {0}")]
    Invalid(String),
}

/// The posture ruleset (TOML). See `docs/posture.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ruleset {}
