//! Identity reaches the upstream only from the proxy. Every header a client could use to
//! claim an identity or an origin (`x-sigil-*`, `X-Forwarded-Client-Cert`, `Forwarded`,
//! `X-Forwarded-*`, `X-Real-IP`, `X-Client-Cert`, ...), in any spelling an upstream may
//! normalize to it (`x_sigil_spiffe_id`: CGI, WSGI and nginx map `_` and `-` alike), is
//! removed; then the proxy sets its own, including Envoy's `X-Forwarded-Client-Cert` for
//! upstreams built to sit behind Envoy or Istio.
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The header carrying the caller's SPIFFE ID to the upstream.
pub const SPIFFE_ID_HEADER: &str = "x-sigil-spiffe-id";
/// Envoy's client certificate header.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// Header names (lower case, `-` for `_`) that carry identity or origin, exactly.
const IDENTITY_EXACT: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "x-original-forwarded-for",
    "true-client-ip",
    "client-ip",
    "x-remote-user",
    "remote-user",
    "x-authenticated-user",
    "x-user",
    "x-client-cert",
    "x-ssl-client-cert",
    "ssl-client-cert",
];

/// Header name prefixes that carry identity or origin.
const IDENTITY_PREFIXES: &[&str] = &[
    "x-sigil-",
    "x-forwarded-",
    "x-envoy-",
    "x-ssl-client-",
    "x-client-cert-",
];

/// Whether a header name carries identity or origin, in any `_`/`-` spelling. Compared in
/// place (it runs on every header of every request): a `HeaderName` is lower case already,
/// so only `_` is read as `-`.
fn is_identity(name: &str) -> bool {
    let name = name.as_bytes();
    let spelled = |pattern: &str, n: &[u8]| {
        n.len() == pattern.len()
            && n.iter().zip(pattern.bytes()).all(|(&c, p)| {
                if c == b'_' {
                    p == b'-'
                } else {
                    c.to_ascii_lowercase() == p
                }
            })
    };
    IDENTITY_EXACT.iter().any(|p| spelled(p, name))
        || IDENTITY_PREFIXES
            .iter()
            .any(|p| name.get(..p.len()).is_some_and(|head| spelled(p, head)))
}

/// Removes every identity or origin header the client sent.
pub fn strip_identity(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| is_identity(k.as_str()))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), as names: removing by `&str` would parse each
/// name again, twice per request. A `static`, not a `const`: a `const` array is built and
/// dropped again at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The place of `name` in [`HOP_BY_HOP`], if it is there: one `match` on the name, not
/// nine comparisons of names (it runs on every header of every request and answer).
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    let i = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP.get(i), Some(name));
    Some(i)
}

/// Removes hop-by-hop headers, those named in `Connection` too (RFC 9110 §7.6.1).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names finds those present; only they are removed. Those named in
    // `Connection` count only with a `Connection` header, itself hop-by-hop: with none of
    // these there is nothing to remove.
    let mut present = 0u16;
    for k in h.keys() {
        if let Some(i) = hop_by_hop(k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| hop_by_hop(n).is_none())
        .collect();
    for n in &named {
        h.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
}

/// The verified caller, as the upstream is told.
pub struct Identity<'a> {
    /// The caller's SPIFFE ID.
    pub spiffe_id: &'a str,
    /// Lowercase hex SHA-256 of the caller's certificate (empty: a DPoP client without one).
    pub cert_sha256: &'a str,
    /// The proxy's own SPIFFE ID, for XFCC's `By` (none: `By` left out).
    pub proxy_id: Option<&'a str>,
    /// Whether to set `X-Forwarded-Client-Cert`.
    pub xfcc: bool,
}

const SPIFFE_ID_NAME: HeaderName = HeaderName::from_static(SPIFFE_ID_HEADER);
const XFCC_NAME: HeaderName = HeaderName::from_static(XFCC_HEADER);

/// The identity headers of one caller, built once: a connection's certificate holds for
/// every request on it, so each request only clones them (a reference count).
#[derive(Clone, Debug)]
pub struct IdentityHeaders {
    spiffe_id: Option<HeaderValue>,
    xfcc: Option<HeaderValue>,
}

impl IdentityHeaders {
    pub fn new(id: &Identity<'_>) -> Self {
        Self {
            spiffe_id: HeaderValue::from_str(id.spiffe_id).ok(),
            xfcc: id.xfcc.then(|| xfcc(id)).flatten(),
        }
    }

