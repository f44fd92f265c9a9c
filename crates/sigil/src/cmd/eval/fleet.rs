//! The evaluated fleet: a real trust authority (embedded SQLite), N node agents joined with
//! join tokens, and per node a `sigil proxy` in front of that node's model server, all on
//! loopback with their own data directories and sockets. The server, agents and proxies
//! run on their own runtime (threads named `sigil-fleet`), so their CPU time can be read
//! apart from the load generator's and the model servers'.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::Method;
use serde_json::json;
use sigil_core::SystemClock;

use super::client::Svid;
use super::relay::Relay;
use crate::admin_client::AdminClient;
use crate::cmd::bench::{self, BENCH_TRUST_DOMAIN, ProxySetup, WorkDir};
use crate::cmd::server::{ServerArgs, load_config};

pub(super) const TD: &str = BENCH_TRUST_DOMAIN;
/// The audience of the model servers' tokens.
pub(super) const AUDIENCE: &str = "eval-models";
pub(super) const SCOPE: &str = "model:invoke";
/// Node i is in group `GROUPS[i % 3].0`, whose workloads may invoke `GROUPS[i % 3].1`.
pub(super) const GROUPS: [(&str, &str); 3] = [
    ("factory-floor", "defect-detector"),
    ("maintenance", "line-assistant"),
    ("planning", "forecast"),
];
/// The tool `factory-floor` workloads may call, and one nobody may.
pub(super) const TOOL_OK: &str = "read_sensor";
pub(super) const TOOL_FORBIDDEN: &str = "set_line_speed";
/// The name of the fleet runtime's threads.
pub(super) const FLEET_THREADS: &str = "sigil-fleet";

pub(super) fn workload_id(i: usize) -> String {
    format!("spiffe://{TD}/eval/node/{i}/agent")
}
/// A workload on node 0 whose SVID is revoked before traffic starts.
pub(super) fn retired_id() -> String {
    format!("spiffe://{TD}/eval/node/0/retired")
}
pub(super) fn envoy_id(j: usize) -> String {
    format!("spiffe://{TD}/eval/envoy/{j}")
}
pub(super) fn proxy_id(j: usize) -> String {
    format!("spiffe://{TD}/eval/proxy/{j}")
}
pub(super) fn group_of(i: usize) -> usize {
    i % GROUPS.len()
}

/// The fleet's Cedar policy; `change` > 0 adds one permit naming a model nobody serves,
/// so each pushed change is a new bundle with the same decisions.
pub(super) fn policy(change: usize) -> String {
    let mut p = String::from("// sigil eval\n");
    for (g, m) in GROUPS {
        p.push_str(&format!(
            "@id(\"invoke-{g}\")\npermit (principal in Group::\"{g}\", action == Action::\"invoke\", \
             resource == Model::\"{m}\")\nwhen {{ context.scopes.contains(\"{SCOPE}\") }};\n"
        ));
    }
    p.push_str(&format!(
        "@id(\"tool\")\npermit (principal in Group::\"factory-floor\", action == Action::\"call_tool\", \
         resource == Tool::\"{TOOL_OK}\");\n"
    ));
    if change > 0 {
        p.push_str(&format!(
            "@id(\"change-{change}\")\npermit (principal in Group::\"planning\", \
             action == Action::\"invoke\", resource == Model::\"eval-change-{change}\");\n"
        ));
    }
    p
}

/// A runtime that may be dropped from async code (it shuts down in the background).
struct Rt(Option<tokio::runtime::Runtime>);

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub(super) struct Fleet {
    /// Dropped last: shuts the fleet runtime down.
    _rt: Rt,
    rt: tokio::runtime::Handle,
    pub(super) server: Option<sigil_server::RunningServer>,
    pub(super) admin: Arc<AdminClient>,
    pub(super) agents: Vec<sigil_agent::RunningAgent>,
    pub(super) proxies: Vec<Arc<sigil_proxy::RunningProxy>>,
    pub(super) relays: Vec<Arc<Relay>>,
    pub(super) port: u16,
    pub(super) bundle: sigil_pki::X509Bundle,
    pub(super) bundle_pem: String,
    /// Policy JWKS for other verifiers (Envoy): the authority's JWT keys.
    pub(super) jwks: serde_json::Value,
    pub(super) issuer: String,
    pub(super) setup_secs: f64,
}

pub(super) struct FleetOptions<'a> {
    pub(super) nodes: usize,
    pub(super) upstreams: &'a [u16],
    pub(super) relays: bool,
    pub(super) attest_concurrency: usize,
}

