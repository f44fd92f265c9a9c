//! Sealing and opening envelopes with real SVIDs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{TestCa, message, now};
use sigil_pki::KeyAlgorithm;
use sigil_telemetry::{Envelope, Kind, MAX_ENVELOPE_LEN, TelemetryError, open, seal, topic_for};

const PROXY: &str = "/node/n1/proxy";

fn sealed(ca: &TestCa, alg: KeyAlgorithm) -> (String, Vec<u8>) {
    let key = ca.svid_key(PROXY, alg);
    let id = ca.id(PROXY);
    let topic = topic_for(&id, Kind::Proxy).unwrap();
    let bytes = seal(&topic, &message(&id), &key).unwrap();
    (topic, bytes)
}

fn envelope(bytes: &[u8]) -> Envelope {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn round_trip_p256_and_ed25519() {
    let ca = TestCa::new("example.org");
    for (alg, scheme) in [
        (KeyAlgorithm::EcdsaP256, "ecdsa-p256-sha256"),
        (KeyAlgorithm::Ed25519, "ed25519"),
    ] {
        let (topic, bytes) = sealed(&ca, alg);
        assert_eq!(envelope(&bytes).scheme, scheme);
        let (id, msg) = open(&topic, &bytes, &ca.bundle(), now()).unwrap();
        assert_eq!(id, ca.id(PROXY));
        assert_eq!(msg, message(&ca.id(PROXY)));
    }
}

#[test]
fn agent_topic_is_accepted_too() {
    let ca = TestCa::new("example.org");
    let key = ca.svid_key("/node/n1", KeyAlgorithm::EcdsaP256);
    let id = ca.id("/node/n1");
    let topic = topic_for(&id, Kind::Agent).unwrap();
    let bytes = seal(&topic, &message(&id), &key).unwrap();
    assert_eq!(open(&topic, &bytes, &ca.bundle(), now()).unwrap().0, id);
}

#[test]
fn tampered_payload_is_refused() {
    let ca = TestCa::new("example.org");
    let (topic, bytes) = sealed(&ca, KeyAlgorithm::EcdsaP256);
    let mut env = envelope(&bytes);
    let mut msg = message(&ca.id(PROXY));
    msg.identities[0].denied = 0;
    env.payload = B64.encode(serde_json::to_vec(&msg).unwrap());
    let err = open(
        &topic,
        &serde_json::to_vec(&env).unwrap(),
        &ca.bundle(),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, TelemetryError::BadSignature), "{err}");
}

#[test]
fn tampered_signature_is_refused() {
    let ca = TestCa::new("example.org");
    let (topic, bytes) = sealed(&ca, KeyAlgorithm::Ed25519);
    let mut env = envelope(&bytes);
    let mut sig = B64.decode(&env.signature).unwrap();
    sig[0] ^= 1;
    env.signature = B64.encode(sig);
    let err = open(
        &topic,
        &serde_json::to_vec(&env).unwrap(),
        &ca.bundle(),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, TelemetryError::BadSignature), "{err}");
}

#[test]
fn wrong_scheme_for_the_key_is_refused() {
    let ca = TestCa::new("example.org");
    let (topic, bytes) = sealed(&ca, KeyAlgorithm::EcdsaP256);
    let mut env = envelope(&bytes);
    env.scheme = "ecdsa-p384-sha384".into();
    let err = open(
        &topic,
        &serde_json::to_vec(&env).unwrap(),
        &ca.bundle(),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, TelemetryError::BadSignature), "{err}");
    env.scheme = "rsa-pkcs1-sha256".into();
    let err = open(
        &topic,
        &serde_json::to_vec(&env).unwrap(),
        &ca.bundle(),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, TelemetryError::UnsupportedScheme(_)), "{err}");
}

#[test]
fn another_topic_is_refused() {
    let ca = TestCa::new("example.org");
    let (topic, bytes) = sealed(&ca, KeyAlgorithm::EcdsaP256);
    // The same publisher's agent topic: the signature binds the proxy topic.
    let other = topic_for(&ca.id(PROXY), Kind::Agent).unwrap();
    assert_ne!(other, topic);
    let err = open(&other, &bytes, &ca.bundle(), now()).unwrap_err();
    assert!(matches!(err, TelemetryError::BadSignature), "{err}");
}

