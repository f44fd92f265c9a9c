//! Continuous verification at the trust authority: each node's risk (the posture its agent
//! reports, the behaviour its telemetry shows), quarantines, and what both change: the `risk`
//! claim of access tokens, the fleet's risk table in every sync stream, and issuance.
//!
//! A node's score is the larger of its posture score (its agent's ruleset) and its behaviour
//! score (the anomaly detector), 100 while the node is quarantined. See `docs/posture.md`.
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sigil_core::SpiffeId;
use sigil_risk::RiskLevel;
use sigil_store::{NodeRiskRecord, QuarantineRecord};

use crate::admin::{ApiError, ApiResult, ok, parse_body};
use crate::{AppState, ServerError};

/// Score thresholds of the levels (`[risk]` in the server config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskLevels {
    pub medium: u8,
    pub high: u8,
    pub critical: u8,
}

impl Default for RiskLevels {
    fn default() -> Self {
        Self {
            medium: 30,
            high: 60,
            critical: 90,
        }
    }
}

impl RiskLevels {
    /// Strictly increasing, within 1..=100.
    pub fn validate(&self) -> Result<(), String> {
        if self.medium == 0
            || self.medium >= self.high
            || self.high >= self.critical
            || self.critical > 100
        {
            return Err(format!(
                "risk levels must satisfy 0 < medium < high < critical <= 100 (got {}, {}, {})",
                self.medium, self.high, self.critical
            ));
        }
        Ok(())
    }

    pub fn level(&self, score: u8) -> RiskLevel {
        if score >= self.critical {
            RiskLevel::Critical
        } else if score >= self.high {
            RiskLevel::High
        } else if score >= self.medium {
            RiskLevel::Medium
        } else {
            RiskLevel::Low
        }
    }
}

/// Behaviour telemetry (`[telemetry]` in the server config): the broker the server
/// subscribes to, and what the detector does with what it hears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `mqtt://host:port`.
    pub broker: String,
    /// Windows an identity is observed before it is scored.
    #[serde(default = "default_learning")]
    pub learning_windows: usize,
    /// Isolation score (0-1) from which a window raises its node's risk.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Isolation score from which the identity (or, for a new executable, its node) is
    /// quarantined.
    #[serde(default = "default_quarantine_threshold")]
    pub quarantine_threshold: f64,
    /// Quarantine automatically (else only raise risk and log).
    #[serde(default = "default_true")]
    pub quarantine: bool,
}

fn default_learning() -> usize {
    30
}
fn default_threshold() -> f64 {
    0.66
}
fn default_quarantine_threshold() -> f64 {
    0.72
}
fn default_true() -> bool {
    true
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.broker.starts_with("mqtt://") {
            return Err(format!(
                "broker must be mqtt://host:port, got {:?}",
                self.broker
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold)
            || !(0.0..=1.0).contains(&self.quarantine_threshold)
            || self.threshold > self.quarantine_threshold
        {
            return Err("need 0 <= threshold <= quarantine_threshold <= 1".into());
        }
        if self.learning_windows == 0 {
            return Err("learning_windows must be at least 1".into());
        }
        Ok(())
    }
}

/// One node's risk as relying parties see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRiskView {
    pub node_id: String,
    pub level: RiskLevel,
    pub score: u8,
    pub at: i64,
    /// The whole node is quarantined.
    pub quarantined: bool,
}

fn clamp_score(s: i64) -> u8 {
    u8::try_from(s.clamp(0, 100)).unwrap_or(100)
}

/// The combined view of a node from its record and whether it is quarantined as a whole.
fn view(
    app: &AppState,
    node_id: &str,
    rec: Option<&NodeRiskRecord>,
    quarantined: bool,
) -> NodeRiskView {
    let (score, at) = match rec {
        Some(r) => (
            clamp_score(r.posture_score.max(r.anomaly_score)),
            r.updated_at,
        ),
        None => (0, 0),
    };
    let score = if quarantined { 100 } else { score };
    NodeRiskView {
        node_id: node_id.to_owned(),
        level: app.config.risk.level(score),
        score,
        at,
        quarantined,
    }
}

