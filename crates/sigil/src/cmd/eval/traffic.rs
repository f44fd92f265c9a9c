//! The traffic: a deterministic plan of benign and adversarial requests, and its execution
//! against one system (open loop, at a fixed offered rate). Every adversarial request knows
//! its right outcome (blocked: it must not reach a model server); the model servers'
//! record of request numbers says what actually got through.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::client::{Endpoint, Outcome, Pool, Svid, Wire};
use super::fleet::{self, GROUPS, TOOL_FORBIDDEN, TOOL_OK};
use super::upstream::{SEQ_HEADER, Seen};

/// The adversarial request classes, grouped by the paper's three attack models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Attack {
    /// A token captured from another node's workload, replayed with the attacker's own
    /// (valid) certificate: the token is not bound to it.
    TokenReplay,
    /// A workload whose SVID was revoked, with the token it held before.
    RevokedCredential,
    /// A correctly signed token whose lifetime has ended.
    ExpiredToken,
    /// A token with its claims altered (groups) under the original signature, or signed
    /// by a key the authority never published.
    ForgedToken,
    /// A valid workload calling a model its policy does not allow (lateral movement).
    LateralModel,
    /// A valid workload calling a tool its policy does not allow.
    LateralTool,
    /// A process with no identity at all (no certificate, no token or key).
    NoIdentity,
    /// A valid workload claiming another's identity in headers (`x-sigil-spiffe-id`,
    /// `X-Forwarded-Client-Cert`, `X-Forwarded-For`) to reach that one's model.
    SpoofedHeaders,
    /// An older, correctly signed policy bundle replayed to an agent.
    StalePolicy,
    /// A policy bundle altered (allow everything) under the original signature.
    TamperedPolicy,
    /// A workload of a node whose risk rose mid-run (quarantined), calling as before.
    RiskRevoked,
}

impl Attack {
    pub(super) const ALL: [Attack; 11] = [
        Attack::TokenReplay,
        Attack::RevokedCredential,
        Attack::ExpiredToken,
        Attack::ForgedToken,
        Attack::LateralModel,
        Attack::LateralTool,
        Attack::NoIdentity,
        Attack::SpoofedHeaders,
        Attack::StalePolicy,
        Attack::TamperedPolicy,
        Attack::RiskRevoked,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Attack::TokenReplay => "token-replay",
            Attack::RevokedCredential => "revoked-credential",
            Attack::ExpiredToken => "expired-token",
            Attack::ForgedToken => "forged-token",
            Attack::LateralModel => "lateral-model",
            Attack::LateralTool => "lateral-tool",
            Attack::NoIdentity => "no-identity",
            Attack::SpoofedHeaders => "spoofed-headers",
            Attack::StalePolicy => "stale-policy",
            Attack::TamperedPolicy => "tampered-policy",
            Attack::RiskRevoked => "risk-revoked",
        }
    }

    /// The paper's attack model this class belongs to.
    pub(super) fn model(self) -> &'static str {
        match self {
            Attack::TokenReplay
            | Attack::RevokedCredential
            | Attack::ExpiredToken
            | Attack::ForgedToken
            | Attack::NoIdentity
            | Attack::RiskRevoked => "credential replay",
            Attack::LateralModel | Attack::LateralTool | Attack::SpoofedHeaders => {
                "lateral movement"
            }
            Attack::StalePolicy | Attack::TamperedPolicy => "policy tampering",
        }
    }
}