#[test]
fn signing_for_someone_elses_topic_is_refused() {
    let ca = TestCa::new("example.org");
    let key = ca.svid_key(PROXY, KeyAlgorithm::EcdsaP256);
    let id = ca.id(PROXY);
    let victim = topic_for(&ca.id("/node/n2/proxy"), Kind::Proxy).unwrap();
    let bytes = seal(&victim, &message(&id), &key).unwrap();
    let err = open(&victim, &bytes, &ca.bundle(), now()).unwrap_err();
    assert!(matches!(err, TelemetryError::TopicMismatch { .. }), "{err}");
}

#[test]
fn source_mismatch_is_refused() {
    let ca = TestCa::new("example.org");
    let key = ca.svid_key(PROXY, KeyAlgorithm::EcdsaP256);
    let topic = topic_for(&ca.id(PROXY), Kind::Proxy).unwrap();
    let bytes = seal(&topic, &message(&ca.id("/node/n2/proxy")), &key).unwrap();
    let err = open(&topic, &bytes, &ca.bundle(), now()).unwrap_err();
    assert!(
        matches!(err, TelemetryError::SourceMismatch { .. }),
        "{err}"
    );
}

#[test]
fn chain_from_another_ca_is_refused() {
    let ca = TestCa::new("example.org");
    let rogue = TestCa::new("example.org");
    let (topic, bytes) = sealed(&rogue, KeyAlgorithm::EcdsaP256);
    let err = open(&topic, &bytes, &ca.bundle(), now()).unwrap_err();
    assert!(matches!(err, TelemetryError::Chain(_)), "{err}");
}

#[test]
fn svid_of_another_trust_domain_is_refused() {
    let ca = TestCa::new("example.org");
    let other = TestCa::new("other.org");
    let (topic, bytes) = sealed(&other, KeyAlgorithm::EcdsaP256);
    let mut bundle = ca.bundle();
    bundle.x509_authorities = other.bundle().x509_authorities;
    let err = open(&topic, &bytes, &bundle, now()).unwrap_err();
    assert!(matches!(err, TelemetryError::Chain(_)), "{err}");
}

#[test]
fn expired_svid_is_refused() {
    let ca = TestCa::new("example.org");
    let (topic, bytes) = sealed(&ca, KeyAlgorithm::EcdsaP256);
    // The SVID lives 600 s.
    let err = open(&topic, &bytes, &ca.bundle(), now() + 601).unwrap_err();
    assert!(matches!(err, TelemetryError::Chain(_)), "{err}");
}

#[test]
fn garbage_is_refused() {
    let ca = TestCa::new("example.org");
    let topic = topic_for(&ca.id(PROXY), Kind::Proxy).unwrap();
    for junk in [
        &b""[..],
        b"garbage",
        b"{}",
        b"[]",
        b"{\"chain\":[],\"scheme\":\"ed25519\",\"payload\":\"\",\"signature\":\"\"}",
        b"{\"chain\":[\"!!\"],\"scheme\":\"ed25519\",\"payload\":\"\",\"signature\":\"\"}",
        b"{\"chain\":[\"AAAA\"],\"scheme\":\"ed25519\",\"payload\":\"\",\"signature\":\"\"}",
    ] {
        let err = open(&topic, junk, &ca.bundle(), now()).unwrap_err();
        assert!(
            matches!(err, TelemetryError::Malformed(_) | TelemetryError::Chain(_)),
            "{err}"
        );
    }
}

#[test]
fn unknown_envelope_fields_are_refused() {
    let ca = TestCa::new("example.org");
    let (topic, bytes) = sealed(&ca, KeyAlgorithm::EcdsaP256);
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    value["extra"] = serde_json::json!(1);
    let err = open(
        &topic,
        &serde_json::to_vec(&value).unwrap(),
        &ca.bundle(),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, TelemetryError::Malformed(_)), "{err}");
}

#[test]
fn oversize_is_refused_before_parsing() {
    let ca = TestCa::new("example.org");
    let topic = topic_for(&ca.id(PROXY), Kind::Proxy).unwrap();
    let big = vec![b' '; MAX_ENVELOPE_LEN + 1];
    let err = open(&topic, &big, &ca.bundle(), now()).unwrap_err();
    assert!(matches!(err, TelemetryError::TooLarge { .. }), "{err}");
}

#[test]
fn oversize_payload_is_not_sealed() {
    let ca = TestCa::new("example.org");
    let key = ca.svid_key(PROXY, KeyAlgorithm::EcdsaP256);
    let id = ca.id(PROXY);
    let mut msg = message(&id);
    msg.node = "x".repeat(200 * 1024);
    let topic = topic_for(&id, Kind::Proxy).unwrap();
    let err = seal(&topic, &msg, &key).unwrap_err();
    assert!(matches!(err, TelemetryError::TooLarge { .. }), "{err}");
}