/// Every node's risk (nodes with a record or an active quarantine), by node ID.
pub(crate) async fn fleet(app: &AppState) -> Result<Vec<NodeRiskView>, ServerError> {
    let records = app.store.list_node_risk().await?;
    let quarantines = app.store.active_quarantines().await?;
    let mut nodes: BTreeMap<String, (Option<NodeRiskRecord>, bool)> = BTreeMap::new();
    for r in records {
        nodes.insert(r.node_id.clone(), (Some(r), false));
    }
    for q in quarantines.iter().filter(|q| q.spiffe_id.is_none()) {
        nodes.entry(q.node_id.clone()).or_default().1 = true;
    }
    Ok(nodes
        .iter()
        .map(|(id, (rec, q))| view(app, id, rec.as_ref(), *q))
        .collect())
}

/// One node's risk.
pub(crate) async fn node(app: &AppState, node_id: &str) -> Result<NodeRiskView, ServerError> {
    let rec = app.store.node_risk(node_id).await?;
    let quarantined = app
        .store
        .active_quarantines()
        .await?
        .iter()
        .any(|q| q.node_id == node_id && q.spiffe_id.is_none());
    Ok(view(app, node_id, rec.as_ref(), quarantined))
}

/// Whether `spiffe_id` on `node_id` is quarantined (the node as a whole, or that workload).
pub(crate) async fn is_quarantined(
    app: &AppState,
    node_id: &str,
    spiffe_id: &str,
) -> Result<bool, ServerError> {
    Ok(app
        .store
        .active_quarantines()
        .await?
        .iter()
        .any(|q| q.node_id == node_id && q.spiffe_id.as_deref().is_none_or(|id| id == spiffe_id)))
}

/// The most reasons a posture report may carry, and their length.
const MAX_REASONS: usize = 256;
const MAX_REASON_LEN: usize = 512;
/// The largest posture document accepted.
pub(crate) const MAX_POSTURE_JSON: usize = 1 << 20;

/// Records a node's posture report. Refuses a report that is not a posture document, a
/// score above 100, or too many or too long reasons. A change of score or reasons is
/// logged and wakes the sync streams.
pub(crate) async fn report_posture(
    app: &AppState,
    node_id: &SpiffeId,
    posture_json: &str,
    score: u32,
    reasons: &[String],
) -> Result<NodeRiskView, ReportError> {
    check_report(posture_json, score, reasons).map_err(ReportError::Invalid)?;
    let now = app.clock.now();
    let before = app.store.risk_revision().await?;
    let rec = app
        .store
        .put_posture(
            node_id.as_str(),
            posture_json,
            i64::from(score),
            reasons,
            now,
        )
        .await?;
    if app.store.risk_revision().await? != before {
        let mut c = sigil_log::ChangeRecord::new("risk", now);
        c.action = Some("posture".into());
        c.node_id = Some(node_id.to_string());
        c.score = Some(i64::from(score));
        c.reasons = Some(reasons.to_vec());
        app.issuer.log_change(c).await?;
        app.notify_change();
        tracing::info!(node = %node_id, score, "node posture changed");
    }
    let v = node(app, node_id.as_str()).await?;
    Ok(NodeRiskView {
        at: rec.updated_at.max(v.at),
        ..v
    })
}

/// What a posture report must be: a posture document within the size limit, a score of at
/// most 100, and a bounded list of bounded reasons.
fn check_report(posture_json: &str, score: u32, reasons: &[String]) -> Result<(), String> {
    if posture_json.len() > MAX_POSTURE_JSON {
        return Err(format!("posture is larger than {MAX_POSTURE_JSON} bytes"));
    }
    serde_json::from_str::<sigil_risk::Posture>(posture_json)
        .map_err(|e| format!("posture_json: {e}"))?;
    if score > 100 {
        return Err("score must be 0-100".into());
    }
    if reasons.len() > MAX_REASONS || reasons.iter().any(|r| r.len() > MAX_REASON_LEN) {
        return Err(format!(
            "at most {MAX_REASONS} reasons of at most {MAX_REASON_LEN} bytes"
        ));
    }
    Ok(())
}

