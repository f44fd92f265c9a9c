//! A TCP relay between one agent and the trust authority, which the evaluation cuts to
//! inject link failures: a cut closes the relayed connections and refuses new ones until
//! it ends, as a lost uplink would.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub(super) struct Relay {
    pub(super) port: u16,
    cut_until: Mutex<Option<Instant>>,
    live: Mutex<Vec<AbortHandle>>,
    accept: AbortHandle,
}

impl Relay {
    /// Relays a fresh loopback port to `127.0.0.1:<to>`.
    pub(super) async fn start(to: u16) -> anyhow::Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let relay = Arc::new_cyclic(|weak: &std::sync::Weak<Relay>| {
            let weak = weak.clone();
            let accept = tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let Some(r) = weak.upgrade() else { return };
                    if r.is_cut() {
                        drop(client);
                        continue;
                    }
                    let pipe = tokio::spawn(async move {
                        let mut client = client;
                        if let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await {
                            let _ = server.set_nodelay(true);
                            let _ = client.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    let mut live = r.live.lock().unwrap_or_else(|e| e.into_inner());
                    live.retain(|h| !h.is_finished());
                    live.push(pipe.abort_handle());
                }
            });
            Relay {
                port,
                cut_until: Mutex::new(None),
                live: Mutex::new(Vec::new()),
                accept: accept.abort_handle(),
            }
        });
        Ok(relay)
    }

    fn is_cut(&self) -> bool {
        self.cut_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// Cuts the link for `d`: open connections close now, new ones are refused until then.
    pub(super) fn cut(&self, d: Duration) {
        *self.cut_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + d);
        for h in self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut(Duration::ZERO);
    }
}
