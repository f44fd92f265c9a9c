//! The body step: the request body, read whole within `max_body_bytes` and within the body
//! read timeout (a client trickling bytes cannot hold a request open), before anything is
//! decided on it.
//!
//! A body over the limit is refused with 413. Before the refusal is sent, a bounded rest of
//! the body is read and discarded (as nginx's lingering close does): a connection closed with
//! unread bytes in its receive buffer is reset by the kernel, and the reset can reach the
//! client before the 413 does, so the client would see a broken connection instead of the
//! answer.
use std::time::Duration;

use http::header;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};

use crate::deny::Deny;

/// At most this many bytes past the limit are read and discarded before a 413.
const DRAIN_MAX_BYTES: u64 = 256 * 1024;
/// And for at most this long.
const DRAIN_MAX_TIME: Duration = Duration::from_millis(500);

/// Reads the body of a request whose head is `parts`.
pub(crate) async fn read(
    parts: &http::request::Parts,
    mut body: Incoming,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, Deny> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max as u64) {
        if n <= DRAIN_MAX_BYTES {
            drain(&mut body, DRAIN_MAX_BYTES).await;
        }
        return Err(Deny::too_large(max));
    }
    let mut buf: Vec<u8> = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(Deny::bad_request("request body unreadable"));
            };
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max {
                    return Err(Deny::too_large(max));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(Bytes::from(buf)),
        Ok(Err(deny)) => {
            drain(&mut body, DRAIN_MAX_BYTES).await;
            Err(deny)
        }
        Err(_) => Err(Deny::timeout(format!(
            "request body not received within {}s",
            timeout.as_secs()
        ))),
    }
}

/// Reads and discards up to `limit` more bytes of `body`, for at most [`DRAIN_MAX_TIME`].
async fn drain(body: &mut Incoming, limit: u64) {
    let discard = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > limit {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, discard).await;
}
