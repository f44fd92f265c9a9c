//! The leaves of sigil's transparency log: one canonical JSON object per issued credential,
//! and one per change to what the trust authority vouches for (revocations, registration
//! entries, join tokens, key rotations, policy bundles: [`ChangeRecord`]).
//!
//! Canonical: keys in lexicographic order, no whitespace, integers only, so the bytes equal
//! the RFC 8785 (JCS) form and anyone can recompute them from the credential.
use serde::{Deserialize, Serialize};

use crate::LogError;

/// One log leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRecord {
    /// An X.509-SVID.
    X509Svid(X509SvidRecord),
    /// A JWT-SVID (`kind: "jwt-svid"`) or an OAuth access token (`kind: "access-token"`).
    Token(TokenRecord),
    /// A change: `kind` is one of [`CHANGE_KINDS`].
    Change(Box<ChangeRecord>),
}

/// The `kind`s of [`ChangeRecord`] leaves.
pub const CHANGE_KINDS: &[&str] = &[
    "revocation",
    "entry",
    "join-token",
    "key-rotation",
    "policy-bundle",
    "token-exchange",
    "model-key",
    "key-release",
    "secret",
    "db-role",
    "lease",
    "risk",
    "quarantine",
];

/// A change the trust authority made, logged before the admin API answers. One shape for
/// every change kind: `at` and `kind` always, the other fields where they apply (absent, not
/// `null`, otherwise). Field order is lexicographic (canonical JSON).
///
/// - `revocation`: `revocation_id`, `serial` or `spiffe_id`, `reason`, `expires_at`;
/// - `entry`: `action` (`create`/`update`/`delete`), `entry_id`, and for create and update
///   `spiffe_id`, `parent_id`, `revision`, `spec_sha256` (SHA-256 of the spec's JSON);
/// - `join-token`: `token_sha256` (never the token), `node_id`, `expires_at`;
/// - `key-rotation`: `authority` (`x509`/`jwt`/`policy`), `action` (`prepared`/`activated`),
///   `key_id`, `bundle_sequence`;
/// - `policy-bundle`: `revision`, `envelope_sha256`, `payload_sha256`, `key_id`, `not_after`;
/// - `token-exchange` (RFC 8693): `spiffe_id` (the workload now acting), `actors` (the whole
///   chain, current actor first), `subject` (the user) and `subject_issuer`, `jti` and
///   `not_after` of the new token, `token_sha256` (of the subject token exchanged).
/// - `model-key`: `action` (`register`/`seal`), `model`, `revision` (the model version),
///   `key_id`, and for `seal` `header_sha256` and `payload_sha256` (the plaintext's SHA-256);
/// - `key-release`: a model's data key released to a workload: `model`, `revision` (the
///   model version), `key_id`, `header_sha256`, `spiffe_id` and `serial` (the workload's
///   X.509-SVID), `node_id` (its node, if any);
/// - `secret`: `action` (`put`/`delete`/`read`/`admin-read`), `path`, and `revision` (the
///   version; not for `delete`), `key_id` for `put`; for a workload's `read` also
///   `spiffe_id`, `serial`, `node_id`, `lease_id` and `expires_at` (its lease). Never a value;
/// - `db-role`: `action` (`put`/`delete`), `path` (`database/creds/<role>`), `key_id`;
/// - `lease`: a dynamic credential's lease, `action` (`issue`/`renew`/`revoke`), `lease_id`,
///   `path`, `spiffe_id`, `serial`, `node_id`; `expires_at` for issue and renew, `reason`
///   for revoke;
/// - `risk`: a node's risk changed, `action` (`posture`: its agent reported a posture that
///   its ruleset scores differently; `anomaly`: the behaviour detector rescored it),
///   `node_id`, `score` (0-100), `reasons`, and for `anomaly` the `features` that triggered
///   it (thousandths, as integers);
/// - `quarantine`: `action` (`quarantine`/`clear`), `node_id`, `spiffe_id` (absent: the whole
///   node), and for `quarantine` `quarantine_id`, `reason`, `features` (thousandths) and
///   `serials` (the X.509-SVIDs it revoked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actors: Option<Vec<String>>,
    /// When the change was made (Unix seconds).
    pub at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_sequence: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<std::collections::BTreeMap<String, i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serials: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

impl ChangeRecord {
    /// An empty record of `kind` at `at`; set the fields that apply.
    pub fn new(kind: &str, at: i64) -> Self {
        Self {
            kind: kind.to_owned(),
            at,
            ..Self::default()
        }
    }
}

/// An issued X.509-SVID. Field order is lexicographic (canonical JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509SvidRecord {
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub cert_sha256: String,
    pub issued_at: i64,
    /// Always `"x509-svid"`.
    pub kind: String,
    pub not_after: i64,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub spiffe_id: String,
}

/// An issued JWT-SVID or access token. Field order is lexicographic (canonical JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub audience: Vec<String>,
    pub expires_at: i64,
    pub issued_at: i64,
    pub jti: String,
    /// `"jwt-svid"` or `"access-token"`.
    pub kind: String,
    /// The subject's SPIFFE ID.
    pub subject: String,
}

