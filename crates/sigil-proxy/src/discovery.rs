//! OAuth discovery for clients of the proxy (the MCP authorization spec): the protected
//! resource metadata (RFC 9728) at `/.well-known/oauth-protected-resource`, and the
//! `WWW-Authenticate` challenges of a 401 that point to it (RFC 6750 §3, RFC 9728 §5.1,
//! RFC 9449 §7.1).
use http::header::{HeaderName, HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, StatusCode};
use hyper::body::Incoming;

use crate::ProxyConfig;
use crate::deny::Challenge;
use crate::respond::{Body, full};

/// Where the metadata is served.
pub(crate) const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// The metadata document: this resource, its authorization server (the trust authority),
/// how tokens are presented and bound.
pub(crate) fn metadata(
    cfg: &ProxyConfig,
    req: &Request<Incoming>,
    base: Option<&str>,
) -> http::Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = http::Response::new(full(String::new()));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut doc = serde_json::json!({
        "resource": base,
        "authorization_servers": [cfg.issuer],
        "bearer_methods_supported": ["header"],
        "tls_client_certificate_bound_access_tokens": true,
        "resource_name": cfg.audience,
    });
    if cfg.dpop
        && let Some(o) = doc.as_object_mut()
    {
        o.insert(
            "dpop_signing_alg_values_supported".into(),
            serde_json::json!(sigil_pki::DPOP_ALGORITHMS),
        );
        o.insert(
            "dpop_bound_access_tokens_required".into(),
            serde_json::json!(false),
        );
    }
    let mut r = http::Response::new(full(doc.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    r
}

/// Sets the 401's challenges: `Bearer` with the resource metadata URL (and the error when a
/// token was sent), and with DPoP on, `DPoP` with the accepted algorithms (and a nonce to
/// retry with, when one is required).
pub(crate) fn challenge(cfg: &ProxyConfig, base: Option<&str>, c: &Challenge, h: &mut HeaderMap) {
    let metadata = base.map(|b| format!("{b}{METADATA_PATH}"));
    let mut bearer = String::from("Bearer");
    let mut params = Vec::new();
    if let Some(m) = &metadata {
        params.push(format!("resource_metadata=\"{m}\""));
    }
    if *c == Challenge::InvalidToken {
        params.push("error=\"invalid_token\"".to_owned());
    }
    if !params.is_empty() {
        bearer.push(' ');
        bearer.push_str(&params.join(", "));
    }
    if let Ok(v) = HeaderValue::from_str(&bearer) {
        h.append(WWW_AUTHENTICATE, v);
    }
    if !cfg.dpop {
        return;
    }
    let mut dpop = format!("DPoP algs=\"{}\"", sigil_pki::DPOP_ALGORITHMS.join(" "));
    if let Some(m) = &metadata {
        dpop.push_str(&format!(", resource_metadata=\"{m}\""));
    }
    match c {
        Challenge::InvalidDpopProof => dpop.push_str(", error=\"invalid_dpop_proof\""),
        Challenge::UseDpopNonce(nonce) => {
            dpop.push_str(", error=\"use_dpop_nonce\"");
            if let Ok(v) = HeaderValue::from_str(nonce) {
                h.insert(HeaderName::from_static("dpop-nonce"), v);
            }
        }
        Challenge::Missing | Challenge::InvalidToken => {}
    }
    if let Ok(v) = HeaderValue::from_str(&dpop) {
        h.append(WWW_AUTHENTICATE, v);
    }
}
