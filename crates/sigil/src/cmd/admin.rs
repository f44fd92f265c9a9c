//! The admin commands: thin clients of the server's admin API.
use std::path::{Path, PathBuf};

use anyhow::Context;
use http::Method;
use serde_json::{Value, json};
use sigil_pki::{KeyAlgorithm, KeyPair};

use super::{AdminOpts, Output, parse_duration};
use crate::admin_client::AdminClient;

#[derive(Debug, clap::Subcommand)]
pub enum EntryCmd {
    /// Create an entry.
    Create {
        #[command(flatten)]
        spec: EntryFlags,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Replace an entry's fields (flags not given keep their current value).
    Update {
        /// Entry ID.
        id: String,
        #[command(flatten)]
        spec: EntryUpdateFlags,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List entries.
    List {
        /// Only entries of this parent (node).
        #[arg(long)]
        parent_id: Option<String>,
        /// Only entries with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Show one entry.
    Show {
        id: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Delete an entry.
    Delete {
        id: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

#[derive(Debug, clap::Args)]
pub struct EntryFlags {
    /// The SPIFFE ID handed out.
    #[arg(long)]
    spiffe_id: String,
    /// The node (SPIFFE ID) whose agent may hand it out.
    #[arg(long)]
    parent_id: String,
    /// Selector the caller must have, e.g. unix:uid:1000 (repeat for several).
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    /// X.509-SVID lifetime (e.g. 1h, 5m).
    #[arg(long, value_parser = parse_duration)]
    x509_ttl: Option<u32>,
    /// JWT-SVID lifetime.
    #[arg(long, value_parser = parse_duration)]
    jwt_ttl: Option<u32>,
    /// DNS SAN (repeat for several).
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    /// Group for policy (repeat for several).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// OAuth scope the workload may be granted (repeat for several).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The workload is an enforcer (a `sigil proxy` sidecar): it may watch policy bundles
    /// and revocations on its agent's Enforcer API.
    #[arg(long)]
    enforcer: bool,
    /// Node selector the parent node's attestation must have proved, e.g.
    /// tpm:secureboot:true or tpm:pcr:7:<hex> (repeat for several; all are required).
    #[arg(long = "node-selector")]
    node_selectors: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct EntryUpdateFlags {
    #[arg(long)]
    spiffe_id: Option<String>,
    #[arg(long)]
    parent_id: Option<String>,
    #[arg(long = "selector")]
    selectors: Vec<String>,
    #[arg(long, value_parser = parse_duration)]
    x509_ttl: Option<u32>,
    #[arg(long, value_parser = parse_duration)]
    jwt_ttl: Option<u32>,
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    #[arg(long = "group")]
    groups: Vec<String>,
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Mark the workload as an enforcer (may watch its agent's Enforcer API).
    #[arg(long, conflicts_with = "no_enforcer")]
    enforcer: bool,
    /// Clear the enforcer mark.
    #[arg(long)]
    no_enforcer: bool,
    /// Replace the node selectors the parent node must have (repeat for several).
    #[arg(long = "node-selector", conflicts_with = "no_node_selectors")]
    node_selectors: Vec<String>,
    /// Require no node selectors any more.
    #[arg(long)]
    no_node_selectors: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum JoinTokenCmd {
    /// Create a single-use join token.
    Create {
        /// How long the token stays usable.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        ttl: u32,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeCmd {
    /// List attested nodes.
    List {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Evict a node: its identity is revoked and it can no longer obtain SVIDs.
    Evict {
        /// The node's SPIFFE ID.
        spiffe_id: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Show every node's risk (level, score, why) and the active quarantines.
    Risk {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Quarantine a node (or one workload on it): the SVIDs it was issued are revoked (its
    /// proxies close their connections) and nothing new is issued until `sigil node clear`.
    Quarantine {
        /// The node's SPIFFE ID.
        node_id: String,
        /// Only this workload on the node.
        #[arg(long)]
        workload: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Lift a node's quarantine (all of them, or one workload's) and reset its behaviour
    /// score; its agent gets new SVIDs at its next sync.
    Clear {
        /// The node's SPIFFE ID.
        node_id: String,
        /// Only this workload's quarantine.
        #[arg(long)]
        workload: Option<String>,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum SvidCmd {
    /// Mint an X.509-SVID; the key is made here and never sent.
    Mint {
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: u32,
        /// DNS SAN (repeat for several).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// Key type: ecdsa-p256 or ed25519.
        #[arg(long, default_value = "ecdsa-p256")]
        key_type: String,
        /// Write svid.pem, key.pem (0600) and bundle.pem here.
        #[arg(long)]
        out_dir: PathBuf,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Mint a JWT-SVID and print it.
    MintJwt {
        #[arg(long)]
        spiffe_id: String,
        /// Audience (repeat for several).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        #[arg(long, value_parser = parse_duration, default_value = "5m")]
        ttl: u32,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Revoke by certificate serial (hex) or by SPIFFE ID (every SVID issued to it so far).
    Revoke {
        target: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List revocations in force.
    Revocations {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List issued identities, newest first.
    Issued {
        #[arg(long)]
        spiffe_id: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum CaCmd {
    /// List the X.509 and JWT signing keys and their states.
    List {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// One rotation step: prepare a new key (published, not signing), or activate the
    /// prepared one (the old key stays in the bundle until what it signed expires).
    Rotate {
        /// Rotate the JWT signing key instead of the X.509 CA.
        #[arg(long)]
        jwt: bool,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum BundleCmd {
    /// Print the trust bundle.
    Show {
        /// spiffe (JWKS JSON) or pem (X.509 authorities).
        #[arg(long, default_value = "spiffe")]
        format: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

fn print(opts: &AdminOpts, v: &Value, text: impl FnOnce(&Value) -> String) {
    match opts.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Text => println!("{}", text(v)),
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn list(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn entry_text(e: &Value) -> String {
    format!(
        "Entry ID   : {}\nSPIFFE ID  : {}\nParent ID  : {}\nSelectors  : {}\nNode sel.  : {}\nX509 TTL   : {}s\nJWT TTL    : {}s\nDNS names  : {}\nGroups     : {}\nScopes     : {}\nEnforcer   : {}\nRevision   : {}",
        s(e, "id"),
        s(e, "spiffe_id"),
        s(e, "parent_id"),
        list(e, "selectors"),
        list(e, "node_selectors"),
        e.get("x509_ttl_secs").unwrap_or(&Value::Null),
        e.get("jwt_ttl_secs").unwrap_or(&Value::Null),
        list(e, "dns_names"),
        list(e, "groups"),
        list(e, "scopes"),
        if is_enforcer(e) { "yes" } else { "no" },
        e.get("revision").unwrap_or(&Value::Null),
    )
}

/// An entry's `enforcer` flag (the API omits it when false).
fn is_enforcer(e: &Value) -> bool {
    e.get("enforcer").and_then(Value::as_bool).unwrap_or(false)
}

fn entries_text(v: &Value) -> String {
    let items = v.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "No entries".into();
    }
    let mut out = format!("Found {} entries\n", items.len());
    for e in &items {
        out.push_str(&entry_text(e));
        out.push_str("\n\n");
    }
    out.trim_end().to_owned()
}

pub async fn entry(cmd: EntryCmd) -> anyhow::Result<()> {
    match cmd {
        EntryCmd::Create { spec, opts } => {
            let mut body = serde_json::Map::new();
            body.insert("spiffe_id".into(), json!(spec.spiffe_id));
            body.insert("parent_id".into(), json!(spec.parent_id));
            body.insert("selectors".into(), json!(spec.selectors));
            body.insert("dns_names".into(), json!(spec.dns_names));
            body.insert("groups".into(), json!(spec.groups));
            body.insert("scopes".into(), json!(spec.scopes));
            if spec.enforcer {
                body.insert("enforcer".into(), json!(true));
            }
            if !spec.node_selectors.is_empty() {
                body.insert("node_selectors".into(), json!(spec.node_selectors));
            }
            if let Some(t) = spec.x509_ttl {
                body.insert("x509_ttl_secs".into(), json!(t));
            }
            if let Some(t) = spec.jwt_ttl {
                body.insert("jwt_ttl_secs".into(), json!(t));
            }
            let body = Value::Object(body);
            let v = client(&opts)
                .call(Method::POST, "/v1/entries", Some(body))
                .await?;
            print(&opts, &v, entry_text);
        }
        EntryCmd::Update { id, spec, opts } => {
            let c = client(&opts);
            let path = format!("/v1/entries/{}", encode(&id));
            let cur = c.call(Method::GET, &path, None).await?;
            let keep = |k: &str| cur.get(k).cloned().unwrap_or(Value::Null);
            let or_list = |given: Vec<String>, k: &str| {
                if given.is_empty() {
                    keep(k)
                } else {
                    json!(given)
                }
            };
            let body = json!({
                "spiffe_id": spec.spiffe_id.map(Value::from).unwrap_or_else(|| keep("spiffe_id")),
                "parent_id": spec.parent_id.map(Value::from).unwrap_or_else(|| keep("parent_id")),
                "selectors": or_list(spec.selectors, "selectors"),
                "x509_ttl_secs": spec.x509_ttl.map(Value::from).unwrap_or_else(|| keep("x509_ttl_secs")),
                "jwt_ttl_secs": spec.jwt_ttl.map(Value::from).unwrap_or_else(|| keep("jwt_ttl_secs")),
                "dns_names": or_list(spec.dns_names, "dns_names"),
                "groups": or_list(spec.groups, "groups"),
                "scopes": or_list(spec.scopes, "scopes"),
                "enforcer": if spec.enforcer {
                    true
                } else {
                    !spec.no_enforcer && is_enforcer(&cur)
                },
                "node_selectors": if spec.no_node_selectors {
                    json!([])
                } else if spec.node_selectors.is_empty() {
                    cur.get("node_selectors").cloned().unwrap_or_else(|| json!([]))
                } else {
                    json!(spec.node_selectors)
                },
            });
            let v = c.call(Method::PUT, &path, Some(body)).await?;
            print(&opts, &v, entry_text);
        }
        EntryCmd::List {
            parent_id,
            spiffe_id,
            opts,
        } => {
            let mut q = Vec::new();
            if let Some(p) = parent_id {
                q.push(format!("parent_id={}", encode(&p)));
            }
            if let Some(p) = spiffe_id {
                q.push(format!("spiffe_id={}", encode(&p)));
            }
            let v = client(&opts)
                .call(Method::GET, &format!("/v1/entries?{}", q.join("&")), None)
                .await?;
            print(&opts, &v, entries_text);
        }
        EntryCmd::Show { id, opts } => {
            let v = client(&opts)
                .call(Method::GET, &format!("/v1/entries/{}", encode(&id)), None)
                .await?;
            print(&opts, &v, entry_text);
        }
        EntryCmd::Delete { id, opts } => {
            let v = client(&opts)
                .call(
                    Method::DELETE,
                    &format!("/v1/entries/{}", encode(&id)),
                    None,
                )
                .await?;
            print(&opts, &v, |v| format!("Deleted entry {}", s(v, "deleted")));
        }
    }
    Ok(())
}

pub async fn jointoken(cmd: JoinTokenCmd) -> anyhow::Result<()> {
    let JoinTokenCmd::Create { ttl, opts } = cmd;
    let v = client(&opts)
        .call(
            Method::POST,
            "/v1/jointokens",
            Some(json!({"ttl_secs": ttl})),
        )
        .await?;
    print(&opts, &v, |v| {
        format!(
            "Token   : {}\nNode ID : {}\nExpires : {}",
            s(v, "token"),
            s(v, "node_id"),
            v.get("expires_at").unwrap_or(&Value::Null)
        )
    });
    Ok(())
}

pub async fn node(cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::List { opts } => {
            let v = client(&opts).call(Method::GET, "/v1/nodes", None).await?;
            print(&opts, &v, |v| {
                let nodes = v.as_array().cloned().unwrap_or_default();
                if nodes.is_empty() {
                    return "No nodes".into();
                }
                nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "{}  attestation={} svid_expires={} evicted={} selectors=[{}]",
                            s(n, "spiffe_id"),
                            s(n, "attestation_type"),
                            n.get("not_after").unwrap_or(&Value::Null),
                            n.get("evicted").unwrap_or(&Value::Null),
                            list(n, "selectors"),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        NodeCmd::Evict { spiffe_id, opts } => {
            let v = client(&opts)
                .call(
                    Method::POST,
                    "/v1/nodes/evict",
                    Some(json!({"spiffe_id": spiffe_id})),
                )
                .await?;
            print(&opts, &v, |v| format!("Evicted {}", s(v, "evicted")));
        }
        NodeCmd::Risk { opts } => {
            let v = client(&opts).call(Method::GET, "/v1/risk", None).await?;
            print(&opts, &v, |v| {
                let mut out: Vec<String> = v
                    .get("nodes")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|n| {
                        format!(
                            "{}  level={} score={} quarantined={} posture=[{}] behaviour=[{}]",
                            s(n, "node_id"),
                            s(n, "level"),
                            n.get("score").unwrap_or(&Value::Null),
                            n.get("quarantined").unwrap_or(&Value::Null),
                            list(n, "posture_reasons"),
                            list(n, "anomaly_reasons"),
                        )
                    })
                    .collect();
                for q in v
                    .get("quarantines")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                {
                    out.push(format!(
                        "quarantine {}: {} {} since {} ({})",
                        q.get("id").unwrap_or(&Value::Null),
                        s(&q, "node_id"),
                        q.get("spiffe_id")
                            .and_then(Value::as_str)
                            .unwrap_or("(whole node)"),
                        q.get("created_at").unwrap_or(&Value::Null),
                        s(&q, "reason"),
                    ));
                }
                if out.is_empty() {
                    "No node has reported a posture".into()
                } else {
                    out.join("\n")
                }
            });
        }
        NodeCmd::Quarantine {
            node_id,
            workload,
            reason,
            opts,
        } => {
            let v = client(&opts)
                .call(
                    Method::POST,
                    "/v1/nodes/quarantine",
                    Some(json!({"node_id": node_id, "spiffe_id": workload, "reason": reason})),
                )
                .await?;
            print(&opts, &v, |v| {
                format!(
                    "Quarantined {} {} ({} SVIDs revoked)",
                    s(v, "node_id"),
                    v.get("spiffe_id")
                        .and_then(Value::as_str)
                        .unwrap_or("(whole node)"),
                    v.get("revoked").unwrap_or(&Value::Null)
                )
            });
        }
        NodeCmd::Clear {
            node_id,
            workload,
            opts,
        } => {
            let v = client(&opts)
                .call(
                    Method::POST,
                    "/v1/nodes/clear",
                    Some(json!({"node_id": node_id, "spiffe_id": workload})),
                )
                .await?;
            print(&opts, &v, |v| {
                format!(
                    "Cleared {} quarantine(s) of {}",
                    v.get("cleared").unwrap_or(&Value::Null),
                    s(v, "node_id")
                )
            });
        }
    }
    Ok(())
}

pub async fn svid(cmd: SvidCmd) -> anyhow::Result<()> {
    match cmd {
        SvidCmd::Mint {
            spiffe_id,
            ttl,
            dns_names,
            key_type,
            out_dir,
            opts,
        } => {
            let alg: KeyAlgorithm = key_type
                .parse()
                .map_err(|_| anyhow::anyhow!("unknown key type {key_type:?}"))?;
            let key = KeyPair::generate(alg)?;
            let id = sigil_core::SpiffeId::new(&spiffe_id)?;
            let csr = key.csr_der(Some(&id))?;
            let csr_pem = pem_encode("CERTIFICATE REQUEST", &csr);
            let v = client(&opts)
                .call(
                    Method::POST,
                    "/v1/svids/x509",
                    Some(json!({"spiffe_id": spiffe_id, "csr_pem": csr_pem, "ttl_secs": ttl, "dns_names": dns_names})),
                )
                .await?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            write_file(&out_dir.join("key.pem"), key.pkcs8_pem().as_bytes(), 0o600)?;
            write_file(
                &out_dir.join("svid.pem"),
                s(&v, "cert_pem").as_bytes(),
                0o644,
            )?;
            write_file(
                &out_dir.join("bundle.pem"),
                s(&v, "bundle_pem").as_bytes(),
                0o644,
            )?;
            print(&opts, &v, |v| {
                format!(
                    "SPIFFE ID : {}\nSerial    : {}\nExpires   : {}\nWritten   : {}/{{svid,key,bundle}}.pem",
                    s(v, "spiffe_id"),
                    s(v, "serial"),
                    v.get("expires_at").unwrap_or(&Value::Null),
                    out_dir.display()
                )
            });
        }
        SvidCmd::MintJwt {
            spiffe_id,
            audience,
            ttl,
            opts,
        } => {
            let v = client(&opts)
                .call(
                    Method::POST,
                    "/v1/svids/jwt",
                    Some(json!({"spiffe_id": spiffe_id, "audience": audience, "ttl_secs": ttl})),
                )
                .await?;
            print(&opts, &v, |v| s(v, "token").to_owned());
        }
        SvidCmd::Revoke {
            target,
            reason,
            opts,
        } => {
            let v = client(&opts)
                .call(
                    Method::POST,
                    "/v1/revocations",
                    Some(json!({"target": target, "reason": reason})),
                )
                .await?;
            print(&opts, &v, |_| format!("Revoked {target}"));
        }
        SvidCmd::Revocations { opts } => {
            let v = client(&opts)
                .call(Method::GET, "/v1/revocations", None)
                .await?;
            print(&opts, &v, |v| {
                serde_json::to_string_pretty(v).unwrap_or_default()
            });
        }
        SvidCmd::Issued {
            spiffe_id,
            limit,
            opts,
        } => {
            let mut path = format!("/v1/issued?limit={limit}");
            if let Some(id) = spiffe_id {
                path.push_str(&format!("&spiffe_id={}", encode(&id)));
            }
            let v = client(&opts).call(Method::GET, &path, None).await?;
            print(&opts, &v, |v| {
                v.as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|i| {
                        format!(
                            "{} {} {} not_after={} requester={}",
                            s(i, "kind"),
                            s(i, "serial_or_jti"),
                            s(i, "spiffe_id"),
                            i.get("not_after").unwrap_or(&Value::Null),
                            s(i, "requester")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

pub async fn ca(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::List { opts } => {
            let v = client(&opts).call(Method::GET, "/v1/ca", None).await?;
            print(&opts, &v, |v| {
                v.as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|a| {
                        format!(
                            "{:<5} {:<9} {} {} not_after={}",
                            s(a, "kind"),
                            s(a, "state"),
                            s(a, "key_id"),
                            s(a, "algorithm"),
                            a.get("not_after").unwrap_or(&Value::Null)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        CaCmd::Rotate { jwt, opts } => {
            let kind = if jwt { "jwt" } else { "x509" };
            let v = client(&opts)
                .call(Method::POST, "/v1/ca/rotate", Some(json!({"kind": kind})))
                .await?;
            print(&opts, &v, |v| {
                format!(
                    "{} key {} {} (bundle sequence {})",
                    s(v, "kind"),
                    s(v, "key_id"),
                    s(v, "action"),
                    v.get("bundle_sequence").unwrap_or(&Value::Null)
                )
            });
        }
    }
    Ok(())
}

pub async fn bundle(cmd: BundleCmd) -> anyhow::Result<()> {
    let BundleCmd::Show { format, opts } = cmd;
    let v = client(&opts).call(Method::GET, "/v1/bundle", None).await?;
    match (format.as_str(), opts.output) {
        (_, Output::Json) | ("spiffe", _) => println!(
            "{}",
            serde_json::to_string_pretty(v.get("spiffe").unwrap_or(&Value::Null))?
        ),
        ("pem", _) => print!("{}", s(&v, "x509_pem")),
        (other, _) => anyhow::bail!("unknown bundle format {other:?} (spiffe or pem)"),
    }
    Ok(())
}

fn client(opts: &AdminOpts) -> AdminClient {
    AdminClient::new(&opts.socket)
}

/// Percent-encodes a query or path value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

/// Replaces `path` with `data` atomically and durably, created with `mode` (a key: 0600).
pub(crate) fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    sigil_fs::write_with_mode(path, data, mode)
        .with_context(|| format!("writing {}", path.display()))
}
