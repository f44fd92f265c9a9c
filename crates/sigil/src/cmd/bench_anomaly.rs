//! `sigil bench anomaly`: how well behaviour detection works, and how fast it acts.
//!
//! 1. **Replay** (the detector alone, deterministic): a synthetic fleet's benign traffic with
//!    injected compromises of four kinds (new models, exfiltration-sized answers, off-hours
//!    use, a new unknown executable) through [`sigil_risk::Detector`] with the server's
//!    defaults; reports the detection rate per kind and the false-positive rate on benign
//!    windows (`sigil_risk::replay`).
//! 2. **Live** (real processes on loopback): an in-process `sigil server` subscribed to a real
//!    MQTT broker, N in-process agents, one `sigil proxy` per agent. For each run a fresh
//!    workload (an entry under agent `i`, whose SVID that agent signs) learns a baseline, then
//!    its first anomalous window is published, signed with the SVID of proxy `i` as the proxy
//!    signs its own: the time from that publish until the workload's SVID is revoked at
//!    **every** proxy (its open connections close then) is "detection to quarantine effective".
//!    The learning windows are published back to back with past window starts instead of
//!    waiting one window each; the detector scores window contents, not arrival times.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::Method;
use serde::Serialize;
use serde_json::json;
use sigil_core::SystemClock;

use super::Output;
use super::bench::{BENCH_TRUST_DOMAIN, start_agent, start_proxies, work_dir};
use super::server::{ServerArgs, load_config};
use crate::admin_client::AdminClient;

