//! The rate-limit steps: one token per identity before the body is read (a flood costs the
//! proxy no body reads), then one more per further call of a JSON-RPC batch, and per
//! identity × model/tool once every call is permitted.
use std::time::Instant;

use crate::deny::Deny;
use crate::extract::Call;
use crate::ratelimit::Limits;

/// The request's first token.
pub(crate) fn identity(limits: &Limits, who: &str) -> Result<(), Deny> {
    limits
        .per_identity
        .check(who, Instant::now())
        .map_err(|wait| Deny::rate_limited("rate limit exceeded", wait))
}

/// A token per call beyond the first (before policy: a batch larger than the burst costs
/// no evaluation).
pub(crate) fn batch(limits: &Limits, who: &str, calls: usize) -> Result<(), Deny> {
    let more = calls.saturating_sub(1);
    limits
        .per_identity
        .take(who, more, Instant::now())
        .map_err(|wait| {
            Deny::rate_limited(
                format!("rate limit exceeded ({calls} calls in one request)"),
                wait,
            )
        })
}

/// The per identity × model/tool limits, once every call is permitted.
pub(crate) fn resources(limits: &Limits, who: &str, calls: &[Call]) -> Result<(), Deny> {
    if limits.resources.is_empty() {
        return Ok(());
    }
    for call in calls {
        let key = (call.resource_type.to_owned(), call.resource_id.clone());
        if let Some(limiter) = limits.resources.get(&key)
            && let Err(wait) = limiter.check(who, Instant::now())
        {
            return Err(Deny::rate_limited(
                format!(
                    "rate limit exceeded for {}::\"{}\"",
                    call.resource_type, call.resource_id
                ),
                wait,
            ));
        }
    }
    Ok(())
}
