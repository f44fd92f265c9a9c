//! The broker's address, and the event-loop driver the publisher and subscriber share.
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions};
use serde::{Deserialize, Serialize};

use crate::envelope::MAX_ENVELOPE_LEN;
use crate::error::TelemetryError;

/// The keep-alive used when the configuration gives none, in seconds.
pub const DEFAULT_KEEP_ALIVE_SECS: u16 = 30;
/// The first wait before reconnecting, doubled after every failed attempt up to
/// [`MAX_BACKOFF`], and reset once connected.
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The largest MQTT packet sent or accepted: an envelope plus room for the topic and header.
pub const MAX_PACKET_LEN: usize = MAX_ENVELOPE_LEN + 8 * 1024;

fn default_keep_alive() -> u16 {
    DEFAULT_KEEP_ALIVE_SECS
}

/// Where the MQTT broker is.
///
/// `url` is `mqtt://<host>:<port>`: scheme `mqtt` only (plain TCP; MQTT over TLS is a later
/// step, and the broker is not trusted anyway: every message is signed), a host (DNS name,
/// IPv4, or `[IPv6]`) and a port, nothing else (no user, path, query or fragment).
/// `keep_alive_secs` is between 5 and 3600.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port`.
    pub url: String,
    /// MQTT keep-alive, seconds (default 30).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
}

impl BrokerConfig {
    /// A checked configuration (see [`BrokerConfig::endpoint`]).
    pub fn new(url: &str, keep_alive_secs: u16) -> Result<Self, TelemetryError> {
        let cfg = Self {
            url: url.into(),
            keep_alive_secs,
        };
        cfg.endpoint()?;
        Ok(cfg)
    }

    /// The host and port of `url`, after checking the whole configuration strictly.
    pub fn endpoint(&self) -> Result<(String, u16), TelemetryError> {
        let bad = |why: &str| TelemetryError::Config(format!("url {:?}: {why}", self.url));
        if !(5..=3600).contains(&self.keep_alive_secs) {
            return Err(TelemetryError::Config(format!(
                "keep_alive_secs {} is not between 5 and 3600",
                self.keep_alive_secs
            )));
        }
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .ok_or_else(|| bad("only mqtt://host:port is supported"))?;
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, port) = v6
                .split_once("]:")
                .ok_or_else(|| bad("expected [IPv6]:port"))?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("bad IPv6 address"))?;
            (addr, port)
        } else {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("a port is required"))?;
            let host_ok = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                && !host.starts_with(['.', '-']);
            if !host_ok {
                return Err(bad("bad host"));
            }
            (host, port)
        };
        let port_ok = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| port_ok && *p != 0)
            .ok_or_else(|| bad("bad port"))?;
        Ok((host.to_owned(), port))
    }

    /// rumqttc options: clean session, this keep-alive, [`MAX_PACKET_LEN`] both ways.
    pub(crate) fn options(
        &self,
        client_id: &str,
        queue: usize,
    ) -> Result<MqttOptions, TelemetryError> {
        let (host, port) = self.endpoint()?;
        if client_id.is_empty() || client_id.len() > 256 {
            return Err(TelemetryError::Config(
                "client_id must hold 1 to 256 bytes".into(),
            ));
        }
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(Duration::from_secs(u64::from(self.keep_alive_secs)))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET_LEN, MAX_PACKET_LEN)
            .set_request_channel_capacity(queue);
        Ok(opts)
    }
}

/// Makes the client and event loop, checking first that a tokio runtime is there to run it.
pub(crate) fn client(
    broker: &BrokerConfig,
    client_id: &str,
    queue: usize,
) -> Result<(AsyncClient, EventLoop, tokio::runtime::Handle), TelemetryError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let opts = broker.options(client_id, queue)?;
    let (client, eventloop) = AsyncClient::new(opts, queue);
    Ok((client, eventloop, handle))
}

/// What the driver tells its owner.
pub(crate) enum Step {
    /// Keep polling.
    Continue,
    /// Stop the task (the owner is gone).
    Stop,
}

/// Polls `eventloop` for ever: events go to `on_event`; after an error, `on_down` is called and
/// the next attempt waits (exponential backoff from [`MIN_BACKOFF`] to [`MAX_BACKOFF`], reset by
/// the next ConnAck).
pub(crate) async fn drive(
    mut eventloop: EventLoop,
    what: &'static str,
    mut on_event: impl FnMut(Event) -> Step,
    on_down: impl Fn(),
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match eventloop.poll().await {
            Ok(event) => {
                if matches!(event, Event::Incoming(rumqttc::Packet::ConnAck(_))) {
                    tracing::info!(what, "connected to the MQTT broker");
                    backoff = MIN_BACKOFF;
                }
                if let Step::Stop = on_event(event) {
                    return;
                }
            }
            Err(e) => {
                on_down();
                tracing::warn!(what, error = %e, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "MQTT connection down");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(url: &str) -> Result<(String, u16), TelemetryError> {
        BrokerConfig::new(url, 30).and_then(|c| c.endpoint())
    }

    #[test]
    fn urls_are_parsed_strictly() {
        assert_eq!(
            ep("mqtt://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(
            ep("mqtt://broker.local:8883").unwrap(),
            ("broker.local".into(), 8883)
        );
        assert_eq!(ep("mqtt://[::1]:1883").unwrap(), ("::1".into(), 1883));
        for bad in [
            "",
            "127.0.0.1:1883",
            "mqtts://h:8883",
            "tcp://h:1883",
            "MQTT://h:1883",
            "mqtt://h",
            "mqtt://h:",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:65536",
            "mqtt://h:+1",
            "mqtt://h:1883/",
            "mqtt://u@h:1883",
            "mqtt://h:1883?x",
            "mqtt://[::1]",
            "mqtt://[zz]:1883",
            "mqtt://-h:1883",
        ] {
            assert!(ep(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keep_alive_is_bounded() {
        assert!(BrokerConfig::new("mqtt://h:1", 4).is_err());
        assert!(BrokerConfig::new("mqtt://h:1", 3601).is_err());
        let cfg: BrokerConfig = serde_json::from_str(r#"{"url":"mqtt://h:1"}"#).unwrap();
        assert_eq!(cfg.keep_alive_secs, DEFAULT_KEEP_ALIVE_SECS);
        assert!(serde_json::from_str::<BrokerConfig>(r#"{"url":"mqtt://h:1","x":1}"#).is_err());
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error() {
        let cfg = BrokerConfig::new("mqtt://127.0.0.1:1", 30).unwrap();
        assert!(matches!(
            client(&cfg, "c", 8),
            Err(TelemetryError::NoRuntime)
        ));
    }
}
