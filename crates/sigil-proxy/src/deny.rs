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

    /// A missing, invalid or wrongly bound token.
    pub fn token(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            Outcome::BadToken,
            -32001,
            message.into(),
        )
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
