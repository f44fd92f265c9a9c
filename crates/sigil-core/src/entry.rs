//! Registration entries: which SPIFFE ID a workload with given selectors on a given node gets.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Selector, SpiffeId, UnixTime};

/// Default X.509-SVID lifetime: one hour.
pub const DEFAULT_X509_TTL_SECS: u32 = 3600;
/// Default JWT-SVID lifetime: five minutes.
pub const DEFAULT_JWT_TTL_SECS: u32 = 300;
/// Shortest SVID lifetime an entry may ask for.
pub const MIN_TTL_SECS: u32 = 60;
/// Longest X.509-SVID lifetime an entry may ask for: 30 days.
pub const MAX_X509_TTL_SECS: u32 = 30 * 24 * 3600;
/// Longest JWT-SVID lifetime an entry may ask for: one day.
pub const MAX_JWT_TTL_SECS: u32 = 24 * 3600;

/// An entry's identifier (a UUID, in its hyphenated lowercase form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EntryId(String);

impl EntryId {
    /// A fresh random ID.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
    /// Parses an ID given by a user.
    pub fn parse(s: &str) -> Result<Self, EntryError> {
        uuid::Uuid::parse_str(s)
            .map(|u| Self(u.hyphenated().to_string()))
            .map_err(|_| EntryError::BadId(s.chars().take(80).collect()))
    }
    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an administrator asks for when creating or updating an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// The identity handed out.
    pub spiffe_id: SpiffeId,
    /// The node (its SPIFFE ID) whose agent may hand out this identity.
    pub parent_id: SpiffeId,
    /// All of these must be among the caller's selectors for the entry to match.
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime in seconds.
    #[serde(default = "default_x509_ttl")]
    pub x509_ttl_secs: u32,
    /// JWT-SVID lifetime in seconds.
    #[serde(default = "default_jwt_ttl")]
    pub jwt_ttl_secs: u32,
    /// DNS names added to the X.509-SVID as SANs.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Groups the workload belongs to, for policy (e.g. `factory-floor`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// OAuth scopes the workload may be granted (e.g. `model:invoke`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// This workload may watch policy bundles and revocations on its agent's Enforcer API
    /// (`sigil.agent.v1.Enforcer`): the `sigil proxy` sidecar's entry sets it. Omitted from
    /// the serialized form when false, so entries without it serialize as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforcer: bool,
    /// Node selectors the parent node must have, all of them, for this entry to be sent to
    /// it or signed for it: what the node's attestation proved, e.g. `tpm:secureboot:true`
    /// or `tpm:pcr:7:<hex>`. Empty (the default, omitted when serialized): any node that is
    /// the parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<String>,
}

fn default_x509_ttl() -> u32 {
    DEFAULT_X509_TTL_SECS
}
fn default_jwt_ttl() -> u32 {
    DEFAULT_JWT_TTL_SECS
}

/// A stored registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationEntry {
    /// The entry's ID.
    pub id: EntryId,
    /// What the entry says.
    #[serde(flatten)]
    pub spec: EntrySpec,
    /// Bumped on every update; lets agents tell a stale copy from a fresh one.
    pub revision: i64,
    /// When it was created.
    pub created_at: UnixTime,
    /// When it was last changed.
    pub updated_at: UnixTime,
}

/// Why an entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    #[error("invalid entry id {0:?}")]
    BadId(String),
    #[error("an entry needs at least one selector")]
    NoSelectors,
    #[error("{field} must be between {min} and {max} seconds (got {got})")]
    TtlOutOfRange {
        field: &'static str,
        min: u32,
        max: u32,
        got: u32,
    },
    #[error("invalid DNS name {0:?}")]
    BadDnsName(String),
    #[error("invalid group {0:?} (letters, digits, '.', '-', '_', ':', up to 128 characters)")]
    BadGroup(String),
    #[error("invalid scope {0:?} (RFC 6749 scope-token)")]
    BadScope(String),
    #[error(
        "invalid node selector {0:?} (type:value, printable ASCII without spaces, up to 256 characters)"
    )]
    BadNodeSelector(String),
    #[error("{0} is not in trust domain {1}")]
    ForeignTrustDomain(String, String),
    #[error("entry has {count} {field}; at most {max} are allowed")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
}

const MAX_LIST: usize = 64;

