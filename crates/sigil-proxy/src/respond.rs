//! The edge of the request path: a refusal in the client's own protocol (the OpenAI error
//! object, or JSON-RPC errors on the MCP endpoint), and what an authorized request may see
//! of the upstream's answer (model lists and MCP lists filtered, SSE event by event).
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use sigil_policy::{Caller, PolicyEngine};

use crate::deny::Deny;
use crate::filter::{FilterError, SseFilter, filter_mcp_json, filter_models};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// The header carrying the proxy's request id (to the upstream and the client).
pub const REQUEST_ID_HEADER: &str = "x-sigil-request-id";

/// Largest upstream response the proxy buffers to filter (`/v1/models`, JSON MCP answers).
const MAX_FILTERED_RESPONSE: usize = 16 * 1024 * 1024;

/// What an authorized request may see of the response.
pub(crate) enum ResponseFilter {
    None,
    /// Keep the models the caller may invoke.
    Models(Caller, Arc<PolicyEngine>),
    /// Keep the tools, prompts and resources the caller may use, in every MCP answer.
    Mcp(Caller, Arc<PolicyEngine>),
}

/// Whether `engine` permits `caller` `action` on `resource_type::resource_id` (errors deny).
fn permits(
    caller: &Caller,
    engine: &PolicyEngine,
    action: &str,
    resource_type: &str,
    resource_id: &str,
) -> bool {
    engine
        .decide(&caller.query(action, resource_type, resource_id))
        .is_ok_and(|d| d.allow)
}

/// A body of bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A refusal in the client's own shape: JSON-RPC error objects on the MCP endpoint, the
/// OpenAI error object elsewhere.
pub(crate) fn refusal(mcp: bool, deny: &Deny, body: &[u8], request_id: &str) -> Response<Body> {
    if mcp {
        jsonrpc_error(deny, body, request_id)
    } else {
        openai_error(deny, request_id)
    }
}

/// Most bytes of a refused request's body read and discarded, and for how long.
const DRAIN_MAX: usize = 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and discards what is left of a refused request's body, within bounds, so the client
/// finishes sending and reads the refusal (instead of a reset). Beyond the bounds the
/// connection is closed after the response, as before.
pub(crate) async fn drain(body: Incoming) {
    let read = http_body_util::Limited::new(body, DRAIN_MAX).collect();
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Applies `filter` to a successful upstream response: buffered for JSON bodies (bounded),
/// event by event for SSE. Anything it cannot read is refused, never passed unfiltered.
pub(crate) async fn filter_response(
    parts: &mut http::response::Parts,
    body: Incoming,
    filter: ResponseFilter,
) -> Result<Body, FilterError> {
    if matches!(filter, ResponseFilter::None) || !parts.status.is_success() {
        return Ok(body.boxed());
    }
    if parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return Err(FilterError::Shape("encoded response"));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let sse = content_type.starts_with("text/event-stream");
    match filter {
        ResponseFilter::None => Ok(body.boxed()),
        ResponseFilter::Mcp(caller, engine) if sse => {
            let allow = move |a: &str, t: &str, id: &str| permits(&caller, &engine, a, t, id);
            // Filtered events change the length.
            parts.headers.remove(header::CONTENT_LENGTH);
            Ok(sse_filtered(
                body,
                SseFilter::new(Box::new(allow), MAX_FILTERED_RESPONSE),
            ))
        }
        ResponseFilter::Models(..) | ResponseFilter::Mcp(..)
            if parts.status == StatusCode::ACCEPTED && content_type.is_empty() =>
        {
            Ok(body.boxed())
        }
        filter => {
            let bytes = http_body_util::Limited::new(body, MAX_FILTERED_RESPONSE)
                .collect()
                .await
                .map_err(|_| FilterError::Shape("response too large or unreadable"))?
                .to_bytes();
            let out = match filter {
                ResponseFilter::Models(caller, engine) => {
                    filter_models(&bytes, |m| permits(&caller, &engine, "invoke", "Model", m))?
                }
                ResponseFilter::Mcp(caller, engine) => {
                    let allow = |a: &str, t: &str, id: &str| permits(&caller, &engine, a, t, id);
                    filter_mcp_json(&bytes, &allow)?
                }
                ResponseFilter::None => bytes.to_vec(),
            };
            parts.headers.remove(header::CONTENT_LENGTH);
            if let Ok(v) = HeaderValue::from_str(&out.len().to_string()) {
                parts.headers.insert(header::CONTENT_LENGTH, v);
            }
            Ok(full(out))
        }
    }
}

/// An SSE body passed on event by event through `filter`.
fn sse_filtered(body: Incoming, filter: SseFilter) -> Body {
    SseBody {
        inner: body,
        filter,
        done: false,
    }
    .boxed()
}

struct SseBody {
    inner: Incoming,
    filter: SseFilter,
    done: bool,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry nothing to filter; they end the stream here.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match this.filter.push(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => {
                            return Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(
                                out,
                            )))));
                        }
                        Err(e) => {
                            // Nothing unfiltered is passed on: the stream ends here.
                            tracing::warn!(error = %e, "SSE response cut");
                            this.done = true;
                            return Poll::Ready(None);
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return match this.filter.finish() {
                        Ok(rest) if !rest.is_empty() => {
                            Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(rest)))))
                        }
                        Ok(_) => Poll::Ready(None),
                        Err(e) => {
                            tracing::warn!(error = %e, "SSE response cut");
                            Poll::Ready(None)
                        }
                    };
                }
            }
        }
    }
}

/// A refusal as JSON-RPC error objects (MCP): one per request of the body that carries an
/// `id` (`null` when the body could not be read), with the HTTP status of the refusal.
fn jsonrpc_error(deny: &Deny, body: &[u8], request_id: &str) -> Response<Body> {
    let code = deny.rpc_code;
    let error = |id: serde_json::Value| {
        serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": code, "message": deny.message, "data": {"request_id": request_id}},
        })
    };
    let ids = |m: &serde_json::Value| m.get("method").and(m.get("id")).cloned();
    let out = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(batch)) => {
            let errs: Vec<_> = batch.iter().filter_map(ids).map(error).collect();
            if errs.is_empty() {
                error(serde_json::Value::Null)
            } else {
                serde_json::Value::Array(errs)
            }
        }
        Ok(m) => error(ids(&m).unwrap_or(serde_json::Value::Null)),
        Err(_) => error(serde_json::Value::Null),
    };
    let mut resp = openai_error(deny, request_id);
    *resp.body_mut() = full(out.to_string());
    resp
}

/// An error in the OpenAI API's own shape.
pub(crate) fn openai_error(deny: &Deny, request_id: &str) -> Response<Body> {
    let (status, message) = (deny.status, deny.message.as_str());
    let (kind, code) = match status {
        StatusCode::UNAUTHORIZED => ("authentication_error", "invalid_token"),
        StatusCode::FORBIDDEN => ("permission_error", "forbidden"),
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "request_too_large"),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", "rate_limited"),
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => {
            ("api_error", "upstream_error")
        }
        _ => ("invalid_request_error", "invalid_request"),
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    // The edge (`stack.rs`) turns this into `WWW-Authenticate`.
    if let Some(c) = &deny.challenge {
        resp.extensions_mut().insert(c.clone());
    }
    if let Some(wait) = deny.retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    resp
}
