//! `sigil secret` and `sigil lease`: static secrets and dynamic database credential roles at
//! the trust authority (admin socket), and a workload's own reads through its agent.
//!
//! Values never travel in process arguments: `put` reads the value from a file or stdin,
//! and a role's connection URL comes from a file unless it holds no password.
use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use http::Method;
use serde_json::{Value, json};
use sigil_proto::agent as ap;

use crate::admin_client::AdminClient;
use crate::cmd::{AdminOpts, Output, parse_duration};

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Write a new version of a secret (the value from --from-file, or stdin).
    Put {
        /// The secret's path (`Secret::"<path>"` in policy), e.g. billing/stripe-key.
        path: String,
        /// Read the value from this file (default: stdin).
        #[arg(long)]
        from_file: Option<PathBuf>,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Print a secret's value (the newest version by default), as the administrator.
    Get {
        path: String,
        #[arg(long)]
        version: Option<i64>,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List the secrets (paths and newest versions, no values).
    List {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List a secret's versions.
    Versions {
        path: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Delete a secret: every version's key and ciphertext are destroyed.
    Delete {
        path: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Dynamic PostgreSQL credential roles (read at `database/creds/<name>`).
    #[command(subcommand)]
    DbRole(DbRoleCmd),
    /// As a workload: read a secret (or get a dynamic credential) through the agent.
    Read {
        path: String,
        #[command(flatten)]
        w: WorkloadOpts,
        /// For dynamic credentials: the lease length asked for (e.g. 15m).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<u32>,
        /// Print the value and its lease as JSON (default: the value alone).
        #[arg(long)]
        json: bool,
    },
    /// As a workload: renew a dynamic credential's lease through the agent.
    Renew {
        lease_id: String,
        #[command(flatten)]
        w: WorkloadOpts,
        #[arg(long, value_parser = parse_duration)]
        increment: Option<u32>,
    },
    /// As a workload: end a dynamic credential's lease now.
    Revoke {
        lease_id: String,
        #[command(flatten)]
        w: WorkloadOpts,
    },
}

/// How a workload command reaches its agent.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadOpts {
    /// The agent's Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// Which of the caller's SPIFFE IDs acts (when several entries match it).
    #[arg(long)]
    spiffe_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DbRoleCmd {
    /// Define (or redefine) a role.
    Put {
        /// Its name (a-z 0-9 _): workloads read `database/creds/<name>`.
        name: String,
        /// The PostgreSQL the role's users are made in, as a URL without a password (use
        /// certificate or peer auth); `sslmode=verify-full&sslrootcert=...` for TLS.
        #[arg(long, conflicts_with = "connection_url_file")]
        connection_url: Option<String>,
        /// A file holding the connection URL (which may hold a password).
        #[arg(long)]
        connection_url_file: Option<PathBuf>,
        /// SQL creating a user: must use {{name}}, {{password}} and {{expiration}}, e.g.
        /// CREATE ROLE "{{name}}" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
        /// GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";
        #[arg(long)]
        creation_sql: String,
        /// SQL dropping it ({{name}}), run after its sessions are terminated; default
        /// DROP OWNED BY "{{name}}"; DROP ROLE IF EXISTS "{{name}}";
        #[arg(long)]
        revocation_sql: Option<String>,
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        default_ttl: u32,
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        max_ttl: u32,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List the roles (never their connection URLs).
    List {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Delete a role: no new credentials; open leases stay until they end or are revoked.
    Delete {
        name: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// List the open leases of dynamic credentials.
    List {
        /// Closed leases too.
        #[arg(long)]
        all: bool,
        /// Only this workload's.
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// End a lease now: its database user is dropped and its sessions terminated.
    Revoke {
        id: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

fn print(output: Output, v: &Value, text: impl FnOnce(&Value) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Text => println!("{}", text(v)),
    }
}

fn rows(v: &Value, key: &str, row: impl Fn(&Value) -> String) -> String {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(row).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
    v.get(k).unwrap_or(&Value::Null)
}

pub async fn run(cmd: SecretCmd) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Put {
            path,
            from_file,
            opts,
        } => {
            let value = match from_file {
                Some(f) => std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?,
                None => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .context("reading the value from stdin")?;
                    b
                }
            };
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/secrets",
                    Some(json!({"path": path, "value_b64": B64.encode(&value)})),
                )
                .await?;
            print(opts.output, &v, |v| {
                format!(
                    "{} version {}",
                    field(v, "path").as_str().unwrap_or(""),
                    field(v, "version")
                )
            });
        }
        SecretCmd::Get {
            path,
            version,
            opts,
        } => {
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/secrets/get",
                    Some(json!({"path": path, "version": version})),
                )
                .await?;
            match opts.output {
                Output::Json => print(opts.output, &v, |_| String::new()),
                Output::Text => {
                    let value = B64.decode(field(&v, "value_b64").as_str().unwrap_or(""))?;
                    std::io::stdout().write_all(&value)?;
                }
            }
        }
        SecretCmd::List { opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(Method::GET, "/v1/secrets", None)
                .await?;
            print(opts.output, &v, |v| {
                rows(v, "secrets", |s| {
                    let deleted = if field(s, "deleted_at").is_null() {
                        ""
                    } else {
                        " (deleted)"
                    };
                    format!(
                        "{}\tversion {}{deleted}",
                        field(s, "path").as_str().unwrap_or(""),
                        field(s, "version")
                    )
                })
            });
        }
        SecretCmd::Versions { path, opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/secrets/versions",
                    Some(json!({"path": path})),
                )
                .await?;
            print(opts.output, &v, |v| {
                rows(v, "versions", |s| {
                    let deleted = if field(s, "deleted_at").is_null() {
                        ""
                    } else {
                        " (deleted)"
                    };
                    format!(
                        "{}\tcreated {}{deleted}",
                        field(s, "version"),
                        field(s, "created_at")
                    )
                })
            });
        }
        SecretCmd::Delete { path, opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/secrets/delete",
                    Some(json!({"path": path})),
                )
                .await?;
            print(opts.output, &v, |v| {
                format!("deleted {} version(s)", field(v, "deleted_versions"))
            });
        }
        SecretCmd::DbRole(c) => db_role(c).await?,
        SecretCmd::Read { path, w, ttl, json } => {
            let mut c = ap::secrets_client::SecretsClient::new(
                crate::cmd::workload::channel(&w.socket).await?,
            );
            let v = c
                .read(crate::cmd::workload::request(ap::ReadSecretRequest {
                    path,
                    spiffe_id: w.spiffe_id.unwrap_or_default(),
                    ttl_secs: ttl.map_or(0, i64::from),
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let lease = v.lease.unwrap_or_default();
                let value = match std::str::from_utf8(&v.value) {
                    Ok(s) => json!({"value": s}),
                    Err(_) => json!({"value_b64": B64.encode(&v.value)}),
                };
                let mut out = json!({
                    "path": v.path,
                    "version": v.version,
                    "spiffe_id": v.spiffe_id,
                    "lease_id": lease.lease_id,
                    "lease_duration": lease.lease_duration,
                    "expires_at": lease.expires_at,
                    "renewable": lease.renewable,
                });
                if let (Some(o), Some(val)) = (out.as_object_mut(), value.as_object()) {
                    o.extend(val.clone());
                }
                println!("{out}");
            } else {
                std::io::stdout().write_all(&v.value)?;
            }
        }
        SecretCmd::Renew {
            lease_id,
            w,
            increment,
        } => {
            let mut c = ap::secrets_client::SecretsClient::new(
                crate::cmd::workload::channel(&w.socket).await?,
            );
            let l = c
                .renew(crate::cmd::workload::request(ap::LeaseRequest {
                    lease_id,
                    spiffe_id: w.spiffe_id.unwrap_or_default(),
                    increment_secs: increment.map_or(0, i64::from),
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{}",
                json!({"lease_id": l.lease_id, "lease_duration": l.lease_duration,
                       "expires_at": l.expires_at, "renewable": l.renewable})
            );
        }
        SecretCmd::Revoke { lease_id, w } => {
            let mut c = ap::secrets_client::SecretsClient::new(
                crate::cmd::workload::channel(&w.socket).await?,
            );
            c.revoke(crate::cmd::workload::request(ap::LeaseRequest {
                lease_id: lease_id.clone(),
                spiffe_id: w.spiffe_id.unwrap_or_default(),
                increment_secs: 0,
            }))
            .await
            .map_err(status_error)?;
            println!("revoked {lease_id}");
        }
    }
    Ok(())
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn db_role(cmd: DbRoleCmd) -> anyhow::Result<()> {
    match cmd {
        DbRoleCmd::Put {
            name,
            connection_url,
            connection_url_file,
            creation_sql,
            revocation_sql,
            default_ttl,
            max_ttl,
            opts,
        } => {
            let url = match (connection_url, connection_url_file) {
                (Some(u), None) => {
                    let parsed = url::Url::parse(&u).context("--connection-url")?;
                    if parsed.password().is_some() {
                        bail!(
                            "--connection-url holds a password, which would show in the process list: \
                             give it with --connection-url-file"
                        );
                    }
                    u
                }
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_owned(),
                _ => bail!("give --connection-url or --connection-url-file"),
            };
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/db-roles",
                    Some(json!({
                        "name": name,
                        "connection_url": url,
                        "creation_sql": creation_sql,
                        "revocation_sql": revocation_sql,
                        "default_ttl_secs": default_ttl,
                        "max_ttl_secs": max_ttl,
                    })),
                )
                .await?;
            print(opts.output, &v, |v| {
                format!(
                    "role {} (workloads read {})",
                    field(v, "name").as_str().unwrap_or(""),
                    field(v, "path").as_str().unwrap_or("")
                )
            });
        }
        DbRoleCmd::List { opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(Method::GET, "/v1/db-roles", None)
                .await?;
            print(opts.output, &v, |v| {
                rows(v, "roles", |r| {
                    format!(
                        "{}\tdefault ttl {}s, max {}s",
                        field(r, "name").as_str().unwrap_or(""),
                        field(r, "default_ttl_secs"),
                        field(r, "max_ttl_secs")
                    )
                })
            });
        }
        DbRoleCmd::Delete { name, opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/db-roles/delete",
                    Some(json!({"name": name})),
                )
                .await?;
            print(opts.output, &v, |v| {
                format!("deleted {}", field(v, "deleted"))
            });
        }
    }
    Ok(())
}

pub async fn lease(cmd: LeaseCmd) -> anyhow::Result<()> {
    match cmd {
        LeaseCmd::List {
            all,
            spiffe_id,
            opts,
        } => {
            let mut path = format!("/v1/leases?all={all}");
            if let Some(id) = spiffe_id {
                path.push_str("&spiffe_id=");
                path.extend(form_urlencoded::byte_serialize(id.as_bytes()));
            }
            let v = AdminClient::new(&opts.socket)
                .call(Method::GET, &path, None)
                .await?;
            print(opts.output, &v, |v| {
                rows(v, "leases", |l| {
                    let state = match field(l, "revoke_reason").as_str() {
                        Some(r) => format!("closed ({r})"),
                        None => format!("open until {}", field(l, "expires_at")),
                    };
                    format!(
                        "{}\t{}\t{}\t{state}",
                        field(l, "id").as_str().unwrap_or(""),
                        field(l, "spiffe_id").as_str().unwrap_or(""),
                        field(l, "username").as_str().unwrap_or("")
                    )
                })
            });
        }
        LeaseCmd::Revoke { id, opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(Method::POST, "/v1/leases/revoke", Some(json!({"id": id})))
                .await?;
            print(opts.output, &v, |v| {
                format!("revoked {}", field(v, "revoked"))
            });
        }
    }
    Ok(())
}
