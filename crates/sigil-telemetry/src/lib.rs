//! Continuous-verification telemetry over MQTT: proxies and agents publish one signed
//! behaviour summary ([`sigil_risk::TelemetryMessage`]) per window; the trust authority
//! subscribes, verifies each message against the trust domain's SPIFFE bundle, and feeds the
//! risk engine.
//!
//! The broker is **not trusted**: it may drop, reorder, replay, or inject messages, and anyone
//! who can reach it may publish anywhere. Authenticity comes only from the publisher's
//! X.509-SVID signature ([`seal`] / [`open`]); MQTT carries opaque bytes.
//!
//! # Topic scheme
//!
//! ```text
//! sigil/v1/<trust-domain>/<kind>/<path>
//! ```
//!
//! - `<trust-domain>`: the publisher's trust domain name, e.g. `example.org`.
//! - `<kind>`: `proxy` (a sigil proxy publishing [`sigil_risk::IdentityWindow`]s) or `agent`
//!   (a node agent publishing a [`sigil_risk::NodeWindow`]); see [`Kind`].
//! - `<path>`: the publisher's SPIFFE ID path without its leading `/`, so its segments become
//!   topic levels: `spiffe://example.org/node/n1/proxy` publishes on
//!   `sigil/v1/example.org/proxy/node/n1/proxy`.
//!
//! [`topic_for`] builds it and refuses a trust-domain ID (no path) or one holding the MQTT
//! wildcards `+`/`#` (SPIFFE IDs cannot, the check is a second guard). The server subscribes to
//! [`subscription`]`(td)` = `sigil/v1/<td>/#`. A publisher may only speak on its own topics:
//! [`open`] refuses a validly signed message published on any topic other than
//! `topic_for(signer, Proxy)` or `topic_for(signer, Agent)`.
//!
//! # Wire format (version 1)
//!
//! The MQTT payload is a JSON object, at most [`MAX_ENVELOPE_LEN`] (256 KiB) bytes, with
//! exactly these four members ([`Envelope`]; unknown members are refused):
//!
//! ```json
//! {
//!   "chain": ["<base64 DER leaf>", "<base64 DER intermediate>", "..."],
//!   "scheme": "ecdsa-p256-sha256",
//!   "payload": "<base64 of the JSON TelemetryMessage>",
//!   "signature": "<base64 signature>"
//! }
//! ```
//!
//! - `chain`: the publisher's X.509-SVID, leaf first, then any intermediates (not the root),
//!   each standard base64 (with padding) of the DER certificate; 1 to
//!   [`sigil_pki::MAX_CHAIN_LEN`] entries.
//! - `scheme`: one of [`SCHEMES`]:
//!   - `ecdsa-p256-sha256`: ECDSA over P-256 with SHA-256, signature ASN.1 DER
//!     (`Ecdsa-Sig-Value`), as rustls signers produce it;
//!   - `ecdsa-p384-sha384`: the same over P-384 with SHA-384;
//!   - `ed25519`: Ed25519 (RFC 8032), 64 bytes.
//!
//!   The scheme must fit the leaf's key: a mismatch fails verification.
//! - `payload`: standard base64 of the UTF-8 JSON serialisation of a
//!   [`sigil_risk::TelemetryMessage`]. The signature covers these JSON bytes, not a
//!   re-serialisation, so verifiers need no canonical JSON. [`seal`] signs at most
//!   [`MAX_PAYLOAD_LEN`] (160 KiB) of JSON.
//! - `signature`: standard base64 of the signature over the signed bytes:
//!
//!   ```text
//!   "sigil-telemetry-v1" 0x00 || topic (UTF-8) || 0x00 || payload (the JSON bytes)
//!   ```
//!
//!   ([`signed_bytes`]; [`SIGNING_CONTEXT`] is the first part). The prefix keeps these
//!   signatures from being valid for anything else the SVID key signs (TLS handshakes sign
//!   other prefixes); the topic binds the message to where it was published, so the broker
//!   cannot move it to another topic. Topics hold no NUL, so the encoding is unambiguous.
//!
//! # Verification ([`open`])
//!
//! 1. Size: more than [`MAX_ENVELOPE_LEN`] bytes is refused before parsing.
//! 2. Strict JSON parse of the envelope; base64 decoding of every member.
//! 3. The chain is a valid X.509-SVID of the bundle's trust domain at `now`
//!    ([`sigil_pki::verify_x509_svid`]: path to a bundle authority, validity period, leaf
//!    rules, exactly one SPIFFE URI SAN in the trust domain).
//! 4. The signature verifies under the leaf's public key (rustls-webpki, aws-lc-rs).
//! 5. The topic is one of the signer's own topics (see above).
//! 6. The payload parses as a `TelemetryMessage` whose `source` equals the signer's SPIFFE ID.
//!
//! Replay and reordering are not checked here (this is stateless): the consumer keeps the last
//! `seq` per publisher and drops any message whose `seq` is not greater.
//!
//! # Transport
//!
//! [`Publisher`] and [`Subscriber`] run a `rumqttc` event loop on the tokio runtime, MQTT 3.1.1
//! over plain TCP (`mqtt://host:port`, [`BrokerConfig`]), clean sessions, QoS 1, reconnecting
//! with exponential backoff ([`MIN_BACKOFF`] to [`MAX_BACKOFF`]). The subscriber subscribes
//! again on every ConnAck. [`Publisher::publish`] never waits: it drops (and counts) when
//! disconnected or when its queue is full. rumqttc is built without its TLS features (they
//! would bring a second TLS configuration); MQTT over TLS, with the workspace's rustls 0.23 and
//! aws-lc-rs, is a later step. Confidentiality is not provided: summaries hold SPIFFE IDs,
//! resource names and counts, visible to the broker.
//!
//! # Aggregation
//!
//! On a proxy, [`Aggregator::record`] counts each request (sub-microsecond; sharded
//! mutexes), and [`Aggregator::take`] ends the window; memory is bounded by
//! [`AggregatorLimits`] (see the [`Aggregator`] docs for what happens beyond them).
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