/// Whether a telemetry message (already opened: signature, chain, topic and source checked)
/// is taken: its window must be recent (not more than ten windows and a minute old, nor a
/// minute ahead), its `seq` above the last one taken from that publisher (a replay or a
/// reordering is dropped), and a node window must come from that node's own agent.
fn admit(
    last_seq: &mut std::collections::HashMap<String, u64>,
    source: &SpiffeId,
    msg: &sigil_risk::TelemetryMessage,
    now: i64,
) -> Result<(), &'static str> {
    let window = i64::from(msg.window_secs.max(1));
    if msg.window_start > now + 60 || msg.window_start < now - 10 * window - 60 {
        return Err("window out of time");
    }
    if msg.node_window.is_some()
        && (msg.node != source.as_str() || !source.path().starts_with("/sigil/node/"))
    {
        return Err("node window not from that node's agent");
    }
    let seq = last_seq.entry(source.to_string()).or_insert(0);
    if msg.seq <= *seq {
        return Err("replayed or reordered");
    }
    *seq = msg.seq;
    Ok(())
}

/// Why a posture report was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReportError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl From<sigil_store::StoreError> for ReportError {
    fn from(e: sigil_store::StoreError) -> Self {
        ReportError::Server(e.into())
    }
}

/// Features as the log holds them: integers, in thousandths.
fn milli(features: &BTreeMap<String, f64>) -> BTreeMap<String, i64> {
    features
        .iter()
        .map(|(k, v)| {
            let m = (v * 1000.0).round();
            let m = if m.is_finite() {
                m.clamp(i64::MIN as f64, i64::MAX as f64) as i64
            } else {
                0
            };
            (k.clone(), m)
        })
        .collect()
}

/// Sets a node's behaviour score (logged when it changed).
pub(crate) async fn set_anomaly(
    app: &AppState,
    node_id: &str,
    score: u8,
    reasons: &[String],
    features: &BTreeMap<String, f64>,
) -> Result<(), ServerError> {
    let now = app.clock.now();
    let before = app.store.risk_revision().await?;
    app.store
        .set_anomaly(node_id, i64::from(score), reasons, now)
        .await?;
    if app.store.risk_revision().await? != before {
        let mut c = sigil_log::ChangeRecord::new("risk", now);
        c.action = Some("anomaly".into());
        c.node_id = Some(node_id.to_owned());
        c.score = Some(i64::from(score));
        c.reasons = Some(reasons.to_vec());
        c.features = Some(milli(features));
        app.issuer.log_change(c).await?;
        app.notify_change();
    }
    Ok(())
}

/// Quarantines a node (`spiffe_id` None) or one workload on it: revokes what that node was
/// issued (of that workload), logs the decision with its features, wakes the sync streams
/// (the revocations reach every proxy, which closes the live connections) and the lease
/// sweeper. Returns the quarantine's id and how many SVIDs were revoked.
pub(crate) async fn quarantine(
    app: &AppState,
    node_id: &str,
    spiffe_id: Option<&str>,
    reason: &str,
    features: &BTreeMap<String, f64>,
) -> Result<(i64, usize), ServerError> {
    let now = app.clock.now();
    let features_json = serde_json::to_string(features)
        .map_err(|e| ServerError::Internal(format!("features: {e}")))?;
    let q = QuarantineRecord {
        id: 0,
        node_id: node_id.to_owned(),
        spiffe_id: spiffe_id.map(str::to_owned),
        reason: reason.chars().take(256).collect(),
        features_json,
        created_at: now,
        cleared_at: None,
    };
    let expires_at = now.saturating_add(i64::from(sigil_core::MAX_X509_TTL_SECS));
    let (id, serials) = app.store.quarantine(&q, expires_at).await?;
    let mut c = sigil_log::ChangeRecord::new("quarantine", now);
    c.action = Some("quarantine".into());
    c.node_id = Some(node_id.to_owned());
    c.spiffe_id = spiffe_id.map(str::to_owned);
    c.reason = Some(q.reason.clone());
    c.quarantine_id = Some(id);
    c.features = Some(milli(features));
    c.serials = Some(serials.clone());
    app.issuer.log_change(c).await?;
    app.notify_change();
    app.secrets.wake();
    tracing::warn!(
        node = node_id,
        workload = spiffe_id.unwrap_or("*"),
        revoked = serials.len(),
        reason,
        "quarantined"
    );
    Ok((id, serials.len()))
}

