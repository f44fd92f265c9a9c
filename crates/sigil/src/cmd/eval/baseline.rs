//! The two baselines, in front of the same model servers as sigil:
//!
//! - **static**: the traditional way. nginx on each node's port checks one fleet-wide
//!   static API key (`Authorization: Bearer <key>`) and an IP allow-list (loopback, where
//!   every caller sits), and forwards. No TLS identity, no token binding, no policy
//!   signature.
//! - **envoy**: what a team would deploy today instead: Envoy as an Istio-style sidecar per
//!   node with mTLS (client certificates from the same SPIFFE authority, URI SAN in the
//!   trust domain), `jwt_authn` (the authority's access tokens: signature, issuer,
//!   audience, expiry) and RBAC allowing the fleet's workload principals on the API paths.
//!   Its configuration is static; it sees neither revocations nor risk, and RBAC cannot see
//!   the model or tool named in a JSON body.
//!
//! Each runs as one process hosting every node's listener (as the sigil proxies share one
//! process), so its CPU time is that process tree's.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

pub(super) struct Process {
    child: Child,
    pub(super) pid: u32,
    pub(super) name: &'static str,
}

impl Drop for Process {
    /// Stops it the way its own tooling does: SIGTERM, on which nginx's master and Envoy
    /// end their workers too (a SIGKILL to nginx's master leaves its workers running); a
    /// SIGKILL only if it is still there after two seconds.
    fn drop(&mut self) {
        let term = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .map(|pid| rustix::process::kill_process(pid, rustix::process::Signal::TERM));
        if matches!(term, Some(Ok(()))) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` distinct loopback ports nothing listens on right now (all held while choosing, so
/// the kernel cannot hand one out twice).
pub(super) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

async fn wait_ports(p: &mut Process, ports: &[u16], log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for &port in ports {
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                anyhow::bail!(
                    "{} exited ({status}) before listening: {}",
                    p.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not listen on {port} within 60 s",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

fn spawn(
    name: &'static str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Process> {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {name} ({})", program.display()))?;
    Ok(Process {
        pid: child.id(),
        child,
        name,
    })
}

/// Finds a program on PATH or in the usual system directories.
pub(super) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

pub(super) fn nginx_conf(dir: &Path, key: &str, ports: &[u16], upstreams: &[u16]) -> String {
    let d = dir.display();
    let mut http = String::new();
    for (i, (port, up)) in ports.iter().zip(upstreams).enumerate() {
        http.push_str(&format!(
            "  upstream model{i} {{ server 127.0.0.1:{up}; keepalive 16; }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    allow 127.0.0.0/8;\n    deny all;\n\
             location / {{\n      if ($http_authorization != \"Bearer {key}\") {{ return 401; }}\n\
             proxy_pass http://model{i};\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n"
        ));
    }
    format!(
        "daemon off;\nworker_processes auto;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         keepalive_requests 100000;\n  keepalive_timeout 600s;\n{http}}}\n"
    )
}

/// Starts nginx as the static baseline.
pub(super) async fn start_nginx(
    dir: &Path,
    key: &str,
    ports: &[u16],
    upstreams: &[u16],
) -> anyhow::Result<Process> {
    let nginx = which("nginx")
        .context("nginx is required for the static baseline (Debian: apt-get install nginx)")?;
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir, key, ports, upstreams))?;
    let log = dir.join("stderr.log");
    let args = [
        "-p".to_string(),
        dir.display().to_string(),
        "-e".into(),
        dir.join("error.log").display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ];
    let mut p = spawn("nginx", &nginx, &args, &log)?;
    wait_ports(&mut p, ports, &log).await?;
    Ok(p)
}

/// Whether nginx accepts a configuration that drops the key check (an attacker's edit, or
/// an old file put back): it has no means to tell, so it does.
pub(super) fn nginx_accepts_altered(
    dir: &Path,
    ports: &[u16],
    upstreams: &[u16],
) -> anyhow::Result<bool> {
    let nginx = which("nginx").context("nginx")?;
    let conf = nginx_conf(dir, "x", ports, upstreams).replace(
        "if ($http_authorization != \"Bearer x\") { return 401; }",
        "",
    );
    let path = dir.join("altered.conf");
    std::fs::write(&path, conf)?;
    let out = Command::new(nginx)
        .args(["-t", "-q", "-p"])
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path)
        .output()?;
    Ok(out.status.success())
}

/// One node of the Envoy baseline.
pub(super) struct EnvoyNode {
    pub(super) port: u16,
    pub(super) upstream: u16,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

pub(super) struct EnvoyConfig<'a> {
    pub(super) nodes: &'a [EnvoyNode],
    pub(super) ca: &'a Path,
    pub(super) jwks: &'a Path,
    pub(super) trust_domain: &'a str,
    pub(super) issuer: &'a str,
    pub(super) audience: &'a str,
    pub(super) principals: &'a [String],
    /// Skip the JWT and RBAC filters (what an altered configuration would do).
    pub(super) open: bool,
}

/// The Envoy bootstrap (JSON).
pub(super) fn envoy_bootstrap(c: &EnvoyConfig<'_>) -> serde_json::Value {
    let ids: Vec<serde_json::Value> = c
        .principals
        .iter()
        .map(|p| json!({"authenticated": {"principal_name": {"exact": p}}}))
        .collect();
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let cluster = format!("model-{i}");
        let mut filters = Vec::new();
        if !c.open {
            filters.push(json!({
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                    "providers": {"sigil": {
                        "issuer": c.issuer,
                        "audiences": [c.audience],
                        "local_jwks": {"filename": c.jwks.display().to_string()},
                        "forward": true,
                    }},
                    "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "sigil"}}],
                },
            }));
            filters.push(json!({
                "name": "envoy.filters.http.rbac",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                    "rules": {"action": "ALLOW", "policies": {"fleet-workloads": {
                        "permissions": [{"or_rules": {"rules": [
                            {"url_path": {"path": {"prefix": "/v1/"}}},
                            {"url_path": {"path": {"exact": "/mcp"}}},
                        ]}}],
                        "principals": [{"or_ids": {"ids": ids.clone()}}],
                    }}},
                },
            }));
        }
        filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }));
        listeners.push(json!({
            "name": format!("node-{i}"),
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": n.port}},
            "filter_chains": [{
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": {
                            "tls_certificates": [{
                                "certificate_chain": {"filename": n.cert.display().to_string()},
                                "private_key": {"filename": n.key.display().to_string()},
                            }],
                            "validation_context": {
                                "trusted_ca": {"filename": c.ca.display().to_string()},
                                "match_typed_subject_alt_names": [{
                                    "san_type": "URI",
                                    "matcher": {"prefix": format!("spiffe://{}/", c.trust_domain)},
                                }],
                            },
                        },
                    },
                },
                "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": format!("node{i}"),
                        "forward_client_cert_details": "SANITIZE_SET",
                        "set_current_client_cert_details": {"uri": true},
                        "route_config": {"virtual_hosts": [{
                            "name": "model",
                            "domains": ["*"],
                            "routes": [{
                                "match": {"prefix": "/"},
                                // Streams may take as long as the model does.
                                "route": {"cluster": cluster, "timeout": "0s"},
                            }],
                        }]},
                        "http_filters": filters,
                    },
                }],
            }],
        }));
        clusters.push(json!({
            "name": cluster,
            "type": "STATIC",
            "connect_timeout": "1s",
            // The defaults (1024 connections and requests) would queue an open-loop load.
            "circuit_breakers": {"thresholds": [{
                "max_connections": 100_000,
                "max_pending_requests": 100_000,
                "max_requests": 100_000,
            }]},
            "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": n.upstream}},
            }}]}]},
        }));
    }
    json!({"static_resources": {"listeners": listeners, "clusters": clusters}})
}

/// Starts Envoy as the Istio-style baseline.
pub(super) async fn start_envoy(
    envoy: &Path,
    dir: &Path,
    c: &EnvoyConfig<'_>,
) -> anyhow::Result<Process> {
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("envoy.json");
    std::fs::write(&conf, serde_json::to_vec_pretty(&envoy_bootstrap(c))?)?;
    let log = dir.join("envoy.log");
    let args = [
        "-c".to_string(),
        conf.display().to_string(),
        "--log-level".into(),
        "warn".into(),
        // Several evaluations (or a user's own Envoy) may run at once.
        "--disable-hot-restart".into(),
    ];
    let mut p = spawn("envoy", envoy, &args, &log)?;
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.port).collect();
    wait_ports(&mut p, &ports, &log).await?;
    Ok(p)
}

/// Whether Envoy accepts a configuration without the JWT and RBAC filters (`--mode
/// validate`): its configuration carries no signature, so it does.
pub(super) fn envoy_accepts_altered(
    envoy: &Path,
    dir: &Path,
    c: &EnvoyConfig<'_>,
) -> anyhow::Result<bool> {
    let open = EnvoyConfig { open: true, ..*c };
    let path = dir.join("altered.json");
    std::fs::write(&path, serde_json::to_vec(&envoy_bootstrap(&open))?)?;
    let out = Command::new(envoy)
        .args(["--mode", "validate", "--log-level", "error", "-c"])
        .arg(&path)
        .output()?;
    Ok(out.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nginx_config_checks_the_key_on_every_node() {
        let c = nginx_conf(Path::new("/tmp/x"), "k1", &[1001, 1002], &[2001, 2002]);
        assert_eq!(
            c.matches("if ($http_authorization != \"Bearer k1\") { return 401; }")
                .count(),
            2
        );
        assert!(c.contains("listen 127.0.0.1:1002;") && c.contains("server 127.0.0.1:2002;"));
    }

    #[test]
    fn the_envoy_config_has_jwt_and_rbac_unless_open() {
        let nodes = [EnvoyNode {
            port: 1,
            upstream: 2,
            cert: "c".into(),
            key: "k".into(),
        }];
        let principals = ["spiffe://td/a".to_string()];
        let c = EnvoyConfig {
            nodes: &nodes,
            ca: Path::new("ca"),
            jwks: Path::new("j"),
            trust_domain: "td",
            issuer: "https://i",
            audience: "aud",
            principals: &principals,
            open: false,
        };
        let s = envoy_bootstrap(&c).to_string();
        assert!(
            s.contains("jwt_authn")
                && s.contains("spiffe://td/a")
                && s.contains("require_client_certificate")
        );
        let open = envoy_bootstrap(&EnvoyConfig { open: true, ..c }).to_string();
        assert!(!open.contains("jwt_authn") && !open.contains("rbac"));
    }
}
