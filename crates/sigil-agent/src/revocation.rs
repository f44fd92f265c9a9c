//! The revocation list the agent holds for local enforcers (served by the Enforcer API).
//!
//! Whether an entry revokes a credential is `sigil_core`'s rule ([`RevokedSvid::revokes`]),
//! the one the trust authority applies; this module keeps the list: from the sync stream, in
//! the cache, merged so that an older revision never un-revokes anything.
use serde::{Deserialize, Serialize};
use sigil_core::{Credential, RevokedSvid, UnixTime};
use sigil_proto::enforcer as ep;
use sigil_proto::node::v1 as pb;

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
                .map(|r| RevokedSvid {
                    serial: r.serial.clone(),
                    spiffe_id: r.spiffe_id.clone(),
                    revoked_at: r.revoked_at,
                    expires_at: r.expires_at,
                })
                .filter(RevokedSvid::names_anything)
                .collect(),
        };
        l.drop_expired(now);
        l
    }

    /// Drops entries past `expires_at`; returns whether any was dropped.
    pub fn drop_expired(&mut self, now: UnixTime) -> bool {
        let before = self.revoked.len();
        self.revoked.retain(|r| r.in_force(now));
        self.revoked.len() != before
    }

    /// Whether any entry revokes `credential` at `now` (see [`RevokedSvid::revokes`]).
    pub fn is_revoked(&self, credential: &Credential<'_>, now: UnixTime) -> bool {
        self.revoked.iter().any(|r| r.revokes(credential, now))
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