/// Clears a node's quarantines (or one workload's). Logged.
pub(crate) async fn clear(
    app: &AppState,
    node_id: &str,
    spiffe_id: Option<&str>,
) -> Result<u64, ServerError> {
    let now = app.clock.now();
    let n = app.store.clear_quarantine(node_id, spiffe_id, now).await?;
    if n > 0 {
        let mut c = sigil_log::ChangeRecord::new("quarantine", now);
        c.action = Some("clear".into());
        c.node_id = Some(node_id.to_owned());
        c.spiffe_id = spiffe_id.map(str::to_owned);
        app.issuer.log_change(c).await?;
        app.notify_change();
        tracing::warn!(
            node = node_id,
            workload = spiffe_id.unwrap_or("*"),
            "quarantine cleared"
        );
    }
    Ok(n)
}

/// The `risk` claim for a token issued to the holder of the credential `serial` (an X.509-SVID
/// serial or a JWT-SVID `jti`): its node's risk. `Ok(None)` when the credential was not
/// issued through a node (the admin minted it). `Err` with a message when the holder is
/// quarantined.
pub(crate) async fn claim_for(
    app: &AppState,
    serial: &str,
    spiffe_id: &str,
) -> Result<Result<Option<sigil_pki::RiskClaim>, String>, ServerError> {
    let Some(issued) = app.store.issued_by_serial(serial).await? else {
        return Ok(Ok(None));
    };
    let Ok(node_id) = SpiffeId::new(&issued.requester) else {
        return Ok(Ok(None));
    };
    if is_quarantined(app, node_id.as_str(), spiffe_id).await? {
        return Ok(Err(format!(
            "{spiffe_id} on {node_id} is quarantined until an operator clears it"
        )));
    }
    let v = node(app, node_id.as_str()).await?;
    Ok(Ok(Some(sigil_pki::RiskClaim {
        level: v.level.as_str().to_owned(),
        score: i64::from(v.score),
        at: v.at,
        node: v.node_id,
    })))
}

// ---- behaviour telemetry ----

/// How long a finding keeps raising its node's behaviour score, in windows of the message
/// that carried it: the score decays to the highest finding still remembered, 0 when none.
const FINDING_MEMORY_WINDOWS: i64 = 6;

/// A finding remembered for its node's behaviour score.
struct Remembered {
    until: i64,
    score: u8,
    reasons: Vec<String>,
    features: BTreeMap<String, f64>,
}

