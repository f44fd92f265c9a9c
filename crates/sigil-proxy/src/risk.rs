//! The caller's node risk for `context.risk`: the `risk` claim of its token (the trust
//! authority's view when it issued the token), replaced by the entry of the fleet risk table
//! the local agent streams (`WatchRisk`) when that entry is at least as recent, so a risk
//! raised (or lowered) after the token was issued takes effect at once, not at its expiry.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use sigil_pki::AccessTokenClaims;
use sigil_policy::RiskContext;

/// The fleet's node risks, by node SPIFFE ID; swapped whole on every update.
#[derive(Debug, Default)]
pub struct RiskTable {
    pub revision: i64,
    nodes: HashMap<String, RiskContext>,
}

impl RiskTable {
    pub fn from_pb(t: &sigil_proto::enforcer::RiskTable) -> Self {
        Self {
            revision: t.revision,
            nodes: t
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.node_id.clone(),
                        RiskContext {
                            level: n.level.clone(),
                            score: i64::from(n.score.min(100)),
                            at: n.at,
                            node: n.node_id.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// `context.risk` for a caller with `claims`: `None` (unknown to policy) without a
    /// `risk` claim, since the claim is what names the caller's node.
    pub fn context_for(&self, claims: &AccessTokenClaims) -> Option<RiskContext> {
        let claim = claims.risk.as_ref()?;
        if let Some(fresher) = self.nodes.get(&claim.node)
            && fresher.at >= claim.at
        {
            return Some(fresher.clone());
        }
        Some(RiskContext {
            level: claim.level.clone(),
            score: claim.score,
            at: claim.at,
            node: claim.node.clone(),
        })
    }
}

/// Follows the agent's `WatchRisk` stream (reconnecting with backoff) into `current`.
pub fn watch_agent(socket: &str, current: Arc<ArcSwap<RiskTable>>) {
    let path = crate::workload::socket_path(socket);
    tokio::spawn(async move {
        use sigil_proto::enforcer as epb;
        let mut backoff = Duration::from_millis(250);
        loop {
            let opened = async {
                let channel = crate::workload::connect(path.clone()).await?;
                let s = epb::enforcer_client::EnforcerClient::new(channel)
                    .watch_risk(crate::workload::request(epb::WatchRiskRequest {}))
                    .await
                    .context("WatchRisk (the agent's Enforcer API)")?
                    .into_inner();
                anyhow::Ok(s)
            };
            match opened.await {
                Ok(mut stream) => {
                    backoff = Duration::from_millis(250);
                    loop {
                        match stream.message().await {
                            Ok(Some(t)) => {
                                if t.revision >= current.load().revision {
                                    tracing::info!(
                                        revision = t.revision,
                                        nodes = t.nodes.len(),
                                        "risk table updated"
                                    );
                                    current.store(Arc::new(RiskTable::from_pb(&t)));
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "risk stream from the agent ended");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = format!("{e:#}"), "agent risk stream unavailable")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sigil_proto::enforcer as epb;

    fn claims(risk: Option<(&str, i64, i64)>) -> AccessTokenClaims {
        AccessTokenClaims {
            risk: risk.map(|(level, score, at)| sigil_pki::RiskClaim {
                level: level.into(),
                score,
                at,
                node: "spiffe://td/sigil/node/a".into(),
            }),
            ..Default::default()
        }
    }

    fn table(level: &str, score: u32, at: i64) -> RiskTable {
        RiskTable::from_pb(&epb::RiskTable {
            revision: 3,
            nodes: vec![epb::NodeRisk {
                node_id: "spiffe://td/sigil/node/a".into(),
                level: level.into(),
                score,
                at,
                quarantined: false,
            }],
        })
    }

    #[test]
    fn no_claim_is_unknown_whatever_the_table_says() {
        assert_eq!(table("low", 0, 10).context_for(&claims(None)), None);
    }

    #[test]
    fn a_fresher_table_entry_wins_over_the_claim_and_an_older_one_does_not() {
        let c = claims(Some(("low", 5, 100)));
        let raised = table("high", 70, 150).context_for(&c).unwrap();
        assert_eq!((raised.level.as_str(), raised.score), ("high", 70));
        let stale = table("high", 70, 50).context_for(&c).unwrap();
        assert_eq!((stale.level.as_str(), stale.score), ("low", 5));
        let other = RiskTable::default().context_for(&c).unwrap();
        assert_eq!(other.level, "low");
    }
}
