//! The records the store persists besides registration entries: nodes, issued identities,
//! revocations, signing authorities, and the filter for listing entries.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sigil_core::{RevokedSvid, SpiffeId, UnixTime};

/// An attested node (an agent's host) and its current node SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// How the node attested, e.g. `join_token`.
    pub attestation_type: String,
    /// Serial of the node's current SVID, lowercase hex.
    pub serial: String,
    /// When the node's current SVID expires.
    pub not_after: UnixTime,
    /// Whether an administrator evicted the node (it must re-attest).
    pub evicted: bool,
    /// What the node's attestation proved, as node selectors (`tpm:ek_hash:…`,
    /// `tpm:secureboot:…`, `tpm:pcr:<i>:…`); empty for join-token nodes. Replaced at every
    /// (re-)attestation; registration entries may require some of them.
    pub selectors: Vec<String>,
    /// When the node first attested. Kept from the first insert on later upserts.
    pub created_at: UnixTime,
    /// When the record last changed.
    pub updated_at: UnixTime,
}

/// What kind of credential was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityKind {
    /// An X.509-SVID (`x509-svid`).
    X509Svid,
    /// A JWT-SVID (`jwt-svid`).
    JwtSvid,
    /// An OAuth access token (`access-token`).
    AccessToken,
}

/// One credential the authority issued, for audit and revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedIdentity {
    /// What was issued.
    pub kind: IdentityKind,
    /// Certificate serial (lowercase hex) or token `jti`. Unique per kind.
    pub serial_or_jti: String,
    /// The identity it carries.
    pub spiffe_id: SpiffeId,
    /// X.509: SHA-256 of the certificate DER, hex. Tokens: bound certificate thumbprint or "".
    pub thumbprint: String,
    /// Token audiences (empty for X.509).
    pub audience: Vec<String>,
    /// When it was issued.
    pub issued_at: UnixTime,
    /// When it expires.
    pub not_after: UnixTime,
    /// Who asked: the node's SPIFFE ID, or `admin`.
    pub requester: String,
}

/// A revocation: of one serial, of every credential of one SPIFFE ID issued up to `revoked_at`,
/// or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Assigned by the store; ignored on insert.
    pub id: i64,
    /// The revoked serial or `jti`, compared exactly (store serials in lowercase hex).
    pub serial: Option<String>,
    /// The revoked SPIFFE ID: credentials of it issued at or before `revoked_at` are dead.
    pub spiffe_id: Option<SpiffeId>,
    /// Why (free text for operators).
    pub reason: String,
    /// When the revocation was made.
    pub revoked_at: UnixTime,
    /// After this, every credential it could concern has expired, so it can be pruned.
    pub expires_at: UnixTime,
}

impl Revocation {
    /// What the revocation rule reads of it (and what nodes receive).
    pub fn revoked_svid(&self) -> RevokedSvid {
        RevokedSvid {
            serial: self.serial.clone().unwrap_or_default(),
            spiffe_id: self
                .spiffe_id
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            revoked_at: self.revoked_at,
            expires_at: self.expires_at,
        }
    }
}

/// What an authority signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityKind {
    /// An X.509 CA (`x509`).
    X509,
    /// A JWT signing key (`jwt`).
    Jwt,
    /// A policy-bundle signing key (`policy`).
    Policy,
}

/// Where an authority is in its rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// No longer signing; kept in the bundle until what it signed expires.
    Retired,
}

/// A CA certificate or JWT signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityRecord {
    /// Key ID.
    pub id: String,
    /// X.509 CA or JWT key.
    pub kind: AuthorityKind,
    /// Rotation state.
    pub state: AuthorityState,
    /// X.509: the CA certificate DER. JWT: the SubjectPublicKeyInfo DER.
    pub public_der: Vec<u8>,
    /// Where the private key lives (e.g. a file path). Never the key itself.
    pub key_ref: String,
    /// Signature algorithm, e.g. `ES256`.
    pub algorithm: String,
    /// The authority's own expiry.
    pub not_after: UnixTime,
    /// The latest expiry of anything it signed; it may be pruned after this.
    pub last_use_expiry: UnixTime,
    /// When it was created.
    pub created_at: UnixTime,
    /// When it last became active.
    pub activated_at: Option<UnixTime>,
}

/// A signed policy bundle as published (`sigil policy push`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBundleRecord {
    /// The bundle's revision: unique, strictly increasing with every push.
    pub revision: i64,
    /// The signed envelope (JSON), exactly as sent to agents.
    pub envelope: String,
    /// Lowercase hex SHA-256 of the signed payload.
    pub payload_sha256: String,
    /// The policy key that signed it.
    pub key_id: String,
    /// The bundle's expiry (unix seconds).
    pub not_after: UnixTime,
    /// When it was pushed.
    pub created_at: UnixTime,
}

/// A model version's data key, wrapped under the server's model key-encryption key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelKeyRecord {
    /// The model's name (`Model::"<name>"` in policy).
    pub name: String,
    /// The model version (from 1).
    pub version: i64,
    /// The data key's id (unique).
    pub key_id: String,
    /// The data key wrapped under the KEK (never the key itself).
    pub wrapped_key: String,
    /// Once sealed: lowercase hex SHA-256 binding hash of the sealed file's header.
    pub header_sha256: Option<String>,
    /// Once sealed: lowercase hex SHA-256 of the plaintext.
    pub plaintext_sha256: Option<String>,
    /// When it was registered.
    pub created_at: UnixTime,
    /// When its file was sealed.
    pub sealed_at: Option<UnixTime>,
}

