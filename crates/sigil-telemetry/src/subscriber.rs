//! Receiving envelopes: a subscription that survives reconnects.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rumqttc::{AsyncClient, Event, Packet, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::broker::{BrokerConfig, Step, client, drive};
use crate::error::TelemetryError;

/// How many received messages may wait in the channel before new ones are dropped.
pub const RECEIVE_QUEUE: usize = 1024;

/// One received message: its topic and its payload (an envelope, not yet verified).
pub type Received = (String, Vec<u8>);

#[derive(Default)]
struct Shared {
    subscribed: AtomicBool,
    dropped: AtomicU64,
}

/// An MQTT subscriber: a client plus its event-loop task. The session is clean, so the task
/// subscribes to the filter again on every ConnAck. Received messages (topic, payload) go to the
/// channel returned by [`Subscriber::start`]; they are not verified: pass each to
/// [`crate::open`]. Dropping the subscriber, or the receiver, stops the task.
///
/// A packet larger than [`crate::MAX_PACKET_LEN`] is a protocol error to rumqttc: the
/// connection is dropped and remade (the oversize message is lost, nothing else is), so a
/// flooder can cost reconnects but cannot get a message through unverified.
pub struct Subscriber {
    _client: AsyncClient,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("subscribed", &self.is_subscribed())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Subscriber {
    /// Starts the event-loop task on the current tokio runtime and returns at once, with the
    /// receiving end of a channel of [`RECEIVE_QUEUE`] messages. A message arriving while the
    /// channel is full is dropped and counted in [`Subscriber::dropped`]. Errors: an invalid
    /// configuration or client ID, or no tokio runtime.
    pub fn start(
        broker: &BrokerConfig,
        client_id: &str,
        filter: String,
    ) -> Result<(Subscriber, mpsc::Receiver<Received>), TelemetryError> {
        let (client, eventloop, rt) = client(broker, client_id, 16)?;
        let (tx, rx) = mpsc::channel(RECEIVE_QUEUE);
        let shared = Arc::new(Shared::default());
        let on_event = {
            let shared = Arc::clone(&shared);
            let client = client.clone();
            move |event: Event| match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, filter, "cannot subscribe");
                    }
                    Step::Continue
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    let ok = ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                    if !ok {
                        tracing::warn!(filter, "the broker refused the subscription");
                    }
                    shared.subscribed.store(ok, Ordering::Relaxed);
                    Step::Continue
                }
                Event::Incoming(Packet::Publish(p)) => {
                    match tx.try_send((p.topic, p.payload.to_vec())) {
                        Ok(()) => Step::Continue,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            shared.dropped.fetch_add(1, Ordering::Relaxed);
                            Step::Continue
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => Step::Stop,
                    }
                }
                _ => Step::Continue,
            }
        };
        let on_down = {
            let shared = Arc::clone(&shared);
            move || shared.subscribed.store(false, Ordering::Relaxed)
        };
        let task = rt.spawn(drive(eventloop, "telemetry subscriber", on_event, on_down));
        Ok((
            Subscriber {
                _client: client,
                shared,
                task,
            },
            rx,
        ))
    }

    /// Whether the broker has acknowledged the subscription on the current connection.
    pub fn is_subscribed(&self) -> bool {
        self.shared.subscribed.load(Ordering::Relaxed)
    }

    /// Messages dropped because the channel was full, since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
