//! Behaviour summaries, as proxies and agents publish them over MQTT (see `docs/posture.md`
//! for the topic scheme). Summaries, not per-request messages: one message per publisher per
//! window.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one proxy saw of one calling identity during one window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityWindow {
    /// The caller's SPIFFE ID.
    pub spiffe_id: String,
    /// Requests by `<action>:<resource id>` (`invoke:defect-detector`, `call_tool:read_file`,
    /// `http:/health`), allowed and denied alike.
    pub requests: BTreeMap<String, u64>,
    /// How many of them were refused (policy, rate limit, bad input).
    pub denied: u64,
    /// Request body bytes received from the caller.
    pub bytes_in: u64,
    /// Response body bytes sent back to the caller.
    pub bytes_out: u64,
    /// The largest single response body of the window.
    pub max_response_bytes: u64,
}

/// What one agent saw of its node during one window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWindow {
    /// Executables running now that were not running in any earlier window of this agent:
    /// path → SHA-256 (hex).
    pub new_executables: BTreeMap<String, String>,
    /// The posture ruleset's score at the end of the window.
    pub posture_score: u8,
}

/// One published message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryMessage {
    /// The publisher's SPIFFE ID (a proxy's or an agent's node SVID).
    pub source: String,
    /// The node the publisher runs on (its node SPIFFE ID).
    pub node: String,
    /// Start of the window (unix seconds) and its length.
    pub window_start: i64,
    pub window_secs: u32,
    /// Strictly increasing per publisher: a replayed or reordered message is dropped.
    pub seq: u64,
    /// Per calling identity (proxies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityWindow>,
    /// The node itself (agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_window: Option<NodeWindow>,
}
