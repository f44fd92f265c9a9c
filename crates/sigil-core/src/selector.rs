//! Selectors: the properties of a caller (its uid, its executable...) that entries match on.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The selector types sigil knows. Anything else is refused, so a typo never silently matches
/// nothing (or everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SelectorKind {
    /// `unix:uid:<decimal uid>`
    UnixUid,
    /// `unix:gid:<decimal gid>`
    UnixGid,
    /// `unix:user:<user name>`
    UnixUser,
    /// `unix:group:<group name>`
    UnixGroup,
    /// `unix:path:<absolute path of the executable>`
    UnixPath,
    /// `unix:sha256:<lowercase hex SHA-256 of the executable>`
    UnixSha256,
}

impl SelectorKind {
    const ALL: [SelectorKind; 6] = [
        Self::UnixUid,
        Self::UnixGid,
        Self::UnixUser,
        Self::UnixGroup,
        Self::UnixPath,
        Self::UnixSha256,
    ];

    /// The selector type and sub-type, e.g. `unix:uid`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::UnixUid => "unix:uid",
            Self::UnixGid => "unix:gid",
            Self::UnixUser => "unix:user",
            Self::UnixGroup => "unix:group",
            Self::UnixPath => "unix:path",
            Self::UnixSha256 => "unix:sha256",
        }
    }

    fn validate(self, value: &str) -> Result<(), SelectorError> {
        let ok = match self {
            Self::UnixUid | Self::UnixGid => {
                value.len() <= 10
                    && value.bytes().all(|b| b.is_ascii_digit())
                    && value.parse::<u32>().is_ok()
            }
            Self::UnixUser | Self::UnixGroup => {
                !value.is_empty()
                    && value.len() <= 256
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
            }
            Self::UnixPath => {
                value.starts_with('/')
                    && value.len() <= 4096
                    && !value.chars().any(|c| c == '\0' || c.is_control())
            }
            Self::UnixSha256 => {
                value.len() == 64
                    && value
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(SelectorError::BadValue {
                kind: self.prefix(),
                value: value.chars().take(80).collect(),
            })
        }
    }
}

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    #[error(
        "unknown selector type {0:?} (known: unix:uid, unix:gid, unix:user, unix:group, unix:path, unix:sha256)"
    )]
    UnknownType(String),
    #[error("invalid value {value:?} for selector {kind}")]
    BadValue { kind: &'static str, value: String },
}

/// One selector, e.g. `unix:uid:1000`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: SelectorKind,
    value: String,
}

impl Selector {
    /// A validated selector.
    pub fn new(kind: SelectorKind, value: impl Into<String>) -> Result<Self, SelectorError> {
        let value = value.into();
        kind.validate(&value)?;
        Ok(Self { kind, value })
    }

    /// Parses `type:subtype:value`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        for kind in SelectorKind::ALL {
            if let Some(value) = s
                .strip_prefix(kind.prefix())
                .and_then(|rest| rest.strip_prefix(':'))
            {
                return Self::new(kind, value);
            }
        }
        let ty = match s.match_indices(':').nth(1) {
            Some((i, _)) => s.get(..i).unwrap_or(s),
            None => s,
        };
        Err(SelectorError::UnknownType(ty.chars().take(80).collect()))
    }

    /// The selector's type.
    pub fn kind(&self) -> SelectorKind {
        self.kind
    }

    /// The selector's value (after `type:subtype:`).
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.prefix(), self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_types() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!((s.kind(), s.value()), (SelectorKind::UnixUid, "1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        let p = Selector::parse("unix:path:/usr/bin/python3:x").unwrap();
        assert_eq!(p.value(), "/usr/bin/python3:x");
        let h = "a".repeat(64);
        assert!(Selector::parse(&format!("unix:sha256:{h}")).is_ok());
        assert!(Selector::parse("unix:user:www-data").is_ok());
        assert!(Selector::parse("unix:gid:0").is_ok());
    }

    #[test]
    fn rejects_unknown_types_and_bad_values() {
        assert_eq!(
            Selector::parse("k8s:ns:default"),
            Err(SelectorError::UnknownType("k8s:ns".into()))
        );
        assert!(matches!(
            Selector::parse("unix"),
            Err(SelectorError::UnknownType(_))
        ));
        assert!(matches!(
            Selector::parse("unix:pid:1"),
            Err(SelectorError::UnknownType(_))
        ));
        for bad in [
            "unix:uid:",
            "unix:uid:-1",
            "unix:uid:4294967296",
            "unix:uid:+5",
            "unix:gid:abc",
            "unix:user:",
            "unix:user:a b",
            "unix:path:relative/bin",
            "unix:path:/bin/\nx",
            "unix:sha256:ABCDEF",
            &format!("unix:sha256:{}", "A".repeat(64)),
            &format!("unix:sha256:{}", "a".repeat(63)),
        ] {
            assert!(
                matches!(Selector::parse(bad), Err(SelectorError::BadValue { .. })),
                "{bad}"
            );
        }
    }
}