impl LogRecord {
    /// The canonical bytes of this record (the leaf data).
    pub fn to_bytes(&self) -> Vec<u8> {
        let r = match self {
            Self::X509Svid(r) => serde_json::to_vec(r),
            Self::Token(r) => serde_json::to_vec(r),
            Self::Change(r) => serde_json::to_vec(r),
        };
        // Serializing plain strings and integers cannot fail.
        r.unwrap_or_default()
    }

    /// Parses leaf data; it must be canonical (re-encoding gives the same bytes).
    pub fn from_bytes(data: &[u8]) -> Result<Self, LogError> {
        #[derive(Deserialize)]
        struct Kind {
            kind: String,
        }
        let bad = |e: &dyn std::fmt::Display| LogError::malformed("log record", e);
        let kind: Kind = serde_json::from_slice(data).map_err(|e| bad(&e))?;
        let rec = match kind.kind.as_str() {
            "x509-svid" => Self::X509Svid(serde_json::from_slice(data).map_err(|e| bad(&e))?),
            "jwt-svid" | "access-token" => {
                Self::Token(serde_json::from_slice(data).map_err(|e| bad(&e))?)
            }
            k if CHANGE_KINDS.contains(&k) => {
                Self::Change(serde_json::from_slice(data).map_err(|e| bad(&e))?)
            }
            other => return Err(bad(&format!("unknown kind {other:?}"))),
        };
        if rec.to_bytes() != data {
            return Err(bad(&"not in canonical form"));
        }
        Ok(rec)
    }

    /// The SPIFFE ID the credential was issued to (for a change, the ID it concerns, or
    /// `""`).
    pub fn spiffe_id(&self) -> &str {
        match self {
            Self::X509Svid(r) => &r.spiffe_id,
            Self::Token(r) => &r.subject,
            Self::Change(r) => r.spiffe_id.as_deref().unwrap_or_default(),
        }
    }

    /// `x509-svid`, `jwt-svid`, `access-token`, or a change kind ([`CHANGE_KINDS`]).
    pub fn kind(&self) -> &str {
        match self {
            Self::X509Svid(r) => &r.kind,
            Self::Token(r) => &r.kind,
            Self::Change(r) => &r.kind,
        }
    }

    /// When it was issued, or the change made (Unix seconds).
    pub fn issued_at(&self) -> i64 {
        match self {
            Self::X509Svid(r) => r.issued_at,
            Self::Token(r) => r.issued_at,
            Self::Change(r) => r.at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_round_trips() {
        let r = LogRecord::X509Svid(X509SvidRecord {
            cert_sha256: "ab".repeat(32),
            issued_at: 1,
            kind: "x509-svid".into(),
            not_after: 2,
            serial: "01".into(),
            spiffe_id: "spiffe://td/a".into(),
        });
        let b = r.to_bytes();
        assert!(b.starts_with(br#"{"cert_sha256":"abab"#));
        assert!(b.ends_with(br#""serial":"01","spiffe_id":"spiffe://td/a"}"#));
        assert_eq!(LogRecord::from_bytes(&b).unwrap(), r);
        let t = LogRecord::Token(TokenRecord {
            audience: vec!["gw".into()],
            expires_at: 9,
            issued_at: 3,
            jti: "j".into(),
            kind: "access-token".into(),
            subject: "spiffe://td/b".into(),
        });
        assert_eq!(
            t.to_bytes(),
            br#"{"audience":["gw"],"expires_at":9,"issued_at":3,"jti":"j","kind":"access-token","subject":"spiffe://td/b"}"#
        );
        assert_eq!(LogRecord::from_bytes(&t.to_bytes()).unwrap(), t);
        // Not canonical, unknown kinds and extra fields are refused.
        assert!(LogRecord::from_bytes(b" {\"kind\":\"x509-svid\"}").is_err());
        let spaced = String::from_utf8(t.to_bytes()).unwrap().replace(',', ", ");
        assert!(LogRecord::from_bytes(spaced.as_bytes()).is_err());
        assert!(LogRecord::from_bytes(br#"{"kind":"other"}"#).is_err());
    }

    #[test]
    fn change_records_are_canonical_and_self_describing() {
        let mut c = ChangeRecord::new("revocation", 7);
        c.serial = Some("0a".into());
        c.reason = Some("key compromise".into());
        c.revocation_id = Some(3);
        c.expires_at = Some(9);
        let r = LogRecord::Change(Box::new(c));
        assert_eq!(
            r.to_bytes(),
            br#"{"at":7,"expires_at":9,"kind":"revocation","reason":"key compromise","revocation_id":3,"serial":"0a"}"#
        );
        assert_eq!(LogRecord::from_bytes(&r.to_bytes()).unwrap(), r);
        assert_eq!(
            (r.kind(), r.issued_at(), r.spiffe_id()),
            ("revocation", 7, "")
        );
        // An explicit null is not canonical; a field of no kind is refused.
        assert!(LogRecord::from_bytes(br#"{"at":1,"kind":"entry","serial":null}"#).is_err());
        assert!(LogRecord::from_bytes(br#"{"at":1,"kind":"entry","token":"x"}"#).is_err());
        assert!(LogRecord::from_bytes(br#"{"at":1,"kind":"entry"}"#).is_ok());
    }
}