    /// Sets them on a request (after [`strip_identity`]).
    pub fn set(&self, h: &mut HeaderMap) {
        if let Some(v) = &self.spiffe_id {
            h.insert(SPIFFE_ID_NAME, v.clone());
        }
        if let Some(v) = &self.xfcc {
            h.insert(XFCC_NAME, v.clone());
        }
    }
}

/// Envoy's format: `By=<proxy URI SAN>;Hash=<hex SHA-256 of the client cert DER>;URI=<client
/// URI SAN>` (SPIFFE IDs hold no `;`, `,` or `"`, so no quoting is needed).
fn xfcc(id: &Identity<'_>) -> Option<HeaderValue> {
    // A DPoP client has no certificate to name.
    if id.cert_sha256.is_empty() {
        return None;
    }
    let v = match id.proxy_id {
        Some(by) => format!("By={by};Hash={};URI={}", id.cert_sha256, id.spiffe_id),
        None => format!("Hash={};URI={}", id.cert_sha256, id.spiffe_id),
    };
    HeaderValue::from_str(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header map of `pairs`, names in any case, in order.
    fn header_map(pairs: &[(&str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        h
    }

    #[test]
    fn identity_and_hop_by_hop_headers_are_stripped_in_every_spelling() {
        let mut h = header_map(&[
            ("x-sigil-spiffe-id", "spiffe://td/admin"),
            ("X-Sigil-Groups", "root"),
            ("x_sigil_spiffe_id", "spiffe://td/admin"),
            ("X-Forwarded-Client-Cert", "URI=spiffe://td/admin"),
            ("x_forwarded_client_cert", "URI=spiffe://td/admin"),
            ("Forwarded", "for=10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Host", "admin"),
            ("X-Real-IP", "10.0.0.1"),
            ("x_real_ip", "10.0.0.1"),
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn every_hop_by_hop_name_is_found_at_its_place_and_no_other_name_is() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(n), Some(i), "{n}");
        }
        for other in ["connections", "te-x", "x-upgrade", "host", "keep_alive"] {
            let n = HeaderName::from_bytes(other.as_bytes()).unwrap();
            assert_eq!(hop_by_hop(&n), None, "{other}");
        }
    }

    #[test]
    fn headers_named_in_connection_are_removed_in_any_case_and_others_kept() {
        let mut h = header_map(&[
            ("connection", "X-Secret ,Keep-Alive, , bad name"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eDp5"),
            // Near misses of identity names are not identity.
            ("x-sigil", "1"),
            ("x-forwarded", "1"),
            ("forwarded-x", "1"),
            ("x-real-ipv6", "1"),
            ("x-user-agent", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "forwarded-x",
                "x-forwarded",
                "x-real-ipv6",
                "x-sigil",
                "x-user-agent"
            ]
        );
        // Without any hop-by-hop header, nothing is removed.
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn xfcc_is_in_envoys_format() {
        let mut h = HeaderMap::new();
        // SHA-256 of "" in base64url.
        let id = Identity {
            spiffe_id: "spiffe://td/agent",
            cert_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            proxy_id: Some("spiffe://td/proxy"),
            xfcc: true,
        };
        IdentityHeaders::new(&id).set(&mut h);
        assert_eq!(
            h[XFCC_HEADER],
            "By=spiffe://td/proxy;Hash=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855;URI=spiffe://td/agent"
        );
        assert_eq!(h[SPIFFE_ID_HEADER], "spiffe://td/agent");
        let mut h = HeaderMap::new();
        IdentityHeaders::new(&Identity { xfcc: false, ..id }).set(&mut h);
        assert!(!h.contains_key(XFCC_HEADER));
        assert_eq!(h[SPIFFE_ID_HEADER], "spiffe://td/agent");
        // Without the proxy's own ID, `By` is left out; without a certificate, no XFCC.
        let mut h = HeaderMap::new();
        IdentityHeaders::new(&Identity {
            proxy_id: None,
            ..id
        })
        .set(&mut h);
        assert_eq!(
            h[XFCC_HEADER],
            "Hash=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855;URI=spiffe://td/agent"
        );
        let mut h = HeaderMap::new();
        IdentityHeaders::new(&Identity {
            cert_sha256: "",
            ..id
        })
        .set(&mut h);
        assert!(!h.contains_key(XFCC_HEADER));
    }
}
