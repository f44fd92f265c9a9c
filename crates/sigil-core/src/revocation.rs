//! When a credential counts as revoked: the one rule the trust authority, the agent and the
//! proxy apply.
//!
//! A revocation names a serial (an X.509-SVID's, lowercase hex, or a token's `jti`), a
//! SPIFFE ID, or both, and is in force until its `expires_at`, after which every credential
//! it could concern has expired. A credential is revoked at `now` while a revocation in force
//! names its serial, or names its SPIFFE ID and was made at or after the credential's
//! `not_before`: revoking an ID (evicting a node revokes the node's ID) kills every credential
//! of it issued up to that moment, and later ones are valid.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::UnixTime;

/// The parts of a credential the revocation rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential<'a> {
    /// Its serial (lowercase hex for an X.509-SVID) or `jti`.
    pub serial: &'a str,
    /// Its SPIFFE ID.
    pub spiffe_id: &'a str,
    /// When it became valid (an X.509-SVID's `notBefore`).
    pub not_before: UnixTime,
}

/// One revocation, as the trust authority records it and sends it to every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedSvid {
    /// The revoked serial or `jti`, compared exactly; empty when it names a SPIFFE ID only.
    pub serial: String,
    /// The revoked SPIFFE ID; empty when it names a serial only.
    pub spiffe_id: String,
    /// When it was made.
    pub revoked_at: UnixTime,
    /// After this it concerns no live credential and is dropped.
    pub expires_at: UnixTime,
}

impl RevokedSvid {
    /// Whether it is still in force at `now`.
    pub fn in_force(&self, now: UnixTime) -> bool {
        now < self.expires_at
    }

    /// Whether it names anything (a serial or a SPIFFE ID); one that does not revokes nothing.
    pub fn names_anything(&self) -> bool {
        !(self.serial.is_empty() && self.spiffe_id.is_empty())
    }

    /// Whether it revokes `credential` at `now`.
    pub fn revokes(&self, credential: &Credential<'_>, now: UnixTime) -> bool {
        self.in_force(now)
            && (self.revokes_serial(credential.serial)
                || self.revokes_issued(credential.spiffe_id, credential.not_before))
    }

    fn revokes_serial(&self, serial: &str) -> bool {
        !self.serial.is_empty() && self.serial == serial
    }

    fn revokes_issued(&self, spiffe_id: &str, not_before: UnixTime) -> bool {
        !self.spiffe_id.is_empty() && self.spiffe_id == spiffe_id && self.revoked_at >= not_before
    }
}

/// Revocations indexed by serial and by SPIFFE ID, for a check on every handshake or
/// request that does not grow with the length of the list. Same answers as asking each
/// [`RevokedSvid::revokes`] in turn.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationSet {
    /// Serial → the latest `expires_at` of the revocations naming it.
    serials: HashMap<String, UnixTime>,
    /// SPIFFE ID → (`revoked_at`, `expires_at`) of each revocation naming it.
    ids: HashMap<String, Vec<(UnixTime, UnixTime)>>,
}

