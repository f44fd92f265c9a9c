//! `sigil bench propagation`: a real `sigil server` (embedded SQLite, loopback) and N
//! in-process agents, each with its own data directory, join token and gRPC connection;
//! pushes K policy bundles and R revocations through the admin API (the path `sigil policy
//! push` and `sigil svid revoke` use) and reports, per change kind, the time from the start of
//! the push call until the last agent has the change active.
//!
//! "Active" is read from each agent's published [`sigil_agent::Snapshot`] (the state its
//! Workload and Enforcer APIs serve): a policy change is active at an agent once its verified
//! bundle has a revision ≥ the pushed one (revisions are monotonic, so an agent may skip an
//! intermediate revision when changes come faster than delivery); a revocation is active once
//! the agent's revocation list holds the revoked ID. The time is the one the agent stamped in
//! the snapshot as it published it (`policy_changed_at`, `revocations_changed_at`): the
//! moment its Workload and Enforcer APIs started serving the change, after it was verified
//! and persisted. (One watcher task per agent reads the snapshots; on a busy 2-core runtime
//! it may wake long after the agent published, which is not propagation time.)
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use http::Method;
use serde::Serialize;
use serde_json::json;
use sigil_core::SystemClock;
use tokio::sync::{Notify, Semaphore};

use super::Output;
use super::server::{ServerArgs, load_config};
use crate::admin_client::AdminClient;

pub(super) const BENCH_TRUST_DOMAIN: &str = "bench.sigil.test";
/// The path prefix of the SPIFFE IDs the benchmark revokes (nothing holds them).
const REVOKED_PREFIX: &str = "/bench/revoked/";

#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Policy and revocation propagation from `sigil server` to N in-process agents.
    Propagation(PropagationArgs),
    /// Behaviour detection: detection and false-positive rates on a replayed fleet with
    /// injected compromises, and the time from a compromise's first anomalous window to its
    /// quarantine at every proxy (real server, agents, proxies and MQTT broker).
    Anomaly(super::bench_anomaly::AnomalyArgs),
}

#[derive(Debug, clap::Args)]
pub struct PropagationArgs {
    /// Number of agents (each with its own data directory, join token and connection).
    #[arg(long)]
    pub agents: usize,
    /// Number of policy changes to push (after one unmeasured warm-up push).
    #[arg(long, default_value_t = 20)]
    pub changes: usize,
    /// Number of revocations to push.
    #[arg(long, default_value_t = 0)]
    pub revocations: usize,
    /// In-process `sigil proxy` sidecars to start (at most one per agent): proxy i takes
    /// its identity, signed policy bundles and revocations from agent i's Workload API
    /// socket (`policy_source = "agent"`), as on a device.
    #[arg(long, default_value_t = 0)]
    pub proxies: usize,
    /// Milliseconds between pushes. Unset: each change is pushed once the previous one is
    /// active at every agent (or timed out). Set: pushes at this pace without waiting, so
    /// agents may skip intermediate revisions.
    #[arg(long)]
    pub interval_ms: Option<u64>,
    /// How long to wait for a change to be active everywhere before counting it undelivered.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Agents attesting at the same time during setup.
    #[arg(long, default_value_t = 8)]
    pub attest_concurrency: usize,
    /// Work directory (default: a fresh one under the system temp dir, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Propagation(a) => propagation(a).await,
        BenchCmd::Anomaly(a) => super::bench_anomaly::anomaly(a).await,
    }
}

/// Logs at `warn` unless `SIGIL_LOG` / `RUST_LOG` say otherwise: N agents logging every
/// accepted bundle would measure the terminal.
pub(super) fn init_quiet_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What one agent's watcher saw: for each kind, the latest value and every (value, when)
/// transition (values only increase).
#[derive(Default)]
pub(super) struct Observed {
    policy: AtomicI64,
    revoked: AtomicI64,
    policy_log: Mutex<Vec<(i64, Instant)>>,
    revoked_log: Mutex<Vec<(i64, Instant)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Policy,
    Revocation,
}

