//! Publishing sealed envelopes, without ever making the caller wait.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::task::JoinHandle;

use crate::broker::{BrokerConfig, Step, client, drive};
use crate::error::TelemetryError;

/// How many messages may wait for the event loop before [`Publisher::publish`] drops.
pub const PUBLISH_QUEUE: usize = 256;

#[derive(Default)]
struct Shared {
    connected: AtomicBool,
    dropped: AtomicU64,
    acked: AtomicU64,
}

/// An MQTT publisher: a client plus its event-loop task, which connects, reconnects with
/// backoff, and sends QoS 1 publishes. Dropping it stops the task.
pub struct Publisher {
    client: AsyncClient,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("connected", &self.is_connected())
            .field("dropped", &self.dropped())
            .field("acked", &self.acked())
            .finish()
    }
}

impl Publisher {
    /// Starts the event-loop task on the current tokio runtime. Returns at once: the connection
    /// is made (and remade) in the background. Errors: an invalid configuration or client ID
    /// (1 to 256 bytes), or no tokio runtime.
    pub fn start(broker: &BrokerConfig, client_id: &str) -> Result<Publisher, TelemetryError> {
        let (client, eventloop, rt) = client(broker, client_id, PUBLISH_QUEUE)?;
        let shared = Arc::new(Shared::default());
        let on_event = {
            let shared = Arc::clone(&shared);
            move |event: Event| {
                match event {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        shared.connected.store(true, Ordering::Relaxed);
                    }
                    Event::Incoming(Packet::PubAck(_)) => {
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                Step::Continue
            }
        };
        let on_down = {
            let shared = Arc::clone(&shared);
            move || shared.connected.store(false, Ordering::Relaxed)
        };
        let task = rt.spawn(drive(eventloop, "telemetry publisher", on_event, on_down));
        Ok(Publisher {
            client,
            shared,
            task,
        })
    }

    /// Queues `payload` for `topic` at QoS 1 and returns at once. Dropped (and counted in
    /// [`Publisher::dropped`]) when the broker is not connected, the queue
    /// ([`PUBLISH_QUEUE`]) is full, or the topic is not a valid topic name.
    ///
    /// Delivery is at least once within one connection: with a clean session, messages still
    /// unacknowledged when the connection drops are not resent after reconnecting (the next
    /// window's summary follows anyway).
    pub fn publish(&self, topic: String, payload: Vec<u8>) {
        if !self.is_connected() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
        {
            tracing::debug!(error = %e, "telemetry message dropped");
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Messages dropped since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Publishes the broker acknowledged (PUBACK) since start.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// Whether the event loop is connected to the broker now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
