//! A refusal: what the client is told (status, message, when to retry), why as a fixed
//! outcome for metrics, and the error code it becomes on the MCP endpoint. Steps of the
//! request path return one; it turns into a response only at the edge (`respond.rs`).
use std::time::Duration;

use http::StatusCode;

use crate::metrics::Outcome;

/// A refused request.
#[derive(Debug, Clone)]
pub(crate) struct Deny {
    pub status: StatusCode,
    pub message: String,
    pub outcome: Outcome,
    /// JSON-RPC error code on the MCP endpoint.
    pub rpc_code: i64,
    pub retry_after: Option<Duration>,
    /// The policies that refused (forbids), for the audit record.
    pub policy_ids: Vec<String>,
    /// For a 401: what `WWW-Authenticate` says (RFC 6750 §3, RFC 9449 §7.1).
    pub challenge: Option<Challenge>,
}

/// Why a request was not authenticated, for `WWW-Authenticate` (set at the edge, where the
/// resource metadata URL is known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// No credentials: only the schemes and the resource metadata.
    Missing,
    /// A token that is not acceptable.
    InvalidToken,
    /// A DPoP proof that is not acceptable.
    InvalidDpopProof,
    /// A DPoP proof without the current nonce; retry with this one.
    UseDpopNonce(String),
}

impl Deny {
    fn new(status: StatusCode, outcome: Outcome, rpc_code: i64, message: String) -> Self {
        Self {
            status,
            message,
            outcome,
            rpc_code,
            retry_after: None,
            policy_ids: Vec::new(),
            challenge: None,
        }
    }

    pub fn revoked() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            Outcome::Revoked,
            -32001,
            "client certificate revoked".into(),
        )
    }

    /// An invalid or wrongly bound token.
    pub fn token(message: impl Into<String>) -> Self {
        Self {
            challenge: Some(Challenge::InvalidToken),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                Outcome::BadToken,
                -32001,
                message.into(),
            )
        }
    }

    /// No token at all.
    pub fn no_token(message: impl Into<String>) -> Self {
        Self {
            challenge: Some(Challenge::Missing),
            ..Self::token(message)
        }
    }

    /// A DPoP-bound token without an acceptable proof.
    pub fn dpop(r: crate::dpop::DpopRefusal) -> Self {
        let challenge = match (&r.error, r.nonce) {
            (sigil_pki::DpopError::Nonce, Some(n)) => Challenge::UseDpopNonce(n),
            _ => Challenge::InvalidDpopProof,
        };
        Self {
            challenge: Some(challenge),
            ..Self::token(r.error.to_string())
        }
    }

    /// A request that cannot be read one way (framing, path, JSON, names).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            Outcome::BadRequest,
            -32600,
            message.into(),
        )
    }

    /// A body that is not JSON where JSON is required.
    pub fn parse_error(message: impl Into<String>) -> Self {
        Self {
            rpc_code: -32700,
            ..Self::bad_request(message)
        }
    }

    /// A body in an encoding or charset the proxy does not read.
    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Outcome::BadRequest,
            -32600,
            message.into(),
        )
    }

    pub fn too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::TooLarge,
            -32600,
            format!("request body too large (more than {max} bytes)"),
        )
    }

    /// A client too slow to send its request.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            Outcome::BadRequest,
            -32600,
            message.into(),
        )
    }

    pub fn rate_limited(message: impl Into<String>, wait: Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                Outcome::RateLimited,
                -32029,
                message.into(),
            )
        }
    }

    /// Refused by policy (or a call policy could not evaluate).
    pub fn forbidden(message: impl Into<String>, policy_ids: Vec<String>) -> Self {
        Self {
            policy_ids,
            ..Self::new(
                StatusCode::FORBIDDEN,
                Outcome::Policy,
                -32003,
                message.into(),
            )
        }
    }

    /// An MCP session the proxy does not know (the client starts a new one).
    pub fn unknown_session() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Outcome::BadRequest,
            -32001,
            "unknown MCP session".into(),
        )
    }

    /// No policy in force, or the audit log cannot be written.
    pub fn unavailable(message: impl Into<String>, outcome: Outcome) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            outcome,
            -32603,
            message.into(),
        )
    }

    /// The upstream failed, or its answer could not be filtered.
    /// Nothing to send the request to (outbound: no route claims it).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Outcome::BadRequest,
            -32601,
            message.into(),
        )
    }

    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            Outcome::Upstream,
            -32603,
            message.into(),
        )
    }
}
