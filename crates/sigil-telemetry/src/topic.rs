//! The topic scheme: `sigil/v1/<trust-domain>/<kind>/<path>`.
use sigil_core::SpiffeId;

use crate::error::TelemetryError;

/// The first segments of every sigil telemetry topic.
pub const TOPIC_PREFIX: &str = "sigil/v1/";

/// What kind of publisher a topic belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A sigil proxy: per-identity request summaries ([`sigil_risk::IdentityWindow`]).
    Proxy,
    /// A sigil agent: node summaries ([`sigil_risk::NodeWindow`]).
    Agent,
}

impl Kind {
    /// The topic segment: `proxy` or `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Proxy => "proxy",
            Kind::Agent => "agent",
        }
    }

    /// Both kinds.
    pub const ALL: [Kind; 2] = [Kind::Proxy, Kind::Agent];
}

/// The topic `id` publishes its `kind` of summaries on:
/// `sigil/v1/<trust-domain>/<kind>/<path without its leading slash>`.
///
/// Refused: a trust-domain ID (no path), and a path holding an MQTT wildcard (`+`, `#`) or a
/// NUL, which a parsed SPIFFE ID never does; the check is kept so the topic can never become a
/// filter whatever the ID parser accepts.
pub fn topic_for(id: &SpiffeId, kind: Kind) -> Result<String, TelemetryError> {
    let path = id.path().strip_prefix('/').unwrap_or_default();
    if path.is_empty() {
        return Err(TelemetryError::Topic(format!("{id} has no path")));
    }
    let td = id.trust_domain_name();
    if [td, path].iter().any(|s| s.contains(['+', '#', '\0'])) {
        return Err(TelemetryError::Topic(format!(
            "{id} holds an MQTT wildcard character"
        )));
    }
    Ok(format!("{TOPIC_PREFIX}{td}/{}/{path}", kind.as_str()))
}

/// The subscription filter for every publisher of trust domain `td`: `sigil/v1/<td>/#`.
pub fn subscription(td: &str) -> String {
    format!("{TOPIC_PREFIX}{td}/#")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn topics_follow_the_scheme() {
        let proxy = id("spiffe://example.org/node/n1/proxy");
        assert_eq!(
            topic_for(&proxy, Kind::Proxy).unwrap(),
            "sigil/v1/example.org/proxy/node/n1/proxy"
        );
        assert_eq!(
            topic_for(&id("spiffe://example.org/node/n1"), Kind::Agent).unwrap(),
            "sigil/v1/example.org/agent/node/n1"
        );
        assert_eq!(subscription("example.org"), "sigil/v1/example.org/#");
    }

    #[test]
    fn trust_domain_ids_have_no_topic() {
        assert!(topic_for(&id("spiffe://example.org"), Kind::Agent).is_err());
    }

    #[test]
    fn wildcards_are_refused() {
        // The SPIFFE ID parser already refuses them; the topic check stays as a second guard.
        assert!(SpiffeId::new("spiffe://example.org/a/+").is_err());
        assert!(SpiffeId::new("spiffe://example.org/a/#").is_err());
    }
}