/// What a planned request calls.
#[derive(Debug, Clone)]
enum Call {
    Model(&'static str),
    Tool(&'static str),
}

#[derive(Debug, Clone)]
struct Planned {
    at: Duration,
    attack: Option<Attack>,
    /// The calling workload (node index), or the victim for identity-less attacks.
    caller: usize,
    /// Another workload the attack involves (whose token or identity is used).
    victim: usize,
    dest: usize,
    call: Call,
}

fn allowed_model(i: usize) -> &'static str {
    GROUPS.get(fleet::group_of(i)).map_or("forecast", |g| g.1)
}

/// The first workload after `a` in another group.
fn other_group(a: usize, nodes: usize) -> usize {
    (1..nodes)
        .map(|k| (a + k) % nodes)
        .find(|&b| fleet::group_of(b) != fleet::group_of(a))
        .unwrap_or(a)
}

/// The request plan of one run: `requests` requests at `rate` per second, a share
/// `adversarial` of them attacks cycling through every class (the risk class only after
/// the midpoint, when workload `risky` is quarantined; from then on it sends no benign
/// requests).
fn plan(
    nodes: usize,
    requests: usize,
    adversarial: f64,
    rate: f64,
    risky: usize,
    seed: u64,
) -> Vec<Planned> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mid = requests / 2;
    let mut next_attack = 0usize;
    let mut out = Vec::with_capacity(requests);
    for i in 0..requests {
        let at = Duration::from_secs_f64(i as f64 / rate.max(1.0));
        let adv = rng.random::<f64>() < adversarial;
        let attack = adv.then(|| {
            loop {
                let a = Attack::ALL
                    .get(next_attack % Attack::ALL.len())
                    .copied()
                    .unwrap_or(Attack::LateralModel);
                next_attack += 1;
                if a != Attack::RiskRevoked || i >= mid {
                    break a;
                }
            }
        });
        let mut caller = rng.random_range(0..nodes);
        if i >= mid && caller == risky && nodes > 1 && attack != Some(Attack::RiskRevoked) {
            caller = (caller + 1) % nodes;
        }
        if attack == Some(Attack::RiskRevoked) {
            caller = risky;
        }
        let victim = other_group(caller, nodes);
        let near = if rng.random::<bool>() {
            caller
        } else {
            (caller + 1) % nodes
        };
        let (dest, call) = match attack {
            None => {
                let tool = fleet::group_of(caller) == 0 && rng.random::<f64>() < 0.25;
                (
                    near,
                    if tool {
                        Call::Tool(TOOL_OK)
                    } else {
                        Call::Model(allowed_model(caller))
                    },
                )
            }
            Some(Attack::TokenReplay | Attack::SpoofedHeaders | Attack::ForgedToken) => {
                (victim, Call::Model(allowed_model(victim)))
            }
            Some(Attack::LateralModel) => (
                rng.random_range(0..nodes),
                Call::Model(allowed_model(victim)),
            ),
            Some(Attack::LateralTool) => (rng.random_range(0..nodes), Call::Tool(TOOL_FORBIDDEN)),
            Some(Attack::RevokedCredential) => {
                (rng.random_range(0..nodes), Call::Model(allowed_model(0)))
            }
            Some(_) => (near, Call::Model(allowed_model(caller))),
        };
        out.push(Planned {
            at,
            attack,
            caller,
            victim: if victim == caller && nodes > 1 {
                (caller + 1) % nodes
            } else {
                victim
            },
            dest,
            call,
        });
    }
    out
}

/// One workload's credentials for a run (TLS systems).
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) svid: Svid,
    pub(super) token: String,
    /// Bound to this workload's certificate, correctly signed, expired.
    pub(super) expired: String,
    /// This workload's token with its groups changed to another group's (signature kept).
    pub(super) altered: String,
    /// The same claims signed by a key the authority never published.
    pub(super) foreign: String,
}

/// Replaces the `groups` of a JWT's payload, keeping header and signature.
pub(super) fn alter_groups(token: &str, group: &str) -> anyhow::Result<String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        anyhow::bail!("not a JWS");
    };
    let mut claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&b64.decode(p)?)?;
    claims.insert("groups".into(), serde_json::json!([group]));
    Ok(format!(
        "{h}.{}.{s}",
        b64.encode(serde_json::to_vec(&claims)?)
    ))
}

/// The HTTP-level shape of the system under test.
pub(super) struct Target {
    /// Each node's enforcement point.
    pub(super) ports: Vec<u16>,
    /// TLS: the SPIFFE ID each node's enforcement point presents; `None`: plain HTTP.
    pub(super) expected: Option<Vec<String>>,
    /// The static fleet API key (the baseline without identities).
    pub(super) api_key: Option<String>,
}