/// Subscribes to the fleet's telemetry and runs the detector on it: opens every message
/// (signature, SVID chain against the current bundle, topic and source; replays and stale
/// windows dropped), feeds proxies' per-identity windows and agents' node windows to the
/// detector, raises the node's behaviour score on a finding and quarantines at the top
/// level (the identity on its nodes, or the node for a new executable). Runs until aborted.
pub(crate) async fn telemetry_forever(app: Arc<AppState>, cfg: TelemetryConfig) {
    use sigil_telemetry::{BrokerConfig, DEFAULT_KEEP_ALIVE_SECS, Subscriber};
    let started = BrokerConfig::new(&cfg.broker, DEFAULT_KEEP_ALIVE_SECS).and_then(|b| {
        let id = format!("sigil-server-{}", uuid::Uuid::new_v4().simple());
        let filter = sigil_telemetry::subscription(&app.config.trust_domain.to_string());
        Subscriber::start(&b, &id, filter)
    });
    let (_sub, mut rx) = match started {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "telemetry: cannot subscribe; behaviour detection is off");
            std::future::pending::<()>().await;
            return;
        }
    };
    tracing::info!(broker = %cfg.broker, "telemetry: subscribed");
    let mut det = sigil_risk::Detector::new(sigil_risk::DetectorConfig {
        learning_windows: cfg.learning_windows,
        threshold: cfg.threshold,
        quarantine_threshold: cfg.quarantine_threshold,
        ..Default::default()
    });
    let mut last_seq: std::collections::HashMap<String, u64> = Default::default();
    let mut memory: BTreeMap<String, Vec<Remembered>> = BTreeMap::new();
    let mut parents = Parents::default();
    while let Some((topic, bytes)) = rx.recv().await {
        let now = app.clock.now();
        let bundle = app.authorities.current().bundle.clone();
        let (source, msg) = match sigil_telemetry::open(&topic, &bytes, &bundle, now) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(topic, error = %e, "telemetry: message refused");
                continue;
            }
        };
        tracing::debug!(source = %source, seq = msg.seq, identities = msg.identities.len(), new = msg.node_window.as_ref().map_or(0, |n| n.new_executables.len()), "telemetry: message");
        let window = i64::from(msg.window_secs.max(1));
        if let Err(why) = admit(&mut last_seq, &source, &msg, now) {
            tracing::warn!(source = %source, seq = msg.seq, why, "telemetry: message dropped");
            continue;
        }
        let mut findings: Vec<(sigil_risk::Finding, Vec<String>, Option<String>)> = Vec::new();
        if let Some(nw) = &msg.node_window
            && let Some(f) = det.observe_node(&msg.node, nw)
        {
            findings.push((f, vec![msg.node.clone()], None));
        }
        for w in &msg.identities {
            let nodes = match parents.of(&app, &w.spiffe_id).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "telemetry: reading entries failed");
                    continue;
                }
            };
            // Scored once, attributed to every node the identity is registered on.
            let Some(first) = nodes.first() else { continue };
            if let Some(f) = det.observe(first, msg.window_start, msg.window_secs, w) {
                findings.push((f, nodes.clone(), Some(w.spiffe_id.clone())));
            }
        }
        for (f, nodes, workload) in findings {
            let score = clamp_score((f.score * 100.0).round() as i64);
            tracing::warn!(identity = f.spiffe_id, score, quarantine = f.quarantine, reasons = ?f.reasons, "telemetry: anomaly");
            for node in &nodes {
                memory.entry(node.clone()).or_default().push(Remembered {
                    until: now + FINDING_MEMORY_WINDOWS * window,
                    score,
                    reasons: f.reasons.clone(),
                    features: f.features.clone(),
                });
                if f.quarantine && cfg.quarantine {
                    let reason = format!("anomaly {:.3}: {}", f.score, f.reasons.join("; "));
                    if let Err(e) =
                        quarantine(&app, node, workload.as_deref(), &reason, &f.features).await
                    {
                        tracing::error!(error = %e, node, "telemetry: quarantine failed");
                    }
                }
            }
        }
        // Every node's behaviour score: its highest remembered finding (0 once none is).
        let mut cleared = Vec::new();
        for (node, list) in memory.iter_mut() {
            list.retain(|r| r.until > now);
            let top = list.iter().max_by_key(|r| r.score);
            let (score, reasons, features) = match top {
                Some(r) => (r.score, r.reasons.clone(), r.features.clone()),
                None => (0, Vec::new(), BTreeMap::new()),
            };
            if let Err(e) = set_anomaly(&app, node, score, &reasons, &features).await {
                tracing::error!(error = %e, node, "telemetry: recording the behaviour score failed");
            }
            if list.is_empty() {
                cleared.push(node.clone());
            }
        }
        for n in cleared {
            memory.remove(&n);
        }
    }
    tracing::error!("telemetry: subscription ended");
    std::future::pending::<()>().await;
}

