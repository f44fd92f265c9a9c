//! `sigil dev`: the whole stack on loopback with embedded defaults (SQLite, generated CA),
//! plus a demo registration entry, and instructions that work as printed.
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use http::Method;
use serde_json::json;
use sigil_core::SystemClock;

use super::server::{ServerArgs, load_config};
use crate::admin_client::AdminClient;

/// The dev trust domain.
const DEV_TRUST_DOMAIN: &str = "sigil.test";

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Data directory; default `$XDG_DATA_HOME/sigil/dev` (or `~/.local/share/sigil/dev`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Public listener of the trust authority.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen_addr: String,
    /// Listener of the sidecar proxy in front of the demo model server (mTLS).
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub proxy_listen: String,
    /// Outbound listener of the caller-side sidecar (plain HTTP, your uid only): your
    /// process's calls go out with its identity and token.
    #[arg(long, default_value = "127.0.0.1:9080")]
    pub outbound_listen: String,
}

/// The demo policy `sigil dev` enforces (the one in the repository's `policy/` directory).
const DEMO_POLICY: &str = include_str!("../../../../policy/demo.cedar");

/// The audience of the demo proxy.
const DEMO_AUDIENCE: &str = "model-gw";

fn encode(s: &str) -> String {
    s.replace(':', "%3A").replace('/', "%2F")
}

/// How a shell runs this binary: its absolute path, since after `cargo run -- dev` there is
/// no `sigil` on the PATH; quoted if it has characters a shell would split or expand.
fn self_command() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.to_str().map(shell_quote))
        .unwrap_or_else(|| "sigil".into())
}

