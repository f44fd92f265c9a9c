//! The revocation list the agent holds for local enforcers (served by the Enforcer API).
//!
//! Semantics are the server's (`sigil-store` `is_revoked`): an X.509-SVID is revoked while a
//! live entry (`now < expires_at`) names its serial, or names its SPIFFE ID with
//! `revoked_at >= notBefore` (every SVID of that ID issued up to the revocation).
use serde::{Deserialize, Serialize};
use sigil_core::UnixTime;
use sigil_proto::enforcer as ep;
use sigil_proto::node::v1 as pb;

/// One revocation, as the node API sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedSvid {
    /// Lowercase hex serial, or empty when the revocation names a SPIFFE ID only.
    pub serial: String,
    /// SPIFFE ID, or empty when the revocation names a serial only.
    pub spiffe_id: String,
    pub revoked_at: UnixTime,
    /// After this it concerns no live credential and is dropped.
    pub expires_at: UnixTime,
}

impl RevokedSvid {
    /// Whether it revokes the credential (`serial`, `spiffe_id`, `not_before`) at `now`.
    pub fn revokes(
        &self,
        serial: &str,
        spiffe_id: &str,
        not_before: UnixTime,
        now: UnixTime,
    ) -> bool {
        now < self.expires_at
            && ((!self.serial.is_empty() && self.serial == serial)
                || (!self.spiffe_id.is_empty()
                    && self.spiffe_id == spiffe_id
                    && self.revoked_at >= not_before))
    }
}

/// The full list with the server's `revocations_revision` it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub revision: i64,
    pub revoked: Vec<RevokedSvid>,
}

impl RevocationList {
    /// The live entries of a sync update (expired ones, and ones naming nothing, dropped).
    pub fn from_sync(revision: i64, revoked: &[pb::RevokedSvid], now: UnixTime) -> Self {
        let mut l = Self {
            revision,
            revoked: revoked
                .iter()
                .filter(|r| !(r.serial.is_empty() && r.spiffe_id.is_empty()))
                .map(|r| RevokedSvid {
                    serial: r.serial.clone(),
                    spiffe_id: r.spiffe_id.clone(),
                    revoked_at: r.revoked_at,
                    expires_at: r.expires_at,
                })
                .collect(),
        };
        l.drop_expired(now);
        l
    }

    /// Drops entries past `expires_at`; returns whether any was dropped.
    pub fn drop_expired(&mut self, now: UnixTime) -> bool {
        let before = self.revoked.len();
        self.revoked.retain(|r| r.expires_at > now);
        self.revoked.len() != before
    }

    /// Whether any live entry revokes the credential (see [`RevokedSvid::revokes`]).
    pub fn is_revoked(
        &self,
        serial: &str,
        spiffe_id: &str,
        not_before: UnixTime,
        now: UnixTime,
    ) -> bool {
        self.revoked
            .iter()
            .any(|r| r.revokes(serial, spiffe_id, not_before, now))
    }

    /// The list to hold after `incoming` arrives while `self` is held. A list from an older
    /// revision (a lagging replica, a restored database) must not un-revoke anything, nor be
    /// ignored (its entries may be new to us): revocations are only ever added or expire, so
    /// the union is kept, at the higher revision.
    pub fn updated_with(&self, incoming: Self) -> Self {
        if incoming.revision >= self.revision {
            return incoming;
        }
        let mut merged = self.clone();
        for r in incoming.revoked {
            if !merged.revoked.contains(&r) {
                merged.revoked.push(r);
            }
        }
        merged
    }

    /// The Enforcer API message.
    pub fn to_pb(&self) -> ep::Revocations {
        ep::Revocations {
            revoked: self
                .revoked
                .iter()
                .map(|r| ep::Revoked {
                    serial: r.serial.clone(),
                    spiffe_id: r.spiffe_id.clone(),
                    revoked_at: r.revoked_at,
                    expires_at: r.expires_at,
                })
                .collect(),
            revision: self.revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_rev(serial: &str, id: &str, at: i64, exp: i64) -> pb::RevokedSvid {
        pb::RevokedSvid {
            serial: serial.into(),
            spiffe_id: id.into(),
            revoked_at: at,
            expires_at: exp,
        }
    }

    #[test]
    fn from_sync_drops_expired_and_empty_entries() {
        let l = RevocationList::from_sync(
            7,
            &[
                pb_rev("ab", "", 100, 200),
                pb_rev("cd", "", 100, 150),
                pb_rev("", "", 100, 300),
                pb_rev("", "spiffe://td/a", 100, 300),
            ],
            150,
        );
        assert_eq!(l.revision, 7);
        let kept: Vec<(&str, &str)> = l
            .revoked
            .iter()
            .map(|r| (r.serial.as_str(), r.spiffe_id.as_str()))
            .collect();
        assert_eq!(kept, [("ab", ""), ("", "spiffe://td/a")]);
    }

    #[test]
    fn semantics_match_the_server() {
        let l = RevocationList::from_sync(
            1,
            &[
                pb_rev("ab01", "", 100, 1000),
                pb_rev("", "spiffe://td/a", 500, 2000),
            ],
            0,
        );
        // By serial: that certificate only, whatever its ID or age, until expires_at.
        assert!(l.is_revoked("ab01", "spiffe://td/x", 900, 999));
        assert!(!l.is_revoked("ab01", "spiffe://td/x", 900, 1000));
        assert!(!l.is_revoked("ab02", "spiffe://td/x", 50, 200));
        // By SPIFFE ID: every SVID of it with notBefore <= revoked_at; later ones are valid.
        assert!(l.is_revoked("ff", "spiffe://td/a", 499, 600));
        assert!(l.is_revoked("ff", "spiffe://td/a", 500, 600));
        assert!(!l.is_revoked("ff", "spiffe://td/a", 501, 600));
        assert!(!l.is_revoked("ff", "spiffe://td/b", 100, 600));
        assert!(!l.is_revoked("ff", "spiffe://td/a", 100, 2000));
        // Both named: either condition revokes.
        let both = RevokedSvid {
            serial: "cc".into(),
            spiffe_id: "spiffe://td/c".into(),
            revoked_at: 500,
            expires_at: 2000,
        };
        assert!(both.revokes("cc", "spiffe://td/other", 900, 600));
        assert!(both.revokes("dd", "spiffe://td/c", 400, 600));
        assert!(!both.revokes("dd", "spiffe://td/c", 900, 600));
    }

    #[test]
    fn an_older_revision_never_unrevokes() {
        let held = RevocationList::from_sync(5, &[pb_rev("aa", "", 1, 100)], 0);
        let newer = RevocationList::from_sync(6, &[pb_rev("bb", "", 1, 100)], 0);
        assert_eq!(held.updated_with(newer.clone()), newer);
        let older =
            RevocationList::from_sync(4, &[pb_rev("aa", "", 1, 100), pb_rev("cc", "", 1, 100)], 0);
        let merged = held.updated_with(older);
        assert_eq!(merged.revision, 5);
        let serials: Vec<&str> = merged.revoked.iter().map(|r| r.serial.as_str()).collect();
        assert_eq!(serials, ["aa", "cc"]);
    }
}
