//! The revocations in force, as the local agent streams them (`sigil.agent.v1.Enforcer`).
//! Whether one revokes a client is `sigil_core`'s rule, the one the trust authority applies.
use sigil_core::{Credential, RevocationSet, RevokedSvid, UnixTime};
use sigil_pki::VerifiedX509Svid;
use sigil_proto::enforcer as pb;

/// An immutable revocation list; swapped whole on every update.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revocations {
    set: RevocationSet,
    /// When the list arrived: what expired before then was dropped, and the rest stays in
    /// force until the next list (a revocation outlives every credential it concerns).
    as_of: UnixTime,
    /// The agent's revision of this list.
    pub revision: i64,
}

impl Revocations {
    /// Builds the list from the agent's message, dropping what expired before `now`.
    pub fn from_proto(msg: &pb::Revocations, now: UnixTime) -> Self {
        let revoked: Vec<RevokedSvid> = msg
            .revoked
            .iter()
            .map(|r| RevokedSvid {
                serial: r.serial.to_ascii_lowercase(),
                spiffe_id: r.spiffe_id.clone(),
                revoked_at: r.revoked_at,
                expires_at: r.expires_at,
            })
            .collect();
        Self {
            set: RevocationSet::new(revoked.iter().filter(|r| r.in_force(now))),
            as_of: now,
            revision: msg.revision,
        }
    }

    /// Whether `svid` is revoked.
    pub fn is_revoked(&self, svid: &VerifiedX509Svid) -> bool {
        let credential = Credential {
            serial: &svid.serial,
            spiffe_id: svid.spiffe_id.as_str(),
            not_before: svid.not_before,
        };
        self.set.is_revoked(&credential, self.as_of)
    }

    /// Whether the certificate with this serial (lowercase hex) is revoked by serial.
    pub fn revokes_serial(&self, serial: &str) -> bool {
        let credential = Credential {
            serial,
            spiffe_id: "",
            not_before: i64::MAX,
        };
        self.set.is_revoked(&credential, self.as_of)
    }

    /// The SPIFFE IDs revoked as a whole (every SVID issued up to the revocation).
    pub fn revoked_ids(&self) -> impl Iterator<Item = &str> {
        self.set.revoked_ids()
    }

    /// How many revocations are in force.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_core::SpiffeId;

    fn svid(id: &str, serial: &str, not_before: i64) -> VerifiedX509Svid {
        VerifiedX509Svid {
            spiffe_id: SpiffeId::new(id).unwrap(),
            serial: serial.into(),
            not_before,
            not_after: not_before + 3600,
            sha256: String::new(),
            x5t_s256: String::new(),
            dns_names: Vec::new(),
            public_key: Vec::new(),
        }
    }

    #[test]
    fn from_the_agents_message() {
        let msg = pb::Revocations {
            revision: 3,
            revoked: vec![
                pb::Revoked {
                    serial: "0AB1".into(),
                    spiffe_id: String::new(),
                    revoked_at: 100,
                    expires_at: 5000,
                },
                pb::Revoked {
                    serial: String::new(),
                    spiffe_id: "spiffe://td/b".into(),
                    revoked_at: 1000,
                    expires_at: 5000,
                },
                pb::Revoked {
                    serial: "dead".into(),
                    spiffe_id: "spiffe://td/c".into(),
                    revoked_at: 10,
                    expires_at: 20,
                },
            ],
        };
        let r = Revocations::from_proto(&msg, 500);
        assert_eq!(r.revision, 3);
        // Serials compared in lowercase, as the trust authority stores them.
        assert!(r.is_revoked(&svid("spiffe://td/a", "0ab1", 50)));
        // A revocation by serial does not take the rest of that ID with it.
        assert!(!r.is_revoked(&svid("spiffe://td/a", "0ab2", 50)));
        // By ID: everything issued at or before the revocation, nothing after.
        assert!(r.is_revoked(&svid("spiffe://td/b", "01", 999)));
        assert!(r.is_revoked(&svid("spiffe://td/b", "01", 1000)));
        assert!(!r.is_revoked(&svid("spiffe://td/b", "02", 1001)));
        // Revocations expired when the list arrived are dropped.
        assert!(!r.is_revoked(&svid("spiffe://td/c", "dead", 5)));
        assert_eq!(r.len(), 2);
    }
}