/// `s` as one POSIX shell word: as is when every character is safe unquoted, else in single
/// quotes (a `'` inside becomes `'\''`).
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("sigil/dev");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/sigil/dev"),
        None => PathBuf::from(".sigil-dev"),
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    super::init_logging(false);
    let data_dir = args.data_dir.unwrap_or_else(default_dir);
    let server_args = ServerArgs {
        config: None,
        trust_domain: Some(DEV_TRUST_DOMAIN.into()),
        data_dir: Some(data_dir.clone()),
        listen_addr: Some(args.listen_addr),
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
    let socket = server.admin_socket.clone();
    let port = server.addr.port();
    let admin = AdminClient::new(&socket);

    // The agent: attests with a fresh join token the first time, from its cache afterwards.
    let agent_dir = data_dir.join("agent");
    let join_token = if agent_dir.join("cache").join("node.json").exists() {
        None
    } else {
        let t = admin
            .call(
                Method::POST,
                "/v1/jointokens",
                Some(json!({"ttl_secs": 600})),
            )
            .await?;
        t.get("token").and_then(|v| v.as_str()).map(str::to_owned)
    };
    let bootstrap = data_dir.join("bootstrap-bundle.pem");
    std::fs::write(&bootstrap, &server.state.authorities.current().x509_pem)?;
    let agent_cfg = sigil_agent::AgentConfig {
        trust_domain: server.state.config.trust_domain.clone(),
        server_address: format!("127.0.0.1:{port}"),
        data_dir: agent_dir.clone(),
        socket_path: None,
        join_token,
        attestor: None,
        tpm_tcti: None,
        tpm_event_log: None,
        trust_bundle: Some(bootstrap),
        log_format: "text".into(),
        metrics_addr: None,
        secrets_dir: std::path::PathBuf::from("/run/sigil/secrets"),
        secret_files: Vec::new(),
        posture_rules: None,
        posture_interval_secs: 30,
        telemetry_broker: None,
    };
    let mut agent = sigil_agent::start(agent_cfg, Arc::new(SystemClock)).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let node_id = loop {
        if let Some(id) = agent.identities.node_id() {
            break id;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the agent did not attest within 20 s (see the log above)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };

    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    let demo_id = format!("spiffe://{DEV_TRUST_DOMAIN}/demo/agent");
    let existing = admin
        .call(
            Method::GET,
            &format!("/v1/entries?parent_id={}", encode(node_id.as_str())),
            None,
        )
        .await?;
    let have = |id: &str| {
        existing.as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e.get("spiffe_id").and_then(|v| v.as_str()) == Some(id))
        })
    };
    if !have(&demo_id) {
        admin
            .call(
                Method::POST,
                "/v1/entries",
                Some(json!({
                    "spiffe_id": demo_id,
                    "parent_id": node_id,
                    "selectors": [format!("unix:uid:{uid}")],
                    "groups": ["factory-floor"],
                    "scopes": ["model:invoke", "model:list"],
                })),
            )
            .await?;
    }
    // The sidecar proxy's own identity, served to it by the agent like to any workload; its
    // entry marks it as an enforcer, so it may watch policy and revocations on the agent.
    let proxy_id = format!("spiffe://{DEV_TRUST_DOMAIN}/demo/proxy");
    let proxy_spec = json!({
        "spiffe_id": proxy_id,
        "parent_id": node_id,
        "selectors": [format!("unix:uid:{uid}")],
        "dns_names": ["localhost"],
        "enforcer": true,
    });
    let old_proxy_entry = existing.as_array().and_then(|a| {
        a.iter()
            .find(|e| e.get("spiffe_id").and_then(|v| v.as_str()) == Some(proxy_id.as_str()))
    });
    match old_proxy_entry {
        None => {
            admin
                .call(Method::POST, "/v1/entries", Some(proxy_spec))
                .await?;
        }
        // Made by an older `sigil dev` (before entries could be enforcers): marked now.
        Some(e) if e.get("enforcer").and_then(|v| v.as_bool()) != Some(true) => {
            let id = e.get("id").and_then(|v| v.as_str()).unwrap_or_default();
            admin
                .call(
                    Method::PUT,
                    &format!("/v1/entries/{}", encode(id)),
                    Some(proxy_spec),
                )
                .await?;
        }
        Some(_) => {}
    }

    // The demo model server (plain HTTP on loopback) and the proxy in front of it.
    let model_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let model_addr = model_listener.local_addr()?;
    let model = tokio::spawn(crate::demo_model::serve(model_listener));
    let policy_dir = data_dir.join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    let policy_file = policy_dir.join("demo.cedar");
    if !policy_file.exists() {
        std::fs::write(&policy_file, DEMO_POLICY)?;
    }
    let audit_log = data_dir.join("proxy-audit.log");
    let proxy_cfg: sigil_proxy::ProxyConfig = toml::from_str(&format!(
        "trust_domain = {td}\nlisten_addr = {listen}\nupstream = {up}\naudience = {aud}\n\
         issuer = {iss}\nworkload_api_socket = {sock}\nspiffe_id = {pid}\n\
         policy_dir = {pdir}\naudit_log = {audit}\n",
        td = super::toml_str(DEV_TRUST_DOMAIN),
        listen = super::toml_str(&args.proxy_listen),
        up = super::toml_str(&format!("http://{model_addr}")),
        aud = super::toml_str(DEMO_AUDIENCE),
        iss = super::toml_str(&format!("https://localhost:{port}")),
        sock = super::toml_str(&agent.socket.display().to_string()),
        pid = super::toml_str(&proxy_id),
        pdir = super::toml_str(&policy_dir.display().to_string()),
        audit = super::toml_str(&audit_log.display().to_string()),
    ))?;
    let proxy = sigil_proxy::start(proxy_cfg, Arc::new(SystemClock)).await?;
    let proxy_port = proxy
        .addr
        .map(|a| a.port())
        .ok_or_else(|| anyhow::anyhow!("the proxy has no inbound listener"))?;
    // The caller's side: a sidecar with the demo agent's identity, whose outbound listener
    // takes plain HTTP from your processes and calls the model through both sidecars.
    let outbound_cfg: sigil_proxy::ProxyConfig = toml::from_str(&format!(
        "trust_domain = {td}\nissuer = {iss}\nworkload_api_socket = {sock}\nspiffe_id = {me}\n\
         policy_dir = {pdir}\naudit_log = {audit}\n\
         [outbound]\nlisten_addr = {out}\n\
         [[outbound.routes]]\nname = \"demo-model\"\naddress = {to}\nspiffe_id = {pid}\n\
         audience = {aud}\nscope = \"model:invoke model:list\"\ndefault = true\n",
        td = super::toml_str(DEV_TRUST_DOMAIN),
        iss = super::toml_str(&format!("https://localhost:{port}")),
        sock = super::toml_str(&agent.socket.display().to_string()),
        me = super::toml_str(&demo_id),
        pdir = super::toml_str(&policy_dir.display().to_string()),
        audit = super::toml_str(&data_dir.join("outbound-audit.log").display().to_string()),
        out = super::toml_str(&args.outbound_listen),
        to = super::toml_str(&format!("127.0.0.1:{proxy_port}")),
        pid = super::toml_str(&proxy_id),
        aud = super::toml_str(DEMO_AUDIENCE),
    ))?;
    let outbound = sigil_proxy::start(outbound_cfg, Arc::new(SystemClock)).await?;
    let outbound_addr = outbound
        .outbound_addr
        .ok_or_else(|| anyhow::anyhow!("the outbound sidecar has no listener"))?;
    let demo = data_dir.join("demo");
    let api = agent.socket.clone();
    let (sealed, sealed_sha256) =
        super::model::dev_demo(&admin, &data_dir, &demo_id, DEMO_POLICY).await?;
    println!(
        r#"
sigil dev is running (trust domain {DEV_TRUST_DOMAIN}); Ctrl-C stops it.

  trust authority  https://localhost:{port}  (OIDC: /.well-known/openid-configuration, JWKS: /keys, bundle: /bundle)
  admin socket     {socket}
  node agent       {node_id}
  Workload API     unix://{api}
  data             {data}

Any process of yours (uid {uid}) is registered as {demo_id}. From another terminal:

  export SPIFFE_ENDPOINT_SOCKET=unix://{api}
  {sigil} workload fetch-x509 --spiffe-id {demo_id} --out-dir {demo}
  openssl verify -CAfile {demo}/bundle.pem {demo}/svid.pem
  {sigil} workload fetch-jwt --audience model-gw

A demo model server sits behind the sidecar proxy at https://localhost:{proxy_port}. Policy
({policy}): group factory-floor may invoke the model defect-detector. Call it with curl:

  TOKEN=$(curl -s --cacert {demo}/bundle.pem --cert {demo}/svid.pem --key {demo}/key.pem \
       -d grant_type=client_credentials -d scope=model:invoke -d resource={aud} \
       https://localhost:{port}/oauth2/token | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s --cacert {demo}/bundle.pem --cert {demo}/svid.pem --key {demo}/key.pem \
       -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
       -d '{{"model":"defect-detector","messages":[{{"role":"user","content":"inspect part 7"}}]}}' \
       https://localhost:{proxy_port}/v1/chat/completions

or with the openai Python package (pip install openai):

  python3 - <<'EOF'
import ssl, httpx, openai
ctx = ssl.create_default_context(cafile="{demo}/bundle.pem")
ctx.load_cert_chain("{demo}/svid.pem", "{demo}/key.pem")
token = httpx.post("https://localhost:{port}/oauth2/token", verify=ctx, data={{
    "grant_type": "client_credentials", "scope": "model:invoke", "resource": "{aud}"}}).json()["access_token"]
client = openai.OpenAI(base_url="https://localhost:{proxy_port}/v1", api_key=token,
                       http_client=httpx.Client(verify=ctx))
print([m.id for m in client.models.list()])
for chunk in client.chat.completions.create(model="defect-detector", stream=True,
        messages=[{{"role": "user", "content": "inspect part 7"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
EOF

An unmodified agent needs neither: the caller-side sidecar at http://{outbound_addr} takes
plain HTTP from your uid only, and calls the model as {demo_id} (its SVID, its token, mTLS to
the model's sidecar, egress policy; the API key is ignored and never sent on):

  python3 - <<'EOF'
import openai
client = openai.OpenAI(base_url="http://{outbound_addr}/v1", api_key="unused")
print(client.chat.completions.create(model="defect-detector",
      messages=[{{"role": "user", "content": "inspect part 7"}}]).choices[0].message.content)
EOF

Every decision is recorded in {audit} (`{sigil} audit show {audit}` prints it).

A sealed model: {sealed} (Model::"{dev_model}", encrypted; its key is
released by the trust authority, only to {demo_id}, wrapped to its SVID key). Open it into
memory and run a model server on /proc/self/fd/N (here sha256sum; expect {sealed_sha256}):

  {sigil} model open {sealed} --socket unix://{api} --server 127.0.0.1:{port} \
      --spiffe-id {demo_id} -- sha256sum {{model}}

  export SIGIL_ADMIN_SOCKET={socket}
  {sigil} entry list
"#,
        socket = socket.display(),
        sigil = self_command(),
        aud = DEMO_AUDIENCE,
        policy = policy_file.display(),
        audit = audit_log.display(),
        data = data_dir.display(),
        demo = demo.display(),
        api = api.display(),
        sealed = sealed.display(),
        dev_model = super::model::DEV_MODEL,
    );
    tokio::select! {
        _ = super::server::wait_for_signal() => {}
        r = agent.wait() => if let Err(e) = r { eprintln!("sigil dev: agent stopped: {e}") },
        r = model => eprintln!("sigil dev: demo model server stopped: {r:?}"),
    }
    outbound.shutdown();
    proxy.shutdown();
    agent.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_keeps_plain_paths_and_quotes_the_rest() {
        assert_eq!(shell_quote("/usr/local/bin/sigil"), "/usr/local/bin/sigil");
        assert_eq!(
            shell_quote("/home/me/my projects/sigil"),
            "'/home/me/my projects/sigil'"
        );
        assert_eq!(shell_quote("/tmp/it's/sigil"), r"'/tmp/it'\''s/sigil'");
        assert_eq!(shell_quote("/tmp/$HOME/sigil"), "'/tmp/$HOME/sigil'");
        assert_eq!(shell_quote(""), "''");
    }
}