/// The nodes (parent IDs) of each identity's registration entries, re-read when the entries
/// change.
#[derive(Default)]
struct Parents {
    revision: i64,
    by_id: std::collections::HashMap<String, Vec<String>>,
}

impl Parents {
    async fn of(&mut self, app: &AppState, spiffe_id: &str) -> Result<Vec<String>, ServerError> {
        let rev = app.store.entries_revision().await?;
        if rev != self.revision {
            self.by_id.clear();
            self.revision = rev;
        }
        if let Some(n) = self.by_id.get(spiffe_id) {
            return Ok(n.clone());
        }
        let nodes: Vec<String> = match SpiffeId::new(spiffe_id) {
            Ok(id) => {
                let mut v: Vec<String> = app
                    .store
                    .list_entries(&sigil_store::EntryFilter {
                        spiffe_id: Some(id),
                        parent_id: None,
                    })
                    .await?
                    .into_iter()
                    .map(|e| e.spec.parent_id.to_string())
                    .filter(|p| p.contains("/sigil/node/"))
                    .collect();
                v.sort();
                v.dedup();
                v
            }
            Err(_) => Vec::new(),
        };
        if self.by_id.len() > 10_000 {
            self.by_id.clear();
        }
        self.by_id.insert(spiffe_id.to_owned(), nodes.clone());
        Ok(nodes)
    }
}

// ---- admin API ----

