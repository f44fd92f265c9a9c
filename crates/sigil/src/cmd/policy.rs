//! `sigil policy`: check Cedar policies against sigil's schema before they are deployed, and
//! publish them as a signed policy bundle (`push`), show the current bundle, and rotate the
//! policy signing key.
use std::path::PathBuf;

use anyhow::Context;
use http::Method;
use serde_json::{Value, json};

use super::{AdminOpts, Output, parse_duration};
use crate::admin_client::AdminClient;

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Parse and validate every *.cedar file of a directory against sigil's schema.
    Validate {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Run a JSON file of request → expected-decision cases against a policy directory.
    Test {
        /// The cases (a JSON array; see policy/demo.tests.json).
        cases: PathBuf,
        /// The policy directory.
        #[arg(long)]
        policies: PathBuf,
    },
    /// Print sigil's Cedar schema.
    Schema,
    /// Validate every *.cedar file of a directory and publish them as the next signed policy
    /// bundle; agents get it at once on their sync streams.
    Push {
        /// The policy directory.
        dir: PathBuf,
        /// How long the bundle may be enforced (e.g. 24h, 7d). Past it, proxies deny
        /// everything until a newer bundle arrives.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: u32,
        /// Rate-limit configuration carried in the bundle (a .json or .toml file).
        #[arg(long)]
        rate_limits: Option<PathBuf>,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Show the current policy bundle (revision, expiry, signing key).
    Show {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// One rotation step of the policy signing key: prepare a new key (published in the trust
    /// bundle, not signing), or activate the prepared one (the old key stays published until
    /// every bundle it signed has expired).
    RotateKey {
        #[command(flatten)]
        opts: AdminOpts,
    },
}

/// Reads the `*.cedar` files of `dir`: (file name, text), sorted by name.
fn read_dir_files(dir: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in &paths {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.push((name, text));
    }
    Ok(files)
}

/// The rate limits of a bundle (the proxy's keys `rate_limit_per_sec`, `rate_limit_burst`,
/// `[[resource_rate_limits]]`), checked as the proxy will check them.
fn read_rate_limits(path: &std::path::Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = if path.extension().is_some_and(|x| x == "toml") {
        let v: toml::Value =
            toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?;
        serde_json::to_value(v)?
    } else {
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?
    };
    sigil_proxy::LimitSettings::from_bundle(&v)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(v)
}

fn print(opts: &AdminOpts, v: &Value, text: impl FnOnce(&Value) -> String) {
    match opts.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Text => println!("{}", text(v)),
    }
}

fn field(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

async fn admin(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Push {
            dir,
            ttl,
            rate_limits,
            opts,
        } => {
            let files = read_dir_files(&dir)?;
            // Validate here first, for errors that name the files as the user has them; the
            // server validates again before it signs.
            let engine = sigil_policy::PolicyEngine::new(&files)
                .with_context(|| format!("{}: policies refused", dir.display()))?;
            let rate_limits = rate_limits.as_deref().map(read_rate_limits).transpose()?;
            let policies: serde_json::Map<String, Value> = files
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/policy/push",
                    Some(json!({
                        "policies": policies,
                        "ttl_secs": ttl,
                        "rate_limits": rate_limits,
                    })),
                )
                .await?;
            print(&opts, &v, |v| {
                format!(
                    "pushed policy bundle revision {} ({} policies in {} files, key {}, expires {})",
                    field(v, "revision"),
                    engine.len(),
                    field(v, "policies"),
                    field(v, "key_id"),
                    field(v, "not_after"),
                )
            });
        }
        PolicyCmd::Show { opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(Method::GET, "/v1/policy", None)
                .await?;
            print(&opts, &v, |v| {
                format!(
                    "revision {} key {} expires {} sha256 {}",
                    field(v, "revision"),
                    field(v, "key_id"),
                    field(v, "not_after"),
                    field(v, "payload_sha256"),
                )
            });
        }
        PolicyCmd::RotateKey { opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/ca/rotate",
                    Some(json!({"kind": "policy"})),
                )
                .await?;
            print(&opts, &v, |v| {
                format!(
                    "policy key {} {} (bundle sequence {})",
                    field(v, "key_id"),
                    field(v, "action"),
                    field(v, "bundle_sequence"),
                )
            });
        }
        other => run_local(other)?,
    }
    Ok(())
}

