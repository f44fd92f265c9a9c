//! The forward step: the permitted request, rewritten for the upstream (hop-by-hop and
//! identity headers removed, the token never passed on, identity set by the proxy), sent
//! over the pooled upstream connection; the answer's head comes back for the response step.
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::deny::Deny;
use crate::headers::{IdentityHeaders, strip_hop_by_hop, strip_identity};
use crate::observe::Observer;
use crate::respond::{Body, REQUEST_ID_HEADER};
use crate::upstream::Upstream;

/// How the request is vouched for: inbound, the caller's identity set by the proxy; outbound,
/// the route's access token (the callee's sidecar sets the identity).
pub(crate) enum Vouch<'a> {
    Identity(&'a IdentityHeaders),
    Bearer(&'a str),
}

/// Sends the request to the upstream. `filtered`: the proxy will read the answer, so it asks
/// for an unencoded one.
pub(crate) async fn forward(
    upstream: &Upstream,
    mut parts: http::request::Parts,
    body: Body,
    vouch: &Vouch<'_>,
    request_id: &str,
    filtered: bool,
    obs: &mut Observer<'_>,
) -> Result<Response<Incoming>, Deny> {
    parts.uri = upstream
        .uri(parts.uri.path_and_query())
        .ok_or_else(|| Deny::bad_request("invalid request path"))?;
    parts.version = upstream.version();
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    strip_identity(headers);
    headers.remove(header::AUTHORIZATION);
    match upstream.host() {
        Some(host) => headers.insert(header::HOST, host.clone()),
        None => headers.remove(header::HOST),
    };
    if filtered {
        headers.remove(header::ACCEPT_ENCODING);
    }
    match vouch {
        Vouch::Identity(identity) => identity.set(headers),
        Vouch::Bearer(token) => {
            let v = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Deny::upstream("the route's token is not a header value"))?;
            headers.insert(header::AUTHORIZATION, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    obs.forwarding(headers, &parts.method);
    match upstream.request(Request::from_parts(parts, body)).await {
        Ok(mut resp) => {
            obs.upstream_done(Ok(resp.status().as_u16()));
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        }
        Err(e) => {
            obs.upstream_done(Err(e.to_string()));
            tracing::warn!(error = %e, request_id, "upstream unreachable");
            Err(Deny::upstream("upstream unavailable"))
        }
    }
}