impl RevocationSet {
    /// Indexes `revocations`; ones naming nothing are left out.
    pub fn new<'a>(revocations: impl IntoIterator<Item = &'a RevokedSvid>) -> Self {
        let mut set = Self::default();
        for r in revocations {
            set.insert(r);
        }
        set
    }

    /// Adds one revocation.
    pub fn insert(&mut self, r: &RevokedSvid) {
        if !r.serial.is_empty() {
            let until = self.serials.entry(r.serial.clone()).or_insert(r.expires_at);
            *until = (*until).max(r.expires_at);
        }
        if !r.spiffe_id.is_empty() {
            self.ids
                .entry(r.spiffe_id.clone())
                .or_default()
                .push((r.revoked_at, r.expires_at));
        }
    }

    /// Whether a revocation of the set revokes `credential` at `now`.
    pub fn is_revoked(&self, credential: &Credential<'_>, now: UnixTime) -> bool {
        self.serials
            .get(credential.serial)
            .is_some_and(|until| now < *until)
            || self.ids.get(credential.spiffe_id).is_some_and(|made| {
                made.iter()
                    .any(|(revoked_at, until)| now < *until && *revoked_at >= credential.not_before)
            })
    }

    /// The SPIFFE IDs revoked as a whole (every credential issued up to the revocation).
    pub fn revoked_ids(&self) -> impl Iterator<Item = &str> {
        self.ids.keys().map(String::as_str)
    }

    /// How many serials and SPIFFE IDs are revoked.
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

    fn rev(serial: &str, id: &str, at: i64, exp: i64) -> RevokedSvid {
        RevokedSvid {
            serial: serial.into(),
            spiffe_id: id.into(),
            revoked_at: at,
            expires_at: exp,
        }
    }

    fn cred<'a>(serial: &'a str, spiffe_id: &'a str, not_before: i64) -> Credential<'a> {
        Credential {
            serial,
            spiffe_id,
            not_before,
        }
    }

    /// Asks both the single revocations and the set, and checks they agree.
    fn revoked(list: &[RevokedSvid], c: Credential<'_>, now: i64) -> bool {
        let one_by_one = list.iter().any(|r| r.revokes(&c, now));
        assert_eq!(
            RevocationSet::new(list).is_revoked(&c, now),
            one_by_one,
            "{c:?} at {now}"
        );
        one_by_one
    }

    #[test]
    fn by_serial_by_id_issued_before_and_until_expiry() {
        let l = [
            rev("ab01", "", 100, 1000),
            rev("", "spiffe://td/a", 500, 2000),
        ];
        // By serial: that certificate only, whatever its ID or age, until expires_at.
        assert!(revoked(&l, cred("ab01", "spiffe://td/x", 900), 999));
        assert!(!revoked(&l, cred("ab01", "spiffe://td/x", 900), 1000));
        assert!(!revoked(&l, cred("ab02", "spiffe://td/x", 50), 200));
        // By SPIFFE ID: every SVID of it with notBefore <= revoked_at; later ones are valid.
        assert!(revoked(&l, cred("ff", "spiffe://td/a", 499), 600));
        assert!(revoked(&l, cred("ff", "spiffe://td/a", 500), 600));
        assert!(!revoked(&l, cred("ff", "spiffe://td/a", 501), 600));
        assert!(!revoked(&l, cred("ff", "spiffe://td/b", 100), 600));
        assert!(!revoked(&l, cred("ff", "spiffe://td/a", 100), 2000));
    }

    #[test]
    fn a_revocation_naming_both_revokes_by_either() {
        let both = [rev("cc", "spiffe://td/c", 500, 2000)];
        assert!(revoked(&both, cred("cc", "spiffe://td/other", 900), 600));
        assert!(revoked(&both, cred("dd", "spiffe://td/c", 400), 600));
        assert!(!revoked(&both, cred("dd", "spiffe://td/c", 900), 600));
    }

    #[test]
    fn a_revocation_naming_nothing_revokes_nothing() {
        let none = [rev("", "", 500, 2000)];
        assert!(!none[0].names_anything());
        assert!(!revoked(&none, cred("", "", 0), 600));
        assert!(RevocationSet::new(&none).is_empty());
    }

    #[test]
    fn the_set_keeps_every_revocation_of_an_id_and_the_latest_expiry_of_a_serial() {
        let l = [
            rev("aa", "", 1, 100),
            rev("aa", "", 1, 300),
            rev("", "spiffe://td/a", 50, 5000),
            rev("", "spiffe://td/a", 900, 1000),
        ];
        assert!(revoked(&l, cred("aa", "spiffe://td/x", 0), 200));
        // The later revocation of the ID covers more, until it expires.
        assert!(revoked(&l, cred("01", "spiffe://td/a", 800), 999));
        assert!(!revoked(&l, cred("01", "spiffe://td/a", 800), 1000));
        assert!(revoked(&l, cred("01", "spiffe://td/a", 40), 1000));
        let set = RevocationSet::new(&l);
        assert_eq!(set.len(), 2);
        assert_eq!(set.revoked_ids().collect::<Vec<_>>(), ["spiffe://td/a"]);
    }

    #[test]
    fn serde_field_names_are_the_cache_format() {
        let r = rev("ab", "spiffe://td/a", 1, 2);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"serial":"ab","spiffe_id":"spiffe://td/a","revoked_at":1,"expires_at":2}"#
        );
        assert_eq!(serde_json::from_str::<RevokedSvid>(&json).unwrap(), r);
    }
}
