//! The policy step: every call of the request must be permitted by Cedar (a batch hiding one
//! forbidden call is refused whole), with the caller's groups, token scopes and the hour in
//! context; and what the caller may see of the answer.
use std::sync::Arc;

use sigil_pki::{AccessTokenClaims, VerifiedX509Svid};
use sigil_policy::{Caller, Delegation, PolicyEngine, Principal, Query, RiskContext};

use crate::deny::Deny;
use crate::extract::Call;
use crate::metrics::Outcome;
use crate::observe::Observer;
use crate::respond::ResponseFilter;

/// A permitted request.
pub(crate) struct Permit {
    /// The permits that decided.
    pub policy_ids: Vec<String>,
    pub filter: ResponseFilter,
}

/// Hour of day (UTC) and weekday (0 = Monday) of `now`, as policy context sees them.
fn hour_and_weekday(now: i64) -> (i64, i64) {
    // 1970-01-01 was a Thursday.
    (
        now.rem_euclid(86_400) / 3600,
        (now.div_euclid(86_400) + 3).rem_euclid(7),
    )
}

/// What the request is, for the response filter.
pub(crate) enum Seeing {
    /// A model list.
    Models,
    /// An MCP answer (tool, prompt and resource lists are filtered).
    Mcp,
    Other,
}

/// The user and chain of a delegated token, as policy sees them (`context.delegation`).
pub(crate) fn delegation(claims: &AccessTokenClaims) -> Option<Delegation> {
    let act = claims.act.as_ref()?;
    Some(Delegation {
        user: claims.sub.clone(),
        groups: claims.user_groups.clone(),
        chain: act.chain().into_iter().map(str::to_owned).collect(),
    })
}

/// Decides every call with `engine` at `now`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide(
    engine: Arc<PolicyEngine>,
    now: i64,
    peer: &VerifiedX509Svid,
    claims: &AccessTokenClaims,
    risk: Option<&RiskContext>,
    calls: &[Call],
    seeing: Seeing,
    obs: &mut Observer<'_>,
) -> Result<Permit, Deny> {
    if engine.expired(now) {
        return Err(Deny::unavailable(
            "policy bundle expired (or none received yet)",
            Outcome::Policy,
        ));
    }
    let scopes: Vec<String> = claims
        .scope
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let (hour, weekday) = hour_and_weekday(now);
    let delegation = delegation(claims);
    let mut policy_ids = Vec::new();
    for call in calls {
        let query = Query {
            principal: Principal {
                spiffe_id: peer.spiffe_id.as_str(),
                trust_domain: peer.spiffe_id.trust_domain_name(),
                groups: &claims.groups,
            },
            action: call.action,
            resource_type: call.resource_type,
            resource_id: &call.resource_id,
            scopes: &scopes,
            hour,
            weekday,
            arguments: call.arguments.as_ref(),
            delegation: delegation.as_ref(),
            risk,
        };
        let started = obs.start();
        let decided = engine.decide(&query);
        obs.policy_evaluated(started, call, decided.as_ref().map_err(ToString::to_string));
        let decision = match decided {
            Ok(d) => d,
            Err(e) => {
                return Err(Deny::forbidden(
                    format!("request could not be evaluated: {e}"),
                    policy_ids,
                ));
            }
        };
        policy_ids.extend(decision.policy_ids.iter().cloned());
        if !decision.allow {
            let mut reason = format!(
                "policy denies {} on {}::\"{}\"",
                call.action, call.resource_type, call.resource_id
            );
            if !decision.errors.is_empty() {
                reason.push_str(&format!(" (errors: {})", decision.errors.join("; ")));
            }
            return Err(Deny::forbidden(reason, decision.policy_ids.clone()));
        }
    }
    let caller = || Caller {
        spiffe_id: peer.spiffe_id.as_str().to_owned(),
        trust_domain: peer.spiffe_id.trust_domain_name().to_owned(),
        groups: claims.groups.clone(),
        scopes: scopes.clone(),
        hour,
        weekday,
        delegation: delegation.clone(),
        risk: risk.cloned(),
    };
    let filter = match seeing {
        Seeing::Models => ResponseFilter::Models(caller(), engine),
        Seeing::Mcp => ResponseFilter::Mcp(caller(), engine),
        Seeing::Other => ResponseFilter::None,
    };
    Ok(Permit { policy_ids, filter })
}
