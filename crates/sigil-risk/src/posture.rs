//! A node's posture, and the ruleset that turns it into a risk score.
//!
//! The ruleset is deliberately dumb: a handful of additive rules, each with its own cap, a
//! total capped at 100, and three thresholds. An operator can predict the score of a node by
//! reading the TOML, and every point of it comes with a reason naming the executable, the port
//! or the age that earned it. Behaviour (what workloads do) is scored elsewhere
//! (`crate::detect`); posture is what the node *is*.
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

/// The default posture ruleset, as documented. `Ruleset::default()` is this text, parsed.
pub const DEFAULT_RULESET_TOML: &str = r#"# sigil posture ruleset (the default).
# Every section is optional: a section left out turns its rule off ([levels] then keeps
# these thresholds). A key left out of a section takes the value shown here.

[levels]            # score thresholds: >= medium -> medium, >= high -> high, >= critical -> critical
medium = 30
high = 60
critical = 90

[executables]       # every running executable must match an allowed path prefix or an allowed sha256
allow_path_prefixes = ["/usr/", "/bin/", "/sbin/", "/lib/", "/opt/sigil/"]
allow_sha256 = []
unknown_score = 40  # added once per unknown executable
max_score = 80      # cap on this rule's total

[updates]
max_age_days = 30
stale_score = 20    # last_package_update older than max_age_days, or unknown

[listening]
allowed_ports = []  # empty list = rule off
unexpected_score = 15   # per unexpected port, capped at max_score
max_score = 45

[sigil]
allow_sha256 = []   # empty = any sigil binary accepted
mismatch_score = 60

[boot]
require_tpm = false
require_secure_boot = false
score = 50          # added once when a requirement is not met (no TPM attestation counts as not met)
"#;

/// The posture ruleset (TOML, see [`DEFAULT_RULESET_TOML`]). A section that is `None` is a rule
/// that is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ruleset {
    #[serde(default)]
    pub levels: Levels,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executables: Option<ExecutablesRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<UpdatesRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listening: Option<ListeningRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigil: Option<SigilRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootRule>,
}

/// Score thresholds of the levels: strictly increasing, each in 1..=100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Levels {
    pub medium: u8,
    pub high: u8,
    pub critical: u8,
}

impl Default for Levels {
    fn default() -> Self {
        Self {
            medium: 30,
            high: 60,
            critical: 90,
        }
    }
}

/// Every running executable must sit under an allowed path prefix or have an allowed SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutablesRule {
    pub allow_path_prefixes: Vec<String>,
    /// Lowercase or uppercase hex; compared case-insensitively.
    pub allow_sha256: Vec<String>,
    /// Added once per unknown executable…
    pub unknown_score: u32,
    /// …up to this total.
    pub max_score: u32,
}

impl Default for ExecutablesRule {
    fn default() -> Self {
        Self {
            allow_path_prefixes: ["/usr/", "/bin/", "/sbin/", "/lib/", "/opt/sigil/"]
                .into_iter()
                .map(String::from)
                .collect(),
            allow_sha256: Vec::new(),
            unknown_score: 40,
            max_score: 80,
        }
    }
}

/// The package database must have changed within `max_age_days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdatesRule {
    pub max_age_days: u32,
    /// Added when the last update is older than `max_age_days`, or unknown.
    pub stale_score: u32,
}

impl Default for UpdatesRule {
    fn default() -> Self {
        Self {
            max_age_days: 30,
            stale_score: 20,
        }
    }
}

/// Only these TCP ports may listen (on any address). An empty list turns the rule off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListeningRule {
    pub allowed_ports: Vec<u16>,
    /// Added per unexpected port (a port listening on several addresses counts once)…
    pub unexpected_score: u32,
    /// …up to this total.
    pub max_score: u32,
}

impl Default for ListeningRule {
    fn default() -> Self {
        Self {
            allowed_ports: Vec::new(),
            unexpected_score: 15,
            max_score: 45,
        }
    }
}

/// The running sigil binary must be one of these builds. An empty list accepts any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigilRule {
    pub allow_sha256: Vec<String>,
    pub mismatch_score: u32,
}

impl Default for SigilRule {
    fn default() -> Self {
        Self {
            allow_sha256: Vec::new(),
            mismatch_score: 60,
        }
    }
}

/// What the node's TPM attestation must have proved of its boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootRule {
    pub require_tpm: bool,
    pub require_secure_boot: bool,
    /// Added once when any requirement is not met (a node without TPM attestation meets none).
    pub score: u32,
}

