//! Why sealing, opening, or talking to the broker failed.
use sigil_pki::SvidError;

/// Why a telemetry operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The envelope (or the payload being sealed) is larger than [`crate::MAX_ENVELOPE_LEN`] /
    /// [`crate::MAX_PAYLOAD_LEN`].
    #[error("telemetry message too large ({len} bytes, at most {max})")]
    TooLarge { len: usize, max: usize },
    /// Not an envelope: bad JSON, unknown fields, bad base64, an empty chain.
    #[error("malformed telemetry envelope: {0}")]
    Malformed(String),
    /// The signature scheme is not one of [`crate::SCHEMES`].
    #[error("unsupported signature scheme {0:?}")]
    UnsupportedScheme(String),
    /// The certificate chain is not a valid X.509-SVID of the trust bundle's domain.
    #[error("the publisher's X.509-SVID was refused: {0}")]
    Chain(#[from] SvidError),
    /// The signature does not verify under the leaf's key over this topic and payload.
    #[error("bad signature on telemetry message")]
    BadSignature,
    /// The topic is not one of the verified publisher's own topics.
    #[error("topic {topic:?} does not belong to publisher {publisher}")]
    TopicMismatch { topic: String, publisher: String },
    /// The signed payload names a `source` other than the verified publisher.
    #[error("message source {source_id:?} is not the signing publisher {publisher}")]
    SourceMismatch {
        source_id: String,
        publisher: String,
    },
    /// The signing key offers none of the supported schemes, or signing failed.
    #[error("cannot sign telemetry message: {0}")]
    Signing(String),
    /// The SPIFFE ID cannot be mapped onto an MQTT topic.
    #[error("invalid topic: {0}")]
    Topic(String),
    /// The broker configuration is invalid.
    #[error("invalid MQTT broker configuration: {0}")]
    Config(String),
    /// The publisher or subscriber was started outside a tokio runtime.
    #[error("no tokio runtime to run the MQTT event loop on")]
    NoRuntime,
}