impl EntrySpec {
    /// Checks everything that can be checked without the store: TTL ranges, names, scopes, and
    /// that both IDs are in `trust_domain`.
    pub fn validate(&self, trust_domain: &crate::TrustDomain) -> Result<(), EntryError> {
        for id in [&self.spiffe_id, &self.parent_id] {
            if !id.is_member_of(trust_domain) {
                return Err(EntryError::ForeignTrustDomain(
                    id.to_string(),
                    trust_domain.to_string(),
                ));
            }
        }
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        for (field, count) in [
            ("selectors", self.selectors.len()),
            ("dns_names", self.dns_names.len()),
            ("groups", self.groups.len()),
            ("scopes", self.scopes.len()),
            ("node_selectors", self.node_selectors.len()),
        ] {
            if count > MAX_LIST {
                return Err(EntryError::TooMany {
                    field,
                    count,
                    max: MAX_LIST,
                });
            }
        }
        check_ttl("x509_ttl_secs", self.x509_ttl_secs, MAX_X509_TTL_SECS)?;
        check_ttl("jwt_ttl_secs", self.jwt_ttl_secs, MAX_JWT_TTL_SECS)?;
        self.dns_names
            .iter()
            .try_for_each(|d| validate_dns_name(d))?;
        self.groups.iter().try_for_each(|g| validate_group(g))?;
        self.scopes.iter().try_for_each(|s| validate_scope(s))?;
        self.node_selectors
            .iter()
            .try_for_each(|s| validate_node_selector(s))?;
        Ok(())
    }

    /// Whether a node with `node_selectors` (what its attestation proved) may receive this
    /// entry: it has every node selector the entry requires.
    pub fn node_matches(&self, node_selectors: &[String]) -> bool {
        node_has_all(&self.node_selectors, node_selectors)
    }

    /// Whether every selector of this entry is among `caller` (the caller may have more).
    pub fn matches(&self, caller: &[Selector]) -> bool {
        !self.selectors.is_empty() && self.selectors.iter().all(|s| caller.contains(s))
    }
}

fn check_ttl(field: &'static str, got: u32, max: u32) -> Result<(), EntryError> {
    if (MIN_TTL_SECS..=max).contains(&got) {
        Ok(())
    } else {
        Err(EntryError::TtlOutOfRange {
            field,
            min: MIN_TTL_SECS,
            max,
            got,
        })
    }
}

