//! Reads a request path one way. Upstreams differ in how they spell a route (a trailing
//! slash, upper case, `//`, dot segments, `%2F`, `%63`, `;params`, `\`), so the proxy
//! refuses every spelling that two servers could read as different paths, and classifies
//! what is left case-insensitively and without a trailing slash: a route that any common
//! server might treat as a model route is classified as one.
use std::fmt;

/// Why a path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("request path must start with '/'")]
    NotAbsolute,
    #[error("request path has an empty segment ('//')")]
    EmptySegment,
    #[error("request path has a dot segment ('.' or '..')")]
    DotSegment,
    #[error("request path has a malformed percent-escape")]
    BadEscape,
    #[error("request path escapes a character that must appear as itself ({0:?})")]
    NeedlessEscape(char),
    #[error("request path escapes a separator or control character")]
    EscapedSeparator,
    #[error("request path holds a character servers read differently ({0:?})")]
    AmbiguousChar(char),
}

/// A request path that reads one way: `raw` as received (and forwarded), `route` the key it
/// is classified by (ASCII lower case, without a trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    raw: String,
    route: String,
}

impl RequestPath {
    /// Checks `raw` (the path of the request target, without the query).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        check(raw)?;
        let mut route = raw.to_ascii_lowercase();
        while route.len() > 1 && route.ends_with('/') {
            route.pop();
        }
        Ok(Self {
            raw: raw.to_owned(),
            route,
        })
    }

    /// The path as received.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The classification key: lower case, no trailing slash.
    pub fn route(&self) -> &str {
        &self.route
    }
}

impl fmt::Display for RequestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// The rules, shared by request paths and the paths of resource URIs: no empty or dot
/// segments (except one trailing slash), percent-escapes only for characters that need
/// them, no `\`, `;` or control characters.
pub fn check(raw: &str) -> Result<(), PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if rest.is_empty() {
        return Ok(());
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        if seg.is_empty() && segments.peek().is_some() {
            return Err(PathError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(PathError::DotSegment);
        }
        check_segment(seg)?;
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<(), PathError> {
    let bytes = seg.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
                let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
                let v = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
                if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                    return Err(PathError::NeedlessEscape(char::from(v)));
                }
                // A separator, an escape, a parameter or a control character, decoded by
                // one server and not another.
                if matches!(v, b'/' | b'\\' | b'%' | b';') || v < 0x20 || v == 0x7f {
                    return Err(PathError::EscapedSeparator);
                }
                i += 3;
            }
            b'\\' | b';' => return Err(PathError::AmbiguousChar(char::from(b))),
            c if c < 0x20 || c == 0x7f => return Err(PathError::AmbiguousChar(char::from(c))),
            _ => i += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_read_case_insensitively_without_a_trailing_slash() {
        for (raw, route) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/chat/completions/", "/v1/chat/completions"),
            ("/V1/CHAT/COMPLETIONS", "/v1/chat/completions"),
            ("/v1/models/", "/v1/models"),
            ("/", "/"),
            ("/v1/files/a%20b", "/v1/files/a%20b"),
        ] {
            let p = RequestPath::parse(raw).unwrap();
            assert_eq!((p.raw(), p.route()), (raw, route));
        }
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        for (raw, want) in [
            ("v1/chat", PathError::NotAbsolute),
            ("//v1/chat/completions", PathError::EmptySegment),
            ("/v1//chat/completions", PathError::EmptySegment),
            ("/v1/chat/completions//", PathError::EmptySegment),
            ("/v1/./chat/completions", PathError::DotSegment),
            ("/v1/chat/../chat/completions", PathError::DotSegment),
            ("/v1/chat/..", PathError::DotSegment),
            ("/v1/chat/%63ompletions", PathError::NeedlessEscape('c')),
            ("/v1/chat%2Fcompletions", PathError::EscapedSeparator),
            ("/v1/chat%2fcompletions", PathError::EscapedSeparator),
            ("/v1/chat/%2e%2e/x", PathError::NeedlessEscape('.')),
            ("/v1/chat%5Ccompletions", PathError::EscapedSeparator),
            ("/v1/chat%252Fcompletions", PathError::EscapedSeparator),
            ("/v1/chat%00", PathError::EscapedSeparator),
            ("/v1/chat/completions;x=1", PathError::AmbiguousChar(';')),
            ("/v1\\chat", PathError::AmbiguousChar('\\')),
            ("/v1/chat%2", PathError::BadEscape),
            ("/v1/chat%zz", PathError::BadEscape),
        ] {
            assert_eq!(RequestPath::parse(raw), Err(want), "{raw}");
        }
    }
}