async fn register(
    admin: &AdminClient,
    id: &str,
    parent: &str,
    group: Option<&str>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")?.uid();
    let mut body = serde_json::Map::new();
    body.insert("spiffe_id".into(), json!(id));
    body.insert("parent_id".into(), json!(parent));
    body.insert("selectors".into(), json!([format!("unix:uid:{uid}")]));
    if let Some(g) = group {
        body.insert("groups".into(), json!([g]));
        body.insert("scopes".into(), json!([SCOPE]));
    }
    let body = serde_json::Value::Object(body);
    admin.call(Method::POST, "/v1/entries", Some(body)).await?;
    Ok(())
}

impl Fleet {
    pub(super) async fn start(work: &WorkDir, o: &FleetOptions<'_>) -> anyhow::Result<Self> {
        let started = Instant::now();
        let rt = Rt(Some(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name(FLEET_THREADS)
                .max_blocking_threads(32)
                // Threads that exit take their CPU time with them: keep them for the run.
                .thread_keep_alive(Duration::from_secs(24 * 3600))
                .build()?,
        ));
        let handle =
            rt.0.as_ref()
                .map(|r| r.handle().clone())
                .context("the fleet runtime")?;
        let dir = work.path.clone();
        let server_args = ServerArgs {
            trust_domain: Some(TD.into()),
            data_dir: Some(dir.join("server")),
            listen_addr: Some("127.0.0.1:0".into()),
            ..ServerArgs::default()
        };
        let cfg = load_config(&server_args)?;
        let server = handle
            .spawn(sigil_server::start(cfg, Arc::new(SystemClock)))
            .await
            .context("server start task")??;
        let port = server.addr.port();
        let issuer = server.state.config.issuer();
        let admin = Arc::new(AdminClient::new(&server.admin_socket));
        let bootstrap = dir.join("bootstrap-bundle.pem");
        let bundle_pem = server.state.authorities.current().x509_pem.clone();
        std::fs::write(&bootstrap, &bundle_pem)?;

        let mut relays = Vec::new();
        if o.relays {
            for _ in 0..o.nodes {
                relays.push(Relay::start(port).await?);
            }
        }
        // Agents, a bounded number attesting at a time, on the fleet runtime.
        let sem = Arc::new(tokio::sync::Semaphore::new(o.attest_concurrency.max(1)));
        let mut starting = Vec::with_capacity(o.nodes);
        for i in 0..o.nodes {
            let (sem, admin, bootstrap) = (sem.clone(), admin.clone(), bootstrap.clone());
            let to = relays.get(i).map_or(port, |r| r.port);
            let adir = dir.join("a").join(i.to_string());
            starting.push(handle.spawn(async move {
                let _permit = sem.acquire_owned().await?;
                bench::start_agent_at(&admin, format!("127.0.0.1:{to}"), &bootstrap, adir).await
            }));
        }
        let mut agents = Vec::with_capacity(o.nodes);
        for s in starting {
            agents.push(s.await.context("agent start task")??);
        }
        // Workloads: one per node, in its node's group; a retired one on node 0; an
        // identity per node for the Envoy baseline's listener.
        for (i, a) in agents.iter().enumerate() {
            let node = a
                .identities
                .node_id()
                .context("an agent without a node ID")?;
            let g = GROUPS.get(group_of(i)).map(|g| g.0);
            register(&admin, &workload_id(i), node.as_str(), g).await?;
            register(&admin, &envoy_id(i), node.as_str(), None).await?;
            if i == 0 {
                register(&admin, &retired_id(), node.as_str(), Some("factory-floor")).await?;
            }
        }
        let setup = ProxySetup {
            trust_domain: TD,
            id_path: "/eval/proxy",
            upstreams: o
                .upstreams
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect(),
            issuer: issuer.clone(),
            audience: AUDIENCE.into(),
        };
        let targets = bench::proxy_targets(agents.iter())?;
        // On the fleet runtime: the proxies' listeners and connections run there.
        let proxies = {
            let (admin, dir) = (admin.clone(), dir.clone());
            handle
                .spawn(
                    async move { bench::start_proxies_with(&admin, &targets, &dir, &setup).await },
                )
                .await
                .context("proxy start task")??
        };

        let bundle_text = server.state.authorities.current().bundle_json.clone();
        let bundle_json: serde_json::Value = serde_json::from_str(&bundle_text)?;
        let td = sigil_core::TrustDomain::new(TD)?;
        let trust = sigil_pki::TrustBundle::from_spiffe_json(&td, &bundle_text)
            .context("the server's bundle")?;
        let jwks = json!({
            "keys": bundle_json
                .get("keys")
                .and_then(serde_json::Value::as_array)
                .map(|keys| {
                    keys.iter()
                        .filter(|k| k.get("use").and_then(serde_json::Value::as_str) == Some("jwt-svid"))
                        .map(|k| {
                            let mut k = k.clone();
                            if let Some(o) = k.as_object_mut() {
                                o.remove("use");
                            }
                            k
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        });
        let mut fleet = Self {
            _rt: rt,
            rt: handle,
            server: Some(server),
            admin,
            agents,
            proxies,
            relays,
            port,
            bundle: trust.x509_bundle(),
            bundle_pem,
            jwks,
            issuer,
            setup_secs: 0.0,
        };
        let rev = fleet.push_policy(0).await?;
        fleet.wait_policy(rev, Duration::from_secs(60)).await?;
        fleet.setup_secs = started.elapsed().as_secs_f64();
        Ok(fleet)
    }

    pub(super) async fn push_policy(&self, change: usize) -> anyhow::Result<i64> {
        let v = self
            .admin
            .call(
                Method::POST,
                "/v1/policy/push",
                Some(json!({
                    "policies": {"eval.cedar": policy(change)},
                    "ttl_secs": 3600,
                    "rate_limits": null,
                })),
            )
            .await?;
        v.get("revision")
            .and_then(serde_json::Value::as_i64)
            .context("policy push: no revision in the answer")
    }

    /// Waits until every proxy enforces revision `rev` or later.
    pub(super) async fn wait_policy(&self, rev: i64, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.proxies.iter().all(|p| {
                p.policy_revision()
                    .is_some_and(|r| i64::try_from(r).unwrap_or(i64::MAX) >= rev)
            }) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "policy revision {rev} did not reach every proxy within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every proxy holds a revocation of `id`.
    pub(super) async fn wait_revoked(&self, id: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self
                .proxies
                .iter()
                .all(|p| p.revocations().revoked_ids().any(|r| r == id))
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the revocation of {id} did not reach every proxy within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The listening port of node `j`'s proxy.
    pub(super) fn proxy_port(&self, j: usize) -> anyhow::Result<u16> {
        self.proxies
            .get(j)
            .and_then(|p| p.addr)
            .map(|a| a.port())
            .context("a proxy without a listener")
    }

    /// The X.509-SVID `id` from node `node`'s agent, over its Workload API, as the workload
    /// would fetch it (waiting for a newly registered entry to arrive there). With
    /// `not_leaf`, waits for an SVID other than that one (after a re-issue).
    pub(super) async fn fetch_svid(
        &self,
        node: usize,
        id: &str,
        not_leaf: Option<&[u8]>,
    ) -> anyhow::Result<Svid> {
        use futures::StreamExt;
        use sigil_proto::workload as wl;
        let agent = self.agents.get(node).context("no such node")?;
        let socket = agent.socket.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = async {
                let mut c = crate::cmd::workload::client(&socket).await?;
                let mut stream = c
                    .fetch_x509svid(crate::cmd::workload::request(wl::X509svidRequest {}))
                    .await?
                    .into_inner();
                let resp = stream
                    .next()
                    .await
                    .context("the X.509-SVID stream ended")??;
                let svid = resp.svids.into_iter().find(|s| s.spiffe_id == id);
                anyhow::Ok(svid)
            };
            let got = tokio::time::timeout(Duration::from_secs(10), attempt).await;
            if let Ok(Ok(Some(s))) = got {
                let chain = crate::cmd::workload::split_der(&s.x509_svid)?;
                let fresh = match (not_leaf, chain.first()) {
                    (Some(old), Some(leaf)) => leaf.as_slice() != old,
                    _ => true,
                };
                if fresh {
                    return Svid::from_der(id, chain, s.x509_svid_key);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {node}'s agent did not serve {id} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops everything, the fleet runtime last.
    pub(super) async fn shutdown(mut self) {
        let proxies = std::mem::take(&mut self.proxies);
        let agents = std::mem::take(&mut self.agents);
        let server = self.server.take();
        {
            let stop = self.rt.spawn(async move {
                for p in proxies {
                    if let Ok(p) = Arc::try_unwrap(p) {
                        p.shutdown();
                    }
                }
                for a in agents {
                    a.shutdown().await;
                }
                if let Some(s) = server {
                    s.shutdown().await;
                }
            });
            let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
        }
    }
}