/// One case of `sigil policy test`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    principal: String,
    #[serde(default)]
    groups: Vec<String>,
    action: String,
    resource_type: String,
    resource_id: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default = "noon")]
    hour: i64,
    #[serde(default)]
    weekday: i64,
    /// MCP tool arguments (a JSON object), seen by policy as `context.arguments`.
    #[serde(default)]
    arguments: Option<serde_json::Value>,
    /// The user the principal acts for, with the chain (`context.delegation`).
    #[serde(default)]
    delegation: Option<CaseDelegation>,
    /// `allow` or `deny`.
    expect: String,
}

/// A test case's `context.delegation`: `chain` lists the actors, the principal first.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseDelegation {
    user: String,
    #[serde(default)]
    groups: Vec<String>,
    chain: Vec<String>,
}

fn noon() -> i64 {
    12
}

fn load_dir(dir: &std::path::Path) -> anyhow::Result<(sigil_policy::PolicyEngine, usize)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in &paths {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        files.push((p.display().to_string(), text));
    }
    Ok((sigil_policy::PolicyEngine::new(&files)?, paths.len()))
}

/// Runs a `sigil policy` command. Called from the (multi-threaded) async runtime without
/// `.await`: the admin subcommands block this worker on their request.
pub fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        c @ (PolicyCmd::Push { .. } | PolicyCmd::Show { .. } | PolicyCmd::RotateKey { .. }) => {
            let handle = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| handle.block_on(admin(c)))
        }
        other => run_local(other),
    }
}

fn run_local(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Schema => print!("{}", sigil_policy::SCHEMA),
        PolicyCmd::Validate { dir } => {
            let (engine, files) = load_dir(&dir)?;
            println!("{} policies in {files} files: valid", engine.len());
        }
        PolicyCmd::Test { cases, policies } => {
            let (engine, _) = load_dir(&policies)?;
            let text = std::fs::read_to_string(&cases)
                .with_context(|| format!("reading {}", cases.display()))?;
            let cases: Vec<Case> = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a JSON array of cases", cases.display()))?;
            let mut failed = 0;
            for c in &cases {
                anyhow::ensure!(
                    matches!(c.expect.as_str(), "allow" | "deny"),
                    "case {:?}: expect must be \"allow\" or \"deny\"",
                    c.name
                );
                let id = sigil_core::SpiffeId::new(&c.principal)
                    .with_context(|| format!("case {:?}: principal", c.name))?;
                let delegation = c.delegation.as_ref().map(|d| sigil_policy::Delegation {
                    user: d.user.clone(),
                    groups: d.groups.clone(),
                    chain: d.chain.clone(),
                });
                // An error (e.g. refused arguments) is a deny, as in the proxy.
                let d = engine.decide(&sigil_policy::Query {
                    principal: sigil_policy::Principal {
                        spiffe_id: &c.principal,
                        trust_domain: id.trust_domain_name(),
                        groups: &c.groups,
                    },
                    action: &c.action,
                    resource_type: &c.resource_type,
                    resource_id: &c.resource_id,
                    scopes: &c.scopes,
                    hour: c.hour,
                    weekday: c.weekday,
                    arguments: c.arguments.as_ref(),
                    delegation: delegation.as_ref(),
                    risk: None,
                });
                let (got, why) = match &d {
                    Ok(d) if d.allow => ("allow", d.policy_ids.join(", ")),
                    Ok(d) if d.errors.is_empty() => ("deny", d.policy_ids.join(", ")),
                    Ok(d) => (
                        "deny",
                        format!(
                            "{}; errors: {}",
                            d.policy_ids.join(", "),
                            d.errors.join("; ")
                        ),
                    ),
                    Err(e) => ("deny", format!("error: {e}")),
                };
                if got == c.expect {
                    println!("PASS  {}  ({got}; {why})", c.name);
                } else {
                    failed += 1;
                    println!("FAIL  {}  expected {}, got {got} ({why})", c.name, c.expect);
                }
            }
            println!("{} passed, {failed} failed", cases.len() - failed);
            anyhow::ensure!(failed == 0, "{failed} policy test case(s) failed");
        }
        PolicyCmd::Push { .. } | PolicyCmd::Show { .. } | PolicyCmd::RotateKey { .. } => {}
    }
    Ok(())
}
