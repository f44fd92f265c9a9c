//! sigil telemetry (placeholder docs, expanded below).
#![forbid(unsafe_code)]

mod aggregate;
mod broker;
mod envelope;
mod error;
mod publisher;
mod subscriber;
mod topic;

pub use aggregate::{Aggregator, AggregatorLimits, AggregatorStats, OTHER_KEY, SHARDS};
pub use broker::{BrokerConfig, DEFAULT_KEEP_ALIVE_SECS, MAX_BACKOFF, MAX_PACKET_LEN, MIN_BACKOFF};
pub use envelope::{
    Envelope, MAX_ENVELOPE_LEN, MAX_PAYLOAD_LEN, SCHEME_ECDSA_P256_SHA256,
    SCHEME_ECDSA_P384_SHA384, SCHEME_ED25519, SCHEMES, SIGNING_CONTEXT, open, seal, signed_bytes,
};
pub use error::TelemetryError;
pub use publisher::{PUBLISH_QUEUE, Publisher};
pub use subscriber::{RECEIVE_QUEUE, Received, Subscriber};
pub use topic::{Kind, TOPIC_PREFIX, subscription, topic_for};
