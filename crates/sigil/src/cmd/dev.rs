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
        log_format: None,
    };
    let cfg = load_config(&server_args)?;
    let server = sigil_server::start(cfg, Arc::new(SystemClock)).await?;
    let socket = server.admin_socket.clone();
    let port = server.addr.port();
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    let demo_id = format!("spiffe://{DEV_TRUST_DOMAIN}/demo/agent");
    let admin = AdminClient::new(&socket);
    let existing = admin
        .call(
            Method::GET,
            &format!(
                "/v1/entries?spiffe_id={}",
                demo_id.replace(':', "%3A").replace('/', "%2F")
            ),
            None,
        )
        .await?;
    if existing.as_array().is_none_or(|a| a.is_empty()) {
        admin
            .call(
                Method::POST,
                "/v1/entries",
                Some(json!({
                    "spiffe_id": demo_id,
                    "parent_id": format!("spiffe://{DEV_TRUST_DOMAIN}/sigil/node/dev"),
                    "selectors": [format!("unix:uid:{uid}")],
                    "groups": ["factory-floor"],
                    "scopes": ["model:invoke", "model:list"],
                })),
            )
            .await?;
    }
    let demo = data_dir.join("demo");
    println!(
        r#"
sigil dev is running (trust domain {DEV_TRUST_DOMAIN}); Ctrl-C stops it.

  trust authority  https://localhost:{port}  (OIDC: /.well-known/openid-configuration, JWKS: /keys, bundle: /bundle)
  admin socket     {socket}
  data             {data}

Try it from another terminal:

  export SIGIL_ADMIN_SOCKET={socket}
  sigil entry list
  sigil svid mint --spiffe-id {demo_id} --out-dir {demo}
  openssl verify -CAfile {demo}/bundle.pem {demo}/svid.pem
  curl -s --cacert {demo}/bundle.pem --cert {demo}/svid.pem --key {demo}/key.pem \
       -d grant_type=client_credentials -d scope=model:invoke https://localhost:{port}/oauth2/token
"#,
        socket = socket.display(),
        data = data_dir.display(),
        demo = demo.display(),
    );
    super::server::wait_for_signal().await;
    server.shutdown().await;
    Ok(())
}
