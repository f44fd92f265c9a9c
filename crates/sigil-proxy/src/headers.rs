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

/// Whether a header name carries identity or origin, in any `_`/`-` spelling.
fn is_identity(name: &str) -> bool {
    let n: String = name
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    IDENTITY_EXACT.contains(&n.as_str()) || IDENTITY_PREFIXES.iter().any(|p| n.starts_with(p))
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

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, those named in `Connection` too (RFC 9110 §7.6.1).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for n in named
        .iter()
        .map(String::as_str)
        .chain(HOP_BY_HOP.iter().copied())
    {
        h.remove(n);
    }
}

/// The verified caller, as the upstream is told.
pub struct Identity<'a> {
    /// The caller's SPIFFE ID.
    pub spiffe_id: &'a str,
    /// base64url (unpadded) SHA-256 of the caller's certificate.
    pub x5t_s256: &'a str,
    /// The proxy's own SPIFFE ID, for XFCC's `By` (none: `By` left out).
    pub proxy_id: Option<&'a str>,
    /// Whether to set `X-Forwarded-Client-Cert`.
    pub xfcc: bool,
}

/// Sets the identity headers (after [`strip_identity`]).
pub fn set_identity(h: &mut HeaderMap, id: &Identity<'_>) {
    if let Ok(v) = HeaderValue::from_str(id.spiffe_id) {
        h.insert(HeaderName::from_static(SPIFFE_ID_HEADER), v);
    }
    if id.xfcc
        && let Some(v) = xfcc(id)
    {
        h.insert(HeaderName::from_static(XFCC_HEADER), v);
    }
}

/// Envoy's format: `By=<proxy URI SAN>;Hash=<hex SHA-256 of the client cert DER>;URI=<client
/// URI SAN>` (SPIFFE IDs hold no `;`, `,` or `"`, so no quoting is needed).
fn xfcc(id: &Identity<'_>) -> Option<HeaderValue> {
    use base64::Engine;
    // A DPoP client has no certificate to name.
    if id.x5t_s256.is_empty() {
        return None;
    }
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id.x5t_s256)
        .ok()?;
    let mut v = String::new();
    if let Some(by) = id.proxy_id {
        v.push_str("By=");
        v.push_str(by);
        v.push(';');
    }
    v.push_str("Hash=");
    v.push_str(&hex::encode(hash));
    v.push_str(";URI=");
    v.push_str(id.spiffe_id);
    HeaderValue::from_str(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_hop_by_hop_headers_are_stripped_in_every_spelling() {
        let mut h = HeaderMap::new();
        for (k, v) in [
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
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn xfcc_is_in_envoys_format() {
        let mut h = HeaderMap::new();
        // SHA-256 of "" in base64url.
        let id = Identity {
            spiffe_id: "spiffe://td/agent",
            x5t_s256: "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU",
            proxy_id: Some("spiffe://td/proxy"),
            xfcc: true,
        };
        set_identity(&mut h, &id);
        assert_eq!(
            h[XFCC_HEADER],
            "By=spiffe://td/proxy;Hash=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855;URI=spiffe://td/agent"
        );
        assert_eq!(h[SPIFFE_ID_HEADER], "spiffe://td/agent");
        let mut h = HeaderMap::new();
        set_identity(&mut h, &Identity { xfcc: false, ..id });
        assert!(!h.contains_key(XFCC_HEADER));
    }
}
