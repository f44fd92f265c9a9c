//! The revocations in force, as the local agent streams them (`sigil.agent.v1.Enforcer`):
//! a revoked certificate by serial, or every SVID of a SPIFFE ID issued at or before the
//! revocation — the same rule the trust authority applies (`not_before <= revoked_at`).
use std::collections::{HashMap, HashSet};

use sigil_pki::VerifiedX509Svid;
use sigil_proto::enforcer as pb;

/// An immutable revocation list; swapped whole on every update.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revocations {
    serials: HashSet<String>,
    /// SPIFFE ID → the latest revocation time of that ID.
    ids: HashMap<String, i64>,
    /// The agent's revision of this list.
    pub revision: i64,
}

impl Revocations {
    /// Builds the list from the agent's message, dropping what expired before `now`.
    pub fn from_proto(msg: &pb::Revocations, now: i64) -> Self {
        let mut out = Self {
            revision: msg.revision,
            ..Self::default()
        };
        for r in msg.revoked.iter().filter(|r| r.expires_at > now) {
            if !r.serial.is_empty() {
                out.serials.insert(r.serial.to_ascii_lowercase());
            }
            if !r.spiffe_id.is_empty() && r.serial.is_empty() {
                let at = out.ids.entry(r.spiffe_id.clone()).or_insert(r.revoked_at);
                *at = (*at).max(r.revoked_at);
            }
        }
        out
    }

    /// Whether `svid` is revoked.
    pub fn is_revoked(&self, svid: &VerifiedX509Svid) -> bool {
        self.serials.contains(&svid.serial)
            || self
                .ids
                .get(svid.spiffe_id.as_str())
                .is_some_and(|at| svid.not_before <= *at)
    }

    /// The SPIFFE IDs revoked as a whole (every SVID issued up to the revocation).
    pub fn revoked_ids(&self) -> impl Iterator<Item = &str> {
        self.ids.keys().map(String::as_str)
    }

    /// How many revocations are in force.
    pub fn len(&self) -> usize {
        self.serials.len() + self.ids.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        }
    }

    #[test]
    fn by_serial_and_by_id_issued_before() {
        let msg = pb::Revocations {
            revision: 3,
            revoked: vec![
                pb::Revoked {
                    serial: "0AB1".into(),
                    spiffe_id: "spiffe://td/a".into(),
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
        assert!(r.is_revoked(&svid("spiffe://td/a", "0ab1", 50)));
        // A revocation by serial does not take the rest of that ID with it.
        assert!(!r.is_revoked(&svid("spiffe://td/a", "0ab2", 50)));
        // By ID: everything issued at or before the revocation, nothing after.
        assert!(r.is_revoked(&svid("spiffe://td/b", "01", 999)));
        assert!(r.is_revoked(&svid("spiffe://td/b", "01", 1000)));
        assert!(!r.is_revoked(&svid("spiffe://td/b", "02", 1001)));
        // Expired revocations are dropped.
        assert!(!r.is_revoked(&svid("spiffe://td/c", "dead", 5)));
        assert_eq!(r.len(), 2);
    }
}
