//! First step of the request path: what the head alone decides. A request is admitted
//! only when it reads one way: unambiguous framing, a path with one spelling, a body the
//! proxy can read as the upstream will (no content coding, UTF-8 or no charset), at most
//! one MCP session id.
use http::HeaderMap;
use http::header::{self, HeaderValue};

use crate::deny::Deny;
use crate::path::RequestPath;
use crate::session::SESSION_HEADER;

/// What the head says, read one way.
pub(crate) struct Admitted {
    pub path: RequestPath,
    /// The body is declared JSON (`application/json` or `*/*+json`).
    pub json_declared: bool,
    /// The MCP session the request continues, if any.
    pub session: Option<String>,
}

/// Checks the request head.
pub(crate) fn admit(parts: &http::request::Parts) -> Result<Admitted, Deny> {
    let h = &parts.headers;
    framing(h)?;
    let path =
        RequestPath::parse(parts.uri.path()).map_err(|e| Deny::bad_request(e.to_string()))?;
    if let Some(coding) = h.get(header::CONTENT_ENCODING)
        && !coding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(Deny::unsupported_media(
            "request bodies with a Content-Encoding are not accepted (send it unencoded)",
        ));
    }
    let json_declared = content_type(h)?;
    let session = one(h, SESSION_HEADER)?
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b)))
                .map(str::to_owned)
                .ok_or_else(|| Deny::bad_request("Mcp-Session-Id must be visible ASCII"))
        })
        .transpose()?;
    Ok(Admitted {
        path,
        json_declared,
        session,
    })
}

/// Ambiguous framing is how requests are smuggled past a proxy: refuse, never guess.
fn framing(h: &HeaderMap) -> Result<(), Deny> {
    let te = h.get_all(header::TRANSFER_ENCODING).iter().count();
    if (te > 0 && h.contains_key(header::CONTENT_LENGTH))
        || h.get_all(header::CONTENT_LENGTH).iter().count() > 1
    {
        return Err(Deny::bad_request(
            "ambiguous message framing (Content-Length with Transfer-Encoding)",
        ));
    }
    if te > 1
        || h.get(header::TRANSFER_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        return Err(Deny::bad_request(
            "Transfer-Encoding other than a single \"chunked\" is not accepted",
        ));
    }
    Ok(())
}

/// At most one `name` header.
fn one<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a HeaderValue>, Deny> {
    let mut all = h.get_all(name).iter();
    match (all.next(), all.next()) {
        (v, None) => Ok(v),
        _ => Err(Deny::bad_request(format!("more than one {name} header"))),
    }
}

/// Whether the body is declared JSON; refuses a charset other than UTF-8 (an upstream that
/// decodes by the declared charset would read other keys than the proxy).
fn content_type(h: &HeaderMap) -> Result<bool, Deny> {
    let Some(v) = one(h, "content-type")? else {
        return Ok(false);
    };
    let unreadable = || Deny::unsupported_media("Content-Type could not be read");
    let m: mime::Mime = v
        .to_str()
        .map_err(|_| unreadable())?
        .parse()
        .map_err(|_| unreadable())?;
    for (name, value) in m.params() {
        if name == mime::CHARSET {
            let cs = value.as_str();
            if !(cs.eq_ignore_ascii_case("utf-8") || cs.eq_ignore_ascii_case("utf8")) {
                return Err(Deny::unsupported_media(format!(
                    "charset {cs:?} is not accepted: send UTF-8"
                )));
            }
        }
    }
    Ok(m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method("POST")
            .uri("/v1/chat/completions");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_utf8_unencoded_bodies_are_admitted() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=\"UTF-8\"",
            "application/vnd.api+json",
            "text/plain; charset=utf8",
        ] {
            assert!(admit(&head(&[("content-type", ok)])).is_ok(), "{ok}");
        }
        assert!(
            admit(&head(&[("content-type", "application/json")]))
                .unwrap()
                .json_declared
        );
        assert!(admit(&head(&[("content-type", "application/x-ndjson")])).is_ok());
        for bad in [
            "application/json; charset=utf-7",
            "application/json; charset=utf-16le",
            "application/json; charset=iso-8859-1",
            "application/json; charset=utf-8; charset=utf-7",
            "not a type",
        ] {
            let d = admit(&head(&[("content-type", bad)])).err().unwrap();
            assert_eq!(d.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
        for coding in ["gzip", "deflate", "br", "identity, gzip"] {
            let d = admit(&head(&[("content-encoding", coding)])).err().unwrap();
            assert_eq!(
                d.status,
                http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{coding}"
            );
        }
        assert!(admit(&head(&[("content-encoding", "identity")])).is_ok());
        let two = head(&[
            ("content-type", "application/json"),
            ("content-type", "text/plain"),
        ]);
        assert!(admit(&two).is_err());
    }

    #[test]
    fn framing_and_sessions_read_one_way() {
        assert!(admit(&head(&[("transfer-encoding", "chunked")])).is_ok());
        for bad in [
            &[("transfer-encoding", "chunked"), ("content-length", "3")][..],
            &[("transfer-encoding", "gzip, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("content-length", "3"), ("content-length", "3")],
            &[("mcp-session-id", "a"), ("mcp-session-id", "b")],
            &[("mcp-session-id", "")],
        ] {
            assert!(admit(&head(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(
            admit(&head(&[("mcp-session-id", "s-1")]))
                .unwrap()
                .session
                .as_deref(),
            Some("s-1")
        );
    }
}