/// `GET /v1/risk`: every node's risk and the active quarantines.
pub(crate) async fn list(State(app): State<Arc<AppState>>) -> ApiResult {
    let nodes = fleet(&app).await?;
    let records = app.store.list_node_risk().await?;
    let quarantines = app.store.active_quarantines().await?;
    let reasons: BTreeMap<&str, (&[String], &[String])> = records
        .iter()
        .map(|r| {
            (
                r.node_id.as_str(),
                (r.posture_reasons.as_slice(), r.anomaly_reasons.as_slice()),
            )
        })
        .collect();
    let nodes: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (posture, anomaly) = reasons.get(n.node_id.as_str()).copied().unwrap_or_default();
            json!({
                "node_id": n.node_id, "level": n.level, "score": n.score, "at": n.at,
                "quarantined": n.quarantined, "posture_reasons": posture,
                "anomaly_reasons": anomaly,
            })
        })
        .collect();
    ok(
        StatusCode::OK,
        &json!({"nodes": nodes, "quarantines": quarantines}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineRequest {
    node_id: SpiffeId,
    #[serde(default)]
    spiffe_id: Option<SpiffeId>,
    #[serde(default)]
    reason: String,
}

/// `POST /v1/nodes/quarantine`: an operator quarantines a node or a workload on it.
pub(crate) async fn quarantine_handler(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: QuarantineRequest = parse_body(&body)?;
    if app.store.get_node(&req.node_id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no node {}", req.node_id),
        ));
    }
    let reason = if req.reason.is_empty() {
        "operator".to_owned()
    } else {
        format!("operator: {}", req.reason)
    };
    let workload = req.spiffe_id.as_ref().map(SpiffeId::as_str);
    let (id, revoked) = quarantine(
        &app,
        req.node_id.as_str(),
        workload,
        &reason,
        &BTreeMap::new(),
    )
    .await?;
    ok(
        StatusCode::OK,
        &json!({"quarantine_id": id, "node_id": req.node_id, "spiffe_id": workload, "revoked": revoked}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearRequest {
    node_id: SpiffeId,
    #[serde(default)]
    spiffe_id: Option<SpiffeId>,
}

/// `POST /v1/nodes/clear`: an operator lifts a quarantine.
pub(crate) async fn clear_handler(State(app): State<Arc<AppState>>, body: Bytes) -> ApiResult {
    let req: ClearRequest = parse_body(&body)?;
    let workload = req.spiffe_id.as_ref().map(SpiffeId::as_str);
    let n = clear(&app, req.node_id.as_str(), workload).await?;
    if n == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} has no active quarantine", req.node_id),
        ));
    }
    ok(
        StatusCode::OK,
        &json!({"cleared": n, "node_id": req.node_id}),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn levels_follow_thresholds_and_refuse_disorder() {
        let l = RiskLevels::default();
        assert_eq!(l.level(0), RiskLevel::Low);
        assert_eq!(l.level(29), RiskLevel::Low);
        assert_eq!(l.level(30), RiskLevel::Medium);
        assert_eq!(l.level(60), RiskLevel::High);
        assert_eq!(l.level(100), RiskLevel::Critical);
        assert!(l.validate().is_ok());
        for bad in [(0, 60, 90), (60, 60, 90), (30, 90, 60), (30, 60, 101)] {
            let l = RiskLevels {
                medium: bad.0,
                high: bad.1,
                critical: bad.2,
            };
            assert!(l.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn posture_reports_are_checked() {
        let ok = serde_json::to_string(&sigil_risk::Posture::default()).unwrap();
        assert!(check_report(&ok, 100, &["x".into()]).is_ok());
        assert!(check_report(&ok, 101, &[]).unwrap_err().contains("0-100"));
        assert!(check_report("{\"kernel\": 5}", 0, &[]).is_err());
        assert!(check_report("not json", 0, &[]).is_err());
        assert!(check_report(&ok, 0, &vec!["r".into(); 257]).is_err());
        assert!(check_report(&ok, 0, &["r".repeat(513)]).is_err());
        let big = format!("{{\"os_release\":\"{}\"}}", "a".repeat(MAX_POSTURE_JSON));
        assert!(check_report(&big, 0, &[]).unwrap_err().contains("larger"));
    }

    #[test]
    fn telemetry_replays_stale_windows_and_foreign_node_windows_are_dropped() {
        let now = 1_700_000_000;
        let agent = SpiffeId::new("spiffe://td/sigil/node/n1").unwrap();
        let proxy = SpiffeId::new("spiffe://td/proxy").unwrap();
        let msg = |seq, start, node_window: bool, node: &str| sigil_risk::TelemetryMessage {
            source: String::new(),
            node: node.into(),
            window_start: start,
            window_secs: 10,
            seq,
            identities: Vec::new(),
            node_window: node_window.then(sigil_risk::NodeWindow::default),
        };
        let mut seen = std::collections::HashMap::new();
        let n1 = agent.as_str();
        assert!(admit(&mut seen, &agent, &msg(1, now, true, n1), now).is_ok());
        // The same seq again, or an older one: a replay.
        assert_eq!(
            admit(&mut seen, &agent, &msg(1, now, true, n1), now),
            Err("replayed or reordered")
        );
        assert!(admit(&mut seen, &agent, &msg(2, now, true, n1), now).is_ok());
        // Windows too old or from the future.
        assert_eq!(
            admit(&mut seen, &agent, &msg(3, now - 200, true, n1), now),
            Err("window out of time")
        );
        assert_eq!(
            admit(&mut seen, &agent, &msg(3, now + 61, true, n1), now),
            Err("window out of time")
        );
        // A node window for another node, or from a proxy.
        assert!(
            admit(
                &mut seen,
                &agent,
                &msg(3, now, true, "spiffe://td/sigil/node/n2"),
                now
            )
            .is_err()
        );
        let p = proxy.as_str();
        assert!(admit(&mut seen, &proxy, &msg(1, now, true, p), now).is_err());
        // A proxy's identity windows: its own seq space.
        assert!(admit(&mut seen, &proxy, &msg(1, now, false, ""), now).is_ok());
    }

    #[test]
    fn features_are_logged_in_thousandths() {
        let mut f = BTreeMap::new();
        f.insert("a".to_owned(), 1.2345);
        f.insert("b".to_owned(), f64::NAN);
        f.insert("c".to_owned(), -2.0);
        let m = milli(&f);
        assert_eq!(m.get("a"), Some(&1235));
        assert_eq!(m.get("b"), Some(&0));
        assert_eq!(m.get("c"), Some(&-2000));
    }
}
