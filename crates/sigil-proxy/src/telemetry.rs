//! Behaviour telemetry: every request is counted per calling identity (a few hundred
//! nanoseconds, no I/O on the request path), and once per window the counts are published to
//! the MQTT broker as one message signed with the proxy's SVID (`sigil_telemetry::seal`) on
//! the proxy's topic. Summaries, not per-request messages. See `docs/posture.md`.
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::BodyExt;
use hyper::body::Frame;
use sigil_core::Clock;
use sigil_telemetry::{Aggregator, BrokerConfig, Kind, Publisher};

use crate::Credentials;
use crate::respond::Body;

/// The proxy's telemetry: the counters of the current window.
pub struct Telemetry {
    agg: Aggregator,
}

impl Telemetry {
    /// Counts one request of `spiffe_id`: one per call it makes (a JSON-RPC batch makes
    /// several), keyed `<action>:<resource>`; `refused:-` when it was refused before any call
    /// was read.
    pub(crate) fn request<'a>(
        &self,
        spiffe_id: &str,
        calls: impl Iterator<Item = (&'a str, &'a str)>,
        denied: bool,
        bytes_in: u64,
    ) {
        let mut first = true;
        let mut key = String::with_capacity(64);
        for (action, resource) in calls {
            key.clear();
            key.push_str(action);
            key.push(':');
            key.push_str(resource);
            self.agg
                .record(spiffe_id, &key, denied, if first { bytes_in } else { 0 }, 0);
            first = false;
        }
        if first {
            self.agg.record(spiffe_id, "refused:-", denied, bytes_in, 0);
        }
    }

    /// `body`, counted: its size is added to `spiffe_id`'s window when it ends (or is dropped).
    pub(crate) fn count_response(self: &Arc<Self>, spiffe_id: &str, body: Body) -> Body {
        struct Counter {
            t: Arc<Telemetry>,
            id: String,
            n: u64,
        }
        impl Drop for Counter {
            fn drop(&mut self) {
                self.t.agg.record_response(&self.id, self.n);
            }
        }
        let mut c = Counter {
            t: self.clone(),
            id: spiffe_id.to_owned(),
            n: 0,
        };
        body.map_frame(move |f: Frame<hyper::body::Bytes>| {
            // The whole counter, not just `c.n` (a closure would capture the field alone, a
            // copy, and the counter would be dropped here with nothing counted).
            let c = &mut c;
            if let Some(d) = f.data_ref() {
                c.n = c.n.saturating_add(d.len() as u64);
            }
            f
        })
        .boxed()
    }
}

/// Starts publishing every `window_secs` to `broker`; returns the counters to feed.
pub fn start(
    broker: &str,
    window_secs: u32,
    creds: Arc<ArcSwap<Credentials>>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<Telemetry>> {
    let broker = BrokerConfig::new(broker, sigil_telemetry::DEFAULT_KEEP_ALIVE_SECS)?;
    let client_id = format!("sigil-proxy-{}", uuid::Uuid::new_v4().simple());
    let publisher = Publisher::start(&broker, &client_id)?;
    let t = Arc::new(Telemetry {
        agg: Aggregator::default(),
    });
    let counters = t.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(u64::from(window_secs)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut seq = 0u64;
        let mut window_start = clock.now();
        loop {
            tick.tick().await;
            let identities = counters.agg.take();
            let now = clock.now();
            let start = std::mem::replace(&mut window_start, now);
            if identities.is_empty() {
                continue;
            }
            let c = creds.load_full();
            let chain: Vec<&[u8]> = c.serving.cert.iter().map(|d| d.as_ref()).collect();
            let me = match sigil_pki::verify_x509_svid(&chain, &c.x509, now) {
                Ok(v) => v.spiffe_id,
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry: own SVID does not verify; window dropped");
                    continue;
                }
            };
            let Ok(topic) = sigil_telemetry::topic_for(&me, Kind::Proxy) else {
                continue;
            };
            seq += 1;
            let msg = sigil_risk::TelemetryMessage {
                source: me.to_string(),
                node: String::new(),
                window_start: start,
                window_secs,
                seq,
                identities,
                node_window: None,
            };
            match sigil_telemetry::seal(&topic, &msg, &c.serving) {
                Ok(bytes) => publisher.publish(topic, bytes),
                Err(e) => tracing::warn!(error = %e, "telemetry: sealing failed; window dropped"),
            }
        }
    });
    Ok(t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn a_batch_counts_each_call_and_its_bytes_once() {
        let t = Telemetry {
            agg: Aggregator::default(),
        };
        t.request(
            "spiffe://td/a",
            [("call_tool", "x"), ("call_tool", "y")].into_iter(),
            false,
            100,
        );
        t.request("spiffe://td/a", std::iter::empty(), true, 7);
        let w = t.agg.take();
        assert_eq!(w[0].requests.get("call_tool:x"), Some(&1));
        assert_eq!(w[0].requests.get("call_tool:y"), Some(&1));
        assert_eq!(w[0].requests.get("refused:-"), Some(&1));
        assert_eq!((w[0].bytes_in, w[0].denied), (107, 1));
    }

    #[tokio::test]
    async fn a_counted_body_adds_its_size_when_it_ends() {
        let t = Arc::new(Telemetry {
            agg: Aggregator::default(),
        });
        let body = crate::respond::full(hyper::body::Bytes::from_static(b"0123456789"));
        let counted = t.count_response("spiffe://td/a", body);
        let bytes = counted.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 10);
        let w = t.agg.take();
        assert_eq!((w[0].bytes_out, w[0].max_response_bytes), (10, 10));
    }
}