/// The credentials of a run, shared by the systems that use identities.
pub(super) struct RunCreds {
    pub(super) callers: Vec<Caller>,
    pub(super) retired: Caller,
}

/// A policy-bundle attack, carried out against the system; true when it was refused.
pub(super) type BundleProbe<'a> =
    &'a (dyn Fn(Attack, usize) -> futures::future::BoxFuture<'static, bool> + Sync);

/// Counts for one attack class.
#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct ClassCount {
    pub(super) sent: usize,
    pub(super) blocked: usize,
    /// How the blocked ones ended at the client (e.g. `403`, `TLS refused`).
    pub(super) outcomes: BTreeMap<String, usize>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct Counts {
    pub(super) benign_sent: usize,
    pub(super) benign_ok: usize,
    /// Benign requests refused or lost (false positives), by outcome.
    pub(super) benign_failed: BTreeMap<String, usize>,
    pub(super) classes: BTreeMap<&'static str, ClassCount>,
    /// Benign end-to-end latencies, µs.
    #[serde(skip)]
    pub(super) latencies_us: Vec<f64>,
    /// HTTP requests sent (benign and adversarial).
    pub(super) http_requests: usize,
    pub(super) wire_bytes: u64,
    pub(super) connections: u64,
    pub(super) traffic_secs: f64,
}