impl Observed {
    fn latest(&self, k: Kind) -> i64 {
        match k {
            Kind::Policy => self.policy.load(Ordering::Acquire),
            Kind::Revocation => self.revoked.load(Ordering::Acquire),
        }
    }
    fn log(&self, k: Kind) -> Vec<(i64, Instant)> {
        let l = match k {
            Kind::Policy => &self.policy_log,
            Kind::Revocation => &self.revoked_log,
        };
        l.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

pub(super) fn record(
    latest: &AtomicI64,
    log: &Mutex<Vec<(i64, Instant)>>,
    value: i64,
    at: Instant,
) -> bool {
    if value > latest.load(Ordering::Acquire) {
        if let Ok(mut l) = log.lock() {
            l.push((value, at));
        }
        latest.store(value, Ordering::Release);
        true
    } else {
        false
    }
}

/// Follows one agent's snapshots until the receiver closes.
fn watch_agent(
    mut rx: tokio::sync::watch::Receiver<sigil_agent::Snapshot>,
    obs: Arc<Observed>,
    notify: Arc<Notify>,
    revoked_prefix: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_list: Option<Arc<sigil_agent::RevocationList>> = None;
        loop {
            let (policy, policy_at, list, list_at) = {
                let s = rx.borrow_and_update();
                (
                    s.policy
                        .as_ref()
                        .map(|b| i64::try_from(b.content.revision).unwrap_or(i64::MAX)),
                    s.policy_changed_at,
                    s.revocations.clone(),
                    s.revocations_changed_at,
                )
            };
            // When the agent put the change in force (stamped by the agent as it published
            // the snapshot), not when this watcher task got to run.
            let now = Instant::now();
            let mut changed = false;
            if let Some(r) = policy {
                changed |= record(&obs.policy, &obs.policy_log, r, policy_at.unwrap_or(now));
            }
            let same = match (&list, &last_list) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                if let Some(l) = &list {
                    let n = l
                        .revoked
                        .iter()
                        .filter(|r| r.spiffe_id.starts_with(&revoked_prefix))
                        .count();
                    changed |= record(
                        &obs.revoked,
                        &obs.revoked_log,
                        i64::try_from(n).unwrap_or(i64::MAX),
                        list_at.unwrap_or(now),
                    );
                }
                last_list = list;
            }
            if changed {
                notify.notify_one();
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

/// One pushed change: its kind, the value agents must reach, and when the push started.
pub(super) struct Change {
    pub(super) kind: Kind,
    pub(super) target: i64,
    pub(super) started: Instant,
}

/// Waits until every agent has reached `target` for `kind`, or `deadline`.
pub(super) async fn wait_all(
    observed: &[Arc<Observed>],
    notify: &Notify,
    kind: Kind,
    target: i64,
    deadline: Instant,
) -> bool {
    loop {
        if observed.iter().all(|o| o.latest(kind) >= target) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let wait = (deadline - now).min(Duration::from_millis(5));
        let _ = tokio::time::timeout(wait, notify.notified()).await;
    }
}

#[derive(Debug, Serialize, Default, Clone)]
pub(super) struct KindReport {
    /// Changes pushed.
    pub(super) changes: usize,
    /// Changes active at every agent (agent value ≥ the change's) before the timeout.
    pub(super) delivered: usize,
    pub(super) delivered_fraction: f64,
    /// (change, agent) pairs: how many agents reached each change (≥ its value).
    pub(super) agent_deliveries: usize,
    pub(super) agent_deliveries_fraction: f64,
    /// (change, agent) pairs where the agent's watcher saw exactly that value (not skipped
    /// over by a later one).
    pub(super) exact_observed: usize,
    pub(super) exact_observed_fraction: f64,
    /// Push start → last agent active, over delivered changes (ms).
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    pub(super) mean_ms: f64,
    /// Push start → first agent active, median over delivered changes (ms).
    pub(super) first_agent_p50_ms: f64,
    /// The admin call itself (push start → response), median (ms).
    pub(super) push_call_p50_ms: f64,
    /// Push start → last agent active for each delivered change, in push order (ms).
    pub(super) latencies_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    agents: usize,
    changes: usize,
    revocations: usize,
    proxies: usize,
    mode: String,
    definition: &'static str,
    cores: usize,
    load_average_before: String,
    load_average_after: String,
    setup_secs: f64,
    run_secs: f64,
    policy: KindReport,
    revocation: KindReport,
    /// The same, at the proxies (push start → the last proxy enforcing it), when started.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_policy: Option<KindReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_revocation: Option<KindReport>,
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted.get(i).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn summarize(
    kind: Kind,
    changes: &[Change],
    push_calls: &[Duration],
    observed: &[Arc<Observed>],
) -> KindReport {
    let logs: Vec<Vec<(i64, Instant)>> = observed.iter().map(|o| o.log(kind)).collect();
    let mine: Vec<&Change> = changes.iter().filter(|c| c.kind == kind).collect();
    let mut r = KindReport {
        changes: mine.len(),
        ..Default::default()
    };
    let mut last = Vec::new();
    let mut first = Vec::new();
    for c in &mine {
        let mut all = true;
        let mut latest: Option<Instant> = None;
        let mut earliest: Option<Instant> = None;
        for log in &logs {
            match log.iter().find(|(v, _)| *v >= c.target) {
                Some((v, at)) => {
                    r.agent_deliveries += 1;
                    if *v == c.target {
                        r.exact_observed += 1;
                    }
                    latest = Some(latest.map_or(*at, |l| l.max(*at)));
                    earliest = Some(earliest.map_or(*at, |e| e.min(*at)));
                }
                None => all = false,
            }
        }
        if all {
            r.delivered += 1;
            if let Some(l) = latest {
                last.push(ms(l.saturating_duration_since(c.started)));
            }
            if let Some(e) = earliest {
                first.push(ms(e.saturating_duration_since(c.started)));
            }
        }
    }
    r.latencies_ms = last.clone();
    let pairs = (mine.len() * observed.len()).max(1) as f64;
    r.delivered_fraction = r.delivered as f64 / (mine.len().max(1)) as f64;
    r.agent_deliveries_fraction = r.agent_deliveries as f64 / pairs;
    r.exact_observed_fraction = r.exact_observed as f64 / pairs;
    last.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    r.p50_ms = percentile(&last, 50.0);
    r.p99_ms = percentile(&last, 99.0);
    r.max_ms = last.last().copied().unwrap_or(0.0);
    r.mean_ms = if last.is_empty() {
        0.0
    } else {
        last.iter().sum::<f64>() / last.len() as f64
    };
    r.first_agent_p50_ms = percentile(&first, 50.0);
    let mut calls: Vec<f64> = push_calls.iter().copied().map(ms).collect();
    calls.sort_by(f64::total_cmp);
    r.push_call_p50_ms = percentile(&calls, 50.0);
    r
}

fn bench_policy(i: usize) -> String {
    format!(
        "// sigil bench propagation, change {i}\n\
         @id(\"bench-{i}\")\n\
         permit (\n  principal in Group::\"bench\",\n  action == Action::\"invoke\",\n  \
         resource == Model::\"bench-{i}\"\n);\n"
    )
}

async fn push_policy(admin: &AdminClient, i: usize) -> anyhow::Result<i64> {
    let v = admin
        .call(
            Method::POST,
            "/v1/policy/push",
            Some(json!({
                "policies": {"bench.cedar": bench_policy(i)},
                "ttl_secs": 3600,
                "rate_limits": null,
            })),
        )
        .await?;
    v.get("revision")
        .and_then(serde_json::Value::as_i64)
        .context("policy push: no revision in the answer")
}

async fn revoke(admin: &AdminClient, i: usize) -> anyhow::Result<()> {
    admin
        .call(
            Method::POST,
            "/v1/revocations",
            Some(json!({
                "target": format!("spiffe://{BENCH_TRUST_DOMAIN}{REVOKED_PREFIX}{i}"),
                "reason": "sigil bench propagation",
            })),
        )
        .await?;
    Ok(())
}

pub(super) struct WorkDir {
    pub(super) path: PathBuf,
    remove: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub(super) fn work_dir(dir: Option<PathBuf>) -> anyhow::Result<WorkDir> {
    let (path, remove) = match dir {
        Some(d) => (d, false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            // Short: agent socket paths must fit in sun_path.
            let p = std::env::temp_dir().join(format!("sgb-{}-{nanos:x}", std::process::id()));
            (p, true)
        }
    };
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(WorkDir { path, remove })
}

/// Starts one agent with a fresh join token and waits until its sync stream is up.
pub(super) async fn start_agent(
    admin: &AdminClient,
    port: u16,
    bootstrap: &Path,
    dir: PathBuf,
) -> anyhow::Result<sigil_agent::RunningAgent> {
    start_agent_at(admin, format!("127.0.0.1:{port}"), bootstrap, dir).await
}

/// [`start_agent`] with the server at `server_address` (e.g. a relay in front of it).
pub(super) async fn start_agent_at(
    admin: &AdminClient,
    server_address: String,
    bootstrap: &Path,
    dir: PathBuf,
) -> anyhow::Result<sigil_agent::RunningAgent> {
    let t = admin
        .call(
            Method::POST,
            "/v1/jointokens",
            Some(json!({"ttl_secs": 600})),
        )
        .await?;
    let token = t
        .get("token")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .context("join token: no token in the answer")?;
    let cfg = sigil_agent::AgentConfig {
        trust_domain: sigil_core::TrustDomain::new(BENCH_TRUST_DOMAIN)?,
        server_address,
        data_dir: dir,
        socket_path: None,
        join_token: Some(token),
        attestor: None,
        tpm_tcti: None,
        tpm_event_log: None,
        trust_bundle: Some(bootstrap.to_path_buf()),
        log_format: "text".into(),
        metrics_addr: None,
        secrets_dir: std::path::PathBuf::from("/run/sigil/secrets"),
        secret_files: Vec::new(),
        posture_rules: None,
        posture_interval_secs: 0,
        telemetry_broker: None,
    };
    let agent = sigil_agent::start(cfg, Arc::new(SystemClock)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if agent.identities.client.load().is_some() && agent.identities.subscribe().borrow().serving
        {
            return Ok(agent);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "an agent did not attest and connect within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each agent's node ID and Workload API socket: where a sidecar beside it is registered
/// and takes its credentials from.
pub(super) fn proxy_targets<'a>(
    agents: impl Iterator<Item = &'a sigil_agent::RunningAgent>,
) -> anyhow::Result<Vec<(sigil_core::SpiffeId, PathBuf)>> {
    agents
        .map(|a| {
            let node = a
                .identities
                .node_id()
                .context("an agent without a node identity")?;
            anyhow::Ok((node, a.socket.clone()))
        })
        .collect()
}

/// Registers an enforcer entry for one proxy under each of the first `n` agents' nodes and
/// starts the proxies against those agents' sockets (each waits for its SVID and bundles
/// from its agent, like `sigil proxy --workload-api-socket`).
pub(super) async fn start_proxies(
    admin: &AdminClient,
    agents: &[sigil_agent::RunningAgent],
    n: usize,
    dir: &Path,
) -> anyhow::Result<Vec<Arc<sigil_proxy::RunningProxy>>> {
    let targets = proxy_targets(agents.iter().take(n))?;
    let setup = ProxySetup {
        trust_domain: BENCH_TRUST_DOMAIN,
        id_path: "/bench/proxy",
        upstreams: Vec::new(),
        issuer: "https://bench.invalid".into(),
        audience: "bench".into(),
    };
    start_proxies_with(admin, &targets, dir, &setup).await
}

/// What [`start_proxies_with`] gives every proxy.
pub(super) struct ProxySetup {
    pub(super) trust_domain: &'static str,
    /// Proxy i is `spiffe://<trust_domain><id_path>/<i>`.
    pub(super) id_path: &'static str,
    /// Proxy i's upstream (default: a closed port; the benchmarks that send no requests).
    pub(super) upstreams: Vec<String>,
    pub(super) issuer: String,
    pub(super) audience: String,
}

/// [`start_proxies`] with an explicit setup: one proxy per (node ID, agent socket).
pub(super) async fn start_proxies_with(
    admin: &AdminClient,
    targets: &[(sigil_core::SpiffeId, PathBuf)],
    dir: &Path,
    setup: &ProxySetup,
) -> anyhow::Result<Vec<Arc<sigil_proxy::RunningProxy>>> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")?.uid();
    let mut ids = Vec::with_capacity(targets.len());
    for (i, (node, _)) in targets.iter().enumerate() {
        let id = format!("spiffe://{}{}/{i}", setup.trust_domain, setup.id_path);
        admin
            .call(
                Method::POST,
                "/v1/entries",
                Some(json!({
                    "spiffe_id": id,
                    "parent_id": node.to_string(),
                    "selectors": [format!("unix:uid:{uid}")],
                    "enforcer": true,
                })),
            )
            .await?;
        ids.push(id);
    }
    let mut out = Vec::with_capacity(targets.len());
    for (i, ((_, socket), id)) in targets.iter().zip(ids).enumerate() {
        let pdir = dir.join("p").join(i.to_string());
        std::fs::create_dir_all(&pdir)?;
        let upstream = setup
            .upstreams
            .get(i)
            .map_or("http://127.0.0.1:9", String::as_str);
        let cfg: sigil_proxy::ProxyConfig = toml::from_str(&format!(
            "trust_domain = {td}\nlisten_addr = \"127.0.0.1:0\"\n\
             upstream = {upstream}\naudience = {aud}\n\
             issuer = {iss}\nworkload_api_socket = {sock}\n\
             spiffe_id = {id}\npolicy_source = \"agent\"\naudit_log = {audit}\n",
            td = super::toml_str(setup.trust_domain),
            upstream = super::toml_str(upstream),
            aud = super::toml_str(&setup.audience),
            iss = super::toml_str(&setup.issuer),
            sock = super::toml_str(&format!("unix://{}", socket.display())),
            id = super::toml_str(&id),
            audit = super::toml_str(&pdir.join("audit.log").display().to_string()),
        ))
        .context("proxy configuration")?;
        let p = tokio::time::timeout(
            Duration::from_secs(60),
            sigil_proxy::start(cfg, Arc::new(SystemClock)),
        )
        .await
        .context("a proxy did not get its identity from its agent within 60 s")??;
        out.push(Arc::new(p));
    }
    Ok(out)
}

/// Polls every proxy's policy revision and revocation list each millisecond (the proxy has
/// no change feed of its own), stamping a change when it is first seen: figures are at most
/// ~1 ms (plus scheduling) late.
pub(super) fn watch_proxies(
    proxies: Vec<Arc<sigil_proxy::RunningProxy>>,
    observed: Vec<Arc<Observed>>,
    notify: Arc<Notify>,
    revoked_prefix: Option<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let mut changed = false;
            for (p, obs) in proxies.iter().zip(&observed) {
                let now = Instant::now();
                if let Some(r) = p.policy_revision() {
                    let r = i64::try_from(r).unwrap_or(i64::MAX);
                    changed |= record(&obs.policy, &obs.policy_log, r, now);
                }
                // Only when revocations are measured: the scan is the watcher's main cost.
                if let Some(prefix) = &revoked_prefix {
                    let n = p
                        .revocations()
                        .revoked_ids()
                        .filter(|id| id.starts_with(prefix.as_str()))
                        .count();
                    changed |= record(
                        &obs.revoked,
                        &obs.revoked_log,
                        i64::try_from(n).unwrap_or(i64::MAX),
                        now,
                    );
                }
            }
            if changed {
                notify.notify_one();
            }
        }
    })
}

async fn propagation(args: PropagationArgs) -> anyhow::Result<()> {
    init_quiet_logging();
    anyhow::ensure!(args.agents > 0, "--agents must be at least 1");
    anyhow::ensure!(
        args.proxies <= args.agents,
        "--proxies must not exceed --agents (one proxy per agent)"
    );
    let load_before = load_average();
    let work = work_dir(args.dir.clone())?;
    let setup_start = Instant::now();
    let server_args = ServerArgs {
        config: None,
        trust_domain: Some(BENCH_TRUST_DOMAIN.into()),
        data_dir: Some(work.path.join("server")),
        listen_addr: Some("127.0.0.1:0".into()),
        admin_socket: None,
        database_url: None,
        issuer: None,
        ca_key_type: None,
        jwt_key_type: None,
        upstream_ca_cert: None,
        upstream_ca_key: None,
        key_encryption_key_file: None,
        tpm_ek_roots: None,
        tpm_require_secure_boot: false,
        tpm_golden_pcrs: Vec::new(),
        tpm_ek_hashes: Vec::new(),
        log_format: None,
        metrics_addr: None,
    };
    let cfg = load_config(&server_args)?;
    let server = sigil_server::start(cfg, Arc::new(SystemClock)).await?;
    let port = server.addr.port();
    let admin = Arc::new(AdminClient::new(&server.admin_socket));
    let bootstrap = work.path.join("bootstrap-bundle.pem");
    std::fs::write(&bootstrap, &server.state.authorities.current().x509_pem)?;

    // Attest the agents, a bounded number at a time.
    let sem = Arc::new(Semaphore::new(args.attest_concurrency.max(1)));
    let mut starting = tokio::task::JoinSet::new();
    for i in 0..args.agents {
        let (sem, admin, bootstrap) = (sem.clone(), admin.clone(), bootstrap.clone());
        let dir = work.path.join("a").join(i.to_string());
        starting.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            start_agent(&admin, port, &bootstrap, dir).await
        });
    }
    let mut agents = Vec::with_capacity(args.agents);
    while let Some(r) = starting.join_next().await {
        agents.push(r.context("agent start task")??);
    }
    let proxies = start_proxies(&admin, &agents, args.proxies, &work.path).await?;
    let notify = Arc::new(Notify::new());
    let proxy_observed: Vec<Arc<Observed>> = (0..proxies.len())
        .map(|_| Arc::new(Observed::default()))
        .collect();
    let observed: Vec<Arc<Observed>> = (0..agents.len())
        .map(|_| Arc::new(Observed::default()))
        .collect();
    let prefix = format!("spiffe://{BENCH_TRUST_DOMAIN}{REVOKED_PREFIX}");
    let watchers: Vec<_> = agents
        .iter()
        .zip(&observed)
        .map(|(a, o)| {
            watch_agent(
                a.identities.subscribe(),
                o.clone(),
                notify.clone(),
                prefix.clone(),
            )
        })
        .collect();
    let proxy_watcher = watch_proxies(
        proxies.clone(),
        proxy_observed.clone(),
        notify.clone(),
        Some(format!("spiffe://{BENCH_TRUST_DOMAIN}{REVOKED_PREFIX}")),
    );
    // Waiting covers agents and proxies; the report gives each separately.
    let everyone: Vec<Arc<Observed>> = observed.iter().chain(&proxy_observed).cloned().collect();
    let timeout = Duration::from_secs(args.timeout_secs);

    // Warm-up (not measured): every agent holds a first bundle.
    let warm = push_policy(&admin, 0).await?;
    anyhow::ensure!(
        wait_all(
            &everyone,
            &notify,
            Kind::Policy,
            warm,
            Instant::now() + timeout
        )
        .await,
        "warm-up: the first policy bundle did not reach every agent within {timeout:?}"
    );
    // Then let the fleet settle: agents that joined at different times each fetch their own
    // log consistency proof on this first update; measuring starts once every agent holds
    // the same log checkpoint (or after the timeout).
    let settle_deadline = Instant::now() + timeout;
    loop {
        let sizes: Vec<Option<u64>> = agents
            .iter()
            .map(|a| a.identities.log_checkpoint().map(|(size, _)| size))
            .collect();
        let settled = sizes
            .first()
            .is_some_and(|first| first.is_some() && sizes.iter().all(|s| s == first));
        if settled || Instant::now() >= settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let setup_secs = setup_start.elapsed().as_secs_f64();

    let run_start = Instant::now();
    let mut changes = Vec::with_capacity(args.changes + args.revocations);
    let (mut policy_calls, mut revocation_calls) = (Vec::new(), Vec::new());
    let pace = args.interval_ms.map(Duration::from_millis);
    let mut next = Instant::now();
    let plan = (1..=args.changes)
        .map(|i| (Kind::Policy, i))
        .chain((1..=args.revocations).map(|i| (Kind::Revocation, i)));
    for (kind, i) in plan {
        if let Some(p) = pace {
            tokio::time::sleep_until(next.into()).await;
            next += p;
        }
        let started = Instant::now();
        let target = match kind {
            Kind::Policy => push_policy(&admin, i).await?,
            Kind::Revocation => {
                revoke(&admin, i).await?;
                i64::try_from(i)?
            }
        };
        let call = started.elapsed();
        match kind {
            Kind::Policy => policy_calls.push(call),
            Kind::Revocation => revocation_calls.push(call),
        }
        changes.push(Change {
            kind,
            target,
            started,
        });
        if pace.is_none() {
            wait_all(&everyone, &notify, kind, target, started + timeout).await;
        }
    }
    if pace.is_some() {
        // Let the last changes land (or time out).
        let deadline = Instant::now() + timeout;
        for kind in [Kind::Policy, Kind::Revocation] {
            if let Some(c) = changes.iter().rev().find(|c| c.kind == kind) {
                wait_all(&everyone, &notify, kind, c.target, deadline).await;
            }
        }
    }
    let run_secs = run_start.elapsed().as_secs_f64();

    let report = Report {
        agents: agents.len(),
        changes: args.changes,
        revocations: args.revocations,
        proxies: proxies.len(),
        mode: match args.interval_ms {
            Some(ms) => format!("paced: one push every {ms} ms, without waiting"),
            None => "sequential: each push once the previous change is active everywhere".into(),
        },
        definition: "a change is delivered to an agent when the agent's active policy bundle \
            has a revision >= the change's (revocation: its revocation list holds the revoked \
            ID); latency = push call start -> the last agent's snapshot showing it",
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average_before: load_before,
        load_average_after: load_average(),
        setup_secs,
        run_secs,
        policy: summarize(Kind::Policy, &changes, &policy_calls, &observed),
        revocation: summarize(Kind::Revocation, &changes, &revocation_calls, &observed),
        proxy_policy: (!proxies.is_empty())
            .then(|| summarize(Kind::Policy, &changes, &policy_calls, &proxy_observed)),
        proxy_revocation: (!proxies.is_empty()).then(|| {
            summarize(
                Kind::Revocation,
                &changes,
                &revocation_calls,
                &proxy_observed,
            )
        }),
    };

    proxy_watcher.abort();
    // The watcher's clones are dropped once it has stopped.
    let _ = proxy_watcher.await;
    for p in proxies {
        if let Ok(p) = Arc::try_unwrap(p) {
            p.shutdown();
        }
    }

    for w in &watchers {
        w.abort();
    }
    for a in agents {
        a.shutdown().await;
    }
    server.shutdown().await;
    drop(work);

    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => print_text(&report),
    }
    Ok(())
}

fn print_text(r: &Report) {
    println!(
        "sigil bench propagation: {} agents, {} policy changes, {} revocations ({}; {} cores, \
         load {} before, {} after; setup {:.1} s, run {:.1} s)",
        r.agents,
        r.changes,
        r.revocations,
        r.mode,
        r.cores,
        r.load_average_before,
        r.load_average_after,
        r.setup_secs,
        r.run_secs
    );
    let rows = [
        ("policy", "agent", Some(&r.policy)),
        ("revocation", "agent", Some(&r.revocation)),
        ("policy", "proxy", r.proxy_policy.as_ref()),
        ("revocation", "proxy", r.proxy_revocation.as_ref()),
    ];
    for (name, who, k) in rows {
        let Some(k) = k else { continue };
        if k.changes == 0 {
            continue;
        }
        println!(
            "  {name:<10} push -> last {who} active: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
             (mean {:.1}; first {who} p50 {:.1} ms; admin call p50 {:.1} ms)",
            k.p50_ms, k.p99_ms, k.max_ms, k.mean_ms, k.first_agent_p50_ms, k.push_call_p50_ms
        );
        println!(
            "  {name:<10} delivered to every {who}: {}/{} ({:.2}%); {who} deliveries {:.2}%; \
             exact revision observed {:.2}%",
            k.delivered,
            k.changes,
            k.delivered_fraction * 100.0,
            k.agent_deliveries_fraction * 100.0,
            k.exact_observed_fraction * 100.0
        );
    }
    println!("  ({})", r.definition);
}
