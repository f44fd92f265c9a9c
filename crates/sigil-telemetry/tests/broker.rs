//! Publisher → mosquitto → Subscriber, with real SVIDs. Each test runs its own mosquitto on a
//! free port; without the `mosquitto` binary the tests print why and pass.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{TestCa, message, now};
use sigil_pki::KeyAlgorithm;
use sigil_telemetry::{
    BrokerConfig, Envelope, Kind, Publisher, Subscriber, TelemetryError, open, seal, subscription,
    topic_for,
};
use tokio::sync::mpsc::Receiver;
use tokio::time::{sleep, timeout};

struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn mosquitto_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .or_else(|| {
        Command::new("mosquitto")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .map(|_| PathBuf::from("mosquitto"))
    })
}

impl Mosquitto {
    /// Starts mosquitto on `port` (a free one if `None`); `None` if the binary is missing.
    async fn start(port: Option<u16>) -> Option<Self> {
        let Some(bin) = mosquitto_bin() else {
            println!("SKIPPED: the mosquitto binary is not installed");
            return None;
        };
        let port = port.unwrap_or_else(|| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let m = Self {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(m);
            }
            sleep(Duration::from_millis(50)).await;
        }
        panic!("mosquitto did not listen on {port}");
    }

    fn config(&self) -> BrokerConfig {
        BrokerConfig::new(&format!("mqtt://127.0.0.1:{}", self.port), 5).unwrap()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn recv(rx: &mut Receiver<(String, Vec<u8>)>) -> (String, Vec<u8>) {
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no message within 10 s")
        .expect("channel closed")
}

const PROXY: &str = "/node/n1/proxy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_message_crosses_the_broker_and_forgeries_do_not() {
    let Some(broker) = Mosquitto::start(None).await else {
        return;
    };
    let ca = TestCa::new("example.org");
    let (sub, mut rx) = Subscriber::start(
        &broker.config(),
        "sigil-server-test",
        subscription("example.org"),
    )
    .unwrap();
    let publisher = Publisher::start(&broker.config(), "sigil-proxy-test").unwrap();
    until("subscription", || sub.is_subscribed()).await;
    until("publisher connection", || publisher.is_connected()).await;

    let key = ca.svid_key(PROXY, KeyAlgorithm::EcdsaP256);
    let id = ca.id(PROXY);
    let topic = topic_for(&id, Kind::Proxy).unwrap();
    let sent = message(&id);
    publisher.publish(topic.clone(), seal(&topic, &sent, &key).unwrap());

    let (got_topic, bytes) = recv(&mut rx).await;
    assert_eq!(got_topic, topic);
    let (got_id, got) = open(&got_topic, &bytes, &ca.bundle(), now()).unwrap();
    assert_eq!(got_id, id);
    assert_eq!(got, sent);
    until("the broker's PUBACK", || publisher.acked() == 1).await;
    assert_eq!(publisher.dropped(), 0);

    // A raw client (anyone who can reach the broker) publishes on the proxy's topic: the
    // genuine envelope with the payload rewritten, then one signed by a key from another CA.
    let raw = Publisher::start(&broker.config(), "intruder").unwrap();
    until("intruder connection", || raw.is_connected()).await;
    let mut env: Envelope = serde_json::from_slice(&bytes).unwrap();
    let mut forged = sent.clone();
    forged.identities[0].denied = 0;
    env.payload = B64.encode(serde_json::to_vec(&forged).unwrap());
    raw.publish(topic.clone(), serde_json::to_vec(&env).unwrap());
    let (t, b) = recv(&mut rx).await;
    assert!(matches!(
        open(&t, &b, &ca.bundle(), now()),
        Err(TelemetryError::BadSignature)
    ));

    let rogue = TestCa::new("example.org");
    let rogue_key = rogue.svid_key(PROXY, KeyAlgorithm::EcdsaP256);
    raw.publish(topic.clone(), seal(&topic, &forged, &rogue_key).unwrap());
    let (t, b) = recv(&mut rx).await;
    assert!(matches!(
        open(&t, &b, &ca.bundle(), now()),
        Err(TelemetryError::Chain(_))
    ));
    assert_eq!(sub.dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_reconnect_and_resubscribe_after_a_broker_restart() {
    let Some(mut broker) = Mosquitto::start(None).await else {
        return;
    };
    let port = broker.port;
    let ca = TestCa::new("example.org");
    let (sub, mut rx) = Subscriber::start(
        &broker.config(),
        "sigil-server-test",
        subscription("example.org"),
    )
    .unwrap();
    let publisher = Publisher::start(&broker.config(), "sigil-proxy-test").unwrap();
    until("subscription", || sub.is_subscribed()).await;
    until("publisher connection", || publisher.is_connected()).await;

    broker.stop();
    until("publisher to notice", || !publisher.is_connected()).await;
    until("subscriber to notice", || !sub.is_subscribed()).await;
    // Broker down: dropped at once, counted, never blocking.
    let key = ca.svid_key(PROXY, KeyAlgorithm::Ed25519);
    let id = ca.id(PROXY);
    let topic = topic_for(&id, Kind::Proxy).unwrap();
    let sealed = seal(&topic, &message(&id), &key).unwrap();
    publisher.publish(topic.clone(), sealed.clone());
    assert_eq!(publisher.dropped(), 1);

    let _broker = Mosquitto::start(Some(port)).await.unwrap();
    until("resubscription", || sub.is_subscribed()).await;
    until("publisher reconnection", || publisher.is_connected()).await;
    publisher.publish(topic.clone(), sealed);
    let (t, b) = recv(&mut rx).await;
    assert_eq!(open(&t, &b, &ca.bundle(), now()).unwrap().0, id);
}

#[tokio::test]
async fn publishing_without_a_broker_drops_and_counts() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = BrokerConfig::new(&format!("mqtt://127.0.0.1:{port}"), 5).unwrap();
    let publisher = Publisher::start(&cfg, "lonely").unwrap();
    for _ in 0..3 {
        publisher.publish("sigil/v1/example.org/proxy/x".into(), vec![1, 2, 3]);
    }
    assert_eq!(publisher.dropped(), 3);
    assert!(!publisher.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_packet_costs_a_reconnect_and_nothing_else() {
    let Some(broker) = Mosquitto::start(None).await else {
        return;
    };
    let ca = TestCa::new("example.org");
    let (sub, mut rx) = Subscriber::start(
        &broker.config(),
        "sigil-server-test",
        subscription("example.org"),
    )
    .unwrap();
    until("subscription", || sub.is_subscribed()).await;

    // A raw rumqttc client with no packet limit of ours floods one huge message.
    let mut opts = rumqttc::MqttOptions::new("flooder", "127.0.0.1", broker.port);
    opts.set_max_packet_size(2 << 20, 2 << 20);
    let (raw, mut el) = rumqttc::AsyncClient::new(opts, 8);
    let flood = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    raw.publish(
        "sigil/v1/example.org/proxy/x",
        rumqttc::QoS::AtLeastOnce,
        false,
        vec![b'x'; 1 << 20],
    )
    .await
    .unwrap();
    until("the subscriber to drop the connection", || {
        !sub.is_subscribed()
    })
    .await;
    until("resubscription", || sub.is_subscribed()).await;

    let publisher = Publisher::start(&broker.config(), "sigil-proxy-test").unwrap();
    until("publisher connection", || publisher.is_connected()).await;
    let key = ca.svid_key(PROXY, KeyAlgorithm::EcdsaP256);
    let id = ca.id(PROXY);
    let topic = topic_for(&id, Kind::Proxy).unwrap();
    publisher.publish(topic.clone(), seal(&topic, &message(&id), &key).unwrap());
    let (t, b) = recv(&mut rx).await;
    assert_eq!(open(&t, &b, &ca.bundle(), now()).unwrap().0, id);
    flood.abort();
}