impl Default for BootRule {
    fn default() -> Self {
        Self {
            require_tpm: false,
            require_secure_boot: false,
            score: 50,
        }
    }
}

impl Default for Ruleset {
    /// The documented default ruleset, [`DEFAULT_RULESET_TOML`].
    fn default() -> Self {
        Self {
            levels: Levels::default(),
            executables: Some(ExecutablesRule::default()),
            updates: Some(UpdatesRule::default()),
            listening: Some(ListeningRule::default()),
            sigil: Some(SigilRule::default()),
            boot: Some(BootRule::default()),
        }
    }
}

const SECS_PER_DAY: i64 = 86_400;

/// The first 12 hex digits of a SHA-256, for reasons a human reads.
fn short_hash(h: &str) -> String {
    let short: String = h.chars().take(12).collect();
    if h.chars().count() > 12 {
        format!("{short}…")
    } else {
        short
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The port of `<address>:<port>` (`0.0.0.0:22`, `[::]:443`).
fn port_of(socket: &str) -> Option<u16> {
    socket.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// Adds `unit` to `total` without going past `cap`; returns what was actually added.
fn add_capped(total: &mut u32, unit: u32, cap: u32) -> u32 {
    let added = unit.min(cap.saturating_sub(*total));
    *total += added;
    added
}

impl Ruleset {
    /// Parses and checks a ruleset. Unknown keys, thresholds that are not strictly increasing
    /// within 1..=100, and allow-listed hashes that are not 64 hex digits are refused.
    pub fn from_toml(text: &str) -> Result<Ruleset, RulesetError> {
        let mut rs: Ruleset =
            toml::from_str(text).map_err(|e| RulesetError::Invalid(e.to_string()))?;
        rs.validate()?;
        if let Some(ex) = rs.executables.as_mut() {
            ex.allow_sha256
                .iter_mut()
                .for_each(|h| h.make_ascii_lowercase());
        }
        if let Some(sg) = rs.sigil.as_mut() {
            sg.allow_sha256
                .iter_mut()
                .for_each(|h| h.make_ascii_lowercase());
        }
        Ok(rs)
    }

    fn validate(&self) -> Result<(), RulesetError> {
        let Levels {
            medium,
            high,
            critical,
        } = self.levels;
        if medium == 0 || critical > 100 || medium >= high || high >= critical {
            return Err(RulesetError::Invalid(format!(
                "levels must be strictly increasing within 1..=100 \
                 (medium {medium}, high {high}, critical {critical})"
            )));
        }
        let hashes = self
            .executables
            .iter()
            .flat_map(|e| e.allow_sha256.iter().map(|h| ("executables", h)))
            .chain(
                self.sigil
                    .iter()
                    .flat_map(|s| s.allow_sha256.iter().map(|h| ("sigil", h))),
            );
        for (section, h) in hashes {
            if !is_sha256_hex(h) {
                return Err(RulesetError::Invalid(format!(
                    "[{section}] allow_sha256: {h:?} is not a SHA-256 (64 hex digits)"
                )));
            }
        }
        Ok(())
    }

    /// The level of a score under these thresholds.
    pub fn level(&self, score: u8) -> RiskLevel {
        let l = self.levels;
        if score >= l.critical {
            RiskLevel::Critical
        } else if score >= l.high {
            RiskLevel::High
        } else if score >= l.medium {
            RiskLevel::Medium
        } else {
            RiskLevel::Low
        }
    }

    /// Scores a posture at `now` (unix seconds). The rules run in a fixed order (executables,
    /// updates, listening, sigil, boot) and each walks its inputs in `BTreeMap`/`BTreeSet`
    /// order, so the same posture always gives the same reasons in the same order.
    pub fn assess(&self, p: &Posture, now: i64) -> Assessment {
        let mut total: u32 = 0;
        let mut reasons = Vec::new();

        if let Some(rule) = &self.executables {
            let mut rule_total = 0u32;
            for (path, sha) in &p.executables {
                let deleted = path.ends_with(" (deleted)");
                let traversal = path.split('/').any(|c| c == "..");
                let by_path = rule
                    .allow_path_prefixes
                    .iter()
                    .any(|pre| path.starts_with(pre.as_str()));
                let by_hash = rule
                    .allow_sha256
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(sha));
                if !deleted && !traversal && (by_path || by_hash) {
                    continue;
                }
                let added = add_capped(&mut rule_total, rule.unknown_score, rule.max_score);
                let why = if deleted {
                    " (file deleted since it started)"
                } else if traversal {
                    " (path with ..)"
                } else {
                    ""
                };
                let cap = if added < rule.unknown_score {
                    format!(" (rule capped at {})", rule.max_score)
                } else {
                    String::new()
                };
                reasons.push(format!(
                    "unknown executable {path} (sha256 {}){why}: +{added}{cap}",
                    short_hash(sha)
                ));
            }
            total = total.saturating_add(rule_total);
        }

        if let Some(rule) = &self.updates {
            match p.last_package_update {
                None => {
                    total = total.saturating_add(rule.stale_score);
                    reasons.push(format!(
                        "last package update unknown: +{}",
                        rule.stale_score
                    ));
                }
                Some(at) => {
                    let age_days = now.saturating_sub(at).max(0) / SECS_PER_DAY;
                    if age_days > i64::from(rule.max_age_days) {
                        total = total.saturating_add(rule.stale_score);
                        reasons.push(format!(
                            "last package update {age_days} days ago (more than {}): +{}",
                            rule.max_age_days, rule.stale_score
                        ));
                    }
                }
            }
        }

        if let Some(rule) = &self.listening
            && !rule.allowed_ports.is_empty()
        {
            // Port → the sockets listening on it; unparseable entries are unexpected as such.
            let mut unexpected: BTreeMap<String, Vec<&str>> = BTreeMap::new();
            for socket in &p.listening {
                match port_of(socket) {
                    Some(port) if rule.allowed_ports.contains(&port) => {}
                    Some(port) => unexpected
                        .entry(format!("port {port}"))
                        .or_default()
                        .push(socket),
                    None => unexpected
                        .entry(format!("socket {socket:?}"))
                        .or_default()
                        .push(socket),
                }
            }
            // Sort ports numerically, not as strings.
            let mut items: Vec<(String, Vec<&str>)> = unexpected.into_iter().collect();
            items.sort_by_key(|(k, _)| {
                (
                    k.strip_prefix("port ")
                        .and_then(|n| n.parse::<u32>().ok())
                        .unwrap_or(u32::MAX),
                    k.clone(),
                )
            });
            let mut rule_total = 0u32;
            for (what, sockets) in items {
                let added = add_capped(&mut rule_total, rule.unexpected_score, rule.max_score);
                let cap = if added < rule.unexpected_score {
                    format!(" (rule capped at {})", rule.max_score)
                } else {
                    String::new()
                };
                reasons.push(format!(
                    "unexpected listening {what} ({}): +{added}{cap}",
                    sockets.join(", ")
                ));
            }
            total = total.saturating_add(rule_total);
        }

        if let Some(rule) = &self.sigil
            && !rule.allow_sha256.is_empty()
            && !rule
                .allow_sha256
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&p.sigil_sha256))
        {
            total = total.saturating_add(rule.mismatch_score);
            reasons.push(format!(
                "sigil binary sha256 {} is not an allowed build: +{}",
                short_hash(&p.sigil_sha256),
                rule.mismatch_score
            ));
        }

        if let Some(rule) = &self.boot {
            let boot = p.boot.unwrap_or_default();
            let mut unmet = Vec::new();
            if rule.require_tpm && !boot.tpm_attested {
                unmet.push("TPM attestation");
            }
            if rule.require_secure_boot && !boot.secure_boot {
                unmet.push("Secure Boot");
            }
            if !unmet.is_empty() {
                total = total.saturating_add(rule.score);
                let none = if p.boot.is_none() {
                    " (node not TPM-attested)"
                } else {
                    ""
                };
                reasons.push(format!(
                    "boot: {} not proven{none}: +{}",
                    unmet.join(" and "),
                    rule.score
                ));
            }
        }

        let score = u8::try_from(total.min(100)).unwrap_or(100);
        Assessment {
            score,
            level: self.level(score),
            reasons,
        }
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

    const NOW: i64 = 1_750_000_000;
    const H1: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const H2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn clean() -> Posture {
        Posture {
            os_release: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel: "6.1.0-18-arm64".into(),
            last_package_update: Some(NOW - 2 * SECS_PER_DAY),
            executables: [
                ("/usr/bin/python3.11".to_string(), H1.to_string()),
                ("/opt/sigil/bin/sigil".to_string(), H2.to_string()),
            ]
            .into_iter()
            .collect(),
            listening: ["0.0.0.0:22".to_string(), "[::]:8443".to_string()]
                .into_iter()
                .collect(),
            sigil_sha256: H2.into(),
            boot: Some(BootState {
                tpm_attested: true,
                secure_boot: true,
            }),
            collected_at: NOW,
        }
    }

    fn only(section: &str) -> Ruleset {
        Ruleset::from_toml(section).unwrap()
    }

    #[test]
    fn default_is_the_documented_toml() {
        assert_eq!(
            Ruleset::from_toml(DEFAULT_RULESET_TOML).unwrap(),
            Ruleset::default()
        );
        let a = Ruleset::default().assess(&clean(), NOW);
        assert_eq!(
            a,
            Assessment {
                score: 0,
                level: RiskLevel::Low,
                reasons: vec![]
            }
        );
    }

    #[test]
    fn empty_ruleset_turns_every_rule_off() {
        let rs = Ruleset::from_toml("").unwrap();
        assert_eq!(rs.levels, Levels::default());
        let mut p = clean();
        p.executables.insert("/tmp/x".into(), H1.into());
        p.last_package_update = None;
        p.boot = None;
        assert_eq!(rs.assess(&p, NOW).score, 0);
    }

    #[test]
    fn unknown_executables_add_up_to_the_cap() {
        let rs = Ruleset::default();
        let mut p = clean();
        p.executables.insert("/tmp/a".into(), H1.into());
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 40);
        assert_eq!(a.level, RiskLevel::Medium);
        assert_eq!(
            a.reasons,
            vec!["unknown executable /tmp/a (sha256 aaaaaaaaaaaa…): +40"]
        );

        p.executables.insert("/tmp/b".into(), H2.into());
        p.executables.insert("/home/u/c".into(), H2.into());
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 80);
        assert_eq!(a.level, RiskLevel::High);
        // BTreeMap order: /home/u/c, /tmp/a, /tmp/b; the third is capped.
        assert_eq!(a.reasons.len(), 3);
        assert!(a.reasons[0].starts_with("unknown executable /home/u/c"));
        assert!(a.reasons[2].starts_with("unknown executable /tmp/b"));
        assert!(
            a.reasons[2].ends_with("+0 (rule capped at 80)"),
            "{}",
            a.reasons[2]
        );
    }

    #[test]
    fn executables_allowed_by_hash_deleted_and_traversal() {
        let rs = only(&format!(
            "[executables]\nallow_path_prefixes = [\"/usr/\"]\nallow_sha256 = [\"{}\"]\n",
            H1.to_uppercase()
        ));
        let mut p = clean();
        p.executables.clear();
        p.executables.insert("/srv/app/run".into(), H1.into()); // allowed by hash
        assert_eq!(rs.assess(&p, NOW).score, 0);
        p.executables
            .insert("/usr/bin/app (deleted)".into(), H2.into());
        p.executables.insert("/usr/../tmp/x".into(), H2.into());
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 80);
        assert!(
            a.reasons
                .iter()
                .any(|r| r.contains("/usr/bin/app (deleted)") && r.contains("deleted since"))
        );
        assert!(
            a.reasons
                .iter()
                .any(|r| r.contains("/usr/../tmp/x") && r.contains("path with .."))
        );
    }

    #[test]
    fn stale_or_unknown_updates() {
        let rs = only("[updates]\nmax_age_days = 10\n");
        let mut p = clean();
        p.last_package_update = Some(NOW - 10 * SECS_PER_DAY);
        assert_eq!(rs.assess(&p, NOW).score, 0, "exactly max_age_days is fine");
        p.last_package_update = Some(NOW - 45 * SECS_PER_DAY - 5);
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 20);
        assert_eq!(
            a.reasons,
            vec!["last package update 45 days ago (more than 10): +20"]
        );
        p.last_package_update = None;
        assert_eq!(
            rs.assess(&p, NOW).reasons,
            vec!["last package update unknown: +20"]
        );
        p.last_package_update = Some(NOW + 1000); // clock skew: not stale
        assert_eq!(rs.assess(&p, NOW).score, 0);
    }

    #[test]
    fn listening_ports_per_port_and_capped() {
        assert_eq!(
            Ruleset::default().assess(&clean(), NOW).score,
            0,
            "empty allow list = off"
        );
        let rs = only("[listening]\nallowed_ports = [22]\n");
        let mut p = clean();
        p.listening.insert("0.0.0.0:8443".into()); // same port as [::]:8443: counts once
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 15);
        assert_eq!(
            a.reasons,
            vec!["unexpected listening port 8443 (0.0.0.0:8443, [::]:8443): +15"]
        );
        for s in ["127.0.0.1:9000", "0.0.0.0:80", "[::1]:1883", "garbage"] {
            p.listening.insert(s.into());
        }
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 45);
        assert_eq!(a.reasons.len(), 5);
        assert!(
            a.reasons[0].contains("port 80 "),
            "numeric order: {:?}",
            a.reasons
        );
        assert!(a.reasons[4].contains("\"garbage\"") && a.reasons[4].contains("+0"));
    }

    #[test]
    fn sigil_build_mismatch() {
        let rs = only(&format!("[sigil]\nallow_sha256 = [\"{H2}\"]\n"));
        assert_eq!(rs.assess(&clean(), NOW).score, 0);
        let mut p = clean();
        p.sigil_sha256 = H1.into();
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 60);
        assert_eq!(a.level, RiskLevel::High);
        assert_eq!(
            a.reasons,
            vec!["sigil binary sha256 aaaaaaaaaaaa… is not an allowed build: +60"]
        );
    }

    #[test]
    fn boot_requirements() {
        let rs = only("[boot]\nrequire_tpm = true\nrequire_secure_boot = true\n");
        assert_eq!(rs.assess(&clean(), NOW).score, 0);
        let mut p = clean();
        p.boot = Some(BootState {
            tpm_attested: true,
            secure_boot: false,
        });
        assert_eq!(
            rs.assess(&p, NOW).reasons,
            vec!["boot: Secure Boot not proven: +50"]
        );
        p.boot = None;
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 50, "added once, not per requirement");
        assert_eq!(
            a.reasons,
            vec!["boot: TPM attestation and Secure Boot not proven (node not TPM-attested): +50"]
        );
        assert_eq!(
            Ruleset::default().assess(&p, NOW).score,
            0,
            "default requires nothing"
        );
    }

    #[test]
    fn total_is_capped_at_100_and_levels_follow_thresholds() {
        let rs = Ruleset::from_toml(
            &DEFAULT_RULESET_TOML.replace("require_tpm = false", "require_tpm = true"),
        )
        .unwrap();
        let mut p = clean();
        p.executables.insert("/tmp/a".into(), H1.into());
        p.executables.insert("/tmp/b".into(), H1.into());
        p.boot = None;
        let a = rs.assess(&p, NOW);
        assert_eq!(a.score, 100);
        assert_eq!(a.level, RiskLevel::Critical);
        assert_eq!(a.reasons.len(), 3);

        let rs = only("[levels]\nmedium = 10\nhigh = 20\ncritical = 100\n");
        assert_eq!(rs.level(9), RiskLevel::Low);
        assert_eq!(rs.level(10), RiskLevel::Medium);
        assert_eq!(rs.level(20), RiskLevel::High);
        assert_eq!(rs.level(99), RiskLevel::High);
        assert_eq!(rs.level(100), RiskLevel::Critical);
    }

    #[test]
    fn bad_thresholds_are_refused() {
        for bad in [
            "[levels]\nmedium = 0\nhigh = 60\ncritical = 90\n",
            "[levels]\nmedium = 60\nhigh = 60\ncritical = 90\n",
            "[levels]\nmedium = 30\nhigh = 95\ncritical = 90\n",
            "[levels]\nmedium = 30\nhigh = 60\ncritical = 101\n",
            "[levels]\nhigh = 10\n", // medium defaults to 30
            "[levels]\nmedium = -1\n",
        ] {
            assert!(Ruleset::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_toml_unknown_keys_and_bad_hashes_are_refused() {
        for bad in [
            "[levels\nmedium = 30",
            "[levels]\nmedium = \"thirty\"\n",
            "[levels]\nmedum = 30\n",
            "[executables]\nallow_prefixes = [\"/usr/\"]\n",
            "[firewall]\nenabled = true\n",
            "[listening]\nallowed_ports = [70000]\n",
            "[sigil]\nallow_sha256 = [\"abc\"]\n",
            "[executables]\nallow_sha256 = [\"zz\"]\n",
        ] {
            let e = Ruleset::from_toml(bad).unwrap_err();
            assert!(e.to_string().starts_with("posture ruleset: "), "{e}");
        }
    }
}