/// A DNS name per RFC 1123 (letters, digits, hyphens; labels of 1..=63; total ≤ 253), with an
/// optional leading `*.` wildcard label.
pub fn validate_dns_name(name: &str) -> Result<(), EntryError> {
    let bad = || EntryError::BadDnsName(name.chars().take(80).collect());
    let body = name.strip_prefix("*.").unwrap_or(name);
    if body.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in body.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// A group name: 1..=128 of letters, digits, `.`, `-`, `_`, `:`.
pub fn validate_group(g: &str) -> Result<(), EntryError> {
    let ok = !g.is_empty()
        && g.len() <= 128
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    if ok {
        Ok(())
    } else {
        Err(EntryError::BadGroup(g.chars().take(80).collect()))
    }
}

/// Whether `node_selectors` (what a node's attestation proved) include every one of
/// `required` (an entry's node selectors).
pub fn node_has_all(required: &[String], node_selectors: &[String]) -> bool {
    required.iter().all(|s| node_selectors.contains(s))
}

/// A node selector: `type:value`, both non-empty, printable ASCII without spaces, ≤ 256
/// bytes (`tpm:ek_hash:<hex>`, `tpm:secureboot:true`, `tpm:pcr:7:<hex>`).
pub fn validate_node_selector(s: &str) -> Result<(), EntryError> {
    let ok = s.len() <= 256
        && s.bytes().all(|b| b.is_ascii_graphic())
        && s.split_once(':')
            .is_some_and(|(t, v)| !t.is_empty() && !v.is_empty());
    if ok {
        Ok(())
    } else {
        Err(EntryError::BadNodeSelector(s.chars().take(80).collect()))
    }
}

/// An OAuth scope-token (RFC 6749 §3.3: printable ASCII except space, `"` and `\`), ≤ 128 bytes.
pub fn validate_scope(s: &str) -> Result<(), EntryError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(EntryError::BadScope(s.chars().take(80).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrustDomain;

    fn spec() -> EntrySpec {
        serde_json::from_value(serde_json::json!({
            "spiffe_id": "spiffe://td/app",
            "parent_id": "spiffe://td/sigil/node/n1",
            "selectors": ["unix:uid:1000"],
            "groups": ["factory-floor"],
            "scopes": ["model:invoke"],
            "dns_names": ["app.local"],
        }))
        .unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let s = spec();
        assert_eq!(s.x509_ttl_secs, 3600);
        assert_eq!(s.jwt_ttl_secs, 300);
        let td = TrustDomain::new("td").unwrap();
        s.validate(&td).unwrap();
        assert!(matches!(
            s.validate(&TrustDomain::new("other").unwrap()),
            Err(EntryError::ForeignTrustDomain(..))
        ));
    }

    #[test]
    fn rejects_bad_fields() {
        let td = TrustDomain::new("td").unwrap();
        let mut s = spec();
        s.selectors.clear();
        assert_eq!(s.validate(&td), Err(EntryError::NoSelectors));
        let mut s = spec();
        s.x509_ttl_secs = 59;
        assert!(matches!(
            s.validate(&td),
            Err(EntryError::TtlOutOfRange { .. })
        ));
        let mut s = spec();
        s.jwt_ttl_secs = MAX_JWT_TTL_SECS + 1;
        assert!(matches!(
            s.validate(&td),
            Err(EntryError::TtlOutOfRange { .. })
        ));
        let mut s = spec();
        s.dns_names = vec!["bad_name".into()];
        assert!(matches!(s.validate(&td), Err(EntryError::BadDnsName(_))));
        let mut s = spec();
        s.groups = vec!["has space".into()];
        assert!(matches!(s.validate(&td), Err(EntryError::BadGroup(_))));
        let mut s = spec();
        s.scopes = vec!["a\"b".into()];
        assert!(matches!(s.validate(&td), Err(EntryError::BadScope(_))));
        let mut s = spec();
        s.groups = vec!["g".into(); MAX_LIST + 1];
        assert!(matches!(s.validate(&td), Err(EntryError::TooMany { .. })));
    }

    #[test]
    fn enforcer_defaults_to_false_and_is_omitted_when_false() {
        let s = spec();
        assert!(!s.enforcer);
        let v = serde_json::to_value(&s).unwrap();
        assert!(v.get("enforcer").is_none(), "{v}");
        let mut e = spec();
        e.enforcer = true;
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["enforcer"], true);
        let back: EntrySpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn unknown_fields_and_selectors_are_refused() {
        let r: Result<EntrySpec, _> = serde_json::from_value(serde_json::json!({
            "spiffe_id": "spiffe://td/app", "parent_id": "spiffe://td/n",
            "selectors": ["unix:uid:1"], "admin": true,
        }));
        assert!(r.is_err());
        let r: Result<EntrySpec, _> = serde_json::from_value(serde_json::json!({
            "spiffe_id": "spiffe://td/app", "parent_id": "spiffe://td/n",
            "selectors": ["docker:label:x"],
        }));
        assert!(r.is_err());
    }

    #[test]
    fn matching_needs_all_selectors() {
        let mut s = spec();
        s.selectors.push(Selector::parse("unix:gid:10").unwrap());
        let uid = Selector::parse("unix:uid:1000").unwrap();
        let gid = Selector::parse("unix:gid:10").unwrap();
        let path = Selector::parse("unix:path:/bin/x").unwrap();
        assert!(!s.matches(std::slice::from_ref(&uid)));
        assert!(s.matches(&[uid.clone(), gid.clone(), path]));
        assert!(!s.matches(&[]));
    }

    #[test]
    fn node_selectors_are_validated_required_in_full_and_omitted_when_empty() {
        let td = TrustDomain::new("td").unwrap();
        let s = spec();
        assert!(s.node_selectors.is_empty());
        assert!(
            serde_json::to_value(&s)
                .unwrap()
                .get("node_selectors")
                .is_none()
        );
        assert!(s.node_matches(&[]));
        let mut s = spec();
        s.node_selectors = vec!["tpm:secureboot:true".into(), "tpm:pcr:7:ab".into()];
        s.validate(&td).unwrap();
        assert!(!s.node_matches(&[]));
        assert!(!s.node_matches(&["tpm:secureboot:true".into()]));
        assert!(!s.node_matches(&["tpm:secureboot:false".into(), "tpm:pcr:7:ab".into()]));
        assert!(s.node_matches(&[
            "tpm:ek_hash:00".into(),
            "tpm:pcr:7:ab".into(),
            "tpm:secureboot:true".into()
        ]));
        for bad in [
            "",
            "tpm",
            ":x",
            "tpm:",
            "tpm:a b",
            "tpm:\u{e9}",
            &format!("t:{}", "a".repeat(256)),
        ] {
            let mut s = spec();
            s.node_selectors = vec![bad.to_owned()];
            assert!(
                matches!(s.validate(&td), Err(EntryError::BadNodeSelector(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "a.b", "*.example.org", "x-1.y"] {
            validate_dns_name(ok).unwrap();
        }
        for bad in ["", "*.", "-a", "a-", "a..b", "a b", &"a".repeat(64)] {
            assert!(validate_dns_name(bad).is_err(), "{bad}");
        }
    }
}
