//! The body step: the request body, read whole within `max_body_bytes` and within the body
//! read timeout (a client trickling bytes cannot hold a request open), before anything is
//! decided on it.
use std::time::Duration;

use http::header;
use hyper::body::{Bytes, Incoming};

use crate::deny::Deny;

/// Reads the body of a request whose head is `parts`.
pub(crate) async fn read(
    parts: &http::request::Parts,
    body: Incoming,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, Deny> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(Deny::too_large(max));
    }
    use http_body_util::BodyExt;
    let read = http_body_util::Limited::new(body, max).collect();
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(_)) => Err(Deny::too_large(max)),
        Err(_) => Err(Deny::timeout(format!(
            "request body not received within {}s",
            timeout.as_secs()
        ))),
    }
}