#[derive(Debug, clap::Args)]
pub struct AnomalyArgs {
    /// Replay: identities in the synthetic fleet.
    #[arg(long, default_value_t = 40)]
    pub identities: usize,
    /// Replay: benign windows per identity after learning.
    #[arg(long, default_value_t = 500)]
    pub windows: usize,
    /// Replay: injected compromises (split over the four kinds).
    #[arg(long, default_value_t = 40)]
    pub compromises: usize,
    /// Replay: seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Live: agents (one proxy each). 0: replay only.
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    /// Live: compromises injected, one after another.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Live: the MQTT broker (`mqtt://host:port`).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Work directory (default: a fresh one under the system temp dir, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Windows each live victim learns from (the server's `learning_windows`).
const LEARNING: usize = 12;

#[derive(Serialize)]
struct Report {
    replay: sigil_risk::ReplayReport,
    replay_config: ReplayConfigOut,
    live: Option<Live>,
}

#[derive(Serialize)]
struct ReplayConfigOut {
    identities: usize,
    windows: usize,
    compromises: usize,
    seed: u64,
}

#[derive(Serialize)]
struct Live {
    agents: usize,
    proxies: usize,
    runs: usize,
    quarantined: usize,
    /// Per run: first anomalous window published → revoked at the last proxy (ms).
    to_every_proxy_ms: Vec<f64>,
    p50_ms: f64,
    max_ms: f64,
    broker: String,
    load_average: String,
}

pub async fn anomaly(args: AnomalyArgs) -> anyhow::Result<()> {
    super::bench::init_quiet_logging();
    let cfg = sigil_risk::ReplayConfig {
        identities: args.identities,
        windows: args.windows,
        compromises: args.compromises,
        seed: args.seed,
        ..Default::default()
    };
    let started = Instant::now();
    let replay = sigil_risk::replay::run(&cfg, sigil_risk::DetectorConfig::default());
    eprintln!("replay: {:.1} s", started.elapsed().as_secs_f64());
    let live = if args.agents > 0 {
        Some(live(&args).await?)
    } else {
        None
    };
    let report = Report {
        replay,
        replay_config: ReplayConfigOut {
            identities: args.identities,
            windows: args.windows,
            compromises: args.compromises,
            seed: args.seed,
        },
        live,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => print_text(&report),
    }
    Ok(())
}

fn print_text(r: &Report) {
    let p = &r.replay;
    println!(
        "replay: {} identities, {} benign windows each, {} compromises (seed {})",
        r.replay_config.identities,
        r.replay_config.windows,
        r.replay_config.compromises,
        r.replay_config.seed
    );
    for (kind, k) in &p.per_kind {
        println!(
            "  {kind:<15} detected {}/{}  mean windows to detect {:.2}",
            k.detected, k.injected, k.mean_windows_to_detect
        );
    }
    println!(
        "  detection rate {:.1}%  false positives {}/{} benign windows ({:.3}%)  quarantined {}",
        p.detection_rate * 100.0,
        p.false_positives,
        p.benign_windows,
        p.false_positive_rate * 100.0,
        p.quarantined_compromises
    );
    if let Some(l) = &r.live {
        println!(
            "live: {} agents, {} proxies, broker {}, load {}",
            l.agents, l.proxies, l.broker, l.load_average
        );
        println!(
            "  quarantined {}/{}; first anomalous window -> revoked at every proxy: p50 {:.1} ms, max {:.1} ms ({:?})",
            l.quarantined, l.runs, l.p50_ms, l.max_ms, l.to_every_proxy_ms
        );
    }
}

async fn live(args: &AnomalyArgs) -> anyhow::Result<Live> {
    use sigil_telemetry::{BrokerConfig, DEFAULT_KEEP_ALIVE_SECS, Kind, Publisher};
    let work = work_dir(args.dir.clone())?;
    let config = work.path.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[telemetry]\nbroker = {}\nlearning_windows = {LEARNING}\n",
            super::toml_str(&args.broker)
        ),
    )?;
    let server_args = ServerArgs {
        config: Some(config),
        trust_domain: Some(BENCH_TRUST_DOMAIN.into()),
        data_dir: Some(work.path.join("server")),
        listen_addr: Some("127.0.0.1:0".into()),
        ..ServerArgs::default()
    };
    let server = sigil_server::start(load_config(&server_args)?, Arc::new(SystemClock)).await?;
    let port = server.addr.port();
    let admin = Arc::new(AdminClient::new(&server.admin_socket));
    let bootstrap = work.path.join("bootstrap-bundle.pem");
    std::fs::write(&bootstrap, &server.state.authorities.current().x509_pem)?;
    let mut agents = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        agents.push(
            start_agent(
                &admin,
                port,
                &bootstrap,
                work.path.join("a").join(i.to_string()),
            )
            .await?,
        );
    }
    let proxies = start_proxies(&admin, &agents, agents.len(), &work.path).await?;
    let publisher = Publisher::start(
        &BrokerConfig::new(&args.broker, DEFAULT_KEEP_ALIVE_SECS)?,
        "sigil-bench-anomaly",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !publisher.is_connected() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no MQTT broker at {}",
            args.broker
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")?.uid();
    let mut times = Vec::new();
    for run in 0..args.runs {
        let i = run % agents.len();
        let agent = agents.get(i).context("agent")?;
        let node = agent
            .identities
            .node_id()
            .context("agent without a node identity")?;
        let victim = format!("spiffe://{BENCH_TRUST_DOMAIN}/bench/victim/{run}");
        admin
            .call(
                Method::POST,
                "/v1/entries",
                Some(json!({"spiffe_id": victim, "parent_id": node.to_string(),
                            "selectors": [format!("unix:uid:{uid}")]})),
            )
            .await?;
        // The agent signs the victim's SVID; its serial is what the quarantine revokes.
        let proxy_id = format!("spiffe://{BENCH_TRUST_DOMAIN}/bench/proxy/{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (serial, key, me) = loop {
            let snap = agent.identities.subscribe().borrow().clone();
            let find = |id: &str| {
                snap.svids
                    .values()
                    .find(|s| s.spiffe_id.as_str() == id)
                    .cloned()
            };
            if let (Some(v), Some(p)) = (find(&victim), find(&proxy_id)) {
                let der = rustls_pki_types::PrivateKeyDer::Pkcs8(p.key.clone().into());
                let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)?;
                let chain = p.chain.iter().map(|c| c.clone().into()).collect();
                break (
                    v.serial,
                    rustls::sign::CertifiedKey::new(chain, signer),
                    p.spiffe_id,
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the victim's SVID was not signed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let topic = sigil_telemetry::topic_for(&me, Kind::Proxy)?;
        let now = sigil_core::Clock::now(&SystemClock);
        let window =
            |start: i64, seq: u64, w: sigil_risk::IdentityWindow| sigil_risk::TelemetryMessage {
                source: me.to_string(),
                node: String::new(),
                window_start: start,
                window_secs: 1,
                seq,
                identities: vec![w],
                node_window: None,
            };
        // Learning: ordinary traffic to the usual model. The seq space is per publisher
        // (proxy i), continued across runs.
        let base_seq = (run as u64) * 1000 + 1;
        for w in 0..LEARNING {
            let n = 18 + (w % 5) as u64;
            let msg = window(
                now - (LEARNING - w) as i64,
                base_seq + w as u64,
                sigil_risk::IdentityWindow {
                    spiffe_id: victim.clone(),
                    requests: [("invoke:defect-detector".to_owned(), n)].into(),
                    denied: 0,
                    bytes_in: n * 400,
                    bytes_out: n * 1500,
                    max_response_bytes: 1800 + (w as u64 % 3) * 100,
                },
            );
            publisher.publish(topic.clone(), sigil_telemetry::seal(&topic, &msg, &key)?);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The compromise: a model it never used, answers the size of an exfiltration.
        let msg = window(
            now,
            base_seq + LEARNING as u64,
            sigil_risk::IdentityWindow {
                spiffe_id: victim.clone(),
                requests: [
                    ("invoke:defect-detector".to_owned(), 2),
                    ("invoke:line-assistant".to_owned(), 30),
                ]
                .into(),
                denied: 0,
                bytes_in: 32 * 400,
                bytes_out: 30 * 2_000_000,
                max_response_bytes: 2_000_000,
            },
        );
        let bytes = sigil_telemetry::seal(&topic, &msg, &key)?;
        let t0 = Instant::now();
        publisher.publish(topic.clone(), bytes);
        let deadline = t0 + Duration::from_secs(10);
        loop {
            if proxies
                .iter()
                .all(|p| p.revocations().revokes_serial(&serial))
            {
                times.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                eprintln!("run {run}: not quarantined within 10 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Live {
        agents: agents.len(),
        proxies: proxies.len(),
        runs: args.runs,
        quarantined: times.len(),
        p50_ms: pct(0.5),
        max_ms: pct(1.0),
        to_every_proxy_ms: times,
        broker: args.broker.clone(),
        load_average: super::bench::load_average(),
    })
}
