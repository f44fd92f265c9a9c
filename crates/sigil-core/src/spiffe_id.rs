//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID specification says.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest SPIFFE ID, in bytes, that sigil accepts (the spec's interoperability limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID must start with the scheme \"spiffe://\" (lowercase)")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain may only hold lowercase letters, digits, '.', '-' and '_' (found {0:?})")]
    BadTrustDomainChar(char),
    #[error("path segment is empty (double or trailing slash)")]
    EmptySegment,
    #[error("path segment may not be '.' or '..'")]
    DotSegment,
    #[error("path may only hold letters, digits, '.', '-', '_' and '/' (found {0:?})")]
    BadPathChar(char),
}

/// A SPIFFE trust domain, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or a trust domain ID (`spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://example.org`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// A SPIFFE ID in this trust domain with `path` (must start with '/').
    pub fn id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(&format!("{SCHEME}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, validated.
    id: String,
    /// Byte offset where the path starts (the end of the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            id: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        self.id
            .get(SCHEME.len()..self.path_start)
            .unwrap_or_default()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, e.g. `/ns/prod/sa/api`; empty for a trust domain ID.
    pub fn path(&self) -> &str {
        self.id.get(self.path_start..).unwrap_or_default()
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name()
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar(c));
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // INVARIANT: a non-empty path starts with '/', because the caller split at the first '/'.
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://a-b_c.d9/ns/Prod/sa/api.v1-x_y",
            "spiffe://td/..a/a..",
        ] {
            let id = SpiffeId::new(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::new("spiffe://example.org/ns/a").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/a");
        assert!(id.is_member_of(&TrustDomain::new("example.org").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::new("example.com").unwrap()));
    }

    #[test]
    fn rejects_what_the_spec_forbids() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", SpiffeIdError::Empty),
            ("http://example.org/a", SpiffeIdError::WrongScheme),
            ("SPIFFE://example.org/a", SpiffeIdError::WrongScheme),
            ("spiffe:/example.org", SpiffeIdError::WrongScheme),
            ("spiffe://", SpiffeIdError::MissingTrustDomain),
            ("spiffe:///path", SpiffeIdError::MissingTrustDomain),
            (
                "spiffe://Example.org/a",
                SpiffeIdError::BadTrustDomainChar('E'),
            ),
            (
                "spiffe://example.org:8080/a",
                SpiffeIdError::BadTrustDomainChar(':'),
            ),
            (
                "spiffe://user@example.org/a",
                SpiffeIdError::BadTrustDomainChar('@'),
            ),
            ("spiffe://example.org/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org//a", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/../b", SpiffeIdError::DotSegment),
            ("spiffe://example.org/./b", SpiffeIdError::DotSegment),
            (
                "spiffe://example.org/a?x=1",
                SpiffeIdError::BadPathChar('?'),
            ),
            (
                "spiffe://example.org/a#frag",
                SpiffeIdError::BadPathChar('#'),
            ),
            (
                "spiffe://example.org?x=1",
                SpiffeIdError::BadTrustDomainChar('?'),
            ),
            (
                "spiffe://example.org/a%20b",
                SpiffeIdError::BadPathChar('%'),
            ),
            ("spiffe://example.org/ä", SpiffeIdError::BadPathChar('ä')),
            (long.as_str(), SpiffeIdError::TooLong),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::new(s).as_ref(), Err(want), "{s}");
        }
    }

    #[test]
    fn max_length_is_inclusive() {
        let prefix = "spiffe://td/";
        let s = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(s.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::new(&s).is_ok());
    }

    #[test]
    fn serde_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/a\"").unwrap();
        assert_eq!(id.path(), "/a");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://TD/a\"").is_err());
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://td/a\"");
    }

    #[test]
    fn trust_domain_accepts_id_form() {
        assert_eq!(TrustDomain::new("spiffe://td").unwrap().name(), "td");
        assert!(TrustDomain::new("TD").is_err());
        assert!(TrustDomain::new("").is_err());
        assert_eq!(
            TrustDomain::new("td").unwrap().id("/x").unwrap().as_str(),
            "spiffe://td/x"
        );
    }
}