/// Which entries to list. `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryFilter {
    /// Only entries whose parent (node) is this ID.
    pub parent_id: Option<SpiffeId>,
    /// Only entries handing out this ID.
    pub spiffe_id: Option<SpiffeId>,
}

/// A stored enum value that is not one of the known names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownName {
    what: &'static str,
    value: String,
}

macro_rules! text_enum {
    ($ty:ident, $what:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The name stored in the database and used in JSON.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownName { what: $what, value: s.chars().take(80).collect() }),
                }
            }
        }
    };
}

text_enum!(IdentityKind, "identity kind", {
    X509Svid => "x509-svid",
    JwtSvid => "jwt-svid",
    AccessToken => "access-token",
});
text_enum!(AuthorityKind, "authority kind", {
    X509 => "x509",
    Jwt => "jwt",
    Policy => "policy",
});
text_enum!(AuthorityState, "authority state", {
    Prepared => "prepared",
    Active => "active",
    Retired => "retired",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for k in [
            IdentityKind::X509Svid,
            IdentityKind::JwtSvid,
            IdentityKind::AccessToken,
        ] {
            assert_eq!(k.as_str().parse::<IdentityKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        for s in [
            AuthorityState::Prepared,
            AuthorityState::Active,
            AuthorityState::Retired,
        ] {
            assert_eq!(s.as_str().parse::<AuthorityState>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        for k in [
            AuthorityKind::X509,
            AuthorityKind::Jwt,
            AuthorityKind::Policy,
        ] {
            assert_eq!(k.as_str().parse::<AuthorityKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        assert!("X509".parse::<AuthorityKind>().is_err());
    }
}

/// One version of a static secret, as stored: the value encrypted under a data key of its
/// own, the data key wrapped under the server's secret KEK. Never the value in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersionRecord {
    /// The secret's path (`Secret::"<path>"` in policy).
    pub path: String,
    /// From 1, one more at every write.
    pub version: i64,
    /// The data key's id (unique).
    pub key_id: String,
    /// The data key wrapped under the KEK; empty once deleted.
    pub wrapped_key: String,
    /// The encrypted value; empty once deleted.
    pub ciphertext: String,
    /// When it was written.
    pub created_at: UnixTime,
    /// When it was deleted (its key and ciphertext destroyed).
    pub deleted_at: Option<UnixTime>,
}

/// A dynamic database credential role: where and how to make a short-lived database role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbRoleRecord {
    /// Its name (`Secret::"database/creds/<name>"` in policy).
    pub name: String,
    /// The id of the data key that seals `connection`.
    pub key_id: String,
    /// That data key wrapped under the KEK.
    pub wrapped_key: String,
    /// The engine's connection URL (it may hold a password), sealed.
    pub connection: String,
    /// SQL run to create a role: `{{name}}`, `{{password}}` and `{{expiration}}` are filled in.
    pub creation_sql: String,
    /// SQL run to drop it (`{{name}}`), after its sessions are terminated.
    pub revocation_sql: String,
    /// Lease length when none is asked for, seconds.
    pub default_ttl: i64,
    /// The longest a lease can last, renewals included, seconds.
    pub max_ttl: i64,
    /// When it was defined.
    pub created_at: UnixTime,
}

/// A lease on a dynamic credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Its id (random).
    pub id: String,
    /// What was read (`database/creds/<role>`).
    pub path: String,
    /// The workload it was issued to.
    pub spiffe_id: String,
    /// The serial of the X.509-SVID it presented.
    pub serial: String,
    /// The node that SVID was signed for ("" if none).
    pub node_id: String,
    /// The role definition.
    pub db_role: String,
    /// The database role made for this lease.
    pub username: String,
    /// When it was issued.
    pub issued_at: UnixTime,
    /// When it ends unless renewed.
    pub expires_at: UnixTime,
    /// When it ends at the latest.
    pub max_expires_at: UnixTime,
    /// When it was revoked (its database role dropped), by expiry or otherwise.
    pub revoked_at: Option<UnixTime>,
    /// Why: "expired", "revoked by the holder", "identity revoked", "node evicted", "admin".
    pub revoke_reason: Option<String>,
}

/// Which leases to list. `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFilter {
    /// Only leases of this workload.
    pub spiffe_id: Option<String>,
    /// Only leases issued to the SVID with this serial.
    pub serial: Option<String>,
    /// Only leases of workloads on this node.
    pub node_id: Option<String>,
    /// Only leases that end at or before this time.
    pub due_by: Option<UnixTime>,
    /// Revoked (closed) leases too.
    pub include_revoked: bool,
}

/// A node's risk inputs: what its agent last reported and what its telemetry scored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRiskRecord {
    /// The node's SPIFFE ID.
    pub node_id: String,
    /// The posture (`sigil_risk::Posture` JSON) its agent last reported ("" if none yet).
    pub posture_json: String,
    /// The score (0-100) the agent's ruleset gave it, and why.
    pub posture_score: i64,
    pub posture_reasons: Vec<String>,
    /// The behaviour score (0-100) from telemetry, and why.
    pub anomaly_score: i64,
    pub anomaly_reasons: Vec<String>,
    /// When either last changed.
    pub updated_at: UnixTime,
}

/// A quarantine: a node (`spiffe_id` None) or one workload on it, until an operator clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    /// Assigned by the store; ignored on insert.
    pub id: i64,
    pub node_id: String,
    /// The workload quarantined on that node, or None for the whole node.
    pub spiffe_id: Option<String>,
    pub reason: String,
    /// The features that triggered it (JSON object).
    pub features_json: String,
    pub created_at: UnixTime,
    pub cleared_at: Option<UnixTime>,
}