fn outcome_label(o: &Outcome) -> String {
    match o {
        Outcome::Status(s) => s.to_string(),
        Outcome::Refused(why) => {
            let w = why.to_ascii_lowercase();
            if w.contains("certificate") || w.contains("alert") || w.contains("tls") {
                "TLS refused".into()
            } else {
                "connection closed".into()
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    Caller(usize),
    Retired,
    Anonymous,
}

struct Pools {
    target: Arc<Target>,
    bundle: sigil_pki::X509Bundle,
    creds: Option<Arc<RunCreds>>,
    wire: Arc<Wire>,
    map: Mutex<HashMap<(Who, usize), Arc<Pool>>>,
}

impl Pools {
    fn get(&self, who: Who, dest: usize) -> anyhow::Result<Arc<Pool>> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = m.get(&(who, dest)) {
            return Ok(p.clone());
        }
        let port = *self
            .target
            .ports
            .get(dest)
            .ok_or_else(|| anyhow::anyhow!("no node {dest}"))?;
        let tls = match &self.target.expected {
            None => None,
            Some(expected) => {
                let id = expected
                    .get(dest)
                    .ok_or_else(|| anyhow::anyhow!("no node {dest}"))?;
                let svid = match (who, &self.creds) {
                    (Who::Caller(i), Some(c)) => c.callers.get(i).map(|c| &c.svid),
                    (Who::Retired, Some(c)) => Some(&c.retired.svid),
                    _ => None,
                };
                Some(super::client::tls_config(&self.bundle, id, svid)?)
            }
        };
        let p = Arc::new(Pool::new(Endpoint { port, tls }, self.wire.clone()));
        m.insert((who, dest), p.clone());
        Ok(p)
    }
}

fn build(
    p: &Planned,
    seq: u64,
    target: &Target,
    creds: Option<&RunCreds>,
) -> anyhow::Result<(Who, http::Request<Full<Bytes>>)> {
    let caller = creds.and_then(|c| c.callers.get(p.caller));
    let victim = creds.and_then(|c| c.callers.get(p.victim));
    let (who, bearer): (Who, Option<String>) = match (&target.api_key, p.attack) {
        // The static baseline: everyone who has the fleet key sends it.
        (Some(key), Some(Attack::NoIdentity)) => {
            let _ = key;
            (Who::Anonymous, None)
        }
        (Some(_), Some(Attack::ForgedToken)) => {
            (Who::Caller(p.caller), Some(format!("sk-guessed-{seq:x}")))
        }
        (Some(key), Some(Attack::RevokedCredential)) => (Who::Retired, Some(key.clone())),
        (Some(key), _) => (Who::Caller(p.caller), Some(key.clone())),
        (None, Some(Attack::NoIdentity)) => (Who::Anonymous, None),
        (None, Some(Attack::RevokedCredential)) => {
            (Who::Retired, creds.map(|c| c.retired.token.clone()))
        }
        (None, Some(Attack::TokenReplay)) => {
            (Who::Caller(p.caller), victim.map(|v| v.token.clone()))
        }
        (None, Some(Attack::ExpiredToken)) => {
            (Who::Caller(p.caller), caller.map(|c| c.expired.clone()))
        }
        (None, Some(Attack::ForgedToken)) => (
            Who::Caller(p.caller),
            caller.map(|c| {
                if seq.is_multiple_of(2) {
                    c.altered.clone()
                } else {
                    c.foreign.clone()
                }
            }),
        ),
        (None, _) => (Who::Caller(p.caller), caller.map(|c| c.token.clone())),
    };
    let (path, body) = match &p.call {
        Call::Model(m) => (
            "/v1/chat/completions",
            serde_json::json!({
                "model": m,
                "messages": [{"role": "user", "content": "inspect line 3"}],
                "max_tokens": 8,
            }),
        ),
        Call::Tool(t) => (
            "/mcp",
            serde_json::json!({
                "jsonrpc": "2.0",
                "id": seq,
                "method": "tools/call",
                "params": {"name": t, "arguments": {"line": 3}},
            }),
        ),
    };
    let mut b = http::Request::post(path)
        .header(http::header::HOST, "127.0.0.1")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
        .header(SEQ_HEADER, seq.to_string());
    if let Some(t) = bearer {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if p.attack == Some(Attack::SpoofedHeaders) {
        let claimed = fleet::workload_id(p.victim);
        b = b
            .header("x-sigil-spiffe-id", claimed.as_str())
            .header(
                "x-forwarded-client-cert",
                format!("By={};URI={claimed}", fleet::proxy_id(p.dest)),
            )
            .header("x-forwarded-for", "127.0.0.1")
            .header("x-real-ip", "127.0.0.1");
    }
    Ok((
        who,
        b.body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?,
    ))
}

/// What [`execute`] needs besides the plan.
pub(super) struct Exec<'a> {
    pub(super) target: Arc<Target>,
    pub(super) bundle: sigil_pki::X509Bundle,
    pub(super) creds: Option<Arc<RunCreds>>,
    pub(super) seen: Arc<Seen>,
    /// First request number of this run (numbers are unique across runs and systems).
    pub(super) seq0: u64,
    pub(super) probe: BundleProbe<'a>,
    /// Called once at the midpoint, with nothing in flight: the risky workload's risk
    /// rises there (sigil quarantines it; the baselines have nothing to do).
    pub(super) midpoint:
        &'a (dyn Fn() -> futures::future::BoxFuture<'static, anyhow::Result<()>> + Sync),
    pub(super) max_in_flight: usize,
}

pub(super) struct PlanSpec {
    pub(super) nodes: usize,
    pub(super) requests: usize,
    pub(super) adversarial: f64,
    pub(super) rate: f64,
    pub(super) risky: usize,
    pub(super) seed: u64,
}

/// Runs the plan against one system and counts.
pub(super) async fn execute(spec: &PlanSpec, x: Exec<'_>) -> anyhow::Result<Counts> {
    let plan = plan(
        spec.nodes,
        spec.requests,
        spec.adversarial,
        spec.rate,
        spec.risky,
        spec.seed,
    );
    let mid = spec.requests / 2;
    let pools = Arc::new(Pools {
        target: x.target.clone(),
        bundle: x.bundle.clone(),
        creds: x.creds.clone(),
        wire: Arc::new(Wire::default()),
        map: Mutex::new(HashMap::new()),
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(x.max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut counts = Counts::default();
    let mut probes = Vec::new();
    let start = tokio::time::Instant::now();
    let mut paused = Duration::ZERO;
    for (i, p) in plan.into_iter().enumerate() {
        let seq = x.seq0 + i as u64;
        if i == mid {
            // Drain: nothing of the risky workload is in flight when it is quarantined.
            let all = u32::try_from(x.max_in_flight.max(1)).unwrap_or(u32::MAX);
            let t0 = Instant::now();
            let held = permits.clone().acquire_many_owned(all).await?;
            (x.midpoint)().await?;
            drop(held);
            paused += t0.elapsed();
        }
        tokio::time::sleep_until(start + p.at + paused).await;
        if let Some(a @ (Attack::StalePolicy | Attack::TamperedPolicy)) = p.attack {
            probes.push((a, (x.probe)(a, p.dest)));
            continue;
        }
        let (who, req) = build(&p, seq, &x.target, x.creds.as_deref())?;
        let pool = pools.get(who, p.dest)?;
        let permit = permits.clone().acquire_owned().await?;
        let seen = x.seen.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let o = pool.send(req).await;
            let us = t.elapsed().as_secs_f64() * 1e6;
            drop(permit);
            (p.attack, seq, o, us, seen)
        });
        counts.http_requests += 1;
    }
    while let Some(r) = tasks.join_next().await {
        let (attack, seq, o, us, seen) = r?;
        let through = seen.contains(seq);
        match attack {
            None => {
                counts.benign_sent += 1;
                if matches!(o, Outcome::Status(s) if (200..300).contains(&s)) && through {
                    counts.benign_ok += 1;
                    counts.latencies_us.push(us);
                } else {
                    *counts.benign_failed.entry(outcome_label(&o)).or_default() += 1;
                }
            }
            Some(a) => {
                let c = counts.classes.entry(a.name()).or_default();
                c.sent += 1;
                if !through {
                    c.blocked += 1;
                    *c.outcomes.entry(outcome_label(&o)).or_default() += 1;
                }
            }
        }
    }
    counts.traffic_secs = start.elapsed().as_secs_f64();
    for (a, f) in probes {
        let refused = f.await;
        let c = counts.classes.entry(a.name()).or_default();
        c.sent += 1;
        if refused {
            c.blocked += 1;
            *c.outcomes.entry("refused".into()).or_default() += 1;
        }
    }
    counts.wire_bytes = pools.wire.total();
    counts.connections = pools
        .wire
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_has_every_class_and_the_risky_workload_only_attacks_after_the_midpoint() {
        let p = plan(5, 500, 0.2, 1000.0, 3, 7);
        assert_eq!(p.len(), 500);
        for a in Attack::ALL {
            assert!(p.iter().any(|r| r.attack == Some(a)), "{a:?} missing");
        }
        for (i, r) in p.iter().enumerate() {
            if i >= 250 && r.caller == 3 {
                assert_eq!(r.attack, Some(Attack::RiskRevoked), "request {i}");
            }
            if r.attack == Some(Attack::RiskRevoked) {
                assert!(i >= 250);
            }
        }
        let adv = p.iter().filter(|r| r.attack.is_some()).count();
        assert!((70..130).contains(&adv), "{adv} adversarial of 500");
    }

    #[test]
    fn the_victim_is_in_another_group() {
        for n in 2..9 {
            for a in 0..n {
                let b = other_group(a, n);
                assert_ne!(fleet::group_of(a), fleet::group_of(b), "{a} of {n}");
            }
        }
    }

    #[test]
    fn altered_tokens_keep_header_and_signature() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let t = format!(
            "{}.{}.c2ln",
            b64.encode(br#"{"alg":"ES256"}"#),
            b64.encode(br#"{"sub":"x","groups":["maintenance"]}"#)
        );
        let a = alter_groups(&t, "factory-floor").unwrap();
        let parts: Vec<&str> = a.split('.').collect();
        assert_eq!(parts[0], t.split('.').next().unwrap());
        assert_eq!(parts[2], "c2ln");
        let claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["groups"], serde_json::json!(["factory-floor"]));
        assert!(alter_groups("nope", "g").is_err());
    }
}
